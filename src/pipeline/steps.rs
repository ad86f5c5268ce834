//! The pipeline's steps on the VPS, each idempotent: the probe's checks,
//! then one step at a time as the journal says (`do_step`), and the
//! sysrq reboot of the VPS after the push.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

use super::journal::{Journal, Step};
use super::worker::upgrade_in_vm;
use super::{connect, connect_gathered, plan_of};
use crate::errors::refused;
use crate::image::manifest::Manifest;
use crate::recipes::{self, Plan};
use crate::remote::{self, device, freeze};
use crate::ssh::Session;
use crate::transfer::{self, pull, push};
use crate::ui::{Ui, human_bytes};
use crate::vm;
use crate::vm::guest;
use crate::vm::seal::Seal;
use crate::vm::shape::Shape;

/// What the probe step found.
pub(super) struct Probed {
    pub(super) facts: remote::Facts,
    pub(super) dev: device::Device,
    pub(super) plan: Plan,
    pub(super) shape: Shape,
    pub(super) seal: Seal,
    pub(super) allowed: Vec<String>,
}

/// The probe step's checks, all read-only: root, the disk, the plan for
/// this host's release, the recipe's preflight on the host, that the
/// worker VM can be built here (OVMF for a UEFI VPS), local space for the
/// images (in `dir`, the run folder or where it would go).
pub(super) async fn probe(s: &Session, j: &Journal, dir: &Path, dry: bool) -> Result<Probed> {
    let facts = remote::gather(s).await?;
    device::require_root(&facts, s)?;
    let dev = device::inspect(s, &facts, j.device.as_deref()).await?;
    let shape = Shape::of(&facts, &dev);
    vm::check_workstation(&shape)?;
    let plan = plan_of(j, &recipes::Host::from_facts(&facts))?;
    let allowed = if j.network_open {
        Vec::new()
    } else {
        crate::vm::proxy::allow_list(
            &facts.sources,
            facts.os.get("ID").map(String::as_str).unwrap_or(""),
            &j.allow_extra,
        )
    };
    if let Some(check) = &plan.preflight {
        let out = s.exec_input("sh -s", Some(check.as_bytes())).await?;
        if !out.success() {
            let said = out.stdout_str();
            return Err(refused!("{}", said.trim()));
        }
    }
    // The base image and, worst case, a full upgraded copy of it.
    transfer::check_local_space(&super::rundir::base(dir), dev.size.saturating_mul(2))?;
    let seal = match (&dev.kind, dry) {
        (device::Kind::Block { .. }, _) => Seal::from_facts(&facts, &j.host)?,
        (device::Kind::File { .. }, true) => Seal::default(),
        (device::Kind::File { .. }, false) => {
            return Err(refused!(
                "{} is a file on {}, not its disk: the worker VM holds back the services of the system it boots using that system's running kernel, and the system in a file is not the one running; drydock upgrades only a host's own disk",
                dev.path,
                j.host
            ));
        }
    };
    Ok(Probed {
        facts,
        dev,
        plan,
        shape,
        seal,
        allowed,
    })
}

pub(super) async fn do_step(
    step: Step,
    dir: &Path,
    j: &mut Journal,
    ui: &Ui,
    accept_new: bool,
) -> Result<()> {
    match step {
        Step::Probe => probe_step(dir, j, ui, accept_new).await,
        Step::LivePull => pull_step(dir, j, ui, true).await,
        Step::Rehearse => rehearse_step(dir, j, ui).await,
        Step::Prove => super::proof::prove_step(dir, j, ui).await,
        Step::Freeze => freeze_step(dir, j, ui).await,
        Step::Pull => pull_step(dir, j, ui, false).await,
        Step::Upgrade => upgrade_step(dir, j, ui).await,
        Step::Push => push_step(dir, j, ui).await,
        Step::Reboot => reboot_vps(j).await,
        Step::Check => check_step(dir, j, ui).await,
    }
}

/// The probe step: the checks (`probe`), the VPS's kernel and initrd for
/// the sealed first boot, and what the worker VM will be, recorded.
async fn probe_step(dir: &Path, j: &mut Journal, ui: &Ui, accept_new: bool) -> Result<()> {
    let s = connect(j, accept_new).await?;
    let Probed {
        facts,
        dev,
        plan,
        shape,
        seal,
        allowed,
    } = probe(&s, j, dir, false).await?;
    let boot =
        remote::bootfiles::fetch(&s, &facts.cmdline, &super::rundir::boot_files(dir)).await?;
    ui.say(format!(
        "worker VM sealed: boots {}'s kernel {} directly with only {} started; holds back {} unit(s): {}",
        s.host(),
        boot.release,
        seal.wants.join(" "),
        seal.held_back.len(),
        seal.held_back.join(" ")
    ));
    if j.network_open {
        ui.warn("--network open: the worker VM reaches the internet, as the VPS does");
    } else {
        ui.say(format!(
            "worker VM network sealed; allowed hosts: {}",
            allowed.join(" ")
        ));
    }
    j.seal = Some(seal);
    j.allowed_hosts = allowed;
    record_services(&s, &facts, j, ui).await?;
    ui.say(format!(
        "{}: {}, disk {} ({}); plan: {}",
        s.host(),
        facts.pretty_name(),
        dev.path,
        human_bytes(dev.size),
        plan.description
    ));
    ui.say(format!("worker VM: {}", shape.describe()));
    for n in &shape.notes {
        ui.say(format!("note: {n}"));
    }
    j.shape = Some(shape);
    j.os_before = Some(facts.pretty_name());
    j.device = Some(dev.path);
    s.close().await;
    Ok(())
}

/// The VPS's service set, and the memory and CPUs the proof's VM gets.
async fn record_services(
    s: &Session,
    facts: &remote::Facts,
    j: &mut Journal,
    ui: &Ui,
) -> Result<()> {
    let r = &mut j.services;
    r.vps_memory_mib = crate::services::vps_memory_mib(facts.mem_total_bytes);
    r.vps_cpus = (facts.cpus > 0).then_some(facts.cpus);
    r.vps_enabled = crate::vm::seal::enabled_units(&facts.units);
    r.set = crate::services::gather(s).await?;
    match &r.set {
        Some(set) => {
            ui.say(format!(
                "services of {} (proven on the upgraded copy before the freeze, checked after the \
                 reboot): {}",
                s.host(),
                set.describe()
            ));
            if !set.not_running.is_empty() {
                ui.warn(format!(
                    "not running on {} now, so not required afterwards: {}",
                    s.host(),
                    set.not_running.join(" ")
                ));
            }
        }
        None => ui.warn(format!(
            "{} did not list its units (neither systemd nor OpenRC answered): its services will \
             not be proven",
            s.host()
        )),
    }
    Ok(())
}

/// The freeze step, recorded before anything is stopped; a freeze that
/// refused (and undid itself) is unrecorded again.
async fn freeze_step(dir: &Path, j: &mut Journal, ui: &Ui) -> Result<()> {
    let (s, facts) = connect_gathered(j).await?;
    let dev = device::inspect(&s, &facts, j.device.as_deref()).await?;
    if dev.rw_mounts().is_empty() && j.frozen_boot_id.as_deref() == Some(facts.boot_id.as_str()) {
        ui.say("already frozen");
    } else {
        ui.confirm(&format!(
            "Freeze {}: stop its services and make {} read-only until the run ends?",
            s.host(),
            dev.path
        ))
        .await?;
        // Recorded before anything is stopped: a freeze that fails
        // half-way (services stopped, some mounts read-only) must
        // still be undone by `abort`, which keys on this boot id.
        j.frozen_at = Some(crate::util::now());
        j.frozen_boot_id = Some(facts.boot_id.clone());
        j.save(dir)?;
        let r = match freeze::freeze(&s, &facts, Some(&dev.path)).await {
            Ok(r) => r,
            Err(e) => {
                // Refused: the freeze undid itself and nothing is
                // left changed, so abort has nothing to give back.
                if crate::errors::exit_code(&e) == crate::errors::EXIT_REFUSED {
                    j.frozen_at = None;
                    j.frozen_boot_id = None;
                    j.save(dir)?;
                }
                return Err(e);
            }
        };
        ui.say(format!(
            "frozen: {} read-only, {} service(s) stopped",
            r.read_only.join(", "),
            r.stopped.len()
        ));
        j.frozen_boot_id = Some(r.boot_id);
    }
    s.close().await;
    Ok(())
}

/// The pull into the run's base image: LIVE, while the VPS serves (a
/// rehearsal's copy, crash-consistent as after a power cut); or of the
/// frozen disk, a pre-copy when a live copy is there (only the blocks that
/// changed since are sent).
async fn pull_step(dir: &Path, j: &mut Journal, ui: &Ui, live: bool) -> Result<()> {
    let (s, facts) = connect_gathered(j).await?;
    if live && j.live_since.is_none() {
        // The VPS's own clock, which dates the inodes it changes.
        let out = s.exec("date +%s").await?;
        j.live_since = out.stdout_str().trim().parse().ok();
        j.save(dir)?;
    }
    let base = super::rundir::base(dir);
    let opts = pull::PullOptions {
        output: base.clone(),
        device: j.device.clone(),
        live,
        transfer: j.transfer,
    };
    let mut r = None;
    // After the freeze, the live copy brought up to date; live, an earlier
    // live copy (a rehearsal run again after a failed proof) likewise.
    if (live || j.is_done(Step::LivePull)) && pull::precopy::can_start_from(&base) {
        r = match pull::precopy::precopy(&s, &facts, &opts, ui).await? {
            Ok(r) => Some(r),
            Err(why) => {
                ui.say(format!("no pre-copy: {why}; pulling the whole disk again"));
                None
            }
        };
    }
    let r = match r {
        Some(r) => r,
        None => {
            if live || j.is_done(Step::LivePull) {
                // The earlier copy, replaced whole.
                for p in [Manifest::path_for(&base), pull::precopy::state_path(&base)] {
                    let _ = std::fs::remove_file(p);
                }
                if !pull::state_path(&base).exists() {
                    let _ = std::fs::remove_file(&base);
                }
            }
            pull::pull(&s, &facts, &opts, ui).await?
        }
    };
    j.bytes_pulled += r.bytes_on_wire;
    if live {
        j.bytes_pulled_live += r.bytes_on_wire;
    }
    j.pull_transfer = Some(r.transfer);
    j.helper_peak_rss_kib = j.helper_peak_rss_kib.max(r.helper_peak_rss_kib);
    s.close().await;
    Ok(())
}

/// The rehearsal: the whole upgrade in the worker VM on the live copy,
/// then what a push of its result would write. The proof step proves its
/// result and keeps it for the carry; the real upgrade starts again from
/// the frozen copy.
async fn rehearse_step(dir: &Path, j: &mut Journal, ui: &Ui) -> Result<()> {
    let plan = upgrade_in_vm(dir, j, ui).await?;
    j.rehearsal_downloads = j.downloads.take();
    j.rehearsed_plan = Some(plan);
    super::measure_delta(dir, j, ui)
}

/// The real upgrade: the rehearsal's result carried over to the frozen
/// copy where it can be (`carry`), else the upgrade run on the frozen
/// copy in the worker VM.
async fn upgrade_step(dir: &Path, j: &mut Journal, ui: &Ui) -> Result<()> {
    if j.carry.is_some() {
        let why = match super::carry::carry(dir, j, ui).await {
            Ok(None) => {
                super::carry::discard(dir);
                j.carry = None;
                return j.save(dir);
            }
            Ok(Some(why)) => why,
            Err(e) => {
                let why = format!("{e:#}");
                let o = j.carried.get_or_insert_with(Default::default);
                o.why_not = Some(why.clone());
                why
            }
        };
        ui.say(format!(
            "the rehearsal cannot be carried over: {why}. The upgrade runs again on the frozen copy{}",
            if j.services.proof.is_some() {
                " (the service proof ran on the rehearsal's result, not on this one: the VPS's \
                 services are checked after the push)"
            } else {
                ""
            }
        ));
        super::carry::discard(dir);
        j.carry = None;
        j.save(dir)?;
    }
    upgrade_in_vm(dir, j, ui).await.map(|_| ())
}

/// The push of the upgraded image, refused if the VPS rebooted since the
/// freeze (its disk may have changed).
async fn push_step(dir: &Path, j: &mut Journal, ui: &Ui) -> Result<()> {
    let (s, facts) = connect_gathered(j).await?;
    if j.frozen_boot_id.as_deref() != Some(facts.boot_id.as_str()) {
        return Err(refused!(
            "{} rebooted since it was frozen, so its disk may have changed; drydock will not push. \
             `drydock abort {}` ends this run",
            s.host(),
            dir.display()
        ));
    }
    let upgraded = super::rundir::upgraded(dir);
    let m = Manifest::path_for(&upgraded);
    if !m.exists() {
        std::fs::copy(Manifest::path_for(&super::rundir::base(dir)), &m)?;
    }
    j.push_started = true;
    j.save(dir)?;
    let r = push::push(
        &s,
        &facts,
        &push::PushOptions {
            image: upgraded,
            device: j.device.clone(),
            full: false,
            frozen_boot_id: j.frozen_boot_id.clone(),
            transfer: j.transfer,
            base_image: Some(super::rundir::base(dir)),
            packages: Some(super::rundir::downloads(dir)),
        },
        ui,
    )
    .await?;
    j.bytes_pushed += r.bytes_on_wire;
    j.pushed_blocks = Some(r.blocks_written);
    j.push_transfer = Some(r.transfer);
    j.helper_peak_rss_kib = j.helper_peak_rss_kib.max(r.helper_peak_rss_kib);
    j.push_rebuilt = r.rebuilt.clone();
    s.close().await;
    Ok(())
}

/// The VPS is back, on the release asked for, and runs what it ran
/// before; a failure names the way back (`abort`), or takes it with
/// `--rollback-on-failure`.
async fn check_step(dir: &Path, j: &mut Journal, ui: &Ui) -> Result<()> {
    let s = connect(j, false).await?;
    let (id, ver, pretty) = guest::os_release(&s).await?;
    let pretty = crate::services::printable(&pretty);
    if let Some(to) = &j.to {
        let (want_id, want_ver) = recipes::parse_release(to)?;
        if want_id != id || crate::releases::release_of(&id, &ver) != want_ver {
            s.close().await;
            let why = format!(
                "{} came back running {pretty} ({}), not {to}",
                j.host,
                crate::services::printable(&format!("{id} {ver}"))
            );
            return back_failed(dir, j, ui, why).await;
        }
    }
    ui.say(format!("{} is back, running {pretty}", s.host()));
    j.os_after = Some(pretty);
    j.back_at = Some(crate::util::now());
    if let Some(set) = j.services.set.clone().filter(|s| !s.is_empty()) {
        ui.say(format!(
            "checking that {} runs what it ran before: {} unit(s)",
            s.host(),
            set.units.len()
        ));
        let opts = crate::services::check::Options {
            not_at_boot: j.services.not_at_boot(),
            ..Default::default()
        };
        let checked = crate::services::check::check(&s, &set, &opts).await;
        s.close().await;
        let outcome = checked?;
        let failures = outcome.failures(&j.services.accept_failed);
        let text = outcome.failure_text(&j.services.accept_failed);
        ui.say(format!("services on {}: {}", j.host, outcome.summary()));
        j.services.after = Some(outcome);
        j.save(dir)?;
        if !failures.is_empty() {
            let why = format!(
                "{} unit(s) that {} ran before do not run after the upgrade:\n{}",
                failures.len(),
                j.host,
                text.trim_end()
            );
            return back_failed(dir, j, ui, why).await;
        }
    } else {
        s.close().await;
    }
    Ok(())
}

/// The VPS came back, but not as it must (WHY): the way back named, or
/// taken with `--rollback-on-failure`.
async fn back_failed(dir: &Path, j: &mut Journal, ui: &Ui, why: String) -> Result<()> {
    let run = dir.display();
    if !j.services.rollback_on_failure {
        return Err(crate::errors::NotAsBefore(format!(
            "{why}\n`drydock abort {run}` gives {} its old disk back: it freezes it, keeps its \
             disk as it is now in {}, pushes the base image back and reboots it (what it wrote \
             since its reboot is then only in that image); `drydock resume {run}` checks again",
            j.host,
            super::rundir::upgraded(dir).display()
        ))
        .into());
    }
    ui.warn(format!(
        "{why}\n--rollback-on-failure: giving {} its old disk back",
        j.host
    ));
    match super::abort::rollback_after_reboot(dir, j, ui).await {
        Ok(said) => {
            j.state = super::journal::State::Aborted;
            j.save(dir)?;
            Err(crate::errors::NotAsBefore(format!(
                "{why}\nrolled back (--rollback-on-failure): {said}"
            ))
            .into())
        }
        Err(e) => Err(e.context(format!(
            "{why}\n--rollback-on-failure: the rollback did not finish; `drydock abort {run}` \
             tries it again"
        ))),
    }
}

/// Reboot the VPS with sysrq (never a clean shutdown, which could write
/// stale metadata over the new image) and wait for it to come back.
pub(super) async fn reboot_vps(j: &mut Journal) -> Result<()> {
    let s = connect(j, false).await?;
    let before = guest::boot_id(&s).await?;
    if j.frozen_boot_id.as_deref() == Some(before.as_str()) {
        let _ = tokio::time::timeout(
            Duration::from_secs(15),
            s.exec("echo 1 > /proc/sys/kernel/sysrq; (sleep 1; echo b > /proc/sysrq-trigger) >/dev/null 2>&1 &"),
        )
        .await;
    }
    s.close().await;
    let until = Instant::now() + Duration::from_secs(900);
    loop {
        tokio::time::sleep(Duration::from_secs(5)).await;
        if let Ok(s) = connect(j, false).await
            && let Ok(id) = guest::boot_id(&s).await
        {
            s.close().await;
            if j.frozen_boot_id.as_deref() != Some(id.as_str()) {
                return Ok(());
            }
        }
        if Instant::now() > until {
            bail!(
                "{} did not come back within 15 minutes of its reboot; look at its console",
                j.host
            );
        }
    }
}
