//! The host key check of every connection, as OpenSSH makes it: known,
//! recorded if new and allowed, or refused (changed, revoked, unknown)
//! with the problem kept for the connect's message.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use russh::client;
use russh::keys::PublicKeyOrCertificate;

use super::known_hosts::{self, KnownHosts, Verdict};
use crate::errors::SshError;

pub(super) struct Client {
    pub(super) name: String,
    pub(super) known: Arc<KnownHosts>,
    pub(super) accept_new: bool,
    pub(super) record_to: PathBuf,
    pub(super) problem: Arc<Mutex<Option<SshError>>>,
}

impl client::Handler for Client {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let PublicKeyOrCertificate::PublicKey { key, .. } = key else {
            // drydock does not negotiate certificate host keys.
            return Ok(false);
        };
        let fingerprint = known_hosts::fingerprint(key);
        let problem = match self.known.check(&self.name, key) {
            Verdict::Known => return Ok(true),
            Verdict::Unknown if self.accept_new => {
                match known_hosts::record(&self.record_to, &self.name, key) {
                    Ok(()) => {
                        tracing::info!(
                            "recorded the host key of {} ({fingerprint}) in {}",
                            self.name,
                            self.record_to.display()
                        );
                        return Ok(true);
                    }
                    Err(e) => {
                        tracing::error!("{e:#}");
                        return Ok(false);
                    }
                }
            }
            Verdict::Unknown => SshError::UnknownHostKey {
                name: self.name.clone(),
                fingerprint,
                record: self.record_to.clone(),
            },
            Verdict::Changed { path, line } => SshError::ChangedHostKey {
                name: self.name.clone(),
                fingerprint,
                path,
                line,
            },
            Verdict::Revoked { path, line } => SshError::RevokedHostKey {
                name: self.name.clone(),
                fingerprint,
                path,
                line,
            },
        };
        *self.problem.lock().expect("not poisoned") = Some(problem);
        Ok(false)
    }
}
