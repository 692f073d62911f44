//! `GET /api/v1/events` over real HTTP: authentication, the initial state, live
//! allocation changes with per-viewer redaction, the end of the stream when the account
//! is disabled; and the portal's assets with their security headers.

use std::time::Duration;

use kcloud_core::device::{DeviceRequest, Holder};
use kcloud_core::now_ms;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::app::{ADMIN_PW, AGENT_TOKEN, TestApp};

/// Bounds a hang only; no step is expected to take anywhere near this.
const WAIT: Duration = Duration::from_secs(30);

async fn start() -> TestApp {
    TestApp::builder()
        .args(["--local-agent", "off"])
        .start()
        .await
}

/// An agent's push of one GPU in MIG mode with two instances.
async fn push_mig_node(app: &TestApp, node: &str) {
    let mem = json!({"total_bytes": 85899345920u64, "used_bytes": 0, "free_bytes": 85899345920u64});
    let inv = json!({
        "node": node, "boot_id": "boot-1", "seq": 1, "agent_version": "0.1.0",
        "collected_at_ms": now_ms(), "simulated": true,
        "nvml": {"up": true, "driver_version": "550.54.15"},
        "host": {"hostname": node, "cpu_count": 64, "cpu_utilization_percent": 12.5,
                 "memory_total_bytes": 1u64 << 40, "memory_used_bytes": 1u64 << 38,
                 "load_average": [1.0, 1.0, 1.0], "uptime_seconds": 1000},
        "gpus": [
            {"index": 0, "uuid": format!("GPU-{node}-0"), "model": "NVIDIA A100-SXM4-80GB",
             "pci_bus_id": "00000000:07:00.0", "memory": mem, "utilization_gpu_percent": 10,
             "mig_mode": {"current": true, "pending": true},
             "mig_instances": [
                {"uuid": format!("MIG-{node}-a"), "parent_uuid": format!("GPU-{node}-0"), "index": 0,
                 "profile": "3g.40gb", "gpu_instance_id": 1, "compute_instance_id": 0},
                {"uuid": format!("MIG-{node}-b"), "parent_uuid": format!("GPU-{node}-0"), "index": 1,
                 "profile": "1g.10gb", "gpu_instance_id": 9, "compute_instance_id": 0}
             ]}
        ]
    });
    let r = app
        .client
        .put(format!("{}/api/v1/nodes/{node}/inventory", app.base))
        .bearer_auth(AGENT_TOKEN)
        .json(&inv)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
}

/// `GET /api/v1/events` as `token`.
async fn stream(app: &TestApp, token: &str) -> Stream {
    let resp = app
        .client
        .get(format!("{}/api/v1/events", app.base))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        resp.headers()["content-type"].to_str().unwrap(),
        "text/event-stream"
    );
    Stream {
        resp,
        buf: String::new(),
    }
}

/// A parsed server-sent-events stream.
struct Stream {
    resp: reqwest::Response,
    buf: String,
}

impl Stream {
    /// The next event as (name, JSON data); `None` when the stream ended.
    async fn next(&mut self) -> Option<(String, Value)> {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let mut name = String::new();
                let mut data = String::new();
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        name = v.trim().to_owned();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim_start());
                    }
                }
                if name.is_empty() {
                    continue; // keep-alive comment
                }
                return Some((name, serde_json::from_str(&data).unwrap_or(Value::Null)));
            }
            let chunk = tokio::time::timeout(WAIT, self.resp.chunk())
                .await
                .expect("stream stalled")
                .ok()??;
            self.buf.push_str(&String::from_utf8_lossy(&chunk));
        }
    }

    /// Events up to and including the first named `until`.
    async fn until(&mut self, until: &str) -> Vec<(String, Value)> {
        let mut out = Vec::new();
        while let Some(e) = self.next().await {
            let done = e.0 == until;
            out.push(e);
            if done {
                return out;
            }
        }
        panic!("stream ended before {until}: {out:?}");
    }

    /// The next `node` event.
    async fn node(&mut self) -> Value {
        loop {
            let (name, data) = self.next().await.expect("stream ended");
            if name == "node" {
                return data;
            }
        }
    }
}

fn device<'a>(node: &'a Value, uuid: &str) -> &'a Value {
    node["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["uuid"] == uuid)
        .unwrap_or_else(|| panic!("{uuid} not in {node}"))
}

#[tokio::test]
async fn event_stream_sends_state_then_redacted_changes_and_ends_for_disabled_users() {
    let app = start().await;
    let admin = app.token("admin", ADMIN_PW).await;
    let alice = app.add_user(&admin, "alice").await;
    let bob = app.add_user(&admin, "bob").await;
    push_mig_node(&app, "node-1").await;

    // No credentials: the usual JSON 401.
    let r = app
        .client
        .get(format!("{}/api/v1/events", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "unauthorized");

    // Initial state: who, the node with its devices, no servers, then synced.
    let mut a = stream(&app, &alice).await;
    let first = a.until("synced").await;
    assert_eq!(first[0].0, "reset");
    assert_eq!(first[0].1["user"], "alice");
    assert_eq!(first[0].1["admin"], false);
    let nodes: Vec<&Value> = first
        .iter()
        .filter(|e| e.0 == "node")
        .map(|e| &e.1)
        .collect();
    assert_eq!(nodes.len(), 1);
    assert_eq!(nodes[0]["name"], "node-1");
    assert_eq!(nodes[0]["devices"].as_array().unwrap().len(), 3);
    assert_eq!(nodes[0]["metrics"]["cpu_count"], 64.0);
    assert!(!first.iter().any(|e| e.0 == "server"));
    let mut b = stream(&app, &bob).await;
    b.until("synced").await;
    let mut adm = stream(&app, &admin).await;
    adm.until("synced").await;

    // Bob takes a slice: everyone hears of it; only bob and the admin learn who.
    let res = app
        .state
        .cluster
        .reserve(
            Holder {
                user: "bob".into(),
                server: "nb".into(),
            },
            &DeviceRequest::Exact(vec!["MIG-node-1-a".into()]),
            None,
            now_ms(),
        )
        .unwrap();
    app.state.cluster.ledger().commit(res.id).unwrap();
    let seen_by_alice = a.node().await;
    let d = device(&seen_by_alice, "MIG-node-1-a");
    assert_eq!(
        (d["available"].clone(), d["in_use"].clone()),
        (json!(false), json!(true))
    );
    assert!(d.get("holder").is_none(), "redacted for alice: {d}");
    let d = device(&b.node().await, "MIG-node-1-a").clone();
    assert_eq!(d["holder"], json!({"user": "bob", "server": "nb"}));
    let d = device(&adm.node().await, "MIG-node-1-a").clone();
    assert_eq!(d["holder"]["user"], "bob");

    // Released: free again, pushed without asking.
    app.state.cluster.ledger().release(&Holder {
        user: "bob".into(),
        server: "nb".into(),
    });
    let d = device(&a.node().await, "MIG-node-1-a").clone();
    assert_eq!(d["available"], true);

    // Disabling alice ends her stream (at the next session check).
    let r = app
        .client
        .patch(format!("{}/api/v1/users/alice", app.base))
        .bearer_auth(&admin)
        .json(&json!({"disabled": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    while let Some((name, _)) = a.next().await {
        assert_ne!(name, "reset", "no new session for a disabled user");
    }
}

#[tokio::test]
async fn portal_assets_carry_a_strict_csp_and_the_api_documents_the_stream() {
    let app = start().await;
    let r = app
        .client
        .get(format!("{}/", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let csp = r.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        csp.contains("script-src 'self'") && !csp.contains("unsafe"),
        "{csp}"
    );
    assert_eq!(r.headers()["x-frame-options"], "DENY");
    assert!(r.text().await.unwrap().contains("/ui/app.js"));
    let r = app
        .client
        .get(format!("{}/ui/app.js", app.base))
        .send()
        .await
        .unwrap();
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/javascript")
    );
    let r = app
        .client
        .get(format!("{}/ui/nope.js", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);

    let spec: Value = app
        .client
        .get(format!("{}/api/openapi.json", app.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let events = &spec["paths"]["/api/v1/events"]["get"];
    assert!(
        events["responses"]["200"]["content"]
            .get("text/event-stream")
            .is_some(),
        "{events}"
    );
    assert!(spec["paths"]["/api/v1/settings"]["get"].is_object());
    assert!(spec["components"]["schemas"]["ClusterNode"].is_object());
}
