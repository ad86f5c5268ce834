//! The run folder's files, each named once here (issue 33): a step asks
//! for `rundir::base(dir)`, never spells "base.raw". What each holds:
//!
//! - `base.raw` (+ `.manifest`): the VPS's disk as pulled; the rollback
//!   and never modified (safety rule 5);
//! - `upgraded.raw`: the upgraded copy, the one that is pushed;
//! - `live.raw`, `rehearsed.raw`: the carry's live copy and the
//!   rehearsal's result, kept until the carry is done;
//! - `rollback.raw`: the VPS's disk after an abort's pre-copy save;
//! - `boot/`, `boot-upgraded/`: the VPS's kernel and initrd, and the
//!   upgraded copy's, for direct boots;
//! - the worker VM's files: overlays, serial console, QMP socket, QEMU's
//!   stderr, UEFI variables, its host key, the proxy's socket;
//! - `run.log`, `downloads/`, `overlay.json`, `journal.json`.

use std::path::{Path, PathBuf};

pub fn journal(dir: &Path) -> PathBuf {
    dir.join("journal.json")
}
pub fn base(dir: &Path) -> PathBuf {
    dir.join("base.raw")
}
pub fn upgraded(dir: &Path) -> PathBuf {
    dir.join("upgraded.raw")
}
pub fn live(dir: &Path) -> PathBuf {
    dir.join("live.raw")
}
pub fn rehearsed(dir: &Path) -> PathBuf {
    dir.join("rehearsed.raw")
}
pub fn rollback(dir: &Path) -> PathBuf {
    dir.join("rollback.raw")
}
/// The worker VM's overlay over the base (or the live copy).
pub fn overlay(dir: &Path) -> PathBuf {
    dir.join("overlay.qcow2")
}
/// Which of the overlay's clusters the upgrade wrote (qemu-img map).
pub fn overlay_map(dir: &Path) -> PathBuf {
    dir.join("overlay.json")
}
/// The service proof's throwaway overlay of the upgraded copy.
pub fn proof_overlay(dir: &Path) -> PathBuf {
    dir.join("proof.qcow2")
}
/// The proof's control: a throwaway overlay of the base.
pub fn control_overlay(dir: &Path) -> PathBuf {
    dir.join("control.qcow2")
}
pub fn carry_overlays(dir: &Path) -> (PathBuf, PathBuf) {
    (dir.join("carry-live.qcow2"), dir.join("carry-frozen.qcow2"))
}
/// The VPS's kernel, initrd and command line.
pub fn boot_files(dir: &Path) -> PathBuf {
    dir.join("boot")
}
/// The upgraded copy's, kept by the verify boot.
pub fn upgraded_boot_files(dir: &Path) -> PathBuf {
    dir.join("boot-upgraded")
}
pub fn serial_log(dir: &Path) -> PathBuf {
    dir.join("serial.log")
}
pub fn qmp_socket(dir: &Path) -> PathBuf {
    dir.join("qmp.sock")
}
pub fn qemu_stderr(dir: &Path) -> PathBuf {
    dir.join("qemu.stderr")
}
pub fn efivars(dir: &Path) -> PathBuf {
    dir.join(crate::vm::EFIVARS)
}
pub fn guest_known_hosts(dir: &Path) -> PathBuf {
    dir.join("guest_known_hosts")
}
pub fn proxy_socket(dir: &Path) -> PathBuf {
    dir.join("proxy.sock")
}
/// The commands' output and the network's refusals.
pub fn run_log(dir: &Path) -> PathBuf {
    dir.join("run.log")
}
/// The package files the upgrade fetched, each with its URL.
pub fn downloads(dir: &Path) -> PathBuf {
    dir.join("downloads")
}
/// A boot's capture of what the guest sent (`net1.pcap`, ...).
pub fn pcap(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}
