//! Helpers for tests that run the real `kcloud-agent` binary and real tools.
#![allow(dead_code)] // each test file uses a different subset

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub use kcloud_testkit::{free_port, require_tool};

/// A child process killed when the test ends, however it ends.
pub struct Proc {
    pub child: Child,
    pub addr: SocketAddr,
    pub log: PathBuf,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self, within: Duration) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        let ok = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill");
        assert!(ok.success());
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "no exit within {within:?} of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Starts `kcloud-agent` on a free port with `args`, logging into `dir`, and waits
/// until `/readyz` answers 200.
pub async fn start_agent(dir: &Path, args: &[&str]) -> Proc {
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let log = dir.join(format!("agent-{port}.log"));
    let child = Command::new(env!("CARGO_BIN_EXE_kcloud-agent"))
        .args(["--listen", &addr.to_string(), "--node-name", "node-a"])
        .args(args)
        .env("RUST_LOG", "kcloud_agent=debug,info")
        .env_remove("NODE_NAME")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&log).expect("log"))
        .stderr(std::fs::File::create(dir.join(format!("agent-{port}.err"))).expect("log"))
        .spawn()
        .expect("spawn kcloud-agent");
    let mut proc = Proc { child, addr, log };
    wait_ready(&mut proc).await;
    proc
}

async fn wait_ready(p: &mut Proc) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let client = reqwest::Client::new();
    loop {
        if let Ok(r) = client.get(p.url("/readyz")).send().await
            && r.status().is_success()
        {
            return;
        }
        if let Some(status) = p.child.try_wait().expect("wait") {
            panic!("agent exited early ({status}): {}", p.log_text());
        }
        assert!(
            Instant::now() < deadline,
            "agent not ready: {}",
            p.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn get_text(url: &str) -> String {
    let r = reqwest::get(url).await.expect("GET");
    assert!(r.status().is_success(), "{url}: {}", r.status());
    r.text().await.expect("body")
}

/// Polls `check` until it returns `Some`, or fails after `within`.
pub async fn eventually<T, F, Fut>(within: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs `promtool check metrics` on an exposition and returns its complaints, minus
/// the two that are ours by design:
/// - `modelName` is camelCase: dcgm-exporter's label, kept so dashboards work unchanged;
/// - "no help text" for `X_total`: promtool reads the 0.0.4 text format, where a
///   counter family carries the suffix, while OpenMetrics (what we serve, and what
///   Prometheus negotiates) declares the family without it.
pub fn promtool_complaints(exposition: &str) -> Vec<String> {
    use std::io::Write;
    let mut child = Command::new(require_tool("promtool"))
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(exposition.as_bytes())
        .expect("write");
    let out = child.wait_with_output().expect("promtool output");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let counters: Vec<&str> = exposition
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let complaints: Vec<String> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .filter(|l| !l.ends_with("label names should be written in 'snake_case' not 'camelCase'"))
        .filter(|l| {
            !l.strip_suffix(" no help text")
                .and_then(|m| m.strip_suffix("_total"))
                .is_some_and(|family| counters.contains(&family))
        })
        .map(str::to_owned)
        .collect();
    // promtool exits non-zero for lint findings; a parse error shows up as a complaint.
    assert!(
        out.status.success() || !text.is_empty(),
        "promtool failed without output"
    );
    complaints
}
