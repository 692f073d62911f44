//! The cluster shape against a real Kubernetes control plane (etcd, kube-apiserver,
//! kube-controller-manager, kube-scheduler built from source, `kcloud_testkit::cluster`)
//! with simulated GPU nodes (`NodeSimulator`: kubelet and NVIDIA's DRA driver stand-in)
//! and real kcloud agents (`--simulate dgx-a100-mig`) pushing their inventories.
//!
//! The chart is installed with helm; the aggregator binary runs outside the cluster
//! with a kubeconfig carrying the chart's ServiceAccount token (TokenRequest), so the
//! chart's RBAC alone authorizes what it does, in a namespace that enforces PodSecurity
//! `restricted`. Then, in order: a JupyterLab server on a MIG instance in `env` mode
//! (kernel `1+1` through the proxy), volumes, logs, events, the culling exemption, a
//! SIGKILL and restart of the aggregator, an image that cannot be pulled, a node that
//! vanishes, the API server restarted with etcd compacted under the aggregator's watch,
//! an exact comparison of what the aggregator called (the audit log) with what the Role
//! grants; then the chart upgraded to `dra` mode and a server whose device the real
//! scheduler allocates through a ResourceClaim.
//!
//! Needs root (pods get network namespaces), go (the control plane is built from
//! source, cached by version), openssl, ip, bwrap, setpriv, jupyter-lab, helm
//! (`scripts/install-helm.sh`). `scripts/test.sh` provides them.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Node, Pod, Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::Role;
use k8s_openapi::api::resource::v1::ResourceClaim;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_util::sync::CancellationToken;

use kcloud_agent::collector::{GpuSource, SimLayout, SimulatedSource};
use kcloud_agent::config::Preset;
use kcloud_provision::kube::{SELECTOR, claim_name, pod_name, secret_name};
use kcloud_testkit::cluster::node::{NodeSimulator, UNPULLABLE};
use kcloud_testkit::cluster::{ControlPlane, workspace};
use kcloud_testkit::process::AggregatorProcess;
use kcloud_testkit::require_tool;

const RELEASE: &str = "kcloud";
const NS: &str = "kcloud";
const SERVERS_NS: &str = "kcloud-servers";
const SA: &str = "kcloud-aggregator";
const ADMIN_PW: &str = "cluster-admin-password-1";
const AGENT_TOKEN: &str = "cluster-agent-token-0123456789";
const NODES: [&str; 2] = ["sim-node-1", "sim-node-2"];

/// What a scenario works with.
struct Cluster {
    cp: ControlPlane,
    client: kube::Client,
    dir: PathBuf,
    helm: PathBuf,
    nodes: Vec<NodeSimulator>,
    agents: CancellationToken,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.agents.cancel();
    }
}

/// The GPUs the agent on `node` simulates (the same seed, so the same UUIDs).
fn gpus_of(node: &str) -> Vec<kcloud_common::inventory::Gpu> {
    let mut s = SimulatedSource::new(SimLayout::preset(Preset::DgxA100Mig), node).unwrap();
    s.read().gpus
}

fn helm(c: &Cluster, args: &[&str]) -> String {
    let out = std::process::Command::new(&c.helm)
        .args(args)
        .env("KUBECONFIG", &c.cp.kubeconfig)
        .env("HELM_CACHE_HOME", c.dir.join("helm-cache"))
        .env("HELM_CONFIG_HOME", c.dir.join("helm-config"))
        .env("HELM_DATA_HOME", c.dir.join("helm-data"))
        .output()
        .expect("running helm");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "helm {args:?}:\n{text}");
    text
}

/// The chart's values for these tests, in `mode` (env or dra).
fn chart_args(mode: &str) -> Vec<String> {
    [
        "--namespace",
        NS,
        "--set",
        &format!("aggregator.kubernetes.namespace={SERVERS_NS}"),
        "--set",
        &format!("aggregator.kubernetes.pinning.mode={mode}"),
        "--set",
        "aggregator.kubernetes.pinning.tolerations=null",
        "--set",
        "aggregator.kubernetes.images[0]=quay.io/jupyter/scipy-notebook:latest",
        "--set",
        &format!("aggregator.kubernetes.images[1]={UNPULLABLE}*"),
        "--set",
        "aggregator.persistence.enabled=false",
    ]
    .map(String::from)
    .to_vec()
}

async fn start_cluster() -> Cluster {
    for tool in ["openssl", "ip", "bwrap", "setpriv", "jupyter-lab", "go"] {
        require_tool(tool);
    }
    let helm = PathBuf::from(
        String::from_utf8(
            std::process::Command::new(workspace().join("scripts/install-helm.sh"))
                .output()
                .expect("scripts/install-helm.sh")
                .stdout,
        )
        .unwrap()
        .trim(),
    );
    let dir = tempfile::Builder::new()
        .prefix("kcloud-cluster-")
        .tempdir()
        .unwrap()
        .keep();
    println!("cluster files in {}", dir.display());
    let cp = ControlPlane::start(&dir.join("control-plane")).await;
    let client = cp.client().await.unwrap();
    let mut nodes = Vec::new();
    for n in NODES {
        let pods = dir.join("pods").join(n);
        nodes.push(
            NodeSimulator::start(client.clone(), n, gpus_of(n), cp.kubelet_tls(), &pods).await,
        );
    }
    Cluster {
        cp,
        client,
        dir,
        helm,
        nodes,
        agents: CancellationToken::new(),
    }
}

/// The namespaces: the release's, and the servers' enforcing PodSecurity `restricted`.
async fn namespaces(c: &Cluster) {
    let api: Api<Namespace> = Api::all(c.client.clone());
    for (name, restricted) in [(NS, false), (SERVERS_NS, true)] {
        let labels = if restricted {
            json!({"pod-security.kubernetes.io/enforce": "restricted",
                   "pod-security.kubernetes.io/enforce-version": "latest"})
        } else {
            json!({})
        };
        let ns: Namespace =
            serde_json::from_value(json!({"metadata": {"name": name, "labels": labels}})).unwrap();
        api.create(&PostParams::default(), &ns).await.unwrap();
    }
    // Pods need their namespace's `default` ServiceAccount, which the controller
    // manager makes a moment after the namespace.
    for name in [NS, SERVERS_NS] {
        let sas: Api<ServiceAccount> = Api::namespaced(c.client.clone(), name);
        let deadline = Instant::now() + Duration::from_secs(30);
        while sas.get_opt("default").await.unwrap().is_none() {
            assert!(
                Instant::now() < deadline,
                "no default ServiceAccount in {name}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Generated Secrets of the release: name and data.
async fn release_secrets(c: &Cluster) -> Vec<(String, Value)> {
    let api: Api<Secret> = Api::namespaced(c.client.clone(), NS);
    let mut out: Vec<(String, Value)> = api
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|s| {
            s.metadata
                .name
                .as_deref()
                .is_some_and(|n| n.starts_with(RELEASE) && !n.starts_with("sh.helm"))
        })
        .map(|s| {
            (
                s.metadata.name.clone().unwrap(),
                serde_json::to_value(&s.data).unwrap(),
            )
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// The aggregator binary, authenticated as the chart's ServiceAccount, with the chart's
/// settings file (read back from its ConfigMap).
async fn aggregator(c: &Cluster, data: &Path) -> AggregatorProcess {
    let sa: Api<ServiceAccount> = Api::namespaced(c.client.clone(), NS);
    let token = sa
        .create_token_request(
            SA,
            &PostParams::default(),
            &serde_json::from_value(json!({"spec": {"expirationSeconds": 7200}})).unwrap(),
        )
        .await
        .expect("TokenRequest for the chart's ServiceAccount")
        .status
        .expect("token status")
        .token
        .expect("a token");
    let kubeconfig = c.dir.join("aggregator.kubeconfig");
    c.cp.token_kubeconfig(&kubeconfig, &token, SERVERS_NS);
    let cms: Api<ConfigMap> = Api::namespaced(c.client.clone(), NS);
    let cm = cms.get(&format!("{RELEASE}-aggregator")).await.unwrap();
    let toml = cm.data.unwrap()["kcloud.toml"].clone();
    let config = c.dir.join("kcloud.toml");
    std::fs::write(&config, toml).unwrap();
    let token_file = c.dir.join("agent-token");
    std::fs::write(&token_file, AGENT_TOKEN).unwrap();
    AggregatorProcess::new(env!("CARGO_BIN_EXE_kcloud-aggregator"), data)
        .args(["--provisioner", "kubernetes", "--namespace", SERVERS_NS])
        .args(["--config", config.to_str().unwrap()])
        .args(["--agent-token-file", token_file.to_str().unwrap()])
        .args(["--agent-heartbeat", "1h", "--stop-grace", "3s"])
        .env("KUBECONFIG", kubeconfig.to_str().unwrap())
        .env("KCLOUD_BOOTSTRAP_ADMIN_USER", "admin")
        .env("KCLOUD_BOOTSTRAP_ADMIN_PASSWORD", ADMIN_PW)
        .env("RUST_LOG", "info")
        .log_to(&c.dir.join("aggregator.log"))
        .start()
        .await
}

/// A real kcloud agent per node of `nodes`, simulating its GPUs, pushing to `base`.
fn agents(c: &Cluster, base: &str, nodes: &[&str]) {
    for node in nodes {
        let token_file = c.dir.join("agent-token");
        let port = kcloud_testkit::free_port();
        let config = <kcloud_agent::Config as clap::Parser>::try_parse_from([
            "kcloud-agent",
            "--node-name",
            node,
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--simulate",
            "dgx-a100-mig",
            "--interval",
            "1s",
            "--aggregator-url",
            base,
            "--agent-token-file",
            token_file.to_str().unwrap(),
        ])
        .unwrap();
        tokio::spawn(kcloud_agent::run(config, c.agents.clone()));
    }
}

struct Api2 {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl Api2 {
    async fn login(base: &str) -> Api2 {
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        let token = loop {
            let r = http
                .post(format!("{base}/api/v1/auth/login"))
                .json(&json!({"username": "admin", "password": ADMIN_PW}))
                .send()
                .await;
            if let Ok(r) = r
                && r.status() == StatusCode::OK
            {
                let v: Value = r.json().await.unwrap();
                break v["access_token"].as_str().unwrap().to_owned();
            }
            assert!(Instant::now() < deadline, "cannot sign in");
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        Api2 {
            base: base.to_owned(),
            token,
            http,
        }
    }

    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let r = req.send().await.unwrap();
        let status = r.status();
        let text = r.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    async fn free(&self, kind: &str, node: &str) -> Vec<String> {
        let (_, body) = self
            .call(
                Method::GET,
                &format!("/api/v1/gpus?available=true&kind={kind}&node={node}&limit=1000"),
                None,
            )
            .await;
        body["items"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|d| d["uuid"].as_str().unwrap().to_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    async fn wait_gpus(&self, nodes: &[&str]) {
        let deadline = Instant::now() + Duration::from_secs(60);
        for node in nodes {
            while self.free("mig", node).await.is_empty() {
                assert!(Instant::now() < deadline, "no inventory from {node}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }

    async fn create(&self, body: Value) -> Value {
        let (status, body) = self
            .call(Method::POST, "/api/v1/users/admin/servers", Some(body))
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        body
    }

    async fn wait(&self, name: &str, want: &str, within: Duration) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let (status, body) = self
                .call(
                    Method::GET,
                    &format!("/api/v1/users/admin/servers/{name}"),
                    None,
                )
                .await;
            if status == StatusCode::OK && body["status"] == want {
                return body;
            }
            if want != "failed" && body["status"] == "failed" {
                panic!("{name} failed: {body}");
            }
            assert!(Instant::now() < deadline, "{name}: still {body}");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    async fn delete(&self, name: &str) {
        let (status, body) = self
            .call(
                Method::DELETE,
                &format!("/api/v1/users/admin/servers/{name}"),
                None,
            )
            .await;
        assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    }
}

/// `1+1` on a new kernel of `admin/name`, through the aggregator's proxy.
async fn kernel_one_plus_one(api: &Api2, name: &str) -> String {
    let (status, body) = api
        .call(
            Method::POST,
            &format!("/user/admin/{name}/api/kernels"),
            Some(json!({"name": "python3"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let kernel = body["id"].as_str().unwrap().to_owned();
    let session = uuid::Uuid::new_v4().to_string();
    let url = format!(
        "{}/user/admin/{name}/api/kernels/{kernel}/channels?session_id={session}",
        api.base.replacen("http://", "ws://", 1)
    );
    let mut req = url.into_client_request().unwrap();
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {}", api.token).parse().unwrap(),
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(req)
        .await
        .expect("websocket");
    let code = "import os; str(1+1) + '|' + os.environ.get('NVIDIA_VISIBLE_DEVICES', '')";
    let msg_id = uuid::Uuid::new_v4().to_string();
    let msg = json!({
        "header": {"msg_id": msg_id, "username": "admin", "session": session,
                   "msg_type": "execute_request", "version": "5.3"},
        "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
        "content": {"code": code, "silent": false, "store_history": false,
                    "user_expressions": {}, "allow_stdin": false, "stop_on_error": true}
    });
    ws.send(tungstenite::Message::Text(msg.to_string().into()))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let m = tokio::time::timeout(left, ws.next())
            .await
            .expect("no execute_result")
            .expect("websocket ended")
            .unwrap();
        let tungstenite::Message::Text(t) = m else {
            continue;
        };
        let v: Value = serde_json::from_str(t.as_str()).unwrap();
        if v["parent_header"]["msg_id"] != msg_id.as_str() {
            continue;
        }
        match v["header"]["msg_type"].as_str() {
            Some("execute_result") => {
                return v["content"]["data"]["text/plain"]
                    .as_str()
                    .unwrap()
                    .trim_matches('\'')
                    .to_owned();
            }
            Some("error") => panic!("kernel error: {v}"),
            _ => {}
        }
    }
}

async fn wait_gone<K>(api: &Api<K>, name: &str, what: &str)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let deadline = Instant::now() + Duration::from_secs(90);
    while api.get_opt(name).await.unwrap().is_some() {
        assert!(Instant::now() < deadline, "{what} {name} was not removed");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// An object labelled as a server's whose pod does not exist: an orphan.
async fn plant<K>(api: &Api<K>, name: &str)
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + serde::Serialize
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    let labels: serde_json::Map<String, Value> = SELECTOR
        .split(',')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), json!(v)))
        .collect();
    let mut obj = json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "metadata": {"name": name, "labels": labels},
    });
    if K::kind(&()) == "Secret" {
        obj["stringData"] = json!({"token": "left over"});
    } else {
        obj["spec"] = json!({"devices": {"requests": [{"name": "gpu", "exactly": {
            "deviceClassName": "mig.nvidia.com", "allocationMode": "ExactCount", "count": 1}}]}});
    }
    let obj: K = serde_json::from_value(obj).expect("object");
    api.create(&PostParams::default(), &obj)
        .await
        .expect("planting an orphan");
}

/// What the aggregator's ServiceAccount did, from the audit log: `(verb, group,
/// resource[/subresource])`, and any request that was refused.
fn sa_calls(c: &Cluster) -> (BTreeSet<(String, String, String)>, Vec<String>) {
    let user = format!("system:serviceaccount:{NS}:{SA}");
    let mut calls = BTreeSet::new();
    let mut refused = Vec::new();
    for e in c.cp.audit_events() {
        if e["user"]["username"] != user.as_str() || e["stage"] != "ResponseComplete" {
            continue;
        }
        let Some(obj) = e["objectRef"].as_object() else {
            continue; // discovery and the like
        };
        let resource = match obj.get("subresource").and_then(Value::as_str) {
            Some(sub) => format!("{}/{sub}", obj["resource"].as_str().unwrap_or("")),
            None => obj["resource"].as_str().unwrap_or("").to_owned(),
        };
        let group = obj
            .get("apiGroup")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned();
        let verb = e["verb"].as_str().unwrap_or("").to_owned();
        let key = (verb, group, resource);
        if e["annotations"]["authorization.k8s.io/decision"] == "forbid" {
            refused.push(key);
        } else {
            calls.insert(key);
        }
    }
    // A call refused only while a restarted API server's authorizer was still loading
    // the roles (it was allowed before and after) is not the Role's doing.
    let refused = refused
        .into_iter()
        .filter(|k| !calls.contains(k))
        .map(|(v, g, r)| format!("{v} {g}/{r}"))
        .collect();
    (calls, refused)
}

/// Compares what the aggregator called with what the chart's Role grants: every grant
/// used, nothing refused.
async fn rbac_is_exact(c: &Cluster) {
    let roles: Api<Role> = Api::namespaced(c.client.clone(), SERVERS_NS);
    let role = roles.get(&format!("{RELEASE}-aggregator")).await.unwrap();
    let mut granted = BTreeSet::new();
    for rule in role.rules.unwrap_or_default() {
        for group in rule.api_groups.unwrap_or_default() {
            for resource in rule.resources.clone().unwrap_or_default() {
                for verb in &rule.verbs {
                    granted.insert((verb.clone(), group.clone(), resource.clone()));
                }
            }
        }
    }
    let (calls, refused) = sa_calls(c);
    assert!(
        refused.is_empty(),
        "refused calls (the Role misses them): {refused:?}"
    );
    let unused: Vec<_> = granted.difference(&calls).collect();
    assert!(
        unused.is_empty(),
        "granted but never used (the Role grants too much): {unused:?}\ncalls: {calls:?}"
    );
    let ungranted: Vec<_> = calls
        .iter()
        .filter(|k| !granted.contains(*k) && k.2 != "selfsubjectaccessreviews")
        .collect();
    assert!(
        ungranted.is_empty(),
        "called without a grant in the Role: {ungranted:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_cluster_shape_on_a_real_control_plane() {
    let started = Instant::now();
    let step = |what: &str| println!("[{:>5.1} s] {what}", started.elapsed().as_secs_f64());
    let c = start_cluster().await;
    step("control plane up, nodes registered");

    // 1. helm install; the generated Secrets survive an upgrade.
    namespaces(&c).await;
    let chart = workspace().join("charts/kcloud");
    let mut args = vec![
        "install".to_owned(),
        RELEASE.to_owned(),
        chart.display().to_string(),
    ];
    args.extend(chart_args("env"));
    helm(&c, &args.iter().map(String::as_str).collect::<Vec<_>>());
    let secrets = release_secrets(&c).await;
    assert!(
        secrets.len() >= 3,
        "signing key, agent token, bootstrap admin: {:?}",
        secrets.iter().map(|s| &s.0).collect::<Vec<_>>()
    );
    let mut args = vec![
        "upgrade".to_owned(),
        RELEASE.to_owned(),
        chart.display().to_string(),
    ];
    args.extend(chart_args("env"));
    helm(&c, &args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(
        release_secrets(&c).await,
        secrets,
        "Secrets changed on upgrade"
    );
    step("helm install and upgrade");

    // 2. The aggregator as the chart's ServiceAccount; agents push.
    let data = c.dir.join("data");
    let mut agg = aggregator(&c, &data).await;
    agents(&c, &agg.base(), &NODES);
    let api = Api2::login(&agg.base()).await;
    api.wait_gpus(&NODES).await;
    step("aggregator and agents up");

    // 3. A JupyterLab on a chosen MIG instance, env mode: on the right node, Ready,
    // reached through the proxy; the device is the one asked for.
    let mig = api.free("mig", NODES[0]).await.remove(0);
    let s = api
        .create(json!({"name": "lab", "devices": [mig], "preset": "small",
                       "image": "quay.io/jupyter/scipy-notebook:latest"}))
        .await;
    assert_eq!(s["node"], NODES[0]);
    api.wait("lab", "running", Duration::from_secs(120)).await;
    let pods: Api<Pod> = Api::namespaced(c.client.clone(), SERVERS_NS);
    let pod = pods.get(&pod_name("admin", "lab")).await.unwrap();
    assert_eq!(
        pod.spec.as_ref().unwrap().node_name.as_deref(),
        Some(NODES[0])
    );
    assert_eq!(kernel_one_plus_one(&api, "lab").await, format!("2|{mig}"));
    step("env mode: JupyterLab on a MIG instance, kernel 1+1 through the proxy");
    // Everything else the Role allows, used as a user would.
    for (method, path, body) in [
        (
            Method::GET,
            "/api/v1/users/admin/servers/lab/logs?tail=20",
            None,
        ),
        (Method::GET, "/api/v1/users/admin/servers/lab/events", None),
        (
            Method::PATCH,
            "/api/v1/users/admin/servers/lab",
            Some(json!({"cull_exempt": true})),
        ),
        (
            Method::POST,
            "/api/v1/users/admin/volumes",
            Some(json!({"name": "data", "size": "1Gi"})),
        ),
        (Method::GET, "/api/v1/users/admin/volumes", None),
        (Method::DELETE, "/api/v1/users/admin/volumes/data", None),
    ] {
        let (status, body) = api.call(method.clone(), path, body).await;
        assert!(status.is_success(), "{method} {path}: {status} {body}");
    }
    let secrets_api: Api<Secret> = Api::namespaced(c.client.clone(), SERVERS_NS);
    let token_secret = secret_name(&pod_name("admin", "lab"));
    let uid = pod.metadata.uid.clone().unwrap();
    api.delete("lab").await;
    wait_gone(&pods, &pod_name("admin", "lab"), "pod").await;
    // The token Secret is owned by the pod: the real garbage collector removes it.
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let left = secrets_api
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .filter(|s| {
                s.metadata
                    .owner_references
                    .iter()
                    .flatten()
                    .any(|o| o.uid == uid)
                    || s.metadata.name.as_deref() == Some(&token_secret)
            })
            .count();
        if left == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the pod's Secret was not collected"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(api.free("mig", NODES[0]).await.contains(&mig));
    step("delete: pod and Secret gone, device free");

    // 4. SIGKILL and restart: servers and the ledger rebuilt from list and watch.
    let a = api.free("mig", NODES[0]).await;
    let b = api.free("gpu", NODES[1]).await;
    let cmd = json!(["python3", "-m", "http.server", "{port}", "--bind", "{ip}"]);
    api.create(json!({"name": "one", "devices": [a[0]], "preset": "small", "command": cmd}))
        .await;
    api.create(json!({"name": "two", "devices": [b[0]], "preset": "small", "command": cmd}))
        .await;
    api.wait("one", "running", Duration::from_secs(60)).await;
    api.wait("two", "running", Duration::from_secs(60)).await;
    agg.sigkill();
    // Left by a crash between making a server's Secret and its pod: swept at start.
    let orphan = secret_name(&pod_name("admin", "ghost"));
    plant(&secrets_api, &orphan).await;
    agg.spawn();
    agg.ready(Duration::from_secs(60)).await;
    let api = Api2::login(&agg.base()).await;
    api.wait_gpus(&NODES).await;
    wait_gone(&secrets_api, &orphan, "orphaned Secret").await;
    api.wait("one", "running", Duration::from_secs(30)).await;
    api.wait("two", "running", Duration::from_secs(30)).await;
    assert!(
        !api.free("mig", NODES[0]).await.contains(&a[0]),
        "held after restart"
    );
    assert!(
        !api.free("gpu", NODES[1]).await.contains(&b[0]),
        "held after restart"
    );
    let (status, _) = api
        .call(
            Method::POST,
            "/api/v1/users/admin/servers",
            Some(json!({"name": "dup", "devices": [a[0]], "preset": "small", "command": cmd})),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "a held device given twice");
    step("SIGKILL and restart: servers and ledger rebuilt");

    // 6a. An image that cannot be pulled: failed with the reason, device free.
    let c0 = api.free("mig", NODES[1]).await.remove(0);
    api.create(json!({"name": "nopull", "devices": [c0], "preset": "small",
                      "image": format!("{UNPULLABLE}nope:1")}))
        .await;
    let failed = api.wait("nopull", "failed", Duration::from_secs(60)).await;
    assert!(
        failed["reason"]
            .as_str()
            .unwrap()
            .contains("ImagePullBackOff"),
        "{failed}"
    );
    wait_gone(&pods, &pod_name("admin", "nopull"), "pod").await;
    assert!(api.free("mig", NODES[1]).await.contains(&c0));
    step("unpullable image: failed, device free");

    // 6c. A server past its memory: the kernel kills it; OOMKilled is the reason.
    let hog = json!([
        "python3",
        "-c",
        "import time; b = bytearray(1 << 30); time.sleep(300)"
    ]);
    api.create(json!({"name": "hog", "cpu": "500m", "memory": "128Mi", "command": hog}))
        .await;
    let failed = api.wait("hog", "failed", Duration::from_secs(60)).await;
    assert!(
        failed["reason"].as_str().unwrap().starts_with("OOMKilled"),
        "{failed}"
    );
    api.delete("hog").await;
    step("memory hog: OOMKilled");

    // 6b. A node that vanishes (and is removed from the cluster): its server fails
    // with the reason and its device is free.
    let nodes: Api<Node> = Api::all(c.client.clone());
    c.nodes[1].vanish();
    nodes
        .delete(NODES[1], &DeleteParams::default())
        .await
        .unwrap();
    let failed = api.wait("two", "failed", Duration::from_secs(150)).await;
    assert!(
        failed["reason"].as_str().unwrap().contains("NodeLost"),
        "{failed}"
    );
    step("node gone: server failed, device free");

    // 5. The API server restarted mid-watch, etcd compacted: the watch recovers (a
    // relist after 410 Gone) without missing the change made meanwhile.
    let mut c = c;
    c.cp.stop_apiserver();
    c.cp.compact_etcd().await;
    c.cp.start_apiserver();
    c.cp.wait_ready().await;
    let client = c.cp.client().await.unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), SERVERS_NS);
    pods.delete(
        &pod_name("admin", "one"),
        &DeleteParams::default().grace_period(0),
    )
    .await
    .unwrap();
    let failed = api.wait("one", "failed", Duration::from_secs(90)).await;
    assert!(
        failed["reason"]
            .as_str()
            .unwrap()
            .contains("outside kcloud"),
        "{failed}"
    );
    let log = std::fs::read_to_string(c.dir.join("aggregator.log")).unwrap();
    assert!(
        log.contains("too old resource version"),
        "the watch resumed from the compacted revision and was told so (410 Gone)"
    );
    assert!(api.free("mig", NODES[0]).await.contains(&a[0]));
    step("API server restart and compaction: watch recovered");

    // 7. RBAC is exact for env mode.
    for name in ["one", "two", "nopull"] {
        api.delete(name).await;
    }
    rbac_is_exact(&c).await;
    step("RBAC: every grant used, nothing refused");

    // 3 (dra). The chart upgraded to DRA; the real scheduler allocates the claim.
    let mut args = vec![
        "upgrade".to_owned(),
        RELEASE.to_owned(),
        chart.display().to_string(),
    ];
    args.extend(chart_args("dra"));
    helm(&c, &args.iter().map(String::as_str).collect::<Vec<_>>());
    drop(agg);
    let claims: Api<ResourceClaim> = Api::namespaced(client.clone(), SERVERS_NS);
    let orphan_claim = claim_name(&pod_name("admin", "ghost"));
    plant(&claims, &orphan_claim).await;
    let agg = aggregator(&c, &data).await;
    wait_gone(&claims, &orphan_claim, "orphaned claim").await;
    // The agents push to the new aggregator (the second node is gone).
    c.agents.cancel();
    c.agents = CancellationToken::new();
    agents(&c, &agg.base(), &NODES[..1]);
    let api = Api2::login(&agg.base()).await;
    api.wait_gpus(&NODES[..1]).await;
    let mig = api.free("mig", NODES[0]).await.remove(0);
    api.create(json!({"name": "dra", "devices": [mig], "preset": "small",
                      "image": "quay.io/jupyter/scipy-notebook:latest"}))
        .await;
    api.wait("dra", "running", Duration::from_secs(120)).await;
    let claim_list = claims.list(&ListParams::default()).await.unwrap().items;
    assert_eq!(claim_list.len(), 1);
    let claim = &claim_list[0];
    let allocated = claim
        .status
        .as_ref()
        .and_then(|s| s.allocation.as_ref())
        .and_then(|a| a.devices.as_ref())
        .and_then(|d| d.results.clone())
        .unwrap_or_default();
    assert_eq!(allocated.len(), 1, "{claim:?}");
    assert_eq!(allocated[0].pool, NODES[0]);
    assert_eq!(kernel_one_plus_one(&api, "dra").await, format!("2|{mig}"));
    let claim_name = claim.metadata.name.clone().unwrap();
    api.delete("dra").await;
    wait_gone(&pods, &pod_name("admin", "dra"), "pod").await;
    wait_gone(&claims, &claim_name, "claim").await;
    step("dra mode: claim allocated by the scheduler, kernel sees the device, claim gone");
    rbac_is_exact(&c).await;
    step("RBAC in dra mode: every grant used, nothing refused");
    // Passed: the files go (a failure keeps them, named in the output, for a look).
    let dir = c.dir.clone();
    drop(agg);
    drop(c);
    let _ = std::fs::remove_dir_all(dir);
}
