use super::*;

/// The facts script's "diskid" section, as guests of this machine's QEMU
/// answered it: a disk on virtio-scsi named as Hetzner Cloud's are
/// (device_id drive-scsi0-0-0-0), an NVMe disk and a virtio-blk disk with
/// serials.
const SCSI: &str = include_str!("virtio-scsi.facts");
const NVME: &str = include_str!("nvme.facts");
const BLK: &str = include_str!("virtio-blk.facts");

fn lines(s: &str) -> Vec<String> {
    s.lines()
        .filter(|l| !l.is_empty() && !l.starts_with("@@"))
        .map(str::to_string)
        .collect()
}

#[test]
fn a_hetzner_like_scsi_disk_keeps_its_vpd_identity() {
    let id = DiskId::from_lines(&lines(SCSI), "sda", DiskBus::VirtioScsi).unwrap();
    assert_eq!(id.vendor.as_deref(), Some("QEMU"));
    assert_eq!(id.product.as_deref(), Some("QEMU HARDDISK"));
    assert_eq!(id.device_id.as_deref(), Some("drive-scsi0-0-0-0"));
    assert_eq!(id.serial, None);
    assert_eq!(
        id.qemu_props(DiskBus::VirtioScsi),
        ",vendor=QEMU,product=QEMU HARDDISK,device_id=drive-scsi0-0-0-0"
    );
    assert_eq!(
        id.links,
        [
            (
                "by-id/scsi-0QEMU_QEMU_HARDDISK_drive-scsi0-0-0-0".to_string(),
                "sda".to_string()
            ),
            (
                "by-id/scsi-0QEMU_QEMU_HARDDISK_drive-scsi0-0-0-0-part1".into(),
                "sda1".into()
            ),
            ("by-path/pci-0000:00:02.0-scsi-0:0:0:0".into(), "sda".into()),
            (
                "by-path/pci-0000:00:02.0-scsi-0:0:0:0-part1".into(),
                "sda1".into()
            ),
        ]
    );
    assert_eq!(
        id.udev_rule().lines().nth(1).unwrap(),
        "SUBSYSTEM==\"block\", KERNEL==\"sda\", SYMLINK+=\"disk/by-id/scsi-0QEMU_QEMU_HARDDISK_drive-scsi0-0-0-0\""
    );
}

#[test]
fn virtio_and_nvme_disks_keep_their_serials() {
    let blk = DiskId::from_lines(&lines(BLK), "vda", DiskBus::VirtioBlk).unwrap();
    assert_eq!(blk.qemu_props(DiskBus::VirtioBlk), ",serial=vol-0123456789");
    assert!(
        blk.links
            .contains(&("by-id/virtio-vol-0123456789-part1".into(), "vda1".into()))
    );
    let nvme = DiskId::from_lines(&lines(NVME), "nvme0n1", DiskBus::Nvme).unwrap();
    assert_eq!(nvme.qemu_props(DiskBus::Nvme), ",serial=nvme-sn-0042");
    // Its partitions (nvme0n1p1) are its own; its EUI/model names are
    // made by the rule where QEMU cannot.
    assert!(nvme.links.contains(&(
        "by-id/nvme-QEMU_NVMe_Ctrl_nvme-sn-0042_1-part1".into(),
        "nvme0n1p1".into()
    )));
    assert_eq!(nvme.links.len(), 8);
}

#[test]
fn what_the_vps_says_is_checked_before_it_reaches_qemu_or_udev() {
    let hostile = [
        "link by-id/virtio-x\",RUN+=\"/bin/sh vda",
        "link by-id/../../etc/passwd vda",
        "link by-id/fine-name vda1",
        "link by-id/other-disk sdb",
        "link by-id/fine-name-too vda;reboot",
        "prop vda ID_SERIAL=abc,drive=evil",
        "prop vdb ID_SERIAL=not-ours",
    ]
    .map(String::from);
    let id = DiskId::from_lines(&hostile, "vda", DiskBus::VirtioBlk).unwrap();
    assert_eq!(id.serial, None, "a comma would add a QEMU option");
    assert_eq!(
        id.links,
        [("by-id/fine-name".to_string(), "vda1".to_string())]
    );
    assert_eq!(id.qemu_props(DiskBus::VirtioBlk), "");
    // A serial longer than virtio's 20 bytes is not given either.
    let long = ["prop vda ID_SERIAL=0123456789abcdefghijk".to_string()];
    assert_eq!(DiskId::from_lines(&long, "vda", DiskBus::VirtioBlk), None);
}

#[test]
fn the_check_names_what_grub_fstab_and_crypttab_need_that_is_not_here() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let here = d.join("here");
    std::fs::write(&here, "").unwrap();
    let fstab = d.join("fstab");
    std::fs::write(
        &fstab,
        format!(
            "UUID=1234 / ext4 defaults 0 1\n/dev/disk/by-id/scsi-0HC_Volume_1 /mnt/vol ext4 discard,nofail 0 2\n/dev/disk/by-id/scsi-0HC_Volume_2 /srv ext4 defaults 0 2\n{} /x ext4 defaults 0 2\n",
            here.display()
        ),
    )
    .unwrap();
    let crypttab = d.join("crypttab");
    std::fs::write(&crypttab, "data /dev/disk/by-id/virtio-gone none luks\n").unwrap();
    let script = CHECK_SCRIPT
        .replace("/etc/fstab", fstab.to_str().unwrap())
        .replace("/etc/crypttab", crypttab.to_str().unwrap());
    let o = std::process::Command::new("sh")
        .arg("-c")
        .arg(&script)
        .output()
        .unwrap();
    assert!(o.status.success());
    let said = String::from_utf8_lossy(&o.stdout);
    // The nofail volume may be missing; the other is not.
    assert_eq!(
        said.lines()
            .filter(|l| !l.contains("grub"))
            .collect::<Vec<_>>(),
        [
            "missing /dev/disk/by-id/scsi-0HC_Volume_2 (/etc/fstab)",
            "missing /dev/disk/by-id/virtio-gone (/etc/crypttab)"
        ]
        .map(|l| l
            .replace("/etc/fstab", fstab.to_str().unwrap())
            .replace("/etc/crypttab", crypttab.to_str().unwrap()))
    );
}

#[test]
fn the_worker_disk_is_given_the_identity_on_its_bus() {
    let line = |bus, id: &DiskId| {
        crate::vm::cmdline::drive_args(std::path::Path::new("/r/o.qcow2"), "qcow2", bus, Some(id))
            .into_iter()
            .map(|s| s.into_string().unwrap())
            .collect::<Vec<_>>()
            .join(" ")
    };
    let scsi = DiskId::from_lines(&lines(SCSI), "sda", DiskBus::VirtioScsi).unwrap();
    assert!(
        line(DiskBus::VirtioScsi, &scsi).ends_with(
            "-device virtio-scsi-pci,id=scsi0 -device scsi-hd,drive=disk0,bus=scsi0.0,vendor=QEMU,product=QEMU HARDDISK,device_id=drive-scsi0-0-0-0"
        ),
        "{}",
        line(DiskBus::VirtioScsi, &scsi)
    );
    let blk = DiskId::from_lines(&lines(BLK), "vda", DiskBus::VirtioBlk).unwrap();
    assert!(
        line(DiskBus::VirtioBlk, &blk)
            .ends_with("if=none,id=disk0 -device virtio-blk-pci,drive=disk0,serial=vol-0123456789")
    );
    let nvme = DiskId::from_lines(&lines(NVME), "nvme0n1", DiskBus::Nvme).unwrap();
    assert!(line(DiskBus::Nvme, &nvme).ends_with("-device nvme,drive=disk0,serial=nvme-sn-0042"));
    let wwn = DiskId {
        wwn: Some(0x5000c500a1b2c3d4),
        ..DiskId::default()
    };
    assert!(
        line(DiskBus::Sata, &wwn).ends_with("ide-hd,drive=disk0,bus=ide.0,wwn=0x5000c500a1b2c3d4")
    );
}
