//! The `kcloud-aggregator` binary as an operator runs it: first start without set-up,
//! SIGTERM, restart with the same data dir, and a damaged database.

use std::process::Command;
use std::time::{Duration, Instant};

use kcloud_testkit::process::AggregatorProcess;
use serde_json::json;

const BIN: &str = env!("CARGO_BIN_EXE_kcloud-aggregator");

/// The binary on `data` with these environment variables, ready.
async fn start(data: &std::path::Path, envs: &[(&str, &str)]) -> AggregatorProcess {
    let mut p = AggregatorProcess::new(BIN, data);
    for (k, v) in envs {
        p = p.env(k, v);
    }
    p.start().await
}

/// `POST /api/v1/auth/login` to an aggregator process; the answer as it comes.
pub(crate) async fn login(base: &str, user: &str, password: &str) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{base}/api/v1/auth/login"))
        .json(&json!({"username": user, "password": password}))
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn first_start_prints_a_password_once_and_data_survives_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut agg = start(&data, &[]).await;
    let (status, out) = agg.sigterm();
    assert!(status.success(), "clean exit on SIGTERM: {status}\n{out}");
    let password = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("password: "))
        .unwrap_or_else(|| panic!("no generated password in: {out}"))
        .to_owned();
    assert!(password.len() >= 16);
    assert_eq!(
        out.matches(password.as_str()).count(),
        1,
        "printed once, never logged: {out}"
    );
    assert!(out.contains("kcloud-aggregator is up: http://127.0.0.1:"));

    // Second start: same admin, same password, nothing printed again.
    let mut agg = start(&data, &[]).await;
    let r = login(&agg.base(), "admin", &password).await;
    assert_eq!(r.status(), 200);
    let token = r.json::<serde_json::Value>().await.unwrap()["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = reqwest::Client::new()
        .post(format!("{}/api/v1/users", agg.base()))
        .bearer_auth(&token)
        .json(&json!({"name": "carol", "password": "carol-password-1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let (status, out) = agg.sigterm();
    assert!(status.success());
    assert!(
        !out.contains("password: "),
        "no new password on a later start: {out}"
    );

    // Third start: the user written before the shutdown is there, and the access token
    // issued by the previous process still verifies (the key is kept in the data dir).
    let agg = start(&data, &[]).await;
    assert_eq!(
        login(&agg.base(), "carol", "carol-password-1")
            .await
            .status(),
        200
    );
    let me = reqwest::Client::new()
        .get(format!("{}/api/v1/me", agg.base()))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(me.status(), 200);
    let mode = |p: &str| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(data.join(p))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode("signing.key"), 0o600);
    assert_eq!(mode("agent.token"), 0o600);
}

#[tokio::test]
async fn bootstrap_admin_comes_from_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let pw_file = dir.path().join("pw");
    std::fs::write(&pw_file, "file-password-for-root\n").unwrap();
    let mut agg = start(
        &data,
        &[
            ("KCLOUD_BOOTSTRAP_ADMIN_USER", "root"),
            (
                "KCLOUD_BOOTSTRAP_ADMIN_PASSWORD_FILE",
                pw_file.to_str().unwrap(),
            ),
        ],
    )
    .await;
    assert_eq!(
        login(&agg.base(), "root", "file-password-for-root")
            .await
            .status(),
        200
    );
    assert_eq!(
        login(&agg.base(), "admin", "file-password-for-root")
            .await
            .status(),
        401
    );
    let (_, out) = agg.sigterm();
    assert!(
        !out.contains("file-password-for-root"),
        "secret in output: {out}"
    );
}

#[test]
fn a_damaged_database_is_a_clear_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("kcloud.db"), vec![0x5a; 8192]).unwrap();
    let out = Command::new(BIN)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            data.to_str().unwrap(),
        ])
        .env("KCLOUD_BOOTSTRAP_ADMIN_PASSWORD", "irrelevant-password")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("kcloud.db"), "names the file: {err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// The GPUs `GET /api/v1/gpus` lists, and whether the node says it is simulated.
async fn local_gpus(base: &str) -> (Vec<serde_json::Value>, bool) {
    let token: serde_json::Value = login(base, "admin", "host-agent-password-1")
        .await
        .json()
        .await
        .unwrap();
    let token = token["access_token"].as_str().unwrap().to_owned();
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let nodes: serde_json::Value = client
            .get(format!("{base}/api/v1/nodes"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if let Some(node) = nodes.as_array().and_then(|n| n.first()) {
            let simulated = node["simulated"].as_bool().unwrap();
            let gpus: serde_json::Value = client
                .get(format!("{base}/api/v1/gpus"))
                .bearer_auth(&token)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            return (gpus["items"].as_array().unwrap().clone(), simulated);
        }
        assert!(Instant::now() < deadline, "no local inventory: {nodes}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Without `--simulate` the local shape reads this host's GPUs through NVML: the real
/// nvml-wrapper loading the fake library.
#[tokio::test]
async fn the_local_agent_reads_this_hosts_gpus_through_nvml() {
    use kcloud_testkit::{FakeGpu, FakeNvml, FakeSpec};
    let fake = FakeNvml::new(&FakeSpec::with_gpus(vec![
        FakeGpu::a100(0),
        FakeGpu::a100_mig(1, &["3g.40gb", "3g.40gb"]),
    ]));
    let dir = tempfile::tempdir().unwrap();
    let agg = start(
        &dir.path().join("data"),
        &[
            ("KCLOUD_NVML_LIB", fake.lib_path().to_str().unwrap()),
            ("KCLOUD_BOOTSTRAP_ADMIN_PASSWORD", "host-agent-password-1"),
        ],
    )
    .await;
    let (gpus, simulated) = local_gpus(&agg.base()).await;
    assert!(!simulated, "real NVML, not simulated");
    let kinds: Vec<(&str, &str)> = gpus
        .iter()
        .map(|g| (g["kind"].as_str().unwrap(), g["model"].as_str().unwrap()))
        .collect();
    // Both A100s, and the two MIG instances of the second one.
    assert_eq!(kinds.len(), 4, "{gpus:#?}");
    assert_eq!(kinds.iter().filter(|(k, _)| *k == "mig").count(), 2);
    assert!(kinds.iter().all(|(_, m)| m.contains("A100")), "{kinds:?}");
    // Allocatable: the whole GPU without MIG and the two instances, not the MIG parent.
    let available = gpus.iter().filter(|g| g["available"] == true).count();
    assert_eq!(available, 3, "{gpus:#?}");
}

/// A host without a driver still gets a usable platform, clearly marked simulated;
/// `--local-agent nvml` insists on NVML instead and shows no devices.
#[tokio::test]
async fn without_a_driver_the_local_agent_falls_back_to_a_labelled_simulation() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-libnvidia-ml.so.1");
    let env = [
        ("KCLOUD_NVML_LIB", missing.to_str().unwrap()),
        ("KCLOUD_BOOTSTRAP_ADMIN_PASSWORD", "host-agent-password-1"),
    ];
    let mut agg = start(&dir.path().join("auto"), &env).await;
    let (gpus, simulated) = local_gpus(&agg.base()).await;
    assert!(simulated, "the fallback is labelled simulated");
    assert!(!gpus.is_empty());
    let (_, out) = agg.sigterm();
    assert!(out.contains("SIMULATED"), "says so on the console: {out}");

    let mut env = env.to_vec();
    env.push(("KCLOUD_LOCAL_AGENT", "nvml"));
    let agg = start(&dir.path().join("nvml"), &env).await;
    let (gpus, simulated) = local_gpus(&agg.base()).await;
    assert!(!simulated);
    assert!(gpus.is_empty(), "{gpus:?}");
}

#[test]
fn kubernetes_without_a_cluster_is_a_clear_error_before_anything_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let out = Command::new(BIN)
        .args(["--listen", "127.0.0.1:0", "--provisioner", "kubernetes"])
        .arg("--data-dir")
        .arg(&data)
        // Neither in a pod nor with a kubeconfig.
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("KUBERNETES_SERVICE_PORT")
        .env("KUBECONFIG", dir.path().join("no-kubeconfig"))
        .env("HOME", dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no Kubernetes client configuration"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(!data.exists(), "nothing written: {err}");
}

#[tokio::test]
async fn json_logs_are_one_object_a_line_with_a_span_per_request_and_a_user_is_named_name_or_username()
 {
    let dir = tempfile::tempdir().unwrap();
    let password = "json-logs-admin-password";
    let mut agg = start(
        &dir.path().join("data"),
        &[
            ("KCLOUD_LOG_FORMAT", "json"),
            ("KCLOUD_BOOTSTRAP_ADMIN_PASSWORD", password),
            ("RUST_LOG", "info,kcloud_http=debug"),
        ],
    )
    .await;
    let client = reqwest::Client::new();
    let url = format!("{}/api/v1/auth/login", agg.base());
    for body in [
        json!({"name": "admin", "password": password}),
        json!({"username": "admin", "password": password}),
    ] {
        let r = client.post(&url).json(&body).send().await.unwrap();
        assert_eq!(r.status(), 200, "{body}");
    }
    let both = json!({"name": "admin", "username": "admin", "password": password});
    let r = client.post(&url).json(&both).send().await.unwrap();
    assert_eq!(r.status(), 400);
    let r = client
        .post(&url)
        .json(&json!({"name": "admin", "password": password}))
        .send()
        .await
        .unwrap();
    let token = r.json::<serde_json::Value>().await.unwrap()["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = client
        .get(format!("{}/api/v1/me", agg.base()))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    let (status, out) = agg.sigterm();
    assert!(status.success(), "{out}");
    let logs: Vec<serde_json::Value> = out
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(!logs.is_empty(), "no JSON log lines in: {out}");
    for l in &logs {
        assert!(l["timestamp"].is_string() && l["level"].is_string(), "{l}");
    }
    // One line per request, in the request's span: route template, status, user.
    let me = logs
        .iter()
        .find(|l| l["fields"]["message"] == "request done" && l["span"]["route"] == "/api/v1/me")
        .unwrap_or_else(|| panic!("no request line for /api/v1/me in: {out}"));
    assert_eq!(me["span"]["method"], "GET");
    assert_eq!(me["span"]["status"], 200);
    assert_eq!(me["span"]["user"], "admin");
    assert!(me["span"]["latency_ms"].as_f64().is_some(), "{me}");
    assert!(!out.contains(&token), "tokens are never logged");
    assert!(
        !out.contains(password),
        "the password is never logged: {out}"
    );
}
