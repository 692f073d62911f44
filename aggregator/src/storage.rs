//! Storage: users' volumes, admin-defined NFS shares, and where their files live.
//!
//! Local shape: a volume is a directory `<data-dir>/volumes/{owner}/{volume}`, recorded
//! in SQLite; its size is a quota on what the file browser writes (kernels that write
//! through a mount are not held to it). Shares are reached at their configured
//! `local_path`. The file browser ([`files`]) opens everything relative to a root
//! directory handle, so no path can leave it.
//!
//! Sizes count apparent file sizes. A volume's usage is measured by a walk, at most
//! once per [`USAGE_TTL_MS`], and adjusted by the browser's own writes in between;
//! listings never walk.

pub mod files;
pub mod pvc;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::config::{Settings, Share, StorageSettings};
use crate::provisioner::{Mount, MountSource, Server, ServerStatus};
use crate::store::{Role, Store, VolumeRow};
use crate::{Error, Result, now_ms};

/// The home directory of a server; mounts go below it.
pub const HOME: &str = "/home/jovyan";
/// Where the first volume is mounted when the request names no path.
pub const DEFAULT_VOLUME_MOUNT: &str = "/home/jovyan/work";
/// A volume's measured usage is trusted this long.
pub const USAGE_TTL_MS: u64 = 60_000;
/// Mounts per server, at most.
pub const MAX_MOUNTS: usize = 16;

/// How a volume may be mounted: by one server at a time, or by many.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
pub enum AccessMode {
    ReadWriteOnce,
    ReadWriteMany,
}

impl AccessMode {
    pub fn as_str(self) -> &'static str {
        match self {
            AccessMode::ReadWriteOnce => "ReadWriteOnce",
            AccessMode::ReadWriteMany => "ReadWriteMany",
        }
    }

    pub fn parse(s: &str) -> Option<AccessMode> {
        match s {
            "ReadWriteOnce" => Some(AccessMode::ReadWriteOnce),
            "ReadWriteMany" => Some(AccessMode::ReadWriteMany),
            _ => None,
        }
    }
}

/// `pending` until the backing storage exists, `bound` when usable, `lost` when its
/// backing is gone.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum VolumeStatus {
    Pending,
    Bound,
    Lost,
}

/// A volume as the API shows it.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct Volume {
    pub name: String,
    pub owner: String,
    pub size_bytes: u64,
    /// Measured usage, when known (measured in the background; not on every listing).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub used_bytes: Option<u64>,
    pub access_mode: AccessMode,
    pub status: VolumeStatus,
    pub created_at_ms: u64,
    /// Servers that mount it.
    pub mounted_by: Vec<String>,
}

/// A share as the API shows it: never its server or export path.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct ShareView {
    pub name: String,
    pub read_only: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// A size: bytes, or a Kubernetes-style quantity (`"10Gi"`, `"500M"`).
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum Size {
    Bytes(u64),
    Text(String),
}

/// A volume to create.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewVolume {
    /// DNS-1123 label, unique per user.
    pub name: String,
    /// Default from `[storage] default_volume_bytes`.
    #[schema(value_type = Option<Object>)]
    pub size: Option<Size>,
    /// Default: `ReadWriteMany` where volumes are NFS-backed or local, else
    /// `ReadWriteOnce`.
    pub access_mode: Option<AccessMode>,
}

#[derive(Clone, Copy)]
struct Usage {
    bytes: u64,
    measured_at_ms: u64,
}

/// Volumes and shares. Cheap to share (`Arc`).
pub struct Storage {
    store: Store,
    settings: StorageSettings,
    shares: Vec<Share>,
    backing: Backing,
    usage: Mutex<HashMap<(String, String), Usage>>,
    /// Volumes being measured in the background.
    measuring: Mutex<std::collections::HashSet<(String, String)>>,
}

/// Where volumes live.
enum Backing {
    /// Local shape: `<data-dir>/volumes/{owner}/{volume}`.
    Local { volumes_dir: PathBuf },
    /// Cluster shape: a PVC each ([`pvc`]); their files through the NFS export that
    /// backs the class, mounted at `[storage] nfs_root`.
    Cluster {
        pvcs: Box<pvc::PvcClient>,
        namespace: String,
    },
}

impl Storage {
    /// The local shape: volumes are directories under `<data_dir>/volumes`.
    pub fn new(store: Store, settings: &Settings, data_dir: &std::path::Path) -> Result<Self> {
        let volumes_dir = data_dir.join("volumes");
        crate::auth::create_private_dir(&volumes_dir)?;
        Ok(Self::with(store, settings, Backing::Local { volumes_dir }))
    }

    /// The cluster shape: volumes are PVCs in `namespace`.
    pub fn cluster(
        store: Store,
        settings: &Settings,
        pvcs: pvc::PvcClient,
        namespace: &str,
    ) -> Self {
        let namespace = namespace.to_owned();
        let pvcs = Box::new(pvcs);
        Self::with(store, settings, Backing::Cluster { pvcs, namespace })
    }

    fn with(store: Store, settings: &Settings, backing: Backing) -> Self {
        Self {
            store,
            settings: settings.storage.clone(),
            shares: settings.shares.clone(),
            backing,
            usage: Mutex::new(HashMap::new()),
            measuring: Mutex::default(),
        }
    }

    /// Local shape: where a volume's files are (names are validated DNS labels, so
    /// this cannot leave the volumes directory). `None` in the cluster shape.
    pub fn local_dir(&self, owner: &str, name: &str) -> Option<PathBuf> {
        match &self.backing {
            Backing::Local { volumes_dir } => Some(volumes_dir.join(owner).join(name)),
            Backing::Cluster { .. } => None,
        }
    }

    /// Where the aggregator reaches a volume's files: its directory, or its PVC's
    /// folder under the mounted NFS export (503 while unbound or without one).
    pub async fn volume_root(&self, owner: &str, name: &str) -> Result<PathBuf> {
        match &self.backing {
            Backing::Local { volumes_dir } => Ok(volumes_dir.join(owner).join(name)),
            Backing::Cluster { pvcs, .. } => {
                let root = self.settings.nfs_root.as_deref().ok_or_else(|| {
                    Error::Unavailable(
                        "volumes' files cannot be browsed here: no NFS export is mounted \
                         ([storage] nfs_root)"
                            .into(),
                    )
                })?;
                pvcs.folder(
                    &pvc::pvc_name(owner, name),
                    root,
                    self.settings.nfs_export.as_deref(),
                )
                .await?
                .ok_or_else(|| {
                    Error::Unavailable(format!(
                        "volume {name:?} is not bound to storage the aggregator can reach yet"
                    ))
                })
            }
        }
    }

    /// ReadWriteMany wherever it works (local, NFS-backed), else ReadWriteOnce.
    fn default_access_mode(&self) -> AccessMode {
        match &self.backing {
            Backing::Cluster { .. } if !self.settings.nfs_backed => AccessMode::ReadWriteOnce,
            _ => AccessMode::ReadWriteMany,
        }
    }

    /// Validates and creates a volume within the owner's storage quota.
    pub async fn create(
        &self,
        owner: &str,
        req: NewVolume,
        quota_bytes: Option<u64>,
    ) -> Result<VolumeRow> {
        validate_volume_name(&req.name)?;
        let size_bytes = match &req.size {
            None => self.settings.default_volume_bytes,
            Some(s) => parse_size(s)?,
        };
        let max = self.settings.max_volume_bytes;
        if size_bytes == 0 || size_bytes > max {
            return Err(Error::BadRequest(format!(
                "size: 1 byte to {max} bytes (the configured largest volume)"
            )));
        }
        let access_mode = req.access_mode.unwrap_or(self.default_access_mode());
        if matches!(self.backing, Backing::Cluster { .. })
            && !pvc::allows(&self.settings, access_mode)
        {
            return Err(Error::BadRequest(
                "access_mode: ReadWriteMany needs an NFS-backed storage class, which this \
                 cluster does not have"
                    .into(),
            ));
        }
        let count = self.store.volumes(Some(owner)).await?.len();
        let max_count = self.settings.max_volumes_per_user as usize;
        if count >= max_count {
            return Err(Error::QuotaExceeded(format!(
                "volume quota exceeded: {owner} has {count} of {max_count} volumes"
            )));
        }
        let row = VolumeRow {
            owner: owner.to_owned(),
            name: req.name,
            size_bytes,
            access_mode,
            created_at_ms: now_ms(),
        };
        self.store.insert_volume(row.clone(), quota_bytes).await?;
        let made = match &self.backing {
            Backing::Local { volumes_dir } => {
                make_volume_dir(&volumes_dir.join(owner).join(&row.name))
            }
            Backing::Cluster { pvcs, namespace } => {
                pvcs.create(pvc::build(namespace, &row, &self.settings))
                    .await
            }
        };
        if let Err(e) = made {
            if let Err(e) = self.store.delete_volume(owner, &row.name).await {
                tracing::error!(error = %e, "could not remove the record of a volume whose directory failed");
            }
            return Err(e);
        }
        self.usage
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(
                (owner.to_owned(), row.name.clone()),
                Usage {
                    bytes: 0,
                    measured_at_ms: now_ms(),
                },
            );
        Ok(row)
    }

    /// Deletes a volume and its files; `false` if there was none. The caller checks
    /// that no server mounts it.
    pub async fn delete(&self, owner: &str, name: &str) -> Result<bool> {
        let volumes_dir = match &self.backing {
            Backing::Local { volumes_dir } => volumes_dir.clone(),
            Backing::Cluster { pvcs, .. } => {
                // The PVC first: if the API is down the volume stays, recorded.
                if self.store.volume(owner, name).await?.is_none() {
                    return Ok(false);
                }
                pvcs.delete(&pvc::pvc_name(owner, name)).await?;
                self.forget_usage(owner, name);
                return self.store.delete_volume(owner, name).await;
            }
        };
        if !self.store.delete_volume(owner, name).await? {
            return Ok(false);
        }
        self.usage
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&(owner.to_owned(), name.to_owned()));
        let dir = volumes_dir.join(owner).join(name);
        // Renamed first, so a new volume of the same name never sees old files even if
        // the removal is slow or fails half-way; remove_dir_all does not follow links.
        let trash = volumes_dir.join(format!(".deleted-{}", uuid::Uuid::new_v4()));
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
        Ok(true)
    }

    pub async fn volume(&self, owner: &str, name: &str) -> Result<Option<VolumeRow>> {
        self.store.volume(owner, name).await
    }

    /// The owner's volumes (everyone's with `None`) as the API shows them, with the
    /// servers that mount each. Stale usage is measured in the background.
    pub async fn list(
        self: &Arc<Self>,
        owner: Option<&str>,
        servers: &[Server],
    ) -> Result<Vec<Volume>> {
        let rows = self.store.volumes(owner).await?;
        let statuses = match &self.backing {
            Backing::Local { .. } => None,
            Backing::Cluster { pvcs, .. } => Some(pvcs.statuses().await?),
        };
        Ok(rows
            .into_iter()
            .map(|r| {
                let status = statuses.as_ref().map(|s| {
                    s.get(&pvc::pvc_name(&r.owner, &r.name))
                        .copied()
                        .unwrap_or(VolumeStatus::Lost)
                });
                self.view(r, servers, status)
            })
            .collect())
    }

    /// A volume as the API shows it; `status` from the cluster, or `None` to look
    /// (local: its directory exists; cluster: pending).
    pub fn view(
        self: &Arc<Self>,
        row: VolumeRow,
        servers: &[Server],
        status: Option<VolumeStatus>,
    ) -> Volume {
        let key = (row.owner.clone(), row.name.clone());
        let usage = self
            .usage
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&key)
            .copied();
        let stale = usage.is_none_or(|u| now_ms().saturating_sub(u.measured_at_ms) > USAGE_TTL_MS);
        // One walk per volume at a time, however often it is listed.
        if stale
            && self
                .measuring
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(key.clone())
        {
            let me = self.clone();
            tokio::spawn(async move {
                if let Err(e) = me.measure(&key.0, &key.1).await {
                    tracing::debug!(error = %e, "measuring a volume failed");
                }
                me.measuring
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&key);
            });
        }
        let status = status.unwrap_or_else(|| match self.local_dir(&row.owner, &row.name) {
            Some(dir) if dir.is_dir() => VolumeStatus::Bound,
            Some(_) => VolumeStatus::Lost,
            None => VolumeStatus::Pending,
        });
        Volume {
            mounted_by: mounted_by(servers, &row.owner, &row.name, false),
            name: row.name,
            owner: row.owner,
            size_bytes: row.size_bytes,
            used_bytes: usage.map(|u| u.bytes),
            access_mode: row.access_mode,
            status,
            created_at_ms: row.created_at_ms,
        }
    }

    /// Walks the volume and records its usage.
    async fn measure(&self, owner: &str, name: &str) -> Result<u64> {
        let dir = self.volume_root(owner, name).await?;
        let bytes = tokio::task::spawn_blocking(move || files::Root::open(&dir, false)?.usage())
            .await
            .map_err(|e| Error::Internal(format!("usage task: {e}")))??;
        self.usage
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(
                (owner.to_owned(), name.to_owned()),
                Usage {
                    bytes,
                    measured_at_ms: now_ms(),
                },
            );
        Ok(bytes)
    }

    /// The volume's usage, measured if the last measurement is stale.
    pub async fn used_bytes(&self, owner: &str, name: &str) -> Result<u64> {
        let known = self
            .usage
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&(owner.to_owned(), name.to_owned()))
            .copied();
        match known {
            Some(u) if now_ms().saturating_sub(u.measured_at_ms) <= USAGE_TTL_MS => Ok(u.bytes),
            _ => self.measure(owner, name).await,
        }
    }

    /// Adjusts the known usage after the browser wrote (`delta` > 0) or removed bytes.
    pub fn adjust_usage(&self, owner: &str, name: &str, delta: i64) {
        if let Some(u) = self
            .usage
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_mut(&(owner.to_owned(), name.to_owned()))
        {
            u.bytes = u.bytes.saturating_add_signed(delta);
        }
    }

    /// Forgets the known usage, so that the next write measures again.
    pub fn forget_usage(&self, owner: &str, name: &str) {
        self.usage
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&(owner.to_owned(), name.to_owned()));
    }

    /// The shares `user` may use, by name.
    pub fn shares_for(&self, user: &str, role: Role) -> Vec<ShareView> {
        let mut out: Vec<ShareView> = self
            .shares
            .iter()
            .filter(|s| s.allows(user, role))
            .map(|s| ShareView {
                name: s.name.clone(),
                read_only: s.read_only,
                description: s.description.clone(),
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// A share `user` may use; any other name is 404.
    pub fn share(&self, user: &str, role: Role, name: &str) -> Result<&Share> {
        self.shares
            .iter()
            .find(|s| s.name == name && s.allows(user, role))
            .ok_or_else(|| Error::NotFound(format!("no share {name:?}")))
    }

    /// Resolves a server's requested mounts for `owner` (the server's owner, whose
    /// rights count, also when an admin creates it): volumes of another user or
    /// unknown ones are 404, paths are checked and defaulted. `servers`: the owner's
    /// servers, for the ReadWriteOnce check.
    pub async fn resolve_mounts(
        &self,
        owner: &str,
        owner_role: Role,
        requests: Vec<MountRequest>,
        servers: &[Server],
    ) -> Result<Vec<Mount>> {
        if requests.len() > MAX_MOUNTS {
            return Err(Error::BadRequest(format!(
                "volumes: at most {MAX_MOUNTS} per server"
            )));
        }
        let mut out: Vec<Mount> = Vec::with_capacity(requests.len());
        let mut first_volume = true;
        for req in requests {
            let (source, default_path, read_only) = match (req.volume, req.share) {
                (Some(name), None) => {
                    let row = self
                        .store
                        .volume(owner, &name)
                        .await?
                        .ok_or_else(|| Error::NotFound(format!("no volume {name:?}")))?;
                    if out.iter().any(|m| m.volume() == Some(name.as_str())) {
                        return Err(Error::BadRequest(format!(
                            "volumes: {name:?} is listed twice"
                        )));
                    }
                    if row.access_mode == AccessMode::ReadWriteOnce {
                        let users = mounted_by(servers, owner, &name, true);
                        if !users.is_empty() {
                            return Err(Error::Conflict(format!(
                                "volume {name:?} is ReadWriteOnce and already mounted by {}",
                                users.join(", ")
                            )));
                        }
                    }
                    let default = if first_volume {
                        DEFAULT_VOLUME_MOUNT.to_owned()
                    } else {
                        format!("{HOME}/{name}")
                    };
                    first_volume = false;
                    let source = MountSource::Volume {
                        local_path: self.local_dir(owner, &name),
                        name,
                    };
                    (source, default, req.read_only.unwrap_or(false))
                }
                (None, Some(name)) => {
                    let share = self.share(owner, owner_role, &name)?;
                    if req.read_only == Some(false) && share.read_only {
                        return Err(Error::Forbidden(format!("share {name:?} is read-only")));
                    }
                    let source = MountSource::Share {
                        name: share.name.clone(),
                        server: share.server.clone(),
                        path: share.path.clone(),
                        local_path: share.local_path.clone(),
                    };
                    (
                        source,
                        format!("{HOME}/shares/{name}"),
                        share.read_only || req.read_only.unwrap_or(false),
                    )
                }
                _ => {
                    return Err(Error::BadRequest(
                        "volumes: each entry names either `volume` or `share`".into(),
                    ));
                }
            };
            let mount_path = match req.mount_path {
                Some(p) => validate_mount_path(&p)?,
                None => default_path,
            };
            if let Some(other) = out
                .iter()
                .find(|m| nested(&m.mount_path, &mount_path) || nested(&mount_path, &m.mount_path))
            {
                return Err(Error::BadRequest(format!(
                    "volumes: mount paths {} and {mount_path} overlap",
                    other.mount_path
                )));
            }
            out.push(Mount {
                source,
                mount_path,
                read_only,
            });
        }
        Ok(out)
    }
}

/// One entry of `CreateServer.volumes`: a volume or a share by name, where to mount it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MountRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub share: Option<String>,
    /// Under `/home/jovyan`; default `/home/jovyan/work` for the first volume,
    /// `/home/jovyan/{volume}` for others, `/home/jovyan/shares/{share}` for shares.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mount_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_only: Option<bool>,
}

impl From<&Mount> for MountRequest {
    fn from(m: &Mount) -> Self {
        let (volume, share) = match &m.source {
            MountSource::Volume { name, .. } => (Some(name.clone()), None),
            MountSource::Share { name, .. } => (None, Some(name.clone())),
        };
        MountRequest {
            volume,
            share,
            mount_path: Some(m.mount_path.clone()),
            read_only: Some(m.read_only),
        }
    }
}

/// Names of `owner`'s servers that mount volume `name`; with `live_only`, only those
/// that are not failed.
pub fn mounted_by(servers: &[Server], owner: &str, name: &str, live_only: bool) -> Vec<String> {
    servers
        .iter()
        .filter(|s| s.owner == owner && !(live_only && s.status == ServerStatus::Failed))
        .filter(|s| s.mounts.iter().any(|m| m.volume() == Some(name)))
        .map(|s| s.name.clone())
        .collect()
}

/// Whether `inner` is `outer` or below it, by whole components.
fn nested(outer: &str, inner: &str) -> bool {
    inner == outer || inner.starts_with(&format!("{outer}/"))
}

/// A mount path: absolute, strictly under `/home/jovyan`, plain components of
/// `A-Za-z0-9._-` (not `.` or `..`), at most 255 bytes in all.
pub fn validate_mount_path(p: &str) -> Result<String> {
    let err = || {
        Error::BadRequest(format!(
            "mount_path {:?}: must be below {HOME}, made of names of A-Z, a-z, 0-9, '.', '_', '-'",
            p.chars().take(64).collect::<String>()
        ))
    };
    let p = p.strip_suffix('/').unwrap_or(p);
    let rest = p
        .strip_prefix(HOME)
        .and_then(|r| r.strip_prefix('/'))
        .ok_or_else(err)?;
    let ok = p.len() <= 255
        && rest.split('/').all(|c| {
            !c.is_empty()
                && c != "."
                && c != ".."
                && c.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        });
    if ok { Ok(p.to_owned()) } else { Err(err()) }
}

/// A volume name: a DNS-1123 label, since it names a directory and a PVC.
pub fn validate_volume_name(name: &str) -> Result<()> {
    crate::provisioner::validate_server_name(name).map_err(|_| {
        Error::BadRequest(
            "volume name must be a DNS-1123 label: 1-63 characters of a-z, 0-9 and '-', \
             starting and ending with a letter or digit"
                .into(),
        )
    })
}

/// Bytes from a number or a quantity (`Ki` .. `Ti` binary, `k` .. `T` decimal; whole
/// numbers only).
pub fn parse_size(s: &Size) -> Result<u64> {
    let err =
        || Error::BadRequest("size: bytes, or a quantity such as \"10Gi\" or \"500M\"".into());
    match s {
        Size::Bytes(b) => Ok(*b),
        Size::Text(t) => {
            let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
            let (num, suffix) = t.split_at(split);
            let factor: u64 = match suffix {
                "" => 1,
                "k" => 1_000,
                "M" => 1_000_000,
                "G" => 1_000_000_000,
                "T" => 1_000_000_000_000,
                "Ki" => 1 << 10,
                "Mi" => 1 << 20,
                "Gi" => 1 << 30,
                "Ti" => 1 << 40,
                _ => return Err(err()),
            };
            num.parse::<u64>()
                .ok()
                .and_then(|n| n.checked_mul(factor))
                .ok_or_else(err)
        }
    }
}

/// Creates a volume's directory. A leftover of the same name (a crash between record
/// and removal) is moved aside, never reused.
fn make_volume_dir(dir: &std::path::Path) -> Result<()> {
    if let Some(parent) = dir.parent() {
        crate::auth::create_private_dir(parent)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size(&Size::Bytes(5)).unwrap(), 5);
        assert_eq!(parse_size(&Size::Text("10Gi".into())).unwrap(), 10 << 30);
        assert_eq!(parse_size(&Size::Text("500M".into())).unwrap(), 500_000_000);
        assert_eq!(parse_size(&Size::Text("7".into())).unwrap(), 7);
        for bad in [
            "",
            "Gi",
            "1.5Gi",
            "-1Gi",
            "10GB",
            "99999999999999999999Ti",
            "1Pi",
        ] {
            assert!(parse_size(&Size::Text(bad.into())).is_err(), "{bad}");
        }
    }

    #[test]
    fn mount_paths() {
        for ok in [
            "/home/jovyan/work",
            "/home/jovyan/data/raw",
            "/home/jovyan/a.b_c-1/",
        ] {
            assert!(validate_mount_path(ok).is_ok(), "{ok}");
        }
        for bad in [
            "/home/jovyan",
            "/home/jovyan/",
            "/home/jovyanx/work",
            "/etc",
            "work",
            "/home/jovyan/../etc",
            "/home/jovyan/./work",
            "/home/jovyan//work",
            "/home/jovyan/wo rk",
            "/home/jovyan/a\0b",
            &format!("/home/jovyan/{}", "a".repeat(300)),
        ] {
            assert!(validate_mount_path(bad).is_err(), "{bad}");
        }
        assert!(nested("/home/jovyan/work", "/home/jovyan/work/x"));
        assert!(nested("/home/jovyan/work", "/home/jovyan/work"));
        assert!(!nested("/home/jovyan/work", "/home/jovyan/workshop"));
    }
}
