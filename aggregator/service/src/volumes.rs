//! Storage: users' volumes, admin-defined NFS shares, what servers mount, and the
//! roots the file browser works in.
//!
//! The records and quotas live here; the storage itself is a
//! [`VolumeBackend`](kcloud_provision::volumes::VolumeBackend) per shape (directories
//! locally, PVCs in a cluster). Sizes count apparent file sizes. A volume's usage is
//! measured by a walk, at most once per [`USAGE_TTL_MS`], and adjusted by the
//! browser's own writes in between; listings never walk.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use kcloud_core::caller::Caller;
use kcloud_core::repo::Repository;
use kcloud_core::server::{Mount, MountSource, Server, ServerStatus};
use kcloud_core::settings::{DefaultQuota, Share, StorageSettings};
use kcloud_core::user::Role;
use kcloud_core::validate::validate_volume_name;
use kcloud_core::volume::{
    AccessMode, DEFAULT_VOLUME_MOUNT, HOME, MAX_MOUNTS, Size, VolumeRow, VolumeStatus, nested,
    parse_size, validate_mount_path,
};
use kcloud_core::{Error, Result, now_ms};
use kcloud_provision::Provisioner;
use kcloud_provision::volumes::VolumeBackend;

use crate::audit::Audit;
use crate::files::{Root, blocking};
use crate::locks::OwnerLocks;

/// A volume's measured usage is trusted this long.
pub const USAGE_TTL_MS: u64 = 60_000;

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

/// What a file request acts on: a root, and the volume whose usage it changes.
pub struct FileTarget {
    pub root: Arc<Root>,
    /// `(owner, name, size_bytes)` of a volume; `None` for a share.
    pub volume: Option<(String, String, u64)>,
}

#[derive(Clone, Copy)]
struct Usage {
    bytes: u64,
    measured_at_ms: u64,
}

/// Volumes and shares. Share it as `Arc<Volumes>`.
pub struct Volumes {
    repo: Arc<dyn Repository>,
    audit: Audit,
    backend: Box<dyn VolumeBackend>,
    provisioner: Arc<dyn Provisioner>,
    settings: StorageSettings,
    default_quota: DefaultQuota,
    shares: Vec<Share>,
    locks: Arc<OwnerLocks>,
    /// What users may use: shares are among a group's entitlements.
    groups: Arc<crate::groups::Groups>,
    usage: Mutex<HashMap<(String, String), Usage>>,
    /// Volumes being measured in the background.
    measuring: Mutex<HashSet<(String, String)>>,
}

impl Volumes {
    pub fn new(
        repo: Arc<dyn Repository>,
        backend: Box<dyn VolumeBackend>,
        provisioner: Arc<dyn Provisioner>,
        settings: &kcloud_core::settings::Settings,
        locks: Arc<OwnerLocks>,
        groups: Arc<crate::groups::Groups>,
    ) -> Self {
        Self {
            groups,
            audit: Audit::new(repo.clone()),
            repo,
            backend,
            provisioner,
            settings: settings.storage.clone(),
            default_quota: settings.default_quota.clone(),
            shares: settings.shares.clone(),
            locks,
            usage: Mutex::default(),
            measuring: Mutex::default(),
        }
    }

    /// One user's volumes (admins: anyone's), with the servers that mount each.
    pub async fn list(self: &Arc<Self>, caller: &Caller, owner: &str) -> Result<Vec<Volume>> {
        caller.may_see_user(owner)?;
        let servers = self.provisioner.list(Some(owner));
        let rows = self.repo.volumes(Some(owner)).await?;
        let statuses = self.backend.statuses(&rows).await?;
        Ok(rows
            .into_iter()
            .zip(statuses)
            .map(|(r, status)| self.view(r, &servers, status))
            .collect())
    }

    /// Creates a volume within the owner's storage quota (429 past it).
    pub async fn create(
        self: &Arc<Self>,
        caller: &Caller,
        client: IpAddr,
        owner: &str,
        req: NewVolume,
    ) -> Result<Volume> {
        caller.may_see_user(owner)?;
        let user = self.repo.existing_user(owner).await?;
        let quota = user.quota.effective(&self.default_quota).storage_bytes;
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
        let access_mode = req
            .access_mode
            .unwrap_or(self.backend.default_access_mode());
        self.backend.check_access_mode(access_mode)?;
        let count = self.repo.volumes(Some(owner)).await?.len();
        let max_count = self.settings.max_volumes_per_user as usize;
        if count >= max_count {
            return Err(Error::QuotaExceeded(format!(
                "volume quota exceeded: {owner} has {count} of {max_count} volumes"
            )));
        }
        // Groups with a storage quota: their members' volumes together, under each
        // group's lock (members create one at a time; the user's own quota is checked
        // by the store, in the insert's transaction).
        let mut _groups = Vec::new();
        for g in self.repo.groups_of(owner).await? {
            let Some(max) = g.quota.storage_bytes else {
                continue;
            };
            _groups.push(self.locks.lock(&format!("group:{}", g.name)).await);
            let mut used = 0u64;
            for m in &g.members {
                used += self
                    .repo
                    .volumes(Some(m))
                    .await?
                    .iter()
                    .map(|v| v.size_bytes)
                    .sum::<u64>();
            }
            if used.saturating_add(size_bytes) > max {
                return Err(Error::QuotaExceeded(format!(
                    "storage quota exceeded: group {} uses {used} of {max} bytes and asked \
                     for {size_bytes} more",
                    g.name
                )));
            }
        }
        let row = VolumeRow {
            owner: owner.to_owned(),
            name: req.name,
            size_bytes,
            access_mode,
            created_at_ms: now_ms(),
        };
        self.repo.insert_volume(row.clone(), quota).await?;
        if let Err(e) = self.backend.create(&row).await {
            if let Err(e) = self.repo.delete_volume(owner, &row.name).await {
                tracing::error!(error = %e, "could not remove the record of a volume whose storage failed");
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
        self.audit
            .record(
                caller,
                client,
                "volume_create",
                format!("{owner}/{}", row.name),
                format!(
                    "size_bytes={} access_mode={}",
                    row.size_bytes,
                    row.access_mode.as_str()
                ),
            )
            .await?;
        let status = self.backend.new_status();
        Ok(self.view(row, &[], status))
    }

    /// Deletes a volume and its files. 409 while a server that has not failed mounts
    /// it; another user's (or none) is 404.
    pub async fn delete(
        &self,
        caller: &Caller,
        client: IpAddr,
        owner: &str,
        name: &str,
    ) -> Result<()> {
        let not_found = || Error::NotFound(format!("no volume {owner}/{name}"));
        caller.may_see_user(owner).map_err(|_| not_found())?;
        // The servers' lock: a server being created cannot mount it meanwhile.
        let _serial = self.locks.lock(owner).await;
        self.repo.volume(owner, name).await?.ok_or_else(not_found)?;
        let users = mounted_by(&self.provisioner.list(Some(owner)), owner, name, true);
        if !users.is_empty() {
            return Err(Error::Conflict(format!(
                "volume {name:?} is mounted by {}; delete those servers first",
                users.join(", ")
            )));
        }
        if !self.remove(owner, name).await? {
            return Err(not_found());
        }
        self.audit
            .record(
                caller,
                client,
                "volume_delete",
                format!("{owner}/{name}"),
                String::new(),
            )
            .await
    }

    /// Removes a volume's storage, then its record; `false` if there was none. The
    /// caller holds the owner's lock and has checked that no server mounts it.
    pub(crate) async fn remove(&self, owner: &str, name: &str) -> Result<bool> {
        if self.repo.volume(owner, name).await?.is_none() {
            return Ok(false);
        }
        // The storage first: where the cluster's API is down, the volume stays recorded.
        self.backend.delete(owner, name).await?;
        self.forget_usage(owner, name);
        self.repo.delete_volume(owner, name).await
    }

    /// A volume as the API shows it.
    fn view(self: &Arc<Self>, row: VolumeRow, servers: &[Server], status: VolumeStatus) -> Volume {
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
        let dir = self.backend.root(owner, name).await?;
        let bytes = blocking(move || Root::open(&dir, false)?.usage()).await?;
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

    /// The shares `caller` may use, by name: the share's own roles and users, and the
    /// caller's groups' entitlements.
    pub async fn shares(&self, caller: &Caller) -> Result<Vec<ShareView>> {
        let e = self.groups.entitlements(&caller.name, caller.role).await?;
        let mut out: Vec<ShareView> = self
            .shares
            .iter()
            .filter(|s| s.allows(&caller.name, caller.role))
            .filter(|s| e.allows(kcloud_core::group::Use::Share(&s.name)))
            .map(|s| ShareView {
                name: s.name.clone(),
                read_only: s.read_only,
                description: s.description.clone(),
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// A share `user` may use; any other name is 404.
    fn share(&self, user: &str, role: Role, name: &str) -> Result<&Share> {
        self.shares
            .iter()
            .find(|s| s.name == name && s.allows(user, role))
            .ok_or_else(|| Error::NotFound(format!("no share {name:?}")))
    }

    /// The file browser's root in a volume `caller` may see (another user's is 404).
    pub async fn volume_files(
        &self,
        caller: &Caller,
        owner: &str,
        name: &str,
    ) -> Result<FileTarget> {
        let not_found = || Error::NotFound(format!("no volume {owner}/{name}"));
        caller.may_see_user(owner).map_err(|_| not_found())?;
        let row = self.repo.volume(owner, name).await?.ok_or_else(not_found)?;
        let dir = self.backend.root(owner, name).await?;
        let root = blocking(move || Root::open(&dir, false)).await?;
        Ok(FileTarget {
            root: Arc::new(root),
            volume: Some((row.owner, row.name, row.size_bytes)),
        })
    }

    /// The file browser's root in a share `caller` may use (read-only ones refuse
    /// writes).
    pub async fn share_files(&self, caller: &Caller, name: &str) -> Result<FileTarget> {
        let share = self.share(&caller.name, caller.role, name)?;
        self.groups
            .entitlements(&caller.name, caller.role)
            .await?
            .check(kcloud_core::group::Use::Share(name))?;
        let local = share.local_path.clone().ok_or_else(|| {
            Error::Unavailable(format!(
                "share {name:?} is not mounted where the aggregator can browse it"
            ))
        })?;
        let read_only = share.read_only;
        let root = blocking(move || Root::open(&local, read_only)).await?;
        Ok(FileTarget {
            root: Arc::new(root),
            volume: None,
        })
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
                        .repo
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
                        local_path: self.backend.local_dir(owner, &name),
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

    /// Where a volume's files are for a server on this host (local shape).
    pub fn local_dir(&self, owner: &str, name: &str) -> Option<PathBuf> {
        self.backend.local_dir(owner, name)
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
