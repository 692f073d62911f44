//! Users: roles, quotas, what the API shows of them, refresh-token families, and the
//! audit log's entries.

use std::fmt;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::{Error, Result};

/// What a user may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Admin,
    User,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::User => "user",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "admin" => Some(Role::Admin),
            "user" => Some(Role::User),
            _ => None,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Per-user limits; `None` means the configured default.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Quota {
    // The maximums are `validate`'s: values no deployment needs (they would only
    // overflow sums).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(maximum = 4096)]
    pub gpus: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(maximum = 10_000)]
    pub servers: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(maximum = 100_000_000)]
    pub cpu_millis: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(maximum = 1_125_899_906_842_624_u64)]
    pub memory_bytes: Option<u64>,
    /// Sum of the sizes of the user's volumes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(maximum = 1_152_921_504_606_846_976_u64)]
    pub storage_bytes: Option<u64>,
    /// Normalized GPU-hours per calendar month (UTC): a create that needs devices is
    /// refused (429) once they are used up; running servers keep running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_hours_per_month: Option<u32>,
}

/// A user as the API shows it (never the password hash).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct User {
    pub name: String,
    pub role: Role,
    pub disabled: bool,
    pub quota: Quota,
    pub created_at_ms: u64,
}

/// A user with the PHC password hash, for login only.
#[derive(Clone)]
pub struct UserRecord {
    pub user: User,
    pub password_hash: String,
}

impl fmt::Debug for UserRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UserRecord")
            .field("user", &self.user)
            .field("password_hash", &"<redacted>")
            .finish()
    }
}

/// A user to create; `password_hash` is a PHC string from `auth::hash_password`.
#[derive(Clone)]
pub struct NewUser {
    pub name: String,
    pub password_hash: String,
    pub role: Role,
    pub quota: Quota,
}

impl fmt::Debug for NewUser {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NewUser")
            .field("name", &self.name)
            .field("password_hash", &"<redacted>")
            .field("role", &self.role)
            .field("quota", &self.quota)
            .finish()
    }
}

/// Fields to change; `None` leaves a field as it is. `quota` replaces the whole quota.
#[derive(Clone, Default)]
pub struct UserPatch {
    pub role: Option<Role>,
    pub disabled: Option<bool>,
    pub quota: Option<Quota>,
    pub password_hash: Option<String>,
}

impl fmt::Debug for UserPatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UserPatch")
            .field("role", &self.role)
            .field("disabled", &self.disabled)
            .field("quota", &self.quota)
            .field(
                "password_hash",
                &self.password_hash.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

/// One issued refresh token (by its `jti`), in a rotation family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefreshRow {
    pub id: String,
    pub family: String,
    pub user: String,
    pub issued_at_ms: u64,
    pub expires_at_ms: u64,
}

/// The outcome of presenting a refresh token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefreshUse {
    /// Unused, unrevoked, unexpired: now marked used.
    Valid { user: String, family: String },
    /// Already used, or its family revoked: the caller revokes the family.
    Reused { family: String },
    /// Unknown or expired.
    Invalid,
}

/// One line of the audit log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AuditEntry {
    pub at_ms: u64,
    /// Who acted: a user name, `system`, or empty for an unauthenticated client.
    pub actor: String,
    /// What happened, e.g. `login`, `login_failed`, `user_create`.
    pub action: String,
    /// What it was done to (a user name, a server); empty if nothing.
    #[serde(default)]
    pub target: String,
    /// Free text; never a secret. Empty if nothing.
    #[serde(default)]
    pub detail: String,
    /// The client address when a request caused it, else empty.
    #[serde(default)]
    pub client: String,
}

/// Default per-user limits. `None` is unlimited.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct DefaultQuota {
    pub gpus: Option<u32>,
    pub servers: Option<u32>,
    pub cpu_millis: Option<u64>,
    pub memory_bytes: Option<u64>,
    /// Sum of the sizes of a user's volumes.
    pub storage_bytes: Option<u64>,
    /// Normalized GPU-hours per calendar month (UTC); unlimited by default.
    pub gpu_hours_per_month: Option<u32>,
}

impl Default for DefaultQuota {
    fn default() -> Self {
        Self {
            gpus: Some(8),
            servers: Some(4),
            cpu_millis: Some(32_000),
            memory_bytes: Some(256 << 30),
            storage_bytes: Some(100 << 30),
            gpu_hours_per_month: None,
        }
    }
}

/// What an owner's servers use (or what a new one asks for): counted against the
/// servers, CPU and memory quotas.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub servers: u64,
    pub cpu_millis: u64,
    pub memory_bytes: u64,
}

impl Quota {
    /// This quota with unset fields taken from the configured defaults: the limits
    /// that apply.
    pub fn effective(&self, defaults: &DefaultQuota) -> Quota {
        Quota {
            gpus: self.gpus.or(defaults.gpus),
            servers: self.servers.or(defaults.servers),
            cpu_millis: self.cpu_millis.or(defaults.cpu_millis),
            memory_bytes: self.memory_bytes.or(defaults.memory_bytes),
            storage_bytes: self.storage_bytes.or(defaults.storage_bytes),
            gpu_hours_per_month: self.gpu_hours_per_month.or(defaults.gpu_hours_per_month),
        }
    }

    /// Whether `owner` (a user, or `group NAME`), having used `used` normalized GPU-hours
    /// this month, may start something that needs devices (unset: unlimited).
    pub fn check_gpu_hours(&self, owner: &str, used: f64) -> Result<()> {
        match self.gpu_hours_per_month {
            Some(max) if used >= f64::from(max) => Err(Error::QuotaExceeded(format!(
                "GPU-hour quota used up: {owner} used {used:.1} of {max} GPU-hours this month \
                 (servers that run keep running; it renews on the 1st, UTC)"
            ))),
            _ => Ok(()),
        }
    }

    /// Whether `owner`, using `used`, may add `ask` (servers, CPU, memory; unset
    /// fields are unlimited). Devices are checked by the ledger, atomically; storage
    /// by the store, in the transaction that records a volume.
    pub fn check(&self, owner: &str, used: Usage, ask: Usage) -> Result<()> {
        if let Some(max) = self.servers
            && used.servers.saturating_add(ask.servers) > u64::from(max)
        {
            return Err(Error::QuotaExceeded(format!(
                "server quota exceeded: {owner} has {} of {max} servers",
                used.servers
            )));
        }
        if let Some(max) = self.cpu_millis
            && used.cpu_millis.saturating_add(ask.cpu_millis) > max
        {
            return Err(Error::QuotaExceeded(format!(
                "CPU quota exceeded: {owner} uses {}m of {max}m and asked for {}m",
                used.cpu_millis, ask.cpu_millis
            )));
        }
        if let Some(max) = self.memory_bytes
            && used.memory_bytes.saturating_add(ask.memory_bytes) > max
        {
            return Err(Error::QuotaExceeded(format!(
                "memory quota exceeded: {owner} uses {} of {max} bytes and asked for {}",
                used.memory_bytes, ask.memory_bytes
            )));
        }
        Ok(())
    }

    /// Refuses values no deployment needs (they would only overflow sums).
    pub fn validate(&self) -> Result<()> {
        let ok = self.gpus.is_none_or(|v| v <= 4096)
            && self.servers.is_none_or(|v| v <= 10_000)
            && self.cpu_millis.is_none_or(|v| v <= 100_000_000)
            && self.memory_bytes.is_none_or(|v| v <= 1 << 50)
            && self.storage_bytes.is_none_or(|v| v <= 1 << 60);
        if ok {
            Ok(())
        } else {
            Err(Error::BadRequest("quota value out of range".into()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn effective_takes_defaults_for_unset_fields() {
        let own = Quota {
            gpus: Some(1),
            ..Quota::default()
        };
        let e = own.effective(&DefaultQuota::default());
        assert_eq!(e.gpus, Some(1));
        assert_eq!(e.servers, DefaultQuota::default().servers);
    }

    #[test]
    fn check_counts_what_is_used_and_asked() {
        let q = Quota {
            servers: Some(2),
            cpu_millis: Some(4000),
            memory_bytes: Some(8 << 30),
            ..Quota::default()
        };
        let one = Usage {
            servers: 1,
            cpu_millis: 2000,
            memory_bytes: 4 << 30,
        };
        q.check("a", one, one).unwrap();
        let err = q.check("a", Usage { servers: 2, ..one }, one).unwrap_err();
        assert!(err.to_string().contains("server quota"), "{err}");
        let err = q
            .check(
                "a",
                one,
                Usage {
                    cpu_millis: 2001,
                    ..one
                },
            )
            .unwrap_err();
        assert!(err.to_string().contains("CPU quota"), "{err}");
        let err = q
            .check(
                "a",
                one,
                Usage {
                    memory_bytes: (4 << 30) + 1,
                    ..one
                },
            )
            .unwrap_err();
        assert!(err.to_string().contains("memory quota"), "{err}");
        Quota::default()
            .check(
                "a",
                one,
                Usage {
                    servers: 1000,
                    cpu_millis: u64::MAX,
                    memory_bytes: u64::MAX,
                },
            )
            .unwrap();
    }
}
