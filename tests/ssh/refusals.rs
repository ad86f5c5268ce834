//! What is refused before anything changes, and says what to do.

use super::*;

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
    // A "folder" that is a file: said as such, not as missing.
    let file = t.path().join("a file");
    std::fs::write(&file, "mine").unwrap();
    let o = pull(&sshd, &dev, &file.join("x.img"));
    assert_exit(&o, 3);
    assert_stderr(
        &o,
        format!(
            "--output: {} is a file, not a folder; choose another path with --output. Nothing was changed",
            file.display()
        ),
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "mine");

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
