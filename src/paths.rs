//! Where drydock keeps what it writes on the workstation, in one place:
//! `$XDG_STATE_HOME/drydock` (else `~/.local/state/drydock`) holds the runs
//! (`runs/`) and the VMs of `drydock boot` (`boots/`).
//!
//! The folder names are built here only, from the state folder: the boots
//! folder was once built from this folder plus another `drydock`, giving
//! `drydock/drydock/boots`.

use std::ffi::OsString;
use std::path::PathBuf;

use anyhow::{Context, Result};

/// `$DRYDOCK_STATE_DIR` (or `state_dir` in the config file), else
/// `$XDG_STATE_HOME/drydock`, else `~/.local/state/drydock`.
pub fn state_dir() -> Result<PathBuf> {
    if let Some(d) = std::env::var_os("DRYDOCK_STATE_DIR").map(PathBuf::from)
        && d.is_absolute()
    {
        return Ok(d);
    }
    state_dir_from(std::env::var_os("XDG_STATE_HOME"), std::env::home_dir())
}

/// Where runs live: `$XDG_STATE_HOME/drydock/runs`.
pub fn runs_dir() -> Result<PathBuf> {
    Ok(state_dir()?.join("runs"))
}

/// Where `drydock boot` keeps its VMs: `$XDG_STATE_HOME/drydock/boots`.
pub fn boots_dir() -> Result<PathBuf> {
    Ok(state_dir()?.join("boots"))
}

/// Where backups live by default: `$XDG_DATA_HOME/drydock/backups` (else
/// `~/.local/share/drydock/backups`), a store per host. Backups are data
/// a user keeps, not state: the XDG specification's data folder.
pub fn backups_dir() -> Result<PathBuf> {
    let data = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| std::env::home_dir().map(|h| h.join(".local/share")))
        .context("cannot find a data folder: set $XDG_DATA_HOME or $HOME, or give --store")?;
    Ok(data.join("drydock").join("backups"))
}

/// Make DIR (and its parents) if needed, readable by its owner only: it
/// holds disk images.
pub fn private_dir(dir: &std::path::Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot make {}", dir.display()))
}

/// The state folder from `$XDG_STATE_HOME` and the home folder. An empty
/// or relative XDG_STATE_HOME is ignored, as the XDG base directory
/// specification says.
fn state_dir_from(xdg_state_home: Option<OsString>, home: Option<PathBuf>) -> Result<PathBuf> {
    let state = xdg_state_home
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| home.map(|h| h.join(".local/state")))
        .context("cannot find a state folder: set $XDG_STATE_HOME or $HOME")?;
    Ok(state.join("drydock"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_state_folder_is_xdg_state_home_then_the_home_folder() {
        let home = Some(PathBuf::from("/home/u"));
        assert_eq!(
            state_dir_from(Some("/s".into()), home.clone()).unwrap(),
            PathBuf::from("/s/drydock")
        );
        assert_eq!(
            state_dir_from(None, home.clone()).unwrap(),
            PathBuf::from("/home/u/.local/state/drydock")
        );
        // Relative or empty: not a base directory (XDG spec), the home's.
        for bad in ["", "state"] {
            assert_eq!(
                state_dir_from(Some(bad.into()), home.clone()).unwrap(),
                PathBuf::from("/home/u/.local/state/drydock")
            );
        }
        let e = state_dir_from(None, None).unwrap_err();
        assert_eq!(
            e.to_string(),
            "cannot find a state folder: set $XDG_STATE_HOME or $HOME"
        );
    }
}
