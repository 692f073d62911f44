//! Wire types shared by `kcloud-agent` and `kcloud-aggregator`, and the duration format
//! both read in flags and settings.
//!
//! Serde types only: no runtime, no Kubernetes, no NVML. Field names are part of the
//! agent → aggregator contract; add fields freely (with `#[serde(default)]`), never
//! rename or repurpose one. With the `fixtures` feature: inventories for tests and
//! benchmarks.

pub mod duration;
#[cfg(feature = "fixtures")]
pub mod fixtures;
pub mod inventory;

pub use inventory::{
    ComputeProcess, DeviceKind, Gpu, HostInfo, MemoryInfo, MigInstance, MigMode, NodeInventory,
    NvmlStatus, mig_profile_from_name,
};
