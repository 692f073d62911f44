//! Devices (whole GPUs `GPU-...` and MIG instances `MIG-...`), who holds them, and what
//! a server asks for.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Most devices one request may ask for.
pub const MAX_DEVICES_PER_REQUEST: u32 = 16;

/// Who holds a device: one server of one user.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
pub struct Holder {
    pub user: String,
    pub server: String,
}

impl Holder {
    pub fn new(user: &str, server: &str) -> Self {
        Holder {
            user: user.to_owned(),
            server: server.to_owned(),
        }
    }
}

/// What a server asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceRequest {
    /// These devices (`GPU-...` / `MIG-...`), all on one node.
    Exact(Vec<String>),
    /// `count` whole GPUs on one node (see the ledger's placement policy).
    Gpus { count: u32, model: Option<String> },
    /// One MIG instance of `profile` (see the ledger's placement policy).
    Mig {
        profile: String,
        model: Option<String>,
    },
}

/// "N whole GPUs" (`count`, optionally of `model`) or "one MIG instance of
/// `mig_profile`" (optionally on `model`), placed by the ledger: what a create or a
/// reservation asks for instead of exact devices.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GpuRequest {
    pub count: Option<u32>,
    pub mig_profile: Option<String>,
    pub model: Option<String>,
}

impl GpuRequest {
    /// The placement request, its fields checked.
    pub fn into_request(self) -> crate::Result<DeviceRequest> {
        let bad = |m: &str| crate::Error::BadRequest(m.to_owned());
        if let Some(m) = &self.model
            && (m.is_empty() || m.len() > 128)
        {
            return Err(bad("gpu_request.model: 1 to 128 characters"));
        }
        match (self.count, self.mig_profile) {
            (Some(count), None) => Ok(DeviceRequest::Gpus {
                count,
                model: self.model,
            }),
            (None, Some(profile)) => {
                if profile.is_empty() || profile.len() > 64 {
                    return Err(bad("gpu_request.mig_profile: 1 to 64 characters"));
                }
                Ok(DeviceRequest::Mig {
                    profile,
                    model: self.model,
                })
            }
            _ => Err(bad(
                "gpu_request: give `count` (whole GPUs) or `mig_profile` (one MIG instance), not both",
            )),
        }
    }
}

/// Where a device lives on its node, as the driver's device files name it: what a
/// sandbox needs to expose exactly that device (`/dev/nvidia{minor}`, and for a MIG
/// instance the capabilities of its GPU and compute instance).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceAddress {
    pub uuid: String,
    /// The GPU's (for a MIG instance: its parent's) minor number; `None` when the agent
    /// did not report it.
    pub minor: Option<u32>,
    /// A MIG instance's GPU instance and compute instance ids.
    pub mig: Option<(u32, u32)>,
}

/// Whether `u` looks like a device UUID a request may name.
pub fn valid_uuid(u: &str) -> bool {
    (u.starts_with("GPU-") || u.starts_with("MIG-"))
        && u.len() <= 128
        && u.bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"-_/".contains(&c))
}
