//! `drydock upgrade`: probe → freeze → pull → upgrade in a local VM (boot,
//! run, reboot, verify, power off) → push → reboot the VPS → check. Each
//! step is idempotent and recorded in the run's journal when it completes;
//! `resume` continues from the first step not recorded, `abort` gives the
//! VPS back.
//!
//! Here: the request, starting, resuming and driving a run, the dry run,
//! and `runs`. `steps` has the probe and each step on the VPS, `worker`
//! the worker VM, `abort` the way back, `report` what a run says at its
//! end; `journal` is the run's record and `guest` the commands run in the
//! worker VM.

mod abort;
pub(crate) mod carry;
mod https_debs;
pub mod journal;
pub mod proof;
mod report;
mod rundir;
pub(crate) mod steps;
mod worker;

pub use abort::abort;
pub use report::{DryRun, Report};
use steps::{Probed, do_step, probe};

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::errors::Interrupted;
use crate::errors::refused;
use crate::recipes::{self, Plan};
use crate::ssh::{HostSpec, Session};
use crate::ui::Ui;
use journal::{Journal, State, Step, StepRecord};

#[derive(Debug, Clone)]
pub struct Request {
    pub host: String,
    /// `-F`, `-o`, `-p`, `-J`.
    pub ssh: crate::ssh::SshArgs,
    pub identity: Option<PathBuf>,
    pub accept_new_host_key: bool,
    pub device: Option<String>,
    pub to: Option<String>,
    pub run: Option<String>,
    pub memory_mib: u64,
    pub cpus: u32,
    pub transfer: crate::transfer::helper::Mode,
    /// NixOS: delete old generations before the push.
    pub gc: bool,
    /// `--network open`: the worker VM reaches the internet.
    pub network_open: bool,
    /// `--allow-host`: more hosts the sealed worker VM may reach.
    pub allow_hosts: Vec<String>,
    /// `drydock rehearse`: live pull, upgrade in the worker VM, no freeze,
    /// no push.
    pub rehearsal: bool,
    /// `upgrade --no-rehearsal`: freeze first, as before rehearsals.
    pub no_rehearsal: bool,
    /// `upgrade --no-carry`: after the rehearsal, run the upgrade again on
    /// the frozen copy even where the rehearsal's result could be carried.
    pub no_carry: bool,
    /// `--no-service-proof`: the VPS's services are not started on the
    /// upgraded copy before the freeze.
    pub no_service_proof: bool,
    /// `--accept-failed UNIT`: a unit whose failure does not stop the run.
    pub accept_failed: Vec<String>,
    /// `--rollback-on-failure`: a service that does not run on the VPS
    /// after the push gives it its old disk back.
    pub rollback_on_failure: bool,
}

fn plan_of(j: &Journal, host: &recipes::Host) -> Result<Plan> {
    match (&j.to, &j.run) {
        (_, Some(cmd)) => Ok(recipes::run_plan(cmd)),
        (Some(to), None) => recipes::plan(host, to, &recipes::Options { gc: j.gc }),
        (None, None) => bail!("nothing to do: name a release with --to, or a command with --run"),
    }
}

/// What both `upgrade` and `upgrade --dry-run` refuse before connecting.
fn check_request(req: &Request) -> Result<()> {
    if req.to.is_none() && req.run.is_none() {
        return Err(crate::errors::usage!(
            "nothing to do: name a release with --to (e.g. debian-13), or a command with --run"
        ));
    }
    if let Some(to) = &req.to {
        recipes::parse_release(to)?;
    }
    Ok(())
}

/// `upgrade --dry-run`: the probe step's checks and the plan, printed;
/// nothing is changed on the host and no run folder is made.
pub async fn dry_run(req: &Request) -> Result<DryRun> {
    check_request(req)?;
    let j = new_journal(req);
    let s = connect(&j, req.accept_new_host_key).await?;
    // Where the run folder would be made: its nearest existing ancestor.
    let mut dir = crate::paths::runs_dir()?;
    while !dir.exists()
        && let Some(parent) = dir.parent()
    {
        dir = parent.to_path_buf();
    }
    let res = probe(&s, &j, &dir, true).await;
    let set = match &res {
        Ok(_) => crate::services::gather(&s).await.ok().flatten(),
        Err(_) => None,
    };
    s.close().await;
    let Probed {
        facts,
        dev,
        plan,
        shape,
        seal,
        allowed,
    } = res?;
    Ok(DryRun {
        rehearsal: match (req.rehearsal, req.no_rehearsal) {
            (true, _) => "only",
            (false, false) => "first",
            (false, true) => "skipped",
        }
        .into(),
        worker_vm: shape,
        seal,
        network: if req.network_open { "open" } else { "sealed" }.into(),
        allowed_hosts: allowed,
        host: req.host.clone(),
        os: facts.pretty_name(),
        block_device: dev.is_block(),
        device: dev.path,
        size: dev.size,
        plan: plan.description,
        transfer: crate::transfer::helper::choose(req.transfer, &facts)?,
        memory_mib: req.memory_mib,
        cpus: req.cpus,
        commands: plan.commands,
        after_reboot: plan.after_reboot,
        services: set.map(|s| s.names()).unwrap_or_default(),
        service_proof: !req.no_service_proof,
        expect: match (plan.expect_id, plan.expect_version) {
            (Some(id), Some(v)) => Some(format!("{id} {v}")),
            _ => None,
        },
    })
}

async fn connect(j: &Journal, accept_new: bool) -> Result<Session> {
    crate::ssh::connect_to(&j.host, &j.ssh, j.identity.clone(), accept_new).await
}

/// The run's VPS, connected (its host key already known), and its facts
/// as they are now: what each step after the probe starts from.
async fn connect_gathered(j: &Journal) -> Result<(Session, crate::remote::Facts)> {
    let s = connect(j, false).await?;
    let facts = crate::remote::gather(&s).await?;
    Ok((s, facts))
}

/// A new run's journal: nothing done yet.
fn new_journal(req: &Request) -> Journal {
    Journal {
        format: journal::FORMAT.into(),
        host: req.host.clone(),
        ssh: req.ssh.clone(),
        identity: req.identity.clone(),
        accept_new_host_key: req.accept_new_host_key,
        rehearsal: req.rehearsal,
        rehearse_first: !req.rehearsal && !req.no_rehearsal,
        bytes_pulled_live: 0,
        pushed_blocks: None,
        rehearsal_downloads: None,
        downloads: None,
        os_in_worker: None,
        delta_blocks: None,
        delta_bytes: None,
        live_since: None,
        freed_kept_bytes: None,
        carry: None,
        no_carry: req.no_carry,
        carried: None,
        device: req.device.clone(),
        to: req.to.clone(),
        run: req.run.clone(),
        memory_mib: req.memory_mib,
        cpus: req.cpus,
        created_at: crate::util::now(),
        state: State::Running,
        done: Vec::new(),
        os_before: None,
        os_after: None,
        frozen_boot_id: None,
        frozen_at: None,
        back_at: None,
        bytes_pulled: 0,
        bytes_pushed: 0,
        push_started: false,
        shape: None,
        gc: req.gc,
        transfer: req.transfer,
        pull_transfer: None,
        push_transfer: None,
        helper_peak_rss_kib: None,
        push_rebuilt: None,
        seal: None,
        network_open: req.network_open,
        allowed_hosts: Vec::new(),
        allow_extra: req.allow_hosts.clone(),
        held_back: Vec::new(),
        refused: Vec::new(),
        services: proof::Record {
            no_proof: req.no_service_proof,
            accept_failed: req.accept_failed.clone(),
            rollback_on_failure: req.rollback_on_failure,
            ..Default::default()
        },
        rehearsed_plan: None,
    }
}

/// Start a run: refuse what cannot work before anything changes, then go.
pub async fn start(req: &Request, ui: &Ui) -> Result<Report> {
    check_request(req)?;
    let spec = HostSpec::parse(&req.host)?;
    let name = format!(
        "{}-{}",
        spec.host.replace(['/', ':'], "_"),
        crate::util::now()
            .replace(':', "")
            .chars()
            .take(17)
            .collect::<String>()
    );
    let dir = crate::paths::runs_dir()?.join(name);
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .with_context(|| format!("cannot create the run folder {}", dir.display()))?;
    }
    let j = new_journal(req);
    j.save(&dir)?;
    ui.say(format!(
        "run {} (resume with `drydock resume {}`)",
        dir.display(),
        dir.display()
    ));
    drive(&dir, j, ui, req.accept_new_host_key).await
}

pub async fn resume(dir: &Path, svc: &crate::cli::ServiceArgs, ui: &Ui) -> Result<Report> {
    let mut j = Journal::load(dir)?;
    match j.state {
        State::Done => {
            return Err(refused!(
                "the run {} is done; nothing to resume",
                dir.display()
            ));
        }
        State::Aborted => {
            return Err(refused!(
                "the run {} was aborted; start a new one",
                dir.display()
            ));
        }
        State::Running => {}
    }
    take_service_args(dir, &mut j, svc, ui)?;
    ui.say(format!(
        "resuming {} at: {}",
        dir.display(),
        j.next_step().map(Step::name).unwrap_or("the end")
    ));
    let accept_new = j.accept_new_host_key;
    drive(dir, j, ui, accept_new).await
}

/// `resume`'s service flags, added to the run's; and after a failed proof
/// that they do not accept, the proof again: on a rehearsal, from a new
/// live copy (the VPS was fixed meanwhile), else on the same copy.
fn take_service_args(
    dir: &Path,
    j: &mut Journal,
    svc: &crate::cli::ServiceArgs,
    ui: &Ui,
) -> Result<()> {
    let r = &mut j.services;
    r.no_proof |= svc.no_service_proof;
    r.rollback_on_failure |= svc.rollback_on_failure;
    for u in &svc.accept_failed {
        if !r.accept_failed.contains(u) {
            r.accept_failed.push(u.clone());
        }
    }
    let failed_proof = j.next_step() == Some(Step::Prove)
        && !j.services.no_proof
        && j.services
            .proof
            .as_ref()
            .is_some_and(|p| !p.failures(&j.services.accept_failed).is_empty());
    if failed_proof {
        j.services.proof = None;
        if j.never_frozen() && j.steps().contains(&Step::LivePull) {
            ui.say(
                "the service proof failed on the last rehearsal: the live copy is brought up to \
                 date and the rehearsal and the proof run again (the VPS keeps serving)",
            );
            j.done
                .retain(|r| !matches!(r.step, Step::LivePull | Step::Rehearse));
            j.live_since = None;
            j.delta_blocks = None;
            j.delta_bytes = None;
        }
    }
    j.save(dir)
}

async fn drive(dir: &Path, mut j: Journal, ui: &Ui, accept_new: bool) -> Result<Report> {
    while let Some(step) = j.next_step() {
        ui.step_started(step.key(), step.name());
        let t0 = Instant::now();
        let asked_before = ui.asked();
        let res = tokio::select! {
            biased;
            r = do_step(step, dir, &mut j, ui, accept_new) => r,
            // The context below names the run, resume and abort once.
            sig = ui.interrupted() => Err(Interrupted(Ui::interrupted_text(sig)).into()),
        };
        // A step's time is drydock's and the hosts': not a question's.
        let seconds = t0
            .elapsed()
            .saturating_sub(ui.asked().saturating_sub(asked_before))
            .as_secs_f64();
        ui.step_ended(step.key(), res.is_ok(), seconds);
        if step == Step::Probe
            && let Err(e) = res
        {
            // A refusal before anything changed leaves no run behind.
            let _ = std::fs::remove_dir_all(dir);
            return Err(e.context("nothing was changed on the VPS; no run was kept"));
        }
        // Whatever the step learnt before failing is kept.
        j.save(dir)?;
        // The proof's and the check's own errors say how to go on.
        let own_words = step == Step::Prove
            || res.as_ref().err().is_some_and(|e| {
                e.chain()
                    .any(|c| c.downcast_ref::<crate::errors::NotAsBefore>().is_some())
            });
        res.with_context(|| {
            let run = dir.display();
            if own_words {
                format!("run {run}")
            } else if j.never_frozen() {
                let what = if j.is_done(Step::Rehearse) || !j.steps().contains(&Step::Rehearse) {
                    format!("step '{}'", step.name())
                } else {
                    format!("the rehearsal's step '{}'", step.name())
                };
                format!(
                    "{what} failed (run {run}); nothing on the VPS changed: it was not frozen and \
                     kept serving. `drydock resume {run}` tries the step again, `drydock abort \
                     {run}` ends the run"
                )
            } else {
                format!(
                    "step '{}' of run {run} did not finish; `drydock resume {run}` retries it, \
                     `drydock abort {run}` gives the VPS back as it was",
                    step.name(),
                )
            }
        })?;
        j.done.push(StepRecord {
            step,
            seconds,
            finished_at: crate::util::now(),
        });
        j.save(dir)?;
    }
    j.state = State::Done;
    j.save(dir)?;
    Ok(report::report(dir, &j))
}

/// A rehearsal's last word: the blocks a push of the upgraded copy would
/// write, the upgraded image hashed against the pulled one's manifest.
pub(super) fn measure_delta(dir: &Path, j: &mut Journal, ui: &Ui) -> Result<()> {
    use crate::image::manifest::{Manifest, block_len, hash_image};
    let base = Manifest::load(&Manifest::path_for(&rundir::base(dir)))?;
    let upgraded = rundir::upgraded(dir);
    let bar = ui.bytes_bar(base.size, "delta");
    let new = hash_image(&upgraded, |n| bar.inc(n))?;
    bar.finish();
    let changed: Vec<u64> = (0..new.blocks.len().min(base.blocks.len()) as u64)
        .filter(|&b| base.blocks[b as usize] != new.blocks[b as usize])
        .collect();
    j.delta_blocks = Some(changed.len() as u64);
    j.delta_bytes = Some(changed.iter().map(|&b| block_len(new.size, b)).sum());
    j.save(dir)
}

/// `drydock runs`: every run and where it stands.
pub fn list() -> Result<Vec<(PathBuf, Journal)>> {
    let dir = crate::paths::runs_dir()?;
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(&dir) {
        for e in rd.flatten() {
            if let Ok(j) = Journal::load(&e.path()) {
                out.push((e.path(), j));
            }
        }
    }
    out.sort_by(|a, b| a.1.created_at.cmp(&b.1.created_at));
    Ok(out)
}
