//! `drydock push`.

use anyhow::Result;

use super::connect;
use crate::cli;
use crate::ui::Ui;
use crate::{remote, transfer};

pub(crate) async fn push(a: cli::PushArgs, ui: &Ui) -> Result<()> {
    if !a.image.exists() && std::path::Path::new(&a.conn.host).is_file() {
        return Err(crate::errors::usage!(
            "IMAGE and HOST are the other way round: {} is not a file and '{}' is; \
             `drydock push IMAGE HOST`",
            a.image.display(),
            a.conn.host
        ));
    }
    if let Some(dir) = &a.packages
        && !dir.is_dir()
    {
        return Err(crate::errors::usage!(
            "--packages {}: not a folder; give the folder of package files an upgrade \
             downloaded (a run's downloads/)",
            dir.display()
        ));
    }
    let s = connect(&a.conn).await?;
    let facts = remote::gather(&s).await?;
    let opts = transfer::push::PushOptions {
        image: a.image,
        device: a.device,
        full: a.full,
        frozen_boot_id: None,
        transfer: a.transfer.into(),
        base_image: None,
        packages: a.packages,
    };
    let r = transfer::push::push(&s, &facts, &opts, ui).await?;
    ui.result("push", &r, r.human())?;
    s.close().await;
    Ok(())
}
