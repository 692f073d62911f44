//! Servers: create (validate → quota → claim devices → provision → commit), delete,
//! cull and the end of a server that stopped by itself. This module is the only one
//! that gives devices back to the ledger and the only writer of servers' audit
//! entries.
//!
//! Another user's server is 404 (admins see and delete all). Delete stops the server
//! and frees its devices before it returns; a server that does not exist (never did,
//! or already deleted) is 404, so a repeated delete changes nothing and says so.
//! Creates and deletes run to their end even when the caller goes away: one dropped
//! between the provisioner and the ledger would leave a server whose claim the
//! sweep later hands out again, or a deleted server whose devices stay held.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use utoipa::ToSchema;

use kcloud_cluster::Cluster;
use kcloud_core::caller::Caller;
use kcloud_core::device::{DeviceRequest, Holder, MAX_DEVICES_PER_REQUEST, valid_uuid};
use kcloud_core::launch::{CUSTOM_PROFILE, DEFAULT_PROFILE, Launch, RunProfile, validate_launch};
use kcloud_core::quantity::{Quantity, cpu_millis, memory_bytes};
use kcloud_core::repo::Repository;
use kcloud_core::server::{Server, ServerEvent, ServerSpec, ServerStatus};
use kcloud_core::settings::Settings;
use kcloud_core::user::Usage;
use kcloud_core::validate::validate_server_name;
use kcloud_core::volume::{MAX_MOUNTS, validate_mount_path};
use kcloud_core::{Error, Result, now_ms};
use kcloud_provision::{Exits, LogStream, Provisioner};

use crate::audit::Audit;
use crate::locks::OwnerLocks;
use crate::volumes::{MountRequest, Volumes, mounted_by};

const MAX_IMAGE: usize = 255;
/// Log lines a tail may ask for.
pub const DEFAULT_LOG_LINES: usize = 200;
pub const MAX_LOG_LINES: usize = 10_000;
/// How long a claim may stay uncommitted before it is released.
pub const CLAIM_TTL: Duration = Duration::from_secs(600);

/// "N whole GPUs" (`count`, optionally of `model`) or "one MIG instance of
/// `mig_profile`" (optionally on `model`), placed by the ledger.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GpuRequest {
    pub count: Option<u32>,
    pub mig_profile: Option<String>,
    pub model: Option<String>,
}

/// A server to create. Resources: `preset`, or `cpu` and `memory`, or neither (the
/// smallest preset). Devices: exact `devices` UUIDs, or a `gpu_request`, or neither.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateServer {
    /// DNS-1123 label, unique per user.
    pub name: String,
    pub preset: Option<String>,
    #[schema(value_type = Object)]
    pub cpu: Option<Quantity>,
    #[schema(value_type = Object)]
    pub memory: Option<Quantity>,
    /// `GPU-...` / `MIG-...` UUIDs, all on one node.
    pub devices: Option<Vec<String>>,
    pub gpu_request: Option<GpuRequest>,
    /// The IDE profile (`GET /api/v1/profiles`): `jupyterlab` (default), `code-server`,
    /// `custom` (the default when `command` is given), or one from config.
    pub profile: Option<String>,
    /// Checked against the `[images]` allow-list; default: the profile's, else config's.
    pub image: Option<String>,
    /// `custom` profile: the program and its arguments; `{port}`, `{base_url}` and
    /// `{ip}` are replaced (also given as `KCLOUD_PORT` and `KCLOUD_BASE_URL`).
    pub command: Option<Vec<String>>,
    /// Appended to the command line (JupyterLab's by default).
    pub args: Option<Vec<String>>,
    pub env: Option<BTreeMap<String, String>>,
    /// Volumes and shares to mount, by name: `{"volume": "data"}` (the first volume
    /// defaults to `/home/jovyan/work`) or `{"share": "datasets"}` (default
    /// `/home/jovyan/shares/{name}`), each with an optional `mount_path` under
    /// `/home/jovyan` and `read_only`.
    pub volumes: Option<Vec<MountRequest>>,
}

/// A validated create request, before quotas and devices.
#[derive(Debug)]
pub(crate) struct Plan {
    pub(crate) name: String,
    pub(crate) cpu_millis: u64,
    pub(crate) memory_bytes: u64,
    pub(crate) devices: Option<DeviceRequest>,
    pub(crate) image: Option<String>,
    pub(crate) launch: Launch,
    pub(crate) mounts: Vec<MountRequest>,
}

/// The server use cases. Share it as `Arc<Servers>`.
pub struct Servers {
    repo: Arc<dyn Repository>,
    audit: Audit,
    cluster: Arc<Cluster>,
    provisioner: Arc<dyn Provisioner>,
    volumes: Arc<Volumes>,
    settings: Arc<Settings>,
    locks: Arc<OwnerLocks>,
}

/// Releases the devices of servers that end by themselves (given to the provisioner).
pub struct ReleaseOnExit {
    cluster: Arc<Cluster>,
}

impl ReleaseOnExit {
    pub fn new(cluster: Arc<Cluster>) -> Arc<Self> {
        Arc::new(Self { cluster })
    }
}

impl Exits for ReleaseOnExit {
    fn exited(&self, server: &Server) {
        let released = self.cluster.ledger().release(&server.holder());
        tracing::info!(owner = %server.owner, server = %server.name, released = released.len(), "server ended by itself; devices released");
    }
}

impl Servers {
    pub fn new(
        repo: Arc<dyn Repository>,
        cluster: Arc<Cluster>,
        provisioner: Arc<dyn Provisioner>,
        volumes: Arc<Volumes>,
        settings: Arc<Settings>,
        locks: Arc<OwnerLocks>,
    ) -> Self {
        Self {
            audit: Audit::new(repo.clone()),
            repo,
            cluster,
            provisioner,
            volumes,
            settings,
            locks,
        }
    }

    /// Finds the servers that exist (adopting live ones) and rebuilds the ledger from
    /// them; until this returns, the ledger is not ready and allocations wait.
    pub async fn recover(&self) -> Result<Vec<Server>> {
        let servers = self.provisioner.recover().await?;
        self.cluster.ledger().rebuild(
            servers
                .iter()
                .filter(|s| s.status.holds_devices())
                .flat_map(|s| s.devices.iter().map(|d| (d.clone(), s.holder()))),
        );
        Ok(servers)
    }

    /// Releases claims whose create never finished, so no device leaks.
    pub fn sweep_claims(&self, now_ms: u64) -> usize {
        self.cluster.ledger().sweep(now_ms, CLAIM_TTL).len()
    }

    /// The servers `caller` may see: their own, or with `owner` that user's (admins:
    /// anyone's); `None` for an admin is everyone's.
    pub fn list(&self, caller: &Caller, owner: Option<&str>) -> Result<Vec<Server>> {
        match owner {
            Some(o) => {
                caller.may_see_user(o)?;
                Ok(self.provisioner.list(Some(o)))
            }
            None if caller.is_admin() => Ok(self.provisioner.list(None)),
            None => Ok(self.provisioner.list(Some(&caller.name))),
        }
    }

    /// One server; another user's (or none) is 404.
    pub fn get(&self, caller: &Caller, owner: &str, name: &str) -> Result<Server> {
        let not_found = || Error::NotFound(format!("no server {owner}/{name}"));
        caller.may_see_user(owner).map_err(|_| not_found())?;
        self.provisioner.get(owner, name).ok_or_else(not_found)
    }

    /// Creates a server for `owner` and returns it as soon as it exists (`pending`).
    pub async fn create(
        self: &Arc<Self>,
        caller: Caller,
        client: IpAddr,
        owner: String,
        req: CreateServer,
    ) -> Result<Server> {
        let me = self.clone();
        to_completion(async move { me.create_now(&caller, client, &owner, req).await }).await
    }

    async fn create_now(
        &self,
        caller: &Caller,
        client: IpAddr,
        user: &str,
        req: CreateServer,
    ) -> Result<Server> {
        caller.may_see_user(user)?;
        let owner = self.repo.existing_user(user).await?;
        if owner.disabled {
            return Err(Error::Conflict(format!("user {user:?} is disabled")));
        }
        let plan = validate(&self.settings, req)?;
        let _serial = self.locks.lock(user).await;
        if self.provisioner.get(user, &plan.name).is_some() {
            return Err(Error::Conflict(format!(
                "server name {:?} is already in use (delete that server first)",
                plan.name
            )));
        }
        let mine = self.provisioner.list(Some(user));
        let quota = owner.quota.effective(&self.settings.default_quota);
        quota.check(
            user,
            usage(&mine),
            Usage {
                servers: 1,
                cpu_millis: plan.cpu_millis,
                memory_bytes: plan.memory_bytes,
            },
        )?;
        // Names become volumes of this owner and shares the owner may use: never paths.
        let mounts = self
            .volumes
            .resolve_mounts(user, owner.role, plan.mounts.clone(), &mine)
            .await?;
        let holder = Holder::new(user, &plan.name);
        let claim = match &plan.devices {
            Some(req) => Some(self.cluster.claim(holder, req, quota.gpus, now_ms())?),
            None => None,
        };
        let devices = claim
            .as_ref()
            .map(|r| r.devices.clone())
            .unwrap_or_default();
        let spec = ServerSpec {
            owner: user.to_owned(),
            name: plan.name.clone(),
            node: claim.as_ref().map(|r| r.node.clone()),
            addresses: self.cluster.inventory().addresses(&devices),
            devices,
            cpu_millis: plan.cpu_millis,
            memory_bytes: plan.memory_bytes,
            image: plan.image.clone(),
            launch: plan.launch,
            mounts,
        };
        let ledger = self.cluster.ledger();
        let mut server = match self.provisioner.create(spec).await {
            Ok(server) => server,
            Err(e) => {
                if let Some(r) = &claim {
                    ledger.abort(r.id);
                }
                return Err(e);
            }
        };
        if let Some(r) = &claim
            && let Err(e) = ledger.commit(r.id)
        {
            // The server may already have ended, which released its devices with it:
            // then it stays, failed, for its owner to read why. Otherwise undo it all.
            match self.provisioner.get(user, &plan.name) {
                Some(now) if now.status == ServerStatus::Failed => server = now,
                _ => {
                    if let Err(e) = self.provisioner.delete(user, &plan.name).await {
                        tracing::error!(error = %e, "could not remove a server whose devices were lost");
                    }
                    ledger.release(&server.holder());
                    return Err(Error::Internal(format!(
                        "committing the device claim: {e}"
                    )));
                }
            }
        }
        self.audit
            .record(
                caller,
                client,
                "server_create",
                format!("{user}/{}", plan.name),
                format!(
                    "devices=[{}] cpu_millis={} memory_bytes={} image={}",
                    server.devices.join(","),
                    server.cpu_millis,
                    server.memory_bytes,
                    server.image.as_deref().unwrap_or("-")
                ),
            )
            .await?;
        Ok(server)
    }

    /// Stops a server and frees its devices; with `delete_volumes`, also the volumes it
    /// mounts (409, and nothing deleted, while another live server mounts one).
    pub async fn delete(
        self: &Arc<Self>,
        caller: Caller,
        client: IpAddr,
        owner: String,
        name: String,
        delete_volumes: bool,
    ) -> Result<()> {
        let me = self.clone();
        to_completion(async move {
            me.delete_now(&caller, client, &owner, &name, delete_volumes)
                .await
        })
        .await
    }

    async fn delete_now(
        &self,
        caller: &Caller,
        client: IpAddr,
        user: &str,
        name: &str,
        delete_volumes: bool,
    ) -> Result<()> {
        let found = self.get(caller, user, name)?;
        let _serial = self.locks.lock(user).await;
        let volumes: Vec<String> = if delete_volumes {
            found
                .mounts
                .iter()
                .filter_map(|m| m.volume())
                .map(str::to_owned)
                .collect()
        } else {
            Vec::new()
        };
        // Checked before anything stops, so a refusal changes nothing.
        let others: Vec<_> = self
            .provisioner
            .list(Some(user))
            .into_iter()
            .filter(|sv| sv.name != name)
            .collect();
        for v in &volumes {
            let users = mounted_by(&others, user, v, true);
            if !users.is_empty() {
                return Err(Error::Conflict(format!(
                    "volume {v:?} is also mounted by {}; nothing was deleted",
                    users.join(", ")
                )));
            }
        }
        let released = self.stop(user, name).await?;
        for v in &volumes {
            self.volumes.remove(user, v).await?;
        }
        self.audit
            .record(
                caller,
                client,
                "server_delete",
                format!("{user}/{name}"),
                format!(
                    "released=[{}] deleted_volumes=[{}]",
                    released.join(","),
                    volumes.join(",")
                ),
            )
            .await
    }

    /// Stops a server whose owner's lock is held and gives its devices back: what a
    /// delete and a cull share. 404 when it is not there (any more).
    async fn stop(&self, user: &str, name: &str) -> Result<Vec<String>> {
        let server = self
            .provisioner
            .delete(user, name)
            .await?
            .ok_or_else(|| Error::NotFound(format!("no server {user}/{name}")))?;
        Ok(self.cluster.ledger().release(&server.holder()))
    }

    /// Stops an idle server for the culler, as a delete by `system`, unless traffic
    /// arrived since `seen` was read.
    pub async fn cull(&self, seen: &Server, idle_for_ms: u64) -> Result<bool> {
        let (user, name) = (&seen.owner, &seen.name);
        let _serial = self.locks.lock(user).await;
        // Traffic may have arrived while waiting for the lock.
        match self.provisioner.get(user, name) {
            Some(now) if now.id == seen.id && now.last_activity_ms == seen.last_activity_ms => {}
            _ => return Ok(false),
        }
        let released = match self.stop(user, name).await {
            Ok(r) => r,
            Err(Error::NotFound(_)) => return Ok(false),
            Err(e) => return Err(e),
        };
        tracing::info!(owner = %user, server = %name, idle_s = idle_for_ms / 1000, released = released.len(), "culled an idle server");
        self.audit
            .record_system(
                "server_cull",
                format!("{user}/{name}"),
                format!(
                    "idle {} s; released=[{}]",
                    idle_for_ms / 1000,
                    released.join(",")
                ),
            )
            .await?;
        Ok(true)
    }

    /// How servers are kept apart on this deployment.
    pub fn isolation(&self) -> kcloud_core::isolation::Isolation {
        self.provisioner.isolation()
    }

    /// Lets `caller` open a server in the browser: the owner, or an admin who confirmed
    /// (`as_admin`), which is audited. Another user's server (or none) is 404.
    pub async fn open(
        &self,
        caller: &Caller,
        client: IpAddr,
        user: &str,
        name: &str,
        as_admin: bool,
    ) -> Result<Server> {
        let server = self.get(caller, user, name)?;
        if caller.name != user {
            if !as_admin {
                return Err(Error::Forbidden(
                    "this is another user's server: confirm that you open it as an admin \
                     (as_admin), which is audited"
                        .into(),
                ));
            }
            self.audit
                .record(
                    caller,
                    client,
                    "server_open_as_admin",
                    format!("{user}/{name}"),
                    String::new(),
                )
                .await?;
        }
        Ok(server)
    }

    /// Exempts a server from idle culling, or ends that (admins only).
    pub async fn set_cull_exempt(
        &self,
        caller: &Caller,
        client: IpAddr,
        user: &str,
        name: &str,
        exempt: bool,
    ) -> Result<Server> {
        self.get(caller, user, name)?;
        if !caller.is_admin() {
            return Err(Error::Forbidden(
                "only admins can exempt servers from idle culling".into(),
            ));
        }
        let server = self
            .provisioner
            .set_cull_exempt(user, name, exempt)
            .await?
            .ok_or_else(|| Error::NotFound(format!("no server {user}/{name}")))?;
        self.audit
            .record(
                caller,
                client,
                "server_cull_exempt",
                format!("{user}/{name}"),
                exempt.to_string(),
            )
            .await?;
        Ok(server)
    }

    /// The last `tail` lines of the server's output, its token removed.
    pub async fn logs(
        &self,
        caller: &Caller,
        user: &str,
        name: &str,
        tail: usize,
    ) -> Result<String> {
        self.get(caller, user, name)?;
        check_tail(tail)?;
        self.provisioner.logs(user, name, tail).await
    }

    /// The last `tail` lines, then new output as it comes, until the server ends.
    pub async fn follow_logs(
        &self,
        caller: &Caller,
        user: &str,
        name: &str,
        tail: usize,
    ) -> Result<LogStream> {
        self.get(caller, user, name)?;
        check_tail(tail)?;
        self.provisioner.follow_logs(user, name, tail).await
    }

    /// What happened to the server: created, started, ready, failed, adopted, ...
    pub async fn events(
        &self,
        caller: &Caller,
        user: &str,
        name: &str,
    ) -> Result<Vec<ServerEvent>> {
        self.get(caller, user, name)?;
        self.provisioner.events(user, name).await
    }

    /// Records traffic to a server (the proxy, on every request).
    pub fn touch(&self, owner: &str, name: &str, at_ms: u64) {
        self.provisioner.touch(owner, name, at_ms);
    }

    /// Wakes after a server appears, changes status or goes.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.provisioner.subscribe()
    }

    /// Stops watching servers (they keep running; the next start adopts them).
    pub async fn shutdown(&self) {
        self.provisioner.shutdown().await;
    }
}

/// Runs a create or delete to its end even when the caller goes away.
async fn to_completion<T: Send + 'static>(
    work: impl Future<Output = Result<T>> + Send + 'static,
) -> Result<T> {
    tokio::spawn(work)
        .await
        .map_err(|e| Error::Internal(format!("request task failed: {e}")))?
}

fn check_tail(tail: usize) -> Result<()> {
    if tail > MAX_LOG_LINES {
        return Err(Error::BadRequest(format!("tail: at most {MAX_LOG_LINES}")));
    }
    Ok(())
}

/// What an owner's servers use: failed servers count as servers (they keep their
/// name until deleted) but use no CPU or memory.
fn usage(mine: &[Server]) -> Usage {
    let live = || mine.iter().filter(|s| s.status.holds_devices());
    Usage {
        servers: mine.len() as u64,
        cpu_millis: live().map(|s| s.cpu_millis).sum(),
        memory_bytes: live().map(|s| s.memory_bytes).sum(),
    }
}

fn bad(msg: impl Into<String>) -> Error {
    Error::BadRequest(msg.into())
}

pub(crate) fn validate(settings: &Settings, req: CreateServer) -> Result<Plan> {
    validate_server_name(&req.name)?;
    let mounts = req.volumes.unwrap_or_default();
    if mounts.len() > MAX_MOUNTS {
        return Err(bad(format!("volumes: at most {MAX_MOUNTS} per server")));
    }
    for m in &mounts {
        if m.volume.is_some() == m.share.is_some() {
            return Err(bad("volumes: each entry names either `volume` or `share`"));
        }
        if let Some(p) = &m.mount_path {
            validate_mount_path(p)?;
        }
    }
    let (cpu_millis, memory_bytes) = match (&req.preset, &req.cpu, &req.memory) {
        (Some(_), Some(_), _) | (Some(_), _, Some(_)) => {
            return Err(bad("give either `preset` or `cpu` and `memory`, not both"));
        }
        (Some(name), None, None) => {
            let p = settings.presets.get(name).ok_or_else(|| {
                let names: Vec<&str> = settings.presets.keys().map(String::as_str).collect();
                bad(format!(
                    "preset {name:?} does not exist; presets: {}",
                    names.join(", ")
                ))
            })?;
            (p.cpu_millis, p.memory_bytes)
        }
        (None, Some(cpu), Some(memory)) => (cpu_millis(cpu)?, memory_bytes(memory)?),
        (None, Some(_), None) | (None, None, Some(_)) => {
            return Err(bad("give both `cpu` and `memory` (or a `preset`)"));
        }
        (None, None, None) => settings
            .presets
            .values()
            .min_by_key(|p| (p.cpu_millis, p.memory_bytes))
            .map(|p| (p.cpu_millis, p.memory_bytes))
            .ok_or_else(|| bad("no presets are configured: give `cpu` and `memory`"))?,
    };
    let devices = match (req.devices, req.gpu_request) {
        (Some(_), Some(_)) => return Err(bad("give either `devices` or `gpu_request`, not both")),
        (Some(d), None) if d.is_empty() => None,
        (Some(d), None) => {
            if d.len() > MAX_DEVICES_PER_REQUEST as usize {
                return Err(bad(format!(
                    "devices: at most {MAX_DEVICES_PER_REQUEST} per server"
                )));
            }
            if let Some(u) = d.iter().find(|u| !valid_uuid(u)) {
                return Err(bad(format!(
                    "devices: {u:?} is not a GPU-... or MIG-... UUID"
                )));
            }
            Some(DeviceRequest::Exact(d))
        }
        (None, Some(g)) => Some(gpu_request(g)?),
        (None, None) => None,
    };
    let profile_name = match (&req.profile, &req.command) {
        (Some(p), _) => p.clone(),
        (None, Some(_)) => CUSTOM_PROFILE.to_owned(),
        (None, None) => DEFAULT_PROFILE.to_owned(),
    };
    let profile = settings.profiles.get(&profile_name).ok_or_else(|| {
        let names: Vec<&str> = settings.profiles.keys().map(String::as_str).collect();
        bad(format!(
            "profile {profile_name:?} does not exist; profiles: {}",
            names.join(", ")
        ))
    })?;
    let command = match (profile.user_command, req.command) {
        (true, None) => {
            return Err(bad(format!(
                "profile {profile_name:?} runs your own program: give `command`"
            )));
        }
        (true, Some(c)) => Some(c),
        (false, Some(_)) => {
            return Err(bad(format!(
                "profile {profile_name:?} runs its own program; use the `custom` profile for \
                 a command of your own"
            )));
        }
        (false, None) => profile.command.clone(),
    };
    let image = match req.image {
        None => profile
            .image
            .clone()
            .or_else(|| settings.images.default.clone()),
        Some(image) => {
            let ok_chars = image
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || b"._-/:@+".contains(&c));
            if image.is_empty() || image.len() > MAX_IMAGE || !ok_chars {
                return Err(bad("image: not a valid image reference"));
            }
            if !settings.images.allows(&image) {
                return Err(bad(format!(
                    "image {image:?} is not allowed here; allowed: {}",
                    if settings.images.allowed.is_empty() {
                        "only the default image".to_owned()
                    } else {
                        settings.images.allowed.join(", ")
                    }
                )));
            }
            Some(image)
        }
    };
    let launch = Launch {
        command,
        args: req.args.unwrap_or_default(),
        env: req.env.unwrap_or_default(),
        profile: Some(RunProfile::from_profile(&profile_name, profile)),
    };
    validate_launch(&launch)?;
    Ok(Plan {
        name: req.name,
        cpu_millis,
        memory_bytes,
        devices,
        image,
        launch,
        mounts,
    })
}

fn gpu_request(g: GpuRequest) -> Result<DeviceRequest> {
    if let Some(m) = &g.model
        && (m.is_empty() || m.len() > 128)
    {
        return Err(bad("gpu_request.model: 1 to 128 characters"));
    }
    match (g.count, g.mig_profile) {
        (Some(count), None) => Ok(DeviceRequest::Gpus {
            count,
            model: g.model,
        }),
        (None, Some(profile)) => {
            if profile.is_empty() || profile.len() > 64 {
                return Err(bad("gpu_request.mig_profile: 1 to 64 characters"));
            }
            Ok(DeviceRequest::Mig {
                profile,
                model: g.model,
            })
        }
        _ => Err(bad(
            "gpu_request: give `count` (whole GPUs) or `mig_profile` (one MIG instance), not both",
        )),
    }
}

#[cfg(test)]
mod tests;
