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

use anyhow::{Context, Result};
use serde::Serialize;

use super::device::{Device, inspect, require_root};
use super::{Facts, gather, openrc};
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

/// Append LINE to the record file NAME unless it is there already.
fn record(name: &str, line: &str) -> String {
    format!(
        "mkdir -p {STATE_DIR} && {{ grep -qxF -- {q} {STATE_DIR}/{name} 2>/dev/null || printf '%s\\n' {q} >> {STATE_DIR}/{name}; }}",
        q = shell_quote(line)
    )
}

fn stop_units_script() -> String {
    let openrc = openrc_stop_script();
    let keep = KEEP.join(" ");
    let keep_prefix = KEEP_PREFIX.join(" ");
    let keep_trigger = KEEP_TRIGGER_PREFIX.join(" ");
    format!(
        r#"export LC_ALL=C PATH="$PATH:/usr/sbin:/sbin:/run/current-system/sw/bin"
S={STATE_DIR}; mkdir -p "$S" || exit 1
if [ ! -d /run/systemd/system ]; then
  if [ -d /run/openrc/started ] && command -v rc-service >/dev/null 2>&1; then
{openrc}
    exit $?
  fi
  echo "note neither systemd nor OpenRC runs here: drydock stops no service; a service that writes to the disk keeps it from going read-only, and is named"; exit 0
fi
rec() {{ grep -qxF -- "$1" "$S/stopped" 2>/dev/null || printf '%s\n' "$1" >> "$S/stopped"; }}
stop() {{
  rec "$1"
  if e=$(timeout 300 systemctl stop "$1" 2>&1); then echo "stopped $1"; return 0; else rc=$?; fi
  st=$(systemctl is-active "$1" 2>/dev/null)
  case "$st" in active|activating|deactivating|reloading)
    if [ $rc = 124 ]; then echo "$1 did not stop within 5 minutes (it is $st)" >&2
    else echo "$1 did not stop (it is $st): $(printf '%s' "$e" | tr '\n' ' ' | sed 's/ *$//')" >&2; fi
    echo "stop it yourself (or end what holds it), then run again" >&2
    return 1;;
  esac
  echo "stopped $1"
}}
for u in $(systemctl list-units --type=timer --state=active --no-legend --plain 2>/dev/null | cut -d' ' -f1); do
  stop "$u" || exit 1
done
for u in $(systemctl list-units --type=path,socket --state=active --no-legend --plain 2>/dev/null | cut -d' ' -f1); do
  k=0
  for p in {keep_trigger}; do case "$u" in "$p"*) k=1;; esac; done
  [ $k = 1 ] && continue
  stop "$u" || exit 1
done
for u in $(systemctl list-units --type=service --state=running --no-legend --plain 2>/dev/null | cut -d' ' -f1); do
  k=0
  for x in {keep}; do [ "$u" = "$x" ] && k=1; done
  for p in {keep_prefix}; do case "$u" in "$p"*) k=1;; esac; done
  [ $k = 1 ] && continue
  stop "$u" || exit 1
done
"#
    )
}

/// OpenRC's part of the stop (run in the subshell of `stop_units_script`):
/// every started service is stopped through `openrc-run SCRIPT stop` (as
/// `rc-service` does, but Debian's LSB scripts change OpenRC's marks only
/// this way), except the SSH server, the network's services and the
/// others of `openrc::KEPT`, what those need (OpenRC's `rc-depend -t
/// ineed`: stopping it would stop them), and what the sysinit and boot
/// runlevels bring up for the system itself, though their schedulers,
/// clocks and loggers, which write, are stopped. What was started is
/// recorded first (`rc-started`): a service that OpenRC stopped along with
/// one it needs is started again by the thaw as well. Nothing is stopped
/// when openrc-run or rc-depend cannot be found.
fn openrc_stop_script() -> String {
    let q = |v: &[&[&str]]| format!("\" {} \"", v.concat().join(" "));
    format!(
        r#"(
keep={keep}
prefixes="{prefixes}"
sysheld={sysheld}
sys=" $(ls /etc/runlevels/sysinit /etc/runlevels/boot 2>/dev/null | tr '\n' ' ') "
kept() {{
  case "$keep" in *" $1 "*) return 0;; esac
  for p in $prefixes; do case "$1" in "$p"*) return 0;; esac; done
  return 1
}}
# Debian's LSB scripts change OpenRC's marks only when openrc-run runs them
# (rc-service runs them as they are): every stop and start goes through it.
orun=$(command -v openrc-run) || {{ echo "OpenRC runs here but openrc-run is not on root's PATH (nor in /sbin, /usr/sbin): drydock stops OpenRC's services through it; nothing was stopped. Install OpenRC's openrc-run, then run again" >&2; exit 1; }}
dep=
for d in /lib/rc/bin/rc-depend /usr/libexec/rc/bin/rc-depend /libexec/rc/bin/rc-depend "$(command -v rc-depend)"; do [ -n "$d" ] && [ -x "$d" ] && dep=$d && break; done
[ -n "$dep" ] || {{ echo "cannot find OpenRC's rc-depend (looked in /lib/rc/bin, /usr/libexec/rc/bin, /libexec/rc/bin and the PATH): without it drydock cannot tell which services SSH and the network need, and stopping one of them would stop those too; nothing was stopped" >&2; exit 1; }}
ks=""
for u in $(ls /run/openrc/started); do kept "$u" && ks="$ks $u"; done
needed=" "
[ -n "$ks" ] && needed=" $(timeout 60 "$dep" -t ineed $ks 2>/dev/null | tr '\n' ' ') "
if [ ! -f "$S/rc-started" ]; then
  for f in /run/openrc/started/*; do [ -L "$f" ] && printf '%s\t%s\n' "${{f##*/}}" "$(readlink "$f")"; done > "$S/rc-started.new" && mv "$S/rc-started.new" "$S/rc-started" || exit 1
fi
said() {{ while IFS='	' read -r v _; do [ -e "/run/openrc/started/$v" ] || echo "stopped $v"; done < "$S/rc-started"; }}
for u in $(ls /run/openrc/started); do
  kept "$u" && continue
  case "$needed" in *" $u "*) continue;; esac
  case "$sys" in *" $u "*) case "$sysheld" in *" $u "*) ;; *) continue;; esac;; esac
  [ -e "/run/openrc/started/$u" ] || continue
  if e=$(timeout 300 "$orun" "$(readlink "/run/openrc/started/$u")" stop 2>&1); then rc=0; else rc=$?; fi
  if [ -e "/run/openrc/started/$u" ] || [ -e "/run/openrc/stopping/$u" ]; then
    said
    if [ $rc = 124 ]; then echo "$u did not stop within 5 minutes" >&2
    else echo "$u did not stop: $(printf '%s' "$e" | tr '\n' ' ' | sed 's/ *$//')" >&2; fi
    echo "stop it yourself (or end what holds it), then run again" >&2
    exit 1
  fi
done
said
)"#,
        keep = q(&[openrc::SSH, openrc::NET, openrc::KEPT]),
        prefixes = openrc::NET_PREFIXES.join(" "),
        sysheld = q(&[openrc::SCHEDULERS_AND_CLOCKS, openrc::LOGGERS]),
    )
}

/// ISC dhclient: addresses on its interface made permanent, its command
/// line recorded, then SIGKILL (see the module doc).
fn stop_dhclient_script() -> String {
    format!(
        r#"export LC_ALL=C PATH="$PATH:/usr/sbin:/sbin"
S={STATE_DIR}; mkdir -p "$S" || exit 1
for p in /proc/[0-9]*; do
  [ "$(cat "$p/comm" 2>/dev/null)" = dhclient ] || continue
  pid=${{p#/proc/}}
  args=$(tr '\0' '\n' < "$p/cmdline" | while IFS= read -r a; do printf "'%s' " "$(printf '%s' "$a" | sed "s/'/'\\\\''/g")"; done)
  [ -n "$args" ] || continue
  # The interfaces it serves: its arguments that name a link.
  for a in $(tr '\0' ' ' < "$p/cmdline"); do
    [ -e "/sys/class/net/$a" ] || continue
    ip -o -4 addr show dev "$a" | while read -r _ _ fam addr rest; do
      case "$rest" in *valid_lft\ forever*) continue;; esac
      brd=$(printf '%s\n' "$rest" | sed -n 's/.*brd \([0-9.]*\).*/\1/p')
      ip addr change "$addr" ${{brd:+brd "$brd"}} dev "$a" valid_lft forever preferred_lft forever \
        && echo "permanent $a $addr"
    done
  done
  grep -qF -- "$pid	" "$S/killed" 2>/dev/null || printf '%s\t%s\n' "$pid" "$args" >> "$S/killed"
  kill -KILL "$pid" && echo "killed $pid dhclient"
done
exit 0
"#
    )
}

/// Undo what the records in STATE_DIR say was done; print "ok WHAT" or
/// "left WHAT: REASON" lines, then "end". The records are removed when
/// nothing was left.
fn restore_script(device: Option<&str>) -> String {
    let want = device.map(shell_quote).unwrap_or_default();
    format!(
        r#"export LC_ALL=C PATH="$PATH:/usr/sbin:/sbin:/run/current-system/sw/bin"
S={STATE_DIR}
[ -d "$S" ] || {{ echo "none"; echo end; exit 0; }}
want={want}
if [ -n "$want" ] && [ -f "$S/device" ] && [ "$(readlink -f "$want")" != "$(readlink -f "$(head -n 1 "$S/device")")" ]; then
  echo "other $(head -n 1 "$S/device")"; echo end; exit 0
fi
left=0
if [ -f "$S/ro" ]; then
  tac "$S/ro" > "$S/ro.rev"
  while IFS= read -r m; do
    if e=$(mount -o remount,rw "$m" 2>&1); then echo "ok read-write $m"; else echo "left $m read-only: $e"; left=1; fi
  done < "$S/ro.rev"
  rm -f "$S/ro.rev"
fi
if [ -f "$S/swap" ]; then
  while IFS= read -r w; do
    if awk -v w="$w" '$1 == w {{ f = 1 }} END {{ exit !f }}' /proc/swaps; then echo "ok swap on $w"; continue; fi
    if e=$(swapon "$w" 2>&1); then echo "ok swap on $w"; else echo "left swap $w off: $e"; left=1; fi
  done < "$S/swap"
fi
if [ -f "$S/killed" ]; then
  while IFS='	' read -r pid args; do
    if [ -d "/proc/$pid" ] && [ "$(cat /proc/$pid/comm 2>/dev/null)" = dhclient ]; then echo "ok dhclient running ($pid)"; continue; fi
    eval "set -- $args"
    if command -v systemd-run >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
      e=$(timeout 120 systemd-run --scope --collect --quiet -- "$@" </dev/null 2>&1 >/dev/null)
    else
      e=$(timeout 120 setsid "$@" </dev/null 2>&1 >/dev/null)
    fi
    if [ $? = 0 ]; then echo "ok started $1 again"; else echo "left $1 not running: $e"; left=1; fi
  done < "$S/killed"
fi
if [ -f "$S/journal" ]; then
  if ! command -v journalctl >/dev/null 2>&1 || [ ! -d /run/systemd/system ] || timeout 60 journalctl --flush >/dev/null 2>&1; then echo "ok journal back on /var"; else echo "left journal on /run: journalctl --flush did not succeed within 60 s"; left=1; fi
fi
if [ -f "$S/rc-started" ]; then
  orun=$(command -v openrc-run || echo /sbin/openrc-run)
  while IFS='	' read -r u f; do
    [ -e "/run/openrc/started/$u" ] && continue
    if e=$(timeout 300 "$orun" "$f" start 2>&1); then echo "ok started $u"; else echo "left $u stopped: $(printf '%s' "$e" | tr '\n' ' ' | sed 's/ *$//')"; left=1; fi
  done < "$S/rc-started"
fi
if [ -f "$S/stopped" ]; then
  tac "$S/stopped" > "$S/stopped.rev"
  while IFS= read -r u; do
    if e=$(timeout 300 systemctl start "$u" 2>&1); then echo "ok started $u"; else echo "left $u stopped: $e"; left=1; fi
  done < "$S/stopped.rev"
  rm -f "$S/stopped.rev"
fi
[ $left = 0 ] && rm -rf "$S"
echo end
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
    let host = session.host();
    let mut done = Done::default();
    // Which device the records are of: a thaw naming another one is refused.
    let res = session.exec(&record("device", &dev.path)).await?;
    if !res.success() {
        return Err(refused!(
            "cannot write drydock's record of the freeze in {STATE_DIR} on {host} ({}); nothing was changed",
            String::from_utf8_lossy(&res.stderr).trim()
        ));
    }

    // Services write to the host's disks; a regular file standing in for a
    // disk (a loop-mounted image) is frozen without touching them.
    let mut stopped = Vec::new();
    let mut killed = Vec::new();
    if dev.is_block() {
        let out = session.exec(&stop_units_script()).await?;
        let said = out.stdout_str();
        for note in said.lines().filter_map(|l| l.strip_prefix("note ")) {
            tracing::warn!("{host}: {note}");
        }
        stopped = said
            .lines()
            .filter_map(|l| l.strip_prefix("stopped ").map(str::to_string))
            .collect();
        if !stopped.is_empty() {
            done.changes.push(format!("stopped {}", stopped.join(" ")));
        }
        if !out.success() {
            let failure = format!(
                "cannot stop the services of {host}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            return Err(undo_after(session, &done, failure).await);
        }
        match session
            .run("stopping dhclient", &stop_dhclient_script())
            .await
        {
            Ok(out) => {
                for l in out.lines() {
                    if let Some(k) = l.strip_prefix("killed ") {
                        killed.push(k.to_string());
                    }
                }
                if !killed.is_empty() {
                    done.changes.push(format!(
                        "stopped {} (its addresses kept, made permanent)",
                        killed.join(", ")
                    ));
                }
            }
            Err(e) => return Err(undo_after(session, &done, format!("{e:#}")).await),
        }
        let r = session
            .exec(&format!(
                "{} && {{ timeout 60 journalctl --relinquish-var >/dev/null 2>&1 || true; }}",
                record("journal", "relinquished")
            ))
            .await;
        if let Err(e) = r {
            return Err(undo_after(session, &done, format!("{e:#}")).await);
        }
    }

    let swaps = swaps_on(facts, &dev);
    for s in &swaps {
        let cmd = format!("{} && swapoff {}", record("swap", s), shell_quote(s));
        let res = match session.exec(&cmd).await {
            Ok(r) => r,
            Err(e) => return Err(undo_after(session, &done, format!("{e:#}")).await),
        };
        if !res.success() {
            let failure = format!(
                "cannot turn swap {s} off on {host} ({}){}",
                String::from_utf8_lossy(&res.stderr).trim(),
                if String::from_utf8_lossy(&res.stderr).contains("memory") {
                    ": the pages in it do not fit in free memory; stop a program that uses much of it, then run again"
                } else {
                    ""
                }
            );
            return Err(undo_after(session, &done, failure).await);
        }
        done.changes.push(format!("swap {s} off"));
    }

    // Deepest mount points first, so /boot goes read-only before /.
    let mut mounts = dev.rw_mounts().into_iter().cloned().collect::<Vec<_>>();
    mounts.sort_by_key(|m| std::cmp::Reverse(m.mount_point.len()));
    let mut read_only = Vec::new();
    for m in &mounts {
        let cmd = format!(
            "{} && sync && mount -o remount,ro {}",
            record("ro", &m.mount_point),
            shell_quote(&m.mount_point)
        );
        let res = match session.exec(&cmd).await {
            Ok(r) => r,
            Err(e) => return Err(undo_after(session, &done, format!("{e:#}")).await),
        };
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
            let failure = format!(
                "cannot make {} read-only on {host} ({}): {writers}",
                m.mount_point,
                String::from_utf8_lossy(&res.stderr).trim(),
            );
            return Err(undo_after(session, &done, failure).await);
        }
        read_only.push(m.mount_point.clone());
        done.changes.push(format!("{} read-only", m.mount_point));
    }

    let checked = async {
        let after = gather(session).await?;
        let dev_after = inspect(session, &after, Some(&dev.path)).await?;
        check_frozen(&after, &dev_after, session)?;
        Ok::<_, anyhow::Error>(after)
    }
    .await;
    let after = match checked {
        Ok(a) => a,
        Err(e) => return Err(undo_after(session, &done, format!("{e:#}")).await),
    };
    Ok(FreezeReport {
        host,
        device: dev.path.clone(),
        stopped,
        killed,
        read_only,
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
