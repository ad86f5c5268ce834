//! The service proof: a run stopped before the freeze when a service of the VPS would not run, and a failure only the VPS shows caught after the push and rolled back.

use super::*;

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
