//! The receiving end of a pull: what the host runs in dd mode, the parser
//! of its stream, and the sink both modes fill (the sparse image, written
//! in block order, and the state file of verified segments, made durable
//! in batches).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result, bail};
use std::io::Write;

use super::state::Verified;
use crate::image::manifest::{
    BLOCK_SIZE, SEGMENT_BLOCKS, SegmentHasher, block_len, is_zero, sha256,
};
use crate::ssh::shell_quote;
use crate::transfer::{self, helper};

/// The remote half. For each segment of blocks [start, end) it reads and
/// hashes the segment first; a segment whose hash is that of zeros is sent
/// as a header alone (`Z first count`), any other as `D first count hash`
/// followed by its bytes (a second read, from the page cache). Headers are
/// in-band on stdout, so the local side always knows what the next bytes
/// are. The hasher is chosen by measuring both on the host: openssl wins
/// where SHA-NI runs natively, sha256sum under emulation.
pub(super) fn remote_script(dev: &str, start: u64, end: u64, zfull: &str, zlast: &str) -> String {
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
pub(super) struct Sink {
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
    /// A sink filling IMAGE from START_BLOCK to END_BLOCK of a disk of SIZE
    /// bytes, recording verified segments in STATE; COVERED and VERIFIED
    /// are read by the caller (the bar, the resume hint).
    pub(super) fn new(
        image: File,
        state: File,
        size: u64,
        (start_block, end_block): (u64, u64),
        covered: Arc<AtomicU64>,
        verified: Arc<AtomicU64>,
    ) -> Sink {
        Sink {
            image,
            state,
            size,
            next_block: start_block,
            seg: SegmentHasher::default(),
            seg_first: start_block,
            expected: None,
            covered,
            verified_blocks: verified,
            verified_upto: start_block,
            pending: Vec::new(),
            flushed_at: std::time::Instant::now(),
            end_block,
        }
    }

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
pub(super) struct DdWriter {
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
pub(super) enum Feed {
    Dd(DdWriter),
    Helper(Box<helper::PullFeed>, Sink),
}

impl Feed {
    pub(super) fn dd(sink: Sink) -> Feed {
        Feed::Dd(DdWriter {
            sink,
            buf: Vec::with_capacity(BLOCK_SIZE as usize),
            expect: Expect::Header(Vec::new()),
        })
    }

    pub(super) fn feed(&mut self, data: &[u8]) -> Result<()> {
        match self {
            Feed::Dd(w) => w.feed(data),
            Feed::Helper(f, sink) => f.feed(data, sink),
        }
    }

    pub(super) fn flush(&mut self) -> Result<()> {
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
