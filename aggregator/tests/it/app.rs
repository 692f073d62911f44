//! [`TestApp`]: the aggregator in-process on a loopback port, with the settings tests
//! use, and an HTTP client that speaks its API.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kcloud_aggregator::config::Config;
use kcloud_core::caller::Caller;
use kcloud_http::AppState;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The bootstrap admin's password (user `admin`).
pub const ADMIN_PW: &str = "admin-password-for-tests";
/// `alice`'s and `bob`'s passwords ([`TestApp::users`]).
pub const A_PW: &str = "password-of-user-a";
pub const B_PW: &str = "password-of-user-b";
/// The agents' token ([`TestApp::push`]).
pub const AGENT_TOKEN: &str = "agent-token-0123456789abcdef";

/// An answer: status, headers, and the body as JSON (a JSON string when it is not).
#[derive(Debug)]
pub struct Resp {
    pub status: StatusCode,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
}

impl Resp {
    pub async fn from(resp: reqwest::Response) -> Resp {
        let status = resp.status();
        let headers = resp.headers().clone();
        let text = resp.text().await.expect("response body");
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Resp {
            status,
            headers,
            body,
        }
    }
}

/// How a [`TestApp`] starts.
pub struct Builder {
    args: Vec<String>,
    data: Option<PathBuf>,
    settings: Option<String>,
    wait_for_gpus: bool,
}

impl Builder {
    /// Adds command-line arguments after the defaults (a data dir, an agent token file,
    /// the bootstrap admin `admin` / [`ADMIN_PW`]).
    pub fn args<I: IntoIterator<Item = S>, S: AsRef<str>>(mut self, args: I) -> Self {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    /// Uses this data directory (to start again on the same data).
    pub fn data_dir(mut self, data: &Path) -> Self {
        self.data = Some(data.to_owned());
        self
    }

    /// A settings file with this TOML; `{dir}` in it is the test's temporary directory.
    pub fn settings(mut self, toml: &str) -> Self {
        self.settings = Some(toml.to_owned());
        self
    }

    /// Waits until some device is listed (the embedded agent's first inventory).
    pub fn wait_for_gpus(mut self) -> Self {
        self.wait_for_gpus = true;
        self
    }

    pub async fn start(self) -> TestApp {
        let dir = tempfile::tempdir().expect("temporary directory");
        let data = self.data.unwrap_or_else(|| dir.path().join("data"));
        let token_file = dir.path().join("agent-token");
        std::fs::write(&token_file, format!("{AGENT_TOKEN}\n")).expect("agent token");
        let mut args: Vec<String> = [
            "kcloud-aggregator",
            "--data-dir",
            path_str(&data),
            "--agent-token-file",
            path_str(&token_file),
            "--bootstrap-admin-user",
            "admin",
            "--bootstrap-admin-password",
            ADMIN_PW,
        ]
        .map(String::from)
        .to_vec();
        if let Some(toml) = &self.settings {
            let file = dir.path().join("kcloud.toml");
            std::fs::write(&file, toml.replace("{dir}", path_str(dir.path())))
                .expect("settings file");
            args.extend(["--config".to_owned(), path_str(&file).to_owned()]);
        }
        args.extend(self.args);
        let config = <Config as clap::Parser>::try_parse_from(args).expect("flags");
        let app = kcloud_aggregator::build(&config).await.expect("build");
        let state = app.state.clone();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("address").to_string();
        let shutdown = CancellationToken::new();
        let served = tokio::spawn(app.serve(listener, shutdown.clone()));
        let app = TestApp {
            base: format!("http://{addr}"),
            addr,
            state,
            dir,
            data,
            client: reqwest::Client::new(),
            shutdown,
            served: Some(served),
            keep_servers: false,
        };
        if self.wait_for_gpus {
            let admin = app.token("admin", ADMIN_PW).await;
            let deadline = Instant::now() + Duration::from_secs(20);
            while app
                .call(Method::GET, "/api/v1/gpus?limit=1", Some(&admin), None)
                .await
                .body["items"]
                .as_array()
                .is_none_or(|a| a.is_empty())
            {
                assert!(Instant::now() < deadline, "no inventory");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        app
    }
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 path")
}

/// The aggregator serving on a loopback port. Dropping it stops serving and kills the
/// servers it started (unless [`TestApp::stop`] kept them for a restart).
pub struct TestApp {
    /// `http://127.0.0.1:{port}`.
    pub base: String,
    /// `127.0.0.1:{port}`.
    pub addr: String,
    pub state: AppState,
    /// The test's temporary directory (agent token, settings; the data dir by default).
    pub dir: tempfile::TempDir,
    pub data: PathBuf,
    pub client: reqwest::Client,
    shutdown: CancellationToken,
    served: Option<JoinHandle<kcloud_core::Result<()>>>,
    keep_servers: bool,
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if self.keep_servers {
            return;
        }
        // A test that failed half-way must not leave servers running (sandboxed ones
        // are in sessions of their own: found by their tag).
        let ids: Vec<String> = self
            .state
            .servers
            .list(&Caller::system(), None)
            .unwrap_or_default()
            .into_iter()
            .map(|s| s.id)
            .collect();
        kcloud_testkit::process::kill_servers(&ids);
    }
}

impl TestApp {
    pub fn builder() -> Builder {
        Builder {
            args: Vec::new(),
            data: None,
            settings: None,
            wait_for_gpus: false,
        }
    }

    /// Stops serving as the binary does on SIGTERM (servers keep running).
    pub async fn stop(mut self) {
        self.keep_servers = true;
        self.shutdown.cancel();
        if let Some(served) = self.served.take() {
            served.await.expect("serve task").expect("clean stop");
        }
    }

    /// A request with an optional bearer token and JSON body.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> Resp {
        let mut req = self.client.request(method, format!("{}{path}", self.base));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        Resp::from(req.send().await.expect("request")).await
    }

    /// A request with raw bytes as its JSON body.
    pub async fn raw(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Vec<u8>,
    ) -> Resp {
        let mut req = self
            .client
            .request(method, format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .body(body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        Resp::from(req.send().await.expect("request")).await
    }

    /// Signs in; the whole session.
    pub async fn login(&self, user: &str, password: &str) -> Value {
        let r = self
            .call(
                Method::POST,
                "/api/v1/auth/login",
                None,
                Some(json!({"username": user, "password": password})),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "login {user}: {:?}", r.body);
        r.body
    }

    /// Signs in; the access token.
    pub async fn token(&self, user: &str, password: &str) -> String {
        self.login(user, password).await["access_token"]
            .as_str()
            .expect("access token")
            .to_owned()
    }

    /// Creates user `name` (password `password-of-{name}`) as `admin`; their token.
    pub async fn add_user(&self, admin: &str, name: &str) -> String {
        let pw = format!("password-of-{name}");
        let r = self
            .call(
                Method::POST,
                "/api/v1/users",
                Some(admin),
                Some(json!({"name": name, "password": pw})),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
        self.token(name, &pw).await
    }

    /// Admin, `alice` ([`A_PW`]) and `bob` ([`B_PW`]), with their access tokens.
    pub async fn users(&self) -> (String, String, String) {
        let admin = self.token("admin", ADMIN_PW).await;
        for (name, pw) in [("alice", A_PW), ("bob", B_PW)] {
            let r = self
                .call(
                    Method::POST,
                    "/api/v1/users",
                    Some(&admin),
                    Some(json!({"name": name, "password": pw})),
                )
                .await;
            assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
        }
        (
            admin,
            self.token("alice", A_PW).await,
            self.token("bob", B_PW).await,
        )
    }

    /// An agent's push of `body` for `node`.
    pub async fn push(&self, node: &str, body: Value) -> Resp {
        let path = format!("/api/v1/nodes/{node}/inventory");
        self.call(Method::PUT, &path, Some(AGENT_TOKEN), Some(body))
            .await
    }

    /// The JWT signing key the aggregator generated.
    pub fn signing_key(&self) -> Vec<u8> {
        std::fs::read(self.data.join("signing.key")).expect("signing key")
    }

    /// `user`'s origin (`--user-origin` default `http://{user}.localhost:{port}`).
    pub fn user_origin(&self, user: &str) -> String {
        let port = self.addr.rsplit_once(':').expect("host:port").1;
        format!("http://{user}.localhost:{port}")
    }

    /// A client that reaches these users' origins here (`*.localhost` is loopback, as
    /// browsers resolve it), follows no redirects and keeps no cookies.
    pub fn origin_client(&self, users: &[&str]) -> reqwest::Client {
        let addr: std::net::SocketAddr = self.addr.parse().expect("socket address");
        let mut b = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none());
        for user in users {
            b = b.resolve(&format!("{user}.localhost"), addr);
        }
        b.build().expect("client")
    }

    /// Opens `owner/server` as a browser would from the portal: a one-time link from
    /// the API (`token`'s session), exchanged on the owner's origin for the server's
    /// cookie. The `name=value` of that cookie.
    pub async fn open_server(
        &self,
        token: &str,
        owner: &str,
        server: &str,
        as_admin: bool,
    ) -> String {
        let path = format!("/api/v1/users/{owner}/servers/{server}/open");
        let r = self
            .call(
                Method::POST,
                &path,
                Some(token),
                Some(json!({"as_admin": as_admin})),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "open: {:?}", r.body);
        let url = r.body["url"].as_str().expect("url").to_owned();
        assert!(url.starts_with(&self.user_origin(owner)), "{url}");
        let r = self
            .origin_client(&[owner])
            .get(&url)
            .send()
            .await
            .expect("code exchange");
        assert_eq!(r.status(), StatusCode::SEE_OTHER);
        let set = r.headers()["set-cookie"]
            .to_str()
            .expect("cookie")
            .to_owned();
        set.split(';').next().expect("name=value").to_owned()
    }
}

/// A local HTTP receiver of the webhook's notices: its URL and what it received.
pub async fn webhook() -> (String, std::sync::Arc<std::sync::Mutex<Vec<Value>>>) {
    use axum::routing::post;
    let got: std::sync::Arc<std::sync::Mutex<Vec<Value>>> = Default::default();
    let sink = got.clone();
    let app = axum::Router::new().route(
        "/hook",
        post(move |axum::Json(v): axum::Json<Value>| {
            let sink = sink.clone();
            async move {
                sink.lock().unwrap().push(v);
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}/hook"), got)
}

/// The `kind`s of the notices a [`webhook`] received, in order.
pub fn kinds(got: &std::sync::Mutex<Vec<Value>>) -> Vec<String> {
    got.lock()
        .unwrap()
        .iter()
        .filter_map(|v| v["kind"].as_str().map(str::to_owned))
        .collect()
}
