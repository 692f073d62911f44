//! Passwords: the policy, argon2id hashing off the async workers, and generated
//! passwords for the first admin.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use argon2::{Argon2, Params, PasswordHash, PasswordHasher as _, PasswordVerifier as _};
use kcloud_core::private::os_random;
use kcloud_core::{Error, Result};
use tokio::sync::Semaphore;

/// Password policy, in characters (Unicode scalar values, as JSON Schema's
/// `minLength`/`maxLength` count them in the API document).
pub const MIN_PASSWORD_CHARS: usize = 12;
pub const MAX_PASSWORD_CHARS: usize = 1024;
/// The most bytes a password within the policy can take (4 per character): longer
/// input is refused before it reaches argon2.
pub const MAX_PASSWORD_BYTES: usize = 4 * MAX_PASSWORD_CHARS;
pub(crate) const GENERATED_PASSWORD_LEN: usize = 24;
pub(crate) const DUMMY_PASSWORD: &str = "kcloud-timing-equaliser-not-a-password";

/// Checks the password policy (12–1024 characters).
pub fn validate_password(password: &str) -> Result<()> {
    let chars = password.chars().take(MAX_PASSWORD_CHARS + 1).count();
    if (MIN_PASSWORD_CHARS..=MAX_PASSWORD_CHARS).contains(&chars) {
        Ok(())
    } else {
        Err(Error::BadRequest(format!(
            "password must be {MIN_PASSWORD_CHARS} to {MAX_PASSWORD_CHARS} characters long"
        )))
    }
}

/// argon2id at a given cost. `Default` is the production cost (argon2's defaults:
/// 19 MiB, 2 passes, 1 lane).
#[derive(Clone, Debug)]
pub struct Hasher {
    pub(crate) params: Params,
}

impl Default for Hasher {
    fn default() -> Self {
        Hasher {
            params: Params::DEFAULT,
        }
    }
}

impl Hasher {
    /// The cheapest cost argon2 allows. Tests only: debug builds take seconds per hash
    /// at the production cost.
    pub fn insecure_fast_for_tests() -> Self {
        Hasher {
            params: Params::new(Params::MIN_M_COST, 1, 1, None).unwrap_or(Params::DEFAULT),
        }
    }

    /// Checks the policy, then hashes to a PHC string. CPU-heavy: run it off the async
    /// workers (`Auth::hash_password` does).
    pub fn hash(&self, password: &str) -> Result<String> {
        validate_password(password)?;
        self.argon2()
            .hash_password(password.as_bytes())
            .map(|h| h.to_string())
            .map_err(|_| Error::Internal("password hashing failed".into()))
    }

    /// Whether `password` matches the PHC string; the cost comes from the string. A
    /// malformed hash is a mismatch. CPU-heavy.
    pub fn verify(&self, password: &str, phc: &str) -> bool {
        if password.len() > MAX_PASSWORD_BYTES {
            return false;
        }
        PasswordHash::new(phc).is_ok_and(|h| self.verify_parsed(password, &h))
    }

    fn verify_parsed(&self, password: &str, hash: &PasswordHash) -> bool {
        self.argon2()
            .verify_password(password.as_bytes(), hash)
            .is_ok()
    }

    fn argon2(&self) -> Argon2<'static> {
        Argon2::new(
            argon2::Algorithm::Argon2id,
            argon2::Version::V0x13,
            self.params.clone(),
        )
    }
}

/// Hashes at the production cost (policy checked: `BadRequest`). Blocking.
pub fn hash_password(password: &str) -> Result<String> {
    Hasher::default().hash(password)
}

/// Verifies against a PHC string. Blocking.
pub fn verify_password(password: &str, phc: &str) -> bool {
    Hasher::default().verify(password, phc)
}

/// Runs argon2 on the blocking pool, a bounded number at a time (each run holds
/// ~19 MiB), and keeps the timing of "no such user" equal to "wrong password".
pub(crate) struct Passwords {
    pub(crate) hasher: Hasher,
    /// A hash of a fixed string at the hasher's cost, made on first need.
    pub(crate) dummy: OnceLock<String>,
    slots: Arc<Semaphore>,
    /// argon2 verifications run, and how many of them were against the dummy hash
    /// (tests assert that the unknown-user path really runs argon2).
    pub(crate) argon2_runs: AtomicU64,
    pub(crate) dummy_runs: AtomicU64,
}

impl Passwords {
    pub(crate) fn new(hasher: Hasher) -> Self {
        let slots = std::thread::available_parallelism().map_or(2, |n| n.get().clamp(1, 8));
        Passwords {
            hasher,
            dummy: OnceLock::new(),
            slots: Arc::new(Semaphore::new(slots)),
            argon2_runs: AtomicU64::new(0),
            dummy_runs: AtomicU64::new(0),
        }
    }

    pub(crate) async fn run<T, F>(self: &Arc<Self>, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Passwords) -> T + Send + 'static,
    {
        let permit = Arc::clone(&self.slots)
            .acquire_owned()
            .await
            .map_err(|_| Error::Internal("password hashing is shut down".into()))?;
        let this = Arc::clone(self);
        tokio::task::spawn_blocking(move || {
            // Held by the blocking task itself, so a cancelled request does not free a
            // slot while argon2 still runs.
            let _permit = permit;
            f(&this)
        })
        .await
        .map_err(|e| Error::Internal(format!("password task failed: {e}")))
    }

    /// Verifies against the user's hash, or against the dummy hash when there is no
    /// user: one code path, so both cost the same argon2 run.
    pub(crate) fn verify_or_dummy(&self, password: &str, phc: Option<&str>) -> bool {
        let target = match phc {
            Some(phc) => phc,
            None => {
                self.dummy_runs.fetch_add(1, Ordering::Relaxed);
                self.dummy.get_or_init(|| {
                    self.hasher.hash(DUMMY_PASSWORD).unwrap_or_else(|_| {
                        tracing::error!("cannot build the dummy password hash");
                        String::new()
                    })
                })
            }
        };
        let Ok(hash) = PasswordHash::new(target) else {
            return false;
        };
        self.argon2_runs.fetch_add(1, Ordering::Relaxed);
        let matched = self.hasher.verify_parsed(password, &hash);
        std::hint::black_box(matched) && phc.is_some()
    }
}

/// 24 characters of [A-Za-z0-9] from the OS RNG (about 143 bits).
pub(crate) fn generate_password() -> Result<String> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    // Rejection sampling: 248 = 4 * 62, so every character is equally likely.
    let limit = (256 / ALPHABET.len() * ALPHABET.len()) as u8;
    let mut out = String::with_capacity(GENERATED_PASSWORD_LEN);
    let mut buf = [0u8; 64];
    while out.len() < GENERATED_PASSWORD_LEN {
        os_random(&mut buf)?;
        for &b in buf.iter().filter(|&&b| b < limit) {
            if out.len() == GENERATED_PASSWORD_LEN {
                break;
            }
            out.push(char::from(ALPHABET[usize::from(b) % ALPHABET.len()]));
        }
    }
    Ok(out)
}
