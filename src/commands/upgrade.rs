//! `drydock upgrade`, `rehearse`, and the report `resume` prints too.

use anyhow::Result;

use super::default_cpus;
use crate::cli;
use crate::ui::Ui;
use crate::{errors, pipeline};

/// `upgrade`, or with REHEARSAL `rehearse` (the same run, live and not
/// pushed).
pub(crate) async fn upgrade(a: cli::UpgradeArgs, rehearsal: bool, ui: &Ui) -> Result<()> {
    let memory_mib = a.memory.mib();
    let (ssh, accept_new_host_key) = a.conn.ssh_args()?;
    let req = pipeline::Request {
        host: a.conn.host,
        ssh,
        identity: a.conn.identity,
        accept_new_host_key,
        device: a.device,
        to: a.to,
        run: a.run,
        memory_mib,
        cpus: a.cpus.unwrap_or_else(default_cpus),
        transfer: a.transfer.into(),
        gc: a.gc,
        network_open: a.network == cli::Network::Open,
        allow_hosts: a.allow_host,
        rehearsal,
        no_rehearsal: a.no_rehearsal,
        no_carry: a.no_carry,
        no_service_proof: a.services.no_service_proof,
        accept_failed: a.services.accept_failed,
        rollback_on_failure: a.services.rollback_on_failure,
    };
    if a.dry_run {
        let d = tokio::select! {
            biased;
            d = pipeline::dry_run(&req) => d?,
            sig = ui.interrupted() => return Err(errors::Interrupted(format!("{}; a dry run changes nothing", Ui::interrupted_text(sig))).into()),
        };
        return ui.result("upgrade", &d, d.human());
    }
    let r = pipeline::start(&req, ui).await?;
    print_report(&r, ui)
}

pub(crate) fn print_report(r: &pipeline::Report, ui: &Ui) -> Result<()> {
    ui.result(
        if r.rehearsal { "rehearse" } else { "upgrade" },
        r,
        r.human(),
    )
}
