//! One file per command: each turns its parsed arguments into the
//! operation and its report. What several share is here.

pub(crate) mod backup;
pub(crate) mod boot;
pub(crate) mod freeze;
pub(crate) mod probe;
pub(crate) mod pull;
pub(crate) mod push;
pub(crate) mod restore;
pub(crate) mod runs;
pub(crate) mod upgrade;
pub(crate) mod verify;

use anyhow::Result;

use crate::cli::Conn;
use crate::ssh::Session;
use crate::ui::Ui;
use crate::{remote, ssh, vm};

pub(crate) async fn connect(conn: &Conn) -> Result<Session> {
    host_is_not_a_file(&conn.host)?;
    let (args, accept_new) = conn.ssh_args()?;
    ssh::connect_to(&conn.host, &args, conn.identity.clone(), accept_new).await
}

/// A HOST that names a file here (a path, an image) is a slip, not a host
/// to look up in DNS.
pub(crate) fn host_is_not_a_file(host: &str) -> Result<()> {
    let p = std::path::Path::new(host);
    let image_like = [".raw", ".img", ".qcow2", ".manifest"]
        .iter()
        .any(|e| host.ends_with(e));
    if p.exists() && (host.contains('/') || image_like) {
        return Err(crate::errors::usage!(
            "'{host}' is a file here, not a host: HOST is [user@]host[:port], \
             ssh://[user@]host[:port] or an ssh config alias"
        ));
    }
    Ok(())
}

/// Beside a pulled image, what `drydock boot` needs to hold its services
/// back. Best effort: the image itself is complete without it.
pub(crate) async fn record_boot(
    s: &Session,
    facts: &remote::Facts,
    image: &std::path::Path,
    ui: &Ui,
) {
    match vm::boot::record(s, facts, image).await {
        Ok(dir) => ui.say(format!(
            "recorded the kernel it runs in {}: `drydock boot` holds its services back",
            dir.display()
        )),
        Err(e) => ui.say(format!(
            "note: no kernel recorded for `drydock boot` ({e:#}); boot the image with --services"
        )),
    }
}

pub(crate) fn default_cpus() -> u32 {
    std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(2)
}
