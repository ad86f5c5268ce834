//! The backup store: a folder of versions that share their blocks.
//!
//! ```text
//! STORE/store.json                  {"format": "drydock-backups/1"}
//! STORE/blocks/ab/abcd…(64 hex).zst  one 1 MiB block, zstd, named by the
//!                                   SHA-256 of its content
//! STORE/versions/ID.json            one version: when, from where, how
//!                                   consistent, and its manifest (the
//!                                   hash of every block of the disk)
//! ```
//!
//! Why a block store and not a chain of qcow2 overlays: every version is
//! a list of block hashes, so every version restores at the same speed
//! (a chain of overlays reads the newest through every older layer, and
//! PBS users report restores that slow down as chains grow); removing a
//! version is deleting its list and then the blocks no version names, with
//! nothing to merge; a block is checked against its name on every read.
//! The block is drydock's transfer unit, and the manifest's block hashes
//! are what the helper computes on the host, so a backup sends the blocks
//! whose hash the store lacks and nothing else. Zero blocks are not
//! stored. QEMU does not boot a version directly: it is laid out into a
//! sparse raw image first ([`Store::materialize`]).
//!
//! A block file is written to a temporary name, synced and renamed, so a
//! block under its name is whole. A version's file is written last,
//! atomically: a backup cut before it lists nothing, and its blocks are
//! reused by the next backup (or removed by `backups prune`).

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};

use crate::errors::{refused, usage};
use crate::image::manifest::{
    BLOCK_SIZE, Manifest, SEGMENT_BLOCKS, SegmentHasher, block_count, block_len, from_hex, sha256,
    to_hex, zero_hash,
};
use crate::util::write_atomic;

pub const FORMAT: &str = "drydock-backups/1";
const VERSION_FORMAT: &str = "drydock-backup-version/1";

/// How consistent a version is.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Consistency {
    /// Read while the VPS kept running: as after a power cut.
    CrashConsistent,
    /// Read while the VPS was frozen (services stopped, read-only).
    Frozen,
}

impl Consistency {
    pub fn describe(self) -> &'static str {
        match self {
            Consistency::CrashConsistent => "crash-consistent (read while the VPS ran)",
            Consistency::Frozen => "consistent (read while the VPS was frozen)",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Version {
    pub format: String,
    pub id: String,
    /// RFC 3339, UTC.
    pub created: String,
    pub consistency: Consistency,
    /// Blocks this version added to the store, and their bytes there.
    pub added_blocks: u64,
    pub added_bytes: u64,
    /// The host's shape (firmware, disk bus, network), for a VM of it.
    #[serde(default)]
    pub shape: Option<crate::vm::shape::Shape>,
    /// What the host ran when the version was taken: `verify --boot` and
    /// `restore` check it runs again (versions from before: not checked).
    #[serde(default)]
    pub services: Option<crate::services::ServiceSet>,
    pub manifest: Manifest,
}

impl Version {
    /// The distinct non-zero block hashes of this version.
    pub fn block_hashes(&self) -> BTreeSet<String> {
        let size = self.manifest.size;
        self.manifest
            .blocks
            .iter()
            .enumerate()
            .filter(|(i, h)| **h != to_hex(&zero_hash(block_len(size, *i as u64))))
            .map(|(_, h)| h.clone())
            .collect()
    }
}

pub struct Store {
    pub dir: PathBuf,
}

impl Store {
    /// The store at DIR, made (0700) if it does not exist.
    pub fn create(dir: &Path) -> Result<Store> {
        if !dir.join("store.json").exists() {
            if dir.exists() && std::fs::read_dir(dir)?.next().is_some() {
                return Err(refused!(
                    "{} is not empty and is not a drydock backup store; give another --store",
                    dir.display()
                ));
            }
            for d in [dir.to_path_buf(), dir.join("blocks"), dir.join("versions")] {
                std::fs::create_dir_all(&d)
                    .with_context(|| format!("cannot make {}", d.display()))?;
                set_mode(&d, 0o700)?;
            }
            write_atomic(
                &dir.join("store.json"),
                serde_json::to_string(&serde_json::json!({ "format": FORMAT }))?.as_bytes(),
            )?;
        }
        Store::open(dir)
    }

    /// The store at DIR, which must exist.
    pub fn open(dir: &Path) -> Result<Store> {
        let meta = dir.join("store.json");
        let text = std::fs::read_to_string(&meta).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                usage!(
                    "{} is not a drydock backup store (no store.json); `drydock backup HOST \
                     --store DIR` makes one",
                    dir.display()
                )
            } else {
                anyhow!("cannot read {}: {e}", meta.display())
            }
        })?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is damaged", meta.display()))?;
        if v["format"] != FORMAT {
            bail!(
                "{} is a store of format {}; this drydock reads {FORMAT}",
                dir.display(),
                v["format"]
            );
        }
        Ok(Store {
            dir: dir.to_path_buf(),
        })
    }

    /// Take the store for a change (a backup, a prune): one at a time.
    pub fn lock(&self) -> Result<File> {
        let p = self.dir.join("lock");
        let f = File::create(&p).with_context(|| format!("cannot open {}", p.display()))?;
        match f.try_lock() {
            Ok(()) => Ok(f),
            Err(std::fs::TryLockError::WouldBlock) => Err(refused!(
                "{} is in use by another drydock (a backup or a prune); wait for it to end",
                self.dir.display()
            )),
            Err(std::fs::TryLockError::Error(e)) => {
                Err(anyhow!("cannot lock {}: {e}", p.display()))
            }
        }
    }

    /// Where version V is laid out as a raw image for a job (a folder of
    /// the state folder: `restores`, `backups-boot`), made 0700.
    pub fn layout_path(&self, v: &Version, job: &str) -> Result<PathBuf> {
        let dir = crate::paths::state_dir()?.join(job);
        crate::paths::private_dir(&dir)?;
        let name = self
            .dir
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        Ok(dir.join(format!("{name}-{}.raw", v.id)))
    }

    /// `versions/ID.boot`: the kernel, initrd and command line the host
    /// ran when version ID was taken, and its seal (what `vm::boot` and a
    /// restore's sealed boot need to hold its services back).
    pub fn boot_dir(&self, id: &str) -> PathBuf {
        self.dir.join("versions").join(format!("{id}.boot"))
    }

    /// Where a backup records the boot files before its version has an id.
    pub fn boot_tmp(&self) -> PathBuf {
        self.dir.join("versions").join(".boot.tmp")
    }

    /// Move the boot files recorded in `boot_tmp` to version ID's folder
    /// (a kernel or initrd an older version held was linked there, not
    /// copied again: `bootfiles::fetch_reusing`).
    pub fn keep_boot(&self, id: &str) -> Result<Option<PathBuf>> {
        let tmp = self.boot_tmp();
        if !crate::remote::bootfiles::BootFiles::recorded_in(&tmp) {
            return Ok(None);
        }
        let dir = self.boot_dir(id);
        std::fs::rename(&tmp, &dir)?;
        Ok(Some(dir))
    }

    pub fn block_path(&self, hash: &str) -> PathBuf {
        self.dir
            .join("blocks")
            .join(&hash[..2])
            .join(format!("{hash}.zst"))
    }

    pub fn has(&self, hash: &str) -> bool {
        self.block_path(hash).exists()
    }

    /// Keep a block: FRAME is its zstd frame, already checked to give
    /// content of this HASH. Returns the bytes the store grew by.
    pub fn put(&self, hash: &str, frame: &[u8]) -> Result<u64> {
        let p = self.block_path(hash);
        if p.exists() {
            return Ok(0);
        }
        let dir = p.parent().expect("in blocks/xx");
        if !dir.exists() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = dir.join(format!(".{hash}.tmp"));
        let mut f =
            File::create(&tmp).with_context(|| format!("cannot write {}", tmp.display()))?;
        f.write_all(frame)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &p)?;
        Ok(frame.len() as u64)
    }

    /// Block HASH's content into BUF (its length: the block's), checked
    /// against its name.
    pub fn get(&self, hash: &str, buf: &mut [u8]) -> Result<()> {
        let p = self.block_path(hash);
        let frame = std::fs::read(&p).with_context(|| format!("cannot read {}", p.display()))?;
        let n = zstd::bulk::decompress_to_buffer(&frame, buf)
            .map_err(|e| anyhow!("{} does not decompress: {e}", p.display()))?;
        if n != buf.len() || to_hex(&sha256(buf)) != hash {
            bail!(
                "{} does not hold the block it is named for (damaged)",
                p.display()
            );
        }
        Ok(())
    }

    /// Temporary files left by a backup that was cut.
    pub fn clean_temporaries(&self) -> Result<()> {
        let _ = std::fs::remove_dir_all(self.boot_tmp());
        for sub in std::fs::read_dir(self.dir.join("blocks"))?.flatten() {
            if let Ok(rd) = std::fs::read_dir(sub.path()) {
                for f in rd.flatten() {
                    if f.file_name().to_string_lossy().ends_with(".tmp") {
                        std::fs::remove_file(f.path()).ok();
                    }
                }
            }
        }
        Ok(())
    }

    /// Every version, oldest first.
    pub fn versions(&self) -> Result<Vec<Version>> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(self.dir.join("versions"))?.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if !name.ends_with(".json") || name.starts_with('.') {
                continue;
            }
            out.push(self.load(&e.path())?);
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    fn load(&self, p: &Path) -> Result<Version> {
        let text =
            std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?;
        let v: Version = serde_json::from_str(&text)
            .with_context(|| format!("{} is damaged (not a version)", p.display()))?;
        if v.format != VERSION_FORMAT {
            bail!(
                "{} is of format {}; this drydock reads {VERSION_FORMAT}",
                p.display(),
                v.format
            );
        }
        Ok(v)
    }

    /// Version ID.
    pub fn version(&self, id: &str) -> Result<Version> {
        let p = self.dir.join("versions").join(format!("{id}.json"));
        if !p.exists() {
            let ids: Vec<String> = self.versions()?.into_iter().map(|v| v.id).collect();
            return Err(usage!(
                "no version {id} in {}; its versions: {}",
                self.dir.display(),
                if ids.is_empty() {
                    "none".to_string()
                } else {
                    ids.join(", ")
                }
            ));
        }
        self.load(&p)
    }

    /// A new version's id: the time, unique in the store.
    pub fn new_id(&self) -> String {
        let base = crate::util::now()
            .replace([':', '-'], "")
            .chars()
            .take(15)
            .collect::<String>();
        let mut id = base.clone();
        let mut n = 2;
        while self
            .dir
            .join("versions")
            .join(format!("{id}.json"))
            .exists()
        {
            id = format!("{base}-{n}");
            n += 1;
        }
        id
    }

    /// List the version: every block it names must be in the store.
    pub fn commit(&self, mut v: Version) -> Result<Version> {
        v.format = VERSION_FORMAT.to_string();
        for h in v.block_hashes() {
            if !self.has(&h) {
                bail!(
                    "internal: version {} names block {h}, which is not in the store",
                    v.id
                );
            }
        }
        let p = self.dir.join("versions").join(format!("{}.json", v.id));
        write_atomic(&p, serde_json::to_string_pretty(&v)?.as_bytes())?;
        File::open(self.dir.join("versions"))?.sync_all()?;
        Ok(v)
    }

    /// The store's bytes for each block hash of the store.
    pub fn block_sizes(&self) -> Result<BTreeMap<String, u64>> {
        let mut out = BTreeMap::new();
        for sub in std::fs::read_dir(self.dir.join("blocks"))?.flatten() {
            if let Ok(rd) = std::fs::read_dir(sub.path()) {
                for f in rd.flatten() {
                    let name = f.file_name().to_string_lossy().to_string();
                    if let Some(h) = name.strip_suffix(".zst")
                        && h.len() == 64
                    {
                        out.insert(h.to_string(), f.metadata()?.len());
                    }
                }
            }
        }
        Ok(out)
    }

    /// Remove all but the newest KEEP versions, then every block that no
    /// kept version names. Returns the ids removed and the bytes freed.
    pub fn prune(&self, keep: usize) -> Result<(Vec<String>, u64)> {
        let versions = self.versions()?;
        let cut = versions.len().saturating_sub(keep);
        let (gone, kept) = versions.split_at(cut);
        for v in gone {
            std::fs::remove_file(self.dir.join("versions").join(format!("{}.json", v.id)))?;
            let _ = std::fs::remove_dir_all(self.boot_dir(&v.id));
        }
        File::open(self.dir.join("versions"))?.sync_all()?;
        let wanted: BTreeSet<String> = kept.iter().flat_map(|v| v.block_hashes()).collect();
        let mut freed = 0;
        for (h, len) in self.block_sizes()? {
            if !wanted.contains(&h) {
                std::fs::remove_file(self.block_path(&h))?;
                freed += len;
            }
        }
        Ok((gone.iter().map(|v| v.id.clone()).collect(), freed))
    }

    /// Read every block of version V back, each checked against its name
    /// and the manifest, and the manifest's segments and digest computed
    /// again. A damaged block is moved aside (`….zst.damaged`), so that the
    /// next backup sends it again; the error names it and the versions it
    /// breaks.
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
                if p.exists() {
                    let mut aside = p.clone().into_os_string();
                    aside.push(".damaged");
                    std::fs::rename(&p, &aside).ok();
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
                 Versions that use them: {}. The damaged files were renamed to ….zst.damaged; \
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

fn set_mode(p: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot set the mode of {}", p.display()))
}
