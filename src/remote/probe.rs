//! `drydock probe`: what is on the host, for people and for `--json`.

use std::fmt::Write;

use serde::Serialize;

use super::facts::{Facts, Mount, Swap};
use crate::releases;
use crate::ui::human_bytes;

#[derive(Debug, Serialize)]
pub struct DiskReport {
    pub device: String,
    pub size_bytes: u64,
    pub partitions: Vec<(String, u64)>,
    pub mounts: Vec<Mount>,
    pub swap: Vec<Swap>,
}

#[derive(Debug, Serialize)]
pub struct ProbeReport {
    pub host: String,
    pub os: String,
    pub os_id: String,
    pub os_version: String,
    pub kernel: String,
    pub arch: String,
    pub memory_bytes: u64,
    pub firmware: String,
    pub init: String,
    pub disk: Option<DiskReport>,
    pub disk_error: Option<String>,
    pub interfaces: Vec<String>,
    pub addresses: Vec<String>,
    pub routes: Vec<String>,
    pub dns: Vec<String>,
    pub upgrades: Vec<String>,
}

pub fn report(host: String, f: &Facts) -> ProbeReport {
    let (disk, disk_error) = match f.root_disk() {
        Ok(dev) => {
            let name = dev.trim_start_matches("/dev/").to_string();
            let partitions = f
                .block
                .iter()
                .filter(|b| b.is_partition && b.parent.as_deref() == Some(&name))
                .map(|b| (format!("/dev/{}", b.name), b.size_bytes))
                .collect();
            let d = DiskReport {
                size_bytes: f.block_device(&name).map(|b| b.size_bytes).unwrap_or(0),
                partitions,
                mounts: f.mounts_on_disk(&name).into_iter().cloned().collect(),
                swap: f.swaps_on_disk(&name).into_iter().cloned().collect(),
                device: dev,
            };
            (Some(d), None)
        }
        Err(e) => (None, Some(format!("{e:#}"))),
    };
    let id = f.os.get("ID").cloned().unwrap_or_default();
    let ver = f.os.get("VERSION_ID").cloned().unwrap_or_default();
    ProbeReport {
        host,
        os: f.pretty_name(),
        upgrades: releases::upgrades_for(&id, &ver),
        os_id: id,
        os_version: ver,
        kernel: f.kernel.clone(),
        arch: f.arch.clone(),
        memory_bytes: f.mem_total_bytes,
        firmware: f.firmware.clone(),
        init: f.init.clone(),
        disk,
        disk_error,
        interfaces: f
            .interfaces()
            .into_iter()
            .map(|(name, mac)| format!("{name} {}", mac.as_deref().unwrap_or("-")))
            .collect(),
        addresses: f
            .addrs
            .iter()
            .filter_map(|l| {
                let w: Vec<&str> = l.split_whitespace().collect();
                Some(format!("{} {}", w.get(1)?, w.get(3)?))
            })
            .collect(),
        routes: f.routes.clone(),
        dns: f.dns.clone(),
    }
}

impl ProbeReport {
    /// The report for people; WORKER_VM: the lines about the worker VM
    /// (made by the caller, which knows the VM layer), before the upgrades.
    pub fn human(&self, worker_vm: &[String]) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "host       {}", self.host);
        let _ = writeln!(
            s,
            "os         {} ({} {})",
            self.os, self.os_id, self.os_version
        );
        let _ = writeln!(s, "kernel     {} {}", self.kernel, self.arch);
        let _ = writeln!(s, "memory     {}", human_bytes(self.memory_bytes));
        let _ = writeln!(s, "firmware   {}", self.firmware);
        let _ = writeln!(s, "init       {}", self.init);
        match (&self.disk, &self.disk_error) {
            (Some(d), _) => {
                let _ = writeln!(s, "disk       {} {}", d.device, human_bytes(d.size_bytes));
                for (p, sz) in &d.partitions {
                    let _ = writeln!(s, "  part     {p} {}", human_bytes(*sz));
                }
                for m in &d.mounts {
                    let _ = writeln!(
                        s,
                        "  mount    {} {} {} {}",
                        m.mount_point,
                        m.fstype,
                        m.source,
                        if m.read_only { "ro" } else { "rw" }
                    );
                }
                for w in &d.swap {
                    let _ = writeln!(s, "  swap     {}", w.path);
                }
            }
            (None, Some(e)) => {
                let _ = writeln!(s, "disk       unknown: {e}");
            }
            _ => {}
        }
        for i in &self.interfaces {
            let _ = writeln!(s, "interface  {i}");
        }
        for a in &self.addresses {
            let _ = writeln!(s, "address    {a}");
        }
        for r in &self.routes {
            let _ = writeln!(s, "route      {r}");
        }
        if !self.dns.is_empty() {
            let _ = writeln!(s, "dns        {}", self.dns.join(" "));
        }
        for l in worker_vm {
            let _ = writeln!(s, "{l}");
        }
        if self.upgrades.is_empty() {
            let _ = writeln!(
                s,
                "upgrades   none known for {} {}",
                self.os_id, self.os_version
            );
        } else {
            let _ = writeln!(s, "upgrades   {}", self.upgrades.join(", "));
        }
        s
    }
}
