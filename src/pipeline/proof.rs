//! The service proof: the VPS's services started on the upgraded copy
//! before anything is frozen (safety rule 9).
//!
//! # How
//!
//! The upgraded image is never written: the proof boots a qcow2 overlay of
//! it (`proof.qcow2`, deleted afterwards), shaped as the VPS (its memory
//! and CPUs too: a service that needs more RAM than the VPS has fails
//! here), with the network sealed and no proxy: nothing leaves the VM.
//!
//! What the VPS did not run must stay held back, and the boot must still
//! go through the upgraded system's own boot loader, whose command line
//! cannot be changed. So the hold is written on the overlay first, in a
//! short sealed boot of the upgraded kernel (fetched from the rehearsal's
//! verify boot, booted directly to sysinit.target as the worker's first
//! boot is): every timer (and timers.target), the schedulers (cron, atd:
//! they run jobs), and every unit the VPS had enabled but did not run are
//! masked in /etc/systemd/system.control (OpenRC: their runlevel links
//! moved aside). Units the upgrade newly enabled are let run: the VPS will
//! run them after its reboot. Then the overlay boots through the boot
//! loader to the VPS's own default target, and `services::check` judges
//! the set: active, not restarting; a unit nothing started at boot is
//! started by drydock, and said so.
//!
//! The overlay is thrown away whatever the result: the hold on it never
//! reaches the VPS.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};

use super::journal::{Journal, Step};
use super::worker::{power_off, seal_step, start_worker};
use crate::errors::refused;
use crate::remote::bootfiles::BootFiles;
use crate::services::{self, Init, Outcome, ServiceSet};
use crate::ui::{Ui, human_bytes};
use crate::vm::{self, cmdline, seal};

/// The services of a run: the set, the proof and the check after the push.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Record {
    /// What the VPS ran, as the probe found it (None: not read, as in runs
    /// from before the proof).
    pub set: Option<ServiceSet>,
    /// The VPS's memory (rounded up to 256 MiB) and CPUs: the proof's VM.
    pub vps_memory_mib: Option<u64>,
    pub vps_cpus: Option<u32>,
    /// The units the VPS had enabled ("UNIT TARGET"): those of them it did
    /// not run stay held back in the proof.
    #[serde(default)]
    pub vps_enabled: Vec<(String, String)>,
    /// `--no-service-proof`.
    #[serde(default)]
    pub no_proof: bool,
    /// `--accept-failed UNIT`: failures that do not stop the run.
    #[serde(default)]
    pub accept_failed: Vec<String>,
    /// `--rollback-on-failure`: a failed check after the push gives the VPS
    /// its old disk back by itself.
    #[serde(default)]
    pub rollback_on_failure: bool,
    /// The proof on the upgraded copy.
    pub proof: Option<Outcome>,
    /// Why there was no proof.
    pub proof_skipped: Option<String>,
    /// The check on the VPS after its reboot.
    pub after: Option<Outcome>,
    /// The way back after a failed check (`abort` after the reboot).
    pub rollback: Option<super::abort::Rollback>,
}

impl Record {
    /// Units the proof started itself: on the VPS their not running after
    /// the reboot is said, not a failure.
    pub fn not_at_boot(&self) -> Vec<String> {
        self.proof
            .as_ref()
            .map(|p| p.started_by_drydock.clone())
            .unwrap_or_default()
    }
}

/// Why the proof does not run, if it does not.
fn skip_reason(j: &Journal) -> Option<String> {
    if j.services.no_proof {
        return Some("--no-service-proof".into());
    }
    match &j.services.set {
        None => Some("the VPS's services were not recorded by this run's probe".into()),
        Some(s) if s.is_empty() => Some("the VPS runs no service drydock can check".into()),
        _ => None,
    }
}

/// The proof step: the proof (or why not), its verdict, and after a
/// rehearsal that passed, the rehearsal's result kept for the carry.
pub(super) async fn prove_step(dir: &Path, j: &mut Journal, ui: &Ui) -> Result<()> {
    let later = j.steps().iter().skip_while(|s| **s != Step::Prove).skip(1);
    if later.clone().any(|s| j.is_done(*s)) {
        // A run started before the proof existed, already past its place.
        j.services.proof_skipped = Some("this run had passed the proof's place".into());
        return Ok(());
    }
    if let Some(why) = skip_reason(j) {
        ui.warn(format!(
            "the VPS's services are not proven on the upgraded copy: {why}"
        ));
        j.services.proof_skipped = Some(why);
    } else if j.services.proof.is_none() {
        if !j.rehearse_first && !j.rehearsal {
            ui.warn("no rehearsal: the service proof runs while the VPS is frozen, and adds to the downtime");
        }
        let outcome = prove(dir, j, ui).await?;
        j.services.proof = Some(outcome);
        j.save(dir)?;
    }
    if let Some(p) = &j.services.proof {
        let failures = p.failures(&j.services.accept_failed);
        if !failures.is_empty() {
            return Err(proof_failed(dir, j, p, &failures));
        }
        let accepted = p.failures(&[]);
        ui.say(format!(
            "the service proof passed on the upgraded copy: {} in {:.0} s{}",
            p.summary(),
            p.seconds,
            if accepted.is_empty() {
                String::new()
            } else {
                format!(
                    "; not running, accepted (--accept-failed): {}",
                    accepted.join(" ")
                )
            }
        ));
        for u in &p.started_by_drydock {
            ui.warn(format!(
                "{u} ran on the VPS, but nothing starts it at boot: drydock started it in the proof \
                 and it came up; after the VPS's reboot it will not run until something starts it"
            ));
        }
    }
    if j.rehearse_first && !j.rehearsal {
        ui.say(format!(
            "the rehearsal passed: the worker VM came back running {}; a push would write {}. \
             Now the real upgrade: the VPS is frozen from here",
            services::printable(j.os_in_worker.as_deref().unwrap_or("?")),
            human_bytes(j.delta_bytes.unwrap_or(0))
        ));
        // Kept to be carried over to the frozen copy (`carry`), or removed:
        // the real upgrade makes its own.
        if let Some(plan) = j.rehearsed_plan.clone() {
            super::carry::keep(dir, j, &plan, ui)?;
        }
        let upgraded = super::rundir::upgraded(dir);
        let _ = std::fs::remove_file(crate::image::manifest::Manifest::path_for(&upgraded));
        let _ = std::fs::remove_file(upgraded);
    }
    Ok(())
}

/// The error of a failed proof: each unit with its evidence, and the ways on.
fn proof_failed(dir: &Path, j: &Journal, p: &Outcome, failures: &[String]) -> anyhow::Error {
    let run = dir.display();
    let refused = if p.refused.is_empty() {
        String::new()
    } else {
        format!(
            "\nthe sealed network refused during the proof: {}; a unit that needs to reach \
             those fails only here: accept it with --accept-failed UNIT",
            p.refused.join("; ")
        )
    };
    let accept = failures
        .iter()
        .map(|u| format!("--accept-failed {u}"))
        .collect::<Vec<_>>()
        .join(" ");
    let head = format!(
        "the service proof failed: {} unit(s) the VPS runs did not run on the upgraded copy \
         (booted through its own boot loader, network sealed, {}):\n{}",
        failures.len(),
        p.settled,
        p.failure_text(&j.services.accept_failed).trim_end()
    );
    if j.never_frozen() {
        refused!(
            "{head}{refused}\nthe VPS was not frozen and kept serving; nothing on it changed. \
             How to go on:\n  fix the cause on the VPS, then `drydock resume {run}`: the live copy \
             is brought up to date and the rehearsal and the proof run again;\n  `drydock resume \
             {run} {accept}` goes on, those units not running after the upgrade;\n  `drydock \
             resume {run} --no-service-proof` goes on without the proof;\n  `drydock abort {run}` \
             ends the run (another --to or --run needs a new run)"
        )
    } else {
        anyhow::anyhow!(
            "{head}{refused}\nthe VPS is frozen and unchanged (nothing was pushed). \
             `drydock abort {run}` gives it back as it was; `drydock resume {run} {accept}` \
             pushes anyway, those units not running after the upgrade"
        )
    }
}

/// What the proof holds back on a systemd disk: every timer and the
/// timers target, the schedulers, and what the VPS had enabled but did not
/// run, unless a socket it ran starts it on demand. ENABLED: the upgraded
/// disk's enabled units ("file UNIT TARGET").
pub fn held_systemd(
    set: &ServiceSet,
    vps_enabled: &[(String, String)],
    enabled: &[(String, String)],
) -> Vec<String> {
    // A socket of the set starts its service on demand: by its Triggers=
    // (read since this proof), else by its name (foo.socket, foo.service).
    let started_on_demand = |u: &str| {
        set.units.iter().any(|x| {
            x.triggers.iter().any(|t| t == u)
                || (x.name.ends_with(".socket")
                    && u.strip_suffix(".service") == x.name.strip_suffix(".socket"))
        })
    };
    let runs = |u: &str| {
        set.units.iter().any(|x| x.name == u)
            || set.ran_at_boot.iter().any(|x| x == u)
            || started_on_demand(u)
    };
    let vps_had = |u: &str| vps_enabled.iter().any(|(x, _)| x == u);
    let mut held: Vec<String> = enabled
        .iter()
        .map(|(u, _)| u.clone())
        .filter(|u| !u.contains("@."))
        .filter(|u| {
            u.ends_with(".timer")
                || u.ends_with(".path")
                || services::SCHEDULERS.contains(&u.as_str())
                || (vps_had(u) && !runs(u) && !u.ends_with(".target"))
        })
        .collect();
    held.push("timers.target".into());
    held.extend(
        set.units
            .iter()
            .filter(|u| services::SCHEDULERS.contains(&u.name.as_str()))
            .map(|u| u.name.clone()),
    );
    held.retain(|u| services::read::valid_name(u));
    held.sort();
    held.dedup();
    held
}

/// The proof's hold written on the overlay (systemd): masks in
/// /etc/systemd/system.control, above every other unit folder.
fn hold_script(held: &[String]) -> String {
    let words: Vec<String> = held.iter().map(|u| crate::ssh::shell_quote(u)).collect();
    format!(
        "set -e\nD=/etc/systemd/system.control\nmkdir -p \"$D\"\nfor u in {}; do ln -sfn /dev/null \"$D/$u\"; done\nsync\n",
        words.join(" ")
    )
}

/// The proof: the hold written in a sealed direct boot of the upgraded
/// kernel, then the boot through the boot loader and the check; the
/// overlay removed after, whatever happened.
async fn prove(dir: &Path, j: &Journal, ui: &Ui) -> Result<Outcome> {
    let t0 = Instant::now();
    let Some(set) = j.services.set.clone() else {
        bail!("no service set recorded");
    };
    let overlay = super::rundir::proof_overlay(dir);
    let _ = std::fs::remove_file(&overlay);
    vm::image::create_overlay(&super::rundir::upgraded(dir), &overlay).await?;
    let res = tokio::time::timeout(
        Duration::from_secs(3600),
        prove_on(
            dir,
            j,
            ui,
            (&set, &set),
            &overlay,
            &super::rundir::upgraded_boot_files(dir),
        ),
    )
    .await
    .unwrap_or_else(|_| {
        bail!(
            "the service proof did not finish within an hour; the console of its VM is in {}",
            super::rundir::serial_log(dir).display()
        )
    });
    let _ = std::fs::remove_file(&overlay);
    let mut outcome = res?;
    control(dir, j, ui, &set, &mut outcome).await;
    outcome.seconds = t0.elapsed().as_secs_f64();
    Ok(outcome)
}

/// The control: a unit that failed on the upgraded copy is started the
/// same way on the copy without the upgrade (the base image, the VPS's own
/// kernel). One that fails there too does not fail because of the upgrade:
/// a rehearsal's copy is read while the VPS writes to it, and a file an
/// app was appending to may end torn (the app's own crash recovery is not
/// what is proven). It is then not proven, said so, and checked on the VPS
/// after its push; a control that cannot run leaves the failures as they
/// are.
async fn control(dir: &Path, j: &Journal, ui: &Ui, set: &ServiceSet, outcome: &mut Outcome) {
    let failing: Vec<String> = outcome
        .failed
        .iter()
        .map(|f| f.unit.clone())
        .filter(|u| !services::judge::is_accepted(u, &j.services.accept_failed))
        .collect();
    if failing.is_empty() {
        return;
    }
    ui.say(format!(
        "{} failed on the upgraded copy; the control: the same boot of the copy without the upgrade",
        failing.join(" ")
    ));
    let subset = ServiceSet {
        units: set
            .units
            .iter()
            .filter(|u| failing.contains(&u.name))
            .cloned()
            .collect(),
        ..set.clone()
    };
    let overlay = super::rundir::control_overlay(dir);
    let _ = std::fs::remove_file(&overlay);
    let res = async {
        vm::image::create_overlay(&super::rundir::base(dir), &overlay).await?;
        tokio::time::timeout(
            Duration::from_secs(3600),
            prove_on(
                dir,
                j,
                ui,
                (set, &subset),
                &overlay,
                &super::rundir::boot_files(dir),
            ),
        )
        .await
        .map_err(|_| anyhow::anyhow!("it did not finish within an hour"))?
    }
    .await;
    let _ = std::fs::remove_file(&overlay);
    let c = match res {
        Ok(c) => c,
        Err(e) => {
            ui.warn(format!(
                "the control boot of the copy without the upgrade did not finish ({e:#}): the failures stand"
            ));
            return;
        }
    };
    let also: Vec<String> = c.failed.iter().map(|f| f.unit.clone()).collect();
    outcome.failed.retain(|f| !also.contains(&f.unit));
    for u in &also {
        outcome.not_proven.push((
            u.clone(),
            format!(
                "failed on the upgraded copy and the same way on the copy without the upgrade: \
                 not the upgrade's doing (a live copy taken while the VPS wrote to it, or the \
                 proof's sealed network, can fail a unit); checked on the VPS after its push ({})",
                c.failed
                    .iter()
                    .find(|f| &f.unit == u)
                    .map(|f| f.why.as_str())
                    .unwrap_or("?")
            ),
        ));
    }
    if !also.is_empty() {
        ui.say(format!(
            "the control failed the same way for {}: not the upgrade's doing, not proven, checked \
             after the push",
            also.join(" ")
        ));
    }
}

/// The proof's VM: the overlay, shaped and sized as the VPS, sealed.
struct ProofVm<'a> {
    dir: &'a Path,
    j: &'a Journal,
    overlay: &'a Path,
    shape: crate::vm::shape::Shape,
    memory_mib: u64,
    cpus: u32,
    /// The boot parity report, ending every "did not come up" error.
    parity: String,
}

impl ProofVm<'_> {
    /// A boot of the overlay (DIRECT: the upgraded kernel, else its boot
    /// loader), with no way out of its network; its packets in PCAP.
    fn spec(&self, direct: Option<cmdline::DirectBoot>, pcap: &str) -> Result<cmdline::VmSpec> {
        Ok(cmdline::VmSpec {
            hotplug_ports: Vec::new(),
            disk: self.overlay.to_path_buf(),
            disk_format: "qcow2".into(),
            memory_mib: self.memory_mib,
            cpus: self.cpus,
            accel: cmdline::detect_accel(),
            ssh_port: std::net::TcpListener::bind("127.0.0.1:0")?
                .local_addr()?
                .port(),
            qmp_socket: super::rundir::qmp_socket(self.dir),
            serial_log: super::rundir::serial_log(self.dir),
            shape: self.shape.clone(),
            efi: vm::efi_for(&self.shape, self.dir)?,
            direct,
            sealed: Some(cmdline::NetSeal {
                proxy: None,
                pcap: self.dir.join(pcap),
            }),
        })
    }

    /// First, the hold: written on the overlay in a sealed direct boot of
    /// the upgraded kernel (and the VPS's disk names for the boot after).
    /// Returns what is held back.
    async fn hold(
        &self,
        set: &ServiceSet,
        seal: &seal::Seal,
        boot: &BootFiles,
    ) -> Result<Vec<String>> {
        let direct = cmdline::DirectBoot {
            kernel: boot.kernel.clone(),
            initrd: boot.initrd.clone(),
            append: seal.kernel_cmdline(&boot.cmdline)?,
        };
        let (vm, s) = start_worker(
            self.dir,
            self.j.identity.as_deref(),
            self.spec(Some(direct), "proof1.pcap")?,
            "the upgraded copy did not come up for the service proof's hold: ",
            &self.parity,
        )
        .await?;
        let listed = seal_step(
            &s,
            "listing the upgraded disk's units",
            seal.enabled_script(),
        )
        .await?;
        let lines: Vec<String> = listed.lines().map(str::to_string).collect();
        if lines.last().map(String::as_str) != Some("end") {
            bail!("the list of the upgraded disk's units was cut short");
        }
        let (held, script) = match set.init {
            Init::Systemd => {
                let h = held_systemd(
                    set,
                    &self.j.services.vps_enabled,
                    &seal::enabled_units(&lines),
                );
                let script = hold_script(&h);
                (h, script)
            }
            Init::Openrc => {
                let mut h = seal::openrc_held_back(&seal::runlevel_services(&lines), &set.names());
                h.extend(
                    set.units
                        .iter()
                        .filter(|u| services::SCHEDULERS.contains(&u.name.as_str()))
                        .map(|u| u.name.clone()),
                );
                h.sort();
                h.dedup();
                let script = seal.disk_seal_script(&h, false);
                (h, script)
            }
        };
        seal_step(&s, "holding back what the VPS did not run", &script).await?;
        if let Some(id) = self.shape.disk_id.as_ref().filter(|i| !i.links.is_empty()) {
            seal_step(
                &s,
                "writing the VPS's disk names for the proof's boot",
                &crate::vm::diskid::disk_script(id),
            )
            .await?;
        }
        power_off(s, vm).await?;
        Ok(held)
    }

    /// Then the boot through the boot loader to the VPS's own default
    /// target, and the set checked (HELD not judged); the network's
    /// refusals with it.
    async fn boot_and_check(&self, set: &ServiceSet, held: Vec<String>) -> Result<Outcome> {
        let (vm, s) = start_worker(
            self.dir,
            self.j.identity.as_deref(),
            self.spec(None, "proof2.pcap")?,
            "the upgraded copy did not come up for the service proof: ",
            &self.parity,
        )
        .await?;
        let opts = services::check::Options {
            start_idle: true,
            held,
            ..Default::default()
        };
        let checked = services::check::check(&s, set, &opts).await;
        power_off(s, vm).await?;
        let mut outcome = checked?;
        let allowed = (cmdline::proxy_addr(&self.shape), vm::proxy::GUEST_PORT);
        outcome.refused = vm::pcap::take(&super::rundir::pcap(self.dir, "proof2.pcap"), allowed)
            .into_iter()
            .map(|r| r.what)
            .collect();
        let _ = std::fs::remove_file(super::rundir::pcap(self.dir, "proof1.pcap"));
        Ok(outcome)
    }
}

/// The proof on OVERLAY, its sealed first boot from the kernel files in
/// BOOT (the upgraded system's, or the VPS's for the control): what the
/// VPS did not run held back (SET decides it), and the units of CHECKED
/// judged (the whole set, or the control's few).
async fn prove_on(
    dir: &Path,
    j: &Journal,
    ui: &Ui,
    (set, checked): (&ServiceSet, &ServiceSet),
    overlay: &Path,
    boot: &Path,
) -> Result<Outcome> {
    let Some(seal) = j.seal.clone() else {
        bail!("this run has no seal for its worker VM");
    };
    let boot = BootFiles::load(boot).map_err(|e| {
        anyhow::anyhow!(
            "the upgraded system's kernel files were not kept from its verify boot ({e:#}), and \
             the proof boots them to hold back what the VPS did not run; `drydock resume {} \
             --no-service-proof` goes on without the proof",
            dir.display()
        )
    })?;
    let shape = j.shape.clone().unwrap_or_default();
    let vm = ProofVm {
        dir,
        j,
        overlay,
        parity: format!(
            "the proof's VM was built as probed on the VPS: {}",
            shape.describe()
        ),
        shape,
        memory_mib: j.services.vps_memory_mib.unwrap_or(j.memory_mib),
        cpus: j.services.vps_cpus.unwrap_or(j.cpus).max(1),
    };
    ui.say(format!(
        "the service proof: the upgraded copy on a throwaway overlay, {} MiB and {} CPU(s) as \
         the VPS, network sealed; first the hold on what the VPS did not run",
        vm.memory_mib, vm.cpus
    ));
    let held = vm.hold(set, &seal, &boot).await?;
    ui.say(format!(
        "held back in the proof ({}): {}; booting the upgraded copy through its own boot loader",
        held.len(),
        held.join(" ")
    ));
    vm.boot_and_check(checked, held).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::services::Unit;

    fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    /// What the VPS ran runs; what it had enabled and did not run, every
    /// timer and the schedulers are held back; what the upgrade newly
    /// enabled runs (the VPS will run it after its reboot).
    #[test]
    fn the_proof_holds_back_what_the_vps_did_not_run() {
        let set = ServiceSet {
            init: Init::Systemd,
            units: ["ssh.service", "nginx.service", "cron.service"]
                .iter()
                .map(|n| Unit {
                    name: n.to_string(),
                    state: "running".into(),
                    on_demand: false,
                    triggers: vec![],
                })
                .collect(),
            ran_at_boot: vec!["app-migrate.service".into()],
            not_running: vec![],
        };
        let vps_enabled = pairs(&[
            ("ssh.service", "multi-user"),
            ("nginx.service", "multi-user"),
            ("cron.service", "multi-user"),
            ("app-migrate.service", "multi-user"),
            ("backup-push.service", "multi-user"),
            ("apt-daily.timer", "timers"),
            ("remote-fs.target", "multi-user"),
        ]);
        let mut upgraded = vps_enabled.clone();
        upgraded.extend(pairs(&[
            ("php8.4-fpm.service", "multi-user"),
            ("certbot.timer", "timers"),
            ("getty@.service", "getty"),
        ]));
        let held = held_systemd(&set, &vps_enabled, &upgraded);
        assert_eq!(
            held,
            [
                "apt-daily.timer",
                "backup-push.service",
                "certbot.timer",
                "cron.service",
                "timers.target"
            ]
        );
    }

    /// A service its socket starts on demand is not held back, even when
    /// the VPS was not running it when probed: masked, it makes its socket
    /// fail (the first real 12 -> 13 of the docker fixture: docker.socket
    /// listening, docker.service enabled but idle, the proof failed
    /// docker.socket). By the socket's Triggers=, else by its name.
    #[test]
    fn a_service_its_socket_starts_is_not_held_back() {
        let unit = |n: &str, state: &str, triggers: &[&str]| Unit {
            name: n.to_string(),
            state: state.into(),
            on_demand: false,
            triggers: triggers.iter().map(|t| t.to_string()).collect(),
        };
        let set = ServiceSet {
            init: Init::Systemd,
            units: vec![
                unit("containerd.service", "running", &[]),
                unit("docker.socket", "listening", &[]),
                unit("web.socket", "listening", &["web-backend.service"]),
            ],
            ran_at_boot: vec![],
            not_running: vec![],
        };
        let enabled = pairs(&[
            ("containerd.service", "multi-user"),
            ("docker.service", "multi-user"),
            ("docker.socket", "sockets"),
            ("web-backend.service", "multi-user"),
            ("idle.service", "multi-user"),
        ]);
        let held = held_systemd(&set, &enabled, &enabled);
        assert_eq!(held, ["idle.service", "timers.target"]);
    }

    #[test]
    fn the_hold_is_masks_above_every_unit_folder_its_names_quoted() {
        let s = hold_script(&["a.timer".into(), "fsck@x\\x2dy.service".into()]);
        assert!(s.contains("D=/etc/systemd/system.control"), "{s}");
        assert!(
            s.contains(
                "for u in a.timer 'fsck@x\\x2dy.service'; do ln -sfn /dev/null \"$D/$u\"; done"
            ),
            "{s}"
        );
    }
}
