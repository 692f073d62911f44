//! `GET /api/v1/events`: the live stream behind the portal (server-sent events).
//!
//! On connect the stream sends `reset`, then every node (with its devices) and every
//! server the caller may see, then `synced`. After that it sends only what changed:
//! `node` / `node_removed` and `server` / `server_removed`. It wakes on the change
//! signals of the inventory, the ledger and the provisioner, waits a moment so a burst
//! becomes one update, re-reads through the same per-viewer code as the REST API
//! (holders redacted for other users' devices, other users' servers left out) and sends
//! the entries whose JSON differs from what this connection last sent. A periodic tick
//! catches nodes turning stale and checks that the caller's session is still valid;
//! when it is not, the stream ends (the page refreshes its session and reconnects).

use std::collections::HashMap;
use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, Method};
use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::Stream;
use serde::Serialize;
use tokio::sync::mpsc;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use kcloud_cluster::inventory::{DeviceQuery, DeviceView, MAX_PAGE};
use kcloud_core::caller::Caller;
use kcloud_core::now_ms;

use crate::AppState;
use crate::error::{ApiError, ErrorBody};
use crate::extract::credential;
use crate::routes::nodes::{NodeDetail, detail, redact};
use crate::routes::servers::ServerView;

/// A burst of changes within this window goes out as one update.
const COALESCE: Duration = Duration::from_millis(200);
/// Staleness and session re-check period.
const TICK: Duration = Duration::from_secs(5);
/// Events buffered per connection before the sender waits for the client.
const BUFFER: usize = 256;

/// The event payloads, registered as schemas: the stream's 200 is `text/event-stream`,
/// which references none of them by itself.
#[derive(utoipa::OpenApi)]
#[openapi(components(schemas(ClusterNode, StreamHello, Removed, ServerView)))]
struct EventSchemas;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(<EventSchemas as utoipa::OpenApi>::openapi())
        .routes(routes!(events))
}

/// `node` events: a node, its figures, and its devices (GPUs and their MIG instances,
/// in order), redacted for the viewer like `GET /api/v1/gpus`.
#[derive(Serialize, ToSchema)]
pub struct ClusterNode {
    #[serde(flatten)]
    pub node: NodeDetail,
    pub devices: Vec<DeviceView>,
}

/// `reset` (first event of every connection): who the stream is for.
#[derive(Serialize, ToSchema)]
pub struct StreamHello {
    pub user: String,
    pub admin: bool,
    pub now_ms: u64,
}

/// `node_removed` / `server_removed`.
#[derive(Serialize, ToSchema)]
pub struct Removed {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    pub name: String,
}

/// Live inventory, allocation and server-status changes as server-sent events.
///
/// Events (`event:` name → JSON `data:`): `reset` → `StreamHello`; `node` →
/// `ClusterNode`; `node_removed` → `Removed`; `server` → `ServerView`;
/// `server_removed` → `Removed`; `synced` → `{"now_ms"}` after the initial state.
/// Cookie (no CSRF needed: it is a GET) or bearer authentication. Users get holder
/// details only for their own devices and only their own servers; admins get all.
/// The stream ends when the session expires or the account is disabled.
#[utoipa::path(get, path = "/api/v1/events", tag = "inventory",
    responses(
        (status = 200, content_type = "text/event-stream", body = String,
            description = "server-sent events; payloads: ClusterNode, ServerView, Removed, StreamHello"),
        (status = 401, body = ErrorBody)),
    security(("bearer" = []), ("cookie" = [])))]
async fn events(
    State(s): State<AppState>,
    headers: HeaderMap,
    method: Method,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let token = credential(&headers, &method, s.secure_cookies)?.token;
    let caller = s.auth.caller(&token).await?;
    let (tx, rx) = mpsc::channel(BUFFER);
    tokio::spawn(pump(s, caller, token, tx));
    let stream =
        futures_util::stream::unfold(
            rx,
            |mut rx| async move { rx.recv().await.map(|e| (Ok(e), rx)) },
        );
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

/// What one connection last sent, as JSON, so only differences go out.
#[derive(Default)]
struct Sent {
    nodes: HashMap<String, String>,
    servers: HashMap<(String, String), String>,
}

fn event(name: &str, data: String) -> Event {
    Event::default().event(name).data(data)
}

/// Every node with its devices, as this caller may see them.
fn cluster(s: &AppState, caller: &Caller) -> Vec<ClusterNode> {
    let now = now_ms();
    let mut devices: HashMap<String, Vec<DeviceView>> = HashMap::new();
    let mut q = DeviceQuery {
        limit: MAX_PAGE,
        ..DeviceQuery::default()
    };
    // Cursors come from the previous page, so an error cannot happen here; stop at one.
    while let Ok(mut page) = s.cluster.devices(&q, now) {
        redact(caller, &mut page.items);
        for d in page.items {
            devices.entry(d.node.clone()).or_default().push(d);
        }
        match page.next_cursor {
            Some(c) => q.cursor = Some(c),
            None => break,
        }
    }
    s.cluster
        .nodes(now)
        .into_iter()
        .map(|n| {
            let devices = devices.remove(&n.name).unwrap_or_default();
            ClusterNode {
                node: detail(s, n),
                devices,
            }
        })
        .collect()
}

/// The events that bring this connection from what it sent to the current state.
fn diff(s: &AppState, caller: &Caller, sent: &mut Sent) -> Vec<Event> {
    let mut out = Vec::new();
    let mut seen = HashMap::with_capacity(sent.nodes.len());
    for mut n in cluster(s, caller) {
        let name = n.node.node.name.clone();
        // The age ticks every second; comparing without it sends a node only when
        // something a viewer cares about changed (last_seen_ms still moves per push).
        let age = std::mem::take(&mut n.node.node.age_seconds);
        let key = serde_json::to_string(&n).unwrap_or_default();
        if sent.nodes.get(&name) != Some(&key) {
            n.node.node.age_seconds = age;
            out.push(event("node", serde_json::to_string(&n).unwrap_or_default()));
        }
        seen.insert(name, key);
    }
    for name in sent.nodes.keys().filter(|n| !seen.contains_key(*n)) {
        let removed = Removed {
            owner: None,
            name: name.clone(),
        };
        out.push(event(
            "node_removed",
            serde_json::to_string(&removed).unwrap_or_default(),
        ));
    }
    sent.nodes = seen;

    let mut seen = HashMap::with_capacity(sent.servers.len());
    for server in s.servers.list(caller, None).unwrap_or_default() {
        let key = (server.owner.clone(), server.name.clone());
        let json = serde_json::to_string(&ServerView::from(server)).unwrap_or_default();
        if sent.servers.get(&key) != Some(&json) {
            out.push(event("server", json.clone()));
        }
        seen.insert(key, json);
    }
    for (owner, name) in sent.servers.keys().filter(|k| !seen.contains_key(*k)) {
        let removed = Removed {
            owner: Some(owner.clone()),
            name: name.clone(),
        };
        out.push(event(
            "server_removed",
            serde_json::to_string(&removed).unwrap_or_default(),
        ));
    }
    sent.servers = seen;
    out
}

/// Feeds one connection until the client goes or the session ends.
async fn pump(s: AppState, caller: Caller, token: String, tx: mpsc::Sender<Event>) {
    let mut inventory = s.cluster.inventory_changes();
    let mut ledger = s.cluster.allocation_changes();
    let mut servers = s.servers.changes();
    let mut sent = Sent::default();
    let hello = StreamHello {
        user: caller.name.clone(),
        admin: caller.is_admin(),
        now_ms: now_ms(),
    };
    let mut first = vec![
        event("reset", serde_json::to_string(&hello).unwrap_or_default())
            .retry(Duration::from_secs(2)),
    ];
    first.extend(diff(&s, &caller, &mut sent));
    first.push(event("synced", format!("{{\"now_ms\":{}}}", now_ms())));
    for e in first {
        if tx.send(e).await.is_err() {
            return;
        }
    }
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tx.closed() => return,
            r = inventory.changed() => if r.is_err() { return },
            r = ledger.changed() => if r.is_err() { return },
            r = servers.changed() => if r.is_err() { return },
            _ = tick.tick() => {
                // Expired token, disabled or removed account, changed role: stop; the client
                // refreshes its session and reconnects.
                match s.auth.caller(&token).await {
                    Ok(now) if now.role == caller.role => {}
                    _ => return,
                }
            }
        }
        tokio::time::sleep(COALESCE).await;
        inventory.mark_unchanged();
        ledger.mark_unchanged();
        servers.mark_unchanged();
        for e in diff(&s, &caller, &mut sent) {
            if tx.send(e).await.is_err() {
                return;
            }
        }
    }
}
