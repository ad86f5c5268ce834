//! Backups: versions of a host's disk in a store ([`store`]), taken by
//! `drydock backup` ([`take`]), listed and pruned by `drydock backups`,
//! checked by `drydock verify`.
//!
//! `drydock restore` writes a version back ([`restore`]).
//!
//! `drydock verify --boot` boots one in a sealed VM ([`proof`]).
//!
//! Not built yet (the commands say so): growing the last partition on a
//! larger disk, and a restore proven to boot shaped like the new host.

use std::path::{Path, PathBuf};

use anyhow::Result;
use serde::Serialize;

pub mod adapt;
pub mod backend;
pub mod crypt;
pub mod forget;
mod grow;
mod keptboot;
mod pages;
pub mod proof;
mod readback;
pub mod restore;
mod sftp;
pub mod store;
mod storeurl;
pub mod take;

use store::{Store, Version};

use crate::errors::usage;
use crate::ui::human_bytes;

/// The default store of a host (as drydock names it, `user@host:port`):
/// `$XDG_DATA_HOME/drydock/backups/HOST[_PORT]`.
pub fn default_store(host: &str) -> Result<PathBuf> {
    Ok(crate::paths::backups_dir()?.join(store_name(host)))
}

/// `root@vps.example.org:22` → `vps.example.org`; `root@10.0.0.5:2222` →
/// `10.0.0.5_2222`. Anything but letters, digits, `.` and `-` becomes `_`.
pub fn store_name(host: &str) -> String {
    let at = host.rsplit_once('@').map(|(_, h)| h).unwrap_or(host);
    let at = at.strip_suffix(":22").unwrap_or(at);
    at.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The stores to look in: DIR, or every store under the default folder.
pub fn stores(dir: Option<&Path>, key: Option<&Path>) -> Result<Vec<Store>> {
    if let Some(d) = dir {
        return Ok(vec![Store::open(d, key)?]);
    }
    let root = crate::paths::backups_dir()?;
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(&root) {
        let mut dirs: Vec<PathBuf> = rd.flatten().map(|e| e.path()).collect();
        dirs.sort();
        for d in dirs {
            if d.join("store.json").exists() {
                out.push(Store::open(&d, key)?);
            }
        }
    }
    Ok(out)
}

/// Version ID, in DIR or in the one default store that has it.
pub fn find(id: &str, dir: Option<&Path>, key: Option<&Path>) -> Result<(Store, Version)> {
    let mut all = stores(dir, key)?;
    if all.len() == 1 && dir.is_some() {
        let one = all.pop().expect("one");
        let v = one.version(id)?;
        return Ok((one, v));
    }
    let mut hits = Vec::new();
    for s in all {
        if s.has_version(id) {
            hits.push(s);
        }
    }
    match hits.len() {
        0 => Err(usage!(
            "no backup version {id} in {}; `drydock backups` lists them (give --store DIR for \
             a store elsewhere)",
            crate::paths::backups_dir()?.display()
        )),
        1 => {
            let s = hits.pop().expect("one");
            let v = s.version(id)?;
            Ok((s, v))
        }
        _ => Err(usage!(
            "version {id} is in {} stores ({}); say which with --store DIR",
            hits.len(),
            hits.iter()
                .map(|s| s.location())
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

/// One line of `drydock backups`.
#[derive(Debug, Serialize)]
pub struct Listed {
    pub store: PathBuf,
    pub id: String,
    pub created: String,
    pub host: Option<String>,
    pub device: Option<String>,
    pub consistency: store::Consistency,
    pub size: u64,
    /// Bytes of the disk that are not zeros.
    pub data_bytes: u64,
    /// What it added to the store when it was made, and what of the
    /// store's bytes it uses that another version uses too.
    pub added_bytes: u64,
    pub shared_bytes: u64,
    pub digest: String,
}

/// The versions of STORE, oldest first, and the store's own figures.
pub fn list(store: &Store) -> Result<(Vec<Listed>, StoreFigures)> {
    let versions = store.versions()?;
    let sizes = store.block_sizes()?;
    let sets: Vec<_> = versions.iter().map(|v| store.block_names(v)).collect();
    let mut out = Vec::new();
    for (k, v) in versions.iter().enumerate() {
        let shared = sets[k]
            .iter()
            .filter(|h| {
                sets.iter()
                    .enumerate()
                    .any(|(j, o)| j != k && o.contains(*h))
            })
            .map(|h| sizes.get(h).copied().unwrap_or(0))
            .sum();
        let m = &v.manifest;
        out.push(Listed {
            store: store.location().into(),
            id: v.id.clone(),
            created: v.created.clone(),
            host: m.source.as_ref().map(|s| s.host.clone()),
            device: m.source.as_ref().map(|s| s.device.clone()),
            consistency: v.consistency,
            size: m.size,
            data_bytes: sets[k].len() as u64 * crate::image::manifest::BLOCK_SIZE,
            added_bytes: v.added_bytes,
            shared_bytes: shared,
            digest: m.digest.clone(),
        });
    }
    let used: std::collections::BTreeSet<&String> = sets.iter().flatten().collect();
    let figures = StoreFigures {
        store: store.location().into(),
        encrypted: store.encrypted(),
        versions: versions.len() as u64,
        bytes: sizes.values().sum(),
        unlisted_blocks: sizes.keys().filter(|h| !used.contains(h)).count() as u64,
        unlisted_bytes: sizes
            .iter()
            .filter(|(h, _)| !used.contains(h))
            .map(|(_, n)| n)
            .sum(),
    };
    Ok((out, figures))
}

#[derive(Debug, Serialize)]
pub struct StoreFigures {
    pub store: PathBuf,
    /// Encrypted (age); a store made before drydock encrypted them is not.
    pub encrypted: bool,
    pub versions: u64,
    /// The blocks' bytes in the store.
    pub bytes: u64,
    /// Blocks no version names: kept by a backup that was cut (the next
    /// backup uses them; `backups prune` removes them).
    pub unlisted_blocks: u64,
    pub unlisted_bytes: u64,
}

/// A version's time (RFC 3339, UTC) as the tables show it:
/// `2026-12-07 04:00:00`.
pub fn shown_time(created: &str) -> String {
    created
        .chars()
        .take(19)
        .collect::<String>()
        .replace('T', " ")
}

pub fn human_list(rows: &[Listed], f: &StoreFigures) -> String {
    let mut s = format!(
        "{} ({})\n",
        f.store.display(),
        if f.encrypted {
            "encrypted"
        } else {
            "unencrypted: made before drydock encrypted its stores"
        }
    );
    if rows.is_empty() {
        s.push_str("  no versions yet\n");
    } else {
        s.push_str(&format!(
            "  {:<17} {:<20} {:<10} {:>10} {:>10} {:>10}\n",
            "id", "created (UTC)", "copy", "data", "added", "shared"
        ));
    }
    for r in rows {
        s.push_str(&format!(
            "  {:<17} {:<20} {:<10} {:>10} {:>10} {:>10}\n",
            r.id,
            shown_time(&r.created),
            match r.consistency {
                store::Consistency::Frozen => "frozen",
                store::Consistency::CrashConsistent => "live",
            },
            human_bytes(r.data_bytes),
            human_bytes(r.added_bytes),
            human_bytes(r.shared_bytes)
        ));
    }
    s.push_str(&format!(
        "  {} version(s), {} in the store",
        f.versions,
        human_bytes(f.bytes)
    ));
    if f.unlisted_blocks > 0 {
        s.push_str(&format!(
            "; {} in {} block(s) of a backup that was cut (the next backup uses them, \
             `drydock backups prune` removes them)",
            human_bytes(f.unlisted_bytes),
            f.unlisted_blocks
        ));
    }
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_is_named_after_the_host_and_its_port() {
        assert_eq!(store_name("root@vps.example.org:22"), "vps.example.org");
        assert_eq!(store_name("root@10.0.0.5:2222"), "10.0.0.5_2222");
        assert_eq!(store_name("admin@[2001:db8::1]:22"), "_2001_db8__1_");
    }
}
