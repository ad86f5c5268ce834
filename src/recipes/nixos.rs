//! NixOS, the way its manual upgrades a release, in the worker VM:
//!
//! * channel-based: every channel of root that follows the release
//!   (nixos-23.05, nixos-23.05-small, nixpkgs-23.05, home-manager's
//!   release-23.05) is pointed at the new one with `nix-channel --add`;
//!   channels that follow no release (nixos-unstable for newer packages)
//!   are kept; then `nix-channel --update` and `nixos-rebuild boot`;
//! * flake-based (/etc/nixos/flake.nix): its inputs' release branches are
//!   rewritten the same way, the lock file updated, `nixos-rebuild boot
//!   --flake /etc/nixos`.
//!
//! After the guest's reboot into the new generation, `nixos-version` must
//! name the new release; `--gc` then deletes the old generations (and
//! their boot entries) before the push.

use anyhow::Result;

use super::{Options, Plan};
use crate::errors::refused;
use crate::releases;

/// What the probe found of Nix on the host (root's channels, the flake).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NixSetup {
    pub flake: Option<String>,
    /// (name, url) as `nix-channel --list` prints them.
    pub channels: Vec<(String, String)>,
}

impl NixSetup {
    /// Lines "flake PATH" and "channel NAME URL" of the probe's `nix` section.
    pub fn parse(lines: &[String]) -> NixSetup {
        let mut n = NixSetup::default();
        for l in lines {
            if let Some(p) = l.strip_prefix("flake ") {
                n.flake = Some(p.trim().to_string());
            } else if let Some(c) = l.strip_prefix("channel ")
                && let Some((name, url)) = c.trim().split_once(' ')
            {
                n.channels.push((name.to_string(), url.trim().to_string()));
            }
        }
        n
    }
}

/// A URL with the release in it moved to `to`: nixos-23.05(-small),
/// nixpkgs-23.05, release-23.05 (home-manager); None when it follows none.
/// A URL pinned to one build of a release (releases.nixos.org's
/// nixos-23.05.1234.abcdef) follows no release: it is not moved.
fn moved(url: &str, from: &str, to: &str) -> Option<String> {
    let mut new = url.to_string();
    for p in ["nixos-", "nixpkgs-", "release-"] {
        let (old, moved_to) = (format!("{p}{from}"), format!("{p}{to}"));
        let mut out = String::new();
        let mut rest = new.as_str();
        while let Some(i) = rest.find(&old) {
            let after = &rest[i + old.len()..];
            let follows = after.is_empty()
                || after.starts_with('/')
                || after.starts_with("-small")
                || after.starts_with(".tar")
                || after.starts_with('#')
                || after.starts_with('?');
            out.push_str(&rest[..i]);
            out.push_str(if follows { &moved_to } else { &old });
            rest = after;
        }
        out.push_str(rest);
        new = out;
    }
    (new != url).then_some(new)
}

/// The config guard, run first in the worker VM (before anything changes):
/// what /etc/nixos builds must be what the VPS runs (/run/current-system).
/// A VPS deployed from elsewhere (deploy-rs, colmena, `nixos-rebuild
/// --target-host`, a flake kept off the host) has a stale /etc/nixos,
/// typically nixos-infect's bootstrap: rebuilding it would push a system
/// without the user's services. Evaluation only (the out path), nothing
/// built. FLAKE: the flake.nix drydock found, else the channels'
/// `<nixpkgs/nixos>` with `<nixos-config>`. DRYDOCK_CURRENT_SYSTEM names
/// another running system (the tests' nix-bin).
fn guard(flake: Option<&str>) -> String {
    let eval = match flake {
        Some(f) => format!(
            "d=$(dirname \"$(readlink -f {f})\"); h=$(cat /proc/sys/kernel/hostname); \
             what=\"the flake $d (nixosConfigurations.$h, as nixos-rebuild builds it)\"; \
             got=$({NIX} eval --raw \"$d#nixosConfigurations.\\\"$h\\\".config.system.build.toplevel.outPath\" 2>/tmp/drydock-guard.err)"
        ),
        None => "what=\"/etc/nixos (<nixpkgs/nixos> with <nixos-config>, as nixos-rebuild builds it)\"; \
                 got=$(nix-instantiate --eval --strict -E '(import <nixpkgs/nixos> {}).config.system.build.toplevel.outPath' 2>/tmp/drydock-guard.err | tr -d '\"')"
            .to_string(),
    };
    format!(
        "cur=$(readlink -f \"${{DRYDOCK_CURRENT_SYSTEM:-/run/current-system}}\"); {eval}; \
         if [ -z \"$got\" ]; then echo \"drydock could not evaluate $what to compare it with the running system $cur:\"; tail -n 5 /tmp/drydock-guard.err; \
         echo 'drydock upgrades what /etc/nixos builds only when that is the running system; upgrade the VPS where it is deployed from, or with --run'; exit 3; fi; \
         if [ \"$got\" != \"$cur\" ]; then echo \"$what builds $got, but the VPS runs $cur: /etc/nixos is not what built the running system (a VPS deployed from elsewhere, by deploy-rs, colmena or nixos-rebuild --target-host, keeps nixos-infect's bootstrap there; rebuilding it would replace the VPS's system with one without its services). Upgrade the VPS where its configuration lives, put that configuration in /etc/nixos, or run your own command with --run\"; exit 3; fi; \
         echo \"$what builds the running system $cur\""
    )
}

const NIX: &str = "nix --extra-experimental-features 'nix-command flakes'";

/// Long but straight: the plan's commands one after the other, as the
/// NixOS manual orders them, each with the reason beside it.
pub fn plan(current: &str, target: &str, nix: &NixSetup, opts: &Options) -> Result<Plan> {
    let (cur, from_name, to_name) = releases::one_step("nixos", "NixOS", current, target)?;
    let from = cur.replace('.', "\\.");
    let mut commands = Vec::new();
    let how;
    let preflight;
    commands.push(guard(nix.flake.as_deref()));
    if let Some(flake) = &nix.flake {
        // nixos-rebuild follows a symlinked flake.nix to its folder; so
        // does drydock, and edits the file it points to (sed -i on the
        // link would replace it with a copy).
        let file = format!("\"$(readlink -f {flake})\"");
        let dir = format!("\"$(dirname \"$(readlink -f {flake})\")\"");
        how = format!("flake {flake}");
        commands.push(format!(
            "set -e; sed -i -E 's#(nixos|nixpkgs|release)-{from}([^0-9]|$)#\\1-{target}\\2#g' {file}; grep -q -E '(nixos|nixpkgs)-{target}' {file}"
        ));
        commands.push(format!("{NIX} flake lock {dir}"));
        commands.push(format!("nixos-rebuild boot --flake {dir}"));
        preflight = Some(format!(
            "grep -q -E '(nixos|nixpkgs)-{from}([^0-9]|$)' {flake} && exit 0; echo \"{flake} has no input on the nixos-{cur} (or nixpkgs-{cur}) branch; drydock moves that branch to {target}: set it there (e.g. inputs.nixpkgs.url = \\\"github:NixOS/nixpkgs/nixos-{cur}\\\"), or upgrade the flake yourself with --run\"; exit 3"
        ));
    } else {
        let moves: Vec<(String, String)> = nix
            .channels
            .iter()
            .filter_map(|(name, url)| moved(url, &cur, target).map(|u| (name.clone(), u)))
            .collect();
        if moves.is_empty() {
            let list = if nix.channels.is_empty() {
                "none".to_string()
            } else {
                nix.channels
                    .iter()
                    .map(|(n, u)| format!("{n} {u}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            return Err(refused!(
                "no channel of root follows NixOS {cur} (root's channels: {list}), and there is no /etc/nixos/flake.nix: drydock cannot tell what to move to {target}. Add it as `nix-channel --add https://nixos.org/channels/nixos-{cur} nixos` on the host, or use --run"
            ));
        }
        let kept: Vec<&str> = nix
            .channels
            .iter()
            .filter(|(n, _)| !moves.iter().any(|(m, _)| m == n))
            .map(|(n, _)| n.as_str())
            .collect();
        how = format!(
            "channels {}{}",
            moves
                .iter()
                .map(|(n, _)| n.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            if kept.is_empty() {
                String::new()
            } else {
                format!(" (kept as they are: {})", kept.join(", "))
            }
        );
        for (name, url) in &moves {
            commands.push(format!("nix-channel --add {url} {name}"));
        }
        commands.push("nix-channel --update".into());
        commands.push("nixos-rebuild boot".into());
        preflight = None;
    }
    let mut after_reboot = vec![format!(
        "v=$(nixos-version); case \"$v\" in {target}*) echo \"nixos-version: $v\" ;; *) echo \"nixos-version says $v, not {target}\"; exit 1 ;; esac"
    )];
    if opts.gc {
        // The new generation and the one before it stay, so that the boot
        // menu still offers the way back; older ones and what only they
        // use go.
        after_reboot.push(
            "nix-env --profile /nix/var/nix/profiles/system --delete-generations +2 && nix-collect-garbage"
                .into(),
        );
        // Drop the deleted generations' boot entries.
        after_reboot.push("/run/current-system/bin/switch-to-configuration boot".into());
    }
    Ok(Plan {
        description: format!(
            "NixOS {cur} ({from_name}) -> {target} ({to_name}), {how}{}",
            if opts.gc {
                "; generations older than the previous one deleted (--gc)"
            } else {
                ""
            }
        ),
        commands,
        expect_version: Some(target.to_string()),
        expect_id: Some("nixos".into()),
        preflight,
        after_reboot,
        https_debs: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup(lines: &[&str]) -> NixSetup {
        NixSetup::parse(&lines.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn channels_every_one_that_follows_the_release() {
        // `nix-channel --list` of a NixOS 23.05 root with home-manager and
        // an unstable channel for newer packages.
        let nix = setup(&[
            "channel home-manager https://github.com/nix-community/home-manager/archive/release-23.05.tar.gz",
            "channel nixos https://nixos.org/channels/nixos-23.05",
            "channel unstable https://nixos.org/channels/nixos-unstable",
        ]);
        let p = plan("23.05", "23.11", &nix, &Options::default()).unwrap();
        assert_eq!(
            p.description,
            "NixOS 23.05 (stoat) -> 23.11 (tapir), channels home-manager, nixos (kept as they are: unstable)"
        );
        assert!(
            p.commands[0].contains("nix-instantiate --eval"),
            "{}",
            p.commands[0]
        );
        assert_eq!(
            p.commands[1..],
            [
                "nix-channel --add https://github.com/nix-community/home-manager/archive/release-23.11.tar.gz home-manager",
                "nix-channel --add https://nixos.org/channels/nixos-23.11 nixos",
                "nix-channel --update",
                "nixos-rebuild boot",
            ]
        );
        assert_eq!(p.expect_id.as_deref(), Some("nixos"));
        assert_eq!(p.expect_version.as_deref(), Some("23.11"));
        assert!(p.after_reboot[0].contains("23.11*)"));
        assert_eq!(p.after_reboot.len(), 1);
        let gc = plan("23.05", "23.11", &nix, &Options { gc: true }).unwrap();
        assert_eq!(
            gc.after_reboot[1],
            "nix-env --profile /nix/var/nix/profiles/system --delete-generations +2 && nix-collect-garbage"
        );
        // The small channel keeps its flavour.
        let small = setup(&["channel nixos https://channels.nixos.org/nixos-23.05-small"]);
        assert_eq!(
            plan("23.05", "23.11", &small, &Options::default())
                .unwrap()
                .commands[1],
            "nix-channel --add https://channels.nixos.org/nixos-23.11-small nixos"
        );
    }

    #[test]
    fn nothing_to_move_is_refused() {
        let e = plan(
            "23.05",
            "23.11",
            &setup(&["channel unstable https://nixos.org/channels/nixos-unstable"]),
            &Options::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("no channel of root follows NixOS 23.05 (root's channels: unstable https://nixos.org/channels/nixos-unstable)"),
            "{e}"
        );
        assert_eq!(
            plan("23.05", "24.05", &NixSetup::default(), &Options::default())
                .unwrap_err()
                .to_string(),
            "NixOS upgrades one release at a time: 23.05 -> 24.05 must go through 23.11; run --to nixos-23.11 first"
        );
    }

    #[test]
    fn a_flake_has_its_inputs_moved_through_its_symlink() {
        let dir = tempfile::tempdir().unwrap();
        // /etc/nixos/flake.nix a symlink to the user's repository, a common
        // layout: nixos-rebuild builds the folder the link points to.
        let repo = dir.path().join("repo");
        let etc = dir.path().join("etc-nixos");
        std::fs::create_dir_all(&repo).unwrap();
        std::fs::create_dir_all(&etc).unwrap();
        let real = repo.join("flake.nix");
        let flake = etc.join("flake.nix");
        std::os::unix::fs::symlink(&real, &flake).unwrap();
        // The inputs of a typical NixOS 23.05 flake.
        std::fs::write(
            &real,
            r#"{
  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-23.05";
  inputs.home-manager.url = "github:nix-community/home-manager/release-23.05";
  inputs.unstable.url = "github:NixOS/nixpkgs/nixos-unstable";
  inputs.old.url = "github:NixOS/nixpkgs/nixos-23.051";
  outputs = { self, nixpkgs, ... }: { };
}
"#,
        )
        .unwrap();
        let path = flake.to_str().unwrap().to_string();
        let nix = NixSetup {
            flake: Some(path.clone()),
            channels: vec![],
        };
        let p = plan("23.05", "23.11", &nix, &Options::default()).unwrap();
        assert_eq!(
            p.description,
            format!("NixOS 23.05 (stoat) -> 23.11 (tapir), flake {path}")
        );
        let sh = |s: &str| {
            std::process::Command::new("sh")
                .arg("-c")
                .arg(s)
                .output()
                .unwrap()
        };
        // The lock and the rebuild name the folder the link points to.
        let lock = p.commands[2].replace(
            "nix --extra-experimental-features 'nix-command flakes' flake lock",
            "echo",
        );
        assert_eq!(
            String::from_utf8_lossy(&sh(&lock).stdout).trim(),
            repo.to_str().unwrap()
        );
        assert!(
            p.commands[3].starts_with("nixos-rebuild boot --flake \"$(dirname"),
            "{}",
            p.commands[3]
        );
        assert!(sh(p.preflight.as_ref().unwrap()).status.success());
        assert!(sh(&p.commands[1]).status.success());
        assert!(
            std::fs::symlink_metadata(&flake)
                .unwrap()
                .file_type()
                .is_symlink(),
            "the link was replaced by a copy"
        );
        let after = std::fs::read_to_string(&real).unwrap();
        assert!(
            after.contains("github:NixOS/nixpkgs/nixos-23.11\""),
            "{after}"
        );
        assert!(after.contains("home-manager/release-23.11\""), "{after}");
        assert!(after.contains("nixos-unstable\""), "{after}");
        assert!(after.contains("nixos-23.051\""), "{after}");
        // Run again on the moved flake: the preflight now refuses.
        let o = sh(p.preflight.as_ref().unwrap());
        assert_eq!(o.status.code(), Some(3));
        assert!(
            String::from_utf8_lossy(&o.stdout)
                .starts_with(&format!("{path} has no input on the nixos-23.05")),
        );
    }

    #[test]
    fn a_channel_pinned_to_one_build_is_not_moved() {
        assert_eq!(
            moved("https://nixos.org/channels/nixos-23.05", "23.05", "23.11").as_deref(),
            Some("https://nixos.org/channels/nixos-23.11")
        );
        assert_eq!(
            moved(
                "https://channels.nixos.org/nixos-23.05-small/nixexprs.tar.xz",
                "23.05",
                "23.11"
            )
            .as_deref(),
            Some("https://channels.nixos.org/nixos-23.11-small/nixexprs.tar.xz")
        );
        assert_eq!(
            moved(
                "https://github.com/nix-community/home-manager/archive/release-23.05.tar.gz",
                "23.05",
                "23.11"
            )
            .as_deref(),
            Some("https://github.com/nix-community/home-manager/archive/release-23.11.tar.gz")
        );
        assert_eq!(
            moved(
                "https://releases.nixos.org/nixos/23.05/nixos-23.05.5533.898cb2064b6e/nixexprs.tar.xz",
                "23.05",
                "23.11"
            ),
            None
        );
    }

    /// The config guard, run with Debian's nix-bin on a small stand-in for
    /// `<nixpkgs/nixos>`: it passes when what the configuration builds is
    /// the running system, and refuses, saying so, when it is not.
    #[test]
    fn the_config_guard_compares_what_etc_nixos_builds_with_the_running_system() {
        if std::process::Command::new("nix-instantiate")
            .arg("--version")
            .output()
            .is_err()
        {
            eprintln!("nix-instantiate is not installed (scripts/test installs nix-bin): skipped");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir_all(d.join("nixpkgs/nixos")).unwrap();
        std::fs::write(
            d.join("nixpkgs/nixos/default.nix"),
            r#"{ configuration ? <nixos-config> }:
let cfg = import configuration; in {
  config.system.build.toplevel = derivation {
    name = "nixos-system-vps-${cfg.release}";
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" "echo ${cfg.release} > $out" ];
  };
}
"#,
        )
        .unwrap();
        let config = d.join("configuration.nix");
        std::fs::write(&config, r#"{ release = "23.05"; }"#).unwrap();
        let nix_path = format!(
            "nixpkgs={}:nixos-config={}",
            d.join("nixpkgs").display(),
            config.display()
        );
        // The running system: that configuration, built.
        let out = std::process::Command::new("nix-build")
            .args([
                "--option",
                "build-users-group",
                "",
                "--option",
                "sandbox",
                "false",
                "--option",
                "substituters",
                "",
                "<nixpkgs/nixos>",
                "-A",
                "config.system.build.toplevel",
                "-o",
            ])
            .arg(d.join("current-system"))
            .env("NIX_PATH", &nix_path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let run = || {
            std::process::Command::new("sh")
                .arg("-c")
                .arg(guard(None))
                .env("NIX_PATH", &nix_path)
                .env("DRYDOCK_CURRENT_SYSTEM", d.join("current-system"))
                .output()
                .unwrap()
        };
        let o = run();
        let said = String::from_utf8_lossy(&o.stdout).to_string();
        assert!(o.status.success(), "{said}");
        assert!(
            said.contains("builds the running system /nix/store/"),
            "{said}"
        );
        // /etc/nixos no longer what runs (nixos-infect's bootstrap, say).
        std::fs::write(&config, r#"{ release = "bootstrap"; }"#).unwrap();
        let o = run();
        let said = String::from_utf8_lossy(&o.stdout).to_string();
        assert_eq!(o.status.code(), Some(3), "{said}");
        assert!(
            said.contains("-nixos-system-vps-bootstrap, but the VPS runs /nix/store/"),
            "{said}"
        );
        assert!(
            said.contains(
                "-nixos-system-vps-23.05: /etc/nixos is not what built the running system"
            ),
            "{said}"
        );
        // A configuration that does not evaluate: refused too, its error shown.
        std::fs::write(&config, "{ release = ; }").unwrap();
        let o = run();
        let said = String::from_utf8_lossy(&o.stdout).to_string();
        assert_eq!(o.status.code(), Some(3), "{said}");
        assert!(said.contains("drydock could not evaluate"), "{said}");
    }
}
