//! Pulls and pushes that end exact: round trips in both modes, updates of an image, deltas, scattered pages.

use super::*;

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
