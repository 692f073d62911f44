//! The objects of a server, built by pure functions of its spec and the cluster
//! settings (tests validate them against Kubernetes' own schemas), and the way back
//! from a pod to its server and status.

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource,
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
use serde::{Deserialize, Serialize};

use kcloud_core::launch::{Binding, CommandLine, JUPYTER_CONFIG, Launch};
use kcloud_core::server::{Mount, Server, ServerSpec, ServerStatus, base_url};
use kcloud_core::settings::{KubernetesSettings, PinningMode};
use kcloud_core::validate::{validate_server_name, validate_user_name};
use kcloud_core::{Error, Result};

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
pub(crate) const CONTAINER: &str = "server";
/// The key of the token in the per-server Secret.
pub(crate) const TOKEN_KEY: &str = "token";
/// JupyterLab's extra config in the same Secret (see [`JUPYTER_CONFIG`]).
const JUPYTER_CONFIG_KEY: &str = "jupyter_server_config.py";
const JUPYTER_CONFIG_DIR: &str = "/etc/kcloud/jupyter";
/// The pod's name for its ResourceClaim (dra mode).
const CLAIM_REF: &str = "devices";
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
        let binding = Binding {
            // All interfaces: the proxy reaches the pod by its IP.
            ip: "0.0.0.0",
            port,
            base_url: &base,
        };
        let line = CommandLine::build(launch, &["jupyter".into(), "lab".into()], &binding);
        match &launch.command {
            None => Profile {
                app: "jupyterlab".into(),
                command: line.command,
                args: line.args,
                port,
                // `api/status` needs the token, which would then sit in the pod spec
                // for everyone who can read pods; `api` answers without it once the
                // server serves.
                readiness: Readiness::Http(format!("{base}api")),
                jupyter_config: true,
            },
            Some(_) => Profile {
                app: run.name.clone(),
                command: line.command,
                args: line.args,
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
    pub mounts: Vec<Mount>,
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
pub(crate) fn check_device_id(id: &str) -> Result<()> {
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
    let gone_node = pod
        .status
        .iter()
        .flat_map(|s| s.conditions.iter().flatten())
        .any(|c| {
            c.type_ == "DisruptionTarget"
                && c.status == "True"
                && c.reason.as_deref() == Some("DeletionByPodGC")
        });
    if gone_node {
        // The pod garbage collector removes pods of nodes that no longer exist: the
        // server ended with its machine.
        return ob(
            ServerStatus::Failed,
            Some("NodeLost: its node is gone from the cluster".into()),
            false,
        );
    }
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
pub(crate) fn server_port(pod: &Pod) -> u16 {
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
    validate_user_name(&owner).map_err(|e| e.to_string())?;
    validate_server_name(&name).map_err(|e| e.to_string())?;
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
