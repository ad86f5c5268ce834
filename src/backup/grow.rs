//! A restore onto a larger disk: the GPT's backup header moved to the
//! disk's new end, the last partition grown to it, and an ext2/3/4
//! filesystem in it grown offline, all on the local image before anything
//! is written (see `restore`).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Serialize;

use crate::ui::human_bytes;

/// A GPT's backup header moved to the end of WORK (already the disk's
/// size): whether there was one. DEV names the disk in the error.
pub fn relocate_gpt(work: &Path, dev: &str) -> Result<bool> {
    if !is_gpt(work)? {
        return Ok(false);
    }
    let out = std::process::Command::new("sfdisk")
        .args(["--relocate", "gpt-bak-std"])
        .arg(work)
        .output()
        .context("cannot run sfdisk (Debian package fdisk) to move the GPT's backup header")?;
    if !out.status.success() {
        anyhow::bail!(
            "sfdisk --relocate gpt-bak-std {} failed: {}; nothing was written to {dev}",
            work.display(),
            String::from_utf8_lossy(&out.stderr).trim(),
        );
    }
    Ok(true)
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
/// Over 80 lines: read the table, decline what has no table or an MBR
/// extended or logical last partition (each in its own words), grow it with
/// `sfdisk -N`, read its new size, then one arm per filesystem saying what
/// was done or what to run on the host; most of it is those messages, and
/// split they would no longer sit beside their cases.
pub fn grow_last(image: &Path) -> Result<Grown> {
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
