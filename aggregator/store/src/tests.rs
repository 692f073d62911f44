//! The store against real SQLite files in temporary directories.

use super::*;
use kcloud_core::launch::Launch;
use kcloud_core::repo::{AuditRepo, ServerRecord, ServerRepo, SessionRepo, UserRepo, VolumeRepo};
use kcloud_core::server::{Mount, Server, ServerEvent, ServerStatus};
use rusqlite::params;

use crate::servers::SERVER_EVENTS_MAX;
use crate::sessions::REFRESH_PRUNE_GRACE_MS;
use kcloud_core::user::{AuditEntry, NewUser, Quota, RefreshRow, RefreshUse, Role, UserPatch};
use kcloud_core::volume::{AccessMode, VolumeRow};

fn new_user(name: &str, role: Role) -> NewUser {
    NewUser {
        name: name.into(),
        password_hash: "$argon2id$fake".into(),
        role,
        quota: Quota::default(),
    }
}

fn open_temp() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("kcloud.db")).unwrap();
    (dir, store)
}

fn refresh(id: &str, family: &str, user: &str, expires_at_ms: u64) -> RefreshRow {
    RefreshRow {
        id: id.into(),
        family: family.into(),
        user: user.into(),
        issued_at_ms: 1_000,
        expires_at_ms,
    }
}

#[tokio::test]
async fn open_creates_with_wal_and_private_mode() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sub/kcloud.db");
    let store = Store::open(&path).unwrap();
    assert!(path.exists());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "mode {mode:o}");
    }
    let (mode, sync, fk): (String, i64, i64) = store
        .call(|c| {
            Ok((
                c.pragma_query_value(None, "journal_mode", |r| r.get(0))?,
                c.pragma_query_value(None, "synchronous", |r| r.get(0))?,
                c.pragma_query_value(None, "foreign_keys", |r| r.get(0))?,
            ))
        })
        .await
        .unwrap();
    assert_eq!(mode, "wal");
    assert_eq!(sync, 2, "synchronous=FULL");
    assert_eq!(fk, 1);
    store.close().await.unwrap();
    // Reopening an up-to-date database is a no-op migration.
    Store::open(&path).unwrap();
}

#[tokio::test]
async fn user_crud() {
    let (_dir, store) = open_temp();
    let quota = Quota {
        gpus: Some(2),
        memory_bytes: Some(u64::from(u32::MAX) * 4),
        ..Quota::default()
    };
    let created = store
        .create_user(NewUser {
            quota: quota.clone(),
            ..new_user("alice", Role::User)
        })
        .await
        .unwrap();
    assert_eq!(created.name, "alice");
    assert_eq!(created.role, Role::User);
    assert!(!created.disabled);
    assert_eq!(created.quota, quota);

    let rec = store.user("alice").await.unwrap().unwrap();
    assert_eq!(rec.user, created);
    assert_eq!(rec.password_hash, "$argon2id$fake");
    assert!(!format!("{rec:?}").contains("argon2id"));
    assert!(store.user("bob").await.unwrap().is_none());

    store
        .create_user(new_user("bob", Role::Admin))
        .await
        .unwrap();
    let names: Vec<_> = store
        .users()
        .await
        .unwrap()
        .into_iter()
        .map(|u| u.name)
        .collect();
    assert_eq!(names, ["alice", "bob"]);

    let patched = store
        .update_user(
            "alice",
            UserPatch {
                role: Some(Role::Admin),
                disabled: Some(true),
                quota: Some(Quota::default()),
                password_hash: Some("$argon2id$new".into()),
            },
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(patched.role, Role::Admin);
    assert!(patched.disabled);
    assert_eq!(patched.quota, Quota::default());
    assert_eq!(patched.created_at_ms, created.created_at_ms);
    let rec = store.user("alice").await.unwrap().unwrap();
    assert_eq!(rec.password_hash, "$argon2id$new");
    assert!(
        store
            .update_user("nobody", UserPatch::default())
            .await
            .unwrap()
            .is_none()
    );

    assert!(store.delete_user("alice").await.unwrap());
    assert!(!store.delete_user("alice").await.unwrap());
    assert!(store.user("alice").await.unwrap().is_none());
}

#[tokio::test]
async fn duplicate_and_invalid_names() {
    let (_dir, store) = open_temp();
    store
        .create_user(new_user("alice", Role::User))
        .await
        .unwrap();
    let err = store
        .create_user(new_user("alice", Role::Admin))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Conflict(_)), "{err:?}");
    // The first one is untouched.
    assert_eq!(
        store.user("alice").await.unwrap().unwrap().user.role,
        Role::User
    );
    let err = store
        .create_user(new_user("Alice", Role::User))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::BadRequest(_)), "{err:?}");
    let err = store
        .create_user(NewUser {
            quota: Quota {
                memory_bytes: Some(u64::MAX),
                ..Quota::default()
            },
            ..new_user("carol", Role::User)
        })
        .await
        .unwrap_err();
    assert!(matches!(err, Error::BadRequest(_)), "{err:?}");
}

#[tokio::test]
async fn last_enabled_admin_is_kept() {
    let (_dir, store) = open_temp();
    store
        .create_user(new_user("root", Role::Admin))
        .await
        .unwrap();
    store
        .create_user(new_user("alice", Role::User))
        .await
        .unwrap();
    assert_eq!(store.admin_count().await.unwrap(), 1);
    for patch in [
        UserPatch {
            disabled: Some(true),
            ..UserPatch::default()
        },
        UserPatch {
            role: Some(Role::User),
            ..UserPatch::default()
        },
    ] {
        let err = store.update_user("root", patch).await.unwrap_err();
        assert!(matches!(err, Error::Conflict(_)), "{err:?}");
    }
    let err = store.delete_user("root").await.unwrap_err();
    assert!(matches!(err, Error::Conflict(_)), "{err:?}");
    // Nothing was changed by the refused calls.
    let root = store.user("root").await.unwrap().unwrap().user;
    assert_eq!((root.role, root.disabled), (Role::Admin, false));

    // With a second admin, the first may go.
    store
        .update_user(
            "alice",
            UserPatch {
                role: Some(Role::Admin),
                ..UserPatch::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(store.admin_count().await.unwrap(), 2);
    assert!(store.delete_user("root").await.unwrap());
    assert_eq!(store.admin_count().await.unwrap(), 1);
}

#[tokio::test]
async fn writes_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kcloud.db");
    let store = Store::open(&path).unwrap();
    store
        .create_user(new_user("alice", Role::Admin))
        .await
        .unwrap();
    store
        .audit(AuditEntry {
            at_ms: 5,
            actor: "alice".into(),
            action: "login".into(),
            target: String::new(),
            detail: String::new(),
            client: "127.0.0.1".into(),
        })
        .await
        .unwrap();
    // Dropped without close: the committed writes must still be there.
    drop(store);
    let store = Store::open(&path).unwrap();
    assert!(store.user("alice").await.unwrap().is_some());
    assert_eq!(store.audit_log(10).await.unwrap().len(), 1);

    store.clone().close().await.unwrap();
    let err = store.users().await.unwrap_err();
    assert!(
        matches!(err, Error::Store(ref m) if m.contains("closed")),
        "{err:?}"
    );
    // After close the WAL is checkpointed into the main file.
    let wal = dir.path().join("kcloud.db-wal");
    assert!(!wal.exists() || std::fs::metadata(&wal).unwrap().len() == 0);
    let store = Store::open(&path).unwrap();
    assert!(store.user("alice").await.unwrap().is_some());
}

#[test]
fn newer_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kcloud.db");
    drop(Store::open(&path).unwrap());
    let conn = Connection::open(&path).unwrap();
    conn.pragma_update(None, "user_version", SCHEMA_VERSION + 7)
        .unwrap();
    drop(conn);
    let err = Store::open(&path).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::Store(_)), "{err:?}");
    assert!(
        msg.contains(&format!(
            "schema version {} is newer than this kcloud-aggregator ({SCHEMA_VERSION})",
            SCHEMA_VERSION + 7
        )),
        "{msg}"
    );
    assert!(msg.contains("upgrade kcloud"), "{msg}");
}

#[test]
fn garbage_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kcloud.db");
    let garbage: Vec<u8> = (0..8192u32).map(|i| (i * 7919 % 251) as u8).collect();
    std::fs::write(&path, &garbage).unwrap();
    let err = Store::open(&path).unwrap_err();
    assert!(matches!(err, Error::Store(_)), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains(&path.display().to_string()), "{msg}");
    assert!(msg.contains("not a usable kcloud database"), "{msg}");
    // The file was not touched.
    assert_eq!(std::fs::read(&path).unwrap(), garbage);
}

#[test]
fn corrupt_database_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kcloud.db");
    let conn = Connection::open(&path).unwrap();
    conn.execute_batch(
        "PRAGMA journal_mode=DELETE; CREATE TABLE t (x TEXT);
         CREATE INDEX t_x ON t(x);",
    )
    .unwrap();
    for i in 0..2000 {
        conn.execute("INSERT INTO t VALUES (?1)", params![format!("row {i:05}")])
            .unwrap();
    }
    drop(conn);
    // Keep the valid header, scribble over the pages after it.
    let mut bytes = std::fs::read(&path).unwrap();
    for b in bytes.iter_mut().skip(4096 + 100).step_by(3) {
        *b = 0xa5;
    }
    std::fs::write(&path, &bytes).unwrap();
    let err = Store::open(&path).unwrap_err();
    assert!(matches!(err, Error::Store(_)), "{err:?}");
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );
}

#[tokio::test]
async fn refresh_consume_reuse_expiry() {
    let (_dir, store) = open_temp();
    store
        .create_user(new_user("alice", Role::User))
        .await
        .unwrap();
    store
        .insert_refresh(refresh("t1", "f1", "alice", 10_000))
        .await
        .unwrap();
    assert_eq!(
        store.consume_refresh("t1", 2_000).await.unwrap(),
        RefreshUse::Valid {
            user: "alice".into(),
            family: "f1".into()
        }
    );
    // Second use of the same token.
    assert_eq!(
        store.consume_refresh("t1", 2_001).await.unwrap(),
        RefreshUse::Reused {
            family: "f1".into()
        }
    );
    assert_eq!(
        store.consume_refresh("nope", 2_000).await.unwrap(),
        RefreshUse::Invalid
    );
    // Expired.
    store
        .insert_refresh(refresh("t2", "f1", "alice", 10_000))
        .await
        .unwrap();
    assert_eq!(
        store.consume_refresh("t2", 10_000).await.unwrap(),
        RefreshUse::Invalid
    );
    // Revoked family: every token in it reads as reused, and it cannot grow.
    store
        .insert_refresh(refresh("t3", "f1", "alice", 10_000))
        .await
        .unwrap();
    store.revoke_family("f1").await.unwrap();
    store.revoke_family("f1").await.unwrap();
    assert_eq!(
        store.consume_refresh("t3", 2_000).await.unwrap(),
        RefreshUse::Reused {
            family: "f1".into()
        }
    );
    let err = store
        .insert_refresh(refresh("t4", "f1", "alice", 10_000))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Unauthorized(_)), "{err:?}");
    // A family cannot be taken over by another user.
    store
        .create_user(new_user("bob", Role::User))
        .await
        .unwrap();
    store
        .insert_refresh(refresh("b1", "fb", "bob", 10_000))
        .await
        .unwrap();
    let err = store
        .insert_refresh(refresh("a9", "fb", "alice", 10_000))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Unauthorized(_)), "{err:?}");
    // Unknown users get no tokens.
    let err = store
        .insert_refresh(refresh("x1", "fx", "nobody", 10_000))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Unauthorized(_)), "{err:?}");
}

#[tokio::test]
async fn user_revocation_and_delete_cascade() {
    let (_dir, store) = open_temp();
    store
        .create_user(new_user("alice", Role::User))
        .await
        .unwrap();
    store
        .insert_refresh(refresh("a1", "fa", "alice", 10_000))
        .await
        .unwrap();
    store
        .insert_refresh(refresh("a2", "fb", "alice", 10_000))
        .await
        .unwrap();
    store.revoke_user_tokens("alice").await.unwrap();
    for (id, fam) in [("a1", "fa"), ("a2", "fb")] {
        assert_eq!(
            store.consume_refresh(id, 2_000).await.unwrap(),
            RefreshUse::Reused { family: fam.into() }
        );
    }

    // Setting a password or disabling revokes too.
    store
        .insert_refresh(refresh("a3", "fc", "alice", 10_000))
        .await
        .unwrap();
    store
        .update_user(
            "alice",
            UserPatch {
                password_hash: Some("$argon2id$other".into()),
                ..UserPatch::default()
            },
        )
        .await
        .unwrap();
    assert!(matches!(
        store.consume_refresh("a3", 2_000).await.unwrap(),
        RefreshUse::Reused { .. }
    ));
    store
        .insert_refresh(refresh("a4", "fd", "alice", 10_000))
        .await
        .unwrap();
    store
        .update_user(
            "alice",
            UserPatch {
                quota: Some(Quota::default()),
                ..UserPatch::default()
            },
        )
        .await
        .unwrap();
    // A quota change does not log the user out.
    store
        .insert_refresh(refresh("a5", "fd", "alice", 10_000))
        .await
        .unwrap();
    assert!(matches!(
        store.consume_refresh("a4", 2_000).await.unwrap(),
        RefreshUse::Valid { .. }
    ));

    assert!(store.delete_user("alice").await.unwrap());
    assert_eq!(
        store.consume_refresh("a5", 2_000).await.unwrap(),
        RefreshUse::Invalid
    );
    let left: i64 = store
        .call(|c| {
            Ok(c.query_row(
                "SELECT (SELECT COUNT(*) FROM refresh_tokens)
                      + (SELECT COUNT(*) FROM refresh_families)",
                [],
                |r| r.get(0),
            )?)
        })
        .await
        .unwrap();
    assert_eq!(left, 0);
}

#[tokio::test]
async fn expired_tokens_are_pruned() {
    let (_dir, store) = open_temp();
    store
        .create_user(new_user("alice", Role::User))
        .await
        .unwrap();
    store
        .insert_refresh(refresh("old", "f-old", "alice", 2_000))
        .await
        .unwrap();
    let later = 2_000 + REFRESH_PRUNE_GRACE_MS + 1;
    store
        .insert_refresh(RefreshRow {
            issued_at_ms: later,
            expires_at_ms: later + 1_000,
            ..refresh("new", "f-new", "alice", 0)
        })
        .await
        .unwrap();
    let ids: Vec<String> = store
        .call(|c| {
            let mut s = c.prepare("SELECT id FROM refresh_families ORDER BY id")?;
            let rows = s.query_map([], |r| r.get(0))?;
            Ok(rows.collect::<rusqlite::Result<_>>()?)
        })
        .await
        .unwrap();
    assert_eq!(ids, ["f-new"]);
}

#[tokio::test]
async fn audit_newest_first_and_clipped() {
    let (_dir, store) = open_temp();
    for (i, action) in ["login", "user_create", "logout"].iter().enumerate() {
        store
            .audit(AuditEntry {
                // Same timestamp for two entries: order is by insertion.
                at_ms: 100 + (i as u64 / 2),
                actor: "alice".into(),
                action: (*action).into(),
                target: "bob".into(),
                detail: "x".repeat(5000),
                client: String::new(),
            })
            .await
            .unwrap();
    }
    let log = store.audit_log(10).await.unwrap();
    let actions: Vec<_> = log.iter().map(|e| e.action.as_str()).collect();
    assert_eq!(actions, ["logout", "user_create", "login"]);
    assert_eq!(log[0].detail.len(), AUDIT_FIELD_MAX);
    assert_eq!(log[2].at_ms, 100);
    assert_eq!(store.audit_log(1).await.unwrap().len(), 1);
}

fn server_row(id: &str, name: &str) -> ServerRecord {
    ServerRecord {
        server: Server {
            id: id.into(),
            owner: "alice".into(),
            name: name.into(),
            status: ServerStatus::Pending,
            reason: Some("starting".into()),
            node: Some("node-1".into()),
            devices: vec!["MIG-a".into(), "MIG-b".into()],
            cpu_millis: 2000,
            memory_bytes: 8 << 30,
            image: Some("quay.io/jupyter/scipy-notebook:latest".into()),
            launch: Launch {
                command: None,
                args: vec!["--debug".into()],
                env: [("A".to_owned(), "1".to_owned())].into(),
                profile: Some(kcloud_core::launch::RunProfile::legacy(false)),
            },
            pid: None,
            created_at_ms: 10,
            ready_at_ms: None,
            last_activity_ms: 10,
            cull_exempt: false,
            mounts: vec![Mount {
                source: kcloud_core::server::MountSource::Volume {
                    name: "data".into(),
                    local_path: Some("/srv/data".into()),
                },
                mount_path: "/home/jovyan/work".into(),
                read_only: false,
            }],
            upstream: None,
        },
        port: Some(40000),
        pid_start: None,
        token: "secret-token".into(),
    }
}

#[tokio::test]
async fn servers_round_trip_with_events() {
    let (_dir, store) = open_temp();
    let row = server_row("id-1", "lab");
    store.insert_server(row.clone()).await.unwrap();
    assert!(!format!("{row:?}").contains("secret-token"));
    let err = store
        .insert_server(server_row("id-2", "lab"))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Conflict(_)), "{err:?}");
    assert_eq!(store.servers().await.unwrap(), std::slice::from_ref(&row));

    let saved = ServerRecord {
        server: Server {
            status: ServerStatus::Running,
            reason: None,
            pid: Some(4242),
            ready_at_ms: Some(20),
            last_activity_ms: 20,
            cull_exempt: true,
            ..row.server.clone()
        },
        pid_start: Some(99),
        ..row.clone()
    };
    store.save_server(saved.clone()).await.unwrap();
    store
        .touch_servers(vec![("id-1".into(), 30), ("gone".into(), 5)])
        .await
        .unwrap();
    store
        .touch_servers(vec![("id-1".into(), 25)])
        .await
        .unwrap();
    let back = store.servers().await.unwrap().remove(0);
    assert_eq!(
        back,
        ServerRecord {
            server: Server {
                last_activity_ms: 30,
                ..saved.server.clone()
            },
            ..saved
        }
    );

    for i in 0..(SERVER_EVENTS_MAX + 5) {
        store
            .server_event(
                "id-1",
                ServerEvent {
                    at_ms: i as u64,
                    kind: "Tick".into(),
                    message: format!("{i}"),
                },
            )
            .await
            .unwrap();
    }
    let events = store.server_events("id-1").await.unwrap();
    assert_eq!(events.len() as i64, SERVER_EVENTS_MAX, "oldest dropped");
    assert_eq!(events[0].message, "5");
    // Events of a server that is gone are ignored, and deleting cascades.
    store
        .server_event(
            "gone",
            ServerEvent {
                at_ms: 1,
                kind: "X".into(),
                message: String::new(),
            },
        )
        .await
        .unwrap();
    assert!(store.delete_server("id-1").await.unwrap());
    assert!(!store.delete_server("id-1").await.unwrap());
    assert!(store.server_events("id-1").await.unwrap().is_empty());
    assert!(store.servers().await.unwrap().is_empty());
    // The name is free again.
    store
        .insert_server(server_row("id-3", "lab"))
        .await
        .unwrap();
}

#[tokio::test]
async fn volumes_round_trip_within_the_quota() {
    let (_dir, store) = open_temp();
    let vol = |owner: &str, name: &str, size_bytes| VolumeRow {
        owner: owner.into(),
        name: name.into(),
        size_bytes,
        access_mode: AccessMode::ReadWriteOnce,
        created_at_ms: 5,
    };
    store
        .insert_volume(vol("a", "x", 60), Some(100))
        .await
        .unwrap();
    assert!(matches!(
        store.insert_volume(vol("a", "y", 41), Some(100)).await,
        Err(Error::QuotaExceeded(_))
    ));
    assert!(matches!(
        store.insert_volume(vol("a", "x", 1), None).await,
        Err(Error::Conflict(_))
    ));
    store
        .insert_volume(vol("a", "y", 40), Some(100))
        .await
        .unwrap();
    store
        .insert_volume(vol("b", "x", 100), Some(100))
        .await
        .unwrap();
    assert_eq!(store.volumes(Some("a")).await.unwrap().len(), 2);
    assert_eq!(store.volumes(None).await.unwrap().len(), 3);
    assert_eq!(
        store.volume("b", "x").await.unwrap(),
        Some(vol("b", "x", 100))
    );
    assert!(store.delete_volume("a", "x").await.unwrap());
    assert!(!store.delete_volume("a", "x").await.unwrap());
    assert_eq!(store.volume("a", "x").await.unwrap(), None);
}

#[tokio::test]
async fn concurrent_consumers_get_one_valid() {
    let (_dir, store) = open_temp();
    store
        .create_user(new_user("alice", Role::User))
        .await
        .unwrap();
    store
        .insert_refresh(refresh("t", "f", "alice", 10_000))
        .await
        .unwrap();
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let s = store.clone();
            tokio::spawn(async move { s.consume_refresh("t", 2_000).await.unwrap() })
        })
        .collect();
    let mut valid = 0;
    for t in tasks {
        if matches!(t.await.unwrap(), RefreshUse::Valid { .. }) {
            valid += 1;
        }
    }
    assert_eq!(valid, 1);
}

#[tokio::test]
async fn local_uids_are_allocated_once_and_never_reused() {
    let (dir, store) = open_temp();
    let a = store.local_uid("alice", 200_000, 200_002).await.unwrap();
    let b = store.local_uid("bob", 200_000, 200_002).await.unwrap();
    assert_eq!((a, b), (200_000, 200_001));
    assert_eq!(
        store.local_uid("alice", 200_000, 200_002).await.unwrap(),
        a,
        "stable"
    );
    // Kept across a restart, and after the user is gone: the next user gets a new one.
    store
        .create_user(new_user("carol", Role::User))
        .await
        .unwrap();
    store.delete_user("carol").await.unwrap();
    store.close().await.unwrap();
    let store = Store::open(&dir.path().join("kcloud.db")).unwrap();
    assert_eq!(store.local_uid("bob", 200_000, 200_002).await.unwrap(), b);
    assert_eq!(
        store.local_uid("carol", 200_000, 200_002).await.unwrap(),
        200_002
    );
    let err = store.local_uid("dave", 200_000, 200_002).await.unwrap_err();
    assert!(matches!(err, kcloud_core::Error::Unavailable(_)), "{err:?}");
    assert!(err.to_string().contains("uid_range"), "{err}");
}

/// The usage ledger against a model: random servers open and close intervals on
/// devices of different weights (whole GPUs, MIG slices), across day boundaries and
/// reopenings of the database; what the reports sum, per user and per day, equals the
/// time each device was held times its weight.
#[tokio::test]
async fn usage_sums_equal_the_time_devices_were_held() {
    use kcloud_core::repo::UsageRepo;
    use kcloud_core::usage::{DAY_MS, GroupBy, UsageInterval, day_of};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use std::collections::HashMap;

    for seed in 0..8u64 {
        let (dir, mut store) = open_temp();
        let mut rng = StdRng::seed_from_u64(seed);
        let t0 = 20_000 * DAY_MS + 23 * 3_600_000; // an hour before a midnight
        let mut now = t0;
        // server id -> (user, weight × devices, start)
        let mut open: HashMap<String, (String, f64, u64)> = HashMap::new();
        let mut want: HashMap<String, f64> = HashMap::new();
        for step in 0..60 {
            now += rng.random_range(1..4 * 3_600_000u64);
            match rng.random_range(0..4) {
                0 | 1 => {
                    let id = format!("s{seed}-{step}");
                    let user = format!("u{}", rng.random_range(0..3));
                    let weights = [1.0, 3.0 / 7.0, 1.0 / 7.0];
                    let n = rng.random_range(1..3);
                    let intervals: Vec<UsageInterval> = (0..n)
                        .map(|d| UsageInterval {
                            server_id: id.clone(),
                            user: user.clone(),
                            server: id.clone(),
                            device: format!("GPU-{step}-{d}"),
                            kind: "gpu".into(),
                            model: "A100".into(),
                            profile: String::new(),
                            node: "n1".into(),
                            weight: weights[(step + d) % 3],
                            start_ms: now,
                        })
                        .collect();
                    let w: f64 = intervals.iter().map(|i| i.weight).sum();
                    store.open_usage(intervals).await.unwrap();
                    open.insert(id, (user, w, now));
                }
                2 => {
                    let Some(id) = open.keys().next().cloned() else {
                        continue;
                    };
                    let (user, w, start) = open.remove(&id).unwrap();
                    assert!(store.close_usage(&id, now, false).await.unwrap() > 0);
                    *want.entry(user).or_default() += w * (now - start) as f64 / 3.6e6;
                }
                _ => {
                    // The database is closed and opened again: nothing is lost.
                    store.close().await.unwrap();
                    store = Store::open(&dir.path().join("kcloud.db")).unwrap();
                }
            }
        }
        // Open intervals count up to `now`.
        for (user, w, start) in open.values() {
            *want.entry(user.clone()).or_default() += w * (now - start) as f64 / 3.6e6;
        }
        let (from, to) = (day_of(t0), day_of(now) + 1);
        let rows = store
            .usage(from, to, GroupBy::User, None, now)
            .await
            .unwrap();
        for (user, hours) in &want {
            let got = rows
                .iter()
                .find(|r| &r.key == user)
                .map_or(0.0, |r| r.gpu_hours);
            assert!(
                (got - hours).abs() < 1e-6,
                "seed {seed}: {user}: {got} vs {hours}"
            );
        }
        let by_day: f64 = store
            .usage(from, to, GroupBy::Day, None, now)
            .await
            .unwrap()
            .iter()
            .map(|r| r.gpu_hours)
            .sum();
        let total: f64 = want.values().sum();
        assert!(
            (by_day - total).abs() < 1e-6,
            "seed {seed}: by day {by_day} vs {total}"
        );
        // One user's own view is the same number.
        for (user, hours) in &want {
            let mine = store
                .usage(from, to, GroupBy::Day, Some(user.clone()), now)
                .await
                .unwrap();
            let got: f64 = mine.iter().map(|r| r.gpu_hours).sum();
            assert!((got - hours).abs() < 1e-6, "seed {seed}: {user}'s own view");
        }
    }
}

#[tokio::test]
async fn efficiency_adds_up_per_user_within_the_window() {
    use kcloud_core::repo::UsageRepo;
    use kcloud_core::usage::Efficiency;
    let (_dir, store) = open_temp();
    let e = |measured: f64, used: f64, reclaimed: u64| Efficiency {
        measured_gpu_hours: measured,
        used_gpu_hours: used,
        idle_gpu_hours: measured - used,
        reclaimed_gpu_hours: reclaimed as f64 * 0.5,
        reclaimed_servers: reclaimed,
    };
    store
        .add_efficiency(
            10,
            vec![("a".into(), e(1.0, 0.25, 0)), ("b".into(), e(2.0, 2.0, 1))],
        )
        .await
        .unwrap();
    store
        .add_efficiency(10, vec![("a".into(), e(1.0, 0.5, 1))])
        .await
        .unwrap();
    store
        .add_efficiency(12, vec![("a".into(), e(4.0, 0.0, 2))])
        .await
        .unwrap();
    let all = store.efficiency(10, 11, None).await.unwrap();
    assert_eq!(all.len(), 2);
    let a = &all.iter().find(|(u, _)| u == "a").unwrap().1;
    assert_eq!((a.measured_gpu_hours, a.used_gpu_hours), (2.0, 0.75));
    assert_eq!((a.reclaimed_servers, a.reclaimed_gpu_hours), (1, 0.5));
    let only_a = store.efficiency(10, 13, Some("a".into())).await.unwrap();
    assert_eq!(only_a.len(), 1);
    assert_eq!(only_a[0].1.measured_gpu_hours, 6.0);
    assert_eq!(only_a[0].1.reclaimed_servers, 3);
    assert!(store.efficiency(11, 12, None).await.unwrap().is_empty());
}

/// `session_user` answers from memory only while nothing was written since it read:
/// each kind of write that ends or changes a session is seen by the very next call.
#[tokio::test]
async fn remembered_sessions_follow_every_write() {
    let (_dir, store) = open_temp();
    for (name, role) in [
        ("root", Role::Admin),
        ("alice", Role::User),
        ("bob", Role::User),
    ] {
        store.create_user(new_user(name, role)).await.unwrap();
    }
    let live = |name: &'static str, family: &'static str| {
        let store = store.clone();
        async move { store.session_user(name, family).await.unwrap() }
    };
    let patch = |role, disabled| UserPatch {
        role,
        disabled,
        ..UserPatch::default()
    };
    for (id, fam, user) in [
        ("a1", "fa", "alice"),
        ("a2", "fb", "alice"),
        ("b1", "fx", "bob"),
    ] {
        store
            .insert_refresh(refresh(id, fam, user, 10_000))
            .await
            .unwrap();
    }
    // Remembered, and unchanged by an unrelated write (read again, still live).
    assert!(live("alice", "fa").await.is_some());
    assert!(live("alice", "fa").await.is_some());
    store
        .audit(AuditEntry {
            at_ms: 1,
            actor: "system".into(),
            action: "test".into(),
            target: String::new(),
            client: String::new(),
            detail: String::new(),
        })
        .await
        .unwrap();
    assert!(live("alice", "fa").await.is_some());
    // The wrong user for a family is never live, remembered or not.
    assert!(live("bob", "fa").await.is_none());

    // A revoked family: at once.
    store.revoke_family("fa").await.unwrap();
    assert!(live("alice", "fa").await.is_none());
    assert!(live("alice", "fb").await.is_some());

    // A role change ends the session; another change to the user shows at once.
    assert!(live("bob", "fx").await.is_some());
    let quota = Quota {
        gpus: Some(3),
        ..Quota::default()
    };
    store
        .update_user(
            "bob",
            UserPatch {
                quota: Some(quota),
                ..UserPatch::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(
        live("bob", "fx").await.and_then(|u| u.user.quota.gpus),
        Some(3)
    );
    store
        .update_user("bob", patch(Some(Role::Admin), None))
        .await
        .unwrap();
    assert!(live("bob", "fx").await.is_none());
    store
        .insert_refresh(refresh("b2", "fy", "bob", 10_000))
        .await
        .unwrap();
    assert!(live("bob", "fy").await.is_some());

    // Disabling revokes; so does deleting.
    assert!(live("alice", "fb").await.is_some());
    store
        .update_user("alice", patch(None, Some(true)))
        .await
        .unwrap();
    assert!(live("alice", "fb").await.is_none());
    assert!(live("bob", "fy").await.is_some());
    assert!(store.delete_user("bob").await.unwrap());
    assert!(live("bob", "fy").await.is_none());
}
