//! qemu-img, for the worker VM's disks: the qcow2 overlay over a base image
//! (which is never written), its map of what the guest wrote, and the raw
//! image made from it for the push.
//!
//! qemu-img runs as a child of the async runtime (a convert of a few GiB
//! takes minutes, which must not block a runtime thread), is killed if
//! drydock stops waiting for it, and writes with umask 077: an overlay or a
//! converted image holds the server's secrets (host keys, TLS keys,
//! database passwords), as the base image does.

use std::path::Path;
use std::process::Output;

use anyhow::{Context, Result, bail};

/// A qcow2 overlay whose backing file is `base` (never written).
pub async fn create_overlay(base: &Path, overlay: &Path) -> Result<()> {
    let base_abs = std::fs::canonicalize(base)
        .with_context(|| format!("cannot find the image {}", base.display()))?;
    qemu_img(
        &[
            "create".as_ref(),
            "-q".as_ref(),
            "-f".as_ref(),
            "qcow2".as_ref(),
            "-F".as_ref(),
            "raw".as_ref(),
            "-b".as_ref(),
            base_abs.as_os_str(),
            overlay.as_os_str(),
        ],
        || {
            format!(
                "qemu-img could not create the overlay {}",
                overlay.display()
            )
        },
    )
    .await?;
    Ok(())
}

/// `qemu-img map --output=json` of an image: its allocated extents (for an
/// overlay, what the guest wrote).
pub async fn map_json(image: &Path) -> Result<Vec<u8>> {
    qemu_img(
        &["map".as_ref(), "--output=json".as_ref(), image.as_os_str()],
        || format!("qemu-img map {} failed", image.display()),
    )
    .await
}

/// The raw image `to` made from `from` (an overlay over its base).
pub async fn convert_to_raw(from: &Path, to: &Path) -> Result<()> {
    qemu_img(
        &[
            "convert".as_ref(),
            "-O".as_ref(),
            "raw".as_ref(),
            from.as_os_str(),
            to.as_os_str(),
        ],
        || {
            format!(
                "qemu-img convert {} to {} failed",
                from.display(),
                to.display()
            )
        },
    )
    .await?;
    Ok(())
}

/// The ranges the guest discarded in an overlay (`qemu-img map` of it: in
/// the overlay itself, reading as zeros, no data): what its filesystems
/// told the disk they no longer use (fstrim). Only discards make them when
/// the guest's disk has no write-zeroes command (`cmdline`'s
/// `virtio-blk-pci.write-zeroes=off`): a write of zeros is then data.
pub fn discarded_ranges(map: &[u8]) -> Result<Vec<(u64, u64)>> {
    #[derive(serde::Deserialize)]
    struct Extent {
        start: u64,
        length: u64,
        depth: u32,
        zero: bool,
        data: bool,
    }
    let extents: Vec<Extent> =
        serde_json::from_slice(map).context("qemu-img map's output is not what drydock reads")?;
    let mut out: Vec<(u64, u64)> = Vec::new();
    for e in extents
        .into_iter()
        .filter(|e| e.depth == 0 && e.zero && !e.data)
    {
        match out.last_mut() {
            Some(last) if last.1 == e.start => last.1 += e.length,
            _ => out.push((e.start, e.start + e.length)),
        }
    }
    Ok(out)
}

/// Copy the byte ranges RANGES of FROM into TO at the same offsets (TO
/// exists, at least as long); all-zero pieces are left as holes. Returns
/// the bytes of FROM that were not zero.
pub fn copy_ranges(from: &Path, to: &Path, ranges: &[(u64, u64)]) -> Result<u64> {
    use std::os::unix::fs::FileExt;
    let src =
        std::fs::File::open(from).with_context(|| format!("cannot open {}", from.display()))?;
    let dst = std::fs::OpenOptions::new()
        .write(true)
        .open(to)
        .with_context(|| format!("cannot open {}", to.display()))?;
    let end_of_src = src.metadata()?.len();
    let mut buf = vec![0u8; 1 << 20];
    let mut copied = 0;
    for &(s, e) in ranges {
        let mut off = s;
        let e = e.min(end_of_src);
        while off < e {
            let n = ((e - off) as usize).min(buf.len());
            src.read_exact_at(&mut buf[..n], off)?;
            if buf[..n].iter().any(|b| *b != 0) {
                dst.write_all_at(&buf[..n], off)?;
                copied += n as u64;
            }
            off += n as u64;
        }
    }
    dst.sync_all()?;
    Ok(copied)
}

/// qemu-img with ARGS; its stdout, or an error that starts with what
/// `failed` says and ends with qemu-img's own stderr.
async fn qemu_img(args: &[&std::ffi::OsStr], failed: impl FnOnce() -> String) -> Result<Vec<u8>> {
    let mut cmd = tokio::process::Command::new("qemu-img");
    cmd.args(args).kill_on_drop(true);
    // SAFETY: umask is async-signal-safe, and the closure touches nothing
    // else of the parent between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
            Ok(())
        });
    }
    tracing::debug!(?args, "qemu-img");
    let out: Output = cmd
        .output()
        .await
        .context("cannot run qemu-img (is qemu-utils installed?)")?;
    if !out.status.success() {
        bail!(
            "{}: {}",
            failed(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out.stdout)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// What the guest discarded in an overlay reads, after the conversion,
    /// as the base had it; what it wrote stays, and so do ranges it never
    /// touched.
    #[tokio::test]
    async fn discarded_ranges_are_given_the_bases_bytes_back() {
        let t = tempfile::tempdir().unwrap();
        let base = t.path().join("base.raw");
        std::fs::write(&base, vec![7u8; 1 << 20]).unwrap();
        let overlay = t.path().join("overlay.qcow2");
        create_overlay(&base, &overlay).await.unwrap();
        let io = std::process::Command::new("qemu-io")
            .args([
                "-f",
                "qcow2",
                "-c",
                "write -P 0xaa 0 256k",
                "-c",
                "discard 64k 128k",
            ])
            .arg(&overlay)
            .output()
            .unwrap();
        assert!(
            io.status.success(),
            "{}",
            String::from_utf8_lossy(&io.stderr)
        );
        let ranges = discarded_ranges(&map_json(&overlay).await.unwrap()).unwrap();
        assert_eq!(ranges, vec![(64 << 10, 192 << 10)]);
        let raw = t.path().join("upgraded.raw");
        convert_to_raw(&overlay, &raw).await.unwrap();
        assert_eq!(copy_ranges(&base, &raw, &ranges).unwrap(), 128 << 10);
        let got = std::fs::read(&raw).unwrap();
        assert!(got[..64 << 10].iter().all(|b| *b == 0xaa));
        assert!(got[64 << 10..192 << 10].iter().all(|b| *b == 7));
        assert!(got[192 << 10..256 << 10].iter().all(|b| *b == 0xaa));
        assert!(got[256 << 10..].iter().all(|b| *b == 7));
    }

    /// An overlay over a base, written through, converted back: the base is
    /// not touched, the result is the base plus what was written, and what
    /// qemu-img made is readable by its owner only.
    #[tokio::test]
    async fn overlay_then_convert_leaves_the_base_and_keeps_files_private() {
        let t = tempfile::tempdir().unwrap();
        let base = t.path().join("base.raw");
        std::fs::write(&base, vec![7u8; 1 << 20]).unwrap();
        let overlay = t.path().join("overlay.qcow2");
        create_overlay(&base, &overlay).await.unwrap();
        let raw = t.path().join("upgraded.raw");
        convert_to_raw(&overlay, &raw).await.unwrap();
        assert_eq!(std::fs::read(&raw).unwrap(), vec![7u8; 1 << 20]);
        let map = String::from_utf8(map_json(&overlay).await.unwrap()).unwrap();
        assert!(map.trim_start().starts_with('['), "{map}");
        for f in [&overlay, &raw] {
            let mode = std::fs::metadata(f).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", f.display());
        }
        // qemu-img's own failure: what failed, then what it said.
        let missing = t.path().join("gone.qcow2");
        let e = convert_to_raw(&missing, &t.path().join("x.raw"))
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with(&format!(
                "qemu-img convert {} to {} failed: qemu-img:",
                missing.display(),
                t.path().join("x.raw").display()
            )),
            "{e}"
        );
        let e = create_overlay(&t.path().join("missing.raw"), &overlay)
            .await
            .unwrap_err();
        assert!(
            format!("{e:#}").starts_with(&format!(
                "cannot find the image {}",
                t.path().join("missing.raw").display()
            )),
            "{e:#}"
        );
    }
}
