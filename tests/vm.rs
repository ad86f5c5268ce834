//! The VM tier: a real Debian 12 VPS image built by vm-fixtures/ from
//! Debian's packages, booted in a real QEMU.

mod common;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn fixture(release: u32) -> (PathBuf, PathBuf) {
    let dir = PathBuf::from(
        std::env::var("DRYDOCK_FIXTURES").unwrap_or_else(|_| "/var/cache/drydock-fixtures".into()),
    );
    let img = dir.join(format!("debian-{release}.raw"));
    let key = dir.join(format!("debian-{release}.key"));
    assert!(
        dir.join(format!("debian-{release}.raw.ok")).exists(),
        "the Debian {release} fixture is not built: run vm-fixtures/build-debian {release} (scripts/test does)"
    );
    (img, key)
}

fn ssh_guest(port: u16, key: &std::path::Path, cmd: &str) -> std::process::Output {
    Command::new("ssh")
        .args(["-p", &port.to_string(), "-i"])
        .arg(key)
        .args([
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "LogLevel=ERROR",
            "root@127.0.0.1",
            cmd,
        ])
        .output()
        .unwrap()
}

fn qemu_running_in(dir: &std::path::Path) -> bool {
    let out = Command::new("pgrep")
        .args(["-af", "qemu-system"])
        .output()
        .unwrap();
    stdout(&out).contains(dir.to_str().unwrap())
}

#[test]
fn boot_gives_a_shell_on_a_copy_and_powers_off_on_ctrl_c() {
    let (img, key) = fixture(12);
    let before = sha256_file(&img);
    let t = tempdir();
    let dir = t.path().join("vm");
    let mut child = Command::new(env!("CARGO_BIN_EXE_drydock"))
        .args([
            "boot",
            img.to_str().unwrap(),
            "--memory",
            "1G",
            "--cpus",
            "2",
            "--json",
            "--dir",
            dir.to_str().unwrap(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    // The first stdout line is the JSON that says how to reach the guest.
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    let started = Instant::now();
    out.read_line(&mut line).unwrap();
    assert!(
        !line.is_empty(),
        "drydock boot ended without saying how to reach the guest"
    );
    let info: serde_json::Value = serde_json::from_str(&line).unwrap();
    eprintln!("guest up after {:.0?}", started.elapsed());
    let port = info["ssh_port"].as_u64().unwrap() as u16;
    assert_eq!(
        info["accel"],
        if std::path::Path::new("/dev/kvm").exists()
            && std::fs::read_to_string("/proc/cpuinfo")
                .unwrap()
                .contains(" vmx")
        {
            "kvm"
        } else {
            "tcg"
        }
    );

    let o = ssh_guest(
        port,
        &key,
        "grep VERSION_ID /etc/os-release; echo changed > /root/marker; sync",
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o).trim(), "VERSION_ID=\"12\"");

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
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(status.success(), "{err}");
    assert!(err.contains("the guest powered off"), "{err}");
    assert!(!qemu_running_in(&dir), "QEMU outlived drydock boot");
    // The change went to the overlay; the fixture is as it was.
    assert!(dir.join("overlay.qcow2").exists());
    assert_eq!(
        sha256_file(&img),
        before,
        "drydock boot wrote to the base image"
    );
}

#[test]
fn a_guest_that_never_answers_is_reported_with_its_serial_console() {
    // A disk with no bootable system: QEMU's firmware finds nothing to boot.
    let t = tempdir();
    let img = t.path().join("blank.raw");
    make_disk(&img, 64 << 20, &[], &[]);
    let dir = t.path().join("vm");
    let o = Command::new(env!("CARGO_BIN_EXE_drydock"))
        .args([
            "boot",
            img.to_str().unwrap(),
            "--memory",
            "256M",
            "--cpus",
            "1",
            "--wait",
            "20",
            "--dir",
            dir.to_str().unwrap(),
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_exit(&o, 1);
    assert_stderr(
        &o,
        "the guest's SSH server did not answer within 20s; serial console (last lines):",
    );
    assert!(!qemu_running_in(&dir), "QEMU outlived drydock boot");
}
