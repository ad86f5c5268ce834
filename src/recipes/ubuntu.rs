//! Ubuntu, LTS to LTS: the sources rewrite (the codename in every apt
//! source, deb822 `ubuntu.sources` included), then apt's upgrade keeping
//! the admin's configuration files, as for Debian. `do-release-upgrade` is
//! not used: it needs changelogs.ubuntu.com's meta-release file, refuses to
//! run while a reboot is pending (a worker VM that just took updates often
//! is), and its non-interactive mode is the same apt run in the end.
//! One LTS at a time, as Ubuntu supports.

use anyhow::Result;

use super::Plan;
use super::debian::{GRUB_PC_CHECK, apt_release_upgrade};
use crate::releases;

pub fn plan(current: &str, target: &str) -> Result<Plan> {
    let (cur, from, to) = releases::one_step("ubuntu", "Ubuntu LTS", current, target)?;
    Ok(Plan {
        description: format!("Ubuntu {cur} ({from}) -> {target} ({to})"),
        commands: apt_release_upgrade(from, to),
        expect_version: Some(target.to_string()),
        expect_id: Some("ubuntu".into()),
        preflight: Some(GRUB_PC_CHECK.to_string()),
        after_reboot: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jammy_to_noble_and_refusals() {
        let p = plan("22.04", "24.04").unwrap();
        assert_eq!(p.description, "Ubuntu 22.04 (jammy) -> 24.04 (noble)");
        assert!(p.commands[0].contains("s/([[:space:]])jammy([[:space:]]|-|$)/\\1noble\\2/g"));
        assert!(p.commands[3].ends_with("full-upgrade"));
        assert_eq!(p.expect_version.as_deref(), Some("24.04"));
        assert_eq!(
            plan("20.04", "24.04").unwrap_err().to_string(),
            "Ubuntu LTS upgrades one release at a time: 20.04 -> 24.04 must go through 22.04; run --to ubuntu-22.04 first"
        );
        assert_eq!(
            plan("23.10", "24.04").unwrap_err().to_string(),
            "drydock knows Ubuntu LTS 20.04, 22.04, 24.04, 26.04 only; the host runs 23.10"
        );
    }
}
