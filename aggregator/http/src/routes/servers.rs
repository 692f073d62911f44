//! Servers: create, list, inspect, delete; their logs and events (the use cases are in
//! `kcloud_service::servers`).
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

use kcloud_core::launch::Launch;
use kcloud_core::reservation::format_instant;
use kcloud_core::server::{Server, ServerEvent, ServerStatus};
use kcloud_service::servers::{CreateServer, Created, DEFAULT_LOG_LINES};
use kcloud_service::volumes::MountRequest;

use crate::AppState;
use crate::error::{ApiError, ErrorBody};
use crate::extract::{ApiJson, ApiPath, ApiQuery, Caller, ClientAddr, RequestPort};

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_all_servers))
        .routes(routes!(list_servers, create_server))
        .routes(routes!(get_server, delete_server, patch_server))
        .routes(routes!(server_logs))
        .routes(routes!(server_events))
        .routes(routes!(open_server))
        .routes(routes!(keep_server))
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
    /// Queued: its place in the queue (1 is next).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue_position: Option<u32>,
    /// Queued: when it is expected to start (RFC 3339), or `unknown` when nothing
    /// known (reservations, scheduled stops, idle culling) says.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub estimated_start: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub estimated_start_ms: Option<u64>,
    /// Queued: it leaves the queue then if it has not started.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wait_until_ms: Option<u64>,
    /// It will be stopped then (volumes are kept): its devices are reserved by someone
    /// else (warned 15 and 5 minutes before), or its GPUs have been idle (shown from
    /// the warning on; `POST .../keep` answers it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ends_at_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ends_because: Option<String>,
    /// `reservation` or `gpu_idle`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ends_reason: Option<String>,
}

impl ServerView {
    /// The view of `server` with its place in the queue or its scheduled end.
    pub fn of(s: &AppState, server: Server) -> Self {
        let place = s.servers.queue_place(&server);
        let ends = s.servers.ends_at(&server);
        let mut v = ServerView::from(server);
        if let Some(p) = place {
            v.queue_position = p.position;
            v.estimated_start = Some(
                p.estimated_start_ms
                    .map_or_else(|| "unknown".to_owned(), format_instant),
            );
            v.estimated_start_ms = p.estimated_start_ms;
            v.wait_until_ms = Some(p.wait_until_ms);
        }
        if let Some(e) = ends {
            v.ends_at_ms = Some(e.at_ms);
            v.ends_because = Some(e.because);
            v.ends_reason = Some(e.reason.to_owned());
        }
        v
    }
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
            queue_position: None,
            estimated_start: None,
            estimated_start_ms: None,
            wait_until_ms: None,
            ends_at_ms: None,
            ends_because: None,
            ends_reason: None,
        }
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct LogQuery {
    /// Lines from the end (default 200, at most 10000).
    #[param(maximum = 10_000)]
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

/// The caller's servers; an admin's: everyone's.
#[utoipa::path(get, path = "/api/v1/servers", tag = "servers",
    responses((status = 200, body = [ServerView]), (status = 401, body = ErrorBody)),
    security(("bearer" = []), ("cookie" = [])))]
async fn list_all_servers(
    State(s): State<AppState>,
    caller: Caller,
) -> Result<Json<Vec<ServerView>>, ApiError> {
    Ok(Json(views(&s, s.servers.list(&caller, None)?)))
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
    // A user who does not exist has no servers to list: 404, as for any other object.
    s.users.get(&caller, &user).await?;
    Ok(Json(views(&s, s.servers.list(&caller, Some(&user))?)))
}

fn views(s: &AppState, servers: Vec<Server>) -> Vec<ServerView> {
    servers.into_iter().map(|v| ServerView::of(s, v)).collect()
}

/// Creates a server and answers as soon as it exists (`pending`, 201); poll it until
/// `running`, then open its `url`. With `wait`, when no fitting device is free, it
/// is queued instead (202, `status: "queued"`, with `queue_position` and
/// `estimated_start`) and starts by itself when its devices free up.
#[utoipa::path(post, path = "/api/v1/users/{user}/servers", tag = "servers", request_body = CreateServer,
    params(("user" = String, Path)),
    responses((status = 201, body = ServerView), (status = 202, description = "Queued", body = ServerView), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
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
    Ok(match s.servers.create(caller.0, client, user, req).await? {
        Created::Started(server) => (StatusCode::CREATED, Json(ServerView::of(&s, server))),
        Created::Queued(server) => (StatusCode::ACCEPTED, Json(ServerView::of(&s, server))),
    })
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
    Ok(Json(ServerView::of(
        &s,
        s.servers.get(&caller, &user, &name)?,
    )))
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
    s.servers
        .delete(caller.0, client, user, name, q.delete_volumes == Some(true))
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
    let server = match req.cull_exempt {
        None => s.servers.get(&caller, &user, &name)?,
        Some(exempt) => {
            s.servers
                .set_cull_exempt(&caller, client, &user, &name, exempt)
                .await?
        }
    };
    Ok(Json(server.into()))
}

/// The owner's answer to an idle-GPU warning: keep the server; its idle window starts
/// over. Limited per day (`[culling] gpu_idle_keeps_per_day`; 429 after); 409 when the
/// server is not idle or reclaim is off.
#[utoipa::path(post, path = "/api/v1/users/{user}/servers/{server}/keep", tag = "servers",
    params(("user" = String, Path), ("server" = String, Path)),
    responses((status = 200, body = ServerView), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
        (status = 429, body = ErrorBody)),
    security(("bearer" = []), ("cookie" = [])))]
async fn keep_server(
    State(s): State<AppState>,
    caller: Caller,
    ClientAddr(client): ClientAddr,
    ApiPath((user, name)): ApiPath<(String, String)>,
) -> Result<Json<ServerView>, ApiError> {
    let server = s.servers.keep(&caller, client, &user, &name).await?;
    Ok(Json(ServerView::of(&s, server)))
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
    let tail = q.tail.unwrap_or(DEFAULT_LOG_LINES);
    if q.follow == Some(true) {
        let stream = s.servers.follow_logs(&caller, &user, &name, tail).await?;
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
    let text = s.servers.logs(&caller, &user, &name, tail).await?;
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
    Ok(Json(s.servers.events(&caller, &user, &name).await?))
}

/// Opening a server in the browser.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OpenServer {
    /// An admin opening another user's server confirms it (audited).
    #[serde(default)]
    pub as_admin: bool,
}

/// Where the browser opens the server: its owner's origin, with a one-time code.
#[derive(Debug, Serialize, ToSchema)]
pub struct Opened {
    /// Navigate here (once, within `expires_in` seconds).
    pub url: String,
    pub expires_in: u64,
}

/// A one-time link that signs this browser in to the server on its owner's origin
/// (never the portal's). Admins opening another user's server confirm with `as_admin`
/// (audited).
#[utoipa::path(post, path = "/api/v1/users/{user}/servers/{server}/open", tag = "servers",
    params(("user" = String, Path), ("server" = String, Path)), request_body = OpenServer,
    responses((status = 200, body = Opened), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 429, body = ErrorBody)),
    security(("bearer" = []), ("cookie" = [])))]
async fn open_server(
    State(s): State<AppState>,
    caller: Caller,
    ClientAddr(client): ClientAddr,
    RequestPort(port): RequestPort,
    ApiPath((user, name)): ApiPath<(String, String)>,
    ApiJson(open): ApiJson<OpenServer>,
) -> Result<Json<Opened>, ApiError> {
    s.servers
        .open(&caller, client, &user, &name, open.as_admin)
        .await?;
    let code = s.auth.open_code(&caller, &user, &name)?;
    let next = format!("/user/{user}/{name}/");
    Ok(Json(Opened {
        url: crate::proxy::session_url(&s, &user, port, &code, &next),
        expires_in: kcloud_service::auth::OPEN_CODE_TTL.as_secs(),
    }))
}
