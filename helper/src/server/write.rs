//! Writing: each range checked against its hash before it is written, and
//! read back after.

use super::{Aligned, Counters, Disk};
use crate::proto::{self, BLOCK, Hash};

/// One Write's fields.
pub(super) struct Patch<'a> {
    pub(super) offset: u64,
    pub(super) len: u32,
    pub(super) hash: [u8; 32],
    pub(super) data: &'a [u8],
}

/// W's data decompressed, checked against its hash, written, read back
/// and checked again; nothing is written from data that arrived damaged.
pub(super) fn write_checked(
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
pub(super) fn write_verified(
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

pub(super) fn check_range(disk: &Disk, first: u64, end: u64) -> Result<(), String> {
    if first > end || end > disk.size.div_ceil(BLOCK) {
        return Err(format!(
            "blocks {first}..{end} are outside a disk of {} bytes",
            disk.size
        ));
    }
    Ok(())
}
