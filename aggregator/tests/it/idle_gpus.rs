//! Idle-GPU reclaim end to end on the local shape: the embedded agent reads a fake
//! `libnvidia-ml.so` through the real nvml-wrapper (a whole A100, an H100 in MIG mode
//! with GPM, an A100 in MIG mode without it), and the test drives the utilization the
//! driver reports. A busy server is kept, an idle one is warned (view, webhook) and
//! then stopped with reason gpu_idle, "keep" restarts the window (limited per day), an
//! exempt server stays, and a device without a reading is never idle. The waste report
//! shows held, measured, used and reclaimed GPU-hours.

use std::time::{Duration, Instant};

use kcloud_testkit::{FakeGpu, FakeNvml, FakeSpec};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::app::{TestApp, kinds, webhook};

const IDLE_FOR_S: u64 = 8;

/// A server that answers its readiness probe (so it runs) and does nothing else.
fn server_on(name: &str, device: &str) -> Value {
    json!({"name": name, "cpu": "100m", "memory": "256Mi", "devices": [device],
           "command": ["python3", "-m", "http.server", "{port}", "--bind", "127.0.0.1"]})
}

async fn server(app: &TestApp, token: &str, user: &str, name: &str) -> (StatusCode, Value) {
    let r = app
        .call(
            Method::GET,
            &format!("/api/v1/users/{user}/servers/{name}"),
            Some(token),
            None,
        )
        .await;
    (r.status, r.body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_gpus_are_warned_then_reclaimed_busy_exempt_and_unknown_are_kept() {
    let mut whole = FakeGpu::a100(0);
    whole.util_gpu = Some(80);
    let mut hopper = FakeGpu::h100_mig(1, &["3g.40gb", "2g.20gb", "1g.10gb"]);
    for m in &mut hopper.migs {
        m.gr_active = Some(1); // idle: under 5 %
    }
    let ampere = FakeGpu::a100_mig(2, &["3g.40gb"]);
    let mut spec = FakeSpec::with_gpus(vec![whole, hopper, ampere]);
    let fake = FakeNvml::new(&spec);
    let (hook, got) = webhook().await;
    let app = TestApp::builder()
        .args([
            "--local-agent",
            "nvml",
            "--nvml-lib",
            fake.lib_path().to_str().unwrap(),
            "--agent-heartbeat",
            "1s",
            "--stop-grace",
            "1s",
        ])
        .settings(&format!(
            "[culling]\ngpu_idle_threshold = 5\ngpu_idle_for = \"{IDLE_FOR_S}s\"\n\
             gpu_idle_warn = \"4s\"\ngpu_idle_keeps_per_day = 1\n\
             [notifications]\nwebhook_url = \"{hook}\"\n"
        ))
        .wait_for_gpus()
        .start()
        .await;
    let (admin, alice, bob) = app.users().await;
    let gpu = |i: usize, m: Option<usize>| -> String {
        match m {
            None => spec.gpus[i].uuid.clone(),
            Some(m) => spec.gpus[i].migs[m].uuid.clone(),
        }
    };
    let (busy, idle, kept, exempt, unknown) = (
        gpu(0, None),
        gpu(1, Some(0)),
        gpu(1, Some(1)),
        gpu(1, Some(2)),
        gpu(2, Some(0)),
    );
    for (token, user, name, dev) in [
        (&alice, "alice", "busy", &busy),
        (&alice, "alice", "idle", &idle),
        (&bob, "bob", "kept", &kept),
        (&bob, "bob", "exempt", &exempt),
        (&bob, "bob", "unknown", &unknown),
    ] {
        let r = app
            .call(
                Method::POST,
                &format!("/api/v1/users/{user}/servers"),
                Some(token),
                Some(server_on(name, dev)),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{name}: {}", r.body);
    }
    // Windows open only for running servers: wait for all of them.
    let ready_by = Instant::now() + Duration::from_secs(30);
    for (token, user, name) in [
        (&alice, "alice", "busy"),
        (&alice, "alice", "idle"),
        (&bob, "bob", "kept"),
        (&bob, "bob", "exempt"),
        (&bob, "bob", "unknown"),
    ] {
        while server(&app, token, user, name).await.1["status"] != "running" {
            assert!(Instant::now() < ready_by, "{name} never ran");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let r = app
        .call(
            Method::PATCH,
            "/api/v1/users/bob/servers/exempt",
            Some(&admin),
            Some(json!({"cull_exempt": true})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    // Not idle: nothing to keep yet (the whole GPU is busy).
    let r = app
        .call(
            Method::POST,
            "/api/v1/users/alice/servers/busy/keep",
            Some(&alice),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
    // Another user's server: 404, as everywhere.
    let r = app
        .call(
            Method::POST,
            "/api/v1/users/bob/servers/kept/keep",
            Some(&alice),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.body);

    // The warning comes in the view (and the webhook) before the stop.
    let started = Instant::now();
    let deadline = started + Duration::from_secs(IDLE_FOR_S + 10);
    let warned = loop {
        let (_, v) = server(&app, &alice, "alice", "idle").await;
        if v["ends_reason"] == "gpu_idle" {
            break v;
        }
        assert!(Instant::now() < deadline, "no idle warning: {v}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(warned["ends_because"].as_str().unwrap().contains("idle"));
    assert_eq!(warned["status"], "running");
    // The idle servers are counted on /metrics (alice's idle and bob's kept so far).
    let metrics = app.call(Method::GET, "/metrics", None, None).await.body;
    let idle_now: i64 = metrics
        .as_str()
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("kcloud_servers_gpu_idle "))
        .and_then(|v| v.trim().parse().ok())
        .expect("kcloud_servers_gpu_idle on /metrics");
    assert!(idle_now >= 1, "{idle_now}");

    // Bob keeps "kept" once; the second keep of the day is refused.
    loop {
        let (_, v) = server(&app, &bob, "bob", "kept").await;
        if v["ends_reason"] == "gpu_idle" {
            break;
        }
        assert!(Instant::now() < deadline, "no warning for kept: {v}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let r = app
        .call(
            Method::POST,
            "/api/v1/users/bob/servers/kept/keep",
            Some(&bob),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert!(
        r.body.get("ends_reason").is_none(),
        "window restarted: {}",
        r.body
    );
    let kept_at = Instant::now();
    let r = app
        .call(
            Method::POST,
            "/api/v1/users/bob/servers/kept/keep",
            Some(&bob),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{}", r.body);
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("keep")
    );

    // The idle server goes; the rest stay.
    loop {
        let (status, v) = server(&app, &alice, "alice", "idle").await;
        if status == StatusCode::NOT_FOUND {
            break;
        }
        assert!(Instant::now() < deadline, "idle server not reclaimed: {v}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        started.elapsed() >= Duration::from_secs(IDLE_FOR_S - 1),
        "not before the window: {:?}",
        started.elapsed()
    );
    // Its device is free again; its owner's other server runs on.
    let r = app
        .call(
            Method::GET,
            "/api/v1/gpus?available=true&kind=mig&limit=100",
            Some(&alice),
            None,
        )
        .await;
    assert!(
        r.body["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["uuid"] == idle.as_str()),
        "{}",
        r.body
    );
    // Long enough that a reclaim of "kept" without its keep would have happened.
    tokio::time::sleep(Duration::from_secs(IDLE_FOR_S / 2).saturating_sub(kept_at.elapsed())).await;
    for (token, user, name) in [
        (&alice, "alice", "busy"),
        (&bob, "bob", "kept"),
        (&bob, "bob", "exempt"),
        (&bob, "bob", "unknown"),
    ] {
        let (status, v) = server(&app, token, user, name).await;
        assert_eq!(status, StatusCode::OK, "{name} must still run: {v}");
        assert_eq!(v["status"], "running", "{name}: {v}");
    }
    let (_, v) = server(&app, &bob, "bob", "unknown").await;
    assert!(
        v.get("ends_reason").is_none(),
        "no reading is not idle: {v}"
    );

    // A busy reading ends a window: "kept" goes busy and is not warned again.
    spec.gpus[1].migs[1].gr_active = Some(60);
    fake.update(&spec);
    tokio::time::sleep(Duration::from_secs(IDLE_FOR_S)).await;
    let (status, v) = server(&app, &bob, "bob", "kept").await;
    assert_eq!(status, StatusCode::OK, "busy again, kept: {v}");

    // Audit, webhook.
    let audit = app.state.auth.repo().audit_log(200).await.unwrap();
    assert!(
        audit.iter().any(|e| e.action == "server_cull"
            && e.target == "alice/idle"
            && e.detail.contains("reason=gpu_idle")),
        "{audit:?}"
    );
    assert!(
        audit
            .iter()
            .any(|e| e.action == "server_keep" && e.target == "bob/kept")
    );
    let k = kinds(&got);
    assert!(k.contains(&"server_will_stop".to_owned()), "{k:?}");
    assert!(k.contains(&"server_stopped".to_owned()), "{k:?}");

    // The waste report: alice held a busy GPU (used) and had one reclaimed; bob's
    // unknown device was held but never measured.
    let deadline = Instant::now() + Duration::from_secs(25);
    let rows = loop {
        let r = app
            .call(Method::GET, "/api/v1/usage/efficiency", Some(&admin), None)
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        let rows = r.body.as_array().unwrap().clone();
        let alice_used = rows
            .iter()
            .find(|r| r["user"] == "alice")
            .and_then(|r| r["used_gpu_hours"].as_f64())
            .unwrap_or(0.0);
        if alice_used > 0.0 {
            break rows;
        }
        assert!(
            Instant::now() < deadline,
            "no utilization sampled: {rows:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let row = |u: &str| rows.iter().find(|r| r["user"] == u).unwrap().clone();
    let a = row("alice");
    assert_eq!(a["reclaimed_servers"], 1, "{a}");
    let reclaimed = a["reclaimed_gpu_hours"].as_f64().unwrap();
    // The 3g.40gb of an H100 counts 3/7 per hour, idle for about IDLE_FOR_S.
    let expect = 3.0 / 7.0 * IDLE_FOR_S as f64 / 3600.0;
    assert!(
        reclaimed > expect * 0.8 && reclaimed < expect * 2.5,
        "{reclaimed} vs {expect}"
    );
    let (measured, used) = (
        a["measured_gpu_hours"].as_f64().unwrap(),
        a["used_gpu_hours"].as_f64().unwrap(),
    );
    assert!(
        used <= measured && measured <= a["gpu_hours"].as_f64().unwrap() + 1e-9,
        "{a}"
    );
    let b = row("bob");
    assert!(
        b["gpu_hours"].as_f64().unwrap() > b["measured_gpu_hours"].as_f64().unwrap(),
        "{b}"
    );
    // Users see their own row only; CSV for admins.
    let r = app
        .call(Method::GET, "/api/v1/usage/efficiency", Some(&bob), None)
        .await;
    let mine = r.body.as_array().unwrap();
    assert!(mine.iter().all(|r| r["user"] == "bob"), "{}", r.body);
    let r = app
        .call(
            Method::GET,
            "/api/v1/usage/efficiency?format=csv",
            Some(&admin),
            None,
        )
        .await;
    let text = r.body.as_str().unwrap();
    assert!(
        text.starts_with("user,gpu_hours,measured_gpu_hours,used_gpu_hours,"),
        "{text}"
    );
    assert!(text.lines().any(|l| l.starts_with("alice,")), "{text}");
}
