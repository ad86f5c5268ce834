//! The request/answer channel to a running helper, for a push.

use std::sync::atomic::Ordering;

use anyhow::{Result, anyhow, bail};
use drydock_helper::proto::{Decoder, Msg};
use russh::ChannelMsg;
use russh::client;

use super::{Remote, check_hello};
use crate::ssh::Session;

/// The channel to a running helper, for the request/answer exchanges of a
/// push. Its read half is drained by a task of its own into an unbounded
/// queue: russh gives each channel a small bounded buffer, and a channel
/// whose answers are not read while requests are being sent would stall
/// the whole connection. The queue stays small: the helper only answers
/// requests, and those are kept within a window.
pub struct Link {
    read: tokio::sync::mpsc::UnboundedReceiver<ChannelMsg>,
    pub write: russh::ChannelWriteHalf<client::Msg>,
    dec: Decoder,
    stderr: String,
    status: Option<u32>,
    host: String,
    pub sent: u64,
    /// Bytes the helper sent on the channel.
    pub received: u64,
    /// Set when the read half ends: the channel closed, or the connection
    /// is gone. A send waiting for window space watches it, or a cut
    /// while writing would wait forever (it did, in the fault tests).
    ended: tokio::sync::watch::Receiver<bool>,
}

/// The longest a request waits for any answer from the helper: every
/// request is answered within seconds (a block's hash, a write read
/// back); silence this long means the connection is dead without saying so.
const SILENCE: std::time::Duration = std::time::Duration::from_secs(300);

/// The longest [`Link::close`] waits for the helper to exit.
const CLOSE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Blocks asked about but not answered yet, at most (a window, so that the
/// requests and the answers flow at once without either side waiting on
/// the other's buffers).
const HASH_WINDOW: u64 = 256;

impl Link {
    pub async fn start(session: &Session, remote: &Remote) -> Result<Link> {
        let channel = session.open_exec(&remote.command()).await?;
        let (mut half, write) = channel.split();
        let (tx, read) = tokio::sync::mpsc::unbounded_channel();
        let (ended_tx, ended) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            while let Some(m) = half.wait().await {
                if tx.send(m).is_err() {
                    break;
                }
            }
            let _ = ended_tx.send(true);
        });
        let mut link = Link {
            read,
            write,
            dec: Decoder::default(),
            stderr: String::new(),
            status: None,
            host: session.host(),
            sent: 0,
            received: 0,
            ended,
        };
        let hello = link.recv().await?;
        check_hello(&hello)?;
        remote.said_hello.store(true, Ordering::Relaxed);
        Ok(link)
    }

    /// End the exchange: EOF to the helper, then wait for its channel to
    /// close, so that when drydock says it is done, refused or failed,
    /// the helper has exited on the host too (a test saw it still there
    /// just after a refusal). Both within [`CLOSE_WAIT`]: the EOF too
    /// queues behind whatever a stalled connection has not sent yet.
    pub async fn close(mut self) {
        let _ = tokio::time::timeout(CLOSE_WAIT, async {
            let _ = self.write.eof().await;
            while self.read.recv().await.is_some() {}
        })
        .await;
    }

    #[expect(clippy::disallowed_methods, reason = "raced against `ended`")]
    pub async fn send(&mut self, frame: Vec<u8>) -> Result<()> {
        self.sent += frame.len() as u64;
        let mut ended = self.ended.clone();
        tokio::select! {
            r = self.write.data_bytes(frame) => r.map_err(|e| {
                anyhow!(
                    "the connection to {} broke while talking to the helper: {e}",
                    self.host
                )
            }),
            _ = ended.wait_for(|e| *e) => {
                // Why: the helper's error or exit, or the connection lost,
                // after the answers still queued.
                loop {
                    self.recv().await?;
                }
            }
        }
    }

    pub async fn recv(&mut self) -> Result<Msg> {
        loop {
            if let Some(m) = self.dec.next_msg()? {
                if let Msg::Error { message } = &m {
                    bail!("the helper on {}: {message}", self.host);
                }
                return Ok(m);
            }
            let next = tokio::time::timeout(SILENCE, self.read.recv())
                .await
                .map_err(|_| {
                    anyhow!(
                        "the helper on {} said nothing for {} s: the connection is taken for lost",
                        self.host,
                        SILENCE.as_secs()
                    )
                })?;
            match next {
                Some(ChannelMsg::Data { data }) => {
                    self.received += data.len() as u64;
                    self.dec.feed(&data)
                }
                Some(ChannelMsg::ExtendedData { data, .. }) => {
                    self.stderr.push_str(&String::from_utf8_lossy(&data))
                }
                Some(ChannelMsg::ExitStatus { exit_status }) => self.status = Some(exit_status),
                Some(_) => {}
                None => {
                    let why = match self.status {
                        Some(s) => format!("the helper on {} exited with status {s}", self.host),
                        None => format!("the connection to {} was lost", self.host),
                    };
                    let said = self.stderr.trim();
                    if said.is_empty() {
                        bail!("{why}");
                    }
                    bail!("{why}; it said: {said}");
                }
            }
        }
    }

    /// Ask for the hashes of blocks in `runs` ([first, end) each), keeping
    /// at most HASH_WINDOW blocks asked and unanswered; `each` sees every
    /// answer in order and may refuse (its message ends the exchange,
    /// nothing written). The outer `Result` is a failure of the exchange
    /// itself.
    pub async fn hash_blocks(
        &mut self,
        runs: &[(u64, u64)],
        pages: bool,
        mut each: impl FnMut(u64, &[u8; 32], &[u8]) -> Result<(), String>,
    ) -> Result<Result<(), String>> {
        // Split the runs so that no request exceeds the window.
        let mut reqs = Vec::new();
        for &(a, b) in runs {
            let mut x = a;
            while x < b {
                let y = (x + HASH_WINDOW).min(b);
                reqs.push((x, y));
                x = y;
            }
        }
        let expected: Vec<u64> = runs.iter().flat_map(|&(a, b)| a..b).collect();
        let mut asked = 0u64;
        let mut answered = 0usize;
        let mut r = 0;
        let mut verdict = Ok(());
        while answered < expected.len() {
            while r < reqs.len() && asked - answered as u64 + (reqs[r].1 - reqs[r].0) <= HASH_WINDOW
            {
                let (first, end) = reqs[r];
                self.send(Msg::HashBlocks { first, end, pages }.encode())
                    .await?;
                asked += end - first;
                r += 1;
            }
            match self.recv().await? {
                Msg::BlockHash {
                    index,
                    hash,
                    pages: p,
                } => {
                    if index != expected[answered] {
                        bail!(
                            "the helper answered for block {index}, expected {}",
                            expected[answered]
                        );
                    }
                    answered += 1;
                    if verdict.is_ok() {
                        verdict = each(index, &hash, &p);
                    }
                }
                m => bail!("the helper sent {} while hashing", m.name()),
            }
        }
        Ok(verdict)
    }
}
