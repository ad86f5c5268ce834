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

use anyhow::{Context, Result};
use serde::Serialize;

use super::adapt::NetChange;
use super::proof::BootProof;
use super::store::{Store, Version};
use crate::refused;
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
        None => crate::pipeline::steps::shape_of(facts, &dev),
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
    if network.is_some() && !store.boot_dir(&v.id).join("boot.json").exists() {
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
    let (push, gpt_relocated, grown, network_files, boot_proof) = res?;
    Ok(RestoreReport {
        id: v.id.clone(),
        store: store.dir.clone(),
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
    Option<BootProof>,
);

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
        let g = grow_last(work)?;
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
    let recorded = store.boot_dir(&v.id).join("boot.json").exists();
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
    let proof = if plan.prove {
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
    Ok((r, relocated, grown, network_files, proof))
}

/// What a restore onto a larger disk did with the space after the version.
#[derive(Debug, Clone, Serialize)]
pub struct Grown {
    /// The partition grown to the disk's end (its number), if one was.
    pub partition: Option<u32>,
    /// The filesystem found in it: ext4, xfs, btrfs, LVM2_member, swap, ...
    pub filesystem: Option<String>,
    /// Whether that filesystem now fills the partition.
    pub filesystem_grown: bool,
    /// In words, with the command to finish on the host when one is left.
    pub said: String,
    /// The grown partition's first sector.
    #[serde(skip)]
    pub start: Option<u64>,
}

/// The partition that ends last on IMAGE (`sfdisk --json`): its number,
/// start and size in 512-byte sectors, its type, and whether it is an MBR
/// extended partition or one inside it.
#[derive(Debug, PartialEq)]
struct LastPart {
    number: u32,
    start: u64,
    sectors: u64,
    extended_or_logical: bool,
}

fn last_partition(table: &serde_json::Value) -> Option<LastPart> {
    let t = &table["partitiontable"];
    let dos = t["label"] == "dos";
    t["partitions"]
        .as_array()?
        .iter()
        .filter_map(|p| {
            let node = p["node"].as_str()?;
            let number: u32 = node
                .rsplit(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()?;
            let start = p["start"].as_u64()?;
            let sectors = p["size"].as_u64()?;
            let ty = p["type"].as_str().unwrap_or("").to_ascii_lowercase();
            let extended = dos && (number > 4 || matches!(ty.as_str(), "5" | "f" | "85"));
            Some(LastPart {
                number,
                start,
                sectors,
                extended_or_logical: extended,
            })
        })
        .max_by_key(|p| p.start + p.sectors)
}

/// The filesystem at byte OFFSET of IMAGE, by its superblock's magic.
fn filesystem_at(image: &Path, offset: u64) -> Result<Option<&'static str>> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(image)?;
    let at = |o: u64, n: usize| -> Vec<u8> {
        let mut b = vec![0u8; n];
        match f.read_exact_at(&mut b, offset + o) {
            Ok(()) => b,
            Err(_) => Vec::new(),
        }
    };
    Ok(if at(1080, 2) == [0x53, 0xef] {
        Some("ext4")
    } else if at(0, 4) == *b"XFSB" {
        Some("xfs")
    } else if at(65600, 8) == *b"_BHRfS_M" {
        Some("btrfs")
    } else if at(512, 8) == *b"LABELONE" {
        Some("LVM2_member")
    } else if at(4086, 10) == *b"SWAPSPACE2" {
        Some("swap")
    } else {
        None
    })
}

fn tool(program: &str, args: &[&str], package: &str) -> Result<std::process::Output> {
    std::process::Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {program} (Debian package {package})"))
}

/// Grow the ext2/3/4 filesystem at byte OFFSET of IMAGE to SECTORS
/// 512-byte sectors, offline: `e2fsck -f -p` (a crash-consistent copy's
/// journal is replayed, as its boot would), then `resize2fs`. Both run on
/// a sparse copy of the partition beside IMAGE, copied back page by page
/// where it differs: resize2fs given `IMAGE?offset=N` truncates the file
/// to the filesystem's size counted from 0, which would cut the end of
/// the partition and whatever follows it. Err(why) when e2fsprogs said no
/// (IMAGE then unchanged).
fn grow_ext(image: &Path, offset: u64, sectors: u64) -> Result<std::result::Result<(), String>> {
    use std::os::unix::fs::FileExt;
    const CHUNK: usize = 1 << 20;
    let len = sectors * 512;
    let mut tmp = image.as_os_str().to_owned();
    tmp.push(".partition");
    let tmp = PathBuf::from(tmp);
    let img = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(image)?;
    let part = std::fs::File::create(&tmp)?;
    let cleanup = scopeguard(&tmp);
    part.set_len(len)?;
    let mut buf = vec![0u8; CHUNK];
    let mut at = 0;
    while at < len {
        let n = CHUNK.min((len - at) as usize);
        img.read_exact_at(&mut buf[..n], offset + at)?;
        if buf[..n].iter().any(|&b| b != 0) {
            part.write_all_at(&buf[..n], at)?;
        }
        at += n as u64;
    }
    part.sync_all()?;
    let t = tmp.to_string_lossy().to_string();
    let fsck = tool("e2fsck", &["-f", "-p", &t], "e2fsprogs")?;
    // 0: clean; 1: errors corrected (the journal replayed).
    if fsck.status.code().is_none_or(|c| c > 1) {
        return Ok(Err(format!(
            "`e2fsck -f -p` wants a manual check: {}",
            String::from_utf8_lossy(&fsck.stdout).trim()
        )));
    }
    let r = tool("resize2fs", &[&t, &format!("{sectors}s")], "e2fsprogs")?;
    if !r.status.success() {
        return Ok(Err(format!(
            "resize2fs: {}",
            String::from_utf8_lossy(&r.stderr).trim()
        )));
    }
    // Back into the image where it differs (resize2fs may have cut a last
    // partial block off the copy: past the filesystem, left as it was).
    let part = std::fs::File::open(&tmp)?;
    let grown_len = part.metadata()?.len().min(len);
    let mut old = vec![0u8; CHUNK];
    let mut at = 0;
    while at < grown_len {
        let n = CHUNK.min((grown_len - at) as usize);
        part.read_exact_at(&mut buf[..n], at)?;
        img.read_exact_at(&mut old[..n], offset + at)?;
        if buf[..n] != old[..n] {
            img.write_all_at(&buf[..n], offset + at)?;
        }
        at += n as u64;
    }
    img.sync_all()?;
    drop(cleanup);
    Ok(Ok(()))
}

/// Removes PATH when dropped (the partition's copy, on every way out).
fn scopeguard(path: &Path) -> impl Drop + '_ {
    struct Rm<'a>(&'a Path);
    impl Drop for Rm<'_> {
        fn drop(&mut self) {
            std::fs::remove_file(self.0).ok();
        }
    }
    Rm(path)
}

/// Grow the last partition of IMAGE (already the disk's size) to its end,
/// and the ext2/3/4 filesystem in it; what was done, in words.
fn grow_last(image: &Path) -> Result<Grown> {
    let img = image.to_string_lossy().to_string();
    let out = tool("sfdisk", &["--json", &img], "fdisk")?;
    let table: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let Some(last) = out
        .status
        .success()
        .then(|| last_partition(&table))
        .flatten()
    else {
        return Ok(Grown {
            partition: None,
            filesystem: None,
            filesystem_grown: false,
            start: None,
            said: "the version has no partition table drydock can grow (a filesystem on the \
                   whole disk?); the space after it is unused"
                .into(),
        });
    };
    if last.extended_or_logical {
        return Ok(Grown {
            partition: None,
            filesystem: None,
            filesystem_grown: false,
            start: None,
            said: format!(
                "its last partition ({}) is an MBR extended or logical partition, which drydock \
                 does not grow; the space after it is unused (grow it on the host: growpart, \
                 then the filesystem)",
                last.number
            ),
        });
    }
    let n = last.number.to_string();
    let mut sf = std::process::Command::new("sfdisk")
        .args(["--no-reread", "--no-tell-kernel", "-q", "-N", &n, &img])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("cannot run sfdisk (Debian package fdisk)")?;
    {
        use std::io::Write;
        sf.stdin.take().unwrap().write_all(b", +\n")?;
    }
    let o = sf.wait_with_output()?;
    if !o.status.success() {
        anyhow::bail!(
            "sfdisk -N {n} {img} (growing the last partition) failed: {}; nothing was written \
             to the host",
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    let after: serde_json::Value =
        serde_json::from_slice(&tool("sfdisk", &["--json", &img], "fdisk")?.stdout)
            .unwrap_or_default();
    let sectors = last_partition(&after)
        .filter(|p| p.number == last.number)
        .map(|p| p.sectors)
        .unwrap_or(last.sectors);
    let grew = human_bytes((sectors - last.sectors) * 512);
    let offset = last.start * 512;
    let fs = filesystem_at(image, offset)?;
    let part = format!("partition {n} was grown by {grew} to the disk's end");
    let (fs_grown, said) = match fs {
        Some("ext4") => match grow_ext(image, offset, sectors)? {
            Ok(()) => (
                true,
                format!("{part}, and its ext filesystem with it (resize2fs)"),
            ),
            Err(why) => (
                false,
                format!(
                    "{part}; its ext filesystem was not ({why}): run e2fsck, then resize2fs, \
                     on that partition on the host"
                ),
            ),
        },
        Some("xfs") => (
            false,
            format!(
                "{part}; XFS grows only while mounted: on the host, run `xfs_growfs` on its \
                 mount point"
            ),
        ),
        Some("btrfs") => (
            false,
            format!(
                "{part}; btrfs grows only while mounted: on the host, run `btrfs filesystem \
                 resize max` on its mount point"
            ),
        ),
        Some("LVM2_member") => (
            false,
            format!(
                "{part}; it is an LVM physical volume: on the host, run `pvresize` on it, then grow the logical volume and its filesystem"
            ),
        ),
        other => (
            false,
            format!(
                "{part}; it holds {}, which drydock does not grow",
                other.unwrap_or("no filesystem drydock knows")
            ),
        ),
    };
    Ok(Grown {
        start: Some(last.start),
        partition: Some(last.number),
        filesystem: fs.map(str::to_string),
        filesystem_grown: fs_grown,
        said,
    })
}

/// Whether IMAGE starts with a GPT (its header at LBA 1, 512-byte sectors).
fn is_gpt(image: &Path) -> Result<bool> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(image)?;
    let mut sig = [0u8; 8];
    f.read_exact_at(&mut sig, 512)?;
    Ok(&sig == b"EFI PART")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(label: &str, parts: &[(&str, u64, u64, &str)]) -> serde_json::Value {
        serde_json::json!({"partitiontable": {"label": label, "partitions": parts.iter().map(
            |(node, start, size, ty)| serde_json::json!({"node": node, "start": start, "size": size, "type": ty})
        ).collect::<Vec<_>>()}})
    }

    /// The partition that ends last is the one grown; an MBR extended
    /// partition, or a logical one in it (Debian's installer puts swap
    /// there), is left alone.
    #[test]
    fn the_last_partition_by_its_end() {
        let gpt = table(
            "gpt",
            &[
                ("img1", 2048, 1000, "L"),
                ("img3", 500000, 4000, "L"),
                ("img2", 4096, 100000, "L"),
            ],
        );
        assert_eq!(
            last_partition(&gpt),
            Some(LastPart {
                number: 3,
                start: 500000,
                sectors: 4000,
                extended_or_logical: false
            })
        );
        let debian = table(
            "dos",
            &[
                ("/dev/sda1", 2048, 1000000, "83"),
                ("/dev/sda2", 1001470, 100000, "5"),
                ("/dev/sda5", 1001472, 99998, "82"),
            ],
        );
        let last = last_partition(&debian).unwrap();
        assert_eq!((last.number, last.extended_or_logical), (5, true));
        let one = table("dos", &[("/dev/vda1", 2048, 6000000, "83")]);
        assert!(!last_partition(&one).unwrap().extended_or_logical);
        assert_eq!(last_partition(&table("dos", &[])), None);
    }
}
