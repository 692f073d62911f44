//! In-process benchmark of the wait queue's decision and the reservation calendar
//! (issue 16's figures):
//!
//! - **decide**: `--nodes` nodes of 8 GPUs (default 10,000: 80,000 GPUs, two models),
//!   every GPU held by a one-GPU server, `--queued` waiting requests (default 10,000:
//!   1, 2, 4 or 8 GPUs, of either model or any). Per sample, one server ends (its
//!   GPU frees) and one queue round (`Cluster::decide`) runs; timed is the round (who
//!   starts, the shadows). A started request's claim is committed, so the cluster
//!   stays full. This is the round the service runs after a release.
//! - **periodic round**: the same with estimates (the service's 10 s round), every
//!   held GPU with a known end (idle culling on), which makes estimates real work.
//! - **conflict check**: `--reservations` windows (default 50,000) of 1 to 8 hours on
//!   random GPUs over four weeks, then `Calendar::conflicts` for the 8 GPUs of a
//!   random node over a random one-week window.
//!
//! Usage: cargo run --release -p kcloud-cluster --example bench_queue --
//!          [--nodes 10000] [--queued 10000] [--samples 300] [--reservations 50000]
//! Prints a Markdown table with p50 / p99 / max per operation.

use std::time::{Duration, Instant};

use kcloud_cluster::Cluster;
use kcloud_cluster::plan::KnownEnds;
use kcloud_cluster::queue::{Outcome, Waiting};
use kcloud_common::fixtures::{T0, plain_node};
use kcloud_core::device::{DeviceRequest, Holder};
use kcloud_core::reservation::Reservation;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const MODELS: [&str; 2] = ["NVIDIA A100-SXM4-80GB", "NVIDIA H100 80GB HBM3"];

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| v.parse().unwrap_or_else(|_| panic!("{name}: a number")))
        .unwrap_or(default)
}

fn pct(v: &mut [Duration], p: f64) -> f64 {
    v.sort();
    let i = ((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1;
    v[i].as_secs_f64() * 1000.0
}

fn row(name: &str, v: &mut [Duration]) {
    let max = v.iter().max().copied().unwrap_or_default().as_secs_f64() * 1000.0;
    println!(
        "| {name} | {} | {:.3} | {:.3} | {:.3} |",
        v.len(),
        pct(v, 0.5),
        pct(v, 0.99),
        max
    );
}

fn main() {
    let nodes = arg("--nodes", 10_000);
    let queued = arg("--queued", 10_000);
    let samples = arg("--samples", 300);
    let reservations = arg("--reservations", 50_000);
    let mut rng = StdRng::seed_from_u64(16);

    println!("| operation | samples | p50 ms | p99 ms | max ms |");
    println!("|---|---|---|---|---|");
    let cases: Vec<bool> = match arg("--known", 2) {
        0 => vec![false],
        1 => vec![true],
        _ => vec![false, true],
    };
    for known in cases {
        let cluster = Cluster::new(Duration::from_secs(365 * 86_400));
        for n in 0..nodes {
            let name = format!("n{n:05}");
            let inv = plain_node(&name, 8, MODELS[n % 2]);
            cluster.ingest(&name, inv, T0).expect("ingest");
        }
        cluster.ledger().rebuild([]);
        // Every GPU held by a one-GPU server.
        let mut running: Vec<Holder> = Vec::with_capacity(nodes * 8);
        for n in 0..nodes {
            for i in 0..8 {
                let h = Holder::new(&format!("u{}", (n * 8 + i) % 1000), &format!("s{n}-{i}"));
                let uuid = format!("GPU-n{n:05}-{i}");
                let c = cluster
                    .claim(
                        h.clone(),
                        &DeviceRequest::Exact(vec![uuid]),
                        None,
                        T0,
                        &Default::default(),
                    )
                    .expect("fill");
                cluster.ledger().commit(c.id).expect("commit");
                running.push(h);
            }
        }
        let mut known_ends = KnownEnds::default();
        if known {
            for n in 0..nodes {
                for i in 0..8u64 {
                    let end = T0 + 3_600_000 + (n as u64 * 8 + i) * 1000;
                    known_ends.insert(&format!("n{n:05}"), &format!("GPU-n{n:05}-{i}"), end);
                }
            }
        }
        let mut waiting: Vec<Waiting> = (0..queued)
            .map(|q| Waiting {
                holder: Holder::new(&format!("w{}", q % 500), &format!("q{q}")),
                request: DeviceRequest::Gpus {
                    count: [1, 2, 4, 8][q % 4],
                    model: match q % 3 {
                        0 => None,
                        m => Some(MODELS[m - 1].to_owned()),
                    },
                },
                max_devices: None,
            })
            .collect();
        let mut times = Vec::with_capacity(samples);
        let mut started = 0usize;
        for _ in 0..samples {
            let k = rng.random_range(0..running.len());
            let h = running.swap_remove(k);
            cluster.ledger().release(&h);
            let t = Instant::now();
            // What the service runs: after a release, a round without estimates; the
            // periodic one (every 10 s) refreshes them.
            let estimates = if known { 1_000 } else { 0 };
            let round = cluster.decide(&waiting, T0, &known_ends, estimates);
            times.push(t.elapsed());
            let mut keep = Vec::with_capacity(waiting.len());
            for (w, o) in waiting.into_iter().zip(round.outcomes) {
                match o {
                    Outcome::Start(c) => {
                        cluster.ledger().commit(c.id).expect("commit");
                        running.push(w.holder);
                        started += 1;
                    }
                    _ => keep.push(w),
                }
            }
            waiting = keep;
        }
        let name = if known {
            format!(
                "periodic round with estimates, every GPU's end known ({} GPUs, {} queued; {started} started)",
                nodes * 8,
                waiting.len()
            )
        } else {
            format!(
                "decide after one GPU frees ({} GPUs, {} queued; {started} started)",
                nodes * 8,
                waiting.len()
            )
        };
        row(&name, &mut times);
    }

    // Conflict checks over a week.
    let cluster = Cluster::new(Duration::from_secs(3600));
    let week = 7 * 86_400_000u64;
    let mut inserted = 0;
    for i in 0..reservations {
        let n = rng.random_range(0..nodes);
        let g = rng.random_range(0..8);
        let start = T0 + rng.random_range(0..4 * week);
        let len = rng.random_range(1..=8) * 3_600_000;
        let r = Reservation {
            id: format!("r-{i:016x}"),
            owner: format!("u{}", i % 1000),
            node: format!("n{n:05}"),
            devices: vec![format!("GPU-n{n:05}-{g}")],
            start_ms: start,
            end_ms: start + len,
            note: String::new(),
            maintenance: false,
            created_at_ms: T0,
            created_by: String::new(),
            used: false,
        };
        inserted += usize::from(cluster.calendar().insert(r).is_ok());
    }
    let mut times = Vec::with_capacity(samples * 10);
    let mut found = 0;
    for _ in 0..samples * 10 {
        let n = rng.random_range(0..nodes);
        let devices: Vec<String> = (0..8).map(|g| format!("GPU-n{n:05}-{g}")).collect();
        let start = T0 + rng.random_range(0..3 * week);
        let t = Instant::now();
        let c = cluster.calendar().conflicts(&devices, start, start + week);
        times.push(t.elapsed());
        found += c.len();
    }
    row(
        &format!(
            "conflict check, 8 GPUs over one week ({inserted} windows booked; {found} conflicts found)"
        ),
        &mut times,
    );
}
