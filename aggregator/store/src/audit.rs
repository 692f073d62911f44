//! The audit log.

use async_trait::async_trait;
use rusqlite::params;

use kcloud_core::repo::AuditRepo;
use kcloud_core::user::AuditEntry;

use crate::{Store, clip, get_u64, to_i64};

#[async_trait]
impl AuditRepo for Store {
    /// Appends to the audit log. Long fields are cut to 1024 bytes.
    async fn audit(&self, e: AuditEntry) -> kcloud_core::Result<()> {
        self.call(move |conn| {
            conn.execute(
                "INSERT INTO audit_log (at_ms, actor, action, target, detail, client)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    to_i64(e.at_ms)?,
                    clip(&e.actor),
                    clip(&e.action),
                    clip(&e.target),
                    clip(&e.detail),
                    clip(&e.client)
                ],
            )?;
            Ok(())
        })
        .await
    }

    /// The newest `limit` audit entries, newest first.
    async fn audit_log(&self, limit: u32) -> kcloud_core::Result<Vec<AuditEntry>> {
        self.call(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT at_ms, actor, action, target, detail, client FROM audit_log
                 ORDER BY id DESC LIMIT ?1",
            )?;
            let rows = stmt.query_map(params![limit], |r| {
                Ok(AuditEntry {
                    at_ms: get_u64(r, 0)?,
                    actor: r.get(1)?,
                    action: r.get(2)?,
                    target: r.get(3)?,
                    detail: r.get(4)?,
                    client: r.get(5)?,
                })
            })?;
            Ok(rows.collect::<rusqlite::Result<_>>()?)
        })
        .await
    }
}
