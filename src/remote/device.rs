//! The disk a pull reads or a push writes: which one, how big, and whether
//! anything has it mounted read-write.

use anyhow::{Context, Result};

use super::facts::{Facts, Mount};
use crate::errors::refused;
use crate::ssh::{Session, shell_quote};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// A whole-disk block device, /dev/NAME.
    Block { name: String },
    /// A regular file standing in for a disk (tests, or a disk image on the host).
    File { loop_devices: Vec<String> },
}

#[derive(Debug, Clone)]
pub struct Device {
    pub path: String,
    pub kind: Kind,
    pub size: u64,
    /// Every mount whose filesystem is on this device.
    pub mounts: Vec<Mount>,
}

impl Device {
    pub fn is_block(&self) -> bool {
        matches!(self.kind, Kind::Block { .. })
    }

    pub fn rw_mounts(&self) -> Vec<&Mount> {
        self.mounts.iter().filter(|m| !m.read_only).collect()
    }

    /// "/ (ext4 from /dev/vda1), /boot (…)", for messages.
    pub fn describe_mounts(mounts: &[&Mount]) -> String {
        mounts
            .iter()
            .map(|m| format!("{} ({} from {})", m.mount_point, m.fstype, m.source))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Resolve `--device` (or the disk holding `/`) on the host.
pub async fn inspect(session: &Session, facts: &Facts, device: Option<&str>) -> Result<Device> {
    let path = path_of(facts, device)?;
    let out = session
        .run("inspecting the device", &inspect_script(&path))
        .await?;
    parse_inspection(&out, path, facts, session)
}

/// The path to inspect: `--device`, or the disk holding `/`.
pub fn path_of(facts: &Facts, device: Option<&str>) -> Result<String> {
    match device {
        Some(d) => Ok(d.to_string()),
        None => facts.root_disk(),
    }
}

/// The shell lines that look at `path` on the host: what it is, its real
/// path, a file's size and the loop devices backed by it. Reads nothing
/// from stdin (a caller may run it before a command that does) and ends
/// with status 0 whatever it finds.
pub fn inspect_script(path: &str) -> String {
    let q = shell_quote(path);
    format!(
        r#"export LC_ALL=C; d={q}
if [ -b "$d" ]; then echo block; readlink -f "$d"
elif [ -f "$d" ]; then echo file; readlink -f "$d"; wc -c < "$d"
  for b in /sys/class/block/loop*/loop/backing_file; do
    [ -e "$b" ] || continue
    if [ "$(cat "$b")" = "$(readlink -f "$d")" ]; then echo "loop ${{b#/sys/class/block/}}"; fi
  done
elif [ -e "$d" ]; then echo other
else echo missing
fi
exit 0"#
    )
}

/// Read what [`inspect_script`] printed.
pub fn parse_inspection(
    out: &str,
    path: String,
    facts: &Facts,
    session: &Session,
) -> Result<Device> {
    let dev = inspected(out, path, facts, session)?;
    if dev.size == 0 {
        return Err(refused!(
            "{} on {} is empty (0 bytes), not a disk; name the disk with \
             --device (`drydock probe {}` shows the one that holds /)",
            dev.path,
            session.host(),
            session.target.typed_arg()
        ));
    }
    Ok(dev)
}

fn inspected(out: &str, path: String, facts: &Facts, session: &Session) -> Result<Device> {
    let mut lines = out.lines();
    match lines.next() {
        Some("block") => {
            let real = lines.next().context("no path for the device")?.to_string();
            let name = real.trim_start_matches("/dev/").to_string();
            let b = facts.block_device(&name).with_context(|| {
                format!(
                    "{path} ({real}) is a block device the host does not list in /sys/class/block"
                )
            })?;
            if b.is_partition {
                let parent = b.parent.clone().unwrap_or_default();
                return Err(refused!(
                    "{path} is a partition of /dev/{parent}; drydock moves whole disks: use --device /dev/{parent}"
                ));
            }
            let mounts = facts.mounts_on_disk(&name).into_iter().cloned().collect();
            Ok(Device {
                path,
                kind: Kind::Block { name },
                size: b.size_bytes,
                mounts,
            })
        }
        Some("file") => {
            let _real = lines.next();
            let size: u64 = lines
                .next()
                .and_then(|l| l.trim().parse().ok())
                .context("the host did not say how big the file is")?;
            let loop_devices: Vec<String> = lines
                .filter_map(|l| l.strip_prefix("loop "))
                .map(|l| l.split('/').next().unwrap_or("").to_string())
                .collect();
            let mounts = loop_devices
                .iter()
                .flat_map(|l| facts.mounts_on_disk(l))
                .cloned()
                .collect();
            Ok(Device {
                path,
                kind: Kind::File { loop_devices },
                size,
                mounts,
            })
        }
        Some("other") => Err(refused!(
            "{path} on {} is neither a block device nor a regular file; name the disk with \
             --device (`drydock probe {}` shows the one that holds /)",
            session.host(),
            session.target.typed_arg()
        )),
        _ => Err(refused!(
            "{path} does not exist on {}; `drydock probe {}` lists the disks",
            session.host(),
            session.target.typed_arg()
        )),
    }
}

/// Drydock reads and writes raw disks: it must be root there.
pub fn require_root(facts: &Facts, session: &Session) -> Result<()> {
    if facts.uid != 0 {
        return Err(refused!(
            "drydock needs root on the host and {} is uid {}; connect as root@{}",
            session.host(),
            facts.uid,
            session
                .target
                .typed
                .rsplit_once('@')
                .map_or(session.target.typed.as_str(), |(_, host)| host)
        ));
    }
    Ok(())
}
