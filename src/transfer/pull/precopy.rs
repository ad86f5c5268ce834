//! Pre-copy: the pull of a frozen disk into an image that already holds a
//! live copy of it (a rehearsal's). The helper reads the whole disk on the
//! host and hashes it at disk speed; only the blocks whose hash differs
//! from the live copy's manifest cross the link, each checked against the
//! hash the helper read. The image's new manifest is the host's hashes, so
//! the base is exact and verified as after a full pull.
//!
//! `IMAGE.precopy` lists the blocks about to be rewritten, synced before
//! the first of them is: a pre-copy cut anywhere is run again, and those
//! blocks are fetched again whatever their hash says.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};
use drydock_helper::proto::{Msg, VERSION};

use super::{PullOptions, PullReport};
use crate::errors::refused;
use crate::image::manifest::{
    BLOCK_SIZE, Hash, Manifest, SEGMENT_BLOCKS, SegmentHasher, Source, block_count, block_len,
    from_hex, is_zero, sha256, to_hex, zero_hash,
};
use crate::remote::Facts;
use crate::remote::device::{self, Device};
use crate::ssh::Session;
use crate::transfer::helper::{self, Link, Mode, PULL_LEVEL, Remote};
use crate::ui::{Ui, human_bytes};
use crate::util::write_atomic;

/// Blocks asked for and not yet received, at most: 32 MiB of data in
/// flight, whatever the link.
const READ_WINDOW: u64 = 32;

/// `IMAGE.precopy`.
pub fn state_path(image: &Path) -> PathBuf {
    let mut p = image.as_os_str().to_owned();
    p.push(".precopy");
    PathBuf::from(p)
}

/// Whether IMAGE holds a finished copy (its manifest) that a pre-copy can
/// start from.
pub fn can_start_from(image: &Path) -> bool {
    image.exists() && Manifest::path_for(image).exists()
}

/// Bring IMAGE, a live copy of the host's disk with its manifest, up to
/// the disk as it is now (frozen). When it cannot be updated (no helper
/// on the host, a disk of another size), the inner error says why and
/// nothing was changed: the caller pulls the whole disk, or refuses.
/// Over 80 lines: the refusal (another host or disk) and the reasons to fall
/// back to a whole pull (another size, no helper), each in its own words,
/// then the manifest and the report's fields; the update itself is in
/// `with_helper`.
pub async fn precopy(
    session: &Session,
    facts: &Facts,
    opts: &PullOptions,
    ui: &Ui,
) -> Result<Result<PullReport, String>> {
    let image = &opts.output;
    let live = Manifest::load(&Manifest::path_for(image))?;
    let dev = device::inspect(session, facts, opts.device.as_deref()).await?;
    super::check_mounts(&dev, opts.live, session, ui)?;
    if let Some(src) = &live.source
        && (src.host != session.host() || src.device != dev.path)
    {
        return Err(refused!(
            "{} is a copy of {}:{}, not of {}:{}; drydock will not mix two disks: pull into \
             another --output",
            image.display(),
            src.host,
            src.device,
            session.host(),
            dev.path
        ));
    }
    if dev.size != live.size {
        return Ok(Err(format!(
            "{} on {} is {} bytes and the copy {} was {}: the disk changed size since the copy \
             was made",
            dev.path,
            session.host(),
            dev.size,
            image.display(),
            live.size
        )));
    }
    if helper::choose(opts.transfer, facts)? != Mode::Helper {
        return Ok(Err(format!(
            "drydock's helper cannot run on {} (dd mode), and an update needs it",
            session.host()
        )));
    }
    let Some(remote) = helper::install(session, opts.transfer, ui).await? else {
        return Ok(Err(format!(
            "drydock's helper could not be started on {}, and an update needs it",
            session.host()
        )));
    };
    let started = Instant::now();
    let res = with_helper(session, &remote, &dev, (image, &live), opts.live, ui).await;
    let removed = remote.finish(session).await;
    let got = res.map_err(|e| stopped(e, image))?;
    removed?;
    let manifest = Manifest::new(
        dev.size,
        Some(Source::read_now(session.host(), &dev.path, &facts.boot_id)),
        got.segments,
        got.blocks,
    )?;
    manifest.save(&Manifest::path_for(image))?;
    std::fs::remove_file(state_path(image)).ok();
    let blocks = block_count(dev.size);
    Ok(Ok(PullReport {
        host: session.host(),
        device: dev.path,
        image: image.clone(),
        manifest: Manifest::path_for(image),
        size: dev.size,
        resumed_at: 0,
        bytes_on_wire: got.bytes_on_wire,
        bytes_written: got.bytes_written,
        seconds: started.elapsed().as_secs_f64(),
        digest: manifest.digest,
        hasher: format!(
            "drydock's helper (SHA-256, zstd); pre-copy: {} of {blocks} blocks differed from \
             the live copy and were sent",
            got.fetched
        ),
        transfer: Mode::Helper,
        helper_dir: Some(remote.tmpfs.dir.clone()),
        helper_peak_rss_kib: Some(got.peak_rss_kib),
    }))
}

struct Got {
    segments: Vec<String>,
    blocks: Vec<String>,
    fetched: u64,
    bytes_on_wire: u64,
    bytes_written: u64,
    peak_rss_kib: u64,
}

/// With the helper running: hash the host's disk, fetch the blocks that
/// differ from IMAGE (or that an interrupted update was rewriting), and
/// give the new manifest's segments and block hashes.
/// Over 80 lines: the update in order, each step using the last's state
/// (the host's hashes; the dirty set saved before any write; the blocks to
/// fetch, after checking those an earlier run may have written; the fetch
/// and the helper's Finish; the touched segments hashed again, each block
/// checked against the host); split, the dirty set and host hashes would
/// be passed through every piece.
async fn with_helper(
    session: &Session,
    remote: &Remote,
    dev: &Device,
    (image, live): (&Path, &Manifest),
    moving: bool,
    ui: &Ui,
) -> Result<Got> {
    let size = dev.size;
    let n = block_count(size);
    let (mut link, mut host) = open_and_hash(session, remote, dev, ui).await?;
    // Blocks an interrupted update was rewriting: fetched again unless
    // the image already holds what the host does (it got that far).
    let earlier: BTreeSet<u64> = read_state(image)?;
    let mut dirty = earlier.clone();
    for (i, h) in host.iter().enumerate() {
        if from_hex(&live.blocks[i]).ok().as_ref() != Some(h) {
            dirty.insert(i as u64);
        }
    }
    write_state(image, &dirty)?;
    let local = File::open(image).with_context(|| format!("cannot open {}", image.display()))?;
    let mut buf = vec![0u8; BLOCK_SIZE as usize];
    let mut fetch = Vec::new();
    for &i in &dirty {
        if earlier.contains(&i) {
            let len = block_len(size, i) as usize;
            local.read_exact_at(&mut buf[..len], i * BLOCK_SIZE)?;
            if sha256(&buf[..len]) == host[i as usize] {
                continue;
            }
        }
        fetch.push(i);
    }
    // The segments to hash again: all those with a block rewritten, now
    // or by the interrupted update.
    let touched_blocks: Vec<u64> = dirty.into_iter().collect();
    let fetch_bytes: u64 = fetch.iter().map(|&i| block_len(size, i)).sum();
    ui.say(format!(
        "pre-copy: {} of {n} blocks of {}:{} differ from {} ({})",
        fetch.len(),
        session.host(),
        dev.path,
        image.display(),
        human_bytes(fetch_bytes)
    ));

    let file = OpenOptions::new()
        .write(true)
        .read(true)
        .open(image)
        .with_context(|| format!("cannot open {}", image.display()))?;
    let bar = ui.bytes_bar(fetch_bytes, "pull");
    let mut sink = FileSink {
        file: &file,
        buf: vec![0u8; BLOCK_SIZE as usize],
    };
    let written = fetch_blocks(
        &mut link,
        &mut sink,
        size,
        &fetch,
        (&mut host, moving),
        |len| bar.inc(len),
    )
    .await?;
    bar.finish();
    link.send(Msg::Finish.encode()).await?;
    let peak_rss_kib = match link.recv().await? {
        Msg::Done { peak_rss_kib, .. } => peak_rss_kib,
        m => bail!("the helper answered Finish with {}", m.name()),
    };
    let bytes_on_wire = link.received;
    link.close().await;
    file.sync_all()?;

    // The new manifest: the host's block hashes; a segment's hash kept
    // from the live copy when none of its blocks was rewritten, else
    // hashed again from the image (and its blocks checked once more).
    let mut segments = live.segments.clone();
    let mut touched: Vec<u64> = touched_blocks.iter().map(|b| b / SEGMENT_BLOCKS).collect();
    touched.dedup();
    for s in touched {
        let mut h = SegmentHasher::default();
        for i in s * SEGMENT_BLOCKS..((s + 1) * SEGMENT_BLOCKS).min(n) {
            let len = block_len(size, i) as usize;
            file.read_exact_at(&mut buf[..len], i * BLOCK_SIZE)?;
            h.add_block(&buf[..len]);
            if h.blocks.last().map(String::as_str) != Some(to_hex(&host[i as usize]).as_str()) {
                bail!(
                    "block {i} of {} does not hold what the host read after it was written; \
                     the local disk may be failing. Run the same command again",
                    image.display()
                );
            }
        }
        segments[s as usize] = h.finish().0;
    }
    Ok(Got {
        segments,
        blocks: host.iter().map(to_hex).collect(),
        fetched: fetch.len() as u64,
        bytes_on_wire,
        bytes_written: written,
        peak_rss_kib,
    })
}

/// The helper's link, the device opened for reading, and the hash of
/// every block of it as the host reads it now (at disk speed there).
pub(crate) async fn open_and_hash(
    session: &Session,
    remote: &Remote,
    dev: &Device,
    ui: &Ui,
) -> Result<(Link, Vec<Hash>)> {
    let size = dev.size;
    let n = block_count(size);
    let mut link = Link::start(session, remote).await?;
    link.send(
        Msg::Open {
            version: VERSION,
            device: dev.path.clone(),
            write: false,
        }
        .encode(),
    )
    .await?;
    match link.recv().await? {
        Msg::Opened { size: s, .. } if s == size => {}
        Msg::Opened { size: s, .. } => bail!(
            "the helper sees {} as {s} bytes where drydock saw {size}",
            dev.path
        ),
        m => bail!("the helper answered Open with {}", m.name()),
    }
    let bar = ui.bytes_bar(size, "check");
    let mut host: Vec<Hash> = Vec::with_capacity(n as usize);
    link.hash_blocks(&[(0, n)], false, |i, h, _| {
        bar.inc(block_len(size, i));
        host.push(*h);
        Ok(())
    })
    .await?
    .map_err(|e| anyhow!(e))?;
    bar.finish();
    Ok((link, host))
}

/// Where [`fetch_blocks`] puts what it read.
pub(crate) trait BlockSink {
    /// Block I, its content DATA (checked against HASH) and the helper's
    /// zstd frame of it (FRAME).
    fn block(&mut self, i: u64, data: &[u8], frame: &[u8], hash: &Hash) -> Result<()>;
    /// Block I holds LEN bytes of zeros.
    fn zeros(&mut self, i: u64, len: u64) -> Result<()>;
}

/// The image being brought up to date.
struct FileSink<'a> {
    file: &'a File,
    buf: Vec<u8>,
}

impl BlockSink for FileSink<'_> {
    fn block(&mut self, i: u64, data: &[u8], _frame: &[u8], _hash: &Hash) -> Result<()> {
        Ok(self.file.write_all_at(data, i * BLOCK_SIZE)?)
    }

    /// Written as zeros (the image stays the same size; a hole would do,
    /// but the blocks are few), unless it holds zeros already.
    fn zeros(&mut self, i: u64, len: u64) -> Result<()> {
        let buf = &mut self.buf[..len as usize];
        self.file.read_exact_at(buf, i * BLOCK_SIZE)?;
        if !is_zero(buf) {
            buf.fill(0);
            self.file.write_all_at(buf, i * BLOCK_SIZE)?;
        }
        Ok(())
    }
}

/// Read the blocks FETCH (ascending) from the helper into SINK, each
/// checked against the hash it was read with and the one the host's
/// hashing gave (HOST); at most READ_WINDOW blocks asked and unanswered.
/// A block that changed since its hashing is refused, unless MOVING (a
/// live copy): then HOST takes the hash it was read with.
/// Over 80 lines: one loop that keeps the read window full and takes each
/// answer in the order asked (a block decompressed and checked against both
/// hashes, or a run of zero blocks); split, the window's counters and the
/// expected-block iterator would be shared across functions.
pub(crate) async fn fetch_blocks(
    link: &mut Link,
    sink: &mut impl BlockSink,
    size: u64,
    fetch: &[u64],
    (host, moving): (&mut [Hash], bool),
    mut progress: impl FnMut(u64),
) -> Result<u64> {
    // Runs of consecutive blocks, each at most the window.
    let mut reqs: Vec<(u64, u64)> = Vec::new();
    for &b in fetch {
        if let Some(last) = reqs.last_mut()
            && last.1 == b
            && last.1 - last.0 < READ_WINDOW
        {
            last.1 = b + 1;
            continue;
        }
        reqs.push((b, b + 1));
    }
    let mut unz = zstd::bulk::Decompressor::new()?;
    let mut buf = vec![0u8; BLOCK_SIZE as usize];
    let (mut asked, mut answered, mut r) = (0u64, 0u64, 0usize);
    let mut expected = fetch.iter().copied();
    let mut want = expected.next();
    let mut written = 0u64;
    while let Some(i) = want {
        while r < reqs.len() && asked - answered + (reqs[r].1 - reqs[r].0) <= READ_WINDOW {
            let (first, end) = reqs[r];
            link.send(
                Msg::Read {
                    first,
                    end,
                    level: PULL_LEVEL,
                }
                .encode(),
            )
            .await?;
            asked += end - first;
            r += 1;
        }
        let (from, count) = match link.recv().await? {
            Msg::Zero { first, count } => (first, count),
            Msg::Block { index, hash, data } => {
                let len = block_len(size, index) as usize;
                let got = unz
                    .decompress_to_buffer(&data, &mut buf[..len])
                    .map_err(|e| anyhow!("block {index} does not decompress: {e}"))?;
                if index != i || got != len || sha256(&buf[..len]) != hash {
                    bail!(
                        "block {index} arrived damaged or out of order (expected block {i}); \
                         nothing of it was written. Run the same command again"
                    );
                }
                if hash != host[i as usize] {
                    if !moving {
                        return Err(changed(i));
                    }
                    host[i as usize] = hash;
                }
                sink.block(i, &buf[..len], &data, &hash)?;
                (i, 0)
            }
            m => bail!("the helper sent {} while reading", m.name()),
        };
        if count == 0 {
            written += block_len(size, from);
            progress(block_len(size, from));
            answered += 1;
            want = expected.next();
            continue;
        }
        for z in from..from + count {
            if want != Some(z) {
                bail!("the helper's stream is out of order (block {z}, expected {want:?})");
            }
            let len = block_len(size, z);
            if host[z as usize] != zero_hash(len) {
                if !moving {
                    return Err(changed(z));
                }
                host[z as usize] = zero_hash(len);
            }
            sink.zeros(z, len)?;
            written += len;
            progress(len);
            answered += 1;
            want = expected.next();
        }
    }
    Ok(written)
}

/// An update that stopped on the link (cut, helper gone, silence) is
/// finished by the same command; a refusal or a local error is what it is.
fn stopped(e: anyhow::Error, image: &Path) -> anyhow::Error {
    if e.downcast_ref::<crate::errors::Refused>().is_some()
        || e.chain().any(|c| c.is::<std::io::Error>())
    {
        return e;
    }
    crate::errors::resumable!(
        "{e:#}: {} is partly brought up to date (the blocks being rewritten are listed in {}); \
         run the same command again to finish it",
        image.display(),
        state_path(image).display()
    )
}

/// A block that changed between the host's hashing and its read: the
/// disk is not frozen.
pub(crate) fn changed(i: u64) -> anyhow::Error {
    refused!(
        "block {i} of the disk changed while drydock read it: the disk is being written to, \
         so it is not frozen; freeze it and run the same command again (or pass --live for a \
         crash-consistent copy)"
    )
}

/// The blocks an interrupted pre-copy was about to rewrite.
fn read_state(image: &Path) -> Result<BTreeSet<u64>> {
    let p = state_path(image);
    match std::fs::read_to_string(&p) {
        Ok(t) => t
            .split_whitespace()
            .map(|w| {
                w.parse()
                    .with_context(|| format!("{} is damaged ('{w}')", p.display()))
            })
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeSet::new()),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", p.display())),
    }
}

/// Synced before the first block is rewritten.
fn write_state(image: &Path, fetch: &BTreeSet<u64>) -> Result<()> {
    let text: Vec<String> = fetch.iter().map(u64::to_string).collect();
    write_atomic(&state_path(image), text.join("\n").as_bytes())
}
