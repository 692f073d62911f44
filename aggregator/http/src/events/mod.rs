//! `GET /api/v1/events`: the live stream behind the portal (server-sent events).
//!
//! A stream follows what its viewer looks at: the fleet summary (`summary=true`), one
//! line per node (`rows=true`), and nodes with their devices (`nodes=*`, the default,
//! or `nodes=a,b`). On connect it sends `reset`, a snapshot of what it follows and the
//! servers the caller may see, then `synced`; after that only what changed.
//!
//! Changes come from the shared producer in [`feed`], which encodes each change once;
//! here each stream picks what it follows, shows holders only to whom they belong
//! (admins see all), sends layout, holder and staleness changes at once and coalesces
//! reading-only changes per node (at most one per node every [`READINGS_EVERY`], at
//! most [`READINGS_PER_SECOND`] a second). A stream too far behind the producer starts
//! over with `reset`. A periodic check ends the stream when the caller's session is no
//! longer valid (the page refreshes its session and reconnects).

mod feed;

use std::collections::{HashMap, HashSet, VecDeque};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, Method};
use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::Stream;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::watch;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use kcloud_cluster::inventory::{FleetSummary, NodeRow};
use kcloud_core::caller::Caller;
use kcloud_core::{Error, now_ms};

use crate::AppState;
use crate::error::{ApiError, ErrorBody};
use crate::extract::{ApiQuery, credential};
use crate::routes::servers::ServerView;

use feed::{Batch, Subscription, Want};
pub use feed::{ClusterNode, Feed};

/// A node's reading-only changes go to a stream at most this often.
const READINGS_EVERY: Duration = Duration::from_secs(2);
/// And at most this many such node events a second per stream.
const READINGS_PER_SECOND: usize = 100;
/// Session re-check period.
const SESSION_CHECK: Duration = Duration::from_secs(5);
/// Fleet lines per `rows` event of a snapshot.
const ROWS_PER_EVENT: usize = 500;
/// Most nodes one stream may name.
const MAX_NODES: usize = 100;

/// The event payloads, registered as schemas: the stream's 200 is `text/event-stream`,
/// which references none of them by itself.
#[derive(utoipa::OpenApi)]
#[openapi(components(schemas(
    ClusterNode,
    StreamHello,
    Removed,
    ServerView,
    NodeRow,
    FleetSummary
)))]
struct EventSchemas;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(<EventSchemas as utoipa::OpenApi>::openapi())
        .routes(routes!(events))
}

/// One event of the stream as it travels (`event:`, `data:`, `retry:` lines): the
/// schema of the `text/event-stream` response's items. `data` is the JSON of the
/// payload that `event` names.
#[derive(ToSchema)]
pub struct StreamEvent {
    pub event: StreamEventName,
    pub data: String,
    /// Reconnection delay in milliseconds (on `reset`).
    pub retry: Option<u64>,
}

/// The event names; the payload of each is in `GET /api/v1/events`' description.
#[derive(ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum StreamEventName {
    Reset,
    Summary,
    Rows,
    Node,
    Server,
    ServerRemoved,
    Synced,
}

/// `reset` (first event of every snapshot): who the stream is for.
#[derive(Serialize, ToSchema)]
pub struct StreamHello {
    pub user: String,
    pub admin: bool,
    pub now_ms: u64,
}

/// `server_removed`.
#[derive(Serialize, ToSchema)]
pub struct Removed {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    pub name: String,
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct EventsQuery {
    /// Nodes to follow with their devices: `*` (every node, the default), names
    /// separated by commas (at most 100), or empty for none.
    pub nodes: Option<String>,
    /// Send `rows`: one line per node (`NodeRow`), all at first, then changed ones.
    #[serde(default)]
    pub rows: bool,
    /// Send `summary` (`FleetSummary`): at first, then when it changes (at most 1/s).
    #[serde(default)]
    pub summary: bool,
}

impl EventsQuery {
    fn want(&self) -> Result<Want, Error> {
        let nodes = match self.nodes.as_deref() {
            None | Some("*") => None,
            Some(list) => {
                let names: HashSet<String> = list
                    .split(',')
                    .filter(|n| !n.is_empty())
                    .map(str::to_owned)
                    .collect();
                if names.len() > MAX_NODES {
                    return Err(Error::BadRequest(format!(
                        "nodes: at most {MAX_NODES} names"
                    )));
                }
                if let Some(bad) = names.iter().find(|n| n.len() > 253 || n.contains('*')) {
                    return Err(Error::BadRequest(format!(
                        "nodes: not a node name: {bad:?}"
                    )));
                }
                Some(names)
            }
        };
        Ok(Want {
            nodes,
            rows: self.rows,
            summary: self.summary,
        })
    }
}

/// Live inventory, allocation and server-status changes as server-sent events.
///
/// Events (`event:` name → JSON `data:`): `reset` → `StreamHello` (start of a snapshot:
/// forget what you have); `summary` → `FleetSummary`; `rows` → `[NodeRow]`; `node` →
/// `ClusterNode`; `server` → `ServerView`; `server_removed` → `Removed`; `synced` →
/// `{"now_ms"}` after the snapshot. Cookie (no CSRF needed: it is a GET) or bearer
/// authentication. Users get holder details only for their own devices and only their
/// own servers; admins get all. The stream ends when the session expires or the account
/// is disabled.
#[utoipa::path(get, path = "/api/v1/events", tag = "inventory",
    params(EventsQuery),
    responses(
        (status = 200, content_type = "text/event-stream", body = StreamEvent,
            description = "server-sent events; payloads: FleetSummary, NodeRow, ClusterNode, ServerView, Removed, StreamHello"),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody)),
    security(("bearer" = []), ("cookie" = [])))]
async fn events(
    State(s): State<AppState>,
    headers: HeaderMap,
    method: Method,
    query: Result<ApiQuery<EventsQuery>, ApiError>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let token = credential(&headers, &method, s.secure_cookies)?.token;
    let caller = s.auth.caller(&token).await?;
    caller.check_scope(method.as_str(), "/api/v1/events")?;
    let want = query?.0.want()?;
    let mut viewer = Viewer::new(s, caller, token, want);
    viewer.reset();
    let stream =
        futures_util::stream::unfold(
            viewer,
            |mut v| async move { v.next().await.map(|e| (Ok(e), v)) },
        );
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

fn event(name: &str, data: &str) -> Event {
    Event::default().event(name).data(data)
}

/// The part of a snapshot still to send (its nodes wait in the viewer's queue).
struct Snapshot {
    rows: VecDeque<NodeRow>,
}

/// One connection's state.
struct Viewer {
    s: AppState,
    caller: Caller,
    token: String,
    sub: Subscription,
    servers: watch::Receiver<u64>,
    /// The queue's places and estimates, and reservations' effect on servers.
    queue_changes: watch::Receiver<u64>,
    /// What this connection last sent of each server, as JSON.
    sent_servers: HashMap<(String, String), String>,
    out: VecDeque<Event>,
    /// Nodes to send, encoded only as the client takes them (so a burst of changes or
    /// a big snapshot never sits in memory as events), each once, with the round it
    /// must be at least as fresh as (`None`: as of now).
    queue: VecDeque<Arc<str>>,
    queued: HashMap<Arc<str>, Option<u64>>,
    snapshot: Option<Snapshot>,
    /// When each followed node was last sent.
    sent_at: HashMap<Arc<str>, Instant>,
    /// Reading-only changes held back: the latest round per node.
    deferred: HashMap<Arc<str>, u64>,
    readings_left: usize,
    tick: tokio::time::Interval,
    checked: Instant,
    done: bool,
}

enum Wake {
    Batch(Arc<Batch>),
    Behind,
    Servers,
    Tick,
    Closed,
}

impl Viewer {
    fn new(s: AppState, caller: Caller, token: String, want: Want) -> Self {
        let sub = Feed::subscribe(&s, want);
        let servers = s.servers.changes();
        let queue_changes = s.servers.queue_changes();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Viewer {
            s,
            caller,
            token,
            sub,
            servers,
            queue_changes,
            sent_servers: HashMap::new(),
            out: VecDeque::new(),
            queue: VecDeque::new(),
            queued: HashMap::new(),
            snapshot: None,
            sent_at: HashMap::new(),
            deferred: HashMap::new(),
            readings_left: READINGS_PER_SECOND,
            tick,
            checked: Instant::now(),
            done: false,
        }
    }

    /// Starts over: `reset`, then a snapshot of everything followed (sent piecewise as
    /// the client reads, so a big fleet never sits in memory as events).
    fn reset(&mut self) {
        self.sub.skip_to_now();
        self.servers.mark_unchanged();
        self.queue_changes.mark_unchanged();
        self.out.clear();
        self.queue.clear();
        self.queued.clear();
        self.sent_servers.clear();
        self.sent_at.clear();
        self.deferred.clear();
        let now = now_ms();
        let hello = StreamHello {
            user: self.caller.name.clone(),
            admin: self.caller.is_admin(),
            now_ms: now,
        };
        self.out.push_back(
            event("reset", &serde_json::to_string(&hello).unwrap_or_default())
                .retry(Duration::from_secs(2)),
        );
        let want = &self.sub.want;
        if want.summary {
            let summary = serde_json::to_string(&self.s.cluster.fleet(now)).unwrap_or_default();
            self.out.push_back(event("summary", &summary));
        }
        let rows = if want.rows {
            self.s.cluster.rows(now).into()
        } else {
            VecDeque::new()
        };
        let mut nodes: Vec<Arc<str>> = match &want.nodes {
            None => self.s.cluster.inventory().node_names(),
            Some(names) => names.iter().map(|n| Arc::from(n.as_str())).collect(),
        };
        nodes.sort();
        self.snapshot = Some(Snapshot { rows });
        for name in nodes {
            // A snapshot shows the state as of now, never a cached older round.
            self.enqueue(name, None);
        }
    }

    /// Queues `name` to be sent as of `round` or later; a node already queued is sent
    /// once, as of the later round (`None`, now, is the latest).
    fn enqueue(&mut self, name: Arc<str>, round: Option<u64>) {
        match self.queued.get_mut(&name) {
            Some(r) => {
                *r = match (*r, round) {
                    (Some(old), Some(new)) => Some(old.max(new)),
                    _ => None,
                }
            }
            None => {
                self.queued.insert(name.clone(), round);
                self.queue.push_back(name);
            }
        }
    }

    /// The next piece of the snapshot: lines, then (once its nodes are sent) the
    /// servers and `synced`.
    fn continue_snapshot(&mut self) {
        let Some(snap) = &mut self.snapshot else {
            return;
        };
        if !snap.rows.is_empty() {
            let n = snap.rows.len().min(ROWS_PER_EVENT);
            let lines: Vec<NodeRow> = snap.rows.drain(..n).collect();
            self.out.push_back(event(
                "rows",
                &serde_json::to_string(&lines).unwrap_or_default(),
            ));
            return;
        }
        self.snapshot = None;
        self.diff_servers();
        self.out
            .push_back(event("synced", &format!("{{\"now_ms\":{}}}", now_ms())));
    }

    async fn next(&mut self) -> Option<Event> {
        loop {
            if let Some(e) = self.out.pop_front() {
                return Some(e);
            }
            if self.done {
                return None;
            }
            if let Some(s) = &self.snapshot
                && !s.rows.is_empty()
            {
                self.continue_snapshot();
                continue;
            }
            if let Some(name) = self.queue.pop_front() {
                let round = self.queued.remove(&name).flatten();
                self.send_node(name, round);
                continue;
            }
            if self.snapshot.is_some() {
                self.continue_snapshot();
                continue;
            }
            let wake = tokio::select! {
                r = self.sub.rx.recv() => match r {
                    Ok(b) => Wake::Batch(b),
                    Err(RecvError::Lagged(_)) => Wake::Behind,
                    Err(RecvError::Closed) => Wake::Closed,
                },
                r = self.servers.changed() => if r.is_ok() { Wake::Servers } else { Wake::Closed },
                r = self.queue_changes.changed() => if r.is_ok() { Wake::Servers } else { Wake::Closed },
                _ = self.tick.tick() => Wake::Tick,
            };
            match wake {
                Wake::Batch(b) => self.apply(&b),
                Wake::Behind => self.reset(),
                Wake::Servers => self.diff_servers(),
                Wake::Tick => self.on_tick().await,
                Wake::Closed => self.done = true,
            }
        }
    }

    /// Queues `name` as of `round` or later (`None`: now), as this caller may see it.
    fn send_node(&mut self, name: Arc<str>, round: Option<u64>) {
        let Some(body) = self.s.feed.body(&self.s, &name, round) else {
            return;
        };
        let data = body.for_viewer(&self.caller);
        self.out.push_back(event("node", &data));
        self.sent_at.insert(name, Instant::now());
    }

    fn apply(&mut self, b: &Batch) {
        if b.resync {
            self.reset();
            return;
        }
        let want = &self.sub.want;
        if let (true, Some(summary)) = (want.summary, &b.summary) {
            self.out.push_back(event("summary", summary));
        }
        if let (true, Some(rows)) = (want.rows, &b.rows) {
            self.out.push_back(event("rows", rows));
        }
        let now = Instant::now();
        for c in &b.nodes {
            if !self.sub.want.follows(&c.name) {
                continue;
            }
            let due = self.readings_due(&c.name, now);
            if c.important || (due && self.readings_left > 0) {
                if !c.important {
                    self.readings_left -= 1;
                }
                self.deferred.remove(&c.name);
                self.enqueue(c.name.clone(), Some(b.round));
            } else {
                self.deferred.insert(c.name.clone(), b.round);
            }
        }
    }

    /// Whether `name`'s readings may go out again (none sent for `READINGS_EVERY`).
    fn readings_due(&self, name: &str, now: Instant) -> bool {
        self.sent_at
            .get(name)
            .is_none_or(|t| now.duration_since(*t) >= READINGS_EVERY)
    }

    async fn on_tick(&mut self) {
        self.readings_left = READINGS_PER_SECOND;
        if !self.deferred.is_empty() {
            let now = Instant::now();
            let due: Vec<Arc<str>> = self
                .deferred
                .keys()
                .filter(|n| self.readings_due(n, now))
                .take(READINGS_PER_SECOND)
                .cloned()
                .collect();
            self.readings_left -= due.len();
            for name in due {
                if let Some(round) = self.deferred.remove(&name) {
                    self.enqueue(name, Some(round));
                }
            }
        }
        if self.checked.elapsed() >= SESSION_CHECK {
            self.checked = Instant::now();
            // Expired token, ended session, disabled or removed account, changed role:
            // stop; the client refreshes its session and reconnects.
            match self.s.auth.caller(&self.token).await {
                Ok(now) if now.role == self.caller.role => {}
                _ => self.done = true,
            }
        }
    }

    /// Sends the servers whose JSON differs from what this connection last sent.
    fn diff_servers(&mut self) {
        let mut seen = HashMap::with_capacity(self.sent_servers.len());
        for server in self.s.servers.list(&self.caller, None).unwrap_or_default() {
            let key = (server.owner.clone(), server.name.clone());
            let json = serde_json::to_string(&ServerView::of(&self.s, server)).unwrap_or_default();
            if self.sent_servers.get(&key) != Some(&json) {
                self.out.push_back(event("server", &json));
            }
            seen.insert(key, json);
        }
        for (owner, name) in self.sent_servers.keys().filter(|k| !seen.contains_key(*k)) {
            let removed = Removed {
                owner: Some(owner.clone()),
                name: name.clone(),
            };
            self.out.push_back(event(
                "server_removed",
                &serde_json::to_string(&removed).unwrap_or_default(),
            ));
        }
        self.sent_servers = seen;
    }
}
