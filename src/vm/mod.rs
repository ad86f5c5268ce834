//! The local VM: QEMU started in its own process group and owned by a
//! guard (no QEMU outlives drydock), controlled over QMP, reached over SSH
//! through a port forward on 127.0.0.1.

pub mod boot;
pub mod cmdline;
pub mod diskid;
pub mod guest;
pub mod image;
pub mod pcap;
pub mod proxy;
pub mod qmp;
pub mod seal;
pub mod shape;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

pub use cmdline::{Accel, VmSpec};
use qmp::Qmp;

pub const QEMU: &str = "qemu-system-x86_64";

/// The last lines of the serial console, for errors.
pub fn serial_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let all: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let start = all.len().saturating_sub(lines);
    if all.is_empty() {
        return "(nothing was printed on the serial console)".to_string();
    }
    all[start..].join("\n  ")
}

pub struct Vm {
    child: Option<tokio::process::Child>,
    pub qmp: Qmp,
    pub spec: VmSpec,
    stderr_log: PathBuf,
}

impl Vm {
    /// Start QEMU and connect to its QMP socket.
    pub async fn start(mut spec: VmSpec, stderr_log: PathBuf) -> Result<Vm> {
        spec.qmp_socket = socket_path(&spec.qmp_socket);
        let args = cmdline::qemu_args(&spec);
        tracing::debug!(
            "{QEMU} {}",
            args.iter()
                .map(|a| a.to_string_lossy())
                .collect::<Vec<_>>()
                .join(" ")
        );
        let _ = std::fs::remove_file(&spec.qmp_socket);
        let stderr = std::fs::File::create(&stderr_log)
            .with_context(|| format!("cannot create {}", stderr_log.display()))?;
        let mut cmd = std::process::Command::new(QEMU);
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            // Its own process group: Ctrl-C reaches drydock, which then
            // powers the guest off cleanly instead of QEMU dying mid-write.
            .process_group(0);
        // And if drydock itself is killed (SIGKILL, a crash), the kernel
        // kills QEMU: no VM outlives drydock.
        // SAFETY: prctl is async-signal-safe and touches no Rust state.
        unsafe {
            cmd.pre_exec(|| {
                rustix::process::set_parent_process_death_signal(Some(
                    rustix::process::Signal::KILL,
                ))
                .map_err(std::io::Error::from)
            });
        }
        let mut child = tokio::process::Command::from(cmd)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {QEMU} (is qemu-system-x86 installed?)"))?;

        // Readiness: QEMU alive first, then its socket, with a deadline.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait()? {
                bail!(
                    "{QEMU} exited at start ({status}); it said:\n  {}",
                    std::fs::read_to_string(&stderr_log)
                        .unwrap_or_default()
                        .trim()
                        .replace('\n', "\n  ")
                );
            }
            if spec.qmp_socket.exists() {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "{QEMU} did not open its QMP socket {} within 30 s",
                    spec.qmp_socket.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let qmp = Qmp::connect(&spec.qmp_socket).await?;
        Ok(Vm {
            child: Some(child),
            qmp,
            spec,
            stderr_log,
        })
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// The guest's run state as QEMU reports it ("running", "paused", ...).
    pub async fn status(&mut self) -> Result<String> {
        let st = self.qmp.execute(qapi::qmp::query_status {}).await?;
        Ok(serde_json::to_value(st.status)?
            .as_str()
            .unwrap_or("?")
            .to_string())
    }

    /// Ask the guest to power off (ACPI), wait up to `deadline`; then make
    /// QEMU quit; then kill it. Returns true when the guest shut down itself.
    pub async fn power_off(&mut self, deadline: Duration) -> Result<bool> {
        let Some(child) = self.child.as_mut() else {
            return Ok(true);
        };
        if child.try_wait()?.is_some() {
            self.child = None;
            return Ok(true);
        }
        let _ = self.qmp.execute(qapi::qmp::system_powerdown {}).await;
        let clean = tokio::time::timeout(deadline, child.wait()).await.is_ok();
        if !clean {
            tracing::warn!(
                "the guest did not power off within {}s; stopping QEMU",
                deadline.as_secs()
            );
            let _ = self.qmp.execute(qapi::qmp::quit {}).await;
            if tokio::time::timeout(Duration::from_secs(10), child.wait())
                .await
                .is_err()
            {
                let _ = child.kill().await;
            }
        }
        self.child = None;
        Ok(clean)
    }

    /// Wait until the guest's sshd answers on the forwarded port (its banner).
    pub async fn wait_for_ssh(&mut self, deadline: Duration) -> Result<()> {
        let until = Instant::now() + deadline;
        loop {
            if !self.is_running() {
                bail!(
                    "the guest stopped before its SSH server answered; QEMU said: {}\n  serial console (last lines):\n  {}",
                    std::fs::read_to_string(&self.stderr_log)
                        .unwrap_or_default()
                        .trim(),
                    serial_tail(&self.spec.serial_log, 25)
                );
            }
            if ssh_banner(self.spec.ssh_port).await {
                return Ok(());
            }
            // A firmware with nothing to boot, a boot loader at its rescue
            // prompt, a kernel panic: nothing comes of waiting longer.
            let firmware = cmdline::firmware_log(&self.spec.serial_log);
            let tail = serial_tail(&self.spec.serial_log, 40);
            let said = crate::image::bootable::console_gave_up(&tail)
                .or_else(|| crate::image::bootable::console_gave_up(&serial_tail(&firmware, 10)));
            if let Some(said) = said {
                bail!(
                    "the guest will not come up: {said}; serial console (last lines):\n  {}\n  \
                     firmware ({}, last lines):\n  {}",
                    serial_tail(&self.spec.serial_log, 25),
                    firmware.display(),
                    serial_tail(&firmware, 6)
                );
            }
            if Instant::now() > until {
                bail!(
                    "the guest's SSH server did not answer within {}s; serial console (last lines):\n  {}",
                    deadline.as_secs(),
                    serial_tail(&self.spec.serial_log, 25)
                );
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

/// QEMU's user network accepts the forwarded connection at once even when
/// nothing listens in the guest; only an SSH banner proves sshd is up.
async fn ssh_banner(port: u16) -> bool {
    use tokio::io::AsyncReadExt;
    let Ok(Ok(mut s)) = tokio::time::timeout(
        Duration::from_secs(2),
        tokio::net::TcpStream::connect(("127.0.0.1", port)),
    )
    .await
    else {
        return false;
    };
    let mut buf = [0u8; 4];
    matches!(
        tokio::time::timeout(Duration::from_secs(3), s.read_exact(&mut buf)).await,
        Ok(Ok(_)) if &buf == b"SSH-"
    )
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut()
            && let Some(pid) = child.id()
        {
            // The whole group: QEMU and anything it started.
            let _ = rustix::process::kill_process_group(
                rustix::process::Pid::from_raw(pid as i32).expect("a child's pid is positive"),
                rustix::process::Signal::KILL,
            );
        }
    }
}

/// OVMF from Debian's `ovmf` package: (code, variables template).
const OVMF: &[(&str, &str)] = &[
    (
        "/usr/share/OVMF/OVMF_CODE_4M.fd",
        "/usr/share/OVMF/OVMF_VARS_4M.fd",
    ),
    (
        "/usr/share/OVMF/OVMF_CODE.fd",
        "/usr/share/OVMF/OVMF_VARS.fd",
    ),
];

/// OVMF's (code, variables template) among `candidates`, or the refusal
/// that says what to install.
fn find_ovmf<'a>(candidates: &[(&'a str, &'a str)]) -> Result<(&'a str, &'a str)> {
    candidates
        .iter()
        .find(|(c, v)| Path::new(c).is_file() && Path::new(v).is_file())
        .copied()
        .ok_or_else(|| {
            crate::errors::refused!(
                "the VPS boots with UEFI and this machine has no OVMF firmware for QEMU ({} not found); install Debian's package: apt-get install ovmf",
                candidates[0].0
            )
        })
}

/// Whether a VM of this shape can be started here (UEFI needs OVMF):
/// checked in the probe step, before the VPS is frozen.
pub fn check_firmware(shape: &shape::Shape) -> Result<()> {
    match shape.firmware {
        shape::Firmware::Uefi => find_ovmf(OVMF).map(|_| ()),
        shape::Firmware::Bios => Ok(()),
    }
}

/// What this workstation needs to run a VM of SHAPE (QEMU, qemu-img,
/// OVMF for UEFI), checked with the probe, before anything moves: a
/// missing tool found at the rehearsal came after a whole live pull.
pub fn check_workstation(shape: &shape::Shape) -> Result<()> {
    for (program, package) in [(QEMU, "qemu-system-x86"), ("qemu-img", "qemu-utils")] {
        if !in_path(program) {
            return Err(crate::errors::refused!(
                "{program} is not installed on this machine, and the worker VM needs it; \
                 install Debian's package: apt-get install {package}. Nothing was changed"
            ));
        }
    }
    check_firmware(shape)
}

/// Whether PROGRAM is an executable file in a folder of $PATH.
fn in_path(program: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::env::var_os("PATH").is_some_and(|p| {
        std::env::split_paths(&p).any(|d| {
            std::fs::metadata(d.join(program))
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
    })
}

/// The spec's firmware files, when its shape says UEFI: OVMF's code and a
/// variables store of the VM's own in `dir` (made from the template once,
/// then kept: the boot entries the guest writes survive its reboots, as on
/// the VPS). An empty store boots the disk's fallback loader,
/// EFI/BOOT/BOOTX64.EFI.
/// Where a unix socket wanted at WANT listens: there, unless the path is
/// too long for a socket address (108 bytes with its NUL; a deep home or
/// test folder reaches it, and QEMU then refuses to start). Then a short
/// path in `$XDG_RUNTIME_DIR` (else /tmp) named by WANT's hash, so that
/// every part of drydock that asks for WANT gets the same one. Sockets are
/// made under drydock's umask (0077): only their owner can connect.
pub fn socket_path(want: &Path) -> PathBuf {
    if want.as_os_str().len() < 100 {
        return want.to_path_buf();
    }
    let base = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute() && p.as_os_str().len() < 60)
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    let h = crate::image::manifest::sha256(want.as_os_str().as_encoded_bytes());
    base.join(format!(
        "drydock-{}.sock",
        &crate::image::manifest::to_hex(&h)[..16]
    ))
}

/// The UEFI variables of a VM, in its folder (a copy of OVMF's template).
pub const EFIVARS: &str = "efivars.fd";

pub fn efi_for(shape: &shape::Shape, dir: &Path) -> Result<Option<(PathBuf, PathBuf)>> {
    if shape.firmware == shape::Firmware::Bios {
        return Ok(None);
    }
    let (code, template) = find_ovmf(OVMF)?;
    let vars = dir.join(EFIVARS);
    if !vars.exists() {
        std::fs::copy(template, &vars)
            .with_context(|| format!("cannot copy {template} to {}", vars.display()))?;
    }
    Ok(Some((PathBuf::from(code), vars)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_socket_path_too_long_for_sun_path_is_made_short_and_stays_the_same() {
        let short = Path::new("/s/qmp.sock");
        assert_eq!(socket_path(short), short);
        let long = PathBuf::from(format!("/{}/qmp.sock", "d".repeat(120)));
        let p = socket_path(&long);
        assert!(p.as_os_str().len() < 100, "{}", p.display());
        assert_eq!(p, socket_path(&long));
        assert_ne!(p, socket_path(&long.with_file_name("proxy.sock")));
    }

    #[test]
    fn a_machine_without_ovmf_is_refused_with_what_to_install() {
        let e = find_ovmf(&[(
            "/nonexistent/OVMF_CODE_4M.fd",
            "/nonexistent/OVMF_VARS_4M.fd",
        )])
        .unwrap_err();
        assert!(e.downcast_ref::<crate::errors::Refused>().is_some(), "{e}");
        assert_eq!(
            e.to_string(),
            "the VPS boots with UEFI and this machine has no OVMF firmware for QEMU (/nonexistent/OVMF_CODE_4M.fd not found); install Debian's package: apt-get install ovmf"
        );
        let bios = shape::Shape::default();
        assert!(check_firmware(&bios).is_ok());
    }
}
