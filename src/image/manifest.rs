//! Per-block SHA-256 of an image, and the segment hashes the VPS checks.
//!
//! Block size: 1 MiB. It is the unit of a delta push and of the sparse
//! layout (a block of zeros is never written locally). Smaller blocks give a
//! finer delta but a dd-mode push pays one `dd` per changed range and the
//! manifest grows (a 25 GB disk is 25,600 hashes, 1.7 MB of JSON, at 1 MiB;
//! 16 times that at 64 KiB). `scripts/bench` prints the hashing
//! rate per block size so the choice can be checked on a given machine.
//!
//! A segment is 16 blocks: in dd mode the VPS hashes each segment before it
//! sends it (a few processes per 16 MiB), sends a segment of zeros as a
//! header alone, and a pull resumes from the last segment whose hash
//! matched on both ends. 16 MiB keeps most of an empty disk's zeros
//! unsent (a Debian 12 image of 3 GiB: 31 of 48 segments of 64 MiB are
//! zero, far more of 16 MiB) at a few process starts per segment. The manifest's `digest` is
//! the SHA-256 of the segment hashes in order, so the VPS's and the local
//! side's digests of the whole disk can be compared.

use crate::util::write_atomic;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub const BLOCK_SIZE: u64 = 1 << 20;
pub const SEGMENT_BLOCKS: u64 = 16;
pub const FORMAT: &str = "drydock-manifest/1";

pub type Hash = [u8; 32];

pub fn sha256(data: &[u8]) -> Hash {
    Sha256::digest(data).into()
}

pub fn to_hex(h: &Hash) -> String {
    hex::encode(h)
}

pub fn from_hex(s: &str) -> Result<Hash> {
    let v = hex::decode(s.trim()).with_context(|| format!("'{s}' is not a hex SHA-256"))?;
    v.try_into()
        .map_err(|_| anyhow::anyhow!("'{s}' is not 32 bytes of SHA-256"))
}

pub fn is_zero(data: &[u8]) -> bool {
    // Compare 16-byte chunks: the compiler turns this into wide loads.
    let (chunks, rest) = data.as_chunks::<16>();
    chunks.iter().all(|c| u128::from_ne_bytes(*c) == 0) && rest.iter().all(|&b| b == 0)
}

/// Where an image came from.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Source {
    pub host: String,
    pub device: String,
    pub boot_id: String,
    pub pulled_at: String,
}

impl Source {
    /// DEVICE of HOST in the boot BOOT_ID, read now.
    pub fn read_now(host: String, device: &str, boot_id: &str) -> Source {
        Source {
            host,
            device: device.to_string(),
            boot_id: boot_id.to_string(),
            pulled_at: crate::util::now(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub size: u64,
    pub block_size: u64,
    pub segment_blocks: u64,
    pub source: Option<Source>,
    /// SHA-256 over the segment hashes, in order.
    pub digest: String,
    pub segments: Vec<String>,
    pub blocks: Vec<String>,
}

pub fn block_count(size: u64) -> u64 {
    size.div_ceil(BLOCK_SIZE)
}

pub fn segment_count(size: u64) -> u64 {
    block_count(size).div_ceil(SEGMENT_BLOCKS)
}

/// Bytes in block `i` of an image of `size` bytes.
pub fn block_len(size: u64, i: u64) -> u64 {
    BLOCK_SIZE.min(size - i * BLOCK_SIZE)
}

pub fn digest_of(segments: &[String]) -> Result<String> {
    let mut h = Sha256::new();
    for s in segments {
        h.update(from_hex(s)?);
    }
    Ok(hex::encode(h.finalize()))
}

impl Manifest {
    pub fn new(
        size: u64,
        source: Option<Source>,
        segments: Vec<String>,
        blocks: Vec<String>,
    ) -> Result<Manifest> {
        if blocks.len() as u64 != block_count(size) || segments.len() as u64 != segment_count(size)
        {
            bail!(
                "internal: {} blocks and {} segments for {size} bytes",
                blocks.len(),
                segments.len()
            );
        }
        Ok(Manifest {
            format: FORMAT.to_string(),
            size,
            block_size: BLOCK_SIZE,
            segment_blocks: SEGMENT_BLOCKS,
            source,
            digest: digest_of(&segments)?,
            segments,
            blocks,
        })
    }

    /// `IMAGE.manifest`, beside the image.
    pub fn path_for(image: &Path) -> PathBuf {
        let mut p = image.as_os_str().to_owned();
        p.push(".manifest");
        PathBuf::from(p)
    }

    pub fn load(path: &Path) -> Result<Manifest> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the manifest {}", path.display()))?;
        let m: Manifest = serde_json::from_str(&text).map_err(|e| {
            crate::errors::refused!(
                "{} is not a drydock manifest ({e}); pull the disk again, or push with --full \
                 to write every block without the check",
                path.display()
            )
        })?;
        if m.format != FORMAT || m.block_size != BLOCK_SIZE || m.segment_blocks != SEGMENT_BLOCKS {
            bail!(
                "{} is a manifest this drydock cannot use ({}, blocks of {} bytes)",
                path.display(),
                m.format,
                m.block_size
            );
        }
        if m.blocks.len() as u64 != block_count(m.size)
            || m.segments.len() as u64 != segment_count(m.size)
        {
            bail!(
                "{} is damaged: its hash count does not match its size",
                path.display()
            );
        }
        // Checked whole before anything trusts it: a segment hash changed
        // (damage, an edit) shows here, not as a block left unwritten.
        if digest_of(&m.segments).ok().as_deref() != Some(m.digest.as_str()) {
            return Err(crate::errors::refused!(
                "{} is damaged: its segment hashes do not give its digest; pull the disk again, \
                 or push with --full to write every block without the check",
                path.display()
            ));
        }
        Ok(m)
    }

    /// Write atomically (temp file, fsync, rename), mode 0600.
    pub fn save(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self)?;
        write_atomic(path, text.as_bytes())
    }
}

/// SHA-256 of `len` zero bytes, computed once per length (a disk is mostly
/// zero blocks and whole zero segments: their hashes are constants).
pub fn zero_hash(len: u64) -> Hash {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    static CACHE: OnceLock<Mutex<HashMap<u64, Hash>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(h) = cache.lock().expect("not poisoned").get(&len) {
        return *h;
    }
    let mut h = Sha256::new();
    feed_zeros(&mut h, len);
    let h: Hash = h.finalize().into();
    cache.lock().expect("not poisoned").insert(len, h);
    h
}

fn feed_zeros(h: &mut Sha256, mut len: u64) {
    static ZEROS: [u8; 1 << 16] = [0; 1 << 16];
    while len > 0 {
        let n = len.min(ZEROS.len() as u64);
        h.update(&ZEROS[..n as usize]);
        len -= n;
    }
}

/// Hashes of one segment's blocks, and of the segment as a whole. Zero
/// blocks are recognised (a fast compare) rather than hashed; leading zeros
/// are fed to the segment hash only once something else follows, so an
/// all-zero segment costs no hashing at all.
pub struct SegmentHasher {
    whole: Sha256,
    leading_zeros: u64,
    nonzero_seen: bool,
    pub blocks: Vec<String>,
}

impl Default for SegmentHasher {
    fn default() -> Self {
        SegmentHasher {
            whole: Sha256::new(),
            leading_zeros: 0,
            nonzero_seen: false,
            blocks: Vec::with_capacity(SEGMENT_BLOCKS as usize),
        }
    }
}

impl SegmentHasher {
    pub fn add_block(&mut self, data: &[u8]) {
        if is_zero(data) {
            self.blocks.push(hex::encode(zero_hash(data.len() as u64)));
            if self.nonzero_seen {
                self.whole.update(data);
            } else {
                self.leading_zeros += data.len() as u64;
            }
            return;
        }
        if !self.nonzero_seen {
            feed_zeros(&mut self.whole, self.leading_zeros);
            self.nonzero_seen = true;
        }
        self.whole.update(data);
        self.blocks.push(hex::encode(sha256(data)));
    }

    /// A block whose SHA-256 the caller already computed (and checked).
    pub fn add_block_hashed(&mut self, data: &[u8], hash: Hash) {
        if is_zero(data) {
            self.add_zero_block(data.len() as u64);
            return;
        }
        if !self.nonzero_seen {
            feed_zeros(&mut self.whole, self.leading_zeros);
            self.nonzero_seen = true;
        }
        self.whole.update(data);
        self.blocks.push(hex::encode(hash));
    }

    /// A block known to be zeros (a hole, or a block the helper did not
    /// send): no bytes to look at.
    pub fn add_zero_block(&mut self, len: u64) {
        self.blocks.push(hex::encode(zero_hash(len)));
        if self.nonzero_seen {
            feed_zeros(&mut self.whole, len);
        } else {
            self.leading_zeros += len;
        }
    }

    pub fn finish(self) -> (String, Vec<String>) {
        let whole = if self.nonzero_seen {
            self.whole.finalize().into()
        } else {
            zero_hash(self.leading_zeros)
        };
        (hex::encode(whole), self.blocks)
    }
}

/// Hash a local image file (sparse-friendly: reads are cheap for holes),
/// its segments on every core (up to 4): PROGRESS gets each segment's
/// bytes as it is done.
pub fn hash_image(path: &Path, mut progress: impl FnMut(u64)) -> Result<Manifest> {
    let f = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let size = f.metadata()?.len();
    let nblocks = block_count(size);
    let nseg = nblocks.div_ceil(SEGMENT_BLOCKS);
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, 4);
    let next = std::sync::atomic::AtomicU64::new(0);
    let mut done: Vec<Option<(String, Vec<String>)>> = vec![None; nseg as usize];
    // One segment, hashed.
    let segment = |k: u64, buf: &mut [u8]| -> Result<(String, Vec<String>, u64)> {
        let mut seg = SegmentHasher::default();
        let mut bytes = 0;
        for i in k * SEGMENT_BLOCKS..((k + 1) * SEGMENT_BLOCKS).min(nblocks) {
            let len = block_len(size, i) as usize;
            f.read_exact_at(&mut buf[..len], i * BLOCK_SIZE)
                .with_context(|| format!("cannot read {} at {}", path.display(), i * BLOCK_SIZE))?;
            seg.add_block(&buf[..len]);
            bytes += len as u64;
        }
        let (s, b) = seg.finish();
        Ok((s, b, bytes))
    };
    std::thread::scope(|scope| -> Result<()> {
        let (tx, rx) = std::sync::mpsc::channel();
        for _ in 0..threads {
            let tx = tx.clone();
            let (next, segment) = (&next, &segment);
            scope.spawn(move || {
                let mut buf = vec![0u8; BLOCK_SIZE as usize];
                loop {
                    let k = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if k >= nseg {
                        return;
                    }
                    let r = segment(k, &mut buf).map(|r| (k, r));
                    let stop = r.is_err();
                    if tx.send(r).is_err() || stop {
                        return;
                    }
                }
            });
        }
        drop(tx);
        for r in rx {
            let (k, (s, b, bytes)) = match r {
                Ok(v) => v,
                Err(e) => {
                    // The others stop at their next segment.
                    next.store(nseg, std::sync::atomic::Ordering::Relaxed);
                    return Err(e);
                }
            };
            progress(bytes);
            done[k as usize] = Some((s, b));
        }
        Ok(())
    })?;
    let mut segments = Vec::with_capacity(nseg as usize);
    let mut blocks = Vec::with_capacity(nblocks as usize);
    for d in done {
        let (s, b) = d.context("a segment of the image was not hashed")?;
        segments.push(s);
        blocks.extend(b);
    }
    Manifest::new(size, None, segments, blocks)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection() {
        let mut v = vec![0u8; 4097];
        assert!(is_zero(&v));
        v[4096] = 1;
        assert!(!is_zero(&v));
        v[4096] = 0;
        v[17] = 1;
        assert!(!is_zero(&v));
    }

    #[test]
    fn zero_shortcuts_give_the_plain_sha256() {
        for layout in [[0u8, 0, 0], [0, 1, 0], [1, 0, 0], [0, 0, 1]] {
            let mut data = Vec::new();
            let mut seg = SegmentHasher::default();
            for (i, &b) in layout.iter().enumerate() {
                let len = if i == 2 { 1000 } else { BLOCK_SIZE as usize };
                let block = vec![b; len];
                // Zeros given as bytes for the first block, as a length
                // after: both must hash the same.
                if b == 0 && i > 0 {
                    seg.add_zero_block(len as u64);
                } else {
                    seg.add_block(&block);
                }
                data.extend_from_slice(&block);
            }
            let (whole, blocks) = seg.finish();
            assert_eq!(whole, hex::encode(sha256(&data)), "{layout:?}");
            assert_eq!(
                blocks[2],
                hex::encode(sha256(&data[2 * BLOCK_SIZE as usize..]))
            );
        }
    }

    #[test]
    fn counts_for_sizes_not_multiple_of_block() {
        let size = 3 * BLOCK_SIZE + 5;
        assert_eq!(block_count(size), 4);
        assert_eq!(block_len(size, 3), 5);
        assert_eq!(segment_count(size), 1);
        assert_eq!(segment_count(SEGMENT_BLOCKS * BLOCK_SIZE + 1), 2);
        assert_eq!(segment_count(0), 0);
    }

    #[test]
    fn hash_image_matches_sha256_of_segments() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        let data: Vec<u8> = (0..(2 * BLOCK_SIZE + 100))
            .map(|i| (i % 251) as u8)
            .collect();
        std::fs::write(&p, &data).unwrap();
        let m = hash_image(&p, |_| {}).unwrap();
        assert_eq!(m.blocks.len(), 3);
        assert_eq!(m.segments, vec![hex::encode(sha256(&data))]);
        assert_eq!(
            m.blocks[2],
            hex::encode(sha256(&data[2 * BLOCK_SIZE as usize..]))
        );
        let p2 = Manifest::path_for(&p);
        m.save(&p2).unwrap();
        let back = Manifest::load(&p2).unwrap();
        assert_eq!(back.digest, m.digest);
    }
}
