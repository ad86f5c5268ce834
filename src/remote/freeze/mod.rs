//! `drydock freeze` / `thaw`: stop what writes, make every filesystem of the
//! disk read-only and its swap off, then check it (docs/safety.md, rule 6); and undo.
//!
//! # A freeze completes or undoes itself
//!
//! Every change is recorded on the host, in `/run/drydock-freeze` (a tmpfs
//! that a reboot clears, as a reboot undoes the freeze), *before* it is
//! made: a connection cut between the change and its record cannot leave a
//! change nobody knows of. Undoing something that was recorded but not done
//! is harmless (remounting a read-write filesystem read-write, starting a
//! running unit, turning on a swap that is on are all no-ops, and a stopped
//! process is started again only if it is gone). When any step fails, the
//! freeze undoes every recorded change, newest kind first, and reports:
//! refused (exit 3) when nothing is left changed, a failure (exit 1) naming
//! what is still changed and the `drydock thaw HOST` that undoes it when
//! the undo could not finish. `thaw` undoes exactly what is recorded, never
//! a filesystem that was read-only before drydock came.
//!
//! # What is stopped, what is kept, and why that is safe
//!
//! * **Timers, path units and sockets** first, so that nothing starts a
//!   service again while the services stop (a socket such as rsyslog's
//!   `syslog.socket` would start rsyslog at the next log line). Kept: the
//!   sockets of sshd, D-Bus, systemd itself and the storage daemons (LVM,
//!   device-mapper events, multipath, iSCSI), which write nothing to the
//!   disk's filesystems and which the host needs to stay reachable.
//! * **Running services**, except those in [`KEEP`]: sshd, journald (told
//!   to write to /run instead of /var with `--relinquish-var`, so a
//!   persistent journal is closed), logind, udev, D-Bus, and every network
//!   manager (systemd-networkd, NetworkManager, ifupdown's units, dhcpcd):
//!   they keep the address the host is reached on. Lease files they would
//!   write on a renewal (dhcpcd's, NetworkManager's) fail to write on the
//!   read-only disk; they log it and keep the address. Each stop has a
//!   deadline (`timeout 300`). Docker and containerd are services: stopping
//!   them stops their containers, which unmounts the containers' overlays
//!   (whose upper layers, on the disk, would hold it busy), and volumes are
//!   plain directories on the disk. Databases (PostgreSQL, MariaDB) stop
//!   through their own units, which checkpoint: every committed row is in
//!   the files that are copied.
//! * **ISC dhclient** (ifupdown's DHCP client, also run as `dhclient@`)
//!   keeps its lease file open for writing, which keeps `/` from going
//!   read-only, and stopping the unit that started it (`networking` or
//!   `ifup@IF`) would take the interface down. So its addresses on its
//!   interface are made permanent (`ip addr change … valid_lft forever`:
//!   if the lease expires during a long upgrade the kernel keeps the
//!   address, where a lease with a lifetime would drop it and the host with
//!   it), its command line is recorded and it is killed with SIGKILL (a
//!   SIGTERM could run dhclient-script's STOP, which flushes the address).
//!   The provider's DHCP server gives a VPS the same address by its MAC, so
//!   holding it past the lease's end takes nobody's address. `thaw` starts
//!   it again with the same command line (in a scope of its own, so it
//!   outlives the SSH session); the address stays permanent until its
//!   first renewal, where Debian's dhclient-script sets the lease's
//!   lifetime again (`ip addr change … valid_lft`). The reboot after a
//!   push starts it as at every boot.
//!   A dhclient that NetworkManager runs (its `dhcp=dhclient` setting) is
//!   NetworkManager's child and is started again by it; if it reopens its
//!   lease file before the remount, the remount fails and the freeze
//!   undoes itself naming it.
//! * **The other network managers keep running, and with them the
//!   address.** systemd-networkd (also what netplan renders to, as on
//!   Debian's and Ubuntu's cloud images) keeps its leases in /run and
//!   renews them as usual. dhcpcd and NetworkManager (its internal DHCP
//!   client, Debian's default) renew in memory; the lease file they write
//!   under /var/lib on a renewal fails on the read-only disk, which they
//!   log and go on. So a lease that ends during a long upgrade is renewed
//!   as always, only not saved; the reboot after the push starts them from
//!   their saved lease as at any boot. netplan itself is a generator (it
//!   runs at boot, not during the window) and cloud-init's units are
//!   oneshots that ran at boot: nothing of theirs runs to be stopped, and
//!   they stay enabled on the disk.
//! * **Anything else with a file open for writing** (a user's editor in
//!   tmux, a cron job that outlived `cron.service`, whose `KillMode=process`
//!   leaves jobs running) is not killed: drydock cannot know what losing
//!   it costs. The remount fails, the freeze undoes itself and names each
//!   writer (PID, command, file) so that its owner can end it.
//! * **On OpenRC** (Alpine, Gentoo, Devuan, Debian without systemd) the
//!   services go down through `openrc-run SCRIPT stop` (what
//!   `rc-service SVC stop` runs, but the only way Debian's LSB scripts
//!   change OpenRC's marks): every started one but the SSH server, the
//!   network's (networking, dhcpcd, net.*, ...), acpid and rmnologin
//!   (`remote::openrc`, the same names the worker VM's seal keeps), what
//!   those need (`rc-depend -t ineed`, for stopping it would stop them
//!   with it; without rc-depend nothing is stopped and the freeze says
//!   so), and what the sysinit and boot runlevels
//!   start for the system itself (devices, mounts, the hostname). Of
//!   those, the ones that write or reach out are stopped still: cron and
//!   at, chrony and ntpd, `local`, and the loggers (syslog, rsyslog,
//!   syslog-ng, metalog), which keep /var/log open for writing. OpenRC
//!   stops a service's dependents with it, so the list of started
//!   services is recorded first, and thaw starts again each of them that
//!   is not running. ifupdown's dhclient is handled as above. A host
//!   with neither systemd nor OpenRC gets no service stopped; a writer
//!   keeps the remount from working and is named.
//! * **Swap** on the disk (a partition, an LVM volume, or a swap file on
//!   one of its filesystems) is turned off before the filesystems go
//!   read-only: the kernel writes swap pages straight to the blocks, so a
//!   swap left on would change the disk under the copy, and an active swap
//!   file is a file open for writing, which keeps its filesystem from
//!   going read-only.
//!
//! * **Persistent journald** (`/var/log/journal`) is told to write to /run
//!   (`journalctl --relinquish-var`) and closes its files there; thaw
//!   (`journalctl --flush`) and the reboot bring it back to /var.
//! * **Every filesystem of the disk goes read-only, deepest mount point
//!   first**: /boot/efi before /boot before /, /var and /home (their own
//!   partitions) before /. The same holds for filesystems on LVM volumes
//!   of the disk (a root on LVM, with /boot beside it), for XFS (a
//!   read-only remount writes its log out) and for btrfs, where the
//!   subvolumes mounted at / and /home are one filesystem: the first
//!   remount makes the whole filesystem read-only, the later ones find it
//!   so. Thaw remounts them read-write in the reverse order; the reboot
//!   mounts them as fstab says.
//!
//! The check after the freeze reads the mounts and swaps again (docs/safety.md, rule 6).

use anyhow::{Context, Result, bail};
use serde::Serialize;

use super::device::{Device, inspect, require_root};
use super::{Facts, gather, openrc};
use crate::errors::refused;
use crate::ssh::{Session, shell_quote};

mod scripts;
use scripts::{record, restore_script, stop_dhclient_script, stop_units_script, writers_script};

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
/// Socket and path units kept (by name prefix): sshd's, D-Bus's, systemd's
/// own and the storage daemons'.
const KEEP_TRIGGER_PREFIX: &[&str] = &[
    "ssh.socket",
    "sshd.socket",
    "sshd@",
    "dbus.socket",
    "systemd-",
    "lvm2-",
    "dm-event.",
    "multipathd.",
    "iscsid.",
];

const STATE_DIR: &str = "/run/drydock-freeze";

#[derive(Debug, Serialize)]
pub struct FreezeReport {
    pub host: String,
    pub device: String,
    pub stopped: Vec<String>,
    /// Processes outside the stopped units that were stopped (dhclient).
    pub killed: Vec<String>,
    pub read_only: Vec<String>,
    pub swap_off: Vec<String>,
    pub boot_id: String,
}

impl FreezeReport {
    /// What `drydock freeze` says, and the thaw that undoes it (HOST as the
    /// user typed it).
    pub fn human(&self, typed_host: &str) -> String {
        format!(
            "{} frozen: {} read-only ({}), {} unit(s) stopped, swap off: [{}]{}\n`drydock thaw {}` undoes it\n",
            self.host,
            self.device,
            self.read_only.join(", "),
            self.stopped.len(),
            self.swap_off.join(", "),
            if self.killed.is_empty() {
                String::new()
            } else {
                format!(", stopped (addresses kept): {}", self.killed.join(", "))
            },
            typed_host
        )
    }
}

/// What `thaw` (or a freeze undoing itself) put back, and what it could not.
#[derive(Debug, Default, Serialize)]
pub struct ThawReport {
    pub host: String,
    /// "read-write /boot", "swap on /swapfile", "started cron.service", …
    pub restored: Vec<String>,
    /// What is still changed, with the reason.
    pub left: Vec<String>,
    /// False when no freeze by drydock was recorded on the host.
    pub was_frozen: bool,
    /// The device the recorded freeze is of, when the thaw named another
    /// (nothing was put back).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub other_device: Option<String>,
}

impl ThawReport {
    pub fn human(&self) -> String {
        if !self.was_frozen {
            return format!(
                "{}: no freeze by drydock is recorded there since it booted; nothing to thaw",
                self.host
            );
        }
        let mut s = format!(
            "{} thawed: {}",
            self.host,
            if self.restored.is_empty() {
                "nothing was left to put back".to_string()
            } else {
                self.restored.join(", ")
            }
        );
        if !self.left.is_empty() {
            s.push_str(&format!("; NOT put back: {}", self.left.join("; ")));
        }
        s
    }
}

/// What a freeze has done so far, as a user reads it.
#[derive(Default)]
struct Done {
    changes: Vec<String>,
}

impl Done {
    fn any(&self) -> bool {
        !self.changes.is_empty()
    }
}

/// Undo after a failure, and turn the failure into the error to report.
async fn undo_after(session: &Session, done: &Done, failure: String) -> anyhow::Error {
    let host = session.host();
    let typed = session.target.typed_arg();
    match restore(session, None).await {
        Ok(r) if r.left.is_empty() => {
            let undone = if done.any() {
                format!(
                    "drydock undid what it had done ({}): nothing on {host} is left changed",
                    done.changes.join(", ")
                )
            } else {
                format!("nothing on {host} was changed")
            };
            refused!("{failure}\n{undone}")
        }
        Ok(r) => anyhow::anyhow!(
            "{failure}\ndrydock could not undo all it had done; still changed on {host}: {}. \
             Put back: {}. `drydock thaw {typed}` tries again (a reboot of the host also undoes the freeze)",
            r.left.join("; "),
            if r.restored.is_empty() {
                "nothing".to_string()
            } else {
                r.restored.join(", ")
            }
        ),
        Err(e) => anyhow::anyhow!(
            "{failure}\ndrydock could not undo it ({e:#}); what it had done on {host}: {}. \
             `drydock thaw {typed}` undoes it (a reboot of the host does too)",
            if done.any() {
                done.changes.join(", ")
            } else {
                "nothing".to_string()
            }
        ),
    }
}

/// Files the swap file at PATH is on: the longest mount point holding it.
fn mount_of<'a>(mounts: &'a [super::facts::Mount], path: &str) -> Option<&'a super::facts::Mount> {
    mounts
        .iter()
        .filter(|m| {
            let mp = m.mount_point.trim_end_matches('/');
            mp.is_empty() || path == mp || path.starts_with(&format!("{mp}/"))
        })
        .max_by_key(|m| m.mount_point.len())
}

/// Swap areas that write to the device: swap partitions and volumes on it,
/// and swap files on one of its filesystems.
fn swaps_on(facts: &Facts, dev: &Device) -> Vec<String> {
    let mut out: Vec<String> = facts
        .swaps_on_disk(dev.path.trim_start_matches("/dev/"))
        .into_iter()
        .map(|s| s.path.clone())
        .collect();
    for s in facts.swaps.iter().filter(|s| s.kind == "file") {
        if let Some(m) = mount_of(&facts.mounts, &s.path)
            && dev.mounts.iter().any(|d| d.dev == m.dev)
        {
            out.push(s.path.clone());
        }
    }
    out
}

pub async fn freeze(
    session: &Session,
    facts: &Facts,
    device: Option<&str>,
) -> Result<FreezeReport> {
    require_root(facts, session)?;
    let dev = inspect(session, facts, device).await?;
    // Which device the records are of: a thaw naming another one is refused.
    let res = session.exec(&record("device", &dev.path)).await?;
    if !res.success() {
        return Err(refused!(
            "cannot write drydock's record of the freeze in {STATE_DIR} on {} ({}); nothing was changed",
            session.host(),
            String::from_utf8_lossy(&res.stderr).trim()
        ));
    }
    // Whatever fails from here is undone, and the error says what was.
    let mut done = Done::default();
    match freeze_steps(session, facts, &dev, &mut done).await {
        Ok(r) => Ok(r),
        Err(e) => Err(undo_after(session, &done, format!("{e:#}")).await),
    }
}

/// The freeze proper, each change recorded in DONE as it is made.
async fn freeze_steps(
    session: &Session,
    facts: &Facts,
    dev: &Device,
    done: &mut Done,
) -> Result<FreezeReport> {
    // Services write to the host's disks; a regular file standing in for a
    // disk (a loop-mounted image) is frozen without touching them.
    let (stopped, killed) = if dev.is_block() {
        stop_writers(session, done).await?
    } else {
        (Vec::new(), Vec::new())
    };
    let swap_off = swaps_off(session, facts, dev, done).await?;
    let read_only = remount_read_only(session, dev, done).await?;
    let after = gather(session).await?;
    let dev_after = inspect(session, &after, Some(&dev.path)).await?;
    check_frozen(&after, &dev_after, session)?;
    Ok(FreezeReport {
        host: session.host(),
        device: dev.path.clone(),
        stopped,
        killed,
        read_only,
        swap_off,
        boot_id: after.boot_id,
    })
}

/// The host's services stopped (but SSH and what the network needs), its
/// DHCP clients stopped with their addresses kept, the journal moved off
/// the disk: (units stopped, processes stopped).
async fn stop_writers(session: &Session, done: &mut Done) -> Result<(Vec<String>, Vec<String>)> {
    let host = session.host();
    let out = session.exec(&stop_units_script()).await?;
    let said = out.stdout_str();
    for note in said.lines().filter_map(|l| l.strip_prefix("note ")) {
        tracing::warn!("{host}: {note}");
    }
    let stopped: Vec<String> = said
        .lines()
        .filter_map(|l| l.strip_prefix("stopped ").map(str::to_string))
        .collect();
    if !stopped.is_empty() {
        done.changes.push(format!("stopped {}", stopped.join(" ")));
    }
    if !out.success() {
        bail!(
            "cannot stop the services of {host}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let out = session
        .run("stopping dhclient", &stop_dhclient_script())
        .await?;
    let killed: Vec<String> = out
        .lines()
        .filter_map(|l| l.strip_prefix("killed ").map(str::to_string))
        .collect();
    if !killed.is_empty() {
        done.changes.push(format!(
            "stopped {} (its addresses kept, made permanent)",
            killed.join(", ")
        ));
    }
    session
        .exec(&format!(
            "{} && {{ timeout 60 journalctl --relinquish-var >/dev/null 2>&1 || true; }}",
            record("journal", "relinquished")
        ))
        .await?;
    Ok((stopped, killed))
}

/// Every swap area that writes to DEV turned off: their paths.
async fn swaps_off(
    session: &Session,
    facts: &Facts,
    dev: &Device,
    done: &mut Done,
) -> Result<Vec<String>> {
    let swaps = swaps_on(facts, dev);
    for s in &swaps {
        let cmd = format!("{} && swapoff {}", record("swap", s), shell_quote(s));
        let res = session.exec(&cmd).await?;
        if !res.success() {
            let said = String::from_utf8_lossy(&res.stderr);
            bail!(
                "cannot turn swap {s} off on {} ({}){}",
                session.host(),
                said.trim(),
                if said.contains("memory") {
                    ": the pages in it do not fit in free memory; stop a program that uses much of it, then run again"
                } else {
                    ""
                }
            );
        }
        done.changes.push(format!("swap {s} off"));
    }
    Ok(swaps)
}

/// DEV's read-write filesystems remounted read-only, deepest mount points
/// first (so /boot goes read-only before /): their mount points. One that
/// will not is reported with the processes writing to it.
async fn remount_read_only(
    session: &Session,
    dev: &Device,
    done: &mut Done,
) -> Result<Vec<String>> {
    let mut mounts = dev.rw_mounts().into_iter().cloned().collect::<Vec<_>>();
    mounts.sort_by_key(|m| std::cmp::Reverse(m.mount_point.len()));
    let mut read_only = Vec::new();
    for m in &mounts {
        let cmd = format!(
            "{} && sync && mount -o remount,ro {}",
            record("ro", &m.mount_point),
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
                    "these hold files open for writing:\n  {}\nEnd them (or have them close those files), then run again",
                    writers.trim().replace('\n', "\n  ")
                )
            };
            bail!(
                "cannot make {} read-only on {} ({}): {writers}",
                m.mount_point,
                session.host(),
                String::from_utf8_lossy(&res.stderr).trim(),
            );
        }
        read_only.push(m.mount_point.clone());
        done.changes.push(format!("{} read-only", m.mount_point));
    }
    Ok(read_only)
}

/// Rule 6: the freeze is checked, not assumed.
pub fn check_frozen(facts: &Facts, dev: &Device, session: &Session) -> Result<()> {
    let rw: Vec<String> = dev
        .rw_mounts()
        .iter()
        .map(|m| m.mount_point.clone())
        .collect();
    let swap = swaps_on(facts, dev);
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

/// Put back what the host's records say a freeze did.
async fn restore(session: &Session, device: Option<&str>) -> Result<ThawReport> {
    let out = session
        .run(
            "putting back what the freeze changed",
            &restore_script(device),
        )
        .await?;
    let mut r = ThawReport {
        host: session.host(),
        was_frozen: true,
        ..Default::default()
    };
    let mut ended = false;
    for l in out.lines() {
        if l == "none" {
            r.was_frozen = false;
        } else if l == "end" {
            ended = true;
        } else if let Some(x) = l.strip_prefix("ok ") {
            r.restored.push(x.to_string());
        } else if let Some(x) = l.strip_prefix("left ") {
            r.left.push(x.to_string());
        } else if let Some(x) = l.strip_prefix("other ") {
            r.other_device = Some(x.to_string());
        }
    }
    if !ended {
        anyhow::bail!(
            "the connection to {} ended while drydock put back what the freeze changed",
            session.host()
        );
    }
    Ok(r)
}

/// `drydock thaw`: undo exactly what the recorded freeze did. An error
/// (exit 1) when something could not be put back.
pub async fn thaw(session: &Session, facts: &Facts, device: Option<&str>) -> Result<ThawReport> {
    require_root(facts, session)?;
    let r = restore(session, device).await.context("thaw")?;
    if let Some(other) = &r.other_device {
        return Err(refused!(
            "the freeze recorded on {} is of {other}, not of {}; `drydock thaw {}` (no --device) undoes it. Nothing was changed",
            session.host(),
            device.unwrap_or_default(),
            session.target.typed_arg()
        ));
    }
    if !r.left.is_empty() {
        anyhow::bail!(
            "{}\nThe record of what is left stays in {STATE_DIR} on the host: `drydock thaw {}` tries again once the reason is dealt with",
            r.human(),
            session.target.typed_arg()
        );
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_swap_file_is_on_the_filesystem_that_holds_it() {
        let m = |mp: &str, dev: &str| super::super::facts::Mount {
            mount_point: mp.into(),
            source: "/dev/x".into(),
            fstype: "ext4".into(),
            dev: dev.into(),
            read_only: false,
        };
        let f = vec![m("/", "254:1"), m("/var", "254:2"), m("/varnish", "254:3")];
        assert_eq!(mount_of(&f, "/swapfile").unwrap().dev, "254:1");
        assert_eq!(mount_of(&f, "/var/swap").unwrap().dev, "254:2");
        assert_eq!(mount_of(&f, "/varnish/swap").unwrap().dev, "254:3");
    }

    #[test]
    fn the_stop_and_restore_scripts_are_valid_shell() {
        crate::assert_valid_sh("the stop script", &stop_units_script());
        crate::assert_valid_sh("the restore script", &restore_script(Some("/dev/vda")));
        let s = stop_units_script();
        assert!(s.contains("keep=\" sshd ssh dropbear networking "), "{s}");
        assert!(s.contains(" acpid rmnologin \""), "{s}");
        assert!(s.contains("prefixes=\"net.\""), "{s}");
        assert!(s.contains(" local syslog rsyslog "), "{s}");
    }
}
