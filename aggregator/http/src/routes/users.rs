//! User administration.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use kcloud_core::user::User;
use kcloud_service::users::{CreateUser, UpdateUser};

use crate::AppState;
use crate::error::{ApiError, ErrorBody};
use crate::extract::{ApiJson, ApiPath, Caller, ClientAddr};

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_users, create_user))
        .routes(routes!(get_user, update_user, delete_user))
}

#[utoipa::path(get, path = "/api/v1/users", tag = "users",
    responses((status = 200, body = [User]), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)),
    security(("bearer" = []), ("cookie" = [])))]
async fn list_users(
    State(s): State<AppState>,
    caller: Caller,
) -> Result<Json<Vec<User>>, ApiError> {
    Ok(Json(s.users.list(&caller).await?))
}

#[utoipa::path(post, path = "/api/v1/users", tag = "users", request_body = CreateUser,
    responses((status = 201, body = User), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("bearer" = []), ("cookie" = [])))]
async fn create_user(
    State(s): State<AppState>,
    caller: Caller,
    ClientAddr(client): ClientAddr,
    ApiJson(req): ApiJson<CreateUser>,
) -> Result<(StatusCode, Json<User>), ApiError> {
    Ok((
        StatusCode::CREATED,
        Json(s.users.create(&caller, client, req).await?),
    ))
}

#[utoipa::path(get, path = "/api/v1/users/{user}", tag = "users",
    params(("user" = String, Path)),
    responses((status = 200, body = User), (status = 404, body = ErrorBody)),
    security(("bearer" = []), ("cookie" = [])))]
async fn get_user(
    State(s): State<AppState>,
    caller: Caller,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<User>, ApiError> {
    Ok(Json(s.users.get(&caller, &name).await?))
}

#[utoipa::path(patch, path = "/api/v1/users/{user}", tag = "users", request_body = UpdateUser,
    params(("user" = String, Path)),
    responses((status = 200, body = User), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("bearer" = []), ("cookie" = [])))]
async fn update_user(
    State(s): State<AppState>,
    caller: Caller,
    ClientAddr(client): ClientAddr,
    ApiPath(name): ApiPath<String>,
    ApiJson(req): ApiJson<UpdateUser>,
) -> Result<Json<User>, ApiError> {
    Ok(Json(s.users.update(&caller, client, &name, req).await?))
}

#[utoipa::path(delete, path = "/api/v1/users/{user}", tag = "users",
    params(("user" = String, Path)),
    responses((status = 204), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("bearer" = []), ("cookie" = [])))]
async fn delete_user(
    State(s): State<AppState>,
    caller: Caller,
    ClientAddr(client): ClientAddr,
    ApiPath(name): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    s.users.delete(&caller, client, &name).await?;
    Ok(StatusCode::NO_CONTENT)
}
