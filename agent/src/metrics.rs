//! The agent's Prometheus registry: dcgm-exporter's series, so existing dashboards and
//! alerts work unchanged, plus `kcloud_*` series for the agent and the host.
//!
//! Values are set once per collection from the snapshot; a scrape only encodes.

use std::sync::RwLock;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use kcloud_common::{Gpu, NodeInventory};
use prometheus_client::encoding::{
    EncodeLabelKey, EncodeLabelSet, EncodeLabelValue, LabelSetEncoder,
};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// What a `/metrics` response is.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

const MIB: u64 = 1024 * 1024;

/// dcgm-exporter's label set: `gpu`, `UUID`, `device`, `modelName`, `pci_bus_id`,
/// `Hostname`, and for MIG instances `GPU_I_PROFILE` and `GPU_I_ID` (whose `UUID` and
/// `gpu` are the parent's, as dcgm-exporter reports them).
#[derive(Debug, Clone, Hash, PartialEq, Eq)]
pub struct DeviceLabels {
    gpu: u32,
    /// `nvidia<gpu>`, built once rather than on every scrape.
    device: String,
    uuid: String,
    model: String,
    pci_bus_id: String,
    hostname: String,
    mig: Option<(String, u32)>,
}

impl DeviceLabels {
    fn gpu(g: &Gpu, hostname: &str) -> Self {
        Self {
            gpu: g.index,
            device: format!("nvidia{}", g.index),
            uuid: g.uuid.clone(),
            model: g.model.clone(),
            pci_bus_id: g.pci_bus_id.clone(),
            hostname: hostname.to_string(),
            mig: None,
        }
    }
}

fn label(
    encoder: &mut LabelSetEncoder,
    key: &str,
    value: impl EncodeLabelValue,
) -> Result<(), std::fmt::Error> {
    let mut l = encoder.encode_label();
    let mut k = l.encode_label_key()?;
    EncodeLabelKey::encode(&key, &mut k)?;
    let mut v = k.encode_label_value()?;
    value.encode(&mut v)?;
    v.finish()
}

impl EncodeLabelSet for DeviceLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        label(encoder, "gpu", self.gpu)?;
        label(encoder, "UUID", self.uuid.as_str())?;
        label(encoder, "pci_bus_id", self.pci_bus_id.as_str())?;
        label(encoder, "device", self.device.as_str())?;
        label(encoder, "modelName", self.model.as_str())?;
        if let Some((profile, gi)) = &self.mig {
            label(encoder, "GPU_I_PROFILE", profile.as_str())?;
            label(encoder, "GPU_I_ID", *gi)?;
        }
        label(encoder, "Hostname", self.hostname.as_str())
    }
}

/// A MIG instance with its own UUID, for joining `kcloud_gpu_allocated{UUID="MIG-..."}`
/// with the DCGM series, which name the parent.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
#[allow(non_snake_case)]
struct MigInfoLabels {
    gpu: u32,
    UUID: String,
    GPU_I_PROFILE: String,
    GPU_I_ID: String,
    GPU_CI_ID: String,
    mig_uuid: String,
    Hostname: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
#[allow(non_snake_case)]
struct HostLabels {
    Hostname: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LoadLabels {
    window: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct InfoLabels {
    version: &'static str,
    node: String,
    driver_version: String,
    simulated: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    call: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PushLabels {
    pub result: &'static str,
}

type Gauges = Family<DeviceLabels, Gauge>;
type FloatGauge = Gauge<f64, AtomicU64>;

/// Every series the agent exports.
pub struct Metrics {
    registry: Registry,
    /// Held for writing while a collection replaces the per-device series, so that a
    /// scrape never sees half of them.
    update: RwLock<()>,
    gpu_util: Gauges,
    mem_copy_util: Gauges,
    fb_used: Gauges,
    fb_free: Gauges,
    gpu_temp: Gauges,
    power_usage: Family<DeviceLabels, FloatGauge>,
    energy: Gauges,
    sm_clock: Gauges,
    mem_clock: Gauges,
    gpu_lost: Gauges,
    mig_mode: Gauges,
    mig_mode_pending: Gauges,
    gpu_processes: Gauges,
    mig_instance: Family<MigInfoLabels, Gauge>,
    gr_engine_active: Family<DeviceLabels, FloatGauge>,
    mig_utilization: Family<MigInfoLabels, FloatGauge>,
    host_cpus: Family<HostLabels, Gauge>,
    host_cpu_util: Family<HostLabels, FloatGauge>,
    host_mem_total: Family<HostLabels, Gauge>,
    host_mem_used: Family<HostLabels, Gauge>,
    host_load: Family<LoadLabels, FloatGauge>,
    host_uptime: Family<HostLabels, Gauge>,
    info: Family<InfoLabels, Gauge>,
    nvml_up: Gauge,
    simulated: Gauge,
    gpus: Gauge,
    collections: Counter,
    collection_duration: Histogram,
    last_collection: FloatGauge,
    nvml_errors: Family<CallLabels, Counter>,
    pub pushes: Family<PushLabels, Counter>,
    pub last_push_success: FloatGauge,
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
            update: RwLock::new(()),
            gpu_util: Gauges::default(),
            mem_copy_util: Gauges::default(),
            fb_used: Gauges::default(),
            fb_free: Gauges::default(),
            gpu_temp: Gauges::default(),
            power_usage: Family::default(),
            energy: Gauges::default(),
            sm_clock: Gauges::default(),
            mem_clock: Gauges::default(),
            gpu_lost: Gauges::default(),
            mig_mode: Gauges::default(),
            mig_mode_pending: Gauges::default(),
            gpu_processes: Gauges::default(),
            mig_instance: Family::default(),
            gr_engine_active: Family::default(),
            mig_utilization: Family::default(),
            host_cpus: Family::default(),
            host_cpu_util: Family::default(),
            host_mem_total: Family::default(),
            host_mem_used: Family::default(),
            host_load: Family::default(),
            host_uptime: Family::default(),
            info: Family::default(),
            nvml_up: Gauge::default(),
            simulated: Gauge::default(),
            gpus: Gauge::default(),
            collections: Counter::default(),
            collection_duration: Histogram::new(exponential_buckets(0.0005, 2.0, 12)),
            last_collection: FloatGauge::default(),
            nvml_errors: Family::default(),
            pushes: Family::default(),
            last_push_success: FloatGauge::default(),
        };
        m.register();
        m
    }

    fn register(&mut self) {
        let r = &mut self.registry;
        r.register(
            "DCGM_FI_DEV_GPU_UTIL",
            "GPU utilization (in %).",
            self.gpu_util.clone(),
        );
        r.register(
            "DCGM_FI_DEV_MEM_COPY_UTIL",
            "Memory utilization (in %).",
            self.mem_copy_util.clone(),
        );
        r.register(
            "DCGM_FI_DEV_FB_USED",
            "Framebuffer memory used (in MiB).",
            self.fb_used.clone(),
        );
        r.register(
            "DCGM_FI_DEV_FB_FREE",
            "Framebuffer memory free (in MiB).",
            self.fb_free.clone(),
        );
        r.register(
            "DCGM_FI_DEV_GPU_TEMP",
            "GPU temperature (in C).",
            self.gpu_temp.clone(),
        );
        r.register(
            "DCGM_FI_DEV_POWER_USAGE",
            "Power draw (in W).",
            self.power_usage.clone(),
        );
        r.register(
            "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION",
            "Total energy consumption since boot (in mJ).",
            self.energy.clone(),
        );
        r.register(
            "DCGM_FI_DEV_SM_CLOCK",
            "SM clock frequency (in MHz).",
            self.sm_clock.clone(),
        );
        r.register(
            "DCGM_FI_DEV_MEM_CLOCK",
            "Memory clock frequency (in MHz).",
            self.mem_clock.clone(),
        );
        r.register(
            "kcloud_gpu_lost",
            "1 when the GPU fell off the bus or stopped answering.",
            self.gpu_lost.clone(),
        );
        r.register(
            "kcloud_gpu_mig_mode",
            "1 when MIG mode is enabled on the GPU.",
            self.mig_mode.clone(),
        );
        r.register(
            "kcloud_gpu_mig_mode_pending",
            "1 when MIG mode will be enabled after the next GPU reset.",
            self.mig_mode_pending.clone(),
        );
        r.register(
            "kcloud_gpu_compute_processes",
            "Processes with a compute context on the GPU.",
            self.gpu_processes.clone(),
        );
        r.register(
            "kcloud_mig_instance_info",
            "One series per MIG instance, with its own UUID as mig_uuid; value 1.",
            self.mig_instance.clone(),
        );
        r.register(
            "DCGM_FI_PROF_GR_ENGINE_ACTIVE",
            "Ratio of time the graphics engine is active (per MIG GPU instance, from GPM).",
            self.gr_engine_active.clone(),
        );
        r.register(
            "kcloud_mig_utilization_ratio",
            "Share of the last interval the MIG instance's graphics engine was busy, 0 to 1 \
             (GPM; absent where the GPU has no GPM).",
            self.mig_utilization.clone(),
        );
        r.register(
            "kcloud_host_cpus",
            "Logical CPUs on the host.",
            self.host_cpus.clone(),
        );
        r.register(
            "kcloud_host_cpu_utilization_ratio",
            "Host CPU utilization over the last interval, 0 to 1.",
            self.host_cpu_util.clone(),
        );
        r.register(
            "kcloud_host_memory_total_bytes",
            "Host memory.",
            self.host_mem_total.clone(),
        );
        r.register(
            "kcloud_host_memory_used_bytes",
            "Host memory in use.",
            self.host_mem_used.clone(),
        );
        r.register(
            "kcloud_host_load_average",
            "Host load average over the window.",
            self.host_load.clone(),
        );
        r.register(
            "kcloud_host_uptime_seconds",
            "Host uptime.",
            self.host_uptime.clone(),
        );
        r.register(
            "kcloud_agent_info",
            "Agent version, node and driver; value 1.",
            self.info.clone(),
        );
        r.register(
            "kcloud_nvml_up",
            "1 when NVML is initialised and answering.",
            self.nvml_up.clone(),
        );
        r.register(
            "kcloud_simulated",
            "1 when the GPUs are simulated, not real.",
            self.simulated.clone(),
        );
        r.register(
            "kcloud_gpus",
            "GPUs known on this node, lost ones included.",
            self.gpus.clone(),
        );
        r.register(
            "kcloud_collections",
            "Completed collections.",
            self.collections.clone(),
        );
        r.register(
            "kcloud_collection_duration_seconds",
            "Time to read every GPU and the host once.",
            self.collection_duration.clone(),
        );
        r.register(
            "kcloud_last_collection_timestamp_seconds",
            "When the last collection finished (Unix time).",
            self.last_collection.clone(),
        );
        r.register(
            "kcloud_nvml_errors",
            "NVML calls that failed, by call.",
            self.nvml_errors.clone(),
        );
        r.register(
            "kcloud_inventory_pushes",
            "Inventory pushes to the aggregator, by result.",
            self.pushes.clone(),
        );
        r.register(
            "kcloud_inventory_last_push_success_timestamp_seconds",
            "When the aggregator last accepted an inventory (Unix time).",
            self.last_push_success.clone(),
        );
    }

    /// Replaces every series with what this snapshot says.
    pub fn observe(&self, inv: &NodeInventory, took: Duration, errors: &[&'static str]) {
        let _guard = self.update.write().unwrap_or_else(|e| e.into_inner());
        let host = &inv.node;
        for f in [
            &self.gpu_util,
            &self.mem_copy_util,
            &self.fb_used,
            &self.fb_free,
            &self.gpu_temp,
            &self.energy,
            &self.sm_clock,
            &self.mem_clock,
            &self.gpu_lost,
            &self.mig_mode,
            &self.mig_mode_pending,
            &self.gpu_processes,
        ] {
            f.clear();
        }
        self.power_usage.clear();
        self.mig_instance.clear();
        self.gr_engine_active.clear();
        self.mig_utilization.clear();
        self.info.clear();

        for g in &inv.gpus {
            let l = DeviceLabels::gpu(g, host);
            let set = |f: &Gauges, v: Option<i64>| {
                if let Some(v) = v {
                    f.get_or_create(&l).set(v);
                }
            };
            set(&self.gpu_lost, Some(i64::from(g.lost)));
            if g.lost {
                continue;
            }
            set(&self.gpu_util, g.utilization_gpu_percent.map(i64::from));
            set(
                &self.mem_copy_util,
                g.utilization_memory_percent.map(i64::from),
            );
            set(&self.fb_used, g.memory.map(|m| (m.used_bytes / MIB) as i64));
            set(&self.fb_free, g.memory.map(|m| (m.free_bytes / MIB) as i64));
            set(&self.gpu_temp, g.temperature_celsius.map(i64::from));
            set(&self.energy, g.energy_millijoules.map(|e| e as i64));
            set(&self.sm_clock, g.sm_clock_mhz.map(i64::from));
            set(&self.mem_clock, g.memory_clock_mhz.map(i64::from));
            set(&self.mig_mode, g.mig_mode.map(|m| i64::from(m.current)));
            set(
                &self.mig_mode_pending,
                g.mig_mode.map(|m| i64::from(m.pending)),
            );
            set(&self.gpu_processes, Some(g.processes.len() as i64));
            if let Some(w) = g.power_watts {
                self.power_usage.get_or_create(&l).set(w);
            }
            for mig in &g.mig_instances {
                let gi = mig.gpu_instance_id.unwrap_or(mig.index);
                let ml = DeviceLabels {
                    mig: Some((mig.profile.clone(), gi)),
                    ..l.clone()
                };
                if let Some(m) = mig.memory {
                    self.fb_used
                        .get_or_create(&ml)
                        .set((m.used_bytes / MIB) as i64);
                    self.fb_free
                        .get_or_create(&ml)
                        .set((m.free_bytes / MIB) as i64);
                }
                let info = MigInfoLabels {
                    gpu: g.index,
                    UUID: g.uuid.clone(),
                    GPU_I_PROFILE: mig.profile.clone(),
                    GPU_I_ID: gi.to_string(),
                    GPU_CI_ID: mig
                        .compute_instance_id
                        .map(|c| c.to_string())
                        .unwrap_or_default(),
                    mig_uuid: mig.uuid.clone(),
                    Hostname: host.clone(),
                };
                if let Some(r) = mig.gr_engine_active {
                    self.gr_engine_active.get_or_create(&ml).set(r);
                    self.mig_utilization.get_or_create(&info).set(r);
                }
                self.mig_instance.get_or_create(&info).set(1);
            }
        }

        let hl = HostLabels {
            Hostname: host.clone(),
        };
        let h = &inv.host;
        self.host_cpus
            .get_or_create(&hl)
            .set(i64::from(h.cpu_count));
        self.host_cpu_util
            .get_or_create(&hl)
            .set(h.cpu_utilization_percent / 100.0);
        self.host_mem_total
            .get_or_create(&hl)
            .set(h.memory_total_bytes as i64);
        self.host_mem_used
            .get_or_create(&hl)
            .set(h.memory_used_bytes as i64);
        self.host_uptime
            .get_or_create(&hl)
            .set(h.uptime_seconds as i64);
        for (window, v) in ["1m", "5m", "15m"].into_iter().zip(h.load_average) {
            self.host_load.get_or_create(&LoadLabels { window }).set(v);
        }

        self.info
            .get_or_create(&InfoLabels {
                version: env!("CARGO_PKG_VERSION"),
                node: host.clone(),
                driver_version: inv.nvml.driver_version.clone().unwrap_or_default(),
                simulated: if inv.simulated { "true" } else { "false" },
            })
            .set(1);
        self.nvml_up.set(i64::from(inv.nvml.up));
        self.simulated.set(i64::from(inv.simulated));
        self.gpus.set(inv.gpus.len() as i64);
        self.collections.inc();
        self.collection_duration.observe(took.as_secs_f64());
        self.last_collection
            .set(inv.collected_at_ms as f64 / 1000.0);
        for call in errors {
            self.nvml_errors.get_or_create(&CallLabels { call }).inc();
        }
    }

    /// Encodes every series in the OpenMetrics text format.
    pub fn render(&self, out: &mut String) {
        let _guard = self.update.read().unwrap_or_else(|e| e.into_inner());
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(out, &self.registry);
    }
}
