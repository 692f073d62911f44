//! Per-owner serialisation of creates and deletes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

/// A held lock of [`OwnerLocks`].
pub type OwnerGuard = tokio::sync::OwnedMutexGuard<()>;

/// Per-owner locks: creates and deletes of one owner's servers run one at a time, so
/// that name and quota checks see a settled state. Devices need no such lock (the
/// ledger is atomic), so different owners never wait for each other.
#[derive(Default)]
pub struct OwnerLocks {
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl OwnerLocks {
    /// Also used for groups, as `group:{name}` (never a user name: those have no `:`).
    pub async fn lock(&self, owner: &str) -> OwnerGuard {
        let lock = self
            .locks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(owner.to_owned())
            .or_default()
            .clone();
        lock.lock_owned().await
    }
}
