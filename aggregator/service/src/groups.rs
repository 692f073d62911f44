//! Groups (see `kcloud_core::group` for the rules): admins create and change them;
//! members see their own; what a user may use is what their groups are entitled to.

use std::net::IpAddr;
use std::sync::Arc;

use serde::Deserialize;
use utoipa::ToSchema;

use kcloud_cluster::Cluster;
use kcloud_core::caller::Caller;
use kcloud_core::device::DeviceRequest;
use kcloud_core::group::{Entitlements, Group, Use};
use kcloud_core::repo::{GroupPatch, Repository};
use kcloud_core::settings::Settings;
use kcloud_core::user::{Quota, Role};
use kcloud_core::validate::validate_user_name;
use kcloud_core::{Error, Result, now_ms};

use crate::audit::Audit;

const MAX_DESCRIPTION: usize = 500;
const MAX_MEMBERS_PER_CHANGE: usize = 1000;

/// `POST /api/v1/groups`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewGroup {
    /// 1-63 of a-z, 0-9 and '-'.
    #[schema(pattern = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")]
    pub name: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    #[serde(deserialize_with = "kcloud_core::schema::object")]
    pub quota: Quota,
    #[serde(default)]
    #[serde(deserialize_with = "kcloud_core::schema::object")]
    pub entitlements: Entitlements,
    #[serde(default)]
    pub members: Vec<String>,
}

/// `PATCH /api/v1/groups/{group}`: fields given are replaced; members added, removed.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChangeGroup {
    pub description: Option<String>,
    #[serde(default, deserialize_with = "kcloud_core::schema::optional_object")]
    pub quota: Option<Quota>,
    #[serde(default, deserialize_with = "kcloud_core::schema::optional_object")]
    pub entitlements: Option<Entitlements>,
    #[serde(default)]
    pub add_members: Vec<String>,
    #[serde(default)]
    pub remove_members: Vec<String>,
}

/// Groups, and what users may use. Share it as `Arc<Groups>`.
pub struct Groups {
    repo: Arc<dyn Repository>,
    audit: Audit,
    settings: Arc<Settings>,
}

fn not_found(name: &str) -> Error {
    Error::NotFound(format!("no group {name:?}"))
}

fn validate_group_name(name: &str) -> Result<()> {
    validate_user_name(name).map_err(|_| {
        Error::BadRequest(
            "group name must be 1-63 characters of a-z, 0-9 and '-', starting and ending with \
             a letter or digit"
                .into(),
        )
    })
}

fn validate_members(members: &[String]) -> Result<()> {
    if members.len() > MAX_MEMBERS_PER_CHANGE {
        return Err(Error::BadRequest(format!(
            "members: at most {MAX_MEMBERS_PER_CHANGE} at once"
        )));
    }
    members.iter().try_for_each(|m| validate_user_name(m))
}

fn validate_description(d: &str) -> Result<()> {
    if d.chars().count() > MAX_DESCRIPTION || d.chars().any(|c| c.is_control() && c != '\n') {
        return Err(Error::BadRequest(format!(
            "description: at most {MAX_DESCRIPTION} characters, no control characters"
        )));
    }
    Ok(())
}

impl Groups {
    pub fn new(repo: Arc<dyn Repository>, settings: Arc<Settings>) -> Arc<Self> {
        Arc::new(Self {
            audit: Audit::new(repo.clone()),
            repo,
            settings,
        })
    }

    pub async fn create(&self, caller: &Caller, client: IpAddr, g: NewGroup) -> Result<Group> {
        caller.require_admin()?;
        validate_group_name(&g.name)?;
        validate_description(&g.description)?;
        validate_members(&g.members)?;
        g.quota.validate()?;
        g.entitlements.validate()?;
        let mut members = g.members;
        members.sort();
        members.dedup();
        let group = Group {
            name: g.name,
            description: g.description,
            quota: g.quota,
            entitlements: g.entitlements,
            members,
            created_at_ms: now_ms(),
        };
        self.repo.create_group(group.clone()).await?;
        self.audit
            .record(
                caller,
                client,
                "group_create",
                group.name.clone(),
                format!(
                    "members=[{}] quota={} entitlements={}",
                    group.members.join(","),
                    serde_json::to_string(&group.quota).unwrap_or_default(),
                    serde_json::to_string(&group.entitlements).unwrap_or_default()
                ),
            )
            .await?;
        Ok(group)
    }

    /// Every group (admins), or the caller's own.
    pub async fn list(&self, caller: &Caller) -> Result<Vec<Group>> {
        if caller.is_admin() {
            self.repo.groups().await
        } else {
            self.repo.groups_of(&caller.name).await
        }
    }

    /// A group its members and admins may see; to anyone else it does not exist.
    pub async fn get(&self, caller: &Caller, name: &str) -> Result<Group> {
        validate_group_name(name)?;
        let g = self
            .repo
            .group(name)
            .await?
            .ok_or_else(|| not_found(name))?;
        if caller.is_admin() || g.members.contains(&caller.name) {
            Ok(g)
        } else {
            Err(not_found(name))
        }
    }

    pub async fn update(
        &self,
        caller: &Caller,
        client: IpAddr,
        name: &str,
        c: ChangeGroup,
    ) -> Result<Group> {
        caller.require_admin()?;
        validate_group_name(name)?;
        if let Some(d) = &c.description {
            validate_description(d)?;
        }
        if let Some(q) = &c.quota {
            q.validate()?;
        }
        if let Some(e) = &c.entitlements {
            e.validate()?;
        }
        validate_members(&c.add_members)?;
        validate_members(&c.remove_members)?;
        let detail = {
            let mut parts = Vec::new();
            if c.description.is_some() {
                parts.push("description".to_owned());
            }
            if let Some(q) = &c.quota {
                parts.push(format!(
                    "quota={}",
                    serde_json::to_string(q).unwrap_or_default()
                ));
            }
            if let Some(e) = &c.entitlements {
                parts.push(format!(
                    "entitlements={}",
                    serde_json::to_string(e).unwrap_or_default()
                ));
            }
            if !c.add_members.is_empty() {
                parts.push(format!("add=[{}]", c.add_members.join(",")));
            }
            if !c.remove_members.is_empty() {
                parts.push(format!("remove=[{}]", c.remove_members.join(",")));
            }
            parts.join(" ")
        };
        let g = self
            .repo
            .update_group(
                name,
                GroupPatch {
                    description: c.description,
                    quota: c.quota,
                    entitlements: c.entitlements,
                    add_members: c.add_members,
                    remove_members: c.remove_members,
                },
            )
            .await?
            .ok_or_else(|| not_found(name))?;
        self.audit
            .record(caller, client, "group_update", name.to_owned(), detail)
            .await?;
        Ok(g)
    }

    pub async fn delete(&self, caller: &Caller, client: IpAddr, name: &str) -> Result<()> {
        caller.require_admin()?;
        validate_group_name(name)?;
        if !self.repo.delete_group(name).await? {
            return Err(not_found(name));
        }
        self.audit
            .record(
                caller,
                client,
                "group_delete",
                name.to_owned(),
                String::new(),
            )
            .await
    }

    /// Makes `user` a member of exactly the existing groups named in `names` (single
    /// sign-on: memberships follow the provider's groups claim). Returns the groups
    /// the user is in now.
    pub async fn sync_member(&self, user: &str, names: &[String]) -> Result<Vec<String>> {
        let mut now_in = Vec::new();
        for g in self.repo.groups().await? {
            let want = names.contains(&g.name);
            let is = g.members.iter().any(|m| m == user);
            if want != is {
                let patch = GroupPatch {
                    add_members: if want { vec![user.to_owned()] } else { vec![] },
                    remove_members: if want { vec![] } else { vec![user.to_owned()] },
                    ..GroupPatch::default()
                };
                self.repo.update_group(&g.name, patch).await?;
                self.audit
                    .record_system(
                        "group_update",
                        g.name.clone(),
                        format!(
                            "{}=[{user}] (single sign-on groups claim)",
                            if want { "add" } else { "remove" }
                        ),
                    )
                    .await?;
            }
            if want {
                now_in.push(g.name);
            }
        }
        Ok(now_in)
    }

    /// The groups `user` is in.
    pub async fn of(&self, user: &str) -> Result<Vec<Group>> {
        self.repo.groups_of(user).await
    }

    /// What `user` may use: everything for an admin; for a member, what any of their
    /// groups allows; for a user in no group, the settings' `[entitlements]`.
    pub async fn entitlements(&self, user: &str, role: Role) -> Result<Entitlements> {
        if role == Role::Admin {
            return Ok(Entitlements::default());
        }
        let groups = self.repo.groups_of(user).await?;
        if groups.is_empty() {
            return Ok(self.settings.entitlements.clone());
        }
        Ok(Entitlements::union(groups.iter().map(|g| &g.entitlements)))
    }
}

/// The devices `req` would use against `e`: 403 naming the missing entitlement. A
/// placement request without a model, from a user restricted to some models, must
/// name one (the ledger would pick any). Unknown devices pass (refused later, with
/// their own message).
pub fn check_devices(
    cluster: &Cluster,
    e: &Entitlements,
    req: Option<&DeviceRequest>,
) -> Result<()> {
    let restricted_models = || {
        Error::Forbidden(format!(
            "not entitled to every GPU model: name one in gpu_request.model (your groups \
             may use {})",
            e.models.as_deref().unwrap_or_default().join(", ")
        ))
    };
    match req {
        None => Ok(()),
        Some(DeviceRequest::Exact(devices)) => {
            for d in devices {
                // Unknown devices are refused later, with their own message.
                let Some(f) = cluster.describe(d) else {
                    continue;
                };
                e.check(Use::Model(&f.model))?;
                if let Some(p) = &f.profile {
                    e.check(Use::MigProfile(p))?;
                }
            }
            Ok(())
        }
        Some(DeviceRequest::Gpus { model, .. }) => match model {
            Some(m) => e.check(Use::Model(m)),
            None if e.models.is_some() => Err(restricted_models()),
            None => Ok(()),
        },
        Some(DeviceRequest::Mig { profile, model }) => {
            e.check(Use::MigProfile(profile))?;
            match model {
                Some(m) => e.check(Use::Model(m)),
                None if e.models.is_some() => Err(restricted_models()),
                None => Ok(()),
            }
        }
    }
}
