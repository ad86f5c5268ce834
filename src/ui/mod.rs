//! The one owner of the terminal. Every layer holds a [`Ui`] handle and
//! sends it events (a step started or finished, a progress counter, a line
//! to say, a warning, a question, the command's result); one reporter
//! thread ([`reporter`]) turns them into indicatif bars, lines and prompts
//! on stderr and, with `--json`, into the event stream on stdout (one JSON
//! object per line, schema in the README). tracing's lines go through the
//! same thread ([`log`]), so a log line never lands inside a bar.
//!
//! Signals are listened for once, here ([`signals`]): a layer that can stop
//! cleanly waits on [`Ui::interrupted`] beside its work, and the top layer
//! (`lib::run`) on every command.

mod log;
mod reporter;
mod signals;
pub mod text;

use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;

use anyhow::{Result, anyhow};
use serde::Serialize;
use serde_json::json;

pub use log::LogWriter;
use reporter::Event;

use crate::errors::refused;

/// The version of the `--json` event stream, in every line as `"v"`.
pub const SCHEMA_VERSION: u32 = 1;

/// A handle on the reporter: cheap to clone, one per layer that needs it.
#[derive(Clone)]
pub struct Ui {
    pub json: bool,
    pub yes: bool,
    tx: mpsc::Sender<Event>,
    signals: tokio::sync::watch::Receiver<Option<&'static str>>,
    /// Milliseconds spent waiting at questions, so far: times reported
    /// (a step's, a push's) leave them out.
    asked_ms: Arc<AtomicU64>,
}

/// The reporter's thread, ended by [`Reporter::finish`].
pub struct Reporter {
    tx: mpsc::Sender<Event>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Ui {
    /// Start the reporter (stderr bars only on a terminal and without
    /// `--json`) and the one signal listener. Inside the tokio runtime.
    /// QUIET (`-q`): no bars, no messages or step lines on stderr; the
    /// warnings, the questions, the errors and the result only.
    pub fn start(json: bool, quiet: bool) -> (Ui, Reporter) {
        let bars = !json && !quiet && std::io::stderr().is_terminal();
        let (tx, thread) = reporter::spawn(json, bars, quiet);
        log::route_to(tx.clone());
        let ui = Ui {
            json,
            yes: false,
            tx: tx.clone(),
            signals: signals::listen(),
            asked_ms: Arc::new(AtomicU64::new(0)),
        };
        (
            ui,
            Reporter {
                tx,
                thread: Some(thread),
            },
        )
    }

    /// The same reporter, with `--yes` answering its questions.
    pub fn with_yes(&self, yes: bool) -> Ui {
        Ui {
            yes,
            ..self.clone()
        }
    }

    fn send(&self, e: Event) {
        // The reporter outlives every command; a send can only fail while
        // the process ends, when there is no one left to tell.
        let _ = self.tx.send(e);
    }

    /// A line for people (stderr; with `--json` also a "message" event).
    pub fn say(&self, msg: impl Into<String>) {
        self.send(Event::Say(msg.into()));
    }

    /// Something the user should act on or know went wrong but did not
    /// stop the command ("warning: …" on stderr; a "warning" event).
    pub fn warn(&self, msg: impl Into<String>) {
        self.send(Event::Warn(msg.into()));
    }

    /// A step of a run began ("== NAME" on stderr; a "step" event with
    /// the step's KEY and NAME).
    pub fn step_started(&self, key: &str, name: &str) {
        self.send(Event::Step {
            step: key.to_string(),
            name: name.to_string(),
            state: "started",
            seconds: None,
        });
    }

    /// A step of a run ended, well or not, after SECONDS.
    pub fn step_ended(&self, key: &str, ok: bool, seconds: f64) {
        self.send(Event::Step {
            step: key.to_string(),
            name: String::new(),
            state: if ok { "finished" } else { "failed" },
            seconds: Some(seconds),
        });
    }

    /// A byte counter shown with rate and ETA on a terminal, and as
    /// "progress" events (at most two a second) with `--json`.
    pub fn bytes_bar(&self, total: u64, what: &str) -> Bar {
        let state = Arc::new(BarState {
            done: AtomicU64::new(0),
            total: AtomicU64::new(total),
        });
        let id = NEXT_BAR.fetch_add(1, Ordering::Relaxed);
        self.send(Event::BarStart {
            id,
            what: what.to_string(),
            state: state.clone(),
        });
        Bar {
            id,
            state,
            tx: self.tx.clone(),
            ended: false,
        }
    }

    /// Ask before a destructive step: `--yes` answers; otherwise a terminal
    /// must, and without one the step is refused.
    pub async fn confirm(&self, question: &str) -> Result<()> {
        if self.yes {
            return Ok(());
        }
        if !std::io::stdin().is_terminal() || !std::io::stderr().is_terminal() {
            return Err(refused!(
                "this needs confirmation ({question}) and there is no terminal to ask on; \
                 nothing was changed: run again with --yes to go ahead"
            ));
        }
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.send(Event::Ask {
            question: format!("{question} Type 'yes' to go ahead: "),
            reply,
        });
        let asked = std::time::Instant::now();
        let answer = tokio::select! {
            a = answer => a,
            sig = self.interrupted() => return Err(refused!("{}; nothing was changed", signals::said(sig))),
        };
        self.asked_ms
            .fetch_add(asked.elapsed().as_millis() as u64, Ordering::Relaxed);
        let answer = answer.map_err(|_| anyhow!("the terminal's reporter ended"))??;
        if answer.trim() == "yes" {
            Ok(())
        } else {
            Err(refused!("not confirmed; nothing was changed"))
        }
    }

    /// The time spent at questions so far (see [`Ui::confirm`]).
    pub fn asked(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.asked_ms.load(Ordering::Relaxed))
    }

    /// The command's result: its `human` text on stdout, or with `--json`
    /// the "result" event, the last line of the stream.
    pub fn result<T: Serialize>(&self, command: &str, v: &T, human: String) -> Result<()> {
        let line = json!({
            "v": SCHEMA_VERSION,
            "type": "result",
            "command": command,
            "result": serde_json::to_value(v)?,
        });
        self.send(Event::Data {
            json: line,
            human: Some(human),
        });
        Ok(())
    }

    /// An event of TYPE with V's fields (an object), for programs only
    /// (`drydock boot`'s "ready" while the guest runs).
    pub fn event<T: Serialize>(&self, kind: &str, v: &T) -> Result<()> {
        let mut line = serde_json::to_value(v)?;
        let obj = line
            .as_object_mut()
            .ok_or_else(|| anyhow!("an event's fields must be a JSON object"))?;
        obj.insert("v".into(), json!(SCHEMA_VERSION));
        obj.insert("type".into(), json!(kind));
        self.send(Event::Data {
            json: line,
            human: None,
        });
        Ok(())
    }

    /// Resolves when SIGINT (Ctrl-C), SIGTERM or SIGHUP has arrived, at
    /// once if one already has; gives the signal's name.
    pub async fn interrupted(&self) -> &'static str {
        let mut rx = self.signals.clone();
        match rx.wait_for(Option::is_some).await {
            Ok(v) => v.unwrap_or("SIGINT"),
            // The listener never ends; if it did, no signal will come.
            Err(_) => std::future::pending().await,
        }
    }

    /// What an interruption by SIG says: "interrupted (Ctrl-C)".
    pub fn interrupted_text(sig: &str) -> String {
        signals::said(sig)
    }
}

impl Reporter {
    /// Report how the command ended (an error: on stderr, and with `--json`
    /// as the "error" event, the last line), let every line out, and give
    /// the exit code.
    pub fn finish(mut self, outcome: Result<()>) -> u8 {
        let code = match &outcome {
            Ok(()) => 0,
            Err(e) => crate::errors::exit_code(e),
        };
        if let Err(e) = outcome {
            let _ = self.tx.send(Event::Failed {
                message: format!("{e:#}"),
                exit_code: code,
            });
        }
        let _ = self.tx.send(Event::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        log::unroute();
        code
    }
}

static NEXT_BAR: AtomicU64 = AtomicU64::new(0);

/// What a bar counts, shared with the reporter (which reads it on its own
/// clock: counting costs an atomic add, never a message).
pub(crate) struct BarState {
    pub done: AtomicU64,
    pub total: AtomicU64,
}

/// A byte counter; ends when finished or dropped.
pub struct Bar {
    id: u64,
    state: Arc<BarState>,
    tx: mpsc::Sender<Event>,
    ended: bool,
}

impl Bar {
    pub fn inc(&self, n: u64) {
        self.state.done.fetch_add(n, Ordering::Relaxed);
    }

    pub fn set_position(&self, n: u64) {
        self.state.done.store(n, Ordering::Relaxed);
    }

    /// The bar goes away (its last "progress" event is sent).
    pub fn finish(mut self) {
        self.end();
    }

    fn end(&mut self) {
        if !self.ended {
            self.ended = true;
            let _ = self.tx.send(Event::BarEnd { id: self.id });
        }
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        self.end();
    }
}

/// 1.5 GiB-style sizes for messages.
pub fn human_bytes(n: u64) -> String {
    indicatif::BinaryBytes(n).to_string()
}
