//! The local shape's agent: the same collector as `kcloud-agent`, run in-process and
//! fed straight into the inventory (no HTTP hop, no agent token).

use std::sync::Arc;
use std::time::Duration;

use clap::ValueEnum;
use kcloud_agent::collector::{Collector, SimLayout, SimulatedSource};
use kcloud_agent::config::Preset;
use tokio_util::sync::CancellationToken;

use crate::inventory::Inventory;
use crate::{Error, Result, now_ms};

pub struct EmbeddedAgent {
    collector: Collector,
    node: String,
    interval: Duration,
}

impl EmbeddedAgent {
    /// A simulated machine named after this host.
    pub fn simulated(preset: &str, interval: Duration) -> Result<Self> {
        let preset = Preset::from_str(preset, true).map_err(|_| {
            Error::Config(format!(
                "--simulate {preset:?}: expected dgx-a100-mig or dgx-h100"
            ))
        })?;
        let node =
            kcloud_agent::config::local_node_name().map_err(|e| Error::Config(e.to_string()))?;
        let source = SimulatedSource::new(SimLayout::preset(preset), &node)
            .map_err(|e| Error::Config(e.to_string()))?;
        let collector = Collector::new(
            Box::new(source),
            node.clone(),
            interval,
            Arc::new(kcloud_agent::metrics::Metrics::new()),
        )
        .map_err(|e| Error::Config(e.to_string()))?;
        Ok(Self {
            collector,
            node,
            interval,
        })
    }

    /// Collects every interval and ingests the snapshot until cancelled.
    pub async fn run(mut self, inventory: Arc<Inventory>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(self.interval);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let joined = tokio::task::spawn_blocking(move || {
                let inv = self.collector.collect();
                (self, inv)
            })
            .await;
            let Ok((me, inv)) = joined else {
                tracing::error!("embedded agent collection panicked; no more local inventory");
                return;
            };
            self = me;
            if let Err(e) = inventory.ingest(&self.node, inv, now_ms()) {
                tracing::error!(error = %e, "embedded agent inventory rejected");
            }
        }
    }
}
