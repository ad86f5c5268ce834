//! `drydock restore ID HOST`: a version written onto a host's disk. The
//! version is laid out as a local sparse image and pushed with the push's
//! own checks: in helper mode only the 4 KiB pages that differ from what
//! the disk holds cross the link, each range read back and verified.
//!
//! A larger disk gets the version at its start; a GPT's backup header is
//! moved to the disk's new end (`sfdisk --relocate gpt-bak-std`), and the
//! last partition is grown to the disk's end (`sfdisk -N`), all on the
//! local image, before anything is written. An ext2/3/4 filesystem in it
//! is grown there too, offline (`e2fsck -f -p`, then `resize2fs` to the
//! partition's size: e2fsprogs open an image at an offset, `IMAGE?offset=N`,
//! with no loop device and no root). XFS and btrfs grow only while mounted:
//! the output gives the one command to run on the host once it is up.

use std::path::{Path, PathBuf};

use anyhow::Result;
use serde::Serialize;

use super::adapt::NetChange;
use super::grow::{self, Grown};
use super::proof::BootProof;
use super::store::{Store, Version};
use crate::errors::refused;
use crate::remote::Facts;
use crate::remote::device;
use crate::ssh::Session;
use crate::transfer::helper::Mode;
use crate::transfer::push::{self, PushOptions, PushReport};
use crate::ui::{Ui, human_bytes};

/// How a restore goes, beyond the host and the version.
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    pub device: Option<String>,
    pub transfer: Mode,
    /// `--like FILE`: the new host's shape (its probe), instead of the
    /// shape read from the host being written (a rescue system's).
    pub like: Option<PathBuf>,
    /// `--keep-network`: the version's network configuration as it is.
    pub keep_network: bool,
    /// `--no-boot-proof`: write without booting the result first.
    pub no_boot_proof: bool,
    pub identity: Option<PathBuf>,
    pub memory_mib: u64,
    /// `--accept-failed`: units of the host the boot proof may find not running.
    pub accept_failed: Vec<String>,
}

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
    /// What was grown to use a larger disk, or why it was not.
    pub grown: Option<Grown>,
    /// The network rewritten for the new host: from, to, and the files.
    pub network: Option<NetChange>,
    pub network_files: Vec<String>,
    /// The restored copy booted, shaped as the new host, before the push.
    pub boot_proof: Option<BootProof>,
    /// The version has nothing a firmware could start (a data disk): no
    /// boot proof was tried.
    pub nothing_to_boot: bool,
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
        if let Some(n) = &self.network {
            s.push_str(&format!(
                "  network rewritten for the new host ({}) in: {}\n",
                n.describe(),
                if self.network_files.is_empty() {
                    "no file (none named the old address: DHCP?)".to_string()
                } else {
                    self.network_files.join(" ")
                }
            ));
        }
        if self.nothing_to_boot {
            s.push_str("  no boot proof: the version has nothing to boot (a data disk)\n");
        }
        if let Some(p) = &self.boot_proof {
            s.push_str(&format!(
                "  before the push, the restored copy booted shaped as the new host: {} came up, \
                 sshd answered, / mounted {}, init {} ({:.0} s)\n",
                p.os, p.root, p.init, p.seconds
            ));
        }
        if let Some(g) = &self.grown {
            s.push_str(&format!(
                "  the disk is {} larger than the version: {}{}\n",
                human_bytes(self.disk_size - self.version_size),
                if self.gpt_relocated {
                    "the GPT's backup header was moved to the disk's end; "
                } else {
                    ""
                },
                g.said
            ));
        }
        s
    }
}

/// Restore version V of STORE onto the host's disk: the refusals, the plan,
/// then `restore_with`, its laid-out copy removed whatever happened.
/// Over 80 lines: the refusals made before anything is written (disk too
/// small, mounted read-write, a new host without a gateway, a network
/// change without a recorded kernel), each a long message saying what to do
/// instead, then the plan and the report; the logic is a few lines, the
/// rest those messages in the order they are checked.
pub async fn restore(
    session: &Session,
    facts: &Facts,
    (store, v): (&Store, &Version),
    opts: &RestoreOptions,
    ui: &Ui,
) -> Result<RestoreReport> {
    device::require_root(facts, session)?;
    let dev = device::inspect(session, facts, opts.device.as_deref()).await?;
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
    // The new host's shape, and what of the version's network differs.
    let new_shape = match &opts.like {
        Some(p) => crate::vm::boot::load_shape(p)?,
        None => crate::vm::shape::Shape::of(facts, &dev),
    };
    let old_shape = v.shape.clone().unwrap_or_default();
    let network = if opts.keep_network {
        None
    } else {
        NetChange::between(old_shape.nic.as_ref(), new_shape.nic.as_ref())
    };
    if let Some(n) = &network
        && n.old.gateway.is_some()
        && n.new.gateway.is_none()
    {
        return Err(refused!(
            "the new host {} has no IPv4 default route ({} has {}/{} and no gateway), so \
             drydock cannot tell which gateway version {}'s network configuration should use \
             there; nothing was changed. Give the new host's shape with --like PROBE.json (the \
             output of `drydock probe HOST --json` of it when it runs its own system), or \
             restore with --keep-network",
            session.host(),
            n.new.name,
            n.new.address.map(|a| a.to_string()).unwrap_or_default(),
            n.new.prefix.map(|p| p.to_string()).unwrap_or_default(),
            v.id
        ));
    }
    // Before the version is laid out: nothing to undo.
    if network.is_some() && !store.has_boot(&v.id) {
        return Err(refused!(
            "the new host's network differs from version {}'s ({}), and the version has no \
             recorded kernel to boot it sealed and rewrite its configuration (it was taken by an \
             older drydock); nothing was written. Restore with --keep-network to write it as it \
             is, then fix the network from the provider's console",
            v.id,
            network
                .as_ref()
                .map(NetChange::describe)
                .unwrap_or_default()
        ));
    }
    let work = store.layout_path(v, "restores")?;
    let plan = Plan {
        dev: &dev,
        work: &work,
        network: network.as_ref(),
        old_shape,
        new_shape,
        // Onto another disk (larger, or another host's network): proven
        // to boot first.
        prove: !opts.no_boot_proof
            && (dev.size != size || network.is_some() || opts.like.is_some()),
    };
    let res = restore_with(session, facts, (store, v), &plan, opts, ui).await;
    for p in [
        work.clone(),
        crate::image::manifest::Manifest::path_for(&work),
    ] {
        std::fs::remove_file(p).ok();
    }
    let (push, gpt_relocated, grown, network_files, (boot_proof, nothing_to_boot)) = res?;
    Ok(RestoreReport {
        id: v.id.clone(),
        store: store.location().into(),
        version_size: size,
        disk_size: dev.size,
        gpt_relocated,
        unused_bytes: if grown.as_ref().is_some_and(|g| g.partition.is_some()) {
            0
        } else {
            dev.size - size
        },
        grown,
        network,
        network_files,
        boot_proof,
        nothing_to_boot,
        push,
    })
}

/// What restore_with does beyond laying the version out.
struct Plan<'a> {
    dev: &'a device::Device,
    work: &'a Path,
    network: Option<&'a NetChange>,
    old_shape: crate::vm::shape::Shape,
    new_shape: crate::vm::shape::Shape,
    prove: bool,
}

type Restored = (
    PushReport,
    bool,
    Option<Grown>,
    Vec<String>,
    (Option<BootProof>, bool),
);

/// Lay version V out in the plan's work file, adapt it, prove it and push it.
/// Over 80 lines: the steps in the order they must run on the copy (lay
/// out, grow to the disk with the GPT moved, the sealed boot that grows XFS
/// or btrfs and rewrites the network, the boot proof unless there is
/// nothing to boot, the push); each is already one call, and the length is
/// their arguments and messages, so splitting further would only pass the
/// growth state between functions.
async fn restore_with(
    session: &Session,
    facts: &Facts,
    (store, v): (&Store, &Version),
    plan: &Plan<'_>,
    opts: &RestoreOptions,
    ui: &Ui,
) -> Result<Restored> {
    let (dev, work) = (plan.dev, plan.work);
    let bar = ui.bytes_bar(v.manifest.size, "lay out");
    store.materialize(v, work, |n| bar.inc(n))?;
    bar.finish();
    let mut relocated = false;
    let mut grown = None;
    if dev.size > v.manifest.size {
        std::fs::OpenOptions::new()
            .write(true)
            .open(work)?
            .set_len(dev.size)?;
        relocated = grow::relocate_gpt(work, &dev.path)?;
        let g = grow::grow_last(work)?;
        ui.say(format!("{}: {}", dev.path, g.said));
        grown = Some(g);
        // The manifest laid out beside it is of the version's size: the
        // push hashes the image as it now is.
        std::fs::remove_file(crate::image::manifest::Manifest::path_for(work)).ok();
    }
    // XFS and btrfs grow only while mounted, and the network is rewritten
    // from inside: one sealed boot of the copy, as the host it came from.
    let online = grown
        .as_ref()
        .filter(|g| matches!(g.filesystem.as_deref(), Some("xfs" | "btrfs")))
        .and_then(|g| Some((g.filesystem.clone()?, g.start?)));
    let mut network_files = Vec::new();
    let recorded = store.has_boot(&v.id);
    if plan.network.is_some() || (online.is_some() && recorded) {
        let a = super::adapt::adapt(
            store,
            v,
            work,
            plan.old_shape.clone(),
            plan.network,
            online.as_ref().map(|(fs, start)| (fs.as_str(), *start)),
            opts.identity.as_deref(),
            ui,
        )
        .await?;
        if let (Some(how), Some(g)) = (&a.grown_online, grown.as_mut()) {
            g.filesystem_grown = true;
            g.said = format!(
                "partition {} was grown to the disk's end, and its filesystem with it, mounted in \
                 a sealed boot of the copy ({how})",
                g.partition.unwrap_or(0)
            );
        }
        network_files = a.network_files;
    }
    // A data disk: nothing for a firmware to start, so no proof to wait
    // out (it would wait on "No bootable device" to its limit).
    let nothing_to_boot = plan.prove && crate::image::bootable::boot_loader(work)?.is_none();
    if nothing_to_boot {
        ui.say(format!(
            "version {} has nothing to boot (no boot code in an MBR, no EFI system or BIOS boot \
             partition: a data disk): no boot proof; it is written as it is",
            v.id
        ));
    }
    let proof = if plan.prove && !nothing_to_boot {
        for note in plan.new_shape.user_net().1 {
            ui.warn(format!("the boot proof's VM: {note}"));
        }
        let p = super::proof::prove_image(
            work,
            &format!("the restored copy of version {}", v.id),
            &v.id,
            plan.new_shape.clone(),
            opts.memory_mib,
            super::proof::Services {
                identity: opts.identity.as_deref(),
                set: v.services.as_ref(),
                accepted: &opts.accept_failed,
            },
            ui,
        )
        .await
        .map_err(|e| e.context(format!("nothing was written to {}", session.host())))?;
        ui.say(p.human().trim_end().to_string());
        Some(p)
    } else {
        None
    };
    let push_opts = PushOptions {
        image: work.to_path_buf(),
        device: Some(dev.path.clone()),
        full: true,
        frozen_boot_id: None,
        transfer: opts.transfer,
        base_image: None,
        packages: None,
    };
    let r = push::push(session, facts, &push_opts, ui).await?;
    Ok((r, relocated, grown, network_files, (proof, nothing_to_boot)))
}
