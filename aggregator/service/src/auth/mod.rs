//! Sign-in: passwords (argon2id), the JWT signing key, login rate limits, and the
//! login / refresh / logout flows; and who a token stands for.
//!
//! Nothing secret (passwords, tokens, hashes, keys) is ever logged or put in an error.

mod keys;
mod limiter;
mod oidc;
mod passwords;
#[cfg(test)]
mod tests;
mod tokens;

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use jsonwebtoken::{Algorithm, Header, Validation};
use serde::{Deserialize, Serialize};

use kcloud_core::caller::Caller;
use kcloud_core::private::random_token;
use kcloud_core::repo::Repository;
use kcloud_core::user::{AuditEntry, NewUser, Quota, RefreshRow, RefreshUse, Role, User};
use kcloud_core::validate::validate_user_name;
use kcloud_core::{Error, Result, now_ms};

pub use keys::{MIN_SIGNING_KEY_BYTES, SigningKey};
pub use limiter::{RateLimiter, client_key};
pub use oidc::{Identity, Oidc, user_name_from};
pub use passwords::{
    Hasher, MAX_PASSWORD_BYTES, MAX_PASSWORD_CHARS, MIN_PASSWORD_CHARS, hash_password,
    validate_password, verify_password,
};
use passwords::{Passwords, generate_password};
pub use tokens::{MAX_TOKENS_PER_USER, NewToken};

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
/// How long a code that opens a server on its owner's origin may wait to be used.
pub const OPEN_CODE_TTL: Duration = Duration::from_secs(60);
/// Unused codes kept at most (they expire within a minute).
const MAX_OPEN_CODES: usize = 10_000;
/// Every user name that fails validation shares one per-user bucket: such names cannot
/// exist, and spraying them must not grow the limiter.
const INVALID_NAME_KEY: &str = "\0invalid";

/// What a token is for; one cannot stand in for the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenType {
    Access,
    Refresh,
    /// The cookie of one server on its owner's origin: proxying to that server only.
    Proxy,
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
    /// The sign-in session (refresh-token family) the token belongs to: revoking it
    /// ends every token of the session at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fam: Option<String>,
    /// Proxy tokens: the server's owner and name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub own: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub srv: Option<String>,
}

/// Token lifetimes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthConfig {
    pub access_ttl: Duration,
    pub refresh_ttl: Duration,
    /// Who may sign in with a password (single sign-on can turn it off).
    pub local_accounts: kcloud_core::settings::LocalAccounts,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            access_ttl: Duration::from_secs(15 * 60),
            refresh_ttl: Duration::from_secs(7 * 24 * 60 * 60),
            local_accounts: Default::default(),
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
    repo: Arc<dyn Repository>,
    key: SigningKey,
    config: AuthConfig,
    validation: Validation,
    passwords: Arc<Passwords>,
    per_user: RateLimiter,
    per_client: RateLimiter,
    /// Unused codes that open a server on its owner's origin.
    codes: Mutex<HashMap<String, OpenCode>>,
}

/// What a code opens, for whom.
struct OpenCode {
    user: String,
    role: Role,
    session: String,
    owner: String,
    server: String,
    expires_ms: u64,
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Auth")
            .field("access_ttl", &self.config.access_ttl)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Auth {
    /// With production password hashing.
    pub fn new(repo: Arc<dyn Repository>, key: SigningKey, config: AuthConfig) -> Self {
        Self::with_hasher(repo, key, config, Hasher::default())
    }

    /// With a chosen hashing cost (`Hasher::insecure_fast_for_tests` in tests).
    pub fn with_hasher(
        repo: Arc<dyn Repository>,
        key: SigningKey,
        config: AuthConfig,
        hasher: Hasher,
    ) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.algorithms = vec![Algorithm::HS256];
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.leeway = LEEWAY_SECS;
        // `exp` is checked in `decode` against the caller's clock (tests drive time).
        validation.validate_exp = false;
        Auth {
            repo,
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
            codes: Mutex::default(),
        }
    }

    /// The storage behind users, sessions and the audit log.
    pub fn repo(&self) -> &dyn Repository {
        self.repo.as_ref()
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
            self.repo.user(username).await?
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
            Some(r) => {
                use kcloud_core::settings::LocalAccounts;
                // Told apart only after a correct password: the answer says nothing
                // about accounts to someone guessing.
                let refused = match self.config.local_accounts {
                    LocalAccounts::All => false,
                    LocalAccounts::Admins => r.user.role != Role::Admin,
                    LocalAccounts::Off => true,
                };
                if refused {
                    return Err(Error::Forbidden(
                        "password sign-in is off here: use single sign-on".into(),
                    ));
                }
                None
            }
        };
        if let Some(reason) = failure {
            // The attempted name is recorded only when it is a real user: people type
            // passwords into the name field.
            let target = record.map(|r| r.user.name).unwrap_or_default();
            tracing::info!(user = %target, %client, reason, "login failed");
            self.repo
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
        self.repo
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
        match self.repo.consume_refresh(&claims.jti, now_ms).await? {
            RefreshUse::Invalid => Err(ended()),
            RefreshUse::Reused { family } => {
                self.repo.revoke_family(&family).await?;
                tracing::warn!(user = %claims.sub, "refresh token presented again; its session family is revoked");
                self.repo
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
                    self.repo.revoke_family(&family).await?;
                    return Err(ended());
                }
                let Some(record) = self.repo.user(&user).await?.filter(|r| !r.user.disabled) else {
                    self.repo.revoke_family(&family).await?;
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
        self.repo.revoke_family(&fam).await?;
        self.repo
            .audit(AuditEntry {
                at_ms: now_ms(),
                actor: claims.sub.clone(),
                action: "logout".into(),
                target: claims.sub,
                detail: String::new(),
                client: String::new(),
            })
            .await
    }

    /// Checks an access token's signature, type and expiry against the wall clock. Its
    /// session is checked by [`Auth::caller`], which every request uses.
    pub fn verify_access(&self, token: &str) -> Result<Claims> {
        self.verify_access_at(token, now_ms())
    }

    /// `verify_access` at a given time.
    pub fn verify_access_at(&self, token: &str, now_ms: u64) -> Result<Claims> {
        self.decode(token, TokenType::Access, Some(now_ms))
    }

    /// The user an access token stands for, if they still exist, are enabled and the
    /// token's session is not revoked: logout, disabling, a new password or role take
    /// effect at once, not at token expiry.
    /// A personal API token (`kct_...`) stands for its user, limited to its scopes.
    pub async fn caller(&self, token: &str) -> Result<Caller> {
        if token.starts_with(kcloud_core::token::TOKEN_PREFIX) {
            return self.token_caller(token).await;
        }
        let claims = self.verify_access(token)?;
        self.session_caller(claims).await
    }

    async fn session_caller(&self, claims: Claims) -> Result<Caller> {
        let family = claims.fam.unwrap_or_default();
        if let Some(grant) = self.family_grant(&family).await {
            // A proxy cookie made from a personal token: good while the token is, for
            // the user the token is (the cookie's subject must agree).
            return grant.and_then(|c| {
                if c.name == claims.sub {
                    Ok(c)
                } else {
                    Err(Error::Unauthorized(INVALID_TOKEN.into()))
                }
            });
        }
        let user = self
            .repo
            .session_user(&claims.sub, &family)
            .await?
            .filter(|u| !u.user.disabled)
            .ok_or_else(|| Error::Unauthorized(SESSION_ENDED.into()))?;
        Ok(Caller {
            name: user.user.name,
            role: user.user.role,
            session: Some(family),
            grant: None,
        })
    }

    /// A one-time code (single use, valid [`OPEN_CODE_TTL`]) that lets `caller`'s
    /// browser sign in to `owner/server` on the owner's origin.
    pub fn open_code(&self, caller: &Caller, owner: &str, server: &str) -> Result<String> {
        let session = caller
            .session
            .clone()
            .ok_or_else(|| Error::Forbidden("only a signed-in session can open a server".into()))?;
        let code = random_token();
        let now = now_ms();
        let mut codes = self.codes.lock().unwrap_or_else(PoisonError::into_inner);
        codes.retain(|_, c| c.expires_ms > now);
        if codes.len() >= MAX_OPEN_CODES {
            return Err(Error::RateLimited {
                retry_after_secs: OPEN_CODE_TTL.as_secs(),
            });
        }
        codes.insert(
            code.clone(),
            OpenCode {
                user: caller.name.clone(),
                role: caller.role,
                session,
                owner: owner.to_owned(),
                server: server.to_owned(),
                expires_ms: now + OPEN_CODE_TTL.as_millis() as u64,
            },
        );
        Ok(code)
    }

    /// Redeems a code on `owner`'s origin: the server it opens and the cookie value
    /// for it. A code is good once, before it expires, on its owner's origin only.
    pub fn redeem(&self, code: &str, owner: &str) -> Result<(String, String)> {
        let refused = || {
            Error::Unauthorized(
                "this link has been used or has expired; open the server again".into(),
            )
        };
        let c = self
            .codes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(code)
            .ok_or_else(refused)?;
        if c.expires_ms <= now_ms() || c.owner != owner {
            return Err(refused());
        }
        let iat = now_ms() / 1000;
        let token = self.sign(&Claims {
            sub: c.user,
            role: c.role,
            typ: TokenType::Proxy,
            iat,
            exp: iat + self.config.refresh_ttl.as_secs().max(1),
            jti: uuid::Uuid::new_v4().to_string(),
            fam: Some(c.session),
            own: Some(c.owner),
            srv: Some(c.server.clone()),
        })?;
        Ok((c.server, token))
    }

    /// Who a server cookie stands for, on `owner/server` only, while its session lasts.
    pub async fn proxy_caller(&self, token: &str, owner: &str, server: &str) -> Result<Caller> {
        let claims = self.decode(token, TokenType::Proxy, Some(now_ms()))?;
        if claims.own.as_deref() != Some(owner) || claims.srv.as_deref() != Some(server) {
            return Err(Error::Unauthorized(INVALID_TOKEN.into()));
        }
        self.session_caller(claims).await
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
            if self.repo.user(&name).await?.is_some() {
                tracing::info!(user = %name, "bootstrap admin exists; left unchanged");
                return Ok(None);
            }
            validate_password(&password).map_err(|_| {
                Error::Config(format!(
                    "the bootstrap admin password must be {MIN_PASSWORD_CHARS} to \
                     {MAX_PASSWORD_CHARS} characters long"
                ))
            })?;
            self.create_admin(&name, &password, source).await?;
            return Ok(None);
        }

        if self.repo.admin_count().await? > 0 {
            if user.is_some() && self.repo.user(&name).await?.is_none() {
                tracing::warn!(user = %name, "KCLOUD_BOOTSTRAP_ADMIN_USER is set without a password; not created");
            }
            return Ok(None);
        }
        if self.repo.user(DEFAULT_ADMIN).await?.is_some() {
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
            .repo
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
        self.repo
            .audit(AuditEntry {
                at_ms: now_ms(),
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
            fam: Some(family.clone()),
            own: None,
            srv: None,
        };
        let refresh = Claims {
            typ: TokenType::Refresh,
            exp: iat + refresh_secs,
            jti: uuid::Uuid::new_v4().to_string(),
            ..access.clone()
        };
        self.repo
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
        let scoped = claims.own.is_some() && claims.srv.is_some();
        let unscoped = claims.own.is_none() && claims.srv.is_none();
        let shape = match want {
            TokenType::Proxy => scoped,
            TokenType::Access | TokenType::Refresh => unscoped,
        };
        if claims.typ != want || claims.fam.is_none() || !shape {
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
