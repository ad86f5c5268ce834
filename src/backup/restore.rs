//! `drydock restore ID HOST`: a version written onto a host's disk. The
//! version is laid out as a local sparse image and pushed with the push's
//! own checks: in helper mode only the 4 KiB pages that differ from what
//! the disk holds cross the link, each range read back and verified.
//!
//! A larger disk gets the version at its start; a GPT's backup header is
//! moved to the disk's new end (`sfdisk --relocate gpt-bak-std`, on the
//! local image, before anything is written). The last partition and its
//! filesystem are not grown yet: the space after them stays unused, and
//! the output says so.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Serialize;

use super::store::{Store, Version};
use crate::refused;
use crate::remote::Facts;
use crate::remote::device;
use crate::ssh::Session;
use crate::transfer::helper::Mode;
use crate::transfer::push::{self, PushOptions, PushReport};
use crate::ui::{Ui, human_bytes};

#[derive(Debug, Serialize)]
pub struct RestoreReport {
    pub id: String,
    pub store: PathBuf,
    pub version_size: u64,
    pub disk_size: u64,
    /// A GPT whose backup header was moved to the end of a larger disk.
    pub gpt_relocated: bool,
    /// Bytes at the end of a larger disk that no partition uses.
    pub unused_bytes: u64,
    pub push: PushReport,
}

impl RestoreReport {
    pub fn human(&self) -> String {
        let mut s = format!(
            "restored version {} (from {}) onto {}:{}\n  {} of {} blocks changed: {} written \
             in {} ranges, {} on the wire, {:.1} s; read back and verified\n",
            self.id,
            self.store.display(),
            self.push.host,
            self.push.device,
            self.push.blocks_written,
            self.push.blocks_total,
            human_bytes(self.push.bytes_written),
            self.push.ranges,
            human_bytes(self.push.bytes_on_wire),
            self.push.seconds
        );
        if self.unused_bytes > 0 {
            s.push_str(&format!(
                "  the disk is {} larger than the version: {}the last partition and its \
                 filesystem were not grown (not built yet), so that space is unused; grow them \
                 on the host (growpart, then resize2fs, xfs_growfs or btrfs filesystem resize)\n",
                human_bytes(self.unused_bytes),
                if self.gpt_relocated {
                    "the GPT's backup header was moved to the disk's end; "
                } else {
                    ""
                }
            ));
        }
        s
    }
}

pub async fn restore(
    session: &Session,
    facts: &Facts,
    (store, v): (&Store, &Version),
    dev_path: Option<&str>,
    transfer: Mode,
    ui: &Ui,
) -> Result<RestoreReport> {
    device::require_root(facts, session)?;
    let dev = device::inspect(session, facts, dev_path).await?;
    let size = v.manifest.size;
    if dev.size < size {
        return Err(refused!(
            "{} on {} is {} and version {} is {}: it does not fit; nothing was changed. \
             Restore onto a disk of at least {size} bytes",
            dev.path,
            session.host(),
            human_bytes(dev.size),
            v.id,
            human_bytes(size)
        ));
    }
    let rw = dev.rw_mounts();
    if !rw.is_empty() {
        return Err(refused!(
            "{} is mounted read-write on {} ({}): a restore never writes under a mounted \
             filesystem; nothing was changed. Boot the host into its provider's rescue system \
             and restore onto its disk there (or freeze it: `drydock freeze {}`)",
            dev.path,
            session.host(),
            device::Device::describe_mounts(&rw),
            session.target.typed_arg()
        ));
    }
    let work = store.layout_path(v, "restores")?;
    let res = restore_with(session, facts, (store, v), &dev, &work, transfer, ui).await;
    for p in [
        work.clone(),
        crate::image::manifest::Manifest::path_for(&work),
    ] {
        std::fs::remove_file(p).ok();
    }
    let (push, gpt_relocated) = res?;
    Ok(RestoreReport {
        id: v.id.clone(),
        store: store.dir.clone(),
        version_size: size,
        disk_size: dev.size,
        gpt_relocated,
        unused_bytes: dev.size - size,
        push,
    })
}

async fn restore_with(
    session: &Session,
    facts: &Facts,
    (store, v): (&Store, &Version),
    dev: &device::Device,
    work: &Path,
    transfer: Mode,
    ui: &Ui,
) -> Result<(PushReport, bool)> {
    let bar = ui.bytes_bar(v.manifest.size, "lay out");
    store.materialize(v, work, |n| bar.inc(n))?;
    bar.finish();
    let mut relocated = false;
    if dev.size > v.manifest.size {
        std::fs::OpenOptions::new()
            .write(true)
            .open(work)?
            .set_len(dev.size)?;
        if is_gpt(work)? {
            let out = std::process::Command::new("sfdisk")
                .args(["--relocate", "gpt-bak-std"])
                .arg(work)
                .output()
                .context(
                    "cannot run sfdisk (Debian package fdisk) to move the GPT's backup header",
                )?;
            if !out.status.success() {
                anyhow::bail!(
                    "sfdisk --relocate gpt-bak-std {} failed: {}; nothing was written to {}",
                    work.display(),
                    String::from_utf8_lossy(&out.stderr).trim(),
                    dev.path
                );
            }
            relocated = true;
        }
        // The manifest laid out beside it is of the version's size: the
        // push hashes the image as it now is.
        std::fs::remove_file(crate::image::manifest::Manifest::path_for(work)).ok();
    }
    let opts = PushOptions {
        image: work.to_path_buf(),
        device: Some(dev.path.clone()),
        full: true,
        frozen_boot_id: None,
        transfer,
        base_image: None,
    };
    let r = push::push(session, facts, &opts, ui).await?;
    Ok((r, relocated))
}

/// Whether IMAGE starts with a GPT (its header at LBA 1, 512-byte sectors).
fn is_gpt(image: &Path) -> Result<bool> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(image)?;
    let mut sig = [0u8; 8];
    f.read_exact_at(&mut sig, 512)?;
    Ok(&sig == b"EFI PART")
}
