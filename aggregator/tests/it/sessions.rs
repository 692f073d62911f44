//! Sessions end when they should (logout, a replayed refresh token, a new password or
//! role end the tokens already issued, at once), and the client behind trusted reverse
//! proxies is who the login limits and the audit log see.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::app::{A_PW, ADMIN_PW, B_PW, TestApp};

async fn start(extra: &[&str]) -> TestApp {
    TestApp::builder()
        .args(["--local-agent", "off"])
        .args(extra)
        .start()
        .await
}

async fn me(app: &TestApp, token: &str) -> StatusCode {
    app.call(Method::GET, "/api/v1/me", Some(token), None)
        .await
        .status
}

fn tokens(session: &Value) -> (String, String) {
    (
        session["access_token"].as_str().unwrap().to_owned(),
        session["refresh_token"].as_str().unwrap().to_owned(),
    )
}

async fn refresh(app: &TestApp, token: &str) -> (StatusCode, Value) {
    let r = app
        .call(
            Method::POST,
            "/api/v1/auth/refresh",
            None,
            Some(json!({"refresh_token": token})),
        )
        .await;
    (r.status, r.body)
}

#[tokio::test]
async fn logout_and_a_replayed_refresh_token_end_access_tokens_at_once() {
    let app = start(&[]).await;
    app.users().await;
    let (a1, r1) = tokens(&app.login("alice", A_PW).await);
    let (a2, _) = tokens(&app.login("alice", A_PW).await);
    assert_eq!(me(&app, &a1).await, StatusCode::OK);

    // Logout ends that session's access token, not the user's other session.
    let r = app
        .call(
            Method::POST,
            "/api/v1/auth/logout",
            None,
            Some(json!({"refresh_token": r1})),
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    assert_eq!(me(&app, &a1).await, StatusCode::UNAUTHORIZED, "logged out");
    assert_eq!(me(&app, &a2).await, StatusCode::OK, "the other session");

    // A replayed refresh token revokes its family: every access token of it ends.
    let (a3, r3) = tokens(&app.login("alice", A_PW).await);
    let (status, rotated) = refresh(&app, &r3).await;
    assert_eq!(status, StatusCode::OK);
    let (a3_rotated, _) = tokens(&rotated);
    assert_eq!(me(&app, &a3_rotated).await, StatusCode::OK);
    assert_eq!(
        refresh(&app, &r3).await.0,
        StatusCode::UNAUTHORIZED,
        "replay"
    );
    assert_eq!(me(&app, &a3).await, StatusCode::UNAUTHORIZED);
    assert_eq!(me(&app, &a3_rotated).await, StatusCode::UNAUTHORIZED);
    assert_eq!(me(&app, &a2).await, StatusCode::OK, "the other session");

    // The event stream of an ended session stops too (it re-checks every few seconds).
    let (a4, r4) = tokens(&app.login("alice", A_PW).await);
    let mut stream = app
        .client
        .get(format!("{}/api/v1/events", app.base))
        .bearer_auth(&a4)
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), StatusCode::OK);
    let r = app
        .call(
            Method::POST,
            "/api/v1/auth/logout",
            None,
            Some(json!({"refresh_token": r4})),
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let ended = tokio::time::timeout(std::time::Duration::from_secs(30), async {
        while let Ok(Some(_)) = stream.chunk().await {}
    })
    .await;
    assert!(ended.is_ok(), "the stream outlived its session");
}

#[tokio::test]
async fn a_new_password_or_role_ends_all_of_a_users_sessions() {
    let app = start(&[]).await;
    let (admin, alice, bob) = app.users().await;
    let (alice2, _) = tokens(&app.login("alice", A_PW).await);
    let r = app
        .call(
            Method::PATCH,
            "/api/v1/users/alice",
            Some(&admin),
            Some(json!({"password": "a-brand-new-password"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    for t in [&alice, &alice2] {
        assert_eq!(me(&app, t).await, StatusCode::UNAUTHORIZED, "new password");
    }
    app.login("alice", "a-brand-new-password").await;

    // A promotion ends the sessions that carry the old role; the new one has it.
    let r = app
        .call(
            Method::PATCH,
            "/api/v1/users/bob",
            Some(&admin),
            Some(json!({"role": "admin"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(me(&app, &bob).await, StatusCode::UNAUTHORIZED, "new role");
    let bob = app.token("bob", B_PW).await;
    let r = app.call(Method::GET, "/api/v1/me", Some(&bob), None).await;
    assert_eq!(r.body["user"]["role"], "admin", "{:?}", r.body);
    // A quota change is no reason to sign anyone out; the admin's own session lives on.
    let r = app
        .call(
            Method::PATCH,
            "/api/v1/users/bob",
            Some(&admin),
            Some(json!({"quota": {"gpus": 3}})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(me(&app, &bob).await, StatusCode::OK);
    assert_eq!(me(&app, &admin).await, StatusCode::OK);
}

/// A failed login "from" `forwarded` (as `X-Forwarded-For`), each with a name of its
/// own so that only the per-client limit can trip.
async fn failed_login(app: &TestApp, forwarded: &str, n: usize) -> StatusCode {
    let r = app
        .client
        .post(format!("{}/api/v1/auth/login", app.base))
        .header("x-forwarded-for", forwarded)
        .json(&json!({"username": format!("nobody-{n}"), "password": "wrong-password-1"}))
        .send()
        .await
        .unwrap();
    r.status()
}

async fn login_from(app: &TestApp, forwarded: &str) -> StatusCode {
    app.client
        .post(format!("{}/api/v1/auth/login", app.base))
        .header("x-forwarded-for", forwarded)
        .json(&json!({"username": "admin", "password": ADMIN_PW}))
        .send()
        .await
        .unwrap()
        .status()
}

/// Fails logins from `forwarded` until the per-client limit answers 429.
async fn exhaust(app: &TestApp, forwarded: &str) {
    for n in 0..200 {
        if failed_login(app, forwarded, n).await == StatusCode::TOO_MANY_REQUESTS {
            return;
        }
    }
    panic!("the per-client login limit never tripped");
}

#[tokio::test]
async fn forwarded_addresses_count_only_from_trusted_proxies() {
    // No trusted proxies: the header is anyone's to write, so it is ignored; every
    // spoofed address is the same client (the peer).
    let app = start(&[]).await;
    for n in 0..200 {
        let spoofed = format!("198.51.100.{}", n % 250);
        if failed_login(&app, &spoofed, n).await == StatusCode::TOO_MANY_REQUESTS {
            break;
        }
        assert!(
            n < 100,
            "spoofed X-Forwarded-For escaped the per-client limit"
        );
    }
    assert_eq!(
        login_from(&app, "203.0.113.50").await,
        StatusCode::TOO_MANY_REQUESTS
    );
    let audit = app.state.auth.repo().audit_log(5).await.unwrap();
    assert!(
        audit.iter().all(|e| e.client == "127.0.0.1"),
        "the peer, not the header: {audit:?}"
    );
    drop(app);

    // Behind a trusted proxy (this test's loopback): one client's failures lock out
    // that client only; the audit log names the client.
    let app = start(&["--trusted-proxies", "127.0.0.1/32,::1"]).await;
    exhaust(&app, "203.0.113.7").await;
    assert_eq!(
        login_from(&app, "203.0.113.7").await,
        StatusCode::TOO_MANY_REQUESTS
    );
    // A client that prepends a made-up address is still itself: the proxy appends the
    // real one, and the rightmost untrusted address counts.
    assert_eq!(
        login_from(&app, "192.0.2.99, 203.0.113.7").await,
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(
        login_from(&app, "203.0.113.8").await,
        StatusCode::OK,
        "another client"
    );
    let audit = app.state.auth.repo().audit_log(50).await.unwrap();
    assert!(
        audit
            .iter()
            .any(|e| e.action == "login" && e.client == "203.0.113.8"),
        "{audit:?}"
    );
    assert!(
        audit
            .iter()
            .any(|e| e.action == "login_failed" && e.client == "203.0.113.7"),
        "{audit:?}"
    );
}
