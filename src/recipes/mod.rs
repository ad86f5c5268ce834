//! Recipes: a distribution's own release upgrade, as the commands drydock
//! runs inside the worker VM. Each recipe checks the current release first
//! and refuses what the distribution itself does not support.

pub mod debian;

use anyhow::Result;

use crate::refused;

/// What the worker VM runs, and what the guest must say afterwards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Shown to the user and written to the run log.
    pub description: String,
    /// Shell commands, run in order, each must succeed.
    pub commands: Vec<String>,
    /// os-release VERSION_ID the guest must report after its reboot
    /// (None for `--run`, which promises nothing about the release).
    pub expect_version: Option<String>,
    pub expect_id: Option<String>,
    /// A read-only check run on the VPS before anything changes: a
    /// non-zero exit refuses the run, its output saying why and what to do.
    pub preflight: Option<String>,
}

/// A target such as `debian-13` or `trixie`, as (id, version).
pub fn parse_release(s: &str) -> Result<(String, String)> {
    let lower = s.to_ascii_lowercase();
    if let Some(v) = debian::codename_version(&lower) {
        return Ok(("debian".into(), v.into()));
    }
    if let Some((id, v)) = lower.split_once('-')
        && !v.is_empty()
        && ["debian", "ubuntu", "nixos", "alpine"].contains(&id)
    {
        return Ok((id.to_string(), v.to_string()));
    }
    Err(refused!(
        "unknown release '{s}': name it as debian-13 (or trixie), nixos-23.11, alpine-3.19, ubuntu-24.04"
    ))
}

/// The plan for taking a host at (id, version) to `target`.
pub fn plan(current_id: &str, current_version: &str, target: &str) -> Result<Plan> {
    let (id, version) = parse_release(target)?;
    if id != current_id {
        return Err(refused!(
            "the host runs {current_id} {current_version}; drydock cannot turn it into {id} {version}"
        ));
    }
    match id.as_str() {
        "debian" => debian::plan(current_version, &version),
        other => Err(refused!(
            "release upgrades of {other} are not built yet; only debian-N is (use --run 'COMMAND' to run your own)"
        )),
    }
}

/// `--run 'COMMAND'`: any command instead of a recipe.
pub fn run_plan(command: &str) -> Plan {
    Plan {
        description: format!("run `{command}`"),
        commands: vec![command.to_string()],
        expect_version: None,
        expect_id: None,
        preflight: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn releases_by_name_and_codename() {
        assert_eq!(
            parse_release("debian-13").unwrap(),
            ("debian".into(), "13".into())
        );
        assert_eq!(
            parse_release("trixie").unwrap(),
            ("debian".into(), "13".into())
        );
        assert_eq!(
            parse_release("nixos-23.11").unwrap(),
            ("nixos".into(), "23.11".into())
        );
        let e = parse_release("windows-11").unwrap_err().to_string();
        assert!(e.starts_with("unknown release 'windows-11'"), "{e}");
    }

    #[test]
    fn other_distributions_are_refused_with_the_reason() {
        let e = plan("debian", "12", "nixos-23.11").unwrap_err().to_string();
        assert_eq!(
            e,
            "the host runs debian 12; drydock cannot turn it into nixos 23.11"
        );
        let e = plan("nixos", "23.05", "nixos-23.11")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("release upgrades of nixos are not built yet"),
            "{e}"
        );
    }
}
