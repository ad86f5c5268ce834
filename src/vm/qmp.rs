//! A tolerant QMP client: commands and their result types come from the
//! `qapi` crate, the wire is read here.
//!
//! qapi 0.15's own stream parses every message against QEMU 9.1's schema;
//! one event or enum value it does not know (QEMU 10 adds some) fails to
//! parse and ends the whole stream, and with it every pending command. This
//! reader takes each line as plain JSON first: events are kept as a name
//! and a JSON value, never rejected, and only a command's own answer is
//! decoded into its typed result.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::mpsc;

/// One QMP event, whatever QEMU version sent it.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub name: String,
    pub data: Value,
}

/// What one line of QMP is.
#[derive(Debug, PartialEq)]
pub enum Line {
    Greeting,
    Event(Event),
    Return {
        id: Option<u64>,
        value: Value,
    },
    Error {
        id: Option<u64>,
        class: String,
        desc: String,
    },
    /// Not JSON, or JSON QMP does not send: logged and skipped.
    Other(String),
}

pub fn classify(line: &str) -> Line {
    let Ok(v) = serde_json::from_str::<Value>(line) else {
        return Line::Other(line.to_string());
    };
    let id = v.get("id").and_then(Value::as_u64);
    if v.get("QMP").is_some() {
        Line::Greeting
    } else if let Some(name) = v.get("event").and_then(Value::as_str) {
        Line::Event(Event {
            name: name.to_string(),
            data: v.get("data").cloned().unwrap_or(Value::Null),
        })
    } else if let Some(ret) = v.get("return") {
        Line::Return {
            id,
            value: ret.clone(),
        }
    } else if let Some(err) = v.get("error") {
        Line::Error {
            id,
            class: err
                .get("class")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
            desc: err
                .get("desc")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
        }
    } else {
        Line::Other(line.to_string())
    }
}

pub struct Qmp {
    writer: OwnedWriteHalf,
    answers: mpsc::UnboundedReceiver<Line>,
    events: mpsc::UnboundedReceiver<Event>,
    next_id: u64,
}

const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// Connect to the socket at PATH, waiting up to PATIENCE while it refuses:
/// QEMU binds its socket (the file appears) a moment before it listens,
/// and on a loaded machine a connection in between is refused (a zoo run
/// lost a VPS boot to it).
async fn connect_listening(path: &Path, patience: Duration) -> std::io::Result<UnixStream> {
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        match UnixStream::connect(path).await {
            Err(e)
                if e.kind() == std::io::ErrorKind::ConnectionRefused
                    && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            r => return r,
        }
    }
}

impl Qmp {
    /// Connect to QEMU's QMP socket and leave capability negotiation done.
    pub async fn connect(path: &Path) -> Result<Qmp> {
        let stream = connect_listening(path, Duration::from_secs(10))
            .await
            .with_context(|| format!("cannot connect to QEMU's QMP socket {}", path.display()))?;
        let (read, writer) = stream.into_split();
        let (atx, answers) = mpsc::unbounded_channel();
        let (etx, events) = mpsc::unbounded_channel();
        // The reader owns the read half and is always polled, so an event
        // flood can never block a command's answer.
        tokio::spawn(async move {
            let mut lines = BufReader::new(read).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                match classify(&line) {
                    Line::Greeting => {}
                    Line::Event(e) => {
                        tracing::debug!("QMP event {} {}", e.name, e.data);
                        let _ = etx.send(e);
                    }
                    Line::Other(l) => {
                        tracing::warn!("QMP sent a line drydock does not understand: {l}")
                    }
                    answer => {
                        if atx.send(answer).is_err() {
                            break;
                        }
                    }
                }
            }
        });
        let mut q = Qmp {
            writer,
            answers,
            events,
            next_id: 1,
        };
        q.execute(qapi::qmp::qmp_capabilities { enable: None })
            .await
            .context("QMP capability negotiation failed")?;
        Ok(q)
    }

    /// Run one command and decode its result.
    pub async fn execute<C: qapi::Command>(&mut self, cmd: C) -> Result<C::Ok> {
        let value = self
            .execute_raw(C::NAME, serde_json::to_value(&cmd)?)
            .await?;
        serde_json::from_value(value.clone()).with_context(|| {
            format!(
                "QEMU answered {} with something unexpected: {value}",
                C::NAME
            )
        })
    }

    /// Run a command by name with JSON arguments; its raw result.
    pub async fn execute_raw(&mut self, name: &str, arguments: Value) -> Result<Value> {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({ "execute": name, "id": id });
        if !arguments.is_null() && arguments != json!({}) {
            msg["arguments"] = arguments;
        }
        let mut text = serde_json::to_string(&msg)?;
        text.push('\n');
        self.writer
            .write_all(text.as_bytes())
            .await
            .with_context(|| format!("cannot send {name} to QEMU (has it exited?)"))?;
        loop {
            let answer = tokio::time::timeout(COMMAND_TIMEOUT, self.answers.recv())
                .await
                .map_err(|_| {
                    anyhow!(
                        "QEMU did not answer {name} within {}s",
                        COMMAND_TIMEOUT.as_secs()
                    )
                })?
                .ok_or_else(|| anyhow!("QEMU closed its QMP socket before answering {name}"))?;
            match answer {
                Line::Return { id: Some(i), .. } | Line::Error { id: Some(i), .. } if i != id => {
                    continue;
                }
                Line::Return { value, .. } => return Ok(value),
                Line::Error { class, desc, .. } => bail!("QEMU refused {name}: {desc} ({class})"),
                _ => continue,
            }
        }
    }

    /// The next event, if one arrives within `wait`.
    pub async fn next_event(&mut self, wait: Duration) -> Option<Event> {
        tokio::time::timeout(wait, self.events.recv())
            .await
            .ok()
            .flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A socket bound but not yet listening (QEMU between bind and
    /// listen), then listening: the connection waits for it.
    #[tokio::test]
    async fn a_socket_not_yet_listening_is_waited_for() {
        use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        // SAFETY: plain system calls on a descriptor owned here; the
        // address is a zeroed sockaddr_un with a path shorter than its
        // sun_path.
        let fd = unsafe {
            let fd = OwnedFd::from_raw_fd(libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0));
            let mut addr: libc::sockaddr_un = std::mem::zeroed();
            addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
            let p = path.as_os_str().as_encoded_bytes();
            for (d, s) in addr.sun_path.iter_mut().zip(p) {
                *d = *s as libc::c_char;
            }
            let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
            assert_eq!(
                libc::bind(
                    fd.as_raw_fd(),
                    &addr as *const _ as *const libc::sockaddr,
                    len
                ),
                0
            );
            fd
        };
        assert!(path.exists());
        let listen_later = async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            // SAFETY: listen on the bound descriptor owned above.
            assert_eq!(unsafe { libc::listen(fd.as_raw_fd(), 1) }, 0);
        };
        let (r, ()) = tokio::join!(
            connect_listening(&path, Duration::from_secs(5)),
            listen_later
        );
        r.expect("connected once it listened");
        // And one that never listens is given up on.
        drop(fd);
        let e = connect_listening(&path, Duration::from_millis(100))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused);
    }

    #[test]
    fn classifies_every_kind_of_line() {
        assert_eq!(
            classify(
                r#"{"QMP": {"version": {"qemu": {"micro": 2, "minor": 2, "major": 7}}, "capabilities": ["oob"]}}"#
            ),
            Line::Greeting
        );
        assert_eq!(
            classify(r#"{"return": {"status": "running", "running": true}, "id": 3}"#),
            Line::Return {
                id: Some(3),
                value: json!({"status": "running", "running": true})
            }
        );
        assert_eq!(
            classify(r#"{"id": 4, "error": {"class": "GenericError", "desc": "nope"}}"#),
            Line::Error {
                id: Some(4),
                class: "GenericError".into(),
                desc: "nope".into()
            }
        );
        assert!(matches!(classify("garbage"), Line::Other(_)));
    }

    /// Events that qapi 0.15 (QEMU 9.1's schema) cannot parse: a name it
    /// does not know, and a known event with an enum value added later.
    /// Its own stream ends on either; this reader keeps them as JSON.
    #[test]
    fn events_from_newer_qemu_are_kept_not_fatal() {
        let unknown = r#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "NEW_IN_QEMU_10", "data": {"x": 1}}"#;
        assert_eq!(
            classify(unknown),
            Line::Event(Event {
                name: "NEW_IN_QEMU_10".into(),
                data: json!({"x": 1})
            })
        );
        let new_enum = r#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "JOB_STATUS_CHANGE", "data": {"id": "j", "status": "some-future-status"}}"#;
        assert!(
            matches!(classify(new_enum), Line::Event(e) if e.data["status"] == "some-future-status")
        );
        // qapi's typed parse really does reject both.
        assert!(serde_json::from_str::<qapi::qmp::Event>(unknown).is_err());
        assert!(serde_json::from_str::<qapi::qmp::Event>(new_enum).is_err());
    }
}
