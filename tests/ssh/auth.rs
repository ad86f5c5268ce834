//! SSH as OpenSSH does it: host keys, keys, ssh_config, the agent, jump hosts, and the host as it was typed.

use super::*;

#[test]
fn host_keys_are_checked_like_openssh() {
    let sshd = Sshd::start();
    let fp = {
        let o = Command::new("ssh-keygen")
            .arg("-lf")
            .arg(sshd.dir.path().join("host_key.pub"))
            .output()
            .unwrap();
        stdout(&o).split_whitespace().nth(1).unwrap().to_string()
    };
    let name = format!("[127.0.0.1]:{}", sshd.port);

    // Unknown: refused with the fingerprint and the flag.
    std::fs::remove_file(sshd.known_hosts()).unwrap();
    let o = sshd.drydock(&["probe", &sshd.host()]).output().unwrap();
    assert_exit(&o, 3);
    assert_stderr(
        &o,
        format!("the host key of {name} is not known (fingerprint {fp})"),
    );
    assert_stderr(&o, "--accept-new-host-key");

    // Accepted and recorded, then known without the flag.
    let o = sshd
        .drydock(&["probe", &sshd.host(), "--accept-new-host-key"])
        .output()
        .unwrap();
    assert_exit(&o, 0);
    assert!(
        std::fs::read_to_string(sshd.known_hosts())
            .unwrap()
            .starts_with(&format!("{name} ssh-ed25519 "))
    );
    assert_exit(&sshd.drydock(&["probe", &sshd.host()]).output().unwrap(), 0);

    // Hashed entries (ssh-keygen -H) are understood.
    let st = Command::new("ssh-keygen")
        .arg("-H")
        .arg("-f")
        .arg(sshd.known_hosts())
        .output()
        .unwrap();
    assert!(st.status.success());
    assert!(
        std::fs::read_to_string(sshd.known_hosts())
            .unwrap()
            .starts_with("|1|")
    );
    assert_exit(&sshd.drydock(&["probe", &sshd.host()]).output().unwrap(), 0);

    // Changed: refused, even with --accept-new-host-key.
    let t = tempdir();
    keygen(&t.path().join("other"));
    let other = std::fs::read_to_string(t.path().join("other.pub")).unwrap();
    let mut w = other.split_whitespace();
    std::fs::write(
        sshd.known_hosts(),
        format!("{name} {} {}\n", w.next().unwrap(), w.next().unwrap()),
    )
    .unwrap();
    let o = sshd
        .drydock(&["probe", &sshd.host(), "--accept-new-host-key"])
        .output()
        .unwrap();
    assert_exit(&o, 3);
    assert_stderr(
        &o,
        format!(
            "the host key of {name} has CHANGED (now {fp}; {}:1 holds another)",
            sshd.known_hosts().display()
        ),
    );
}

#[test]
fn a_wrong_key_and_an_unreachable_host_say_so() {
    let sshd = Sshd::start();
    let t = tempdir();
    let wrong = t.path().join("wrong");
    keygen(&wrong);
    let o = sshd
        .drydock_bare(&["probe", &sshd.host(), "-i", wrong.to_str().unwrap()])
        .output()
        .unwrap();
    assert_exit(&o, 69);
    assert_stderr(
        &o,
        format!(
            "{} refused every key drydock tried ({}); add its public key to ~root/.ssh/authorized_keys",
            sshd.host(),
            wrong.display()
        ),
    );

    // No key at all (no agent, no ~/.ssh/id_*).
    let o = sshd
        .drydock_bare(&["probe", &sshd.host()])
        .output()
        .unwrap();
    assert_exit(&o, 69);
    assert_stderr(&o, "no key found: no ssh-agent and no ~/.ssh/id_* file");

    let port = free_port();
    let o = sshd
        .drydock(&["probe", &format!("root@127.0.0.1:{port}")])
        .output()
        .unwrap();
    assert_exit(&o, 69);
    assert_stderr(
        &o,
        format!("cannot reach 127.0.0.1:{port}: Connection refused"),
    );
}

#[test]
fn ssh_config_aliases_and_default_keys_work() {
    let sshd = Sshd::start();
    // The host behind an alias, its key named by IdentityFile (tab- and
    // '='-separated lines, as real configs have them).
    std::fs::write(
        sshd.home.join(".ssh/config"),
        format!(
            "Host myvps\n\tHostName 127.0.0.1\n\tPort={}\n  User root\n  IdentityFile {}\n",
            sshd.port,
            sshd.client_key.display()
        ),
    )
    .unwrap();
    let o = sshd
        .drydock_bare(&["probe", "myvps", "--json"])
        .output()
        .unwrap();
    assert_exit(&o, 0);
    assert_eq!(json(&o)["host"], format!("root@myvps:{}", sshd.port));

    // No IdentityFile: the usual ~/.ssh/id_ed25519 is found.
    std::fs::write(
        sshd.home.join(".ssh/config"),
        format!(
            "Host myvps\n  HostName 127.0.0.1\n  Port {}\n  User root\n",
            sshd.port
        ),
    )
    .unwrap();
    let o = sshd
        .drydock_bare(&["probe", "myvps", "--json"])
        .output()
        .unwrap();
    assert_exit(&o, 69);
    std::fs::copy(&sshd.client_key, sshd.home.join(".ssh/id_ed25519")).unwrap();
    let o = sshd
        .drydock_bare(&["probe", "myvps", "--json"])
        .output()
        .unwrap();
    assert_exit(&o, 0);
}

#[test]
fn hints_name_the_host_as_it_was_typed() {
    let sshd = Sshd::start();
    let o = sshd
        .drydock(&[
            "freeze",
            &sshd.host(),
            "--device",
            "/dev/drydock-no-such-disk",
            "--yes",
        ])
        .output()
        .unwrap();
    assert_exit(&o, 3);
    assert_stderr(
        &o,
        format!("`drydock probe {}` lists the disks", sshd.host()),
    );
}

#[test]
fn keys_in_ssh_agent_are_used() {
    let sshd = Sshd::start();
    let t = tempdir();
    let sock = t.path().join("agent.sock");
    let mut agent = Command::new("ssh-agent")
        .arg("-D")
        .arg("-a")
        .arg(&sock)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "ssh-agent did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let added = Command::new("ssh-add")
        .arg(&sshd.client_key)
        .env("SSH_AUTH_SOCK", &sock)
        .output()
        .unwrap();
    assert!(added.status.success(), "{}", stderr(&added));
    let o = sshd
        .drydock_bare(&["probe", &sshd.host(), "--json"])
        .env("SSH_AUTH_SOCK", &sock)
        .output()
        .unwrap();
    let _ = agent.kill();
    let _ = agent.wait();
    assert_exit(&o, 0);
}

/// A ProxyCommand is refused, not bypassed: drydock does not run it, and
/// does not connect directly either.
#[test]
fn a_proxy_command_in_ssh_config_is_refused_not_bypassed() {
    let sshd = Sshd::start();
    std::fs::write(
        sshd.home.join(".ssh/config"),
        format!(
            "Host hidden\n  HostName 127.0.0.1\n  Port {}\n  ProxyCommand nc bastion.example.org 22\n",
            sshd.port
        ),
    )
    .unwrap();
    let o = sshd.drydock(&["probe", "root@hidden"]).output().unwrap();
    assert_exit(&o, 1);
    assert_stderr(
        &o,
        "the ssh config reaches hidden through a ProxyCommand (nc bastion.example.org 22), which drydock does not run",
    );
}

/// ProxyJump, as OpenSSH users have it: a second real sshd is the jump
/// host, and the target's name resolves only there (its /etc/hosts), so
/// only a connection through the jump host reaches it. `-J`, the config's
/// ProxyJump, `ssh://` and `-p` all take that way; without a jump, the
/// name does not resolve.
#[test]
fn a_pull_through_a_jump_host() {
    let target = Sshd::start();
    let jump = Sshd::start_as(&[(
        "/etc/hosts",
        "127.0.0.1 localhost\n127.0.0.1 hidden-target\n",
    )]);
    // The test's key opens both; both host keys are known.
    let key = std::fs::read_to_string(target.client_key.with_extension("pub")).unwrap();
    let mut auth = std::fs::OpenOptions::new()
        .append(true)
        .open(jump.dir.path().join("authorized_keys"))
        .unwrap();
    std::io::Write::write_all(&mut auth, key.as_bytes()).unwrap();
    let host_key = |s: &Sshd| {
        let k = std::fs::read_to_string(s.dir.path().join("host_key.pub")).unwrap();
        let w: Vec<&str> = k.split_whitespace().collect();
        format!("{} {}", w[0], w[1])
    };
    std::fs::write(
        target.known_hosts(),
        format!(
            "[127.0.0.1]:{} {}\n[hidden-target]:{} {}\n",
            jump.port,
            host_key(&jump),
            target.port,
            host_key(&target)
        ),
    )
    .unwrap();
    let t = tempdir();
    let dev = t.path().join("disk");
    make_disk(&dev, 8 * MIB, &[(0, MIB as usize)], &[]);
    let want = sha256_file(&dev);
    let via = format!("root@127.0.0.1:{}", jump.port);
    let there = format!("root@hidden-target:{}", target.port);
    let uri = format!("ssh://root@hidden-target:{}", target.port);
    let two_hops = format!("{via},{via}");
    let port = target.port.to_string();
    let pull = |n: &str, extra: &[&str]| {
        let img = t.path().join(n);
        let mut args = vec!["pull", "--device", dev.to_str().unwrap()];
        args.extend_from_slice(&["--output", img.to_str().unwrap()]);
        args.extend_from_slice(extra);
        let o = target.drydock(&args).output().unwrap();
        (o, img)
    };
    let (o, _) = pull("direct", &[&there]);
    assert_exit(&o, 69);
    assert_stderr(&o, format!("cannot reach hidden-target:{}", target.port));
    for (n, extra) in [
        ("j", vec![there.as_str(), "-J", via.as_str()]),
        ("uri", vec![uri.as_str(), "-J", via.as_str()]),
        // Two hops: the jump host, then itself again through it.
        ("two hops", vec![there.as_str(), "-J", &two_hops]),
        (
            "-p with -J",
            vec!["root@hidden-target", "-p", &port, "-J", &via],
        ),
        (
            "-o ProxyJump",
            vec![there.as_str(), "-o", &format!("ProxyJump={via}")],
        ),
    ] {
        let (o, img) = pull(n, &extra);
        assert_exit(&o, 0);
        assert_eq!(sha256_file(&img), want, "{n}");
        if n == "j" {
            eprintln!(
                "$ drydock pull {} --device {} --output {}\n{}{}",
                extra.join(" "),
                dev.display(),
                img.display(),
                stderr(&o),
                stdout(&o)
            );
        }
    }
    let cfg = t.path().join("another config");
    std::fs::write(&cfg, format!("Host hidden-target\n  ProxyJump {via}\n")).unwrap();
    let (o, img) = pull("F", &[&there, "-F", cfg.to_str().unwrap()]);
    assert_exit(&o, 0);
    assert_eq!(sha256_file(&img), want, "-F with ProxyJump");
    std::fs::copy(&cfg, target.home.join(".ssh/config")).unwrap();
    let (o, img) = pull("config", &[&there]);
    assert_exit(&o, 0);
    assert_eq!(sha256_file(&img), want, "ProxyJump in ~/.ssh/config");
    eprintln!(
        "pulled root@hidden-target through the jump sshd on port {}",
        jump.port
    );
}

/// HOST as people type it by mistake: scp's host:path, the image and the
/// host swapped, a file for a host, an ssh option drydock does not use.
/// Each is a usage error that says what to type, before any connection.
#[test]
fn host_slips_are_usage_errors_that_say_what_was_meant() {
    let sshd = Sshd::start();
    let t = tempdir();
    let img = t.path().join("vps.raw");
    std::fs::write(&img, b"").unwrap();
    let i = img.to_str().unwrap();
    for (args, said) in [
        (
            vec!["pull", "vps:/dev/vda", "--output", "x.raw"],
            "'vps:/dev/vda' looks like scp's host:path; drydock takes the host alone and the \
             disk with --device: `vps --device /dev/vda`"
                .to_string(),
        ),
        (
            vec!["push", "root@vps", i],
            format!(
                "IMAGE and HOST are the other way round: root@vps is not a file and '{i}' is; \
                 `drydock push IMAGE HOST`"
            ),
        ),
        (
            vec!["probe", i],
            format!("'{i}' is a file here, not a host: HOST is [user@]host[:port]"),
        ),
        (
            vec!["probe", "ssh://root@vps:2222/dev/vda"],
            "an ssh:// address names no path; the disk is named with --device".to_string(),
        ),
        (
            vec!["probe", "vps", "-o", "Compression=yes"],
            "-o Compression: drydock does not use this ssh option; it honours User, HostName"
                .to_string(),
        ),
        (
            vec!["probe", "vps", "-o", "StrictHostKeyChecking=no"],
            "-o StrictHostKeyChecking=no: drydock always checks host keys".to_string(),
        ),
    ] {
        let o = sshd.drydock_bare(&args).output().unwrap();
        assert_exit(&o, 2);
        assert_stderr(&o, &said);
    }
}

/// A booted copy whose sshd answers and refuses every key (`verify --boot`
/// without the host's -i): said within the grace, not after the 5 minutes
/// a copy still booting gets, with why waiting will not help.
#[test]
fn a_guest_that_refuses_every_key_is_given_up_at_once() {
    let sshd = Sshd::start();
    let t = tempdir();
    let wrong = t.path().join("wrong");
    let o = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&wrong)
        .output()
        .unwrap();
    assert!(o.status.success());
    let (target, opts) = drydock::vm::guest::guest_target(
        sshd.port,
        Some(&wrong),
        t.path().join("known_hosts"),
        "the test's sshd",
    );
    let started = Instant::now();
    let res = tokio::runtime::Runtime::new().unwrap().block_on(
        drydock::vm::guest::connect_retry_refusing(
            &target,
            &opts,
            Duration::from_secs(300),
            Some(Duration::from_secs(6)),
        ),
    );
    let e = format!("{:#}", res.err().expect("refused"));
    assert!(started.elapsed() < Duration::from_secs(60), "{e}");
    assert!(e.contains("refused every key"), "{e}");
    assert!(e.contains("waiting longer will not help"), "{e}");
}
