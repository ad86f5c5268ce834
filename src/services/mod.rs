//! What the VPS runs, and the proof that it still runs after the upgrade.
//!
//! The probe records the **service set**: on systemd every active service
//! and socket unit with its state, on OpenRC every started service. The
//! same set is then checked three times, by the same reading (`read`) and
//! the same judgement (`judge`):
//!
//! * in the **service proof** (`pipeline::proof`): the upgraded copy booted
//!   on a throwaway overlay, its network sealed, what the VPS did not run
//!   held back; a failure stops the run before the freeze;
//! * on the **VPS after its reboot** (the check step): a unit that ran
//!   before and does not now names the way back (`drydock abort RUN`);
//! * in **`verify --boot`** and **`restore`**: a backup's version booted in
//!   a sealed VM, against the set recorded when the version was taken.
//!
//! Left out of the set, because a reboot does not bring them back and
//! nothing is wrong when it does not: transient units (`systemd-run`),
//! users' session managers (`user@UID`), the jobs of timers and path units,
//! and the per-connection instances of sockets (`Accept=yes`). Units that
//! had already failed on the VPS are named and not required afterwards.

pub mod check;
pub mod judge;
pub mod read;

use serde::{Deserialize, Serialize};

pub use crate::vm::seal::Init;
pub use judge::{Failure, Missing, Outcome};
use read::UnitState;

/// One unit of the set, as the VPS ran it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unit {
    pub name: String,
    /// systemd's sub-state when the probe read it ("running", "exited",
    /// "listening"); OpenRC: "started".
    pub state: String,
    /// Started by a socket, a bus or a path unit: it may be idle after a
    /// boot until something asks for it; its trigger is what must run.
    #[serde(default)]
    pub on_demand: bool,
    /// A socket's or path unit's Triggers=: what it starts on demand (a
    /// service that need not run at boot, and that the proof must not hold
    /// back).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub triggers: Vec<String>,
}

/// What the VPS runs, as the probe found it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceSet {
    pub init: Init,
    /// Checked on the upgraded copy and on the VPS after its reboot.
    pub units: Vec<Unit>,
    /// Oneshot services that ran at the VPS's boot and exited: not
    /// checked, but not held back in the proof either (what the set's
    /// services may need to have run first).
    #[serde(default)]
    pub ran_at_boot: Vec<String>,
    /// Already failed, or restarting, on the VPS: not required afterwards.
    #[serde(default)]
    pub not_running: Vec<String>,
}

impl ServiceSet {
    pub fn names(&self) -> Vec<String> {
        self.units.iter().map(|u| u.name.clone()).collect()
    }

    pub fn is_empty(&self) -> bool {
        self.units.is_empty()
    }

    /// The set from what the host's units say (`read::SET_SCRIPT`).
    pub fn from_states(init: Init, states: &[UnitState]) -> ServiceSet {
        let mut set = ServiceSet {
            init,
            ..ServiceSet::default()
        };
        for u in states {
            if !read::valid_name(&u.id) || left_out(u) {
                continue;
            }
            match u.active.as_str() {
                "active" | "reloading" => set.units.push(Unit {
                    name: u.id.clone(),
                    state: u.sub.clone(),
                    on_demand: !u.triggered_by.is_empty(),
                    triggers: u.triggers.clone(),
                }),
                "failed" => set.not_running.push(u.id.clone()),
                "activating" if u.sub == "auto-restart" => set.not_running.push(u.id.clone()),
                "inactive" if u.type_ == "oneshot" && u.ran && u.result == "success" => {
                    set.ran_at_boot.push(u.id.clone())
                }
                _ => {}
            }
        }
        set.units.sort_by(|a, b| a.name.cmp(&b.name));
        set.units.dedup_by(|a, b| a.name == b.name);
        set.ran_at_boot.sort();
        set.ran_at_boot.dedup();
        set.not_running.sort();
        set.not_running.dedup();
        set
    }

    /// One line for people: how many, and which.
    pub fn describe(&self) -> String {
        let names: Vec<&str> = self.units.iter().map(|u| u.name.as_str()).collect();
        format!("{} unit(s): {}", names.len(), names.join(" "))
    }
}

/// The host's service set, read now (`read::set_script`); None when its
/// init system is neither systemd nor OpenRC, or it did not answer whole.
pub async fn gather(s: &crate::ssh::Session) -> anyhow::Result<Option<ServiceSet>> {
    let out = tokio::time::timeout(
        std::time::Duration::from_secs(120),
        s.exec(&read::set_script()),
    )
    .await
    .map_err(|_| anyhow::anyhow!("{} did not list its units within 2 minutes", s.host()))??;
    Ok(read::parse_set(&out.stdout_str())
        .map(|(init, states)| ServiceSet::from_states(init, &states)))
}

/// The memory to give a VM that stands for a host whose MemTotal is
/// MEM_TOTAL bytes: rounded up to 256 MiB, as the RAM it was sold with
/// (the kernel keeps some of it out of MemTotal).
pub fn vps_memory_mib(mem_total: u64) -> Option<u64> {
    let mib = mem_total.div_ceil(1 << 20);
    (mib > 0).then(|| mib.div_ceil(256) * 256)
}

/// Units a reboot does not bring back, by design (the module's doc).
fn left_out(u: &UnitState) -> bool {
    let by_schedule = u
        .triggered_by
        .iter()
        .any(|t| t.ends_with(".timer") || t.ends_with(".path"));
    // sshd@3-10.0.0.1:22-10.0.0.2:5555.service, for a socket with Accept=yes.
    let per_connection =
        u.id.contains('@') && u.triggered_by.iter().any(|t| t.ends_with(".socket"));
    u.transient
        || by_schedule
        || per_connection
        || u.id.starts_with("user@")
        || u.id.starts_with("user-runtime-dir@")
        || u.load == "not-found"
}

/// Schedulers: they run jobs (backups, mail, renewals), so the proof never
/// starts them, whatever the VPS ran; they are checked on the VPS after its
/// reboot like any unit of the set.
pub const SCHEDULERS: &[&str] = &[
    "cron.service",
    "crond.service",
    "cronie.service",
    "anacron.service",
    "atd.service",
    "fcron.service",
    "cron.target",
    // OpenRC's names.
    "cron",
    "crond",
    "cronie",
    "fcron",
    "atd",
    "dcron",
];

/// A string from the host, safe to show on a terminal: control characters
/// (escape sequences, OSC 52, carriage returns that rewrite a line) shown
/// as `\xNN` / `\u{NNNN}`; tabs and newlines kept.
pub fn printable(s: &str) -> String {
    crate::ui::text::shown(s).into_owned()
}

#[cfg(test)]
mod tests;
