//! What drydock does on the VPS: find out what is there, and the disk.

pub mod bootfiles;
pub mod device;
pub mod facts;
pub mod freeze;
pub mod openrc;
pub mod probe;

use anyhow::{Context, Result};

use crate::ssh::Session;
pub use facts::Facts;

/// Run the facts script on the host and parse its answer.
pub async fn gather(session: &Session) -> Result<Facts> {
    let out = session
        .run(
            "gathering facts (/proc, /sys, os-release)",
            &facts::facts_script(),
        )
        .await?;
    facts::parse(&out).with_context(|| format!("cannot make sense of what {} said", session.host()))
}
