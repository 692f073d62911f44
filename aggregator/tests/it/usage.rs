//! The usage ledger end to end (local shape, simulated A100s, `sleep` servers): GPU-hours
//! normalized by MIG slices, grouped by user, model, node and day, JSON and CSV, who
//! sees what, bad input, open intervals counted live, and an interval left open by an
//! aggregator that stopped closed at its next start, marked recovered.

use std::time::{Duration, Instant};

use kcloud_core::caller::Caller;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::app::TestApp;

async fn start(data: Option<&std::path::Path>) -> TestApp {
    let mut b = TestApp::builder()
        .args([
            "--simulate",
            "dgx-a100-mig",
            "--agent-heartbeat",
            "1s",
            "--stop-grace",
            "1s",
        ])
        .wait_for_gpus();
    if let Some(d) = data {
        b = b.data_dir(d);
    }
    b.start().await
}

fn sleeper(name: &str, devices: Value) -> Value {
    json!({"name": name, "cpu": "100m", "memory": "128Mi", "command": ["sleep", "600"], "devices": devices})
}

async fn free(app: &TestApp, token: &str, query: &str) -> String {
    let r = app
        .call(
            Method::GET,
            &format!("/api/v1/gpus?available=true&limit=1000&{query}"),
            Some(token),
            None,
        )
        .await;
    r.body["items"].as_array().unwrap()[0]["uuid"]
        .as_str()
        .unwrap()
        .to_owned()
}

fn hours(rows: &Value, key: &str) -> f64 {
    rows.as_array()
        .unwrap()
        .iter()
        .find(|r| r["key"] == key)
        .and_then(|r| r["gpu_hours"].as_f64())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gpu_hours_are_recorded_normalized_grouped_and_private() {
    let app = start(None).await;
    let (admin, alice, bob) = app.users().await;
    let gpu = free(&app, &alice, "kind=gpu").await;
    let r = app
        .call(
            Method::GET,
            "/api/v1/gpus?available=true&kind=mig&limit=1000",
            Some(&bob),
            None,
        )
        .await;
    let mig = r.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["profile"] == "3g.40gb")
        .unwrap()["uuid"]
        .as_str()
        .unwrap()
        .to_owned();

    // Bounds on how long each held its device: from before the create answered to
    // after the delete answered (upper), from after the create to before the delete
    // (lower).
    let t0 = Instant::now();
    let r = app
        .call(
            Method::POST,
            "/api/v1/users/alice/servers",
            Some(&alice),
            Some(sleeper("a", json!([gpu]))),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    let r = app
        .call(
            Method::POST,
            "/api/v1/users/bob/servers",
            Some(&bob),
            Some(sleeper("b", json!([mig]))),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    let t1 = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Open intervals count, up to now.
    let r = app
        .call(Method::GET, "/api/v1/usage", Some(&admin), None)
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert!(
        hours(&r.body, "alice") > 0.0 && hours(&r.body, "bob") > 0.0,
        "{:?}",
        r.body
    );
    let t2 = Instant::now();
    for (u, t) in [("alice", &alice), ("bob", &bob)] {
        let name = if u == "alice" { "a" } else { "b" };
        let r = app
            .call(
                Method::DELETE,
                &format!("/api/v1/users/{u}/servers/{name}"),
                Some(t),
                None,
            )
            .await;
        assert_eq!(r.status, StatusCode::NO_CONTENT);
    }
    let t3 = Instant::now();
    let (lo, hi) = (
        (t2 - t1).as_secs_f64() / 3600.0,
        (t3 - t0).as_secs_f64() / 3600.0,
    );

    let r = app
        .call(
            Method::GET,
            "/api/v1/usage?group_by=user",
            Some(&admin),
            None,
        )
        .await;
    let (a, b) = (hours(&r.body, "alice"), hours(&r.body, "bob"));
    assert!(a >= lo && a <= hi, "alice {a} not in [{lo}, {hi}]");
    // A 3g.40gb on an A100 counts 3/7 of a GPU.
    let w = 3.0 / 7.0;
    assert!(
        b >= w * lo && b <= w * hi,
        "bob {b} not in [{}, {}]",
        w * lo,
        w * hi
    );
    assert_eq!(r.body.as_array().unwrap().len(), 2, "{:?}", r.body);
    // After the end, nothing more accrues.
    let again = app
        .call(
            Method::GET,
            "/api/v1/usage?group_by=user",
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(hours(&again.body, "alice"), a);

    let r = app
        .call(
            Method::GET,
            "/api/v1/usage?group_by=model",
            Some(&admin),
            None,
        )
        .await;
    assert!(
        (hours(&r.body, "NVIDIA A100-SXM4-80GB") - (a + b)).abs() < 1e-9,
        "{:?}",
        r.body
    );
    let r = app
        .call(
            Method::GET,
            "/api/v1/usage?group_by=day",
            Some(&admin),
            None,
        )
        .await;
    let today = kcloud_core::usage::day_name(kcloud_core::usage::day_of(kcloud_core::now_ms()));
    assert!(
        (hours(&r.body, &today) - (a + b)).abs() < 1e-9,
        "{:?}",
        r.body
    );
    let r = app
        .call(
            Method::GET,
            "/api/v1/usage?group_by=node",
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(r.body.as_array().unwrap().len(), 1, "{:?}", r.body);

    // Users see their own only; asking for someone else's is 404.
    let r = app
        .call(Method::GET, "/api/v1/usage", Some(&bob), None)
        .await;
    assert_eq!(r.body.as_array().unwrap().len(), 1);
    assert_eq!(r.body[0]["key"], "bob");
    let r = app
        .call(Method::GET, "/api/v1/usage?user=alice", Some(&bob), None)
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = app
        .call(Method::GET, "/api/v1/usage?user=alice", Some(&admin), None)
        .await;
    assert_eq!(r.body.as_array().unwrap().len(), 1);

    // CSV.
    let resp = app
        .client
        .get(format!("{}/api/v1/usage?group_by=user", app.base))
        .bearer_auth(&admin)
        .header("accept", "text/csv")
        .send()
        .await
        .unwrap();
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/csv")
    );
    let text = resp.text().await.unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "key,gpu_hours,recovered");
    assert!(
        lines[1].starts_with("alice,") && lines[2].starts_with("bob,"),
        "{text}"
    );

    // `format=csv` (a link in a browser) too.
    let resp = app
        .client
        .get(format!(
            "{}/api/v1/usage?group_by=model&format=csv",
            app.base
        ))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert!(
        resp.text()
            .await
            .unwrap()
            .starts_with("key,gpu_hours,recovered\r\nNVIDIA A100")
    );

    // The Prometheus counter, by user, model and profile.
    let metrics = app
        .client
        .get(format!("{}/metrics", app.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let value = |labels: &str| -> f64 {
        let line = metrics
            .lines()
            .find(|l| l.starts_with(&format!("kcloud_gpu_hours_total{{{labels}}}")))
            .unwrap_or_else(|| panic!("no series {labels} in\n{metrics}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    };
    let ma = value("user=\"alice\",model=\"NVIDIA A100-SXM4-80GB\",profile=\"\"");
    let mb = value("user=\"bob\",model=\"NVIDIA A100-SXM4-80GB\",profile=\"3g.40gb\"");
    assert!(
        (ma - a).abs() < 1e-9 && (mb - b).abs() < 1e-9,
        "{ma} {mb} vs {a} {b}"
    );

    // Bad input: 400 with the error shape.
    for q in [
        "group_by=team",
        "from=yesterday",
        "from=2026-12-05&to=2026-12-01",
        "from=2020-01-01&to=2026-01-01",
        "x=1",
    ] {
        let r = app
            .call(
                Method::GET,
                &format!("/api/v1/usage?{q}"),
                Some(&admin),
                None,
            )
            .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{q}: {:?}", r.body);
        assert!(r.body["error"]["message"].is_string());
    }

    // A monthly GPU-hour quota: used up (0 here), a create that needs devices is 429;
    // one without devices is not.
    let r = app
        .call(
            Method::PATCH,
            "/api/v1/users/alice",
            Some(&admin),
            Some(json!({"quota": {"gpu_hours_per_month": 0}})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(r.body["quota"]["gpu_hours_per_month"], 0);
    let r = app
        .call(
            Method::POST,
            "/api/v1/users/alice/servers",
            Some(&alice),
            Some(sleeper("more", json!([gpu]))),
        )
        .await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{:?}", r.body);
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("GPU-hour quota used up"),
        "{:?}",
        r.body
    );
    let r = app
        .call(
            Method::POST,
            "/api/v1/users/alice/servers",
            Some(&alice),
            Some(sleeper("cpu-only", json!([]))),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interval_open_when_the_aggregator_stopped_is_closed_at_recovery() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let app = start(Some(&data)).await;
    let (_admin, alice, _bob) = app.users().await;
    let gpu = free(&app, &alice, "kind=gpu").await;
    let r = app
        .call(
            Method::POST,
            "/api/v1/users/alice/servers",
            Some(&alice),
            Some(sleeper("long", json!([gpu]))),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let ids: Vec<String> = app
        .state
        .servers
        .list(&Caller::system(), None)
        .unwrap()
        .into_iter()
        .map(|s| s.id)
        .collect();
    app.stop().await;
    // The server dies while nobody watches.
    kcloud_testkit::process::kill_servers(&ids);
    tokio::time::sleep(Duration::from_millis(500)).await;

    let app = start(Some(&data)).await;
    let admin = app.token("admin", crate::app::ADMIN_PW).await;
    let r = app
        .call(Method::GET, "/api/v1/usage", Some(&admin), None)
        .await;
    let row = r
        .body
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["key"] == "alice")
        .cloned()
        .expect("alice's usage");
    assert_eq!(row["recovered"], true, "{row}");
    let h = row["gpu_hours"].as_f64().unwrap();
    assert!(
        h > 0.0 && h < 60.0 / 3600.0,
        "closed at the last time alive: {h}"
    );
    // Closed for good: it does not grow.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let r = app
        .call(Method::GET, "/api/v1/usage", Some(&admin), None)
        .await;
    assert_eq!(hours(&r.body, "alice"), h);
}
