//! `drydock runs` and `drydock runs rm`.

use anyhow::{Context, Result};

use crate::errors::refused;
use crate::ui::Ui;
use crate::{paths, pipeline, ui};

pub(crate) fn runs(size: bool, ui: &Ui) -> Result<()> {
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
pub(crate) fn disk_usage(dir: &std::path::Path) -> u64 {
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
pub(crate) fn runs_rm(name: &str, force: bool, ui: &Ui) -> Result<()> {
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
