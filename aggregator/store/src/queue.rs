//! The wait queue and the fair-share scores that order it.

use async_trait::async_trait;
use rusqlite::{OptionalExtension, Row, TransactionBehavior, params};

use kcloud_core::Error;
use kcloud_core::queue::{QueueEntry, UsageScore};
use kcloud_core::repo::QueueRepo;

use crate::{Store, get_json, get_u64, to_i64};

#[async_trait]
impl QueueRepo for Store {
    async fn insert_queued(&self, e: QueueEntry) -> kcloud_core::Result<()> {
        let request = e.request.to_string();
        self.call(move |conn| {
            let inserted = conn.execute(
                "INSERT INTO queue (id, owner, name, request, enqueued_at_ms, deadline_ms, created_by)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT(owner, name) DO NOTHING",
                params![
                    e.id,
                    e.owner,
                    e.name,
                    request,
                    to_i64(e.enqueued_at_ms)?,
                    to_i64(e.deadline_ms)?,
                    e.created_by
                ],
            )?;
            if inserted == 0 {
                return Err(Error::Conflict(format!(
                    "server name {:?} is already waiting in the queue",
                    e.name
                ))
                .into());
            }
            Ok(())
        })
        .await
    }

    async fn delete_queued(&self, id: &str) -> kcloud_core::Result<bool> {
        let id = id.to_owned();
        self.call(move |conn| Ok(conn.execute("DELETE FROM queue WHERE id = ?1", [id])? > 0))
            .await
    }

    async fn queued(&self) -> kcloud_core::Result<Vec<QueueEntry>> {
        self.call(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT id, owner, name, request, enqueued_at_ms, deadline_ms, created_by
                 FROM queue ORDER BY enqueued_at_ms, id",
            )?;
            let rows = stmt.query_map([], row)?;
            Ok(rows.collect::<rusqlite::Result<_>>()?)
        })
        .await
    }

    async fn add_usage(
        &self,
        user: &str,
        gpu_hours: f64,
        now_ms: u64,
        half_life_ms: u64,
    ) -> kcloud_core::Result<()> {
        let user = user.to_owned();
        self.call(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let old = tx
                .query_row(
                    "SELECT gpu_hours, at_ms FROM usage_scores WHERE user_name = ?1",
                    [&user],
                    |r| {
                        Ok(UsageScore {
                            gpu_hours: r.get(0)?,
                            at_ms: get_u64(r, 1)?,
                        })
                    },
                )
                .optional()?
                .unwrap_or(UsageScore {
                    gpu_hours: 0.0,
                    at_ms: now_ms,
                });
            let new = old.add(gpu_hours, now_ms, half_life_ms);
            tx.execute(
                "INSERT INTO usage_scores (user_name, gpu_hours, at_ms) VALUES (?1, ?2, ?3)
                 ON CONFLICT(user_name) DO UPDATE SET gpu_hours = ?2, at_ms = ?3",
                params![user, new.gpu_hours, to_i64(new.at_ms)?],
            )?;
            tx.commit()?;
            Ok(())
        })
        .await
    }

    async fn usage_scores(&self) -> kcloud_core::Result<Vec<(String, UsageScore)>> {
        self.call(|conn| {
            let mut stmt =
                conn.prepare_cached("SELECT user_name, gpu_hours, at_ms FROM usage_scores")?;
            let rows = stmt.query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    UsageScore {
                        gpu_hours: r.get(1)?,
                        at_ms: get_u64(r, 2)?,
                    },
                ))
            })?;
            Ok(rows.collect::<rusqlite::Result<_>>()?)
        })
        .await
    }
}

fn row(r: &Row<'_>) -> rusqlite::Result<QueueEntry> {
    Ok(QueueEntry {
        id: r.get(0)?,
        owner: r.get(1)?,
        name: r.get(2)?,
        request: get_json(r, 3)?,
        enqueued_at_ms: get_u64(r, 4)?,
        deadline_ms: get_u64(r, 5)?,
        created_by: r.get(6)?,
    })
}
