//! The SSH connection to the VPS: connect (host key checked, then agent and
//! key files), run commands with their exit status and stderr, stream data.

mod hostkey;
pub mod known_hosts;
pub mod target;

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use russh::client::{self, Handle};
use russh::keys::{Algorithm, PrivateKeyWithHashAlg, PublicKey};
use russh::{Channel, ChannelMsg, Disconnect, Preferred, cipher};

use crate::errors::SshError;
use hostkey::Client;
use known_hosts::{KnownHosts, host_key_name};
pub use target::{HostSpec, SshArgs, Target};

/// How to authenticate and what to do with an unknown host key.
#[derive(Debug, Clone, Default)]
pub struct ConnectOptions {
    /// `-i KEY`: use this key and nothing else.
    pub identity: Option<PathBuf>,
    /// `--accept-new-host-key`: record an unknown key (never a changed one).
    pub accept_new_host_key: bool,
}

/// Channel windows sized for disk streaming: with russh's defaults a
/// loopback transfer tops out near 0.6 GB/s, with these near 1.1 GB/s.
/// The window is no larger than 8 MiB: OpenSSH's sshd reads what the
/// helper writes while the window allows, and with 64 MiB (or 16) it
/// buffered megabytes whenever the helper ran ahead of a 200 Mbit/s link,
/// then spent a core moving them (the link fell to 130 Mbit/s for seconds;
/// the pull took 1.17x its wire time instead of 1.11x). 8 MiB still lets a
/// 30 ms round trip carry over 1 Gbit/s; loopback pulls took the same time.
const WINDOW_SIZE: u32 = 8 << 20;
const MAX_PACKET: u32 = 255 << 10;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);

/// What a remote command did.
#[derive(Debug)]
pub struct Output {
    pub status: Option<u32>,
    pub signal: Option<String>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl Output {
    pub fn success(&self) -> bool {
        self.status == Some(0)
    }

    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    /// "exit status 2" / "killed by signal KILL", for messages.
    pub fn describe_end(&self) -> String {
        match (&self.status, &self.signal) {
            (Some(s), _) => format!("exit status {s}"),
            (None, Some(sig)) => format!("killed by signal {sig}"),
            (None, None) => "the connection closed before it finished".to_string(),
        }
    }

    /// An error that shows how the command ended and its stderr.
    pub fn failure(&self, what: &str, host: &str) -> anyhow::Error {
        let stderr = String::from_utf8_lossy(&self.stderr);
        let tail: Vec<&str> = stderr.trim_end().lines().rev().take(12).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        if tail.is_empty() {
            anyhow!(
                "{what} failed on {host} ({}), with nothing on stderr",
                self.describe_end()
            )
        } else {
            anyhow!(
                "{what} failed on {host} ({}); its stderr:\n  {}",
                self.describe_end(),
                tail.join("\n  ")
            )
        }
    }
}

pub struct Session {
    handle: Handle<Client>,
    pub target: Target,
    /// The jump host this session goes through (ProxyJump), kept open as
    /// long as it is.
    _via: Option<Box<Session>>,
}

impl Session {
    /// Long but straight: each refusal (proxy, address, host key) in the
    /// order OpenSSH makes it, each with its own message.
    pub async fn connect(target: &Target, opts: &ConnectOptions) -> Result<Session> {
        if let Some(cmd) = &target.proxy_command {
            bail!(
                "the ssh config reaches {} through a ProxyCommand ({cmd}), which drydock does \
                 not run; reach it with ProxyJump (-J) or at an address drydock can reach directly",
                target.alias
            );
        }
        // ProxyJump: each hop reached through the one before it.
        let mut via: Option<Session> = None;
        for hop in &target.jumps {
            let s = Box::pin(Self::connect_via(hop, opts, via.take()))
                .await
                .with_context(|| format!("the jump host {} (ProxyJump)", hop.display()))?;
            via = Some(s);
        }
        Self::connect_via(target, opts, via).await
    }

    /// Connect to TARGET directly, or through VIA's direct-tcpip channel.
    /// Over 80 lines: known hosts loaded and the handler built, the TCP
    /// connection opened directly or through the jump host (each with its own
    /// unreachable messages), then the handshake's failures told apart (the
    /// handler's host-key problem, a @cert-authority host, the rest) and the
    /// authentication; split, the handler's `problem` would be filled in one
    /// function and read in another.
    async fn connect_via(
        target: &Target,
        opts: &ConnectOptions,
        via: Option<Session>,
    ) -> Result<Session> {
        let name = host_key_name(
            target.host_key_alias.as_deref().unwrap_or(&target.hostname),
            if target.host_key_alias.is_some() {
                22
            } else {
                target.port
            },
        );
        let mut files = target.user_known_hosts.clone();
        files.extend(target.global_known_hosts.iter().cloned());
        let known = Arc::new(KnownHosts::load(&files)?);
        let record_to = target
            .user_known_hosts
            .first()
            .cloned()
            .context("no known_hosts file to record host keys in")?;

        let config = Arc::new(client_config(known.known_algorithms(&name)));
        let addr = format!("{}:{}", target.hostname, target.port);
        let unreachable = |reason: String| -> anyhow::Error {
            SshError::Unreachable {
                addr: addr.clone(),
                reason,
            }
            .into()
        };
        let problem = Arc::new(Mutex::new(None));
        let handler = Client {
            name: name.clone(),
            known: known.clone(),
            accept_new: opts.accept_new_host_key,
            record_to,
            problem: problem.clone(),
        };
        let handshake = match &via {
            None => {
                let stream = match tokio::time::timeout(
                    CONNECT_TIMEOUT,
                    tokio::net::TcpStream::connect((target.hostname.as_str(), target.port)),
                )
                .await
                {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => return Err(unreachable(e.to_string())),
                    Err(_) => {
                        return Err(unreachable(format!(
                            "no answer within {}s",
                            CONNECT_TIMEOUT.as_secs()
                        )));
                    }
                };
                stream.set_nodelay(true).ok();
                client::connect_stream(config, stream, handler).await
            }
            // The jump host opens the TCP connection (direct-tcpip, what
            // `ssh -W` and ProxyJump use); the SSH session runs inside it.
            Some(j) => {
                let open = j.handle.channel_open_direct_tcpip(
                    target.hostname.clone(),
                    u32::from(target.port),
                    "127.0.0.1",
                    0,
                );
                let channel = match tokio::time::timeout(CONNECT_TIMEOUT, open).await {
                    Ok(Ok(c)) => c,
                    Ok(Err(e)) => {
                        return Err(unreachable(format!(
                            "the jump host {} could not open a connection to it ({e})",
                            j.host()
                        )));
                    }
                    Err(_) => {
                        return Err(unreachable(format!(
                            "the jump host {} got no answer within {}s",
                            j.host(),
                            CONNECT_TIMEOUT.as_secs()
                        )));
                    }
                };
                client::connect_stream(config, channel.into_stream(), handler).await
            }
        };
        let handle = match handshake {
            Ok(h) => h,
            Err(e) => {
                if let Some(p) = problem.lock().expect("not poisoned").take() {
                    return Err(p.into());
                }
                if matches!(e, russh::Error::UnknownKey) && known.has_cert_authority_for(&name) {
                    bail!(
                        "{name} is trusted through @cert-authority in known_hosts, which drydock \
                         does not check; record the host's plain key with `ssh-keyscan` first"
                    );
                }
                return Err(unreachable(format!("SSH handshake failed: {e}")));
            }
        };
        let mut session = Session {
            handle,
            target: target.clone(),
            _via: via.map(Box::new),
        };
        session.authenticate(opts).await?;
        tracing::debug!("connected to {}", target.display());
        Ok(session)
    }

    /// Log in as the target's user: with -i only that key, else the agent's
    /// keys, then the configured and default ~/.ssh/id_* files.
    /// Over 80 lines: the three sources in the order they are tried, each
    /// adding what it tried (encrypted and unreadable keys too) to `tried`, the
    /// list the one error shows; split, that list would be passed between them.
    async fn authenticate(&mut self, opts: &ConnectOptions) -> Result<()> {
        let user = self.target.user.clone();
        let rsa_hash = self.handle.best_supported_rsa_hash().await?.flatten();
        let mut tried: Vec<String> = Vec::new();

        if let Some(path) = &opts.identity {
            let key = load_key(path)?;
            if self.try_key(&user, key, rsa_hash).await? {
                return Ok(());
            }
            return Err(SshError::AuthFailed {
                target: self.target.display(),
                tried: path.display().to_string(),
                hint: format!(
                    "add its public key to ~{user}/.ssh/authorized_keys on the host, or name \
                     another key with -i"
                ),
            }
            .into());
        }

        if std::env::var_os("SSH_AUTH_SOCK").is_some() {
            match russh::keys::agent::client::AgentClient::connect_env().await {
                Ok(mut agent) => {
                    let ids = agent.request_identities().await.unwrap_or_default();
                    for id in ids {
                        let russh::keys::agent::AgentIdentity::PublicKey { key, comment } = id
                        else {
                            continue;
                        };
                        let hash = is_rsa(&key).then_some(rsa_hash).flatten();
                        tried.push(format!("agent key {comment}"));
                        let res = self
                            .handle
                            .authenticate_publickey_with(&user, key, hash, &mut agent)
                            .await;
                        if matches!(res, Ok(r) if r.success()) {
                            return Ok(());
                        }
                    }
                }
                Err(e) => tracing::debug!("ssh-agent not usable: {e}"),
            }
        }

        let home = std::env::home_dir().unwrap_or_default();
        let mut files = self.target.identity_files.clone();
        for name in ["id_ed25519", "id_ecdsa", "id_rsa"] {
            files.push(home.join(".ssh").join(name));
        }
        files.dedup();
        for path in files {
            if !path.exists() {
                continue;
            }
            match russh::keys::load_secret_key(&path, None) {
                Ok(key) => {
                    tried.push(path.display().to_string());
                    if self.try_key(&user, key, rsa_hash).await? {
                        return Ok(());
                    }
                }
                Err(russh::keys::Error::KeyIsEncrypted) => {
                    tried.push(format!(
                        "{} (encrypted: add it to ssh-agent)",
                        path.display()
                    ));
                }
                Err(e) => tried.push(format!("{} (unreadable: {e})", path.display())),
            }
        }
        Err(SshError::AuthFailed {
            target: self.target.display(),
            tried: if tried.is_empty() {
                "no key found: no ssh-agent and no ~/.ssh/id_* file".to_string()
            } else {
                tried.join(", ")
            },
            hint: "name the right key with -i KEY, or load it into ssh-agent".to_string(),
        }
        .into())
    }

    async fn try_key(
        &mut self,
        user: &str,
        key: russh::keys::PrivateKey,
        rsa_hash: Option<russh::keys::HashAlg>,
    ) -> Result<bool> {
        let hash = is_rsa(key.public_key()).then_some(rsa_hash).flatten();
        let res = self
            .handle
            .authenticate_publickey(user, PrivateKeyWithHashAlg::new(Arc::new(key), hash))
            .await
            .context("SSH authentication failed")?;
        Ok(res.success())
    }

    /// Resolves once the connection is gone (russh's session ended): a
    /// write waiting for window space on a dead connection waits on this
    /// beside it, or it would wait forever (a cut dd-mode push did).
    pub async fn closed(&self) {
        while !self.handle.is_closed() {
            tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        }
    }

    /// Send DATA on CHANNEL, or fail once the connection is gone: russh's
    /// `data` waits for window space, and on a connection cut while the
    /// window is shut that wait has no end (a push cut inside the helper's
    /// install hung so).
    #[expect(
        clippy::disallowed_methods,
        reason = "the one place: raced against the end"
    )]
    pub async fn send(&self, channel: &Channel<client::Msg>, data: &[u8]) -> Result<()> {
        tokio::select! {
            r = channel.data(data) => r.map_err(|e| anyhow::anyhow!("{e}")),
            _ = self.closed() => Err(anyhow::anyhow!("the connection is gone")),
        }
    }

    /// The host as `user@host[:port]`, for messages.
    pub fn host(&self) -> String {
        self.target.display()
    }

    /// Start a command and hand its channel to the caller, who must read it.
    pub async fn open_exec(&self, command: &str) -> Result<Channel<client::Msg>> {
        let channel = self
            .handle
            .channel_open_session()
            .await
            .with_context(|| format!("cannot open an SSH channel to {}", self.host()))?;
        channel
            .exec(true, command)
            .await
            .with_context(|| format!("cannot start a command on {}", self.host()))?;
        Ok(channel)
    }

    /// Start a subsystem (`sftp`) and hand its channel to the caller.
    pub async fn open_subsystem(&self, name: &str) -> Result<Channel<client::Msg>> {
        let channel = self
            .handle
            .channel_open_session()
            .await
            .with_context(|| format!("cannot open an SSH channel to {}", self.host()))?;
        let mut channel = channel;
        channel
            .request_subsystem(true, name)
            .await
            .with_context(|| format!("cannot ask {} for its {name} subsystem", self.host()))?;
        // The answer comes before any data: sshd says no at once when it
        // has no such subsystem.
        let answer = tokio::time::timeout(CONNECT_TIMEOUT, async {
            loop {
                match channel.wait().await {
                    Some(ChannelMsg::Success) => return Ok(()),
                    Some(ChannelMsg::Failure) => {
                        bail!("{} has no {name} subsystem", self.host())
                    }
                    Some(ChannelMsg::WindowAdjusted { .. }) => continue,
                    other => bail!(
                        "{} did not start its {name} subsystem ({other:?})",
                        self.host()
                    ),
                }
            }
        });
        match answer.await {
            Ok(r) => r.map(|()| channel),
            Err(_) => bail!(
                "{} did not answer for its {name} subsystem in {} s",
                self.host(),
                CONNECT_TIMEOUT.as_secs()
            ),
        }
    }

    /// Run a command, feed it `input`, collect everything it prints.
    pub async fn exec_input(&self, command: &str, input: Option<&[u8]>) -> Result<Output> {
        let mut channel = self.open_exec(command).await?;
        if let Some(data) = input {
            self.send(&channel, data).await.with_context(|| {
                format!("the connection to {} broke while sending data", self.host())
            })?;
        }
        channel.eof().await.ok();
        collect(&mut channel).await
    }

    pub async fn exec(&self, command: &str) -> Result<Output> {
        self.exec_input(command, None).await
    }

    /// Run a command that must succeed; its stdout. `what` names it in errors.
    pub async fn run(&self, what: &str, command: &str) -> Result<String> {
        let out = self.exec(command).await?;
        if !out.success() {
            return Err(out.failure(what, &self.host()));
        }
        Ok(out.stdout_str())
    }

    /// Write `data` to a file on the host (mode 0700 if `executable`).
    pub async fn upload(&self, path: &str, data: &[u8], executable: bool) -> Result<()> {
        let q = shell_quote(path);
        let chmod = if executable { "700" } else { "600" };
        let cmd = format!("umask 077 && cat > {q} && chmod {chmod} {q}");
        let out = self.exec_input(&cmd, Some(data)).await?;
        if !out.success() {
            return Err(out.failure(&format!("writing {path}"), &self.host()));
        }
        Ok(())
    }

    pub async fn close(self) {
        let _ = self
            .handle
            .disconnect(Disconnect::ByApplication, "", "en")
            .await;
    }
}

/// Connect to a host as the user typed it (`[user@]host[:port]` or an
/// ssh_config alias), with the command line's ssh options.
pub async fn connect_to(
    host: &str,
    args: &SshArgs,
    identity: Option<PathBuf>,
    accept_new_host_key: bool,
) -> Result<Session> {
    let target = Target::resolve(&HostSpec::parse(host)?, args)?;
    Session::connect(
        &target,
        &ConnectOptions {
            identity,
            accept_new_host_key,
        },
    )
    .await
}

/// Read a channel to its end: stdout, stderr, exit status or signal.
pub async fn collect(channel: &mut Channel<client::Msg>) -> Result<Output> {
    Ok(collect_until(channel, "").await?.0)
}

/// Collect until stdout ends with the line `line` (true: the command is
/// still running, its channel open) or until the channel closes (false).
/// An empty `line` waits for the close.
pub async fn collect_until(
    channel: &mut Channel<client::Msg>,
    line: &str,
) -> Result<(Output, bool)> {
    let mut out = Output {
        status: None,
        signal: None,
        stdout: Vec::new(),
        stderr: Vec::new(),
    };
    let end = format!("{line}\n");
    while let Some(msg) = channel.wait().await {
        match msg {
            ChannelMsg::Data { data } => {
                out.stdout.extend_from_slice(&data);
                if !line.is_empty() && out.stdout.ends_with(end.as_bytes()) {
                    return Ok((out, true));
                }
            }
            ChannelMsg::ExtendedData { data, ext: 1 } => out.stderr.extend_from_slice(&data),
            ChannelMsg::ExitStatus { exit_status } => out.status = Some(exit_status),
            ChannelMsg::ExitSignal { signal_name, .. } => {
                out.signal = Some(format!("{signal_name:?}"))
            }
            ChannelMsg::Failure => bail!("the host refused to run the command"),
            _ => {}
        }
    }
    Ok((out, false))
}

fn is_rsa(key: &PublicKey) -> bool {
    matches!(key.algorithm(), Algorithm::Rsa { .. })
}

fn load_key(path: &Path) -> Result<russh::keys::PrivateKey> {
    if !path.exists() {
        return Err(crate::errors::refused!(
            "the key {} given with -i does not exist; check the path. Nothing was changed",
            path.display()
        ));
    }
    match russh::keys::load_secret_key(path, None) {
        Ok(k) => Ok(k),
        Err(russh::keys::Error::KeyIsEncrypted) => Err(crate::errors::refused!(
            "the key {} is protected by a passphrase: add it to ssh-agent (`ssh-add {}`) and \
             run again without -i. Nothing was changed",
            path.display(),
            path.display()
        )),
        Err(e) => Err(crate::errors::refused!(
            "cannot read the key {} ({e}); give -i an OpenSSH private key. Nothing was changed",
            path.display()
        )),
    }
}

fn client_config(known_algs: Vec<Algorithm>) -> client::Config {
    let mut key: Vec<Algorithm> = known_algs;
    for a in Preferred::DEFAULT.key.iter() {
        if !key.contains(a) {
            key.push(a.clone());
        }
    }
    let preferred = Preferred {
        // AES-GCM first: with AES-NI it is the fastest cipher on both ends,
        // and russh leaves it out of its default list.
        cipher: Cow::Owned(vec![
            cipher::AES_128_GCM,
            cipher::AES_256_GCM,
            cipher::CHACHA20_POLY1305,
            cipher::AES_256_CTR,
            cipher::AES_128_CTR,
        ]),
        key: Cow::Owned(key),
        ..Preferred::default()
    };
    client::Config {
        window_size: WINDOW_SIZE,
        maximum_packet_size: MAX_PACKET,
        inactivity_timeout: None,
        // A dead link is noticed within a minute instead of hanging a pull.
        keepalive_interval: Some(Duration::from_secs(15)),
        keepalive_max: 4,
        preferred,
        ..Default::default()
    }
}

/// Quote a word for a POSIX shell.
pub fn shell_quote(s: &str) -> String {
    shell_escape::unix::escape(Cow::Borrowed(s)).into_owned()
}

#[cfg(test)]
mod tests {
    use super::shell_quote;

    #[test]
    fn quotes_for_sh() {
        assert_eq!(shell_quote("/dev/vda"), "/dev/vda");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
    }
}
