//! The cluster shape: each server is a Pod, with a per-server Secret (its Jupyter
//! token) and, in `dra` pinning mode, a `resource.k8s.io/v1` ResourceClaim naming its
//! exact devices. Kubernetes is the truth: every object carries the owner and server in
//! labels and the devices in annotations, so that [`KubeProvisioner::recover`] rebuilds
//! the servers (and with them the ledger) from a list of labelled pods, and a watch
//! keeps their status current.
//!
//! The object builders ([`server_pod`], [`token_secret`], [`device_claim`]) are pure
//! functions of the spec and the cluster settings, so tests validate them against
//! Kubernetes' own schemas without a cluster.
//!
//! Pods use `restartPolicy: Never`: a server whose container ended is over, and its
//! devices can safely go to someone else. A pod stuck before it ever runs (image pull
//! failure, unschedulable) is failed and deleted, for the same reason: a pod left to
//! retry could start later on devices the ledger has given away.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures_util::StreamExt as _;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource, Event,
    HTTPGetAction, KeyToPath, Pod, PodResourceClaim, PodSecurityContext, PodSpec, Probe,
    ResourceClaim as ContainerClaim, ResourceRequirements, SeccompProfile, Secret,
    SecretKeySelector, SecretVolumeSource, SecurityContext, TCPSocketAction, Toleration, Volume,
    VolumeMount,
};
use k8s_openapi::api::resource::v1::{
    CELDeviceSelector, DeviceClaim, DeviceRequest, DeviceSelector, ExactDeviceRequest,
    ResourceClaim, ResourceClaimSpec,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{
    Api, DeleteParams, ListParams, LogParams, Patch, PatchParams, PostParams, PropagationPolicy,
};
use kube::runtime::{WatchStreamExt as _, watcher};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::{
    Launch, Provisioner, Server, ServerEvent, ServerSpec, ServerStatus, Upstream, base_url,
};
use crate::config::{KubernetesSettings, PinningMode};
use crate::ledger::{Holder, Ledger};
use crate::{Error, Result, now_ms};

/// `app.kubernetes.io/managed-by` of everything this provisioner creates.
pub const MANAGED_BY: &str = "kcloud-aggregator";
pub const LABEL_OWNER: &str = "kcloud.io/owner";
pub const LABEL_SERVER: &str = "kcloud.io/server";
/// The devices, comma-separated UUIDs (also for people using kubectl).
pub const ANNOTATION_DEVICES: &str = "kcloud.io/devices";
/// The node the devices are on.
pub const ANNOTATION_NODE: &str = "kcloud.io/node";
/// The rest of the spec that recovery needs, as JSON ([`SpecRecord`]).
pub const ANNOTATION_SPEC: &str = "kcloud.io/spec";
/// `"true"` on a server an admin exempted from idle culling.
pub const ANNOTATION_CULL_EXEMPT: &str = "kcloud.io/cull-exempt";
/// Selects every object this provisioner made, in its namespace.
pub const SELECTOR: &str = "app.kubernetes.io/part-of=kcloud,\
    app.kubernetes.io/component=server,app.kubernetes.io/managed-by=kcloud-aggregator";

/// The server's container.
const CONTAINER: &str = "server";
/// The key of the token in the per-server Secret.
const TOKEN_KEY: &str = "token";
/// JupyterLab's extra config in the same Secret (see [`JUPYTER_CONFIG`]).
const JUPYTER_CONFIG_KEY: &str = "jupyter_server_config.py";
const JUPYTER_CONFIG_DIR: &str = "/etc/kcloud/jupyter";
/// The pod's name for its ResourceClaim (dra mode).
const CLAIM_REF: &str = "devices";
/// How often a delete checks whether the pod is gone.
const GONE_POLL: Duration = Duration::from_secs(1);

/// JupyterLab writes its token into the `/lab` page for the browser; behind the proxy
/// the browser must never see it (the proxy adds it), so a page-config hook blanks it.
const JUPYTER_CONFIG: &str = "\
# Written by kcloud. The proxy adds this server's token to every request; the browser
# never gets it.
c.ServerApp.tornado_settings.update(
    {\"page_config_hook\": lambda handler, page_config: {**page_config, \"token\": \"\"}}
)
";

// ---------------------------------------------------------------------------------
// Names

/// The pod's name: readable, and unique per owner/name even where `-` makes the
/// concatenation ambiguous (`a-b`+`c` and `a`+`b-c`), hence the hash. At most 7 + 63 +
/// 1 + 63 + 9 = 143 characters: a valid DNS subdomain, as pod names must be.
pub fn pod_name(owner: &str, name: &str) -> String {
    format!(
        "kcloud-{owner}-{name}-{:08x}",
        fnv1a(&format!("{owner}/{name}")) as u32
    )
}

pub fn secret_name(pod: &str) -> String {
    format!("{pod}-token")
}

pub fn claim_name(pod: &str) -> String {
    format!("{pod}-devices")
}

/// FNV-1a: stable across builds and platforms (names outlive the binary).
fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

// ---------------------------------------------------------------------------------
// What runs in the pod

/// How a server's readiness is probed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Readiness {
    /// An HTTP GET on this absolute path answers 2xx/3xx.
    Http(String),
    /// The port accepts connections.
    Tcp,
}

/// What runs in the server container: the seam where IDE profiles plug in. JupyterLab
/// is the default; a custom command serves HTTP on `{port}` under `{base_url}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Profile {
    /// `app.kubernetes.io/name` of the server's objects.
    pub app: String,
    pub command: Vec<String>,
    pub args: Vec<String>,
    pub port: u16,
    pub readiness: Readiness,
    /// Mount [`JUPYTER_CONFIG`] (JupyterLab only).
    pub jupyter_config: bool,
}

impl Profile {
    /// The port servers listen on in their pod.
    pub const PORT: u16 = 8888;

    /// JupyterLab, or the launch's own command (its IDE profile's or the user's), for
    /// `owner/name`.
    pub fn for_launch(owner: &str, name: &str, launch: &Launch) -> Profile {
        let run = launch.run_profile();
        let base = base_url(owner, name);
        let port = run.port;
        let fill = |s: &String| {
            s.replace("{port}", &port.to_string())
                .replace("{base_url}", &base)
                // All interfaces: the proxy reaches the pod by its IP.
                .replace("{ip}", "0.0.0.0")
        };
        match &launch.command {
            None => {
                let mut args = vec![
                    "lab".to_owned(),
                    "--no-browser".to_owned(),
                    // All interfaces: the proxy reaches the pod by its IP.
                    "--ServerApp.ip=0.0.0.0".to_owned(),
                    format!("--ServerApp.port={port}"),
                    "--ServerApp.port_retries=0".to_owned(),
                    format!("--ServerApp.base_url={base}"),
                    // The proxy keeps the browser's Host header; the token guards access.
                    "--ServerApp.allow_remote_access=True".to_owned(),
                ];
                args.extend(launch.args.iter().map(fill));
                Profile {
                    app: "jupyterlab".into(),
                    command: vec!["jupyter".into()],
                    args,
                    port,
                    // `api/status` needs the token, which would then sit in the pod spec
                    // for everyone who can read pods; `api` answers without it once the
                    // server serves.
                    readiness: Readiness::Http(format!("{base}api")),
                    jupyter_config: true,
                }
            }
            Some(command) => Profile {
                app: run.name.clone(),
                command: command.iter().map(fill).collect(),
                args: launch.args.iter().map(fill).collect(),
                port,
                // Without a readiness path its paths are unknown: any answer on the
                // port will do.
                readiness: if run.readiness_path.is_empty() {
                    Readiness::Tcp
                } else {
                    Readiness::Http(run.probe_path(&base))
                },
                jupyter_config: false,
            },
        }
    }
}

/// Volumes and their mounts in the server container, beyond `/dev/shm` and the token:
/// where users' PVCs and NFS shares go.
#[derive(Clone, Debug, Default)]
pub struct Mounts {
    pub volumes: Vec<Volume>,
    pub mounts: Vec<VolumeMount>,
}

/// What recovery reads back from [`ANNOTATION_SPEC`].
#[derive(Debug, Serialize, Deserialize)]
pub struct SpecRecord {
    pub cpu_millis: u64,
    pub memory_bytes: u64,
    #[serde(default)]
    pub image: Option<String>,
    #[serde(default)]
    pub launch: Launch,
    pub created_at_ms: u64,
    /// Volumes and shares mounted into it.
    #[serde(default)]
    pub mounts: Vec<crate::provisioner::Mount>,
}

// ---------------------------------------------------------------------------------
// Object builders

/// The labels of every object of a server.
pub fn labels(spec: &ServerSpec, app: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".into(), app.to_owned()),
        (
            "app.kubernetes.io/instance".into(),
            format!("{}-{}", spec.owner, spec.name)
                .chars()
                .take(63)
                .collect::<String>()
                .trim_end_matches('-')
                .to_owned(),
        ),
        ("app.kubernetes.io/component".into(), "server".into()),
        ("app.kubernetes.io/part-of".into(), "kcloud".into()),
        ("app.kubernetes.io/managed-by".into(), MANAGED_BY.into()),
        (LABEL_OWNER.into(), spec.owner.clone()),
        (LABEL_SERVER.into(), spec.name.clone()),
    ])
}

fn annotations(spec: &ServerSpec) -> BTreeMap<String, String> {
    let mut a = BTreeMap::from([(ANNOTATION_DEVICES.into(), spec.devices.join(","))]);
    if let Some(node) = &spec.node {
        a.insert(ANNOTATION_NODE.into(), node.clone());
    }
    a
}

fn meta(
    name: String,
    namespace: &str,
    spec: &ServerSpec,
    app: &str,
    owner: Option<&OwnerReference>,
) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: Some(namespace.to_owned()),
        labels: Some(labels(spec, app)),
        annotations: Some(annotations(spec)),
        owner_references: owner.map(|o| vec![o.clone()]),
        ..Default::default()
    }
}

/// The owner reference that makes an object go with its pod.
pub fn pod_owner(pod_name: &str, uid: &str) -> OwnerReference {
    OwnerReference {
        api_version: "v1".into(),
        kind: "Pod".into(),
        name: pod_name.to_owned(),
        uid: uid.to_owned(),
        ..Default::default()
    }
}

/// The server's pod. `created_at_ms` is recorded for recovery.
pub fn server_pod(
    spec: &ServerSpec,
    k: &KubernetesSettings,
    namespace: &str,
    profile: &Profile,
    mounts: Mounts,
    created_at_ms: u64,
) -> Pod {
    let pod = pod_name(&spec.owner, &spec.name);
    let with_devices = !spec.devices.is_empty();
    let env_pinned = with_devices && k.pinning.mode == PinningMode::Env;
    let dra_pinned = with_devices && k.pinning.mode == PinningMode::Dra;

    let mut meta = meta(pod.clone(), namespace, spec, &profile.app, None);
    let record = SpecRecord {
        cpu_millis: spec.cpu_millis,
        memory_bytes: spec.memory_bytes,
        image: spec.image.clone(),
        launch: spec.launch.clone(),
        created_at_ms,
        mounts: spec.mounts.clone(),
    };
    if let Some(a) = meta.annotations.as_mut() {
        // Serialising plain strings and numbers cannot fail.
        a.insert(
            ANNOTATION_SPEC.into(),
            serde_json::to_string(&record).unwrap_or_default(),
        );
    }

    let var = |name: &str, value: String| EnvVar {
        name: name.into(),
        value: Some(value),
        ..Default::default()
    };
    let mut env = vec![EnvVar {
        name: "JUPYTER_TOKEN".into(),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: secret_name(&pod),
                key: TOKEN_KEY.into(),
                optional: Some(false),
            }),
            ..Default::default()
        }),
        ..Default::default()
    }];
    if env_pinned {
        env.push(var("NVIDIA_VISIBLE_DEVICES", spec.devices.join(",")));
        env.push(var("NVIDIA_DRIVER_CAPABILITIES", "compute,utility".into()));
    } else if !with_devices {
        // CUDA images set NVIDIA_VISIBLE_DEVICES=all; where the NVIDIA runtime is the
        // node's default that would hand this pod every GPU of its node.
        env.push(var("NVIDIA_VISIBLE_DEVICES", "void".into()));
    }
    if profile.jupyter_config {
        env.push(var("JUPYTER_CONFIG_PATH", JUPYTER_CONFIG_DIR.into()));
    }
    env.extend(
        spec.launch
            .env
            .iter()
            .map(|(name, value)| var(name, value.clone())),
    );

    let quantities = BTreeMap::from([
        ("cpu".to_owned(), Quantity(format!("{}m", spec.cpu_millis))),
        ("memory".to_owned(), Quantity(spec.memory_bytes.to_string())),
    ]);

    let mut volumes = vec![Volume {
        name: "dshm".into(),
        // PyTorch's data loaders share tensors through /dev/shm; the runtime's default
        // is 64 MiB. Memory-backed, so it counts against the memory limit.
        empty_dir: Some(EmptyDirVolumeSource {
            medium: Some("Memory".into()),
            size_limit: Some(Quantity((spec.memory_bytes / 2).to_string())),
            ..Default::default()
        }),
        ..Default::default()
    }];
    let mut volume_mounts = vec![VolumeMount {
        name: "dshm".into(),
        mount_path: "/dev/shm".into(),
        ..Default::default()
    }];
    if profile.jupyter_config {
        volumes.push(Volume {
            name: "kcloud-jupyter".into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(secret_name(&pod)),
                items: Some(vec![KeyToPath {
                    key: JUPYTER_CONFIG_KEY.into(),
                    path: JUPYTER_CONFIG_KEY.into(),
                    ..Default::default()
                }]),
                default_mode: Some(0o440),
                ..Default::default()
            }),
            ..Default::default()
        });
        volume_mounts.push(VolumeMount {
            name: "kcloud-jupyter".into(),
            mount_path: JUPYTER_CONFIG_DIR.into(),
            read_only: Some(true),
            ..Default::default()
        });
    }
    volumes.extend(mounts.volumes);
    volume_mounts.extend(mounts.mounts);

    let probe = match &profile.readiness {
        Readiness::Http(path) => Probe {
            http_get: Some(HTTPGetAction {
                path: Some(path.clone()),
                port: IntOrString::String("http".into()),
                ..Default::default()
            }),
            ..Default::default()
        },
        Readiness::Tcp => Probe {
            tcp_socket: Some(TCPSocketAction {
                port: IntOrString::String("http".into()),
                ..Default::default()
            }),
            ..Default::default()
        },
    };
    let probe = Probe {
        period_seconds: Some(3),
        failure_threshold: Some(3),
        ..probe
    };

    let container = Container {
        name: CONTAINER.into(),
        image: spec.image.clone(),
        command: Some(profile.command.clone()),
        args: Some(profile.args.clone()),
        env: Some(env),
        ports: Some(vec![ContainerPort {
            name: Some("http".into()),
            container_port: i32::from(profile.port),
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
        // Requests = limits: the preset is what the user gets, no more, no less.
        resources: Some(ResourceRequirements {
            requests: Some(quantities.clone()),
            limits: Some(quantities),
            claims: dra_pinned.then(|| {
                vec![ContainerClaim {
                    name: CLAIM_REF.into(),
                    ..Default::default()
                }]
            }),
        }),
        readiness_probe: Some(probe),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            privileged: Some(false),
            run_as_non_root: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Default::default()
            }),
            ..Default::default()
        }),
        volume_mounts: Some(volume_mounts),
        ..Default::default()
    };

    let tolerations = env_pinned.then(|| {
        k.pinning
            .tolerations
            .iter()
            .map(|t| Toleration {
                key: t.key.clone(),
                operator: Some(t.operator.as_str().into()),
                value: t.value.clone(),
                effect: t.effect.map(|e| e.as_str().to_owned()),
                ..Default::default()
            })
            .collect::<Vec<_>>()
    });

    Pod {
        metadata: meta,
        spec: Some(PodSpec {
            restart_policy: Some("Never".into()),
            // Users' code has no business with the Kubernetes API.
            automount_service_account_token: Some(false),
            enable_service_links: Some(false),
            security_context: Some(PodSecurityContext {
                run_as_non_root: Some(true),
                run_as_user: Some(k.run_as_user),
                run_as_group: Some(k.run_as_group),
                fs_group: Some(k.run_as_group),
                seccomp_profile: Some(SeccompProfile {
                    type_: "RuntimeDefault".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            node_selector: env_pinned
                .then(|| spec.node.clone())
                .flatten()
                .map(|node| BTreeMap::from([("kubernetes.io/hostname".to_owned(), node)])),
            runtime_class_name: env_pinned
                .then(|| k.pinning.runtime_class_name.clone())
                .flatten(),
            tolerations: tolerations.filter(|t| !t.is_empty()),
            resource_claims: dra_pinned.then(|| {
                vec![PodResourceClaim {
                    name: CLAIM_REF.into(),
                    resource_claim_name: Some(claim_name(&pod)),
                    ..Default::default()
                }]
            }),
            containers: vec![container],
            volumes: Some(volumes),
            ..Default::default()
        }),
        status: None,
    }
}

/// The per-server Secret: the Jupyter token (and JupyterLab's extra config), owned by
/// the pod.
pub fn token_secret(
    spec: &ServerSpec,
    namespace: &str,
    profile: &Profile,
    owner: &OwnerReference,
    token: &str,
) -> Secret {
    let mut data = BTreeMap::from([(TOKEN_KEY.to_owned(), ByteString(token.as_bytes().to_vec()))]);
    if profile.jupyter_config {
        data.insert(
            JUPYTER_CONFIG_KEY.into(),
            ByteString(JUPYTER_CONFIG.as_bytes().to_vec()),
        );
    }
    Secret {
        metadata: meta(
            secret_name(&owner.name),
            namespace,
            spec,
            &profile.app,
            Some(owner),
        ),
        type_: Some("Opaque".into()),
        // Never edited; immutable Secrets also spare the kubelet a watch.
        immutable: Some(true),
        data: Some(data),
        ..Default::default()
    }
}

/// The server's ResourceClaim in `dra` mode: one request per device, each selecting
/// the device by UUID. `None` in `env` mode or without devices.
pub fn device_claim(
    spec: &ServerSpec,
    k: &KubernetesSettings,
    namespace: &str,
    profile: &Profile,
    owner: &OwnerReference,
) -> Result<Option<ResourceClaim>> {
    if k.pinning.mode != PinningMode::Dra || spec.devices.is_empty() {
        return Ok(None);
    }
    let requests = spec
        .devices
        .iter()
        .enumerate()
        .map(|(i, uuid)| {
            check_device_id(uuid)?;
            let class = if uuid.starts_with("MIG-") {
                &k.pinning.mig_device_class
            } else {
                &k.pinning.gpu_device_class
            };
            Ok(DeviceRequest {
                name: format!("device-{i}"),
                exactly: Some(ExactDeviceRequest {
                    device_class_name: class.clone(),
                    allocation_mode: Some("ExactCount".into()),
                    count: Some(1),
                    selectors: Some(vec![DeviceSelector {
                        cel: Some(CELDeviceSelector {
                            expression: format!(
                                "device.attributes[\"gpu.nvidia.com\"].uuid == \"{uuid}\""
                            ),
                        }),
                    }]),
                    ..Default::default()
                }),
                ..Default::default()
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Some(ResourceClaim {
        metadata: meta(
            claim_name(&owner.name),
            namespace,
            spec,
            &profile.app,
            Some(owner),
        ),
        spec: Some(ResourceClaimSpec {
            devices: Some(DeviceClaim {
                requests: Some(requests),
                ..Default::default()
            }),
        }),
        status: None,
    }))
}

/// Device IDs end up in annotations, env values and CEL strings: `GPU-`/`MIG-` and
/// UUID characters only.
fn check_device_id(id: &str) -> Result<()> {
    let ok = (id.starts_with("GPU-") || id.starts_with("MIG-"))
        && id.len() <= 100
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'/');
    if ok {
        Ok(())
    } else {
        Err(Error::BadRequest(format!("not a device UUID: {id:?}")))
    }
}

// ---------------------------------------------------------------------------------
// Reading pods back

/// What a pod says about its server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observed {
    pub status: ServerStatus,
    pub reason: Option<String>,
    /// Failed, but the pod may still start: it must be deleted before its devices go
    /// back to the pool.
    pub stop: bool,
    pub ip: Option<IpAddr>,
}

/// Waiting reasons after which the container will not come up without help.
const STUCK: &[&str] = &[
    "ImagePullBackOff",
    "ErrImageNeverPull",
    "InvalidImageName",
    "CrashLoopBackOff",
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
];

/// The server status a pod stands for, with the reason from its container statuses
/// and conditions.
pub fn observe(pod: &Pod) -> Observed {
    let short = |s: &str| -> String {
        let s = s.trim();
        match s.char_indices().nth(300) {
            Some((i, _)) => format!("{}…", &s[..i]),
            None => s.to_owned(),
        }
    };
    let with_message = |reason: &str, message: Option<&String>| match message {
        Some(m) if !m.trim().is_empty() => format!("{reason}: {}", short(m)),
        _ => reason.to_owned(),
    };
    let ob = |status, reason: Option<String>, stop| Observed {
        status,
        reason,
        stop,
        ip: None,
    };
    if pod.metadata.deletion_timestamp.is_some() {
        return ob(ServerStatus::Stopping, None, false);
    }
    let Some(st) = &pod.status else {
        return ob(ServerStatus::Pending, None, false);
    };
    let container = st
        .container_statuses
        .iter()
        .flatten()
        .find(|c| c.name == CONTAINER);
    let state = container.and_then(|c| c.state.as_ref());
    let terminated = state.and_then(|s| s.terminated.as_ref());
    let phase = st.phase.as_deref().unwrap_or("Pending");

    if let Some(t) = terminated {
        let reason = t.reason.as_deref().unwrap_or("Terminated");
        let mut text = format!("{reason} (exit code {})", t.exit_code);
        if let Some(m) = t.message.as_ref().filter(|m| !m.trim().is_empty()) {
            text = format!("{text}: {}", short(m));
        }
        return ob(ServerStatus::Failed, Some(text), false);
    }
    if matches!(phase, "Failed" | "Succeeded") {
        let reason = st.reason.as_deref().unwrap_or(if phase == "Failed" {
            "Failed"
        } else {
            "Exited"
        });
        return ob(
            ServerStatus::Failed,
            Some(with_message(reason, st.message.as_ref())),
            false,
        );
    }
    if let Some(w) = state.and_then(|s| s.waiting.as_ref())
        && let Some(reason) = w.reason.as_deref()
        && STUCK.contains(&reason)
    {
        return ob(
            ServerStatus::Failed,
            Some(with_message(reason, w.message.as_ref())),
            true,
        );
    }
    let condition = |type_: &str| st.conditions.iter().flatten().find(|c| c.type_ == type_);
    if let Some(c) = condition("PodScheduled")
        && c.status == "False"
        && c.reason.as_deref() == Some("Unschedulable")
    {
        return ob(
            ServerStatus::Failed,
            Some(with_message("Unschedulable", c.message.as_ref())),
            true,
        );
    }
    let ready = condition("Ready").is_some_and(|c| c.status == "True");
    if phase == "Running" && ready {
        let ip = st.pod_ip.as_deref().and_then(|ip| ip.parse().ok());
        return Observed {
            status: ServerStatus::Running,
            reason: None,
            stop: false,
            ip,
        };
    }
    let waiting = state
        .and_then(|s| s.waiting.as_ref())
        .and_then(|w| w.reason.clone());
    ob(ServerStatus::Pending, waiting, false)
}

/// The port of the server container's `http` port (the profile's), as created.
fn server_port(pod: &Pod) -> u16 {
    pod.spec
        .iter()
        .flat_map(|s| &s.containers)
        .filter(|c| c.name == CONTAINER)
        .flat_map(|c| c.ports.iter().flatten())
        .find(|p| p.name.as_deref() == Some("http"))
        .and_then(|p| u16::try_from(p.container_port).ok())
        .unwrap_or(Profile::PORT)
}

/// The server a labelled pod stands for (status pending: see [`observe`]), or why it
/// cannot be read.
pub fn server_from_pod(pod: &Pod) -> Result<Server, String> {
    let m = &pod.metadata;
    let label = |k: &str| m.labels.as_ref().and_then(|l| l.get(k)).cloned();
    let annotation = |k: &str| m.annotations.as_ref().and_then(|a| a.get(k)).cloned();
    let owner = label(LABEL_OWNER).ok_or("no owner label")?;
    let name = label(LABEL_SERVER).ok_or("no server label")?;
    crate::store::validate_user_name(&owner).map_err(|e| e.to_string())?;
    super::validate_server_name(&name).map_err(|e| e.to_string())?;
    let pod = m.name.as_deref().ok_or("no name")?;
    if pod != pod_name(&owner, &name) {
        return Err(format!(
            "its name is not the one kcloud gives {owner}/{name}"
        ));
    }
    let uid = m.uid.clone().ok_or("no uid")?;
    let devices: Vec<String> = annotation(ANNOTATION_DEVICES)
        .ok_or("no devices annotation")?
        .split(',')
        .filter(|d| !d.is_empty())
        .map(str::to_owned)
        .collect();
    for d in &devices {
        check_device_id(d).map_err(|e| e.to_string())?;
    }
    let record: SpecRecord =
        serde_json::from_str(&annotation(ANNOTATION_SPEC).ok_or("no spec annotation")?)
            .map_err(|e| format!("spec annotation: {e}"))?;
    Ok(Server {
        id: uid,
        owner,
        name,
        status: ServerStatus::Pending,
        reason: None,
        node: annotation(ANNOTATION_NODE),
        devices,
        cpu_millis: record.cpu_millis,
        memory_bytes: record.memory_bytes,
        image: record.image,
        launch: record.launch,
        created_at_ms: record.created_at_ms,
        ready_at_ms: None,
        last_activity_ms: record.created_at_ms,
        cull_exempt: annotation(ANNOTATION_CULL_EXEMPT).as_deref() == Some("true"),
        mounts: record.mounts,
        pid: None,
        upstream: None,
    })
}

// ---------------------------------------------------------------------------------
// The provisioner

/// The cluster settings the provisioner works with.
#[derive(Clone, Debug)]
pub struct KubeOptions {
    /// Where server pods, Secrets and claims live.
    pub namespace: String,
    pub settings: KubernetesSettings,
    /// The limit on each API call.
    pub timeout: Duration,
    /// The pods' termination grace period on delete.
    pub stop_grace: Duration,
}

/// Servers as pods; see the module docs.
pub struct KubeProvisioner {
    inner: Arc<Inner>,
}

type Key = (String, String);

struct Inner {
    pods: Api<Pod>,
    secrets: Api<Secret>,
    claims: Api<ResourceClaim>,
    events: Api<Event>,
    opts: KubeOptions,
    ledger: Arc<Ledger>,
    servers: Mutex<BTreeMap<Key, Entry>>,
    /// Wakes the portal's event streams when a server appears, changes or goes.
    changed: crate::events::Signal,
    shutdown: CancellationToken,
}

struct Entry {
    server: Server,
    pod: String,
    token: Arc<str>,
    /// Where the server listens in its pod.
    port: u16,
    /// Objects are still being created: status is recorded but not acted on.
    creating: bool,
    /// Our own delete is under way: what the pod does meanwhile changes nothing.
    deleting: bool,
    /// The newest pod seen while creating.
    seen: Option<Pod>,
    /// kcloud's own events, beside the pod's.
    events: Vec<ServerEvent>,
}

/// What to do after a status change, outside the lock.
enum Action {
    None,
    /// Release the devices.
    Release(Holder),
    /// Delete the pod, then release the devices.
    StopAndRelease(Holder, String),
}

impl KubeProvisioner {
    /// `ledger`: where the devices of servers that fail by themselves are released.
    pub fn new(client: kube::Client, ledger: Arc<Ledger>, opts: KubeOptions) -> Self {
        let ns = opts.namespace.as_str();
        Self {
            inner: Arc::new(Inner {
                pods: Api::namespaced(client.clone(), ns),
                secrets: Api::namespaced(client.clone(), ns),
                claims: Api::namespaced(client.clone(), ns),
                events: Api::namespaced(client, ns),
                opts,
                ledger,
                servers: Mutex::default(),
                changed: Default::default(),
                shutdown: CancellationToken::new(),
            }),
        }
    }
}

#[async_trait::async_trait]
impl Provisioner for KubeProvisioner {
    async fn recover(&self) -> Result<Vec<Server>> {
        let inner = &self.inner;
        let list = ListParams::default().labels(SELECTOR);
        let pods = inner
            .call("listing server pods", inner.pods.list(&list))
            .await?
            .items;
        let secrets = inner
            .call("listing token Secrets", inner.secrets.list(&list))
            .await?
            .items;
        let claims = if inner.opts.settings.pinning.mode == PinningMode::Dra {
            inner
                .call("listing ResourceClaims", inner.claims.list(&list))
                .await?
                .items
        } else {
            Vec::new()
        };
        let tokens: HashMap<String, String> = secrets
            .iter()
            .filter_map(|s| {
                let token = s.data.as_ref()?.get(TOKEN_KEY)?;
                Some((
                    s.metadata.name.clone()?,
                    String::from_utf8(token.0.clone()).ok()?,
                ))
            })
            .collect();

        let mut live: HashSet<String> = HashSet::new();
        for pod in pods {
            let Some(pod_name) = pod.metadata.name.clone() else {
                continue;
            };
            let mut server = match server_from_pod(&pod) {
                Ok(s) => s,
                Err(why) => {
                    // Its devices are unknown: left running, it could use devices the
                    // ledger hands out.
                    tracing::error!(pod = %pod_name, %why, "deleting a pod labelled as a kcloud server that cannot be read");
                    inner.remove_pod(&pod_name, Duration::ZERO).await.ok();
                    continue;
                }
            };
            live.insert(pod_name.clone());
            let observed = observe(&pod);
            let port = server_port(&pod);
            let token = tokens.get(&secret_name(&pod_name)).cloned();
            let (status, reason, stop) = match (&token, observed.status) {
                (None, s) if s != ServerStatus::Failed => (
                    ServerStatus::Failed,
                    Some("its token Secret is gone".to_owned()),
                    true,
                ),
                _ => (observed.status, observed.reason, observed.stop),
            };
            if stop {
                tracing::warn!(pod = %pod_name, reason = reason.as_deref().unwrap_or(""), "stopping a server that cannot run");
                inner.remove_pod(&pod_name, Duration::ZERO).await.ok();
            }
            server.status = status;
            server.reason = reason.clone();
            if status == ServerStatus::Running {
                server.ready_at_ms = Some(now_ms());
                server.upstream = observed
                    .ip
                    .zip(token.as_ref())
                    .map(|(ip, t)| upstream(&server, SocketAddr::new(ip, port), t.as_str().into()));
            }
            let at_ms = now_ms();
            let entry = Entry {
                server: server.clone(),
                pod: pod_name,
                token: token.unwrap_or_default().into(),
                port,
                creating: false,
                deleting: false,
                seen: None,
                events: vec![ServerEvent {
                    at_ms,
                    kind: "Adopted".into(),
                    message: match &reason {
                        Some(r) => format!("found {} ({r})", status.as_str()),
                        None => format!("found {}", status.as_str()),
                    },
                }],
            };
            inner
                .lock()
                .insert((server.owner.clone(), server.name.clone()), entry);
        }

        inner.changed.notify();
        // Orphans: owned by pods that are gone (the garbage collector normally takes
        // them; this covers a collector that has not yet, or objects made without).
        for s in &secrets {
            let Some(name) = s.metadata.name.as_deref() else {
                continue;
            };
            if !live.iter().any(|p| secret_name(p) == name) {
                tracing::warn!(secret = %name, "deleting an orphaned token Secret");
                inner
                    .remove(&inner.secrets, "deleting an orphaned Secret", name)
                    .await
                    .ok();
            }
        }
        for c in &claims {
            let Some(name) = c.metadata.name.as_deref() else {
                continue;
            };
            if !live.iter().any(|p| claim_name(p) == name) {
                tracing::warn!(claim = %name, "deleting an orphaned ResourceClaim");
                inner
                    .remove(&inner.claims, "deleting an orphaned ResourceClaim", name)
                    .await
                    .ok();
            }
        }

        tokio::spawn(inner.clone().watch());
        Ok(self.list(None))
    }

    async fn create(&self, spec: ServerSpec) -> Result<Server> {
        // In a task of its own: a caller that goes away (a dropped request) must not
        // leave half-made objects behind or an entry stuck in creation.
        tokio::spawn(self.inner.clone().create(spec))
            .await
            .map_err(|e| Error::Internal(format!("creating a server: {e}")))?
    }

    async fn delete(&self, owner: &str, name: &str) -> Result<Option<Server>> {
        tokio::spawn(self.inner.clone().delete(owner.to_owned(), name.to_owned()))
            .await
            .map_err(|e| Error::Internal(format!("deleting a server: {e}")))?
    }

    fn get(&self, owner: &str, name: &str) -> Option<Server> {
        self.inner
            .lock()
            .get(&(owner.to_owned(), name.to_owned()))
            .map(|e| e.server.clone())
    }

    fn list(&self, owner: Option<&str>) -> Vec<Server> {
        self.inner
            .lock()
            .values()
            .filter(|e| owner.is_none_or(|o| e.server.owner == o))
            .map(|e| e.server.clone())
            .collect()
    }

    async fn logs(&self, owner: &str, name: &str, tail: usize) -> Result<String> {
        let inner = &self.inner;
        let Some((pod, token)) = inner
            .lock()
            .get(&(owner.to_owned(), name.to_owned()))
            .map(|e| (e.pod.clone(), e.token.clone()))
        else {
            return Err(Error::NotFound(format!("no server {owner}/{name}")));
        };
        let params = LogParams {
            container: Some(CONTAINER.into()),
            tail_lines: Some(i64::try_from(tail).unwrap_or(i64::MAX)),
            limit_bytes: Some(1 << 20),
            ..Default::default()
        };
        match inner
            .call("reading the server's log", inner.pods.logs(&pod, &params))
            .await
        {
            Ok(text) if token.is_empty() => Ok(text),
            Ok(text) => Ok(text.replace(&*token, "<token>")),
            // No pod any more, or its container has not started: no log (yet).
            Err(Error::NotFound(_) | Error::BadRequest(_)) => Ok(String::new()),
            Err(e) => Err(e),
        }
    }

    async fn follow_logs(&self, owner: &str, name: &str, tail: usize) -> Result<super::LogStream> {
        use futures_util::{AsyncBufReadExt as _, StreamExt as _};
        let inner = &self.inner;
        let Some((pod, token)) = inner
            .lock()
            .get(&(owner.to_owned(), name.to_owned()))
            .map(|e| (e.pod.clone(), e.token.clone()))
        else {
            return Err(Error::NotFound(format!("no server {owner}/{name}")));
        };
        let params = LogParams {
            container: Some(CONTAINER.into()),
            tail_lines: Some(i64::try_from(tail).unwrap_or(i64::MAX)),
            follow: true,
            ..Default::default()
        };
        // The API server ends the stream when the container stops.
        let reader = inner
            .call(
                "following the server's log",
                inner.pods.log_stream(&pod, &params),
            )
            .await?;
        Ok(Box::pin(reader.lines().map(move |line| {
            line.map(|l| {
                let l = if token.is_empty() {
                    l
                } else {
                    l.replace(&*token, "<token>")
                };
                format!("{l}\n")
            })
            .map_err(|source| Error::Io {
                context: "following a pod log".into(),
                source,
            })
        })))
    }

    async fn events(&self, owner: &str, name: &str) -> Result<Vec<ServerEvent>> {
        let inner = &self.inner;
        let Some((uid, mut events)) = inner
            .lock()
            .get(&(owner.to_owned(), name.to_owned()))
            .map(|e| (e.server.id.clone(), e.events.clone()))
        else {
            return Err(Error::NotFound(format!("no server {owner}/{name}")));
        };
        let params = ListParams::default()
            .fields(&format!("involvedObject.kind=Pod,involvedObject.uid={uid}"));
        let listed = inner
            .call("listing the server's events", inner.events.list(&params))
            .await?;
        events.extend(listed.items.into_iter().map(|e| {
            let at_ms = e
                .last_timestamp
                .as_ref()
                .map(|t| t.0.as_millisecond())
                .or_else(|| e.event_time.as_ref().map(|t| t.0.as_millisecond()))
                .or_else(|| {
                    e.metadata
                        .creation_timestamp
                        .as_ref()
                        .map(|t| t.0.as_millisecond())
                })
                .unwrap_or(0);
            ServerEvent {
                at_ms: u64::try_from(at_ms).unwrap_or(0),
                kind: e.reason.unwrap_or_else(|| "Event".into()),
                message: e.message.unwrap_or_default(),
            }
        }));
        events.sort_by_key(|e| e.at_ms);
        Ok(events)
    }

    fn touch(&self, owner: &str, name: &str, at_ms: u64) {
        if let Some(e) = self
            .inner
            .lock()
            .get_mut(&(owner.to_owned(), name.to_owned()))
        {
            e.server.last_activity_ms = e.server.last_activity_ms.max(at_ms);
        }
    }

    fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.changed.subscribe()
    }

    async fn set_cull_exempt(
        &self,
        owner: &str,
        name: &str,
        exempt: bool,
    ) -> Result<Option<Server>> {
        let key = (owner.to_owned(), name.to_owned());
        let Some(pod) = self.inner.lock().get(&key).map(|e| e.pod.clone()) else {
            return Ok(None);
        };
        // On the pod, where recovery reads it back.
        let value = if exempt {
            serde_json::Value::from("true")
        } else {
            serde_json::Value::Null
        };
        let patch =
            serde_json::json!({"metadata": {"annotations": {ANNOTATION_CULL_EXEMPT: value}}});
        self.inner
            .call(
                "exempting a server pod from culling",
                self.inner
                    .pods
                    .patch(&pod, &PatchParams::default(), &Patch::Merge(&patch)),
            )
            .await?;
        Ok(self.inner.lock().get_mut(&key).map(|e| {
            e.server.cull_exempt = exempt;
            e.server.clone()
        }))
    }

    async fn shutdown(&self) {
        self.inner.shutdown.cancel();
    }
}

impl Inner {
    async fn create(self: Arc<Self>, spec: ServerSpec) -> Result<Server> {
        let inner = &self;
        for d in &spec.devices {
            check_device_id(d)?;
        }
        if spec.image.is_none() {
            return Err(Error::BadRequest(
                "image: pods need one, and the settings name no default ([images] default)".into(),
            ));
        }
        let key = (spec.owner.clone(), spec.name.clone());
        let pod_name = pod_name(&spec.owner, &spec.name);
        let profile = Profile::for_launch(&spec.owner, &spec.name, &spec.launch);
        let now = now_ms();
        let token: Arc<str> = crate::auth::random_token().into();
        {
            let mut servers = inner.lock();
            if servers.contains_key(&key) {
                return Err(Error::Conflict(format!(
                    "server name {:?} is already in use",
                    spec.name
                )));
            }
            servers.insert(
                key.clone(),
                Entry {
                    server: Server {
                        id: pod_name.clone(),
                        owner: spec.owner.clone(),
                        name: spec.name.clone(),
                        status: ServerStatus::Pending,
                        reason: None,
                        node: spec.node.clone(),
                        devices: spec.devices.clone(),
                        cpu_millis: spec.cpu_millis,
                        memory_bytes: spec.memory_bytes,
                        image: spec.image.clone(),
                        launch: spec.launch.clone(),
                        created_at_ms: now,
                        ready_at_ms: None,
                        last_activity_ms: now,
                        cull_exempt: false,
                        mounts: spec.mounts.clone(),
                        pid: None,
                        upstream: None,
                    },
                    pod: pod_name.clone(),
                    token: token.clone(),
                    port: profile.port,
                    creating: true,
                    deleting: false,
                    seen: None,
                    events: Vec::new(),
                },
            );
        }
        inner.changed.notify();
        let pod = server_pod(
            &spec,
            &inner.opts.settings,
            &inner.opts.namespace,
            &profile,
            {
                // PVC and NFS volumes of the user's mounts.
                let (volumes, mounts) = crate::storage::pvc::pod_mounts(&spec.owner, &spec.mounts);
                Mounts { volumes, mounts }
            },
            now,
        );
        match inner.create_objects(&spec, &profile, pod, &token).await {
            Ok(uid) => {
                let (server, seen) = {
                    let mut servers = inner.lock();
                    let Some(e) = servers.get_mut(&key) else {
                        return Err(Error::Internal("a server vanished while created".into()));
                    };
                    e.creating = false;
                    e.server.id = uid.clone();
                    e.events.push(ServerEvent {
                        at_ms: now,
                        kind: "Created".into(),
                        message: if spec.devices.is_empty() {
                            format!("pod {pod_name}, no devices")
                        } else {
                            format!(
                                "pod {pod_name}, devices {} on {}",
                                spec.devices.join(", "),
                                spec.node.as_deref().unwrap_or("?")
                            )
                        },
                    });
                    (e.server.clone(), e.seen.take())
                };
                // What the watch saw while the objects were made counts now.
                if let Some(pod) = seen.filter(|p| p.metadata.uid.as_deref() == Some(&uid)) {
                    inner.on_pod(pod).await;
                    return Ok(inner.lock().get(&key).map_or(server, |e| e.server.clone()));
                }
                tracing::info!(owner = %spec.owner, server = %spec.name, pod = %pod_name, "server created");
                Ok(server)
            }
            Err(e) => {
                inner.lock().remove(&key);
                inner.changed.notify();
                Err(e)
            }
        }
    }

    async fn delete(self: Arc<Self>, owner: String, name: String) -> Result<Option<Server>> {
        let inner = &self;
        let key = (owner.clone(), name.clone());
        let (pod, before) = {
            let mut servers = inner.lock();
            let Some(e) = servers.get_mut(&key) else {
                return Ok(None);
            };
            let before = (e.server.status, e.server.upstream.take());
            if e.server.status != ServerStatus::Failed {
                e.server.status = ServerStatus::Stopping;
            }
            e.deleting = true;
            (e.pod.clone(), before)
        };
        inner.changed.notify();
        let grace = inner.opts.stop_grace;
        let stopped = async {
            inner.remove_pod(&pod, grace).await?;
            inner.wait_gone(&pod).await
        }
        .await;
        if let Err(e) = stopped {
            // Still there: it keeps its devices and its status.
            if let Some(entry) = inner.lock().get_mut(&key) {
                entry.deleting = false;
                if entry.server.status == ServerStatus::Stopping {
                    (entry.server.status, entry.server.upstream) = before;
                }
            }
            return Err(e);
        }
        // The pod owns these, so the garbage collector takes them too; deleting them
        // now frees a claim's devices in the scheduler's books at once.
        if let Err(e) = inner
            .remove(
                &inner.secrets,
                "deleting the token Secret",
                &secret_name(&pod),
            )
            .await
        {
            tracing::warn!(error = %e, pod = %pod, "token Secret left to the garbage collector");
        }
        if inner.opts.settings.pinning.mode == PinningMode::Dra
            && let Err(e) = inner
                .remove(
                    &inner.claims,
                    "deleting the ResourceClaim",
                    &claim_name(&pod),
                )
                .await
        {
            tracing::warn!(error = %e, pod = %pod, "ResourceClaim left to the garbage collector");
        }
        tracing::info!(%owner, server = %name, pod = %pod, "server deleted");
        let gone = inner.lock().remove(&key).map(|e| e.server);
        inner.changed.notify();
        Ok(gone)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<Key, Entry>> {
        self.servers.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// One API call, within the timeout, its error mapped to ours.
    async fn call<T>(
        &self,
        what: &str,
        fut: impl Future<Output = Result<T, kube::Error>>,
    ) -> Result<T> {
        match tokio::time::timeout(self.opts.timeout, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(api_error(what, e)),
            Err(_) => Err(self.timed_out(what)),
        }
    }

    fn timed_out(&self, what: &str) -> Error {
        tracing::error!(what, timeout = ?self.opts.timeout, "the Kubernetes API did not answer");
        Error::Unavailable(format!("{what}: the Kubernetes API did not answer in time"))
    }

    /// Deletes an object; one that is not there is fine.
    async fn remove<K>(&self, api: &Api<K>, what: &str, name: &str) -> Result<()>
    where
        K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    {
        if name.is_empty() {
            // An empty name would address the whole collection.
            return Err(Error::Internal(format!("{what}: no name")));
        }
        let dp = DeleteParams::background();
        match self.call(what, api.delete(name, &dp)).await {
            Ok(_) | Err(Error::NotFound(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn remove_pod(&self, name: &str, grace: Duration) -> Result<()> {
        if name.is_empty() {
            return Err(Error::Internal("deleting a pod: no name".into()));
        }
        let dp = DeleteParams {
            grace_period_seconds: Some(u32::try_from(grace.as_secs()).unwrap_or(u32::MAX)),
            propagation_policy: Some(PropagationPolicy::Background),
            ..Default::default()
        };
        match self
            .call("deleting the server's pod", self.pods.delete(name, &dp))
            .await
        {
            Ok(_) | Err(Error::NotFound(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Waits until the pod is gone: until then its processes may still use the
    /// devices.
    async fn wait_gone(&self, name: &str) -> Result<()> {
        let deadline = tokio::time::Instant::now() + self.opts.stop_grace + self.opts.timeout;
        loop {
            match self
                .call("checking the server's pod", self.pods.get_opt(name))
                .await?
            {
                None => return Ok(()),
                Some(_) if tokio::time::Instant::now() >= deadline => {
                    return Err(Error::Unavailable(format!(
                        "the pod {name} is still terminating; try again"
                    )));
                }
                Some(_) => tokio::time::sleep(GONE_POLL).await,
            }
        }
    }

    /// Creates the pod, then its Secret and claim owned by it (so that they go with
    /// it); returns the pod's uid. On failure it deletes what it made.
    async fn create_objects(
        &self,
        spec: &ServerSpec,
        profile: &Profile,
        pod: Pod,
        token: &str,
    ) -> Result<String> {
        let pp = PostParams::default();
        let name = pod.metadata.name.clone().unwrap_or_default();
        let what = "creating the server's pod";
        let created = match tokio::time::timeout(self.opts.timeout, self.pods.create(&pp, &pod))
            .await
        {
            Ok(Ok(p)) => p,
            // Refused: nothing was made (and a pod of that name is not ours to delete).
            Ok(Err(kube::Error::Api(s))) if s.code < 500 => {
                return Err(api_error(what, kube::Error::Api(s)));
            }
            failed => {
                // A timeout or a failure on the way back: it may exist all the same.
                if let Err(e) = self.remove_pod(&name, Duration::ZERO).await {
                    tracing::error!(error = %e, pod = %name, "could not delete a pod whose creation failed");
                }
                return Err(match failed {
                    Ok(Err(e)) => api_error(what, e),
                    _ => self.timed_out(what),
                });
            }
        };
        let Some(uid) = created.metadata.uid.clone() else {
            self.rollback(&name).await;
            return Err(Error::Internal("the created pod has no uid".into()));
        };
        let owner = pod_owner(&name, &uid);
        let ns = &self.opts.namespace;
        let secret = token_secret(spec, ns, profile, &owner, token);
        let made = async {
            self.call(
                "creating the token Secret",
                self.secrets.create(&pp, &secret),
            )
            .await?;
            if let Some(claim) = device_claim(spec, &self.opts.settings, ns, profile, &owner)? {
                self.call(
                    "creating the ResourceClaim",
                    self.claims.create(&pp, &claim),
                )
                .await?;
            }
            Ok(())
        }
        .await;
        match made {
            Ok(()) => Ok(uid),
            Err(e) => {
                self.rollback(&name).await;
                Err(e)
            }
        }
    }

    /// Deletes a half-made server: the pod at once, and its Secret and claim, which
    /// the garbage collector would also take with the pod.
    async fn rollback(&self, pod: &str) {
        let mut failed = Vec::new();
        if let Err(e) = self.remove_pod(pod, Duration::ZERO).await {
            failed.push(e);
        }
        if let Err(e) = self
            .remove(
                &self.secrets,
                "deleting the token Secret",
                &secret_name(pod),
            )
            .await
        {
            failed.push(e);
        }
        if self.opts.settings.pinning.mode == PinningMode::Dra
            && let Err(e) = self
                .remove(&self.claims, "deleting the ResourceClaim", &claim_name(pod))
                .await
        {
            failed.push(e);
        }
        for e in failed {
            // Owned by the pod, or an orphan swept at the next start.
            tracing::error!(error = %e, pod = %pod, "rollback incomplete");
        }
    }

    /// Follows the server pods until shutdown. The watcher relists after a break; a
    /// pod missing from a relist went away during the break.
    async fn watch(self: Arc<Self>) {
        let config = watcher::Config::default().labels(SELECTOR);
        let stream = watcher(self.pods.clone(), config).default_backoff();
        let mut stream = std::pin::pin!(stream);
        let mut relist: Option<HashSet<String>> = None;
        loop {
            let event = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                event = stream.next() => event,
            };
            match event {
                None => return,
                Some(Ok(watcher::Event::Init)) => relist = Some(HashSet::new()),
                Some(Ok(watcher::Event::InitApply(pod))) => {
                    if let (Some(seen), Some(name)) = (relist.as_mut(), &pod.metadata.name) {
                        seen.insert(name.clone());
                    }
                    self.on_pod(pod).await;
                }
                Some(Ok(watcher::Event::InitDone)) => {
                    let seen = relist.take().unwrap_or_default();
                    let gone: Vec<(Key, String)> = self
                        .lock()
                        .iter()
                        .filter(|(_, e)| !e.creating && !seen.contains(&e.pod))
                        .map(|(k, e)| (k.clone(), e.server.id.clone()))
                        .collect();
                    for (key, uid) in gone {
                        self.on_gone(&key, &uid).await;
                    }
                }
                Some(Ok(watcher::Event::Apply(pod))) => self.on_pod(pod).await,
                Some(Ok(watcher::Event::Delete(pod))) => {
                    if let Ok(s) = server_from_pod(&pod) {
                        self.on_gone(&(s.owner, s.name), &s.id).await;
                    }
                }
                Some(Err(e)) => tracing::warn!(error = %e, "watching server pods"),
            }
        }
    }

    /// A pod changed: its server's status follows.
    async fn on_pod(&self, pod: Pod) {
        let m = &pod.metadata;
        let label = |k: &str| m.labels.as_ref().and_then(|l| l.get(k)).cloned();
        let (Some(owner), Some(name), Some(uid), Some(pod_name)) = (
            label(LABEL_OWNER),
            label(LABEL_SERVER),
            m.uid.clone(),
            m.name.clone(),
        ) else {
            return;
        };
        let key = (owner, name);
        let observed = observe(&pod);
        let action = {
            let mut servers = self.lock();
            let Some(e) = servers.get_mut(&key) else {
                return;
            };
            if pod_name != e.pod {
                return;
            }
            if e.creating {
                e.seen = Some(pod);
                return;
            }
            if e.server.id != uid || e.deleting {
                return;
            }
            apply(e, observed)
        };
        self.changed.notify();
        self.act(action).await;
    }

    /// A pod went away without a delete from us.
    async fn on_gone(&self, key: &Key, uid: &str) {
        let action = {
            let mut servers = self.lock();
            let Some(e) = servers.get_mut(key) else {
                return;
            };
            // Stopping without our delete: someone else deleted the pod.
            if e.server.id != uid
                || e.creating
                || e.deleting
                || e.server.status == ServerStatus::Failed
            {
                return;
            }
            apply(
                e,
                Observed {
                    status: ServerStatus::Failed,
                    reason: Some("its pod was deleted outside kcloud".into()),
                    stop: false,
                    ip: None,
                },
            )
        };
        self.changed.notify();
        self.act(action).await;
    }

    async fn act(&self, action: Action) {
        match action {
            Action::None => {}
            Action::Release(holder) => {
                self.ledger.release(&holder);
            }
            Action::StopAndRelease(holder, pod) => {
                if let Err(e) = self.remove_pod(&pod, Duration::ZERO).await {
                    // Devices stay held: the pod might still start on them.
                    tracing::error!(error = %e, pod = %pod, "could not stop a failed server's pod; its devices stay held");
                    return;
                }
                self.ledger.release(&holder);
            }
        }
    }
}

/// Applies what a pod says to its entry; returns what must follow.
fn apply(e: &mut Entry, o: Observed) -> Action {
    let s = &mut e.server;
    let now = now_ms();
    match o.status {
        // Terminal, and stays so whatever the pod does next.
        _ if s.status == ServerStatus::Failed => Action::None,
        ServerStatus::Failed => {
            s.status = ServerStatus::Failed;
            s.reason = o.reason.clone();
            s.upstream = None;
            tracing::warn!(owner = %s.owner, server = %s.name, reason = o.reason.as_deref().unwrap_or(""), "server failed");
            e.events.push(ServerEvent {
                at_ms: now,
                kind: "Failed".into(),
                message: o.reason.unwrap_or_default(),
            });
            if o.stop {
                Action::StopAndRelease(s.holder(), e.pod.clone())
            } else {
                Action::Release(s.holder())
            }
        }
        // Being deleted by someone else (our own deletes are not observed): only its
        // end moves it on, failed or gone.
        _ if s.status == ServerStatus::Stopping => Action::None,
        ServerStatus::Stopping => {
            s.status = ServerStatus::Stopping;
            s.upstream = None;
            Action::None
        }
        ServerStatus::Running => {
            if s.status != ServerStatus::Running {
                s.ready_at_ms.get_or_insert(now);
                s.last_activity_ms = s.last_activity_ms.max(now);
                e.events.push(ServerEvent {
                    at_ms: now,
                    kind: "Ready".into(),
                    message: "answering its readiness probe".into(),
                });
            }
            s.status = ServerStatus::Running;
            s.reason = None;
            s.upstream =
                o.ip.map(|ip| upstream(s, SocketAddr::new(ip, e.port), e.token.clone()));
            Action::None
        }
        ServerStatus::Pending => {
            s.status = ServerStatus::Pending;
            s.reason = o.reason;
            s.upstream = None;
            Action::None
        }
    }
}

/// How the proxy reaches a running server's pod.
fn upstream(s: &Server, addr: SocketAddr, token: Arc<str>) -> Upstream {
    Upstream::new(&s.owner, &s.name, &s.launch, addr, &token)
}

/// Kubernetes' answers as our errors. The cluster's own messages reach clients only
/// where they describe the request (invalid, conflict); the rest is logged.
fn api_error(what: &str, e: kube::Error) -> Error {
    match &e {
        kube::Error::Api(s) if s.is_not_found() => Error::NotFound(format!("{what}: not found")),
        kube::Error::Api(s) if s.code == 409 => {
            Error::Conflict(format!("{what}: {} (try again shortly)", s.message))
        }
        kube::Error::Api(s) if s.code == 400 || s.code == 422 => {
            Error::BadRequest(format!("{what}: the cluster refused it: {}", s.message))
        }
        kube::Error::Api(s) if s.code == 403 => {
            tracing::error!(what, message = %s.message, "the Kubernetes API refused the aggregator (RBAC)");
            Error::Unavailable(format!(
                "{what}: the cluster does not allow it (the aggregator's RBAC)"
            ))
        }
        _ => {
            tracing::error!(what, error = %e, "Kubernetes API call failed");
            Error::Unavailable(format!("{what}: the Kubernetes API failed"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_names_are_unique_and_stable() {
        assert_ne!(pod_name("a-b", "c"), pod_name("a", "b-c"));
        assert_eq!(pod_name("alice", "lab"), pod_name("alice", "lab"));
        assert!(pod_name("alice", "lab").starts_with("kcloud-alice-lab-"));
        // Fixed: pods made by an older build must keep their names.
        assert_eq!(fnv1a("a"), 0xaf63_dc4c_8601_ec8c);
        let long = pod_name(&"u".repeat(63), &"s".repeat(63));
        assert!(long.len() <= 253);
    }

    #[test]
    fn device_ids_are_checked() {
        assert!(check_device_id("GPU-5f1c0d3e-8a4b-4c1e-9d2f-000000000001").is_ok());
        assert!(check_device_id("MIG-5f1c0d3e-8a4b-4c1e-9d2f-000000000001").is_ok());
        for bad in ["", "GPU-\"", "gpu-1", "GPU-a b", "MIG-x\\\"||true"] {
            assert!(check_device_id(bad).is_err(), "{bad}");
        }
    }
}
