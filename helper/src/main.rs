//! The helper's entry point on the VPS: lock memory, remove its own copy
//! from the host, serve one session on stdin/stdout, exit 0 on success and
//! 1 after an error (already sent to drydock as an `Error` frame, and
//! printed on stderr).
//!
//! `drydock-helper --remove DIR [--unmount]`: before serving, unlink the
//! executable in DIR, detach DIR's tmpfs (lazily: the running program keeps
//! its pages until it exits) and remove DIR, so that nothing of drydock is
//! left on the host however the session ends, and no round trip is spent
//! on cleaning up. It says Hello only after that; if the removal fails it
//! sends an `Error` frame instead and exits, and drydock, having had no
//! Hello, removes the folder itself.

use std::path::Path;

fn remove_own_copy(dir: &Path, unmount: bool) -> Result<(), String> {
    let exe = dir.join("drydock-helper");
    std::fs::remove_file(&exe).map_err(|e| format!("{}: {e}", exe.display()))?;
    if unmount {
        rustix::mount::unmount(dir, rustix::mount::UnmountFlags::DETACH)
            .map_err(|e| format!("unmount {}: {e}", dir.display()))?;
    }
    std::fs::remove_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--version") {
        println!(
            "drydock-helper {} protocol {}",
            env!("CARGO_PKG_VERSION"),
            drydock_helper::proto::VERSION
        );
        return;
    }
    if args.first().map(String::as_str) == Some("--carry") {
        std::process::exit(carry(&args[1..]));
    }
    // Locked memory: nothing of the helper is paged out to (or in from) a
    // swap device while it writes the disk.
    if let Err(e) =
        rustix::mm::mlockall(rustix::mm::MlockAllFlags::CURRENT | rustix::mm::MlockAllFlags::FUTURE)
    {
        eprintln!("drydock-helper: warning: cannot lock memory: {e}");
    }
    if args.first().map(String::as_str) == Some("--remove")
        && let Some(dir) = args.get(1)
        && let Err(e) = remove_own_copy(
            Path::new(dir),
            args.get(2).map(String::as_str) == Some("--unmount"),
        )
    {
        let message = format!("cannot remove its own copy: {e}");
        eprintln!("drydock-helper: {message}");
        let mut out = std::io::stdout().lock();
        let _ = drydock_helper::proto::write_msg(
            &mut out,
            &drydock_helper::proto::Msg::Error { message },
        );
        let _ = std::io::Write::flush(&mut out);
        std::process::exit(1);
    }
    let stdin = std::io::stdin().lock();
    let stdout = std::io::stdout().lock();
    if let Err(e) = drydock_helper::server::serve(stdin, stdout) {
        eprintln!("drydock-helper: {e}");
        std::process::exit(1);
    }
}

/// `drydock-helper --carry LIVE FROZEN TARGET PREFIX SINCE`, in the worker
/// VM (see `carry`): one line per path; `refused: WHY` and exit 3 when it
/// cannot be carried (nothing applied); `end N` and exit 0 when it was.
fn carry(args: &[String]) -> i32 {
    use drydock_helper::carry;
    let [live, frozen, target, prefix, since] = args else {
        eprintln!("usage: drydock-helper --carry LIVE FROZEN TARGET PREFIX SINCE");
        return 2;
    };
    let Ok(since) = since.parse() else {
        eprintln!("drydock-helper: SINCE is seconds since 1970, not {since}");
        return 2;
    };
    let o = carry::Options {
        since,
        prefix: prefix.into(),
    };
    let (live, frozen, target) = (Path::new(live), Path::new(frozen), Path::new(target));
    let plan = match carry::plan(live, frozen, target, &o) {
        Ok(p) => p,
        Err(e) => {
            println!(
                "error: comparing {} with {}: {e}",
                live.display(),
                frozen.display()
            );
            return 1;
        }
    };
    println!("compared {}", plan.compared);
    for r in &plan.refused {
        println!("refused: {r}");
    }
    if !plan.refused.is_empty() {
        return 3;
    }
    for p in &plan.vps_wins {
        println!("vps-wins {}", o.prefix.join(p).display());
    }
    for p in &plan.upgrade_wins {
        println!("upgrade-wins {}", o.prefix.join(p).display());
    }
    for a in &plan.actions {
        match a {
            carry::Action::Copy(p) => println!("carried {}", o.prefix.join(p).display()),
            carry::Action::Remove(p) => println!("removed {}", o.prefix.join(p).display()),
        }
    }
    if let Err(e) = carry::apply(frozen, target, &plan) {
        println!("error: carrying into {}: {e}", target.display());
        return 1;
    }
    println!("end {}", plan.actions.len());
    0
}
