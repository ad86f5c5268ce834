//! drydock: upgrade a small server offline.
//!
//! `run` turns parsed arguments into one operation; `main` only parses,
//! builds the runtime and maps the error to an exit code.

pub mod cli;
pub mod errors;
pub mod image;
pub mod paths;
pub mod pipeline;
pub mod recipes;
pub mod releases;
pub mod remote;
pub mod ssh;
pub mod transfer;
pub mod ui;
pub mod vm;

use anyhow::{Context, Result};
use serde::Serialize;

use cli::{Cli, Command, Conn};
use ssh::Session;
use ui::Ui;

async fn connect(conn: &Conn) -> Result<Session> {
    ssh::connect_to(&conn.host, conn.identity.clone(), conn.accept_new_host_key).await
}

fn print_json<T: Serialize>(v: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// One command: parsed arguments in, its report printed (`--json`: one
/// JSON document on stdout; else the report's `human()` text).
pub async fn run(cli: Cli) -> Result<()> {
    let json = cli.json;
    match cli.command {
        Command::Probe(a) => probe(a, json).await,
        Command::Freeze(a) => freeze(a, json).await,
        Command::Thaw(a) => thaw(a, json).await,
        Command::Pull(a) => pull(a, json).await,
        Command::Push(a) => push(a, json).await,
        Command::Boot(a) => boot(a, json).await,
        Command::Upgrade(a) => upgrade(a, json).await,
        Command::Resume(a) => {
            let ui = Ui { json, yes: a.yes };
            let dir = pipeline::journal::find_run(&a.run)?;
            let r = pipeline::resume(&dir, &ui).await?;
            print_report(&r, json)
        }
        Command::Abort(a) => {
            let ui = Ui { json, yes: a.yes };
            let dir = pipeline::journal::find_run(&a.run)?;
            pipeline::abort(&dir, &ui).await?;
            if !json {
                println!("run {} aborted", dir.display());
            }
            Ok(())
        }
        Command::Relay { socket } => vm::proxy::relay(&socket),
        Command::Runs => runs(json),
    }
}

/// Print a report: JSON on stdout for programs, its text for people.
fn emit<T: Serialize>(v: &T, json: bool, human: impl FnOnce(&T) -> String) -> Result<()> {
    if json {
        print_json(v)
    } else {
        print!("{}", human(v));
        Ok(())
    }
}

async fn probe(a: cli::ProbeArgs, json: bool) -> Result<()> {
    let s = connect(&a.conn).await?;
    let facts = remote::gather(&s).await?;
    let r = remote::probe::report(s.host(), &facts);
    emit(&r, json, |r| r.human())?;
    s.close().await;
    Ok(())
}

async fn freeze(a: cli::FreezeArgs, json: bool) -> Result<()> {
    let ui = Ui { json, yes: a.yes };
    let s = connect(&a.conn).await?;
    let facts = remote::gather(&s).await?;
    ui.confirm(&format!(
        "Stop the services of {} and make its disk read-only?",
        s.host()
    ))?;
    let r = remote::freeze::freeze(&s, &facts, a.device.as_deref()).await?;
    emit(&r, json, |r| r.human(&s.target.typed_arg()))?;
    s.close().await;
    Ok(())
}

async fn thaw(a: cli::ThawArgs, json: bool) -> Result<()> {
    let s = connect(&a.conn).await?;
    let facts = remote::gather(&s).await?;
    let r = remote::freeze::thaw(&s, &facts, a.device.as_deref()).await?;
    emit(&r, json, |r| format!("{}\n", r.human()))?;
    s.close().await;
    Ok(())
}

async fn pull(a: cli::PullArgs, json: bool) -> Result<()> {
    let ui = Ui { json, yes: false };
    let s = connect(&a.conn).await?;
    let facts = remote::gather(&s).await?;
    let opts = transfer::pull::PullOptions {
        output: a.output,
        device: a.device,
        live: a.live,
        transfer: a.transfer.into(),
    };
    let r = transfer::pull::pull(&s, &facts, &opts, &ui).await?;
    if r.device.starts_with("/dev/") {
        record_boot(&s, &facts, &opts.output, &ui).await;
    }
    emit(&r, json, |r| r.human())?;
    s.close().await;
    Ok(())
}

async fn push(a: cli::PushArgs, json: bool) -> Result<()> {
    let ui = Ui { json, yes: a.yes };
    let s = connect(&a.conn).await?;
    let facts = remote::gather(&s).await?;
    let opts = transfer::push::PushOptions {
        image: a.image,
        device: a.device,
        full: a.full,
        frozen_boot_id: None,
        transfer: a.transfer.into(),
        base_image: None,
    };
    let r = transfer::push::push(&s, &facts, &opts, &ui).await?;
    emit(&r, json, |r| r.human())?;
    s.close().await;
    Ok(())
}

async fn boot(a: cli::BootArgs, json: bool) -> Result<()> {
    let ui = Ui { json, yes: false };
    let dir = match a.dir {
        Some(d) => d,
        None => vm::boot::default_dir(&a.image)?,
    };
    let opts = vm::boot::BootOptions {
        image: a.image,
        memory: a.memory,
        cpus: a.cpus,
        dir,
        ready_within: std::time::Duration::from_secs(a.wait),
        like: a.like,
        services: a.services,
        network_open: a.network == cli::Network::Open,
    };
    vm::boot::boot(&opts, &ui).await
}

async fn upgrade(a: cli::UpgradeArgs, json: bool) -> Result<()> {
    let ui = Ui { json, yes: a.yes };
    let memory_mib = vm::cmdline::parse_memory(&a.memory)
        .with_context(|| format!("--memory {}: expected a size such as 4G or 2048M", a.memory))?;
    let req = pipeline::Request {
        host: a.conn.host,
        identity: a.conn.identity,
        accept_new_host_key: a.conn.accept_new_host_key,
        device: a.device,
        to: a.to,
        run: a.run,
        memory_mib,
        cpus: a.cpus.unwrap_or_else(default_cpus),
        transfer: a.transfer.into(),
        gc: a.gc,
        network_open: a.network == cli::Network::Open,
        allow_hosts: a.allow_host,
    };
    if a.dry_run {
        let d = pipeline::dry_run(&req).await?;
        return emit(&d, json, |d| d.human());
    }
    let r = pipeline::start(&req, &ui).await?;
    print_report(&r, json)
}

fn runs(json: bool) -> Result<()> {
    let runs = pipeline::list()?;
    if json {
        let v: Vec<_> = runs
            .iter()
            .map(|(p, j)| serde_json::json!({"run": p, "host": j.host, "state": j.where_it_stands(), "created_at": j.created_at}))
            .collect();
        print_json(&v)?;
    } else if runs.is_empty() {
        println!("no runs in {}", paths::runs_dir()?.display());
    } else {
        for (p, j) in runs {
            println!("{}  {}  {}", p.display(), j.host, j.where_it_stands());
        }
    }
    Ok(())
}

/// Beside a pulled image, what `drydock boot` needs to hold its services
/// back. Best effort: the image itself is complete without it.
async fn record_boot(s: &Session, facts: &remote::Facts, image: &std::path::Path, ui: &Ui) {
    match vm::boot::record(s, facts, image).await {
        Ok(dir) => ui.say(format!(
            "recorded the kernel it runs in {}: `drydock boot` holds its services back",
            dir.display()
        )),
        Err(e) => ui.say(format!(
            "note: no kernel recorded for `drydock boot` ({e:#}); boot the image with --services"
        )),
    }
}

fn default_cpus() -> u32 {
    std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(2)
}

fn print_report(r: &pipeline::Report, json: bool) -> Result<()> {
    emit(r, json, |r| r.human())
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
