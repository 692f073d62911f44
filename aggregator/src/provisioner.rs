//! Where servers run: the boundary between the API (which validates, checks quotas and
//! holds devices in the ledger) and what starts, watches and stops servers.
//!
//! One implementation per shape: [`local::LocalProvisioner`] (child processes on this
//! host, recorded in SQLite) and [`kube::KubeProvisioner`] (pods, their Secrets and
//! ResourceClaims; Kubernetes is the record). The API holds it as
//! `Arc<dyn Provisioner>`.
//!
//! Devices: the API reserves them in the ledger before [`Provisioner::create`] and
//! commits after it; at start [`Provisioner::recover`] returns the servers that exist so
//! that the ledger is rebuilt from them. A server whose process ends by itself becomes
//! `failed` and the provisioner releases its devices in the ledger; a deleted one is
//! released by the API.

pub mod kube;
pub mod local;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::ledger::Holder;
use crate::profile::RunProfile;
use crate::{Error, Result};

/// Where a server is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ServerStatus {
    /// Created; its process is starting and does not answer yet.
    Pending,
    /// Answers its readiness probe; the proxy forwards to it.
    Running,
    /// Ended or never came up (see `reason`); holds no devices. Delete it to reuse the
    /// name.
    Failed,
    /// Being deleted.
    Stopping,
}

impl ServerStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ServerStatus::Pending => "pending",
            ServerStatus::Running => "running",
            ServerStatus::Failed => "failed",
            ServerStatus::Stopping => "stopping",
        }
    }

    pub fn parse(s: &str) -> Option<ServerStatus> {
        match s {
            "pending" => Some(ServerStatus::Pending),
            "running" => Some(ServerStatus::Running),
            "failed" => Some(ServerStatus::Failed),
            "stopping" => Some(ServerStatus::Stopping),
            _ => None,
        }
    }

    /// Whether a server in this state keeps its devices in the ledger.
    pub fn holds_devices(self) -> bool {
        self != ServerStatus::Failed
    }
}

/// What to run. `command` absent: JupyterLab, with `args` appended to its command line.
/// `command` present: that program with `command[1..]` and then `args`; `{port}` and
/// `{base_url}` in them are replaced by the port to listen on (loopback) and the path
/// prefix it is served under.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct Launch {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
    /// The IDE profile it runs; absent in records from before profiles.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub profile: Option<RunProfile>,
}

impl Launch {
    /// The server's profile (records from before profiles: JupyterLab, or `custom`
    /// with their own command).
    pub fn run_profile(&self) -> RunProfile {
        self.profile
            .clone()
            .unwrap_or_else(|| RunProfile::legacy(self.command.is_some()))
    }
}

/// Something a server mounts, resolved by the API from names the user gave: a request
/// never supplies a host path, NFS server or export.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mount {
    pub source: MountSource,
    /// Absolute path in the server, under `/home/jovyan`.
    pub mount_path: String,
    pub read_only: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "kind")]
pub enum MountSource {
    /// One of the owner's volumes. Local shape: `local_path` is its directory.
    /// Cluster shape: its PVC is `storage::pvc_name(owner, name)`.
    Volume {
        name: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        local_path: Option<PathBuf>,
    },
    /// An admin-defined NFS share: a pod `nfs` volume of `server:path` in the cluster
    /// shape, `local_path` on this host in the local shape.
    Share {
        name: String,
        server: String,
        path: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        local_path: Option<PathBuf>,
    },
}

impl Mount {
    /// The volume's name when this mounts one.
    pub fn volume(&self) -> Option<&str> {
        match &self.source {
            MountSource::Volume { name, .. } => Some(name),
            MountSource::Share { .. } => None,
        }
    }
}

/// A server to create, validated and with its devices reserved.
#[derive(Clone, Debug)]
pub struct ServerSpec {
    pub owner: String,
    pub name: String,
    /// The node the devices are on; `None` for a server without devices.
    pub node: Option<String>,
    pub devices: Vec<String>,
    pub cpu_millis: u64,
    pub memory_bytes: u64,
    pub image: Option<String>,
    pub launch: Launch,
    /// Volumes and shares, in the order the user gave them.
    pub mounts: Vec<Mount>,
}

/// Where the proxy reaches a running server, and how it talks to it.
#[derive(Clone)]
pub struct Upstream {
    pub addr: SocketAddr,
    /// Presented as `Authorization: token ...` (JupyterLab); `None` for IDEs whose own
    /// auth is off behind the proxy.
    pub token: Option<Arc<str>>,
    /// The prefix the proxy removes before forwarding (`/user/{user}/{server}`), for
    /// IDEs served at `/`.
    pub strip_prefix: Option<Arc<str>>,
}

impl Upstream {
    /// How the proxy reaches `owner/name` at `addr`, as its IDE profile says: the token
    /// only for an IDE that checks it, and the prefix stripped for one served at `/`.
    pub fn new(owner: &str, name: &str, launch: &Launch, addr: SocketAddr, token: &str) -> Self {
        let run = launch.run_profile();
        Upstream {
            addr,
            token: run.is_jupyter().then(|| Arc::from(token)),
            strip_prefix: (run.base_url == crate::profile::BaseUrl::Strip)
                .then(|| Arc::from(base_url(owner, name).trim_end_matches('/'))),
        }
    }
}

impl fmt::Debug for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Upstream")
            .field("addr", &self.addr)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("strip_prefix", &self.strip_prefix)
            .finish()
    }
}

/// A server as the provisioner knows it.
#[derive(Clone, Debug)]
pub struct Server {
    /// Unique per incarnation of `owner/name`.
    pub id: String,
    pub owner: String,
    pub name: String,
    pub status: ServerStatus,
    /// Why it failed, or what it is waiting for.
    pub reason: Option<String>,
    pub node: Option<String>,
    /// The devices it was given (a failed server no longer holds them).
    pub devices: Vec<String>,
    pub cpu_millis: u64,
    pub memory_bytes: u64,
    pub image: Option<String>,
    pub launch: Launch,
    pub created_at_ms: u64,
    /// When it first answered its readiness probe.
    pub ready_at_ms: Option<u64>,
    /// Newest of creation, readiness and proxied traffic.
    pub last_activity_ms: u64,
    /// An admin exempted it from idle culling.
    pub cull_exempt: bool,
    /// Local shape: the process (and process group) id.
    pub pid: Option<u32>,
    /// Set while running.
    pub upstream: Option<Upstream>,
    pub mounts: Vec<Mount>,
}

impl Server {
    pub fn holder(&self) -> Holder {
        Holder {
            user: self.owner.clone(),
            server: self.name.clone(),
        }
    }

    /// The path the server is served under, with the trailing slash.
    pub fn url(&self) -> String {
        base_url(&self.owner, &self.name)
    }
}

/// `/user/{owner}/{name}/`: where the proxy serves a server, and the base URL the
/// server itself is told.
pub fn base_url(owner: &str, name: &str) -> String {
    format!("/user/{owner}/{name}/")
}

/// One lifecycle event of a server (`.../events`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ServerEvent {
    pub at_ms: u64,
    /// `Created`, `Started`, `Ready`, `Failed`, `Adopted`, `Stopping`, ...
    pub kind: String,
    pub message: String,
}

/// Log text as it arrives (`follow_logs`).
pub type LogStream = futures_util::stream::BoxStream<'static, Result<String>>;

/// The provisioner boundary. Reads (`get`, `list`) answer from memory: the proxy calls
/// `get` on every request.
#[async_trait::async_trait]
pub trait Provisioner: Send + Sync {
    /// Loads the servers that exist and reconciles them with what really runs (live
    /// ones adopted, dead ones failed), and starts watching them. Called once at start;
    /// the ledger is rebuilt from the result.
    async fn recover(&self) -> Result<Vec<Server>>;

    /// Creates a server and returns it, `pending`, as soon as it exists: never waits
    /// for it to come up. A name in use is `Conflict`. On failure nothing it made is
    /// left behind.
    async fn create(&self, spec: ServerSpec) -> Result<Server>;

    /// Stops a server (its processes gone when this returns) and forgets it; `None` if
    /// there was no such server. Does not touch the ledger.
    async fn delete(&self, owner: &str, name: &str) -> Result<Option<Server>>;

    fn get(&self, owner: &str, name: &str) -> Option<Server>;

    /// One owner's servers, or everyone's, by owner and name.
    fn list(&self, owner: Option<&str>) -> Vec<Server>;

    /// The last `tail` lines of the server's output, its token removed.
    async fn logs(&self, owner: &str, name: &str, tail: usize) -> Result<String>;

    /// The last `tail` lines, then new output as it comes (whole lines, token
    /// removed), until the server is gone or has ended.
    async fn follow_logs(&self, owner: &str, name: &str, tail: usize) -> Result<LogStream>;

    /// The server's lifecycle events, oldest first.
    async fn events(&self, owner: &str, name: &str) -> Result<Vec<ServerEvent>>;

    /// Records traffic to the server (cheap; persisted in batches).
    fn touch(&self, owner: &str, name: &str, at_ms: u64);

    /// Exempts a server from idle culling, or ends that; `None` if there is no such
    /// server.
    async fn set_cull_exempt(
        &self,
        owner: &str,
        name: &str,
        exempt: bool,
    ) -> Result<Option<Server>>;

    /// Wakes after a server appears, changes status or goes (not on mere traffic).
    fn subscribe(&self) -> tokio::sync::watch::Receiver<u64>;

    /// Stops watching and saves what is pending; servers keep running and are adopted
    /// at the next start.
    async fn shutdown(&self);
}

/// Per-owner locks: creates and deletes of one owner's servers run one at a time, so
/// that name and quota checks see a settled state. Devices need no such lock (the
/// ledger is atomic), so different owners never wait for each other.
#[derive(Default)]
pub struct OwnerLocks {
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl OwnerLocks {
    pub async fn lock(&self, owner: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = self
            .locks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(owner.to_owned())
            .or_default()
            .clone();
        lock.lock_owned().await
    }
}

/// Checks a server name: a DNS-1123 label (1–63 of `a-z`, `0-9`, `-`, starting and
/// ending with a letter or digit), because it ends up in URLs, paths and pod names.
pub fn validate_server_name(name: &str) -> Result<()> {
    let b = name.as_bytes();
    let ok_char = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-';
    let edge = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    if (1..=63).contains(&b.len()) && b.iter().all(ok_char) && edge(b[0]) && edge(b[b.len() - 1]) {
        Ok(())
    } else {
        Err(Error::BadRequest(
            "server name must be a DNS-1123 label: 1-63 characters of a-z, 0-9 and '-', \
             starting and ending with a letter or digit"
                .into(),
        ))
    }
}

/// Glob match with `*` (any run of characters, `/` included), for image allow-lists.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ti));
            pi += 1;
        } else if pi < p.len() && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_names_are_dns_labels() {
        for ok in ["a", "lab", "my-lab-2", "0", &"a".repeat(63)] {
            assert!(validate_server_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "-a",
            "a-",
            "Lab",
            "a_b",
            "a.b",
            "a/b",
            "..",
            "é",
            &"a".repeat(64),
        ] {
            assert!(
                matches!(validate_server_name(bad), Err(Error::BadRequest(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn globs() {
        assert!(glob_match(
            "quay.io/jupyter/*",
            "quay.io/jupyter/scipy-notebook:2025"
        ));
        assert!(glob_match("*", "anything/at:all"));
        assert!(glob_match("a*b*c", "aXXbYYc"));
        assert!(glob_match("exact:1", "exact:1"));
        assert!(!glob_match("exact:1", "exact:10"));
        assert!(!glob_match(
            "quay.io/jupyter/*",
            "docker.io/quay.io/jupyter/x"
        ));
        assert!(!glob_match("a*b", "aXXbY"));
        assert!(glob_match("a**", "a"));
        assert!(!glob_match("", "a"));
    }

    #[test]
    fn status_round_trips_and_failed_holds_nothing() {
        for s in [
            ServerStatus::Pending,
            ServerStatus::Running,
            ServerStatus::Failed,
            ServerStatus::Stopping,
        ] {
            assert_eq!(ServerStatus::parse(s.as_str()), Some(s));
            assert_eq!(s.holds_devices(), s != ServerStatus::Failed);
        }
        assert_eq!(ServerStatus::parse("gone"), None);
    }
}
