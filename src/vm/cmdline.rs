//! The QEMU command line, built from small pure functions (each unit-tested,
//! the whole logged at debug level).

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use super::shape::{DiskBus, Shape};

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
    /// Boot parity with the VPS: firmware, disk bus, NIC and network.
    pub shape: Shape,
    /// UEFI: OVMF's code (read-only) and this VM's own copy of its
    /// variables store. None boots with SeaBIOS.
    pub efi: Option<(PathBuf, PathBuf)>,
    /// Boot this kernel directly instead of the disk's boot loader.
    pub direct: Option<DirectBoot>,
    /// The network seal: `restrict=on`, the capture, the proxy forward.
    /// None leaves QEMU's user network open to the internet.
    pub sealed: Option<NetSeal>,
    /// PCI Express root ports left empty, named by these ids, for disks
    /// attached after boot (q35's root bus takes no hot-plugged device).
    /// Last on the command line: no other device's slot moves.
    pub hotplug_ports: Vec<String>,
}

/// QEMU's direct kernel boot (`-kernel`, `-initrd`, `-append`).
#[derive(Debug, Clone)]
pub struct DirectBoot {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub append: String,
}

/// A sealed user network: nothing leaves but through `proxy` (the guest's
/// address and port, and the command QEMU spawns per connection), and the
/// guest's packets are captured to `pcap` to name what was refused.
#[derive(Debug, Clone)]
pub struct NetSeal {
    pub proxy: Option<(std::net::Ipv4Addr, String)>,
    pub pcap: PathBuf,
}

/// The proxy's address in the guest's subnet: the highest host address
/// that is neither the gateway, the nameserver nor the guest.
pub fn proxy_addr(shape: &Shape) -> std::net::Ipv4Addr {
    let (net, prefix, used) = match shape.user_net().0 {
        Some(u) => (
            u.net,
            u.prefix,
            vec![u.host, u.guest, u.dns.unwrap_or(u.host)],
        ),
        None => (
            std::net::Ipv4Addr::new(10, 0, 2, 0),
            24,
            vec![
                std::net::Ipv4Addr::new(10, 0, 2, 2),
                std::net::Ipv4Addr::new(10, 0, 2, 3),
                std::net::Ipv4Addr::new(10, 0, 2, 15),
            ],
        ),
    };
    let base = u32::from(net) & (u32::MAX.checked_shl(32 - prefix as u32).unwrap_or(0));
    let size = 1u32.checked_shl(32 - prefix as u32).unwrap_or(0);
    (1..size.saturating_sub(1))
        .rev()
        .map(|i| std::net::Ipv4Addr::from(base + i))
        .find(|a| !used.contains(a))
        .unwrap_or(std::net::Ipv4Addr::new(10, 0, 2, 254))
}

pub fn direct_args(d: Option<&DirectBoot>) -> Vec<OsString> {
    let Some(d) = d else { return Vec::new() };
    let mut a = vec![os("-kernel"), d.kernel.clone().into_os_string()];
    if let Some(i) = &d.initrd {
        a.extend([os("-initrd"), i.clone().into_os_string()]);
    }
    a.extend([os("-append"), os(d.append.clone())]);
    a
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

fn qemu_path(p: &Path) -> String {
    // QEMU's option syntax doubles commas in values.
    p.to_string_lossy().replace(',', ",,")
}

/// The disk on the VPS's bus, so the guest sees it under the same name,
/// saying of itself what the VPS's disk says (ID: serial, SCSI identity,
/// WWN), so that it has the same /dev/disk/by-id names.
pub fn drive_args(
    disk: &Path,
    format: &str,
    bus: DiskBus,
    id: Option<&super::diskid::DiskId>,
) -> Vec<OsString> {
    let file = format!(
        "file={},format={format},cache=writeback,discard=unmap",
        qemu_path(disk)
    );
    let props = id.map(|i| i.qemu_props(bus)).unwrap_or_default();
    let devices: Vec<String> = match bus {
        DiskBus::VirtioBlk => {
            if props.is_empty() {
                return vec![os("-drive"), os(format!("{file},if=virtio"))];
            }
            vec![format!("virtio-blk-pci,drive=disk0{props}")]
        }
        DiskBus::VirtioScsi => vec![
            "virtio-scsi-pci,id=scsi0".into(),
            format!("scsi-hd,drive=disk0,bus=scsi0.0{props}"),
        ],
        // q35's own AHCI controller is called "ide".
        DiskBus::Sata => vec![format!("ide-hd,drive=disk0,bus=ide.0{props}")],
        DiskBus::Nvme => {
            // QEMU's NVMe needs a serial.
            let serial = if props.is_empty() {
                ",serial=drydock0"
            } else {
                ""
            };
            vec![format!("nvme,drive=disk0{serial}{props}")]
        }
    };
    let mut a = vec![os("-drive"), os(format!("{file},if=none,id=disk0"))];
    for d in devices {
        a.extend([os("-device"), os(d)]);
    }
    a
}

/// UEFI: OVMF as two flash devices, its code read-only and a variables
/// store of this VM's own.
pub fn firmware_args(efi: Option<&(PathBuf, PathBuf)>) -> Vec<OsString> {
    let Some((code, vars)) = efi else {
        return Vec::new();
    };
    vec![
        os("-drive"),
        os(format!(
            "if=pflash,format=raw,unit=0,readonly=on,file={}",
            qemu_path(code)
        )),
        os("-drive"),
        os(format!(
            "if=pflash,format=raw,unit=1,file={}",
            qemu_path(vars)
        )),
    ]
}

/// "52:54:00:12:34:56": what may reach QEMU's command line as a MAC.
fn is_mac(m: &str) -> bool {
    m.len() == 17
        && m.split(':')
            .all(|b| b.len() == 2 && b.chars().all(|c| c.is_ascii_hexdigit()))
}

/// The NIC with the VPS's MAC and PCI slot, on a user network shaped as
/// the VPS's (subnet, gateway, DNS, the VPS's address as the first DHCP
/// lease); SSH forwarded from 127.0.0.1 to the guest's address.
pub fn net_args(ssh_port: u16, shape: &Shape, sealed: Option<&NetSeal>) -> Vec<OsString> {
    let mut dev = "virtio-net-pci,netdev=n0".to_string();
    if let Some(nic) = &shape.nic {
        // From the VPS: only a MAC reaches QEMU's command line as one.
        if let Some(m) = nic.mac.as_deref().filter(|m| is_mac(m)) {
            dev.push_str(&format!(",mac={m}"));
        }
        if let Some(slot) = &nic.pci_slot {
            dev.push_str(&format!(",addr={slot}"));
        }
    }
    let mut user = "user,id=n0".to_string();
    let guest = match shape.user_net().0 {
        Some(u) => {
            user.push_str(&format!(
                ",net={}/{},host={},dhcpstart={}",
                u.net, u.prefix, u.host, u.guest
            ));
            if let Some(d) = u.dns {
                user.push_str(&format!(",dns={d}"));
            }
            u.guest.to_string()
        }
        None => String::new(),
    };
    user.push_str(&format!(",hostfwd=tcp:127.0.0.1:{ssh_port}-{guest}:22"));
    let mut extra = Vec::new();
    if let Some(seal) = sealed {
        user.push_str(",restrict=on,ipv6=off");
        if let Some((ip, cmd)) = &seal.proxy {
            user.push_str(&format!(
                ",guestfwd=tcp:{ip}:{}-cmd:{}",
                super::proxy::GUEST_PORT,
                cmd.replace(',', ",,")
            ));
        }
        extra = vec![
            os("-object"),
            os(format!(
                "filter-dump,id=seal0,netdev=n0,maxlen=160,file={}",
                qemu_path(&seal.pcap)
            )),
        ];
    }
    let mut a = vec![os("-netdev"), os(user), os("-device"), os(dev)];
    a.extend(extra);
    // The VPS's other NICs: each on a user network of its own that reaches
    // nothing (restrict=on: no forward, no way out, sealed or not).
    for (i, n) in shape.more_nics.iter().enumerate() {
        let id = format!("n{}", i + 1);
        let mut dev = format!("virtio-net-pci,netdev={id}");
        if let Some(m) = n.mac.as_deref().filter(|m| is_mac(m)) {
            dev.push_str(&format!(",mac={m}"));
        }
        if let Some(slot) = &n.pci_slot {
            dev.push_str(&format!(",addr={slot}"));
        }
        a.extend([
            os("-netdev"),
            os(format!("user,id={id},restrict=on,ipv6=off")),
            os("-device"),
            os(dev),
        ]);
    }
    a
}

/// Where the firmware's debug port writes, beside the serial console.
pub fn firmware_log(serial_log: &Path) -> PathBuf {
    serial_log.with_file_name("firmware.log")
}

pub fn control_args(qmp_socket: &Path, serial_log: &Path) -> Vec<OsString> {
    let mut qmp = OsString::from("unix:");
    qmp.push(qmp_socket);
    qmp.push(",server=on,wait=off");
    let mut serial = OsString::from("file:");
    serial.push(serial_log);
    // The firmware's own messages (SeaBIOS's "No bootable device.", which
    // it prints on the screen, not the serial port) on QEMU's debug port.
    let mut firmware = OsString::from("file,id=firmware,path=");
    firmware.push(firmware_log(serial_log));
    vec![
        os("-qmp"),
        qmp,
        os("-serial"),
        serial,
        os("-chardev"),
        firmware,
        os("-device"),
        os("isa-debugcon,iobase=0x402,chardev=firmware"),
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
    a.extend(firmware_args(spec.efi.as_ref()));
    a.extend(direct_args(spec.direct.as_ref()));
    // The NIC first: its PCI slot is fixed, the disk's is not.
    a.extend(net_args(spec.ssh_port, &spec.shape, spec.sealed.as_ref()));
    a.extend(drive_args(
        &spec.disk,
        &spec.disk_format,
        spec.shape.disk_bus,
        spec.shape.disk_id.as_ref(),
    ));
    a.extend(control_args(&spec.qmp_socket, &spec.serial_log));
    // A write of zeros reaches the image as data, never as a zero cluster:
    // a zero cluster in an overlay then only ever comes from a discard
    // (`image::discarded_ranges`).
    a.push(os("-global"));
    a.push(os("virtio-blk-pci.write-zeroes=off"));
    for (i, id) in spec.hotplug_ports.iter().enumerate() {
        a.push(os("-device"));
        a.push(os(format!(
            "pcie-root-port,id={id},chassis={},slot=0",
            100 + i
        )));
    }
    a
}

/// A VM's memory in MiB, parsed once, where the command line is read
/// (`cli.rs`): at least 128 MiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Memory(u64);

impl Memory {
    /// "8G", "512M", "2048" (MiB); None below 128 MiB or unreadable.
    pub fn parse(s: &str) -> Option<Memory> {
        parse_memory(s).map(Memory)
    }

    pub fn mib(self) -> u64 {
        self.0
    }
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
        .and_then(|n| n.checked_mul(mul))
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
            hotplug_ports: Vec::new(),
            disk: PathBuf::from("/runs/a,b/overlay.qcow2"),
            disk_format: "qcow2".into(),
            memory_mib: 4096,
            cpus: 2,
            accel: Accel::Tcg,
            ssh_port: 2222,
            qmp_socket: PathBuf::from("/runs/x/qmp.sock"),
            serial_log: PathBuf::from("/runs/x/serial.log"),
            shape: Shape {
                nic: Some(crate::vm::shape::Nic {
                    mac: Some("52:54:00:12:34:56".into()),
                    ..Default::default()
                }),
                ..Default::default()
            },
            efi: None,
            direct: None,
            sealed: None,
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
            joined.contains("-drive file=/runs/a,,b/overlay.qcow2,format=qcow2,cache=writeback,discard=unmap,if=virtio"),
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
        assert!(!joined.contains("pflash"), "{joined}");
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
    fn a_shaped_vm() {
        use crate::vm::shape::{Firmware, Nic};
        let shape = Shape {
            firmware: Firmware::Uefi,
            disk_bus: DiskBus::Sata,
            disk_name: Some("sda".into()),
            nic: Some(Nic {
                name: "ens3".into(),
                mac: Some("96:00:01:02:03:04".into()),
                pci_slot: Some("03.0".into()),
                address: Some("192.0.2.10".parse().unwrap()),
                prefix: Some(24),
                gateway: Some("192.0.2.1".parse().unwrap()),
                dns: Some("192.0.2.53".parse().unwrap()),
            }),
            disk_id: None,
            more_nics: vec![],
            notes: vec![],
        };
        let a: Vec<String> = net_args(2222, &shape, None)
            .into_iter()
            .chain(drive_args(
                Path::new("/d/o.qcow2"),
                "qcow2",
                shape.disk_bus,
                None,
            ))
            .chain(firmware_args(Some(&(
                PathBuf::from("/usr/share/OVMF/OVMF_CODE_4M.fd"),
                PathBuf::from("/runs/x/efivars.fd"),
            ))))
            .map(|s| s.into_string().unwrap())
            .collect();
        assert_eq!(
            a,
            [
                "-netdev",
                "user,id=n0,net=192.0.2.0/24,host=192.0.2.1,dhcpstart=192.0.2.10,dns=192.0.2.53,hostfwd=tcp:127.0.0.1:2222-192.0.2.10:22",
                "-device",
                "virtio-net-pci,netdev=n0,mac=96:00:01:02:03:04,addr=03.0",
                "-drive",
                "file=/d/o.qcow2,format=qcow2,cache=writeback,discard=unmap,if=none,id=disk0",
                "-device",
                "ide-hd,drive=disk0,bus=ide.0",
                "-drive",
                "if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd",
                "-drive",
                "if=pflash,format=raw,unit=1,file=/runs/x/efivars.fd",
            ]
        );
    }

    #[test]
    fn each_disk_bus() {
        let line = |bus| {
            drive_args(Path::new("/d/i.raw"), "raw", bus, None)
                .into_iter()
                .map(|s| s.into_string().unwrap())
                .collect::<Vec<_>>()
                .join(" ")
        };
        let file = "-drive file=/d/i.raw,format=raw,cache=writeback,discard=unmap";
        assert_eq!(line(DiskBus::VirtioBlk), format!("{file},if=virtio"));
        assert_eq!(
            line(DiskBus::VirtioScsi),
            format!(
                "{file},if=none,id=disk0 -device virtio-scsi-pci,id=scsi0 -device scsi-hd,drive=disk0,bus=scsi0.0"
            )
        );
        assert_eq!(
            line(DiskBus::Nvme),
            format!("{file},if=none,id=disk0 -device nvme,drive=disk0,serial=drydock0")
        );
    }

    #[test]
    fn a_sealed_network_and_a_direct_boot() {
        let shape = Shape::default();
        let ip = proxy_addr(&shape);
        assert_eq!(ip.to_string(), "10.0.2.254");
        let seal = NetSeal {
            proxy: Some((ip, "'/usr/bin/drydock' __relay '/r,1/proxy.sock'".into())),
            pcap: PathBuf::from("/r/net.pcap"),
        };
        let a: Vec<String> = net_args(2222, &shape, Some(&seal))
            .into_iter()
            .chain(direct_args(Some(&DirectBoot {
                kernel: "/r/boot/vmlinuz".into(),
                initrd: Some("/r/boot/initrd".into()),
                append: "root=/dev/vda1 systemd.unit=sysinit.target".into(),
            })))
            .map(|s| s.into_string().unwrap())
            .collect();
        assert_eq!(
            a,
            [
                "-netdev",
                "user,id=n0,hostfwd=tcp:127.0.0.1:2222-:22,restrict=on,ipv6=off,guestfwd=tcp:10.0.2.254:3128-cmd:'/usr/bin/drydock' __relay '/r,,1/proxy.sock'",
                "-device",
                "virtio-net-pci,netdev=n0",
                "-object",
                "filter-dump,id=seal0,netdev=n0,maxlen=160,file=/r/net.pcap",
                "-kernel",
                "/r/boot/vmlinuz",
                "-initrd",
                "/r/boot/initrd",
                "-append",
                "root=/dev/vda1 systemd.unit=sysinit.target",
            ]
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
