//! How servers are kept apart on this deployment, as the API and the portal tell it.

use serde::Serialize;
use utoipa::ToSchema;

/// The means that keep one user's server from others and from the platform.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum IsolationMode {
    /// Cluster shape: pods (their own namespaces, cgroups and users; NetworkPolicy).
    Pods,
    /// Local shape: each server as its owner's unprivileged uid, in a sandbox (mount,
    /// PID, IPC and UTS namespaces) and a cgroup of its own.
    Sandbox,
    /// Local shape started with `--isolation none`: servers run as the aggregator's
    /// own user, unconfined. Only for a machine whose users trust each other.
    None,
}

/// What `GET /api/v1/settings` says about isolation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, ToSchema)]
pub struct Isolation {
    pub mode: IsolationMode,
    /// The per-server limits the host enforces, with the mechanism, e.g.
    /// `memory (cgroup v1 memory.limit_in_bytes)`.
    pub enforced: Vec<String>,
    /// What is not enforced here, in words.
    pub notes: Vec<String>,
}

impl Isolation {
    pub fn pods() -> Self {
        Isolation {
            mode: IsolationMode::Pods,
            enforced: vec![
                "memory (pod limits)".into(),
                "cpu (pod limits)".into(),
                "devices (device pinning)".into(),
            ],
            notes: Vec::new(),
        }
    }
}
