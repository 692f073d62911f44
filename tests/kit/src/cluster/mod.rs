//! A real Kubernetes control plane for the cluster-shape tests: etcd, kube-apiserver,
//! kube-controller-manager and kube-scheduler built from source at one exact version
//! (`scripts/cluster-build.sh`, Go module proxy, cached by version), started on
//! 127.0.0.1 with certificates made here, RBAC and the Node authorizer, PodSecurity
//! admission and DRA, an audit log, and an admin kubeconfig. [`node::NodeSimulator`]
//! stands in for the kubelets and NVIDIA's device stack on simulated GPU nodes.
//!
//! Needs `openssl`, `ip` (iproute2) and root (pods get network namespaces); a missing
//! tool fails the test.

pub mod node;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kube::config::{KubeConfigOptions, Kubeconfig};

use crate::{free_ports, require_tool};

/// The Kubernetes version the control plane is built at (`tests/cluster/k8s/go.mod`).
pub const KUBERNETES_VERSION: &str = "v1.37.2";

/// The binaries, built (or found in the cache) by `scripts/cluster-build.sh`.
pub struct Binaries {
    pub etcd: PathBuf,
    pub apiserver: PathBuf,
    pub controller_manager: PathBuf,
    pub scheduler: PathBuf,
}

impl Binaries {
    /// Runs `scripts/cluster-build.sh` (a no-op when the cache holds this version) and
    /// returns where the binaries are.
    pub fn get() -> Binaries {
        let root = workspace();
        let out = Command::new(root.join("scripts/cluster-build.sh"))
            .stderr(Stdio::inherit())
            .output()
            .expect("running scripts/cluster-build.sh");
        assert!(
            out.status.success(),
            "scripts/cluster-build.sh failed (its output is above)"
        );
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        let bin = |n: &str| {
            let p = dir.join(n);
            assert!(p.is_file(), "{} was not built", p.display());
            p
        };
        Binaries {
            etcd: bin("etcd"),
            apiserver: bin("kube-apiserver"),
            controller_manager: bin("kube-controller-manager"),
            scheduler: bin("kube-scheduler"),
        }
    }
}

/// The workspace root (the test kit lives in `tests/kit`).
pub fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("workspace root")
}

/// A running control plane. Everything is killed when it is dropped.
pub struct ControlPlane {
    pub dir: PathBuf,
    bins: Binaries,
    /// `https://127.0.0.1:{port}`.
    pub server: String,
    pub etcd_url: String,
    etcd_peer: u16,
    apiserver_port: u16,
    /// The admin kubeconfig (system:masters).
    pub kubeconfig: PathBuf,
    /// One JSON event per line, every request at `Metadata` level.
    pub audit_log: PathBuf,
    etcd: Option<Child>,
    apiserver: Option<Child>,
    controller_manager: Option<Child>,
    scheduler: Option<Child>,
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        for c in [
            &mut self.scheduler,
            &mut self.controller_manager,
            &mut self.apiserver,
            &mut self.etcd,
        ]
        .into_iter()
        .flatten()
        {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Controller-manager and scheduler options that make a test's wait short.
const NODE_MONITOR_GRACE: &str = "16s";

impl ControlPlane {
    /// Builds (or reuses) the binaries, makes certificates and keys in `dir`, starts
    /// everything, and waits until the API server is ready.
    pub async fn start(dir: &Path) -> ControlPlane {
        require_tool("openssl");
        let bins = Binaries::get();
        std::fs::create_dir_all(dir).expect("control plane dir");
        let dir = dir.canonicalize().expect("control plane dir");
        let pki = dir.join("pki");
        std::fs::create_dir_all(&pki).expect("pki dir");
        make_pki(&pki);
        let [apiserver_port, etcd_port, etcd_peer] = free_ports();
        let server = format!("https://127.0.0.1:{apiserver_port}");
        for (name, user, group) in [
            ("admin", "kcloud-test-admin", Some("system:masters")),
            ("controller-manager", "system:kube-controller-manager", None),
            ("scheduler", "system:kube-scheduler", None),
        ] {
            client_cert(&pki, name, user, group);
            write_kubeconfig(
                &dir.join(format!("{name}.kubeconfig")),
                &server,
                &pki.join("ca.crt"),
                Auth::Cert(
                    &pki.join(format!("{name}.crt")),
                    &pki.join(format!("{name}.key")),
                ),
            );
        }
        std::fs::write(
            dir.join("audit-policy.yaml"),
            "apiVersion: audit.k8s.io/v1\nkind: Policy\nomitStages: [RequestReceived]\n\
             rules:\n- level: Metadata\n",
        )
        .expect("audit policy");
        let mut cp = ControlPlane {
            kubeconfig: dir.join("admin.kubeconfig"),
            audit_log: dir.join("audit.log"),
            etcd_url: format!("http://127.0.0.1:{etcd_port}"),
            etcd_peer,
            dir,
            bins,
            server,
            apiserver_port,
            etcd: None,
            apiserver: None,
            controller_manager: None,
            scheduler: None,
        };
        cp.start_etcd();
        cp.wait_etcd().await;
        cp.start_apiserver();
        cp.wait_ready().await;
        cp.start_controllers();
        cp
    }

    fn log(&self, name: &str) -> std::fs::File {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{name}.log")))
            .expect("log file")
    }

    fn spawn(&self, name: &str, bin: &Path, args: &[String]) -> Child {
        let log = self.log(name);
        Command::new(bin)
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()))
    }

    fn start_etcd(&mut self) {
        let peer = format!("http://127.0.0.1:{}", self.etcd_peer);
        let args: Vec<String> = [
            "--name=default",
            &format!("--data-dir={}", self.dir.join("etcd").display()),
            &format!("--listen-client-urls={}", self.etcd_url),
            &format!("--advertise-client-urls={}", self.etcd_url),
            &format!("--listen-peer-urls={peer}"),
            &format!("--initial-advertise-peer-urls={peer}"),
            &format!("--initial-cluster=default={peer}"),
            "--log-level=warn",
            // A small default quota is plenty; keeps the data dir small.
            "--quota-backend-bytes=1073741824",
        ]
        .map(String::from)
        .to_vec();
        self.etcd = Some(self.spawn("etcd", &self.bins.etcd.clone(), &args));
    }

    async fn wait_etcd(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let http = reqwest::Client::new();
        loop {
            let ok = http
                .get(format!("{}/health", self.etcd_url))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ok {
                return;
            }
            self.assert_alive("etcd");
            assert!(
                Instant::now() < deadline,
                "etcd did not start: see {}",
                self.dir.display()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Starts kube-apiserver (again, after [`ControlPlane::stop_apiserver`]).
    pub fn start_apiserver(&mut self) {
        let pki = self.dir.join("pki");
        let p = |f: &str| pki.join(f).display().to_string();
        let args: Vec<String> = vec![
            format!("--etcd-servers={}", self.etcd_url),
            "--bind-address=127.0.0.1".into(),
            "--advertise-address=127.0.0.1".into(),
            // The `kubernetes` Service's endpoints would be this loopback address, which
            // the reconciler refuses; nothing here reaches the API through the Service.
            "--endpoint-reconciler-type=none".into(),
            format!("--secure-port={}", self.apiserver_port),
            format!("--tls-cert-file={}", p("apiserver.crt")),
            format!("--tls-private-key-file={}", p("apiserver.key")),
            format!("--client-ca-file={}", p("ca.crt")),
            // How it reaches kubelets (logs): the simulated ones serve with this CA's cert.
            format!("--kubelet-certificate-authority={}", p("ca.crt")),
            format!("--kubelet-client-certificate={}", p("admin.crt")),
            format!("--kubelet-client-key={}", p("admin.key")),
            "--kubelet-preferred-address-types=InternalIP".into(),
            format!("--service-account-key-file={}", p("sa.pub")),
            format!("--service-account-signing-key-file={}", p("sa.key")),
            "--service-account-issuer=https://kubernetes.default.svc".into(),
            "--api-audiences=https://kubernetes.default.svc".into(),
            "--authorization-mode=Node,RBAC".into(),
            // PodSecurity and the defaults stay on; NodeRestriction as on real clusters.
            "--enable-admission-plugins=NodeRestriction".into(),
            "--service-cluster-ip-range=10.96.0.0/16".into(),
            format!(
                "--audit-policy-file={}",
                self.dir.join("audit-policy.yaml").display()
            ),
            format!("--audit-log-path={}", self.audit_log.display()),
            "--audit-log-format=json".into(),
            "--audit-log-mode=blocking".into(),
            "--allow-privileged=true".into(),
            "--profiling=false".into(),
            "--v=1".into(),
        ];
        self.apiserver = Some(self.spawn("kube-apiserver", &self.bins.apiserver.clone(), &args));
    }

    /// Stops kube-apiserver (SIGTERM, then SIGKILL), as an upgrade or a crash would.
    pub fn stop_apiserver(&mut self) {
        if let Some(mut c) = self.apiserver.take() {
            if let Some(pid) = rustix::process::Pid::from_raw(c.id() as i32) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            }
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if c.try_wait().ok().flatten().is_some() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn start_controllers(&mut self) {
        let pki = self.dir.join("pki");
        let p = |f: &str| pki.join(f).display().to_string();
        let kc = |n: &str| {
            self.dir
                .join(format!("{n}.kubeconfig"))
                .display()
                .to_string()
        };
        let cm: Vec<String> = vec![
            format!("--kubeconfig={}", kc("controller-manager")),
            format!("--authentication-kubeconfig={}", kc("controller-manager")),
            format!("--authorization-kubeconfig={}", kc("controller-manager")),
            format!("--service-account-private-key-file={}", p("sa.key")),
            format!("--root-ca-file={}", p("ca.crt")),
            "--use-service-account-credentials=true".into(),
            "--leader-elect=false".into(),
            "--bind-address=127.0.0.1".into(),
            // No serving port: nothing here scrapes it, and none can collide.
            "--secure-port=0".into(),
            format!("--node-monitor-grace-period={NODE_MONITOR_GRACE}"),
            "--controllers=*".into(),
            "--v=1".into(),
        ];
        self.controller_manager = Some(self.spawn(
            "kube-controller-manager",
            &self.bins.controller_manager.clone(),
            &cm,
        ));
        let sched: Vec<String> = vec![
            format!("--kubeconfig={}", kc("scheduler")),
            format!("--authentication-kubeconfig={}", kc("scheduler")),
            format!("--authorization-kubeconfig={}", kc("scheduler")),
            "--leader-elect=false".into(),
            "--bind-address=127.0.0.1".into(),
            "--secure-port=0".into(),
            "--v=1".into(),
        ];
        self.scheduler = Some(self.spawn("kube-scheduler", &self.bins.scheduler.clone(), &sched));
    }

    fn assert_alive(&mut self, name: &str) {
        let child = match name {
            "etcd" => &mut self.etcd,
            _ => &mut self.apiserver,
        };
        if let Some(c) = child
            && let Ok(Some(status)) = c.try_wait()
        {
            let log =
                std::fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            panic!(
                "{name} exited ({status}):\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
    }

    /// Waits until the API server answers `/readyz` (and its RBAC bootstrap is done).
    pub async fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Ok(client) = self.client().await
                && let Ok(text) = client
                    .request_text(
                        http::Request::get("/readyz")
                            .body(Vec::new())
                            .expect("request"),
                    )
                    .await
                && text.trim() == "ok"
            {
                return;
            }
            self.assert_alive("kube-apiserver");
            assert!(
                Instant::now() < deadline,
                "kube-apiserver not ready: see {}",
                self.dir.join("kube-apiserver.log").display()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// A client with the admin kubeconfig.
    pub async fn client(&self) -> kube::Result<kube::Client> {
        client_from(&self.kubeconfig).await
    }

    /// Writes a key outside Kubernetes' prefix (so the revision moves past every
    /// resource version handed out) and compacts etcd's history up to it: any watch
    /// resumed from an earlier resource version then gets 410 Gone.
    pub async fn compact_etcd(&self) {
        let http = reqwest::Client::new();
        // Key "kcloud-test/bump", value "1", base64.
        let head: serde_json::Value = http
            .post(format!("{}/v3/kv/put", self.etcd_url))
            .body(r#"{"key":"a2Nsb3VkLXRlc3QvYnVtcA==","value":"MQ=="}"#)
            .send()
            .await
            .expect("etcd put")
            .json()
            .await
            .expect("etcd put JSON");
        let rev = head["header"]["revision"]
            .as_str()
            .and_then(|r| r.parse::<u64>().ok())
            .expect("etcd revision");
        let r = http
            .post(format!("{}/v3/kv/compaction", self.etcd_url))
            .body(format!(r#"{{"revision":"{rev}","physical":true}}"#))
            .send()
            .await
            .expect("etcd compaction");
        assert!(r.status().is_success(), "compaction: {:?}", r.text().await);
    }

    /// The audit log's events (one JSON object per line).
    pub fn audit_events(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.audit_log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// The simulated kubelets' serving certificate and key (PEM files).
    pub fn kubelet_tls(&self) -> (PathBuf, PathBuf) {
        let pki = self.dir.join("pki");
        (pki.join("kubelet.crt"), pki.join("kubelet.key"))
    }

    /// A kubeconfig that authenticates with `token` (a ServiceAccount's).
    pub fn token_kubeconfig(&self, path: &Path, token: &str, namespace: &str) {
        write_kubeconfig(
            path,
            &self.server,
            &self.dir.join("pki/ca.crt"),
            Auth::Token(token, namespace),
        );
    }
}

/// A client from a kubeconfig file.
pub async fn client_from(path: &Path) -> kube::Result<kube::Client> {
    let kc = Kubeconfig::read_from(path).map_err(kube::Error::InferKubeconfig)?;
    let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .map_err(kube::Error::InferKubeconfig)?;
    kube::Client::try_from(config)
}

fn openssl(args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("running openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The cluster CA, the API server's certificate and the service-account key pair.
fn make_pki(pki: &Path) {
    let p = |f: &str| pki.join(f).display().to_string();
    openssl(&[
        "ecparam",
        "-name",
        "prime256v1",
        "-genkey",
        "-noout",
        "-out",
        &p("ca.key"),
    ]);
    openssl(&[
        "req",
        "-x509",
        "-new",
        "-key",
        &p("ca.key"),
        "-sha256",
        "-days",
        "30",
        "-subj",
        "/CN=kcloud-test-ca",
        "-out",
        &p("ca.crt"),
    ]);
    openssl(&[
        "ecparam",
        "-name",
        "prime256v1",
        "-genkey",
        "-noout",
        "-out",
        &p("apiserver.key"),
    ]);
    openssl(&[
        "req",
        "-new",
        "-key",
        &p("apiserver.key"),
        "-subj",
        "/CN=kube-apiserver",
        "-out",
        &p("apiserver.csr"),
    ]);
    std::fs::write(
        pki.join("apiserver.ext"),
        "subjectAltName=IP:127.0.0.1,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,\
         DNS:kubernetes.default,DNS:kubernetes.default.svc\nextendedKeyUsage=serverAuth\n",
    )
    .expect("extensions");
    openssl(&[
        "x509",
        "-req",
        "-in",
        &p("apiserver.csr"),
        "-CA",
        &p("ca.crt"),
        "-CAkey",
        &p("ca.key"),
        "-CAcreateserial",
        "-days",
        "30",
        "-sha256",
        "-extfile",
        &p("apiserver.ext"),
        "-out",
        &p("apiserver.crt"),
    ]);
    openssl(&[
        "genpkey",
        "-algorithm",
        "RSA",
        "-pkeyopt",
        "rsa_keygen_bits:2048",
        "-out",
        &p("sa.key"),
    ]);
    openssl(&["pkey", "-in", &p("sa.key"), "-pubout", "-out", &p("sa.pub")]);
    // The simulated kubelets' serving certificate (every node is on 127.0.0.1).
    openssl(&[
        "ecparam",
        "-name",
        "prime256v1",
        "-genkey",
        "-noout",
        "-out",
        &p("kubelet.key"),
    ]);
    openssl(&[
        "req",
        "-new",
        "-key",
        &p("kubelet.key"),
        "-subj",
        "/CN=kubelet",
        "-out",
        &p("kubelet.csr"),
    ]);
    std::fs::write(
        pki.join("kubelet.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
    )
    .expect("extensions");
    openssl(&[
        "x509",
        "-req",
        "-in",
        &p("kubelet.csr"),
        "-CA",
        &p("ca.crt"),
        "-CAkey",
        &p("ca.key"),
        "-CAcreateserial",
        "-days",
        "30",
        "-sha256",
        "-extfile",
        &p("kubelet.ext"),
        "-out",
        &p("kubelet.crt"),
    ]);
}

/// A client certificate `{name}.crt`/`{name}.key` for `user` (in `group`).
fn client_cert(pki: &Path, name: &str, user: &str, group: Option<&str>) {
    let p = |f: &str| pki.join(f).display().to_string();
    let subject = match group {
        Some(g) => format!("/O={g}/CN={user}"),
        None => format!("/CN={user}"),
    };
    let key = p(&format!("{name}.key"));
    let csr = p(&format!("{name}.csr"));
    openssl(&[
        "ecparam",
        "-name",
        "prime256v1",
        "-genkey",
        "-noout",
        "-out",
        &key,
    ]);
    openssl(&["req", "-new", "-key", &key, "-subj", &subject, "-out", &csr]);
    std::fs::write(pki.join("client.ext"), "extendedKeyUsage=clientAuth\n").expect("ext");
    openssl(&[
        "x509",
        "-req",
        "-in",
        &csr,
        "-CA",
        &p("ca.crt"),
        "-CAkey",
        &p("ca.key"),
        "-CAcreateserial",
        "-days",
        "30",
        "-sha256",
        "-extfile",
        &p("client.ext"),
        "-out",
        &p(&format!("{name}.crt")),
    ]);
}

enum Auth<'a> {
    Cert(&'a Path, &'a Path),
    Token(&'a str, &'a str),
}

fn write_kubeconfig(path: &Path, server: &str, ca: &Path, auth: Auth<'_>) {
    let (user, namespace) = match auth {
        Auth::Cert(crt, key) => (
            format!(
                "client-certificate: {}\n    client-key: {}",
                crt.display(),
                key.display()
            ),
            "default",
        ),
        Auth::Token(token, ns) => (format!("token: {token}"), ns),
    };
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {server}\n    \
         certificate-authority: {}\nusers:\n- name: user\n  user:\n    {user}\ncontexts:\n- name: test\n  \
         context:\n    cluster: test\n    user: user\n    namespace: {namespace}\ncurrent-context: test\n",
        ca.display()
    );
    std::fs::write(path, text).expect("kubeconfig");
}
