//! SQLite in the data dir: users, refresh-token families, the audit log, the local
//! provisioner's servers with their events, and volumes.
//!
//! One connection behind a mutex; every async call runs on the blocking pool. WAL with
//! `synchronous=FULL`, so a write is on disk before the call returns.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, Row, Transaction, TransactionBehavior, params};
use serde::{Deserialize, Serialize};

use crate::provisioner::{Launch, Mount, ServerEvent, ServerStatus};
use crate::storage::AccessMode;
use crate::{Error, Result, now_ms};

/// Schema steps; step `i` takes `user_version` from `i` to `i + 1`. Append only: never
/// edit a step that has shipped.
const MIGRATIONS: &[&str] = &[
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
];

/// The schema version this binary writes.
pub const SCHEMA_VERSION: u32 = MIGRATIONS.len() as u32;

/// Expired refresh tokens are kept this long past expiry before they are pruned, so
/// that a rotation in flight never sees its family vanish under it.
const REFRESH_PRUNE_GRACE_MS: u64 = 60 * 60 * 1000;

/// Audit strings longer than this are cut, so that one request cannot bloat the log.
const AUDIT_FIELD_MAX: usize = 1024;

const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// What a user may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Admin,
    User,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::User => "user",
        }
    }

    fn parse(s: &str) -> Option<Role> {
        match s {
            "admin" => Some(Role::Admin),
            "user" => Some(Role::User),
            _ => None,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Per-user limits; `None` means the configured default.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Quota {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpus: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub servers: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_millis: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    /// Sum of the sizes of the user's volumes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_bytes: Option<u64>,
}

/// A user as the API shows it (never the password hash).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct User {
    pub name: String,
    pub role: Role,
    pub disabled: bool,
    pub quota: Quota,
    pub created_at_ms: u64,
}

/// A user with the PHC password hash, for login only.
#[derive(Clone)]
pub struct UserRecord {
    pub user: User,
    pub password_hash: String,
}

impl fmt::Debug for UserRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UserRecord")
            .field("user", &self.user)
            .field("password_hash", &"<redacted>")
            .finish()
    }
}

/// A user to create; `password_hash` is a PHC string from `auth::hash_password`.
#[derive(Clone)]
pub struct NewUser {
    pub name: String,
    pub password_hash: String,
    pub role: Role,
    pub quota: Quota,
}

impl fmt::Debug for NewUser {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NewUser")
            .field("name", &self.name)
            .field("password_hash", &"<redacted>")
            .field("role", &self.role)
            .field("quota", &self.quota)
            .finish()
    }
}

/// Fields to change; `None` leaves a field as it is. `quota` replaces the whole quota.
#[derive(Clone, Default)]
pub struct UserPatch {
    pub role: Option<Role>,
    pub disabled: Option<bool>,
    pub quota: Option<Quota>,
    pub password_hash: Option<String>,
}

impl fmt::Debug for UserPatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UserPatch")
            .field("role", &self.role)
            .field("disabled", &self.disabled)
            .field("quota", &self.quota)
            .field(
                "password_hash",
                &self.password_hash.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

/// One issued refresh token (by its `jti`), in a rotation family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefreshRow {
    pub id: String,
    pub family: String,
    pub user: String,
    pub issued_at_ms: u64,
    pub expires_at_ms: u64,
}

/// The outcome of presenting a refresh token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefreshUse {
    /// Unused, unrevoked, unexpired: now marked used.
    Valid { user: String, family: String },
    /// Already used, or its family revoked: the caller revokes the family.
    Reused { family: String },
    /// Unknown or expired.
    Invalid,
}

/// One line of the audit log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AuditEntry {
    pub at_ms: u64,
    /// Who acted: a user name, `system`, or empty for an unauthenticated client.
    pub actor: String,
    /// What happened, e.g. `login`, `login_failed`, `user_create`.
    pub action: String,
    /// What it was done to (a user name, a server); empty if nothing.
    #[serde(default)]
    pub target: String,
    /// Free text; never a secret. Empty if nothing.
    #[serde(default)]
    pub detail: String,
    /// The client address when a request caused it, else empty.
    #[serde(default)]
    pub client: String,
}

/// Events kept per server; older ones are dropped as new ones come.
const SERVER_EVENTS_MAX: i64 = 200;

/// A server as the local provisioner records it: the API's view plus how to reach and
/// signal its process.
#[derive(Clone, PartialEq, Eq)]
pub struct ServerRow {
    /// Unique per incarnation: a server deleted and created again under the same name
    /// gets a new id.
    pub id: String,
    pub owner: String,
    pub name: String,
    pub status: ServerStatus,
    pub reason: Option<String>,
    pub node: Option<String>,
    pub devices: Vec<String>,
    pub cpu_millis: u64,
    pub memory_bytes: u64,
    pub image: Option<String>,
    pub launch: Launch,
    pub port: Option<u16>,
    pub pid: Option<u32>,
    /// The process's start time (clock ticks since boot): a pid reused by another
    /// process after a reboot or wrap-around does not match it.
    pub pid_start: Option<u64>,
    /// The server's own Jupyter token; only the proxy uses it.
    pub token: String,
    pub created_at_ms: u64,
    pub ready_at_ms: Option<u64>,
    pub last_activity_ms: u64,
    /// An admin exempted it from idle culling.
    pub cull_exempt: bool,
    /// Volumes and shares mounted into it.
    pub mounts: Vec<Mount>,
}

impl fmt::Debug for ServerRow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerRow")
            .field("id", &self.id)
            .field("owner", &self.owner)
            .field("name", &self.name)
            .field("status", &self.status)
            .field("reason", &self.reason)
            .field("devices", &self.devices)
            .field("port", &self.port)
            .field("pid", &self.pid)
            .field("token", &"<redacted>")
            .finish_non_exhaustive()
    }
}

/// A volume as recorded: its files live elsewhere (a directory or a PVC).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeRow {
    pub owner: String,
    pub name: String,
    pub size_bytes: u64,
    pub access_mode: AccessMode,
    pub created_at_ms: u64,
}

/// Checks a user name: 1–63 characters, a lowercase DNS-1123 label, because names end
/// up in URLs, Kubernetes labels and pod names.
pub fn validate_user_name(name: &str) -> Result<()> {
    let b = name.as_bytes();
    let ok_char = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-';
    let edge = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    let valid =
        (1..=63).contains(&b.len()) && b.iter().all(ok_char) && edge(b[0]) && edge(b[b.len() - 1]);
    if valid {
        Ok(())
    } else {
        // The input is not echoed: people type passwords into name fields.
        Err(Error::BadRequest(
            "user name must be 1-63 characters of a-z, 0-9 and '-', starting and ending \
             with a letter or digit"
                .into(),
        ))
    }
}

/// The SQLite store. Cheap to clone; all clones share one connection.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    conn: Mutex<Option<Connection>>,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.inner.path)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Opens the database at `path`, creating it (mode 0600) if absent, checks it and
    /// runs pending migrations. Blocking: call it at start, before serving.
    pub fn open(path: &Path) -> Result<Store> {
        let shown = path.display().to_string();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| Error::Io {
                context: format!("creating data directory {}", dir.display()),
                source,
            })?;
        }
        create_private_file(path)?;

        let mut conn = Connection::open(path)
            .map_err(|e| Error::Store(format!("cannot open database {shown}: {e}")))?;
        conn.busy_timeout(BUSY_TIMEOUT)?;

        // The first read of the header: this is where a file that is not SQLite fails.
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(|e| {
                Error::Store(format!(
                    "{shown} is not a usable kcloud database (not SQLite, or corrupt): {e}"
                ))
            })?;
        check_version(version, &shown)?;
        quick_check(&conn, &shown)?;

        let mode: String =
            conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(Error::Store(format!(
                "database {shown}: cannot enable WAL (journal mode is {mode})"
            )));
        }
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", true)?;
        conn.pragma_update(None, "trusted_schema", false)?;

        migrate(&mut conn, &shown)?;

        Ok(Store {
            inner: Arc::new(Inner {
                path: path.to_owned(),
                conn: Mutex::new(Some(conn)),
            }),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Runs `f` with the connection on the blocking pool.
    async fn call<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || {
            // A panic inside `f` dropped its transaction, which rolled back: the
            // connection is still consistent, so a poisoned lock is safe to reuse.
            let mut guard = inner.conn.lock().unwrap_or_else(|p| p.into_inner());
            let conn = guard
                .as_mut()
                .ok_or_else(|| Error::Store("database is closed".into()))?;
            f(conn)
        })
        .await
        .map_err(|e| Error::Internal(format!("database task failed: {e}")))?
    }

    /// Creates a user; a taken name is `Conflict`.
    pub async fn create_user(&self, new: NewUser) -> Result<User> {
        validate_user_name(&new.name)?;
        let quota = QuotaRow::from_quota(&new.quota)?;
        self.call(move |conn| {
            let now = to_i64(now_ms())?;
            let inserted = conn.execute(
                "INSERT INTO users (name, password_hash, role, disabled, quota_gpus,
                    quota_servers, quota_cpu_millis, quota_memory_bytes, created_at_ms,
                    updated_at_ms, quota_storage_bytes)
                 VALUES (?1, ?2, ?3, 0, ?4, ?5, ?6, ?7, ?8, ?8, ?9)
                 ON CONFLICT(name) DO NOTHING",
                params![
                    new.name,
                    new.password_hash,
                    new.role.as_str(),
                    quota.gpus,
                    quota.servers,
                    quota.cpu_millis,
                    quota.memory_bytes,
                    now,
                    quota.storage_bytes
                ],
            )?;
            if inserted == 0 {
                return Err(Error::Conflict(format!(
                    "user name {} is already taken",
                    new.name
                )));
            }
            get_user(conn, &new.name)?
                .map(|r| r.user)
                .ok_or_else(|| Error::Internal("created user vanished".into()))
        })
        .await
    }

    /// One user with the password hash, or `None`.
    pub async fn user(&self, name: &str) -> Result<Option<UserRecord>> {
        let name = name.to_owned();
        self.call(move |conn| get_user(conn, &name)).await
    }

    /// All users, by name.
    pub async fn users(&self) -> Result<Vec<User>> {
        self.call(|conn| {
            let mut stmt = conn.prepare_cached(&format!("{USER_SELECT} ORDER BY name"))?;
            let rows = stmt.query_map([], user_from_row)?;
            Ok(rows
                .map(|r| r.map(|rec| rec.user))
                .collect::<rusqlite::Result<_>>()?)
        })
        .await
    }

    /// Applies `patch`; `None` if the user does not exist. Disabling a user or setting
    /// a password revokes their refresh tokens in the same transaction. Leaving no
    /// enabled admin (where there was one) is `Conflict`.
    pub async fn update_user(&self, name: &str, patch: UserPatch) -> Result<Option<User>> {
        let name = name.to_owned();
        let quota = patch.quota.as_ref().map(QuotaRow::from_quota).transpose()?;
        self.call(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let Some(before) = get_user(&tx, &name)? else {
                return Ok(None);
            };
            let now = to_i64(now_ms())?;
            if let Some(role) = patch.role {
                tx.execute(
                    "UPDATE users SET role = ?2 WHERE name = ?1",
                    params![name, role.as_str()],
                )?;
            }
            if let Some(disabled) = patch.disabled {
                tx.execute(
                    "UPDATE users SET disabled = ?2 WHERE name = ?1",
                    params![name, disabled],
                )?;
            }
            if let Some(q) = &quota {
                tx.execute(
                    "UPDATE users SET quota_gpus = ?2, quota_servers = ?3,
                        quota_cpu_millis = ?4, quota_memory_bytes = ?5,
                        quota_storage_bytes = ?6 WHERE name = ?1",
                    params![
                        name,
                        q.gpus,
                        q.servers,
                        q.cpu_millis,
                        q.memory_bytes,
                        q.storage_bytes
                    ],
                )?;
            }
            if let Some(hash) = &patch.password_hash {
                tx.execute(
                    "UPDATE users SET password_hash = ?2 WHERE name = ?1",
                    params![name, hash],
                )?;
            }
            tx.execute(
                "UPDATE users SET updated_at_ms = ?2 WHERE name = ?1",
                params![name, now],
            )?;
            let was_enabled_admin = before.user.role == Role::Admin && !before.user.disabled;
            if was_enabled_admin && enabled_admins(&tx)? == 0 {
                return Err(last_admin());
            }
            if patch.disabled == Some(true) || patch.password_hash.is_some() {
                revoke_user_families(&tx, &name, now)?;
            }
            let after = get_user(&tx, &name)?.map(|r| r.user);
            tx.commit()?;
            Ok(after)
        })
        .await
    }

    /// Deletes a user and (by cascade) their refresh tokens; `false` if absent.
    /// Deleting the last enabled admin is `Conflict`.
    pub async fn delete_user(&self, name: &str) -> Result<bool> {
        let name = name.to_owned();
        self.call(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let Some(before) = get_user(&tx, &name)? else {
                return Ok(false);
            };
            tx.execute("DELETE FROM users WHERE name = ?1", params![name])?;
            if before.user.role == Role::Admin && !before.user.disabled && enabled_admins(&tx)? == 0
            {
                return Err(last_admin());
            }
            tx.commit()?;
            Ok(true)
        })
        .await
    }

    /// Enabled admins.
    pub async fn admin_count(&self) -> Result<u64> {
        self.call(|conn| enabled_admins(conn)).await
    }

    /// Records an issued refresh token, creating its family on first use. Refused
    /// (`Unauthorized`) when the family is revoked or belongs to another user, so that
    /// a rotation racing a revocation cannot resurrect the family. Also prunes tokens
    /// long expired.
    pub async fn insert_refresh(&self, t: RefreshRow) -> Result<()> {
        self.call(move |conn| {
            let now = to_i64(t.issued_at_ms)?;
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            prune_refresh(&tx, t.issued_at_ms)?;
            let user_exists: bool = tx.query_row(
                "SELECT EXISTS (SELECT 1 FROM users WHERE name = ?1)",
                params![t.user],
                |r| r.get(0),
            )?;
            if !user_exists {
                return Err(Error::Unauthorized("unknown user".into()));
            }
            tx.execute(
                "INSERT INTO refresh_families (id, user_name, created_at_ms)
                 VALUES (?1, ?2, ?3) ON CONFLICT(id) DO NOTHING",
                params![t.family, t.user, now],
            )?;
            let (owner, revoked): (String, Option<i64>) = tx.query_row(
                "SELECT user_name, revoked_at_ms FROM refresh_families WHERE id = ?1",
                params![t.family],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?;
            if owner != t.user || revoked.is_some() {
                return Err(Error::Unauthorized("session revoked".into()));
            }
            tx.execute(
                "INSERT INTO refresh_tokens (id, family, issued_at_ms, expires_at_ms)
                 VALUES (?1, ?2, ?3, ?4)",
                params![t.id, t.family, now, to_i64(t.expires_at_ms)?],
            )?;
            tx.commit()?;
            Ok(())
        })
        .await
    }

    /// Atomically checks a refresh token and marks it used.
    pub async fn consume_refresh(&self, id: &str, now_ms: u64) -> Result<RefreshUse> {
        let id = id.to_owned();
        self.call(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let row = tx
                .query_row(
                    "SELECT f.user_name, t.family, t.expires_at_ms,
                            t.used_at_ms IS NOT NULL OR f.revoked_at_ms IS NOT NULL
                     FROM refresh_tokens t JOIN refresh_families f ON f.id = t.family
                     WHERE t.id = ?1",
                    params![id],
                    |r| {
                        Ok((
                            r.get::<_, String>(0)?,
                            r.get::<_, String>(1)?,
                            r.get::<_, i64>(2)?,
                            r.get::<_, bool>(3)?,
                        ))
                    },
                )
                .optional()?;
            let Some((user, family, expires, spent)) = row else {
                return Ok(RefreshUse::Invalid);
            };
            // Reuse is checked before expiry: a replayed old token is a theft signal
            // even when it has expired, and its family may still hold a live token.
            if spent {
                return Ok(RefreshUse::Reused { family });
            }
            let now = to_i64(now_ms)?;
            if expires <= now {
                return Ok(RefreshUse::Invalid);
            }
            tx.execute(
                "UPDATE refresh_tokens SET used_at_ms = ?2 WHERE id = ?1",
                params![id, now],
            )?;
            tx.commit()?;
            Ok(RefreshUse::Valid { user, family })
        })
        .await
    }

    /// Revokes every token of a family (idempotent).
    pub async fn revoke_family(&self, family: &str) -> Result<()> {
        let family = family.to_owned();
        self.call(move |conn| {
            conn.execute(
                "UPDATE refresh_families SET revoked_at_ms = ?2
                 WHERE id = ?1 AND revoked_at_ms IS NULL",
                params![family, to_i64(now_ms())?],
            )?;
            Ok(())
        })
        .await
    }

    /// Revokes all of a user's refresh tokens (idempotent).
    pub async fn revoke_user_tokens(&self, user: &str) -> Result<()> {
        let user = user.to_owned();
        self.call(move |conn| revoke_user_families(conn, &user, to_i64(now_ms())?))
            .await
    }

    /// Appends to the audit log. Long fields are cut to 1024 bytes.
    pub async fn audit(&self, e: AuditEntry) -> Result<()> {
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
    pub async fn audit_log(&self, limit: u32) -> Result<Vec<AuditEntry>> {
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

    /// Records a new server; an owner's name already taken is `Conflict`.
    pub async fn insert_server(&self, row: ServerRow) -> Result<()> {
        self.call(move |conn| {
            let inserted = conn.execute(
                &format!(
                    "INSERT INTO servers ({SERVER_COLUMNS}) VALUES
                     (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18,
                      ?19, ?20)
                     ON CONFLICT(owner, name) DO NOTHING"
                ),
                params![
                    row.id,
                    row.owner,
                    row.name,
                    row.status.as_str(),
                    row.reason,
                    row.node,
                    to_json(&row.devices)?,
                    to_i64(row.cpu_millis)?,
                    to_i64(row.memory_bytes)?,
                    row.image,
                    to_json(&row.launch)?,
                    row.port,
                    row.pid,
                    row.pid_start.map(to_i64).transpose()?,
                    row.token,
                    to_i64(row.created_at_ms)?,
                    row.ready_at_ms.map(to_i64).transpose()?,
                    to_i64(row.last_activity_ms)?,
                    row.cull_exempt,
                    to_json(&row.mounts)?,
                ],
            )?;
            if inserted == 0 {
                return Err(Error::Conflict(format!(
                    "server name {:?} is already in use",
                    row.name
                )));
            }
            Ok(())
        })
        .await
    }

    /// Writes a server's changing fields (status, reason, process, times); a server
    /// that is gone is ignored.
    pub async fn save_server(&self, row: ServerRow) -> Result<()> {
        self.call(move |conn| {
            conn.execute(
                "UPDATE servers SET status = ?2, reason = ?3, port = ?4, pid = ?5,
                    pid_start = ?6, ready_at_ms = ?7, last_activity_ms = ?8, cull_exempt = ?9
                 WHERE id = ?1",
                params![
                    row.id,
                    row.status.as_str(),
                    row.reason,
                    row.port,
                    row.pid,
                    row.pid_start.map(to_i64).transpose()?,
                    row.ready_at_ms.map(to_i64).transpose()?,
                    to_i64(row.last_activity_ms)?,
                    row.cull_exempt,
                ],
            )?;
            Ok(())
        })
        .await
    }

    /// Sets servers' last activity, never moving it backwards.
    pub async fn touch_servers(&self, seen: Vec<(String, u64)>) -> Result<()> {
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
    pub async fn delete_server(&self, id: &str) -> Result<bool> {
        let id = id.to_owned();
        self.call(move |conn| {
            Ok(conn.execute("DELETE FROM servers WHERE id = ?1", params![id])? > 0)
        })
        .await
    }

    /// Every recorded server, by owner and name.
    pub async fn servers(&self) -> Result<Vec<ServerRow>> {
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
    pub async fn server_event(&self, server_id: &str, event: ServerEvent) -> Result<()> {
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
    pub async fn server_events(&self, server_id: &str) -> Result<Vec<ServerEvent>> {
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

    /// Records a volume if the owner's volumes, this one included, stay within
    /// `max_total_bytes` (checked in the same transaction, so two creates cannot both
    /// squeeze in). A name in use is `Conflict`, an exceeded quota `QuotaExceeded`.
    pub async fn insert_volume(&self, row: VolumeRow, max_total_bytes: Option<u64>) -> Result<()> {
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
                )));
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
                )));
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }

    /// One owner's volumes (everyone's with `None`), by owner and name.
    pub async fn volumes(&self, owner: Option<&str>) -> Result<Vec<VolumeRow>> {
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

    pub async fn volume(&self, owner: &str, name: &str) -> Result<Option<VolumeRow>> {
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
    pub async fn delete_volume(&self, owner: &str, name: &str) -> Result<bool> {
        let (owner, name) = (owner.to_owned(), name.to_owned());
        self.call(move |conn| {
            Ok(conn.execute(
                "DELETE FROM volumes WHERE owner = ?1 AND name = ?2",
                params![owner, name],
            )? > 0)
        })
        .await
    }

    /// Checkpoints the WAL into the database file and closes the connection. Other
    /// clones get `Store("database is closed")` afterwards.
    pub async fn close(self) -> Result<()> {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || {
            let conn = inner.conn.lock().unwrap_or_else(|p| p.into_inner()).take();
            let Some(conn) = conn else {
                return Ok(());
            };
            conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
            conn.close().map_err(|(_, e)| Error::from(e))
        })
        .await
        .map_err(|e| Error::Internal(format!("database task failed: {e}")))?
    }
}

const SERVER_COLUMNS: &str = "id, owner, name, status, reason, node, devices, cpu_millis, \
    memory_bytes, image, launch, port, pid, pid_start, token, created_at_ms, ready_at_ms, \
    last_activity_ms, cull_exempt, mounts";

fn server_from_row(r: &Row<'_>) -> rusqlite::Result<ServerRow> {
    let bad = |i: usize, e: String| {
        rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, e.into())
    };
    let status: String = r.get(3)?;
    let devices: String = r.get(6)?;
    let launch: String = r.get(10)?;
    let mounts: String = r.get(19)?;
    Ok(ServerRow {
        id: r.get(0)?,
        owner: r.get(1)?,
        name: r.get(2)?,
        status: ServerStatus::parse(&status)
            .ok_or_else(|| bad(3, format!("unknown server status {status:?}")))?,
        reason: r.get(4)?,
        node: r.get(5)?,
        devices: serde_json::from_str(&devices).map_err(|e| bad(6, e.to_string()))?,
        cpu_millis: get_u64(r, 7)?,
        memory_bytes: get_u64(r, 8)?,
        image: r.get(9)?,
        launch: serde_json::from_str(&launch).map_err(|e| bad(10, e.to_string()))?,
        port: r.get(11)?,
        pid: r.get(12)?,
        pid_start: get_opt_u64(r, 13)?,
        token: r.get(14)?,
        created_at_ms: get_u64(r, 15)?,
        ready_at_ms: get_opt_u64(r, 16)?,
        last_activity_ms: get_u64(r, 17)?,
        cull_exempt: r.get(18)?,
        mounts: serde_json::from_str(&mounts).map_err(|e| bad(19, e.to_string()))?,
    })
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

fn to_json<T: Serialize>(v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(|e| Error::Internal(format!("encoding JSON: {e}")))
}

const USER_SELECT: &str = "SELECT name, role, disabled, quota_gpus, quota_servers, \
    quota_cpu_millis, quota_memory_bytes, created_at_ms, password_hash, quota_storage_bytes \
    FROM users";

fn get_user(conn: &Connection, name: &str) -> Result<Option<UserRecord>> {
    let mut stmt = conn.prepare_cached(&format!("{USER_SELECT} WHERE name = ?1"))?;
    Ok(stmt.query_row(params![name], user_from_row).optional()?)
}

fn user_from_row(r: &Row<'_>) -> rusqlite::Result<UserRecord> {
    let role: String = r.get(1)?;
    let role = Role::parse(&role).ok_or_else(|| {
        rusqlite::Error::FromSqlConversionFailure(
            1,
            rusqlite::types::Type::Text,
            format!("unknown role {role:?}").into(),
        )
    })?;
    Ok(UserRecord {
        user: User {
            name: r.get(0)?,
            role,
            disabled: r.get(2)?,
            quota: Quota {
                gpus: r.get(3)?,
                servers: r.get(4)?,
                cpu_millis: get_opt_u64(r, 5)?,
                memory_bytes: get_opt_u64(r, 6)?,
                storage_bytes: get_opt_u64(r, 9)?,
            },
            created_at_ms: get_u64(r, 7)?,
        },
        password_hash: r.get(8)?,
    })
}

/// A quota as SQLite integers (which are signed).
struct QuotaRow {
    gpus: Option<u32>,
    servers: Option<u32>,
    cpu_millis: Option<i64>,
    memory_bytes: Option<i64>,
    storage_bytes: Option<i64>,
}

impl QuotaRow {
    fn from_quota(q: &Quota) -> Result<QuotaRow> {
        let big = |v: Option<u64>, what: &str| {
            v.map(|v| {
                i64::try_from(v)
                    .map_err(|_| Error::BadRequest(format!("quota {what} is too large")))
            })
            .transpose()
        };
        Ok(QuotaRow {
            gpus: q.gpus,
            servers: q.servers,
            cpu_millis: big(q.cpu_millis, "cpu_millis")?,
            memory_bytes: big(q.memory_bytes, "memory_bytes")?,
            storage_bytes: big(q.storage_bytes, "storage_bytes")?,
        })
    }
}

fn get_u64(r: &Row<'_>, i: usize) -> rusqlite::Result<u64> {
    let v: i64 = r.get(i)?;
    u64::try_from(v).map_err(|_| rusqlite::Error::IntegralValueOutOfRange(i, v))
}

fn get_opt_u64(r: &Row<'_>, i: usize) -> rusqlite::Result<Option<u64>> {
    let v: Option<i64> = r.get(i)?;
    v.map(|v| u64::try_from(v).map_err(|_| rusqlite::Error::IntegralValueOutOfRange(i, v)))
        .transpose()
}

fn to_i64(v: u64) -> Result<i64> {
    i64::try_from(v).map_err(|_| Error::BadRequest(format!("value {v} is out of range")))
}

fn clip(s: &str) -> &str {
    if s.len() <= AUDIT_FIELD_MAX {
        return s;
    }
    let mut end = AUDIT_FIELD_MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn enabled_admins(conn: &Connection) -> Result<u64> {
    let n: i64 = conn.query_row(
        "SELECT COUNT(*) FROM users WHERE role = 'admin' AND disabled = 0",
        [],
        |r| r.get(0),
    )?;
    Ok(n.max(0) as u64)
}

fn last_admin() -> Error {
    Error::Conflict("cannot disable, demote or delete the last enabled admin".into())
}

fn revoke_user_families(conn: &Connection, user: &str, now: i64) -> Result<()> {
    conn.execute(
        "UPDATE refresh_families SET revoked_at_ms = ?2
         WHERE user_name = ?1 AND revoked_at_ms IS NULL",
        params![user, now],
    )?;
    Ok(())
}

fn prune_refresh(tx: &Transaction<'_>, now_ms: u64) -> Result<()> {
    let cutoff = to_i64(now_ms.saturating_sub(REFRESH_PRUNE_GRACE_MS))?;
    tx.execute(
        "DELETE FROM refresh_tokens WHERE expires_at_ms < ?1",
        params![cutoff],
    )?;
    tx.execute(
        "DELETE FROM refresh_families WHERE created_at_ms < ?1
         AND NOT EXISTS (SELECT 1 FROM refresh_tokens t WHERE t.family = refresh_families.id)",
        params![cutoff],
    )?;
    Ok(())
}

/// Creates the database file with mode 0600 if absent, so that SQLite (which gives its
/// WAL and shm files the main file's mode) never exposes password hashes to others.
fn create_private_file(path: &Path) -> Result<()> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    match opts.open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(source) => Err(Error::Io {
            context: format!("creating database {}", path.display()),
            source,
        }),
    }
}

fn check_version(version: i64, shown: &str) -> Result<()> {
    if version < 0 {
        return Err(Error::Store(format!(
            "database {shown} has an invalid schema version {version}"
        )));
    }
    if version > i64::from(SCHEMA_VERSION) {
        return Err(Error::Store(format!(
            "database {shown}: schema version {version} is newer than this \
             kcloud-aggregator ({SCHEMA_VERSION}); upgrade kcloud"
        )));
    }
    Ok(())
}

fn quick_check(conn: &Connection, shown: &str) -> Result<()> {
    let mut problems = Vec::new();
    conn.pragma_query(None, "quick_check", |r| {
        problems.push(r.get::<_, String>(0)?);
        Ok(())
    })
    .map_err(|e| Error::Store(format!("database {shown} failed its integrity check: {e}")))?;
    if problems.len() == 1 && problems[0] == "ok" {
        return Ok(());
    }
    problems.truncate(5);
    Err(Error::Store(format!(
        "database {shown} is corrupt (quick_check: {})",
        problems.join("; ")
    )))
}

fn migrate(conn: &mut Connection, shown: &str) -> Result<()> {
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

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn user_names() {
        for ok in ["a", "admin", "a-b", "x9", "0", &"a".repeat(63)] {
            assert!(validate_user_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "-a",
            "a-",
            "A",
            "a_b",
            "a.b",
            "a b",
            "é",
            "../x",
            &"a".repeat(64),
        ] {
            assert!(
                matches!(validate_user_name(bad), Err(Error::BadRequest(_))),
                "{bad}"
            );
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

    fn server_row(id: &str, name: &str) -> ServerRow {
        ServerRow {
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
                profile: Some(crate::profile::RunProfile::legacy(false)),
            },
            port: Some(40000),
            pid: None,
            pid_start: None,
            token: "secret-token".into(),
            created_at_ms: 10,
            ready_at_ms: None,
            last_activity_ms: 10,
            cull_exempt: false,
            mounts: vec![Mount {
                source: crate::provisioner::MountSource::Volume {
                    name: "data".into(),
                    local_path: Some("/srv/data".into()),
                },
                mount_path: "/home/jovyan/work".into(),
                read_only: false,
            }],
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

        let saved = ServerRow {
            status: ServerStatus::Running,
            reason: None,
            pid: Some(4242),
            pid_start: Some(99),
            ready_at_ms: Some(20),
            last_activity_ms: 20,
            cull_exempt: true,
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
            ServerRow {
                last_activity_ms: 30,
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
}
