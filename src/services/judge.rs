//! How a unit of the set is judged from two readings a few seconds apart
//! (a unit that restarted in between is not up), and what a check found,
//! for the journal, the report and the messages.

use serde::{Deserialize, Serialize};

use super::read::UnitState;
use super::{Unit, printable};

/// What one unit of the set is, on the system checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Active (running, listening, or a oneshot that exited and stays).
    Up,
    /// Started on demand (a socket, a bus, a path) and idle now, not failed.
    Idle,
    /// Inactive, and it did not fail: nothing started it at this boot.
    NotStarted,
    /// A Condition*= of the unit was not met here, so it was skipped.
    Condition,
    /// Failed, restarting, stuck starting or stopping: why.
    Failed(String),
    /// No unit of that name (removed or renamed).
    Missing,
    /// Nothing started it at boot; drydock did and it came up (the proof's
    /// second chance, never `judge`'s answer).
    StartedByDrydock,
}

/// Judge WANT from its reading BEFORE (if any) and AFTER, taken later.
pub fn judge(want: &Unit, before: Option<&UnitState>, after: &UnitState) -> Verdict {
    match after.load.as_str() {
        "not-found" => return Verdict::Missing,
        "masked" => return Verdict::Failed("masked (linked to /dev/null)".into()),
        "bad-setting" | "error" => {
            return Verdict::Failed(format!(
                "its unit file cannot be loaded ({})",
                printable(&after.load)
            ));
        }
        _ => {}
    }
    if let (Some(b), Some(a)) = (before.and_then(|b| b.restarts), after.restarts)
        && a > b
    {
        return Verdict::Failed(format!(
            "restarted {} time(s) while drydock watched it",
            a - b
        ));
    }
    match after.active.as_str() {
        "active" | "reloading" => Verdict::Up,
        "failed" => Verdict::Failed(format!("failed ({})", printable(&after.result))),
        "activating" if after.sub == "auto-restart" => {
            Verdict::Failed("restarting after it stopped (auto-restart)".into())
        }
        "activating" => Verdict::Failed("still starting".into()),
        "deactivating" => Verdict::Failed("stopping".into()),
        "inactive" if after.condition == "no" => Verdict::Condition,
        "inactive" if !after.result.is_empty() && after.result != "success" => {
            Verdict::Failed(format!("stopped ({})", printable(&after.result)))
        }
        "inactive" if want.on_demand || !after.triggered_by.is_empty() => Verdict::Idle,
        "inactive" => Verdict::NotStarted,
        other => Verdict::Failed(format!("in an unknown state ({})", printable(other))),
    }
}

/// A unit of the set that does not run, and what it said.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    pub unit: String,
    pub why: String,
    /// `systemctl status` and the unit's last journal lines (OpenRC:
    /// `rc-service status`), control characters escaped.
    pub lines: Vec<String>,
}

/// A unit of the set that no longer exists, and those of a similar name
/// that do (php8.2-fpm.service gone, php8.4-fpm.service there).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Missing {
    pub unit: String,
    pub similar: Vec<String>,
}

/// What a check of the set found on one system.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    /// Up: active, and not restarting while watched.
    pub up: Vec<String>,
    /// Nothing started them at boot; drydock did, and they came up (the
    /// service proof only). After the VPS's reboot they are not expected
    /// to run unless something starts them.
    #[serde(default)]
    pub started_by_drydock: Vec<String>,
    /// Started on demand, idle now, not failed.
    #[serde(default)]
    pub idle: Vec<String>,
    /// Units not proven, and why (a condition not met here, a scheduler
    /// the proof holds back).
    #[serde(default)]
    pub not_proven: Vec<(String, String)>,
    pub failed: Vec<Failure>,
    pub missing: Vec<Missing>,
    /// What init said once it settled (`is-system-running`: running,
    /// degraded; OpenRC: settled), or that it did not within the bound.
    pub settled: String,
    pub seconds: f64,
    /// Destinations the sealed network refused during the proof.
    #[serde(default)]
    pub refused: Vec<String>,
}

impl Outcome {
    /// The units that fail the check: failed or missing, and not accepted
    /// (`--accept-failed UNIT`).
    pub fn failures(&self, accepted: &[String]) -> Vec<String> {
        self.failed
            .iter()
            .map(|f| f.unit.clone())
            .chain(self.missing.iter().map(|m| m.unit.clone()))
            .filter(|u| !is_accepted(u, accepted))
            .collect()
    }

    /// "12 up, 1 failed, ...": for the step's closing line.
    pub fn summary(&self) -> String {
        let mut parts = vec![format!("{} up", self.up.len())];
        let mut add = |n: usize, what: &str| {
            if n > 0 {
                parts.push(format!("{n} {what}"));
            }
        };
        add(self.started_by_drydock.len(), "started by drydock");
        add(self.idle.len(), "idle until asked for");
        add(self.not_proven.len(), "not proven");
        add(self.failed.len(), "failed");
        add(self.missing.len(), "gone");
        parts.join(", ")
    }

    /// Each failed and missing unit with its evidence, ACCEPTED marked,
    /// for an error message or the report.
    pub fn failure_text(&self, accepted: &[String]) -> String {
        let mut s = String::new();
        for f in &self.failed {
            let mark = if is_accepted(&f.unit, accepted) {
                " (accepted: --accept-failed)"
            } else {
                ""
            };
            s.push_str(&format!("  {}: {}{mark}\n", f.unit, f.why));
            for l in &f.lines {
                s.push_str(&format!("    | {l}\n"));
            }
        }
        for m in &self.missing {
            let mark = if is_accepted(&m.unit, accepted) {
                " (accepted: --accept-failed)"
            } else {
                ""
            };
            let similar = if m.similar.is_empty() {
                "no unit of a similar name exists".to_string()
            } else {
                format!("a unit of a similar name exists: {}", m.similar.join(", "))
            };
            s.push_str(&format!(
                "  {}: no longer exists (removed or renamed by the upgrade); {similar}{mark}\n",
                m.unit
            ));
        }
        s
    }

    /// The lines a report shows of a check (WHERE: "on the upgraded copy"),
    /// the failures ACCEPTED marked.
    pub fn human(&self, where_: &str, accepted: &[String]) -> String {
        let mut s = format!(
            "services {where_}: {} ({:.0} s; init: {})\n",
            self.summary(),
            self.seconds,
            self.settled
        );
        if !self.up.is_empty() {
            let (system, own): (Vec<&String>, Vec<&String>) =
                self.up.iter().partition(|u| is_system_unit(u));
            let own: Vec<&str> = own.iter().map(|u| u.as_str()).collect();
            s.push_str(&format!(
                "  up: {}{}\n",
                own.join(" "),
                if system.is_empty() {
                    String::new()
                } else {
                    format!(
                        "{}and {} of the system's own (systemd-*, dbus, getty, ...)",
                        if own.is_empty() { "" } else { ", " },
                        system.len()
                    )
                }
            ));
        }
        if !self.started_by_drydock.is_empty() {
            s.push_str(&format!(
                "  nothing at boot starts these, drydock started them and they came up: {}\n",
                self.started_by_drydock.join(" ")
            ));
        }
        if !self.idle.is_empty() {
            s.push_str(&format!(
                "  idle until asked for (socket, bus or path activation), not failed: {}\n",
                self.idle.join(" ")
            ));
        }
        for (u, why) in &self.not_proven {
            s.push_str(&format!("  not proven: {u}: {why}\n"));
        }
        s.push_str(&self.failure_text(accepted));
        s
    }
}

/// The init system's own units, summed up in a report rather than listed.
fn is_system_unit(u: &str) -> bool {
    ["systemd-", "dbus.", "getty@", "serial-getty@", "modprobe@"]
        .iter()
        .any(|p| u.starts_with(p))
        || u == "kmod-static-nodes.service"
}

/// Whether UNIT is one of ACCEPTED, by its name or, for a service, its
/// name without ".service" (`--accept-failed nginx`).
pub fn is_accepted(unit: &str, accepted: &[String]) -> bool {
    accepted
        .iter()
        .any(|a| a == unit || unit.strip_suffix(".service") == Some(a.as_str()))
}

/// "php8.2-fpm.service" and "php8.4-fpm.service" share the stem
/// "php#-fpm.service": runs of digits (and the dots between them) become
/// one '#'.
pub fn stem(name: &str) -> String {
    let c: Vec<char> = name.chars().collect();
    let digit_at = |i: usize| c.get(i).is_some_and(|d| d.is_ascii_digit());
    let mut out = String::new();
    let mut i = 0;
    while i < c.len() {
        if digit_at(i) {
            // A dot stays in the run only when a digit follows it.
            while digit_at(i) || (c[i..].first() == Some(&'.') && digit_at(i + 1)) {
                i += 1;
            }
            out.push('#');
        } else {
            out.push(c[i]);
            i += 1;
        }
    }
    out
}

/// Among KNOWN, the names of a similar stem to NAME (itself excluded).
pub fn similar(name: &str, known: &[String]) -> Vec<String> {
    let s = stem(name);
    let mut v: Vec<String> = known
        .iter()
        .filter(|k| k.as_str() != name && stem(k) == s)
        .cloned()
        .collect();
    v.sort();
    v.dedup();
    v.truncate(5);
    v
}
