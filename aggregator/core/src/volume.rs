//! Volumes as recorded, how they may be mounted, and the paths and sizes users give.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::{Error, Result};

/// The home directory of a server; mounts go below it.
pub const HOME: &str = "/home/jovyan";
/// Where the first volume is mounted when the request names no path.
pub const DEFAULT_VOLUME_MOUNT: &str = "/home/jovyan/work";
/// Mounts per server, at most.
pub const MAX_MOUNTS: usize = 16;

/// How a volume may be mounted: by one server at a time, or by many.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
pub enum AccessMode {
    ReadWriteOnce,
    ReadWriteMany,
}

impl AccessMode {
    pub fn as_str(self) -> &'static str {
        match self {
            AccessMode::ReadWriteOnce => "ReadWriteOnce",
            AccessMode::ReadWriteMany => "ReadWriteMany",
        }
    }

    pub fn parse(s: &str) -> Option<AccessMode> {
        match s {
            "ReadWriteOnce" => Some(AccessMode::ReadWriteOnce),
            "ReadWriteMany" => Some(AccessMode::ReadWriteMany),
            _ => None,
        }
    }
}

/// `pending` until the backing storage exists, `bound` when usable, `lost` when its
/// backing is gone.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum VolumeStatus {
    Pending,
    Bound,
    Lost,
}

/// A volume as recorded: its files live elsewhere (a directory or a PVC).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeRow {
    pub owner: String,
    pub name: String,
    pub size_bytes: u64,
    pub access_mode: AccessMode,
    pub created_at_ms: u64,
}

/// A size: bytes, or a Kubernetes-style quantity (`"10Gi"`, `"500M"`).
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum Size {
    Bytes(u64),
    Text(String),
}

/// A mount path: absolute, strictly under `/home/jovyan`, plain components of
/// `A-Za-z0-9._-` (not `.` or `..`), at most 255 bytes in all.
pub fn validate_mount_path(p: &str) -> Result<String> {
    let err = || {
        Error::BadRequest(format!(
            "mount_path {:?}: must be below {HOME}, made of names of A-Z, a-z, 0-9, '.', '_', '-'",
            p.chars().take(64).collect::<String>()
        ))
    };
    let p = p.strip_suffix('/').unwrap_or(p);
    let rest = p
        .strip_prefix(HOME)
        .and_then(|r| r.strip_prefix('/'))
        .ok_or_else(err)?;
    let ok = p.len() <= 255
        && rest.split('/').all(|c| {
            !c.is_empty()
                && c != "."
                && c != ".."
                && c.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        });
    if ok { Ok(p.to_owned()) } else { Err(err()) }
}

/// Bytes from a number or a quantity (`Ki` .. `Ti` binary, `k` .. `T` decimal; whole
/// numbers only).
pub fn parse_size(s: &Size) -> Result<u64> {
    let err =
        || Error::BadRequest("size: bytes, or a quantity such as \"10Gi\" or \"500M\"".into());
    match s {
        Size::Bytes(b) => Ok(*b),
        Size::Text(t) => {
            let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
            let (num, suffix) = t.split_at(split);
            let factor: u64 = match suffix {
                "" => 1,
                "k" => 1_000,
                "M" => 1_000_000,
                "G" => 1_000_000_000,
                "T" => 1_000_000_000_000,
                "Ki" => 1 << 10,
                "Mi" => 1 << 20,
                "Gi" => 1 << 30,
                "Ti" => 1 << 40,
                _ => return Err(err()),
            };
            num.parse::<u64>()
                .ok()
                .and_then(|n| n.checked_mul(factor))
                .ok_or_else(err)
        }
    }
}

/// Whether `inner` is `outer` or below it, by whole components.
pub fn nested(outer: &str, inner: &str) -> bool {
    inner == outer || inner.starts_with(&format!("{outer}/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size(&Size::Bytes(5)).unwrap(), 5);
        assert_eq!(parse_size(&Size::Text("10Gi".into())).unwrap(), 10 << 30);
        assert_eq!(parse_size(&Size::Text("500M".into())).unwrap(), 500_000_000);
        assert_eq!(parse_size(&Size::Text("7".into())).unwrap(), 7);
        for bad in [
            "",
            "Gi",
            "1.5Gi",
            "-1Gi",
            "10GB",
            "99999999999999999999Ti",
            "1Pi",
        ] {
            assert!(parse_size(&Size::Text(bad.into())).is_err(), "{bad}");
        }
    }

    #[test]
    fn mount_paths() {
        for ok in [
            "/home/jovyan/work",
            "/home/jovyan/data/raw",
            "/home/jovyan/a.b_c-1/",
        ] {
            assert!(validate_mount_path(ok).is_ok(), "{ok}");
        }
        for bad in [
            "/home/jovyan",
            "/home/jovyan/",
            "/home/jovyanx/work",
            "/etc",
            "work",
            "/home/jovyan/../etc",
            "/home/jovyan/./work",
            "/home/jovyan//work",
            "/home/jovyan/wo rk",
            "/home/jovyan/a\0b",
            &format!("/home/jovyan/{}", "a".repeat(300)),
        ] {
            assert!(validate_mount_path(bad).is_err(), "{bad}");
        }
        assert!(nested("/home/jovyan/work", "/home/jovyan/work/x"));
        assert!(nested("/home/jovyan/work", "/home/jovyan/work"));
        assert!(!nested("/home/jovyan/work", "/home/jovyan/workshop"));
    }
}
