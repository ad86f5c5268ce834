//! Carrying the rehearsal over: the real upgrade without running the
//! upgrade again while the VPS is down.
//!
//! The rehearsal upgraded a live copy (LIVE) while the VPS served. After
//! the freeze, the pre-copy makes the base image the frozen disk (FROZEN)
//! and knows which blocks of 1 MiB changed between the two. When the VPS
//! changed only its own data in that time (uploads, a database, logs:
//! nothing under the package manager's paths, nothing the upgrade changed
//! too), the upgraded system is the rehearsal's result (REHEARSED) with
//! those changes carried into it. Running the upgrade again would give the
//! same system a release upgrade's time later.
//!
//! How: the worker VM boots REHEARSED sealed (the same first boot as an
//! upgrade's), LIVE and FROZEN are attached to it after boot through
//! throwaway overlays (attached at boot, their filesystems' UUIDs, the
//! same as REHEARSED's, would make its root ambiguous), and for each
//! partition with a changed block the helper (`drydock-helper --carry`,
//! `helper/src/carry.rs`) compares LIVE and FROZEN and makes REHEARSED's
//! filesystem hold FROZEN's version of every entry that differs. Then the
//! same verify boot through the VPS's own boot loader as after an upgrade.
//!
//! Refused, and the upgrade runs again on FROZEN as before, when any
//! change is outside what can be carried: a block outside the partitions
//! (boot loader), a partition not mounted in the upgraded system or of a
//! filesystem not handled (btrfs: three copies of one filesystem cannot be
//! mounted at once), or what the helper refuses. Nothing is kept of a
//! refused attempt; the reason is said and in the report.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::journal::{CarryOutcome as Outcome, Journal, Kept};
use crate::image::manifest::{BLOCK_SIZE, Manifest};
use crate::recipes::Plan;
use crate::ssh::{Session, shell_quote};
use crate::ui::{Ui, human_bytes};
use crate::vm::Vm;

/// Seconds taken off the VPS's clock at the live pull's start: a clock
/// stepped back a little by NTP in between does not hide a change.
pub const CLOCK_MARGIN: i64 = 300;

/// The worker VM's empty PCI Express root ports that the live and frozen
/// copies are attached to.
pub const PORTS: [&str; 2] = ["carry-port-live", "carry-port-frozen"];

/// What the carry boot needs.
pub struct Job {
    pub rehearsed: PathBuf,
    live: PathBuf,
    frozen: PathBuf,
    pub plan: Plan,
    since: i64,
    /// Byte ranges of the disk that changed since the live copy.
    changed: Vec<(u64, u64)>,
    outcome: std::sync::Mutex<Outcome>,
}

fn files(dir: &Path) -> [PathBuf; 3] {
    [
        super::rundir::rehearsed(dir),
        super::rundir::live(dir),
        Manifest::path_for(&super::rundir::live(dir)),
    ]
}

/// Remove what a rehearsal kept to be carried over.
pub fn discard(dir: &Path) {
    for p in files(dir)
        .into_iter()
        .chain(<[_; 2]>::from(super::rundir::carry_overlays(dir)))
    {
        let _ = std::fs::remove_file(p);
    }
}

/// At the rehearsal's end, the VPS still serving: keep its result and a
/// copy of the live image (the pre-copy will make the base the frozen
/// disk), when there is room for them. Says why not, otherwise. A copy
/// that fails leaves nothing kept and does not fail the rehearsal, which
/// passed: the upgrade then runs again while the VPS is frozen, as with
/// `--no-carry`.
pub(super) fn keep(dir: &Path, j: &mut Journal, plan: &Plan, ui: &Ui) -> Result<()> {
    discard(dir);
    let why_not = if j.no_carry {
        Some("--no-carry".to_string())
    } else if j.live_since.is_none() {
        Some("the VPS's clock at the live pull is not known".to_string())
    } else {
        copy_kept(dir).err().map(|e| format!("{e:#}"))
    };
    if let Some(why) = why_not {
        discard(dir);
        ui.say(format!(
            "the rehearsal's result is not kept ({why}): the upgrade will run again while the VPS is frozen"
        ));
        return Ok(());
    }
    j.carry = Some(Kept { plan: plan.clone() });
    j.save(dir)
}

/// `upgraded.raw` kept as `rehearsed.raw`, `base.raw` and its manifest
/// copied as the live copy's.
fn copy_kept(dir: &Path) -> Result<()> {
    let base = super::rundir::base(dir);
    let [rehearsed, live, live_manifest] = files(dir);
    let size = std::fs::metadata(&base)?.len();
    crate::transfer::check_local_space(&live, size.saturating_mul(2))?;
    std::fs::rename(super::rundir::upgraded(dir), &rehearsed)?;
    let _ = std::fs::remove_file(Manifest::path_for(&super::rundir::upgraded(dir)));
    let out = std::process::Command::new("cp")
        .arg("--sparse=always")
        .arg(&base)
        .arg(&live)
        .output()
        .context("cannot run cp")?;
    if !out.status.success() {
        bail!(
            "cannot copy {} to {}: {}",
            base.display(),
            live.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    std::fs::copy(Manifest::path_for(&base), &live_manifest)
        .with_context(|| format!("cannot copy the manifest to {}", live_manifest.display()))?;
    Ok(())
}

/// The blocks of 1 MiB that differ between two manifests of one disk, as
/// byte ranges (adjacent blocks joined).
pub fn changed_ranges(a: &Manifest, b: &Manifest) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    let n = a.blocks.len().max(b.blocks.len());
    for i in 0..n {
        if a.blocks.get(i) == b.blocks.get(i) {
            continue;
        }
        let start = i as u64 * BLOCK_SIZE;
        let end = (start + BLOCK_SIZE).min(a.size.max(b.size));
        match out.last_mut() {
            Some(last) if last.1 == start => last.1 = end,
            _ => out.push((start, end)),
        }
    }
    out
}

/// The real upgrade by carrying the rehearsal over, after the pre-copy.
/// `Ok(None)`: `upgraded.raw` is made; `Ok(Some(why))`: it cannot be, and
/// nothing is kept.
pub(super) async fn carry(dir: &Path, j: &mut Journal, ui: &Ui) -> Result<Option<String>> {
    let Some(kept) = j.carry.clone() else {
        return Ok(Some("no rehearsal was kept".into()));
    };
    let [rehearsed, live, live_manifest] = files(dir);
    if !rehearsed.exists() || !live.exists() {
        return Ok(Some(
            "the rehearsal's files are not in the run folder".into(),
        ));
    }
    let base = super::rundir::base(dir);
    let a = Manifest::load(&live_manifest)?;
    let b = Manifest::load(&Manifest::path_for(&base))?;
    if a.size != b.size {
        return Ok(Some(format!(
            "the disk's size changed since the live copy ({} to {})",
            a.size, b.size
        )));
    }
    let changed = changed_ranges(&a, &b);
    let blocks: u64 = changed
        .iter()
        .map(|(s, e)| (e - s).div_ceil(BLOCK_SIZE))
        .sum();
    if changed.is_empty() {
        // Nothing changed on the VPS since the live copy: the rehearsal's
        // result, verified by its own reboot, is the upgrade.
        ui.say(
            "nothing changed on the VPS since the live copy: the rehearsal's result is the upgrade",
        );
        std::fs::rename(&rehearsed, super::rundir::upgraded(dir))?;
        j.carried = Some(Outcome {
            carried: true,
            ..Outcome::default()
        });
        discard(dir);
        return Ok(None);
    }
    ui.say(format!(
        "carrying the rehearsal over: {} in {blocks} block(s) changed on the VPS since the live copy; \
         the worker VM boots the rehearsal's result and takes the VPS's changes into it",
        human_bytes(changed.iter().map(|(s, e)| e - s).sum())
    ));
    let (lo, fo) = super::rundir::carry_overlays(dir);
    for (img, o) in [(&live, &lo), (&base, &fo)] {
        let _ = std::fs::remove_file(o);
        crate::vm::image::create_overlay(img, o).await?;
    }
    let job = Job {
        rehearsed,
        live: lo,
        frozen: fo,
        plan: kept.plan,
        since: j.live_since.unwrap_or(0) - CLOCK_MARGIN,
        changed,
        outcome: std::sync::Mutex::new(Outcome {
            changed_blocks: blocks,
            ..Outcome::default()
        }),
    };
    let r = super::worker::in_worker(dir, j, ui, Some(&job)).await;
    let mut outcome = job.outcome.lock().unwrap().clone();
    let r = r.map(|r| match r {
        Ok(_) => {
            outcome.carried = true;
            None
        }
        Err(why) => {
            outcome.why_not = Some(why.clone());
            Some(why)
        }
    });
    j.carried = Some(outcome);
    r
}

/// A partition of the worker VM's disk, as the guest lists it.
#[derive(Debug, PartialEq)]
struct Part {
    number: u32,
    start: u64,
    end: u64,
    fstype: String,
    mountpoint: Option<String>,
}

/// The partitions holding the changed ranges; why not, when a range is
/// outside them all or in one that cannot be carried.
fn parts_to_carry<'a>(parts: &'a [Part], changed: &[(u64, u64)]) -> Result<Vec<&'a Part>, String> {
    let mut out: Vec<&Part> = Vec::new();
    for &(s, e) in changed {
        let mut covered = s;
        for p in parts.iter().filter(|p| p.start < e && s < p.end) {
            if p.start > covered {
                break;
            }
            covered = covered.max(p.end);
            if !out.iter().any(|q| q.number == p.number) {
                out.push(p);
            }
        }
        if covered < e {
            return Err(format!(
                "the disk changed outside its partitions since the live copy (bytes {s}..{e}: the partition table or the boot loader)"
            ));
        }
    }
    let mut keep = Vec::new();
    for p in out {
        match (p.fstype.as_str(), &p.mountpoint) {
            ("swap", _) => {}
            ("ext2" | "ext3" | "ext4" | "xfs", Some(_)) => keep.push(p),
            ("ext2" | "ext3" | "ext4" | "xfs", None) => {
                return Err(format!(
                    "partition {} ({}) changed since the live copy and is not mounted in the upgraded system",
                    p.number, p.fstype
                ));
            }
            ("btrfs", _) => {
                return Err(format!(
                    "partition {} (btrfs) changed since the live copy: the worker VM's kernel cannot mount the live, frozen and upgraded copies of one btrfs at once",
                    p.number
                ));
            }
            (t, _) => {
                return Err(format!(
                    "partition {} ({}) changed since the live copy, and drydock carries changes only on ext2/3/4 and XFS",
                    p.number,
                    if t.is_empty() { "no filesystem" } else { t }
                ));
            }
        }
    }
    Ok(keep)
}

fn parse_parts(text: &str) -> Result<Vec<Part>> {
    let mut out = Vec::new();
    for l in text.lines().filter_map(|l| l.strip_prefix("part ")) {
        let w: Vec<&str> = l.splitn(5, ' ').collect();
        let [n, start, size, fstype, mnt] = w[..] else {
            bail!("the worker VM listed a partition as {l:?}");
        };
        let (start, size): (u64, u64) = (start.parse()?, size.parse()?);
        out.push(Part {
            number: n.parse()?,
            start: start * 512,
            end: (start + size) * 512,
            fstype: if fstype == "-" {
                String::new()
            } else {
                fstype.into()
            },
            mountpoint: (mnt != "-").then(|| mnt.to_string()),
        });
    }
    out.sort_by_key(|p| p.start);
    Ok(out)
}

/// Finds the two attached copies by their serial numbers, and lists the
/// partitions of the system's own disk: "disks LIVE FROZEN", then
/// "part N START SIZE FSTYPE MOUNTPOINT" (sectors of 512 bytes; - for
/// none).
const LIST_SCRIPT: &str = r#"set -e
for i in $(seq 60); do
  [ -e /dev/disk/by-id/virtio-drydock-live ] && [ -e /dev/disk/by-id/virtio-drydock-frozen ] && break
  udevadm settle -t 5 2>/dev/null || sleep 1
done
l=$(basename "$(readlink -f /dev/disk/by-id/virtio-drydock-live)")
f=$(basename "$(readlink -f /dev/disk/by-id/virtio-drydock-frozen)")
[ -e "/sys/block/$l" ] && [ -e "/sys/block/$f" ] || { echo "the live and frozen copies did not appear in the worker VM"; exit 1; }
d=
for b in /sys/block/*; do
  n=$(basename "$b")
  case $n in "$l"|"$f"|loop*|ram*|sr*|zram*|dm-*|md*) continue ;; esac
  [ -e "$b/device" ] && { d=$n; break; }
done
[ -n "$d" ] || { echo "no disk of its own in the worker VM"; exit 1; }
echo "disks $l $f $d"
for p in /sys/block/$d/$d*; do
  [ -e "$p/partition" ] || continue
  n=$(cat "$p/partition")
  dev=/dev/$(basename "$p")
  t=$(blkid -o value -s TYPE "$dev" 2>/dev/null || true)
  m=$(findmnt -rno TARGET -S "$dev" 2>/dev/null | head -n 1 || true)
  echo "part $n $(cat "$p/start") $(cat "$p/size") ${t:--} ${m:--}"
done
"#;

impl super::worker::FirstBoot for Job {
    fn disk(&self) -> &Path {
        &self.rehearsed
    }
    fn ports(&self) -> &[&str] {
        &PORTS
    }
    fn plan(&self) -> &Plan {
        &self.plan
    }
    fn run<'a>(
        &'a self,
        s: &'a Session,
        vm: &'a mut Vm,
        log: &'a Path,
        ui: &'a Ui,
    ) -> super::worker::Refusable<'a> {
        Box::pin(in_guest(s, vm, self, log, ui))
    }
}

/// In the carry boot, once sealed: attach LIVE and FROZEN, list the
/// partitions, and carry each changed one. `Ok(Err(why))`: refused.
/// Over 80 lines: the carry's steps in the order the guest needs them
/// (hot-plug both copies, name their disks, copy the helper into a tmpfs,
/// move journald off /var, then per partition one mount-carry-unmount
/// script whose refusals, failure and counts are read back from its output);
/// split, that script would sit away from the disk names and helper path it
/// is written against.
pub(super) async fn in_guest(
    s: &Session,
    vm: &mut Vm,
    job: &Job,
    log: &Path,
    ui: &Ui,
) -> Result<std::result::Result<(), String>> {
    for ((id, path), port) in [("live", &job.live), ("frozen", &job.frozen)]
        .into_iter()
        .zip(PORTS)
    {
        vm.qmp
            .execute_raw(
                "blockdev-add",
                serde_json::json!({
                    "driver": "qcow2",
                    "node-name": format!("carry-{id}"),
                    "file": {"driver": "file", "filename": path.to_string_lossy()},
                }),
            )
            .await
            .with_context(|| format!("attaching the {id} copy to the worker VM"))?;
        vm.qmp
            .execute_raw(
                "device_add",
                serde_json::json!({
                    "driver": "virtio-blk-pci",
                    "drive": format!("carry-{id}"),
                    "id": format!("carry-{id}"),
                    "bus": port,
                    "serial": format!("drydock-{id}"),
                }),
            )
            .await
            .with_context(|| format!("attaching the {id} copy to the worker VM"))?;
    }
    let listed =
        super::worker::seal_step(s, "finding the live and frozen copies", LIST_SCRIPT).await?;
    let disks: Vec<&str> = listed
        .lines()
        .find_map(|l| l.strip_prefix("disks "))
        .map(|l| l.split(' ').collect())
        .unwrap_or_default();
    let [live_disk, frozen_disk, _own] = disks[..] else {
        bail!("the worker VM did not name its disks: {listed}");
    };
    let parts = parse_parts(&listed)?;
    let todo = match parts_to_carry(&parts, &job.changed) {
        Ok(t) => t,
        Err(why) => return Ok(Err(why)),
    };
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        s.exec_input(
            // A tmpfs of its own: /run is mounted noexec on newer systems.
            "mkdir -p /run/drydock-carry && mount -t tmpfs -o mode=700,size=64m drydock-carry /run/drydock-carry \
             && cat > /run/drydock-carry/helper && chmod 700 /run/drydock-carry/helper",
            Some(crate::transfer::helper::BINARY),
        ),
    )
    .await
    .map_err(|_| {
        anyhow::anyhow!("copying drydock's helper into the worker VM did not finish within 2 minutes")
    })??;
    if !out.success() {
        bail!(
            "cannot copy drydock's helper into the worker VM: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    // journald writes to /run from here, so that a journal file in
    // /var/log can be replaced under it.
    let _ = tokio::time::timeout(
        Duration::from_secs(60),
        s.exec("journalctl --relinquish-var >/dev/null 2>&1"),
    )
    .await;
    for p in todo {
        let mnt = p.mountpoint.clone().unwrap_or_default();
        let nouuid = if p.fstype == "xfs" { ",nouuid" } else { "" };
        let n = p.number;
        let script = format!(
            r#"set -e
c=/run/drydock-carry
part() {{ for q in /sys/block/$1/$1*; do [ "$(cat "$q/partition" 2>/dev/null)" = {n} ] && echo /dev/$(basename "$q") && return; done; }}
mkdir -p $c/l{n} $c/f{n} $c/t{n}
mount -o ro{nouuid} "$(part {live_disk})" $c/l{n}
mount -o ro{nouuid} "$(part {frozen_disk})" $c/f{n}
mount --bind {mnt_q} $c/t{n}
set +e
$c/helper --carry $c/l{n} $c/f{n} $c/t{n} {mnt_q} {since}
rc=$?
sync
umount $c/t{n} $c/l{n} $c/f{n}
exit $rc
"#,
            mnt_q = shell_quote(&mnt),
            since = job.since,
        );
        let t = Instant::now();
        let out = tokio::time::timeout(Duration::from_secs(1800), s.exec(&script))
            .await
            .map_err(|_| {
                anyhow::anyhow!(
                    "carrying partition {n} ({mnt}) did not finish within 30 minutes in the worker VM; nothing was pushed"
                )
            })??;
        let text = out.stdout_str();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        append_log(
            log,
            &format!("== carry: partition {n} ({mnt})\n{text}{stderr}"),
        )?;
        let refused: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("refused: "))
            .collect();
        if out.status == Some(3) && !refused.is_empty() {
            let more = if refused.len() > 3 {
                format!(" (and {} more, in {})", refused.len() - 3, log.display())
            } else {
                String::new()
            };
            return Ok(Err(format!(
                "{}{more}",
                refused[..refused.len().min(3)].join("; ")
            )));
        }
        if !out.success() || !text.lines().any(|l| l.starts_with("end ")) {
            bail!(
                "carrying partition {n} ({mnt}) failed in the worker VM: {}",
                text.lines()
                    .chain(stderr.lines())
                    .rfind(|l| l.starts_with("error") || !l.starts_with("carried"))
                    .unwrap_or("no word")
                    .trim()
            );
        }
        let mut o = job.outcome.lock().unwrap();
        let entries = text
            .lines()
            .filter(|l| l.starts_with("carried ") || l.starts_with("removed "))
            .count() as u64;
        o.entries += entries;
        o.vps_wins.extend(
            text.lines()
                .filter_map(|l| l.strip_prefix("vps-wins "))
                .map(str::to_string),
        );
        o.upgrade_wins.extend(
            text.lines()
                .filter_map(|l| l.strip_prefix("upgrade-wins "))
                .map(str::to_string),
        );
        ui.say(format!(
            "carried {entries} entr{} of {mnt} from the frozen disk into the upgraded one in {:.0} s",
            if entries == 1 { "y" } else { "ies" },
            t.elapsed().as_secs_f64()
        ));
    }
    Ok(Ok(()))
}

fn append_log(log: &Path, text: &str) -> Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(number: u32, start: u64, end: u64, fstype: &str, m: Option<&str>) -> Part {
        Part {
            number,
            start,
            end,
            fstype: fstype.into(),
            mountpoint: m.map(str::to_string),
        }
    }

    const MIB: u64 = 1 << 20;

    #[test]
    fn the_guests_partition_list_is_read_in_bytes() {
        let p = parse_parts(
            "disks vdb vdc vda\npart 1 2048 6289408 ext4 /\npart 2 6291456 1048576 swap -\n",
        )
        .unwrap();
        assert_eq!(
            p,
            vec![
                part(1, MIB, 3072 * MIB, "ext4", Some("/")),
                part(2, 3072 * MIB, 3584 * MIB, "swap", None),
            ]
        );
    }

    #[test]
    fn changes_are_carried_only_in_mounted_ext_or_xfs_partitions() {
        let parts = vec![
            part(1, MIB, 100 * MIB, "ext4", Some("/")),
            part(2, 100 * MIB, 200 * MIB, "xfs", Some("/var")),
            part(3, 200 * MIB, 300 * MIB, "swap", None),
            part(4, 300 * MIB, 400 * MIB, "btrfs", Some("/home")),
            part(5, 400 * MIB, 500 * MIB, "vfat", Some("/boot/efi")),
        ];
        let got = parts_to_carry(
            &parts,
            &[
                (MIB, 2 * MIB),
                (99 * MIB, 101 * MIB),
                (250 * MIB, 251 * MIB),
            ],
        )
        .unwrap();
        assert_eq!(got.iter().map(|p| p.number).collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(
            parts_to_carry(&parts, &[(0, MIB)]).unwrap_err(),
            "the disk changed outside its partitions since the live copy (bytes 0..1048576: the partition table or the boot loader)"
        );
        assert!(
            parts_to_carry(&parts, &[(300 * MIB, 301 * MIB)])
                .unwrap_err()
                .starts_with("partition 4 (btrfs) changed since the live copy")
        );
        assert_eq!(
            parts_to_carry(&parts, &[(400 * MIB, 401 * MIB)]).unwrap_err(),
            "partition 5 (vfat) changed since the live copy, and drydock carries changes only on ext2/3/4 and XFS"
        );
        let unmounted = vec![part(1, MIB, 100 * MIB, "ext4", None)];
        assert_eq!(
            parts_to_carry(&unmounted, &[(MIB, 2 * MIB)]).unwrap_err(),
            "partition 1 (ext4) changed since the live copy and is not mounted in the upgraded system"
        );
    }

    #[test]
    fn changed_blocks_are_joined_into_ranges() {
        let m = |b: &[&str]| Manifest {
            format: String::new(),
            size: b.len() as u64 * BLOCK_SIZE,
            block_size: BLOCK_SIZE,
            segment_blocks: 16,
            source: None,
            digest: String::new(),
            segments: vec![],
            blocks: b.iter().map(|s| s.to_string()).collect(),
        };
        let a = m(&["a", "b", "c", "d", "e"]);
        let b = m(&["a", "x", "y", "d", "z"]);
        assert_eq!(
            changed_ranges(&a, &b),
            vec![(MIB, 3 * MIB), (4 * MIB, 5 * MIB)]
        );
    }
}
