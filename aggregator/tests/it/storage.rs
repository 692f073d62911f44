//! Storage over real HTTP: volumes with quotas, the file browser (round trip, ranges,
//! the path attack corpus with symlinks planted inside a volume), the ownership matrix,
//! NFS shares from config, mounting volumes into servers, and streaming with flat
//! memory.
//!
//! Attack paths go over a raw TCP connection: HTTP clients normalise `..` and `%2e%2e`
//! away before sending, and an attacker's client does not.

use std::path::{Path, PathBuf};
use std::time::Instant;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::app::{A_PW, ADMIN_PW, B_PW, Resp, TestApp};

/// The aggregator with a settings file; the helpers of the storage tests.
struct App(TestApp);

impl std::ops::Deref for App {
    type Target = TestApp;

    fn deref(&self) -> &TestApp {
        &self.0
    }
}

impl App {
    /// An aggregator whose settings add `extra_toml`; `{dir}` in it is the test's
    /// temporary directory.
    async fn start(extra_toml: &str) -> App {
        App(TestApp::builder()
            .settings(extra_toml)
            .args(["--stop-grace", "2s"])
            .start()
            .await)
    }

    fn data(&self) -> PathBuf {
        self.0.data.clone()
    }

    fn volume_dir(&self, owner: &str, name: &str) -> PathBuf {
        self.data().join("volumes").join(owner).join(name)
    }

    async fn put(&self, path: &str, token: &str, bytes: impl Into<reqwest::Body>) -> Resp {
        let req = self
            .client
            .put(format!("{}{path}", self.base))
            .bearer_auth(token)
            .body(bytes);
        Resp::from(req.send().await.expect("request")).await
    }

    async fn get_bytes(
        &self,
        path: &str,
        token: &str,
        range: Option<&str>,
    ) -> (StatusCode, reqwest::header::HeaderMap, Vec<u8>) {
        let mut req = self
            .client
            .get(format!("{}{path}", self.base))
            .bearer_auth(token);
        if let Some(r) = range {
            req = req.header("range", r);
        }
        let resp = req.send().await.unwrap();
        (
            resp.status(),
            resp.headers().clone(),
            resp.bytes().await.unwrap().to_vec(),
        )
    }

    /// One request with the path exactly as given, over raw TCP. Returns the status
    /// and the body text.
    async fn raw(&self, method: &str, path: &str, token: &str, body: &[u8]) -> (u16, String) {
        let mut tcp = tokio::net::TcpStream::connect(&self.addr).await.unwrap();
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {token}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            self.addr,
            body.len()
        );
        tcp.write_all(head.as_bytes()).await.unwrap();
        tcp.write_all(body).await.unwrap();
        let mut out = Vec::new();
        tcp.read_to_end(&mut out).await.unwrap();
        let text = String::from_utf8_lossy(&out).into_owned();
        let status = text
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no status in {text:?}"));
        let body = text
            .split_once("\r\n\r\n")
            .map_or("", |(_, b)| b)
            .to_owned();
        (status, body)
    }

    /// Admin, alice and bob (bob with a small storage quota), with access tokens.
    async fn users(&self) -> (String, String, String) {
        let admin = self.token("admin", ADMIN_PW).await;
        for (name, pw, quota) in [
            ("alice", A_PW, json!({})),
            ("bob", B_PW, json!({"storage_bytes": 3 << 20})),
        ] {
            let r = self
                .call(
                    Method::POST,
                    "/api/v1/users",
                    Some(&admin),
                    Some(json!({"name": name, "password": pw, "quota": quota})),
                )
                .await;
            assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
        }
        (
            admin,
            self.token("alice", A_PW).await,
            self.token("bob", B_PW).await,
        )
    }

    async fn volume(&self, token: &str, owner: &str, name: &str, size: Value) -> Value {
        let r = self
            .call(
                Method::POST,
                &format!("/api/v1/users/{owner}/volumes"),
                Some(token),
                Some(json!({"name": name, "size": size})),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
        r.body
    }
}

fn assert_error(r: &Resp, status: StatusCode, needle: &str) {
    assert_eq!(r.status, status, "{:?}", r.body);
    let msg = r.body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        r.body["error"]["code"].is_string() && msg.contains(needle),
        "wanted {needle:?} in {:?}",
        r.body
    );
}

/// Every file below `dir` with its contents (links not followed).
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd {
            let e = e.unwrap();
            let ft = e.file_type().unwrap();
            if ft.is_dir() {
                stack.push(e.path());
            } else if ft.is_file() {
                out.push((e.path(), std::fs::read(e.path()).unwrap()));
            } else {
                out.push((
                    e.path(),
                    std::fs::read_link(e.path())
                        .unwrap()
                        .into_os_string()
                        .into_encoded_bytes(),
                ));
            }
        }
    }
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volumes_have_names_sizes_quotas_and_owners() {
    let app =
        App::start("[storage]\nmax_volume_bytes = 1073741824\ndefault_volume_bytes = 1048576\n")
            .await;
    let (admin, alice, bob) = app.users().await;
    let v = app.volume(&alice, "alice", "data", json!("10Mi")).await;
    assert_eq!(v["name"], "data");
    assert_eq!(v["owner"], "alice");
    assert_eq!(v["size_bytes"], 10 << 20);
    assert_eq!(v["status"], "bound");
    assert_eq!(v["access_mode"], "ReadWriteMany");
    assert_eq!(v["mounted_by"], json!([]));
    assert!(app.volume_dir("alice", "data").is_dir());
    let v = app.volume(&admin, "alice", "scratch", json!(4096)).await;
    assert_eq!(v["size_bytes"], 4096);

    let list = app
        .call(
            Method::GET,
            "/api/v1/users/alice/volumes",
            Some(&alice),
            None,
        )
        .await;
    let names: Vec<&str> = list
        .body
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["data", "scratch"]);

    for (body, status, needle) in [
        (json!({"name": "Data"}), StatusCode::BAD_REQUEST, "DNS-1123"),
        (json!({"name": "../x"}), StatusCode::BAD_REQUEST, "DNS-1123"),
        (
            json!({"name": "x", "size": "2Gi"}),
            StatusCode::BAD_REQUEST,
            "size",
        ),
        (
            json!({"name": "x", "size": "1.5Gi"}),
            StatusCode::BAD_REQUEST,
            "size",
        ),
        (
            json!({"name": "x", "size": 0}),
            StatusCode::BAD_REQUEST,
            "size",
        ),
        (
            json!({"name": "x", "access_mode": "ReadOnlyMany"}),
            StatusCode::BAD_REQUEST,
            "",
        ),
        (
            json!({"name": "x", "server": "nfs.evil", "path": "/"}),
            StatusCode::BAD_REQUEST,
            "",
        ),
        (json!({"name": "data"}), StatusCode::CONFLICT, "in use"),
    ] {
        let r = app
            .call(
                Method::POST,
                "/api/v1/users/alice/volumes",
                Some(&alice),
                Some(body.clone()),
            )
            .await;
        assert_error(&r, status, needle);
    }
    // Bob's storage quota is 3 MiB: a 2 MiB volume fits, a second one does not.
    app.volume(&bob, "bob", "small", json!("2Mi")).await;
    let r = app
        .call(
            Method::POST,
            "/api/v1/users/bob/volumes",
            Some(&bob),
            Some(json!({"name": "more", "size": "2Mi"})),
        )
        .await;
    assert_error(&r, StatusCode::TOO_MANY_REQUESTS, "storage quota");
    assert!(!app.volume_dir("bob", "more").exists());

    // Another user's volumes do not exist for bob; admins see and delete all.
    for (method, path) in [
        (Method::GET, "/api/v1/users/alice/volumes"),
        (Method::POST, "/api/v1/users/alice/volumes"),
        (Method::DELETE, "/api/v1/users/alice/volumes/data"),
    ] {
        let r = app
            .call(
                method.clone(),
                path,
                Some(&bob),
                Some(json!({"name": "evil"})),
            )
            .await;
        assert_eq!(
            r.status,
            StatusCode::NOT_FOUND,
            "{method} {path}: {:?}",
            r.body
        );
        let r = app
            .call(method.clone(), path, None, Some(json!({"name": "evil"})))
            .await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{method} {path}");
    }
    assert!(app.volume_dir("alice", "data").is_dir());
    let r = app
        .call(
            Method::GET,
            "/api/v1/users/alice/volumes",
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(r.body.as_array().unwrap().len(), 2);

    std::fs::write(app.volume_dir("alice", "scratch").join("f"), "x").unwrap();
    let r = app
        .call(
            Method::DELETE,
            "/api/v1/users/alice/volumes/scratch",
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{:?}", r.body);
    assert!(!app.volume_dir("alice", "scratch").exists());
    let r = app
        .call(
            Method::DELETE,
            "/api/v1/users/alice/volumes/scratch",
            Some(&alice),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    // The name is free again, and the new volume is empty.
    app.volume(&alice, "alice", "scratch", json!(4096)).await;
    assert_eq!(
        std::fs::read_dir(app.volume_dir("alice", "scratch"))
            .unwrap()
            .count(),
        0
    );

    let spec = app
        .call(Method::GET, "/api/openapi.json", None, None)
        .await
        .body;
    for p in [
        "/api/v1/users/{user}/volumes",
        "/api/v1/users/{user}/volumes/{volume}",
        "/api/v1/users/{user}/volumes/{volume}/files/{path}",
        "/api/v1/shares",
        "/api/v1/shares/{share}/files/{path}",
    ] {
        assert!(spec["paths"][p].is_object(), "{p} not documented");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_file_browser_round_trips_files_and_folders() {
    let app = App::start("").await;
    let (_admin, alice, _bob) = app.users().await;
    app.volume(&alice, "alice", "data", json!("1Mi")).await;
    let f = |p: &str| format!("/api/v1/users/alice/volumes/data/files/{p}");

    let r = app.put(&f("hello.txt"), &alice, "hello, volume").await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    assert_eq!(r.body["name"], "hello.txt");
    assert_eq!(r.body["type"], "file");
    assert_eq!(r.body["size"], 13);
    assert_error(
        &app.put(&f("hello.txt"), &alice, "again").await,
        StatusCode::CONFLICT,
        "overwrite=true",
    );
    let r = app
        .put(&f("hello.txt?overwrite=true"), &alice, "hello, world!")
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    assert_error(
        &app.put(&f("no/such/folder.txt"), &alice, "x").await,
        StatusCode::NOT_FOUND,
        "no/such",
    );

    let r = app
        .call(
            Method::POST,
            &f("results/run-1"),
            Some(&alice),
            Some(json!({"op": "mkdir"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    assert_eq!(r.body["type"], "dir");
    let r = app
        .call(
            Method::POST,
            &f("results"),
            Some(&alice),
            Some(json!({"op": "mkdir"})),
        )
        .await;
    assert_error(&r, StatusCode::CONFLICT, "exists");
    assert_eq!(
        app.put(&f("results/run-1/out.csv"), &alice, "a,b\n1,2\n")
            .await
            .status,
        StatusCode::CREATED
    );
    assert_eq!(
        app.put(&f(".secret"), &alice, "dot").await.status,
        StatusCode::CREATED
    );
    for i in 0..5 {
        app.put(&f(&format!("n{i}")), &alice, "x").await;
    }

    // Listing: folders first, then names; hidden only on request; paged.
    let r = app.call(Method::GET, &f(""), Some(&alice), None).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let names: Vec<&str> = r.body["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["results", "hello.txt", "n0", "n1", "n2", "n3", "n4"]
    );
    assert_eq!(r.body["total"], 7);
    assert_eq!(r.body["path"], "");
    let same = app
        .call(
            Method::GET,
            "/api/v1/users/alice/volumes/data/files",
            Some(&alice),
            None,
        )
        .await;
    assert_eq!(same.body, r.body);
    let r = app
        .call(
            Method::GET,
            &f("?hidden=true&offset=1&limit=2"),
            Some(&alice),
            None,
        )
        .await;
    let names: Vec<&str> = r.body["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, [".secret", "hello.txt"]);
    assert_eq!(r.body["next_offset"], 3);
    assert_eq!(r.body["total"], 8);
    assert_error(
        &app.call(Method::GET, &f("?limit=0"), Some(&alice), None)
            .await,
        StatusCode::BAD_REQUEST,
        "limit",
    );
    assert_error(
        &app.call(Method::GET, &f("?bogus=1"), Some(&alice), None)
            .await,
        StatusCode::BAD_REQUEST,
        "",
    );
    let r = app
        .call(
            Method::GET,
            &f("results/run-1/out.csv?stat=true"),
            Some(&alice),
            None,
        )
        .await;
    assert_eq!(r.body["path"], "results/run-1/out.csv");
    assert_eq!(r.body["size"], 8);
    assert!(r.body["modified_ms"].as_u64().unwrap() > 0);

    // Download: whole, ranges, attachment, and a range past the end.
    let (status, h, bytes) = app.get_bytes(&f("hello.txt"), &alice, None).await;
    assert_eq!(
        (status, bytes.as_slice()),
        (StatusCode::OK, &b"hello, world!"[..])
    );
    assert_eq!(h["accept-ranges"], "bytes");
    assert_eq!(h["content-type"], "text/plain; charset=utf-8");
    assert_eq!(h["x-content-type-options"], "nosniff");
    assert!(
        h["content-security-policy"]
            .to_str()
            .unwrap()
            .contains("sandbox")
    );
    let (status, h, bytes) = app
        .get_bytes(&f("hello.txt"), &alice, Some("bytes=7-11"))
        .await;
    assert_eq!(
        (status, bytes.as_slice()),
        (StatusCode::PARTIAL_CONTENT, &b"world"[..])
    );
    assert_eq!(h["content-range"], "bytes 7-11/13");
    let (_, _, bytes) = app
        .get_bytes(&f("hello.txt"), &alice, Some("bytes=-6"))
        .await;
    assert_eq!(bytes, b"world!");
    let (status, h, _) = app
        .get_bytes(&f("hello.txt"), &alice, Some("bytes=13-"))
        .await;
    assert_eq!(status, StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(h["content-range"], "bytes */13");
    let (_, h, _) = app
        .get_bytes(&f("results/run-1/out.csv?download=true"), &alice, None)
        .await;
    assert_eq!(
        h["content-disposition"],
        "attachment; filename*=UTF-8''out.csv"
    );
    assert_eq!(
        app.get_bytes(&f("nope.txt"), &alice, None).await.0,
        StatusCode::NOT_FOUND
    );

    // Rename inside the volume; never over an existing name.
    let r = app
        .call(
            Method::POST,
            &f("hello.txt"),
            Some(&alice),
            Some(json!({"op": "rename", "to": "results/hello.txt"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(r.body["path"], "results/hello.txt");
    let r = app
        .call(
            Method::POST,
            &f("n0"),
            Some(&alice),
            Some(json!({"op": "rename", "to": "n1"})),
        )
        .await;
    assert_error(&r, StatusCode::CONFLICT, "exists");
    let r = app
        .call(
            Method::POST,
            &f("n0"),
            Some(&alice),
            Some(json!({"op": "rename", "to": "../n1"})),
        )
        .await;
    assert_error(&r, StatusCode::BAD_REQUEST, "..");
    let r = app
        .call(
            Method::POST,
            &f("n0"),
            Some(&alice),
            Some(json!({"op": "chmod"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{:?}", r.body);

    // Delete: a folder with contents only recursively; the root never.
    assert_error(
        &app.call(Method::DELETE, &f("results"), Some(&alice), None)
            .await,
        StatusCode::CONFLICT,
        "recursive=true",
    );
    assert!(
        app.volume_dir("alice", "data")
            .join("results/hello.txt")
            .exists()
    );
    assert_eq!(
        app.call(
            Method::DELETE,
            &f("results?recursive=true"),
            Some(&alice),
            None
        )
        .await
        .status,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        app.call(Method::DELETE, &f("n0"), Some(&alice), None)
            .await
            .status,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        app.call(Method::DELETE, &f("n0"), Some(&alice), None)
            .await
            .status,
        StatusCode::NOT_FOUND
    );
    assert_error(
        &app.call(Method::DELETE, &f(""), Some(&alice), Some(json!({})))
            .await,
        StatusCode::BAD_REQUEST,
        "root",
    );
    assert!(app.volume_dir("alice", "data").is_dir());

    // The volume's size bounds uploads: 413, and no temporary is left.
    let big = vec![7u8; (1 << 20) + 1];
    assert_error(
        &app.put(&f("big.bin"), &alice, big).await,
        StatusCode::PAYLOAD_TOO_LARGE,
        "bytes left",
    );
    let left: Vec<String> = std::fs::read_dir(app.volume_dir("alice", "data"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        left.iter().all(|n| !n.starts_with(".kcloud-upload")),
        "{left:?}"
    );
    assert!(!left.contains(&"big.bin".to_owned()));
    // A streamed body without Content-Length is cut at the limit as well.
    let mut tcp = tokio::net::TcpStream::connect(&app.addr).await.unwrap();
    let head = format!(
        "PUT {} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {alice}\r\n\
         Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
        f("chunked.bin")
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    let chunk = vec![1u8; 64 << 10];
    for _ in 0..20 {
        // The server may answer 413 and close before the body ends.
        if tcp
            .write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
            .await
            .is_err()
            || tcp.write_all(&chunk).await.is_err()
            || tcp.write_all(b"\r\n").await.is_err()
        {
            break;
        }
    }
    let _ = tcp.write_all(b"0\r\n\r\n").await;
    let mut out = Vec::new();
    let _ = tcp.read_to_end(&mut out).await;
    let out = String::from_utf8_lossy(&out);
    assert!(out.starts_with("HTTP/1.1 413"), "{out}");
    assert!(!app.volume_dir("alice", "data").join("chunked.bin").exists());
    // Replacing a file frees its bytes for the new one.
    let r = app.put(&f("model.bin"), &alice, vec![1u8; 700 << 10]).await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    let r = app
        .put(&f("model.bin?overwrite=true"), &alice, vec![2u8; 700 << 10])
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    let r = app
        .put(&f("model-2.bin"), &alice, vec![3u8; 700 << 10])
        .await;
    assert_error(&r, StatusCode::PAYLOAD_TOO_LARGE, "bytes left");
    let r = app
        .call(
            Method::GET,
            "/api/v1/users/alice/volumes",
            Some(&alice),
            None,
        )
        .await;
    let used = r.body[0]["used_bytes"].as_u64();
    assert!(used.is_none_or(|u| u < 1 << 20), "{:?}", r.body);
}

/// Who may do what to a volume's files: the owner and admins everything; another
/// user 404 (the volume does not exist for them); nobody signed in 401. Nothing a
/// refused request sends is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_ownership_matrix() {
    let app = App::start("").await;
    let (admin, alice, bob) = app.users().await;
    app.volume(&alice, "alice", "data", json!("1Mi")).await;
    let vol = app.volume_dir("alice", "data");
    std::fs::write(vol.join("f.txt"), "alice's").unwrap();
    let base = "/api/v1/users/alice/volumes/data/files";
    for (who, token, want) in [
        ("bob", Some(bob.as_str()), StatusCode::NOT_FOUND),
        ("anonymous", None, StatusCode::UNAUTHORIZED),
        ("a bad token", Some("not-a-token"), StatusCode::UNAUTHORIZED),
    ] {
        for (method, path, body) in [
            (Method::GET, base.to_owned(), None),
            (Method::GET, format!("{base}/f.txt"), None),
            (Method::GET, format!("{base}/f.txt?stat=true"), None),
            (Method::PUT, format!("{base}/g.txt"), Some(json!("x"))),
            (
                Method::PUT,
                format!("{base}/f.txt?overwrite=true"),
                Some(json!("x")),
            ),
            (
                Method::POST,
                format!("{base}/d"),
                Some(json!({"op": "mkdir"})),
            ),
            (
                Method::POST,
                format!("{base}/f.txt"),
                Some(json!({"op": "rename", "to": "h.txt"})),
            ),
            (Method::DELETE, format!("{base}/f.txt"), None),
        ] {
            let r = app.call(method.clone(), &path, token, body).await;
            assert_eq!(r.status, want, "{who}: {method} {path}: {:?}", r.body);
            assert!(r.body["error"]["code"].is_string(), "{:?}", r.body);
        }
    }
    let names: Vec<String> = std::fs::read_dir(&vol)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["f.txt"]);
    assert_eq!(
        std::fs::read_to_string(vol.join("f.txt")).unwrap(),
        "alice's"
    );
    // Admins act on anyone's volume, like the owner.
    let (status, _, bytes) = app.get_bytes(&format!("{base}/f.txt"), &admin, None).await;
    assert_eq!(
        (status, bytes.as_slice()),
        (StatusCode::OK, &b"alice's"[..])
    );
    assert_eq!(
        app.put(&format!("{base}/from-admin.txt"), &admin, "x")
            .await
            .status,
        StatusCode::CREATED
    );
    let r = app
        .call(
            Method::DELETE,
            &format!("{base}/from-admin.txt"),
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let (status, _, _) = app.get_bytes(&format!("{base}/f.txt"), &alice, None).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_path_leaves_the_volume() {
    let app = App::start("").await;
    let (_admin, alice, bob) = app.users().await;
    app.volume(&alice, "alice", "data", json!("1Mi")).await;
    app.volume(&bob, "bob", "private", json!("1Mi")).await;
    let vol = app.volume_dir("alice", "data");
    let bobs = app.volume_dir("bob", "private");
    std::fs::write(bobs.join("secret.txt"), "bob's secret").unwrap();
    std::fs::write(vol.join("mine.txt"), "alice's").unwrap();
    std::fs::create_dir(vol.join("sub")).unwrap();
    // Links planted inside the volume (by a kernel, say): out to /etc, to bob's volume
    // (absolute and relative), and a loop.
    std::os::unix::fs::symlink("/etc", vol.join("etc-link")).unwrap();
    std::os::unix::fs::symlink(&bobs, vol.join("bob-abs")).unwrap();
    std::os::unix::fs::symlink("../../../bob/private", vol.join("sub/bob-rel")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", vol.join("passwd")).unwrap();
    std::os::unix::fs::symlink("loop", vol.join("loop")).unwrap();
    let outside = app.dir.path().to_owned();
    let before = snapshot(&outside.join("data/volumes/bob"));
    let before_alice: Vec<_> = snapshot(&vol);

    let long = "a".repeat(300);
    let attacks = [
        "../../bob/private/secret.txt".to_owned(),
        "..%2F..%2Fbob%2Fprivate%2Fsecret.txt".to_owned(),
        "%2e%2e/%2e%2e/bob/private/secret.txt".to_owned(),
        "%2E%2E%2F%2E%2E%2F%2E%2E%2F%2E%2E%2Fetc%2Fpasswd".to_owned(),
        "sub/../../../../etc/passwd".to_owned(),
        "/etc/passwd".to_owned(),
        "%2Fetc%2Fpasswd".to_owned(),
        "//etc/passwd".to_owned(),
        "mine.txt%00.png".to_owned(),
        "a%00/../../etc/passwd".to_owned(),
        "./mine.txt".to_owned(),
        "sub/./../mine.txt".to_owned(),
        long.clone(),
        format!("sub/{long}"),
        "etc-link/passwd".to_owned(),
        "etc-link/new-file".to_owned(),
        "bob-abs/secret.txt".to_owned(),
        "bob-abs/new-file".to_owned(),
        "sub/bob-rel/secret.txt".to_owned(),
        "sub/bob-rel/new-file".to_owned(),
        "loop/x".to_owned(),
        "..%5C..%5Cbob%5Cprivate%5Csecret.txt".to_owned(),
        // Last: the planted links themselves. Acting on a link's own name acts on the
        // link inside the volume (replace, rename, delete it), never on its target.
        "etc-link".to_owned(),
        "passwd".to_owned(),
        "bob-abs".to_owned(),
        "loop".to_owned(),
    ];
    let links = ["etc-link", "passwd", "bob-abs", "loop"];
    let base = "/api/v1/users/alice/volumes/data/files/";
    for attack in &attacks {
        let bare_link = links.contains(&attack.as_str());
        if attack == "etc-link" {
            // Up to here nothing was created, not even inside alice's volume.
            let now = snapshot(&vol);
            assert!(
                now.iter().all(|e| before_alice.contains(e)),
                "new files appeared: {now:?}"
            );
        }
        for (method, suffix, body) in [
            ("GET", "", &b""[..]),
            ("GET", "?stat=true", b""),
            ("GET", "?download=true", b""),
            ("PUT", "", b"pwned"),
            ("PUT", "?overwrite=true", b"pwned"),
            ("POST", "", br#"{"op":"mkdir"}"#),
            ("POST", "", br#"{"op":"rename","to":"stolen.txt"}"#),
            ("DELETE", "", b""),
            ("DELETE", "?recursive=true", b""),
        ] {
            let path = format!("{base}{attack}{suffix}");
            let (status, text) = app.raw(method, &path, &alice, body).await;
            assert!(
                matches!(status, 400 | 403 | 404 | 409) || bare_link,
                "{method} {path}: {status} {text}"
            );
            assert!(
                !text.contains("root:"),
                "{method} {path} leaked /etc/passwd"
            );
            assert!(
                !text.contains("bob's secret"),
                "{method} {path} leaked bob's file"
            );
        }
        // Also as a rename target from a real file. JSON bodies are not
        // percent-decoded: there a `%` is just a character of a name.
        if attack.contains('%') || bare_link {
            continue;
        }
        let (status, text) = app
            .raw(
                "POST",
                &format!("{base}mine.txt"),
                &alice,
                json!({"op": "rename", "to": attack}).to_string().as_bytes(),
            )
            .await;
        assert!(
            matches!(status, 400 | 403 | 404 | 409),
            "rename to {attack}: {status} {text}"
        );
    }
    assert_eq!(
        snapshot(&outside.join("data/volumes/bob")),
        before,
        "bob's volume changed"
    );
    assert!(
        std::fs::read_to_string("/etc/passwd")
            .unwrap()
            .contains("root")
    );
    assert!(!Path::new("/etc/new-file").exists());
    assert_eq!(
        std::fs::read_to_string(vol.join("mine.txt")).unwrap(),
        "alice's"
    );
    // Encoded names that are not attacks still work (the name has a `%`).
    let (status, text) = app
        .raw("PUT", &format!("{base}100%25.txt"), &alice, b"ok")
        .await;
    assert_eq!(status, 201, "{text}");
    assert!(vol.join("100%.txt").exists());
    // Other users' and unknown volumes: 404 on every method, nothing touched.
    for method in ["GET", "PUT", "POST", "DELETE"] {
        for path in [
            "/api/v1/users/bob/volumes/private/files/secret.txt",
            "/api/v1/users/bob/volumes/private/files",
            "/api/v1/users/alice/volumes/nope/files/x",
            "/api/v1/users/..%2Fbob/volumes/private/files/secret.txt",
        ] {
            let (status, text) = app.raw(method, path, &alice, br#"{"op":"mkdir"}"#).await;
            assert!(
                matches!(status, 400 | 404),
                "{method} {path}: {status} {text}"
            );
            assert!(!text.contains("bob's secret"));
        }
    }
    assert_eq!(snapshot(&outside.join("data/volumes/bob")), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shares_come_from_config_only_and_follow_their_rules() {
    let app = App::start(
        r#"
[[shares]]
name = "datasets"
server = "nfs.lab.example"
path = "/export/datasets"
roles = ["user"]
local_path = "{dir}/nfs/datasets"
description = "Public datasets"

[[shares]]
name = "team"
server = "10.0.0.5"
path = "/export/team"
read_only = false
users = ["alice"]
local_path = "{dir}/nfs/team"

[[shares]]
name = "cluster-only"
server = "nfs.lab.example"
path = "/export/other"
roles = ["user"]
"#,
    )
    .await;
    let root = app.dir.path().join("nfs");
    std::fs::create_dir_all(root.join("datasets/mnist")).unwrap();
    std::fs::create_dir_all(root.join("team")).unwrap();
    std::fs::write(root.join("datasets/mnist/README"), "digits").unwrap();
    let (admin, alice, bob) = app.users().await;

    let names = |r: &Resp| -> Vec<String> {
        r.body
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["name"].as_str().unwrap().to_owned())
            .collect()
    };
    let r = app
        .call(Method::GET, "/api/v1/shares", Some(&alice), None)
        .await;
    assert_eq!(names(&r), ["cluster-only", "datasets", "team"]);
    assert_eq!(
        r.body[1],
        json!({"name": "datasets", "read_only": true, "description": "Public datasets"})
    );
    assert_eq!(r.body[2]["read_only"], false);
    let text = r.body.to_string();
    assert!(
        !text.contains("nfs.lab.example") && !text.contains("/export"),
        "{text}"
    );
    assert_eq!(
        names(
            &app.call(Method::GET, "/api/v1/shares", Some(&bob), None)
                .await
        ),
        ["cluster-only", "datasets"]
    );
    assert_eq!(
        names(
            &app.call(Method::GET, "/api/v1/shares", Some(&admin), None)
                .await
        )
        .len(),
        3
    );
    assert_eq!(
        app.call(Method::GET, "/api/v1/shares", None, None)
            .await
            .status,
        StatusCode::UNAUTHORIZED
    );

    // Read-only share: browse and download; every write is 403 and changes nothing.
    let r = app
        .call(
            Method::GET,
            "/api/v1/shares/datasets/files/mnist",
            Some(&bob),
            None,
        )
        .await;
    assert_eq!(r.body["entries"][0]["name"], "README", "{:?}", r.body);
    let (status, _, bytes) = app
        .get_bytes("/api/v1/shares/datasets/files/mnist/README", &bob, None)
        .await;
    assert_eq!((status, bytes.as_slice()), (StatusCode::OK, &b"digits"[..]));
    let before = snapshot(&root);
    assert_error(
        &app.put("/api/v1/shares/datasets/files/mnist/x", &alice, "x")
            .await,
        StatusCode::FORBIDDEN,
        "read-only",
    );
    let r = app
        .call(
            Method::POST,
            "/api/v1/shares/datasets/files/new",
            Some(&alice),
            Some(json!({"op": "mkdir"})),
        )
        .await;
    assert_error(&r, StatusCode::FORBIDDEN, "read-only");
    let r = app
        .call(
            Method::DELETE,
            "/api/v1/shares/datasets/files/mnist?recursive=true",
            Some(&admin),
            None,
        )
        .await;
    assert_error(&r, StatusCode::FORBIDDEN, "read-only");
    assert_eq!(snapshot(&root), before);
    let (status, text) = app
        .raw("GET", "/api/v1/shares/datasets/files/../team", &alice, b"")
        .await;
    assert_eq!(status, 400, "{text}");

    // Read-write share for alice only.
    assert_eq!(
        app.put("/api/v1/shares/team/files/notes.md", &alice, "# notes")
            .await
            .status,
        StatusCode::CREATED
    );
    assert_eq!(
        std::fs::read_to_string(root.join("team/notes.md")).unwrap(),
        "# notes"
    );
    for method in [Method::GET, Method::PUT, Method::POST, Method::DELETE] {
        let r = app
            .call(
                method.clone(),
                "/api/v1/shares/team/files/notes.md",
                Some(&bob),
                Some(json!({"op": "mkdir"})),
            )
            .await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{method}: {:?}", r.body);
    }
    assert_eq!(
        app.call(Method::GET, "/api/v1/shares/nope/files", Some(&alice), None)
            .await
            .status,
        StatusCode::NOT_FOUND
    );
    assert_error(
        &app.call(
            Method::GET,
            "/api/v1/shares/cluster-only/files",
            Some(&alice),
            None,
        )
        .await,
        StatusCode::SERVICE_UNAVAILABLE,
        "not mounted",
    );
}

/// `sleep` as the server: cheap, never answers, stays pending (not failed).
fn sleeper(name: &str, volumes: Value) -> Value {
    json!({"name": name, "cpu": "100m", "memory": "128Mi", "command": ["sleep", "600"], "volumes": volumes})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_mount_volumes_and_shares_by_name() {
    let app = App::start(
        r#"
[[shares]]
name = "datasets"
server = "nfs.lab.example"
path = "/export/datasets"
roles = ["user"]
local_path = "{dir}/nfs/datasets"

[[shares]]
name = "admins"
server = "nfs.lab.example"
path = "/export/admins"
"#,
    )
    .await;
    std::fs::create_dir_all(app.dir.path().join("nfs/datasets")).unwrap();
    let (_admin, alice, bob) = app.users().await;
    app.volume(&alice, "alice", "data", json!("1Mi")).await;
    app.volume(&alice, "alice", "models", json!("1Mi")).await;
    let r = app
        .call(
            Method::POST,
            "/api/v1/users/alice/volumes",
            Some(&alice),
            Some(json!({"name": "solo", "size": 4096, "access_mode": "ReadWriteOnce"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    app.volume(&bob, "bob", "private", json!("1Mi")).await;
    let servers = "/api/v1/users/alice/servers";

    let r = app
        .call(
            Method::POST,
            servers,
            Some(&alice),
            Some(sleeper(
                "lab",
                json!([
                    {"volume": "data"},
                    {"volume": "models", "read_only": true},
                    {"share": "datasets"},
                    {"volume": "solo", "mount_path": "/home/jovyan/projects/solo"}
                ]),
            )),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    assert_eq!(
        r.body["volumes"],
        json!([
            {"volume": "data", "mount_path": "/home/jovyan/work", "read_only": false},
            {"volume": "models", "mount_path": "/home/jovyan/models", "read_only": true},
            {"share": "datasets", "mount_path": "/home/jovyan/shares/datasets", "read_only": true},
            {"volume": "solo", "mount_path": "/home/jovyan/projects/solo", "read_only": false}
        ])
    );
    // Each mount point is a folder of the server's home, where its sandbox binds the
    // volume or share; the volumes now belong to alice's uid (never root), the share
    // stays its owner's.
    use std::os::unix::fs::MetadataExt;
    let home = app.data().join("servers/alice/lab/work");
    let uid = std::fs::metadata(&home).unwrap().uid();
    assert_ne!(uid, 0);
    for p in ["work", "models", "shares/datasets", "projects/solo"] {
        let m = std::fs::symlink_metadata(home.join(p)).unwrap();
        assert!(m.is_dir() && m.uid() == uid, "{p}");
    }
    for v in ["data", "models", "solo"] {
        let m = std::fs::metadata(app.volume_dir("alice", v)).unwrap();
        assert_eq!((m.uid(), m.gid()), (uid, uid), "{v}");
    }
    let share = std::fs::metadata(app.dir.path().join("nfs/datasets")).unwrap();
    assert_eq!(share.uid(), 0);

    let r = app
        .call(
            Method::GET,
            "/api/v1/users/alice/volumes",
            Some(&alice),
            None,
        )
        .await;
    let data = r
        .body
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "data")
        .unwrap();
    assert_eq!(data["mounted_by"], json!(["lab"]));
    assert_error(
        &app.call(
            Method::DELETE,
            "/api/v1/users/alice/volumes/data",
            Some(&alice),
            None,
        )
        .await,
        StatusCode::CONFLICT,
        "lab",
    );
    assert!(app.volume_dir("alice", "data").is_dir());

    for (volumes, status, needle) in [
        (
            json!([{"volume": "private"}]),
            StatusCode::NOT_FOUND,
            "no volume",
        ),
        (
            json!([{"volume": "nope"}]),
            StatusCode::NOT_FOUND,
            "no volume",
        ),
        (
            json!([{"share": "admins"}]),
            StatusCode::NOT_FOUND,
            "no share",
        ),
        (
            json!([{"share": "datasets", "read_only": false}]),
            StatusCode::FORBIDDEN,
            "read-only",
        ),
        (
            json!([{"volume": "solo"}]),
            StatusCode::CONFLICT,
            "ReadWriteOnce",
        ),
        (
            json!([{"volume": "data"}, {"volume": "data"}]),
            StatusCode::BAD_REQUEST,
            "twice",
        ),
        (
            json!([{"volume": "data"}, {"volume": "models", "mount_path": "/home/jovyan/work/m"}]),
            StatusCode::BAD_REQUEST,
            "overlap",
        ),
        (
            json!([{"volume": "data", "mount_path": "/etc"}]),
            StatusCode::BAD_REQUEST,
            "mount_path",
        ),
        (
            json!([{"volume": "data", "mount_path": "/home/jovyan/../../etc"}]),
            StatusCode::BAD_REQUEST,
            "mount_path",
        ),
        (
            json!([{"volume": "data", "share": "datasets"}]),
            StatusCode::BAD_REQUEST,
            "either",
        ),
        (
            json!([{"nfs": {"server": "evil", "path": "/"}}]),
            StatusCode::BAD_REQUEST,
            "",
        ),
        (
            json!([{"volume": "data", "server": "evil", "path": "/"}]),
            StatusCode::BAD_REQUEST,
            "",
        ),
    ] {
        let r = app
            .call(
                Method::POST,
                servers,
                Some(&alice),
                Some(sleeper("other", volumes.clone())),
            )
            .await;
        assert_error(&r, status, needle);
        assert_eq!(
            app.call(Method::GET, &format!("{servers}/other"), Some(&alice), None)
                .await
                .status,
            StatusCode::NOT_FOUND,
            "{volumes}"
        );
    }
    // Mounting RWX volumes twice is fine.
    let r = app
        .call(
            Method::POST,
            servers,
            Some(&alice),
            Some(sleeper("second", json!([{"volume": "data"}]))),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);

    // Deleting a server keeps its volumes; with delete_volumes, 409 while another
    // server mounts one, and nothing happens.
    let r = app
        .call(
            Method::DELETE,
            &format!("{servers}/lab?delete_volumes=true"),
            Some(&alice),
            None,
        )
        .await;
    assert_error(&r, StatusCode::CONFLICT, "second");
    assert_eq!(
        app.call(Method::GET, &format!("{servers}/lab"), Some(&alice), None)
            .await
            .status,
        StatusCode::OK
    );
    let r = app
        .call(
            Method::DELETE,
            &format!("{servers}/second"),
            Some(&alice),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    assert!(app.volume_dir("alice", "data").is_dir());
    std::fs::write(app.volume_dir("alice", "data").join("keep.txt"), "kept").unwrap();
    let r = app
        .call(
            Method::DELETE,
            &format!("{servers}/lab?delete_volumes=true"),
            Some(&alice),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{:?}", r.body);
    let left = app
        .call(
            Method::GET,
            "/api/v1/users/alice/volumes",
            Some(&alice),
            None,
        )
        .await;
    assert_eq!(left.body.as_array().unwrap().len(), 0, "{:?}", left.body);
    assert!(!app.volume_dir("alice", "data").exists());
    assert!(
        std::fs::symlink_metadata(home.join("work")).is_err(),
        "the mount point is removed"
    );
    assert!(
        app.dir.path().join("nfs/datasets").is_dir(),
        "shares are never deleted"
    );
}

fn vm_hwm_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// 256 MiB up and down through the in-process aggregator: the process's peak RSS may
/// grow by far less than the file (buffers, not the file, are in memory).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_and_downloads_stream_with_flat_memory() {
    const SIZE: u64 = 256 << 20;
    let app = App::start("").await;
    let (_admin, alice, _bob) = app.users().await;
    app.volume(&alice, "alice", "big", json!("1Gi")).await;
    let before = vm_hwm_kib();
    let started = Instant::now();
    let mut tcp = tokio::net::TcpStream::connect(&app.addr).await.unwrap();
    let head = format!(
        "PUT /api/v1/users/alice/volumes/big/files/blob.bin HTTP/1.1\r\nHost: x\r\n\
         Authorization: Bearer {alice}\r\nContent-Length: {SIZE}\r\nConnection: close\r\n\r\n"
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    let chunk: Vec<u8> = (0..(1 << 20)).map(|i| (i % 251) as u8).collect();
    for _ in 0..(SIZE >> 20) {
        tcp.write_all(&chunk).await.unwrap();
    }
    let mut out = String::new();
    tcp.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("HTTP/1.1 201"), "{out}");
    assert_eq!(
        std::fs::metadata(app.volume_dir("alice", "big").join("blob.bin"))
            .unwrap()
            .len(),
        SIZE
    );

    let mut resp = app
        .client
        .get(format!(
            "{}/api/v1/users/alice/volumes/big/files/blob.bin",
            app.base
        ))
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let (mut got, mut sum) = (0u64, 0u64);
    while let Some(c) = resp.chunk().await.unwrap() {
        sum = c.iter().fold(sum, |s, b| s.wrapping_add(u64::from(*b)));
        got += c.len() as u64;
    }
    assert_eq!(got, SIZE);
    let want = chunk
        .iter()
        .fold(0u64, |s, b| s.wrapping_add(u64::from(*b)))
        * (SIZE >> 20);
    assert_eq!(sum, want, "the bytes came back unchanged");
    let grew_mib = (vm_hwm_kib().saturating_sub(before)) / 1024;
    eprintln!(
        "256 MiB up and down in {:?}; peak RSS grew by {grew_mib} MiB",
        started.elapsed()
    );
    assert!(
        grew_mib < 64,
        "peak RSS grew by {grew_mib} MiB for a 256 MiB file"
    );
}
