//! Reading a version back: `verify` (every block against its name and
//! the manifest) and the layout of a version as a raw image.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use serde::Serialize;

use super::store::{Store, Version};
use crate::image::manifest::{
    BLOCK_SIZE, Manifest, SEGMENT_BLOCKS, SegmentHasher, block_count, block_len, from_hex, to_hex,
    zero_hash,
};

impl Store {
    /// Read every block of version V back, each checked against its name
    /// and the manifest, and the manifest's segments and digest computed
    /// again. A damaged block is moved aside (`….zst.damaged`), so that the
    /// next backup sends it again; the error names it and the versions it
    /// breaks.
    /// Over 80 lines: one pass over the blocks segment by segment (each read,
    /// checked and hashed into its segment), then the damaged blocks moved
    /// aside and the versions using them named in one error, then the segments
    /// judged; split, the damaged map and the bad segments would be passed
    /// between functions.
    pub fn verify(&self, v: &Version, mut progress: impl FnMut(u64)) -> Result<VerifyReport> {
        let m = &v.manifest;
        let n = block_count(m.size);
        if m.blocks.len() as u64 != n || m.digest != crate::image::manifest::digest_of(&m.segments)?
        {
            bail!(
                "version {}'s manifest is damaged (its digest does not match)",
                v.id
            );
        }
        let mut buf = vec![0u8; BLOCK_SIZE as usize];
        let mut damaged: BTreeMap<String, String> = BTreeMap::new();
        let mut checked = BTreeSet::new();
        let mut bad_segments = Vec::new();
        for s in 0..m.segments.len() as u64 {
            let mut h = SegmentHasher::default();
            let mut whole = true;
            for i in s * SEGMENT_BLOCKS..((s + 1) * SEGMENT_BLOCKS).min(n) {
                let len = block_len(m.size, i);
                let name = &m.blocks[i as usize];
                if *name == to_hex(&zero_hash(len)) {
                    h.add_zero_block(len);
                } else {
                    let b = &mut buf[..len as usize];
                    match self.get(name, b) {
                        Ok(()) => h.add_block_hashed(b, from_hex(name)?),
                        Err(e) => {
                            damaged.entry(name.clone()).or_insert(format!("{e:#}"));
                            whole = false;
                        }
                    }
                    checked.insert(name.clone());
                }
                progress(len);
            }
            if whole && h.finish().0 != m.segments[s as usize] {
                bad_segments.push(s);
            }
        }
        if !damaged.is_empty() {
            for h in damaged.keys() {
                let p = self.block_path(h);
                if self.fs.exists(&p) {
                    let mut aside = p.clone().into_os_string();
                    aside.push(".damaged");
                    self.fs.rename(&p, Path::new(&aside)).ok();
                }
            }
            let users: Vec<String> = self
                .versions()?
                .into_iter()
                .filter(|o| o.block_hashes().iter().any(|h| damaged.contains_key(h)))
                .map(|o| o.id)
                .collect();
            let first: Vec<String> = damaged.values().take(3).cloned().collect();
            return Err(anyhow!(
                "version {} is damaged: {} of its {} blocks do not read back as stored ({}{}). \
                 Versions that use them: {}. The damaged files were renamed to ….damaged; \
                 the next `drydock backup` of the host sends those blocks again if its disk \
                 still holds them",
                v.id,
                damaged.len(),
                checked.len(),
                first.join("; "),
                if damaged.len() > 3 { "; …" } else { "" },
                users.join(", ")
            ));
        }
        if !bad_segments.is_empty() {
            bail!(
                "version {}'s manifest does not match its blocks (segments {bad_segments:?}): \
                 the version file is damaged",
                v.id
            );
        }
        Ok(VerifyReport {
            id: v.id.clone(),
            blocks: checked.len() as u64,
            size: m.size,
            digest: m.digest.clone(),
        })
    }

    /// Lay version V out as a sparse raw image at PATH, with its manifest
    /// beside it (every block checked against its name as it is read).
    pub fn materialize(
        &self,
        v: &Version,
        path: &Path,
        mut progress: impl FnMut(u64),
    ) -> Result<()> {
        use std::os::unix::fs::FileExt;
        let m = &v.manifest;
        let f = File::create(path).with_context(|| format!("cannot write {}", path.display()))?;
        f.set_len(m.size)?;
        let mut buf = vec![0u8; BLOCK_SIZE as usize];
        for (i, name) in m.blocks.iter().enumerate() {
            let i = i as u64;
            let len = block_len(m.size, i);
            if *name != to_hex(&zero_hash(len)) {
                let b = &mut buf[..len as usize];
                self.get(name, b)?;
                f.write_all_at(b, i * BLOCK_SIZE)?;
            }
            progress(len);
        }
        f.sync_all()?;
        m.save(&Manifest::path_for(path))?;
        Ok(())
    }
}

#[derive(Debug, Serialize)]
pub struct VerifyReport {
    pub id: String,
    pub blocks: u64,
    pub size: u64,
    pub digest: String,
}
