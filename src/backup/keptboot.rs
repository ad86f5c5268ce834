//! The boot files kept with each version (`versions/ID.boot`): the
//! kernel, initrd and command line the host ran and its seal, encrypted
//! file by file in an encrypted store and decrypted into the state folder
//! when a boot needs them.

use std::path::PathBuf;

use anyhow::Result;

use super::store::Store;
use crate::util::write_atomic;

impl Store {
    /// `versions/ID.boot`: the kernel, initrd and command line the host
    /// ran when version ID was taken, and its seal (what `vm::boot` and a
    /// restore's sealed boot need to hold its services back).
    pub fn boot_dir(&self, id: &str) -> PathBuf {
        self.dir.join("versions").join(format!("{id}.boot"))
    }

    /// Where a backup records the boot files before its version has an
    /// id: in the store, or for an encrypted store in the state folder
    /// (0700), never in the clear beside its encrypted files.
    pub fn boot_tmp(&self) -> Result<PathBuf> {
        if !self.encrypted() {
            return Ok(self.dir.join("versions").join(".boot.tmp"));
        }
        Ok(self.layout_dir("backups-boot")?.join(format!(
            "{}-{}.boot.tmp",
            self.name(),
            // Two stores of one folder name (--store /a/vps, /b/vps)
            // back up at once without sharing it.
            &crate::image::manifest::to_hex(&crate::image::manifest::sha256(
                std::path::absolute(&self.dir)?
                    .as_os_str()
                    .as_encoded_bytes()
            ))[..12]
        )))
    }

    /// Move the boot files recorded in `boot_tmp` to version ID's folder
    /// (a kernel or initrd an older version held was linked there, not
    /// copied again: `bootfiles::fetch_reusing`), each file encrypted in
    /// an encrypted store.
    pub fn keep_boot(&self, id: &str) -> Result<Option<PathBuf>> {
        let tmp = self.boot_tmp()?;
        if !crate::remote::bootfiles::BootFiles::recorded_in(&tmp) {
            return Ok(None);
        }
        let dir = self.boot_dir(id);
        if !self.encrypted() {
            std::fs::rename(&tmp, &dir)?;
            return Ok(Some(dir));
        }
        let part = dir.with_extension("boot.tmp");
        let _ = std::fs::remove_dir_all(&part);
        std::fs::create_dir_all(&part)?;
        for f in std::fs::read_dir(&tmp)?.flatten() {
            let plain = std::fs::read(f.path())?;
            let name = format!("{}.age", f.file_name().to_string_lossy());
            write_atomic(&part.join(name), &self.keys.seal(&plain)?)?;
        }
        std::fs::rename(&part, &dir)?;
        std::fs::remove_dir_all(&tmp)?;
        Ok(Some(dir))
    }

    /// Whether version ID has its boot files.
    pub fn has_boot(&self, id: &str) -> bool {
        crate::remote::bootfiles::BootFiles::recorded_as(&self.boot_dir(id), self.keys.suffix())
    }

    /// Version ID's boot files in the clear, or None if it has none: its
    /// folder in a plain store; in an encrypted one, a copy decrypted into
    /// the state folder (0700), made again on each call.
    pub fn boot_files(&self, id: &str) -> Result<Option<PathBuf>> {
        let dir = self.boot_dir(id);
        if !dir.is_dir() {
            return Ok(None);
        }
        if !self.encrypted() {
            return Ok(Some(dir));
        }
        let out = self
            .layout_dir("backups-boot")?
            .join(format!("{}-{id}.boot", self.name()));
        let _ = std::fs::remove_dir_all(&out);
        crate::paths::private_dir(&out)?;
        for f in std::fs::read_dir(&dir)?.flatten() {
            let name = f.file_name().to_string_lossy().to_string();
            let Some(plain_name) = name.strip_suffix(".age") else {
                continue;
            };
            let plain = self.keys.open(&std::fs::read(f.path())?, &f.path())?;
            write_atomic(&out.join(plain_name), &plain)?;
        }
        Ok(Some(out))
    }
}
