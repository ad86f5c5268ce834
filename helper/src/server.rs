//! The helper's side of the protocol: answers drydock's requests on one
//! disk. Generic over its input and output so that tests run it in-process
//! over pipes; `main.rs` gives it stdin and stdout.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};

use crate::proto::{self, BLOCK, Hash, Msg, PAGE, VERSION, read_msg, write_msg};

/// A buffer aligned for O_DIRECT (4 KiB covers every logical block size).
pub struct Aligned {
    v: Vec<u8>,
    off: usize,
    len: usize,
}

const ALIGN: usize = 4096;

impl Aligned {
    pub fn new(len: usize) -> Aligned {
        let v = vec![0u8; len + ALIGN];
        let off = v.as_ptr().align_offset(ALIGN);
        Aligned { v, off, len }
    }
    pub fn get(&mut self, n: usize) -> &mut [u8] {
        assert!(n <= self.len);
        &mut self.v[self.off..self.off + n]
    }
}

/// The disk, opened twice when O_DIRECT works: `direct` for aligned I/O,
/// `buffered` for the unaligned tail of an image whose size is not a
/// multiple of 4 KiB (then synced and read back).
pub struct Disk {
    direct: Option<File>,
    buffered: File,
    pub size: u64,
    /// A regular file: its holes can be found without reading them.
    pub is_file: bool,
}

impl Disk {
    pub fn open(path: &str, write: bool) -> Result<Disk, String> {
        let open = |flags: i32| {
            OpenOptions::new()
                .read(true)
                .write(write)
                .custom_flags(flags)
                .open(path)
        };
        let mut buffered = open(0).map_err(|e| format!("cannot open {path}: {e}"))?;
        let meta = buffered
            .metadata()
            .map_err(|e| format!("cannot stat {path}: {e}"))?;
        let ft = meta.file_type();
        if !ft.is_block_device() && !ft.is_file() {
            return Err(format!("{path} is neither a block device nor a file"));
        }
        let size = buffered
            .seek(SeekFrom::End(0))
            .map_err(|e| format!("cannot tell the size of {path}: {e}"))?;
        // tmpfs and some file systems refuse O_DIRECT (EINVAL): then the
        // buffered descriptor does everything, with syncs.
        let direct = open(rustix::fs::OFlags::DIRECT.bits() as i32).ok();
        Ok(Disk {
            direct,
            buffered,
            size,
            is_file: ft.is_file(),
        })
    }

    pub fn is_direct(&self) -> bool {
        self.direct.is_some()
    }

    fn block_len(&self, i: u64) -> usize {
        BLOCK.min(self.size - i * BLOCK) as usize
    }

    /// Read `n` bytes at `off` into `buf` (aligned) and return them.
    fn read_at<'a>(&self, buf: &'a mut Aligned, off: u64, n: usize) -> Result<&'a [u8], String> {
        let err = |e: std::io::Error| format!("cannot read the disk at byte {off}: {e}");
        match &self.direct {
            Some(f) if off.is_multiple_of(ALIGN as u64) => {
                // Whole aligned units; the kernel stops at the end of the disk.
                let want = n.next_multiple_of(ALIGN);
                let b = buf.get(want);
                let mut got = 0;
                while got < n {
                    let k = f.read_at(&mut b[got..], off + got as u64).map_err(err)?;
                    if k == 0 {
                        return Err(format!("the disk ended at byte {}", off + got as u64));
                    }
                    got += k;
                }
                Ok(&buf.get(n)[..n])
            }
            _ => {
                let b = buf.get(n);
                self.buffered.read_exact_at(b, off).map_err(err)?;
                Ok(b)
            }
        }
    }

    fn write_at(&self, buf: &mut Aligned, off: u64, n: usize) -> Result<(), String> {
        let err = |e: std::io::Error| format!("cannot write the disk at byte {off}: {e}");
        match &self.direct {
            Some(f) if off.is_multiple_of(ALIGN as u64) && n.is_multiple_of(ALIGN) => {
                f.write_all_at(buf.get(n), off).map_err(err)
            }
            _ => {
                self.buffered.write_all_at(buf.get(n), off).map_err(err)?;
                self.buffered.sync_data().map_err(err)?;
                // Drop the cached pages so the read-back comes from the disk.
                let _ = rustix::fs::fadvise(
                    &self.buffered,
                    off,
                    std::num::NonZeroU64::new(n as u64),
                    rustix::fs::Advice::DontNeed,
                );
                Ok(())
            }
        }
    }

    /// For a regular file: the end of the hole at `off` (`off` itself when
    /// there is data there). Block devices have no holes to find.
    fn hole_end(&self, off: u64) -> u64 {
        if !self.is_file {
            return off;
        }
        match rustix::fs::seek(&self.buffered, rustix::fs::SeekFrom::Data(off)) {
            Ok(d) => d.max(off),
            // ENXIO: no data after `off`.
            Err(_) => self.size,
        }
    }

    pub fn sync(&self) -> Result<(), String> {
        let f = self.direct.as_ref().unwrap_or(&self.buffered);
        f.sync_all()
            .map_err(|e| format!("cannot sync the disk: {e}"))?;
        self.buffered
            .sync_all()
            .map_err(|e| format!("cannot sync the disk: {e}"))
    }
}

fn zero_hash(len: usize) -> Hash {
    use sha2::{Digest, Sha256};
    static ZEROS: [u8; 1 << 16] = [0; 1 << 16];
    let mut h = Sha256::new();
    let mut left = len;
    while left > 0 {
        let n = left.min(ZEROS.len());
        h.update(&ZEROS[..n]);
        left -= n;
    }
    h.finalize().into()
}

/// Peak resident memory of this process, from /proc (kB).
pub fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

struct Counters {
    read: u64,
    written: u64,
}

/// Serve one session. Errors are sent to drydock as `Error` frames (best
/// effort) and returned; nothing is read or written after one.
pub fn serve(input: impl Read, output: impl Write) -> Result<(), String> {
    let mut input = input;
    let mut out = BufWriter::with_capacity(1 << 18, output);
    let res = session(&mut input, &mut out);
    if let Err(e) = &res {
        let _ = write_msg(&mut out, &Msg::Error { message: e.clone() });
    }
    let _ = out.flush();
    res
}

fn send(out: &mut impl Write, m: &Msg) -> Result<(), String> {
    write_msg(out, m).map_err(|e| format!("cannot send to drydock: {e}"))
}

fn recv(input: &mut impl Read) -> Result<Msg, String> {
    match read_msg(input) {
        Ok(Some(Msg::Error { message })) => Err(format!("drydock stopped: {message}")),
        Ok(Some(m)) => Ok(m),
        Ok(None) => Err("drydock closed the stream before saying Finish".into()),
        Err(e) => Err(format!("from drydock: {e}")),
    }
}

fn session(input: &mut impl Read, out: &mut impl Write) -> Result<(), String> {
    send(out, &Msg::Hello { version: VERSION })?;
    out.flush().map_err(|e| e.to_string())?;
    let (device, write) = open_request(input)?;
    let disk = Disk::open(&device, write)?;
    // A process-wide flag: the sessions of one process (the in-process
    // tests) must not inherit an earlier one's giving up.
    GIVE_UP.store(false, std::sync::atomic::Ordering::Relaxed);
    send(
        out,
        &Msg::Opened {
            size: disk.size,
            direct: disk.is_direct(),
        },
    )?;
    // Rebuilds run on a thread of their own, beside the Writes; it stops
    // at its next page once the session ends, however it ends.
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        struct Stop<'a>(&'a std::sync::atomic::AtomicBool);
        impl Drop for Stop<'_> {
            fn drop(&mut self) {
                self.0.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        }
        let _stop = Stop(&stop);
        serve_disk((&disk, &stop), write, input, out, scope)
    })
}

/// A package file to rebuild pages from, gathered from Rebuild frames.
struct Job {
    src: crate::package::Source,
    pieces: Vec<crate::package::Piece>,
}

/// What the rebuild thread answers for one job: the pieces written, the
/// bytes fetched, why it stopped early; Err when the disk failed.
type JobResult = Result<(crate::package::Outcome, u64), String>;

fn serve_disk<'s>(
    (disk, stop): (&'s Disk, &'s std::sync::atomic::AtomicBool),
    write: bool,
    input: &mut impl Read,
    out: &mut impl Write,
    scope: &'s std::thread::Scope<'s, '_>,
) -> Result<(), String> {
    let mut buf = Aligned::new(BLOCK as usize);
    let mut back = Aligned::new(BLOCK as usize);
    // One compressor per lane, kept from one Read to the next at one level.
    let mut compressors: Option<(i32, Vec<zstd::bulk::Compressor<'static>>)> = None;
    let mut decompressor = zstd::bulk::Decompressor::new().map_err(|e| format!("zstd: {e}"))?;
    let mut n = Counters {
        read: 0,
        written: 0,
    };
    let mut gathering: Option<Job> = None;
    let mut jobs: Option<std::sync::mpsc::Sender<Job>> = None;
    let (done_tx, done_rx) = std::sync::mpsc::channel::<JobResult>();
    let mut queued = 0usize;
    loop {
        out.flush()
            .map_err(|e| format!("cannot send to drydock: {e}"))?;
        match recv(input)? {
            Msg::Read { first, end, level } => {
                if compressors.as_ref().map(|c| c.0) != Some(level) {
                    let c = (0..LANES)
                        .map(|_| zstd::bulk::Compressor::new(level))
                        .collect::<Result<Vec<_>, _>>()
                        .map_err(|e| format!("zstd level {level}: {e}"))?;
                    compressors = Some((level, c));
                }
                let (_, c) = compressors.as_mut().expect("set above");
                read_blocks(disk, (first, end), c, out, &mut n)?;
            }
            Msg::HashBlocks { first, end, pages } => {
                hash_blocks(disk, (first, end), pages, &mut buf, out, &mut n)?;
            }
            Msg::Write {
                offset,
                len,
                hash,
                data,
            } => {
                if !write {
                    return Err("a Write on a disk opened for reading".into());
                }
                let w = Patch {
                    offset,
                    len,
                    hash,
                    data: &data,
                };
                write_checked(disk, w, (&mut buf, &mut back), &mut decompressor, &mut n)?;
                send(out, &Msg::Written { offset, len })?;
            }
            Msg::Rebuild {
                addr,
                host,
                path,
                format,
                pieces,
                more,
            } => {
                if !write {
                    return Err("a Rebuild on a disk opened for reading".into());
                }
                let format = crate::package::Format::from_u8(format)
                    .ok_or_else(|| format!("a Rebuild of format {format}, unknown here"))?;
                let src = crate::package::Source {
                    addr,
                    host,
                    path,
                    format,
                };
                let mut add = crate::package::decode_pieces(&pieces)?;
                let job = gathering.get_or_insert_with(|| Job {
                    src: src.clone(),
                    pieces: Vec::new(),
                });
                if job.src != src {
                    return Err("a Rebuild continued with another package file".into());
                }
                job.pieces.append(&mut add);
                if !more {
                    let job = gathering.take().expect("set above");
                    let tx = jobs.get_or_insert_with(|| {
                        let (tx, rx) = std::sync::mpsc::channel::<Job>();
                        let done = done_tx.clone();
                        let spawned = std::thread::Builder::new()
                            .stack_size(THREAD_STACK)
                            .spawn_scoped(scope, move || rebuild_jobs((disk, stop), rx, done));
                        if let Err(e) = spawned {
                            eprintln!("drydock-helper: cannot start the rebuild thread: {e}");
                        }
                        tx
                    });
                    tx.send(job)
                        .map_err(|_| "the rebuild thread stopped".to_string())?;
                    queued += 1;
                }
            }
            Msg::RebuildWait => {
                if gathering.is_some() {
                    return Err("RebuildWait inside a Rebuild".into());
                }
                // A slow mirror does not hold the push: past REBUILD_WAIT the
                // rebuilds give up (what they wrote stays, checked; the rest
                // is sent). drydock hears nothing meanwhile and gives up
                // after 300 s of silence: this ends well before.
                let deadline = std::time::Instant::now() + rebuild_wait();
                for _ in 0..queued {
                    let got = match done_rx
                        .recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()))
                    {
                        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                            GIVE_UP.store(true, std::sync::atomic::Ordering::Relaxed);
                            // The reads under way end at once, each job after.
                            done_rx.recv().ok()
                        }
                        r => r.ok(),
                    };
                    let (outcome, fetched) =
                        got.ok_or_else(|| "the rebuild thread stopped".to_string())??;
                    let mut bits = vec![0u8; outcome.written.len().div_ceil(8)];
                    for (i, w) in outcome.written.iter().enumerate() {
                        if *w {
                            bits[i / 8] |= 1 << (i % 8);
                            n.written += PAGE;
                        }
                    }
                    send(
                        out,
                        &Msg::Rebuilt {
                            written: bits,
                            fetched,
                            error: outcome.error.unwrap_or_default(),
                        },
                    )?;
                }
                queued = 0;
            }
            Msg::Finish => {
                if queued > 0 || gathering.is_some() {
                    return Err("Finish before RebuildWait".into());
                }
                disk.sync()?;
                send(
                    out,
                    &Msg::Done {
                        peak_rss_kib: peak_rss_kib(),
                        bytes_read: n.read,
                        bytes_written: n.written,
                    },
                )?;
                return Ok(());
            }
            m => return Err(format!("unexpected {} from drydock", m.name())),
        }
    }
}

/// The rebuild thread: each job's package file fetched and its pieces
/// written (each checked against its hash before, and read back after),
/// until the jobs' sender goes.
fn rebuild_jobs(
    (disk, stop): (&Disk, &std::sync::atomic::AtomicBool),
    jobs: std::sync::mpsc::Receiver<Job>,
    done: std::sync::mpsc::Sender<JobResult>,
) {
    let mut run = Run {
        disk,
        buf: Aligned::new(RUN_MAX),
        back: Aligned::new(RUN_MAX),
        start: 0,
        len: 0,
    };
    for job in jobs.iter() {
        let res = rebuild_one(stop, &job, &mut run);
        let stop = res.is_err();
        if done.send(res).is_err() || stop {
            return;
        }
    }
}

/// How long drydock's RebuildWait waits for the rebuilds at most, once
/// everything else is written.
const REBUILD_WAIT: std::time::Duration = std::time::Duration::from_secs(120);

/// REBUILD_WAIT, or the seconds in DRYDOCK_HELPER_REBUILD_WAIT: the SSH
/// tests set it (through their sshd's SetEnv) to see a stalled mirror
/// given up on in seconds rather than minutes.
fn rebuild_wait() -> std::time::Duration {
    std::env::var("DRYDOCK_HELPER_REBUILD_WAIT")
        .ok()
        .and_then(|s| s.parse().ok())
        .map(std::time::Duration::from_secs)
        .unwrap_or(REBUILD_WAIT)
}

/// Set when the rebuilds are past REBUILD_WAIT: the package files still
/// being read stop, and those not started are not fetched.
static GIVE_UP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn gave_up() -> String {
    format!(
        "the mirror was too slow: gave up after {} s of waiting, the rest is sent",
        rebuild_wait().as_secs()
    )
}

/// Most bytes of rebuilt pages written at once.
const RUN_MAX: usize = 256 << 10;

/// Rebuilt pages (each already checked against its hash) gathered while
/// they are contiguous on the disk, then written, read back and checked
/// as one range: one write per 64 pages rather than one a page.
struct Run<'a> {
    disk: &'a Disk,
    buf: Aligned,
    back: Aligned,
    start: u64,
    len: usize,
}

impl Run<'_> {
    fn add(&mut self, off: u64, page: &[u8]) -> Result<(), String> {
        if off.checked_add(PAGE).is_none_or(|e| e > self.disk.size) || !off.is_multiple_of(PAGE) {
            return Err(format!("a rebuilt page at byte {off} is outside the disk"));
        }
        if self.len > 0 && (off != self.start + self.len as u64 || self.len + page.len() > RUN_MAX)
        {
            self.flush()?;
        }
        if self.len == 0 {
            self.start = off;
        }
        self.buf.get(RUN_MAX)[self.len..self.len + page.len()].copy_from_slice(page);
        self.len += page.len();
        Ok(())
    }

    fn flush(&mut self) -> Result<(), String> {
        if self.len == 0 {
            return Ok(());
        }
        let hash = proto::sha256(&self.buf.get(self.len)[..]);
        let n = self.len;
        self.len = 0;
        write_verified(
            self.disk,
            (&mut self.buf, &mut self.back),
            self.start,
            n,
            &hash,
        )
    }
}

/// Counts the bytes read through it.
struct Counted<R> {
    r: R,
    n: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
        if GIVE_UP.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(std::io::Error::other(gave_up()));
        }
        let k = self.r.read(b)?;
        self.n
            .fetch_add(k as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(k)
    }
}

fn rebuild_one(stop: &std::sync::atomic::AtomicBool, job: &Job, run: &mut Run<'_>) -> JobResult {
    use crate::package;
    let fetched = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let none = |e: String| {
        Ok((
            package::Outcome {
                written: vec![false; job.pieces.len()],
                error: Some(e),
            },
            0,
        ))
    };
    if GIVE_UP.load(std::sync::atomic::Ordering::Relaxed) {
        return none(gave_up());
    }
    let body = match package::get(&job.src) {
        Ok(b) => b,
        Err(e) => return none(e),
    };
    let counted = Counted {
        r: body,
        n: fetched.clone(),
    };
    let mut stream = match package::content(counted, job.src.format) {
        Ok(s) => s,
        Err(e) => return none(e),
    };
    let outcome = package::extract(&mut stream, &job.pieces, |off, page| {
        if stop.load(std::sync::atomic::Ordering::Relaxed) {
            return Err("the session ended".into());
        }
        run.add(off, page)
    })?;
    // The pages gathered are written before the job is answered, whether
    // it ended early or not (each was checked).
    run.flush()?;
    Ok((outcome, fetched.load(std::sync::atomic::Ordering::Relaxed)))
}

/// drydock's Open: the device and whether to write, in this protocol's
/// version.
fn open_request(input: &mut impl Read) -> Result<(String, bool), String> {
    match recv(input)? {
        Msg::Open {
            version,
            device,
            write,
        } => {
            if version != VERSION {
                return Err(format!(
                    "protocol version mismatch: this helper speaks version {VERSION}, drydock \
                     sent version {version}; use the helper that comes with your drydock"
                ));
            }
            Ok((device, write))
        }
        m => Err(format!("expected Open, got {}", m.name())),
    }
}

/// A BlockHash for each block of [first, end): its SHA-256 (and its pages'
/// when PAGES); holes are not read.
fn hash_blocks(
    disk: &Disk,
    (first, end): (u64, u64),
    pages: bool,
    buf: &mut Aligned,
    out: &mut impl Write,
    n: &mut Counters,
) -> Result<(), String> {
    check_range(disk, first, end)?;
    for i in first..end {
        let len = disk.block_len(i);
        let off = i * BLOCK;
        let data: &[u8] = if disk.hole_end(off) >= off + len as u64 {
            let b = buf.get(len);
            b.fill(0);
            b
        } else {
            n.read += len as u64;
            disk.read_at(buf, off, len)?
        };
        let hash = if proto::is_zero(data) {
            zero_hash(len)
        } else {
            proto::sha256(data)
        };
        let pages = if pages {
            proto::page_hashes(data)
        } else {
            Vec::new()
        };
        send(
            out,
            &Msg::BlockHash {
                index: i,
                hash,
                pages,
            },
        )?;
    }
    Ok(())
}

/// One Write's fields.
struct Patch<'a> {
    offset: u64,
    len: u32,
    hash: [u8; 32],
    data: &'a [u8],
}

/// W's data decompressed, checked against its hash, written, read back
/// and checked again; nothing is written from data that arrived damaged.
fn write_checked(
    disk: &Disk,
    w: Patch<'_>,
    (buf, back): (&mut Aligned, &mut Aligned),
    decompressor: &mut zstd::bulk::Decompressor<'static>,
    n: &mut Counters,
) -> Result<(), String> {
    let Patch {
        offset,
        len,
        hash,
        data,
    } = w;
    let n_len = len as usize;
    if n_len > BLOCK as usize || offset.checked_add(len as u64).is_none_or(|e| e > disk.size) {
        return Err(format!(
            "a write of {len} bytes at byte {offset} does not fit a disk of {} bytes",
            disk.size
        ));
    }
    let dst = buf.get(n_len);
    let got = decompressor
        .decompress_to_buffer(data, dst)
        .map_err(|e| format!("the data for byte {offset} does not decompress: {e}"))?;
    if got != n_len || proto::sha256(&dst[..n_len]) != hash {
        return Err(format!(
            "the data for byte {offset} arrived damaged (its hash does not match); nothing of it was written"
        ));
    }
    write_verified(disk, (buf, back), offset, n_len, &hash)?;
    n.written += len as u64;
    Ok(())
}

/// BUF's first N bytes (whose SHA-256 is HASH) written at OFFSET, read
/// back into BACK and checked.
fn write_verified(
    disk: &Disk,
    (buf, back): (&mut Aligned, &mut Aligned),
    offset: u64,
    n: usize,
    hash: &Hash,
) -> Result<(), String> {
    disk.write_at(buf, offset, n)?;
    let again = disk.read_at(back, offset, n)?;
    if proto::sha256(again) != *hash {
        return Err(format!(
            "reading back the {n} bytes written at byte {offset} gives other data: the disk does not keep what is written"
        ));
    }
    Ok(())
}

fn check_range(disk: &Disk, first: u64, end: u64) -> Result<(), String> {
    if first > end || end > disk.size.div_ceil(BLOCK) {
        return Err(format!(
            "blocks {first}..{end} are outside a disk of {} bytes",
            disk.size
        ));
    }
    Ok(())
}

/// What a lane made of one block.
enum Item {
    /// A hole, or a block of zeros: not sent.
    Zero,
    /// Its SHA-256 as read, its bytes compressed.
    Data(Hash, Vec<u8>),
}

/// How many lanes read, hash and compress a Read's blocks side by side:
/// on a VPS with two cores both compress, and on one with a single core a
/// lane's disk read still overlaps the other's compression. Each lane
/// holds a block's buffer, its compressor and an output buffer (the pull's
/// peak stayed at 11 MiB: each thread has a small stack).
const LANES: u64 = 2;

/// The stack of each thread the helper starts: its memory is locked
/// (mlockall), a thread's whole stack with it (2 MiB by default).
const THREAD_STACK: usize = 256 << 10;

/// One lane of `read_blocks`, on a thread of its own: blocks FIRST + LANE,
/// FIRST + LANE + LANES, ... below END, each read (holes and blocks of
/// zeros as `Item::Zero`), hashed and compressed with C into a buffer from
/// BACK, and sent on TX in order, until the end, an error (sent) or the
/// receiver going away. Gives the bytes it read.
fn lane(
    disk: &Disk,
    (first, end, lane): (u64, u64, u64),
    c: &mut zstd::bulk::Compressor<'static>,
    tx: std::sync::mpsc::SyncSender<Result<Item, String>>,
    back: std::sync::mpsc::Receiver<Vec<u8>>,
) -> u64 {
    let mut read = 0u64;
    let mut hole_until = 0u64;
    let mut buf = Aligned::new(BLOCK as usize);
    let mut i = first + lane;
    while i < end {
        let len = disk.block_len(i);
        let off = i * BLOCK;
        if hole_until <= off {
            hole_until = disk.hole_end(off);
        }
        let item = if hole_until >= off + len as u64 {
            Ok(Item::Zero)
        } else {
            match disk.read_at(&mut buf, off, len) {
                Err(e) => Err(e),
                Ok(data) if proto::is_zero(data) => {
                    read += len as u64;
                    Ok(Item::Zero)
                }
                Ok(data) => {
                    read += len as u64;
                    let hash = proto::sha256(data);
                    let Ok(mut z) = back.recv() else {
                        return read;
                    };
                    z.clear();
                    match c.compress_to_buffer(data, &mut z) {
                        Ok(_) => Ok(Item::Data(hash, z)),
                        Err(e) => Err(format!("zstd: {e}")),
                    }
                }
            }
        };
        let stop = item.is_err();
        if tx.send(item).is_err() || stop {
            return read;
        }
        i += LANES;
    }
    read
}

/// Blocks [first, end) to drydock, in order. LANES threads read (skipping
/// a file's holes), hash and compress every LANES-th block each, with a
/// compressor of their own from COMPRESSORS, while this thread sends:
/// reads, hashing and compression overlap each other and the link.
fn read_blocks(
    disk: &Disk,
    (first, end): (u64, u64),
    compressors: &mut [zstd::bulk::Compressor<'static>],
    out: &mut impl Write,
    n: &mut Counters,
) -> Result<(), String> {
    check_range(disk, first, end)?;
    std::thread::scope(|scope| {
        let mut lanes = Vec::new();
        for (k, c) in compressors.iter_mut().enumerate().take(LANES as usize) {
            let (tx, rx) = std::sync::mpsc::sync_channel::<Result<Item, String>>(1);
            let (back_tx, back_rx) = std::sync::mpsc::channel::<Vec<u8>>();
            back_tx
                .send(Vec::with_capacity(zstd::zstd_safe::compress_bound(
                    BLOCK as usize,
                )))
                .expect("open");
            let t = std::thread::Builder::new()
                .stack_size(THREAD_STACK)
                .spawn_scoped(scope, move || {
                    lane(disk, (first, end, k as u64), c, tx, back_rx)
                })
                .map_err(|e| format!("cannot start a reading thread: {e}"))?;
            lanes.push((rx, back_tx, t));
        }
        let mut zero_from: Option<u64> = None;
        let res = (|| {
            for i in first..end {
                let (rx, back, _) = &lanes[((i - first) % LANES) as usize];
                let item = rx
                    .recv()
                    .map_err(|_| format!("reading block {i}: the reading thread stopped"))??;
                match item {
                    Item::Zero => {
                        if zero_from.is_none() {
                            zero_from = Some(i);
                        }
                    }
                    Item::Data(hash, z) => {
                        if let Some(f) = zero_from.take() {
                            send(
                                out,
                                &Msg::Zero {
                                    first: f,
                                    count: i - f,
                                },
                            )?;
                        }
                        proto::write_block(out, i, &hash, &z)
                            .map_err(|e| format!("cannot send to drydock: {e}"))?;
                        let _ = back.send(z);
                    }
                }
            }
            if let Some(f) = zero_from {
                send(
                    out,
                    &Msg::Zero {
                        first: f,
                        count: end - f,
                    },
                )?;
            }
            Ok(())
        })();
        // On an error here the lanes stop at their next send.
        for (rx, back, t) in lanes {
            drop(rx);
            drop(back);
            n.read += t.join().unwrap_or(0);
        }
        res
    })
}
