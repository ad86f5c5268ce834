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
use ui::{Ui, human_bytes};

async fn connect(conn: &Conn) -> Result<Session> {
    ssh::connect_to(&conn.host, conn.identity.clone(), conn.accept_new_host_key).await
}

fn print_json<T: Serialize>(v: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

pub async fn run(cli: Cli) -> Result<()> {
    let json = cli.json;
    match cli.command {
        Command::Probe { conn } => {
            let s = connect(&conn).await?;
            let facts = remote::gather(&s).await?;
            let r = remote::probe::report(s.host(), &facts);
            if json {
                print_json(&r)?;
            } else {
                print!("{}", r.human());
            }
            s.close().await;
        }
        Command::Freeze { conn, device, yes } => {
            let ui = Ui { json, yes };
            let s = connect(&conn).await?;
            let facts = remote::gather(&s).await?;
            ui.confirm(&format!(
                "Stop the services of {} and make its disk read-only?",
                s.host()
            ))?;
            let r = remote::freeze::freeze(&s, &facts, device.as_deref()).await?;
            if json {
                print_json(&r)?;
            } else {
                println!(
                    "{} frozen: {} read-only ({}), {} unit(s) stopped, swap off: [{}]{}",
                    r.host,
                    r.device,
                    r.read_only.join(", "),
                    r.stopped.len(),
                    r.swap_off.join(", "),
                    if r.killed.is_empty() {
                        String::new()
                    } else {
                        format!(", stopped (addresses kept): {}", r.killed.join(", "))
                    }
                );
                println!("`drydock thaw {}` undoes it", s.target.typed_arg());
            }
            s.close().await;
        }
        Command::Thaw { conn, device } => {
            let s = connect(&conn).await?;
            let facts = remote::gather(&s).await?;
            let r = remote::freeze::thaw(&s, &facts, device.as_deref()).await?;
            if json {
                print_json(&r)?;
            } else {
                println!("{}", r.human());
            }
            s.close().await;
        }
        Command::Pull {
            conn,
            output,
            device,
            live,
            transfer,
        } => {
            let ui = Ui { json, yes: false };
            let s = connect(&conn).await?;
            let facts = remote::gather(&s).await?;
            let opts = transfer::pull::PullOptions {
                output,
                device,
                live,
                transfer: transfer.into(),
            };
            let r = transfer::pull::pull(&s, &facts, &opts, &ui).await?;
            if r.device.starts_with("/dev/") {
                record_boot(&s, &facts, &opts.output, &ui).await;
            }
            if json {
                print_json(&r)?;
            } else {
                println!(
                    "pulled {}:{} to {} ({} in {:.1}s, {} on the wire at {}/s{}); verified by {} on the host{}, digest {}",
                    r.host,
                    r.device,
                    r.image.display(),
                    human_bytes(r.size),
                    r.seconds,
                    human_bytes(r.bytes_received),
                    human_bytes((r.bytes_received as f64 / r.seconds.max(0.001)) as u64),
                    if r.resumed_at > 0 {
                        format!(", resumed at {}", human_bytes(r.resumed_at))
                    } else {
                        String::new()
                    },
                    r.hasher,
                    r.helper_peak_rss_kib
                        .map(|k| format!(" (helper peak memory {})", human_bytes(k * 1024)))
                        .unwrap_or_default(),
                    r.digest
                );
            }
            s.close().await;
        }
        Command::Push {
            image,
            conn,
            device,
            yes,
            full,
            transfer,
        } => {
            let ui = Ui { json, yes };
            let s = connect(&conn).await?;
            let facts = remote::gather(&s).await?;
            let opts = transfer::push::PushOptions {
                image,
                device,
                full,
                frozen_boot_id: None,
                transfer: transfer.into(),
                base_image: None,
            };
            let r = transfer::push::push(&s, &facts, &opts, &ui).await?;
            if json {
                print_json(&r)?;
            } else {
                println!(
                    "pushed {} to {}:{}: {} of {} blocks changed; {} written in {} ranges, {} on the wire, {:.1}s ({} mode{}); read back and verified",
                    r.image.display(),
                    r.host,
                    r.device,
                    r.blocks_written,
                    r.blocks_total,
                    human_bytes(r.bytes_written),
                    r.ranges,
                    human_bytes(r.bytes_on_wire),
                    r.seconds,
                    mode_name(r.transfer),
                    r.helper_peak_rss_kib
                        .map(|k| format!(", helper peak memory {}", human_bytes(k * 1024)))
                        .unwrap_or_default()
                );
            }
            s.close().await;
        }
        Command::Boot {
            image,
            memory,
            cpus,
            dir,
            wait,
            like,
            services,
            network,
        } => {
            let ui = Ui { json, yes: false };
            let dir = match dir {
                Some(d) => d,
                None => vm::boot::default_dir(&image)?,
            };
            let opts = vm::boot::BootOptions {
                image,
                memory,
                cpus,
                dir,
                ready_within: std::time::Duration::from_secs(wait),
                like,
                services,
                network_open: network == cli::Network::Open,
            };
            vm::boot::boot(&opts, &ui).await?;
        }
        Command::Upgrade {
            conn,
            to,
            run,
            device,
            memory,
            cpus,
            yes,
            transfer,
            dry_run,
            gc,
            network,
            allow_host,
        } => {
            let ui = Ui { json, yes };
            let memory_mib = vm::cmdline::parse_memory(&memory).with_context(|| {
                format!("--memory {memory}: expected a size such as 4G or 2048M")
            })?;
            let req = pipeline::Request {
                host: conn.host,
                identity: conn.identity,
                accept_new_host_key: conn.accept_new_host_key,
                device,
                to,
                run,
                memory_mib,
                cpus: cpus.unwrap_or_else(default_cpus),
                transfer: transfer.into(),
                gc,
                network_open: network == cli::Network::Open,
                allow_hosts: allow_host,
            };
            if dry_run {
                let d = pipeline::dry_run(&req).await?;
                if json {
                    print_json(&d)?;
                } else {
                    print!("{}", d.human());
                }
                return Ok(());
            }
            let r = pipeline::start(&req, &ui).await?;
            print_report(&r, json)?;
        }
        Command::Resume { run, yes } => {
            let ui = Ui { json, yes };
            let dir = pipeline::journal::find_run(&run)?;
            let r = pipeline::resume(&dir, &ui).await?;
            print_report(&r, json)?;
        }
        Command::Abort { run, yes } => {
            let ui = Ui { json, yes };
            let dir = pipeline::journal::find_run(&run)?;
            pipeline::abort(&dir, &ui).await?;
            if !json {
                println!("run {} aborted", dir.display());
            }
        }
        Command::Relay { socket } => vm::proxy::relay(&socket)?,
        Command::Runs => {
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
    if json {
        print_json(r)
    } else {
        print!("{}", r.human());
        Ok(())
    }
}

fn mode_name(m: transfer::helper::Mode) -> &'static str {
    match m {
        transfer::helper::Mode::Helper => "helper",
        _ => "dd",
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
