//! Where volumes' files live: a directory per volume on this host, or a PVC per volume
//! in the cluster. The volume service keeps the records and quotas; a backend only
//! makes, removes and finds the storage.

pub mod local;
pub mod pvc;

use std::path::PathBuf;

use async_trait::async_trait;
use kcloud_core::Result;
use kcloud_core::volume::{AccessMode, VolumeRow, VolumeStatus};

/// The storage behind volumes, one implementation per shape.
#[async_trait]
pub trait VolumeBackend: Send + Sync {
    /// Where a server on this host finds the volume (its mounts link there); `None`
    /// where servers mount it another way (a PVC).
    fn local_dir(&self, owner: &str, name: &str) -> Option<PathBuf>;

    /// Where the aggregator reaches the volume's files (503 while it cannot).
    async fn root(&self, owner: &str, name: &str) -> Result<PathBuf>;

    /// The access mode of a volume whose request names none: ReadWriteMany wherever it
    /// works.
    fn default_access_mode(&self) -> AccessMode;

    /// Refuses a mode this storage cannot give (400).
    fn check_access_mode(&self, mode: AccessMode) -> Result<()>;

    /// Makes the storage of a recorded volume.
    async fn create(&self, row: &VolumeRow) -> Result<()>;

    /// Removes a volume's storage and files (one already gone is fine).
    async fn delete(&self, owner: &str, name: &str) -> Result<()>;

    /// The status of a volume just created.
    fn new_status(&self) -> VolumeStatus;

    /// The status of each volume's storage, in the order given.
    async fn statuses(&self, rows: &[VolumeRow]) -> Result<Vec<VolumeStatus>>;
}
