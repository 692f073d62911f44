//! Sign-in, token refresh, sign-out, and who am I.

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use kcloud_core::private::random_token;
use kcloud_core::{Error, now_ms};
use kcloud_service::auth::Session;
use kcloud_service::users::Me;

use crate::AppState;
use crate::error::{ApiError, ErrorBody};
use crate::extract::{
    ACCESS_COOKIE, ApiJson, CSRF_COOKIE, Caller, ClientAddr, REFRESH_COOKIE, check_csrf, cookie,
    portal_cookie,
};

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(login))
        .routes(routes!(refresh))
        .routes(routes!(logout))
        .routes(routes!(me))
}

/// Who signs in. A user is named `name` everywhere in the API; `username` is accepted
/// here too (the field's name before), but not both.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    #[serde(alias = "username")]
    pub name: String,
    pub password: String,
}

/// Refresh and logout take the refresh token in the body (API clients) or from the
/// refresh cookie (browsers, with the CSRF header).
#[derive(Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct RefreshRequest {
    pub refresh_token: Option<String>,
}

/// Sign in. Returns tokens for API clients and sets the session cookies for browsers.
#[utoipa::path(post, path = "/api/v1/auth/login", tag = "auth", request_body = LoginRequest,
    responses((status = 200, body = Session), (status = 401, body = ErrorBody), (status = 429, body = ErrorBody)))]
async fn login(
    State(s): State<AppState>,
    ClientAddr(client): ClientAddr,
    ApiJson(req): ApiJson<LoginRequest>,
) -> Result<Response, ApiError> {
    let result = s
        .auth
        .login(&req.name, &req.password, client, now_ms())
        .await;
    s.metrics.observe_login(result.is_ok());
    Ok(with_session_cookies(&s, result?))
}

/// Trade a refresh token for new tokens; the old refresh token stops working.
#[utoipa::path(post, path = "/api/v1/auth/refresh", tag = "auth", request_body = RefreshRequest,
    responses((status = 200, body = Session), (status = 401, body = ErrorBody)))]
async fn refresh(
    State(s): State<AppState>,
    headers: HeaderMap,
    method: Method,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let token = refresh_token(&s, &headers, &method, &body?)?;
    let session = s.auth.refresh(&token, now_ms()).await?;
    Ok(with_session_cookies(&s, session))
}

/// Sign out: revokes the refresh token's whole family and clears the cookies.
#[utoipa::path(post, path = "/api/v1/auth/logout", tag = "auth", request_body = RefreshRequest,
    responses((status = 204), (status = 401, body = ErrorBody)))]
async fn logout(
    State(s): State<AppState>,
    headers: HeaderMap,
    method: Method,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let token = refresh_token(&s, &headers, &method, &body?)?;
    s.auth.logout(&token).await?;
    let mut resp = StatusCode::NO_CONTENT.into_response();
    let secure = if s.secure_cookies { "; Secure" } else { "" };
    for base in [ACCESS_COOKIE, REFRESH_COOKIE, CSRF_COOKIE] {
        let name = portal_cookie(s.secure_cookies, base);
        append_cookie(
            &mut resp,
            &format!("{name}=; Path=/; Max-Age=0; SameSite=Lax{secure}"),
        );
    }
    Ok(resp)
}

/// The refresh token from an optional JSON body, else from the cookie (browsers).
fn refresh_token(
    s: &AppState,
    headers: &HeaderMap,
    method: &Method,
    body: &[u8],
) -> Result<String, Error> {
    if !body.iter().all(u8::is_ascii_whitespace) {
        let req: RefreshRequest = serde_json::from_slice(body)
            .map_err(|e| Error::BadRequest(format!("invalid JSON body: {e}")))?;
        if let Some(t) = req.refresh_token {
            return Ok(t);
        }
    }
    let t = cookie(headers, &portal_cookie(s.secure_cookies, REFRESH_COOKIE))
        .ok_or_else(|| Error::Unauthorized("no refresh token".into()))?;
    check_csrf(headers, method, s.secure_cookies)?;
    Ok(t)
}

pub(crate) fn append_cookie(resp: &mut Response, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        resp.headers_mut().append(header::SET_COOKIE, v);
    }
}

/// The JSON session plus three host-only cookies of the portal's origin (no `Domain`,
/// `__Host-` prefixed when `Secure`, so user origins can neither read nor set them):
/// the access token (HttpOnly), the refresh token (HttpOnly, SameSite=Strict), and a
/// random CSRF token the page reads and echoes in `X-CSRF-Token`.
fn with_session_cookies(s: &AppState, session: Session) -> Response {
    let cookies = session_cookies(s, &session);
    let mut resp = Json(session).into_response();
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    for c in cookies {
        append_cookie(&mut resp, &c);
    }
    resp
}

/// The session's cookies (see [`with_session_cookies`]) on another response: single
/// sign-on's redirect back to the portal.
pub(crate) fn add_session_cookies(s: &AppState, session: &Session, resp: &mut Response) {
    for c in session_cookies(s, session) {
        append_cookie(resp, &c);
    }
}

fn session_cookies(s: &AppState, session: &Session) -> [String; 3] {
    let secure = if s.secure_cookies { "; Secure" } else { "" };
    let name = |base| portal_cookie(s.secure_cookies, base);
    let access_age = session.expires_in;
    let refresh_age = s.auth.refresh_ttl().as_secs();
    let csrf = random_token();
    // `__Host-` requires `Path=/`, so the refresh cookie is not path-scoped: HttpOnly
    // and SameSite=Strict keep it, and the proxy never forwards kcloud's cookies.
    [
        format!(
            "{}={}; Path=/; Max-Age={access_age}; HttpOnly; SameSite=Lax{secure}",
            name(ACCESS_COOKIE),
            session.access_token
        ),
        format!(
            "{}={}; Path=/; Max-Age={refresh_age}; HttpOnly; SameSite=Strict{secure}",
            name(REFRESH_COOKIE),
            session.refresh_token
        ),
        format!(
            "{}={csrf}; Path=/; Max-Age={refresh_age}; SameSite=Strict{secure}",
            name(CSRF_COOKIE)
        ),
    ]
}

/// The signed-in user, their effective quota and what they hold.
#[utoipa::path(get, path = "/api/v1/me", tag = "auth",
    responses((status = 200, body = Me), (status = 401, body = ErrorBody)),
    security(("bearer" = []), ("cookie" = [])))]
async fn me(State(s): State<AppState>, caller: Caller) -> Result<Json<Me>, ApiError> {
    Ok(Json(s.users.me(&caller).await?))
}
