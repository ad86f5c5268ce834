//! Working inside a guest over SSH: commands with their output in the run
//! log, a reboot that is proved by a new boot id, the release it reports.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use russh::ChannelMsg;

use crate::ssh::{ConnectOptions, Session, Target};

/// How to reach a guest: its forwarded port, the VPS's credentials, and a
/// known_hosts file of the run's own (the guest presents the VPS's key).
pub fn guest_target(
    port: u16,
    identity: Option<&Path>,
    known_hosts: PathBuf,
    name: &str,
) -> (Target, ConnectOptions) {
    let home = std::env::home_dir().unwrap_or_default();
    let t = Target {
        alias: name.to_string(),
        typed: name.to_string(),
        hostname: "127.0.0.1".into(),
        port,
        user: "root".into(),
        identity_files: ["id_ed25519", "id_ecdsa", "id_rsa"]
            .iter()
            .map(|n| home.join(".ssh").join(n))
            .collect(),
        user_known_hosts: vec![known_hosts],
        global_known_hosts: vec![],
        host_key_alias: None,
        proxy_command: None,
        jumps: Vec::new(),
        jump_chain: None,
    };
    let o = ConnectOptions {
        identity: identity.map(Path::to_path_buf),
        accept_new_host_key: true,
    };
    (t, o)
}

/// Connect, retrying until `deadline` (a guest still booting refuses or resets).
pub async fn connect_retry(t: &Target, o: &ConnectOptions, deadline: Duration) -> Result<Session> {
    connect_retry_refusing(t, o, deadline, None).await
}

/// [`connect_retry`], except that keys refused for REFUSED_FOR in a row
/// end it at once: a guest whose sshd answers and refuses every key will
/// not let drydock in later (the grace covers a home folder mounted
/// after sshd starts).
pub async fn connect_retry_refusing(
    t: &Target,
    o: &ConnectOptions,
    deadline: Duration,
    refused_for: Option<Duration>,
) -> Result<Session> {
    let until = Instant::now() + deadline;
    let mut refused_since: Option<Instant> = None;
    loop {
        match Session::connect(t, o).await {
            Ok(s) => return Ok(s),
            Err(e) => {
                let auth = e.chain().any(|c| {
                    matches!(
                        c.downcast_ref::<crate::errors::SshError>(),
                        Some(crate::errors::SshError::AuthFailed { .. })
                    )
                });
                let since = if auth {
                    *refused_since.get_or_insert_with(Instant::now)
                } else {
                    refused_since = None;
                    Instant::now()
                };
                if let Some(grace) = refused_for
                    && auth
                    && since.elapsed() >= grace
                {
                    return Err(e.context(format!(
                        "{} refused every key for {}s: its sshd answers, so waiting longer \
                         will not help",
                        t.display(),
                        since.elapsed().as_secs()
                    )));
                }
                if Instant::now() >= until {
                    return Err(e).with_context(|| {
                        format!(
                            "{} did not let drydock in within {}s",
                            t.display(),
                            deadline.as_secs()
                        )
                    });
                }
                tracing::debug!("{}: not yet ({e:#})", t.display());
                tokio::time::sleep(Duration::from_secs(3)).await;
            }
        }
    }
}

/// Run a command, its output appended to the run log as it comes; the
/// last lines of it in the error when it fails.
pub async fn run_logged(s: &Session, cmd: &str, log: &Path) -> Result<()> {
    run_logged_as(s, cmd, cmd, log).await
}

/// `run_logged`, with `shown` written to the log and the errors in place
/// of the command run (which has the proxy's environment before it).
pub async fn run_logged_as(s: &Session, run: &str, shown: &str, log: &Path) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    writeln!(f, "\n$ {shown}")?;
    let mut ch = s.open_exec(run).await?;
    let mut tail: Vec<u8> = Vec::new();
    let mut status = None;
    while let Some(msg) = ch.wait().await {
        match msg {
            ChannelMsg::Data { data } | ChannelMsg::ExtendedData { data, .. } => {
                f.write_all(&data)?;
                tail.extend_from_slice(&data);
                if tail.len() > 64 << 10 {
                    tail.drain(..tail.len() - (32 << 10));
                }
            }
            ChannelMsg::ExitStatus { exit_status } => status = Some(exit_status),
            _ => {}
        }
    }
    if status != Some(0) {
        let text = String::from_utf8_lossy(&tail);
        let last: Vec<&str> = text.lines().rev().take(15).collect();
        bail!(
            "`{shown}` failed in the guest ({}); its last lines (all of it is in {}):\n  {}",
            status
                .map(|s| format!("exit status {s}"))
                .unwrap_or("connection lost".into()),
            log.display(),
            last.into_iter().rev().collect::<Vec<_>>().join("\n  ")
        );
    }
    Ok(())
}

pub async fn boot_id(s: &Session) -> Result<String> {
    Ok(
        s.run("reading the boot id", "cat /proc/sys/kernel/random/boot_id")
            .await?
            .trim()
            .to_string(),
    )
}

/// (ID, VERSION_ID, PRETTY_NAME) from os-release.
pub async fn os_release(s: &Session) -> Result<(String, String, String)> {
    let text = s
        .run(
            "reading os-release",
            "cat /etc/os-release 2>/dev/null || cat /usr/lib/os-release",
        )
        .await?;
    Ok(parse_os_release(&text))
}

/// (ID, VERSION_ID, PRETTY_NAME) of an os-release file's text.
pub fn parse_os_release(text: &str) -> (String, String, String) {
    let get = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .map(|v| v.trim_matches('"').to_string())
            .unwrap_or_default()
    };
    (get("ID"), get("VERSION_ID"), get("PRETTY_NAME"))
}

/// Reboot through the guest's own init and wait until it is back with a
/// new boot id. Right after a systemd upgrade the old systemd may refuse a
/// polite reboot; `reboot -f` is the fallback.
pub async fn reboot_and_wait(
    s: Session,
    t: &Target,
    o: &ConnectOptions,
    deadline: Duration,
) -> Result<Session> {
    let before = boot_id(&s).await?;
    let _ = tokio::time::timeout(
        Duration::from_secs(20),
        s.exec("(sleep 1; systemctl reboot || reboot || reboot -f) >/dev/null 2>&1 &"),
    )
    .await;
    s.close().await;
    let until = Instant::now() + deadline;
    loop {
        tokio::time::sleep(Duration::from_secs(5)).await;
        if let Ok(s) = Session::connect(t, o).await
            && let Ok(id) = boot_id(&s).await
        {
            if id != before {
                return Ok(s);
            }
            s.close().await;
        }
        if Instant::now() > until {
            bail!(
                "{} did not come back from its reboot within {}s",
                t.display(),
                deadline.as_secs()
            );
        }
    }
}
