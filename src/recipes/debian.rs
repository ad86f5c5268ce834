//! Debian: rewrite the suite in sources.list and deb822 .sources files,
//! `apt-get update`, a minimal upgrade, then the full upgrade, keeping the
//! existing configuration files, then autoremove. One release at a time, as
//! Debian supports.

use anyhow::Result;

use super::Plan;
use crate::releases;

/// Non-interactive apt, keeping the configuration files the admin has.
pub const APT: &str = "DEBIAN_FRONTEND=noninteractive NEEDRESTART_MODE=a apt-get -y -q \
                   -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold";

/// grub-pc's upgrade reinstalls GRUB on the disks debconf recorded
/// (grub-pc/install_devices) and stops, half-way through the upgrade, when
/// none is recorded or none exists. Found before the freeze instead.
pub const GRUB_PC_CHECK: &str = r#"dpkg-query -W -f='${Status}' grub-pc 2>/dev/null | grep -q 'ok installed' || exit 0
v=$(debconf-show grub-pc 2>/dev/null | sed -n 's/^[* ] grub-pc\/install_devices: *//p')
for d in $(echo "$v" | tr ',' ' '); do [ -e "$d" ] && exit 0; done
echo "grub-pc is installed but debconf records no disk for it that exists on this host (grub-pc/install_devices: '$v'); Debian's upgrade of grub-pc would stop half-way. Record the disk GRUB boots from, e.g. \`echo 'grub-pc grub-pc/install_devices multiselect /dev/vda' | debconf-set-selections\` (or \`dpkg-reconfigure grub-pc\`) on the VPS, then run drydock again"
exit 3
"#;

/// The suite rewrite in every apt source, then the upgrade: Debian's own
/// procedure, and Ubuntu's when do-release-upgrade is not used.
pub fn apt_release_upgrade(from: &str, to: &str) -> Vec<String> {
    // Whole words only: "bookworm-security", "bookworm-updates" follow, a
    // mirror path that happens to contain the word does not. Applied twice:
    // a match eats the space after it, so the next word of a deb822
    // "Suites: bookworm bookworm-updates" line needs a second pass.
    let s = format!(r"s/([[:space:]]){from}([[:space:]]|-|$)/\1{to}\2/g");
    let sed = format!("sed -i -E '{s};{s}'");
    vec![
        format!(
            "set -e; for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do [ -f \"$f\" ] && {sed} \"$f\"; done; grep -rhs '^[^#]' /etc/apt/sources.list /etc/apt/sources.list.d/ | grep -q {to}"
        ),
        // apt-get update exits 0 when it fetched nothing ("Some index files
        // failed to download. They have been ignored"): the upgrade would
        // then find nothing to do and fail only at the verify boot. Any
        // failed fetch ends it here (apt >= 2.1.16 knows the option; an
        // older apt ignores an unknown -o).
        format!("{APT} -o APT::Update::Error-Mode=any update"),
        format!("{APT} upgrade --without-new-pkgs"),
        format!("{APT} full-upgrade"),
        format!("{APT} autoremove --purge"),
        format!("{APT} clean"),
    ]
}

/// In `apt_release_upgrade`'s commands: the index update, and the clean.
pub const HTTPS_DEBS: (usize, usize) = (1, 5);

pub fn plan(current: &str, target: &str) -> Result<Plan> {
    let (_, from, to) = releases::one_step("debian", "Debian", current, target)?;
    let commands = apt_release_upgrade(from, to);
    Ok(Plan {
        description: format!("Debian {current} ({from}) -> {target} ({to})"),
        commands,
        expect_version: Some(target.to_string()),
        expect_id: Some("debian".into()),
        preflight: Some(GRUB_PC_CHECK.to_string()),
        after_reboot: Vec::new(),
        https_debs: Some(HTTPS_DEBS),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The grub-pc check, run by sh with fake dpkg-query and debconf-show
    /// first in PATH.
    fn grub_check(installed: bool, devices: &str) -> (i32, String) {
        let d = tempfile::tempdir().unwrap();
        let status = if installed {
            "install ok installed"
        } else {
            ""
        };
        std::fs::write(
            d.path().join("dpkg-query"),
            format!("#!/bin/sh\nprintf '%s' '{status}'\n"),
        )
        .unwrap();
        std::fs::write(
            d.path().join("debconf-show"),
            format!("#!/bin/sh\necho '  grub-pc/postrm_purge_boot_grub: false'\necho '* grub-pc/install_devices: {devices}'\n"),
        )
        .unwrap();
        for f in ["dpkg-query", "debconf-show"] {
            std::process::Command::new("chmod")
                .args(["+x", d.path().join(f).to_str().unwrap()])
                .status()
                .unwrap();
        }
        let path = format!("{}:{}", d.path().display(), std::env::var("PATH").unwrap());
        let o = std::process::Command::new("sh")
            .args(["-c", GRUB_PC_CHECK])
            .env("PATH", path)
            .output()
            .unwrap();
        (
            o.status.code().unwrap(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
        )
    }

    #[test]
    fn grub_pc_without_an_existing_install_device_is_refused_before_the_freeze() {
        assert_eq!(grub_check(false, "").0, 0);
        assert_eq!(grub_check(true, "/dev/null").0, 0);
        assert_eq!(grub_check(true, "/dev/disk/by-id/gone, /dev/null").0, 0);
        let (code, out) = grub_check(true, "");
        assert_eq!(code, 3);
        assert!(out.starts_with("grub-pc is installed but debconf records no disk for it that exists on this host (grub-pc/install_devices: '')"), "{out}");
        let (code, out) = grub_check(true, "/dev/disk/by-id/gone");
        assert_eq!(code, 3);
        assert!(out.contains("'/dev/disk/by-id/gone'"), "{out}");
    }

    /// The recipe's `apt-get update`, run by this machine's real apt on a
    /// sources list whose one mirror refuses connections: it must fail
    /// (plain `apt-get update` exits 0 there, and the upgrade after it
    /// finds nothing to do).
    #[test]
    fn apt_update_that_fetches_nothing_fails() {
        if std::process::Command::new("apt-get")
            .arg("--version")
            .output()
            .is_err()
        {
            eprintln!("no apt-get on this machine; skipped");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let p = d.path();
        std::fs::create_dir_all(p.join("lists/partial")).unwrap();
        std::fs::create_dir_all(p.join("cache/archives/partial")).unwrap();
        std::fs::write(
            p.join("sources.list"),
            "deb http://127.0.0.1:9/debian trixie main\n",
        )
        .unwrap();
        let own = format!(
            "-o Dir::Etc::SourceList={0}/sources.list -o Dir::Etc::SourceParts={0}/none \
             -o Dir::State::Lists={0}/lists -o Dir::Cache={0}/cache -o Debug::NoLocking=1 \
             -o APT::Sandbox::User=root -o Acquire::Retries=0",
            p.display()
        );
        let run = |cmd: &str| {
            std::process::Command::new("sh")
                .args(["-c", &cmd.replacen(" update", &format!(" {own} update"), 1)])
                .output()
                .unwrap()
        };
        let update = &apt_release_upgrade("bookworm", "trixie")[1];
        let plain = run(&format!("{APT} update"));
        assert!(plain.status.success(), "{plain:?}");
        let o = run(update);
        assert!(!o.status.success(), "{o:?}");
        assert!(
            String::from_utf8_lossy(&o.stdout).contains("Err:1 http://127.0.0.1:9/debian trixie"),
            "{o:?}"
        );
    }

    /// The HTTPS hook's indices name the index update and the clean.
    #[test]
    fn the_https_hook_names_the_update_and_the_clean() {
        let p = plan("12", "13").unwrap();
        let (list, keep) = p.https_debs.unwrap();
        assert!(
            p.commands[list].ends_with(" update"),
            "{}",
            p.commands[list]
        );
        assert!(p.commands[keep].ends_with(" clean"), "{}", p.commands[keep]);
        let u = crate::recipes::ubuntu::plan("22.04", "24.04").unwrap();
        let (list, keep) = u.https_debs.unwrap();
        assert!(
            u.commands[list].ends_with(" update"),
            "{}",
            u.commands[list]
        );
        assert!(u.commands[keep].ends_with(" clean"), "{}", u.commands[keep]);
    }

    #[test]
    fn twelve_to_thirteen() {
        let p = plan("12", "13").unwrap();
        assert_eq!(p.description, "Debian 12 (bookworm) -> 13 (trixie)");
        assert!(p.commands[0].contains("s/([[:space:]])bookworm([[:space:]]|-|$)/\\1trixie\\2/g;"));
        assert!(p.commands[2].ends_with("upgrade --without-new-pkgs"));
        assert!(
            p.commands[3].contains("--force-confold") && p.commands[3].ends_with("full-upgrade")
        );
        assert_eq!(p.expect_version.as_deref(), Some("13"));
    }

    #[test]
    fn impossible_jumps_are_refused() {
        let e = plan("11", "13").unwrap_err().to_string();
        assert_eq!(
            e,
            "Debian upgrades one release at a time: 11 -> 13 must go through 12; run --to debian-12 first"
        );
        let e = plan("13", "12").unwrap_err().to_string();
        assert_eq!(e, "the host already runs Debian 13; 12 is not newer");
        assert!(plan("12", "14").is_err());
    }

    #[test]
    fn the_rewrite_touches_suites_not_words_inside_paths() {
        // Run the generated sed on real sources lines.
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("sources.list");
        std::fs::write(
            &f,
            "deb http://deb.debian.org/debian bookworm main\n\
             deb http://security.debian.org/debian-security bookworm-security main\n\
             deb http://mirror.example/bookworm-archive/debian bookworm-updates main\n\
             Suites: bookworm bookworm-updates bookworm-backports\n",
        )
        .unwrap();
        let sed = plan("12", "13").unwrap().commands[0]
            .split("&& ")
            .nth(1)
            .unwrap()
            .split(" \"$f\"")
            .next()
            .unwrap()
            .to_string();
        let st = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("{sed} {}", f.display()))
            .status()
            .unwrap();
        assert!(st.success());
        assert_eq!(
            std::fs::read_to_string(&f).unwrap(),
            "deb http://deb.debian.org/debian trixie main\n\
             deb http://security.debian.org/debian-security trixie-security main\n\
             deb http://mirror.example/bookworm-archive/debian trixie-updates main\n\
             Suites: trixie trixie-updates trixie-backports\n"
        );
    }
}
