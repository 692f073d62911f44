//! Personal API tokens: long-lived credentials a user pastes into a desktop client
//! (VS Code, PyCharm, a local Jupyter), limited to scopes, stored hashed, revocable.
//!
//! A token reads `kct_<id>_<secret>`: the id finds the record, the secret (32 random
//! bytes) is checked against its stored hash. Being random rather than chosen by a
//! person, it needs no slow password hash: a keyed-free BLAKE2s digest compared in
//! constant time suffices (guessing the secret is 2^256 work, not a dictionary).
//!
//! Scopes say what a token may do:
//! - `read`: safe requests (`GET`, `HEAD`) to the API;
//! - `servers`: `read`, plus creating, changing and deleting the user's servers and
//!   reservations;
//! - `proxy`: using the user's servers through the proxy (Jupyter clients send it as
//!   `Authorization: token ...` or `?token=`).
//!
//! No token manages tokens, accounts, passwords, groups or anything an admin changes:
//! those need a signed-in session, so a leaked token cannot make itself stronger.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::{Error, Result};

/// What a personal token may do.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize, Serialize, ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    Read,
    Servers,
    Proxy,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Servers => "servers",
            Scope::Proxy => "proxy",
        }
    }

    pub fn parse(s: &str) -> Option<Scope> {
        match s {
            "read" => Some(Scope::Read),
            "servers" => Some(Scope::Servers),
            "proxy" => Some(Scope::Proxy),
            _ => None,
        }
    }
}

/// The prefix every personal token starts with (so that scanners and people can tell
/// one when they see it).
pub const TOKEN_PREFIX: &str = "kct_";

/// A request made with a personal token: which one, and its scopes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenGrant {
    pub id: String,
    pub scopes: Vec<Scope>,
}

impl TokenGrant {
    pub fn has(&self, scope: Scope) -> bool {
        self.scopes.contains(&scope)
    }

    /// Whether this token may make `method` on the API path `path`; the error says
    /// which scope is missing, or that only a session may.
    pub fn allows(&self, method: &str, path: &str) -> Result<()> {
        let session_only = || {
            Error::Forbidden(
                "a personal API token cannot do this: sign in (tokens, accounts, groups and \
                 admin changes need a session)"
                    .into(),
            )
        };
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        if matches!(
            segments.as_slice(),
            ["api", "v1", "tokens", ..] | ["api", "v1", "users", _, "tokens", ..]
        ) {
            return Err(session_only());
        }
        if matches!(method, "GET" | "HEAD") {
            return if self.has(Scope::Read) || self.has(Scope::Servers) {
                Ok(())
            } else {
                Err(Error::Forbidden(
                    "this personal token lacks the read scope".into(),
                ))
            };
        }
        // Writes: the user's servers and reservations only.
        let servers = matches!(
            segments.as_slice(),
            ["api", "v1", "users", _, "servers" | "reservations", ..]
        );
        if !servers {
            return Err(session_only());
        }
        if self.has(Scope::Servers) {
            Ok(())
        } else {
            Err(Error::Forbidden(
                "this personal token lacks the servers scope".into(),
            ))
        }
    }
}

/// A stored token: everything but the secret, which is kept only as `hash`.
#[derive(Clone, Debug, PartialEq)]
pub struct ApiTokenRecord {
    pub id: String,
    pub user: String,
    pub name: String,
    pub scopes: Vec<Scope>,
    pub hash: Vec<u8>,
    pub created_at_ms: u64,
    pub expires_at_ms: u64,
    pub last_used_ms: Option<u64>,
}

/// A token as listed: never its secret.
#[derive(Clone, Debug, PartialEq, Serialize, ToSchema)]
pub struct ApiTokenView {
    pub id: String,
    pub user: String,
    pub name: String,
    pub scopes: Vec<Scope>,
    pub created_at_ms: u64,
    pub expires_at_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_used_ms: Option<u64>,
}

impl From<&ApiTokenRecord> for ApiTokenView {
    fn from(r: &ApiTokenRecord) -> Self {
        ApiTokenView {
            id: r.id.clone(),
            user: r.user.clone(),
            name: r.name.clone(),
            scopes: r.scopes.clone(),
            created_at_ms: r.created_at_ms,
            expires_at_ms: r.expires_at_ms,
            last_used_ms: r.last_used_ms,
        }
    }
}

/// `kct_<id>_<secret>` split; `None` for anything else.
pub fn split_token(token: &str) -> Option<(&str, &str)> {
    let rest = token.strip_prefix(TOKEN_PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    let id_ok = id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit());
    (id_ok && secret.len() >= 32).then_some((id, secret))
}

/// Scopes as stored: sorted, comma-separated.
pub fn scopes_to_string(scopes: &[Scope]) -> String {
    scopes
        .iter()
        .map(|s| s.as_str())
        .collect::<Vec<_>>()
        .join(",")
}

pub fn scopes_from_string(s: &str) -> Vec<Scope> {
    s.split(',').filter_map(Scope::parse).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(scopes: &[Scope]) -> TokenGrant {
        TokenGrant {
            id: "0123456789abcdef".into(),
            scopes: scopes.to_vec(),
        }
    }

    #[test]
    fn scopes_decide_what_a_token_may_do() {
        use Scope::*;
        let cases: &[(&[Scope], &str, &str, bool)] = &[
            (&[Read], "GET", "/api/v1/gpus", true),
            (&[Proxy], "GET", "/api/v1/gpus", false),
            (&[Servers], "GET", "/api/v1/users/alice/servers", true),
            (&[Read], "POST", "/api/v1/users/alice/servers", false),
            (&[Servers], "POST", "/api/v1/users/alice/servers", true),
            (
                &[Servers],
                "DELETE",
                "/api/v1/users/alice/servers/lab",
                true,
            ),
            (&[Servers], "POST", "/api/v1/users/alice/reservations", true),
            (
                &[Servers, Read, Proxy],
                "PATCH",
                "/api/v1/users/alice",
                false,
            ),
            (&[Servers, Read, Proxy], "POST", "/api/v1/users", false),
            (
                &[Servers, Read, Proxy],
                "GET",
                "/api/v1/users/alice/tokens",
                false,
            ),
            (
                &[Servers, Read, Proxy],
                "POST",
                "/api/v1/users/alice/tokens",
                false,
            ),
            (&[Servers, Read, Proxy], "GET", "/api/v1/tokens", false),
            (&[Servers, Read, Proxy], "POST", "/api/v1/volumes", false),
            (
                &[Servers],
                "DELETE",
                "/api/v1/users/alice/servers/tokens",
                true,
            ),
        ];
        for (scopes, method, path, ok) in cases {
            assert_eq!(
                grant(scopes).allows(method, path).is_ok(),
                *ok,
                "{scopes:?} {method} {path}"
            );
        }
    }

    #[test]
    fn only_well_formed_tokens_split() {
        let secret = "s".repeat(43);
        assert!(split_token(&format!("kct_0123456789abcdef_{secret}")).is_some());
        for bad in [
            format!("kct_0123456789abcde_{secret}"),
            format!("kct_0123456789abcdeg_{secret}"),
            "kct_0123456789abcdef_short".to_owned(),
            format!("xyz_0123456789abcdef_{secret}"),
            "eyJhbGciOiJIUzI1NiJ9.e30.x".to_owned(),
        ] {
            assert!(split_token(&bad).is_none(), "{bad}");
        }
        assert_eq!(
            scopes_from_string(&scopes_to_string(&[Scope::Read, Scope::Proxy])),
            [Scope::Read, Scope::Proxy]
        );
    }
}
