//! The REST API over real HTTP: the authorization matrix, token attacks, bad input on
//! every endpoint, cookies and CSRF, inventory views with holder redaction, and a real
//! agent (simulated GPUs) pushing into the aggregator.

use std::time::Duration;

use jsonwebtoken::{EncodingKey, Header};
use kcloud_core::device::{DeviceRequest, Holder};
use kcloud_core::now_ms;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::app::{A_PW, ADMIN_PW, AGENT_TOKEN, Resp, TestApp};

/// The aggregator with no local agent (nodes push) and a 1 s heartbeat.
async fn start() -> TestApp {
    TestApp::builder()
        .args(["--local-agent", "off", "--agent-heartbeat", "1s"])
        .start()
        .await
}

fn now_s() -> u64 {
    now_ms() / 1000
}

/// A valid 2-GPU inventory: GPU 0 whole, GPU 1 in MIG mode with two instances.
fn inventory(node: &str, seq: u64) -> Value {
    let mem = json!({"total_bytes": 85899345920u64, "used_bytes": 0, "free_bytes": 85899345920u64});
    json!({
        "node": node, "boot_id": "boot-1", "seq": seq, "agent_version": "0.1.0",
        "collected_at_ms": now_ms(), "simulated": true,
        "nvml": {"up": true, "driver_version": "550.54.15"},
        "host": {"hostname": node, "cpu_count": 64, "cpu_utilization_percent": 12.5,
                 "memory_total_bytes": 1u64 << 40, "memory_used_bytes": 1u64 << 38,
                 "load_average": [1.0, 1.0, 1.0], "uptime_seconds": 1000},
        "gpus": [
            {"index": 0, "uuid": format!("GPU-{node}-0"), "model": "NVIDIA A100-SXM4-80GB",
             "pci_bus_id": "00000000:07:00.0", "memory": mem, "utilization_gpu_percent": 10,
             "mig_mode": {"current": false, "pending": false}},
            {"index": 1, "uuid": format!("GPU-{node}-1"), "model": "NVIDIA A100-SXM4-80GB",
             "pci_bus_id": "00000000:0F:00.0", "memory": mem,
             "mig_mode": {"current": true, "pending": true},
             "mig_instances": [
                {"uuid": format!("MIG-{node}-1a"), "parent_uuid": format!("GPU-{node}-1"), "index": 0,
                 "profile": "3g.40gb", "gpu_instance_id": 1, "compute_instance_id": 0},
                {"uuid": format!("MIG-{node}-1b"), "parent_uuid": format!("GPU-{node}-1"), "index": 1,
                 "profile": "1g.10gb", "gpu_instance_id": 9, "compute_instance_id": 0}
             ]}
        ]
    })
}

fn assert_error_shape(r: &Resp) {
    let code = r.body["error"]["code"].as_str();
    let message = r.body["error"]["message"].as_str();
    assert!(
        code.is_some_and(|c| !c.is_empty()) && message.is_some(),
        "error shape: {r:?}"
    );
}

#[tokio::test]
async fn authorization_matrix() {
    let app = start().await;
    let (admin, a, b) = app.users().await;
    assert_eq!(
        app.push("node-1", inventory("node-1", 1)).await.status,
        StatusCode::OK
    );
    let agent = AGENT_TOKEN.to_owned();
    let callers: [(&str, Option<&str>); 5] = [
        ("anonymous", None),
        ("alice", Some(&a)),
        ("bob", Some(&b)),
        ("admin", Some(&admin)),
        ("agent", Some(&agent)),
    ];
    use StatusCode as S;
    // (method, path, body, expected status for anonymous, alice, bob, admin, agent)
    type Row = (Method, String, Option<Value>, [S; 5]);
    let user_only = [S::UNAUTHORIZED, S::OK, S::OK, S::OK, S::UNAUTHORIZED];
    let admin_only = [
        S::UNAUTHORIZED,
        S::FORBIDDEN,
        S::FORBIDDEN,
        S::OK,
        S::UNAUTHORIZED,
    ];
    let public = [S::OK; 5];
    let mut rows: Vec<Row> = vec![
        (Method::GET, "/api/v1/me".into(), None, user_only),
        (Method::GET, "/api/v1/users".into(), None, admin_only),
        (
            Method::GET,
            "/api/v1/users/alice".into(),
            None,
            [S::UNAUTHORIZED, S::OK, S::NOT_FOUND, S::OK, S::UNAUTHORIZED],
        ),
        (
            Method::GET,
            "/api/v1/users/bob".into(),
            None,
            [S::UNAUTHORIZED, S::NOT_FOUND, S::OK, S::OK, S::UNAUTHORIZED],
        ),
        (
            Method::PATCH,
            "/api/v1/users/alice".into(),
            Some(json!({"quota": {"gpus": 3}})),
            admin_only,
        ),
        (Method::GET, "/api/v1/nodes".into(), None, user_only),
        (Method::GET, "/api/v1/nodes/node-1".into(), None, user_only),
        (Method::GET, "/api/v1/gpus".into(), None, user_only),
        (Method::GET, "/api/v1/gpus/summary".into(), None, user_only),
        (Method::GET, "/api/v1/presets".into(), None, user_only),
        (Method::GET, "/api/v1/groups".into(), None, user_only),
        (
            Method::POST,
            "/api/v1/groups".into(),
            Some(json!({"name": "lab", "members": ["bob"]})),
            [
                S::UNAUTHORIZED,
                S::FORBIDDEN,
                S::FORBIDDEN,
                S::CREATED,
                S::UNAUTHORIZED,
            ],
        ),
        (
            Method::GET,
            "/api/v1/groups/lab".into(),
            None,
            [S::UNAUTHORIZED, S::NOT_FOUND, S::OK, S::OK, S::UNAUTHORIZED],
        ),
        (
            Method::PATCH,
            "/api/v1/groups/lab".into(),
            Some(json!({"description": "x"})),
            admin_only,
        ),
        (Method::GET, "/api/v1/tokens".into(), None, admin_only),
        (
            Method::GET,
            "/api/v1/users/alice/tokens".into(),
            None,
            [S::UNAUTHORIZED, S::OK, S::NOT_FOUND, S::OK, S::UNAUTHORIZED],
        ),
        (Method::GET, "/api/v1/auth/providers".into(), None, public),
        (Method::GET, "/api/v1/usage".into(), None, user_only),
        (
            Method::GET,
            "/api/v1/usage/efficiency".into(),
            None,
            user_only,
        ),
        (
            Method::GET,
            "/api/v1/usage/efficiency?user=bob".into(),
            None,
            [S::UNAUTHORIZED, S::NOT_FOUND, S::OK, S::OK, S::UNAUTHORIZED],
        ),
        (
            Method::POST,
            "/api/v1/users/alice/servers/none/keep".into(),
            None,
            [
                S::UNAUTHORIZED,
                S::NOT_FOUND,
                S::NOT_FOUND,
                S::NOT_FOUND,
                S::UNAUTHORIZED,
            ],
        ),
        (
            Method::PUT,
            "/api/v1/nodes/node-1/inventory".into(),
            Some(inventory("node-1", 2)),
            [
                S::UNAUTHORIZED,
                S::FORBIDDEN,
                S::FORBIDDEN,
                S::FORBIDDEN,
                S::OK,
            ],
        ),
        (Method::GET, "/healthz".into(), None, public),
        (Method::GET, "/readyz".into(), None, public),
        (Method::GET, "/metrics".into(), None, public),
        (Method::GET, "/api/openapi.json".into(), None, public),
    ];
    // Creating and deleting users: a distinct target per caller so only the caller
    // decides the outcome.
    for (i, (who, _)) in callers.iter().enumerate() {
        let name = format!("new-{who}");
        let mut expect = [
            S::UNAUTHORIZED,
            S::FORBIDDEN,
            S::FORBIDDEN,
            S::CREATED,
            S::UNAUTHORIZED,
        ];
        expect.rotate_left(0);
        let mut create = (
            Method::POST,
            "/api/v1/users".into(),
            Some(json!({"name": name, "password": "a-long-enough-password"})),
            [S::IM_A_TEAPOT; 5],
        );
        create.3[i] = expect[i];
        rows.push(create);
    }
    for (i, (who, _)) in callers.iter().enumerate() {
        let victim = format!("victim-{who}");
        let r = app
            .call(
                Method::POST,
                "/api/v1/users",
                Some(&admin),
                Some(json!({"name": victim, "password": "a-long-enough-password"})),
            )
            .await;
        assert_eq!(r.status, S::CREATED);
        let expect = [
            S::UNAUTHORIZED,
            S::FORBIDDEN,
            S::FORBIDDEN,
            S::NO_CONTENT,
            S::UNAUTHORIZED,
        ];
        let mut row = (
            Method::DELETE,
            format!("/api/v1/users/{victim}"),
            None,
            [S::IM_A_TEAPOT; 5],
        );
        row.3[i] = expect[i];
        rows.push(row);
    }

    for (method, path, body, expected) in rows {
        for (i, (who, token)) in callers.iter().enumerate() {
            if expected[i] == S::IM_A_TEAPOT {
                continue; // row applies to another caller
            }
            let r = app.call(method.clone(), &path, *token, body.clone()).await;
            assert_eq!(r.status, expected[i], "{who} {method} {path}: {:?}", r.body);
            if r.status.is_client_error() {
                assert_error_shape(&r);
            }
        }
    }
    // Deleted victims are gone; no one else's deletion happened.
    let users = app
        .call(Method::GET, "/api/v1/users", Some(&admin), None)
        .await
        .body;
    let names: Vec<&str> = users
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["name"].as_str().unwrap())
        .collect();
    assert!(!names.contains(&"victim-admin"));
    for who in ["anonymous", "alice", "bob", "agent"] {
        assert!(
            names.contains(&format!("victim-{who}").as_str()),
            "{names:?}"
        );
        assert!(!names.contains(&format!("new-{who}").as_str()));
    }
    assert!(names.contains(&"new-admin"));
}

fn craft(key: &[u8], claims: Value) -> String {
    jsonwebtoken::encode(
        &Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(key),
    )
    .unwrap()
}

#[tokio::test]
async fn token_attacks_are_refused() {
    let app = start().await;
    let (_admin, alice, _bob) = app.users().await;
    let key = app.signing_key();
    let me = |t: String| {
        let app = &app;
        async move {
            app.call(Method::GET, "/api/v1/me", Some(&t), None)
                .await
                .status
        }
    };
    use base64::Engine;
    let b64 = |v: Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    let payload_of = |token: &str| -> Value {
        let payload = token.split('.').nth(1).unwrap();
        serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(payload)
                .unwrap(),
        )
        .unwrap()
    };
    // Alice's live session: a token must belong to one.
    let fam = payload_of(&alice)["fam"].as_str().unwrap().to_owned();
    let claims = |sub: &str, role: &str, typ: &str, exp: u64| json!({"sub": sub, "role": role, "typ": typ, "iat": now_s() - 10, "exp": exp, "jti": "j1", "fam": fam});

    // A token we craft with the real key works: the refusals below are about the attack.
    assert_eq!(
        me(craft(
            &key,
            claims("alice", "user", "access", now_s() + 300)
        ))
        .await,
        StatusCode::OK
    );
    let mut no_session = claims("alice", "user", "access", now_s() + 300);
    no_session.as_object_mut().unwrap().remove("fam");
    assert_eq!(
        me(craft(&key, no_session)).await,
        StatusCode::UNAUTHORIZED,
        "a token of no session"
    );
    let mut other_session = claims("alice", "user", "access", now_s() + 300);
    other_session["fam"] = json!("made-up-session");
    assert_eq!(
        me(craft(&key, other_session)).await,
        StatusCode::UNAUTHORIZED,
        "a session that does not exist"
    );
    assert_eq!(
        me(craft(
            &key,
            claims("admin", "admin", "access", now_s() + 300)
        ))
        .await,
        StatusCode::UNAUTHORIZED,
        "another user's session"
    );
    let mut proxy = claims("alice", "user", "proxy", now_s() + 300);
    proxy["own"] = json!("alice");
    proxy["srv"] = json!("lab");
    assert_eq!(
        me(craft(&key, proxy)).await,
        StatusCode::UNAUTHORIZED,
        "a server's cookie is no API token"
    );
    let none = format!(
        "{}.{}.",
        b64(json!({"alg": "none", "typ": "JWT"})),
        b64(claims("admin", "admin", "access", now_s() + 300))
    );
    assert_eq!(me(none).await, StatusCode::UNAUTHORIZED, "alg none");
    assert_eq!(
        me(craft(
            b"another-key-another-key-another-key!",
            claims("alice", "user", "access", now_s() + 300)
        ))
        .await,
        StatusCode::UNAUTHORIZED,
        "wrong key"
    );
    assert_eq!(
        me(craft(&key, claims("alice", "user", "access", now_s() - 60))).await,
        StatusCode::UNAUTHORIZED,
        "expired"
    );
    let hs384 = jsonwebtoken::encode(
        &Header::new(jsonwebtoken::Algorithm::HS384),
        &claims("alice", "user", "access", now_s() + 300),
        &EncodingKey::from_secret(&key),
    )
    .unwrap();
    assert_eq!(
        me(hs384).await,
        StatusCode::UNAUTHORIZED,
        "algorithm is pinned"
    );

    // Tampered payload: alice's real token with sub=admin, signature kept.
    let parts: Vec<&str> = alice.split('.').collect();
    let mut forged = payload_of(&alice);
    forged["sub"] = json!("admin");
    forged["role"] = json!("admin");
    let tampered = format!("{}.{}.{}", parts[0], b64(forged), parts[2]);
    assert_eq!(me(tampered).await, StatusCode::UNAUTHORIZED, "tampered");

    // Refresh tokens are not access tokens, and the reverse.
    let session = app.login("alice", A_PW).await;
    let refresh = session["refresh_token"].as_str().unwrap().to_owned();
    let access = session["access_token"].as_str().unwrap().to_owned();
    assert_eq!(
        me(refresh.clone()).await,
        StatusCode::UNAUTHORIZED,
        "refresh as access"
    );
    let r = app
        .call(
            Method::POST,
            "/api/v1/auth/refresh",
            None,
            Some(json!({"refresh_token": access})),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "access as refresh");

    // Rotation: the old refresh token is spent; replaying it revokes the family, so the
    // token issued by the rotation stops working too.
    let r = app
        .call(
            Method::POST,
            "/api/v1/auth/refresh",
            None,
            Some(json!({"refresh_token": refresh})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let rotated = r.body["refresh_token"].as_str().unwrap().to_owned();
    assert_ne!(rotated, refresh);
    let r = app
        .call(
            Method::POST,
            "/api/v1/auth/refresh",
            None,
            Some(json!({"refresh_token": refresh})),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "reuse");
    let r = app
        .call(
            Method::POST,
            "/api/v1/auth/refresh",
            None,
            Some(json!({"refresh_token": rotated})),
        )
        .await;
    assert_eq!(
        r.status,
        StatusCode::UNAUTHORIZED,
        "family revoked after reuse"
    );

    // Logout revokes.
    let session = app.login("alice", A_PW).await;
    let refresh = session["refresh_token"].as_str().unwrap().to_owned();
    let r = app
        .call(
            Method::POST,
            "/api/v1/auth/logout",
            None,
            Some(json!({"refresh_token": refresh})),
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let r = app
        .call(
            Method::POST,
            "/api/v1/auth/refresh",
            None,
            Some(json!({"refresh_token": refresh})),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "after logout");
}

#[tokio::test]
async fn disabling_a_user_ends_their_access_at_once() {
    let app = start().await;
    let (admin, alice, _) = app.users().await;
    let r = app
        .call(
            Method::PATCH,
            "/api/v1/users/alice",
            Some(&admin),
            Some(json!({"disabled": true})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        app.call(Method::GET, "/api/v1/me", Some(&alice), None)
            .await
            .status,
        StatusCode::UNAUTHORIZED
    );
    let r = app
        .call(
            Method::POST,
            "/api/v1/auth/login",
            None,
            Some(json!({"username": "alice", "password": A_PW})),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    // The last admin cannot be demoted or deleted away.
    let r = app
        .call(
            Method::PATCH,
            "/api/v1/users/admin",
            Some(&admin),
            Some(json!({"role": "user"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{:?}", r.body);
    assert_eq!(
        app.call(Method::DELETE, "/api/v1/users/admin", Some(&admin), None)
            .await
            .status,
        StatusCode::CONFLICT
    );
}

#[tokio::test]
async fn login_is_rate_limited_and_answers_alike_for_unknown_users() {
    let app = start().await;
    let wrong = |user: &'static str| {
        let app = &app;
        async move {
            app.call(
                Method::POST,
                "/api/v1/auth/login",
                None,
                Some(json!({"username": user, "password": "wrong-password-123"})),
            )
            .await
        }
    };
    let known = wrong("admin").await;
    let unknown = wrong("nobody").await;
    assert_eq!(known.status, StatusCode::UNAUTHORIZED);
    assert_eq!(known.body, unknown.body, "no hint which users exist");
    let mut last = None;
    for _ in 0..6 {
        last = Some(wrong("admin").await);
    }
    let last = last.unwrap();
    assert_eq!(last.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(last.headers.get("retry-after").is_some());
    assert_error_shape(&last);
    // The right password is refused too while limited.
    let r = app
        .call(
            Method::POST,
            "/api/v1/auth/login",
            None,
            Some(json!({"username": "admin", "password": ADMIN_PW})),
        )
        .await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
}

#[tokio::test]
async fn browser_session_uses_httponly_cookies_and_csrf() {
    let app = start().await;
    let r = app
        .call(
            Method::POST,
            "/api/v1/auth/login",
            None,
            Some(json!({"username": "admin", "password": ADMIN_PW})),
        )
        .await;
    let cookies: Vec<String> = r
        .headers
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .collect();
    let find = |name: &str| {
        cookies
            .iter()
            .find(|c| c.starts_with(&format!("{name}=")))
            .cloned()
            .unwrap()
    };
    // Host-only (no Domain) and `__Host-` prefixed: no user origin can set one.
    assert!(cookies.iter().all(|c| c.starts_with("__Host-kcloud_")
        && c.contains("Path=/;")
        && c.contains("Secure")
        && !c.to_ascii_lowercase().contains("domain")));
    let access = find("__Host-kcloud_access");
    assert!(
        access.contains("HttpOnly") && access.contains("SameSite=Lax"),
        "{access}"
    );
    let refresh = find("__Host-kcloud_refresh");
    assert!(refresh.contains("HttpOnly") && refresh.contains("SameSite=Strict"));
    let csrf_cookie = find("__Host-kcloud_csrf");
    assert!(!csrf_cookie.contains("HttpOnly"), "the page must read it");
    let value = |c: &str| {
        c.split(';')
            .next()
            .unwrap()
            .split_once('=')
            .unwrap()
            .1
            .to_owned()
    };
    let cookie_header = format!(
        "__Host-kcloud_access={}; __Host-kcloud_csrf={}",
        value(&access),
        value(&csrf_cookie)
    );
    // A cookie without the prefix (one another origin could have set) is not a session.
    let tossed = app
        .client
        .get(format!("{}/api/v1/me", app.base))
        .header("cookie", format!("kcloud_access={}", value(&access)))
        .send()
        .await
        .unwrap();
    assert_eq!(tossed.status(), StatusCode::UNAUTHORIZED);

    let get = app
        .client
        .get(format!("{}/api/v1/me", app.base))
        .header("cookie", &cookie_header)
        .send()
        .await
        .unwrap();
    assert_eq!(get.status(), StatusCode::OK);
    let body = json!({"name": "carol", "password": "carol-password-123"});
    let no_csrf = app
        .client
        .post(format!("{}/api/v1/users", app.base))
        .header("cookie", &cookie_header)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(
        no_csrf.status(),
        StatusCode::FORBIDDEN,
        "cookie write without CSRF header"
    );
    let wrong_csrf = app
        .client
        .post(format!("{}/api/v1/users", app.base))
        .header("cookie", &cookie_header)
        .header("x-csrf-token", "guess")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(wrong_csrf.status(), StatusCode::FORBIDDEN);
    let ok = app
        .client
        .post(format!("{}/api/v1/users", app.base))
        .header("cookie", &cookie_header)
        .header("x-csrf-token", value(&csrf_cookie))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), StatusCode::CREATED);
}

#[tokio::test]
async fn bad_input_gets_a_clear_4xx_and_changes_nothing() {
    let app = start().await;
    let (admin, _a, _b) = app.users().await;
    let users_before = app
        .call(Method::GET, "/api/v1/users", Some(&admin), None)
        .await
        .body;
    let huge = vec![b'x'; 2 << 20];
    let mut huge_json = b"{\"name\":\"".to_vec();
    huge_json.extend(std::iter::repeat_n(b'a', 2 << 20));
    huge_json.extend(b"\"}");
    let bodies: Vec<(&str, Vec<u8>)> = vec![
        ("malformed", b"{\"name\": ".to_vec()),
        ("not json", b"hello".to_vec()),
        ("wrong types", br#"{"name": 7, "password": ["x"]}"#.to_vec()),
        (
            "unknown field",
            br#"{"name": "dave", "password": "long-enough-pass", "admin": true}"#.to_vec(),
        ),
        (
            "unicode name",
            r#"{"name": "zoë-😀", "password": "long-enough-pass"}"#
                .as_bytes()
                .to_vec(),
        ),
        (
            "upper case",
            br#"{"name": "Dave", "password": "long-enough-pass"}"#.to_vec(),
        ),
        (
            "long name",
            format!(
                r#"{{"name": "{}", "password": "long-enough-pass"}}"#,
                "a".repeat(300)
            )
            .into_bytes(),
        ),
        (
            "short password",
            br#"{"name": "dave", "password": "short"}"#.to_vec(),
        ),
        (
            "absurd quota",
            br#"{"name": "dave", "password": "long-enough-pass", "quota": {"gpus": 99999999999}}"#
                .to_vec(),
        ),
        (
            "negative quota",
            br#"{"name": "dave", "password": "long-enough-pass", "quota": {"gpus": -1}}"#.to_vec(),
        ),
        (
            "bad role",
            br#"{"name": "dave", "password": "long-enough-pass", "role": "root"}"#.to_vec(),
        ),
        ("oversized", huge.clone()),
        ("oversized json", huge_json.clone()),
    ];
    for (what, body) in &bodies {
        let r = app
            .raw(Method::POST, "/api/v1/users", Some(&admin), body.clone())
            .await;
        assert!(
            r.status.is_client_error(),
            "POST /users {what}: {:?}",
            r.status
        );
        assert_error_shape(&r);
        if what.starts_with("oversized") {
            assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE, "{what}");
        }
    }
    let users_after = app
        .call(Method::GET, "/api/v1/users", Some(&admin), None)
        .await
        .body;
    assert_eq!(users_before, users_after, "nothing stored");

    for (what, body) in [
        ("malformed", b"{".to_vec()),
        (
            "wrong types",
            br#"{"username": 1, "password": null}"#.to_vec(),
        ),
        ("oversized", huge.clone()),
    ] {
        let r = app
            .raw(Method::POST, "/api/v1/auth/login", None, body)
            .await;
        assert!(r.status.is_client_error(), "login {what}: {:?}", r.status);
        assert_error_shape(&r);
    }
    for path in ["/api/v1/auth/refresh", "/api/v1/auth/logout"] {
        for body in [
            b"{".to_vec(),
            br#"{"refresh_token": 5}"#.to_vec(),
            br#"{"refresh_token": "x.y.z"}"#.to_vec(),
            huge.clone(),
        ] {
            let r = app.raw(Method::POST, path, None, body).await;
            assert!(r.status.is_client_error(), "{path}: {:?}", r.status);
            assert_error_shape(&r);
        }
    }
    for (what, body) in [
        ("wrong types", br#"{"disabled": "yes"}"#.to_vec()),
        (
            "absurd quota",
            br#"{"quota": {"memory_bytes": 1e30}}"#.to_vec(),
        ),
        ("unknown field", br#"{"name": "x"}"#.to_vec()),
    ] {
        let r = app
            .raw(Method::PATCH, "/api/v1/users/alice", Some(&admin), body)
            .await;
        assert!(r.status.is_client_error(), "PATCH {what}: {:?}", r.status);
        assert_error_shape(&r);
    }
    assert_eq!(
        users_before,
        app.call(Method::GET, "/api/v1/users", Some(&admin), None)
            .await
            .body
    );

    // Inventory pushes.
    let token = AGENT_TOKEN.to_owned();
    let mut wrong_node = inventory("node-2", 1);
    wrong_node["node"] = json!("node-3");
    let mut absurd = inventory("node-2", 1);
    absurd["gpus"][0]["utilization_gpu_percent"] = json!(5000);
    let mut overflow = inventory("node-2", 1);
    overflow["gpus"][0]["index"] = json!(1u64 << 40);
    let mut dup = inventory("node-2", 1);
    dup["gpus"][1]["uuid"] = dup["gpus"][0]["uuid"].clone();
    let mut nan = inventory("node-2", 1);
    nan["gpus"][0]["power_watts"] = json!(-5.0);
    let mut many = inventory("node-2", 1);
    let gpu = many["gpus"][0].clone();
    many["gpus"] = Value::Array(
        (0..300)
            .map(|i| {
                let mut g = gpu.clone();
                g["uuid"] = json!(format!("GPU-x-{i}"));
                g
            })
            .collect(),
    );
    for (what, node, body) in [
        ("malformed", "node-2", b"{\"node\":".to_vec()),
        ("wrong types", "node-2", br#"{"node": 1}"#.to_vec()),
        (
            "mismatched node",
            "node-2",
            wrong_node.to_string().into_bytes(),
        ),
        (
            "absurd utilization",
            "node-2",
            absurd.to_string().into_bytes(),
        ),
        (
            "overflowing index",
            "node-2",
            overflow.to_string().into_bytes(),
        ),
        ("duplicate uuid", "node-2", dup.to_string().into_bytes()),
        ("negative power", "node-2", nan.to_string().into_bytes()),
        ("too many gpus", "node-2", many.to_string().into_bytes()),
        (
            "unicode node",
            "n%C3%B6de",
            inventory("nöde", 1).to_string().into_bytes(),
        ),
        ("oversized", "node-2", huge.clone()),
    ] {
        let r = app
            .raw(
                Method::PUT,
                &format!("/api/v1/nodes/{node}/inventory"),
                Some(&token),
                body,
            )
            .await;
        assert!(
            r.status.is_client_error(),
            "push {what}: {:?} {:?}",
            r.status,
            r.body
        );
        assert_error_shape(&r);
    }
    let nodes = app
        .call(Method::GET, "/api/v1/nodes", Some(&admin), None)
        .await
        .body;
    assert_eq!(nodes, json!([]), "no bad push was stored");

    // Query strings.
    for q in [
        "limit=abc",
        "available=maybe",
        "kind=tpu",
        "cursor=%00%ff",
        "cursor=not-a-cursor",
    ] {
        let r = app
            .call(
                Method::GET,
                &format!("/api/v1/gpus?{q}"),
                Some(&admin),
                None,
            )
            .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{q}: {:?}", r.body);
        assert_error_shape(&r);
    }
    let r = app
        .call(Method::GET, "/api/v1/no-such-thing", Some(&admin), None)
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_error_shape(&r);
    let r = app
        .call(Method::DELETE, "/api/v1/nodes", Some(&admin), None)
        .await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_error_shape(&r);
}

#[tokio::test]
async fn inventory_views_filter_page_and_redact_holders() {
    let app = start().await;
    let (admin, alice, bob) = app.users().await;
    for n in 1..=3 {
        let r = app
            .push(&format!("node-{n}"), inventory(&format!("node-{n}"), 1))
            .await;
        assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
        assert_eq!(r.body["stored"], true);
    }
    // Idempotent: the same sequence again is accepted and ignored.
    let r = app.push("node-1", inventory("node-1", 1)).await;
    assert_eq!(
        (r.status, r.body["stored"].clone()),
        (StatusCode::OK, json!(false))
    );

    // Alice holds a MIG slice on node-2.
    let res = app
        .state
        .cluster
        .claim(
            Holder {
                user: "alice".into(),
                server: "nb1".into(),
            },
            &DeviceRequest::Exact(vec!["MIG-node-2-1a".into()]),
            None,
            now_ms(),
            &Default::default(),
        )
        .unwrap();
    app.state.cluster.ledger().commit(res.id).unwrap();

    let list = |token: String, q: &'static str| {
        let app = &app;
        async move {
            app.call(
                Method::GET,
                &format!("/api/v1/gpus?{q}"),
                Some(&token),
                None,
            )
            .await
            .body
        }
    };
    let held = |body: &Value| {
        body["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["uuid"] == "MIG-node-2-1a")
            .cloned()
            .unwrap()
    };
    let all = list(admin.clone(), "limit=1000").await;
    assert_eq!(
        all["items"].as_array().unwrap().len(),
        3 * 4,
        "2 GPUs + 2 MIG instances per node"
    );
    assert_eq!(
        held(&all)["holder"],
        json!({"user": "alice", "server": "nb1"})
    );
    assert_eq!(held(&all)["available"], false);
    assert_eq!(
        held(&list(alice.clone(), "limit=1000").await)["holder"]["user"],
        "alice"
    );
    let seen_by_bob = held(&list(bob.clone(), "limit=1000").await);
    assert!(
        seen_by_bob.get("holder").is_none() || seen_by_bob["holder"].is_null(),
        "{seen_by_bob}"
    );
    assert_eq!(seen_by_bob["available"], false);
    assert_eq!(
        seen_by_bob["in_use"], true,
        "others' holdings show as in use"
    );
    assert_eq!(held(&all)["in_use"], true);

    // Filters and paging.
    let free = list(alice.clone(), "available=true&limit=1000").await;
    let free_items = free["items"].as_array().unwrap();
    // Per node: GPU 0 and two MIG slices are allocatable, the MIG-mode GPU is not.
    assert_eq!(free_items.len(), 3 * 3 - 1);
    assert!(free_items.iter().all(|d| d["available"] == true));
    let migs = list(alice.clone(), "profile=3g.40gb&limit=1000").await;
    assert_eq!(migs["items"].as_array().unwrap().len(), 3);
    let node2 = list(alice.clone(), "node=node-2&kind=mig&limit=1000").await;
    assert_eq!(node2["items"].as_array().unwrap().len(), 2);
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/api/v1/gpus?limit=5&cursor={c}"),
            None => "/api/v1/gpus?limit=5".into(),
        };
        let page = app.call(Method::GET, &path, Some(&alice), None).await.body;
        let items = page["items"].as_array().unwrap();
        assert!(items.len() <= 5);
        seen.extend(items.iter().map(|d| d["uuid"].as_str().unwrap().to_owned()));
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    let mut dedup = seen.clone();
    dedup.sort();
    dedup.dedup();
    assert_eq!(
        (seen.len(), dedup.len()),
        (12, 12),
        "every device exactly once"
    );

    let summary = app
        .call(Method::GET, "/api/v1/gpus/summary", Some(&alice), None)
        .await
        .body;
    let row = summary
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["profile"] == "3g.40gb")
        .unwrap();
    assert_eq!(
        (row["total"].clone(), row["free"].clone()),
        (json!(3), json!(2))
    );

    let node = app
        .call(Method::GET, "/api/v1/nodes/node-2", Some(&bob), None)
        .await;
    assert_eq!(node.status, StatusCode::OK);
    assert_eq!(node.body["stale"], false);
    assert_eq!(
        app.call(Method::GET, "/api/v1/nodes/node-9", Some(&bob), None)
            .await
            .status,
        StatusCode::NOT_FOUND
    );

    let metrics = app.call(Method::GET, "/metrics", None, None).await.body;
    let text = metrics.as_str().unwrap();
    assert!(
        text.contains(r#"kcloud_gpu_allocated{UUID="MIG-node-2-1a",user="alice",server="nb1"} 1"#),
        "{text}"
    );
    assert!(text.contains(r#"kcloud_nodes{state="fresh"} 3"#));
    assert!(text.contains("kcloud_http_requests_total{"));

    let me = app
        .call(Method::GET, "/api/v1/me", Some(&alice), None)
        .await
        .body;
    assert_eq!(me["devices_held"], 1);
    assert_eq!(me["effective_quota"]["gpus"], 8);

    // Three missed heartbeats (1 s each here): stale, shown, not available.
    tokio::time::sleep(Duration::from_millis(3300)).await;
    let r = app.push("node-1", inventory("node-1", 2)).await;
    assert_eq!(r.status, StatusCode::OK);
    let nodes = app
        .call(Method::GET, "/api/v1/nodes", Some(&bob), None)
        .await
        .body;
    let stale: Vec<bool> = nodes
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["stale"].as_bool().unwrap())
        .collect();
    assert_eq!(stale, [false, true, true]);
    let free = list(bob.clone(), "available=true&limit=1000").await;
    assert!(
        free["items"]
            .as_array()
            .unwrap()
            .iter()
            .all(|d| d["node"] == "node-1")
    );
}

#[tokio::test]
async fn openapi_covers_every_endpoint() {
    let app = start().await;
    let spec = app
        .call(Method::GET, "/api/openapi.json", None, None)
        .await
        .body;
    let paths = spec["paths"].as_object().unwrap();
    for (path, method) in [
        ("/api/v1/auth/login", "post"),
        ("/api/v1/auth/refresh", "post"),
        ("/api/v1/auth/logout", "post"),
        ("/api/v1/me", "get"),
        ("/api/v1/users", "get"),
        ("/api/v1/users", "post"),
        ("/api/v1/users/{user}", "get"),
        ("/api/v1/users/{user}", "patch"),
        ("/api/v1/users/{user}", "delete"),
        ("/api/v1/nodes/{node}/inventory", "put"),
        ("/api/v1/nodes", "get"),
        ("/api/v1/nodes/{node}", "get"),
        ("/api/v1/nodes/{node}/history", "get"),
        ("/api/v1/gpus", "get"),
        ("/api/v1/gpus/summary", "get"),
        ("/api/v1/presets", "get"),
        ("/healthz", "get"),
        ("/readyz", "get"),
        ("/metrics", "get"),
    ] {
        assert!(
            paths.get(path).and_then(|p| p.get(method)).is_some(),
            "{method} {path} missing"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_simulated_agent_pushes_into_the_aggregator() {
    let app = start().await;
    let admin = app.token("admin", ADMIN_PW).await;
    let token_file = app.dir.path().join("agent-token");
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let config = <kcloud_agent::Config as clap::Parser>::try_parse_from([
        "kcloud-agent",
        "--node-name",
        "dgx-1",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--simulate",
        "dgx-a100-mig",
        "--interval",
        "200ms",
        "--aggregator-url",
        &app.base,
        "--agent-token-file",
        token_file.to_str().unwrap(),
    ])
    .unwrap();
    let stop = CancellationToken::new();
    let agent = tokio::spawn(kcloud_agent::run(config, stop.clone()));
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let page = loop {
        let r = app
            .call(
                Method::GET,
                "/api/v1/gpus?node=dgx-1&available=true&limit=1000",
                Some(&admin),
                None,
            )
            .await;
        if r.status == StatusCode::OK && !r.body["items"].as_array().unwrap().is_empty() {
            break r.body;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no inventory from the agent: {:?}",
            r.body
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // 4 whole GPUs + 7 + 4 + 2 + 4 MIG instances.
    assert_eq!(page["items"].as_array().unwrap().len(), 21);
    let summary = app
        .call(
            Method::GET,
            "/api/v1/gpus/summary?node=dgx-1",
            Some(&admin),
            None,
        )
        .await
        .body;
    let count = |profile: Option<&str>| {
        summary
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["profile"].as_str() == profile)
            .map(|r| r["free"].as_u64().unwrap())
            .sum::<u64>()
    };
    assert_eq!(count(Some("1g.10gb")), 7 + 2 + 1);
    assert_eq!(count(Some("3g.40gb")), 2);
    let node = app
        .call(Method::GET, "/api/v1/nodes/dgx-1", Some(&admin), None)
        .await
        .body;
    assert_eq!(node["simulated"], true);
    stop.cancel();
    agent.await.unwrap().unwrap();
}

/// Personal tokens × every operation of the OpenAPI document (so a new endpoint is
/// covered without editing this): with alice's token of each scope, an operation the
/// scope allows answers exactly what alice's session gets; one it does not is 403 and
/// says why. The rule: token management never; reads with `read` or `servers`; writes
/// to the user's own servers and reservations with `servers`; other writes never.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_scopes_matrix_over_every_endpoint() {
    let app = start().await;
    let (_admin, alice, _bob) = app.users().await;
    assert_eq!(
        app.push("node-1", inventory("node-1", 1)).await.status,
        StatusCode::OK
    );
    let mut tokens = Vec::new();
    for scope in ["read", "servers", "proxy"] {
        let r = app
            .call(
                Method::POST,
                "/api/v1/users/alice/tokens",
                Some(&alice),
                Some(json!({"name": scope, "scopes": [scope]})),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
        tokens.push((scope, r.body["token"].as_str().unwrap().to_owned()));
    }
    let spec = app
        .call(Method::GET, "/api/openapi.json", None, None)
        .await
        .body;
    let mut checked = 0;
    for (template, ops) in spec["paths"].as_object().unwrap() {
        // Sign-in, the agents' push and the public endpoints take no user credential.
        if template.starts_with("/api/v1/auth/")
            || template.ends_with("/inventory")
            || !template.starts_with("/api/v1/")
        {
            continue;
        }
        let path = template
            .replace("{user}", "alice")
            .replace("{node}", "node-1")
            .replace("{path}", "none")
            .split('/')
            .map(|seg| if seg.starts_with('{') { "none" } else { seg })
            .collect::<Vec<_>>()
            .join("/");
        for method in ops.as_object().unwrap().keys() {
            let method: Method = method.to_uppercase().parse().unwrap();
            if path == "/api/v1/events" {
                continue; // a stream that stays open; its scope check is below
            }
            let write = !matches!(method, Method::GET | Method::HEAD);
            let body = write.then(|| json!({}));
            let session = app
                .call(method.clone(), &path, Some(&alice), body.clone())
                .await;
            let segs: Vec<&str> = path.split('/').collect();
            let own_servers = matches!(
                segs.as_slice(),
                ["", "api", "v1", "users", _, "servers" | "reservations", ..]
            );
            for (scope, token) in &tokens {
                let allowed = if segs.contains(&"tokens") {
                    false
                } else if !write {
                    matches!(*scope, "read" | "servers")
                } else {
                    own_servers && *scope == "servers"
                };
                let r = app
                    .call(method.clone(), &path, Some(token), body.clone())
                    .await;
                if allowed {
                    assert_eq!(
                        r.status, session.status,
                        "{scope} {method} {path}: {:?} vs session {:?}",
                        r.body, session.body
                    );
                } else {
                    assert_eq!(
                        r.status,
                        StatusCode::FORBIDDEN,
                        "{scope} {method} {path}: {:?}",
                        r.body
                    );
                    let msg = r.body["error"]["message"].as_str().unwrap_or("");
                    assert!(msg.contains("token"), "{scope} {method} {path}: {msg}");
                }
                checked += 1;
            }
        }
    }
    assert!(
        checked > 100,
        "only {checked} checks: the document lost operations?"
    );
    // The event stream: a read.
    for (scope, token) in &tokens {
        let r = app
            .client
            .get(format!("{}/api/v1/events", app.base))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        let want = if *scope == "proxy" {
            StatusCode::FORBIDDEN
        } else {
            StatusCode::OK
        };
        assert_eq!(r.status(), want, "{scope} events");
    }
}
