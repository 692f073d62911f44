//! The HMAC key that signs every JWT.

use std::fmt;
use std::path::Path;

use jsonwebtoken::{DecodingKey, EncodingKey};
use kcloud_core::private::{create_secret_file, os_random, read_secret_file};
use kcloud_core::{Error, Result};

/// The shortest HMAC key accepted (HS256 wants at least its output size).
pub const MIN_SIGNING_KEY_BYTES: usize = 32;

/// The HMAC key that signs and checks every JWT.
pub struct SigningKey {
    pub(crate) encoding: EncodingKey,
    pub(crate) decoding: DecodingKey,
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SigningKey(<redacted>)")
    }
}

impl SigningKey {
    /// A key from raw bytes; fewer than 32 is `Config`.
    pub fn from_bytes(bytes: &[u8]) -> Result<SigningKey> {
        if bytes.len() < MIN_SIGNING_KEY_BYTES {
            return Err(Error::Config(format!(
                "the signing key has {} bytes; at least {MIN_SIGNING_KEY_BYTES} are required",
                bytes.len()
            )));
        }
        Ok(SigningKey {
            encoding: EncodingKey::from_secret(bytes),
            decoding: DecodingKey::from_secret(bytes),
        })
    }

    /// 32 fresh bytes from the OS.
    pub fn generate() -> Result<SigningKey> {
        let mut bytes = [0u8; MIN_SIGNING_KEY_BYTES];
        os_random(&mut bytes)?;
        SigningKey::from_bytes(&bytes)
    }

    /// From `explicit` (raw bytes, all of them, at least 32), else from
    /// `<data_dir>/signing.key`, generated (32 bytes from the OS, mode 0600) when
    /// absent. Replicas sharing a key must mount the same file.
    pub fn load_or_create(explicit: Option<&Path>, data_dir: &Path) -> Result<SigningKey> {
        let path = match explicit {
            Some(p) => p.to_owned(),
            None => {
                let p = data_dir.join("signing.key");
                if !p.exists() {
                    let mut bytes = [0u8; MIN_SIGNING_KEY_BYTES];
                    os_random(&mut bytes)?;
                    if create_secret_file(&p, &bytes)? {
                        tracing::info!(path = %p.display(), "generated a new JWT signing key");
                    }
                }
                p
            }
        };
        let bytes = read_secret_file(&path)?;
        SigningKey::from_bytes(&bytes).map_err(|_| {
            Error::Config(format!(
                "signing key file {} holds {} bytes; at least {MIN_SIGNING_KEY_BYTES} are required",
                path.display(),
                bytes.len()
            ))
        })
    }
}
