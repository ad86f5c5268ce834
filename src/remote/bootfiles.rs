//! The kernel, initrd and command line the VPS is running, copied from it:
//! the sealed worker VM boots them directly (see `vm::seal` for why), and
//! `drydock boot` boots a pulled image the same way. Read before the
//! freeze, checked with SHA-256 on both ends, kept 0600 (an initrd can hold
//! keys).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::errors::refused;
use crate::ssh::{Session, shell_quote};
use crate::util::write_atomic;

/// Where the running kernel's files are, on Debian/Ubuntu, Fedora-like,
/// NixOS (the booted generation) and Alpine (by flavour) systems.
const FIND_SCRIPT: &str = r#"export LC_ALL=C
r=$(uname -r); f=${r##*-}
k=; for c in "/boot/vmlinuz-$r" "/boot/vmlinux-$r" "/boot/kernel-$r" /run/booted-system/kernel "/boot/vmlinuz-$f"; do [ -f "$c" ] && { k=$c; break; }; done
i=; for c in "/boot/initrd.img-$r" "/boot/initramfs-$r.img" "/boot/initrd-$r" /run/booted-system/initrd "/boot/initramfs-$f"; do [ -f "$c" ] && { i=$c; break; }; done
echo "release $r"
[ -n "$k" ] && echo "kernel $(sha256sum < "$k" | cut -d' ' -f1) $k"
[ -n "$i" ] && echo "initrd $(sha256sum < "$i" | cut -d' ' -f1) $i"
exit 0
"#;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootFiles {
    /// `uname -r` on the VPS.
    pub release: String,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    /// /proc/cmdline on the VPS.
    pub cmdline: String,
    /// Where they came from on the VPS, for messages.
    pub source: Vec<String>,
}

/// The record in a folder of boot files.
pub const RECORD: &str = "boot.json";

impl BootFiles {
    /// Whether DIR holds a record of boot files (`load` may still find it
    /// damaged).
    pub fn recorded_in(dir: &Path) -> bool {
        Self::recorded_as(dir, "")
    }

    /// The same, of files kept with SUFFIX (".age": encrypted).
    pub fn recorded_as(dir: &Path, suffix: &str) -> bool {
        dir.join(format!("{RECORD}{suffix}")).exists()
    }

    pub fn load(dir: &Path) -> Result<BootFiles> {
        let p = dir.join(RECORD);
        let text =
            std::fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))?;
        let mut b: BootFiles =
            serde_json::from_str(&text).with_context(|| format!("{} is damaged", p.display()))?;
        // The files are always beside boot.json: a folder that was moved
        // (a backup version's, recorded elsewhere first) still finds them.
        let beside = |f: &Path| f.file_name().map(|n| dir.join(n));
        if let Some(k) = beside(&b.kernel) {
            b.kernel = k;
        }
        b.initrd = b.initrd.as_deref().and_then(beside);
        Ok(b)
    }
}

async fn copy_one(s: &Session, remote: &str, sha: &str, local: &Path) -> Result<()> {
    let out = s.exec(&format!("cat {}", shell_quote(remote))).await?;
    if !out.success() {
        return Err(out.failure(&format!("reading {remote}"), &s.host()));
    }
    let got = hex::encode(Sha256::digest(&out.stdout));
    if got != sha {
        bail!(
            "{remote} from {} arrived damaged (SHA-256 {got}, the host says {sha}); run drydock again",
            s.host()
        );
    }
    write_atomic(local, &out.stdout)
}

async fn copy_or_reuse(
    s: &Session,
    remote: &str,
    sha: &str,
    local: &Path,
    reuse: Option<&Path>,
) -> Result<()> {
    if let Some(old) = reuse.and_then(|d| local.file_name().map(|n| d.join(n)))
        && std::fs::read(&old).is_ok_and(|b| hex::encode(Sha256::digest(&b)) == sha)
    {
        let _ = std::fs::remove_file(local);
        if std::fs::hard_link(&old, local).is_ok() {
            return Ok(());
        }
        std::fs::copy(&old, local)?;
        return Ok(());
    }
    copy_one(s, remote, sha, local).await
}

/// Copy the running kernel and initrd of the VPS into `dir` (made 0700),
/// with boot.json beside them. Refuses, changing nothing on the VPS, when
/// the running kernel's files are not on its disk.
pub async fn fetch(s: &Session, cmdline: &str, dir: &Path) -> Result<BootFiles> {
    fetch_reusing(s, cmdline, dir, None).await
}

/// `fetch`, taking a file from the folder REUSE (an older recording) when
/// it has the same SHA-256 as the host's, instead of copying it again
/// (a backup's versions mostly run the same kernel).
pub async fn fetch_reusing(
    s: &Session,
    cmdline: &str,
    dir: &Path,
    reuse: Option<&Path>,
) -> Result<BootFiles> {
    use std::os::unix::fs::DirBuilderExt;
    let text = s
        .run("finding the running kernel's files", FIND_SCRIPT)
        .await?;
    let field = |tag: &str| {
        text.lines().find_map(|l| {
            let rest = l.strip_prefix(tag)?.strip_prefix(' ')?;
            Some(rest.to_string())
        })
    };
    let release = field("release").unwrap_or_default();
    let split = |v: String| -> Option<(String, String)> {
        let (sha, path) = v.split_once(' ')?;
        Some((sha.to_string(), path.to_string()))
    };
    let Some((ksha, kpath)) = field("kernel").and_then(split) else {
        return Err(refused!(
            "the kernel {} is running but none of its files is on its disk (/boot/vmlinuz-{release} and the like): the worker VM boots the VPS's running kernel to hold its services back; reboot the VPS into an installed kernel first",
            s.host(),
        ));
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    let kernel = dir.join("vmlinuz");
    copy_or_reuse(s, &kpath, &ksha, &kernel, reuse).await?;
    let mut source = vec![kpath];
    let initrd = match field("initrd").and_then(split) {
        Some((isha, ipath)) => {
            let p = dir.join("initrd");
            copy_or_reuse(s, &ipath, &isha, &p, reuse).await?;
            source.push(ipath);
            Some(p)
        }
        None => None,
    };
    let b = BootFiles {
        release,
        kernel,
        initrd,
        cmdline: cmdline.trim().to_string(),
        source,
    };
    write_atomic(
        &dir.join(RECORD),
        serde_json::to_string_pretty(&b)?.as_bytes(),
    )?;
    Ok(b)
}
