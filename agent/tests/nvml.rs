//! The NVML collector through the real nvml-wrapper, against the fake
//! `libnvidia-ml.so` from `tests/fake-nvml`: every field, MIG, "not supported",
//! init failure, lost and vanished GPUs, and a scrape path that never calls NVML.

mod common;

use std::sync::Arc;
use std::time::Duration;

use kcloud_agent::collector::{Collector, NvmlSource};
use kcloud_agent::metrics::Metrics;
use kcloud_common::NodeInventory;
use kcloud_testkit::{FakeGpu, FakeNvml, FakeProc, FakeSpec};

const MIB: u64 = 1024 * 1024;

fn collector(fake: &FakeNvml, retry: Duration) -> (Collector, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::new());
    let source = NvmlSource::with_retry(Some(fake.lib_path().to_owned()), retry);
    let c = Collector::new(
        Box::new(source),
        "node-a".into(),
        Duration::from_secs(5),
        metrics.clone(),
    )
    .expect("collector");
    (c, metrics)
}

fn render(m: &Metrics) -> String {
    let mut s = String::new();
    m.render(&mut s);
    s
}

/// The value of the one series named `name` whose labels contain every `labels` pair.
fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<String> {
    let found: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .collect();
    assert!(
        found.len() <= 1,
        "{name} {labels:?} matches several series: {found:#?}"
    );
    found
        .first()
        .and_then(|l| l.rsplit_once(' '))
        .map(|(_, v)| v.to_owned())
}

fn busy_a100(index: u32) -> FakeGpu {
    let mut g = FakeGpu::a100(index);
    g.util_gpu = Some(87);
    g.util_mem = Some(41);
    g.temp = Some(64);
    g.power_mw = Some(312_500);
    g.mem_used = Some(20 * 1024 * MIB);
    g.mem_reserved = Some(512 * MIB);
    g.energy_mj = Some(987_654_321);
    g.sm_clock = Some(1380);
    g.mem_clock = Some(1593);
    g.procs = vec![FakeProc {
        pid: 4242,
        used_mem: Some(19 * 1024 * MIB),
        gi: None,
        ci: None,
    }];
    g
}

#[test]
fn whole_gpu_fields_reach_inventory_and_metrics() {
    let fake = FakeNvml::new(&FakeSpec::with_gpus(vec![busy_a100(0), FakeGpu::a100(1)]));
    let (mut c, metrics) = collector(&fake, Duration::from_secs(30));
    let inv = c.collect();

    assert!(inv.nvml.up);
    assert_eq!(inv.nvml.driver_version.as_deref(), Some("550.54.15"));
    assert!(!inv.simulated);
    assert_eq!(inv.gpus.len(), 2);
    let g = &inv.gpus[0];
    assert_eq!(g.uuid, "GPU-00000000-0000-4000-8000-000000000000");
    assert_eq!(g.model, "NVIDIA A100-SXM4-80GB");
    assert_eq!(g.pci_bus_id, "00000000:07:00.0");
    assert_eq!(g.utilization_gpu_percent, Some(87));
    assert_eq!(g.utilization_memory_percent, Some(41));
    assert_eq!(g.temperature_celsius, Some(64));
    assert_eq!(g.power_watts, Some(312.5));
    assert_eq!(g.energy_millijoules, Some(987_654_321));
    assert_eq!(g.sm_clock_mhz, Some(1380));
    assert_eq!(g.memory_clock_mhz, Some(1593));
    let mem = g.memory.expect("memory");
    assert_eq!(mem.used_bytes, 20 * 1024 * MIB);
    assert_eq!(
        mem.free_bytes,
        mem.total_bytes - 512 * MIB - 20 * 1024 * MIB
    );
    assert_eq!(g.mig_mode.map(|m| m.current), Some(false));
    assert!(g.mig_instances.is_empty());
    assert_eq!(g.processes.len(), 1);
    assert_eq!(g.processes[0].pid, 4242);
    assert_eq!(g.processes[0].used_memory_bytes, Some(19 * 1024 * MIB));

    let text = render(&metrics);
    let gpu0 = [
        ("gpu", "0"),
        ("UUID", "GPU-00000000-0000-4000-8000-000000000000"),
        ("pci_bus_id", "00000000:07:00.0"),
        ("device", "nvidia0"),
        ("modelName", "NVIDIA A100-SXM4-80GB"),
        ("Hostname", "node-a"),
    ];
    let v = |name| value(&text, name, &gpu0);
    assert_eq!(v("DCGM_FI_DEV_GPU_UTIL").as_deref(), Some("87"));
    assert_eq!(v("DCGM_FI_DEV_MEM_COPY_UTIL").as_deref(), Some("41"));
    assert_eq!(v("DCGM_FI_DEV_GPU_TEMP").as_deref(), Some("64"));
    assert_eq!(v("DCGM_FI_DEV_POWER_USAGE").as_deref(), Some("312.5"));
    assert_eq!(v("DCGM_FI_DEV_FB_USED").as_deref(), Some("20480"));
    let free_mib = (mem.free_bytes / MIB).to_string();
    assert_eq!(v("DCGM_FI_DEV_FB_FREE"), Some(free_mib));
    assert_eq!(
        v("DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION").as_deref(),
        Some("987654321")
    );
    assert_eq!(v("DCGM_FI_DEV_SM_CLOCK").as_deref(), Some("1380"));
    assert_eq!(v("DCGM_FI_DEV_MEM_CLOCK").as_deref(), Some("1593"));
    assert_eq!(v("kcloud_gpu_compute_processes").as_deref(), Some("1"));
    assert_eq!(v("kcloud_gpu_mig_mode").as_deref(), Some("0"));
    assert_eq!(v("kcloud_gpu_lost").as_deref(), Some("0"));
    assert_eq!(value(&text, "kcloud_nvml_up", &[]).as_deref(), Some("1"));
    assert_eq!(value(&text, "kcloud_simulated", &[]).as_deref(), Some("0"));
    assert_eq!(value(&text, "kcloud_gpus", &[]).as_deref(), Some("2"));
    assert_eq!(
        value(
            &text,
            "kcloud_agent_info",
            &[("driver_version", "550.54.15"), ("simulated", "false")]
        )
        .as_deref(),
        Some("1")
    );
    assert!(
        !text.contains("kcloud_nvml_errors_total{"),
        "no NVML errors: {text}"
    );
}

#[test]
fn mig_instances_with_profiles_and_ids() {
    let mut mig = FakeGpu::a100_mig(1, &["3g.40gb", "2g.20gb", "1g.10gb"]);
    mig.migs[1].mem_used = Some(3 * 1024 * MIB);
    mig.migs[2].gi = Some(13);
    let fake = FakeNvml::new(&FakeSpec::with_gpus(vec![FakeGpu::a100(0), mig]));
    let (mut c, metrics) = collector(&fake, Duration::from_secs(30));
    let inv = c.collect();

    let g = &inv.gpus[1];
    assert!(g.mig_enabled());
    assert_eq!(
        g.utilization_gpu_percent, None,
        "NVML does not report it in MIG mode"
    );
    let profiles: Vec<&str> = g.mig_instances.iter().map(|m| m.profile.as_str()).collect();
    assert_eq!(profiles, ["3g.40gb", "2g.20gb", "1g.10gb"]);
    for m in &g.mig_instances {
        assert_eq!(m.parent_uuid, g.uuid);
        assert!(m.uuid.starts_with("MIG-"));
        assert_eq!(m.compute_instance_id, Some(0));
    }
    assert_eq!(g.mig_instances[2].gpu_instance_id, Some(13));
    assert_eq!(
        g.mig_instances[0].memory.map(|m| m.total_bytes),
        Some(40 * 1024 * MIB)
    );
    assert_eq!(
        g.mig_instances[1].memory.map(|m| m.used_bytes),
        Some(3 * 1024 * MIB)
    );
    // Whole GPU 0 plus three slices are allocatable; MIG GPU 1 itself is not.
    assert_eq!(inv.allocatable().count(), 4);

    let text = render(&metrics);
    let parent = g.uuid.as_str();
    assert_eq!(
        value(
            &text,
            "DCGM_FI_DEV_FB_USED",
            &[
                ("UUID", parent),
                ("GPU_I_PROFILE", "2g.20gb"),
                ("GPU_I_ID", "2")
            ]
        )
        .as_deref(),
        Some("3072")
    );
    assert_eq!(
        value(
            &text,
            "kcloud_mig_instance_info",
            &[
                ("mig_uuid", g.mig_instances[2].uuid.as_str()),
                ("GPU_I_ID", "13"),
                ("GPU_CI_ID", "0")
            ]
        )
        .as_deref(),
        Some("1")
    );
    assert_eq!(
        value(&text, "DCGM_FI_DEV_GPU_UTIL", &[("UUID", parent)]),
        None
    );
    assert_eq!(
        value(&text, "kcloud_gpu_mig_mode", &[("UUID", parent)]).as_deref(),
        Some("1")
    );
}

/// GPM on a Hopper in MIG mode: nothing on the first read (no earlier sample), then
/// each instance's busy share over the interval, following changes of load; an
/// Ampere (no GPM) and a MIG layout change report nothing rather than 0.
#[test]
fn mig_utilization_comes_from_gpm_between_reads() {
    let mut h100 = FakeGpu::h100_mig(0, &["3g.40gb", "2g.20gb", "1g.10gb"]);
    h100.migs[0].gr_active = Some(40);
    h100.migs[1].gr_active = Some(100);
    let mut a100 = FakeGpu::a100_mig(1, &["3g.40gb"]);
    a100.migs[0].gr_active = Some(90); // never read: an A100 has no GPM
    let mut spec = FakeSpec::with_gpus(vec![h100, a100]);
    let fake = FakeNvml::new(&spec);
    let (mut c, metrics) = collector(&fake, Duration::from_secs(30));
    let util = |inv: &NodeInventory, gpu: usize| -> Vec<Option<f64>> {
        inv.gpus[gpu]
            .mig_instances
            .iter()
            .map(|m| m.gr_engine_active)
            .collect()
    };
    let close = |got: Option<f64>, want: f64| got.is_some_and(|g| (g - want).abs() < 0.02);

    let first = c.collect();
    assert_eq!(util(&first, 0), [None, None, None], "no interval yet");
    assert!(!render(&metrics).contains("DCGM_FI_PROF_GR_ENGINE_ACTIVE{"));

    std::thread::sleep(Duration::from_millis(200));
    let second = c.collect();
    let u = util(&second, 0);
    assert!(
        close(u[0], 0.40) && close(u[1], 1.0) && close(u[2], 0.0),
        "{u:?}"
    );
    assert_eq!(util(&second, 1), [None], "Ampere: absent, never 0");
    let text = render(&metrics);
    let parent = second.gpus[0].uuid.as_str();
    let v = value(
        &text,
        "DCGM_FI_PROF_GR_ENGINE_ACTIVE",
        &[
            ("UUID", parent),
            ("GPU_I_ID", "2"),
            ("GPU_I_PROFILE", "2g.20gb"),
        ],
    )
    .and_then(|v| v.parse::<f64>().ok());
    assert!(close(v, 1.0), "{v:?}\n{text}");
    let ours = value(
        &text,
        "kcloud_mig_utilization_ratio",
        &[("mig_uuid", second.gpus[0].mig_instances[0].uuid.as_str())],
    )
    .and_then(|v| v.parse::<f64>().ok());
    assert!(close(ours, 0.40), "{ours:?}");
    assert_eq!(
        value(
            &text,
            "DCGM_FI_PROF_GR_ENGINE_ACTIVE",
            &[("UUID", second.gpus[1].uuid.as_str())]
        ),
        None
    );

    // The load changes: the next interval follows it.
    spec.gpus[0].migs[0].gr_active = Some(0);
    spec.gpus[0].migs[2].gr_active = Some(75);
    fake.update(&spec);
    // The fake re-reads its file at the next read: that interval still ran at the
    // old rates; the one after runs at the new ones.
    c.collect();
    std::thread::sleep(Duration::from_millis(200));
    let third = c.collect();
    let u = util(&third, 0);
    assert!(close(u[0], 0.0) && close(u[2], 0.75), "{u:?}");

    // A new layout on the GPU (other instance ids): the new instances start afresh.
    for (m, gi) in spec.gpus[0].migs.iter_mut().zip([7, 8, 9]) {
        m.gi = Some(gi);
    }
    fake.update(&spec);
    let fourth = c.collect();
    assert_eq!(util(&fourth, 0), [None, None, None]);
    std::thread::sleep(Duration::from_millis(100));
    let fifth = c.collect();
    assert!(util(&fifth, 0).iter().all(Option::is_some));
}

#[test]
fn not_supported_fields_are_absent_not_zero() {
    let mut g = FakeGpu::a100(0);
    g.temp = None;
    g.power_mw = None;
    g.energy_mj = None;
    g.util_gpu = None;
    g.mig_current = None; // a GPU without MIG support
    let fake = FakeNvml::new(&FakeSpec::with_gpus(vec![g]));
    let (mut c, metrics) = collector(&fake, Duration::from_secs(30));
    let inv = c.collect();
    let g = &inv.gpus[0];
    assert_eq!(g.temperature_celsius, None);
    assert_eq!(g.power_watts, None);
    assert_eq!(g.energy_millijoules, None);
    assert_eq!(g.utilization_gpu_percent, None);
    assert_eq!(g.mig_mode, None);
    assert!(g.memory.is_some());

    let text = render(&metrics);
    for absent in [
        "DCGM_FI_DEV_GPU_TEMP{",
        "DCGM_FI_DEV_POWER_USAGE{",
        "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION{",
        "DCGM_FI_DEV_GPU_UTIL{",
        "kcloud_gpu_mig_mode{",
    ] {
        assert!(!text.contains(absent), "{absent} should be absent");
    }
    assert!(text.contains("DCGM_FI_DEV_FB_USED{"));
    assert!(
        !text.contains("kcloud_nvml_errors_total{"),
        "not supported is not an error"
    );
}

#[test]
fn without_nvml_host_metrics_still_flow_and_nvml_comes_back() {
    let spec = FakeSpec {
        init_error: Some(9), // NVML_ERROR_DRIVER_NOT_LOADED
        ..FakeSpec::with_gpus(vec![FakeGpu::a100(0)])
    };
    let fake = FakeNvml::new(&spec);
    let (mut c, metrics) = collector(&fake, Duration::ZERO);
    let inv = c.collect();
    assert!(!inv.nvml.up);
    let err = inv.nvml.error.clone().expect("reason");
    assert!(err.to_lowercase().contains("driver"), "{err}");
    assert!(inv.gpus.is_empty());
    assert!(inv.host.memory_total_bytes > 0);
    let text = render(&metrics);
    assert_eq!(value(&text, "kcloud_nvml_up", &[]).as_deref(), Some("0"));
    assert!(text.contains("kcloud_host_memory_total_bytes{"));

    // The driver loads later: the next collection finds the GPUs.
    fake.update(&FakeSpec::with_gpus(vec![FakeGpu::a100(0)]));
    let inv = c.collect();
    assert!(inv.nvml.up, "{:?}", inv.nvml);
    assert_eq!(inv.gpus.len(), 1);
    assert_eq!(
        value(&render(&metrics), "kcloud_nvml_up", &[]).as_deref(),
        Some("1")
    );
}

#[test]
fn lost_and_vanished_gpus_are_reported_not_fatal() {
    let spec = FakeSpec::with_gpus(vec![FakeGpu::a100(0), FakeGpu::a100(1), FakeGpu::a100(2)]);
    let fake = FakeNvml::new(&spec);
    let (mut c, metrics) = collector(&fake, Duration::from_secs(30));
    assert_eq!(c.collect().gpus.len(), 3);

    // GPU 1 falls off the bus.
    let mut lost = spec.clone();
    lost.gpus[1].lost = true;
    fake.update(&lost);
    let inv = c.collect();
    assert!(inv.nvml.up);
    assert_eq!(inv.gpus.len(), 3);
    let g1 = &inv.gpus[1];
    assert!(g1.lost);
    assert_eq!(
        g1.uuid, "GPU-00000000-0000-4000-8000-000000000001",
        "keeps its identity"
    );
    assert_eq!(g1.utilization_gpu_percent, None);
    assert!(!inv.gpus[0].lost && !inv.gpus[2].lost);
    assert_eq!(inv.allocatable().count(), 2);
    let text = render(&metrics);
    let uuid1 = [("UUID", "GPU-00000000-0000-4000-8000-000000000001")];
    assert_eq!(
        value(&text, "kcloud_gpu_lost", &uuid1).as_deref(),
        Some("1")
    );
    assert_eq!(
        value(&text, "DCGM_FI_DEV_FB_USED", &uuid1),
        None,
        "no readings from a lost GPU"
    );

    // GPU 2 disappears from the enumeration altogether: still reported, as lost.
    let mut gone = spec.clone();
    gone.gpus.truncate(2);
    fake.update(&gone);
    let inv = c.collect();
    assert_eq!(inv.gpus.len(), 3);
    assert!(inv.gpus[2].lost);
    assert!(!inv.gpus[1].lost, "GPU 1 answers again");
    assert_eq!(
        value(&render(&metrics), "kcloud_gpus", &[]).as_deref(),
        Some("3")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scrapes_never_call_nvml() {
    let fake = FakeNvml::new(&FakeSpec::with_gpus(vec![
        busy_a100(0),
        FakeGpu::a100_mig(1, &["4g.40gb", "3g.40gb"]),
    ]));
    let port = common::free_port();
    let config = <kcloud_agent::Config as clap::Parser>::try_parse_from([
        "kcloud-agent",
        "--node-name",
        "node-a",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--interval",
        "1h", // one collection at start, none during the scrapes
        "--nvml-lib",
        fake.lib_path().to_str().unwrap(),
    ])
    .unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let agent = tokio::spawn(kcloud_agent::run(config, shutdown.clone()));
    let base = format!("http://127.0.0.1:{port}");
    let inv: NodeInventory =
        common::eventually(Duration::from_secs(10), "first collection", || {
            let url = format!("{base}/inventory");
            async move { reqwest::get(url).await.ok()?.json().await.ok() }
        })
        .await;
    assert_eq!(inv.gpus.len(), 2);
    assert_eq!(inv.gpus[1].mig_instances.len(), 2);

    let before = fake.call_count().expect("library loaded by the agent");
    assert!(
        before > 10,
        "the collection went through NVML ({before} calls)"
    );
    for _ in 0..50 {
        let text = common::get_text(&format!("{base}/metrics")).await;
        assert!(text.contains("DCGM_FI_DEV_GPU_UTIL{"));
    }
    common::get_text(&format!("{base}/inventory")).await;
    assert_eq!(fake.call_count(), Some(before), "scrapes made NVML calls");

    shutdown.cancel();
    agent.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_node_without_a_driver_runs_and_says_so_once() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-libnvidia-ml.so.1");
    let agent = common::start_agent(
        dir.path(),
        &[
            "--interval",
            "100ms",
            "--nvml-lib",
            missing.to_str().unwrap(),
        ],
    )
    .await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let text = common::get_text(&agent.url("/metrics")).await;
    assert!(text.contains("kcloud_nvml_up 0"), "{text}");
    assert!(text.contains("kcloud_host_cpus{"));
    let collections: u64 = value(&text, "kcloud_collections_total", &[])
        .unwrap()
        .parse()
        .unwrap();
    assert!(collections >= 3, "kept collecting: {collections}");
    let log = agent.log_text();
    assert_eq!(log.matches("NVML unavailable").count(), 1, "{log}");
}
