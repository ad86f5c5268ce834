//! Backups of a live VPS, verified by booting them, and restores onto another VPS.

use super::*;

/// Backups of the fixture VPS while it serves: the first sends its data,
/// the second (after 20 MiB of new data) only what changed; each version
/// is proven to boot (`verify --boot`: through its own boot loader, in a
/// sealed VM, sshd answering, / read-write, init at its target), and a
/// version holds the disk as it was (the newer one has the marker, the
/// older one does not, read from the images the boots were laid out as).
#[test]
#[ignore = "long tier: scripts/test-zoo runs it"]
fn zoo_backups_of_a_live_vps_are_incremental_and_boot() {
    let vps = Vps::start(12);
    let home = tempdir();
    let store = home.path().join("store");
    let host = vps.host();
    let key = vps.key.to_str().unwrap().to_string();
    let backup = |extra: &[&str]| {
        let mut args = vec![
            "backup",
            &host,
            "-i",
            &key,
            "--accept-new-host-key",
            "--store",
            store.to_str().unwrap(),
            "--json",
        ];
        args.extend_from_slice(extra);
        let o = vps.drydock(home.path(), &args).output().unwrap();
        assert_exit(&o, 0);
        eprintln!("{}", stderr(&o));
        json(&o)
    };
    // A service of the VPS: recorded with each version, and checked in its
    // boot proof.
    vps.ssh(
        "printf '[Service]\\nExecStart=/bin/sleep infinity\\n[Install]\\nWantedBy=multi-user.target\\n' \
         > /etc/systemd/system/drydock-backed.service && systemctl daemon-reload \
         && systemctl enable --now drydock-backed.service",
    );
    let t0 = Instant::now();
    let first = backup(&[]);
    eprintln!("first backup ({:?}): {first}", t0.elapsed());
    assert_eq!(first["consistency"], "crash-consistent");
    let data = first["data_blocks"].as_u64().unwrap();
    // Every data block, but those the disk holds twice (sent once).
    let sent1 = first["sent_blocks"].as_u64().unwrap();
    assert!(sent1 <= data && sent1 >= data * 9 / 10, "{first}");
    // fsfreeze flushes ext4's journal to its place, so that the marker is
    // in the copy's files without a journal replay (debugfs reads below
    // do none).
    vps.ssh(
        "head -c 20M /dev/urandom > /root/backup-test && echo second > /etc/drydock-backup-mark \
         && sync && fsfreeze -f / && fsfreeze -u /",
    );
    let t0 = Instant::now();
    let second = backup(&[]);
    eprintln!("second backup ({:?}): {second}", t0.elapsed());
    let sent = second["sent_blocks"].as_u64().unwrap();
    assert!(
        (20..data / 4).contains(&sent),
        "{sent} blocks sent of {data} after a 20 MiB change"
    );
    for v in [&first, &second] {
        let id = v["id"].as_str().unwrap();
        let o = vps
            .drydock(
                home.path(),
                &[
                    "verify",
                    id,
                    "--store",
                    store.to_str().unwrap(),
                    "--boot",
                    "-i",
                    &key,
                    "--json",
                ],
            )
            .output()
            .unwrap();
        assert_exit(&o, 0);
        let r = json(&o);
        eprintln!("verify --boot {id}: {r}");
        assert!(
            r["boot"]["os"]
                .as_str()
                .unwrap()
                .contains("Debian GNU/Linux 12"),
            "{r}"
        );
        assert!(
            ["running", "degraded"].contains(&r["boot"]["init"].as_str().unwrap()),
            "{r}"
        );
        assert!(
            r["boot"]["root"]
                .as_str()
                .unwrap()
                .split(',')
                .any(|o| o == "rw")
        );
        let services = &r["boot"]["services"];
        let up = str_list(services, "up");
        for u in ["drydock-backed.service", "ssh.service"] {
            assert!(
                up.contains(&u.to_string()),
                "{u} not up in the boot of {id}: {r}"
            );
        }
        assert_eq!(services["failed"], serde_json::json!([]), "{r}");
    }
    // The versions as laid out for their boots: the marker only in the
    // second.
    let mark = |v: &serde_json::Value| {
        let img = home
            .path()
            .join("state/drydock/backups-boot")
            .join(format!("store-{}.raw", v["id"].as_str().unwrap()));
        let o = Command::new("debugfs")
            .args(["-R", "cat /etc/drydock-backup-mark"])
            .arg(format!("{}?offset={}", img.display(), 2048 * 512))
            .output()
            .unwrap();
        stdout(&o).trim().to_string()
    };
    assert_eq!(mark(&first), "");
    assert_eq!(mark(&second), "second");

    // --freeze: a live pass sends the change while the VPS serves; frozen,
    // only what changed since crosses.
    vps.ssh("head -c 16M /dev/urandom > /root/backup-test-3 && sync");
    let t0 = Instant::now();
    let third = backup(&["--freeze"]);
    eprintln!("--freeze backup ({:?}): {third}", t0.elapsed());
    assert_eq!(third["consistency"], "frozen");
    let frozen = third["sent_while_frozen"].as_u64().unwrap();
    let sent = third["sent_blocks"].as_u64().unwrap();
    assert!(sent >= 16 && frozen < sent / 2, "{third}");
    assert!(third["frozen_seconds"].as_f64().unwrap() > 0.0, "{third}");
    // The store was encrypted, boot files too.
    let boot = store
        .join("versions")
        .join(format!("{}.boot", third["id"].as_str().unwrap()));
    assert!(
        boot.join("vmlinuz.age").exists(),
        "{:?}",
        std::fs::read_dir(&boot)
    );
    assert!(!boot.join("vmlinuz").exists());
}

/// Disaster recovery onto a new VPS: the static-network VPS (198.51.100.45)
/// is backed up live twice; the older version is restored, through a
/// rescue system, onto a second VPS with a larger disk and another address
/// (203.0.113.77, another MAC). Before anything is written, the copy is
/// adapted in a sealed boot (network rewritten, partition and filesystem
/// grown) and proven to boot shaped as the new VPS. The new VPS then boots
/// its disk and answers on its new address, with the older version's data
/// and its root filesystem grown to the disk.
#[test]
#[ignore = "long tier: scripts/test-zoo runs it"]
fn zoo_restore_onto_a_second_vps_with_a_larger_disk_and_another_address() {
    restore_onto_a_second_vps(
        "static",
        &["/etc/systemd/network/10-static.network"],
        "ext4",
        "and its ext filesystem with it (resize2fs)",
    );
}

/// The same with an XFS root on DHCP: XFS grows only while mounted, in
/// the sealed boot that adapts the copy (no network file names the old
/// address).
#[test]
#[ignore = "long tier: scripts/test-zoo runs it"]
fn zoo_restore_of_an_xfs_vps_onto_a_larger_disk_grows_its_root_mounted() {
    restore_onto_a_second_vps(
        "xfs",
        &[],
        "xfs",
        "mounted in a sealed boot of the copy (xfs on /dev/vda1 (/))",
    );
}

/// The same with a btrfs root in subvolumes (@ at /, @home), as several
/// providers lay it out: grown while mounted, whichever subvolume holds it.
#[test]
#[ignore = "long tier: scripts/test-zoo runs it"]
fn zoo_restore_of_a_btrfs_vps_onto_a_larger_disk_grows_its_root_mounted() {
    restore_onto_a_second_vps(
        "btrfs",
        &[],
        "btrfs",
        "mounted in a sealed boot of the copy (btrfs on /dev/vda1 (",
    );
}
