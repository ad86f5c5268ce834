//! Whether a disk image can boot at all, before a VM is started to find
//! out: a data disk has nothing for the firmware to start, and a boot
//! proof of it would wait out its whole limit on "No bootable device".
//! And what a VM's console says when its firmware or boot loader gave up.

use std::io::Read;
use std::path::Path;

use anyhow::{Context, Result};

/// The EFI system partition's type GUID as a GPT entry stores it
/// (C12A7328-F81F-11D2-BA4B-00A0C93EC93B, mixed-endian).
const ESP: [u8; 16] = [
    0x28, 0x73, 0x2a, 0xc1, 0x1f, 0xf8, 0xd2, 0x11, 0xba, 0x4b, 0x00, 0xa0, 0xc9, 0x3e, 0xc9, 0x3b,
];
/// The BIOS boot partition's (21686148-6449-6E6F-744E-656564454649),
/// where GRUB keeps its core image on a GPT disk booted by a BIOS.
const BIOS_BOOT: &[u8; 16] = b"Hah!IdontNeedEFI";

/// What the image's first sectors hold for a firmware to start, or None
/// when there is nothing: no MBR boot code (an MBR's first 440 bytes, with
/// its 0x55AA signature), no EFI system partition and no BIOS boot
/// partition in a GPT.
pub fn boot_loader(image: &Path) -> Result<Option<&'static str>> {
    let mut head = vec![0u8; 64 << 10];
    let mut f =
        std::fs::File::open(image).with_context(|| format!("cannot read {}", image.display()))?;
    let mut n = 0;
    while n < head.len() {
        match f.read(&mut head[n..])? {
            0 => break,
            k => n += k,
        }
    }
    head.truncate(n);
    Ok(boot_loader_in(&head))
}

/// [`boot_loader`] of the image's first bytes HEAD (64 KiB: a GPT's
/// header and its usual 128 entries).
pub fn boot_loader_in(head: &[u8]) -> Option<&'static str> {
    if head.len() < 1024 || head[510..512] != [0x55, 0xaa] {
        return None;
    }
    let mbr_code = head[..440].iter().any(|&b| b != 0);
    if &head[512..520] == b"EFI PART" {
        let at = |o: usize, n: usize| &head[512 + o..512 + o + n];
        let lba = u64::from_le_bytes(at(72, 8).try_into().expect("8")) as usize;
        let count = u32::from_le_bytes(at(80, 4).try_into().expect("4")) as usize;
        let size = u32::from_le_bytes(at(84, 4).try_into().expect("4")) as usize;
        for k in 0..count.min(1024) {
            let o = lba.saturating_mul(512).saturating_add(k * size);
            let Some(kind) = head.get(o..o + 16) else {
                break;
            };
            if kind == ESP {
                return Some("an EFI system partition");
            }
            if kind == BIOS_BOOT {
                return Some("a BIOS boot partition (GRUB)");
            }
        }
    }
    mbr_code.then_some("boot code in its MBR")
}

/// What a VM's serial console or firmware log (its last lines, TEXT)
/// says when nothing will come of waiting: the firmware tried every
/// device and found nothing to boot, the boot loader fell to its rescue
/// prompt, or the kernel panicked. One device that fails ("Boot failed:
/// not a bootable disk") is not the end: the firmware goes on to the next.
pub fn console_gave_up(text: &str) -> Option<&'static str> {
    const SIGNS: [(&str, &str); 6] = [
        (
            "No bootable device",
            "the firmware found no bootable device",
        ),
        (
            "No bootable option or device was found",
            "the UEFI firmware found no bootable option or device",
        ),
        ("grub rescue>", "GRUB fell to its rescue prompt"),
        ("Kernel panic - not syncing", "the kernel panicked"),
        (
            "Give root password for maintenance",
            "init fell to its emergency shell",
        ),
        // systemd's own words, also where root is locked (cloud images),
        // where sulogin asks for no password.
        (
            "You are in emergency mode",
            "init fell to its emergency shell",
        ),
    ];
    SIGNS
        .iter()
        .find(|(sign, _)| text.contains(sign))
        .map(|(_, said)| *said)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mbr(code: bool) -> Vec<u8> {
        let mut d = vec![0u8; 64 << 10];
        if code {
            d[..3].copy_from_slice(&[0xeb, 0x63, 0x90]);
        }
        d[510] = 0x55;
        d[511] = 0xaa;
        d
    }

    fn gpt(kind: &[u8; 16], code: bool) -> Vec<u8> {
        let mut d = mbr(code);
        d[446 + 4] = 0xee;
        d[512..520].copy_from_slice(b"EFI PART");
        d[512 + 72..512 + 80].copy_from_slice(&2u64.to_le_bytes());
        d[512 + 80..512 + 84].copy_from_slice(&128u32.to_le_bytes());
        d[512 + 84..512 + 88].copy_from_slice(&128u32.to_le_bytes());
        // The second entry: Linux data first, then KIND.
        d[1024..1040].copy_from_slice(&[0xaf; 16]);
        d[1024 + 128..1024 + 144].copy_from_slice(kind);
        d
    }

    #[test]
    fn a_data_disk_has_nothing_to_boot_and_a_system_disk_does() {
        // No partition table (a filesystem on the whole disk), an MBR of
        // partitions with no boot code, a GPT of data partitions only.
        assert_eq!(boot_loader_in(&vec![0u8; 64 << 10]), None);
        let mut xfs = vec![0u8; 64 << 10];
        xfs[..4].copy_from_slice(b"XFSB");
        assert_eq!(boot_loader_in(&xfs), None);
        assert_eq!(boot_loader_in(&mbr(false)), None);
        assert_eq!(boot_loader_in(&gpt(&[0xaf; 16], false)), None);
        // GRUB in an MBR; an ESP; a BIOS boot partition.
        assert_eq!(boot_loader_in(&mbr(true)), Some("boot code in its MBR"));
        assert_eq!(
            boot_loader_in(&gpt(&ESP, false)),
            Some("an EFI system partition")
        );
        assert_eq!(
            boot_loader_in(&gpt(BIOS_BOOT, false)),
            Some("a BIOS boot partition (GRUB)")
        );
    }

    #[test]
    fn a_console_that_gave_up_is_recognised() {
        assert_eq!(
            console_gave_up(
                "Booting from Hard Disk...\nBoot failed: not a bootable disk\n\nNo bootable device."
            ),
            Some("the firmware found no bootable device")
        );
        // One device failed, the next may boot: not the end.
        assert_eq!(
            console_gave_up(
                "Booting from Hard Disk...\nBoot failed: not a bootable disk\n\nBooting from Hard Disk..."
            ),
            None
        );
        assert!(console_gave_up("[  OK  ] Reached target multi-user.target").is_none());
        assert_eq!(
            console_gave_up(
                "You are in emergency mode. After logging in, type \"journalctl -xb\" to view\n\
                 Cannot open access to console, the root account is locked."
            ),
            Some("init fell to its emergency shell")
        );
        assert_eq!(
            console_gave_up("error: no such partition.\nEntering rescue mode...\ngrub rescue> "),
            Some("GRUB fell to its rescue prompt")
        );
    }
}
