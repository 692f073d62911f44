//! The local shape's agent: the same collector as `kcloud-agent`, run in-process and
//! fed straight into the inventory (no HTTP hop, no agent token).
//!
//! Without `--simulate` it reads this host's GPUs through NVML; on a host without a
//! driver (`--local-agent auto`) it falls back to a simulated GPU set, which every
//! inventory view labels `simulated: true`, so that the platform is usable on a laptop.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::ValueEnum;
use kcloud_agent::collector::{Collector, GpuSource, NvmlSource, SimLayout, SimulatedSource};
use kcloud_agent::config::Preset;
use tokio_util::sync::CancellationToken;

use kcloud_cluster::Cluster;
use kcloud_core::{Error, Result, now_ms};

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
        Self::with_source(Box::new(source), node, interval)
    }

    /// This host's GPUs through NVML (`nvml_lib`: the library to load, default the
    /// driver's). With `fallback`, a host where NVML does not answer gets the
    /// `dgx-a100-mig` simulated set instead, said loudly once.
    pub fn host(nvml_lib: Option<PathBuf>, fallback: bool, interval: Duration) -> Result<Self> {
        let node =
            kcloud_agent::config::local_node_name().map_err(|e| Error::Config(e.to_string()))?;
        let mut agent = Self::with_source(Box::new(NvmlSource::new(nvml_lib)), node, interval)?;
        let first = agent.collector.collect();
        if first.nvml.up || !fallback {
            tracing::info!(
                gpus = first.gpus.len(),
                driver = first.nvml.driver_version.as_deref().unwrap_or("-"),
                nvml_up = first.nvml.up,
                "local agent reads this host's GPUs through NVML"
            );
            return Ok(agent);
        }
        tracing::warn!(
            reason = first.nvml.error.as_deref().unwrap_or("no GPUs"),
            "no NVIDIA driver answered on this host: serving a SIMULATED GPU set \
             (dgx-a100-mig, marked simulated); use --local-agent nvml to insist on NVML"
        );
        Self::simulated("dgx-a100-mig", interval)
    }

    fn with_source(source: Box<dyn GpuSource>, node: String, interval: Duration) -> Result<Self> {
        let collector = Collector::new(
            source,
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
    pub async fn run(mut self, cluster: Arc<Cluster>, shutdown: CancellationToken) {
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
            if let Err(e) = cluster.ingest(&self.node, inv, now_ms()) {
                tracing::error!(error = %e, "embedded agent inventory rejected");
            }
        }
    }
}
