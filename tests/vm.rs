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

/// `drydock boot IMAGE --json` (1 GB, two CPUs) in the background, and the
/// JSON it prints once the guest's sshd answers (how to reach it).
/// SERVICES: `--services`, the image's own services run (the VPS's boot).
fn boot_json(
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
fn until_ready(child: &mut std::process::Child) -> String {
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

/// Also where `boot` keeps a VM without `--dir`: under
/// `$XDG_STATE_HOME/drydock/boots/IMAGE-TIME` (it was once
/// `drydock/drydock/boots`, and only tests with `--dir` ran).
#[test]
fn a_guest_that_never_answers_is_reported_with_its_serial_console() {
    // A disk with no bootable system: QEMU's firmware finds nothing to boot.
    let t = tempdir();
    let img = t.path().join("blank.raw");
    make_disk(&img, 64 << 20, &[], &[]);
    let state = t.path().join("state");
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
            "--services",
        ])
        .env("XDG_STATE_HOME", &state)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_exit(&o, 1);
    assert_stderr(
        &o,
        "the guest's SSH server did not answer within 20s; serial console (last lines):",
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

/// The fixture booted as "the VPS" (1 GB RAM, one CPU, SSH on a loopback
/// port) with `drydock boot`: a qcow2 overlay, so the fixture is untouched.
struct Vps {
    child: std::process::Child,
    port: u16,
    key: PathBuf,
    _dir: tempfile::TempDir,
}

impl Vps {
    fn start(release: u32) -> Vps {
        let (img, key) = fixture(release);
        Vps::start_image(&img, key, None)
    }

    /// A variant of the Debian 12 fixture (vm-fixtures/build-variant),
    /// booted as the VPS it stands for (`--like IMAGE.like.json`).
    fn start_variant(variant: &str) -> Vps {
        Vps::start_variant_of(12, variant)
    }

    fn start_variant_of(release: u32, variant: &str) -> Vps {
        let (base, key) = fixture(release);
        let img = base.with_file_name(format!("debian-{release}-{variant}.raw"));
        assert!(
            img.with_extension("raw.ok").exists(),
            "the debian-{release}-{variant} fixture is not built: run vm-fixtures/build-variant {variant} {release} (scripts/test-zoo does)"
        );
        Vps::start_image(&img, key, Some(&img.with_extension("raw.like.json")))
    }

    fn start_image(img: &std::path::Path, key: PathBuf, like: Option<&std::path::Path>) -> Vps {
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

    fn host(&self) -> String {
        format!("root@127.0.0.1:{}", self.port)
    }

    /// What `drydock boot` of the VPS printed on stderr so far.
    fn boot_log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("vps-boot.err")).unwrap_or_default()
    }

    /// The zoo app's log has a line every second with no gap in its
    /// numbers (vm-fixtures/build-variant), and its data its checksum.
    fn zoo_app_intact(&self) {
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
    fn boot_id(&self) -> String {
        self.ssh("cat /proc/sys/kernel/random/boot_id")
            .trim()
            .to_string()
    }

    fn ssh(&self, cmd: &str) -> String {
        let o = ssh_guest(self.port, &self.key, cmd);
        assert!(
            o.status.success(),
            "`{cmd}` on the VPS failed: {}",
            stderr(&o)
        );
        stdout(&o)
    }

    /// `drydock upgrade VPS --run CMD --yes --json` to the end (2 GB, 2 CPUs).
    fn upgrade_run(&self, home: &std::path::Path, cmd: &str) -> std::process::Output {
        self.upgrade_run_with(home, cmd, &[])
    }

    fn upgrade_run_with(
        &self,
        home: &std::path::Path,
        cmd: &str,
        extra: &[&str],
    ) -> std::process::Output {
        self.upgrade_cmd(home, cmd, extra).output().unwrap()
    }

    /// The command of [`Vps::upgrade_run_with`], to run as the caller likes
    /// (without the rehearsal, which other tests cover).
    fn upgrade_cmd(&self, home: &std::path::Path, cmd: &str, extra: &[&str]) -> Command {
        let mut args = vec!["--no-rehearsal"];
        args.extend_from_slice(extra);
        self.upgrade_as_users_run_it(home, cmd, &args)
    }

    /// `drydock upgrade VPS --run CMD --yes --json` (2 GB, 2 CPUs) and
    /// EXTRA: by default, rehearsal first.
    fn upgrade_as_users_run_it(
        &self,
        home: &std::path::Path,
        cmd: &str,
        extra: &[&str],
    ) -> Command {
        self.run_as_users_do("upgrade", home, cmd, extra)
    }

    /// `drydock SUB VPS --run CMD --yes --json` (2 GB, 2 CPUs) and EXTRA;
    /// SUB is upgrade or rehearse.
    fn run_as_users_do(
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
    fn drydock(&self, home: &std::path::Path, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_drydock"));
        c.args(args)
            .env("HOME", home)
            .env("XDG_STATE_HOME", home.join("state"))
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

const CHANGE: &str =
    "echo 'upgraded offline by drydock' > /etc/drydock-was-here && rm -f /etc/motd";

/// What a user compares on the VPS before and after a run: every file and
/// symlink under /etc with its checksum or target; the symlinks in
/// /etc/systemd/system/*.wants are the enabled units (asked of the 1 GB
/// VPS's PID 1 under emulation, `systemctl list-unit-files` times out
/// right after a boot). The --run change (drydock-was-here, motd) is left
/// out.
const ETC_STATE: &str = "find /etc -xdev \\( -type f -o -type l \\) ! -name drydock-was-here ! -name motd -printf '%p %l\\n' | sort; \
     find /etc -xdev -type f ! -name drydock-was-here ! -name motd -print0 | sort -z | xargs -0 sha256sum";

/// A report's list of strings (held_back, allowed_hosts, ...).
/// The `--json` stream of a run: STEPS in order, each "started" then
/// "finished" with its seconds, nothing "failed"; progress of the pull or
/// the push when those ran.
fn assert_steps(o: &std::process::Output, steps: &[&str]) {
    let ev = events(o);
    let seen: Vec<(String, String)> = ev
        .iter()
        .filter(|e| e["type"] == "step")
        .map(|e| {
            (
                e["step"].as_str().unwrap().to_string(),
                e["state"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let want: Vec<(String, String)> = steps
        .iter()
        .flat_map(|s| {
            [
                (s.to_string(), "started".into()),
                (s.to_string(), "finished".into()),
            ]
        })
        .collect();
    assert_eq!(seen, want);
    assert!(
        ev.iter()
            .filter(|e| e["type"] == "step" && e["state"] == "finished")
            .all(|e| e["seconds"].is_f64())
    );
    for moving in ["pull", "push"] {
        if steps.contains(&moving) {
            assert!(
                ev.iter()
                    .any(|e| e["type"] == "progress" && e["what"] == moving),
                "no {moving} progress"
            );
        }
    }
}

fn str_list(r: &serde_json::Value, key: &str) -> Vec<String> {
    r[key]
        .as_array()
        .unwrap_or_else(|| panic!("the report has no list {key}: {r}"))
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect()
}

/// The seal tests' phone service was refused both ways it tries out: the
/// workstation's listener on PORT, and the name it resolves.
fn assert_phone_refused(r: &serde_json::Value, port: u16) {
    let refused = str_list(r, "refused_connections");
    assert!(
        refused.contains(&format!("tcp 10.0.2.2:{port}")),
        "{refused:?}"
    );
    assert!(
        refused
            .iter()
            .any(|x| x.starts_with("DNS query for phone-home.example")),
        "{refused:?}"
    );
}

/// /etc as ETC_STATE printed it, the same before and after; else the
/// lines each side alone has.
fn assert_etc_unchanged(before: &str, after: &str, what: &str) {
    if after != before {
        let a: Vec<&str> = before.lines().collect();
        let b: Vec<&str> = after.lines().collect();
        let gone: Vec<&&str> = a.iter().filter(|l| !b.contains(l)).collect();
        let new: Vec<&&str> = b.iter().filter(|l| !a.contains(l)).collect();
        panic!("/etc ({what}) changed: before only {gone:?}, after only {new:?}");
    }
}

/// The seal test's VPS services (see the test below), enabled and started.
fn seal_setup(port: u16) -> String {
    format!(
        r#"set -e
cat > /etc/systemd/system/drydock-app.service <<'U'
[Unit]
Description=an app that logs its boot id every second
[Service]
ExecStart=/bin/sh -c 'while :; do echo "$(cat /proc/sys/kernel/random/boot_id) app" >> /var/lib/drydock-app.log; sleep 1; done'
[Install]
WantedBy=multi-user.target
U
cat > /etc/systemd/system/drydock-marker.service <<'U'
[Service]
Type=oneshot
ExecStart=/bin/sh -c 'echo "$(cat /proc/sys/kernel/random/boot_id) timer" >> /var/lib/drydock-timer.log'
U
cat > /etc/systemd/system/drydock-marker.timer <<'U'
[Timer]
OnBootSec=5
OnUnitActiveSec=10
[Install]
WantedBy=timers.target
U
cat > /etc/systemd/system/drydock-phone.service <<'U'
[Service]
ExecStart=/bin/sh -c 'while :; do (exec 3<>/dev/tcp/10.0.2.2/{port}) 2>/dev/null && echo "$(cat /proc/sys/kernel/random/boot_id) reached" >> /var/lib/drydock-phone.log; getent hosts phone-home.example >/dev/null && echo "$(cat /proc/sys/kernel/random/boot_id) resolved" >> /var/lib/drydock-phone.log; sleep 2; done'
[Install]
WantedBy=multi-user.target
U
echo '* * * * * root echo "$(cat /proc/sys/kernel/random/boot_id) cron" >> /var/lib/drydock-cron.log' > /etc/cron.d/drydock-test
systemctl daemon-reload
systemctl enable --now drydock-app.service drydock-marker.timer drydock-phone.service >/dev/null 2>&1
sleep 3; grep -c app /var/lib/drydock-app.log"#
    )
}

/// The whole pipeline against a real Debian VPS, with a `--run` change,
/// and the sealed worker VM (issue 11). The VPS runs an app that logs its
/// boot id every second, a timer and a cron entry that log theirs, and a
/// service that keeps trying to reach a listener on the workstation and to
/// resolve a name. The run is killed outright in the middle of the upgrade
/// step (the worker VM must die with it, the VPS stays frozen), then
/// resumed to the end, so the seal holds on a resumed run's boots too. The
/// VPS comes back rebooted, read-write, with the change; no line on it
/// comes from a worker boot, the listener saw nothing, the refusals are
/// named in the run log and the report, and the enabled units and /etc
/// are as they were, apart from the --run change.
/// The default `upgrade` (rehearsal on a live copy, freeze, pre-copy,
/// the rehearsal carried over), killed in the middle of the carry boot,
/// resumed: the worker VMs are sealed, the VPS comes back changed, the
/// upgrade did not run again, and what the VPS wrote after the live copy
/// was carried into the rehearsal's result (the service's log on the
/// upgraded VPS runs to the freeze, not to the live pull).
#[test]
fn upgrade_killed_mid_upgrade_resumes_sealed_and_the_vps_comes_back_changed() {
    let vps = Vps::start(12);
    let home = tempdir();
    let serving = Serving::start(&vps);
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    listener.set_nonblocking(true).unwrap();
    assert!(vps.ssh(&seal_setup(port)).trim().parse::<u32>().unwrap() > 0);
    let boot_before = vps.boot_id();
    let etc_before = vps.ssh(ETC_STATE);
    assert!(vps.ssh("cat /etc/motd").contains("Debian"));
    // Slow enough to be killed in the middle of; then what a copy of the
    // server would try, and apt through the proxy.
    let cmd = format!(
        "sleep 20; {CHANGE}; (exec 3<>/dev/tcp/10.0.2.2/{port}) 2>/dev/null && echo reached > /etc/drydock-reached; \
         getent hosts phone-home.example && echo resolved > /etc/drydock-resolved; \
         apt-get -q update"
    );
    let mut child = vps
        .drydock(
            home.path(),
            &[
                "upgrade",
                &vps.host(),
                "-i",
                vps.key.to_str().unwrap(),
                "--accept-new-host-key",
                "--run",
                &cmd,
                "--yes",
                "--memory",
                "2G",
                "--cpus",
                "2",
            ],
        )
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(home.path().join("upgrade.stderr")).unwrap())
        .spawn()
        .unwrap();
    let runs = home.path().join("state/drydock/runs");
    let t0 = Instant::now();
    // The command runs once, in the rehearsal's worker VM; killed in the
    // carry boot, the worker VM up on the rehearsal's result.
    let run_dir = loop {
        let found = std::fs::read_dir(&runs)
            .ok()
            .and_then(|mut d| d.next())
            .and_then(|e| e.ok())
            .map(|e| e.path());
        if let Some(d) = found {
            let done = std::fs::read_to_string(d.join("journal.json")).unwrap_or_default();
            if done.contains("\"step\": \"pull\"")
                && d.join("carry-live.qcow2").exists()
                && qemu_running_in(&d)
            {
                std::thread::sleep(Duration::from_secs(20));
                break d;
            }
        }
        assert!(
            t0.elapsed() < Duration::from_secs(2400),
            "the run never reached the upgrade step"
        );
        assert!(child.try_wait().unwrap().is_none(), "drydock ended early");
        std::thread::sleep(Duration::from_millis(500));
    };
    child.kill().unwrap();
    child.wait().unwrap();
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        !qemu_running_in(&run_dir),
        "the worker VM outlived a killed drydock"
    );
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("journal.json")).unwrap())
            .unwrap();
    let done: Vec<&str> = j["done"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["step"].as_str().unwrap())
        .collect();
    assert_eq!(
        done,
        vec!["probe", "live-pull", "rehearse", "prove", "freeze", "pull"]
    );
    let err = std::fs::read_to_string(home.path().join("upgrade.stderr")).unwrap();
    assert!(err.contains("the rehearsal passed"), "{err}");
    assert!(
        err.contains("pre-copy: ") && err.contains(" blocks of "),
        "{err}"
    );
    assert_eq!(
        vps.ssh("grep ' / ' /proc/self/mounts | cut -d' ' -f4 | cut -d, -f1")
            .trim(),
        "ro",
        "the VPS should still be frozen"
    );
    let o = vps
        .drydock(home.path(), &["runs", "--size"])
        .output()
        .unwrap();
    assert!(
        stdout(&o).contains("stopped before: upgrade in the local VM"),
        "{}",
        stdout(&o)
    );
    // What the run keeps (base.raw: the pulled disk, sparse), and that it
    // is not removed while the VPS is frozen.
    assert!(
        stdout(&o).contains(" in 1 run(s); `drydock runs rm RUN` removes one"),
        "{}",
        stdout(&o)
    );
    let o = vps
        .drydock(home.path(), &["runs", "rm", run_dir.to_str().unwrap()])
        .output()
        .unwrap();
    assert_exit(&o, 3);
    assert_stderr(
        &o,
        format!(
            "the VPS of run {} ({}) is still frozen: this run's base image is what gives it back",
            run_dir.display(),
            vps.host()
        ),
    );
    assert!(run_dir.join("base.raw").exists());

    let o = vps
        .drydock(
            home.path(),
            &["resume", run_dir.to_str().unwrap(), "--yes", "--json"],
        )
        .output()
        .unwrap();
    assert_exit(&o, 0);
    assert_stderr(&o, "resuming");
    let r = json(&o);
    eprintln!("{}", serde_json::to_string_pretty(&r).unwrap());
    // The stream a wrapper follows: the steps left, each started then
    // finished, the worker VM's overlay pushed with progress.
    assert_steps(&o, &["upgrade", "push", "reboot", "check"]);

    // What a user checks on the VPS afterwards: the change, a new boot, rw again.
    assert_eq!(
        vps.ssh("cat /etc/drydock-was-here").trim(),
        "upgraded offline by drydock"
    );
    assert_eq!(
        vps.ssh("test -e /etc/motd && echo yes || echo no").trim(),
        "no"
    );
    assert_ne!(vps.boot_id(), boot_before);
    assert_eq!(
        vps.ssh("grep ' / ' /proc/self/mounts | cut -d' ' -f4 | cut -d, -f1")
            .trim(),
        "rw"
    );
    assert_eq!(r["os_after"], "Debian GNU/Linux 12 (bookworm)");
    let (pulled, pushed) = (
        r["bytes_pulled"].as_u64().unwrap(),
        r["bytes_pushed"].as_u64().unwrap(),
    );
    assert!(
        pushed > 0 && pushed < pulled / 4,
        "a delta push moves little: pulled {pulled}, pushed {pushed}"
    );
    assert!(r["downtime_seconds"].as_f64().unwrap() > 0.0);
    let live = r["bytes_pulled_live"].as_u64().unwrap();
    let frozen = pulled - live;
    eprintln!("live pull: {live} bytes on the wire; pre-copy after the freeze: {frozen}");
    assert!(
        frozen * 4 < live,
        "the pre-copy sent {frozen} bytes, the live pull {live}"
    );
    assert!(r["rehearsal_seconds"].as_f64().unwrap() > 0.0, "{r}");
    assert!(r["delta_blocks"].as_u64().unwrap() > 0, "{r}");
    // Carried over: the command ran once, in the rehearsal.
    assert_eq!(r["carried"]["carried"], true, "{r}");
    assert!(r["carried"]["entries"].as_u64().unwrap() > 0, "{r}");
    let ran =
        std::fs::read_to_string(std::path::Path::new(r["run"].as_str().unwrap()).join("run.log"))
            .unwrap()
            .matches("sleep 20")
            .count();
    assert_eq!(ran, 1, "the --run ran {ran} times");
    assert!(r["pushed_blocks"].as_u64().unwrap() > 0, "{r}");
    // The service wrote through the live part; what it wrote up to the
    // freeze is on the upgraded disk: the pre-copy brought the base up to
    // the frozen disk, not only to the live copy.
    let live_seconds = r["live_seconds"].as_f64().unwrap();
    let last = serving.last();
    assert!(
        last + 15 >= started + live_seconds as u64,
        "the log on the VPS ends at {last}, {} s after the run started; the live part took \
         {live_seconds:.0} s",
        last.saturating_sub(started)
    );
    // Helper mode by default, within its memory budget on the 1 GB VPS.
    assert_eq!(r["pull_transfer"], "helper", "{r}");
    assert_eq!(r["push_transfer"], "helper", "{r}");
    let rss = r["helper_peak_rss_kib"].as_u64().unwrap();
    assert!(rss > 0 && rss <= 16 * 1024, "helper peak RSS {rss} KiB");

    let list = |k: &str| str_list(&r, k);
    let held = list("held_back");
    for u in [
        "drydock-app.service",
        "drydock-marker.timer",
        "drydock-phone.service",
        "cron.service",
    ] {
        assert!(held.contains(&u.to_string()), "{u} not held back: {held:?}");
    }
    assert_eq!(r["network"], "sealed");
    assert!(
        list("allowed_hosts").contains(&"deb.debian.org".to_string()),
        "{r}"
    );
    assert_phone_refused(&r, port);
    // The service proof: the VPS's services ran on the upgraded copy
    // before the freeze (the phone service too, its network sealed), cron
    // was held back there, and after the reboot the VPS runs them all.
    let set = list("services");
    for u in [
        "drydock-app.service",
        "drydock-phone.service",
        "ssh.service",
        "cron.service",
    ] {
        assert!(set.contains(&u.to_string()), "{u} not in the set: {set:?}");
    }
    assert!(
        !set.contains(&"serving.service".to_string()),
        "a transient unit is no service of the VPS: {set:?}"
    );
    let proof = &r["service_proof"];
    let up = str_list(proof, "up");
    for u in [
        "drydock-app.service",
        "drydock-phone.service",
        "ssh.service",
    ] {
        assert!(
            up.contains(&u.to_string()),
            "{u} not up in the proof: {proof}"
        );
    }
    assert_eq!(proof["failed"], serde_json::json!([]), "{proof}");
    assert!(
        proof["not_proven"].to_string().contains("cron.service"),
        "cron ran in the proof: {proof}"
    );
    // The proof's window is short (the init settles, two readings 10 s
    // apart): the phone's first tries may come before its network is up
    // (no packet) and its name lookup waits out its timeouts, so one of
    // its two ways is what the proof can be sure to see (CI saw only the
    // DNS query once).
    assert!(
        str_list(proof, "refused").iter().any(|x| {
            x == &format!("tcp 10.0.2.2:{port}")
                || x.starts_with("DNS query for phone-home.example")
        }),
        "the phone service's attempt in the proof: {proof}"
    );
    let after = &r["services_after"];
    let up = str_list(after, "up");
    for u in [
        "drydock-app.service",
        "drydock-phone.service",
        "cron.service",
        "ssh.service",
    ] {
        assert!(
            up.contains(&u.to_string()),
            "{u} not up on the VPS after the push: {after}"
        );
    }
    assert_eq!(after["failed"], serde_json::json!([]), "{after}");
    assert_eq!(after["missing"], serde_json::json!([]), "{after}");
    let run = r["run"].as_str().unwrap();
    // Every file of the run (images, overlay, logs, journal) is its
    // owner's only.
    assert_eq!(
        readable_by_others(std::path::Path::new(run)),
        Vec::<String>::new()
    );
    let log = std::fs::read_to_string(std::path::Path::new(run).join("run.log")).unwrap();
    assert!(
        log.contains(&format!("network: refused tcp 10.0.2.2:{port}")),
        "{log}"
    );
    assert!(
        log.contains("network: refused DNS query for phone-home.example"),
        "{log}"
    );
    assert!(
        log.contains("network: allowed http://deb.debian.org"),
        "{log}"
    );

    // On the VPS afterwards.
    assert!(
        listener.accept().is_err(),
        "the workstation's listener saw a connection"
    );
    assert_eq!(
        vps.ssh("ls /etc/drydock-reached /etc/drydock-resolved /usr/sbin/policy-rc.d /etc/systemd/system.control 2>/dev/null | wc -l").trim(),
        "0"
    );
    let boot_after = vps.boot_id();
    assert_ne!(boot_after, boot_before);
    let ids = vps.ssh("cat /var/lib/drydock-app.log /var/lib/drydock-timer.log /var/lib/drydock-cron.log /var/lib/drydock-phone.log 2>/dev/null | cut -d' ' -f1 | sort -u");
    for id in ids.lines() {
        assert!(
            id == boot_before || id == boot_after,
            "a line on the VPS from a boot that is not the VPS's own ({id}): {ids}"
        );
    }
    assert!(
        !vps.ssh("cat /var/lib/drydock-phone.log 2>/dev/null; true")
            .contains("reached"),
        "the phone service reached the workstation"
    );
    // Enabled units and /etc as before (the --run change is excluded).
    assert_etc_unchanged(&etc_before, &vps.ssh(ETC_STATE), "enabled units included");

    let o = vps.drydock(home.path(), &["runs"]).output().unwrap();
    assert!(
        stdout(&o).contains(&format!("{}  done", vps.host())),
        "{}",
        stdout(&o)
    );
    let o = vps
        .drydock(home.path(), &["resume", run_dir.to_str().unwrap()])
        .output()
        .unwrap();
    assert_exit(&o, 3);
    assert_stderr(&o, "is done; nothing to resume");
    let o = vps
        .drydock(home.path(), &["runs", "rm", run_dir.to_str().unwrap()])
        .output()
        .unwrap();
    assert_exit(&o, 0);
    assert!(
        stdout(&o).starts_with(&format!("removed {} (", run_dir.display())),
        "{}",
        stdout(&o)
    );
    assert!(!run_dir.exists());
}

/// A service on the VPS that writes the time every second (a line of
/// `date +%s` to /var/lib/serving.log), and what the tests check of it.
struct Serving<'a> {
    vps: &'a Vps,
    boot: String,
}

impl<'a> Serving<'a> {
    fn start(vps: &'a Vps) -> Serving<'a> {
        vps.ssh(
            "systemd-run --unit=serving sh -c 'while :; do date +%s >> /var/lib/serving.log; sleep 1; done' >/dev/null 2>&1",
        );
        Serving {
            vps,
            boot: vps.boot_id(),
        }
    }

    fn lines(&self) -> u64 {
        self.vps
            .ssh("wc -l < /var/lib/serving.log")
            .trim()
            .parse()
            .unwrap()
    }

    fn last(&self) -> u64 {
        self.vps
            .ssh("tail -n 1 /var/lib/serving.log")
            .trim()
            .parse()
            .unwrap()
    }

    /// WHAT left the VPS as it was: the same boot, the service running and
    /// writing (more than BEFORE lines), / read-write, the change not
    /// there.
    fn still_serving(&self, what: &str, before: u64) {
        let vps = self.vps;
        assert_eq!(vps.boot_id(), self.boot, "{what}: the VPS rebooted");
        assert_eq!(
            vps.ssh("systemctl is-active serving").trim(),
            "active",
            "{what}: the service stopped"
        );
        assert!(
            self.lines() > before,
            "{what}: the service wrote nothing meanwhile"
        );
        assert_eq!(
            vps.ssh("grep ' / ' /proc/self/mounts | cut -d' ' -f4 | cut -d, -f1")
                .trim(),
            "rw",
            "{what}: / is not read-write"
        );
        assert_eq!(
            vps.ssh("test -e /etc/drydock-was-here && echo yes || echo no")
                .trim(),
            "no",
            "{what}: the change reached the VPS"
        );
    }
}

/// `drydock upgrade` rehearses on a live copy first. A rehearsal that
/// fails stops the run before the freeze: the VPS kept serving, and abort
/// has nothing to give back. (One that passes, the freeze and the
/// pre-copy after it: `upgrade_killed_mid_upgrade_resumes_sealed_...`.)
#[test]
#[ignore = "long tier: scripts/test-zoo runs it (the default suite stops a rehearsal at its service proof)"]
fn zoo_a_failing_rehearsal_stops_before_the_freeze() {
    let vps = Vps::start(12);
    let home = tempdir();
    let serving = Serving::start(&vps);

    let before = serving.lines();
    let o = vps
        .upgrade_as_users_run_it(
            home.path(),
            &format!("{CHANGE}; echo the upgrade broke here; exit 7"),
            &[],
        )
        .output()
        .unwrap();
    assert_exit(&o, 1);
    assert_stderr(&o, "failed in the guest (exit status 7)");
    assert_stderr(&o, "the upgrade broke here");
    assert_stderr(&o, "the rehearsal's step 'rehearse in the local VM");
    assert_stderr(
        &o,
        "nothing on the VPS changed: it was not frozen and kept serving",
    );
    assert!(
        !events(&o)
            .iter()
            .any(|e| e["type"] == "step" && e["step"] == "freeze"),
        "the run went on to the freeze"
    );
    serving.still_serving("a failed rehearsal", before);
    eprintln!(
        "a failed rehearsal: {}",
        stderr(&o).lines().last().unwrap_or("")
    );
    let runs = home.path().join("state/drydock/runs");
    let run = std::fs::read_dir(&runs)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let o = vps
        .drydock(home.path(), &["abort", run.to_str().unwrap()])
        .output()
        .unwrap();
    assert_exit(&o, 0);
    assert_stderr(&o, "the VPS was never frozen: nothing to give back");
    std::fs::remove_dir_all(&run).unwrap();
}

/// The service proof (issue 31): a `--run` that renames one of the VPS's
/// services (as a release upgrade renames php8.2-fpm to php8.4-fpm) passes
/// the rehearsal's verify boot (the VPS's services are held back there),
/// and is stopped by the proof, before the freeze: the unit named as gone,
/// with the new one of a similar name, the ways on given, the VPS serving
/// throughout. The proof held back what the VPS did not run (its timer,
/// cron) and ran what the upgrade enabled (the renamed unit). `resume
/// --accept-failed` of that unit goes on from the recorded proof without
/// booting again. (A unit that fails, with its journal lines: the zoo's
/// after-push test.)
#[test]
fn a_service_the_upgrade_renames_stops_the_run_before_the_freeze() {
    let vps = Vps::start(12);
    let home = tempdir();
    let serving = Serving::start(&vps);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    assert!(vps.ssh(&seal_setup(port)).trim().parse::<u32>().unwrap() > 0);
    vps.ssh(
        "printf '[Service]\\nExecStart=/bin/sleep infinity\\n[Install]\\nWantedBy=multi-user.target\\n' \
         > /etc/systemd/system/drydock-app-1.0.service && systemctl daemon-reload \
         && systemctl enable --now drydock-app-1.0.service",
    );
    let before = serving.lines();
    let renamed = format!(
        "{CHANGE}; systemctl disable drydock-app-1.0.service; \
         mv /etc/systemd/system/drydock-app-1.0.service /etc/systemd/system/drydock-app-2.0.service; \
         systemctl enable drydock-app-2.0.service"
    );
    let o = vps
        .upgrade_as_users_run_it(home.path(), &renamed, &[])
        .output()
        .unwrap();
    eprintln!("{}", stderr(&o));
    assert_exit(&o, 3);
    assert_stderr(
        &o,
        "the service proof failed: 1 unit(s) the VPS runs did not run on the upgraded copy",
    );
    assert_stderr(
        &o,
        "  drydock-app-1.0.service: no longer exists (removed or renamed by the upgrade); a unit \
         of a similar name exists: drydock-app-2.0.service",
    );
    assert_stderr(
        &o,
        "the VPS was not frozen and kept serving; nothing on it changed",
    );
    assert_stderr(&o, "--accept-failed drydock-app-1.0.service");
    let ev = events(&o);
    assert!(
        !ev.iter()
            .any(|e| e["type"] == "step" && e["step"] == "freeze"),
        "the run went on to the freeze"
    );
    serving.still_serving("a failed service proof", before);
    let run = std::fs::read_dir(home.path().join("state/drydock/runs"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("journal.json")).unwrap()).unwrap();
    let proof = &j["services"]["proof"];
    let up = str_list(proof, "up");
    for u in [
        "drydock-app.service",
        "drydock-phone.service",
        "ssh.service",
    ] {
        assert!(
            up.contains(&u.to_string()),
            "{u} not up in the proof: {proof}"
        );
    }
    assert!(
        proof["not_proven"].to_string().contains("cron.service"),
        "{proof}"
    );
    assert!(
        !up.contains(&"drydock-app-2.0.service".to_string()),
        "a unit the VPS did not run is no unit of the set: {proof}"
    );
    // The throwaway overlay is gone; the upgraded copy is what was proven.
    assert!(!run.join("proof.qcow2").exists());
    assert!(run.join("upgraded.raw").exists());

    // Accepted: the recorded proof passes, no VM boots again (the run then
    // goes on to the freeze; it is stopped at its question instead).
    let o = vps
        .drydock(
            home.path(),
            &[
                "resume",
                run.to_str().unwrap(),
                "--accept-failed",
                "drydock-app-1.0.service",
            ],
        )
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_stderr(&o, "the service proof passed on the upgraded copy: ");
    assert_stderr(
        &o,
        "not running, accepted (--accept-failed): drydock-app-1.0.service",
    );
    assert_stderr(&o, "Freeze ");
    serving.still_serving("a freeze that was not confirmed", before);
    let o = vps
        .drydock(home.path(), &["abort", run.to_str().unwrap()])
        .output()
        .unwrap();
    assert_exit(&o, 0);
    assert_stderr(&o, "the VPS was never frozen: nothing to give back");
    std::fs::remove_dir_all(&run).unwrap();
}

/// An app whose new version (the `--run`: /etc/app-v2) refuses an option
/// of its configuration (/etc/app.conf: "legacy").
const V2APP_SETUP: &str = r#"set -e
cat > /etc/systemd/system/drydock-v2app.service <<'U'
[Service]
ExecStart=/bin/sh -c 'if [ -e /etc/app-v2 ] && grep -q legacy /etc/app.conf; then echo "app v2: the legacy option was removed" >&2; exit 1; fi; while :; do echo "$(cat /proc/sys/kernel/random/boot_id)" >> /var/lib/drydock-v2app.log; sleep 1; done'
[Install]
WantedBy=multi-user.target
U
echo mode=normal > /etc/app.conf
systemctl daemon-reload
systemctl enable --now drydock-v2app.service >/dev/null 2>&1
systemctl is-active drydock-v2app.service"#;

/// `upgrade --run 'touch /etc/app-v2'` (and EXTRA) to its end, the VPS
/// writing "legacy" into the app's configuration once the live copy is
/// taken (while the rehearsal runs): the run folder and the output.
fn upgrade_with_a_late_change(
    vps: &Vps,
    home: &std::path::Path,
    extra: &[&str],
) -> (PathBuf, std::process::Output) {
    let runs = home.join("state/drydock/runs");
    let before: Vec<PathBuf> = std::fs::read_dir(&runs)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    let child = vps
        .upgrade_as_users_run_it(home, "touch /etc/app-v2", extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    let run = loop {
        let found = std::fs::read_dir(&runs)
            .ok()
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .find(|p| !before.contains(p));
        if let Some(d) = found
            && std::fs::read_to_string(d.join("journal.json"))
                .unwrap_or_default()
                .contains("\"step\": \"live-pull\"")
        {
            vps.ssh("echo legacy=1 >> /etc/app.conf");
            break d;
        }
        assert!(t0.elapsed() < Duration::from_secs(1800), "no live pull");
        std::thread::sleep(Duration::from_millis(500));
    };
    (run, child.wait_with_output().unwrap())
}

/// After the push (issue 31): a change the proof cannot see. The proof
/// runs on the rehearsal's result, taken live; the VPS then changes its
/// app's configuration, the carry takes that into the upgraded copy, and
/// the upgraded app refuses it. The proof passes, the push and the reboot
/// happen, and the check finds the app not running: exit 4, the unit named
/// with its journal, the way back given. `drydock abort RUN` takes it: the
/// VPS is back on its old disk, serving (what it wrote since its reboot
/// kept in the run's upgraded.raw). Then the same run with
/// --rollback-on-failure, which gives the VPS back by itself.
#[test]
#[ignore = "long tier: scripts/test-zoo runs it"]
fn zoo_a_change_the_proof_cannot_see_fails_after_the_push_and_is_rolled_back() {
    let vps = Vps::start(12);
    let home = tempdir();
    assert_eq!(vps.ssh(V2APP_SETUP).trim(), "active");
    let boot_before = vps.boot_id();
    let (run, o) = upgrade_with_a_late_change(&vps, home.path(), &[]);
    eprintln!("{}", stderr(&o));
    assert_exit(&o, 4);
    assert_stderr(&o, "the service proof passed on the upgraded copy");
    assert_stderr(
        &o,
        format!(
            "1 unit(s) that {} ran before do not run after the upgrade:",
            vps.host()
        ),
    );
    assert_stderr(&o, "  drydock-v2app.service: ");
    assert_stderr(&o, "app v2: the legacy option was removed");
    assert_stderr(
        &o,
        format!(
            "`drydock abort {}` gives {} its old disk back",
            run.display(),
            vps.host()
        ),
    );
    // The VPS runs the upgraded disk, without its app.
    assert_ne!(vps.boot_id(), boot_before);
    assert_eq!(vps.ssh("ls /etc/app-v2").trim(), "/etc/app-v2");
    assert_ne!(
        vps.ssh("systemctl is-active drydock-v2app.service; true")
            .trim(),
        "active"
    );
    let upgraded_boot = vps.boot_id();
    // The run is the way back: not removed without --force.
    let o = vps
        .drydock(home.path(), &["runs", "rm", run.to_str().unwrap()])
        .output()
        .unwrap();
    assert_exit(&o, 3);
    assert_stderr(&o, "running the upgraded disk and did not pass its check");

    let o = vps
        .drydock(home.path(), &["abort", run.to_str().unwrap(), "--yes"])
        .output()
        .unwrap();
    eprintln!("{}", stderr(&o));
    assert_exit(&o, 0);
    assert_stderr(&o, "is kept in");
    assert_stderr(&o, "pushing the base image back");
    assert_stderr(
        &o,
        format!(
            "{} is back on its old disk, running Debian GNU/Linux 12",
            vps.host()
        ),
    );
    assert_stderr(&o, "its services: ");
    assert!(!stderr(&o).contains("NOT running"), "{}", stderr(&o));
    // Back as at the freeze: the old app and its configuration, serving.
    assert_ne!(vps.boot_id(), upgraded_boot);
    assert_eq!(
        vps.ssh("test -e /etc/app-v2 && echo yes || echo no").trim(),
        "no"
    );
    assert!(vps.ssh("cat /etc/app.conf").contains("legacy=1"));
    assert_eq!(
        vps.ssh("systemctl is-active drydock-v2app.service").trim(),
        "active"
    );
    assert_eq!(
        vps.ssh("grep ' / ' /proc/self/mounts | cut -d' ' -f4 | cut -d, -f1")
            .trim(),
        "rw"
    );
    // What the VPS wrote on the upgraded disk is kept in the run.
    assert!(run.join("upgraded.raw").exists());
    let o = vps.drydock(home.path(), &["runs"]).output().unwrap();
    assert!(stdout(&o).contains("aborted"), "{}", stdout(&o));

    // --rollback-on-failure: the same, by itself (the configuration as
    // before, so that the proof passes again).
    vps.ssh("echo mode=normal > /etc/app.conf");
    let (run, o) = upgrade_with_a_late_change(&vps, home.path(), &["--rollback-on-failure"]);
    eprintln!("{}", stderr(&o));
    assert_exit(&o, 4);
    assert_stderr(&o, "--rollback-on-failure: giving");
    assert_stderr(&o, "rolled back (--rollback-on-failure): ");
    assert_stderr(&o, "is back on its old disk, running Debian GNU/Linux 12");
    assert_eq!(
        vps.ssh("test -e /etc/app-v2 && echo yes || echo no").trim(),
        "no"
    );
    assert_eq!(
        vps.ssh("systemctl is-active drydock-v2app.service").trim(),
        "active"
    );
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("journal.json")).unwrap()).unwrap();
    assert_eq!(j["state"], "aborted");
    assert_eq!(j["services"]["rollback"]["pushed"], true);
}

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

/// What the rehearsal downloaded is served again to the real upgrade's
/// worker VM from the run's downloads (the sealed proxy's cache on the
/// workstation), not fetched again; none of it is on the VPS afterwards.
/// (`--no-carry`: the upgrade runs again, as when the VPS changed what
/// the upgrade owns.)
#[test]
#[ignore = "long tier: scripts/test-zoo runs it"]
fn zoo_the_upgrade_reuses_the_rehearsals_downloads() {
    let vps = Vps::start(12);
    let home = tempdir();
    assert!(vps.ssh("command -v hello || echo none").contains("none"));
    let cmd = format!(
        "{CHANGE}; apt-get -q update && apt-get -y -q install --no-install-recommends hello \
         && apt-get clean"
    );
    let o = vps
        .upgrade_as_users_run_it(home.path(), &cmd, &["--no-carry"])
        .output()
        .unwrap();
    assert_exit(&o, 0);
    let r = json(&o);
    eprintln!("{}", serde_json::to_string_pretty(&r).unwrap());
    let rehearsal = &r["rehearsal_downloads"];
    let upgrade = &r["downloads"];
    assert!(rehearsal["stored_files"].as_u64().unwrap() >= 1, "{r}");
    assert!(upgrade["reused_files"].as_u64().unwrap() >= 1, "{r}");
    // What the rehearsal kept was asked for again, and served: at most
    // what changed on the mirror in between is fetched again.
    assert!(
        upgrade["reused_bytes"].as_u64().unwrap() * 2
            >= rehearsal["stored_bytes"].as_u64().unwrap(),
        "the upgrade fetched again what the rehearsal had: {r}"
    );
    assert_eq!(vps.ssh("hello").trim(), "Hello, world!");
    // The run's downloads stayed on the workstation.
    let runs = home.path().join("state/drydock/runs");
    let run = std::fs::read_dir(&runs)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    assert!(std::fs::read_dir(run.join("downloads")).unwrap().count() >= 1);
    assert_eq!(
        vps.ssh("ls /var/cache/apt/archives/*.deb 2>/dev/null | wc -l")
            .trim(),
        "0"
    );
}

/// `drydock rehearse` alone: the report's prediction, nothing on the VPS
/// changed, `runs` says "rehearsed".
#[test]
#[ignore = "long tier: scripts/test-zoo runs it"]
fn zoo_rehearse_alone_predicts_the_push_and_leaves_the_vps_serving() {
    let vps = Vps::start(12);
    let home = tempdir();
    let serving = Serving::start(&vps);
    let before = serving.lines();
    let o = vps
        .run_as_users_do("rehearse", home.path(), CHANGE, &[])
        .output()
        .unwrap();
    assert_exit(&o, 0);
    assert_steps(&o, &["probe", "live-pull", "rehearse", "prove"]);
    let r = json(&o);
    assert_eq!(r["rehearsal"], true);
    assert_eq!(r["os_after"], "Debian GNU/Linux 12 (bookworm)");
    assert!(r["delta_bytes"].as_u64().unwrap() > 0, "{r}");
    assert!(r["downtime_seconds"].is_null(), "{r}");
    serving.still_serving("a rehearsal", before);
    let o = vps.drydock(home.path(), &["runs"]).output().unwrap();
    assert!(stdout(&o).contains("  rehearsed\n"), "{}", stdout(&o));
}

/// Spawn CMD (with --json) and send it SIG once its event stream shows an
/// event WANT accepts: the events it printed, how it ended, its stderr.
fn signal_at(
    mut cmd: Command,
    want: impl Fn(&serde_json::Value) -> bool,
    sig: &str,
    what: &str,
) -> (Vec<serde_json::Value>, std::process::ExitStatus, String) {
    use std::io::{BufRead, Read};
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (out, mut err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let stderr = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines() {
            let Ok(l) = line else { break };
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(2400);
    let (mut seen, mut sent) = (Vec::new(), false);
    loop {
        match rx.recv_timeout(Duration::from_secs(1)) {
            Ok(l) => {
                let v: serde_json::Value = serde_json::from_str(&l).unwrap();
                if !sent && want(&v) {
                    let pid = child.id().to_string();
                    assert!(
                        Command::new("kill")
                            .args([sig, &pid])
                            .status()
                            .unwrap()
                            .success()
                    );
                    sent = true;
                }
                seen.push(v);
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                assert!(Instant::now() < deadline, "{what}: not reached in 40 min");
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    let status = child.wait().unwrap();
    let stderr = stderr.join().unwrap();
    assert!(
        sent,
        "{what}: the command ended before it got there: {stderr}"
    );
    (seen, status, stderr)
}

fn step_started(step: &'static str) -> impl Fn(&serde_json::Value) -> bool {
    move |e| e["type"] == "step" && e["state"] == "started" && e["step"] == step
}

/// kill -9 of drydock at the start of every step of an upgrade, each time
/// `drydock resume` of the run again, until the last resume finishes: the
/// VPS comes back changed. Then a second run, stopped with SIGTERM in the
/// middle of its pull (exit 130, resumable, said so), resumed, killed -9
/// when its worker VM starts, and aborted: the VPS is back as it was.
#[test]
#[ignore = "long tier: scripts/test-zoo runs it (kill_9_at_every_step)"]
fn zoo_kill_9_at_every_step_of_an_upgrade_then_resume_and_abort() {
    let vps = Vps::start(12);
    let home = tempdir();
    let boot_before = vps.boot_id();
    let upgrade = |cmd: &str| vps.upgrade_cmd(home.path(), cmd, &[]);
    let runs = home.path().join("state/drydock/runs");
    let only_run = || {
        let mut d: Vec<_> = std::fs::read_dir(&runs)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .collect();
        d.sort();
        d.pop().unwrap()
    };
    let (_, status, err) = signal_at(
        upgrade(CHANGE),
        step_started("probe"),
        "-KILL",
        "kill at probe",
    );
    assert_eq!(status.code(), None, "{err}");
    let run = only_run();
    for step in [
        "freeze", "pull", "upgrade", "prove", "push", "reboot", "check",
    ] {
        let t0 = Instant::now();
        let resume = vps.drydock(
            home.path(),
            &["resume", run.to_str().unwrap(), "--yes", "--json"],
        );
        let (_, status, err) = signal_at(resume, step_started(step), "-KILL", step);
        assert_eq!(status.code(), None, "{step}: {err}");
        std::thread::sleep(Duration::from_secs(2));
        assert!(
            !qemu_running_in(&run),
            "{step}: a worker VM outlived a killed drydock"
        );
        eprintln!(
            "killed -9 as step '{step}' started ({:.0} s after its resume)",
            t0.elapsed().as_secs_f64()
        );
    }
    let o = vps
        .drydock(
            home.path(),
            &["resume", run.to_str().unwrap(), "--yes", "--json"],
        )
        .output()
        .unwrap();
    assert_exit(&o, 0);
    assert_steps(&o, &["check"]);
    assert_eq!(
        vps.ssh("cat /etc/drydock-was-here").trim(),
        "upgraded offline by drydock"
    );
    assert_ne!(vps.boot_id(), boot_before);
    assert_eq!(
        vps.ssh("grep ' / ' /proc/self/mounts | cut -d' ' -f4 | cut -d, -f1")
            .trim(),
        "rw"
    );
    eprintln!("seven kills -9, one per step, then the resume finished: the VPS runs the change");

    // The second run: SIGTERM mid-pull, resume, kill -9 as the worker VM
    // starts, abort.
    let boot = vps.boot_id();
    let second = "echo second > /etc/drydock-second";
    let (ev, status, err) = signal_at(
        upgrade(second),
        |e| e["type"] == "progress" && e["what"] == "pull" && e["bytes_done"].as_u64() > Some(0),
        "-TERM",
        "SIGTERM mid-pull",
    );
    assert_eq!(status.code(), Some(130), "{err}");
    let run2 = only_run();
    let r2 = run2.display();
    assert!(
        err.contains(&format!(
            "step 'pull' of run {r2} did not finish; `drydock resume {r2}` retries it, \
             `drydock abort {r2}` gives the VPS back as it was: interrupted (SIGTERM)"
        )),
        "{err}"
    );
    assert_eq!(ev.last().unwrap()["type"], "error", "{ev:?}");
    let resume = vps.drydock(
        home.path(),
        &["resume", run2.to_str().unwrap(), "--yes", "--json"],
    );
    let (_, status, err) = signal_at(resume, step_started("upgrade"), "-KILL", "kill at upgrade");
    assert_eq!(status.code(), None, "{err}");
    assert!(err.contains("resuming"), "{err}");
    let o = vps
        .drydock(home.path(), &["abort", run2.to_str().unwrap(), "--yes"])
        .output()
        .unwrap();
    assert_exit(&o, 0);
    assert_eq!(
        vps.ssh("test -e /etc/drydock-second && echo yes || echo no")
            .trim(),
        "no"
    );
    assert_eq!(
        vps.boot_id(),
        boot,
        "aborted before the push: thawed, not rebooted"
    );
    assert_eq!(
        vps.ssh("grep ' / ' /proc/self/mounts | cut -d' ' -f4 | cut -d, -f1")
            .trim(),
        "rw"
    );
    eprintln!(
        "SIGTERM mid-pull (exit 130), resume, kill -9 at the worker VM, abort: the VPS is as it was"
    );

    // The third run, rehearsed first (as users run it): kill -9 mid live
    // pull, then as the rehearsal starts; no worker VM outlives drydock,
    // the VPS is never frozen and keeps its boot; abort ends the run.
    let boot = vps.boot_id();
    let third = "echo third > /etc/drydock-third";
    let (_, status, err) = signal_at(
        vps.upgrade_as_users_run_it(home.path(), third, &[]),
        |e| e["type"] == "progress" && e["what"] == "pull" && e["bytes_done"].as_u64() > Some(0),
        "-KILL",
        "kill -9 mid live pull",
    );
    assert_eq!(status.code(), None, "{err}");
    let run3 = only_run();
    assert_ne!(run3, run2);
    let resume = vps.drydock(
        home.path(),
        &["resume", run3.to_str().unwrap(), "--yes", "--json"],
    );
    let (_, status, err) = signal_at(
        resume,
        step_started("rehearse"),
        "-KILL",
        "kill -9 at rehearse",
    );
    assert_eq!(status.code(), None, "{err}");
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        !qemu_running_in(&run3),
        "a rehearsal's worker VM outlived a killed drydock"
    );
    assert_eq!(vps.boot_id(), boot, "a rehearsal never touches the VPS");
    assert_eq!(
        vps.ssh("grep ' / ' /proc/self/mounts | cut -d' ' -f4 | cut -d, -f1")
            .trim(),
        "rw",
        "never frozen"
    );
    let o = vps
        .drydock(home.path(), &["abort", run3.to_str().unwrap(), "--yes"])
        .output()
        .unwrap();
    assert_exit(&o, 0);
    assert_eq!(
        vps.ssh("test -e /etc/drydock-third && echo yes || echo no")
            .trim(),
        "no"
    );
    assert_eq!(vps.boot_id(), boot);
    eprintln!("kill -9 mid live pull and at the rehearsal, resume, abort: the VPS never stopped");
}

/// The network as Debian's installer sets it up: ifupdown, ISC dhclient
/// (which keeps its lease file open for writing), eth0. freeze then thaw:
/// dhclient stopped with its address kept, then started again with the app.
fn freeze_thaw_round_with_dhclient(vps: &Vps, home: &std::path::Path) {
    let addr = "ip -o -4 addr show dev eth0 | awk '{print $4}'";
    let address = vps.ssh(addr);
    assert!(address.starts_with("10.0.2."), "{address}");
    assert!(!vps.ssh("pgrep -x dhclient").trim().is_empty());

    // freeze then thaw: dhclient stopped with its address kept, then
    // started again with the app.
    let conn = [vps.host(), "-i".into(), vps.key.to_str().unwrap().into()];
    let conn: Vec<&str> = conn.iter().map(String::as_str).collect();
    let o = vps
        .drydock(
            home,
            &[&["freeze"], &conn[..], &["--accept-new-host-key", "--yes"]].concat(),
        )
        .output()
        .unwrap();
    assert_exit(&o, 0);
    assert!(stdout(&o).contains("dhclient"), "{}", stdout(&o));
    assert_eq!(
        vps.ssh("pgrep -x dhclient >/dev/null && echo running; systemctl is-active drydock-zoo-app.service; grep ' / ' /proc/mounts | cut -d' ' -f4 | cut -d, -f1"),
        "inactive\nro\n"
    );
    assert_eq!(vps.ssh(addr), address, "the freeze took the address away");
    let o = vps
        .drydock(home, &[&["thaw"], &conn[..]].concat())
        .output()
        .unwrap();
    assert_exit(&o, 0);
    assert!(
        stdout(&o).contains("started dhclient again"),
        "{}",
        stdout(&o)
    );
    assert_eq!(
        vps.ssh("pgrep -x dhclient >/dev/null && echo running; systemctl is-active drydock-zoo-app.service; grep ' / ' /proc/mounts | cut -d' ' -f4 | cut -d, -f1; ls /run/drydock-freeze 2>&1 | grep -c 'No such'"),
        "running\nactive\nrw\n1\n"
    );
}

/// What a user compares before and after a freeze that did not happen:
/// the running services, the active timers and sockets, and how / is
/// mounted. systemd-fsckd.service is left out: its socket starts it at
/// boot and it ends by itself when idle, freeze or not.
const RUNNING: &str = "systemctl list-units --type=service --state=running --no-legend --plain | cut -d' ' -f1 | grep -vx systemd-fsckd.service; \
     systemctl list-units --type=timer,socket --state=active --no-legend --plain | cut -d' ' -f1; \
     grep ' / ' /proc/mounts | cut -d' ' -f4 | cut -d, -f1";

/// A freeze that fails on a real systemd host, at each point where it can,
/// gives the host back: a service that refuses to stop (RefuseManualStop),
/// a process outside any service with a file open for writing (as a
/// user's shell or a cron job would), an undo that cannot start a service
/// again (exit 1, the service named, then `drydock thaw` once its cause is
/// gone), and a drydock killed outright while a slow service stops (the
/// records on the host let `drydock thaw` put everything back).
#[test]
fn a_freeze_that_fails_at_each_point_on_a_systemd_host_gives_it_back() {
    let vps = Vps::start(12);
    let home = tempdir();
    let host = vps.host();
    let conn = [host.clone(), "-i".into(), vps.key.to_str().unwrap().into()];
    let conn: Vec<&str> = conn.iter().map(String::as_str).collect();
    let freeze = || {
        vps.drydock(
            home.path(),
            &[&["freeze"], &conn[..], &["--accept-new-host-key", "--yes"]].concat(),
        )
    };
    let thaw = || {
        vps.drydock(home.path(), &[&["thaw"], &conn[..]].concat())
            .output()
            .unwrap()
    };
    vps.ssh(
        r#"set -e
cat > /etc/systemd/system/drydock-app.service <<'U'
[Service]
ExecStart=/bin/sh -c 'while :; do date >> /var/lib/drydock-app.log; sleep 1; done'
U
cat > /etc/systemd/system/drydock-stubborn.service <<'U'
[Unit]
RefuseManualStop=yes
[Service]
ExecStart=/bin/sleep infinity
U
cat > /etc/systemd/system/drydock-once.service <<'U'
[Service]
ExecStartPre=/bin/sh -c 'test ! -e /run/drydock-once'
ExecStartPost=/bin/touch /run/drydock-once
ExecStart=/bin/sleep infinity
U
cat > /etc/systemd/system/drydock-slow.service <<'U'
[Service]
ExecStart=/bin/sleep infinity
ExecStop=/bin/sleep 20
TimeoutStopSec=120
U
systemctl daemon-reload
systemctl start drydock-app.service drydock-stubborn.service
timeout 300 systemctl is-system-running --wait >/dev/null || true"#,
    );
    let before = vps.ssh(RUNNING);
    assert!(before.contains("drydock-app.service\n") && before.ends_with("rw\n"));

    // 1. A service that refuses to stop: refused, everything started again.
    let o = freeze().output().unwrap();
    assert_exit(&o, 3);
    assert_stderr(
        &o,
        format!(
            "cannot stop the services of {host}: drydock-stubborn.service did not stop (it is active): Failed to stop drydock-stubborn.service: Operation refused"
        ),
    );
    assert_stderr(
        &o,
        "stop it yourself (or end what holds it), then run again",
    );
    assert_stderr(&o, "drydock undid what it had done (stopped ");
    assert_stderr(&o, format!("): nothing on {host} is left changed"));
    assert_eq!(
        vps.ssh(RUNNING),
        before,
        "the refused freeze left the host changed"
    );
    vps.ssh("systemctl kill drydock-stubborn.service; sleep 1");
    let before = vps.ssh(RUNNING);

    // 2. A writer outside any service: refused, named, undone.
    vps.ssh("nohup sh -c 'exec 3>>/var/tmp/drydock-busy.log; sleep 900' >/dev/null 2>&1 &");
    let o = freeze().output().unwrap();
    assert_exit(&o, 3);
    assert_stderr(&o, format!("cannot make / read-only on {host}"));
    assert_stderr(&o, "/var/tmp/drydock-busy.log");
    assert_stderr(&o, format!("nothing on {host} is left changed"));
    assert_eq!(vps.ssh(RUNNING), before);

    // 3. The undo cannot start a service again: exit 1, named, with the
    // command that undoes the rest; the thaw finishes once it can.
    vps.ssh("systemctl start drydock-once.service");
    let before = vps.ssh(RUNNING);
    let o = freeze().output().unwrap();
    assert_exit(&o, 1);
    assert_stderr(
        &o,
        "drydock could not undo all it had done; still changed on",
    );
    assert_stderr(&o, "drydock-once.service stopped");
    assert_stderr(&o, format!("`drydock thaw {host}` tries again"));
    assert_eq!(
        vps.ssh("systemctl is-active drydock-once.service drydock-app.service; true"),
        "failed\nactive\n"
    );
    vps.ssh("pkill -f 'sleep 90[0]'; rm -f /run/drydock-once");
    let o = thaw();
    assert_exit(&o, 0);
    assert!(
        stdout(&o).contains("started drydock-once.service"),
        "{}",
        stdout(&o)
    );
    assert_eq!(vps.ssh(RUNNING), before);

    // 4. drydock killed outright while a slow service stops.
    // drydock-once starts once per boot: out of this round.
    vps.ssh("systemctl stop drydock-once.service; systemctl start drydock-slow.service");
    let before = vps.ssh(RUNNING);
    let mut child = freeze()
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while !vps
        .ssh("grep -c drydock-slow /run/drydock-freeze/stopped 2>/dev/null; true")
        .starts_with('1')
    {
        assert!(
            t0.elapsed() < Duration::from_secs(600),
            "the freeze never reached drydock-slow.service"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "the freeze ended before drydock-slow.service"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(
        vps.ssh("systemctl is-active drydock-app.service; true"),
        "inactive\n",
        "killed too early: nothing was stopped yet"
    );
    let o = thaw();
    assert_exit(&o, 0);
    assert!(
        stdout(&o).contains("started drydock-app.service"),
        "{}",
        stdout(&o)
    );
    assert_eq!(
        vps.ssh(RUNNING),
        before,
        "the thaw after a kill left the host changed"
    );
}

/// Abort after the push: the run is killed right after its push step
/// completed (the VPS's disk now holds the change, the VPS not yet
/// rebooted); `drydock abort` must push the base image back over it and
/// reboot, and the VPS comes back as it was (about six minutes under TCG,
/// beside the other VM tests).
#[test]
fn abort_after_the_push_gives_the_vps_back_as_it_was() {
    abort_after_the_push_on(None);
}

/// The same on the ifupdown + dhclient fixture, after a freeze/thaw round.
/// Zoo tier (the default suite has the abort on the networkd fixture): at
/// its first run, beside four other guests, the VPS did not come back
/// within the 15 minutes drydock gives a reboot (by hand, a plain sysrq
/// reboot of that frozen fixture beside three other guests took 17 min 41 s
/// to answer on SSH); in scripts/test-zoo, beside one other test, it passed.
#[test]
#[ignore = "zoo tier (long): scripts/test-zoo runs it"]
fn zoo_ifupdown_freeze_thaw_then_abort_after_the_push() {
    abort_after_the_push_on(Some("ifupdown"));
}

fn abort_after_the_push_on(variant: Option<&str>) {
    let vps = match variant {
        Some(v) => Vps::start_variant(v),
        None => Vps::start(12),
    };
    let home = tempdir();
    let motd = vps.ssh("sha256sum /etc/motd");
    if variant == Some("ifupdown") {
        freeze_thaw_round_with_dhclient(&vps, home.path());
    }
    let mut child = vps
        .drydock(
            home.path(),
            &[
                "upgrade",
                &vps.host(),
                "-i",
                vps.key.to_str().unwrap(),
                "--accept-new-host-key",
                "--no-rehearsal",
                // The proof has its own tests; this one is about the push.
                "--no-service-proof",
                "--run",
                CHANGE,
                "--yes",
                "--memory",
                "2G",
                "--cpus",
                "2",
            ],
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let runs = home.path().join("state/drydock/runs");
    let t0 = Instant::now();
    let (run_dir, frozen) = loop {
        let found = std::fs::read_dir(&runs)
            .ok()
            .and_then(|mut d| d.next())
            .and_then(|e| e.ok())
            .map(|e| e.path());
        if let Some(d) = found
            && let Ok(text) = std::fs::read_to_string(d.join("journal.json"))
            && let Ok(j) = serde_json::from_str::<serde_json::Value>(&text)
            && j["done"]
                .as_array()
                .unwrap()
                .iter()
                .any(|r| r["step"] == "push")
        {
            child.kill().unwrap();
            break (d, j["frozen_boot_id"].as_str().unwrap().to_string());
        }
        assert!(
            t0.elapsed() < Duration::from_secs(2400),
            "the run never finished its push"
        );
        assert!(child.try_wait().unwrap().is_none(), "drydock ended early");
        std::thread::sleep(Duration::from_millis(50));
    };
    child.wait().unwrap();
    // Killed before it rebooted the VPS: the pushed disk, still frozen.
    assert_eq!(
        vps.boot_id(),
        frozen,
        "drydock was killed too late: the VPS had rebooted already"
    );

    let o = vps
        .drydock(home.path(), &["abort", run_dir.to_str().unwrap(), "--yes"])
        .output()
        .unwrap();
    assert_exit(&o, 0);
    assert_stderr(&o, "the push had started: pushing the base image back");
    assert_stderr(&o, "the VPS is back on its disk as it was before the run");

    // As it was: no change, the old motd, a new boot, read-write.
    assert_eq!(
        vps.ssh("test -e /etc/drydock-was-here && echo yes || echo no")
            .trim(),
        "no"
    );
    assert_eq!(vps.ssh("sha256sum /etc/motd"), motd);
    assert_ne!(vps.boot_id(), frozen);
    assert_eq!(
        vps.ssh("grep ' / ' /proc/self/mounts | cut -d' ' -f4 | cut -d, -f1")
            .trim(),
        "rw"
    );
    if variant.is_some() {
        // The app's data and log: intact, no gap.
        vps.zoo_app_intact();
    }
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

/// One row of scripts/test-zoo's table: the fixture, the seconds of each
/// step of the run, and of the checks afterwards.
fn zoo_row(fixture: &str, r: &serde_json::Value, checks: Duration) {
    let steps = r["steps"].as_array().cloned().unwrap_or_default();
    let secs = |name: &str| {
        steps
            .iter()
            .find(|s| s[0].as_str().is_some_and(|n| n.starts_with(name)))
            .and_then(|s| s[1].as_f64())
            .map_or("-".to_string(), |v| format!("{v:.0}"))
    };
    println!(
        "zoo-row {fixture} {} {} {} {} {} {} {} {:.0} {:.0}",
        secs("probe"),
        secs("freeze"),
        secs("pull"),
        secs("upgrade"),
        secs("prove"),
        secs("push"),
        secs("reboot"),
        checks.as_secs_f64(),
        r["downtime_seconds"].as_f64().unwrap_or(0.0)
    );
}

/// A zoo fixture through `drydock upgrade --run`: the change arrives, the
/// app's data and log are intact with no gap, its service runs again, and
/// CHECK (a shell line run on the VPS afterwards) prints "ok".
fn zoo_upgrade(variant: &str, check: &str) {
    zoo_upgrade_on(12, variant, "true", check);
}

/// As zoo_upgrade, on the fixture debian-RELEASE-VARIANT, with BEFORE (a
/// shell line) run on the VPS just before the run; its output is handed to
/// CHECK as $BEFORE.
fn zoo_upgrade_on(release: u32, variant: &str, before: &str, check: &str) {
    let vps = Vps::start_variant_of(release, variant);
    zoo_upgrade_vps(&vps, &format!("debian-{release}-{variant}"), before, check);
}

fn zoo_upgrade_vps(vps: &Vps, fixture: &str, before: &str, check: &str) {
    let home = tempdir();
    assert_eq!(
        vps.ssh("systemctl is-active drydock-zoo-app.service; true")
            .trim(),
        "active"
    );
    let was = vps.ssh(before);
    let o = vps.upgrade_run(home.path(), CHANGE);
    eprintln!("{}", stderr(&o));
    assert_exit(&o, 0);
    assert_steps(
        &o,
        &[
            "probe", "freeze", "pull", "upgrade", "prove", "push", "reboot", "check",
        ],
    );
    let r = json(&o);
    let t = Instant::now();
    // The zoo's services ran on the upgraded copy, and run on the VPS after.
    for key in ["service_proof", "services_after"] {
        let up = str_list(&r[key], "up");
        assert!(
            up.contains(&"drydock-zoo-app.service".to_string()),
            "{fixture}: the zoo app is not up in {key}: {}",
            r[key]
        );
        assert_eq!(r[key]["failed"], serde_json::json!([]), "{fixture}: {key}");
        assert_eq!(r[key]["missing"], serde_json::json!([]), "{fixture}: {key}");
    }
    assert_eq!(
        vps.ssh("cat /etc/drydock-was-here").trim(),
        "upgraded offline by drydock"
    );
    vps.zoo_app_intact();
    assert_eq!(
        vps.ssh("systemctl is-active drydock-zoo-app.service; true")
            .trim(),
        "active"
    );
    let check = format!("BEFORE={}; {check}", shell_word(was.trim()));
    let said = vps.ssh(&format!("{check}; true"));
    assert_eq!(said.trim(), "ok", "{fixture}: {check}");
    zoo_row(fixture, &r, t.elapsed());
}

/// WORD quoted for sh.
fn shell_word(word: &str) -> String {
    format!("'{}'", word.replace('\'', "'\\''"))
}

#[test]
#[ignore = "zoo tier (long): scripts/test-zoo runs it"]
fn zoo_ifupdown_dhclient_eth0() {
    zoo_upgrade(
        "ifupdown",
        "pgrep -x dhclient >/dev/null && ip -o -4 addr show dev eth0 | grep -q 'inet 10.0.2.' && echo ok",
    );
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

/// The seal test's services on an OpenRC VPS: an app that logs its boot
/// id every second, a cron entry that logs it every minute, and a service
/// (bash, for /dev/tcp) that keeps trying to reach a listener on the
/// workstation and to resolve a name; all in the default runlevel.
fn openrc_seal_setup(port: u16) -> String {
    format!(
        r#"set -e
printf '%s\n' '#!/bin/sh' 'while :; do echo "$(cat /proc/sys/kernel/random/boot_id) app" >> /var/lib/drydock-app.log; sleep 1; done' > /usr/local/bin/drydock-app
printf '%s\n' '#!/bin/bash' 'while :; do (exec 3<>/dev/tcp/10.0.2.2/{port}) 2>/dev/null && echo "$(cat /proc/sys/kernel/random/boot_id) reached" >> /var/lib/drydock-phone.log; getent hosts phone-home.example >/dev/null && echo "$(cat /proc/sys/kernel/random/boot_id) resolved" >> /var/lib/drydock-phone.log; sleep 2; done' > /usr/local/bin/drydock-phone
chmod 755 /usr/local/bin/drydock-app /usr/local/bin/drydock-phone
for s in app:sh phone:bash; do
  sh=${{s#*:}}; s=${{s%:*}}
  printf '%s\n' '#!/sbin/openrc-run' "command=/bin/$sh" "command_args=/usr/local/bin/drydock-$s" 'command_background=yes' "pidfile=/run/drydock-$s.pid" > /etc/init.d/drydock-$s
  chmod 755 /etc/init.d/drydock-$s
  rc-update add drydock-$s default >/dev/null
  rc-service drydock-$s start >/dev/null 2>&1
done
echo '* * * * * root echo "$(cat /proc/sys/kernel/random/boot_id) cron" >> /var/lib/drydock-cron.log' > /etc/cron.d/drydock-test
sleep 3; grep -c app /var/lib/drydock-app.log"#
    )
}

/// The boot ids in the OpenRC test's logs and the zoo app's ("ID what" or
/// "N ID" lines).
const BOOT_IDS_OPENRC: &str = "cat /var/lib/drydock-app.log /var/lib/drydock-cron.log /var/lib/drydock-phone.log /var/lib/drydock-zoo/app.log 2>/dev/null | awk '{ print ($2 ~ /-/) ? $2 : $1 }' | sort -u";

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
    let backup = || {
        let o = vps
            .drydock(
                home.path(),
                &[
                    "backup",
                    &host,
                    "-i",
                    &key,
                    "--accept-new-host-key",
                    "--store",
                    store.to_str().unwrap(),
                    "--json",
                ],
            )
            .output()
            .unwrap();
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
    let first = backup();
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
    let second = backup();
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
}

/// A provider's rescue system on a second VPS: the plain fixture booted
/// from its first disk (an overlay, vda) with the new VPS's empty, larger
/// disk as vdb, its network shaped as 203.0.113.0/24 (DHCP gives it
/// 203.0.113.77 and the default route via 203.0.113.1, MAC
/// 52:54:00:aa:bb:02; not restricted: QEMU's DHCP offers no router on a
/// restricted network).
struct Rescue {
    child: std::process::Child,
    port: u16,
    _dir: tempfile::TempDir,
}

const NEW_MAC: &str = "52:54:00:aa:bb:02";

impl Rescue {
    fn start(disk: &std::path::Path) -> Rescue {
        let (img, _) = fixture(12);
        let dir = tempdir();
        let overlay = dir.path().join("rescue.qcow2");
        let o = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
            .arg(&img)
            .arg(&overlay)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("qemu-system-x86_64")
            .args([
                "-machine",
                "q35,accel=tcg",
                "-cpu",
                "max",
                "-m",
                "1024M",
                "-smp",
                "2",
            ])
            .args([
                "-netdev",
                &format!(
                    "user,id=n0,net=203.0.113.0/24,host=203.0.113.1,dns=203.0.113.53,\
                 dhcpstart=203.0.113.77,hostfwd=tcp:127.0.0.1:{port}-203.0.113.77:22"
                ),
            ])
            .args([
                "-device",
                &format!("virtio-net-pci,netdev=n0,mac={NEW_MAC}"),
            ])
            .arg("-drive")
            .arg(format!("file={},format=qcow2,if=virtio", overlay.display()))
            .arg("-drive")
            .arg(format!("file={},format=raw,if=virtio", disk.display()))
            .args([
                "-display",
                "none",
                "-nodefaults",
                "-no-user-config",
                "-serial",
            ])
            .arg(format!("file:{}", dir.path().join("serial.log").display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let r = Rescue {
            child,
            port,
            _dir: dir,
        };
        let (_, key) = fixture(12);
        let t0 = Instant::now();
        while !ssh_guest(port, &key, "true").status.success() {
            assert!(
                t0.elapsed() < Duration::from_secs(900),
                "the rescue system did not answer on SSH in 15 min: {}",
                std::fs::read_to_string(r._dir.path().join("serial.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_secs(3));
        }
        r
    }
}

impl Drop for Rescue {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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

/// VARIANT backed up twice, its older version restored through a rescue
/// system onto a second VPS with a larger disk and another address: the
/// network files FILES rewritten, the filesystem FS grown (SAID in the
/// report), the new VPS up on its address with the older data.
fn restore_onto_a_second_vps(variant: &str, files: &[&str], fs: &str, said: &str) {
    let vps = Vps::start_variant(variant);
    let home = tempdir();
    let key = vps.key.to_str().unwrap().to_string();
    // The user's own store: $XDG_DATA_HOME/drydock/backups/HOST.
    let as_user = |c: &mut Command| {
        c.env("HOME", home.path())
            .env("XDG_STATE_HOME", home.path().join("state"))
            .env("XDG_DATA_HOME", home.path().join("data"))
            .env_remove("SSH_AUTH_SOCK")
            .stdin(Stdio::null());
    };
    let drydock = |args: &[&str]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_drydock"));
        c.args(args);
        as_user(&mut c);
        c
    };
    let host = vps.host();
    let backup = |extra: &[&str]| {
        let mut args = vec![
            "backup",
            &host,
            "-i",
            &key,
            "--accept-new-host-key",
            "--json",
        ];
        args.extend_from_slice(extra);
        let o = drydock(&args).output().unwrap();
        assert_exit(&o, 0);
        eprintln!("{}", stderr(&o));
        json(&o)
    };
    let sum = vps.ssh(
        "head -c 10M /dev/urandom > /root/restore-test && sync && sha256sum /root/restore-test",
    );
    let older = backup(&[]);
    assert_eq!(older["consistency"], "crash-consistent", "{older}");
    assert!(older["boot_recorded"].is_string(), "{older}");
    vps.ssh("echo newer > /etc/drydock-newer && sync");
    // The second one frozen: consistent, the window reported, the VPS
    // thawed and serving after.
    let newer = backup(&["--freeze"]);
    assert_eq!(newer["consistency"], "frozen", "{newer}");
    assert!(newer["frozen_seconds"].as_f64().unwrap() > 0.0, "{newer}");
    assert_eq!(
        vps.ssh("grep ' / ' /proc/self/mounts | cut -d' ' -f4 | cut -d, -f1")
            .trim(),
        "rw"
    );
    assert_eq!(
        vps.ssh("systemctl is-active drydock-zoo-app").trim(),
        "active"
    );
    assert_ne!(older["id"], newer["id"]);
    // The same kernel and initrd are kept once: the newer version's are
    // links to the older's, not copied over the link again.
    {
        use std::os::unix::fs::MetadataExt;
        let ino = |v: &serde_json::Value, f: &str| {
            std::fs::metadata(std::path::Path::new(v["boot_recorded"].as_str().unwrap()).join(f))
                .unwrap()
                .ino()
        };
        assert_eq!(ino(&older, "vmlinuz"), ino(&newer, "vmlinuz"));
        assert_eq!(ino(&older, "initrd"), ino(&newer, "initrd"));
    }
    drop(vps);

    // `drydock boot ID`: a VM of the older version, its services held back
    // (the kernel kept with it), with its data.
    let id = older["id"].as_str().unwrap();
    let boot_dir = home.path().join("boot-vm");
    let mut c = drydock(&["boot", id, "--memory", "1G", "--json", "--dir"]);
    c.arg(&boot_dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    let line = until_ready(&mut child);
    assert!(
        !line.is_empty(),
        "drydock boot {id} ended before its guest was up"
    );
    let port = serde_json::from_str::<serde_json::Value>(&line).unwrap()["ssh_port"]
        .as_u64()
        .unwrap() as u16;
    let (_, key_path) = fixture(12);
    let o = ssh_guest(
        port,
        &key_path,
        "systemctl is-active drydock-zoo-app; sha256sum /root/restore-test; \
         test -e /etc/drydock-newer && echo newer || echo older",
    );
    let seen = stdout(&o);
    eprintln!("boot {id}: {seen}");
    let lines: Vec<&str> = seen.lines().map(str::trim).collect();
    assert_eq!(lines, ["inactive", sum.trim(), "older"], "{seen}");
    Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(child.wait().unwrap().success());

    let disk_dir = tempdir();
    let disk = disk_dir.path().join("new-vps.raw");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(4 << 30)
        .unwrap();
    let rescue = Rescue::start(&disk);
    let t0 = Instant::now();
    let rescue_host = format!("root@127.0.0.1:{}", rescue.port);
    let o = drydock(&[
        "restore",
        id,
        &rescue_host,
        "-i",
        &key,
        "--accept-new-host-key",
        "--device",
        "/dev/vdb",
        "--yes",
        "--json",
    ])
    .output()
    .unwrap();
    eprintln!("{}", stderr(&o));
    assert_exit(&o, 0);
    let r = json(&o);
    eprintln!(
        "restore ({:?}): {}",
        t0.elapsed(),
        serde_json::to_string_pretty(&r).unwrap()
    );
    assert_eq!(r["network"]["new"]["address"], "203.0.113.77", "{r}");
    let changed = str_list(&r, "network_files");
    for f in files {
        assert!(changed.contains(&f.to_string()), "{r}");
    }
    assert_eq!(r["grown"]["partition"], 1, "{r}");
    assert_eq!(r["grown"]["filesystem"], fs, "{r}");
    assert_eq!(r["grown"]["filesystem_grown"], true, "{r}");
    assert!(r["grown"]["said"].as_str().unwrap().contains(said), "{r}");
    assert!(
        ["running", "degraded"].contains(&r["boot_proof"]["init"].as_str().unwrap_or("")),
        "{r}"
    );
    drop(rescue);

    // The new VPS boots its disk (as its provider would, with its MAC on
    // its network) and answers on its new address.
    let like = disk_dir.path().join("new-vps.like.json");
    std::fs::write(
        &like,
        format!(
            r#"{{"firmware": "bios", "disk_bus": "virtio-blk", "disk_name": "vda",
 "nic": {{"name": "vps-nic", "mac": "{NEW_MAC}", "pci_slot": null,
         "address": "203.0.113.77", "prefix": 24,
         "gateway": "203.0.113.1", "dns": "203.0.113.53"}}}}"#
        ),
    )
    .unwrap();
    let new_vps = Vps::start_image(&disk, key_path, Some(&like));
    let seen = new_vps.ssh(
        "ip -4 -o addr show | grep -o 'inet 203.0.113.77/24'; cat /sys/class/net/e*/address; \
         sha256sum /root/restore-test; test -e /etc/drydock-newer && echo newer || echo older; \
         df -B1 --output=size / | tail -n 1",
    );
    eprintln!("the new VPS: {seen}");
    let lines: Vec<&str> = seen.lines().map(str::trim).collect();
    assert_eq!(lines[0], "inet 203.0.113.77/24", "{seen}");
    assert_eq!(lines[1], NEW_MAC, "{seen}");
    assert_eq!(lines[2], sum.trim(), "{seen}");
    assert_eq!(lines[3], "older", "{seen}");
    let size: u64 = lines[4].parse().unwrap();
    assert!(
        size > 3 << 30,
        "/ is {size} bytes: not grown to the 4 GiB disk"
    );
}
