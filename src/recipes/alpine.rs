//! Alpine: the release in /etc/apk/repositories rewritten (v3.19 ->
//! v3.20), `apk update`, `apk upgrade --available` (which also replaces
//! packages whose version went down), then a sync. One release at a time.
//! A repositories file that follows `latest-stable` or `edge` names no
//! release to rewrite: refused, since the result would not be the release
//! asked for.

use anyhow::Result;

use super::Plan;
use crate::releases;

pub fn plan(current: &str, target: &str) -> Result<Plan> {
    let (cur, _, _) = releases::one_step("alpine", "Alpine", current, target)?;
    let (from, to) = (cur.replace('.', "\\."), target);
    Ok(Plan {
        description: format!("Alpine {cur} -> {target}"),
        commands: vec![
            format!(
                "set -e; sed -i -E 's#/v{from}/#/v{to}/#g' /etc/apk/repositories; grep -q '^[^#]*/v{to}/' /etc/apk/repositories"
            ),
            "apk update".into(),
            "apk upgrade --available".into(),
            "sync".into(),
        ],
        expect_version: Some(target.to_string()),
        expect_id: Some("alpine".into()),
        preflight: Some(format!(
            "grep -q '^[^#]*/v{from}/' /etc/apk/repositories && exit 0; echo \"/etc/apk/repositories names no v{cur} repository (it has: $(grep -v '^#' /etc/apk/repositories | tr '\\n' ' ')); drydock rewrites v{cur} to v{to} only: name the release there (e.g. https://dl-cdn.alpinelinux.org/alpine/v{cur}/main), then run drydock again\"; exit 3"
        )),
        after_reboot: Vec::new(),
        https_debs: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// /etc/os-release of Alpine 3.20 (alpine-release 3.20.3-r0), as it is:
    /// VERSION_ID carries the patch level.
    const OS_RELEASE_3_20: &str = "NAME=\"Alpine Linux\"\nID=alpine\nVERSION_ID=3.20.3\nPRETTY_NAME=\"Alpine Linux v3.20\"\nHOME_URL=\"https://alpinelinux.org/\"\nBUG_REPORT_URL=\"https://gitlab.alpinelinux.org/alpine/aports/-/issues\"\n";

    #[test]
    fn a_host_on_3_20_3_has_reached_3_20() {
        let (id, version, pretty) = crate::vm::guest::parse_os_release(OS_RELEASE_3_20);
        assert_eq!((id.as_str(), version.as_str()), ("alpine", "3.20.3"));
        assert_eq!(pretty, "Alpine Linux v3.20");
        let p = plan("3.19.1", "3.20").unwrap();
        assert_eq!(p.reached(&id, &version), Some(true));
        assert_eq!(p.reached("alpine", "3.19.4"), Some(false));
        assert_eq!(p.reached("alpine", "3.2"), Some(false));
        assert_eq!(p.reached("alpine", "3.200.1"), Some(false));
    }

    #[test]
    fn the_rewrite_on_a_real_repositories_file() {
        // /etc/apk/repositories as setup-apkrepos writes it on Alpine 3.19.
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("repositories");
        std::fs::write(
            &f,
            "#/media/cdrom/apks\nhttps://dl-cdn.alpinelinux.org/alpine/v3.19/main\nhttps://dl-cdn.alpinelinux.org/alpine/v3.19/community\n#https://dl-cdn.alpinelinux.org/alpine/edge/testing\n",
        )
        .unwrap();
        let p = plan("3.19.1", "3.20").unwrap();
        assert_eq!(p.description, "Alpine 3.19 -> 3.20");
        let path = f.to_str().unwrap();
        let run = |script: &str| {
            std::process::Command::new("sh")
                .arg("-c")
                .arg(script.replace("/etc/apk/repositories", path))
                .output()
                .unwrap()
        };
        assert!(run(p.preflight.as_ref().unwrap()).status.success());
        assert!(run(&p.commands[0]).status.success());
        assert_eq!(
            std::fs::read_to_string(&f).unwrap(),
            "#/media/cdrom/apks\nhttps://dl-cdn.alpinelinux.org/alpine/v3.20/main\nhttps://dl-cdn.alpinelinux.org/alpine/v3.20/community\n#https://dl-cdn.alpinelinux.org/alpine/edge/testing\n"
        );
        assert_eq!(p.commands[2], "apk upgrade --available");
        // latest-stable: refused before the freeze, saying why.
        std::fs::write(
            &f,
            "https://dl-cdn.alpinelinux.org/alpine/latest-stable/main\n",
        )
        .unwrap();
        let o = run(p.preflight.as_ref().unwrap());
        assert_eq!(o.status.code(), Some(3));
        let said = String::from_utf8_lossy(&o.stdout);
        assert!(
            said.starts_with(&format!("{path} names no v3.19 repository (it has: https://dl-cdn.alpinelinux.org/alpine/latest-stable/main )")),
            "{said}"
        );
        assert_eq!(
            plan("3.18.4", "3.20").unwrap_err().to_string(),
            "Alpine upgrades one release at a time: 3.18 -> 3.20 must go through 3.19; run --to alpine-3.19 first"
        );
    }
}
