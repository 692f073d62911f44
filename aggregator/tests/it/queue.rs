//! The wait queue and reservations end to end, local shape with simulated devices
//! (`dgx-a100-mig`: four whole A100s and four in MIG mode) and `sleep` as the servers:
//! 202 and places, requests that can never fit, fair order by recent GPU-hours,
//! backfill, estimates from idle culling, cancel; reservations' conflicts, bad input,
//! redaction, the devices they keep from others, the stop at their start with the
//! webhook's warnings, no-shows; and the queue and reservations surviving SIGKILL.

use std::time::{Duration, Instant};

use kcloud_core::now_ms;
use kcloud_core::reservation::format_instant;
use kcloud_testkit::process::AggregatorProcess;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::app::{Resp, TestApp, kinds, webhook};

async fn start(settings: &str) -> TestApp {
    TestApp::builder()
        .settings(settings)
        .args([
            "--simulate",
            "dgx-a100-mig",
            "--agent-heartbeat",
            "1s",
            "--stop-grace",
            "1s",
        ])
        .wait_for_gpus()
        .start()
        .await
}

/// `sleep` as the server, on `gpus` whole GPUs (or none).
fn sleeper(name: &str, extra: Value) -> Value {
    let mut v =
        json!({"name": name, "cpu": "100m", "memory": "128Mi", "command": ["sleep", "600"]});
    if let (Some(v), Some(e)) = (v.as_object_mut(), extra.as_object()) {
        v.extend(e.clone());
    }
    v
}

fn gpus(n: u32) -> Value {
    json!({"gpu_request": {"count": n}})
}

fn waiting(n: u32) -> Value {
    json!({"gpu_request": {"count": n}, "wait": {"max": "1h"}})
}

async fn create(app: &TestApp, token: &str, user: &str, body: Value) -> Resp {
    app.call(
        Method::POST,
        &format!("/api/v1/users/{user}/servers"),
        Some(token),
        Some(body),
    )
    .await
}

async fn delete(app: &TestApp, token: &str, user: &str, name: &str) {
    let r = app
        .call(
            Method::DELETE,
            &format!("/api/v1/users/{user}/servers/{name}"),
            Some(token),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{:?}", r.body);
}

async fn server(app: &TestApp, token: &str, user: &str, name: &str) -> Resp {
    app.call(
        Method::GET,
        &format!("/api/v1/users/{user}/servers/{name}"),
        Some(token),
        None,
    )
    .await
}

/// Waits until `user/name` has left the queue (started); its view.
async fn until_started(app: &TestApp, token: &str, user: &str, name: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = server(app, token, user, name).await;
        assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
        if r.body["status"] != "queued" {
            return r.body;
        }
        assert!(Instant::now() < deadline, "still queued: {:?}", r.body);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn assert_error(r: &Resp, status: StatusCode, needle: &str) {
    assert_eq!(r.status, status, "{:?}", r.body);
    let msg = r.body["error"]["message"].as_str().unwrap_or_default();
    assert!(msg.contains(needle), "{needle:?} not in {msg:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_wait_in_fair_order_with_backfill_and_start_when_devices_free() {
    let app = start("[culling]\nidle_timeout = \"2h\"\n[default_quota]\ngpus = 64\n").await;
    let (admin, alice, bob) = app.users().await;
    let carol = app.add_user(&admin, "carol").await;

    // Alice has used GPUs recently: one whole GPU for a moment.
    let r = create(&app, &alice, "alice", sleeper("warmup", gpus(1))).await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    tokio::time::sleep(Duration::from_millis(300)).await;
    delete(&app, &alice, "alice", "warmup").await;

    // Carol takes all four whole GPUs, one per server.
    for i in 0..4 {
        let r = create(&app, &carol, "carol", sleeper(&format!("hog{i}"), gpus(1))).await;
        assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    }
    // Without `wait`: 409 as before, saying how to wait.
    let r = create(&app, &bob, "bob", sleeper("now", gpus(1))).await;
    assert_error(&r, StatusCode::CONFLICT, "free");
    assert_error(&r, StatusCode::CONFLICT, "to wait in the queue");
    // What can never fit is refused at once, with or without `wait`.
    let r = create(&app, &bob, "bob", sleeper("huge", waiting(9))).await;
    assert_error(&r, StatusCode::BAD_REQUEST, "never");
    let r = create(
        &app,
        &bob,
        "bob",
        sleeper(
            "nomig",
            json!({"gpu_request": {"mig_profile": "7g.80gb"}, "wait": {"max": "1h"}}),
        ),
    )
    .await;
    assert_error(&r, StatusCode::BAD_REQUEST, "never");
    for bad in [
        json!({"max": "0s"}),
        json!({"max": "30d"}),
        json!({"max": "soon"}),
        json!({"for": "1h"}),
    ] {
        let r = create(
            &app,
            &bob,
            "bob",
            sleeper("bad", json!({"gpu_request": {"count": 1}, "wait": bad})),
        )
        .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{bad}: {:?}", r.body);
    }

    // Alice asks first, then bob: both wait. Carol's servers will be culled if idle
    // for 2 h, so the first in line has a known estimate.
    let r = create(&app, &alice, "alice", sleeper("a1", waiting(1))).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{:?}", r.body);
    assert_eq!(r.body["status"], "queued");
    assert_eq!(r.body["queue_position"], 1);
    assert!(r.body["devices"].as_array().unwrap().is_empty());
    let est = r.body["estimated_start_ms"].as_u64().expect("an estimate");
    let now = now_ms();
    assert!(
        est > now + 7_000_000 && est <= now + 7_200_000,
        "about 2 h from now: {est} vs {now}"
    );
    assert_eq!(r.body["estimated_start"], format_instant(est));
    let r = create(&app, &bob, "bob", sleeper("b1", waiting(1))).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{:?}", r.body);
    // Fair share: bob has used nothing, alice has: bob is first.
    assert_eq!(r.body["queue_position"], 1, "{:?}", r.body);
    // Both waiting are on /metrics (the alert on long waits reads the oldest).
    let metrics = app.call(Method::GET, "/metrics", None, None).await.body;
    let metrics = metrics.as_str().unwrap();
    assert!(
        metrics.lines().any(|l| l == "kcloud_queue_requests 2"),
        "{metrics}"
    );
    assert!(metrics.contains("kcloud_queue_oldest_wait_seconds "));
    assert_eq!(
        server(&app, &alice, "alice", "a1").await.body["queue_position"],
        2
    );
    // A taken name (queued or not) is 409; so is a second request of the same name.
    let r = create(&app, &bob, "bob", sleeper("b1", waiting(1))).await;
    assert_error(&r, StatusCode::CONFLICT, "in use");

    // The queue: own entries; admins all, with the scores.
    let r = app
        .call(Method::GET, "/api/v1/queue", Some(&bob), None)
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let mine = r.body.as_array().unwrap();
    assert_eq!(mine.len(), 1, "{:?}", r.body);
    assert!(mine[0].get("fair_share").is_none());
    let r = app
        .call(Method::GET, "/api/v1/queue", Some(&admin), None)
        .await;
    let all = r.body.as_array().unwrap();
    assert_eq!(
        all.iter()
            .map(|e| e["name"].as_str().unwrap())
            .collect::<Vec<_>>(),
        ["b1", "a1"]
    );
    assert!(all[1]["fair_share"].as_f64().unwrap() > 0.0);
    assert_eq!(all[0]["fair_share"].as_f64().unwrap(), 0.0);
    // Queued servers are listed with the others.
    let r = app
        .call(Method::GET, "/api/v1/users/bob/servers", Some(&bob), None)
        .await;
    assert_eq!(r.body[0]["name"], "b1");
    assert_eq!(r.body[0]["status"], "queued");

    // One GPU frees: bob's request starts on it, alice's keeps waiting, first now.
    delete(&app, &carol, "carol", "hog0").await;
    let b1 = until_started(&app, &bob, "bob", "b1").await;
    assert_eq!(b1["devices"].as_array().unwrap().len(), 1);
    assert_eq!(
        server(&app, &alice, "alice", "a1").await.body["status"],
        "queued"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        server(&app, &alice, "alice", "a1").await.body["queue_position"],
        1
    );

    // Backfill: a MIG instance is another kind; it starts at once although alice
    // waits. A whole GPU without `wait` does not jump the queue.
    let r = create(
        &app,
        &bob,
        "bob",
        sleeper("mig", json!({"gpu_request": {"mig_profile": "1g.10gb"}})),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);

    // Cancel: deleting a queued server removes it.
    let r = create(&app, &carol, "carol", sleeper("c9", waiting(1))).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{:?}", r.body);
    delete(&app, &carol, "carol", "c9").await;
    assert_eq!(
        server(&app, &carol, "carol", "c9").await.status,
        StatusCode::NOT_FOUND
    );
    // Another user's queued server is 404 to bob, like any other.
    assert_eq!(
        server(&app, &bob, "alice", "a1").await.status,
        StatusCode::NOT_FOUND
    );

    // A two-GPU request behind alice's one: when one GPU frees, alice's starts.
    let r = create(&app, &carol, "carol", sleeper("pair", waiting(2))).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{:?}", r.body);
    delete(&app, &carol, "carol", "hog1").await;
    let a1 = until_started(&app, &alice, "alice", "a1").await;
    assert_eq!(a1["devices"].as_array().unwrap().len(), 1);
    assert_eq!(
        server(&app, &carol, "carol", "pair").await.body["status"],
        "queued"
    );
    // The pair drains: a GPU that frees is kept for it, not given to a newcomer.
    delete(&app, &bob, "bob", "b1").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let r = create(&app, &bob, "bob", sleeper("jump", gpus(1))).await;
    assert_error(&r, StatusCode::CONFLICT, "free");
    delete(&app, &carol, "carol", "hog2").await;
    let pair = until_started(&app, &carol, "carol", "pair").await;
    assert_eq!(pair["devices"].as_array().unwrap().len(), 2);

    // The audit log says who started what.
    let audit = app.state.auth.repo().audit_log(200).await.unwrap();
    let actions: Vec<&str> = audit.iter().map(|e| e.action.as_str()).collect();
    for a in ["server_queue", "server_start_queued", "server_queue_cancel"] {
        assert!(actions.contains(&a), "{a} in {actions:?}");
    }
}

async fn book(app: &TestApp, token: &str, user: &str, body: Value) -> Resp {
    app.call(
        Method::POST,
        &format!("/api/v1/users/{user}/reservations"),
        Some(token),
        Some(body),
    )
    .await
}

fn at(ms: u64) -> String {
    format_instant(ms)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reservations_keep_devices_stop_servers_and_release_no_shows() {
    let (hook, got) = webhook().await;
    let app = start(&format!(
        "[notifications]\nwebhook_url = \"{hook}\"\n[reservations]\nno_show_after = \"5s\"\n"
    ))
    .await;
    let (admin, alice, bob) = app.users().await;
    let r = app
        .call(
            Method::GET,
            "/api/v1/gpus?kind=gpu&limit=100",
            Some(&admin),
            None,
        )
        .await;
    let whole: Vec<String> = r.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|g| g["mig_enabled"] != true)
        .map(|g| g["uuid"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(whole.len(), 4);
    let (x, y, z) = (whole[0].clone(), whole[1].clone(), whole[2].clone());

    // Alice runs on X.
    let r = create(
        &app,
        &alice,
        "alice",
        sleeper("on-x", json!({"devices": [x]})),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);

    let now = now_ms();
    // Bad input: 4xx with the error shape, nothing stored.
    let h = 3_600_000;
    for (body, status, needle) in [
        (
            json!({"devices": [y], "start": at(now - h), "end": at(now + h)}),
            400,
            "past",
        ),
        (
            json!({"devices": [y], "start": at(now + 2 * h), "end": at(now + h)}),
            400,
            "after",
        ),
        (
            json!({"devices": [y], "start": at(now + h), "end": at(now + h + 60_000)}),
            400,
            "15 minutes",
        ),
        (
            json!({"devices": [y], "start": at(now + h), "end": at(now + 400 * 24 * h)}),
            400,
            "at most",
        ),
        (
            json!({"devices": [y], "start": at(now + 200 * 24 * h), "end": at(now + 201 * 24 * h)}),
            400,
            "ahead",
        ),
        (
            json!({"devices": ["GPU-nope"], "start": at(now + h), "end": at(now + 2 * h)}),
            404,
            "not a known device",
        ),
        (
            json!({"devices": [y], "gpu_request": {"count": 1}, "start": at(now + h), "end": at(now + 2 * h)}),
            400,
            "either",
        ),
        (
            json!({"devices": [y], "start": "tomorrow", "end": at(now + 2 * h)}),
            400,
            "RFC 3339",
        ),
        (
            json!({"devices": [y], "start": at(now + h), "end": at(now + 2 * h), "maintenance": true}),
            403,
            "admins",
        ),
        (
            json!({"gpu_request": {"count": 5}, "start": at(now + h), "end": at(now + 2 * h)}),
            400,
            "never",
        ),
    ] {
        let r = book(&app, &bob, "bob", body.clone()).await;
        assert_error(&r, StatusCode::from_u16(status).unwrap(), needle);
    }
    let r = app
        .call(Method::GET, "/api/v1/reservations", Some(&admin), None)
        .await;
    assert_eq!(r.body, json!([]));

    // X is alice's now: bob books it only with 15 minutes' notice to her server.
    let r = book(
        &app,
        &bob,
        "bob",
        json!({"devices": [x], "start": at(now + 60_000), "end": at(now + h)}),
    )
    .await;
    assert_error(&r, StatusCode::CONFLICT, "notice");
    let start = now + 20 * 60_000;
    let r = book(
        &app,
        &bob,
        "bob",
        json!({"devices": [x], "start": at(start), "end": at(start + h), "note": "deadline"}),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    let rid = r.body["id"].as_str().unwrap().to_owned();
    assert_eq!(r.body["owner"], "bob");
    // Alice's server now ends at bob's start, without naming bob.
    let v = server(&app, &alice, "alice", "on-x").await.body;
    assert_eq!(v["ends_at_ms"].as_u64(), Some(start / 1000 * 1000));
    assert!(!v.to_string().contains("bob"), "{v}");
    // Overlaps: 409 naming the window; another user's is not named by owner.
    let r = book(
        &app,
        &bob,
        "bob",
        json!({"devices": [x], "start": at(start + 60_000), "end": at(start + 2 * h)}),
    )
    .await;
    assert_error(&r, StatusCode::CONFLICT, &rid);
    assert_error(&r, StatusCode::CONFLICT, "yours");
    let r = book(
        &app,
        &alice,
        "alice",
        json!({"devices": [x], "start": at(start - 5 * 60_000), "end": at(start + 15 * 60_000)}),
    )
    .await;
    assert_error(&r, StatusCode::CONFLICT, "another user's");
    assert!(!r.body.to_string().contains("bob"));
    // Listing: alice sees the window without owner or note; bob sees his.
    let r = app
        .call(Method::GET, "/api/v1/reservations", Some(&alice), None)
        .await;
    assert_eq!(r.body[0]["id"], rid.as_str());
    assert!(
        r.body[0]["owner"].is_null() && r.body[0]["note"].is_null(),
        "{:?}",
        r.body
    );
    assert_eq!(r.body[0]["mine"], false);
    let r = app
        .call(Method::GET, "/api/v1/reservations", Some(&bob), None)
        .await;
    assert_eq!(r.body[0]["owner"], "bob");
    assert_eq!(r.body[0]["note"], "deadline");
    let r = app
        .call(
            Method::GET,
            &format!(
                "/api/v1/reservations?from={}&to={}",
                at(now),
                at(now + 60_000)
            ),
            Some(&bob),
            None,
        )
        .await;
    assert_eq!(r.body.as_array().unwrap().len(), 0, "{:?}", r.body);
    // Only its owner (or an admin) cancels it.
    let r = app
        .call(
            Method::DELETE,
            &format!("/api/v1/users/bob/reservations/{rid}"),
            Some(&alice),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);

    // Y is bob's from now: alice cannot have it; bob's placement request lands on it.
    let r = book(
        &app,
        &bob,
        "bob",
        json!({"devices": [y], "start": at(now_ms()), "end": at(now_ms() + h)}),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    let ry = r.body["id"].as_str().unwrap().to_owned();
    let r = create(
        &app,
        &alice,
        "alice",
        sleeper("on-y", json!({"devices": [y]})),
    )
    .await;
    assert_error(&r, StatusCode::CONFLICT, "reserved by another user");
    let r = create(&app, &alice, "alice", sleeper("three", gpus(3))).await;
    assert_error(&r, StatusCode::CONFLICT, "free");
    let r = create(&app, &bob, "bob", sleeper("mine", gpus(1))).await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    assert_eq!(r.body["devices"], json!([y]));
    // A reservation that is not his, or does not hold now, does not start servers.
    let r = create(
        &app,
        &alice,
        "alice",
        sleeper("steal", json!({"reservation": ry})),
    )
    .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{:?}", r.body);
    let r = create(
        &app,
        &bob,
        "bob",
        sleeper("early", json!({"reservation": rid})),
    )
    .await;
    assert_error(&r, StatusCode::CONFLICT, "does not hold now");

    // Z is bob's from now and nobody uses it: released after no_show_after (5 s).
    let r = book(
        &app,
        &bob,
        "bob",
        json!({"devices": [z], "start": at(now_ms()), "end": at(now_ms() + h)}),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    let rz = r.body["id"].as_str().unwrap().to_owned();

    // An admin books X for maintenance from 20 s on (admins need no notice): alice's
    // server is warned, then stopped at the start; her volumes would stay.
    let m_start = now_ms() + 20_000;
    let r = app
        .call(
            Method::POST,
            "/api/v1/users/admin/reservations",
            Some(&admin),
            Some(json!({"devices": [x], "start": at(m_start), "end": at(m_start + 16 * 60_000), "maintenance": true})),
        )
        .await;
    // Bob's window starts in 20 minutes; this one ends before.
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    let deadline = Instant::now() + Duration::from_secs(60);
    while server(&app, &alice, "alice", "on-x").await.status != StatusCode::NOT_FOUND {
        assert!(Instant::now() < deadline, "on-x was not stopped");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(now_ms() + 1500 >= m_start, "not stopped before the start");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !kinds(&got).contains(&"server_stopped".to_owned()) {
        assert!(
            Instant::now() < deadline,
            "no stop notice: {:?}",
            kinds(&got)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let k = kinds(&got);
    let warn = k
        .iter()
        .position(|k| k == "server_will_stop")
        .expect("warned");
    let stop = k.iter().position(|k| k == "server_stopped").unwrap();
    assert!(warn < stop, "{k:?}");
    assert!(k.contains(&"reservation_started".to_owned()), "{k:?}");
    // Nobody may start on X during maintenance, not even the admin.
    let r = create(
        &app,
        &alice,
        "alice",
        sleeper("back", json!({"devices": [x]})),
    )
    .await;
    assert_error(&r, StatusCode::CONFLICT, "maintenance");

    // Z was never used: released; Y is used by bob's server: kept.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ids: Vec<String> = app
            .call(Method::GET, "/api/v1/reservations", Some(&bob), None)
            .await
            .body
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["id"].as_str().unwrap().to_owned())
            .collect();
        if !ids.contains(&rz) {
            assert!(ids.contains(&ry), "a used reservation stays: {ids:?}");
            break;
        }
        assert!(Instant::now() < deadline, "no-show not released");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let r = app
        .call(
            Method::DELETE,
            &format!("/api/v1/users/bob/reservations/{rid}"),
            Some(&bob),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let r = app
        .call(
            Method::DELETE,
            &format!("/api/v1/users/bob/reservations/{rid}"),
            Some(&bob),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_requests_and_reservations_survive_sigkill() {
    const PW: &str = "admin-password-for-queue";
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = dir.path().join("kcloud.toml");
    std::fs::write(&config, "[default_quota]\ngpus = 64\n").unwrap();
    let mut p = AggregatorProcess::new(env!("CARGO_BIN_EXE_kcloud-aggregator"), &data)
        .args(["--config", config.to_str().unwrap()])
        .args([
            "--simulate",
            "dgx-h100",
            "--stop-grace",
            "1s",
            "--agent-heartbeat",
            "1s",
        ])
        .env("KCLOUD_BOOTSTRAP_ADMIN_USER", "qadmin")
        .env("KCLOUD_BOOTSTRAP_ADMIN_PASSWORD", PW)
        .log_to(&dir.path().join("aggregator.log"));
    p.spawn();
    p.ready(Duration::from_secs(30)).await;
    let http = reqwest::Client::new();
    let base = p.base();
    let token = http
        .post(format!("{base}/api/v1/auth/login"))
        .json(&json!({"username": "qadmin", "password": PW}))
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap()["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let call = |method: Method, path: String, body: Option<Value>| {
        let (http, token, base) = (http.clone(), token.clone(), base.clone());
        async move {
            let mut req = http
                .request(method, format!("{base}{path}"))
                .bearer_auth(token);
            if let Some(b) = body {
                req = req.json(&b);
            }
            Resp::from(req.send().await.unwrap()).await
        }
    };
    // The embedded agent's 8 GPUs, then all taken by one server.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = call(Method::GET, "/api/v1/gpus?available=true".into(), None).await;
        if r.body["items"].as_array().is_some_and(|a| a.len() == 8) {
            break;
        }
        assert!(Instant::now() < deadline, "no inventory");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let r = call(
        Method::POST,
        "/api/v1/users/qadmin/servers".into(),
        Some(sleeper("all", gpus(8))),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    let r = call(
        Method::POST,
        "/api/v1/users/qadmin/servers".into(),
        Some(sleeper("next", waiting(2))),
    )
    .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{:?}", r.body);
    let start = now_ms() + 3_600_000;
    let r = call(
        Method::POST,
        "/api/v1/users/qadmin/reservations".into(),
        Some(
            json!({"gpu_request": {"count": 1}, "start": at(start), "end": at(start + 3_600_000)}),
        ),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    let rid = r.body["id"].as_str().unwrap().to_owned();

    p.sigkill();
    p.spawn();
    p.ready(Duration::from_secs(30)).await;
    let r = call(Method::GET, "/api/v1/queue".into(), None).await;
    assert_eq!(r.body[0]["name"], "next", "{:?}", r.body);
    let r = call(Method::GET, "/api/v1/reservations".into(), None).await;
    assert_eq!(r.body[0]["id"], rid.as_str(), "{:?}", r.body);
    // And the queue still works: deleting the big server starts the waiting one.
    let r = call(
        Method::DELETE,
        "/api/v1/users/qadmin/servers/all".into(),
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{:?}", r.body);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = call(
            Method::GET,
            "/api/v1/users/qadmin/servers/next".into(),
            None,
        )
        .await;
        if r.body["status"] != "queued" {
            assert_eq!(
                r.body["devices"].as_array().unwrap().len(),
                2,
                "{:?}",
                r.body
            );
            break;
        }
        assert!(Instant::now() < deadline, "never started");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let r = call(
        Method::DELETE,
        "/api/v1/users/qadmin/servers/next".into(),
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
}
