//! `abort` after the push: the VPS back on its old disk, as it was.

use super::*;

/// Abort after the push: the run is killed right after its push step
/// completed (the VPS's disk now holds the change, the VPS not yet
/// rebooted); `drydock abort` must push the base image back over it and
/// reboot, and the VPS comes back as it was (about six minutes under TCG,
/// beside the other VM tests).
#[test]
fn abort_after_the_push_gives_the_vps_back_as_it_was() {
    abort_after_the_push_on(None);
}

/// The same on the ifupdown + dhclient fixture, after a freeze/thaw round.
/// Zoo tier (the default suite has the abort on the networkd fixture): at
/// its first run, beside four other guests, the VPS did not come back
/// within the 15 minutes drydock gives a reboot (by hand, a plain sysrq
/// reboot of that frozen fixture beside three other guests took 17 min 41 s
/// to answer on SSH); in scripts/test-zoo, beside one other test, it passed.
#[test]
#[ignore = "zoo tier (long): scripts/test-zoo runs it"]
fn zoo_ifupdown_freeze_thaw_then_abort_after_the_push() {
    abort_after_the_push_on(Some("ifupdown"));
}
