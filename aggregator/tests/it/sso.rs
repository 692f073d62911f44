//! Single sign-on against a real OpenID Provider (`tests/oidc-provider`, zitadel/oidc's
//! provider with its login page): in headless Chromium through the provider's login
//! page into the portal for two users whose provider groups become kcloud groups with
//! different entitlements (one an admin through `admin_groups`); and the ID-token
//! checks with tokens the real provider issued: wrong audience, wrong issuer, expired,
//! another sign-in's nonce, a replayed state, `alg: none`, a key the provider no longer
//! has, a second provider instance, and a key rotation that must keep working.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use kcloud_core::settings::{LocalAccounts, OidcSettings};
use kcloud_service::auth::Oidc;
use kcloud_testkit::oidc::{Provider, User};
use kcloud_testkit::process::AggregatorProcess;
use kcloud_testkit::{free_port, require_tool};

const SECRET: &str = "test-client-secret-0123456789";

fn users() -> Vec<User<'static>> {
    vec![
        User {
            id: "u-dana",
            username: "dana",
            password: "dana-password-1234",
            groups: &["vision-lab", "kcloud-admins"],
        },
        User {
            id: "u-eli",
            username: "eli",
            password: "eli-password-12345",
            groups: &["nlp-lab"],
        },
    ]
}

fn settings(issuer: &str, redirect: &str, secret_file: &std::path::Path) -> OidcSettings {
    OidcSettings {
        issuer: issuer.to_owned(),
        client_id: "kcloud".into(),
        client_secret_file: Some(secret_file.to_owned()),
        redirect_url: redirect.to_owned(),
        display_name: "Test SSO".into(),
        username_claim: "preferred_username".into(),
        groups_claim: "groups".into(),
        admin_groups: vec!["kcloud-admins".into()],
        scopes: ["openid", "profile", "email", "groups"]
            .map(String::from)
            .to_vec(),
        local_accounts: LocalAccounts::Admins,
    }
}

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_sign_on_in_chromium_with_groups_and_entitlements() {
    let node = require_tool("node");
    let chromium = require_tool("chromium");
    assert!(
        workspace()
            .join("tests/browser/node_modules/playwright-core")
            .is_dir(),
        "playwright-core missing: run `npm ci` in tests/browser (scripts/test.sh does)"
    );
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let agg = AggregatorProcess::new(env!("CARGO_BIN_EXE_kcloud-aggregator"), &data);
    let redirect = format!("http://127.0.0.1:{}/api/v1/auth/oidc/callback", agg.port);
    let provider = Provider::start(&users(), &[("kcloud", SECRET, &redirect)], None);
    let secret_file = dir.path().join("oidc-secret");
    std::fs::write(&secret_file, format!("{SECRET}\n")).unwrap();
    let toml = format!(
        "[oidc]\nissuer = \"{}\"\nclient_id = \"kcloud\"\nclient_secret_file = \"{}\"\n\
         redirect_url = \"{redirect}\"\ndisplay_name = \"Test SSO\"\n\
         admin_groups = [\"kcloud-admins\"]\nlocal_accounts = \"admins\"\n",
        provider.issuer,
        secret_file.display()
    );
    let config = dir.path().join("kcloud.toml");
    std::fs::write(&config, toml).unwrap();
    let mut agg = agg
        .args([
            "--simulate",
            "dgx-a100-mig",
            "--config",
            config.to_str().unwrap(),
        ])
        .env("KCLOUD_BOOTSTRAP_ADMIN_USER", "root")
        .env("KCLOUD_BOOTSTRAP_ADMIN_PASSWORD", "root-password-12345")
        .start()
        .await;
    let base = agg.base();
    let http = reqwest::Client::new();
    let call = |method: Method, path: &str, token: Option<&str>, body: Option<Value>| {
        let mut r = http.request(method, format!("{base}{path}"));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        if let Some(b) = body {
            r = r.json(&b);
        }
        async move {
            let resp = r.send().await.unwrap();
            let status = resp.status();
            (status, resp.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    // Break-glass: the local admin signs in with a password; local users do not.
    let (st, root) = call(
        Method::POST,
        "/api/v1/auth/login",
        None,
        Some(json!({"name": "root", "password": "root-password-12345"})),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{root}");
    let root = root["access_token"].as_str().unwrap().to_owned();
    let (st, _) = call(
        Method::POST,
        "/api/v1/users",
        Some(&root),
        Some(json!({"name": "frank", "password": "frank-password-123"})),
    )
    .await;
    assert_eq!(st, StatusCode::CREATED);
    let (st, body) = call(
        Method::POST,
        "/api/v1/auth/login",
        None,
        Some(json!({"name": "frank", "password": "frank-password-123"})),
    )
    .await;
    assert_eq!(st, StatusCode::FORBIDDEN, "{body}");
    let (st, p) = call(Method::GET, "/api/v1/auth/providers", None, None).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(
        p,
        json!({"local": "admins", "oidc": {"name": "Test SSO", "login_url": "/api/v1/auth/oidc/login"}})
    );
    // kcloud groups named like the provider's.
    for g in [
        json!({"name": "vision-lab", "entitlements": {"mig_profiles": ["1g.10gb"]}}),
        json!({"name": "nlp-lab", "entitlements": {"mig_profiles": ["3g.40gb"]}}),
    ] {
        let (st, body) = call(Method::POST, "/api/v1/groups", Some(&root), Some(g)).await;
        assert_eq!(st, StatusCode::CREATED, "{body}");
    }

    let browser_dir = workspace().join("tests/browser");
    let shots = dir.path().join("shots");
    let base_for_node = base.clone();
    let run = tokio::task::spawn_blocking(move || {
        Command::new(node)
            .arg("sso.mjs")
            .current_dir(&browser_dir)
            .env("KCLOUD_URL", &base_for_node)
            .env("CHROMIUM", chromium)
            .env("SSO_NAME", "Test SSO")
            .env("SCREENSHOTS", &shots)
            .output()
            .expect("run node")
    })
    .await
    .unwrap();
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(
        run.status.success() && log.contains("SSO OK"),
        "{log}\n{}",
        agg.output()
    );

    // Created at first sign-in, roles and memberships from the provider's groups.
    let (_, users) = call(Method::GET, "/api/v1/users", Some(&root), None).await;
    let role = |name: &str| {
        users
            .as_array()
            .unwrap()
            .iter()
            .find(|u| u["name"] == name)
            .map(|u| u["role"].clone())
    };
    assert_eq!(role("dana"), Some(json!("admin")));
    assert_eq!(role("eli"), Some(json!("user")));
    let (_, g) = call(Method::GET, "/api/v1/groups/nlp-lab", Some(&root), None).await;
    assert_eq!(g["members"], json!(["eli"]));
    let (_, g) = call(Method::GET, "/api/v1/groups/vision-lab", Some(&root), None).await;
    assert_eq!(g["members"], json!(["dana"]));
    // Login CSRF: a callback URL from a sign-in started in another browser (without
    // the state cookie) is refused; with the cookie of the browser that started it,
    // the sign-in completes.
    let no_redirects = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let start = no_redirects
        .get(format!("{base}/api/v1/auth/oidc/login"))
        .send()
        .await
        .unwrap();
    assert_eq!(start.status(), StatusCode::SEE_OTHER);
    let state_cookie = start.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    let at_provider = start.headers()["location"].to_str().unwrap().to_owned();
    let (code, state) = code_for(&at_provider, &redirect, "eli", "eli-password-12345").await;
    let callback = format!("{base}/api/v1/auth/oidc/callback?code={code}&state={state}");
    let r = no_redirects.get(&callback).send().await.unwrap();
    let to = r.headers()["location"].to_str().unwrap();
    assert!(
        to.starts_with("/?sso_error=") && to.contains("browser"),
        "{to}"
    );
    assert!(
        !r.headers()
            .get_all("set-cookie")
            .iter()
            .any(|c| c.to_str().unwrap().contains("kcloud_access="))
    );
    // The state was spent by that attempt: the rightful browser starts again.
    let start = no_redirects
        .get(format!("{base}/api/v1/auth/oidc/login"))
        .send()
        .await
        .unwrap();
    let state_cookie2 = start.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    assert_ne!(state_cookie, state_cookie2);
    let at_provider = start.headers()["location"].to_str().unwrap().to_owned();
    let (code, state) = code_for(&at_provider, &redirect, "eli", "eli-password-12345").await;
    let r = no_redirects
        .get(format!(
            "{base}/api/v1/auth/oidc/callback?code={code}&state={state}"
        ))
        .header("cookie", &state_cookie2)
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["location"], "/");
    assert!(
        r.headers()
            .get_all("set-cookie")
            .iter()
            .any(|c| c.to_str().unwrap().contains("kcloud_access="))
    );

    // A provider user cannot sign in with a password (the account has none).
    let (st, _) = call(
        Method::POST,
        "/api/v1/auth/login",
        None,
        Some(json!({"name": "eli", "password": "eli-password-12345"})),
    )
    .await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    drop(provider);
}

/// Signs `user` in at the provider without a browser, from the URL `begin` gave, and
/// returns the `code` and `state` it sends back to `redirect`.
async fn code_for(auth_url: &str, redirect: &str, user: &str, password: &str) -> (String, String) {
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let origin = {
        let u = reqwest::Url::parse(auth_url).unwrap();
        format!("{}://{}", u.scheme(), u.host_str().unwrap())
            + &u.port().map(|p| format!(":{p}")).unwrap_or_default()
    };
    let abs = |loc: &str| {
        if loc.starts_with("http") {
            loc.to_owned()
        } else {
            format!("{origin}{loc}")
        }
    };
    let r = http.get(auth_url).send().await.unwrap();
    let login = abs(r.headers()["location"].to_str().unwrap());
    let id = reqwest::Url::parse(&login)
        .unwrap()
        .query_pairs()
        .find(|(k, _)| k == "authRequestID")
        .map(|(_, v)| v.into_owned())
        .expect("authRequestID");
    let mut form = reqwest::Url::parse("http://x/").unwrap();
    form.query_pairs_mut()
        .append_pair("id", &id)
        .append_pair("username", user)
        .append_pair("password", password);
    let mut r = http
        .post(format!("{origin}/login/username"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form.query().unwrap().to_owned())
        .send()
        .await
        .unwrap();
    for _ in 0..5 {
        let loc = abs(r.headers()["location"].to_str().expect("a redirect"));
        if loc.starts_with(redirect) {
            let u = reqwest::Url::parse(&loc).unwrap();
            let get = |k: &str| {
                u.query_pairs()
                    .find(|(kk, _)| kk == k)
                    .map(|(_, v)| v.into_owned())
                    .unwrap()
            };
            return (get("code"), get("state"));
        }
        r = http.get(&loc).send().await.unwrap();
    }
    panic!("never got back to {redirect}");
}

/// An ID token for client `client` straight from the provider's token endpoint.
async fn raw_id_token(issuer: &str, client: &str, redirect: &str, nonce: &str) -> String {
    let verifier = "v".repeat(43);
    let challenge = {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(
            aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, verifier.as_bytes()).as_ref(),
        )
    };
    let mut auth = reqwest::Url::parse(&format!("{issuer}/auth")).unwrap();
    auth.query_pairs_mut()
        .append_pair("response_type", "code")
        .append_pair("client_id", client)
        .append_pair("redirect_uri", redirect)
        .append_pair("scope", "openid profile groups")
        .append_pair("state", "s")
        .append_pair("nonce", nonce)
        .append_pair("code_challenge", &challenge)
        .append_pair("code_challenge_method", "S256");
    let (code, _) = code_for(auth.as_str(), redirect, "eli", "eli-password-12345").await;
    let mut form = reqwest::Url::parse("http://x/").unwrap();
    form.query_pairs_mut()
        .append_pair("grant_type", "authorization_code")
        .append_pair("code", &code)
        .append_pair("redirect_uri", redirect)
        .append_pair("code_verifier", &verifier);
    let r: Value = reqwest::Client::new()
        .post(format!("{issuer}/oauth/token"))
        .basic_auth(client, Some(SECRET))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form.query().unwrap().to_owned())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    r["id_token"].as_str().expect("an id_token").to_owned()
}

fn refused(r: kcloud_core::Result<Value>, what: &str) {
    match r {
        Err(kcloud_core::Error::Unauthorized(m)) => assert!(m.contains("refused"), "{what}: {m}"),
        other => panic!("{what}: not refused: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn id_tokens_from_a_real_provider_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("secret");
    std::fs::write(&secret_file, SECRET).unwrap();
    let redirect = "http://127.0.0.1:9/api/v1/auth/oidc/callback";
    let port = free_port();
    let clients = [("kcloud", SECRET, redirect), ("other", SECRET, redirect)];
    let provider = Provider::start(&users(), &clients, Some(port));
    let oidc = Oidc::new(settings(&provider.issuer, redirect, &secret_file)).unwrap();

    // The whole flow without a browser: state, PKCE, nonce, code, token, claims.
    let (url, _) = oidc.begin().await.unwrap();
    assert!(
        url.contains("code_challenge_method=S256") && url.contains("nonce="),
        "{url}"
    );
    let (code, state) = code_for(&url, redirect, "eli", "eli-password-12345").await;
    let id = oidc.finish(&code, &state).await.unwrap();
    assert_eq!(id.username, "eli");
    assert_eq!(id.groups, ["nlp-lab"]);
    assert!(id.subject.ends_with(" u-eli"), "{}", id.subject);
    // The same state again (a replayed callback): refused.
    let err = oidc.finish(&code, &state).await.unwrap_err();
    assert!(err.to_string().contains("state"), "{err}");

    let now = kcloud_core::now_ms();
    let good = raw_id_token(&provider.issuer, "kcloud", redirect, "n-1").await;
    oidc.verify_id_token(&good, "n-1", now)
        .await
        .expect("a good token passes");
    refused(
        oidc.verify_id_token(&good, "n-2", now).await,
        "another sign-in's nonce",
    );
    refused(
        oidc.verify_id_token(&good, "n-1", now + 2 * 3_600_000)
            .await,
        "expired",
    );
    let other = raw_id_token(&provider.issuer, "other", redirect, "n-1").await;
    refused(
        oidc.verify_id_token(&other, "n-1", now).await,
        "wrong audience",
    );
    // alg none: the payload of a good token, no signature.
    let payload = good.split('.').nth(1).unwrap();
    let none = format!("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{payload}.");
    refused(oidc.verify_id_token(&none, "n-1", now).await, "alg none");
    // A second provider instance (another issuer, another key).
    let second = Provider::start(&users(), &clients, None);
    let foreign = raw_id_token(&second.issuer, "kcloud", redirect, "n-1").await;
    refused(
        oidc.verify_id_token(&foreign, "n-1", now).await,
        "another issuer",
    );
    drop(second);

    // Key rotation: the provider restarts with a new key at the same issuer. Tokens
    // signed with the old key are refused once it is gone from the JWKS; new ones
    // pass after the JWKS is fetched again (at most every 10 s).
    drop(provider);
    let provider = Provider::start(&users(), &clients, Some(port));
    let rotated = raw_id_token(&provider.issuer, "kcloud", redirect, "n-1").await;
    tokio::time::sleep(Duration::from_secs(11)).await;
    oidc.verify_id_token(&rotated, "n-1", kcloud_core::now_ms())
        .await
        .expect("a token of the new key passes");
    refused(
        oidc.verify_id_token(&good, "n-1", kcloud_core::now_ms())
            .await,
        "a key no longer in the JWKS",
    );
}
