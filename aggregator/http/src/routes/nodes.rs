//! Agent inventory pushes and the inventory views: nodes, devices, availability.

use axum::Json;
use axum::extract::State;
use kcloud_common::NodeInventory;
use std::time::Duration;

use kcloud_core::group::Use;
use kcloud_core::time::parse_duration;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use kcloud_cluster::inventory::{Availability, DeviceQuery, DeviceView, Ingested, NodeView, Page};
use kcloud_core::{Error, now_ms};
use kcloud_service::prometheus::{History, HistoryMetric, NodeMetrics};

use crate::AppState;
use crate::error::{ApiError, ErrorBody};
use crate::extract::{AgentCaller, ApiJson, ApiPath, ApiQuery, Caller};

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(put_inventory))
        .routes(routes!(list_nodes))
        .routes(routes!(get_node))
        .routes(routes!(node_history))
        .routes(routes!(list_gpus))
        .routes(routes!(gpu_summary))
}

#[derive(Serialize, ToSchema)]
pub struct IngestResult {
    /// False when an equal or newer snapshot of this node was already stored.
    pub stored: bool,
}

/// An agent's whole-node snapshot. Idempotent by boot id and sequence number.
#[utoipa::path(put, path = "/api/v1/nodes/{node}/inventory", tag = "agents",
    params(("node" = String, Path)),
    request_body(content = Object, description = "kcloud_common::NodeInventory"),
    responses((status = 200, body = IngestResult), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 409, body = ErrorBody), (status = 413, body = ErrorBody)),
    security(("agent_token" = [])))]
async fn put_inventory(
    State(s): State<AppState>,
    _agent: AgentCaller,
    ApiPath(node): ApiPath<String>,
    body: Result<ApiJson<NodeInventory>, ApiError>,
) -> Result<Json<IngestResult>, ApiError> {
    let result = body.and_then(|ApiJson(inv)| Ok(s.cluster.ingest(&node, inv, now_ms())?));
    s.metrics.observe_push(match &result {
        Ok(Ingested::Stored) => "stored",
        Ok(Ingested::IgnoredOlder) => "ignored",
        Err(_) => "rejected",
    });
    Ok(Json(IngestResult {
        stored: matches!(result?, Ingested::Stored),
    }))
}

/// A node with its CPU and memory figures: from Prometheus when configured and
/// answering, else from the agent's last push (`metrics.source` says which).
#[derive(Serialize, ToSchema)]
pub struct NodeDetail {
    #[serde(flatten)]
    pub node: NodeView,
    pub metrics: NodeMetrics,
}

pub(crate) fn detail(s: &AppState, node: NodeView) -> NodeDetail {
    let metrics = s
        .prometheus
        .as_ref()
        .and_then(|p| p.node(&node.name))
        .unwrap_or_else(|| NodeMetrics::from_agent(&node.host));
    NodeDetail { node, metrics }
}

#[utoipa::path(get, path = "/api/v1/nodes", tag = "inventory",
    responses((status = 200, body = [NodeDetail]), (status = 401, body = ErrorBody)),
    security(("bearer" = []), ("cookie" = [])))]
async fn list_nodes(State(s): State<AppState>, _caller: Caller) -> Json<Vec<NodeDetail>> {
    let nodes = s.cluster.nodes(now_ms());
    Json(nodes.into_iter().map(|n| detail(&s, n)).collect())
}

#[utoipa::path(get, path = "/api/v1/nodes/{node}", tag = "inventory",
    params(("node" = String, Path)),
    responses((status = 200, body = NodeDetail), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = []), ("cookie" = [])))]
async fn get_node(
    State(s): State<AppState>,
    _caller: Caller,
    ApiPath(node): ApiPath<String>,
) -> Result<Json<NodeDetail>, ApiError> {
    let view = s
        .cluster
        .node(&node, now_ms())
        .ok_or_else(|| Error::NotFound(format!("no node {node:?}")))?;
    Ok(Json(detail(&s, view)))
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct HistoryQuery {
    /// `cpu` (utilization ratio), `memory` (bytes used) or `gpu_utilization` (percent).
    pub metric: HistoryMetric,
    /// How far back, e.g. `15m`, `1h`, `1d` (at most `7d`). Default `1h`.
    #[param(pattern = "^[0-9]+[smhd]$")]
    pub range: Option<String>,
}

/// A node's metric over time, for the portal's charts (needs `--prometheus-url`).
#[utoipa::path(get, path = "/api/v1/nodes/{node}/history", tag = "inventory",
    params(("node" = String, Path), HistoryQuery),
    responses((status = 200, body = History), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)),
    security(("bearer" = []), ("cookie" = [])))]
async fn node_history(
    State(s): State<AppState>,
    _caller: Caller,
    ApiPath(node): ApiPath<String>,
    ApiQuery(q): ApiQuery<HistoryQuery>,
) -> Result<Json<History>, ApiError> {
    let range = match q.range.as_deref() {
        None => Duration::from_secs(3600),
        Some(r) => parse_duration(r).map_err(|e| Error::BadRequest(format!("range: {e}")))?,
    };
    if s.cluster.node(&node, now_ms()).is_none() {
        return Err(Error::NotFound(format!("no node {node:?}")).into());
    }
    let prometheus = s.prometheus.as_ref().ok_or_else(|| {
        Error::Unavailable("history needs the aggregator started with --prometheus-url".into())
    })?;
    Ok(Json(prometheus.history(&node, q.metric, range).await?))
}

/// Devices (whole GPUs and MIG instances), filtered and paged. Admins see who holds
/// each device; users see their own holdings and only "in use" for others'.
#[utoipa::path(get, path = "/api/v1/gpus", tag = "inventory",
    params(DeviceQuery),
    responses((status = 200, body = Page<DeviceView>), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("bearer" = []), ("cookie" = [])))]
async fn list_gpus(
    State(s): State<AppState>,
    caller: Caller,
    ApiQuery(q): ApiQuery<DeviceQuery>,
) -> Result<Json<Page<DeviceView>>, ApiError> {
    let mut page = s.cluster.devices(&q, now_ms())?;
    redact(&caller, &mut page.items);
    // Marks what the caller's groups may not use (the picker greys it out).
    let e = s
        .servers
        .groups()
        .entitlements(&caller.name, caller.role)
        .await?;
    if e != Default::default() {
        for d in &mut page.items {
            let ok = e.allows(Use::Model(&d.model))
                && d.profile
                    .as_deref()
                    .is_none_or(|p| e.allows(Use::MigProfile(p)));
            if !ok {
                d.entitled = Some(false);
            }
        }
    }
    Ok(Json(page))
}

/// Users see who holds their own devices only (others' show as `in_use`); admins see
/// every holder. Used by the REST listing and the event stream alike.
pub(crate) fn redact(caller: &kcloud_core::caller::Caller, devices: &mut [DeviceView]) {
    if !caller.is_admin() {
        for d in devices {
            if d.holder.as_ref().is_some_and(|h| h.user != caller.name) {
                d.holder = None;
            }
        }
    }
}

/// Free and total devices per model and MIG profile, with the same filters.
#[utoipa::path(get, path = "/api/v1/gpus/summary", tag = "inventory",
    params(DeviceQuery),
    responses((status = 200, body = [Availability]), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("bearer" = []), ("cookie" = [])))]
async fn gpu_summary(
    State(s): State<AppState>,
    _caller: Caller,
    ApiQuery(q): ApiQuery<DeviceQuery>,
) -> Json<Vec<Availability>> {
    Json(s.cluster.summary(&q, now_ms()))
}
