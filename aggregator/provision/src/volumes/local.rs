//! The local shape's volumes: a directory `<data-dir>/volumes/{owner}/{volume}` each
//! (0700). Sizes are a quota on what the file browser writes; kernels writing through
//! a mount are not held to it.

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use kcloud_core::private::create_private_dir;
use kcloud_core::volume::{AccessMode, VolumeRow, VolumeStatus};
use kcloud_core::{Error, Result};

use super::VolumeBackend;

/// Volumes as directories under one directory of this host.
pub struct DirVolumes {
    volumes_dir: PathBuf,
}

impl DirVolumes {
    /// Volumes under `<data_dir>/volumes` (created, 0700).
    pub fn new(data_dir: &Path) -> Result<Self> {
        let volumes_dir = data_dir.join("volumes");
        create_private_dir(&volumes_dir)?;
        Ok(Self { volumes_dir })
    }

    fn dir(&self, owner: &str, name: &str) -> PathBuf {
        // Names are validated DNS labels: this cannot leave the volumes directory.
        self.volumes_dir.join(owner).join(name)
    }
}

#[async_trait]
impl VolumeBackend for DirVolumes {
    fn local_dir(&self, owner: &str, name: &str) -> Option<PathBuf> {
        Some(self.dir(owner, name))
    }

    async fn root(&self, owner: &str, name: &str) -> Result<PathBuf> {
        Ok(self.dir(owner, name))
    }

    fn default_access_mode(&self) -> AccessMode {
        AccessMode::ReadWriteMany
    }

    fn check_access_mode(&self, _mode: AccessMode) -> Result<()> {
        Ok(())
    }

    async fn create(&self, row: &VolumeRow) -> Result<()> {
        make_volume_dir(&self.dir(&row.owner, &row.name))
    }

    async fn delete(&self, owner: &str, name: &str) -> Result<()> {
        let dir = self.dir(owner, name);
        // Renamed first, so a new volume of the same name never sees old files even if
        // the removal is slow or fails half-way; remove_dir_all does not follow links.
        let trash = self
            .volumes_dir
            .join(format!(".deleted-{}", uuid::Uuid::new_v4()));
        let removed = tokio::task::spawn_blocking(move || match std::fs::rename(&dir, &trash) {
            Ok(()) => std::fs::remove_dir_all(&trash),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        })
        .await
        .map_err(|e| Error::Internal(format!("volume removal task: {e}")))?;
        if let Err(e) = removed {
            tracing::warn!(error = %e, owner, volume = name, "could not remove a deleted volume's files");
        }
        Ok(())
    }

    fn new_status(&self) -> VolumeStatus {
        VolumeStatus::Bound
    }

    async fn statuses(&self, rows: &[VolumeRow]) -> Result<Vec<VolumeStatus>> {
        Ok(rows
            .iter()
            .map(|r| {
                if self.dir(&r.owner, &r.name).is_dir() {
                    VolumeStatus::Bound
                } else {
                    VolumeStatus::Lost
                }
            })
            .collect())
    }
}

/// Creates a volume's directory. A leftover of the same name (a crash between record
/// and removal) is moved aside, never reused.
fn make_volume_dir(dir: &std::path::Path) -> Result<()> {
    if let Some(parent) = dir.parent() {
        create_private_dir(parent)?;
    }
    let io = |source| Error::Io {
        context: format!("creating volume directory {}", dir.display()),
        source,
    };
    match std::fs::create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let aside = dir.with_file_name(format!(".stale-{}", uuid::Uuid::new_v4()));
            std::fs::rename(dir, &aside).map_err(io)?;
            tracing::warn!(dir = %dir.display(), aside = %aside.display(), "moved a stale volume directory aside");
            std::fs::create_dir(dir).map_err(io)?;
        }
        Err(e) => return Err(io(e)),
    }
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io)?;
    Ok(())
}
