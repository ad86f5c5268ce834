//! The SSH tier: drydock against a real OpenSSH sshd on loopback, with
//! regular files standing in for the disk.

mod auth;
mod backups;
mod cli;
#[path = "../common/mod.rs"]
mod common;
mod dry_run;
mod faults;
mod freeze;
mod packages;
mod pull_push;
mod refusals;
mod remote_store;
mod resume;

use std::os::unix::fs::FileExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use sha2::{Digest, Sha256};

const MIB: u64 = 1 << 20;

const KIB: u64 = 1 << 10;

/// 70 MiB + 12345 bytes: two segments, a short last block, data, explicit
/// zero blocks and holes.
fn standard_disk(path: &std::path::Path) -> u64 {
    let size = 70 * MIB + 12345;
    make_disk(
        path,
        size,
        &[
            (0, 3 * MIB as usize + 100),
            (20 * MIB + 4096, 5 * MIB as usize),
            (size - 9000, 9000),
        ],
        &[(40 * MIB, 2 * MIB as usize)],
    );
    size
}

fn pull(sshd: &Sshd, dev: &std::path::Path, img: &std::path::Path) -> std::process::Output {
    pull_with(sshd, dev, img, &[])
}

fn pull_with(
    sshd: &Sshd,
    dev: &std::path::Path,
    img: &std::path::Path,
    extra: &[&str],
) -> std::process::Output {
    let mut c = pull_cmd(sshd, dev, img);
    c.arg("--json").args(extra);
    c.output().unwrap()
}

/// `drydock pull HOST --device DEV --output IMG -i KEY`, to add to.
fn pull_cmd(sshd: &Sshd, dev: &std::path::Path, img: &std::path::Path) -> Command {
    pull_cmd_to(sshd, &sshd.host(), dev, img)
}

/// [`pull_cmd`] with HOST for the sshd's (a relay in front of it).
fn pull_cmd_to(sshd: &Sshd, host: &str, dev: &std::path::Path, img: &std::path::Path) -> Command {
    sshd.drydock(&[
        "pull",
        host,
        "--device",
        dev.to_str().unwrap(),
        "--output",
        img.to_str().unwrap(),
    ])
}

/// The helper ran from a tmpfs of its own under /run, is gone afterwards,
/// and said its peak memory stayed within 16 MiB.
fn assert_helper_gone(j: &serde_json::Value, dir_key: &str) {
    assert_eq!(j["transfer"], "helper", "{j}");
    let dir = j[dir_key].as_str().unwrap();
    assert!(dir.starts_with("/run/drydock-helper."), "{dir}");
    assert!(!std::path::Path::new(dir).exists(), "{dir} left behind");
    assert!(
        !std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .contains(dir)
    );
    let rss = j["helper_peak_rss_kib"].as_u64().unwrap();
    assert!(rss > 0 && rss <= 16 * 1024, "helper peak RSS {rss} KiB");
}

/// The helpers running under this sshd: (pid, the folder they came from).
fn helpers_under(sshd: &Sshd) -> Vec<(u32, String)> {
    let parent = |pid: u32| -> Option<u32> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("PPid:"))
            .and_then(|v| v.trim().parse().ok())
    };
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmd
            .split(|&b| b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if !args[0].ends_with("/drydock-helper")
            || args.get(1).map(String::as_str) != Some("--remove")
        {
            continue;
        }
        let mut p = pid;
        while let Some(pp) = parent(p) {
            if pp == sshd.pid() {
                found.push((pid, args[2].clone()));
                break;
            }
            if pp <= 1 {
                break;
            }
            p = pp;
        }
    }
    found
}

fn push(
    sshd: &Sshd,
    img: &std::path::Path,
    dev: &std::path::Path,
    extra: &[&str],
) -> std::process::Output {
    let host = sshd.host();
    let mut args = vec![
        "push",
        img.to_str().unwrap(),
        &host,
        "--device",
        dev.to_str().unwrap(),
        "--json",
    ];
    args.extend_from_slice(extra);
    sshd.drydock(&args).output().unwrap()
}

fn round_trip(mode: &str) {
    let sshd = Sshd::start();
    let t = tempdir();
    let dev = t.path().join("disk");
    let img = t.path().join("image");
    let size = standard_disk(&dev);

    let o = pull_with(&sshd, &dev, &img, &["--transfer", mode]);
    assert_exit(&o, 0);
    let j = json(&o);
    assert_eq!(j["transfer"], mode);
    if mode == "helper" {
        assert_helper_gone(&j, "helper_dir");
        // Zero blocks are not sent: of the 70 MiB disk, the 8 MiB of
        // (incompressible) data and the zeros around it in its blocks,
        // compressed, crossed the wire.
        assert!(j["bytes_on_wire"].as_u64().unwrap() < 9 * MIB, "{j}");
    }
    assert_eq!(j["size"], size);
    assert_eq!(sha256_file(&img), sha256_file(&dev));
    // Sparse: about 8 MiB of data, not 70.
    assert!(
        allocated_bytes(&img) < 12 * MIB,
        "image allocates {} bytes",
        allocated_bytes(&img)
    );
    // The manifest's block hashes are the blocks' SHA-256.
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(t.path().join("image.manifest")).unwrap())
            .unwrap();
    let data = std::fs::read(&dev).unwrap();
    let blocks = m["blocks"].as_array().unwrap();
    assert_eq!(blocks.len() as u64, size.div_ceil(MIB));
    for (i, chunk) in data.chunks(MIB as usize).enumerate() {
        assert_eq!(blocks[i], hex::encode(Sha256::digest(chunk)), "block {i}");
    }
    assert_eq!(m["digest"], j["digest"]);
    // The image and its manifest (a server's disk, its secrets with it)
    // are the owner's only.
    for f in [&img, &t.path().join("image.manifest")] {
        assert_eq!(readable_by_others(f), Vec::<String>::new());
    }

    // Push it to a fresh, different disk with --full: dd mode writes every
    // block; the helper compares every block's pages with the host's and
    // writes those that differ, so it reports the blocks that differed.
    let other = t.path().join("other-disk");
    make_disk(&other, size, &[(0, size as usize)], &[]);
    let before = std::fs::read(&other).unwrap();
    let image = std::fs::read(&img).unwrap();
    let differing = before
        .chunks(MIB as usize)
        .zip(image.chunks(MIB as usize))
        .filter(|(a, b)| a != b)
        .count() as u64;
    let o = push(
        &sshd,
        &img,
        &other,
        &["--yes", "--full", "--transfer", mode],
    );
    assert_exit(&o, 0);
    let want = if mode == "helper" {
        differing
    } else {
        size.div_ceil(MIB)
    };
    assert_eq!(json(&o)["blocks_written"], want, "{mode}");
    assert_eq!(sha256_file(&other), sha256_file(&img));
}

fn delta_push(mode: &str) {
    let sshd = Sshd::start();
    let t = tempdir();
    let dev = t.path().join("disk");
    let img = t.path().join("image");
    let size = standard_disk(&dev);
    assert_exit(&pull(&sshd, &dev, &img), 0);

    // Change three blocks: one byte in block 5, blocks 30-31, and the short last block.
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    f.write_all_at(b"X", 5 * MIB + 17).unwrap();
    f.write_all_at(&pattern(99, 2 * MIB as usize), 30 * MIB)
        .unwrap();
    f.write_all_at(b"tail", size - 4).unwrap();
    drop(f);
    let before = std::fs::read(&dev).unwrap();
    let wanted = std::fs::read(&img).unwrap();
    let differing_pages: u64 = before
        .chunks(4096)
        .zip(wanted.chunks(4096))
        .filter(|(a, b)| a != b)
        .map(|(a, _)| a.len() as u64)
        .sum();

    let o = push(&sshd, &img, &dev, &["--yes", "--transfer", mode]);
    assert_exit(&o, 0);
    let j = json(&o);
    assert_eq!(j["blocks_written"], 4, "{j}");
    if mode == "dd" {
        // The writer ran from a tmpfs of its own, gone afterwards.
        assert_eq!(j["writer_own_tmpfs"], true, "{j}");
        let wdir = j["writer_dir"].as_str().unwrap();
        assert!(wdir.starts_with("/run/drydock-writer."), "{wdir}");
        assert!(!std::path::Path::new(wdir).exists(), "{wdir} left behind");
        assert!(
            !std::fs::read_to_string("/proc/self/mountinfo")
                .unwrap()
                .contains(wdir)
        );
        assert_eq!(j["ranges"], 3);
        assert_eq!(j["bytes_written"], 3 * MIB + (size % MIB));
    } else {
        assert_helper_gone(&j, "writer_dir");
        // Only the 4 KiB pages that differ were written.
        assert_eq!(j["bytes_written"], differing_pages, "{j}");
        // A range never crosses a block: 5, 30, 31 and 70.
        assert_eq!(j["ranges"], 4, "{j}");
    }
    assert_eq!(sha256_file(&dev), sha256_file(&img));
    // Count what changed on the disk: exactly those blocks.
    let after = std::fs::read(&dev).unwrap();
    let changed: Vec<usize> = before
        .chunks(MIB as usize)
        .zip(after.chunks(MIB as usize))
        .enumerate()
        .filter(|(_, (a, b))| a != b)
        .map(|(i, _)| i)
        .collect();
    assert_eq!(changed, vec![5, 30, 31, 70]);

    // Pushing again writes nothing: the manifest now describes the disk.
    let o = push(&sshd, &img, &dev, &["--yes", "--transfer", mode]);
    assert_exit(&o, 0);
    assert_eq!(json(&o)["bytes_written"], 0);
}

/// An ext4 filesystem in the disk file (all of it, or SIZE bytes at
/// OFFSET), on a loop device, mounted at DIR (read-only if asked): the
/// refusals a mounted disk must get, and disks with two filesystems.
struct Mounted {
    dir: std::path::PathBuf,
    loopdev: String,
    _tmp: Option<tempfile::TempDir>,
}

impl Mounted {
    /// The whole file, mounted read-write in a folder of its own; None
    /// where there are no loop devices.
    fn new(dev: &std::path::Path) -> Option<Mounted> {
        let tmp = tempdir();
        let size = std::fs::metadata(dev).unwrap().len();
        let mut m = Mounted::part(dev, 0, size, tmp.path(), false)?;
        m._tmp = Some(tmp);
        Some(m)
    }

    fn part(
        dev: &std::path::Path,
        offset: u64,
        size: u64,
        dir: &std::path::Path,
        ro: bool,
    ) -> Option<Mounted> {
        let out = Command::new("losetup")
            .args(["-f", "--show", "-o", &offset.to_string()])
            .args(["--sizelimit", &size.to_string()])
            .arg(dev)
            .output()
            .unwrap();
        if !out.status.success() {
            eprintln!(
                "no loop devices here: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            return None;
        }
        let loopdev = String::from_utf8_lossy(&out.stdout).trim().to_string();
        // Inode tables and journal zeroed now: with lazy init, the
        // kernel's ext4lazyinit thread zeroes them after the mount, in the
        // background, and a test comparing the disk's checksum sees it
        // change on its own (it did, twice).
        let ok = Command::new("mkfs.ext4")
            .args([
                "-q",
                "-F",
                "-E",
                "lazy_itable_init=0,lazy_journal_init=0",
                &loopdev,
            ])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "mkfs.ext4 on {loopdev} failed");
        std::fs::create_dir_all(dir).unwrap();
        let mut m = Command::new("mount");
        if ro {
            m.args(["-o", "ro"]);
        }
        let st = m.arg(&loopdev).arg(dir).status().unwrap();
        assert!(st.success(), "mount {loopdev} failed");
        Some(Mounted {
            dir: dir.to_path_buf(),
            loopdev,
            _tmp: None,
        })
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.dir).status();
        let _ = Command::new("losetup").args(["-d", &self.loopdev]).status();
    }
}

/// A pull run with -v that stopped before the helper ran: the folder it
/// was copied to (named in the log) is gone, and its tmpfs unmounted.
fn assert_helper_removed(sshd: &Sshd, o: &std::process::Output) {
    let e = stderr(o);
    let dir = e
        .lines()
        .find_map(|l| l.split("the helper is in ").nth(1))
        .and_then(|l| l.split(' ').next())
        .unwrap_or_else(|| panic!("no helper folder named in:\n{e}"));
    assert!(dir.starts_with("/run/drydock-helper."), "{dir}");
    assert_stderr(o, format!("removed {dir} on {}", sshd.host()));
    assert!(!std::path::Path::new(dir).exists(), "{dir} is still there");
    assert!(
        !std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .contains(dir)
    );
}

/// Start a pull in the background and return once `min` bytes of the image
/// are on disk.
fn pull_until(
    sshd: &Sshd,
    dev: &std::path::Path,
    img: &std::path::Path,
    min: u64,
    extra: &[&str],
) -> std::process::Child {
    let host = sshd.host();
    let mut args = vec![
        "pull",
        &host,
        "--device",
        dev.to_str().unwrap(),
        "--output",
        img.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let child = sshd
        .drydock(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !(img.exists() && allocated_bytes(img) >= min) {
        assert!(Instant::now() < deadline, "the pull did not get going");
        std::thread::sleep(Duration::from_millis(5));
    }
    child
}

fn big_disk(path: &std::path::Path) -> u64 {
    // 640 MiB of data: long enough to cut in the middle on a fast machine.
    let size = 640 * MIB + 512;
    let runs: Vec<(u64, usize)> = (0..10).map(|i| (i * 64 * MIB, 64 * MIB as usize)).collect();
    make_disk(path, size, &runs, &[]);
    size
}

/// A pull stopped by SIG (kill -SIG) keeps what it verified, says so and
/// how to go on (SAID names the signal), exits 130; the rerun resumes.
fn a_signal_leaves_a_resumable_pull(sig: &str, said: &str) {
    let sshd = Sshd::start();
    let t = tempdir();
    let dev = t.path().join("disk");
    let img = t.path().join("image");
    big_disk(&dev);

    // dd mode here; the cut connection above is helper mode.
    let child = pull_until(&sshd, &dev, &img, 150 * MIB, &["--transfer", "dd"]);
    let _ = Command::new("kill")
        .args([&format!("-{sig}"), &child.id().to_string()])
        .status();
    let o = child.wait_with_output().unwrap();
    assert_exit(&o, 130);
    let e = stderr(&o);
    assert!(
        e.contains(&format!("{said}: ")) && e.contains("run the same command to resume"),
        "{e}"
    );

    let o = pull_with(&sshd, &dev, &img, &["--transfer", "dd"]);
    assert_exit(&o, 0);
    assert!(json(&o)["resumed_at"].as_u64().unwrap() > 0);
    assert_eq!(sha256_file(&img), sha256_file(&dev));
}

/// CMD's output, or a failure naming WHAT if it runs over SECS (a hang).
fn output_within(mut cmd: Command, secs: u64, what: &str) -> std::process::Output {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output().unwrap());
    });
    match rx.recv_timeout(Duration::from_secs(secs)) {
        Ok(o) => o,
        Err(_) => {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            // What it had said before the kill, to show where it hung.
            let said = rx
                .recv_timeout(Duration::from_secs(10))
                .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
                .unwrap_or_default();
            panic!("{what}: still running after {secs} s (a hang); it had said: {said}");
        }
    }
}

/// A disk of SIZE bytes with data at its start, pulled to IMAGE, and then
/// DATA written into the image at byte AT: (the folder, disk, image).
fn pulled_then_changed(
    sshd: &Sshd,
    size: u64,
    data: &[u8],
    at: u64,
) -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
    let t = tempdir();
    let dev = t.path().join("disk");
    let img = t.path().join("image");
    make_disk(&dev, size, &[(0, MIB as usize)], &[]);
    assert_exit(&pull(sshd, &dev, &img), 0);
    write_at(&img, data, at);
    (t, dev, img)
}

/// DATA written into the file at PATH at byte AT.
fn write_at(path: &std::path::Path, data: &[u8], at: u64) {
    std::fs::File::options()
        .write(true)
        .open(path)
        .unwrap()
        .write_all_at(data, at)
        .unwrap();
}

/// `drydock push IMG HOST --device DEV --yes --transfer MODE`, HOST being a
/// relay in front of the sshd (its host key recorded on first use).
fn push_via(
    sshd: &Sshd,
    host: &str,
    img: &std::path::Path,
    dev: &std::path::Path,
    mode: &str,
) -> Command {
    sshd.drydock(&[
        "push",
        img.to_str().unwrap(),
        host,
        "--device",
        dev.to_str().unwrap(),
        "--yes",
        "--transfer",
        mode,
        "--accept-new-host-key",
    ])
}

/// Read-only for this process: its mount, or the filesystem under it (a
/// remount in the test sshd's mount namespace sets the latter).
fn mount_is_read_only(mount_point: &std::path::Path) -> bool {
    let mi = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let mp = mount_point.to_str().unwrap();
    mi.lines()
        .rfind(|l| l.split(' ').nth(4) == Some(mp))
        .map(|l| {
            let per_mount = l.split(' ').nth(5).unwrap();
            let super_opts = l.rsplit(' ').next().unwrap();
            per_mount
                .split(',')
                .chain(super_opts.split(','))
                .any(|o| o == "ro")
        })
        .expect("mounted")
}

/// The freeze records what it changed in this machine's /run/drydock-freeze
/// (this machine is every test's "host"): tests that freeze take turns.
fn freeze_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn thaw_cmd(sshd: &Sshd, dev: &std::path::Path) -> std::process::Output {
    sshd.drydock(&["thaw", &sshd.host(), "--device", dev.to_str().unwrap()])
        .output()
        .unwrap()
}

fn freeze_cmd(sshd: &Sshd, dev: &std::path::Path) -> std::process::Output {
    sshd.drydock(&[
        "freeze",
        &sshd.host(),
        "--device",
        dev.to_str().unwrap(),
        "--yes",
    ])
    .output()
    .unwrap()
}

/// `drydock upgrade HOST --to TO --dry-run --device DEV --cpus 2 EXTRA...`
/// with its state folder at `state` (which a dry run must not create).
fn dry_run(
    sshd: &Sshd,
    dev: &std::path::Path,
    state: &std::path::Path,
    to: &str,
    extra: &[&str],
) -> std::process::Output {
    let host = sshd.host();
    let mut args = vec![
        "upgrade",
        &host,
        "--to",
        to,
        "--dry-run",
        "--device",
        dev.to_str().unwrap(),
        "--cpus",
        "2",
    ];
    args.extend_from_slice(extra);
    sshd.drydock(&args)
        .env("XDG_STATE_HOME", state)
        .output()
        .unwrap()
}
