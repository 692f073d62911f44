//! Agent inventory pushes and the inventory views: nodes, devices, availability.

use axum::Json;
use axum::extract::State;
use kcloud_common::NodeInventory;
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{AgentCaller, ApiError, ApiJson, ApiPath, ApiQuery, AppState, Caller, ErrorBody};
use crate::inventory::{Availability, DeviceQuery, DeviceView, Ingested, NodeView, Page};
use crate::{Error, now_ms};

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(put_inventory))
        .routes(routes!(list_nodes))
        .routes(routes!(get_node))
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
    let result = body.and_then(|ApiJson(inv)| Ok(s.inventory.ingest(&node, inv, now_ms())?));
    s.metrics.observe_push(match &result {
        Ok(Ingested::Stored) => "stored",
        Ok(Ingested::IgnoredOlder) => "ignored",
        Err(_) => "rejected",
    });
    Ok(Json(IngestResult {
        stored: matches!(result?, Ingested::Stored),
    }))
}

#[utoipa::path(get, path = "/api/v1/nodes", tag = "inventory",
    responses((status = 200, body = [NodeView]), (status = 401, body = ErrorBody)),
    security(("bearer" = []), ("cookie" = [])))]
async fn list_nodes(State(s): State<AppState>, _caller: Caller) -> Json<Vec<NodeView>> {
    Json(s.inventory.nodes(&s.ledger, now_ms()))
}

#[utoipa::path(get, path = "/api/v1/nodes/{node}", tag = "inventory",
    params(("node" = String, Path)),
    responses((status = 200, body = NodeView), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = []), ("cookie" = [])))]
async fn get_node(
    State(s): State<AppState>,
    _caller: Caller,
    ApiPath(node): ApiPath<String>,
) -> Result<Json<NodeView>, ApiError> {
    s.inventory
        .node(&node, &s.ledger, now_ms())
        .map(Json)
        .ok_or_else(|| Error::NotFound(format!("no node {node:?}")).into())
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
    let mut page = s.inventory.devices(&q, &s.ledger, now_ms())?;
    if !caller.is_admin() {
        for d in &mut page.items {
            if d.holder.as_ref().is_some_and(|h| h.user != caller.name) {
                d.holder = None;
            }
        }
    }
    Ok(Json(page))
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
    Json(s.inventory.summary(&q, &s.ledger, now_ms()))
}
