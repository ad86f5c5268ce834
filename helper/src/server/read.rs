//! Reading: block hashes, and blocks read, hashed and compressed in lanes.

use std::io::Write;

use super::disk::zero_hash;
use super::{Aligned, Counters, Disk, check_range, send};
use crate::proto::{self, BLOCK, Hash, Msg};

/// A BlockHash for each block of [first, end): its SHA-256 (and its pages'
/// when PAGES); holes are not read.
pub(super) fn hash_blocks(
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

/// Block INDEX, against the short page hashes OLD of the block drydock
/// had before: Pages with the pages that differ, compressed with C (or a
/// Zero, for a hole or a block of zeros).
pub(super) fn read_pages(
    disk: &Disk,
    (index, old): (u64, &[u8]),
    c: &mut zstd::bulk::Compressor<'static>,
    buf: &mut Aligned,
    out: &mut impl Write,
    n: &mut Counters,
) -> Result<(), String> {
    check_range(disk, index, index + 1)?;
    let len = disk.block_len(index);
    let off = index * BLOCK;
    let data: &[u8] = if disk.hole_end(off) >= off + len as u64 {
        &[]
    } else {
        n.read += len as u64;
        disk.read_at(buf, off, len)?
    };
    if proto::is_zero(data) {
        return send(
            out,
            &Msg::Zero {
                first: index,
                count: 1,
            },
        );
    }
    let hash = proto::sha256(data);
    let (mask, pages) = proto::changed_pages(data, old);
    let data = c.compress(&pages).map_err(|e| format!("zstd: {e}"))?;
    send(
        out,
        &Msg::Pages {
            index,
            hash,
            mask,
            data,
        },
    )
}

/// What a lane made of one block.
pub(super) enum Item {
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
pub(super) const LANES: u64 = 2;

/// The stack of each thread the helper starts: its memory is locked
/// (mlockall), a thread's whole stack with it (2 MiB by default).
pub(super) const THREAD_STACK: usize = 256 << 10;

/// One lane of `read_blocks`, on a thread of its own: blocks FIRST + LANE,
/// FIRST + LANE + LANES, ... below END, each read (holes and blocks of
/// zeros as `Item::Zero`), hashed and compressed with C into a buffer from
/// BACK, and sent on TX in order, until the end, an error (sent) or the
/// receiver going away. Gives the bytes it read.
pub(super) fn lane(
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
pub(super) fn read_blocks(
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
