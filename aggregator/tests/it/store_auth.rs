//! Store and auth through their public API, across restarts of the same data dir.

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

use std::sync::Arc;

use kcloud_core::user::Role;
use kcloud_core::{Error, now_ms};
use kcloud_service::auth::{Auth, AuthConfig, Hasher, SigningKey};
use kcloud_store::Store;

const CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10));

/// What `kcloud_aggregator::build` does at start, with cheap hashing; the store, to
/// close it.
fn start(data: &Path) -> (Auth, Store) {
    let store = Store::open(&data.join("kcloud.db")).unwrap();
    let key = SigningKey::load_or_create(None, data).unwrap();
    let auth = Auth::with_hasher(
        Arc::new(store.clone()),
        key,
        AuthConfig::default(),
        Hasher::insecure_fast_for_tests(),
    );
    (auth, store)
}

async fn stop((auth, store): (Auth, Store)) {
    drop(auth);
    store.close().await.unwrap();
}

fn is_401<T: std::fmt::Debug>(r: Result<T, Error>) -> bool {
    matches!(r, Err(Error::Unauthorized(_)))
}

#[tokio::test]
async fn sessions_survive_restarts_and_revocations_stay_revoked() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let now = now_ms();

    let started = start(&data);
    let auth = &started.0;
    let password = auth
        .bootstrap_admin(None, None, None)
        .await
        .unwrap()
        .expect("first start generates the admin password");
    let kept = auth.login("admin", &password, CLIENT, now).await.unwrap();
    let stolen = auth.login("admin", &password, CLIENT, now).await.unwrap();
    let rotated = auth
        .refresh(&stolen.refresh_token, now + 1_000)
        .await
        .unwrap();
    let ended = auth.login("admin", &password, CLIENT, now).await.unwrap();
    auth.logout(&ended.refresh_token).await.unwrap();
    stop(started).await;

    // Restart on the same data dir.
    let started = start(&data);
    let auth = &started.0;
    assert_eq!(auth.bootstrap_admin(None, None, None).await.unwrap(), None);
    // Same signing key: tokens from before the restart still verify.
    let claims = auth.verify_access(&kept.access_token).unwrap();
    assert_eq!((claims.sub.as_str(), claims.role), ("admin", Role::Admin));
    // A logged-out family stays logged out.
    assert!(is_401(
        auth.refresh(&ended.refresh_token, now + 2_000).await
    ));
    // Consumed tokens stay consumed: replaying one revokes its family, including the
    // newest token of that family.
    assert!(is_401(
        auth.refresh(&stolen.refresh_token, now + 3_000).await
    ));
    assert!(is_401(
        auth.refresh(&rotated.refresh_token, now + 4_000).await
    ));
    // The untouched session rotates normally.
    let next = auth
        .refresh(&kept.refresh_token, now + 5_000)
        .await
        .unwrap();
    stop(started).await;

    // Another restart: the revoked family is still revoked, the good one still good.
    let started = start(&data);
    let auth = &started.0;
    assert!(is_401(
        auth.refresh(&rotated.refresh_token, now + 6_000).await
    ));
    auth.refresh(&next.refresh_token, now + 7_000)
        .await
        .unwrap();
    let actions: Vec<String> = auth
        .repo()
        .audit_log(100)
        .await
        .unwrap()
        .into_iter()
        .rev()
        .map(|e| e.action)
        .collect();
    assert_eq!(actions.first().map(String::as_str), Some("bootstrap_admin"));
    assert!(actions.iter().any(|a| a == "logout"));
    assert!(actions.iter().any(|a| a == "refresh_reused"));
    stop(started).await;
}

#[tokio::test]
async fn a_new_signing_key_invalidates_old_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let started = start(&data);
    let auth = &started.0;
    auth.bootstrap_admin(None, Some("a long enough password".into()), None)
        .await
        .unwrap();
    let s = auth
        .login("admin", "a long enough password", CLIENT, now_ms())
        .await
        .unwrap();
    stop(started).await;
    std::fs::remove_file(data.join("signing.key")).unwrap();
    let started = start(&data);
    let auth = &started.0;
    assert!(is_401(auth.verify_access(&s.access_token)));
    assert!(is_401(auth.refresh(&s.refresh_token, now_ms()).await));
    stop(started).await;
}

#[test]
fn api_types_have_openapi_schemas() {
    use utoipa::PartialSchema;
    let session = serde_json::to_value(kcloud_service::auth::Session::schema()).unwrap();
    let text = session.to_string();
    for field in [
        "access_token",
        "refresh_token",
        "expires_in",
        "token_type",
        "user",
    ] {
        assert!(text.contains(field), "{field} missing from {text}");
    }
    let user = serde_json::to_value(kcloud_core::user::User::schema()).unwrap();
    let props = user["properties"].as_object().expect("User has properties");
    assert!(props.contains_key("created_at_ms"));
    assert!(props.keys().all(|k| !k.contains("password")), "{props:?}");
}
