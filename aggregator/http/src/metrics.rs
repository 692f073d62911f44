//! The aggregator's Prometheus registry: requests by route, logins, inventory pushes,
//! node freshness, `kcloud_gpu_allocated{UUID,user,server}` for joining with the
//! agents' DCGM series in Grafana, and `kcloud_gpu_hours_total{user,model,profile}`.

use std::sync::Mutex;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use kcloud_cluster::Cluster;
use kcloud_core::usage::UsageTotal;

pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: String,
    route: String,
    status: u16,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    method: String,
    route: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UsageLabels {
    user: String,
    model: String,
    profile: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
#[allow(non_snake_case)]
struct AllocationLabels {
    UUID: String,
    user: String,
    server: String,
}

pub struct Metrics {
    registry: Registry,
    /// Serialises scrapes: the scrape-time families are cleared and refilled.
    render: Mutex<()>,
    requests: Family<RequestLabels, Counter>,
    durations: Family<RouteLabels, Histogram>,
    pushes: Family<ResultLabels, Counter>,
    logins: Family<ResultLabels, Counter>,
    nodes: Family<StateLabels, Gauge>,
    devices: Gauge,
    devices_held: Gauge,
    oldest_inventory: Gauge<f64, AtomicU64>,
    allocated: Family<AllocationLabels, Gauge>,
    gpu_hours: Family<UsageLabels, Counter<f64, AtomicU64>>,
    queued: Gauge,
    oldest_wait: Gauge<f64, AtomicU64>,
    gpu_idle_servers: Gauge,
}

/// What the servers' use cases know at a scrape: the wait queue and idle GPUs.
#[derive(Debug, Default, Clone, Copy)]
pub struct ServerGauges {
    pub queued: usize,
    /// How long the longest-waiting request has waited, in seconds.
    pub oldest_wait_s: f64,
    /// Running servers whose every device reads idle now (idle-GPU reclaim on).
    pub gpu_idle_servers: usize,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut m = Self {
            registry: Registry::default(),
            render: Mutex::new(()),
            requests: Family::default(),
            durations: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.0001, 2.0, 16))
            }),
            pushes: Family::default(),
            logins: Family::default(),
            nodes: Family::default(),
            devices: Gauge::default(),
            devices_held: Gauge::default(),
            oldest_inventory: Gauge::default(),
            allocated: Family::default(),
            gpu_hours: Family::default(),
            queued: Gauge::default(),
            oldest_wait: Gauge::default(),
            gpu_idle_servers: Gauge::default(),
        };
        let r = &mut m.registry;
        r.register(
            "kcloud_http_requests",
            "HTTP requests by route template and status.",
            m.requests.clone(),
        );
        r.register(
            "kcloud_http_request_duration_seconds",
            "HTTP request latency by route template.",
            m.durations.clone(),
        );
        r.register(
            "kcloud_inventory_pushes",
            "Agent inventory pushes by result.",
            m.pushes.clone(),
        );
        r.register(
            "kcloud_logins",
            "Login attempts by result.",
            m.logins.clone(),
        );
        r.register(
            "kcloud_nodes",
            "Nodes by freshness (stale: three missed heartbeats).",
            m.nodes.clone(),
        );
        r.register(
            "kcloud_devices",
            "Devices (whole GPUs and MIG instances) reported by agents.",
            m.devices.clone(),
        );
        r.register(
            "kcloud_devices_held",
            "Devices claimed or allocated to servers.",
            m.devices_held.clone(),
        );
        r.register(
            "kcloud_inventory_oldest_age_seconds",
            "Age of the oldest node inventory.",
            m.oldest_inventory.clone(),
        );
        r.register(
            "kcloud_gpu_allocated",
            "1 for each device held by a server; join with DCGM series on UUID.",
            m.allocated.clone(),
        );
        r.register(
            "kcloud_gpu_hours",
            "Normalized GPU-hours used (a whole GPU counts 1 per hour, a MIG instance its \
             compute slices over its GPU's), by user, model and MIG profile (empty for whole \
             GPUs); running servers counted up to the scrape.",
            m.gpu_hours.clone(),
        );
        r.register(
            "kcloud_queue_requests",
            "Requests waiting in the queue for devices.",
            m.queued.clone(),
        );
        r.register(
            "kcloud_queue_oldest_wait_seconds",
            "How long the longest-waiting queued request has waited (0: none waits).",
            m.oldest_wait.clone(),
        );
        r.register(
            "kcloud_servers_gpu_idle",
            "Running servers whose every device reads under the idle threshold now \
             ([culling] gpu_idle_*; 0 when idle-GPU reclaim is off).",
            m.gpu_idle_servers.clone(),
        );
        m
    }

    pub fn observe_request(&self, method: &str, route: &str, status: u16, took: Duration) {
        self.requests
            .get_or_create(&RequestLabels {
                method: method.into(),
                route: route.into(),
                status,
            })
            .inc();
        self.durations
            .get_or_create(&RouteLabels {
                method: method.into(),
                route: route.into(),
            })
            .observe(took.as_secs_f64());
    }

    pub fn observe_push(&self, result: &'static str) {
        self.pushes.get_or_create(&ResultLabels { result }).inc();
    }

    pub fn observe_login(&self, ok: bool) {
        let result = if ok { "ok" } else { "failed" };
        self.logins.get_or_create(&ResultLabels { result }).inc();
    }

    /// Refreshes the scrape-time series from the inventory and ledger, then encodes.
    pub fn render(
        &self,
        cluster: &Cluster,
        usage: &[UsageTotal],
        servers: ServerGauges,
        now_ms: u64,
    ) -> String {
        let _guard = self.render.lock().unwrap_or_else(|e| e.into_inner());
        self.queued.set(servers.queued as i64);
        self.oldest_wait.set(servers.oldest_wait_s);
        self.gpu_idle_servers.set(servers.gpu_idle_servers as i64);
        let counts = cluster.counts(now_ms);
        self.nodes
            .get_or_create(&StateLabels { state: "fresh" })
            .set(counts.fresh as i64);
        self.nodes
            .get_or_create(&StateLabels { state: "stale" })
            .set(counts.stale as i64);
        self.devices.set(counts.devices as i64);
        self.oldest_inventory
            .set(counts.oldest_age_ms as f64 / 1000.0);
        self.allocated.clear();
        let holdings = cluster.ledger().holdings();
        self.devices_held.set(holdings.len() as i64);
        for (uuid, holder, _committed) in holdings {
            self.allocated
                .get_or_create(&AllocationLabels {
                    UUID: uuid,
                    user: holder.user,
                    server: holder.server,
                })
                .set(1);
        }
        // Counters only move forward: each takes the difference to the store's total.
        for t in usage {
            let c = self.gpu_hours.get_or_create(&UsageLabels {
                user: t.user.clone(),
                model: t.model.clone(),
                profile: t.profile.clone(),
            });
            let now = c.get();
            if t.gpu_hours > now {
                c.inc_by(t.gpu_hours - now);
            }
        }
        let mut out = String::with_capacity(16 * 1024);
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
