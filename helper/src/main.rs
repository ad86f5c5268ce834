//! The helper's entry point on the VPS: lock memory, serve one session on
//! stdin/stdout, exit 0 on success and 1 after an error (already sent to
//! drydock as an `Error` frame, and printed on stderr).

fn main() {
    if std::env::args().nth(1).as_deref() == Some("--version") {
        println!(
            "drydock-helper {} protocol {}",
            env!("CARGO_PKG_VERSION"),
            drydock_helper::proto::VERSION
        );
        return;
    }
    // Locked memory: nothing of the helper is paged out to (or in from) a
    // swap device while it writes the disk.
    if let Err(e) =
        rustix::mm::mlockall(rustix::mm::MlockAllFlags::CURRENT | rustix::mm::MlockAllFlags::FUTURE)
    {
        eprintln!("drydock-helper: warning: cannot lock memory: {e}");
    }
    let stdin = std::io::stdin().lock();
    let stdout = std::io::stdout().lock();
    if let Err(e) = drydock_helper::server::serve(stdin, stdout) {
        eprintln!("drydock-helper: {e}");
        std::process::exit(1);
    }
}
