//! The rebuild thread: pages written from package files (issue 18).

use std::io::Read;

use super::write::write_verified;
use super::{Aligned, Disk};
use crate::proto::{self, PAGE};

/// A package file to rebuild pages from, gathered from Rebuild frames.
pub(super) struct Job {
    pub(super) src: crate::package::Source,
    pub(super) pieces: Vec<crate::package::Piece>,
}

/// What the rebuild thread answers for one job: the pieces written, the
/// bytes fetched, why it stopped early; Err when the disk failed.
pub(super) type JobResult = Result<(crate::package::Outcome, u64), String>;

/// The rebuild thread: each job's package file fetched and its pieces
/// written (each checked against its hash before, and read back after),
/// until the jobs' sender goes.
pub(super) fn rebuild_jobs(
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
pub(super) const REBUILD_WAIT: std::time::Duration = std::time::Duration::from_secs(120);

/// REBUILD_WAIT, or the seconds in DRYDOCK_HELPER_REBUILD_WAIT: the SSH
/// tests set it (through their sshd's SetEnv) to see a stalled mirror
/// given up on in seconds rather than minutes.
pub(super) fn rebuild_wait() -> std::time::Duration {
    std::env::var("DRYDOCK_HELPER_REBUILD_WAIT")
        .ok()
        .and_then(|s| s.parse().ok())
        .map(std::time::Duration::from_secs)
        .unwrap_or(REBUILD_WAIT)
}

/// Set when the rebuilds are past REBUILD_WAIT: the package files still
/// being read stop, and those not started are not fetched.
pub(super) static GIVE_UP: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

pub(super) fn gave_up() -> String {
    format!(
        "the mirror was too slow: gave up after {} s of waiting, the rest is sent",
        rebuild_wait().as_secs()
    )
}

/// Most bytes of rebuilt pages written at once.
pub(super) const RUN_MAX: usize = 256 << 10;

/// Rebuilt pages (each already checked against its hash) gathered while
/// they are contiguous on the disk, then written, read back and checked
/// as one range: one write per 64 pages rather than one a page.
pub(super) struct Run<'a> {
    disk: &'a Disk,
    buf: Aligned,
    back: Aligned,
    start: u64,
    len: usize,
}

impl Run<'_> {
    pub(super) fn add(&mut self, off: u64, page: &[u8]) -> Result<(), String> {
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

    pub(super) fn flush(&mut self) -> Result<(), String> {
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
pub(super) struct Counted<R> {
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

pub(super) fn rebuild_one(
    stop: &std::sync::atomic::AtomicBool,
    job: &Job,
    run: &mut Run<'_>,
) -> JobResult {
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
