//! `drydock verify`.

use anyhow::Result;

use crate::backup;
use crate::cli;
use crate::ui::Ui;

pub(crate) async fn verify(a: cli::VerifyArgs, ui: &Ui) -> Result<()> {
    let (store, v) = backup::find(&a.id, a.store.as_deref(), a.key_file.as_deref())?;
    let bar = ui.bytes_bar(v.manifest.size, "verify");
    let r = store.verify(&v, |n| bar.inc(n))?;
    bar.finish();
    let human = format!(
        "version {} in {}: all {} blocks read back and match their hashes; digest {}\n",
        r.id,
        store.location(),
        r.blocks,
        r.digest
    );
    if !a.boot {
        return ui.result("verify", &r, human);
    }
    ui.say(human.trim_end().to_string());
    let memory_mib = a.memory.mib();
    let proof = backup::proof::verify_boot(
        &store,
        &v,
        a.identity.as_deref(),
        memory_mib,
        &a.accept_failed,
        ui,
    )
    .await?;
    ui.result(
        "verify",
        &serde_json::json!({ "blocks": r, "boot": proof }),
        proof.human(),
    )
}
