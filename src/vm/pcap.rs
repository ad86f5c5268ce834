//! What the sealed guest tried to reach on its own, read from QEMU's
//! filter-dump of its NIC (a pcap file): libslirp drops or resets these
//! silently under `restrict=on`, so the packet capture is the only place a
//! refused DNS query or connection can be seen with its destination.

use std::net::Ipv4Addr;
use std::path::Path;

/// One refused destination and how many packets went to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub what: String,
    pub packets: u32,
}

/// DNS question name of a query (no compression in questions).
fn dns_name(p: &[u8]) -> Option<String> {
    let mut i = 12;
    let mut labels = Vec::new();
    loop {
        let n = *p.get(i)? as usize;
        if n == 0 {
            break;
        }
        if n & 0xc0 != 0 {
            return None;
        }
        labels.push(String::from_utf8_lossy(p.get(i + 1..i + 1 + n)?).into_owned());
        i += 1 + n;
    }
    Some(labels.join("."))
}

/// The packets the guest sent that are not DHCP, not answers from the VM's
/// SSH forward and not to `allowed` (the proxy: address and port).
pub fn refused(pcap: &[u8], allowed: (Ipv4Addr, u16)) -> Vec<Refused> {
    let mut out: Vec<Refused> = Vec::new();
    let mut add = |what: String| match out.iter_mut().find(|r| r.what == what) {
        Some(r) => r.packets += 1,
        None => out.push(Refused { what, packets: 1 }),
    };
    if pcap.len() < 24 {
        return Vec::new();
    }
    let le = pcap[0..4] == [0xd4, 0xc3, 0xb2, 0xa1];
    let u32_at = |b: &[u8], i: usize| -> u32 {
        let a = [b[i], b[i + 1], b[i + 2], b[i + 3]];
        if le {
            u32::from_le_bytes(a)
        } else {
            u32::from_be_bytes(a)
        }
    };
    let mut off = 24;
    while off + 16 <= pcap.len() {
        let incl = u32_at(pcap, off + 8) as usize;
        let Some(f) = pcap.get(off + 16..off + 16 + incl) else {
            break;
        };
        off += 16 + incl;
        // Ethernet, IPv4 only (the seal turns slirp's IPv6 off); frames
        // from slirp itself (52:55:..) are answers, not attempts.
        if f.len() < 34 || f[6..8] == [0x52, 0x55] || f[12..14] != [0x08, 0x00] {
            continue;
        }
        let ip = &f[14..];
        let ihl = ((ip[0] & 0x0f) as usize) * 4;
        let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
        let Some(l4) = ip.get(ihl..) else { continue };
        match ip[9] {
            6 if l4.len() >= 14 => {
                let (sport, dport) = (
                    u16::from_be_bytes([l4[0], l4[1]]),
                    u16::from_be_bytes([l4[2], l4[3]]),
                );
                let flags = l4[13];
                // A SYN without ACK opens a connection; the SSH forward's
                // answers leave from port 22.
                if flags & 0x02 != 0 && flags & 0x10 == 0 && sport != 22 && (dst, dport) != allowed
                {
                    add(format!("tcp {dst}:{dport}"));
                }
            }
            17 if l4.len() >= 8 => {
                let dport = u16::from_be_bytes([l4[2], l4[3]]);
                if dport == 67 {
                    continue;
                }
                match (dport, dns_name(&l4[8..])) {
                    (53, Some(name)) => add(format!("DNS query for {name} (to {dst})")),
                    _ => add(format!("udp {dst}:{dport}")),
                }
            }
            1 => add(format!("icmp to {dst}")),
            _ => {}
        }
    }
    out
}

/// Read and remove a capture file: what it saw refused.
pub fn take(path: &Path, allowed: (Ipv4Addr, u16)) -> Vec<Refused> {
    let data = std::fs::read(path).unwrap_or_default();
    let _ = std::fs::remove_file(path);
    refused(&data, allowed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(proto: u8, dst: [u8; 4], l4: &[u8]) -> Vec<u8> {
        let mut f = vec![
            0x52, 0x54, 0, 0x12, 0x34, 0x56, 0x52, 0x54, 0, 0x12, 0x34, 0x56, 0x08, 0x00,
        ];
        let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 64, proto, 0, 0, 10, 0, 2, 15];
        ip.extend(dst);
        f.extend(ip);
        f.extend(l4);
        f
    }

    fn pcap(frames: &[Vec<u8>]) -> Vec<u8> {
        let mut p = vec![0xd4, 0xc3, 0xb2, 0xa1, 2, 0, 4, 0];
        p.extend([0u8; 16]);
        for f in frames {
            p.extend([0u8; 8]);
            p.extend((f.len() as u32).to_le_bytes());
            p.extend((f.len() as u32).to_le_bytes());
            p.extend(f);
        }
        p
    }

    #[test]
    fn refused_attempts_are_named_and_counted() {
        let syn = |port: u16| {
            let mut t = vec![0xc0, 0x01];
            t.extend(port.to_be_bytes());
            t.extend([0u8; 9]);
            t.push(0x02);
            t.extend([0u8; 6]);
            t
        };
        let mut dns = vec![0xc0, 0x02, 0, 53, 0, 0, 0, 0];
        dns.extend([0u8; 12]);
        dns.extend(b"\x04evil\x07example\x00\x00\x01\x00\x01");
        let dhcp = vec![0, 68, 0, 67, 0, 0, 0, 0];
        let p = pcap(&[
            frame(6, [10, 0, 2, 2], &syn(18080)),
            frame(6, [10, 0, 2, 2], &syn(18080)),
            frame(6, [10, 0, 2, 254], &syn(3128)),
            frame(17, [10, 0, 2, 3], &dns),
            frame(17, [255, 255, 255, 255], &dhcp),
        ]);
        let r = refused(&p, (Ipv4Addr::new(10, 0, 2, 254), 3128));
        assert_eq!(
            r,
            [
                Refused {
                    what: "tcp 10.0.2.2:18080".into(),
                    packets: 2
                },
                Refused {
                    what: "DNS query for evil.example (to 10.0.2.3)".into(),
                    packets: 1
                },
            ]
        );
    }
}
