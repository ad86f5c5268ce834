//! The command line, exactly as typed (clap types stay here; the rest of the
//! code sees plain settings).

use std::path::PathBuf;

use crate::transfer::helper::Mode;
use crate::vm::cmdline::Memory;

use clap::{Args, Parser, Subcommand};

mod args;
pub use args::*;

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
