//! What one POSIX shell script tells about the host, and the parsing of it.
//!
//! Everything is gathered in one round trip from files every Linux has
//! (/proc, /sys, /etc/os-release) and from `ip` where present, so the same
//! script works on Debian, NixOS and busybox systems. Parsing is local and
//! unit-tested on real captures.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use serde::Serialize;

/// The script; each section starts with a line `@@ name`.
pub fn facts_script() -> String {
    FACTS_SCRIPT.replace("@DISKID@", crate::vm::diskid::FACTS_SECTION)
}

/// `facts_script`'s text, the disk identity's section left to fill in.
const FACTS_SCRIPT: &str = r#"
export LC_ALL=C PATH="$PATH:/usr/sbin:/sbin:/usr/bin:/bin:/run/current-system/sw/bin"
s() { printf '\n@@ %s\n' "$1"; }
s os-release; cat /etc/os-release 2>/dev/null || cat /usr/lib/os-release 2>/dev/null
s uname; uname -r; uname -m
s id; id -u
s boot-id; cat /proc/sys/kernel/random/boot_id
s meminfo; cat /proc/meminfo
s cpus; grep -c '^processor' /proc/cpuinfo
s mountinfo; cat /proc/self/mountinfo
s swaps; cat /proc/swaps
s block
for d in /sys/class/block/*; do
  [ -e "$d/dev" ] || continue
  n=${d##*/}
  if [ -e "$d/partition" ]; then kind=part; parent=$(basename "$(dirname "$(readlink -f "$d")")"); else kind=disk; parent=-; fi
  slaves=$(ls "$d/slaves" 2>/dev/null | tr '\n' ',')
  ro=$(cat "$d/ro" 2>/dev/null)
  printf '%s %s %s %s %s %s %s\n' "$n" "$(cat "$d/dev")" "$(cat "$d/size")" "$kind" "$parent" "${slaves:--}" "${ro:-0}"
done
s firmware; if [ -d /sys/firmware/efi ]; then echo uefi; else echo bios; fi
s init; cat /proc/1/comm
s links; ip -o link show 2>/dev/null
s addrs; ip -o addr show 2>/dev/null
s routes; ip route show 2>/dev/null; ip -6 route show 2>/dev/null
s resolv; cat /etc/resolv.conf 2>/dev/null
s sysfs
for d in /sys/class/net/*; do [ -e "$d" ] && echo "net ${d##*/} $(readlink -f "$d")"; done
for d in /sys/class/block/*; do [ -e "$d/partition" ] || echo "block ${d##*/} $(readlink -f "$d")"; done
s nix; if grep -qs '^ID=nixos' /etc/os-release; then [ -e /etc/nixos/flake.nix ] && echo "flake /etc/nixos/flake.nix"; nix-channel --list 2>/dev/null | sed 's/^/channel /'; fi
s cmdline; cat /proc/cmdline
s units
if [ -d /run/systemd/system ]; then
  for d in /etc/systemd/system /run/systemd/generator /run/systemd/generator.late; do
    for w in "$d"/*.wants "$d"/*.requires; do
      [ -d "$w" ] || continue; t=${w##*/}; t=${t%.*}
      for u in "$w"/*; do [ -e "$u" ] || [ -L "$u" ] || continue; echo "file ${u##*/} $t"; done
    done
  done
  timeout 60 systemctl list-units --no-legend --no-pager --plain --state=active --type=service,socket 2>/dev/null | while read -r u _; do echo "active $u"; done
elif [ -d /run/openrc ] && command -v openrc >/dev/null 2>&1; then
  echo openrc
  for l in /etc/runlevels/*/; do
    [ -d "$l" ] || continue; lv=${l%/}; lv=${lv##*/}
    for u in "$l"*; do [ -e "$u" ] || [ -L "$u" ] || continue; echo "level ${u##*/} $lv"; done
  done
  for u in /run/openrc/started/*; do [ -e "$u" ] || [ -L "$u" ] || continue; echo "active ${u##*/}"; done
fi
s sources
grep -hs '^[[:space:]]*deb' /etc/apt/sources.list /etc/apt/sources.list.d/*.list | sed 's/^/apt /'
grep -hsi '^[[:space:]]*URIs:' /etc/apt/sources.list.d/*.sources | sed 's/^/apt /'
grep -hs '^[[:space:]]*[^#[:space:]]' /etc/apk/repositories | sed 's/^/apk /'
grep -hsE '^[[:space:]]*(extra-)?substituters[[:space:]]*=' /etc/nix/nix.conf | sed 's/^/nix /'
s tools; for t in dd sha256sum openssl split ldd mount systemctl sync; do command -v "$t" >/dev/null 2>&1 && echo "$t"; done
@DISKID@s end
"#;

#[derive(Debug, Clone, Serialize)]
pub struct Mount {
    pub mount_point: String,
    pub source: String,
    pub fstype: String,
    /// major:minor of the filesystem's device.
    pub dev: String,
    pub read_only: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct BlockDev {
    pub name: String,
    pub dev: String,
    pub size_bytes: u64,
    pub is_partition: bool,
    pub parent: Option<String>,
    pub slaves: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Swap {
    pub path: String,
    pub kind: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Facts {
    pub os: BTreeMap<String, String>,
    pub kernel: String,
    pub arch: String,
    pub uid: u32,
    pub boot_id: String,
    pub mem_total_bytes: u64,
    /// Online CPUs (/proc/cpuinfo's processors; 0 if not said).
    pub cpus: u32,
    pub mounts: Vec<Mount>,
    pub swaps: Vec<Swap>,
    pub block: Vec<BlockDev>,
    pub firmware: String,
    pub init: String,
    pub links: Vec<String>,
    pub addrs: Vec<String>,
    pub routes: Vec<String>,
    pub dns: Vec<String>,
    /// ("net" | "block", name, resolved /sys path): which bus a NIC or a
    /// disk sits on.
    pub sysfs: Vec<(String, String, String)>,
    /// NixOS: "flake PATH", "channel NAME URL" (root's channels).
    pub nix: Vec<String>,
    pub tools: Vec<String>,
    /// The kernel command line the VPS booted with (/proc/cmdline).
    pub cmdline: String,
    /// systemd's view: "file UNIT TARGET" (enabled into TARGET by a
    /// symlink in a .wants/.requires folder of /etc or of a generator),
    /// "active UNIT". OpenRC's: "openrc", then "level SERVICE RUNLEVEL"
    /// (a link in /etc/runlevels/RUNLEVEL), "active SERVICE" (started).
    pub units: Vec<String>,
    /// Package sources: "apt LINE", "apk LINE", "nix LINE".
    pub sources: Vec<String>,
    /// The disks' names and identities (`vm::diskid`): "link by-id/NAME
    /// KERNEL", "prop KERNEL KEY=VALUE".
    pub disk_ids: Vec<String>,
}

fn sections(text: &str) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut cur: Option<String> = None;
    for line in text.lines() {
        if let Some(name) = line.strip_prefix("@@ ") {
            cur = Some(name.trim().to_string());
            out.entry(name.trim().to_string()).or_default();
        } else if let Some(c) = &cur
            && !line.is_empty()
        {
            out.get_mut(c).expect("entry made").push(line.to_string());
        }
    }
    out
}

/// Undo the octal escapes /proc/self/mountinfo uses for spaces and such.
fn unescape_mount(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 4]).unwrap_or("0"), 8);
            out.push(v.unwrap_or(b'?'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn parse_mountinfo(lines: &[String]) -> Vec<Mount> {
    lines
        .iter()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let sep = f.iter().position(|w| *w == "-")?;
            let opts = f.get(5)?;
            let super_opts = f.get(sep + 3).copied().unwrap_or("");
            let ro = opts.split(',').any(|o| o == "ro") || super_opts.split(',').any(|o| o == "ro");
            Some(Mount {
                dev: f.get(2)?.to_string(),
                mount_point: unescape_mount(f.get(4)?),
                fstype: f.get(sep + 1)?.to_string(),
                source: unescape_mount(f.get(sep + 2)?),
                read_only: ro,
            })
        })
        .collect()
}

/// The facts script's answer, section by section. Long but flat: one
/// short block per section of the script, in the script's order, so the
/// two read side by side.
pub fn parse(text: &str) -> Result<Facts> {
    let s = sections(text);
    anyhow::ensure!(
        s.contains_key("end"),
        "the host's answer was cut short (no end marker)"
    );
    let get = |k: &str| s.get(k).cloned().unwrap_or_default();
    let os = get("os-release")
        .iter()
        .filter_map(|l| {
            let (k, v) = l.split_once('=')?;
            Some((
                k.to_string(),
                v.trim_matches('"').trim_matches('\'').to_string(),
            ))
        })
        .collect();
    let uname = get("uname");
    let mem_total_bytes = get("meminfo")
        .iter()
        .find_map(|l| {
            let rest = l.strip_prefix("MemTotal:")?;
            let kb: u64 = rest.trim().trim_end_matches("kB").trim().parse().ok()?;
            Some(kb * 1024)
        })
        .unwrap_or(0);
    let swaps = get("swaps")
        .iter()
        .skip(1)
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            Some(Swap {
                path: unescape_mount(w.next()?),
                kind: w.next()?.to_string(),
            })
        })
        .collect();
    let block = get("block")
        .iter()
        .filter_map(|l| {
            let w: Vec<&str> = l.split(' ').collect();
            if w.len() < 6 {
                return None;
            }
            Some(BlockDev {
                name: w[0].to_string(),
                dev: w[1].to_string(),
                size_bytes: w[2].parse::<u64>().ok()? * 512,
                is_partition: w[3] == "part",
                parent: (w[4] != "-").then(|| w[4].to_string()),
                slaves: w[5]
                    .split(',')
                    .filter(|x| !x.is_empty() && *x != "-")
                    .map(str::to_string)
                    .collect(),
            })
        })
        .collect();
    Ok(Facts {
        os,
        kernel: uname.first().cloned().unwrap_or_default(),
        arch: uname.get(1).cloned().unwrap_or_default(),
        uid: get("id")
            .first()
            .and_then(|l| l.trim().parse().ok())
            .context("the host did not say which user we are (id -u)")?,
        boot_id: get("boot-id").first().cloned().unwrap_or_default(),
        mem_total_bytes,
        cpus: get("cpus")
            .first()
            .and_then(|l| l.trim().parse().ok())
            .unwrap_or(0),
        mounts: parse_mountinfo(&get("mountinfo")),
        swaps,
        block,
        firmware: get("firmware").first().cloned().unwrap_or_default(),
        init: get("init").first().cloned().unwrap_or_default(),
        links: get("links"),
        addrs: get("addrs"),
        routes: get("routes"),
        dns: get("resolv")
            .iter()
            .filter_map(|l| l.strip_prefix("nameserver").map(|v| v.trim().to_string()))
            .collect(),
        sysfs: get("sysfs")
            .iter()
            .filter_map(|l| {
                let mut w = l.splitn(3, ' ');
                Some((
                    w.next()?.to_string(),
                    w.next()?.to_string(),
                    w.next()?.to_string(),
                ))
            })
            .collect(),
        nix: get("nix"),
        tools: get("tools"),
        cmdline: get("cmdline").first().cloned().unwrap_or_default(),
        units: get("units"),
        sources: get("sources"),
        disk_ids: get("diskid"),
    })
}

impl Facts {
    /// Each interface of `ip -o link show` with its link-layer address:
    /// "2: ens3: <...> mtu 1500 ... link/ether 52:54:00:.. brd ..." gives
    /// ("ens3", Some("52:54:00:..")); "ens3@if2" is named "ens3".
    pub fn interfaces(&self) -> Vec<(String, Option<String>)> {
        self.links
            .iter()
            .filter_map(|l| {
                let w: Vec<&str> = l.split_whitespace().collect();
                let name = w.get(1)?.trim_end_matches(':').split('@').next()?;
                let addr = w
                    .iter()
                    .position(|x| x.starts_with("link/"))
                    .and_then(|i| w.get(i + 1))
                    .map(|m| m.to_ascii_lowercase());
                Some((name.to_string(), addr))
            })
            .collect()
    }

    /// OpenRC manages the services (whatever PID 1 is: sysvinit's init,
    /// busybox's, openrc-init).
    pub fn openrc(&self) -> bool {
        self.units.iter().any(|l| l == "openrc")
    }

    pub fn has_tool(&self, t: &str) -> bool {
        self.tools.iter().any(|x| x == t)
    }

    fn block_by_name(&self, name: &str) -> Option<&BlockDev> {
        self.block.iter().find(|b| b.name == name)
    }

    fn block_by_dev(&self, dev: &str) -> Option<&BlockDev> {
        self.block.iter().find(|b| b.dev == dev)
    }

    /// The whole disks under a block device: itself, its parent disk for a
    /// partition, the disks below device-mapper/md devices.
    pub fn disks_under(&self, name: &str) -> Vec<String> {
        let mut out = Vec::new();
        self.collect_disks(name, &mut out, 0);
        out
    }

    fn collect_disks(&self, name: &str, out: &mut Vec<String>, depth: u32) {
        let Some(b) = self.block_by_name(name) else {
            return;
        };
        if depth > 8 {
            return;
        }
        if b.is_partition {
            if let Some(p) = &b.parent {
                self.collect_disks(p, out, depth + 1);
            }
        } else if !b.slaves.is_empty() {
            for s in &b.slaves {
                self.collect_disks(s, out, depth + 1);
            }
        } else if !out.contains(&b.name) {
            out.push(b.name.clone());
        }
    }

    /// The block device a mount lives on: by its source path, else by major:minor.
    fn mount_block(&self, m: &Mount) -> Option<&BlockDev> {
        m.source
            .strip_prefix("/dev/")
            .and_then(|n| self.block_by_name(n.trim_start_matches("mapper/")))
            .or_else(|| self.block_by_dev(&m.dev))
    }

    /// The whole disk that holds `/`, as /dev/NAME.
    pub fn root_disk(&self) -> Result<String> {
        let root = self
            .mounts
            .iter()
            .rev()
            .find(|m| m.mount_point == "/")
            .context("the host has no / in /proc/self/mountinfo")?;
        let b = self.mount_block(root).with_context(|| {
            format!(
                "cannot tell which disk holds / (mounted from {} [{}], {}); name it with --device",
                root.source, root.dev, root.fstype
            )
        })?;
        let disks = self.disks_under(&b.name);
        match disks.as_slice() {
            [one] => Ok(format!("/dev/{one}")),
            [] => anyhow::bail!(
                "cannot tell which disk holds / ({}); name it with --device",
                root.source
            ),
            many => anyhow::bail!(
                "/ spans several disks ({}); drydock moves one disk: name it with --device",
                many.join(", ")
            ),
        }
    }

    /// Mounts whose filesystem lives on the disk /dev/NAME (any partition,
    /// any device-mapper volume on it).
    pub fn mounts_on_disk(&self, disk_name: &str) -> Vec<&Mount> {
        self.mounts
            .iter()
            .filter(|m| {
                self.mount_block(m)
                    .map(|b| self.disks_under(&b.name).iter().any(|d| d == disk_name))
                    .unwrap_or(false)
            })
            .collect()
    }

    /// Swap areas on the disk /dev/NAME.
    pub fn swaps_on_disk(&self, disk_name: &str) -> Vec<&Swap> {
        self.swaps
            .iter()
            .filter(|s| {
                s.kind == "partition"
                    && s.path
                        .strip_prefix("/dev/")
                        .map(|n| self.disks_under(n).iter().any(|d| d == disk_name))
                        .unwrap_or(false)
            })
            .collect()
    }

    pub fn block_device(&self, disk_name: &str) -> Option<&BlockDev> {
        self.block_by_name(disk_name)
    }

    pub fn pretty_name(&self) -> String {
        self.os
            .get("PRETTY_NAME")
            .cloned()
            .unwrap_or_else(|| "unknown Linux".to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "
@@ os-release
PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"
ID=debian
VERSION_ID=\"12\"
@@ uname
6.1.0-27-cloud-amd64
x86_64
@@ id
0
@@ boot-id
0f4b6a5e-1111-2222-3333-444455556666
@@ meminfo
MemTotal:         999424 kB
@@ mountinfo
22 1 254:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw,errors=remount-ro
23 22 0:21 / /proc rw,relatime - proc proc rw
24 22 254:15 / /boot/efi rw,relatime - vfat /dev/vda15 rw
25 22 253:0 / /srv/my\\040data ro,relatime - ext4 /dev/mapper/vg-data ro
@@ swaps
Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority
/dev/vda2                               partition\t1048572\t\t0\t\t-2
@@ block
vda 254:0 52428800 disk - - 0
vda1 254:1 50000000 part vda - 0
vda2 254:2 2097152 part vda - 0
vda15 254:15 262144 part vda - 0
vdb 254:16 20971520 disk - - 0
dm-0 253:0 20971520 disk - vdb, 0
@@ firmware
uefi
@@ init
systemd
@@ tools
dd
sha256sum
@@ end
";

    #[test]
    fn resolves_root_disk_mounts_and_swap() {
        let f = parse(SAMPLE).unwrap();
        assert_eq!(f.os["VERSION_ID"], "12");
        assert_eq!(f.mem_total_bytes, 999424 * 1024);
        assert_eq!(f.root_disk().unwrap(), "/dev/vda");
        let on_vda: Vec<&str> = f
            .mounts_on_disk("vda")
            .iter()
            .map(|m| m.mount_point.as_str())
            .collect();
        assert_eq!(on_vda, vec!["/", "/boot/efi"]);
        let on_vdb = f.mounts_on_disk("vdb");
        assert_eq!(on_vdb[0].mount_point, "/srv/my data");
        assert!(on_vdb[0].read_only);
        assert_eq!(f.swaps_on_disk("vda").len(), 1);
        assert_eq!(f.swaps_on_disk("vdb").len(), 0);
        assert_eq!(f.block_device("vda").unwrap().size_bytes, 52428800 * 512);
    }

    #[test]
    fn interfaces_with_their_addresses() {
        let f = parse(
            "@@ id\n0\n@@ links\n\
             1: lo: <LOOPBACK,UP,LOWER_UP> mtu 65536 qdisc noqueue state UNKNOWN mode DEFAULT group default qlen 1000\\    link/loopback 00:00:00:00:00:00 brd 00:00:00:00:00:00\n\
             2: ens3: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1500 qdisc fq_codel state UP mode DEFAULT group default qlen 1000\\    link/ether 96:00:01:AB:CD:EF brd ff:ff:ff:ff:ff:ff\n\
             3: veth0@if2: <BROADCAST,MULTICAST> mtu 1500 qdisc noop state DOWN mode DEFAULT group default qlen 1000\\    link/ether 0a:58:0a:f4:00:01 brd ff:ff:ff:ff:ff:ff link-netnsid 0\n\
             4: wg0: <POINTOPOINT,NOARP,UP,LOWER_UP> mtu 1420 qdisc noqueue state UNKNOWN mode DEFAULT group default qlen 1000\\    link/none \n\
             @@ end\n",
        )
        .unwrap();
        let i = f.interfaces();
        assert_eq!(i[0], ("lo".into(), Some("00:00:00:00:00:00".into())));
        assert_eq!(i[1], ("ens3".into(), Some("96:00:01:ab:cd:ef".into())));
        assert_eq!(i[2].0, "veth0");
        assert_eq!(i[3], ("wg0".into(), None));
    }

    #[test]
    fn a_cut_answer_is_an_error() {
        let cut = &SAMPLE[..SAMPLE.find("@@ end").unwrap()];
        assert!(parse(cut).is_err());
    }
}
