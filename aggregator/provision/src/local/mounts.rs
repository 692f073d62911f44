//! Mounts in the local shape without a sandbox (`--isolation none`): each volume or share
//! as a symlink in the server's home. (Sandboxed servers get bind mounts instead.)

use std::path::{Path, PathBuf};

use kcloud_core::server::{Mount, MountSource};
use kcloud_core::volume::HOME;
use kcloud_core::{Error, Result};

/// Where a mount appears in the server's working directory (its home): the mount path
/// relative to `/home/jovyan`. `None` for a path the API should have refused.
fn mount_link(work: &Path, mount_path: &str) -> Option<PathBuf> {
    let rel = mount_path.strip_prefix(HOME)?.strip_prefix('/')?;
    let rel = Path::new(rel);
    let normal = rel
        .components()
        .all(|c| matches!(c, std::path::Component::Normal(_)));
    (normal && rel.components().next().is_some()).then(|| work.join(rel))
}

/// Makes each mount a symlink in the server's home (`/home/jovyan/work` → `work/`),
/// replacing links left by an earlier server of the same name. Something real in the
/// way is a conflict: the user's files are never moved or removed. Read-only is not
/// enforced here: local servers run as the aggregator's Unix user.
pub(crate) fn link_mounts(work: &Path, mounts: &[Mount]) -> Result<()> {
    for m in mounts {
        let (MountSource::Volume { local_path, .. } | MountSource::Share { local_path, .. }) =
            &m.source;
        let target = local_path.as_ref().ok_or_else(|| {
            Error::Unavailable(format!(
                "{} cannot be mounted on this host (no local path)",
                m.mount_path
            ))
        })?;
        let link = mount_link(work, &m.mount_path)
            .ok_or_else(|| Error::BadRequest(format!("bad mount path {:?}", m.mount_path)))?;
        let io = |source| Error::Io {
            context: format!("linking {}", link.display()),
            source,
        };
        if let Some(parent) = link.parent() {
            std::fs::create_dir_all(parent).map_err(io)?;
        }
        match std::fs::symlink_metadata(&link) {
            Ok(meta) if meta.file_type().is_symlink() => std::fs::remove_file(&link).map_err(io)?,
            Ok(_) => {
                return Err(Error::Conflict(format!(
                    "{} already exists in this server's home; move it away or mount elsewhere",
                    m.mount_path
                )));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(e)),
        }
        std::os::unix::fs::symlink(target, &link).map_err(io)?;
    }
    Ok(())
}

/// Removes the links `link_mounts` made, and the empty folders a sandbox's mounts used
/// as mount points (only those: never files a user put there, never a folder with
/// anything in it).
pub(crate) fn unlink_mounts(work: &Path, mounts: &[Mount]) {
    for m in mounts {
        let Some(link) = mount_link(work, &m.mount_path) else {
            continue;
        };
        let removed = match std::fs::symlink_metadata(&link) {
            Ok(meta) if meta.file_type().is_symlink() => std::fs::remove_file(&link),
            // Fails, harmlessly, unless the folder is empty.
            Ok(meta) if meta.is_dir() => std::fs::remove_dir(&link).or(Ok(())),
            _ => Ok(()),
        };
        if let Err(e) = removed {
            tracing::warn!(error = %e, link = %link.display(), "could not remove a mount link");
        }
    }
}
