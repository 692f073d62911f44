//! Traces: with the `otel` feature, the binary sends a span per request to an
//! OpenTelemetry collector over OTLP/HTTP; without it, `--otlp-endpoint` is refused at
//! start rather than ignored. (The collector is a stand-in at the boundary: an HTTP
//! endpoint that keeps what the exporter posts.)

use kcloud_testkit::process::AggregatorProcess;

const BIN: &str = env!("CARGO_BIN_EXE_kcloud-aggregator");

#[cfg(not(feature = "otel"))]
#[tokio::test]
async fn an_otlp_endpoint_without_the_feature_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut agg = AggregatorProcess::new(BIN, &dir.path().join("data"))
        .args(["--otlp-endpoint", "http://127.0.0.1:4318"]);
    agg.spawn();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let out = loop {
        if let Some(out) = agg.exited_output() {
            break out;
        }
        assert!(std::time::Instant::now() < deadline, "still running");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert!(out.contains("`otel` feature"), "says why: {out}");
}

#[cfg(feature = "otel")]
// Two workers: the collector must answer the exporter while the test waits (blocking)
// for the process to end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_spans_reach_the_collector() {
    use std::sync::{Arc, Mutex};

    use axum::body::Bytes;
    use axum::routing::post;

    let posts: Arc<Mutex<Vec<Bytes>>> = Arc::default();
    let sink = posts.clone();
    let collector = axum::Router::new().route(
        "/v1/traces",
        post(move |body: Bytes| {
            let sink = sink.clone();
            async move {
                sink.lock().unwrap().push(body);
                // An empty ExportTraceServiceResponse.
                ([("content-type", "application/x-protobuf")], Bytes::new())
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, collector).await });

    let dir = tempfile::tempdir().unwrap();
    let password = "otel-admin-password-1";
    let mut agg = AggregatorProcess::new(BIN, &dir.path().join("data"))
        .args(["--otlp-endpoint", &endpoint])
        .env("KCLOUD_BOOTSTRAP_ADMIN_PASSWORD", password)
        // Batches once a minute instead of every 5 s: all that this test sends is
        // still batched at SIGTERM, which must send it before the process ends.
        .env("OTEL_BSP_SCHEDULE_DELAY", "60000")
        .start()
        .await;
    let http = reqwest::Client::new();
    let session: serde_json::Value = crate::process::login(&agg.base(), "admin", password)
        .await
        .json()
        .await
        .unwrap();
    let token = session["access_token"].as_str().unwrap();
    let me = http
        .get(format!("{}/api/v1/me", agg.base()))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(me.status(), 200);

    let r = http
        .get(format!("{}/api/v1/nodes", agg.base()))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (status, out) = agg.sigterm();
    assert!(status.success(), "clean exit: {status}\n{out}");

    // The protobuf carries its strings as they are: the service, the spans of the
    // requests with their matched routes, and no secret.
    let seen = |needle: &[u8]| {
        posts
            .lock()
            .unwrap()
            .iter()
            .any(|b| b.windows(needle.len()).any(|w| w == needle))
    };
    for needle in [
        "kcloud-aggregator",
        "request",
        "/api/v1/me",
        "/api/v1/nodes",
    ] {
        assert!(seen(needle.as_bytes()), "{needle:?} in the exported spans");
    }
    assert!(!seen(token.as_bytes()), "the bearer token is in no span");
    assert!(!seen(password.as_bytes()), "the password is in no span");
}
