//! The agent against a real NVIDIA driver: what the collector reads through NVML must
//! match what `nvidia-smi` (the driver's own tool, an independent reader) says about the
//! same GPUs. Read-only: nothing here changes MIG mode, clocks or anything else.
//!
//! Run on a GPU machine with `cargo test -p kcloud-agent --test gpu -- --ignored`.

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use kcloud_agent::collector::{Collector, NvmlSource};
use kcloud_agent::metrics::Metrics;

const MIB: u64 = 1024 * 1024;

/// One GPU as `nvidia-smi --query-gpu` prints it.
#[derive(Debug)]
struct SmiGpu {
    index: u32,
    uuid: String,
    name: String,
    pci_bus_id: String,
    memory_total_mib: u64,
    mig_current: Option<bool>,
}

fn nvidia_smi(args: &[&str]) -> String {
    let out = Command::new("nvidia-smi")
        .args(args)
        .output()
        .expect("nvidia-smi must be on PATH on a GPU machine");
    assert!(out.status.success(), "nvidia-smi {args:?}: {out:?}");
    String::from_utf8(out.stdout).expect("nvidia-smi prints UTF-8")
}

fn smi_gpus() -> Vec<SmiGpu> {
    nvidia_smi(&[
        "--query-gpu=index,uuid,name,pci.bus_id,memory.total,mig.mode.current",
        "--format=csv,noheader,nounits",
    ])
    .lines()
    .filter(|l| !l.trim().is_empty())
    .map(|l| {
        let f: Vec<&str> = l.split(',').map(str::trim).collect();
        assert_eq!(f.len(), 6, "unexpected nvidia-smi line {l:?}");
        SmiGpu {
            index: f[0].parse().expect("index"),
            uuid: f[1].to_owned(),
            name: f[2].to_owned(),
            pci_bus_id: f[3].to_owned(),
            memory_total_mib: f[4].parse().expect("memory.total"),
            mig_current: match f[5] {
                "Enabled" => Some(true),
                "Disabled" => Some(false),
                _ => None, // "[N/A]": the GPU has no MIG
            },
        }
    })
    .collect()
}

/// MIG device UUIDs as `nvidia-smi -L` lists them.
fn smi_mig_uuids() -> Vec<String> {
    nvidia_smi(&["-L"])
        .lines()
        .filter_map(|l| l.split("UUID: ").nth(1))
        .map(|u| u.trim_end_matches(')').to_owned())
        .filter(|u| u.starts_with("MIG-"))
        .collect()
}

fn collector() -> (Collector, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::new());
    let source = NvmlSource::with_retry(None, Duration::from_secs(30));
    let c = Collector::new(
        Box::new(source),
        "gpu-node".into(),
        Duration::from_secs(5),
        metrics.clone(),
    )
    .expect("collector");
    (c, metrics)
}

#[test]
#[ignore = "needs GPU"]
fn inventory_matches_nvidia_smi() {
    let (mut c, metrics) = collector();
    let inv = c.collect();
    assert!(inv.nvml.up, "NVML down on a GPU machine: {:?}", inv.nvml);
    assert!(!inv.simulated);
    let driver = inv.nvml.driver_version.clone().expect("driver version");
    let smi_driver = nvidia_smi(&["--query-gpu=driver_version", "--format=csv,noheader"]);
    assert_eq!(
        smi_driver.lines().next().map(str::trim),
        Some(driver.as_str())
    );

    let smi = smi_gpus();
    assert!(!smi.is_empty(), "nvidia-smi lists no GPUs");
    assert_eq!(inv.gpus.len(), smi.len(), "{:#?}", inv.gpus);
    for s in &smi {
        let g = inv
            .gpus
            .iter()
            .find(|g| g.uuid == s.uuid)
            .unwrap_or_else(|| panic!("{} missing from the inventory", s.uuid));
        assert_eq!(g.index, s.index);
        assert_eq!(g.model, s.name);
        assert!(!g.lost);
        // NVML gives an 8-digit PCI domain, nvidia-smi the same; compare case-blind.
        assert!(
            g.pci_bus_id.eq_ignore_ascii_case(&s.pci_bus_id),
            "{} vs {}",
            g.pci_bus_id,
            s.pci_bus_id
        );
        let mem = g.memory.expect("frame-buffer memory");
        assert_eq!(mem.total_bytes / MIB, s.memory_total_mib, "{}", s.uuid);
        assert!(mem.used_bytes <= mem.total_bytes);
        let temp = g.temperature_celsius.expect("temperature");
        assert!((5..=110).contains(&temp), "temperature {temp}");
        let watts = g.power_watts.expect("power");
        assert!(watts > 1.0 && watts < 2000.0, "power {watts}");
        assert_eq!(g.mig_mode.map(|m| m.current), s.mig_current, "{}", s.uuid);
    }

    // MIG: exactly the instances nvidia-smi lists, each with a profile and its parent.
    let mut ours: Vec<String> = inv
        .gpus
        .iter()
        .flat_map(|g| g.mig_instances.iter().map(|m| m.uuid.clone()))
        .collect();
    let mut theirs = smi_mig_uuids();
    ours.sort();
    theirs.sort();
    assert_eq!(ours, theirs);
    for g in &inv.gpus {
        for m in &g.mig_instances {
            assert_eq!(m.parent_uuid, g.uuid);
            assert!(
                kcloud_common::mig_profile_from_name(&format!("x MIG {}", m.profile)).is_some(),
                "profile {:?}",
                m.profile
            );
        }
    }

    // Every GPU has its dcgm-exporter series, labelled with its UUID.
    let mut text = String::new();
    metrics.render(&mut text);
    assert!(text.contains("kcloud_nvml_up 1"), "{text}");
    for s in &smi {
        for name in [
            "DCGM_FI_DEV_GPU_TEMP",
            "DCGM_FI_DEV_FB_USED",
            "DCGM_FI_DEV_POWER_USAGE",
        ] {
            assert!(
                text.lines()
                    .any(|l| l.starts_with(name) && l.contains(&format!("UUID=\"{}\"", s.uuid))),
                "{name} for {} missing",
                s.uuid
            );
        }
    }
}

/// Collections repeat without leaking or drifting: the same devices every time and the
/// sequence advancing.
#[test]
#[ignore = "needs GPU"]
fn repeated_collections_are_stable() {
    let (mut c, _) = collector();
    let first = c.collect();
    for i in 2..=20u64 {
        let inv = c.collect();
        assert_eq!(inv.seq, i);
        let uuids = |v: &kcloud_common::NodeInventory| {
            v.gpus.iter().map(|g| g.uuid.clone()).collect::<Vec<_>>()
        };
        assert_eq!(uuids(&inv), uuids(&first));
    }
}

/// GPM on the real driver, read-only: on a Hopper (or newer) GPU in MIG mode every
/// instance reports a busy share in [0, 1] from the second collection on; elsewhere
/// none is reported (absent, never 0). Prints what it saw for BENCHMARKS.md.
#[test]
#[ignore = "needs GPU"]
fn mig_utilization_from_gpm_is_a_ratio_or_absent() {
    let (mut c, metrics) = collector();
    c.collect();
    std::thread::sleep(Duration::from_secs(1));
    let inv = c.collect();
    let mut text = String::new();
    metrics.render(&mut text);
    for g in &inv.gpus {
        let hopper = ["H100", "H200", "H800", "GH200", "B200", "B100"]
            .iter()
            .any(|m| g.model.contains(m));
        for m in &g.mig_instances {
            println!(
                "{} {} {}: gr_engine_active {:?}",
                g.model, m.profile, m.uuid, m.gr_engine_active
            );
            match m.gr_engine_active {
                Some(r) => assert!((0.0..=1.0).contains(&r), "{r}"),
                None => assert!(!hopper, "{} has GPM but reported none", g.model),
            }
        }
        if g.mig_instances.is_empty() {
            println!(
                "{} {}: MIG off, GPM per instance not applicable",
                g.model, g.uuid
            );
        }
    }
    let series = text
        .lines()
        .filter(|l| l.starts_with("DCGM_FI_PROF_GR_ENGINE_ACTIVE{"))
        .count();
    let instances = inv
        .gpus
        .iter()
        .flat_map(|g| &g.mig_instances)
        .filter(|m| m.gr_engine_active.is_some())
        .count();
    assert_eq!(series, instances, "one series per measured instance");
}
