//! The reporter's thread: the only code that writes to the terminal.
//!
//! stderr is for people in every mode: the lines said, warnings, log lines,
//! the questions, and (on a terminal, without `--json`) the bars. stdout is
//! for the result: its text, or with `--json` the event stream, one object
//! per line, each with `"v"` (the schema's version) and `"type"`.

use std::collections::HashMap;
use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::{Value, json};

use super::{BarState, SCHEMA_VERSION};

pub(crate) enum Event {
    Say(String),
    Warn(String),
    Log {
        level: String,
        text: String,
    },
    Step {
        step: String,
        /// For people; only when it starts.
        name: String,
        state: &'static str,
        seconds: Option<f64>,
    },
    BarStart {
        id: u64,
        what: String,
        state: Arc<BarState>,
    },
    BarEnd {
        id: u64,
    },
    /// A whole line of the stream (result, ready), and the result's text
    /// for people when there is one.
    Data {
        json: Value,
        human: Option<String>,
    },
    Ask {
        question: String,
        reply: tokio::sync::oneshot::Sender<std::io::Result<String>>,
    },
    Failed {
        message: String,
        exit_code: u8,
    },
    Stop,
}

/// At most this often a bar's "progress" event (its last one is always sent).
const PROGRESS_EVERY: Duration = Duration::from_millis(500);
/// How often live bars are read.
const TICK: Duration = Duration::from_millis(100);

pub(super) fn spawn(
    json: bool,
    bars: bool,
    quiet: bool,
) -> (mpsc::Sender<Event>, std::thread::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel();
    let thread = std::thread::Builder::new()
        .name("reporter".into())
        .spawn(move || {
            let mut out = Out::new(json, bars, std::io::stdout(), std::io::stderr());
            out.quiet = quiet;
            loop {
                match rx.recv_timeout(TICK) {
                    Ok(Event::Stop) | Err(mpsc::RecvTimeoutError::Disconnected) => break,
                    Ok(e) => out.handle(e, Instant::now()),
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                }
                out.tick(Instant::now());
            }
            out.end_all(Instant::now());
        })
        .expect("cannot start the reporter thread");
    (tx, thread)
}

struct Live {
    what: String,
    state: Arc<BarState>,
    pb: ProgressBar,
    started: Instant,
    start_done: u64,
    last_sent: Option<(Instant, u64)>,
}

pub(super) struct Out<O: Write, E: Write> {
    json: bool,
    /// `-q`: messages and step lines are not written to stderr (they are
    /// still events with `--json`).
    quiet: bool,
    multi: MultiProgress,
    live: HashMap<u64, Live>,
    stdout: O,
    stderr: E,
}

impl<O: Write, E: Write> Out<O, E> {
    pub(super) fn new(json: bool, bars: bool, stdout: O, stderr: E) -> Self {
        let target = if bars {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        };
        Out {
            json,
            quiet: false,
            multi: MultiProgress::with_draw_target(target),
            live: HashMap::new(),
            stdout,
            stderr,
        }
    }

    /// A line on stderr, above the bars.
    fn line(&mut self, text: &str) {
        let err = &mut self.stderr;
        let text = super::text::shown(text);
        self.multi.suspend(|| {
            let _ = writeln!(err, "{text}");
            let _ = err.flush();
        });
    }

    /// A line of the event stream (with `--json` only).
    fn emit(&mut self, mut v: Value) {
        if !self.json {
            return;
        }
        if let Some(o) = v.as_object_mut() {
            o.entry("v").or_insert(json!(SCHEMA_VERSION));
        }
        let _ = writeln!(self.stdout, "{v}");
        let _ = self.stdout.flush();
    }

    pub(super) fn handle(&mut self, e: Event, now: Instant) {
        match e {
            Event::Say(text) => {
                if !self.quiet {
                    self.line(&text);
                }
                self.emit(json!({"type": "message", "text": text}));
            }
            Event::Warn(text) => {
                self.line(&format!("warning: {text}"));
                self.emit(json!({"type": "warning", "text": text}));
            }
            Event::Log { level, text } => {
                self.line(&text);
                // fmt's own level word starts the line (no colour with
                // --json: main turns it off); the event has it apart.
                let plain = text.trim_start();
                let plain = plain
                    .strip_prefix(level.as_str())
                    .unwrap_or(plain)
                    .trim_start();
                self.emit(json!({"type": "log", "level": level, "text": plain}));
            }
            Event::Step {
                step,
                name,
                state,
                seconds,
            } => {
                let mut v = json!({"type": "step", "step": step, "state": state});
                if state == "started" {
                    if !self.quiet {
                        self.line(&format!("== {name}"));
                    }
                    v["name"] = json!(name);
                }
                if let Some(s) = seconds {
                    v["seconds"] = json!(round3(s));
                }
                self.emit(v);
            }
            Event::BarStart { id, what, state } => self.bar_start(id, what, state, now),
            Event::BarEnd { id } => self.bar_end(id, now),
            Event::Data { json, human } => {
                if self.json {
                    self.emit(json);
                } else if let Some(h) = human {
                    let out = &mut self.stdout;
                    let h = super::text::shown(&h);
                    self.multi.suspend(|| {
                        let _ = write!(out, "{h}");
                        let _ = out.flush();
                    });
                }
            }
            Event::Ask { question, reply } => {
                let err = &mut self.stderr;
                let question = super::text::shown(&question);
                self.multi.suspend(|| {
                    let _ = write!(err, "{question}");
                    let _ = err.flush();
                });
                // The answer is read on a thread of its own: a question
                // given up (a signal while it waits) must not keep this
                // thread, and with it every later line and the end of the
                // command, waiting for Enter.
                std::thread::spawn(move || {
                    let mut a = String::new();
                    let _ = reply.send(std::io::stdin().read_line(&mut a).map(|_| a));
                });
            }
            Event::Failed { message, exit_code } => {
                self.line(&format!("drydock: {message}"));
                self.emit(json!({"type": "error", "exit_code": exit_code, "message": message}));
            }
            Event::Stop => {}
        }
    }

    fn bar_start(&mut self, id: u64, what: String, state: Arc<BarState>, now: Instant) {
        let total = state.total.load(Ordering::Relaxed);
        let done = state.done.load(Ordering::Relaxed);
        let pb = self.multi.add(ProgressBar::new(total));
        let style = ProgressStyle::with_template(
            "{msg:8} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta_known}",
        )
        .expect("valid template")
        .with_key("eta_known", eta_known)
        .progress_chars("=> ");
        pb.set_style(style);
        pb.set_message(what.clone());
        pb.set_position(done);
        pb.reset_eta();
        pb.enable_steady_tick(Duration::from_millis(250));
        self.live.insert(
            id,
            Live {
                what,
                state,
                pb,
                started: now,
                start_done: done,
                last_sent: None,
            },
        );
    }

    fn bar_end(&mut self, id: u64, now: Instant) {
        if let Some(l) = self.live.remove(&id) {
            let done = l.state.done.load(Ordering::Relaxed);
            l.pb.set_position(done);
            l.pb.finish_and_clear();
            self.multi.remove(&l.pb);
            if self.json {
                let v = progress(&l, done, now);
                self.emit(v);
            }
        }
    }

    /// Bars follow their counters; with `--json`, a "progress" event per
    /// bar that moved, at most every PROGRESS_EVERY.
    pub(super) fn tick(&mut self, now: Instant) {
        let mut lines = Vec::new();
        for l in self.live.values_mut() {
            let done = l.state.done.load(Ordering::Relaxed);
            let total = l.state.total.load(Ordering::Relaxed);
            l.pb.set_length(total);
            l.pb.set_position(done);
            let due = match l.last_sent {
                None => now.duration_since(l.started) >= PROGRESS_EVERY,
                Some((at, sent)) => now.duration_since(at) >= PROGRESS_EVERY && sent != done,
            };
            if self.json && due {
                lines.push(progress(l, done, now));
                l.last_sent = Some((now, done));
            }
        }
        for v in lines {
            self.emit(v);
        }
    }

    fn end_all(&mut self, now: Instant) {
        let ids: Vec<u64> = self.live.keys().copied().collect();
        for id in ids {
            self.bar_end(id, now);
        }
    }
}

/// The bar's ETA once a rate is known (a second in, something moved): the
/// first frames said "ETA 0s".
fn eta_known(state: &indicatif::ProgressState, w: &mut dyn std::fmt::Write) {
    if state.elapsed() < Duration::from_secs(1) || state.pos() == 0 {
        let _ = write!(w, "?");
    } else {
        let _ = write!(w, "{:#}", indicatif::HumanDuration(state.eta()));
    }
}

fn progress(l: &Live, done: u64, now: Instant) -> Value {
    let total = l.state.total.load(Ordering::Relaxed);
    let secs = now.duration_since(l.started).as_secs_f64();
    let rate = if secs > 0.0 {
        done.saturating_sub(l.start_done) as f64 / secs
    } else {
        0.0
    };
    let eta = (rate > 0.0).then(|| round3(total.saturating_sub(done) as f64 / rate));
    json!({
        "type": "progress",
        "what": l.what,
        "bytes_done": done,
        "bytes_total": total,
        "bytes_per_second": rate.round() as u64,
        "eta_seconds": eta,
        "seconds": round3(secs),
    })
}

fn round3(s: f64) -> f64 {
    (s * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    fn out(json: bool) -> Out<Vec<u8>, Vec<u8>> {
        Out::new(json, false, Vec::new(), Vec::new())
    }

    fn lines(o: &Out<Vec<u8>, Vec<u8>>) -> Vec<Value> {
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    }

    #[test]
    fn every_line_of_the_stream_has_the_version_and_a_type() {
        let mut o = out(true);
        let t = Instant::now();
        o.handle(Event::Say("hello".into()), t);
        o.handle(Event::Warn("careful".into()), t);
        o.handle(
            Event::Step {
                step: "pull".into(),
                name: String::new(),
                state: "finished",
                seconds: Some(1.23456),
            },
            t,
        );
        o.handle(
            Event::Log {
                level: "INFO".into(),
                text: " INFO recorded the host key".into(),
            },
            t,
        );
        o.handle(
            Event::Failed {
                message: "no".into(),
                exit_code: 3,
            },
            t,
        );
        let l = lines(&o);
        assert_eq!(
            l,
            vec![
                json!({"v": 1, "type": "message", "text": "hello"}),
                json!({"v": 1, "type": "warning", "text": "careful"}),
                json!({"v": 1, "type": "step", "step": "pull", "state": "finished", "seconds": 1.235}),
                json!({"v": 1, "type": "log", "level": "INFO", "text": "recorded the host key"}),
                json!({"v": 1, "type": "error", "exit_code": 3, "message": "no"}),
            ]
        );
        // stderr stays for people in --json mode too.
        assert_eq!(
            String::from_utf8_lossy(&o.stderr),
            "hello\nwarning: careful\n INFO recorded the host key\ndrydock: no\n"
        );
    }

    /// A string from the VPS (a PRETTY_NAME, a unit's journal line, an
    /// error quoting its output) reaches the terminal with its control
    /// characters shown escaped, whatever path it takes; the event stream
    /// keeps the true bytes, JSON-escaped.
    #[test]
    fn control_characters_never_reach_the_terminal_but_stay_in_the_json() {
        let evil = "Debian\u{1b}]52;c;aGk=\u{7}\u{1b}[2J\r\u{9b}31m\u{202e}x";
        let mut o = out(true);
        let t = Instant::now();
        o.handle(Event::Say(format!("is back, running {evil}")), t);
        o.handle(Event::Warn(evil.into()), t);
        o.handle(
            Event::Log {
                level: "WARN".into(),
                text: format!(" WARN {evil}"),
            },
            t,
        );
        o.handle(
            Event::Failed {
                message: evil.into(),
                exit_code: 1,
            },
            t,
        );
        let err = String::from_utf8(o.stderr.clone()).unwrap();
        for bad in ['\u{1b}', '\u{7}', '\r', '\u{9b}', '\u{202e}'] {
            assert!(!err.contains(bad), "{bad:?} reached the terminal: {err:?}");
        }
        assert!(
            err.contains("Debian\\x1b]52;c;aGk=\\x07\\x1b[2J\\x0d\\u{009b}31m"),
            "{err}"
        );
        let l = lines(&o);
        assert_eq!(l[0]["text"], format!("is back, running {evil}"));
        assert_eq!(l[3]["message"], evil);
        // Without --json, a result's text on stdout too.
        let mut o = out(false);
        o.handle(
            Event::Data {
                json: json!({}),
                human: Some(format!("{evil}\n")),
            },
            t,
        );
        let text = String::from_utf8(o.stdout.clone()).unwrap();
        assert!(!text.contains('\u{1b}'), "{text:?}");
    }

    #[test]
    fn progress_is_sent_at_most_twice_a_second_and_always_at_the_end() {
        let mut o = out(true);
        let t0 = Instant::now();
        let st = Arc::new(BarState {
            done: AtomicU64::new(1000),
            total: AtomicU64::new(10_000),
        });
        o.handle(
            Event::BarStart {
                id: 7,
                what: "pull".into(),
                state: st.clone(),
            },
            t0,
        );
        // Ticks every 100 ms for 2 s, the counter moving each time.
        for i in 1..=20u64 {
            st.done.store(1000 + i * 100, Ordering::Relaxed);
            o.tick(t0 + Duration::from_millis(100 * i));
        }
        st.done.store(4000, Ordering::Relaxed);
        o.handle(Event::BarEnd { id: 7 }, t0 + Duration::from_millis(2050));
        let l = lines(&o);
        assert_eq!(l.len(), 5, "{l:?}"); // at 0.5, 1.0, 1.5, 2.0 s, and the end
        assert_eq!(l[0]["bytes_done"], 1500);
        assert_eq!(l[0]["bytes_per_second"], 1000); // resumed bytes not counted
        assert_eq!(l[0]["eta_seconds"], 8.5);
        assert_eq!(l[4]["bytes_done"], 4000);
        assert_eq!(l[4]["bytes_total"], 10_000);
        assert!(
            l.iter()
                .all(|v| v["type"] == "progress" && v["what"] == "pull")
        );
    }

    #[test]
    fn a_bar_that_does_not_move_sends_no_more_progress() {
        let mut o = out(true);
        let t0 = Instant::now();
        let st = Arc::new(BarState {
            done: AtomicU64::new(0),
            total: AtomicU64::new(10),
        });
        o.handle(
            Event::BarStart {
                id: 1,
                what: "push".into(),
                state: st,
            },
            t0,
        );
        for i in 1..=30u64 {
            o.tick(t0 + Duration::from_millis(100 * i));
        }
        assert_eq!(lines(&o).len(), 1);
    }

    #[test]
    fn without_json_the_result_is_its_text_and_stdout_has_nothing_else() {
        let mut o = out(false);
        let t = Instant::now();
        o.handle(Event::Say("working".into()), t);
        o.handle(
            Event::Data {
                json: json!({"type": "result"}),
                human: Some("pulled it\n".into()),
            },
            t,
        );
        assert_eq!(String::from_utf8_lossy(&o.stdout), "pulled it\n");
        assert_eq!(String::from_utf8_lossy(&o.stderr), "working\n");
    }
}
