//! A store's address on another machine: `ssh://[user@]host[:port]/PATH`
//! (or `sftp://`), as `--store` takes it (`sftp.rs` reaches it).

use std::path::{Path, PathBuf};

use anyhow::Result;

use crate::errors::usage;
use crate::ssh::HostSpec;

/// `ssh://[user@]host[:port]/PATH` taken apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreUrl {
    pub scheme: String,
    /// `[user@]host[:port]`, or an ssh config alias.
    pub authority: String,
    /// Absolute, or relative to the login's home (`/~/PATH`).
    pub path: PathBuf,
}

impl StoreUrl {
    /// None if S is no URL (a local folder); a usage error if it is one
    /// drydock does not take.
    pub fn parse(s: &str) -> Option<Result<StoreUrl>> {
        let (scheme, rest) = s.split_once("://")?;
        if scheme.is_empty()
            || !scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "+.-".contains(c))
        {
            return None;
        }
        Some(Self::parse_parts(s, scheme, rest))
    }

    fn parse_parts(s: &str, scheme: &str, rest: &str) -> Result<StoreUrl> {
        if scheme != "ssh" && scheme != "sftp" {
            return Err(usage!(
                "--store {s}: drydock keeps stores in a local folder or over SSH \
                 (ssh://[user@]host[:port]/PATH), not {scheme}://. Nothing was made"
            ));
        }
        // The path starts at the first '/' after the host ([v6] included).
        let from = if rest.starts_with('[') {
            rest.find(']').map(|i| i + 1).unwrap_or(rest.len())
        } else {
            0
        };
        let (authority, path) = match rest[from..].find('/') {
            Some(i) => rest.split_at(from + i),
            None => (rest, ""),
        };
        let path = if let Some(home) = path.strip_prefix("/~/") {
            PathBuf::from(home.trim_end_matches('/'))
        } else {
            PathBuf::from(path.trim_end_matches('/'))
        };
        if authority.is_empty() || path.as_os_str().is_empty() || path == Path::new("~") {
            return Err(usage!(
                "--store {s}: give the host and the store's folder on it: \
                 {scheme}://[user@]host[:port]/PATH (/~/PATH for one in the login's home). \
                 Nothing was made"
            ));
        }
        // The host part as the VPS's is taken (its errors are usage errors).
        HostSpec::parse(authority)?;
        Ok(StoreUrl {
            scheme: scheme.to_string(),
            authority: authority.to_string(),
            path,
        })
    }

    /// P (a path on the store host) as the user would type it.
    pub fn show(&self, p: &Path) -> String {
        if p.is_absolute() {
            format!("{}://{}{}", self.scheme, self.authority, p.display())
        } else {
            format!("{}://{}/~/{}", self.scheme, self.authority, p.display())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_urls_are_taken_apart_or_refused() {
        let u = StoreUrl::parse("ssh://backup@store.example:2222/srv/drydock/vps1")
            .unwrap()
            .unwrap();
        assert_eq!(u.authority, "backup@store.example:2222");
        assert_eq!(u.path, PathBuf::from("/srv/drydock/vps1"));
        assert_eq!(
            u.show(&u.path.join("store.json")),
            "ssh://backup@store.example:2222/srv/drydock/vps1/store.json"
        );
        let u = StoreUrl::parse("sftp://nas/~/backups/").unwrap().unwrap();
        assert_eq!(u.path, PathBuf::from("backups"));
        assert_eq!(u.show(&u.path), "sftp://nas/~/backups");
        let u = StoreUrl::parse("ssh://root@[2001:db8::1]:22/b")
            .unwrap()
            .unwrap();
        assert_eq!(u.authority, "root@[2001:db8::1]:22");
        assert!(StoreUrl::parse("/srv/store").is_none());
        assert!(StoreUrl::parse("./a://b").is_none());
        for bad in ["ssh://host", "ssh://host/", "s3://bucket/x", "ssh:///x"] {
            let e = StoreUrl::parse(bad).unwrap().unwrap_err();
            assert!(
                format!("{e:#}").contains("Nothing was made"),
                "{bad}: {e:#}"
            );
        }
    }
}
