//! The VM tier: a real Debian 12 VPS image built by vm-fixtures/ from
//! Debian's packages, booted in a real QEMU.

mod abort;
mod backups;
mod boot;
#[path = "../common/mod.rs"]
mod common;
mod freeze;
mod proof;
mod upgrade;
mod zoo;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::vps::*;
use common::*;

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
            .env("DRYDOCK_KEY_FILE", home.path().join("backup.key"))
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
