//! In-process benchmark of the allocation ledger: claim + commit per second, and a
//! check that no device is ever handed out twice.
//!
//! Per round: a fresh `Inventory` with `--nodes` simulated dgx-a100-mig nodes (4 whole
//! A100s + 4 A100s in MIG mode with 17 instances: 25 listed, 21 allocatable devices per
//! node), a fresh `Ledger` (`rebuild(empty)`), one warm-up `summary` (builds the free
//! index, as the first request does in the server; not timed), then `T` threads doing
//! `claim` + `commit` until the cluster is full for that request kind, `--max`
//! claims were granted, or `--secs` passed. Modes:
//!
//! - `gpus`:  `Gpus { count: 1, model: None }` (best fit), full at 4 per node
//! - `mig`:   `Mig { profile: "1g.10gb", model: None }` (best fit), full at 10 per node
//! - `exact`: `Exact([uuid])` over every allocatable device; all threads walk the same
//!   list from different offsets, so they race for the same devices (conflicts
//!   expected, double grants not)
//!
//! After each run: every granted device appears in exactly one claim, the ledger's
//! `holdings()` are exactly the granted devices with the granting holder, all committed,
//! and no held MIG instance has its parent GPU held whole.
//!
//! Usage: cargo run --release -p kcloud-cluster --example bench_ledger --
//!          [--nodes 10000] [--rounds 5] [--threads 1,2] [--modes gpus,mig,exact]
//!          [--max 1000000] [--secs 10]
//! Prints a Markdown table; also one `RESULT mode threads median_rate ...` line per row
//! for scripts. Exits non-zero if any check fails.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use kcloud_cluster::inventory::{DeviceQuery, Inventory};
use kcloud_cluster::ledger::Ledger;
use kcloud_common::inventory::{
    Gpu, HostInfo, MemoryInfo, MigInstance, MigMode, NodeInventory, NvmlStatus,
};
use kcloud_core::device::{DeviceRequest, Holder};
use kcloud_core::{Error, now_ms};

const A100: &str = "NVIDIA A100-SXM4-80GB";
/// The dgx-a100-mig preset's MIG layouts (GPUs 4..8); GPUs 0..4 are whole.
const MIG_LAYOUT: [&[&str]; 4] = [
    &["1g.10gb"; 7],
    &["3g.40gb", "2g.20gb", "1g.10gb", "1g.10gb"],
    &["4g.40gb", "3g.40gb"],
    &["2g.20gb", "2g.20gb", "2g.20gb", "1g.10gb"],
];

struct Opts {
    nodes: u32,
    rounds: u32,
    threads: Vec<usize>,
    modes: Vec<String>,
    max: u64,
    secs: u64,
}

fn parse_opts() -> Opts {
    let mut o = Opts {
        nodes: 10_000,
        rounds: 5,
        threads: vec![1, 2],
        modes: vec!["gpus".into(), "mig".into(), "exact".into()],
        max: 1_000_000,
        secs: 10,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    let usage = || -> ! {
        eprintln!(
            "usage: bench_ledger [--nodes N] [--rounds N] [--threads 1,2] \
             [--modes gpus,mig,exact] [--max N] [--secs N]"
        );
        std::process::exit(2)
    };
    while i < args.len() {
        let (k, v) = match args[i].split_once('=') {
            Some((k, v)) => (k.to_owned(), v.to_owned()),
            None => {
                i += 1;
                (
                    args[i - 1].clone(),
                    args.get(i).cloned().unwrap_or_else(|| usage()),
                )
            }
        };
        i += 1;
        let num = |v: &str| v.parse::<u64>().unwrap_or_else(|_| usage());
        match k.as_str() {
            "--nodes" => o.nodes = num(&v).clamp(1, 100_000) as u32,
            "--rounds" => o.rounds = num(&v).clamp(1, 50) as u32,
            "--threads" => o.threads = v.split(',').map(|t| num(t).clamp(1, 64) as usize).collect(),
            "--modes" => o.modes = v.split(',').map(str::to_owned).collect(),
            "--max" => o.max = num(&v).max(1),
            "--secs" => o.secs = num(&v).clamp(1, 300),
            _ => usage(),
        }
    }
    for m in &o.modes {
        if !["gpus", "mig", "exact"].contains(&m.as_str()) {
            usage();
        }
    }
    o
}

fn gpu_uuid(node: u32, gpu: u32) -> String {
    format!("GPU-{node:08x}-5a1e-4b6c-8d2e-{gpu:012x}")
}

fn mig_uuid(node: u32, gpu: u32, slot: u32) -> String {
    format!("MIG-{node:08x}-{gpu:04x}-4f3a-9c1b-{slot:012x}")
}

fn node_name(n: u32) -> String {
    format!("gpu-node-{n:05}")
}

/// One dgx-a100-mig node, shaped like the agent's `--simulate dgx-a100-mig` push.
fn dgx_a100_mig(n: u32, now_ms: u64) -> NodeInventory {
    let mib = 1u64 << 20;
    let mem = |total: u64| {
        Some(MemoryInfo {
            total_bytes: total,
            used_bytes: 0,
            free_bytes: total,
        })
    };
    let gpus = (0..8u32)
        .map(|i| {
            let uuid = gpu_uuid(n, i);
            let layout: &[&str] = if i < 4 {
                &[]
            } else {
                MIG_LAYOUT[i as usize - 4]
            };
            let mig = !layout.is_empty();
            Gpu {
                index: i,
                uuid: uuid.clone(),
                model: A100.into(),
                pci_bus_id: format!(
                    "00000000:{:02X}:00.0",
                    [7, 15, 71, 78, 135, 144, 183, 189][i as usize]
                ),
                minor_number: Some(i),
                lost: false,
                memory: mem(81920 * mib),
                utilization_gpu_percent: (!mig).then_some(37),
                utilization_memory_percent: (!mig).then_some(22),
                temperature_celsius: Some(47),
                power_watts: Some(181.5),
                energy_millijoules: Some(123_456_789),
                sm_clock_mhz: Some(1410),
                memory_clock_mhz: Some(1593),
                mig_mode: Some(MigMode {
                    current: mig,
                    pending: mig,
                }),
                mig_instances: layout
                    .iter()
                    .enumerate()
                    .map(|(s, p)| MigInstance {
                        uuid: mig_uuid(n, i, s as u32),
                        parent_uuid: uuid.clone(),
                        index: s as u32,
                        profile: (*p).into(),
                        gpu_instance_id: Some(s as u32 + 1),
                        compute_instance_id: Some(0),
                        memory: mem(10240 * mib),
                        gr_engine_active: None,
                    })
                    .collect(),
                processes: vec![],
            }
        })
        .collect();
    NodeInventory {
        node: node_name(n),
        boot_id: "bench-boot".into(),
        seq: 1,
        agent_version: "0.1.0".into(),
        collected_at_ms: now_ms,
        simulated: true,
        group: None,
        nvml: NvmlStatus {
            up: true,
            driver_version: Some("550.54.15".into()),
            cuda_driver_version: Some(12040),
            error: None,
        },
        host: HostInfo {
            hostname: node_name(n),
            cpu_count: 256,
            cpu_utilization_percent: 12.5,
            memory_total_bytes: 2 << 40,
            memory_used_bytes: 1 << 38,
            load_average: [3.5, 3.1, 2.9],
            uptime_seconds: 86_400,
        },
        gpus,
    }
}

/// Allocatable devices (whole non-MIG GPUs and MIG instances) of node `n`, and each MIG
/// instance's parent.
fn allocatable(n: u32) -> Vec<(String, Option<String>)> {
    let mut out = Vec::with_capacity(21);
    for i in 0..4 {
        out.push((gpu_uuid(n, i), None));
    }
    for (k, layout) in MIG_LAYOUT.iter().enumerate() {
        let g = 4 + k as u32;
        for s in 0..layout.len() as u32 {
            out.push((mig_uuid(n, g, s), Some(gpu_uuid(n, g))));
        }
    }
    out
}

struct RunResult {
    granted: u64,
    devices: u64,
    conflicts: u64,
    secs: f64,
    full: bool,
    ingest_per_s: f64,
    problems: Vec<String>,
}

fn run(opts: &Opts, mode: &str, threads: usize) -> RunResult {
    let now = now_ms();
    let inv = Arc::new(Inventory::new(Duration::from_secs(3600)));
    let started = Instant::now();
    for n in 0..opts.nodes {
        inv.ingest(&node_name(n), dgx_a100_mig(n, now), now)
            .expect("ingest");
    }
    let ingest_per_s = f64::from(opts.nodes) / started.elapsed().as_secs_f64();
    let ledger = Arc::new(Ledger::new());
    ledger.rebuild(std::iter::empty());
    // Builds the ledger's free index (the server's first request does the same).
    let summary = inv.summary(&DeviceQuery::default(), &ledger, now);
    let free: u32 = summary.iter().map(|a| a.free).sum();
    assert_eq!(free, 21 * opts.nodes, "warm-up summary");

    let list: Arc<Vec<String>> = Arc::new(if mode == "exact" {
        (0..opts.nodes)
            .flat_map(|n| allocatable(n).into_iter().map(|(u, _)| u))
            .collect()
    } else {
        Vec::new()
    });
    let expected_full: u64 = u64::from(opts.nodes)
        * match mode {
            "gpus" => 4,
            "mig" => 10,
            _ => 21,
        };
    let granted_total = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let deadline = Instant::now() + Duration::from_secs(opts.secs);
    let barrier = Arc::new(std::sync::Barrier::new(threads + 1));
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let (inv, ledger, list) = (inv.clone(), ledger.clone(), list.clone());
            let (granted_total, stop, barrier) =
                (granted_total.clone(), stop.clone(), barrier.clone());
            let mode = mode.to_owned();
            let max = opts.max;
            std::thread::spawn(move || {
                let gpus = DeviceRequest::Gpus {
                    count: 1,
                    model: None,
                };
                let mig = DeviceRequest::Mig {
                    profile: "1g.10gb".into(),
                    model: None,
                };
                let mut got: Vec<(Holder, Vec<String>)> = Vec::new();
                let (mut conflicts, mut errors) = (0u64, Vec::new());
                let mut full = false;
                let start = t * list.len() / threads;
                barrier.wait();
                let now = now_ms();
                for i in 0u64.. {
                    if i % 64 == 0 && (stop.load(Ordering::Relaxed) || Instant::now() > deadline) {
                        break;
                    }
                    let exact;
                    let req = match mode.as_str() {
                        "gpus" => &gpus,
                        "mig" => &mig,
                        _ => {
                            if i as usize >= list.len() {
                                full = true;
                                break;
                            }
                            exact = DeviceRequest::Exact(vec![
                                list[(start + i as usize) % list.len()].clone(),
                            ]);
                            &exact
                        }
                    };
                    let holder = Holder {
                        user: format!("user-{t}"),
                        server: format!("srv-{t}-{i}"),
                    };
                    match ledger.claim(holder.clone(), req, &inv, None, now) {
                        Ok(r) => {
                            if let Err(e) = ledger.commit(r.id) {
                                errors.push(format!("commit {}: {e}", r.id));
                            }
                            got.push((holder, r.devices));
                            if granted_total.fetch_add(1, Ordering::Relaxed) + 1 >= max {
                                stop.store(true, Ordering::Relaxed);
                            }
                        }
                        Err(Error::Conflict(m)) if mode == "exact" => {
                            let _ = m;
                            conflicts += 1;
                        }
                        Err(Error::Conflict(m)) if m.starts_with("no fresh node") => {
                            full = true;
                            break;
                        }
                        Err(e) => {
                            errors.push(format!("claim: {e}"));
                            if errors.len() > 10 {
                                break;
                            }
                        }
                    }
                }
                (got, conflicts, errors, full)
            })
        })
        .collect();
    barrier.wait();
    let t0 = Instant::now();
    let results: Vec<_> = handles
        .into_iter()
        .map(|h| h.join().expect("thread"))
        .collect();
    let secs = t0.elapsed().as_secs_f64();

    // ---- checks ----
    let mut problems = Vec::new();
    let mut owner: HashMap<String, Holder> = HashMap::new();
    let (mut granted, mut conflicts, mut full_any) = (0u64, 0u64, false);
    let mut full_all = true;
    for (got, c, errors, full) in &results {
        conflicts += c;
        full_any |= *full;
        full_all &= *full;
        problems.extend(errors.iter().cloned());
        for (holder, devices) in got {
            granted += 1;
            for d in devices {
                if let Some(prev) = owner.insert(d.clone(), holder.clone()) {
                    problems.push(format!(
                        "DOUBLE ALLOCATION: {d} granted to {}/{} and {}/{}",
                        prev.user, prev.server, holder.user, holder.server
                    ));
                }
            }
        }
    }
    let holdings = ledger.holdings();
    if holdings.len() != owner.len() {
        problems.push(format!(
            "ledger holds {} devices, claims granted {}",
            holdings.len(),
            owner.len()
        ));
    }
    let mut seen = HashSet::new();
    for (uuid, holder, committed) in &holdings {
        if !seen.insert(uuid.clone()) {
            problems.push(format!(
                "DOUBLE ALLOCATION: {uuid} listed twice in holdings()"
            ));
        }
        if owner.get(uuid) != Some(holder) {
            problems.push(format!(
                "{uuid}: ledger holder differs from the granted one"
            ));
        }
        if !committed {
            problems.push(format!("{uuid}: not committed"));
        }
    }
    // A MIG instance and its parent GPU held at once would be a double allocation of
    // the same silicon.
    let parents: HashMap<String, String> = (0..opts.nodes)
        .flat_map(allocatable)
        .filter_map(|(u, p)| p.map(|p| (u, p)))
        .collect();
    for uuid in owner.keys() {
        if let Some(p) = parents.get(uuid)
            && owner.contains_key(p)
        {
            problems.push(format!("DOUBLE ALLOCATION: {uuid} and its parent {p}"));
        }
    }
    let full = if mode == "exact" { full_all } else { full_any };
    if full && owner.len() as u64 != expected_full {
        problems.push(format!(
            "cluster reported full at {} devices, expected {expected_full}",
            owner.len()
        ));
    }
    RunResult {
        granted,
        devices: owner.len() as u64,
        conflicts,
        secs,
        full,
        ingest_per_s,
        problems,
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn main() {
    let opts = parse_opts();
    let mut failed = false;
    let mut rows = Vec::new();
    let mut ingest_rates = Vec::new();
    for mode in &opts.modes {
        for &threads in &opts.threads {
            let mut rates = Vec::new();
            let (mut granted, mut devices, mut conflicts, mut full, mut problems) =
                (Vec::new(), Vec::new(), Vec::new(), true, 0usize);
            for round in 0..opts.rounds {
                let r = run(&opts, mode, threads);
                ingest_rates.push(r.ingest_per_s);
                let rate = r.granted as f64 / r.secs;
                eprintln!(
                    "bench_ledger: {mode} threads={threads} round={} granted={} devices={} \
                     conflicts={} secs={:.3} rate={rate:.0}/s full={} problems={}",
                    round + 1,
                    r.granted,
                    r.devices,
                    r.conflicts,
                    r.secs,
                    r.full,
                    r.problems.len()
                );
                for p in r.problems.iter().take(10) {
                    eprintln!("  PROBLEM: {p}");
                }
                problems += r.problems.len();
                rates.push(rate);
                granted.push(r.granted as f64);
                devices.push(r.devices as f64);
                conflicts.push(r.conflicts as f64);
                full &= r.full;
            }
            failed |= problems > 0;
            let (lo, hi) = (
                rates.iter().copied().fold(f64::INFINITY, f64::min),
                rates.iter().copied().fold(0.0, f64::max),
            );
            let med = median(&mut rates);
            println!(
                "RESULT mode={mode} threads={threads} median_rate={med:.0} min_rate={lo:.0} \
                 max_rate={hi:.0} granted={:.0} devices={:.0} conflicts={:.0} full={full} \
                 problems={problems}",
                median(&mut granted),
                median(&mut devices),
                median(&mut conflicts)
            );
            rows.push(format!(
                "| {mode} | {threads} | {med:.0} | {lo:.0}–{hi:.0} | {:.0} | {:.0} | {} | {} |",
                median(&mut granted),
                median(&mut conflicts),
                if full { "yes" } else { "no (cap)" },
                problems
            ));
        }
    }
    println!(
        "RESULT ingest_inprocess_median={:.0}",
        median(&mut ingest_rates)
    );
    println!();
    println!(
        "bench_ledger: {} dgx-a100-mig nodes ({} allocatable devices), {} rounds, median",
        opts.nodes,
        21 * opts.nodes,
        opts.rounds
    );
    println!();
    println!(
        "| request | threads | claim+commit/s (median) | range | claims | conflicts | until full | check failures |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for r in rows {
        println!("{r}");
    }
    if failed {
        eprintln!("bench_ledger: CHECKS FAILED");
        std::process::exit(1);
    }
}
