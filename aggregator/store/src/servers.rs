//! The local shape's servers and their lifecycle events.

use async_trait::async_trait;
use rusqlite::{OptionalExtension, Row, TransactionBehavior, params};

use kcloud_core::Error;
use kcloud_core::repo::{ServerRecord, ServerRepo};
use kcloud_core::server::{Server, ServerEvent, ServerStatus};

use crate::{Store, clip, get_json, get_opt_u64, get_u64, to_i64, to_json};

/// Events kept per server; older ones are dropped as new ones come.
pub(crate) const SERVER_EVENTS_MAX: i64 = 200;

#[async_trait]
impl ServerRepo for Store {
    /// Records a new server; an owner's name already taken is `Conflict`.
    async fn insert_server(&self, row: ServerRecord) -> kcloud_core::Result<()> {
        self.call(move |conn| {
            let inserted = conn.execute(
                &format!(
                    "INSERT INTO servers ({SERVER_COLUMNS}) VALUES
                     (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18,
                      ?19, ?20)
                     ON CONFLICT(owner, name) DO NOTHING"
                ),
                params![
                    row.server.id,
                    row.server.owner,
                    row.server.name,
                    row.server.status.as_str(),
                    row.server.reason,
                    row.server.node,
                    to_json(&row.server.devices)?,
                    to_i64(row.server.cpu_millis)?,
                    to_i64(row.server.memory_bytes)?,
                    row.server.image,
                    to_json(&row.server.launch)?,
                    row.port,
                    row.server.pid,
                    row.pid_start.map(to_i64).transpose()?,
                    row.token,
                    to_i64(row.server.created_at_ms)?,
                    row.server.ready_at_ms.map(to_i64).transpose()?,
                    to_i64(row.server.last_activity_ms)?,
                    row.server.cull_exempt,
                    to_json(&row.server.mounts)?,
                ],
            )?;
            if inserted == 0 {
                return Err(Error::Conflict(format!(
                    "server name {:?} is already in use",
                    row.server.name
                )).into());
            }
            Ok(())
        })
        .await
    }

    /// Writes a server's changing fields (status, reason, process, times); a server
    /// that is gone is ignored.
    async fn save_server(&self, row: ServerRecord) -> kcloud_core::Result<()> {
        self.call(move |conn| {
            conn.execute(
                "UPDATE servers SET status = ?2, reason = ?3, port = ?4, pid = ?5,
                    pid_start = ?6, ready_at_ms = ?7, last_activity_ms = ?8, cull_exempt = ?9
                 WHERE id = ?1",
                params![
                    row.server.id,
                    row.server.status.as_str(),
                    row.server.reason,
                    row.port,
                    row.server.pid,
                    row.pid_start.map(to_i64).transpose()?,
                    row.server.ready_at_ms.map(to_i64).transpose()?,
                    to_i64(row.server.last_activity_ms)?,
                    row.server.cull_exempt,
                ],
            )?;
            Ok(())
        })
        .await
    }

    /// Sets servers' last activity, never moving it backwards.
    async fn touch_servers(&self, seen: Vec<(String, u64)>) -> kcloud_core::Result<()> {
        self.call(move |conn| {
            let tx = conn.transaction()?;
            for (id, at_ms) in &seen {
                tx.execute(
                    "UPDATE servers SET last_activity_ms = MAX(last_activity_ms, ?2) WHERE id = ?1",
                    params![id, to_i64(*at_ms)?],
                )?;
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }

    /// Forgets a server and its events; `false` if it was not there.
    async fn delete_server(&self, id: &str) -> kcloud_core::Result<bool> {
        let id = id.to_owned();
        self.call(move |conn| {
            Ok(conn.execute("DELETE FROM servers WHERE id = ?1", params![id])? > 0)
        })
        .await
    }

    /// Every recorded server, by owner and name.
    async fn servers(&self) -> kcloud_core::Result<Vec<ServerRecord>> {
        self.call(|conn| {
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT {SERVER_COLUMNS} FROM servers ORDER BY owner, name"
            ))?;
            let rows = stmt.query_map([], server_from_row)?;
            Ok(rows.collect::<rusqlite::Result<_>>()?)
        })
        .await
    }

    /// Appends a lifecycle event to a server (ignored if the server is gone); keeps the
    /// newest 200 per server.
    async fn server_event(&self, server_id: &str, event: ServerEvent) -> kcloud_core::Result<()> {
        let id = server_id.to_owned();
        self.call(move |conn| {
            let tx = conn.transaction()?;
            tx.execute(
                "INSERT INTO server_events (server_id, at_ms, kind, message)
                 SELECT ?1, ?2, ?3, ?4 WHERE EXISTS (SELECT 1 FROM servers WHERE id = ?1)",
                params![
                    id,
                    to_i64(event.at_ms)?,
                    clip(&event.kind),
                    clip(&event.message)
                ],
            )?;
            tx.execute(
                "DELETE FROM server_events WHERE server_id = ?1 AND id <= (
                    SELECT id FROM server_events WHERE server_id = ?1
                    ORDER BY id DESC LIMIT 1 OFFSET ?2)",
                params![id, SERVER_EVENTS_MAX],
            )?;
            tx.commit()?;
            Ok(())
        })
        .await
    }

    /// A server's events, oldest first.
    async fn server_events(&self, server_id: &str) -> kcloud_core::Result<Vec<ServerEvent>> {
        let id = server_id.to_owned();
        self.call(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT at_ms, kind, message FROM server_events WHERE server_id = ?1 ORDER BY id",
            )?;
            let rows = stmt.query_map(params![id], |r| {
                Ok(ServerEvent {
                    at_ms: get_u64(r, 0)?,
                    kind: r.get(1)?,
                    message: r.get(2)?,
                })
            })?;
            Ok(rows.collect::<rusqlite::Result<_>>()?)
        })
        .await
    }

    async fn local_uid(&self, user: &str, first: u32, last: u32) -> kcloud_core::Result<u32> {
        let user = user.to_owned();
        self.call(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let known: Option<u32> = tx
                .query_row(
                    "SELECT uid FROM local_uids WHERE user_name = ?1",
                    params![user],
                    |r| r.get(0),
                )
                .optional()?;
            if let Some(uid) = known {
                return Ok(uid);
            }
            let highest: Option<u32> = tx.query_row(
                "SELECT MAX(uid) FROM local_uids WHERE uid BETWEEN ?1 AND ?2",
                params![first, last],
                |r| r.get(0),
            )?;
            let uid = match highest {
                None => first,
                Some(h) if h < last => h + 1,
                Some(_) => {
                    return Err(Error::Unavailable(format!(
                        "every uid of [local] uid_range [{first}, {last}] is taken; widen it"
                    ))
                    .into());
                }
            };
            tx.execute(
                "INSERT INTO local_uids (user_name, uid) VALUES (?1, ?2)",
                params![user, uid],
            )?;
            tx.commit()?;
            Ok(uid)
        })
        .await
    }
}

const SERVER_COLUMNS: &str = "id, owner, name, status, reason, node, devices, cpu_millis, \
    memory_bytes, image, launch, port, pid, pid_start, token, created_at_ms, ready_at_ms, \
    last_activity_ms, cull_exempt, mounts";

fn server_from_row(r: &Row<'_>) -> rusqlite::Result<ServerRecord> {
    let bad = |i: usize, e: String| {
        rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, e.into())
    };
    let status: String = r.get(3)?;
    Ok(ServerRecord {
        server: Server {
            id: r.get(0)?,
            owner: r.get(1)?,
            name: r.get(2)?,
            status: ServerStatus::parse(&status)
                .ok_or_else(|| bad(3, format!("unknown server status {status:?}")))?,
            reason: r.get(4)?,
            node: r.get(5)?,
            devices: get_json(r, 6)?,
            cpu_millis: get_u64(r, 7)?,
            memory_bytes: get_u64(r, 8)?,
            image: r.get(9)?,
            launch: get_json(r, 10)?,
            pid: r.get(12)?,
            created_at_ms: get_u64(r, 15)?,
            ready_at_ms: get_opt_u64(r, 16)?,
            last_activity_ms: get_u64(r, 17)?,
            cull_exempt: r.get(18)?,
            mounts: get_json(r, 19)?,
            upstream: None,
        },
        port: r.get(11)?,
        pid_start: get_opt_u64(r, 13)?,
        token: r.get(14)?,
    })
}
