//! A stand-in for a GPU node's kubelet and NVIDIA's device stack, against a real API
//! server: it registers its Node (labels, capacity, Ready) and renews its Lease;
//! publishes a `resource.k8s.io/v1` ResourceSlice of its GPUs and MIG instances with
//! the attributes NVIDIA's DRA driver publishes (so the real scheduler matches the
//! aggregator's CEL selectors), and the `gpu.nvidia.com`/`mig.nvidia.com`
//! DeviceClasses; and runs the pods bound to it.
//!
//! A pod's container runs as a local process tree: in a network namespace of its own
//! with the pod's IP (a veth pair to the host, so the aggregator's proxy reaches
//! `podIP:port` as in a cluster), in a bubblewrap sandbox where the host's system is
//! the "image" (read-only) and the pod's volumes are at their mount paths (Secrets
//! and emptyDirs), as the pod's `runAsUser`, with its environment (`valueFrom` Secrets
//! resolved) and, for a pod with a ResourceClaim, the allocated devices' UUIDs in
//! `NVIDIA_VISIBLE_DEVICES`, as the driver would. It reports phases, readiness (it runs
//! the readiness probe), container states, and the reasons the provisioner understands:
//! `ErrImagePull` for images under `registry.invalid/`, and the exit of the process.
//! Deleting a pod stops its process (SIGTERM, SIGKILL after the grace period) and
//! removes the pod, as a kubelet does. [`NodeSimulator::vanish`] is the node dying.
//!
//! Only pods labelled as kcloud servers (`app.kubernetes.io/component=server`) are
//! run; others (the chart's own, which need images) are left waiting with
//! `ErrImagePull`.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt as _;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod, Secret};
use k8s_openapi::api::resource::v1::{DeviceClass, ResourceClaim, ResourceSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use kcloud_common::inventory::Gpu;

/// The DRA driver name NVIDIA's driver publishes under (and the attribute domain).
pub const DRIVER: &str = "gpu.nvidia.com";
/// Images under this registry "cannot be pulled" (`ErrImagePull`).
pub const UNPULLABLE: &str = "registry.invalid/";

/// Pod networks handed out in this process: a /30 each.
static NEXT_POD: AtomicU32 = AtomicU32::new(0);

/// One simulated GPU node. Stops (and ends its pods) when dropped.
pub struct NodeSimulator {
    pub name: String,
    stop: CancellationToken,
    pods: Arc<Mutex<HashMap<String, RunningPod>>>,
}

/// Container logs by `namespace/pod`, kept after the container ends (as a kubelet
/// keeps a terminated container's log until its pod goes).
type Logs = Arc<Mutex<HashMap<String, PathBuf>>>;

struct RunningPod {
    /// The process (`ip netns exec … bwrap …`), in its own process group.
    pid: u32,
    ip: Ipv4Addr,
    netns: String,
    /// The pod's files (volumes, home, log); kept after it ends, for its log.
    dir: PathBuf,
    /// The container's memory cgroup (its limit, its OOM kills), where one could be made.
    memory: Option<MemoryCgroup>,
}

impl Drop for NodeSimulator {
    fn drop(&mut self) {
        self.stop.cancel();
        let pods = std::mem::take(&mut *self.pods.lock().unwrap_or_else(|p| p.into_inner()));
        for (_, p) in pods {
            end_pod(&p);
        }
    }
}

impl NodeSimulator {
    /// Registers node `name` with these GPUs and starts serving it (heartbeats, pods
    /// with their files under `dir`, the kubelet's log endpoint with `tls`: certificate
    /// and key PEM files).
    pub async fn start(
        client: kube::Client,
        name: &str,
        gpus: Vec<Gpu>,
        tls: (PathBuf, PathBuf),
        dir: &Path,
    ) -> NodeSimulator {
        crate::require_tool("ip");
        crate::require_tool("bwrap");
        crate::require_tool("setpriv");
        let stop = CancellationToken::new();
        let logs: Logs = Arc::default();
        let port = serve_kubelet(&tls, logs.clone(), stop.clone()).await;
        ensure_device_classes(&client).await;
        register_node(&client, name, &gpus, port).await;
        publish_slice(&client, name, &gpus).await;
        let pods = Arc::new(Mutex::new(HashMap::new()));
        let uuids: BTreeMap<String, String> = devices(&gpus)
            .into_iter()
            .map(|(device, uuid, _)| (device, uuid))
            .collect();
        tokio::spawn(heartbeat(
            client.clone(),
            name.to_owned(),
            port,
            stop.clone(),
        ));
        std::fs::create_dir_all(dir).expect("pods dir");
        tokio::spawn(run_pods(
            Kubelet {
                client,
                uuids: Arc::new(uuids),
                pods: pods.clone(),
                logs,
                dir: dir.to_owned(),
                handled: std::collections::HashSet::new(),
                retry: Vec::new(),
            },
            name.to_owned(),
            stop.clone(),
        ));
        NodeSimulator {
            name: name.to_owned(),
            stop,
            pods,
        }
    }

    /// The node dies: its heartbeats stop and its containers are gone (its Node and
    /// pods stay in the API, as when a machine loses power).
    pub fn vanish(&self) {
        self.stop.cancel();
        let pods = std::mem::take(&mut *self.pods.lock().unwrap_or_else(|p| p.into_inner()));
        for (_, p) in pods {
            end_pod(&p);
        }
    }
}

/// `(device name, uuid, attributes)` of every allocatable device: whole GPUs not in MIG
/// mode, and MIG instances.
fn devices(gpus: &[Gpu]) -> Vec<(String, String, BTreeMap<String, Value>)> {
    let mut out = Vec::new();
    for g in gpus {
        let minor = g.minor_number.unwrap_or(g.index);
        if g.mig_enabled() {
            for m in &g.mig_instances {
                let name = format!(
                    "gpu-{}-mig-{}-{}",
                    g.index,
                    m.gpu_instance_id.unwrap_or(m.index),
                    m.compute_instance_id.unwrap_or(0)
                );
                let attrs = BTreeMap::from([
                    ("type".to_owned(), json!({"string": "mig"})),
                    ("uuid".to_owned(), json!({"string": m.uuid})),
                    ("parentUUID".to_owned(), json!({"string": g.uuid})),
                    ("profile".to_owned(), json!({"string": m.profile})),
                    ("productName".to_owned(), json!({"string": g.model})),
                    ("parentMinor".to_owned(), json!({"int": minor})),
                ]);
                out.push((name, m.uuid.clone(), attrs));
            }
        } else {
            let attrs = BTreeMap::from([
                ("type".to_owned(), json!({"string": "gpu"})),
                ("uuid".to_owned(), json!({"string": g.uuid})),
                ("productName".to_owned(), json!({"string": g.model})),
                ("index".to_owned(), json!({"int": g.index})),
                ("minor".to_owned(), json!({"int": minor})),
            ]);
            out.push((format!("gpu-{}", g.index), g.uuid.clone(), attrs));
        }
    }
    out
}

async fn ensure_device_classes(client: &kube::Client) {
    let api: Api<DeviceClass> = Api::all(client.clone());
    for (name, kind) in [("gpu.nvidia.com", "gpu"), ("mig.nvidia.com", "mig")] {
        let class: DeviceClass = serde_json::from_value(json!({
            "apiVersion": "resource.k8s.io/v1",
            "kind": "DeviceClass",
            "metadata": {"name": name},
            "spec": {"selectors": [{"cel": {"expression": format!(
                "device.driver == \"{DRIVER}\" && device.attributes[\"{DRIVER}\"].type == \"{kind}\""
            )}}]}
        }))
        .expect("device class");
        match api.create(&PostParams::default(), &class).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => panic!("creating DeviceClass {name}: {e}"),
        }
    }
}

async fn register_node(client: &kube::Client, name: &str, gpus: &[Gpu], port: u16) {
    let nodes: Api<Node> = Api::all(client.clone());
    let node: Node = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": {
            "kubernetes.io/hostname": name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
            "nvidia.com/gpu.present": "true",
            "nvidia.com/gpu.count": gpus.len().to_string(),
        }},
    }))
    .expect("node");
    match nodes.create(&PostParams::default(), &node).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => panic!("registering node {name}: {e}"),
    }
    node_status(&nodes, name, port).await;
}

async fn node_status(nodes: &Api<Node>, name: &str, port: u16) {
    let now = Time(jiff_now());
    let status = json!({"status": {
        "capacity": {"cpu": "64", "memory": "512Gi", "pods": "110", "ephemeral-storage": "1Ti"},
        "allocatable": {"cpu": "64", "memory": "512Gi", "pods": "110", "ephemeral-storage": "1Ti"},
        "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}, {"type": "Hostname", "address": name}],
        "daemonEndpoints": {"kubeletEndpoint": {"Port": port}},
        "conditions": [{
            "type": "Ready", "status": "True", "reason": "KubeletReady",
            "message": "kcloud node simulator is posting ready status",
            "lastHeartbeatTime": now, "lastTransitionTime": now,
        }],
        "nodeInfo": {
            "machineID": "kcloud-sim", "systemUUID": "kcloud-sim", "bootID": "kcloud-sim",
            "kernelVersion": "6", "osImage": "kcloud node simulator", "containerRuntimeVersion": "sim://1",
            "kubeletVersion": super::KUBERNETES_VERSION, "kubeProxyVersion": "", "operatingSystem": "linux",
            "architecture": "amd64",
        },
    }});
    if let Err(e) = nodes
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
    {
        tracing_warn(&format!("node {name} status: {e}"));
    }
}

async fn publish_slice(client: &kube::Client, name: &str, gpus: &[Gpu]) {
    let api: Api<ResourceSlice> = Api::all(client.clone());
    let devices: Vec<Value> = devices(gpus)
        .into_iter()
        .map(|(device, _, attrs)| json!({"name": device, "attributes": attrs}))
        .collect();
    let slice: ResourceSlice = serde_json::from_value(json!({
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceSlice",
        "metadata": {"name": format!("{name}-{DRIVER}")},
        "spec": {
            "driver": DRIVER,
            "nodeName": name,
            "pool": {"name": name, "generation": 1, "resourceSliceCount": 1},
            "devices": devices,
        },
    }))
    .expect("resource slice");
    match api.create(&PostParams::default(), &slice).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => panic!("publishing the ResourceSlice of {name}: {e}"),
    }
}

/// The Lease every few seconds, the Ready condition less often, until stopped.
async fn heartbeat(client: kube::Client, name: String, port: u16, stop: CancellationToken) {
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    let nodes: Api<Node> = Api::all(client);
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    let mut n = 0u32;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let lease = json!({
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": name, "namespace": "kube-node-lease"},
            "spec": {"holderIdentity": name, "leaseDurationSeconds": 40,
                     "renewTime": MicroTime(jiff_now())},
        });
        let _ = leases
            .patch(
                &name,
                &PatchParams::apply("kcloud-node-simulator").force(),
                &Patch::Apply(&lease),
            )
            .await;
        n += 1;
        if n.is_multiple_of(5) {
            node_status(&nodes, &name, port).await;
        }
    }
}

/// Runs the pods bound to `node` and reports their status; stops their processes when
/// they are deleted.
async fn run_pods(mut kubelet: Kubelet, node: String, stop: CancellationToken) {
    let api: Api<Pod> = Api::all(kubelet.client.clone());
    let config = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
    let mut events = watcher(api, config).boxed();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => kubelet.retry().await,
            ev = events.next() => match ev {
                None => return,
                Some(Ok(watcher::Event::Apply(pod) | watcher::Event::InitApply(pod))) => {
                    kubelet.pod(pod).await;
                }
                Some(Ok(_)) => {}
                // The watcher retries by itself.
                Some(Err(_)) => tokio::time::sleep(Duration::from_millis(200)).await,
            },
        }
    }
}

/// What runs the pods of one node.
struct Kubelet {
    client: kube::Client,
    uuids: Arc<BTreeMap<String, String>>,
    pods: Arc<Mutex<HashMap<String, RunningPod>>>,
    logs: Logs,
    /// Where pods' files go.
    dir: PathBuf,
    /// Pods started (or refused) once: the status they are given comes back as events.
    handled: std::collections::HashSet<String>,
    /// Pods whose start failed for now (a Secret not made yet): tried again, as a
    /// kubelet keeps a container in ContainerCreating until its volumes can be made.
    retry: Vec<(String, String)>,
}

impl Kubelet {
    async fn retry(&mut self) {
        for (ns, name) in std::mem::take(&mut self.retry) {
            let api: Api<Pod> = Api::namespaced(self.client.clone(), &ns);
            if let Ok(Some(pod)) = api.get_opt(&name).await {
                if let Some(uid) = &pod.metadata.uid {
                    self.handled.remove(uid);
                }
                self.pod(pod).await;
            }
        }
    }

    async fn pod(&mut self, pod: Pod) {
        let (Some(ns), Some(name)) = (pod.metadata.namespace.clone(), pod.metadata.name.clone())
        else {
            return;
        };
        let key = format!("{ns}/{name}");
        if pod.metadata.deletion_timestamp.is_some() {
            let running = self
                .pods
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&key);
            let grace = pod
                .metadata
                .deletion_grace_period_seconds
                .unwrap_or(30)
                .clamp(0, 60) as u64;
            let client = self.client.clone();
            tokio::spawn(async move {
                if let Some(p) = running {
                    stop_pod(&p, Duration::from_secs(grace)).await;
                }
                // The kubelet's last word: the pod is gone.
                let api: Api<Pod> = Api::namespaced(client, &ns);
                let _ = api
                    .delete(&name, &DeleteParams::default().grace_period(0))
                    .await;
            });
            return;
        }
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
        if !self.handled.insert(uid) || matches!(phase, Some("Succeeded" | "Failed")) {
            return;
        }
        match start_pod(&self.client, &pod, &self.uuids, &self.dir).await {
            Ok(Some(running)) => {
                let (pid, ip) = (running.pid, running.ip);
                self.logs
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(key.clone(), running.dir.join("container.log"));
                self.pods
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(key.clone(), running);
                tokio::spawn(supervise(
                    self.client.clone(),
                    pod,
                    (pid, ip),
                    self.pods.clone(),
                    key,
                ));
            }
            Ok(None) => {}
            Err(e) => {
                tracing_warn(&format!("pod {key}: {e}; trying again"));
                self.retry.push((ns, name));
            }
        }
    }
}

/// Starts a pod's container; `None` when it is not to be run (not a server, or an
/// image that cannot be pulled: its status says so).
async fn start_pod(
    client: &kube::Client,
    pod: &Pod,
    uuids: &BTreeMap<String, String>,
    pods_dir: &Path,
) -> Result<Option<RunningPod>, String> {
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let name = pod.metadata.name.clone().unwrap_or_default();
    let api: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let spec = pod.spec.as_ref().ok_or("pod without spec")?;
    let container = spec.containers.first().ok_or("pod without containers")?;
    let image = container.image.clone().unwrap_or_default();
    let server = pod
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get("app.kubernetes.io/component"))
        .is_some_and(|c| c == "server");
    if !server || image.starts_with(UNPULLABLE) {
        // As a kubelet: the pull fails, then it backs off.
        let container = container.clone();
        tokio::spawn(async move {
            for reason in ["ErrImagePull", "ImagePullBackOff"] {
                let status = json!({"status": {
                    "phase": "Pending",
                    "conditions": [{"type": "PodScheduled", "status": "True"}],
                    "containerStatuses": [{
                        "name": container.name, "image": image, "imageID": "", "ready": false,
                        "restartCount": 0,
                        "state": {"waiting": {"reason": reason,
                            "message": format!("failed to pull image \"{image}\": not found (kcloud node simulator)")}},
                    }],
                }});
                let _ = api
                    .patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
                    .await;
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        });
        return Ok(None);
    }

    // The environment: values, Secret references, the claim's devices.
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let mut env: Vec<(String, String)> = Vec::new();
    for e in container.env.iter().flatten() {
        let value = match (&e.value, &e.value_from) {
            (Some(v), _) => v.clone(),
            (None, Some(from)) => match &from.secret_key_ref {
                Some(r) => secret_value(&secrets, &r.name, &r.key).await?,
                None => continue,
            },
            _ => String::new(),
        };
        env.push((e.name.clone(), value));
    }
    if let Some(claims) = &spec.resource_claims
        && !claims.is_empty()
    {
        let claims_api: Api<ResourceClaim> = Api::namespaced(client.clone(), &ns);
        let mut visible = Vec::new();
        for c in claims {
            let Some(claim_name) = &c.resource_claim_name else {
                continue;
            };
            let claim = claims_api
                .get(claim_name)
                .await
                .map_err(|e| format!("claim {claim_name}: {e}"))?;
            let results = claim
                .status
                .and_then(|s| s.allocation)
                .and_then(|a| a.devices)
                .and_then(|d| d.results)
                .unwrap_or_default();
            for r in results.iter().filter(|r| r.driver == DRIVER) {
                let uuid = uuids
                    .get(&r.device)
                    .ok_or_else(|| format!("claim {claim_name}: unknown device {}", r.device))?;
                visible.push(uuid.clone());
            }
        }
        env.retain(|(k, _)| k != "NVIDIA_VISIBLE_DEVICES");
        env.push(("NVIDIA_VISIBLE_DEVICES".into(), visible.join(",")));
    }

    // Volumes: Secrets and emptyDirs, made in the pod's directory.
    // Kept after the container ends, for its log (removed with the test's files).
    let dir = pods_dir.join(format!(
        "{ns}-{name}-{}",
        pod.metadata.uid.as_deref().unwrap_or("")
    ));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let uid = spec
        .security_context
        .as_ref()
        .and_then(|s| s.run_as_user)
        .unwrap_or(0) as u32;
    let gid = spec
        .security_context
        .as_ref()
        .and_then(|s| s.run_as_group)
        .unwrap_or(0) as u32;
    let mut binds: Vec<(PathBuf, String, bool)> = Vec::new();
    for v in spec.volumes.iter().flatten() {
        let Some(mount) = container
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| m.name == v.name)
        else {
            continue;
        };
        let host = dir.as_path().join("volumes").join(&v.name);
        std::fs::create_dir_all(&host).map_err(|e| e.to_string())?;
        if let Some(s) = &v.secret {
            let secret_name = s.secret_name.clone().unwrap_or_default();
            let secret = secrets
                .get(&secret_name)
                .await
                .map_err(|e| format!("secret {secret_name}: {e}"))?;
            let data = secret.data.unwrap_or_default();
            for item in s.items.iter().flatten() {
                if let Some(bytes) = data.get(&item.key) {
                    std::fs::write(host.join(&item.path), &bytes.0).map_err(|e| e.to_string())?;
                }
            }
            chown_tree(&host, uid, gid);
        } else if v.empty_dir.is_some() {
            chown_tree(&host, uid, gid);
        } else {
            continue;
        }
        binds.push((
            host,
            mount.mount_path.clone(),
            mount.read_only.unwrap_or(false),
        ));
    }
    let home = dir.as_path().join("home");
    std::fs::create_dir_all(&home).map_err(|e| e.to_string())?;
    chown_tree(&home, uid, gid);

    // The pod's network: a namespace with a veth pair, a /30 of its own.
    let n = NEXT_POD.fetch_add(1, Ordering::Relaxed);
    let tag = std::process::id() % 100_000;
    let netns = format!("kcs-{tag}-{n}");
    let (host_ip, pod_ip) = pod_addresses(tag, n);
    setup_network(&netns, &format!("kv{tag}-{n}"), host_ip, pod_ip)?;

    let mut argv: Vec<String> = container.command.clone().unwrap_or_default();
    argv.extend(container.args.clone().unwrap_or_default());
    let program = argv.first().ok_or("container without a command")?.clone();
    let resolved = which(&program).ok_or_else(|| format!("{program} is not on PATH"))?;
    argv[0] = resolved.display().to_string();
    let limit = container
        .resources
        .as_ref()
        .and_then(|r| r.limits.as_ref())
        .and_then(|l| l.get("memory"))
        .and_then(|q| parse_bytes(&q.0));
    let memory = MemoryCgroup::new(&format!("{tag}-{n}"), limit);
    // A shell joins the memory cgroup (when there is one) and becomes the rest.
    let mut cmd = std::process::Command::new("sh");
    cmd.args([
        "-c",
        "if [ -n \"$1\" ]; then echo $$ > \"$1\" || exit 125; fi; shift; exec \"$@\"",
        "kcloud-container",
    ])
    .arg(
        memory
            .as_ref()
            .map(|m| m.dir.join("cgroup.procs"))
            .unwrap_or_default(),
    )
    .args([
        "ip",
        "netns",
        "exec",
        &netns,
        "bwrap",
        "--die-with-parent",
        "--unshare-pid",
        "--unshare-ipc",
        "--new-session",
        "--proc",
        "/proc",
        "--dev",
        "/dev",
    ])
    .args(["--perms", "01777", "--tmpfs", "/tmp"]);
    for sys in [
        "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/opt", "/sys",
    ] {
        cmd.args(["--ro-bind-try", sys, sys]);
    }
    // /etc is the host's, entry by entry, on a tmpfs: volumes may mount below it.
    cmd.args(["--perms", "0755", "--tmpfs", "/etc"]);
    if let Ok(entries) = std::fs::read_dir("/etc") {
        for e in entries.flatten() {
            let p = e.path();
            cmd.arg("--ro-bind-try").arg(&p).arg(&p);
        }
    }
    if let Some(prefix) = install_prefix(&resolved) {
        let mut at = PathBuf::from("/");
        for c in prefix
            .parent()
            .into_iter()
            .flat_map(Path::components)
            .skip(1)
        {
            at.push(c);
            cmd.args(["--perms", "0755", "--dir"]).arg(&at);
        }
        cmd.arg("--ro-bind").arg(&prefix).arg(&prefix);
    }
    cmd.args(["--perms", "0755", "--dir", "/home"]);
    cmd.arg("--bind").arg(&home).arg("/home/jovyan");
    for (host, inside, ro) in &binds {
        let parent = Path::new(inside).parent().unwrap_or(Path::new("/"));
        let mut at = PathBuf::from("/");
        for c in parent.components().skip(1) {
            at.push(c);
            cmd.args(["--perms", "0755", "--dir"]).arg(&at);
        }
        cmd.arg(if *ro { "--ro-bind" } else { "--bind" })
            .arg(host)
            .arg(inside);
    }
    let workdir = container
        .working_dir
        .clone()
        .unwrap_or("/home/jovyan".into());
    cmd.args(["--chdir", &workdir, "--", "setpriv"])
        .arg(format!("--reuid={uid}"))
        .arg(format!("--regid={gid}"))
        .args(["--clear-groups", "--"])
        .args(&argv);
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", "/home/jovyan")
        .env("HOSTNAME", &name)
        .envs(env)
        .stdin(std::process::Stdio::null())
        .stdout(log_file(dir.as_path()))
        .stderr(log_file(dir.as_path()))
        .process_group(0);
    let child = cmd
        .spawn()
        .map_err(|e| format!("starting the container: {e}"))?;
    let pid = child.id();
    // The supervisor waits for it through its pid; the Child is not needed further.
    std::mem::forget(child);

    let now = Time(jiff_now());
    let status = json!({"status": {
        "phase": "Running",
        "podIP": pod_ip.to_string(),
        "podIPs": [{"ip": pod_ip.to_string()}],
        "hostIP": "127.0.0.1",
        "startTime": now,
        "conditions": [
            {"type": "PodScheduled", "status": "True"},
            {"type": "Initialized", "status": "True"},
            {"type": "ContainersReady", "status": "False"},
            {"type": "Ready", "status": "False"},
        ],
        "containerStatuses": [{
            "name": container.name, "image": image, "imageID": format!("sim://{image}"),
            "containerID": format!("sim://{pid}"), "ready": false, "started": true,
            "restartCount": 0, "state": {"running": {"startedAt": now}},
        }],
    }});
    api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .map_err(|e| format!("pod status: {e}"))?;
    Ok(Some(RunningPod {
        pid,
        ip: pod_ip,
        netns,
        dir,
        memory,
    }))
}

/// Probes readiness and reports the container's end.
async fn supervise(
    client: kube::Client,
    pod: Pod,
    (pid, ip): (u32, Ipv4Addr),
    pods: Arc<Mutex<HashMap<String, RunningPod>>>,
    key: String,
) {
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let name = pod.metadata.name.clone().unwrap_or_default();
    let api: Api<Pod> = Api::namespaced(client, &ns);
    let spec = pod.spec.clone().unwrap_or_default();
    let container = spec.containers.first().cloned().unwrap_or_default();
    let port = container
        .ports
        .iter()
        .flatten()
        .next()
        .map_or(8888, |p| p.container_port as u16);
    let probe_path = container
        .readiness_probe
        .as_ref()
        .and_then(|p| p.http_get.as_ref())
        .and_then(|h| h.path.clone());
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .expect("client");
    let mut ready = false;
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let tracked = pods
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(&key);
        if !tracked {
            // Deleted (or the node is gone): its stop is someone else's.
            return;
        }
        if let Some(code) = exited(pid) {
            let now = Time(jiff_now());
            let oom = pods
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&key)
                .and_then(|p| p.memory.as_ref())
                .is_some_and(|m| m.oom_kills() > 0);
            let (phase, reason) = match (code, oom) {
                (0, _) => ("Succeeded", "Completed"),
                (_, true) => ("Failed", "OOMKilled"),
                _ => ("Failed", "Error"),
            };
            // What the kernel reports for a process it killed for memory.
            let code = if oom { 137 } else { code };
            let status = json!({"status": {
                "phase": phase,
                "conditions": [{"type": "Ready", "status": "False"}, {"type": "ContainersReady", "status": "False"}],
                "containerStatuses": [{
                    "name": container.name, "image": container.image, "imageID": "",
                    "ready": false, "started": false, "restartCount": 0,
                    "state": {"terminated": {"exitCode": code, "reason": reason, "finishedAt": now}},
                }],
            }});
            let _ = api
                .patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
                .await;
            if let Some(p) = pods.lock().unwrap_or_else(|p| p.into_inner()).remove(&key) {
                end_pod(&p);
            }
            return;
        }
        let answers = match &probe_path {
            Some(path) => http
                .get(format!("http://{ip}:{port}{path}"))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success()),
            None => tokio::net::TcpStream::connect((ip, port)).await.is_ok(),
        };
        if answers != ready {
            ready = answers;
            let s = if ready { "True" } else { "False" };
            let status = json!({"status": {
                "conditions": [
                    {"type": "PodScheduled", "status": "True"},
                    {"type": "Initialized", "status": "True"},
                    {"type": "ContainersReady", "status": s},
                    {"type": "Ready", "status": s},
                ],
                "containerStatuses": [{
                    "name": container.name, "image": container.image, "imageID": "",
                    "ready": ready, "started": true, "restartCount": 0,
                    "state": {"running": {}},
                }],
            }});
            let _ = api
                .patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
                .await;
        }
    }
}

/// The exit code of `pid`, if it has ended (reaped here: it is our child).
fn exited(pid: u32) -> Option<i32> {
    let p = rustix::process::Pid::from_raw(pid as i32)?;
    match rustix::process::waitpid(Some(p), rustix::process::WaitOptions::NOHANG) {
        Ok(Some((_, status))) => Some(
            status
                .exit_status()
                .unwrap_or_else(|| 128 + status.terminating_signal().unwrap_or(0)),
        ),
        Ok(None) => None,
        // Already reaped or not ours: gone.
        Err(_) => Some(137),
    }
}

async fn stop_pod(p: &RunningPod, grace: Duration) {
    if let Some(pg) = rustix::process::Pid::from_raw(p.pid as i32) {
        let _ = rustix::process::kill_process_group(pg, rustix::process::Signal::TERM);
        let deadline = tokio::time::Instant::now() + grace;
        while exited(p.pid).is_none() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    end_pod(p);
}

/// Kills what is left of the pod and removes its network.
fn end_pod(p: &RunningPod) {
    if let Some(pg) = rustix::process::Pid::from_raw(p.pid as i32) {
        let _ = rustix::process::kill_process_group(pg, rustix::process::Signal::KILL);
    }
    let _ = exited(p.pid);
    let _ = std::process::Command::new("ip")
        .args(["netns", "delete", &p.netns])
        .status();
    if let Some(m) = &p.memory {
        m.remove();
    }
}

/// A container's memory cgroup with its limit: in the v1 memory hierarchy where the
/// host keeps one (as these test machines do), else in cgroup v2 when it has the
/// memory controller.
struct MemoryCgroup {
    dir: PathBuf,
    v2: bool,
}

impl MemoryCgroup {
    fn new(name: &str, limit: Option<u64>) -> Option<MemoryCgroup> {
        let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
        let v1 = own.lines().find_map(|l| {
            let mut f = l.splitn(3, ':');
            let (_, ctrl, path) = (f.next()?, f.next()?, f.next()?);
            ctrl.split(',')
                .any(|c| c == "memory")
                .then(|| path.to_owned())
        });
        let (base, v2) = match v1 {
            Some(path) => (
                PathBuf::from("/sys/fs/cgroup/memory").join(path.trim_start_matches('/')),
                false,
            ),
            None => {
                let path = own.lines().find_map(|l| l.strip_prefix("0::"))?;
                let root = PathBuf::from("/sys/fs/cgroup");
                let controllers = std::fs::read_to_string(root.join("cgroup.controllers")).ok()?;
                if !controllers.split_whitespace().any(|c| c == "memory") {
                    return None;
                }
                (root.join(path.trim_start_matches('/')), true)
            }
        };
        let dir = base.join("kcloud-sim").join(name);
        std::fs::create_dir_all(&dir).ok()?;
        if let Some(bytes) = limit {
            let file = if v2 {
                "memory.max"
            } else {
                "memory.limit_in_bytes"
            };
            std::fs::write(dir.join(file), bytes.to_string()).ok()?;
            if !v2 {
                let _ = std::fs::write(dir.join("memory.memsw.limit_in_bytes"), bytes.to_string());
            }
        }
        Some(MemoryCgroup { dir, v2 })
    }

    fn oom_kills(&self) -> u64 {
        let file = if self.v2 {
            "memory.events"
        } else {
            "memory.oom_control"
        };
        std::fs::read_to_string(self.dir.join(file))
            .ok()
            .and_then(|t| {
                t.lines()
                    .find_map(|l| l.strip_prefix("oom_kill "))
                    .and_then(|v| v.trim().parse().ok())
            })
            .unwrap_or(0)
    }

    fn remove(&self) {
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// A Kubernetes quantity of bytes (`8589934592`, `512Mi`, `2Gi`).
fn parse_bytes(q: &str) -> Option<u64> {
    let units = [
        ("Ki", 1u64 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("Ti", 1 << 40),
    ];
    for (suffix, mult) in units {
        if let Some(n) = q.strip_suffix(suffix) {
            return n.parse::<u64>().ok().map(|n| n * mult);
        }
    }
    q.parse().ok()
}

/// `(host side, pod side)` of pod `n`'s /30, in a /16 of this process (`tag`).
fn pod_addresses(tag: u32, n: u32) -> (Ipv4Addr, Ipv4Addr) {
    let second = 200 + (tag % 50) as u8;
    let base = (n % 16_384) * 4;
    let (third, fourth) = ((base / 256) as u8, (base % 256) as u8);
    (
        Ipv4Addr::new(10, second, third, fourth + 1),
        Ipv4Addr::new(10, second, third, fourth + 2),
    )
}

fn setup_network(netns: &str, veth: &str, host: Ipv4Addr, pod: Ipv4Addr) -> Result<(), String> {
    let ip = |args: &[&str]| -> Result<(), String> {
        let out = std::process::Command::new("ip")
            .args(args)
            .output()
            .map_err(|e| format!("ip: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "ip {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    };
    let peer = format!("{veth}p");
    ip(&["netns", "add", netns])?;
    ip(&[
        "link", "add", veth, "type", "veth", "peer", "name", &peer, "netns", netns,
    ])?;
    ip(&["addr", "add", &format!("{host}/30"), "dev", veth])?;
    ip(&["link", "set", veth, "up"])?;
    ip(&["-n", netns, "link", "set", "lo", "up"])?;
    ip(&["-n", netns, "link", "set", &peer, "name", "eth0"])?;
    ip(&[
        "-n",
        netns,
        "addr",
        "add",
        &format!("{pod}/30"),
        "dev",
        "eth0",
    ])?;
    ip(&["-n", netns, "link", "set", "eth0", "up"])?;
    ip(&[
        "-n",
        netns,
        "route",
        "add",
        "default",
        "via",
        &host.to_string(),
    ])?;
    Ok(())
}

async fn secret_value(secrets: &Api<Secret>, name: &str, key: &str) -> Result<String, String> {
    let s = secrets.get(name).await.map_err(|e| match e {
        kube::Error::Api(s) if s.code == 404 => format!("secret {name} does not exist (yet)"),
        e => format!("secret {name}: {e}"),
    })?;
    let bytes = s
        .data
        .and_then(|d| d.get(key).cloned())
        .ok_or_else(|| format!("secret {name} has no {key}"))?;
    Ok(String::from_utf8_lossy(&bytes.0).into_owned())
}

fn chown_tree(dir: &Path, uid: u32, gid: u32) {
    let _ = std::os::unix::fs::lchown(dir, Some(uid), Some(gid));
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            chown_tree(&e.path(), uid, gid);
        }
    }
}

fn which(program: &str) -> Option<PathBuf> {
    if program.contains('/') {
        return Some(PathBuf::from(program));
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// Where a program outside the system paths is installed (the folder above its bin/),
/// to show it in the "image".
fn install_prefix(program: &Path) -> Option<PathBuf> {
    let system = ["/usr", "/bin", "/sbin", "/lib", "/opt"];
    if system.iter().any(|s| program.starts_with(s)) {
        return None;
    }
    let dir = program.parent()?;
    let prefix = match dir.file_name() {
        Some(n) if n == "bin" || n == "shims" => dir.parent().unwrap_or(dir),
        _ => dir,
    };
    Some(prefix.to_owned())
}

fn log_file(dir: &Path) -> std::fs::File {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("container.log"))
        .expect("container log")
}

/// Now, as Kubernetes timestamps it.
fn jiff_now() -> k8s_openapi::jiff::Timestamp {
    k8s_openapi::jiff::Timestamp::now()
}

fn tracing_warn(msg: &str) {
    eprintln!("node simulator: {msg}");
}

/// The kubelet's HTTPS endpoint, as far as the API server uses it here: container
/// logs (`GET /containerLogs/{namespace}/{pod}/{container}?tailLines=N`). Returns the
/// port.
async fn serve_kubelet(tls: &(PathBuf, PathBuf), logs: Logs, stop: CancellationToken) -> u16 {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&tls.0)
        .expect("kubelet certificate")
        .collect::<Result<_, _>>()
        .expect("kubelet certificate");
    let key = PrivateKeyDer::from_pem_file(&tls.1).expect("kubelet key");
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("TLS versions")
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .expect("kubelet TLS");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("kubelet port");
    let port = listener.local_addr().expect("kubelet address").port();
    tokio::spawn(async move {
        loop {
            let conn = tokio::select! {
                _ = stop.cancelled() => return,
                c = listener.accept() => c,
            };
            let Ok((tcp, _)) = conn else { continue };
            let (acceptor, logs) = (acceptor.clone(), logs.clone());
            tokio::spawn(async move {
                use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 64 << 10 {
                    match tls.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&head);
                let target = head.split_whitespace().nth(1).unwrap_or("/");
                let (path, query) = target.split_once('?').unwrap_or((target, ""));
                let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
                let body = match parts.as_slice() {
                    ["containerLogs", ns, pod, _container] => {
                        let file = logs
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .get(&format!("{ns}/{pod}"))
                            .cloned();
                        file.and_then(|f| std::fs::read_to_string(f).ok())
                            .map(|text| {
                                let tail = query
                                    .split('&')
                                    .find_map(|kv| kv.strip_prefix("tailLines="))
                                    .and_then(|n| n.parse::<usize>().ok());
                                match tail {
                                    Some(n) => {
                                        let lines: Vec<&str> = text.lines().collect();
                                        let from = lines.len().saturating_sub(n);
                                        lines[from..].join("\n") + "\n"
                                    }
                                    None => text,
                                }
                            })
                    }
                    _ => None,
                };
                let resp = match body {
                    Some(b) => format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{b}",
                        b.len()
                    ),
                    None => {
                        "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                            .to_owned()
                    }
                };
                let _ = tls.write_all(resp.as_bytes()).await;
                let _ = tls.shutdown().await;
            });
        }
    });
    port
}
