//! kcloud-store: the SQLite implementation of `kcloud_core::repo` — users,
//! refresh-token families, the audit log, the local shape's servers with their events,
//! volumes, reservations, the wait queue and the usage ledger — in the data dir.
//!
//! One connection behind a mutex; every async call runs on the blocking pool. WAL with
//! `synchronous=FULL`, so a write is on disk before the call returns. The one read on
//! every authenticated request (is this session still live?) is answered from memory
//! while nothing has been written since it was read ([`Inner::changes`]).

mod audit;
mod groups;
mod migrations;
mod queue;
mod reservations;
mod servers;
mod sessions;
mod tokens;
mod usage;
mod users;
mod volumes;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{Connection, Row};
use serde::Serialize;

use kcloud_core::user::UserRecord;
use kcloud_core::{Error, now_ms};

pub use migrations::SCHEMA_VERSION;
use migrations::migrate;

/// Audit strings longer than this are cut, so that one request cannot bloat the log.
const AUDIT_FIELD_MAX: usize = 1024;

const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Inside the store: a domain error, or SQLite's (which becomes `Error::Store`).
#[derive(Debug)]
pub(crate) struct Fail(Error);

impl From<Error> for Fail {
    fn from(e: Error) -> Self {
        Fail(e)
    }
}

impl From<rusqlite::Error> for Fail {
    fn from(e: rusqlite::Error) -> Self {
        Fail(Error::Store(e.to_string()))
    }
}

impl From<Fail> for Error {
    fn from(Fail(e): Fail) -> Self {
        e
    }
}

pub(crate) type Result<T, E = Fail> = std::result::Result<T, E>;

/// The SQLite store. Cheap to clone; all clones share one connection.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    conn: Mutex<Option<Connection>>,
    /// The connection's `total_changes` after the last call, stored before the call
    /// gives up the connection: it moves with every row any write changes, and this
    /// process's connection is the database's only writer.
    changes: AtomicU64,
    /// Sessions found live, each with the `changes` it was read at: good only while
    /// `changes` has not moved since, so a revocation, a disabled or deleted user or
    /// a role change (writes all) is seen by the next request as if read again.
    live_sessions: Mutex<HashMap<(String, String), (u64, UserRecord)>>,
}

/// More remembered sessions than this and the memory starts over.
const LIVE_SESSIONS_MAX: usize = 4096;

impl Inner {
    /// A session read live with nothing written since.
    fn live_session(&self, key: &(String, String)) -> Option<UserRecord> {
        let mut live = self.live_sessions.lock().unwrap_or_else(|p| p.into_inner());
        match live.get(key) {
            Some((at, user)) if *at == self.changes.load(Ordering::Acquire) => Some(user.clone()),
            Some(_) => {
                live.remove(key);
                None
            }
            None => None,
        }
    }

    /// Remembers a session read live while `changes` was `at` (under the connection's
    /// lock, so no write came between the read and `at`).
    fn remember_session(&self, key: (String, String), at: u64, user: UserRecord) {
        let mut live = self.live_sessions.lock().unwrap_or_else(|p| p.into_inner());
        if live.len() >= LIVE_SESSIONS_MAX {
            live.clear();
        }
        live.insert(key, (at, user));
    }
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
    pub fn open(path: &Path) -> kcloud_core::Result<Store> {
        Self::open_db(path).map_err(Error::from)
    }

    fn open_db(path: &Path) -> Result<Store> {
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
            ))
            .into());
        }
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", true)?;
        conn.pragma_update(None, "trusted_schema", false)?;

        migrate(&mut conn, &shown)?;

        // Every statement the store runs stays prepared (rusqlite keeps 16 by default,
        // fewer than the store has: the rest were parsed again on each use).
        conn.set_prepared_statement_cache_capacity(256);
        Ok(Store {
            inner: Arc::new(Inner {
                path: path.to_owned(),
                changes: AtomicU64::new(conn.total_changes()),
                conn: Mutex::new(Some(conn)),
                live_sessions: Mutex::default(),
            }),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Runs `f` with the connection on the blocking pool.
    async fn call<T, F>(&self, f: F) -> kcloud_core::Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || -> Result<T> {
            // A panic inside `f` dropped its transaction, which rolled back: the
            // connection is still consistent, so a poisoned lock is safe to reuse.
            let mut guard = inner.conn.lock().unwrap_or_else(|p| p.into_inner());
            let conn = guard
                .as_mut()
                .ok_or_else(|| Error::Store("database is closed".into()))?;
            let result = f(conn);
            inner.changes.store(conn.total_changes(), Ordering::Release);
            result
        })
        .await
        .map_err(|e| Error::Internal(format!("database task failed: {e}")))?
        .map_err(Error::from)
    }

    /// Checkpoints the WAL into the database file and closes the connection. Other
    /// clones get `Store("database is closed")` afterwards.
    pub async fn close(self) -> kcloud_core::Result<()> {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || -> Result<()> {
            let conn = inner.conn.lock().unwrap_or_else(|p| p.into_inner()).take();
            inner
                .live_sessions
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clear();
            let Some(conn) = conn else {
                return Ok(());
            };
            conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
            conn.close().map_err(|(_, e)| Fail::from(e))
        })
        .await
        .map_err(|e| Error::Internal(format!("database task failed: {e}")))?
        .map_err(Error::from)
    }
}

fn to_json<T: Serialize>(v: &T) -> kcloud_core::Result<String> {
    serde_json::to_string(v).map_err(|e| Error::Internal(format!("encoding JSON: {e}")))
}

fn get_u64(r: &Row<'_>, i: usize) -> rusqlite::Result<u64> {
    let v: i64 = r.get(i)?;
    u64::try_from(v).map_err(|_| rusqlite::Error::IntegralValueOutOfRange(i, v))
}

/// A JSON column; unreadable JSON is a conversion failure naming the column.
fn get_json<T: serde::de::DeserializeOwned>(r: &Row<'_>, i: usize) -> rusqlite::Result<T> {
    let text: String = r.get(i)?;
    serde_json::from_str(&text).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, e.into())
    })
}

fn get_opt_u64(r: &Row<'_>, i: usize) -> rusqlite::Result<Option<u64>> {
    let v: Option<i64> = r.get(i)?;
    v.map(|v| u64::try_from(v).map_err(|_| rusqlite::Error::IntegralValueOutOfRange(i, v)))
        .transpose()
}

fn to_i64(v: u64) -> kcloud_core::Result<i64> {
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
        }
        .into()),
    }
}

fn check_version(version: i64, shown: &str) -> Result<()> {
    if version < 0 {
        return Err(Error::Store(format!(
            "database {shown} has an invalid schema version {version}"
        ))
        .into());
    }
    if version > i64::from(SCHEMA_VERSION) {
        return Err(Error::Store(format!(
            "database {shown}: schema version {version} is newer than this \
             kcloud-aggregator ({SCHEMA_VERSION}); upgrade kcloud"
        ))
        .into());
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
    ))
    .into())
}
