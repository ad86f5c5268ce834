//! The fault suite: pulls and pushes, in both modes, cut at seeded random
//! byte offsets by the test's own relay, and killed with SIGKILL at random
//! moments; each rerun (the same command) until it finishes, the result
//! then exact and nothing of the helper left on the host.
//!
//! The seed is printed first; `DRYDOCK_FAULT_SEED=N cargo test --test ssh
//! fault_suite` repeats a run's offsets and moments (the moments only as
//! far as the machine's timing does). `-- --nocapture` shows the figures.

use super::*;

/// SplitMix64: the cuts' offsets and the kills' moments, from the seed.
struct Rng(u64);

impl Rng {
    fn from_env(what: &str) -> Rng {
        let seed = std::env::var("DRYDOCK_FAULT_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
            });
        eprintln!("{what}: seed {seed} (DRYDOCK_FAULT_SEED={seed} repeats it)");
        Rng(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// In 1..=n.
    fn upto(&mut self, n: u64) -> u64 {
        1 + self.next() % n
    }
}

/// 96 MiB: 48 MiB of data that does not compress, in runs, and zeros; six
/// segments of 16 MiB, so a pull resumes part way.
fn fault_disk(path: &std::path::Path) {
    make_disk(
        path,
        96 * MIB,
        &[(0, 20 * MIB as usize), (33 * MIB, 28 * MIB as usize)],
        &[],
    );
}

/// `drydock pull` through HOST (a relay), --transfer MODE, --json.
fn pull_via(
    host: &str,
    sshd: &Sshd,
    dev: &std::path::Path,
    img: &std::path::Path,
    mode: &str,
) -> Command {
    let mut c = pull_cmd_to(sshd, host, dev, img);
    c.args(["--transfer", mode, "--json", "--accept-new-host-key"]);
    c
}

/// What a pull (or push) chain came to.
#[derive(Default)]
struct Tally {
    cuts: u32,
    finished: u32,
    /// Bytes of data across the relay over every attempt (down for a
    /// pull, up for a push), and over one uncut run.
    moved: u64,
    one_run: u64,
    /// Bytes the reruns after a cut said they moved (`bytes_on_wire`).
    on_resume: u64,
}

impl Tally {
    fn print(&self, what: &str) {
        let extra = self.moved as i64 - (self.finished as i64 * self.one_run as i64);
        eprintln!(
            "{what}: {} cuts survived, {} finished runs, exact; {:.1} MiB crossed the relay \
             for {} uncut run(s) of {:.1} MiB each (moved again because of the cuts: {:.1} MiB); \
             reruns after a cut moved {:.1} MiB; bytes lost: 0",
            self.cuts,
            self.finished,
            self.moved as f64 / MIB as f64,
            self.finished,
            self.one_run as f64 / MIB as f64,
            extra as f64 / MIB as f64,
            self.on_resume as f64 / MIB as f64
        );
    }
}

/// One attempt through RELAY cut at AT (or not at all): its output and the
/// bytes the relay counted in the direction that matters.
fn through_relay(
    relay: &Relay,
    down: bool,
    at: u64,
    what: &str,
    cmd: impl Fn(&str) -> Command,
) -> (std::process::Output, u64) {
    relay.rearm(at);
    let o = output_within(cmd(&relay.host()), 180, what);
    let (up, dn) = relay.bytes();
    (o, if down { dn } else { up })
}

/// A chain of attempts of one operation, each through a relay that cuts at
/// a random offset within one uncut run's bytes, until TEN cuts have
/// happened and the last rerun has finished. RESET puts things back as
/// they were before the operation (after a finished run, for the next);
/// EXACT checks a finished run's result.
fn cut_chain(
    sshd: &Sshd,
    rng: &mut Rng,
    what: &str,
    down: bool,
    cmd: impl Fn(&str) -> Command,
    reset: impl Fn(),
    exact: impl Fn(&str),
) -> Tally {
    let mut tally = Tally::default();
    reset();
    let relay = if down {
        Relay::start_down(sshd.port, u64::MAX)
    } else {
        Relay::start(sshd.port, u64::MAX)
    };
    let (o, one_run) = through_relay(&relay, down, u64::MAX, what, &cmd);
    assert_exit(&o, 0);
    exact(&format!("{what}, uncut"));
    reset();
    tally.one_run = one_run;
    let mut after_cut = false;
    loop {
        let cutting = tally.cuts < 10;
        let at = if cutting { rng.upto(one_run) } else { u64::MAX };
        let dirs = helper_dirs();
        let label = format!("{what}, cut at byte {at}");
        let (o, moved) = through_relay(&relay, down, at, &label, &cmd);
        tally.moved += moved;
        if o.status.code() == Some(0) {
            let j = json(&o);
            eprintln!(
                "{label}: finished ({} on the relay; resumed at {}, {} on the wire)",
                moved, j["resumed_at"], j["bytes_on_wire"]
            );
            if after_cut {
                tally.on_resume += j["bytes_on_wire"].as_u64().unwrap_or(0);
            }
            exact(&label);
            tally.finished += 1;
            after_cut = false;
            if !cutting {
                break;
            }
            reset();
            continue;
        }
        tally.cuts += 1;
        after_cut = true;
        let said = stderr(&o);
        eprintln!(
            "{label}: exit {:?} after {moved} bytes: {}",
            o.status.code(),
            said.lines().last().unwrap_or("").trim()
        );
        assert!(
            said.contains("run the same")
                || said.contains("cannot reach")
                || said.contains("connection")
                || said.contains("Connection"),
            "{label}: the message does not say what happened: {said}"
        );
        let left = helper_dirs_left(&dirs);
        assert!(left.is_empty(), "{label}: left on the host: {left:?}");
    }
    tally
}

#[test]
fn fault_suite_pulls_cut_at_random_offsets_resume_exact() {
    let sshd = Sshd::start();
    let mut rng = Rng::from_env("pull cuts");
    let t = tempdir();
    let dev = t.path().join("disk");
    fault_disk(&dev);
    let want = sha256_file(&dev);
    let img = t.path().join("image");
    for mode in ["helper", "dd"] {
        let what = format!("pull ({mode})");
        let tally = cut_chain(
            &sshd,
            &mut rng,
            &what,
            true,
            |host| pull_via(host, &sshd, &dev, &img, mode),
            || {
                for f in ["image", "image.manifest", "image.pull"] {
                    let _ = std::fs::remove_file(t.path().join(f));
                }
            },
            |label| assert_eq!(sha256_file(&img), want, "{label}"),
        );
        tally.print(&what);
    }
}

#[test]
fn fault_suite_pushes_cut_at_random_offsets_finish_exact() {
    let sshd = Sshd::start();
    let mut rng = Rng::from_env("push cuts");
    let t = tempdir();
    let dev = t.path().join("disk");
    fault_disk(&dev);
    let img = t.path().join("image");
    assert_exit(&pull(&sshd, &dev, &img), 0);
    let pulled_disk = std::fs::read(&dev).unwrap();
    let pulled_manifest = std::fs::read(t.path().join("image.manifest")).unwrap();
    // 32 MiB of new data over data and zeros, and a few scattered pages.
    write_at(&img, &pattern(31, 32 * MIB as usize), 12 * MIB);
    for p in 0..16u64 {
        write_at(&img, &pattern(40 + p, 4096), 50 * MIB + p * 2 * MIB + 8192);
    }
    let want = sha256_file(&img);
    let reset = || {
        std::fs::write(&dev, &pulled_disk).unwrap();
        std::fs::write(t.path().join("image.manifest"), &pulled_manifest).unwrap();
    };
    for mode in ["helper", "dd"] {
        let what = format!("push ({mode})");
        let tally = cut_chain(
            &sshd,
            &mut rng,
            &what,
            false,
            |host| {
                let mut c = push_via(&sshd, host, &img, &dev, mode);
                c.arg("--json");
                c
            },
            reset,
            |label| assert_eq!(sha256_file(&dev), want, "{label}"),
        );
        tally.print(&what);
        reset();
    }
}

/// `pull --update` (the pre-copy of `upgrade`) cut at random offsets: each
/// rerun finishes, the image exactly the disk, its manifest the disk's.
#[test]
fn fault_suite_updates_cut_at_random_offsets_finish_exact() {
    let sshd = Sshd::start();
    let mut rng = Rng::from_env("update cuts");
    let t = tempdir();
    let dev = t.path().join("disk");
    fault_disk(&dev);
    let img = t.path().join("image");
    assert_exit(&pull(&sshd, &dev, &img), 0);
    let old_image = std::fs::read(&img).unwrap();
    let old_manifest = std::fs::read(t.path().join("image.manifest")).unwrap();
    // 24 MiB of new data over data and zeros, 4 MiB zeroed, a few pages.
    write_at(&dev, &pattern(51, 24 * MIB as usize), 14 * MIB);
    write_at(&dev, &vec![0u8; 4 * MIB as usize], 2 * MIB);
    for p in 0..8u64 {
        write_at(&dev, &pattern(60 + p, 4096), 70 * MIB + p * 3 * MIB);
    }
    let want = sha256_file(&dev);
    let data = std::fs::read(&dev).unwrap();
    let tally = cut_chain(
        &sshd,
        &mut rng,
        "pull --update",
        true,
        |host| {
            // Pulled directly, updated through the relay: the same sshd
            // on another port, which --update would refuse as another
            // host. The manifest is made to say the relay's.
            let mpath = t.path().join("image.manifest");
            let mut m: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&mpath).unwrap()).unwrap();
            m["source"]["host"] = host.into();
            std::fs::write(&mpath, m.to_string()).unwrap();
            let mut c = pull_via(host, &sshd, &dev, &img, "helper");
            c.arg("--update");
            c
        },
        || {
            std::fs::write(&img, &old_image).unwrap();
            std::fs::write(t.path().join("image.manifest"), &old_manifest).unwrap();
            let _ = std::fs::remove_file(t.path().join("image.precopy"));
        },
        |label| {
            assert_eq!(sha256_file(&img), want, "{label}");
            let m: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(t.path().join("image.manifest")).unwrap(),
            )
            .unwrap();
            for (i, chunk) in data.chunks(MIB as usize).enumerate() {
                assert_eq!(
                    m["blocks"][i],
                    hex::encode(Sha256::digest(chunk)),
                    "{label}: block {i}"
                );
            }
        },
    );
    tally.print("pull --update");
}

/// Run CMD and kill it with SIGKILL after MS milliseconds (if it is still
/// running then): whether it had finished, and its output.
fn killed_after(mut cmd: Command, ms: u64) -> (bool, std::process::Output) {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let waiter = std::thread::spawn(move || child.wait_with_output().unwrap());
    let deadline = Instant::now() + Duration::from_millis(ms);
    while Instant::now() < deadline && !waiter.is_finished() {
        std::thread::sleep(Duration::from_millis(2));
    }
    let finished = waiter.is_finished();
    if !finished {
        let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
    }
    let o = waiter.join().unwrap();
    // Exit 0 is a run that finished, even when it did so between the
    // look above and the kill (a killed process has no exit code): a
    // test once counted such a run as killed, and its rerun then found
    // the finished image and refused it.
    (o.status.code() == Some(0), o)
}

/// Kill -9 at random moments of a pull and of a push, in both modes: each
/// rerun of the same command finishes exact, nothing of the helper left.
#[test]
fn fault_suite_kill_9_at_random_moments_then_the_rerun_is_exact() {
    let sshd = Sshd::start();
    let mut rng = Rng::from_env("kill -9");
    let t = tempdir();
    let dev = t.path().join("disk");
    fault_disk(&dev);
    let want_pull = sha256_file(&dev);
    let img = t.path().join("image");
    let host = sshd.host();
    for op in ["pull", "push"] {
        for mode in ["helper", "dd"] {
            let what = format!("{op} ({mode})");
            let cmd = || {
                if op == "pull" {
                    pull_via(&host, &sshd, &dev, &img, mode)
                } else {
                    let mut c = push_via(&sshd, &host, &img, &dev, mode);
                    c.arg("--json");
                    c
                }
            };
            for f in ["image", "image.manifest", "image.pull", "image.push"] {
                let _ = std::fs::remove_file(t.path().join(f));
            }
            fault_disk(&dev);
            if op == "push" {
                // The disk as pulled, the image changed.
                assert_exit(&pull(&sshd, &dev, &img), 0);
                write_at(&img, &pattern(31, 32 * MIB as usize), 12 * MIB);
            }
            let want = if op == "pull" {
                want_pull.clone()
            } else {
                sha256_file(&img)
            };
            let started = Instant::now();
            let (_, o) = killed_after(cmd(), 600_000);
            assert_exit(&o, 0);
            let one_run = started.elapsed().as_millis() as u64;
            let got = if op == "pull" { &img } else { &dev };
            assert_eq!(sha256_file(got), want, "{what}, not killed");
            // Back to before the operation.
            if op == "pull" {
                for f in ["image", "image.manifest", "image.pull"] {
                    let _ = std::fs::remove_file(t.path().join(f));
                }
            } else {
                fault_disk(&dev);
                assert_exit(&pull(&sshd, &dev, &t.path().join("again")), 0);
                std::fs::copy(
                    t.path().join("again.manifest"),
                    t.path().join("image.manifest"),
                )
                .unwrap();
                std::fs::remove_file(t.path().join("again")).unwrap();
            }
            let mut kills = 0;
            let mut finished = false;
            while kills < 6 {
                let ms = rng.upto(one_run);
                let dirs = helper_dirs();
                let (done, o) = killed_after(cmd(), ms);
                if done {
                    eprintln!("{what}: finished before the kill at {ms} ms");
                    finished = true;
                    break;
                }
                kills += 1;
                eprintln!(
                    "{what}: killed at {ms} ms of ~{one_run} (exit {:?})",
                    o.status.code()
                );
                let left = helper_dirs_left(&dirs);
                assert!(
                    left.is_empty(),
                    "{what}, killed at {ms} ms: left on the host: {left:?}"
                );
            }
            if !finished {
                let o = output_within(cmd(), 180, &format!("{what}, the rerun"));
                assert_exit(&o, 0);
                let j = json(&o);
                eprintln!(
                    "{what}: {kills} kills, then the rerun finished: resumed at {}, {} on the \
                     wire; exact",
                    j["resumed_at"], j["bytes_on_wire"]
                );
            }
            assert_eq!(sha256_file(got), want, "{what}, after {kills} kills");
        }
    }
}
