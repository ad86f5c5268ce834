use std::process::ExitCode;

use clap::FromArgMatches;

fn main() -> ExitCode {
    // Everything drydock writes (images, overlays, manifests, journals,
    // logs, QEMU's serial log and captures) holds a server's disk or what
    // it printed, its secrets with it: readable by its owner only. QEMU
    // and qemu-img inherit it.
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    if let Err(e) = drydock::config::load_into_env() {
        eprintln!("drydock: {e}");
        return ExitCode::from(drydock::errors::EXIT_USAGE);
    }
    let matches = drydock::cli::command().get_matches();
    let cli = drydock::cli::Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    if let Err(e) = cli.check() {
        e.exit();
    }
    // russh says nothing below -vv: at -v its only line was a false
    // ERROR about the packet size drydock chose for speed (src/ssh).
    let filter = match (cli.quiet, cli.verbose) {
        (true, _) => "warn,russh=off",
        (_, 0) => "warn,russh=off,drydock=info",
        (_, 1) => "info,russh=off,drydock=debug",
        _ => "debug",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("DRYDOCK_LOG")
                .unwrap_or_else(|_| filter.into()),
        )
        .with_writer(drydock::ui::LogWriter)
        // No colour: a log line can quote a VPS's bytes, and the reporter
        // shows every control character escaped (ui/text.rs), so tracing's
        // own colour codes would be shown escaped too.
        .with_ansi(false)
        .without_time()
        .with_target(false)
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("drydock: cannot start the async runtime: {e}");
            return ExitCode::from(drydock::errors::EXIT_FAILURE);
        }
    };
    // The reporter prints the error (and with --json its "error" event).
    ExitCode::from(runtime.block_on(drydock::run(cli)))
}
