//! The seal on OpenRC (the module's doc says why it is made this way):
//! which runlevel services are held back, and how they are read off the
//! disk.

use super::{Init, Names, Seal, ssh_and_network};
use crate::remote::facts::Facts;
use crate::remote::openrc;

/// The runlevels that bring the system itself up: kept, but for
/// `openrc::SCHEDULERS_AND_CLOCKS`.
const OPENRC_SYSTEM_LEVELS: &[&str] = &["sysinit", "boot"];
/// Runlevels a normal boot never enters.
const OPENRC_UNUSED_LEVELS: &[&str] = &["shutdown", "off", "nonetwork", "recovery", "single"];
/// Where the verify reboot's held-back runlevel links wait.
pub(super) const OPENRC_STASH: &str = "/etc/drydock-held-runlevels";

/// OpenRC's held-back set among `levels` ((service, runlevel) pairs).
pub fn openrc_held_back(levels: &[(String, String)], wants: &[String]) -> Vec<String> {
    let mut v: Vec<String> = levels
        .iter()
        .filter(|(u, l)| {
            let kept = wants.contains(u) || openrc::KEPT.contains(&u.as_str());
            let unused = OPENRC_UNUSED_LEVELS.contains(&l.as_str());
            let system = OPENRC_SYSTEM_LEVELS.contains(&l.as_str())
                && !openrc::SCHEDULERS_AND_CLOCKS.contains(&u.as_str())
                && !openrc::CLOCK_SAVERS.contains(&u.as_str());
            !(kept || unused || system)
        })
        .map(|(u, _)| u.clone())
        .collect();
    v.sort();
    v.dedup();
    v
}

/// The upgraded disk's OpenRC runlevels: "level SERVICE RUNLEVEL", then "end".
pub const RUNLEVELS_SCRIPT: &str = r#"for l in /etc/runlevels/*/; do
  [ -d "$l" ] || continue; lv=${l%/}; lv=${lv##*/}
  for u in "$l"*; do [ -e "$u" ] || [ -L "$u" ] || continue; echo "level ${u##*/} $lv"; done
done
echo end"#;

/// "level SERVICE RUNLEVEL" lines as (service, runlevel).
pub fn runlevel_services(lines: &[String]) -> Vec<(String, String)> {
    lines
        .iter()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            (w.next()? == "level").then_some(())?;
            Some((w.next()?.to_string(), w.next()?.to_string()))
        })
        .collect()
}

impl Seal {
    pub(super) fn openrc_from_facts(f: &Facts, host: &str) -> anyhow::Result<Seal> {
        let wants = ssh_and_network(
            f,
            host,
            &Names {
                ssh: openrc::SSH,
                net: openrc::NET,
                net_prefixes: openrc::NET_PREFIXES,
                is_net: openrc::is_net,
                ssh_kind: "service is started",
                looked: "OpenRC; ",
                net_kind: "OpenRC service",
                state: "started",
            },
        )?;
        let held = openrc_held_back(&runlevel_services(&f.units), &wants);
        Ok(Seal {
            init: Init::Openrc,
            wants,
            held_back: held,
            boot_masks: Vec::new(),
        })
    }
}
