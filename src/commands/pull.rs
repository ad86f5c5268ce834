//! `drydock pull`.

use anyhow::Result;

use super::{connect, record_boot};
use crate::cli;
use crate::errors::refused;
use crate::ui::Ui;
use crate::{remote, transfer};

pub(crate) async fn pull(a: cli::PullArgs, ui: &Ui) -> Result<()> {
    let update = a.update;
    if update {
        if !transfer::pull::precopy::can_start_from(&a.output) {
            return Err(crate::errors::usage!(
                "--update: {} is not a finished pull (no image with its manifest beside it); \
                 pull without --update first",
                a.output.display()
            ));
        }
        if a.transfer == cli::Transfer::Dd {
            return Err(crate::errors::usage!(
                "--update needs drydock's helper on the host, and --transfer dd was asked for: \
                 drop one of the two"
            ));
        }
    } else {
        transfer::check_output(&a.output)?;
    }
    let s = connect(&a.conn).await?;
    let facts = remote::gather(&s).await?;
    let opts = transfer::pull::PullOptions {
        output: a.output,
        device: a.device,
        live: a.live,
        transfer: a.transfer.into(),
    };
    let r = if update {
        transfer::pull::precopy::precopy(&s, &facts, &opts, ui)
            .await?
            .map_err(|why| {
                refused!(
                    "--update: {why}; nothing was changed. Pull the whole disk into another \
                     --output"
                )
            })?
    } else {
        transfer::pull::pull(&s, &facts, &opts, ui).await?
    };
    if r.device.starts_with("/dev/") {
        record_boot(&s, &facts, &opts.output, ui).await;
    }
    ui.result("pull", &r, r.human())?;
    s.close().await;
    Ok(())
}
