//! `drydock boot IMAGE`: a local VM of an image, for manual work on a copy
//! of a server. The image is the backing file of a qcow2 overlay and is
//! never written; Ctrl-C powers the guest off (deadline, then forced).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use serde::Serialize;

use super::shape::Shape;
use super::{Accel, Vm, VmSpec, cmdline, efi_for, image};
use crate::ui::Ui;

#[derive(Debug, Clone)]
pub struct BootOptions {
    pub image: PathBuf,
    pub memory: String,
    pub cpus: Option<u32>,
    /// Where the overlay, QMP socket and serial log go.
    pub dir: PathBuf,
    /// How long the guest may take to answer on SSH.
    pub ready_within: Duration,
    /// `--like FILE`: the shape of a VPS (`drydock probe --json` output,
    /// or a shape of its own) to boot the image as.
    pub like: Option<PathBuf>,
    /// `--services`: the image's own services run.
    pub services: bool,
    /// `--network open`: the VM reaches the internet.
    pub network_open: bool,
}

/// What `drydock pull` records beside an image for a sealed boot of it.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct Recorded {
    pub seal: super::seal::Seal,
    pub allowed_hosts: Vec<String>,
}

/// IMAGE.boot/: the kernel, initrd, command line and seal of the VPS an
/// image was pulled from.
pub fn boot_dir(image: &Path) -> PathBuf {
    let mut s = image.as_os_str().to_owned();
    s.push(".boot");
    PathBuf::from(s)
}

/// Record beside IMAGE, pulled from the host of `s`, what a sealed boot of
/// it needs (IMAGE.boot/: the running kernel, initrd and command line, and
/// seal.json); the folder written.
pub async fn record(
    s: &crate::ssh::Session,
    facts: &crate::remote::Facts,
    image: &Path,
) -> Result<PathBuf> {
    let dir = boot_dir(image);
    let seal = super::seal::Seal::from_facts(facts, &s.host())?;
    let allowed = super::proxy::allow_list(
        &facts.sources,
        facts.os.get("ID").map(String::as_str).unwrap_or(""),
        &[],
    );
    crate::remote::bootfiles::fetch(s, &facts.cmdline, &dir).await?;
    let rec = Recorded {
        seal,
        allowed_hosts: allowed,
    };
    std::fs::write(dir.join("seal.json"), serde_json::to_string_pretty(&rec)?)?;
    Ok(dir)
}

/// A shape from `--like FILE`: a probe report's `worker_vm`, or a shape.
pub fn load_shape(path: &Path) -> Result<Shape> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("--like: cannot read {}", path.display()))?;
    // `drydock probe --json` prints an event stream: its result is what
    // describes the VPS. A file of one JSON document is a shape (or a
    // probe's result saved on its own).
    let v: serde_json::Value = match serde_json::from_str(&text) {
        Ok(v) => v,
        Err(e) => text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .rfind(|v| v["type"] == "result")
            .map(|v| v["result"].clone())
            .ok_or(e)
            .with_context(|| format!("--like: {} is not JSON", path.display()))?,
    };
    let v = v.get("worker_vm").cloned().unwrap_or(v);
    serde_json::from_value(v).with_context(|| {
        format!(
            "--like: {} is neither `drydock probe --json` output nor a VM shape",
            path.display()
        )
    })
}

#[derive(Debug, Serialize)]
pub struct BootInfo {
    pub ssh_port: u16,
    pub ssh_command: String,
    pub overlay: PathBuf,
    pub serial_log: PathBuf,
    pub accel: String,
}

/// Where `boot` keeps a VM's files: $XDG_STATE_HOME/drydock/boots/NAME-TIME.
pub fn default_dir(image: &Path) -> Result<PathBuf> {
    let stem = image
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "image".into());
    let stamp = crate::transfer::now().replace(':', "");
    Ok(crate::paths::boots_dir()?.join(format!("{stem}-{}", &stamp[..15.min(stamp.len())])))
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

pub async fn boot(opts: &BootOptions, ui: &Ui) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    let memory_mib = cmdline::parse_memory(&opts.memory).with_context(|| {
        format!(
            "--memory {}: expected a size such as 4G or 2048M (at least 128M)",
            opts.memory
        )
    })?;
    if !opts.image.is_file() {
        anyhow::bail!("{} is not an image file", opts.image.display());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&opts.dir)
        .with_context(|| format!("cannot create {}", opts.dir.display()))?;
    let accel = cmdline::detect_accel();
    if accel == Accel::Tcg {
        ui.warn("no usable KVM (no vmx/svm CPU flag, or /dev/kvm does not open): the VM runs under software emulation (TCG), several times slower");
    }
    let shape = match &opts.like {
        Some(p) => load_shape(p)?,
        None => Shape::default(),
    };
    let efi = efi_for(&shape, &opts.dir)?;
    let recorded_dir = boot_dir(&opts.image);
    let recorded: Option<(crate::remote::bootfiles::BootFiles, Recorded)> =
        match crate::remote::bootfiles::BootFiles::load(&recorded_dir) {
            Ok(b) => {
                let text =
                    std::fs::read_to_string(recorded_dir.join("seal.json")).unwrap_or_default();
                serde_json::from_str(&text).ok().map(|r| (b, r))
            }
            Err(_) => None,
        };
    let direct = if opts.services {
        None
    } else {
        let Some((b, r)) = &recorded else {
            return Err(crate::refused!(
                "{} has no recorded kernel ({} is written by `drydock pull`): drydock boot holds an image's services back by booting the kernel its VPS runs, with only SSH and the network started. Pull the disk with drydock, or boot with --services to let the image's own services run (its network stays sealed unless --network open)",
                opts.image.display(),
                recorded_dir.display()
            ));
        };
        Some(super::cmdline::DirectBoot {
            kernel: b.kernel.clone(),
            initrd: b.initrd.clone(),
            append: r.seal.kernel_cmdline(&b.cmdline)?,
        })
    };
    let allowed: Vec<String> = recorded
        .as_ref()
        .map(|(_, r)| r.allowed_hosts.clone())
        .unwrap_or_default();
    let proxy = if opts.network_open || allowed.is_empty() {
        None
    } else {
        Some(super::proxy::Proxy::start(
            &opts.dir.join("proxy.sock"),
            &allowed,
            &opts.dir.join("network.log"),
        )?)
    };
    let proxy_ip = super::cmdline::proxy_addr(&shape);
    let sealed = (!opts.network_open).then(|| super::cmdline::NetSeal {
        proxy: proxy.as_ref().map(|p| {
            let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("drydock"));
            (
                proxy_ip,
                format!(
                    "{} __relay {}",
                    crate::ssh::shell_quote(&exe.to_string_lossy()),
                    crate::ssh::shell_quote(&p.socket.to_string_lossy())
                ),
            )
        }),
        pcap: opts.dir.join("net.pcap"),
    });
    let overlay = opts.dir.join("overlay.qcow2");
    if !overlay.exists() {
        image::create_overlay(&opts.image, &overlay).await?;
    }
    let spec = VmSpec {
        disk: overlay.clone(),
        disk_format: "qcow2".into(),
        memory_mib,
        cpus: opts.cpus.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get() as u32)
                .unwrap_or(2)
        }),
        accel,
        ssh_port: free_port()?,
        qmp_socket: opts.dir.join("qmp.sock"),
        serial_log: opts.dir.join("serial.log"),
        shape,
        efi,
        direct,
        sealed,
    };
    let mut vm = Vm::start(spec, opts.dir.join("qemu.stderr")).await?;
    match (&recorded, opts.services) {
        (_, true) => ui.say("services: the image's own services run (--services)"),
        (Some((b, r)), false) => ui.say(format!(
            "services: held back; its kernel {} booted directly with only {} started; held back: {}",
            b.release,
            r.seal.wants.join(" "),
            r.seal.held_back.join(" ")
        )),
        (None, false) => {}
    }
    if opts.network_open {
        ui.say("network: open (--network open): the VM reaches the internet");
    } else if allowed.is_empty() {
        ui.say("network: sealed; nothing but its SSH forward (no package sources recorded)");
    } else {
        ui.say(format!(
            "network: sealed; allowed: {} (through http_proxy=http://{proxy_ip}:{}/)",
            allowed.join(" "),
            super::proxy::GUEST_PORT
        ));
    }
    ui.say(format!(
        "booting {} ({} MiB, {} CPUs, {}; {}); serial console in {}",
        opts.image.display(),
        memory_mib,
        vm.spec.cpus,
        if accel == Accel::Kvm { "KVM" } else { "TCG" },
        vm.spec.shape.describe(),
        vm.spec.serial_log.display()
    ));
    for n in &vm.spec.shape.notes {
        ui.say(format!("note: {n}"));
    }
    tokio::select! {
        r = vm.wait_for_ssh(opts.ready_within) => r?,
        sig = ui.interrupted() => {
            ui.say(format!("{}: powering the guest off", Ui::interrupted_text(sig)));
            vm.power_off(Duration::from_secs(60)).await?;
            return Err(crate::errors::Interrupted(format!("{} before the guest was up", Ui::interrupted_text(sig))).into());
        }
    }
    let info = BootInfo {
        ssh_port: vm.spec.ssh_port,
        ssh_command: format!(
            "ssh -p {} -o UserKnownHostsFile={} -o StrictHostKeyChecking=accept-new root@127.0.0.1",
            vm.spec.ssh_port,
            opts.dir.join("known_hosts").display()
        ),
        overlay,
        serial_log: vm.spec.serial_log.clone(),
        accel: format!("{accel:?}").to_lowercase(),
    };
    // Not the result (that ends the stream): the guest runs on.
    if ui.json {
        ui.event("ready", &info)?;
    } else {
        ui.result("boot", &(), format!("{}\n", info.ssh_command))?;
    }
    ui.say(format!(
        "the guest is up; changes go to {} (the image is not written). Ctrl-C powers it off.",
        info.overlay.display()
    ));
    // Run until Ctrl-C or until the guest powers itself off.
    loop {
        tokio::select! {
            _ = ui.interrupted() => {
                ui.say("powering the guest off (up to 60 s, then forced)");
                let clean = vm.power_off(Duration::from_secs(60)).await?;
                ui.say(if clean { "the guest powered off" } else { "the guest did not power off in time: QEMU was stopped" });
                return ui.result("boot", &serde_json::json!({"powered_off": if clean { "cleanly" } else { "forced" }}), String::new());
            }
            _ = tokio::time::sleep(Duration::from_millis(500)) => {
                if !vm.is_running() {
                    ui.say("the guest powered off");
                    return ui.result("boot", &serde_json::json!({"powered_off": "by itself"}), String::new());
                }
            }
        }
    }
}
