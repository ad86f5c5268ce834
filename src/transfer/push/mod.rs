//! `drydock push`: prove the disk holds what was pulled (or is already
//! partly the new image, left by a cut push), write only what differs,
//! read every written range back and compare. The checks both modes share
//! are made once here ([`preflight`]); `dd` and `helper` then move the data.

mod dd;
mod helper;
mod https;
mod mirror;
pub mod rebuild;
mod writes;

pub use helper::Rebuilt;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use serde::Serialize;

use crate::errors::refused;
use crate::image::manifest::{Manifest, Source, block_len, hash_image};
use crate::remote::Facts;
use crate::remote::device::{self, Device};
use crate::ssh::Session;
use crate::transfer::helper::Mode;
use crate::ui::{Ui, human_bytes};

#[derive(Debug, Clone)]
pub struct PushOptions {
    pub image: PathBuf,
    pub device: Option<String>,
    /// Write every block, whatever the disk holds now (a restore onto
    /// another disk); skips the manifest check.
    pub full: bool,
    /// The boot id the disk was frozen under. When the host still runs
    /// that boot and the disk is still read-only, nothing can have written
    /// to it since the pull (docs/safety.md, rule 1: the first proof) and the disk is
    /// not hashed again; otherwise its hashes are checked.
    pub frozen_boot_id: Option<String>,
    pub transfer: Mode,
    /// The image as pulled, when it is still at hand (the pipeline's
    /// base.raw): lets helper mode finish a push that was cut inside a
    /// block, by proving each 4 KiB page holds the old or the new data.
    pub base_image: Option<PathBuf>,
    /// Package files the upgrade downloaded (a run's `downloads/`, each
    /// with its URL): helper mode has the host rebuild the pages they hold
    /// from its own mirror instead of sending them.
    pub packages: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
pub struct PushReport {
    pub host: String,
    pub device: String,
    pub image: PathBuf,
    pub size: u64,
    pub blocks_total: u64,
    pub blocks_written: u64,
    pub ranges: usize,
    pub bytes_sent: u64,
    pub seconds: f64,
    pub digest: String,
    /// Where the writer ran on the host (removed afterwards), and whether
    /// that was a tmpfs mounted for it.
    pub writer_dir: Option<String>,
    pub writer_own_tmpfs: bool,
    pub transfer: Mode,
    /// Bytes sent on the SSH channel (frames and compressed data in helper
    /// mode, raw blocks in dd mode) and bytes written to the disk.
    pub bytes_on_wire: u64,
    pub bytes_written: u64,
    pub helper_peak_rss_kib: Option<u64>,
    /// Helper mode: the zstd levels the pages went at, in order (chosen
    /// from the throughput measured during the push).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub zstd_levels: Vec<i32>,
    /// Helper mode with package files at hand: the pages the host rebuilt
    /// from them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rebuilt: Option<Rebuilt>,
}

impl PushReport {
    /// Lines of at most 100 columns (but for long paths).
    pub fn human(&self) -> String {
        format!(
            "pushed {}\n  to {}:{}\n  {} of {} blocks changed: {} written in {} ranges, {} on the wire\n  \
             {:.1} s, {} mode{}; read back and verified\n",
            self.image.display(),
            self.host,
            self.device,
            self.blocks_written,
            self.blocks_total,
            human_bytes(self.bytes_written),
            self.ranges,
            human_bytes(self.bytes_on_wire),
            self.seconds,
            match self.transfer {
                Mode::Helper => "helper",
                _ => "dd",
            },
            self.helper_peak_rss_kib
                .map(|k| format!(" (helper peak memory {})", human_bytes(k * 1024)))
                .unwrap_or_default()
        ) + &self
            .rebuilt
            .as_ref()
            .map(|r| {
                format!(
                    "  {} rebuilt on the host from {} package files ({} fetched from its mirror)\n",
                    human_bytes(r.pages * 4096),
                    r.asked,
                    human_bytes(r.fetched_bytes)
                )
            })
            .unwrap_or_default()
    }
}

/// A run of blocks [first, first + count).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub first: u64,
    pub count: u64,
}

/// Coalesce the blocks to write into ranges.
pub fn ranges(blocks: &[u64]) -> Vec<Range> {
    let mut out: Vec<Range> = Vec::new();
    for &b in blocks {
        match out.last_mut() {
            Some(r) if r.first + r.count == b => r.count += 1,
            _ => out.push(Range { first: b, count: 1 }),
        }
    }
    out
}

fn range_bytes(size: u64, r: Range) -> u64 {
    (r.first..r.first + r.count)
        .map(|b| block_len(size, b))
        .sum()
}

/// What both modes start from, checked once before either moves a byte.
pub(super) struct Preflight {
    pub dev: Device,
    /// The image as pulled (its manifest), unless `--full`.
    pub base: Option<Manifest>,
    /// The image to push, hashed.
    pub new: Manifest,
    /// The host runs the boot it was frozen under and the disk is still
    /// read-only: it holds what was pulled, without hashing it again.
    pub proven: bool,
    pub started: Instant,
    /// How the data moves (`--transfer`, for this host).
    pub mode: Mode,
}

/// The checks both modes share: root, the disk, not mounted read-write,
/// the image fits, a manifest (unless `--full`) of the image's size; then
/// the image hashed, and whether the disk is proven untouched since the
/// pull. Nothing on the host is changed.
/// Over 80 lines: the refusals in the order they are checked, each with its
/// own message naming the way out (freeze, --full), then the hash and the
/// proof; each check is a few lines and most of it is those messages.
async fn preflight(
    session: &Session,
    facts: &Facts,
    opts: &PushOptions,
    ui: &Ui,
) -> Result<Preflight> {
    device::require_root(facts, session)?;
    let dev = device::inspect(session, facts, opts.device.as_deref()).await?;
    let rw = dev.rw_mounts();
    if !rw.is_empty() {
        return Err(refused!(
            "{} is mounted read-write on {}: {}; drydock never writes under a mounted \
             filesystem. Freeze the host first (`drydock freeze {}`)",
            dev.path,
            session.host(),
            Device::describe_mounts(&rw),
            session.target.typed_arg()
        ));
    }
    let image_len = std::fs::metadata(&opts.image)
        .with_context(|| format!("cannot read the image {}", opts.image.display()))?
        .len();
    if image_len > dev.size {
        return Err(refused!(
            "the image {} ({}) is larger than {} on {} ({}); it would not fit",
            opts.image.display(),
            human_bytes(image_len),
            dev.path,
            session.host(),
            human_bytes(dev.size)
        ));
    }
    let manifest_path = Manifest::path_for(&opts.image);
    let base = if opts.full {
        None
    } else if manifest_path.exists() {
        Some(Manifest::load(&manifest_path)?)
    } else {
        return Err(refused!(
            "{} has no manifest ({}), so drydock cannot prove what {} holds now; push with \
             --full to overwrite the whole disk",
            opts.image.display(),
            manifest_path.display(),
            dev.path
        ));
    };
    if let Some(b) = &base
        && b.size != image_len
    {
        return Err(refused!(
            "the image is {} bytes and its manifest says {}: the manifest is not this image's; \
             push with --full to write every block without the check",
            image_len,
            b.size
        ));
    }
    let mode = crate::transfer::helper::choose(opts.transfer, facts)?;
    let started = Instant::now();
    let bar = ui.bytes_bar(image_len, "hash");
    let new = hash_image(&opts.image, |n| bar.inc(n))?;
    bar.finish();
    let proven = base.is_some()
        && opts.frozen_boot_id.as_deref() == Some(facts.boot_id.as_str())
        && dev.mounts.iter().all(|m| m.read_only);
    if proven {
        ui.say(format!(
            "{} has run the same boot since the freeze and {} is still read-only: \
             its content is what was pulled",
            session.host(),
            dev.path
        ));
    }
    Ok(Preflight {
        dev,
        base,
        new,
        proven,
        started,
        mode,
    })
}

pub async fn push(
    session: &Session,
    facts: &Facts,
    opts: &PushOptions,
    ui: &Ui,
) -> Result<PushReport> {
    let pf = preflight(session, facts, opts, ui).await?;
    if pf.mode == Mode::Helper
        && let Some(remote) = crate::transfer::helper::install(session, opts.transfer, ui).await?
    {
        return helper::push(session, facts, opts, pf, remote, ui).await;
    }
    if opts
        .packages
        .as_deref()
        .is_some_and(|d| !rebuild::package_files(d).is_empty())
    {
        ui.say(
            "dd mode: the host cannot rebuild pages from the package files (that needs the \
             helper); every page is sent",
        );
    }
    dd::push(session, facts, opts, pf, ui).await
}

/// What the manifest saved after a push says of where the image now is.
fn source_of(session: &Session, facts: &Facts, pf: &Preflight) -> Source {
    Source {
        host: session.host(),
        device: pf.dev.path.clone(),
        boot_id: facts.boot_id.clone(),
        pulled_at: pf
            .base
            .as_ref()
            .and_then(|b| b.source.as_ref())
            .map(|s| s.pulled_at.clone())
            .unwrap_or_default(),
    }
}

/// `IMAGE.push`: the blocks a push of the image (its manifest's digest) to
/// a device is about to write, made durable before the first write and
/// removed after the last. A cut can leave a block half written, holding
/// neither what was pulled nor the image's data; the rerun takes such a
/// block, when the interrupted push was writing it, as its own and writes
/// it again (any other such block is still refused).
#[derive(Serialize, serde::Deserialize)]
struct Intent {
    digest: String,
    device: String,
    blocks: Vec<u64>,
}

fn intent_path(image: &std::path::Path) -> PathBuf {
    let mut p = image.as_os_str().to_owned();
    p.push(".push");
    PathBuf::from(p)
}

/// Before the first write: BLOCKS of DEVICE are about to be written from
/// the image whose manifest's digest is DIGEST.
fn record_intent(opts: &PushOptions, digest: &str, device: &str, blocks: &[u64]) -> Result<()> {
    let i = Intent {
        digest: digest.to_string(),
        device: device.to_string(),
        blocks: blocks.to_vec(),
    };
    crate::util::write_atomic(&intent_path(&opts.image), &serde_json::to_vec(&i)?)
}

/// The blocks an interrupted push of this same image to this same device
/// was writing (none when there was none).
fn partly_written(
    opts: &PushOptions,
    digest: &str,
    device: &str,
) -> std::collections::BTreeSet<u64> {
    std::fs::read(intent_path(&opts.image))
        .ok()
        .and_then(|b| serde_json::from_slice::<Intent>(&b).ok())
        .filter(|i| i.digest == digest && i.device == device)
        .map(|i| i.blocks.into_iter().collect())
        .unwrap_or_default()
}

fn clear_intent(opts: &PushOptions) {
    let _ = std::fs::remove_file(intent_path(&opts.image));
}

/// After a push: the image's manifest says what the disk now holds.
fn save_manifest(
    session: &Session,
    facts: &Facts,
    opts: &PushOptions,
    pf: Preflight,
) -> Result<()> {
    let source = source_of(session, facts, &pf);
    Manifest {
        source: Some(source),
        ..pf.new
    }
    .save(&Manifest::path_for(&opts.image))?;
    clear_intent(opts);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::manifest::BLOCK_SIZE;

    #[test]
    fn coalesces_ranges() {
        assert_eq!(
            ranges(&[0, 1, 2, 5, 7, 8]),
            vec![
                Range { first: 0, count: 3 },
                Range { first: 5, count: 1 },
                Range { first: 7, count: 2 }
            ]
        );
        assert!(ranges(&[]).is_empty());
    }

    #[test]
    fn range_bytes_counts_the_short_last_block() {
        let size = 3 * BLOCK_SIZE + 10;
        assert_eq!(
            range_bytes(size, Range { first: 2, count: 2 }),
            BLOCK_SIZE + 10
        );
    }
}
