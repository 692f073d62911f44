//! Passwords, keys, limits, tokens and the sign-in flows against a real SQLite store.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicU64, Ordering};

use argon2::Params;
use argon2::PasswordHash;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{EncodingKey, Validation};
use kcloud_core::user::UserPatch;
use kcloud_store::Store;

use super::*;
use passwords::{DUMMY_PASSWORD, GENERATED_PASSWORD_LEN};

const ALICE_PW: &str = "correct horse battery";
const LOCAL: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

struct Fixture {
    _dir: tempfile::TempDir,
    auth: Auth,
    now: u64,
}

/// Cheap, but unlike both the production cost and `insecure_fast_for_tests`, so
/// a dummy hash made at the wrong cost shows.
fn test_hasher() -> Hasher {
    Hasher {
        params: Params::new(16, 2, 1, None).unwrap(),
    }
}

async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&dir.path().join("kcloud.db")).unwrap());
    let auth = Auth::with_hasher(
        store,
        SigningKey::from_bytes(&[42u8; 32]).unwrap(),
        AuthConfig::default(),
        test_hasher(),
    );
    for (name, role) in [("alice", Role::User), ("root", Role::Admin)] {
        let password_hash = auth.hash_password(ALICE_PW).await.unwrap();
        auth.repo()
            .create_user(NewUser {
                name: name.into(),
                password_hash,
                role,
                quota: Quota::default(),
            })
            .await
            .unwrap();
    }
    Fixture {
        _dir: dir,
        auth,
        now: now_ms(),
    }
}

fn unauthorized<T: fmt::Debug>(r: Result<T>) -> String {
    match r {
        Err(Error::Unauthorized(m)) => m,
        other => panic!("expected 401, got {other:?}"),
    }
}

fn b64(v: &serde_json::Value) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap())
}

fn payload(token: &str) -> serde_json::Value {
    let part = token.split('.').nth(1).unwrap();
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).unwrap()).unwrap()
}

#[test]
fn password_policy_and_hashing() {
    let h = Hasher::insecure_fast_for_tests();
    assert!(matches!(h.hash("short"), Err(Error::BadRequest(_))));
    assert!(matches!(
        h.hash(&"x".repeat(MAX_PASSWORD_BYTES + 1)),
        Err(Error::BadRequest(_))
    ));
    let phc = h.hash(ALICE_PW).unwrap();
    assert!(phc.starts_with("$argon2id$v=19$"), "{phc}");
    assert!(h.verify(ALICE_PW, &phc));
    assert!(!h.verify("correct horse battery!", &phc));
    assert!(!h.verify(ALICE_PW, "not a phc string"));
    // Salted: the same password hashes differently.
    assert_ne!(phc, h.hash(ALICE_PW).unwrap());
    // Verification takes the cost from the hash, so the production verifier
    // accepts it too.
    assert!(verify_password(ALICE_PW, &phc));
}

#[test]
fn production_cost_is_argon2_default() {
    let phc = hash_password("twelve bytes!").unwrap();
    assert!(phc.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{phc}");
    assert!(verify_password("twelve bytes!", &phc));
    let err = hash_password("short").unwrap_err().to_string();
    assert!(!err.contains("short"), "{err}");
}

#[tokio::test]
async fn login_issues_working_tokens() {
    let f = fixture().await;
    let s = f.auth.login("alice", ALICE_PW, LOCAL, f.now).await.unwrap();
    assert_eq!(s.token_type, "Bearer");
    assert_eq!(s.expires_in, 900);
    assert_eq!(s.user.name, "alice");
    let c = f.auth.verify_access_at(&s.access_token, f.now).unwrap();
    assert_eq!(c.sub, "alice");
    assert_eq!(c.role, Role::User);
    assert_eq!(c.typ, TokenType::Access);
    assert_eq!(c.exp, c.iat + 900);
    // The access token belongs to the session (the refresh token's family).
    let refresh: Claims = serde_json::from_value(payload(&s.refresh_token)).unwrap();
    assert!(c.fam.is_some());
    assert_eq!(c.fam, refresh.fam);
    // The wall-clock variant agrees.
    f.auth.verify_access(&s.access_token).unwrap();
    let debug = format!("{s:?}");
    assert!(!debug.contains(&s.access_token) && !debug.contains(&s.refresh_token));
    let json = serde_json::to_value(&s).unwrap();
    for k in ["access_token", "refresh_token", "expires_in", "user"] {
        assert!(json.get(k).is_some(), "{k}");
    }
    assert!(json["user"].get("password_hash").is_none());
}

#[tokio::test]
async fn bad_credentials_look_alike_and_are_audited() {
    let f = fixture().await;
    let wrong = unauthorized(f.auth.login("alice", "wrong password!", LOCAL, f.now).await);
    let unknown = unauthorized(f.auth.login("mallory", ALICE_PW, LOCAL, f.now).await);
    let invalid = unauthorized(f.auth.login("Not A Name", ALICE_PW, LOCAL, f.now).await);
    f.auth
        .repo()
        .update_user(
            "alice",
            UserPatch {
                disabled: Some(true),
                ..UserPatch::default()
            },
        )
        .await
        .unwrap();
    let disabled = unauthorized(f.auth.login("alice", ALICE_PW, LOCAL, f.now).await);
    for m in [&wrong, &unknown, &invalid, &disabled] {
        assert_eq!(m, BAD_CREDENTIALS);
    }
    f.auth.login("root", ALICE_PW, LOCAL, f.now).await.unwrap();

    let log = f.auth.repo().audit_log(10).await.unwrap();
    let got: Vec<_> = log
        .iter()
        .rev()
        .map(|e| (e.action.as_str(), e.target.as_str(), e.detail.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            ("login_failed", "alice", "wrong password"),
            ("login_failed", "", "unknown user"),
            ("login_failed", "", "unknown user"),
            ("login_failed", "alice", "account disabled"),
            ("login", "root", ""),
        ]
    );
    assert!(log.iter().all(|e| e.client == "127.0.0.1"));
    // No password in any audit field.
    let text = format!("{log:?}");
    assert!(!text.contains(ALICE_PW) && !text.contains("wrong password!"));
}

#[tokio::test]
async fn unknown_users_still_run_argon2() {
    let f = fixture().await;
    let p = &f.auth.passwords;
    let counts = || {
        (
            p.argon2_runs.load(Ordering::Relaxed),
            p.dummy_runs.load(Ordering::Relaxed),
        )
    };
    assert_eq!(counts(), (0, 0));
    let _ = f.auth.login("mallory", ALICE_PW, LOCAL, f.now).await;
    assert_eq!(counts(), (1, 1));
    let dummy = p.dummy.get().expect("dummy hash built").clone();
    // The dummy hash is a real argon2id hash at the service's cost.
    assert!(dummy.starts_with("$argon2id$v=19$m=16,t=2,p=1$"), "{dummy}");
    assert_eq!(
        PasswordHash::new(&dummy).unwrap().params.to_string(),
        PasswordHash::new(&p.hasher.hash(ALICE_PW).unwrap())
            .unwrap()
            .params
            .to_string()
    );
    let _ = f.auth.login("Bad Name", ALICE_PW, LOCAL, f.now).await;
    assert_eq!(counts(), (2, 2));
    let _ = f.auth.login("alice", "wrong password!", LOCAL, f.now).await;
    assert_eq!(counts(), (3, 2));
    f.auth.login("alice", ALICE_PW, LOCAL, f.now).await.unwrap();
    assert_eq!(counts(), (4, 2));
    // The dummy hash never lets anyone in, not even with the dummy's password.
    unauthorized(f.auth.login("mallory", DUMMY_PASSWORD, LOCAL, f.now).await);
}

#[tokio::test]
async fn alg_none_is_rejected() {
    let f = fixture().await;
    let s = f.auth.login("root", ALICE_PW, LOCAL, f.now).await.unwrap();
    let claims = payload(&s.access_token);
    for header in [
        serde_json::json!({"alg": "none", "typ": "JWT"}),
        serde_json::json!({"alg": "None", "typ": "JWT"}),
        serde_json::json!({"alg": "NONE"}),
    ] {
        let forged = format!("{}.{}.", b64(&header), b64(&claims));
        assert_eq!(
            unauthorized(f.auth.verify_access_at(&forged, f.now)),
            INVALID_TOKEN
        );
        // Even with the real signature attached.
        let sig = s.access_token.rsplit('.').next().unwrap();
        let forged = format!("{}.{}.{sig}", b64(&header), b64(&claims));
        unauthorized(f.auth.verify_access_at(&forged, f.now));
    }
}

#[tokio::test]
async fn other_keys_and_algorithms_are_rejected() {
    let f = fixture().await;
    let s = f.auth.login("alice", ALICE_PW, LOCAL, f.now).await.unwrap();
    let claims: Claims = serde_json::from_value(payload(&s.access_token)).unwrap();
    let other = EncodingKey::from_secret(&[7u8; 32]);
    let forged = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &other).unwrap();
    unauthorized(f.auth.verify_access_at(&forged, f.now));
    // Same secret, another HMAC algorithm: the algorithm is pinned.
    let same = EncodingKey::from_secret(&[42u8; 32]);
    for alg in [Algorithm::HS384, Algorithm::HS512] {
        let t = jsonwebtoken::encode(&Header::new(alg), &claims, &same).unwrap();
        unauthorized(f.auth.verify_access_at(&t, f.now));
    }
    // Control: the same claims signed properly are accepted.
    let t = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &same).unwrap();
    f.auth.verify_access_at(&t, f.now).unwrap();
    for junk in ["", "a.b.c", "not a token", &"x".repeat(MAX_TOKEN_BYTES + 1)] {
        unauthorized(f.auth.verify_access_at(junk, f.now));
    }
}

#[tokio::test]
async fn tampered_payload_is_rejected() {
    let f = fixture().await;
    let s = f.auth.login("alice", ALICE_PW, LOCAL, f.now).await.unwrap();
    let mut parts = s.access_token.split('.');
    let (h, p, sig) = (
        parts.next().unwrap(),
        parts.next().unwrap(),
        parts.next().unwrap(),
    );
    let original: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(p).unwrap()).unwrap();
    for (k, v) in [
        ("role", serde_json::json!("admin")),
        ("sub", serde_json::json!("root")),
        (
            "exp",
            serde_json::json!(original["exp"].as_u64().unwrap() + 3600),
        ),
    ] {
        let mut claims = original.clone();
        claims[k] = v;
        let forged = format!("{h}.{}.{sig}", b64(&claims));
        unauthorized(f.auth.verify_access_at(&forged, f.now));
    }
    // Flipping one bit of the signature.
    let mut bad_sig = URL_SAFE_NO_PAD.decode(sig).unwrap();
    bad_sig[0] ^= 1;
    let forged = format!("{h}.{p}.{}", URL_SAFE_NO_PAD.encode(bad_sig));
    unauthorized(f.auth.verify_access_at(&forged, f.now));
}

#[tokio::test]
async fn expiry_with_leeway() {
    let f = fixture().await;
    let s = f.auth.login("alice", ALICE_PW, LOCAL, f.now).await.unwrap();
    let exp_ms = payload(&s.access_token)["exp"].as_u64().unwrap() * 1000;
    f.auth
        .verify_access_at(&s.access_token, exp_ms + 4_000)
        .unwrap();
    assert_eq!(
        unauthorized(f.auth.verify_access_at(&s.access_token, exp_ms + 6_000)),
        "token expired"
    );
    // A token issued long ago is expired by the wall clock too.
    let old = f
        .auth
        .login(
            "root",
            ALICE_PW,
            "192.0.2.1".parse().unwrap(),
            f.now - 3_600_000,
        )
        .await
        .unwrap();
    assert_eq!(
        unauthorized(f.auth.verify_access(&old.access_token)),
        "token expired"
    );
    // An expired refresh token does not refresh.
    unauthorized(
        f.auth
            .refresh(&s.refresh_token, f.now + 8 * 86_400_000)
            .await,
    );
}

#[tokio::test]
async fn token_types_cannot_stand_in_for_each_other() {
    let f = fixture().await;
    let s = f.auth.login("alice", ALICE_PW, LOCAL, f.now).await.unwrap();
    assert_eq!(
        unauthorized(f.auth.verify_access_at(&s.refresh_token, f.now)),
        INVALID_TOKEN
    );
    unauthorized(f.auth.refresh(&s.access_token, f.now).await);
    unauthorized(f.auth.logout(&s.access_token).await);
    // A hand-signed access token of a session that does not exist is nobody.
    let mut c: Claims = serde_json::from_value(payload(&s.access_token)).unwrap();
    c.fam = Some("f".into());
    let t = f.auth.sign(&c).unwrap();
    unauthorized(f.auth.caller(&t).await);
    unauthorized(f.auth.refresh(&t, f.now).await);
    // Nor is one of no session at all.
    c.fam = None;
    let t = f.auth.sign(&c).unwrap();
    unauthorized(f.auth.verify_access_at(&t, f.now));
    // The session still works after these attempts.
    f.auth.refresh(&s.refresh_token, f.now).await.unwrap();
}

#[tokio::test]
async fn refresh_rotates_and_reuse_revokes_the_family() {
    let f = fixture().await;
    let s0 = f.auth.login("alice", ALICE_PW, LOCAL, f.now).await.unwrap();
    let s1 = f
        .auth
        .refresh(&s0.refresh_token, f.now + 1_000)
        .await
        .unwrap();
    let s2 = f
        .auth
        .refresh(&s1.refresh_token, f.now + 2_000)
        .await
        .unwrap();
    let fam = |t: &str| payload(t)["fam"].as_str().unwrap().to_owned();
    assert_eq!(fam(&s0.refresh_token), fam(&s2.refresh_token));
    assert_ne!(s1.refresh_token, s2.refresh_token);
    f.auth.verify_access_at(&s2.access_token, f.now).unwrap();

    // A second, unrelated session of the same user.
    let other = f.auth.login("alice", ALICE_PW, LOCAL, f.now).await.unwrap();

    // Replaying a consumed token: refused, and the newest token of that family
    // stops working too.
    assert_eq!(
        unauthorized(f.auth.refresh(&s0.refresh_token, f.now + 3_000).await),
        SESSION_ENDED
    );
    unauthorized(f.auth.refresh(&s2.refresh_token, f.now + 4_000).await);
    let log = f.auth.repo().audit_log(1).await.unwrap();
    assert_eq!(log[0].action, "refresh_reused");
    assert_eq!(log[0].target, "alice");
    // The other family is untouched.
    f.auth
        .refresh(&other.refresh_token, f.now + 5_000)
        .await
        .unwrap();
}

#[tokio::test]
async fn logout_revokes_the_family_and_is_idempotent() {
    let f = fixture().await;
    let s0 = f.auth.login("alice", ALICE_PW, LOCAL, f.now).await.unwrap();
    let s1 = f.auth.refresh(&s0.refresh_token, f.now).await.unwrap();
    f.auth.logout(&s0.refresh_token).await.unwrap();
    f.auth.logout(&s1.refresh_token).await.unwrap();
    unauthorized(f.auth.refresh(&s1.refresh_token, f.now).await);
    // Garbage is not a logout.
    unauthorized(f.auth.logout("nonsense").await);
}

#[tokio::test]
async fn disabled_or_deleted_users_cannot_refresh() {
    let f = fixture().await;
    let s = f.auth.login("alice", ALICE_PW, LOCAL, f.now).await.unwrap();
    f.auth
        .repo()
        .update_user(
            "alice",
            UserPatch {
                disabled: Some(true),
                ..UserPatch::default()
            },
        )
        .await
        .unwrap();
    unauthorized(f.auth.refresh(&s.refresh_token, f.now).await);

    let s = f.auth.login("root", ALICE_PW, LOCAL, f.now).await.unwrap();
    // A second admin so that root may be deleted.
    f.auth
        .repo()
        .update_user(
            "alice",
            UserPatch {
                disabled: Some(false),
                role: Some(Role::Admin),
                ..UserPatch::default()
            },
        )
        .await
        .unwrap();
    assert!(f.auth.repo().delete_user("root").await.unwrap());
    unauthorized(f.auth.refresh(&s.refresh_token, f.now).await);
}

#[tokio::test]
async fn a_role_change_ends_sessions_and_the_next_one_has_the_role() {
    let f = fixture().await;
    let s = f.auth.login("alice", ALICE_PW, LOCAL, f.now).await.unwrap();
    f.auth
        .repo()
        .update_user(
            "alice",
            UserPatch {
                role: Some(Role::Admin),
                ..UserPatch::default()
            },
        )
        .await
        .unwrap();
    // Tokens carry the role: the old session ends rather than keep the old one.
    unauthorized(f.auth.refresh(&s.refresh_token, f.now).await);
    unauthorized(f.auth.caller(&s.access_token).await);
    let s = f.auth.login("alice", ALICE_PW, LOCAL, f.now).await.unwrap();
    let c = f.auth.verify_access_at(&s.access_token, f.now).unwrap();
    assert_eq!(c.role, Role::Admin);
}

#[test]
fn rate_limiter_buckets() {
    let rl = RateLimiter::new(5, Duration::from_secs(30), 100);
    let t0 = 1_000_000;
    for _ in 0..5 {
        rl.check("alice", t0).unwrap();
    }
    match rl.check("alice", t0) {
        Err(Error::RateLimited { retry_after_secs }) => assert_eq!(retry_after_secs, 30),
        other => panic!("{other:?}"),
    }
    // Other keys are independent.
    rl.check("bob", t0).unwrap();
    // 10 s later: 20 s to go.
    match rl.check("alice", t0 + 10_000) {
        Err(Error::RateLimited { retry_after_secs }) => assert_eq!(retry_after_secs, 20),
        other => panic!("{other:?}"),
    }
    // One token back after 30 s, and only one.
    rl.check("alice", t0 + 30_000).unwrap();
    assert!(rl.check("alice", t0 + 30_000).is_err());
    // Fully refilled after 5 × 30 s.
    let later = t0 + 30_000 + 150_000;
    for _ in 0..5 {
        rl.check("alice", later).unwrap();
    }
    assert!(rl.check("alice", later).is_err());
}

#[test]
fn rate_limiter_survives_a_clock_step_back() {
    let rl = RateLimiter::new(5, Duration::from_secs(30), 100);
    let t0 = 10_000_000;
    rl.check("alice", t0).unwrap();
    // The clock jumps back an hour: at worst one refill interval to wait.
    match rl.check("alice", t0 - 3_600_000) {
        Err(Error::RateLimited { retry_after_secs }) => assert!(retry_after_secs <= 30),
        other => panic!("{other:?}"),
    }
    rl.check("alice", t0 - 3_600_000 + 30_000).unwrap();
}

#[test]
fn rate_limiter_memory_is_bounded() {
    let rl = RateLimiter::new(2, Duration::from_secs(1), 3);
    let t0 = 1_000_000;
    for k in ["a", "b", "c"] {
        rl.check(k, t0).unwrap();
    }
    rl.check("a", t0).unwrap();
    assert_eq!(rl.len(), 3);
    // Full and busy: the fullest bucket ("b" or "c", not the drained "a") goes.
    rl.check("d", t0).unwrap();
    assert_eq!(rl.len(), 3);
    assert!(rl.check("a", t0).is_err(), "drained key must be kept");
    // Later, idle keys are swept instead.
    for i in 0..50 {
        rl.check(&format!("k{i}"), t0 + 10_000 + i).unwrap();
        assert!(rl.len() <= 3);
    }
    // The periodic sweep drops keys whose buckets refilled.
    rl.check("z", t0 + 120_000).unwrap();
    assert_eq!(rl.len(), 1);
}

#[test]
fn rate_limiter_is_thread_safe() {
    let rl = Arc::new(RateLimiter::new(100, Duration::from_secs(3600), 10));
    let ok = AtomicU64::new(0);
    std::thread::scope(|s| {
        for _ in 0..8 {
            s.spawn(|| {
                for _ in 0..50 {
                    if rl.check("k", 5_000).is_ok() {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
    });
    assert_eq!(ok.load(Ordering::Relaxed), 100);
}

#[test]
fn client_keys() {
    assert_eq!(client_key(LOCAL), "127.0.0.1");
    let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
    let b: IpAddr = "2001:db8:1:2:bbbb::2".parse().unwrap();
    let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
    assert_eq!(client_key(a), client_key(b));
    assert_ne!(client_key(a), client_key(c));
    let mapped = IpAddr::V6(Ipv4Addr::new(10, 0, 0, 1).to_ipv6_mapped());
    assert_eq!(client_key(mapped), "10.0.0.1");
    assert_eq!(client_key(IpAddr::V6(Ipv6Addr::LOCALHOST)), "0:0:0:0::/64");
}

#[tokio::test]
async fn login_is_rate_limited_per_user_and_per_client() {
    let f = fixture().await;
    let t = f.now;
    for _ in 0..LOGIN_PER_USER_BURST {
        unauthorized(f.auth.login("alice", "wrong password!", LOCAL, t).await);
    }
    // Even the right password is refused now, before argon2 runs.
    let before = f.auth.passwords.argon2_runs.load(Ordering::Relaxed);
    match f.auth.login("alice", ALICE_PW, LOCAL, t).await {
        Err(Error::RateLimited { retry_after_secs }) => assert_eq!(retry_after_secs, 30),
        other => panic!("{other:?}"),
    }
    assert_eq!(f.auth.passwords.argon2_runs.load(Ordering::Relaxed), before);
    // Other users are unaffected, and alice may try again 30 s later.
    f.auth.login("root", ALICE_PW, LOCAL, t).await.unwrap();
    f.auth
        .login("alice", ALICE_PW, LOCAL, t + 30_000)
        .await
        .unwrap();

    // One client spraying names hits the per-client limit (30 in total).
    let client: IpAddr = "192.0.2.7".parse().unwrap();
    let mut limited = None;
    for i in 0..40 {
        match f.auth.login(&format!("u{i}"), ALICE_PW, client, t).await {
            Err(Error::Unauthorized(_)) => {}
            Err(Error::RateLimited { .. }) => {
                limited = Some(i);
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(limited, Some(LOGIN_PER_CLIENT_BURST));
    // Another client still gets in.
    f.auth
        .login("root", ALICE_PW, "192.0.2.8".parse().unwrap(), t + 30_000)
        .await
        .unwrap();
}

#[test]
fn signing_key_is_generated_private_and_stable() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let k1 = SigningKey::load_or_create(None, &data).unwrap();
    let path = data.join("signing.key");
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(bytes.len(), 32);
    assert_ne!(bytes, [0u8; 32]);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    }
    assert_eq!(format!("{k1:?}"), "SigningKey(<redacted>)");
    // A restart reads the same key: a token signed before verifies after.
    let k2 = SigningKey::load_or_create(None, &data).unwrap();
    let claims = Claims {
        sub: "alice".into(),
        role: Role::User,
        typ: TokenType::Access,
        iat: 1,
        exp: u64::MAX / 2,
        jti: "j".into(),
        fam: None,
        own: None,
        srv: None,
    };
    let t = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &k1.encoding).unwrap();
    let v = Validation::new(Algorithm::HS256);
    jsonwebtoken::decode::<Claims>(&t, &k2.decoding, &v).unwrap();
    // A fresh data dir gets a different key.
    let k3 = SigningKey::load_or_create(None, &dir.path().join("other")).unwrap();
    assert!(jsonwebtoken::decode::<Claims>(&t, &k3.decoding, &v).is_err());
    // No temp files are left behind.
    let names: Vec<_> = std::fs::read_dir(&data)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["signing.key"]);
}

#[test]
fn explicit_signing_key_file() {
    let dir = tempfile::tempdir().unwrap();
    let short = dir.path().join("short.key");
    std::fs::write(&short, [1u8; 31]).unwrap();
    let err = SigningKey::load_or_create(Some(&short), dir.path()).unwrap_err();
    assert!(matches!(err, Error::Config(_)), "{err:?}");
    assert!(err.to_string().contains("short.key"), "{err}");
    let good = dir.path().join("good.key");
    std::fs::write(&good, [1u8; 48]).unwrap();
    SigningKey::load_or_create(Some(&good), dir.path()).unwrap();
    // The explicit file is used as is: nothing is generated in the data dir.
    assert!(!dir.path().join("signing.key").exists());
    let missing = dir.path().join("missing.key");
    let err = SigningKey::load_or_create(Some(&missing), dir.path()).unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err:?}");
}

#[test]
fn generated_passwords() {
    let p = generate_password().unwrap();
    assert_eq!(p.len(), GENERATED_PASSWORD_LEN);
    assert!(p.bytes().all(|b| b.is_ascii_alphanumeric()));
    assert_ne!(p, generate_password().unwrap());
}

async fn bare_auth() -> (tempfile::TempDir, Auth) {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&dir.path().join("kcloud.db")).unwrap());
    let auth = Auth::with_hasher(
        store,
        SigningKey::generate().unwrap(),
        AuthConfig::default(),
        Hasher::insecure_fast_for_tests(),
    );
    (dir, auth)
}

#[tokio::test]
async fn bootstrap_with_password_from_env() {
    let (_dir, auth) = bare_auth().await;
    let got = auth
        .bootstrap_admin(Some("boss".into()), Some(ALICE_PW.into()), None)
        .await
        .unwrap();
    assert_eq!(got, None);
    let s = auth.login("boss", ALICE_PW, LOCAL, now_ms()).await.unwrap();
    assert_eq!(s.user.role, Role::Admin);
    // A second start with another password changes nothing.
    let got = auth
        .bootstrap_admin(Some("boss".into()), Some("another password".into()), None)
        .await
        .unwrap();
    assert_eq!(got, None);
    auth.login("boss", ALICE_PW, LOCAL, now_ms()).await.unwrap();
    unauthorized(
        auth.login("boss", "another password", LOCAL, now_ms())
            .await,
    );
    assert_eq!(auth.repo().users().await.unwrap().len(), 1);
    let log = auth.repo().audit_log(10).await.unwrap();
    assert!(
        log.iter()
            .any(|e| e.action == "bootstrap_admin" && e.target == "boss")
    );
}

#[tokio::test]
async fn bootstrap_with_password_file() {
    let (dir, auth) = bare_auth().await;
    let file = dir.path().join("pw");
    std::fs::write(&file, format!("{ALICE_PW}\n")).unwrap();
    assert_eq!(
        auth.bootstrap_admin(None, None, Some(file.clone()))
            .await
            .unwrap(),
        None
    );
    // One trailing newline is dropped, nothing else.
    auth.login("admin", ALICE_PW, LOCAL, now_ms())
        .await
        .unwrap();

    let (dir, auth) = bare_auth().await;
    let file = dir.path().join("pw");
    std::fs::write(&file, format!(" {ALICE_PW}\r\n")).unwrap();
    auth.bootstrap_admin(None, None, Some(file)).await.unwrap();
    auth.login("admin", &format!(" {ALICE_PW}"), LOCAL, now_ms())
        .await
        .unwrap();
}

#[tokio::test]
async fn bootstrap_generates_once() {
    let (_dir, auth) = bare_auth().await;
    let pw = auth
        .bootstrap_admin(None, None, None)
        .await
        .unwrap()
        .expect("a generated password");
    assert_eq!(pw.len(), 24);
    let s = auth.login("admin", &pw, LOCAL, now_ms()).await.unwrap();
    assert_eq!(s.user.role, Role::Admin);
    // Second start: nothing generated, nothing changed.
    assert_eq!(auth.bootstrap_admin(None, None, None).await.unwrap(), None);
    auth.login("admin", &pw, LOCAL, now_ms()).await.unwrap();
    // A user name without a password does not create that user.
    assert_eq!(
        auth.bootstrap_admin(Some("other".into()), None, None)
            .await
            .unwrap(),
        None
    );
    assert!(auth.repo().user("other").await.unwrap().is_none());
}

#[tokio::test]
async fn bootstrap_never_touches_existing_users() {
    let (_dir, auth) = bare_auth().await;
    // "admin" exists as a plain user; no admin exists at all.
    let password_hash = auth.hash_password(ALICE_PW).await.unwrap();
    auth.repo()
        .create_user(NewUser {
            name: "admin".into(),
            password_hash,
            role: Role::User,
            quota: Quota::default(),
        })
        .await
        .unwrap();
    assert_eq!(auth.bootstrap_admin(None, None, None).await.unwrap(), None);
    assert_eq!(
        auth.bootstrap_admin(None, Some("a different password".into()), None)
            .await
            .unwrap(),
        None
    );
    let admin = auth.repo().user("admin").await.unwrap().unwrap();
    assert_eq!(admin.user.role, Role::User);
    auth.login("admin", ALICE_PW, LOCAL, now_ms())
        .await
        .unwrap();
}

#[tokio::test]
async fn bootstrap_config_errors() {
    let (dir, auth) = bare_auth().await;
    let file = dir.path().join("pw");
    std::fs::write(&file, ALICE_PW).unwrap();
    for (user, pw, file) in [
        (None, Some(ALICE_PW.to_owned()), Some(file.clone())),
        (None, Some("short".to_owned()), None),
        (Some("Bad_Name".to_owned()), Some(ALICE_PW.to_owned()), None),
    ] {
        let err = auth.bootstrap_admin(user, pw, file).await.unwrap_err();
        assert!(matches!(err, Error::Config(_)), "{err:?}");
        assert!(!err.to_string().contains(ALICE_PW), "{err}");
    }
    let err = auth
        .bootstrap_admin(None, None, Some(dir.path().join("missing")))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err:?}");
    assert!(auth.repo().users().await.unwrap().is_empty());
}

#[tokio::test]
async fn open_codes_are_single_use_and_bound_to_owner_and_server() {
    let f = fixture().await;
    let s = f
        .auth
        .login("alice", ALICE_PW, LOCAL, now_ms())
        .await
        .unwrap();
    let alice = f.auth.caller(&s.access_token).await.unwrap();
    assert!(alice.session.is_some());

    // Redeemed on its owner's origin: the server and a token for it alone.
    let code = f.auth.open_code(&alice, "alice", "lab").unwrap();
    let (server, token) = f.auth.redeem(&code, "alice").unwrap();
    assert_eq!(server, "lab");
    let c = f.auth.proxy_caller(&token, "alice", "lab").await.unwrap();
    assert_eq!(c.name, "alice");
    unauthorized(f.auth.proxy_caller(&token, "alice", "other").await);
    unauthorized(f.auth.proxy_caller(&token, "bob", "lab").await);
    // Good once.
    unauthorized(f.auth.redeem(&code, "alice"));
    // Not an API token, and an API token is not a server's cookie.
    unauthorized(f.auth.caller(&token).await);
    unauthorized(f.auth.proxy_caller(&s.access_token, "alice", "lab").await);
    // On another user's origin the code is refused, and spent.
    let code = f.auth.open_code(&alice, "alice", "lab").unwrap();
    unauthorized(f.auth.redeem(&code, "bob"));
    unauthorized(f.auth.redeem(&code, "alice"));
    unauthorized(f.auth.redeem("made-up", "alice"));
    // The platform itself has no session to bind a code to.
    assert!(f.auth.open_code(&Caller::system(), "alice", "lab").is_err());

    // The server's token ends with its session.
    f.auth.logout(&s.refresh_token).await.unwrap();
    unauthorized(f.auth.proxy_caller(&token, "alice", "lab").await);
}
