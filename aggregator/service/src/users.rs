//! User administration (admins), and what a user may read of themself.

use std::net::IpAddr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use kcloud_cluster::Cluster;
use kcloud_core::caller::Caller;
use kcloud_core::repo::Repository;
use kcloud_core::settings::DefaultQuota;
use kcloud_core::user::{NewUser, Quota, Role, User, UserPatch};
use kcloud_core::validate::validate_user_name;
use kcloud_core::{Error, Result};
use kcloud_provision::Provisioner;

use crate::audit::Audit;
use crate::auth::Auth;

/// A user to create.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateUser {
    /// Also accepted as `username`, like at sign-in.
    #[serde(alias = "username")]
    pub name: String,
    /// 12 to 1024 characters.
    #[schema(min_length = 12, max_length = 1024)]
    pub password: String,
    #[serde(default = "default_role")]
    pub role: Role,
    #[serde(default)]
    #[serde(deserialize_with = "kcloud_core::schema::object")]
    pub quota: Quota,
}

fn default_role() -> Role {
    Role::User
}

/// Fields to change; absent fields stay as they are.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateUser {
    pub role: Option<Role>,
    pub disabled: Option<bool>,
    #[serde(default, deserialize_with = "kcloud_core::schema::optional_object")]
    pub quota: Option<Quota>,
    /// 12 to 1024 characters.
    #[schema(min_length = 12, max_length = 1024)]
    pub password: Option<String>,
}

/// The signed-in user, their effective quota and what they hold.
#[derive(Serialize, ToSchema)]
pub struct Me {
    pub user: User,
    /// The user's own quota with unset fields taken from the configured defaults.
    pub effective_quota: Quota,
    /// Devices (GPUs and MIG instances) held or claimed now.
    pub devices_held: u32,
    /// The groups the user is in.
    pub groups: Vec<String>,
    /// What the user may use (from their groups, or the defaults for users in none;
    /// unset lists: everything).
    pub entitlements: kcloud_core::group::Entitlements,
}

/// The user use cases.
pub struct Users {
    repo: Arc<dyn Repository>,
    audit: Audit,
    auth: Arc<Auth>,
    cluster: Arc<Cluster>,
    provisioner: Arc<dyn Provisioner>,
    defaults: DefaultQuota,
    groups: Arc<crate::groups::Groups>,
}

impl Users {
    pub fn new(
        repo: Arc<dyn Repository>,
        auth: Arc<Auth>,
        cluster: Arc<Cluster>,
        provisioner: Arc<dyn Provisioner>,
        defaults: DefaultQuota,
        groups: Arc<crate::groups::Groups>,
    ) -> Self {
        Self {
            audit: Audit::new(repo.clone()),
            repo,
            auth,
            cluster,
            provisioner,
            defaults,
            groups,
        }
    }

    /// The caller, with their effective quota.
    pub async fn me(&self, caller: &Caller) -> Result<Me> {
        let record = self
            .repo
            .user(&caller.name)
            .await?
            .ok_or_else(|| Error::Unauthorized("account removed".into()))?;
        let groups = self
            .groups
            .of(&caller.name)
            .await?
            .into_iter()
            .map(|g| g.name)
            .collect();
        let entitlements = self
            .groups
            .entitlements(&caller.name, record.user.role)
            .await?;
        Ok(Me {
            groups,
            entitlements,
            devices_held: self.cluster.ledger().devices_held_by(&caller.name),
            effective_quota: record.user.quota.effective(&self.defaults),
            user: record.user,
        })
    }

    pub async fn list(&self, caller: &Caller) -> Result<Vec<User>> {
        caller.require_admin()?;
        self.repo.users().await
    }

    /// A user: admins see anyone, users themself; others are 404.
    pub async fn get(&self, caller: &Caller, name: &str) -> Result<User> {
        caller.may_see_user(name)?;
        self.repo.existing_user(name).await
    }

    pub async fn create(&self, caller: &Caller, client: IpAddr, req: CreateUser) -> Result<User> {
        caller.require_admin()?;
        validate_user_name(&req.name)?;
        req.quota.validate()?;
        let password_hash = self.auth.hash_password(&req.password).await?;
        let user = self
            .repo
            .create_user(NewUser {
                name: req.name,
                password_hash,
                role: req.role,
                quota: req.quota,
            })
            .await?;
        self.audit
            .record(
                caller,
                client,
                "user_create",
                user.name.clone(),
                format!("role={:?}", user.role),
            )
            .await?;
        Ok(user)
    }

    pub async fn update(
        &self,
        caller: &Caller,
        client: IpAddr,
        name: &str,
        req: UpdateUser,
    ) -> Result<User> {
        caller.require_admin()?;
        if let Some(q) = &req.quota {
            q.validate()?;
        }
        let losing_admin = req.role == Some(Role::User) || req.disabled == Some(true);
        if losing_admin {
            self.guard_last_admin(name).await?;
        }
        let password_hash = match req.password {
            Some(p) => Some(self.auth.hash_password(&p).await?),
            None => None,
        };
        let changed_password = password_hash.is_some();
        let detail = format!(
            "role={:?} disabled={:?} quota={} password={}",
            req.role,
            req.disabled,
            req.quota.is_some(),
            changed_password
        );
        // The store ends the user's sessions in the same transaction when they are
        // disabled, get a new password or another role.
        let user = self
            .repo
            .update_user(
                name,
                UserPatch {
                    role: req.role,
                    disabled: req.disabled,
                    quota: req.quota,
                    password_hash,
                },
            )
            .await?
            .ok_or_else(|| Error::NotFound(format!("no user {name:?}")))?;
        self.audit
            .record(caller, client, "user_update", name.to_owned(), detail)
            .await?;
        Ok(user)
    }

    pub async fn delete(&self, caller: &Caller, client: IpAddr, name: &str) -> Result<()> {
        caller.require_admin()?;
        if name == caller.name {
            return Err(Error::Conflict("you cannot delete your own account".into()));
        }
        self.guard_last_admin(name).await?;
        if !self.provisioner.list(Some(name)).is_empty() {
            return Err(Error::Conflict(format!(
                "user {name:?} still has servers; delete their servers first"
            )));
        }
        if self.cluster.ledger().devices_held_by(name) > 0 {
            return Err(Error::Conflict(format!(
                "user {name:?} still holds devices; delete their servers first"
            )));
        }
        if !self.repo.delete_user(name).await? {
            return Err(Error::NotFound(format!("no user {name:?}")));
        }
        self.audit
            .record(
                caller,
                client,
                "user_delete",
                name.to_owned(),
                String::new(),
            )
            .await
    }

    /// Refuses a change that would leave no enabled admin.
    async fn guard_last_admin(&self, name: &str) -> Result<()> {
        let is_enabled_admin = self
            .repo
            .user(name)
            .await?
            .is_some_and(|r| r.user.role == Role::Admin && !r.user.disabled);
        if is_enabled_admin && self.repo.admin_count().await? <= 1 {
            return Err(Error::Conflict("that would leave no enabled admin".into()));
        }
        Ok(())
    }
}
