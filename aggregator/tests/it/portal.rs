//! The portal end to end: the `kcloud-aggregator` binary with simulated GPUs and the
//! local provisioner (real JupyterLab), driven in headless Chromium by
//! `tests/browser/portal.mjs` (playwright-core). Screenshots of every step land in
//! `target/portal-screenshots/`.
//!
//! Needs `node`, `chromium`, `jupyter-lab` and `tests/browser/node_modules`
//! (`npm ci` there); `scripts/test.sh` installs them. A missing one fails the test.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use kcloud_testkit::process::AggregatorProcess;
use kcloud_testkit::require_tool;

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_owned()
}

/// The binary with a simulated DGX A100 and the bootstrap admin `root`, ready.
async fn start(data: &std::path::Path, password: &str) -> AggregatorProcess {
    AggregatorProcess::new(env!("CARGO_BIN_EXE_kcloud-aggregator"), data)
        .args([
            "--simulate",
            "dgx-a100-mig",
            "--agent-heartbeat",
            "1s",
            "--stop-grace",
            "2s",
        ])
        .env("KCLOUD_BOOTSTRAP_ADMIN_USER", "root")
        .env("KCLOUD_BOOTSTRAP_ADMIN_PASSWORD", password)
        .start()
        .await
}

#[tokio::test]
async fn portal_walkthrough_in_headless_chromium() {
    let node = require_tool("node");
    let chromium = require_tool("chromium");
    require_tool("jupyter-lab");
    let browser_dir = workspace().join("tests/browser");
    assert!(
        browser_dir.join("node_modules/playwright-core").is_dir(),
        "playwright-core missing: run `npm ci` in tests/browser (scripts/test.sh does)"
    );
    let shots = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| workspace().join("target"), PathBuf::from)
        .join("portal-screenshots");
    let _ = std::fs::remove_dir_all(&shots);

    let dir = tempfile::tempdir().expect("tempdir");
    let password = "portal-admin-password-1";
    let agg = start(&dir.path().join("data"), password).await;

    let base = agg.base();
    let agent_token = std::fs::read_to_string(dir.path().join("data/agent.token"))
        .expect("the agent token the aggregator wrote");
    let shots_arg = shots.clone();
    let run = tokio::task::spawn_blocking(move || {
        Command::new(node)
            .arg("portal.mjs")
            .env("KCLOUD_AGENT_TOKEN", agent_token.trim())
            .current_dir(&browser_dir)
            .env("KCLOUD_URL", &base)
            .env("KCLOUD_ADMIN_USER", "root")
            .env("KCLOUD_ADMIN_PASSWORD", password)
            .env("CHROMIUM", chromium)
            .env("SCREENSHOTS", &shots_arg)
            .output()
            .expect("run node")
    })
    .await
    .expect("join");
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    println!("{log}");
    assert!(
        run.status.success() && log.contains("PORTAL OK"),
        "browser walk failed (screenshots in {}):\n{log}",
        shots.display()
    );
    for name in [
        "cluster",
        "jupyterlab",
        "slice-free-again",
        "admin-denied",
        "fleet-node",
    ] {
        assert!(
            std::fs::read_dir(&shots)
                .expect("screenshots dir")
                .filter_map(Result::ok)
                .any(|e| e.file_name().to_string_lossy().contains(name)),
            "no screenshot of {name} in {}",
            shots.display()
        );
    }
}

/// The attack page `mallory`'s server serves at every path: it tries the API with the
/// visitor's authority in every way a page can, then shows what it got in `#out`.
const ATTACK_PAGE: &str = r#"<!doctype html><meta charset="utf-8"><title>attacking</title>
<pre id="out"></pre>
<script>
(async () => {
  const portal = "__PORTAL__";
  const out = { cookie: document.cookie, tries: [] };
  const csrf = (document.cookie.match(/kcloud_csrf=([^;]*)/) || [])[1] || "";
  const admin = { name: "pwned", password: "pwned-password-123", role: "admin" };
  const volume = { name: "pwned", size: "1Gi" };
  const targets = [
    ["/api/v1/users", admin], [portal + "/api/v1/users", admin],
    ["/api/v1/users/mallory/volumes", volume], [portal + "/api/v1/users/mallory/volumes", volume],
  ];
  for (const [url, body] of targets) {
    for (const credentials of ["include", "same-origin", "omit"]) {
      try {
        const r = await fetch(url, { method: "POST", credentials, body: JSON.stringify(body),
          headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf } });
        out.tries.push([url, credentials, r.status]);
      } catch (e) { out.tries.push([url, credentials, "blocked"]); }
    }
    // A "simple" request needs no preflight: it goes out, its answer stays opaque.
    try {
      await fetch(url, { method: "POST", mode: "no-cors", credentials: "include",
        headers: { "Content-Type": "text/plain" }, body: JSON.stringify(body) });
      out.tries.push([url, "no-cors", "sent"]);
    } catch (e) { out.tries.push([url, "no-cors", "blocked"]); }
  }
  try {
    const r = await fetch(portal + "/api/v1/me", { credentials: "include" });
    out.me = r.status + " " + (await r.text()).slice(0, 80);
  } catch (e) { out.me = "blocked"; }
  document.getElementById("out").textContent = JSON.stringify(out);
  document.title = "attack done";
})();
</script>"#;

/// Serves `ATTACK_HTML` (from the environment) at every path.
const ATTACK_SERVER: &str = "import http.server, os
page = os.environ['ATTACK_HTML'].encode()
class Page(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header('Content-Type', 'text/html; charset=utf-8')
        self.send_header('Content-Length', str(len(page)))
        self.end_headers()
        self.wfile.write(page)
http.server.HTTPServer(('{ip}', {port}), Page).serve_forever()
";

async fn api(
    base: &str,
    method: reqwest::Method,
    path: &str,
    token: &str,
    body: Option<Value>,
) -> (reqwest::StatusCode, Value) {
    let mut req = reqwest::Client::new()
        .request(method, format!("{base}{path}"))
        .bearer_auth(token);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let r = req.send().await.expect("request");
    let status = r.status();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn token(base: &str, user: &str, password: &str) -> String {
    let r = reqwest::Client::new()
        .post(format!("{base}/api/v1/auth/login"))
        .json(&json!({"username": user, "password": password}))
        .send()
        .await
        .expect("login");
    assert_eq!(r.status(), reqwest::StatusCode::OK);
    let body: Value = r.json().await.expect("session");
    body["access_token"].as_str().expect("token").to_owned()
}

/// The attack of issue 12: a page a user's server serves acts with the API as
/// whoever opens it. With servers on their owners' origins it gets nothing, opened
/// by an admin or by its owner.
#[tokio::test]
async fn a_servers_page_cannot_act_as_whoever_opens_it() {
    let node = require_tool("node");
    let chromium = require_tool("chromium");
    require_tool("python3");
    let browser_dir = workspace().join("tests/browser");
    assert!(
        browser_dir.join("node_modules/playwright-core").is_dir(),
        "playwright-core missing: run `npm ci` in tests/browser (scripts/test.sh does)"
    );
    let shots = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| workspace().join("target"), PathBuf::from)
        .join("origin-screenshots");
    let _ = std::fs::remove_dir_all(&shots);
    let dir = tempfile::tempdir().expect("tempdir");
    let password = "origins-admin-password-1";
    let mallory_pw = "mallory-password-1234";
    let agg = start(&dir.path().join("data"), password).await;
    let base = agg.base();
    let root = token(&base, "root", password).await;
    let (status, body) = api(
        &base,
        reqwest::Method::POST,
        "/api/v1/users",
        &root,
        Some(json!({"name": "mallory", "password": mallory_pw})),
    )
    .await;
    assert_eq!(status, reqwest::StatusCode::CREATED, "{body}");
    let mallory = token(&base, "mallory", mallory_pw).await;
    let page = ATTACK_PAGE.replace("__PORTAL__", &base);
    let (status, body) = api(
        &base,
        reqwest::Method::POST,
        "/api/v1/users/mallory/servers",
        &mallory,
        Some(
            json!({"name": "evil", "command": ["python3", "-c", ATTACK_SERVER],
                    "env": {"ATTACK_HTML": page}}),
        ),
    )
    .await;
    assert_eq!(status, reqwest::StatusCode::CREATED, "{body}");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, s) = api(
            &base,
            reqwest::Method::GET,
            "/api/v1/users/mallory/servers/evil",
            &mallory,
            None,
        )
        .await;
        if s["status"] == "running" {
            break;
        }
        assert!(s["status"] != "failed" && Instant::now() < deadline, "{s}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let base_env = base.clone();
    let shots_arg = shots.clone();
    let run = tokio::task::spawn_blocking(move || {
        Command::new(node)
            .arg("origins.mjs")
            .current_dir(&browser_dir)
            .env("KCLOUD_URL", &base_env)
            .env("KCLOUD_ADMIN_USER", "root")
            .env("KCLOUD_ADMIN_PASSWORD", password)
            .env("KCLOUD_MALLORY_PASSWORD", mallory_pw)
            .env("CHROMIUM", chromium)
            .env("SCREENSHOTS", &shots_arg)
            .output()
            .expect("run node")
    })
    .await
    .expect("join");
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    println!("{log}");
    assert!(
        run.status.success() && log.contains("ORIGINS OK"),
        "attack walk failed (screenshots in {}):\n{log}",
        shots.display()
    );
    // The page ran its attempts, as both visitors.
    for who in ["admin", "owner"] {
        let line = log
            .lines()
            .find_map(|l| l.strip_prefix(&format!("RESULT {who} ")))
            .unwrap_or_else(|| panic!("no result for {who}"));
        let result: Value = serde_json::from_str(line).expect("result JSON");
        assert_eq!(
            result["tries"].as_array().map(Vec::len),
            Some(16),
            "{result}"
        );
    }
    // Nothing was created with anyone's authority.
    let (_, users) = api(&base, reqwest::Method::GET, "/api/v1/users", &root, None).await;
    let names: Vec<&str> = users
        .as_array()
        .expect("users")
        .iter()
        .filter_map(|u| u["name"].as_str())
        .collect();
    assert!(!names.contains(&"pwned"), "{names:?}");
    let (_, volumes) = api(
        &base,
        reqwest::Method::GET,
        "/api/v1/users/mallory/volumes",
        &root,
        None,
    )
    .await;
    assert_eq!(volumes, json!([]), "no volume made as mallory");
    let (status, _) = api(
        &base,
        reqwest::Method::DELETE,
        "/api/v1/users/mallory/servers/evil",
        &mallory,
        None,
    )
    .await;
    assert_eq!(status, reqwest::StatusCode::NO_CONTENT);
}
