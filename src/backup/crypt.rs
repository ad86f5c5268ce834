//! A store's encryption: the age format (age-encryption.org/v1), X25519.
//!
//! ```text
//! STORE/keys/FP.age        the store's own key (an age identity file,
//!                          made at random when the store is), encrypted
//!                          to the user's key; FP names the user's key
//! STORE/blocks/ab/NAME.age a block: its zstd frame, encrypted to the
//!                          store's key. NAME is HMAC-SHA256 of the
//!                          block's SHA-256, keyed by the store's key: the
//!                          name says nothing of the content to whoever
//!                          lacks the key
//! STORE/versions/ID.json.age, STORE/versions/ID.boot/FILE.age
//! ```
//!
//! The user's key is an age identity file (`age-keygen -o FILE`, or made
//! by drydock at the first backup into a new store), given by
//! `--key-file` or `DRYDOCK_KEY_FILE`. It unlocks the store's key, as
//! restic's password unlocks its master key: it can be changed by adding
//! another key file, without re-encrypting the store. With drydock gone:
//!
//! ```text
//! age -d -i USER_KEY STORE/keys/FP.age > store.key
//! age -d -i store.key STORE/versions/ID.json.age
//! age -d -i store.key STORE/blocks/ab/NAME.age | zstd -d
//! ```
//!
//! A block's name from its SHA-256 (found in the version's manifest):
//! HMAC-SHA256 keyed by HMAC-SHA256(the store key's `AGE-SECRET-KEY-1…`
//! line, "drydock block names/1"), over the 32 bytes of the SHA-256.
//!
//! X25519 keys, which the age crate marks deprecated since 0.13 in favour
//! of its post-quantum hybrid keys (`age1pq…`): Debian 12's and 13's `age`
//! command reads X25519 files and not those, and a store that the
//! distribution's own tool cannot open fails the point of a standard
//! format. A later store format can add a post-quantum key slot.
#![expect(
    deprecated,
    reason = "X25519 age keys on purpose: Debian's age command reads them (module docs)"
)]

use std::path::{Path, PathBuf};
use std::str::FromStr;

use age::secrecy::ExposeSecret;
use age::x25519::{Identity, Recipient};
use anyhow::{Context, Result, anyhow};
use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};

use super::backend::Backend;
use crate::errors::{refused, usage};

/// What a store's files are written with.
pub enum Keys {
    /// A store made before encryption: read and written as it is.
    Plain,
    Age(Box<AgeKeys>),
}

pub struct AgeKeys {
    identity: Identity,
    recipient: Recipient,
    names: [u8; 32],
}

impl Keys {
    pub fn encrypted(&self) -> bool {
        matches!(self, Keys::Age(_))
    }

    /// The suffix of a file this store encrypts ("" or ".age").
    pub fn suffix(&self) -> &'static str {
        match self {
            Keys::Plain => "",
            Keys::Age(_) => ".age",
        }
    }

    /// The name a block whose content has SHA-256 HASH (hex) is kept
    /// under (a string that is not hex, from a damaged manifest, is named
    /// by its bytes: a name no block has).
    pub fn block_name(&self, hash: &str) -> String {
        match self {
            Keys::Plain => hash.to_string(),
            Keys::Age(k) => {
                let raw = hex::decode(hash).unwrap_or_else(|_| hash.as_bytes().to_vec());
                let mut mac =
                    <Hmac<Sha256> as KeyInit>::new_from_slice(&k.names).expect("any key length");
                mac.update(&raw);
                hex::encode(mac.finalize().into_bytes())
            }
        }
    }

    /// PLAIN as the store keeps it.
    pub fn seal(&self, plain: &[u8]) -> Result<Vec<u8>> {
        match self {
            Keys::Plain => Ok(plain.to_vec()),
            Keys::Age(k) => {
                age::encrypt(&k.recipient, plain).map_err(|e| anyhow!("cannot encrypt: {e}"))
            }
        }
    }

    /// What the store keeps in FILE (read as DATA), in the clear.
    pub fn open(&self, data: &[u8], file: &Path) -> Result<Vec<u8>> {
        match self {
            Keys::Plain => Ok(data.to_vec()),
            Keys::Age(k) => age::decrypt(&k.identity, data).map_err(|e| {
                anyhow!(
                    "{} does not decrypt with the store's key ({e}): it is damaged",
                    file.display()
                )
            }),
        }
    }
}

/// The user's key: the first `AGE-SECRET-KEY-1` line of an age identity
/// file.
pub fn read_key_file(path: &Path) -> Result<Identity> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        usage!(
            "--key-file {}: cannot read it ({e}); give the key file the store was made with",
            path.display()
        )
    })?;
    let line = text
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("AGE-SECRET-KEY-1"))
        .ok_or_else(|| {
            usage!(
                "--key-file {}: no AGE-SECRET-KEY-1 line in it; a key file is what `age-keygen \
                 -o FILE` writes (or drydock, at the first backup into a new store)",
                path.display()
            )
        })?;
    Identity::from_str(line).map_err(|e| {
        usage!(
            "--key-file {}: its key does not parse ({e})",
            path.display()
        )
    })
}

/// A new key file at PATH (0600), which must not exist.
pub fn new_key_file(path: &Path) -> Result<Identity> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let id = Identity::generate();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot make the key file {}", path.display()))?;
    let written = write!(
        f,
        "# drydock backup store key, made {}\n# public key: {}\n{}\n",
        crate::util::now(),
        id.to_public(),
        id.to_string().expose_secret()
    )
    .and_then(|()| f.sync_all());
    if let Err(e) = written {
        // A key file cut short would be taken for a key next time.
        let _ = std::fs::remove_file(path);
        return Err(anyhow!(
            "cannot write the key file {} ({e}); it was removed",
            path.display()
        ));
    }
    Ok(id)
}

/// `keys/FP.age`: the slot of the store's key for the user's key USER.
fn slot(dir: &Path, user: &Identity) -> PathBuf {
    let fp = hex::encode(&Sha256::digest(user.to_public().to_string().as_bytes())[..8]);
    dir.join("keys").join(format!("{fp}.age"))
}

fn keys_of(identity: Identity) -> Keys {
    let secret = identity.to_string();
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(secret.expose_secret().as_bytes())
        .expect("any key length");
    mac.update(b"drydock block names/1");
    let names = mac.finalize().into_bytes().into();
    let recipient = identity.to_public();
    Keys::Age(Box::new(AgeKeys {
        identity,
        recipient,
        names,
    }))
}

/// A new store's key, made at random and kept in DIR/keys encrypted to
/// USER.
pub fn init(fs: &dyn Backend, dir: &Path, user: &Identity) -> Result<Keys> {
    let store_key = Identity::generate();
    let text = format!(
        "# drydock backup store key (the blocks and versions are encrypted to it)\n# public \
         key: {}\n{}\n",
        store_key.to_public(),
        store_key.to_string().expose_secret()
    );
    let sealed = age::encrypt(&user.to_public(), text.as_bytes())
        .map_err(|e| anyhow!("cannot encrypt the store's key: {e}"))?;
    fs.make_dir(&dir.join("keys"))?;
    fs.write_atomic(&slot(dir, user), &sealed)?;
    Ok(keys_of(store_key))
}

/// DIR's key, unlocked with USER (read from KEY_FILE, for the messages).
pub fn unlock(fs: &dyn Backend, dir: &Path, user: &Identity, key_file: &Path) -> Result<Keys> {
    let p = slot(dir, user);
    let sealed = match fs.read(&p) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(refused!(
                "{} is not a key of the store {} (it has {} key(s) in {}, none for this one); \
                 give the key file the store was made with. Nothing was read or changed",
                key_file.display(),
                fs.show(dir),
                fs.list(&dir.join("keys")).map(|r| r.len()).unwrap_or(0),
                fs.show(&dir.join("keys"))
            ));
        }
        Err(e) => return Err(anyhow!("cannot read {}: {e}", fs.show(&p))),
    };
    let p = PathBuf::from(fs.show(&p));
    let text = age::decrypt(user, &sealed).map_err(|e| {
        anyhow!(
            "{} does not decrypt with {} ({e}): it is damaged",
            p.display(),
            key_file.display()
        )
    })?;
    let text = String::from_utf8(text).map_err(|_| anyhow!("{} is damaged", p.display()))?;
    let line = text
        .lines()
        .find(|l| l.starts_with("AGE-SECRET-KEY-1"))
        .ok_or_else(|| anyhow!("{} is damaged (no key in it)", p.display()))?;
    let id = Identity::from_str(line).map_err(|e| anyhow!("{} is damaged ({e})", p.display()))?;
    Ok(keys_of(id))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backup::backend::Local;

    #[test]
    fn a_store_key_round_trips_and_names_hide_the_hash() {
        let t = tempfile::tempdir().unwrap();
        let user_file = t.path().join("user.key");
        let user = new_key_file(&user_file).unwrap();
        assert_eq!(
            read_key_file(&user_file).unwrap().to_public().to_string(),
            user.to_public().to_string()
        );
        let keys = init(&Local, t.path(), &user).unwrap();
        let again = unlock(&Local, t.path(), &user, &user_file).unwrap();
        let h = hex::encode(Sha256::digest(b"block"));
        let name = keys.block_name(&h);
        assert_ne!(name, h);
        assert_eq!(name, again.block_name(&h), "the same key, the same names");
        let sealed = keys.seal(b"secret text").unwrap();
        assert!(!sealed.windows(6).any(|w| w == b"secret"));
        assert_eq!(again.open(&sealed, t.path()).unwrap(), b"secret text");
        // Another user's key is no key of this store, and changes nothing.
        let other_file = t.path().join("other.key");
        let other = new_key_file(&other_file).unwrap();
        let e = unlock(&Local, t.path(), &other, &other_file).err().unwrap();
        assert!(
            format!("{e:#}").contains("is not a key of the store"),
            "{e:#}"
        );
        assert!(
            new_key_file(&user_file).is_err(),
            "a key file is never overwritten"
        );
    }
}
