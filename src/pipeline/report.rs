//! What a run reports at its end (and at `runs`), and what `upgrade
//! --dry-run` found and would do: the data, and its `human()` text.

use std::path::{Path, PathBuf};

use serde::Serialize;

use super::journal::{Journal, Step};
use crate::transfer::helper::Mode;
use crate::ui::human_bytes;
use crate::vm::proxy::Downloads;
use crate::vm::seal::Seal;
use crate::vm::shape::Shape;

#[derive(Debug, Serialize)]
pub struct Report {
    pub run: PathBuf,
    /// `drydock rehearse`: nothing was frozen or pushed; os_after is what
    /// the worker VM came back running.
    pub rehearsal: bool,
    /// A rehearsal's prediction: what a push of its result would write.
    pub delta_blocks: Option<u64>,
    pub delta_bytes: Option<u64>,
    pub host: String,
    pub os_before: Option<String>,
    pub os_after: Option<String>,
    pub downtime_seconds: Option<f64>,
    /// Seconds of the steps before the freeze (probe, live pull,
    /// rehearsal): the VPS served throughout.
    pub live_seconds: Option<f64>,
    /// The rehearsal's upgrade in the worker VM, and the real one.
    pub rehearsal_seconds: Option<f64>,
    pub upgrade_seconds: Option<f64>,
    /// After a rehearsal: whether its result was carried over to the
    /// frozen copy (the upgrade not run again), or why not.
    pub carried: Option<super::journal::CarryOutcome>,
    /// Bytes free in the upgraded filesystems given the base's content
    /// back (not pushed).
    pub freed_kept_bytes: Option<u64>,
    /// Blocks of 1 MiB the push wrote (the rehearsal predicted
    /// `delta_blocks`).
    pub pushed_blocks: Option<u64>,
    /// Of `bytes_pulled`, the live pull's.
    pub bytes_pulled_live: u64,
    /// What the worker VMs downloaded through the sealed proxy's cache:
    /// the rehearsal's, and the upgrade's (reused: from the rehearsal's).
    pub rehearsal_downloads: Option<Downloads>,
    pub downloads: Option<Downloads>,
    pub steps: Vec<(String, f64)>,
    pub bytes_pulled: u64,
    pub bytes_pushed: u64,
    /// How the pull and the push moved the disk (helper or dd).
    pub pull_transfer: Option<Mode>,
    pub push_transfer: Option<Mode>,
    /// The helper's own peak resident memory on the VPS, the larger of the
    /// pull's and the push's.
    pub helper_peak_rss_kib: Option<u64>,
    /// The pages the VPS rebuilt from package files instead of receiving
    /// them (not in `bytes_pushed`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rebuilt: Option<crate::transfer::push::Rebuilt>,
    /// "sealed" or "open" (`--network open`).
    pub network: String,
    /// The hosts the worker VM's network allowed.
    pub allowed_hosts: Vec<String>,
    /// Units of the VPS held back in the worker VM.
    pub held_back: Vec<String>,
    /// What the run's worker VMs (the rehearsal's included) tried to
    /// reach and were refused (also in run.log).
    pub refused_connections: Vec<String>,
    /// The VPS's service set (what it ran when probed).
    pub services: Vec<String>,
    /// The set started on the upgraded copy before the freeze, and what
    /// came of it; or why it was not.
    pub service_proof: Option<crate::services::Outcome>,
    pub service_proof_skipped: Option<String>,
    /// The set checked on the VPS after its reboot.
    pub services_after: Option<crate::services::Outcome>,
    /// `--accept-failed`.
    pub accepted_failures: Vec<String>,
}

pub(super) fn report(dir: &Path, j: &Journal) -> Report {
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
    let secs = |step: Step| j.done.iter().find(|r| r.step == step).map(|r| r.seconds);
    let before_freeze: Vec<f64> = j
        .done
        .iter()
        .filter(|r| {
            matches!(
                r.step,
                Step::Probe | Step::LivePull | Step::Rehearse | Step::Prove
            ) && (j.rehearsal || j.rehearse_first)
        })
        .map(|r| r.seconds)
        .collect();
    Report {
        live_seconds: (j.rehearsal || j.rehearse_first).then(|| before_freeze.iter().sum()),
        rehearsal_seconds: secs(Step::Rehearse),
        upgrade_seconds: secs(Step::Upgrade),
        carried: j.carried.clone(),
        freed_kept_bytes: j.freed_kept_bytes,
        pushed_blocks: j.pushed_blocks,
        bytes_pulled_live: j.bytes_pulled_live,
        rehearsal_downloads: j.rehearsal_downloads,
        downloads: j.downloads,
        run: dir.to_path_buf(),
        rehearsal: j.rehearsal,
        delta_blocks: j.delta_blocks,
        delta_bytes: j.delta_bytes,
        host: j.host.clone(),
        os_before: j.os_before.clone(),
        os_after: if j.rehearsal {
            j.os_in_worker.clone()
        } else {
            j.os_after.clone()
        },
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
        rebuilt: j.push_rebuilt.clone(),
        network: if j.network_open { "open" } else { "sealed" }.into(),
        allowed_hosts: j.allowed_hosts.clone(),
        held_back: j.held_back.clone(),
        refused_connections: j.refused.clone(),
        services: j
            .services
            .set
            .as_ref()
            .map(|s| s.names())
            .unwrap_or_default(),
        service_proof: j.services.proof.clone(),
        service_proof_skipped: j.services.proof_skipped.clone(),
        services_after: j.services.after.clone(),
        accepted_failures: j.services.accept_failed.clone(),
    }
}

impl Report {
    /// The upgrade's report as text for the terminal, a line per fact.
    /// Over 80 lines: flat, one short block per line of the report (header,
    /// rehearsal's delta, live and downtime seconds, the prediction against the
    /// upgrade, the carry, steps, package files, transfer, services, held back
    /// units, network) in the order they are printed, each a format behind its
    /// own condition; split, the printed order would be spread over functions.
    pub fn human(&self) -> String {
        let mut s = if self.rehearsal {
            format!(
                "rehearsal on a live copy of {}: {} -> {} in the worker VM; nothing on the VPS \
                 changed\n",
                self.host,
                self.os_before.as_deref().unwrap_or("?"),
                self.os_after.as_deref().unwrap_or("?")
            )
        } else {
            format!(
                "{}: {} -> {}\n",
                self.host,
                self.os_before.as_deref().unwrap_or("?"),
                self.os_after.as_deref().unwrap_or("?")
            )
        };
        if self.rehearsal
            && let (Some(b), Some(n)) = (self.delta_bytes, self.delta_blocks)
        {
            s.push_str(&format!(
                "a push of the upgraded copy would write {} ({n} blocks of 1 MiB)\n",
                human_bytes(b)
            ));
        }
        if let Some(l) = self.live_seconds {
            s.push_str(&format!(
                "live, the VPS serving: {l:.0} s (probe, live pull of {}, rehearsal{})\n",
                human_bytes(self.bytes_pulled_live),
                match &self.service_proof {
                    Some(p) => format!(", service proof {:.0} s", p.seconds),
                    None => String::new(),
                }
            ));
        }
        if let Some(d) = self.downtime_seconds {
            s.push_str(&format!("downtime (freeze to back up): {d:.0} s\n"));
        }
        if !self.rehearsal
            && let (Some(r), Some(n)) = (self.rehearsal_seconds, self.delta_blocks)
        {
            s.push_str(&format!(
                "the rehearsal predicted: {r:.0} s in the worker VM, a push of {n} blocks of 1 MiB; \
                 the upgrade took: {} s, {} blocks\n",
                self.upgrade_seconds
                    .map(|u| format!("{u:.0}"))
                    .unwrap_or_else(|| "?".into()),
                self.pushed_blocks
                    .map(|p| p.to_string())
                    .unwrap_or_else(|| "?".into())
            ));
        }
        match &self.carried {
            Some(c) if c.carried => s.push_str(&format!(
                "the rehearsal's result was carried over: {} entr{} the VPS changed since the \
                 live copy ({} block(s) of 1 MiB) taken into it; the upgrade did not run again\n",
                c.entries,
                if c.entries == 1 { "y" } else { "ies" },
                c.changed_blocks
            )),
            Some(c) => s.push_str(&format!(
                "the rehearsal's result was not carried over ({}); the upgrade ran again on the \
                 frozen copy\n",
                c.why_not.as_deref().unwrap_or("?")
            )),
            None => {}
        }
        for (name, secs) in &self.steps {
            s.push_str(&format!("  {secs:>7.1} s  {name}\n"));
        }
        if let Some(d) = self.downloads
            && self.rehearsal_downloads.is_some()
        {
            s.push_str(&format!(
                "package files: {} ({} files) reused from the rehearsal's downloads, {} ({} \
                 files) fetched again; kept in the run folder, never on the VPS\n",
                human_bytes(d.reused_bytes),
                d.reused_files,
                human_bytes(d.stored_bytes),
                d.stored_files
            ));
        }
        let how = |m: Option<Mode>| match m {
            Some(Mode::Helper) => " (helper)",
            Some(_) => " (dd)",
            None => "",
        };
        let rebuilt = match &self.rebuilt {
            Some(r) if r.pages > 0 => format!(
                " and {} rebuilt on the VPS from package files",
                human_bytes(r.pages * 4096)
            ),
            _ => String::new(),
        };
        s.push_str(&format!(
            "pulled {}{}, pushed {}{}{rebuilt}{}; run folder {}\n",
            human_bytes(self.bytes_pulled),
            how(self.pull_transfer),
            human_bytes(self.bytes_pushed),
            how(self.push_transfer),
            self.helper_peak_rss_kib
                .map(|k| format!("; helper peak memory {}", human_bytes(k * 1024)))
                .unwrap_or_default(),
            self.run.display()
        ));
        s.push_str(&self.services_human());
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

impl Report {
    /// The proof's and the check's lines.
    fn services_human(&self) -> String {
        let mut s = String::new();
        match (&self.service_proof, &self.service_proof_skipped) {
            (Some(p), _) => s.push_str(&p.human(
                "proven on the upgraded copy (sealed, thrown away)",
                &self.accepted_failures,
            )),
            (None, Some(why)) => s.push_str(&format!(
                "services NOT proven on the upgraded copy: {why}\n"
            )),
            (None, None) => {}
        }
        if let Some(a) = &self.services_after {
            s.push_str(&a.human(
                &format!("on {} after its reboot", self.host),
                &self.accepted_failures,
            ));
        }
        if !self.accepted_failures.is_empty() {
            s.push_str(&format!(
                "accepted failing (--accept-failed): {}\n",
                self.accepted_failures.join(" ")
            ));
        }
        s
    }
}

/// What `upgrade --dry-run` found and would do.
#[derive(Debug, Serialize)]
pub struct DryRun {
    /// "first" (upgrade), "only" (rehearse) or "skipped" (--no-rehearsal).
    pub rehearsal: String,
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
    /// The VPS's service set, proven on the upgraded copy unless
    /// `--no-service-proof` (then `service_proof` is false).
    pub services: Vec<String>,
    pub service_proof: bool,
}

impl DryRun {
    /// Over 80 lines, but flat: steps 0 to 6 and 4b, each in the variant the options pick
    /// (rehearsal first, only or skipped; helper or dd; sealed or open; service
    /// proof or not), so that the numbered steps are written in one place.
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
        match self.rehearsal.as_str() {
            "first" => {
                let _ = writeln!(
                    s,
                    "  0. rehearse: pull {dev} live ({mode} mode; {host} keeps serving), run steps \
                     3 and 4 on that copy, and stop before the freeze if they fail"
                );
            }
            "only" => {
                let _ = writeln!(
                    s,
                    "  (rehearse: steps 2 to 4 only, on a live copy; {host} is not frozen and \
                     nothing is pushed)"
                );
            }
            _ => {}
        }
        let _ = writeln!(
            s,
            "  1. freeze {host}: {services}make {dev} read-only, turn swap off"
        );
        if self.rehearsal == "first" && mode == "helper" {
            let _ = writeln!(
                s,
                "  2. pull {dev}: the helper hashes it on {host}, only the blocks changed since \
                 the live copy are sent"
            );
        } else {
            let _ = writeln!(s, "  2. pull {dev} ({mode} mode) into the run folder");
        }
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
        let units = format!(
            "{} unit(s): {}",
            self.services.len(),
            self.services.join(" ")
        );
        if self.service_proof && !self.services.is_empty() {
            let when = match self.rehearsal.as_str() {
                "skipped" => "while the VPS is frozen (no rehearsal: it adds to the downtime)",
                _ => "before the freeze",
            };
            let _ = writeln!(
                s,
                "  4b. prove the services {when}: boot the upgraded copy once more on a throwaway \
                 overlay, network sealed, what {host} did not run held back; each of its {units} \
                 must run, or the run stops"
            );
        } else {
            let _ = writeln!(s, "  4b. no service proof (--no-service-proof)");
        }
        let _ = writeln!(
            s,
            "  5. push the changed blocks to {dev} ({mode} mode), each read back and checked"
        );
        let _ = writeln!(
            s,
            "  6. reboot {host}{expect}, and check it runs its services again"
        );
        for n in &self.worker_vm.notes {
            let _ = writeln!(s, "note: {n}");
        }
        s
    }
}
