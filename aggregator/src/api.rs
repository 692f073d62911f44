//! The REST API: one router, one error type, the authentication extractors.
//!
//! Every route lives in a submodule named after what it serves and is registered
//! through `utoipa_axum`, so the OpenAPI document at `/api/openapi.json` covers every
//! endpoint by construction.

mod events;
mod files;
mod nodes;
mod ops;
mod servers;
mod session;
mod users;
mod volumes;

use std::sync::Arc;
use std::time::Instant;

use axum::extract::rejection::{BytesRejection, JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, MatchedPath, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use serde::Serialize;
use serde::de::DeserializeOwned;
use utoipa::ToSchema;
use utoipa::openapi::OpenApi;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa_axum::router::OpenApiRouter;

use crate::Error;
use crate::auth::Auth;
use crate::config::Settings;
use crate::inventory::Inventory;
use crate::ledger::Ledger;
use crate::metrics::Metrics;
use crate::store::{Role, Store};

/// Largest request body accepted anywhere (inventories of big nodes included).
pub const MAX_BODY: usize = 1 << 20;

pub const ACCESS_COOKIE: &str = "kcloud_access";
pub const REFRESH_COOKIE: &str = "kcloud_refresh";
pub const CSRF_COOKIE: &str = "kcloud_csrf";
pub const CSRF_HEADER: &str = "x-csrf-token";

/// What every handler can reach. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub auth: Arc<Auth>,
    pub inventory: Arc<Inventory>,
    pub ledger: Arc<Ledger>,
    pub settings: Arc<Settings>,
    pub metrics: Arc<Metrics>,
    /// The agents' shared secret; compared in constant time, never logged.
    pub agent_token: Arc<str>,
    pub secure_cookies: bool,
    /// Node figures and history from Prometheus, when configured.
    pub prometheus: Option<Arc<crate::prometheus::Prometheus>>,
    /// Where servers run.
    pub provisioner: Arc<dyn crate::provisioner::Provisioner>,
    /// Volumes and shares.
    pub storage: Arc<crate::storage::Storage>,
    /// Creates and deletes of one owner's servers (and volumes) run one at a time.
    pub server_locks: Arc<crate::provisioner::OwnerLocks>,
    /// The proxy's pooled client to servers.
    pub proxy_client: crate::proxy::HttpClient,
}

impl AppState {
    pub fn store(&self) -> &Store {
        self.auth.store()
    }
}

/// The whole API and its OpenAPI description.
pub fn router(state: AppState) -> (Router, OpenApi) {
    let (router, mut api) = OpenApiRouter::new()
        .merge(session::routes())
        .merge(users::routes())
        .merge(nodes::routes())
        .merge(ops::routes())
        .merge(servers::routes())
        .merge(events::routes())
        .merge(volumes::routes())
        .merge(files::routes())
        .split_for_parts();
    api.info.title = "kcloud".into();
    api.info.version = env!("CARGO_PKG_VERSION").into();
    api.info.description = Some(
        "Self-service GPU platform. Authenticate with `Authorization: Bearer <access token>` \
         (from /api/v1/auth/login) or the session cookie plus the `X-CSRF-Token` header on writes."
            .into(),
    );
    let components = api.components.get_or_insert_with(Default::default);
    components.add_security_scheme(
        "bearer",
        SecurityScheme::Http(
            HttpBuilder::new()
                .scheme(HttpAuthScheme::Bearer)
                .bearer_format("JWT")
                .build(),
        ),
    );
    components.add_security_scheme(
        "agent_token",
        SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
    );
    components.add_security_scheme(
        "cookie",
        SecurityScheme::ApiKey(ApiKey::Cookie(ApiKeyValue::new(ACCESS_COOKIE))),
    );
    let spec = Arc::new(api.clone());
    let router = router
        .merge(crate::proxy::routes())
        .merge(crate::ui::routes())
        .route(
            "/api/openapi.json",
            axum::routing::get(move || {
                let spec = spec.clone();
                async move { Json(spec.as_ref().clone()) }
            }),
        )
        .fallback(|| async { ApiError(Error::NotFound("no such endpoint".into())) })
        .method_not_allowed_fallback(|| async {
            error_response(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "method not allowed here",
            )
        })
        .layer(axum::middleware::from_fn_with_state(state.clone(), track))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .with_state(state);
    (router, api)
}

/// Counts and times every request by route template (never the raw path, whose user
/// and node names would make label cardinality unbounded).
async fn track(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |m| m.as_str().to_owned());
    let method = req.method().clone();
    let started = Instant::now();
    let resp = next.run(req).await;
    s.metrics.observe_request(
        method.as_str(),
        &route,
        resp.status().as_u16(),
        started.elapsed(),
    );
    resp
}

/// The error body: `{"error": {"code", "message"}}`.
#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable, machine-readable: `bad_request`, `unauthorized`, `forbidden`,
    /// `not_found`, `conflict`, `too_large`, `rate_limited`, `quota_exceeded`,
    /// `unavailable`, `internal`, ...
    pub code: String,
    pub message: String,
}

fn error_response(status: StatusCode, code: &str, message: &str) -> Response {
    let body = ErrorBody {
        error: ErrorDetail {
            code: code.into(),
            message: message.into(),
        },
    };
    (status, Json(body)).into_response()
}

/// Every handler error. The one place where errors become status codes.
#[derive(Debug)]
pub struct ApiError(pub Error);

impl<E: Into<Error>> From<E> for ApiError {
    fn from(e: E) -> Self {
        ApiError(e.into())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = match &self.0 {
            Error::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            Error::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
            Error::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            Error::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            Error::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            Error::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "too_large"),
            Error::RateLimited { .. } => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
            Error::QuotaExceeded(_) => (StatusCode::TOO_MANY_REQUESTS, "quota_exceeded"),
            Error::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            Error::RangeNotSatisfiable { .. } => {
                (StatusCode::RANGE_NOT_SATISFIABLE, "range_not_satisfiable")
            }
            Error::Config(_) | Error::Store(_) | Error::Io { .. } | Error::Internal(_) => {
                // Logged here, once; the client learns nothing about internals.
                tracing::error!(error = %self.0, "request failed");
                return error_response(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "internal error",
                );
            }
        };
        let mut resp = error_response(status, code, &self.0.to_string());
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        if let Error::RangeNotSatisfiable { size } = self.0
            && let Ok(v) = header::HeaderValue::from_str(&format!("bytes */{size}"))
        {
            resp.headers_mut().insert(header::CONTENT_RANGE, v);
        }
        if let Error::RateLimited { retry_after_secs } = self.0
            && let Ok(v) = header::HeaderValue::from_str(&retry_after_secs.to_string())
        {
            resp.headers_mut().insert(header::RETRY_AFTER, v);
        }
        resp
    }
}

/// A body that could not be read or parsed: 413 when over the limit, else 400.
fn body_rejection(status: StatusCode, text: String) -> ApiError {
    ApiError(match status {
        StatusCode::PAYLOAD_TOO_LARGE => {
            Error::TooLarge(format!("request body over {MAX_BODY} bytes"))
        }
        _ => Error::BadRequest(text),
    })
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        body_rejection(r.status(), r.body_text())
    }
}

impl From<BytesRejection> for ApiError {
    fn from(r: BytesRejection) -> Self {
        body_rejection(r.status(), r.body_text())
    }
}

impl From<PathRejection> for ApiError {
    fn from(r: PathRejection) -> Self {
        ApiError(Error::BadRequest(r.body_text()))
    }
}

impl From<QueryRejection> for ApiError {
    fn from(r: QueryRejection) -> Self {
        ApiError(Error::BadRequest(r.body_text()))
    }
}

/// `Json` whose rejections use our error shape.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let Json(v) = Json::<T>::from_request(req, state).await?;
        Ok(ApiJson(v))
    }
}

/// `Path` whose rejections use our error shape.
pub struct ApiPath<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let axum::extract::Path(v) =
            axum::extract::Path::<T>::from_request_parts(parts, state).await?;
        Ok(ApiPath(v))
    }
}

/// `Query` whose rejections use our error shape.
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let axum::extract::Query(v) =
            axum::extract::Query::<T>::from_request_parts(parts, state).await?;
        Ok(ApiQuery(v))
    }
}

/// The peer address (rate limiting, audit). Behind an ingress this is the ingress.
pub struct ClientAddr(pub std::net::IpAddr);

impl<S: Send + Sync> FromRequestParts<S> for ClientAddr {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let ip = parts
            .extensions
            .get::<axum::extract::ConnectInfo<crate::proxy::Connection>>()
            .map_or(std::net::IpAddr::from([0, 0, 0, 0]), |c| c.0.addr.ip());
        Ok(ClientAddr(ip))
    }
}

/// An authenticated user: from `Authorization: Bearer`, or from the session cookie
/// (then writes must carry the CSRF header matching the CSRF cookie). The user must
/// still exist and be enabled: disabling takes effect at once, not at token expiry.
#[derive(Debug, Clone)]
pub struct Caller {
    pub name: String,
    pub role: Role,
}

impl Caller {
    pub fn is_admin(&self) -> bool {
        self.role == Role::Admin
    }

    /// Admin, or the named user themself; anyone else gets 404 so that existence
    /// does not leak.
    pub fn may_see_user(&self, user: &str) -> Result<(), Error> {
        if self.is_admin() || self.name == user {
            Ok(())
        } else {
            Err(Error::NotFound(format!("no user {user:?}")))
        }
    }

    pub fn require_admin(&self) -> Result<(), Error> {
        if self.is_admin() {
            Ok(())
        } else {
            Err(Error::Forbidden("admin only".into()))
        }
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, s: &AppState) -> Result<Self, Self::Rejection> {
        let token = credential(&parts.headers, &parts.method)?;
        Ok(Caller::from_access_token(s, &token).await?)
    }
}

impl Caller {
    /// The user an access token stands for, if they still exist and are enabled. For
    /// callers that take the token from elsewhere (the proxy, which has no CSRF rule).
    pub async fn from_access_token(s: &AppState, token: &str) -> Result<Caller, Error> {
        let claims = s.auth.verify_access(token)?;
        let user = s
            .store()
            .user(&claims.sub)
            .await?
            .filter(|u| !u.user.disabled)
            .ok_or_else(|| Error::Unauthorized("account disabled or removed".into()))?;
        Ok(Caller {
            name: user.user.name,
            role: user.user.role,
        })
    }
}

/// The access token from the bearer header, else from the cookie with a CSRF check on
/// unsafe methods.
fn credential(headers: &HeaderMap, method: &Method) -> Result<String, Error> {
    if let Some(v) = headers.get(header::AUTHORIZATION) {
        let v = v
            .to_str()
            .map_err(|_| Error::Unauthorized("malformed Authorization header".into()))?;
        return match v.split_once(' ') {
            Some((scheme, token))
                if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() =>
            {
                Ok(token.trim().to_owned())
            }
            _ => Err(Error::Unauthorized(
                "expected Authorization: Bearer <token>".into(),
            )),
        };
    }
    let token = cookie(headers, ACCESS_COOKIE)
        .ok_or_else(|| Error::Unauthorized("not signed in".into()))?;
    check_csrf(headers, method)?;
    Ok(token)
}

/// Double-submit CSRF check for cookie-authenticated writes: the `X-CSRF-Token` header
/// must equal the CSRF cookie, which another site can neither read nor set.
pub fn check_csrf(headers: &HeaderMap, method: &Method) -> Result<(), Error> {
    if matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS) {
        return Ok(());
    }
    let cookie = cookie(headers, CSRF_COOKIE);
    let header = headers.get(CSRF_HEADER).and_then(|v| v.to_str().ok());
    match (cookie, header) {
        (Some(c), Some(h)) if !c.is_empty() && constant_time_eq(c.as_bytes(), h.as_bytes()) => {
            Ok(())
        }
        _ => Err(Error::Forbidden(
            "missing or wrong X-CSRF-Token header".into(),
        )),
    }
}

/// A cookie's value from the request's `Cookie` headers.
pub fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_owned())
}

/// Compares secrets without an early exit that would leak how much matched.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// An agent presenting the agent token. A user's token here is 403; nothing is 401.
pub struct AgentCaller;

impl FromRequestParts<AppState> for AgentCaller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, s: &AppState) -> Result<Self, Self::Rejection> {
        let token = match parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
        {
            Some(v) => match v.split_once(' ') {
                Some((scheme, t)) if scheme.eq_ignore_ascii_case("bearer") => t.trim().to_owned(),
                _ => {
                    return Err(Error::Unauthorized(
                        "expected Authorization: Bearer <agent token>".into(),
                    )
                    .into());
                }
            },
            None => return Err(Error::Unauthorized("agent token required".into()).into()),
        };
        if constant_time_eq(token.as_bytes(), s.agent_token.as_bytes()) {
            return Ok(AgentCaller);
        }
        if s.auth.verify_access(&token).is_ok() {
            return Err(Error::Forbidden("only agents may push inventories".into()).into());
        }
        Err(Error::Unauthorized("invalid agent token".into()).into())
    }
}
