//! A run's journal: what was asked, which steps are done, what they found.
//! Written atomically after every step, so a crash leaves a run that
//! `resume` continues and `abort` can undo.

use crate::transfer::helper::Mode;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::util::write_atomic;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Step {
    Probe,
    /// The disk pulled while the VPS serves (a rehearsal's copy).
    LivePull,
    /// The upgrade run whole in the worker VM on the live copy.
    Rehearse,
    /// The VPS's services started on the upgraded copy (a throwaway
    /// overlay, network sealed).
    Prove,
    Freeze,
    Pull,
    Upgrade,
    Push,
    Reboot,
    Check,
}

pub const STEPS: &[Step] = &[
    Step::Probe,
    Step::Freeze,
    Step::Pull,
    Step::Upgrade,
    Step::Prove,
    Step::Push,
    Step::Reboot,
    Step::Check,
];

/// `drydock rehearse`: the pull is live (no freeze) and nothing is
/// pushed; the upgrade runs whole in the worker VM, verify boot included.
pub const REHEARSAL_STEPS: &[Step] = &[Step::Probe, Step::LivePull, Step::Rehearse, Step::Prove];

/// `drydock upgrade` (without --no-rehearsal): the rehearsal, then the
/// freeze and the real upgrade, the frozen pull a pre-copy that sends
/// only what changed since the live one.
pub const REHEARSED_STEPS: &[Step] = &[
    Step::Probe,
    Step::LivePull,
    Step::Rehearse,
    Step::Prove,
    Step::Freeze,
    Step::Pull,
    Step::Upgrade,
    Step::Push,
    Step::Reboot,
    Step::Check,
];

impl Step {
    /// As the journal and the `--json` "step" event name it.
    pub fn key(self) -> &'static str {
        match self {
            Step::Probe => "probe",
            Step::LivePull => "live-pull",
            Step::Rehearse => "rehearse",
            Step::Prove => "prove",
            Step::Freeze => "freeze",
            Step::Pull => "pull",
            Step::Upgrade => "upgrade",
            Step::Push => "push",
            Step::Reboot => "reboot",
            Step::Check => "check",
        }
    }

    /// As people read it.
    pub fn name(self) -> &'static str {
        match self {
            Step::Probe => "probe",
            Step::LivePull => "pull, live (the VPS serving)",
            Step::Rehearse => "rehearse in the local VM (boot, run, reboot, verify, power off)",
            Step::Prove => "prove the VPS's services on the upgraded copy (sealed, thrown away)",
            Step::Freeze => "freeze",
            Step::Pull => "pull",
            Step::Upgrade => "upgrade in the local VM (boot, run, reboot, verify, power off)",
            Step::Push => "push",
            Step::Reboot => "reboot the VPS",
            Step::Check => "check",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepRecord {
    pub step: Step,
    pub seconds: f64,
    pub finished_at: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    Running,
    Done,
    Aborted,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Journal {
    pub format: String,
    pub host: String,
    /// The ssh options the run was started with (`-F`, `-o`, `-p`, `-J`).
    #[serde(default)]
    pub ssh: crate::ssh::SshArgs,
    pub identity: Option<PathBuf>,
    /// The run was started with --accept-new-host-key: its resume, when
    /// the probe has not recorded the key yet, accepts it too (a changed
    /// key is refused whatever this says).
    #[serde(default)]
    pub accept_new_host_key: bool,
    /// `drydock rehearse`: a live pull and the upgrade in the worker VM,
    /// nothing frozen, nothing pushed.
    #[serde(default)]
    pub rehearsal: bool,
    /// `drydock upgrade` without --no-rehearsal: rehearse on a live copy
    /// before the freeze (older journals: no).
    #[serde(default)]
    pub rehearse_first: bool,
    /// Bytes on the wire of the live pull (of `bytes_pulled`).
    #[serde(default)]
    pub bytes_pulled_live: u64,
    /// What the push wrote, in blocks of 1 MiB (against the rehearsal's
    /// prediction).
    #[serde(default)]
    pub pushed_blocks: Option<u64>,
    /// The sealed worker VM's download cache: the rehearsal's and the
    /// upgrade's (which reuses the rehearsal's).
    #[serde(default)]
    pub rehearsal_downloads: Option<crate::vm::proxy::Downloads>,
    #[serde(default)]
    pub downloads: Option<crate::vm::proxy::Downloads>,
    /// What the worker VM's verify boot came back running (os-release's
    /// PRETTY_NAME).
    #[serde(default)]
    pub os_in_worker: Option<String>,
    /// A rehearsal's end: the blocks of 1 MiB a push of its result would
    /// write, and their bytes.
    #[serde(default)]
    pub delta_blocks: Option<u64>,
    #[serde(default)]
    pub delta_bytes: Option<u64>,
    /// Bytes the upgraded filesystems left free (discarded in the worker
    /// VM's last boot) that were given the base's content back, so that
    /// the push does not send them.
    #[serde(default)]
    pub freed_kept_bytes: Option<u64>,
    /// The VPS's clock when the live pull began, in seconds: what changed
    /// after it may differ between the live copy and the frozen disk.
    #[serde(default)]
    pub live_since: Option<i64>,
    /// The rehearsal's result kept to be carried over to the frozen copy
    /// (`pipeline::carry`), and what its verify boot must find.
    #[serde(default)]
    pub carry: Option<Kept>,
    /// `--no-carry`: the upgrade runs again on the frozen copy.
    #[serde(default)]
    pub no_carry: bool,
    /// How the real upgrade was done after a rehearsal: carried over, or
    /// run again and why.
    #[serde(default)]
    pub carried: Option<CarryOutcome>,
    pub device: Option<String>,
    pub to: Option<String>,
    pub run: Option<String>,
    pub memory_mib: u64,
    pub cpus: u32,
    pub created_at: String,
    pub state: State,
    pub done: Vec<StepRecord>,
    /// Facts found on the way.
    pub os_before: Option<String>,
    pub os_after: Option<String>,
    pub frozen_boot_id: Option<String>,
    pub frozen_at: Option<String>,
    pub back_at: Option<String>,
    pub bytes_pulled: u64,
    pub bytes_pushed: u64,
    /// Set before the first byte is pushed: from then on, abort must push
    /// the base image back.
    pub push_started: bool,
    /// How the disk moves (`--transfer`); older journals: auto.
    #[serde(default = "auto")]
    pub transfer: Mode,
    #[serde(default)]
    pub pull_transfer: Option<Mode>,
    #[serde(default)]
    pub push_transfer: Option<Mode>,
    #[serde(default)]
    pub helper_peak_rss_kib: Option<u64>,
    /// The pages the VPS rebuilt from package files during the push.
    #[serde(default)]
    pub push_rebuilt: Option<crate::transfer::push::Rebuilt>,
    /// The VPS's firmware, disk bus and network, as probed: the worker VM
    /// is built to match.
    #[serde(default)]
    pub shape: Option<crate::vm::shape::Shape>,
    /// `--gc` (NixOS).
    #[serde(default)]
    pub gc: bool,
    /// What the worker VM keeps and holds back (decided in the probe step;
    /// None in runs from before the seal).
    #[serde(default)]
    pub seal: Option<crate::vm::seal::Seal>,
    /// `--network open`: the worker VM reaches the internet.
    #[serde(default)]
    pub network_open: bool,
    /// The hosts the sealed worker VM may reach.
    #[serde(default)]
    pub allowed_hosts: Vec<String>,
    /// `--allow-host`.
    #[serde(default)]
    pub allow_extra: Vec<String>,
    /// Held back in the worker VM, as the upgraded disk has them.
    #[serde(default)]
    pub held_back: Vec<String>,
    /// What the sealed worker VM tried to reach and was refused.
    #[serde(default)]
    pub refused: Vec<String>,
    /// The VPS's service set, its proof on the upgraded copy and its check
    /// on the VPS after the reboot.
    #[serde(default)]
    pub services: super::proof::Record,
    /// The plan the rehearsal ran, for its result to be carried over once
    /// the proof passed.
    #[serde(default)]
    pub rehearsed_plan: Option<crate::recipes::Plan>,
}

fn auto() -> Mode {
    Mode::Auto
}

pub const FORMAT: &str = "drydock-run/1";

impl Journal {
    pub fn path(dir: &Path) -> PathBuf {
        super::rundir::journal(dir)
    }

    pub fn load(dir: &Path) -> Result<Journal> {
        let p = Self::path(dir);
        let text = std::fs::read_to_string(&p).map_err(|e| {
            crate::errors::usage!(
                "{} is not a drydock run (no readable journal.json: {e}); `drydock runs` lists \
                 the runs",
                dir.display()
            )
        })?;
        serde_json::from_str(&text).with_context(|| format!("{} is damaged", p.display()))
    }

    pub fn save(&self, dir: &Path) -> Result<()> {
        write_atomic(
            &Self::path(dir),
            serde_json::to_string_pretty(self)?.as_bytes(),
        )
    }

    pub fn is_done(&self, step: Step) -> bool {
        self.done.iter().any(|r| r.step == step)
    }

    /// The run's steps, in order.
    pub fn steps(&self) -> &'static [Step] {
        if self.rehearsal {
            REHEARSAL_STEPS
        } else if self.rehearse_first {
            REHEARSED_STEPS
        } else {
            STEPS
        }
    }

    /// Whether the VPS was never frozen by this run: up to here, nothing
    /// on it changed.
    pub fn never_frozen(&self) -> bool {
        self.frozen_at.is_none() && self.frozen_boot_id.is_none()
    }

    /// The first step not yet done.
    pub fn next_step(&self) -> Option<Step> {
        self.steps().iter().copied().find(|s| !self.is_done(*s))
    }

    /// The run froze its VPS and has not given it back (no reboot on the
    /// new disk, no abort), or the VPS came back on the new disk and did not
    /// pass its check: removing the run would lose the way back.
    pub fn holds_the_vps(&self) -> bool {
        self.state == State::Running && self.is_done(Step::Freeze) && !self.is_done(Step::Check)
    }

    pub fn where_it_stands(&self) -> String {
        match (&self.state, self.next_step()) {
            (State::Done, _) if self.rehearsal => "rehearsed".into(),
            (State::Done, _) => "done".into(),
            (State::Aborted, _) => "aborted".into(),
            (State::Running, Some(s)) => format!("stopped before: {}", s.name()),
            (State::Running, None) => "all steps done".into(),
        }
    }
}

/// A run named by path, or by its name under the runs folder.
pub fn find_run(name: &str) -> Result<PathBuf> {
    let p = PathBuf::from(name);
    if Journal::path(&p).exists() {
        return Ok(p);
    }
    let under = crate::paths::runs_dir()?.join(name);
    if Journal::path(&under).exists() {
        return Ok(under);
    }
    Err(crate::errors::usage!(
        "no run named '{name}' (neither a folder with a journal.json nor one under {}); `drydock runs` lists them",
        crate::paths::runs_dir()?.display()
    ))
}

/// The rehearsal's result kept in the run (`rehearsed.raw`, and the live
/// copy as `live.raw` with its manifest), and what its verify boot found.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Kept {
    pub plan: crate::recipes::Plan,
}

/// How the real upgrade went after a rehearsal.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CarryOutcome {
    pub carried: bool,
    /// Why the upgrade ran again instead.
    pub why_not: Option<String>,
    /// Blocks of 1 MiB that changed on the VPS between the live copy and
    /// the freeze.
    pub changed_blocks: u64,
    /// Entries carried (made as on the VPS, or removed).
    pub entries: u64,
    /// Entries both changed, kept as the VPS had them (its logs, ...).
    pub vps_wins: Vec<String>,
    /// Entries the VPS changed that keep the upgrade's version (the
    /// package manager's caches and locks: apt-daily's refresh).
    #[serde(default)]
    pub upgrade_wins: Vec<String>,
}
