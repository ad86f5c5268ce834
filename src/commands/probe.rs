//! `drydock probe`.

use anyhow::Result;

use super::connect;
use crate::cli;
use crate::ui::Ui;
use crate::{remote, services, vm};

/// `drydock probe`'s result: what the host runs, and the worker VM for it.
#[derive(serde::Serialize)]
pub(crate) struct Probe {
    #[serde(flatten)]
    report: remote::probe::ProbeReport,
    worker_vm: Option<vm::shape::Shape>,
    /// What the host runs: what `upgrade` proves on the upgraded copy.
    services: Option<services::ServiceSet>,
}

pub(crate) async fn probe(a: cli::ProbeArgs, ui: &Ui) -> Result<()> {
    let s = connect(&a.conn).await?;
    let facts = remote::gather(&s).await?;
    let report = remote::probe::report(s.host(), &facts);
    // The worker VM drydock builds for this host (`drydock boot --like`
    // reads it back): the VM layer's, added here so that the remote layer
    // does not depend on it.
    let worker_vm = facts
        .root_disk()
        .ok()
        .map(|d| vm::shape::Shape::from_facts(&facts, d.trim_start_matches("/dev/")));
    let set = services::gather(&s).await?;
    let mut lines: Vec<String> = worker_vm
        .iter()
        .flat_map(|w| {
            std::iter::once(format!("worker VM  {}", w.describe()))
                .chain(
                    w.disk_id
                        .iter()
                        .flat_map(|i| i.links.iter())
                        .filter(|(n, _)| n.starts_with("by-id/"))
                        .map(|(n, t)| format!("  disk id  {n} -> {t}")),
                )
                .chain(w.notes.iter().map(|n| format!("  note     {n}")))
        })
        .collect();
    if let Some(set) = &set {
        lines.push(format!("services   {}", set.describe()));
    }
    let human = report.human(&lines);
    ui.result(
        "probe",
        &Probe {
            report,
            worker_vm,
            services: set,
        },
        human,
    )?;
    s.close().await;
    Ok(())
}
