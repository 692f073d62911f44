//! Personal API tokens (see `kcloud_core::token` for the shape and the scopes):
//! created by their owner's session, shown once, stored as a hash, checked on every
//! request (so a revocation takes effect at once), and turned into a cookie for the
//! proxy when a Jupyter client passes one as `?token=`.

use std::net::IpAddr;
use std::time::Duration;

use blake2::{Blake2s256, Digest};

use kcloud_core::caller::Caller;
use kcloud_core::private::{constant_time_eq, random_hex, random_token};
use kcloud_core::token::{
    ApiTokenRecord, ApiTokenView, Scope, TOKEN_PREFIX, TokenGrant, split_token,
};
use kcloud_core::user::AuditEntry;
use kcloud_core::validate::validate_user_name;
use kcloud_core::{Error, Result, now_ms};

use super::{Auth, INVALID_TOKEN, TokenType};
use crate::auth::Claims;

/// Live tokens a user may have.
pub const MAX_TOKENS_PER_USER: u32 = 20;
/// Lifetime when none is asked for, and the longest allowed.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(90 * 86_400);
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(366 * 86_400);
/// "Last used" is written at most this often per token.
const TOUCH_EVERY_MS: u64 = 60_000;
/// A proxy cookie made from a personal token names it in its family as `pat:<id>`.
const GRANT_FAMILY: &str = "pat:";

/// A token just created: the record as listed, and the secret, shown this once.
pub struct NewToken {
    pub view: ApiTokenView,
    pub token: String,
}

fn digest(secret: &str) -> Vec<u8> {
    Blake2s256::digest(secret.as_bytes()).to_vec()
}

impl Auth {
    /// Creates a token for `user`: only by that user, from a signed-in session.
    pub async fn create_token(
        &self,
        caller: &Caller,
        client: IpAddr,
        user: &str,
        name: &str,
        scopes: &[Scope],
        expires_in: Option<&str>,
    ) -> Result<NewToken> {
        caller.may_see_user(user)?;
        if caller.name != user {
            return Err(Error::Forbidden(
                "tokens are created by their owner only".into(),
            ));
        }
        if caller.grant.is_some() {
            return Err(Error::Forbidden(
                "a personal API token cannot create tokens: sign in".into(),
            ));
        }
        let name = name.trim();
        if name.is_empty() || name.chars().count() > 64 || name.chars().any(char::is_control) {
            return Err(Error::BadRequest(
                "name: 1 to 64 characters, no control characters".into(),
            ));
        }
        let mut scopes = scopes.to_vec();
        scopes.sort();
        scopes.dedup();
        if scopes.is_empty() {
            return Err(Error::BadRequest(
                "scopes: at least one of read, servers, proxy".into(),
            ));
        }
        let ttl = match expires_in {
            None => DEFAULT_TOKEN_TTL,
            Some(s) => kcloud_common::duration::parse_duration(s)
                .map_err(|e| Error::BadRequest(format!("expires_in: {e}")))?,
        };
        if ttl < Duration::from_secs(60) || ttl > MAX_TOKEN_TTL {
            return Err(Error::BadRequest(
                "expires_in: from 1m to 366d (default 90d)".into(),
            ));
        }
        let id = random_hex();
        let secret = random_token();
        let now = now_ms();
        let record = ApiTokenRecord {
            id: id.clone(),
            user: user.to_owned(),
            name: name.to_owned(),
            scopes,
            hash: digest(&secret),
            created_at_ms: now,
            expires_at_ms: now.saturating_add(ttl.as_millis() as u64),
            last_used_ms: None,
        };
        let view = ApiTokenView::from(&record);
        self.repo.insert_token(record, MAX_TOKENS_PER_USER).await?;
        self.audit_token(caller, client, "token_create", &view)
            .await?;
        Ok(NewToken {
            token: format!("{TOKEN_PREFIX}{id}_{secret}"),
            view,
        })
    }

    /// A user's tokens (their own, or any user's for an admin), or with `None` every
    /// user's (admins). Never the secrets.
    pub async fn list_tokens(
        &self,
        caller: &Caller,
        user: Option<&str>,
    ) -> Result<Vec<ApiTokenView>> {
        match user {
            Some(u) => {
                validate_user_name(u)?;
                caller.may_see_user(u)?;
            }
            None => caller.require_admin()?,
        }
        Ok(self
            .repo
            .tokens(user.map(str::to_owned))
            .await?
            .iter()
            .map(ApiTokenView::from)
            .collect())
    }

    /// Revokes `user`'s token `id` (its owner or an admin): it stops working at once,
    /// cookies made from it included.
    pub async fn revoke_token(
        &self,
        caller: &Caller,
        client: IpAddr,
        user: &str,
        id: &str,
    ) -> Result<()> {
        validate_user_name(user)?;
        caller.may_see_user(user)?;
        let not_found = || Error::NotFound(format!("no token {id:?}"));
        let record = self
            .repo
            .token(id)
            .await?
            .filter(|t| t.user == user)
            .ok_or_else(not_found)?;
        if !self.repo.delete_token(id).await? {
            return Err(not_found());
        }
        self.audit_token(caller, client, "token_revoke", &ApiTokenView::from(&record))
            .await
    }

    /// Who a personal token stands for, if it is well formed, its secret matches, it
    /// has not expired or been revoked, and its user exists and is enabled.
    pub(super) async fn token_caller(&self, token: &str) -> Result<Caller> {
        let invalid = || Error::Unauthorized(INVALID_TOKEN.into());
        let (id, secret) = split_token(token).ok_or_else(invalid)?;
        let record = self.repo.token(id).await?.ok_or_else(invalid)?;
        if !constant_time_eq(&digest(secret), &record.hash) {
            return Err(invalid());
        }
        self.grant_caller(record).await
    }

    async fn grant_caller(&self, record: ApiTokenRecord) -> Result<Caller> {
        let now = now_ms();
        if record.expires_at_ms <= now {
            return Err(Error::Unauthorized("token expired".into()));
        }
        let user = self
            .repo
            .user(&record.user)
            .await?
            .filter(|u| !u.user.disabled)
            .ok_or_else(|| Error::Unauthorized(INVALID_TOKEN.into()))?;
        if record
            .last_used_ms
            .is_none_or(|t| now.saturating_sub(t) >= TOUCH_EVERY_MS)
            && let Err(e) = self.repo.touch_token(&record.id, now).await
        {
            tracing::warn!(error = %e, "could not record a token's use");
        }
        Ok(Caller {
            name: user.user.name,
            role: user.user.role,
            session: None,
            grant: Some(TokenGrant {
                id: record.id,
                scopes: record.scopes,
            }),
        })
    }

    /// A proxy cookie for `owner/server` made from a personal token with the proxy
    /// scope (`?token=` on a server's URL): good while the token is.
    pub fn grant_cookie(&self, caller: &Caller, owner: &str, server: &str) -> Result<String> {
        let grant = caller
            .grant
            .as_ref()
            .filter(|g| g.has(Scope::Proxy))
            .ok_or_else(|| Error::Forbidden("this token lacks the proxy scope".into()))?;
        let iat = now_ms() / 1000;
        self.sign(&Claims {
            sub: caller.name.clone(),
            role: caller.role,
            typ: TokenType::Proxy,
            iat,
            exp: iat + self.config.refresh_ttl.as_secs().max(1),
            jti: uuid::Uuid::new_v4().to_string(),
            fam: Some(format!("{GRANT_FAMILY}{}", grant.id)),
            own: Some(owner.to_owned()),
            srv: Some(server.to_owned()),
        })
    }

    /// The caller of a proxy cookie whose family names a personal token: the token
    /// must still be good. `None` when the family is a session's.
    pub(super) async fn family_grant(&self, family: &str) -> Option<Result<Caller>> {
        let id = family.strip_prefix(GRANT_FAMILY)?;
        Some(match self.repo.token(id).await {
            Ok(Some(record)) => self.grant_caller(record).await,
            Ok(None) => Err(Error::Unauthorized(
                "the token this came from was revoked".into(),
            )),
            Err(e) => Err(e),
        })
    }

    async fn audit_token(
        &self,
        caller: &Caller,
        client: IpAddr,
        action: &str,
        t: &ApiTokenView,
    ) -> Result<()> {
        let scopes: Vec<&str> = t.scopes.iter().map(|s| s.as_str()).collect();
        self.repo
            .audit(AuditEntry {
                at_ms: now_ms(),
                actor: caller.name.clone(),
                action: action.into(),
                target: t.user.clone(),
                detail: format!("token {} {:?} scopes={}", t.id, t.name, scopes.join(",")),
                client: client.to_string(),
            })
            .await
    }
}
