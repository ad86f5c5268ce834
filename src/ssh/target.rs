//! Who to connect to: `[user@]host[:port]` as typed, resolved through
//! `~/.ssh/config` and `/etc/ssh/ssh_config` the way OpenSSH resolves it.
//!
//! The config parser is our own: the one in `russh-config` skips lines whose
//! key and value are separated by a tab or by `=`, both common in real
//! configs, and would silently connect to the wrong place.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

/// The host as the user typed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostSpec {
    /// The whole argument, exactly as typed (for hints that name a command).
    pub typed: String,
    pub user: Option<String>,
    pub host: String,
    pub port: Option<u16>,
}

impl HostSpec {
    /// `[user@]host[:port]`, with `[v6addr]:port` for IPv6.
    pub fn parse(s: &str) -> Result<HostSpec> {
        let (user, rest) = match s.rsplit_once('@') {
            Some((u, r)) if !u.is_empty() => (Some(u.to_string()), r),
            Some(_) => bail!("'{s}' has an empty user name before '@'"),
            None => (None, s),
        };
        let (host, port) = if let Some(inner) = rest.strip_prefix('[') {
            let (h, after) = inner
                .split_once(']')
                .with_context(|| format!("'{s}' opens '[' without closing it"))?;
            let port = match after.strip_prefix(':') {
                Some(p) => Some(parse_port(p, s)?),
                None if after.is_empty() => None,
                None => bail!("'{s}': expected ':PORT' after ']'"),
            };
            (h.to_string(), port)
        } else if rest.matches(':').count() == 1 {
            let (h, p) = rest.split_once(':').expect("one colon");
            (h.to_string(), Some(parse_port(p, s)?))
        } else {
            (rest.to_string(), None)
        };
        if host.is_empty() {
            bail!("'{s}' names no host: expected [user@]host[:port]");
        }
        Ok(HostSpec {
            typed: s.to_string(),
            user,
            host,
            port,
        })
    }
}

fn parse_port(p: &str, whole: &str) -> Result<u16> {
    p.parse::<u16>()
        .ok()
        .filter(|&p| p != 0)
        .with_context(|| format!("'{whole}': '{p}' is not a port number (1-65535)"))
}

/// Where and as whom drydock connects, after `ssh_config` is applied.
#[derive(Debug, Clone)]
pub struct Target {
    /// The host part of what the user typed (an alias, maybe): used in messages.
    pub alias: String,
    /// The whole argument as typed (`root@vps:2222`, `myalias`): what a
    /// hint naming a drydock command writes, so that it reaches this host.
    pub typed: String,
    /// The address to connect to and to look up in known_hosts.
    pub hostname: String,
    pub port: u16,
    pub user: String,
    /// IdentityFile entries, in order, `~` expanded.
    pub identity_files: Vec<PathBuf>,
    /// UserKnownHostsFile entries, `~` expanded.
    pub user_known_hosts: Vec<PathBuf>,
    pub global_known_hosts: Vec<PathBuf>,
    /// HostKeyAlias: the name known_hosts entries are looked up under.
    pub host_key_alias: Option<String>,
    /// ProxyJump / ProxyCommand, which drydock does not follow (it refuses
    /// rather than connect directly to a host the user reaches otherwise).
    pub proxy: Option<String>,
}

impl Target {
    /// `user@host:port`, for messages.
    pub fn display(&self) -> String {
        if self.port == 22 {
            format!("{}@{}", self.user, self.alias)
        } else {
            format!("{}@{}:{}", self.user, self.alias, self.port)
        }
    }

    /// The host as typed, quoted for a shell if it needs it: what hints
    /// such as "run `drydock thaw HOST`" write.
    pub fn typed_arg(&self) -> String {
        let plain = |c: char| c.is_ascii_alphanumeric() || "@%+=:,./_-".contains(c);
        if !self.typed.is_empty() && self.typed.chars().all(plain) {
            self.typed.clone()
        } else {
            crate::ssh::shell_quote(&self.typed)
        }
    }

    /// Resolve what the user typed through the ssh config files.
    pub fn resolve(spec: &HostSpec) -> Result<Target> {
        let home = std::env::home_dir().context("cannot find the home directory ($HOME)")?;
        let mut text = String::new();
        for path in [
            home.join(".ssh/config"),
            PathBuf::from("/etc/ssh/ssh_config"),
        ] {
            match std::fs::read_to_string(&path) {
                Ok(t) => {
                    text.push_str(&expand_includes(&t, &path, &home, 0));
                    text.push('\n');
                    // A new file starts a fresh "Host *" context, as in OpenSSH.
                    text.push_str("Host *\n");
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
            }
        }
        Ok(Self::resolve_with(spec, &text, &home))
    }

    /// Resolve against config text already read (and testable without files).
    pub fn resolve_with(spec: &HostSpec, config: &str, home: &Path) -> Target {
        let opts = SshOptions::lookup(config, &spec.host);
        let expand = |s: &str| expand_tilde(s, home);
        let user = spec
            .user
            .clone()
            .or(opts.user)
            .or_else(|| std::env::var("USER").ok())
            .unwrap_or_else(|| "root".to_string());
        let hostname = opts
            .hostname
            .map(|h| h.replace("%h", &spec.host))
            .unwrap_or_else(|| spec.host.clone());
        let port = spec.port.or(opts.port).unwrap_or(22);
        let identity_files = opts.identity_files.iter().map(|s| expand(s)).collect();
        let user_known_hosts = if opts.user_known_hosts.is_empty() {
            vec![
                home.join(".ssh/known_hosts"),
                home.join(".ssh/known_hosts2"),
            ]
        } else {
            opts.user_known_hosts.iter().map(|s| expand(s)).collect()
        };
        let global_known_hosts = if opts.global_known_hosts.is_empty() {
            vec![
                PathBuf::from("/etc/ssh/ssh_known_hosts"),
                PathBuf::from("/etc/ssh/ssh_known_hosts2"),
            ]
        } else {
            opts.global_known_hosts.iter().map(|s| expand(s)).collect()
        };
        Target {
            alias: spec.host.clone(),
            typed: spec.typed.clone(),
            hostname,
            port,
            user,
            identity_files,
            user_known_hosts,
            global_known_hosts,
            host_key_alias: opts.host_key_alias,
            proxy: opts.proxy,
        }
    }
}

fn expand_tilde(s: &str, home: &Path) -> PathBuf {
    match s.strip_prefix("~/") {
        Some(rest) => home.join(rest),
        None if s == "~" => home.to_path_buf(),
        None => PathBuf::from(s),
    }
}

/// Inline `Include` directives (plain paths and `*` globs in the last
/// component), relative to ~/.ssh for the user file and /etc/ssh otherwise.
fn expand_includes(text: &str, file: &Path, home: &Path, depth: u32) -> String {
    let mut out = String::new();
    let base = file.parent().unwrap_or(Path::new("/"));
    for line in text.lines() {
        let Some((key, value)) = split_directive(line) else {
            out.push_str(line);
            out.push('\n');
            continue;
        };
        if !key.eq_ignore_ascii_case("include") || depth > 8 {
            out.push_str(line);
            out.push('\n');
            continue;
        }
        for word in value.split_whitespace() {
            let path = expand_tilde(word.trim_matches('"'), home);
            let path = if path.is_absolute() {
                path
            } else {
                base.join(path)
            };
            for p in glob_last_component(&path) {
                if let Ok(t) = std::fs::read_to_string(&p) {
                    out.push_str(&expand_includes(&t, &p, home, depth + 1));
                    out.push('\n');
                }
            }
        }
    }
    out
}

fn glob_last_component(path: &Path) -> Vec<PathBuf> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
    match (name, path.parent()) {
        (Some(name), Some(dir)) if name.contains('*') || name.contains('?') => {
            let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
                .into_iter()
                .flatten()
                .flatten()
                .filter(|e| wildcard_match(&name, &e.file_name().to_string_lossy()))
                .map(|e| e.path())
                .collect();
            found.sort();
            found
        }
        _ => vec![path.to_path_buf()],
    }
}

/// `Key value`, `Key=value` or `Key = value`; None for blanks and comments.
fn split_directive(line: &str) -> Option<(&str, &str)> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let end = line
        .find(|c: char| c.is_whitespace() || c == '=')
        .unwrap_or(line.len());
    let (key, rest) = line.split_at(end);
    let rest = rest.trim_start();
    let rest = rest.strip_prefix('=').unwrap_or(rest).trim();
    Some((key, rest))
}

/// The options drydock honours, first value wins as in OpenSSH.
#[derive(Debug, Default)]
struct SshOptions {
    user: Option<String>,
    hostname: Option<String>,
    port: Option<u16>,
    identity_files: Vec<String>,
    user_known_hosts: Vec<String>,
    global_known_hosts: Vec<String>,
    host_key_alias: Option<String>,
    proxy: Option<String>,
}

impl SshOptions {
    fn lookup(config: &str, host: &str) -> SshOptions {
        let mut o = SshOptions::default();
        let mut active = true;
        for line in config.lines() {
            let Some((key, value)) = split_directive(line) else {
                continue;
            };
            let key = key.to_ascii_lowercase();
            match key.as_str() {
                "host" => {
                    active = host_patterns_match(value, host);
                    continue;
                }
                // Only the unconditional form is understood; other Match
                // blocks are skipped rather than guessed at.
                "match" => {
                    active = value.trim().eq_ignore_ascii_case("all");
                    continue;
                }
                _ => {}
            }
            if !active {
                continue;
            }
            let v = value.trim_matches('"').to_string();
            match key.as_str() {
                "user" if o.user.is_none() => o.user = Some(v),
                "hostname" if o.hostname.is_none() => o.hostname = Some(v),
                "port" if o.port.is_none() => o.port = v.parse().ok(),
                "identityfile" => o.identity_files.push(v),
                "userknownhostsfile" if o.user_known_hosts.is_empty() => {
                    o.user_known_hosts = value.split_whitespace().map(str::to_string).collect()
                }
                "globalknownhostsfile" if o.global_known_hosts.is_empty() => {
                    o.global_known_hosts = value.split_whitespace().map(str::to_string).collect()
                }
                "hostkeyalias" if o.host_key_alias.is_none() => o.host_key_alias = Some(v),
                "proxyjump" | "proxycommand"
                    if o.proxy.is_none() && !v.eq_ignore_ascii_case("none") =>
                {
                    o.proxy = Some(format!("{key} {v}"))
                }
                _ => {}
            }
        }
        o
    }
}

/// A `Host` line's pattern list: any positive match, and no negated one.
pub fn host_patterns_match(patterns: &str, host: &str) -> bool {
    let host = host.to_ascii_lowercase();
    let mut matched = false;
    for p in patterns.split(|c: char| c.is_whitespace() || c == ',') {
        if p.is_empty() {
            continue;
        }
        let p = p.to_ascii_lowercase();
        if let Some(neg) = p.strip_prefix('!') {
            if wildcard_match(neg, &host) {
                return false;
            }
        } else if wildcard_match(&p, &host) {
            matched = true;
        }
    }
    matched
}

/// OpenSSH's `*` and `?` patterns.
pub fn wildcard_match(pattern: &str, s: &str) -> bool {
    fn go(p: &[u8], s: &[u8]) -> bool {
        match p.split_first() {
            None => s.is_empty(),
            Some((b'*', rest)) => (0..=s.len()).any(|i| go(rest, &s[i..])),
            Some((b'?', rest)) => !s.is_empty() && go(rest, &s[1..]),
            Some((c, rest)) => s.first() == Some(c) && go(rest, &s[1..]),
        }
    }
    go(pattern.as_bytes(), s.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_host_specs() {
        let s = HostSpec::parse("root@vps.example.org:2222").unwrap();
        assert_eq!(s.user.as_deref(), Some("root"));
        assert_eq!(s.host, "vps.example.org");
        assert_eq!(s.port, Some(2222));
        let s = HostSpec::parse("[::1]:22").unwrap();
        assert_eq!((s.host.as_str(), s.port), ("::1", Some(22)));
        let s = HostSpec::parse("fe80::1").unwrap();
        assert_eq!((s.host.as_str(), s.port), ("fe80::1", None));
        let s = HostSpec::parse("myalias").unwrap();
        assert_eq!((s.user, s.host.as_str(), s.port), (None, "myalias", None));
        let e = HostSpec::parse("root@host:http").unwrap_err().to_string();
        assert_eq!(e, "'root@host:http': 'http' is not a port number (1-65535)");
        assert!(HostSpec::parse("@host").is_err());
        assert!(HostSpec::parse("root@").is_err());
    }

    #[test]
    fn hints_write_the_host_as_typed() {
        let home = Path::new("/home/u");
        let t = |s: &str| Target::resolve_with(&HostSpec::parse(s).unwrap(), "", home).typed_arg();
        assert_eq!(t("root@vps.example.org:2222"), "root@vps.example.org:2222");
        assert_eq!(t("myalias"), "myalias");
        assert_eq!(t("[::1]:2222"), "'[::1]:2222'");
    }

    #[test]
    fn config_first_value_wins_and_tabs_and_equals_work() {
        let cfg = "\
Host vps
\tHostName 203.0.113.7
\tPort=2200
  User = admin
  IdentityFile ~/.ssh/vps_key
Host *
  User nobody
  Port 22
  IdentityFile ~/.ssh/id_other
";
        let home = Path::new("/home/u");
        let t = Target::resolve_with(&HostSpec::parse("vps").unwrap(), cfg, home);
        assert_eq!(t.hostname, "203.0.113.7");
        assert_eq!(t.port, 2200);
        assert_eq!(t.user, "admin");
        assert_eq!(
            t.identity_files,
            vec![
                PathBuf::from("/home/u/.ssh/vps_key"),
                PathBuf::from("/home/u/.ssh/id_other")
            ]
        );
        // What is typed wins over the config.
        let t = Target::resolve_with(&HostSpec::parse("root@vps:22").unwrap(), cfg, home);
        assert_eq!((t.user.as_str(), t.port), ("root", 22));
        // Another host only sees the wildcard block.
        let t = Target::resolve_with(&HostSpec::parse("other").unwrap(), cfg, home);
        assert_eq!((t.hostname.as_str(), t.user.as_str()), ("other", "nobody"));
    }

    #[test]
    fn negated_patterns_exclude() {
        assert!(host_patterns_match(
            "*.example.org !db.example.org",
            "web.example.org"
        ));
        assert!(!host_patterns_match(
            "*.example.org !db.example.org",
            "db.example.org"
        ));
        assert!(host_patterns_match("10.0.0.?", "10.0.0.7"));
        assert!(!host_patterns_match("10.0.0.?", "10.0.0.17"));
    }
}
