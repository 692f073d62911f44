//! kcloud-core: what every part of the aggregator shares and nothing below it.
//!
//! No I/O beyond reading the settings file and private files on disk; no HTTP, SQL,
//! Kubernetes or processes. The crates above depend on it and it depends on none of
//! them (see `docs/ARCHITECTURE.md`).

/// Who is acting: a signed-in user and their role, with the ownership checks.
pub mod caller;
/// Devices and requests for them: holders, exact UUIDs or placement requests.
pub mod device;
/// The one error type of the aggregator's crates and its `Result`.
pub mod error;
/// Groups: shared quotas and entitlements.
pub mod group;
/// How servers are kept apart (sandbox, pods, or none), as the API reports it.
pub mod isolation;
/// IDE profiles and the one place that builds what a server runs.
pub mod launch;
/// Files only the aggregator may read: private directories, secrets, random tokens.
pub mod private;
/// CPU, memory and size quantities as users write them.
pub mod quantity;
/// The wait queue's records and the fair-share score that orders it.
pub mod queue;
/// The storage the crates above need, as traits (SQLite implements them).
pub mod repo;
/// Devices booked for a future window, and the policy that limits them.
pub mod reservation;
/// JSON Schemas of quantities, sizes and names, for the OpenAPI document.
pub mod schema;
/// Servers: their spec, status, mounts, events, and how the proxy reaches them.
pub mod server;
/// The settings file (`--config`): presets, quotas, images, profiles, storage, ...
pub mod settings;
/// Change counters that wake live views.
pub mod signal;
/// The aggregator's clock.
pub mod time;
/// Personal API tokens: scopes, the stored record, the token's shape.
pub mod token;
/// The usage ledger: intervals devices were held, GPU-hours per day.
pub mod usage;
/// Users, roles, quotas, sessions and the audit log's entries.
pub mod user;
/// Names and paths that end up in URLs, paths and Kubernetes objects.
pub mod validate;
/// Volumes and shares as recorded and mounted.
pub mod volume;

pub use error::{Error, Result};
pub use time::now_ms;
