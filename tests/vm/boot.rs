//! `drydock boot`: a local VM of an image, sealed, and its end.

use super::*;

/// Also where `boot` keeps a VM without `--dir`: under
/// `$XDG_STATE_HOME/drydock/boots/IMAGE-TIME` (it was once
/// `drydock/drydock/boots`, and only tests with `--dir` ran).
#[test]
fn a_guest_that_never_answers_is_reported_with_its_serial_console() {
    // A disk with no bootable system: QEMU's firmware finds nothing to boot,
    // says so on the console, and drydock stops there, not at --wait.
    let t = tempdir();
    let img = t.path().join("blank.raw");
    make_disk(&img, 64 << 20, &[], &[]);
    let state = t.path().join("state");
    let mut o = Command::new(env!("CARGO_BIN_EXE_drydock"));
    o.args([
        "boot",
        img.to_str().unwrap(),
        "--memory",
        "256M",
        "--cpus",
        "1",
        "--wait",
        "300",
        "--services",
    ])
    .env("XDG_STATE_HOME", &state)
    .stdin(Stdio::null());
    let started = Instant::now();
    let o = o.output().unwrap();
    assert_exit(&o, 1);
    assert_stderr(
        &o,
        "the guest will not come up: the firmware found no bootable",
    );
    assert_stderr(&o, "serial console (last lines):");
    assert!(
        started.elapsed() < Duration::from_secs(120),
        "it waited {:?}",
        started.elapsed()
    );
    let boots: Vec<_> = std::fs::read_dir(state.join("drydock/boots"))
        .expect("no $XDG_STATE_HOME/drydock/boots")
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(boots.len(), 1, "{boots:?}");
    let dir = &boots[0];
    let name = dir.file_name().unwrap().to_str().unwrap();
    assert!(name.starts_with("blank.raw-"), "{name}");
    assert!(
        dir.join("serial.log").exists(),
        "{:?}",
        std::fs::read_dir(dir)
    );
    assert!(!qemu_running_in(dir), "QEMU outlived drydock boot");
    // The overlay and the logs of a copy of a server are its owner's only.
    assert_eq!(readable_by_others(dir), Vec::<String>::new());
}

/// `drydock boot`: the VPS itself is a `drydock boot --services` of the
/// ifupdown fixture, where the zoo's app runs; a pulled copy of it booted
/// without --services holds the app back and says so, gives a shell,
/// writes to an overlay only, and powers off on Ctrl-C; an image with no
/// recorded kernel is refused with what to do.
#[test]
fn boot_gives_a_shell_on_a_copy_holds_its_services_back_and_powers_off_on_ctrl_c() {
    let vps = Vps::start_variant("ifupdown");
    let home = tempdir();
    // --services: the image's own services run.
    assert_eq!(
        vps.ssh("systemctl is-active drydock-zoo-app.service; true")
            .trim(),
        "active"
    );
    assert!(
        vps.boot_log()
            .contains("services: the image's own services run (--services)"),
        "{}",
        vps.boot_log()
    );
    let img = home.path().join("vps.img");
    let o = vps
        .drydock(
            home.path(),
            &[
                "pull",
                &vps.host(),
                "-i",
                vps.key.to_str().unwrap(),
                "--accept-new-host-key",
                "--output",
                img.to_str().unwrap(),
                "--live",
            ],
        )
        .output()
        .unwrap();
    assert_exit(&o, 0);
    assert_stderr(&o, "`drydock boot` holds its services back");
    let before = sha256_file(&img);

    let dir = home.path().join("boot");
    let err = home.path().join("boot.err");
    let (mut child, info) = boot_json(&img, &dir, Some(&err), None, false);
    let said = std::fs::read_to_string(&err).unwrap();
    let port = info["ssh_port"].as_u64().unwrap() as u16;
    assert_eq!(
        info["accel"],
        if std::path::Path::new("/dev/kvm").exists()
            && std::fs::read_to_string("/proc/cpuinfo")
                .unwrap()
                .split_whitespace()
                .any(|f| f == "vmx" || f == "svm")
        {
            "kvm"
        } else {
            "tcg"
        }
    );
    let o = ssh_guest(
        port,
        &vps.key,
        "grep VERSION_ID /etc/os-release; systemctl is-active drydock-zoo-app.service; echo changed > /root/marker; sync",
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), "VERSION_ID=\"12\"\ninactive\n", "{said}");
    assert!(said.contains("services: held back;"), "{said}");
    assert!(said.contains("drydock-zoo-app.service"), "{said}");
    assert!(
        said.contains("network: sealed; allowed: deb.debian.org"),
        "{said}"
    );

    // Ctrl-C: the guest is powered off and QEMU is gone.
    let t0 = Instant::now();
    let _ = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(150),
            "drydock boot did not stop after Ctrl-C"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let said = std::fs::read_to_string(&err).unwrap();
    assert!(status.success(), "{said}");
    assert!(said.contains("the guest powered off"), "{said}");
    assert!(!qemu_running_in(&dir), "QEMU outlived drydock boot");
    // The change went to the overlay; the image is as it was.
    assert!(dir.join("overlay.qcow2").exists());
    assert_eq!(sha256_file(&img), before, "drydock boot wrote to the image");

    // An image drydock did not pull: refused, with the way on.
    let bare = home.path().join("bare.img");
    std::fs::hard_link(&img, &bare).unwrap();
    let o = vps
        .drydock(
            home.path(),
            &[
                "boot",
                bare.to_str().unwrap(),
                "--dir",
                home.path().join("b").to_str().unwrap(),
            ],
        )
        .output()
        .unwrap();
    assert_exit(&o, 3);
    assert_stderr(&o, "has no recorded kernel");
    assert_stderr(&o, "or boot with --services");
}
