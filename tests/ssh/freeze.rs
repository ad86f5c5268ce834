//! `freeze` and `thaw` on real filesystems (loop devices).

use super::*;

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
