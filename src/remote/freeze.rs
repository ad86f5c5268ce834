//! `drydock freeze` / `thaw`: stop what writes, make every filesystem of the
//! disk read-only and its swap off, then check it (safety rule 6); and undo.
//!
//! What was stopped is recorded on the host's /run (a tmpfs that a reboot
//! clears, as it clears the freeze), so `thaw` restarts exactly that.

use anyhow::{Context, Result};
use serde::Serialize;

use super::device::{Device, inspect, require_root};
use super::{Facts, gather};
use crate::refused;
use crate::ssh::{Session, shell_quote};

/// Services that must keep running for drydock to reach and manage the host.
/// Everything else that runs is stopped.
const KEEP: &[&str] = &[
    "ssh.service",
    "sshd.service",
    "systemd-journald.service",
    "systemd-logind.service",
    "systemd-udevd.service",
    "dbus.service",
    "dbus-broker.service",
    "polkit.service",
    "systemd-networkd.service",
    "systemd-resolved.service",
    "NetworkManager.service",
    "networking.service",
    "dhcpcd.service",
    "wpa_supplicant.service",
    "qemu-guest-agent.service",
];
/// Unit name prefixes kept as well (templated units).
const KEEP_PREFIX: &[&str] = &[
    "getty@",
    "serial-getty@",
    "user@",
    "ifup@",
    "dhclient@",
    "session-",
];

const STATE_DIR: &str = "/run/drydock-freeze";

#[derive(Debug, Serialize)]
pub struct FreezeReport {
    pub host: String,
    pub device: String,
    pub stopped: Vec<String>,
    pub read_only: Vec<String>,
    pub swap_off: Vec<String>,
    pub boot_id: String,
}

fn stop_services_script() -> String {
    let keep = KEEP.join(" ");
    let keep_prefix = KEEP_PREFIX.join(" ");
    format!(
        r#"export LC_ALL=C PATH="$PATH:/usr/sbin:/sbin:/run/current-system/sw/bin"
S={STATE_DIR}; mkdir -p "$S" || exit 1
command -v systemctl >/dev/null 2>&1 || {{ echo "no systemd: stop the host's services by hand, then freeze again" >&2; exit 0; }}
for t in $(systemctl list-units --type=timer --state=active --no-legend --plain 2>/dev/null | cut -d' ' -f1); do
  systemctl stop "$t" && echo "$t" >> "$S/stopped"
done
for u in $(systemctl list-units --type=service --state=running --no-legend --plain 2>/dev/null | cut -d' ' -f1); do
  k=0
  for x in {keep}; do [ "$u" = "$x" ] && k=1; done
  for p in {keep_prefix}; do case "$u" in "$p"*) k=1;; esac; done
  [ $k = 1 ] && continue
  if systemctl stop "$u"; then echo "$u" >> "$S/stopped"; echo "stopped $u"; fi
done
journalctl --relinquish-var >/dev/null 2>&1 || true
sync
"#
    )
}

/// Processes with files open for writing under a mount point, as
/// "PID (comm) path" lines: what keeps a remount read-only from working.
fn writers_script(mount_point: &str) -> String {
    format!(
        r#"m={mp}
for p in /proc/[0-9]*; do
  for fd in "$p"/fd/*; do
    t=$(readlink "$fd" 2>/dev/null) || continue
    case "$t" in /*) ;; *) continue;; esac
    case "$t" in /proc/*|/sys/*|/dev/*|/run/*) continue;; esac
    if [ "$m" != / ]; then case "$t" in "$m"|"$m"/*) ;; *) continue;; esac; fi
    fl=$(sed -n 's/^flags:[[:space:]]*//p' "$p/fdinfo/${{fd##*/}}" 2>/dev/null)
    case "$fl" in *[1256]) echo "${{p#/proc/}} ($(cat "$p/comm" 2>/dev/null)) $t";; esac
  done
done | sort -u | head -n 20"#,
        mp = shell_quote(mount_point)
    )
}

pub async fn freeze(
    session: &Session,
    facts: &Facts,
    device: Option<&str>,
) -> Result<FreezeReport> {
    require_root(facts, session)?;
    let dev = inspect(session, facts, device).await?;
    // Services write to the host's disks; a regular file standing in for a
    // disk (a loop-mounted image) is frozen without touching them.
    let stopped: Vec<String> = if dev.is_block() {
        session
            .run("stopping services", &stop_services_script())
            .await?
            .lines()
            .filter_map(|l| l.strip_prefix("stopped ").map(str::to_string))
            .collect()
    } else {
        Vec::new()
    };

    // Deepest mount points first, so /boot goes read-only before /.
    let mut mounts = dev.rw_mounts().into_iter().cloned().collect::<Vec<_>>();
    mounts.sort_by_key(|m| std::cmp::Reverse(m.mount_point.len()));
    for m in &mounts {
        let cmd = format!(
            "sync && mount -o remount,ro {}",
            shell_quote(&m.mount_point)
        );
        let res = session.exec(&cmd).await?;
        if !res.success() {
            let writers = session
                .run("listing writers", &writers_script(&m.mount_point))
                .await
                .unwrap_or_default();
            let writers = if writers.trim().is_empty() {
                "none found with a file open for writing (a deleted file still open, or a kernel user such as quota or a loop device, can also hold it)".to_string()
            } else {
                format!(
                    "these hold files open for writing:\n  {}",
                    writers.trim().replace('\n', "\n  ")
                )
            };
            return Err(refused!(
                "cannot make {} read-only on {} ({}): {}. Stop them, or run `drydock thaw {}` \
                 to undo what was done",
                m.mount_point,
                session.host(),
                String::from_utf8_lossy(&res.stderr).trim(),
                writers,
                session.target.alias
            ));
        }
    }
    let swaps: Vec<String> = facts
        .swaps_on_disk(dev.path.trim_start_matches("/dev/"))
        .into_iter()
        .map(|s| s.path.clone())
        .collect();
    for s in &swaps {
        session
            .run(
                &format!("turning swap {s} off"),
                &format!("swapoff {}", shell_quote(s)),
            )
            .await?;
    }
    let after = gather(session).await?;
    let dev_after = inspect(session, &after, Some(&dev.path)).await?;
    check_frozen(&after, &dev_after, session)?;
    Ok(FreezeReport {
        host: session.host(),
        device: dev.path.clone(),
        stopped,
        read_only: mounts.iter().map(|m| m.mount_point.clone()).collect(),
        swap_off: swaps,
        boot_id: after.boot_id,
    })
}

/// Rule 6: the freeze is checked, not assumed.
pub fn check_frozen(facts: &Facts, dev: &Device, session: &Session) -> Result<()> {
    let rw: Vec<String> = dev
        .rw_mounts()
        .iter()
        .map(|m| m.mount_point.clone())
        .collect();
    let swap: Vec<String> = facts
        .swaps_on_disk(dev.path.trim_start_matches("/dev/"))
        .iter()
        .map(|s| s.path.clone())
        .collect();
    if !rw.is_empty() || !swap.is_empty() {
        return Err(refused!(
            "{} on {} is not frozen: still read-write: [{}], swap still on: [{}]",
            dev.path,
            session.host(),
            rw.join(", "),
            swap.join(", ")
        ));
    }
    Ok(())
}

pub async fn thaw(session: &Session, facts: &Facts, device: Option<&str>) -> Result<Vec<String>> {
    require_root(facts, session)?;
    let dev = inspect(session, facts, device).await?;
    let mut mounts = dev.mounts.clone();
    mounts.sort_by_key(|m| m.mount_point.len());
    for m in mounts.iter().filter(|m| m.read_only) {
        session
            .run(
                &format!("remounting {} read-write", m.mount_point),
                &format!("mount -o remount,rw {}", shell_quote(&m.mount_point)),
            )
            .await?;
    }
    let script = format!(
        r#"export LC_ALL=C PATH="$PATH:/usr/sbin:/sbin:/run/current-system/sw/bin"
swapon -a 2>/dev/null || true
journalctl --flush >/dev/null 2>&1 || true
S={STATE_DIR}
if [ -f "$S/stopped" ]; then
  while read -r u; do systemctl start "$u" && echo "started $u"; done < "$S/stopped"
  rm -f "$S/stopped"
fi"#
    );
    let out = session
        .run("restarting services", &script)
        .await
        .context("the filesystems are read-write again, but not every service restarted")?;
    Ok(out
        .lines()
        .filter_map(|l| l.strip_prefix("started ").map(str::to_string))
        .collect())
}
