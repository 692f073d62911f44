//! Users and their password hashes.

use async_trait::async_trait;
use rusqlite::{Connection, OptionalExtension, Row, TransactionBehavior, params};

use kcloud_core::Error;
use kcloud_core::repo::UserRepo;
use kcloud_core::user::{NewUser, Quota, Role, User, UserPatch, UserRecord};
use kcloud_core::validate::validate_user_name;

use crate::{Result, Store, get_opt_u64, get_u64, now_ms, to_i64};

#[async_trait]
impl UserRepo for Store {
    /// Creates a user; a taken name is `Conflict`.
    async fn create_user(&self, new: NewUser) -> kcloud_core::Result<User> {
        validate_user_name(&new.name)?;
        let quota = QuotaRow::from_quota(&new.quota)?;
        self.call(move |conn| {
            let now = to_i64(now_ms())?;
            let inserted = conn.execute(
                "INSERT INTO users (name, password_hash, role, disabled, quota_gpus,
                    quota_servers, quota_cpu_millis, quota_memory_bytes, created_at_ms,
                    updated_at_ms, quota_storage_bytes, quota_gpu_hours_per_month)
                 VALUES (?1, ?2, ?3, 0, ?4, ?5, ?6, ?7, ?8, ?8, ?9, ?10)
                 ON CONFLICT(name) DO NOTHING",
                params![
                    new.name,
                    new.password_hash,
                    new.role.as_str(),
                    quota.gpus,
                    quota.servers,
                    quota.cpu_millis,
                    quota.memory_bytes,
                    now,
                    quota.storage_bytes,
                    quota.gpu_hours_per_month
                ],
            )?;
            if inserted == 0 {
                return Err(
                    Error::Conflict(format!("user name {} is already taken", new.name)).into(),
                );
            }
            Ok(get_user(conn, &new.name)?
                .map(|r| r.user)
                .ok_or_else(|| Error::Internal("created user vanished".into()))?)
        })
        .await
    }

    /// One user with the password hash, or `None`.
    async fn user(&self, name: &str) -> kcloud_core::Result<Option<UserRecord>> {
        let name = name.to_owned();
        self.call(move |conn| get_user(conn, &name)).await
    }

    /// All users, by name.
    async fn users(&self) -> kcloud_core::Result<Vec<User>> {
        self.call(|conn| {
            let mut stmt = conn.prepare_cached(&format!("{USER_SELECT} ORDER BY name"))?;
            let rows = stmt.query_map([], user_from_row)?;
            Ok(rows
                .map(|r| r.map(|rec| rec.user))
                .collect::<rusqlite::Result<_>>()?)
        })
        .await
    }

    /// Applies `patch`; `None` if the user does not exist. Disabling a user or setting
    /// a password revokes their refresh tokens in the same transaction. Leaving no
    /// enabled admin (where there was one) is `Conflict`.
    async fn update_user(&self, name: &str, patch: UserPatch) -> kcloud_core::Result<Option<User>> {
        let name = name.to_owned();
        let quota = patch.quota.as_ref().map(QuotaRow::from_quota).transpose()?;
        self.call(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let Some(before) = get_user(&tx, &name)? else {
                return Ok(None);
            };
            let now = to_i64(now_ms())?;
            if let Some(role) = patch.role {
                tx.execute(
                    "UPDATE users SET role = ?2 WHERE name = ?1",
                    params![name, role.as_str()],
                )?;
            }
            if let Some(disabled) = patch.disabled {
                tx.execute(
                    "UPDATE users SET disabled = ?2 WHERE name = ?1",
                    params![name, disabled],
                )?;
            }
            if let Some(q) = &quota {
                tx.execute(
                    "UPDATE users SET quota_gpus = ?2, quota_servers = ?3,
                        quota_cpu_millis = ?4, quota_memory_bytes = ?5,
                        quota_storage_bytes = ?6, quota_gpu_hours_per_month = ?7 WHERE name = ?1",
                    params![
                        name,
                        q.gpus,
                        q.servers,
                        q.cpu_millis,
                        q.memory_bytes,
                        q.storage_bytes,
                        q.gpu_hours_per_month
                    ],
                )?;
            }
            if let Some(hash) = &patch.password_hash {
                tx.execute(
                    "UPDATE users SET password_hash = ?2 WHERE name = ?1",
                    params![name, hash],
                )?;
            }
            tx.execute(
                "UPDATE users SET updated_at_ms = ?2 WHERE name = ?1",
                params![name, now],
            )?;
            let was_enabled_admin = before.user.role == Role::Admin && !before.user.disabled;
            if was_enabled_admin && enabled_admins(&tx)? == 0 {
                return Err(last_admin().into());
            }
            // Sessions of a disabled user, issued under the old password, or carrying
            // the old role end now.
            let role_changed = patch.role.is_some_and(|r| r != before.user.role);
            if patch.disabled == Some(true) || patch.password_hash.is_some() || role_changed {
                revoke_user_families(&tx, &name, now)?;
            }
            let after = get_user(&tx, &name)?.map(|r| r.user);
            tx.commit()?;
            Ok(after)
        })
        .await
    }

    /// Deletes a user and (by cascade) their refresh tokens; `false` if absent.
    /// Deleting the last enabled admin is `Conflict`.
    async fn delete_user(&self, name: &str) -> kcloud_core::Result<bool> {
        let name = name.to_owned();
        self.call(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let Some(before) = get_user(&tx, &name)? else {
                return Ok(false);
            };
            tx.execute("DELETE FROM users WHERE name = ?1", params![name])?;
            if before.user.role == Role::Admin && !before.user.disabled && enabled_admins(&tx)? == 0
            {
                return Err(last_admin().into());
            }
            tx.commit()?;
            Ok(true)
        })
        .await
    }

    /// Enabled admins.
    async fn admin_count(&self) -> kcloud_core::Result<u64> {
        self.call(|conn| enabled_admins(conn)).await
    }
}

pub(crate) const USER_SELECT: &str = "SELECT name, role, disabled, quota_gpus, quota_servers, \
    quota_cpu_millis, quota_memory_bytes, created_at_ms, password_hash, quota_storage_bytes, \
    quota_gpu_hours_per_month FROM users";

pub(crate) fn get_user(conn: &Connection, name: &str) -> Result<Option<UserRecord>> {
    let mut stmt = conn.prepare_cached(&format!("{USER_SELECT} WHERE name = ?1"))?;
    Ok(stmt.query_row(params![name], user_from_row).optional()?)
}

pub(crate) fn user_from_row(r: &Row<'_>) -> rusqlite::Result<UserRecord> {
    let role: String = r.get(1)?;
    let role = Role::parse(&role).ok_or_else(|| {
        rusqlite::Error::FromSqlConversionFailure(
            1,
            rusqlite::types::Type::Text,
            format!("unknown role {role:?}").into(),
        )
    })?;
    Ok(UserRecord {
        user: User {
            name: r.get(0)?,
            role,
            disabled: r.get(2)?,
            quota: Quota {
                gpus: r.get(3)?,
                servers: r.get(4)?,
                cpu_millis: get_opt_u64(r, 5)?,
                memory_bytes: get_opt_u64(r, 6)?,
                storage_bytes: get_opt_u64(r, 9)?,
                gpu_hours_per_month: r.get(10)?,
            },
            created_at_ms: get_u64(r, 7)?,
        },
        password_hash: r.get(8)?,
    })
}

/// A quota as SQLite integers (which are signed).
struct QuotaRow {
    gpus: Option<u32>,
    servers: Option<u32>,
    cpu_millis: Option<i64>,
    memory_bytes: Option<i64>,
    storage_bytes: Option<i64>,
    gpu_hours_per_month: Option<u32>,
}

impl QuotaRow {
    fn from_quota(q: &Quota) -> Result<QuotaRow> {
        let big = |v: Option<u64>, what: &str| {
            v.map(|v| {
                i64::try_from(v)
                    .map_err(|_| Error::BadRequest(format!("quota {what} is too large")))
            })
            .transpose()
        };
        Ok(QuotaRow {
            gpus: q.gpus,
            servers: q.servers,
            cpu_millis: big(q.cpu_millis, "cpu_millis")?,
            memory_bytes: big(q.memory_bytes, "memory_bytes")?,
            storage_bytes: big(q.storage_bytes, "storage_bytes")?,
            gpu_hours_per_month: q.gpu_hours_per_month,
        })
    }
}

pub(crate) fn enabled_admins(conn: &Connection) -> Result<u64> {
    let n: i64 = conn.query_row(
        "SELECT COUNT(*) FROM users WHERE role = 'admin' AND disabled = 0",
        [],
        |r| r.get(0),
    )?;
    Ok(n.max(0) as u64)
}

fn last_admin() -> Error {
    Error::Conflict("cannot disable, demote or delete the last enabled admin".into())
}

/// Ends all of a user's sessions (their refresh-token families, and with them every
/// token of those sessions).
pub(crate) fn revoke_user_families(conn: &Connection, user: &str, now: i64) -> Result<()> {
    conn.execute(
        "UPDATE refresh_families SET revoked_at_ms = ?2
         WHERE user_name = ?1 AND revoked_at_ms IS NULL",
        params![user, now],
    )?;
    Ok(())
}
