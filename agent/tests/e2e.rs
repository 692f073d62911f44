//! The real `kcloud-agent` binary with simulated GPUs, against real peers: promtool,
//! a real Prometheus, and an HTTP server standing in for the aggregator's inventory
//! endpoint.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::put;
use common::*;
use kcloud_common::NodeInventory;

#[tokio::test]
async fn exposition_passes_promtool_and_has_dcgm_series() {
    let dir = tempfile::tempdir().unwrap();
    let agent = start_agent(
        dir.path(),
        &["--simulate", "dgx-a100-mig", "--interval", "200ms"],
    )
    .await;
    let text = get_text(&agent.url("/metrics")).await;

    let complaints = promtool_complaints(&text);
    assert!(complaints.is_empty(), "promtool: {complaints:#?}");

    // 4 whole GPUs report utilization; MIG-mode GPUs do not (NVML does not either).
    assert_eq!(
        text.lines()
            .filter(|l| l.starts_with("DCGM_FI_DEV_GPU_UTIL{"))
            .count(),
        4
    );
    // 8 GPUs + 7 + 4 + 2 + 4 MIG instances of frame-buffer usage.
    assert_eq!(
        text.lines()
            .filter(|l| l.starts_with("DCGM_FI_DEV_FB_USED{"))
            .count(),
        8 + 17
    );
    assert!(text.contains(r#"GPU_I_PROFILE="3g.40gb""#));
    assert!(text.contains(r#"modelName="NVIDIA A100-SXM4-80GB""#));
    assert!(text.contains(r#"device="nvidia7""#));
    assert!(text.contains(r#"Hostname="node-a""#));
    assert_eq!(
        text.lines()
            .filter(|l| l.starts_with("kcloud_mig_instance_info{"))
            .count(),
        17
    );
    assert!(text.contains("kcloud_simulated 1"));
    assert!(text.contains(r#"simulated="true""#));
    assert!(
        text.lines()
            .any(|l| l.starts_with("kcloud_host_memory_total_bytes{"))
    );
}

#[tokio::test]
async fn sigterm_stops_the_agent_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let mut agent = start_agent(dir.path(), &["--simulate", "dgx-h100"]).await;
    let status = agent.terminate(Duration::from_secs(5));
    assert!(status.success(), "exit status {status}");
}

#[tokio::test]
async fn prometheus_scrapes_the_agent_with_dcgm_labels() {
    let prometheus = require_tool("prometheus");
    let dir = tempfile::tempdir().unwrap();
    let agent = start_agent(
        dir.path(),
        &["--simulate", "dgx-a100-mig", "--interval", "200ms"],
    )
    .await;
    let inventory: NodeInventory =
        serde_json::from_str(&get_text(&agent.url("/inventory")).await).unwrap();

    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: kcloud-agent\n    static_configs:\n      - targets: ['{}']\n",
            agent.addr
        ),
    )
    .unwrap();
    let port = free_port();
    let log = dir.path().join("prometheus.log");
    let child = std::process::Command::new(prometheus)
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("tsdb").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("start prometheus");
    let _prom = Proc {
        child,
        addr: format!("127.0.0.1:{port}").parse().unwrap(),
        log,
    };

    let client = reqwest::Client::new();
    let query = |q: &'static str| {
        let client = client.clone();
        async move {
            let url = reqwest::Url::parse_with_params(
                &format!("http://127.0.0.1:{port}/api/v1/query"),
                [("query", q)],
            )
            .ok()?;
            let r = client.get(url).send().await.ok()?;
            let v: serde_json::Value = r.json().await.ok()?;
            let result = v["data"]["result"].as_array()?.clone();
            (!result.is_empty()).then_some(result)
        }
    };

    let mig = eventually(Duration::from_secs(60), "MIG series in Prometheus", || {
        query(r#"DCGM_FI_DEV_FB_USED{GPU_I_PROFILE="3g.40gb"}"#)
    })
    .await;
    // GPU 5 has one 3g.40gb, GPU 6 another.
    assert_eq!(mig.len(), 2, "{mig:#?}");
    let parents: Vec<&str> = inventory.gpus[5..7]
        .iter()
        .map(|g| g.uuid.as_str())
        .collect();
    for series in &mig {
        let m = &series["metric"];
        assert!(parents.contains(&m["UUID"].as_str().unwrap()), "{m}");
        assert_eq!(m["modelName"], "NVIDIA A100-SXM4-80GB");
        assert_eq!(m["Hostname"], "node-a");
        assert_eq!(m["job"], "kcloud-agent");
        assert!(m["GPU_I_ID"].as_str().unwrap().parse::<u32>().is_ok());
    }

    let util = query("DCGM_FI_DEV_GPU_UTIL").await.expect("util series");
    assert_eq!(util.len(), 4);
    let g0 = &inventory.gpus[0];
    assert!(util.iter().any(|s| s["metric"]["UUID"] == g0.uuid.as_str()
        && s["metric"]["pci_bus_id"] == g0.pci_bus_id.as_str()
        && s["metric"]["device"] == "nvidia0"
        && s["metric"]["gpu"] == "0"));
    let up = query("kcloud_simulated").await.expect("kcloud_simulated");
    assert_eq!(up[0]["value"][1], "1");
}

#[derive(Default)]
struct Received {
    pushes: Vec<(String, Option<String>, NodeInventory)>,
}

type Shared = Arc<Mutex<Received>>;

async fn receive(
    State(r): State<Shared>,
    Path(node): Path<String>,
    headers: HeaderMap,
    body: axum::Json<NodeInventory>,
) -> StatusCode {
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    r.lock().unwrap().pushes.push((node, auth, body.0));
    StatusCode::NO_CONTENT
}

async fn aggregator_on(listener: tokio::net::TcpListener, state: Shared) {
    let app = axum::Router::new()
        .route("/api/v1/nodes/{node}/inventory", put(receive))
        .with_state(state);
    axum::serve(listener, app).await.unwrap();
}

#[tokio::test]
async fn pushes_inventory_with_token_and_survives_an_absent_aggregator() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "s3cret-agent-token\n").unwrap();
    // Nothing listens on this port yet: the aggregator is "down" at start.
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let agent = start_agent(
        dir.path(),
        &[
            "--simulate",
            "dgx-a100-mig",
            "--interval",
            "200ms",
            "--heartbeat",
            "1s",
            "--aggregator-url",
            &url,
            "--agent-token-file",
            token.to_str().unwrap(),
        ],
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let metrics = get_text(&agent.url("/metrics")).await;
    assert!(
        metrics.contains(r#"kcloud_inventory_pushes_total{result="error"}"#),
        "failed pushes are counted"
    );
    assert!(agent.child.id() > 0);

    // The aggregator comes up; the agent finds it within its backoff cap.
    let state = Shared::default();
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    let server = tokio::spawn(aggregator_on(listener, state.clone()));
    let first = eventually(
        Duration::from_secs(40),
        "a push after the aggregator came back",
        || {
            let state = state.clone();
            async move { state.lock().unwrap().pushes.first().cloned() }
        },
    )
    .await;
    let (node, auth, inv) = first;
    assert_eq!(node, "node-a");
    assert_eq!(auth.as_deref(), Some("Bearer s3cret-agent-token"));
    assert_eq!(inv.node, "node-a");
    assert!(inv.simulated);
    assert_eq!(inv.gpus.len(), 8);
    assert_eq!(inv.allocatable().count(), 4 + 17);

    // Heartbeats follow at about the configured interval, newest data, same boot id,
    // increasing sequence numbers.
    let pushes = eventually(Duration::from_secs(10), "three pushes", || {
        let state = state.clone();
        async move {
            let r = state.lock().unwrap();
            (r.pushes.len() >= 3).then(|| r.pushes.clone())
        }
    })
    .await;
    for w in pushes.windows(2) {
        assert_eq!(w[0].2.boot_id, w[1].2.boot_id);
        assert!(w[1].2.seq > w[0].2.seq, "sequence increases");
    }
    let metrics = get_text(&agent.url("/metrics")).await;
    assert!(metrics.contains(r#"kcloud_inventory_pushes_total{result="ok"}"#));
    server.abort();
}

#[tokio::test]
async fn custom_layout_file_and_bad_layouts() {
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("layout.json");
    std::fs::write(
        &layout,
        r#"{"gpus":[{"model":"NVIDIA H200","memory_mib":144384,"mig":["3g.71gb","2g.35gb","1g.18gb","1g.18gb"]},{"model":"NVIDIA H200","memory_mib":144384}]}"#,
    )
    .unwrap();
    let agent = start_agent(dir.path(), &["--simulate-file", layout.to_str().unwrap()]).await;
    let inv: NodeInventory =
        serde_json::from_str(&get_text(&agent.url("/inventory")).await).unwrap();
    assert_eq!(inv.gpus.len(), 2);
    assert_eq!(inv.gpus[0].mig_instances.len(), 4);
    assert!(!inv.gpus[1].mig_enabled());

    // An impossible layout is refused at start with a clear message.
    std::fs::write(
        &layout,
        r#"{"gpus":[{"model":"X","memory_mib":81920,"mig":["7g.80gb","1g.10gb"]}]}"#,
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kcloud-agent"))
        .args([
            "--node-name",
            "n",
            "--listen",
            "127.0.0.1:0",
            "--simulate-file",
            layout.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("compute") && err.contains("slices"), "{err}");
}
