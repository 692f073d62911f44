//! Who is acting on a request: a user who signed in (still existing and enabled), or
//! the platform itself.

use crate::token::TokenGrant;
use crate::user::Role;
use crate::{Error, Result};

/// An authenticated user. The HTTP layer makes one from a token after checking that
/// the user still exists and is enabled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub name: String,
    pub role: Role,
    /// The sign-in session (refresh-token family) the caller's token belongs to; ending
    /// it ends the token. `None` for the platform itself and for personal tokens.
    pub session: Option<String>,
    /// Set when the request came with a personal API token: what it may do.
    pub grant: Option<TokenGrant>,
}

impl Caller {
    /// The platform itself (the culler, recovery): an admin named `system` in audits.
    pub fn system() -> Caller {
        Caller {
            name: "system".into(),
            role: Role::Admin,
            session: None,
            grant: None,
        }
    }

    pub fn is_admin(&self) -> bool {
        self.role == Role::Admin
    }

    /// Admin, or the named user themself; anyone else gets 404 so that existence
    /// does not leak.
    pub fn may_see_user(&self, user: &str) -> Result<()> {
        if self.is_admin() || self.name == user {
            Ok(())
        } else {
            Err(Error::NotFound(format!("no user {user:?}")))
        }
    }

    /// Whether this caller's credential allows `method` on the API path `path`: always
    /// for a session; by its scopes for a personal token.
    pub fn check_scope(&self, method: &str, path: &str) -> Result<()> {
        match &self.grant {
            None => Ok(()),
            Some(g) => g.allows(method, path),
        }
    }

    pub fn require_admin(&self) -> Result<()> {
        if self.is_admin() {
            Ok(())
        } else {
            Err(Error::Forbidden("admin only".into()))
        }
    }
}
