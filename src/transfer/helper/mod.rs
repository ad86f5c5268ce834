//! Helper mode: drydock's own static executable (helper/) on the VPS,
//! speaking the framed protocol of [`drydock_helper::proto`].
//!
//! The helper is copied to a tmpfs mounted for it, run with `exec` over the
//! SSH exec channel, and removed afterwards. A pull asks it for blocks:
//! zero blocks come as a count, the others zstd-compressed with the
//! SHA-256 it computed while reading. A push asks it for the hashes of the
//! blocks that changed (and of their 4 KiB pages), then sends only the
//! pages that differ; the helper checks each range's hash before writing,
//! writes it with O_DIRECT and reads it back.

mod feed;
mod install;
pub mod level;
mod link;
mod plan;
#[cfg(test)]
mod tests;

pub use feed::*;
pub use install::*;
pub use link::*;
pub use plan::*;

use anyhow::Result;
use serde::Serialize;

use crate::remote::Facts;

/// The helper built for x86_64 with a static C library (build.rs).
pub static BINARY: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/drydock-helper"));

/// BINARY gzip'd (build.rs): what is sent to a host that has gzip.
pub static BINARY_GZ: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/drydock-helper.gz"));

/// zstd level for pulls (whole disks: speed matters), and the level a
/// push starts at (a few hundred MiB of changes over a slow uplink: size
/// matters; `level::LevelControl` moves it with what the link allows).
pub const PULL_LEVEL: i32 = 1;

pub const PUSH_LEVEL: i32 = 3;

/// How a transfer moves data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// The helper when the host can run it, dd otherwise.
    Auto,
    /// Standard tools on the host (sh, dd, sha256sum): slower, no upload.
    Dd,
    /// drydock's helper, copied to the host's RAM.
    Helper,
}

/// Why the helper cannot run on this host, if it cannot: it is an x86_64
/// executable linked statically against glibc, which needs Linux 3.2.
pub fn cannot_run(facts: &Facts) -> Option<String> {
    if facts.arch != "x86_64" {
        return Some(format!(
            "the helper is built for x86_64 and the host is {}",
            facts.arch
        ));
    }
    let mut v = facts
        .kernel
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|x| x.parse::<u32>().ok());
    let (major, minor) = (v.next().unwrap_or(0), v.next().unwrap_or(0));
    if (major, minor) < (3, 2) {
        return Some(format!(
            "the helper needs Linux 3.2 or newer and the host runs {}",
            facts.kernel
        ));
    }
    None
}

/// Pick the mode for a host; `Helper` on a host that cannot run it is
/// refused rather than quietly replaced.
pub fn choose(asked: Mode, facts: &Facts) -> Result<Mode> {
    match (asked, cannot_run(facts)) {
        (Mode::Dd, _) => Ok(Mode::Dd),
        (Mode::Auto, None) | (Mode::Helper, None) => Ok(Mode::Helper),
        (Mode::Auto, Some(_)) => Ok(Mode::Dd),
        (Mode::Helper, Some(why)) => Err(crate::errors::refused!("{why}; use --transfer dd")),
    }
}

/// Whether two hashes of the same block agree (helper's raw bytes against
/// a manifest's hex).
pub fn same(hash: &[u8; 32], hex_hash: &str) -> bool {
    hex::decode(hex_hash).is_ok_and(|h| h == hash)
}
