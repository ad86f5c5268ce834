//! The OpenRC services drydock knows by name, for the freeze (what keeps
//! running on the VPS) and the worker VM's seal (what starts there): one
//! list, so that the two never disagree on what SSH or the network needs.

/// SSH servers.
pub const SSH: &[&str] = &["sshd", "ssh", "dropbear"];
/// Services that bring up the network, by name or by prefix (Gentoo's
/// net.eth0).
pub const NET: &[&str] = &[
    "networking",
    "dhcpcd",
    "NetworkManager",
    "connman",
    "iwd",
    "udhcpc",
    "network",
];
pub const NET_PREFIXES: &[&str] = &["net."];
/// Kept besides: acpid turns the power button into a clean power-off;
/// Debian's rmnologin lets logins in (bootmisc's DELAYLOGIN).
pub const KEPT: &[&str] = &["acpid", "rmnologin"];
/// Services that run jobs or reach out even when put in the sysinit or
/// boot runlevel, which otherwise bring the system itself up.
pub const SCHEDULERS_AND_CLOCKS: &[&str] = &[
    "cron", "crond", "cronie", "dcron", "fcron", "anacron", "atd", "chronyd", "ntpd", "openntpd",
    "ntpsec", "ntp", "local",
];
/// Services that write the clock when they stop (hwclock to the RTC and
/// /etc/adjtime, swclock to a file): held back in the worker VM, whose
/// clean power-off would otherwise write them into the copy (its clock is
/// the workstation's); left running by the freeze, whose stop would write.
pub const CLOCK_SAVERS: &[&str] = &["hwclock", "hwclock.sh", "swclock"];
/// Loggers: they keep /var/log open for writing (the freeze stops them; in
/// the worker VM they write to the copy and may run).
pub const LOGGERS: &[&str] = &[
    "syslog",
    "rsyslog",
    "syslog-ng",
    "metalog",
    "klogd",
    "sysklogd",
];

pub fn is_net(u: &str) -> bool {
    NET.contains(&u) || NET_PREFIXES.iter().any(|p| u.starts_with(p))
}
