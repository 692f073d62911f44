//! What the aggregator keeps durably, as the traits its crates program against. The
//! SQLite store (`kcloud-store`) implements them; a second backend is a new crate.
//!
//! Every method is async (the store runs SQL on a blocking pool) and answers with the
//! domain's errors: a taken name is `Conflict`, an exceeded storage quota
//! `QuotaExceeded`, a broken database `Store`.

use std::fmt;

use async_trait::async_trait;

use crate::group::{Entitlements, Group};
use crate::queue::{QueueEntry, UsageScore};
use crate::reservation::Reservation;
use crate::server::{Server, ServerEvent};
use crate::token::ApiTokenRecord;
use crate::usage::{Efficiency, GroupBy, UsageInterval, UsageRow, UsageTotal};
use crate::user::{
    AuditEntry, NewUser, Quota, RefreshRow, RefreshUse, User, UserPatch, UserRecord,
};
use crate::volume::VolumeRow;
use crate::{Error, Result};

/// Users and their password hashes.
#[async_trait]
pub trait UserRepo: Send + Sync {
    /// Creates a user; a taken name is `Conflict`.
    async fn create_user(&self, new: NewUser) -> Result<User>;
    /// One user with the password hash, or `None`.
    async fn user(&self, name: &str) -> Result<Option<UserRecord>>;
    /// A user that must exist: 404 when absent.
    async fn existing_user(&self, name: &str) -> Result<User> {
        Ok(self
            .user(name)
            .await?
            .ok_or_else(|| Error::NotFound(format!("no user {name:?}")))?
            .user)
    }
    /// All users, by name.
    async fn users(&self) -> Result<Vec<User>>;
    /// Applies `patch`; `None` if the user does not exist. Disabling a user, setting a
    /// password or changing the role revokes all their sessions in the same
    /// transaction. Leaving no enabled admin (where there was one) is `Conflict`.
    async fn update_user(&self, name: &str, patch: UserPatch) -> Result<Option<User>>;
    /// Deletes a user and their refresh tokens; `false` if absent. Deleting the last
    /// enabled admin is `Conflict`.
    async fn delete_user(&self, name: &str) -> Result<bool>;
    /// Enabled admins.
    async fn admin_count(&self) -> Result<u64>;
}

/// Refresh tokens in rotation families.
#[async_trait]
pub trait SessionRepo: Send + Sync {
    /// Records an issued refresh token, creating its family on first use; refused
    /// (`Unauthorized`) when the family is revoked or another user's.
    async fn insert_refresh(&self, t: RefreshRow) -> Result<()>;
    /// Atomically checks a refresh token and marks it used.
    async fn consume_refresh(&self, id: &str, now_ms: u64) -> Result<RefreshUse>;
    /// Revokes every token of a family (idempotent).
    async fn revoke_family(&self, family: &str) -> Result<()>;
    /// Revokes all of a user's refresh tokens (idempotent).
    async fn revoke_user_tokens(&self, user: &str) -> Result<()>;
    /// The user, if they exist and `family` is one of their sessions, not revoked:
    /// what every request with a token checks.
    async fn session_user(&self, name: &str, family: &str) -> Result<Option<UserRecord>>;
}

/// What a group update changes; `None` leaves a field as it is.
#[derive(Clone, Debug, Default)]
pub struct GroupPatch {
    pub description: Option<String>,
    pub quota: Option<Quota>,
    pub entitlements: Option<Entitlements>,
    pub add_members: Vec<String>,
    pub remove_members: Vec<String>,
}

/// Groups and their members.
#[async_trait]
pub trait GroupRepo: Send + Sync {
    /// A name taken is `Conflict`; an unknown member is `BadRequest`.
    async fn create_group(&self, g: Group) -> Result<()>;
    async fn group(&self, name: &str) -> Result<Option<Group>>;
    /// Every group, by name.
    async fn groups(&self) -> Result<Vec<Group>>;
    /// The groups `user` is in, by name.
    async fn groups_of(&self, user: &str) -> Result<Vec<Group>>;
    /// Applies `patch` in one transaction; `None` when the group does not exist; an
    /// unknown member to add is `BadRequest`.
    async fn update_group(&self, name: &str, patch: GroupPatch) -> Result<Option<Group>>;
    async fn delete_group(&self, name: &str) -> Result<bool>;
}

/// Personal API tokens.
#[async_trait]
pub trait TokenRepo: Send + Sync {
    /// Stores a new token; a name the user already gave a token is `Conflict`, more
    /// than `max_per_user` live tokens is `QuotaExceeded`.
    async fn insert_token(&self, t: ApiTokenRecord, max_per_user: u32) -> Result<()>;
    async fn token(&self, id: &str) -> Result<Option<ApiTokenRecord>>;
    /// A user's tokens, or everyone's (`None`), newest first.
    async fn tokens(&self, user: Option<String>) -> Result<Vec<ApiTokenRecord>>;
    /// Deletes a token; whether it existed.
    async fn delete_token(&self, id: &str) -> Result<bool>;
    /// Records a use (at most once a minute per token is enough for "last used").
    async fn touch_token(&self, id: &str, at_ms: u64) -> Result<()>;
}

/// The audit log.
#[async_trait]
pub trait AuditRepo: Send + Sync {
    /// Appends an entry; long fields are cut.
    async fn audit(&self, e: AuditEntry) -> Result<()>;
    /// The newest `limit` entries, newest first.
    async fn audit_log(&self, limit: u32) -> Result<Vec<AuditEntry>>;
}

/// The local shape's servers and their lifecycle events.
#[async_trait]
pub trait ServerRepo: Send + Sync {
    /// Records a new server; an owner's name already taken is `Conflict`.
    async fn insert_server(&self, row: ServerRecord) -> Result<()>;
    /// Writes a server's changing fields (status, reason, process, times); a server
    /// that is gone is ignored.
    async fn save_server(&self, row: ServerRecord) -> Result<()>;
    /// Sets servers' last activity, never moving it backwards.
    async fn touch_servers(&self, seen: Vec<(String, u64)>) -> Result<()>;
    /// Forgets a server and its events; `false` if it was not there.
    async fn delete_server(&self, id: &str) -> Result<bool>;
    /// Every recorded server, by owner and name.
    async fn servers(&self) -> Result<Vec<ServerRecord>>;
    /// Appends a lifecycle event (ignored if the server is gone); keeps the newest.
    async fn server_event(&self, server_id: &str, event: ServerEvent) -> Result<()>;
    /// A server's events, oldest first.
    async fn server_events(&self, server_id: &str) -> Result<Vec<ServerEvent>>;
    /// The uid `user`'s servers run as in the local sandbox: the one recorded, else the
    /// next unused one of `first..=last`, recorded for good (never handed to another
    /// user, also after this one is deleted). `Unavailable` when the range is used up.
    async fn local_uid(&self, user: &str, first: u32, last: u32) -> Result<u32>;
}

/// Users' volumes.
#[async_trait]
pub trait VolumeRepo: Send + Sync {
    /// Records a volume if the owner's volumes, this one included, stay within
    /// `max_total_bytes` (checked in the same transaction). A name in use is
    /// `Conflict`, an exceeded quota `QuotaExceeded`.
    async fn insert_volume(&self, row: VolumeRow, max_total_bytes: Option<u64>) -> Result<()>;
    /// One owner's volumes (everyone's with `None`), by owner and name.
    async fn volumes(&self, owner: Option<&str>) -> Result<Vec<VolumeRow>>;
    async fn volume(&self, owner: &str, name: &str) -> Result<Option<VolumeRow>>;
    /// Forgets a volume; `false` if it was not there.
    async fn delete_volume(&self, owner: &str, name: &str) -> Result<bool>;
}

/// Reservations of devices for future windows. Conflicts are checked in memory by
/// the calendar (`kcloud_cluster::calendar`), which is loaded from here at start.
#[async_trait]
pub trait ReservationRepo: Send + Sync {
    async fn insert_reservation(&self, r: Reservation) -> Result<()>;
    /// Forgets a reservation; `false` if it was not there.
    async fn delete_reservation(&self, id: &str) -> Result<bool>;
    /// Marks a reservation used (a server of its owner ran on it in its window).
    async fn mark_reservation_used(&self, id: &str) -> Result<()>;
    /// Every reservation, by start.
    async fn reservations(&self) -> Result<Vec<Reservation>>;
}

/// The wait queue and the fair-share scores that order it.
#[async_trait]
pub trait QueueRepo: Send + Sync {
    /// Records a waiting request; an owner's name already queued is `Conflict`.
    async fn insert_queued(&self, e: QueueEntry) -> Result<()>;
    /// Forgets a waiting request; `false` if it was not there.
    async fn delete_queued(&self, id: &str) -> Result<bool>;
    /// Every waiting request, by arrival.
    async fn queued(&self) -> Result<Vec<QueueEntry>>;
    /// Adds `gpu_hours` to `user`'s score, decayed with `half_life_ms` (one
    /// transaction).
    async fn add_usage(
        &self,
        user: &str,
        gpu_hours: f64,
        now_ms: u64,
        half_life_ms: u64,
    ) -> Result<()>;
    /// Every user's score, as last written.
    async fn usage_scores(&self) -> Result<Vec<(String, UsageScore)>>;
}

/// The usage ledger (see `kcloud_core::usage`).
#[async_trait]
pub trait UsageRepo: Send + Sync {
    /// Records devices a server started holding (open intervals).
    async fn open_usage(&self, intervals: Vec<UsageInterval>) -> Result<()>;
    /// Closes a server's open intervals at `end_ms`, adding them to the days they span
    /// (one transaction); `recovered` marks those days. Returns how many it closed.
    async fn close_usage(&self, server_id: &str, end_ms: u64, recovered: bool) -> Result<usize>;
    /// Servers with open intervals.
    async fn open_usage_servers(&self) -> Result<Vec<String>>;
    /// All-time totals by (user, model, profile), open intervals up to `now_ms`.
    async fn usage_totals(&self, now_ms: u64) -> Result<Vec<UsageTotal>>;
    /// Records that the aggregator was alive at `at_ms`.
    async fn mark_alive(&self, at_ms: u64) -> Result<()>;
    async fn last_alive(&self) -> Result<Option<u64>>;
    /// Normalized GPU-hours of days `[from_day, to_day)` grouped by `group_by`, one
    /// user's with `user`; open intervals counted up to `now_ms`.
    async fn usage(
        &self,
        from_day: u64,
        to_day: u64,
        group_by: GroupBy,
        user: Option<String>,
        now_ms: u64,
    ) -> Result<Vec<UsageRow>>;
    /// Adds to users' efficiency on `day` (one transaction).
    async fn add_efficiency(&self, day: u64, by_user: Vec<(String, Efficiency)>) -> Result<()>;
    /// Efficiency of days `[from_day, to_day)` per user, one user's with `user`.
    async fn efficiency(
        &self,
        from_day: u64,
        to_day: u64,
        user: Option<String>,
    ) -> Result<Vec<(String, Efficiency)>>;
}

/// All of it: what the SQLite store is.
pub trait Repository:
    UserRepo
    + SessionRepo
    + TokenRepo
    + GroupRepo
    + AuditRepo
    + ServerRepo
    + VolumeRepo
    + ReservationRepo
    + QueueRepo
    + UsageRepo
{
}

impl<T> Repository for T where
    T: UserRepo
        + SessionRepo
        + TokenRepo
        + GroupRepo
        + AuditRepo
        + ServerRepo
        + VolumeRepo
        + ReservationRepo
        + QueueRepo
        + UsageRepo
{
}

/// A server as the local shape records it: the server (its `upstream` unset) and how
/// to reach and signal its process.
#[derive(Clone, PartialEq, Eq)]
pub struct ServerRecord {
    /// `pid` is the process (and process group); `upstream` is never recorded.
    pub server: Server,
    /// The loopback port it listens on.
    pub port: Option<u16>,
    /// The process's start time (clock ticks since boot): a pid reused by another
    /// process after a reboot or wrap-around does not match it.
    pub pid_start: Option<u64>,
    /// The server's own Jupyter token; only the proxy uses it.
    pub token: String,
}

impl fmt::Debug for ServerRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerRecord")
            .field("server", &self.server)
            .field("port", &self.port)
            .field("pid_start", &self.pid_start)
            .field("token", &"<redacted>")
            .finish()
    }
}
