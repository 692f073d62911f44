//! The one producer behind every event stream.
//!
//! A stream used to rebuild and re-encode the whole cluster on every change, and every
//! agent heartbeat is a change: four open portals at 10,000 nodes cut inventory ingest
//! twentyfold. Now one task, running while any stream is open, reads what changed since
//! it last looked (the inventory's push journal, the ledger's holders, nodes turning
//! stale), encodes the changed fleet-list lines and, at most once a second, the fleet
//! summary, and broadcasts that with the names of the changed nodes some stream follows
//! as one [`Batch`]. Streams pick from the batch what their viewer follows and may see.
//! A node's JSON is encoded once per round, by the first stream that sends it, into a
//! cache of the latest encoding per followed node that every other stream reuses.
//!
//! The broadcast keeps the last [`CAPACITY`] batches, shared by all streams; batches
//! hold names, not node bodies, so that is all the memory a stalled client can hold
//! (the cache holds one body per followed node, whoever is stalled). A stream further
//! behind is told so by the channel and starts over with a `reset` snapshot instead of
//! a backlog.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::broadcast;
use utoipa::ToSchema;

use kcloud_cluster::inventory::{DeviceQuery, DeviceView, MAX_PAGE};
use kcloud_core::caller::Caller;
use kcloud_core::device::Holder;
use kcloud_core::now_ms;

use crate::AppState;
use crate::routes::nodes::{NodeDetail, detail, redact};

/// How long the producer gathers changes before it sends them as one batch.
const BATCH: Duration = Duration::from_millis(200);
/// Staleness is checked this often when nothing is pushed.
const TICK: Duration = Duration::from_secs(1);
/// The fleet summary is recomputed at most this often.
const SUMMARY_EVERY: Duration = Duration::from_secs(1);
/// Batches kept for streams that are behind: about `CAPACITY × BATCH` of slack.
const CAPACITY: usize = 32;

/// `node` events: a node, its figures, and its devices (GPUs and their MIG instances,
/// in order), redacted for the viewer like `GET /api/v1/gpus`.
#[derive(Serialize, ToSchema)]
pub struct ClusterNode {
    #[serde(flatten)]
    pub node: NodeDetail,
    pub devices: Vec<DeviceView>,
}

/// What the producer found changed in one round.
pub struct Batch {
    pub round: u64,
    /// Changed nodes that some stream follows.
    pub nodes: Vec<NodeChange>,
    /// The changed fleet-list lines (a JSON array of `NodeRow`), when a stream wants them.
    pub rows: Option<Arc<str>>,
    /// The fleet summary (`FleetSummary`), when it changed and a stream wants it.
    pub summary: Option<Arc<str>>,
    /// The producer lost track (its journal was outrun): every stream starts over.
    pub resync: bool,
}

pub struct NodeChange {
    pub name: Arc<str>,
    /// Its device layout, holders or staleness changed: sent at once. Otherwise only its
    /// readings changed, which streams coalesce.
    pub important: bool,
}

/// One node encoded once for every kind of viewer.
pub struct NodeBody {
    node: ClusterNode,
    /// Every holder left out: what users see of others' devices.
    public: String,
    /// Every holder shown, for admins; `None` when nothing on the node is held.
    full: Option<String>,
}

#[derive(Serialize)]
struct NodeRef<'a> {
    #[serde(flatten)]
    node: &'a NodeDetail,
    devices: &'a [DeviceView],
}

impl NodeBody {
    pub fn new(mut node: ClusterNode) -> Self {
        let held = node.devices.iter().any(|d| d.holder.is_some());
        let full = held.then(|| json(&node));
        let holders: Vec<Option<Holder>> =
            node.devices.iter_mut().map(|d| d.holder.take()).collect();
        let public = json(&node);
        for (d, h) in node.devices.iter_mut().zip(holders) {
            d.holder = h;
        }
        NodeBody { node, public, full }
    }

    /// The node as `caller` may see it: admins every holder, users their own only.
    pub fn for_viewer(&self, caller: &Caller) -> Cow<'_, str> {
        let Some(full) = &self.full else {
            return Cow::Borrowed(&self.public);
        };
        if caller.is_admin() {
            return Cow::Borrowed(full);
        }
        let holds_some = self
            .node
            .devices
            .iter()
            .any(|d| d.holder.as_ref().is_some_and(|h| h.user == caller.name));
        if !holds_some {
            return Cow::Borrowed(&self.public);
        }
        // Rare (a user looking at a node where they hold a device): encoded for them.
        let mut devices = self.node.devices.clone();
        redact(caller, &mut devices);
        Cow::Owned(json(&NodeRef {
            node: &self.node.node,
            devices: &devices,
        }))
    }
}

fn json<T: Serialize>(v: &T) -> String {
    // Our own types with string keys: serialization cannot fail.
    serde_json::to_string(v).unwrap_or_default()
}

/// A node with its devices as of now; `None` when it is not listed.
pub fn load(s: &AppState, name: &str, now: u64) -> Option<ClusterNode> {
    let view = s.cluster.node(name, now)?;
    let mut devices = Vec::new();
    let mut q = DeviceQuery {
        node: Some(name.to_owned()),
        limit: MAX_PAGE,
        ..DeviceQuery::default()
    };
    // Cursors come from the previous page, so an error cannot happen here; stop at one.
    while let Ok(page) = s.cluster.devices(&q, now) {
        devices.extend(page.items);
        match page.next_cursor {
            Some(c) => q.cursor = Some(c),
            None => break,
        }
    }
    Some(ClusterNode {
        node: detail(s, view),
        devices,
    })
}

/// What a stream follows.
#[derive(Clone, Debug)]
pub struct Want {
    /// `None`: every node.
    pub nodes: Option<HashSet<String>>,
    pub rows: bool,
    pub summary: bool,
}

impl Want {
    pub fn follows(&self, node: &str) -> bool {
        self.nodes.as_ref().is_none_or(|n| n.contains(node))
    }
}

/// Who follows what, so the producer encodes only what some stream will send.
#[derive(Default)]
struct Interest {
    streams: usize,
    all: usize,
    rows: usize,
    summary: usize,
    nodes: HashMap<String, usize>,
    running: bool,
}

impl Interest {
    fn add(&mut self, w: &Want, by: isize) {
        let step = |n: &mut usize| *n = n.saturating_add_signed(by);
        step(&mut self.streams);
        if w.rows {
            step(&mut self.rows);
        }
        if w.summary {
            step(&mut self.summary);
        }
        match &w.nodes {
            None => step(&mut self.all),
            Some(names) => {
                for n in names {
                    let c = self.nodes.entry(n.clone()).or_default();
                    step(c);
                    if *c == 0 {
                        self.nodes.remove(n);
                    }
                }
            }
        }
    }
}

/// The shared producer and its broadcast. One per aggregator.
pub struct Feed {
    tx: broadcast::Sender<Arc<Batch>>,
    interest: Mutex<Interest>,
    /// The last round broadcast.
    round: AtomicU64,
    /// The latest encoding of each followed node, with the round it is current for.
    bodies: Mutex<Bodies>,
}

/// Per node: the round an encoding is current for, and the encoding.
type Bodies = HashMap<Arc<str>, (u64, Arc<NodeBody>)>;

impl Default for Feed {
    fn default() -> Self {
        Feed {
            tx: broadcast::channel(CAPACITY).0,
            interest: Mutex::default(),
            round: AtomicU64::new(0),
            bodies: Mutex::default(),
        }
    }
}

impl Feed {
    fn interest(&self) -> MutexGuard<'_, Interest> {
        // Counters only: a panic elsewhere cannot leave them half-written.
        self.interest.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn bodies(&self) -> MutexGuard<'_, Bodies> {
        // A map of whole entries: a panic elsewhere cannot leave one half-written.
        self.bodies.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The last round broadcast: an encoding made now is at least that fresh.
    pub fn round(&self) -> u64 {
        self.round.load(Ordering::Acquire)
    }

    /// `name` encoded as of round `round` or later (`None`: as of now, for snapshots):
    /// from the cache, else encoded now and cached for the other streams. `None` when
    /// the node is not listed.
    pub fn body(&self, s: &AppState, name: &Arc<str>, round: Option<u64>) -> Option<Arc<NodeBody>> {
        if let Some(round) = round
            && let Some((r, body)) = self.bodies().get(name)
            && *r >= round
        {
            return Some(body.clone());
        }
        let now_round = self.round();
        let body = Arc::new(NodeBody::new(load(s, name, now_ms())?));
        let mut bodies = self.bodies();
        match bodies.get(name) {
            Some((r, newer)) if *r > now_round => Some(newer.clone()),
            _ => {
                bodies.insert(name.clone(), (now_round, body.clone()));
                Some(body)
            }
        }
    }

    /// Registers a stream; starts the producer when it is the first.
    pub fn subscribe(s: &AppState, want: Want) -> Subscription {
        let feed = s.feed.clone();
        let rx = feed.tx.subscribe();
        let start = {
            let mut i = feed.interest();
            i.add(&want, 1);
            !std::mem::replace(&mut i.running, true)
        };
        if start {
            tokio::spawn(produce(s.clone()));
        }
        Subscription { feed, want, rx }
    }
}

/// A stream's place in the feed; leaving drops its interest.
pub struct Subscription {
    feed: Arc<Feed>,
    pub want: Want,
    pub rx: broadcast::Receiver<Arc<Batch>>,
}

impl Subscription {
    /// Skips everything queued: the caller is about to send a fresh snapshot.
    pub fn skip_to_now(&mut self) {
        self.rx = self.feed.tx.subscribe();
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.feed.interest().add(&self.want, -1);
    }
}

fn holdings(s: &AppState) -> HashMap<String, Holder> {
    s.cluster
        .ledger()
        .holdings()
        .into_iter()
        .map(|(uuid, h, _)| (uuid, h))
        .collect()
}

/// The producer: runs while any stream is open.
///
/// What it compares against (push generation, holders, stale nodes, the summary) is
/// taken here, when it is created in [`Feed::subscribe`], before the first stream takes
/// its snapshot: a change in between is then sent (perhaps twice), never lost.
fn produce(s: AppState) -> impl Future<Output = ()> + Send + 'static {
    let mut pushes = s.cluster.inventory_changes();
    let mut allocations = s.cluster.allocation_changes();
    let mut generation = s.cluster.inventory().push_generation();
    let mut allocation_gen = *allocations.borrow_and_update();
    let mut holders = holdings(&s);
    let mut stale: HashSet<Arc<str>> = s
        .cluster
        .inventory()
        .stale_nodes(now_ms())
        .into_iter()
        .collect();
    // Every stream's snapshot carries the summary as of now or later.
    let mut summary = json(&s.cluster.fleet(now_ms()));
    async move {
        let inv = s.cluster.inventory();
        let mut summary_due = false;
        let mut summary_at: Option<Instant> = None;
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let open = tokio::select! {
                r = pushes.changed() => r.is_ok(),
                r = allocations.changed() => r.is_ok(),
                _ = tick.tick() => true,
            };
            tokio::time::sleep(BATCH).await;
            let now = now_ms();
            let mut changed: BTreeMap<Arc<str>, bool> = BTreeMap::new();
            let mut resync = false;

            let (g, pushed) = inv.changes_since(generation);
            generation = g;
            match pushed {
                Some(list) => {
                    for (node, layout) in list {
                        *changed.entry(node).or_default() |= layout;
                    }
                }
                None => resync = true,
            }
            let a = *allocations.borrow_and_update();
            if a != allocation_gen {
                allocation_gen = a;
                let now_held = holdings(&s);
                let moved = now_held
                    .iter()
                    .filter(|(u, h)| holders.get(*u) != Some(*h))
                    .map(|(u, _)| u)
                    .chain(holders.keys().filter(|u| !now_held.contains_key(*u)));
                for uuid in moved {
                    if let Some(node) = inv.node_of(uuid) {
                        changed.insert(node, true);
                    }
                }
                holders = now_held;
            }
            let now_stale: HashSet<Arc<str>> = inv.stale_nodes(now).into_iter().collect();
            for node in now_stale.symmetric_difference(&stale) {
                changed.insert(node.clone(), true);
            }
            stale = now_stale;
            if resync || changed.values().any(|&important| important) {
                summary_due = true;
            }

            let (nodes, rows, want_summary) = {
                let mut i = s.feed.interest();
                if i.streams == 0 || !open {
                    i.running = false;
                    s.feed.bodies().clear();
                    return;
                }
                if i.all == 0 {
                    // Keep encodings only of nodes someone still follows.
                    s.feed.bodies().retain(|n, _| i.nodes.contains_key(&**n));
                }
                let nodes: Vec<NodeChange> = changed
                    .iter()
                    .filter(|(n, _)| i.all > 0 || i.nodes.contains_key(&***n))
                    .map(|(n, &important)| NodeChange {
                        name: n.clone(),
                        important,
                    })
                    .collect();
                (nodes, i.rows > 0, i.summary > 0)
            };
            let mut batch = Batch {
                round: s.feed.round() + 1,
                nodes: Vec::new(),
                rows: None,
                summary: None,
                resync,
            };
            if !resync {
                batch.nodes = nodes;
                if rows {
                    let lines: Vec<_> = changed
                        .iter()
                        .filter(|(_, important)| **important)
                        .filter_map(|(n, _)| s.cluster.row(n, now))
                        .collect();
                    if !lines.is_empty() {
                        batch.rows = Some(json(&lines).into());
                    }
                }
            }
            if want_summary
                && summary_due
                && summary_at.is_none_or(|t| t.elapsed() >= SUMMARY_EVERY)
            {
                summary_due = false;
                summary_at = Some(Instant::now());
                let fresh = json(&s.cluster.fleet(now));
                if fresh != summary {
                    batch.summary = Some(fresh.as_str().into());
                    summary = fresh;
                }
            }
            if batch.resync
                || !batch.nodes.is_empty()
                || batch.rows.is_some()
                || batch.summary.is_some()
            {
                // From here, an encoding counts as current for this round.
                s.feed.round.store(batch.round, Ordering::Release);
                // No receiver is fine: they may all be between connections.
                let _ = s.feed.tx.send(Arc::new(batch));
            }
        }
    }
}
