//! Benchmark of the usage report (issue 17): a year of history for `--users` users
//! (default 1,000) on `--nodes` nodes of 8 GPUs (default 10,000: 80,000 devices),
//! then `--samples` reports of one month grouped by user, model, node and day, timed
//! as `UsageRepo::usage` (what `GET /api/v1/usage` runs).
//!
//! History: every day, every node's 8 GPUs are held by two users (4 each, chosen at
//! random): 20,000 day rows per day, 7.3 million for the year, written straight into
//! the daily table (as closing intervals would). Plus 1,000 open intervals.
//!
//! Usage: cargo run --release -p kcloud-store --example bench_usage --
//!          [--users 1000] [--nodes 10000] [--days 365] [--samples 50]

use std::time::{Duration, Instant};

use kcloud_core::repo::UsageRepo;
use kcloud_core::usage::{DAY_MS, GroupBy, UsageInterval, day_of};
use kcloud_store::Store;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

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

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let users = arg("--users", 1000);
    let nodes = arg("--nodes", 10_000);
    let days = arg("--days", 365) as u64;
    let samples = arg("--samples", 50);
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("kcloud.db");
    let store = Store::open(&path).expect("store");
    let now = kcloud_core::now_ms();
    let today = day_of(now);
    let first = today - days + 1;

    let t = Instant::now();
    {
        let mut conn = rusqlite::Connection::open(&path).expect("db");
        conn.pragma_update(None, "synchronous", "OFF")
            .expect("pragma");
        let mut rng = StdRng::seed_from_u64(17);
        // A transaction per day keeps the WAL small; the roll-ups are what closing
        // intervals adds to them (sums per day and dimension).
        for day in first..=today {
            let tx = conn.transaction().expect("tx");
            {
                let mut stmt = tx
                    .prepare_cached(
                        "INSERT INTO usage_daily (day, user_name, model, profile, node, gpu_hours, recovered)
                         VALUES (?1, ?2, ?3, '', ?4, ?5, 0)
                         ON CONFLICT DO UPDATE SET gpu_hours = gpu_hours + excluded.gpu_hours",
                    )
                    .expect("prepare");
                for n in 0..nodes {
                    let model = if n % 2 == 0 {
                        "NVIDIA A100-SXM4-80GB"
                    } else {
                        "NVIDIA H100 80GB HBM3"
                    };
                    let node = format!("n{n:05}");
                    for _ in 0..2 {
                        let u = format!("user{:04}", rng.random_range(0..users));
                        stmt.execute(rusqlite::params![day as i64, u, model, node, 4.0 * 12.0])
                            .expect("insert");
                    }
                }
            }
            for (table, col) in [
                ("usage_by_user", "user_name"),
                ("usage_by_model", "model"),
                ("usage_by_node", "node"),
            ] {
                tx.execute(
                    &format!(
                        "INSERT INTO {table} (day, {col}, gpu_hours, recovered)
                         SELECT day, {col}, SUM(gpu_hours), MAX(recovered) FROM usage_daily
                         WHERE day = ?1 GROUP BY day, {col}"
                    ),
                    [day as i64],
                )
                .expect("roll-up");
            }
            tx.commit().expect("commit");
        }
    }
    let rows_written = (days as usize) * nodes * 2;
    println!(
        "history: {rows_written} day rows written in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let open: Vec<UsageInterval> = (0..1000)
        .map(|i| UsageInterval {
            server_id: format!("s{i}"),
            user: format!("user{:04}", i % users),
            server: format!("s{i}"),
            device: format!("GPU-open-{i}"),
            kind: "gpu".into(),
            model: "NVIDIA A100-SXM4-80GB".into(),
            profile: String::new(),
            node: format!("n{:05}", i % nodes),
            weight: 1.0,
            start_ms: now - 3 * DAY_MS,
        })
        .collect();
    store.open_usage(open).await.expect("open");

    println!(
        "| report (one month, {users} users, {} devices, {days} days of history) | samples | p50 ms | p99 ms | rows |",
        nodes * 8
    );
    println!("|---|---|---|---|---|");
    for g in [GroupBy::User, GroupBy::Model, GroupBy::Node, GroupBy::Day] {
        let mut times = Vec::with_capacity(samples);
        let mut n = 0;
        for _ in 0..samples {
            let t = Instant::now();
            let r = store
                .usage(today - 29, today + 1, g, None, now)
                .await
                .expect("usage");
            times.push(t.elapsed());
            n = r.len();
        }
        println!(
            "| group_by={} | {samples} | {:.1} | {:.1} | {n} |",
            g.column(),
            pct(&mut times, 0.5),
            pct(&mut times, 0.99)
        );
    }
    let mut times = Vec::with_capacity(samples);
    for i in 0..samples {
        let u = format!("user{:04}", i % users);
        let t = Instant::now();
        store
            .usage(today - 29, today + 1, GroupBy::Day, Some(u), now)
            .await
            .expect("usage");
        times.push(t.elapsed());
    }
    println!(
        "| one user's month, group_by=day | {samples} | {:.1} | {:.1} | 30 |",
        pct(&mut times, 0.5),
        pct(&mut times, 0.99)
    );
}
