//! kcloud-http: the aggregator's HTTP face — the REST API, the reverse proxy to
//! servers, the portal's assets and its event stream, and `/metrics`.
//!
//! Handlers are thin: they parse, call a use case of `kcloud-service`, and map the
//! answer. Every API route lives in a module of [`routes`] named after what it serves
//! and is registered through `utoipa_axum`, so the OpenAPI document at
//! `/api/openapi.json` covers every endpoint by construction.

/// Errors as HTTP answers (the one error-to-status mapping).
pub mod error;
/// The portal's live stream (`GET /api/v1/events`) and its shared producer.
pub mod events;
/// Request extractors: bodies, paths, queries, client address, caller.
pub mod extract;
/// The listener and what a request knows of its connection.
pub mod listener;
/// The aggregator's Prometheus registry.
pub mod metrics;
/// The OpenAPI document, completed with what every operation shares.
mod openapi;
/// Users' origins and the client behind trusted proxies.
pub mod origin;
/// Percent-encoding of URL parts and header parameters.
mod percent;
/// The portal's embedded assets.
pub mod portal;
/// `/user/{user}/{server}/...`: the authenticated reverse proxy.
pub mod proxy;
/// The API's route groups.
mod routes;

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::Response;
use ipnet::IpNet;
use tracing::Instrument;
use utoipa_axum::router::OpenApiRouter;

use kcloud_cluster::Cluster;
use kcloud_core::Error;
use kcloud_core::settings::Settings;
use kcloud_provision::upstream::HttpClient;
use kcloud_service::auth::Auth;
use kcloud_service::prometheus::Prometheus;
use kcloud_service::reservations::Reservations;
use kcloud_service::servers::Servers;
use kcloud_service::users::Users;
use kcloud_service::volumes::Volumes;

use crate::error::{ApiError, error_response};
use crate::metrics::Metrics;
use crate::origin::UserOrigins;

/// Largest request body accepted anywhere (inventories of big nodes included).
pub const MAX_BODY: usize = 1 << 20;

/// What every handler can reach. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub auth: Arc<Auth>,
    pub users: Arc<Users>,
    pub servers: Arc<Servers>,
    pub reservations: Arc<Reservations>,
    pub volumes: Arc<Volumes>,
    /// The inventory and the ledger (read-only here: allocation is the servers').
    pub cluster: Arc<Cluster>,
    pub settings: Arc<Settings>,
    pub metrics: Arc<Metrics>,
    /// The agents' shared secret; compared in constant time, never logged.
    pub agent_token: Arc<str>,
    pub secure_cookies: bool,
    /// Node figures and history from Prometheus, when configured.
    pub prometheus: Option<Arc<Prometheus>>,
    /// The proxy's pooled client to servers.
    pub upstream: HttpClient,
    /// Where users' servers are served (an origin per user).
    pub user_origins: Arc<UserOrigins>,
    /// Reverse proxies whose `X-Forwarded-For` (and `-Host`) are believed.
    pub trusted_proxies: Arc<[IpNet]>,
    /// The live streams' shared producer.
    pub feed: Arc<events::Feed>,
    /// Single sign-on, when `[oidc]` is configured.
    pub oidc: Option<Arc<kcloud_service::auth::Oidc>>,
}

/// The whole API, the proxy and the portal, with the OpenAPI document at
/// `/api/openapi.json`.
pub fn router(state: AppState) -> Router {
    let (router, api) = api_routes().split_for_parts();
    // Serialized once: the document never changes while the process runs.
    let spec = axum::body::Bytes::from(openapi::document(api, &state.settings).to_string());
    router
        .merge(crate::proxy::routes())
        .merge(crate::portal::routes())
        .route(
            "/api/openapi.json",
            axum::routing::get(move || {
                let spec = spec.clone();
                async move { ([(header::CONTENT_TYPE, "application/json")], spec) }
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
        .layer(axum::middleware::from_fn_with_state(state.clone(), site))
        .with_state(state)
}

/// The API's routes, each module's, with their OpenAPI operations.
fn api_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .merge(routes::session::routes())
        .merge(routes::sso::routes())
        .merge(routes::users::routes())
        .merge(routes::nodes::routes())
        .merge(routes::ops::routes())
        .merge(routes::schedule::routes())
        .merge(routes::usage::routes())
        .merge(routes::tokens::routes())
        .merge(routes::groups::routes())
        .merge(routes::servers::routes())
        .merge(events::routes())
        .merge(routes::volumes::routes())
        .merge(routes::files::routes())
}

/// Sends a request for a user's origin to the proxy, whatever its path: nothing of the
/// portal or the API is served there.
async fn site(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let trusted = origin::from_trusted_proxy(req.extensions(), &s.trusted_proxies);
    let authority = origin::authority(req.headers(), req.uri(), trusted);
    let Some((user, authority)) =
        authority.and_then(|a| s.user_origins.user_of(&a).map(|u| (u, a)))
    else {
        return next.run(req).await;
    };
    let method = req.method().clone();
    let started = Instant::now();
    let resp = proxy::on_user_origin(&s, &user, &authority, req).await;
    s.metrics.observe_request(
        method.as_str(),
        "user origin",
        resp.status().as_u16(),
        started.elapsed(),
    );
    resp
}

/// Counts and times every request by route template (never the raw path, whose user
/// and node names would make label cardinality unbounded), in a span of its own
/// (method, route, status, latency and, once authenticated, user) that every log line
/// of the request carries, and one `debug` line per request. Here rather than
/// tower-http's `TraceLayer`: this middleware already knows the matched route, and
/// one place measures a request for both metrics and logs. The raw path and query are
/// never logged (one-time codes and file names travel there).
async fn track(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |m| m.as_str().to_owned());
    let method = req.method().clone();
    let span = tracing::info_span!(
        "request",
        method = %method,
        route = %route,
        status = tracing::field::Empty,
        latency_ms = tracing::field::Empty,
        user = tracing::field::Empty,
    );
    let started = Instant::now();
    let resp = next.run(req).instrument(span.clone()).await;
    let elapsed = started.elapsed();
    span.record("status", resp.status().as_u16());
    span.record("latency_ms", elapsed.as_secs_f64() * 1000.0);
    span.in_scope(|| tracing::debug!("request done"));
    s.metrics
        .observe_request(method.as_str(), &route, resp.status().as_u16(), elapsed);
    resp
}
