//! A backup store on another machine: a second real sshd (with OpenSSH's
//! SFTP), reached as `ssh://ALIAS/PATH` through the user's ~/.ssh/config,
//! as restic's and borg's users give their backup host.

use super::*;

/// The string written all over the disk: no file of the store may hold it.
const MARK: &[u8] = b"drydock-remote-store-plaintext-marker-0123456789";

/// The store host: a second sshd, its SFTP on, and the VPS test's HOME
/// told how to reach it (`backuphost`, and `backuphost-via-PORT` through a
/// relay on PORT), its host key known under one alias.
struct StoreHost {
    sshd: Sshd,
    dir: tempfile::TempDir,
}

impl StoreHost {
    fn start(vps: &Sshd) -> StoreHost {
        let sshd = Sshd::start_with(&["Subsystem=sftp internal-sftp"]);
        let key = std::fs::read_to_string(sshd.dir.path().join("host_key.pub")).unwrap();
        let mut w = key.split_whitespace();
        let line = format!("backuphost {} {}\n", w.next().unwrap(), w.next().unwrap());
        let mut known = std::fs::read_to_string(vps.known_hosts()).unwrap();
        known.push_str(&line);
        std::fs::write(vps.known_hosts(), known).unwrap();
        let host = StoreHost {
            sshd,
            dir: tempdir(),
        };
        host.route(vps, "backuphost", host.sshd.port);
        host
    }

    /// ALIAS in the VPS test's ~/.ssh/config: the store host at PORT.
    fn route(&self, vps: &Sshd, alias: &str, port: u16) {
        let config = vps.home.join(".ssh/config");
        let mut text = std::fs::read_to_string(&config).unwrap_or_default();
        text.push_str(&format!(
            "Host {alias}\n  HostName 127.0.0.1\n  Port {port}\n  User root\n  IdentityFile {}\n  \
             HostKeyAlias backuphost\n",
            self.sshd.client_key.display()
        ));
        std::fs::write(config, text).unwrap();
    }

    fn folder(&self) -> std::path::PathBuf {
        self.dir.path().join("stores/vps1")
    }

    fn url(&self, alias: &str) -> String {
        format!("ssh://{alias}{}", self.folder().display())
    }

    /// The store's files on the store host (the lock's folder left out).
    fn files(&self) -> Vec<(std::path::PathBuf, Vec<u8>)> {
        let mut out = Vec::new();
        let mut todo = vec![self.folder()];
        while let Some(d) = todo.pop() {
            for e in std::fs::read_dir(&d).unwrap().flatten() {
                let p = e.path();
                if p.is_dir() {
                    todo.push(p);
                } else {
                    out.push((p.clone(), std::fs::read(&p).unwrap()));
                }
            }
        }
        out
    }
}

fn run(vps: &Sshd, args: &[&str]) -> std::process::Output {
    let mut c = vps.drydock_bare(args);
    c.env_remove("XDG_DATA_HOME");
    c.output().unwrap()
}

fn backup_to(vps: &Sshd, dev: &std::path::Path, store: &str) -> Command {
    let mut c = vps.drydock(&[
        "backup",
        &vps.host(),
        "--device",
        dev.to_str().unwrap(),
        "--store",
        store,
        "--json",
    ]);
    c.env_remove("XDG_DATA_HOME");
    c
}

/// A disk of 48 MiB with 40 MiB of data, MARK written at the start of
/// every MiB of it.
fn marked_disk(path: &std::path::Path) {
    make_disk(path, 48 * MIB, &[(0, 40 * MIB as usize)], &[]);
    for i in 0..40 {
        write_at(path, MARK, i * MIB + 512);
    }
}

/// Over a real second sshd: a first backup into a new store there; a
/// second one cut on the store's link (exit 75, nothing listed) and run
/// again, which sends only what the cut one had not kept; `backups`,
/// `verify` and `restore` of it from there, the disk back bit for bit.
/// No file on the store host holds the disk's text, and the lock is gone.
#[test]
fn a_store_on_another_machine_backs_up_resumes_verifies_and_restores() {
    let vps = Sshd::start();
    let host = StoreHost::start(&vps);
    let t = tempdir();
    let dev = t.path().join("disk");
    marked_disk(&dev);
    let url = host.url("backuphost");

    let o = backup_to(&vps, &dev, &url).output().unwrap();
    assert_exit(&o, 0);
    let r = json(&o);
    assert_eq!(r["store"], url.as_str(), "{r}");
    assert_eq!(r["encrypted"], true, "{r}");
    let first = r["id"].as_str().unwrap().to_string();
    let first_digest = sha256_file(&dev);
    assert!(host.folder().join("store.json").is_file());

    // 16 MiB changed, then a backup whose store link is cut after 6 MiB.
    write_at(&dev, &pattern(41, 16 * MIB as usize), 8 * MIB);
    let relay = Relay::start(host.sshd.port, 6 * MIB);
    let alias = format!("backuphost-via-{}", relay.port);
    host.route(&vps, &alias, relay.port);
    let o = output_within(
        backup_to(&vps, &dev, &host.url(&alias)),
        180,
        "the backup cut on the store's link",
    );
    eprintln!("the cut backup's stderr: {}", stderr(&o));
    assert_exit(&o, 75);
    assert_stderr(&o, "the backup stopped before its version was listed");
    assert_stderr(&o, "run the same command again");

    let o = run(&vps, &["backups", "--store", &url, "--json"]);
    assert_exit(&o, 0);
    let listed = json(&o)["stores"][0].clone();
    assert_eq!(listed["versions"].as_array().unwrap().len(), 1, "{listed}");
    let kept = listed["store"]["unlisted_blocks"].as_u64().unwrap();
    assert!(kept > 0, "the cut backup kept blocks: {listed}");

    let o = backup_to(&vps, &dev, &url).output().unwrap();
    assert_exit(&o, 0);
    let r = json(&o);
    eprintln!("the cut backup kept {kept} block(s); the same backup again: {r}");
    assert_eq!(r["sent_blocks"].as_u64().unwrap(), 16 - kept, "{r}");
    let second = r["id"].as_str().unwrap().to_string();
    let second_digest = sha256_file(&dev);

    for id in [&first, &second] {
        let o = run(&vps, &["verify", id, "--store", &url]);
        assert_exit(&o, 0);
    }
    assert!(
        !host.folder().join("lock.d").exists(),
        "the lock went with the run"
    );

    // The first version restored onto the disk, from the store host.
    let mut c = vps.drydock(&[
        "restore",
        &first,
        &vps.host(),
        "--device",
        dev.to_str().unwrap(),
        "--store",
        &url,
        "--yes",
        "--json",
    ]);
    c.env_remove("XDG_DATA_HOME");
    let o = c.output().unwrap();
    assert_exit(&o, 0);
    assert_eq!(sha256_file(&dev), first_digest, "the disk holds version 1");
    assert_ne!(first_digest, second_digest);

    let files = host.files();
    assert!(files.len() > 20, "{} files", files.len());
    eprintln!(
        "{} files on the store host, {} bytes, none holds the disk's text",
        files.len(),
        files.iter().map(|(_, d)| d.len()).sum::<usize>()
    );
    for (p, data) in &files {
        assert!(
            !data.windows(MARK.len()).any(|w| w == MARK),
            "{} holds the disk's text",
            p.display()
        );
    }
}

/// A remote store another run holds (its lock's holder a live process) is
/// refused naming it, and nothing changes; a lock left by a run of this
/// machine that is gone, or one whose holder has not beaten for minutes,
/// is taken over with a warning.
#[test]
fn a_remote_store_lock_names_its_holder_and_a_dead_one_is_taken_over() {
    let vps = Sshd::start();
    let host = StoreHost::start(&vps);
    let t = tempdir();
    let dev = t.path().join("disk");
    make_disk(&dev, 8 * MIB, &[(0, 2 * MIB as usize)], &[]);
    let url = host.url("backuphost");
    let o = backup_to(&vps, &dev, &url).output().unwrap();
    assert_exit(&o, 0);

    let me = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let lock = host.folder().join("lock.d");
    let hold = |line: &str| {
        std::fs::create_dir_all(&lock).unwrap();
        std::fs::write(lock.join("holder"), line).unwrap();
    };
    let versions = || host.folder().join("versions").read_dir().unwrap().count();
    let before = versions();

    hold(&format!(
        "drydock (pid {}) on {}, `backup other`, since then\n",
        std::process::id(),
        me.trim()
    ));
    write_at(&dev, &pattern(5, 4096), 0);
    let o = backup_to(&vps, &dev, &url).output().unwrap();
    assert_exit(&o, 3);
    assert_stderr(
        &o,
        format!("is in use by drydock (pid {}) on", std::process::id()),
    );
    assert_eq!(versions(), before, "nothing changed");

    // A holder of this machine that has ended: taken over at once.
    hold(&format!(
        "drydock (pid 4000000) on {}, `backup other`, since then\n",
        me.trim()
    ));
    let o = backup_to(&vps, &dev, &url).output().unwrap();
    assert_exit(&o, 0);
    assert_stderr(
        &o,
        "a process of this machine that has ended; taking it over",
    );
    assert!(!lock.exists());

    // Another machine's run, silent for ten minutes: taken over.
    hold("drydock (pid 77) on another-workstation, `backup other`, since then\n");
    let st = Command::new("touch")
        .args(["-d", "10 minutes ago"])
        .arg(lock.join("holder"))
        .status()
        .unwrap();
    assert!(st.success());
    write_at(&dev, &pattern(6, 4096), 0);
    let o = backup_to(&vps, &dev, &url).output().unwrap();
    assert_exit(&o, 0);
    assert_stderr(&o, "whose last sign of life was");

    // The same, beating now: refused.
    hold("drydock (pid 77) on another-workstation, `backup other`, since then\n");
    let o = backup_to(&vps, &dev, &url).output().unwrap();
    assert_exit(&o, 3);
    assert_stderr(&o, "is in use by drydock (pid 77) on another-workstation");
}

/// A store host drydock cannot use is said so, with what to do, and
/// nothing is made: one whose host key is not known (recorded with
/// --accept-new-host-key, as for a VPS), one whose sshd has no SFTP.
#[test]
fn a_store_host_without_a_known_key_or_sftp_is_refused_with_what_to_do() {
    let vps = Sshd::start();
    let host = StoreHost::start(&vps);
    let t = tempdir();
    let dev = t.path().join("disk");
    make_disk(&dev, 4 * MIB, &[(0, MIB as usize)], &[]);
    let config = vps.home.join(".ssh/config");
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(&format!(
        "Host strangehost\n  HostName 127.0.0.1\n  Port {}\n  User root\n  IdentityFile {}\n  \
         HostKeyAlias strangehost\nHost nosftp\n  HostName 127.0.0.1\n  Port {}\n  User root\n  \
         IdentityFile {}\n",
        host.sshd.port,
        host.sshd.client_key.display(),
        vps.port,
        vps.client_key.display()
    ));
    std::fs::write(&config, text).unwrap();
    let url = format!("ssh://strangehost{}", host.folder().display());

    let o = backup_to(&vps, &dev, &url).output().unwrap();
    assert!(!o.status.success());
    assert_stderr(&o, "the host key of strangehost is not known");
    assert_stderr(&o, "--accept-new-host-key");
    assert!(!host.folder().exists(), "nothing made");
    let mut c = backup_to(&vps, &dev, &url);
    c.arg("--accept-new-host-key");
    let o = c.output().unwrap();
    assert_exit(&o, 0);
    assert!(host.folder().join("store.json").is_file());

    let o = backup_to(&vps, &dev, "ssh://nosftp/srv/nowhere")
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert_stderr(&o, "the store host's sshd offers no SFTP");
    assert_stderr(&o, "Subsystem sftp internal-sftp");
}
