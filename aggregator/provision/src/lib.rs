//! kcloud-provision: where servers run and where volumes live.
//!
//! One [`Provisioner`] per shape: [`local::LocalProvisioner`] (sandboxed child
//! processes on this host, recorded through `kcloud_core::repo::ServerRepo`) and
//! [`kube::KubeProvisioner`] (pods, their Secrets and ResourceClaims; Kubernetes is
//! the record). Volumes are a [`volumes::VolumeBackend`] per shape: directories, or
//! PVCs.
//!
//! Devices are not the provisioners' business: the service reserves them before
//! [`Provisioner::create`] and commits after it, releases them after
//! [`Provisioner::delete`], and is told through [`Exits`] when a server ends by itself,
//! so that it releases them then. [`Provisioner::recover`] returns the servers that
//! exist at start so that the ledger is rebuilt from them.

pub mod kube;
pub mod local;
pub mod logs;
pub mod table;
pub mod upstream;
pub mod volumes;

use kcloud_core::Result;
use kcloud_core::server::{Server, ServerEvent, ServerSpec};

/// Told when a server ends by itself (its process exited, its pod failed or went):
/// called once per such end, after the server shows `failed` and its processes can no
/// longer use its devices. Not called for deletes, which the caller does itself.
pub trait Exits: Send + Sync {
    fn exited(&self, server: &Server);
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

    /// How servers are kept apart here, for the settings users and admins read.
    fn isolation(&self) -> kcloud_core::isolation::Isolation;

    /// Stops watching and saves what is pending; servers keep running and are adopted
    /// at the next start.
    async fn shutdown(&self);
}
