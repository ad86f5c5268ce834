//! Recipes: a distribution's own release upgrade, as the commands drydock
//! runs inside the worker VM. Each recipe checks the current release first
//! and refuses what the distribution itself does not support.

pub mod alpine;
pub mod debian;
pub mod nixos;
pub mod ubuntu;

use anyhow::Result;

use crate::errors::refused;
use crate::remote::facts::Facts;

/// What a recipe needs to know of the host (or of the worker VM: the same
/// disk).
#[derive(Debug, Clone, Default)]
pub struct Host {
    pub id: String,
    pub version: String,
    pub nix: nixos::NixSetup,
}

impl Host {
    pub fn from_facts(f: &Facts) -> Host {
        Host {
            id: f.os.get("ID").cloned().unwrap_or_default(),
            version: f.os.get("VERSION_ID").cloned().unwrap_or_default(),
            nix: nixos::NixSetup::parse(&f.nix),
        }
    }
}

/// What the user asked of a recipe beyond the release.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Options {
    /// NixOS: delete the old generations before the push.
    pub gc: bool,
}

/// What the worker VM runs, and what the guest must say afterwards.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
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
    /// Run in the worker VM after its reboot into the result, each must
    /// succeed (NixOS: `nixos-version` names the new release).
    pub after_reboot: Vec<String>,
    /// apt's package files fetched over HTTPS (`pipeline::https_debs`):
    /// listed after command `.0` (the index update on the new release) and
    /// kept out of apt's cache before command `.1` (the clean), so that the
    /// VPS can fetch them itself at the push. None: no such hook.
    #[serde(default)]
    pub https_debs: Option<(usize, usize)>,
}

impl Plan {
    /// Whether a system reporting os-release ID and VERSION_ID runs the
    /// release this plan promises (None: it promises none). Releases are
    /// compared as releases: Alpine's 3.20.3 is 3.20.
    pub fn reached(&self, id: &str, version: &str) -> Option<bool> {
        let (want_id, want) = (self.expect_id.as_deref()?, self.expect_version.as_deref()?);
        Some(id == want_id && crate::releases::release_of(id, version) == want)
    }
}

/// A target such as `debian-13` or `trixie`, as (id, version).
pub fn parse_release(s: &str) -> Result<(String, String)> {
    let lower = s.to_ascii_lowercase();
    // Debian's codenames stand for its releases (trixie = debian-13).
    if let Some((v, _)) = crate::releases::known("debian")
        .iter()
        .find(|(_, c)| *c == lower)
    {
        return Ok(("debian".into(), v.to_string()));
    }
    if let Some((id, v)) = lower.split_once('-')
        && !v.is_empty()
        && ["debian", "ubuntu", "nixos", "alpine"].contains(&id)
    {
        return Ok((id.to_string(), v.to_string()));
    }
    Err(crate::errors::usage!(
        "unknown release '{s}': name it as debian-13 (or trixie), nixos-23.11, alpine-3.19, ubuntu-24.04"
    ))
}

/// The plan for taking `host` to `target`.
pub fn plan(host: &Host, target: &str, opts: &Options) -> Result<Plan> {
    let (id, version) = parse_release(target)?;
    let (current_id, current_version) = (host.id.as_str(), host.version.as_str());
    if id != current_id {
        return Err(refused!(
            "the host runs {current_id} {current_version}; drydock cannot turn it into {id} {version}"
        ));
    }
    if opts.gc && id != "nixos" {
        return Err(refused!(
            "--gc deletes old NixOS generations; the host runs {current_id}"
        ));
    }
    match id.as_str() {
        "debian" => debian::plan(current_version, &version),
        "ubuntu" => ubuntu::plan(current_version, &version),
        "alpine" => alpine::plan(current_version, &version),
        "nixos" => nixos::plan(current_version, &version, &host.nix, opts),
        other => Err(refused!("drydock has no recipe for {other}")),
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
        after_reboot: Vec::new(),
        https_debs: None,
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

    fn host(id: &str, version: &str) -> Host {
        Host {
            id: id.into(),
            version: version.into(),
            ..Default::default()
        }
    }

    #[test]
    fn other_distributions_are_refused_with_the_reason() {
        let none = Options::default();
        let e = plan(&host("debian", "12"), "nixos-23.11", &none)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "the host runs debian 12; drydock cannot turn it into nixos 23.11"
        );
        let e = plan(&host("debian", "12"), "debian-13", &Options { gc: true })
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "--gc deletes old NixOS generations; the host runs debian"
        );
    }
}
