//! A pull in helper mode: the request for a range of blocks, and the
//! feed that turns the helper's frames into blocks for a sink.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{Result, anyhow, bail};
use drydock_helper::proto::{BLOCK, Decoder, Msg, VERSION, sha256};
use serde::Serialize;

use super::PULL_LEVEL;
use crate::image::manifest::{BLOCK_SIZE, block_len};

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
