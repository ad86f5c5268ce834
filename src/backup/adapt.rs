//! A restore onto another host: the laid-out version adapted to it before
//! anything is written there. One sealed boot of the local copy itself
//! (its own kernel, recorded when the version was taken, booted directly
//! with the seal on its command line: none of its services run, nothing
//! leaves the VM), shaped as the host the version came from so that its
//! own network configuration comes up; in it, the network configuration is
//! rewritten for the new host's address, gateway and MAC, and an XFS or
//! btrfs filesystem in the grown last partition is grown (both grow only
//! while mounted). Then the boot proof, shaped as the new host
//! (`proof::prove_image`, on an overlay).
//!
//! The rewrite is textual and whole-word, in the files the network stacks
//! read (ifupdown, netplan and cloud-init's netplan, systemd-networkd,
//! NetworkManager keyfiles, Red Hat's ifcfg, OpenRC's conf.d/net),
//! /etc/hosts and a static /etc/resolv.conf (not a link to a resolver's): the old address, gateway, DNS server and MAC are replaced
//! by the new ones, and a changed prefix in `ADDRESS/PREFIX` and a
//! dotted `netmask`. The files it changed are reported; none changed
//! means the address was not written anywhere (DHCP).

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::Serialize;

use super::store::{Store, Version};
use crate::vm::shape::{Nic, Shape};
use crate::vm::{self, Vm, cmdline};

/// The new host's network where it differs from the version's.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NetChange {
    pub old: Nic,
    pub new: Nic,
}

impl NetChange {
    /// None when the address, prefix, gateway, DNS and MAC are the same (or
    /// either side has no IPv4 address to compare).
    pub fn between(old: Option<&Nic>, new: Option<&Nic>) -> Option<NetChange> {
        let (old, new) = (old?, new?);
        old.address?;
        new.address?;
        // The DNS server alone is no reason: a rescue system's resolver
        // is often not the one the VPS was configured with.
        let same = old.address == new.address
            && old.prefix == new.prefix
            && old.gateway == new.gateway
            && old.mac.as_deref().map(str::to_ascii_lowercase)
                == new.mac.as_deref().map(str::to_ascii_lowercase);
        (!same).then(|| NetChange {
            old: old.clone(),
            new: new.clone(),
        })
    }

    pub fn describe(&self) -> String {
        let side = |n: &Nic| {
            format!(
                "{}/{} via {}{}",
                n.address.map(|a| a.to_string()).unwrap_or_default(),
                n.prefix.map(|p| p.to_string()).unwrap_or_default(),
                n.gateway
                    .map(|g| g.to_string())
                    .unwrap_or_else(|| "no gateway".into()),
                n.mac
                    .as_deref()
                    .map(|m| format!(", MAC {m}"))
                    .unwrap_or_default()
            )
        };
        format!("{} -> {}", side(&self.old), side(&self.new))
    }

    /// The sed expressions (extended regex) of the rewrite.
    fn sed(&self) -> Vec<String> {
        let mut e = Vec::new();
        let word = |from: &str, to: &str| {
            let from = from.replace('.', "\\.");
            format!("s/(^|[^0-9.]){from}($|[^0-9.])/\\1{to}\\2/g")
        };
        let pair = |a: Option<Ipv4Addr>, b: Option<Ipv4Addr>| match (a, b) {
            (Some(a), Some(b)) if a != b => Some((a.to_string(), b.to_string())),
            _ => None,
        };
        // A marker first, so that an old gateway that is a new address (or
        // the like) is not rewritten twice.
        let mut swaps = Vec::new();
        // A resolver in the old subnet was the old provider's; a public
        // one (1.1.1.1) stays.
        let local_dns = match (self.old.dns, self.old.address, self.old.prefix) {
            (Some(d), Some(a), Some(p)) if p > 0 && p <= 32 => {
                let m = u32::MAX << (32 - p as u32);
                (u32::from(d) & m) == (u32::from(a) & m)
            }
            _ => false,
        };
        let pairs = [
            pair(self.old.address, self.new.address),
            pair(self.old.gateway, self.new.gateway),
            if local_dns {
                pair(self.old.dns, self.new.dns)
            } else {
                None
            },
        ];
        for (i, p) in pairs.into_iter().enumerate() {
            if let Some((a, b)) = p {
                let mark = format!("@DRYDOCK{i}@");
                e.push(word(&a, &mark));
                swaps.push((mark, b));
            }
        }
        for (mark, b) in swaps {
            e.push(format!("s/{mark}/{b}/g"));
        }
        if let (Some(addr), Some(op), Some(np)) =
            (self.new.address, self.old.prefix, self.new.prefix)
            && op != np
        {
            let a = addr.to_string().replace('.', "\\.");
            e.push(format!("s#{a}/{op}([^0-9]|$)#{addr}/{np}\\1#g"));
            let (om, nm) = (dotted(op), dotted(np));
            e.push(format!(
                "s/(netmask[[:space:]=\"]+){}($|[^0-9.])/\\1{nm}\\2/g",
                om.replace('.', "\\.")
            ));
        }
        if let (Some(a), Some(b)) = (&self.old.mac, &self.new.mac)
            && !a.eq_ignore_ascii_case(b)
        {
            for from in [a.to_ascii_lowercase(), a.to_ascii_uppercase()] {
                e.push(format!("s/{from}/{}/g", b.to_ascii_lowercase()));
            }
        }
        e
    }

    /// The script run in the sealed VM: every file it changed, one line
    /// each ("changed PATH").
    pub fn script(&self) -> String {
        let exprs: Vec<String> = self
            .sed()
            .iter()
            .map(|x| format!("-e {}", crate::ssh::shell_quote(x)))
            .collect();
        format!(
            r#"set -e
for f in $(find /etc/network/interfaces /etc/network/interfaces.d /etc/netplan /etc/systemd/network /etc/NetworkManager/system-connections /etc/sysconfig/network-scripts /etc/conf.d/net /etc/hosts /etc/resolv.conf -type f 2>/dev/null); do
  [ -L "$f" ] && continue
  cp -p "$f" /run/drydock-net.old
  sed -E -i {} "$f"
  cmp -s "$f" /run/drydock-net.old || echo "changed $f"
  rm -f /run/drydock-net.old
done
sync
"#,
            exprs.join(" ")
        )
    }
}

fn dotted(prefix: u8) -> String {
    let m: u32 = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - prefix as u32)
    };
    Ipv4Addr::from(m).to_string()
}

/// What the sealed boot changed in the local copy.
#[derive(Debug, Default, Serialize)]
pub struct Adapted {
    /// The files whose network configuration was rewritten.
    pub network_files: Vec<String>,
    /// The filesystem grown while mounted (xfs, btrfs), and how.
    pub grown_online: Option<String>,
    pub seconds: f64,
}

/// Boot WORK (the laid-out version, a raw image written in place) sealed,
/// with the version's recorded kernel, shaped as OLD; rewrite its network
/// for NET and grow the filesystem GROW names (its kind and the
/// partition's start sector); power it off.
#[expect(
    clippy::too_many_arguments,
    reason = "the adaptation's parts, each used once"
)]
pub async fn adapt(
    store: &Store,
    v: &Version,
    work: &Path,
    old: Shape,
    net: Option<&NetChange>,
    grow: Option<(&str, u64)>,
    identity: Option<&Path>,
    ui: &crate::ui::Ui,
) -> Result<Adapted> {
    let started = std::time::Instant::now();
    let bootdir = store
        .boot_files(&v.id)?
        .unwrap_or_else(|| store.boot_dir(&v.id));
    let (boot, rec) = vm::boot::load_recorded_in(&bootdir).with_context(|| {
        format!(
            "version {} has no recorded kernel ({} is written by `drydock backup` since this \
             drydock): a restore onto another host boots the copy sealed to adapt it, with the \
             kernel the host ran; nothing was written",
            v.id,
            bootdir.display()
        )
    })?;
    let dir = crate::paths::state_dir()?.join("restores").join(format!(
        "{}-adapt",
        work.file_stem()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_default()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    crate::paths::private_dir(&dir)?;
    let spec = super::proof::sealed_spec(
        work,
        "raw",
        &dir,
        old,
        1024,
        Some(cmdline::DirectBoot {
            kernel: boot.kernel.clone(),
            initrd: boot.initrd.clone(),
            append: rec.seal.kernel_cmdline(&boot.cmdline)?,
        }),
    )?;
    let port = spec.ssh_port;
    ui.say(format!(
        "booting the local copy of version {} sealed (its services held back, no network out), \
         shaped as the host it came from, to adapt it; console in {}",
        v.id,
        dir.join("serial.log").display()
    ));
    let mut vm = Vm::start(spec, dir.join("qemu.stderr")).await?;
    let res = tokio::time::timeout(
        Duration::from_secs(1800),
        adapt_in(&mut vm, port, identity, &dir, net, grow),
    )
    .await
    .unwrap_or_else(|_| {
        Err(anyhow::anyhow!(
            "the sealed boot that adapts version {} did not finish within 30 minutes; its \
             console: {}",
            v.id,
            dir.join("serial.log").display()
        ))
    });
    let off = vm.power_off(Duration::from_secs(180)).await;
    let mut a = res.map_err(|e| e.context("nothing was written to the host"))?;
    off?;
    a.seconds = started.elapsed().as_secs_f64();
    Ok(a)
}

async fn adapt_in(
    vm: &mut Vm,
    port: u16,
    identity: Option<&Path>,
    dir: &Path,
    net: Option<&NetChange>,
    grow: Option<(&str, u64)>,
) -> Result<Adapted> {
    let s = super::proof::log_in(vm, port, identity, dir, "the copy").await?;
    let mut a = Adapted::default();
    if let Some((fs, start)) = grow {
        let out = s
            .run("growing the filesystem", &grow_script(fs, start))
            .await?;
        a.grown_online = out
            .lines()
            .find_map(|l| l.strip_prefix("grown "))
            .map(str::to_string);
        if a.grown_online.is_none() {
            bail!("growing the {fs} filesystem said: {}", out.trim());
        }
    }
    if let Some(n) = net {
        let out = s
            .run("rewriting the network configuration", &n.script())
            .await?;
        a.network_files = out
            .lines()
            .filter_map(|l| l.strip_prefix("changed "))
            .map(str::to_string)
            .collect();
    }
    s.exec("sync").await.ok();
    s.exec("(sleep 1; systemctl poweroff || poweroff) >/dev/null 2>&1 &")
        .await
        .ok();
    s.close().await;
    Ok(a)
}

/// Grow the FS (xfs or btrfs) of the partition that starts at sector START
/// of the boot disk, mounted (where it is, or on a folder in /run).
fn grow_script(fs: &str, start: u64) -> String {
    let grow = match fs {
        "xfs" => "xfs_growfs \"$m\" >/dev/null",
        _ => "btrfs filesystem resize max \"$m\" >/dev/null",
    };
    format!(
        r#"set -e
p=
for s in /sys/class/block/*/start; do
  [ "$(cat "$s")" = {start} ] && p=/dev/$(basename "$(dirname "$s")") && break
done
[ -n "$p" ] || {{ echo "no partition starts at sector {start}"; exit 0; }}
m=$(findmnt -rno TARGET -S "$p" | head -n 1)
made=
if [ -z "$m" ]; then m=/run/drydock-grow; mkdir -p "$m"; mount "$p" "$m"; made=1; fi
{grow}
[ -n "$made" ] && umount "$m" && rmdir "$m"
echo "grown {fs} on $p ($m)"
"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nic(addr: &str, prefix: u8, gw: &str, mac: &str) -> Nic {
        Nic {
            name: "eth0".into(),
            mac: Some(mac.into()),
            pci_slot: None,
            address: Some(addr.parse().unwrap()),
            prefix: Some(prefix),
            gateway: Some(gw.parse().unwrap()),
            dns: None,
        }
    }

    /// The rewrite, run by this machine's sed on the files each stack
    /// writes: whole addresses only, the prefix and netmask, the MAC.
    #[test]
    fn the_rewrite_changes_addresses_not_their_neighbours() {
        let mut old = nic("10.0.2.15", 24, "10.0.2.2", "52:54:00:12:34:56");
        old.dns = Some("10.0.2.3".parse().unwrap());
        let mut new = nic("10.0.5.20", 16, "10.0.5.2", "52:54:00:AB:CD:EF");
        new.dns = Some("10.0.5.3".parse().unwrap());
        let c = NetChange::between(Some(&old), Some(&new)).unwrap();
        assert_eq!(NetChange::between(Some(&old), Some(&old)), None);
        // Another resolver alone changes nothing.
        let mut other_dns = old.clone();
        other_dns.dns = Some("9.9.9.9".parse().unwrap());
        assert_eq!(NetChange::between(Some(&old), Some(&other_dns)), None);
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("conf");
        std::fs::write(
            &f,
            "auto eth0\niface eth0 inet static\n  address 10.0.2.15\n  netmask 255.255.255.0\n  \
             gateway 10.0.2.2\n# 10.0.2.150 and 110.0.2.15 and 10.0.2.22 stay\n\
             Address=10.0.2.15/24\nGateway=10.0.2.2\nMACAddress=52:54:00:12:34:56\n\
             macaddress: 52:54:00:12:34:56\nnameserver 10.0.2.3\nnameserver 1.1.1.1\n",
        )
        .unwrap();
        let mut cmd = std::process::Command::new("sed");
        cmd.arg("-E").arg("-i");
        for e in c.sed() {
            cmd.arg("-e").arg(e);
        }
        assert!(cmd.arg(&f).status().unwrap().success());
        assert_eq!(
            std::fs::read_to_string(&f).unwrap(),
            "auto eth0\niface eth0 inet static\n  address 10.0.5.20\n  netmask 255.255.0.0\n  \
             gateway 10.0.5.2\n# 10.0.2.150 and 110.0.2.15 and 10.0.2.22 stay\n\
             Address=10.0.5.20/16\nGateway=10.0.5.2\nMACAddress=52:54:00:ab:cd:ef\n\
             macaddress: 52:54:00:ab:cd:ef\nnameserver 10.0.5.3\nnameserver 1.1.1.1\n"
        );
    }
}
