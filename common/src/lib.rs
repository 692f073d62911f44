//! Wire types shared by `kcloud-agent` and `kcloud-aggregator`.
//!
//! Serde types only: no runtime, no Kubernetes, no NVML. Field names are part of the
//! agent → aggregator contract; add fields freely (with `#[serde(default)]`), never
//! rename or repurpose one.

pub mod inventory;

pub use inventory::{
    ComputeProcess, DeviceKind, Gpu, HostInfo, MemoryInfo, MigInstance, MigMode, NodeInventory,
    NvmlStatus, mig_profile_from_name,
};
