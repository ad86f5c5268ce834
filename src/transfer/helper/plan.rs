//! A push in helper mode, block by block: what to write of a block, from
//! the helper's hashes of what the disk holds, and the frame that writes it.

use std::fs::File;
use std::os::unix::fs::FileExt;

use anyhow::{Context, Result};
use drydock_helper::proto::{BLOCK, Msg, PAGE, PAGE_HASH, page_hashes, sha256};

/// A range of bytes to write: whole pages inside one block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Patch {
    pub offset: u64,
    pub len: u32,
}

/// What the disk holds in one block, as the helper hashed it, against the
/// pulled (`old`) and new content: nothing to do, pages to write, or a
/// refusal.
pub fn plan_block(
    index: u64,
    disk_hash: &[u8; 32],
    disk_pages: &[u8],
    old: Option<&[u8; 32]>,
    new_block: &[u8],
    base_block: Option<&[u8]>,
) -> Result<Vec<Patch>, String> {
    let new_hash = sha256(new_block);
    if *disk_hash == new_hash {
        return Ok(Vec::new());
    }
    let new_pages = page_hashes(new_block);
    if disk_pages.len() != new_pages.len() {
        return Err(format!(
            "block {index}: the helper sent page hashes of another size"
        ));
    }
    let trusted = match old {
        None => true,
        Some(o) => o == disk_hash,
    };
    if !trusted {
        // Neither the pulled nor the new content: a push cut inside this
        // block leaves pages of both; anything else is a changed disk.
        let Some(base) = base_block else {
            return Err(format!(
                "block {index} (byte {}) holds neither what was pulled nor the new image",
                index * BLOCK
            ));
        };
        let base_pages = page_hashes(base);
        for p in 0..new_pages.len() / PAGE_HASH {
            let r = p * PAGE_HASH..(p + 1) * PAGE_HASH;
            if disk_pages[r.clone()] != new_pages[r.clone()]
                && disk_pages[r.clone()] != base_pages[r]
            {
                return Err(format!(
                    "byte {} holds neither what was pulled nor the new image",
                    index * BLOCK + p as u64 * PAGE
                ));
            }
        }
    }
    let mut out: Vec<Patch> = Vec::new();
    for p in 0..new_pages.len() / PAGE_HASH {
        let r = p * PAGE_HASH..(p + 1) * PAGE_HASH;
        if disk_pages[r.clone()] == new_pages[r] {
            continue;
        }
        let off = index * BLOCK + p as u64 * PAGE;
        let len = (new_block.len() as u64 - p as u64 * PAGE).min(PAGE) as u32;
        match out.last_mut() {
            Some(last) if last.offset + last.len as u64 == off => last.len += len,
            _ => out.push(Patch { offset: off, len }),
        }
    }
    Ok(out)
}

/// A `Write` frame for a patch, read from the image.
pub fn write_frame(
    image: &File,
    patch: Patch,
    z: &mut zstd::bulk::Compressor<'static>,
) -> Result<Vec<u8>> {
    let mut data = vec![0u8; patch.len as usize];
    image
        .read_exact_at(&mut data, patch.offset)
        .context("cannot read the image")?;
    Ok(Msg::Write {
        offset: patch.offset,
        len: patch.len,
        hash: sha256(&data),
        data: z.compress(&data)?,
    }
    .encode())
}
