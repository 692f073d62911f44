//! Personal API tokens (the use case is `kcloud_service::auth`): created by their
//! owner's session and shown once, listed without secrets, revoked by the owner or an
//! admin.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use kcloud_core::token::{ApiTokenView, Scope};

use crate::AppState;
use crate::error::{ApiError, ErrorBody};
use crate::extract::{ApiJson, ApiPath, Caller, ClientAddr};

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_tokens, create_token))
        .routes(routes!(revoke_token))
        .routes(routes!(all_tokens))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewToken {
    /// What it is for (`laptop VS Code`): 1 to 64 characters, unique per user.
    #[schema(min_length = 1, max_length = 64)]
    pub name: String,
    /// At least one of `read`, `servers`, `proxy`.
    #[schema(min_items = 1)]
    pub scopes: Vec<Scope>,
    /// Lifetime, e.g. `30d`: from `1m` to `366d`; default `90d`.
    pub expires_in: Option<String>,
}

/// A token just created: the only time its secret is shown.
#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedToken {
    /// Send as `Authorization: Bearer <token>` (the API, the proxy),
    /// `Authorization: token <token>` or `?token=<token>` (Jupyter clients, the proxy).
    pub token: String,
    #[serde(flatten)]
    pub info: ApiTokenView,
}

/// Your personal API tokens (an admin: anyone's), without their secrets.
#[utoipa::path(get, path = "/api/v1/users/{user}/tokens", tag = "tokens",
    params(("user" = String, Path)),
    responses((status = 200, body = [ApiTokenView]), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = []), ("cookie" = [])))]
async fn list_tokens(
    State(s): State<AppState>,
    caller: Caller,
    ApiPath(user): ApiPath<String>,
) -> Result<Json<Vec<ApiTokenView>>, ApiError> {
    Ok(Json(s.auth.list_tokens(&caller, Some(&user)).await?))
}

/// Creates a personal API token for a desktop client: only its owner, from a signed-in
/// session. The answer holds the secret; it is stored only as a hash.
#[utoipa::path(post, path = "/api/v1/users/{user}/tokens", tag = "tokens", request_body = NewToken,
    params(("user" = String, Path)),
    responses((status = 201, body = CreatedToken), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
        (status = 429, body = ErrorBody)),
    security(("bearer" = []), ("cookie" = [])))]
async fn create_token(
    State(s): State<AppState>,
    caller: Caller,
    ClientAddr(client): ClientAddr,
    ApiPath(user): ApiPath<String>,
    ApiJson(req): ApiJson<NewToken>,
) -> Result<(StatusCode, Json<CreatedToken>), ApiError> {
    let t = s
        .auth
        .create_token(
            &caller,
            client,
            &user,
            &req.name,
            &req.scopes,
            req.expires_in.as_deref(),
        )
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(CreatedToken {
            token: t.token,
            info: t.view,
        }),
    ))
}

/// Revokes a token (its owner or an admin): it stops working at once.
#[utoipa::path(delete, path = "/api/v1/users/{user}/tokens/{id}", tag = "tokens",
    params(("user" = String, Path), ("id" = String, Path)),
    responses((status = 204), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = []), ("cookie" = [])))]
async fn revoke_token(
    State(s): State<AppState>,
    caller: Caller,
    ClientAddr(client): ClientAddr,
    ApiPath((user, id)): ApiPath<(String, String)>,
) -> Result<StatusCode, ApiError> {
    s.auth.revoke_token(&caller, client, &user, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Every user's tokens (admins), without their secrets.
#[utoipa::path(get, path = "/api/v1/tokens", tag = "tokens",
    responses((status = 200, body = [ApiTokenView]), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)),
    security(("bearer" = []), ("cookie" = [])))]
async fn all_tokens(
    State(s): State<AppState>,
    caller: Caller,
) -> Result<Json<Vec<ApiTokenView>>, ApiError> {
    Ok(Json(s.auth.list_tokens(&caller, None).await?))
}
