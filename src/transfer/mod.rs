//! Moving a disk between the VPS and a local image.

pub mod pull;
pub mod push;
pub mod writer;

use std::path::Path;

use anyhow::{Context, Result};

use crate::refused;
use crate::ui::human_bytes;

/// Now, as RFC 3339 UTC.
pub fn now() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// Refuse before starting when the image's folder cannot hold `need` bytes.
pub fn check_local_space(image: &Path, need: u64) -> Result<()> {
    let dir = match image.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => std::env::current_dir()?,
    };
    let st = rustix::fs::statvfs(&dir)
        .with_context(|| format!("cannot tell the free space of {}", dir.display()))?;
    let avail = st.f_bavail * st.f_frsize;
    if avail < need {
        return Err(refused!(
            "not enough local space in {}: the image needs up to {} and {} is free; \
             free some space or choose another place with -o",
            dir.display(),
            human_bytes(need),
            human_bytes(avail)
        ));
    }
    Ok(())
}
