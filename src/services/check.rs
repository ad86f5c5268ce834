//! Checking the set on a booted system over SSH: wait (bounded) for init
//! to settle, read every unit twice a few seconds apart, judge, start what
//! nothing started at boot (the proof only), and collect what each failed
//! unit said. The same steps on the VPS after its reboot and in a sealed
//! VM; only the options differ.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Result;

use super::judge::{self, Failure, Missing, Outcome, Verdict};
use super::read::{self, UnitState};
use super::{Init, ServiceSet, printable};
use crate::ssh::{Session, shell_quote};

/// How a check goes.
#[derive(Debug, Clone)]
pub struct Options {
    /// The service proof: units that nothing started at boot are started
    /// by drydock and judged again (on the VPS, nothing is started).
    pub start_idle: bool,
    /// Units held back on purpose (the proof's schedulers): not judged.
    pub held: Vec<String>,
    /// Units the proof found that nothing starts at boot: on the VPS after
    /// its reboot, their not running is said, not a failure.
    pub not_at_boot: Vec<String>,
    /// How long init may take to settle.
    pub settle: Duration,
    /// Between the two readings.
    pub window: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            start_idle: false,
            held: Vec::new(),
            not_at_boot: Vec::new(),
            settle: Duration::from_secs(600),
            window: Duration::from_secs(10),
        }
    }
}

/// What a unit that is still starting may take after init settled.
const STILL_STARTING: Duration = Duration::from_secs(120);
/// A unit drydock starts itself, at most.
const START_LIMIT: u64 = 150;

/// Wait for init to settle, at most SETTLE: systemd's `is-system-running
/// --wait` (running, degraded, or what it says at the bound), OpenRC's
/// `openrc` processes gone.
async fn settle(s: &Session, init: Init, bound: Duration) -> Result<String> {
    let secs = bound.as_secs().max(1);
    let script = match init {
        Init::Systemd => format!(
            "timeout {secs} systemctl is-system-running --wait 2>/dev/null || \
             {{ r=$?; [ $r = 124 ] && echo \"not settled after {secs} s: $(systemctl is-system-running 2>/dev/null)\"; }}; true"
        ),
        Init::Openrc => format!(
            r#"n=0
while [ $n -lt {secs} ]; do
  busy=0
  for p in /proc/[0-9]*; do [ "$(cat "$p/comm" 2>/dev/null)" = openrc ] && busy=1 && break; done
  [ $busy = 0 ] && {{ echo settled; exit 0; }}
  n=$((n + 2)); sleep 2
done
echo "not settled after {secs} s (openrc still running)""#
        ),
    };
    let out = tokio::time::timeout(bound + Duration::from_secs(60), s.exec(&script))
        .await
        .map_err(|_| anyhow::anyhow!("init did not answer within {} s", secs + 60))??;
    let said = printable(out.stdout_str().trim());
    Ok(said.lines().last().unwrap_or("unknown").to_string())
}

async fn read_units(
    s: &Session,
    init: Init,
    names: &[String],
) -> Result<BTreeMap<String, UnitState>> {
    let out = tokio::time::timeout(
        Duration::from_secs(180),
        s.exec(&read::units_script(init, names)),
    )
    .await
    .map_err(|_| anyhow::anyhow!("reading the units' states took over 3 minutes"))??;
    Ok(read::parse_units(&out.stdout_str()))
}

/// What a failed unit said: its status and last journal lines (OpenRC:
/// its status), at most 30 lines of at most 300 characters, escaped.
async fn evidence(s: &Session, init: Init, unit: &str) -> Vec<String> {
    let q = shell_quote(unit);
    let script = match init {
        Init::Systemd => format!(
            "export LC_ALL=C SYSTEMD_PAGER=; systemctl status --no-pager -l -n 0 -- {q} 2>&1 | head -n 10; \
             journalctl -b -u {q} --no-pager -n 20 -o short-precise 2>&1 | tail -n 20"
        ),
        Init::Openrc => format!(
            "rc-service {q} status 2>&1 | head -n 10; \
             grep -h -- {q} /var/log/messages 2>/dev/null | tail -n 20"
        ),
    };
    let text = match tokio::time::timeout(Duration::from_secs(60), s.exec(&script)).await {
        Ok(Ok(o)) => o.stdout_str(),
        _ => return vec!["(its status could not be read)".into()],
    };
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .take(30)
        .map(|l| printable(&l.chars().take(300).collect::<String>()))
        .collect()
}

/// Check SET on the system behind S (WHERE names it in messages).
pub async fn check(s: &Session, set: &ServiceSet, opts: &Options) -> Result<Outcome> {
    let t0 = Instant::now();
    let mut out = Outcome {
        settled: settle(s, set.init, opts.settle).await?,
        ..Outcome::default()
    };
    let wanted: Vec<&super::Unit> = set
        .units
        .iter()
        .filter(|u| {
            if opts.held.contains(&u.name) {
                out.not_proven.push((
                    u.name.clone(),
                    "held back in the proof: a scheduler runs jobs (checked on the VPS after its reboot)".into(),
                ));
                false
            } else {
                true
            }
        })
        .collect();
    let names: Vec<String> = wanted.iter().map(|u| u.name.clone()).collect();
    let first = read_units(s, set.init, &names).await?;
    tokio::time::sleep(opts.window).await;
    let mut second = read_units(s, set.init, &names).await?;
    // Units still starting get a while longer, all together.
    let until = Instant::now() + STILL_STARTING;
    while Instant::now() < until
        && second
            .values()
            .any(|u| u.active == "activating" && u.sub != "auto-restart")
    {
        tokio::time::sleep(Duration::from_secs(10)).await;
        second = read_units(s, set.init, &names).await?;
    }
    let mut verdicts: Vec<(&super::Unit, Verdict)> = wanted
        .iter()
        .map(|u| {
            let v = match second.get(&u.name) {
                Some(after) => judge::judge(u, first.get(&u.name), after),
                None => Verdict::Failed("drydock could not read its state".into()),
            };
            (*u, v)
        })
        .collect();
    if opts.start_idle {
        start_not_started(s, set.init, &mut verdicts).await?;
    }
    record(s, set.init, verdicts, opts, &mut out).await;
    out.seconds = t0.elapsed().as_secs_f64();
    Ok(out)
}

/// Each verdict into OUT, with the evidence of what failed (its status and
/// journal lines) and, for a unit that is gone, those of a similar name.
async fn record(
    s: &Session,
    init: Init,
    verdicts: Vec<(&super::Unit, Verdict)>,
    opts: &Options,
    out: &mut Outcome,
) {
    let mut known: Option<Vec<String>> = None;
    for (u, v) in verdicts {
        match v {
            Verdict::Up => out.up.push(u.name.clone()),
            Verdict::StartedByDrydock => out.started_by_drydock.push(u.name.clone()),
            Verdict::Idle => out.idle.push(u.name.clone()),
            Verdict::Condition => out.not_proven.push((
                u.name.clone(),
                "its condition (Condition*=) is not met here, so it did not start".into(),
            )),
            Verdict::NotStarted if opts.not_at_boot.contains(&u.name) => out.not_proven.push((
                u.name.clone(),
                "not running: nothing starts it at boot (the service proof found it so too)".into(),
            )),
            Verdict::NotStarted => out.failed.push(Failure {
                unit: u.name.clone(),
                why: "not running: nothing started it at boot".into(),
                lines: evidence(s, init, &u.name).await,
            }),
            Verdict::Failed(why) => out.failed.push(Failure {
                unit: u.name.clone(),
                why,
                lines: evidence(s, init, &u.name).await,
            }),
            // The init system's own units come and go with its releases
            // (Debian 13's systemd has no systemd-fsckd.socket, no
            // systemd-update-utmp.service): gone is not a failure of the
            // server. Those that are there are checked like any other.
            Verdict::Missing if u.name.starts_with("systemd-") => out.not_proven.push((
                u.name.clone(),
                "systemd's own unit, gone with the systemd this system now has".into(),
            )),
            Verdict::Missing => {
                if known.is_none() {
                    let names = s
                        .exec(read::names_script(init))
                        .await
                        .map(|o| o.stdout_str())
                        .unwrap_or_default();
                    known = Some(
                        names
                            .lines()
                            .map(str::trim)
                            .filter(|n| read::valid_name(n))
                            .map(str::to_string)
                            .collect(),
                    );
                }
                out.missing.push(Missing {
                    unit: u.name.clone(),
                    similar: judge::similar(&u.name, known.as_deref().unwrap_or(&[])),
                });
            }
        }
    }
}

/// The proof's second chance: each unit nothing started at boot is
/// started (bounded), read again after a few seconds and judged again;
/// those that come up are `started_by_drydock`.
async fn start_not_started(
    s: &Session,
    init: Init,
    verdicts: &mut [(&super::Unit, Verdict)],
) -> Result<()> {
    let idle: Vec<String> = verdicts
        .iter()
        .filter(|(_, v)| *v == Verdict::NotStarted)
        .map(|(u, _)| u.name.clone())
        .collect();
    if idle.is_empty() {
        return Ok(());
    }
    for u in &idle {
        let q = shell_quote(u);
        let cmd = match init {
            Init::Systemd => format!("timeout {START_LIMIT} systemctl start -- {q} 2>&1; true"),
            Init::Openrc => format!("timeout {START_LIMIT} rc-service {q} start 2>&1; true"),
        };
        let _ = tokio::time::timeout(Duration::from_secs(START_LIMIT + 30), s.exec(&cmd)).await;
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    let again = read_units(s, init, &idle).await?;
    for (u, v) in verdicts.iter_mut() {
        if *v != Verdict::NotStarted {
            continue;
        }
        *v = match again.get(&u.name).map(|a| judge::judge(u, None, a)) {
            Some(Verdict::Up) => Verdict::StartedByDrydock,
            Some(Verdict::NotStarted) | Some(Verdict::Idle) => Verdict::Failed(
                "nothing started it at boot, and it did not stay up when drydock started it".into(),
            ),
            Some(other) => other,
            None => Verdict::Failed("drydock could not read its state".into()),
        };
    }
    Ok(())
}
