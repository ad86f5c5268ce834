//! Backups against the real sshd: versions that share their blocks, only
//! the blocks the store lacks sent, `verify` finding a flipped byte,
//! `prune` keeping what it keeps readable, a cut backup listing nothing
//! and finishing when run again.

use super::*;

fn backup(sshd: &Sshd, dev: &std::path::Path, store: &std::path::Path) -> Command {
    let mut c = sshd.drydock(&[
        "backup",
        &sshd.host(),
        "--device",
        dev.to_str().unwrap(),
        "--store",
        store.to_str().unwrap(),
        "--json",
    ]);
    c.env_remove("XDG_DATA_HOME");
    c
}

fn cmd(sshd: &Sshd, args: &[&str]) -> std::process::Output {
    let mut c = sshd.drydock_bare(args);
    c.env_remove("XDG_DATA_HOME");
    c.output().unwrap()
}

/// A fresh sshd, the test's folder, a disk in it of SIZE bytes whose first
/// DATA bytes are data, and where its store goes (not made).
fn disk_and_store(
    size: u64,
    data: u64,
) -> (
    Sshd,
    tempfile::TempDir,
    std::path::PathBuf,
    std::path::PathBuf,
) {
    let sshd = Sshd::start();
    let t = tempdir();
    let dev = t.path().join("disk");
    let store = t.path().join("store");
    make_disk(&dev, size, &[(0, data as usize)], &[]);
    (sshd, t, dev, store)
}

/// A fresh sshd, a disk of SIZE bytes whose first DATA bytes are data, and
/// its first backup into a new store: the sshd, the test's folder, the
/// disk, the store and the backup's output (exit 0).
fn backed_up(
    size: u64,
    data: u64,
) -> (
    Sshd,
    tempfile::TempDir,
    std::path::PathBuf,
    std::path::PathBuf,
    std::process::Output,
) {
    let (sshd, t, dev, store) = disk_and_store(size, data);
    let o = backup(&sshd, &dev, &store).output().unwrap();
    assert_exit(&o, 0);
    (sshd, t, dev, store, o)
}

/// The store at STORE, opened with the tests' key (what drydock reads).
fn open_store(sshd: &Sshd, store: &std::path::Path) -> drydock::backup::store::Store {
    drydock::backup::store::Store::open(store, Some(&sshd.home.join("backup.key"))).unwrap()
}

/// The file the block of content HASH is kept in.
fn block_file(sshd: &Sshd, store: &std::path::Path, hash: &str) -> std::path::PathBuf {
    open_store(sshd, store).block_path(hash)
}

/// 200 MiB of data on a 256 MiB disk; 2 of its blocks (1 %) changed
/// between two backups: the second sends those 2 blocks, at most 1.2 % of
/// the data's bytes on the wire, and the store grows by them only. Each
/// version's digest is the one a pull of the disk gives (the store holds
/// the disk, block for block). `verify` passes on both; a byte flipped in
/// a block only the first uses is found, named, and moved aside, and the
/// second still verifies. `prune --keep 1` removes the first and its
/// blocks, and the one kept still verifies.
#[test]
fn backups_share_blocks_send_only_what_changed_and_verify_finds_damage() {
    let (sshd, t, dev, store) = disk_and_store(256 * MIB, 200 * MIB);

    let o = backup(&sshd, &dev, &store).output().unwrap();
    assert_exit(&o, 0);
    let first = json(&o);
    assert_eq!(first["data_blocks"], 200, "{first}");
    assert_eq!(first["sent_blocks"], 200, "{first}");
    assert_eq!(first["consistency"], "crash-consistent", "{first}");
    let img = t.path().join("pulled");
    let o = pull(&sshd, &dev, &img);
    assert_exit(&o, 0);
    assert_eq!(
        first["digest"],
        json(&o)["digest"],
        "the store holds the disk"
    );

    let old3 = std::fs::read(&dev).unwrap()[(3 * MIB) as usize..(4 * MIB) as usize].to_vec();
    write_at(&dev, &pattern(901, MIB as usize), 3 * MIB);
    write_at(&dev, &pattern(902, 4096), 150 * MIB + 8192);
    let o = backup(&sshd, &dev, &store).output().unwrap();
    assert_exit(&o, 0);
    let second = json(&o);
    eprintln!("second backup: {second}");
    assert_eq!(second["sent_blocks"], 2, "{second}");
    let data = 200 * MIB;
    let wire = second["bytes_on_wire"].as_u64().unwrap();
    assert!(
        wire as f64 <= 0.012 * data as f64,
        "{wire} bytes on the wire for a 1 % change of {data}"
    );
    assert!(second["added_bytes"].as_u64().unwrap() <= 2 * MIB + 4096);
    std::fs::remove_file(&img).ok();
    let o = pull(&sshd, &dev, &img);
    assert_eq!(second["digest"], json(&o)["digest"]);
    let (id1, id2) = (
        first["id"].as_str().unwrap().to_string(),
        second["id"].as_str().unwrap().to_string(),
    );
    assert_ne!(id1, id2);

    let o = cmd(
        &sshd,
        &["backups", "--store", store.to_str().unwrap(), "--json"],
    );
    assert_exit(&o, 0);
    let listed = json(&o);
    let versions = listed["stores"][0]["versions"].as_array().unwrap().clone();
    assert_eq!(versions.len(), 2, "{listed}");
    assert_eq!(versions[0]["id"], id1.as_str());
    assert!(
        versions[1]["shared_bytes"].as_u64().unwrap() >= 190 * MIB / 2,
        "{listed}"
    );
    let o = cmd(&sshd, &["backups", "--store", store.to_str().unwrap()]);
    assert!(stdout(&o).contains(&id2), "{}", stdout(&o));

    for id in [&id1, &id2] {
        let o = cmd(&sshd, &["verify", id, "--store", store.to_str().unwrap()]);
        assert_exit(&o, 0);
        assert!(stdout(&o).contains("all 200 blocks"), "{}", stdout(&o));
    }

    // A flipped byte in block 3's old content: only the first uses it.
    let h = hex::encode(Sha256::digest(&old3));
    let f = block_file(&sshd, &store, &h);
    let mut bytes = std::fs::read(&f).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&f, &bytes).unwrap();
    let o = cmd(&sshd, &["verify", &id1, "--store", store.to_str().unwrap()]);
    assert_exit(&o, 1);
    assert_stderr(&o, format!("version {id1} is damaged: 1 of its 200 blocks"));
    assert_stderr(&o, format!("Versions that use them: {id1}."));
    assert!(!f.exists(), "the damaged block is moved aside");
    let o = cmd(&sshd, &["verify", &id2, "--store", store.to_str().unwrap()]);
    assert_exit(&o, 0);

    let o = cmd(
        &sshd,
        &[
            "backups",
            "prune",
            "--keep",
            "1",
            "--store",
            store.to_str().unwrap(),
            "--json",
        ],
    );
    assert_exit(&o, 0);
    let pruned = json(&o);
    assert_eq!(pruned["removed"], serde_json::json!([id1]), "{pruned}");
    let o = cmd(&sshd, &["verify", &id2, "--store", store.to_str().unwrap()]);
    assert_exit(&o, 0);
    let o = cmd(&sshd, &["verify", &id1, "--store", store.to_str().unwrap()]);
    assert_exit(&o, 2);
    assert_stderr(&o, format!("no version {id1} in"));
    // The store holds version 2's blocks and nothing else: 200 files.
    let files: usize = std::fs::read_dir(store.join("blocks"))
        .unwrap()
        .flatten()
        .map(|d| {
            std::fs::read_dir(d.path())
                .unwrap()
                .flatten()
                .filter(|f| f.file_name().to_string_lossy().ends_with(".age"))
                .count()
        })
        .sum();
    assert_eq!(files, 200);
    assert!(
        readable_by_others(&store).is_empty(),
        "{:?}",
        readable_by_others(&store)
    );
}

/// The changes a database makes: 16 regions of 160 KiB at scattered
/// 4 KiB-aligned offsets and 64 single pages over the disk. The second
/// backup sends each changed block as its changed 4 KiB pages only: its
/// bytes on the wire (both ways, the hashing included) at most 1.5 times
/// the bytes that changed, where whole blocks were 10 times. A block whose
/// version before is damaged in the store is sent whole instead, and the
/// version is still the disk exactly (the digest a pull gives; verify).
#[test]
fn a_backup_sends_only_the_changed_pages_of_a_changed_block() {
    let (sshd, t, dev, store, _) = backed_up(64 * MIB, 48 * MIB);
    let before = std::fs::read(&dev).unwrap();

    const KIB: u64 = 1024;
    for k in 0..16u64 {
        let at = k * 3 * MIB + 300 * KIB + k * 7 * 4096;
        write_at(&dev, &pattern(1000 + k, 160 * KIB as usize), at);
    }
    for j in 0..64u64 {
        write_at(&dev, &pattern(2000 + j, 4096), j * 700 * KIB + 12 * KIB);
    }
    let after = std::fs::read(&dev).unwrap();
    let changed_pages = before
        .chunks(4096)
        .zip(after.chunks(4096))
        .filter(|(a, b)| a != b)
        .count() as u64;
    let changed_blocks = before
        .chunks(MIB as usize)
        .zip(after.chunks(MIB as usize))
        .filter(|(a, b)| a != b)
        .count() as u64;
    // Block 0's version before, damaged in the store: it cannot be the
    // base of its pages.
    let f = block_file(
        &sshd,
        &store,
        &hex::encode(Sha256::digest(&before[..MIB as usize])),
    );
    let mut bytes = std::fs::read(&f).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&f, &bytes).unwrap();

    let o = backup(&sshd, &dev, &store).output().unwrap();
    assert_exit(&o, 0);
    let second = json(&o);
    eprintln!("second backup: {second}\n{}", stderr(&o));
    assert_eq!(second["sent_blocks"], changed_blocks, "{second}");
    assert_eq!(second["sent_as_pages"], changed_blocks - 1, "{second}");
    let wire = second["bytes_on_wire"].as_u64().unwrap();
    let changed = changed_pages * 4096;
    // Block 0 crossed whole (1 MiB); the rest by their pages.
    let ratio = (wire - MIB) as f64
        / (changed
            - before[..MIB as usize]
                .chunks(4096)
                .zip(after[..MIB as usize].chunks(4096))
                .filter(|(a, b)| a != b)
                .count() as u64
                * 4096) as f64;
    assert!(
        ratio <= 1.5,
        "{wire} bytes on the wire for {changed} changed bytes: {ratio:.2} x"
    );
    let img = t.path().join("pulled");
    let o = pull(&sshd, &dev, &img);
    assert_exit(&o, 0);
    assert_eq!(
        second["digest"],
        json(&o)["digest"],
        "the version is the disk"
    );
    let id = second["id"].as_str().unwrap();
    let o = cmd(&sshd, &["verify", id, "--store", store.to_str().unwrap()]);
    assert_exit(&o, 0);
}

/// A backup cut on the link lists no version (exit 75, what to do); the
/// blocks it kept show as such in `backups`; the same backup then finishes
/// without sending them again, and verifies.
#[test]
fn a_cut_backup_lists_nothing_and_the_same_backup_finishes_it() {
    let (sshd, _t, dev, store) = disk_and_store(96 * MIB, 64 * MIB);
    // After the helper's install, part way into the blocks.
    let relay = Relay::start_down(sshd.port, 24 * MIB);
    let mut c = sshd.drydock(&[
        "backup",
        &relay.host(),
        "--device",
        dev.to_str().unwrap(),
        "--store",
        store.to_str().unwrap(),
        "--accept-new-host-key",
    ]);
    c.env_remove("XDG_DATA_HOME");
    let o = output_within(c, 180, "the cut backup");
    assert_exit(&o, 75);
    assert_stderr(&o, "the backup stopped before its version was listed");
    assert_stderr(&o, "run the same command again");
    let o = cmd(
        &sshd,
        &["backups", "--store", store.to_str().unwrap(), "--json"],
    );
    assert_exit(&o, 0);
    let figures = json(&o)["stores"][0].clone();
    assert_eq!(figures["versions"], serde_json::json!([]), "{figures}");
    let kept = figures["store"]["unlisted_blocks"].as_u64().unwrap();
    assert!(kept > 0, "{figures}");

    let o = backup(&sshd, &dev, &store).output().unwrap();
    assert_exit(&o, 0);
    let r = json(&o);
    assert_eq!(r["sent_blocks"].as_u64().unwrap(), 64 - kept, "{r}");
    let id = r["id"].as_str().unwrap();
    let o = cmd(&sshd, &["verify", id, "--store", store.to_str().unwrap()]);
    assert_exit(&o, 0);
}

/// What a backup refuses, with what to do, changing nothing: a --store
/// that is some other folder, dd mode, a version that is not there.
#[test]
fn backup_bad_input_is_refused_with_what_to_do() {
    let sshd = Sshd::start();
    let t = tempdir();
    let dev = t.path().join("disk");
    make_disk(&dev, 8 * MIB, &[(0, MIB as usize)], &[]);
    let other = t.path().join("other");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(other.join("notes.txt"), "mine").unwrap();
    let o = backup(&sshd, &dev, &other).output().unwrap();
    assert_exit(&o, 3);
    assert_stderr(
        &o,
        "is not empty and is not a drydock backup store; give another --store",
    );
    assert_eq!(std::fs::read_dir(&other).unwrap().count(), 1);

    // A store URL drydock does not take, or one that names no folder:
    // said, and no folder named "s3:" or "ssh:" made where it ran.
    for (url, said) in [
        ("s3://backup@example.org/srv/drydock", "not s3://"),
        (
            "ssh://backup@example.org",
            "give the host and the store's folder on it",
        ),
    ] {
        let mut c = sshd.drydock(&[
            "backup",
            &sshd.host(),
            "--device",
            dev.to_str().unwrap(),
            "--store",
            url,
        ]);
        c.current_dir(t.path());
        let o = c.output().unwrap();
        assert_exit(&o, 2);
        assert_stderr(&o, said);
        assert_eq!(std::fs::read_dir(t.path()).unwrap().count(), 2, "{url}");
    }

    let store = t.path().join("store");
    let mut c = backup(&sshd, &dev, &store);
    c.args(["--transfer", "dd"]);
    let o = c.output().unwrap();
    assert_exit(&o, 3);
    assert_stderr(&o, "a backup needs drydock's helper");
    assert!(!store.exists(), "nothing made");

    let o = cmd(
        &sshd,
        &[
            "verify",
            "20990101T000000",
            "--store",
            other.to_str().unwrap(),
        ],
    );
    assert_exit(&o, 2);
    assert_stderr(&o, "is not a drydock backup store");
    let o = backup(&sshd, &dev, &store).output().unwrap();
    assert_exit(&o, 0);
    let o = cmd(
        &sshd,
        &[
            "verify",
            "20990101T000000",
            "--store",
            store.to_str().unwrap(),
        ],
    );
    assert_exit(&o, 2);
    assert_stderr(&o, "no version 20990101T000000 in");
}

fn restore(sshd: &Sshd, id: &str, dev: &std::path::Path, store: &std::path::Path) -> Command {
    let mut c = sshd.drydock(&[
        "restore",
        id,
        &sshd.host(),
        "--device",
        dev.to_str().unwrap(),
        "--store",
        store.to_str().unwrap(),
        "--yes",
        "--json",
    ]);
    c.env_remove("XDG_DATA_HOME");
    c
}

/// Restore onto the same disk after it changed: the disk holds the version
/// again, bit for bit, and only what differs crossed the link. A disk that
/// does not fit is refused, unchanged.
#[test]
fn restore_onto_the_same_disk_writes_only_what_differs() {
    let (sshd, t, dev, store) = disk_and_store(64 * MIB, 40 * MIB);
    let then = sha256_file(&dev);
    let o = backup(&sshd, &dev, &store).output().unwrap();
    assert_exit(&o, 0);
    let id = json(&o)["id"].as_str().unwrap().to_string();
    write_at(&dev, &pattern(77, 3 * MIB as usize), 10 * MIB + 4096);
    write_at(&dev, &pattern(78, 8192), 50 * MIB);
    assert_ne!(sha256_file(&dev), then);

    let o = restore(&sshd, &id, &dev, &store).output().unwrap();
    assert_exit(&o, 0);
    let r = json(&o);
    eprintln!("restore: {r}");
    assert_eq!(sha256_file(&dev), then, "the disk holds the version again");
    let wire = r["push"]["bytes_on_wire"].as_u64().unwrap();
    assert!(
        wire < 5 * MIB,
        "{wire} bytes on the wire for ~3 MiB that differ"
    );
    assert_eq!(r["unused_bytes"], 0);

    let small = t.path().join("small");
    make_disk(&small, 32 * MIB, &[(0, MIB as usize)], &[]);
    let before = sha256_file(&small);
    let o = restore(&sshd, &id, &small, &store).output().unwrap();
    assert_exit(&o, 3);
    assert_stderr(&o, "it does not fit; nothing was changed");
    assert_eq!(sha256_file(&small), before);
}

/// A data disk (ext4 on the whole disk: no partition table, nothing a
/// firmware could start) restored onto a larger disk: no boot proof is
/// tried (one waited out its 15 minutes on "No bootable device"), the
/// output says so, and the disk holds the version.
#[test]
fn a_data_disk_restores_onto_a_larger_disk_without_a_boot_proof() {
    let sshd = Sshd::start();
    let t = tempdir();
    let dev = t.path().join("data");
    let store = t.path().join("store");
    std::fs::File::create(&dev)
        .unwrap()
        .set_len(32 * MIB)
        .unwrap();
    let o = Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(&dev)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    write_at(&dev, &pattern(5, 3 * MIB as usize), 8 * MIB);
    let o = backup(&sshd, &dev, &store).output().unwrap();
    assert_exit(&o, 0);
    let id = json(&o)["id"].as_str().unwrap().to_string();
    let big = t.path().join("big");
    std::fs::File::create(&big)
        .unwrap()
        .set_len(64 * MIB)
        .unwrap();
    let started = Instant::now();
    let o = output_within(
        restore(&sshd, &id, &big, &store),
        300,
        "the data disk's restore",
    );
    assert_exit(&o, 0);
    let r = json(&o);
    eprintln!("restore: {r}\n{}", stderr(&o));
    assert_eq!(r["nothing_to_boot"], true, "{r}");
    assert!(r["boot_proof"].is_null(), "{r}");
    assert_stderr(&o, "has nothing to boot");
    assert!(started.elapsed() < Duration::from_secs(120));
    let (a, b) = (std::fs::read(&dev).unwrap(), std::fs::read(&big).unwrap());
    assert!(a[..] == b[..a.len()], "the disk holds the version");
}

/// Restore of a GPT disk onto a larger disk: the GPT's backup header
/// moved to the new end (sfdisk --verify finds nothing wrong), the last
/// partition grown to it, and the ext4 filesystem in it grown to fill it,
/// clean (e2fsck -f -n) and holding the same file.
#[test]
fn restore_onto_a_larger_disk_grows_the_last_partition_and_its_ext4() {
    let sshd = Sshd::start();
    let t = tempdir();
    let dev = t.path().join("disk");
    let store = t.path().join("store");
    make_disk(&dev, 64 * MIB, &[], &[]);
    let sfdisk = |disk: &std::path::Path, args: &[&str], input: &str| {
        use std::io::Write;
        let mut c = Command::new("sfdisk")
            .args(args)
            .arg(disk)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        c.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
        c.wait_with_output().unwrap()
    };
    let o = sfdisk(
        &dev,
        &["--quiet"],
        "label: gpt\nstart=2048, size=100000, type=L\n",
    );
    assert!(o.status.success(), "{}", stderr(&o));
    // An ext4 filesystem in partition 1 (100000 sectors), with a file.
    let part = |disk: &std::path::Path| format!("{}?offset={}", disk.display(), 2048 * 512);
    let run = |prog: &str, args: &[&str]| {
        let o = Command::new(prog).args(args).output().unwrap();
        assert!(o.status.success(), "{prog} {args:?}: {}", stderr(&o));
        stdout(&o)
    };
    let dev_s = dev.to_string_lossy().to_string();
    run(
        "mkfs.ext4",
        &["-q", "-F", "-E", "offset=1048576", &dev_s, "50000k"],
    );
    let data = pattern(5, 20 * MIB as usize);
    let file = t.path().join("data");
    std::fs::write(&file, &data).unwrap();
    run(
        "debugfs",
        &[
            "-w",
            "-R",
            &format!("write {} data", file.display()),
            &part(&dev),
        ],
    );
    let o = backup(&sshd, &dev, &store).output().unwrap();
    assert_exit(&o, 0);
    let id = json(&o)["id"].as_str().unwrap().to_string();

    let big = t.path().join("big");
    make_disk(&big, 96 * MIB, &[(0, 96 * MIB as usize)], &[]);
    // The disk is a file of test data: it cannot boot (the VM tier proves
    // a restore onto another disk).
    let o = restore(&sshd, &id, &big, &store)
        .arg("--no-boot-proof")
        .output()
        .unwrap();
    assert_exit(&o, 0);
    let r = json(&o);
    assert_eq!(r["boot_proof"], serde_json::Value::Null, "{r}");
    assert_eq!(r["network"], serde_json::Value::Null, "{r}");
    assert_eq!(r["gpt_relocated"], true, "{r}");
    assert_eq!(r["unused_bytes"], 0, "{r}");
    assert_eq!(r["grown"]["partition"], 1, "{r}");
    assert_eq!(r["grown"]["filesystem"], "ext4", "{r}");
    assert_eq!(r["grown"]["filesystem_grown"], true, "{r}");
    let o = sfdisk(&big, &["--verify"], "");
    assert!(
        o.status.success() && !stdout(&o).contains("not at the end"),
        "{}{}",
        stdout(&o),
        stderr(&o)
    );
    let dump = stdout(&sfdisk(&big, &["--dump"], ""));
    let last_lba = 96 * MIB / 512 - 34;
    assert!(dump.contains(&format!("last-lba: {last_lba}")), "{dump}");
    let sectors = last_lba + 1 - 2048;
    assert!(
        dump.contains(&format!("start=        2048, size=      {sectors}")),
        "{dump}"
    );
    // The filesystem fills the partition, is clean, and holds the file.
    let sb = run("dumpe2fs", &["-h", &part(&big)]);
    let field = |name: &str| -> u64 {
        sb.lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    let block = field("Block size:");
    assert_eq!(
        field("Block count:") * block,
        sectors * 512 / block * block,
        "{sb}"
    );
    run("e2fsck", &["-f", "-n", &part(&big)]);
    let back = t.path().join("back");
    run(
        "debugfs",
        &["-R", &format!("dump data {}", back.display()), &part(&big)],
    );
    assert!(std::fs::read(&back).unwrap() == data, "the file differs");
    // The human output says what was grown.
    let mut c = restore(&sshd, &id, &big, &store);
    c.args(["--transfer", "helper", "--no-boot-proof"]);
    let args: Vec<String> = c
        .get_args()
        .map(|a| a.to_string_lossy().to_string())
        .filter(|a| a != "--json")
        .collect();
    let mut c2 = sshd.drydock_bare(&args.iter().map(String::as_str).collect::<Vec<_>>());
    c2.env_remove("XDG_DATA_HOME");
    let o = c2.output().unwrap();
    assert_exit(&o, 0);
    assert!(
        stdout(&o).contains(
            "the disk is 32.00 MiB larger than the version: the GPT's backup header was moved \
             to the disk's end; partition 1 was grown by"
        ) && stdout(&o).contains("and its ext filesystem with it (resize2fs)"),
        "{}",
        stdout(&o)
    );
}

/// A restore onto a host whose network differs from the version's (given
/// with --like) is refused before anything changes when drydock cannot
/// adapt it: the new host has no default route to rewrite the gateway
/// to, or the version has no kernel kept with it to boot it sealed (this
/// machine has no /boot to record). Each says what to do instead.
#[test]
fn restore_onto_another_network_is_refused_when_it_cannot_be_adapted() {
    let (sshd, t, _dev, store, o) = backed_up(16 * MIB, 4 * MIB);
    let id = json(&o)["id"].as_str().unwrap().to_string();
    let version = serde_json::to_value(open_store(&sshd, &store).version(&id).unwrap()).unwrap();
    let nic = &version["shape"]["nic"];
    if nic["address"].is_null() || nic["gateway"].is_null() {
        eprintln!("this machine has no IPv4 default route: nothing to compare with; skipped");
        return;
    }
    let big = t.path().join("big");
    make_disk(&big, 24 * MIB, &[], &[]);
    let before = sha256_file(&big);
    let like = |gateway: &str| {
        let p = t.path().join(format!("like-{gateway}.json"));
        std::fs::write(
            &p,
            format!(
                r#"{{"firmware": "bios", "disk_bus": "virtio-blk", "disk_name": "vda",
 "nic": {{"name": "eth9", "mac": "52:54:00:aa:bb:02", "pci_slot": null,
         "address": "203.0.113.77", "prefix": 24, "gateway": {gateway}, "dns": null}}}}"#
            ),
        )
        .unwrap();
        p
    };
    let o = restore(&sshd, &id, &big, &store)
        .arg("--like")
        .arg(like("null"))
        .output()
        .unwrap();
    assert_exit(&o, 3);
    assert_stderr(
        &o,
        "has no IPv4 default route (eth9 has 203.0.113.77/24 and no gateway), so drydock \
         cannot tell which gateway",
    );
    assert_stderr(
        &o,
        "nothing was changed. Give the new host's shape with --like",
    );
    assert_eq!(sha256_file(&big), before);
    if store.join("versions").join(format!("{id}.boot")).exists() {
        eprintln!("this machine's kernel was kept with the version: the second case skipped");
        return;
    }
    let o = restore(&sshd, &id, &big, &store)
        .arg("--like")
        .arg(like("\"203.0.113.1\""))
        .output()
        .unwrap();
    assert_exit(&o, 3);
    assert_stderr(
        &o,
        "and the version has no recorded kernel to boot it sealed",
    );
    assert_stderr(&o, "nothing was written. Restore with --keep-network");
    assert_eq!(sha256_file(&big), before);
}

/// Every file under DIR, with its bytes (but the lock's holder line, which
/// every run that takes the lock writes).
fn tree(dir: &std::path::Path) -> std::collections::BTreeMap<std::path::PathBuf, Vec<u8>> {
    let mut out = std::collections::BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                todo.push(p);
            } else if p != dir.join("lock") {
                out.insert(p.clone(), std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

/// `age -d -i KEY FILE`, Debian's age command: what a user without
/// drydock has.
fn age_decrypt(key: &std::path::Path, file: &std::path::Path) -> Vec<u8> {
    let o = Command::new("age")
        .args(["-d", "-i"])
        .arg(key)
        .arg(file)
        .output()
        .expect("the age command (Debian package age; scripts/test installs it)");
    assert!(
        o.status.success(),
        "age -d {}: {}",
        file.display(),
        stderr(&o)
    );
    o.stdout
}

/// A new store is encrypted: no file of it holds a string of the disk, no
/// block is named by its content's SHA-256, and Debian's `age` with the
/// user's key file opens the store's key, a version and a block. A
/// missing key (exit 2) and another key (exit 3) are refused for backup,
/// backups, verify and restore, and change nothing; a new store without a
/// key is not made.
#[test]
fn a_store_is_encrypted_and_opens_only_with_its_key() {
    let (sshd, t, dev, store) = disk_and_store(16 * MIB, 12 * MIB);
    let secret = b"-----BEGIN OPENSSH PRIVATE KEY----- drydock-test-secret";
    for k in 0..8u64 {
        write_at(&dev, secret, k * MIB + 1000);
    }
    let o = backup(&sshd, &dev, &store).output().unwrap();
    assert_exit(&o, 0);
    let first = json(&o);
    assert_eq!(first["encrypted"], true, "{first}");
    let user_key = sshd.home.join("backup.key");
    assert!(stderr(&o).contains("made the key file"), "{}", stderr(&o));

    let files = tree(&store);
    let disk = std::fs::read(&dev).unwrap();
    let hashes: Vec<String> = disk
        .chunks(MIB as usize)
        .map(|b| hex::encode(Sha256::digest(b)))
        .collect();
    for (p, bytes) in &files {
        assert!(
            !bytes.windows(secret.len()).any(|w| w == secret),
            "{} holds the disk's text",
            p.display()
        );
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        assert!(
            !hashes.iter().any(|h| name.contains(h.as_str())),
            "{name} is named by a block's SHA-256"
        );
    }

    // With drydock gone: the user's key opens the store's key, which
    // opens the version and its blocks.
    let slot = std::fs::read_dir(store.join("keys"))
        .unwrap()
        .flatten()
        .next()
        .unwrap()
        .path();
    let store_key = t.path().join("store.key");
    std::fs::write(&store_key, age_decrypt(&user_key, &slot)).unwrap();
    let id = first["id"].as_str().unwrap();
    let version: serde_json::Value = serde_json::from_slice(&age_decrypt(
        &store_key,
        &store.join("versions").join(format!("{id}.json.age")),
    ))
    .unwrap();
    assert_eq!(version["manifest"]["blocks"][3], hashes[3].as_str());
    let block = files
        .keys()
        .find(|p| p.starts_with(store.join("blocks")) && p.extension().is_some_and(|e| e == "age"))
        .unwrap();
    let plain = zstd::decode_all(&age_decrypt(&store_key, block)[..]).unwrap();
    assert!(hashes.contains(&hex::encode(Sha256::digest(&plain))));

    // No key, another key: refused, nothing changed.
    let other = t.path().join("other.key");
    let o = Command::new("age-keygen")
        .arg("-o")
        .arg(&other)
        .output()
        .unwrap();
    assert!(o.status.success());
    let id = id.to_string();
    let storearg = store.to_str().unwrap().to_string();
    let restored = t.path().join("restored");
    std::fs::write(&restored, vec![0u8; 16 * MIB as usize]).unwrap();
    let cases: Vec<(Command, &str)> = vec![
        (backup(&sshd, &dev, &store), "backup"),
        (
            sshd.drydock_bare(&["backups", "--store", &storearg]),
            "backups",
        ),
        (
            sshd.drydock_bare(&["verify", &id, "--store", &storearg]),
            "verify",
        ),
        (restore(&sshd, &id, &restored, &store), "restore"),
    ];
    for (mut c, what) in cases {
        c.env_remove("DRYDOCK_KEY_FILE");
        let o = c.output().unwrap();
        assert_exit(&o, 2);
        assert_stderr(&o, "is encrypted: give its key file with --key-file FILE");
        c.env("DRYDOCK_KEY_FILE", &other);
        let o = c.output().unwrap();
        assert_exit(&o, 3);
        assert_stderr(&o, "is not a key of the store");
        assert_eq!(tree(&store), files, "{what} changed the store");
    }
    assert!(
        std::fs::read(&restored).unwrap().iter().all(|&b| b == 0),
        "a refused restore wrote nothing"
    );
    // A new store with no key is not made.
    let fresh = t.path().join("fresh");
    let mut c = backup(&sshd, &dev, &fresh);
    c.env_remove("DRYDOCK_KEY_FILE");
    let o = c.output().unwrap();
    assert_exit(&o, 2);
    assert_stderr(&o, "a new store is encrypted: give --key-file FILE");
    assert!(!fresh.exists());
    // The right key: the version verifies.
    let o = cmd(&sshd, &["verify", &id, "--store", &storearg]);
    assert_exit(&o, 0);
}

/// A store made before encryption (format 1: `blocks/ab/SHA256.zst`,
/// `versions/ID.json`, no keys/), here rebuilt from an encrypted one the
/// way the older drydock wrote it: listed, verified and backed up into
/// with no key, each saying it is unencrypted, and it stays so.
#[test]
fn a_store_made_before_encryption_is_read_as_it_is_and_said_unencrypted() {
    let (sshd, t, dev, store, o) = backed_up(16 * MIB, 6 * MIB);
    let id = json(&o)["id"].as_str().unwrap().to_string();
    let enc = open_store(&sshd, &store);
    let v = enc.version(&id).unwrap();
    let old = t.path().join("old");
    std::fs::create_dir_all(old.join("versions")).unwrap();
    std::fs::write(old.join("store.json"), r#"{"format":"drydock-backups/1"}"#).unwrap();
    let mut buf = vec![0u8; MIB as usize];
    for h in v.block_hashes() {
        enc.get(&h, &mut buf).unwrap();
        let dir = old.join("blocks").join(&h[..2]);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join(format!("{h}.zst")),
            zstd::bulk::compress(&buf, 3).unwrap(),
        )
        .unwrap();
    }
    std::fs::write(
        old.join("versions").join(format!("{id}.json")),
        serde_json::to_string(&v).unwrap(),
    )
    .unwrap();
    let oldarg = old.to_str().unwrap();
    let no_key = |args: &[&str]| {
        let mut c = sshd.drydock_bare(args);
        c.env_remove("DRYDOCK_KEY_FILE").env_remove("XDG_DATA_HOME");
        c.output().unwrap()
    };
    let o = no_key(&["backups", "--store", oldarg]);
    assert_exit(&o, 0);
    assert!(stdout(&o).contains("(unencrypted"), "{}", stdout(&o));
    assert!(stdout(&o).contains(&id), "{}", stdout(&o));
    let o = no_key(&["verify", &id, "--store", oldarg]);
    assert_exit(&o, 0);
    write_at(&dev, &pattern(77, 4096), 2 * MIB);
    let mut c = backup(&sshd, &dev, &old);
    c.env_remove("DRYDOCK_KEY_FILE");
    let o = c.output().unwrap();
    assert_exit(&o, 0);
    let second = json(&o);
    assert_eq!(second["encrypted"], false, "{second}");
    assert_eq!(second["sent_as_pages"], 1, "{second}");
    let h = hex::encode(Sha256::digest(
        &std::fs::read(&dev).unwrap()[2 * MIB as usize..3 * MIB as usize],
    ));
    assert!(
        old.join("blocks")
            .join(&h[..2])
            .join(format!("{h}.zst"))
            .exists()
    );
    assert!(!old.join("keys").exists());
    let o = no_key(&["verify", second["id"].as_str().unwrap(), "--store", oldarg]);
    assert_exit(&o, 0);
}

/// `backups forget` on a store of six versions taken over a year (their
/// times set as if they had been): `--dry-run` says which it keeps and
/// why and what it would free, and changes nothing; the same without it
/// removes those and frees that, and the kept versions verify. No rule at
/// all is refused.
#[test]
fn forget_keeps_what_its_rules_say_and_a_dry_run_changes_nothing() {
    let (sshd, _t, dev, store) = disk_and_store(16 * MIB, 4 * MIB);
    let times = [
        "2025-12-01T04:00:00Z",
        "2026-11-01T04:00:00Z",
        "2026-11-30T04:00:00Z",
        "2026-12-06T01:00:00Z",
        "2026-12-06T23:00:00Z",
        "2026-12-07T04:00:00Z",
    ];
    let mut ids = Vec::new();
    for (k, when) in times.iter().enumerate() {
        write_at(&dev, &pattern(301 + 2 * k as u64, MIB as usize), 8 * MIB);
        let o = backup(&sshd, &dev, &store).output().unwrap();
        assert_exit(&o, 0);
        let id = json(&o)["id"].as_str().unwrap().to_string();
        let s = open_store(&sshd, &store);
        let mut v = s.version(&id).unwrap();
        v.created = when.to_string();
        s.commit(v).unwrap();
        ids.push(id);
    }
    let storearg = store.to_str().unwrap();
    let o = cmd(&sshd, &["backups", "forget", "--store", storearg]);
    assert_exit(&o, 2);
    assert_stderr(&o, "forget needs at least one --keep-* rule");

    let before = tree(&store);
    let rules = ["--keep-daily", "2", "--keep-monthly", "3"];
    let mut args = vec![
        "backups",
        "forget",
        "--store",
        storearg,
        "--json",
        "--dry-run",
    ];
    args.extend(rules);
    let o = cmd(&sshd, &args);
    assert_exit(&o, 0);
    let dry = json(&o);
    eprintln!("{dry}");
    // Days: 12-07, then 12-06's newest; months: December's newest (12-07),
    // November's (11-30), 2025-12. 11-01 and 12-06 01:00 go.
    let kept: Vec<&str> = dry["kept"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(kept, vec![&ids[5], &ids[4], &ids[2], &ids[0]], "{dry}");
    assert_eq!(
        dry["decisions"][0]["reasons"],
        serde_json::json!(["daily", "monthly"])
    );
    assert_eq!(dry["decisions"][2]["keep"], false);
    assert_eq!(
        dry["decisions"][3]["reasons"],
        serde_json::json!(["monthly"])
    );
    let would = dry["freed_bytes"].as_u64().unwrap();
    assert!(would >= 2 * MIB, "{dry}");
    assert_eq!(tree(&store), before, "a dry run changed the store");
    let o = cmd(
        &sshd,
        &[
            "backups",
            "forget",
            "--store",
            storearg,
            "--dry-run",
            "--keep-last",
            "1",
        ],
    );
    assert!(stdout(&o).contains("would remove"), "{}", stdout(&o));

    let mut args = vec!["backups", "forget", "--store", storearg, "--json"];
    args.extend(rules);
    let o = cmd(&sshd, &args);
    assert_exit(&o, 0);
    let done = json(&o);
    assert_eq!(done["freed_bytes"].as_u64().unwrap(), would, "{done}");
    assert_eq!(done["removed"], serde_json::json!([&ids[1], &ids[3]]));
    let left: Vec<String> = open_store(&sshd, &store)
        .versions()
        .unwrap()
        .into_iter()
        .map(|v| v.id)
        .collect();
    assert_eq!(
        left,
        vec![
            ids[0].clone(),
            ids[2].clone(),
            ids[4].clone(),
            ids[5].clone()
        ]
    );
    for id in &left {
        let o = cmd(&sshd, &["verify", id, "--store", storearg]);
        assert_exit(&o, 0);
    }
}

/// A store another run holds: a backup and a forget into it are refused
/// (exit 3) naming the holder, and change nothing; once the holder is gone
/// (its lock goes with it, as when a run is killed) the backup runs.
#[test]
fn a_store_in_use_is_refused_naming_its_holder_and_freed_by_its_end() {
    let (sshd, _t, dev, store, _) = backed_up(8 * MIB, 2 * MIB);
    let before = tree(&store);
    let held = open_store(&sshd, &store).lock().unwrap();
    assert!(
        std::fs::read_to_string(store.join("lock"))
            .unwrap()
            .contains("drydock (pid")
    );
    write_at(&dev, &pattern(9, 4096), 0);
    let o = backup(&sshd, &dev, &store).output().unwrap();
    assert_exit(&o, 3);
    assert_stderr(
        &o,
        format!("is in use by drydock (pid {})", std::process::id()),
    );
    let o = cmd(
        &sshd,
        &[
            "backups",
            "forget",
            "--keep-last",
            "1",
            "--store",
            store.to_str().unwrap(),
        ],
    );
    assert_exit(&o, 3);
    assert_stderr(&o, "is in use by drydock");
    assert_eq!(tree(&store), before, "nothing changed");
    drop(held);
    let o = backup(&sshd, &dev, &store).output().unwrap();
    assert_exit(&o, 0);
}
