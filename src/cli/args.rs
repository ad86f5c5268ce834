//! Each command's arguments (clap): one struct each, in the order of
//! `drydock --help`.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use super::{Conn, Network, Transfer, memory, unit_name};
use crate::vm::cmdline::Memory;

#[derive(Debug, Args)]
pub struct ProbeArgs {
    #[command(flatten)]
    pub conn: Conn,
}

#[derive(Debug, Args)]
pub struct FreezeArgs {
    #[command(flatten)]
    pub conn: Conn,
    /// The disk (default: the disk that holds /).
    #[arg(long, value_name = "DEV")]
    pub device: Option<String>,
    /// Do not ask for confirmation.
    #[arg(long, short = 'y')]
    pub yes: bool,
}

#[derive(Debug, Args)]
pub struct ThawArgs {
    #[command(flatten)]
    pub conn: Conn,
    /// The disk that was frozen (default: the one the freeze recorded).
    #[arg(long, value_name = "DEV")]
    pub device: Option<String>,
}

#[derive(Debug, Args)]
pub struct PullArgs {
    #[command(flatten)]
    pub conn: Conn,
    /// The local image to write (IMAGE.manifest is written beside it).
    #[arg(long = "output", value_name = "IMAGE")]
    pub output: PathBuf,
    /// The disk, or a regular file standing for one (default: the disk that holds /).
    #[arg(long, value_name = "DEV")]
    pub device: Option<String>,
    /// Copy a disk that is mounted read-write (the copy may be inconsistent).
    #[arg(long)]
    pub live: bool,
    /// IMAGE holds an earlier pull of this disk (with its manifest): bring
    /// it up to date. The helper hashes the whole disk on the host and only
    /// the blocks that changed are sent (helper mode only).
    #[arg(long)]
    pub update: bool,
    /// How the disk moves: the helper (drydock's own static program, copied
    /// to the host's RAM) when the host can run it, else dd.
    #[arg(long, value_enum, default_value = "auto", env = "DRYDOCK_TRANSFER")]
    pub transfer: Transfer,
}

#[derive(Debug, Args)]
pub struct PushArgs {
    /// The local image (its manifest says what the disk holds now).
    pub image: PathBuf,
    #[command(flatten)]
    pub conn: Conn,
    /// The disk, or a regular file standing for one (default: the disk that holds /).
    #[arg(long, value_name = "DEV")]
    pub device: Option<String>,
    /// Do not ask for confirmation.
    #[arg(long, short = 'y')]
    pub yes: bool,
    /// Write every block without checking what the disk holds (restoring
    /// onto another disk). Overwrites whatever is there.
    #[arg(long)]
    pub full: bool,
    /// How the disk moves: the helper (drydock's own static program, copied
    /// to the host's RAM) when the host can run it, else dd.
    #[arg(long, value_enum, default_value = "auto", env = "DRYDOCK_TRANSFER")]
    pub transfer: Transfer,
    /// Package files the image's upgrade downloaded (a run's downloads/:
    /// each NAME beside a NAME.url): the host fetches them from its own
    /// mirror and rebuilds the pages they hold, instead of receiving them
    /// (helper mode; `upgrade` does this with its run's downloads).
    #[arg(long, value_name = "DIR")]
    pub packages: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct BootArgs {
    /// The image to boot (a raw disk image, e.g. from `drydock pull`), or
    /// the id of a backup version (from `drydock backups`).
    pub image: PathBuf,
    /// Guest memory: 8G, 2048M, ...
    #[arg(long, default_value = "8G", value_parser = memory, env = "DRYDOCK_MEMORY")]
    pub memory: Memory,
    /// Guest CPUs (default: this machine's).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1024), env = "DRYDOCK_CPUS")]
    pub cpus: Option<u32>,
    /// Where to keep the overlay, QMP socket and serial log
    /// (default: $XDG_STATE_HOME/drydock/boots/IMAGE-TIME).
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// Seconds the guest may take to answer on SSH before drydock gives up.
    #[arg(long, value_name = "SECONDS", default_value_t = 600)]
    pub wait: u64,
    /// Boot the image as the VPS it came from: FILE is `drydock probe
    /// HOST --json` output (firmware, disk bus, MAC, network).
    #[arg(long, value_name = "FILE")]
    pub like: Option<PathBuf>,
    /// Start the image's own services (its apps, timers, cron): by
    /// default they are held back, as in the worker VM.
    #[arg(long)]
    pub services: bool,
    /// The VM's network: sealed (only the image's package sources) or
    /// open (the internet).
    #[arg(long, value_enum, default_value = "sealed")]
    pub network: Network,
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("what").required(true).args(["to", "run"])))]
pub struct UpgradeArgs {
    #[command(flatten)]
    pub conn: Conn,
    /// The target release: debian-13 (or trixie), nixos-23.11, ...
    #[arg(long)]
    pub to: Option<String>,
    /// Run this command in the local VM instead of a release upgrade.
    #[arg(long, value_name = "COMMAND", conflicts_with = "to")]
    pub run: Option<String>,
    /// The disk (default: the disk that holds /).
    #[arg(long, value_name = "DEV")]
    pub device: Option<String>,
    /// Worker VM memory.
    #[arg(long, default_value = "4G", value_parser = memory, env = "DRYDOCK_MEMORY")]
    pub memory: Memory,
    /// Worker VM CPUs (default: this machine's).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1024), env = "DRYDOCK_CPUS")]
    pub cpus: Option<u32>,
    /// Do not ask before the freeze and the push.
    #[arg(long, short = 'y')]
    pub yes: bool,
    /// How the disk moves: the helper (drydock's own static program, copied
    /// to the host's RAM) when the host can run it, else dd.
    #[arg(long, value_enum, default_value = "auto", env = "DRYDOCK_TRANSFER")]
    pub transfer: Transfer,
    /// Probe the host, run the read-only checks, print the plan and the
    /// commands; change nothing and keep no run.
    #[arg(long)]
    pub dry_run: bool,
    /// NixOS: once the new generation has booted in the worker VM,
    /// delete the old generations (and their boot entries) before the push.
    #[arg(long, requires = "to", conflicts_with = "run")]
    pub gc: bool,
    /// The worker VM's network: sealed (only the VPS's package sources,
    /// through drydock's proxy) or open (the internet).
    #[arg(long, value_enum, default_value = "sealed")]
    pub network: Network,
    /// One more host the sealed worker VM may reach (repeatable).
    #[arg(long = "allow-host", value_name = "HOST")]
    pub allow_host: Vec<String>,
    /// upgrade: freeze first, without rehearsing on a live copy (by
    /// default the upgrade runs on a live copy first, and a failure stops
    /// the run before the freeze).
    #[arg(long)]
    pub no_rehearsal: bool,
    /// upgrade: after the rehearsal, run the upgrade again on the frozen
    /// copy, even when the VPS changed only its own data since the live
    /// copy (by default those changes are carried into the rehearsal's
    /// result instead, and the upgrade does not run while the VPS is down)
    #[arg(long, conflicts_with = "no_rehearsal")]
    pub no_carry: bool,
    #[command(flatten)]
    pub services: ServiceArgs,
}

/// The service proof's flags, for `upgrade`, `rehearse` and `resume`.
#[derive(Debug, Args, Clone, Default)]
pub struct ServiceArgs {
    /// Do not start the VPS's services on the upgraded copy before the
    /// freeze (the service proof); the report says they were not proven.
    #[arg(long)]
    pub no_service_proof: bool,
    /// A unit of the VPS (nginx.service, or nginx) whose failure in the
    /// service proof, or on the VPS after the push, does not stop the run
    /// (repeatable).
    #[arg(long = "accept-failed", value_name = "UNIT", value_parser = unit_name)]
    pub accept_failed: Vec<String>,
    /// upgrade: when a service the VPS ran does not run after the push and
    /// the reboot, give the VPS its old disk back at once, as `drydock
    /// abort RUN` would.
    #[arg(long)]
    pub rollback_on_failure: bool,
}

#[derive(Debug, Args)]
pub struct BackupArgs {
    #[command(flatten)]
    pub conn: Conn,
    /// The store (made if it does not exist; default:
    /// $XDG_DATA_HOME/drydock/backups/HOST): a folder, or
    /// ssh://[user@]host[:port]/PATH on a backup host (over SFTP).
    #[arg(long, value_name = "DIR", env = "DRYDOCK_STORE")]
    pub store: Option<PathBuf>,
    /// The store's key file (an age identity file; for a new store, made
    /// if it does not exist). Keep a copy away from the store.
    #[arg(long, value_name = "FILE", env = "DRYDOCK_KEY_FILE")]
    pub key_file: Option<PathBuf>,
    /// The disk (default: the disk that holds /).
    #[arg(long, value_name = "DEV")]
    pub device: Option<String>,
    /// Freeze the host for the copy (services stopped, read-only), then
    /// thaw it: a consistent copy, and the output says how long it was
    /// frozen. Without it the host keeps running and the copy is
    /// crash-consistent.
    #[arg(long)]
    pub freeze: bool,
    /// How the disk moves; a backup needs the helper (dd is refused).
    #[arg(long, value_enum, default_value = "auto", env = "DRYDOCK_TRANSFER")]
    pub transfer: Transfer,
}

#[derive(Debug, Args)]
pub struct BackupsArgs {
    #[command(subcommand)]
    pub action: Option<BackupsAction>,
    /// One store, a folder or ssh://[user@]host[:port]/PATH (default: every
    /// store under $XDG_DATA_HOME/drydock/backups).
    #[arg(long, value_name = "DIR", global = true, env = "DRYDOCK_STORE")]
    pub store: Option<PathBuf>,
    /// The store's key file (an age identity file; for a new store, made
    /// if it does not exist). Keep a copy away from the store.
    #[arg(long, value_name = "FILE", global = true, env = "DRYDOCK_KEY_FILE")]
    pub key_file: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum BackupsAction {
    /// Remove the versions no --keep-* rule keeps (as restic's forget: each
    /// rule keeps the newest version of each of its last N hours, days,
    /// ISO weeks, months or years that have one, counted in UTC), then
    /// the blocks only they used.
    #[command(
        after_help = "Example:\n  drydock backups forget --keep-daily 7 --keep-weekly 4 \
                            --keep-monthly 12 --dry-run"
    )]
    Forget {
        #[command(flatten)]
        keep: KeepArgs,
        /// Say what would be removed and freed, and remove nothing.
        #[arg(long, short = 'n')]
        dry_run: bool,
    },
    /// Remove all but the newest N versions, and the blocks only they used
    /// (`forget --keep-last N`).
    #[command(after_help = "Example:\n  drydock backups prune --keep 7 --store /srv/backups/vps")]
    Prune {
        /// How many versions to keep, newest first (at least 1).
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
        keep: u64,
        /// Say what would be removed and freed, and remove nothing.
        #[arg(long, short = 'n')]
        dry_run: bool,
    },
}

#[derive(Debug, Args, Clone, Copy)]
pub struct KeepArgs {
    /// Keep the newest N versions.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub keep_last: u64,
    /// Keep the newest version of each of the last N hours that have one.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub keep_hourly: u64,
    /// ... of the last N days.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub keep_daily: u64,
    /// ... of the last N ISO weeks.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub keep_weekly: u64,
    /// ... of the last N months.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub keep_monthly: u64,
    /// ... of the last N years.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub keep_yearly: u64,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The version's id, from `drydock backups`.
    pub id: String,
    /// The store that holds it, a folder or ssh://[user@]host[:port]/PATH
    /// (default: the one under $XDG_DATA_HOME/drydock/backups that has it).
    #[arg(long, value_name = "DIR", env = "DRYDOCK_STORE")]
    pub store: Option<PathBuf>,
    /// The store's key file (an age identity file; for a new store, made
    /// if it does not exist). Keep a copy away from the store.
    #[arg(long, value_name = "FILE", env = "DRYDOCK_KEY_FILE")]
    pub key_file: Option<PathBuf>,
    /// Also boot it through its own boot loader in a sealed VM (shaped
    /// like its host; nothing leaves the VM but SSH) and check that it
    /// comes up: sshd answers, / is read-write, init reached its target.
    #[arg(long)]
    pub boot: bool,
    /// --boot: log in with this private key (the host's; default: the
    /// usual key files).
    #[arg(
        short = 'i',
        long = "identity",
        value_name = "KEY",
        env = "DRYDOCK_IDENTITY"
    )]
    pub identity: Option<PathBuf>,
    /// --boot: the VM's memory: 2G, 2048M, ...
    #[arg(long, default_value = "2G", value_parser = memory)]
    pub memory: Memory,
    /// --boot: a unit of the host (as recorded with the version) that may
    /// be found not running in the VM (repeatable).
    #[arg(long = "accept-failed", value_name = "UNIT", value_parser = unit_name)]
    pub accept_failed: Vec<String>,
}

#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// The version's id, from `drydock backups`.
    pub id: String,
    #[command(flatten)]
    pub conn: Conn,
    /// The store that holds it, a folder or ssh://[user@]host[:port]/PATH
    /// (default: the one under $XDG_DATA_HOME/drydock/backups that has it).
    #[arg(long, value_name = "DIR", env = "DRYDOCK_STORE")]
    pub store: Option<PathBuf>,
    /// The store's key file (an age identity file; for a new store, made
    /// if it does not exist). Keep a copy away from the store.
    #[arg(long, value_name = "FILE", env = "DRYDOCK_KEY_FILE")]
    pub key_file: Option<PathBuf>,
    /// The disk to write (default: the disk that holds /).
    #[arg(long, value_name = "DEV")]
    pub device: Option<String>,
    /// Do not ask for confirmation.
    #[arg(long, short = 'y')]
    pub yes: bool,
    /// How the disk moves: the helper writes only the pages that differ;
    /// dd writes every block.
    #[arg(long, value_enum, default_value = "auto", env = "DRYDOCK_TRANSFER")]
    pub transfer: Transfer,
    /// The new host's shape: FILE is `drydock probe HOST --json` output of
    /// it (firmware, disk bus, MAC, address), when the host is now in a
    /// rescue system whose probe would not say so.
    #[arg(long, value_name = "FILE")]
    pub like: Option<PathBuf>,
    /// Write the version's network configuration as it is, even where the
    /// new host's address, gateway or MAC differ (it may not come up).
    #[arg(long)]
    pub keep_network: bool,
    /// Onto another disk, write without first booting the result in a
    /// sealed VM shaped as the new host (it may not boot).
    #[arg(long)]
    pub no_boot_proof: bool,
    /// The memory of those VMs: 2G, 2048M, ...
    #[arg(long, default_value = "2G", value_parser = memory)]
    pub memory: Memory,
    /// A unit of the host (as recorded with the version) that the boot
    /// proof may find not running (repeatable).
    #[arg(long = "accept-failed", value_name = "UNIT", value_parser = unit_name)]
    pub accept_failed: Vec<String>,
}

#[derive(Debug, Args)]
pub struct RunsArgs {
    #[command(subcommand)]
    pub action: Option<RunsAction>,
    /// Also the disk space each run keeps (its base image, the upgraded one).
    #[arg(long)]
    pub size: bool,
}

#[derive(Debug, Subcommand)]
pub enum RunsAction {
    /// Remove a run's folder (refused while its VPS is still frozen, unless --force).
    #[command(after_help = "Example:\n  drydock runs rm vps.example.org-2026-12-02T101500")]
    Rm {
        /// The run: its folder, or its name from `drydock runs`.
        run: String,
        /// Remove it even though its VPS is still frozen (or half pushed):
        /// the base image `abort` needs goes with it.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, Args)]
pub struct ResumeArgs {
    /// The run: its folder, or its name from `drydock runs`.
    pub run: String,
    /// Do not ask before the freeze and the push.
    #[arg(long, short = 'y')]
    pub yes: bool,
    #[command(flatten)]
    pub services: ServiceArgs,
}

#[derive(Debug, Args)]
pub struct AbortArgs {
    /// The run: its folder, or its name from `drydock runs`.
    pub run: String,
    /// Do not ask before giving the VPS back.
    #[arg(long, short = 'y')]
    pub yes: bool,
}
