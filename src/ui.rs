//! The one owner of the terminal: progress bars and questions go to stderr,
//! only when stderr is a terminal and `--json` is off; data goes to stdout.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use anyhow::Result;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::refused;

#[derive(Debug, Clone, Copy)]
pub struct Ui {
    pub json: bool,
    pub yes: bool,
}

impl Ui {
    fn show_progress(&self) -> bool {
        !self.json && std::io::stderr().is_terminal()
    }

    /// A byte counter with rate and ETA; hidden (a no-op) when not on a terminal.
    pub fn bytes_bar(&self, total: u64, what: &str) -> ProgressBar {
        if !self.show_progress() {
            return ProgressBar::hidden();
        }
        let pb = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
        let style = ProgressStyle::with_template(
            "{msg:8} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
        )
        .expect("valid template")
        .progress_chars("=> ");
        pb.set_style(style);
        pb.set_message(what.to_string());
        pb.enable_steady_tick(Duration::from_millis(250));
        pb
    }

    /// A line for people, on stderr (never interleaved with a live bar:
    /// callers finish their bar before saying more).
    pub fn say(&self, msg: impl AsRef<str>) {
        let mut e = std::io::stderr().lock();
        let _ = writeln!(e, "{}", msg.as_ref());
    }

    /// Ask before a destructive step: `--yes` answers; otherwise a terminal
    /// must, and without one the step is refused.
    pub fn confirm(&self, question: &str) -> Result<()> {
        if self.yes {
            return Ok(());
        }
        if !std::io::stdin().is_terminal() || !std::io::stderr().is_terminal() {
            return Err(refused!(
                "this needs confirmation ({question}) and there is no terminal to ask on; \
                 nothing was changed: run again with --yes to go ahead"
            ));
        }
        eprint!("{question} Type 'yes' to go ahead: ");
        let mut answer = String::new();
        std::io::stdin().read_line(&mut answer)?;
        if answer.trim() == "yes" {
            Ok(())
        } else {
            Err(refused!("not confirmed; nothing was changed"))
        }
    }
}

/// 1.5 GiB-style sizes for messages.
pub fn human_bytes(n: u64) -> String {
    indicatif::BinaryBytes(n).to_string()
}
