//! The backup store: a folder of versions that share their blocks.
//!
//! ```text
//! STORE/store.json                  {"format": "drydock-backups/2",
//!                                    "encryption": "age"}
//! STORE/keys/FP.age                 the store's key, for one user key
//! STORE/blocks/ab/abcd…(64 hex).age  one 1 MiB block, zstd, encrypted,
//!                                   named by a keyed hash of its SHA-256
//! STORE/versions/ID.json.age        one version: when, from where, how
//!                                   consistent, and its manifest (the
//!                                   hash of every block of the disk)
//! STORE/versions/ID.boot/FILE.age   the kernel, initrd and seal it ran
//! ```
//!
//! Encryption: `crypt.rs`. A store made before it (format 1) has no keys/
//! and keeps `blocks/ab/SHA256.zst`, `versions/ID.json` and plain boot
//! files: it is read and written as it is, and said to be unencrypted.
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
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};

use crate::errors::{refused, usage};
use crate::image::manifest::{Manifest, block_len, sha256, to_hex, zero_hash};

use super::backend::{self, Backend, Local};
use super::crypt::{self, Keys};
use super::sftp::{Remote, StoreUrl};

/// A store made before encryption: read and written as it is.
pub const FORMAT_PLAIN: &str = "drydock-backups/1";
pub const FORMAT: &str = "drydock-backups/2";
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
    /// The store's folder: here, or on the store host (`fs`).
    pub dir: PathBuf,
    pub(super) keys: Keys,
    pub(super) fs: Box<dyn Backend>,
}

/// The command line's ssh config file (-F) and --accept-new-host-key,
/// which a store over SSH is reached with too (the other ssh options and
/// -i are the VPS's: the store host's go in the ssh config).
static STORE_SSH: std::sync::OnceLock<(Option<PathBuf>, bool)> = std::sync::OnceLock::new();

/// Set once, by a command that connects to a VPS, before it opens a store.
pub fn reach_store_with(config: Option<PathBuf>, accept_new_host_key: bool) {
    let _ = STORE_SSH.set((config, accept_new_host_key));
}

/// The folder a --store names, and where its files are: a local path, or
/// `ssh://[user@]host[:port]/PATH` (connected to here).
fn reach(dir: &Path) -> Result<(PathBuf, Box<dyn Backend>)> {
    match StoreUrl::parse(&dir.to_string_lossy()) {
        None => Ok((dir.to_path_buf(), Box::new(Local))),
        Some(url) => {
            let url = url?;
            let (config, accept_new) = STORE_SSH.get().cloned().unwrap_or_default();
            let (args, _) = crate::ssh::SshArgs::checked(config, Vec::new())?;
            let remote = Remote::connect(&url, &args, accept_new)?;
            Ok((url.path.clone(), Box::new(remote)))
        }
    }
}

impl Store {
    /// The store at DIR, made (0700) if it does not exist: encrypted to
    /// the user's KEY file (made too if it does not exist; said on
    /// stderr by the caller from `made_key`).
    pub fn create(given: &Path, key: Option<&Path>) -> Result<(Store, bool)> {
        let (dir, fs) = reach(given)?;
        let dir = dir.as_path();
        if fs.exists(&dir.join("store.json")) {
            return Store::opened(dir, fs, key).map(|s| (s, false));
        }
        if fs.list(dir).is_ok_and(|l| !l.is_empty()) {
            return Err(refused!(
                "{} is not empty and is not a drydock backup store; give another --store",
                fs.show(dir)
            ));
        }
        let Some(key) = key else {
            return Err(usage!(
                "{} would be a new store, and a new store is encrypted: give --key-file FILE \
                 (or DRYDOCK_KEY_FILE=FILE), an age key file; drydock makes FILE if it does \
                 not exist. Keep a copy of it away from the store: without it nothing in the \
                 store can be read. Nothing was made",
                fs.show(dir)
            ));
        };
        let (user, made) = if key.exists() {
            (crypt::read_key_file(key)?, false)
        } else {
            (crypt::new_key_file(key)?, true)
        };
        let existed = fs.is_dir(dir);
        let keys = Store::lay_out(&*fs, dir, &user).map_err(|e| {
            // A store half made would be refused next time as a folder
            // that is not a store: what was made goes again.
            if existed {
                for p in ["store.json", "keys", "blocks", "versions"] {
                    let p = dir.join(p);
                    let _ = fs.remove_dir_all(&p).or_else(|_| fs.remove_file(&p));
                }
            } else {
                let _ = fs.remove_dir_all(dir);
            }
            if made {
                let _ = std::fs::remove_file(key);
            }
            e.context(format!(
                "the new store {} could not be made; nothing of it was kept{}",
                fs.show(dir),
                if made {
                    ", nor the key file made for it"
                } else {
                    ""
                }
            ))
        })?;
        Ok((
            Store {
                dir: dir.to_path_buf(),
                keys,
                fs,
            },
            made,
        ))
    }

    /// A new store's folders, its key for USER and its store.json, last.
    fn lay_out(fs: &dyn Backend, dir: &Path, user: &age::x25519::Identity) -> Result<Keys> {
        for d in [dir.to_path_buf(), dir.join("blocks"), dir.join("versions")] {
            fs.make_dir(&d)?;
        }
        if fs.show(dir) == dir.display().to_string() {
            set_mode(dir, 0o700)?;
        }
        let keys = crypt::init(fs, dir, user)?;
        fs.write_atomic(
            &dir.join("store.json"),
            serde_json::to_string(&serde_json::json!({ "format": FORMAT, "encryption": "age" }))?
                .as_bytes(),
        )?;
        Ok(keys)
    }

    /// The store at DIR, which must exist, unlocked with the user's KEY
    /// file (a store made before encryption needs none).
    pub fn open(given: &Path, key: Option<&Path>) -> Result<Store> {
        let (dir, fs) = reach(given)?;
        Store::opened(&dir, fs, key)
    }

    fn opened(dir: &Path, fs: Box<dyn Backend>, key: Option<&Path>) -> Result<Store> {
        let meta = dir.join("store.json");
        let text = fs.read(&meta).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                usage!(
                    "{} is not a drydock backup store (no store.json); `drydock backup HOST \
                     --store DIR` makes one",
                    fs.show(dir)
                )
            } else {
                anyhow!("cannot read {}: {e}", fs.show(&meta))
            }
        })?;
        let v: serde_json::Value = serde_json::from_slice(&text)
            .with_context(|| format!("{} is damaged", fs.show(&meta)))?;
        let keys = if v["format"] == FORMAT_PLAIN {
            Keys::Plain
        } else if v["format"] == FORMAT && v["encryption"] == "age" {
            let Some(key) = key else {
                return Err(usage!(
                    "{} is encrypted: give its key file with --key-file FILE (or \
                     DRYDOCK_KEY_FILE=FILE). Nothing was read or changed",
                    fs.show(dir)
                ));
            };
            crypt::unlock(&*fs, dir, &crypt::read_key_file(key)?, key)?
        } else {
            bail!(
                "{} is a store of format {} ({}); this drydock reads {FORMAT_PLAIN} and {FORMAT} \
                 (age)",
                fs.show(dir),
                v["format"],
                v["encryption"]
            );
        };
        Ok(Store {
            dir: dir.to_path_buf(),
            keys,
            fs,
        })
    }

    /// The store as the user would type it (a local path, or its
    /// `ssh://` address).
    pub fn location(&self) -> String {
        self.fs.show(&self.dir)
    }

    /// P, a file of the store, as the user would type it.
    pub fn show(&self, p: &Path) -> String {
        self.fs.show(p)
    }

    /// Whether the store is on another machine.
    pub fn remote(&self) -> bool {
        self.location() != self.dir.display().to_string()
    }

    /// Whether its blocks, versions and boot files are encrypted.
    pub fn encrypted(&self) -> bool {
        self.keys.encrypted()
    }

    /// Take the store for a change (a backup, a forget): one at a time.
    /// Held until the guard is dropped (`backend::Backend::lock`).
    pub fn lock(&self) -> Result<Box<dyn Send>> {
        self.fs.lock(&self.dir, &backend::holder())
    }

    /// Where version V is laid out as a raw image for a job (a folder of
    /// the state folder: `restores`, `backups-boot`), made 0700.
    pub fn layout_path(&self, v: &Version, job: &str) -> Result<PathBuf> {
        Ok(self
            .layout_dir(job)?
            .join(format!("{}-{}.raw", self.name(), v.id)))
    }

    pub(super) fn name(&self) -> String {
        self.dir
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default()
    }

    pub(super) fn layout_dir(&self, job: &str) -> Result<PathBuf> {
        let dir = crate::paths::state_dir()?.join(job);
        crate::paths::private_dir(&dir)?;
        Ok(dir)
    }

    /// The name the block of content HASH is kept under (HASH itself in a
    /// plain store).
    pub fn block_name(&self, hash: &str) -> String {
        self.keys.block_name(hash)
    }

    pub fn block_path(&self, hash: &str) -> PathBuf {
        self.name_path(&self.block_name(hash))
    }

    fn name_path(&self, name: &str) -> PathBuf {
        let ext = if self.encrypted() { "age" } else { "zst" };
        self.dir
            .join("blocks")
            .join(name.get(..2).unwrap_or("__"))
            .join(format!("{name}.{ext}"))
    }

    pub fn has(&self, hash: &str) -> bool {
        self.fs.exists(&self.block_path(hash))
    }

    /// Keep a block: FRAME is its zstd frame, already checked to give
    /// content of this HASH. Returns the bytes the store grew by.
    pub fn put(&self, hash: &str, frame: &[u8]) -> Result<u64> {
        let p = self.block_path(hash);
        if self.fs.exists(&p) {
            return Ok(0);
        }
        let dir = p.parent().expect("in blocks/xx");
        // From the listing of blocks/ (kept, for a remote store).
        if !self.fs.exists(dir) {
            self.fs.make_dir(dir)?;
        }
        let sealed = self.keys.seal(frame)?;
        self.fs.write_atomic(&p, &sealed)?;
        Ok(sealed.len() as u64)
    }

    /// Block HASH's content into BUF (its length: the block's), checked
    /// against its name.
    pub fn get(&self, hash: &str, buf: &mut [u8]) -> Result<()> {
        let p = self.block_path(hash);
        let stored = self
            .fs
            .read(&p)
            .with_context(|| format!("cannot read {}", self.show(&p)))?;
        let frame = self.keys.open(&stored, Path::new(&self.show(&p)))?;
        let n = zstd::bulk::decompress_to_buffer(&frame, buf)
            .map_err(|e| anyhow!("{} does not decompress: {e}", self.show(&p)))?;
        if n != buf.len() || to_hex(&sha256(buf)) != hash {
            bail!(
                "{} does not hold the block it is named for (damaged)",
                self.show(&p)
            );
        }
        Ok(())
    }

    /// Temporary files left by a backup that was cut.
    pub fn clean_temporaries(&self) -> Result<()> {
        self.forget_boot_tmp();
        let blocks = self.dir.join("blocks");
        for sub in self.fs.list(&blocks)?.into_iter().filter(|e| e.is_dir) {
            let sub = blocks.join(&sub.name);
            if let Ok(files) = self.fs.list(&sub) {
                for f in files.into_iter().filter(|f| f.name.ends_with(".tmp")) {
                    self.fs.remove_file(&sub.join(&f.name)).ok();
                }
            }
        }
        Ok(())
    }

    /// Every version, oldest first.
    pub fn versions(&self) -> Result<Vec<Version>> {
        let mut out = Vec::new();
        let dir = self.dir.join("versions");
        for e in self.fs.list(&dir)? {
            let name = e.name;
            if !name.ends_with(&format!(".json{}", self.keys.suffix())) || name.starts_with('.') {
                continue;
            }
            out.push(self.load(&dir.join(name))?);
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    fn load(&self, p: &Path) -> Result<Version> {
        let shown = self.show(p);
        let stored = self
            .fs
            .read(p)
            .with_context(|| format!("cannot read {shown}"))?;
        let text = self.keys.open(&stored, Path::new(&shown))?;
        let v: Version = serde_json::from_slice(&text)
            .with_context(|| format!("{shown} is damaged (not a version)"))?;
        if v.format != VERSION_FORMAT {
            bail!(
                "{shown} is of format {}; this drydock reads {VERSION_FORMAT}",
                v.format
            );
        }
        Ok(v)
    }

    /// Version ID.
    pub fn version(&self, id: &str) -> Result<Version> {
        let p = self.version_path(id);
        if !self.has_version(id) {
            let ids: Vec<String> = self.versions()?.into_iter().map(|v| v.id).collect();
            return Err(usage!(
                "no version {id} in {}; its versions: {}",
                self.location(),
                if ids.is_empty() {
                    "none".to_string()
                } else {
                    ids.join(", ")
                }
            ));
        }
        self.load(&p)
    }

    /// Whether version ID is listed.
    pub fn has_version(&self, id: &str) -> bool {
        self.fs.exists(&self.version_path(id))
    }

    /// Version ID's file (which may not exist).
    pub fn version_path(&self, id: &str) -> PathBuf {
        self.dir
            .join("versions")
            .join(format!("{id}.json{}", self.keys.suffix()))
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
        while self.has_version(&id) {
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
        let p = self.version_path(&v.id);
        self.fs.write_atomic(
            &p,
            &self
                .keys
                .seal(serde_json::to_string_pretty(&v)?.as_bytes())?,
        )?;
        self.fs.sync_dir(&self.dir.join("versions"))?;
        Ok(v)
    }

    /// The store's bytes for each block of the store, by the name it is
    /// kept under ([`Store::block_name`]).
    pub fn block_sizes(&self) -> Result<BTreeMap<String, u64>> {
        let mut out = BTreeMap::new();
        let blocks = self.dir.join("blocks");
        let ext = if self.encrypted() { ".age" } else { ".zst" };
        for sub in self.fs.list(&blocks)?.into_iter().filter(|e| e.is_dir) {
            if let Ok(files) = self.fs.list(&blocks.join(&sub.name)) {
                for f in files {
                    if let Some(h) = f.name.strip_suffix(ext)
                        && h.len() == 64
                    {
                        out.insert(h.to_string(), f.len);
                    }
                }
            }
        }
        Ok(out)
    }

    /// The names version V's blocks are kept under.
    pub fn block_names(&self, v: &Version) -> BTreeSet<String> {
        v.block_hashes()
            .iter()
            .map(|h| self.block_name(h))
            .collect()
    }

    /// Remove the versions GONE, then every block that no version left
    /// names; with DRY_RUN nothing is removed. Returns the bytes freed
    /// (that would be).
    pub fn forget(&self, gone: &BTreeSet<String>, dry_run: bool) -> Result<u64> {
        let versions = self.versions()?;
        let wanted: BTreeSet<String> = versions
            .iter()
            .filter(|v| !gone.contains(&v.id))
            .flat_map(|v| self.block_names(v))
            .collect();
        if !dry_run {
            for v in versions.iter().filter(|v| gone.contains(&v.id)) {
                self.fs.remove_file(&self.version_path(&v.id))?;
                let _ = self.fs.remove_dir_all(&self.boot_dir(&v.id));
            }
            self.fs.sync_dir(&self.dir.join("versions"))?;
        }
        let mut freed = 0;
        for (name, len) in self.block_sizes()? {
            if !wanted.contains(&name) {
                if !dry_run {
                    self.fs.remove_file(&self.name_path(&name))?;
                }
                freed += len;
            }
        }
        Ok(freed)
    }
}

fn set_mode(p: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot set the mode of {}", p.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A new store that cannot be made leaves nothing: not the key file
    /// made for it (a key of no store, taken for the store's key later).
    #[test]
    fn a_store_that_cannot_be_made_keeps_no_key_made_for_it() {
        let t = tempfile::tempdir().unwrap();
        let file = t.path().join("a file");
        std::fs::write(&file, "mine").unwrap();
        let key = t.path().join("new.key");
        let e = Store::create(&file.join("store"), Some(&key))
            .err()
            .expect("refused");
        assert!(
            format!("{e:#}")
                .contains("could not be made; nothing of it was kept, nor the key file"),
            "{e:#}"
        );
        assert!(!key.exists());
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "mine");
    }
}
