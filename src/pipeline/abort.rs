//! `drydock abort RUN`: give the VPS back as it was before the freeze,
//! pushing the base image back first if a push had begun.

use std::path::Path;

use anyhow::Result;

use super::journal::{Journal, State, Step};
use super::steps::reboot_vps;
use super::{connect, connect_gathered};
use crate::image::manifest::{Manifest, hash_image};
use crate::refused;
use crate::remote::{self, freeze};
use crate::transfer::push;
use crate::ui::Ui;

/// `drydock abort RUN`: give the VPS back as it was before the freeze.
pub async fn abort(dir: &Path, ui: &Ui) -> Result<()> {
    let mut j = Journal::load(dir)?;
    match j.state {
        State::Done => {
            return Err(refused!(
                "the run {} is done: the VPS runs the pushed image; to go back, push {} with `drydock push --full`",
                dir.display(),
                dir.join("base.raw").display()
            ));
        }
        State::Aborted => return Err(refused!("the run {} is already aborted", dir.display())),
        State::Running => {}
    }
    if j.is_done(Step::Reboot) {
        return Err(refused!(
            "the VPS already rebooted on the pushed image; to go back, push {} with `drydock push --full`",
            dir.join("base.raw").display()
        ));
    }
    if j.frozen_boot_id.is_none() {
        ui.say("the VPS was never frozen: nothing to give back");
    } else if j.push_started {
        rollback_push(dir, &mut j, ui).await?;
    } else {
        let s = connect(&j, false).await?;
        let facts = remote::gather(&s).await?;
        if j.frozen_boot_id.as_deref() == Some(facts.boot_id.as_str()) {
            let r = freeze::thaw(&s, &facts, j.device.as_deref()).await?;
            ui.say(r.human());
        } else {
            ui.say(format!(
                "{} rebooted since the freeze: it is running normally",
                s.host()
            ));
        }
        s.close().await;
    }
    j.state = State::Aborted;
    j.save(dir)
}

/// After a partial push: push the base image back (the disk holds, block
/// by block, either the base or the upgraded image), then reboot.
pub(super) async fn rollback_push(dir: &Path, j: &mut Journal, ui: &Ui) -> Result<()> {
    let upgraded = dir.join("upgraded.raw");
    let rollback = dir.join("rollback.raw");
    if !rollback.exists() {
        // Same content as the base, read-only use: a hard link, no copy.
        std::fs::hard_link(dir.join("base.raw"), &rollback)?;
    }
    let m = Manifest::path_for(&rollback);
    if !m.exists() {
        hash_image(&upgraded, |_| {})?.save(&m)?;
    }
    let (s, facts) = connect_gathered(j).await?;
    ui.say("the push had started: pushing the base image back");
    push::push(
        &s,
        &facts,
        &push::PushOptions {
            image: rollback,
            device: j.device.clone(),
            full: false,
            // Partly written: only its hashes can say which blocks are which.
            frozen_boot_id: None,
            transfer: j.transfer,
            // What the disk may hold besides the base: the upgraded image.
            base_image: Some(upgraded.clone()),
            packages: None,
        },
        ui,
    )
    .await?;
    s.close().await;
    reboot_vps(j).await?;
    ui.say("the VPS is back on its disk as it was before the run");
    Ok(())
}
