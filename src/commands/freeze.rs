//! `drydock freeze` and `drydock thaw`.

use anyhow::Result;

use super::connect;
use crate::cli;
use crate::remote;
use crate::ui::Ui;

pub(crate) async fn freeze(a: cli::FreezeArgs, ui: &Ui) -> Result<()> {
    let s = connect(&a.conn).await?;
    let facts = remote::gather(&s).await?;
    ui.confirm(&format!(
        "Stop the services of {} and make its disk read-only?",
        s.host()
    ))
    .await?;
    let r = remote::freeze::freeze(&s, &facts, a.device.as_deref()).await?;
    ui.result("freeze", &r, r.human(&s.target.typed_arg()))?;
    s.close().await;
    Ok(())
}

pub(crate) async fn thaw(a: cli::ThawArgs, ui: &Ui) -> Result<()> {
    let s = connect(&a.conn).await?;
    let facts = remote::gather(&s).await?;
    let r = remote::freeze::thaw(&s, &facts, a.device.as_deref()).await?;
    ui.result("thaw", &r, format!("{}\n", r.human()))?;
    s.close().await;
    Ok(())
}
