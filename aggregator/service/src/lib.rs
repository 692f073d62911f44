//! kcloud-service: the aggregator's use cases, between the HTTP layer and the
//! infrastructure (cluster view, store, provisioners).
//!
//! Each use case checks who may do it, does it through the small traits of the
//! crates below, and writes its audit entry. [`servers::Servers`] is the only caller
//! of the ledger's release.

/// Writing the audit log.
pub mod audit;
/// Sign-in: passwords, keys, rate limits, tokens, and who a token stands for.
pub mod auth;
/// Stopping servers nobody uses.
pub mod culler;
/// The file browser's operations, confined to one root directory.
pub mod files;
/// Groups: shared quotas and what their members may use.
pub mod groups;
/// Per-owner serialisation of creates and deletes.
pub mod locks;
/// Notices to a webhook (queue starts, reservations, stops).
pub mod notify;
/// Node figures and history from Prometheus.
pub mod prometheus;
/// Reservations of devices for future windows.
pub mod reservations;
/// Servers: create (or wait in the queue), delete, cull, their end, logs and events.
pub mod servers;
/// Usage accounting: GPU-hours per user, model, node and day.
pub mod usage;
/// User administration and the signed-in user's own view.
pub mod users;
/// Volumes, shares, mounts and the file browser's roots.
pub mod volumes;
