//! The zoo: VPS layouts providers ship (networks, disks, file systems, init systems), each upgraded.

use super::*;

/// Hetzner Cloud's layout (issue 32): the disk on virtio-scsi, grub-pc's
/// install device its by-id name, a static IPv6 /64 with an fe80::1
/// gateway. The default path (rehearsal, proof, carry): in the worker VM
/// the disk has the VPS's by-id names, so grub-pc's own reconfiguration
/// (which runs grub-install on that name, as its postinst does in a
/// release upgrade) succeeds; the VPS comes back with its IPv6.
#[test]
#[ignore = "zoo tier (long): scripts/test-zoo runs it"]
fn zoo_hetzner_like_virtio_scsi_grub_by_id_and_ipv6() {
    let vps = Vps::start_variant("hetzner");
    let home = tempdir();
    let name = "scsi-0QEMU_QEMU_HARDDISK_drive-scsi0-0-0-0";
    let on_vps = vps.ssh("ls -l /dev/disk/by-id/");
    eprintln!("on the VPS:\n{on_vps}");
    assert!(on_vps.contains(&format!("{name} -> ../../sda")), "{on_vps}");
    let ipv6 = "ip -6 addr show dev eth0 | grep -c 'inet6 2001:db8:4f8:1234::1/64'; ip -6 route show default | grep -c 'via fe80::1'";
    assert_eq!(
        vps.ssh(ipv6).split_whitespace().collect::<Vec<_>>(),
        ["1", "1"]
    );
    let cmd = format!(
        "{CHANGE}; ls -l /dev/disk/by-id/; debconf-show grub-pc | grep install_devices; \
         DEBIAN_FRONTEND=noninteractive dpkg-reconfigure grub-pc"
    );
    let o = vps
        .upgrade_as_users_run_it(home.path(), &cmd, &[])
        .output()
        .unwrap();
    eprintln!("{}", stderr(&o));
    assert_exit(&o, 0);
    let r = json(&o);
    let t = Instant::now();
    let log =
        std::fs::read_to_string(std::path::Path::new(r["run"].as_str().unwrap()).join("run.log"))
            .unwrap();
    eprintln!("in the worker VM:\n{log}");
    assert!(log.contains(&format!("{name} -> ../../sda")), "{log}");
    assert!(
        log.contains("Installation finished. No error reported."),
        "{log}"
    );
    assert!(
        !log.contains("does not exist, so cannot grub-install"),
        "{log}"
    );
    assert_eq!(
        vps.ssh("cat /etc/drydock-was-here").trim(),
        "upgraded offline by drydock"
    );
    assert_eq!(
        vps.ssh(ipv6).split_whitespace().collect::<Vec<_>>(),
        ["1", "1"]
    );
    assert!(
        vps.ssh("debconf-show grub-pc")
            .contains(&format!("/dev/disk/by-id/{name}"))
    );
    // Nothing drydock wrote for the worker's disk names is on the VPS.
    assert_eq!(
        vps.ssh("ls /etc/udev/rules.d/99-drydock-disk-identity.rules 2>/dev/null | wc -l")
            .trim(),
        "0"
    );
    vps.zoo_app_intact();
    zoo_row("debian-12-hetzner", &r, t.elapsed());
}

/// A DigitalOcean-like layout (issue 32): a public NIC with a static
/// address and an anchor address, and a private network on a second NIC,
/// both matched by MAC. The worker VM has both NICs (MACs, slots), so both
/// configurations come up there (the --run's `ip` shows the private
/// address) and the service proof passes; the VPS comes back with all
/// three addresses.
#[test]
#[ignore = "zoo tier (long): scripts/test-zoo runs it"]
fn zoo_do_like_two_nics_anchor_and_private_network() {
    let vps = Vps::start_variant("do");
    let home = tempdir();
    let addrs = "ip -4 -o addr show | awk '{print $4}' | sort | tr '\\n' ' '";
    let want = "10.110.0.2/20 10.17.0.5/16 127.0.0.1/8 203.0.113.45/24 ";
    assert_eq!(vps.ssh(addrs), want);
    let cmd = format!("{CHANGE}; ip -4 -o addr show");
    let o = vps
        .upgrade_as_users_run_it(home.path(), &cmd, &[])
        .output()
        .unwrap();
    eprintln!("{}", stderr(&o));
    assert_exit(&o, 0);
    let r = json(&o);
    let t = Instant::now();
    let log =
        std::fs::read_to_string(std::path::Path::new(r["run"].as_str().unwrap()).join("run.log"))
            .unwrap();
    assert!(
        log.contains("inet 10.110.0.2/20"),
        "the private NIC in the worker VM:\n{log}"
    );
    assert!(
        log.contains("inet 10.17.0.5/16"),
        "the anchor address in the worker VM:\n{log}"
    );
    assert_eq!(r["service_proof"]["failed"], serde_json::json!([]), "{r}");
    assert_eq!(r["services_after"]["failed"], serde_json::json!([]), "{r}");
    assert_eq!(vps.ssh(addrs), want);
    vps.zoo_app_intact();
    zoo_row("debian-12-do", &r, t.elapsed());
}

/// Boot parity, network: a VPS with a static address and no DHCP at all
/// (matched by its MAC). The worker VM must come up with the VPS's MAC on a
/// network shaped as its subnet, gateway and nameserver, or the --run
/// command (run over SSH to that address) never starts; inside, it proves
/// the address, name resolution through the VPS's nameserver and a
/// connection through its gateway to Debian's mirror, and leaves what it
/// saw on the disk, which the VPS then has after its reboot.
#[test]
#[ignore = "zoo tier (long): scripts/test-zoo runs it"]
fn zoo_static_network_vps_is_upgraded_in_a_worker_vm_shaped_like_it() {
    let vps = Vps::start_variant("static");
    let home = tempdir();
    assert!(
        vps.ssh("ip -4 -o addr show")
            .contains("inet 198.51.100.45/24"),
        "the static fixture did not come up on its address"
    );
    let check = "set -e; ip -4 -o addr show | grep -o 'inet 198.51.100.45/24' > /etc/drydock-net-check; \
                 cat /sys/class/net/e*/address >> /etc/drydock-net-check; \
                 getent hosts deb.debian.org >/dev/null && echo resolved >> /etc/drydock-net-check; \
                 exec 3<>/dev/tcp/deb.debian.org/80; \
                 printf 'HEAD /debian/ HTTP/1.1\\r\\nHost: deb.debian.org\\r\\nConnection: close\\r\\n\\r\\n' >&3; \
                 head -1 <&3 | cut -d' ' -f2 >> /etc/drydock-net-check";
    // Boot parity of the network: the open network, as the VPS has it.
    let o = vps.upgrade_run_with(home.path(), check, &["--network", "open"]);
    eprintln!("{}", stderr(&o));
    assert_exit(&o, 0);
    assert_stderr(
        &o,
        "worker VM: BIOS, disk vda on virtio-blk, NIC enp0s1 52:54:00:d7:d0:c4 at PCI slot 01.0, network 198.51.100.45/24 via 198.51.100.1, DNS 198.51.100.53",
    );
    // What the worker VM saw, now on the VPS's own disk.
    let seen = vps.ssh("cat /etc/drydock-net-check");
    let lines: Vec<&str> = seen.lines().map(str::trim).collect();
    assert_eq!(
        lines,
        [
            "inet 198.51.100.45/24",
            "52:54:00:d7:d0:c4",
            "resolved",
            "200"
        ],
        "{seen}"
    );
    assert!(
        vps.ssh("ip -4 -o addr show")
            .contains("inet 198.51.100.45/24")
    );
    let t = Instant::now();
    vps.zoo_app_intact();
    zoo_row("debian-12-static", &json(&o), t.elapsed());
}

/// Boot parity, firmware: a VPS that boots only with UEFI (a GPT disk, an
/// EFI system partition with GRUB at the fallback path, no NVRAM entry,
/// no BIOS boot code). The probe must find UEFI, the worker VM must boot
/// it with OVMF, the change come back, and the VPS boot it again.
#[test]
#[ignore = "zoo tier (long): scripts/test-zoo runs it"]
fn zoo_uefi_vps_is_upgraded_in_a_worker_vm_booted_with_uefi() {
    let vps = Vps::start_variant("uefi");
    let home = tempdir();
    assert_eq!(
        vps.ssh("test -d /sys/firmware/efi && echo uefi || echo bios")
            .trim(),
        "uefi"
    );
    let change = "set -e; test -d /sys/firmware/efi; echo 'upgraded offline by drydock under UEFI' > /etc/drydock-was-here";
    let o = vps.upgrade_run(home.path(), change);
    eprintln!("{}", stderr(&o));
    assert_exit(&o, 0);
    assert_stderr(&o, "worker VM: UEFI (OVMF), disk vda on virtio-blk");
    assert_eq!(
        vps.ssh("cat /etc/drydock-was-here").trim(),
        "upgraded offline by drydock under UEFI"
    );
    assert_eq!(
        vps.ssh("test -d /sys/firmware/efi && echo uefi || echo bios")
            .trim(),
        "uefi"
    );
    assert_eq!(json(&o)["os_after"], "Debian GNU/Linux 12 (bookworm)");
    let t = Instant::now();
    vps.zoo_app_intact();
    zoo_row("debian-12-uefi", &json(&o), t.elapsed());
}

#[test]
#[ignore = "zoo tier (long): scripts/test-zoo runs it"]
fn zoo_ifupdown_dhclient_eth0() {
    zoo_upgrade(
        "ifupdown",
        "pgrep -x dhclient >/dev/null && ip -o -4 addr show dev eth0 | grep -q 'inet 10.0.2.' && echo ok",
    );
}

#[test]
#[ignore = "zoo tier (long): scripts/test-zoo runs it"]
fn zoo_debian_11_ifupdown_dhclient_eth0() {
    zoo_upgrade_on(
        11,
        "ifupdown",
        "true",
        "pgrep -x dhclient >/dev/null && ip -o -4 addr show dev eth0 | grep -q 'inet 10.0.2.' && grep -q 'VERSION_ID=\"11\"' /etc/os-release && echo ok",
    );
}

#[test]
#[ignore = "zoo tier (long): scripts/test-zoo runs it"]
fn zoo_lvm_root_separate_boot_and_swap_volume() {
    zoo_upgrade(
        "lvm",
        "[ \"$(findmnt -no SOURCE /)\" = /dev/mapper/vps-root ] && [ \"$(findmnt -no FSTYPE /boot)\" = ext4 ] \
         && [ \"$(swapon --show=NAME --noheadings)\" = \"$(realpath /dev/mapper/vps-swap)\" ] && echo ok",
    );
}

#[test]
#[ignore = "zoo tier (long): scripts/test-zoo runs it"]
fn zoo_xfs_root() {
    zoo_upgrade("xfs", "[ \"$(findmnt -no FSTYPE /)\" = xfs ] && echo ok");
}

#[test]
#[ignore = "zoo tier (long): scripts/test-zoo runs it"]
fn zoo_btrfs_root_with_subvolumes() {
    zoo_upgrade(
        "btrfs",
        "[ \"$(findmnt -no FSTYPE /)\" = btrfs ] && [ \"$(findmnt -no FSROOT /)\" = /@ ] && [ \"$(findmnt -no FSROOT /home)\" = /@home ] && echo ok",
    );
}

/// The container was stopped for the window and runs again after the
/// reboot (restart=always), its volume's log without a gap and with lines
/// from the new boot.
#[test]
#[ignore = "zoo tier (long): scripts/test-zoo runs it"]
fn zoo_docker_container_writing_to_a_volume() {
    zoo_upgrade_on(
        12,
        "docker",
        "tail -n 1 /var/lib/docker/volumes/zoo-vol/_data/log | cut -d' ' -f1",
        "sleep 5; log=/var/lib/docker/volumes/zoo-vol/_data/log; \
         [ \"$(docker inspect -f '{{.State.Running}}' zoo-writer)\" = true ] \
         && awk 'NR > 1 && $1 != p + 1 { bad = 1 } { p = $1 } END { exit bad }' $log \
         && [ \"$(tail -n 1 $log | cut -d' ' -f1)\" -gt \"$BEFORE\" ] \
         && tail -n 1 $log | grep -q \"$(cat /proc/sys/kernel/random/boot_id)\" && echo ok",
    );
}

/// Every row committed before the run is there after it, with no gap in
/// the numbers, and rows keep arriving from the new boot.
#[test]
#[ignore = "zoo tier (long): scripts/test-zoo runs it"]
fn zoo_postgres_keeps_every_committed_row() {
    zoo_upgrade_on(
        12,
        "postgres",
        "su postgres -c \"psql -XAtq zoo -c 'select max(n) from ticks'\"",
        // The query goes on psql's stdin: quoted inside `su -c '...'` a
        // quoted boot id lost its quotes (and the check failed every time).
        "sleep 5; q() { printf '%s\\n' \"$1\" | su postgres -c 'psql -XAtq zoo'; }; \
         [ \"$(q 'select count(*) = max(n) from ticks')\" = t ] && [ \"$(q 'select max(n) from ticks')\" -gt \"$BEFORE\" ] \
         && [ \"$(q \"select count(*) > 0 from ticks where boot = '$(cat /proc/sys/kernel/random/boot_id)'\")\" = t ] \
         && systemctl is-active --quiet drydock-zoo-db.service && echo ok",
    );
}

#[test]
#[ignore = "zoo tier (long): scripts/test-zoo runs it"]
fn zoo_networkmanager() {
    zoo_upgrade(
        "nm",
        "systemctl is-active --quiet NetworkManager.service && ! systemctl is-active --quiet systemd-networkd.service \
         && nmcli -t -f STATE general | grep -q '^connected' && echo ok",
    );
}

/// The NIC keeps the MAC that the seed's network config matches, so the
/// worker VM (and the VPS after the push) has its network.
#[test]
#[ignore = "zoo tier (long): scripts/test-zoo runs it"]
fn zoo_cloud_init_netplan_as_debian_cloud_images() {
    zoo_upgrade(
        "cloud",
        "[ \"$(cat /sys/class/net/eth0/address)\" = 52:54:00:c1:0d:01 ] && grep -q 52:54:00:c1:0d:01 /etc/netplan/50-cloud-init.yaml \
         && systemctl is-active --quiet systemd-networkd.service systemd-resolved.service && echo ok",
    );
}

/// Debian 13 as build-debian makes it (systemd-networkd), the next
/// upgrade's starting point.
#[test]
#[ignore = "zoo tier (long): scripts/test-zoo runs it"]
fn zoo_debian_13_networkd() {
    zoo_upgrade_on(
        13,
        "networkd",
        "true",
        "grep -q 'VERSION_ID=\"13\"' /etc/os-release && systemctl is-active --quiet systemd-networkd.service && echo ok",
    );
}

#[test]
#[ignore = "zoo tier (long): scripts/test-zoo runs it"]
fn zoo_var_partition_swap_partition_and_swap_file() {
    zoo_upgrade(
        "var-swap",
        "[ \"$(findmnt -no SOURCE /var)\" = /dev/vda2 ] && swapon --show=NAME --noheadings | sort | tr '\\n' ' ' | grep -qx '/dev/vda3 /swapfile ' && echo ok",
    );
}

/// Issue 11 and 12 on OpenRC (Debian's openrc under sysvinit's init, the
/// OpenRC Alpine runs): the freeze stops the default runlevel's services
/// through rc-service and keeps SSH and the network; the worker VM's
/// first boot holds them back with `noinit=`, its verify boot with the
/// runlevel links moved aside; the VPS comes back with the change, no
/// line from a worker boot, the listener untouched, and /etc (the
/// runlevels included) as before.
#[test]
#[ignore = "zoo tier (long): scripts/test-zoo runs it"]
fn zoo_openrc_host_is_frozen_and_upgraded_in_a_sealed_worker_vm() {
    let vps = Vps::start_variant("openrc");
    let home = tempdir();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    listener.set_nonblocking(true).unwrap();
    assert_eq!(vps.ssh("cat /proc/1/comm").trim(), "init");
    assert!(
        vps.ssh(&openrc_seal_setup(port))
            .trim()
            .parse::<u32>()
            .unwrap()
            > 0
    );
    let boot_before = vps.boot_id();
    let etc_before = vps.ssh(ETC_STATE);
    // The zoo app's log has lines from the fixture's own build boots.
    let ids_before = vps.ssh(BOOT_IDS_OPENRC);
    let cmd = format!(
        "{CHANGE}; (exec 3<>/dev/tcp/10.0.2.2/{port}) 2>/dev/null && echo reached > /etc/drydock-reached; \
         getent hosts phone-home.example && echo resolved > /etc/drydock-resolved; \
         apt-get -q update"
    );
    let o = vps.upgrade_run(home.path(), &cmd);
    eprintln!("{}", stderr(&o));
    assert_exit(&o, 0);
    let r = json(&o);
    eprintln!("{}", serde_json::to_string_pretty(&r).unwrap());
    let t = Instant::now();
    assert_eq!(
        vps.ssh("cat /etc/drydock-was-here").trim(),
        "upgraded offline by drydock"
    );
    let boot_after = vps.boot_id();
    assert_ne!(boot_after, boot_before);
    let held = str_list(&r, "held_back");
    for u in ["drydock-app", "drydock-phone", "drydock-zoo-app", "cron"] {
        assert!(held.contains(&u.to_string()), "{u} not held back: {held:?}");
    }
    assert!(!held.contains(&"ssh".to_string()), "{held:?}");
    assert_phone_refused(&r, port);
    assert_eq!(r["network"], "sealed");
    assert!(
        listener.accept().is_err(),
        "the workstation's listener saw a connection"
    );
    assert_eq!(
        vps.ssh("ls -d /etc/drydock-reached /etc/drydock-resolved /usr/sbin/policy-rc.d /etc/drydock-held-runlevels 2>/dev/null | wc -l").trim(),
        "0"
    );
    let ids = vps.ssh(BOOT_IDS_OPENRC);
    for id in ids.lines() {
        assert!(
            ids_before.lines().any(|b| b == id) || id == boot_after,
            "a line on the VPS from a boot that is not the VPS's own ({id}): {ids}"
        );
    }
    // Its services came back at its own boot, and /etc is as it was.
    let st = vps.ssh("for s in drydock-app drydock-phone drydock-zoo-app cron ssh; do rc-service $s status >/dev/null 2>&1 && echo \"$s up\"; done");
    assert_eq!(st.lines().count(), 5, "not every service runs again: {st}");
    vps.zoo_app_intact();
    assert_etc_unchanged(&etc_before, &vps.ssh(ETC_STATE), "the runlevels included");
    // Its row in scripts/test-zoo's table (the first run had none, and was
    // listed FAILED though it passed).
    zoo_row("debian-12-openrc", &r, t.elapsed());
}
