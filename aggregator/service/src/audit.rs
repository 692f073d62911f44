//! Writing the audit log: who did what to what, from where.

use std::net::IpAddr;
use std::sync::Arc;

use kcloud_core::caller::Caller;
use kcloud_core::repo::AuditRepo;
use kcloud_core::user::AuditEntry;
use kcloud_core::{Result, now_ms};

/// The audit log, as the use cases write it.
#[derive(Clone)]
pub struct Audit {
    log: Arc<dyn AuditRepo>,
}

impl Audit {
    pub fn new(log: Arc<dyn AuditRepo>) -> Self {
        Self { log }
    }

    /// An action by a signed-in user from `client`.
    pub async fn record(
        &self,
        caller: &Caller,
        client: IpAddr,
        action: &str,
        target: String,
        detail: String,
    ) -> Result<()> {
        self.log
            .audit(AuditEntry {
                at_ms: now_ms(),
                actor: caller.name.clone(),
                action: action.into(),
                target,
                detail,
                client: client.to_string(),
            })
            .await
    }

    /// An action of the platform itself (actor `system`, no client).
    pub async fn record_system(&self, action: &str, target: String, detail: String) -> Result<()> {
        self.log
            .audit(AuditEntry {
                at_ms: now_ms(),
                actor: "system".into(),
                action: action.into(),
                target,
                detail,
                client: String::new(),
            })
            .await
    }
}
