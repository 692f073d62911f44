//! The cluster shape's volumes: one PersistentVolumeClaim per volume, built by pure
//! functions here (the kube adapter only sends them), and the way back from a PVC to
//! its status and to its folder on the NFS export the aggregator has mounted.
//!
//! Objects are JSON values in the shape of `k8s_openapi`'s `PersistentVolumeClaim`
//! (`serde_json::from_value` turns them into it); tests validate them strictly against
//! Kubernetes' own schemas (1.33 and the newest).

use std::path::{Component, Path, PathBuf};

use serde_json::{Value, json};

use async_trait::async_trait;
use kcloud_core::server::{Mount, MountSource};
use kcloud_core::settings::StorageSettings;
use kcloud_core::volume::{AccessMode, VolumeRow, VolumeStatus};
use kcloud_core::{Error, Result};

use super::VolumeBackend;

/// Label keys on every volume PVC; the aggregator lists PVCs by them.
pub const OWNER_LABEL: &str = "kcloud.io/owner";
pub const VOLUME_LABEL: &str = "kcloud.io/volume";

/// The PVC of `owner`'s volume `volume`: `vol.{owner}.{volume}`. Both are DNS labels
/// (no dots), so the name is a valid DNS subdomain and no two volumes share one.
pub fn pvc_name(owner: &str, volume: &str) -> String {
    format!("vol.{owner}.{volume}")
}

/// The PVC for a volume: the configured StorageClass (none: the cluster's default),
/// the volume's access mode (ReadWriteMany needs an NFS-backed class, checked when the
/// volume is created), its size as the storage request, owner and volume labels.
pub fn build(namespace: &str, row: &VolumeRow, settings: &StorageSettings) -> Value {
    let mut spec = json!({
        "accessModes": [row.access_mode.as_str()],
        "volumeMode": "Filesystem",
        "resources": {"requests": {"storage": row.size_bytes.to_string()}},
    });
    if let Some(class) = &settings.storage_class {
        spec["storageClassName"] = json!(class);
    }
    json!({
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {
            "name": pvc_name(&row.owner, &row.name),
            "namespace": namespace,
            "labels": {
                "app.kubernetes.io/name": "kcloud",
                "app.kubernetes.io/component": "volume",
                "app.kubernetes.io/part-of": "kcloud",
                "app.kubernetes.io/managed-by": "kcloud-aggregator",
                OWNER_LABEL: row.owner,
                VOLUME_LABEL: row.name,
            },
            "annotations": {
                "kcloud.io/created-at-ms": row.created_at_ms.to_string(),
            },
        },
        "spec": spec,
    })
}

/// Which access modes the cluster's class supports: ReadWriteMany only when it is
/// NFS-backed.
pub fn allows(settings: &StorageSettings, mode: AccessMode) -> bool {
    mode == AccessMode::ReadWriteOnce || settings.nfs_backed
}

/// A volume's status from its PVC's `status.phase`: `Bound`, `Lost`, else pending.
pub fn status(pvc: &Value) -> VolumeStatus {
    phase_status(pvc["status"]["phase"].as_str())
}

fn phase_status(phase: Option<&str>) -> VolumeStatus {
    match phase {
        Some("Bound") => VolumeStatus::Bound,
        Some("Lost") => VolumeStatus::Lost,
        _ => VolumeStatus::Pending,
    }
}

/// Where a bound PVC's files are under `nfs_root` (the class's export as mounted in the
/// aggregator's pod), from its PV: the CSI NFS driver's `subDir` volume attribute, or
/// an in-tree `nfs.path` below `export` (the export path the class provisions under).
/// `None` when the PV says neither, or names a path that would leave the root.
pub fn folder(pv: &Value, nfs_root: &Path, export: Option<&str>) -> Option<PathBuf> {
    let rel = if let Some(sub) = pv["spec"]["csi"]["volumeAttributes"]["subDir"].as_str() {
        sub.trim_start_matches('/').to_owned()
    } else {
        let path = pv["spec"]["nfs"]["path"].as_str()?;
        let export = export?.trim_end_matches('/');
        path.strip_prefix(export)?.strip_prefix('/')?.to_owned()
    };
    let rel = Path::new(&rel);
    let plain = rel.components().all(|c| matches!(c, Component::Normal(_)));
    (plain && rel.components().next().is_some()).then(|| nfs_root.join(rel))
}

/// A server's mounts as pod volumes and container volume mounts, for the pod builder:
/// a volume is its PVC (`vol-{i}`), a share an `nfs` volume of the server and export
/// from config (`share-{i}`); read-only on both sides where the mount is.
pub fn pod_mounts(
    owner: &str,
    mounts: &[Mount],
) -> (
    Vec<k8s_openapi::api::core::v1::Volume>,
    Vec<k8s_openapi::api::core::v1::VolumeMount>,
) {
    use k8s_openapi::api::core::v1::{
        NFSVolumeSource, PersistentVolumeClaimVolumeSource, Volume, VolumeMount,
    };
    let ro = |m: &Mount| m.read_only.then_some(true);
    mounts
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let volume = match &m.source {
                MountSource::Volume { name, .. } => Volume {
                    name: format!("vol-{i}"),
                    persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                        claim_name: pvc_name(owner, name),
                        read_only: ro(m),
                    }),
                    ..Volume::default()
                },
                MountSource::Share { server, path, .. } => Volume {
                    name: format!("share-{i}"),
                    nfs: Some(NFSVolumeSource {
                        server: server.clone(),
                        path: path.clone(),
                        read_only: ro(m),
                    }),
                    ..Volume::default()
                },
            };
            let mount = VolumeMount {
                name: volume.name.clone(),
                mount_path: m.mount_path.clone(),
                read_only: ro(m),
                ..VolumeMount::default()
            };
            (volume, mount)
        })
        .unzip()
}

/// Volume PVCs in one namespace, and the PVs they are bound to: the only Kubernetes
/// API the storage needs (create, delete, read status, map to a folder).
#[derive(Clone)]
pub struct PvcClient {
    pvcs: kube::Api<k8s_openapi::api::core::v1::PersistentVolumeClaim>,
    pvs: kube::Api<k8s_openapi::api::core::v1::PersistentVolume>,
}

impl PvcClient {
    pub fn new(client: kube::Client, namespace: &str) -> Self {
        Self {
            pvcs: kube::Api::namespaced(client.clone(), namespace),
            pvs: kube::Api::all(client),
        }
    }

    /// Creates the PVC built by [`build`]; one that exists is `Conflict`.
    pub async fn create(&self, pvc: Value) -> Result<()> {
        let pvc: k8s_openapi::api::core::v1::PersistentVolumeClaim = serde_json::from_value(pvc)
            .map_err(|e| Error::Internal(format!("building a PVC: {e}")))?;
        match self
            .pvcs
            .create(&kube::api::PostParams::default(), &pvc)
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 409 => Err(Error::Conflict(
                "a volume of this name exists in the cluster".into(),
            )),
            Err(e) => Err(kube_error("creating a PVC", e)),
        }
    }

    /// Deletes a PVC; `false` if it was not there.
    pub async fn delete(&self, name: &str) -> Result<bool> {
        match self
            .pvcs
            .delete(name, &kube::api::DeleteParams::default())
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(false),
            Err(e) => Err(kube_error("deleting a PVC", e)),
        }
    }

    /// Every volume PVC's status, by PVC name (one list call).
    pub async fn statuses(&self) -> Result<std::collections::HashMap<String, VolumeStatus>> {
        let params = kube::api::ListParams::default().labels(
            "app.kubernetes.io/component=volume,app.kubernetes.io/managed-by=kcloud-aggregator",
        );
        let list = self
            .pvcs
            .list(&params)
            .await
            .map_err(|e| kube_error("listing PVCs", e))?;
        Ok(list
            .items
            .into_iter()
            .filter_map(|p| {
                let name = p.metadata.name.clone()?;
                let phase = p.status.and_then(|s| s.phase);
                Some((name, phase_status(phase.as_deref())))
            })
            .collect())
    }

    /// The PVC as JSON; `None` if it does not exist.
    pub async fn get(&self, name: &str) -> Result<Option<Value>> {
        let pvc = self
            .pvcs
            .get_opt(name)
            .await
            .map_err(|e| kube_error("reading a PVC", e))?;
        pvc.map(|p| serde_json::to_value(p).map_err(|e| Error::Internal(format!("a PVC: {e}"))))
            .transpose()
    }

    /// Where a bound PVC's files are under `nfs_root`; `None` while unbound or when
    /// its PV names no folder there.
    pub async fn folder(
        &self,
        name: &str,
        nfs_root: &Path,
        export: Option<&str>,
    ) -> Result<Option<PathBuf>> {
        let Some(pvc) = self.get(name).await? else {
            return Ok(None);
        };
        let Some(pv_name) = pvc["spec"]["volumeName"].as_str().filter(|n| !n.is_empty()) else {
            return Ok(None);
        };
        let pv = self
            .pvs
            .get_opt(pv_name)
            .await
            .map_err(|e| kube_error("reading a PV", e))?;
        let Some(pv) = pv else { return Ok(None) };
        let pv = serde_json::to_value(pv).map_err(|e| Error::Internal(format!("a PV: {e}")))?;
        Ok(folder(&pv, nfs_root, export))
    }
}

/// The cluster shape's volumes: a PVC each, of the configured class; their files
/// through the NFS export that backs the class, mounted at `[storage] nfs_root`.
pub struct PvcVolumes {
    pvcs: PvcClient,
    namespace: String,
    settings: StorageSettings,
}

impl PvcVolumes {
    pub fn new(pvcs: PvcClient, namespace: &str, settings: &StorageSettings) -> Self {
        Self {
            pvcs,
            namespace: namespace.to_owned(),
            settings: settings.clone(),
        }
    }
}

#[async_trait]
impl VolumeBackend for PvcVolumes {
    fn local_dir(&self, _owner: &str, _name: &str) -> Option<PathBuf> {
        None
    }

    async fn root(&self, owner: &str, name: &str) -> Result<PathBuf> {
        let root = self.settings.nfs_root.as_deref().ok_or_else(|| {
            Error::Unavailable(
                "volumes' files cannot be browsed here: no NFS export is mounted \
                 ([storage] nfs_root)"
                    .into(),
            )
        })?;
        self.pvcs
            .folder(
                &pvc_name(owner, name),
                root,
                self.settings.nfs_export.as_deref(),
            )
            .await?
            .ok_or_else(|| {
                Error::Unavailable(format!(
                    "volume {name:?} is not bound to storage the aggregator can reach yet"
                ))
            })
    }

    fn default_access_mode(&self) -> AccessMode {
        if self.settings.nfs_backed {
            AccessMode::ReadWriteMany
        } else {
            AccessMode::ReadWriteOnce
        }
    }

    fn check_access_mode(&self, mode: AccessMode) -> Result<()> {
        if allows(&self.settings, mode) {
            Ok(())
        } else {
            Err(Error::BadRequest(
                "access_mode: ReadWriteMany needs an NFS-backed storage class, which this \
                 cluster does not have"
                    .into(),
            ))
        }
    }

    async fn create(&self, row: &VolumeRow) -> Result<()> {
        self.pvcs
            .create(build(&self.namespace, row, &self.settings))
            .await
    }

    async fn delete(&self, owner: &str, name: &str) -> Result<()> {
        self.pvcs.delete(&pvc_name(owner, name)).await.map(|_| ())
    }

    fn new_status(&self) -> VolumeStatus {
        VolumeStatus::Pending
    }

    async fn statuses(&self, rows: &[VolumeRow]) -> Result<Vec<VolumeStatus>> {
        let by_pvc = self.pvcs.statuses().await?;
        Ok(rows
            .iter()
            .map(|r| {
                by_pvc
                    .get(&pvc_name(&r.owner, &r.name))
                    .copied()
                    .unwrap_or(VolumeStatus::Lost)
            })
            .collect())
    }
}

/// The API server unreachable or failing is 503 to clients; the details are logged.
fn kube_error(what: &str, e: kube::Error) -> Error {
    tracing::warn!(error = %e, "{what} failed");
    Error::Unavailable(format!("{what} failed: the cluster's API is not answering"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(mode: AccessMode) -> VolumeRow {
        VolumeRow {
            owner: "alice".into(),
            name: "data".into(),
            size_bytes: 10 << 30,
            access_mode: mode,
            created_at_ms: 1_700_000_000_000,
        }
    }

    #[test]
    fn pvcs_carry_class_mode_size_and_labels() {
        let mut settings = StorageSettings::default();
        let p = build("kcloud", &row(AccessMode::ReadWriteOnce), &settings);
        assert_eq!(p["metadata"]["name"], "vol.alice.data");
        assert_eq!(p["metadata"]["labels"][OWNER_LABEL], "alice");
        assert_eq!(p["metadata"]["labels"][VOLUME_LABEL], "data");
        assert_eq!(p["spec"]["accessModes"], json!(["ReadWriteOnce"]));
        assert_eq!(p["spec"]["resources"]["requests"]["storage"], "10737418240");
        assert!(
            p["spec"].get("storageClassName").is_none(),
            "no class: the cluster's default"
        );
        settings.storage_class = Some("nfs-client".into());
        settings.nfs_backed = true;
        let p = build("kcloud", &row(AccessMode::ReadWriteMany), &settings);
        assert_eq!(p["spec"]["storageClassName"], "nfs-client");
        assert_eq!(p["spec"]["accessModes"], json!(["ReadWriteMany"]));
        assert!(allows(&settings, AccessMode::ReadWriteMany));
        assert!(!allows(
            &StorageSettings::default(),
            AccessMode::ReadWriteMany
        ));
        assert_ne!(pvc_name("a-b", "c"), pvc_name("a", "b-c"));
    }

    #[test]
    fn status_and_folder_from_the_cluster() {
        assert_eq!(
            status(&json!({"status": {"phase": "Bound"}})),
            VolumeStatus::Bound
        );
        assert_eq!(
            status(&json!({"status": {"phase": "Lost"}})),
            VolumeStatus::Lost
        );
        assert_eq!(
            status(&json!({"status": {"phase": "Pending"}})),
            VolumeStatus::Pending
        );
        assert_eq!(status(&json!({})), VolumeStatus::Pending);
        let root = Path::new("/volumes");
        let csi = json!({"spec": {"csi": {"driver": "nfs.csi.k8s.io",
            "volumeAttributes": {"server": "nfs", "share": "/export", "subDir": "pvc-123"}}}});
        assert_eq!(
            folder(&csi, root, None),
            Some(PathBuf::from("/volumes/pvc-123"))
        );
        let intree =
            json!({"spec": {"nfs": {"server": "nfs", "path": "/export/kcloud/ns-vol-pv-1"}}});
        assert_eq!(
            folder(&intree, root, Some("/export/kcloud/")),
            Some(PathBuf::from("/volumes/ns-vol-pv-1"))
        );
        assert_eq!(folder(&intree, root, Some("/other")), None);
        assert_eq!(folder(&intree, root, None), None);
        for evil in ["../etc", "a/../../b", "", "/"] {
            let pv = json!({"spec": {"csi": {"volumeAttributes": {"subDir": evil}}}});
            assert_eq!(folder(&pv, root, None), None, "{evil}");
        }
    }

    #[test]
    fn servers_mount_pvcs_and_nfs_shares() {
        let mounts = [
            Mount {
                source: MountSource::Volume {
                    name: "data".into(),
                    local_path: None,
                },
                mount_path: "/home/jovyan/work".into(),
                read_only: false,
            },
            Mount {
                source: MountSource::Share {
                    name: "datasets".into(),
                    server: "nfs.lab".into(),
                    path: "/export/datasets".into(),
                    local_path: None,
                },
                mount_path: "/home/jovyan/shares/datasets".into(),
                read_only: true,
            },
        ];
        let (volumes, mounts) = pod_mounts("alice", &mounts);
        let v = serde_json::to_value(&volumes).unwrap();
        assert_eq!(
            v,
            json!([
                {"name": "vol-0", "persistentVolumeClaim": {"claimName": "vol.alice.data"}},
                {"name": "share-1", "nfs": {"server": "nfs.lab", "path": "/export/datasets", "readOnly": true}}
            ])
        );
        let m = serde_json::to_value(&mounts).unwrap();
        assert_eq!(
            m,
            json!([
                {"name": "vol-0", "mountPath": "/home/jovyan/work"},
                {"name": "share-1", "mountPath": "/home/jovyan/shares/datasets", "readOnly": true}
            ])
        );
    }

    /// Strict validation against the Kubernetes schemas of the oldest supported and the
    /// newest version (`pip install kubernetes-validate`; scripts/test.sh installs it).
    #[test]
    fn pvcs_and_pod_mounts_validate_against_the_kubernetes_schemas() {
        let tool = kcloud_testkit::require_tool("kubernetes-validate");
        let dir = tempfile::tempdir().unwrap();
        let mut settings = StorageSettings::default();
        let mut files = Vec::new();
        for (i, mode) in [AccessMode::ReadWriteOnce, AccessMode::ReadWriteMany]
            .into_iter()
            .enumerate()
        {
            let f = dir.path().join(format!("pvc-{i}.json"));
            std::fs::write(&f, build("kcloud", &row(mode), &settings).to_string()).unwrap();
            files.push(f);
            settings.storage_class = Some("nfs-client".into());
        }
        let (volumes, mounts) = pod_mounts(
            "alice",
            &[Mount {
                source: MountSource::Share {
                    name: "datasets".into(),
                    server: "nfs.lab".into(),
                    path: "/export/datasets".into(),
                    local_path: None,
                },
                mount_path: "/home/jovyan/shares/datasets".into(),
                read_only: true,
            }],
        );
        let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "mounts"},
            "spec": {"volumes": volumes, "containers": [{"name": "lab", "image": "x",
                "volumeMounts": mounts}]}});
        let f = dir.path().join("pod.json");
        std::fs::write(&f, pod.to_string()).unwrap();
        files.push(f);
        // 1.33, then the tool's default: the newest version it ships.
        for version in [Some("1.33.0"), None] {
            let out = std::process::Command::new(&tool)
                .arg("--strict")
                .args(version.map(|v| ["-k", v]).into_iter().flatten())
                .args(&files)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "kubernetes-validate {version:?}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}
