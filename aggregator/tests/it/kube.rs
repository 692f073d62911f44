//! The kubernetes provisioner: its objects validated strictly against Kubernetes' own
//! JSON schemas (kubernetes-validate), and its calls to a fake API server
//! (`tower_test`), which answers each expected request in turn and fails the test on
//! any other.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use http::{Method, Response, StatusCode};
use k8s_openapi::api::core::v1::Pod;
use kcloud_cluster::Cluster;
use kcloud_core::Error;
use kcloud_core::device::Holder;
use kcloud_core::launch::Launch;
use kcloud_core::server::{ServerSpec, ServerStatus};
use kcloud_core::settings::{KubernetesSettings, PinningMode};
use kcloud_provision::Provisioner;
use kcloud_provision::kube::{
    KubeOptions, KubeProvisioner, Mounts, Profile, claim_name, device_claim, observe, pod_name,
    pod_owner, secret_name, server_pod, token_secret,
};
use kcloud_service::servers::ReleaseOnExit;
use kcloud_testkit::fake_kube::{FakeKube, api_status, created, fail, list, respond, scenario};
use kcloud_testkit::tools::require_tool;
use kube::client::Body;
use serde_json::{Value, json};

use crate::app::ADMIN_PW;

const GPU: &str = "GPU-5f1c0d3e-8a4b-4c1e-9d2f-000000000001";
const MIG: &str = "MIG-7a2b0c1d-1111-4c1e-9d2f-000000000002";
const NS: &str = "kcloud-servers";

fn spec(devices: &[&str]) -> ServerSpec {
    ServerSpec {
        owner: "alice".into(),
        name: "lab".into(),
        node: (!devices.is_empty()).then(|| "gpu-node-1".into()),
        devices: devices.iter().map(|d| (*d).to_owned()).collect(),
        addresses: Vec::new(),
        cpu_millis: 2_000,
        memory_bytes: 8 << 30,
        image: Some("quay.io/jupyter/pytorch-notebook:cuda12-latest".into()),
        launch: Launch {
            command: None,
            args: vec!["--LabApp.news_url=".into()],
            env: BTreeMap::from([("WANDB_MODE".to_owned(), "offline".to_owned())]),
            profile: None,
        },
        mounts: vec![],
    }
}

fn settings(mode: PinningMode) -> KubernetesSettings {
    let mut k = KubernetesSettings::default();
    k.pinning.mode = mode;
    k.pinning.runtime_class_name = Some("nvidia".into());
    k
}

fn profile(s: &ServerSpec) -> Profile {
    Profile::for_launch(&s.owner, &s.name, &s.launch)
}

fn to_json<T: serde::Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap()
}

// ---------------------------------------------------------------------------------
// Objects against the schemas

/// Every object kinds of server the provisioner makes, for one pinning mode.
fn objects(mode: PinningMode) -> Vec<(String, Value)> {
    let k = settings(mode);
    let mut out = Vec::new();
    let custom = ServerSpec {
        name: "web".into(),
        launch: Launch {
            command: Some(vec![
                "python3".into(),
                "-m".into(),
                "http.server".into(),
                "{port}".into(),
            ]),
            ..Launch::default()
        },
        ..spec(&[MIG])
    };
    for (label, s) in [
        ("no-devices", spec(&[])),
        ("gpu-and-mig", spec(&[GPU, MIG])),
        ("custom", custom),
    ] {
        let p = profile(&s);
        let pod = server_pod(&s, &k, NS, &p, Mounts::default(), 1_700_000_000_000);
        let owner = pod_owner(
            &pod_name(&s.owner, &s.name),
            "6d9f8a3e-0000-4000-8000-000000000001",
        );
        let label = format!("{mode:?}-{label}");
        out.push((format!("{label}-pod"), to_json(&pod)));
        out.push((
            format!("{label}-secret"),
            to_json(&token_secret(&s, NS, &p, &owner, "t0ken")),
        ));
        if let Some(claim) = device_claim(&s, &k, NS, &p, &owner).unwrap() {
            out.push((format!("{label}-claim"), to_json(&claim)));
        }
    }
    out
}

/// Runs `kubernetes-validate --strict` for `version` on the objects; returns whether
/// all passed, and the output.
fn validate(dir: &Path, version: &str, objects: &[(String, Value)]) -> (bool, String) {
    let tool = require_tool("kubernetes-validate");
    let files: Vec<_> = objects
        .iter()
        .map(|(name, obj)| {
            let path = dir.join(format!("{version}-{name}.json"));
            std::fs::write(&path, serde_json::to_vec_pretty(obj).unwrap()).unwrap();
            path
        })
        .collect();
    let out = Command::new(tool)
        .args(["--strict", "--kubernetes-version", version])
        .args(&files)
        .output()
        .expect("run kubernetes-validate");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn newest_kubernetes() -> String {
    let out = Command::new("python3")
        .args([
            "-c",
            "import kubernetes_validate.utils as u; print(u.latest_version())",
        ])
        .output()
        .expect("python3 with kubernetes-validate");
    let v = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert!(
        v.starts_with("1."),
        "kubernetes-validate's newest version: {v:?}"
    );
    v
}

#[test]
fn objects_are_valid_for_the_oldest_and_newest_kubernetes() {
    let dir = tempfile::tempdir().unwrap();
    let newest = newest_kubernetes();
    let env = objects(PinningMode::Env);
    let dra = objects(PinningMode::Dra);
    assert_eq!(env.len(), 6, "pods and Secrets, no claims in env mode");
    assert_eq!(dra.len(), 8, "claims for the two servers with devices");
    // resource.k8s.io/v1 is Kubernetes 1.34 and later: dra mode needs it (DESIGN.md).
    let all: Vec<_> = env.iter().chain(&dra).cloned().collect();
    let mut seen = 0;
    for (version, objs) in [("1.33.0", &env), ("1.34.0", &dra), (newest.as_str(), &all)] {
        let (ok, out) = validate(dir.path(), version, objs);
        assert!(ok, "Kubernetes {version}:\n{out}");
        // An unknown kind is only a warning to the tool: it must not happen here.
        assert!(!out.contains("WARN"), "Kubernetes {version}:\n{out}");
        assert_eq!(
            out.matches(" passed for resource ").count(),
            objs.len(),
            "{out}"
        );
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            seen + objs.len(),
            "one file per object"
        );
        seen += objs.len();
    }

    // The validator does reject: an unknown field (strict) and a wrong type.
    let mut bad = env[0].1.clone();
    bad["spec"]["containers"][0]["securityContext"]["runAsRoot"] = json!(false);
    let (ok, out) = validate(dir.path(), "1.33.0", &[("bad".into(), bad)]);
    assert!(!ok, "an unknown field must fail strict validation:\n{out}");
    let mut bad = dra[2].1.clone();
    bad["spec"]["containers"][0]["resources"]["claims"] = json!("devices");
    let (ok, out) = validate(dir.path(), &newest, &[("bad".into(), bad)]);
    assert!(!ok, "a wrong type must fail:\n{out}");
}

// ---------------------------------------------------------------------------------
// What the objects say

fn env_var<'a>(pod: &'a Value, name: &str) -> Option<&'a Value> {
    pod["spec"]["containers"][0]["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == name)
}

#[test]
fn env_pinning_pod() {
    let s = spec(&[GPU, MIG]);
    let k = settings(PinningMode::Env);
    let pod = to_json(&server_pod(&s, &k, NS, &profile(&s), Mounts::default(), 7));
    let name = pod_name("alice", "lab");
    assert_eq!(pod["metadata"]["name"], name.as_str());
    assert_eq!(pod["metadata"]["namespace"], NS);
    let labels = &pod["metadata"]["labels"];
    assert_eq!(labels["kcloud.io/owner"], "alice");
    assert_eq!(labels["kcloud.io/server"], "lab");
    assert_eq!(labels["app.kubernetes.io/component"], "server");
    assert_eq!(labels["app.kubernetes.io/part-of"], "kcloud");
    assert_eq!(labels["app.kubernetes.io/managed-by"], "kcloud-aggregator");
    assert_eq!(labels["app.kubernetes.io/name"], "jupyterlab");
    assert_eq!(
        pod["metadata"]["annotations"]["kcloud.io/devices"],
        format!("{GPU},{MIG}")
    );
    assert_eq!(
        pod["metadata"]["annotations"]["kcloud.io/node"],
        "gpu-node-1"
    );

    let ps = &pod["spec"];
    assert_eq!(ps["nodeSelector"]["kubernetes.io/hostname"], "gpu-node-1");
    assert_eq!(ps["runtimeClassName"], "nvidia");
    assert_eq!(
        ps["tolerations"],
        json!([{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}])
    );
    assert_eq!(ps["restartPolicy"], "Never");
    assert_eq!(ps["automountServiceAccountToken"], false);
    assert!(ps.get("resourceClaims").is_none());
    assert_eq!(ps["securityContext"]["runAsNonRoot"], true);
    assert_eq!(ps["securityContext"]["runAsUser"], 1000);
    assert_eq!(
        ps["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );

    let c = &ps["containers"][0];
    assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(c["securityContext"]["capabilities"]["drop"], json!(["ALL"]));
    assert_eq!(
        c["resources"]["requests"],
        json!({"cpu": "2000m", "memory": "8589934592"})
    );
    assert_eq!(c["resources"]["limits"], c["resources"]["requests"]);
    assert_eq!(
        env_var(&pod, "NVIDIA_VISIBLE_DEVICES").unwrap()["value"],
        format!("{GPU},{MIG}")
    );
    assert_eq!(
        env_var(&pod, "NVIDIA_DRIVER_CAPABILITIES").unwrap()["value"],
        "compute,utility"
    );
    assert_eq!(env_var(&pod, "WANDB_MODE").unwrap()["value"], "offline");
    assert_eq!(
        env_var(&pod, "JUPYTER_TOKEN").unwrap()["valueFrom"]["secretKeyRef"],
        json!({"name": secret_name(&name), "key": "token", "optional": false})
    );
    // The token itself is never in the pod spec.
    assert!(!pod.to_string().contains("t0ken"));

    let args: Vec<&str> = c["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(c["command"], json!(["jupyter"]));
    assert!(
        args.contains(&"--ServerApp.base_url=/user/alice/lab/"),
        "{args:?}"
    );
    assert!(args.contains(&"--ServerApp.port=8888"));
    assert_eq!(args.last(), Some(&"--LabApp.news_url="), "user args last");
    assert_eq!(
        c["readinessProbe"]["httpGet"]["path"],
        "/user/alice/lab/api"
    );
    assert_eq!(c["readinessProbe"]["httpGet"]["port"], "http");
    assert_eq!(c["ports"][0]["containerPort"], 8888);

    let shm = ps["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "dshm")
        .unwrap();
    assert_eq!(shm["emptyDir"]["medium"], "Memory");
    assert!(
        c["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["name"] == "dshm" && m["mountPath"] == "/dev/shm")
    );
}

#[test]
fn pods_without_devices_see_no_gpu_and_are_not_pinned() {
    let s = spec(&[]);
    for mode in [PinningMode::Env, PinningMode::Dra] {
        let pod = to_json(&server_pod(
            &s,
            &settings(mode),
            NS,
            &profile(&s),
            Mounts::default(),
            7,
        ));
        assert_eq!(
            env_var(&pod, "NVIDIA_VISIBLE_DEVICES").unwrap()["value"],
            "void"
        );
        for absent in [
            "nodeSelector",
            "runtimeClassName",
            "tolerations",
            "resourceClaims",
        ] {
            assert!(pod["spec"].get(absent).is_none(), "{absent} in {mode:?}");
        }
    }
}

#[test]
fn dra_pinning_claim_and_pod() {
    let s = spec(&[GPU, MIG]);
    let k = settings(PinningMode::Dra);
    let p = profile(&s);
    let pod = to_json(&server_pod(&s, &k, NS, &p, Mounts::default(), 7));
    let name = pod_name("alice", "lab");
    assert!(
        pod["spec"].get("nodeSelector").is_none(),
        "the scheduler places it"
    );
    assert!(
        env_var(&pod, "NVIDIA_VISIBLE_DEVICES").is_none(),
        "the DRA driver injects"
    );
    assert_eq!(
        pod["spec"]["resourceClaims"],
        json!([{"name": "devices", "resourceClaimName": claim_name(&name)}])
    );
    assert_eq!(
        pod["spec"]["containers"][0]["resources"]["claims"],
        json!([{"name": "devices"}])
    );

    let owner = pod_owner(&name, "uid-1");
    let claim = to_json(&device_claim(&s, &k, NS, &p, &owner).unwrap().unwrap());
    assert_eq!(claim["apiVersion"], "resource.k8s.io/v1");
    assert_eq!(claim["metadata"]["name"], claim_name(&name).as_str());
    assert_eq!(
        claim["metadata"]["ownerReferences"],
        json!([{"apiVersion": "v1", "kind": "Pod", "name": name, "uid": "uid-1"}])
    );
    let requests = claim["spec"]["devices"]["requests"].as_array().unwrap();
    assert_eq!(requests.len(), 2);
    assert_eq!(requests[0]["exactly"]["deviceClassName"], "gpu.nvidia.com");
    assert_eq!(requests[1]["exactly"]["deviceClassName"], "mig.nvidia.com");
    assert_eq!(requests[0]["exactly"]["count"], 1);
    assert_eq!(
        requests[1]["exactly"]["selectors"][0]["cel"]["expression"],
        format!("device.attributes[\"gpu.nvidia.com\"].uuid == \"{MIG}\"")
    );

    // A device ID that would break out of the CEL string is refused.
    let evil = ServerSpec {
        devices: vec!["GPU-1\" || true || \"".into()],
        ..s
    };
    assert!(matches!(
        device_claim(&evil, &k, NS, &p, &owner),
        Err(Error::BadRequest(_))
    ));
    // env mode makes no claim.
    let s = spec(&[GPU]);
    assert!(
        device_claim(&s, &settings(PinningMode::Env), NS, &p, &owner)
            .unwrap()
            .is_none()
    );
}

#[test]
fn secret_holds_the_token_and_goes_with_the_pod() {
    let s = spec(&[GPU]);
    let name = pod_name("alice", "lab");
    let secret = to_json(&token_secret(
        &s,
        NS,
        &profile(&s),
        &pod_owner(&name, "uid-9"),
        "t0ken",
    ));
    assert_eq!(secret["metadata"]["name"], secret_name(&name).as_str());
    assert_eq!(secret["metadata"]["ownerReferences"][0]["uid"], "uid-9");
    assert_eq!(secret["metadata"]["labels"]["kcloud.io/owner"], "alice");
    assert_eq!(secret["immutable"], true);
    // base64("t0ken")
    assert_eq!(secret["data"]["token"], "dDBrZW4=");
    assert!(secret["data"]["jupyter_server_config.py"].is_string());
}

#[test]
fn custom_commands_get_port_base_url_and_a_tcp_probe() {
    let launch = Launch {
        command: Some(vec![
            "code-server".into(),
            "--bind-addr=0.0.0.0:{port}".into(),
        ]),
        args: vec!["--base={base_url}".into()],
        env: BTreeMap::new(),
        profile: None,
    };
    let p = Profile::for_launch("bob", "ide", &launch);
    assert_eq!(p.command, ["code-server", "--bind-addr=0.0.0.0:8888"]);
    assert_eq!(p.args, ["--base=/user/bob/ide/"]);
    let s = ServerSpec {
        launch,
        ..spec(&[])
    };
    let pod = to_json(&server_pod(
        &s,
        &settings(PinningMode::Env),
        NS,
        &p,
        Mounts::default(),
        1,
    ));
    let c = &pod["spec"]["containers"][0];
    assert_eq!(c["readinessProbe"]["tcpSocket"]["port"], "http");
    assert!(env_var(&pod, "JUPYTER_CONFIG_PATH").is_none());
}

#[test]
fn the_code_server_profile_gets_its_port_probe_and_all_addresses() {
    let profiles = kcloud_core::launch::builtin();
    let cs = &profiles["code-server"];
    let launch = Launch {
        command: cs.command.clone(),
        profile: Some(kcloud_core::launch::RunProfile::from_profile(
            "code-server",
            cs,
        )),
        ..Launch::default()
    };
    let p = Profile::for_launch("bob", "ide", &launch);
    assert_eq!(p.app, "code-server");
    assert_eq!(p.port, 8080);
    assert!(
        p.command.iter().any(|a| a == "0.0.0.0:8080"),
        "{:?}",
        p.command
    );
    let s = ServerSpec {
        launch,
        ..spec(&[])
    };
    let pod = to_json(&server_pod(
        &s,
        &settings(PinningMode::Env),
        NS,
        &p,
        Mounts::default(),
        1,
    ));
    let c = &pod["spec"]["containers"][0];
    // Served at `/` (the proxy strips the prefix), so probed there.
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["ports"][0]["containerPort"], 8080);
}

// ---------------------------------------------------------------------------------
// Status from pods

fn pod_with_status(status: Value) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": "p"},
        "status": status,
    }))
    .unwrap()
}

#[test]
fn status_and_reasons_from_pods() {
    let waiting = |reason: &str, message: &str| {
        pod_with_status(json!({"phase": "Pending", "containerStatuses": [{
            "name": "server", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
            "state": {"waiting": {"reason": reason, "message": message}}}]}))
    };
    let o = observe(&waiting(
        "ImagePullBackOff",
        "Back-off pulling image \"nope\"",
    ));
    assert_eq!(o.status, ServerStatus::Failed);
    assert_eq!(
        o.reason.as_deref(),
        Some("ImagePullBackOff: Back-off pulling image \"nope\"")
    );
    assert!(o.stop, "the kubelet would keep trying: stop it");
    let o = observe(&waiting("CrashLoopBackOff", ""));
    assert_eq!(
        (o.status, o.reason.as_deref(), o.stop),
        (ServerStatus::Failed, Some("CrashLoopBackOff"), true)
    );
    let o = observe(&waiting("ContainerCreating", ""));
    assert_eq!(
        (o.status, o.reason.as_deref()),
        (ServerStatus::Pending, Some("ContainerCreating"))
    );

    let oom = pod_with_status(json!({"phase": "Failed", "containerStatuses": [{
        "name": "server", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
        "state": {"terminated": {"reason": "OOMKilled", "exitCode": 137}}}]}));
    let o = observe(&oom);
    assert_eq!(o.status, ServerStatus::Failed);
    assert_eq!(o.reason.as_deref(), Some("OOMKilled (exit code 137)"));
    assert!(!o.stop, "already ended");

    let evicted = pod_with_status(json!({"phase": "Failed", "reason": "Evicted",
        "message": "The node was low on resource: memory."}));
    assert_eq!(
        observe(&evicted).reason.as_deref(),
        Some("Evicted: The node was low on resource: memory.")
    );

    let unschedulable = pod_with_status(json!({"phase": "Pending", "conditions": [{
        "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
        "message": "0/3 nodes are available: 1 Insufficient cpu."}]}));
    let o = observe(&unschedulable);
    assert_eq!(o.status, ServerStatus::Failed);
    assert_eq!(
        o.reason.as_deref(),
        Some("Unschedulable: 0/3 nodes are available: 1 Insufficient cpu.")
    );
    assert!(o.stop);

    let running = pod_with_status(json!({"phase": "Running", "podIP": "10.1.2.3",
        "conditions": [{"type": "Ready", "status": "True"}]}));
    let o = observe(&running);
    assert_eq!(o.status, ServerStatus::Running);
    assert_eq!(o.ip, Some("10.1.2.3".parse().unwrap()));
    let starting = pod_with_status(json!({"phase": "Running", "podIP": "10.1.2.3",
        "conditions": [{"type": "Ready", "status": "False"}]}));
    assert_eq!(observe(&starting).status, ServerStatus::Pending);

    let mut deleting = running.clone();
    deleting.metadata.deletion_timestamp =
        Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            "2026-01-01T00:00:00Z".parse().unwrap(),
        ));
    assert_eq!(observe(&deleting).status, ServerStatus::Stopping);

    // The pod garbage collector removes the pods of a node that is gone: the server
    // ended with its machine (also while the deletion is under way).
    let mut gone = pod_with_status(json!({"phase": "Running", "podIP": "10.1.2.3",
        "conditions": [{"type": "DisruptionTarget", "status": "True", "reason": "DeletionByPodGC",
            "message": "PodGC: node no longer exists"}]}));
    gone.metadata.deletion_timestamp = deleting.metadata.deletion_timestamp.clone();
    let o = observe(&gone);
    assert_eq!(o.status, ServerStatus::Failed);
    assert!(o.reason.unwrap().starts_with("NodeLost"));
}

// ---------------------------------------------------------------------------------
// Against a fake API server

/// The provisioner against the fake API server; servers that end by themselves give
/// their devices back in `cluster`'s ledger, as in the aggregator.
fn provisioner(mode: PinningMode, cluster: Arc<Cluster>) -> (KubeProvisioner, FakeKube) {
    let (client, fake) = FakeKube::new();
    let p = KubeProvisioner::new(
        client,
        ReleaseOnExit::new(cluster),
        KubeOptions {
            namespace: NS.into(),
            settings: settings(mode),
            timeout: Duration::from_secs(10),
            stop_grace: Duration::from_secs(5),
        },
    );
    (p, fake)
}

/// A cluster view whose ledger is ready and holds nothing.
fn empty_cluster() -> Arc<Cluster> {
    let c = Arc::new(Cluster::new(Duration::from_secs(30)));
    c.ledger().rebuild(std::iter::empty());
    c
}

const PODS: &str = "/api/v1/namespaces/kcloud-servers/pods";
const SECRETS: &str = "/api/v1/namespaces/kcloud-servers/secrets";
const CLAIMS: &str = "/apis/resource.k8s.io/v1/namespaces/kcloud-servers/resourceclaims";

fn at(base: &str, name: &str) -> String {
    format!("{base}/{name}")
}

fn pod_json(name: &str, uid: &str, phase: Value) -> Value {
    let s = spec(&[GPU]);
    let mut pod = to_json(&server_pod(
        &s,
        &settings(PinningMode::Env),
        NS,
        &profile(&s),
        Mounts::default(),
        5,
    ));
    pod["metadata"]["name"] = json!(name);
    pod["metadata"]["uid"] = json!(uid);
    pod["status"] = phase;
    pod
}

fn running() -> Value {
    json!({"phase": "Running", "podIP": "10.0.0.7", "conditions": [{"type": "Ready", "status": "True"}]})
}

fn secret_json(pod: &str, token: &str) -> Value {
    let s = spec(&[GPU]);
    to_json(&token_secret(
        &s,
        NS,
        &profile(&s),
        &pod_owner(pod, "uid-1"),
        token,
    ))
}

#[tokio::test]
async fn create_then_delete_in_dra_mode() {
    let (p, mut fake) = provisioner(PinningMode::Dra, empty_cluster());
    let pod = pod_name("alice", "lab");
    let fake_side = {
        let pod = pod.clone();
        async move {
            let (body, _, reply) = fake.expect(Method::POST, PODS).await;
            assert_eq!(body["metadata"]["name"], pod.as_str());
            assert_eq!(body["metadata"]["labels"]["kcloud.io/owner"], "alice");
            created(reply, body, "uid-1");
            let (body, _, reply) = fake.expect(Method::POST, SECRETS).await;
            assert_eq!(body["metadata"]["ownerReferences"][0]["uid"], "uid-1");
            assert!(body["data"]["token"].is_string());
            created(reply, body, "uid-2");
            let (body, _, reply) = fake.expect(Method::POST, CLAIMS).await;
            assert_eq!(body["metadata"]["ownerReferences"][0]["uid"], "uid-1");
            let cel = &body["spec"]["devices"]["requests"][0]["exactly"]["selectors"][0]["cel"];
            assert!(cel["expression"].as_str().unwrap().contains(GPU));
            created(reply, body, "uid-3");

            let (body, _, reply) = fake.expect(Method::DELETE, &at(PODS, &pod)).await;
            assert_eq!(body["gracePeriodSeconds"], 5);
            assert_eq!(body["propagationPolicy"], "Background");
            respond(
                reply,
                StatusCode::OK,
                pod_json(&pod, "uid-1", json!({"phase": "Running"})),
            );
            // Still terminating at the first look, gone at the second.
            let (_, _, reply) = fake.expect(Method::GET, &at(PODS, &pod)).await;
            respond(
                reply,
                StatusCode::OK,
                pod_json(&pod, "uid-1", json!({"phase": "Running"})),
            );
            let (_, _, reply) = fake.expect(Method::GET, &at(PODS, &pod)).await;
            fail(reply, 404, "NotFound");
            let (_, _, reply) = fake
                .expect(Method::DELETE, &at(SECRETS, &secret_name(&pod)))
                .await;
            respond(reply, StatusCode::OK, api_status(200, "Success"));
            let (_, _, reply) = fake
                .expect(Method::DELETE, &at(CLAIMS, &claim_name(&pod)))
                .await;
            fail(reply, 404, "NotFound");
            fake.no_more_calls().await;
        }
    };
    scenario(
        async move {
            let server = p.create(spec(&[GPU])).await.unwrap();
            assert_eq!(server.status, ServerStatus::Pending);
            assert_eq!(server.id, "uid-1");
            assert_eq!(server.devices, [GPU]);
            assert_eq!(p.get("alice", "lab").unwrap().id, "uid-1");
            let gone = p.delete("alice", "lab").await.unwrap().unwrap();
            assert_eq!(gone.name, "lab");
            assert!(p.get("alice", "lab").is_none());
            assert!(
                p.delete("alice", "lab").await.unwrap().is_none(),
                "no calls for an unknown server"
            );
        },
        fake_side,
    )
    .await;
}

#[tokio::test]
async fn secret_failure_rolls_back_the_pod() {
    let (p, mut fake) = provisioner(PinningMode::Env, empty_cluster());
    let pod = pod_name("alice", "lab");
    let fake_side = async move {
        let (body, _, reply) = fake.expect(Method::POST, PODS).await;
        created(reply, body, "uid-1");
        let (_, _, reply) = fake.expect(Method::POST, SECRETS).await;
        fail(reply, 500, "InternalError");
        let (body, _, reply) = fake.expect(Method::DELETE, &at(PODS, &pod)).await;
        assert_eq!(body["gracePeriodSeconds"], 0);
        respond(reply, StatusCode::OK, pod_json(&pod, "uid-1", json!({})));
        let (_, _, reply) = fake
            .expect(Method::DELETE, &at(SECRETS, &secret_name(&pod)))
            .await;
        fail(reply, 404, "NotFound");
        fake.no_more_calls().await;
    };
    scenario(
        async move {
            let e = p.create(spec(&[GPU])).await.unwrap_err();
            assert!(matches!(e, Error::Unavailable(_)), "{e:?}");
            assert!(p.get("alice", "lab").is_none(), "nothing left behind");
            assert!(p.list(None).is_empty());
        },
        fake_side,
    )
    .await;
}

#[tokio::test]
async fn forbidden_claim_rolls_back_pod_and_secret() {
    let (p, mut fake) = provisioner(PinningMode::Dra, empty_cluster());
    let pod = pod_name("alice", "lab");
    let fake_side = async move {
        let (body, _, reply) = fake.expect(Method::POST, PODS).await;
        created(reply, body, "uid-1");
        let (body, _, reply) = fake.expect(Method::POST, SECRETS).await;
        created(reply, body, "uid-2");
        let (_, _, reply) = fake.expect(Method::POST, CLAIMS).await;
        // What RBAC answers (admission refusals read differently).
        respond(
            reply,
            StatusCode::FORBIDDEN,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 403,
                   "reason": "Forbidden",
                   "message": "resourceclaims.resource.k8s.io is forbidden: User \"system:serviceaccount:kcloud:kcloud-aggregator\" cannot create resource \"resourceclaims\" in API group \"resource.k8s.io\" in the namespace \"kcloud\""}),
        );
        let (_, _, reply) = fake.expect(Method::DELETE, &at(PODS, &pod)).await;
        respond(reply, StatusCode::OK, pod_json(&pod, "uid-1", json!({})));
        let (_, _, reply) = fake
            .expect(Method::DELETE, &at(SECRETS, &secret_name(&pod)))
            .await;
        respond(reply, StatusCode::OK, api_status(200, "Success"));
        let (_, _, reply) = fake
            .expect(Method::DELETE, &at(CLAIMS, &claim_name(&pod)))
            .await;
        fail(reply, 404, "NotFound");
        fake.no_more_calls().await;
    };
    scenario(
        async move {
            let e = p.create(spec(&[MIG])).await.unwrap_err();
            assert!(
                matches!(&e, Error::Unavailable(m) if m.contains("RBAC")),
                "{e:?}"
            );
            assert!(p.get("alice", "lab").is_none());
        },
        fake_side,
    )
    .await;
}

#[tokio::test]
async fn a_pod_name_taken_in_the_cluster_is_a_conflict_and_not_deleted() {
    let (p, mut fake) = provisioner(PinningMode::Env, empty_cluster());
    let fake_side = async move {
        let (_, _, reply) = fake.expect(Method::POST, PODS).await;
        fail(reply, 409, "AlreadyExists");
        fake.no_more_calls().await;
    };
    scenario(
        async move {
            let no_image = ServerSpec {
                image: None,
                ..spec(&[])
            };
            let e = p.create(no_image).await.unwrap_err();
            assert!(
                matches!(e, Error::BadRequest(_)),
                "no call without an image: {e:?}"
            );
            let e = p.create(spec(&[])).await.unwrap_err();
            assert!(matches!(e, Error::Conflict(_)), "{e:?}");
            assert!(p.get("alice", "lab").is_none());
        },
        fake_side,
    )
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_pod_create_that_times_out_is_deleted() {
    let (p, mut fake) = provisioner(PinningMode::Env, empty_cluster());
    let pod = pod_name("alice", "lab");
    let fake_side = async move {
        // No answer: the client's timeout (paused clock, so at once) decides.
        let (_, _, unanswered) = fake.expect(Method::POST, PODS).await;
        let (_, _, reply) = fake.expect(Method::DELETE, &at(PODS, &pod)).await;
        respond(reply, StatusCode::OK, pod_json(&pod, "uid-1", json!({})));
        fake.no_more_calls().await;
        drop(unanswered);
    };
    scenario(
        async move {
            let e = p.create(spec(&[GPU])).await.unwrap_err();
            assert!(
                matches!(&e, Error::Unavailable(m) if m.contains("in time")),
                "{e:?}"
            );
            assert!(p.get("alice", "lab").is_none());
        },
        fake_side,
    )
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_secret_create_that_times_out_rolls_back() {
    let (p, mut fake) = provisioner(PinningMode::Env, empty_cluster());
    let pod = pod_name("alice", "lab");
    let fake_side = async move {
        let (body, _, reply) = fake.expect(Method::POST, PODS).await;
        created(reply, body, "uid-1");
        let (_, _, unanswered) = fake.expect(Method::POST, SECRETS).await;
        let (_, _, reply) = fake.expect(Method::DELETE, &at(PODS, &pod)).await;
        respond(reply, StatusCode::OK, pod_json(&pod, "uid-1", json!({})));
        // It may have been made before the answer was lost: deleted all the same.
        let (_, _, reply) = fake
            .expect(Method::DELETE, &at(SECRETS, &secret_name(&pod)))
            .await;
        respond(reply, StatusCode::OK, api_status(200, "Success"));
        fake.no_more_calls().await;
        drop(unanswered);
    };
    scenario(
        async move {
            let e = p.create(spec(&[GPU])).await.unwrap_err();
            assert!(
                matches!(&e, Error::Unavailable(m) if m.contains("in time")),
                "{e:?}"
            );
            assert!(p.get("alice", "lab").is_none());
        },
        fake_side,
    )
    .await;
}

#[tokio::test]
async fn a_create_whose_caller_goes_away_still_finishes() {
    let (p, mut fake) = provisioner(PinningMode::Env, empty_cluster());
    let p = Arc::new(p);
    let caller = tokio::spawn({
        let p = p.clone();
        async move { p.create(spec(&[])).await }
    });
    let (body, _, reply) = fake.expect(Method::POST, PODS).await;
    // The request is dropped mid-way (a client that disconnects).
    caller.abort();
    assert!(caller.await.unwrap_err().is_cancelled());
    created(reply, body, "uid-1");
    let (body, _, reply) = fake.expect(Method::POST, SECRETS).await;
    created(reply, body, "uid-2");
    let mut id = None;
    for _ in 0..1000 {
        id = p.get("alice", "lab").map(|s| s.id);
        if id.as_deref() == Some("uid-1") {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert_eq!(id.as_deref(), Some("uid-1"), "created in full, not stuck");
}

#[tokio::test]
async fn a_failed_pod_delete_keeps_the_server() {
    let (p, mut fake) = provisioner(PinningMode::Env, empty_cluster());
    let pod = pod_name("alice", "lab");
    let fake_side = async move {
        let (body, _, reply) = fake.expect(Method::POST, PODS).await;
        created(reply, body, "uid-1");
        let (body, _, reply) = fake.expect(Method::POST, SECRETS).await;
        created(reply, body, "uid-2");
        let (_, _, reply) = fake.expect(Method::DELETE, &at(PODS, &pod)).await;
        fail(reply, 500, "InternalError");
        fake.no_more_calls().await;
    };
    scenario(
        async move {
            p.create(spec(&[])).await.unwrap();
            let e = p.delete("alice", "lab").await.unwrap_err();
            assert!(matches!(e, Error::Unavailable(_)), "{e:?}");
            let kept = p.get("alice", "lab").expect("still there");
            assert_eq!(kept.status, ServerStatus::Pending, "status restored");
        },
        fake_side,
    )
    .await;
}

#[tokio::test]
async fn recover_rebuilds_servers_cleans_orphans_and_follows_the_watch() {
    let cluster = empty_cluster();
    let (p, mut fake) = provisioner(PinningMode::Dra, cluster.clone());
    let lab = pod_name("alice", "lab");
    let fake_side = {
        let lab = lab.clone();
        async move {
            let (_, query, reply) = fake.expect(Method::GET, PODS).await;
            assert!(query.contains("labelSelector="), "{query}");
            let mut unreadable = pod_json("kcloud-x-y-00000000", "uid-x", running());
            unreadable["metadata"]["annotations"]["kcloud.io/spec"] = json!("{not json");
            let mut stuck = pod_json(
                &pod_name("bob", "nb"),
                "uid-b",
                json!({"phase": "Pending",
                "containerStatuses": [{"name": "server", "image": "i", "imageID": "", "ready": false,
                "restartCount": 0, "state": {"waiting": {"reason": "ImagePullBackOff"}}}]}),
            );
            stuck["metadata"]["labels"]["kcloud.io/owner"] = json!("bob");
            stuck["metadata"]["labels"]["kcloud.io/server"] = json!("nb");
            respond(
                reply,
                StatusCode::OK,
                list(
                    "PodList",
                    vec![pod_json(&lab, "uid-1", running()), unreadable, stuck],
                ),
            );
            let (_, _, reply) = fake.expect(Method::GET, SECRETS).await;
            respond(
                reply,
                StatusCode::OK,
                list(
                    "SecretList",
                    vec![
                        secret_json(&lab, "s3cret"),
                        secret_json(&pod_name("bob", "nb"), "other"),
                        secret_json("kcloud-gone-gone-12345678", "stale"),
                    ],
                ),
            );
            let (_, _, reply) = fake.expect(Method::GET, CLAIMS).await;
            let mut orphan = json!({"apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
                "metadata": {"name": claim_name("kcloud-gone-gone-12345678")}, "spec": {}});
            orphan["metadata"]["labels"] = json!({"kcloud.io/owner": "gone"});
            respond(
                reply,
                StatusCode::OK,
                list("ResourceClaimList", vec![orphan]),
            );
            // The unreadable pod and the stuck one are deleted at once.
            let (body, _, reply) = fake
                .expect(Method::DELETE, &at(PODS, "kcloud-x-y-00000000"))
                .await;
            assert_eq!(body["gracePeriodSeconds"], 0);
            respond(reply, StatusCode::OK, json!({"metadata": {}}));
            let (_, _, reply) = fake
                .expect(Method::DELETE, &at(PODS, &pod_name("bob", "nb")))
                .await;
            respond(reply, StatusCode::OK, json!({"metadata": {}}));
            let (_, _, reply) = fake
                .expect(
                    Method::DELETE,
                    &at(SECRETS, &secret_name("kcloud-gone-gone-12345678")),
                )
                .await;
            respond(reply, StatusCode::OK, api_status(200, "Success"));
            let (_, _, reply) = fake
                .expect(
                    Method::DELETE,
                    &at(CLAIMS, &claim_name("kcloud-gone-gone-12345678")),
                )
                .await;
            respond(reply, StatusCode::OK, api_status(200, "Success"));

            // The watch: its initial list shows alice's pod OOM-killed.
            let (_, query, reply) = fake.expect(Method::GET, PODS).await;
            assert!(query.contains("labelSelector="), "{query}");
            let oom = json!({"phase": "Failed", "containerStatuses": [{"name": "server", "image": "i",
                "imageID": "", "ready": false, "restartCount": 0,
                "state": {"terminated": {"reason": "OOMKilled", "exitCode": 137}}}]});
            respond(
                reply,
                StatusCode::OK,
                list("PodList", vec![pod_json(&lab, "uid-1", oom)]),
            );
            // Then it watches; the test is over.
            let (_, query, _watch) = fake.expect(Method::GET, PODS).await;
            assert!(query.contains("watch=true"), "{query}");
        }
    };
    let fake = tokio::spawn(fake_side);
    let servers = p.recover().await.unwrap();
    let names: Vec<(&str, &str, ServerStatus)> = servers
        .iter()
        .map(|s| (s.owner.as_str(), s.name.as_str(), s.status))
        .collect();
    assert_eq!(
        names,
        [
            ("alice", "lab", ServerStatus::Running),
            ("bob", "nb", ServerStatus::Failed)
        ]
    );
    let alice = &servers[0];
    assert_eq!(alice.devices, [GPU]);
    assert_eq!(alice.cpu_millis, 2_000);
    let up = alice.upstream.as_ref().expect("running: reachable");
    assert_eq!(up.addr.to_string(), "10.0.0.7:8888");
    assert_eq!(up.token.as_deref(), Some("s3cret"));
    assert!(
        servers[1]
            .reason
            .as_deref()
            .unwrap()
            .starts_with("ImagePullBackOff")
    );

    // What the aggregator does with it: the ledger holds alice's devices.
    cluster.ledger().rebuild(
        servers
            .iter()
            .filter(|s| s.status.holds_devices())
            .flat_map(|s| s.devices.iter().map(|d| (d.clone(), s.holder()))),
    );
    let holder = Holder {
        user: "alice".into(),
        server: "lab".into(),
    };
    assert_eq!(cluster.ledger().holder(GPU), Some(holder));

    // A guard against a hang if the provisioner stops short, not a timing assertion.
    tokio::time::timeout(Duration::from_secs(60), fake)
        .await
        .expect("the provisioner made every expected call")
        .expect("scenario");
    // The watch's OOM-kill reached the server; its devices went back.
    let mut failed = None;
    for _ in 0..1000 {
        match p.get("alice", "lab") {
            Some(s) if s.status == ServerStatus::Failed => {
                failed = Some(s);
                break;
            }
            _ => tokio::task::yield_now().await,
        }
    }
    let failed = failed.expect("the watch marks the server failed");
    assert_eq!(failed.reason.as_deref(), Some("OOMKilled (exit code 137)"));
    assert!(failed.upstream.is_none());
    assert_eq!(cluster.ledger().holder(GPU), None, "devices released");
    p.shutdown().await;
}

#[tokio::test]
async fn logs_and_events_come_from_the_api() {
    let (p, mut fake) = provisioner(PinningMode::Env, empty_cluster());
    let pod = pod_name("alice", "lab");
    let token = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let fake_side = {
        let token = token.clone();
        async move {
            let (body, _, reply) = fake.expect(Method::POST, PODS).await;
            created(reply, body, "uid-1");
            let (body, _, reply) = fake.expect(Method::POST, SECRETS).await;
            let b64 = body["data"]["token"].as_str().unwrap().to_owned();
            use base64::Engine as _;
            let t = String::from_utf8(
                base64::engine::general_purpose::STANDARD
                    .decode(b64)
                    .unwrap(),
            )
            .unwrap();
            *token.lock().unwrap() = t.clone();
            created(reply, body, "uid-2");

            let (_, query, reply) = fake
                .expect(Method::GET, &format!("{}/log", at(PODS, &pod)))
                .await;
            assert!(
                query.contains("tailLines=50") && query.contains("container=server"),
                "{query}"
            );
            let log = format!("started\nhttp://x/lab?token={t}\n");
            let mut resp = Response::new(Body::from(log.into_bytes()));
            *resp.status_mut() = StatusCode::OK;
            reply.send_response(resp);

            let (_, query, reply) = fake
                .expect(Method::GET, "/api/v1/namespaces/kcloud-servers/events")
                .await;
            assert!(
                query.contains("fieldSelector=") && query.contains("uid-1"),
                "{query}"
            );
            respond(
                reply,
                StatusCode::OK,
                list(
                    "EventList",
                    vec![json!({
                "metadata": {"name": "e1", "namespace": NS},
                "involvedObject": {"kind": "Pod", "name": pod, "uid": "uid-1"},
                "reason": "Pulling", "message": "Pulling image \"x\"",
                "lastTimestamp": "2026-01-01T00:00:01Z"})],
                ),
            );

            // A pod whose container has not started: no log yet.
            let (_, _, reply) = fake
                .expect(Method::GET, &format!("{}/log", at(PODS, &pod)))
                .await;
            fail(reply, 400, "BadRequest");

            // Following: the API server's streamed log, token removed line by line.
            let (_, query, reply) = fake
                .expect(Method::GET, &format!("{}/log", at(PODS, &pod)))
                .await;
            assert!(
                query.contains("follow=true") && query.contains("tailLines=5"),
                "{query}"
            );
            let log = format!("one\ntoken={t}\ntwo\n", t = token.lock().unwrap());
            reply.send_response(Response::new(Body::from(log.into_bytes())));
            fake.no_more_calls().await;
        }
    };
    scenario(
        async move {
            p.create(spec(&[])).await.unwrap();
            let text = p.logs("alice", "lab", 50).await.unwrap();
            assert!(text.contains("token=<token>"), "{text}");
            let events = p.events("alice", "lab").await.unwrap();
            let kinds: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
            assert_eq!(kinds, ["Pulling", "Created"], "oldest first");
            assert_eq!(events[0].at_ms, 1_767_225_601_000);
            assert_eq!(p.logs("alice", "lab", 50).await.unwrap(), "");
            let followed: Vec<String> = futures_util::StreamExt::collect::<Vec<_>>(
                p.follow_logs("alice", "lab", 5).await.unwrap(),
            )
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
            assert_eq!(followed, ["one\n", "token=<token>\n", "two\n"]);
            assert!(matches!(
                p.logs("bob", "x", 5).await,
                Err(Error::NotFound(_))
            ));
        },
        fake_side,
    )
    .await;
    assert!(!token.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_pod_deleted_outside_kcloud_fails_its_server_and_frees_its_devices() {
    let cluster = empty_cluster();
    let (p, mut fake) = provisioner(PinningMode::Env, cluster.clone());
    let lab = pod_name("alice", "lab");
    let fake_side = {
        let lab = lab.clone();
        async move {
            let (_, _, reply) = fake.expect(Method::GET, PODS).await;
            respond(
                reply,
                StatusCode::OK,
                list("PodList", vec![pod_json(&lab, "uid-1", running())]),
            );
            let (_, _, reply) = fake.expect(Method::GET, SECRETS).await;
            respond(
                reply,
                StatusCode::OK,
                list("SecretList", vec![secret_json(&lab, "s3cret")]),
            );
            // The watch: listed running, then someone deletes it.
            let (_, _, reply) = fake.expect(Method::GET, PODS).await;
            respond(
                reply,
                StatusCode::OK,
                list("PodList", vec![pod_json(&lab, "uid-1", running())]),
            );
            let (_, query, reply) = fake.expect(Method::GET, PODS).await;
            assert!(query.contains("watch=true"), "{query}");
            let mut terminating = pod_json(&lab, "uid-1", running());
            terminating["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
            terminating["metadata"]["resourceVersion"] = json!("11");
            let mut stream = Vec::new();
            for (kind, obj) in [("MODIFIED", &terminating), ("DELETED", &terminating)] {
                stream.extend(serde_json::to_vec(&json!({"type": kind, "object": obj})).unwrap());
                stream.push(b'\n');
            }
            reply.send_response(Response::new(Body::from(stream)));
            // It watches again from there; the test is over.
            let (_, query, _again) = fake.expect(Method::GET, PODS).await;
            assert!(query.contains("watch=true"), "{query}");
        }
    };
    let fake = tokio::spawn(fake_side);
    let servers = p.recover().await.unwrap();
    assert_eq!(servers[0].status, ServerStatus::Running);
    cluster
        .ledger()
        .rebuild([(GPU.to_owned(), servers[0].holder())]);
    // A guard against a hang if the provisioner stops short, not a timing assertion.
    tokio::time::timeout(Duration::from_secs(60), fake)
        .await
        .expect("the provisioner made every expected call")
        .expect("scenario");
    let mut failed = None;
    for _ in 0..1000 {
        match p.get("alice", "lab") {
            Some(s) if s.status == ServerStatus::Failed => {
                failed = Some(s);
                break;
            }
            _ => tokio::task::yield_now().await,
        }
    }
    let failed = failed.expect("the watch marks the server failed");
    assert_eq!(
        failed.reason.as_deref(),
        Some("its pod was deleted outside kcloud")
    );
    assert_eq!(cluster.ledger().holder(GPU), None, "devices released");
    p.shutdown().await;
}

/// Against a real cluster (the kubeconfig's context, namespace `KCLOUD_NAMESPACE` or
/// `default`): a server without devices comes up, answers, and goes.
#[tokio::test]
#[ignore = "needs kube context"]
async fn a_server_runs_in_a_real_cluster() {
    let client = kube::Client::try_default().await.expect("a kube context");
    let namespace = std::env::var("KCLOUD_NAMESPACE").unwrap_or_else(|_| "default".into());
    let p = KubeProvisioner::new(
        client,
        ReleaseOnExit::new(empty_cluster()),
        KubeOptions {
            namespace,
            settings: KubernetesSettings::default(),
            timeout: Duration::from_secs(30),
            stop_grace: Duration::from_secs(5),
        },
    );
    p.recover().await.unwrap();
    let s = ServerSpec {
        image: Some("quay.io/jupyter/minimal-notebook:latest".into()),
        launch: Launch::default(),
        ..spec(&[])
    };
    p.create(s).await.unwrap();
    let mut status = ServerStatus::Pending;
    for _ in 0..300 {
        status = p.get("alice", "lab").unwrap().status;
        if status != ServerStatus::Pending {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let server = p.get("alice", "lab").unwrap();
    assert_eq!(status, ServerStatus::Running, "{:?}", server.reason);
    assert!(server.upstream.is_some());
    assert!(!p.events("alice", "lab").await.unwrap().is_empty());
    p.delete("alice", "lab").await.unwrap().unwrap();
    p.shutdown().await;
}

// ---------------------------------------------------------------------------------
// The servers API on the cluster shape

#[tokio::test]
async fn the_servers_api_on_the_cluster_shape() {
    use tokio::sync::oneshot;
    let dir = tempfile::tempdir().unwrap();
    let config = <kcloud_aggregator::config::Config as clap::Parser>::try_parse_from([
        "kcloud-aggregator",
        "--data-dir",
        dir.path().join("data").to_str().unwrap(),
        "--bootstrap-admin-user",
        "admin",
        "--bootstrap-admin-password",
        ADMIN_PW,
        "--simulate",
        "dgx-a100-mig",
        "--agent-heartbeat",
        "1s",
        "--provisioner",
        "kubernetes",
        "--namespace",
        NS,
    ])
    .unwrap();
    let (kube_client, mut fake) = FakeKube::new();
    let pod = pod_name("admin", "lab");

    let (watching_tx, watching) = oneshot::channel();
    let (posted_tx, posted) = oneshot::channel::<Value>();
    let (fail_tx, fail_now) = oneshot::channel::<()>();
    let fake_side = {
        let pod = pod.clone();
        async move {
            let (_, _, reply) = fake.expect(Method::GET, PODS).await;
            respond(reply, StatusCode::OK, list("PodList", vec![]));
            let (_, _, reply) = fake.expect(Method::GET, SECRETS).await;
            respond(reply, StatusCode::OK, list("SecretList", vec![]));
            let (_, _, reply) = fake.expect(Method::GET, PODS).await;
            respond(reply, StatusCode::OK, list("PodList", vec![]));
            let (_, query, watch) = fake.expect(Method::GET, PODS).await;
            assert!(query.contains("watch=true"), "{query}");
            watching_tx.send(()).unwrap();
            let mut parked = Vec::new();

            let (m, path, body, reply) = fake.next_call(&mut parked).await;
            assert_eq!((m, path.as_str()), (Method::POST, PODS));
            posted_tx.send(body.clone()).unwrap();
            created(reply, body.clone(), "uid-1");
            let (m, path, secret, reply) = fake.next_call(&mut parked).await;
            assert_eq!((m, path.as_str()), (Method::POST, SECRETS));
            created(reply, secret, "uid-2");

            // The kubelet cannot pull the image.
            fail_now.await.unwrap();
            let mut stuck = body;
            stuck["metadata"]["uid"] = json!("uid-1");
            stuck["metadata"]["resourceVersion"] = json!("12");
            stuck["status"] = json!({"phase": "Pending", "containerStatuses": [{"name": "server",
                "image": "i", "imageID": "", "ready": false, "restartCount": 0, "state": {"waiting": {
                "reason": "ImagePullBackOff", "message": "Back-off pulling image"}}}]});
            let event = json!({"type": "MODIFIED", "object": stuck});
            let mut line = serde_json::to_vec(&event).unwrap();
            line.push(b'\n');
            watch.send_response(Response::new(Body::from(line)));

            // Failed before it ever ran: its pod goes at once.
            let (m, path, body, reply) = fake.next_call(&mut parked).await;
            assert_eq!((m, path), (Method::DELETE, at(PODS, &pod)));
            assert_eq!(body["gracePeriodSeconds"], 0);
            respond(reply, StatusCode::OK, json!({"metadata": {}}));

            // GET .../events
            let (m, path, _, reply) = fake.next_call(&mut parked).await;
            assert_eq!(
                (m, path.as_str()),
                (Method::GET, "/api/v1/namespaces/kcloud-servers/events")
            );
            respond(
                reply,
                StatusCode::OK,
                list(
                    "EventList",
                    vec![json!({
                "metadata": {"name": "e1", "namespace": NS},
                "involvedObject": {"kind": "Pod", "name": pod, "uid": "uid-1"},
                "reason": "Failed", "message": "Failed to pull image",
                "lastTimestamp": "2026-01-01T00:00:01Z"})],
                ),
            );

            // DELETE the server: the pod is gone already, the Secret goes.
            let (m, path, _, reply) = fake.next_call(&mut parked).await;
            assert_eq!((m, path), (Method::DELETE, at(PODS, &pod)));
            fail(reply, 404, "NotFound");
            let (m, path, _, reply) = fake.next_call(&mut parked).await;
            assert_eq!((m, path), (Method::GET, at(PODS, &pod)));
            fail(reply, 404, "NotFound");
            let (m, path, _, reply) = fake.next_call(&mut parked).await;
            assert_eq!((m, path), (Method::DELETE, at(SECRETS, &secret_name(&pod))));
            respond(reply, StatusCode::OK, api_status(200, "Success"));
        }
    };
    let fake = tokio::spawn(fake_side);
    // The cluster shape's own wiring, on the fake API server: recovery lists nothing.
    let app = kcloud_aggregator::build_with(&config, Some(kube_client))
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let shutdown = tokio_util::sync::CancellationToken::new();
    let served = tokio::spawn(app.serve(listener, shutdown.clone()));
    watching.await.unwrap();

    let http = reqwest::Client::new();
    let call = |method: reqwest::Method, path: &str, token: Option<&str>, body: Option<Value>| {
        let mut req = http.request(method, format!("{base}{path}"));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        async move {
            let resp = req.send().await.unwrap();
            let status = resp.status();
            (status, resp.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let (status, login) = call(
        reqwest::Method::POST,
        "/api/v1/auth/login",
        None,
        Some(json!({"username": "admin", "password": ADMIN_PW})),
    )
    .await;
    assert_eq!(status, reqwest::StatusCode::OK, "{login}");
    let token = login["access_token"].as_str().unwrap().to_owned();
    let t = Some(token.as_str());
    let mut free = Value::Null;
    for _ in 0..200 {
        free = call(
            reqwest::Method::GET,
            "/api/v1/gpus?available=true&kind=mig&limit=1",
            t,
            None,
        )
        .await
        .1;
        if free["items"].as_array().is_some_and(|a| !a.is_empty()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let device = free["items"][0].clone();
    let uuid = device["uuid"]
        .as_str()
        .expect("a free MIG instance")
        .to_owned();

    let (status, server) = call(
        reqwest::Method::POST,
        "/api/v1/users/admin/servers",
        t,
        Some(json!({"name": "lab", "devices": [uuid], "preset": "small"})),
    )
    .await;
    assert_eq!(status, reqwest::StatusCode::CREATED, "{server}");
    assert_eq!(server["status"], "pending");
    assert_eq!(server["url"], "/user/admin/lab/");
    let posted = posted.await.unwrap();
    assert_eq!(
        posted["spec"]["nodeSelector"]["kubernetes.io/hostname"],
        device["node"]
    );
    assert_eq!(
        env_var(&posted, "NVIDIA_VISIBLE_DEVICES").unwrap()["value"],
        uuid.as_str()
    );
    assert_eq!(
        posted["metadata"]["annotations"]["kcloud.io/devices"],
        uuid.as_str()
    );
    let held = call(
        reqwest::Method::GET,
        "/api/v1/gpus?limit=1000&kind=mig",
        t,
        None,
    )
    .await
    .1;
    let mine = held["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["uuid"] == uuid.as_str())
        .unwrap()
        .clone();
    assert_eq!(mine["available"], false);
    assert_eq!(mine["holder"], json!({"user": "admin", "server": "lab"}));

    fail_tx.send(()).unwrap();
    let mut server = Value::Null;
    for _ in 0..200 {
        server = call(
            reqwest::Method::GET,
            "/api/v1/users/admin/servers/lab",
            t,
            None,
        )
        .await
        .1;
        if server["status"] == "failed" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(server["status"], "failed", "{server}");
    assert_eq!(server["reason"], "ImagePullBackOff: Back-off pulling image");
    // Its devices went back to the pool once the pod was deleted.
    let mut back = false;
    for _ in 0..200 {
        let all = call(
            reqwest::Method::GET,
            "/api/v1/gpus?limit=1000&kind=mig",
            t,
            None,
        )
        .await
        .1;
        let d = all["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["uuid"] == uuid.as_str())
            .unwrap()
            .clone();
        if d["available"] == true {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(back, "the device is free again");

    let (status, events) = call(
        reqwest::Method::GET,
        "/api/v1/users/admin/servers/lab/events",
        t,
        None,
    )
    .await;
    assert_eq!(status, reqwest::StatusCode::OK, "{events}");
    let kinds: Vec<&str> = events
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        ["Failed", "Created", "Failed"],
        "the pod's event, then kcloud's"
    );

    let resp = http
        .delete(format!("{base}/api/v1/users/admin/servers/lab"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), reqwest::StatusCode::NO_CONTENT);
    let (status, _) = call(
        reqwest::Method::GET,
        "/api/v1/users/admin/servers/lab",
        t,
        None,
    )
    .await;
    assert_eq!(status, reqwest::StatusCode::NOT_FOUND);

    tokio::time::timeout(Duration::from_secs(60), fake)
        .await
        .expect("the provisioner made every expected call")
        .expect("scenario");
    shutdown.cancel();
    served.await.unwrap().unwrap();
}

/// An admin's idle-culling exemption is kept on the pod, where recovery reads it.
#[tokio::test]
async fn a_culling_exemption_is_a_pod_annotation() {
    let (p, mut fake) = provisioner(PinningMode::Env, empty_cluster());
    let pod = pod_name("alice", "lab");
    let fake_side = async move {
        let (body, _, reply) = fake.expect(Method::POST, PODS).await;
        let mut patched = body.clone();
        created(reply, body, "uid-1");
        let (body, _, reply) = fake.expect(Method::POST, SECRETS).await;
        created(reply, body, "uid-2");
        let (body, _, reply) = fake.expect(Method::PATCH, &at(PODS, &pod)).await;
        assert_eq!(
            body,
            json!({"metadata": {"annotations": {"kcloud.io/cull-exempt": "true"}}})
        );
        patched["metadata"]["uid"] = json!("uid-1");
        patched["metadata"]["annotations"]["kcloud.io/cull-exempt"] = json!("true");
        respond(reply, StatusCode::OK, patched.clone());
        // Ending it removes the annotation (a merge patch with null).
        let (body, _, reply) = fake.expect(Method::PATCH, &at(PODS, &pod)).await;
        assert_eq!(
            body,
            json!({"metadata": {"annotations": {"kcloud.io/cull-exempt": null}}})
        );
        respond(reply, StatusCode::OK, patched);
        fake.no_more_calls().await;
    };
    scenario(
        async move {
            p.create(spec(&[])).await.unwrap();
            let s = p.set_cull_exempt("alice", "lab", true).await.unwrap();
            assert!(s.unwrap().cull_exempt);
            assert!(p.get("alice", "lab").unwrap().cull_exempt);
            let s = p.set_cull_exempt("alice", "lab", false).await.unwrap();
            assert!(!s.unwrap().cull_exempt);
            assert!(p.set_cull_exempt("bob", "x", true).await.unwrap().is_none());
        },
        fake_side,
    )
    .await;
}

#[test]
fn recovery_reads_the_exemption_and_the_spec_back_from_the_pod() {
    let s = spec(&["MIG-aaaa"]);
    let p = Profile::for_launch(&s.owner, &s.name, &s.launch);
    let mut pod = to_json(&server_pod(
        &s,
        &settings(PinningMode::Env),
        NS,
        &p,
        Mounts::default(),
        42,
    ));
    pod["metadata"]["uid"] = json!("uid-9");
    let read = |pod: &Value| {
        kcloud_provision::kube::server_from_pod(&serde_json::from_value(pod.clone()).unwrap())
            .unwrap()
    };
    let back = read(&pod);
    assert!(!back.cull_exempt);
    assert_eq!(back.devices, ["MIG-aaaa"]);
    assert_eq!(back.created_at_ms, 42);
    assert_eq!(back.launch, s.launch);
    pod["metadata"]["annotations"]["kcloud.io/cull-exempt"] = json!("true");
    assert!(read(&pod).cull_exempt);
}
