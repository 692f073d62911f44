//! The usage ledger: open intervals and GPU-hours per UTC day.

use std::collections::BTreeMap;

use async_trait::async_trait;
use rusqlite::{OptionalExtension, TransactionBehavior, params};

use kcloud_core::repo::UsageRepo;
use kcloud_core::usage::{
    Efficiency, GroupBy, UsageInterval, UsageRow, UsageTotal, day_name, split_days,
};

use crate::{Store, get_u64, to_i64};

/// Adds GPU-hours to a day: the detail row and the three roll-ups.
pub(crate) fn add_day(
    tx: &rusqlite::Transaction<'_>,
    day: i64,
    [user, model, profile, node]: [&String; 4],
    gpu_hours: f64,
    recovered: bool,
) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "INSERT INTO usage_daily (day, user_name, model, profile, node, gpu_hours, recovered)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
         ON CONFLICT(day, user_name, model, profile, node) DO UPDATE SET
             gpu_hours = gpu_hours + excluded.gpu_hours,
             recovered = MAX(recovered, excluded.recovered)",
    )?
    .execute(params![
        day, user, model, profile, node, gpu_hours, recovered
    ])?;
    for (table, col, key) in [
        ("usage_by_user", "user_name", user),
        ("usage_by_model", "model", model),
        ("usage_by_node", "node", node),
    ] {
        tx.prepare_cached(&format!(
            "INSERT INTO {table} (day, {col}, gpu_hours, recovered) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT(day, {col}) DO UPDATE SET
                 gpu_hours = gpu_hours + excluded.gpu_hours,
                 recovered = MAX(recovered, excluded.recovered)"
        ))?
        .execute(params![day, key, gpu_hours, recovered])?;
    }
    tx.prepare_cached(
        "INSERT INTO usage_totals (user_name, model, profile, gpu_hours) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT(user_name, model, profile) DO UPDATE SET gpu_hours = gpu_hours + excluded.gpu_hours",
    )?
    .execute(params![user, model, profile, gpu_hours])?;
    Ok(())
}

#[async_trait]
impl UsageRepo for Store {
    async fn open_usage(&self, intervals: Vec<UsageInterval>) -> kcloud_core::Result<()> {
        self.call(move |conn| {
            let tx = conn.transaction()?;
            {
                let mut stmt = tx.prepare_cached(
                    "INSERT INTO usage_open (server_id, device, user_name, server, kind, model,
                         profile, node, weight, start_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
                     ON CONFLICT(server_id, device) DO NOTHING",
                )?;
                for i in &intervals {
                    stmt.execute(params![
                        i.server_id,
                        i.device,
                        i.user,
                        i.server,
                        i.kind,
                        i.model,
                        i.profile,
                        i.node,
                        i.weight,
                        to_i64(i.start_ms)?
                    ])?;
                }
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }

    async fn close_usage(
        &self,
        server_id: &str,
        end_ms: u64,
        recovered: bool,
    ) -> kcloud_core::Result<usize> {
        let server_id = server_id.to_owned();
        self.call(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let rows: Vec<(String, String, String, String, f64, u64)> = {
                let mut stmt = tx.prepare_cached(
                    "SELECT user_name, model, profile, node, weight, start_ms
                     FROM usage_open WHERE server_id = ?1",
                )?;
                let rows = stmt.query_map([&server_id], |r| {
                    Ok((
                        r.get(0)?,
                        r.get(1)?,
                        r.get(2)?,
                        r.get(3)?,
                        r.get(4)?,
                        get_u64(r, 5)?,
                    ))
                })?;
                rows.collect::<rusqlite::Result<_>>()?
            };
            for (user, model, profile, node, weight, start) in &rows {
                for (day, ms) in split_days(*start, end_ms.max(*start)) {
                    add_day(
                        &tx,
                        to_i64(day)?,
                        [user, model, profile, node],
                        weight * ms as f64 / 3.6e6,
                        recovered,
                    )?;
                }
            }
            tx.execute("DELETE FROM usage_open WHERE server_id = ?1", [&server_id])?;
            tx.commit()?;
            Ok(rows.len())
        })
        .await
    }

    async fn usage_totals(&self, now_ms: u64) -> kcloud_core::Result<Vec<UsageTotal>> {
        self.call(move |conn| {
            let mut out: BTreeMap<(String, String, String), f64> = BTreeMap::new();
            let mut stmt = conn
                .prepare_cached("SELECT user_name, model, profile, gpu_hours FROM usage_totals")?;
            let rows = stmt.query_map([], |r| {
                Ok(((r.get(0)?, r.get(1)?, r.get(2)?), r.get::<_, f64>(3)?))
            })?;
            for r in rows {
                let (k, h) = r?;
                *out.entry(k).or_default() += h;
            }
            let mut stmt = conn.prepare_cached(
                "SELECT user_name, model, profile, weight, start_ms FROM usage_open",
            )?;
            let rows = stmt.query_map([], |r| {
                Ok((
                    (r.get(0)?, r.get(1)?, r.get(2)?),
                    r.get::<_, f64>(3)?,
                    get_u64(r, 4)?,
                ))
            })?;
            for r in rows {
                let (k, w, start) = r?;
                *out.entry(k).or_default() += w * now_ms.saturating_sub(start) as f64 / 3.6e6;
            }
            Ok(out
                .into_iter()
                .map(|((user, model, profile), gpu_hours)| UsageTotal {
                    user,
                    model,
                    profile,
                    gpu_hours,
                })
                .collect())
        })
        .await
    }

    async fn open_usage_servers(&self) -> kcloud_core::Result<Vec<String>> {
        self.call(|conn| {
            let mut stmt = conn.prepare_cached("SELECT DISTINCT server_id FROM usage_open")?;
            let rows = stmt.query_map([], |r| r.get(0))?;
            Ok(rows.collect::<rusqlite::Result<_>>()?)
        })
        .await
    }

    async fn mark_alive(&self, at_ms: u64) -> kcloud_core::Result<()> {
        self.call(move |conn| {
            conn.execute(
                "INSERT INTO alive (id, at_ms) VALUES (1, ?1)
                 ON CONFLICT(id) DO UPDATE SET at_ms = MAX(at_ms, ?1)",
                [to_i64(at_ms)?],
            )?;
            Ok(())
        })
        .await
    }

    async fn last_alive(&self) -> kcloud_core::Result<Option<u64>> {
        self.call(|conn| {
            Ok(conn
                .query_row("SELECT at_ms FROM alive WHERE id = 1", [], |r| {
                    get_u64(r, 0)
                })
                .optional()?)
        })
        .await
    }

    async fn usage(
        &self,
        from_day: u64,
        to_day: u64,
        group_by: GroupBy,
        user: Option<String>,
        now_ms: u64,
    ) -> kcloud_core::Result<Vec<UsageRow>> {
        let col = group_by.column();
        self.call(move |conn| {
            let mut out: BTreeMap<String, (f64, bool)> = BTreeMap::new();
            let key = |v: rusqlite::types::Value| match v {
                rusqlite::types::Value::Integer(d) => day_name(d.max(0) as u64),
                rusqlite::types::Value::Text(t) => t,
                _ => String::new(),
            };
            // Closed days: one range over the day's roll-up for the grouping (a
            // user's own: the detail table, by its user index).
            let table = match (&user, group_by) {
                (Some(_), _) => "usage_daily",
                (None, GroupBy::User | GroupBy::Day) => "usage_by_user",
                (None, GroupBy::Model) => "usage_by_model",
                (None, GroupBy::Node) => "usage_by_node",
            };
            let filter = if user.is_some() {
                "user_name = ?3"
            } else {
                "?3 IS NULL"
            };
            let sql = format!(
                "SELECT {col}, SUM(gpu_hours), MAX(recovered) FROM {table}
                 WHERE day >= ?1 AND day < ?2 AND {filter}
                 GROUP BY {col}"
            );
            let mut stmt = conn.prepare_cached(&sql)?;
            let rows = stmt.query_map(params![to_i64(from_day)?, to_i64(to_day)?, user], |r| {
                Ok((
                    r.get::<_, rusqlite::types::Value>(0)?,
                    r.get::<_, f64>(1)?,
                    r.get::<_, bool>(2)?,
                ))
            })?;
            for r in rows {
                let (k, h, rec) = r?;
                let e = out.entry(key(k)).or_default();
                e.0 += h;
                e.1 |= rec;
            }
            // Open intervals, up to now.
            let mut stmt = conn.prepare_cached(
                "SELECT user_name, model, node, weight, start_ms FROM usage_open
                 WHERE (?1 IS NULL OR user_name = ?1)",
            )?;
            let rows = stmt.query_map(params![user], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, f64>(3)?,
                    get_u64(r, 4)?,
                ))
            })?;
            for r in rows {
                let (u, model, node, weight, start) = r?;
                for (day, ms) in split_days(start, now_ms.max(start)) {
                    if day < from_day || day >= to_day {
                        continue;
                    }
                    let k = match group_by {
                        GroupBy::User => u.clone(),
                        GroupBy::Model => model.clone(),
                        GroupBy::Node => node.clone(),
                        GroupBy::Day => day_name(day),
                    };
                    out.entry(k).or_default().0 += weight * ms as f64 / 3.6e6;
                }
            }
            Ok(out
                .into_iter()
                .map(|(key, (gpu_hours, recovered))| UsageRow {
                    key,
                    gpu_hours,
                    recovered,
                })
                .collect())
        })
        .await
    }

    async fn add_efficiency(
        &self,
        day: u64,
        by_user: Vec<(String, Efficiency)>,
    ) -> kcloud_core::Result<()> {
        self.call(move |conn| {
            let tx = conn.transaction()?;
            {
                let mut stmt = tx.prepare_cached(
                    "INSERT INTO usage_efficiency (day, user_name, measured_gpu_hours,
                         used_gpu_hours, idle_gpu_hours, reclaimed_gpu_hours, reclaimed_servers)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                     ON CONFLICT(day, user_name) DO UPDATE SET
                         measured_gpu_hours = measured_gpu_hours + excluded.measured_gpu_hours,
                         used_gpu_hours = used_gpu_hours + excluded.used_gpu_hours,
                         idle_gpu_hours = idle_gpu_hours + excluded.idle_gpu_hours,
                         reclaimed_gpu_hours = reclaimed_gpu_hours + excluded.reclaimed_gpu_hours,
                         reclaimed_servers = reclaimed_servers + excluded.reclaimed_servers",
                )?;
                for (user, e) in &by_user {
                    stmt.execute(params![
                        to_i64(day)?,
                        user,
                        e.measured_gpu_hours,
                        e.used_gpu_hours,
                        e.idle_gpu_hours,
                        e.reclaimed_gpu_hours,
                        to_i64(e.reclaimed_servers)?
                    ])?;
                }
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }

    async fn efficiency(
        &self,
        from_day: u64,
        to_day: u64,
        user: Option<String>,
    ) -> kcloud_core::Result<Vec<(String, Efficiency)>> {
        self.call(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT user_name, SUM(measured_gpu_hours), SUM(used_gpu_hours),
                        SUM(idle_gpu_hours), SUM(reclaimed_gpu_hours), SUM(reclaimed_servers)
                 FROM usage_efficiency
                 WHERE day >= ?1 AND day < ?2 AND (?3 IS NULL OR user_name = ?3)
                 GROUP BY user_name",
            )?;
            let rows = stmt.query_map(params![to_i64(from_day)?, to_i64(to_day)?, user], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    Efficiency {
                        measured_gpu_hours: r.get(1)?,
                        used_gpu_hours: r.get(2)?,
                        idle_gpu_hours: r.get(3)?,
                        reclaimed_gpu_hours: r.get(4)?,
                        reclaimed_servers: get_u64(r, 5)?,
                    },
                ))
            })?;
            Ok(rows.collect::<rusqlite::Result<_>>()?)
        })
        .await
    }
}
