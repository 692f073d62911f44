//! User administration.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::Deserialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{ApiError, ApiJson, ApiPath, AppState, Caller, ClientAddr, ErrorBody};
use crate::store::{AuditEntry, NewUser, Quota, Role, User, UserPatch, validate_user_name};
use crate::{Error, now_ms};

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_users, create_user))
        .routes(routes!(get_user, update_user, delete_user))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateUser {
    pub name: String,
    /// 12 to 1024 bytes.
    pub password: String,
    #[serde(default = "default_role")]
    pub role: Role,
    #[serde(default)]
    pub quota: Quota,
}

fn default_role() -> Role {
    Role::User
}

/// Fields to change; absent fields stay as they are.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateUser {
    pub role: Option<Role>,
    pub disabled: Option<bool>,
    pub quota: Option<Quota>,
    pub password: Option<String>,
}

async fn audit(
    s: &AppState,
    caller: &Caller,
    client: std::net::IpAddr,
    action: &str,
    target: &str,
    detail: String,
) -> Result<(), Error> {
    s.store()
        .audit(AuditEntry {
            at_ms: now_ms(),
            actor: caller.name.clone(),
            action: action.into(),
            target: target.into(),
            detail,
            client: client.to_string(),
        })
        .await
}

#[utoipa::path(get, path = "/api/v1/users", tag = "users",
    responses((status = 200, body = [User]), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)),
    security(("bearer" = []), ("cookie" = [])))]
async fn list_users(
    State(s): State<AppState>,
    caller: Caller,
) -> Result<Json<Vec<User>>, ApiError> {
    caller.require_admin()?;
    Ok(Json(s.store().users().await?))
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
    caller.require_admin()?;
    validate_user_name(&req.name)?;
    validate_quota(&req.quota)?;
    let password_hash = s.auth.hash_password(&req.password).await?;
    let user = s
        .store()
        .create_user(NewUser {
            name: req.name,
            password_hash,
            role: req.role,
            quota: req.quota,
        })
        .await?;
    audit(
        &s,
        &caller,
        client,
        "user_create",
        &user.name,
        format!("role={:?}", user.role),
    )
    .await?;
    Ok((StatusCode::CREATED, Json(user)))
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
    caller.may_see_user(&name)?;
    let record = s
        .store()
        .user(&name)
        .await?
        .ok_or_else(|| Error::NotFound(format!("no user {name:?}")))?;
    Ok(Json(record.user))
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
    caller.require_admin()?;
    if let Some(q) = &req.quota {
        validate_quota(q)?;
    }
    let losing_admin = req.role == Some(Role::User) || req.disabled == Some(true);
    if losing_admin {
        guard_last_admin(&s, &name).await?;
    }
    let password_hash = match req.password {
        Some(p) => Some(s.auth.hash_password(&p).await?),
        None => None,
    };
    let changed_password = password_hash.is_some();
    let detail = format!(
        "role={:?} disabled={:?} quota={} password={}",
        req.role,
        req.disabled,
        req.quota.is_some(),
        changed_password
    );
    let user = s
        .store()
        .update_user(
            &name,
            UserPatch {
                role: req.role,
                disabled: req.disabled,
                quota: req.quota,
                password_hash,
            },
        )
        .await?
        .ok_or_else(|| Error::NotFound(format!("no user {name:?}")))?;
    if changed_password || req.disabled == Some(true) {
        // Sessions of a disabled user, or issued under the old password, end now.
        s.store().revoke_user_tokens(&name).await?;
    }
    audit(&s, &caller, client, "user_update", &name, detail).await?;
    Ok(Json(user))
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
    caller.require_admin()?;
    if name == caller.name {
        return Err(Error::Conflict("you cannot delete your own account".into()).into());
    }
    guard_last_admin(&s, &name).await?;
    if !s.provisioner.list(Some(&name)).is_empty() {
        return Err(Error::Conflict(format!(
            "user {name:?} still has servers; delete their servers first"
        ))
        .into());
    }
    if s.ledger.devices_held_by(&name) > 0 {
        return Err(Error::Conflict(format!(
            "user {name:?} still holds devices; delete their servers first"
        ))
        .into());
    }
    if !s.store().delete_user(&name).await? {
        return Err(Error::NotFound(format!("no user {name:?}")).into());
    }
    audit(&s, &caller, client, "user_delete", &name, String::new()).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Refuses a change that would leave no enabled admin.
async fn guard_last_admin(s: &AppState, name: &str) -> Result<(), Error> {
    let is_enabled_admin = s
        .store()
        .user(name)
        .await?
        .is_some_and(|r| r.user.role == Role::Admin && !r.user.disabled);
    if is_enabled_admin && s.store().admin_count().await? <= 1 {
        return Err(Error::Conflict("that would leave no enabled admin".into()));
    }
    Ok(())
}

fn validate_quota(q: &Quota) -> Result<(), Error> {
    let ok = q.gpus.is_none_or(|v| v <= 4096)
        && q.servers.is_none_or(|v| v <= 10_000)
        && q.cpu_millis.is_none_or(|v| v <= 100_000_000)
        && q.memory_bytes.is_none_or(|v| v <= 1 << 50);
    if ok {
        Ok(())
    } else {
        Err(Error::BadRequest("quota value out of range".into()))
    }
}
