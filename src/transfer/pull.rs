//! `drydock pull` in dd mode: the disk streamed over one exec channel into a
//! sparse local image. Every 16 MiB segment is hashed on the VPS before it
//! is sent, a segment of zeros is not sent at all, and the hash of what
//! arrived is compared with the VPS's. Verified segments are appended to
//! `IMAGE.pull`; an interrupted pull resumes after the last of them.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use russh::ChannelMsg;
use serde::{Deserialize, Serialize};

use crate::errors::Interrupted;
use crate::image::manifest::{
    BLOCK_SIZE, Manifest, SEGMENT_BLOCKS, SegmentHasher, Source, block_count, block_len, is_zero,
    sha256, zero_hash,
};
use crate::remote::Facts;
use crate::remote::device::{self, Device};
use crate::ssh::{Session, shell_quote};
use crate::transfer::helper::{self, Mode};
use crate::ui::{Ui, human_bytes};
use crate::{refused, transfer};

#[derive(Debug, Clone)]
pub struct PullOptions {
    pub output: PathBuf,
    pub device: Option<String>,
    pub live: bool,
    pub transfer: Mode,
}

#[derive(Debug, Serialize)]
pub struct PullReport {
    pub host: String,
    pub device: String,
    pub image: PathBuf,
    pub manifest: PathBuf,
    pub size: u64,
    pub resumed_at: u64,
    /// Bytes that came over the SSH channel (compressed frames in helper
    /// mode; segments of zeros are not sent at all).
    pub bytes_on_wire: u64,
    /// Bytes of the image this pull filled in (from `resumed_at` to the
    /// end; zeros as holes).
    pub bytes_written: u64,
    pub seconds: f64,
    pub digest: String,
    pub hasher: String,
    pub transfer: Mode,
    /// Helper mode: where it ran on the host (removed afterwards) and its
    /// own peak resident memory.
    pub helper_dir: Option<String>,
    pub helper_peak_rss_kib: Option<u64>,
}

impl PullReport {
    pub fn human(&self) -> String {
        format!(
            "pulled {}:{} to {} ({} in {:.1}s, {} on the wire at {}/s{}); verified by {} on the host{}, digest {}\n",
            self.host,
            self.device,
            self.image.display(),
            human_bytes(self.size),
            self.seconds,
            human_bytes(self.bytes_on_wire),
            human_bytes((self.bytes_on_wire as f64 / self.seconds.max(0.001)) as u64),
            if self.resumed_at > 0 {
                format!(", resumed at {}", human_bytes(self.resumed_at))
            } else {
                String::new()
            },
            self.hasher,
            self.helper_peak_rss_kib
                .map(|k| format!(" (helper peak memory {})", human_bytes(k * 1024)))
                .unwrap_or_default(),
            self.digest
        )
    }
}

/// The first line of `IMAGE.pull`: what is being pulled.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct PullHeader {
    format: String,
    host: String,
    device: String,
    size: u64,
    boot_id: String,
    started_at: String,
}

const STATE_FORMAT: &str = "drydock-pull/1";

pub fn state_path(image: &Path) -> PathBuf {
    let mut p = image.as_os_str().to_owned();
    p.push(".pull");
    PathBuf::from(p)
}

/// One verified segment, as a line of `IMAGE.pull`.
#[derive(Debug, Clone)]
struct Verified {
    first_block: u64,
    segment: String,
    blocks: Vec<String>,
}

impl Verified {
    fn line(&self) -> String {
        format!(
            "S {} {} {}\n",
            self.first_block,
            self.segment,
            self.blocks.join(",")
        )
    }

    fn parse(line: &str) -> Option<Verified> {
        let mut w = line.split(' ');
        (w.next()? == "S").then_some(())?;
        let first_block = w.next()?.parse().ok()?;
        let segment = w.next()?.to_string();
        let blocks = w.next()?.split(',').map(str::to_string).collect();
        Some(Verified {
            first_block,
            segment,
            blocks,
        })
    }
}

/// What an earlier, interrupted pull left.
fn read_state(path: &Path) -> Result<Option<(PullHeader, Vec<Verified>)>> {
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let mut lines = BufReader::new(f).lines();
    let header: PullHeader = match lines.next() {
        Some(l) => {
            serde_json::from_str(&l?).with_context(|| format!("{} is damaged", path.display()))?
        }
        None => return Ok(None),
    };
    let mut segs = Vec::new();
    let mut next = 0;
    for l in lines {
        let l = l?;
        // A torn last line (crash mid-append) is simply not counted.
        match Verified::parse(&l) {
            Some(v) if v.first_block == next => {
                next += v.blocks.len() as u64;
                segs.push(v);
            }
            _ => break,
        }
    }
    Ok(Some((header, segs)))
}

/// The remote half. For each segment of blocks [start, end) it reads and
/// hashes the segment first; a segment whose hash is that of zeros is sent
/// as a header alone (`Z first count`), any other as `D first count hash`
/// followed by its bytes (a second read, from the page cache). Headers are
/// in-band on stdout, so the local side always knows what the next bytes
/// are. The hasher is chosen by measuring both on the host: openssl wins
/// where SHA-NI runs natively, sha256sum under emulation.
fn remote_script(dev: &str, start: u64, end: u64, zfull: &str, zlast: &str) -> String {
    format!(
        r#"export LC_ALL=C; DEV={dev}; BS={bs}; SEG={seg}; i={start}; END={end}; ZFULL={zfull}; ZLAST={zlast}
{pick}echo "hasher $H" >&2
while [ "$i" -lt "$END" ]; do
  n=$SEG; [ $((i + n)) -gt "$END" ] && n=$((END - i))
  h=$(dd if="$DEV" bs=$BS skip=$i count=$n $Q | $H) || exit 1
  h=${{h%% *}}
  z=$ZFULL; [ $((i + n)) -eq "$END" ] && z=$ZLAST
  if [ "$h" = "$z" ]; then
    printf 'Z %s %s\n' "$i" "$n"
  else
    printf 'D %s %s %s\n' "$i" "$n" "$h"
    dd if="$DEV" bs=$BS skip=$i count=$n $Q || exit 1
  fi
  i=$((i + n))
done
"#,
        dev = shell_quote(dev),
        bs = BLOCK_SIZE,
        seg = SEGMENT_BLOCKS,
        pick = transfer::HASHER_PICK,
    )
}

/// What the next bytes of the dd stream are.
enum Expect {
    Header(Vec<u8>),
    /// Data of a segment (its host hash is in the sink's `expected`).
    Data,
}

/// The local image, filled in block order, and the state file recording
/// each verified segment. Shared by both transfer modes; runs on the
/// writer thread (hashing and disk writes are blocking work).
struct Sink {
    image: File,
    state: File,
    size: u64,
    next_block: u64,
    seg: SegmentHasher,
    seg_first: u64,
    /// The host's hash of the current segment (dd mode); in helper mode
    /// every block was checked on arrival.
    expected: Option<String>,
    /// Blocks received or known zero (for the progress bar).
    covered: Arc<AtomicU64>,
    /// Blocks verified and durable (what a resume would skip).
    verified_blocks: Arc<AtomicU64>,
    /// Blocks verified, durable or not yet.
    verified_upto: u64,
    pending: Vec<Verified>,
    /// When the verified segments were last made durable.
    flushed_at: std::time::Instant,
    end_block: u64,
}

impl Sink {
    fn segment_end(&self) -> u64 {
        (self.seg_first + SEGMENT_BLOCKS).min(self.end_block)
    }

    fn advanced(&mut self) -> Result<()> {
        self.next_block += 1;
        self.covered.store(self.next_block, Ordering::Relaxed);
        if self.next_block < self.segment_end() {
            return Ok(());
        }
        let (local, blocks) = std::mem::take(&mut self.seg).finish();
        let first = self.seg_first;
        if let Some(hash) = self.expected.take()
            && local != hash
        {
            bail!(
                "the data received for bytes {}.. does not match what the host read \
                 (host {hash}, here {local}); nothing after the last verified segment was kept: \
                 run the same command again",
                first * BLOCK_SIZE
            );
        }
        self.seg_first = self.next_block;
        self.verified(first, local, blocks)
    }

    fn verified(&mut self, first: u64, segment: String, blocks: Vec<String>) -> Result<()> {
        self.verified_upto = first + blocks.len() as u64;
        start_writeback(
            &self.image,
            first * BLOCK_SIZE,
            blocks.len() as u64 * BLOCK_SIZE,
        );
        self.pending.push(Verified {
            first_block: first,
            segment,
            blocks,
        });
        if self.pending.len() >= FLUSH_SEGMENTS || self.flushed_at.elapsed() >= FLUSH_EVERY {
            self.flush()?;
        }
        Ok(())
    }

    /// Make the verified segments durable: image data first, then the
    /// state lines that claim it (so a crash never claims unsynced data).
    fn flush(&mut self) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        self.image
            .sync_data()
            .context("cannot sync the local image")?;
        let mut text = String::new();
        for v in self.pending.drain(..) {
            text.push_str(&v.line());
        }
        self.state.write_all(text.as_bytes())?;
        self.state.sync_data()?;
        self.verified_blocks
            .store(self.verified_upto, Ordering::Relaxed);
        self.flushed_at = std::time::Instant::now();
        Ok(())
    }
}

impl helper::BlockSink for Sink {
    fn next_block(&self) -> u64 {
        self.next_block
    }

    fn zeros(&mut self, count: u64) -> Result<()> {
        if self.next_block + count > self.end_block {
            bail!("the host sent zeros past the end of the disk");
        }
        // Nothing was sent: make sure the image holds zeros there (a
        // hole), even over an earlier attempt's data.
        let off = self.next_block * BLOCK_SIZE;
        let len = ((self.next_block + count) * BLOCK_SIZE).min(self.size) - off;
        rustix::fs::fallocate(
            &self.image,
            rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
            off,
            len,
        )
        .context("cannot punch a hole in the local image")?;
        for _ in 0..count {
            self.seg
                .add_zero_block(block_len(self.size, self.next_block));
            self.advanced()?;
        }
        Ok(())
    }

    fn block(&mut self, data: &[u8], hash: [u8; 32]) -> Result<()> {
        if self.next_block >= self.end_block {
            bail!("the host sent data past the end of the disk");
        }
        if !is_zero(data) {
            self.image
                .write_all_at(data, self.next_block * BLOCK_SIZE)
                .context("cannot write the local image")?;
        }
        self.seg.add_block_hashed(data, hash);
        self.advanced()
    }
}

/// The local half of dd mode: parse the in-band headers, assemble blocks.
struct DdWriter {
    sink: Sink,
    buf: Vec<u8>,
    expect: Expect,
}

impl DdWriter {
    fn feed(&mut self, mut data: &[u8]) -> Result<()> {
        while !data.is_empty() {
            match &mut self.expect {
                Expect::Header(line) => {
                    let nl = data.iter().position(|&b| b == b'\n');
                    let take = nl.map(|p| p + 1).unwrap_or(data.len());
                    line.extend_from_slice(&data[..take]);
                    data = &data[take..];
                    if line.len() > 200 {
                        bail!("the host sent something that is not a drydock stream");
                    }
                    if nl.is_some() {
                        let text = String::from_utf8_lossy(line).trim_end().to_string();
                        self.header(&text)?;
                    }
                }
                Expect::Data => {
                    let want = block_len(self.sink.size, self.sink.next_block) as usize;
                    let take = (want - self.buf.len()).min(data.len());
                    self.buf.extend_from_slice(&data[..take]);
                    data = &data[take..];
                    if self.buf.len() == want {
                        let hash = sha256(&self.buf);
                        helper::BlockSink::block(&mut self.sink, &self.buf, hash)?;
                        self.buf.clear();
                        if self.sink.next_block == self.sink.seg_first {
                            // The segment ended (and was checked).
                            self.expect = Expect::Header(Vec::new());
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn header(&mut self, text: &str) -> Result<()> {
        let w: Vec<&str> = text.split(' ').collect();
        let first: u64 = w.get(1).and_then(|x| x.parse().ok()).unwrap_or(u64::MAX);
        if first != self.sink.seg_first {
            bail!(
                "the host's stream is out of order (expected block {}, got '{text}')",
                self.sink.seg_first
            );
        }
        match w[..] {
            ["Z", _, _] => {
                let n = self.sink.segment_end() - first;
                helper::BlockSink::zeros(&mut self.sink, n)?;
                self.expect = Expect::Header(Vec::new());
            }
            ["D", _, _, hash] => {
                self.sink.expected = Some(hash.to_string());
                self.expect = Expect::Data;
            }
            _ => bail!("the host sent a header drydock does not understand: '{text}'"),
        }
        Ok(())
    }
}

/// The local half of a pull, in either mode.
enum Feed {
    Dd(DdWriter),
    Helper(Box<helper::PullFeed>, Sink),
}

impl Feed {
    fn feed(&mut self, data: &[u8]) -> Result<()> {
        match self {
            Feed::Dd(w) => w.feed(data),
            Feed::Helper(f, sink) => f.feed(data, sink),
        }
    }

    fn flush(&mut self) -> Result<()> {
        match self {
            Feed::Dd(w) => w.sink.flush(),
            Feed::Helper(_, sink) => sink.flush(),
        }
    }
}

/// Start writing a segment's pages to the disk now, without waiting for
/// them (sync_file_range with SYNC_FILE_RANGE_WRITE only queues the I/O).
/// The batch's fdatasync then finds little left to do: measured on the
/// fixture disk, the 1 GiB flush stalled the pull for 0.34 s without this.
/// Best effort: a failure here is found again by that fdatasync.
fn start_writeback(image: &File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    // SAFETY: a plain system call on a descriptor this function borrows.
    unsafe {
        libc::sync_file_range(
            image.as_raw_fd(),
            offset as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}

/// Verified segments are made durable in batches of this many (1 GiB):
/// an fsync per 16 MiB segment would cost more than the hashing.
const FLUSH_SEGMENTS: usize = 64;
/// ... or once this long has passed since the last batch, whichever comes
/// first: a pull killed with SIGKILL (which cannot flush) loses at most
/// this much of its work, whatever the disk's size. With only the count,
/// a disk under 1 GiB kept nothing.
const FLUSH_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

pub async fn pull(
    session: &Session,
    facts: &Facts,
    opts: &PullOptions,
    ui: &Ui,
) -> Result<PullReport> {
    device::require_root(facts, session)?;
    let mode = helper::choose(opts.transfer, facts)?;
    let (dev, mut staged) = match mode {
        Mode::Helper => {
            // The device's inspection, the helper's installation and its
            // run in one login shell on the host (see helper::Staged).
            let path = device::path_of(facts, opts.device.as_deref())?;
            let script = device::inspect_script(&path);
            let (text, staged) = helper::stage(session, opts.transfer, ui, &script).await?;
            match device::parse_inspection(&text, path, facts, session) {
                Ok(dev) => (dev, staged?),
                Err(e) => {
                    // The helper went up for nothing: take it down again.
                    if let Ok(Some(s)) = staged
                        && let Err(re) = s.finish(session).await
                    {
                        ui.warn(format!("{re:#}"));
                    }
                    return Err(e);
                }
            }
        }
        _ => (
            device::inspect(session, facts, opts.device.as_deref()).await?,
            None,
        ),
    };
    let res = pull_with(session, facts, opts, ui, dev, staged.as_mut()).await;
    // Whatever stopped the pull, the helper does not stay on the host.
    if let Some(s) = staged
        && let Err(e) = s.finish(session).await
    {
        ui.warn(format!("{e:#}"));
    }
    res
}

async fn pull_with(
    session: &Session,
    facts: &Facts,
    opts: &PullOptions,
    ui: &Ui,
    dev: Device,
    staged: Option<&mut helper::Staged>,
) -> Result<PullReport> {
    check_mounts(&dev, opts.live, session, ui)?;
    let mut hasher = String::new();
    let helper_dir = staged.as_ref().map(|s| s.remote.tmpfs.dir.clone());
    let mode = if staged.is_some() {
        Mode::Helper
    } else {
        Mode::Dd
    };
    let image = &opts.output;
    let state_file = state_path(image);
    let manifest_file = Manifest::path_for(image);

    let header = PullHeader {
        format: STATE_FORMAT.to_string(),
        host: session.host(),
        device: dev.path.clone(),
        size: dev.size,
        boot_id: facts.boot_id.clone(),
        started_at: transfer::now(),
    };
    let (header, done) = match read_state(&state_file)? {
        Some((h, segs)) => {
            if h.host != header.host || h.device != header.device || h.size != header.size {
                return Err(refused!(
                    "{} belongs to an interrupted pull of {}:{} ({} bytes), not {}:{}; \
                     finish that one, or delete {} and {} to start over",
                    state_file.display(),
                    h.host,
                    h.device,
                    h.size,
                    header.host,
                    header.device,
                    state_file.display(),
                    image.display()
                ));
            }
            if h.boot_id != header.boot_id {
                ui.say(format!(
                    "{} rebooted since the interrupted pull: what was pulled may be stale, starting over",
                    session.host()
                ));
                (header, Vec::new())
            } else {
                (h, segs)
            }
        }
        None => {
            if image.exists() {
                let what = if manifest_file.exists() {
                    "a finished pull"
                } else {
                    "a file drydock did not write"
                };
                return Err(refused!(
                    "{} already exists ({what}); drydock will not overwrite it: choose another \
                     path with -o, or delete it",
                    image.display()
                ));
            }
            (header, Vec::new())
        }
    };

    let start_block: u64 = done.iter().map(|v| v.blocks.len() as u64).sum();
    let end_block = block_count(dev.size);
    let resumed_at = start_block * BLOCK_SIZE;
    transfer::check_local_space(image, dev.size.saturating_sub(resumed_at))?;

    let image_file = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(start_block == 0)
        .mode(0o600)
        .open(image)
        .with_context(|| format!("cannot create {}", image.display()))?;
    image_file.set_len(dev.size)?;
    let mut state = OpenOptions::new()
        .create(true)
        .write(true)
        .append(start_block != 0)
        .truncate(start_block == 0)
        .mode(0o600)
        .open(&state_file)
        .with_context(|| format!("cannot write {}", state_file.display()))?;
    if start_block == 0 {
        state.write_all(format!("{}\n", serde_json::to_string(&header)?).as_bytes())?;
        state.sync_all()?;
    } else {
        ui.say(format!(
            "resuming the pull of {}:{} at {} of {}",
            session.host(),
            dev.path,
            human_bytes(resumed_at),
            human_bytes(dev.size)
        ));
    }

    let verified = Arc::new(AtomicU64::new(start_block));
    let started = Instant::now();
    let mut received: u64 = 0;
    let mut stderr_text = String::new();
    let mut status = None;
    let mut interrupted = None;
    let mut helper_done = None;

    if start_block < end_block {
        // 64 messages of at most 255 KiB: 16 MiB in flight at most.
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(64);
        let covered = Arc::new(AtomicU64::new(start_block));
        let sink = Sink {
            image: image_file,
            state,
            size: dev.size,
            next_block: start_block,
            seg: SegmentHasher::default(),
            seg_first: start_block,
            expected: None,
            covered: covered.clone(),
            verified_blocks: verified.clone(),
            verified_upto: start_block,
            pending: Vec::new(),
            flushed_at: std::time::Instant::now(),
            end_block,
        };
        let (mut feed, command, input) = match &staged {
            Some(staged) => {
                hasher = "helper (SHA-256 and zstd on the host)".to_string();
                let mut f = helper::PullFeed::new(dev.size)?;
                f.hello = staged.remote.said_hello.clone();
                helper_done = Some(f.done.clone());
                (
                    Feed::Helper(Box::new(f), sink),
                    String::new(),
                    Some(helper::pull_request(&dev.path, start_block, end_block)),
                )
            }
            None => (
                Feed::Dd(DdWriter {
                    sink,
                    buf: Vec::with_capacity(BLOCK_SIZE as usize),
                    expect: Expect::Header(Vec::new()),
                }),
                remote_script(
                    &dev.path,
                    start_block,
                    end_block,
                    &hex::encode(zero_hash(SEGMENT_BLOCKS * BLOCK_SIZE)),
                    &hex::encode(zero_hash(
                        dev.size - (end_block - 1) / SEGMENT_BLOCKS * SEGMENT_BLOCKS * BLOCK_SIZE,
                    )),
                ),
                None,
            ),
        };
        let worker = std::thread::spawn(move || -> Result<()> {
            let mut res = Ok(());
            while let Some(d) = rx.blocking_recv() {
                res = feed.feed(&d);
                if res.is_err() {
                    break;
                }
            }
            // Whatever was verified is kept, even when the pull failed.
            let flushed = feed.flush();
            res.and(flushed)
        });

        let bar = ui.bytes_bar(dev.size, "pull");
        bar.set_position(resumed_at);
        let mut own;
        let channel = match staged {
            Some(s) => {
                s.go(&input.unwrap_or_default(), &session.host()).await?;
                &mut s.channel
            }
            None => {
                own = session.open_exec(&command).await?;
                &mut own
            }
        };
        let mut partial_line = String::new();
        let signal = ui.interrupted();
        tokio::pin!(signal);
        loop {
            tokio::select! {
                msg = channel.wait() => {
                    let Some(msg) = msg else { break };
                    match msg {
                        ChannelMsg::Data { data } => {
                            received += data.len() as u64;
                            bar.set_position((covered.load(Ordering::Relaxed) * BLOCK_SIZE).min(dev.size));
                            if tx.send(data).await.is_err() {
                                break;
                            }
                        }
                        ChannelMsg::ExtendedData { data, .. } => {
                            partial_line.push_str(&String::from_utf8_lossy(&data));
                            while let Some(nl) = partial_line.find('\n') {
                                let line: String = partial_line.drain(..=nl).collect();
                                let line = line.trim_end();
                                if let Some(h) = line.strip_prefix("hasher ") {
                                    hasher = h.to_string();
                                } else {
                                    stderr_text.push_str(line);
                                    stderr_text.push('\n');
                                }
                            }
                        }
                        ChannelMsg::ExitStatus { exit_status } => status = Some(exit_status),
                        ChannelMsg::ExitSignal { signal_name, .. } => {
                            stderr_text.push_str(&format!("killed by signal {signal_name:?}\n"));
                        }
                        _ => {}
                    }
                }
                sig = &mut signal => {
                    interrupted = Some(sig);
                    break;
                }
            }
        }
        drop(tx);
        let worker_result = worker
            .join()
            .map_err(|_| anyhow!("the image writer panicked"))?;
        // The writer's last segments count too: the bar ends where the
        // image does.
        bar.set_position((covered.load(Ordering::Relaxed) * BLOCK_SIZE).min(dev.size));
        bar.finish();
        let kept = verified.load(Ordering::Relaxed) * BLOCK_SIZE;
        let kept = kept.min(dev.size);
        let resume_hint = format!(
            "{} of {} verified and kept in {}; run the same command to resume",
            human_bytes(kept),
            human_bytes(dev.size),
            image.display()
        );
        worker_result.map_err(|e| e.context(format!("the pull stopped: {resume_hint}")))?;
        if let Some(sig) = interrupted {
            return Err(
                Interrupted(format!("{}: {resume_hint}", Ui::interrupted_text(sig))).into(),
            );
        }
        let helper_finished = helper_done
            .as_ref()
            .is_none_or(|d| d.lock().expect("not poisoned").is_some());
        if status != Some(0) || verified.load(Ordering::Relaxed) < end_block || !helper_finished {
            let why = match status {
                Some(s) if s != 0 => {
                    format!("the reading side on the host failed (exit status {s})")
                }
                Some(_) if !helper_finished => {
                    "the helper stopped without syncing and reporting".to_string()
                }
                Some(_) => "the host's stream ended early".to_string(),
                None => format!("the connection to {} was lost", session.host()),
            };
            let stderr_text = stderr_text.trim();
            if stderr_text.is_empty() {
                bail!("{why}: {resume_hint}");
            }
            bail!(
                "{why}: {resume_hint}; the host said:\n  {}",
                stderr_text.replace('\n', "\n  ")
            );
        }
    }

    // Every segment verified: the manifest replaces the state file.
    let (_, segs) = read_state(&state_file)?.context("the pull state vanished")?;
    let segments: Vec<String> = segs.iter().map(|v| v.segment.clone()).collect();
    let blocks: Vec<String> = segs.into_iter().flat_map(|v| v.blocks).collect();
    let source = Source {
        host: header.host.clone(),
        device: dev.path.clone(),
        boot_id: header.boot_id.clone(),
        pulled_at: header.started_at.clone(),
    };
    let manifest = Manifest::new(dev.size, Some(source), segments, blocks)?;
    manifest.save(&manifest_file)?;
    std::fs::remove_file(&state_file).ok();
    Ok(PullReport {
        host: session.host(),
        device: dev.path,
        image: image.clone(),
        manifest: manifest_file,
        size: dev.size,
        resumed_at,
        bytes_on_wire: received,
        bytes_written: dev.size - resumed_at,
        seconds: started.elapsed().as_secs_f64(),
        digest: manifest.digest,
        hasher,
        transfer: mode,
        helper_dir,
        helper_peak_rss_kib: helper_done
            .and_then(|d| *d.lock().expect("not poisoned"))
            .map(|d| d.peak_rss_kib),
    })
}

fn check_mounts(dev: &Device, live: bool, session: &Session, ui: &Ui) -> Result<()> {
    let rw = dev.rw_mounts();
    if rw.is_empty() {
        return Ok(());
    }
    if live {
        ui.warn(format!(
            "{} is mounted read-write on {} ({}): the copy may be inconsistent (--live)",
            dev.path,
            session.host(),
            Device::describe_mounts(&rw)
        ));
        return Ok(());
    }
    Err(refused!(
        "{} is mounted read-write on {}: {}; a copy of a disk in use may not boot. Freeze the \
         host first (`drydock freeze {}`), or pass --live to copy it anyway",
        dev.path,
        session.host(),
        Device::describe_mounts(&rw),
        session.target.typed_arg()
    ))
}
