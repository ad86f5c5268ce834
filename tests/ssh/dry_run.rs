//! `--dry-run` plans, and upgrades refused before anything changes.

use super::*;

/// `upgrade --dry-run` probes the host (this machine, Debian 12), runs the
/// read-only checks and prints the plan with its commands; it changes
/// nothing and keeps no run. A target that is not newer is refused the same
/// way as without --dry-run.
/// `--gc` deletes NixOS generations after a release upgrade; with `--run`
/// there is none, and clap dropped `--gc`'s requirement of `--to` when
/// the conflicting `--run` was given: the dry run went on and ignored it.
/// A usage error now (exit 2), before any connection.
#[test]
fn gc_with_run_is_a_usage_error() {
    let o = Command::new(env!("CARGO_BIN_EXE_drydock"))
        .args([
            "upgrade",
            "root@127.0.0.1:1",
            "--gc",
            "--run",
            "true",
            "--dry-run",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_exit(&o, 2);
    assert_stderr(
        &o,
        "the argument '--gc' cannot be used with '--run <COMMAND>'",
    );
}

#[test]
fn upgrade_dry_run_prints_the_plan_and_changes_nothing() {
    let os = std::fs::read_to_string("/etc/os-release").unwrap();
    assert!(
        os.contains("ID=debian") && os.contains("VERSION_ID=\"12\""),
        "this test expects a Debian 12 test machine, as CI is"
    );
    let sshd = Sshd::start();
    let t = tempdir();
    let dev = t.path().join("disk");
    make_disk(&dev, 3 * MIB, &[(MIB, 4096)], &[]);
    let before = sha256_file(&dev);
    let state = t.path().join("state");
    let upgrade = |to: &str, extra: &[&str]| dry_run(&sshd, &dev, &state, to, extra);

    let o = upgrade("debian-13", &["--json"]);
    assert_exit(&o, 0);
    let j = json(&o);
    assert_eq!(j["os"], "Debian GNU/Linux 12 (bookworm)");
    assert_eq!(j["device"], dev.to_str().unwrap());
    assert_eq!(j["size"], 3 * MIB);
    assert_eq!(j["block_device"], false);
    assert_eq!(j["plan"], "Debian 12 (bookworm) -> 13 (trixie)");
    assert_eq!(j["transfer"], "helper");
    assert_eq!(j["expect"], "debian 13");
    let commands: Vec<&str> = j["commands"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    assert!(commands[0].contains("s/([[:space:]])bookworm([[:space:]]|-|$)/\\1trixie\\2/g"));
    assert!(commands.iter().any(|c| c.ends_with(" full-upgrade")));
    assert!(commands.iter().any(|c| c.ends_with(" autoremove --purge")));

    // A workstation without qemu-img (a PATH of QEMU alone): said with the
    // probe, before anything moves, with what to install.
    let only_qemu = t.path().join("only-qemu");
    std::fs::create_dir(&only_qemu).unwrap();
    std::os::unix::fs::symlink(
        "/usr/bin/qemu-system-x86_64",
        only_qemu.join("qemu-system-x86_64"),
    )
    .unwrap();
    let o = sshd
        .drydock(&[
            "upgrade",
            &sshd.host(),
            "--to",
            "debian-13",
            "--dry-run",
            "--device",
            dev.to_str().unwrap(),
        ])
        .env("XDG_STATE_HOME", &state)
        .env("PATH", &only_qemu)
        .output()
        .unwrap();
    assert_exit(&o, 3);
    assert_stderr(
        &o,
        "qemu-img is not installed on this machine, and the worker VM needs it; install Debian's package: apt-get install qemu-utils",
    );

    let o = upgrade("trixie", &[]);
    assert_exit(&o, 0);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.starts_with(&format!(
            "dry run: nothing was changed on {}, and no run was kept\n",
            sshd.host()
        )),
        "{out}"
    );
    // A file standing for a disk: the freeze stops no service.
    assert!(
        out.contains(&format!(
            "  1. freeze {}: make {} read-only, turn swap off\n",
            sshd.host(),
            dev.display()
        )),
        "{out}"
    );
    assert!(
        out.contains("  4. reboot the worker VM and check it reports debian 13, power it off\n")
    );

    let o = upgrade("debian-12", &[]);
    assert_exit(&o, 3);
    assert_stderr(&o, "the host already runs Debian 12; 12 is not newer");

    assert_eq!(sha256_file(&dev), before);
    assert!(!state.exists(), "a run folder was made");
}

/// Real os-release files of NixOS 23.05, Ubuntu 22.04 and Alpine 3.19 (as
/// those systems ship them) and their real configuration files, laid over
/// this machine for one sshd each: `upgrade --dry-run` probes them over
/// SSH (NixOS's channels read by Nix's own `nix-channel`, Debian's
/// nix-bin), runs the recipe's preflight there, and prints the plan. Their
/// package mirrors and Nix's cache are not reachable from here, so no
/// upgrade of these systems runs; this is as far as they go.
#[test]
fn dry_runs_of_nixos_ubuntu_and_alpine_hosts() {
    const NIXOS: &str = r#"BUG_REPORT_URL="https://github.com/NixOS/nixpkgs/issues"
BUILD_ID="23.05.5541.a8d2e9a3b1b8"
DOCUMENTATION_URL="https://nixos.org/learn.html"
HOME_URL="https://nixos.org/"
ID=nixos
LOGO="nix-snowflake"
NAME=NixOS
PRETTY_NAME="NixOS 23.05 (Stoat)"
SUPPORT_END="2023-12-31"
SUPPORT_URL="https://nixos.org/community.html"
VERSION="23.05 (Stoat)"
VERSION_CODENAME=stoat
VERSION_ID="23.05"
"#;
    const UBUNTU: &str = r#"PRETTY_NAME="Ubuntu 22.04.3 LTS"
NAME="Ubuntu"
VERSION_ID="22.04"
VERSION="22.04.3 LTS (Jammy Jellyfish)"
VERSION_CODENAME=jammy
ID=ubuntu
ID_LIKE=debian
HOME_URL="https://www.ubuntu.com/"
SUPPORT_URL="https://help.ubuntu.com/"
BUG_REPORT_URL="https://bugs.launchpad.net/ubuntu/"
PRIVACY_POLICY_URL="https://www.ubuntu.com/legal/terms-and-policies/privacy-policy"
UBUNTU_CODENAME=jammy
"#;
    const ALPINE: &str = r#"NAME="Alpine Linux"
ID=alpine
VERSION_ID=3.19.1
PRETTY_NAME="Alpine Linux v3.19"
HOME_URL="https://alpinelinux.org/"
BUG_REPORT_URL="https://gitlab.alpinelinux.org/alpine/aports/-/issues"
"#;
    let flake = r#"{
  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-23.05";
  inputs.home-manager.url = "github:nix-community/home-manager/release-23.05";
  outputs = { self, nixpkgs, home-manager }: {
    nixosConfigurations.vps = nixpkgs.lib.nixosSystem {
      system = "x86_64-linux";
      modules = [ ./configuration.nix ];
    };
  };
}
"#;
    // (--to, files laid over the machine, the plan, commands it must show)
    type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, &'a str, Vec<&'a str>);
    let cases: Vec<Case> = vec![
        (
            "nixos-23.11",
            vec![
                ("/etc/os-release", NIXOS),
                // What `nix-channel --add` writes: a release channel, and
                // unstable for newer packages.
                (
                    "/root/.nix-channels",
                    "https://nixos.org/channels/nixos-23.05 nixos\nhttps://nixos.org/channels/nixos-unstable unstable\n",
                ),
            ],
            "NixOS 23.05 (stoat) -> 23.11 (tapir), channels nixos (kept as they are: unstable)",
            vec![
                "nix-channel --add https://nixos.org/channels/nixos-23.11 nixos",
                "nix-channel --update",
                "nixos-rebuild boot",
            ],
        ),
        (
            "nixos-23.11",
            vec![("/etc/os-release", NIXOS), ("/etc/nixos/flake.nix", flake)],
            "NixOS 23.05 (stoat) -> 23.11 (tapir), flake /etc/nixos/flake.nix",
            vec![
                // The config guard first, then the flake followed to where
                // its link points, as nixos-rebuild does.
                "nixosConfigurations.\\\"$h\\\".config.system.build.toplevel.outPath",
                "nix --extra-experimental-features 'nix-command flakes' flake lock \"$(dirname \"$(readlink -f /etc/nixos/flake.nix)\")\"",
                "nixos-rebuild boot --flake \"$(dirname \"$(readlink -f /etc/nixos/flake.nix)\")\"",
            ],
        ),
        (
            "ubuntu-24.04",
            vec![("/etc/os-release", UBUNTU)],
            "Ubuntu 22.04 (jammy) -> 24.04 (noble), PPAs disabled as do-release-upgrade does",
            vec!["full-upgrade"],
        ),
        (
            "alpine-3.20",
            vec![
                ("/etc/os-release", ALPINE),
                (
                    "/etc/apk/repositories",
                    "https://dl-cdn.alpinelinux.org/alpine/v3.19/main\nhttps://dl-cdn.alpinelinux.org/alpine/v3.19/community\n",
                ),
            ],
            "Alpine 3.19 -> 3.20",
            vec!["apk update", "apk upgrade --available"],
        ),
    ];
    for (to, files, plan, commands) in cases {
        let sshd = Sshd::start_as(&files);
        let t = tempdir();
        let dev = t.path().join("disk");
        make_disk(&dev, 3 * MIB, &[(MIB, 4096)], &[]);
        let state = t.path().join("state");
        let o = dry_run(&sshd, &dev, &state, to, &[]);
        assert_exit(&o, 0);
        let out = stdout(&o);
        eprintln!("$ drydock upgrade HOST --to {to} --dry-run ...\n{out}");
        assert!(out.contains(&format!("plan: {plan}\n")), "{out}");
        for c in commands {
            assert!(out.contains(c), "{c} missing from:\n{out}");
        }
        let j = json(&dry_run(&sshd, &dev, &state, to, &["--json"]));
        assert_eq!(j["plan"], plan);
        let (id, v) = to.split_once('-').unwrap();
        assert_eq!(j["expect"], format!("{id} {v}"));
        if id == "nixos" {
            assert!(
                out.contains("case \"$v\" in 23.11*)"),
                "the nixos-version check is missing:\n{out}"
            );
        }
        assert!(!state.exists(), "a dry run kept a run");
    }
}

/// The refusals a user of those systems meets first, from the same real
/// files: an impossible jump, and an Alpine that follows latest-stable.
#[test]
fn impossible_upgrades_of_other_systems_are_refused_before_anything_changes() {
    let sshd = Sshd::start_as(&[
        (
            "/etc/os-release",
            "NAME=\"Alpine Linux\"\nID=alpine\nVERSION_ID=3.19.1\nPRETTY_NAME=\"Alpine Linux v3.19\"\n",
        ),
        (
            "/etc/apk/repositories",
            "https://dl-cdn.alpinelinux.org/alpine/latest-stable/main\n",
        ),
    ]);
    let t = tempdir();
    let dev = t.path().join("disk");
    make_disk(&dev, 3 * MIB, &[(MIB, 4096)], &[]);
    let state = t.path().join("state");
    let run = |to: &str| dry_run(&sshd, &dev, &state, to, &[]);
    let o = run("alpine-3.21");
    assert_exit(&o, 3);
    assert_stderr(
        &o,
        "Alpine upgrades one release at a time: 3.19 -> 3.21 must go through 3.20; run --to alpine-3.20 first",
    );
    let o = run("alpine-3.20");
    assert_exit(&o, 3);
    assert_stderr(
        &o,
        "/etc/apk/repositories names no v3.19 repository (it has: https://dl-cdn.alpinelinux.org/alpine/latest-stable/main )",
    );
}
