//! drydock: upgrade a small server offline.
//!
//! `run` turns parsed arguments into one operation; `main` only parses,
//! builds the runtime and maps the error to an exit code.

pub mod backup;
pub mod cli;
mod commands;
pub mod config;
pub mod errors;
pub mod image;
pub mod paths;
pub mod pipeline;
pub mod recipes;
pub mod releases;
pub mod remote;
pub mod services;
pub mod ssh;
pub mod transfer;
pub mod ui;
pub mod util;
pub mod vm;

use anyhow::Result;

use cli::{Cli, Command};
use ui::Ui;

/// One command: parsed arguments in, its report out through the reporter
/// (the result's text, or with `--json` the event stream ending in the
/// "result" or "error" event); gives the exit code. A signal stops any
/// command: those that can stop cleanly (pull, a run's steps, boot) do so
/// themselves and say how to go on; the others end where they are.
pub async fn run(cli: Cli) -> u8 {
    // ssh's ProxyCommand end of the worker VM's relay: a plain byte pipe
    // that ssh ends with a signal, so none is caught and nothing reported.
    // Text for other programs, printed whole: no reporter, no signals.
    if let Command::Completions { shell } = &cli.command {
        let mut cmd = cli::command();
        clap_complete::generate(*shell, &mut cmd, "drydock", &mut std::io::stdout());
        return 0;
    }
    if let Command::Man { dir } = &cli.command {
        let written = match dir {
            Some(d) => clap_mangen::generate_to(cli::command(), d),
            None => clap_mangen::Man::new(cli::command()).render(&mut std::io::stdout()),
        };
        return match written {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("drydock: cannot print the man page: {e}");
                errors::EXIT_FAILURE
            }
        };
    }
    if let Command::Relay { socket } = &cli.command {
        return match vm::proxy::relay(socket) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("drydock: {e:#}");
                errors::exit_code(&e)
            }
        };
    }
    let (ui, reporter) = Ui::start(cli.json, cli.quiet);
    // These stop cleanly on a signal themselves (kept what was verified,
    // powered a guest off, recorded a run's step) and say how to go on;
    // the others are stopped where they are.
    let own_stop = matches!(
        cli.command,
        Command::Pull(_)
            | Command::Backup(_)
            | Command::Verify(cli::VerifyArgs { boot: true, .. })
            | Command::Boot(_)
            | Command::Upgrade(_)
            | Command::Rehearse(_)
            | Command::Resume(_)
    );
    let outcome = if own_stop {
        command(cli.command, &ui).await
    } else {
        tokio::select! {
            biased;
            r = command(cli.command, &ui) => r,
            sig = ui.interrupted() => Err(errors::Interrupted(Ui::interrupted_text(sig)).into()),
        }
    };
    reporter.finish(outcome)
}

async fn command(command: Command, ui: &Ui) -> Result<()> {
    match command {
        Command::Probe(a) => commands::probe::probe(a, ui).await,
        Command::Freeze(a) => {
            let ui = ui.with_yes(a.yes);
            commands::freeze::freeze(a, &ui).await
        }
        Command::Thaw(a) => commands::freeze::thaw(a, ui).await,
        Command::Pull(a) => commands::pull::pull(a, ui).await,
        Command::Push(a) => {
            let ui = ui.with_yes(a.yes);
            commands::push::push(a, &ui).await
        }
        Command::Boot(a) => commands::boot::boot(a, ui).await,
        Command::Upgrade(a) => {
            let ui = ui.with_yes(a.yes);
            commands::upgrade::upgrade(a, false, &ui).await
        }
        Command::Rehearse(a) => commands::upgrade::upgrade(a, true, ui).await,
        Command::Resume(a) => {
            let ui = ui.with_yes(a.yes);
            let dir = pipeline::journal::find_run(&a.run)?;
            let r = pipeline::resume(&dir, &a.services, &ui).await?;
            commands::upgrade::print_report(&r, &ui)
        }
        Command::Abort(a) => {
            let ui = ui.with_yes(a.yes);
            let dir = pipeline::journal::find_run(&a.run)?;
            pipeline::abort(&dir, &ui).await?;
            let done = serde_json::json!({"run": dir, "aborted": true});
            ui.result("abort", &done, format!("run {} aborted\n", dir.display()))
        }
        Command::Relay { .. } | Command::Completions { .. } | Command::Man { .. } => {
            unreachable!("handled before the reporter starts")
        }
        Command::Backup(a) => commands::backup::backup_cmd(a, ui).await,
        Command::Backups(a) => match a.action {
            None => commands::backup::backups_list(a.store.as_deref(), a.key_file.as_deref(), ui),
            Some(cli::BackupsAction::Prune { keep, dry_run }) => commands::backup::backups_forget(
                (a.store.as_deref(), a.key_file.as_deref()),
                backup::forget::Keep {
                    last: keep,
                    ..Default::default()
                },
                dry_run,
                ui,
            ),
            Some(cli::BackupsAction::Forget { keep, dry_run }) => commands::backup::backups_forget(
                (a.store.as_deref(), a.key_file.as_deref()),
                backup::forget::Keep {
                    last: keep.keep_last,
                    hourly: keep.keep_hourly,
                    daily: keep.keep_daily,
                    weekly: keep.keep_weekly,
                    monthly: keep.keep_monthly,
                    yearly: keep.keep_yearly,
                },
                dry_run,
                ui,
            ),
        },
        Command::Verify(a) => commands::verify::verify(a, ui).await,
        Command::Restore(a) => {
            let ui = ui.with_yes(a.yes);
            commands::restore::restore(a, &ui).await
        }
        Command::Runs(a) => match a.action {
            None => commands::runs::runs(a.size, ui),
            Some(cli::RunsAction::Rm { run, force }) => commands::runs::runs_rm(&run, force, ui),
        },
    }
}

/// Asserts that SCRIPT parses as /bin/sh reads it (`sh -n`; dash here, as
/// on Debian): a quoting slip in a format! shows in the unit tests, not on
/// a VPS.
#[cfg(test)]
pub(crate) fn assert_valid_sh(what: &str, script: &str) {
    let o = std::process::Command::new("sh")
        .args(["-n", "-c", script])
        .output()
        .expect("cannot run sh");
    assert!(
        o.status.success(),
        "{what}: {}\n{script}",
        String::from_utf8_lossy(&o.stderr)
    );
}
