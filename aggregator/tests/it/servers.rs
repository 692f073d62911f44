//! Servers end to end: the aggregator in-process with simulated GPUs and the local
//! provisioner starting a real JupyterLab (`pip install jupyterlab`), reached through
//! the proxy over real HTTP and websockets. Also the races, quotas and bad input of
//! creating servers (with cheap `sleep` servers), and adoption after a restart.
//!
//! The JupyterLab tests take a shared lock (and a nextest test group) so that two
//! JupyterLabs never start at once on a 2-core machine.

use std::path::Path;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use kcloud_core::caller::Caller;

use crate::app::{B_PW, Resp, TestApp};

/// One JupyterLab at a time.
pub(crate) static JUPYTER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The aggregator with a simulated DGX A100 (4 whole GPUs, 4 in MIG mode).
pub(crate) struct App(TestApp);

impl std::ops::Deref for App {
    type Target = TestApp;

    fn deref(&self) -> &TestApp {
        &self.0
    }
}

impl App {
    pub(crate) async fn start(data: &Path, extra: &[&str]) -> App {
        App(TestApp::builder()
            .data_dir(data)
            .args([
                "--simulate",
                "dgx-a100-mig",
                "--agent-heartbeat",
                "1s",
                "--stop-grace",
                "5s",
            ])
            .args(extra)
            .wait_for_gpus()
            .start()
            .await)
    }

    /// Stops serving as the binary does on SIGTERM (servers keep running).
    async fn stop(self) {
        self.0.stop().await;
    }

    /// Free MIG instances, by UUID.
    pub(crate) async fn free_migs(&self, token: &str) -> Vec<String> {
        self.available(token)
            .await
            .into_iter()
            .filter(|u| u.starts_with("MIG-"))
            .collect()
    }

    async fn available(&self, token: &str) -> Vec<String> {
        let r = self
            .call(
                Method::GET,
                "/api/v1/gpus?available=true&limit=1000",
                Some(token),
                None,
            )
            .await;
        assert_eq!(r.status, StatusCode::OK);
        r.body["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["uuid"].as_str().unwrap().to_owned())
            .collect()
    }

    pub(crate) async fn wait_status(
        &self,
        token: &str,
        path: &str,
        want: &str,
        within: Duration,
    ) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let r = self.call(Method::GET, path, Some(token), None).await;
            assert_eq!(r.status, StatusCode::OK, "{path}: {:?}", r.body);
            if r.body["status"] == want {
                return r.body;
            }
            assert!(
                r.body["status"] != "failed",
                "server failed: {:?}\nlogs:\n{}",
                r.body,
                self.call(
                    Method::GET,
                    &format!("{path}/logs?tail=40"),
                    Some(token),
                    None
                )
                .await
                .body
            );
            assert!(Instant::now() < deadline, "still {:?}", r.body);
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

fn assert_error(r: &Resp, status: StatusCode, needle: &str) {
    assert_eq!(r.status, status, "{:?}", r.body);
    let msg = r.body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        r.body["error"]["code"].is_string() && msg.contains(needle),
        "wanted {needle:?} in {:?}",
        r.body
    );
}

/// A Jupyter kernel connection over the proxy (JSON text frames).
pub(crate) struct Kernel {
    ws: tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>,
    session: String,
}

impl Kernel {
    async fn open(app: &App, token: &str, kernel: &str) -> Kernel {
        let base = app.base.replacen("http://", "ws://", 1);
        Kernel::connect(
            app,
            &base,
            kernel,
            &[("authorization", format!("Bearer {token}"))],
        )
        .await
        .expect("websocket through the proxy")
    }

    /// Connects to alice's `lab` kernel `kernel` at `ws_base` (`ws://host:port`, the
    /// portal's or a user's origin; the connection goes to this aggregator either way)
    /// with these request headers.
    pub(crate) async fn connect(
        app: &TestApp,
        ws_base: &str,
        kernel: &str,
        headers: &[(&str, String)],
    ) -> Result<Kernel, tungstenite::Error> {
        let session = uuid::Uuid::new_v4().to_string();
        let url =
            format!("{ws_base}/user/alice/lab/api/kernels/{kernel}/channels?session_id={session}");
        let mut req = url.into_client_request()?;
        for (name, value) in headers {
            let name: http::HeaderName = name.parse().expect("header name");
            req.headers_mut()
                .insert(name, value.parse().expect("header value"));
        }
        let tcp = tokio::net::TcpStream::connect(&app.addr).await?;
        let (ws, _) = tokio_tungstenite::client_async(req, tcp).await?;
        Ok(Kernel { ws, session })
    }

    pub(crate) async fn close(mut self) {
        self.ws.close(None).await.unwrap();
    }

    /// Runs `code`; returns its `text/plain` result.
    pub(crate) async fn execute(&mut self, code: &str) -> String {
        let msg_id = uuid::Uuid::new_v4().to_string();
        let msg = json!({
            "header": {"msg_id": msg_id, "username": "alice", "session": self.session,
                       "msg_type": "execute_request", "version": "5.3"},
            "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
            "content": {"code": code, "silent": false, "store_history": false,
                        "user_expressions": {}, "allow_stdin": false, "stop_on_error": true}
        });
        self.ws
            .send(tungstenite::Message::Text(msg.to_string().into()))
            .await
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let m = tokio::time::timeout(left, self.ws.next())
                .await
                .expect("no execute_result in time")
                .expect("websocket ended")
                .unwrap();
            let tungstenite::Message::Text(t) = m else {
                continue;
            };
            let v: Value = serde_json::from_str(t.as_str()).unwrap();
            if v["parent_header"]["msg_id"] != msg_id.as_str() {
                continue;
            }
            match v["header"]["msg_type"].as_str().unwrap_or_default() {
                "execute_result" => {
                    return v["content"]["data"]["text/plain"]
                        .as_str()
                        .unwrap()
                        .to_owned();
                }
                "error" => panic!("kernel error: {v}"),
                _ => {}
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_jupyterlab_on_a_mig_instance_through_the_proxy() {
    let _one = JUPYTER.lock().await;
    let t0 = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let app = App::start(&dir.path().join("data"), &[]).await;
    let (admin, alice, bob) = app.users().await;
    let uuid = app.free_migs(&alice).await.remove(0);

    // Create: answered at once, pending, never waiting for JupyterLab.
    let asked = Instant::now();
    let r = app
        .call(
            Method::POST,
            "/api/v1/users/alice/servers",
            Some(&alice),
            Some(json!({"name": "lab", "devices": [uuid], "preset": "small"})),
        )
        .await;
    let create_ms = asked.elapsed().as_millis();
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    assert_eq!(r.body["status"], "pending");
    assert_eq!(r.body["devices"], json!([uuid]));
    assert_eq!(r.body["url"], "/user/alice/lab/");
    assert_eq!(r.body["cpu_millis"], 2000);
    assert!(
        !r.body.to_string().contains("token"),
        "no token in the API: {}",
        r.body
    );
    let r = app
        .call(
            Method::GET,
            "/user/alice/lab/api/status",
            Some(&alice),
            None,
        )
        .await;
    assert_error(&r, StatusCode::SERVICE_UNAVAILABLE, "starting");

    let server = app
        .wait_status(
            &alice,
            "/api/v1/users/alice/servers/lab",
            "running",
            Duration::from_secs(90),
        )
        .await;
    let running_ms = asked.elapsed().as_millis();
    assert!(server["ready_at_ms"].as_u64().is_some());
    let token = app
        .state
        .servers
        .get(&Caller::system(), "alice", "lab")
        .unwrap()
        .upstream
        .unwrap()
        .token
        .expect("JupyterLab has a token")
        .to_string();

    // Through the proxy: the owner and admins; nobody else learns it exists.
    let r = app
        .call(
            Method::GET,
            "/user/alice/lab/api/status",
            Some(&alice),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert!(r.body["started"].is_string(), "{:?}", r.body);
    let r = app
        .call(
            Method::GET,
            "/user/alice/lab/api/status",
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    for path in [
        "/api/v1/users/alice/servers/lab",
        "/api/v1/users/alice/servers/lab/logs",
        "/api/v1/users/alice/servers/lab/events",
        "/user/alice/lab/api/status",
        "/user/alice/lab/",
    ] {
        let r = app.call(Method::GET, path, Some(&bob), None).await;
        assert_error(&r, StatusCode::NOT_FOUND, "");
    }
    let r = app
        .call(
            Method::DELETE,
            "/api/v1/users/alice/servers/lab",
            Some(&bob),
            None,
        )
        .await;
    assert_error(&r, StatusCode::NOT_FOUND, "");
    let r = app
        .call(Method::GET, "/user/alice/lab/api/status", None, None)
        .await;
    assert_error(&r, StatusCode::UNAUTHORIZED, "");
    let r = app
        .call(
            Method::GET,
            "/user/alice/nope/api/status",
            Some(&alice),
            None,
        )
        .await;
    assert_error(&r, StatusCode::NOT_FOUND, "no server alice/nope");
    let r = app
        .call(Method::GET, "/api/v1/servers", Some(&bob), None)
        .await;
    assert_eq!(r.body, json!([]));
    let r = app
        .call(Method::GET, "/api/v1/servers", Some(&admin), None)
        .await;
    assert_eq!(r.body.as_array().unwrap().len(), 1);
    // No trailing slash: redirected under the base URL, query kept.
    let no_follow = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let r = no_follow
        .get(format!("{}/user/alice/lab?reset", app.base))
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PERMANENT_REDIRECT);
    assert_eq!(r.headers()["location"], "/user/alice/lab/?reset");

    // The device is held by this server.
    assert!(!app.available(&alice).await.contains(&uuid));
    let r = app
        .call(
            Method::GET,
            "/api/v1/gpus?limit=1000&kind=mig",
            Some(&admin),
            None,
        )
        .await;
    let held = r.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["uuid"] == uuid.as_str())
        .unwrap()
        .clone();
    assert_eq!(held["holder"], json!({"user": "alice", "server": "lab"}));

    // A kernel over the proxied websocket: 1+1, and the devices it sees.
    let r = app
        .call(
            Method::POST,
            "/user/alice/lab/api/kernels",
            Some(&alice),
            Some(json!({"name": "python3"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    let kernel = r.body["id"].as_str().unwrap().to_owned();
    let mut k = Kernel::open(&app, &alice, &kernel).await;
    assert_eq!(k.execute("1+1").await, "2");
    let seen = k
        .execute(
            "import os; os.environ['CUDA_VISIBLE_DEVICES'] + '|' + os.environ['NVIDIA_VISIBLE_DEVICES']",
        )
        .await;
    assert_eq!(seen, format!("'{uuid}|{uuid}'"));
    let mut round_trips = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        assert_eq!(k.execute("1+1").await, "2");
        round_trips.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    round_trips.sort_by(f64::total_cmp);
    let median_ms = round_trips[round_trips.len() / 2];
    k.close().await;

    // Bodies over the API's 1 MiB limit stream through, both ways.
    let big = "x".repeat(3 << 20);
    let r = app
        .call(
            Method::PUT,
            "/user/alice/lab/api/contents/big.txt",
            Some(&alice),
            Some(json!({"type": "file", "format": "text", "content": big})),
        )
        .await;
    assert!(r.status.is_success(), "{:?}", r.status);
    let r = app
        .client
        .get(format!(
            "{}/user/alice/lab/files/big.txt?download=1",
            app.base
        ))
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.bytes().await.unwrap().len(), 3 << 20);

    // Logs and events, without the token.
    let r = app
        .call(
            Method::GET,
            "/api/v1/users/alice/servers/lab/logs?tail=500",
            Some(&alice),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let logs = r.body.as_str().unwrap().to_owned();
    assert!(logs.contains("Jupyter Server"), "{logs}");
    assert!(!logs.contains(&token));
    let r = app
        .call(
            Method::GET,
            "/api/v1/users/alice/servers/lab/events",
            Some(&alice),
            None,
        )
        .await;
    let kinds: Vec<&str> = r
        .body
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["Created", "Started", "Ready"]);
    let activity = app
        .call(
            Method::GET,
            "/api/v1/users/alice/servers/lab",
            Some(&alice),
            None,
        )
        .await
        .body["last_activity_ms"]
        .as_u64()
        .unwrap();
    assert!(
        activity > server["last_activity_ms"].as_u64().unwrap(),
        "proxied traffic is activity"
    );

    // Delete: stopped, devices free, gone.
    let addr = app
        .state
        .servers
        .get(&Caller::system(), "alice", "lab")
        .unwrap()
        .upstream
        .unwrap()
        .addr;
    let deleting = Instant::now();
    let r = app
        .call(
            Method::DELETE,
            "/api/v1/users/alice/servers/lab",
            Some(&alice),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{:?}", r.body);
    let delete_ms = deleting.elapsed().as_millis();
    assert!(
        app.available(&alice).await.contains(&uuid),
        "device free again"
    );
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "JupyterLab stopped"
    );
    let r = app
        .call(
            Method::GET,
            "/api/v1/users/alice/servers/lab",
            Some(&alice),
            None,
        )
        .await;
    assert_error(&r, StatusCode::NOT_FOUND, "");
    let r = app
        .call(
            Method::DELETE,
            "/api/v1/users/alice/servers/lab",
            Some(&alice),
            None,
        )
        .await;
    assert_error(&r, StatusCode::NOT_FOUND, "");
    let r = app
        .call(
            Method::GET,
            "/user/alice/lab/api/status",
            Some(&alice),
            None,
        )
        .await;
    assert_error(&r, StatusCode::NOT_FOUND, "");
    let audit = app.state.auth.repo().audit_log(50).await.unwrap();
    for action in ["server_create", "server_delete"] {
        assert!(
            audit
                .iter()
                .any(|e| e.action == action && e.target == "alice/lab" && e.actor == "alice"),
            "{action} audited"
        );
    }
    eprintln!(
        "timings: create answered in {create_ms} ms; running after {running_ms} ms; \
         kernel 1+1 round trip median {median_ms:.1} ms (min {:.1}, max {:.1}); \
         delete {delete_ms} ms; whole test {} ms",
        round_trips[0],
        round_trips[round_trips.len() - 1],
        t0.elapsed().as_millis()
    );
    app.stop().await;
}

/// Storage end to end: a file uploaded through the file browser is read by a kernel of
/// a JupyterLab that mounts the volume at `work/`; what the kernel writes there is
/// seen by the browser; the volume and its files outlive the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_outlives_the_jupyterlab_that_mounted_it() {
    let _one = JUPYTER.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let app = App::start(&dir.path().join("data"), &[]).await;
    let (_admin, alice, _bob) = app.users().await;
    let r = app
        .call(
            Method::POST,
            "/api/v1/users/alice/volumes",
            Some(&alice),
            Some(json!({"name": "data", "size": "64Mi"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    let files = format!("{}/api/v1/users/alice/volumes/data/files", app.base);
    let r = app
        .client
        .put(format!("{files}/hello.txt"))
        .bearer_auth(&alice)
        .body("hello from the file browser")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);

    let r = app
        .call(
            Method::POST,
            "/api/v1/users/alice/servers",
            Some(&alice),
            Some(json!({"name": "lab", "preset": "small", "volumes": [{"volume": "data"}]})),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    assert_eq!(r.body["volumes"][0]["mount_path"], "/home/jovyan/work");
    app.wait_status(
        &alice,
        "/api/v1/users/alice/servers/lab",
        "running",
        Duration::from_secs(90),
    )
    .await;
    let r = app
        .call(
            Method::POST,
            "/user/alice/lab/api/kernels",
            Some(&alice),
            Some(json!({"name": "python3"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    let kernel = r.body["id"].as_str().unwrap().to_owned();
    let mut k = Kernel::open(&app, &alice, &kernel).await;
    assert_eq!(
        k.execute("open('work/hello.txt').read()").await,
        "'hello from the file browser'"
    );
    assert_eq!(
        k.execute("open('work/from-kernel.txt', 'w').write('written by a kernel')")
            .await,
        "19"
    );
    k.close().await;
    let got = app
        .client
        .get(format!("{files}/from-kernel.txt"))
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap();
    assert_eq!(got.status(), StatusCode::OK);
    assert_eq!(got.text().await.unwrap(), "written by a kernel");

    let r = app
        .call(
            Method::DELETE,
            "/api/v1/users/alice/volumes/data",
            Some(&alice),
            None,
        )
        .await;
    assert_error(&r, StatusCode::CONFLICT, "lab");
    let r = app
        .call(
            Method::DELETE,
            "/api/v1/users/alice/servers/lab",
            Some(&alice),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{:?}", r.body);
    let r = app
        .call(
            Method::GET,
            "/api/v1/users/alice/volumes",
            Some(&alice),
            None,
        )
        .await;
    assert_eq!(r.body[0]["name"], "data", "{:?}", r.body);
    assert_eq!(r.body[0]["mounted_by"], json!([]));
    for (name, want) in [
        ("hello.txt", "hello from the file browser"),
        ("from-kernel.txt", "written by a kernel"),
    ] {
        let got = app
            .client
            .get(format!("{files}/{name}"))
            .bearer_auth(&alice)
            .send()
            .await
            .unwrap();
        assert_eq!(got.text().await.unwrap(), want);
    }
    app.stop().await;
}

/// Servers that are `sleep`: cheap, never answer, fine for races and rules.
/// The `code-server` profile (VS Code in the browser, npm package `code-server`): served
/// at `/` behind the proxy, which strips `/user/{user}/{server}`; its own auth off, the
/// proxy's on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn code_server_through_the_proxy() {
    kcloud_testkit::require_tool("code-server");
    let _one = JUPYTER.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let app = App::start(&dir.path().join("data"), &[]).await;
    let (_admin, alice, bob) = app.users().await;
    let profiles = app
        .call(Method::GET, "/api/v1/profiles", Some(&alice), None)
        .await;
    assert_eq!(profiles.body["code-server"]["base_url"], "strip");
    for (body, needle) in [
        (json!({"name": "x", "profile": "emacs"}), "does not exist"),
        (
            json!({"name": "x", "profile": "code-server", "command": ["sh"]}),
            "custom",
        ),
        (json!({"name": "x", "profile": "custom"}), "give `command`"),
    ] {
        let r = app
            .call(
                Method::POST,
                "/api/v1/users/alice/servers",
                Some(&alice),
                Some(body),
            )
            .await;
        assert_error(&r, StatusCode::BAD_REQUEST, needle);
    }
    let uuid = app.free_migs(&alice).await.remove(0);
    let r = app
        .call(
            Method::POST,
            "/api/v1/users/alice/servers",
            Some(&alice),
            Some(json!({"name": "vscode", "profile": "code-server", "devices": [uuid]})),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    assert_eq!(r.body["profile"], "code-server");
    app.wait_status(
        &alice,
        "/api/v1/users/alice/servers/vscode",
        "running",
        Duration::from_secs(90),
    )
    .await;

    // Its page through the proxy on alice's origin, signed in as a browser is: a
    // relative redirect to the folder, then the workbench, whose scripts and styles
    // load from under the same prefix.
    let cookie = app.open_server(&alice, "alice", "vscode", false).await;
    let client = app.origin_client(&["alice"]);
    let origin = app.user_origin("alice");
    let get = |path: String| {
        client
            .get(format!("{origin}{path}"))
            .header("cookie", &cookie)
            .send()
    };
    let r = get("/user/alice/vscode/".into()).await.unwrap();
    assert_eq!(r.status(), StatusCode::FOUND);
    let to = r.headers()["location"].to_str().unwrap().to_owned();
    assert!(to.starts_with("./?folder="), "{to}");
    let r = get(format!("/user/alice/vscode/{}", &to[2..]))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let html = r.text().await.unwrap();
    let script = html
        .split("src=\"")
        .skip(1)
        .filter_map(|s| s.split('"').next())
        .find(|s| s.ends_with("workbench.js"))
        .unwrap_or_else(|| panic!("no workbench script in {html}"));
    assert!(!script.starts_with('/'), "relative asset URLs: {script}");
    let r = get(format!("/user/alice/vscode/{script}")).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(
        r.bytes().await.unwrap().len() > 10_000,
        "the workbench script"
    );

    // Its auth is the proxy's: no credentials, or another user, get nothing.
    for base in [&app.base, &origin] {
        let r = client
            .get(format!("{base}/user/alice/vscode/"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        let r = client
            .get(format!("{base}/user/alice/vscode/"))
            .bearer_auth(&bob)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
    }

    let r = app
        .call(
            Method::DELETE,
            "/api/v1/users/alice/servers/vscode",
            Some(&alice),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{:?}", r.body);
    assert!(app.free_migs(&alice).await.contains(&uuid), "device freed");
}

/// Idle culling: a server nobody uses is stopped and its device freed; an exempted
/// one stays; a JupyterLab whose kernel is busy without any traffic stays until the
/// kernel is done and then goes too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_servers_are_culled_unless_working_or_exempt() {
    let _one = JUPYTER.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let settings = dir.path().join("kcloud.toml");
    std::fs::write(
        &settings,
        "[culling]\nidle_timeout = \"4s\"\ninterval = \"200ms\"\n",
    )
    .unwrap();
    let app = App::start(
        &dir.path().join("data"),
        &["--config", settings.to_str().unwrap()],
    )
    .await;
    let (admin, alice, _bob) = app.users().await;
    let migs = app.free_migs(&alice).await;
    let web = |name: &str, dev: &str| {
        json!({"name": name, "devices": [dev], "command":
            ["python3", "-m", "http.server", "{port}", "--bind", "127.0.0.1"]})
    };
    let servers = "/api/v1/users/alice/servers";
    for body in [
        web("kept", &migs[0]),
        web("idle", &migs[1]),
        json!({"name": "lab", "devices": [migs[2]]}),
    ] {
        let r = app
            .call(Method::POST, servers, Some(&alice), Some(body))
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    }
    // Only an admin exempts.
    let exempt = json!({"cull_exempt": true});
    let r = app
        .call(
            Method::PATCH,
            "/api/v1/users/alice/servers/kept",
            Some(&alice),
            Some(exempt.clone()),
        )
        .await;
    assert_error(&r, StatusCode::FORBIDDEN, "admins");
    let r = app
        .call(
            Method::PATCH,
            "/api/v1/users/alice/servers/kept",
            Some(&admin),
            Some(exempt),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(r.body["cull_exempt"], true);
    for name in ["kept", "lab"] {
        app.wait_status(
            &alice,
            &format!("{servers}/{name}"),
            "running",
            Duration::from_secs(90),
        )
        .await;
    }

    // A kernel that works for 10 s without a word.
    let r = app
        .call(
            Method::POST,
            "/user/alice/lab/api/kernels",
            Some(&alice),
            Some(json!({"name": "python3"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    let kernel = r.body["id"].as_str().unwrap().to_owned();
    let mut k = Kernel::open(&app, &alice, &kernel).await;
    let busy = tokio::spawn(async move {
        let out = k.execute("import time; time.sleep(10); 1+1").await;
        (k, out)
    });

    let exists = |name: &'static str| {
        let app = &app;
        let alice = &alice;
        async move {
            app.call(
                Method::GET,
                &format!("/api/v1/users/alice/servers/{name}"),
                Some(alice),
                None,
            )
            .await
            .status
                == StatusCode::OK
        }
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while exists("idle").await {
        assert!(Instant::now() < deadline, "the idle server was not culled");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(app.free_migs(&alice).await.contains(&migs[1]), "freed");
    let (k, out) = busy.await.unwrap();
    assert_eq!(out, "2");
    assert!(exists("lab").await, "a busy kernel kept its JupyterLab");
    drop(k);

    let deadline = Instant::now() + Duration::from_secs(30);
    while exists("lab").await {
        assert!(
            Instant::now() < deadline,
            "the idle JupyterLab was not culled"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(app.free_migs(&alice).await.contains(&migs[2]), "freed");
    assert!(exists("kept").await, "the exempt server stays");
    let culled: Vec<String> = app
        .state
        .auth
        .repo()
        .audit_log(100)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.action == "server_cull" && e.actor == "system")
        .map(|e| e.target)
        .collect();
    assert_eq!(culled.len(), 2, "{culled:?}");
    assert!(culled.contains(&"alice/idle".to_owned()) && culled.contains(&"alice/lab".to_owned()));
}

/// `.../logs?follow=true`: the tail, then new lines as the server writes them, and
/// the response ends once the server is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_follow_a_server_until_it_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let app = App::start(&dir.path().join("data"), &[]).await;
    let (_admin, alice, bob) = app.users().await;
    let r = app
        .call(
            Method::POST,
            "/api/v1/users/alice/servers",
            Some(&alice),
            Some(json!({"name": "ticker", "command": ["sh", "-c",
                "i=0; while true; do echo tick $i; i=$((i+1)); sleep 0.2; done"]})),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    let logs = "/api/v1/users/alice/servers/ticker/logs?follow=true&tail=2";
    // Another user learns nothing.
    let r = app.call(Method::GET, logs, Some(&bob), None).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);

    let mut resp = app
        .client
        .get(format!("{}{logs}", app.base))
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut seen = String::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    // Lines keep arriving on the one open response.
    while !seen.contains("tick 8\n") {
        let left = deadline.saturating_duration_since(Instant::now());
        let chunk = tokio::time::timeout(left, resp.chunk())
            .await
            .expect("new lines in time")
            .unwrap()
            .expect("still open");
        seen.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    let ticks: Vec<u32> = seen
        .lines()
        .filter_map(|l| l.strip_prefix("tick ")?.parse().ok())
        .collect();
    assert!(
        ticks.windows(2).all(|w| w[1] == w[0] + 1),
        "in order, none lost or repeated: {ticks:?}"
    );

    let r = app
        .call(
            Method::DELETE,
            "/api/v1/users/alice/servers/ticker",
            Some(&alice),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        while resp.chunk().await.unwrap().is_some() {}
    })
    .await;
    assert!(ended.is_ok(), "the response ends when the server is gone");
}

fn sleeper(name: &str, devices: &[&str]) -> Value {
    json!({"name": name, "devices": devices, "cpu": "500m", "memory": "1Gi",
           "command": ["sleep", "600"]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn races_quotas_and_bad_requests() {
    let dir = tempfile::tempdir().unwrap();
    let app = App::start(
        &dir.path().join("data"),
        &["--jupyter-command", "/nonexistent/bin/jupyter-lab"],
    )
    .await;
    let (admin, alice, bob) = app.users().await;
    let initial = app.available(&admin).await;
    let migs = app.free_migs(&alice).await;

    // Two users race for one device: exactly one wins.
    let (a, b) = tokio::join!(
        app.call(
            Method::POST,
            "/api/v1/users/alice/servers",
            Some(&alice),
            Some(sleeper("race", &[&migs[0]]))
        ),
        app.call(
            Method::POST,
            "/api/v1/users/bob/servers",
            Some(&bob),
            Some(sleeper("race", &[&migs[0]]))
        ),
    );
    let mut statuses = [a.status, b.status];
    statuses.sort();
    assert_eq!(
        statuses,
        [StatusCode::CREATED, StatusCode::CONFLICT],
        "{a:?} {b:?}"
    );
    let (winner, loser) = if a.status == StatusCode::CREATED {
        (("alice", &alice), b)
    } else {
        (("bob", &bob), a)
    };
    let _ = winner.1;
    assert_error(&loser, StatusCode::CONFLICT, &migs[0]);
    // One user racing themself for one device under two names.
    let (a, b) = tokio::join!(
        app.call(
            Method::POST,
            "/api/v1/users/alice/servers",
            Some(&alice),
            Some(sleeper("twin-1", &[&migs[1]]))
        ),
        app.call(
            Method::POST,
            "/api/v1/users/alice/servers",
            Some(&alice),
            Some(sleeper("twin-2", &[&migs[1]]))
        ),
    );
    let mut statuses = [a.status, b.status];
    statuses.sort();
    assert_eq!(
        statuses,
        [StatusCode::CREATED, StatusCode::CONFLICT],
        "{a:?} {b:?}"
    );
    let twin = if a.status == StatusCode::CREATED {
        "twin-1"
    } else {
        "twin-2"
    };

    // Name in use.
    let r = app
        .call(
            Method::POST,
            "/api/v1/users/alice/servers",
            Some(&alice),
            Some(sleeper(twin, &[])),
        )
        .await;
    assert_error(&r, StatusCode::CONFLICT, "already in use");

    // Bad input: 4xx in the error shape, nothing made.
    let before = app.available(&admin).await;
    for (body, status, needle) in [
        (
            json!({"name": "Bad_Name"}),
            StatusCode::BAD_REQUEST,
            "DNS-1123",
        ),
        (
            json!({"name": "v", "volumes": [{"name": "data"}]}),
            StatusCode::BAD_REQUEST,
            "unknown field",
        ),
        (
            json!({"name": "i", "image": "docker.io/evil/miner:latest"}),
            StatusCode::BAD_REQUEST,
            "not allowed",
        ),
        (
            json!({"name": "e", "env": {"CUDA_VISIBLE_DEVICES": "0"}}),
            StatusCode::BAD_REQUEST,
            "set by kcloud",
        ),
        (
            json!({"name": "e", "env": {"not a name": "0"}}),
            StatusCode::BAD_REQUEST,
            "not a valid variable name",
        ),
        (
            json!({"name": "p", "preset": "gigantic"}),
            StatusCode::BAD_REQUEST,
            "does not exist",
        ),
        (
            json!({"name": "g", "devices": [&migs[2]], "gpu_request": {"count": 1}}),
            StatusCode::BAD_REQUEST,
            "not both",
        ),
        (
            json!({"name": "w", "devices": ["GPU-does-not-exist"]}),
            StatusCode::NOT_FOUND,
            "not found",
        ),
        (
            json!({"name": "c", "command": ["no-such-program-kcloud"]}),
            StatusCode::BAD_REQUEST,
            "no-such-program-kcloud",
        ),
        (
            json!({"name": "x", "unknown": true}),
            StatusCode::BAD_REQUEST,
            "unknown",
        ),
    ] {
        let shown = body.to_string();
        let r = app
            .call(
                Method::POST,
                "/api/v1/users/alice/servers",
                Some(&alice),
                Some(body),
            )
            .await;
        assert_eq!(r.status, status, "{shown}: {:?}", r.body);
        assert_error(&r, status, needle);
    }
    // No jupyter on this host (--jupyter-command points nowhere): a clear 503, and the
    // device claimed for it is free again.
    let r = app
        .call(
            Method::POST,
            "/api/v1/users/alice/servers",
            Some(&alice),
            Some(json!({"name": "nolab", "devices": [&migs[2]]})),
        )
        .await;
    assert_error(
        &r,
        StatusCode::SERVICE_UNAVAILABLE,
        "pip install jupyterlab",
    );
    assert_eq!(
        app.available(&admin).await,
        before,
        "nothing held by refused creates"
    );

    // Quotas, with bob holding exactly one server on one device.
    if winner.0 == "alice" {
        let r = app
            .call(
                Method::POST,
                "/api/v1/users/bob/servers",
                Some(&bob),
                Some(sleeper("one", &[&migs[3]])),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    }
    let patch = |q: Value| {
        app.call(
            Method::PATCH,
            "/api/v1/users/bob",
            Some(&admin),
            Some(json!({"quota": q})),
        )
    };
    let create_for_bob = |name: &'static str, devices: Vec<String>| {
        let devices: Vec<&str> = devices.iter().map(String::as_str).collect();
        let body = sleeper(name, &devices);
        app.call(
            Method::POST,
            "/api/v1/users/bob/servers",
            Some(&bob),
            Some(body),
        )
    };
    assert_eq!(patch(json!({"servers": 1})).await.status, StatusCode::OK);
    let r = create_for_bob("two", vec![]).await;
    assert_error(&r, StatusCode::TOO_MANY_REQUESTS, "server quota exceeded");
    assert_eq!(patch(json!({"gpus": 1})).await.status, StatusCode::OK);
    let r = create_for_bob("two", vec![migs[4].clone()]).await;
    assert_error(&r, StatusCode::TOO_MANY_REQUESTS, "device quota exceeded");
    assert_eq!(
        patch(json!({"cpu_millis": 800})).await.status,
        StatusCode::OK
    );
    let r = create_for_bob("two", vec![]).await;
    assert_error(&r, StatusCode::TOO_MANY_REQUESTS, "CPU quota exceeded");
    assert_eq!(patch(json!({})).await.status, StatusCode::OK);
    let r = create_for_bob("two", vec![]).await;
    assert_eq!(
        r.status,
        StatusCode::CREATED,
        "within the default quota again"
    );

    // Lists: own for users, all for admins; admins delete anyone's.
    let owned_app = app;
    let app = &owned_app;
    let list = |t: &str| {
        let t = t.to_owned();
        async move {
            let r = app
                .call(Method::GET, "/api/v1/servers", Some(&t), None)
                .await;
            let mut names: Vec<String> = r
                .body
                .as_array()
                .unwrap()
                .iter()
                .map(|s| {
                    format!(
                        "{}/{}",
                        s["owner"].as_str().unwrap(),
                        s["name"].as_str().unwrap()
                    )
                })
                .collect();
            names.sort();
            names
        }
    };
    let all = list(&admin).await;
    let alices = list(&alice).await;
    assert!(alices.iter().all(|n| n.starts_with("alice/")) && !alices.is_empty());
    assert!(all.len() > alices.len() && all.iter().any(|n| n.starts_with("bob/")));
    let r = app
        .call(Method::DELETE, "/api/v1/users/alice", Some(&admin), None)
        .await;
    assert_error(&r, StatusCode::CONFLICT, "");
    for name in &all {
        let r = app
            .call(
                Method::DELETE,
                &format!(
                    "/api/v1/users/{}/servers/{}",
                    name.split('/').next().unwrap(),
                    name.split('/').nth(1).unwrap()
                ),
                Some(&admin),
                None,
            )
            .await;
        assert_eq!(r.status, StatusCode::NO_CONTENT, "{name}: {:?}", r.body);
    }
    assert!(list(&admin).await.is_empty());
    assert_eq!(app.available(&admin).await, initial, "every device back");
    // Servers of users in the OpenAPI document.
    let spec = app
        .call(Method::GET, "/api/openapi.json", None, None)
        .await
        .body;
    for (path, method) in [
        ("/api/v1/servers", "get"),
        ("/api/v1/users/{user}/servers", "get"),
        ("/api/v1/users/{user}/servers", "post"),
        ("/api/v1/users/{user}/servers/{server}", "get"),
        ("/api/v1/users/{user}/servers/{server}", "delete"),
        ("/api/v1/users/{user}/servers/{server}/logs", "get"),
        ("/api/v1/users/{user}/servers/{server}/events", "get"),
    ] {
        assert!(
            spec["paths"][path][method].is_object(),
            "{method} {path} missing"
        );
    }
    owned_app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_aggregator_adopts_its_running_jupyterlab() {
    let _one = JUPYTER.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let app = App::start(&data, &[]).await;
    let (_admin, alice, _bob) = app.users().await;
    let uuid = app.free_migs(&alice).await.remove(0);
    let r = app
        .call(
            Method::POST,
            "/api/v1/users/alice/servers",
            Some(&alice),
            Some(json!({"name": "lab", "devices": [uuid]})),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    app.wait_status(
        &alice,
        "/api/v1/users/alice/servers/lab",
        "running",
        Duration::from_secs(90),
    )
    .await;
    let before = app
        .state
        .servers
        .get(&Caller::system(), "alice", "lab")
        .unwrap();
    app.stop().await;

    // The old process keeps running while no aggregator is there.
    let addr = before.upstream.clone().unwrap().addr;
    assert!(tokio::net::TcpStream::connect(addr).await.is_ok());

    let app = App::start(&data, &[]).await;
    let r = app.call(Method::GET, "/readyz", None, None).await;
    assert_eq!(r.status, StatusCode::OK);
    let after = app
        .wait_status(
            &alice,
            "/api/v1/users/alice/servers/lab",
            "running",
            Duration::from_secs(5),
        )
        .await;
    assert_eq!(
        after["created_at_ms"].as_u64().unwrap(),
        before.created_at_ms
    );
    assert_eq!(
        app.state
            .servers
            .get(&Caller::system(), "alice", "lab")
            .unwrap()
            .pid,
        before.pid,
        "same process"
    );
    assert!(
        !app.available(&alice).await.contains(&uuid),
        "device still held"
    );
    let r = app
        .call(
            Method::POST,
            "/api/v1/users/bob/servers",
            Some(&app.token("bob", B_PW).await),
            Some(sleeper("steal", &[&uuid])),
        )
        .await;
    assert_error(&r, StatusCode::CONFLICT, "already allocated");
    let r = app
        .call(
            Method::GET,
            "/user/alice/lab/api/status",
            Some(&alice),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "proxied to the adopted server");
    let r = app
        .call(
            Method::GET,
            "/api/v1/users/alice/servers/lab/events",
            Some(&alice),
            None,
        )
        .await;
    assert_eq!(
        r.body.as_array().unwrap().last().unwrap()["kind"],
        "Adopted"
    );

    let r = app
        .call(
            Method::DELETE,
            "/api/v1/users/alice/servers/lab",
            Some(&alice),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{:?}", r.body);
    assert!(app.available(&alice).await.contains(&uuid));
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "stopped"
    );
    app.stop().await;
}
