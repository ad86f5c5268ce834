//! Errors a caller (or the exit code) decides something from, and the exit
//! codes drydock documents.
//!
//! | code | meaning                                                        |
//! |------|----------------------------------------------------------------|
//! | 0    | success                                                        |
//! | 1    | the operation failed (the message says where)                  |
//! | 2    | bad command line                                               |
//! | 3    | refused by a safety check or a host key check; nothing changed |
//! | 4    | the VPS came back after the push, but not as it must: a service |
//! |      | it ran before does not run, or not the release asked for; the   |
//! |      | message names `drydock abort RUN`, the way back                 |
//! | 69   | the host could not be reached or would not let us in           |
//! | 75   | cut short (a lost connection); the same command resumes it     |
//! | 130  | interrupted by a signal; the same command resumes it           |

use std::path::PathBuf;

pub const EXIT_FAILURE: u8 = 1;
pub const EXIT_USAGE: u8 = 2;
pub const EXIT_REFUSED: u8 = 3;
pub const EXIT_NOT_AS_BEFORE: u8 = 4;
/// sysexits.h's EX_TEMPFAIL: a temporary failure, to be tried again.
pub const EXIT_RESUMABLE: u8 = 75;
pub const EXIT_UNAVAILABLE: u8 = 69;
pub const EXIT_INTERRUPTED: u8 = 130;

#[derive(Debug, thiserror::Error)]
pub enum SshError {
    #[error("cannot reach {addr}: {reason}; check the address and port, and that sshd runs there")]
    Unreachable { addr: String, reason: String },

    #[error(
        "the host key of {name} is not known (fingerprint {fingerprint}); check it out of band \
         (`ssh-keygen -lf /etc/ssh/ssh_host_*_key.pub` on the host), then run again with \
         --accept-new-host-key to record it in {record}"
    )]
    UnknownHostKey {
        name: String,
        fingerprint: String,
        record: PathBuf,
    },

    #[error(
        "the host key of {name} has CHANGED (now {fingerprint}; {path}:{line} holds another): \
         someone may be intercepting the connection, or the host was reinstalled; drydock will \
         not connect. If the change is expected, remove the old key with \
         `ssh-keygen -R '{name}'` and connect again"
    )]
    ChangedHostKey {
        name: String,
        fingerprint: String,
        path: PathBuf,
        line: usize,
    },

    #[error(
        "the host key of {name} ({fingerprint}) is marked @revoked in {path}:{line}; drydock will not connect"
    )]
    RevokedHostKey {
        name: String,
        fingerprint: String,
        path: PathBuf,
        line: usize,
    },

    #[error("{target} refused every key drydock tried ({tried}); {hint}")]
    AuthFailed {
        target: String,
        tried: String,
        hint: String,
    },
}

impl SshError {
    pub fn exit_code(&self) -> u8 {
        match self {
            SshError::Unreachable { .. } | SshError::AuthFailed { .. } => EXIT_UNAVAILABLE,
            _ => EXIT_REFUSED,
        }
    }
}

/// A safety check said no. Nothing was changed; the message says what to do.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

/// The command line asked for something that does not exist or makes no
/// sense (an unknown release, a run that is not one): nothing was done.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Usage(pub String);

/// The VPS came back after the push but does not run what it ran before
/// (or not the release asked for): exit 4, the message names the way back.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct NotAsBefore(pub String);

/// Cut short by a lost connection (or a host that ended the stream): what
/// was done is kept, and the same command resumes it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Resumable(pub String);

/// The user interrupted (Ctrl-C); what was done is recorded and resumable.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Interrupted(pub String);

/// The exit code for an error chain: the first classified error wins.
pub fn exit_code(err: &anyhow::Error) -> u8 {
    for cause in err.chain() {
        if let Some(e) = cause.downcast_ref::<SshError>() {
            return e.exit_code();
        }
        if cause.downcast_ref::<Refused>().is_some() {
            return EXIT_REFUSED;
        }
        if cause.downcast_ref::<NotAsBefore>().is_some() {
            return EXIT_NOT_AS_BEFORE;
        }
        if cause.downcast_ref::<Interrupted>().is_some() {
            return EXIT_INTERRUPTED;
        }
        if cause.downcast_ref::<Usage>().is_some() {
            return EXIT_USAGE;
        }
        if cause.downcast_ref::<Resumable>().is_some() {
            return EXIT_RESUMABLE;
        }
    }
    EXIT_FAILURE
}

// The macros below are exported at the crate's root (macro_export); they
// are named from here, where the errors they make live.
pub use crate::{refused, resumable, usage};

/// `return Err(usage!("..."))`: exit 2.
#[macro_export]
macro_rules! usage {
    ($($arg:tt)*) => {
        anyhow::Error::new($crate::errors::Usage(format!($($arg)*)))
    };
}

/// `bail` with an error the same command resumes: exit 75.
#[macro_export]
macro_rules! resumable {
    ($($arg:tt)*) => {
        anyhow::Error::new($crate::errors::Resumable(format!($($arg)*)))
    };
}

/// `return Err(refused!("..."))`-style helper.
#[macro_export]
macro_rules! refused {
    ($($arg:tt)*) => {
        anyhow::Error::new($crate::errors::Refused(format!($($arg)*)))
    };
}
