//! Passwords (argon2id), secrets on disk, JWTs, login rate limits, and the login /
//! refresh / logout flows.
//!
//! Nothing secret (passwords, tokens, hashes, keys) is ever logged or put in an error.

use std::collections::HashMap;
use std::fmt;
use std::io::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use argon2::{Argon2, Params, PasswordHash, PasswordHasher as _, PasswordVerifier as _};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rand::rngs::OsRng;
use rand::{RngCore as _, TryRngCore as _};
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

use crate::store::{
    AuditEntry, NewUser, Quota, RefreshRow, RefreshUse, Role, Store, User, validate_user_name,
};
use crate::{Error, Result};

/// Password policy, in bytes of UTF-8.
pub const MIN_PASSWORD_BYTES: usize = 12;
pub const MAX_PASSWORD_BYTES: usize = 1024;
/// The shortest HMAC key accepted (HS256 wants at least its output size).
pub const MIN_SIGNING_KEY_BYTES: usize = 32;
/// The shortest shared secret (agent token) accepted from a file.
pub const MIN_SECRET_CHARS: usize = 16;

/// Login attempts per user name: a burst of 5, then one every 30 s.
pub const LOGIN_PER_USER_BURST: u32 = 5;
pub const LOGIN_PER_USER_REFILL: Duration = Duration::from_secs(30);
/// Login attempts per client address (IPv6 per /64): a burst of 30, then one every 2 s.
pub const LOGIN_PER_CLIENT_BURST: u32 = 30;
pub const LOGIN_PER_CLIENT_REFILL: Duration = Duration::from_secs(2);
/// Keys each login limiter remembers at most.
pub const RATE_LIMIT_MAX_KEYS: usize = 10_000;

/// Clock skew tolerated on `exp`.
const LEEWAY_SECS: u64 = 5;
/// Longer "tokens" are refused before any parsing.
const MAX_TOKEN_BYTES: usize = 8 * 1024;
const BAD_CREDENTIALS: &str = "invalid username or password";
const SESSION_ENDED: &str = "session expired or revoked; sign in again";
const INVALID_TOKEN: &str = "invalid token";
const DEFAULT_ADMIN: &str = "admin";
const GENERATED_PASSWORD_LEN: usize = 24;
/// Every user name that fails validation shares one per-user bucket: such names cannot
/// exist, and spraying them must not grow the limiter.
const INVALID_NAME_KEY: &str = "\0invalid";
const DUMMY_PASSWORD: &str = "kcloud-timing-equaliser-not-a-password";

// ---------------------------------------------------------------------------------
// Passwords

/// Checks the password policy (12–1024 bytes).
pub fn validate_password(password: &str) -> Result<()> {
    if (MIN_PASSWORD_BYTES..=MAX_PASSWORD_BYTES).contains(&password.len()) {
        Ok(())
    } else {
        Err(Error::BadRequest(format!(
            "password must be {MIN_PASSWORD_BYTES} to {MAX_PASSWORD_BYTES} bytes long"
        )))
    }
}

/// argon2id at a given cost. `Default` is the production cost (argon2's defaults:
/// 19 MiB, 2 passes, 1 lane).
#[derive(Clone, Debug)]
pub struct Hasher {
    params: Params,
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
struct Passwords {
    hasher: Hasher,
    /// A hash of a fixed string at the hasher's cost, made on first need.
    dummy: OnceLock<String>,
    slots: Arc<Semaphore>,
    /// argon2 verifications run, and how many of them were against the dummy hash
    /// (tests assert that the unknown-user path really runs argon2).
    argon2_runs: AtomicU64,
    dummy_runs: AtomicU64,
}

impl Passwords {
    fn new(hasher: Hasher) -> Self {
        let slots = std::thread::available_parallelism().map_or(2, |n| n.get().clamp(1, 8));
        Passwords {
            hasher,
            dummy: OnceLock::new(),
            slots: Arc::new(Semaphore::new(slots)),
            argon2_runs: AtomicU64::new(0),
            dummy_runs: AtomicU64::new(0),
        }
    }

    async fn run<T, F>(self: &Arc<Self>, f: F) -> Result<T>
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
    fn verify_or_dummy(&self, password: &str, phc: Option<&str>) -> bool {
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

// ---------------------------------------------------------------------------------
// Secrets on disk

/// 32 random bytes, base64url: for CSRF tokens and generated shared secrets.
pub fn random_token() -> String {
    let mut bytes = [0u8; 32];
    // ThreadRng: a CSPRNG seeded and reseeded from the OS.
    rand::rng().fill_bytes(&mut bytes);
    URL_SAFE_NO_PAD.encode(bytes)
}

fn os_random(buf: &mut [u8]) -> Result<()> {
    OsRng
        .try_fill_bytes(buf)
        .map_err(|e| Error::Internal(format!("the OS random number generator failed: {e}")))
}

/// Creates `dir` (and parents) with mode 0700 where it creates them; an existing
/// directory is left as it is.
pub fn create_private_dir(dir: &Path) -> Result<()> {
    let mut b = std::fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        b.mode(0o700);
    }
    b.create(dir).map_err(|source| Error::Io {
        context: format!("creating directory {}", dir.display()),
        source,
    })
}

/// Writes `contents` to `path` with mode 0600 unless `path` exists, atomically: the
/// file appears complete or not at all (temp file, fsync, hard link), and of two
/// processes racing, one wins and both then read the winner's file. Returns whether
/// this call created it.
fn create_secret_file(path: &Path, contents: &[u8]) -> Result<bool> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    create_private_dir(dir)?;
    let io = |what: &str, p: &Path| {
        let context = format!("{what} {}", p.display());
        move |source| Error::Io { context, source }
    };
    let tmp = dir.join(format!(".{}.tmp", &random_token()[..16]));
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let written = opts.open(&tmp).and_then(|mut f| {
        f.write_all(contents)?;
        f.sync_all()
    });
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(io("writing", &tmp)(e));
    }
    let linked = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => {
            // Make the new directory entry durable too.
            if let Ok(d) = std::fs::File::open(dir) {
                let _ = d.sync_all();
            }
            Ok(true)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(io("creating", path)(e)),
    }
}

fn read_secret_file(path: &Path) -> Result<Vec<u8>> {
    let bytes = std::fs::read(path).map_err(|source| Error::Io {
        context: format!("reading {}", path.display()),
        source,
    })?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(m) = std::fs::metadata(path)
            // Group access is how a Kubernetes Secret reaches a non-root pod (0440 with
            // fsGroup); access for everyone else is the mistake worth a warning.
            && m.permissions().mode() & 0o007 != 0
        {
            tracing::warn!(
                path = %path.display(),
                "secret file is readable by others; make it 0600 (0440 with fsGroup for a mounted Secret)"
            );
        }
    }
    Ok(bytes)
}

/// A shared secret (the agents' token): from `explicit` if given, else from
/// `default_path`, generated there (a `random_token`, mode 0600) when absent.
/// Surrounding whitespace is trimmed; at least 16 printable ASCII characters.
pub fn load_or_create_secret(explicit: Option<&Path>, default_path: &Path) -> Result<String> {
    let path = match explicit {
        Some(p) => p,
        None => {
            if !default_path.exists()
                && create_secret_file(default_path, random_token().as_bytes())?
            {
                tracing::info!(path = %default_path.display(), "generated a new shared secret");
            }
            default_path
        }
    };
    let bytes = read_secret_file(path)?;
    let text = std::str::from_utf8(&bytes)
        .map(str::trim)
        .map_err(|_| Error::Config(format!("{} is not UTF-8 text", path.display())))?;
    if text.len() < MIN_SECRET_CHARS || !text.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Error::Config(format!(
            "{} must hold at least {MIN_SECRET_CHARS} printable ASCII characters without spaces",
            path.display()
        )));
    }
    Ok(text.to_owned())
}

/// The HMAC key that signs and checks every JWT.
pub struct SigningKey {
    encoding: EncodingKey,
    decoding: DecodingKey,
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

// ---------------------------------------------------------------------------------
// Rate limiting

/// Keyed token buckets (as GCRA: one "theoretical arrival time" per key), thread-safe,
/// with bounded memory: a key whose bucket has refilled is dropped, and at the cap the
/// fullest bucket is evicted first.
pub struct RateLimiter {
    burst: u32,
    interval_ms: u64,
    max_keys: usize,
    state: Mutex<LimiterState>,
}

struct LimiterState {
    /// When each key's bucket is full again, in ms; past means full.
    tat: HashMap<String, u64>,
    last_sweep_ms: u64,
}

impl fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimiter")
            .field("burst", &self.burst)
            .field("interval_ms", &self.interval_ms)
            .field("keys", &self.len())
            .finish()
    }
}

impl RateLimiter {
    /// `burst` attempts at once, then one per `refill_every`; at most `max_keys` keys.
    pub fn new(burst: u32, refill_every: Duration, max_keys: usize) -> Self {
        RateLimiter {
            burst: burst.max(1),
            interval_ms: (refill_every.as_millis() as u64).max(1),
            max_keys: max_keys.max(1),
            state: Mutex::new(LimiterState {
                tat: HashMap::new(),
                last_sweep_ms: 0,
            }),
        }
    }

    /// Takes one token for `key`, or says how long to wait (`RateLimited`).
    pub fn check(&self, key: &str, now_ms: u64) -> Result<()> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if now_ms.saturating_sub(st.last_sweep_ms) >= 60_000 {
            st.tat.retain(|_, t| *t > now_ms);
            st.last_sweep_ms = now_ms;
        }
        let tolerance = u64::from(self.burst - 1).saturating_mul(self.interval_ms);
        // A stored time beyond `now + burst * interval` means the clock stepped back:
        // count the bucket as drained rather than locking the key for the whole step.
        let ceiling = now_ms.saturating_add(tolerance + self.interval_ms);
        let tat = st
            .tat
            .get(key)
            .copied()
            .unwrap_or(now_ms)
            .clamp(now_ms, ceiling);
        let wait_ms = (tat - now_ms).saturating_sub(tolerance);
        if wait_ms > 0 {
            if let Some(t) = st.tat.get_mut(key) {
                *t = tat;
            }
            return Err(Error::RateLimited {
                retry_after_secs: wait_ms.div_ceil(1000).max(1),
            });
        }
        let next = tat.saturating_add(self.interval_ms);
        if let Some(t) = st.tat.get_mut(key) {
            *t = next;
            return Ok(());
        }
        if st.tat.len() >= self.max_keys {
            st.tat.retain(|_, t| *t > now_ms);
            if st.tat.len() >= self.max_keys
                && let Some(k) = st
                    .tat
                    .iter()
                    .min_by_key(|(_, t)| **t)
                    .map(|(k, _)| k.clone())
            {
                st.tat.remove(&k);
            }
        }
        st.tat.insert(key.to_owned(), next);
        Ok(())
    }

    /// Keys held now.
    pub fn len(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .tat
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The limiter key for a client: the IPv4 address, or the IPv6 /64 (one host usually
/// holds a whole /64, so per-address limits would be trivial to dodge).
pub fn client_key(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => {
                let s = v6.segments();
                format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
            }
        },
    }
}

// ---------------------------------------------------------------------------------
// Tokens and the service

/// What a token is for; one cannot stand in for the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenType {
    Access,
    Refresh,
}

/// JWT claims. Times are seconds since the Unix epoch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub role: Role,
    pub typ: TokenType,
    pub iat: u64,
    pub exp: u64,
    pub jti: String,
    /// The rotation family; refresh tokens only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fam: Option<String>,
}

/// Token lifetimes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthConfig {
    pub access_ttl: Duration,
    pub refresh_ttl: Duration,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            access_ttl: Duration::from_secs(15 * 60),
            refresh_ttl: Duration::from_secs(7 * 24 * 60 * 60),
        }
    }
}

/// The login response.
#[derive(Clone, Serialize, utoipa::ToSchema)]
pub struct Session {
    pub access_token: String,
    pub refresh_token: String,
    /// Seconds until the access token expires.
    pub expires_in: u64,
    /// Seconds until the refresh token expires.
    pub refresh_expires_in: u64,
    /// Always `Bearer`.
    #[schema(value_type = String, example = "Bearer")]
    pub token_type: &'static str,
    pub user: User,
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("access_token", &"<redacted>")
            .field("refresh_token", &"<redacted>")
            .field("expires_in", &self.expires_in)
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

/// Users, tokens and login limits. Share it behind an `Arc`.
pub struct Auth {
    store: Store,
    key: SigningKey,
    config: AuthConfig,
    validation: Validation,
    passwords: Arc<Passwords>,
    per_user: RateLimiter,
    per_client: RateLimiter,
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Auth")
            .field("store", &self.store)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Auth {
    /// With production password hashing.
    pub fn new(store: Store, key: SigningKey, config: AuthConfig) -> Self {
        Self::with_hasher(store, key, config, Hasher::default())
    }

    /// With a chosen hashing cost (`Hasher::insecure_fast_for_tests` in tests).
    pub fn with_hasher(store: Store, key: SigningKey, config: AuthConfig, hasher: Hasher) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.algorithms = vec![Algorithm::HS256];
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.leeway = LEEWAY_SECS;
        // `exp` is checked in `decode` against the caller's clock (tests drive time).
        validation.validate_exp = false;
        Auth {
            store,
            key,
            config,
            validation,
            passwords: Arc::new(Passwords::new(hasher)),
            per_user: RateLimiter::new(
                LOGIN_PER_USER_BURST,
                LOGIN_PER_USER_REFILL,
                RATE_LIMIT_MAX_KEYS,
            ),
            per_client: RateLimiter::new(
                LOGIN_PER_CLIENT_BURST,
                LOGIN_PER_CLIENT_REFILL,
                RATE_LIMIT_MAX_KEYS,
            ),
        }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn access_ttl(&self) -> Duration {
        self.config.access_ttl
    }

    pub fn refresh_ttl(&self) -> Duration {
        self.config.refresh_ttl
    }

    /// Checks the policy (`BadRequest`) and hashes on the blocking pool, bounded.
    pub async fn hash_password(&self, password: &str) -> Result<String> {
        validate_password(password)?;
        let password = password.to_owned();
        self.passwords
            .run(move |p| p.hasher.hash(&password))
            .await?
    }

    /// Signs in. Wrong name, wrong password and disabled account all give the same
    /// 401; rate limits give 429. Audits `login` / `login_failed`.
    pub async fn login(
        &self,
        username: &str,
        password: &str,
        client: IpAddr,
        now_ms: u64,
    ) -> Result<Session> {
        self.per_client.check(&client_key(client), now_ms)?;
        let name_ok = validate_user_name(username).is_ok();
        self.per_user
            .check(if name_ok { username } else { INVALID_NAME_KEY }, now_ms)?;

        let record = if name_ok {
            self.store.user(username).await?
        } else {
            None
        };
        let matched = if password.len() > MAX_PASSWORD_BYTES {
            false
        } else {
            let password = password.to_owned();
            let phc = record.as_ref().map(|r| r.password_hash.clone());
            self.passwords
                .run(move |p| p.verify_or_dummy(&password, phc.as_deref()))
                .await?
        };
        let failure = match &record {
            None => Some("unknown user"),
            Some(_) if !matched => Some("wrong password"),
            Some(r) if r.user.disabled => Some("account disabled"),
            Some(_) => None,
        };
        if let Some(reason) = failure {
            // The attempted name is recorded only when it is a real user: people type
            // passwords into the name field.
            let target = record.map(|r| r.user.name).unwrap_or_default();
            tracing::info!(user = %target, %client, reason, "login failed");
            self.store
                .audit(AuditEntry {
                    at_ms: now_ms,
                    actor: String::new(),
                    action: "login_failed".into(),
                    target,
                    detail: reason.into(),
                    client: client.to_string(),
                })
                .await?;
            return Err(Error::Unauthorized(BAD_CREDENTIALS.into()));
        }
        let Some(record) = record else {
            return Err(Error::Unauthorized(BAD_CREDENTIALS.into()));
        };
        let session = self
            .issue(&record.user, uuid::Uuid::new_v4().to_string(), now_ms)
            .await?;
        self.store
            .audit(AuditEntry {
                at_ms: now_ms,
                actor: record.user.name.clone(),
                action: "login".into(),
                target: record.user.name.clone(),
                detail: String::new(),
                client: client.to_string(),
            })
            .await?;
        Ok(session)
    }

    /// Rotates: the presented refresh token is consumed and a new pair is issued in
    /// the same family. A token presented twice (or after logout) revokes its whole
    /// family. Disabled or deleted users get 401.
    pub async fn refresh(&self, refresh_token: &str, now_ms: u64) -> Result<Session> {
        let claims = self.decode(refresh_token, TokenType::Refresh, Some(now_ms))?;
        let fam = claims.fam.clone().unwrap_or_default();
        let ended = || Error::Unauthorized(SESSION_ENDED.into());
        match self.store.consume_refresh(&claims.jti, now_ms).await? {
            RefreshUse::Invalid => Err(ended()),
            RefreshUse::Reused { family } => {
                self.store.revoke_family(&family).await?;
                tracing::warn!(user = %claims.sub, "refresh token presented again; its session family is revoked");
                self.store
                    .audit(AuditEntry {
                        at_ms: now_ms,
                        actor: String::new(),
                        action: "refresh_reused".into(),
                        target: claims.sub,
                        detail: "refresh token reused or revoked; session family revoked".into(),
                        client: String::new(),
                    })
                    .await?;
                Err(ended())
            }
            RefreshUse::Valid { user, family } => {
                if user != claims.sub || family != fam {
                    // Only a forged-but-signed token gets here: end the family.
                    self.store.revoke_family(&family).await?;
                    return Err(ended());
                }
                let Some(record) = self.store.user(&user).await?.filter(|r| !r.user.disabled)
                else {
                    self.store.revoke_family(&family).await?;
                    return Err(ended());
                };
                match self.issue(&record.user, family, now_ms).await {
                    // The family was revoked between consume and insert.
                    Err(Error::Unauthorized(_)) => Err(ended()),
                    other => other,
                }
            }
        }
    }

    /// Revokes the token's family. Idempotent; an expired (but genuine) token still
    /// signs out. Audits `logout`.
    pub async fn logout(&self, refresh_token: &str) -> Result<()> {
        let claims = self.decode(refresh_token, TokenType::Refresh, None)?;
        let fam = claims.fam.unwrap_or_default();
        self.store.revoke_family(&fam).await?;
        self.store
            .audit(AuditEntry {
                at_ms: crate::now_ms(),
                actor: claims.sub.clone(),
                action: "logout".into(),
                target: claims.sub,
                detail: String::new(),
                client: String::new(),
            })
            .await
    }

    /// Checks an access token against the wall clock. Stateless: a disabled or
    /// demoted user's token stays valid until it expires (at most the access TTL).
    pub fn verify_access(&self, token: &str) -> Result<Claims> {
        self.verify_access_at(token, crate::now_ms())
    }

    /// `verify_access` at a given time.
    pub fn verify_access_at(&self, token: &str, now_ms: u64) -> Result<Claims> {
        self.decode(token, TokenType::Access, Some(now_ms))
    }

    /// Creates the first admin. With a password (value or file, one trailing newline
    /// dropped) the named user (default `admin`) is created if absent. With neither,
    /// and no enabled admin, `admin` is created with a generated password that is
    /// returned for the caller to print once. An existing user is never changed.
    pub async fn bootstrap_admin(
        &self,
        user: Option<String>,
        password: Option<String>,
        password_file: Option<PathBuf>,
    ) -> Result<Option<String>> {
        let user = user.filter(|u| !u.is_empty());
        let password = password.filter(|p| !p.is_empty());
        let password_file = password_file.filter(|p| !p.as_os_str().is_empty());
        let name = user.clone().unwrap_or_else(|| DEFAULT_ADMIN.to_owned());
        validate_user_name(&name)
            .map_err(|e| Error::Config(format!("KCLOUD_BOOTSTRAP_ADMIN_USER: {e}")))?;
        let (given, source) = match (password, password_file) {
            (Some(_), Some(_)) => {
                return Err(Error::Config(
                    "set KCLOUD_BOOTSTRAP_ADMIN_PASSWORD or KCLOUD_BOOTSTRAP_ADMIN_PASSWORD_FILE, \
                     not both"
                        .into(),
                ));
            }
            (Some(p), None) => (Some(p), "password from the environment"),
            (None, Some(path)) => (Some(read_password_file(&path)?), "password from a file"),
            (None, None) => (None, "generated password"),
        };

        if let Some(password) = given {
            if self.store.user(&name).await?.is_some() {
                tracing::info!(user = %name, "bootstrap admin exists; left unchanged");
                return Ok(None);
            }
            validate_password(&password).map_err(|_| {
                Error::Config(format!(
                    "the bootstrap admin password must be {MIN_PASSWORD_BYTES} to \
                     {MAX_PASSWORD_BYTES} bytes long"
                ))
            })?;
            self.create_admin(&name, &password, source).await?;
            return Ok(None);
        }

        if self.store.admin_count().await? > 0 {
            if user.is_some() && self.store.user(&name).await?.is_none() {
                tracing::warn!(user = %name, "KCLOUD_BOOTSTRAP_ADMIN_USER is set without a password; not created");
            }
            return Ok(None);
        }
        if self.store.user(DEFAULT_ADMIN).await?.is_some() {
            tracing::warn!(
                "no enabled admin exists and user \"admin\" is taken; set \
                 KCLOUD_BOOTSTRAP_ADMIN_USER and KCLOUD_BOOTSTRAP_ADMIN_PASSWORD to create one"
            );
            return Ok(None);
        }
        let password = generate_password()?;
        Ok(self
            .create_admin(DEFAULT_ADMIN, &password, source)
            .await?
            .then_some(password))
    }

    /// Whether it created the user (`false`: another process just did).
    async fn create_admin(&self, name: &str, password: &str, source: &str) -> Result<bool> {
        let password_hash = self.hash_password(password).await?;
        let created = self
            .store
            .create_user(NewUser {
                name: name.to_owned(),
                password_hash,
                role: Role::Admin,
                quota: Quota::default(),
            })
            .await;
        match created {
            Ok(_) => {}
            Err(Error::Conflict(_)) => return Ok(false),
            Err(e) => return Err(e),
        }
        tracing::info!(user = %name, source, "created the bootstrap admin");
        self.store
            .audit(AuditEntry {
                at_ms: crate::now_ms(),
                actor: "system".into(),
                action: "bootstrap_admin".into(),
                target: name.to_owned(),
                detail: source.to_owned(),
                client: String::new(),
            })
            .await?;
        Ok(true)
    }

    /// Signs a new access/refresh pair and records the refresh token in `family`.
    async fn issue(&self, user: &User, family: String, now_ms: u64) -> Result<Session> {
        let iat = now_ms / 1000;
        let access_secs = self.config.access_ttl.as_secs().max(1);
        let refresh_secs = self.config.refresh_ttl.as_secs().max(1);
        let access = Claims {
            sub: user.name.clone(),
            role: user.role,
            typ: TokenType::Access,
            iat,
            exp: iat + access_secs,
            jti: uuid::Uuid::new_v4().to_string(),
            fam: None,
        };
        let refresh = Claims {
            typ: TokenType::Refresh,
            exp: iat + refresh_secs,
            jti: uuid::Uuid::new_v4().to_string(),
            fam: Some(family.clone()),
            ..access.clone()
        };
        self.store
            .insert_refresh(RefreshRow {
                id: refresh.jti.clone(),
                family,
                user: user.name.clone(),
                issued_at_ms: now_ms,
                expires_at_ms: refresh.exp.saturating_mul(1000),
            })
            .await?;
        Ok(Session {
            access_token: self.sign(&access)?,
            refresh_token: self.sign(&refresh)?,
            expires_in: access_secs,
            refresh_expires_in: refresh_secs,
            token_type: "Bearer",
            user: user.clone(),
        })
    }

    fn sign(&self, claims: &Claims) -> Result<String> {
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &self.key.encoding)
            .map_err(|_| Error::Internal("signing a token failed".into()))
    }

    /// Signature (HS256 only), shape and `typ`; `exp` (with 5 s leeway) unless
    /// `now_ms` is `None`.
    fn decode(&self, token: &str, want: TokenType, now_ms: Option<u64>) -> Result<Claims> {
        let invalid = || Error::Unauthorized(INVALID_TOKEN.into());
        if token.len() > MAX_TOKEN_BYTES {
            return Err(invalid());
        }
        let claims = jsonwebtoken::decode::<Claims>(token, &self.key.decoding, &self.validation)
            .map_err(|_| invalid())?
            .claims;
        if claims.typ != want || (want == TokenType::Refresh) != claims.fam.is_some() {
            return Err(invalid());
        }
        if let Some(now_ms) = now_ms
            && now_ms / 1000 > claims.exp.saturating_add(LEEWAY_SECS)
        {
            return Err(Error::Unauthorized("token expired".into()));
        }
        Ok(claims)
    }
}

fn read_password_file(path: &Path) -> Result<String> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        context: format!(
            "reading the bootstrap admin password file {}",
            path.display()
        ),
        source,
    })?;
    let text = text
        .strip_suffix('\n')
        .map(|t| t.strip_suffix('\r').unwrap_or(t))
        .unwrap_or(&text);
    Ok(text.to_owned())
}

/// 24 characters of [A-Za-z0-9] from the OS RNG (about 143 bits).
fn generate_password() -> Result<String> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::UserPatch;
    use std::net::{Ipv4Addr, Ipv6Addr};

    const ALICE_PW: &str = "correct horse battery";
    const LOCAL: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

    struct Fixture {
        _dir: tempfile::TempDir,
        auth: Auth,
        now: u64,
    }

    /// Cheap, but unlike both the production cost and `insecure_fast_for_tests`, so
    /// a dummy hash made at the wrong cost shows.
    fn test_hasher() -> Hasher {
        Hasher {
            params: Params::new(16, 2, 1, None).unwrap(),
        }
    }

    async fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("kcloud.db")).unwrap();
        let auth = Auth::with_hasher(
            store,
            SigningKey::from_bytes(&[42u8; 32]).unwrap(),
            AuthConfig::default(),
            test_hasher(),
        );
        for (name, role) in [("alice", Role::User), ("root", Role::Admin)] {
            let password_hash = auth.hash_password(ALICE_PW).await.unwrap();
            auth.store()
                .create_user(NewUser {
                    name: name.into(),
                    password_hash,
                    role,
                    quota: Quota::default(),
                })
                .await
                .unwrap();
        }
        Fixture {
            _dir: dir,
            auth,
            now: crate::now_ms(),
        }
    }

    fn unauthorized<T: fmt::Debug>(r: Result<T>) -> String {
        match r {
            Err(Error::Unauthorized(m)) => m,
            other => panic!("expected 401, got {other:?}"),
        }
    }

    fn b64(v: &serde_json::Value) -> String {
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap())
    }

    fn payload(token: &str) -> serde_json::Value {
        let part = token.split('.').nth(1).unwrap();
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).unwrap()).unwrap()
    }

    #[test]
    fn password_policy_and_hashing() {
        let h = Hasher::insecure_fast_for_tests();
        assert!(matches!(h.hash("short"), Err(Error::BadRequest(_))));
        assert!(matches!(
            h.hash(&"x".repeat(MAX_PASSWORD_BYTES + 1)),
            Err(Error::BadRequest(_))
        ));
        let phc = h.hash(ALICE_PW).unwrap();
        assert!(phc.starts_with("$argon2id$v=19$"), "{phc}");
        assert!(h.verify(ALICE_PW, &phc));
        assert!(!h.verify("correct horse battery!", &phc));
        assert!(!h.verify(ALICE_PW, "not a phc string"));
        // Salted: the same password hashes differently.
        assert_ne!(phc, h.hash(ALICE_PW).unwrap());
        // Verification takes the cost from the hash, so the production verifier
        // accepts it too.
        assert!(verify_password(ALICE_PW, &phc));
    }

    #[test]
    fn production_cost_is_argon2_default() {
        let phc = hash_password("twelve bytes!").unwrap();
        assert!(phc.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{phc}");
        assert!(verify_password("twelve bytes!", &phc));
        let err = hash_password("short").unwrap_err().to_string();
        assert!(!err.contains("short"), "{err}");
    }

    #[tokio::test]
    async fn login_issues_working_tokens() {
        let f = fixture().await;
        let s = f.auth.login("alice", ALICE_PW, LOCAL, f.now).await.unwrap();
        assert_eq!(s.token_type, "Bearer");
        assert_eq!(s.expires_in, 900);
        assert_eq!(s.user.name, "alice");
        let c = f.auth.verify_access_at(&s.access_token, f.now).unwrap();
        assert_eq!(c.sub, "alice");
        assert_eq!(c.role, Role::User);
        assert_eq!(c.typ, TokenType::Access);
        assert_eq!(c.exp, c.iat + 900);
        assert!(c.fam.is_none());
        // The wall-clock variant agrees.
        f.auth.verify_access(&s.access_token).unwrap();
        let debug = format!("{s:?}");
        assert!(!debug.contains(&s.access_token) && !debug.contains(&s.refresh_token));
        let json = serde_json::to_value(&s).unwrap();
        for k in ["access_token", "refresh_token", "expires_in", "user"] {
            assert!(json.get(k).is_some(), "{k}");
        }
        assert!(json["user"].get("password_hash").is_none());
    }

    #[tokio::test]
    async fn bad_credentials_look_alike_and_are_audited() {
        let f = fixture().await;
        let wrong = unauthorized(f.auth.login("alice", "wrong password!", LOCAL, f.now).await);
        let unknown = unauthorized(f.auth.login("mallory", ALICE_PW, LOCAL, f.now).await);
        let invalid = unauthorized(f.auth.login("Not A Name", ALICE_PW, LOCAL, f.now).await);
        f.auth
            .store()
            .update_user(
                "alice",
                UserPatch {
                    disabled: Some(true),
                    ..UserPatch::default()
                },
            )
            .await
            .unwrap();
        let disabled = unauthorized(f.auth.login("alice", ALICE_PW, LOCAL, f.now).await);
        for m in [&wrong, &unknown, &invalid, &disabled] {
            assert_eq!(m, BAD_CREDENTIALS);
        }
        f.auth.login("root", ALICE_PW, LOCAL, f.now).await.unwrap();

        let log = f.auth.store().audit_log(10).await.unwrap();
        let got: Vec<_> = log
            .iter()
            .rev()
            .map(|e| (e.action.as_str(), e.target.as_str(), e.detail.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("login_failed", "alice", "wrong password"),
                ("login_failed", "", "unknown user"),
                ("login_failed", "", "unknown user"),
                ("login_failed", "alice", "account disabled"),
                ("login", "root", ""),
            ]
        );
        assert!(log.iter().all(|e| e.client == "127.0.0.1"));
        // No password in any audit field.
        let text = format!("{log:?}");
        assert!(!text.contains(ALICE_PW) && !text.contains("wrong password!"));
    }

    #[tokio::test]
    async fn unknown_users_still_run_argon2() {
        let f = fixture().await;
        let p = &f.auth.passwords;
        let counts = || {
            (
                p.argon2_runs.load(Ordering::Relaxed),
                p.dummy_runs.load(Ordering::Relaxed),
            )
        };
        assert_eq!(counts(), (0, 0));
        let _ = f.auth.login("mallory", ALICE_PW, LOCAL, f.now).await;
        assert_eq!(counts(), (1, 1));
        let dummy = p.dummy.get().expect("dummy hash built").clone();
        // The dummy hash is a real argon2id hash at the service's cost.
        assert!(dummy.starts_with("$argon2id$v=19$m=16,t=2,p=1$"), "{dummy}");
        assert_eq!(
            PasswordHash::new(&dummy).unwrap().params.to_string(),
            PasswordHash::new(&p.hasher.hash(ALICE_PW).unwrap())
                .unwrap()
                .params
                .to_string()
        );
        let _ = f.auth.login("Bad Name", ALICE_PW, LOCAL, f.now).await;
        assert_eq!(counts(), (2, 2));
        let _ = f.auth.login("alice", "wrong password!", LOCAL, f.now).await;
        assert_eq!(counts(), (3, 2));
        f.auth.login("alice", ALICE_PW, LOCAL, f.now).await.unwrap();
        assert_eq!(counts(), (4, 2));
        // The dummy hash never lets anyone in, not even with the dummy's password.
        unauthorized(f.auth.login("mallory", DUMMY_PASSWORD, LOCAL, f.now).await);
    }

    #[tokio::test]
    async fn alg_none_is_rejected() {
        let f = fixture().await;
        let s = f.auth.login("root", ALICE_PW, LOCAL, f.now).await.unwrap();
        let claims = payload(&s.access_token);
        for header in [
            serde_json::json!({"alg": "none", "typ": "JWT"}),
            serde_json::json!({"alg": "None", "typ": "JWT"}),
            serde_json::json!({"alg": "NONE"}),
        ] {
            let forged = format!("{}.{}.", b64(&header), b64(&claims));
            assert_eq!(
                unauthorized(f.auth.verify_access_at(&forged, f.now)),
                INVALID_TOKEN
            );
            // Even with the real signature attached.
            let sig = s.access_token.rsplit('.').next().unwrap();
            let forged = format!("{}.{}.{sig}", b64(&header), b64(&claims));
            unauthorized(f.auth.verify_access_at(&forged, f.now));
        }
    }

    #[tokio::test]
    async fn other_keys_and_algorithms_are_rejected() {
        let f = fixture().await;
        let s = f.auth.login("alice", ALICE_PW, LOCAL, f.now).await.unwrap();
        let claims: Claims = serde_json::from_value(payload(&s.access_token)).unwrap();
        let other = EncodingKey::from_secret(&[7u8; 32]);
        let forged = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &other).unwrap();
        unauthorized(f.auth.verify_access_at(&forged, f.now));
        // Same secret, another HMAC algorithm: the algorithm is pinned.
        let same = EncodingKey::from_secret(&[42u8; 32]);
        for alg in [Algorithm::HS384, Algorithm::HS512] {
            let t = jsonwebtoken::encode(&Header::new(alg), &claims, &same).unwrap();
            unauthorized(f.auth.verify_access_at(&t, f.now));
        }
        // Control: the same claims signed properly are accepted.
        let t = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &same).unwrap();
        f.auth.verify_access_at(&t, f.now).unwrap();
        for junk in ["", "a.b.c", "not a token", &"x".repeat(MAX_TOKEN_BYTES + 1)] {
            unauthorized(f.auth.verify_access_at(junk, f.now));
        }
    }

    #[tokio::test]
    async fn tampered_payload_is_rejected() {
        let f = fixture().await;
        let s = f.auth.login("alice", ALICE_PW, LOCAL, f.now).await.unwrap();
        let mut parts = s.access_token.split('.');
        let (h, p, sig) = (
            parts.next().unwrap(),
            parts.next().unwrap(),
            parts.next().unwrap(),
        );
        let original: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(p).unwrap()).unwrap();
        for (k, v) in [
            ("role", serde_json::json!("admin")),
            ("sub", serde_json::json!("root")),
            (
                "exp",
                serde_json::json!(original["exp"].as_u64().unwrap() + 3600),
            ),
        ] {
            let mut claims = original.clone();
            claims[k] = v;
            let forged = format!("{h}.{}.{sig}", b64(&claims));
            unauthorized(f.auth.verify_access_at(&forged, f.now));
        }
        // Flipping one bit of the signature.
        let mut bad_sig = URL_SAFE_NO_PAD.decode(sig).unwrap();
        bad_sig[0] ^= 1;
        let forged = format!("{h}.{p}.{}", URL_SAFE_NO_PAD.encode(bad_sig));
        unauthorized(f.auth.verify_access_at(&forged, f.now));
    }

    #[tokio::test]
    async fn expiry_with_leeway() {
        let f = fixture().await;
        let s = f.auth.login("alice", ALICE_PW, LOCAL, f.now).await.unwrap();
        let exp_ms = payload(&s.access_token)["exp"].as_u64().unwrap() * 1000;
        f.auth
            .verify_access_at(&s.access_token, exp_ms + 4_000)
            .unwrap();
        assert_eq!(
            unauthorized(f.auth.verify_access_at(&s.access_token, exp_ms + 6_000)),
            "token expired"
        );
        // A token issued long ago is expired by the wall clock too.
        let old = f
            .auth
            .login(
                "root",
                ALICE_PW,
                "192.0.2.1".parse().unwrap(),
                f.now - 3_600_000,
            )
            .await
            .unwrap();
        assert_eq!(
            unauthorized(f.auth.verify_access(&old.access_token)),
            "token expired"
        );
        // An expired refresh token does not refresh.
        unauthorized(
            f.auth
                .refresh(&s.refresh_token, f.now + 8 * 86_400_000)
                .await,
        );
    }

    #[tokio::test]
    async fn token_types_cannot_stand_in_for_each_other() {
        let f = fixture().await;
        let s = f.auth.login("alice", ALICE_PW, LOCAL, f.now).await.unwrap();
        assert_eq!(
            unauthorized(f.auth.verify_access_at(&s.refresh_token, f.now)),
            INVALID_TOKEN
        );
        unauthorized(f.auth.refresh(&s.access_token, f.now).await);
        unauthorized(f.auth.logout(&s.access_token).await);
        // A hand-signed access token that claims a family is still not a refresh token.
        let mut c: Claims = serde_json::from_value(payload(&s.access_token)).unwrap();
        c.fam = Some("f".into());
        let t = f.auth.sign(&c).unwrap();
        unauthorized(f.auth.verify_access_at(&t, f.now));
        unauthorized(f.auth.refresh(&t, f.now).await);
        // The session still works after these attempts.
        f.auth.refresh(&s.refresh_token, f.now).await.unwrap();
    }

    #[tokio::test]
    async fn refresh_rotates_and_reuse_revokes_the_family() {
        let f = fixture().await;
        let s0 = f.auth.login("alice", ALICE_PW, LOCAL, f.now).await.unwrap();
        let s1 = f
            .auth
            .refresh(&s0.refresh_token, f.now + 1_000)
            .await
            .unwrap();
        let s2 = f
            .auth
            .refresh(&s1.refresh_token, f.now + 2_000)
            .await
            .unwrap();
        let fam = |t: &str| payload(t)["fam"].as_str().unwrap().to_owned();
        assert_eq!(fam(&s0.refresh_token), fam(&s2.refresh_token));
        assert_ne!(s1.refresh_token, s2.refresh_token);
        f.auth.verify_access_at(&s2.access_token, f.now).unwrap();

        // A second, unrelated session of the same user.
        let other = f.auth.login("alice", ALICE_PW, LOCAL, f.now).await.unwrap();

        // Replaying a consumed token: refused, and the newest token of that family
        // stops working too.
        assert_eq!(
            unauthorized(f.auth.refresh(&s0.refresh_token, f.now + 3_000).await),
            SESSION_ENDED
        );
        unauthorized(f.auth.refresh(&s2.refresh_token, f.now + 4_000).await);
        let log = f.auth.store().audit_log(1).await.unwrap();
        assert_eq!(log[0].action, "refresh_reused");
        assert_eq!(log[0].target, "alice");
        // The other family is untouched.
        f.auth
            .refresh(&other.refresh_token, f.now + 5_000)
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn logout_revokes_the_family_and_is_idempotent() {
        let f = fixture().await;
        let s0 = f.auth.login("alice", ALICE_PW, LOCAL, f.now).await.unwrap();
        let s1 = f.auth.refresh(&s0.refresh_token, f.now).await.unwrap();
        f.auth.logout(&s0.refresh_token).await.unwrap();
        f.auth.logout(&s1.refresh_token).await.unwrap();
        unauthorized(f.auth.refresh(&s1.refresh_token, f.now).await);
        // Garbage is not a logout.
        unauthorized(f.auth.logout("nonsense").await);
    }

    #[tokio::test]
    async fn disabled_or_deleted_users_cannot_refresh() {
        let f = fixture().await;
        let s = f.auth.login("alice", ALICE_PW, LOCAL, f.now).await.unwrap();
        f.auth
            .store()
            .update_user(
                "alice",
                UserPatch {
                    disabled: Some(true),
                    ..UserPatch::default()
                },
            )
            .await
            .unwrap();
        unauthorized(f.auth.refresh(&s.refresh_token, f.now).await);

        let s = f.auth.login("root", ALICE_PW, LOCAL, f.now).await.unwrap();
        // A second admin so that root may be deleted.
        f.auth
            .store()
            .update_user(
                "alice",
                UserPatch {
                    disabled: Some(false),
                    role: Some(Role::Admin),
                    ..UserPatch::default()
                },
            )
            .await
            .unwrap();
        assert!(f.auth.store().delete_user("root").await.unwrap());
        unauthorized(f.auth.refresh(&s.refresh_token, f.now).await);
    }

    #[tokio::test]
    async fn refresh_picks_up_role_changes() {
        let f = fixture().await;
        let s = f.auth.login("alice", ALICE_PW, LOCAL, f.now).await.unwrap();
        f.auth
            .store()
            .update_user(
                "alice",
                UserPatch {
                    role: Some(Role::Admin),
                    ..UserPatch::default()
                },
            )
            .await
            .unwrap();
        let s = f.auth.refresh(&s.refresh_token, f.now).await.unwrap();
        let c = f.auth.verify_access_at(&s.access_token, f.now).unwrap();
        assert_eq!(c.role, Role::Admin);
    }

    #[test]
    fn rate_limiter_buckets() {
        let rl = RateLimiter::new(5, Duration::from_secs(30), 100);
        let t0 = 1_000_000;
        for _ in 0..5 {
            rl.check("alice", t0).unwrap();
        }
        match rl.check("alice", t0) {
            Err(Error::RateLimited { retry_after_secs }) => assert_eq!(retry_after_secs, 30),
            other => panic!("{other:?}"),
        }
        // Other keys are independent.
        rl.check("bob", t0).unwrap();
        // 10 s later: 20 s to go.
        match rl.check("alice", t0 + 10_000) {
            Err(Error::RateLimited { retry_after_secs }) => assert_eq!(retry_after_secs, 20),
            other => panic!("{other:?}"),
        }
        // One token back after 30 s, and only one.
        rl.check("alice", t0 + 30_000).unwrap();
        assert!(rl.check("alice", t0 + 30_000).is_err());
        // Fully refilled after 5 × 30 s.
        let later = t0 + 30_000 + 150_000;
        for _ in 0..5 {
            rl.check("alice", later).unwrap();
        }
        assert!(rl.check("alice", later).is_err());
    }

    #[test]
    fn rate_limiter_survives_a_clock_step_back() {
        let rl = RateLimiter::new(5, Duration::from_secs(30), 100);
        let t0 = 10_000_000;
        rl.check("alice", t0).unwrap();
        // The clock jumps back an hour: at worst one refill interval to wait.
        match rl.check("alice", t0 - 3_600_000) {
            Err(Error::RateLimited { retry_after_secs }) => assert!(retry_after_secs <= 30),
            other => panic!("{other:?}"),
        }
        rl.check("alice", t0 - 3_600_000 + 30_000).unwrap();
    }

    #[test]
    fn rate_limiter_memory_is_bounded() {
        let rl = RateLimiter::new(2, Duration::from_secs(1), 3);
        let t0 = 1_000_000;
        for k in ["a", "b", "c"] {
            rl.check(k, t0).unwrap();
        }
        rl.check("a", t0).unwrap();
        assert_eq!(rl.len(), 3);
        // Full and busy: the fullest bucket ("b" or "c", not the drained "a") goes.
        rl.check("d", t0).unwrap();
        assert_eq!(rl.len(), 3);
        assert!(rl.check("a", t0).is_err(), "drained key must be kept");
        // Later, idle keys are swept instead.
        for i in 0..50 {
            rl.check(&format!("k{i}"), t0 + 10_000 + i).unwrap();
            assert!(rl.len() <= 3);
        }
        // The periodic sweep drops keys whose buckets refilled.
        rl.check("z", t0 + 120_000).unwrap();
        assert_eq!(rl.len(), 1);
    }

    #[test]
    fn rate_limiter_is_thread_safe() {
        let rl = Arc::new(RateLimiter::new(100, Duration::from_secs(3600), 10));
        let ok = AtomicU64::new(0);
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    for _ in 0..50 {
                        if rl.check("k", 5_000).is_ok() {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        assert_eq!(ok.load(Ordering::Relaxed), 100);
    }

    #[test]
    fn client_keys() {
        assert_eq!(client_key(LOCAL), "127.0.0.1");
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::2".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(client_key(a), client_key(b));
        assert_ne!(client_key(a), client_key(c));
        let mapped = IpAddr::V6(Ipv4Addr::new(10, 0, 0, 1).to_ipv6_mapped());
        assert_eq!(client_key(mapped), "10.0.0.1");
        assert_eq!(client_key(IpAddr::V6(Ipv6Addr::LOCALHOST)), "0:0:0:0::/64");
    }

    #[tokio::test]
    async fn login_is_rate_limited_per_user_and_per_client() {
        let f = fixture().await;
        let t = f.now;
        for _ in 0..LOGIN_PER_USER_BURST {
            unauthorized(f.auth.login("alice", "wrong password!", LOCAL, t).await);
        }
        // Even the right password is refused now, before argon2 runs.
        let before = f.auth.passwords.argon2_runs.load(Ordering::Relaxed);
        match f.auth.login("alice", ALICE_PW, LOCAL, t).await {
            Err(Error::RateLimited { retry_after_secs }) => assert_eq!(retry_after_secs, 30),
            other => panic!("{other:?}"),
        }
        assert_eq!(f.auth.passwords.argon2_runs.load(Ordering::Relaxed), before);
        // Other users are unaffected, and alice may try again 30 s later.
        f.auth.login("root", ALICE_PW, LOCAL, t).await.unwrap();
        f.auth
            .login("alice", ALICE_PW, LOCAL, t + 30_000)
            .await
            .unwrap();

        // One client spraying names hits the per-client limit (30 in total).
        let client: IpAddr = "192.0.2.7".parse().unwrap();
        let mut limited = None;
        for i in 0..40 {
            match f.auth.login(&format!("u{i}"), ALICE_PW, client, t).await {
                Err(Error::Unauthorized(_)) => {}
                Err(Error::RateLimited { .. }) => {
                    limited = Some(i);
                    break;
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(limited, Some(LOGIN_PER_CLIENT_BURST));
        // Another client still gets in.
        f.auth
            .login("root", ALICE_PW, "192.0.2.8".parse().unwrap(), t + 30_000)
            .await
            .unwrap();
    }

    #[test]
    fn signing_key_is_generated_private_and_stable() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let k1 = SigningKey::load_or_create(None, &data).unwrap();
        let path = data.join("signing.key");
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len(), 32);
        assert_ne!(bytes, [0u8; 32]);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{mode:o}");
        }
        assert_eq!(format!("{k1:?}"), "SigningKey(<redacted>)");
        // A restart reads the same key: a token signed before verifies after.
        let k2 = SigningKey::load_or_create(None, &data).unwrap();
        let claims = Claims {
            sub: "alice".into(),
            role: Role::User,
            typ: TokenType::Access,
            iat: 1,
            exp: u64::MAX / 2,
            jti: "j".into(),
            fam: None,
        };
        let t =
            jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &k1.encoding).unwrap();
        let v = Validation::new(Algorithm::HS256);
        jsonwebtoken::decode::<Claims>(&t, &k2.decoding, &v).unwrap();
        // A fresh data dir gets a different key.
        let k3 = SigningKey::load_or_create(None, &dir.path().join("other")).unwrap();
        assert!(jsonwebtoken::decode::<Claims>(&t, &k3.decoding, &v).is_err());
        // No temp files are left behind.
        let names: Vec<_> = std::fs::read_dir(&data)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["signing.key"]);
    }

    #[test]
    fn explicit_signing_key_file() {
        let dir = tempfile::tempdir().unwrap();
        let short = dir.path().join("short.key");
        std::fs::write(&short, [1u8; 31]).unwrap();
        let err = SigningKey::load_or_create(Some(&short), dir.path()).unwrap_err();
        assert!(matches!(err, Error::Config(_)), "{err:?}");
        assert!(err.to_string().contains("short.key"), "{err}");
        let good = dir.path().join("good.key");
        std::fs::write(&good, [1u8; 48]).unwrap();
        SigningKey::load_or_create(Some(&good), dir.path()).unwrap();
        // The explicit file is used as is: nothing is generated in the data dir.
        assert!(!dir.path().join("signing.key").exists());
        let missing = dir.path().join("missing.key");
        let err = SigningKey::load_or_create(Some(&missing), dir.path()).unwrap_err();
        assert!(matches!(err, Error::Io { .. }), "{err:?}");
    }

    #[test]
    fn shared_secrets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.token");
        let a = load_or_create_secret(None, &path).unwrap();
        assert_eq!(a.len(), 43);
        assert_eq!(load_or_create_secret(None, &path).unwrap(), a);
        let explicit = dir.path().join("given");
        std::fs::write(&explicit, "  0123456789abcdef-long-enough\n").unwrap();
        assert_eq!(
            load_or_create_secret(Some(&explicit), &path).unwrap(),
            "0123456789abcdef-long-enough"
        );
        std::fs::write(&explicit, "short\n").unwrap();
        assert!(matches!(
            load_or_create_secret(Some(&explicit), &path),
            Err(Error::Config(_))
        ));
        std::fs::write(&explicit, "has a space inside it\n").unwrap();
        assert!(matches!(
            load_or_create_secret(Some(&explicit), &path),
            Err(Error::Config(_))
        ));
        assert_ne!(random_token(), random_token());
        let p = generate_password().unwrap();
        assert_eq!(p.len(), GENERATED_PASSWORD_LEN);
        assert!(p.bytes().all(|b| b.is_ascii_alphanumeric()));
        assert_ne!(p, generate_password().unwrap());
    }

    async fn bare_auth() -> (tempfile::TempDir, Auth) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("kcloud.db")).unwrap();
        let auth = Auth::with_hasher(
            store,
            SigningKey::generate().unwrap(),
            AuthConfig::default(),
            Hasher::insecure_fast_for_tests(),
        );
        (dir, auth)
    }

    #[tokio::test]
    async fn bootstrap_with_password_from_env() {
        let (_dir, auth) = bare_auth().await;
        let got = auth
            .bootstrap_admin(Some("boss".into()), Some(ALICE_PW.into()), None)
            .await
            .unwrap();
        assert_eq!(got, None);
        let s = auth
            .login("boss", ALICE_PW, LOCAL, crate::now_ms())
            .await
            .unwrap();
        assert_eq!(s.user.role, Role::Admin);
        // A second start with another password changes nothing.
        let got = auth
            .bootstrap_admin(Some("boss".into()), Some("another password".into()), None)
            .await
            .unwrap();
        assert_eq!(got, None);
        auth.login("boss", ALICE_PW, LOCAL, crate::now_ms())
            .await
            .unwrap();
        unauthorized(
            auth.login("boss", "another password", LOCAL, crate::now_ms())
                .await,
        );
        assert_eq!(auth.store().users().await.unwrap().len(), 1);
        let log = auth.store().audit_log(10).await.unwrap();
        assert!(
            log.iter()
                .any(|e| e.action == "bootstrap_admin" && e.target == "boss")
        );
    }

    #[tokio::test]
    async fn bootstrap_with_password_file() {
        let (dir, auth) = bare_auth().await;
        let file = dir.path().join("pw");
        std::fs::write(&file, format!("{ALICE_PW}\n")).unwrap();
        assert_eq!(
            auth.bootstrap_admin(None, None, Some(file.clone()))
                .await
                .unwrap(),
            None
        );
        // One trailing newline is dropped, nothing else.
        auth.login("admin", ALICE_PW, LOCAL, crate::now_ms())
            .await
            .unwrap();

        let (dir, auth) = bare_auth().await;
        let file = dir.path().join("pw");
        std::fs::write(&file, format!(" {ALICE_PW}\r\n")).unwrap();
        auth.bootstrap_admin(None, None, Some(file)).await.unwrap();
        auth.login("admin", &format!(" {ALICE_PW}"), LOCAL, crate::now_ms())
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn bootstrap_generates_once() {
        let (_dir, auth) = bare_auth().await;
        let pw = auth
            .bootstrap_admin(None, None, None)
            .await
            .unwrap()
            .expect("a generated password");
        assert_eq!(pw.len(), 24);
        let s = auth
            .login("admin", &pw, LOCAL, crate::now_ms())
            .await
            .unwrap();
        assert_eq!(s.user.role, Role::Admin);
        // Second start: nothing generated, nothing changed.
        assert_eq!(auth.bootstrap_admin(None, None, None).await.unwrap(), None);
        auth.login("admin", &pw, LOCAL, crate::now_ms())
            .await
            .unwrap();
        // A user name without a password does not create that user.
        assert_eq!(
            auth.bootstrap_admin(Some("other".into()), None, None)
                .await
                .unwrap(),
            None
        );
        assert!(auth.store().user("other").await.unwrap().is_none());
    }

    #[tokio::test]
    async fn bootstrap_never_touches_existing_users() {
        let (_dir, auth) = bare_auth().await;
        // "admin" exists as a plain user; no admin exists at all.
        let password_hash = auth.hash_password(ALICE_PW).await.unwrap();
        auth.store()
            .create_user(NewUser {
                name: "admin".into(),
                password_hash,
                role: Role::User,
                quota: Quota::default(),
            })
            .await
            .unwrap();
        assert_eq!(auth.bootstrap_admin(None, None, None).await.unwrap(), None);
        assert_eq!(
            auth.bootstrap_admin(None, Some("a different password".into()), None)
                .await
                .unwrap(),
            None
        );
        let admin = auth.store().user("admin").await.unwrap().unwrap();
        assert_eq!(admin.user.role, Role::User);
        auth.login("admin", ALICE_PW, LOCAL, crate::now_ms())
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn bootstrap_config_errors() {
        let (dir, auth) = bare_auth().await;
        let file = dir.path().join("pw");
        std::fs::write(&file, ALICE_PW).unwrap();
        for (user, pw, file) in [
            (None, Some(ALICE_PW.to_owned()), Some(file.clone())),
            (None, Some("short".to_owned()), None),
            (Some("Bad_Name".to_owned()), Some(ALICE_PW.to_owned()), None),
        ] {
            let err = auth.bootstrap_admin(user, pw, file).await.unwrap_err();
            assert!(matches!(err, Error::Config(_)), "{err:?}");
            assert!(!err.to_string().contains(ALICE_PW), "{err}");
        }
        let err = auth
            .bootstrap_admin(None, None, Some(dir.path().join("missing")))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Io { .. }), "{err:?}");
        assert!(auth.store().users().await.unwrap().is_empty());
    }
}
