//! Per-owner serialisation of creates and deletes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

/// Per-owner locks: creates and deletes of one owner's servers run one at a time, so
/// that name and quota checks see a settled state. Devices need no such lock (the
/// ledger is atomic), so different owners never wait for each other.
#[derive(Default)]
pub struct OwnerLocks {
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl OwnerLocks {
    pub async fn lock(&self, owner: &str) -> tokio::sync::OwnedMutexGuard<()> {
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
