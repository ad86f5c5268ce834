//! The shell scripts a freeze and a thaw run on the host, each recording
//! what it changes in the freeze's state folder before changing it (the
//! module's doc says what is stopped or kept, and why).

use super::{KEEP, KEEP_PREFIX, KEEP_TRIGGER_PREFIX, STATE_DIR, openrc};
use crate::ssh::shell_quote;

/// Append LINE to the record file NAME unless it is there already.
pub(super) fn record(name: &str, line: &str) -> String {
    format!(
        "mkdir -p {STATE_DIR} && {{ grep -qxF -- {q} {STATE_DIR}/{name} 2>/dev/null || printf '%s\\n' {q} >> {STATE_DIR}/{name}; }}",
        q = shell_quote(line)
    )
}

pub(super) fn stop_units_script() -> String {
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
pub(super) fn openrc_stop_script() -> String {
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
pub(super) fn stop_dhclient_script() -> String {
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
pub(super) fn restore_script(device: Option<&str>) -> String {
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
pub(super) fn writers_script(mount_point: &str) -> String {
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
