//! [`AggregatorProcess`]: the `kcloud-aggregator` binary as an operator runs it, on a
//! free loopback port, with its output captured.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::free_port;

/// The binary in a child process. Killed (SIGKILL) when dropped.
pub struct AggregatorProcess {
    bin: PathBuf,
    child: Option<Child>,
    pub port: u16,
    pub data: PathBuf,
    args: Vec<String>,
    envs: Vec<(String, String)>,
    /// Output goes here (appended across restarts); else it is piped.
    log: Option<PathBuf>,
}

impl Drop for AggregatorProcess {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl AggregatorProcess {
    /// `bin`: `env!("CARGO_BIN_EXE_kcloud-aggregator")` of the calling test.
    /// `--listen` and `--data-dir` are set; the bootstrap-admin variables of the test's
    /// own environment are not passed on.
    pub fn new(bin: &str, data: &Path) -> Self {
        Self {
            bin: PathBuf::from(bin),
            child: None,
            port: free_port(),
            data: data.to_owned(),
            args: Vec::new(),
            envs: Vec::new(),
            log: None,
        }
    }

    pub fn args<I: IntoIterator<Item = S>, S: AsRef<str>>(mut self, args: I) -> Self {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.envs.push((key.to_owned(), value.to_owned()));
        self
    }

    /// Appends the output to `path` instead of piping it.
    pub fn log_to(mut self, path: &Path) -> Self {
        self.log = Some(path.to_owned());
        self
    }

    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Starts the process (not waiting for it to be ready).
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "already running");
        let mut cmd = Command::new(&self.bin);
        cmd.args(["--listen", &format!("127.0.0.1:{}", self.port)])
            .arg("--data-dir")
            .arg(&self.data)
            .args(&self.args)
            .env_remove("KCLOUD_BOOTSTRAP_ADMIN_USER")
            .env_remove("KCLOUD_BOOTSTRAP_ADMIN_PASSWORD")
            .env_remove("KCLOUD_BOOTSTRAP_ADMIN_PASSWORD_FILE")
            .envs(self.envs.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null());
        match &self.log {
            Some(path) => {
                let log = File::options()
                    .create(true)
                    .append(true)
                    .open(path)
                    .expect("log file");
                cmd.stdout(log.try_clone().expect("log file")).stderr(log);
            }
            None => {
                cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
            }
        }
        self.child = Some(cmd.spawn().expect("spawn kcloud-aggregator"));
    }

    /// Spawns and waits for `/readyz`.
    pub async fn start(mut self) -> Self {
        self.spawn();
        self.ready(Duration::from_secs(30)).await;
        self
    }

    /// Waits for `/readyz`; fails with the output if the process exits first.
    pub async fn ready(&mut self, within: Duration) {
        let deadline = Instant::now() + within;
        let http = reqwest::Client::new();
        loop {
            if let Ok(r) = http.get(format!("{}/readyz", self.base())).send().await
                && r.status().is_success()
            {
                return;
            }
            self.assert_running();
            assert!(Instant::now() < deadline, "not ready\n{}", self.output());
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Fails with the output if the process has exited.
    pub fn assert_running(&mut self) {
        let exited = self
            .child
            .as_mut()
            .expect("running")
            .try_wait()
            .expect("try_wait");
        if let Some(status) = exited {
            panic!(
                "kcloud-aggregator exited early: {status}\n{}",
                self.output()
            );
        }
    }

    /// What it printed: the pipes' contents (all of it once it has exited), or the last
    /// lines of the log file.
    pub fn output(&mut self) -> String {
        if let Some(path) = &self.log {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            return lines[lines.len().saturating_sub(60)..].join("\n");
        }
        let mut out = String::new();
        if let Some(child) = self.child.as_mut() {
            if let Some(mut o) = child.stdout.take() {
                let _ = o.read_to_string(&mut out);
            }
            if let Some(mut e) = child.stderr.take() {
                let _ = e.read_to_string(&mut out);
            }
        }
        out
    }

    /// Its output once it has exited by itself (`None` while it runs).
    pub fn exited_output(&mut self) -> Option<String> {
        self.child.as_mut()?.try_wait().ok()??;
        let out = self.output();
        self.child = None;
        Some(out)
    }

    /// SIGTERM, then waits up to 10 s for the exit: its status and output.
    pub fn sigterm(&mut self) -> (ExitStatus, String) {
        let pid = self.pid().expect("running");
        let pid = rustix::process::Pid::from_raw(pid as i32).expect("a pid");
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).expect("SIGTERM");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let exited = self
                .child
                .as_mut()
                .expect("running")
                .try_wait()
                .expect("try_wait");
            if let Some(status) = exited {
                let out = self.output();
                self.child = None;
                return (status, out);
            }
            assert!(Instant::now() < deadline, "no exit after SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL, and reaps it.
    pub fn sigkill(&mut self) {
        let mut c = self.child.take().expect("running");
        c.kill().expect("SIGKILL");
        c.wait().expect("wait");
    }
}

/// SIGKILLs every live process of these servers (by the `KCLOUD_SERVER_ID` every
/// server process carries, sandboxed or not): what a test that ends half-way leaves
/// must not keep running.
pub fn kill_servers(ids: &[String]) {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else {
            continue;
        };
        let tagged = env.split(|b| *b == 0).any(|kv| {
            kv.strip_prefix(b"KCLOUD_SERVER_ID=")
                .is_some_and(|id| ids.iter().any(|i| i.as_bytes() == id))
        });
        if tagged && let Some(p) = rustix::process::Pid::from_raw(pid) {
            let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
        }
    }
}
