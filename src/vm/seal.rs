//! The sealed worker VM: a copy of the VPS's disk boots in it, but none of
//! the VPS's own services run there, and its network reaches only the
//! package sources (see `proxy.rs` for the network half).
//!
//! # Why this way
//!
//! A disk booted as it is starts every unit it has enabled: the app, cron,
//! timers, mail, backups. Whatever holds them back must not be written to
//! the disk, or it would be pushed back to the VPS. The choices, and what
//! decided them (systemd 247 in Debian 11 and 252 in Debian 12 are the
//! oldest we must cover):
//!
//! * **The first boot is a direct kernel boot** (QEMU `-kernel`, `-initrd`,
//!   `-append`) with the kernel, initrd and command line the VPS is running
//!   (read from the VPS before the freeze: `remote::bootfiles`). The
//!   command line gets `systemd.unit=sysinit.target`: the boot stops at the
//!   init system itself (local filesystems, swap, udev, journald, tmpfiles),
//!   so multi-user.target, timers.target, sockets.target and paths.target,
//!   and with them every app, timer, socket and path unit, are never pulled
//!   in. `systemd.wants=` adds back only the VPS's SSH server and the units
//!   that configure its network (udev then starts what they need, such as
//!   ifupdown's `ifup@`), and `systemd.mask=` masks the units the VPS
//!   enabled into sysinit.target itself (timesyncd, pstore, ...). All three
//!   are read by systemd-debug-generator, present since systemd 215, and
//!   live in /run only. The SMBIOS credentials of systemd ≥ 254 would not
//!   cover Debian 11 or 12; a generator or masks on the disk would be
//!   pushed back.
//! * **Maintainer scripts** (`deb-systemd-invoke restart`, `invoke-rc.d`)
//!   would start a held-back unit again during the upgrade. Right after the
//!   first login every held-back unit is masked in
//!   `/run/systemd/system.control` (a tmpfs, and above /etc in the unit
//!   search path, unlike `/run/systemd/system`, which a unit file in /etc
//!   overrides); deb-systemd-invoke starts only units whose `is-enabled`
//!   says enabled, and invoke-rc.d skips masked units. A package that the
//!   upgrade newly installs is not masked yet, so on Debian-family systems
//!   `/usr/sbin/policy-rc.d` answers 101 ("do not run") for the length of
//!   the upgrade, unless the VPS has one of its own; drydock removes it
//!   before the power-off and checks that it is gone.
//! * **The verify reboot goes through the VPS's own boot loader** (firmware,
//!   GRUB, the kernel the upgrade installed), which a direct kernel boot
//!   would not prove. Its command line cannot be changed, so the same seal
//!   is written to `/etc/systemd/system.control` before the power-off
//!   (`default.target` as an alias of sysinit.target, the same wants, masks
//!   for every held-back unit, those the upgrade added included) and
//!   removed, and checked gone, before the second power-off. A run that
//!   dies in between never pushes that overlay: the upgrade step starts
//!   again from the untouched base image.
//! * **OpenRC** (Alpine, Gentoo, Devuan, Debian without systemd). Its
//!   kernel command line offers `softlevel=`, which only names a runlevel
//!   that exists on the disk (one of drydock's own would be pushed back),
//!   and `noinit=SVC,SVC`, read by `openrc` itself since 2009 (0.4): each
//!   named service is marked started before a runlevel is brought up, so
//!   neither the runlevel nor a service that needs it starts it, and marked
//!   stopped again after; the marks live in /run/openrc. The first boot is
//!   the same direct kernel boot with `noinit=` naming every held-back
//!   service, the runlevels stay as they are on the disk. What is held
//!   back: every service of the runlevels entered after `boot` (`default`
//!   and any of the VPS's own), except the SSH server, the network's
//!   services, acpid (the power button) and Debian's rmnologin; and, in
//!   `sysinit` and `boot`, which bring the system itself up and are kept,
//!   the schedulers and clocks that run or reach out (cron, at, chrony,
//!   ntpd, `local`), and the clock savers (hwclock, swclock), which the
//!   worker VM's power-off would have write its clock into the copy
//!   (/etc/adjtime: the zoo test caught it).
//!   Maintainer scripts: Debian's `invoke-rc.d` asks policy-rc.d under
//!   OpenRC too (installed as above); Alpine's apk scripts do not start or
//!   restart services (Alpine's policy: the administrator starts them).
//!   The verify reboot goes through the boot loader, whose command line
//!   cannot be changed: the held-back services' runlevel links are moved
//!   to `/etc/drydock-held-runlevels/LEVEL/` before the power-off, and
//!   moved back (and the folder checked gone) before the second one; as
//!   on systemd, a run that dies in between starts the upgrade again from
//!   the untouched base image, so that state is never pushed.
//! * Any other init system (runit, s6, sysvinit's own rc scripts) is
//!   refused before the freeze, with the reason.

use serde::{Deserialize, Serialize};

use crate::refused;
use crate::remote::facts::Facts;
use crate::remote::openrc;

/// Units that bring up the network, by exact name or by prefix (templated
/// and NixOS's scripted networking).
const NETWORK_UNITS: &[&str] = &[
    "systemd-networkd.service",
    "systemd-networkd.socket",
    "systemd-network-generator.service",
    "systemd-resolved.service",
    "networking.service",
    "NetworkManager.service",
    "dhcpcd.service",
    "connman.service",
    "wicked.service",
    "network-setup.service",
];
const NETWORK_PREFIXES: &[&str] = &[
    "ifup@",
    "dhclient@",
    "dhcpcd@",
    "network-addresses-",
    "network-link-",
];
/// SSH servers drydock reaches the worker VM through.
const SSH_UNITS: &[&str] = &[
    "ssh.service",
    "sshd.service",
    "ssh.socket",
    "sshd.socket",
    "dropbear.service",
];
/// Units a login needs besides the server (systemd-user-sessions removes
/// /run/nologin), and logind, which turns QEMU's ACPI power button into a
/// clean power-off: without it `drydock boot`'s Ctrl-C, and the worker
/// VM's fallback power-off, could only pull the plug.
const LOGIN_UNITS: &[&str] = &["systemd-user-sessions.service", "systemd-logind.service"];
/// Unit kinds that run something; targets, mounts, swaps are the system's.
const KINDS: &[&str] = &[".service", ".socket", ".timer", ".path"];
/// The targets sysinit.target pulls in: a held-back unit enabled into one
/// of them would start at the sealed boot, so it is masked there.
const SYSINIT_TARGETS: &[&str] = &[
    "sysinit",
    "local-fs",
    "local-fs-pre",
    "swap",
    "cryptsetup",
    "cryptsetup-pre",
    "veritysetup",
    "integritysetup",
];
/// x86's COMMAND_LINE_SIZE, the terminating NUL included.
const CMDLINE_MAX: usize = 2047;

/// The init system a seal is made for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Init {
    #[default]
    Systemd,
    Openrc,
}

/// The runlevels that bring the system itself up: kept, but for
/// `openrc::SCHEDULERS_AND_CLOCKS`.
const OPENRC_SYSTEM_LEVELS: &[&str] = &["sysinit", "boot"];
/// Runlevels a normal boot never enters.
const OPENRC_UNUSED_LEVELS: &[&str] = &["shutdown", "off", "nonetwork", "recovery", "single"];
/// Where the verify reboot's held-back runlevel links wait.
const OPENRC_STASH: &str = "/etc/drydock-held-runlevels";

/// OpenRC's held-back set among `levels` ((service, runlevel) pairs).
pub fn openrc_held_back(levels: &[(String, String)], wants: &[String]) -> Vec<String> {
    let mut v: Vec<String> = levels
        .iter()
        .filter(|(u, l)| {
            let kept = wants.contains(u) || openrc::KEPT.contains(&u.as_str());
            let unused = OPENRC_UNUSED_LEVELS.contains(&l.as_str());
            let system = OPENRC_SYSTEM_LEVELS.contains(&l.as_str())
                && !openrc::SCHEDULERS_AND_CLOCKS.contains(&u.as_str())
                && !openrc::CLOCK_SAVERS.contains(&u.as_str());
            !(kept || unused || system)
        })
        .map(|(u, _)| u.clone())
        .collect();
    v.sort();
    v.dedup();
    v
}

/// What the worker VM keeps and holds back, from the VPS's facts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seal {
    /// Runs of drydocks before OpenRC have none: systemd.
    #[serde(default)]
    pub init: Init,
    /// Started in the worker VM: its SSH server, its network units, and
    /// the login helper. Everything they pull in comes along.
    pub wants: Vec<String>,
    /// Enabled on the VPS and held back in the worker VM.
    pub held_back: Vec<String>,
    /// The held-back units that sysinit.target itself would pull in: masked
    /// on the kernel command line.
    pub boot_masks: Vec<String>,
}

fn is_network_unit(u: &str) -> bool {
    NETWORK_UNITS.contains(&u) || NETWORK_PREFIXES.iter().any(|p| u.starts_with(p))
}

/// systemd's own units are the init system (fsck, remount, journald, udev,
/// what the fstab generator pulls in), except these, which reach out or
/// keep state of their own.
const SYSTEMD_HELD: &[&str] = &[
    "systemd-timesyncd.service",
    "systemd-journal-upload.service",
    "systemd-journal-remote.service",
    "systemd-journal-remote.socket",
    "systemd-pstore.service",
];

fn kept(u: &str, wants: &[String]) -> bool {
    wants.iter().any(|w| w == u)
        || is_network_unit(u)
        || SSH_UNITS.contains(&u)
        || (u.starts_with("systemd-") && !SYSTEMD_HELD.contains(&u))
}

/// The held-back set among `enabled` ("UNIT STATE" pairs): every unit that
/// runs something, minus what the worker VM keeps.
pub fn held_back(enabled: &[(String, String)], wants: &[String]) -> Vec<String> {
    let mut v: Vec<String> = enabled
        .iter()
        .map(|(u, _)| u.clone())
        .filter(|u| KINDS.iter().any(|k| u.ends_with(k)))
        // A template ("getty@.service") is not a unit that runs.
        .filter(|u| !u.contains("@."))
        .filter(|u| !kept(u, wants))
        .collect();
    v.sort();
    v.dedup();
    v
}

/// "file UNIT TARGET" lines as (unit, target).
pub fn enabled_units(lines: &[String]) -> Vec<(String, String)> {
    lines
        .iter()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            (w.next()? == "file").then_some(())?;
            Some((w.next()?.to_string(), w.next().unwrap_or("").to_string()))
        })
        .collect()
}

fn tagged<'a>(lines: &'a [String], tag: &str) -> impl Iterator<Item = &'a str> {
    lines.iter().filter_map(move |l| {
        let (t, u) = l.split_once(' ')?;
        (t == tag).then(|| u.trim())
    })
}

/// An init system's names for `ssh_and_network`, and how its refusals
/// call them.
struct Names {
    ssh: &'static [&'static str],
    net: &'static [&'static str],
    net_prefixes: &'static [&'static str],
    is_net: fn(&str) -> bool,
    ssh_kind: &'static str,
    looked: &'static str,
    net_kind: &'static str,
    state: &'static str,
}

/// The VPS's running SSH servers, then its network's units or services:
/// what the worker VM starts. Refused when either is missing.
fn ssh_and_network(f: &Facts, host: &str, n: &Names) -> anyhow::Result<Vec<String>> {
    let active: Vec<&str> = tagged(&f.units, "active").collect();
    let mut wants: Vec<String> = n
        .ssh
        .iter()
        .filter(|u| active.contains(u))
        .map(|u| u.to_string())
        .collect();
    if wants.is_empty() {
        return Err(refused!(
            "no SSH server {} on {host} ({}looked for {}): drydock reaches the worker VM over SSH, and starts only the VPS's own SSH server there",
            n.ssh_kind,
            n.looked,
            n.ssh.join(", ")
        ));
    }
    let net: Vec<String> = active
        .iter()
        .filter(|u| (n.is_net)(u))
        .map(|u| u.to_string())
        .collect();
    if net.is_empty() {
        return Err(refused!(
            "drydock cannot tell which {} brings up the network on {host} (none of {} or {}* is {}), so the worker VM, which starts only those, would not come up on the network",
            n.net_kind,
            n.net.join(", "),
            n.net_prefixes.join("*, "),
            n.state
        ));
    }
    wants.extend(net);
    Ok(wants)
}

impl Seal {
    /// The seal for this VPS, or the refusal that says why it cannot be
    /// sealed (and changes nothing: this runs in the probe step).
    pub fn from_facts(f: &Facts, host: &str) -> anyhow::Result<Seal> {
        if f.init != "systemd" && f.openrc() {
            return Self::openrc_from_facts(f, host);
        }
        if f.init != "systemd" {
            return Err(refused!(
                "{host} runs {} as its init system, and neither systemd nor OpenRC manages its services: drydock holds the VPS's services back in the worker VM through systemd's kernel command line (systemd.unit=, systemd.mask=) or OpenRC's (noinit=) and has no equivalent for it, so it would run them there; nothing was changed",
                if f.init.is_empty() {
                    "an unknown program"
                } else {
                    &f.init
                },
            ));
        }
        let mut wants = ssh_and_network(
            f,
            host,
            &Names {
                ssh: SSH_UNITS,
                net: NETWORK_UNITS,
                net_prefixes: NETWORK_PREFIXES,
                is_net: is_network_unit,
                ssh_kind: "unit is active",
                looked: "",
                net_kind: "unit",
                state: "active",
            },
        )?;
        wants.extend(LOGIN_UNITS.iter().map(|u| u.to_string()));
        let enabled = enabled_units(&f.units);
        let held = held_back(&enabled, &wants);
        let mut boot_masks: Vec<String> = enabled
            .iter()
            .filter(|(u, t)| {
                held.contains(u) && SYSINIT_TARGETS.contains(&t.trim_end_matches(".target"))
            })
            .map(|(u, _)| u.clone())
            .collect();
        boot_masks.sort();
        boot_masks.dedup();
        Ok(Seal {
            init: Init::Systemd,
            wants,
            held_back: held,
            boot_masks,
        })
    }

    fn openrc_from_facts(f: &Facts, host: &str) -> anyhow::Result<Seal> {
        let wants = ssh_and_network(
            f,
            host,
            &Names {
                ssh: openrc::SSH,
                net: openrc::NET,
                net_prefixes: openrc::NET_PREFIXES,
                is_net: openrc::is_net,
                ssh_kind: "service is started",
                looked: "OpenRC; ",
                net_kind: "OpenRC service",
                state: "started",
            },
        )?;
        let held = openrc_held_back(&runlevel_services(&f.units), &wants);
        Ok(Seal {
            init: Init::Openrc,
            wants,
            held_back: held,
            boot_masks: Vec::new(),
        })
    }

    /// The script that lists the upgraded disk's enabled units (systemd)
    /// or runlevel services (OpenRC), ending in "end".
    pub fn enabled_script(&self) -> &'static str {
        match self.init {
            Init::Systemd => ENABLED_UNITS_SCRIPT,
            Init::Openrc => RUNLEVELS_SCRIPT,
        }
    }

    /// The held-back set on the disk that `enabled_script` printed `lines` of.
    pub fn held_in(&self, lines: &[String]) -> Vec<String> {
        match self.init {
            Init::Systemd => held_back(&enabled_units(lines), &self.wants),
            Init::Openrc => openrc_held_back(&runlevel_services(lines), &self.wants),
        }
    }

    /// Prints each of `held` that runs in the worker VM.
    pub fn running_script(&self, held: &[String]) -> String {
        match self.init {
            Init::Systemd => format!(
                "for u in {}; do systemctl -q is-active \"$u\" 2>/dev/null && echo \"$u\"; done; true",
                words(held)
            ),
            Init::Openrc => format!(
                "for u in {}; do [ -e \"/run/openrc/started/$u\" ] || [ -e \"/run/openrc/starting/$u\" ] && echo \"$u\"; done; true",
                words(held)
            ),
        }
    }

    /// The kernel command line of the sealed first boot: the VPS's own,
    /// less what names its boot files or its boot target, plus the seal
    /// and a serial console for the run's log.
    pub fn kernel_cmdline(&self, vps: &str) -> anyhow::Result<String> {
        let runlevels = [
            "single",
            "s",
            "S",
            "1",
            "2",
            "3",
            "4",
            "5",
            "emergency",
            "rescue",
            "-s",
            "-b",
        ];
        let mut out: Vec<String> = split_cmdline(vps)
            .into_iter()
            .filter(|w| {
                !(w.starts_with("BOOT_IMAGE=")
                    || w.starts_with("initrd=")
                    || w.starts_with("systemd.unit=")
                    || w.starts_with("softlevel=")
                    || w.starts_with("rc_runlevel=")
                    || w.starts_with("noinit=")
                    || runlevels.contains(&w.as_str()))
            })
            .collect();
        if !out.iter().any(|w| w.starts_with("console=ttyS0")) {
            out.push("console=ttyS0,115200".into());
        }
        match self.init {
            Init::Systemd => {
                out.push("systemd.unit=sysinit.target".into());
                out.extend(self.wants.iter().map(|u| format!("systemd.wants={u}")));
                out.extend(self.boot_masks.iter().map(|u| format!("systemd.mask={u}")));
            }
            Init::Openrc => {
                // The VPS's own noinit= services stay held back too.
                let mut held: Vec<String> = split_cmdline(vps)
                    .iter()
                    .filter_map(|w| w.strip_prefix("noinit="))
                    .flat_map(|v| v.split(','))
                    .filter(|v| !v.is_empty())
                    .map(str::to_string)
                    .collect();
                held.extend(self.held_back.iter().cloned());
                held.sort();
                held.dedup();
                if !held.is_empty() {
                    out.push(format!("noinit={}", held.join(",")));
                }
            }
        }
        let line = out.join(" ");
        if line.len() > CMDLINE_MAX {
            return Err(refused!(
                "the worker VM's kernel command line would be {} bytes, over the kernel's limit of {CMDLINE_MAX}: the VPS's own is {} bytes and holding its services back adds {}",
                line.len(),
                vps.len(),
                line.len().saturating_sub(vps.len())
            ));
        }
        Ok(line)
    }

    /// Run in the worker VM right after the sealed first boot: every
    /// held-back unit masked in /run (so no maintainer script starts one),
    /// any that runs after all stopped, and a policy-rc.d that says "do not
    /// run" on Debian-family systems that have none. Prints "running UNIT"
    /// for a held-back unit that had started, "policy-rc.d installed" or
    /// "policy-rc.d kept".
    pub fn runtime_script(&self) -> String {
        if self.init == Init::Openrc {
            return format!(
                r#"set -e
export LC_ALL=C PATH="$PATH:/usr/sbin:/sbin"
# The boot's runlevels first (SSH answers before the default runlevel ends).
n=0
while [ $n -lt 300 ]; do
  busy=0
  for p in /proc/[0-9]*; do [ "$(cat "$p/comm" 2>/dev/null)" = openrc ] && busy=1 && break; done
  [ $busy = 0 ] && break
  n=$((n + 1)); sleep 1
done
[ $busy = 0 ] || echo "openrc still busy after 300 s" >&2
for u in {units}; do
  if [ -e "/run/openrc/started/$u" ] || [ -e "/run/openrc/starting/$u" ]; then echo "running $u"; rc-service "$u" stop >/dev/null 2>&1 || true; fi
done
{policy}"#,
                units = words(&self.held_back),
                policy = POLICY_RC_D
            );
        }
        format!(
            r#"set -e
export LC_ALL=C
D=/run/systemd/system.control
mkdir -p "$D"
for u in {units}; do
  ln -sfn /dev/null "$D/$u"
done
systemctl daemon-reload
for u in {units}; do
  if systemctl -q is-active "$u" 2>/dev/null; then echo "running $u"; systemctl stop "$u" || true; fi
done
{policy}"#,
            units = words(&self.held_back),
            policy = POLICY_RC_D
        )
    }

    /// Run at the end of the upgrade, before the power-off: policy-rc.d
    /// removed (when drydock installed it), then the seal of the verify
    /// reboot written to /etc/systemd/system.control. `held` is the
    /// held-back set as the upgraded disk has it. Prints "made DIR" when
    /// the folder did not exist.
    pub fn disk_seal_script(&self, held: &[String], installed_policy: bool) -> String {
        let policy = if installed_policy {
            "rm -f /usr/sbin/policy-rc.d"
        } else {
            ""
        };
        if self.init == Init::Openrc {
            // Every runlevel's link of a held-back service, moved aside.
            return format!(
                r#"set -e
export LC_ALL=C
{policy}
D={OPENRC_STASH}
if [ -e "$D" ] || [ -L "$D" ]; then echo "$D exists already: drydock will not write over it" >&2; exit 3; fi
mkdir "$D"; echo "made $D"
for u in {held}; do
  for l in /etc/runlevels/*/; do
    [ -e "$l$u" ] || [ -L "$l$u" ] || continue
    lv=${{l%/}}; lv=${{lv##*/}}
    mkdir -p "$D/$lv"; mv "$l$u" "$D/$lv/$u"
  done
done
sync
"#,
                held = words(held),
            );
        }
        format!(
            r#"set -e
export LC_ALL=C
{policy}
D=/etc/systemd/system.control
[ -d "$D" ] || {{ mkdir "$D"; echo "made $D"; }}
for u in default.target sysinit.target.wants {held}; do
  if [ -e "$D/$u" ] || [ -L "$D/$u" ]; then echo "$D/$u exists already: drydock will not write over it" >&2; exit 3; fi
done
t=$(systemctl show -p FragmentPath --value sysinit.target)
# Without the alias the verify boot would reach the VPS's default target.
[ -n "$t" ] || {{ echo "systemd did not say where sysinit.target is" >&2; exit 1; }}
ln -s "$t" "$D/default.target"
mkdir "$D/sysinit.target.wants"
for u in {wants}; do
  f=$(systemctl show -p FragmentPath --value "$u" 2>/dev/null || true)
  ln -s "${{f:-/dev/null}}" "$D/sysinit.target.wants/$u"
done
for u in {held}; do ln -s /dev/null "$D/$u"; done
sync
"#,
            held = words(held),
            wants = words(&self.wants),
        )
    }

    /// Run before the last power-off: the verify reboot's seal removed
    /// from the disk, and checked gone. `made_dir`: drydock made the folder.
    pub fn disk_unseal_script(&self, held: &[String], made_dir: bool) -> String {
        if self.init == Init::Openrc {
            return format!(
                r#"set -e
D={OPENRC_STASH}
for l in "$D"/*/; do
  [ -d "$l" ] || continue
  lv=${{l%/}}; lv=${{lv##*/}}
  for u in "$l"*; do
    [ -e "$u" ] || [ -L "$u" ] || continue
    t=/etc/runlevels/$lv/${{u##*/}}
    if [ -e "$t" ] || [ -L "$t" ]; then echo "$t is there again: the upgraded disk put it back itself; drydock keeps it" >&2; rm -f "$u"; else mv "$u" "$t"; fi
  done
  rmdir "$l"
done
rmdir "$D"
if [ -e "$D" ] || [ -L "$D" ]; then echo "$D is still there" >&2; exit 1; fi
if [ -e /usr/sbin/policy-rc.d ] && grep -qs '^# drydock:' /usr/sbin/policy-rc.d; then echo "drydock's policy-rc.d is still there" >&2; exit 1; fi
sync
"#
            );
        }
        format!(
            r#"set -e
D=/etc/systemd/system.control
rm -f "$D/default.target"
for u in {wants}; do rm -f "$D/sysinit.target.wants/$u"; done
rmdir "$D/sysinit.target.wants"
for u in {held}; do rm -f "$D/$u"; done
{rmdir}
for u in default.target sysinit.target.wants {held}; do
  if [ -e "$D/$u" ] || [ -L "$D/$u" ]; then echo "$D/$u is still there" >&2; exit 1; fi
done
if [ -e /usr/sbin/policy-rc.d ] && grep -qs '^# drydock:' /usr/sbin/policy-rc.d; then echo "drydock's policy-rc.d is still there" >&2; exit 1; fi
sync
"#,
            wants = words(&self.wants),
            held = words(held),
            rmdir = if made_dir { "rmdir \"$D\"" } else { "" },
        )
    }

    /// One line for people.
    pub fn describe(&self) -> String {
        format!(
            "kept: {}; held back ({}): {}",
            self.wants.join(" "),
            self.held_back.len(),
            if self.held_back.is_empty() {
                "nothing".to_string()
            } else {
                self.held_back.join(" ")
            }
        )
    }
}

/// The guest's enabled units, as the facts script lists them: symlinks in
/// the .wants/.requires folders (no question to PID 1, whose
/// list-unit-files takes over 25 s under emulation), then "end", so a cut
/// answer is not taken for "nothing enabled".
pub const ENABLED_UNITS_SCRIPT: &str = r#"for d in /etc/systemd/system /run/systemd/generator /run/systemd/generator.late; do
  for w in "$d"/*.wants "$d"/*.requires; do
    [ -d "$w" ] || continue; t=${w##*/}; t=${t%.*}
    for u in "$w"/*; do [ -e "$u" ] || [ -L "$u" ] || continue; echo "file ${u##*/} $t"; done
  done
done
echo end"#;

/// The upgraded disk's OpenRC runlevels: "level SERVICE RUNLEVEL", then "end".
pub const RUNLEVELS_SCRIPT: &str = r#"for l in /etc/runlevels/*/; do
  [ -d "$l" ] || continue; lv=${l%/}; lv=${lv##*/}
  for u in "$l"*; do [ -e "$u" ] || [ -L "$u" ] || continue; echo "level ${u##*/} $lv"; done
done
echo end"#;

/// On Debian-family systems (systemd or OpenRC), a policy-rc.d that says
/// "do not run" unless the VPS has one of its own.
const POLICY_RC_D: &str = r#"if [ -x /usr/sbin/invoke-rc.d ] || [ -x /usr/bin/deb-systemd-invoke ]; then
  if [ -e /usr/sbin/policy-rc.d ]; then echo "policy-rc.d kept"; else
    printf '%s\n' '#!/bin/sh' '# drydock: no service starts in the worker VM; removed before the power-off' 'exit 101' > /usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    echo "policy-rc.d installed"
  fi
fi
"#;

/// "level SERVICE RUNLEVEL" lines as (service, runlevel).
pub fn runlevel_services(lines: &[String]) -> Vec<(String, String)> {
    lines
        .iter()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            (w.next()? == "level").then_some(())?;
            Some((w.next()?.to_string(), w.next()?.to_string()))
        })
        .collect()
}

/// Unit names are [A-Za-z0-9:_.@-\\]; anything else is dropped rather than
/// given to a shell.
fn words(units: &[String]) -> String {
    units
        .iter()
        .filter(|u| {
            !u.is_empty()
                && u.chars()
                    .all(|c| c.is_ascii_alphanumeric() || ":_.@-\\".contains(c))
        })
        .cloned()
        .collect::<Vec<_>>()
        .join(" ")
}

/// The kernel's own splitting: whitespace, except inside double quotes.
fn split_cmdline(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for c in s.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                cur.push(c);
            }
            c if c.is_whitespace() && !quoted => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Debian 12 fixture's systemd, as the facts script printed it.
    fn fixture_units() -> Vec<String> {
        [
            "file app.service multi-user.target",
            "file cron.service multi-user.target",
            "file e2scrub_reap.service multi-user.target",
            "file getty@tty1.service getty.target",
            "file networking.service multi-user.target",
            "file networking.service network-online.target",
            "file ssh.service multi-user.target",
            "file systemd-network-generator.service sysinit.target",
            "file systemd-networkd-wait-online.service network-online.target",
            "file systemd-networkd.service multi-user.target",
            "file systemd-networkd.socket sockets.target",
            "file systemd-pstore.service sysinit.target",
            "file remote-fs.target multi-user.target",
            "file apt-daily.timer timers.target",
            "file drydock-marker.timer timers.target",
            "file -.mount local-fs.target",
            "file systemd-fsck-root.service local-fs.target",
            "file systemd-remount-fs.service local-fs.target",
            "file serial-getty@ttyS0.service getty.target",
            "active ssh.service",
            "active systemd-networkd.service",
            "active systemd-journald.service",
            "active app.service",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    fn facts(units: Vec<String>, init: &str) -> Facts {
        let mut f = crate::remote::facts::parse(
            "@@ id\n0\n@@ init\nsystemd\n@@ cmdline\nBOOT_IMAGE=/boot/vmlinuz-6.1.0-50-cloud-amd64 root=UUID=1383 ro console=tty0 console=ttyS0,115200\n@@ end\n",
        )
        .unwrap();
        f.units = units;
        f.init = init.into();
        f
    }

    #[test]
    fn the_fixture_keeps_ssh_and_its_network_and_holds_back_the_rest() {
        let s = Seal::from_facts(&facts(fixture_units(), "systemd"), "root@vps").unwrap();
        assert_eq!(
            s.wants,
            [
                "ssh.service",
                "systemd-networkd.service",
                "systemd-user-sessions.service",
                "systemd-logind.service"
            ]
        );
        assert_eq!(
            s.held_back,
            [
                "app.service",
                "apt-daily.timer",
                "cron.service",
                "drydock-marker.timer",
                "e2scrub_reap.service",
                "getty@tty1.service",
                "serial-getty@ttyS0.service",
                "systemd-pstore.service"
            ]
        );
        assert_eq!(s.boot_masks, ["systemd-pstore.service"]);
        assert_eq!(
            s.kernel_cmdline("BOOT_IMAGE=/boot/vmlinuz-6.1.0-50-cloud-amd64 root=UUID=1383 ro console=tty0 console=ttyS0,115200 systemd.unit=graphical.target")
                .unwrap(),
            "root=UUID=1383 ro console=tty0 console=ttyS0,115200 systemd.unit=sysinit.target systemd.wants=ssh.service systemd.wants=systemd-networkd.service systemd.wants=systemd-user-sessions.service systemd.wants=systemd-logind.service systemd.mask=systemd-pstore.service"
        );
    }

    #[test]
    fn a_cmdline_without_a_serial_console_gets_one_and_quotes_survive() {
        let s = Seal::default();
        assert_eq!(
            s.kernel_cmdline(
                "initrd=\\initrd.img root=/dev/vda1 single dyndbg=\"file a.c +p\" quiet"
            )
            .unwrap(),
            "root=/dev/vda1 dyndbg=\"file a.c +p\" quiet console=ttyS0,115200 systemd.unit=sysinit.target"
        );
    }

    #[test]
    fn hosts_that_cannot_be_sealed_are_refused_with_the_reason() {
        let e = Seal::from_facts(&facts(fixture_units(), "runit"), "root@void")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("root@void runs runit as its init system, and neither systemd nor OpenRC manages its services"),
            "{e}"
        );
        assert!(e.ends_with("nothing was changed"), "{e}");
        let no_net: Vec<String> = fixture_units()
            .into_iter()
            .filter(|l| !l.starts_with("active systemd-networkd"))
            .collect();
        let e = Seal::from_facts(&facts(no_net, "systemd"), "h")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("drydock cannot tell which unit brings up the network on h"),
            "{e}"
        );
        let no_ssh: Vec<String> = fixture_units()
            .into_iter()
            .filter(|l| l != "active ssh.service")
            .collect();
        let e = Seal::from_facts(&facts(no_ssh, "systemd"), "h")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("no SSH server unit is active on h"), "{e}");
    }

    #[test]
    fn ifupdown_hosts_keep_networking_and_its_ifup_instances() {
        let mut u = fixture_units();
        u.retain(|l| !l.contains("systemd-networkd"));
        u.push("active networking.service".into());
        u.push("active ifup@eth0.service".into());
        let s = Seal::from_facts(&facts(u, "systemd"), "h").unwrap();
        assert_eq!(
            s.wants,
            [
                "ssh.service",
                "networking.service",
                "ifup@eth0.service",
                "systemd-user-sessions.service",
                "systemd-logind.service"
            ]
        );
    }

    /// An Alpine VPS as setup-alpine leaves it, with an app and nginx.
    fn alpine_units() -> Vec<String> {
        [
            "openrc",
            "level devfs sysinit",
            "level dmesg sysinit",
            "level mdev sysinit",
            "level hwdrivers sysinit",
            "level bootmisc boot",
            "level hostname boot",
            "level hwclock boot",
            "level modules boot",
            "level networking boot",
            "level seedrng boot",
            "level swap boot",
            "level sysctl boot",
            "level syslog boot",
            "level acpid default",
            "level chronyd default",
            "level crond default",
            "level nginx default",
            "level sshd default",
            "level app default",
            "level killprocs shutdown",
            "level mount-ro shutdown",
            "level savecache shutdown",
            "active devfs",
            "active networking",
            "active sshd",
            "active nginx",
            "active app",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    #[test]
    fn an_openrc_host_keeps_sshd_and_networking_and_holds_back_the_default_runlevel() {
        let s = Seal::from_facts(&facts(alpine_units(), "init"), "root@alpine").unwrap();
        assert_eq!(s.init, Init::Openrc);
        assert_eq!(s.wants, ["sshd", "networking"]);
        assert_eq!(s.held_back, ["app", "chronyd", "crond", "hwclock", "nginx"]);
        assert_eq!(
            s.kernel_cmdline("BOOT_IMAGE=vmlinuz-lts root=UUID=77 modules=sd-mod,usb-storage,ext4 quiet rootfstype=ext4 softlevel=default noinit=metrics")
                .unwrap(),
            "root=UUID=77 modules=sd-mod,usb-storage,ext4 quiet rootfstype=ext4 console=ttyS0,115200 noinit=app,chronyd,crond,hwclock,metrics,nginx"
        );
        // The upgraded disk's runlevels, as RUNLEVELS_SCRIPT prints them:
        // a service the upgrade added to default is held back too.
        let mut after: Vec<String> = alpine_units()
            .into_iter()
            .filter(|l| l.starts_with("level "))
            .collect();
        after.push("level nginx-exporter default".into());
        after.push("level crond boot".into());
        assert_eq!(
            s.held_in(&after),
            [
                "app",
                "chronyd",
                "crond",
                "hwclock",
                "nginx",
                "nginx-exporter"
            ]
        );
        let seal = s.disk_seal_script(&s.held_back, true);
        assert!(seal.contains("rm -f /usr/sbin/policy-rc.d"), "{seal}");
        assert!(seal.contains("D=/etc/drydock-held-runlevels"), "{seal}");
        assert!(
            seal.contains("for u in app chronyd crond hwclock nginx; do"),
            "{seal}"
        );
        let json = serde_json::to_string(&s).unwrap();
        assert!(json.contains("\"init\":\"openrc\""), "{json}");
        // A journal from before OpenRC: systemd.
        let old: Seal =
            serde_json::from_str(r#"{"wants":[],"held_back":[],"boot_masks":[]}"#).unwrap();
        assert_eq!(old.init, Init::Systemd);
    }

    /// Every script of both seals as /bin/sh reads it (`sh -n`).
    #[test]
    fn the_seal_scripts_are_valid_shell() {
        let sd = Seal::from_facts(&facts(fixture_units(), "systemd"), "h").unwrap();
        let orc = Seal::from_facts(&facts(alpine_units(), "init"), "h").unwrap();
        for s in [&sd, &orc] {
            for (what, script) in [
                ("runtime", s.runtime_script()),
                ("disk seal", s.disk_seal_script(&s.held_back, true)),
                ("disk unseal", s.disk_unseal_script(&s.held_back, true)),
                ("running", s.running_script(&s.held_back)),
                ("enabled", s.enabled_script().to_string()),
            ] {
                crate::assert_valid_sh(&format!("{:?} {what}", s.init), &script);
            }
        }
    }

    #[test]
    fn an_openrc_host_without_a_started_ssh_server_or_network_is_refused() {
        let no_ssh: Vec<String> = alpine_units()
            .into_iter()
            .filter(|l| l != "active sshd")
            .collect();
        let e = Seal::from_facts(&facts(no_ssh, "init"), "h")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with(
                "no SSH server service is started on h (OpenRC; looked for sshd, ssh, dropbear)"
            ),
            "{e}"
        );
        let no_net: Vec<String> = alpine_units()
            .into_iter()
            .filter(|l| l != "active networking")
            .collect();
        let e = Seal::from_facts(&facts(no_net, "init"), "h")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("drydock cannot tell which OpenRC service brings up the network on h"),
            "{e}"
        );
    }

    #[test]
    fn a_cmdline_over_the_kernels_limit_is_refused() {
        let s = Seal {
            boot_masks: (0..200).map(|i| format!("unit-{i}.service")).collect(),
            ..Default::default()
        };
        let e = s.kernel_cmdline("root=/dev/vda1").unwrap_err().to_string();
        assert!(e.contains("over the kernel's limit of 2047"), "{e}");
    }

    #[test]
    fn shell_words_drop_what_is_not_a_unit_name() {
        assert_eq!(
            words(&["a.service".into(), "x;rm -rf /".into(), "b@c.timer".into()]),
            "a.service b@c.timer"
        );
    }
}
