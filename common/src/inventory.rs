//! The node inventory an agent pushes as `PUT /api/v1/nodes/{node}/inventory`.

use serde::{Deserialize, Serialize};

/// One complete snapshot of a node: what the agent last collected.
///
/// Pushes are idempotent: the aggregator keeps, per node, the snapshot with the highest
/// `(boot_id, seq)`; a new `boot_id` (agent restart) starts a new sequence.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeInventory {
    /// Kubernetes node name (or host name in the local shape).
    pub node: String,
    /// Random id chosen when the agent process starts.
    pub boot_id: String,
    /// Collection number within this boot, starting at 1, strictly increasing.
    pub seq: u64,
    /// `kcloud-agent` version that produced the snapshot.
    pub agent_version: String,
    /// When the collection finished, milliseconds since the Unix epoch.
    pub collected_at_ms: u64,
    /// True when the GPUs are simulated (`--simulate`), never real hardware.
    #[serde(default)]
    pub simulated: bool,
    /// The node group it belongs to (`--node-group`: a rack, a pool, a machine type),
    /// for the fleet view's summary; absent when not set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    pub nvml: NvmlStatus,
    pub host: HostInfo,
    #[serde(default)]
    pub gpus: Vec<Gpu>,
}

impl NodeInventory {
    /// Every allocatable device on the node: whole GPUs without MIG, and MIG instances.
    pub fn allocatable(&self) -> impl Iterator<Item = (DeviceKind, &str)> {
        self.gpus.iter().filter(|g| !g.lost).flat_map(|g| {
            let whole = (!g.mig_enabled()).then_some((DeviceKind::Gpu, g.uuid.as_str()));
            let slices = g
                .mig_instances
                .iter()
                .map(|m| (DeviceKind::Mig, m.uuid.as_str()));
            whole.into_iter().chain(slices)
        })
    }
}

/// Whether NVML could be used, and what it said.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NvmlStatus {
    /// NVML initialised and the last collection enumerated devices.
    pub up: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cuda_driver_version: Option<i32>,
    /// Why NVML is down (no driver, library not found, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Host state from sysinfo.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HostInfo {
    pub hostname: String,
    pub cpu_count: u32,
    /// Average over all CPUs since the previous collection, 0–100.
    pub cpu_utilization_percent: f64,
    pub memory_total_bytes: u64,
    pub memory_used_bytes: u64,
    /// 1, 5 and 15 minute load averages.
    pub load_average: [f64; 3],
    pub uptime_seconds: u64,
}

/// Whole GPU (`GPU-<uuid>`) or MIG instance (`MIG-<uuid>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    Gpu,
    Mig,
}

/// Frame-buffer memory in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryInfo {
    pub total_bytes: u64,
    pub used_bytes: u64,
    pub free_bytes: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigMode {
    pub current: bool,
    /// Takes effect after the next GPU reset.
    pub pending: bool,
}

/// One physical GPU. Optional fields are absent when NVML reports them as not supported.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Gpu {
    /// NVML index (the `gpu` label in metrics).
    pub index: u32,
    pub uuid: String,
    /// Product name, e.g. `NVIDIA A100-SXM4-80GB`.
    pub model: String,
    #[serde(default)]
    pub pci_bus_id: String,
    /// The driver's minor number: the device file is `/dev/nvidia{minor_number}`, and
    /// MIG capabilities are named after it (not always equal to `index`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minor_number: Option<u32>,
    /// The GPU fell off the bus or stopped answering: shown, never allocatable.
    #[serde(default)]
    pub lost: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<MemoryInfo>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub utilization_gpu_percent: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub utilization_memory_percent: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature_celsius: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub power_watts: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub energy_millijoules: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sm_clock_mhz: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_clock_mhz: Option<u32>,
    /// Absent on GPUs that do not support MIG.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mig_mode: Option<MigMode>,
    #[serde(default)]
    pub mig_instances: Vec<MigInstance>,
    #[serde(default)]
    pub processes: Vec<ComputeProcess>,
}

impl Gpu {
    /// A GPU in MIG mode is allocatable only through its MIG instances.
    pub fn mig_enabled(&self) -> bool {
        self.mig_mode.is_some_and(|m| m.current)
    }
}

/// One MIG device (a GPU instance with its compute instance).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigInstance {
    pub uuid: String,
    pub parent_uuid: String,
    /// Index of the MIG device on its parent.
    pub index: u32,
    /// Profile name such as `3g.40gb` (from the device name).
    pub profile: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_instance_id: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compute_instance_id: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<MemoryInfo>,
    /// Share of time the instance's graphics engine was busy over the agent's last
    /// interval, 0 to 1 (DCGM's `DCGM_FI_PROF_GR_ENGINE_ACTIVE`), from NVML's GPU
    /// Performance Monitoring (Hopper and newer). Absent where GPM is not supported
    /// or no interval has been measured yet: never 0 for "unknown".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gr_engine_active: Option<f64>,
}

/// A process with a compute context on a GPU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComputeProcess {
    pub pid: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used_memory_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_instance_id: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compute_instance_id: Option<u32>,
}

/// Derive a MIG profile (`3g.40gb`, `1g.10gb+me`) from a MIG device name such as
/// `NVIDIA A100-SXM4-80GB MIG 3g.40gb`: NVML has no safe call that returns it.
pub fn mig_profile_from_name(name: &str) -> Option<&str> {
    let profile = name.rsplit_once(" MIG ")?.1.trim();
    let (compute, _) = profile.split_once('g')?;
    (!compute.is_empty() && compute.bytes().all(|b| b.is_ascii_digit())).then_some(profile)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpu(uuid: &str, mig: Option<bool>, slices: &[&str]) -> Gpu {
        Gpu {
            index: 0,
            uuid: uuid.into(),
            model: "NVIDIA A100-SXM4-80GB".into(),
            pci_bus_id: String::new(),
            minor_number: None,
            lost: false,
            memory: None,
            utilization_gpu_percent: None,
            utilization_memory_percent: None,
            temperature_celsius: None,
            power_watts: None,
            energy_millijoules: None,
            sm_clock_mhz: None,
            memory_clock_mhz: None,
            mig_mode: mig.map(|current| MigMode {
                current,
                pending: current,
            }),
            mig_instances: slices
                .iter()
                .enumerate()
                .map(|(i, u)| MigInstance {
                    uuid: (*u).into(),
                    parent_uuid: uuid.into(),
                    index: i as u32,
                    profile: "1g.10gb".into(),
                    gpu_instance_id: None,
                    compute_instance_id: None,
                    memory: None,
                    gr_engine_active: None,
                })
                .collect(),
            processes: vec![],
        }
    }

    #[test]
    fn mig_gpus_are_allocatable_only_through_their_instances() {
        let mut lost = gpu("GPU-c", None, &[]);
        lost.lost = true;
        let inv = NodeInventory {
            node: "n".into(),
            boot_id: "b".into(),
            seq: 1,
            agent_version: "0".into(),
            collected_at_ms: 0,
            simulated: false,
            group: None,
            nvml: NvmlStatus::default(),
            host: HostInfo::default(),
            gpus: vec![
                gpu("GPU-a", Some(false), &[]),
                gpu("GPU-b", Some(true), &["MIG-1", "MIG-2"]),
                lost,
            ],
        };
        let got: Vec<_> = inv.allocatable().collect();
        assert_eq!(
            got,
            vec![
                (DeviceKind::Gpu, "GPU-a"),
                (DeviceKind::Mig, "MIG-1"),
                (DeviceKind::Mig, "MIG-2")
            ]
        );
    }

    #[test]
    fn absent_fields_are_omitted_not_zero() {
        let json = serde_json::to_value(gpu("GPU-a", None, &[])).unwrap();
        assert!(json.get("utilization_gpu_percent").is_none());
        assert!(json.get("mig_mode").is_none());
        let back: Gpu = serde_json::from_value(json).unwrap();
        assert_eq!(back.utilization_gpu_percent, None);
    }

    #[test]
    fn profile_comes_from_the_mig_device_name() {
        assert_eq!(
            mig_profile_from_name("NVIDIA A100-SXM4-80GB MIG 3g.40gb"),
            Some("3g.40gb")
        );
        assert_eq!(
            mig_profile_from_name("NVIDIA H100 80GB HBM3 MIG 1g.10gb+me"),
            Some("1g.10gb+me")
        );
        assert_eq!(mig_profile_from_name("NVIDIA A100-SXM4-80GB"), None);
        assert_eq!(mig_profile_from_name("X MIG garbage"), None);
    }
}
