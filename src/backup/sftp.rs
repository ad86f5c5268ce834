//! A store on another machine: `--store ssh://[user@]host[:port]/PATH`
//! (or `sftp://`), its files read and written over SFTP.
//!
//! Why SFTP: it is what restic's and borg's users already give a backup
//! host (restic's `sftp:` backend), it needs nothing on that host but
//! sshd's SFTP subsystem (on in OpenSSH's stock config; Alpine ships it as
//! `openssh-sftp-server`), and its operations are the store's own: read a
//! file, write one, rename, list, remove. The host is reached through
//! drydock's SSH layer, as a VPS is: `~/.ssh/config` (Host, User, Port,
//! IdentityFile, ProxyJump), the agent and known_hosts. The protocol is
//! the `russh-sftp` crate's (a client over a russh channel), not our own.
//!
//! The store's code is synchronous (the backup's block sink, restore's
//! read-back): the SFTP session lives on a small runtime of its own, and
//! each operation waits for it, each with SFTP's own reply timeout.
//!
//! Every listing is read once and then kept up to date by this store's
//! own writes (one run holds the store at a time), so "does the store
//! have this block" costs no round trip per block.
//!
//! The lock is a folder (`lock.d`; SFTP's mkdir fails if it exists) with
//! the holder's line in it, rewritten every 30 s while held. A lock whose
//! holder is a process of this machine that is gone, or whose line has not
//! been rewritten for 3 minutes (by the store host's clock), is taken over
//! with a warning: a run killed or cut off does not leave it stuck.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use russh_sftp::client::SftpSession;
use russh_sftp::protocol::{FileAttributes, OpenFlags, StatusCode};
use tokio::io::AsyncWriteExt;

use super::backend::{Backend, Entry, in_use, this_host};
pub use super::storeurl::StoreUrl;
use crate::ssh::{ConnectOptions, HostSpec, Session, SshArgs, Target};

const BEAT: Duration = Duration::from_secs(30);
const STALE_SECS: u64 = 180;
/// SFTP's wait for each reply.
const REPLY_SECS: u64 = 60;

/// A folder on the store host, over SFTP.
pub struct Remote {
    url: StoreUrl,
    rt: Option<tokio::runtime::Runtime>,
    sftp: Arc<SftpSession>,
    _session: Arc<Session>,
    /// Folder listings read, and kept up to date by this store's writes.
    listings: Mutex<HashMap<PathBuf, BTreeMap<String, Entry>>>,
}

/// The SFTP error kept as an io::Error, with "no such file" as NotFound.
fn io_err(e: russh_sftp::client::error::Error) -> std::io::Error {
    use russh_sftp::client::error::Error as E;
    match &e {
        E::Status(s) if s.status_code == StatusCode::NoSuchFile => {
            std::io::Error::new(std::io::ErrorKind::NotFound, e)
        }
        _ => std::io::Error::other(e),
    }
}

impl Remote {
    /// Connect to the store host through the SSH layer (ARGS: the ssh
    /// config file to read, as -F; an unknown host key recorded with
    /// ACCEPT_NEW_HOST_KEY) and start its SFTP subsystem.
    pub fn connect(url: &StoreUrl, args: &SshArgs, accept_new_host_key: bool) -> Result<Remote> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("drydock-store")
            .enable_all()
            .build()
            .context("cannot start the store's SSH runtime")?;
        let target = match Target::resolve(&HostSpec::parse(&url.authority)?, args) {
            Ok(t) => t,
            Err(e) => {
                rt.shutdown_background();
                return Err(e);
            }
        };
        let host = url.authority.clone();
        let got = call(&rt, async move {
            let opts = ConnectOptions {
                identity: None,
                accept_new_host_key,
            };
            let session = Session::connect(&target, &opts).await?;
            let channel = session.open_subsystem("sftp").await.map_err(|e| {
                anyhow!(
                    "{e:#}: the store host's sshd offers no SFTP (in sshd_config: `Subsystem \
                     sftp internal-sftp`; on Alpine: apk add openssh-sftp-server)"
                )
            })?;
            let sftp = SftpSession::new(channel.into_stream())
                .await
                .map_err(|e| anyhow!("SFTP with {host} did not start: {e}"))?;
            sftp.set_timeout(REPLY_SECS);
            anyhow::Ok((session, sftp))
        });
        let got = match got {
            Ok(g) => g,
            Err(e) => {
                // Not a blocking drop: this may run inside the caller's runtime.
                rt.shutdown_background();
                return Err(e.context(format!("the store host {}", url.authority)));
            }
        };
        Ok(Remote {
            url: url.clone(),
            rt: Some(rt),
            sftp: Arc::new(got.1),
            _session: Arc::new(got.0),
            listings: Mutex::new(HashMap::new()),
        })
    }

    fn run<T: Send + 'static>(&self, f: impl Future<Output = T> + Send + 'static) -> T {
        call(self.rt.as_ref().expect("until dropped"), f)
    }

    fn s(p: &Path) -> String {
        p.to_string_lossy().to_string()
    }

    fn op<T: Send + 'static, F>(
        &self,
        f: impl FnOnce(Arc<SftpSession>) -> F,
    ) -> Result<T, russh_sftp::client::error::Error>
    where
        F: Future<Output = Result<T, russh_sftp::client::error::Error>> + Send + 'static,
    {
        self.run(f(self.sftp.clone()))
    }

    fn listing_of(&self, dir: &Path) -> Option<BTreeMap<String, Entry>> {
        self.listings
            .lock()
            .expect("not poisoned")
            .get(dir)
            .cloned()
    }

    /// Record in the kept listings that P is now ENTRY (or gone: None).
    fn note(&self, p: &Path, entry: Option<Entry>) {
        let (Some(dir), Some(name)) = (p.parent(), p.file_name()) else {
            return;
        };
        let name = name.to_string_lossy().to_string();
        let mut l = self.listings.lock().expect("not poisoned");
        if entry.is_none() {
            l.retain(|k, _| !k.starts_with(p));
        }
        if let Some(m) = l.get_mut(dir) {
            match entry {
                Some(mut e) => {
                    e.name = name.clone();
                    m.insert(name, e)
                }
                None => m.remove(&name),
            };
        }
    }

    fn write_file(&self, p: &Path, data: &[u8]) -> Result<()> {
        let (path, data) = (Self::s(p), data.to_vec());
        self.op(|s| async move {
            let mut attrs = FileAttributes::empty();
            attrs.permissions = Some(0o600);
            let mut f = s
                .open_with_flags_and_attributes(
                    path,
                    OpenFlags::CREATE | OpenFlags::TRUNCATE | OpenFlags::WRITE,
                    attrs,
                )
                .await?;
            f.write_all(&data).await?;
            f.sync_all().await?;
            f.shutdown().await?;
            Ok(())
        })
        .with_context(|| format!("cannot write {}", self.show(p)))
    }

    /// The store host's clock now, as the mtime of a file written there.
    fn host_now(&self, root: &Path) -> Result<u32> {
        let p = root.join(".clock");
        self.write_file(&p, b"")?;
        let path = Self::s(&p);
        let m = self.op(|s| async move { s.metadata(path).await })?;
        let path = Self::s(&p);
        let _ = self.op(|s| async move { s.remove_file(path).await });
        m.mtime
            .ok_or_else(|| anyhow!("the store host gives no file times"))
    }
}

/// F run on RT, waited for from any thread (an async caller's too: this
/// blocks it, as a local file's read would).
fn call<T: Send + 'static>(
    rt: &tokio::runtime::Runtime,
    f: impl Future<Output = T> + Send + 'static,
) -> T {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    rt.spawn(async move {
        let _ = tx.send(f.await);
    });
    rx.recv().expect("the store's SSH runtime ended")
}

impl Drop for Remote {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            let sftp = self.sftp.clone();
            call(&rt, async move {
                let _ = tokio::time::timeout(Duration::from_secs(5), sftp.close()).await;
            });
            // Not a blocking drop: this may run inside the caller's runtime.
            rt.shutdown_background();
        }
    }
}

impl Backend for Remote {
    fn read(&self, p: &Path) -> std::io::Result<Vec<u8>> {
        let path = Self::s(p);
        self.op(|s| async move { s.read(path).await })
            .map_err(io_err)
    }

    fn write_atomic(&self, p: &Path, data: &[u8]) -> Result<()> {
        let name = p.file_name().map(|n| n.to_string_lossy().to_string());
        let tmp = p.with_file_name(format!(".{}.tmp", name.unwrap_or_default()));
        self.write_file(&tmp, data)?;
        let (from, to) = (Self::s(&tmp), Self::s(p));
        // SFTP's rename does not replace: a file there goes first (only
        // when one is there: a rename refused for another reason, a cut
        // link, removes nothing).
        self.op(|s| async move {
            if let Err(e) = s.rename(from.clone(), to.clone()).await {
                if !s.try_exists(to.clone()).await? {
                    return Err(e);
                }
                s.remove_file(to.clone()).await?;
                s.rename(from, to).await?;
            }
            Ok(())
        })
        .with_context(|| format!("cannot write {}", self.show(p)))?;
        self.note(
            p,
            Some(Entry {
                name: String::new(),
                len: data.len() as u64,
                is_dir: false,
            }),
        );
        Ok(())
    }

    fn exists(&self, p: &Path) -> bool {
        let (Some(dir), Some(name)) = (p.parent(), p.file_name()) else {
            return false;
        };
        if self.listing_of(dir).is_none() {
            let _ = self.list(dir);
        }
        match self.listing_of(dir) {
            Some(l) => l.contains_key(&*name.to_string_lossy()),
            None => false,
        }
    }

    fn is_dir(&self, p: &Path) -> bool {
        let path = Self::s(p);
        self.op(|s| async move { s.metadata(path).await })
            .is_ok_and(|m| m.is_dir())
    }

    fn list(&self, dir: &Path) -> Result<Vec<Entry>> {
        if let Some(l) = self.listing_of(dir) {
            return Ok(l.into_values().collect());
        }
        let path = Self::s(dir);
        let got = self.op(|s| async move { s.read_dir(path).await });
        let entries: Vec<Entry> = match got {
            Ok(rd) => rd
                .filter(|e| e.file_name() != "." && e.file_name() != "..")
                .map(|e| {
                    let m = e.metadata();
                    Entry {
                        name: e.file_name(),
                        len: m.size.unwrap_or(0),
                        is_dir: m.is_dir(),
                    }
                })
                .collect(),
            Err(e) => {
                let e = io_err(e);
                if e.kind() == std::io::ErrorKind::NotFound {
                    // Kept too: a folder not there holds nothing yet.
                    self.listings
                        .lock()
                        .expect("not poisoned")
                        .insert(dir.to_path_buf(), BTreeMap::new());
                }
                return Err(e).with_context(|| format!("cannot read {}", self.show(dir)));
            }
        };
        self.listings.lock().expect("not poisoned").insert(
            dir.to_path_buf(),
            entries
                .iter()
                .map(|e| (e.name.clone(), e.clone()))
                .collect(),
        );
        Ok(entries)
    }

    fn make_dir(&self, dir: &Path) -> Result<()> {
        let mut todo = Vec::new();
        let mut d = Some(dir);
        while let Some(p) = d.filter(|p| !p.as_os_str().is_empty() && *p != Path::new("/")) {
            todo.push(p.to_path_buf());
            d = p.parent();
        }
        for p in todo.into_iter().rev() {
            let path = Self::s(&p);
            self.op(|s| async move {
                if s.try_exists(path.clone()).await? {
                    return Ok(());
                }
                let mut attrs = FileAttributes::empty();
                attrs.permissions = Some(0o700);
                s.create_dir(path.clone()).await?;
                s.set_metadata(path, attrs).await
            })
            .with_context(|| format!("cannot make {}", self.show(&p)))?;
            self.note(
                &p,
                Some(Entry {
                    name: String::new(),
                    len: 0,
                    is_dir: true,
                }),
            );
        }
        Ok(())
    }

    fn remove_file(&self, p: &Path) -> Result<()> {
        let path = Self::s(p);
        self.op(|s| async move { s.remove_file(path).await })
            .with_context(|| format!("cannot remove {}", self.show(p)))?;
        self.note(p, None);
        Ok(())
    }

    fn remove_dir_all(&self, dir: &Path) -> Result<()> {
        self.listings
            .lock()
            .expect("not poisoned")
            .retain(|k, _| !k.starts_with(dir));
        let entries = match self.list(dir) {
            Ok(e) => e,
            Err(e) if is_not_found(&e) => return Ok(()),
            Err(e) => return Err(e),
        };
        for e in entries {
            let p = dir.join(&e.name);
            if e.is_dir {
                self.remove_dir_all(&p)?;
            } else {
                self.remove_file(&p)?;
            }
        }
        let path = Self::s(dir);
        self.op(|s| async move { s.remove_dir(path).await })
            .with_context(|| format!("cannot remove {}", self.show(dir)))?;
        self.listings
            .lock()
            .expect("not poisoned")
            .retain(|k, _| !k.starts_with(dir));
        self.note(dir, None);
        Ok(())
    }

    fn rename(&self, from: &Path, to: &Path) -> Result<()> {
        let (f, t) = (Self::s(from), Self::s(to));
        self.op(|s| async move { s.rename(f, t).await })
            .with_context(|| format!("cannot rename {} to {}", self.show(from), self.show(to)))?;
        let was = self
            .listing_of(from.parent().unwrap_or(Path::new("")))
            .and_then(|l| {
                l.get(&*from.file_name().unwrap_or_default().to_string_lossy())
                    .cloned()
            });
        self.note(from, None);
        self.listings
            .lock()
            .expect("not poisoned")
            .retain(|k, _| !k.starts_with(from) && !k.starts_with(to));
        self.note(
            to,
            Some(was.unwrap_or(Entry {
                name: String::new(),
                len: 0,
                is_dir: false,
            })),
        );
        Ok(())
    }

    /// SFTP has no folder sync; each file was synced before its rename.
    fn sync_dir(&self, _dir: &Path) -> Result<()> {
        Ok(())
    }

    fn show(&self, p: &Path) -> String {
        self.url.show(p)
    }

    fn lock(&self, root: &Path, holder: &str) -> Result<Box<dyn Send>> {
        let d = root.join("lock.d");
        let file = d.join("holder");
        for attempt in 0..2 {
            let path = Self::s(&d);
            if self.op(|s| async move { s.create_dir(path).await }).is_ok() {
                self.write_file(&file, holder.as_bytes())?;
                return Ok(Box::new(self.beat(d, holder.to_string())));
            }
            let path = Self::s(&file);
            let line = self
                .op(|s| async move { s.read(path).await })
                .map(|b| String::from_utf8_lossy(&b).to_string())
                .unwrap_or_default();
            // The holder's last beat; a lock.d with no holder (a run cut
            // between its mkdir and its first write) ages from its mkdir.
            let (f, dd) = (Self::s(&file), Self::s(&d));
            let beat = self.op(|s| async move {
                match s.metadata(f).await {
                    Ok(m) => Ok(m),
                    Err(_) => s.metadata(dd).await,
                }
            });
            let age = match beat.ok().and_then(|m| m.mtime) {
                Some(t) => self.host_now(root)?.saturating_sub(t) as u64,
                None => 0,
            };
            let gone = gone_from_here(&line);
            if attempt == 0 && (gone || age > STALE_SECS) {
                tracing::warn!(
                    "{} was locked by {} {}; taking it over",
                    self.show(root),
                    line.trim(),
                    if gone {
                        "a process of this machine that has ended".to_string()
                    } else {
                        format!("whose last sign of life was {age} s ago")
                    }
                );
                let (f, dd) = (Self::s(&file), Self::s(&d));
                let _ = self.op(|s| async move {
                    let _ = s.remove_file(f).await;
                    s.remove_dir(dd).await
                });
                continue;
            }
            return Err(in_use(
                &self.show(root),
                &line,
                "run: a run killed on this machine frees it at once, and a lock whose holder \
                 gave no sign of life for 3 minutes is taken over",
            ));
        }
        Err(anyhow!("cannot lock {}", self.show(root)))
    }
}

impl Remote {
    /// The lock's heartbeat: HOLDER rewritten every 30 s until the guard
    /// goes, which then removes the lock.
    fn beat(&self, d: PathBuf, holder: String) -> RemoteLock {
        let sftp = self.sftp.clone();
        let file = Self::s(&d.join("holder"));
        let dir = Self::s(&d);
        let rt = self.rt.as_ref().expect("until dropped");
        let task = rt.spawn({
            let sftp = sftp.clone();
            let file = file.clone();
            async move {
                loop {
                    tokio::time::sleep(BEAT).await;
                    let _ = sftp.write(file.clone(), holder.as_bytes()).await;
                }
            }
        });
        RemoteLock {
            task,
            handle: rt.handle().clone(),
            sftp,
            file,
            dir,
        }
    }
}

struct RemoteLock {
    task: tokio::task::JoinHandle<()>,
    handle: tokio::runtime::Handle,
    sftp: Arc<SftpSession>,
    file: String,
    dir: String,
}

impl Drop for RemoteLock {
    fn drop(&mut self) {
        self.task.abort();
        let (sftp, file, dir) = (self.sftp.clone(), self.file.clone(), self.dir.clone());
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.handle.spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(10), async {
                let _ = sftp.remove_file(file).await;
                let _ = sftp.remove_dir(dir).await;
            })
            .await;
            let _ = tx.send(());
        });
        let _ = rx.recv_timeout(Duration::from_secs(15));
    }
}

/// Whether the holder's line names a process of this machine that has
/// ended (`drydock (pid N) on HOST, …`).
fn gone_from_here(line: &str) -> bool {
    let Some(rest) = line.trim().strip_prefix("drydock (pid ") else {
        return false;
    };
    let Some((pid, rest)) = rest.split_once(") on ") else {
        return false;
    };
    let host = rest.split(", ").next().unwrap_or_default();
    let Ok(pid) = pid.parse::<u32>() else {
        return false;
    };
    host == this_host() && !Path::new(&format!("/proc/{pid}")).exists()
}

fn is_not_found(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::NotFound)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_holder_gone_from_this_machine_is_told_apart() {
        let me = format!(
            "drydock (pid {}) on {}, `backup x`, since t\n",
            std::process::id(),
            this_host()
        );
        assert!(!gone_from_here(&me));
        let dead = format!(
            "drydock (pid 4000000) on {}, `backup x`, since t\n",
            this_host()
        );
        assert!(gone_from_here(&dead));
        let elsewhere = "drydock (pid 4000000) on another-machine-name, `backup x`, since t";
        assert!(!gone_from_here(elsewhere));
        assert!(!gone_from_here("garbage"));
    }
}
