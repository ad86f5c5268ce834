//! `drydock backup` and `drydock backups` (list, prune).

use anyhow::Result;

use super::connect;
use crate::cli;
use crate::errors::usage;
use crate::ui::Ui;
use crate::{backup, paths, remote, ui};

pub(crate) async fn backup_cmd(a: cli::BackupArgs, ui: &Ui) -> Result<()> {
    let s = connect(&a.conn).await?;
    let facts = remote::gather(&s).await?;
    let store = match a.store {
        Some(d) => d,
        None => backup::default_store(&s.host())?,
    };
    let opts = backup::take::BackupOptions {
        store,
        key: a.key_file,
        device: a.device,
        freeze: a.freeze,
        transfer: a.transfer.into(),
    };
    let r = backup::take::backup(&s, &facts, &opts, ui).await?;
    ui.result("backup", &r, r.human())?;
    s.close().await;
    Ok(())
}

pub(crate) fn backups_list(
    dir: Option<&std::path::Path>,
    key: Option<&std::path::Path>,
    ui: &Ui,
) -> Result<()> {
    let stores = backup::stores(dir, key)?;
    if stores.is_empty() {
        let root = paths::backups_dir()?;
        ui.result(
            "backups",
            &serde_json::json!({ "stores": [] }),
            format!(
                "no backup stores in {}; `drydock backup HOST` makes one
",
                root.display()
            ),
        )?;
        return Ok(());
    }
    let mut all = Vec::new();
    let mut human = String::new();
    for s in &stores {
        let (rows, figures) = backup::list(s)?;
        human.push_str(&backup::human_list(&rows, &figures));
        all.push(serde_json::json!({ "store": figures, "versions": rows }));
    }
    ui.result("backups", &serde_json::json!({ "stores": all }), human)
}

pub(crate) fn backups_prune(
    (dir, key): (Option<&std::path::Path>, Option<&std::path::Path>),
    keep: u64,
    ui: &Ui,
) -> Result<()> {
    let stores = backup::stores(dir, key)?;
    let [store] = &stores[..] else {
        return Err(usage!(
            "prune works on one store: say which with --store DIR ({} stores under {})",
            stores.len(),
            paths::backups_dir()?.display()
        ));
    };
    let _lock = store.lock()?;
    let (gone, freed) = store.prune(keep as usize)?;
    let kept: Vec<String> = store.versions()?.into_iter().map(|v| v.id).collect();
    let human = format!(
        "{}: removed {} version(s){}, freed {}; kept {}\n",
        store.dir.display(),
        gone.len(),
        if gone.is_empty() {
            String::new()
        } else {
            format!(" ({})", gone.join(", "))
        },
        ui::human_bytes(freed),
        kept.join(", ")
    );
    ui.result(
        "backups-prune",
        &serde_json::json!({ "store": store.dir, "removed": gone, "kept": kept, "freed_bytes": freed }),
        human,
    )
}
