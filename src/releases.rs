//! The releases drydock knows, in order, per distribution: what an
//! os-release file says a host runs, and which upgrades apply to it.

/// (os-release ID, [(VERSION_ID, codename)] oldest first).
const KNOWN: &[(&str, &[(&str, &str)])] = &[
    (
        "debian",
        &[
            ("10", "buster"),
            ("11", "bullseye"),
            ("12", "bookworm"),
            ("13", "trixie"),
        ],
    ),
    (
        "ubuntu",
        &[
            ("20.04", "focal"),
            ("22.04", "jammy"),
            ("24.04", "noble"),
            ("26.04", "resolute"),
        ],
    ),
    (
        "nixos",
        &[
            ("23.05", "stoat"),
            ("23.11", "tapir"),
            ("24.05", "uakari"),
            ("24.11", "vicuna"),
            ("25.05", "warbler"),
            ("25.11", "xantusia"),
        ],
    ),
    (
        "alpine",
        &[
            ("3.18", ""),
            ("3.19", ""),
            ("3.20", ""),
            ("3.21", ""),
            ("3.22", ""),
            ("3.23", ""),
        ],
    ),
];

/// The releases of `id`, oldest first: (VERSION_ID, codename).
pub fn known(id: &str) -> &'static [(&'static str, &'static str)] {
    KNOWN
        .iter()
        .find(|(d, _)| *d == id)
        .map(|(_, r)| *r)
        .unwrap_or(&[])
}

/// Alpine's VERSION_ID carries the patch level (3.19.1): its release is 3.19.
pub fn release_of(id: &str, version: &str) -> String {
    if id == "alpine" {
        version.splitn(3, '.').take(2).collect::<Vec<_>>().join(".")
    } else {
        version.to_string()
    }
}

/// Checks a one-release step from `current` to `target` of `id`, with
/// the refusal the user reads otherwise: (current release, its codename,
/// target codename).
pub fn one_step(
    id: &str,
    name: &str,
    current: &str,
    target: &str,
) -> anyhow::Result<(String, &'static str, &'static str)> {
    let rels = known(id);
    let cur = release_of(id, current);
    let list = || rels.iter().map(|(v, _)| *v).collect::<Vec<_>>().join(", ");
    let Some(ci) = rels.iter().position(|(v, _)| *v == cur) else {
        return Err(crate::errors::refused!(
            "drydock knows {name} {} only; the host runs {current}",
            list()
        ));
    };
    let Some(ti) = rels.iter().position(|(v, _)| *v == target) else {
        return Err(crate::errors::refused!(
            "drydock knows {name} {} only; {target} is not among them",
            list()
        ));
    };
    if ti <= ci {
        return Err(crate::errors::refused!(
            "the host already runs {name} {current}; {target} is not newer"
        ));
    }
    if ti != ci + 1 {
        let next = rels[ci + 1].0;
        return Err(crate::errors::refused!(
            "{name} upgrades one release at a time: {cur} -> {target} must go through {next}; run --to {id}-{next} first"
        ));
    }
    Ok((cur, rels[ci].1, rels[ti].1))
}

/// `debian-13`-style names of the releases newer than `version` (the
/// next one first: distributions support one step at a time).
pub fn upgrades_for(id: &str, version: &str) -> Vec<String> {
    let rels = known(id);
    let version = release_of(id, version);
    let Some(pos) = rels.iter().position(|(v, _)| *v == version) else {
        return Vec::new();
    };
    rels[pos + 1..]
        .iter()
        .map(|(v, _)| format!("{id}-{v}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_releases() {
        assert_eq!(upgrades_for("debian", "12"), vec!["debian-13"]);
        assert_eq!(upgrades_for("debian", "11"), vec!["debian-12", "debian-13"]);
        assert_eq!(upgrades_for("nixos", "23.05")[0], "nixos-23.11");
        assert_eq!(upgrades_for("alpine", "3.19.1")[0], "alpine-3.20");
        assert!(upgrades_for("debian", "13").is_empty());
        assert!(upgrades_for("gentoo", "2.14").is_empty());
    }
}
