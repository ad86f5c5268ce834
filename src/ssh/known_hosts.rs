//! Host key checking against known_hosts files, as OpenSSH does it.
//!
//! russh's own check reads only `~/.ssh/known_hosts`, splits on single
//! spaces and knows neither wildcards, negation, `@revoked` nor the global
//! file; a tool that writes to a server's only disk must not be laxer than
//! the `ssh` its user already trusts, so this module reads them all.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, KeyInit, Mac};
use russh::keys::{Algorithm, HashAlg, PublicKey};
use sha1::Sha1;

use super::target::wildcard_match;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Marker {
    None,
    Revoked,
    CertAuthority,
}

#[derive(Debug, Clone)]
struct Entry {
    path: PathBuf,
    line: usize,
    marker: Marker,
    hosts: String,
    key: PublicKey,
}

/// What the known_hosts files say about one host key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// A line lists this host with this key.
    Known,
    /// No line lists this host (or only with keys of other types).
    Unknown,
    /// A line lists this host with another key of the same type.
    Changed { path: PathBuf, line: usize },
    /// The key is marked `@revoked`.
    Revoked { path: PathBuf, line: usize },
}

#[derive(Debug, Default)]
pub struct KnownHosts {
    entries: Vec<Entry>,
}

/// The name known_hosts uses for a host: `host`, or `[host]:port` off port 22.
pub fn host_key_name(host: &str, port: u16) -> String {
    if port == 22 {
        host.to_ascii_lowercase()
    } else {
        format!("[{}]:{port}", host.to_ascii_lowercase())
    }
}

impl KnownHosts {
    /// Read every file that exists; missing files are not an error.
    pub fn load(paths: &[PathBuf]) -> Result<KnownHosts> {
        let mut kh = KnownHosts::default();
        for path in paths {
            let text = match std::fs::read_to_string(path) {
                Ok(t) => t,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => {
                    return Err(e).with_context(|| format!("cannot read {}", path.display()));
                }
            };
            kh.parse(path, &text);
        }
        Ok(kh)
    }

    fn parse(&mut self, path: &Path, text: &str) {
        for (i, line) in text.lines().enumerate() {
            let mut words = line.split_whitespace();
            let Some(mut first) = words.next() else {
                continue;
            };
            if first.starts_with('#') {
                continue;
            }
            let marker = match first {
                "@revoked" => Marker::Revoked,
                "@cert-authority" => Marker::CertAuthority,
                _ => Marker::None,
            };
            if marker != Marker::None {
                let Some(next) = words.next() else { continue };
                first = next;
            }
            let (Some(kind), Some(b64)) = (words.next(), words.next()) else {
                continue;
            };
            // Unparseable keys (unsupported types) are skipped, as ssh does.
            let Ok(key) = PublicKey::from_openssh(&format!("{kind} {b64}")) else {
                continue;
            };
            self.entries.push(Entry {
                path: path.to_path_buf(),
                line: i + 1,
                marker,
                hosts: first.to_string(),
                key,
            });
        }
    }

    fn entries_for<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Entry> + 'a {
        self.entries
            .iter()
            .filter(move |e| hosts_field_matches(&e.hosts, name))
    }

    /// Check `key` as presented by the host known as `name` (see [`host_key_name`]).
    pub fn check(&self, name: &str, key: &PublicKey) -> Verdict {
        let mut changed = None;
        for e in self.entries_for(name) {
            let same = e.key.key_data() == key.key_data();
            match e.marker {
                Marker::Revoked if same => {
                    return Verdict::Revoked {
                        path: e.path.clone(),
                        line: e.line,
                    };
                }
                Marker::None if same => return Verdict::Known,
                Marker::None if e.key.algorithm() == key.algorithm() && changed.is_none() => {
                    changed = Some((e.path.clone(), e.line));
                }
                _ => {}
            }
        }
        match changed {
            Some((path, line)) => Verdict::Changed { path, line },
            None => Verdict::Unknown,
        }
    }

    /// Key types recorded for this host, so that they are negotiated first
    /// (as OpenSSH orders HostKeyAlgorithms): otherwise a host known by its
    /// RSA key could present its Ed25519 key and look unknown.
    pub fn known_algorithms(&self, name: &str) -> Vec<Algorithm> {
        let mut algs = Vec::new();
        for e in self.entries_for(name) {
            if e.marker != Marker::None {
                continue;
            }
            let alg = e.key.algorithm();
            let expanded = if matches!(alg, Algorithm::Rsa { .. }) {
                vec![
                    Algorithm::Rsa {
                        hash: Some(HashAlg::Sha512),
                    },
                    Algorithm::Rsa {
                        hash: Some(HashAlg::Sha256),
                    },
                ]
            } else {
                vec![alg]
            };
            for a in expanded {
                if !algs.contains(&a) {
                    algs.push(a);
                }
            }
        }
        algs
    }

    pub fn has_cert_authority_for(&self, name: &str) -> bool {
        self.entries_for(name)
            .any(|e| e.marker == Marker::CertAuthority)
    }
}

/// One known_hosts host field: a hashed name or a pattern list.
fn hosts_field_matches(field: &str, name: &str) -> bool {
    if let Some(rest) = field.strip_prefix("|1|") {
        let Some((salt, hash)) = rest.split_once('|') else {
            return false;
        };
        let (Ok(salt), Ok(hash)) = (B64.decode(salt), B64.decode(hash)) else {
            return false;
        };
        let Ok(mut mac) = <Hmac<Sha1> as KeyInit>::new_from_slice(&salt) else {
            return false;
        };
        mac.update(name.as_bytes());
        return mac.verify_slice(&hash).is_ok();
    }
    let mut matched = false;
    for p in field.split(',') {
        let p = p.to_ascii_lowercase();
        if let Some(neg) = p.strip_prefix('!') {
            if pattern_matches(neg, name) {
                return false;
            }
        } else if pattern_matches(&p, name) {
            matched = true;
        }
    }
    matched
}

/// `host` in a known_hosts pattern also matches `[host]:22`, and a
/// bracketed pattern may carry wildcards in the host part.
fn pattern_matches(pattern: &str, name: &str) -> bool {
    wildcard_match(pattern, name)
}

/// Append `name key` to a known_hosts file, creating it (0600) if needed.
pub fn record(path: &Path, name: &str, key: &PublicKey) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let line = format!(
        "{name} {}\n",
        key.to_openssh().context("cannot encode the host key")?
    );
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot open {} to record the host key", path.display()))?;
    f.write_all(line.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))
}

pub fn fingerprint(key: &PublicKey) -> String {
    key.fingerprint(HashAlg::Sha256).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const ED: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAICtzuO8adwBZr4kPYiGK/Yzmomp+rl3o1gPhaA2sqr3W";
    const ED2: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFJLRfbuKHF7zCepxlvFGvZmjhGGU+lFcw6XS0twNo1R";

    fn key(s: &str) -> PublicKey {
        PublicKey::from_openssh(s).unwrap()
    }

    fn kh(text: &str) -> KnownHosts {
        let mut k = KnownHosts::default();
        k.parse(Path::new("/kh"), text);
        k
    }

    #[test]
    fn plain_bracketed_and_wildcard_entries() {
        let k = kh(&format!(
            "# comment\nvps.example.org,203.0.113.7 {ED}\n[127.0.0.1]:2222\t{ED}\n*.lan,!db.lan {ED}\n"
        ));
        assert_eq!(k.check("vps.example.org", &key(ED)), Verdict::Known);
        assert_eq!(k.check("203.0.113.7", &key(ED)), Verdict::Known);
        assert_eq!(
            k.check(&host_key_name("127.0.0.1", 2222), &key(ED)),
            Verdict::Known
        );
        assert_eq!(
            k.check(&host_key_name("127.0.0.1", 22), &key(ED)),
            Verdict::Unknown
        );
        assert_eq!(k.check("web.lan", &key(ED)), Verdict::Known);
        assert_eq!(k.check("db.lan", &key(ED)), Verdict::Unknown);
    }

    #[test]
    fn changed_and_revoked_keys_are_reported_with_their_line() {
        let k = kh(&format!("vps {ED}\n@revoked * {ED2}\n"));
        assert_eq!(
            k.check("vps", &key(ED2)),
            Verdict::Revoked {
                path: "/kh".into(),
                line: 2
            }
        );
        let k = kh(&format!("vps {ED}\n"));
        assert_eq!(
            k.check("vps", &key(ED2)),
            Verdict::Changed {
                path: "/kh".into(),
                line: 1
            }
        );
    }

    #[test]
    fn hashed_entries_match() {
        // The |1|salt|hash form ssh-keygen -H writes: HMAC-SHA1(salt, name).
        let salt = B64.encode(b"0123456789abcdefghij");
        let mut mac = <Hmac<Sha1> as KeyInit>::new_from_slice(b"0123456789abcdefghij").unwrap();
        mac.update(b"[127.0.0.1]:2222");
        let hash = B64.encode(mac.finalize().into_bytes());
        let k = kh(&format!("|1|{salt}|{hash} {ED}\n"));
        assert_eq!(k.check("[127.0.0.1]:2222", &key(ED)), Verdict::Known);
        assert_eq!(k.check("[127.0.0.1]:2223", &key(ED)), Verdict::Unknown);
    }

    #[test]
    fn known_algorithms_come_first() {
        let k = kh(&format!("vps {ED}\n"));
        assert_eq!(k.known_algorithms("vps"), vec![Algorithm::Ed25519]);
        assert!(k.known_algorithms("other").is_empty());
    }
}
