//! Groups (the use case is `kcloud_service::groups`): admins create, change and delete
//! them; members see their own.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use kcloud_core::group::Group;
use kcloud_service::groups::{ChangeGroup, NewGroup};

use crate::AppState;
use crate::error::{ApiError, ErrorBody};
use crate::extract::{ApiJson, ApiPath, Caller, ClientAddr};

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_groups, create_group))
        .routes(routes!(get_group, change_group, delete_group))
}

/// Every group (admins), or the caller's own.
#[utoipa::path(get, path = "/api/v1/groups", tag = "groups",
    responses((status = 200, body = [Group]), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)),
    security(("bearer" = []), ("cookie" = [])))]
async fn list_groups(
    State(s): State<AppState>,
    caller: Caller,
) -> Result<Json<Vec<Group>>, ApiError> {
    Ok(Json(s.servers.groups().list(&caller).await?))
}

/// Creates a group with its quota (for the members together), entitlements and
/// members (admins).
#[utoipa::path(post, path = "/api/v1/groups", tag = "groups", request_body = NewGroup,
    responses((status = 201, body = Group), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody, description = "A member who is no user"),
        (status = 409, body = ErrorBody)),
    security(("bearer" = []), ("cookie" = [])))]
async fn create_group(
    State(s): State<AppState>,
    caller: Caller,
    ClientAddr(client): ClientAddr,
    ApiJson(req): ApiJson<NewGroup>,
) -> Result<(StatusCode, Json<Group>), ApiError> {
    Ok((
        StatusCode::CREATED,
        Json(s.servers.groups().create(&caller, client, req).await?),
    ))
}

/// A group (its members and admins; to anyone else it does not exist).
#[utoipa::path(get, path = "/api/v1/groups/{group}", tag = "groups",
    params(("group" = String, Path)),
    responses((status = 200, body = Group), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = []), ("cookie" = [])))]
async fn get_group(
    State(s): State<AppState>,
    caller: Caller,
    ApiPath(group): ApiPath<String>,
) -> Result<Json<Group>, ApiError> {
    Ok(Json(s.servers.groups().get(&caller, &group).await?))
}

/// Changes a group (admins): description, quota, entitlements replaced when given;
/// members added and removed.
#[utoipa::path(patch, path = "/api/v1/groups/{group}", tag = "groups", request_body = ChangeGroup,
    params(("group" = String, Path)),
    responses((status = 200, body = Group), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = []), ("cookie" = [])))]
async fn change_group(
    State(s): State<AppState>,
    caller: Caller,
    ClientAddr(client): ClientAddr,
    ApiPath(group): ApiPath<String>,
    ApiJson(req): ApiJson<ChangeGroup>,
) -> Result<Json<Group>, ApiError> {
    Ok(Json(
        s.servers
            .groups()
            .update(&caller, client, &group, req)
            .await?,
    ))
}

/// Deletes a group (admins); its members stay.
#[utoipa::path(delete, path = "/api/v1/groups/{group}", tag = "groups",
    params(("group" = String, Path)),
    responses((status = 204), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = []), ("cookie" = [])))]
async fn delete_group(
    State(s): State<AppState>,
    caller: Caller,
    ClientAddr(client): ClientAddr,
    ApiPath(group): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    s.servers.groups().delete(&caller, client, &group).await?;
    Ok(StatusCode::NO_CONTENT)
}
