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
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, anyhow, bail};
use drydock_helper::proto::{
    BLOCK, Decoder, Msg, PAGE, PAGE_HASH, VERSION, page_hashes, sha256,
};
use russh::ChannelMsg;
use russh::client;
use serde::Serialize;

use crate::image::manifest::{BLOCK_SIZE, block_len};
use crate::remote::Facts;
use crate::ssh::{Session, shell_quote};
use crate::transfer::writer::Tmpfs;

/// The helper built for x86_64 with a static C library (build.rs).
pub static BINARY: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/drydock-helper"));

/// zstd level for pulls (whole disks: speed matters) and pushes (a few
/// hundred MiB of changes over a slow uplink: size matters).
pub const PULL_LEVEL: i32 = 1;
pub const PUSH_LEVEL: i32 = 3;

/// How a transfer moves data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, serde::Deserialize)]
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

/// The helper, copied to its own tmpfs on the host.
pub struct Remote {
    pub tmpfs: Tmpfs,
}

impl Remote {
    pub async fn install(session: &Session) -> Result<Remote> {
        let tmpfs = Tmpfs::make(session, "helper", "16m").await?;
        let remote = Remote { tmpfs };
        let path = remote.path();
        let res = async {
            session.upload(&path, BINARY, true).await?;
            let v = session
                .run(
                    "starting drydock's helper",
                    &format!("{} --version", shell_quote(&path)),
                )
                .await?;
            if !v.contains(&format!("protocol {VERSION}")) {
                bail!("the helper copied to {} says '{}'", session.host(), v.trim());
            }
            Ok(())
        }
        .await;
        if let Err(e) = res {
            let _ = remote.remove(session).await;
            return Err(e);
        }
        Ok(remote)
    }

    pub fn path(&self) -> String {
        format!("{}/drydock-helper", self.tmpfs.dir)
    }

    /// The command that runs it, replacing the login shell.
    pub fn command(&self) -> String {
        format!("exec {}", shell_quote(&self.path()))
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
    pub hello: bool,
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
            hello: false,
            done: Arc::default(),
        })
    }

    pub fn feed(&mut self, data: &[u8], sink: &mut impl BlockSink) -> Result<()> {
        self.dec.feed(data);
        while let Some(m) = self.dec.next()? {
            self.handle(m, sink)?;
        }
        Ok(())
    }

    /// Bytes of a frame cut by the end of the stream.
    pub fn pending(&self) -> usize {
        self.dec.pending()
    }

    fn handle(&mut self, m: Msg, sink: &mut impl BlockSink) -> Result<()> {
        if !self.hello {
            check_hello(&m)?;
            self.hello = true;
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
        return Err(format!("block {index}: the helper sent page hashes of another size"));
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
/// push.
pub struct Link {
    pub read: russh::ChannelReadHalf,
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
        let (read, write) = channel.split();
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
        Ok(link)
    }

    pub async fn send(&mut self, frame: Vec<u8>) -> Result<()> {
        self.sent += frame.len() as u64;
        self.write.data_bytes(frame).await.map_err(|e| {
            anyhow!("the connection to {} broke while talking to the helper: {e}", self.host)
        })
    }

    pub async fn recv(&mut self) -> Result<Msg> {
        loop {
            if let Some(m) = self.dec.next()? {
                if let Msg::Error { message } = &m {
                    bail!("the helper on {}: {message}", self.host);
                }
                return Ok(m);
            }
            match self.read.wait().await {
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
