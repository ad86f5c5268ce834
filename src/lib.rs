//! drydock: upgrade a small server offline.
//!
//! `run` turns parsed arguments into one operation; `main` only parses,
//! builds the runtime and maps the error to an exit code.

pub mod backup;
pub mod cli;
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
pub mod vm;

use anyhow::{Context, Result};

use cli::{Cli, Command, Conn};
use ssh::Session;
use ui::Ui;

async fn connect(conn: &Conn) -> Result<Session> {
    host_is_not_a_file(&conn.host)?;
    let (args, accept_new) = conn.ssh_args()?;
    ssh::connect_to(&conn.host, &args, conn.identity.clone(), accept_new).await
}

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
        Command::Probe(a) => probe(a, ui).await,
        Command::Freeze(a) => {
            let ui = ui.with_yes(a.yes);
            freeze(a, &ui).await
        }
        Command::Thaw(a) => thaw(a, ui).await,
        Command::Pull(a) => pull(a, ui).await,
        Command::Push(a) => {
            let ui = ui.with_yes(a.yes);
            push(a, &ui).await
        }
        Command::Boot(a) => boot(a, ui).await,
        Command::Upgrade(a) => {
            let ui = ui.with_yes(a.yes);
            upgrade(a, false, &ui).await
        }
        Command::Rehearse(a) => upgrade(a, true, ui).await,
        Command::Resume(a) => {
            let ui = ui.with_yes(a.yes);
            let dir = pipeline::journal::find_run(&a.run)?;
            let r = pipeline::resume(&dir, &a.services, &ui).await?;
            print_report(&r, &ui)
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
        Command::Backup(a) => backup_cmd(a, ui).await,
        Command::Backups(a) => match a.action {
            None => backups_list(a.store.as_deref(), ui),
            Some(cli::BackupsAction::Prune { keep }) => backups_prune(a.store.as_deref(), keep, ui),
        },
        Command::Verify(a) => verify(a, ui).await,
        Command::Restore(a) => {
            let ui = ui.with_yes(a.yes);
            restore(a, &ui).await
        }
        Command::Runs(a) => match a.action {
            None => runs(a.size, ui),
            Some(cli::RunsAction::Rm { run, force }) => runs_rm(&run, force, ui),
        },
    }
}

/// `drydock probe`'s result: what the host runs, and the worker VM for it.
#[derive(serde::Serialize)]
struct Probe {
    #[serde(flatten)]
    report: remote::probe::ProbeReport,
    worker_vm: Option<vm::shape::Shape>,
    /// What the host runs: what `upgrade` proves on the upgraded copy.
    services: Option<services::ServiceSet>,
}

async fn probe(a: cli::ProbeArgs, ui: &Ui) -> Result<()> {
    let s = connect(&a.conn).await?;
    let facts = remote::gather(&s).await?;
    let report = remote::probe::report(s.host(), &facts);
    // The worker VM drydock builds for this host (`drydock boot --like`
    // reads it back): the VM layer's, added here so that the remote layer
    // does not depend on it.
    let worker_vm = facts
        .root_disk()
        .ok()
        .map(|d| vm::shape::Shape::from_facts(&facts, d.trim_start_matches("/dev/")));
    let set = services::gather(&s).await?;
    let mut lines: Vec<String> = worker_vm
        .iter()
        .flat_map(|w| {
            std::iter::once(format!("worker VM  {}", w.describe()))
                .chain(
                    w.disk_id
                        .iter()
                        .flat_map(|i| i.links.iter())
                        .filter(|(n, _)| n.starts_with("by-id/"))
                        .map(|(n, t)| format!("  disk id  {n} -> {t}")),
                )
                .chain(w.notes.iter().map(|n| format!("  note     {n}")))
        })
        .collect();
    if let Some(set) = &set {
        lines.push(format!("services   {}", set.describe()));
    }
    let human = report.human(&lines);
    ui.result(
        "probe",
        &Probe {
            report,
            worker_vm,
            services: set,
        },
        human,
    )?;
    s.close().await;
    Ok(())
}

async fn freeze(a: cli::FreezeArgs, ui: &Ui) -> Result<()> {
    let s = connect(&a.conn).await?;
    let facts = remote::gather(&s).await?;
    ui.confirm(&format!(
        "Stop the services of {} and make its disk read-only?",
        s.host()
    ))
    .await?;
    let r = remote::freeze::freeze(&s, &facts, a.device.as_deref()).await?;
    ui.result("freeze", &r, r.human(&s.target.typed_arg()))?;
    s.close().await;
    Ok(())
}

async fn thaw(a: cli::ThawArgs, ui: &Ui) -> Result<()> {
    let s = connect(&a.conn).await?;
    let facts = remote::gather(&s).await?;
    let r = remote::freeze::thaw(&s, &facts, a.device.as_deref()).await?;
    ui.result("thaw", &r, format!("{}\n", r.human()))?;
    s.close().await;
    Ok(())
}

async fn pull(a: cli::PullArgs, ui: &Ui) -> Result<()> {
    let update = a.update;
    if update {
        if !transfer::pull::precopy::can_start_from(&a.output) {
            return Err(crate::usage!(
                "--update: {} is not a finished pull (no image with its manifest beside it); \
                 pull without --update first",
                a.output.display()
            ));
        }
        if a.transfer == cli::Transfer::Dd {
            return Err(crate::usage!(
                "--update needs drydock's helper on the host, and --transfer dd was asked for: \
                 drop one of the two"
            ));
        }
    } else {
        transfer::check_output(&a.output)?;
    }
    let s = connect(&a.conn).await?;
    let facts = remote::gather(&s).await?;
    let opts = transfer::pull::PullOptions {
        output: a.output,
        device: a.device,
        live: a.live,
        transfer: a.transfer.into(),
    };
    let r = if update {
        transfer::pull::precopy::precopy(&s, &facts, &opts, ui)
            .await?
            .map_err(|why| {
                refused!(
                    "--update: {why}; nothing was changed. Pull the whole disk into another \
                     --output"
                )
            })?
    } else {
        transfer::pull::pull(&s, &facts, &opts, ui).await?
    };
    if r.device.starts_with("/dev/") {
        record_boot(&s, &facts, &opts.output, ui).await;
    }
    ui.result("pull", &r, r.human())?;
    s.close().await;
    Ok(())
}

async fn backup_cmd(a: cli::BackupArgs, ui: &Ui) -> Result<()> {
    let s = connect(&a.conn).await?;
    let facts = remote::gather(&s).await?;
    let store = match a.store {
        Some(d) => d,
        None => backup::default_store(&s.host())?,
    };
    let opts = backup::take::BackupOptions {
        store,
        device: a.device,
        freeze: a.freeze,
        transfer: a.transfer.into(),
    };
    let r = backup::take::backup(&s, &facts, &opts, ui).await?;
    ui.result("backup", &r, r.human())?;
    s.close().await;
    Ok(())
}

fn backups_list(dir: Option<&std::path::Path>, ui: &Ui) -> Result<()> {
    let stores = backup::stores(dir)?;
    if stores.is_empty() {
        let root = paths::backups_dir()?;
        ui.result(
            "backups",
            &serde_json::json!({ "stores": [] }),
            format!(
                "no backup stores in {}; `drydock backup HOST` makes one
",
                root.display()
            ),
        )?;
        return Ok(());
    }
    let mut all = Vec::new();
    let mut human = String::new();
    for s in &stores {
        let (rows, figures) = backup::list(s)?;
        human.push_str(&backup::human_list(&rows, &figures));
        all.push(serde_json::json!({ "store": figures, "versions": rows }));
    }
    ui.result("backups", &serde_json::json!({ "stores": all }), human)
}

fn backups_prune(dir: Option<&std::path::Path>, keep: u64, ui: &Ui) -> Result<()> {
    let stores = backup::stores(dir)?;
    let [store] = &stores[..] else {
        return Err(usage!(
            "prune works on one store: say which with --store DIR ({} stores under {})",
            stores.len(),
            paths::backups_dir()?.display()
        ));
    };
    let _lock = store.lock()?;
    let (gone, freed) = store.prune(keep as usize)?;
    let kept: Vec<String> = store.versions()?.into_iter().map(|v| v.id).collect();
    let human = format!(
        "{}: removed {} version(s){}, freed {}; kept {}\n",
        store.dir.display(),
        gone.len(),
        if gone.is_empty() {
            String::new()
        } else {
            format!(" ({})", gone.join(", "))
        },
        ui::human_bytes(freed),
        kept.join(", ")
    );
    ui.result(
        "backups-prune",
        &serde_json::json!({ "store": store.dir, "removed": gone, "kept": kept, "freed_bytes": freed }),
        human,
    )
}

async fn restore(a: cli::RestoreArgs, ui: &Ui) -> Result<()> {
    let (store, v) = backup::find(&a.id, a.store.as_deref())?;
    let s = connect(&a.conn).await?;
    let facts = remote::gather(&s).await?;
    let opts = backup::restore::RestoreOptions {
        device: a.device,
        transfer: a.transfer.into(),
        like: a.like,
        keep_network: a.keep_network,
        no_boot_proof: a.no_boot_proof,
        identity: a.conn.identity.clone(),
        memory_mib: a.memory.mib(),
        accept_failed: a.accept_failed,
    };
    let r = backup::restore::restore(&s, &facts, (&store, &v), &opts, ui).await?;
    ui.result("restore", &r, r.human())?;
    s.close().await;
    Ok(())
}

async fn verify(a: cli::VerifyArgs, ui: &Ui) -> Result<()> {
    let (store, v) = backup::find(&a.id, a.store.as_deref())?;
    let bar = ui.bytes_bar(v.manifest.size, "verify");
    let r = store.verify(&v, |n| bar.inc(n))?;
    bar.finish();
    let human = format!(
        "version {} in {}: all {} blocks read back and match their hashes; digest {}\n",
        r.id,
        store.dir.display(),
        r.blocks,
        r.digest
    );
    if !a.boot {
        return ui.result("verify", &r, human);
    }
    ui.say(human.trim_end().to_string());
    let memory_mib = a.memory.mib();
    let proof = backup::proof::verify_boot(
        &store,
        &v,
        a.identity.as_deref(),
        memory_mib,
        &a.accept_failed,
        ui,
    )
    .await?;
    ui.result(
        "verify",
        &serde_json::json!({ "blocks": r, "boot": proof }),
        proof.human(),
    )
}

/// A HOST that names a file here (a path, an image) is a slip, not a host
/// to look up in DNS.
fn host_is_not_a_file(host: &str) -> Result<()> {
    let p = std::path::Path::new(host);
    let image_like = [".raw", ".img", ".qcow2", ".manifest"]
        .iter()
        .any(|e| host.ends_with(e));
    if p.exists() && (host.contains('/') || image_like) {
        return Err(crate::usage!(
            "'{host}' is a file here, not a host: HOST is [user@]host[:port], \
             ssh://[user@]host[:port] or an ssh config alias"
        ));
    }
    Ok(())
}

async fn push(a: cli::PushArgs, ui: &Ui) -> Result<()> {
    if !a.image.exists() && std::path::Path::new(&a.conn.host).is_file() {
        return Err(crate::usage!(
            "IMAGE and HOST are the other way round: {} is not a file and '{}' is; \
             `drydock push IMAGE HOST`",
            a.image.display(),
            a.conn.host
        ));
    }
    if let Some(dir) = &a.packages
        && !dir.is_dir()
    {
        return Err(crate::usage!(
            "--packages {}: not a folder; give the folder of package files an upgrade \
             downloaded (a run's downloads/)",
            dir.display()
        ));
    }
    let s = connect(&a.conn).await?;
    let facts = remote::gather(&s).await?;
    let opts = transfer::push::PushOptions {
        image: a.image,
        device: a.device,
        full: a.full,
        frozen_boot_id: None,
        transfer: a.transfer.into(),
        base_image: None,
        packages: a.packages,
    };
    let r = transfer::push::push(&s, &facts, &opts, ui).await?;
    ui.result("push", &r, r.human())?;
    s.close().await;
    Ok(())
}

async fn boot(a: cli::BootArgs, ui: &Ui) -> Result<()> {
    // A backup version's id: laid out as an image, booted with its host's
    // shape (unless --like says otherwise).
    let (image, like) = if !a.image.exists()
        && let Some(id) = a.image.to_str().filter(|s| !s.contains('/'))
        && let Ok((store, v)) = backup::find(id, None)
    {
        let image = backup::proof::laid_out(&store, &v, ui)?;
        let like = match (a.like, &v.shape) {
            (Some(l), _) => Some(l),
            (None, Some(shape)) => {
                let p = std::path::PathBuf::from(format!("{}.like.json", image.display()));
                std::fs::write(&p, serde_json::to_string_pretty(shape)?)?;
                Some(p)
            }
            (None, None) => None,
        };
        ui.say(format!(
            "version {id} of {} laid out as {}",
            store.dir.display(),
            image.display()
        ));
        (image, like)
    } else {
        (a.image, a.like)
    };
    let dir = match a.dir {
        Some(d) => d,
        None => vm::boot::default_dir(&image)?,
    };
    let opts = vm::boot::BootOptions {
        image,
        memory: a.memory,
        cpus: a.cpus,
        dir,
        ready_within: std::time::Duration::from_secs(a.wait),
        like,
        services: a.services,
        network_open: a.network == cli::Network::Open,
    };
    vm::boot::boot(&opts, ui).await
}

/// `upgrade`, or with REHEARSAL `rehearse` (the same run, live and not
/// pushed).
async fn upgrade(a: cli::UpgradeArgs, rehearsal: bool, ui: &Ui) -> Result<()> {
    let memory_mib = a.memory.mib();
    let (ssh, accept_new_host_key) = a.conn.ssh_args()?;
    let req = pipeline::Request {
        host: a.conn.host,
        ssh,
        identity: a.conn.identity,
        accept_new_host_key,
        device: a.device,
        to: a.to,
        run: a.run,
        memory_mib,
        cpus: a.cpus.unwrap_or_else(default_cpus),
        transfer: a.transfer.into(),
        gc: a.gc,
        network_open: a.network == cli::Network::Open,
        allow_hosts: a.allow_host,
        rehearsal,
        no_rehearsal: a.no_rehearsal,
        no_carry: a.no_carry,
        no_service_proof: a.services.no_service_proof,
        accept_failed: a.services.accept_failed,
        rollback_on_failure: a.services.rollback_on_failure,
    };
    if a.dry_run {
        let d = tokio::select! {
            biased;
            d = pipeline::dry_run(&req) => d?,
            sig = ui.interrupted() => return Err(errors::Interrupted(format!("{}; a dry run changes nothing", Ui::interrupted_text(sig))).into()),
        };
        return ui.result("upgrade", &d, d.human());
    }
    let r = pipeline::start(&req, ui).await?;
    print_report(&r, ui)
}

fn runs(size: bool, ui: &Ui) -> Result<()> {
    let runs = pipeline::list()?;
    let bytes: Vec<u64> = runs.iter().map(|(p, _)| disk_usage(p)).collect();
    let v: Vec<_> = runs
        .iter()
        .zip(&bytes)
        .map(|((p, j), b)| {
            let mut v = serde_json::json!({"run": p, "host": j.host, "state": j.where_it_stands(), "created_at": j.created_at});
            if size {
                v["bytes"] = serde_json::json!(b);
            }
            v
        })
        .collect();
    let human = if runs.is_empty() {
        format!("no runs in {}\n", paths::runs_dir()?.display())
    } else {
        let mut h: String = runs
            .iter()
            .zip(&bytes)
            .map(|((p, j), b)| {
                let kept = if size {
                    format!("  {}", ui::human_bytes(*b))
                } else {
                    String::new()
                };
                format!(
                    "{}  {}  {}{kept}\n",
                    p.display(),
                    j.host,
                    j.where_it_stands()
                )
            })
            .collect();
        if size {
            h.push_str(&format!(
                "{} in {} run(s); `drydock runs rm RUN` removes one\n",
                ui::human_bytes(bytes.iter().sum()),
                runs.len()
            ));
        }
        h
    };
    ui.result("runs", &v, human)
}

/// The space a folder's files take on disk (allocated blocks: the images
/// are sparse).
fn disk_usage(dir: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| if m.is_dir() { 0 } else { m.blocks() * 512 })
                .sum()
        })
        .unwrap_or(0)
}

/// `drydock runs rm RUN`: refused while the run's VPS is frozen and not
/// given back (its base image is what `abort` needs), unless FORCE.
fn runs_rm(name: &str, force: bool, ui: &Ui) -> Result<()> {
    let dir = pipeline::journal::find_run(name)?;
    let j = pipeline::journal::Journal::load(&dir)?;
    if j.holds_the_vps() && !force {
        return Err(refused!(
            "the VPS of run {} ({}) is {}: this run's base image is what gives it back. \
             `drydock abort {}` gives it back, `drydock resume {}` goes on; --force removes \
             the run anyway. Nothing was removed",
            dir.display(),
            j.host,
            if j.is_done(pipeline::journal::Step::Reboot) {
                "running the upgraded disk and did not pass its check"
            } else if j.push_started {
                "frozen and partly pushed"
            } else {
                "still frozen"
            },
            dir.display(),
            dir.display()
        ));
    }
    let freed = disk_usage(&dir);
    std::fs::remove_dir_all(&dir).with_context(|| format!("cannot remove {}", dir.display()))?;
    let done = serde_json::json!({"run": dir, "removed": true, "bytes": freed});
    ui.result(
        "runs rm",
        &done,
        format!(
            "removed {} ({} freed)\n",
            dir.display(),
            ui::human_bytes(freed)
        ),
    )
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

fn print_report(r: &pipeline::Report, ui: &Ui) -> Result<()> {
    ui.result(
        if r.rehearsal { "rehearse" } else { "upgrade" },
        r,
        r.human(),
    )
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
