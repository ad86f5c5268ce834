//! Disk identity: the worker VM's disk has the names the VPS's disk has.
//!
//! grub-pc's and grub-efi's install devices, fstab, crypttab, mdadm and ZFS
//! name a disk by `/dev/disk/by-id` (and sometimes `by-path`), and those
//! names come from what the disk says of itself: virtio-blk its serial,
//! SCSI its vendor, product, serial, device identifier (VPD page 0x83) and
//! WWN, NVMe its model, serial and EUI-64. A worker VM whose disk says
//! nothing has none of those names: Debian's grub-pc postinst then stops
//! the upgrade ("... does not exist, so cannot grub-install to it!").
//!
//! The probe records the VPS's links under /dev/disk/by-id and by-path and
//! udev's properties of the disk; the worker's disk is given the same
//! serial, vendor, product, device_id and WWN where QEMU can set them
//! (`qemu_props`). What QEMU cannot reproduce (an NVMe model or EUI-64:
//! QEMU 7.2 sets neither; a by-path name of another controller) is made
//! by a udev rule
//! (`udev_rule`): in /run for the sealed boots, written on the disk for the
//! verify boot and removed again (and checked gone) before its power-off,
//! like the rest of the seal. Every value from the VPS is checked against a
//! strict character set before it reaches QEMU's command line or a rule.

use serde::{Deserialize, Serialize};

use super::shape::DiskBus;

/// The facts script's section (one round trip, no question to PID 1):
/// "link by-id/NAME KERNEL" for every link to a block device, and "prop
/// KERNEL KEY=VALUE" for udev's identity properties of each whole disk.
pub const FACTS_SECTION: &str = r#"s diskid
for l in /dev/disk/by-id/* /dev/disk/by-path/*; do
  [ -L "$l" ] || continue
  t=$(readlink -f "$l"); echo "link ${l#/dev/disk/} ${t##*/}"
done
if command -v udevadm >/dev/null 2>&1; then
  for d in /sys/class/block/*; do
    [ -e "$d/partition" ] && continue
    n=${d##*/}
    case $n in loop*|ram*|sr*|zram*|nbd*|dm-*|md*) continue ;; esac
    udevadm info --query=property --name="/dev/$n" 2>/dev/null \
      | grep -E '^(ID_SERIAL|ID_SERIAL_SHORT|ID_SCSI_SERIAL|ID_WWN|ID_VENDOR|ID_MODEL|ID_VENDOR_ENC|ID_MODEL_ENC)=' \
      | sed "s|^|prop $n |"
  done
fi
"#;

/// The identity of the VPS's disk, as the worker VM reproduces it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskId {
    pub serial: Option<String>,
    /// SCSI: INQUIRY's vendor and product.
    pub vendor: Option<String>,
    pub product: Option<String>,
    /// SCSI: VPD page 0x83's vendor-specific designator.
    pub device_id: Option<String>,
    /// SCSI, SATA: the WWN (NAA).
    pub wwn: Option<u64>,
    /// The VPS's links to the disk and its partitions ("by-id/NAME",
    /// kernel name): those the worker lacks are made by a udev rule.
    pub links: Vec<(String, String)>,
}

/// What may reach QEMU's command line or a udev rule from the VPS.
fn clean(v: &str, max: usize) -> Option<String> {
    let v = v.trim();
    (!v.is_empty()
        && v.len() <= max
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || " _.:+-/".contains(c)))
    .then(|| v.to_string())
}

/// A link's name under /dev/disk: "by-id/" or "by-path/" and one name.
fn link_name(v: &str) -> bool {
    let Some((dir, name)) = v.split_once('/') else {
        return false;
    };
    matches!(dir, "by-id" | "by-path")
        && !name.is_empty()
        && name.len() <= 200
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.:+-@".contains(c))
}

/// A kernel name of a block device (sda, sda1, nvme0n1p2, vda).
fn kernel_name(v: &str) -> bool {
    !v.is_empty() && v.len() <= 32 && v.chars().all(|c| c.is_ascii_alphanumeric())
}

/// udev's `\x20` escapes (ID_MODEL_ENC) undone.
fn decode(v: &str) -> String {
    let mut out = String::new();
    let mut rest = v;
    while let Some(i) = rest.find("\\x") {
        out.push_str(&rest[..i]);
        match u8::from_str_radix(rest.get(i + 2..i + 4).unwrap_or(""), 16) {
            Ok(b) if b.is_ascii() => {
                out.push(b as char);
                rest = &rest[i + 4..];
            }
            _ => {
                out.push_str("\\x");
                rest = &rest[i + 2..];
            }
        }
    }
    out.push_str(rest);
    out
}

impl DiskId {
    /// DISK's identity from the facts' "diskid" lines (None when the VPS
    /// said nothing of it).
    pub fn from_lines(lines: &[String], disk: &str, bus: DiskBus) -> Option<DiskId> {
        let prop = |key: &str| {
            lines.iter().find_map(|l| {
                let rest = l.strip_prefix("prop ")?;
                let (d, kv) = rest.split_once(' ')?;
                let v = kv.strip_prefix(key)?.strip_prefix('=')?;
                (d == disk).then(|| v.to_string())
            })
        };
        let is_ours = |k: &str| {
            k == disk
                || k.strip_prefix(disk)
                    .is_some_and(|p| p.trim_start_matches('p').parse::<u32>().is_ok())
        };
        let links: Vec<(String, String)> = lines
            .iter()
            .filter_map(|l| {
                let mut w = l.strip_prefix("link ")?.split(' ');
                let (name, target) = (w.next()?, w.next()?);
                (link_name(name) && kernel_name(target) && is_ours(target))
                    .then(|| (name.to_string(), target.to_string()))
            })
            .collect();
        let wwn = prop("ID_WWN").and_then(|w| {
            let hex = w.strip_prefix("0x")?;
            u64::from_str_radix(hex.get(..16.min(hex.len()))?, 16).ok()
        });
        let mut id = DiskId {
            links,
            wwn,
            ..DiskId::default()
        };
        match bus {
            // udev's ID_SERIAL of a virtio disk is its serial.
            DiskBus::VirtioBlk => id.serial = prop("ID_SERIAL").and_then(|v| clean(&v, 20)),
            DiskBus::VirtioScsi => {
                let vendor = prop("ID_VENDOR_ENC").map(|v| decode(&v));
                let product = prop("ID_MODEL_ENC").map(|v| decode(&v));
                id.vendor = vendor.as_deref().and_then(|v| clean(v, 8));
                id.product = product.as_deref().and_then(|v| clean(v, 16));
                id.serial = prop("ID_SCSI_SERIAL").and_then(|v| clean(&v, 36));
                // ID_SERIAL "0QEMU_QEMU_HARDDISK_drive-scsi0-0-0-0": a
                // vendor-specific designator after vendor and model.
                let (v, m) = (prop("ID_VENDOR"), prop("ID_MODEL"));
                if let (Some(s), Some(v), Some(m)) = (prop("ID_SERIAL"), v, m) {
                    id.device_id = s
                        .strip_prefix(&format!("0{v}_{m}_"))
                        .and_then(|d| clean(d, 64));
                }
            }
            DiskBus::Sata => {
                id.serial = prop("ID_SERIAL_SHORT").and_then(|v| clean(&v, 20));
                id.product = prop("ID_MODEL_ENC")
                    .map(|v| decode(&v))
                    .and_then(|v| clean(&v, 40));
            }
            DiskBus::Nvme => id.serial = prop("ID_SERIAL_SHORT").and_then(|v| clean(&v, 20)),
        }
        (id != DiskId::default()).then_some(id)
    }

    /// QEMU's properties for the disk's device, as ",key=value" pairs.
    pub fn qemu_props(&self, bus: DiskBus) -> String {
        let mut s = String::new();
        let mut put = |k: &str, v: &Option<String>| {
            if let Some(v) = v {
                s.push_str(&format!(",{k}={}", v.replace(',', ",,")));
            }
        };
        match bus {
            DiskBus::VirtioBlk => put("serial", &self.serial),
            DiskBus::VirtioScsi => {
                put("vendor", &self.vendor);
                put("product", &self.product);
                put("serial", &self.serial);
                put("device_id", &self.device_id);
            }
            DiskBus::Sata => {
                put("serial", &self.serial);
                put("model", &self.product);
            }
            DiskBus::Nvme => put("serial", &self.serial),
        }
        if let Some(w) = self.wwn
            && bus != DiskBus::VirtioBlk
            && bus != DiskBus::Nvme
        {
            s.push_str(&format!(",wwn=0x{w:016x}"));
        }
        s
    }

    /// A udev rule that makes every link the VPS has to the disk and its
    /// partitions (those udev already makes are made twice, harmlessly).
    pub fn udev_rule(&self) -> String {
        let mut s = String::from(
            "# drydock: the VPS's names of its disk, in a worker VM; removed before the push\n",
        );
        for (name, target) in &self.links {
            s.push_str(&format!(
                "SUBSYSTEM==\"block\", KERNEL==\"{target}\", SYMLINK+=\"disk/{name}\"\n"
            ));
        }
        s
    }
}

/// Where the rule lives for the verify boot (written with the seal,
/// removed with it) and for the service proof (on its throwaway overlay).
pub const DISK_RULE: &str = "/etc/udev/rules.d/99-drydock-disk-identity.rules";

/// The rule in /run for this boot, udev told, the links made.
pub fn runtime_script(id: &DiskId) -> String {
    format!(
        "command -v udevadm >/dev/null 2>&1 || exit 0\nmkdir -p /run/udev/rules.d\ncat > /run/udev/rules.d/99-drydock-disk-identity.rules <<'DRYDOCK_RULE'\n{}DRYDOCK_RULE\nudevadm control --reload\nudevadm trigger --subsystem-match=block --action=change\nudevadm settle --timeout=30 || true\n",
        id.udev_rule()
    )
}

/// The rule written on the disk for a boot through the boot loader; an
/// existing file of that name is never written over.
pub fn disk_script(id: &DiskId) -> String {
    format!(
        "set -e\ncommand -v udevadm >/dev/null 2>&1 || exit 0\nif [ -e {DISK_RULE} ]; then echo '{DISK_RULE} exists already: drydock will not write over it' >&2; exit 3; fi\nmkdir -p /etc/udev/rules.d\ncat > {DISK_RULE} <<'DRYDOCK_RULE'\n{}DRYDOCK_RULE\nsync\n",
        id.udev_rule()
    )
}

/// The rule removed from the disk, and checked gone.
pub const DISK_UNSCRIPT: &str = "set -e\nif [ -e /etc/udev/rules.d/99-drydock-disk-identity.rules ] && grep -qs '^# drydock:' /etc/udev/rules.d/99-drydock-disk-identity.rules; then rm -f /etc/udev/rules.d/99-drydock-disk-identity.rules; fi\nif grep -qs '^# drydock:' /etc/udev/rules.d/99-drydock-disk-identity.rules; then echo 'the disk identity rule is still there' >&2; exit 1; fi\nsync\n";

/// The stable disk names the system relies on that do not exist here:
/// grub-pc's and grub-efi's install devices, fstab's sources (but `nofail`
/// and `noauto` ones: a mount that may fail), crypttab's devices. One
/// "missing PATH (WHERE)" line each.
pub const CHECK_SCRIPT: &str = r#"export LC_ALL=C PATH="$PATH:/usr/sbin:/sbin"
for p in $( (debconf-show grub-pc; debconf-show grub-efi-amd64; debconf-show grub-efi-arm64) 2>/dev/null     | sed -n 's/^[* ] grub-[a-z0-9-]*\/install_devices: *//p' | tr ',' ' '); do
  case $p in /dev/disk/by-*) [ -e "$p" ] || echo "missing $p (grub's install device in debconf)" ;; esac
done
[ -f /etc/fstab ] && awk '$1 ~ /^\/dev\/disk\/by-(id|path)\// && $4 !~ /(^|,)(nofail|noauto)(,|$)/ { print $1 }' /etc/fstab   | while read -r p; do [ -e "$p" ] || echo "missing $p (/etc/fstab)"; done
[ -f /etc/crypttab ] && awk '$2 ~ /^\/dev\/disk\/by-(id|path)\// { print $2 }' /etc/crypttab   | while read -r p; do [ -e "$p" ] || echo "missing $p (/etc/crypttab)"; done
true"#;

#[cfg(test)]
mod tests;
