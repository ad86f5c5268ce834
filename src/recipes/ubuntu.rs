//! Ubuntu, LTS to LTS: the sources rewrite (the codename in every apt
//! source, deb822 `ubuntu.sources` included), then apt's upgrade keeping
//! the admin's configuration files, as for Debian. `do-release-upgrade` is
//! not used: it needs changelogs.ubuntu.com's meta-release file, refuses to
//! run while a reboot is pending (a worker VM that just took updates often
//! is), and its non-interactive mode is the same apt run in the end.
//! One LTS at a time, as Ubuntu supports.

use anyhow::Result;

use super::Plan;
use super::debian::{GRUB_PC_CHECK, HTTPS_DEBS, apt_release_upgrade};
use crate::releases;

/// PPAs disabled before the rewrite, as do-release-upgrade disables
/// third-party sources: a PPA's packages for the old series are no
/// promise of packages for the new one. A `.list` line is commented out
/// with the reason; a deb822 `.sources` file of a PPA gets `Enabled: no`
/// in each stanza. Prints each file it changed.
fn disable_ppas(to: &str) -> String {
    format!(
        r#"for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
  [ -f "$f" ] && grep -qE '^[[:space:]]*deb.*ppa\.launchpad(content)?\.net' "$f" || continue
  sed -i -E 's@^([[:space:]]*deb.*ppa\.launchpad(content)?\.net.*)$@# \1 # disabled by drydock on upgrade to {to}@' "$f"; echo "disabled: $f"
done
for f in /etc/apt/sources.list.d/*.sources; do
  [ -f "$f" ] && grep -qE '^URIs:.*ppa\.launchpad(content)?\.net' "$f" || continue
  sed -i -E '/^Enabled:/d; s/^(Types:.*)$/\1\nEnabled: no/' "$f"; echo "disabled: $f"
done; true"#
    )
}

pub fn plan(current: &str, target: &str) -> Result<Plan> {
    let (cur, from, to) = releases::one_step("ubuntu", "Ubuntu LTS", current, target)?;
    let mut commands = vec![disable_ppas(to)];
    let first = commands.len();
    commands.extend(apt_release_upgrade(from, to));
    Ok(Plan {
        description: format!(
            "Ubuntu {cur} ({from}) -> {target} ({to}), PPAs disabled as do-release-upgrade does"
        ),
        commands,
        expect_version: Some(target.to_string()),
        expect_id: Some("ubuntu".into()),
        preflight: Some(GRUB_PC_CHECK.to_string()),
        after_reboot: Vec::new(),
        https_debs: Some((first + HTTPS_DEBS.0, first + HTTPS_DEBS.1)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A PPA as add-apt-repository writes it on 22.04 (.list) and on 24.04
    /// (deb822), beside Ubuntu's own sources: the PPAs are disabled, the
    /// rest untouched.
    #[test]
    fn ppas_are_disabled_and_ubuntus_own_sources_kept() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let list = d.join("ondrej-ubuntu-php-jammy.list");
        std::fs::write(
            &list,
            "deb https://ppa.launchpadcontent.net/ondrej/php/ubuntu/ jammy main\n# deb-src https://ppa.launchpadcontent.net/ondrej/php/ubuntu/ jammy main\n",
        )
        .unwrap();
        let sources = d.join("deadsnakes-ubuntu-ppa-noble.sources");
        std::fs::write(
            &sources,
            "Types: deb\nURIs: https://ppa.launchpadcontent.net/deadsnakes/ppa/ubuntu/\nSuites: jammy\nComponents: main\nSigned-By: /etc/apt/keyrings/deadsnakes.gpg\n",
        )
        .unwrap();
        let ubuntu = d.join("ubuntu.sources");
        let own = "Types: deb\nURIs: http://archive.ubuntu.com/ubuntu/\nSuites: jammy jammy-updates\nComponents: main\n";
        std::fs::write(&ubuntu, own).unwrap();
        let script = disable_ppas("noble")
            .replace("/etc/apt/sources.list.d", d.to_str().unwrap())
            .replace("/etc/apt/sources.list ", "/nonexistent ");
        let o = std::process::Command::new("sh")
            .arg("-c")
            .arg(&script)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let said = String::from_utf8_lossy(&o.stdout);
        assert_eq!(said.lines().count(), 2, "{said}");
        assert_eq!(
            std::fs::read_to_string(&list).unwrap(),
            "# deb https://ppa.launchpadcontent.net/ondrej/php/ubuntu/ jammy main # disabled by drydock on upgrade to noble\n# deb-src https://ppa.launchpadcontent.net/ondrej/php/ubuntu/ jammy main\n"
        );
        assert!(
            std::fs::read_to_string(&sources)
                .unwrap()
                .starts_with("Types: deb\nEnabled: no\nURIs: "),
        );
        assert_eq!(std::fs::read_to_string(&ubuntu).unwrap(), own);
    }

    #[test]
    fn jammy_to_noble_and_refusals() {
        let p = plan("22.04", "24.04").unwrap();
        assert_eq!(
            p.description,
            "Ubuntu 22.04 (jammy) -> 24.04 (noble), PPAs disabled as do-release-upgrade does"
        );
        assert!(p.commands[1].contains("s/([[:space:]])jammy([[:space:]]|-|$)/\\1noble\\2/g"));
        assert!(p.commands[4].ends_with("full-upgrade"));
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
