//! The schema, as append-only steps, and the migration that applies them.

use rusqlite::{Connection, TransactionBehavior};

use kcloud_core::Error;

use crate::{Result, check_version};

/// Schema steps; step `i` takes `user_version` from `i` to `i + 1`. Append only: never
/// edit a step that has shipped.
pub(crate) const MIGRATIONS: &[&str] = &[
    // 1: users, refresh-token families and tokens, audit log.
    r#"
    CREATE TABLE users (
        name               TEXT PRIMARY KEY NOT NULL,
        password_hash      TEXT NOT NULL,
        role               TEXT NOT NULL CHECK (role IN ('admin', 'user')),
        disabled           INTEGER NOT NULL DEFAULT 0 CHECK (disabled IN (0, 1)),
        quota_gpus         INTEGER CHECK (quota_gpus >= 0),
        quota_servers      INTEGER CHECK (quota_servers >= 0),
        quota_cpu_millis   INTEGER CHECK (quota_cpu_millis >= 0),
        quota_memory_bytes INTEGER CHECK (quota_memory_bytes >= 0),
        created_at_ms      INTEGER NOT NULL,
        updated_at_ms      INTEGER NOT NULL
    ) STRICT;

    CREATE TABLE refresh_families (
        id            TEXT PRIMARY KEY NOT NULL,
        user_name     TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
        created_at_ms INTEGER NOT NULL,
        revoked_at_ms INTEGER
    ) STRICT;
    CREATE INDEX refresh_families_user ON refresh_families(user_name);

    CREATE TABLE refresh_tokens (
        id            TEXT PRIMARY KEY NOT NULL,
        family        TEXT NOT NULL REFERENCES refresh_families(id) ON DELETE CASCADE,
        issued_at_ms  INTEGER NOT NULL,
        expires_at_ms INTEGER NOT NULL,
        used_at_ms    INTEGER
    ) STRICT;
    CREATE INDEX refresh_tokens_family ON refresh_tokens(family);
    CREATE INDEX refresh_tokens_expires ON refresh_tokens(expires_at_ms);

    CREATE TABLE audit_log (
        id     INTEGER PRIMARY KEY AUTOINCREMENT,
        at_ms  INTEGER NOT NULL,
        actor  TEXT NOT NULL,
        action TEXT NOT NULL,
        target TEXT NOT NULL DEFAULT '',
        detail TEXT NOT NULL DEFAULT '',
        client TEXT NOT NULL DEFAULT ''
    ) STRICT;
    CREATE INDEX audit_log_at ON audit_log(at_ms);
    "#,
    // 2: servers of the local provisioner and their lifecycle events. No foreign key to
    // users: a user's row must not vanish under a running process.
    r#"
    CREATE TABLE servers (
        id               TEXT PRIMARY KEY NOT NULL,
        owner            TEXT NOT NULL,
        name             TEXT NOT NULL,
        status           TEXT NOT NULL
                         CHECK (status IN ('pending', 'running', 'failed', 'stopping')),
        reason           TEXT,
        node             TEXT,
        devices          TEXT NOT NULL DEFAULT '[]',
        cpu_millis       INTEGER NOT NULL CHECK (cpu_millis >= 0),
        memory_bytes     INTEGER NOT NULL CHECK (memory_bytes >= 0),
        image            TEXT,
        launch           TEXT NOT NULL DEFAULT '{}',
        port             INTEGER CHECK (port BETWEEN 1 AND 65535),
        pid              INTEGER CHECK (pid > 0),
        pid_start        INTEGER,
        token            TEXT NOT NULL,
        created_at_ms    INTEGER NOT NULL,
        ready_at_ms      INTEGER,
        last_activity_ms INTEGER NOT NULL,
        UNIQUE (owner, name)
    ) STRICT;

    CREATE TABLE server_events (
        id        INTEGER PRIMARY KEY AUTOINCREMENT,
        server_id TEXT NOT NULL REFERENCES servers(id) ON DELETE CASCADE,
        at_ms     INTEGER NOT NULL,
        kind      TEXT NOT NULL,
        message   TEXT NOT NULL DEFAULT ''
    ) STRICT;
    CREATE INDEX server_events_server ON server_events(server_id, id);
    "#,
    // 3: servers an admin exempted from idle culling.
    r#"
    ALTER TABLE servers ADD COLUMN cull_exempt INTEGER NOT NULL DEFAULT 0
        CHECK (cull_exempt IN (0, 1));
    "#,
    // 4: storage: volumes, a per-user storage quota, and the mounts of servers. No
    // foreign key from volumes to users either: a volume's files outlive a user row
    // until an admin removes them.
    r#"
    ALTER TABLE users ADD COLUMN quota_storage_bytes INTEGER CHECK (quota_storage_bytes >= 0);
    ALTER TABLE servers ADD COLUMN mounts TEXT NOT NULL DEFAULT '[]';
    CREATE TABLE volumes (
        owner         TEXT NOT NULL,
        name          TEXT NOT NULL,
        size_bytes    INTEGER NOT NULL CHECK (size_bytes > 0),
        access_mode   TEXT NOT NULL CHECK (access_mode IN ('ReadWriteOnce', 'ReadWriteMany')),
        created_at_ms INTEGER NOT NULL,
        PRIMARY KEY (owner, name)
    ) STRICT;
    "#,
    // 5: the local sandbox's uid of each user, kept for good (also after the user is
    // deleted: a uid that owned files never passes to someone else).
    r#"
    CREATE TABLE local_uids (
        user_name TEXT PRIMARY KEY NOT NULL,
        uid       INTEGER NOT NULL UNIQUE CHECK (uid > 0)
    ) STRICT;
    "#,
    // 6: reservations of devices for future windows, the wait queue, and the decayed
    // GPU-hours that order it (fair share).
    r#"
    CREATE TABLE reservations (
        id            TEXT PRIMARY KEY NOT NULL,
        owner         TEXT NOT NULL,
        node          TEXT NOT NULL,
        devices       TEXT NOT NULL,
        start_ms      INTEGER NOT NULL,
        end_ms        INTEGER NOT NULL CHECK (end_ms > start_ms),
        note          TEXT NOT NULL,
        maintenance   INTEGER NOT NULL CHECK (maintenance IN (0, 1)),
        created_at_ms INTEGER NOT NULL,
        created_by    TEXT NOT NULL,
        used          INTEGER NOT NULL DEFAULT 0 CHECK (used IN (0, 1))
    ) STRICT;
    CREATE TABLE queue (
        id             TEXT PRIMARY KEY NOT NULL,
        owner          TEXT NOT NULL,
        name           TEXT NOT NULL,
        request        TEXT NOT NULL,
        enqueued_at_ms INTEGER NOT NULL,
        deadline_ms    INTEGER NOT NULL,
        created_by     TEXT NOT NULL,
        UNIQUE (owner, name)
    ) STRICT;
    CREATE TABLE usage_scores (
        user_name TEXT PRIMARY KEY NOT NULL,
        gpu_hours REAL NOT NULL CHECK (gpu_hours >= 0),
        at_ms     INTEGER NOT NULL
    ) STRICT;
    "#,
    // 7: the usage ledger: open intervals, and GPU-hours per UTC day and (user, model,
    // profile, node), what reports read. `alive` holds the last time the aggregator
    // was known running (intervals open at a crash are closed there).
    r#"
    CREATE TABLE usage_open (
        server_id TEXT NOT NULL,
        device    TEXT NOT NULL,
        user_name TEXT NOT NULL,
        server    TEXT NOT NULL,
        kind      TEXT NOT NULL,
        model     TEXT NOT NULL,
        profile   TEXT NOT NULL,
        node      TEXT NOT NULL,
        weight    REAL NOT NULL CHECK (weight >= 0),
        start_ms  INTEGER NOT NULL,
        PRIMARY KEY (server_id, device)
    ) STRICT;
    CREATE TABLE usage_daily (
        day       INTEGER NOT NULL,
        user_name TEXT NOT NULL,
        model     TEXT NOT NULL,
        profile   TEXT NOT NULL,
        node      TEXT NOT NULL,
        gpu_hours REAL NOT NULL CHECK (gpu_hours >= 0),
        recovered INTEGER NOT NULL DEFAULT 0 CHECK (recovered IN (0, 1)),
        PRIMARY KEY (day, user_name, model, profile, node)
    ) STRICT, WITHOUT ROWID;
    CREATE INDEX usage_daily_user ON usage_daily (user_name, day);
    -- Roll-ups per day and one dimension: a month grouped by user reads 30 × users
    -- rows, not every (user, model, profile, node) of every day.
    CREATE TABLE usage_by_user (
        day INTEGER NOT NULL, user_name TEXT NOT NULL, gpu_hours REAL NOT NULL,
        recovered INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (day, user_name)
    ) STRICT, WITHOUT ROWID;
    CREATE TABLE usage_by_model (
        day INTEGER NOT NULL, model TEXT NOT NULL, gpu_hours REAL NOT NULL,
        recovered INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (day, model)
    ) STRICT, WITHOUT ROWID;
    -- All-time totals by (user, model, profile): the Prometheus counter.
    CREATE TABLE usage_totals (
        user_name TEXT NOT NULL, model TEXT NOT NULL, profile TEXT NOT NULL,
        gpu_hours REAL NOT NULL, PRIMARY KEY (user_name, model, profile)
    ) STRICT, WITHOUT ROWID;
    CREATE TABLE usage_by_node (
        day INTEGER NOT NULL, node TEXT NOT NULL, gpu_hours REAL NOT NULL,
        recovered INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (day, node)
    ) STRICT, WITHOUT ROWID;
    ALTER TABLE users ADD COLUMN quota_gpu_hours_per_month INTEGER
        CHECK (quota_gpu_hours_per_month >= 0);
    CREATE TABLE alive (
        id    INTEGER PRIMARY KEY CHECK (id = 1),
        at_ms INTEGER NOT NULL
    ) STRICT;
    "#,
    // 8: how well held devices were used, per UTC day and user (the waste report).
    r#"
    CREATE TABLE usage_efficiency (
        day                 INTEGER NOT NULL,
        user_name           TEXT NOT NULL,
        measured_gpu_hours  REAL NOT NULL DEFAULT 0 CHECK (measured_gpu_hours >= 0),
        used_gpu_hours      REAL NOT NULL DEFAULT 0 CHECK (used_gpu_hours >= 0),
        idle_gpu_hours      REAL NOT NULL DEFAULT 0 CHECK (idle_gpu_hours >= 0),
        reclaimed_gpu_hours REAL NOT NULL DEFAULT 0 CHECK (reclaimed_gpu_hours >= 0),
        reclaimed_servers   INTEGER NOT NULL DEFAULT 0 CHECK (reclaimed_servers >= 0),
        PRIMARY KEY (day, user_name)
    ) STRICT, WITHOUT ROWID;
    "#,
    // 9: personal API tokens, by id; the secret only as its hash. A deleted user's
    // tokens go with them.
    r#"
    CREATE TABLE api_tokens (
        id            TEXT PRIMARY KEY NOT NULL,
        user_name     TEXT NOT NULL REFERENCES users (name) ON DELETE CASCADE,
        name          TEXT NOT NULL,
        scopes        TEXT NOT NULL,
        hash          BLOB NOT NULL,
        created_at_ms INTEGER NOT NULL,
        expires_at_ms INTEGER NOT NULL,
        last_used_ms  INTEGER,
        UNIQUE (user_name, name)
    ) STRICT;
    "#,
    // 10: groups (a shared quota and entitlements, as JSON) and their members.
    r#"
    CREATE TABLE groups (
        name          TEXT PRIMARY KEY NOT NULL,
        description   TEXT NOT NULL DEFAULT '',
        quota         TEXT NOT NULL,
        entitlements  TEXT NOT NULL,
        created_at_ms INTEGER NOT NULL
    ) STRICT;
    CREATE TABLE group_members (
        group_name TEXT NOT NULL REFERENCES groups (name) ON DELETE CASCADE,
        user_name  TEXT NOT NULL REFERENCES users (name) ON DELETE CASCADE,
        PRIMARY KEY (group_name, user_name)
    ) STRICT, WITHOUT ROWID;
    CREATE INDEX group_members_user ON group_members (user_name);
    "#,
];

/// The schema version this binary writes.
pub const SCHEMA_VERSION: u32 = MIGRATIONS.len() as u32;

pub(crate) fn migrate(conn: &mut Connection, shown: &str) -> Result<()> {
    // IMMEDIATE, and the version read again inside: two processes starting on one file
    // cannot both apply a step.
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let version: i64 = tx.pragma_query_value(None, "user_version", |r| r.get(0))?;
    check_version(version, shown)?;
    let from = version as usize;
    if from == MIGRATIONS.len() {
        return Ok(());
    }
    for (i, step) in MIGRATIONS.iter().enumerate().skip(from) {
        tx.execute_batch(step).map_err(|e| {
            Error::Store(format!(
                "database {shown}: migration to schema version {} failed: {e}",
                i + 1
            ))
        })?;
    }
    tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
    tx.commit()?;
    tracing::info!(
        path = shown,
        from = version,
        to = SCHEMA_VERSION,
        "database schema migrated"
    );
    Ok(())
}
