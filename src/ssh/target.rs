//! Who to connect to: `[user@]host[:port]` as typed, resolved through
//! `~/.ssh/config` and `/etc/ssh/ssh_config` the way OpenSSH resolves it.
//!
//! The config parser is our own: the one in `russh-config` skips lines whose
//! key and value are separated by a tab or by `=`, both common in real
//! configs, and would silently connect to the wrong place.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::errors::usage;

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
    /// `[user@]host[:port]`, with `[v6addr]:port` for IPv6, or
    /// `ssh://[user@]host[:port]` as OpenSSH takes it. scp's `host:/path`
    /// is refused with what to type instead. Errors are usage errors.
    pub fn parse(s: &str) -> Result<HostSpec> {
        let uri = s.strip_prefix("ssh://");
        let body = match uri {
            Some(b) => b.strip_suffix('/').unwrap_or(b),
            None => s,
        };
        if uri.is_some() && body.contains('/') {
            return Err(usage!(
                "'{s}': an ssh:// address names no path; the disk is named with --device"
            ));
        }
        if let Some((host, path)) = body.rsplit_once(':')
            && path.starts_with('/')
        {
            return Err(usage!(
                "'{s}' looks like scp's host:path; drydock takes the host alone and the disk \
                 with --device: `{host} --device {path}`"
            ));
        }
        let (user, rest) = match body.rsplit_once('@') {
            Some((u, r)) if !u.is_empty() => (Some(u.to_string()), r),
            Some(_) => return Err(usage!("'{s}' has an empty user name before '@'")),
            None => (None, body),
        };
        let (host, port) = if let Some(inner) = rest.strip_prefix('[') {
            let (h, after) = inner
                .split_once(']')
                .ok_or_else(|| usage!("'{s}' opens '[' without closing it"))?;
            let port = match after.strip_prefix(':') {
                Some(p) => Some(parse_port(p, s)?),
                None if after.is_empty() => None,
                None => return Err(usage!("'{s}': expected ':PORT' after ']'")),
            };
            (h.to_string(), port)
        } else if rest.matches(':').count() == 1 {
            let (h, p) = rest.split_once(':').expect("one colon");
            (h.to_string(), Some(parse_port(p, s)?))
        } else {
            (rest.to_string(), None)
        };
        if host.is_empty() {
            return Err(usage!("'{s}' names no host: expected [user@]host[:port]"));
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
        .ok_or_else(|| usage!("'{whole}': '{p}' is not a port number (1-65535)"))
}

/// The ssh_config keys `-o Key=Value` may set: those drydock honours.
/// StrictHostKeyChecking is taken apart (see [`SshArgs::options_lines`]).
const OPTION_KEYS: [&str; 9] = [
    "User",
    "HostName",
    "Port",
    "IdentityFile",
    "UserKnownHostsFile",
    "GlobalKnownHostsFile",
    "HostKeyAlias",
    "ProxyJump",
    "StrictHostKeyChecking",
];

/// How to reach a host, as the command line said it: the host, `-F`, and
/// the `-o Key=Value` options (with `-p` and `-J` among them as `Port` and
/// `ProxyJump`). A run's journal keeps it, so `resume` reaches the same way.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SshArgs {
    /// `-F`: this file instead of ~/.ssh/config and /etc/ssh/ssh_config.
    #[serde(default)]
    pub config: Option<PathBuf>,
    /// `Key=Value`, in the order given: ahead of the config files, so they
    /// win (the first value of a key wins, as in OpenSSH).
    #[serde(default)]
    pub options: Vec<String>,
}

impl SshArgs {
    /// Check each `-o` (a key drydock honours, `Key=Value` or `Key Value`)
    /// and take StrictHostKeyChecking apart: `accept-new` is
    /// --accept-new-host-key (returned), `yes`/`ask` the default, `no`
    /// refused. Usage errors name what is honoured.
    pub fn checked(config: Option<PathBuf>, options: Vec<String>) -> Result<(SshArgs, bool)> {
        let mut kept = Vec::new();
        let mut accept_new = false;
        for o in options {
            let Some((key, value)) = split_directive(&o).filter(|(_, v)| !v.is_empty()) else {
                return Err(usage!("-o '{o}': expected Key=Value, as for ssh"));
            };
            let Some(known) = OPTION_KEYS.iter().find(|k| k.eq_ignore_ascii_case(key)) else {
                return Err(usage!(
                    "-o {key}: drydock does not use this ssh option; it honours {}",
                    OPTION_KEYS.join(", ")
                ));
            };
            if *known == "StrictHostKeyChecking" {
                match value.to_ascii_lowercase().as_str() {
                    "accept-new" => accept_new = true,
                    "yes" | "ask" => {}
                    _ => {
                        return Err(usage!(
                            "-o StrictHostKeyChecking={value}: drydock always checks host keys; \
                             `accept-new` (or --accept-new-host-key) records a new one"
                        ));
                    }
                }
                continue;
            }
            kept.push(format!("{known} {value}"));
        }
        if let Some(c) = &config
            && !c.is_file()
        {
            return Err(usage!("-F {}: no such file", c.display()));
        }
        Ok((
            SshArgs {
                config,
                options: kept,
            },
            accept_new,
        ))
    }

    /// The options as config lines, ahead of every `Host` block.
    fn options_lines(&self) -> String {
        let mut s = String::new();
        for o in &self.options {
            s.push_str(o);
            s.push('\n');
        }
        s
    }
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
    /// ProxyCommand, which drydock does not run (it refuses rather than
    /// connect directly to a host the user reaches otherwise).
    pub proxy_command: Option<String>,
    /// ProxyJump's hosts, resolved, in the order they are gone through
    /// (their own ProxyJump is not followed: the chain is this list).
    pub jumps: Vec<Target>,
    /// ProxyJump as configured, until [`Target::resolve_with`] resolves it.
    pub jump_chain: Option<String>,
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

    /// Resolve what the user typed through the command line's options and
    /// the ssh config files (`-F`'s alone when given, as OpenSSH does).
    pub fn resolve(spec: &HostSpec, args: &SshArgs) -> Result<Target> {
        let home = std::env::home_dir().context("cannot find the home directory ($HOME)")?;
        let mut text = args.options_lines();
        let files = match &args.config {
            Some(f) => vec![f.clone()],
            None => vec![
                home.join(".ssh/config"),
                PathBuf::from("/etc/ssh/ssh_config"),
            ],
        };
        for path in files {
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
        Self::resolve_with(spec, &text, &home)
    }

    /// Resolve against config text already read (and testable without
    /// files), with its ProxyJump hosts.
    pub fn resolve_with(spec: &HostSpec, config: &str, home: &Path) -> Result<Target> {
        let mut t = Self::resolve_one(spec, config, home);
        if let Some(chain) = t.jump_chain.take() {
            for hop in chain.split(',').map(str::trim).filter(|h| !h.is_empty()) {
                let hop = hop.strip_prefix("ssh://").unwrap_or(hop);
                let mut h = Self::resolve_one(&HostSpec::parse(hop)?, config, home);
                h.jump_chain = None;
                t.jumps.push(h);
            }
        }
        Ok(t)
    }

    fn resolve_one(spec: &HostSpec, config: &str, home: &Path) -> Target {
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
            proxy_command: opts.proxy_command,
            jumps: Vec::new(),
            jump_chain: opts.proxy_jump,
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
    proxy_command: Option<String>,
    proxy_jump: Option<String>,
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
                // The first of the two wins, as in OpenSSH; "none" is a
                // value that says there is none.
                "proxyjump" | "proxycommand"
                    if o.proxy_jump.is_none() && o.proxy_command.is_none() =>
                {
                    if v.eq_ignore_ascii_case("none") {
                        o.proxy_jump = Some(String::new());
                    } else if key == "proxyjump" {
                        o.proxy_jump = Some(v);
                    } else {
                        o.proxy_command = Some(v);
                    }
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
        let s = HostSpec::parse("ssh://admin@vps.example.org:2222/").unwrap();
        assert_eq!(
            (s.user.as_deref(), s.host.as_str(), s.port),
            (Some("admin"), "vps.example.org", Some(2222))
        );
        assert_eq!(s.typed, "ssh://admin@vps.example.org:2222/");
        let s = HostSpec::parse("ssh://[::1]:2200").unwrap();
        assert_eq!((s.host.as_str(), s.port), ("::1", Some(2200)));
        assert!(HostSpec::parse("vps:/dev/vda").is_err());
        assert!(HostSpec::parse("@host").is_err());
        assert!(HostSpec::parse("root@").is_err());
    }

    #[test]
    fn hints_write_the_host_as_typed() {
        let home = Path::new("/home/u");
        let t = |s: &str| {
            Target::resolve_with(&HostSpec::parse(s).unwrap(), "", home)
                .unwrap()
                .typed_arg()
        };
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
        let t = Target::resolve_with(&HostSpec::parse("vps").unwrap(), cfg, home).unwrap();
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
        let t = Target::resolve_with(&HostSpec::parse("root@vps:22").unwrap(), cfg, home).unwrap();
        assert_eq!((t.user.as_str(), t.port), ("root", 22));
        // Another host only sees the wildcard block.
        let t = Target::resolve_with(&HostSpec::parse("other").unwrap(), cfg, home).unwrap();
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
