//! Servers: create (validate → quota → reserve devices → provision → commit), list,
//! inspect, delete; their logs and events.
//!
//! Another user's server is 404 (admins see and delete all). DELETE stops the server
//! and frees its devices before it answers 204; a server that does not exist (never
//! did, or already deleted) is 404, so a repeated DELETE changes nothing and says so.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{ApiError, ApiJson, ApiPath, ApiQuery, AppState, Caller, ClientAddr, ErrorBody};
use crate::config::Settings;
use crate::ledger::{DeviceRequest, Holder, MAX_DEVICES_PER_REQUEST};
use crate::profile::{CUSTOM_PROFILE, DEFAULT_PROFILE, RunProfile};
use crate::provisioner::{
    Launch, Server, ServerEvent, ServerSpec, ServerStatus, validate_server_name,
};
use crate::storage::{MAX_MOUNTS, MountRequest, validate_mount_path};
use crate::store::{AuditEntry, Quota};
use crate::{Error, now_ms};

/// Entries in `command`, `args` and `env`, each.
const MAX_ENTRIES: usize = 64;
/// Bytes in one argument or env value.
const MAX_VALUE_BYTES: usize = 8192;
const MAX_ENV_NAME: usize = 128;
const MAX_IMAGE: usize = 255;
const DEFAULT_LOG_LINES: usize = 200;
const MAX_LOG_LINES: usize = 10_000;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_all_servers))
        .routes(routes!(list_servers, create_server))
        .routes(routes!(get_server, delete_server, patch_server))
        .routes(routes!(server_logs))
        .routes(routes!(server_events))
}

/// A CPU or memory amount: a number (CPUs; bytes) or a Kubernetes-style quantity
/// string (`"500m"`, `"2"`; `"8Gi"`, `"512Mi"`, `"1G"`).
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum Quantity {
    Number(f64),
    Text(String),
}

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

/// A server as the API shows it.
#[derive(Debug, Serialize, ToSchema)]
pub struct ServerView {
    pub name: String,
    pub owner: String,
    pub status: ServerStatus,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Its IDE profile.
    pub profile: String,
    /// Devices it was given; a failed server no longer holds them.
    pub devices: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    pub cpu_millis: u64,
    pub memory_bytes: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub created_at_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ready_at_ms: Option<u64>,
    pub last_activity_ms: u64,
    /// An admin exempted it from idle culling.
    pub cull_exempt: bool,
    /// Open this in the browser: `/user/{owner}/{name}/`.
    pub url: String,
    /// What it mounts, with mount paths filled in.
    pub volumes: Vec<MountRequest>,
}

impl From<Server> for ServerView {
    fn from(s: Server) -> Self {
        let url = s.url();
        let profile = s.launch.run_profile().name;
        let volumes = s.mounts.iter().map(MountRequest::from).collect();
        let Launch {
            command, args, env, ..
        } = s.launch;
        ServerView {
            name: s.name,
            owner: s.owner,
            status: s.status,
            reason: s.reason,
            profile,
            devices: s.devices,
            node: s.node,
            cpu_millis: s.cpu_millis,
            memory_bytes: s.memory_bytes,
            image: s.image,
            command,
            args,
            env,
            created_at_ms: s.created_at_ms,
            ready_at_ms: s.ready_at_ms,
            last_activity_ms: s.last_activity_ms,
            cull_exempt: s.cull_exempt,
            url,
            volumes,
        }
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct LogQuery {
    /// Lines from the end (default 200, at most 10000).
    pub tail: Option<usize>,
    /// Keep the response open and send new output as it comes, until the server ends.
    pub follow: Option<bool>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct DeleteQuery {
    /// Also delete the volumes it mounts (not shares); 409 if another server that has
    /// not failed mounts one of them. Default: volumes stay.
    pub delete_volumes: Option<bool>,
}

/// A validated create request, before quotas and devices.
#[derive(Debug)]
struct Plan {
    name: String,
    cpu_millis: u64,
    memory_bytes: u64,
    devices: Option<DeviceRequest>,
    image: Option<String>,
    launch: Launch,
    mounts: Vec<MountRequest>,
}

fn bad(msg: impl Into<String>) -> Error {
    Error::BadRequest(msg.into())
}

fn validate(settings: &Settings, req: CreateServer) -> Result<Plan, Error> {
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

fn valid_uuid(u: &str) -> bool {
    (u.starts_with("GPU-") || u.starts_with("MIG-"))
        && u.len() <= 128
        && u.bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"-_/".contains(&c))
}

fn gpu_request(g: GpuRequest) -> Result<DeviceRequest, Error> {
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

/// Env names the platform sets itself: not the user's to change.
fn reserved_env(name: &str) -> bool {
    matches!(
        name,
        "CUDA_VISIBLE_DEVICES"
            | "NVIDIA_VISIBLE_DEVICES"
            | "JUPYTER_TOKEN"
            | "JUPYTER_TOKEN_FILE"
            | "JUPYTER_RUNTIME_DIR"
            | "JUPYTER_CONFIG_PATH"
    ) || name.starts_with("KCLOUD_")
}

/// JupyterLab options that would move it off its port, base URL or loopback address,
/// or weaken its authentication: kcloud sets these.
fn reserved_jupyter_arg(arg: &str) -> bool {
    let Some(option) = arg.strip_prefix("--") else {
        return false;
    };
    let key = option.split('=').next().unwrap_or("").to_ascii_lowercase();
    let last = key.rsplit('.').next().unwrap_or("");
    matches!(
        last,
        "ip" | "port"
            | "port_retries"
            | "base_url"
            | "token"
            | "password"
            | "hashed_password"
            | "password_required"
            | "allow_remote_access"
            | "allow_origin"
            | "allow_origin_pat"
            | "disable_check_xsrf"
            | "tornado_settings"
            | "identity_provider_class"
            | "authorizer_class"
            | "login_handler_class"
            | "allow_unauthenticated_access"
            | "config"
            | "sock"
    )
}

fn validate_launch(l: &Launch) -> Result<(), Error> {
    let check_list = |what: &str, items: &[String]| -> Result<(), Error> {
        if items.len() > MAX_ENTRIES {
            return Err(bad(format!("{what}: at most {MAX_ENTRIES} entries")));
        }
        if items.iter().any(|a| a.len() > MAX_VALUE_BYTES) {
            return Err(Error::TooLarge(format!(
                "{what}: entries of at most {MAX_VALUE_BYTES} bytes"
            )));
        }
        if items.iter().any(|a| a.contains('\0')) {
            return Err(bad(format!("{what}: NUL characters are not allowed")));
        }
        Ok(())
    };
    if let Some(command) = &l.command {
        check_list("command", command)?;
        if command.first().is_none_or(|c| c.trim().is_empty()) {
            return Err(bad(
                "command: the first entry (the program) must not be empty",
            ));
        }
    } else if let Some(a) = l
        .args
        .iter()
        .find(|a| l.run_profile().is_jupyter() && reserved_jupyter_arg(a))
    {
        return Err(bad(format!(
            "args: {:?} is set by kcloud (port, base URL, address and authentication)",
            a.split('=').next().unwrap_or(a)
        )));
    }
    check_list("args", &l.args)?;
    if l.env.len() > MAX_ENTRIES {
        return Err(bad(format!("env: at most {MAX_ENTRIES} variables")));
    }
    for (name, value) in &l.env {
        let b = name.as_bytes();
        let valid = !b.is_empty()
            && b.len() <= MAX_ENV_NAME
            && (b[0].is_ascii_alphabetic() || b[0] == b'_')
            && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'_');
        if !valid {
            return Err(bad(format!(
                "env: {:?} is not a valid variable name ([A-Za-z_][A-Za-z0-9_]*, at most {MAX_ENV_NAME})",
                name.chars().take(MAX_ENV_NAME).collect::<String>()
            )));
        }
        if reserved_env(name) {
            return Err(bad(format!("env: {name} is set by kcloud")));
        }
        if value.len() > MAX_VALUE_BYTES {
            return Err(Error::TooLarge(format!(
                "env: {name}: values of at most {MAX_VALUE_BYTES} bytes"
            )));
        }
        if value.contains('\0') {
            return Err(bad(format!("env: {name}: NUL characters are not allowed")));
        }
    }
    Ok(())
}

/// CPU in millicores: a number of CPUs, `"2"`, `"0.5"` or `"500m"`; 10m to 100000 CPUs.
fn cpu_millis(q: &Quantity) -> Result<u64, Error> {
    let err = || bad("cpu: a number of CPUs (e.g. 2, 0.5) or millicores (\"500m\"), 10m to 100000");
    let millis = match q {
        Quantity::Number(n) => *n * 1000.0,
        Quantity::Text(s) => match s.strip_suffix('m') {
            Some(m) => m.parse::<u64>().map_err(|_| err())? as f64,
            None => s.parse::<f64>().map_err(|_| err())? * 1000.0,
        },
    };
    if !millis.is_finite() || !(10.0..=100_000_000.0).contains(&millis) || millis.fract() != 0.0 {
        return Err(err());
    }
    Ok(millis as u64)
}

/// Memory in bytes: a number of bytes or a quantity with a suffix (`Ki`, `Mi`, `Gi`,
/// `Ti` binary; `k`, `M`, `G`, `T` decimal); 64 MiB to 1 PiB.
fn memory_bytes(q: &Quantity) -> Result<u64, Error> {
    let err =
        || bad("memory: bytes, or a quantity such as \"512Mi\", \"8Gi\", \"1G\"; 64Mi to 1Pi");
    let bytes = match q {
        Quantity::Number(n) => *n,
        Quantity::Text(s) => {
            let split = s
                .find(|c: char| !(c.is_ascii_digit() || c == '.'))
                .unwrap_or(s.len());
            let (num, suffix) = s.split_at(split);
            let factor: f64 = match suffix {
                "" => 1.0,
                "k" => 1e3,
                "M" => 1e6,
                "G" => 1e9,
                "T" => 1e12,
                "Ki" => 1024.0,
                "Mi" => 1024.0 * 1024.0,
                "Gi" => 1024.0 * 1024.0 * 1024.0,
                "Ti" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
                _ => return Err(err()),
            };
            num.parse::<f64>().map_err(|_| err())? * factor
        }
    };
    if !bytes.is_finite() || !((64u64 << 20) as f64..=(1u64 << 50) as f64).contains(&bytes) {
        return Err(err());
    }
    Ok(bytes.round() as u64)
}

/// Servers, CPU and memory against the owner's quota (their own, else the default);
/// returns the device quota for the ledger, which checks devices atomically. Failed
/// servers count as servers (they keep their name until deleted) but use nothing.
fn check_quota(
    settings: &Settings,
    quota: &Quota,
    owner: &str,
    mine: &[Server],
    plan: &Plan,
) -> Result<Option<u32>, Error> {
    let d = &settings.default_quota;
    let live = || mine.iter().filter(|s| s.status.holds_devices());
    if let Some(max) = quota.servers.or(d.servers)
        && mine.len() as u64 + 1 > u64::from(max)
    {
        return Err(Error::QuotaExceeded(format!(
            "server quota exceeded: {owner} has {} of {max} servers",
            mine.len()
        )));
    }
    if let Some(max) = quota.cpu_millis.or(d.cpu_millis) {
        let used: u64 = live().map(|s| s.cpu_millis).sum();
        if used.saturating_add(plan.cpu_millis) > max {
            return Err(Error::QuotaExceeded(format!(
                "CPU quota exceeded: {owner} uses {used}m of {max}m and asked for {}m",
                plan.cpu_millis
            )));
        }
    }
    if let Some(max) = quota.memory_bytes.or(d.memory_bytes) {
        let used: u64 = live().map(|s| s.memory_bytes).sum();
        if used.saturating_add(plan.memory_bytes) > max {
            return Err(Error::QuotaExceeded(format!(
                "memory quota exceeded: {owner} uses {used} of {max} bytes and asked for {}",
                plan.memory_bytes
            )));
        }
    }
    Ok(quota.gpus.or(d.gpus))
}

pub(crate) async fn audit(
    s: &AppState,
    caller: &Caller,
    client: std::net::IpAddr,
    action: &str,
    target: String,
    detail: String,
) -> Result<(), Error> {
    s.store()
        .audit(AuditEntry {
            at_ms: now_ms(),
            actor: caller.name.clone(),
            action: action.into(),
            target,
            detail,
            client: client.to_string(),
        })
        .await
}

/// The caller's servers; an admin's: everyone's.
#[utoipa::path(get, path = "/api/v1/servers", tag = "servers",
    responses((status = 200, body = [ServerView]), (status = 401, body = ErrorBody)),
    security(("bearer" = []), ("cookie" = [])))]
async fn list_all_servers(State(s): State<AppState>, caller: Caller) -> Json<Vec<ServerView>> {
    let owner = (!caller.is_admin()).then_some(caller.name.as_str());
    Json(
        s.provisioner
            .list(owner)
            .into_iter()
            .map(Into::into)
            .collect(),
    )
}

/// One user's servers.
#[utoipa::path(get, path = "/api/v1/users/{user}/servers", tag = "servers",
    params(("user" = String, Path)),
    responses((status = 200, body = [ServerView]), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = []), ("cookie" = [])))]
async fn list_servers(
    State(s): State<AppState>,
    caller: Caller,
    ApiPath(user): ApiPath<String>,
) -> Result<Json<Vec<ServerView>>, ApiError> {
    caller.may_see_user(&user)?;
    Ok(Json(
        s.provisioner
            .list(Some(&user))
            .into_iter()
            .map(Into::into)
            .collect(),
    ))
}

/// Creates a server and answers as soon as it exists (`pending`); poll it until
/// `running`, then open its `url`.
#[utoipa::path(post, path = "/api/v1/users/{user}/servers", tag = "servers", request_body = CreateServer,
    params(("user" = String, Path)),
    responses((status = 201, body = ServerView), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 413, body = ErrorBody),
        (status = 429, body = ErrorBody), (status = 503, body = ErrorBody)),
    security(("bearer" = []), ("cookie" = [])))]
async fn create_server(
    State(s): State<AppState>,
    caller: Caller,
    ClientAddr(client): ClientAddr,
    ApiPath(user): ApiPath<String>,
    ApiJson(req): ApiJson<CreateServer>,
) -> Result<(StatusCode, Json<ServerView>), ApiError> {
    to_completion(create(s, caller, client, user, req)).await
}

/// Runs a create or delete to its end even when the client goes away: one dropped
/// between the provisioner and the ledger would leave a server whose reservation the
/// sweep later hands out again, or a deleted server whose devices stay held.
async fn to_completion<T: Send + 'static>(
    work: impl Future<Output = Result<T, ApiError>> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::spawn(work)
        .await
        .map_err(|e| ApiError(Error::Internal(format!("request task failed: {e}"))))?
}

async fn create(
    s: AppState,
    caller: Caller,
    client: std::net::IpAddr,
    user: String,
    req: CreateServer,
) -> Result<(StatusCode, Json<ServerView>), ApiError> {
    caller.may_see_user(&user)?;
    let owner = s
        .store()
        .user(&user)
        .await?
        .ok_or_else(|| Error::NotFound(format!("no user {user:?}")))?
        .user;
    if owner.disabled {
        return Err(Error::Conflict(format!("user {user:?} is disabled")).into());
    }
    let plan = validate(&s.settings, req)?;
    let _serial = s.server_locks.lock(&user).await;
    if s.provisioner.get(&user, &plan.name).is_some() {
        return Err(Error::Conflict(format!(
            "server name {:?} is already in use (delete that server first)",
            plan.name
        ))
        .into());
    }
    let mine = s.provisioner.list(Some(&user));
    let max_devices = check_quota(&s.settings, &owner.quota, &user, &mine, &plan)?;
    // Names become volumes of this owner and shares the owner may use: never paths.
    let mounts = s
        .storage
        .resolve_mounts(&user, owner.role, plan.mounts.clone(), &mine)
        .await?;
    let holder = Holder {
        user: user.clone(),
        server: plan.name.clone(),
    };
    let reservation = match &plan.devices {
        Some(req) => Some(
            s.ledger
                .reserve(holder, req, &s.inventory, max_devices, now_ms())?,
        ),
        None => None,
    };
    let spec = ServerSpec {
        owner: user.clone(),
        name: plan.name.clone(),
        node: reservation.as_ref().map(|r| r.node.clone()),
        devices: reservation
            .as_ref()
            .map(|r| r.devices.clone())
            .unwrap_or_default(),
        cpu_millis: plan.cpu_millis,
        memory_bytes: plan.memory_bytes,
        image: plan.image.clone(),
        launch: plan.launch,
        mounts,
    };
    let server = match s.provisioner.create(spec).await {
        Ok(server) => server,
        Err(e) => {
            if let Some(r) = &reservation {
                s.ledger.abort(r.id);
            }
            return Err(e.into());
        }
    };
    let mut server = server;
    if let Some(r) = &reservation
        && let Err(e) = s.ledger.commit(r.id)
    {
        // The server may already have ended, which released its devices with it:
        // then it stays, failed, for its owner to read why. Otherwise undo it all.
        match s.provisioner.get(&user, &plan.name) {
            Some(now) if now.status == ServerStatus::Failed => server = now,
            _ => {
                if let Err(e) = s.provisioner.delete(&user, &plan.name).await {
                    tracing::error!(error = %e, "could not remove a server whose devices were lost");
                }
                s.ledger.release(&server.holder());
                return Err(
                    Error::Internal(format!("committing the device reservation: {e}")).into(),
                );
            }
        }
    }
    audit(
        &s,
        &caller,
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
    Ok((StatusCode::CREATED, Json(server.into())))
}

fn find(s: &AppState, caller: &Caller, user: &str, name: &str) -> Result<Server, Error> {
    let not_found = || Error::NotFound(format!("no server {user}/{name}"));
    caller.may_see_user(user).map_err(|_| not_found())?;
    s.provisioner.get(user, name).ok_or_else(not_found)
}

#[utoipa::path(get, path = "/api/v1/users/{user}/servers/{server}", tag = "servers",
    params(("user" = String, Path), ("server" = String, Path)),
    responses((status = 200, body = ServerView), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = []), ("cookie" = [])))]
async fn get_server(
    State(s): State<AppState>,
    caller: Caller,
    ApiPath((user, name)): ApiPath<(String, String)>,
) -> Result<Json<ServerView>, ApiError> {
    Ok(Json(find(&s, &caller, &user, &name)?.into()))
}

/// Stops the server (SIGTERM, then SIGKILL after the grace period) and frees its
/// devices before answering. 404 when there is no such server (any more). Its volumes
/// stay unless `delete_volumes=true`.
#[utoipa::path(delete, path = "/api/v1/users/{user}/servers/{server}", tag = "servers",
    params(("user" = String, Path), ("server" = String, Path), DeleteQuery),
    responses((status = 204), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody)),
    security(("bearer" = []), ("cookie" = [])))]
async fn delete_server(
    State(s): State<AppState>,
    caller: Caller,
    ClientAddr(client): ClientAddr,
    ApiPath((user, name)): ApiPath<(String, String)>,
    ApiQuery(q): ApiQuery<DeleteQuery>,
) -> Result<StatusCode, ApiError> {
    to_completion(delete(s, caller, client, user, name, q)).await
}

async fn delete(
    s: AppState,
    caller: Caller,
    client: std::net::IpAddr,
    user: String,
    name: String,
    q: DeleteQuery,
) -> Result<StatusCode, ApiError> {
    let found = find(&s, &caller, &user, &name)?;
    let _serial = s.server_locks.lock(&user).await;
    let volumes: Vec<String> = if q.delete_volumes == Some(true) {
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
    let others: Vec<_> = s
        .provisioner
        .list(Some(&user))
        .into_iter()
        .filter(|sv| sv.name != name)
        .collect();
    for v in &volumes {
        let users = crate::storage::mounted_by(&others, &user, v, true);
        if !users.is_empty() {
            return Err(Error::Conflict(format!(
                "volume {v:?} is also mounted by {}; nothing was deleted",
                users.join(", ")
            ))
            .into());
        }
    }
    let server = s
        .provisioner
        .delete(&user, &name)
        .await?
        .ok_or_else(|| Error::NotFound(format!("no server {user}/{name}")))?;
    let released = s.ledger.release(&server.holder());
    for v in &volumes {
        s.storage.delete(&user, v).await?;
    }
    audit(
        &s,
        &caller,
        client,
        "server_delete",
        format!("{user}/{name}"),
        format!(
            "released=[{}] deleted_volumes=[{}]",
            released.join(","),
            volumes.join(",")
        ),
    )
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// What an admin may change on a running server.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PatchServer {
    /// Exempt it from idle culling (admins only).
    pub cull_exempt: Option<bool>,
}

/// Changes a server's settings: today, whether idle culling may stop it (admins only).
#[utoipa::path(patch, path = "/api/v1/users/{user}/servers/{server}", tag = "servers",
    params(("user" = String, Path), ("server" = String, Path)), request_body = PatchServer,
    responses((status = 200, body = ServerView), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = []), ("cookie" = [])))]
async fn patch_server(
    State(s): State<AppState>,
    caller: Caller,
    ClientAddr(client): ClientAddr,
    ApiPath((user, name)): ApiPath<(String, String)>,
    ApiJson(req): ApiJson<PatchServer>,
) -> Result<Json<ServerView>, ApiError> {
    find(&s, &caller, &user, &name)?;
    let Some(exempt) = req.cull_exempt else {
        return Ok(Json(find(&s, &caller, &user, &name)?.into()));
    };
    if !caller.is_admin() {
        return Err(
            Error::Forbidden("only admins can exempt servers from idle culling".into()).into(),
        );
    }
    let server = s
        .provisioner
        .set_cull_exempt(&user, &name, exempt)
        .await?
        .ok_or_else(|| Error::NotFound(format!("no server {user}/{name}")))?;
    audit(
        &s,
        &caller,
        client,
        "server_cull_exempt",
        format!("{user}/{name}"),
        exempt.to_string(),
    )
    .await?;
    Ok(Json(server.into()))
}

/// The server's output (JupyterLab's log), newest lines last; its token is removed.
#[utoipa::path(get, path = "/api/v1/users/{user}/servers/{server}/logs", tag = "servers",
    params(("user" = String, Path), ("server" = String, Path), LogQuery),
    responses((status = 200, body = String, content_type = "text/plain"), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = []), ("cookie" = [])))]
async fn server_logs(
    State(s): State<AppState>,
    caller: Caller,
    ApiPath((user, name)): ApiPath<(String, String)>,
    ApiQuery(q): ApiQuery<LogQuery>,
) -> Result<Response, ApiError> {
    find(&s, &caller, &user, &name)?;
    let tail = q.tail.unwrap_or(DEFAULT_LOG_LINES);
    if tail > MAX_LOG_LINES {
        return Err(Error::BadRequest(format!("tail: at most {MAX_LOG_LINES}")).into());
    }
    if q.follow == Some(true) {
        let stream = s.provisioner.follow_logs(&user, &name, tail).await?;
        // An error after the first byte can only end the stream; it is logged.
        let body = axum::body::Body::from_stream(futures_util::StreamExt::map(stream, |chunk| {
            chunk.map_err(|e| {
                tracing::debug!(error = %e, "log follow ended");
                std::io::Error::other(e.to_string())
            })
        }));
        return Ok((
            [
                (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
                (header::CACHE_CONTROL, "no-cache"),
                (header::HeaderName::from_static("x-accel-buffering"), "no"),
            ],
            body,
        )
            .into_response());
    }
    let text = s.provisioner.logs(&user, &name, tail).await?;
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response())
}

/// What happened to the server: created, started, ready, failed, adopted, ...
#[utoipa::path(get, path = "/api/v1/users/{user}/servers/{server}/events", tag = "servers",
    params(("user" = String, Path), ("server" = String, Path)),
    responses((status = 200, body = [ServerEvent]), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = []), ("cookie" = [])))]
async fn server_events(
    State(s): State<AppState>,
    caller: Caller,
    ApiPath((user, name)): ApiPath<(String, String)>,
) -> Result<Json<Vec<ServerEvent>>, ApiError> {
    find(&s, &caller, &user, &name)?;
    Ok(Json(s.provisioner.events(&user, &name).await?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(v: serde_json::Value) -> CreateServer {
        serde_json::from_value(v).unwrap()
    }

    fn settings() -> Settings {
        Settings::load(None).unwrap()
    }

    #[test]
    fn quantities() {
        let n = |v: f64| Quantity::Number(v);
        let t = |v: &str| Quantity::Text(v.into());
        assert_eq!(cpu_millis(&n(2.0)).unwrap(), 2000);
        assert_eq!(cpu_millis(&n(0.5)).unwrap(), 500);
        assert_eq!(cpu_millis(&t("250m")).unwrap(), 250);
        assert_eq!(cpu_millis(&t("1.5")).unwrap(), 1500);
        for bad in [
            n(0.0),
            n(-1.0),
            n(f64::NAN),
            n(1e12),
            t("1x"),
            t("m"),
            t(""),
            t("0.0001"),
        ] {
            assert!(cpu_millis(&bad).is_err(), "{bad:?}");
        }
        assert_eq!(memory_bytes(&t("8Gi")).unwrap(), 8 << 30);
        assert_eq!(memory_bytes(&t("512Mi")).unwrap(), 512 << 20);
        assert_eq!(memory_bytes(&t("1G")).unwrap(), 1_000_000_000);
        assert_eq!(memory_bytes(&t("1.5Gi")).unwrap(), 3 << 29);
        assert_eq!(memory_bytes(&n(1073741824.0)).unwrap(), 1 << 30);
        for bad in [
            t("1Mi"),
            t("8GB"),
            t("Gi"),
            t("-1Gi"),
            t("2Pi"),
            n(1.0),
            n(f64::INFINITY),
        ] {
            assert!(memory_bytes(&bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn resources_from_preset_explicit_or_smallest() {
        let s = settings();
        let p = validate(
            &s,
            req(serde_json::json!({"name": "a", "preset": "medium"})),
        )
        .unwrap();
        assert_eq!((p.cpu_millis, p.memory_bytes), (8_000, 32 << 30));
        let p = validate(
            &s,
            req(serde_json::json!({"name": "a", "cpu": 1, "memory": "2Gi"})),
        )
        .unwrap();
        assert_eq!((p.cpu_millis, p.memory_bytes), (1_000, 2 << 30));
        let p = validate(&s, req(serde_json::json!({"name": "a"}))).unwrap();
        assert_eq!(
            (p.cpu_millis, p.memory_bytes),
            (2_000, 8 << 30),
            "smallest preset"
        );
        assert_eq!(
            p.image.as_deref(),
            Some("quay.io/jupyter/scipy-notebook:latest")
        );
        assert!(p.devices.is_none());
        for bad in [
            serde_json::json!({"name": "a", "preset": "huge"}),
            serde_json::json!({"name": "a", "preset": "small", "cpu": 1}),
            serde_json::json!({"name": "a", "cpu": 1}),
            serde_json::json!({"name": "A"}),
            serde_json::json!({"name": "a", "volumes": [{"volume": "v", "share": "s"}]}),
            serde_json::json!({"name": "a", "volumes": [{}]}),
            serde_json::json!({"name": "a", "volumes": [{"volume": "v", "mount_path": "/etc"}]}),
            serde_json::json!({"name": "a", "volumes": [{"share": "s", "mount_path": "/home/jovyan/../x"}]}),
            serde_json::json!({"name": "a", "devices": ["MIG-1"], "gpu_request": {"count": 1}}),
            serde_json::json!({"name": "a", "gpu_request": {"count": 1, "mig_profile": "1g.10gb"}}),
            serde_json::json!({"name": "a", "gpu_request": {}}),
            serde_json::json!({"name": "a", "devices": ["not-a-uuid"]}),
            serde_json::json!({"name": "a", "image": "docker.io/evil/miner:latest"}),
            serde_json::json!({"name": "a", "image": "quay.io/jupyter/x y"}),
            serde_json::json!({"name": "a", "env": {"1BAD": "x"}}),
            serde_json::json!({"name": "a", "env": {"A-B": "x"}}),
            serde_json::json!({"name": "a", "env": {"CUDA_VISIBLE_DEVICES": "0"}}),
            serde_json::json!({"name": "a", "env": {"KCLOUD_PORT": "1"}}),
            serde_json::json!({"name": "a", "env": {"A": "x\u{0}y"}}),
            serde_json::json!({"name": "a", "command": []}),
            serde_json::json!({"name": "a", "command": [""]}),
            serde_json::json!({"name": "a", "args": ["--ServerApp.token="]}),
            serde_json::json!({"name": "a", "args": ["--ip=0.0.0.0"]}),
            serde_json::json!({"name": "a", "args": ["--IdentityProvider.token", "x"]}),
            serde_json::json!({"name": "a", "args": ["--ServerApp.disable_check_xsrf=True"]}),
        ] {
            let shown = bad.to_string();
            assert!(
                matches!(validate(&s, req(bad)), Err(Error::BadRequest(_))),
                "{shown}"
            );
        }
        let big = "x".repeat(MAX_VALUE_BYTES + 1);
        assert!(matches!(
            validate(&s, req(serde_json::json!({"name": "a", "env": {"A": big}}))),
            Err(Error::TooLarge(_))
        ));
        let many: Vec<String> = (0..=MAX_ENTRIES).map(|i| i.to_string()).collect();
        assert!(validate(&s, req(serde_json::json!({"name": "a", "args": many}))).is_err());
    }

    #[test]
    fn devices_and_launch_pass_through() {
        let s = settings();
        let p = validate(
            &s,
            req(serde_json::json!({
                "name": "a", "devices": ["MIG-x-1"], "image": "quay.io/jupyter/base-notebook:2025",
                "command": ["python3", "-m", "http.server", "{port}"], "args": ["--ip=0.0.0.0"],
                "env": {"WANDB_MODE": "offline"}, "volumes": []
            })),
        )
        .unwrap();
        assert_eq!(
            p.devices,
            Some(DeviceRequest::Exact(vec!["MIG-x-1".into()]))
        );
        assert_eq!(
            p.launch.args,
            ["--ip=0.0.0.0"],
            "custom commands take any args"
        );
        assert_eq!(p.launch.env["WANDB_MODE"], "offline");
        let p = validate(
            &s,
            req(serde_json::json!({"name": "a", "gpu_request": {"mig_profile": "1g.10gb", "model": "NVIDIA A100-SXM4-80GB"}})),
        )
        .unwrap();
        assert_eq!(
            p.devices,
            Some(DeviceRequest::Mig {
                profile: "1g.10gb".into(),
                model: Some("NVIDIA A100-SXM4-80GB".into())
            })
        );
        let p = validate(
            &s,
            req(serde_json::json!({"name": "a", "gpu_request": {"count": 2}, "devices": []})),
        )
        .unwrap_err();
        assert!(matches!(p, Error::BadRequest(_)));
        let p = validate(&s, req(serde_json::json!({"name": "a", "devices": []}))).unwrap();
        assert!(p.devices.is_none(), "an empty list is no devices");
    }

    #[test]
    fn images_follow_the_allow_list() {
        let mut s = settings();
        s.images = crate::config::Images {
            allowed: vec!["registry.lab/*".into()],
            default: Some("registry.lab/jupyter:1".into()),
        };
        let img = |i: &str| validate(&s, req(serde_json::json!({"name": "a", "image": i})));
        assert_eq!(
            img("registry.lab/torch:2").unwrap().image.as_deref(),
            Some("registry.lab/torch:2")
        );
        assert!(img("quay.io/jupyter/scipy-notebook:latest").is_err());
        s.images.allowed.clear();
        let img = |i: &str| validate(&s, req(serde_json::json!({"name": "a", "image": i})));
        assert!(
            img("registry.lab/jupyter:1").is_ok(),
            "the default is always allowed"
        );
        assert!(img("registry.lab/torch:2").is_err());
    }

    #[test]
    fn quota_counts_servers_cpu_and_memory() {
        let s = settings();
        let plan = validate(
            &s,
            req(serde_json::json!({"name": "a", "cpu": 2, "memory": "4Gi"})),
        )
        .unwrap();
        let server = |status| Server {
            id: "x".into(),
            owner: "u".into(),
            name: "x".into(),
            status,
            reason: None,
            node: None,
            devices: vec![],
            cpu_millis: 30_000,
            memory_bytes: 1 << 30,
            image: None,
            launch: Launch::default(),
            created_at_ms: 0,
            ready_at_ms: None,
            last_activity_ms: 0,
            cull_exempt: false,
            pid: None,
            upstream: None,
            mounts: vec![],
        };
        let q = Quota::default();
        assert_eq!(check_quota(&s, &q, "u", &[], &plan).unwrap(), Some(8));
        // 30 of 32 CPUs used by a running server: 2 more fit, 3 would not.
        assert!(check_quota(&s, &q, "u", &[server(ServerStatus::Running)], &plan).is_ok());
        let big = Plan {
            cpu_millis: 3_000,
            ..validate(&s, req(serde_json::json!({"name": "b"}))).unwrap()
        };
        assert!(matches!(
            check_quota(&s, &q, "u", &[server(ServerStatus::Running)], &big),
            Err(Error::QuotaExceeded(_))
        ));
        // A failed server uses no CPU but still counts as a server.
        assert!(check_quota(&s, &q, "u", &[server(ServerStatus::Failed)], &big).is_ok());
        let one = Quota {
            servers: Some(1),
            ..Quota::default()
        };
        assert!(matches!(
            check_quota(&s, &one, "u", &[server(ServerStatus::Failed)], &plan),
            Err(Error::QuotaExceeded(_))
        ));
        let gpus = Quota {
            gpus: Some(1),
            ..Quota::default()
        };
        assert_eq!(check_quota(&s, &gpus, "u", &[], &plan).unwrap(), Some(1));
    }
}
