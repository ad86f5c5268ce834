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
        &[("20.04", "focal"), ("22.04", "jammy"), ("24.04", "noble")],
    ),
    (
        "nixos",
        &[
            ("23.05", "stoat"),
            ("23.11", "tapir"),
            ("24.05", "uakari"),
            ("24.11", "vicuna"),
            ("25.05", "warbler"),
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
        ],
    ),
];

/// `debian-13`-style names of the releases newer than `version` (the
/// next one first: distributions support one step at a time).
pub fn upgrades_for(id: &str, version: &str) -> Vec<String> {
    let Some((_, rels)) = KNOWN.iter().find(|(d, _)| *d == id) else {
        return Vec::new();
    };
    // Alpine's VERSION_ID carries the patch level (3.19.1).
    let version = if id == "alpine" {
        version.splitn(3, '.').take(2).collect::<Vec<_>>().join(".")
    } else {
        version.to_string()
    };
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
