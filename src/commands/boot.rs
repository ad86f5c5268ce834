//! `drydock boot`.

use anyhow::Result;

use crate::cli;
use crate::ui::Ui;
use crate::{backup, vm};

pub(crate) async fn boot(a: cli::BootArgs, ui: &Ui) -> Result<()> {
    // A backup version's id: laid out as an image, booted with its host's
    // shape (unless --like says otherwise); an encrypted store's key from
    // DRYDOCK_KEY_FILE.
    let (image, like) = if !a.image.exists()
        && let Some(id) = a.image.to_str().filter(|s| !s.contains('/'))
        && let Ok((store, v)) = backup::find(
            id,
            None,
            std::env::var_os("DRYDOCK_KEY_FILE")
                .as_deref()
                .map(std::path::Path::new),
        ) {
        let image = backup::proof::laid_out(&store, &v, ui)?;
        let like = match (a.like, &v.shape) {
            (Some(l), _) => Some(l),
            (None, Some(shape)) => {
                let p = std::path::PathBuf::from(format!("{}.like.json", image.display()));
                std::fs::write(&p, serde_json::to_string_pretty(shape)?)?;
                Some(p)
            }
            (None, None) => None,
        };
        ui.say(format!(
            "version {id} of {} laid out as {}",
            store.location(),
            image.display()
        ));
        (image, like)
    } else {
        (a.image, a.like)
    };
    let dir = match a.dir {
        Some(d) => d,
        None => vm::boot::default_dir(&image)?,
    };
    let opts = vm::boot::BootOptions {
        image,
        memory: a.memory,
        cpus: a.cpus,
        dir,
        ready_within: std::time::Duration::from_secs(a.wait),
        like,
        services: a.services,
        network_open: a.network == cli::Network::Open,
    };
    vm::boot::boot(&opts, ui).await
}
