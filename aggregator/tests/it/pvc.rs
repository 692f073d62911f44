//! Volume PVCs against a fake Kubernetes API server (`tower_test`): the exact calls for
//! create, delete, status and the PVC → PV → folder mapping, and how API errors map.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use http::{Method, StatusCode};
use kcloud_core::Error;
use kcloud_core::caller::Caller;
use kcloud_core::repo::{Repository, UserRepo, VolumeRepo};
use kcloud_core::settings::{Settings, StorageSettings};
use kcloud_core::user::{NewUser, Quota, Role};
use kcloud_core::volume::{AccessMode, VolumeRow, VolumeStatus};
use kcloud_provision::local::{LocalOptions, LocalProvisioner};
use kcloud_provision::volumes::pvc::{PvcClient, PvcVolumes, build, pvc_name, status};
use kcloud_service::locks::OwnerLocks;
use kcloud_service::servers::ReleaseOnExit;
use kcloud_service::volumes::{NewVolume, Volumes};
use kcloud_store::Store;
use kcloud_testkit::fake_kube::{FakeKube, fail, respond};
use serde_json::json;

const NS: &str = "kcloud-servers";
const PVCS: &str = "/api/v1/namespaces/kcloud-servers/persistentvolumeclaims";

fn client() -> (PvcClient, FakeKube) {
    let (client, fake) = FakeKube::new();
    (PvcClient::new(client, NS), fake)
}

fn row() -> VolumeRow {
    VolumeRow {
        owner: "alice".into(),
        name: "data".into(),
        size_bytes: 20 << 30,
        access_mode: AccessMode::ReadWriteMany,
        created_at_ms: 1_700_000_000_000,
    }
}

fn nfs_settings() -> StorageSettings {
    StorageSettings {
        storage_class: Some("nfs-csi".into()),
        nfs_backed: true,
        nfs_root: Some("/volumes".into()),
        ..StorageSettings::default()
    }
}

#[tokio::test]
async fn create_sends_the_built_pvc_and_maps_conflicts() {
    let (pvcs, mut api) = client();
    let pvc = build(NS, &row(), &nfs_settings());
    let sent = pvc.clone();
    let calls = tokio::spawn(async move {
        let (body, _, reply) = api.expect(Method::POST, PVCS).await;
        assert_eq!(body["metadata"]["name"], "vol.alice.data");
        assert_eq!(body["metadata"]["labels"]["kcloud.io/owner"], "alice");
        assert_eq!(body["spec"]["storageClassName"], "nfs-csi");
        assert_eq!(body["spec"]["accessModes"], json!(["ReadWriteMany"]));
        assert_eq!(
            body["spec"]["resources"]["requests"]["storage"],
            "21474836480"
        );
        let mut created = body.clone();
        created["metadata"]["uid"] = json!("uid-1");
        created["status"] = json!({"phase": "Pending"});
        respond(reply, StatusCode::CREATED, created);
        let (_, _, reply) = api.expect(Method::POST, PVCS).await;
        fail(reply, 409, "AlreadyExists");
        let (_, _, reply) = api.expect(Method::POST, PVCS).await;
        fail(reply, 500, "InternalError");
        api.no_more_calls().await;
    });
    pvcs.create(sent.clone()).await.unwrap();
    assert!(matches!(
        pvcs.create(sent.clone()).await,
        Err(Error::Conflict(_))
    ));
    assert!(matches!(
        pvcs.create(sent).await,
        Err(Error::Unavailable(_))
    ));
    drop(pvcs);
    calls.await.unwrap();
}

#[tokio::test]
async fn delete_get_and_folder_follow_the_pvc_to_its_pv() {
    let (pvcs, mut api) = client();
    let name = pvc_name("alice", "data");
    let one = format!("{PVCS}/{name}");
    let path = one.clone();
    let calls = tokio::spawn(async move {
        let (_, _, reply) = api.expect(Method::DELETE, &path).await;
        respond(
            reply,
            StatusCode::OK,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Success"}),
        );
        let (_, _, reply) = api.expect(Method::DELETE, &path).await;
        fail(reply, 404, "NotFound");
        // Status: from the PVC's phase.
        let mut bound = build(NS, &row(), &nfs_settings());
        bound["spec"]["volumeName"] = json!("pv-123");
        bound["status"] = json!({"phase": "Bound"});
        let (_, _, reply) = api.expect(Method::GET, &path).await;
        respond(reply, StatusCode::OK, bound.clone());
        // Folder: the PVC, then its PV (CSI subDir).
        let (_, _, reply) = api.expect(Method::GET, &path).await;
        respond(reply, StatusCode::OK, bound.clone());
        let (_, _, reply) = api
            .expect(Method::GET, "/api/v1/persistentvolumes/pv-123")
            .await;
        respond(
            reply,
            StatusCode::OK,
            json!({"apiVersion": "v1", "kind": "PersistentVolume",
                   "metadata": {"name": "pv-123"},
                   "spec": {"capacity": {"storage": "20Gi"}, "accessModes": ["ReadWriteMany"],
                            "csi": {"driver": "nfs.csi.k8s.io", "volumeHandle": "nfs#export#pvc-123",
                                    "volumeAttributes": {"server": "nfs", "share": "/export",
                                                         "subDir": "pvc-123"}}}}),
        );
        // An unbound PVC has no folder yet, and asks for no PV.
        let (_, _, reply) = api.expect(Method::GET, &path).await;
        respond(reply, StatusCode::OK, build(NS, &row(), &nfs_settings()));
        // A missing PVC.
        let (_, _, reply) = api.expect(Method::GET, &path).await;
        fail(reply, 404, "NotFound");
        api.no_more_calls().await;
    });
    assert!(pvcs.delete(&name).await.unwrap());
    assert!(!pvcs.delete(&name).await.unwrap(), "already gone");
    let pvc = pvcs.get(&name).await.unwrap().unwrap();
    assert_eq!(status(&pvc), VolumeStatus::Bound);
    let root = Path::new("/volumes");
    assert_eq!(
        pvcs.folder(&name, root, None).await.unwrap(),
        Some(PathBuf::from("/volumes/pvc-123"))
    );
    assert_eq!(pvcs.folder(&name, root, None).await.unwrap(), None);
    assert_eq!(pvcs.folder(&name, root, None).await.unwrap(), None);
    drop(pvcs);
    calls.await.unwrap();
}

/// The storage in the cluster shape: volumes become PVCs (RWX only on an NFS-backed
/// class), list reads their status in one call, delete removes the PVC before the
/// record, and a failing API leaves no record behind.
#[tokio::test]
async fn cluster_volumes_are_pvcs() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&dir.path().join("kcloud.db")).unwrap());
    store
        .create_user(NewUser {
            name: "alice".into(),
            password_hash: "$argon2id$unused".into(),
            role: Role::User,
            quota: Quota::default(),
        })
        .await
        .unwrap();
    let repo: Arc<dyn Repository> = store.clone();
    let settings = Settings::load(None).unwrap();
    let (pvcs, mut api) = client();
    // Servers are not this test's business: a local provisioner that runs none.
    let cluster = Arc::new(kcloud_cluster::Cluster::new(
        std::time::Duration::from_secs(30),
    ));
    let provisioner = Arc::new(
        LocalProvisioner::new(
            store.clone(),
            ReleaseOnExit::new(cluster),
            LocalOptions::new(dir.path()),
        )
        .expect("provisioner"),
    );
    let groups = kcloud_service::groups::Groups::new(repo.clone(), Arc::new(settings.clone()));
    let storage = Arc::new(Volumes::new(
        repo,
        Box::new(PvcVolumes::new(pvcs, NS, &settings.storage)),
        provisioner,
        &settings,
        Arc::new(OwnerLocks::default()),
        groups,
    ));
    let alice = Caller {
        name: "alice".into(),
        role: Role::User,
        session: None,
        grant: None,
    };
    let client_addr = std::net::IpAddr::from([127, 0, 0, 1]);
    let new = |name: &str, mode: Option<AccessMode>| NewVolume {
        name: name.into(),
        size: None,
        access_mode: mode,
    };
    let one = format!("{PVCS}/vol.alice.data");
    let calls = tokio::spawn(async move {
        let (body, _, reply) = api.expect(Method::POST, PVCS).await;
        assert_eq!(body["spec"]["accessModes"], json!(["ReadWriteOnce"]));
        assert!(body["spec"].get("storageClassName").is_none());
        respond(reply, StatusCode::CREATED, body.clone());
        let (_, _, reply) = api.expect(Method::GET, PVCS).await;
        let mut bound = body;
        bound["status"] = json!({"phase": "Bound"});
        respond(
            reply,
            StatusCode::OK,
            json!({"apiVersion": "v1", "kind": "PersistentVolumeClaimList",
                   "metadata": {"resourceVersion": "7"}, "items": [bound]}),
        );
        let (_, _, reply) = api.expect(Method::POST, PVCS).await;
        fail(reply, 500, "InternalError");
        let (_, _, reply) = api.expect(Method::DELETE, &one).await;
        respond(
            reply,
            StatusCode::OK,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Success"}),
        );
        api.no_more_calls().await;
    });
    assert!(matches!(
        storage
            .create(
                &alice,
                client_addr,
                "alice",
                new("rwx", Some(AccessMode::ReadWriteMany))
            )
            .await,
        Err(Error::BadRequest(_))
    ));
    let row = storage
        .create(&alice, client_addr, "alice", new("data", None))
        .await
        .unwrap();
    assert_eq!(row.access_mode, AccessMode::ReadWriteOnce);
    let list = storage.list(&alice, "alice").await.unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].status, VolumeStatus::Bound);
    assert!(matches!(
        storage
            .create(&alice, client_addr, "alice", new("broken", None))
            .await,
        Err(Error::Unavailable(_))
    ));
    assert_eq!(
        store.volumes(Some("alice")).await.unwrap().len(),
        1,
        "no record of the failed one"
    );
    assert!(
        matches!(
            storage.volume_files(&alice, "alice", "data").await,
            Err(Error::Unavailable(_))
        ),
        "no nfs_root: files cannot be reached"
    );
    storage
        .delete(&alice, client_addr, "alice", "data")
        .await
        .unwrap();
    assert!(store.volumes(None).await.unwrap().is_empty());
    drop(storage);
    calls.await.unwrap();
}
