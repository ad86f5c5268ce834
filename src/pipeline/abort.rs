//! `drydock abort RUN`: give the VPS back as it was before the freeze,
//! pushing the base image back first if a push had begun; after the VPS
//! rebooted on the upgraded disk and failed its check, freezing it, keeping
//! its disk as it is then, and pushing the base image back.

use std::path::Path;

use anyhow::Result;
use serde::{Deserialize, Serialize};

use super::journal::{Journal, State, Step};
use super::steps::reboot_vps;
use super::{connect, connect_gathered};
use crate::errors::refused;
use crate::image::manifest::{Manifest, hash_image};
use crate::remote::{self, device, freeze};
use crate::transfer::{pull, push};
use crate::ui::Ui;

/// How far the rollback after a failed check got (it can be cut anywhere
/// and run again).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Rollback {
    /// The boot of the VPS that the rollback froze.
    pub frozen_boot_id: Option<String>,
    /// The VPS's disk, as it was after the upgrade and what it wrote since,
    /// is in `upgraded.raw`: pushing the base may begin.
    pub saved: bool,
    /// The base image's push began.
    pub pushing: bool,
    /// ... and ended: what is left is the reboot and the check.
    pub pushed: bool,
    /// What the VPS ran after it came back on its old disk.
    pub os: Option<String>,
    pub services: Option<crate::services::Outcome>,
}

/// `drydock abort RUN`: give the VPS back as it was before the freeze.
pub async fn abort(dir: &Path, ui: &Ui) -> Result<()> {
    let mut j = Journal::load(dir)?;
    match j.state {
        State::Done => {
            return Err(refused!(
                "the run {} is done: the VPS runs the pushed image; to go back, push {} with `drydock push --full`",
                dir.display(),
                super::rundir::base(dir).display()
            ));
        }
        State::Aborted => return Err(refused!("the run {} is already aborted", dir.display())),
        State::Running => {}
    }
    if j.is_done(Step::Reboot) && !j.is_done(Step::Check) {
        let said = rollback_after_reboot(dir, &mut j, ui).await?;
        ui.say(said);
        j.state = State::Aborted;
        return j.save(dir);
    }
    if j.is_done(Step::Reboot) {
        return Err(refused!(
            "the VPS already rebooted on the pushed image; to go back, push {} with `drydock push --full`",
            super::rundir::base(dir).display()
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
    let upgraded = super::rundir::upgraded(dir);
    let rollback = super::rundir::rollback(dir);
    if !rollback.exists() {
        // Same content as the base, read-only use: a hard link, no copy.
        std::fs::hard_link(super::rundir::base(dir), &rollback)?;
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

/// After the VPS rebooted on the upgraded disk and failed its check: freeze
/// it (recorded first), keep its disk as it is now in `upgraded.raw` (a
/// pre-copy: only what differs crosses), push the base image back, reboot,
/// and check its release and services. Each part is recorded: a cut
/// rollback runs again from where it was. Says what it did.
pub(super) async fn rollback_after_reboot(dir: &Path, j: &mut Journal, ui: &Ui) -> Result<String> {
    let e = match rollback_steps(dir, j, ui).await {
        Ok(said) => return Ok(said),
        Err(e) => e,
    };
    let rb = j.services.rollback.clone().unwrap_or_default();
    if rb.frozen_boot_id.is_none() || rb.pushed {
        // Nothing changed yet, or the old disk is back (its reboot or check
        // failed): the error says all.
        return Err(e);
    }
    let run = dir.display();
    let how = if rb.pushing {
        format!(
            "the push of the base image had begun: {}'s disk is part the upgraded one, part the \
             old one, and it stays frozen; `drydock abort {run}` continues the rollback",
            j.host
        )
    } else {
        format!(
            "{} is frozen (its services stopped, its disk read-only and unchanged); `drydock \
             abort {run}` continues the rollback, `drydock thaw {}` instead gives it back \
             running the upgraded disk",
            j.host, j.host
        )
    };
    let msg = format!("the rollback stopped: {how}");
    // Something changed: never "refused, nothing changed" (exit 3).
    if crate::errors::exit_code(&e) == crate::errors::EXIT_REFUSED {
        Err(anyhow::anyhow!("{e:#}").context(msg))
    } else {
        Err(e.context(msg))
    }
}

async fn rollback_steps(dir: &Path, j: &mut Journal, ui: &Ui) -> Result<String> {
    let (s, mut facts) = connect_gathered(j).await?;
    let mut rb = j.services.rollback.clone().unwrap_or_default();
    let same_boot = rb.frozen_boot_id.as_deref() == Some(facts.boot_id.as_str());
    if rb.pushing && !rb.pushed && !same_boot {
        return Err(refused!(
            "{} rebooted while the base image was being pushed back, so its disk is part the \
             upgraded one, part the old one; drydock will not write to it while it runs from \
             it. Boot it into a rescue system and push {} whole (`drydock push --full`)",
            s.host(),
            super::rundir::base(dir).display()
        ));
    }
    let upgraded = super::rundir::upgraded(dir);
    let rollback = super::rundir::rollback(dir);
    if !rb.pushing {
        if !same_boot {
            // A new boot wrote more since any earlier attempt's copy.
            rb.saved = false;
        }
        let dev = device::inspect(&s, &facts, j.device.as_deref()).await?;
        if !(same_boot && dev.rw_mounts().is_empty()) {
            freeze_for_rollback(dir, j, &mut rb, (&s, &facts, &dev.path), ui).await?;
            // What the copy and the push check: the mounts as they are now.
            facts = remote::gather(&s).await?;
        }
        if !rb.saved {
            save_disk(&s, &facts, j, &upgraded, ui).await?;
            rb.saved = true;
            j.services.rollback = Some(rb.clone());
            j.save(dir)?;
        }
        // The disk holds what `upgraded.raw` holds: its manifest is the disk's.
        if !rollback.exists() {
            std::fs::hard_link(super::rundir::base(dir), &rollback)?;
        }
        std::fs::copy(Manifest::path_for(&upgraded), Manifest::path_for(&rollback))?;
        rb.pushing = true;
        j.services.rollback = Some(rb.clone());
        j.save(dir)?;
    }
    if !rb.pushed {
        ui.say("pushing the base image back");
        push::push(
            &s,
            &facts,
            &push::PushOptions {
                image: rollback,
                device: j.device.clone(),
                full: false,
                // After a cut push, only the hashes can say which blocks are which.
                frozen_boot_id: None,
                transfer: j.transfer,
                base_image: Some(upgraded),
                packages: None,
            },
            ui,
        )
        .await?;
        rb.pushed = true;
        j.services.rollback = Some(rb.clone());
        j.save(dir)?;
    }
    s.close().await;
    j.frozen_boot_id = rb.frozen_boot_id.clone();
    reboot_vps(j).await?;
    let said = back_on_the_old_disk(j, &mut rb).await?;
    j.services.rollback = Some(rb);
    j.save(dir)?;
    Ok(said)
}

/// After the rollback's reboot: what the VPS runs, and its services.
async fn back_on_the_old_disk(j: &Journal, rb: &mut Rollback) -> Result<String> {
    let s = connect(j, false).await?;
    let os = remote::gather(&s).await?.pretty_name();
    let mut said = format!(
        "{} is back on its old disk, running {}",
        j.host,
        crate::services::printable(&os)
    );
    if j.os_before.as_deref() != Some(os.as_str()) {
        said.push_str(&format!(
            " (before the run it said {})",
            crate::services::printable(j.os_before.as_deref().unwrap_or("?"))
        ));
    }
    if let Some(set) = j.services.set.clone().filter(|s| !s.is_empty()) {
        let opts = crate::services::check::Options {
            not_at_boot: j.services.not_at_boot(),
            ..Default::default()
        };
        let o = crate::services::check::check(&s, &set, &opts).await?;
        said.push_str(&format!("; its services: {}", o.summary()));
        let failures = o.failures(&[]);
        if !failures.is_empty() {
            said.push_str(&format!(
                "; NOT running: {}\n{}",
                failures.join(" "),
                o.failure_text(&[]).trim_end()
            ));
        }
        rb.services = Some(o);
    }
    s.close().await;
    rb.os = Some(os);
    Ok(said)
}

/// The rollback's freeze, asked first and recorded before anything stops
/// (a freeze that refused, and undid itself, is unrecorded again).
async fn freeze_for_rollback(
    dir: &Path,
    j: &mut Journal,
    rb: &mut Rollback,
    (s, facts, dev): (&crate::ssh::Session, &remote::Facts, &str),
    ui: &Ui,
) -> Result<()> {
    ui.confirm(&format!(
        "Give {} its old disk back: stop its services, keep its disk as it is now in {}, push \
         the base image and reboot it?",
        s.host(),
        super::rundir::upgraded(dir).display()
    ))
    .await?;
    rb.frozen_boot_id = Some(facts.boot_id.clone());
    j.services.rollback = Some(rb.clone());
    j.save(dir)?;
    match freeze::freeze(s, facts, Some(dev)).await {
        Ok(r) => {
            ui.say(format!(
                "frozen: {} read-only, {} service(s) stopped",
                r.read_only.join(", "),
                r.stopped.len()
            ));
            Ok(())
        }
        Err(e) => {
            if crate::errors::exit_code(&e) == crate::errors::EXIT_REFUSED {
                rb.frozen_boot_id = None;
                j.services.rollback = Some(rb.clone());
                j.save(dir)?;
            }
            Err(e)
        }
    }
}

/// The frozen VPS's disk into UPGRADED: a pre-copy where the helper runs
/// (only the blocks that differ from the upgraded image cross), else the
/// whole disk.
async fn save_disk(
    s: &crate::ssh::Session,
    facts: &remote::Facts,
    j: &Journal,
    upgraded: &Path,
    ui: &Ui,
) -> Result<()> {
    let opts = pull::PullOptions {
        output: upgraded.to_path_buf(),
        device: j.device.clone(),
        live: false,
        transfer: j.transfer,
    };
    if pull::precopy::can_start_from(upgraded) {
        match pull::precopy::precopy(s, facts, &opts, ui).await? {
            Ok(_) => return say_saved(s, upgraded, ui),
            Err(why) => ui.say(format!("no pre-copy ({why}): pulling the whole disk")),
        }
    }
    for p in [
        Manifest::path_for(upgraded),
        pull::precopy::state_path(upgraded),
    ] {
        let _ = std::fs::remove_file(p);
    }
    if !pull::state_path(upgraded).exists() {
        let _ = std::fs::remove_file(upgraded);
    }
    pull::pull(s, facts, &opts, ui).await?;
    say_saved(s, upgraded, ui)
}

fn say_saved(s: &crate::ssh::Session, upgraded: &Path, ui: &Ui) -> Result<()> {
    ui.say(format!(
        "{}'s disk as it was after the upgrade, what it wrote since its reboot included, is kept \
         in {}",
        s.host(),
        upgraded.display()
    ));
    Ok(())
}
