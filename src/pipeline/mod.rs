//! `drydock upgrade`: probe → freeze → pull → upgrade in a local VM (boot,
//! run, reboot, verify, power off) → push → reboot the VPS → check. Each
//! step is idempotent and recorded in the run's journal when it completes;
//! `resume` continues from the first step not recorded, `abort` gives the
//! VPS back.

pub mod guest;
pub mod journal;

use crate::transfer::helper::Mode;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;

use crate::errors::Interrupted;
use crate::image::manifest::{Manifest, hash_image};
use crate::recipes::{self, Plan};
use crate::refused;
use crate::remote::{self, device, freeze};
use crate::ssh::{HostSpec, Session};
use crate::transfer::{self, pull, push};
use crate::ui::{Ui, human_bytes};
use crate::vm::seal::Seal;
use crate::vm::shape::Shape;
use crate::vm::{self, Accel, Vm, VmSpec, cmdline};
use journal::{Journal, State, Step, StepRecord};

#[derive(Debug, Clone)]
pub struct Request {
    pub host: String,
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
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub run: PathBuf,
    pub host: String,
    pub os_before: Option<String>,
    pub os_after: Option<String>,
    pub downtime_seconds: Option<f64>,
    pub steps: Vec<(String, f64)>,
    pub bytes_pulled: u64,
    pub bytes_pushed: u64,
    /// How the pull and the push moved the disk (helper or dd).
    pub pull_transfer: Option<Mode>,
    pub push_transfer: Option<Mode>,
    /// The helper's own peak resident memory on the VPS, the larger of the
    /// pull's and the push's.
    pub helper_peak_rss_kib: Option<u64>,
    /// "sealed" or "open" (`--network open`).
    pub network: String,
    /// The hosts the worker VM's network allowed.
    pub allowed_hosts: Vec<String>,
    /// Units of the VPS held back in the worker VM.
    pub held_back: Vec<String>,
    /// What the worker VM tried to reach and was refused (also in run.log).
    pub refused_connections: Vec<String>,
}

fn plan_of(j: &Journal, host: &recipes::Host) -> Result<Plan> {
    match (&j.to, &j.run) {
        (_, Some(cmd)) => Ok(recipes::run_plan(cmd)),
        (Some(to), None) => recipes::plan(host, to, &recipes::Options { gc: j.gc }),
        (None, None) => bail!("nothing to do: name a release with --to, or a command with --run"),
    }
}

/// What the probe step found.
struct Probed {
    facts: remote::Facts,
    dev: device::Device,
    plan: Plan,
    shape: Shape,
    seal: Seal,
    allowed: Vec<String>,
}

/// The probe step's checks, all read-only: root, the disk, the plan for
/// this host's release, the recipe's preflight on the host, that the
/// worker VM can be built here (OVMF for a UEFI VPS), local space for the
/// images (in `dir`, the run folder or where it would go).
async fn probe(s: &Session, j: &Journal, dir: &Path, dry: bool) -> Result<Probed> {
    let facts = remote::gather(s).await?;
    device::require_root(&facts, s)?;
    let dev = device::inspect(s, &facts, j.device.as_deref()).await?;
    let shape = shape_of(&facts, &dev);
    vm::check_firmware(&shape)?;
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
    transfer::check_local_space(&dir.join("base.raw"), dev.size.saturating_mul(2))?;
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

/// The worker VM's shape for the VPS's disk.
fn shape_of(facts: &remote::Facts, dev: &device::Device) -> Shape {
    match &dev.kind {
        device::Kind::Block { name } => Shape::from_facts(facts, name),
        device::Kind::File { .. } => {
            let mut s = Shape::from_facts(facts, "vda");
            s.notes.insert(
                0,
                format!(
                    "{} is a file on the host, not its disk: the worker VM puts it on virtio-blk (vda)",
                    dev.path
                ),
            );
            s
        }
    }
}

/// What `upgrade --dry-run` found and would do.
#[derive(Debug, Serialize)]
pub struct DryRun {
    pub host: String,
    pub os: String,
    pub device: String,
    pub size: u64,
    /// A block device: the freeze stops services (a regular file standing
    /// for a disk is frozen without stopping any).
    pub block_device: bool,
    pub plan: String,
    pub transfer: Mode,
    pub memory_mib: u64,
    pub cpus: u32,
    /// Run in the worker VM, in order.
    pub commands: Vec<String>,
    /// Run in the worker VM after its reboot into the result.
    pub after_reboot: Vec<String>,
    /// The release the worker VM and then the VPS must report afterwards.
    pub expect: Option<String>,
    /// How the worker VM is built to match the VPS, and what it cannot match.
    pub worker_vm: Shape,
    /// What the worker VM keeps running and holds back.
    pub seal: Seal,
    /// "sealed" or "open".
    pub network: String,
    pub allowed_hosts: Vec<String>,
}

impl DryRun {
    pub fn human(&self) -> String {
        use std::fmt::Write;
        let (host, dev) = (&self.host, &self.device);
        let mode = match self.transfer {
            Mode::Helper => "helper",
            _ => "dd",
        };
        let expect = self
            .expect
            .as_deref()
            .map(|e| format!(" and check it reports {e}"))
            .unwrap_or_default();
        let services = if self.block_device {
            "stop its services, "
        } else {
            ""
        };
        let mut s = String::new();
        // Writing to a String cannot fail.
        let _ = writeln!(
            s,
            "dry run: nothing was changed on {host}, and no run was kept"
        );
        let _ = writeln!(
            s,
            "{host}: {}, disk {dev} ({})",
            self.os,
            human_bytes(self.size)
        );
        let _ = writeln!(s, "plan: {}\nsteps:", self.plan);
        let _ = writeln!(
            s,
            "  1. freeze {host}: {services}make {dev} read-only, turn swap off"
        );
        let _ = writeln!(s, "  2. pull {dev} ({mode} mode) into the run folder");
        let _ = writeln!(
            s,
            "  3. boot it in a local worker VM on an overlay ({} MiB, {} CPUs; {}) and run, in order:",
            self.memory_mib,
            self.cpus,
            self.worker_vm.describe()
        );
        for c in &self.commands {
            let _ = writeln!(s, "       $ {c}");
        }
        if !self.block_device {
            let _ = writeln!(
                s,
                "     not sealed: {} is a file standing for a disk, and `drydock upgrade` refuses it (the worker VM holds back the services of the running system only)",
                self.device
            );
        } else {
            let _ = writeln!(
                s,
                "     sealed: the VPS's kernel booted directly with only {} started; held back: {}",
                self.seal.wants.join(" "),
                if self.seal.held_back.is_empty() {
                    "nothing".to_string()
                } else {
                    self.seal.held_back.join(" ")
                }
            );
        }
        if self.network == "open" {
            let _ = writeln!(
                s,
                "     network: open (--network open): the worker VM reaches the internet"
            );
        } else {
            let _ = writeln!(
                s,
                "     network: sealed; allowed hosts: {}",
                self.allowed_hosts.join(" ")
            );
        }
        if self.after_reboot.is_empty() {
            let _ = writeln!(s, "  4. reboot the worker VM{expect}, power it off");
        } else {
            let _ = writeln!(s, "  4. reboot the worker VM{expect}, run:");
            for c in &self.after_reboot {
                let _ = writeln!(s, "       $ {c}");
            }
            let _ = writeln!(s, "     and power it off");
        }
        let _ = writeln!(
            s,
            "  5. push the changed blocks to {dev} ({mode} mode), each read back and checked"
        );
        let _ = writeln!(s, "  6. reboot {host}{expect}");
        for n in &self.worker_vm.notes {
            let _ = writeln!(s, "note: {n}");
        }
        s
    }
}

/// What both `upgrade` and `upgrade --dry-run` refuse before connecting.
fn check_request(req: &Request) -> Result<()> {
    if req.to.is_none() && req.run.is_none() {
        return Err(refused!(
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
        expect: match (plan.expect_id, plan.expect_version) {
            (Some(id), Some(v)) => Some(format!("{id} {v}")),
            _ => None,
        },
    })
}

async fn connect(j: &Journal, accept_new: bool) -> Result<Session> {
    crate::ssh::connect_to(&j.host, j.identity.clone(), accept_new).await
}

/// A new run's journal: nothing done yet.
fn new_journal(req: &Request) -> Journal {
    Journal {
        format: journal::FORMAT.into(),
        host: req.host.clone(),
        identity: req.identity.clone(),
        device: req.device.clone(),
        to: req.to.clone(),
        run: req.run.clone(),
        memory_mib: req.memory_mib,
        cpus: req.cpus,
        created_at: transfer::now(),
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
        seal: None,
        network_open: req.network_open,
        allowed_hosts: Vec::new(),
        allow_extra: req.allow_hosts.clone(),
        held_back: Vec::new(),
        refused: Vec::new(),
    }
}

/// Start a run: refuse what cannot work before anything changes, then go.
pub async fn start(req: &Request, ui: &Ui) -> Result<Report> {
    check_request(req)?;
    let spec = HostSpec::parse(&req.host)?;
    let name = format!(
        "{}-{}",
        spec.host.replace(['/', ':'], "_"),
        transfer::now()
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

pub async fn resume(dir: &Path, ui: &Ui) -> Result<Report> {
    let j = Journal::load(dir)?;
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
    ui.say(format!(
        "resuming {} at: {}",
        dir.display(),
        j.next_step().map(Step::name).unwrap_or("the end")
    ));
    drive(dir, j, ui, false).await
}

async fn drive(dir: &Path, mut j: Journal, ui: &Ui, accept_new: bool) -> Result<Report> {
    while let Some(step) = j.next_step() {
        ui.say(format!("== {}", step.name()));
        let t0 = Instant::now();
        let res = tokio::select! {
            r = do_step(step, dir, &mut j, ui, accept_new) => r,
            _ = tokio::signal::ctrl_c() => Err(Interrupted(format!(
                "interrupted during {}; the VPS is left as the journal says: run `drydock resume {}` to go on, or `drydock abort {}` to give it back",
                step.name(), dir.display(), dir.display()
            )).into()),
        };
        if step == Step::Probe
            && let Err(e) = res
        {
            // A refusal before anything changed leaves no run behind.
            let _ = std::fs::remove_dir_all(dir);
            return Err(e.context("nothing was changed on the VPS; no run was kept"));
        }
        // Whatever the step learnt before failing is kept.
        j.save(dir)?;
        res.with_context(|| {
            format!(
                "step '{}' of run {} did not finish; `drydock resume {}` retries it, \
                 `drydock abort {}` gives the VPS back as it was",
                step.name(),
                dir.display(),
                dir.display(),
                dir.display()
            )
        })?;
        j.done.push(StepRecord {
            step,
            seconds: t0.elapsed().as_secs_f64(),
            finished_at: transfer::now(),
        });
        j.save(dir)?;
    }
    j.state = State::Done;
    j.save(dir)?;
    Ok(report(dir, &j))
}

fn report(dir: &Path, j: &Journal) -> Report {
    let downtime = match (&j.frozen_at, &j.back_at) {
        (Some(a), Some(b)) => {
            let p = |s: &str| {
                time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()
            };
            match (p(a), p(b)) {
                (Some(a), Some(b)) => Some((b - a).as_seconds_f64()),
                _ => None,
            }
        }
        _ => None,
    };
    Report {
        run: dir.to_path_buf(),
        host: j.host.clone(),
        os_before: j.os_before.clone(),
        os_after: j.os_after.clone(),
        downtime_seconds: downtime,
        steps: j
            .done
            .iter()
            .map(|r| (r.step.name().to_string(), r.seconds))
            .collect(),
        bytes_pulled: j.bytes_pulled,
        bytes_pushed: j.bytes_pushed,
        pull_transfer: j.pull_transfer,
        push_transfer: j.push_transfer,
        helper_peak_rss_kib: j.helper_peak_rss_kib,
        network: if j.network_open { "open" } else { "sealed" }.into(),
        allowed_hosts: j.allowed_hosts.clone(),
        held_back: j.held_back.clone(),
        refused_connections: j.refused.clone(),
    }
}

impl Report {
    pub fn human(&self) -> String {
        let mut s = format!(
            "{}: {} -> {}\n",
            self.host,
            self.os_before.as_deref().unwrap_or("?"),
            self.os_after.as_deref().unwrap_or("?")
        );
        if let Some(d) = self.downtime_seconds {
            s.push_str(&format!("downtime (freeze to back up): {d:.0} s\n"));
        }
        for (name, secs) in &self.steps {
            s.push_str(&format!("  {secs:>7.1} s  {name}\n"));
        }
        let how = |m: Option<Mode>| match m {
            Some(Mode::Helper) => " (helper)",
            Some(_) => " (dd)",
            None => "",
        };
        s.push_str(&format!(
            "pulled {}{}, pushed {}{}{}; run folder {}\n",
            human_bytes(self.bytes_pulled),
            how(self.pull_transfer),
            human_bytes(self.bytes_pushed),
            how(self.push_transfer),
            self.helper_peak_rss_kib
                .map(|k| format!("; helper peak memory {}", human_bytes(k * 1024)))
                .unwrap_or_default(),
            self.run.display()
        ));
        s.push_str(&format!(
            "held back in the worker VM ({}): {}\n",
            self.held_back.len(),
            if self.held_back.is_empty() {
                "nothing".to_string()
            } else {
                self.held_back.join(" ")
            }
        ));
        if self.network == "open" {
            s.push_str("worker VM network: open (--network open)\n");
        } else {
            s.push_str(&format!(
                "worker VM network: sealed; allowed: {}; refused: {}{}\n",
                self.allowed_hosts.join(" "),
                self.refused_connections.len(),
                if self.refused_connections.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", self.refused_connections.join("; "))
                }
            ));
        }
        s
    }
}

async fn do_step(step: Step, dir: &Path, j: &mut Journal, ui: &Ui, accept_new: bool) -> Result<()> {
    match step {
        Step::Probe => {
            let s = connect(j, accept_new).await?;
            let Probed {
                facts,
                dev,
                plan,
                shape,
                seal,
                allowed,
            } = probe(&s, j, dir, false).await?;
            let boot = remote::bootfiles::fetch(&s, &facts.cmdline, &dir.join("boot")).await?;
            ui.say(format!(
                "worker VM sealed: boots {}'s kernel {} directly with only {} started; holds back {} unit(s): {}",
                s.host(),
                boot.release,
                seal.wants.join(" "),
                seal.held_back.len(),
                seal.held_back.join(" ")
            ));
            if j.network_open {
                ui.say(
                    "warning: --network open: the worker VM reaches the internet, as the VPS does",
                );
            } else {
                ui.say(format!(
                    "worker VM network sealed; allowed hosts: {}",
                    allowed.join(" ")
                ));
            }
            j.seal = Some(seal);
            j.allowed_hosts = allowed;
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
        }
        Step::Freeze => {
            let s = connect(j, false).await?;
            let facts = remote::gather(&s).await?;
            let dev = device::inspect(&s, &facts, j.device.as_deref()).await?;
            if dev.rw_mounts().is_empty()
                && j.frozen_boot_id.as_deref() == Some(facts.boot_id.as_str())
            {
                ui.say("already frozen");
            } else {
                ui.confirm(&format!(
                    "Freeze {}: stop its services and make {} read-only until the run ends?",
                    s.host(),
                    dev.path
                ))?;
                // Recorded before anything is stopped: a freeze that fails
                // half-way (services stopped, some mounts read-only) must
                // still be undone by `abort`, which keys on this boot id.
                j.frozen_at = Some(transfer::now());
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
        }
        Step::Pull => {
            let s = connect(j, false).await?;
            let facts = remote::gather(&s).await?;
            let r = pull::pull(
                &s,
                &facts,
                &pull::PullOptions {
                    output: dir.join("base.raw"),
                    device: j.device.clone(),
                    live: false,
                    transfer: j.transfer,
                },
                ui,
            )
            .await?;
            j.bytes_pulled += r.bytes_received;
            j.pull_transfer = Some(r.transfer);
            j.helper_peak_rss_kib = j.helper_peak_rss_kib.max(r.helper_peak_rss_kib);
            s.close().await;
        }
        Step::Upgrade => upgrade_in_vm(dir, j, ui).await?,
        Step::Push => {
            let s = connect(j, false).await?;
            let facts = remote::gather(&s).await?;
            if j.frozen_boot_id.as_deref() != Some(facts.boot_id.as_str()) {
                return Err(refused!(
                    "{} rebooted since it was frozen, so its disk may have changed; drydock will not push. \
                     `drydock abort {}` ends this run",
                    s.host(),
                    dir.display()
                ));
            }
            let upgraded = dir.join("upgraded.raw");
            let m = Manifest::path_for(&upgraded);
            if !m.exists() {
                std::fs::copy(Manifest::path_for(&dir.join("base.raw")), &m)?;
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
                    base_image: Some(dir.join("base.raw")),
                },
                ui,
            )
            .await?;
            j.bytes_pushed += r.bytes_on_wire;
            j.push_transfer = Some(r.transfer);
            j.helper_peak_rss_kib = j.helper_peak_rss_kib.max(r.helper_peak_rss_kib);
            s.close().await;
        }
        Step::Reboot => reboot_vps(j).await?,
        Step::Check => {
            let s = connect(j, false).await?;
            let (id, ver, pretty) = guest::os_release(&s).await?;
            if let Some(to) = &j.to {
                let (want_id, want_ver) = recipes::parse_release(to)?;
                if want_id != id || want_ver != ver {
                    bail!(
                        "{} came back running {pretty} ({id} {ver}), not {to}",
                        s.host()
                    );
                }
            }
            ui.say(format!("{} is back, running {pretty}", s.host()));
            j.os_after = Some(pretty);
            j.back_at = Some(transfer::now());
            s.close().await;
        }
    }
    Ok(())
}

/// Reboot the VPS with sysrq (never a clean shutdown, which could write
/// stale metadata over the new image) and wait for it to come back.
async fn reboot_vps(j: &mut Journal) -> Result<()> {
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

/// Start the worker VM and log in to it: QEMU up, its sshd answering
/// within 15 minutes, drydock's session within 2 more. An error starts
/// with `failed` and ends with the boot parity report.
async fn start_worker(
    dir: &Path,
    identity: Option<&Path>,
    spec: VmSpec,
    failed: &str,
    parity: &str,
) -> Result<(Vm, crate::ssh::Session)> {
    let port = spec.ssh_port;
    let mut vm = Vm::start(spec, dir.join("qemu.stderr")).await?;
    vm.wait_for_ssh(Duration::from_secs(900))
        .await
        .map_err(|e| anyhow::anyhow!("{failed}{e:#}\n{parity}"))?;
    let (t, o) = guest::guest_target(
        port,
        identity,
        dir.join("guest_known_hosts"),
        "the worker VM",
    );
    let s = guest::connect_retry(&t, &o, Duration::from_secs(120)).await?;
    Ok((vm, s))
}

/// The worker VM: a fresh overlay on the base image, the plan run inside
/// a sealed first boot (the VPS's kernel booted directly, its services held
/// back, the network open only to the package sources), then a reboot
/// through the VPS's own boot loader, sealed by files written for it and
/// removed afterwards, that must come back on the expected release; the
/// result as a sparse raw image for the push. See `vm::seal` for why.
async fn upgrade_in_vm(dir: &Path, j: &mut Journal, ui: &Ui) -> Result<()> {
    let Some(seal) = j.seal.clone() else {
        bail!(
            "this run was started by a drydock that did not seal its worker VM; `drydock abort {}` ends it, then start a new one",
            dir.display()
        );
    };
    let base = dir.join("base.raw");
    let overlay = dir.join("overlay.qcow2");
    // Idempotent: a resumed upgrade starts again from the untouched base.
    let _ = std::fs::remove_file(&overlay);
    let _ = std::fs::remove_file(dir.join("upgraded.raw"));
    let _ = std::fs::remove_file(dir.join("efivars.fd"));
    vm::image::create_overlay(&base, &overlay).await?;
    let boot = remote::bootfiles::BootFiles::load(&dir.join("boot"))?;
    // Runs from before boot parity have no shape: QEMU's defaults, as then.
    let shape = j.shape.clone().unwrap_or_default();
    let efi = vm::efi_for(&shape, dir)?;
    let parity = format!(
        "the worker VM was built as probed on the VPS: {}{}",
        shape.describe(),
        shape
            .notes
            .iter()
            .map(|n| format!("\n  note: {n}"))
            .collect::<String>()
    );
    let accel = cmdline::detect_accel();
    if accel == Accel::Tcg {
        ui.say("warning: no usable KVM: the worker VM runs under software emulation (TCG), several times slower");
    }
    let log = dir.join("run.log");
    let proxy_ip = cmdline::proxy_addr(&shape);
    let proxy = if j.network_open {
        None
    } else {
        Some(vm::proxy::Proxy::start(
            &dir.join("proxy.sock"),
            &j.allowed_hosts,
            &log,
        )?)
    };
    let exe = std::env::current_exe()
        .context("cannot find drydock's own executable for the proxy relay")?;
    let net_seal = |pcap: &str, with_proxy: bool| -> Option<cmdline::NetSeal> {
        proxy.as_ref().map(|p| cmdline::NetSeal {
            proxy: with_proxy.then(|| {
                (
                    proxy_ip,
                    format!(
                        "{} __relay {}",
                        crate::ssh::shell_quote(&exe.to_string_lossy()),
                        crate::ssh::shell_quote(&p.socket.to_string_lossy())
                    ),
                )
            }),
            pcap: dir.join(pcap),
        })
    };
    let spec_for =
        |direct: Option<cmdline::DirectBoot>, sealed: Option<cmdline::NetSeal>| -> Result<VmSpec> {
            Ok(VmSpec {
                disk: overlay.clone(),
                disk_format: "qcow2".into(),
                memory_mib: j.memory_mib,
                cpus: j.cpus,
                accel,
                ssh_port: std::net::TcpListener::bind("127.0.0.1:0")?
                    .local_addr()?
                    .port(),
                qmp_socket: dir.join("qmp.sock"),
                serial_log: dir.join("serial.log"),
                shape: shape.clone(),
                efi: efi.clone(),
                direct,
                sealed,
            })
        };
    let allowed_pkt = (proxy_ip, vm::proxy::GUEST_PORT);
    let mut refused: Vec<String> = Vec::new();
    let note_refused = |pcap: &Path, refused: &mut Vec<String>| -> Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        for r in vm::pcap::take(pcap, allowed_pkt) {
            use std::io::Write;
            writeln!(f, "network: refused {} ({} packet(s))", r.what, r.packets)?;
            refused.push(r.what);
        }
        Ok(())
    };

    // 1. The sealed first boot, and the upgrade.
    let direct = cmdline::DirectBoot {
        kernel: boot.kernel.clone(),
        initrd: boot.initrd.clone(),
        append: seal.kernel_cmdline(&boot.cmdline)?,
    };
    let spec = spec_for(Some(direct), net_seal("net1.pcap", true))?;
    let (vm, s) = start_worker(dir, j.identity.as_deref(), spec, "", &parity).await?;
    let said = seal_step(
        &s,
        "holding the VPS's units back in the worker VM",
        &seal.runtime_script(),
    )
    .await?;
    let installed_policy = said.lines().any(|l| l == "policy-rc.d installed");
    for l in said.lines().filter_map(|l| l.strip_prefix("running ")) {
        ui.say(format!(
            "warning: {l} had started in the worker VM although held back; stopped"
        ));
    }
    // The same facts as the probe's, read from the same disk in the VM.
    let guest_facts = remote::gather(&s).await?;
    let pretty = guest_facts.pretty_name();
    let plan = plan_of(j, &recipes::Host::from_facts(&guest_facts))?;
    ui.say(format!(
        "worker VM up ({pretty}), sealed; {}; output in {}",
        plan.description,
        log.display()
    ));
    let env = if proxy.is_some() {
        let u = format!("http://{proxy_ip}:{}/", vm::proxy::GUEST_PORT);
        format!(
            "export http_proxy={u} https_proxy={u} HTTP_PROXY={u} HTTPS_PROXY={u} no_proxy=localhost,127.0.0.1; "
        )
    } else {
        String::new()
    };
    for cmd in &plan.commands {
        guest::run_logged_as(&s, &format!("{env}{cmd}"), cmd, &log).await?;
    }
    let enabled = seal_step(
        &s,
        "listing the upgraded disk's enabled units",
        seal.enabled_script(),
    )
    .await?;
    let lines: Vec<String> = enabled.lines().map(str::to_string).collect();
    if lines.last().map(String::as_str) != Some("end") {
        bail!("the worker VM's list of enabled units was cut short; nothing was pushed");
    }
    let mut held = seal.held_in(&lines);
    // What the VPS had enabled stays held back even if the upgrade moved it.
    for u in &seal.held_back {
        if !held.contains(u) {
            held.push(u.clone());
        }
    }
    held.sort();
    let said = seal_step(
        &s,
        "writing the verify reboot's seal",
        &seal.disk_seal_script(&held, installed_policy),
    )
    .await?;
    let made_dir = said.lines().any(|l| l.starts_with("made "));
    ui.say("powering the worker VM off, to boot it again through the VPS's own boot loader");
    power_off(s, vm).await?;
    note_refused(&dir.join("net1.pcap"), &mut refused)?;

    // 2. The verify boot: firmware, the VPS's boot loader, the new kernel.
    let spec = spec_for(None, net_seal("net2.pcap", false))?;
    let (vm, s) = start_worker(
        dir,
        j.identity.as_deref(),
        spec,
        "the upgraded disk did not come back through its own boot loader: ",
        &parity,
    )
    .await?;
    let (id2, ver2, pretty2) = guest::os_release(&s).await?;
    if let (Some(want_id), Some(want_ver)) = (&plan.expect_id, &plan.expect_version)
        && (want_id != &id2 || want_ver != &ver2)
    {
        bail!(
            "the worker VM came back running {pretty2} ({id2} {ver2}), not {want_id} {want_ver}; nothing was pushed"
        );
    }
    let running = s.exec(&seal.running_script(&held)).await?.stdout_str();
    if !running.trim().is_empty() {
        bail!(
            "held-back units ran in the worker VM's verify boot: {}; nothing was pushed",
            running.split_whitespace().collect::<Vec<_>>().join(" ")
        );
    }
    for cmd in &plan.after_reboot {
        guest::run_logged(&s, cmd, &log).await?;
    }
    seal_step(
        &s,
        "removing the verify reboot's seal",
        &seal.disk_unseal_script(&held, made_dir),
    )
    .await?;
    ui.say(format!(
        "the worker VM came back through its own boot loader running {pretty2}, {} unit(s) held back; powering it off",
        held.len()
    ));
    power_off(s, vm).await?;
    note_refused(&dir.join("net2.pcap"), &mut refused)?;
    if let Some(p) = &proxy {
        refused.extend(p.refused());
    }
    drop(proxy);
    j.held_back = held;
    j.refused = refused;
    if !j.refused.is_empty() {
        ui.say(format!(
            "the sealed worker VM was refused {} destination(s), listed in {}",
            j.refused.len(),
            log.display()
        ));
    }
    // What the guest wrote, as the overlay's allocated clusters (kept for
    // scripts/bench, which compares it with the blocks that differ).
    if let Ok(map) = vm::image::map_json(&overlay).await {
        let _ = crate::image::manifest::write_atomic(&dir.join("overlay.json"), &map);
    }
    vm::image::convert_to_raw(&overlay, &dir.join("upgraded.raw")).await
}

/// One of the seal's scripts in the worker VM, with a deadline: a guest
/// whose PID 1 stops answering must not hold the run (and the frozen VPS)
/// forever.
async fn seal_step(s: &Session, what: &str, script: &str) -> Result<String> {
    match tokio::time::timeout(Duration::from_secs(600), s.run(what, script)).await {
        Ok(r) => r,
        Err(_) => {
            bail!("{what} did not finish within 10 minutes in the worker VM; nothing was pushed")
        }
    }
}

/// Power the worker VM off through its own init (a deadline on the request),
/// then through QEMU (ACPI, then forced after 180 s): the VM is gone after.
async fn power_off(s: Session, mut vm: Vm) -> Result<()> {
    let _ = tokio::time::timeout(
        Duration::from_secs(10),
        s.exec("(sleep 1; systemctl poweroff || poweroff) >/dev/null 2>&1 &"),
    )
    .await;
    s.close().await;
    vm.power_off(Duration::from_secs(180)).await?;
    Ok(())
}

/// `drydock abort RUN`: give the VPS back as it was before the freeze.
pub async fn abort(dir: &Path, ui: &Ui) -> Result<()> {
    let mut j = Journal::load(dir)?;
    match j.state {
        State::Done => {
            return Err(refused!(
                "the run {} is done: the VPS runs the pushed image; to go back, push {} with `drydock push --full`",
                dir.display(),
                dir.join("base.raw").display()
            ));
        }
        State::Aborted => return Err(refused!("the run {} is already aborted", dir.display())),
        State::Running => {}
    }
    if j.is_done(Step::Reboot) {
        return Err(refused!(
            "the VPS already rebooted on the pushed image; to go back, push {} with `drydock push --full`",
            dir.join("base.raw").display()
        ));
    }
    if j.frozen_boot_id.is_none() {
        ui.say("the VPS was never frozen: nothing to give back");
    } else if j.push_started {
        rollback_push(dir, &mut j, ui).await?;
    } else {
        let s = connect(&j, false).await?;
        let facts = remote::gather(&s).await?;
        if j.frozen_boot_id.as_deref() == Some(facts.boot_id.as_str()) {
            let r = freeze::thaw(&s, &facts, j.device.as_deref()).await?;
            ui.say(r.human());
        } else {
            ui.say(format!(
                "{} rebooted since the freeze: it is running normally",
                s.host()
            ));
        }
        s.close().await;
    }
    j.state = State::Aborted;
    j.save(dir)
}

/// After a partial push: push the base image back (the disk holds, block
/// by block, either the base or the upgraded image), then reboot.
async fn rollback_push(dir: &Path, j: &mut Journal, ui: &Ui) -> Result<()> {
    let upgraded = dir.join("upgraded.raw");
    let rollback = dir.join("rollback.raw");
    if !rollback.exists() {
        // Same content as the base, read-only use: a hard link, no copy.
        std::fs::hard_link(dir.join("base.raw"), &rollback)?;
    }
    let m = Manifest::path_for(&rollback);
    if !m.exists() {
        hash_image(&upgraded, |_| {})?.save(&m)?;
    }
    let s = connect(j, false).await?;
    let facts = remote::gather(&s).await?;
    ui.say("the push had started: pushing the base image back");
    push::push(
        &s,
        &facts,
        &push::PushOptions {
            image: rollback,
            device: j.device.clone(),
            full: false,
            // Partly written: only its hashes can say which blocks are which.
            frozen_boot_id: None,
            transfer: j.transfer,
            // What the disk may hold besides the base: the upgraded image.
            base_image: Some(upgraded.clone()),
        },
        ui,
    )
    .await?;
    s.close().await;
    reboot_vps(j).await?;
    ui.say("the VPS is back on its disk as it was before the run");
    Ok(())
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
