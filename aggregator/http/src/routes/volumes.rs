//! Volumes (create, list, delete) and the NFS shares a caller may use.
//!
//! Another user's volume is 404, like their servers (admins see and delete all).
//! Deleting a volume that a server which has not failed mounts is 409.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use kcloud_service::volumes::{NewVolume, ShareView, Volume};

use crate::AppState;
use crate::error::{ApiError, ErrorBody};
use crate::extract::{ApiJson, ApiPath, Caller, ClientAddr};

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
    s.users.get(&caller, &user).await?;
    Ok(Json(s.volumes.list(&caller, &user).await?))
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
    Ok((
        StatusCode::CREATED,
        Json(s.volumes.create(&caller, client, &user, req).await?),
    ))
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
    s.volumes.delete(&caller, client, &user, &name).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The NFS shares the caller may browse and mount (admins: all): each share's roles and
/// users, and the caller's groups' entitlements.
#[utoipa::path(get, path = "/api/v1/shares", tag = "storage",
    responses((status = 200, body = [ShareView]), (status = 401, body = ErrorBody)),
    security(("bearer" = []), ("cookie" = [])))]
async fn list_shares(
    State(s): State<AppState>,
    caller: Caller,
) -> Result<Json<Vec<ShareView>>, ApiError> {
    Ok(Json(s.volumes.shares(&caller).await?))
}
