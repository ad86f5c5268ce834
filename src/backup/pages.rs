//! A backup's changed blocks, page by page: for a block the store held a
//! previous version of (the same block of the disk, in the version
//! before), the helper sends only the 4 KiB pages that differ from it, as
//! the push does the other way. drydock rebuilds the whole block from the
//! previous one, checks it against the SHA-256 the helper read it with,
//! and keeps it whole: restores and prunes do not change.

use std::collections::VecDeque;

use anyhow::{Result, anyhow, bail};
use drydock_helper::proto::{self, Msg, PAGE, PAGES_PER_BLOCK};

use super::store::Store;
use crate::image::manifest::{BLOCK_SIZE, Hash, block_len, sha256, zero_hash};
use crate::transfer::helper::{Link, PULL_LEVEL};
use crate::transfer::pull::precopy::{BlockSink, changed};

/// Blocks asked for and not answered yet, at most: each answer is small,
/// and the link stays busy while the workstation rebuilds.
const WINDOW: usize = 16;

/// What [`fetch_pages`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct PagesDone {
    /// Blocks rebuilt from their changed pages.
    pub rebuilt: u64,
    /// Pages that crossed the link.
    pub pages: u64,
    /// Blocks whose rebuild did not give the hash the helper read (two
    /// pages whose short hashes collide, or a previous block not what its
    /// name says): to be read whole.
    pub again: Vec<u64>,
}

/// Blocks WANT (each with the store's name of its previous version) from
/// the helper on LINK as their changed pages, into SINK. HOST holds the
/// hashes the disk was hashed with; a block read with another is refused
/// unless MOVING (a live disk), which takes the new hash.
///
/// Over 80 lines: one loop of asks kept ahead within the window and
/// answers taken in order, and the three answers a block can get; split,
/// the window's bookkeeping would cross function boundaries.
pub(super) async fn fetch_pages(
    link: &mut Link,
    (store, sink): (&Store, &mut impl BlockSink),
    size: u64,
    want: &[(u64, String)],
    (host, moving): (&mut [Hash], bool),
    mut progress: impl FnMut(u64),
) -> Result<PagesDone> {
    let mut done = PagesDone::default();
    let mut unz = zstd::bulk::Decompressor::new()?;
    let mut z = zstd::bulk::Compressor::new(PULL_LEVEL)?;
    let mut old = vec![0u8; BLOCK_SIZE as usize];
    let mut next = want.iter();
    let mut asked: VecDeque<&(u64, String)> = VecDeque::new();
    loop {
        while asked.len() < WINDOW {
            let Some(w) = next.next() else { break };
            let (i, ref name) = *w;
            let b = &mut old[..block_len(size, i) as usize];
            // A previous block the store cannot give back whole (damaged
            // since; `verify` says so): this one is read whole instead.
            if store.get(name, b).is_err() {
                done.again.push(i);
                continue;
            }
            let frame = Msg::ReadPages {
                index: i,
                level: PULL_LEVEL,
                old: proto::short_page_hashes(b),
            };
            link.send(frame.encode()).await?;
            asked.push_back(w);
        }
        let Some(&(i, ref name)) = asked.pop_front() else {
            break;
        };
        let len = block_len(size, i);
        match link.recv().await? {
            Msg::Zero { first, count: 1 } if first == i => {
                if host[i as usize] != zero_hash(len) {
                    if !moving {
                        return Err(changed(i));
                    }
                    host[i as usize] = zero_hash(len);
                }
                sink.zeros(i, len)?;
            }
            Msg::Pages {
                index,
                hash,
                mask,
                data,
            } if index == i => {
                let pages = unz
                    .decompress(&data, PAGES_PER_BLOCK * PAGE as usize)
                    .map_err(|e| {
                        anyhow!("the changed pages of block {i} do not decompress: {e}")
                    })?;
                let b = &mut old[..len as usize];
                let block = match store.get(name, b) {
                    Ok(()) => proto::apply_pages(b, &mask, &pages).map_err(|e| {
                        anyhow!("the helper's answer for block {i} is damaged: {e}")
                    })?,
                    Err(_) => Vec::new(),
                };
                if block.is_empty() || sha256(&block) != hash {
                    done.again.push(i);
                } else {
                    if hash != host[i as usize] {
                        if !moving {
                            return Err(changed(i));
                        }
                        host[i as usize] = hash;
                    }
                    sink.block(i, &block, &z.compress(&block)?, &hash)?;
                    done.rebuilt += 1;
                    done.pages += pages.len().div_ceil(PAGE as usize) as u64;
                }
            }
            m => bail!(
                "the helper sent {} where drydock waited for the pages of block {i}",
                m.name()
            ),
        }
        progress(len);
    }
    Ok(done)
}
