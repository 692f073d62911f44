//! The aggregator reading node figures and history from a real Prometheus that scrapes
//! a real agent (simulated GPUs), and degrading when Prometheus goes away.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kcloud_testkit::{free_port, require_tool};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::app::{ADMIN_PW, AGENT_TOKEN, TestApp};

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn start_app(prometheus: Option<&str>) -> TestApp {
    let mut args = vec![
        "--local-agent",
        "off",
        "--agent-heartbeat",
        "1s",
        "--prometheus-refresh",
        "1s",
        "--prometheus-timeout",
        "500ms",
    ];
    if let Some(url) = prometheus {
        args.extend(["--prometheus-url", url]);
    }
    TestApp::builder().args(args).start().await
}

async fn get(base: &str, token: &str, path: &str) -> (u16, Value) {
    let r = reqwest::Client::new()
        .get(format!("{base}{path}"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn wait_for<F, Fut>(within: Duration, what: &str, mut check: F) -> Value
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<Value>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_figures_and_history_come_from_prometheus_and_degrade_without_it() {
    let prometheus_bin = require_tool("prometheus");
    let dir = tempfile::tempdir().unwrap();
    let prom_port = free_port();
    let prom_url = format!("http://127.0.0.1:{prom_port}");
    let app = start_app(Some(&prom_url)).await;
    let base = app.base.clone();
    let token = app.token("admin", ADMIN_PW).await;

    // A real agent: simulated GPUs, pushing to the aggregator, scraped by Prometheus.
    let agent_port = free_port();
    let agent_config = <kcloud_agent::Config as clap::Parser>::try_parse_from([
        "kcloud-agent",
        "--node-name",
        "dgx-1",
        "--listen",
        &format!("127.0.0.1:{agent_port}"),
        "--simulate",
        "dgx-a100-mig",
        "--interval",
        "500ms",
        "--aggregator-url",
        &base,
        "--agent-token-file",
        app.dir.path().join("agent-token").to_str().unwrap(),
    ])
    .unwrap();
    let agent_stop = CancellationToken::new();
    let agent = tokio::spawn(kcloud_agent::run(agent_config, agent_stop.clone()));

    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!("global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: kcloud-agent\n    static_configs:\n      - targets: ['127.0.0.1:{agent_port}']\n"),
    )
    .unwrap();
    let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
    let prom = Killed(
        Command::new(prometheus_bin)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start prometheus"),
    );

    let node = wait_for(
        Duration::from_secs(60),
        "node figures from Prometheus",
        || {
            let (base, token) = (base.clone(), token.clone());
            async move {
                let (status, body) = get(&base, &token, "/api/v1/nodes/dgx-1").await;
                (status == 200
                    && body["metrics"]["source"] == "prometheus"
                    && !body["metrics"]["gpu_utilization_percent"].is_null())
                .then_some(body)
            }
        },
    )
    .await;
    let m = &node["metrics"];
    assert_eq!(
        m["cpu_count"].as_f64(),
        node["host"]["cpu_count"].as_f64(),
        "{node}"
    );
    assert!(m["memory_total_bytes"].as_f64().unwrap() > 0.0);
    let ratio = m["cpu_utilization_ratio"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&ratio));
    let gpu = m["gpu_utilization_percent"].as_f64().unwrap();
    assert!((0.0..=100.0).contains(&gpu));
    assert_eq!(node["simulated"], true);

    let history = wait_for(Duration::from_secs(30), "GPU utilization history", || {
        let (base, token) = (base.clone(), token.clone());
        async move {
            let (status, body) = get(
                &base,
                &token,
                "/api/v1/nodes/dgx-1/history?metric=gpu_utilization&range=5m",
            )
            .await;
            (status == 200 && !body["points"].as_array()?.is_empty()).then_some(body)
        }
    })
    .await;
    assert_eq!(history["metric"], "gpu_utilization");
    for p in history["points"].as_array().unwrap() {
        let v = p[1].as_f64().unwrap();
        assert!((0.0..=100.0).contains(&v), "{p}");
    }
    let (status, cpu) = get(
        &base,
        &token,
        "/api/v1/nodes/dgx-1/history?metric=cpu&range=15m",
    )
    .await;
    assert_eq!(status, 200, "{cpu}");

    for (path, want) in [
        ("/api/v1/nodes/dgx-1/history?metric=temperature", 400),
        ("/api/v1/nodes/dgx-1/history?metric=cpu&range=forever", 400),
        ("/api/v1/nodes/dgx-1/history?metric=cpu&range=30d", 400),
        ("/api/v1/nodes/nope/history?metric=cpu", 404),
    ] {
        let (status, body) = get(&base, &token, path).await;
        assert_eq!(status, want, "{path}: {body}");
        assert!(body["error"]["code"].is_string());
    }

    // Prometheus goes away: node figures fall back to the agents' pushes, the API keeps
    // answering, and history says 503 within the query timeout.
    drop(prom);
    let node = wait_for(Duration::from_secs(20), "fallback to agent figures", || {
        let (base, token) = (base.clone(), token.clone());
        async move {
            let (status, body) = get(&base, &token, "/api/v1/nodes/dgx-1").await;
            (status == 200 && body["metrics"]["source"] == "agent").then_some(body)
        }
    })
    .await;
    assert!(node["metrics"]["memory_total_bytes"].as_f64().unwrap() > 0.0);
    let started = Instant::now();
    let (status, body) = get(&base, &token, "/api/v1/nodes/dgx-1/history?metric=cpu").await;
    assert_eq!(status, 503, "{body}");
    assert!(started.elapsed() < Duration::from_secs(10));
    let (status, _) = get(&base, &token, "/api/v1/gpus?node=dgx-1").await;
    assert_eq!(status, 200);

    agent_stop.cancel();
    agent.await.unwrap().unwrap();
    drop(app);
}

#[tokio::test]
async fn without_prometheus_figures_come_from_agents_and_history_is_unavailable() {
    let app = start_app(None).await;
    let base = app.base.clone();
    let token = app.token("admin", ADMIN_PW).await;
    let inv = json!({
        "node": "n1", "boot_id": "b", "seq": 1, "agent_version": "0", "collected_at_ms": kcloud_core::now_ms(),
        "nvml": {"up": false}, "gpus": [],
        "host": {"hostname": "n1", "cpu_count": 32, "cpu_utilization_percent": 50.0, "memory_total_bytes": 1000,
                 "memory_used_bytes": 250, "load_average": [0.0, 0.0, 0.0], "uptime_seconds": 1}
    });
    let r = reqwest::Client::new()
        .put(format!("{base}/api/v1/nodes/n1/inventory"))
        .bearer_auth(AGENT_TOKEN)
        .json(&inv)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (_, node) = get(&base, &token, "/api/v1/nodes/n1").await;
    assert_eq!(
        node["metrics"],
        json!({"source": "agent", "cpu_count": 32.0, "cpu_utilization_ratio": 0.5,
        "memory_total_bytes": 1000.0, "memory_used_bytes": 250.0})
    );
    let (status, body) = get(&base, &token, "/api/v1/nodes/n1/history?metric=memory").await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("--prometheus-url")
    );
    drop(app);
}
