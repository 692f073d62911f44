//! Volumes (create, list, delete) and the NFS shares a caller may use.
//!
//! Another user's volume is 404, like their servers (admins see and delete all).
//! Deleting a volume that a server which has not failed mounts is 409.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{ApiError, ApiJson, ApiPath, AppState, Caller, ClientAddr, ErrorBody};
use crate::Error;
use crate::api::servers::audit;
use crate::storage::{NewVolume, ShareView, Volume, mounted_by};

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_volumes, create_volume))
        .routes(routes!(delete_volume))
        .routes(routes!(list_shares))
}

/// One user's volumes, with the servers that mount each.
#[utoipa::path(get, path = "/api/v1/users/{user}/volumes", tag = "storage",
    params(("user" = String, Path)),
    responses((status = 200, body = [Volume]), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = []), ("cookie" = [])))]
async fn list_volumes(
    State(s): State<AppState>,
    caller: Caller,
    ApiPath(user): ApiPath<String>,
) -> Result<Json<Vec<Volume>>, ApiError> {
    caller.may_see_user(&user)?;
    let servers = s.provisioner.list(Some(&user));
    Ok(Json(s.storage.list(Some(&user), &servers).await?))
}

/// Creates a volume: its size counts against the owner's storage quota (429 past it).
#[utoipa::path(post, path = "/api/v1/users/{user}/volumes", tag = "storage", request_body = NewVolume,
    params(("user" = String, Path)),
    responses((status = 201, body = Volume), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 429, body = ErrorBody)),
    security(("bearer" = []), ("cookie" = [])))]
async fn create_volume(
    State(s): State<AppState>,
    caller: Caller,
    ClientAddr(client): ClientAddr,
    ApiPath(user): ApiPath<String>,
    ApiJson(req): ApiJson<NewVolume>,
) -> Result<(StatusCode, Json<Volume>), ApiError> {
    caller.may_see_user(&user)?;
    let owner = s
        .store()
        .user(&user)
        .await?
        .ok_or_else(|| Error::NotFound(format!("no user {user:?}")))?
        .user;
    let quota = owner
        .quota
        .storage_bytes
        .or(s.settings.default_quota.storage_bytes);
    let row = s.storage.create(&user, req, quota).await?;
    audit(
        &s,
        &caller,
        client,
        "volume_create",
        format!("{user}/{}", row.name),
        format!(
            "size_bytes={} access_mode={}",
            row.size_bytes,
            row.access_mode.as_str()
        ),
    )
    .await?;
    Ok((StatusCode::CREATED, Json(s.storage.view(row, &[], None))))
}

/// Deletes a volume and its files. 409 while a server that has not failed mounts it.
#[utoipa::path(delete, path = "/api/v1/users/{user}/volumes/{volume}", tag = "storage",
    params(("user" = String, Path), ("volume" = String, Path)),
    responses((status = 204), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("bearer" = []), ("cookie" = [])))]
async fn delete_volume(
    State(s): State<AppState>,
    caller: Caller,
    ClientAddr(client): ClientAddr,
    ApiPath((user, name)): ApiPath<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let not_found = || Error::NotFound(format!("no volume {user}/{name}"));
    caller.may_see_user(&user).map_err(|_| not_found())?;
    // The servers' lock: a server being created cannot mount it meanwhile.
    let _serial = s.server_locks.lock(&user).await;
    s.storage
        .volume(&user, &name)
        .await?
        .ok_or_else(not_found)?;
    let users = mounted_by(&s.provisioner.list(Some(&user)), &user, &name, true);
    if !users.is_empty() {
        return Err(Error::Conflict(format!(
            "volume {name:?} is mounted by {}; delete those servers first",
            users.join(", ")
        ))
        .into());
    }
    if !s.storage.delete(&user, &name).await? {
        return Err(not_found().into());
    }
    audit(
        &s,
        &caller,
        client,
        "volume_delete",
        format!("{user}/{name}"),
        String::new(),
    )
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The NFS shares the caller may browse and mount (admins: all).
#[utoipa::path(get, path = "/api/v1/shares", tag = "storage",
    responses((status = 200, body = [ShareView]), (status = 401, body = ErrorBody)),
    security(("bearer" = []), ("cookie" = [])))]
async fn list_shares(State(s): State<AppState>, caller: Caller) -> Json<Vec<ShareView>> {
    Json(s.storage.shares_for(&caller.name, caller.role))
}
