//! Groups end to end (local shape, simulated DGX A100, `sleep` servers): admins manage
//! them, members see their own; entitlements mark devices in the listing and refuse
//! servers and reservations with 403 naming what is missing; users in no group get
//! the settings' defaults; admins are never restricted; a group's quota holds for its
//! members together; every change is audited.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::app::TestApp;

fn sleeper(name: &str, devices: Value) -> Value {
    json!({"name": name, "cpu": "100m", "memory": "128Mi", "command": ["sleep", "600"],
           "devices": devices})
}

async fn devices(app: &TestApp, token: &str) -> Vec<Value> {
    let r = app
        .call(Method::GET, "/api/v1/gpus?limit=1000", Some(token), None)
        .await;
    assert_eq!(r.status, StatusCode::OK);
    r.body["items"].as_array().unwrap().clone()
}

fn free_with(list: &[Value], profile: Option<&str>) -> Vec<String> {
    list.iter()
        .filter(|d| d["available"] == true && d["profile"].as_str() == profile)
        .map(|d| d["uuid"].as_str().unwrap().to_owned())
        .collect()
}

async fn create(app: &TestApp, token: &str, user: &str, body: Value) -> (StatusCode, Value) {
    let r = app
        .call(
            Method::POST,
            &format!("/api/v1/users/{user}/servers"),
            Some(token),
            Some(body),
        )
        .await;
    (r.status, r.body)
}

fn message(body: &Value) -> String {
    body["error"]["message"].as_str().unwrap_or("").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_share_quotas_and_decide_what_members_may_use() {
    let app = TestApp::builder()
        .args(["--simulate", "dgx-a100-mig", "--stop-grace", "1s"])
        .settings(
            "[entitlements]\nide_profiles = [\"custom\"]\nmodels = [\"*A100*\"]\n\
             [[shares]]\nname = \"datasets\"\nserver = \"nfs.example.org\"\n\
             path = \"/exports/datasets\"\nroles = [\"user\"]\nlocal_path = \"{dir}\"\n\
             [[shares]]\nname = \"scratch\"\nserver = \"nfs.example.org\"\n\
             path = \"/exports/scratch\"\nroles = [\"user\"]\nlocal_path = \"{dir}\"\n",
        )
        .wait_for_gpus()
        .start()
        .await;
    let (admin, alice, bob) = app.users().await;
    let carol = app.add_user(&admin, "carol").await;

    // Admins create; bad input is refused and stores nothing.
    let lab_a = json!({"name": "lab-a", "description": "vision",
        "members": ["alice"], "quota": {"gpus": 2, "servers": 3},
        "entitlements": {"models": ["*A100*"], "mig_profiles": ["1g.10gb"],
                         "ide_profiles": ["custom", "jupyterlab"], "shares": ["scratch"]}});
    for (token, body, want) in [
        (&alice, lab_a.clone(), StatusCode::FORBIDDEN),
        (&admin, json!({"name": "Lab_A"}), StatusCode::BAD_REQUEST),
        (
            &admin,
            json!({"name": "lab-x", "members": ["nobody"]}),
            StatusCode::NOT_FOUND,
        ),
        (
            &admin,
            json!({"name": "lab-x", "quota": {"memory_bytes": (1u64 << 50) + 1}}),
            StatusCode::BAD_REQUEST,
        ),
        (
            &admin,
            json!({"name": "lab-x", "quota": [null, 2]}),
            StatusCode::BAD_REQUEST,
        ),
        (
            &admin,
            json!({"name": "lab-x", "entitlements": {"models": [""]}}),
            StatusCode::BAD_REQUEST,
        ),
        (
            &admin,
            json!({"name": "lab-x", "entitlements": {"gpus": ["x"]}}),
            StatusCode::BAD_REQUEST,
        ),
        (
            &admin,
            json!({"name": "lab-x", "colour": "red"}),
            StatusCode::BAD_REQUEST,
        ),
        (&admin, lab_a.clone(), StatusCode::CREATED),
        (&admin, lab_a.clone(), StatusCode::CONFLICT),
        (
            &admin,
            json!({"name": "lab-b", "members": ["bob"],
            "entitlements": {"mig_profiles": ["3g.40gb"]}}),
            StatusCode::CREATED,
        ),
    ] {
        let r = app
            .call(
                Method::POST,
                "/api/v1/groups",
                Some(token),
                Some(body.clone()),
            )
            .await;
        assert_eq!(r.status, want, "{body}: {}", r.body);
    }
    let r = app
        .call(Method::GET, "/api/v1/groups/lab-x", Some(&admin), None)
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "nothing stored");

    // Members see their own groups; others' do not exist for them.
    let r = app
        .call(Method::GET, "/api/v1/groups", Some(&alice), None)
        .await;
    let names: Vec<&str> = r
        .body
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["lab-a"]);
    let r = app
        .call(Method::GET, "/api/v1/groups/lab-b", Some(&alice), None)
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = app
        .call(Method::GET, "/api/v1/groups", Some(&admin), None)
        .await;
    assert_eq!(r.body.as_array().unwrap().len(), 2);
    let me = app
        .call(Method::GET, "/api/v1/me", Some(&alice), None)
        .await
        .body;
    assert_eq!(me["groups"], json!(["lab-a"]));
    assert_eq!(me["entitlements"]["mig_profiles"], json!(["1g.10gb"]));

    // The listing marks what a user may not use.
    let seen = devices(&app, &alice).await;
    let marked = |list: &[Value], profile: &str| {
        list.iter()
            .filter(|d| d["profile"] == profile)
            .all(|d| d["entitled"] == false)
    };
    assert!(marked(&seen, "3g.40gb"), "alice may not use 3g.40gb");
    assert!(
        seen.iter()
            .filter(|d| d["profile"] == "1g.10gb")
            .all(|d| d.get("entitled").is_none())
    );
    let bobs = devices(&app, &bob).await;
    assert!(marked(&bobs, "1g.10gb") && !marked(&bobs, "3g.40gb"));
    assert!(
        devices(&app, &admin)
            .await
            .iter()
            .all(|d| d.get("entitled").is_none())
    );

    // Shares: listed, browsed and mounted only where entitled.
    let shares = |token: String| {
        let app = &app;
        async move {
            let r = app
                .call(Method::GET, "/api/v1/shares", Some(&token), None)
                .await;
            r.body
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s["name"].as_str().unwrap().to_owned())
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(shares(alice.clone()).await, ["scratch"]);
    assert_eq!(shares(bob.clone()).await, ["datasets", "scratch"]);
    let r = app
        .call(
            Method::GET,
            "/api/v1/shares/datasets/files/",
            Some(&alice),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.body);
    assert!(message(&r.body).contains("shares"), "{}", r.body);
    let (st, body) = create(
        &app,
        &alice,
        "alice",
        json!({"name": "m", "cpu": "100m",
        "memory": "128Mi", "command": ["sleep", "600"], "volumes": [{"share": "datasets"}]}),
    )
    .await;
    assert_eq!(st, StatusCode::FORBIDDEN, "{body}");

    // Refused with 403 naming the entitlement; allowed otherwise.
    let three_g = free_with(&seen, Some("3g.40gb"));
    let one_g = free_with(&seen, Some("1g.10gb"));
    let (st, body) = create(&app, &alice, "alice", sleeper("a", json!([three_g[0]]))).await;
    assert_eq!(st, StatusCode::FORBIDDEN, "{body}");
    assert!(message(&body).contains("mig_profiles"), "{body}");
    let (st, body) = create(
        &app,
        &alice,
        "alice",
        json!({"name": "a", "profile": "code-server"}),
    )
    .await;
    assert_eq!(st, StatusCode::FORBIDDEN, "{body}");
    assert!(message(&body).contains("ide_profiles"), "{body}");
    let (st, body) = create(
        &app,
        &bob,
        "bob",
        json!({"name": "b", "cpu": "100m", "memory": "128Mi",
        "command": ["sleep", "600"], "gpu_request": {"count": 1}}),
    )
    .await;
    assert_eq!(
        st,
        StatusCode::CREATED,
        "bob's groups leave models open: {body}"
    );
    let r = app
        .call(
            Method::POST,
            "/api/v1/users/alice/reservations",
            Some(&alice),
            Some(json!({
            "devices": [three_g[0]],
            "start": kcloud_core::reservation::format_instant(kcloud_core::now_ms() + 3_600_000),
            "end": kcloud_core::reservation::format_instant(kcloud_core::now_ms() + 7_200_000)})),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.body);

    // The group's quota holds for its members together (2 devices).
    let (st, body) = create(&app, &alice, "alice", sleeper("a1", json!([one_g[0]]))).await;
    assert_eq!(st, StatusCode::CREATED, "{body}");
    // Bob's request took some whole GPU: pick one still free.
    let whole = free_with(&devices(&app, &alice).await, None);
    let (st, body) = create(&app, &alice, "alice", sleeper("a2", json!([whole[0]]))).await;
    assert_eq!(st, StatusCode::CREATED, "{body}");
    let r = app
        .call(
            Method::PATCH,
            "/api/v1/groups/lab-a",
            Some(&admin),
            Some(json!({"add_members": ["carol"]})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["members"], json!(["alice", "carol"]));
    let (st, body) = create(&app, &carol, "carol", sleeper("c1", json!([one_g[1]]))).await;
    assert_eq!(
        st,
        StatusCode::TOO_MANY_REQUESTS,
        "shared with alice: {body}"
    );
    assert!(message(&body).contains("group lab-a"), "{body}");
    // Admins are never restricted.
    let (st, body) = create(&app, &admin, "admin", sleeper("adm", json!([three_g[0]]))).await;
    assert_eq!(st, StatusCode::CREATED, "{body}");

    // Storage: the group's volumes together.
    let r = app
        .call(
            Method::PATCH,
            "/api/v1/groups/lab-a",
            Some(&admin),
            Some(json!({"quota": {"gpus": 2, "servers": 3, "storage_bytes": 3_000_000}})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    for (who, user, name, want) in [
        (&alice, "alice", "v1", StatusCode::CREATED),
        (&carol, "carol", "v2", StatusCode::TOO_MANY_REQUESTS),
        (&carol, "carol", "v3", StatusCode::CREATED),
    ] {
        let size = if name == "v3" { "1000000" } else { "2000000" };
        let r = app
            .call(
                Method::POST,
                &format!("/api/v1/users/{user}/volumes"),
                Some(who),
                Some(json!({"name": name, "size": size})),
            )
            .await;
        assert_eq!(r.status, want, "{user}/{name}: {}", r.body);
        if want == StatusCode::TOO_MANY_REQUESTS {
            assert!(message(&r.body).contains("group lab-a"), "{}", r.body);
        }
    }

    // A user in no group gets the settings' [entitlements].
    let r = app
        .call(
            Method::PATCH,
            "/api/v1/groups/lab-a",
            Some(&admin),
            Some(json!({"remove_members": ["carol"]})),
        )
        .await;
    assert_eq!(r.body["members"], json!(["alice"]));
    let me = app
        .call(Method::GET, "/api/v1/me", Some(&carol), None)
        .await
        .body;
    assert_eq!(me["groups"], json!([]));
    assert_eq!(me["entitlements"]["ide_profiles"], json!(["custom"]));
    let (st, body) = create(
        &app,
        &carol,
        "carol",
        json!({"name": "c2", "profile": "jupyterlab"}),
    )
    .await;
    assert_eq!(st, StatusCode::FORBIDDEN, "{body}");
    let (st, body) = create(&app, &carol, "carol", sleeper("c3", json!([one_g[1]]))).await;
    assert_eq!(st, StatusCode::CREATED, "{body}");

    // Deleting a group leaves its members, under the defaults.
    let r = app
        .call(Method::DELETE, "/api/v1/groups/lab-b", Some(&alice), None)
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let r = app
        .call(Method::DELETE, "/api/v1/groups/lab-b", Some(&admin), None)
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let r = app
        .call(Method::DELETE, "/api/v1/groups/lab-b", Some(&admin), None)
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let me = app
        .call(Method::GET, "/api/v1/me", Some(&bob), None)
        .await
        .body;
    assert_eq!(me["entitlements"]["models"], json!(["*A100*"]));

    let audit = app.state.auth.repo().audit_log(200).await.unwrap();
    for a in ["group_create", "group_update", "group_delete"] {
        assert!(audit.iter().any(|e| e.action == a), "{a}");
    }
    assert!(
        audit
            .iter()
            .any(|e| e.action == "group_update" && e.detail.contains("add=[carol]"))
    );
}
