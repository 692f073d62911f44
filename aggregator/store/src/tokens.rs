//! Personal API tokens (their hashes; the secrets are never stored).

use async_trait::async_trait;
use rusqlite::{OptionalExtension, Row, TransactionBehavior, params};

use kcloud_core::Error;
use kcloud_core::repo::TokenRepo;
use kcloud_core::token::{ApiTokenRecord, scopes_from_string, scopes_to_string};

use crate::{Store, get_u64, to_i64};

const COLUMNS: &str =
    "id, user_name, name, scopes, hash, created_at_ms, expires_at_ms, last_used_ms";

fn row(r: &Row<'_>) -> rusqlite::Result<ApiTokenRecord> {
    Ok(ApiTokenRecord {
        id: r.get(0)?,
        user: r.get(1)?,
        name: r.get(2)?,
        scopes: scopes_from_string(&r.get::<_, String>(3)?),
        hash: r.get(4)?,
        created_at_ms: get_u64(r, 5)?,
        expires_at_ms: get_u64(r, 6)?,
        last_used_ms: r
            .get::<_, Option<i64>>(7)?
            .map(|v| u64::try_from(v).unwrap_or(0)),
    })
}

#[async_trait]
impl TokenRepo for Store {
    async fn insert_token(&self, t: ApiTokenRecord, max_per_user: u32) -> kcloud_core::Result<()> {
        self.call(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let live: u32 = tx.query_row(
                "SELECT COUNT(*) FROM api_tokens WHERE user_name = ?1 AND expires_at_ms > ?2",
                params![t.user, to_i64(t.created_at_ms)?],
                |r| r.get(0),
            )?;
            if live >= max_per_user {
                return Err(Error::QuotaExceeded(format!(
                    "at most {max_per_user} personal tokens per user: revoke one first"
                ))
                .into());
            }
            let inserted = tx.execute(
                &format!(
                    "INSERT INTO api_tokens ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, NULL)
                     ON CONFLICT(user_name, name) DO NOTHING"
                ),
                params![
                    t.id,
                    t.user,
                    t.name,
                    scopes_to_string(&t.scopes),
                    t.hash,
                    to_i64(t.created_at_ms)?,
                    to_i64(t.expires_at_ms)?
                ],
            )?;
            if inserted == 0 {
                return Err(Error::Conflict(format!(
                    "you already have a token named {:?}",
                    t.name
                ))
                .into());
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }

    async fn token(&self, id: &str) -> kcloud_core::Result<Option<ApiTokenRecord>> {
        let id = id.to_owned();
        self.call(move |conn| {
            Ok(conn
                .prepare_cached(&format!("SELECT {COLUMNS} FROM api_tokens WHERE id = ?1"))?
                .query_row([id], row)
                .optional()?)
        })
        .await
    }

    async fn tokens(&self, user: Option<String>) -> kcloud_core::Result<Vec<ApiTokenRecord>> {
        self.call(move |conn| {
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT {COLUMNS} FROM api_tokens WHERE (?1 IS NULL OR user_name = ?1)
                 ORDER BY created_at_ms DESC, id"
            ))?;
            let rows = stmt.query_map([user], row)?;
            Ok(rows.collect::<rusqlite::Result<_>>()?)
        })
        .await
    }

    async fn delete_token(&self, id: &str) -> kcloud_core::Result<bool> {
        let id = id.to_owned();
        self.call(move |conn| Ok(conn.execute("DELETE FROM api_tokens WHERE id = ?1", [id])? > 0))
            .await
    }

    async fn touch_token(&self, id: &str, at_ms: u64) -> kcloud_core::Result<()> {
        let id = id.to_owned();
        self.call(move |conn| {
            conn.execute(
                "UPDATE api_tokens SET last_used_ms = ?2 WHERE id = ?1",
                params![id, to_i64(at_ms)?],
            )?;
            Ok(())
        })
        .await
    }
}
