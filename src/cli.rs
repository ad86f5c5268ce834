//! The command line, exactly as typed (clap types stay here; the rest of the
//! code sees plain settings).

use std::path::PathBuf;

use crate::transfer::helper::Mode;
use crate::vm::cmdline::Memory;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "drydock",
    version,
    about = "Upgrade a small server offline: pull its disk, upgrade it in a local VM, push back what changed",
    after_help = "Exit codes: 0 ok, 1 failed, 2 bad usage, 3 refused (nothing changed), \
                  69 host unreachable or login refused, 75 connection lost (resumable), \
                  130 interrupted by a signal (resumable)."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,

    /// Machine-readable output on stdout; no progress bars.
    #[arg(long, global = true)]
    pub json: bool,

    /// More detail on stderr (repeat for more).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,

    /// Quiet: on stderr only warnings, questions and errors (no progress,
    /// no messages); the result is still printed.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,
}

/// How a disk moves (`--transfer`); the transfer layer sees [`Mode`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Transfer {
    /// The helper when the host can run it, dd otherwise.
    Auto,
    /// Standard tools on the host (sh, dd, sha256sum): slower, no upload.
    Dd,
    /// drydock's helper, copied to the host's RAM.
    Helper,
}

impl From<Transfer> for Mode {
    fn from(t: Transfer) -> Mode {
        match t {
            Transfer::Auto => Mode::Auto,
            Transfer::Dd => Mode::Dd,
            Transfer::Helper => Mode::Helper,
        }
    }
}

/// The worker VM's network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Network {
    /// Only the package sources, through drydock's proxy; everything else refused and logged.
    Sealed,
    /// The internet, as the VPS itself reaches it (a live copy can then talk to the world).
    Open,
}

#[derive(Debug, Args, Clone)]
pub struct Conn {
    /// [user@]host[:port], ssh://[user@]host[:port], or an alias from ~/.ssh/config.
    pub host: String,

    /// Use this private key (and no other).
    #[arg(
        short = 'i',
        long = "identity",
        value_name = "KEY",
        env = "DRYDOCK_IDENTITY"
    )]
    pub identity: Option<PathBuf>,

    /// The port to connect to (as ssh -p; a port in HOST wins).
    #[arg(short = 'p', long = "port", value_name = "PORT")]
    pub port: Option<u16>,

    /// Read this ssh config file instead of ~/.ssh/config and /etc/ssh/ssh_config (as ssh -F).
    #[arg(short = 'F', value_name = "CONFIG")]
    pub ssh_config: Option<PathBuf>,

    /// An ssh_config option, as ssh -o: User, HostName, Port, IdentityFile,
    /// UserKnownHostsFile, GlobalKnownHostsFile, HostKeyAlias, ProxyJump,
    /// StrictHostKeyChecking (repeatable).
    #[arg(short = 'o', value_name = "KEY=VALUE")]
    pub ssh_option: Vec<String>,

    /// Reach the host through these jump hosts, [user@]host[:port] separated by commas (as ssh -J).
    #[arg(short = 'J', long = "jump", value_name = "HOSTS")]
    pub jump: Option<String>,

    /// Record the host key if known_hosts does not know the host yet
    /// (a changed key is always refused).
    #[arg(long)]
    pub accept_new_host_key: bool,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// What is on the host: OS and release, disk, RAM, firmware, network, upgrades.
    #[command(after_help = "Examples:\n  \
        drydock probe root@vps.example.org\n  \
        drydock probe ssh://admin@203.0.113.7:2222 --json > vps.json   # for `boot --like`\n  \
        drydock probe vps -J bastion.example.org")]
    Probe(ProbeArgs),
    /// Stop the host's services, make its disk read-only, turn its swap off.
    #[command(after_help = "Examples:\n  \
        drydock freeze root@vps            # asks first; `drydock thaw root@vps` undoes it\n  \
        drydock freeze root@vps --device /dev/vdb --yes")]
    Freeze(FreezeArgs),
    /// Undo a freeze: filesystems read-write again, stopped services restarted.
    #[command(after_help = "Example:\n  drydock thaw root@vps")]
    Thaw(ThawArgs),
    /// Copy the host's disk to a local sparse image, with a manifest of block hashes.
    #[command(after_help = "Examples:\n  \
        drydock pull root@vps --output vps.raw                    # the disk that holds /\n  \
        drydock pull root@vps --output vps.raw --device /dev/vdb\n  \
        drydock pull root@vps -p 2222 --output vps.raw --transfer dd   # the host's own tools\n\n\
        Run the same command again to resume a pull that was cut.")]
    Pull(PullArgs),
    /// Write an image back to the host's disk: only the blocks that differ, verified.
    #[command(after_help = "Examples:\n  \
        drydock push vps.raw root@vps                  # asks first\n  \
        drydock push vps.raw root@vps --yes --json\n  \
        drydock push vps.raw root@new-vps --full       # restore onto another disk\n\n\
        Run the same push again to finish one that was cut.")]
    Push(PushArgs),
    /// Start a local VM from an image (a qcow2 overlay over it; the image is not written).
    #[command(after_help = "Examples:\n  \
        drydock boot vps.raw                            # services held back, network sealed\n  \
        drydock boot vps.raw --like vps.json --services --network open\n  \
        drydock boot 20261203T041500 --services        # a backup version (sealed network)\n\n\
        Ctrl-C powers the VM off; the overlay is kept in --dir.")]
    Boot(BootArgs),
    /// The whole pipeline: freeze, pull, upgrade in a local VM, verify, push, reboot.
    #[command(after_help = "Examples:\n  \
        drydock upgrade root@vps --to debian-13 --dry-run   # the plan; nothing changes\n  \
        drydock upgrade root@vps --to debian-13\n  \
        drydock upgrade root@vps --run 'apt-get -y full-upgrade' --yes --json\n\n\
        An interrupted run goes on with `drydock resume RUN`; `drydock abort RUN` gives the \
        VPS back as it was.")]
    Upgrade(UpgradeArgs),
    /// Rehearse an upgrade on a live copy: pull the disk while the VPS keeps
    /// serving (not frozen), run the whole upgrade in the sealed worker VM,
    /// verify boot included, and report what a push would write. Nothing on
    /// the VPS changes.
    #[command(after_help = "Examples:\n  \
        drydock rehearse root@vps --to debian-13\n  \
        drydock rehearse root@vps --run 'apt-get -y full-upgrade' --json\n\n\
        The copy is crash-consistent (as after a power cut). A rehearsal that fails leaves \
        the VPS as it was; `drydock resume RUN` tries its step again.")]
    Rehearse(UpgradeArgs),
    /// Continue an interrupted run (a run folder, or its name from `drydock runs`).
    #[command(after_help = "Example:\n  drydock resume vps.example.org-2026-12-02T101500")]
    Resume(ResumeArgs),
    /// Give the VPS back as it was before the run.
    #[command(after_help = "Example:\n  drydock abort vps.example.org-2026-12-02T101500 --yes")]
    Abort(AbortArgs),
    /// Back the host's disk up as a new version in a store: the first is a
    /// whole copy, each later one sends only the blocks the store lacks.
    #[command(after_help = "Examples:\n  \
        drydock backup root@vps                       # live: crash-consistent\n  \
        drydock backup root@vps --freeze              # consistent: freeze, back up, thaw\n  \
        drydock backup root@vps --store /srv/backups/vps --json\n\n\
        A backup that was cut lists nothing: run it again, the blocks it kept are not sent \
        again. The store is $XDG_DATA_HOME/drydock/backups/HOST unless --store says.")]
    Backup(BackupArgs),
    /// List the versions in the backup stores; `backups prune --keep N` removes old ones.
    #[command(after_help = "Examples:\n  \
        drydock backups                               # every store under the default folder\n  \
        drydock backups --store /srv/backups/vps --json\n  \
        drydock backups prune --keep 7 --store /srv/backups/vps")]
    Backups(BackupsArgs),
    /// Check a backup version: read every block back and check it against its hash.
    #[command(after_help = "Examples:\n  \
        drydock verify 20261203T041500\n  \
        drydock verify 20261203T041500 --boot -i ~/.ssh/vps_key   # boots it, sealed\n  \
        drydock verify 20261203T041500 --store /srv/backups/vps --json")]
    Verify(VerifyArgs),
    /// Write a backup version onto a host's disk: only the pages that differ, verified.
    #[command(after_help = "Examples:\n  \
        drydock restore 20261203T041500 root@vps          # asks first\n  \
        drydock restore 20261203T041500 root@rescue.example.org --device /dev/sda --yes\n\n\
        The disk must not be mounted read-write: restore from the provider's rescue system, or \
        onto a frozen host. A disk larger than the version keeps its extra space unused (the \
        last partition is not grown yet; a GPT's backup header is moved to the end).")]
    Restore(RestoreArgs),
    /// List runs and where each stands; `runs rm RUN` removes one.
    #[command(after_help = "Examples:\n  \
        drydock runs --size\n  \
        drydock runs rm vps.example.org-2026-12-02T101500")]
    Runs(RunsArgs),
    /// Print a completion script for SHELL (see the README to install it).
    #[command(after_help = "Examples:\n  \
        drydock completions bash > /usr/share/bash-completion/completions/drydock\n  \
        drydock completions zsh > /usr/local/share/zsh/site-functions/_drydock")]
    Completions {
        /// The shell: bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Print drydock's man page (roff), or write every page (drydock.1 and
    /// one per subcommand) into a folder.
    #[command(after_help = "Examples:\n  \
        drydock man --dir /usr/local/share/man/man1 && man drydock-pull\n  \
        drydock man | man -l -")]
    Man {
        /// Write drydock.1 and drydock-SUBCOMMAND.1 into DIR instead.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
    /// Internal: what QEMU spawns for each connection of a sealed guest to
    /// drydock's proxy.
    #[command(name = "__relay", hide = true)]
    Relay { socket: PathBuf },
}

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
    /// $XDG_DATA_HOME/drydock/backups/HOST).
    #[arg(long, value_name = "DIR", env = "DRYDOCK_STORE")]
    pub store: Option<PathBuf>,
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
    /// One store (default: every store under $XDG_DATA_HOME/drydock/backups).
    #[arg(long, value_name = "DIR", global = true, env = "DRYDOCK_STORE")]
    pub store: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum BackupsAction {
    /// Remove all but the newest N versions, and the blocks only they used.
    #[command(after_help = "Example:\n  drydock backups prune --keep 7 --store /srv/backups/vps")]
    Prune {
        /// How many versions to keep, newest first (at least 1).
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
        keep: u64,
    },
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The version's id, from `drydock backups`.
    pub id: String,
    /// The store that holds it (default: the one under
    /// $XDG_DATA_HOME/drydock/backups that has it).
    #[arg(long, value_name = "DIR", env = "DRYDOCK_STORE")]
    pub store: Option<PathBuf>,
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
    /// The store that holds it (default: the one under
    /// $XDG_DATA_HOME/drydock/backups that has it).
    #[arg(long, value_name = "DIR", env = "DRYDOCK_STORE")]
    pub store: Option<PathBuf>,
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

impl Conn {
    /// The ssh options as ssh takes them: `-o` in order, then `-p` and
    /// `-J` as Port and ProxyJump; with whether a new host key may be
    /// recorded (`--accept-new-host-key`, or StrictHostKeyChecking=accept-new).
    pub fn ssh_args(&self) -> anyhow::Result<(crate::ssh::SshArgs, bool)> {
        let mut options = self.ssh_option.clone();
        if let Some(p) = self.port {
            options.push(format!("Port={p}"));
        }
        if let Some(j) = &self.jump {
            options.push(format!("ProxyJump={j}"));
        }
        let (args, accept_new) = crate::ssh::SshArgs::checked(self.ssh_config.clone(), options)?;
        Ok((args, accept_new || self.accept_new_host_key))
    }
}

/// `drydock --version`: the release, the commit it was built from and the
/// helper protocol it speaks (a helper of another protocol is refused).
pub fn version() -> &'static str {
    static TEXT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    TEXT.get_or_init(|| {
        format!(
            "{} (commit {}, helper protocol {})",
            env!("CARGO_PKG_VERSION"),
            env!("DRYDOCK_COMMIT"),
            drydock_helper::proto::VERSION
        )
    })
}

/// The command line's definition, with the full version.
pub fn command() -> clap::Command {
    use clap::CommandFactory;
    Cli::command().version(version())
}

/// `--memory`: a size such as 4G or 2048M, at least 128M (a usage error
/// otherwise, before anything runs).
fn memory(s: &str) -> Result<Memory, String> {
    Memory::parse(s).ok_or_else(|| "expected a size such as 4G or 2048M, at least 128M".to_string())
}

/// `--accept-failed`: a unit's name (systemd's characters), never a
/// pattern or anything a shell would read.
fn unit_name(s: &str) -> Result<String, String> {
    if crate::services::read::valid_name(s) {
        Ok(s.to_string())
    } else {
        Err("expected a unit's name such as nginx.service (letters, digits, :_.@-\\)".to_string())
    }
}

/// A usage error of subcommand SUB: flags that contradict each other.
fn conflict(sub: &str, text: &str) -> clap::Error {
    let mut cmd = command();
    cmd.build();
    cmd.find_subcommand_mut(sub)
        .expect("a subcommand of drydock")
        .error(clap::error::ErrorKind::ArgumentConflict, text)
}

impl Cli {
    /// What clap's attributes cannot say: flags that contradict each other
    /// through their values. A usage error (exit 2), before anything runs.
    pub fn check(&self) -> Result<(), clap::Error> {
        if let Command::Rehearse(a) = &self.command
            && a.no_carry
        {
            return Err(conflict(
                "rehearse",
                "--no-carry is for `drydock upgrade`; `drydock rehearse` pushes nothing",
            ));
        }
        if let Command::Rehearse(a) = &self.command
            && a.no_rehearsal
        {
            return Err(conflict(
                "rehearse",
                "--no-rehearsal is for `drydock upgrade`; `drydock rehearse` is the rehearsal \
                 alone",
            ));
        }
        if let Command::Rehearse(a) = &self.command
            && a.services.rollback_on_failure
        {
            return Err(conflict(
                "rehearse",
                "--rollback-on-failure is for `drydock upgrade`; `drydock rehearse` pushes nothing",
            ));
        }
        if let Command::Upgrade(a) = &self.command
            && a.network == Network::Open
            && !a.allow_host.is_empty()
        {
            return Err(conflict(
                "upgrade",
                "--allow-host widens the sealed network; with --network open every host is \
                 reachable already: drop one of the two",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    /// Every subcommand shown in --help has examples, and every one of its
    /// flags and arguments a description.
    #[test]
    fn every_subcommand_has_examples_and_every_argument_a_description() {
        let mut cmd = super::command();
        cmd.build();
        let mut missing = Vec::new();
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            let name = sub.get_name();
            if name == "help" {
                continue;
            }
            let after = sub
                .get_after_help()
                .map(|s| s.to_string())
                .unwrap_or_default();
            if !after.contains("Example") {
                missing.push(format!("{name}: no examples"));
            }
            for a in sub.get_arguments() {
                let id = a.get_id().as_str();
                if ["help", "version"].contains(&id) {
                    continue;
                }
                if a.get_help().is_none() && a.get_long_help().is_none() {
                    missing.push(format!("{name} {id}: no description"));
                }
            }
        }
        assert!(missing.is_empty(), "{missing:#?}");
    }
}
