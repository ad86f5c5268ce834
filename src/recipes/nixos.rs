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
use crate::{refused, releases};

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
fn moved(url: &str, from: &str, to: &str) -> Option<String> {
    let new = ["nixos-", "nixpkgs-", "release-"]
        .iter()
        .fold(url.to_string(), |u, p| {
            u.replace(&format!("{p}{from}"), &format!("{p}{to}"))
        });
    (new != url).then_some(new)
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
    if let Some(flake) = &nix.flake {
        let dir = flake.trim_end_matches("/flake.nix");
        how = format!("flake {flake}");
        commands.push(format!(
            "set -e; sed -i -E 's#(nixos|nixpkgs|release)-{from}([^0-9]|$)#\\1-{target}\\2#g' {flake}; grep -q -E '(nixos|nixpkgs)-{target}' {flake}"
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
        after_reboot.push("nix-collect-garbage --delete-old".into());
        // Drop the deleted generations' boot entries.
        after_reboot.push("/run/current-system/bin/switch-to-configuration boot".into());
    }
    Ok(Plan {
        description: format!(
            "NixOS {cur} ({from_name}) -> {target} ({to_name}), {how}{}",
            if opts.gc {
                "; old generations deleted (--gc)"
            } else {
                ""
            }
        ),
        commands,
        expect_version: Some(target.to_string()),
        expect_id: Some("nixos".into()),
        preflight,
        after_reboot,
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
        assert_eq!(
            p.commands,
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
        assert_eq!(gc.after_reboot[1], "nix-collect-garbage --delete-old");
        // The small channel keeps its flavour.
        let small = setup(&["channel nixos https://channels.nixos.org/nixos-23.05-small"]);
        assert_eq!(
            plan("23.05", "23.11", &small, &Options::default())
                .unwrap()
                .commands[0],
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
    fn a_flake_has_its_inputs_moved() {
        let dir = tempfile::tempdir().unwrap();
        let flake = dir.path().join("flake.nix");
        // The inputs of a typical NixOS 23.05 flake.
        std::fs::write(
            &flake,
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
        let d = dir.path().to_str().unwrap();
        assert_eq!(
            p.commands[1],
            format!("nix --extra-experimental-features 'nix-command flakes' flake lock {d}")
        );
        assert_eq!(p.commands[2], format!("nixos-rebuild boot --flake {d}"));
        let sh = |s: &str| {
            std::process::Command::new("sh")
                .arg("-c")
                .arg(s)
                .output()
                .unwrap()
        };
        assert!(sh(p.preflight.as_ref().unwrap()).status.success());
        assert!(sh(&p.commands[0]).status.success());
        let after = std::fs::read_to_string(&flake).unwrap();
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
}
