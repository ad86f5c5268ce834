//! Cuts, kills and signals: a pull resumes where it stopped, a push is finished by the same push, nothing is left on the host.

use super::*;

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

/// The recipe, cut for real: blocks whose new pages are two runs
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
