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

use crate::errors::refused;
use crate::remote::facts::Facts;

mod openrc;
mod scripts;
use openrc::OPENRC_STASH;
pub use openrc::{RUNLEVELS_SCRIPT, openrc_held_back, runlevel_services};

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
/// answer is not taken for "nothing enabled". On NixOS the new generation's
/// too: after `nixos-rebuild boot`, /etc is still the old generation's
/// until the next boot activates the new one, whose units the verify boot
/// must hold back.
pub const ENABLED_UNITS_SCRIPT: &str = r#"for d in /etc/systemd/system /nix/var/nix/profiles/system/etc/systemd/system /run/systemd/generator /run/systemd/generator.late; do
  for w in "$d"/*.wants "$d"/*.requires; do
    [ -d "$w" ] || continue; t=${w##*/}; t=${t%.*}
    for u in "$w"/*; do [ -e "$u" ] || [ -L "$u" ] || continue; echo "file ${u##*/} $t"; done
  done
done
echo end"#;

/// Unit names are [A-Za-z0-9:_.@-\\]; anything else is dropped rather than
/// given to a shell. Each is quoted: a backslash (`\\x2d`, systemd's escape)
/// would otherwise be taken by the shell, and another unit masked.
fn words(units: &[String]) -> String {
    units
        .iter()
        .filter(|u| crate::services::read::valid_name(u))
        .map(|u| crate::ssh::shell_quote(u))
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
mod tests;
