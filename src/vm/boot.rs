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
    pub memory: cmdline::Memory,
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
    record_in(s, facts, &dir, None).await?;
    Ok(dir)
}

/// The same, into DIR (a backup version's `versions/ID.boot`), taking
/// from REUSE (an older version's) the files that have not changed.
pub async fn record_in(
    s: &crate::ssh::Session,
    facts: &crate::remote::Facts,
    dir: &Path,
    reuse: Option<&Path>,
) -> Result<()> {
    let dir = dir.to_path_buf();
    let seal = super::seal::Seal::from_facts(facts, &s.host())?;
    let allowed = super::proxy::allow_list(
        &facts.sources,
        facts.os.get("ID").map(String::as_str).unwrap_or(""),
        &[],
    );
    crate::remote::bootfiles::fetch_reusing(s, &facts.cmdline, &dir, reuse).await?;
    let rec = Recorded {
        seal,
        allowed_hosts: allowed,
    };
    std::fs::write(dir.join("seal.json"), serde_json::to_string_pretty(&rec)?)?;
    Ok(())
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
    let stamp = crate::util::now().replace(':', "");
    Ok(crate::paths::boots_dir()?.join(format!("{stem}-{}", &stamp[..15.min(stamp.len())])))
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// `drydock boot`. Over 80 lines for its `VmSpec` literal (20) and the
/// `ready` report; each decision is a function below.
pub async fn boot(opts: &BootOptions, ui: &Ui) -> Result<()> {
    let memory_mib = opts.memory.mib();
    if !opts.image.is_file() {
        return Err(crate::errors::usage!(
            "{} is neither an image file nor the id of a backup version (`drydock backups` \
             lists them)",
            opts.image.display()
        ));
    }
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&opts.dir)
            .with_context(|| format!("cannot create {}", opts.dir.display()))?;
    }
    let accel = cmdline::detect_accel();
    if accel == Accel::Tcg {
        ui.warn("no usable KVM (no vmx/svm CPU flag, or /dev/kvm does not open): the VM runs under software emulation (TCG), several times slower");
    }
    let shape = match &opts.like {
        Some(p) => load_shape(p)?,
        None => Shape::default(),
    };
    let efi = efi_for(&shape, &opts.dir)?;
    let recorded = load_recorded(&opts.image);
    let direct = direct_boot(opts, &recorded)?;
    let allowed: Vec<String> = recorded
        .as_ref()
        .map(|(_, r)| r.allowed_hosts.clone())
        .unwrap_or_default();
    let (_proxy, sealed) = network(opts, &shape, &allowed)?;
    let overlay = opts.dir.join("overlay.qcow2");
    if !overlay.exists() {
        image::create_overlay(&opts.image, &overlay).await?;
    }
    let spec = VmSpec {
        hotplug_ports: Vec::new(),
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
    say_what_runs(ui, opts, &recorded, &allowed, &vm, memory_mib);
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
    run_until_stopped(&mut vm, ui).await
}

/// What `drydock pull` recorded beside IMAGE: the VPS's kernel and seal.
pub fn load_recorded(image: &Path) -> Option<(crate::remote::bootfiles::BootFiles, Recorded)> {
    load_recorded_in(&boot_dir(image)).ok()
}

/// The boot files and seal recorded in DIR.
pub fn load_recorded_in(dir: &Path) -> Result<(crate::remote::bootfiles::BootFiles, Recorded)> {
    let b = crate::remote::bootfiles::BootFiles::load(dir)?;
    let p = dir.join("seal.json");
    let text =
        std::fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))?;
    let r = serde_json::from_str(&text).with_context(|| format!("{} is damaged", p.display()))?;
    Ok((b, r))
}

/// The sealed boot: the VPS's own kernel started directly with the seal
/// on its command line; none with `--services`. Refused without a
/// recorded kernel.
fn direct_boot(
    opts: &BootOptions,
    recorded: &Option<(crate::remote::bootfiles::BootFiles, Recorded)>,
) -> Result<Option<cmdline::DirectBoot>> {
    if opts.services {
        return Ok(None);
    }
    let Some((b, r)) = recorded else {
        return Err(crate::errors::refused!(
            "{} has no recorded kernel ({} is written by `drydock pull`): drydock boot holds an image's services back by booting the kernel its VPS runs, with only SSH and the network started. Pull the disk with drydock, or boot with --services to let the image's own services run (its network stays sealed unless --network open)",
            opts.image.display(),
            boot_dir(&opts.image).display()
        ));
    };
    Ok(Some(cmdline::DirectBoot {
        kernel: b.kernel.clone(),
        initrd: b.initrd.clone(),
        append: r.seal.kernel_cmdline(&b.cmdline)?,
    }))
}

/// The guest's network: open, or sealed with (when package sources were
/// recorded) the allow-listing proxy, which lives as long as the first
/// value.
fn network(
    opts: &BootOptions,
    shape: &Shape,
    allowed: &[String],
) -> Result<(Option<super::proxy::Proxy>, Option<cmdline::NetSeal>)> {
    let proxy = if opts.network_open || allowed.is_empty() {
        None
    } else {
        Some(super::proxy::Proxy::start(
            &opts.dir.join("proxy.sock"),
            allowed,
            &opts.dir.join("network.log"),
            None,
        )?)
    };
    let proxy_ip = cmdline::proxy_addr(shape);
    let sealed = (!opts.network_open).then(|| cmdline::NetSeal {
        proxy: proxy.as_ref().map(|p| {
            let exe = super::proxy::relay_program();
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
    Ok((proxy, sealed))
}

/// What runs in the guest, its network, and where its console goes.
fn say_what_runs(
    ui: &Ui,
    opts: &BootOptions,
    recorded: &Option<(crate::remote::bootfiles::BootFiles, Recorded)>,
    allowed: &[String],
    vm: &Vm,
    memory_mib: u64,
) {
    match (recorded, opts.services) {
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
            "network: sealed; allowed: {} (through http_proxy=http://{}:{}/)",
            allowed.join(" "),
            cmdline::proxy_addr(&vm.spec.shape),
            super::proxy::GUEST_PORT
        ));
    }
    ui.say(format!(
        "booting {} ({} MiB, {} CPUs, {}; {}); serial console in {}",
        opts.image.display(),
        memory_mib,
        vm.spec.cpus,
        if vm.spec.accel == Accel::Kvm {
            "KVM"
        } else {
            "TCG"
        },
        vm.spec.shape.describe(),
        vm.spec.serial_log.display()
    ));
    for n in &vm.spec.shape.notes {
        ui.say(format!("note: {n}"));
    }
}

/// Until a signal (the guest powered off, up to 60 s, then QEMU stopped)
/// or until the guest powers itself off; the result says which.
async fn run_until_stopped(vm: &mut Vm, ui: &Ui) -> Result<()> {
    loop {
        tokio::select! {
            _ = ui.interrupted() => {
                ui.say("powering the guest off (up to 60 s, then forced)");
                let clean = vm.power_off(Duration::from_secs(60)).await?;
                ui.say(if clean { "the guest powered off" } else { "the guest did not power off in time: QEMU was stopped" });
                let how = if clean { "cleanly" } else { "forced" };
                return ui.result("boot", &serde_json::json!({"powered_off": how}), String::new());
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
