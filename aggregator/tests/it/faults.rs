//! SIGKILL fault test (issue 4): the real `kcloud-aggregator` binary, local shape with
//! simulated MIG devices, is killed with SIGKILL at random moments while creates and
//! deletes are in flight, and restarted each time. After every restart and at the end
//! the API and the OS must agree:
//!
//! 1. no device is held by two servers;
//! 2. every held device belongs to a server that exists and has not failed, and every
//!    server that has not failed is shown holding its devices (no leak);
//! 3. every server the API answered 201 for is running or failed with a reason, unless
//!    a delete the API answered 204 for (or one cut short by the kill) removed it; none
//!    stays pending;
//! 4. every process of this test's servers (by the owner, name and incarnation every
//!    server process carries) belongs to a server
//!    the API lists as running, one incarnation per server; none after the end.
//!
//! Cycles: `KCLOUD_FAULT_CYCLES` (default 20, for CI); the full run is
//! `KCLOUD_FAULT_CYCLES=200 cargo nextest run -p kcloud-aggregator --test faults`.
//! The RNG seed is printed; `KCLOUD_FAULT_SEED` replays a run's choices (the kill
//! moments still depend on timing). Most servers are a cheap `python3 -m http.server`;
//! every tenth cycle also starts a real JupyterLab (`pip install jupyterlab`).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use std::time::{Duration, Instant};

use kcloud_testkit::process::AggregatorProcess;
use kcloud_testkit::require_tool;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use reqwest::StatusCode;
use serde_json::{Value, json};

const ADMIN_PW: &str = "admin-password-for-faults";
/// The bootstrap admin, whose servers these are: a name no other test uses, so that
/// server processes are told apart by their owner.
const USER: &str = "faultadmin";
/// Server names are drawn from a small pool, so that creates collide with live names
/// and new incarnations reuse the directories of deleted ones.
const NAMES: usize = 8;
/// A pending server must be running or failed within this (a JupyterLab start on two
/// busy cores included).
const SETTLE: Duration = Duration::from_secs(120);

/// The aggregator process and everything it started: killed when the test ends, also
/// when it fails half-way.
struct Harness {
    p: AggregatorProcess,
}

impl Drop for Harness {
    fn drop(&mut self) {
        for p in server_processes() {
            if let Some(pid) = rustix::process::Pid::from_raw(p.pid) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            }
        }
    }
}

impl Harness {
    fn base(&self) -> String {
        self.p.base()
    }

    fn spawn(&mut self) {
        self.p.spawn();
    }

    fn sigkill(&mut self) {
        self.p.sigkill();
    }

    fn sigterm(&mut self) {
        let (status, out) = self.p.sigterm();
        assert!(status.success(), "clean exit on SIGTERM: {status}\n{out}");
    }

    /// Waits for `/readyz` and the embedded agent's first inventory.
    async fn ready(&mut self, http: &reqwest::Client, token: Option<&str>) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let up = match http.get(format!("{}/readyz", self.base())).send().await {
                Ok(r) if r.status().is_success() => match token {
                    None => true,
                    Some(t) => gpus(http, &self.base(), t)
                        .await
                        .is_some_and(|g| !g.is_empty()),
                },
                _ => false,
            };
            if up {
                return;
            }
            self.p.assert_running();
            assert!(Instant::now() < deadline, "not ready\n{}", self.p.output());
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

/// A live process of one of [`USER`]'s servers: its name and incarnation (id).
#[derive(Debug)]
struct ServerProcess {
    pid: i32,
    id: String,
    name: String,
}

fn server_processes() -> Vec<ServerProcess> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // Zombies are gone for this purpose.
        if matches!(
            stat.rfind(')')
                .and_then(|i| stat[i + 1..].split_whitespace().next()),
            Some("Z" | "X")
        ) {
            continue;
        }
        // Every process of a server carries its owner, name and incarnation (sandboxed
        // ones too, whose cwd and process group are their sandbox's).
        let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else {
            continue;
        };
        let var = |key: &str| {
            env.split(|b| *b == 0)
                .find_map(|kv| kv.strip_prefix(format!("{key}=").as_bytes()))
                .map(|v| String::from_utf8_lossy(v).into_owned())
        };
        let (Some(USER), Some(name), Some(id)) = (
            var("KCLOUD_USER").as_deref(),
            var("KCLOUD_SERVER"),
            var("KCLOUD_SERVER_ID"),
        ) else {
            continue;
        };
        out.push(ServerProcess { pid, id, name });
    }
    out
}

async fn free_devices(http: &reqwest::Client, base: &str, token: &str) -> Vec<String> {
    gpus(http, base, token)
        .await
        .unwrap_or_default()
        .iter()
        .filter(|g| g["available"] == true && g["kind"] == "mig")
        .filter_map(|g| g["uuid"].as_str().map(str::to_owned))
        .collect()
}

async fn gpus(http: &reqwest::Client, base: &str, token: &str) -> Option<Vec<Value>> {
    let r = http
        .get(format!("{base}/api/v1/gpus?limit=1000"))
        .bearer_auth(token)
        .send()
        .await
        .ok()?;
    let v: Value = r.json().await.ok()?;
    v["items"].as_array().cloned()
}

async fn servers(http: &reqwest::Client, base: &str, token: &str) -> Vec<Value> {
    let r = http
        .get(format!("{base}/api/v1/users/{USER}/servers"))
        .bearer_auth(token)
        .send()
        .await
        .expect("list servers");
    assert_eq!(r.status(), StatusCode::OK);
    r.json::<Vec<Value>>().await.expect("server list")
}

/// One server incarnation: its name and creation time (the API shows no id).
type Incarnation = (String, u64);

fn incarnation(s: &Value) -> Incarnation {
    (
        s["name"].as_str().unwrap().to_owned(),
        s["created_at_ms"].as_u64().unwrap(),
    )
}

/// What the test learnt from the API about one incarnation it was told of.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Fate {
    /// Answered 201: must be there.
    Created,
    /// A delete answered 204: must be gone.
    Deleted,
    /// A delete was in flight when the aggregator died: either.
    MaybeDeleted,
}

enum Op {
    Create { name: String, jupyter: bool },
    Delete(Incarnation),
}

enum Outcome {
    /// Answered 201; whether it is a JupyterLab.
    Created(Incarnation, bool),
    Deleted(Incarnation),
    /// The connection died with the aggregator: no answer.
    Cut(Option<Incarnation>),
    /// An answer that changes nothing (409 name or device taken, 404 gone).
    Refused,
    Unexpected(String),
}

async fn run_op(
    http: reqwest::Client,
    base: String,
    token: String,
    op: Op,
    device: String,
) -> Outcome {
    match op {
        Op::Create { name, jupyter } => {
            let mut body = json!({"name": name, "devices": [device]});
            if !jupyter {
                body["command"] = json!([
                    "python3",
                    "-m",
                    "http.server",
                    "{port}",
                    "--bind",
                    "127.0.0.1"
                ]);
            }
            let r = http
                .post(format!("{base}/api/v1/users/{USER}/servers"))
                .bearer_auth(&token)
                .json(&body)
                .send()
                .await;
            let Ok(r) = r else { return Outcome::Cut(None) };
            let status = r.status();
            let Ok(v) = r.json::<Value>().await else {
                return Outcome::Cut(None);
            };
            match status {
                StatusCode::CREATED => Outcome::Created(incarnation(&v), jupyter),
                StatusCode::CONFLICT => Outcome::Refused,
                s => Outcome::Unexpected(format!("create {name}: {s} {v}")),
            }
        }
        Op::Delete(inc) => {
            let r = http
                .delete(format!("{base}/api/v1/users/{USER}/servers/{}", inc.0))
                .bearer_auth(&token)
                .send()
                .await;
            let Ok(r) = r else {
                return Outcome::Cut(Some(inc));
            };
            match r.status() {
                StatusCode::NO_CONTENT => Outcome::Deleted(inc),
                StatusCode::NOT_FOUND => Outcome::Refused,
                s => Outcome::Unexpected(format!(
                    "delete {}: {s} {}",
                    inc.0,
                    r.text().await.unwrap_or_default()
                )),
            }
        }
    }
}

/// Waits until no server is pending (or `SETTLE` passes), then checks the invariants;
/// returns the violations found.
async fn check(
    h: &Harness,
    http: &reqwest::Client,
    token: &str,
    told: &BTreeMap<Incarnation, Fate>,
    when: &str,
) -> Vec<String> {
    let base = h.base();
    let deadline = Instant::now() + SETTLE;
    let list = loop {
        let list = servers(http, &base, token).await;
        if list.iter().all(|s| s["status"] != "pending") || Instant::now() > deadline {
            break list;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut bad = Vec::new();
    let mut v = |m: String| bad.push(format!("{when}: {m}"));

    let by_name: HashMap<&str, &Value> = list
        .iter()
        .map(|s| (s["name"].as_str().unwrap(), s))
        .collect();
    // (3) what the API said happened did.
    let present: BTreeSet<Incarnation> = list.iter().map(incarnation).collect();
    for (inc, fate) in told {
        let here = present.contains(inc);
        match fate {
            Fate::Created if !here => v(format!("server {inc:?} was created (201) and is gone")),
            Fate::Deleted if here => v(format!("server {inc:?} was deleted (204) and is back")),
            _ => {}
        }
    }
    for s in &list {
        match s["status"].as_str().unwrap() {
            "running" => {}
            "failed" if s["reason"].as_str().is_some_and(|r| !r.is_empty()) => {}
            other => v(format!(
                "server {} is {other} after {SETTLE:?}: {s}",
                s["name"]
            )),
        }
    }

    // (1) and (2): the ledger as `GET /api/v1/gpus` shows it against the servers.
    let devices = gpus(http, &base, token).await.unwrap_or_default();
    let mut holder_of: HashMap<&str, String> = HashMap::new();
    for d in &devices {
        if let Some(server) = d["holder"]["server"].as_str() {
            let uuid = d["uuid"].as_str().unwrap();
            holder_of.insert(uuid, server.to_owned());
            match by_name.get(server) {
                None => v(format!(
                    "{uuid} is held by {server}, which does not exist (leak)"
                )),
                Some(s) if s["status"] == "failed" => {
                    v(format!("{uuid} is held by failed server {server} (leak)"))
                }
                Some(_) => {}
            }
            if d["available"] == true {
                v(format!("{uuid} is held by {server} and shown available"));
            }
        }
    }
    let mut owner_of: HashMap<&str, &str> = HashMap::new();
    for s in list.iter().filter(|s| s["status"] != "failed") {
        let name = s["name"].as_str().unwrap();
        for d in s["devices"].as_array().unwrap() {
            let d = d.as_str().unwrap();
            if let Some(other) = owner_of.insert(d, name) {
                v(format!("{d} is given to both {other} and {name}"));
            }
            if holder_of.get(d).map(String::as_str) != Some(name) {
                v(format!(
                    "{name} runs on {d} but the ledger shows it held by {:?}",
                    holder_of.get(d)
                ));
            }
        }
    }

    // (4) processes against the servers that should have them.
    let mut groups: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for p in server_processes() {
        groups
            .entry(p.name.clone())
            .or_default()
            .insert(p.id.clone());
        match by_name.get(p.name.as_str()) {
            Some(s) if s["status"] == "running" => {}
            Some(s) => v(format!(
                "orphan: process {} of {} server {}",
                p.pid, s["status"], p.name
            )),
            None => v(format!(
                "orphan: process {} of deleted server {}",
                p.pid, p.name
            )),
        }
    }
    for (name, g) in groups.iter().filter(|(_, g)| g.len() > 1) {
        v(format!(
            "orphan: {name} has processes of {} incarnations {g:?}",
            g.len()
        ));
    }
    for s in list.iter().filter(|s| s["status"] == "running") {
        let name = s["name"].as_str().unwrap();
        if !groups.contains_key(name) {
            v(format!("{name} is shown running without a process"));
        }
    }
    bad
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_creates_and_deletes_leaks_nothing() {
    require_tool("python3");
    require_tool("jupyter-lab");
    let cycles: usize = std::env::var("KCLOUD_FAULT_CYCLES")
        .ok()
        .map(|c| c.parse().expect("KCLOUD_FAULT_CYCLES: a number"))
        .unwrap_or(20);
    let seed: u64 = std::env::var("KCLOUD_FAULT_SEED")
        .ok()
        .map(|s| s.parse().expect("KCLOUD_FAULT_SEED: a number"))
        .unwrap_or_else(rand::random);
    println!("KCLOUD_FAULT_SEED={seed} KCLOUD_FAULT_CYCLES={cycles}");
    let mut rng = StdRng::seed_from_u64(seed);
    let started = Instant::now();

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("kcloud.toml");
    std::fs::write(
        &config,
        "[default_quota]\ngpus = 64\nservers = 64\ncpu_millis = 1000000\nmemory_bytes = 1099511627776\n",
    )
    .unwrap();
    let data = dir.path().join("data");
    let p = AggregatorProcess::new(env!("CARGO_BIN_EXE_kcloud-aggregator"), &data)
        .args(["--config", config.to_str().unwrap()])
        .args(["--simulate", "dgx-a100-mig", "--stop-grace", "2s"])
        .env("KCLOUD_BOOTSTRAP_ADMIN_USER", USER)
        .env("KCLOUD_BOOTSTRAP_ADMIN_PASSWORD", ADMIN_PW)
        .env("RUST_LOG", "info")
        .log_to(&dir.path().join("aggregator.log"));
    let mut h = Harness { p };
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    h.spawn();
    h.ready(&http, None).await;
    let r = http
        .post(format!("{}/api/v1/auth/login", h.base()))
        .json(&json!({"username": USER, "password": ADMIN_PW}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    // The signing key is kept in the data dir: the token outlives restarts.
    let token = r.json::<Value>().await.unwrap()["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    h.ready(&http, Some(&token)).await;

    let mut told: BTreeMap<Incarnation, Fate> = BTreeMap::new();
    let mut violations: Vec<String> = Vec::new();
    let (mut kills, mut startup_kills, mut created, mut deleted, mut labs, mut cut) =
        (0, 0, 0, 0, 0, 0);
    for cycle in 0..cycles {
        let base = h.base();
        let live: Vec<Value> = servers(&http, &base, &token).await;
        let free = free_devices(&http, &base, &token).await;
        let all: Vec<String> = gpus(&http, &base, &token)
            .await
            .unwrap_or_default()
            .iter()
            .filter(|g| g["kind"] == "mig")
            .filter_map(|g| g["uuid"].as_str().map(str::to_owned))
            .collect();
        let n = rng.random_range(2..=5);
        let mut tasks = Vec::new();
        // Deletes go by name: a name deleted in this cycle is not also created or
        // deleted twice, so that each answer says which incarnation it was about.
        let mut deleting: BTreeSet<String> = BTreeSet::new();
        for k in 0..n {
            let targets: Vec<&Value> = live
                .iter()
                .filter(|s| !deleting.contains(s["name"].as_str().unwrap()))
                .collect();
            let delete = k > 0 && !targets.is_empty() && rng.random_bool(0.45);
            let op = if delete {
                let inc = incarnation(targets[rng.random_range(0..targets.len())]);
                deleting.insert(inc.0.clone());
                Op::Delete(inc)
            } else {
                let jupyter = k == 0 && cycle % 10 == 1;
                // A JupyterLab gets a free name, so that it is really started.
                let names: Vec<String> = (0..NAMES)
                    .map(|i| format!("s{i}"))
                    .filter(|n| !deleting.contains(n))
                    .filter(|n| !jupyter || live.iter().all(|s| s["name"] != n.as_str()))
                    .collect();
                Op::Create {
                    name: names[rng.random_range(0..names.len())].clone(),
                    jupyter: k == 0 && cycle % 10 == 1,
                }
            };
            // Mostly a free device; sometimes a taken one, which must be refused.
            let pool = if free.is_empty() || rng.random_bool(0.1) {
                &all
            } else {
                &free
            };
            let device = pool[rng.random_range(0..pool.len())].clone();
            tasks.push(tokio::spawn(run_op(
                http.clone(),
                base.clone(),
                token.clone(),
                op,
                device,
            )));
        }
        // Creates answer in milliseconds, deletes after the server stops: most kills
        // land early, some late.
        let delay = if cycle % 10 == 1 {
            // Late enough for the JupyterLab's 201, early enough to catch it starting.
            rng.random_range(150..600)
        } else if rng.random_bool(0.6) {
            rng.random_range(0..40)
        } else {
            rng.random_range(0..400)
        };
        tokio::time::sleep(Duration::from_millis(delay)).await;
        h.sigkill();
        kills += 1;
        for t in tasks {
            match t.await.unwrap() {
                Outcome::Created(inc, jupyter) => {
                    created += 1;
                    labs += usize::from(jupyter);
                    told.insert(inc, Fate::Created);
                }
                Outcome::Deleted(inc) => {
                    deleted += 1;
                    told.insert(inc, Fate::Deleted);
                }
                Outcome::Cut(inc) => {
                    cut += 1;
                    if let Some(inc) = inc {
                        told.entry(inc)
                            .and_modify(|f| *f = Fate::MaybeDeleted)
                            .or_insert(Fate::MaybeDeleted);
                    }
                }
                Outcome::Refused => {}
                Outcome::Unexpected(m) => violations.push(format!("cycle {cycle}: {m}")),
            }
        }
        // Sometimes the restart itself is cut short, in the middle of its recovery.
        if rng.random_bool(0.15) {
            h.spawn();
            tokio::time::sleep(Duration::from_millis(rng.random_range(0..150))).await;
            h.sigkill();
            startup_kills += 1;
        }
        h.spawn();
        h.ready(&http, Some(&token)).await;
        violations.extend(check(&h, &http, &token, &told, &format!("cycle {cycle}")).await);
        if !violations.is_empty() {
            break;
        }
    }

    // The end: delete everything, then stop; nothing may be left running.
    if violations.is_empty() {
        for s in servers(&http, &h.base(), &token).await {
            let name = s["name"].as_str().unwrap();
            let r = http
                .delete(format!("{}/api/v1/users/{USER}/servers/{name}", h.base()))
                .bearer_auth(&token)
                .send()
                .await
                .unwrap();
            if r.status() != StatusCode::NO_CONTENT {
                violations.push(format!("final delete of {name}: {}", r.status()));
            }
            told.insert(incarnation(&s), Fate::Deleted);
        }
        violations.extend(check(&h, &http, &token, &told, "after deleting all").await);
        let held: Vec<Value> = gpus(&http, &h.base(), &token)
            .await
            .unwrap_or_default()
            .into_iter()
            .filter(|g| !g["holder"].is_null())
            .collect();
        if !held.is_empty() {
            violations.push(format!("devices still held after deleting all: {held:?}"));
        }
        h.sigterm();
        let left = server_processes();
        if !left.is_empty() {
            violations.push(format!("processes left after the end: {left:?}"));
        }
    }
    println!(
        "fault run: seed {seed}, {cycles} cycles, {kills} SIGKILLs during requests + \
         {startup_kills} during recovery, {created} servers created (201; {labs} JupyterLab), \
         {deleted} deleted (204), {cut} requests cut by a kill, {} violations, {:.1} s",
        violations.len(),
        started.elapsed().as_secs_f64()
    );
    if !violations.is_empty() {
        // Kept for a post-mortem: the aggregator's log and each server's.
        let kept = dir.keep();
        println!("data dir and aggregator.log kept in {}", kept.display());
    }
    assert!(
        violations.is_empty(),
        "seed {seed}:\n{}\n--- aggregator log tail ---\n{}",
        violations.join("\n"),
        h.p.output()
    );
}
