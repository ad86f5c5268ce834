//! `drydock backup` and `drydock backups` (list, forget, prune).

use anyhow::Result;

use super::connect;
use crate::cli;
use crate::errors::usage;
use crate::ui::Ui;
use crate::{backup, paths, remote, ui};

pub(crate) async fn backup_cmd(a: cli::BackupArgs, ui: &Ui) -> Result<()> {
    let (_, accept_new) = a.conn.ssh_args()?;
    backup::store::reach_store_with(a.conn.ssh_config.clone(), accept_new);
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

/// `backups forget` (and `prune --keep N`, its --keep-last): the versions
/// kept and why, the ones removed, the bytes freed (that would be, with
/// DRY_RUN). Over 80 lines: its refusals, then one table both as text and
/// as JSON.
pub(crate) fn backups_forget(
    (dir, key): (Option<&std::path::Path>, Option<&std::path::Path>),
    keep: backup::forget::Keep,
    dry_run: bool,
    ui: &Ui,
) -> Result<()> {
    if keep.is_empty() {
        return Err(usage!(
            "forget needs at least one --keep-* rule (--keep-last, --keep-hourly, --keep-daily, \
             --keep-weekly, --keep-monthly, --keep-yearly): with none it would remove every \
             version. Nothing was removed"
        ));
    }
    let stores = backup::stores(dir, key)?;
    let [store] = &stores[..] else {
        return Err(usage!(
            "forget works on one store: say which with --store DIR ({} stores under {})",
            stores.len(),
            paths::backups_dir()?.display()
        ));
    };
    let _lock = store.lock()?;
    let versions: Vec<(String, String)> = store
        .versions()?
        .into_iter()
        .map(|v| (v.id, v.created))
        .collect();
    let decisions = backup::forget::decide(&versions, &keep)?;
    let gone: std::collections::BTreeSet<String> = decisions
        .iter()
        .filter(|d| !d.keep)
        .map(|d| d.id.clone())
        .collect();
    let freed = store.forget(&gone, dry_run)?;
    let mut human = format!(
        "{}{}\n",
        store.location(),
        if dry_run {
            " (dry run: nothing removed)"
        } else {
            ""
        }
    );
    for d in &decisions {
        human.push_str(&format!(
            "  {:<6} {:<17} {:<20} {}\n",
            match (d.keep, dry_run) {
                (true, _) => "keep",
                (false, true) => "would remove",
                (false, false) => "remove",
            },
            d.id,
            backup::shown_time(&d.created),
            d.reasons.join(", ")
        ));
    }
    human.push_str(&format!(
        "  {} version(s) kept, {} {}; {} {}\n",
        decisions.len() - gone.len(),
        gone.len(),
        if dry_run {
            "would be removed"
        } else {
            "removed"
        },
        ui::human_bytes(freed),
        if dry_run { "would be freed" } else { "freed" },
    ));
    let kept: Vec<&String> = decisions.iter().filter(|d| d.keep).map(|d| &d.id).collect();
    ui.result(
        "backups-forget",
        &serde_json::json!({
            "store": store.location(),
            "dry_run": dry_run,
            "decisions": decisions,
            "removed": gone,
            "kept": kept,
            "freed_bytes": freed,
        }),
        human,
    )
}
