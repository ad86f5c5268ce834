//! The worker VM of a run: started sealed on an overlay of the base image,
//! the plan run in it, rebooted through the VPS's own boot loader and
//! checked, powered off, and its disk made the image to push. See
//! `vm::seal` for why it is sealed the way it is.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Result, bail};

use super::journal::Journal;
use super::plan_of;
use crate::recipes::{self, Plan};
use crate::remote;
use crate::ssh::Session;
use crate::ui::Ui;
use crate::vm::guest;
use crate::vm::seal::Seal;
use crate::vm::shape::Shape;
use crate::vm::{self, Accel, Vm, VmSpec, cmdline};

/// Start the worker VM and log in to it: QEMU up, its sshd answering
/// within 15 minutes, drydock's session within 2 more. An error starts
/// with `failed` and ends with the boot parity report.
pub(super) async fn start_worker(
    dir: &Path,
    identity: Option<&Path>,
    spec: VmSpec,
    failed: &str,
    parity: &str,
) -> Result<(Vm, crate::ssh::Session)> {
    let port = spec.ssh_port;
    let mut vm = Vm::start(spec, super::rundir::qemu_stderr(dir)).await?;
    vm.wait_for_ssh(Duration::from_secs(900))
        .await
        .map_err(|e| anyhow::anyhow!("{failed}{e:#}\n{parity}"))?;
    let (t, o) = guest::guest_target(
        port,
        identity,
        super::rundir::guest_known_hosts(dir),
        "the worker VM",
    );
    let s = guest::connect_retry(&t, &o, Duration::from_secs(120)).await?;
    Ok((vm, s))
}

/// What both boots of a run's worker VM share: the overlay, the VPS's
/// shape, the sealed network (proxy and captures), and what the network
/// refused so far.
struct Worker<'a> {
    dir: &'a Path,
    overlay: PathBuf,
    shape: Shape,
    efi: Option<(PathBuf, PathBuf)>,
    /// The boot parity report, ending every "did not come up" error.
    parity: String,
    accel: Accel,
    memory_mib: u64,
    cpus: u32,
    identity: Option<PathBuf>,
    /// run.log: the commands' output and the network's refusals.
    log: PathBuf,
    proxy_ip: std::net::Ipv4Addr,
    /// The allow-listing proxy; none with `--network open`.
    proxy: Option<vm::proxy::Proxy>,
    /// drydock itself, which QEMU runs as the relay to the proxy.
    exe: PathBuf,
    refused: Vec<String>,
}

impl Worker<'_> {
    /// The network seal of one boot: its capture file, and the forward to
    /// the proxy when the boot needs the package sources.
    fn net_seal(&self, pcap: &str, with_proxy: bool) -> Option<cmdline::NetSeal> {
        self.proxy.as_ref().map(|p| cmdline::NetSeal {
            proxy: with_proxy.then(|| {
                (
                    self.proxy_ip,
                    format!(
                        "{} __relay {}",
                        crate::ssh::shell_quote(&self.exe.to_string_lossy()),
                        crate::ssh::shell_quote(&p.socket.to_string_lossy())
                    ),
                )
            }),
            pcap: self.dir.join(pcap),
        })
    }

    fn spec(
        &self,
        direct: Option<cmdline::DirectBoot>,
        sealed: Option<cmdline::NetSeal>,
    ) -> Result<VmSpec> {
        Ok(VmSpec {
            hotplug_ports: Vec::new(),
            disk: self.overlay.clone(),
            disk_format: "qcow2".into(),
            memory_mib: self.memory_mib,
            cpus: self.cpus,
            accel: self.accel,
            ssh_port: std::net::TcpListener::bind("127.0.0.1:0")?
                .local_addr()?
                .port(),
            qmp_socket: super::rundir::qmp_socket(self.dir),
            serial_log: super::rundir::serial_log(self.dir),
            shape: self.shape.clone(),
            efi: self.efi.clone(),
            direct,
            sealed,
        })
    }

    /// The refusals in a boot's capture, written to run.log and kept.
    fn note_refused(&mut self, pcap: &str) -> Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let allowed = (self.proxy_ip, vm::proxy::GUEST_PORT);
        for r in vm::pcap::take(&self.dir.join(pcap), allowed) {
            use std::io::Write;
            writeln!(f, "network: refused {} ({} packet(s))", r.what, r.packets)?;
            self.refused.push(r.what);
        }
        Ok(())
    }
}

/// The worker VM: a fresh overlay on the base image, the plan run inside
/// a sealed first boot (the VPS's kernel booted directly, its services held
/// back, the network open only to the package sources), then a reboot
/// through the VPS's own boot loader, sealed by files written for it and
/// removed afterwards, that must come back on the expected release; the
/// result as a sparse raw image for the push. See `vm::seal` for why.
pub(super) async fn upgrade_in_vm(dir: &Path, j: &mut Journal, ui: &Ui) -> Result<Plan> {
    match in_worker(dir, j, ui, None).await? {
        Ok(plan) => Ok(plan),
        Err(why) => bail!("{why}"),
    }
}

/// A hook's work under way: `Ok(Err(why))` when it refuses.
pub(super) type Refusable<'a> = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<std::result::Result<(), String>>> + Send + 'a>,
>;

/// What a first boot does in place of running the plan: the carry
/// (`carry.rs`), given to the worker as a hook so that the worker does not
/// import it. It boots its own disk, with QEMU ports of its own.
pub(super) trait FirstBoot: Sync {
    /// The disk the worker's overlay is made over (in place of the base).
    fn disk(&self) -> &Path;
    /// The empty PCI Express root ports it attaches disks to.
    fn ports(&self) -> &[&str];
    /// The plan whose result it boots.
    fn plan(&self) -> &Plan;
    /// Its work in the sealed guest; `Ok(Err(why))`: refused.
    fn run<'a>(
        &'a self,
        s: &'a Session,
        vm: &'a mut Vm,
        log: &'a Path,
        ui: &'a Ui,
    ) -> Refusable<'a>;
}

/// The worker VM's two boots, on a fresh overlay of the base image (the
/// plan run in the first), or with CARRY on one of the rehearsal's result
/// (the VPS's changes since the live copy carried into it in the first:
/// `carry`). Returns the plan run, or why the rehearsal could not be
/// carried over (nothing is kept then).
/// Over 80 lines: the boots' setup and aftermath in order (refuse an
/// unsealed run, make the overlay, pick the boot files, build the `Worker`
/// with its EFI, accelerator and proxy, run the two boots, then move the
/// proxy's refusals and downloads into the journal, convert the overlay and
/// copy the freed ranges back); each step is a call or a few lines, and
/// split, the order the journal's fields are filled in would be scattered.
pub(super) async fn in_worker(
    dir: &Path,
    j: &mut Journal,
    ui: &Ui,
    carry: Option<&dyn FirstBoot>,
) -> Result<std::result::Result<Plan, String>> {
    let Some(seal) = j.seal.clone() else {
        bail!(
            "this run was started by a drydock that did not seal its worker VM; `drydock abort {}` ends it, then start a new one",
            dir.display()
        );
    };
    let base = match carry {
        Some(c) => c.disk().to_path_buf(),
        None => super::rundir::base(dir),
    };
    let overlay = super::rundir::overlay(dir);
    // Idempotent: a resumed upgrade starts again from the untouched base.
    let _ = std::fs::remove_file(&overlay);
    let _ = std::fs::remove_file(super::rundir::upgraded(dir));
    let _ = std::fs::remove_file(super::rundir::efivars(dir));
    vm::image::create_overlay(&base, &overlay).await?;
    // The carry boots the rehearsal's result: its own kernel, initrd and
    // command line (kept from the rehearsal's verify boot), not the VPS's,
    // whose modules (Alpine) or init= (NixOS after --gc) may be gone from it.
    let upgraded_boot = super::rundir::upgraded_boot_files(dir);
    let boot = match carry {
        Some(_) if remote::bootfiles::BootFiles::recorded_in(&upgraded_boot) => {
            remote::bootfiles::BootFiles::load(&upgraded_boot)?
        }
        _ => remote::bootfiles::BootFiles::load(&super::rundir::boot_files(dir))?,
    };
    // Runs from before boot parity have no shape: QEMU's defaults, as then.
    let shape = j.shape.clone().unwrap_or_default();
    let efi = vm::efi_for(&shape, dir)?;
    let parity = format!(
        "the worker VM was built as probed on the VPS: {}{}",
        shape.describe(),
        shape
            .notes
            .iter()
            .map(|n| format!("\n  note: {n}"))
            .collect::<String>()
    );
    let accel = cmdline::detect_accel();
    if accel == Accel::Tcg {
        ui.warn("no usable KVM: the worker VM runs under software emulation (TCG), several times slower");
    }
    let log = super::rundir::run_log(dir);
    let proxy_ip = cmdline::proxy_addr(&shape);
    let proxy = if j.network_open {
        None
    } else {
        Some(vm::proxy::Proxy::start(
            &super::rundir::proxy_socket(dir),
            &j.allowed_hosts,
            &log,
            Some(&super::rundir::downloads(dir)),
        )?)
    };
    let exe = vm::proxy::relay_program();
    let mut w = Worker {
        dir,
        overlay,
        shape,
        efi,
        parity,
        accel,
        memory_mib: j.memory_mib,
        cpus: j.cpus,
        identity: j.identity.clone(),
        log,
        proxy_ip,
        proxy,
        exe,
        refused: Vec::new(),
    };
    let (plan, held, made_dir) = match first_boot(&mut w, &seal, &boot, j, ui, carry).await? {
        Ok(r) => r,
        Err(why) => return Ok(Err(why)),
    };
    let (pretty, trimmed) = verify_boot(&mut w, &seal, &plan, &held, made_dir, ui).await?;
    j.os_in_worker = Some(pretty);
    if let Some(p) = &w.proxy {
        w.refused.extend(p.refused());
        j.downloads = Some(p.downloads());
    }
    drop(w.proxy.take());
    j.held_back = held;
    let refused = std::mem::take(&mut w.refused);
    if !refused.is_empty() {
        ui.say(format!(
            "the sealed worker VM was refused {} destination(s), listed in {}",
            refused.len(),
            w.log.display()
        ));
    }
    // The run's refusals, the rehearsal's too: after a carry the command
    // ran only in the rehearsal.
    for r in refused {
        if !j.refused.contains(&r) {
            j.refused.push(r);
        }
    }
    // What the guest wrote, as the overlay's allocated clusters (kept for
    // scripts/bench, which compares it with the blocks that differ).
    let map = vm::image::map_json(&w.overlay).await?;
    let _ = crate::util::write_atomic(&super::rundir::overlay_map(dir), &map);
    let upgraded = super::rundir::upgraded(dir);
    vm::image::convert_to_raw(&w.overlay, &upgraded).await?;
    j.freed_kept_bytes = None;
    if trimmed && w.shape.disk_bus == vm::shape::DiskBus::VirtioBlk {
        // Free in the upgraded filesystems: any bytes do, and the base's
        // are the ones the push need not send.
        let ranges = vm::image::discarded_ranges(&map)?;
        j.freed_kept_bytes = Some(vm::image::copy_ranges(
            &super::rundir::base(dir),
            &upgraded,
            &ranges,
        )?);
    }
    Ok(Ok(plan))
}

/// The first of the two boots: sealed, the VPS's kernel booted directly,
/// the plan run in it, the verify reboot's seal written, powered off.
/// Returns the plan, the units held back (those the upgrade enabled
/// included), and whether the seal made /etc/systemd/system.control; or,
/// with CARRY, why it could not be carried over (the VM powered off).
/// Over 80 lines: the first boot in the order the guest goes through it
/// (start sealed, hold units back, name disks, run the plan or the carry,
/// list the enabled units, write the verify reboot's seal and disk names,
/// power off); the plan's proxy environment and https_debs hooks sit
/// between the commands they wrap; split, what the seal does before and
/// after the plan would be in different functions.
async fn first_boot(
    w: &mut Worker<'_>,
    seal: &Seal,
    boot: &remote::bootfiles::BootFiles,
    j: &Journal,
    ui: &Ui,
    carry: Option<&dyn FirstBoot>,
) -> Result<std::result::Result<(Plan, Vec<String>, bool), String>> {
    let direct = cmdline::DirectBoot {
        kernel: boot.kernel.clone(),
        initrd: boot.initrd.clone(),
        append: seal.kernel_cmdline(&boot.cmdline)?,
    };
    let mut spec = w.spec(Some(direct), w.net_seal("net1.pcap", carry.is_none()))?;
    if let Some(c) = carry {
        spec.hotplug_ports = c.ports().iter().map(|p| p.to_string()).collect();
    }
    let (mut vm, s) = start_worker(w.dir, w.identity.as_deref(), spec, "", &w.parity).await?;
    let said = seal_step(
        &s,
        "holding the VPS's units back in the worker VM",
        &seal.runtime_script(),
    )
    .await?;
    let installed_policy = said.lines().any(|l| l == "policy-rc.d installed");
    disk_names(&s, &w.shape).await?;
    for l in said.lines().filter_map(|l| l.strip_prefix("running ")) {
        ui.warn(format!(
            "{l} had started in the worker VM although held back; stopped"
        ));
    }
    let plan = match carry {
        Some(c) => {
            if let Err(why) = c.run(&s, &mut vm, &w.log, ui).await? {
                power_off(s, vm).await?;
                return Ok(Err(why));
            }
            c.plan().clone()
        }
        None => {
            // The same facts as the probe's, read from the same disk in the VM.
            let guest_facts = remote::gather(&s).await?;
            let pretty = guest_facts.pretty_name();
            let plan = plan_of(j, &recipes::Host::from_facts(&guest_facts))?;
            ui.say(format!(
                "worker VM up ({pretty}), sealed; {}; output in {}",
                plan.description,
                w.log.display()
            ));
            let env = if w.proxy.is_some() {
                let u = format!("http://{}:{}/", w.proxy_ip, vm::proxy::GUEST_PORT);
                format!(
                    "export http_proxy={u} https_proxy={u} HTTP_PROXY={u} HTTPS_PROXY={u} no_proxy=localhost,127.0.0.1; "
                )
            } else {
                String::new()
            };
            let hook = plan.https_debs;
            for (i, cmd) in plan.commands.iter().enumerate() {
                if hook.is_some_and(|(_, keep)| keep == i) {
                    super::https_debs::run(&s, super::https_debs::KEEP_SCRIPT, &w.log, ui).await;
                }
                guest::run_logged_as(&s, &format!("{env}{cmd}"), cmd, &w.log).await?;
                if hook.is_some_and(|(list, _)| list == i) {
                    super::https_debs::run(&s, super::https_debs::LIST_SCRIPT, &w.log, ui).await;
                }
            }
            if hook.is_some() {
                super::https_debs::collect(&s, &super::rundir::downloads(w.dir), ui).await?;
            }
            plan
        }
    };
    let enabled = seal_step(
        &s,
        "listing the upgraded disk's enabled units",
        seal.enabled_script(),
    )
    .await?;
    let lines: Vec<String> = enabled.lines().map(str::to_string).collect();
    if lines.last().map(String::as_str) != Some("end") {
        bail!("the worker VM's list of enabled units was cut short; nothing was pushed");
    }
    let mut held = seal.held_in(&lines);
    // What the VPS had enabled stays held back even if the upgrade moved it.
    for u in &seal.held_back {
        if !held.contains(u) {
            held.push(u.clone());
        }
    }
    held.sort();
    let said = seal_step(
        &s,
        "writing the verify reboot's seal",
        &seal.disk_seal_script(&held, installed_policy),
    )
    .await?;
    let made_dir = said.lines().any(|l| l.starts_with("made "));
    if let Some(id) = w.shape.disk_id.as_ref().filter(|i| !i.links.is_empty()) {
        seal_step(
            &s,
            "writing the VPS's disk names for the verify reboot",
            &crate::vm::diskid::disk_script(id),
        )
        .await?;
    }
    ui.say("powering the worker VM off, to boot it again through the VPS's own boot loader");
    power_off(s, vm).await?;
    w.note_refused("net1.pcap")?;
    Ok(Ok((plan, held, made_dir)))
}

/// The second boot, to verify: firmware, the VPS's boot loader, the new
/// kernel. It must come back on the expected release with no held-back
/// unit running; then the seal is removed (and checked gone), the free
/// space of its filesystems discarded (fstrim), and it is powered off.
/// Returns what it runs, and whether both the trim and the power-off
/// ended cleanly.
async fn verify_boot(
    w: &mut Worker<'_>,
    seal: &Seal,
    plan: &Plan,
    held: &[String],
    made_dir: bool,
    ui: &Ui,
) -> Result<(String, bool)> {
    let spec = w.spec(None, w.net_seal("net2.pcap", false))?;
    let (vm, s) = start_worker(
        w.dir,
        w.identity.as_deref(),
        spec,
        "the upgraded disk did not come back through its own boot loader: ",
        &w.parity,
    )
    .await?;
    let (id2, ver2, pretty2) = guest::os_release(&s).await?;
    if plan.reached(&id2, &ver2) == Some(false) {
        bail!(
            "the worker VM came back running {} ({}), not {}; nothing was pushed",
            crate::services::printable(&pretty2),
            crate::services::printable(&format!("{id2} {ver2}")),
            plan.description
        );
    }
    let running = s.exec(&seal.running_script(held)).await?.stdout_str();
    if !running.trim().is_empty() {
        bail!(
            "held-back units ran in the worker VM's verify boot: {}; nothing was pushed",
            running.split_whitespace().collect::<Vec<_>>().join(" ")
        );
    }
    for cmd in &plan.after_reboot {
        guest::run_logged(&s, cmd, &w.log).await?;
    }
    keep_boot_files(&s, w.dir, ui).await;
    seal_step(
        &s,
        "removing the verify reboot's seal",
        &seal.disk_unseal_script(held, made_dir),
    )
    .await?;
    seal_step(
        &s,
        "removing the VPS's disk names written for the verify reboot",
        crate::vm::diskid::DISK_UNSCRIPT,
    )
    .await?;
    ui.say(format!(
        "the worker VM came back through its own boot loader running {pretty2}, {} unit(s) held back; powering it off",
        held.len()
    ));
    // What the filesystems no longer use, discarded: those ranges are
    // given the base's bytes back after (`keep_freed_as_base`), so a block
    // that only held a deleted file is not pushed.
    let trimmed = tokio::time::timeout(
        Duration::from_secs(600),
        s.exec("fstrim -a >/dev/null 2>&1; sync; echo done"),
    )
    .await
    .ok()
    .and_then(|r| r.ok())
    .is_some_and(|o| o.stdout_str().trim() == "done");
    let clean = power_off(s, vm).await?;
    w.note_refused("net2.pcap")?;
    Ok((pretty2, trimmed && clean))
}

/// The worker's disk given the names the VPS's has that QEMU could not
/// reproduce (a udev rule in /run), then every stable name the system
/// relies on (grub's install devices, fstab, crypttab) checked: one that
/// does not exist here would fail the upgrade (grub-pc's postinst) or the
/// verify boot, so the run stops now, before the freeze when rehearsing.
pub(super) async fn disk_names(s: &Session, shape: &Shape) -> Result<()> {
    if let Some(id) = shape.disk_id.as_ref().filter(|i| !i.links.is_empty()) {
        seal_step(
            s,
            "giving the worker's disk the VPS's names",
            &crate::vm::diskid::runtime_script(id),
        )
        .await?;
    }
    let said = seal_step(
        s,
        "checking the disk names the system relies on",
        crate::vm::diskid::CHECK_SCRIPT,
    )
    .await?;
    let missing: Vec<String> = said
        .lines()
        .filter_map(|l| l.strip_prefix("missing "))
        .map(crate::services::printable)
        .collect();
    if !missing.is_empty() {
        bail!(
            "names of disks that the system relies on do not exist in the worker VM: {}. The \
             worker's disk was given every /dev/disk name the VPS has for the disk drydock \
             copied ({}); a name of another disk of the VPS (a volume that is not copied) would \
             stop the upgrade or its boot: mark that fstab line `nofail`, or record the copied \
             disk's name (grub-pc: `dpkg-reconfigure grub-pc` on the VPS), then run drydock again",
            missing.join("; "),
            shape
                .disk_id
                .as_ref()
                .map(|i| i
                    .links
                    .iter()
                    .map(|(n, _)| n.as_str())
                    .collect::<Vec<_>>()
                    .join(" "))
                .filter(|l| !l.is_empty())
                .unwrap_or_else(|| "none".into())
        );
    }
    Ok(())
}

/// The upgraded system's kernel, initrd and command line, as its boot
/// loader started them: the service proof's sealed first boot. Not having
/// them fails only the proof, which says so.
async fn keep_boot_files(s: &Session, dir: &Path, ui: &Ui) {
    let to = super::rundir::upgraded_boot_files(dir);
    let res = async {
        let cmdline = s
            .run("reading the kernel command line", "cat /proc/cmdline")
            .await?;
        remote::bootfiles::fetch(s, cmdline.trim(), &to).await
    }
    .await;
    if let Err(e) = res {
        let _ = std::fs::remove_dir_all(&to);
        ui.warn(format!(
            "the upgraded system's kernel files could not be kept for the service proof: {e:#}"
        ));
    }
}

/// One of the seal's scripts in the worker VM, with a deadline: a guest
/// whose PID 1 stops answering must not hold the run (and the frozen VPS)
/// forever.
pub(super) async fn seal_step(s: &Session, what: &str, script: &str) -> Result<String> {
    match tokio::time::timeout(Duration::from_secs(600), s.run(what, script)).await {
        Ok(r) => r,
        Err(_) => {
            bail!("{what} did not finish within 10 minutes in the worker VM; nothing was pushed")
        }
    }
}

/// Power the worker VM off through its own init (a deadline on the request),
/// then through QEMU (ACPI, then forced after 180 s): the VM is gone after.
/// Whether it powered off by itself (not forced).
pub(super) async fn power_off(s: Session, mut vm: Vm) -> Result<bool> {
    let _ = tokio::time::timeout(
        Duration::from_secs(10),
        s.exec("(sleep 1; systemctl poweroff || poweroff) >/dev/null 2>&1 &"),
    )
    .await;
    s.close().await;
    vm.power_off(Duration::from_secs(180)).await
}
