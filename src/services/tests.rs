use super::judge::{Verdict, judge, similar, stem};
use super::read::{parse_set, parse_units, units_script, valid_name};
use super::*;

/// `systemctl show --all -p ... '*.service' '*.socket'` on a Debian 12
/// VPS (cut down from a real answer), with what a real host also has: a
/// transient unit, root's session manager, a timer's job, a per-connection
/// instance, a failed unit, a crash-looping one and a oneshot that ran.
const SET_ANSWER: &str = include_str!("set-answer.txt");

#[test]
fn the_set_is_what_runs_less_what_a_reboot_does_not_bring_back() {
    let (init, states) = parse_set(SET_ANSWER).unwrap();
    assert_eq!(init, Init::Systemd);
    let set = ServiceSet::from_states(init, &states);
    assert_eq!(
        set.names(),
        [
            "dbus.service",
            "dbus.socket",
            "networking.service",
            "postgresql@15-main.service",
            "ssh.service"
        ]
    );
    let dbus = set.units.iter().find(|u| u.name == "dbus.service").unwrap();
    assert!(dbus.on_demand, "started by its socket");
    let sock = set.units.iter().find(|u| u.name == "dbus.socket").unwrap();
    assert_eq!(sock.triggers, ["dbus.service"], "what the socket starts");
    assert_eq!(
        set.units
            .iter()
            .find(|u| u.name == "networking.service")
            .unwrap()
            .state,
        "exited"
    );
    assert_eq!(set.ran_at_boot, ["e2scrub_reap.service"]);
    assert_eq!(set.not_running, ["broken.service", "flapping.service"]);
}

#[test]
fn a_cut_answer_is_no_set() {
    assert!(parse_set(&SET_ANSWER.replace("@@ end", "")).is_none());
    assert!(parse_set("@@ end\n").is_none());
}

#[test]
fn unit_names_that_are_not_unit_names_are_dropped_never_quoted_into_a_shell() {
    for bad in [
        "",
        "-x.service",
        "a b.service",
        "a;rm -rf /.service",
        "a'b.service",
        "\u{1b}[2J.service",
        "$(reboot).service",
    ] {
        assert!(!valid_name(bad), "{bad:?}");
    }
    for good in [
        "ssh.service",
        "systemd-fsck@dev-disk-by\\x2duuid-1234.service",
        "postgresql@15-main.service",
        "getty@tty1.service",
    ] {
        assert!(valid_name(good), "{good}");
    }
    let script = units_script(
        Init::Systemd,
        &[
            "a;reboot.service".to_string(),
            "systemd-fsck@dev-disk-by\\x2duuid-1234.service".to_string(),
        ],
    );
    assert!(!script.contains("reboot"), "{script}");
    // A backslash reaches systemctl as it is: quoted, not unescaped by sh.
    assert!(
        script.contains("'systemd-fsck@dev-disk-by\\x2duuid-1234.service'"),
        "{script}"
    );
}

fn unit(name: &str) -> Unit {
    Unit {
        name: name.into(),
        state: "running".into(),
        on_demand: false,
        triggers: vec![],
    }
}

fn state(active: &str, sub: &str, result: &str) -> read::UnitState {
    read::UnitState {
        name: "app.service".into(),
        id: "app.service".into(),
        load: "loaded".into(),
        active: active.into(),
        sub: sub.into(),
        result: result.into(),
        restarts: Some(0),
        condition: "yes".into(),
        ..Default::default()
    }
}

#[test]
fn each_state_a_unit_can_be_in_is_judged() {
    let u = unit("app.service");
    assert_eq!(
        judge(&u, None, &state("active", "running", "success")),
        Verdict::Up
    );
    assert_eq!(
        judge(&u, None, &state("active", "exited", "success")),
        Verdict::Up
    );
    assert_eq!(
        judge(&u, None, &state("failed", "failed", "exit-code")),
        Verdict::Failed("failed (exit-code)".into())
    );
    assert_eq!(
        judge(&u, None, &state("activating", "auto-restart", "exit-code")),
        Verdict::Failed("restarting after it stopped (auto-restart)".into())
    );
    assert_eq!(
        judge(&u, None, &state("inactive", "dead", "success")),
        Verdict::NotStarted
    );
    assert_eq!(
        judge(&u, None, &state("inactive", "dead", "timeout")),
        Verdict::Failed("stopped (timeout)".into())
    );
    let mut skipped = state("inactive", "dead", "success");
    skipped.condition = "no".into();
    assert_eq!(judge(&u, None, &skipped), Verdict::Condition);
    let mut gone = state("inactive", "dead", "success");
    gone.load = "not-found".into();
    assert_eq!(judge(&u, None, &gone), Verdict::Missing);
    // Up at both readings but restarted in between: not up.
    let before = state("active", "running", "success");
    let mut after = state("active", "running", "success");
    after.restarts = Some(2);
    assert_eq!(
        judge(&u, Some(&before), &after),
        Verdict::Failed("restarted 2 time(s) while drydock watched it".into())
    );
    // Idle on demand is fine; idle otherwise is not started.
    let mut sock = unit("dbus.service");
    sock.on_demand = true;
    assert_eq!(
        judge(&sock, None, &state("inactive", "dead", "success")),
        Verdict::Idle
    );
}

#[test]
fn the_units_answer_is_read_by_the_name_asked_for_an_alias_included() {
    let text = "\
@@ unit sshd.service
Id=ssh.service
LoadState=loaded
ActiveState=active
SubState=running
NRestarts=0
@@ unit php8.2-fpm.service
Id=php8.2-fpm.service
LoadState=not-found
ActiveState=inactive
@@ unit bad;name.service
Id=x
@@ unit app.service
Unit name app.service is not valid.
@@ unit cut.service
Id=cut.service
LoadState=loaded
";
    let m = parse_units(text);
    assert_eq!(m["sshd.service"].id, "ssh.service");
    assert_eq!(m["sshd.service"].active, "active");
    assert_eq!(m["php8.2-fpm.service"].load, "not-found");
    assert!(!m.contains_key("bad;name.service"));
    assert!(!m.contains_key("app.service"), "nothing was said of it");
    assert!(!m.contains_key("cut.service"), "no end: cut short");
}

#[test]
fn a_renamed_unit_is_found_by_its_stem() {
    assert_eq!(stem("php8.2-fpm.service"), "php#-fpm.service");
    assert_eq!(
        stem("postgresql@15-main.service"),
        "postgresql@#-main.service"
    );
    assert_eq!(stem("a.service"), "a.service");
    assert_eq!(stem("x11-common.service"), "x#-common.service");
    let known: Vec<String> = [
        "php8.4-fpm.service",
        "php-fpm.service",
        "postgresql@17-main.service",
        "nginx.service",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    assert_eq!(
        similar("php8.2-fpm.service", &known),
        ["php8.4-fpm.service"]
    );
    assert_eq!(
        similar("postgresql@15-main.service", &known),
        ["postgresql@17-main.service"]
    );
    assert!(similar("apache2.service", &known).is_empty());
}

#[test]
fn strings_from_the_host_cannot_drive_the_terminal() {
    assert_eq!(
        printable("ok\u{1b}]52;c;aGk=\u{7} \r\u{9b}2J \u{202e}x\nnext\tcol"),
        "ok\\x1b]52;c;aGk=\\x07 \\x0d\\u{009b}2J \\u{202e}x\nnext\tcol"
    );
}

#[test]
fn an_outcome_fails_on_what_is_not_accepted() {
    let o = Outcome {
        up: vec!["ssh.service".into()],
        failed: vec![Failure {
            unit: "nginx.service".into(),
            why: "failed (exit-code)".into(),
            lines: vec!["nginx: [emerg] unknown directive".into()],
        }],
        missing: vec![Missing {
            unit: "php8.2-fpm.service".into(),
            similar: vec!["php8.4-fpm.service".into()],
        }],
        ..Outcome::default()
    };
    assert_eq!(o.failures(&[]), ["nginx.service", "php8.2-fpm.service"]);
    assert_eq!(
        o.failures(&["nginx.service".to_string()]),
        ["php8.2-fpm.service"]
    );
    let text = o.failure_text(&["nginx.service".to_string()]);
    assert!(
        text.contains("nginx.service: failed (exit-code) (accepted: --accept-failed)"),
        "{text}"
    );
    assert!(
        text.contains("    | nginx: [emerg] unknown directive"),
        "{text}"
    );
    assert!(
        text.contains("php8.2-fpm.service: no longer exists (removed or renamed by the upgrade); a unit of a similar name exists: php8.4-fpm.service"),
        "{text}"
    );
    assert_eq!(o.summary(), "1 up, 1 failed, 1 gone");
}
