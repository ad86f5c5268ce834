//! Defaults from a file and from the environment, for people who always
//! use the same key, memory or transfer mode. Flags win over `DRYDOCK_*`
//! variables, which win over `$XDG_CONFIG_HOME/drydock/config.toml` (else
//! `~/.config/drydock/config.toml`):
//!
//! ```toml
//! identity = "~/.ssh/vps_ed25519"   # -i / DRYDOCK_IDENTITY
//! memory = "8G"                     # --memory of boot and upgrade / DRYDOCK_MEMORY
//! cpus = 4                          # --cpus / DRYDOCK_CPUS
//! transfer = "dd"                   # --transfer / DRYDOCK_TRANSFER
//! state_dir = "/srv/drydock"        # runs and boots / DRYDOCK_STATE_DIR
//! ```
//!
//! The file is read before the command line is parsed: each key whose
//! variable is not set becomes that variable, and clap reads the variables
//! (`env = ...` on the flags), so the order of precedence is clap's.

use std::path::PathBuf;

use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    identity: Option<String>,
    memory: Option<String>,
    cpus: Option<u32>,
    transfer: Option<String>,
    state_dir: Option<String>,
}

/// `$XDG_CONFIG_HOME/drydock/config.toml`, else `~/.config/drydock/config.toml`.
pub fn path() -> Option<PathBuf> {
    std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| std::env::home_dir().map(|h| h.join(".config")))
        .map(|c| c.join("drydock/config.toml"))
}

/// `~/` at the start of a path from the file, as a shell would.
fn expand(s: &str) -> String {
    match (s.strip_prefix("~/"), std::env::home_dir()) {
        (Some(rest), Some(home)) => home.join(rest).display().to_string(),
        _ => s.to_string(),
    }
}

/// Read the file (if there is one) into the variables that are not set.
/// Call before any thread starts. An error names the file and what is
/// wrong in it (a usage error: exit 2).
pub fn load_into_env() -> Result<(), String> {
    let Some(p) = path() else { return Ok(()) };
    let text = match std::fs::read_to_string(&p) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(format!("cannot read {}: {e}", p.display())),
    };
    let f: File = toml::from_str(&text).map_err(|e| {
        format!(
            "{} is not a drydock config: {}; its keys are identity, memory, cpus, transfer, \
             state_dir",
            p.display(),
            e.to_string().trim().replace('\n', " ")
        )
    })?;
    for (var, value) in [
        ("DRYDOCK_IDENTITY", f.identity.map(|s| expand(&s))),
        ("DRYDOCK_MEMORY", f.memory),
        ("DRYDOCK_CPUS", f.cpus.map(|c| c.to_string())),
        ("DRYDOCK_TRANSFER", f.transfer),
        ("DRYDOCK_STATE_DIR", f.state_dir.map(|s| expand(&s))),
    ] {
        if let Some(v) = value
            && std::env::var_os(var).is_none()
        {
            // SAFETY: called from main before the runtime, the reporter or
            // any other thread exists.
            unsafe { std::env::set_var(var, v) };
        }
    }
    Ok(())
}
