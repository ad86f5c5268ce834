//! The VM tier's VPS: a fixture image booted by `drydock boot` as the
//! VPS, reached over SSH, and the helpers around it (tests/vm/).

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::*;

pub fn fixture(release: u32) -> (PathBuf, PathBuf) {
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

pub fn ssh_guest(port: u16, key: &std::path::Path, cmd: &str) -> std::process::Output {
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

pub fn qemu_running_in(dir: &std::path::Path) -> bool {
    let out = Command::new("pgrep")
        .args(["-af", "qemu-system"])
        .output()
        .unwrap();
    stdout(&out).contains(dir.to_str().unwrap())
}

/// `drydock boot IMAGE --json` (1 GB, two CPUs) in the background, and the
/// JSON it prints once the guest's sshd answers (how to reach it).
/// SERVICES: `--services`, the image's own services run (the VPS's boot).
pub fn boot_json(
    img: &std::path::Path,
    dir: &std::path::Path,
    err_log: Option<&std::path::Path>,
    like: Option<&std::path::Path>,
    services: bool,
) -> (std::process::Child, serde_json::Value) {
    // Piped when the test reads it; else to a file, shown if the boot fails.
    let stderr = match err_log {
        Some(p) => Stdio::from(std::fs::File::create(p).unwrap()),
        None => Stdio::piped(),
    };
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
        ])
        .arg(dir)
        .args(services.then_some("--services"))
        .args(
            like.map(|l| vec![std::ffi::OsStr::new("--like"), l.as_os_str()])
                .unwrap_or_default(),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .unwrap();
    let line = until_ready(&mut child);
    if line.is_empty() {
        let status = child.wait().unwrap();
        let said = match (err_log, child.stderr.take()) {
            (Some(p), _) => std::fs::read_to_string(p).unwrap_or_default(),
            (None, Some(mut e)) => {
                let mut s = String::new();
                let _ = std::io::Read::read_to_string(&mut e, &mut s);
                s
            }
            (None, None) => String::new(),
        };
        panic!("drydock boot ended ({status}) without saying how to reach the guest: {said}");
    }
    (child, serde_json::from_str(&line).unwrap())
}

/// A `drydock boot --json`'s event stream until its "ready" event (the
/// guest keeps running): that line, or nothing if the stream ended first.
pub fn until_ready(child: &mut std::process::Child) -> String {
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    loop {
        line.clear();
        out.read_line(&mut line).unwrap();
        if line.is_empty() || line.contains(r#""type":"ready""#) {
            return line;
        }
    }
}

/// The fixture booted as "the VPS" (1 GB RAM, one CPU, SSH on a loopback
/// port) with `drydock boot`: a qcow2 overlay, so the fixture is untouched.
pub struct Vps {
    pub child: std::process::Child,
    pub port: u16,
    pub key: PathBuf,
    pub _dir: tempfile::TempDir,
}

impl Vps {
    pub fn start(release: u32) -> Vps {
        let (img, key) = fixture(release);
        Vps::start_image(&img, key, None)
    }

    /// A variant of the Debian 12 fixture (vm-fixtures/build-variant),
    /// booted as the VPS it stands for (`--like IMAGE.like.json`).
    pub fn start_variant(variant: &str) -> Vps {
        Vps::start_variant_of(12, variant)
    }

    pub fn start_variant_of(release: u32, variant: &str) -> Vps {
        let (base, key) = fixture(release);
        let img = base.with_file_name(format!("debian-{release}-{variant}.raw"));
        assert!(
            img.with_extension("raw.ok").exists(),
            "the debian-{release}-{variant} fixture is not built: run vm-fixtures/build-variant {variant} {release} (scripts/test-zoo does)"
        );
        Vps::start_image(&img, key, Some(&img.with_extension("raw.like.json")))
    }

    pub fn start_image(img: &std::path::Path, key: PathBuf, like: Option<&std::path::Path>) -> Vps {
        let dir = tempdir();
        let log = dir.path().join("vps-boot.err");
        // The fixture is the VPS: its own services run; its network stays
        // sealed (it only answers on its SSH forward).
        let (child, info) = boot_json(img, &dir.path().join("vps"), Some(&log), like, true);
        Vps {
            child,
            port: info["ssh_port"].as_u64().unwrap() as u16,
            key,
            _dir: dir,
        }
    }

    pub fn host(&self) -> String {
        format!("root@127.0.0.1:{}", self.port)
    }

    /// What `drydock boot` of the VPS printed on stderr so far.
    pub fn boot_log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("vps-boot.err")).unwrap_or_default()
    }

    /// The zoo app's log has a line every second with no gap in its
    /// numbers (vm-fixtures/build-variant), and its data its checksum.
    pub fn zoo_app_intact(&self) {
        let out = self.ssh(
            "cd /var/lib/drydock-zoo && sha256sum --quiet -c data.sha256 && echo data-ok; \
             awk 'NR > 1 && $1 != p + 1 { print \"gap after \" p; exit } { p = $1 } END { print p \" lines\" }' app.log",
        );
        assert!(
            out.starts_with("data-ok\n"),
            "the zoo app's data changed: {out}"
        );
        assert!(!out.contains("gap"), "the zoo app's log has a gap: {out}");
    }

    /// The VPS's boot id: a new one after each boot.
    pub fn boot_id(&self) -> String {
        self.ssh("cat /proc/sys/kernel/random/boot_id")
            .trim()
            .to_string()
    }

    pub fn ssh(&self, cmd: &str) -> String {
        let o = ssh_guest(self.port, &self.key, cmd);
        assert!(
            o.status.success(),
            "`{cmd}` on the VPS failed: {}",
            stderr(&o)
        );
        stdout(&o)
    }

    /// `drydock upgrade VPS --run CMD --yes --json` to the end (2 GB, 2 CPUs).
    pub fn upgrade_run(&self, home: &std::path::Path, cmd: &str) -> std::process::Output {
        self.upgrade_run_with(home, cmd, &[])
    }

    pub fn upgrade_run_with(
        &self,
        home: &std::path::Path,
        cmd: &str,
        extra: &[&str],
    ) -> std::process::Output {
        self.upgrade_cmd(home, cmd, extra).output().unwrap()
    }

    /// The command of [`Vps::upgrade_run_with`], to run as the caller likes
    /// (without the rehearsal, which other tests cover).
    pub fn upgrade_cmd(&self, home: &std::path::Path, cmd: &str, extra: &[&str]) -> Command {
        let mut args = vec!["--no-rehearsal"];
        args.extend_from_slice(extra);
        self.upgrade_as_users_run_it(home, cmd, &args)
    }

    /// `drydock upgrade VPS --run CMD --yes --json` (2 GB, 2 CPUs) and
    /// EXTRA: by default, rehearsal first.
    pub fn upgrade_as_users_run_it(
        &self,
        home: &std::path::Path,
        cmd: &str,
        extra: &[&str],
    ) -> Command {
        self.run_as_users_do("upgrade", home, cmd, extra)
    }

    /// `drydock SUB VPS --run CMD --yes --json` (2 GB, 2 CPUs) and EXTRA;
    /// SUB is upgrade or rehearse.
    pub fn run_as_users_do(
        &self,
        sub: &str,
        home: &std::path::Path,
        cmd: &str,
        extra: &[&str],
    ) -> Command {
        let host = self.host();
        let mut args = vec![
            sub,
            &host,
            "-i",
            self.key.to_str().unwrap(),
            "--accept-new-host-key",
            "--run",
            cmd,
            "--yes",
            "--json",
            "--memory",
            "2G",
            "--cpus",
            "2",
        ];
        args.extend_from_slice(extra);
        self.drydock(home, &args)
    }

    /// drydock as a user of this VPS: its own HOME and state folder.
    pub fn drydock(&self, home: &std::path::Path, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_drydock"));
        c.args(args)
            .env("HOME", home)
            .env("XDG_STATE_HOME", home.join("state"))
            .env("DRYDOCK_KEY_FILE", home.join("backup.key"))
            .env_remove("SSH_AUTH_SOCK")
            .stdin(Stdio::null());
        c
    }
}

impl Drop for Vps {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        let t0 = Instant::now();
        while self.child.try_wait().unwrap().is_none() && t0.elapsed() < Duration::from_secs(120) {
            std::thread::sleep(Duration::from_millis(200));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
