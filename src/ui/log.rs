//! tracing's lines, routed through the reporter: `main` gives tracing's fmt
//! layer a [`LogWriter`]; each event it formats becomes one `Log` event,
//! printed above any bar (and with `--json` also a "log" event). Before the
//! reporter starts and after it ends, lines go straight to stderr.

use std::io::Write;
use std::sync::{Mutex, mpsc};

use tracing::{Level, Metadata};
use tracing_subscriber::fmt::MakeWriter;

use super::reporter::Event;

static ROUTE: Mutex<Option<mpsc::Sender<Event>>> = Mutex::new(None);

pub(super) fn route_to(tx: mpsc::Sender<Event>) {
    *ROUTE.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx);
}

pub(super) fn unroute() {
    *ROUTE.lock().unwrap_or_else(|p| p.into_inner()) = None;
}

/// tracing-subscriber's writer for drydock's log lines.
#[derive(Clone, Copy, Default)]
pub struct LogWriter;

/// One formatted log line, sent when tracing drops it.
pub struct Line {
    level: Level,
    buf: Vec<u8>,
}

impl<'a> MakeWriter<'a> for LogWriter {
    type Writer = Line;

    fn make_writer(&'a self) -> Line {
        Line {
            level: Level::INFO,
            buf: Vec::new(),
        }
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> Line {
        Line {
            level: *meta.level(),
            buf: Vec::new(),
        }
    }
}

impl Write for Line {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for Line {
    fn drop(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        let text = String::from_utf8_lossy(&self.buf).trim_end().to_string();
        let route = ROUTE.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(tx) = route
            && tx
                .send(Event::Log {
                    level: self.level.to_string(),
                    text,
                })
                .is_ok()
        {
            return;
        }
        let _ = std::io::stderr().write_all(&self.buf);
    }
}
