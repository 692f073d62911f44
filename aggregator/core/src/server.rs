//! Servers as every part of the aggregator sees them: what to create, its status, its
//! mounts, its lifecycle events, and where the proxy reaches it.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::device::Holder;
use crate::launch::{BaseUrl, Launch};

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
    /// Waiting in the queue for its devices; it has no process and holds nothing.
    Queued,
}

impl ServerStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ServerStatus::Pending => "pending",
            ServerStatus::Running => "running",
            ServerStatus::Failed => "failed",
            ServerStatus::Stopping => "stopping",
            ServerStatus::Queued => "queued",
        }
    }

    pub fn parse(s: &str) -> Option<ServerStatus> {
        match s {
            "pending" => Some(ServerStatus::Pending),
            "running" => Some(ServerStatus::Running),
            "failed" => Some(ServerStatus::Failed),
            "stopping" => Some(ServerStatus::Stopping),
            "queued" => Some(ServerStatus::Queued),
            _ => None,
        }
    }

    /// Whether a server in this state keeps its devices in the ledger.
    pub fn holds_devices(self) -> bool {
        !matches!(self, ServerStatus::Failed | ServerStatus::Queued)
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
    /// Cluster shape: its PVC (`provision::volumes::pvc_name`).
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

/// A server to create, validated and with its devices claimed.
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
    /// Where `devices` live on the node (the local sandbox exposes exactly these);
    /// not kept with the server.
    pub addresses: Vec<crate::device::DeviceAddress>,
}

/// Where the proxy reaches a running server, and how it talks to it.
#[derive(Clone, PartialEq, Eq)]
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
            strip_prefix: (run.base_url == BaseUrl::Strip)
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
#[derive(Clone, Debug, PartialEq, Eq)]
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
    /// A server just made from `spec`: pending, its activity starting now.
    pub fn pending(id: String, spec: ServerSpec, now_ms: u64) -> Server {
        Server {
            id,
            owner: spec.owner,
            name: spec.name,
            status: ServerStatus::Pending,
            reason: None,
            node: spec.node,
            devices: spec.devices,
            cpu_millis: spec.cpu_millis,
            memory_bytes: spec.memory_bytes,
            image: spec.image,
            launch: spec.launch,
            created_at_ms: now_ms,
            ready_at_ms: None,
            last_activity_ms: now_ms,
            cull_exempt: false,
            pid: None,
            upstream: None,
            mounts: spec.mounts,
        }
    }

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_round_trips_and_failed_holds_nothing() {
        for s in [
            ServerStatus::Pending,
            ServerStatus::Running,
            ServerStatus::Failed,
            ServerStatus::Stopping,
            ServerStatus::Queued,
        ] {
            assert_eq!(ServerStatus::parse(s.as_str()), Some(s));
            assert_eq!(
                s.holds_devices(),
                s != ServerStatus::Failed && s != ServerStatus::Queued
            );
        }
        assert_eq!(ServerStatus::parse("gone"), None);
    }
}
