//! Reservations of devices for future windows.

use async_trait::async_trait;
use rusqlite::{Row, params};

use kcloud_core::repo::ReservationRepo;
use kcloud_core::reservation::Reservation;

use crate::{Store, get_json, get_u64, to_i64, to_json};

#[async_trait]
impl ReservationRepo for Store {
    async fn insert_reservation(&self, r: Reservation) -> kcloud_core::Result<()> {
        let devices = to_json(&r.devices)?;
        self.call(move |conn| {
            conn.execute(
                "INSERT INTO reservations (id, owner, node, devices, start_ms, end_ms, note,
                     maintenance, created_at_ms, created_by, used)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
                params![
                    r.id,
                    r.owner,
                    r.node,
                    devices,
                    to_i64(r.start_ms)?,
                    to_i64(r.end_ms)?,
                    r.note,
                    r.maintenance,
                    to_i64(r.created_at_ms)?,
                    r.created_by,
                    r.used
                ],
            )?;
            Ok(())
        })
        .await
    }

    async fn delete_reservation(&self, id: &str) -> kcloud_core::Result<bool> {
        let id = id.to_owned();
        self.call(move |conn| Ok(conn.execute("DELETE FROM reservations WHERE id = ?1", [id])? > 0))
            .await
    }

    async fn mark_reservation_used(&self, id: &str) -> kcloud_core::Result<()> {
        let id = id.to_owned();
        self.call(move |conn| {
            conn.execute("UPDATE reservations SET used = 1 WHERE id = ?1", [id])?;
            Ok(())
        })
        .await
    }

    async fn reservations(&self) -> kcloud_core::Result<Vec<Reservation>> {
        self.call(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT id, owner, node, devices, start_ms, end_ms, note, maintenance,
                        created_at_ms, created_by, used
                 FROM reservations ORDER BY start_ms, id",
            )?;
            let rows = stmt.query_map([], row)?;
            Ok(rows.collect::<rusqlite::Result<_>>()?)
        })
        .await
    }
}

fn row(r: &Row<'_>) -> rusqlite::Result<Reservation> {
    Ok(Reservation {
        id: r.get(0)?,
        owner: r.get(1)?,
        node: r.get(2)?,
        devices: get_json(r, 3)?,
        start_ms: get_u64(r, 4)?,
        end_ms: get_u64(r, 5)?,
        note: r.get(6)?,
        maintenance: r.get(7)?,
        created_at_ms: get_u64(r, 8)?,
        created_by: r.get(9)?,
        used: r.get(10)?,
    })
}
