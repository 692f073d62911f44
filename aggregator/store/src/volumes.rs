//! Users' volumes, within their storage quota.

use async_trait::async_trait;
use rusqlite::{OptionalExtension, Row, TransactionBehavior, params};

use kcloud_core::Error;
use kcloud_core::repo::VolumeRepo;
use kcloud_core::volume::{AccessMode, VolumeRow};

use crate::{Store, get_u64, to_i64};

#[async_trait]
impl VolumeRepo for Store {
    /// Records a volume if the owner's volumes, this one included, stay within
    /// `max_total_bytes` (checked in the same transaction, so two creates cannot both
    /// squeeze in). A name in use is `Conflict`, an exceeded quota `QuotaExceeded`.
    async fn insert_volume(
        &self,
        row: VolumeRow,
        max_total_bytes: Option<u64>,
    ) -> kcloud_core::Result<()> {
        self.call(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let used: i64 = tx.query_row(
                "SELECT COALESCE(SUM(size_bytes), 0) FROM volumes WHERE owner = ?1",
                params![row.owner],
                |r| r.get(0),
            )?;
            let used = u64::try_from(used).unwrap_or(0);
            if let Some(max) = max_total_bytes
                && used.saturating_add(row.size_bytes) > max
            {
                return Err(Error::QuotaExceeded(format!(
                    "storage quota exceeded: {} has volumes of {used} of {max} bytes and asked for {}",
                    row.owner, row.size_bytes
                )).into());
            }
            let inserted = tx.execute(
                "INSERT INTO volumes (owner, name, size_bytes, access_mode, created_at_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT(owner, name) DO NOTHING",
                params![
                    row.owner,
                    row.name,
                    to_i64(row.size_bytes)?,
                    row.access_mode.as_str(),
                    to_i64(row.created_at_ms)?
                ],
            )?;
            if inserted == 0 {
                return Err(Error::Conflict(format!(
                    "volume name {:?} is already in use",
                    row.name
                )).into());
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }

    /// One owner's volumes (everyone's with `None`), by owner and name.
    async fn volumes(&self, owner: Option<&str>) -> kcloud_core::Result<Vec<VolumeRow>> {
        let owner = owner.map(str::to_owned);
        self.call(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT owner, name, size_bytes, access_mode, created_at_ms FROM volumes
                 WHERE ?1 IS NULL OR owner = ?1 ORDER BY owner, name",
            )?;
            let rows = stmt.query_map(params![owner], volume_from_row)?;
            Ok(rows.collect::<rusqlite::Result<_>>()?)
        })
        .await
    }

    async fn volume(&self, owner: &str, name: &str) -> kcloud_core::Result<Option<VolumeRow>> {
        let (owner, name) = (owner.to_owned(), name.to_owned());
        self.call(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT owner, name, size_bytes, access_mode, created_at_ms FROM volumes
                 WHERE owner = ?1 AND name = ?2",
            )?;
            Ok(stmt
                .query_row(params![owner, name], volume_from_row)
                .optional()?)
        })
        .await
    }

    /// Forgets a volume; `false` if it was not there.
    async fn delete_volume(&self, owner: &str, name: &str) -> kcloud_core::Result<bool> {
        let (owner, name) = (owner.to_owned(), name.to_owned());
        self.call(move |conn| {
            Ok(conn.execute(
                "DELETE FROM volumes WHERE owner = ?1 AND name = ?2",
                params![owner, name],
            )? > 0)
        })
        .await
    }
}

fn volume_from_row(r: &Row<'_>) -> rusqlite::Result<VolumeRow> {
    let mode: String = r.get(3)?;
    Ok(VolumeRow {
        owner: r.get(0)?,
        name: r.get(1)?,
        size_bytes: get_u64(r, 2)?,
        access_mode: AccessMode::parse(&mode).ok_or_else(|| {
            rusqlite::Error::FromSqlConversionFailure(
                3,
                rusqlite::types::Type::Text,
                format!("unknown access mode {mode:?}").into(),
            )
        })?,
        created_at_ms: get_u64(r, 4)?,
    })
}
