//! Validation of create requests and the quota rule.

use super::*;
use kcloud_core::launch::{MAX_ENTRIES, MAX_VALUE_BYTES};
use kcloud_core::settings::Images;
use kcloud_core::user::Quota;

fn req(v: serde_json::Value) -> CreateServer {
    serde_json::from_value(v).unwrap()
}

fn settings() -> Settings {
    Settings::load(None).unwrap()
}

#[test]
fn resources_from_preset_explicit_or_smallest() {
    let s = settings();
    let p = validate(
        &s,
        req(serde_json::json!({"name": "a", "preset": "medium"})),
    )
    .unwrap();
    assert_eq!((p.cpu_millis, p.memory_bytes), (8_000, 32 << 30));
    let p = validate(
        &s,
        req(serde_json::json!({"name": "a", "cpu": 1, "memory": "2Gi"})),
    )
    .unwrap();
    assert_eq!((p.cpu_millis, p.memory_bytes), (1_000, 2 << 30));
    let p = validate(&s, req(serde_json::json!({"name": "a"}))).unwrap();
    assert_eq!(
        (p.cpu_millis, p.memory_bytes),
        (2_000, 8 << 30),
        "smallest preset"
    );
    assert_eq!(
        p.image.as_deref(),
        Some("quay.io/jupyter/scipy-notebook:latest")
    );
    assert!(p.devices.is_none());
    for bad in [
        serde_json::json!({"name": "a", "preset": "huge"}),
        serde_json::json!({"name": "a", "preset": "small", "cpu": 1}),
        serde_json::json!({"name": "a", "cpu": 1}),
        serde_json::json!({"name": "A"}),
        serde_json::json!({"name": "a", "volumes": [{"volume": "v", "share": "s"}]}),
        serde_json::json!({"name": "a", "volumes": [{}]}),
        serde_json::json!({"name": "a", "volumes": [{"volume": "v", "mount_path": "/etc"}]}),
        serde_json::json!({"name": "a", "volumes": [{"share": "s", "mount_path": "/home/jovyan/../x"}]}),
        serde_json::json!({"name": "a", "devices": ["MIG-1"], "gpu_request": {"count": 1}}),
        serde_json::json!({"name": "a", "gpu_request": {"count": 1, "mig_profile": "1g.10gb"}}),
        serde_json::json!({"name": "a", "gpu_request": {}}),
        serde_json::json!({"name": "a", "devices": ["not-a-uuid"]}),
        serde_json::json!({"name": "a", "image": "docker.io/evil/miner:latest"}),
        serde_json::json!({"name": "a", "image": "quay.io/jupyter/x y"}),
        serde_json::json!({"name": "a", "env": {"1BAD": "x"}}),
        serde_json::json!({"name": "a", "env": {"A-B": "x"}}),
        serde_json::json!({"name": "a", "env": {"CUDA_VISIBLE_DEVICES": "0"}}),
        serde_json::json!({"name": "a", "env": {"KCLOUD_PORT": "1"}}),
        serde_json::json!({"name": "a", "env": {"A": "x\u{0}y"}}),
        serde_json::json!({"name": "a", "command": []}),
        serde_json::json!({"name": "a", "command": [""]}),
        serde_json::json!({"name": "a", "args": ["--ServerApp.token="]}),
        serde_json::json!({"name": "a", "args": ["--ip=0.0.0.0"]}),
        serde_json::json!({"name": "a", "args": ["--IdentityProvider.token", "x"]}),
        serde_json::json!({"name": "a", "args": ["--ServerApp.disable_check_xsrf=True"]}),
    ] {
        let shown = bad.to_string();
        assert!(
            matches!(validate(&s, req(bad)), Err(Error::BadRequest(_))),
            "{shown}"
        );
    }
    let big = "x".repeat(MAX_VALUE_BYTES + 1);
    assert!(matches!(
        validate(&s, req(serde_json::json!({"name": "a", "env": {"A": big}}))),
        Err(Error::TooLarge(_))
    ));
    let many: Vec<String> = (0..=MAX_ENTRIES).map(|i| i.to_string()).collect();
    assert!(validate(&s, req(serde_json::json!({"name": "a", "args": many}))).is_err());
}

#[test]
fn devices_and_launch_pass_through() {
    let s = settings();
    let p = validate(
        &s,
        req(serde_json::json!({
            "name": "a", "devices": ["MIG-x-1"], "image": "quay.io/jupyter/base-notebook:2025",
            "command": ["python3", "-m", "http.server", "{port}"], "args": ["--ip=0.0.0.0"],
            "env": {"WANDB_MODE": "offline"}, "volumes": []
        })),
    )
    .unwrap();
    assert_eq!(
        p.devices,
        Some(DeviceRequest::Exact(vec!["MIG-x-1".into()]))
    );
    assert_eq!(
        p.launch.args,
        ["--ip=0.0.0.0"],
        "custom commands take any args"
    );
    assert_eq!(p.launch.env["WANDB_MODE"], "offline");
    let p = validate(
        &s,
        req(serde_json::json!({"name": "a", "gpu_request": {"mig_profile": "1g.10gb", "model": "NVIDIA A100-SXM4-80GB"}})),
    )
    .unwrap();
    assert_eq!(
        p.devices,
        Some(DeviceRequest::Mig {
            profile: "1g.10gb".into(),
            model: Some("NVIDIA A100-SXM4-80GB".into())
        })
    );
    let p = validate(
        &s,
        req(serde_json::json!({"name": "a", "gpu_request": {"count": 2}, "devices": []})),
    )
    .unwrap_err();
    assert!(matches!(p, Error::BadRequest(_)));
    let p = validate(&s, req(serde_json::json!({"name": "a", "devices": []}))).unwrap();
    assert!(p.devices.is_none(), "an empty list is no devices");
}

#[test]
fn images_follow_the_allow_list() {
    let mut s = settings();
    s.images = Images {
        allowed: vec!["registry.lab/*".into()],
        default: Some("registry.lab/jupyter:1".into()),
    };
    let img = |i: &str| validate(&s, req(serde_json::json!({"name": "a", "image": i})));
    assert_eq!(
        img("registry.lab/torch:2").unwrap().image.as_deref(),
        Some("registry.lab/torch:2")
    );
    assert!(img("quay.io/jupyter/scipy-notebook:latest").is_err());
    s.images.allowed.clear();
    let img = |i: &str| validate(&s, req(serde_json::json!({"name": "a", "image": i})));
    assert!(
        img("registry.lab/jupyter:1").is_ok(),
        "the default is always allowed"
    );
    assert!(img("registry.lab/torch:2").is_err());
}

#[test]
fn quota_counts_servers_cpu_and_memory() {
    let s = settings();
    let plan = validate(
        &s,
        req(serde_json::json!({"name": "a", "cpu": 2, "memory": "4Gi"})),
    )
    .unwrap();
    let server = |status| Server {
        id: "x".into(),
        owner: "u".into(),
        name: "x".into(),
        status,
        reason: None,
        node: None,
        devices: vec![],
        cpu_millis: 30_000,
        memory_bytes: 1 << 30,
        image: None,
        launch: Launch::default(),
        created_at_ms: 0,
        ready_at_ms: None,
        last_activity_ms: 0,
        cull_exempt: false,
        pid: None,
        upstream: None,
        mounts: vec![],
    };
    let ask = |p: &Plan| Usage {
        servers: 1,
        cpu_millis: p.cpu_millis,
        memory_bytes: p.memory_bytes,
    };
    let check = |q: &Quota, mine: &[Server], p: &Plan| {
        q.effective(&s.default_quota)
            .check("u", usage(mine), ask(p))
    };
    let q = Quota::default();
    assert_eq!(q.effective(&s.default_quota).gpus, Some(8));
    check(&q, &[], &plan).unwrap();
    // 30 of 32 CPUs used by a running server: 2 more fit, 3 would not.
    assert!(check(&q, &[server(ServerStatus::Running)], &plan).is_ok());
    let big = Plan {
        cpu_millis: 3_000,
        ..validate(&s, req(serde_json::json!({"name": "b"}))).unwrap()
    };
    assert!(matches!(
        check(&q, &[server(ServerStatus::Running)], &big),
        Err(Error::QuotaExceeded(_))
    ));
    // A failed server uses no CPU but still counts as a server.
    assert!(check(&q, &[server(ServerStatus::Failed)], &big).is_ok());
    let one = Quota {
        servers: Some(1),
        ..Quota::default()
    };
    assert!(matches!(
        check(&one, &[server(ServerStatus::Failed)], &plan),
        Err(Error::QuotaExceeded(_))
    ));
    let gpus = Quota {
        gpus: Some(1),
        ..Quota::default()
    };
    assert_eq!(gpus.effective(&s.default_quota).gpus, Some(1));
}
