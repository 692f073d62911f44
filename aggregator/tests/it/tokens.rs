//! Personal API tokens end to end: created by the owner's session and shown once,
//! stored only as a hash, scopes enforced on the API and the proxy, a real Jupyter
//! client (jupyter-server's REST API and kernel websocket, from Python, with the
//! `token` header) running code on a user's JupyterLab through the proxy, `?token=`
//! exchanged for the server's cookie on the owner's origin, and a revoked token (and
//! the cookie made from it) refused at once.

use std::process::Command;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::servers::{App, JUPYTER};

/// Starts a kernel through the proxy, runs `print(6*7)` over its websocket, prints
/// `OUT <output>`, and deletes the kernel: what a desktop Jupyter client does.
const CLIENT: &str = r#"
import datetime, json, sys, uuid
import requests, websocket
base, token = sys.argv[1], sys.argv[2]
h = {"Authorization": f"token {token}"}
r = requests.post(f"{base}/api/kernels", headers=h, json={"name": "python3"}, timeout=60)
if r.status_code != 201:
    print("STATUS", r.status_code, r.text); sys.exit(3)
kid = r.json()["id"]
ws = websocket.create_connection(
    base.replace("http", "ws", 1) + f"/api/kernels/{kid}/channels",
    header=[f"Authorization: token {token}"], timeout=60)
msg_id = uuid.uuid4().hex
now = datetime.datetime.now(datetime.timezone.utc).isoformat()
ws.send(json.dumps({
    "header": {"msg_id": msg_id, "username": "client", "session": uuid.uuid4().hex,
               "msg_type": "execute_request", "version": "5.3", "date": now},
    "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
    "content": {"code": "print(6*7)", "silent": False, "store_history": False,
                "user_expressions": {}, "allow_stdin": False, "stop_on_error": True}}))
out = ""
while True:
    m = json.loads(ws.recv())
    if m.get("parent_header", {}).get("msg_id") != msg_id:
        continue
    if m["msg_type"] == "stream":
        out += m["content"]["text"]
    if m["msg_type"] == "status" and m["content"]["execution_state"] == "idle":
        break
ws.close()
requests.delete(f"{base}/api/kernels/{kid}", headers=h, timeout=30)
print("OUT", out.strip())
"#;

fn jupyter_client(base: &str, token: &str) -> (bool, String) {
    let out = Command::new("python3")
        .args(["-c", CLIENT, base, token])
        .output()
        .expect("python3 (with requests and websocket-client, installed with JupyterLab)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

async fn create(app: &App, token: &str, user: &str, body: Value) -> (StatusCode, Value) {
    let r = app
        .call(
            Method::POST,
            &format!("/api/v1/users/{user}/tokens"),
            Some(token),
            Some(body),
        )
        .await;
    (r.status, r.body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn personal_tokens_scopes_revocation_and_a_real_jupyter_client() {
    let _one = JUPYTER.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let app = App::start(&dir.path().join("data"), &[]).await;
    let (admin, alice, bob) = app.users().await;

    // Created by the owner's session; the secret is in the answer only.
    let (st, laptop) = create(
        &app,
        &alice,
        "alice",
        json!({"name": "laptop", "scopes": ["proxy", "servers"], "expires_in": "30d"}),
    )
    .await;
    assert_eq!(st, StatusCode::CREATED, "{laptop}");
    let laptop_secret = laptop["token"].as_str().unwrap().to_owned();
    assert!(laptop_secret.starts_with("kct_"), "{laptop}");
    assert_eq!(laptop["scopes"], json!(["servers", "proxy"]));
    let (st, reader) = create(
        &app,
        &alice,
        "alice",
        json!({"name": "reader", "scopes": ["read"]}),
    )
    .await;
    assert_eq!(st, StatusCode::CREATED, "{reader}");
    let reader_secret = reader["token"].as_str().unwrap().to_owned();
    let (st, bobs) = create(&app, &bob, "bob", json!({"name": "b", "scopes": ["proxy"]})).await;
    assert_eq!(st, StatusCode::CREATED, "{bobs}");
    let bob_secret = bobs["token"].as_str().unwrap().to_owned();

    // Bad input: a clear 4xx, nothing stored.
    for (who, user, body, want) in [
        (
            &alice,
            "alice",
            json!({"name": "", "scopes": ["read"]}),
            StatusCode::BAD_REQUEST,
        ),
        (
            &alice,
            "alice",
            json!({"name": "x", "scopes": []}),
            StatusCode::BAD_REQUEST,
        ),
        (
            &alice,
            "alice",
            json!({"name": "x", "scopes": ["root"]}),
            StatusCode::BAD_REQUEST,
        ),
        (
            &alice,
            "alice",
            json!({"name": "x", "scopes": ["read"], "expires_in": "1s"}),
            StatusCode::BAD_REQUEST,
        ),
        (
            &alice,
            "alice",
            json!({"name": "x", "scopes": ["read"], "expires_in": "400d"}),
            StatusCode::BAD_REQUEST,
        ),
        (
            &alice,
            "alice",
            json!({"name": "x\n", "scopes": ["read"], "extra": 1}),
            StatusCode::BAD_REQUEST,
        ),
        (
            &alice,
            "alice",
            json!({"name": "laptop", "scopes": ["read"]}),
            StatusCode::CONFLICT,
        ),
        (
            &bob,
            "alice",
            json!({"name": "x", "scopes": ["read"]}),
            StatusCode::NOT_FOUND,
        ),
        (
            &admin,
            "alice",
            json!({"name": "x", "scopes": ["read"]}),
            StatusCode::FORBIDDEN,
        ),
        (
            &laptop_secret,
            "alice",
            json!({"name": "x", "scopes": ["read"]}),
            StatusCode::FORBIDDEN,
        ),
    ] {
        let (st, body_back) = create(&app, who, user, body.clone()).await;
        assert_eq!(st, want, "{body}: {body_back}");
        assert!(body_back["error"]["message"].is_string(), "{body_back}");
    }

    // Listed without secrets; others' are 404; admins see everyone's.
    let r = app
        .call(
            Method::GET,
            "/api/v1/users/alice/tokens",
            Some(&alice),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let names: Vec<&str> = r
        .body
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names.len(), 2, "{}", r.body);
    assert!(
        !r.body.to_string().contains(&laptop_secret[20..]),
        "no secret listed"
    );
    assert!(
        r.body
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t.get("token").is_none())
    );
    let r = app
        .call(Method::GET, "/api/v1/users/alice/tokens", Some(&bob), None)
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = app
        .call(Method::GET, "/api/v1/tokens", Some(&admin), None)
        .await;
    assert_eq!(r.body.as_array().unwrap().len(), 3, "{}", r.body);
    let r = app
        .call(Method::GET, "/api/v1/tokens", Some(&alice), None)
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    // Stored only as a hash: the secret's characters appear in no file of the data dir.
    // `kct_` + 16 hex digits + `_`, then the secret (base64url: it may hold `_` too).
    let secret_part = laptop_secret["kct_".len() + 17..].to_owned();
    assert_eq!(secret_part.len(), 43);
    for entry in std::fs::read_dir(dir.path().join("data")).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            let bytes = std::fs::read(&path).unwrap();
            assert!(
                !bytes
                    .windows(secret_part.len())
                    .any(|w| w == secret_part.as_bytes()),
                "secret stored in {}",
                path.display()
            );
        }
    }

    // Scopes on the API.
    let call = |token: String, method: Method, path: &'static str, body: Option<Value>| {
        let app = &app;
        async move { app.call(method, path, Some(&token), body).await }
    };
    assert_eq!(
        call(reader_secret.clone(), Method::GET, "/api/v1/gpus", None)
            .await
            .status,
        StatusCode::OK
    );
    let r = call(
        reader_secret.clone(),
        Method::POST,
        "/api/v1/users/alice/servers",
        Some(json!({"name": "x"})),
    )
    .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("servers scope"),
        "{}",
        r.body
    );
    let r = call(
        reader_secret.clone(),
        Method::GET,
        "/api/v1/users/alice/tokens",
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let r = call(
        laptop_secret.clone(),
        Method::PATCH,
        "/api/v1/users/alice",
        Some(json!({"password": "another-long-password"})),
    )
    .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.body);
    let r = call(
        reader_secret.clone(),
        Method::GET,
        "/user/alice/lab/api/status",
        None,
    )
    .await;
    assert_eq!(
        r.status,
        StatusCode::FORBIDDEN,
        "read is not proxy: {}",
        r.body
    );

    // The servers scope creates a server (and only the owner's).
    let mig = app.free_migs(&alice).await.remove(0);
    let r = call(
        laptop_secret.clone(),
        Method::POST,
        "/api/v1/users/alice/servers",
        Some(json!({"name": "lab", "devices": [mig], "preset": "small"})),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let r = call(
        laptop_secret.clone(),
        Method::POST,
        "/api/v1/users/bob/servers",
        Some(json!({"name": "lab", "preset": "small"})),
    )
    .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.body);
    app.wait_status(
        &alice,
        "/api/v1/users/alice/servers/lab",
        "running",
        Duration::from_secs(90),
    )
    .await;

    // A real Jupyter client with the token header, through the portal's origin.
    let base = format!("{}/user/alice/lab", app.base);
    let (ok, out) = jupyter_client(&base, &laptop_secret);
    assert!(ok && out.contains("OUT 42"), "{out}");
    // Another user's token gets nowhere (404, as for any server not theirs).
    let (ok, out) = jupyter_client(&base, &bob_secret);
    assert!(!ok && out.contains("STATUS 404"), "{out}");

    // `?token=` on the owner's origin: the server's cookie, and on without the token.
    let origin = app.user_origin("alice");
    let client = app.origin_client(&["alice"]);
    let r = client
        .get(format!(
            "{origin}/user/alice/lab/api/status?x=1&token={laptop_secret}"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert_eq!(r.headers()["location"], "/user/alice/lab/api/status?x=1");
    let cookie = r.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    assert!(cookie.starts_with("kcloud_srv_lab="), "{cookie}");
    assert!(
        !cookie.contains(&secret_part),
        "the cookie is not the token"
    );
    let status = |cookie: String| {
        let (client, origin) = (client.clone(), origin.clone());
        async move {
            client
                .get(format!("{origin}/user/alice/lab/api/status"))
                .header("cookie", cookie)
                .send()
                .await
                .unwrap()
                .status()
        }
    };
    assert_eq!(status(cookie.clone()).await, StatusCode::OK);
    // Never on the portal's origin: a link there must not serve user content.
    let r = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .get(format!(
            "{}/user/alice/lab/api/status?token={laptop_secret}",
            app.base
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);

    // Revoked: the token and the cookie made from it stop at once.
    let id = laptop["id"].as_str().unwrap();
    let r = app
        .call(
            Method::DELETE,
            &format!("/api/v1/users/alice/tokens/{id}"),
            Some(&bob),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "not bob's to revoke");
    let r = app
        .call(
            Method::DELETE,
            &format!("/api/v1/users/alice/tokens/{id}"),
            Some(&alice),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.body);
    let (ok, out) = jupyter_client(&base, &laptop_secret);
    assert!(!ok && out.contains("STATUS 401"), "{out}");
    assert_eq!(status(cookie).await, StatusCode::UNAUTHORIZED);
    assert_eq!(
        call(
            laptop_secret.clone(),
            Method::GET,
            "/api/v1/users/alice/servers",
            None
        )
        .await
        .status,
        StatusCode::UNAUTHORIZED
    );
    // An admin revokes anyone's.
    let id = reader["id"].as_str().unwrap();
    let r = app
        .call(
            Method::DELETE,
            &format!("/api/v1/users/alice/tokens/{id}"),
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    assert_eq!(
        call(reader_secret, Method::GET, "/api/v1/gpus", None)
            .await
            .status,
        StatusCode::UNAUTHORIZED
    );

    let audit = app.state.auth.repo().audit_log(200).await.unwrap();
    let count = |a: &str| audit.iter().filter(|e| e.action == a).count();
    assert_eq!(count("token_create"), 3);
    assert_eq!(count("token_revoke"), 2);
    assert!(audit.iter().all(|e| !e.detail.contains(&secret_part)));
    let r = app
        .call(
            Method::DELETE,
            "/api/v1/users/alice/servers/lab",
            Some(&alice),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
}
