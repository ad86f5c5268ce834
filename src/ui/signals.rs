//! The one signal listener. SIGINT (Ctrl-C), SIGTERM (a service manager,
//! `kill`) and SIGHUP (the terminal went away, an SSH session to the
//! workstation cut) all mean "stop at the next point where stopping leaves
//! something resumable": the first one is latched, so code that looks
//! later still sees it. Only the first is acted on; a second changes
//! nothing (the work in progress is already stopping).

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

pub(super) fn listen() -> watch::Receiver<Option<&'static str>> {
    let (tx, rx) = watch::channel(None);
    for (kind, name) in [
        (SignalKind::interrupt(), "SIGINT"),
        (SignalKind::terminate(), "SIGTERM"),
        (SignalKind::hangup(), "SIGHUP"),
    ] {
        // Registering fails only outside a runtime or on a forbidden
        // signal; then that signal keeps its default action (the process
        // ends), as before drydock listened at all.
        let Ok(mut stream) = signal(kind) else {
            continue;
        };
        let tx = tx.clone();
        tokio::spawn(async move {
            while stream.recv().await.is_some() {
                tx.send_if_modified(|v| {
                    if v.is_none() {
                        *v = Some(name);
                        true
                    } else {
                        false
                    }
                });
            }
        });
    }
    rx
}

/// "interrupted (Ctrl-C)", "interrupted (SIGTERM)".
pub(super) fn said(sig: &str) -> String {
    match sig {
        "SIGINT" => "interrupted (Ctrl-C)".to_string(),
        other => format!("interrupted ({other})"),
    }
}
