//! The disk the helper serves: opened with O_DIRECT, read and written in
//! aligned buffers.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};

use crate::proto::{BLOCK, Hash};

/// A buffer aligned for O_DIRECT (4 KiB covers every logical block size).
pub struct Aligned {
    v: Vec<u8>,
    off: usize,
    len: usize,
}

pub(super) const ALIGN: usize = 4096;

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

    pub(super) fn block_len(&self, i: u64) -> usize {
        BLOCK.min(self.size - i * BLOCK) as usize
    }

    /// Read `n` bytes at `off` into `buf` (aligned) and return them.
    pub(super) fn read_at<'a>(
        &self,
        buf: &'a mut Aligned,
        off: u64,
        n: usize,
    ) -> Result<&'a [u8], String> {
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

    pub(super) fn write_at(&self, buf: &mut Aligned, off: u64, n: usize) -> Result<(), String> {
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
    pub(super) fn hole_end(&self, off: u64) -> u64 {
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

pub(super) fn zero_hash(len: usize) -> Hash {
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
