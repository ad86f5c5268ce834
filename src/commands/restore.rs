//! `drydock restore`.

use anyhow::Result;

use super::connect;
use crate::cli;
use crate::ui::Ui;
use crate::{backup, remote};

pub(crate) async fn restore(a: cli::RestoreArgs, ui: &Ui) -> Result<()> {
    let (_, accept_new) = a.conn.ssh_args()?;
    backup::store::reach_store_with(a.conn.ssh_config.clone(), accept_new);
    let (store, v) = backup::find(&a.id, a.store.as_deref(), a.key_file.as_deref())?;
    let s = connect(&a.conn).await?;
    let facts = remote::gather(&s).await?;
    let opts = backup::restore::RestoreOptions {
        device: a.device,
        transfer: a.transfer.into(),
        like: a.like,
        keep_network: a.keep_network,
        no_boot_proof: a.no_boot_proof,
        identity: a.conn.identity.clone(),
        memory_mib: a.memory.mib(),
        accept_failed: a.accept_failed,
    };
    let r = backup::restore::restore(&s, &facts, (&store, &v), &opts, ui).await?;
    ui.result("restore", &r, r.human())?;
    s.close().await;
    Ok(())
}
