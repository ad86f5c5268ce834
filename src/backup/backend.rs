//! Where a store's files live: a local folder, or a folder on another
//! machine reached over SFTP (`sftp.rs`). The store names its files by
//! their whole path (the local path, or the path on the store host) and
//! does every read, write, listing and removal through this, so one store
//! format serves both.

use std::fs::File;
use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};

/// One entry of a folder.
#[derive(Debug, Clone)]
pub struct Entry {
    pub name: String,
    pub len: u64,
    pub is_dir: bool,
}

/// The file operations a store needs. Errors name the file; `read`
/// keeps the kind (`NotFound`) for the callers that tell it apart.
pub trait Backend: Send + Sync {
    fn read(&self, p: &Path) -> std::io::Result<Vec<u8>>;
    /// P written whole or not at all: to a temporary name in its folder,
    /// synced, then renamed (P must not exist yet, or be a file).
    fn write_atomic(&self, p: &Path, data: &[u8]) -> Result<()>;
    fn exists(&self, p: &Path) -> bool;
    fn is_dir(&self, p: &Path) -> bool;
    /// The folder's entries; an error if it cannot be read (`NotFound`
    /// included).
    fn list(&self, dir: &Path) -> Result<Vec<Entry>>;
    /// The folder and its parents, each made 0700.
    fn make_dir(&self, dir: &Path) -> Result<()>;
    fn remove_file(&self, p: &Path) -> Result<()>;
    /// The folder and everything in it; no error if it is not there.
    fn remove_dir_all(&self, dir: &Path) -> Result<()>;
    fn rename(&self, from: &Path, to: &Path) -> Result<()>;
    /// The folder's entries made durable (a rename in it).
    fn sync_dir(&self, dir: &Path) -> Result<()>;
    /// P as the user would type it, for messages.
    fn show(&self, p: &Path) -> String;
    /// Take the store at ROOT for a change, one run at a time; HOLDER
    /// says who for the refusal another run sees. Held until the guard
    /// is dropped.
    fn lock(&self, root: &Path, holder: &str) -> Result<Box<dyn Send>>;
}

/// A folder on this machine.
pub struct Local;

impl Backend for Local {
    fn read(&self, p: &Path) -> std::io::Result<Vec<u8>> {
        std::fs::read(p)
    }

    fn write_atomic(&self, p: &Path, data: &[u8]) -> Result<()> {
        crate::util::write_atomic(p, data)
    }

    fn exists(&self, p: &Path) -> bool {
        p.exists()
    }

    fn is_dir(&self, p: &Path) -> bool {
        p.is_dir()
    }

    fn list(&self, dir: &Path) -> Result<Vec<Entry>> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))? {
            let e = e?;
            let m = e.metadata()?;
            out.push(Entry {
                name: e.file_name().to_string_lossy().to_string(),
                len: m.len(),
                is_dir: m.is_dir(),
            });
        }
        Ok(out)
    }

    fn make_dir(&self, dir: &Path) -> Result<()> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("cannot make {}", dir.display()))
    }

    fn remove_file(&self, p: &Path) -> Result<()> {
        std::fs::remove_file(p).with_context(|| format!("cannot remove {}", p.display()))
    }

    fn remove_dir_all(&self, dir: &Path) -> Result<()> {
        match std::fs::remove_dir_all(dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(e).with_context(|| format!("cannot remove {}", dir.display()))
            }
            _ => Ok(()),
        }
    }

    fn rename(&self, from: &Path, to: &Path) -> Result<()> {
        std::fs::rename(from, to)
            .with_context(|| format!("cannot rename {} to {}", from.display(), to.display()))
    }

    fn sync_dir(&self, dir: &Path) -> Result<()> {
        File::open(dir)?.sync_all()?;
        Ok(())
    }

    fn show(&self, p: &Path) -> String {
        p.display().to_string()
    }

    /// The kernel's lock (flock), so a run that crashed or was killed
    /// holds nothing; the file says who holds it, for the refusal.
    fn lock(&self, root: &Path, holder: &str) -> Result<Box<dyn Send>> {
        use std::io::{Read, Seek};
        let p = root.join("lock");
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&p)
            .with_context(|| format!("cannot open {}", p.display()))?;
        match f.try_lock() {
            Ok(()) => {
                f.set_len(0)?;
                f.rewind()?;
                f.write_all(holder.as_bytes())?;
                Ok(Box::new(f))
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = f.read_to_string(&mut holder);
                Err(in_use(&root.display().to_string(), &holder, "process"))
            }
            Err(std::fs::TryLockError::Error(e)) => {
                Err(anyhow::anyhow!("cannot lock {}: {e}", p.display()))
            }
        }
    }
}

/// The refusal of a store another run holds, naming HOLDER (as its lock
/// file says, control characters dropped). WITH says what the lock goes
/// with.
pub fn in_use(store: &str, holder: &str, with: &str) -> anyhow::Error {
    let holder: String = holder.trim().chars().filter(|c| !c.is_control()).collect();
    crate::errors::refused!(
        "{store} is in use by {}; wait for it to end (the lock goes with the {with} that holds \
         it). Nothing was changed",
        if holder.is_empty() {
            "another drydock (a backup or a forget)".to_string()
        } else {
            holder
        }
    )
}

/// Who takes a lock, for the refusal another run sees: this process, its
/// machine, its command line and the time.
pub fn holder() -> String {
    format!(
        "drydock (pid {}) on {}, `{}`, since {}\n",
        std::process::id(),
        this_host(),
        std::env::args().skip(1).collect::<Vec<_>>().join(" "),
        crate::util::now()
    )
}

pub fn this_host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap_or_default()
        .trim()
        .to_string()
}
