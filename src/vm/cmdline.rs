//! The QEMU command line, built from small pure functions (each unit-tested,
//! the whole logged at debug level).

use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// How the guest's CPU is run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

/// KVM only when the CPU flags say the hardware can (vmx or svm) *and*
/// /dev/kvm opens: on some hosts /dev/kvm exists without working, and QEMU
/// with `-accel kvm` then hangs instead of failing.
pub fn choose_accel(cpuinfo: &str, dev_kvm_opens: bool) -> Accel {
    let flags_ok = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    if flags_ok && dev_kvm_opens {
        Accel::Kvm
    } else {
        Accel::Tcg
    }
}

pub fn detect_accel() -> Accel {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let opens = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    choose_accel(&cpuinfo, opens)
}

/// Everything that decides the command line.
#[derive(Debug, Clone)]
pub struct VmSpec {
    pub disk: PathBuf,
    /// "qcow2" for an overlay, "raw" for a plain image.
    pub disk_format: String,
    pub memory_mib: u64,
    pub cpus: u32,
    pub accel: Accel,
    /// Host port on 127.0.0.1 forwarded to the guest's port 22.
    pub ssh_port: u16,
    pub qmp_socket: PathBuf,
    pub serial_log: PathBuf,
    pub mac: Option<String>,
}

fn os(s: impl Into<String>) -> OsString {
    OsString::from(s.into())
}

pub fn machine_args(accel: Accel) -> Vec<OsString> {
    match accel {
        Accel::Kvm => vec![os("-machine"), os("q35,accel=kvm"), os("-cpu"), os("host")],
        // TCG: a CPU model that every Debian kernel runs on.
        Accel::Tcg => vec![os("-machine"), os("q35,accel=tcg"), os("-cpu"), os("max")],
    }
}

pub fn resource_args(memory_mib: u64, cpus: u32) -> Vec<OsString> {
    vec![
        os("-m"),
        os(format!("{memory_mib}M")),
        os("-smp"),
        os(cpus.to_string()),
    ]
}

pub fn drive_args(disk: &Path, format: &str) -> Vec<OsString> {
    let mut spec = OsString::from("file=");
    // QEMU's option syntax doubles commas in values.
    spec.push(disk.as_os_str().to_string_lossy().replace(',', ",,"));
    spec.push(format!(
        ",format={format},if=virtio,cache=writeback,discard=unmap"
    ));
    vec![os("-drive"), spec]
}

pub fn net_args(ssh_port: u16, mac: Option<&str>) -> Vec<OsString> {
    let mut dev = "virtio-net-pci,netdev=n0".to_string();
    if let Some(m) = mac {
        dev.push_str(&format!(",mac={m}"));
    }
    vec![
        os("-netdev"),
        os(format!("user,id=n0,hostfwd=tcp:127.0.0.1:{ssh_port}-:22")),
        os("-device"),
        os(dev),
    ]
}

pub fn control_args(qmp_socket: &Path, serial_log: &Path) -> Vec<OsString> {
    let mut qmp = OsString::from("unix:");
    qmp.push(qmp_socket);
    qmp.push(",server=on,wait=off");
    let mut serial = OsString::from("file:");
    serial.push(serial_log);
    vec![
        os("-qmp"),
        qmp,
        os("-serial"),
        serial,
        os("-display"),
        os("none"),
        os("-nodefaults"),
        os("-no-user-config"),
    ]
}

pub fn qemu_args(spec: &VmSpec) -> Vec<OsString> {
    let mut a = Vec::new();
    a.extend(machine_args(spec.accel));
    a.extend(resource_args(spec.memory_mib, spec.cpus));
    a.extend(drive_args(&spec.disk, &spec.disk_format));
    a.extend(net_args(spec.ssh_port, spec.mac.as_deref()));
    a.extend(control_args(&spec.qmp_socket, &spec.serial_log));
    a
}

/// "8G", "512M", "2048" (MiB) → MiB.
pub fn parse_memory(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mul) = match s.chars().last()? {
        'G' | 'g' => (&s[..s.len() - 1], 1024),
        'M' | 'm' => (&s[..s.len() - 1], 1),
        'T' | 't' => (&s[..s.len() - 1], 1024 * 1024),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .ok()
        .map(|n| n * mul)
        .filter(|&n| n >= 128)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kvm_only_with_flags_and_a_working_device() {
        let with = "processor: 0\nflags\t\t: fpu vme sse2 vmx aes\n";
        let without = "processor: 0\nflags\t\t: fpu vme sse2 aes sha_ni\n";
        assert_eq!(choose_accel(with, true), Accel::Kvm);
        assert_eq!(choose_accel(with, false), Accel::Tcg);
        // /dev/kvm opens but the CPU has no virtualisation: QEMU would hang.
        assert_eq!(choose_accel(without, true), Accel::Tcg);
    }

    #[test]
    fn command_line_pieces() {
        let spec = VmSpec {
            disk: PathBuf::from("/runs/a,b/overlay.qcow2"),
            disk_format: "qcow2".into(),
            memory_mib: 4096,
            cpus: 2,
            accel: Accel::Tcg,
            ssh_port: 2222,
            qmp_socket: PathBuf::from("/runs/x/qmp.sock"),
            serial_log: PathBuf::from("/runs/x/serial.log"),
            mac: Some("52:54:00:12:34:56".into()),
        };
        let a: Vec<String> = qemu_args(&spec)
            .into_iter()
            .map(|s| s.into_string().unwrap())
            .collect();
        let joined = a.join(" ");
        assert!(
            joined.contains("-machine q35,accel=tcg -cpu max -m 4096M -smp 2"),
            "{joined}"
        );
        assert!(
            joined.contains("-drive file=/runs/a,,b/overlay.qcow2,format=qcow2,if=virtio"),
            "{joined}"
        );
        assert!(
            joined.contains("hostfwd=tcp:127.0.0.1:2222-:22"),
            "{joined}"
        );
        assert!(
            joined.contains("virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56"),
            "{joined}"
        );
        assert!(
            joined.contains("-qmp unix:/runs/x/qmp.sock,server=on,wait=off"),
            "{joined}"
        );
        assert!(
            joined.contains("-serial file:/runs/x/serial.log"),
            "{joined}"
        );
    }

    #[test]
    fn memory_sizes() {
        assert_eq!(parse_memory("8G"), Some(8192));
        assert_eq!(parse_memory("512M"), Some(512));
        assert_eq!(parse_memory("2048"), Some(2048));
        assert_eq!(parse_memory("64M"), None);
        assert_eq!(parse_memory("lots"), None);
    }
}
