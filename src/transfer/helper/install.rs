//! Copying the helper to the host: a tmpfs mounted for it, the exact
//! bytes of the binary, its protocol version checked; staged beside a
//! running session, or installed by a session of its own; and removed.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result, bail};
use drydock_helper::proto::VERSION;
use russh::Channel;
use russh::client;

use super::{BINARY, BINARY_GZ, Mode};
use crate::ssh::{Session, shell_quote};
use crate::transfer::writer::{Tmpfs, tmpfs_script};

/// Install the helper when it was chosen (a push; a pull uses [`stage`]).
/// If it cannot be started (a tmpfs that cannot be mounted and a noexec
/// /run, say), `auto` falls back to dd mode with a warning; an explicit
/// `--transfer helper` fails.
pub async fn install(session: &Session, asked: Mode, ui: &crate::ui::Ui) -> Result<Option<Remote>> {
    let mut out = session
        .exec_input(&install_script(Packing::Gzip), Some(BINARY_GZ))
        .await?;
    if !out.success() && out.stdout_str().contains(NO_GZIP) {
        out = session
            .exec_input(&install_script(Packing::Raw), Some(BINARY))
            .await?;
    }
    cut_short(session, &out)?;
    let text = out.stdout_str();
    let remote = match Remote::from_install(session, &out, out.success(), &text) {
        Ok(r) => r,
        Err(e) => return fall_back(session, asked, ui, e),
    };
    if let Err(e) = check_version(session, &text) {
        if let Err(re) = remote.remove(session).await {
            ui.warn(format!("{re:#}"));
        }
        return fall_back(session, asked, ui, e);
    }
    Ok(Some(remote))
}

/// The install's shell ended with no status: the connection went, which
/// says nothing of whether the helper can run here (not a reason to fall
/// back to dd mode, nor to call the host unable).
fn cut_short(session: &Session, out: &crate::ssh::Output) -> Result<()> {
    if out.status.is_none() && out.signal.is_none() {
        return Err(crate::errors::resumable!(
            "the connection to {} was lost while drydock's helper was being installed; nothing \
             was written to the disk, and the host removes what was copied when its shell \
             ends. Run the same command again",
            session.host()
        ));
    }
    Ok(())
}

/// `auto`: dd mode, with a warning; `--transfer helper`: the error.
fn fall_back<T>(
    session: &Session,
    asked: Mode,
    ui: &crate::ui::Ui,
    e: anyhow::Error,
) -> Result<Option<T>> {
    if asked == Mode::Auto {
        ui.warn(format!(
            "drydock's helper does not run on {} ({e:#}); using dd mode",
            session.host()
        ));
        Ok(None)
    } else {
        Err(e.context(
            "--transfer helper: the helper cannot run on this host; --transfer dd moves the disk \
             with the host's own tools",
        ))
    }
}

/// The line between a prelude's output and the installer's.
const PRELUDE_END: &str = "@@ drydock-helper install";

/// The installer's last line before it waits for drydock's word.
const READY: &str = "@@ drydock-helper ready";

/// After the installer: wait on stdin for one line. `go` runs the helper
/// in place of this shell, on the same channel; anything else, or the
/// channel closing, removes it, and the shell's status says whether that
/// worked. `read` takes stdin a byte at a time, so the frames after `go`
/// are left to the helper.
fn stage_tail() -> String {
    format!(
        r#"echo '{READY}'
read go || go=
[ "$go" = go ] && exec "$T/drydock-helper" --remove "$T" ${{m:+--unmount}}
if [ -n "$m" ]; then umount "$T" && rmdir "$T"; else rm -rf "$T"; fi
"#
    )
}

/// A helper installed and waiting, in the login shell that installed it,
/// for [`Staged::go`]. One login shell on the host for the prelude, the
/// installation and the run: each costs a round trip and a run of the
/// user's shell start-up files (0.15 s for root on the test machines).
pub struct Staged {
    pub remote: Remote,
    pub channel: Channel<client::Msg>,
    went: bool,
}

/// Run `prelude` (shell lines that read nothing from stdin and exit 0;
/// their stdout is returned), then install the helper, in one login shell
/// that stays open: the helper then runs in it, on [`Staged::go`]. The
/// outcome's `Ok(None)`: `auto`, and the helper cannot run here (a warning
/// was shown), so dd mode.
pub async fn stage(
    session: &Session,
    asked: Mode,
    ui: &crate::ui::Ui,
    prelude: &str,
) -> Result<(String, Result<Option<Staged>>)> {
    let mut packing = Packing::Gzip;
    let mut prelude = prelude.to_string();
    let mut first: Option<String> = None;
    let (channel, out, is_ready) = loop {
        let script = format!(
            "(\n{prelude}\n)\necho '{PRELUDE_END}'\n{}{}",
            install_script(packing),
            stage_tail()
        );
        let mut channel = session.open_exec(&script).await?;
        session
            .send(&channel, packing.bytes())
            .await
            .with_context(|| format!("the connection to {} broke", session.host()))?;
        // Until READY, or until the shell ends (the installer failed).
        let (out, is_ready) = crate::ssh::collect_until(&mut channel, READY).await?;
        if !is_ready && packing == Packing::Gzip && out.stdout_str().contains(NO_GZIP) {
            // Again without gzip; the prelude's output is the first one's.
            first = Some(out.stdout_str());
            packing = Packing::Raw;
            prelude = ":".into();
            continue;
        }
        break (channel, out, is_ready);
    };
    if !is_ready {
        cut_short(session, &out)?;
    }
    let text = out.stdout_str();
    let Some((before, after)) = text.split_once(&format!("{PRELUDE_END}\n")) else {
        return Err(out.failure("inspecting the host", &session.host()));
    };
    let before = match &first {
        Some(f) => f
            .split_once(&format!("{PRELUDE_END}\n"))
            .map_or("", |(b, _)| b),
        None => before,
    }
    .to_string();
    let remote = match Remote::from_install(session, &out, is_ready, after) {
        Ok(r) => r,
        // The installer failed and removed what it made.
        Err(e) => return Ok((before, fall_back(session, asked, ui, e))),
    };
    let staged = Staged {
        remote,
        channel,
        went: false,
    };
    if let Err(e) = check_version(session, after) {
        // Told to stop, the waiting shell removes it.
        if let Err(re) = staged.finish(session).await {
            ui.warn(format!("{re:#}"));
        }
        return Ok((before, fall_back(session, asked, ui, e)));
    }
    Ok((before, Ok(Some(staged))))
}

impl Staged {
    /// Run the helper and send it `input` (its first frames), then EOF.
    pub async fn go(&mut self, input: &[u8], session: &Session) -> Result<()> {
        self.went = true;
        let mut data = b"go\n".to_vec();
        data.extend_from_slice(input);
        session
            .send(&self.channel, &data)
            .await
            .with_context(|| format!("the connection to {} broke", session.host()))?;
        self.channel.eof().await.ok();
        Ok(())
    }

    /// After the session, or instead of it: a helper that never ran is
    /// told to go away and its shell removes it (waited for); one that ran
    /// and said Hello had removed itself; otherwise the folder is removed
    /// from here.
    pub async fn finish(mut self, session: &Session) -> Result<()> {
        if !self.went {
            if session.send(&self.channel, b"stop\n").await.is_ok() {
                self.channel.eof().await.ok();
                if let Ok(out) = crate::ssh::collect(&mut self.channel).await
                    && out.success()
                {
                    tracing::debug!("removed {} on {}", self.remote.tmpfs.dir, session.host());
                    return Ok(());
                }
            }
            return self.remote.remove(session).await;
        }
        drop(self.channel);
        self.remote.finish(session).await
    }
}

/// The helper, copied to its own tmpfs on the host.
pub struct Remote {
    pub tmpfs: Tmpfs,
    /// Set when the helper said Hello, i.e. after it removed its own copy.
    pub said_hello: Arc<AtomicBool>,
}

/// How the helper crosses the link: gzip'd (2.4 MB in 1.0 MB: half a
/// second less on a 40 Mbit/s uplink) to a host that has gzip, which is
/// nearly every one (it is in every distribution's base and in busybox);
/// as it is to one that has not, after that host said so.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Packing {
    Gzip,
    Raw,
}

impl Packing {
    fn bytes(self) -> &'static [u8] {
        match self {
            Packing::Gzip => BINARY_GZ,
            Packing::Raw => BINARY,
        }
    }
}

/// What the installer says when it finds no gzip (after reading what was
/// sent: drydock's send then ends as usual).
const NO_GZIP: &str = "@@ drydock-helper: no gzip";

/// Copy and check in one round trip: a tmpfs (the tmpfs script sets T,
/// and m when it mounted one, and prints "mounted" and "dir T"), exactly
/// the bytes sent from stdin (`head -c`: a staged install keeps stdin open
/// and sends more after them), unpacked, its `--version`. On any failure
/// the script removes what it made.
fn install_script(packing: Packing) -> String {
    let copy = match packing {
        Packing::Gzip => format!(
            r#"printf '' | gzip -c >/dev/null 2>&1 || {{ head -c {n} >/dev/null; echo '{NO_GZIP}'; gone; }}
head -c {n} | gzip -dc > "$T/drydock-helper" || fail "cannot unpack the helper into $T"
"#,
            n = BINARY_GZ.len()
        ),
        Packing::Raw => format!(
            "head -c {} > \"$T/drydock-helper\" || fail \"cannot write the helper to $T\"\n",
            BINARY.len()
        ),
    };
    format!(
        r#"{}fail() {{ echo "$1" >&2; gone; }}
umask 077
{copy}chmod 700 "$T/drydock-helper" || fail "cannot make $T/drydock-helper executable"
"$T/drydock-helper" --version || fail "the helper copied to $T does not start (is the folder mounted noexec?)"
"#,
        tmpfs_script("helper", "16m"),
    )
}

/// The copy answered `--version` with this drydock's protocol.
fn check_version(session: &Session, text: &str) -> Result<()> {
    if text.contains(&format!("protocol {VERSION}")) {
        return Ok(());
    }
    bail!(
        "the helper copied to {} says '{}'",
        session.host(),
        text.lines().last().unwrap_or("").trim()
    )
}

impl Remote {
    /// What the installer made, from its part of stdout (`text`);
    /// `installed`: it got to its end.
    fn from_install(
        session: &Session,
        out: &crate::ssh::Output,
        installed: bool,
        text: &str,
    ) -> Result<Remote> {
        if !installed {
            return Err(out.failure("starting drydock's helper", &session.host()));
        }
        let remote = Remote {
            tmpfs: Tmpfs::parse(text, session)?,
            said_hello: Arc::default(),
        };
        tracing::debug!(
            "the helper is in {} on {}",
            remote.tmpfs.dir,
            session.host()
        );
        Ok(remote)
    }

    pub fn path(&self) -> String {
        format!("{}/drydock-helper", self.tmpfs.dir)
    }

    /// The command that runs it, replacing the login shell. The helper
    /// removes its own copy (and detaches its tmpfs) before it says Hello.
    pub fn command(&self) -> String {
        format!(
            "exec {} --remove {}{}",
            shell_quote(&self.path()),
            shell_quote(&self.tmpfs.dir),
            if self.tmpfs.mounted { " --unmount" } else { "" }
        )
    }

    /// After a session: nothing to do when the helper said Hello (it had
    /// removed itself by then); otherwise remove the folder from here.
    pub async fn finish(&self, session: &Session) -> Result<()> {
        if self.said_hello.load(Ordering::Relaxed) {
            return Ok(());
        }
        self.remove(session).await
    }

    pub async fn remove(&self, session: &Session) -> Result<()> {
        self.tmpfs.remove(session).await
    }
}
