//! What groups add to a launch: the owner's entitlements (models, MIG profiles, IDE
//! profiles, images, shares), and each group's quota for its members together.

use kcloud_core::device::DeviceRequest;
use kcloud_core::group::{Entitlements, Use};
use kcloud_core::server::Server;
use kcloud_core::user::{Role, Usage};
use kcloud_core::{Error, Result};

use super::{Plan, Servers, usage};
use crate::locks::OwnerGuard;

/// Devices a request asks for.
fn wanted(req: &DeviceRequest) -> u64 {
    match req {
        DeviceRequest::Exact(d) => d.len() as u64,
        DeviceRequest::Gpus { count, .. } => u64::from(*count),
        DeviceRequest::Mig { .. } => 1,
    }
}

impl Servers {
    /// 403 naming the missing entitlement when `plan` uses something `user`'s groups
    /// may not. A placement request without a model, from a user restricted to some
    /// models, must name one (the ledger would pick any).
    pub(crate) async fn check_entitled(&self, user: &str, role: Role, plan: &Plan) -> Result<()> {
        let e = self.groups.entitlements(user, role).await?;
        if e == Entitlements::default() {
            return Ok(());
        }
        e.check(Use::IdeProfile(&plan.launch.run_profile().name))?;
        if let Some(image) = &plan.image {
            e.check(Use::Image(image))?;
        }
        for m in &plan.mounts {
            if let Some(share) = &m.share {
                e.check(Use::Share(share))?;
            }
        }
        crate::groups::check_devices(&self.cluster, &e, plan.devices.as_ref())
    }

    /// Each of `user`'s groups with a quota: its members together, with this request,
    /// must stay within it. Returns the groups' locks, held until the launch ends, so
    /// that members' launches are serialized (the owner's lock is already held; group
    /// locks are always taken after it, in name order).
    pub(crate) async fn check_group_quotas(
        &self,
        user: &str,
        plan: &Plan,
        needs_devices: bool,
    ) -> Result<Vec<OwnerGuard>> {
        let groups = self.groups.of(user).await?;
        let mut guards = Vec::new();
        for g in groups.iter().filter(|g| g.quota != Default::default()) {
            guards.push(self.locks.lock(&format!("group:{}", g.name)).await);
            let members: Vec<Server> = g
                .members
                .iter()
                .flat_map(|m| self.provisioner.list(Some(m)))
                .collect();
            let who = format!("group {}", g.name);
            g.quota.check(
                &who,
                usage(&members),
                Usage {
                    servers: 1,
                    cpu_millis: plan.cpu_millis,
                    memory_bytes: plan.memory_bytes,
                },
            )?;
            if let (Some(max), Some(req)) = (g.quota.gpus, plan.devices.as_ref()) {
                let held: u64 = members
                    .iter()
                    .filter(|s| s.status.holds_devices())
                    .map(|s| s.devices.len() as u64)
                    .sum();
                if held + wanted(req) > u64::from(max) {
                    return Err(Error::QuotaExceeded(format!(
                        "device quota exceeded: group {} holds {held} of {max} devices and \
                         asked for {} more",
                        g.name,
                        wanted(req)
                    )));
                }
            }
            if g.quota.gpu_hours_per_month.is_some() && needs_devices {
                let mut used = 0.0;
                for m in &g.members {
                    used += self.usage.this_month(m).await?;
                }
                g.quota.check_gpu_hours(&who, used)?;
            }
        }
        Ok(guards)
    }
}
