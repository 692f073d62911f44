//! Inventories for tests and benchmarks (feature `fixtures`): GPUs, MIG layouts and
//! nodes shaped like what agents push.

use crate::inventory::{
    Gpu, HostInfo, MemoryInfo, MigInstance, MigMode, NodeInventory, NvmlStatus,
};

pub const A100: &str = "NVIDIA A100-SXM4-80GB";
pub const H100: &str = "NVIDIA H100 80GB HBM3";
/// When fixtures' nodes push, and the stale limit the tests use.
pub const T0: u64 = 1_000_000;
pub const STALE_MS: u64 = 15_000;

pub fn gpu(index: u32, uuid: &str, model: &str) -> Gpu {
    Gpu {
        index,
        uuid: uuid.into(),
        model: model.into(),
        pci_bus_id: format!("00000000:{index:02X}:00.0"),
        minor_number: Some(index),
        lost: false,
        memory: Some(MemoryInfo {
            total_bytes: 80 << 30,
            used_bytes: 1 << 30,
            free_bytes: 79 << 30,
        }),
        utilization_gpu_percent: Some(10),
        utilization_memory_percent: Some(5),
        temperature_celsius: Some(40),
        power_watts: Some(90.5),
        energy_millijoules: None,
        sm_clock_mhz: None,
        memory_clock_mhz: None,
        mig_mode: Some(MigMode::default()),
        mig_instances: vec![],
        processes: vec![],
    }
}

/// `g` in MIG mode with these `(uuid, profile)` instances, indexes 0, 1, ...
pub fn with_mig<U: AsRef<str>>(mut g: Gpu, slices: &[(U, &str)]) -> Gpu {
    g.mig_mode = Some(MigMode {
        current: true,
        pending: true,
    });
    g.mig_instances = slices
        .iter()
        .enumerate()
        .map(|(i, (uuid, profile))| MigInstance {
            uuid: uuid.as_ref().into(),
            parent_uuid: g.uuid.clone(),
            index: i as u32,
            profile: (*profile).into(),
            gpu_instance_id: Some(i as u32 + 1),
            compute_instance_id: Some(0),
            memory: Some(MemoryInfo {
                total_bytes: 10 << 30,
                used_bytes: 0,
                free_bytes: 10 << 30,
            }),
            gr_engine_active: None,
        })
        .collect();
    g
}

pub fn node(name: &str, gpus: Vec<Gpu>) -> NodeInventory {
    NodeInventory {
        node: name.into(),
        boot_id: "boot-1".into(),
        seq: 1,
        agent_version: "0.1.0".into(),
        collected_at_ms: T0,
        simulated: true,
        group: None,
        nvml: NvmlStatus {
            up: true,
            driver_version: Some("550.54.15".into()),
            cuda_driver_version: Some(12040),
            error: None,
        },
        host: HostInfo {
            hostname: name.into(),
            cpu_count: 64,
            cpu_utilization_percent: 12.5,
            memory_total_bytes: 1 << 40,
            memory_used_bytes: 1 << 35,
            load_average: [1.0, 0.5, 0.25],
            uptime_seconds: 3600,
        },
        gpus,
    }
}

/// `n` whole GPUs `GPU-{name}-{i}` of `model`.
pub fn plain_node(name: &str, n: u32, model: &str) -> NodeInventory {
    node(
        name,
        (0..n)
            .map(|i| gpu(i, &format!("GPU-{name}-{i}"), model))
            .collect(),
    )
}

/// The same snapshot, one sequence number later.
pub fn next(inv: &NodeInventory) -> NodeInventory {
    let mut n = inv.clone();
    n.seq += 1;
    n.collected_at_ms += 5000;
    n
}
