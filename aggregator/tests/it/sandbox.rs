//! The local shape's isolation, tried as a hostile user would: servers run as their
//! owner's uid in a bubblewrap sandbox and a cgroup of their own (`--isolation
//! sandbox`, the default). Needs root, `bwrap`, `setpriv`, cgroup v2 and `python3`
//! (`scripts/test.sh` installs bubblewrap); a missing one fails the test.
//!
//! Servers here are small shell scripts that try things, write what happened to their
//! home (read from outside through the server's `work/` directory), then serve HTTP
//! with `python3 -m http.server` so that they count as running.

use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use kcloud_core::caller::Caller;
use kcloud_testkit::require_tool;

use crate::app::TestApp;

/// Serves HTTP on the server's port after the script: what makes it `running`.
const SERVE: &str = "exec python3 -m http.server {port} --bind {ip}";

async fn start(extra: &[&str], settings: &str) -> TestApp {
    require_tool("bwrap");
    require_tool("setpriv");
    require_tool("python3");
    TestApp::builder()
        .args([
            "--simulate",
            "dgx-a100-mig",
            "--agent-heartbeat",
            "1s",
            "--stop-grace",
            "2s",
        ])
        .args(extra)
        .settings(settings)
        .wait_for_gpus()
        .start()
        .await
}

/// Creates `owner`'s server `name` running `sh -c script` (then [`SERVE`]) with these
/// extra create fields; waits for `want` (`running` or `failed`).
async fn server(
    app: &TestApp,
    token: &str,
    owner: &str,
    name: &str,
    script: &str,
    extra: Value,
    want: &str,
) -> Value {
    let mut body = json!({"name": name, "command": ["sh", "-c", format!("{script}\n{SERVE}")]});
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        b.extend(e.clone());
    }
    let r = app
        .call(
            Method::POST,
            &format!("/api/v1/users/{owner}/servers"),
            Some(token),
            Some(body),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    wait_status(app, token, owner, name, want).await
}

async fn wait_status(app: &TestApp, token: &str, owner: &str, name: &str, want: &str) -> Value {
    let path = format!("/api/v1/users/{owner}/servers/{name}");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = app.call(Method::GET, &path, Some(token), None).await;
        if r.body["status"] == want {
            return r.body;
        }
        let logs = || async {
            app.call(Method::GET, &format!("{path}/logs"), Some(token), None)
                .await
                .body
        };
        if r.body["status"] == "failed" {
            panic!(
                "{owner}/{name} failed: {:?}\nlogs: {}",
                r.body,
                logs().await
            );
        }
        assert!(
            Instant::now() < deadline,
            "still {:?}; logs: {}",
            r.body,
            logs().await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A file the server wrote in its home.
fn home_file(app: &TestApp, owner: &str, name: &str, file: &str) -> PathBuf {
    app.data
        .join("servers")
        .join(owner)
        .join(name)
        .join("work")
        .join(file)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Live processes of server `id`: `(pid, command name)`, found by the tag every
/// server process carries.
fn processes(id: &str) -> Vec<(u32, String)> {
    let tag = format!("KCLOUD_SERVER_ID={id}");
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else {
            continue;
        };
        if !env.split(|b| *b == 0).any(|kv| kv == tag.as_bytes()) {
            continue;
        }
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let state = stat
            .rsplit_once(')')
            .map(|(_, r)| r.trim_start().chars().next());
        if matches!(state, Some(Some('Z' | 'X'))) {
            continue;
        }
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        out.push((pid, comm.trim().to_owned()));
    }
    out
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        !matches!(
            s.rsplit_once(')')
                .and_then(|(_, r)| r.trim_start().chars().next()),
            Some('Z' | 'X')
        )
    })
}

fn server_id(app: &TestApp, owner: &str, name: &str) -> kcloud_core::server::Server {
    app.state
        .servers
        .get(&Caller::system(), owner, name)
        .expect("server")
}

async fn free_migs(app: &TestApp, token: &str) -> Vec<String> {
    let r = app
        .call(
            Method::GET,
            "/api/v1/gpus?available=true&kind=mig&limit=1000",
            Some(token),
            None,
        )
        .await;
    r.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["uuid"].as_str().unwrap().to_owned())
        .collect()
}

async fn volume(app: &TestApp, token: &str, owner: &str, name: &str) {
    let r = app
        .call(
            Method::POST,
            &format!("/api/v1/users/{owner}/volumes"),
            Some(token),
            Some(json!({"name": name, "size": "1Gi"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
}

async fn upload(app: &TestApp, token: &str, owner: &str, vol: &str, file: &str, body: &str) {
    let r = app
        .client
        .put(format!(
            "{}/api/v1/users/{owner}/volumes/{vol}/files/{file}",
            app.base
        ))
        .bearer_auth(token)
        .body(body.to_owned())
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{:?}", r.text().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_servers_code_cannot_reach_the_platform_or_other_users() {
    let app = start(&[], "").await;
    let (_admin, alice, bob) = app.users().await;
    volume(&app, &bob, "bob", "private").await;
    upload(&app, &bob, "bob", "private", "secret.txt", "bob's secret").await;
    volume(&app, &alice, "alice", "mine").await;
    server(&app, &bob, "bob", "lab", "", json!({}), "running").await;
    let bobs = server_id(&app, "bob", "lab");
    let bob_pid = bobs.pid.unwrap();
    let data = std::fs::canonicalize(&app.data).unwrap();
    let me = std::process::id();
    let d = data.display();
    let targets = [
        format!("{d}/signing.key"),
        format!("{d}/kcloud.db"),
        app.dir.path().join("agent-token").display().to_string(),
        format!("{d}/volumes/bob/private/secret.txt"),
        format!("{d}/servers/bob/lab/server.log"),
        format!("/proc/1/root{d}/signing.key"),
        format!("/proc/{me}/root{d}/signing.key"),
        format!("/proc/{me}/cwd/Cargo.toml"),
        format!("/proc/{me}/environ"),
        format!("/proc/{bob_pid}/root{d}/volumes/bob/private/secret.txt"),
        format!("/proc/{bob_pid}/cwd/server.log"),
        "/home/jovyan/mine/planted".to_owned(),
    ]
    .join(" ");
    // Tries each target, plants a link to the signing key in its own volume, signals
    // the aggregator and bob's server, and lists the processes it can see.
    let script = format!(
        "out=$HOME/report.txt; : > $out
         ln -s {d}/signing.key $HOME/mine/planted
         for t in {targets}; do
           if cat \"$t\" > /dev/null 2>&1; then echo \"READ $t\" >> $out; else echo \"DENIED $t\" >> $out; fi
         done
         for p in {me} {bob_pid}; do
           if kill -0 $p 2> /dev/null; then echo \"SIGNAL $p\" >> $out; fi
         done
         echo \"UID $(id -u) GROUPS $(id -G)\" >> $out
         echo \"PROCS $(ls /proc | grep -c '^[0-9]')\" >> $out
         ls {d} > /dev/null 2>&1 && echo \"SEES-DATA\" >> $out
         ls /home/jovyan/mine >> $out"
    );
    let mine = json!({"volumes": [{"volume": "mine", "mount_path": "/home/jovyan/mine"}]});
    server(&app, &alice, "alice", "probe", &script, mine, "running").await;
    let report = read(&home_file(&app, "alice", "probe", "report.txt"));
    println!("{report}");
    assert!(
        !report.contains("READ "),
        "a target was readable:\n{report}"
    );
    assert_eq!(report.matches("DENIED ").count(), 12, "{report}");
    assert!(
        !report.contains("SIGNAL"),
        "signalled a process outside:\n{report}"
    );
    assert!(!report.contains("SEES-DATA"), "{report}");
    let uid: u32 = report
        .lines()
        .find_map(|l| l.strip_prefix("UID "))
        .and_then(|l| l.split(' ').next())
        .and_then(|u| u.parse().ok())
        .unwrap();
    assert!((200_000..=299_999).contains(&uid), "uid {uid}");
    assert!(
        report.contains(&format!("GROUPS {uid}\n")),
        "no other groups: {report}"
    );
    let procs: usize = report
        .lines()
        .find_map(|l| l.strip_prefix("PROCS "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap();
    assert!(procs <= 6, "sees {procs} processes: its own only");

    // The link it planted in its volume does not lead the file browser out either.
    let r = app
        .call(
            Method::GET,
            "/api/v1/users/alice/volumes/mine/files/planted",
            Some(&alice),
            None,
        )
        .await;
    assert!(r.status.is_client_error(), "{:?}", r.status);
    assert!(!r.body.to_string().contains(&read_key_hex(&data)));
    // Nor another user's files through the API.
    let r = app
        .call(
            Method::GET,
            "/api/v1/users/bob/volumes/private/files/secret.txt",
            Some(&alice),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
}

fn read_key_hex(data: &Path) -> String {
    std::fs::read(data.join("signing.key"))
        .unwrap()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owners_uids_own_their_files_and_read_only_shares_are_read_only() {
    let dir = tempfile::tempdir().unwrap();
    let share = dir.path().join("datasets");
    std::fs::create_dir(&share).unwrap();
    std::fs::write(share.join("data.csv"), "a,b\n").unwrap();
    let settings = format!(
        "[[shares]]\nname = \"datasets\"\nserver = \"nfs.example.org\"\npath = \"/x\"\n\
         read_only = true\nroles = [\"user\"]\nlocal_path = \"{}\"\n",
        share.display()
    );
    let app = start(&[], &settings).await;
    let (_admin, alice, bob) = app.users().await;
    let mut uids = Vec::new();
    for (user, token) in [("alice", &alice), ("bob", &bob)] {
        volume(&app, token, user, "v").await;
        upload(
            &app,
            token,
            user,
            "v",
            "before.txt",
            "uploaded before the first mount",
        )
        .await;
        let script = "echo mine > $HOME/v/written.txt
             echo changed >> $HOME/v/before.txt && echo CHANGED-UPLOAD >> $HOME/r.txt
             touch $HOME/datasets/x 2> /dev/null && echo WROTE-SHARE >> $HOME/r.txt
             cat $HOME/datasets/data.csv >> $HOME/r.txt";
        let mounts = json!({"volumes": [
            {"volume": "v", "mount_path": "/home/jovyan/v"},
            {"share": "datasets", "mount_path": "/home/jovyan/datasets"}
        ]});
        server(&app, token, user, "w", script, mounts, "running").await;
        let r = read(&home_file(&app, user, "w", "r.txt"));
        assert!(r.contains("CHANGED-UPLOAD"), "{user}: {r}");
        assert!(
            !r.contains("WROTE-SHARE"),
            "{user} wrote to a read-only share"
        );
        assert!(r.contains("a,b"), "{user} reads the share: {r}");
        let vol = app.data.join("volumes").join(user).join("v");
        let written = std::fs::metadata(vol.join("written.txt")).unwrap();
        let work = std::fs::metadata(home_file(&app, user, "w", "")).unwrap();
        assert_eq!(written.uid(), work.uid());
        assert_eq!(std::fs::metadata(&vol).unwrap().uid(), written.uid());
        // What the file browser makes now belongs to the owner too.
        upload(&app, token, user, "v", "after.txt", "uploaded later").await;
        assert_eq!(
            std::fs::metadata(vol.join("after.txt")).unwrap().uid(),
            written.uid()
        );
        uids.push(written.uid());
    }
    assert_ne!(uids[0], uids[1], "two users, two uids");
    assert!(
        uids.iter().all(|u| (200_000..=299_999).contains(u)),
        "{uids:?}"
    );
    // Stable: a second server of alice's runs as the same uid.
    server(
        &app,
        &alice,
        "alice",
        "again",
        "id -u > $HOME/uid",
        json!({}),
        "running",
    )
    .await;
    assert_eq!(
        read(&home_file(&app, "alice", "again", "uid")).trim(),
        uids[0].to_string()
    );
    assert!(
        std::fs::metadata(&share).unwrap().uid() == 0,
        "shares are never given away"
    );
}

/// Starts a daemonized `sleep` (what `nohup`, `tmux` and `screen` do) before serving;
/// returns its host pid once it runs.
const DAEMON: &str = "(setsid sleep 1000 &)";

async fn daemon_pid(id: &str) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some((pid, _)) = processes(id).into_iter().find(|(_, c)| c == "sleep") {
            return pid;
        }
        assert!(Instant::now() < deadline, "the daemon never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn device_free(app: &TestApp, token: &str, uuid: &str) -> bool {
    free_migs(app, token).await.iter().any(|u| u == uuid)
}

/// Deleting, culling, or the main process ending: the daemon is gone by the time the
/// device shows free.
async fn daemons_die_before_devices_are_freed(isolation: &str) {
    let app = start(&["--isolation", isolation], "").await;
    let (_admin, alice, _bob) = app.users().await;
    let migs = free_migs(&app, &alice).await;

    // Delete.
    let dev = json!({"devices": [migs[0]]});
    server(&app, &alice, "alice", "del", DAEMON, dev, "running").await;
    let s = server_id(&app, "alice", "del");
    let daemon = daemon_pid(&s.id).await;
    let r = app
        .call(
            Method::DELETE,
            "/api/v1/users/alice/servers/del",
            Some(&alice),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    assert!(
        !alive(daemon),
        "{isolation}: the daemon outlived the delete"
    );
    assert!(processes(&s.id).is_empty(), "{:?}", processes(&s.id));
    assert!(device_free(&app, &alice, &migs[0]).await);

    // The main process ends by itself.
    let dev = json!({"devices": [migs[1]]});
    let body =
        json!({"name": "quits", "command": ["sh", "-c", format!("{DAEMON}; sleep 2; exit 3")]});
    let mut body = body;
    body.as_object_mut()
        .unwrap()
        .extend(dev.as_object().unwrap().clone());
    let r = app
        .call(
            Method::POST,
            "/api/v1/users/alice/servers",
            Some(&alice),
            Some(body),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    let s = server_id(&app, "alice", "quits");
    let daemon = daemon_pid(&s.id).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !device_free(&app, &alice, &migs[1]).await {
        assert!(Instant::now() < deadline, "never freed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        !alive(daemon),
        "{isolation}: the daemon outlived its server"
    );
    let r = app
        .call(
            Method::GET,
            "/api/v1/users/alice/servers/quits",
            Some(&alice),
            None,
        )
        .await;
    assert_eq!(r.body["status"], "failed");

    if isolation != "sandbox" {
        return;
    }
    // Culled for idleness (a server of its own, so the others above were not).
    drop(app);
    let app = start(
        &["--isolation", isolation],
        "[culling]\nidle_timeout = \"2s\"\ninterval = \"1s\"\n",
    )
    .await;
    let (_admin, alice, _bob) = app.users().await;
    let mig = free_migs(&app, &alice).await.remove(0);
    server(
        &app,
        &alice,
        "alice",
        "idle",
        DAEMON,
        json!({"devices": [mig]}),
        "running",
    )
    .await;
    let s = server_id(&app, "alice", "idle");
    let daemon = daemon_pid(&s.id).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !device_free(&app, &alice, &mig).await {
        assert!(Instant::now() < deadline, "never culled");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!alive(daemon), "the daemon outlived the cull");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemons_die_before_devices_are_freed_in_the_sandbox() {
    daemons_die_before_devices_are_freed("sandbox").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemons_die_before_devices_are_freed_without_isolation() {
    daemons_die_before_devices_are_freed("none").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_and_cpu_limits_are_enforced() {
    let app = start(&[], "").await;
    let (_admin, alice, _bob) = app.users().await;
    // Past its memory: killed by the kernel, and the reason says so.
    let r = app
        .call(
            Method::POST,
            "/api/v1/users/alice/servers",
            Some(&alice),
            Some(json!({"name": "hog", "memory": "128Mi", "cpu": "1",
                "command": ["python3", "-c", "import time; b = bytearray(1 << 30); time.sleep(300)"]})),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    let deadline = Instant::now() + Duration::from_secs(60);
    let failed = loop {
        let r = app
            .call(
                Method::GET,
                "/api/v1/users/alice/servers/hog",
                Some(&alice),
                None,
            )
            .await;
        if r.body["status"] == "failed" {
            break r.body;
        }
        assert!(Instant::now() < deadline, "not killed: {:?}", r.body);
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let reason = failed["reason"].as_str().unwrap_or_default();
    assert!(reason.starts_with("OOMKilled"), "{reason}");

    // CPU-bound with half a CPU: two busy loops get about half a CPU between them,
    // not the two CPUs they would take. Measured as CPU time over wall time.
    let busy = "python3 -c 'while True: pass' &\npython3 -c 'while True: pass' &";
    server(
        &app,
        &alice,
        "alice",
        "spin",
        busy,
        json!({"cpu": "500m", "memory": "1Gi"}),
        "running",
    )
    .await;
    let s = server_id(&app, "alice", "spin");
    let cpu_ticks = |id: &str| -> u64 {
        processes(id)
            .iter()
            .filter_map(|(pid, _)| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
            .filter_map(|stat| {
                let f: Vec<u64> = stat
                    .rsplit_once(')')?
                    .1
                    .split_whitespace()
                    .skip(11)
                    .take(2)
                    .filter_map(|v| v.parse().ok())
                    .collect();
                Some(f.iter().sum::<u64>())
            })
            .sum()
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (t0, c0) = (Instant::now(), cpu_ticks(&s.id));
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (wall, used) = (t0.elapsed().as_secs_f64(), cpu_ticks(&s.id) - c0);
    // Clock ticks are 100 per second on Linux.
    let share = used as f64 / 100.0 / wall;
    println!("two busy loops under cpu 500m: {share:.2} CPUs");
    assert!(share > 0.2 && share < 0.75, "{share:.2} CPUs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_sees_exactly_its_own_gpu_files() {
    require_tool("mknod");
    let dir = tempfile::tempdir().unwrap();
    let dev = dir.path().join("dev");
    std::fs::create_dir_all(dev.join("nvidia-caps")).unwrap();
    let mut minors = String::from("config 1\nmonitor 2\n");
    let mut names: Vec<String> = ["nvidiactl", "nvidia-uvm", "nvidia-uvm-tools"]
        .map(String::from)
        .to_vec();
    let mut m = 3;
    for gpu in 0..8 {
        names.push(format!("nvidia{gpu}"));
        for gi in 1..=7 {
            for (cap, line) in [
                (m, format!("gpu{gpu}/gi{gi}/access {m}\n")),
                (m + 1, format!("gpu{gpu}/gi{gi}/ci0/access {}\n", m + 1)),
            ] {
                minors.push_str(&line);
                names.push(format!("nvidia-caps/nvidia-cap{cap}"));
            }
            m += 2;
        }
    }
    for n in &names {
        // Character devices like /dev/null's: the test only needs them to exist.
        let ok = std::process::Command::new("mknod")
            .args([dev.join(n).to_str().unwrap(), "c", "1", "3"])
            .status()
            .unwrap()
            .success();
        assert!(ok, "mknod {n}");
    }
    let minors_file = dir.path().join("mig-minors");
    std::fs::write(&minors_file, &minors).unwrap();
    let settings = format!(
        "[local]\ndevice_root = \"{}\"\nmig_minors = \"{}\"\n",
        dev.display(),
        minors_file.display()
    );
    let app = start(&[], &settings).await;
    let (_admin, alice, _bob) = app.users().await;
    let mig = free_migs(&app, &alice).await.remove(0);
    let addr = app
        .state
        .cluster
        .inventory()
        .addresses(std::slice::from_ref(&mig))[0]
        .clone();
    let (minor, (gi, ci)) = (addr.minor.unwrap(), addr.mig.unwrap());
    let list = "ls /dev | grep nvidia > $HOME/dev.txt; ls /dev/nvidia-caps | sed 's|^|nvidia-caps/|' >> $HOME/dev.txt; echo \"$CUDA_VISIBLE_DEVICES\" > $HOME/cuda.txt";
    server(
        &app,
        &alice,
        "alice",
        "m",
        list,
        json!({"devices": [mig]}),
        "running",
    )
    .await;
    let seen: BTreeSet<String> = read(&home_file(&app, "alice", "m", "dev.txt"))
        .lines()
        .filter(|l| *l != "nvidia-caps")
        .map(str::to_owned)
        .collect();
    let cap = |line: &str| {
        minors
            .lines()
            .find_map(|l| l.strip_prefix(line))
            .unwrap()
            .trim()
            .to_owned()
    };
    let want: BTreeSet<String> = [
        "nvidiactl".to_owned(),
        "nvidia-uvm".to_owned(),
        "nvidia-uvm-tools".to_owned(),
        format!("nvidia{minor}"),
        format!(
            "nvidia-caps/nvidia-cap{}",
            cap(&format!("gpu{minor}/gi{gi}/access "))
        ),
        format!(
            "nvidia-caps/nvidia-cap{}",
            cap(&format!("gpu{minor}/gi{gi}/ci{ci}/access "))
        ),
    ]
    .into();
    assert_eq!(seen, want);
    assert_eq!(read(&home_file(&app, "alice", "m", "cuda.txt")).trim(), mig);

    // A whole GPU: its own node and the control files, no capability.
    let r = app
        .call(
            Method::GET,
            "/api/v1/gpus?available=true&kind=gpu&limit=1",
            Some(&alice),
            None,
        )
        .await;
    let gpu = r.body["items"][0]["uuid"].as_str().unwrap().to_owned();
    let minor = app
        .state
        .cluster
        .inventory()
        .addresses(std::slice::from_ref(&gpu))[0]
        .minor
        .unwrap();
    server(
        &app,
        &alice,
        "alice",
        "g",
        list,
        json!({"devices": [gpu]}),
        "running",
    )
    .await;
    let seen: BTreeSet<String> = read(&home_file(&app, "alice", "g", "dev.txt"))
        .lines()
        .map(str::to_owned)
        .collect();
    let want: BTreeSet<String> = ["nvidiactl", "nvidia-uvm", "nvidia-uvm-tools"]
        .map(String::from)
        .into_iter()
        .chain([format!("nvidia{minor}")])
        .collect();
    assert_eq!(seen, want);
    // No device: no NVIDIA file at all.
    server(&app, &alice, "alice", "none", list, json!({}), "running").await;
    assert_eq!(
        read(&home_file(&app, "alice", "none", "dev.txt")).trim(),
        ""
    );
}

#[tokio::test]
async fn settings_say_how_servers_are_isolated() {
    let app = start(&[], "").await;
    let (_admin, alice, _bob) = app.users().await;
    let r = app
        .call(Method::GET, "/api/v1/settings", Some(&alice), None)
        .await;
    let iso = &r.body["isolation"];
    assert_eq!(iso["mode"], "sandbox", "{iso}");
    let enforced = iso["enforced"].to_string();
    for limit in ["memory", "cpu", "pids", "identity", "filesystem"] {
        assert!(enforced.contains(limit), "{limit} in {enforced}");
    }
    drop(app);
    let app = start(&["--isolation", "none"], "").await;
    let admin = app.token("admin", crate::app::ADMIN_PW).await;
    let r = app
        .call(Method::GET, "/api/v1/settings", Some(&admin), None)
        .await;
    assert_eq!(r.body["isolation"]["mode"], "none");
    assert!(
        r.body["isolation"]["enforced"]
            .as_array()
            .unwrap()
            .is_empty()
    );
}
