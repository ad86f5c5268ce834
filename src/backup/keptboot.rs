//! The boot files kept with each version (`versions/ID.boot`): the
//! kernel, initrd and command line the host ran and its seal, encrypted
//! file by file in an encrypted store and decrypted into the state folder
//! when a boot needs them; and their recording at a backup's start.

use std::path::PathBuf;

use anyhow::Result;

use super::store::Store;
use crate::remote::Facts;
use crate::ssh::Session;
use crate::ui::Ui;
use crate::util::write_atomic;

impl Store {
    /// `versions/ID.boot`: the kernel, initrd and command line the host
    /// ran when version ID was taken, and its seal (what `vm::boot` and a
    /// restore's sealed boot need to hold its services back).
    pub fn boot_dir(&self, id: &str) -> PathBuf {
        self.dir.join("versions").join(format!("{id}.boot"))
    }

    /// Where a backup records the boot files before its version has an
    /// id: always on this machine; in a plain local store, in the store;
    /// for an encrypted or a remote one in the state folder (0700), never
    /// in the clear beside its encrypted files.
    pub fn boot_tmp(&self) -> Result<PathBuf> {
        if !self.encrypted() && !self.remote() {
            return Ok(self.dir.join("versions").join(".boot.tmp"));
        }
        let place = if self.remote() {
            self.location()
        } else {
            std::path::absolute(&self.dir)?.display().to_string()
        };
        Ok(self.layout_dir("backups-boot")?.join(format!(
            "{}-{}.boot.tmp",
            self.name(),
            // Two stores of one folder name (--store /a/vps, /b/vps)
            // back up at once without sharing it.
            &crate::image::manifest::to_hex(&crate::image::manifest::sha256(place.as_bytes()))
                [..12]
        )))
    }

    /// The boot files recorded for a version not taken.
    pub fn forget_boot_tmp(&self) {
        if let Ok(t) = self.boot_tmp() {
            let _ = std::fs::remove_dir_all(t);
        }
    }

    /// Move the boot files recorded in `boot_tmp` to version ID's folder
    /// (a kernel or initrd an older version held was linked there, not
    /// copied again: `bootfiles::fetch_reusing`), each file encrypted in
    /// an encrypted store, sent in a remote one.
    pub fn keep_boot(&self, id: &str) -> Result<Option<PathBuf>> {
        let tmp = self.boot_tmp()?;
        if !crate::remote::bootfiles::BootFiles::recorded_in(&tmp) {
            return Ok(None);
        }
        let dir = self.boot_dir(id);
        if !self.encrypted() && !self.remote() {
            std::fs::rename(&tmp, &dir)?;
            return Ok(Some(dir));
        }
        let part = dir.with_extension("boot.tmp");
        self.fs.remove_dir_all(&part)?;
        self.fs.make_dir(&part)?;
        for f in std::fs::read_dir(&tmp)?.flatten() {
            let plain = std::fs::read(f.path())?;
            let name = format!("{}{}", f.file_name().to_string_lossy(), self.keys.suffix());
            self.fs
                .write_atomic(&part.join(name), &self.keys.seal(&plain)?)?;
        }
        self.fs.rename(&part, &dir)?;
        std::fs::remove_dir_all(&tmp)?;
        Ok(Some(dir))
    }

    /// Whether version ID has its boot files.
    pub fn has_boot(&self, id: &str) -> bool {
        let record = crate::remote::bootfiles::RECORD;
        self.fs.exists(
            &self
                .boot_dir(id)
                .join(format!("{record}{}", self.keys.suffix())),
        )
    }

    /// Version ID's boot files in the clear, or None if it has none: its
    /// folder in a plain local store; in an encrypted or a remote one, a
    /// copy (decrypted) in the state folder (0700), made again on each call.
    pub fn boot_files(&self, id: &str) -> Result<Option<PathBuf>> {
        let dir = self.boot_dir(id);
        if !self.fs.is_dir(&dir) {
            return Ok(None);
        }
        if !self.encrypted() && !self.remote() {
            return Ok(Some(dir));
        }
        let out = self
            .layout_dir("backups-boot")?
            .join(format!("{}-{id}.boot", self.name()));
        let _ = std::fs::remove_dir_all(&out);
        crate::paths::private_dir(&out)?;
        for f in self.fs.list(&dir)? {
            let Some(plain_name) = f.name.strip_suffix(self.keys.suffix()) else {
                continue;
            };
            let p = dir.join(&f.name);
            let stored = self
                .fs
                .read(&p)
                .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", self.show(&p)))?;
            let plain = self
                .keys
                .open(&stored, std::path::Path::new(&self.show(&p)))?;
            write_atomic(&out.join(plain_name), &plain)?;
        }
        Ok(Some(out))
    }
}

/// The running kernel and the seal (into the store's `boot_tmp`) and what
/// the host runs, before any freeze stops it: best effort, each said as a
/// note when it cannot be read (the version is whole without them).
pub(super) async fn record_boot_and_services(
    session: &Session,
    facts: &Facts,
    store: &Store,
    ui: &Ui,
) -> Result<Option<crate::services::ServiceSet>> {
    // The running kernel and the seal, before any freeze: best effort, the
    // version is whole without them.
    let older_boot = store
        .versions()?
        .last()
        .map(|v| store.boot_files(&v.id))
        .transpose()?
        .flatten();
    if let Err(e) =
        crate::vm::boot::record_in(session, facts, &store.boot_tmp()?, older_boot.as_deref()).await
    {
        store.forget_boot_tmp();
        ui.say(format!(
            "note: the kernel {} runs was not kept with the version ({e:#}): a boot of it \
             needs --services, and a restore cannot adapt it to a new host's network",
            session.host()
        ));
    }
    // The older version's boot files decrypted for the comparison: not
    // left in the clear.
    if (store.encrypted() || store.remote())
        && let Some(d) = &older_boot
    {
        let _ = std::fs::remove_dir_all(d);
    }
    let services = match crate::services::gather(session).await {
        Ok(s) => s,
        Err(e) => {
            ui.say(format!(
                "note: the services {} runs were not recorded with the version ({e:#}): a boot \
                 of it will not check them",
                session.host()
            ));
            None
        }
    };
    Ok(services)
}
