//! Node CPU/memory and GPU utilization history from Prometheus (PromQL over its HTTP
//! API).
//!
//! A background task refreshes a per-node cache every `refresh` interval; API requests
//! read the cache and never wait on Prometheus. When Prometheus is down, slow or not
//! configured, node figures fall back to what the agents pushed (`source: "agent"`);
//! only the history endpoint, which has nothing to fall back to, answers 503.

use std::collections::HashMap;
use std::sync::RwLock;
use std::time::Duration;

use kcloud_common::HostInfo;
use reqwest::Url;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use utoipa::ToSchema;

use kcloud_core::settings::Queries;
use kcloud_core::{Error, Result, now_ms};

/// A node's CPU and memory figures, and where they came from.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct NodeMetrics {
    /// `prometheus` when the cache is fresh, else `agent` (the last push).
    pub source: &'static str,
    pub cpu_count: Option<f64>,
    /// 0 to 1.
    pub cpu_utilization_ratio: Option<f64>,
    pub memory_total_bytes: Option<f64>,
    pub memory_used_bytes: Option<f64>,
    /// Mean over the node's whole GPUs, percent (Prometheus only: MIG GPUs report none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu_utilization_percent: Option<f64>,
}

impl NodeMetrics {
    pub fn from_agent(host: &HostInfo) -> Self {
        Self {
            source: "agent",
            cpu_count: Some(f64::from(host.cpu_count)),
            cpu_utilization_ratio: Some(host.cpu_utilization_percent / 100.0),
            memory_total_bytes: Some(host.memory_total_bytes as f64),
            memory_used_bytes: Some(host.memory_used_bytes as f64),
            gpu_utilization_percent: None,
        }
    }
}

/// What the history endpoint can chart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum HistoryMetric {
    Cpu,
    Memory,
    GpuUtilization,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct History {
    pub node: String,
    pub metric: HistoryMetric,
    pub step_seconds: u64,
    /// `[unix seconds, value]` pairs, oldest first.
    pub points: Vec<(f64, f64)>,
}

const LONGEST_RANGE: Duration = Duration::from_secs(7 * 24 * 3600);
/// Points per chart: enough for a sparkline, small enough to answer fast.
const POINTS: u64 = 120;

pub struct Prometheus {
    http: reqwest::Client,
    base: Url,
    queries: Queries,
    refresh: Duration,
    cache: RwLock<Cache>,
}

#[derive(Default)]
struct Cache {
    at_ms: u64,
    nodes: HashMap<String, NodeMetrics>,
}

impl Prometheus {
    pub fn new(base: Url, queries: Queries, timeout: Duration, refresh: Duration) -> Result<Self> {
        if !matches!(base.scheme(), "http" | "https") {
            return Err(Error::Config("--prometheus-url must be http(s)".into()));
        }
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .build()
            .map_err(|e| Error::Config(format!("HTTP client: {e}")))?;
        Ok(Self {
            http,
            base,
            queries,
            refresh,
            cache: RwLock::new(Cache::default()),
        })
    }

    /// The cached figures for `node`, if the cache is younger than three refreshes.
    pub fn node(&self, node: &str) -> Option<NodeMetrics> {
        let cache = self.cache.read().unwrap_or_else(|e| e.into_inner());
        let max_age = 3 * self.refresh.as_millis() as u64;
        (now_ms().saturating_sub(cache.at_ms) <= max_age)
            .then(|| cache.nodes.get(node).cloned())
            .flatten()
    }

    /// Refreshes the cache until cancelled.
    pub async fn run(self: std::sync::Arc<Self>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(self.refresh);
        let mut failing = false;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            match self.refresh_once().await {
                Ok(n) => {
                    if failing {
                        tracing::info!(nodes = n, "Prometheus reachable again");
                    }
                    failing = false;
                }
                Err(e) => {
                    if !failing {
                        tracing::warn!(error = %e, "Prometheus query failed; node figures fall back to agent data");
                    }
                    failing = true;
                }
            }
        }
    }

    /// One round of instant queries; returns how many nodes it saw.
    pub async fn refresh_once(&self) -> Result<usize> {
        let q = &self.queries;
        let (cpus, util, total, used, gpu) = tokio::try_join!(
            self.instant(&q.cpu_count),
            self.instant(&q.cpu_utilization),
            self.instant(&q.memory_total),
            self.instant(&q.memory_used),
            self.instant(&q.gpu_utilization),
        )?;
        let mut nodes: HashMap<String, NodeMetrics> = HashMap::new();
        let mut apply = |series: Vec<(HashMap<String, String>, f64)>,
                         set: fn(&mut NodeMetrics, f64)| {
            for (labels, v) in series {
                if let Some(node) = labels.get(&q.node_label) {
                    let m = nodes.entry(node.clone()).or_insert(NodeMetrics {
                        source: "prometheus",
                        cpu_count: None,
                        cpu_utilization_ratio: None,
                        memory_total_bytes: None,
                        memory_used_bytes: None,
                        gpu_utilization_percent: None,
                    });
                    set(m, v);
                }
            }
        };
        apply(cpus, |m, v| m.cpu_count = Some(v));
        apply(util, |m, v| m.cpu_utilization_ratio = Some(v));
        apply(total, |m, v| m.memory_total_bytes = Some(v));
        apply(used, |m, v| m.memory_used_bytes = Some(v));
        apply(gpu, |m, v| m.gpu_utilization_percent = Some(v));
        let n = nodes.len();
        *self.cache.write().unwrap_or_else(|e| e.into_inner()) = Cache {
            at_ms: now_ms(),
            nodes,
        };
        Ok(n)
    }

    /// A metric's history for one node over the last `range`.
    pub async fn history(
        &self,
        node: &str,
        metric: HistoryMetric,
        range: Duration,
    ) -> Result<History> {
        if range.is_zero() || range > LONGEST_RANGE {
            return Err(Error::BadRequest("range must be between 1s and 7d".into()));
        }
        let template = match metric {
            HistoryMetric::Cpu => &self.queries.history_cpu,
            HistoryMetric::Memory => &self.queries.history_memory,
            HistoryMetric::GpuUtilization => &self.queries.history_gpu_utilization,
        };
        let query = template.replace("{node}", &escape_label_value(node));
        let step = (range.as_secs() / POINTS).max(15);
        let end = now_ms() / 1000;
        let start = end.saturating_sub(range.as_secs());
        let data = self
            .api(
                "query_range",
                &[
                    ("query", query.as_str()),
                    ("start", &start.to_string()),
                    ("end", &end.to_string()),
                    ("step", &step.to_string()),
                ],
            )
            .await?;
        let points = data
            .result
            .into_iter()
            .next()
            .map(|s| s.values.iter().filter_map(sample).collect())
            .unwrap_or_default();
        Ok(History {
            node: node.to_owned(),
            metric,
            step_seconds: step,
            points,
        })
    }

    async fn instant(&self, query: &str) -> Result<Vec<(HashMap<String, String>, f64)>> {
        let data = self.api("query", &[("query", query)]).await?;
        Ok(data
            .result
            .into_iter()
            .filter_map(|s| {
                s.value
                    .as_ref()
                    .and_then(sample)
                    .map(|(_, v)| (s.metric, v))
            })
            .collect())
    }

    async fn api(&self, endpoint: &str, params: &[(&str, &str)]) -> Result<Data> {
        let mut url = self.base.clone();
        url.path_segments_mut()
            .map_err(|()| Error::Config("--prometheus-url cannot be a base".into()))?
            .pop_if_empty()
            .extend(["api", "v1", endpoint]);
        // Form-encoded POST: PromQL travels URL-encoded and long queries fit.
        let body = params
            .iter()
            .map(|(k, v)| format!("{k}={}", url_encode(v)))
            .collect::<Vec<_>>()
            .join("&");
        let resp = self
            .http
            .post(url)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body)
            .send()
            .await
            .map_err(|e| Error::Unavailable(format!("Prometheus: {e}")))?;
        let status = resp.status();
        let parsed: ApiResponse = resp.json().await.map_err(|e| {
            Error::Unavailable(format!(
                "Prometheus answered {status} with a body we cannot read: {e}"
            ))
        })?;
        match (parsed.status.as_str(), parsed.data) {
            ("success", Some(data)) => Ok(data),
            _ => Err(Error::Unavailable(format!(
                "Prometheus query failed: {}",
                parsed.error.unwrap_or_else(|| status.to_string())
            ))),
        }
    }
}

#[derive(Deserialize)]
struct ApiResponse {
    status: String,
    data: Option<Data>,
    error: Option<String>,
}

#[derive(Deserialize)]
struct Data {
    #[serde(default)]
    result: Vec<Series>,
}

#[derive(Deserialize)]
struct Series {
    #[serde(default)]
    metric: HashMap<String, String>,
    value: Option<(f64, String)>,
    #[serde(default)]
    values: Vec<(f64, String)>,
}

/// Prometheus sends sample values as strings; NaN and infinities are dropped.
fn sample((t, v): &(f64, String)) -> Option<(f64, f64)> {
    v.parse::<f64>()
        .ok()
        .filter(|v| v.is_finite())
        .map(|v| (*t, v))
}

/// Escapes a string for use inside a PromQL double-quoted label value.
fn escape_label_value(s: &str) -> String {
    s.replace('\\', r"\\")
        .replace('"', "\\\"")
        .replace('\n', r"\n")
}

/// application/x-www-form-urlencoded value encoding.
fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3 / 2);
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_and_forms_are_escaped() {
        assert_eq!(escape_label_value(r#"a"b\c"#), r#"a\"b\\c"#);
        assert_eq!(
            url_encode(r#"up{job="x"} + 1"#),
            "up%7Bjob%3D%22x%22%7D+%2B+1"
        );
    }

    #[test]
    fn samples_parse_and_drop_nan() {
        assert_eq!(sample(&(1.5, "2.25".into())), Some((1.5, 2.25)));
        assert_eq!(sample(&(1.5, "NaN".into())), None);
        assert_eq!(sample(&(1.5, "+Inf".into())), None);
    }

    #[tokio::test]
    async fn a_dead_prometheus_is_unavailable_quickly() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let p = Prometheus::new(
            format!("http://127.0.0.1:{port}").parse().unwrap(),
            Queries::default(),
            Duration::from_millis(300),
            Duration::from_secs(15),
        )
        .unwrap();
        assert!(matches!(p.refresh_once().await, Err(Error::Unavailable(_))));
        let e = p
            .history("n", HistoryMetric::Cpu, Duration::from_secs(3600))
            .await;
        assert!(matches!(e, Err(Error::Unavailable(_))));
        assert!(p.node("n").is_none());
        assert!(matches!(
            p.history("n", HistoryMetric::Cpu, Duration::from_secs(30 * 24 * 3600))
                .await,
            Err(Error::BadRequest(_))
        ));
    }
}
