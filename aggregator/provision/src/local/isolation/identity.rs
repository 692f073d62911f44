//! Whose uid a sandboxed server runs as: never root, never the aggregator's.
//!
//! - `range` (the default): a uid of `[local] uid_range` per kcloud user, allocated on
//!   first use and recorded for good (the gid is the same number);
//! - `system`: the owner's own account on this host (looked up by name through NSS, so
//!   LDAP or SSSD accounts count): files in volumes then belong to the person.

use std::path::Path;

use kcloud_core::repo::ServerRepo;
use kcloud_core::settings::{Identities, LocalSettings};
use kcloud_core::{Error, Result};

/// The uid and gid a server runs as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Identity {
    pub(crate) uid: u32,
    pub(crate) gid: u32,
}

/// `owner`'s identity under `settings`.
pub(crate) async fn identity(
    settings: &LocalSettings,
    store: &dyn ServerRepo,
    owner: &str,
) -> Result<Identity> {
    match settings.identities {
        Identities::Range => {
            let [first, last] = settings.uid_range;
            let uid = store.local_uid(owner, first, last).await?;
            Ok(Identity { uid, gid: uid })
        }
        Identities::System => {
            let owner = owner.to_owned();
            let user = tokio::task::spawn_blocking(move || nix::unistd::User::from_name(&owner))
                .await
                .map_err(|e| Error::Internal(format!("account lookup task: {e}")))?
                .map_err(|e| Error::Internal(format!("looking up a system account: {e}")))?;
            match user {
                Some(u) if u.uid.as_raw() != 0 => Ok(Identity {
                    uid: u.uid.as_raw(),
                    gid: u.gid.as_raw(),
                }),
                Some(_) => Err(Error::Forbidden(
                    "servers never run as root: this kcloud user maps to uid 0".into(),
                )),
                None => Err(Error::BadRequest(
                    "there is no system account of this user's name on this host \
                     ([local] identities = \"system\"); an admin must create it"
                        .into(),
                )),
            }
        }
    }
}

/// Gives `dir` and everything below it (not following links) to `id`, unless `dir`
/// already belongs to it: a volume a server mounts for the first time (made by the
/// aggregator, as root) becomes its owner's. Only a tree the aggregator owns is
/// walked, one no unprivileged process has written to (so no link can be swapped in
/// under the walk); a volume of another uid (another identity scheme) is refused.
pub(crate) fn adopt_tree(dir: &Path, id: Identity) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let io = |source| Error::Io {
        context: format!("giving {} to uid {}", dir.display(), id.uid),
        source,
    };
    let meta = std::fs::symlink_metadata(dir).map_err(io)?;
    if meta.uid() == id.uid && meta.gid() == id.gid {
        return Ok(());
    }
    if meta.uid() != rustix::process::geteuid().as_raw() {
        return Err(Error::Conflict(format!(
            "{} belongs to uid {}, not this user's uid {}: an admin must give it to them              (chown -R {}:{})",
            dir.display(),
            meta.uid(),
            id.uid,
            id.uid,
            id.gid
        )));
    }
    walk_chown(dir, id).map_err(io)
}

fn walk_chown(dir: &Path, id: Identity) -> std::io::Result<()> {
    let mut stack = vec![dir.to_owned()];
    while let Some(p) = stack.pop() {
        let meta = std::fs::symlink_metadata(&p)?;
        std::os::unix::fs::lchown(&p, Some(id.uid), Some(id.gid))?;
        if meta.is_dir() {
            for entry in std::fs::read_dir(&p)? {
                stack.push(entry?.path());
            }
        }
    }
    Ok(())
}

/// Makes `dir` (and its parents) and gives it to `id`, mode 0700.
pub(crate) fn owned_dir(dir: &Path, id: Identity) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let io = |source| Error::Io {
        context: format!("preparing {}", dir.display()),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    std::os::unix::fs::lchown(dir, Some(id.uid), Some(id.gid)).map_err(io)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io)
}
