//! Groups: labs that share a quota and are entitled to some hardware and software.
//!
//! A user may be in several groups. Quotas: each group's limits hold for its members
//! together, checked with the user's own; the tighter wins. Entitlements: what a
//! member may use is what any of their groups allows (a field a group leaves unset
//! allows everything of that kind); a user in no group gets the settings'
//! `[entitlements]`; admins are never restricted.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::user::Quota;
use crate::validate::glob_match;
use crate::{Error, Result};

/// What a group's members may use. Each list holds names or `*` patterns; absent
/// (`null`) means everything of that kind.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Entitlements {
    /// GPU models as the inventory names them (`NVIDIA A100-SXM4-80GB`, or
    /// `*A100*`), whole GPUs and MIG instances alike.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub models: Option<Vec<String>>,
    /// MIG profiles (`1g.10gb`, `3g.*`); whole GPUs are not restricted by this.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mig_profiles: Option<Vec<String>>,
    /// IDE profiles (`jupyterlab`, `code-server`, `custom`, ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ide_profiles: Option<Vec<String>>,
    /// Container images (cluster shape), on top of the settings' allow-list.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub images: Option<Vec<String>>,
    /// NFS shares by name, on top of each share's own roles and users.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shares: Option<Vec<String>>,
}

/// What a request would use, to check against entitlements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Use<'a> {
    Model(&'a str),
    MigProfile(&'a str),
    IdeProfile(&'a str),
    Image(&'a str),
    Share(&'a str),
}

impl Use<'_> {
    fn describe(&self) -> (&'static str, &str) {
        match self {
            Use::Model(v) => ("GPU model", v),
            Use::MigProfile(v) => ("MIG profile", v),
            Use::IdeProfile(v) => ("IDE profile", v),
            Use::Image(v) => ("image", v),
            Use::Share(v) => ("share", v),
        }
    }
}

impl Entitlements {
    fn list(&self, u: &Use<'_>) -> &Option<Vec<String>> {
        match u {
            Use::Model(_) => &self.models,
            Use::MigProfile(_) => &self.mig_profiles,
            Use::IdeProfile(_) => &self.ide_profiles,
            Use::Image(_) => &self.images,
            Use::Share(_) => &self.shares,
        }
    }

    /// Whether this allows `u`.
    pub fn allows(&self, u: Use<'_>) -> bool {
        let (_, value) = u.describe();
        match self.list(&u) {
            None => true,
            Some(patterns) => patterns.iter().any(|p| glob_match(p, value)),
        }
    }

    /// 403 naming what is missing when this does not allow `u`.
    pub fn check(&self, u: Use<'_>) -> Result<()> {
        if self.allows(u) {
            return Ok(());
        }
        let (kind, value) = u.describe();
        Err(Error::Forbidden(format!(
            "not entitled: {kind} {value:?} is not among what your groups may use \
             (entitlement {:?}); ask an admin to add it to one of your groups",
            match u {
                Use::Model(_) => "models",
                Use::MigProfile(_) => "mig_profiles",
                Use::IdeProfile(_) => "ide_profiles",
                Use::Image(_) => "images",
                Use::Share(_) => "shares",
            }
        )))
    }

    /// What several groups allow together: anything any of them allows.
    pub fn union<'a>(all: impl IntoIterator<Item = &'a Entitlements>) -> Entitlements {
        let mut out = Entitlements {
            models: Some(vec![]),
            mig_profiles: Some(vec![]),
            ide_profiles: Some(vec![]),
            images: Some(vec![]),
            shares: Some(vec![]),
        };
        let mut any = false;
        for e in all {
            any = true;
            for (acc, add) in [
                (&mut out.models, &e.models),
                (&mut out.mig_profiles, &e.mig_profiles),
                (&mut out.ide_profiles, &e.ide_profiles),
                (&mut out.images, &e.images),
                (&mut out.shares, &e.shares),
            ] {
                match (acc.as_mut(), add) {
                    (Some(a), Some(b)) => {
                        a.extend(b.iter().cloned());
                        a.sort();
                        a.dedup();
                    }
                    (_, None) => *acc = None,
                    (None, Some(_)) => {}
                }
            }
        }
        if any { out } else { Entitlements::default() }
    }

    pub fn validate(&self) -> Result<()> {
        for (what, list) in [
            ("models", &self.models),
            ("mig_profiles", &self.mig_profiles),
            ("ide_profiles", &self.ide_profiles),
            ("images", &self.images),
            ("shares", &self.shares),
        ] {
            let Some(list) = list else { continue };
            if list.len() > 100 {
                return Err(Error::BadRequest(format!(
                    "entitlements.{what}: at most 100 entries"
                )));
            }
            if list
                .iter()
                .any(|p| p.is_empty() || p.chars().count() > 200 || p.chars().any(char::is_control))
            {
                return Err(Error::BadRequest(format!(
                    "entitlements.{what}: entries of 1 to 200 characters, no control characters"
                )));
            }
        }
        Ok(())
    }
}

/// A group as the API shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, ToSchema)]
pub struct Group {
    pub name: String,
    pub description: String,
    /// Limits for the members together (`null` fields: no group limit).
    pub quota: Quota,
    pub entitlements: Entitlements,
    pub members: Vec<String>,
    pub created_at_ms: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(models: Option<&[&str]>, ide: Option<&[&str]>) -> Entitlements {
        let v = |l: Option<&[&str]>| l.map(|l| l.iter().map(|s| s.to_string()).collect());
        Entitlements {
            models: v(models),
            ide_profiles: v(ide),
            ..Entitlements::default()
        }
    }

    #[test]
    fn any_group_allowing_is_enough_and_unset_allows_all() {
        let a100 = e(Some(&["*A100*"]), Some(&["jupyterlab"]));
        let h100 = e(Some(&["NVIDIA H100 80GB HBM3"]), Some(&[]));
        let both = Entitlements::union([&a100, &h100]);
        assert!(both.allows(Use::Model("NVIDIA A100-SXM4-80GB")));
        assert!(both.allows(Use::Model("NVIDIA H100 80GB HBM3")));
        assert!(!both.allows(Use::Model("NVIDIA L40S")));
        assert!(both.allows(Use::IdeProfile("jupyterlab")));
        assert!(!both.allows(Use::IdeProfile("code-server")));
        assert!(both.allows(Use::Share("anything")), "unset: everything");
        let open = Entitlements::union([&a100, &Entitlements::default()]);
        assert!(open.allows(Use::Model("NVIDIA L40S")));
        assert_eq!(Entitlements::union([]), Entitlements::default());
        let err = h100.check(Use::IdeProfile("code-server")).unwrap_err();
        assert!(
            matches!(err, Error::Forbidden(ref m) if m.contains("ide_profiles")),
            "{err}"
        );
    }
}
