//! `drydock verify ID --boot`: a version laid out as a raw image, booted
//! through its own boot loader in a local VM shaped like the host it came
//! from (firmware, disk bus), on a qcow2 overlay (the layout is not
//! written), with the network sealed: nothing leaves the VM but its SSH
//! forward, so the copy's own services may start without being a second
//! live server. It is proven up when drydock logs in over SSH (sshd
//! answers, with the host's credentials), / is mounted read-write, and
//! init reached its target (systemd: `is-system-running` running or
//! degraded, the failed units named; OpenRC: its runlevel).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;

use super::store::{Store, Version};
use crate::ui::Ui;
use crate::vm::guest;
use crate::vm::{self, Vm, cmdline};

#[derive(Debug, Serialize)]
pub struct BootProof {
    pub id: String,
    /// PRETTY_NAME of the booted copy.
    pub os: String,
    /// / as mounted in the VM (its mount options).
    pub root: String,
    /// systemd's `is-system-running` (running, degraded), or OpenRC's
    /// runlevel.
    pub init: String,
    pub failed_units: Vec<String>,
    /// The host's services as recorded with the version, checked in the
    /// VM (None: the version has no record of them).
    pub services: Option<crate::services::Outcome>,
    pub seconds: f64,
    /// The VM's console and files (kept).
    pub dir: PathBuf,
}

impl BootProof {
    pub fn human(&self) -> String {
        format!(
            "version {} boots: {} came up, sshd answered, / mounted {}, init {}{}\n  in {:.0} s \
             (a sealed VM; its console: {})\n",
            self.id,
            self.os,
            self.root,
            self.init,
            if self.failed_units.is_empty() {
                String::new()
            } else {
                format!(" (failed: {})", self.failed_units.join(" "))
            },
            self.seconds,
            self.dir.join("serial.log").display()
        ) + &match &self.services {
            Some(o) => o.human("of the host, in the VM", &[]),
            None => "  (the version has no record of its host's services: not checked)\n".into(),
        }
    }
}

/// What a boot proof checks of the host's services, and how it logs in.
#[derive(Debug, Clone, Copy, Default)]
pub struct Services<'a> {
    /// The host's key (`-i`).
    pub identity: Option<&'a Path>,
    pub set: Option<&'a crate::services::ServiceSet>,
    /// `--accept-failed`.
    pub accepted: &'a [String],
}

/// The version as a raw image under `$XDG_STATE_HOME/drydock/backups-boot`
/// (laid out once; kept while its manifest says it is this version).
pub fn laid_out(store: &Store, v: &Version, ui: &Ui) -> Result<PathBuf> {
    let image = store.layout_path(v, "backups-boot")?;
    let m = crate::image::manifest::Manifest::path_for(&image);
    let same = crate::image::manifest::Manifest::load(&m)
        .map(|l| l.digest == v.manifest.digest)
        .unwrap_or(false);
    if !(same && image.exists()) {
        let bar = ui.bytes_bar(v.manifest.size, "lay out");
        store.materialize(v, &image, |n| bar.inc(n))?;
        bar.finish();
    }
    link_boot(store, v, &image)?;
    Ok(image)
}

/// IMAGE.boot as a link to the version's recorded boot files (if it has
/// them), so that `drydock boot` of the laid-out image holds its services
/// back as for a pulled one.
pub fn link_boot(store: &Store, v: &Version, image: &Path) -> Result<()> {
    let link = crate::vm::boot::boot_dir(image);
    let _ = std::fs::remove_file(&link);
    if let Some(target) = store.boot_files(&v.id)? {
        std::os::unix::fs::symlink(&target, &link)
            .with_context(|| format!("cannot link {} to {}", link.display(), target.display()))?;
    }
    Ok(())
}

pub async fn verify_boot(
    store: &Store,
    v: &Version,
    identity: Option<&Path>,
    memory_mib: u64,
    accepted: &[String],
    ui: &Ui,
) -> Result<BootProof> {
    let image = laid_out(store, v, ui)?;
    let shape = v.shape.clone().unwrap_or_default();
    prove_image(
        &image,
        &format!("version {}", v.id),
        &v.id,
        shape,
        memory_mib,
        Services {
            identity,
            set: v.services.as_ref(),
            accepted,
        },
        ui,
    )
    .await
}

/// Boot IMAGE through its own boot loader on a qcow2 overlay (IMAGE is
/// not written), shaped as SHAPE, sealed, and prove it up. WHAT names it
/// in messages ("version ID").
pub async fn prove_image(
    image: &Path,
    what: &str,
    id: &str,
    shape: crate::vm::shape::Shape,
    memory_mib: u64,
    services: Services<'_>,
    ui: &Ui,
) -> Result<BootProof> {
    let started = Instant::now();
    let stamp = crate::util::now().replace([':', '-'], "");
    let dir = crate::paths::boots_dir()?.join(format!(
        "{}-verify-{}",
        image
            .file_stem()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_default(),
        &stamp[..15.min(stamp.len())]
    ));
    crate::paths::private_dir(&dir)?;
    let overlay = dir.join("overlay.qcow2");
    vm::image::create_overlay(image, &overlay).await?;
    // Sealed: no proxy, nothing allowed out.
    let spec = sealed_spec(&overlay, "qcow2", &dir, shape, memory_mib, None)?;
    let port = spec.ssh_port;
    ui.say(format!(
        "booting {what} through its own boot loader in a sealed VM ({} MiB); console in {}",
        memory_mib,
        dir.join("serial.log").display()
    ));
    let mut vm = Vm::start(spec, dir.join("qemu.stderr")).await?;
    let res = tokio::select! {
        biased;
        sig = ui.interrupted() => Err(crate::errors::Interrupted(format!(
            "{}: the boot proof was stopped; {what} is unchanged",
            Ui::interrupted_text(sig)
        )).into()),
        // A guest that stops answering mid-check (its sshd up, its PID 1
        // stuck) must not hold verify forever: 30 minutes in all.
        r = tokio::time::timeout(
            Duration::from_secs(1800),
            prove(&mut vm, port, &dir, what, id, services),
        ) => r.unwrap_or_else(|_| Err(anyhow::anyhow!(
            "{what} did not finish its boot checks within 30 minutes; its console: {}",
            dir.join("serial.log").display()
        ))),
    };
    let off = vm.power_off(Duration::from_secs(120)).await;
    let mut proof = res?;
    off?;
    proof.seconds = started.elapsed().as_secs_f64();
    Ok(proof)
}

/// Wait for the VM's sshd (15 minutes), then log in to it with the host's
/// credentials (5 more); WHAT names it in the errors, which name its
/// console.
pub async fn log_in(
    vm: &mut Vm,
    port: u16,
    identity: Option<&Path>,
    dir: &Path,
    what: &str,
) -> Result<crate::ssh::Session> {
    let console = dir.join("serial.log");
    vm.wait_for_ssh(Duration::from_secs(900))
        .await
        .with_context(|| {
            format!(
                "{what} did not boot to SSH within 15 minutes; its console: {}",
                console.display()
            )
        })?;
    let (t, o) = guest::guest_target(port, identity, dir.join("known_hosts"), what);
    guest::connect_retry_refusing(
        &t,
        &o,
        Duration::from_secs(300),
        Some(Duration::from_secs(30)),
    )
    .await
    .with_context(|| {
        format!(
            "{what} booted but drydock could not log in over SSH (with the host's \
                 credentials: -i KEY names the key); its console: {}",
            console.display()
        )
    })
}

/// A local VM of DISK with nothing out of its network but its SSH
/// forward, its files (QMP socket, console, capture) in DIR.
pub fn sealed_spec(
    disk: &Path,
    disk_format: &str,
    dir: &Path,
    shape: crate::vm::shape::Shape,
    memory_mib: u64,
    direct: Option<cmdline::DirectBoot>,
) -> Result<cmdline::VmSpec> {
    let efi = vm::efi_for(&shape, dir)?;
    Ok(cmdline::VmSpec {
        hotplug_ports: Vec::new(),
        disk: disk.to_path_buf(),
        disk_format: disk_format.into(),
        memory_mib,
        cpus: std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(2),
        accel: cmdline::detect_accel(),
        ssh_port: std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port(),
        qmp_socket: dir.join("qmp.sock"),
        serial_log: dir.join("serial.log"),
        shape,
        efi,
        direct,
        sealed: Some(cmdline::NetSeal {
            proxy: None,
            pcap: dir.join("net.pcap"),
        }),
    })
}

/// The host's services, as recorded with the version, in the booted VM
/// (None: the version has no record of them).
async fn check_services(
    s: &crate::ssh::Session,
    services: Services<'_>,
) -> Result<Option<crate::services::Outcome>> {
    let Some(set) = services.set.filter(|s| !s.is_empty()) else {
        return Ok(None);
    };
    let opts = crate::services::check::Options {
        start_idle: true,
        ..Default::default()
    };
    crate::services::check::check(s, set, &opts).await.map(Some)
}

/// Log into the booted VM and prove it would serve: / read-write, its init
/// at its target, the host's recorded services running; then power it off.
/// Over 80 lines: the checks' shell commands and refusals, with the VM told
/// to power off after everything is read and before the services and init
/// are judged; split, that poweroff would move away from the reads it must
/// follow.
async fn prove(
    vm: &mut Vm,
    port: u16,
    dir: &Path,
    what: &str,
    id: &str,
    services: Services<'_>,
) -> Result<BootProof> {
    let console = dir.join("serial.log");
    let s = log_in(vm, port, services.identity, dir, what).await?;
    let (_, _, os) = guest::os_release(&s).await?;
    let root = s
        .exec("findmnt -n -o OPTIONS / || awk '$2 == \"/\" {print $4}' /proc/mounts")
        .await?
        .stdout_str()
        .trim()
        .lines()
        .next()
        .unwrap_or("")
        .to_string();
    if !root.split(',').any(|o| o == "rw") {
        bail!(
            "{what} booted but / is not mounted read-write ({root}): it would not serve; \
             its console: {}",
            console.display()
        );
    }
    let init = s
        .exec(
            "if command -v systemctl >/dev/null; then timeout 600 systemctl is-system-running \
             --wait; elif command -v rc-status >/dev/null; then rc-status -r; else echo unknown; fi",
        )
        .await?
        .stdout_str()
        .trim()
        .to_string();
    let failed: Vec<String> = s
        .exec("systemctl list-units --state=failed --plain --no-legend 2>/dev/null | awk '{print $1}'")
        .await?
        .stdout_str()
        .split_whitespace()
        .map(str::to_string)
        .collect();
    let checked = check_services(&s, services).await;
    s.exec("(sleep 1; systemctl poweroff || poweroff) >/dev/null 2>&1 &")
        .await
        .ok();
    s.close().await;
    let services_outcome = checked?;
    if let Some(o) = &services_outcome {
        let failures = o.failures(services.accepted);
        if !failures.is_empty() {
            bail!(
                "{what} booted, but {} unit(s) its host ran do not run in it:\n{}\n(`--accept-failed \
                 UNIT` goes on without one; its console: {})",
                failures.len(),
                o.failure_text(services.accepted).trim_end(),
                console.display()
            );
        }
    }
    if !matches!(init.as_str(), "running" | "degraded" | "default" | "boot") {
        bail!(
            "{what} booted but its init did not reach its target (`{init}`); failed: {}; \
             its console: {}",
            if failed.is_empty() {
                "none".to_string()
            } else {
                failed.join(" ")
            },
            console.display()
        );
    }
    Ok(BootProof {
        id: id.to_string(),
        os,
        root,
        init,
        failed_units: failed,
        services: services_outcome,
        seconds: 0.0,
        dir: dir.to_path_buf(),
    })
}
