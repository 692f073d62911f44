//! Periodic collection of GPU and host state into one immutable snapshot.

mod gpm;
mod host;
mod nvml;
mod simulated;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kcloud_common::{Gpu, NodeInventory, NvmlStatus};
use tokio::sync::watch;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

pub use host::HostCollector;
pub use nvml::NvmlSource;
pub use simulated::{SimGpu, SimLayout, SimulatedSource};

use crate::config::{GpuMode, Settings};
use crate::metrics::Metrics;
use crate::{Result, Snapshot};

/// What one read of the GPUs produced.
#[derive(Debug, Clone, Default)]
pub struct GpuReading {
    pub nvml: NvmlStatus,
    pub gpus: Vec<Gpu>,
    /// NVML calls that failed for a reason other than "not supported", by call name.
    pub errors: Vec<&'static str>,
}

/// The GPU boundary: NVML on a real node, a simulation elsewhere, a fake NVML library
/// in tests. Reading blocks (NVML is synchronous), so it runs off the async runtime.
pub trait GpuSource: Send + 'static {
    fn read(&mut self) -> GpuReading;
    /// True when the GPUs are not real; shown in the inventory and metrics.
    fn simulated(&self) -> bool;
}

/// Builds the GPU source the settings ask for.
pub fn source_for(settings: &Settings) -> Result<Box<dyn GpuSource>> {
    let seed = &settings.node_name;
    Ok(match &settings.gpus {
        GpuMode::Nvml { lib } => Box::new(NvmlSource::new(lib.clone())),
        GpuMode::Preset(p) => Box::new(SimulatedSource::new(SimLayout::preset(*p), seed)?),
        GpuMode::File(path) => Box::new(SimulatedSource::new(SimLayout::from_file(path)?, seed)?),
    })
}

/// Owns the GPU source and the host reader; publishes a snapshot per interval.
pub struct Collector {
    source: Box<dyn GpuSource>,
    host: HostCollector,
    node: String,
    group: Option<String>,
    boot_id: String,
    seq: u64,
    interval: Duration,
    metrics: Arc<Metrics>,
}

impl Collector {
    pub fn new(
        source: Box<dyn GpuSource>,
        node: String,
        interval: Duration,
        metrics: Arc<Metrics>,
    ) -> Result<Self> {
        Ok(Self {
            source,
            host: HostCollector::new()?,
            node,
            group: None,
            boot_id: uuid::Uuid::new_v4().to_string(),
            seq: 0,
            interval,
            metrics,
        })
    }

    /// Reports the node as part of `group` (`--node-group`).
    pub fn with_group(mut self, group: Option<String>) -> Self {
        self.group = group;
        self
    }

    /// Reads everything once and returns the snapshot (blocking).
    pub fn collect(&mut self) -> NodeInventory {
        let started = Instant::now();
        let reading = self.source.read();
        let host = self.host.read();
        self.seq += 1;
        let inventory = NodeInventory {
            node: self.node.clone(),
            boot_id: self.boot_id.clone(),
            seq: self.seq,
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            collected_at_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            simulated: self.source.simulated(),
            group: self.group.clone(),
            nvml: reading.nvml,
            host,
            gpus: reading.gpus,
        };
        self.metrics
            .observe(&inventory, started.elapsed(), &reading.errors);
        inventory
    }

    /// Collects every interval until cancelled, publishing each snapshot to `tx`.
    pub async fn run(mut self, tx: watch::Sender<Snapshot>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            // NVML blocks; move the collector to a blocking thread and back.
            let joined = tokio::task::spawn_blocking(move || {
                let inv = self.collect();
                (self, inv)
            })
            .await;
            match joined {
                Ok((me, inv)) => {
                    self = me;
                    tx.send_replace(Some(Arc::new(inv)));
                }
                Err(e) => {
                    // A panic inside a source is a bug; without the collector the
                    // agent would serve a frozen snapshot, so stop the whole agent.
                    tracing::error!(error = %e, "collector task failed; shutting down");
                    shutdown.cancel();
                    break;
                }
            }
        }
    }
}
