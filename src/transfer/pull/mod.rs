//! `drydock pull`: the disk streamed over one exec channel (dd mode) or the
//! staged helper's (helper mode) into a sparse local image. Every 16 MiB
//! segment is hashed on the VPS before it is sent, a segment of zeros is
//! not sent at all, and the hash of what arrived is compared with the
//! VPS's (in helper mode, every block's). Verified segments are appended
//! to `IMAGE.pull` ([`state`]); an interrupted pull resumes after the last
//! of them. The receiving end is [`sink`].

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use anyhow::{Result, anyhow, bail};
use bytes::Bytes;
use russh::ChannelMsg;
use serde::Serialize;

use crate::errors::Interrupted;
use crate::errors::refused;
use crate::image::manifest::{BLOCK_SIZE, Manifest, SEGMENT_BLOCKS, block_count, zero_hash};
use crate::remote::Facts;
use crate::remote::device::{self, Device};
use crate::ssh::Session;
use crate::transfer;
use crate::transfer::helper::{self, Mode};
use crate::ui::{Ui, human_bytes};

pub mod precopy;
mod sink;
mod state;

use sink::{Feed, Sink, remote_script};
pub use state::state_path;
use state::{PullHeader, STATE_FORMAT};

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
    /// Lines of at most 100 columns (but for long paths).
    pub fn human(&self) -> String {
        format!(
            "pulled {}:{}\n  to {}\n  {} in {:.1} s, {} on the wire at {}/s{}\n  \
             verified on the host by {}{}\n  digest {}\n",
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
                .map(|k| format!("; helper peak memory {}", human_bytes(k * 1024)))
                .unwrap_or_default(),
            self.digest
        )
    }
}

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

/// Pull DEV into the image, resuming a pull that stopped, through the helper
/// when STAGED, else with dd; the report.
/// Over 80 lines: the header written or resumed, the local space checked,
/// the rest streamed, the state turned into the manifest; the header's and
/// the report's literals make most of it, and the streaming is already in
/// `stream_rest`.
async fn pull_with(
    session: &Session,
    facts: &Facts,
    opts: &PullOptions,
    ui: &Ui,
    dev: Device,
    staged: Option<&mut helper::Staged>,
) -> Result<PullReport> {
    check_mounts(&dev, opts.live, session, ui)?;
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
        started_at: crate::util::now(),
    };
    let (header, done) = state::resume_or_start(header, image, ui)?;
    let start_block: u64 = done.iter().map(|v| v.blocks.len() as u64).sum();
    let end_block = block_count(dev.size);
    let resumed_at = start_block * BLOCK_SIZE;
    transfer::check_local_space(image, dev.size.saturating_sub(resumed_at))?;
    let (image_file, state) = state::open(image, &header, start_block)?;
    if start_block > 0 {
        ui.say(format!(
            "resuming the pull of {}:{} at {} of {}",
            session.host(),
            dev.path,
            human_bytes(resumed_at),
            human_bytes(dev.size)
        ));
    }

    let started = Instant::now();
    let mut got = Received::default();
    if start_block < end_block {
        let files = (image_file, state);
        stream_rest(
            session,
            ui,
            &dev,
            image,
            staged,
            files,
            (start_block, end_block),
            &mut got,
        )
        .await?;
    }

    let manifest = state::finish(&state_file, &manifest_file, &header)?;
    Ok(PullReport {
        host: session.host(),
        device: dev.path,
        image: image.clone(),
        manifest: manifest_file,
        size: dev.size,
        resumed_at,
        bytes_on_wire: got.bytes,
        bytes_written: dev.size - resumed_at,
        seconds: started.elapsed().as_secs_f64(),
        digest: manifest.digest,
        hasher: got.hasher,
        transfer: mode,
        helper_dir,
        helper_peak_rss_kib: got
            .helper_done
            .and_then(|d| *d.lock().expect("not poisoned"))
            .map(|d| d.peak_rss_kib),
    })
}

/// The disk's blocks from START_BLOCK on, streamed into FILES (the image
/// and its state file), verified and made durable; GOT says what came
/// besides. An error says how much was kept and how to resume.
#[expect(
    clippy::too_many_arguments,
    reason = "the pull's parts, each used once"
)]
async fn stream_rest(
    session: &Session,
    ui: &Ui,
    dev: &Device,
    image: &std::path::Path,
    staged: Option<&mut helper::Staged>,
    (image_file, state): (std::fs::File, std::fs::File),
    (start_block, end_block): (u64, u64),
    got: &mut Received,
) -> Result<()> {
    let resumed_at = start_block * BLOCK_SIZE;
    let verified = Arc::new(AtomicU64::new(start_block));
    let covered = Arc::new(AtomicU64::new(start_block));
    let sink = Sink::new(
        image_file,
        state,
        dev.size,
        (start_block, end_block),
        covered.clone(),
        verified.clone(),
    );
    let (feed, command, input) = feed_for(&staged, dev, sink, (start_block, end_block))?;
    if let Feed::Helper(f, _) = &feed {
        got.hasher = "drydock's helper (SHA-256, zstd)".to_string();
        got.helper_done = Some(f.done.clone());
    }
    // The blocking half (hashing, writing) on a thread of its own.
    // 64 messages of at most 255 KiB: 16 MiB in flight at most.
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(64);
    let writer = std::thread::spawn(move || write_all(feed, rx));

    let bar = ui.bytes_bar(dev.size, "pull");
    bar.set_position(resumed_at);
    let mut own;
    let channel = match staged {
        Some(s) => {
            s.go(&input.unwrap_or_default(), session).await?;
            &mut s.channel
        }
        None => {
            own = session.open_exec(&command).await?;
            &mut own
        }
    };
    receive(channel, tx, ui, got, || {
        bar.set_position((covered.load(Ordering::Relaxed) * BLOCK_SIZE).min(dev.size))
    })
    .await;
    let written = writer
        .join()
        .map_err(|_| anyhow!("the image writer panicked"))?;
    // The writer's last segments count too: the bar ends where the
    // image does.
    bar.set_position((covered.load(Ordering::Relaxed) * BLOCK_SIZE).min(dev.size));
    bar.finish();
    let kept = (verified.load(Ordering::Relaxed) * BLOCK_SIZE).min(dev.size);
    let resume_hint = format!(
        "{} of {} verified and kept in {}; run the same command to resume",
        human_bytes(kept),
        human_bytes(dev.size),
        image.display()
    );
    written.map_err(|e| e.context(format!("the pull stopped: {resume_hint}")))?;
    let complete = verified.load(Ordering::Relaxed) >= end_block;
    got.judge(complete, &session.host(), &resume_hint)
}

/// What to feed the stream into, the command that sends it (dd mode) or
/// the request the staged helper is given (helper mode).
fn feed_for(
    staged: &Option<&mut helper::Staged>,
    dev: &Device,
    sink: Sink,
    (start_block, end_block): (u64, u64),
) -> Result<(Feed, String, Option<Vec<u8>>)> {
    Ok(match staged {
        Some(staged) => {
            let mut f = helper::PullFeed::new(dev.size)?;
            f.hello = staged.remote.said_hello.clone();
            (
                Feed::Helper(Box::new(f), sink),
                String::new(),
                Some(helper::pull_request(&dev.path, start_block, end_block)),
            )
        }
        None => {
            // The hashes of a segment of zeros, whole and the last one.
            let last = dev.size - (end_block - 1) / SEGMENT_BLOCKS * SEGMENT_BLOCKS * BLOCK_SIZE;
            let script = remote_script(
                &dev.path,
                start_block,
                end_block,
                &hex::encode(zero_hash(SEGMENT_BLOCKS * BLOCK_SIZE)),
                &hex::encode(zero_hash(last)),
            );
            (Feed::dd(sink), script, None)
        }
    })
}

/// The writer thread: every message into FEED, then whatever was verified
/// made durable, even when the pull failed.
fn write_all(mut feed: Feed, mut rx: tokio::sync::mpsc::Receiver<Bytes>) -> Result<()> {
    let mut res = Ok(());
    while let Some(d) = rx.blocking_recv() {
        res = feed.feed(&d);
        if res.is_err() {
            break;
        }
    }
    let flushed = feed.flush();
    res.and(flushed)
}

/// What came over the channel besides the image's bytes.
#[derive(Default)]
struct Received {
    /// Bytes on the wire.
    bytes: u64,
    hasher: String,
    /// The host side's exit status, its stderr (the hasher's line apart).
    status: Option<u32>,
    stderr: String,
    interrupted: Option<&'static str>,
    helper_done: Option<Arc<std::sync::Mutex<Option<helper::Done>>>>,
}

/// The channel's messages until it ends, the writer stops taking them or a
/// signal comes; data goes to TX, PROGRESS is called as it does.
async fn receive(
    channel: &mut russh::Channel<russh::client::Msg>,
    tx: tokio::sync::mpsc::Sender<Bytes>,
    ui: &Ui,
    got: &mut Received,
    progress: impl Fn(),
) {
    let mut partial_line = String::new();
    let signal = ui.interrupted();
    tokio::pin!(signal);
    loop {
        let msg = tokio::select! {
            msg = channel.wait() => msg,
            sig = &mut signal => {
                got.interrupted = Some(sig);
                return;
            }
        };
        let Some(msg) = msg else { return };
        match msg {
            ChannelMsg::Data { data } => {
                got.bytes += data.len() as u64;
                progress();
                if tx.send(data).await.is_err() {
                    return;
                }
            }
            ChannelMsg::ExtendedData { data, .. } => {
                partial_line.push_str(&String::from_utf8_lossy(&data));
                while let Some(nl) = partial_line.find('\n') {
                    let line: String = partial_line.drain(..=nl).collect();
                    let line = line.trim_end();
                    if let Some(h) = line.strip_prefix("hasher ") {
                        got.hasher = h.to_string();
                    } else {
                        got.stderr.push_str(line);
                        got.stderr.push('\n');
                    }
                }
            }
            ChannelMsg::ExitStatus { exit_status } => got.status = Some(exit_status),
            ChannelMsg::ExitSignal { signal_name, .. } => {
                got.stderr
                    .push_str(&format!("killed by signal {signal_name:?}\n"));
            }
            _ => {}
        }
    }
}

impl Received {
    /// Whether the transfer ended well: not interrupted, the host side
    /// exited 0 (and the helper reported), every block verified
    /// (COMPLETE); else the error, with RESUME_HINT and what the host said.
    fn judge(&self, complete: bool, host: &str, resume_hint: &str) -> Result<()> {
        if let Some(sig) = self.interrupted {
            return Err(
                Interrupted(format!("{}: {resume_hint}", Ui::interrupted_text(sig))).into(),
            );
        }
        let helper_finished = self
            .helper_done
            .as_ref()
            .is_none_or(|d| d.lock().expect("not poisoned").is_some());
        if self.status == Some(0) && complete && helper_finished {
            return Ok(());
        }
        let why = match self.status {
            Some(s) if s != 0 => format!("the reading side on the host failed (exit status {s})"),
            Some(_) if !helper_finished => {
                "the helper stopped without syncing and reporting".to_string()
            }
            Some(_) => "the host's stream ended early".to_string(),
            None => format!("the connection to {host} was lost"),
        };
        let said = self.stderr.trim();
        let text = if said.is_empty() {
            format!("{why}: {resume_hint}")
        } else {
            format!(
                "{why}: {resume_hint}; the host said:\n  {}",
                said.replace('\n', "\n  ")
            )
        };
        // A lost connection is cut short (exit 75); a host that failed is
        // a failure, even if the same command resumes too.
        if self.status.is_none() {
            return Err(crate::errors::resumable!("{text}"));
        }
        bail!("{text}");
    }
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
