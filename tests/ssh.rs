//! The SSH tier: drydock against a real OpenSSH sshd on loopback, with
//! regular files standing in for the disk.

#[path = "ssh/backups.rs"]
mod backups;
mod common;
#[path = "ssh/faults.rs"]
mod faults;
#[path = "ssh/packages.rs"]
mod packages;

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

#[test]
fn probe_reports_what_the_host_runs() {
    let sshd = Sshd::start();
    let o = sshd
        .drydock(&["probe", &sshd.host(), "--json"])
        .output()
        .unwrap();
    assert_exit(&o, 0);
    let j = json(&o);
    let os_release = std::fs::read_to_string("/etc/os-release").unwrap();
    let id = os_release
        .lines()
        .find_map(|l| l.strip_prefix("ID="))
        .unwrap()
        .trim_matches('"');
    assert_eq!(j["os_id"], id);
    let mem = std::fs::read_to_string("/proc/meminfo").unwrap();
    let kb: u64 = mem
        .lines()
        .next()
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(j["memory_bytes"], kb * 1024);
    assert_eq!(j["arch"], std::env::consts::ARCH);
    let fw = if std::path::Path::new("/sys/firmware/efi").exists() {
        "uefi"
    } else {
        "bios"
    };
    assert_eq!(j["firmware"], fw);
    // The disk that holds / here, as the kernel says: the block device of
    // /'s major:minor, or its parent disk when that is a partition.
    let mi = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let root = mi
        .lines()
        .rfind(|l| l.split(' ').nth(4) == Some("/"))
        .unwrap();
    let majmin = root.split(' ').nth(2).unwrap();
    let sys = std::path::Path::new("/sys/dev/block").join(majmin);
    if sys.exists() {
        let real = std::fs::canonicalize(&sys).unwrap();
        let disk = if real.join("partition").exists() {
            real.parent().unwrap().to_path_buf()
        } else {
            real
        };
        let name = disk.file_name().unwrap().to_str().unwrap();
        assert_eq!(j["disk"]["device"], format!("/dev/{name}"), "{j}");
    } else {
        // / on no block device (overlayfs, a container): said, not guessed.
        assert!(
            j["disk_error"]
                .as_str()
                .unwrap()
                .contains("name it with --device"),
            "{j}"
        );
    }
    // And the human form names the release.
    let o = sshd.drydock(&["probe", &sshd.host()]).output().unwrap();
    assert_exit(&o, 0);
    assert!(stdout(&o).contains("os         "), "{}", stdout(&o));
}

#[test]
fn pull_then_push_round_trip_is_bit_exact_and_sparse_helper() {
    round_trip("helper");
}

#[test]
fn pull_then_push_round_trip_is_bit_exact_and_sparse_dd() {
    round_trip("dd");
}

/// The helper crosses the link gzip'd; a host where gzip does not run is
/// sent it as it is, and the pull and the push still run in helper mode
/// (not dd mode, as `auto` falls back to when the helper cannot start).
#[test]
fn a_host_without_gzip_is_sent_the_helper_unpacked() {
    // /bin/gzip too where /bin is not /usr/bin (a system without merged /usr).
    let mut gzips = vec!["/usr/bin/gzip"];
    if std::fs::symlink_metadata("/bin").is_ok_and(|m| m.is_dir())
        && std::path::Path::new("/bin/gzip").exists()
    {
        gzips.push("/bin/gzip");
    }
    let sshd = Sshd::start_without(&gzips);
    // The setup holds: gzip does not run in the host's sessions.
    let o = Command::new("ssh")
        .args([
            "-i",
            sshd.client_key.to_str().unwrap(),
            "-p",
            &sshd.port.to_string(),
        ])
        .args(["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no"])
        .args(["-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR"])
        .args(["root@127.0.0.1", "printf '' | gzip -c"])
        .output()
        .unwrap();
    assert!(!o.status.success(), "gzip runs on the host: {o:?}");
    let t = tempdir();
    let dev = t.path().join("disk");
    let img = t.path().join("image");
    standard_disk(&dev);
    let o = pull(&sshd, &dev, &img);
    assert_exit(&o, 0);
    let j = json(&o);
    assert_helper_gone(&j, "helper_dir");
    assert_eq!(sha256_file(&img), sha256_file(&dev));
    write_at(&img, &pattern(5, 64 * KIB as usize), 20 * MIB);
    let o = push(&sshd, &img, &dev, &["--yes"]);
    assert_exit(&o, 0);
    assert_helper_gone(&json(&o), "writer_dir");
    assert_eq!(sha256_file(&img), sha256_file(&dev));
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

/// `pull --update`: an image pulled earlier brought up to date. The helper
/// hashes the whole disk on the host; only the changed blocks are sent,
/// and the image and its manifest end exactly as a fresh pull's would.
#[test]
fn pull_update_sends_only_the_blocks_that_changed_and_ends_exact() {
    let sshd = Sshd::start();
    let t = tempdir();
    let dev = t.path().join("disk");
    let img = t.path().join("image");
    let size = standard_disk(&dev);
    let o = pull(&sshd, &dev, &img);
    assert_exit(&o, 0);
    let full = json(&o)["bytes_on_wire"].as_u64().unwrap();

    // Four blocks change: data in a block of data (1), a hole filled (30),
    // a block of data zeroed (21), the short last block.
    {
        let f = std::fs::File::options().write(true).open(&dev).unwrap();
        f.write_all_at(&pattern(7, 4096), MIB + 8192).unwrap();
        f.write_all_at(&pattern(8, 300 * KIB as usize), 30 * MIB)
            .unwrap();
        f.write_all_at(&vec![0u8; MIB as usize], 21 * MIB).unwrap();
        f.write_all_at(b"new tail", size - 8).unwrap();
    }
    let o = pull_with(&sshd, &dev, &img, &["--update"]);
    assert_exit(&o, 0);
    let j = json(&o);
    eprintln!("{}", stderr(&o));
    assert_stderr(&o, "pre-copy: 4 of 71 blocks of ");
    let sent = j["bytes_on_wire"].as_u64().unwrap();
    eprintln!("full pull: {full} bytes on the wire; update of 4 blocks: {sent}");
    assert!(sent < MIB + 300 * KIB + 64 * KIB, "{j}");
    assert_eq!(sha256_file(&img), sha256_file(&dev));
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(t.path().join("image.manifest")).unwrap())
            .unwrap();
    let data = std::fs::read(&dev).unwrap();
    for (i, chunk) in data.chunks(MIB as usize).enumerate() {
        assert_eq!(
            m["blocks"][i],
            hex::encode(Sha256::digest(chunk)),
            "block {i}"
        );
    }
    assert_eq!(m["digest"], j["digest"]);
    assert!(!t.path().join("image.precopy").exists());
    // The same digest as a fresh pull of the disk.
    let fresh = t.path().join("fresh");
    let o = pull(&sshd, &dev, &fresh);
    assert_exit(&o, 0);
    assert_eq!(json(&o)["digest"], j["digest"]);
    assert_helper_gone(&j, "helper_dir");

    // Nothing changed: nothing sent but the hashes' requests' answers.
    let o = pull_with(&sshd, &dev, &img, &["--update"]);
    assert_exit(&o, 0);
    assert_stderr(&o, "pre-copy: 0 of 71 blocks of ");
    assert_eq!(sha256_file(&img), sha256_file(&dev));
}

/// `pull --update` refuses what it cannot bring up to date, each before
/// connecting or before anything is written.
#[test]
fn pull_update_refuses_an_image_it_cannot_update() {
    let sshd = Sshd::start();
    let t = tempdir();
    let dev = t.path().join("disk");
    standard_disk(&dev);
    let img = t.path().join("image");

    let o = pull_with(&sshd, &dev, &img, &["--update"]);
    assert_exit(&o, 2);
    assert_stderr(
        &o,
        format!(
            "--update: {} is not a finished pull (no image with its manifest beside it); pull \
             without --update first",
            img.display()
        ),
    );
    assert!(!img.exists());

    assert_exit(&pull(&sshd, &dev, &img), 0);
    let before = sha256_file(&img);
    let o = pull_with(&sshd, &dev, &img, &["--update", "--transfer", "dd"]);
    assert_exit(&o, 2);
    assert_stderr(
        &o,
        "--update needs drydock's helper on the host, and --transfer dd was asked for: drop one \
         of the two",
    );

    // A copy of another disk.
    let other = t.path().join("other disk");
    standard_disk(&other);
    let o = pull_with(&sshd, &other, &img, &["--update"]);
    assert_exit(&o, 3);
    assert_stderr(
        &o,
        format!(
            "{} is a copy of {}:{}, not of {}:{}; drydock will not mix two disks",
            img.display(),
            sshd.host(),
            dev.display(),
            sshd.host(),
            other.display()
        ),
    );
    assert_eq!(sha256_file(&img), before);

    // The disk grew since the pull.
    let size = std::fs::metadata(&dev).unwrap().len();
    std::fs::File::options()
        .write(true)
        .open(&dev)
        .unwrap()
        .set_len(size + MIB)
        .unwrap();
    let o = pull_with(&sshd, &dev, &img, &["--update"]);
    assert_exit(&o, 3);
    assert_stderr(
        &o,
        format!(
            "--update: {} on {} is {} bytes and the copy {} was {size}: the disk changed size \
             since the copy was made; nothing was changed. Pull the whole disk into another \
             --output",
            dev.display(),
            sshd.host(),
            size + MIB,
            img.display()
        ),
    );
    assert_eq!(sha256_file(&img), before);
    assert!(!t.path().join("image.precopy").exists());
}

#[test]
fn delta_push_writes_only_the_changed_blocks_dd() {
    delta_push("dd");
}

#[test]
fn delta_push_writes_only_the_changed_pages_helper() {
    delta_push("helper");
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

#[test]
fn push_needs_confirmation_without_a_terminal() {
    let sshd = Sshd::start();
    let t = tempdir();
    let dev = t.path().join("disk");
    let img = t.path().join("image");
    standard_disk(&dev);
    assert_exit(&pull(&sshd, &dev, &img), 0);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .write_all_at(b"Y", 10)
        .unwrap();
    let before = sha256_file(&dev);
    let o = push(&sshd, &img, &dev, &[]);
    assert_exit(&o, 3);
    assert!(
        stderr(&o).contains("this needs confirmation (Write 4.00 KiB (1 ranges of 4 KiB pages) of")
            && stderr(&o).contains("nothing was changed: run again with --yes to go ahead"),
        "{}",
        stderr(&o)
    );
    assert_eq!(sha256_file(&dev), before);
}

#[test]
fn push_refuses_a_disk_that_changed_since_the_pull() {
    let sshd = Sshd::start();
    let t = tempdir();
    let dev = t.path().join("disk");
    let img = t.path().join("image");
    standard_disk(&dev);
    assert_exit(&pull(&sshd, &dev, &img), 0);
    // The host wrote to its disk after the pull; the image changed too.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&dev)
        .unwrap()
        .write_all_at(b"host wrote", 50 * MIB)
        .unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .write_all_at(b"upgrade", 2 * MIB)
        .unwrap();
    let before = sha256_file(&dev);
    for (mode, what) in [
        (
            "dd",
            format!(
                "1 block(s) of 1 MiB differ from both the manifest and the image (the first at byte {})",
                50 * MIB
            ),
        ),
        (
            "helper",
            format!(
                "block 50 (byte {}) differs from both the manifest and the image. Writing would mix two versions of the disk; nothing was written",
                50 * MIB
            ),
        ),
    ] {
        let o = push(&sshd, &img, &dev, &["--yes", "--transfer", mode]);
        assert_exit(&o, 3);
        assert_stderr(
            &o,
            format!(
                "{} on {} no longer holds what was pulled: {what}",
                dev.display(),
                sshd.host(),
            ),
        );
        assert_eq!(
            sha256_file(&dev),
            before,
            "a refused push wrote to the disk ({mode})"
        );
    }
}

#[test]
fn push_refuses_an_image_larger_than_the_disk() {
    let sshd = Sshd::start();
    let t = tempdir();
    let dev = t.path().join("disk");
    let img = t.path().join("image");
    make_disk(&dev, 8 * MIB, &[(0, MIB as usize)], &[]);
    make_disk(&img, 9 * MIB, &[(0, 2 * MIB as usize)], &[]);
    let before = sha256_file(&dev);
    let o = push(&sshd, &img, &dev, &["--yes", "--full"]);
    assert_exit(&o, 3);
    assert_stderr(
        &o,
        format!(
            "the image {} (9.00 MiB) is larger than {} on {} (8.00 MiB); it would not fit",
            img.display(),
            dev.display(),
            sshd.host()
        ),
    );
    assert_eq!(sha256_file(&dev), before);
}

/// An image whose size is not its manifest's (shrunk after the pull) is
/// refused the same way in both modes, before anything is written or any
/// helper is left on the host.
#[test]
fn push_refuses_an_image_that_is_not_its_manifests_size() {
    let sshd = Sshd::start();
    let t = tempdir();
    let dev = t.path().join("disk");
    let img = t.path().join("image");
    make_disk(&dev, 8 * MIB, &[(0, MIB as usize)], &[]);
    assert_exit(&pull(&sshd, &dev, &img), 0);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(7 * MIB)
        .unwrap();
    let before = sha256_file(&dev);
    for mode in ["dd", "helper"] {
        let o = push(&sshd, &img, &dev, &["--yes", "--transfer", mode]);
        assert_exit(&o, 3);
        assert_stderr(
            &o,
            format!(
                "the image is {} bytes and its manifest says {}: the manifest is not this image's; \
                 push with --full to write every block without the check",
                7 * MIB,
                8 * MIB
            ),
        );
        assert_eq!(sha256_file(&dev), before, "{mode}");
        assert!(helpers_under(&sshd).is_empty(), "{mode}: a helper is left");
    }
}

/// A manifest is checked whole before a push trusts it: one whose segment
/// hashes do not give its digest (damaged, or edited) is refused in both
/// modes, and nothing is written.
#[test]
fn push_refuses_a_manifest_whose_digest_does_not_match_its_segments() {
    let sshd = Sshd::start();
    let (t, dev, img) = pulled_then_changed(&sshd, 40 * MIB, b"changed", 17 * MIB);
    let mpath = t.path().join("image.manifest");
    let mut m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&mpath).unwrap()).unwrap();
    // The second segment's hash, claimed to be the first's.
    m["segments"][1] = m["segments"][0].clone();
    std::fs::write(&mpath, serde_json::to_string(&m).unwrap()).unwrap();
    let before = sha256_file(&dev);
    for mode in ["dd", "helper"] {
        let o = push(&sshd, &img, &dev, &["--yes", "--transfer", mode]);
        assert_exit(&o, 3);
        assert_stderr(
            &o,
            format!(
                "{} is damaged: its segment hashes do not give its digest; pull the disk again, \
                 or push with --full to write every block without the check",
                mpath.display()
            ),
        );
        assert_eq!(sha256_file(&dev), before, "{mode}");
        assert!(helpers_under(&sshd).is_empty(), "{mode}: a helper is left");
    }
}

/// A manifest whose block hashes were changed (its segments and digest
/// intact) cannot make a push skip a block: block 5 of the image changed,
/// and the manifest claims the pulled block 5 was already the new one,
/// alone in its segment and beside a changed block 6. Both are refused
/// before anything is written (dd mode wrote nothing, or only block 6, and
/// said "read back and verified" with block 5 still the old one).
#[test]
fn push_refuses_a_manifest_whose_block_hashes_were_altered() {
    let sshd = Sshd::start();
    for (case, also_block_6) in [("alone", false), ("beside a changed block", true)] {
        let (t, dev, img) =
            pulled_then_changed(&sshd, 40 * MIB, &pattern(5, MIB as usize), 5 * MIB);
        if also_block_6 {
            write_at(&img, &pattern(6, MIB as usize), 6 * MIB);
        }
        let mpath = t.path().join("image.manifest");
        let mut m: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&mpath).unwrap()).unwrap();
        m["blocks"][5] = hex::encode(Sha256::digest(pattern(5, MIB as usize))).into();
        std::fs::write(&mpath, serde_json::to_string(&m).unwrap()).unwrap();
        let before = sha256_file(&dev);
        for mode in ["dd", "helper"] {
            let what = format!("{case}, {mode}");
            let o = push(&sshd, &img, &dev, &["--yes", "--transfer", mode]);
            assert_exit(&o, 3);
            assert_eq!(sha256_file(&dev), before, "{what}: the disk changed");
            assert!(helpers_under(&sshd).is_empty(), "{what}: a helper is left");
            if mode == "dd" {
                assert_stderr(
                    &o,
                    format!(
                        "{} is damaged: it says block 5 (byte 5242880) is the same in the image \
                         as on the disk, but {} on {} holds other data there. Nothing was \
                         written; pull the disk again, or push with --full to write every block \
                         without the check",
                        mpath.display(),
                        dev.display(),
                        sshd.host()
                    ),
                );
            } else {
                assert_stderr(
                    &o,
                    "block 5 (byte 5242880) differs from both the manifest and the image",
                );
            }
        }
    }
}

#[test]
fn push_without_manifest_is_refused_unless_full() {
    let sshd = Sshd::start();
    let t = tempdir();
    let dev = t.path().join("disk");
    let img = t.path().join("image");
    make_disk(&dev, 8 * MIB, &[(0, MIB as usize)], &[]);
    make_disk(&img, 8 * MIB, &[(MIB, MIB as usize)], &[]);
    let o = push(&sshd, &img, &dev, &["--yes"]);
    assert_exit(&o, 3);
    assert_stderr(&o, "has no manifest");
    assert_stderr(&o, "push with --full to overwrite the whole disk");
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

#[test]
fn a_disk_mounted_read_write_is_refused() {
    let sshd = Sshd::start();
    let t = tempdir();
    let dev = t.path().join("disk");
    let img = t.path().join("image");
    make_disk(&dev, 64 * MIB, &[], &[]);
    let Some(m) = Mounted::new(&dev) else {
        panic!(
            "this test needs loop devices (losetup -f); the SSH tier runs as root on a machine with them"
        );
    };
    std::fs::write(m.dir.as_path().join("file"), b"in use").unwrap();

    let o = pull(&sshd, &dev, &img);
    assert_exit(&o, 3);
    let e = stderr(&o);
    assert!(
        e.contains(&format!(
            "{} is mounted read-write on {}: {} (ext4 from {})",
            dev.display(),
            sshd.host(),
            m.dir.as_path().display(),
            m.loopdev
        )),
        "{e}"
    );
    assert!(e.contains("or pass --live to copy it anyway"), "{e}");
    assert!(!img.exists(), "a refused pull left an image");

    // --live copies it anyway, with a warning.
    let o = sshd
        .drydock(&[
            "pull",
            &sshd.host(),
            "--device",
            dev.to_str().unwrap(),
            "--output",
            img.to_str().unwrap(),
            "--live",
        ])
        .output()
        .unwrap();
    assert_exit(&o, 0);
    assert_stderr(&o, "the copy may be inconsistent (--live)");

    // A push to it is refused whatever the flags, and writes nothing (the
    // filesystem is idle after a sync; its unmount would write, so compare
    // while it is still mounted).
    let _ = Command::new("sync").status();
    let before = sha256_file(&dev);
    let o = push(&sshd, &img, &dev, &["--yes", "--full"]);
    assert_exit(&o, 3);
    assert_stderr(&o, "drydock never writes under a mounted filesystem");
    assert_eq!(sha256_file(&dev), before);
    drop(m);
}

#[test]
fn an_existing_image_is_not_overwritten() {
    let sshd = Sshd::start();
    let t = tempdir();
    let dev = t.path().join("disk");
    let img = t.path().join("image");
    make_disk(&dev, 4 * MIB, &[(0, 100)], &[]);
    std::fs::write(&img, b"precious").unwrap();
    let o = pull_with(&sshd, &dev, &img, &["-v"]);
    assert_exit(&o, 3);
    assert_stderr(
        &o,
        format!(
            "{} already exists (a file drydock did not write); drydock will not overwrite it",
            img.display()
        ),
    );
    assert_eq!(std::fs::read(&img).unwrap(), b"precious");
    // The helper was copied before the refusal (in the shell that looked
    // at the device): it was waiting for its word and is removed.
    assert_helper_removed(&sshd, &o);
}

#[test]
fn a_missing_device_is_refused() {
    let sshd = Sshd::start();
    let t = tempdir();
    // -v: the helper's folder is named when made and when removed (it is
    // copied in the same login shell that looks at the device).
    let o = pull_with(
        &sshd,
        std::path::Path::new("/dev/drydock-no-such-disk"),
        &t.path().join("i"),
        &["-v"],
    );
    assert_exit(&o, 3);
    assert_stderr(
        &o,
        format!(
            "/dev/drydock-no-such-disk does not exist on {}",
            sshd.host()
        ),
    );
    assert_helper_removed(&sshd, &o);
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

#[test]
fn host_keys_are_checked_like_openssh() {
    let sshd = Sshd::start();
    let fp = {
        let o = Command::new("ssh-keygen")
            .arg("-lf")
            .arg(sshd.dir.path().join("host_key.pub"))
            .output()
            .unwrap();
        stdout(&o).split_whitespace().nth(1).unwrap().to_string()
    };
    let name = format!("[127.0.0.1]:{}", sshd.port);

    // Unknown: refused with the fingerprint and the flag.
    std::fs::remove_file(sshd.known_hosts()).unwrap();
    let o = sshd.drydock(&["probe", &sshd.host()]).output().unwrap();
    assert_exit(&o, 3);
    assert_stderr(
        &o,
        format!("the host key of {name} is not known (fingerprint {fp})"),
    );
    assert_stderr(&o, "--accept-new-host-key");

    // Accepted and recorded, then known without the flag.
    let o = sshd
        .drydock(&["probe", &sshd.host(), "--accept-new-host-key"])
        .output()
        .unwrap();
    assert_exit(&o, 0);
    assert!(
        std::fs::read_to_string(sshd.known_hosts())
            .unwrap()
            .starts_with(&format!("{name} ssh-ed25519 "))
    );
    assert_exit(&sshd.drydock(&["probe", &sshd.host()]).output().unwrap(), 0);

    // Hashed entries (ssh-keygen -H) are understood.
    let st = Command::new("ssh-keygen")
        .arg("-H")
        .arg("-f")
        .arg(sshd.known_hosts())
        .output()
        .unwrap();
    assert!(st.status.success());
    assert!(
        std::fs::read_to_string(sshd.known_hosts())
            .unwrap()
            .starts_with("|1|")
    );
    assert_exit(&sshd.drydock(&["probe", &sshd.host()]).output().unwrap(), 0);

    // Changed: refused, even with --accept-new-host-key.
    let t = tempdir();
    keygen(&t.path().join("other"));
    let other = std::fs::read_to_string(t.path().join("other.pub")).unwrap();
    let mut w = other.split_whitespace();
    std::fs::write(
        sshd.known_hosts(),
        format!("{name} {} {}\n", w.next().unwrap(), w.next().unwrap()),
    )
    .unwrap();
    let o = sshd
        .drydock(&["probe", &sshd.host(), "--accept-new-host-key"])
        .output()
        .unwrap();
    assert_exit(&o, 3);
    assert_stderr(
        &o,
        format!(
            "the host key of {name} has CHANGED (now {fp}; {}:1 holds another)",
            sshd.known_hosts().display()
        ),
    );
}

#[test]
fn a_wrong_key_and_an_unreachable_host_say_so() {
    let sshd = Sshd::start();
    let t = tempdir();
    let wrong = t.path().join("wrong");
    keygen(&wrong);
    let o = sshd
        .drydock_bare(&["probe", &sshd.host(), "-i", wrong.to_str().unwrap()])
        .output()
        .unwrap();
    assert_exit(&o, 69);
    assert_stderr(
        &o,
        format!(
            "{} refused every key drydock tried ({}); add its public key to ~root/.ssh/authorized_keys",
            sshd.host(),
            wrong.display()
        ),
    );

    // No key at all (no agent, no ~/.ssh/id_*).
    let o = sshd
        .drydock_bare(&["probe", &sshd.host()])
        .output()
        .unwrap();
    assert_exit(&o, 69);
    assert_stderr(&o, "no key found: no ssh-agent and no ~/.ssh/id_* file");

    let port = free_port();
    let o = sshd
        .drydock(&["probe", &format!("root@127.0.0.1:{port}")])
        .output()
        .unwrap();
    assert_exit(&o, 69);
    assert_stderr(
        &o,
        format!("cannot reach 127.0.0.1:{port}: Connection refused"),
    );
}

#[test]
fn ssh_config_aliases_and_default_keys_work() {
    let sshd = Sshd::start();
    // The host behind an alias, its key named by IdentityFile (tab- and
    // '='-separated lines, as real configs have them).
    std::fs::write(
        sshd.home.join(".ssh/config"),
        format!(
            "Host myvps\n\tHostName 127.0.0.1\n\tPort={}\n  User root\n  IdentityFile {}\n",
            sshd.port,
            sshd.client_key.display()
        ),
    )
    .unwrap();
    let o = sshd
        .drydock_bare(&["probe", "myvps", "--json"])
        .output()
        .unwrap();
    assert_exit(&o, 0);
    assert_eq!(json(&o)["host"], format!("root@myvps:{}", sshd.port));

    // No IdentityFile: the usual ~/.ssh/id_ed25519 is found.
    std::fs::write(
        sshd.home.join(".ssh/config"),
        format!(
            "Host myvps\n  HostName 127.0.0.1\n  Port {}\n  User root\n",
            sshd.port
        ),
    )
    .unwrap();
    let o = sshd
        .drydock_bare(&["probe", "myvps", "--json"])
        .output()
        .unwrap();
    assert_exit(&o, 69);
    std::fs::copy(&sshd.client_key, sshd.home.join(".ssh/id_ed25519")).unwrap();
    let o = sshd
        .drydock_bare(&["probe", "myvps", "--json"])
        .output()
        .unwrap();
    assert_exit(&o, 0);
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

#[test]
fn a_pull_cut_mid_transfer_resumes_where_it_stopped() {
    let sshd = Sshd::start();
    let t = tempdir();
    let dev = t.path().join("disk");
    let img = t.path().join("image");
    let size = big_disk(&dev);

    // Helper mode (the default). The running helper has already removed
    // its copy and its tmpfs, so the cut leaves nothing behind on the host.
    let child = pull_until(&sshd, &dev, &img, 200 * MIB, &[]);
    let helpers = helpers_under(&sshd);
    assert_eq!(helpers.len(), 1, "{helpers:?}");
    let (pid, dir) = &helpers[0];
    assert!(dir.starts_with("/run/drydock-helper."), "{dir}");
    assert!(!std::path::Path::new(dir).exists(), "{dir} is still there");
    assert!(
        std::fs::read_link(format!("/proc/{pid}/exe"))
            .unwrap()
            .to_string_lossy()
            .ends_with(" (deleted)")
    );
    assert!(
        !std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .contains(dir.as_str())
    );
    sshd.cut_sessions();
    let o = child.wait_with_output().unwrap();
    assert_exit(&o, 75);
    let e = stderr(&o);
    assert!(
        e.contains(&format!("the connection to {} was lost", sshd.host())),
        "{e}"
    );
    assert!(
        e.contains("verified and kept in") && e.contains("run the same command to resume"),
        "{e}"
    );

    let o = sshd
        .drydock(&[
            "pull",
            &sshd.host(),
            "--device",
            dev.to_str().unwrap(),
            "--output",
            img.to_str().unwrap(),
            "--json",
        ])
        .output()
        .unwrap();
    assert_exit(&o, 0);
    let j = json(&o);
    let resumed = j["resumed_at"].as_u64().unwrap();
    assert!(
        resumed >= 128 * MIB && resumed < size,
        "resumed at {resumed}"
    );
    assert_stderr(&o, "resuming the pull of");
    // Only what was missing crossed the wire again: the data does not
    // compress, so the missing bytes plus zstd's and the frames' overhead
    // (under 0.1 %).
    let received = j["bytes_on_wire"].as_u64().unwrap();
    let missing = size - resumed;
    assert!(
        received >= missing && received < missing + missing / 1000 + 8192,
        "received {received} for {} missing bytes",
        size - resumed
    );
    assert_eq!(sha256_file(&img), sha256_file(&dev));
    assert!(!t.path().join("image.pull").exists());
}

/// kill -9 cannot flush: what a pull verified must already be durable.
/// On a disk under 1 GiB nothing was (segments were made durable 64 at a
/// time), and the rerun started from zero. Now a segment line is in the
/// state file within about a second, the pull is killed right then, and
/// the rerun resumes from there, exact.
#[test]
fn a_pull_killed_with_sigkill_resumes_from_what_was_durable() {
    let sshd = Sshd::start();
    let t = tempdir();
    let dev = t.path().join("disk");
    let img = t.path().join("image");
    let size = big_disk(&dev);
    let state = t.path().join("image.pull");
    let mut child = pull_until(&sshd, &dev, &img, 0, &["--transfer", "dd", "--json"]);
    let durable = |p: &std::path::Path| {
        std::fs::read_to_string(p)
            .unwrap_or_default()
            .lines()
            .any(|l| l.starts_with("S "))
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    while !durable(&state) {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the pull ended before any verified segment was durable"
        );
        assert!(
            Instant::now() < deadline,
            "no segment became durable in 120 s"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let o = pull_with(&sshd, &dev, &img, &["--transfer", "dd"]);
    assert_exit(&o, 0);
    let j = json(&o);
    let resumed = j["resumed_at"].as_u64().unwrap();
    assert!(resumed > 0 && resumed < size, "resumed at {resumed}");
    assert_eq!(sha256_file(&img), sha256_file(&dev));
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

#[test]
fn ctrl_c_leaves_a_resumable_pull() {
    a_signal_leaves_a_resumable_pull("INT", "interrupted (Ctrl-C)");
}

/// A service manager's stop, `kill`, or the terminal going away (an SSH
/// session to the workstation cut) are as Ctrl-C, not a death in the
/// middle of a write.
#[test]
fn sigterm_and_sighup_leave_a_resumable_pull_too() {
    a_signal_leaves_a_resumable_pull("TERM", "interrupted (SIGTERM)");
    a_signal_leaves_a_resumable_pull("HUP", "interrupted (SIGHUP)");
}

/// A 0-byte device once pulled "successfully", "verified by  on the
/// host": it is refused, and no image is made.
/// `--json` is an event stream a wrapper can follow: "progress" events
/// while bytes move (rate and ETA, at most two a second), the same field
/// names for pull and push, the result last; a refusal ends in an "error"
/// event with the exit code and the message. (`events` and `json` check
/// every line: one object, "v": 1, a "type".)
#[test]
fn json_is_an_event_stream_ending_in_the_result_or_the_error() {
    let sshd = Sshd::start();
    let t = tempdir();
    let dev = t.path().join("disk");
    let img = t.path().join("image");
    let size = big_disk(&dev);

    for (o, what) in [
        (pull_with(&sshd, &dev, &img, &["--transfer", "dd"]), "pull"),
        (
            push(&sshd, &img, &dev, &["--full", "--yes", "--transfer", "dd"]),
            "push",
        ),
    ] {
        assert_exit(&o, 0);
        let ev = events(&o);
        let progress: Vec<_> = ev
            .iter()
            .filter(|e| e["type"] == "progress" && e["what"] == what)
            .collect();
        assert!(!progress.is_empty(), "no {what} progress: {ev:?}");
        let last = progress.last().unwrap();
        assert_eq!(last["bytes_done"], last["bytes_total"], "{last}");
        assert!(
            last["bytes_per_second"].is_u64() && last["seconds"].is_f64(),
            "{last}"
        );
        // At most two a second, whatever the bar's counting rate.
        let secs = last["seconds"].as_f64().unwrap();
        assert!(
            progress.len() as f64 <= secs * 2.0 + 2.0,
            "{} in {secs} s",
            progress.len()
        );
        let r = json(&o);
        assert!(r["bytes_on_wire"].as_u64().unwrap() > 0, "{r}");
        let written = r["bytes_written"].as_u64().unwrap();
        if what == "pull" {
            assert_eq!(written, size, "{r}");
        } else {
            assert!(written > 0 && written <= size, "{r}");
        }
        assert!(r["seconds"].is_f64(), "{r}");
        assert_eq!(ev.last().unwrap()["command"], what);
    }

    let o = pull(&sshd, &t.path().join("nothing here"), &t.path().join("i2"));
    assert_exit(&o, 3);
    let ev = events(&o);
    let last = ev.last().unwrap();
    assert_eq!(last["type"], "error", "{ev:?}");
    assert_eq!(last["exit_code"], 3);
    assert!(
        last["message"].as_str().unwrap().contains("nothing here"),
        "{last}"
    );
    assert!(ev.iter().all(|e| e["type"] != "result"), "{ev:?}");
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

/// A push whose connection is cut while the helper is being copied to the
/// host (the relay cuts after N bytes from drydock, inside the ~1 MB of
/// the gzip'd helper) ends with an error and leaves no helper folder or tmpfs on
/// the host; the disk is untouched and a push afterwards finishes.
#[test]
fn a_cut_during_the_helpers_install_leaves_nothing_on_the_host() {
    let sshd = Sshd::start();
    let (_t, dev, img) = pulled_then_changed(&sshd, 8 * MIB, b"changed", 5 * MIB);
    let before = sha256_file(&dev);
    // Cuts within the helper's upload (gzip'd: about 1 MB) whatever its size.
    let sent = drydock::transfer::helper::BINARY_GZ.len() as u64;
    for cut in [sent / 8, 3 * sent / 8, 5 * sent / 8, 7 * sent / 8] {
        let dirs = helper_dirs();
        let relay = Relay::start(sshd.port, cut);
        let cmd = push_via(&sshd, &relay.host(), &img, &dev, "helper");
        let o = output_within(cmd, 180, &format!("the push cut at byte {cut}"));
        assert_ne!(o.status.code(), Some(0), "cut at {cut}: {}", stderr(&o));
        eprintln!(
            "cut at byte {cut}: exit {:?}: {}",
            o.status.code(),
            stderr(&o).trim()
        );
        let left = helper_dirs_left(&dirs);
        assert!(
            left.is_empty(),
            "cut at byte {cut}: left on the host: {left:?}; drydock said: {}",
            stderr(&o)
        );
        assert_eq!(sha256_file(&dev), before, "cut at byte {cut}");
    }
    let o = push(&sshd, &img, &dev, &["--yes", "--transfer", "helper"]);
    assert_exit(&o, 0);
    assert_eq!(sha256_file(&dev), sha256_file(&img));
}

/// Pushes cut while they write, in both modes (the relay cuts after N
/// bytes from drydock, past the helper's install): each ends within its
/// deadline with an error saying the disk is partly written, and the same
/// push afterwards finishes it, exact.
#[test]
fn a_push_cut_while_it_writes_ends_and_the_same_push_finishes_it() {
    let sshd = Sshd::start();
    // 32 MiB of new data: incompressible, so the cuts land in the writes.
    let data = pattern(7, 32 * MIB as usize);
    let (t, dev, img) = pulled_then_changed(&sshd, 48 * MIB, &data, 8 * MIB);
    let pulled = std::fs::read(t.path().join("image.manifest")).unwrap();
    for (mode, cuts) in [
        ("helper", [6 * MIB, 14 * MIB, 24 * MIB]),
        ("dd", [6 * MIB, 14 * MIB, 24 * MIB]),
    ] {
        for cut in cuts {
            let dirs = helper_dirs();
            let relay = Relay::start(sshd.port, cut);
            let cmd = push_via(&sshd, &relay.host(), &img, &dev, mode);
            let what = format!("the {mode} push cut at byte {cut}");
            let o = output_within(cmd, 180, &what);
            eprintln!("{what}: exit {:?}: {}", o.status.code(), stderr(&o).trim());
            if o.status.code() == Some(0) {
                continue; // the cut came after the last write
            }
            assert!(
                stderr(&o).contains("partly written"),
                "{what}: {}",
                stderr(&o)
            );
            assert_exit(&o, 75);
            let left = helper_dirs_left(&dirs);
            assert!(left.is_empty(), "{what}: left on the host: {left:?}");
            let o = push(&sshd, &img, &dev, &["--yes", "--transfer", mode]);
            assert_exit(&o, 0);
            assert_eq!(sha256_file(&dev), sha256_file(&img), "{what}");
            // Back to the pulled disk for the next cut.
            write_at(&dev, &vec![0u8; data.len()], 8 * MIB);
            std::fs::write(t.path().join("image.manifest"), &pulled).unwrap();
        }
    }
}

/// The issue's recipe, cut for real: blocks whose new pages are two runs
/// (page 0, and pages 64..256) go to the host as two writes each, so a cut
/// between them leaves a block holding pages of both versions. The same
/// push afterwards finishes it, exact (it was refused: "holds neither what
/// was pulled nor the new image").
#[test]
fn a_push_cut_between_two_page_runs_of_a_block_is_finished_by_the_same_push() {
    let sshd = Sshd::start();
    let t = tempdir();
    let dev = t.path().join("disk");
    let img = t.path().join("image");
    make_disk(&dev, 24 * MIB, &[(0, MIB as usize)], &[]);
    assert_exit(&pull(&sshd, &dev, &img), 0);
    let old = std::fs::read(&dev).unwrap();
    let pulled = std::fs::read(t.path().join("image.manifest")).unwrap();
    for b in 4..20u64 {
        write_at(&img, &pattern(b, 4 * KIB as usize), b * MIB);
        write_at(
            &img,
            &pattern(100 + b, 768 * KIB as usize),
            b * MIB + 256 * KIB,
        );
    }
    let new = std::fs::read(&img).unwrap();
    let mut half_written = 0;
    for cut in [5 * MIB, 8 * MIB, 11 * MIB] {
        let dirs = helper_dirs();
        let relay = Relay::start_stalled(sshd.port, cut, Duration::from_secs(3));
        let cmd = push_via(&sshd, &relay.host(), &img, &dev, "helper");
        let what = format!("the push cut at byte {cut}");
        let o = output_within(cmd, 180, &what);
        eprintln!("{what}: exit {:?}: {}", o.status.code(), stderr(&o).trim());
        if o.status.code() == Some(0) {
            continue; // the cut came after the last write
        }
        // The helper writes what reached it before it sees the cut.
        let left = helper_dirs_left(&dirs);
        assert!(left.is_empty(), "{what}: left on the host: {left:?}");
        let disk = std::fs::read(&dev).unwrap();
        let blk = |d: &[u8], b: usize| d[b * MIB as usize..(b + 1) * MIB as usize].to_vec();
        let mixed: Vec<usize> = (4..20)
            .filter(|&b| blk(&disk, b) != blk(&old, b) && blk(&disk, b) != blk(&new, b))
            .collect();
        eprintln!("{what}: blocks holding pages of both versions: {mixed:?}");
        half_written += mixed.len();
        let o = push(&sshd, &img, &dev, &["--yes", "--transfer", "helper"]);
        assert_exit(&o, 0);
        assert_eq!(sha256_file(&dev), sha256_file(&img), "{what}");
        std::fs::write(&dev, &old).unwrap();
        std::fs::write(t.path().join("image.manifest"), &pulled).unwrap();
    }
    assert!(
        half_written > 0,
        "no cut landed between two runs of a block"
    );
}

/// Bad input ends with what happened and what to do, exit 3, and nothing
/// changed: an image folder that does not exist, a key file that does not,
/// a manifest that is not JSON. A path with spaces and non-ASCII works.
#[test]
fn bad_input_is_refused_with_what_to_do_and_nothing_changes() {
    let sshd = Sshd::start();
    let t = tempdir();
    let dev = t.path().join("disk");
    make_disk(&dev, 4 * MIB, &[(0, MIB as usize)], &[]);
    let before = sha256_file(&dev);

    let folder = t.path().join("no such folder");
    let o = pull(&sshd, &dev, &folder.join("image"));
    assert_exit(&o, 3);
    assert_stderr(
        &o,
        format!(
            "the folder {} for the image does not exist; create it, or choose another path with --output. Nothing was changed",
            folder.display()
        ),
    );
    assert!(!folder.exists());

    // A pull of DEV to t/i with `-i KEY` (and no other key).
    let pull_with_key = |key: &std::path::Path| {
        sshd.drydock_bare(&[
            "pull",
            &sshd.host(),
            "-i",
            key.to_str().unwrap(),
            "--device",
            dev.to_str().unwrap(),
            "--output",
            t.path().join("i").to_str().unwrap(),
        ])
        .output()
        .unwrap()
    };
    let key = t.path().join("no such key");
    let o = pull_with_key(&key);
    assert_exit(&o, 3);
    assert_stderr(
        &o,
        format!(
            "the key {} given with -i does not exist; check the path. Nothing was changed",
            key.display()
        ),
    );

    let locked = t.path().join("locked key");
    let ok = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "a passphrase", "-f"])
        .arg(&locked)
        .status()
        .unwrap();
    assert!(ok.success());
    let o = pull_with_key(&locked);
    assert_exit(&o, 3);
    assert_stderr(
        &o,
        format!(
            "the key {} is protected by a passphrase: add it to ssh-agent (`ssh-add {}`) and run again without -i. Nothing was changed",
            locked.display(),
            locked.display()
        ),
    );
    assert!(!t.path().join("i").exists());

    // Spaces and non-ASCII in the paths: they work, both ways.
    let img = t.path().join("ein bild é");
    assert_exit(&pull(&sshd, &dev, &img), 0);
    assert_eq!(sha256_file(&img), before);
    let manifest = t.path().join("ein bild é.manifest");
    assert!(manifest.exists());

    std::fs::write(&manifest, "{bad").unwrap();
    for mode in ["dd", "helper"] {
        let o = push(&sshd, &img, &dev, &["--yes", "--transfer", mode]);
        assert_exit(&o, 3);
        assert_stderr(
            &o,
            format!(
                "{} is not a drydock manifest (key must be a string at line 1 column 2); pull the disk again, or push with --full to write every block without the check",
                manifest.display()
            ),
        );
        assert_eq!(sha256_file(&dev), before, "{mode}");
        assert!(helpers_under(&sshd).is_empty(), "{mode}: a helper is left");
    }
    let o = push(&sshd, &img, &dev, &["--yes", "--full"]);
    assert_exit(&o, 0);
    assert_eq!(sha256_file(&dev), before);
}

/// More bad input, each refused with what to do and nothing changed: a
/// manifest cut short, an image folder that cannot be written, `-o` a
/// folder, `--device` a folder; flags that contradict each other or make
/// no sense are usage errors (exit 2) before anything runs.
#[test]
fn more_bad_input_is_refused_before_anything_changes() {
    let sshd = Sshd::start();
    let t = tempdir();
    let dev = t.path().join("disk");
    make_disk(&dev, 4 * MIB, &[(0, MIB as usize)], &[]);
    let before = sha256_file(&dev);
    let img = t.path().join("image");
    assert_exit(&pull(&sshd, &dev, &img), 0);
    write_at(&img, b"changed", 2 * MIB);

    // A manifest cut short (a full disk, a copy that stopped).
    let mpath = t.path().join("image.manifest");
    let text = std::fs::read_to_string(&mpath).unwrap();
    std::fs::write(&mpath, &text[..text.len() / 2]).unwrap();
    for mode in ["dd", "helper"] {
        let o = push(&sshd, &img, &dev, &["--yes", "--transfer", mode]);
        assert_exit(&o, 3);
        assert_stderr(
            &o,
            format!("{} is not a drydock manifest (", mpath.display()),
        );
        assert_stderr(
            &o,
            "); pull the disk again, or push with --full to write every block without the check",
        );
        assert_eq!(sha256_file(&dev), before, "{mode}");
        assert!(helpers_under(&sshd).is_empty(), "{mode}: a helper is left");
    }

    // An image folder on a read-only filesystem.
    let ro = t.path().join("read-only");
    std::fs::create_dir(&ro).unwrap();
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "ro,size=64m", "tmpfs"])
        .arg(&ro)
        .status()
        .unwrap();
    assert!(ok.success());
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(ro.clone());
    let o = pull(&sshd, &dev, &ro.join("image"));
    assert_exit(&o, 3);
    assert_stderr(
        &o,
        format!(
            "cannot write the image in {}: Read-only file system (os error 30); choose another \
             path with --output. Nothing was changed",
            ro.display()
        ),
    );

    // `-o` a folder: the image needs a file name.
    let o = pull(&sshd, &dev, t.path());
    assert_exit(&o, 3);
    assert_stderr(
        &o,
        format!(
            "--output {} is a folder; name the image file in it (e.g. --output {}). Nothing was changed",
            t.path().display(),
            t.path().join("disk.raw").display()
        ),
    );

    // `--device` a folder.
    let o = pull(&sshd, t.path(), &t.path().join("of a folder"));
    assert_exit(&o, 3);
    assert_stderr(
        &o,
        format!(
            "{} on {} is neither a block device nor a regular file; name the disk with --device",
            t.path().display(),
            sshd.host()
        ),
    );
    assert!(!t.path().join("of a folder").exists());

    // Usage errors, before any connection (the host does not exist).
    for (args, said) in [
        (
            vec!["upgrade", "root@192.0.2.1"],
            "the following required arguments were not provided:\n  <--to <TO>|--run <COMMAND>>",
        ),
        (
            vec![
                "upgrade",
                "root@192.0.2.1",
                "--to",
                "debian-13",
                "--network",
                "open",
                "--allow-host",
                "example.org",
            ],
            "--allow-host widens the sealed network; with --network open every host is reachable already: drop one of the two",
        ),
        (
            vec![
                "upgrade",
                "root@192.0.2.1",
                "--to",
                "debian-13",
                "--memory",
                "lots",
            ],
            "invalid value 'lots' for '--memory <MEMORY>': expected a size such as 4G or 2048M, at least 128M",
        ),
        (
            vec![
                "rehearse",
                "root@192.0.2.1",
                "--run",
                "true",
                "--no-rehearsal",
            ],
            "--no-rehearsal is for `drydock upgrade`; `drydock rehearse` is the rehearsal alone",
        ),
        (
            vec!["rehearse", "root@192.0.2.1", "--run", "true", "--no-carry"],
            "--no-carry is for `drydock upgrade`; `drydock rehearse` pushes nothing",
        ),
        (
            vec![
                "upgrade",
                "root@192.0.2.1",
                "--run",
                "true",
                "--no-rehearsal",
                "--no-carry",
            ],
            "the argument '--no-rehearsal' cannot be used with '--no-carry'",
        ),
        (
            vec!["upgrade", "root@192.0.2.1", "--run", "true", "--cpus", "0"],
            "invalid value '0' for '--cpus <CPUS>': 0 is not in 1..=1024",
        ),
        (
            vec![
                "upgrade",
                "root@192.0.2.1",
                "--run",
                "true",
                "--to",
                "debian-13",
            ],
            "the argument '--run <COMMAND>' cannot be used with '--to <TO>'",
        ),
        (
            vec!["boot", "image", "--memory", "99999999999999999T"],
            "invalid value '99999999999999999T' for '--memory <MEMORY>'",
        ),
    ] {
        let started = Instant::now();
        let o = sshd.drydock_bare(&args).output().unwrap();
        assert_exit(&o, 2);
        assert_stderr(&o, said);
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{args:?} waited"
        );
    }
    assert_eq!(sha256_file(&dev), before);
}

/// The exit codes of the README's table that no other test pins: a run
/// that is not one and an unknown release are usage errors (2), before
/// any connection; a lost connection is 75 (the same command resumes),
/// not 1 (those are in the cut tests).
#[test]
fn usage_errors_exit_2_before_connecting() {
    let t = tempdir();
    let sshd = Sshd::start();
    for (args, said) in [
        (
            vec!["resume".to_string(), t.path().display().to_string()],
            format!(
                "no run named '{}' (neither a folder with a journal.json nor one under ",
                t.path().display()
            ),
        ),
        (
            vec![
                "abort".to_string(),
                "no-such-run".to_string(),
                "--yes".to_string(),
            ],
            "no run named 'no-such-run' (".to_string(),
        ),
        (
            [
                "upgrade",
                "root@192.0.2.1",
                "--to",
                "windows-11",
                "--dry-run",
            ]
            .map(String::from)
            .to_vec(),
            "unknown release 'windows-11': name it as debian-13 (or trixie)".to_string(),
        ),
    ] {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let started = Instant::now();
        let o = sshd.drydock_bare(&args).output().unwrap();
        assert_exit(&o, 2);
        assert_stderr(&o, &said);
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{args:?} waited"
        );
    }
}

#[test]
fn an_empty_device_is_refused() {
    let sshd = Sshd::start();
    let t = tempdir();
    let dev = t.path().join("empty disk");
    std::fs::File::create(&dev).unwrap();
    let img = t.path().join("i");
    let o = pull(&sshd, &dev, &img);
    assert_exit(&o, 3);
    assert_stderr(
        &o,
        format!(
            "{} on {} is empty (0 bytes), not a disk; name the disk with --device (`drydock probe {}` shows the one that holds /)",
            dev.display(),
            sshd.host(),
            sshd.host()
        ),
    );
    assert!(!img.exists(), "an image was made");
}

#[test]
fn a_device_that_is_not_a_disk_is_refused() {
    let sshd = Sshd::start();
    let t = tempdir();
    let o = pull(
        &sshd,
        std::path::Path::new("/dev/null"),
        &t.path().join("i"),
    );
    assert_exit(&o, 3);
    assert_stderr(
        &o,
        format!(
            "/dev/null on {} is neither a block device nor a regular file",
            sshd.host()
        ),
    );
}

#[test]
fn a_failing_remote_command_shows_its_status_and_stderr() {
    let sshd = Sshd::start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    // The target is built by hand so this process's own HOME is not read.
    let spec = drydock::ssh::HostSpec::parse(&sshd.host()).unwrap();
    let mut target = drydock::ssh::Target::resolve_with(&spec, "", &sshd.home).unwrap();
    target.user_known_hosts = vec![sshd.known_hosts()];
    let opts = drydock::ssh::ConnectOptions {
        identity: Some(sshd.client_key.clone()),
        accept_new_host_key: false,
    };
    let err = rt
        .block_on(async {
            let s = drydock::ssh::Session::connect(&target, &opts).await?;
            s.run(
                "listing the widgets",
                "echo first >&2; echo 'no widgets here' >&2; exit 7",
            )
            .await
        })
        .unwrap_err();
    assert_eq!(
        format!("{err:#}"),
        format!(
            "listing the widgets failed on {} (exit status 7); its stderr:\n  first\n  no widgets here",
            sshd.host()
        )
    );
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

#[test]
fn freeze_makes_the_disk_read_only_and_thaw_undoes_it() {
    let _one = freeze_lock();
    let sshd = Sshd::start();
    let t = tempdir();
    let dev = t.path().join("disk");
    let img = t.path().join("image");
    make_disk(&dev, 64 * MIB, &[], &[]);
    let m = Mounted::new(&dev).expect("loop devices (losetup -f)");
    std::fs::write(m.dir.as_path().join("file"), b"written before the freeze").unwrap();

    let o = freeze_cmd(&sshd, &dev);
    assert_exit(&o, 0);
    assert!(
        stdout(&o).contains(&format!(
            "{} frozen: {} read-only ({})",
            sshd.host(),
            dev.display(),
            m.dir.as_path().display()
        )),
        "{}",
        stdout(&o)
    );
    assert!(mount_is_read_only(m.dir.as_path()));
    assert!(
        std::fs::write(m.dir.as_path().join("other"), b"x").is_err(),
        "a frozen filesystem took a write"
    );

    // Frozen: the pull needs no --live, and the copy holds the file.
    assert_exit(&pull(&sshd, &dev, &img), 0);
    assert_eq!(sha256_file(&img), sha256_file(&dev));

    let o = thaw_cmd(&sshd, &dev);
    assert_exit(&o, 0);
    assert!(!mount_is_read_only(m.dir.as_path()));
    std::fs::write(m.dir.as_path().join("other"), b"after the thaw").unwrap();
}

#[test]
fn a_filesystem_in_use_is_not_frozen_and_its_writers_are_named() {
    let _one = freeze_lock();
    let sshd = Sshd::start();
    let t = tempdir();
    let dev = t.path().join("disk");
    make_disk(&dev, 64 * MIB, &[], &[]);
    let m = Mounted::new(&dev).expect("loop devices (losetup -f)");
    let busy = m.dir.as_path().join("busy.log");
    let held = std::fs::File::create(&busy).unwrap();

    let o = freeze_cmd(&sshd, &dev);
    assert_exit(&o, 3);
    let e = stderr(&o);
    assert!(
        e.contains(&format!(
            "cannot make {} read-only on {}",
            m.dir.as_path().display(),
            sshd.host()
        )),
        "{e}"
    );
    assert!(e.contains("these hold files open for writing:"), "{e}");
    assert!(
        e.contains(&format!("{} (", std::process::id())) && e.contains(busy.to_str().unwrap()),
        "{e}"
    );
    assert!(
        e.ends_with(&format!("nothing on {} was changed\n", sshd.host())),
        "{e}"
    );
    assert!(!mount_is_read_only(m.dir.as_path()));
    drop(held);
}

#[test]
fn a_freeze_that_fails_half_way_undoes_what_it_did_and_says_so() {
    // Two filesystems on the disk: the deeper one goes read-only first,
    // then the one above it cannot (a file is open for writing there).
    let _one = freeze_lock();
    let sshd = Sshd::start();
    let t = tempdir();
    let dev = t.path().join("disk");
    make_disk(&dev, 64 * MIB, &[], &[]);
    let outer = Mounted::part(&dev, 0, 32 * MIB, &t.path().join("outer"), false)
        .expect("loop devices (losetup -f)");
    let inner = Mounted::part(&dev, 32 * MIB, 32 * MIB, &outer.dir.join("inner"), false)
        .expect("loop devices (losetup -f)");
    let held = std::fs::File::create(outer.dir.join("busy.log")).unwrap();

    let o = freeze_cmd(&sshd, &dev);
    assert_exit(&o, 3);
    let e = stderr(&o);
    assert!(
        e.contains(&format!(
            "cannot make {} read-only on {}",
            outer.dir.display(),
            sshd.host()
        )),
        "{e}"
    );
    assert!(
        e.ends_with(&format!(
            "drydock undid what it had done ({} read-only): nothing on {} is left changed\n",
            inner.dir.display(),
            sshd.host()
        )),
        "{e}"
    );
    // What a user checks: the filesystem frozen first takes writes again.
    assert!(!mount_is_read_only(&inner.dir));
    std::fs::write(inner.dir.join("after"), b"writable again").unwrap();
    drop(held);
    // And nothing is left for a thaw to do.
    let o = thaw_cmd(&sshd, &dev);
    assert_exit(&o, 0);
    assert_eq!(
        stdout(&o),
        format!(
            "{}: no freeze by drydock is recorded there since it booted; nothing to thaw\n",
            sshd.host()
        )
    );
}

#[test]
fn thaw_leaves_read_only_what_was_read_only_before_the_freeze() {
    let _one = freeze_lock();
    let sshd = Sshd::start();
    let t = tempdir();
    let dev = t.path().join("disk");
    make_disk(&dev, 64 * MIB, &[], &[]);
    let rw = Mounted::part(&dev, 0, 32 * MIB, &t.path().join("rw"), false)
        .expect("loop devices (losetup -f)");
    let ro = Mounted::part(&dev, 32 * MIB, 32 * MIB, &t.path().join("ro"), true)
        .expect("loop devices (losetup -f)");

    let o = freeze_cmd(&sshd, &dev);
    assert_exit(&o, 0);
    assert!(
        stdout(&o).contains(&format!("`drydock thaw {}` undoes it", sshd.host())),
        "{}",
        stdout(&o)
    );
    assert!(mount_is_read_only(&rw.dir));
    // A thaw that names another disk is refused, and thaws nothing.
    let o = thaw_cmd(&sshd, std::path::Path::new("/dev/null"));
    assert_exit(&o, 3);
    assert_stderr(
        &o,
        format!(
            "the freeze recorded on {} is of {}, not of /dev/null; `drydock thaw {}` (no --device) undoes it. Nothing was changed",
            sshd.host(),
            dev.display(),
            sshd.host()
        ),
    );
    assert!(mount_is_read_only(&rw.dir));
    let o = thaw_cmd(&sshd, &dev);
    assert_exit(&o, 0);
    assert_eq!(
        stdout(&o),
        format!("{} thawed: read-write {}\n", sshd.host(), rw.dir.display())
    );
    assert!(!mount_is_read_only(&rw.dir));
    assert!(
        mount_is_read_only(&ro.dir),
        "thaw made writable a filesystem drydock had not frozen"
    );
}

#[test]
fn hints_name_the_host_as_it_was_typed() {
    let sshd = Sshd::start();
    let o = sshd
        .drydock(&[
            "freeze",
            &sshd.host(),
            "--device",
            "/dev/drydock-no-such-disk",
            "--yes",
        ])
        .output()
        .unwrap();
    assert_exit(&o, 3);
    assert_stderr(
        &o,
        format!("`drydock probe {}` lists the disks", sshd.host()),
    );
}

#[test]
fn keys_in_ssh_agent_are_used() {
    let sshd = Sshd::start();
    let t = tempdir();
    let sock = t.path().join("agent.sock");
    let mut agent = Command::new("ssh-agent")
        .arg("-D")
        .arg("-a")
        .arg(&sock)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "ssh-agent did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let added = Command::new("ssh-add")
        .arg(&sshd.client_key)
        .env("SSH_AUTH_SOCK", &sock)
        .output()
        .unwrap();
    assert!(added.status.success(), "{}", stderr(&added));
    let o = sshd
        .drydock_bare(&["probe", &sshd.host(), "--json"])
        .env("SSH_AUTH_SOCK", &sock)
        .output()
        .unwrap();
    let _ = agent.kill();
    let _ = agent.wait();
    assert_exit(&o, 0);
}

/// A ProxyCommand is refused, not bypassed: drydock does not run it, and
/// does not connect directly either.
#[test]
fn a_proxy_command_in_ssh_config_is_refused_not_bypassed() {
    let sshd = Sshd::start();
    std::fs::write(
        sshd.home.join(".ssh/config"),
        format!(
            "Host hidden\n  HostName 127.0.0.1\n  Port {}\n  ProxyCommand nc bastion.example.org 22\n",
            sshd.port
        ),
    )
    .unwrap();
    let o = sshd.drydock(&["probe", "root@hidden"]).output().unwrap();
    assert_exit(&o, 1);
    assert_stderr(
        &o,
        "the ssh config reaches hidden through a ProxyCommand (nc bastion.example.org 22), which drydock does not run",
    );
}

/// ProxyJump, as OpenSSH users have it: a second real sshd is the jump
/// host, and the target's name resolves only there (its /etc/hosts), so
/// only a connection through the jump host reaches it. `-J`, the config's
/// ProxyJump, `ssh://` and `-p` all take that way; without a jump, the
/// name does not resolve.
#[test]
fn a_pull_through_a_jump_host() {
    let target = Sshd::start();
    let jump = Sshd::start_as(&[(
        "/etc/hosts",
        "127.0.0.1 localhost\n127.0.0.1 hidden-target\n",
    )]);
    // The test's key opens both; both host keys are known.
    let key = std::fs::read_to_string(target.client_key.with_extension("pub")).unwrap();
    let mut auth = std::fs::OpenOptions::new()
        .append(true)
        .open(jump.dir.path().join("authorized_keys"))
        .unwrap();
    std::io::Write::write_all(&mut auth, key.as_bytes()).unwrap();
    let host_key = |s: &Sshd| {
        let k = std::fs::read_to_string(s.dir.path().join("host_key.pub")).unwrap();
        let w: Vec<&str> = k.split_whitespace().collect();
        format!("{} {}", w[0], w[1])
    };
    std::fs::write(
        target.known_hosts(),
        format!(
            "[127.0.0.1]:{} {}\n[hidden-target]:{} {}\n",
            jump.port,
            host_key(&jump),
            target.port,
            host_key(&target)
        ),
    )
    .unwrap();
    let t = tempdir();
    let dev = t.path().join("disk");
    make_disk(&dev, 8 * MIB, &[(0, MIB as usize)], &[]);
    let want = sha256_file(&dev);
    let via = format!("root@127.0.0.1:{}", jump.port);
    let there = format!("root@hidden-target:{}", target.port);
    let uri = format!("ssh://root@hidden-target:{}", target.port);
    let two_hops = format!("{via},{via}");
    let port = target.port.to_string();
    let pull = |n: &str, extra: &[&str]| {
        let img = t.path().join(n);
        let mut args = vec!["pull", "--device", dev.to_str().unwrap()];
        args.extend_from_slice(&["--output", img.to_str().unwrap()]);
        args.extend_from_slice(extra);
        let o = target.drydock(&args).output().unwrap();
        (o, img)
    };
    let (o, _) = pull("direct", &[&there]);
    assert_exit(&o, 69);
    assert_stderr(&o, format!("cannot reach hidden-target:{}", target.port));
    for (n, extra) in [
        ("j", vec![there.as_str(), "-J", via.as_str()]),
        ("uri", vec![uri.as_str(), "-J", via.as_str()]),
        // Two hops: the jump host, then itself again through it.
        ("two hops", vec![there.as_str(), "-J", &two_hops]),
        (
            "-p with -J",
            vec!["root@hidden-target", "-p", &port, "-J", &via],
        ),
        (
            "-o ProxyJump",
            vec![there.as_str(), "-o", &format!("ProxyJump={via}")],
        ),
    ] {
        let (o, img) = pull(n, &extra);
        assert_exit(&o, 0);
        assert_eq!(sha256_file(&img), want, "{n}");
        if n == "j" {
            eprintln!(
                "$ drydock pull {} --device {} --output {}\n{}{}",
                extra.join(" "),
                dev.display(),
                img.display(),
                stderr(&o),
                stdout(&o)
            );
        }
    }
    let cfg = t.path().join("another config");
    std::fs::write(&cfg, format!("Host hidden-target\n  ProxyJump {via}\n")).unwrap();
    let (o, img) = pull("F", &[&there, "-F", cfg.to_str().unwrap()]);
    assert_exit(&o, 0);
    assert_eq!(sha256_file(&img), want, "-F with ProxyJump");
    std::fs::copy(&cfg, target.home.join(".ssh/config")).unwrap();
    let (o, img) = pull("config", &[&there]);
    assert_exit(&o, 0);
    assert_eq!(sha256_file(&img), want, "ProxyJump in ~/.ssh/config");
    eprintln!(
        "pulled root@hidden-target through the jump sshd on port {}",
        jump.port
    );
}

/// HOST as people type it by mistake: scp's host:path, the image and the
/// host swapped, a file for a host, an ssh option drydock does not use.
/// Each is a usage error that says what to type, before any connection.
#[test]
fn host_slips_are_usage_errors_that_say_what_was_meant() {
    let sshd = Sshd::start();
    let t = tempdir();
    let img = t.path().join("vps.raw");
    std::fs::write(&img, b"").unwrap();
    let i = img.to_str().unwrap();
    for (args, said) in [
        (
            vec!["pull", "vps:/dev/vda", "--output", "x.raw"],
            "'vps:/dev/vda' looks like scp's host:path; drydock takes the host alone and the \
             disk with --device: `vps --device /dev/vda`"
                .to_string(),
        ),
        (
            vec!["push", "root@vps", i],
            format!(
                "IMAGE and HOST are the other way round: root@vps is not a file and '{i}' is; \
                 `drydock push IMAGE HOST`"
            ),
        ),
        (
            vec!["probe", i],
            format!("'{i}' is a file here, not a host: HOST is [user@]host[:port]"),
        ),
        (
            vec!["probe", "ssh://root@vps:2222/dev/vda"],
            "an ssh:// address names no path; the disk is named with --device".to_string(),
        ),
        (
            vec!["probe", "vps", "-o", "Compression=yes"],
            "-o Compression: drydock does not use this ssh option; it honours User, HostName"
                .to_string(),
        ),
        (
            vec!["probe", "vps", "-o", "StrictHostKeyChecking=no"],
            "-o StrictHostKeyChecking=no: drydock always checks host keys".to_string(),
        ),
    ] {
        let o = sshd.drydock_bare(&args).output().unwrap();
        assert_exit(&o, 2);
        assert_stderr(&o, &said);
    }
}

/// Hundreds of small, scattered changes: many more answers in flight than
/// russh buffers per channel (an unread channel stalls the connection).
#[test]
fn a_push_of_many_scattered_pages_completes() {
    let sshd = Sshd::start();
    let t = tempdir();
    let dev = t.path().join("disk");
    let img = t.path().join("image");
    let size = standard_disk(&dev);
    assert_exit(&pull(&sshd, &dev, &img), 0);
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    let mut n = 0;
    let mut off = 4096 * 3;
    while off < size - 4096 {
        f.write_all_at(b"#", off).unwrap();
        off += 50 * 4096;
        n += 1;
    }
    drop(f);
    assert!(n > 300, "{n}");
    // (Where the data already held a '#', that page did not change.)
    let differing = std::fs::read(&dev)
        .unwrap()
        .chunks(4096)
        .zip(std::fs::read(&img).unwrap().chunks(4096))
        .filter(|(a, b)| a != b)
        .count() as u64;
    assert!(differing > 300, "{differing}");
    let o = push(&sshd, &img, &dev, &["--yes", "--transfer", "helper"]);
    assert_exit(&o, 0);
    let j = json(&o);
    assert_eq!(j["ranges"], differing, "{j}");
    assert_eq!(j["bytes_written"], differing * 4096, "{j}");
    assert_eq!(sha256_file(&dev), sha256_file(&img));
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

/// `upgrade --dry-run` probes the host (this machine, Debian 12), runs the
/// read-only checks and prints the plan with its commands; it changes
/// nothing and keeps no run. A target that is not newer is refused the same
/// way as without --dry-run.
/// `--gc` deletes NixOS generations after a release upgrade; with `--run`
/// there is none, and clap dropped `--gc`'s requirement of `--to` when
/// the conflicting `--run` was given: the dry run went on and ignored it.
/// A usage error now (exit 2), before any connection.
#[test]
fn gc_with_run_is_a_usage_error() {
    let o = Command::new(env!("CARGO_BIN_EXE_drydock"))
        .args([
            "upgrade",
            "root@127.0.0.1:1",
            "--gc",
            "--run",
            "true",
            "--dry-run",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_exit(&o, 2);
    assert_stderr(
        &o,
        "the argument '--gc' cannot be used with '--run <COMMAND>'",
    );
}

#[test]
fn upgrade_dry_run_prints_the_plan_and_changes_nothing() {
    let os = std::fs::read_to_string("/etc/os-release").unwrap();
    assert!(
        os.contains("ID=debian") && os.contains("VERSION_ID=\"12\""),
        "this test expects a Debian 12 test machine, as CI is"
    );
    let sshd = Sshd::start();
    let t = tempdir();
    let dev = t.path().join("disk");
    make_disk(&dev, 3 * MIB, &[(MIB, 4096)], &[]);
    let before = sha256_file(&dev);
    let state = t.path().join("state");
    let upgrade = |to: &str, extra: &[&str]| dry_run(&sshd, &dev, &state, to, extra);

    let o = upgrade("debian-13", &["--json"]);
    assert_exit(&o, 0);
    let j = json(&o);
    assert_eq!(j["os"], "Debian GNU/Linux 12 (bookworm)");
    assert_eq!(j["device"], dev.to_str().unwrap());
    assert_eq!(j["size"], 3 * MIB);
    assert_eq!(j["block_device"], false);
    assert_eq!(j["plan"], "Debian 12 (bookworm) -> 13 (trixie)");
    assert_eq!(j["transfer"], "helper");
    assert_eq!(j["expect"], "debian 13");
    let commands: Vec<&str> = j["commands"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    assert!(commands[0].contains("s/([[:space:]])bookworm([[:space:]]|-|$)/\\1trixie\\2/g"));
    assert!(commands.iter().any(|c| c.ends_with(" full-upgrade")));
    assert!(commands.iter().any(|c| c.ends_with(" autoremove --purge")));

    let o = upgrade("trixie", &[]);
    assert_exit(&o, 0);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.starts_with(&format!(
            "dry run: nothing was changed on {}, and no run was kept\n",
            sshd.host()
        )),
        "{out}"
    );
    // A file standing for a disk: the freeze stops no service.
    assert!(
        out.contains(&format!(
            "  1. freeze {}: make {} read-only, turn swap off\n",
            sshd.host(),
            dev.display()
        )),
        "{out}"
    );
    assert!(
        out.contains("  4. reboot the worker VM and check it reports debian 13, power it off\n")
    );

    let o = upgrade("debian-12", &[]);
    assert_exit(&o, 3);
    assert_stderr(&o, "the host already runs Debian 12; 12 is not newer");

    assert_eq!(sha256_file(&dev), before);
    assert!(!state.exists(), "a run folder was made");
}

/// Real os-release files of NixOS 23.05, Ubuntu 22.04 and Alpine 3.19 (as
/// those systems ship them) and their real configuration files, laid over
/// this machine for one sshd each: `upgrade --dry-run` probes them over
/// SSH (NixOS's channels read by Nix's own `nix-channel`, Debian's
/// nix-bin), runs the recipe's preflight there, and prints the plan. Their
/// package mirrors and Nix's cache are not reachable from here, so no
/// upgrade of these systems runs; this is as far as they go.
#[test]
fn dry_runs_of_nixos_ubuntu_and_alpine_hosts() {
    const NIXOS: &str = r#"BUG_REPORT_URL="https://github.com/NixOS/nixpkgs/issues"
BUILD_ID="23.05.5541.a8d2e9a3b1b8"
DOCUMENTATION_URL="https://nixos.org/learn.html"
HOME_URL="https://nixos.org/"
ID=nixos
LOGO="nix-snowflake"
NAME=NixOS
PRETTY_NAME="NixOS 23.05 (Stoat)"
SUPPORT_END="2023-12-31"
SUPPORT_URL="https://nixos.org/community.html"
VERSION="23.05 (Stoat)"
VERSION_CODENAME=stoat
VERSION_ID="23.05"
"#;
    const UBUNTU: &str = r#"PRETTY_NAME="Ubuntu 22.04.3 LTS"
NAME="Ubuntu"
VERSION_ID="22.04"
VERSION="22.04.3 LTS (Jammy Jellyfish)"
VERSION_CODENAME=jammy
ID=ubuntu
ID_LIKE=debian
HOME_URL="https://www.ubuntu.com/"
SUPPORT_URL="https://help.ubuntu.com/"
BUG_REPORT_URL="https://bugs.launchpad.net/ubuntu/"
PRIVACY_POLICY_URL="https://www.ubuntu.com/legal/terms-and-policies/privacy-policy"
UBUNTU_CODENAME=jammy
"#;
    const ALPINE: &str = r#"NAME="Alpine Linux"
ID=alpine
VERSION_ID=3.19.1
PRETTY_NAME="Alpine Linux v3.19"
HOME_URL="https://alpinelinux.org/"
BUG_REPORT_URL="https://gitlab.alpinelinux.org/alpine/aports/-/issues"
"#;
    let flake = r#"{
  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-23.05";
  inputs.home-manager.url = "github:nix-community/home-manager/release-23.05";
  outputs = { self, nixpkgs, home-manager }: {
    nixosConfigurations.vps = nixpkgs.lib.nixosSystem {
      system = "x86_64-linux";
      modules = [ ./configuration.nix ];
    };
  };
}
"#;
    // (--to, files laid over the machine, the plan, commands it must show)
    type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, &'a str, Vec<&'a str>);
    let cases: Vec<Case> = vec![
        (
            "nixos-23.11",
            vec![
                ("/etc/os-release", NIXOS),
                // What `nix-channel --add` writes: a release channel, and
                // unstable for newer packages.
                (
                    "/root/.nix-channels",
                    "https://nixos.org/channels/nixos-23.05 nixos\nhttps://nixos.org/channels/nixos-unstable unstable\n",
                ),
            ],
            "NixOS 23.05 (stoat) -> 23.11 (tapir), channels nixos (kept as they are: unstable)",
            vec![
                "nix-channel --add https://nixos.org/channels/nixos-23.11 nixos",
                "nix-channel --update",
                "nixos-rebuild boot",
            ],
        ),
        (
            "nixos-23.11",
            vec![("/etc/os-release", NIXOS), ("/etc/nixos/flake.nix", flake)],
            "NixOS 23.05 (stoat) -> 23.11 (tapir), flake /etc/nixos/flake.nix",
            vec![
                // The config guard first, then the flake followed to where
                // its link points, as nixos-rebuild does.
                "nixosConfigurations.\\\"$h\\\".config.system.build.toplevel.outPath",
                "nix --extra-experimental-features 'nix-command flakes' flake lock \"$(dirname \"$(readlink -f /etc/nixos/flake.nix)\")\"",
                "nixos-rebuild boot --flake \"$(dirname \"$(readlink -f /etc/nixos/flake.nix)\")\"",
            ],
        ),
        (
            "ubuntu-24.04",
            vec![("/etc/os-release", UBUNTU)],
            "Ubuntu 22.04 (jammy) -> 24.04 (noble), PPAs disabled as do-release-upgrade does",
            vec!["full-upgrade"],
        ),
        (
            "alpine-3.20",
            vec![
                ("/etc/os-release", ALPINE),
                (
                    "/etc/apk/repositories",
                    "https://dl-cdn.alpinelinux.org/alpine/v3.19/main\nhttps://dl-cdn.alpinelinux.org/alpine/v3.19/community\n",
                ),
            ],
            "Alpine 3.19 -> 3.20",
            vec!["apk update", "apk upgrade --available"],
        ),
    ];
    for (to, files, plan, commands) in cases {
        let sshd = Sshd::start_as(&files);
        let t = tempdir();
        let dev = t.path().join("disk");
        make_disk(&dev, 3 * MIB, &[(MIB, 4096)], &[]);
        let state = t.path().join("state");
        let o = dry_run(&sshd, &dev, &state, to, &[]);
        assert_exit(&o, 0);
        let out = stdout(&o);
        eprintln!("$ drydock upgrade HOST --to {to} --dry-run ...\n{out}");
        assert!(out.contains(&format!("plan: {plan}\n")), "{out}");
        for c in commands {
            assert!(out.contains(c), "{c} missing from:\n{out}");
        }
        let j = json(&dry_run(&sshd, &dev, &state, to, &["--json"]));
        assert_eq!(j["plan"], plan);
        let (id, v) = to.split_once('-').unwrap();
        assert_eq!(j["expect"], format!("{id} {v}"));
        if id == "nixos" {
            assert!(
                out.contains("case \"$v\" in 23.11*)"),
                "the nixos-version check is missing:\n{out}"
            );
        }
        assert!(!state.exists(), "a dry run kept a run");
    }
}

/// The refusals a user of those systems meets first, from the same real
/// files: an impossible jump, and an Alpine that follows latest-stable.
#[test]
fn impossible_upgrades_of_other_systems_are_refused_before_anything_changes() {
    let sshd = Sshd::start_as(&[
        (
            "/etc/os-release",
            "NAME=\"Alpine Linux\"\nID=alpine\nVERSION_ID=3.19.1\nPRETTY_NAME=\"Alpine Linux v3.19\"\n",
        ),
        (
            "/etc/apk/repositories",
            "https://dl-cdn.alpinelinux.org/alpine/latest-stable/main\n",
        ),
    ]);
    let t = tempdir();
    let dev = t.path().join("disk");
    make_disk(&dev, 3 * MIB, &[(MIB, 4096)], &[]);
    let state = t.path().join("state");
    let run = |to: &str| dry_run(&sshd, &dev, &state, to, &[]);
    let o = run("alpine-3.21");
    assert_exit(&o, 3);
    assert_stderr(
        &o,
        "Alpine upgrades one release at a time: 3.19 -> 3.21 must go through 3.20; run --to alpine-3.20 first",
    );
    let o = run("alpine-3.20");
    assert_exit(&o, 3);
    assert_stderr(
        &o,
        "/etc/apk/repositories names no v3.19 repository (it has: https://dl-cdn.alpinelinux.org/alpine/latest-stable/main )",
    );
}

/// `drydock completions bash`, sourced as the README says, completes
/// subcommands and flags; `drydock man --dir` writes a page per
/// subcommand that man(1) renders.
#[test]
fn completions_and_man_pages_work() {
    let bin = env!("CARGO_BIN_EXE_drydock");
    let script = format!(
        "source <({bin} completions bash) && complete -p drydock && \
         COMP_WORDS=(drydock pu); COMP_CWORD=1; _drydock drydock pu drydock; \
         echo \"words: ${{COMPREPLY[*]}}\"; \
         COMP_WORDS=(drydock pull --tr); COMP_CWORD=2; _drydock drydock --tr pull; \
         echo \"flags: ${{COMPREPLY[*]}}\""
    );
    let o = Command::new("bash").args(["-c", &script]).output().unwrap();
    assert_exit(&o, 0);
    let out = stdout(&o);
    assert!(out.contains("-F _drydock drydock"), "{out}");
    assert!(out.contains("words: pull push"), "{out}");
    assert!(out.contains("flags: --transfer"), "{out}");

    let t = tempdir();
    let o = Command::new(bin)
        .args(["man", "--dir", t.path().to_str().unwrap()])
        .output()
        .unwrap();
    assert_exit(&o, 0);
    for page in ["drydock.1", "drydock-pull.1", "drydock-upgrade.1"] {
        let text = std::fs::read_to_string(t.path().join(page)).unwrap();
        assert!(text.contains(".TH drydock"), "{page}: {text}");
    }
    let o = Command::new("man")
        .arg("-l")
        .arg(t.path().join("drydock-pull.1"))
        .env("MANWIDTH", "100")
        .env("MANPAGER", "cat")
        .output()
        .unwrap();
    assert_exit(&o, 0);
    let page = stdout(&o);
    assert!(
        page.contains("NAME") && page.contains("drydock-pull"),
        "{page}"
    );
    assert!(page.contains("--transfer"), "{page}");
}

/// `--version` names the commit and the helper protocol.
#[test]
fn version_names_the_commit_and_the_helper_protocol() {
    let o = Command::new(env!("CARGO_BIN_EXE_drydock"))
        .arg("--version")
        .output()
        .unwrap();
    assert_exit(&o, 0);
    let v = stdout(&o);
    let want = format!("drydock {} (commit ", env!("CARGO_PKG_VERSION"));
    assert!(v.starts_with(&want), "{v}");
    assert!(v.trim_end().ends_with(", helper protocol 2)"), "{v}");
}

/// Output people read: `-q` leaves stderr empty on success and the result
/// on stdout; `-v` has no false ERROR from russh; the result is said once,
/// in lines of at most 100 columns (but for the paths).
#[test]
fn quiet_verbose_and_the_result_said_once() {
    let sshd = Sshd::start();
    let t = tempdir();
    let dev = t.path().join("disk");
    make_disk(&dev, 8 * MIB, &[(0, MIB as usize)], &[]);
    let img = t.path().join("image");
    let host = sshd.host();
    let o = pull_cmd(&sshd, &dev, &img).arg("-q").output().unwrap();
    assert_exit(&o, 0);
    assert_eq!(stderr(&o), "", "-q");
    let out = stdout(&o);
    eprint!("{out}");
    assert_eq!(out.matches("on the host").count(), 1, "{out}");
    assert!(
        out.starts_with(&format!(
            "pulled {host}:{}\n  to {}\n",
            dev.display(),
            img.display()
        )),
        "{out}"
    );
    for l in out
        .lines()
        .filter(|l| !l.contains(t.path().to_str().unwrap()))
    {
        assert!(l.chars().count() <= 100, "over 100 columns: {l}");
    }

    write_at(&img, b"changed", 3 * MIB);
    let o = sshd
        .drydock(&[
            "push",
            img.to_str().unwrap(),
            &host,
            "--device",
            dev.to_str().unwrap(),
            "--yes",
            "-v",
        ])
        .output()
        .unwrap();
    assert_exit(&o, 0);
    let (out, err) = (stdout(&o), stderr(&o));
    assert!(!err.contains("ERROR"), "{err}");
    assert!(!err.contains("read back"), "the result said twice: {err}");
    assert!(out.contains("; read back and verified\n"), "{out}");
    for l in out
        .lines()
        .filter(|l| !l.contains(t.path().to_str().unwrap()))
    {
        assert!(l.chars().count() <= 100, "over 100 columns: {l}");
    }
    assert_eq!(sha256_file(&dev), sha256_file(&img));
}

/// Defaults: `~/.config/drydock/config.toml`, then `DRYDOCK_*` variables
/// over it, then flags over both. A key drydock does not know is a usage
/// error naming the file.
#[test]
fn defaults_come_from_the_config_file_the_environment_then_flags() {
    let sshd = Sshd::start();
    let t = tempdir();
    let dev = t.path().join("disk");
    make_disk(&dev, 4 * MIB, &[(0, MIB as usize)], &[]);
    let cfg = sshd.home.join(".config/drydock");
    std::fs::create_dir_all(&cfg).unwrap();
    std::fs::write(
        cfg.join("config.toml"),
        format!(
            "identity = \"{}\"\ntransfer = \"dd\"\nstate_dir = \"{}\"\n",
            sshd.client_key.display(),
            t.path().join("state").display()
        ),
    )
    .unwrap();
    let host = sshd.host();
    // No -i: the key comes from the file, and so does dd mode.
    let pull = |n: &str, extra: &[&str], env: &[(&str, &str)]| {
        let img = t.path().join(n);
        let mut args = vec!["pull", &host, "--device", dev.to_str().unwrap()];
        args.extend_from_slice(&["--output", img.to_str().unwrap(), "--json"]);
        args.extend_from_slice(extra);
        let mut c = sshd.drydock_bare(&args);
        c.env_remove("DRYDOCK_TRANSFER")
            .env_remove("DRYDOCK_IDENTITY");
        for (k, v) in env {
            c.env(k, v);
        }
        let o = c.output().unwrap();
        assert_exit(&o, 0);
        json(&o)["transfer"].as_str().unwrap().to_string()
    };
    assert_eq!(pull("file", &[], &[]), "dd", "from the file");
    assert_eq!(
        pull("env", &[], &[("DRYDOCK_TRANSFER", "helper")]),
        "helper",
        "the variable over the file"
    );
    assert_eq!(
        pull(
            "flag",
            &["--transfer", "dd"],
            &[("DRYDOCK_TRANSFER", "helper")]
        ),
        "dd",
        "the flag over the variable"
    );
    let o = sshd.drydock_bare(&["runs"]).output().unwrap();
    assert_exit(&o, 0);
    assert_eq!(
        stdout(&o),
        format!("no runs in {}\n", t.path().join("state/runs").display())
    );

    std::fs::write(cfg.join("config.toml"), "colour = \"blue\"\n").unwrap();
    let o = sshd.drydock_bare(&["runs"]).output().unwrap();
    assert_exit(&o, 2);
    assert_stderr(
        &o,
        format!(
            "{} is not a drydock config: ",
            cfg.join("config.toml").display()
        ),
    );
    assert_stderr(&o, "unknown field `colour`");
}
