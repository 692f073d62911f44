//! Servers: create (validate → quota → claim devices → provision → commit, or wait
//! in the queue), delete, cull, stop for a reservation, and the end of a server that
//! stopped by itself. This module is the only one
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

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use kcloud_cluster::Cluster;
use kcloud_cluster::ledger::Claim;
use kcloud_core::caller::Caller;
use kcloud_core::device::{DeviceRequest, GpuRequest, Holder, MAX_DEVICES_PER_REQUEST, valid_uuid};
use kcloud_core::launch::{CUSTOM_PROFILE, DEFAULT_PROFILE, Launch, RunProfile, validate_launch};
use kcloud_core::quantity::{Quantity, cpu_millis, memory_bytes};
use kcloud_core::repo::Repository;
use kcloud_core::server::{Server, ServerEvent, ServerSpec, ServerStatus};
use kcloud_core::settings::Settings;
use kcloud_core::time::parse_duration;
use kcloud_core::user::{Usage, User};
use kcloud_core::validate::validate_server_name;
use kcloud_core::volume::{MAX_MOUNTS, validate_mount_path};
use kcloud_core::{Error, Result, now_ms};
use kcloud_provision::{Exits, LogStream, Provisioner};

use crate::audit::Audit;
use crate::groups::Groups;
use crate::locks::OwnerLocks;
use crate::notify::Notifier;
use crate::usage::UsageLedger;
use crate::volumes::{MountRequest, Volumes, mounted_by};

const MAX_IMAGE: usize = 255;
/// Log lines a tail may ask for.
pub const DEFAULT_LOG_LINES: usize = 200;
pub const MAX_LOG_LINES: usize = 10_000;
/// How long a claim may stay uncommitted before it is released.
pub const CLAIM_TTL: Duration = Duration::from_secs(600);

/// A server to create. Resources: `preset`, or `cpu` and `memory`, or neither (the
/// smallest preset). Devices: exact `devices` UUIDs, or a `gpu_request`, or neither.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateServer {
    /// DNS-1123 label, unique per user.
    pub name: String,
    pub preset: Option<String>,
    /// CPUs (`2`, `0.5`) or a quantity (`"2"`, `"500m"`).
    #[schema(value_type = Option<Object>)]
    pub cpu: Option<Quantity>,
    /// Bytes or a quantity (`"512Mi"`, `"8Gi"`).
    #[schema(value_type = Option<Object>)]
    pub memory: Option<Quantity>,
    /// `GPU-...` / `MIG-...` UUIDs, all on one node.
    pub devices: Option<Vec<String>>,
    #[serde(default, deserialize_with = "kcloud_core::schema::optional_object")]
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
    /// Wait when no fitting device is free: `{"max": "4h"}`. The answer is then `202`
    /// with `status: "queued"`, the place in the queue and the estimated start; the
    /// server starts by itself when its devices free up (see `GET /api/v1/queue`).
    /// A request that can never fit is refused at once (400).
    #[serde(default, deserialize_with = "kcloud_core::schema::optional_object")]
    pub wait: Option<WaitRequest>,
    /// Start on the devices of this reservation of yours (its window must hold now):
    /// all of them, or those `devices` / the `gpu_request` picks among them.
    pub reservation: Option<String>,
}

/// How long a create request may wait for its devices.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WaitRequest {
    /// `"30m"`, `"4h"`, `"2d"`; at most the `[queue] max_wait` setting.
    pub max: String,
}

/// A validated create request, before quotas and devices.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    pub(crate) name: String,
    pub(crate) cpu_millis: u64,
    pub(crate) memory_bytes: u64,
    pub(crate) devices: Option<DeviceRequest>,
    pub(crate) image: Option<String>,
    pub(crate) launch: Launch,
    pub(crate) mounts: Vec<MountRequest>,
    pub(crate) wait_ms: Option<u64>,
    pub(crate) reservation: Option<String>,
}

/// What a create did.
#[derive(Debug)]
pub enum Created {
    /// The server exists (`pending`).
    Started(Server),
    /// It waits in the queue (`queued`).
    Queued(Server),
}

/// Who a launch is audited as.
#[derive(Clone, Copy)]
enum Actor<'a> {
    Caller(&'a Caller, IpAddr),
    /// The queue, starting a waiting request.
    Queue,
}

/// Why a launch did not happen.
enum NotLaunched {
    /// No fitting device is free now (the request may wait).
    NoDevices(Error),
    Failed(Error),
}

impl From<Error> for NotLaunched {
    fn from(e: Error) -> Self {
        NotLaunched::Failed(e)
    }
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
    notifier: Notifier,
    queue: queue::QueueBook,
    usage: Arc<UsageLedger>,
    /// Warnings already given: (server id, reservation id, minutes before).
    warned: std::sync::Mutex<std::collections::HashSet<(String, String, u64)>>,
    /// Idle-GPU windows, warnings and "keep" answers.
    idle: std::sync::Mutex<gpu_idle::IdleBook>,
    groups: Arc<Groups>,
}

/// Releases the devices of servers that end by themselves (given to the provisioner),
/// and adds their GPU-hours to the owner's fair-share score.
pub struct ReleaseOnExit {
    cluster: Arc<Cluster>,
    usage: Option<(Arc<dyn Repository>, Arc<Settings>)>,
}

impl ReleaseOnExit {
    pub fn new(cluster: Arc<Cluster>) -> Arc<Self> {
        Arc::new(Self {
            cluster,
            usage: None,
        })
    }

    /// Also records the GPU-hours of servers that end (what the binary uses).
    pub fn with_usage(
        cluster: Arc<Cluster>,
        repo: Arc<dyn Repository>,
        settings: Arc<Settings>,
    ) -> Arc<Self> {
        Arc::new(Self {
            cluster,
            usage: Some((repo, settings)),
        })
    }
}

impl Exits for ReleaseOnExit {
    fn exited(&self, server: &Server) {
        let released = self.cluster.ledger().release(&server.holder());
        tracing::info!(owner = %server.owner, server = %server.name, released = released.len(), "server ended by itself; devices released");
        if let Some((repo, settings)) = &self.usage
            && !released.is_empty()
        {
            let hours = gpu_hours(&self.cluster, &released, server.created_at_ms, now_ms());
            let (repo, owner, id) = (repo.clone(), server.owner.clone(), server.id.clone());
            let half_life = kcloud_core::time::millis(settings.queue.half_life);
            tokio::spawn(async move {
                if let Err(e) = repo.add_usage(&owner, hours, now_ms(), half_life).await {
                    tracing::warn!(error = %e, "could not record GPU-hours");
                }
                if let Err(e) = repo.close_usage(&id, now_ms(), false).await {
                    tracing::warn!(error = %e, "could not close usage");
                }
            });
        }
    }
}

/// Normalized GPU-hours of `devices` held from `since_ms` to `now_ms`.
pub(crate) fn gpu_hours(cluster: &Cluster, devices: &[String], since_ms: u64, now_ms: u64) -> f64 {
    cluster.weight(devices) * now_ms.saturating_sub(since_ms) as f64 / 3.6e6
}

impl Servers {
    pub fn new(
        repo: Arc<dyn Repository>,
        cluster: Arc<Cluster>,
        provisioner: Arc<dyn Provisioner>,
        volumes: Arc<Volumes>,
        settings: Arc<Settings>,
        locks: Arc<OwnerLocks>,
        groups: Arc<Groups>,
    ) -> Self {
        Self {
            audit: Audit::new(repo.clone()),
            notifier: Notifier::new(settings.notifications.webhook_url.clone()),
            usage: UsageLedger::new(repo.clone(), cluster.clone()),
            groups,
            repo,
            cluster,
            provisioner,
            volumes,
            settings,
            locks,
            queue: Default::default(),
            warned: Default::default(),
            idle: Default::default(),
        }
    }

    /// The usage ledger (reports).
    pub fn usage(&self) -> &Arc<UsageLedger> {
        &self.usage
    }

    /// Groups and entitlements.
    pub fn groups(&self) -> &Arc<Groups> {
        &self.groups
    }

    /// Finds the servers that exist (adopting live ones) and rebuilds the ledger from
    /// them; until this returns, the ledger is not ready and allocations wait.
    pub async fn recover(&self) -> Result<Vec<Server>> {
        self.load_queue().await?;
        let servers = self.provisioner.recover().await?;
        self.cluster.ledger().rebuild(
            servers
                .iter()
                .filter(|s| s.status.holds_devices())
                .flat_map(|s| s.devices.iter().map(|d| (d.clone(), s.holder()))),
        );
        self.usage.recover(&servers).await?;
        Ok(servers)
    }

    /// Releases claims whose create never finished, so no device leaks.
    pub fn sweep_claims(&self, now_ms: u64) -> usize {
        self.cluster.ledger().sweep(now_ms, CLAIM_TTL).len()
    }

    /// The servers `caller` may see: their own, or with `owner` that user's (admins:
    /// anyone's); `None` for an admin is everyone's.
    /// Queued servers are listed with the others (`status: "queued"`).
    pub fn list(&self, caller: &Caller, owner: Option<&str>) -> Result<Vec<Server>> {
        let owner = match owner {
            Some(o) => {
                caller.may_see_user(o)?;
                Some(o)
            }
            None if caller.is_admin() => None,
            None => Some(caller.name.as_str()),
        };
        let mut all = self.provisioner.list(owner);
        all.extend(self.queued_servers(owner));
        all.sort_by(|a, b| (&a.owner, &a.name).cmp(&(&b.owner, &b.name)));
        Ok(all)
    }

    /// One server (running, or waiting in the queue); another user's (or none) is 404.
    pub fn get(&self, caller: &Caller, owner: &str, name: &str) -> Result<Server> {
        let not_found = || Error::NotFound(format!("no server {owner}/{name}"));
        caller.may_see_user(owner).map_err(|_| not_found())?;
        self.provisioner
            .get(owner, name)
            .or_else(|| self.queued_server(owner, name))
            .ok_or_else(not_found)
    }

    /// Creates a server for `owner` and returns it as soon as it exists (`pending`),
    /// or, when it asked to wait and nothing fits, as soon as it is queued.
    pub async fn create(
        self: &Arc<Self>,
        caller: Caller,
        client: IpAddr,
        owner: String,
        req: CreateServer,
    ) -> Result<Created> {
        let me = self.clone();
        to_completion(async move { me.create_now(&caller, client, &owner, req).await }).await
    }

    async fn create_now(
        self: &Arc<Self>,
        caller: &Caller,
        client: IpAddr,
        user: &str,
        req: CreateServer,
    ) -> Result<Created> {
        caller.may_see_user(user)?;
        let owner = self.repo.existing_user(user).await?;
        if owner.disabled {
            return Err(Error::Conflict(format!("user {user:?} is disabled")));
        }
        let body = serde_json::to_value(&req)
            .map_err(|e| Error::Internal(format!("encoding the request: {e}")))?;
        let plan = validate(&self.settings, req)?;
        {
            let _serial = self.locks.lock(user).await;
            self.check_name(user, &plan.name)?;
            let why = match self
                .launch(Actor::Caller(caller, client), &owner, &plan, None)
                .await
            {
                Ok(server) => return Ok(Created::Started(server)),
                Err(NotLaunched::Failed(e)) => return Err(e),
                Err(NotLaunched::NoDevices(e)) => e,
            };
            let (Some(wait_ms), Some(devices), None) =
                (plan.wait_ms, &plan.devices, &plan.reservation)
            else {
                return Err(match (why, plan.wait_ms, &plan.reservation) {
                    (Error::Conflict(m), None, None) => Error::Conflict(format!(
                        "{m}; to wait in the queue for it, add \"wait\": {{\"max\": \"4h\"}}"
                    )),
                    (e, _, _) => e,
                });
            };
            self.cluster.could_ever_fit(devices)?;
            self.enqueue(caller, client, user, &plan, body, wait_ms)
                .await?;
        }
        // Outside the owner's lock: a round may start this owner's requests.
        self.dispatch().await;
        match self.provisioner.get(user, &plan.name) {
            Some(s) => Ok(Created::Started(s)),
            None => self
                .queued_server(user, &plan.name)
                .map(Created::Queued)
                .ok_or_else(|| {
                    Error::Conflict(
                        "the request left the queue at once: it can no longer start as asked \
                         (the audit log says why)"
                            .into(),
                    )
                }),
        }
    }

    /// 409 when `name` is taken by a server or a queued request of `user`.
    fn check_name(&self, user: &str, name: &str) -> Result<()> {
        if self.provisioner.get(user, name).is_some() || self.queue.has(user, name) {
            return Err(Error::Conflict(format!(
                "server name {name:?} is already in use (delete that server first)"
            )));
        }
        Ok(())
    }

    /// Checks quotas, resolves mounts, claims devices (or uses `claimed`), provisions
    /// and commits. The owner's lock is held by the caller.
    async fn launch(
        &self,
        actor: Actor<'_>,
        owner: &User,
        plan: &Plan,
        claimed: Option<Claim>,
    ) -> std::result::Result<Server, NotLaunched> {
        let user = owner.name.as_str();
        self.check_entitled(user, owner.role, plan).await?;
        let needs_devices = plan.devices.is_some() || plan.reservation.is_some();
        // Held until the launch is done: members of a group launch one at a time.
        let _groups = self.check_group_quotas(user, plan, needs_devices).await?;
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
        if quota.gpu_hours_per_month.is_some() && needs_devices {
            quota.check_gpu_hours(user, self.usage.this_month(user).await?)?;
        }
        let holder = Holder::new(user, &plan.name);
        let now = now_ms();
        let (claim, booked) = match claimed {
            Some(c) => {
                let booked = self.own_reservation_of(user, &c.devices, now);
                (Some(c), booked)
            }
            None => match self.device_request(user, plan, now)? {
                Some((req, booked)) => {
                    let promised = self.queue.promised();
                    match self.cluster.claim(holder, &req, quota.gpus, now, &promised) {
                        Ok(c) => (Some(c), booked),
                        Err(e @ Error::Conflict(_)) => return Err(NotLaunched::NoDevices(e)),
                        Err(e) => return Err(e.into()),
                    }
                }
                None => (None, None),
            },
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
            launch: plan.launch.clone(),
            mounts,
        };
        let ledger = self.cluster.ledger();
        let mut server = match self.provisioner.create(spec).await {
            Ok(server) => server,
            Err(e) => {
                if let Some(r) = &claim {
                    ledger.abort(r.id);
                }
                return Err(e.into());
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
                    return Err(Error::Internal(format!("committing the device claim: {e}")).into());
                }
            }
        }
        if server.status.holds_devices() {
            self.usage.opened(&server).await;
        }
        if let Some(id) = booked
            && let Err(e) = self.mark_reservation_used(&id).await
        {
            tracing::warn!(error = %e, reservation = %id, "could not mark a reservation used");
        }
        let detail = format!(
            "devices=[{}] cpu_millis={} memory_bytes={} image={}",
            server.devices.join(","),
            server.cpu_millis,
            server.memory_bytes,
            server.image.as_deref().unwrap_or("-")
        );
        let target = format!("{user}/{}", plan.name);
        match actor {
            Actor::Caller(caller, client) => {
                self.audit
                    .record(caller, client, "server_create", target, detail)
                    .await?
            }
            Actor::Queue => {
                self.audit
                    .record_system("server_start_queued", target, detail)
                    .await?
            }
        }
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
        if found.status == ServerStatus::Queued {
            return self.cancel_queued(caller, client, user, name).await;
        }
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
        let released = self.cluster.ledger().release(&server.holder());
        if !released.is_empty() && server.status.holds_devices() {
            self.account(&server.owner, &released, server.created_at_ms)
                .await;
        }
        self.usage.closed(&server.id).await;
        Ok(released)
    }

    /// Stops `seen` for the platform (a cull, a reservation, idle GPUs), under its
    /// owner's lock, unless it is gone or `still` says it changed while waiting for the
    /// lock. The devices released, or `None` when it was left alone.
    pub(crate) async fn stop_unless_changed(
        &self,
        seen: &Server,
        still: impl Fn(&Server) -> bool,
    ) -> Result<Option<Vec<String>>> {
        let (user, name) = (&seen.owner, &seen.name);
        let _serial = self.locks.lock(user).await;
        match self.provisioner.get(user, name) {
            Some(now) if now.id == seen.id && still(&now) => {}
            _ => return Ok(None),
        }
        match self.stop(user, name).await {
            Ok(r) => Ok(Some(r)),
            Err(Error::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Stops an idle server for the culler, as a delete by `system`, unless traffic
    /// arrived since `seen` was read.
    pub async fn cull(&self, seen: &Server, idle_for_ms: u64) -> Result<bool> {
        let (user, name) = (&seen.owner, &seen.name);
        // Traffic may have arrived while waiting for the lock.
        let Some(released) = self
            .stop_unless_changed(seen, |now| now.last_activity_ms == seen.last_activity_ms)
            .await?
        else {
            return Ok(false);
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
        // A clean stop knows exactly when it stopped watching: usage of servers that
        // end before the next start is closed there.
        self.usage.alive().await;
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
        (None, Some(g)) => Some(g.into_request()?),
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
    let wait_ms = match req.wait {
        None => None,
        Some(w) => {
            let d =
                parse_duration(&w.max).map_err(|e| bad(format!("wait.max: {:?}: {e}", w.max)))?;
            if d.is_zero() || d > settings.queue.max_wait {
                return Err(bad(format!(
                    "wait.max: more than 0 and at most {}",
                    humantime::format_duration(settings.queue.max_wait)
                )));
            }
            Some(kcloud_core::time::millis(d))
        }
    };
    if let Some(id) = &req.reservation
        && !kcloud_core::reservation::valid_reservation_id(id)
    {
        return Err(bad("reservation: not a reservation id (r-...)"));
    }
    if req.reservation.is_some() && wait_ms.is_some() {
        return Err(bad(
            "a server on a reservation does not wait: give `reservation` or `wait`, not both",
        ));
    }
    Ok(Plan {
        name: req.name,
        cpu_millis,
        memory_bytes,
        devices,
        image,
        launch,
        mounts,
        wait_ms,
        reservation: req.reservation,
    })
}

mod gpu_idle;
mod groups;
mod queue;
mod schedule;

#[cfg(test)]
mod tests;
