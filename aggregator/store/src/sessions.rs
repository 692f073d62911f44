//! Refresh tokens in rotation families.

use std::sync::Arc;

use async_trait::async_trait;
use rusqlite::{OptionalExtension, Transaction, TransactionBehavior, params};

use kcloud_core::Error;
use kcloud_core::repo::SessionRepo;
use kcloud_core::user::{RefreshRow, RefreshUse, UserRecord};

use crate::users::{USER_SELECT, revoke_user_families, user_from_row};
use crate::{Result, Store, now_ms, to_i64};

/// Expired refresh tokens are kept this long past expiry before they are pruned, so
/// that a rotation in flight never sees its family vanish under it.
pub(crate) const REFRESH_PRUNE_GRACE_MS: u64 = 60 * 60 * 1000;

#[async_trait]
impl SessionRepo for Store {
    async fn session_user(
        &self,
        name: &str,
        family: &str,
    ) -> kcloud_core::Result<Option<UserRecord>> {
        let key = (name.to_owned(), family.to_owned());
        if let Some(user) = self.inner.live_session(&key) {
            return Ok(Some(user));
        }
        let inner = Arc::clone(&self.inner);
        self.call(move |conn| {
            let mut stmt = conn.prepare_cached(&format!(
                "{USER_SELECT} WHERE name = ?1 AND EXISTS (SELECT 1 FROM refresh_families f
                 WHERE f.id = ?2 AND f.user_name = ?1 AND f.revoked_at_ms IS NULL)"
            ))?;
            let found = stmt
                .query_row(params![key.0, key.1], user_from_row)
                .optional()?;
            if let Some(user) = &found {
                inner.remember_session(key, conn.total_changes(), user.clone());
            }
            Ok(found)
        })
        .await
    }

    /// Records an issued refresh token, creating its family on first use. Refused
    /// (`Unauthorized`) when the family is revoked or belongs to another user, so that
    /// a rotation racing a revocation cannot resurrect the family. Also prunes tokens
    /// long expired.
    async fn insert_refresh(&self, t: RefreshRow) -> kcloud_core::Result<()> {
        self.call(move |conn| {
            let now = to_i64(t.issued_at_ms)?;
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            prune_refresh(&tx, t.issued_at_ms)?;
            let user_exists: bool = tx.query_row(
                "SELECT EXISTS (SELECT 1 FROM users WHERE name = ?1)",
                params![t.user],
                |r| r.get(0),
            )?;
            if !user_exists {
                return Err(Error::Unauthorized("unknown user".into()).into());
            }
            tx.execute(
                "INSERT INTO refresh_families (id, user_name, created_at_ms)
                 VALUES (?1, ?2, ?3) ON CONFLICT(id) DO NOTHING",
                params![t.family, t.user, now],
            )?;
            let (owner, revoked): (String, Option<i64>) = tx.query_row(
                "SELECT user_name, revoked_at_ms FROM refresh_families WHERE id = ?1",
                params![t.family],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?;
            if owner != t.user || revoked.is_some() {
                return Err(Error::Unauthorized("session revoked".into()).into());
            }
            tx.execute(
                "INSERT INTO refresh_tokens (id, family, issued_at_ms, expires_at_ms)
                 VALUES (?1, ?2, ?3, ?4)",
                params![t.id, t.family, now, to_i64(t.expires_at_ms)?],
            )?;
            tx.commit()?;
            Ok(())
        })
        .await
    }

    /// Atomically checks a refresh token and marks it used.
    async fn consume_refresh(&self, id: &str, now_ms: u64) -> kcloud_core::Result<RefreshUse> {
        let id = id.to_owned();
        self.call(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let row = tx
                .query_row(
                    "SELECT f.user_name, t.family, t.expires_at_ms,
                            t.used_at_ms IS NOT NULL OR f.revoked_at_ms IS NOT NULL
                     FROM refresh_tokens t JOIN refresh_families f ON f.id = t.family
                     WHERE t.id = ?1",
                    params![id],
                    |r| {
                        Ok((
                            r.get::<_, String>(0)?,
                            r.get::<_, String>(1)?,
                            r.get::<_, i64>(2)?,
                            r.get::<_, bool>(3)?,
                        ))
                    },
                )
                .optional()?;
            let Some((user, family, expires, spent)) = row else {
                return Ok(RefreshUse::Invalid);
            };
            // Reuse is checked before expiry: a replayed old token is a theft signal
            // even when it has expired, and its family may still hold a live token.
            if spent {
                return Ok(RefreshUse::Reused { family });
            }
            let now = to_i64(now_ms)?;
            if expires <= now {
                return Ok(RefreshUse::Invalid);
            }
            tx.execute(
                "UPDATE refresh_tokens SET used_at_ms = ?2 WHERE id = ?1",
                params![id, now],
            )?;
            tx.commit()?;
            Ok(RefreshUse::Valid { user, family })
        })
        .await
    }

    /// Revokes every token of a family (idempotent).
    async fn revoke_family(&self, family: &str) -> kcloud_core::Result<()> {
        let family = family.to_owned();
        self.call(move |conn| {
            conn.execute(
                "UPDATE refresh_families SET revoked_at_ms = ?2
                 WHERE id = ?1 AND revoked_at_ms IS NULL",
                params![family, to_i64(now_ms())?],
            )?;
            Ok(())
        })
        .await
    }

    /// Revokes all of a user's refresh tokens (idempotent).
    async fn revoke_user_tokens(&self, user: &str) -> kcloud_core::Result<()> {
        let user = user.to_owned();
        self.call(move |conn| revoke_user_families(conn, &user, to_i64(now_ms())?))
            .await
    }
}

fn prune_refresh(tx: &Transaction<'_>, now_ms: u64) -> Result<()> {
    let cutoff = to_i64(now_ms.saturating_sub(REFRESH_PRUNE_GRACE_MS))?;
    tx.execute(
        "DELETE FROM refresh_tokens WHERE expires_at_ms < ?1",
        params![cutoff],
    )?;
    tx.execute(
        "DELETE FROM refresh_families WHERE created_at_ms < ?1
         AND NOT EXISTS (SELECT 1 FROM refresh_tokens t WHERE t.family = refresh_families.id)",
        params![cutoff],
    )?;
    Ok(())
}
