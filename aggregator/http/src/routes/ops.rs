//! Health, readiness, metrics, and the server presets and IDE profiles.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use kcloud_core::isolation::Isolation;
use kcloud_core::launch::Profile;
use kcloud_core::settings::{DefaultQuota, Images, Preset};

use crate::AppState;
use crate::error::ErrorBody;
use crate::extract::Caller;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(healthz))
        .routes(routes!(readyz))
        .routes(routes!(metrics))
        .routes(routes!(presets))
        .routes(routes!(profiles))
        .routes(routes!(settings))
}

/// The process is alive.
#[utoipa::path(get, path = "/healthz", tag = "ops", responses((status = 200, body = String)))]
async fn healthz() -> &'static str {
    "ok"
}

/// Ready to serve allocations: the ledger has been rebuilt from existing servers.
#[utoipa::path(get, path = "/readyz", tag = "ops",
    responses((status = 200, body = String), (status = 503, body = String)))]
async fn readyz(State(s): State<AppState>) -> Response {
    if s.cluster.ledger().is_ready() {
        "ok".into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "ledger not rebuilt yet").into_response()
    }
}

/// Prometheus metrics (OpenMetrics text).
#[utoipa::path(get, path = "/metrics", tag = "ops", responses((status = 200, body = String,
    content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8")))]
async fn metrics(State(s): State<AppState>) -> Response {
    // A failed read leaves the usage counters where they were (they never go back).
    let usage = match s.servers.usage().totals().await {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!(error = %e, "usage totals unavailable for /metrics");
            Vec::new()
        }
    };
    let now = kcloud_core::now_ms();
    let (queued, oldest) = s.servers.queue_stats();
    let gauges = crate::metrics::ServerGauges {
        queued,
        oldest_wait_s: oldest.map_or(0.0, |t| now.saturating_sub(t) as f64 / 1000.0),
        gpu_idle_servers: s.servers.gpu_idle_count(),
    };
    let body = s.metrics.render(&s.cluster, &usage, gauges, now);
    ([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], body).into_response()
}

/// Server sizes users can pick.
#[utoipa::path(get, path = "/api/v1/presets", tag = "servers",
    responses((status = 200, body = BTreeMap<String, Preset>), (status = 401, body = ErrorBody)),
    security(("bearer" = []), ("cookie" = [])))]
async fn presets(State(s): State<AppState>, _caller: Caller) -> Json<BTreeMap<String, Preset>> {
    Json(s.settings.presets.clone())
}

/// IDE profiles users can pick (`profile` when creating a server).
#[utoipa::path(get, path = "/api/v1/profiles", tag = "servers",
    responses((status = 200, body = BTreeMap<String, Profile>), (status = 401, body = ErrorBody)),
    security(("bearer" = []), ("cookie" = [])))]
async fn profiles(State(s): State<AppState>, _caller: Caller) -> Json<BTreeMap<String, Profile>> {
    Json(s.settings.profiles.clone())
}

/// What the portal shows before a server is created (and admins read as settings):
/// presets, the image allow-list, the default quota. Nothing secret lives here.
#[derive(Serialize, ToSchema)]
pub struct PublicSettings {
    pub presets: BTreeMap<String, Preset>,
    pub images: Images,
    pub default_quota: DefaultQuota,
    /// The IDE profiles servers can run.
    pub profiles: BTreeMap<String, Profile>,
    /// How servers are kept apart here, and which limits are enforced.
    pub isolation: Isolation,
}

/// The settings users choose within (read-only).
#[utoipa::path(get, path = "/api/v1/settings", tag = "servers",
    responses((status = 200, body = PublicSettings), (status = 401, body = ErrorBody)),
    security(("bearer" = []), ("cookie" = [])))]
async fn settings(State(s): State<AppState>, _caller: Caller) -> Json<PublicSettings> {
    Json(PublicSettings {
        presets: s.settings.presets.clone(),
        images: s.settings.images.clone(),
        default_quota: s.settings.default_quota.clone(),
        profiles: s.settings.profiles.clone(),
        isolation: s.servers.isolation(),
    })
}
