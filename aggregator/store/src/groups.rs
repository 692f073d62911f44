//! Groups and their members.

use async_trait::async_trait;
use rusqlite::{OptionalExtension, Row, Transaction, TransactionBehavior, params};

use kcloud_core::Error;
use kcloud_core::group::Group;
use kcloud_core::repo::{GroupPatch, GroupRepo};

use crate::{Store, get_json, get_u64, to_i64, to_json};

fn row(r: &Row<'_>) -> rusqlite::Result<Group> {
    Ok(Group {
        name: r.get(0)?,
        description: r.get(1)?,
        quota: get_json(r, 2)?,
        entitlements: get_json(r, 3)?,
        members: Vec::new(),
        created_at_ms: get_u64(r, 4)?,
    })
}

const COLUMNS: &str = "name, description, quota, entitlements, created_at_ms";

fn with_members(conn: &rusqlite::Connection, mut g: Group) -> rusqlite::Result<Group> {
    let mut stmt = conn.prepare_cached(
        "SELECT user_name FROM group_members WHERE group_name = ?1 ORDER BY user_name",
    )?;
    g.members = stmt
        .query_map([&g.name], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    Ok(g)
}

fn add_members(tx: &Transaction<'_>, group: &str, users: &[String]) -> kcloud_core::Result<()> {
    for u in users {
        let exists: bool = tx
            .query_row("SELECT 1 FROM users WHERE name = ?1", [u], |_| Ok(true))
            .optional()
            .map_err(|e| Error::Store(e.to_string()))?
            .unwrap_or(false);
        if !exists {
            return Err(Error::NotFound(format!("members: no user {u:?}")));
        }
        tx.execute(
            "INSERT INTO group_members (group_name, user_name) VALUES (?1, ?2)
             ON CONFLICT DO NOTHING",
            params![group, u],
        )
        .map_err(|e| Error::Store(e.to_string()))?;
    }
    Ok(())
}

#[async_trait]
impl GroupRepo for Store {
    async fn create_group(&self, g: Group) -> kcloud_core::Result<()> {
        let quota = to_json(&g.quota)?;
        let entitlements = to_json(&g.entitlements)?;
        self.call(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let inserted = tx.execute(
                &format!(
                    "INSERT INTO groups ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5)
                     ON CONFLICT(name) DO NOTHING"
                ),
                params![
                    g.name,
                    g.description,
                    quota,
                    entitlements,
                    to_i64(g.created_at_ms)?
                ],
            )?;
            if inserted == 0 {
                return Err(Error::Conflict(format!("group {:?} exists", g.name)).into());
            }
            add_members(&tx, &g.name, &g.members)?;
            tx.commit()?;
            Ok(())
        })
        .await
    }

    async fn group(&self, name: &str) -> kcloud_core::Result<Option<Group>> {
        let name = name.to_owned();
        self.call(move |conn| {
            let g = conn
                .prepare_cached(&format!("SELECT {COLUMNS} FROM groups WHERE name = ?1"))?
                .query_row([name], row)
                .optional()?;
            Ok(g.map(|g| with_members(conn, g)).transpose()?)
        })
        .await
    }

    async fn groups(&self) -> kcloud_core::Result<Vec<Group>> {
        self.call(|conn| {
            let list: Vec<Group> = conn
                .prepare_cached(&format!("SELECT {COLUMNS} FROM groups ORDER BY name"))?
                .query_map([], row)?
                .collect::<rusqlite::Result<_>>()?;
            Ok(list
                .into_iter()
                .map(|g| with_members(conn, g))
                .collect::<rusqlite::Result<_>>()?)
        })
        .await
    }

    async fn groups_of(&self, user: &str) -> kcloud_core::Result<Vec<Group>> {
        let user = user.to_owned();
        self.call(move |conn| {
            let list: Vec<Group> = conn
                .prepare_cached(
                    "SELECT g.name, g.description, g.quota, g.entitlements, g.created_at_ms
                     FROM groups g JOIN group_members m ON m.group_name = g.name
                     WHERE m.user_name = ?1 ORDER BY g.name",
                )?
                .query_map([user], row)?
                .collect::<rusqlite::Result<_>>()?;
            Ok(list
                .into_iter()
                .map(|g| with_members(conn, g))
                .collect::<rusqlite::Result<_>>()?)
        })
        .await
    }

    async fn update_group(
        &self,
        name: &str,
        patch: GroupPatch,
    ) -> kcloud_core::Result<Option<Group>> {
        let name = name.to_owned();
        let quota = patch.quota.as_ref().map(to_json).transpose()?;
        let entitlements = patch.entitlements.as_ref().map(to_json).transpose()?;
        self.call(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let exists = tx
                .query_row("SELECT 1 FROM groups WHERE name = ?1", [&name], |_| Ok(()))
                .optional()?
                .is_some();
            if !exists {
                return Ok(None);
            }
            if let Some(d) = &patch.description {
                tx.execute(
                    "UPDATE groups SET description = ?2 WHERE name = ?1",
                    params![name, d],
                )?;
            }
            if let Some(q) = &quota {
                tx.execute(
                    "UPDATE groups SET quota = ?2 WHERE name = ?1",
                    params![name, q],
                )?;
            }
            if let Some(e) = &entitlements {
                tx.execute(
                    "UPDATE groups SET entitlements = ?2 WHERE name = ?1",
                    params![name, e],
                )?;
            }
            add_members(&tx, &name, &patch.add_members)?;
            for u in &patch.remove_members {
                tx.execute(
                    "DELETE FROM group_members WHERE group_name = ?1 AND user_name = ?2",
                    params![name, u],
                )?;
            }
            let g = tx
                .prepare_cached(&format!("SELECT {COLUMNS} FROM groups WHERE name = ?1"))?
                .query_row([&name], row)?;
            let g = with_members(&tx, g)?;
            tx.commit()?;
            Ok(Some(g))
        })
        .await
    }

    async fn delete_group(&self, name: &str) -> kcloud_core::Result<bool> {
        let name = name.to_owned();
        self.call(move |conn| Ok(conn.execute("DELETE FROM groups WHERE name = ?1", [name])? > 0))
            .await
    }
}
