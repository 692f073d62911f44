//! Volume PVCs against a fake Kubernetes API server (`tower_test`): the exact calls for
//! create, delete, status and the PVC → PV → folder mapping, and how API errors map.

use std::path::{Path, PathBuf};

use http::{Method, Request, Response, StatusCode};
use kcloud_aggregator::Error;
use kcloud_aggregator::config::StorageSettings;
use kcloud_aggregator::storage::pvc::{PvcClient, build, pvc_name, status};
use kcloud_aggregator::storage::{AccessMode, VolumeStatus};
use kcloud_aggregator::store::VolumeRow;
use kube::client::Body;
use serde_json::{Value, json};

const NS: &str = "kcloud-servers";
const PVCS: &str = "/api/v1/namespaces/kcloud-servers/persistentvolumeclaims";

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;
type Reply = tower_test::mock::SendResponse<Response<Body>>;

fn client() -> (PvcClient, Handle) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    (
        PvcClient::new(kube::Client::new(service, "default"), NS),
        handle,
    )
}

/// The next request, which must be `method` on `path`; its JSON body.
async fn expect(handle: &mut Handle, method: Method, path: &str) -> (Value, Reply) {
    let (req, reply) = handle
        .next_request()
        .await
        .unwrap_or_else(|| panic!("expected {method} {path}, but the client is gone"));
    assert_eq!(
        (req.method(), req.uri().path()),
        (&method, path),
        "unexpected call {} {}",
        req.method(),
        req.uri()
    );
    let bytes = req.into_body().collect_bytes().await.unwrap();
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap()
    };
    (body, reply)
}

fn respond(reply: Reply, status: StatusCode, body: Value) {
    let mut resp = Response::new(Body::from(serde_json::to_vec(&body).unwrap()));
    *resp.status_mut() = status;
    reply.send_response(resp);
}

fn fail(reply: Reply, code: u16, reason: &str) {
    respond(
        reply,
        StatusCode::from_u16(code).unwrap(),
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
               "message": format!("fake {reason}"), "reason": reason, "code": code}),
    );
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
        let (body, reply) = expect(&mut api, Method::POST, PVCS).await;
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
        let (_, reply) = expect(&mut api, Method::POST, PVCS).await;
        fail(reply, 409, "AlreadyExists");
        let (_, reply) = expect(&mut api, Method::POST, PVCS).await;
        fail(reply, 500, "InternalError");
        assert!(api.next_request().await.is_none(), "no more calls");
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
        let (_, reply) = expect(&mut api, Method::DELETE, &path).await;
        respond(
            reply,
            StatusCode::OK,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Success"}),
        );
        let (_, reply) = expect(&mut api, Method::DELETE, &path).await;
        fail(reply, 404, "NotFound");
        // Status: from the PVC's phase.
        let mut bound = build(NS, &row(), &nfs_settings());
        bound["spec"]["volumeName"] = json!("pv-123");
        bound["status"] = json!({"phase": "Bound"});
        let (_, reply) = expect(&mut api, Method::GET, &path).await;
        respond(reply, StatusCode::OK, bound.clone());
        // Folder: the PVC, then its PV (CSI subDir).
        let (_, reply) = expect(&mut api, Method::GET, &path).await;
        respond(reply, StatusCode::OK, bound.clone());
        let (_, reply) = expect(&mut api, Method::GET, "/api/v1/persistentvolumes/pv-123").await;
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
        let (_, reply) = expect(&mut api, Method::GET, &path).await;
        respond(reply, StatusCode::OK, build(NS, &row(), &nfs_settings()));
        // A missing PVC.
        let (_, reply) = expect(&mut api, Method::GET, &path).await;
        fail(reply, 404, "NotFound");
        assert!(api.next_request().await.is_none(), "no more calls");
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
    use kcloud_aggregator::storage::{NewVolume, Storage};
    let dir = tempfile::tempdir().unwrap();
    let store = kcloud_aggregator::store::Store::open(&dir.path().join("kcloud.db")).unwrap();
    let settings = kcloud_aggregator::config::Settings::load(None).unwrap();
    let (pvcs, mut api) = client();
    let storage = std::sync::Arc::new(Storage::cluster(store.clone(), &settings, pvcs, NS));
    let new = |name: &str, mode: Option<AccessMode>| NewVolume {
        name: name.into(),
        size: None,
        access_mode: mode,
    };
    let one = format!("{PVCS}/vol.alice.data");
    let calls = tokio::spawn(async move {
        let (body, reply) = expect(&mut api, Method::POST, PVCS).await;
        assert_eq!(body["spec"]["accessModes"], json!(["ReadWriteOnce"]));
        assert!(body["spec"].get("storageClassName").is_none());
        respond(reply, StatusCode::CREATED, body.clone());
        let (_, reply) = expect(&mut api, Method::GET, PVCS).await;
        let mut bound = body;
        bound["status"] = json!({"phase": "Bound"});
        respond(
            reply,
            StatusCode::OK,
            json!({"apiVersion": "v1", "kind": "PersistentVolumeClaimList",
                   "metadata": {"resourceVersion": "7"}, "items": [bound]}),
        );
        let (_, reply) = expect(&mut api, Method::POST, PVCS).await;
        fail(reply, 500, "InternalError");
        let (_, reply) = expect(&mut api, Method::DELETE, &one).await;
        respond(
            reply,
            StatusCode::OK,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Success"}),
        );
        assert!(api.next_request().await.is_none(), "no more calls");
    });
    assert!(matches!(
        storage
            .create("alice", new("rwx", Some(AccessMode::ReadWriteMany)), None)
            .await,
        Err(Error::BadRequest(_))
    ));
    let row = storage
        .create("alice", new("data", None), None)
        .await
        .unwrap();
    assert_eq!(row.access_mode, AccessMode::ReadWriteOnce);
    let list = storage.list(Some("alice"), &[]).await.unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].status, VolumeStatus::Bound);
    assert!(matches!(
        storage.create("alice", new("broken", None), None).await,
        Err(Error::Unavailable(_))
    ));
    assert_eq!(
        store.volumes(Some("alice")).await.unwrap().len(),
        1,
        "no record of the failed one"
    );
    assert!(
        matches!(
            storage.volume_root("alice", "data").await,
            Err(Error::Unavailable(_))
        ),
        "no nfs_root: files cannot be reached"
    );
    assert!(storage.delete("alice", "data").await.unwrap());
    assert!(store.volumes(None).await.unwrap().is_empty());
    drop(storage);
    calls.await.unwrap();
}
