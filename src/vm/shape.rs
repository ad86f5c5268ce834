//! Boot parity: the worker VM shaped as the VPS, from what the probe found.
//! Firmware (BIOS or UEFI), the bus the disk is on (so it keeps its name:
//! vda, sda, nvme0n1), and the NIC the default route leaves by: its MAC,
//! its PCI slot (so a predictable name such as ens3 stays the same) and
//! QEMU's user network laid out as the VPS's subnet, gateway and DNS, so
//! that a static configuration comes up and reaches the internet.
//!
//! What cannot be reproduced is said (`notes`), never guessed around.

use std::fmt::Write;
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use crate::remote::facts::Facts;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Firmware {
    #[default]
    Bios,
    Uefi,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DiskBus {
    #[default]
    VirtioBlk,
    VirtioScsi,
    Sata,
    Nvme,
}

impl DiskBus {
    pub fn describe(self) -> &'static str {
        match self {
            DiskBus::VirtioBlk => "virtio-blk",
            DiskBus::VirtioScsi => "virtio-scsi",
            DiskBus::Sata => "SATA (AHCI)",
            DiskBus::Nvme => "NVMe",
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Nic {
    /// The interface's name on the VPS (for messages; QEMU cannot set it,
    /// the slot and the MAC decide it).
    pub name: String,
    pub mac: Option<String>,
    /// Slot on PCI bus 0 ("03.0"), when the NIC sits there.
    pub pci_slot: Option<String>,
    pub address: Option<Ipv4Addr>,
    pub prefix: Option<u8>,
    pub gateway: Option<Ipv4Addr>,
    pub dns: Option<Ipv4Addr>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shape {
    pub firmware: Firmware,
    pub disk_bus: DiskBus,
    /// The disk's name on the VPS (vda, sda, nvme0n1).
    pub disk_name: Option<String>,
    /// What the disk says of itself, so that it keeps its /dev/disk/by-id
    /// names (runs from before: none).
    #[serde(default)]
    pub disk_id: Option<super::diskid::DiskId>,
    pub nic: Option<Nic>,
    /// The VPS's other NICs (a private network, a second uplink): the same
    /// MACs and PCI slots, so that their configuration comes up in the
    /// worker VM, on networks of their own that reach nothing.
    #[serde(default)]
    pub more_nics: Vec<Nic>,
    /// What the worker VM cannot reproduce, said once to the user.
    #[serde(default)]
    pub notes: Vec<String>,
}

/// QEMU's user network, as the `-netdev user` options need it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserNet {
    pub net: Ipv4Addr,
    pub prefix: u8,
    pub host: Ipv4Addr,
    pub dns: Option<Ipv4Addr>,
    /// The VPS's own address: first DHCP lease, and where SSH is forwarded.
    pub guest: Ipv4Addr,
}

fn mask(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - prefix as u32)
    }
}

fn in_net(a: Ipv4Addr, net: Ipv4Addr, prefix: u8) -> bool {
    u32::from(a) & mask(prefix) == u32::from(net) & mask(prefix)
}

/// `ip -o addr show`: "2: ens3    inet 203.0.113.45/24 brd ... scope global ens3".
fn link_ipv4(addrs: &[String], name: &str) -> Option<(Ipv4Addr, u8)> {
    addrs.iter().find_map(|l| {
        let w: Vec<&str> = l.split_whitespace().collect();
        if w.get(1)?.trim_end_matches(':') != name || *w.get(2)? != "inet" {
            return None;
        }
        let (a, p) = w.get(3)?.split_once('/')?;
        Some((a.parse().ok()?, p.parse().ok()?))
    })
}

/// The IPv4 default route: (gateway, device).
fn default_route(routes: &[String]) -> Option<(Option<Ipv4Addr>, String)> {
    routes.iter().find_map(|l| {
        let w: Vec<&str> = l.split_whitespace().collect();
        if w.first() != Some(&"default") {
            return None;
        }
        let dev = w
            .iter()
            .position(|x| *x == "dev")
            .and_then(|i| w.get(i + 1))?;
        let via = w
            .iter()
            .position(|x| *x == "via")
            .and_then(|i| w.get(i + 1))
            .and_then(|g| g.parse::<Ipv4Addr>().ok());
        // An IPv6 default route says "via fe80::1": not ours.
        let v6 = w
            .iter()
            .position(|x| *x == "via")
            .and_then(|i| w.get(i + 1))
            .is_some_and(|g| g.contains(':'));
        (!v6).then(|| (via, dev.to_string()))
    })
}

/// "/sys/devices/pci0000:00/0000:00:03.0/virtio0" -> "03.0": only for a
/// device straight on bus 0 (behind a bridge, QEMU's default is kept).
fn bus0_slot(sysfs_path: &str) -> Option<String> {
    let mut parts = sysfs_path.split('/');
    parts.find(|p| p.starts_with("pci0000:"))?;
    let dev = parts.next()?;
    let rest = dev.strip_prefix("0000:00:")?;
    let (slot, func) = rest.split_once('.')?;
    (slot.len() == 2
        && slot.chars().all(|c| c.is_ascii_hexdigit())
        && func == "0"
        && slot != "00"
        && slot != "1f")
        .then(|| format!("{slot}.{func}"))
}

fn disk_bus(name: &str, sysfs_path: Option<&str>) -> (DiskBus, Option<String>) {
    if name.starts_with("vd") {
        return (DiskBus::VirtioBlk, None);
    }
    if name.starts_with("nvme") {
        return (DiskBus::Nvme, None);
    }
    let path = sysfs_path.unwrap_or("");
    if name.starts_with("sd") || name.starts_with("hd") {
        if path.contains("/ata") {
            // i440fx's PIIX IDE sits at 00:01.1; QEMU's q35 has AHCI only.
            let note = path.contains("/0000:00:01.1/").then(|| {
                format!(
                    "the disk {name} is on an IDE controller (PIIX); the worker VM offers it on SATA (AHCI), which boots only if the VPS's initramfs has the ahci driver"
                )
            });
            return (DiskBus::Sata, note);
        }
        if path.contains("/virtio") {
            return (DiskBus::VirtioScsi, None);
        }
        // Xen, Hyper-V and others: a SCSI disk is the nearest QEMU has.
        return (
            DiskBus::VirtioScsi,
            Some(format!(
                "the disk {name} is on a bus drydock cannot tell ({}); the worker VM puts it on virtio-scsi, where it is also called {name}",
                if path.is_empty() {
                    "no sysfs path"
                } else {
                    path
                }
            )),
        );
    }
    (
        DiskBus::VirtioBlk,
        Some(format!(
            "the disk {name} is of a kind drydock does not reproduce; the worker VM puts it on virtio-blk (vda): a system that mounts by UUID or label still boots, one that names /dev/{name} does not"
        )),
    )
}

/// The VPS's NIC named `dev`, as the worker VM reproduces it.
fn nic_of(f: &Facts, dev: String, gateway: Option<Ipv4Addr>) -> Nic {
    let ip = link_ipv4(&f.addrs, &dev);
    let dns = f.dns.iter().find_map(|d| d.parse::<Ipv4Addr>().ok());
    Nic {
        mac: f
            .interfaces()
            .into_iter()
            .find(|(n, _)| *n == dev)
            .and_then(|(_, mac)| mac),
        pci_slot: f
            .sysfs
            .iter()
            .find(|(k, n, _)| k == "net" && *n == dev)
            .and_then(|(_, _, p)| bus0_slot(p)),
        address: ip.map(|x| x.0),
        prefix: ip.map(|x| x.1),
        gateway,
        dns,
        name: dev,
    }
}

/// The VPS's physical NICs other than PRIMARY (not under
/// /sys/devices/virtual), by name, with their MACs and slots; at most 7
/// (QEMU's q35 has room, a VPS rarely has more).
fn other_nics(f: &Facts, primary: Option<&str>) -> Vec<Nic> {
    let mut v: Vec<Nic> = f
        .sysfs
        .iter()
        .filter(|(k, n, p)| k == "net" && !p.contains("/virtual/") && Some(n.as_str()) != primary)
        .filter_map(|(_, n, p)| {
            let mac = f
                .interfaces()
                .into_iter()
                .find(|(x, _)| x == n)
                .and_then(|(_, m)| m)?;
            Some(Nic {
                name: n.clone(),
                mac: Some(mac),
                pci_slot: bus0_slot(p),
                ..Nic::default()
            })
        })
        .collect();
    v.sort_by(|a, b| a.name.cmp(&b.name));
    v.truncate(7);
    v
}

/// The NIC of a VPS with no IPv4 default route: the device of its IPv6
/// default route when that is a physical NIC, else its one physical NIC
/// (not under /sys/devices/virtual: docker0, bridges, veths, tunnels). Err: the note saying
/// why none could be told.
fn nic_without_ipv4_route(f: &Facts) -> Result<String, String> {
    let v6 = f.routes.iter().find_map(|l| {
        let w: Vec<&str> = l.split_whitespace().collect();
        let via = w
            .iter()
            .position(|x| *x == "via")
            .and_then(|i| w.get(i + 1))?;
        let dev = w
            .iter()
            .position(|x| *x == "dev")
            .and_then(|i| w.get(i + 1))?;
        (w.first() == Some(&"default") && via.contains(':')).then(|| dev.to_string())
    });
    let physical: Vec<&str> = f
        .sysfs
        .iter()
        .filter(|(k, _, p)| k == "net" && !p.contains("/virtual/"))
        .map(|(_, n, _)| n.as_str())
        .collect();
    if let Some(dev) = v6.filter(|d| physical.contains(&d.as_str())) {
        return Ok(dev);
    }
    match physical.as_slice() {
        [one] => Ok(one.to_string()),
        [] => Err("the VPS has no IPv4 default route: the worker VM keeps QEMU's default network (10.0.2.0/24, DHCP)".into()),
        many => Err(format!(
            "the VPS has no default route to tell its NIC by ({}): the worker VM gets QEMU's default NIC and network (10.0.2.0/24, DHCP)",
            many.join(" ")
        )),
    }
}

impl Shape {
    /// The worker VM's shape for the VPS's disk.
    pub fn of(facts: &Facts, dev: &crate::remote::device::Device) -> Shape {
        match &dev.kind {
            crate::remote::device::Kind::Block { name } => Shape::from_facts(facts, name),
            crate::remote::device::Kind::File { .. } => {
                let mut s = Shape::from_facts(facts, "vda");
                s.notes.insert(
                    0,
                    format!(
                        "{} is a file on the host, not its disk: the worker VM puts it on virtio-blk (vda)",
                        dev.path
                    ),
                );
                s
            }
        }
    }

    /// The shape of the VPS whose disk is /dev/`disk_name`.
    pub fn from_facts(f: &Facts, disk_name: &str) -> Shape {
        let mut notes = Vec::new();
        let firmware = if f.firmware == "uefi" {
            Firmware::Uefi
        } else {
            Firmware::Bios
        };
        let (disk_bus, note) = disk_bus(
            disk_name,
            f.sysfs
                .iter()
                .find(|(k, n, _)| k == "block" && n == disk_name)
                .map(|(_, _, p)| p.as_str()),
        );
        notes.extend(note);
        let nic = match default_route(&f.routes) {
            Some((gateway, dev)) => Some(nic_of(f, dev, gateway)),
            // No IPv4 default route (an IPv6-only VPS): the NIC keeps its
            // MAC and slot, which the guest's network configuration may
            // match on (netplan and cloud-init do), on QEMU's default
            // network; user_net says so.
            None => match nic_without_ipv4_route(f) {
                Ok(dev) => Some(nic_of(f, dev, None)),
                Err(note) => {
                    notes.push(note);
                    None
                }
            },
        };
        let disk_id = super::diskid::DiskId::from_lines(&f.disk_ids, disk_name, disk_bus);
        // Without a NIC of the VPS's own first, QEMU's default one stands
        // alone (the note above says why).
        let more_nics = match &nic {
            Some(n) => other_nics(f, Some(n.name.as_str())),
            None => Vec::new(),
        };
        if !more_nics.is_empty() {
            notes.push(format!(
                "the VPS's other NIC(s) {} are in the worker VM with their MACs and slots, each on a network of its own that reaches nothing (their peers are not there)",
                more_nics
                    .iter()
                    .map(|n| n.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        let mut s = Shape {
            firmware,
            disk_bus,
            disk_name: Some(disk_name.to_string()),
            disk_id,
            nic,
            more_nics,
            notes,
        };
        let (_, more) = s.user_net();
        s.notes.extend(more);
        s
    }

    /// QEMU's user network laid out as the VPS's, or None (QEMU's
    /// default) with the reason when it cannot be.
    pub fn user_net(&self) -> (Option<UserNet>, Vec<String>) {
        let mut notes = Vec::new();
        let Some(nic) = &self.nic else {
            return (None, notes);
        };
        let (Some(addr), Some(prefix), Some(gw)) = (nic.address, nic.prefix, nic.gateway) else {
            notes.push(format!(
                "{} has no IPv4 address with a gateway: the worker VM keeps QEMU's default network (10.0.2.0/24, DHCP)",
                nic.name
            ));
            return (None, notes);
        };
        if !(8..=30).contains(&prefix) || !in_net(gw, addr, prefix) || gw == addr {
            notes.push(format!(
                "{} has {addr}/{prefix} with gateway {gw} outside that subnet (an on-link route): QEMU's user network cannot be shaped so; the worker VM keeps QEMU's default network (10.0.2.0/24, DHCP), so a static configuration of the VPS does not come up there",
                nic.name
            ));
            return (None, notes);
        }
        let dns = match nic.dns {
            Some(d) if in_net(d, addr, prefix) && d != gw && d != addr => Some(d),
            Some(d) if in_net(d, addr, prefix) => {
                notes.push(format!(
                    "the VPS's nameserver {d} is its gateway (or itself): QEMU answers DNS only at an address of its own, so names do not resolve in the worker VM unless its resolver is changed"
                ));
                None
            }
            // Outside the subnet: the guest reaches it through QEMU's NAT,
            // as the VPS does through its gateway.
            _ => None,
        };
        let net = Ipv4Addr::from(u32::from(addr) & mask(prefix));
        (
            Some(UserNet {
                net,
                prefix,
                host: gw,
                dns,
                guest: addr,
            }),
            notes,
        )
    }

    /// One paragraph for messages: what the worker VM has.
    pub fn describe(&self) -> String {
        let mut s = String::new();
        let _ = write!(
            s,
            "{}, disk {} on {}",
            match self.firmware {
                Firmware::Bios => "BIOS",
                Firmware::Uefi => "UEFI (OVMF)",
            },
            self.disk_name.as_deref().unwrap_or("?"),
            self.disk_bus.describe()
        );
        match &self.nic {
            None => s.push_str(", QEMU's default network"),
            Some(n) => {
                let _ = write!(s, ", NIC {}", n.name);
                if let Some(m) = &n.mac {
                    let _ = write!(s, " {m}");
                }
                if let Some(p) = &n.pci_slot {
                    let _ = write!(s, " at PCI slot {p}");
                }
                match self.user_net().0 {
                    Some(u) => {
                        let _ = write!(
                            s,
                            ", network {}/{} via {}{}",
                            u.guest,
                            u.prefix,
                            u.host,
                            u.dns.map(|d| format!(", DNS {d}")).unwrap_or_default()
                        );
                    }
                    None => s.push_str(", QEMU's default network"),
                }
            }
        }
        for n in &self.more_nics {
            let _ = write!(
                s,
                ", NIC {} {}{} (a network of its own)",
                n.name,
                n.mac.as_deref().unwrap_or("?"),
                n.pci_slot
                    .as_deref()
                    .map(|p| format!(" at PCI slot {p}"))
                    .unwrap_or_default()
            );
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::remote::facts::parse;

    fn facts(extra: &str) -> Facts {
        parse(&format!("@@ id\n0\n@@ firmware\nuefi\n{extra}\n@@ end\n")).unwrap()
    }

    /// Captured on the static-network fixture booted as the VPS
    /// (vm-fixtures/build-variant static): the facts script's network and
    /// sysfs sections, loop devices left out. Its IPv6 default route (via
    /// fe80::2, QEMU's router advertisement) is not the one to follow.
    const STATIC: &str = "@@ links
1: lo: <LOOPBACK,UP,LOWER_UP> mtu 65536 qdisc noqueue state UNKNOWN mode DEFAULT group default qlen 1000\\    link/loopback 00:00:00:00:00:00 brd 00:00:00:00:00:00
2: enp0s1: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1500 qdisc fq_codel state UP mode DEFAULT group default qlen 1000\\    link/ether 52:54:00:d7:d0:c4 brd ff:ff:ff:ff:ff:ff
@@ addrs
1: lo    inet 127.0.0.1/8 scope host lo\\       valid_lft forever preferred_lft forever
1: lo    inet6 ::1/128 scope host noprefixroute \\       valid_lft forever preferred_lft forever
2: enp0s1    inet 198.51.100.45/24 brd 198.51.100.255 scope global enp0s1\\       valid_lft forever preferred_lft forever
2: enp0s1    inet6 fec0::5054:ff:fed7:d0c4/64 scope site dynamic mngtmpaddr noprefixroute \\       valid_lft 86341sec preferred_lft 14341sec
2: enp0s1    inet6 fe80::5054:ff:fed7:d0c4/64 scope link \\       valid_lft forever preferred_lft forever
@@ routes
default via 198.51.100.1 dev enp0s1 proto static 
198.51.100.0/24 dev enp0s1 proto kernel scope link src 198.51.100.45 
fe80::/64 dev enp0s1 proto kernel metric 256 pref medium
fec0::/64 dev enp0s1 proto ra metric 1024 expires 86340sec pref medium
default via fe80::2 dev enp0s1 proto ra metric 1024 expires 1740sec pref medium
@@ resolv
nameserver 198.51.100.53
@@ sysfs
net enp0s1 /sys/devices/pci0000:00/0000:00:01.0/virtio0/net/enp0s1
net lo /sys/devices/virtual/net/lo
block vda /sys/devices/pci0000:00/0000:00:02.0/virtio1/block/vda";

    #[test]
    fn a_static_vps_is_reproduced() {
        let s = Shape::from_facts(&facts(STATIC), "vda");
        assert_eq!(s.firmware, Firmware::Uefi);
        assert_eq!(s.disk_bus, DiskBus::VirtioBlk);
        let n = s.nic.clone().unwrap();
        assert_eq!(n.name, "enp0s1");
        assert_eq!(n.mac.as_deref(), Some("52:54:00:d7:d0:c4"));
        assert_eq!(n.pci_slot.as_deref(), Some("01.0"));
        let (u, notes) = s.user_net();
        assert!(notes.is_empty(), "{notes:?}");
        assert_eq!(
            u.unwrap(),
            UserNet {
                net: "198.51.100.0".parse().unwrap(),
                prefix: 24,
                host: "198.51.100.1".parse().unwrap(),
                dns: Some("198.51.100.53".parse().unwrap()),
                guest: "198.51.100.45".parse().unwrap(),
            }
        );
        assert!(s.notes.is_empty(), "{:?}", s.notes);
        assert_eq!(
            s.describe(),
            "UEFI (OVMF), disk vda on virtio-blk, NIC enp0s1 52:54:00:d7:d0:c4 at PCI slot 01.0, network 198.51.100.45/24 via 198.51.100.1, DNS 198.51.100.53"
        );
    }

    #[test]
    fn an_on_link_gateway_keeps_the_default_network_and_says_so() {
        // Hetzner Cloud's layout: a /32 and a gateway reached on-link.
        let f = facts(
            "@@ links
2: eth0: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1500 qdisc fq_codel state UP mode DEFAULT group default qlen 1000\\    link/ether 96:00:01:02:03:04 brd ff:ff:ff:ff:ff:ff
@@ addrs
2: eth0    inet 95.217.1.2/32 metric 100 scope global dynamic eth0\\       valid_lft 85000sec preferred_lft 85000sec
@@ routes
default via 172.31.1.1 dev eth0 proto dhcp src 95.217.1.2 metric 100
172.31.1.1 dev eth0 proto dhcp scope link src 95.217.1.2 metric 100
@@ resolv
nameserver 185.12.64.1
@@ sysfs
block sda /sys/devices/pci0000:00/0000:00:02.5/0000:06:00.0/virtio5/host0/target0:0:0/0:0:0:0/block/sda",
        );
        let s = Shape::from_facts(&f, "sda");
        assert_eq!(s.disk_bus, DiskBus::VirtioScsi);
        assert_eq!(s.nic.as_ref().unwrap().pci_slot, None);
        assert!(s.user_net().0.is_none());
        assert_eq!(s.notes.len(), 1, "{:?}", s.notes);
        assert!(
            s.notes[0]
                .starts_with("eth0 has 95.217.1.2/32 with gateway 172.31.1.1 outside that subnet"),
            "{}",
            s.notes[0]
        );
    }

    /// An IPv6-only VPS (no IPv4 default route), netplan matching its NIC by
    /// MAC as cloud images do: the worker VM keeps the NIC's MAC and slot,
    /// on QEMU's default network. Without the MAC the guest's network does
    /// not come up and its SSH never answers (the cloud zoo fixture, booted
    /// with no IPv4 router, showed it).
    #[test]
    fn without_an_ipv4_default_route_the_nic_keeps_its_mac() {
        let v6_only = STATIC
            .replace("default via 198.51.100.1 dev enp0s1 proto static \n", "")
            .replace(
                "2: enp0s1    inet 198.51.100.45/24 brd 198.51.100.255 scope global enp0s1\\       valid_lft forever preferred_lft forever\n",
                "",
            );
        let s = Shape::from_facts(&facts(&v6_only), "vda");
        let n = s.nic.clone().expect("no NIC");
        assert_eq!(n.name, "enp0s1");
        assert_eq!(n.mac.as_deref(), Some("52:54:00:d7:d0:c4"));
        assert_eq!(n.pci_slot.as_deref(), Some("01.0"));
        assert!(s.user_net().0.is_none());
        assert_eq!(
            s.notes,
            vec!["enp0s1 has no IPv4 address with a gateway: the worker VM keeps QEMU's default network (10.0.2.0/24, DHCP)".to_string()]
        );
        // No default route at all (an address, no router): the one NIC.
        let no_route = v6_only.replace(
            "default via fe80::2 dev enp0s1 proto ra metric 1024 expires 1740sec pref medium\n",
            "",
        );
        let s = Shape::from_facts(&facts(&no_route), "vda");
        assert_eq!(
            s.nic.as_ref().and_then(|n| n.mac.as_deref()),
            Some("52:54:00:d7:d0:c4")
        );
        // An IPv6 default route through a virtual device (a WireGuard
        // tunnel, a bridge): not a NIC QEMU can give a MAC to; the one
        // physical NIC is.
        let tunnel = no_route
            .replace(
                "@@ resolv",
                "default via fd00::1 dev wg0 proto static metric 1024 pref medium\n@@ resolv",
            )
            .replace(
                "net lo /sys",
                "net wg0 /sys/devices/virtual/net/wg0\nnet lo /sys",
            );
        let s = Shape::from_facts(&facts(&tunnel), "vda");
        assert_eq!(s.nic.as_ref().map(|n| n.name.as_str()), Some("enp0s1"));
        // Two NICs and no route to tell them apart: neither, and said.
        let two = no_route
            .replace(
                "@@ addrs",
                "3: enp0s2: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1500 qdisc fq_codel state UP mode DEFAULT group default qlen 1000\\    link/ether 52:54:00:00:00:02 brd ff:ff:ff:ff:ff:ff\n@@ addrs",
            )
            .replace(
                "net lo /sys",
                "net enp0s2 /sys/devices/pci0000:00/0000:00:04.0/virtio3/net/enp0s2\nnet lo /sys",
            );
        let s = Shape::from_facts(&facts(&two), "vda");
        assert_eq!(s.nic, None);
        assert_eq!(
            s.notes,
            vec!["the VPS has no default route to tell its NIC by (enp0s1 enp0s2): the worker VM gets QEMU's default NIC and network (10.0.2.0/24, DHCP)".to_string()]
        );
    }

    #[test]
    fn buses_by_name_and_path() {
        assert_eq!(disk_bus("vda", None).0, DiskBus::VirtioBlk);
        assert_eq!(disk_bus("nvme0n1", None).0, DiskBus::Nvme);
        assert_eq!(
            disk_bus(
                "sda",
                Some(
                    "/sys/devices/pci0000:00/0000:00:1f.2/ata1/host0/target0:0:0/0:0:0:0/block/sda"
                )
            )
            .0,
            DiskBus::Sata
        );
        let (b, note) = disk_bus(
            "sda",
            Some("/sys/devices/pci0000:00/0000:00:01.1/ata1/host0/target0:0:0/0:0:0:0/block/sda"),
        );
        assert_eq!(b, DiskBus::Sata);
        assert!(note.unwrap().contains("IDE controller (PIIX)"));
        let (b, note) = disk_bus("xvda", None);
        assert_eq!(b, DiskBus::VirtioBlk);
        assert!(note.unwrap().starts_with("the disk xvda is of a kind"));
        assert_eq!(
            bus0_slot("/sys/devices/pci0000:00/0000:00:03.0/virtio0/net/ens3").as_deref(),
            Some("03.0")
        );
        assert_eq!(
            bus0_slot("/sys/devices/pci0000:00/0000:00:02.1/0000:02:00.0/virtio1/net/enp2s0"),
            None
        );
        assert_eq!(bus0_slot("/sys/devices/virtual/net/lo"), None);
    }

    #[test]
    fn dns_at_the_gateway_is_said() {
        let f = facts(&STATIC.replace("nameserver 198.51.100.53", "nameserver 198.51.100.1"));
        let s = Shape::from_facts(&f, "vda");
        assert!(s.user_net().0.unwrap().dns.is_none());
        assert!(
            s.notes[0].starts_with("the VPS's nameserver 198.51.100.1 is its gateway"),
            "{:?}",
            s.notes
        );
    }

    /// A DigitalOcean-like VPS: the public NIC (and its anchor address) by
    /// the default route, a private network on a second NIC. Both NICs are
    /// in the worker VM with their MACs and slots; the second on a network
    /// of its own that reaches nothing.
    #[test]
    fn a_second_nic_is_kept_on_a_network_of_its_own() {
        let two = STATIC
            .replace(
                "@@ addrs",
                "3: enp0s5: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1500 qdisc fq_codel state UP mode DEFAULT group default qlen 1000\\    link/ether 52:54:00:d0:00:02 brd ff:ff:ff:ff:ff:ff\n4: docker0: <NO-CARRIER,BROADCAST,MULTICAST,UP> mtu 1500 qdisc noqueue state DOWN mode DEFAULT group default \\    link/ether 02:42:ac:11:00:01 brd ff:ff:ff:ff:ff:ff\n@@ addrs",
            )
            .replace(
                "net lo /sys/devices/virtual/net/lo",
                "net lo /sys/devices/virtual/net/lo\nnet enp0s5 /sys/devices/pci0000:00/0000:00:05.0/virtio3/net/enp0s5\nnet docker0 /sys/devices/virtual/net/docker0",
            );
        let s = Shape::from_facts(&facts(&two), "vda");
        assert_eq!(s.nic.as_ref().unwrap().name, "enp0s1");
        assert_eq!(
            s.more_nics,
            [Nic {
                name: "enp0s5".into(),
                mac: Some("52:54:00:d0:00:02".into()),
                pci_slot: Some("05.0".into()),
                ..Nic::default()
            }]
        );
        assert!(
            s.describe().ends_with(
                ", NIC enp0s5 52:54:00:d0:00:02 at PCI slot 05.0 (a network of its own)"
            ),
            "{}",
            s.describe()
        );
        let a: Vec<String> = crate::vm::cmdline::net_args(2222, &s, None)
            .into_iter()
            .map(|x| x.into_string().unwrap())
            .collect();
        assert_eq!(
            a[a.len() - 4..],
            [
                "-netdev",
                "user,id=n1,restrict=on,ipv6=off",
                "-device",
                "virtio-net-pci,netdev=n1,mac=52:54:00:d0:00:02,addr=05.0"
            ]
        );
    }
}
