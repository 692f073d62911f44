//! Simulated GPUs for machines without any (`--simulate`, `--simulate-file`).
//!
//! UUIDs derive from the node name, so a simulated node keeps its devices across agent
//! restarts as a real one does; readings wander like a busy machine's.

use std::path::Path;
use std::time::Instant;

use kcloud_common::{Gpu, MemoryInfo, MigInstance, MigMode, NvmlStatus};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Deserialize;

use super::{GpuReading, GpuSource};
use crate::config::Preset;
use crate::{Error, Result};

const MIB: u64 = 1024 * 1024;
/// A MIG layout never uses more than 7 compute slices or 8 memory slices.
const COMPUTE_SLICES: u32 = 7;
const MEMORY_SLICES: u32 = 8;
const MAX_GPUS: usize = 64;

/// A machine to simulate, as given in `--simulate-file` (JSON).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimLayout {
    pub gpus: Vec<SimGpu>,
}

/// One simulated GPU. `mig` lists the MIG instances' profiles; absent means MIG off.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimGpu {
    pub model: String,
    pub memory_mib: u64,
    #[serde(default)]
    pub mig: Option<Vec<String>>,
}

impl SimLayout {
    pub fn preset(p: Preset) -> Self {
        const A100: &str = "NVIDIA A100-SXM4-80GB";
        let gpu = |model: &str, memory_mib, mig: Option<&[&str]>| SimGpu {
            model: model.into(),
            memory_mib,
            mig: mig.map(|m| m.iter().map(|s| s.to_string()).collect()),
        };
        let gpus = match p {
            Preset::DgxA100Mig => {
                let mut g: Vec<SimGpu> = (0..4).map(|_| gpu(A100, 81920, None)).collect();
                g.push(gpu(A100, 81920, Some(&["1g.10gb"; 7])));
                g.push(gpu(
                    A100,
                    81920,
                    Some(&["3g.40gb", "2g.20gb", "1g.10gb", "1g.10gb"]),
                ));
                g.push(gpu(A100, 81920, Some(&["4g.40gb", "3g.40gb"])));
                g.push(gpu(
                    A100,
                    81920,
                    Some(&["2g.20gb", "2g.20gb", "2g.20gb", "1g.10gb"]),
                ));
                g
            }
            Preset::DgxH100 => (0..8)
                .map(|_| gpu("NVIDIA H100 80GB HBM3", 81559, None))
                .collect(),
        };
        Self { gpus }
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::ReadFile {
            path: path.to_owned(),
            source,
        })?;
        serde_json::from_str(&text)
            .map_err(|e| Error::Simulation(format!("{}: {e}", path.display())))
    }

    /// Checks sizes and that every MIG layout fits the GPU's slices.
    pub fn validate(&self) -> Result<()> {
        if self.gpus.is_empty() || self.gpus.len() > MAX_GPUS {
            return Err(Error::Simulation(format!(
                "between 1 and {MAX_GPUS} GPUs, got {}",
                self.gpus.len()
            )));
        }
        for (i, g) in self.gpus.iter().enumerate() {
            if g.model.trim().is_empty() || g.model.len() > 96 {
                return Err(Error::Simulation(format!("GPU {i}: model name")));
            }
            if !(1024..=4 * 1024 * 1024).contains(&g.memory_mib) {
                return Err(Error::Simulation(format!(
                    "GPU {i}: memory_mib {} out of range",
                    g.memory_mib
                )));
            }
            let Some(profiles) = &g.mig else { continue };
            let (mut compute, mut memory) = (0, 0);
            for p in profiles {
                let (c, m) = profile_slices(p, g.memory_mib)
                    .ok_or_else(|| Error::Simulation(format!("GPU {i}: bad MIG profile {p:?}")))?;
                compute += c;
                memory += m;
            }
            if compute > COMPUTE_SLICES || memory > MEMORY_SLICES {
                return Err(Error::Simulation(format!(
                    "GPU {i}: MIG layout {profiles:?} needs {compute} compute and {memory} \
                     memory slices; a GPU has {COMPUTE_SLICES} and {MEMORY_SLICES}"
                )));
            }
        }
        Ok(())
    }
}

/// Compute and memory slices of a profile like `3g.40gb` or `1g.10gb+me` on a GPU
/// with `memory_mib` of memory: memory slices are eighths of the GPU's memory.
fn profile_slices(profile: &str, memory_mib: u64) -> Option<(u32, u32)> {
    let base = profile.strip_suffix("+me").unwrap_or(profile);
    let (compute, mem) = base.split_once("g.")?;
    let compute: u32 = compute.parse().ok()?;
    let gb: u64 = mem.strip_suffix("gb")?.parse().ok()?;
    let total_gb = memory_mib as f64 / 1024.0;
    if !(1..=COMPUTE_SLICES).contains(&compute) || gb == 0 || gb as f64 > total_gb * 1.05 {
        return None;
    }
    let slices = ((gb as f64 * f64::from(MEMORY_SLICES) / total_gb).round() as u32).max(1);
    Some((compute, slices))
}

fn profile_memory_mib(profile: &str) -> u64 {
    profile
        .split_once("g.")
        .and_then(|(_, m)| m.split("gb").next())
        .and_then(|gb| gb.parse::<u64>().ok())
        .map_or(0, |gb| gb * 1024)
}

/// A UUID-shaped id that is the same for the same node, GPU and slot.
fn stable_uuid(prefix: &str, seed: u64, gpu: u64, slot: u64) -> String {
    let mut x =
        seed ^ gpu.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ slot.wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
    let mut next = || {
        // splitmix64
        x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let (a, b) = (next(), next());
    format!(
        "{prefix}-{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        (a & 0x0fff) | 0x4000,
        ((b >> 48) & 0x3fff) | 0x8000,
        b & 0xffff_ffff_ffff
    )
}

fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Simulated GPUs with readings that move every interval.
pub struct SimulatedSource {
    gpus: Vec<Gpu>,
    tdp_watts: Vec<f64>,
    /// Hopper and newer: MIG instances report utilization through GPM.
    gpm: Vec<bool>,
    rng: StdRng,
    last: Instant,
}

impl SimulatedSource {
    /// `seed` (the node name) fixes the UUIDs and the random walk.
    pub fn new(layout: SimLayout, seed: &str) -> Result<Self> {
        layout.validate()?;
        let seed = fnv1a(seed);
        // DGX bus ids, then made-up ones for larger layouts.
        const BUSES: [u32; 8] = [0x07, 0x0f, 0x47, 0x4e, 0x87, 0x90, 0xb7, 0xbd];
        let mut gpus = Vec::new();
        let mut tdp_watts = Vec::new();
        let mut gpm = Vec::new();
        for (i, g) in layout.gpus.iter().enumerate() {
            let uuid = stable_uuid("GPU", seed, i as u64, 0);
            let total = g.memory_mib * MIB;
            let mig_instances = g
                .mig
                .iter()
                .flatten()
                .enumerate()
                .map(|(slot, profile)| MigInstance {
                    uuid: stable_uuid("MIG", seed, i as u64, slot as u64 + 1),
                    parent_uuid: uuid.clone(),
                    index: slot as u32,
                    profile: profile.clone(),
                    gpu_instance_id: Some(slot as u32 + 1),
                    compute_instance_id: Some(0),
                    memory: Some(MemoryInfo {
                        total_bytes: profile_memory_mib(profile) * MIB,
                        used_bytes: 0,
                        free_bytes: profile_memory_mib(profile) * MIB,
                    }),
                    // Filled from the second reading on, on GPUs with GPM (below).
                    gr_engine_active: None,
                })
                .collect();
            let bus = BUSES.get(i).copied().unwrap_or(0x100 + i as u32);
            gpus.push(Gpu {
                index: i as u32,
                uuid,
                model: g.model.clone(),
                pci_bus_id: format!("00000000:{bus:02X}:00.0"),
                minor_number: Some(i as u32),
                lost: false,
                memory: Some(MemoryInfo {
                    total_bytes: total,
                    used_bytes: 0,
                    free_bytes: total,
                }),
                // Real NVML does not report utilization for a GPU in MIG mode.
                utilization_gpu_percent: g.mig.is_none().then_some(0),
                utilization_memory_percent: g.mig.is_none().then_some(0),
                temperature_celsius: Some(30),
                power_watts: Some(60.0),
                energy_millijoules: Some(0),
                sm_clock_mhz: Some(1410),
                memory_clock_mhz: Some(1593),
                mig_mode: Some(MigMode {
                    current: g.mig.is_some(),
                    pending: g.mig.is_some(),
                }),
                mig_instances,
                processes: vec![],
            });
            let hopper = g.model.contains("H100") || g.model.contains("H200");
            tdp_watts.push(if hopper { 700.0 } else { 400.0 });
            gpm.push(hopper);
        }
        Ok(Self {
            gpus,
            tdp_watts,
            gpm,
            rng: StdRng::seed_from_u64(seed),
            last: Instant::now(),
        })
    }

    fn step(&mut self) {
        let dt = self.last.elapsed().as_secs_f64();
        self.last = Instant::now();
        for ((gpu, tdp), gpm) in self.gpus.iter_mut().zip(&self.tdp_watts).zip(&self.gpm) {
            // One random walk per GPU drives every reading, so they move together
            // (busy GPUs are hot, draw power and hold memory) as on a real node.
            let prev = f64::from(gpu.temperature_celsius.unwrap_or(30).saturating_sub(30)) / 0.45;
            let load = (prev + self.rng.random_range(-20.0..20.0)).clamp(0.0, 100.0);
            if gpu.utilization_gpu_percent.is_some() {
                gpu.utilization_gpu_percent = Some(load.round() as u32);
                gpu.utilization_memory_percent = Some((load * 0.6).round() as u32);
            }
            gpu.temperature_celsius = Some(30 + (load * 0.45).round() as u32);
            let watts = 60.0 + load / 100.0 * (tdp - 60.0);
            gpu.power_watts = Some((watts * 10.0).round() / 10.0);
            gpu.energy_millijoules = gpu
                .energy_millijoules
                .map(|e| e + (watts * dt * 1000.0) as u64);
            for mig in &mut gpu.mig_instances {
                if *gpm {
                    let prev = mig.gr_engine_active.unwrap_or(load / 100.0);
                    let next = (prev + self.rng.random_range(-0.2..0.2)).clamp(0.0, 1.0);
                    mig.gr_engine_active = Some((next * 1000.0).round() / 1000.0);
                }
                if let Some(m) = &mut mig.memory {
                    m.used_bytes = (m.total_bytes as f64 * self.rng.random_range(0.0..0.9)) as u64;
                    m.free_bytes = m.total_bytes - m.used_bytes;
                }
            }
            if let Some(m) = &mut gpu.memory {
                m.used_bytes = if gpu.mig_instances.is_empty() {
                    (m.total_bytes as f64 * load / 100.0 * 0.9) as u64
                } else {
                    gpu.mig_instances
                        .iter()
                        .filter_map(|i| i.memory.map(|m| m.used_bytes))
                        .sum()
                };
                m.free_bytes = m.total_bytes - m.used_bytes;
            }
        }
    }
}

impl GpuSource for SimulatedSource {
    fn read(&mut self) -> GpuReading {
        self.step();
        GpuReading {
            nvml: NvmlStatus {
                up: true,
                driver_version: Some("simulated".into()),
                cuda_driver_version: None,
                error: None,
            },
            gpus: self.gpus.clone(),
            errors: vec![],
        }
    }

    fn simulated(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dgx_a100_mig_has_four_whole_and_four_mig_gpus() {
        let mut s = SimulatedSource::new(SimLayout::preset(Preset::DgxA100Mig), "node-a").unwrap();
        let r = s.read();
        assert_eq!(r.gpus.len(), 8);
        assert!(
            r.gpus[..4]
                .iter()
                .all(|g| !g.mig_enabled() && g.mig_instances.is_empty())
        );
        assert!(
            r.gpus[4..]
                .iter()
                .all(|g| g.mig_enabled() && !g.mig_instances.is_empty())
        );
        assert_eq!(r.gpus[4].mig_instances.len(), 7);
        assert!(
            r.gpus[4].utilization_gpu_percent.is_none(),
            "no util in MIG mode"
        );
        let profiles: Vec<_> = r.gpus[6]
            .mig_instances
            .iter()
            .map(|m| m.profile.as_str())
            .collect();
        assert_eq!(profiles, ["4g.40gb", "3g.40gb"]);
        for g in &r.gpus {
            for m in &g.mig_instances {
                assert_eq!(m.parent_uuid, g.uuid);
                assert!(m.uuid.starts_with("MIG-"));
            }
        }
    }

    #[test]
    fn uuids_are_stable_per_node_and_unique() {
        let a = SimulatedSource::new(SimLayout::preset(Preset::DgxA100Mig), "node-a").unwrap();
        let a2 = SimulatedSource::new(SimLayout::preset(Preset::DgxA100Mig), "node-a").unwrap();
        let b = SimulatedSource::new(SimLayout::preset(Preset::DgxA100Mig), "node-b").unwrap();
        let ids = |s: &SimulatedSource| {
            s.gpus
                .iter()
                .flat_map(|g| {
                    std::iter::once(g.uuid.clone())
                        .chain(g.mig_instances.iter().map(|m| m.uuid.clone()))
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(ids(&a), ids(&a2));
        let mut all = ids(&a);
        all.extend(ids(&b));
        let n = all.len();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), n, "no UUID repeats across nodes");
        assert!(ids(&a)[0].starts_with("GPU-") && ids(&a)[0].len() == 40);
    }

    #[test]
    fn readings_move_and_stay_consistent() {
        let mut s = SimulatedSource::new(SimLayout::preset(Preset::DgxH100), "n").unwrap();
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..20 {
            for g in s.read().gpus {
                let m = g.memory.unwrap();
                assert_eq!(m.used_bytes + m.free_bytes, m.total_bytes);
                let u = g.utilization_gpu_percent.unwrap();
                assert!(u <= 100);
                assert!(g.power_watts.unwrap() <= 700.0);
                seen.insert(u);
            }
        }
        assert!(seen.len() > 5, "utilization moves: {seen:?}");
    }

    #[test]
    fn invalid_layouts_are_refused() {
        let bad = |json: &str| {
            let l: SimLayout = serde_json::from_str(json).unwrap();
            l.validate().unwrap_err().to_string()
        };
        let e =
            bad(r#"{"gpus":[{"model":"A100","memory_mib":81920,"mig":["4g.40gb","4g.40gb"]}]}"#);
        assert!(e.contains("compute"), "{e}");
        let e = bad(
            r#"{"gpus":[{"model":"A100","memory_mib":81920,"mig":["3g.40gb","3g.40gb","1g.10gb"]}]}"#,
        );
        assert!(e.contains("memory slices"), "{e}");
        assert!(
            bad(r#"{"gpus":[{"model":"A100","memory_mib":81920,"mig":["big"]}]}"#)
                .contains("profile")
        );
        assert!(bad(r#"{"gpus":[]}"#).contains("between"));
        assert!(serde_json::from_str::<SimLayout>(r#"{"gpus":[],"x":1}"#).is_err());
    }

    #[test]
    fn real_layouts_from_the_mig_guide_are_accepted() {
        for (mem, profiles) in [
            (81920, vec!["7g.80gb"]),
            (
                81920,
                vec![
                    "1g.10gb+me",
                    "1g.10gb",
                    "1g.10gb",
                    "1g.10gb",
                    "1g.10gb",
                    "1g.10gb",
                    "1g.10gb",
                ],
            ),
            (96256, vec!["3g.47gb", "3g.47gb"]),
            (144384, vec!["1g.18gb", "1g.18gb", "2g.35gb", "3g.71gb"]),
            (40960, vec!["4g.20gb", "2g.10gb", "1g.5gb"]),
        ] {
            let l = SimLayout {
                gpus: vec![SimGpu {
                    model: "GPU".into(),
                    memory_mib: mem,
                    mig: Some(profiles.iter().map(|s| s.to_string()).collect()),
                }],
            };
            l.validate().unwrap_or_else(|e| panic!("{profiles:?}: {e}"));
        }
    }
}
