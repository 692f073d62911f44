//! Users' servers on origins of their own (`http://{user}.localhost:{port}`): how a
//! browser signs in to a server there (a one-time code from the portal's origin), what
//! each origin accepts, and that a real JupyterLab works there — page, writes, and a
//! kernel over the websocket. The same attack in headless Chromium is in
//! [`crate::portal`].

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::app::{A_PW, ADMIN_PW, B_PW, TestApp};
use crate::servers::{App, JUPYTER, Kernel};

/// `name=value` of a `Set-Cookie` named `name` in a login answer.
fn session_cookie(r: &reqwest::Response, name: &str) -> String {
    r.headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|v| v.starts_with(&format!("{name}=")))
        .and_then(|v| v.split(';').next())
        .unwrap_or_else(|| panic!("no {name} cookie"))
        .to_owned()
}

/// A browser's portal cookies (access and CSRF) for `user`.
async fn portal_cookies(app: &TestApp, user: &str, password: &str) -> String {
    let r = app
        .client
        .post(format!("{}/api/v1/auth/login", app.base))
        .json(&json!({"username": user, "password": password}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    format!(
        "{}; {}",
        session_cookie(&r, "__Host-kcloud_access"),
        session_cookie(&r, "__Host-kcloud_csrf")
    )
}

fn query_param(url: &str, key: &str) -> String {
    url.split_once('?')
        .unwrap()
        .1
        .split('&')
        .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key} in {url}"))
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_opens_on_its_owners_origin_only() {
    let _one = JUPYTER.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let app = App::start(&dir.path().join("data"), &[]).await;
    let (admin, alice, bob) = app.users().await;
    let uuid = app.free_migs(&alice).await.remove(0);
    // `lab` is JupyterLab; `other` only needs to exist.
    for body in [
        json!({"name": "lab", "devices": [uuid]}),
        json!({"name": "other", "command": ["sleep", "600"]}),
    ] {
        let r = app
            .call(
                Method::POST,
                "/api/v1/users/alice/servers",
                Some(&alice),
                Some(body),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    }
    app.wait_status(
        &alice,
        "/api/v1/users/alice/servers/lab",
        "running",
        Duration::from_secs(90),
    )
    .await;
    let alice_origin = app.user_origin("alice");
    let web = app.origin_client(&["alice", "bob"]);
    let upstream_token = app
        .state
        .servers
        .get(&kcloud_core::caller::Caller::system(), "alice", "lab")
        .unwrap()
        .upstream
        .unwrap()
        .token
        .unwrap()
        .to_string();

    // A browser on the portal's origin following a link to the server: its owner is
    // sent to her own origin with a one-time code; the content is never served here.
    let alice_portal = portal_cookies(&app, "alice", A_PW).await;
    let link = |cookies: &str, fetch_site: Option<&str>| {
        let mut req = web
            .get(format!("{}/user/alice/lab/lab?reset", app.base))
            .header("cookie", cookies);
        if let Some(site) = fetch_site {
            req = req.header("sec-fetch-site", site);
        }
        req.send()
    };
    let r = link(&alice_portal, Some("same-origin")).await.unwrap();
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let to = r.headers()["location"].to_str().unwrap().to_owned();
    assert!(
        to.starts_with(&format!("{alice_origin}/_kcloud/session?code=")),
        "{to}"
    );
    assert_eq!(query_param(&to, "next"), "/user/alice/lab/lab%3Freset");
    assert!(r.headers().get("set-cookie").is_none());
    // Not from a page of another site (a frame, an image, a link elsewhere).
    let r = link(&alice_portal, Some("cross-site")).await.unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    // An admin's browser is not signed in to someone else's server by a link.
    let admin_portal = portal_cookies(&app, "admin", ADMIN_PW).await;
    let r = link(&admin_portal, None).await.unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    // Another user: no such server.
    let bob_portal = portal_cookies(&app, "bob", B_PW).await;
    assert_eq!(
        link(&bob_portal, None).await.unwrap().status(),
        StatusCode::NOT_FOUND
    );

    // The code is good once, on its owner's origin, for that server.
    let code = query_param(&to, "code");
    let r = web
        .get(format!(
            "{}/_kcloud/session?code={code}",
            app.user_origin("bob")
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::UNAUTHORIZED,
        "another user's origin"
    );
    let r = web.get(&to).send().await.unwrap();
    assert_eq!(
        r.status(),
        StatusCode::UNAUTHORIZED,
        "a stolen code tried elsewhere is spent"
    );
    let r = link(&alice_portal, Some("none")).await.unwrap();
    let to = r.headers()["location"].to_str().unwrap().to_owned();
    let r = web.get(&to).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert_eq!(r.headers()["location"], "/user/alice/lab/lab?reset");
    let set = r.headers()["set-cookie"].to_str().unwrap().to_owned();
    for attr in ["kcloud_srv_lab=", "HttpOnly", "SameSite=Lax", "Path=/"] {
        assert!(set.contains(attr), "{attr} in {set}");
    }
    assert!(
        !set.to_ascii_lowercase().contains("domain"),
        "host-only: {set}"
    );
    let lab_cookie = set.split(';').next().unwrap().to_owned();
    let r = web.get(&to).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "replayed");
    // A code for one server opens that server only, whatever `next` says.
    let code = app.state.auth.open_code(
        &app.state.auth.caller(&alice).await.unwrap(),
        "alice",
        "lab",
    );
    let r = web
        .get(format!(
            "{alice_origin}/_kcloud/session?code={}&next=/user/alice/other/x",
            code.unwrap()
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["location"], "/user/alice/lab/");
    assert!(
        r.headers()["set-cookie"]
            .to_str()
            .unwrap()
            .starts_with("kcloud_srv_lab=")
    );
    let other_with_labs_cookie = lab_cookie.replacen("kcloud_srv_lab", "kcloud_srv_other", 1);
    let r = web
        .get(format!("{alice_origin}/user/alice/other/api/status"))
        .header("cookie", &other_with_labs_cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::UNAUTHORIZED,
        "lab's cookie for another server"
    );

    // On alice's origin with the server's cookie: JupyterLab, without its token.
    let get = |path: &str, cookie: &str| {
        web.get(format!("{alice_origin}{path}"))
            .header("cookie", cookie)
            .send()
    };
    let page = get("/user/alice/lab/lab", &lab_cookie).await.unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    let html = page.text().await.unwrap();
    assert!(
        html.contains("\"token\": \"\""),
        "page config token blanked"
    );
    assert!(
        !html.contains(&upstream_token),
        "server token reached the browser"
    );
    // Writes: same-origin only.
    let post = |origin: &str| {
        web.post(format!("{alice_origin}/user/alice/lab/api/contents"))
            .header("cookie", &lab_cookie)
            .header("origin", origin)
            .json(&json!({"type": "notebook"}))
            .send()
    };
    assert_eq!(
        post("http://evil.example").await.unwrap().status(),
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        post(&app.base).await.unwrap().status(),
        StatusCode::FORBIDDEN,
        "the portal's origin"
    );
    assert_eq!(
        post(&alice_origin).await.unwrap().status(),
        StatusCode::CREATED
    );

    // What the user origin refuses: the portal's session cookie, anonymous browsers,
    // other users, and everything that is not a server.
    assert_eq!(
        get("/user/alice/lab/api/status", &alice_portal)
            .await
            .unwrap()
            .status(),
        StatusCode::UNAUTHORIZED,
        "the API's session cookie is not accepted here"
    );
    assert_eq!(
        web.get(format!("{alice_origin}/user/alice/lab/api/status"))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::UNAUTHORIZED
    );
    let r = web
        .get(format!("{alice_origin}/user/alice/lab/api/status"))
        .bearer_auth(&bob)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND, "bob");
    for path in [
        "/api/v1/me",
        "/",
        "/metrics",
        "/api/openapi.json",
        "/user/bob/lab/",
    ] {
        let r = web
            .get(format!("{alice_origin}{path}"))
            .bearer_auth(&alice)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::NOT_FOUND, "{path} on a user origin");
    }
    // API clients: the bearer token reaches the server on either origin.
    for base in [&app.base, &alice_origin] {
        let r = web
            .get(format!("{base}/user/alice/lab/api/status"))
            .bearer_auth(&alice)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK, "bearer on {base}");
    }
    // The server's cookie is no API credential.
    let r = app
        .client
        .get(format!("{}/api/v1/me", app.base))
        .header("cookie", &lab_cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);

    // A kernel over the websocket on alice's origin, with the cookie: 1+1. A handshake
    // from another origin is refused.
    let r = app
        .call(
            Method::POST,
            "/user/alice/lab/api/kernels",
            Some(&alice),
            Some(json!({"name": "python3"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    let kernel = r.body["id"].as_str().unwrap().to_owned();
    let ws_origin = alice_origin.replacen("http://", "ws://", 1);
    let mut k = Kernel::connect(
        &app,
        &ws_origin,
        &kernel,
        &[
            ("cookie", lab_cookie.clone()),
            ("origin", alice_origin.clone()),
        ],
    )
    .await
    .expect("websocket on the user origin");
    assert_eq!(k.execute("1+1").await, "2");
    k.close().await;
    let refused = Kernel::connect(
        &app,
        &ws_origin,
        &kernel,
        &[("cookie", lab_cookie.clone()), ("origin", app.base.clone())],
    )
    .await;
    assert!(refused.is_err(), "a handshake from the portal's origin");

    // An admin opens another user's server only by saying so, and it is audited.
    let r = app
        .call(
            Method::POST,
            "/api/v1/users/alice/servers/lab/open",
            Some(&admin),
            Some(json!({})),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{:?}", r.body);
    let admin_cookie = app.open_server(&admin, "alice", "lab", true).await;
    assert_eq!(
        get("/user/alice/lab/api/status", &admin_cookie)
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
    let audit = app.state.auth.repo().audit_log(20).await.unwrap();
    assert!(
        audit.iter().any(|e| e.action == "server_open_as_admin"
            && e.actor == "admin"
            && e.target == "alice/lab"),
        "{audit:?}"
    );
    let r = app
        .call(
            Method::POST,
            "/api/v1/users/alice/servers/lab/open",
            Some(&bob),
            Some(json!({"as_admin": true})),
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "bob");

    // Signing out ends the server's cookie of that session at once.
    let session = app.login("alice", A_PW).await;
    let token = session["access_token"].as_str().unwrap();
    let cookie = app.open_server(token, "alice", "lab", false).await;
    assert_eq!(
        get("/user/alice/lab/api/status", &cookie)
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
    let r = app
        .call(
            Method::POST,
            "/api/v1/auth/logout",
            None,
            Some(json!({"refresh_token": session["refresh_token"]})),
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    assert_eq!(
        get("/user/alice/lab/api/status", &cookie)
            .await
            .unwrap()
            .status(),
        StatusCode::UNAUTHORIZED
    );

    for name in ["lab", "other"] {
        let r = app
            .call(
                Method::DELETE,
                &format!("/api/v1/users/alice/servers/{name}"),
                Some(&alice),
                None,
            )
            .await;
        assert_eq!(r.status, StatusCode::NO_CONTENT);
    }
}
