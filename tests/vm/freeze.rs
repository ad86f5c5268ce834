//! The freeze on a real systemd host: every point of failure gives it back.

use super::*;

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
