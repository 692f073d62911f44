//! Single sign-on through an OpenID Connect provider: the authorization code flow with
//! PKCE (S256), `state` and `nonce`, discovery, and ID tokens checked against the
//! provider's JWKS (fetched again when a token names a key it does not have: key
//! rotation) for signature, algorithm (asymmetric only), issuer, audience, expiry and
//! nonce. Each `state` is good once, for ten minutes.
//!
//! A provider's user becomes the kcloud user named by `username_claim` (made a valid
//! name), created at first sign-in and linked to the provider's subject: a local
//! account of that name, or another subject's, is never taken over. At every sign-in
//! the user's memberships follow the `groups_claim` (kcloud groups of those names), and
//! with `admin_groups` set, so does the admin role.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use serde_json::Value;

use kcloud_core::private::random_token;
use kcloud_core::settings::OidcSettings;
use kcloud_core::{Error, Result, now_ms};

/// How long a sign-in may take at the provider.
const PENDING_TTL_MS: u64 = 10 * 60_000;
/// Sign-ins in progress kept at most (each expires within ten minutes).
const MAX_PENDING: usize = 10_000;
/// The JWKS is fetched again at most this often for an unknown key id.
const JWKS_REFETCH_MS: u64 = 10_000;
const CLOCK_LEEWAY_SECS: u64 = 30;

/// What the provider's discovery document says (the parts used).
#[derive(Clone, Debug, Deserialize)]
pub struct Discovery {
    pub issuer: String,
    pub authorization_endpoint: String,
    pub token_endpoint: String,
    pub jwks_uri: String,
}

/// A sign-in on its way through the provider.
struct Pending {
    nonce: String,
    verifier: String,
    expires_ms: u64,
}

/// Who the provider says signed in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// `{issuer} {sub}`: what links a kcloud user to the provider's.
    pub subject: String,
    /// A valid kcloud user name from `username_claim`.
    pub username: String,
    pub groups: Vec<String>,
}

/// The provider, as kcloud's client of it.
pub struct Oidc {
    pub settings: OidcSettings,
    secret: String,
    http: reqwest::Client,
    discovery: tokio::sync::OnceCell<Discovery>,
    jwks: tokio::sync::RwLock<(JwkSet, u64)>,
    pending: Mutex<HashMap<String, Pending>>,
}

fn upstream(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Unavailable(format!("the sign-in provider: {what}: {e}"))
}

fn refused(why: &str) -> Error {
    Error::Unauthorized(format!("sign-in refused: {why}"))
}

/// A kcloud user name from a provider's: lower case, `[a-z0-9-]`, at most 63, the
/// part before `@` of an e-mail address.
pub fn user_name_from(claim: &str) -> Option<String> {
    let local = claim.split('@').next().unwrap_or(claim).to_lowercase();
    let mapped: String = local
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let trimmed = mapped.trim_matches('-');
    let name: String = trimmed.chars().take(63).collect();
    let name = name.trim_end_matches('-').to_owned();
    kcloud_core::validate::validate_user_name(&name)
        .ok()
        .map(|()| name)
}

impl Oidc {
    /// The secret comes from `client_secret_file` or `KCLOUD_OIDC_CLIENT_SECRET`.
    pub fn new(settings: OidcSettings) -> Result<Self> {
        let secret = match &settings.client_secret_file {
            Some(p) => std::fs::read_to_string(p)
                .map_err(|e| {
                    Error::Config(format!("[oidc] client_secret_file {}: {e}", p.display()))
                })?
                .trim_end_matches(['\n', '\r'])
                .to_owned(),
            None => std::env::var("KCLOUD_OIDC_CLIENT_SECRET").map_err(|_| {
                Error::Config("[oidc] needs client_secret_file or KCLOUD_OIDC_CLIENT_SECRET".into())
            })?,
        };
        if secret.is_empty() {
            return Err(Error::Config("[oidc] the client secret is empty".into()));
        }
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| Error::Config(format!("[oidc] HTTP client: {e}")))?;
        Ok(Self {
            settings,
            secret,
            http,
            discovery: tokio::sync::OnceCell::new(),
            jwks: tokio::sync::RwLock::new((JwkSet { keys: vec![] }, 0)),
            pending: Mutex::new(HashMap::new()),
        })
    }

    /// The discovery document, fetched once (the issuer in it must be the configured
    /// one).
    pub async fn discovery(&self) -> Result<&Discovery> {
        self.discovery
            .get_or_try_init(|| async {
                let url = format!(
                    "{}/.well-known/openid-configuration",
                    self.settings.issuer.trim_end_matches('/')
                );
                let d: Discovery = self
                    .http
                    .get(&url)
                    .send()
                    .await
                    .and_then(|r| r.error_for_status())
                    .map_err(|e| upstream("discovery", e))?
                    .json()
                    .await
                    .map_err(|e| upstream("discovery", e))?;
                if d.issuer.trim_end_matches('/') != self.settings.issuer.trim_end_matches('/') {
                    return Err(upstream(
                        "discovery",
                        format!("it names issuer {:?}, not the configured one", d.issuer),
                    ));
                }
                Ok(d)
            })
            .await
    }

    /// Starts a sign-in: the URL to send the browser to, and the `state` the browser
    /// must bring back (the caller binds it to the browser, e.g. in a cookie, so that
    /// nobody can finish a sign-in started elsewhere in someone else's browser).
    pub async fn begin(&self) -> Result<(String, String)> {
        let d = self.discovery().await?;
        let state = random_token();
        let nonce = random_token();
        let verifier = random_token();
        let challenge = URL_SAFE_NO_PAD.encode(
            aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, verifier.as_bytes()).as_ref(),
        );
        {
            let now = now_ms();
            let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
            pending.retain(|_, p| p.expires_ms > now);
            if pending.len() >= MAX_PENDING {
                return Err(Error::RateLimited {
                    retry_after_secs: 60,
                });
            }
            pending.insert(
                state.clone(),
                Pending {
                    nonce: nonce.clone(),
                    verifier,
                    expires_ms: now + PENDING_TTL_MS,
                },
            );
        }
        let mut url = reqwest::Url::parse(&d.authorization_endpoint)
            .map_err(|e| upstream("authorization_endpoint", e))?;
        url.query_pairs_mut()
            .append_pair("response_type", "code")
            .append_pair("client_id", &self.settings.client_id)
            .append_pair("redirect_uri", &self.settings.redirect_url)
            .append_pair("scope", &self.settings.scopes.join(" "))
            .append_pair("state", &state)
            .append_pair("nonce", &nonce)
            .append_pair("code_challenge", &challenge)
            .append_pair("code_challenge_method", "S256");
        Ok((url.into(), state))
    }

    /// Ends a sign-in: the provider sent the browser back with `code` for `state`.
    pub async fn finish(&self, code: &str, state: &str) -> Result<Identity> {
        let pending = self
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(state)
            .filter(|p| p.expires_ms > now_ms())
            .ok_or_else(|| refused("unknown, used or expired state; sign in again"))?;
        let d = self.discovery().await?;
        #[derive(Deserialize)]
        struct TokenResponse {
            id_token: String,
        }
        // application/x-www-form-urlencoded, encoded by `Url`'s serializer.
        let mut form =
            reqwest::Url::parse("http://form.invalid/").map_err(|e| upstream("form", e))?;
        form.query_pairs_mut()
            .append_pair("grant_type", "authorization_code")
            .append_pair("code", code)
            .append_pair("redirect_uri", &self.settings.redirect_url)
            .append_pair("code_verifier", &pending.verifier);
        let resp = self
            .http
            .post(&d.token_endpoint)
            .basic_auth(&self.settings.client_id, Some(&self.secret))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(form.query().unwrap_or_default().to_owned())
            .send()
            .await
            .map_err(|e| upstream("token endpoint", e))?;
        if !resp.status().is_success() {
            return Err(refused(&format!(
                "the provider refused the code ({})",
                resp.status()
            )));
        }
        let tokens: TokenResponse = resp
            .json()
            .await
            .map_err(|e| upstream("token endpoint", e))?;
        let claims = self
            .verify_id_token(&tokens.id_token, &pending.nonce, now_ms())
            .await?;
        self.identity(&claims)
    }

    /// Checks an ID token: signed by a key in the provider's JWKS with an asymmetric
    /// algorithm, from the configured issuer, for this client, not expired at `now_ms`,
    /// carrying `nonce`. The claims.
    pub async fn verify_id_token(&self, token: &str, nonce: &str, now_ms: u64) -> Result<Value> {
        let header =
            jsonwebtoken::decode_header(token).map_err(|_| refused("malformed ID token"))?;
        let alg = header.alg;
        if !matches!(
            alg,
            Algorithm::RS256
                | Algorithm::RS384
                | Algorithm::RS512
                | Algorithm::PS256
                | Algorithm::PS384
                | Algorithm::PS512
                | Algorithm::ES256
                | Algorithm::ES384
                | Algorithm::EdDSA
        ) {
            return Err(refused("the ID token's algorithm is not an asymmetric one"));
        }
        let kid = header.kid.unwrap_or_default();
        let key = self.key(&kid).await?;
        let mut v = Validation::new(alg);
        let issuer = self.discovery().await?.issuer.clone();
        v.set_issuer(&[issuer]);
        v.set_audience(&[&self.settings.client_id]);
        v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        // Expiry is checked below against `now_ms` (so tests can move the clock).
        v.validate_exp = false;
        let claims: Value = jsonwebtoken::decode::<Value>(token, &key, &v)
            .map_err(|e| refused(&format!("ID token: {e}")))?
            .claims;
        let exp = claims["exp"].as_u64().ok_or_else(|| refused("no exp"))?;
        if now_ms / 1000 > exp + CLOCK_LEEWAY_SECS {
            return Err(refused("the ID token has expired"));
        }
        if claims["nonce"].as_str() != Some(nonce) {
            return Err(refused("the ID token's nonce is not this sign-in's"));
        }
        Ok(claims)
    }

    /// The key `kid` from the JWKS, fetched again (at most every 10 s) when unknown.
    async fn key(&self, kid: &str) -> Result<DecodingKey> {
        let find = |set: &JwkSet| {
            if kid.is_empty() && set.keys.len() == 1 {
                return set.keys.first().cloned();
            }
            set.find(kid).cloned()
        };
        {
            let cached = self.jwks.read().await;
            if let Some(k) = find(&cached.0) {
                return DecodingKey::from_jwk(&k).map_err(|_| refused("unusable key"));
            }
        }
        let mut cached = self.jwks.write().await;
        let now = now_ms();
        if now.saturating_sub(cached.1) >= JWKS_REFETCH_MS || cached.0.keys.is_empty() {
            let uri = self.discovery().await?.jwks_uri.clone();
            let set: JwkSet = self
                .http
                .get(&uri)
                .send()
                .await
                .and_then(|r| r.error_for_status())
                .map_err(|e| upstream("JWKS", e))?
                .json()
                .await
                .map_err(|e| upstream("JWKS", e))?;
            *cached = (set, now);
        }
        let k =
            find(&cached.0).ok_or_else(|| refused("the ID token's key is not the provider's"))?;
        DecodingKey::from_jwk(&k).map_err(|_| refused("unusable key"))
    }

    /// Who the claims say signed in.
    fn identity(&self, claims: &Value) -> Result<Identity> {
        let sub = claims["sub"].as_str().unwrap_or_default();
        let raw = claims[&self.settings.username_claim]
            .as_str()
            .ok_or_else(|| {
                refused(&format!(
                    "the provider sent no {:?} claim",
                    self.settings.username_claim
                ))
            })?;
        let username = user_name_from(raw)
            .ok_or_else(|| refused("the provider's user name cannot be a kcloud user name"))?;
        let groups = match &claims[&self.settings.groups_claim] {
            Value::Array(list) => list
                .iter()
                .filter_map(|g| g.as_str().map(str::to_owned))
                .collect(),
            Value::String(one) => vec![one.clone()],
            _ => vec![],
        };
        Ok(Identity {
            subject: format!("{} {sub}", claims["iss"].as_str().unwrap_or_default()),
            username,
            groups,
        })
    }
}

/// What a provider-linked account keeps where a local one keeps its password hash:
/// never a valid hash, so no password ever signs it in; it names the provider's
/// subject, so no other subject (and no local account) is ever taken over.
fn link_marker(id: &Identity) -> String {
    format!("oidc:{}", id.subject)
}

impl super::Auth {
    /// Signs in the provider's user `id`: the kcloud user of that name, created at
    /// first sign-in, linked to the subject; its role (with `admin_groups`) and its
    /// memberships follow the provider's groups. Audits `login_oidc`.
    pub async fn sign_in_oidc(
        &self,
        id: &Identity,
        settings: &OidcSettings,
        groups: &crate::groups::Groups,
        client: std::net::IpAddr,
    ) -> Result<super::Session> {
        use kcloud_core::user::{AuditEntry, NewUser, Quota, Role, UserPatch};
        let marker = link_marker(id);
        let user = match self.repo.user(&id.username).await? {
            Some(r) if r.password_hash == marker => r.user,
            Some(_) => {
                return Err(Error::Conflict(format!(
                    "a kcloud account named {:?} exists and is not this provider user's: \
                     ask an admin",
                    id.username
                )));
            }
            None => {
                self.repo
                    .create_user(NewUser {
                        name: id.username.clone(),
                        password_hash: marker,
                        role: Role::User,
                        quota: Quota::default(),
                    })
                    .await?
            }
        };
        if user.disabled {
            return Err(Error::Unauthorized("this account is disabled".into()));
        }
        let user = if settings.admin_groups.is_empty() {
            user
        } else {
            let want = if id.groups.iter().any(|g| settings.admin_groups.contains(g)) {
                Role::Admin
            } else {
                Role::User
            };
            if want == user.role {
                user
            } else {
                self.repo
                    .update_user(
                        &user.name,
                        UserPatch {
                            role: Some(want),
                            ..UserPatch::default()
                        },
                    )
                    .await?
                    .ok_or_else(|| Error::Unauthorized("account removed".into()))?
            }
        };
        let joined = groups.sync_member(&user.name, &id.groups).await?;
        let now = now_ms();
        let session = self
            .issue(&user, uuid::Uuid::new_v4().to_string(), now)
            .await?;
        self.repo
            .audit(AuditEntry {
                at_ms: now,
                actor: user.name.clone(),
                action: "login_oidc".into(),
                target: user.name.clone(),
                detail: format!("role={} groups=[{}]", user.role.as_str(), joined.join(",")),
                client: client.to_string(),
            })
            .await?;
        Ok(session)
    }
}

#[cfg(test)]
mod tests {
    use super::user_name_from;

    #[test]
    fn provider_names_become_kcloud_names() {
        assert_eq!(
            user_name_from("Dana.Scully@example.org").as_deref(),
            Some("dana-scully")
        );
        assert_eq!(user_name_from("eli").as_deref(), Some("eli"));
        assert_eq!(user_name_from("__x__").as_deref(), Some("x"));
        assert_eq!(user_name_from("@example.org"), None);
        assert_eq!(user_name_from("ü"), None);
        assert_eq!(user_name_from(&"a".repeat(80)).map(|n| n.len()), Some(63));
    }
}
