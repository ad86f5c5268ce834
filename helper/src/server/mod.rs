//! The helper's side of the protocol: answers drydock's requests on one
//! disk. Generic over its input and output so that tests run it in-process
//! over pipes; `main.rs` gives it stdin and stdout.

use std::io::{BufWriter, Read, Write};

use crate::proto::{BLOCK, Msg, PAGE, VERSION, read_msg, write_msg};

mod disk;
mod read;
mod rebuild;
mod write;

pub use disk::{Aligned, Disk};
use read::{LANES, THREAD_STACK, hash_blocks, read_blocks, read_pages};
use rebuild::{GIVE_UP, Job, JobResult, rebuild_jobs, rebuild_wait};
use write::{Patch, check_range, write_checked};

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

type Sender<T> = std::sync::mpsc::Sender<T>;

/// One open disk's session: what the messages share.
struct Serving<'s> {
    disk: &'s Disk,
    stop: &'s std::sync::atomic::AtomicBool,
    write: bool,
    buf: Aligned,
    back: Aligned,
    /// One compressor per lane, kept from one Read to the next at one level.
    compressors: Option<(i32, Vec<zstd::bulk::Compressor<'static>>)>,
    decompressor: zstd::bulk::Decompressor<'static>,
    n: Counters,
    /// The Rebuild frames of one package file, until the last.
    gathering: Option<Job>,
    /// The rebuild thread's queue, once started; its answers.
    jobs: Option<Sender<Job>>,
    done: (Sender<JobResult>, std::sync::mpsc::Receiver<JobResult>),
    queued: usize,
}

/// The lanes' compressors at LEVEL, kept in KEPT and made again when the
/// level changes.
fn compressors_at<'a>(
    kept: &'a mut Option<(i32, Vec<zstd::bulk::Compressor<'static>>)>,
    level: i32,
) -> Result<&'a mut [zstd::bulk::Compressor<'static>], String> {
    if kept.as_ref().map(|c| c.0) != Some(level) {
        let c = (0..LANES)
            .map(|_| zstd::bulk::Compressor::new(level))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("zstd level {level}: {e}"))?;
        *kept = Some((level, c));
    }
    Ok(&mut kept.as_mut().expect("set above").1)
}

/// The session's loop: one message, one method, until Finish (Ok) or an
/// error.
fn serve_disk<'s>(
    (disk, stop): (&'s Disk, &'s std::sync::atomic::AtomicBool),
    write: bool,
    input: &mut impl Read,
    out: &mut impl Write,
    scope: &'s std::thread::Scope<'s, '_>,
) -> Result<(), String> {
    let mut s = Serving {
        disk,
        stop,
        write,
        buf: Aligned::new(BLOCK as usize),
        back: Aligned::new(BLOCK as usize),
        compressors: None,
        decompressor: zstd::bulk::Decompressor::new().map_err(|e| format!("zstd: {e}"))?,
        n: Counters {
            read: 0,
            written: 0,
        },
        gathering: None,
        jobs: None,
        done: std::sync::mpsc::channel::<JobResult>(),
        queued: 0,
    };
    loop {
        out.flush()
            .map_err(|e| format!("cannot send to drydock: {e}"))?;
        match recv(input)? {
            Msg::Read { first, end, level } => s.read(first, end, level, out)?,
            Msg::ReadPages { index, level, old } => s.read_pages(index, level, &old, out)?,
            Msg::HashBlocks { first, end, pages } => {
                hash_blocks(disk, (first, end), pages, &mut s.buf, out, &mut s.n)?;
            }
            Msg::Write {
                offset,
                len,
                hash,
                data,
            } => s.write(
                Patch {
                    offset,
                    len,
                    hash,
                    data: &data,
                },
                out,
            )?,
            Msg::Rebuild {
                addr,
                host,
                path,
                format,
                pieces,
                more,
            } => {
                if !s.write {
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
                s.rebuild(src, &pieces, more, scope)?;
            }
            Msg::RebuildWait => s.rebuild_wait(out)?,
            Msg::Finish => return s.finish(out),
            m => return Err(format!("unexpected {} from drydock", m.name())),
        }
    }
}

impl<'s> Serving<'s> {
    /// Blocks [FIRST, END) read, hashed and compressed at LEVEL.
    fn read(
        &mut self,
        first: u64,
        end: u64,
        level: i32,
        out: &mut impl Write,
    ) -> Result<(), String> {
        let c = compressors_at(&mut self.compressors, level)?;
        read_blocks(self.disk, (first, end), c, out, &mut self.n)
    }

    /// One block's changed pages, compressed at LEVEL.
    fn read_pages(
        &mut self,
        index: u64,
        level: i32,
        old: &[u8],
        out: &mut impl Write,
    ) -> Result<(), String> {
        let c = &mut compressors_at(&mut self.compressors, level)?[0];
        read_pages(self.disk, (index, old), c, &mut self.buf, out, &mut self.n)
    }

    /// One range written, checked before and read back after; Written.
    fn write(&mut self, w: Patch<'_>, out: &mut impl Write) -> Result<(), String> {
        if !self.write {
            return Err("a Write on a disk opened for reading".into());
        }
        let (offset, len) = (w.offset, w.len);
        write_checked(
            self.disk,
            w,
            (&mut self.buf, &mut self.back),
            &mut self.decompressor,
            &mut self.n,
        )?;
        send(out, &Msg::Written { offset, len })
    }

    /// A Rebuild frame: its pieces gathered; the last (not MORE) queues
    /// the package file for the rebuild thread, started on the first.
    fn rebuild(
        &mut self,
        src: crate::package::Source,
        pieces: &[u8],
        more: bool,
        scope: &'s std::thread::Scope<'s, '_>,
    ) -> Result<(), String> {
        if !self.write {
            return Err("a Rebuild on a disk opened for reading".into());
        }
        let mut add = crate::package::decode_pieces(pieces)?;
        let job = self.gathering.get_or_insert_with(|| Job {
            src: src.clone(),
            pieces: Vec::new(),
        });
        if job.src != src {
            return Err("a Rebuild continued with another package file".into());
        }
        job.pieces.append(&mut add);
        if more {
            return Ok(());
        }
        let job = self.gathering.take().expect("set above");
        let (disk, stop) = (self.disk, self.stop);
        let done = &self.done.0;
        let tx = self.jobs.get_or_insert_with(|| {
            let (tx, rx) = std::sync::mpsc::channel::<Job>();
            let done = done.clone();
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
        self.queued += 1;
        Ok(())
    }

    /// Each queued rebuild's answer, Rebuilt, in order.
    fn rebuild_wait(&mut self, out: &mut impl Write) -> Result<(), String> {
        if self.gathering.is_some() {
            return Err("RebuildWait inside a Rebuild".into());
        }
        // A slow mirror does not hold the push: past REBUILD_WAIT the
        // rebuilds give up (what they wrote stays, checked; the rest is
        // sent). drydock hears nothing meanwhile and gives up after 300 s
        // of silence: this ends well before.
        let deadline = std::time::Instant::now() + rebuild_wait();
        let done_rx = &self.done.1;
        for _ in 0..self.queued {
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
                    self.n.written += PAGE;
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
        self.queued = 0;
        Ok(())
    }

    /// The disk synced; Done with what this session read and wrote.
    fn finish(&mut self, out: &mut impl Write) -> Result<(), String> {
        if self.queued > 0 || self.gathering.is_some() {
            return Err("Finish before RebuildWait".into());
        }
        self.disk.sync()?;
        send(
            out,
            &Msg::Done {
                peak_rss_kib: peak_rss_kib(),
                bytes_read: self.n.read,
                bytes_written: self.n.written,
            },
        )
    }
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
