//! A real OpenID Provider on loopback for single sign-on tests: `tests/oidc-provider`
//! (zitadel/oidc's provider with a login page), built by
//! `scripts/oidc-provider-build.sh`. Killed when dropped.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::cluster::workspace;
use crate::free_port;

/// A user the provider knows.
pub struct User<'a> {
    pub id: &'a str,
    pub username: &'a str,
    pub password: &'a str,
    pub groups: &'a [&'a str],
}

/// A running provider.
pub struct Provider {
    pub issuer: String,
    child: Child,
    _dir: tempfile::TempDir,
}

/// The provider's binary, built once (cached across runs).
pub fn binary() -> PathBuf {
    let out = Command::new(workspace().join("scripts/oidc-provider-build.sh"))
        .stderr(Stdio::inherit())
        .output()
        .expect("running scripts/oidc-provider-build.sh");
    assert!(
        out.status.success(),
        "scripts/oidc-provider-build.sh failed (its output is above)"
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

impl Provider {
    /// Starts a provider with `users` and clients `(id, secret, redirect_uri)`, on a
    /// free port (or `port`), and waits until its discovery answers.
    pub fn start(
        users: &[User<'_>],
        clients: &[(&str, &str, &str)],
        port: Option<u16>,
    ) -> Provider {
        let dir = tempfile::tempdir().expect("temporary directory");
        let list: Vec<serde_json::Value> = users
            .iter()
            .map(|u| {
                serde_json::json!({"id": u.id, "username": u.username, "password": u.password,
                    "email": format!("{}@example.org", u.username), "groups": u.groups})
            })
            .collect();
        let file = dir.path().join("users.json");
        std::fs::write(&file, serde_json::to_vec(&list).expect("users")).expect("users file");
        let port = port.unwrap_or_else(free_port);
        let listen = format!("127.0.0.1:{port}");
        let mut cmd = Command::new(binary());
        cmd.args(["--listen", &listen, "--users"])
            .arg(&file)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (id, secret, redirect) in clients {
            cmd.args(["--client", &format!("{id}:{secret}:{redirect}")]);
        }
        let mut child = cmd.spawn().expect("starting oidc-provider");
        let stdout = child.stdout.take().expect("stdout");
        let mut first = String::new();
        BufReader::new(stdout)
            .read_line(&mut first)
            .expect("oidc-provider's first line");
        assert!(first.contains("issuer"), "oidc-provider said {first:?}");
        let issuer = format!("http://{listen}");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if std::net::TcpStream::connect(&listen).is_ok() {
                break;
            }
            assert!(Instant::now() < deadline, "oidc-provider never listened");
            std::thread::sleep(Duration::from_millis(20));
        }
        Provider {
            issuer,
            child,
            _dir: dir,
        }
    }
}

impl Drop for Provider {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
