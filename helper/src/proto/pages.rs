//! Hashes of blocks and pages, and a block's changed pages: what the push
//! uses to pick the pages it writes, and what a backup uses to send only
//! the pages of a block that differ from the store's previous version of
//! it (`ReadPages`, answered by `Pages`).

use super::{Hash, PAGE, PAGE_HASH};

/// Bytes of a page's hash in a `ReadPages`: a SHA-256 cut this short. It
/// only picks which pages cross the link; the block rebuilt from them is
/// checked against its whole SHA-256, and one that does not check (a
/// collision, one in four billion per changed page) is read again whole.
/// Shorter is cheaper on the link: 1 KiB per 1 MiB block asked.
pub const SHORT_HASH: usize = 4;

/// SHA-256 of each 4 KiB page of BLOCK, cut to `PAGE_HASH` bytes.
pub fn page_hashes(block: &[u8]) -> Vec<u8> {
    hashes_cut(block, PAGE_HASH)
}

/// SHA-256 of each 4 KiB page of BLOCK, cut to `SHORT_HASH` bytes.
pub fn short_page_hashes(block: &[u8]) -> Vec<u8> {
    hashes_cut(block, SHORT_HASH)
}

fn hashes_cut(block: &[u8], cut: usize) -> Vec<u8> {
    use sha2::{Digest, Sha256};
    let mut out = Vec::with_capacity(block.len().div_ceil(PAGE as usize) * cut);
    for page in block.chunks(PAGE as usize) {
        out.extend_from_slice(&Sha256::digest(page)[..cut]);
    }
    out
}

pub fn sha256(data: &[u8]) -> Hash {
    use sha2::{Digest, Sha256};
    Sha256::digest(data).into()
}

pub fn is_zero(data: &[u8]) -> bool {
    let (chunks, rest) = data.as_chunks::<16>();
    chunks.iter().all(|c| u128::from_ne_bytes(*c) == 0) && rest.iter().all(|&b| b == 0)
}

/// The pages of NEW whose short hash is not the one OLD gives for the same
/// page (`short_page_hashes` of the previous block): a bit each in the
/// mask, least significant first, and their bytes one after the other. OLD
/// of another page count than NEW's says nothing: every page is sent.
pub fn changed_pages(new: &[u8], old: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let count = new.len().div_ceil(PAGE as usize);
    let mut mask = vec![0u8; count.div_ceil(8)];
    let mut pages = Vec::new();
    let same_shape = old.len() == count * SHORT_HASH;
    for (p, page) in new.chunks(PAGE as usize).enumerate() {
        let same = same_shape && {
            use sha2::{Digest, Sha256};
            Sha256::digest(page)[..SHORT_HASH] == old[p * SHORT_HASH..(p + 1) * SHORT_HASH]
        };
        if !same {
            mask[p / 8] |= 1 << (p % 8);
            pages.extend_from_slice(page);
        }
    }
    (mask, pages)
}

/// OLD (the previous block, of the new one's length) with the pages MASK
/// names replaced by PAGES, in order. An error when MASK and PAGES do not
/// fit that block: the answer is not one to this question.
pub fn apply_pages(old: &[u8], mask: &[u8], pages: &[u8]) -> Result<Vec<u8>, String> {
    let count = old.len().div_ceil(PAGE as usize);
    if mask.len() != count.div_ceil(8) {
        return Err(format!(
            "a mask of {} bytes for a block of {count} pages",
            mask.len()
        ));
    }
    let mut block = old.to_vec();
    let mut at = 0usize;
    for p in 0..count {
        if mask[p / 8] & (1 << (p % 8)) == 0 {
            continue;
        }
        let r = p * PAGE as usize..((p + 1) * PAGE as usize).min(old.len());
        let n = r.len();
        let Some(src) = pages.get(at..at + n) else {
            return Err(format!(
                "{} bytes of pages, fewer than the mask names",
                pages.len()
            ));
        };
        block[r].copy_from_slice(src);
        at += n;
    }
    if at != pages.len() {
        return Err(format!(
            "{} bytes of pages, more than the mask names ({at})",
            pages.len()
        ));
    }
    Ok(block)
}
