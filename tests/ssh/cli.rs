//! The command line itself: JSON events, usage errors, completions, man pages, version, verbosity, defaults from the config file.

use super::*;

#[test]
fn probe_reports_what_the_host_runs() {
    let sshd = Sshd::start();
    let o = sshd
        .drydock(&["probe", &sshd.host(), "--json"])
        .output()
        .unwrap();
    assert_exit(&o, 0);
    let j = json(&o);
    let os_release = std::fs::read_to_string("/etc/os-release").unwrap();
    let id = os_release
        .lines()
        .find_map(|l| l.strip_prefix("ID="))
        .unwrap()
        .trim_matches('"');
    assert_eq!(j["os_id"], id);
    let mem = std::fs::read_to_string("/proc/meminfo").unwrap();
    let kb: u64 = mem
        .lines()
        .next()
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(j["memory_bytes"], kb * 1024);
    assert_eq!(j["arch"], std::env::consts::ARCH);
    let fw = if std::path::Path::new("/sys/firmware/efi").exists() {
        "uefi"
    } else {
        "bios"
    };
    assert_eq!(j["firmware"], fw);
    // The disk that holds / here, as the kernel says: the block device of
    // /'s major:minor, or its parent disk when that is a partition.
    let mi = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let root = mi
        .lines()
        .rfind(|l| l.split(' ').nth(4) == Some("/"))
        .unwrap();
    let majmin = root.split(' ').nth(2).unwrap();
    let sys = std::path::Path::new("/sys/dev/block").join(majmin);
    if sys.exists() {
        let real = std::fs::canonicalize(&sys).unwrap();
        let disk = if real.join("partition").exists() {
            real.parent().unwrap().to_path_buf()
        } else {
            real
        };
        let name = disk.file_name().unwrap().to_str().unwrap();
        assert_eq!(j["disk"]["device"], format!("/dev/{name}"), "{j}");
    } else {
        // / on no block device (overlayfs, a container): said, not guessed.
        assert!(
            j["disk_error"]
                .as_str()
                .unwrap()
                .contains("name it with --device"),
            "{j}"
        );
    }
    // And the human form names the release.
    let o = sshd.drydock(&["probe", &sshd.host()]).output().unwrap();
    assert_exit(&o, 0);
    assert!(stdout(&o).contains("os         "), "{}", stdout(&o));
}

/// A 0-byte device once pulled "successfully", "verified by  on the
/// host": it is refused, and no image is made.
/// `--json` is an event stream a wrapper can follow: "progress" events
/// while bytes move (rate and ETA, at most two a second), the same field
/// names for pull and push, the result last; a refusal ends in an "error"
/// event with the exit code and the message. (`events` and `json` check
/// every line: one object, "v": 1, a "type".)
#[test]
fn json_is_an_event_stream_ending_in_the_result_or_the_error() {
    let sshd = Sshd::start();
    let t = tempdir();
    let dev = t.path().join("disk");
    let img = t.path().join("image");
    let size = big_disk(&dev);

    for (o, what) in [
        (pull_with(&sshd, &dev, &img, &["--transfer", "dd"]), "pull"),
        (
            push(&sshd, &img, &dev, &["--full", "--yes", "--transfer", "dd"]),
            "push",
        ),
    ] {
        assert_exit(&o, 0);
        let ev = events(&o);
        let progress: Vec<_> = ev
            .iter()
            .filter(|e| e["type"] == "progress" && e["what"] == what)
            .collect();
        assert!(!progress.is_empty(), "no {what} progress: {ev:?}");
        let last = progress.last().unwrap();
        assert_eq!(last["bytes_done"], last["bytes_total"], "{last}");
        assert!(
            last["bytes_per_second"].is_u64() && last["seconds"].is_f64(),
            "{last}"
        );
        // At most two a second, whatever the bar's counting rate.
        let secs = last["seconds"].as_f64().unwrap();
        assert!(
            progress.len() as f64 <= secs * 2.0 + 2.0,
            "{} in {secs} s",
            progress.len()
        );
        let r = json(&o);
        assert!(r["bytes_on_wire"].as_u64().unwrap() > 0, "{r}");
        let written = r["bytes_written"].as_u64().unwrap();
        if what == "pull" {
            assert_eq!(written, size, "{r}");
        } else {
            assert!(written > 0 && written <= size, "{r}");
        }
        assert!(r["seconds"].is_f64(), "{r}");
        assert_eq!(ev.last().unwrap()["command"], what);
    }

    let o = pull(&sshd, &t.path().join("nothing here"), &t.path().join("i2"));
    assert_exit(&o, 3);
    let ev = events(&o);
    let last = ev.last().unwrap();
    assert_eq!(last["type"], "error", "{ev:?}");
    assert_eq!(last["exit_code"], 3);
    assert!(
        last["message"].as_str().unwrap().contains("nothing here"),
        "{last}"
    );
    assert!(ev.iter().all(|e| e["type"] != "result"), "{ev:?}");
}

/// The exit codes of the README's table that no other test pins: a run
/// that is not one and an unknown release are usage errors (2), before
/// any connection; a lost connection is 75 (the same command resumes),
/// not 1 (those are in the cut tests).
#[test]
fn usage_errors_exit_2_before_connecting() {
    let t = tempdir();
    let sshd = Sshd::start();
    for (args, said) in [
        (
            vec!["resume".to_string(), t.path().display().to_string()],
            format!(
                "no run named '{}' (neither a folder with a journal.json nor one under ",
                t.path().display()
            ),
        ),
        (
            vec![
                "abort".to_string(),
                "no-such-run".to_string(),
                "--yes".to_string(),
            ],
            "no run named 'no-such-run' (".to_string(),
        ),
        (
            [
                "upgrade",
                "root@192.0.2.1",
                "--to",
                "windows-11",
                "--dry-run",
            ]
            .map(String::from)
            .to_vec(),
            "unknown release 'windows-11': name it as debian-13 (or trixie)".to_string(),
        ),
    ] {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let started = Instant::now();
        let o = sshd.drydock_bare(&args).output().unwrap();
        assert_exit(&o, 2);
        assert_stderr(&o, &said);
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{args:?} waited"
        );
    }
}

/// `drydock completions bash`, sourced as the README says, completes
/// subcommands and flags; `drydock man --dir` writes a page per
/// subcommand that man(1) renders.
#[test]
fn completions_and_man_pages_work() {
    let bin = env!("CARGO_BIN_EXE_drydock");
    let script = format!(
        "source <({bin} completions bash) && complete -p drydock && \
         COMP_WORDS=(drydock pu); COMP_CWORD=1; _drydock drydock pu drydock; \
         echo \"words: ${{COMPREPLY[*]}}\"; \
         COMP_WORDS=(drydock pull --tr); COMP_CWORD=2; _drydock drydock --tr pull; \
         echo \"flags: ${{COMPREPLY[*]}}\""
    );
    let o = Command::new("bash").args(["-c", &script]).output().unwrap();
    assert_exit(&o, 0);
    let out = stdout(&o);
    assert!(out.contains("-F _drydock drydock"), "{out}");
    assert!(out.contains("words: pull push"), "{out}");
    assert!(out.contains("flags: --transfer"), "{out}");

    let t = tempdir();
    let o = Command::new(bin)
        .args(["man", "--dir", t.path().to_str().unwrap()])
        .output()
        .unwrap();
    assert_exit(&o, 0);
    for page in ["drydock.1", "drydock-pull.1", "drydock-upgrade.1"] {
        let text = std::fs::read_to_string(t.path().join(page)).unwrap();
        assert!(text.contains(".TH drydock"), "{page}: {text}");
    }
    let o = Command::new("man")
        .arg("-l")
        .arg(t.path().join("drydock-pull.1"))
        .env("MANWIDTH", "100")
        .env("MANPAGER", "cat")
        .output()
        .unwrap();
    assert_exit(&o, 0);
    let page = stdout(&o);
    assert!(
        page.contains("NAME") && page.contains("drydock-pull"),
        "{page}"
    );
    assert!(page.contains("--transfer"), "{page}");
}

/// `--version` names the commit and the helper protocol.
#[test]
fn version_names_the_commit_and_the_helper_protocol() {
    let o = Command::new(env!("CARGO_BIN_EXE_drydock"))
        .arg("--version")
        .output()
        .unwrap();
    assert_exit(&o, 0);
    let v = stdout(&o);
    let want = format!("drydock {} (commit ", env!("CARGO_PKG_VERSION"));
    assert!(v.starts_with(&want), "{v}");
    assert!(v.trim_end().ends_with(", helper protocol 3)"), "{v}");
}

/// Output people read: `-q` leaves stderr empty on success and the result
/// on stdout; `-v` has no false ERROR from russh; the result is said once,
/// in lines of at most 100 columns (but for the paths).
#[test]
fn quiet_verbose_and_the_result_said_once() {
    let sshd = Sshd::start();
    let t = tempdir();
    let dev = t.path().join("disk");
    make_disk(&dev, 8 * MIB, &[(0, MIB as usize)], &[]);
    let img = t.path().join("image");
    let host = sshd.host();
    let o = pull_cmd(&sshd, &dev, &img).arg("-q").output().unwrap();
    assert_exit(&o, 0);
    assert_eq!(stderr(&o), "", "-q");
    let out = stdout(&o);
    eprint!("{out}");
    assert_eq!(out.matches("on the host").count(), 1, "{out}");
    assert!(
        out.starts_with(&format!(
            "pulled {host}:{}\n  to {}\n",
            dev.display(),
            img.display()
        )),
        "{out}"
    );
    for l in out
        .lines()
        .filter(|l| !l.contains(t.path().to_str().unwrap()))
    {
        assert!(l.chars().count() <= 100, "over 100 columns: {l}");
    }

    write_at(&img, b"changed", 3 * MIB);
    let o = sshd
        .drydock(&[
            "push",
            img.to_str().unwrap(),
            &host,
            "--device",
            dev.to_str().unwrap(),
            "--yes",
            "-v",
        ])
        .output()
        .unwrap();
    assert_exit(&o, 0);
    let (out, err) = (stdout(&o), stderr(&o));
    assert!(!err.contains("ERROR"), "{err}");
    assert!(!err.contains("read back"), "the result said twice: {err}");
    assert!(out.contains("; read back and verified\n"), "{out}");
    for l in out
        .lines()
        .filter(|l| !l.contains(t.path().to_str().unwrap()))
    {
        assert!(l.chars().count() <= 100, "over 100 columns: {l}");
    }
    assert_eq!(sha256_file(&dev), sha256_file(&img));
}

/// Defaults: `~/.config/drydock/config.toml`, then `DRYDOCK_*` variables
/// over it, then flags over both. A key drydock does not know is a usage
/// error naming the file.
#[test]
fn defaults_come_from_the_config_file_the_environment_then_flags() {
    let sshd = Sshd::start();
    let t = tempdir();
    let dev = t.path().join("disk");
    make_disk(&dev, 4 * MIB, &[(0, MIB as usize)], &[]);
    let cfg = sshd.home.join(".config/drydock");
    std::fs::create_dir_all(&cfg).unwrap();
    std::fs::write(
        cfg.join("config.toml"),
        format!(
            "identity = \"{}\"\ntransfer = \"dd\"\nstate_dir = \"{}\"\n",
            sshd.client_key.display(),
            t.path().join("state").display()
        ),
    )
    .unwrap();
    let host = sshd.host();
    // No -i: the key comes from the file, and so does dd mode.
    let pull = |n: &str, extra: &[&str], env: &[(&str, &str)]| {
        let img = t.path().join(n);
        let mut args = vec!["pull", &host, "--device", dev.to_str().unwrap()];
        args.extend_from_slice(&["--output", img.to_str().unwrap(), "--json"]);
        args.extend_from_slice(extra);
        let mut c = sshd.drydock_bare(&args);
        c.env_remove("DRYDOCK_TRANSFER")
            .env_remove("DRYDOCK_IDENTITY");
        for (k, v) in env {
            c.env(k, v);
        }
        let o = c.output().unwrap();
        assert_exit(&o, 0);
        json(&o)["transfer"].as_str().unwrap().to_string()
    };
    assert_eq!(pull("file", &[], &[]), "dd", "from the file");
    assert_eq!(
        pull("env", &[], &[("DRYDOCK_TRANSFER", "helper")]),
        "helper",
        "the variable over the file"
    );
    assert_eq!(
        pull(
            "flag",
            &["--transfer", "dd"],
            &[("DRYDOCK_TRANSFER", "helper")]
        ),
        "dd",
        "the flag over the variable"
    );
    let o = sshd.drydock_bare(&["runs"]).output().unwrap();
    assert_exit(&o, 0);
    assert_eq!(
        stdout(&o),
        format!("no runs in {}\n", t.path().join("state/runs").display())
    );

    std::fs::write(cfg.join("config.toml"), "colour = \"blue\"\n").unwrap();
    let o = sshd.drydock_bare(&["runs"]).output().unwrap();
    assert_exit(&o, 2);
    assert_stderr(
        &o,
        format!(
            "{} is not a drydock config: ",
            cfg.join("config.toml").display()
        ),
    );
    assert_stderr(&o, "unknown field `colour`");
}
