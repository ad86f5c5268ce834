//! `drydock push` in dd mode: prove the disk holds what was pulled, write
//! only the blocks that differ, read every written range back and compare.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use russh::ChannelMsg;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::image::manifest::{
    self, BLOCK_SIZE, Manifest, SEGMENT_BLOCKS, Source, block_count, block_len, hash_image,
};
use crate::refused;
use crate::remote::Facts;
use crate::remote::device::{self, Device};
use crate::ssh::{Session, shell_quote};
use crate::transfer::helper::{self, Link, Mode, Patch, Remote};
use crate::transfer::writer::Staged;
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

/// Shell lines that hash [first, first+count) blocks of $DEV, limited to the
/// image's `size`, printing `TAG first count hash`.
fn hash_range_cmd(tag: &str, r: Range, size: u64, dd: &str, head: &str, hasher: &str) -> String {
    format!(
        "{dd} if=\"$DEV\" bs={BLOCK_SIZE} skip={} count={} $Q $IF | {head} -c {} | {hasher} | {{ read h _; echo \"{tag} {} {} $h\"; }}\n",
        r.first,
        r.count,
        range_bytes(size, r),
        r.first,
        r.count
    )
}

/// Hash the given ranges of the disk on the host; answers keyed by first block.
async fn remote_hashes(
    session: &Session,
    dev: &str,
    size: u64,
    ranges: &[Range],
) -> Result<Vec<(u64, String)>> {
    let mut script = format!(
        "export LC_ALL=C; DEV={}\n{}IF=\n",
        shell_quote(dev),
        crate::transfer::HASHER_PICK
    );
    for r in ranges {
        script.push_str(&hash_range_cmd("S", *r, size, "dd", "head", "$H"));
    }
    // The script can be long (one line a range): send it on stdin.
    let out = session.exec_input("sh -s", Some(script.as_bytes())).await?;
    if !out.success() {
        return Err(out.failure("hashing the disk", &session.host()));
    }
    let mut res = Vec::new();
    for l in out.stdout_str().lines() {
        let w: Vec<&str> = l.split(' ').collect();
        if let ["S", first, _, h] = w[..] {
            res.push((first.parse()?, h.to_string()));
        }
    }
    if res.len() != ranges.len() {
        bail!(
            "hashing the disk on {} gave {} answers for {} ranges",
            session.host(),
            res.len(),
            ranges.len()
        );
    }
    Ok(res)
}

fn segment_range(size: u64, s: u64) -> Range {
    let first = s * SEGMENT_BLOCKS;
    Range {
        first,
        count: SEGMENT_BLOCKS.min(block_count(size) - first),
    }
}

/// Which blocks must be written: prove every block of the disk holds either
/// what was pulled (`base`) or already what is to be pushed (`new`, left by
/// an interrupted push); refuse otherwise.
async fn plan(
    session: &Session,
    dev: &Device,
    base: &Manifest,
    new: &Manifest,
) -> Result<Vec<u64>> {
    let size = new.size;
    if base.size != size {
        return Err(refused!(
            "the image is {} bytes and its manifest says {}: the manifest is not this image's; \
             push with --full to write every block without the check",
            size,
            base.size
        ));
    }
    let segs: Vec<Range> = (0..new.segments.len() as u64)
        .map(|s| segment_range(size, s))
        .collect();
    let seg_hashes = remote_hashes(session, &dev.path, size, &segs).await?;
    let mut to_write = Vec::new();
    let mut drill = Vec::new();
    for (s, (_, h)) in seg_hashes.iter().enumerate() {
        let r = segs[s];
        if *h == base.segments[s] {
            to_write.extend(
                (r.first..r.first + r.count)
                    .filter(|&b| base.blocks[b as usize] != new.blocks[b as usize]),
            );
        } else if *h == new.segments[s] {
            // Already written by an earlier push.
        } else {
            drill.extend((r.first..r.first + r.count).map(|b| Range { first: b, count: 1 }));
        }
    }
    if !drill.is_empty() {
        let per_block = remote_hashes(session, &dev.path, size, &drill).await?;
        let mut foreign = Vec::new();
        for (b, h) in per_block {
            let i = b as usize;
            if h == new.blocks[i] {
                continue;
            }
            if h == base.blocks[i] {
                to_write.push(b);
            } else {
                foreign.push(b);
            }
        }
        if let Some(first) = foreign.first() {
            return Err(refused!(
                "{} on {} no longer holds what was pulled: {} block(s) of 1 MiB differ from both the \
                 manifest and the image (the first at byte {}). Writing would mix two versions of \
                 the disk; pull it again, or push with --full to overwrite it whole",
                dev.path,
                session.host(),
                foreign.len(),
                first * BLOCK_SIZE
            ));
        }
    }
    to_write.sort_unstable();
    Ok(to_write)
}

pub async fn push(
    session: &Session,
    facts: &Facts,
    opts: &PushOptions,
    ui: &Ui,
) -> Result<PushReport> {
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

    let mode = helper::choose(opts.transfer, facts)?;
    let started = Instant::now();
    let bar = ui.bytes_bar(image_len, "hash");
    let new = hash_image(&opts.image, |n| bar.inc(n))?;
    bar.finish_and_clear();
    let proven = match &base {
        Some(base) => {
            opts.frozen_boot_id.as_deref() == Some(facts.boot_id.as_str())
                && dev.mounts.iter().all(|m| m.read_only)
                && base.size == new.size
        }
        None => false,
    };
    if proven {
        ui.say(format!(
            "{} has run the same boot since the freeze and {} is still read-only: \
             its content is what was pulled",
            session.host(),
            dev.path
        ));
    }
    if mode == Mode::Helper
        && let Some(remote) = helper::install(session, opts.transfer, ui).await?
    {
        return push_helper(
            session, facts, &dev, opts, base, new, proven, started, remote, ui,
        )
        .await;
    }

    let blocks: Vec<u64> = match &base {
        Some(base) if proven => (0..new.blocks.len() as u64)
            .filter(|&b| base.blocks[b as usize] != new.blocks[b as usize])
            .collect(),
        Some(base) => plan(session, &dev, base, &new).await?,
        None => (0..block_count(image_len)).collect(),
    };
    let rs = ranges(&blocks);
    let bytes: u64 = rs.iter().map(|r| range_bytes(image_len, *r)).sum();
    let source = Source {
        host: session.host(),
        device: dev.path.clone(),
        boot_id: facts.boot_id.clone(),
        pulled_at: base
            .as_ref()
            .and_then(|b| b.source.as_ref())
            .map(|s| s.pulled_at.clone())
            .unwrap_or_default(),
    };
    let mut report = PushReport {
        host: session.host(),
        device: dev.path.clone(),
        image: opts.image.clone(),
        size: image_len,
        blocks_total: block_count(image_len),
        blocks_written: blocks.len() as u64,
        ranges: rs.len(),
        bytes_sent: bytes,
        seconds: 0.0,
        digest: new.digest.clone(),
        writer_dir: None,
        writer_own_tmpfs: false,
        transfer: Mode::Dd,
        bytes_on_wire: bytes,
        bytes_written: bytes,
        helper_peak_rss_kib: None,
    };
    if rs.is_empty() {
        ui.say(format!(
            "{} on {} already holds this image; nothing to write",
            dev.path,
            session.host()
        ));
        Manifest {
            source: Some(source),
            ..new
        }
        .save(&manifest_path)?;
        report.seconds = started.elapsed().as_secs_f64();
        return Ok(report);
    }
    ui.confirm(&format!(
        "Write {} ({} of {} blocks, {} ranges) of {} to {} on {}?",
        human_bytes(bytes),
        blocks.len(),
        block_count(image_len),
        rs.len(),
        opts.image.display(),
        dev.path,
        session.host()
    ))?;

    let staged = Staged::stage(session).await?;
    report.writer_dir = Some(staged.tmpfs.dir.clone());
    report.writer_own_tmpfs = staged.tmpfs.mounted;
    let result = write_ranges(session, &staged, &dev, &opts.image, image_len, &rs, ui).await;
    let removed = staged.remove(session).await;
    result?;
    removed?;
    Manifest {
        source: Some(source),
        ..new
    }
    .save(&manifest_path)?;
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// Blocks asked about but not answered yet, at most (a window, so that the
/// requests and the answers flow at once without either side waiting on
/// the other's buffers).
const HASH_WINDOW: u64 = 256;
/// Bytes of writes sent but not yet confirmed, at most.
const WRITE_WINDOW: u64 = 32 << 20;

/// Helper mode: ask the helper for the hashes of the blocks that may need
/// writing (and of their 4 KiB pages), decide page by page, refuse before
/// writing anything if the disk holds something unexpected, then send only
/// the differing pages; each range is written with O_DIRECT, read back and
/// confirmed by the helper.
#[allow(clippy::too_many_arguments)]
async fn push_helper(
    session: &Session,
    facts: &Facts,
    dev: &Device,
    opts: &PushOptions,
    base: Option<Manifest>,
    new: Manifest,
    proven: bool,
    started: Instant,
    remote: Remote,
    ui: &Ui,
) -> Result<PushReport> {
    let size = new.size;
    if let Some(b) = &base
        && b.size != size
    {
        let _ = remote.remove(session).await;
        return Err(refused!(
            "the image is {} bytes and its manifest says {}: the manifest is not this image's; \
             push with --full to write every block without the check",
            size,
            b.size
        ));
    }
    let res = push_with(session, dev, opts, base.as_ref(), &new, proven, &remote, ui).await;
    let removed = remote.finish(session).await;
    let (bytes_on_wire, bytes_written, pages_bytes, ranges, done) = res?;
    removed?;
    let source = Source {
        host: session.host(),
        device: dev.path.clone(),
        boot_id: facts.boot_id.clone(),
        pulled_at: base
            .as_ref()
            .and_then(|b| b.source.as_ref())
            .map(|s| s.pulled_at.clone())
            .unwrap_or_default(),
    };
    let blocks_written = base
        .as_ref()
        .map(|b| {
            b.blocks
                .iter()
                .zip(&new.blocks)
                .filter(|(a, b)| a != b)
                .count() as u64
        })
        .unwrap_or(new.blocks.len() as u64);
    let digest = new.digest.clone();
    Manifest {
        source: Some(source),
        ..new
    }
    .save(&Manifest::path_for(&opts.image))?;
    Ok(PushReport {
        host: session.host(),
        device: dev.path.clone(),
        image: opts.image.clone(),
        size,
        blocks_total: block_count(size),
        blocks_written,
        ranges,
        bytes_sent: pages_bytes,
        seconds: started.elapsed().as_secs_f64(),
        digest,
        writer_dir: Some(remote.tmpfs.dir.clone()),
        writer_own_tmpfs: remote.tmpfs.mounted,
        transfer: Mode::Helper,
        bytes_on_wire,
        bytes_written,
        helper_peak_rss_kib: done.map(|d| d.peak_rss_kib),
    })
}

type PushCounts = (u64, u64, u64, usize, Option<helper::Done>);

#[allow(clippy::too_many_arguments)]
async fn push_with(
    session: &Session,
    dev: &Device,
    opts: &PushOptions,
    base: Option<&Manifest>,
    new: &Manifest,
    proven: bool,
    remote: &Remote,
    ui: &Ui,
) -> Result<PushCounts> {
    let size = new.size;
    let nblocks = block_count(size);
    let mut link = Link::start(session, remote).await?;
    link.send(
        drydock_helper::proto::Msg::Open {
            version: drydock_helper::proto::VERSION,
            device: dev.path.clone(),
            write: true,
        }
        .encode(),
    )
    .await?;
    match link.recv().await? {
        drydock_helper::proto::Msg::Opened { size: s, .. } if s == dev.size => {}
        drydock_helper::proto::Msg::Opened { size: s, .. } => bail!(
            "the helper sees {} as {s} bytes where drydock saw {}",
            dev.path,
            dev.size
        ),
        m => bail!("the helper answered Open with {}", m.name()),
    }

    // Which blocks to look at page by page.
    let mut candidates: Vec<u64> = match base {
        Some(b) if proven => (0..nblocks)
            .filter(|&i| b.blocks[i as usize] != new.blocks[i as usize])
            .collect(),
        Some(b) => {
            // No proof that the disk is untouched: hash all of it on the
            // host (blocks of zeros cost no hashing there).
            let bar = ui.bytes_bar(size, "check");
            let mut out = Vec::new();
            let answers = hash_blocks(&mut link, &[(0, nblocks)], false, |i, h, _| {
                bar.inc(block_len(size, i));
                let (old, neu) = (&b.blocks[i as usize], &new.blocks[i as usize]);
                if helper::same(h, neu) {
                    // Already written (an earlier push), or unchanged.
                } else if helper::same(h, old) || opts.base_image.is_some() {
                    out.push(i);
                } else {
                    return Err(format!(
                        "block {i} (byte {}) differs from both the manifest and the image",
                        i * BLOCK_SIZE
                    ));
                }
                Ok(())
            })
            .await;
            bar.finish_and_clear();
            refuse_changed(answers, dev, session)?;
            out
        }
        None => (0..nblocks).collect(),
    };
    candidates.sort_unstable();

    // Page hashes of the candidates, and what to write.
    let image =
        File::open(&opts.image).with_context(|| format!("cannot open {}", opts.image.display()))?;
    let base_img = match &opts.base_image {
        Some(p) => Some(File::open(p).with_context(|| format!("cannot open {}", p.display()))?),
        None => None,
    };
    let runs: Vec<(u64, u64)> = ranges(&candidates)
        .iter()
        .map(|r| (r.first, r.first + r.count))
        .collect();
    let mut patches: Vec<Patch> = Vec::new();
    let bar = ui.bytes_bar(candidates.len() as u64 * BLOCK_SIZE, "compare");
    let mut nb = vec![0u8; BLOCK_SIZE as usize];
    let mut bb = vec![0u8; BLOCK_SIZE as usize];
    let answers = hash_blocks(&mut link, &runs, true, |i, h, pages| {
        bar.inc(BLOCK_SIZE);
        let len = block_len(size, i) as usize;
        image
            .read_exact_at(&mut nb[..len], i * BLOCK_SIZE)
            .map_err(|e| format!("cannot read the image: {e}"))?;
        let base_block = match &base_img {
            Some(f) => {
                f.read_exact_at(&mut bb[..len], i * BLOCK_SIZE)
                    .map_err(|e| format!("cannot read the base image: {e}"))?;
                Some(&bb[..len])
            }
            None => None,
        };
        let old = match base {
            Some(b) => Some(manifest::from_hex(&b.blocks[i as usize]).map_err(|e| e.to_string())?),
            None => None,
        };
        let p = helper::plan_block(i, h, pages, old.as_ref(), &nb[..len], base_block)?;
        patches.extend(p);
        Ok(())
    })
    .await;
    bar.finish_and_clear();
    refuse_changed(answers, dev, session)?;

    let total: u64 = patches.iter().map(|p| p.len as u64).sum();
    if patches.is_empty() {
        ui.say(format!(
            "{} on {} already holds this image; nothing to write",
            dev.path,
            session.host()
        ));
    } else {
        ui.confirm(&format!(
            "Write {} ({} ranges of 4 KiB pages) of {} to {} on {}?",
            human_bytes(total),
            patches.len(),
            opts.image.display(),
            dev.path,
            session.host()
        ))?;
    }

    // Send the pages, at most WRITE_WINDOW bytes unconfirmed.
    let bar = ui.bytes_bar(total, "push");
    let mut z = zstd::bulk::Compressor::new(helper::PUSH_LEVEL)?;
    let mut in_flight: std::collections::VecDeque<Patch> = Default::default();
    let mut in_flight_bytes = 0u64;
    let mut next = 0;
    let partly = |e: anyhow::Error| {
        e.context(format!(
            "the push stopped with {} partly written: run the same push again to finish it \
             (ranges already written are recognised)",
            dev.path
        ))
    };
    while next < patches.len() || !in_flight.is_empty() {
        if next < patches.len() && in_flight_bytes < WRITE_WINDOW {
            let p = patches[next];
            next += 1;
            let frame = helper::write_frame(&image, p, &mut z)?;
            link.send(frame).await.map_err(partly)?;
            in_flight.push_back(p);
            in_flight_bytes += p.len as u64;
            continue;
        }
        match link.recv().await.map_err(partly)? {
            drydock_helper::proto::Msg::Written { offset, len } => {
                let p = in_flight
                    .pop_front()
                    .context("the helper confirmed a write not sent")?;
                if p.offset != offset || p.len != len {
                    bail!("the helper confirmed {len} bytes at {offset}, not the range sent");
                }
                in_flight_bytes -= len as u64;
                bar.inc(len as u64);
            }
            m => bail!("the helper sent {} during the writes", m.name()),
        }
    }
    bar.finish_and_clear();
    link.send(drydock_helper::proto::Msg::Finish.encode())
        .await?;
    let done = match link.recv().await.map_err(partly)? {
        drydock_helper::proto::Msg::Done {
            peak_rss_kib,
            bytes_read,
            bytes_written,
        } => helper::Done {
            peak_rss_kib,
            bytes_read,
            bytes_written,
        },
        m => bail!("the helper answered Finish with {}", m.name()),
    };
    if !patches.is_empty() {
        ui.say(format!(
            "wrote, read back and checked {} in {} ranges on {} (helper peak memory {})",
            human_bytes(total),
            patches.len(),
            dev.path,
            human_bytes(done.peak_rss_kib * 1024)
        ));
    }
    Ok((
        link.sent,
        done.bytes_written,
        total,
        patches.len(),
        Some(done),
    ))
}

/// Ask for the hashes of blocks in `runs` ([first, end) each), keeping at
/// most HASH_WINDOW blocks asked and unanswered; `each` sees every answer
/// in order and may refuse (its message ends the exchange, nothing
/// written). The outer `Result` is a failure of the exchange itself.
async fn hash_blocks(
    link: &mut Link,
    runs: &[(u64, u64)],
    pages: bool,
    mut each: impl FnMut(u64, &[u8; 32], &[u8]) -> Result<(), String>,
) -> Result<Result<(), String>> {
    // Split the runs so that no request exceeds the window.
    let mut reqs = Vec::new();
    for &(a, b) in runs {
        let mut x = a;
        while x < b {
            let y = (x + HASH_WINDOW).min(b);
            reqs.push((x, y));
            x = y;
        }
    }
    let expected: Vec<u64> = runs.iter().flat_map(|&(a, b)| a..b).collect();
    let mut asked = 0u64;
    let mut answered = 0usize;
    let mut r = 0;
    let mut verdict = Ok(());
    while answered < expected.len() {
        while r < reqs.len() && asked - answered as u64 + (reqs[r].1 - reqs[r].0) <= HASH_WINDOW {
            let (first, end) = reqs[r];
            link.send(drydock_helper::proto::Msg::HashBlocks { first, end, pages }.encode())
                .await?;
            asked += end - first;
            r += 1;
        }
        match link.recv().await? {
            drydock_helper::proto::Msg::BlockHash {
                index,
                hash,
                pages: p,
            } => {
                if index != expected[answered] {
                    bail!(
                        "the helper answered for block {index}, expected {}",
                        expected[answered]
                    );
                }
                answered += 1;
                if verdict.is_ok() {
                    verdict = each(index, &hash, &p);
                }
            }
            m => bail!("the helper sent {} while hashing", m.name()),
        }
    }
    Ok(verdict)
}

fn refuse_changed(
    answers: Result<Result<(), String>>,
    dev: &Device,
    session: &Session,
) -> Result<()> {
    match answers? {
        Ok(()) => Ok(()),
        Err(why) => Err(refused!(
            "{} on {} no longer holds what was pulled: {why}. Writing would mix two versions \
             of the disk; nothing was written. Pull it again, or push with --full to overwrite \
             it whole",
            dev.path,
            session.host()
        )),
    }
}

/// The writer script: each range read from stdin by its own dd, a sync,
/// then every range read back and hashed; all from the tmpfs.
fn writer_script(st: &Staged, dev: &Device, size: u64, rs: &[Range]) -> String {
    let dd = st.tool("dd");
    let (oflag, iflag) = if dev.is_block() {
        ("oflag=direct", "IF=iflag=direct")
    } else {
        ("", "IF=")
    };
    let mut s = format!(
        "export LC_ALL=C; DEV={}\nQ=; {dd} if=/dev/null of=/dev/null status=none 2>/dev/null && Q=status=none\n{iflag}\n",
        shell_quote(&dev.path)
    );
    for r in rs {
        let bytes = range_bytes(size, *r);
        let full = bytes / BLOCK_SIZE;
        let rest = bytes % BLOCK_SIZE;
        if full > 0 {
            s.push_str(&format!(
                "{dd} of=\"$DEV\" bs={BLOCK_SIZE} seek={} count={full} iflag=fullblock {oflag} conv=notrunc $Q || exit 1\n",
                r.first
            ));
        }
        if rest > 0 {
            // The image's last, short block: 512-byte units when they fit
            // (always, for a real disk), else single bytes.
            let off = (r.first + full) * BLOCK_SIZE;
            let unit = if rest.is_multiple_of(512) { 512 } else { 1 };
            s.push_str(&format!(
                "{dd} of=\"$DEV\" bs={unit} seek={} count={} iflag=fullblock conv=notrunc $Q || exit 1\n",
                off / unit,
                rest / unit
            ));
        }
    }
    s.push_str(&format!("{} || exit 1\necho synced\n", st.tool("sync")));
    for r in rs {
        s.push_str(&hash_range_cmd(
            "V",
            *r,
            size,
            &dd,
            &st.tool("head"),
            &st.tool("sha256sum"),
        ));
    }
    s
}

async fn write_ranges(
    session: &Session,
    st: &Staged,
    dev: &Device,
    image: &std::path::Path,
    size: u64,
    rs: &[Range],
    ui: &Ui,
) -> Result<()> {
    let script = writer_script(st, dev, size, rs);
    let path = format!("{}/write.sh", st.tmpfs.dir);
    session.upload(&path, script.as_bytes(), false).await?;
    let total: u64 = rs.iter().map(|r| range_bytes(size, *r)).sum();
    let bar = ui.bytes_bar(total, "push");
    let f = File::open(image).with_context(|| format!("cannot open {}", image.display()))?;

    let mut channel = session.open_exec(&st.exec_script(&path)).await?;
    let mut expected = Vec::with_capacity(rs.len());
    let mut buf = vec![0u8; BLOCK_SIZE as usize];
    for r in rs {
        let mut h = Sha256::new();
        for b in r.first..r.first + r.count {
            let len = block_len(size, b) as usize;
            f.read_exact_at(&mut buf[..len], b * BLOCK_SIZE)?;
            h.update(&buf[..len]);
            channel.data(&buf[..len]).await.with_context(|| {
                format!("the connection to {} broke during the push", session.host())
            })?;
            bar.inc(len as u64);
        }
        expected.push((r.first, hex::encode(h.finalize())));
    }
    channel.eof().await.ok();
    bar.finish_and_clear();

    let mut stdout = String::new();
    let mut stderr = String::new();
    let mut status = None;
    while let Some(msg) = channel.wait().await {
        match msg {
            ChannelMsg::Data { data } => stdout.push_str(&String::from_utf8_lossy(&data)),
            ChannelMsg::ExtendedData { data, .. } => {
                stderr.push_str(&String::from_utf8_lossy(&data))
            }
            ChannelMsg::ExitStatus { exit_status } => status = Some(exit_status),
            _ => {}
        }
    }
    if status != Some(0) {
        bail!(
            "the writer on {} failed ({}) after writing part of {}: the disk is now partly \
             written. Run the same push again to finish it (blocks already written are \
             recognised); the writer said:\n  {}",
            session.host(),
            status
                .map(|s| format!("exit status {s}"))
                .unwrap_or("connection lost".into()),
            dev.path,
            stderr.trim().replace('\n', "\n  ")
        );
    }
    let got: Vec<(u64, String)> = stdout
        .lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split(' ').collect();
            match w[..] {
                ["V", first, _, h] => Some((first.parse().ok()?, h.to_string())),
                _ => None,
            }
        })
        .collect();
    if got != expected {
        let bad = expected
            .iter()
            .find(|e| !got.contains(e))
            .map(|e| e.0 * BLOCK_SIZE)
            .unwrap_or(0);
        bail!(
            "reading back what was written to {} on {} does not match the image (first bad range \
             at byte {bad}); the disk is not what the image says: push again",
            dev.path,
            session.host()
        );
    }
    ui.say(format!(
        "wrote and read back {} in {} ranges to {} on {}",
        human_bytes(total),
        rs.len(),
        dev.path,
        session.host()
    ));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
