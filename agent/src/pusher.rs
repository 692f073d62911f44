//! Pushes the inventory to the aggregator: on layout change and as a heartbeat.
//!
//! Only the newest snapshot is ever held (the watch channel keeps one value), so memory
//! stays flat however long the aggregator is away; retries back off exponentially
//! with full jitter so that a fleet of agents does not return in lockstep.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kcloud_common::NodeInventory;
use rand::Rng;
use reqwest::Url;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::metrics::{Metrics, PushLabels};
use crate::{Error, Result, Snapshot};

const BACKOFF_BASE: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

pub struct Pusher {
    client: reqwest::Client,
    url: Url,
    token_file: Option<PathBuf>,
    heartbeat: Duration,
    metrics: std::sync::Arc<Metrics>,
}

impl Pusher {
    pub fn new(
        base: &Url,
        node: &str,
        token_file: Option<PathBuf>,
        heartbeat: Duration,
        metrics: std::sync::Arc<Metrics>,
    ) -> Result<Self> {
        let mut url = base.clone();
        url.path_segments_mut()
            .map_err(|()| Error::Config("--aggregator-url cannot be a base URL".into()))?
            .pop_if_empty()
            .extend(["api", "v1", "nodes", node, "inventory"]);
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(3))
            .timeout(Duration::from_secs(10))
            .user_agent(concat!("kcloud-agent/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self {
            client,
            url,
            token_file,
            heartbeat,
            metrics,
        })
    }

    /// Pushes until cancelled.
    pub async fn run(self, mut rx: watch::Receiver<Snapshot>, shutdown: CancellationToken) {
        let mut pushed_layout: Option<u64> = None;
        let mut next_heartbeat = Instant::now();
        let mut failures: u32 = 0;
        loop {
            let snap = rx.borrow_and_update().clone();
            if let Some(inv) = snap {
                let layout = layout_hash(&inv);
                if pushed_layout != Some(layout) || Instant::now() >= next_heartbeat {
                    match self.push(&inv).await {
                        Ok(()) => {
                            if failures > 0 {
                                tracing::info!(url = %self.url, "aggregator reachable again");
                            }
                            failures = 0;
                            pushed_layout = Some(layout);
                            next_heartbeat = Instant::now() + self.heartbeat;
                        }
                        Err(e) => {
                            failures = failures.saturating_add(1);
                            let wait = backoff(failures);
                            // First failure at warn, then quieter: an aggregator that
                            // is away for an hour should not flood the log.
                            if failures == 1 {
                                tracing::warn!(url = %self.url, error = %e, "inventory push failed; retrying with backoff");
                            } else {
                                tracing::debug!(error = %e, failures, ?wait, "inventory push failed");
                            }
                            tokio::select! {
                                _ = shutdown.cancelled() => return,
                                _ = tokio::time::sleep(wait) => {}
                            }
                            continue;
                        }
                    }
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                changed = rx.changed() => if changed.is_err() { return },
                _ = tokio::time::sleep_until(next_heartbeat) => {}
            }
        }
    }

    async fn push(&self, inv: &NodeInventory) -> Result<(), PushError> {
        let mut req = self.client.put(self.url.clone()).json(inv);
        if let Some(path) = &self.token_file {
            let token = tokio::fs::read_to_string(path)
                .await
                .map_err(|e| PushError::Token(format!("{}: {e}", path.display())))?;
            req = req.bearer_auth(token.trim());
        }
        let result = match req.send().await {
            Ok(resp) if resp.status().is_success() => Ok(()),
            Ok(resp) => Err(PushError::Status(resp.status())),
            Err(e) => Err(PushError::Http(e)),
        };
        let label = PushLabels {
            result: if result.is_ok() { "ok" } else { "error" },
        };
        self.metrics.pushes.get_or_create(&label).inc();
        if result.is_ok() {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64());
            self.metrics.last_push_success.set(now);
        }
        result
    }
}

#[derive(Debug, thiserror::Error)]
enum PushError {
    #[error("agent token: {0}")]
    Token(String),
    #[error("aggregator answered {0}")]
    Status(reqwest::StatusCode),
    #[error("{0}")]
    Http(#[from] reqwest::Error),
}

/// Full jitter: a random wait between 0 and min(max, base·2^n).
fn backoff(failures: u32) -> Duration {
    let cap = BACKOFF_BASE
        .saturating_mul(1u32 << failures.min(16))
        .min(BACKOFF_MAX);
    rand::rng().random_range(Duration::ZERO..=cap)
}

/// What the aggregator allocates from: devices, MIG layout, lost GPUs, processes, NVML
/// health. Utilization and temperature move constantly and ride on the heartbeat.
fn layout_hash(inv: &NodeInventory) -> u64 {
    let mut h = DefaultHasher::new();
    inv.boot_id.hash(&mut h);
    inv.nvml.up.hash(&mut h);
    for g in &inv.gpus {
        g.uuid.hash(&mut h);
        g.lost.hash(&mut h);
        g.mig_mode.map(|m| (m.current, m.pending)).hash(&mut h);
        for m in &g.mig_instances {
            m.uuid.hash(&mut h);
            m.profile.hash(&mut h);
        }
        for p in &g.processes {
            p.pid.hash(&mut h);
        }
    }
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_a_cap_with_jitter() {
        for n in 0..40 {
            let cap = BACKOFF_BASE.saturating_mul(1 << n.min(16)).min(BACKOFF_MAX);
            assert!(backoff(n) <= cap);
        }
        let waits: std::collections::BTreeSet<_> = (0..50).map(|_| backoff(10)).collect();
        assert!(waits.len() > 10, "jittered");
    }

    #[test]
    fn url_is_built_under_the_base_path() {
        let m = std::sync::Arc::new(Metrics::new());
        let p = Pusher::new(
            &"http://agg:8080/kcloud/".parse().unwrap(),
            "gpu-1",
            None,
            Duration::from_secs(1),
            m.clone(),
        )
        .unwrap();
        assert_eq!(
            p.url.as_str(),
            "http://agg:8080/kcloud/api/v1/nodes/gpu-1/inventory"
        );
        let p = Pusher::new(
            &"http://agg:8080".parse().unwrap(),
            "gpu-1",
            None,
            Duration::from_secs(1),
            m,
        )
        .unwrap();
        assert_eq!(
            p.url.as_str(),
            "http://agg:8080/api/v1/nodes/gpu-1/inventory"
        );
    }
}
