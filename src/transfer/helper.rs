//! Helper mode: drydock's own static executable (helper/) on the VPS,
//! speaking the framed protocol of [`drydock_helper::proto`].
//!
//! The helper is copied to a tmpfs mounted for it, run with `exec` over the
//! SSH exec channel, and removed afterwards. A pull asks it for blocks:
//! zero blocks come as a count, the others zstd-compressed with the
//! SHA-256 it computed while reading. A push asks it for the hashes of the
//! blocks that changed (and of their 4 KiB pages), then sends only the
//! pages that differ; the helper checks each range's hash before writing,
//! writes it with O_DIRECT and reads it back.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, anyhow, bail};
use drydock_helper::proto::{BLOCK, Decoder, Msg, PAGE, PAGE_HASH, VERSION, page_hashes, sha256};
use russh::client;
use russh::{Channel, ChannelMsg};
use serde::Serialize;

use crate::image::manifest::{BLOCK_SIZE, block_len};
use crate::remote::Facts;
use crate::ssh::{Session, shell_quote};
use crate::transfer::writer::{Tmpfs, tmpfs_script};

/// The helper built for x86_64 with a static C library (build.rs).
pub static BINARY: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/drydock-helper"));

/// zstd level for pulls (whole disks: speed matters) and pushes (a few
/// hundred MiB of changes over a slow uplink: size matters).
pub const PULL_LEVEL: i32 = 1;
pub const PUSH_LEVEL: i32 = 3;

/// How a transfer moves data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// The helper when the host can run it, dd otherwise.
    Auto,
    /// Standard tools on the host (sh, dd, sha256sum): slower, no upload.
    Dd,
    /// drydock's helper, copied to the host's RAM.
    Helper,
}

/// Why the helper cannot run on this host, if it cannot: it is an x86_64
/// executable linked statically against glibc, which needs Linux 3.2.
pub fn cannot_run(facts: &Facts) -> Option<String> {
    if facts.arch != "x86_64" {
        return Some(format!(
            "the helper is built for x86_64 and the host is {}",
            facts.arch
        ));
    }
    let mut v = facts
        .kernel
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|x| x.parse::<u32>().ok());
    let (major, minor) = (v.next().unwrap_or(0), v.next().unwrap_or(0));
    if (major, minor) < (3, 2) {
        return Some(format!(
            "the helper needs Linux 3.2 or newer and the host runs {}",
            facts.kernel
        ));
    }
    None
}

/// Pick the mode for a host; `Helper` on a host that cannot run it is
/// refused rather than quietly replaced.
pub fn choose(asked: Mode, facts: &Facts) -> Result<Mode> {
    match (asked, cannot_run(facts)) {
        (Mode::Dd, _) => Ok(Mode::Dd),
        (Mode::Auto, None) | (Mode::Helper, None) => Ok(Mode::Helper),
        (Mode::Auto, Some(_)) => Ok(Mode::Dd),
        (Mode::Helper, Some(why)) => Err(crate::refused!("{why}; use --transfer dd")),
    }
}

/// Install the helper when it was chosen (a push; a pull uses [`stage`]).
/// If it cannot be started (a tmpfs that cannot be mounted and a noexec
/// /run, say), `auto` falls back to dd mode with a warning; an explicit
/// `--transfer helper` fails.
pub async fn install(session: &Session, asked: Mode, ui: &crate::ui::Ui) -> Result<Option<Remote>> {
    let out = session.exec_input(&install_script(), Some(BINARY)).await?;
    let text = out.stdout_str();
    let remote = match Remote::from_install(session, &out, out.success(), &text) {
        Ok(r) => r,
        Err(e) => return fall_back(session, asked, ui, e),
    };
    if let Err(e) = check_version(session, &text) {
        if let Err(re) = remote.remove(session).await {
            ui.say(format!("warning: {re:#}"));
        }
        return fall_back(session, asked, ui, e);
    }
    Ok(Some(remote))
}

/// `auto`: dd mode, with a warning; `--transfer helper`: the error.
fn fall_back<T>(
    session: &Session,
    asked: Mode,
    ui: &crate::ui::Ui,
    e: anyhow::Error,
) -> Result<Option<T>> {
    if asked == Mode::Auto {
        ui.say(format!(
            "warning: drydock's helper does not run on {} ({e:#}); using dd mode",
            session.host()
        ));
        Ok(None)
    } else {
        Err(e.context(
            "--transfer helper: the helper cannot run on this host; --transfer dd moves the disk \
             with the host's own tools",
        ))
    }
}

/// The line between a prelude's output and the installer's.
const PRELUDE_END: &str = "@@ drydock-helper install";

/// The installer's last line before it waits for drydock's word.
const READY: &str = "@@ drydock-helper ready";

/// After the installer: wait on stdin for one line. `go` runs the helper
/// in place of this shell, on the same channel; anything else, or the
/// channel closing, removes it, and the shell's status says whether that
/// worked. `read` takes stdin a byte at a time, so the frames after `go`
/// are left to the helper.
fn stage_tail() -> String {
    format!(
        r#"echo '{READY}'
read go || go=
[ "$go" = go ] && exec "$T/drydock-helper" --remove "$T" ${{m:+--unmount}}
if [ -n "$m" ]; then umount "$T" && rmdir "$T"; else rm -rf "$T"; fi
"#
    )
}

/// A helper installed and waiting, in the login shell that installed it,
/// for [`Staged::go`]. One login shell on the host for the prelude, the
/// installation and the run: each costs a round trip and a run of the
/// user's shell start-up files (0.15 s for root on the test machines).
pub struct Staged {
    pub remote: Remote,
    pub channel: Channel<client::Msg>,
    went: bool,
}

/// Run `prelude` (shell lines that read nothing from stdin and exit 0;
/// their stdout is returned), then install the helper, in one login shell
/// that stays open: the helper then runs in it, on [`Staged::go`]. The
/// outcome's `Ok(None)`: `auto`, and the helper cannot run here (a warning
/// was shown), so dd mode.
pub async fn stage(
    session: &Session,
    asked: Mode,
    ui: &crate::ui::Ui,
    prelude: &str,
) -> Result<(String, Result<Option<Staged>>)> {
    let script = format!(
        "(\n{prelude}\n)\necho '{PRELUDE_END}'\n{}{}",
        install_script(),
        stage_tail()
    );
    let mut channel = session.open_exec(&script).await?;
    channel
        .data(BINARY)
        .await
        .with_context(|| format!("the connection to {} broke", session.host()))?;
    // Until READY, or until the shell ends (the installer failed).
    let (out, is_ready) = crate::ssh::collect_until(&mut channel, READY).await?;
    let text = out.stdout_str();
    let Some((before, after)) = text.split_once(&format!("{PRELUDE_END}\n")) else {
        return Err(out.failure("inspecting the host", &session.host()));
    };
    let before = before.to_string();
    let remote = match Remote::from_install(session, &out, is_ready, after) {
        Ok(r) => r,
        // The installer failed and removed what it made.
        Err(e) => return Ok((before, fall_back(session, asked, ui, e))),
    };
    let staged = Staged {
        remote,
        channel,
        went: false,
    };
    if let Err(e) = check_version(session, after) {
        // Told to stop, the waiting shell removes it.
        if let Err(re) = staged.finish(session).await {
            ui.say(format!("warning: {re:#}"));
        }
        return Ok((before, fall_back(session, asked, ui, e)));
    }
    Ok((before, Ok(Some(staged))))
}

impl Staged {
    /// Run the helper and send it `input` (its first frames), then EOF.
    pub async fn go(&mut self, input: &[u8], host: &str) -> Result<()> {
        self.went = true;
        let mut data = b"go\n".to_vec();
        data.extend_from_slice(input);
        self.channel
            .data(&data[..])
            .await
            .with_context(|| format!("the connection to {host} broke"))?;
        self.channel.eof().await.ok();
        Ok(())
    }

    /// After the session, or instead of it: a helper that never ran is
    /// told to go away and its shell removes it (waited for); one that ran
    /// and said Hello had removed itself; otherwise the folder is removed
    /// from here.
    pub async fn finish(mut self, session: &Session) -> Result<()> {
        if !self.went {
            if self.channel.data(&b"stop\n"[..]).await.is_ok() {
                self.channel.eof().await.ok();
                if let Ok(out) = crate::ssh::collect(&mut self.channel).await
                    && out.success()
                {
                    tracing::debug!("removed {} on {}", self.remote.tmpfs.dir, session.host());
                    return Ok(());
                }
            }
            return self.remote.remove(session).await;
        }
        drop(self.channel);
        self.remote.finish(session).await
    }
}

/// The helper, copied to its own tmpfs on the host.
pub struct Remote {
    pub tmpfs: Tmpfs,
    /// Set when the helper said Hello, i.e. after it removed its own copy.
    pub said_hello: Arc<AtomicBool>,
}

/// Copy and check in one round trip: a tmpfs (the tmpfs script sets T,
/// and m when it mounted one, and prints "mounted" and "dir T"), exactly
/// the binary's bytes from stdin (`head -c`: a staged install keeps stdin
/// open and sends more after them), its `--version`. On any failure the
/// script removes what it made.
fn install_script() -> String {
    format!(
        r#"{}fail() {{ echo "$1" >&2; [ -n "$m" ] && umount "$T"; rm -rf "$T"; exit 1; }}
umask 077
head -c {} > "$T/drydock-helper" || fail "cannot write the helper to $T"
chmod 700 "$T/drydock-helper" || fail "cannot make $T/drydock-helper executable"
"$T/drydock-helper" --version || fail "the helper copied to $T does not start (is the folder mounted noexec?)"
"#,
        tmpfs_script("helper", "16m"),
        BINARY.len()
    )
}

/// The copy answered `--version` with this drydock's protocol.
fn check_version(session: &Session, text: &str) -> Result<()> {
    if text.contains(&format!("protocol {VERSION}")) {
        return Ok(());
    }
    bail!(
        "the helper copied to {} says '{}'",
        session.host(),
        text.lines().last().unwrap_or("").trim()
    )
}

impl Remote {
    /// What the installer made, from its part of stdout (`text`);
    /// `installed`: it got to its end.
    fn from_install(
        session: &Session,
        out: &crate::ssh::Output,
        installed: bool,
        text: &str,
    ) -> Result<Remote> {
        if !installed {
            return Err(out.failure("starting drydock's helper", &session.host()));
        }
        let remote = Remote {
            tmpfs: Tmpfs::parse(text, session)?,
            said_hello: Arc::default(),
        };
        tracing::debug!(
            "the helper is in {} on {}",
            remote.tmpfs.dir,
            session.host()
        );
        Ok(remote)
    }

    pub fn path(&self) -> String {
        format!("{}/drydock-helper", self.tmpfs.dir)
    }

    /// The command that runs it, replacing the login shell. The helper
    /// removes its own copy (and detaches its tmpfs) before it says Hello.
    pub fn command(&self) -> String {
        format!(
            "exec {} --remove {}{}",
            shell_quote(&self.path()),
            shell_quote(&self.tmpfs.dir),
            if self.tmpfs.mounted { " --unmount" } else { "" }
        )
    }

    /// After a session: nothing to do when the helper said Hello (it had
    /// removed itself by then); otherwise remove the folder from here.
    pub async fn finish(&self, session: &Session) -> Result<()> {
        if self.said_hello.load(Ordering::Relaxed) {
            return Ok(());
        }
        self.remove(session).await
    }

    pub async fn remove(&self, session: &Session) -> Result<()> {
        self.tmpfs.remove(session).await
    }
}

/// What the helper said in its last frame.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Done {
    pub peak_rss_kib: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
}

/// Check the helper's `Hello`.
pub fn check_hello(m: &Msg) -> Result<()> {
    match m {
        Msg::Hello { version } if *version == VERSION => Ok(()),
        Msg::Hello { version } => bail!(
            "protocol version mismatch: the helper on the host speaks version {version}, this \
             drydock speaks version {VERSION}; nothing was read or written"
        ),
        Msg::Error { message } => bail!(
            "the helper on the host stopped before it started: {message}; nothing was read or \
             written: run the same command again, or use --transfer dd"
        ),
        m => bail!("the helper did not say Hello first (it sent {})", m.name()),
    }
}

/// The local end of a pull in helper mode: frames in, image out. Runs on
/// the writer thread; blocks are checked against the hash the helper
/// computed when it read them, then handed to the pull's sink.
pub struct PullFeed {
    dec: Decoder,
    unz: zstd::bulk::Decompressor<'static>,
    buf: Vec<u8>,
    size: u64,
    /// Shared with [`Remote::said_hello`].
    pub hello: Arc<AtomicBool>,
    pub done: Arc<Mutex<Option<Done>>>,
}

/// Where a pull's verified blocks go (the image and its resume state).
pub trait BlockSink {
    fn next_block(&self) -> u64;
    /// `count` blocks of zeros.
    fn zeros(&mut self, count: u64) -> Result<()>;
    /// One block whose SHA-256 is already known to be `hash`.
    fn block(&mut self, data: &[u8], hash: [u8; 32]) -> Result<()>;
}

impl PullFeed {
    pub fn new(size: u64) -> Result<PullFeed> {
        Ok(PullFeed {
            dec: Decoder::default(),
            unz: zstd::bulk::Decompressor::new()?,
            buf: vec![0u8; BLOCK as usize],
            size,
            hello: Arc::default(),
            done: Arc::default(),
        })
    }

    pub fn feed(&mut self, data: &[u8], sink: &mut impl BlockSink) -> Result<()> {
        self.dec.feed(data);
        while let Some(m) = self.dec.next_msg()? {
            self.handle(m, sink)?;
        }
        Ok(())
    }

    /// Bytes of a frame cut by the end of the stream.
    pub fn pending(&self) -> usize {
        self.dec.pending()
    }

    fn handle(&mut self, m: Msg, sink: &mut impl BlockSink) -> Result<()> {
        if !self.hello.load(Ordering::Relaxed) {
            check_hello(&m)?;
            self.hello.store(true, Ordering::Relaxed);
            return Ok(());
        }
        match m {
            Msg::Opened { size, .. } => {
                if size != self.size {
                    bail!(
                        "the helper sees a disk of {size} bytes where drydock expected {}",
                        self.size
                    );
                }
            }
            Msg::Zero { first, count } => {
                expect_block(first, sink.next_block())?;
                sink.zeros(count)?;
            }
            Msg::Block { index, hash, data } => {
                expect_block(index, sink.next_block())?;
                let len = block_len(self.size, index) as usize;
                let got = self
                    .unz
                    .decompress_to_buffer(&data, &mut self.buf[..len])
                    .map_err(|e| anyhow!("block {index} does not decompress: {e}"))?;
                if got != len || sha256(&self.buf[..len]) != hash {
                    bail!(
                        "block {index} (byte {}) arrived damaged: its hash is not the one the \
                         helper read on the host",
                        index * BLOCK_SIZE
                    );
                }
                sink.block(&self.buf[..len], hash)?;
            }
            Msg::Done {
                peak_rss_kib,
                bytes_read,
                bytes_written,
            } => {
                *self.done.lock().expect("not poisoned") = Some(Done {
                    peak_rss_kib,
                    bytes_read,
                    bytes_written,
                });
            }
            Msg::Error { message } => bail!("the helper on the host: {message}"),
            m => bail!("the helper sent an unexpected {}", m.name()),
        }
        Ok(())
    }
}

fn expect_block(got: u64, want: u64) -> Result<()> {
    if got != want {
        bail!("the helper's stream is out of order (block {got}, expected {want})");
    }
    Ok(())
}

/// The frames that start a pull of blocks [first, end).
pub fn pull_request(device: &str, first: u64, end: u64) -> Vec<u8> {
    let mut v = Msg::Open {
        version: VERSION,
        device: device.to_string(),
        write: false,
    }
    .encode();
    v.extend(
        Msg::Read {
            first,
            end,
            level: PULL_LEVEL,
        }
        .encode(),
    );
    v.extend(Msg::Finish.encode());
    v
}

/// A range of bytes to write: whole pages inside one block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Patch {
    pub offset: u64,
    pub len: u32,
}

/// What the disk holds in one block, as the helper hashed it, against the
/// pulled (`old`) and new content: nothing to do, pages to write, or a
/// refusal.
pub fn plan_block(
    index: u64,
    disk_hash: &[u8; 32],
    disk_pages: &[u8],
    old: Option<&[u8; 32]>,
    new_block: &[u8],
    base_block: Option<&[u8]>,
) -> Result<Vec<Patch>, String> {
    let new_hash = sha256(new_block);
    if *disk_hash == new_hash {
        return Ok(Vec::new());
    }
    let new_pages = page_hashes(new_block);
    if disk_pages.len() != new_pages.len() {
        return Err(format!(
            "block {index}: the helper sent page hashes of another size"
        ));
    }
    let trusted = match old {
        None => true,
        Some(o) => o == disk_hash,
    };
    if !trusted {
        // Neither the pulled nor the new content: a push cut inside this
        // block leaves pages of both; anything else is a changed disk.
        let Some(base) = base_block else {
            return Err(format!(
                "block {index} (byte {}) holds neither what was pulled nor the new image",
                index * BLOCK
            ));
        };
        let base_pages = page_hashes(base);
        for p in 0..new_pages.len() / PAGE_HASH {
            let r = p * PAGE_HASH..(p + 1) * PAGE_HASH;
            if disk_pages[r.clone()] != new_pages[r.clone()]
                && disk_pages[r.clone()] != base_pages[r]
            {
                return Err(format!(
                    "byte {} holds neither what was pulled nor the new image",
                    index * BLOCK + p as u64 * PAGE
                ));
            }
        }
    }
    let mut out: Vec<Patch> = Vec::new();
    for p in 0..new_pages.len() / PAGE_HASH {
        let r = p * PAGE_HASH..(p + 1) * PAGE_HASH;
        if disk_pages[r.clone()] == new_pages[r] {
            continue;
        }
        let off = index * BLOCK + p as u64 * PAGE;
        let len = (new_block.len() as u64 - p as u64 * PAGE).min(PAGE) as u32;
        match out.last_mut() {
            Some(last) if last.offset + last.len as u64 == off => last.len += len,
            _ => out.push(Patch { offset: off, len }),
        }
    }
    Ok(out)
}

/// A `Write` frame for a patch, read from the image.
pub fn write_frame(
    image: &File,
    patch: Patch,
    z: &mut zstd::bulk::Compressor<'static>,
) -> Result<Vec<u8>> {
    let mut data = vec![0u8; patch.len as usize];
    image
        .read_exact_at(&mut data, patch.offset)
        .context("cannot read the image")?;
    Ok(Msg::Write {
        offset: patch.offset,
        len: patch.len,
        hash: sha256(&data),
        data: z.compress(&data)?,
    }
    .encode())
}

/// The channel to a running helper, for the request/answer exchanges of a
/// push. Its read half is drained by a task of its own into an unbounded
/// queue: russh gives each channel a small bounded buffer, and a channel
/// whose answers are not read while requests are being sent would stall
/// the whole connection. The queue stays small: the helper only answers
/// requests, and those are kept within a window.
pub struct Link {
    read: tokio::sync::mpsc::UnboundedReceiver<ChannelMsg>,
    pub write: russh::ChannelWriteHalf<client::Msg>,
    dec: Decoder,
    stderr: String,
    status: Option<u32>,
    host: String,
    pub sent: u64,
}

impl Link {
    pub async fn start(session: &Session, remote: &Remote) -> Result<Link> {
        let channel = session.open_exec(&remote.command()).await?;
        let (mut half, write) = channel.split();
        let (tx, read) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(m) = half.wait().await {
                if tx.send(m).is_err() {
                    break;
                }
            }
        });
        let mut link = Link {
            read,
            write,
            dec: Decoder::default(),
            stderr: String::new(),
            status: None,
            host: session.host(),
            sent: 0,
        };
        let hello = link.recv().await?;
        check_hello(&hello)?;
        remote.said_hello.store(true, Ordering::Relaxed);
        Ok(link)
    }

    pub async fn send(&mut self, frame: Vec<u8>) -> Result<()> {
        self.sent += frame.len() as u64;
        self.write.data_bytes(frame).await.map_err(|e| {
            anyhow!(
                "the connection to {} broke while talking to the helper: {e}",
                self.host
            )
        })
    }

    pub async fn recv(&mut self) -> Result<Msg> {
        loop {
            if let Some(m) = self.dec.next_msg()? {
                if let Msg::Error { message } = &m {
                    bail!("the helper on {}: {message}", self.host);
                }
                return Ok(m);
            }
            match self.read.recv().await {
                Some(ChannelMsg::Data { data }) => self.dec.feed(&data),
                Some(ChannelMsg::ExtendedData { data, .. }) => {
                    self.stderr.push_str(&String::from_utf8_lossy(&data))
                }
                Some(ChannelMsg::ExitStatus { exit_status }) => self.status = Some(exit_status),
                Some(_) => {}
                None => {
                    let why = match self.status {
                        Some(s) => format!("the helper on {} exited with status {s}", self.host),
                        None => format!("the connection to {} was lost", self.host),
                    };
                    let said = self.stderr.trim();
                    if said.is_empty() {
                        bail!("{why}");
                    }
                    bail!("{why}; it said: {said}");
                }
            }
        }
    }
}

/// Whether two hashes of the same block agree (helper's raw bytes against
/// a manifest's hex).
pub fn same(hash: &[u8; 32], hex_hash: &str) -> bool {
    hex::decode(hex_hash).is_ok_and(|h| h == hash)
}

#[cfg(test)]
mod tests {
    //! The protocol end to end, in-process: the helper's real server on
    //! temporary files, drydock's real client halves, no SSH in between.
    use super::*;
    use drydock_helper::proto;
    use drydock_helper::server::serve;
    use proptest::prelude::*;
    use std::io::Write;

    /// A pull's destination in memory.
    struct VecSink {
        data: Vec<u8>,
        next: u64,
        size: u64,
    }

    impl BlockSink for VecSink {
        fn next_block(&self) -> u64 {
            self.next
        }
        fn zeros(&mut self, count: u64) -> Result<()> {
            for _ in 0..count {
                let len = block_len(self.size, self.next) as usize;
                self.data.extend(std::iter::repeat_n(0, len));
                self.next += 1;
            }
            Ok(())
        }
        fn block(&mut self, data: &[u8], _: [u8; 32]) -> Result<()> {
            self.data.extend_from_slice(data);
            self.next += 1;
            Ok(())
        }
    }

    /// A disk file: `size` bytes, a hole-y file with the given runs of
    /// random data and of written zeros.
    fn disk(dir: &Path, name: &str, size: u64, runs: &[(u64, u64, u8)]) -> std::path::PathBuf {
        let p = dir.join(name);
        let f = File::create(&p).unwrap();
        f.set_len(size).unwrap();
        for &(off, len, kind) in runs {
            if off >= size {
                continue;
            }
            let len = len.min(size - off) as usize;
            let data: Vec<u8> = match kind {
                0 => vec![0; len],
                k => (0..len)
                    .map(|i| ((i as u64 * 2654435761) >> 7) as u8 ^ k)
                    .collect(),
            };
            f.write_all_at(&data, off).unwrap();
        }
        p
    }

    use std::path::Path;

    fn run_helper(input: &[u8]) -> (Result<(), String>, Vec<u8>) {
        let mut out = Vec::new();
        let r = serve(input, &mut out);
        (r, out)
    }

    fn pull_all(path: &Path) -> Vec<u8> {
        let size = std::fs::metadata(path).unwrap().len();
        let n = size.div_ceil(BLOCK);
        let (r, out) = run_helper(&pull_request(path.to_str().unwrap(), 0, n));
        r.unwrap();
        let mut feed = PullFeed::new(size).unwrap();
        let mut sink = VecSink {
            data: Vec::new(),
            next: 0,
            size,
        };
        // In odd-sized pieces, as SSH delivers them.
        for piece in out.chunks(7919) {
            feed.feed(piece, &mut sink).unwrap();
        }
        assert_eq!(feed.pending(), 0);
        let done = feed.done.lock().unwrap().expect("the helper said Done");
        assert!(done.peak_rss_kib > 0);
        sink.data
    }

    /// Everything drydock sends for a push of `new` onto `disk`, whose
    /// content was `old`: hash the blocks and pages, plan, write frames.
    fn push_frames(disk: &Path, old: &Path, new: &Path) -> Vec<Vec<u8>> {
        let size = std::fs::metadata(new).unwrap().len();
        let n = size.div_ceil(BLOCK);
        let mut ask = Msg::Open {
            version: VERSION,
            device: disk.to_str().unwrap().into(),
            write: false,
        }
        .encode();
        ask.extend(
            Msg::HashBlocks {
                first: 0,
                end: n,
                pages: true,
            }
            .encode(),
        );
        ask.extend(Msg::Finish.encode());
        let (r, out) = run_helper(&ask);
        r.unwrap();
        let mut rd = &out[..];
        let oldf = File::open(old).unwrap();
        let newf = File::open(new).unwrap();
        let mut frames = vec![
            Msg::Open {
                version: VERSION,
                device: disk.to_str().unwrap().into(),
                write: true,
            }
            .encode(),
        ];
        let mut z = zstd::bulk::Compressor::new(PUSH_LEVEL).unwrap();
        while let Some(m) = proto::read_msg(&mut rd).unwrap() {
            if let Msg::BlockHash { index, hash, pages } = m {
                let len = block_len(size, index) as usize;
                let mut o = vec![0; len];
                let mut b = vec![0; len];
                oldf.read_exact_at(&mut o, index * BLOCK).unwrap();
                newf.read_exact_at(&mut b, index * BLOCK).unwrap();
                let old_hash = sha256(&o);
                for p in plan_block(index, &hash, &pages, Some(&old_hash), &b, None).unwrap() {
                    frames.push(write_frame(&newf, p, &mut z).unwrap());
                }
            }
        }
        frames.push(Msg::Finish.encode());
        frames
    }

    fn written(out: &[u8]) -> Vec<(u64, u32)> {
        let mut rd = out;
        let mut v = Vec::new();
        while let Ok(Some(m)) = proto::read_msg(&mut rd) {
            if let Msg::Written { offset, len } = m {
                v.push((offset, len));
            }
        }
        v
    }

    fn layout() -> impl Strategy<Value = (u64, Vec<(u64, u64, u8)>)> {
        // Sizes up to 5 MiB and a bit, rarely a multiple of the block or
        // the page; runs of data (kind 1..) and of written zeros (kind 0).
        (1u64..(5 * BLOCK + 5000)).prop_flat_map(|size| {
            let run = (0..size, 1u64..(BLOCK + 4096), 0u8..4);
            (Just(size), proptest::collection::vec(run, 0..8))
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        #[test]
        fn pull_round_trips_bit_exact((size, runs) in layout()) {
            let t = tempfile::tempdir().unwrap();
            let d = disk(t.path(), "disk", size, &runs);
            prop_assert_eq!(pull_all(&d), std::fs::read(&d).unwrap());
        }

        #[test]
        fn push_round_trips_bit_exact(
            (size, runs) in layout(),
            changes in proptest::collection::vec((0u64..(6 * BLOCK), 1u64..(2 * BLOCK), 0u8..4), 0..6),
        ) {
            let t = tempfile::tempdir().unwrap();
            let old = disk(t.path(), "old", size, &runs);
            let mut all = runs.clone();
            all.extend(changes.iter().map(|&(o, l, k)| (o, l, k.wrapping_add(5))));
            let new = disk(t.path(), "new", size, &all);
            let target = t.path().join("disk");
            std::fs::copy(&old, &target).unwrap();
            let frames = push_frames(&target, &old, &new);
            let (r, out) = run_helper(&frames.concat());
            prop_assert!(r.is_ok(), "{:?}", r);
            prop_assert_eq!(written(&out).len(), frames.len() - 2);
            prop_assert_eq!(std::fs::read(&target).unwrap(), std::fs::read(&new).unwrap());
            // Nothing left to write afterwards.
            prop_assert_eq!(push_frames(&target, &old, &new).len(), 2);
        }
    }

    /// Old and new images that differ in four separate places.
    fn four_changes(t: &Path) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
        let size = 4 * BLOCK + 777;
        let runs = [(0, 4 * BLOCK + 777, 1)];
        let old = disk(t, "old", size, &runs);
        let new = disk(
            t,
            "new",
            size,
            &[
                (0, 4 * BLOCK + 777, 1),
                (10, 5, 9),
                (BLOCK + 8192, 100, 9),
                (3 * BLOCK, 4096, 9),
                (size - 3, 3, 9),
            ],
        );
        let target = t.join("disk");
        std::fs::copy(&old, &target).unwrap();
        (old, new, target)
    }

    #[test]
    fn a_damaged_frame_stops_the_helper_before_it_writes() {
        let t = tempfile::tempdir().unwrap();
        let (old, new, target) = four_changes(t.path());
        let mut frames = push_frames(&target, &old, &new);
        assert_eq!(frames.len(), 6);
        // Damage the third write's data (frame 3: Open, W, W, [W], W, Finish).
        let f = &mut frames[3];
        let n = f.len();
        f[n - 10] ^= 0x40;
        let before = std::fs::read(&target).unwrap();
        let (r, out) = run_helper(&frames.concat());
        let e = r.unwrap_err();
        assert!(e.contains("a frame arrived damaged"), "{e}");
        // The two writes before it were done and confirmed; nothing after.
        assert_eq!(written(&out).len(), 2);
        let after = std::fs::read(&target).unwrap();
        let newb = std::fs::read(&new).unwrap();
        assert_eq!(after[..BLOCK as usize * 2], newb[..BLOCK as usize * 2]);
        assert_eq!(after[BLOCK as usize * 2..], before[BLOCK as usize * 2..]);
        // The error reached drydock's side as a frame.
        let mut rd = &out[..];
        let mut last = None;
        while let Ok(Some(m)) = proto::read_msg(&mut rd) {
            last = Some(m);
        }
        assert!(matches!(last, Some(Msg::Error { message }) if message.contains("damaged")));
    }

    #[test]
    fn data_that_does_not_match_its_hash_is_not_written() {
        let t = tempfile::tempdir().unwrap();
        let (old, new, target) = four_changes(t.path());
        let mut z = zstd::bulk::Compressor::new(1).unwrap();
        // A well-formed frame whose data is not what its hash says.
        let bad = Msg::Write {
            offset: 0,
            len: 4096,
            hash: [7; 32],
            data: z.compress(&[1u8; 4096]).unwrap(),
        }
        .encode();
        let mut frames = push_frames(&target, &old, &new);
        frames.insert(1, bad);
        let before = std::fs::read(&target).unwrap();
        let (r, out) = run_helper(&frames.concat());
        assert!(
            r.unwrap_err()
                .contains("arrived damaged (its hash does not match); nothing of it was written")
        );
        assert!(written(&out).is_empty());
        assert_eq!(std::fs::read(&target).unwrap(), before);
    }

    #[test]
    fn a_truncated_stream_writes_nothing_further() {
        let t = tempfile::tempdir().unwrap();
        let (old, new, target) = four_changes(t.path());
        let frames = push_frames(&target, &old, &new);
        let before = std::fs::read(&target).unwrap();
        // Open, one write, then half of the next.
        let mut input = frames[0].clone();
        input.extend(&frames[1]);
        input.extend(&frames[2][..frames[2].len() / 2]);
        let (r, out) = run_helper(&input);
        let e = r.unwrap_err();
        assert!(e.contains("the stream ended inside a frame"), "{e}");
        assert_eq!(written(&out).len(), 1);
        let after = std::fs::read(&target).unwrap();
        assert_eq!(after[BLOCK as usize..], before[BLOCK as usize..]);
        // A pull cut short is reported by drydock's side as well.
        let size = std::fs::metadata(&new).unwrap().len();
        let (_, out) = run_helper(&pull_request(new.to_str().unwrap(), 0, 5));
        let mut feed = PullFeed::new(size).unwrap();
        let mut sink = VecSink {
            data: Vec::new(),
            next: 0,
            size,
        };
        feed.feed(&out[..out.len() - 100], &mut sink).unwrap();
        assert!(feed.pending() > 0);
        assert!(feed.done.lock().unwrap().is_none());
    }

    #[test]
    fn a_version_mismatch_is_refused_by_both_ends() {
        let t = tempfile::tempdir().unwrap();
        let (_, _, target) = four_changes(t.path());
        let before = std::fs::read(&target).unwrap();
        let mut input = Msg::Open {
            version: VERSION + 1,
            device: target.to_str().unwrap().into(),
            write: true,
        }
        .encode();
        let mut z = zstd::bulk::Compressor::new(1).unwrap();
        let data = [5u8; 4096];
        input.extend(
            Msg::Write {
                offset: 0,
                len: 4096,
                hash: sha256(&data),
                data: z.compress(&data).unwrap(),
            }
            .encode(),
        );
        let (r, out) = run_helper(&input);
        let e = r.unwrap_err();
        assert_eq!(
            e,
            format!(
                "protocol version mismatch: this helper speaks version {VERSION}, drydock sent \
                 version {}; use the helper that comes with your drydock",
                VERSION + 1
            )
        );
        assert_eq!(std::fs::read(&target).unwrap(), before);
        assert!(written(&out).is_empty());
        // drydock's side, given a helper of another version.
        let e = check_hello(&Msg::Hello { version: 9 }).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "protocol version mismatch: the helper on the host speaks version 9, this drydock \
                 speaks version {VERSION}; nothing was read or written"
            )
        );
    }

    /// The real static helper removes its own copy before it says Hello;
    /// when it cannot, it says why in an Error frame instead of Hello.
    #[test]
    fn the_helper_removes_its_own_copy_before_hello() {
        use std::os::unix::fs::PermissionsExt;
        use std::process::{Command, Stdio};
        let run = |dir: &std::path::Path| {
            let exe = dir.join("drydock-helper");
            std::fs::write(&exe, BINARY).unwrap();
            std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o700)).unwrap();
            let o = Command::new(&exe)
                .args(["--remove", dir.to_str().unwrap()])
                .stdin(Stdio::null())
                .output()
                .unwrap();
            let mut dec = Decoder::default();
            dec.feed(&o.stdout);
            (o.status.code(), dec.next_msg().unwrap().unwrap())
        };
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("helper");
        std::fs::create_dir(&dir).unwrap();
        let (_, first) = run(&dir);
        check_hello(&first).unwrap();
        assert!(!dir.exists(), "the helper's folder is still there");

        // A folder it cannot remove (something else in it): no Hello.
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("other"), b"x").unwrap();
        let (code, first) = run(&dir);
        assert_eq!(code, Some(1));
        let e = check_hello(&first).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!(
                "the helper on the host stopped before it started: cannot remove its own copy: {}:",
                dir.display()
            )) && e.ends_with(
                "; nothing was read or written: run the same command again, or use --transfer dd"
            ),
            "{e}"
        );
    }

    #[test]
    fn a_damaged_block_in_a_pull_is_named() {
        let t = tempfile::tempdir().unwrap();
        let d = disk(t.path(), "disk", 2 * BLOCK, &[(0, 2 * BLOCK, 1)]);
        let (_, mut out) = run_helper(&pull_request(d.to_str().unwrap(), 0, 2));
        // Re-encode the first Block frame with a wrong hash but a valid
        // checksum: only the hash can tell.
        let mut rd = &out[..];
        let mut msgs = Vec::new();
        while let Ok(Some(m)) = proto::read_msg(&mut rd) {
            msgs.push(m);
        }
        for m in &mut msgs {
            if let Msg::Block { hash, .. } = m {
                hash[0] ^= 1;
                break;
            }
        }
        out.clear();
        for m in &msgs {
            out.write_all(&m.encode()).unwrap();
        }
        let mut feed = PullFeed::new(2 * BLOCK).unwrap();
        let mut sink = VecSink {
            data: Vec::new(),
            next: 0,
            size: 2 * BLOCK,
        };
        let e = feed.feed(&out, &mut sink).unwrap_err();
        assert_eq!(
            e.to_string(),
            "block 0 (byte 0) arrived damaged: its hash is not the one the helper read on the host"
        );
        assert!(sink.data.is_empty());
    }

    #[test]
    fn plan_refuses_a_block_that_is_neither_old_nor_new_unless_pages_prove_it() {
        let old = vec![1u8; 3 * PAGE as usize];
        let mut new = old.clone();
        new[5] = 2;
        new[2 * PAGE as usize] = 2;
        // Disk: the first page already new (a cut push), the rest old.
        let mut disk = old.clone();
        disk[5] = 2;
        let oh = sha256(&old);
        let e = plan_block(
            3,
            &sha256(&disk),
            &page_hashes(&disk),
            Some(&oh),
            &new,
            None,
        )
        .unwrap_err();
        assert_eq!(
            e,
            format!(
                "block 3 (byte {}) holds neither what was pulled nor the new image",
                3 * BLOCK
            )
        );
        let p = plan_block(
            3,
            &sha256(&disk),
            &page_hashes(&disk),
            Some(&oh),
            &new,
            Some(&old),
        )
        .unwrap();
        assert_eq!(
            p,
            vec![Patch {
                offset: 3 * BLOCK + 2 * PAGE,
                len: PAGE as u32
            }]
        );
        // A page that is neither: refused even with the base at hand.
        let mut foreign = disk.clone();
        foreign[PAGE as usize + 1] = 9;
        let e = plan_block(
            3,
            &sha256(&foreign),
            &page_hashes(&foreign),
            Some(&oh),
            &new,
            Some(&old),
        )
        .unwrap_err();
        assert!(e.contains(&format!("byte {}", 3 * BLOCK + PAGE)), "{e}");
    }
}
