//! `GET /api/v1/events` over real HTTP: authentication, the initial state, live
//! allocation changes with per-viewer redaction (whole nodes, fleet lines and the
//! summary), following chosen nodes only, a stalled client started over without holding
//! up others, the end of the stream when the account is disabled; and the portal's
//! assets with their security headers.

use std::time::{Duration, Instant};

use kcloud_core::device::{DeviceRequest, Holder};
use kcloud_core::now_ms;
use kcloud_testkit::fixtures;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

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
    push_mig_node_in(app, node, None).await
}

/// The same, from an agent started with `--node-group {group}`.
async fn push_mig_node_in(app: &TestApp, node: &str, group: Option<&str>) {
    let mem = json!({"total_bytes": 85899345920u64, "used_bytes": 0, "free_bytes": 85899345920u64});
    let inv = json!({
        "node": node, "boot_id": "boot-1", "seq": 1, "agent_version": "0.1.0",
        "collected_at_ms": now_ms(), "simulated": true, "group": group,
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
    stream_of(app, token, "").await
}

/// `GET /api/v1/events?{query}` as `token`.
async fn stream_of(app: &TestApp, token: &str, query: &str) -> Stream {
    let resp = app
        .client
        .get(format!("{}/api/v1/events?{query}", app.base))
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

/// Bob's server `server` takes `uuid` (claimed and committed, as a create does).
fn bob_takes(app: &TestApp, server: &str, uuid: &str) {
    let res = app
        .state
        .cluster
        .claim(
            Holder::new("bob", server),
            &DeviceRequest::Exact(vec![uuid.into()]),
            None,
            now_ms(),
            &Default::default(),
        )
        .unwrap();
    app.state.cluster.ledger().commit(res.id).unwrap();
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
        .claim(
            Holder {
                user: "bob".into(),
                server: "nb".into(),
            },
            &DeviceRequest::Exact(vec!["MIG-node-1-a".into()]),
            None,
            now_ms(),
            &Default::default(),
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

#[tokio::test]
async fn fleet_streams_follow_what_they_ask_for_and_redact_every_kind_of_change() {
    let app = start().await;
    let admin = app.token("admin", ADMIN_PW).await;
    let alice = app.add_user(&admin, "alice").await;
    let bob = app.add_user(&admin, "bob").await;
    push_mig_node(&app, "node-1").await;
    push_mig_node_in(&app, "node-2", Some("rack-b")).await;

    // Bad subscriptions are refused like any bad query.
    for query in ["bogus=1", "rows=maybe"] {
        let r = app
            .client
            .get(format!("{}/api/v1/events?{query}", app.base))
            .bearer_auth(&alice)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{query}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"]["code"], "bad_request");
    }
    let many: Vec<String> = (0..101).map(|i| format!("n{i}")).collect();
    let r = app
        .client
        .get(format!(
            "{}/api/v1/events?nodes={}",
            app.base,
            many.join(",")
        ))
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);

    // The fleet view: summary, every node's line, and the one node looked at.
    let fleet = "summary=true&rows=true&nodes=node-2";
    let mut a = stream_of(&app, &alice, fleet).await;
    let first = a.until("synced").await;
    let names: Vec<&str> = first.iter().map(|e| e.0.as_str()).collect();
    assert_eq!(names, ["reset", "summary", "rows", "node", "synced"]);
    assert_eq!(first[1].1["nodes"], 2);
    assert_eq!(first[1].1["devices_free"], 4);
    let groups: Vec<(Value, Value)> = first[1].1["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| (g["group"].clone(), g["devices_free"].clone()))
        .collect();
    assert_eq!(groups, [(json!(""), json!(2)), (json!("rack-b"), json!(2))]);
    assert_eq!(
        first[1].1["classes"][0],
        json!({"model": "NVIDIA A100-SXM4-80GB", "kind": "mig", "profile": "1g.10gb", "total": 2, "free": 2})
    );
    let rows: Vec<&str> = first[2]
        .1
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(rows, ["node-1", "node-2"]);
    assert_eq!(first[2].1[0]["models"], json!(["NVIDIA A100-SXM4-80GB"]));
    assert_eq!(first[3].1["name"], "node-2");
    let mut b = stream_of(&app, &bob, "nodes=node-2").await;
    b.until("synced").await;
    let mut adm = stream_of(&app, &admin, "summary=true&nodes=node-1").await;
    adm.until("synced").await;

    // Bob takes a slice of node-1: alice's line and summary change, but no node event
    // (she does not follow node-1), and nothing names bob or his server.
    bob_takes(&app, "nb", "MIG-node-1-a");
    let mut got = Vec::new();
    while !(got.iter().any(|e: &(String, Value)| e.0 == "rows")
        && got.iter().any(|e| e.0 == "summary"))
    {
        got.push(a.next().await.expect("stream ended"));
    }
    assert!(got.iter().all(|e| e.0 != "node"), "{got:?}");
    let line = got.iter().find(|e| e.0 == "rows").unwrap();
    assert_eq!(
        line.1,
        json!([{"name": "node-1", "models": ["NVIDIA A100-SXM4-80GB"], "gpus": 1,
        "devices_total": 2, "devices_free": 1, "stale": false, "simulated": true}])
    );
    let summary = &got.iter().find(|e| e.0 == "summary").unwrap().1;
    assert_eq!(summary["devices_free"], 3);
    let text = serde_json::to_string(&got).unwrap();
    assert!(!text.contains("bob") && !text.contains("\"nb\""), "{text}");
    // The admin follows node-1 and learns who.
    let d = device(&adm.node().await, "MIG-node-1-a").clone();
    assert_eq!(d["holder"], json!({"user": "bob", "server": "nb"}));

    // On node-2, which alice follows: the change reaches her without the holder, bob
    // with it.
    bob_takes(&app, "nb2", "MIG-node-2-b");
    let n = a.node().await;
    assert_eq!(n["name"], "node-2");
    let d = device(&n, "MIG-node-2-b");
    assert_eq!((d["in_use"].clone(), d.get("holder")), (json!(true), None));
    let n = b.node().await;
    assert_eq!(device(&n, "MIG-node-2-b")["holder"]["server"], "nb2");

    // Reconnecting resumes cleanly: a fresh snapshot with what changed meanwhile.
    drop(a);
    app.state
        .cluster
        .ledger()
        .release(&Holder::new("bob", "nb2"));
    let mut a = stream_of(&app, &alice, fleet).await;
    let again = a.until("synced").await;
    assert_eq!(again[0].0, "reset");
    assert_eq!(
        again[1].1["devices_free"], 3,
        "node-1's slice is still bob's"
    );
    let n = &again.iter().find(|e| e.0 == "node").unwrap().1;
    assert_eq!(device(n, "MIG-node-2-b")["available"], true);
}

/// A raw event stream whose client reads nothing until told to, with a small receive
/// window, so the aggregator's side fills up the way it does for a stalled browser.
struct Stalled {
    sock: tokio::net::TcpStream,
    raw: Vec<u8>,
}

impl Stalled {
    async fn open(app: &TestApp, token: &str, query: &str) -> Stalled {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let mut sock = socket.connect(app.addr.parse().unwrap()).await.unwrap();
        let req = format!(
            "GET /api/v1/events?{query} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {token}\r\n\r\n",
            app.addr
        );
        sock.write_all(req.as_bytes()).await.unwrap();
        Stalled {
            sock,
            raw: Vec::new(),
        }
    }

    /// Reads until `needle` appears in what arrived (chunk framing and all).
    async fn read_until(&mut self, needle: &str) -> String {
        self.read_until_with(|t| t.contains(needle)).await
    }

    /// Reads until what arrived satisfies `done`.
    async fn read_until_with(&mut self, done: impl Fn(&str) -> bool) -> String {
        let mut buf = vec![0u8; 1 << 16];
        let deadline = Instant::now() + WAIT;
        loop {
            let text = String::from_utf8_lossy(&self.raw).into_owned();
            if done(&text) {
                return text;
            }
            assert!(Instant::now() < deadline, "not there after {WAIT:?}");
            let n = tokio::time::timeout(WAIT, self.sock.read(&mut buf))
                .await
                .expect("stream stalled")
                .unwrap();
            assert!(n > 0, "stream ended early");
            self.raw.extend_from_slice(&buf[..n]);
        }
    }
}

#[tokio::test]
async fn a_stalled_client_is_started_over_and_never_holds_up_others() {
    let app = start().await;
    let admin = app.token("admin", ADMIN_PW).await;
    let cluster = &app.state.cluster;
    let mut nodes: Vec<_> = (0..40)
        .map(|i| fixtures::plain_node(&format!("node-{i:02}"), 8, "NVIDIA H100 80GB HBM3"))
        .collect();
    for n in &nodes {
        cluster
            .ingest(&n.node.clone(), n.clone(), now_ms())
            .unwrap();
    }
    let mut stalled = Stalled::open(&app, &admin, "nodes=*").await;
    stalled.read_until("event: reset").await;
    let mut live = stream_of(&app, &admin, "nodes=node-00").await;
    live.until("synced").await;

    // Every node changes its layout (a GPU comes and goes) again and again, for longer
    // than the stalled client's socket and the feed's kept batches can absorb; the
    // live stream hears of node-00 throughout.
    let started = Instant::now();
    let mut heard = 0;
    let mut last_heard = Instant::now();
    let mut round = 0u32;
    while started.elapsed() < Duration::from_secs(15) {
        round += 1;
        for n in &mut nodes {
            *n = fixtures::next(n);
            if round.is_multiple_of(2) {
                n.gpus.pop();
            } else {
                let i = n.gpus.len() as u32;
                n.gpus.push(fixtures::gpu(
                    i,
                    &format!("GPU-{}-{i}", n.node),
                    "NVIDIA H100 80GB HBM3",
                ));
            }
            cluster
                .ingest(&n.node.clone(), n.clone(), now_ms())
                .unwrap();
        }
        let until = Instant::now() + Duration::from_millis(100);
        while let Ok(Some((name, data))) = tokio::time::timeout_at(until.into(), live.next()).await
        {
            assert_eq!((name.as_str(), &data["name"]), ("node", &json!("node-00")));
            heard += 1;
            last_heard = Instant::now();
        }
    }
    assert!(heard >= 20, "the live stream heard node-00 {heard} times");
    assert!(
        last_heard.elapsed() < Duration::from_secs(1),
        "the live stream went quiet"
    );

    // The stalled client, read at last, is told to start over and then gets the
    // current state of every node, not the backlog.
    let text = stalled
        .read_until_with(|t| {
            t.matches("event: reset").count() >= 2
                && t[t.rfind("event: reset").unwrap_or(0)..].contains("event: synced")
        })
        .await;
    let snapshot = &text[text.rfind("event: reset").unwrap()..];
    for n in &nodes {
        assert!(
            snapshot.contains(&format!("\"name\":\"{}\"", n.node)),
            "{} in the fresh snapshot",
            n.node
        );
    }
}
