//! The local provisioner with real processes (a stand-in server in Python).

use std::sync::Mutex;

use kcloud_core::launch::{BaseUrl, IdeAuth, RunProfile};
use kcloud_store::Store;
use rustix::process::{Pid, Signal};

use super::*;

/// What the provisioner reported as ended by itself: the boundary where the service
/// would release devices.
#[derive(Default)]
struct ExitLog(Mutex<Vec<(String, String, Vec<String>)>>);

impl Exits for ExitLog {
    fn exited(&self, s: &Server) {
        let mut log = self.0.lock().unwrap();
        log.push((s.owner.clone(), s.name.clone(), s.devices.clone()));
    }
}

impl ExitLog {
    fn ended(&self) -> Vec<(String, String, Vec<String>)> {
        self.0.lock().unwrap().clone()
    }
}

/// A stand-in server: answers every GET with its device variables, prints its
/// token (which the logs must hide), and ignores nothing.
const FAKE_SERVER: &str = r#"
import http.server, os, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = (os.environ.get("CUDA_VISIBLE_DEVICES", "-") + "|" + os.environ.get("NVIDIA_VISIBLE_DEVICES", "-")
                + "|" + self.headers.get("Authorization", "")).encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
print("serving under", sys.argv[2], "with token", os.environ["JUPYTER_TOKEN"], flush=True)
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"#;

struct Fixture {
    dir: tempfile::TempDir,
    store: Arc<Store>,
    exits: Arc<ExitLog>,
    p: LocalProvisioner,
}

fn options(dir: &Path) -> LocalOptions {
    LocalOptions {
        stop_grace: Duration::from_millis(500),
        ..LocalOptions::new(dir)
    }
}

fn fixture() -> Fixture {
    fixture_with(IsolationLevel::Sandbox)
}

fn fixture_with(isolation: IsolationLevel) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&dir.path().join("kcloud.db")).unwrap());
    let exits = Arc::new(ExitLog::default());
    let p = LocalProvisioner::new(
        store.clone(),
        exits.clone(),
        LocalOptions {
            isolation,
            ..options(dir.path())
        },
    )
    .unwrap();
    Fixture {
        dir,
        store,
        exits,
        p,
    }
}

fn spec(name: &str, devices: &[&str], command: &[&str]) -> ServerSpec {
    ServerSpec {
        owner: "alice".into(),
        name: name.into(),
        node: (!devices.is_empty()).then(|| "node-1".into()),
        devices: devices.iter().map(|d| d.to_string()).collect(),
        addresses: Vec::new(),
        cpu_millis: 1000,
        memory_bytes: 1 << 30,
        image: None,
        launch: Launch {
            command: Some(command.iter().map(|c| c.to_string()).collect()),
            args: vec![],
            env: [("MY_VAR".to_owned(), "mine".to_owned())].into(),
            // A stand-in for JupyterLab: checks its token, answers at its base URL.
            profile: Some(RunProfile {
                name: "fake-lab".into(),
                base_url: BaseUrl::Pass,
                readiness_path: String::new(),
                auth: IdeAuth::JupyterToken,
                port: 8888,
            }),
        },
        mounts: vec![],
    }
}

fn fake(name: &str, devices: &[&str]) -> ServerSpec {
    spec(
        name,
        devices,
        &["python3", "-c", FAKE_SERVER, "{port}", "{base_url}"],
    )
}

async fn wait_for(p: &LocalProvisioner, name: &str, want: ServerStatus) -> Server {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = p.get("alice", name).expect("server exists");
        if s.status == want {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "still {:?}: {:?}",
            s.status,
            s.reason
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn get(upstream: &Upstream, path: &str) -> String {
    let token = upstream.token.as_deref().unwrap_or_default();
    let req = Request::get(format!("http://{}{path}", upstream.addr))
        .header(header::AUTHORIZATION, format!("token {token}"))
        .body(Body::empty())
        .unwrap();
    let resp = http_client().request(req).await.unwrap();
    let body = axum::body::to_bytes(Body::new(resp.into_body()), 1 << 20)
        .await
        .unwrap();
    String::from_utf8(body.to_vec()).unwrap()
}

#[tokio::test]
async fn a_server_runs_pinned_answers_and_is_deleted() {
    let f = fixture();
    let created = f.p.create(fake("lab", &["MIG-a", "MIG-b"])).await.unwrap();
    assert_eq!(created.status, ServerStatus::Pending);
    assert!(created.upstream.is_none(), "no upstream before it answers");
    let pid = created.pid.unwrap();
    let s = wait_for(&f.p, "lab", ServerStatus::Running).await;
    assert!(s.ready_at_ms.is_some());
    let up = s.upstream.clone().unwrap();
    let body = get(&up, "/user/alice/lab/").await;
    assert_eq!(
        body,
        format!(
            "MIG-a,MIG-b|MIG-a,MIG-b|token {}",
            up.token.as_deref().unwrap()
        ),
        "pinned devices and the token reach the server"
    );
    // Recorded in SQLite, token included; the logs hide the token.
    let rows = f.store.servers().await.unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(
        (
            rows[0].server.status,
            rows[0].server.pid,
            rows[0].token.as_str()
        ),
        (
            ServerStatus::Running,
            Some(pid),
            up.token.as_deref().unwrap()
        )
    );
    let logs = f.p.logs("alice", "lab", 10).await.unwrap();
    assert!(
        logs.contains("serving under /user/alice/lab/ with token <token>"),
        "{logs}"
    );
    assert!(!logs.contains(up.token.as_deref().unwrap()));
    let kinds: Vec<String> =
        f.p.events("alice", "lab")
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.kind)
            .collect();
    assert_eq!(kinds, ["Created", "Started", "Ready"]);
    // A name in use.
    let err = f.p.create(fake("lab", &[])).await.unwrap_err();
    assert!(matches!(err, Error::Conflict(_)), "{err:?}");

    let deleted = f.p.delete("alice", "lab").await.unwrap().unwrap();
    assert_eq!(deleted.id, s.id);
    assert!(!alive(pid, proc_stat(pid).map(|s| s.start)), "process gone");
    assert!(f.p.get("alice", "lab").is_none());
    assert!(f.store.servers().await.unwrap().is_empty());
    assert!(
        f.p.delete("alice", "lab").await.unwrap().is_none(),
        "second delete: nothing"
    );
    // The work directory stays for a server created again under that name.
    assert!(f.dir.path().join("servers/alice/lab/work").is_dir());
}

#[tokio::test]
async fn a_server_that_exits_fails_with_its_reason_and_frees_its_devices() {
    let f = fixture();
    f.p.create(spec(
        "crash",
        &["MIG-a"],
        &["sh", "-c", "echo 'Traceback: boom'; exit 3"],
    ))
    .await
    .unwrap();
    let s = wait_for(&f.p, "crash", ServerStatus::Failed).await;
    assert_eq!(
        s.reason.as_deref(),
        Some("process exited with status 3: Traceback: boom")
    );
    assert_eq!(
        f.exits.ended(),
        [("alice".into(), "crash".into(), vec!["MIG-a".into()])],
        "its end reported, with its devices"
    );
    // The event is written right after the status changes.
    let deadline = Instant::now() + Duration::from_secs(5);
    while f
        .p
        .events("alice", "crash")
        .await
        .unwrap()
        .last()
        .unwrap()
        .kind
        != "Failed"
    {
        assert!(Instant::now() < deadline, "no Failed event");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Still listed (its owner reads why) until deleted.
    assert_eq!(f.p.list(Some("alice")).len(), 1);
    assert!(f.p.delete("alice", "crash").await.unwrap().is_some());
}

#[tokio::test]
async fn delete_escalates_to_sigkill_and_kills_escaped_children() {
    // Unconfined: the process group and the tag do it (the sandbox's cgroup kill is
    // tried in aggregator/tests/it/sandbox.rs).
    let f = fixture_with(IsolationLevel::None);
    // Ignores SIGTERM, and starts a child in its own session (as Jupyter kernels are).
    let script = "setsid sleep 600 & echo $! > child.pid; trap '' TERM; while :; do sleep 1; done";
    let s =
        f.p.create(spec("stubborn", &[], &["sh", "-c", script]))
            .await
            .unwrap();
    let pid = s.pid.unwrap();
    let child_file = f.dir.path().join("servers/alice/stubborn/work/child.pid");
    let deadline = Instant::now() + Duration::from_secs(10);
    let child: u32 = loop {
        if let Some(c) = std::fs::read_to_string(&child_file)
            .ok()
            .and_then(|t| t.trim().parse().ok())
        {
            break c;
        }
        assert!(Instant::now() < deadline, "no child pid");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let child_start = proc_stat(child).unwrap().start;
    let start = proc_stat(pid).unwrap().start;
    let started = Instant::now();
    f.p.delete("alice", "stubborn").await.unwrap().unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "waited the grace period"
    );
    assert!(!alive(pid, Some(start)), "the server is gone");
    assert!(
        !alive(child, Some(child_start)),
        "the escaped child is gone too"
    );
}

#[tokio::test]
async fn a_server_that_never_answers_is_failed_and_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&dir.path().join("kcloud.db")).unwrap());
    let p = LocalProvisioner::new(
        store,
        Arc::new(ExitLog::default()),
        LocalOptions {
            start_timeout: Duration::from_millis(300),
            ..options(dir.path())
        },
    )
    .unwrap();
    let s = p
        .create(spec("mute", &[], &["sleep", "600"]))
        .await
        .unwrap();
    let pid = s.pid.unwrap();
    let start = proc_stat(pid).map(|s| s.start);
    let failed = wait_for(&p, "mute", ServerStatus::Failed).await;
    let reason = failed.reason.unwrap();
    assert!(reason.contains("did not answer within"), "{reason}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while alive(pid, start) {
        assert!(Instant::now() < deadline, "not stopped");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn missing_programs_are_clear_errors_and_leave_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&dir.path().join("kcloud.db")).unwrap());
    let p = LocalProvisioner::new(
        store.clone(),
        Arc::new(ExitLog::default()),
        LocalOptions {
            jupyter: Some("/nonexistent/bin/jupyter-lab".into()),
            ..options(dir.path())
        },
    )
    .unwrap();
    let mut jupyter = fake("lab", &[]);
    jupyter.launch.command = None;
    let err = p.create(jupyter).await.unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::Unavailable(_)), "{err:?}");
    assert!(msg.contains("pip install jupyterlab"), "{msg}");
    assert!(msg.contains("/nonexistent/bin/jupyter-lab"), "{msg}");
    let err = p
        .create(spec("x", &[], &["no-such-program-kcloud"]))
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::BadRequest(ref m) if m.contains("no-such-program-kcloud")),
        "{err:?}"
    );
    assert!(p.list(None).is_empty());
    assert!(store.servers().await.unwrap().is_empty());
    assert!(!dir.path().join("servers").exists(), "nothing made on disk");
}

#[tokio::test]
async fn restart_adopts_live_servers_fails_dead_ones_and_finishes_deletes() {
    let f = fixture();
    f.p.create(fake("live", &["MIG-a"])).await.unwrap();
    let live = wait_for(&f.p, "live", ServerStatus::Running).await;
    let dead =
        f.p.create(spec("dead", &["MIG-b"], &["sleep", "600"]))
            .await
            .unwrap();
    let half =
        f.p.create(spec("half", &[], &["sleep", "600"]))
            .await
            .unwrap();
    let start_of = |pid: Option<u32>| proc_stat(pid.unwrap()).unwrap().start;
    let (dead_start, half_start) = (start_of(dead.pid), start_of(half.pid));
    f.p.shutdown().await;
    // While "the aggregator is down": one server dies, one delete was cut short, and
    // two rows name a live pid (this test's) that is not theirs.
    let dead_pid = dead.pid.unwrap();
    rustix::process::kill_process(Pid::from_raw(dead_pid as i32).unwrap(), Signal::KILL).unwrap();
    let mut rows = f.store.servers().await.unwrap();
    let mut half_row = rows
        .iter()
        .find(|r| r.server.name == "half")
        .unwrap()
        .clone();
    half_row.server.status = ServerStatus::Stopping;
    f.store.save_server(half_row).await.unwrap();
    let me = std::process::id();
    let template = rows.remove(0);
    for (name, status) in [
        ("impostor", ServerStatus::Running),
        ("impostor2", ServerStatus::Stopping),
    ] {
        f.store
            .insert_server(ServerRecord {
                server: Server {
                    id: name.into(),
                    name: name.into(),
                    status,
                    pid: Some(me),
                    devices: vec![],
                    ..template.server.clone()
                },
                pid_start: Some(1),
                ..template.clone()
            })
            .await
            .unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while alive(dead_pid, Some(dead_start)) {
        assert!(Instant::now() < deadline, "sleep not killed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let p = LocalProvisioner::new(
        f.store.clone(),
        Arc::new(ExitLog::default()),
        options(f.dir.path()),
    )
    .unwrap();
    let servers = p.recover().await.unwrap();
    let by_name = |n: &str| servers.iter().find(|s| s.name == n).cloned();
    let adopted = by_name("live").unwrap();
    assert_eq!(adopted.status, ServerStatus::Running);
    assert_eq!(adopted.id, live.id);
    let up = adopted.upstream.clone().unwrap();
    assert!(
        get(&up, "/user/alice/live/")
            .await
            .starts_with("MIG-a|MIG-a|")
    );
    let failed = by_name("dead").unwrap();
    assert_eq!(failed.status, ServerStatus::Failed);
    assert!(
        failed
            .reason
            .unwrap()
            .contains("ended while kcloud-aggregator was not running")
    );
    assert!(by_name("half").is_none(), "interrupted delete finished");
    assert!(
        !alive(half.pid.unwrap(), Some(half_start)),
        "and its process killed"
    );
    assert_eq!(
        by_name("impostor").unwrap().status,
        ServerStatus::Failed,
        "a reused pid is not adopted"
    );
    assert!(by_name("impostor2").is_none());
    // (This test is still alive: the reused pid was not signalled.)
    let events = p.events("alice", "live").await.unwrap();
    assert_eq!(events.last().unwrap().kind, "Adopted");

    let pid = adopted.pid.unwrap();
    let start = proc_stat(pid).map(|s| s.start);
    p.delete("alice", "live").await.unwrap().unwrap();
    assert!(!alive(pid, start));
    p.shutdown().await;
}

/// Regression (SIGKILL fault test): killed between starting a process and recording
/// its pid, the restart failed the row and left the process running, untracked.
#[tokio::test]
async fn a_start_cut_short_before_its_pid_was_recorded_is_stopped_at_restart() {
    let f = fixture();
    let s =
        f.p.create(spec("cut", &["MIG-a"], &["sleep", "600"]))
            .await
            .unwrap();
    let pid = s.pid.unwrap();
    let start = proc_stat(pid).map(|s| s.start);
    f.p.shutdown().await;
    // The row as the kill left it: pending, no pid.
    let mut row = f.store.servers().await.unwrap().remove(0);
    (row.server.pid, row.pid_start) = (None, None);
    f.store.save_server(row).await.unwrap();

    let p = LocalProvisioner::new(
        f.store.clone(),
        Arc::new(ExitLog::default()),
        options(f.dir.path()),
    )
    .unwrap();
    let servers = p.recover().await.unwrap();
    assert_eq!(servers[0].status, ServerStatus::Failed);
    assert!(
        servers[0]
            .reason
            .as_deref()
            .unwrap()
            .contains("while starting it"),
        "{:?}",
        servers[0].reason
    );
    assert!(!alive(pid, start), "its process is stopped");
    p.shutdown().await;
}

#[tokio::test]
async fn activity_is_kept_in_memory_and_saved_in_batches() {
    let f = fixture();
    let s =
        f.p.create(spec("idle", &[], &["sleep", "600"]))
            .await
            .unwrap();
    let t0 = s.last_activity_ms;
    f.p.touch("alice", "idle", t0 + 1_000);
    assert_eq!(
        f.p.get("alice", "idle").unwrap().last_activity_ms,
        t0 + 1_000
    );
    f.p.touch("alice", "idle", t0 + 500);
    assert_eq!(
        f.p.get("alice", "idle").unwrap().last_activity_ms,
        t0 + 1_000,
        "never backwards"
    );
    f.p.touch("alice", "nobody", t0);
    f.p.shutdown().await;
    assert_eq!(
        f.store.servers().await.unwrap()[0].server.last_activity_ms,
        t0 + 1_000,
        "flushed at shutdown"
    );
    f.p.delete("alice", "idle").await.unwrap();
}
