use super::*;

/// The Debian 12 fixture's systemd, as the facts script printed it.
fn fixture_units() -> Vec<String> {
    [
        "file app.service multi-user.target",
        "file cron.service multi-user.target",
        "file e2scrub_reap.service multi-user.target",
        "file getty@tty1.service getty.target",
        "file networking.service multi-user.target",
        "file networking.service network-online.target",
        "file ssh.service multi-user.target",
        "file systemd-network-generator.service sysinit.target",
        "file systemd-networkd-wait-online.service network-online.target",
        "file systemd-networkd.service multi-user.target",
        "file systemd-networkd.socket sockets.target",
        "file systemd-pstore.service sysinit.target",
        "file remote-fs.target multi-user.target",
        "file apt-daily.timer timers.target",
        "file drydock-marker.timer timers.target",
        "file -.mount local-fs.target",
        "file systemd-fsck-root.service local-fs.target",
        "file systemd-remount-fs.service local-fs.target",
        "file serial-getty@ttyS0.service getty.target",
        "active ssh.service",
        "active systemd-networkd.service",
        "active systemd-journald.service",
        "active app.service",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn facts(units: Vec<String>, init: &str) -> Facts {
    let mut f = crate::remote::facts::parse(
        "@@ id\n0\n@@ init\nsystemd\n@@ cmdline\nBOOT_IMAGE=/boot/vmlinuz-6.1.0-50-cloud-amd64 root=UUID=1383 ro console=tty0 console=ttyS0,115200\n@@ end\n",
    )
    .unwrap();
    f.units = units;
    f.init = init.into();
    f
}

#[test]
fn the_fixture_keeps_ssh_and_its_network_and_holds_back_the_rest() {
    let s = Seal::from_facts(&facts(fixture_units(), "systemd"), "root@vps").unwrap();
    assert_eq!(
        s.wants,
        [
            "ssh.service",
            "systemd-networkd.service",
            "systemd-user-sessions.service",
            "systemd-logind.service"
        ]
    );
    assert_eq!(
        s.held_back,
        [
            "app.service",
            "apt-daily.timer",
            "cron.service",
            "drydock-marker.timer",
            "e2scrub_reap.service",
            "getty@tty1.service",
            "serial-getty@ttyS0.service",
            "systemd-pstore.service"
        ]
    );
    assert_eq!(s.boot_masks, ["systemd-pstore.service"]);
    assert_eq!(
        s.kernel_cmdline("BOOT_IMAGE=/boot/vmlinuz-6.1.0-50-cloud-amd64 root=UUID=1383 ro console=tty0 console=ttyS0,115200 systemd.unit=graphical.target")
            .unwrap(),
        "root=UUID=1383 ro console=tty0 console=ttyS0,115200 systemd.unit=sysinit.target systemd.wants=ssh.service systemd.wants=systemd-networkd.service systemd.wants=systemd-user-sessions.service systemd.wants=systemd-logind.service systemd.mask=systemd-pstore.service"
    );
}

#[test]
fn a_cmdline_without_a_serial_console_gets_one_and_quotes_survive() {
    let s = Seal::default();
    assert_eq!(
        s.kernel_cmdline("initrd=\\initrd.img root=/dev/vda1 single dyndbg=\"file a.c +p\" quiet")
            .unwrap(),
        "root=/dev/vda1 dyndbg=\"file a.c +p\" quiet console=ttyS0,115200 systemd.unit=sysinit.target"
    );
}

#[test]
fn hosts_that_cannot_be_sealed_are_refused_with_the_reason() {
    let e = Seal::from_facts(&facts(fixture_units(), "runit"), "root@void")
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("root@void runs runit as its init system, and neither systemd nor OpenRC manages its services"),
        "{e}"
    );
    assert!(e.ends_with("nothing was changed"), "{e}");
    let no_net: Vec<String> = fixture_units()
        .into_iter()
        .filter(|l| !l.starts_with("active systemd-networkd"))
        .collect();
    let e = Seal::from_facts(&facts(no_net, "systemd"), "h")
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("drydock cannot tell which unit brings up the network on h"),
        "{e}"
    );
    let no_ssh: Vec<String> = fixture_units()
        .into_iter()
        .filter(|l| l != "active ssh.service")
        .collect();
    let e = Seal::from_facts(&facts(no_ssh, "systemd"), "h")
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("no SSH server unit is active on h"), "{e}");
}

#[test]
fn ifupdown_hosts_keep_networking_and_its_ifup_instances() {
    let mut u = fixture_units();
    u.retain(|l| !l.contains("systemd-networkd"));
    u.push("active networking.service".into());
    u.push("active ifup@eth0.service".into());
    let s = Seal::from_facts(&facts(u, "systemd"), "h").unwrap();
    assert_eq!(
        s.wants,
        [
            "ssh.service",
            "networking.service",
            "ifup@eth0.service",
            "systemd-user-sessions.service",
            "systemd-logind.service"
        ]
    );
}

/// An Alpine VPS as setup-alpine leaves it, with an app and nginx.
fn alpine_units() -> Vec<String> {
    [
        "openrc",
        "level devfs sysinit",
        "level dmesg sysinit",
        "level mdev sysinit",
        "level hwdrivers sysinit",
        "level bootmisc boot",
        "level hostname boot",
        "level hwclock boot",
        "level modules boot",
        "level networking boot",
        "level seedrng boot",
        "level swap boot",
        "level sysctl boot",
        "level syslog boot",
        "level acpid default",
        "level chronyd default",
        "level crond default",
        "level nginx default",
        "level sshd default",
        "level app default",
        "level killprocs shutdown",
        "level mount-ro shutdown",
        "level savecache shutdown",
        "active devfs",
        "active networking",
        "active sshd",
        "active nginx",
        "active app",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

#[test]
fn an_openrc_host_keeps_sshd_and_networking_and_holds_back_the_default_runlevel() {
    let s = Seal::from_facts(&facts(alpine_units(), "init"), "root@alpine").unwrap();
    assert_eq!(s.init, Init::Openrc);
    assert_eq!(s.wants, ["sshd", "networking"]);
    assert_eq!(s.held_back, ["app", "chronyd", "crond", "hwclock", "nginx"]);
    assert_eq!(
        s.kernel_cmdline("BOOT_IMAGE=vmlinuz-lts root=UUID=77 modules=sd-mod,usb-storage,ext4 quiet rootfstype=ext4 softlevel=default noinit=metrics")
            .unwrap(),
        "root=UUID=77 modules=sd-mod,usb-storage,ext4 quiet rootfstype=ext4 console=ttyS0,115200 noinit=app,chronyd,crond,hwclock,metrics,nginx"
    );
    // The upgraded disk's runlevels, as RUNLEVELS_SCRIPT prints them:
    // a service the upgrade added to default is held back too.
    let mut after: Vec<String> = alpine_units()
        .into_iter()
        .filter(|l| l.starts_with("level "))
        .collect();
    after.push("level nginx-exporter default".into());
    after.push("level crond boot".into());
    assert_eq!(
        s.held_in(&after),
        [
            "app",
            "chronyd",
            "crond",
            "hwclock",
            "nginx",
            "nginx-exporter"
        ]
    );
    let seal = s.disk_seal_script(&s.held_back, true);
    assert!(seal.contains("rm -f /usr/sbin/policy-rc.d"), "{seal}");
    assert!(seal.contains("D=/etc/drydock-held-runlevels"), "{seal}");
    assert!(
        seal.contains("for u in app chronyd crond hwclock nginx; do"),
        "{seal}"
    );
    let json = serde_json::to_string(&s).unwrap();
    assert!(json.contains("\"init\":\"openrc\""), "{json}");
    // A journal from before OpenRC: systemd.
    let old: Seal = serde_json::from_str(r#"{"wants":[],"held_back":[],"boot_masks":[]}"#).unwrap();
    assert_eq!(old.init, Init::Systemd);
}

/// Every script of both seals as /bin/sh reads it (`sh -n`).
#[test]
fn the_seal_scripts_are_valid_shell() {
    let sd = Seal::from_facts(&facts(fixture_units(), "systemd"), "h").unwrap();
    let orc = Seal::from_facts(&facts(alpine_units(), "init"), "h").unwrap();
    for s in [&sd, &orc] {
        for (what, script) in [
            ("runtime", s.runtime_script()),
            ("disk seal", s.disk_seal_script(&s.held_back, true)),
            ("disk unseal", s.disk_unseal_script(&s.held_back, true)),
            ("running", s.running_script(&s.held_back)),
            ("enabled", s.enabled_script().to_string()),
        ] {
            crate::assert_valid_sh(&format!("{:?} {what}", s.init), &script);
        }
    }
}

#[test]
fn an_openrc_host_without_a_started_ssh_server_or_network_is_refused() {
    let no_ssh: Vec<String> = alpine_units()
        .into_iter()
        .filter(|l| l != "active sshd")
        .collect();
    let e = Seal::from_facts(&facts(no_ssh, "init"), "h")
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with(
            "no SSH server service is started on h (OpenRC; looked for sshd, ssh, dropbear)"
        ),
        "{e}"
    );
    let no_net: Vec<String> = alpine_units()
        .into_iter()
        .filter(|l| l != "active networking")
        .collect();
    let e = Seal::from_facts(&facts(no_net, "init"), "h")
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("drydock cannot tell which OpenRC service brings up the network on h"),
        "{e}"
    );
}

#[test]
fn a_cmdline_over_the_kernels_limit_is_refused() {
    let s = Seal {
        boot_masks: (0..200).map(|i| format!("unit-{i}.service")).collect(),
        ..Default::default()
    };
    let e = s.kernel_cmdline("root=/dev/vda1").unwrap_err().to_string();
    assert!(e.contains("over the kernel's limit of 2047"), "{e}");
}

#[test]
fn shell_words_drop_what_is_not_a_unit_name() {
    assert_eq!(
        words(&["a.service".into(), "x;rm -rf /".into(), "b@c.timer".into()]),
        "a.service 'b@c.timer'"
    );
}

/// systemd escapes a '-' in an instance name as `\x2d`; the seal's scripts
/// must hand that name to systemctl as it is, or another unit is masked and
/// the held-back one runs in the worker VM.
#[test]
fn an_escaped_unit_name_reaches_the_shell_as_it_is() {
    let names = vec![
        "app@blue\\x2dgreen.service".to_string(),
        "plain.timer".to_string(),
    ];
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("for u in {}; do echo \"$u\"; done", words(&names)))
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "app@blue\\x2dgreen.service\nplain.timer\n"
    );
}
