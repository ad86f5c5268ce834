//! Shared test helpers: a real OpenSSH `sshd` on a loopback port with its
//! own host key and authorized key, a HOME of its own for drydock, and
//! disk files to pull and push.

#![allow(
    dead_code,
    reason = "each test binary uses a part of the common helpers"
)]

pub mod vps;

use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

pub const SSHD: &str = "/usr/sbin/sshd";

fn run_ok(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn keygen(path: &Path) {
    run_ok(
        Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", "drydock-test", "-f"])
            .arg(path),
    );
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A real sshd, stopped (with every session it forked) on drop.
pub struct Sshd {
    pub dir: tempfile::TempDir,
    pub port: u16,
    child: Child,
    pub client_key: PathBuf,
    pub home: PathBuf,
}

impl Sshd {
    pub fn start() -> Sshd {
        Sshd::start_as(&[])
    }

    /// An sshd started with `-o OPTION` for each of OPTIONS (e.g.
    /// "SetEnv=NAME=VALUE": the sessions' environment).
    pub fn start_with(options: &[&str]) -> Sshd {
        Sshd::start_full(&[], options, &[])
    }

    /// An sshd whose sessions find each program of PROGRAMS (absolute
    /// paths) not executable: an empty file of mode 0644 is bound over it
    /// in their mount namespace (as in `start_as`); this machine's own
    /// stays as it is.
    pub fn start_without(programs: &[&str]) -> Sshd {
        Sshd::start_full(&[], &[], programs)
    }

    /// An sshd whose sessions see this machine with `files` (absolute
    /// path, content) laid over it: in a mount namespace of its own, /etc
    /// is an overlay and /root an empty tmpfs, the files written there, so
    /// another system's real os-release and configuration are what the
    /// probe reads, and this machine is not changed.
    pub fn start_as(files: &[(&str, &str)]) -> Sshd {
        Sshd::start_full(files, &[], &[])
    }

    fn start_full(files: &[(&str, &str)], options: &[&str], hidden: &[&str]) -> Sshd {
        assert!(
            Path::new(SSHD).exists(),
            "{SSHD} is missing: scripts/test installs openssh-server"
        );
        let dir = tempfile::Builder::new()
            .prefix("drydock-sshd")
            .tempdir_in(test_root())
            .unwrap();
        let d = dir.path();
        keygen(&d.join("host_key"));
        keygen(&d.join("client_key"));
        std::fs::copy(d.join("client_key.pub"), d.join("authorized_keys")).unwrap();
        std::fs::create_dir_all("/run/sshd").unwrap();
        let port = free_port();
        let config = format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host_key\nAuthorizedKeysFile {d}/authorized_keys\n\
             PidFile {d}/sshd.pid\nUsePAM no\nStrictModes no\nPermitRootLogin prohibit-password\n\
             PasswordAuthentication no\nKbdInteractiveAuthentication no\nLogLevel ERROR\nMaxStartups 50\n",
            d = d.display()
        );
        std::fs::write(d.join("sshd_config"), config).unwrap();
        let mut cmd = Command::new(SSHD);
        cmd.args(["-D", "-e", "-f"]).arg(d.join("sshd_config"));
        for o in options {
            cmd.args(["-o", o]);
        }
        if !files.is_empty() || !hidden.is_empty() {
            // /root is a tmpfs of its own, not an overlay: the lower layer
            // of an overlay must not change while it is mounted, and this
            // machine's root shell writes under /root (pyenv's rehash lock)
            // at every login, which then stalled each session here for 60 s.
            let mut prelude = String::from(
                "set -e; mount --make-rprivate /\nmount -t tmpfs -o mode=0700 tmpfs /root\n",
            );
            let (up, work) = (d.join("upper/etc"), d.join("work/etc"));
            std::fs::create_dir_all(&up).unwrap();
            std::fs::create_dir_all(&work).unwrap();
            prelude.push_str(&format!(
                "mount -t overlay overlay -o lowerdir=/etc,upperdir={},workdir={} /etc\n",
                up.display(),
                work.display()
            ));
            for (path, content) in files {
                let f = d.join("files").join(path.trim_start_matches('/'));
                std::fs::create_dir_all(f.parent().unwrap()).unwrap();
                std::fs::write(&f, content).unwrap();
                prelude.push_str(&format!(
                    "mkdir -p \"$(dirname {path})\"; rm -f {path}; cp {} {path}\n",
                    f.display()
                ));
            }
            if !hidden.is_empty() {
                let empty = d.join("not-a-program");
                std::fs::write(&empty, "").unwrap();
                for path in hidden {
                    prelude.push_str(&format!("mount --bind {} {path}\n", empty.display()));
                }
            }
            prelude.push_str("exec \"$@\"\n");
            let argv: Vec<std::ffi::OsString> = std::iter::once(cmd.get_program().to_owned())
                .chain(cmd.get_args().map(|a| a.to_owned()))
                .collect();
            cmd = Command::new("unshare");
            cmd.args(["--mount", "sh", "-c", &prelude, "sh"]).args(argv);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(d.join("sshd.log")).unwrap())
            .spawn()
            .expect("start sshd");
        let home = d.join("home");
        std::fs::create_dir_all(home.join(".ssh")).unwrap();
        let mut s = Sshd {
            client_key: d.join("client_key"),
            home,
            port,
            child,
            dir,
        };
        s.wait_ready();
        s.trust_host_key();
        s
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                panic!(
                    "sshd exited ({st}): {}",
                    std::fs::read_to_string(self.dir.path().join("sshd.log")).unwrap_or_default()
                );
            }
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "sshd did not listen on {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// What `ssh` users have: the host's key in ~/.ssh/known_hosts.
    pub fn trust_host_key(&self) {
        let pubkey = std::fs::read_to_string(self.dir.path().join("host_key.pub")).unwrap();
        let mut w = pubkey.split_whitespace();
        let line = format!(
            "[127.0.0.1]:{} {} {}\n",
            self.port,
            w.next().unwrap(),
            w.next().unwrap()
        );
        std::fs::write(self.known_hosts(), line).unwrap();
    }

    pub fn known_hosts(&self) -> PathBuf {
        self.home.join(".ssh/known_hosts")
    }

    pub fn host(&self) -> String {
        format!("root@127.0.0.1:{}", self.port)
    }

    /// `drydock` with this test's HOME, no agent, and `-i` the authorized key
    /// added after the subcommand's arguments.
    pub fn drydock(&self, args: &[&str]) -> Command {
        let mut c = self.drydock_bare(args);
        c.arg("-i").arg(&self.client_key);
        c
    }

    pub fn drydock_bare(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_drydock"));
        c.args(args)
            .env("HOME", &self.home)
            // Backup stores are encrypted: the tests' key (made by the
            // first backup into a new store).
            .env("DRYDOCK_KEY_FILE", self.home.join("backup.key"))
            .env_remove("SSH_AUTH_SOCK")
            .env_remove("DRYDOCK_LOG")
            .stdin(Stdio::null());
        c
    }

    /// Cut every open SSH session (the listener stays), as a dropped link would.
    pub fn cut_sessions(&self) {
        let _ = Command::new("pkill")
            .args(["-KILL", "-P", &self.child.id().to_string()])
            .status();
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        self.cut_sessions();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Temporary files live on the real disk (not a tmpfs), as disks do.
pub fn test_root() -> PathBuf {
    let p = std::env::var_os("DRYDOCK_TEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")));
    std::fs::create_dir_all(&p).unwrap();
    p
}

pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("drydock-test")
        .tempdir_in(test_root())
        .unwrap()
}

/// A deterministic pseudo-random byte stream (xorshift), so failures reproduce.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// A disk file of `size` bytes: holes, explicit zero blocks and data runs.
pub fn make_disk(path: &Path, size: u64, data_runs: &[(u64, usize)], zero_runs: &[(u64, usize)]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    for (i, (off, len)) in data_runs.iter().enumerate() {
        f.write_all_at(&pattern(i as u64 + 7, *len), *off).unwrap();
    }
    for (off, len) in zero_runs {
        f.write_all_at(&vec![0u8; *len], *off).unwrap();
    }
    f.sync_all().unwrap();
}

pub fn sha256_file(path: &Path) -> String {
    let data = std::fs::read(path).unwrap();
    hex::encode(Sha256::digest(&data))
}

pub fn allocated_bytes(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().blocks() * 512
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Assert an exit code, showing both streams when it is not.
pub fn assert_exit(o: &Output, code: i32) {
    assert_eq!(
        o.status.code(),
        Some(code),
        "expected exit {code}\nstdout: {}\nstderr: {}",
        stdout(o),
        stderr(o)
    );
}

/// Assert that stderr says `text` (the exact words a user would read).
pub fn assert_stderr(o: &Output, text: impl AsRef<str>) {
    let e = stderr(o);
    assert!(
        e.contains(text.as_ref()),
        "stderr lacks {:?}:\n{e}",
        text.as_ref()
    );
}

/// The `--json` event stream on stdout, checked as a program reads it:
/// every line one JSON object with the schema's version ("v": 1) and a
/// "type", "progress" lines with their byte counts.
pub fn events(o: &Output) -> Vec<serde_json::Value> {
    let out = stdout(o);
    out.lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap_or_else(|e| {
                panic!("a line of the event stream is not JSON ({e}): {l}\n{out}")
            });
            assert_eq!(v["v"], 1, "no schema version: {l}");
            assert!(v["type"].is_string(), "no type: {l}");
            if v["type"] == "progress" {
                assert!(
                    v["bytes_done"].as_u64().unwrap() <= v["bytes_total"].as_u64().unwrap(),
                    "{l}"
                );
            }
            v
        })
        .collect()
}

/// The result of a `--json` command: its "result" event, the stream's last
/// line.
pub fn json(o: &Output) -> serde_json::Value {
    let ev = events(o);
    let last = ev
        .last()
        .unwrap_or_else(|| panic!("no event on stdout; stderr: {}", stderr(o)));
    assert_eq!(
        last["type"], "result",
        "the stream does not end in its result: {last}"
    );
    last["result"].clone()
}

/// The files and folders under `root` (and `root` itself) that others
/// than their owner may read: a disk image, its overlay and the logs of a
/// run hold the server's secrets (host keys, TLS keys, passwords).
pub fn readable_by_others(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(p) = todo.pop() {
        let Ok(m) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        if m.file_type().is_symlink() {
            continue;
        }
        if m.mode() & 0o077 != 0 {
            out.push(format!("{} {:o}", p.display(), m.mode() & 0o777));
        }
        if m.is_dir() {
            todo.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
        }
    }
    out.sort();
    out
}

/// A TCP relay between drydock and an sshd that cuts the connection (both
/// directions shut down, as a dropped link seen by both ends) once
/// `cut_after` bytes have gone one way (from drydock to the server, or
/// back with [`Relay::start_down`]), over every connection it relays
/// together; after the cut it relays whole again. It counts the bytes
/// each way.
pub struct Relay {
    pub port: u16,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Bytes relayed from drydock to the server, and back.
    up: std::sync::Arc<std::sync::atomic::AtomicU64>,
    down: std::sync::Arc<std::sync::atomic::AtomicU64>,
    cut_after: std::sync::Arc<std::sync::atomic::AtomicU64>,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Relay {
    /// Cut after `cut_after` bytes from drydock to the server.
    pub fn start(to: u16, cut_after: u64) -> Relay {
        Relay::start_with(to, cut_after, true, Duration::ZERO)
    }

    /// Cut after `cut_after` bytes from drydock to the server, the way a
    /// link that stalls and then drops does: what came before the cut is
    /// delivered, nothing more moves up for `stall`, then the connection
    /// goes. The server side has had the time to act on every byte it got
    /// (without the stall, whether sshd hands its last bytes to the
    /// program before it ends the session is a race).
    pub fn start_stalled(to: u16, cut_after: u64, stall: Duration) -> Relay {
        Relay::start_with(to, cut_after, true, stall)
    }

    /// Cut after `cut_after` bytes from the server to drydock (a pull's data).
    pub fn start_down(to: u16, cut_after: u64) -> Relay {
        Relay::start_with(to, cut_after, false, Duration::ZERO)
    }

    fn start_with(to: u16, cut_after: u64, cut_up: bool, stall: Duration) -> Relay {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let (up, down) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let cut = Arc::new(AtomicBool::new(false));
        let cut_after = Arc::new(AtomicU64::new(cut_after));
        let (s, up2, down2) = (stop.clone(), up.clone(), down.clone());
        let (cut2, at2) = (cut.clone(), cut_after.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let Ok((client, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                };
                client.set_nonblocking(false).unwrap();
                let Ok(server) = TcpStream::connect(("127.0.0.1", to)) else {
                    continue;
                };
                let live = !cut2.load(Ordering::Relaxed);
                for (mut from, mut to, count, cuts) in [
                    (
                        client.try_clone().unwrap(),
                        server.try_clone().unwrap(),
                        up2.clone(),
                        cut_up,
                    ),
                    (
                        server.try_clone().unwrap(),
                        client.try_clone().unwrap(),
                        down2.clone(),
                        !cut_up,
                    ),
                ] {
                    let (cut, at) = (cut2.clone(), at2.clone());
                    let both = (client.try_clone().unwrap(), server.try_clone().unwrap());
                    std::thread::spawn(move || {
                        use std::io::{Read, Write};
                        let mut buf = vec![0u8; 16 * 1024];
                        loop {
                            let mut n = match from.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            let before = count.fetch_add(n as u64, Ordering::Relaxed);
                            let cut_after = at.load(Ordering::Relaxed);
                            if cuts && live && before + n as u64 >= cut_after {
                                n = cut_after.saturating_sub(before) as usize;
                                let _ = to.write_all(&buf[..n]);
                                let _ = to.flush();
                                std::thread::sleep(stall);
                                cut.store(true, Ordering::Relaxed);
                                let _ = both.0.shutdown(std::net::Shutdown::Both);
                                let _ = both.1.shutdown(std::net::Shutdown::Both);
                                break;
                            }
                            if to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        let _ = to.shutdown(std::net::Shutdown::Write);
                    });
                }
            }
        });
        Relay {
            port,
            stop,
            up,
            down,
            cut_after,
            cut,
        }
    }

    /// Cut again, after AT bytes from now (counted from zero again) on the
    /// connections made from now on: the same port, so drydock sees the
    /// same host.
    pub fn rearm(&self, at: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        self.cut_after.store(at, Relaxed);
        self.up.store(0, Relaxed);
        self.down.store(0, Relaxed);
        self.cut.store(false, Relaxed);
    }

    pub fn host(&self) -> String {
        format!("root@127.0.0.1:{}", self.port)
    }

    /// Bytes relayed so far: (drydock to the server, the server to drydock).
    pub fn bytes(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (self.up.load(Relaxed), self.down.load(Relaxed))
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// /run/drydock-helper.* folders now.
pub fn helper_dirs() -> std::collections::BTreeSet<String> {
    std::fs::read_dir("/run")
        .map(|d| {
            d.flatten()
                .map(|e| e.path().display().to_string())
                .filter(|p| p.starts_with("/run/drydock-helper."))
                .collect()
        })
        .unwrap_or_default()
}

/// Helper folders made since BEFORE that are still there after 30 s with
/// no process naming them (a concurrent test's own are named by its
/// helper's command line, and go when it ends): what a cut left behind.
pub fn helper_dirs_left(before: &std::collections::BTreeSet<String>) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let named = |d: &str| {
            std::fs::read_dir("/proc").unwrap().flatten().any(|e| {
                std::fs::read(e.path().join("cmdline"))
                    .map(|c| String::from_utf8_lossy(&c).contains(d))
                    .unwrap_or(false)
            })
        };
        let left: Vec<String> = helper_dirs()
            .difference(before)
            .filter(|d| !named(d))
            .cloned()
            .collect();
        if left.is_empty() || Instant::now() > deadline {
            return left;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}
