//! The settings file (`--config`, TOML): what an admin tunes without changing flags.
//! Every table is optional; [`Settings::load`] fills defaults and refuses what cannot
//! work, naming the setting.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::launch::{IdeAuth, Profile};
use crate::time::parse_duration;
pub use crate::user::DefaultQuota;
use crate::user::Role;
use crate::validate::{glob_match, validate_server_name};
use crate::{Error, Result};

/// The settings file: what an admin tunes without restarting flags.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// Quotas for users whose own quota leaves a field unset.
    pub default_quota: DefaultQuota,
    /// Server sizes users pick from, by name.
    pub presets: BTreeMap<String, Preset>,
    /// PromQL used with `--prometheus-url`.
    pub prometheus: Queries,
    /// Which images servers may ask for.
    #[serde(default)]
    pub images: Images,
    /// IDE profiles by name, added to (or replacing) the built-in `jupyterlab`,
    /// `code-server` and `custom`.
    pub profiles: BTreeMap<String, Profile>,
    /// Idle culling (`[culling]`); off unless `idle_timeout` is set.
    pub culling: Culling,
    /// The kubernetes provisioner: how server pods are pinned and run.
    pub kubernetes: KubernetesSettings,
    /// Volume sizes and, in the cluster shape, how volumes are backed (`[storage]`).
    pub storage: StorageSettings,
    /// NFS shares users may browse and mount (`[[shares]]`), defined only here: a
    /// request can never name an NFS server or path.
    pub shares: Vec<Share>,
    /// The local provisioner's isolation (`[local]`).
    pub local: LocalSettings,
    /// The wait queue (`[queue]`).
    pub queue: QueueSettings,
    /// Reservations of devices for future windows (`[reservations]`).
    pub reservations: ReservationSettings,
    /// Messages to people outside the portal (`[notifications]`).
    pub notifications: NotificationSettings,
    /// What users in no group may use (`[entitlements]`; unset: everything).
    pub entitlements: crate::group::Entitlements,
    /// Single sign-on through an OpenID Connect provider (`[oidc]`); off unless set.
    pub oidc: Option<OidcSettings>,
}

/// Who may sign in with a password when single sign-on is on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum LocalAccounts {
    /// Everyone with a password (the default).
    #[default]
    All,
    /// Admins only: a break-glass way in when the provider is down.
    Admins,
    /// Nobody: single sign-on only.
    Off,
}

/// `[oidc]`: sign-in through an OpenID Connect provider (authorization code flow with
/// PKCE). The client secret is read from `client_secret_file` or the environment
/// variable `KCLOUD_OIDC_CLIENT_SECRET`, never from this file.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OidcSettings {
    /// The provider's issuer URL (discovery is `{issuer}/.well-known/openid-configuration`).
    pub issuer: String,
    pub client_id: String,
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub client_secret_file: Option<PathBuf>,
    /// This aggregator's callback as registered with the provider:
    /// `https://kcloud.example.org/api/v1/auth/oidc/callback`.
    pub redirect_url: String,
    /// "Sign in with {display_name}".
    #[serde(default = "default_display_name")]
    pub display_name: String,
    /// The claim that names the user (made a valid kcloud user name).
    #[serde(default = "default_username_claim")]
    pub username_claim: String,
    /// The claim listing the user's groups: members of the kcloud groups of those names.
    #[serde(default = "default_groups_claim")]
    pub groups_claim: String,
    /// Groups (in the claim) whose members are kcloud admins; empty: roles are not
    /// taken from the provider.
    #[serde(default)]
    pub admin_groups: Vec<String>,
    #[serde(default = "default_scopes")]
    pub scopes: Vec<String>,
    #[serde(default)]
    pub local_accounts: LocalAccounts,
}

fn default_display_name() -> String {
    "single sign-on".into()
}
fn default_username_claim() -> String {
    "preferred_username".into()
}
fn default_groups_claim() -> String {
    "groups".into()
}
fn default_scopes() -> Vec<String> {
    ["openid", "profile", "email", "groups"]
        .map(String::from)
        .to_vec()
}

impl OidcSettings {
    fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(Error::Config(format!("[oidc] {m}")));
        let url_ok = |u: &str| u.starts_with("https://") || u.starts_with("http://");
        if !url_ok(&self.issuer) {
            return bad("issuer must be an http(s) URL");
        }
        if !url_ok(&self.redirect_url) || !self.redirect_url.ends_with("/api/v1/auth/oidc/callback")
        {
            return bad("redirect_url must be this aggregator's .../api/v1/auth/oidc/callback");
        }
        if self.client_id.is_empty() {
            return bad("client_id must be set");
        }
        if !self.scopes.iter().any(|s| s == "openid") {
            return bad("scopes must include openid");
        }
        Ok(())
    }
}

/// A duration in a settings file: `"30m"`, `"7d"`, or seconds.
fn duration<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    parse_duration(&s).map_err(|e| serde::de::Error::custom(format!("{s:?}: {e}")))
}

fn opt_duration<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<Duration>, D::Error> {
    duration(d).map(Some)
}

/// `[queue]`: requests that asked to wait when nothing fitting was free.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueueSettings {
    /// The longest `wait.max` a request may ask for (default 7 days).
    #[serde(deserialize_with = "duration")]
    pub max_wait: Duration,
    /// Waiting requests per user (default 5).
    pub max_queued_per_user: u32,
    /// Half-life of the GPU-hours in the fair-share score (default 7 days).
    #[serde(deserialize_with = "duration")]
    pub half_life: Duration,
    /// Fair-share weights by user (default 1): a user with weight 2 is ordered as if
    /// they had used half their GPU-hours.
    pub weights: BTreeMap<String, f64>,
}

impl Default for QueueSettings {
    fn default() -> Self {
        Self {
            max_wait: Duration::from_secs(7 * 86_400),
            max_queued_per_user: 5,
            half_life: Duration::from_secs(7 * 86_400),
            weights: BTreeMap::new(),
        }
    }
}

impl QueueSettings {
    /// A user's fair-share weight.
    pub fn weight(&self, user: &str) -> f64 {
        self.weights.get(user).copied().unwrap_or(1.0)
    }
}

/// `[reservations]`: how long and how far ahead users may book devices.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReservationSettings {
    /// Longest window (default 7 days).
    #[serde(deserialize_with = "duration")]
    pub max_length: Duration,
    /// How far ahead a window may start (default 90 days).
    #[serde(deserialize_with = "duration")]
    pub max_lead: Duration,
    /// Normalized GPU-hours a user may book per calendar week (default 168: one GPU
    /// all week); a large number lifts it.
    pub max_gpu_hours_per_week: Option<f64>,
    /// Reservations a user may have that have not ended yet (default 10).
    pub max_per_user: u32,
    /// A reservation that no server of its owner used this long after its start is
    /// released (default 30 minutes); `"0"` turns the rule off.
    #[serde(deserialize_with = "opt_duration")]
    pub no_show_after: Option<Duration>,
}

impl Default for ReservationSettings {
    fn default() -> Self {
        Self {
            max_length: Duration::from_secs(7 * 86_400),
            max_lead: Duration::from_secs(90 * 86_400),
            max_gpu_hours_per_week: Some(168.0),
            max_per_user: 10,
            no_show_after: Some(Duration::from_secs(30 * 60)),
        }
    }
}

impl ReservationSettings {
    pub fn policy(&self) -> crate::reservation::ReservationPolicy {
        crate::reservation::ReservationPolicy {
            max_length: self.max_length,
            max_lead: self.max_lead,
            max_gpu_hours_per_week: self.max_gpu_hours_per_week,
            no_show_after: self.no_show_after.filter(|d| !d.is_zero()),
        }
    }
}

/// `[notifications]`: an optional Slack-compatible webhook (`{"text": ...}`) told when
/// a queued server starts, a reservation starts, or a server will be stopped.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NotificationSettings {
    pub webhook_url: Option<String>,
}

/// `[local]`: how the local provisioner isolates servers (`--isolation sandbox`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LocalSettings {
    /// Whose uid a server runs as.
    pub identities: Identities,
    /// `range` identities: the first and last uid (the gid is the same number).
    pub uid_range: [u32; 2],
    /// Processes and threads one server may have at once (`pids.max`).
    pub pids_max: u32,
    /// Host paths servers see read-only besides the system's (`/usr`, `/etc`, `/opt`
    /// and the like), e.g. a shared conda root. The install prefix of the program a
    /// server runs (the folder above its `bin/`) is added by itself.
    pub read_only_paths: Vec<PathBuf>,
    /// Where the driver's device files are (`nvidia{N}`, `nvidiactl`, `nvidia-uvm`,
    /// `nvidia-caps/`).
    pub device_root: PathBuf,
    /// The driver's table of MIG capability minors.
    pub mig_minors: PathBuf,
}

/// `[local] identities`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Identities {
    /// A uid (and gid) of `uid_range` per kcloud user, allocated on first use and kept.
    Range,
    /// The owner's own account on this host (same name): labs with Unix accounts,
    /// where files in volumes then belong to the person.
    System,
}

impl Default for LocalSettings {
    fn default() -> Self {
        LocalSettings {
            identities: Identities::Range,
            uid_range: [200_000, 299_999],
            pids_max: 4096,
            read_only_paths: Vec::new(),
            device_root: PathBuf::from("/dev"),
            mig_minors: PathBuf::from("/proc/driver/nvidia-caps/mig-minors"),
        }
    }
}

impl LocalSettings {
    fn validate(&self) -> Result<()> {
        let [first, last] = self.uid_range;
        if first < 1000 || last < first {
            return Err(Error::Config(format!(
                "[local] uid_range = [{first}, {last}]: first ≥ 1000 (no system accounts) \
                 and last ≥ first"
            )));
        }
        if self.pids_max < 16 {
            return Err(Error::Config("[local] pids_max must be at least 16".into()));
        }
        for p in &self.read_only_paths {
            if !p.is_absolute() || p == Path::new("/") {
                return Err(Error::Config(format!(
                    "[local] read_only_paths: {} must be an absolute path below /",
                    p.display()
                )));
            }
        }
        Ok(())
    }
}

/// `[storage]`: volume limits and the cluster shape's backing.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageSettings {
    /// Size of a volume whose request names none.
    pub default_volume_bytes: u64,
    /// Largest size of one volume.
    pub max_volume_bytes: u64,
    /// Volumes per user, at most.
    pub max_volumes_per_user: u32,
    /// Cluster shape: the StorageClass of volume PVCs (default: the cluster's default
    /// class).
    pub storage_class: Option<String>,
    /// Cluster shape: the class is NFS-backed, so volumes can be ReadWriteMany (their
    /// default then).
    pub nfs_backed: bool,
    /// Cluster shape: where the NFS export that backs the class is mounted in the
    /// aggregator's pod; the file browser reaches volumes under it.
    pub nfs_root: Option<PathBuf>,
    /// Cluster shape: the export path the class provisions under; an in-tree `nfs`
    /// PV's path below it names the volume's folder under `nfs_root`.
    pub nfs_export: Option<String>,
}

impl Default for StorageSettings {
    fn default() -> Self {
        Self {
            default_volume_bytes: 10 << 30,
            max_volume_bytes: 1 << 40,
            max_volumes_per_user: 32,
            storage_class: None,
            nfs_backed: false,
            nfs_root: None,
            nfs_export: None,
        }
    }
}

/// An NFS share (`[[shares]]`). Who may use it: users named in `users`, users whose
/// role is in `roles` (`roles = ["user"]` is everyone), and admins always.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Share {
    /// DNS-1123 label: it appears in URLs and mount paths.
    pub name: String,
    /// NFS server (host name or address).
    pub server: String,
    /// Exported path on the server.
    pub path: String,
    /// Read-only unless the admin says otherwise.
    #[serde(default = "yes")]
    pub read_only: bool,
    #[serde(default)]
    pub roles: Vec<Role>,
    #[serde(default)]
    pub users: Vec<String>,
    /// Where the share is mounted on the aggregator's host (local shape) or in its pod
    /// (cluster shape): the file browser and local servers reach it there. Without it
    /// the share can be mounted into cluster servers but not browsed.
    pub local_path: Option<PathBuf>,
    #[serde(default)]
    pub description: Option<String>,
}

fn yes() -> bool {
    true
}

impl Share {
    /// Whether `user` (with `role`) may list, browse and mount this share.
    pub fn allows(&self, user: &str, role: Role) -> bool {
        role == Role::Admin || self.roles.contains(&role) || self.users.iter().any(|u| u == user)
    }

    fn validate(&self) -> Result<()> {
        let bad = |what: &str| Err(Error::Config(format!("share {:?}: {what}", self.name)));
        if validate_server_name(&self.name).is_err() {
            return bad("name must be a DNS-1123 label (a-z, 0-9, '-', at most 63)");
        }
        let host_ok = |c: char| c.is_ascii_alphanumeric() || ".-:[]".contains(c);
        if self.server.is_empty() || self.server.len() > 253 || !self.server.chars().all(host_ok) {
            return bad("server must be a host name or address");
        }
        if !self.path.starts_with('/') || self.path.contains('\0') || self.path.len() > 4096 {
            return bad("path must be an absolute export path");
        }
        if self.local_path.as_ref().is_some_and(|p| !p.is_absolute()) {
            return bad("local_path must be absolute");
        }
        Ok(())
    }
}

/// `[culling]`: stop servers idle longer than `idle_timeout` (e.g. `"1h"`), looking
/// every `interval` (default `"1m"`); and, separately, servers whose every GPU stayed
/// under `gpu_idle_threshold` percent for `gpu_idle_for` (e.g. `5` and `"2h"`), warned
/// `gpu_idle_warn` before (default `"15m"`), which the owner may answer "keep"
/// `gpu_idle_keeps_per_day` times a day (default 2).
#[derive(Debug, Clone, Default, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Culling {
    pub idle_timeout: Option<String>,
    pub interval: Option<String>,
    pub gpu_idle_threshold: Option<f64>,
    pub gpu_idle_for: Option<String>,
    pub gpu_idle_warn: Option<String>,
    pub gpu_idle_keeps_per_day: Option<u32>,
}

/// Idle-GPU reclaim, when on: see [`Culling`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GpuIdle {
    /// Busy share (0 to 1) under which a device counts as idle.
    pub threshold: f64,
    pub idle_for: Duration,
    /// How long before the stop the owner is warned (less than `idle_for`).
    pub warn_before: Duration,
    pub keeps_per_day: u32,
}

impl Culling {
    /// `(idle timeout, interval)` when culling is on.
    pub fn schedule(&self) -> Result<Option<(Duration, Duration)>> {
        let parse = |what: &str, v: &str| {
            parse_duration(v).map_err(|e| Error::Config(format!("[culling] {what} = {v:?}: {e}")))
        };
        let Some(idle) = &self.idle_timeout else {
            return Ok(None);
        };
        let idle = parse("idle_timeout", idle)?;
        let every = match &self.interval {
            Some(v) => parse("interval", v)?,
            None => Duration::from_secs(60),
        };
        if idle.is_zero() || every.is_zero() {
            return Err(Error::Config(
                "[culling] idle_timeout and interval must be more than 0".into(),
            ));
        }
        Ok(Some((idle, every)))
    }

    /// Idle-GPU reclaim when `gpu_idle_for` is set (with a threshold).
    pub fn gpu_idle(&self) -> Result<Option<GpuIdle>> {
        let bad = |m: String| Err(Error::Config(format!("[culling] {m}")));
        let parse = |what: &str, v: &str| {
            parse_duration(v).map_err(|e| Error::Config(format!("[culling] {what} = {v:?}: {e}")))
        };
        let Some(idle_for) = &self.gpu_idle_for else {
            if self.gpu_idle_threshold.is_some() || self.gpu_idle_warn.is_some() {
                return bad("gpu_idle_threshold and gpu_idle_warn need gpu_idle_for".into());
            }
            return Ok(None);
        };
        let idle_for = parse("gpu_idle_for", idle_for)?;
        let Some(threshold) = self.gpu_idle_threshold else {
            return bad("gpu_idle_for needs gpu_idle_threshold (percent, e.g. 5)".into());
        };
        if !(threshold > 0.0 && threshold <= 100.0) {
            return bad(format!(
                "gpu_idle_threshold = {threshold}: a percentage above 0, at most 100"
            ));
        }
        if idle_for < Duration::from_secs(1) {
            return bad("gpu_idle_for must be at least 1s".into());
        }
        let warn_before = match &self.gpu_idle_warn {
            Some(v) => parse("gpu_idle_warn", v)?,
            // The default warning never comes before half the window has passed.
            None => Duration::from_secs(15 * 60).min(idle_for / 2),
        };
        if warn_before >= idle_for {
            return bad("gpu_idle_warn must be shorter than gpu_idle_for".into());
        }
        Ok(Some(GpuIdle {
            threshold: threshold / 100.0,
            idle_for,
            warn_before,
            keeps_per_day: self.gpu_idle_keeps_per_day.unwrap_or(2),
        }))
    }
}

/// `[kubernetes]`: what server pods look like in the cluster shape.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KubernetesSettings {
    pub pinning: Pinning,
    /// The uid and gid server containers run as: never root. The defaults are the
    /// Jupyter docker-stacks' `jovyan` (1000) and `users` (100).
    pub run_as_user: i64,
    pub run_as_group: i64,
}

impl Default for KubernetesSettings {
    fn default() -> Self {
        Self {
            pinning: Pinning::default(),
            run_as_user: 1000,
            run_as_group: 100,
        }
    }
}

/// `[kubernetes.pinning]`: how a pod gets exactly its devices (DESIGN.md).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Pinning {
    pub mode: PinningMode,
    /// env mode: RuntimeClass of pods with devices (e.g. `nvidia`); none when absent.
    pub runtime_class_name: Option<String>,
    /// dra mode: the device classes of NVIDIA's DRA driver.
    pub gpu_device_class: String,
    pub mig_device_class: String,
    /// env mode: taints of GPU nodes that pods with devices tolerate.
    pub tolerations: Vec<Toleration>,
}

impl Default for Pinning {
    fn default() -> Self {
        Self {
            mode: PinningMode::Env,
            runtime_class_name: None,
            gpu_device_class: "gpu.nvidia.com".into(),
            mig_device_class: "mig.nvidia.com".into(),
            tolerations: vec![Toleration {
                key: Some("nvidia.com/gpu".into()),
                operator: TolerationOperator::Exists,
                value: None,
                effect: Some(TaintEffect::NoSchedule),
            }],
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PinningMode {
    /// `nodeSelector` on the node and `NVIDIA_VISIBLE_DEVICES` with the UUIDs.
    Env,
    /// A `resource.k8s.io/v1` ResourceClaim per server, selecting the UUIDs.
    Dra,
}

/// A pod toleration, in the settings file's snake_case.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Toleration {
    pub key: Option<String>,
    #[serde(default)]
    pub operator: TolerationOperator,
    pub value: Option<String>,
    /// None: every effect.
    pub effect: Option<TaintEffect>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum TolerationOperator {
    #[default]
    Equal,
    Exists,
}

impl TolerationOperator {
    pub fn as_str(self) -> &'static str {
        match self {
            TolerationOperator::Equal => "Equal",
            TolerationOperator::Exists => "Exists",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum TaintEffect {
    NoSchedule,
    PreferNoSchedule,
    NoExecute,
}

impl TaintEffect {
    pub fn as_str(self) -> &'static str {
        match self {
            TaintEffect::NoSchedule => "NoSchedule",
            TaintEffect::PreferNoSchedule => "PreferNoSchedule",
            TaintEffect::NoExecute => "NoExecute",
        }
    }
}

/// The image allow-list (`[images]`). The local provisioner records images but runs
/// JupyterLab from this host; the check applies all the same.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Images {
    /// Patterns with `*` (any characters), e.g. `quay.io/jupyter/*`.
    #[serde(default)]
    pub allowed: Vec<String>,
    /// Used when a request names no image; always allowed.
    #[serde(default)]
    pub default: Option<String>,
}

impl Default for Images {
    fn default() -> Self {
        Self {
            allowed: vec!["quay.io/jupyter/*".into()],
            default: Some("quay.io/jupyter/scipy-notebook:latest".into()),
        }
    }
}

impl Images {
    pub fn allows(&self, image: &str) -> bool {
        self.default.as_deref() == Some(image) || self.allowed.iter().any(|p| glob_match(p, image))
    }
}

/// A named server size.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Preset {
    /// CPU in millicores.
    pub cpu_millis: u64,
    pub memory_bytes: u64,
    #[serde(default)]
    pub description: String,
}

impl Settings {
    pub fn load(path: Option<&Path>) -> Result<Self> {
        let mut s = match path {
            None => Settings::default(),
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| Error::Io {
                    context: format!("reading {}", p.display()),
                    source,
                })?;
                toml::from_str(&text).map_err(|e| Error::Config(format!("{}: {e}", p.display())))?
            }
        };
        if s.presets.is_empty() {
            s.presets = default_presets();
        }
        let mut profiles = crate::launch::builtin();
        profiles.append(&mut s.profiles);
        for (name, p) in &profiles {
            validate_server_name(name)
                .map_err(|_| Error::Config(format!("profile {name:?}: not a DNS-1123 label")))?;
            if p.port == 0 {
                return Err(Error::Config(format!("profile {name:?}: port must be > 0")));
            }
            if p.command.is_none() && !p.user_command && p.auth != IdeAuth::JupyterToken {
                return Err(Error::Config(format!(
                    "profile {name:?}: without a command it runs JupyterLab, whose auth is \
                     the token (auth = \"jupyter_token\")"
                )));
            }
        }
        s.profiles = profiles;
        s.culling.schedule()?;
        s.culling.gpu_idle()?;
        if let Some(o) = &s.oidc {
            o.validate()?;
        }
        s.local.validate()?;
        let k = &s.kubernetes;
        if k.run_as_user <= 0 || k.run_as_group < 0 {
            return Err(Error::Config(
                "kubernetes.run_as_user must be > 0 (servers never run as root) and \
                 run_as_group ≥ 0"
                    .into(),
            ));
        }
        if k.pinning.runtime_class_name.as_deref() == Some("") {
            s.kubernetes.pinning.runtime_class_name = None;
        }
        for t in &s.kubernetes.pinning.tolerations {
            if t.operator == TolerationOperator::Exists && t.value.is_some() {
                return Err(Error::Config(
                    "kubernetes.pinning.tolerations: operator Exists takes no value".into(),
                ));
            }
            if t.key.is_none() && t.operator != TolerationOperator::Exists {
                return Err(Error::Config(
                    "kubernetes.pinning.tolerations: without a key, operator must be Exists".into(),
                ));
            }
        }
        for (name, p) in &s.presets {
            if p.cpu_millis == 0 || p.memory_bytes < (64 << 20) {
                return Err(Error::Config(format!(
                    "preset {name:?}: cpu_millis must be > 0 and memory_bytes ≥ 64 MiB"
                )));
            }
        }
        let st = &s.storage;
        if st.default_volume_bytes == 0 || st.default_volume_bytes > st.max_volume_bytes {
            return Err(Error::Config(
                "storage: default_volume_bytes must be > 0 and ≤ max_volume_bytes".into(),
            ));
        }
        if st.nfs_root.as_ref().is_some_and(|p| !p.is_absolute()) {
            return Err(Error::Config("storage: nfs_root must be absolute".into()));
        }
        let q = &s.queue;
        if q.max_wait.is_zero() || q.half_life.is_zero() {
            return Err(Error::Config(
                "[queue] max_wait and half_life must be more than 0".into(),
            ));
        }
        if let Some((u, w)) = q
            .weights
            .iter()
            .find(|(_, w)| !(w.is_finite() && **w > 0.0))
        {
            return Err(Error::Config(format!(
                "[queue] weights: {u:?} = {w}: a weight is a number > 0"
            )));
        }
        let r = &s.reservations;
        if r.max_length < crate::reservation::MIN_LENGTH || r.max_lead.is_zero() {
            return Err(Error::Config(
                "[reservations] max_length must be at least 15m and max_lead more than 0".into(),
            ));
        }
        if r.max_gpu_hours_per_week
            .is_some_and(|h| !(h.is_finite() && h >= 0.0))
        {
            return Err(Error::Config(
                "[reservations] max_gpu_hours_per_week must be a number ≥ 0".into(),
            ));
        }
        if let Some(url) = &s.notifications.webhook_url
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return Err(Error::Config(format!(
                "[notifications] webhook_url = {url:?}: an http:// or https:// URL"
            )));
        }
        let mut names = std::collections::HashSet::new();
        for share in &s.shares {
            share.validate()?;
            if !names.insert(share.name.as_str()) {
                return Err(Error::Config(format!(
                    "share {:?} is defined twice",
                    share.name
                )));
            }
        }
        Ok(s)
    }
}

fn default_presets() -> BTreeMap<String, Preset> {
    let p = |cpu_millis, gib: u64, description: &str| Preset {
        cpu_millis,
        memory_bytes: gib << 30,
        description: description.into(),
    };
    BTreeMap::from([
        ("small".into(), p(2_000, 8, "2 CPUs, 8 GiB")),
        ("medium".into(), p(8_000, 32, "8 CPUs, 32 GiB")),
        ("large".into(), p(16_000, 128, "16 CPUs, 128 GiB")),
    ])
}

/// The PromQL the aggregator runs. Instant queries return one series per node, told
/// apart by `node_label`; `{node}` in history queries is replaced by the node name
/// (escaped for a label matcher). Defaults read the agents' own series; point them at
/// node-exporter or DCGM recording rules in the settings file's `[prometheus]` table.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Queries {
    pub node_label: String,
    pub cpu_count: String,
    pub cpu_utilization: String,
    pub memory_total: String,
    pub memory_used: String,
    pub gpu_utilization: String,
    pub history_cpu: String,
    pub history_memory: String,
    pub history_gpu_utilization: String,
}

impl Default for Queries {
    fn default() -> Self {
        Self {
            node_label: "Hostname".into(),
            cpu_count: "max by (Hostname) (kcloud_host_cpus)".into(),
            cpu_utilization: "max by (Hostname) (kcloud_host_cpu_utilization_ratio)".into(),
            memory_total: "max by (Hostname) (kcloud_host_memory_total_bytes)".into(),
            memory_used: "max by (Hostname) (kcloud_host_memory_used_bytes)".into(),
            gpu_utilization: "avg by (Hostname) (DCGM_FI_DEV_GPU_UTIL)".into(),
            history_cpu: r#"max(kcloud_host_cpu_utilization_ratio{Hostname="{node}"})"#.into(),
            history_memory: r#"max(kcloud_host_memory_used_bytes{Hostname="{node}"})"#.into(),
            history_gpu_utilization: r#"avg(DCGM_FI_DEV_GPU_UTIL{Hostname="{node}"})"#.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_file_parses_and_validates() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kcloud.toml");
        std::fs::write(
            &path,
            "[default_quota]\ngpus = 2\n[presets.tiny]\ncpu_millis = 500\nmemory_bytes = 1073741824\n",
        )
        .unwrap();
        let s = Settings::load(Some(&path)).unwrap();
        assert_eq!(s.default_quota.gpus, Some(2));
        assert_eq!(
            s.default_quota.servers,
            Some(4),
            "unset fields keep defaults"
        );
        assert_eq!(s.presets.len(), 1);

        std::fs::write(&path, "[presets.bad]\ncpu_millis = 0\nmemory_bytes = 1\n").unwrap();
        assert!(Settings::load(Some(&path)).is_err());
        std::fs::write(&path, "unknown = 1\n").unwrap();
        assert!(Settings::load(Some(&path)).is_err());
        assert_eq!(Settings::load(None).unwrap().presets.len(), 3);
    }

    #[test]
    fn gpu_idle_reclaim_settings() {
        let culling = |toml: &str| -> Result<Option<GpuIdle>> {
            let c: Culling = toml::from_str(toml).map_err(|e| Error::Config(e.to_string()))?;
            c.gpu_idle()
        };
        assert_eq!(culling("").unwrap(), None);
        let g = culling("gpu_idle_threshold = 5\ngpu_idle_for = \"2h\"")
            .unwrap()
            .unwrap();
        assert_eq!(g.threshold, 0.05);
        assert_eq!(g.idle_for, Duration::from_secs(7200));
        assert_eq!(g.warn_before, Duration::from_secs(900));
        assert_eq!(g.keeps_per_day, 2);
        let g =
            culling("gpu_idle_threshold = 2.5\ngpu_idle_for = \"10m\"\ngpu_idle_keeps_per_day = 0")
                .unwrap()
                .unwrap();
        assert_eq!(
            g.warn_before,
            Duration::from_secs(300),
            "at most half the window"
        );
        assert_eq!(g.keeps_per_day, 0);
        for bad in [
            "gpu_idle_for = \"2h\"",
            "gpu_idle_threshold = 5",
            "gpu_idle_threshold = 0\ngpu_idle_for = \"2h\"",
            "gpu_idle_threshold = 101\ngpu_idle_for = \"2h\"",
            "gpu_idle_threshold = 5\ngpu_idle_for = \"soon\"",
            "gpu_idle_threshold = 5\ngpu_idle_for = \"1h\"\ngpu_idle_warn = \"1h\"",
        ] {
            assert!(culling(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn queue_and_reservation_settings_as_the_chart_renders_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kcloud.toml");
        // Helm renders whole numbers without a decimal point.
        std::fs::write(
            &path,
            "[queue]\nmax_wait = \"7d\"\nmax_queued_per_user = 5\nhalf_life = \"7d\"\n\
             weights = { \"alice\" = 2 }\n[reservations]\nmax_length = \"7d\"\n\
             max_lead = \"90d\"\nmax_gpu_hours_per_week = 40\nno_show_after = \"0\"\n",
        )
        .unwrap();
        let s = Settings::load(Some(&path)).unwrap();
        assert_eq!(s.queue.weight("alice"), 2.0);
        assert_eq!(s.queue.weight("bob"), 1.0);
        let p = s.reservations.policy();
        assert_eq!(p.max_gpu_hours_per_week, Some(40.0));
        assert_eq!(p.no_show_after, None, "\"0\" turns the no-show rule off");
        for bad in [
            "[queue]\nhalf_life = \"0s\"\n",
            "[queue]\nweights = { alice = 0 }\n",
            "[queue]\nmax_wait = \"soon\"\n",
            "[reservations]\nmax_length = \"5m\"\n",
            "[reservations]\nmax_gpu_hours_per_week = -1\n",
            "[notifications]\nwebhook_url = \"ftp://x\"\n",
        ] {
            std::fs::write(&path, bad).unwrap();
            assert!(Settings::load(Some(&path)).is_err(), "{bad}");
        }
    }

    #[test]
    fn kubernetes_settings_parse_and_validate() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kcloud.toml");
        let load = |text: &str| {
            std::fs::write(&path, text).unwrap();
            Settings::load(Some(&path))
        };
        let s = load(
            "[kubernetes.pinning]\nmode = \"dra\"\nruntime_class_name = \"\"\n\
             gpu_device_class = \"gpu.example.com\"\n\
             [[kubernetes.pinning.tolerations]]\nkey = \"gpu\"\nvalue = \"yes\"\n\
             effect = \"NoExecute\"\n",
        )
        .unwrap();
        let p = &s.kubernetes.pinning;
        assert_eq!(p.mode, PinningMode::Dra);
        assert_eq!(p.runtime_class_name, None, "empty is none");
        assert_eq!(p.gpu_device_class, "gpu.example.com");
        assert_eq!(p.mig_device_class, "mig.nvidia.com", "default kept");
        assert_eq!(p.tolerations.len(), 1);
        assert_eq!(p.tolerations[0].operator, TolerationOperator::Equal);
        assert_eq!(p.tolerations[0].effect, Some(TaintEffect::NoExecute));
        assert_eq!(s.kubernetes.run_as_user, 1000);

        let d = Settings::load(None).unwrap().kubernetes;
        assert_eq!(d.pinning.mode, PinningMode::Env);
        assert_eq!(
            d.pinning.tolerations[0].key.as_deref(),
            Some("nvidia.com/gpu")
        );

        for bad in [
            "[kubernetes.pinning]\nmode = \"cuda\"\n",
            "[kubernetes]\nrun_as_user = 0\n",
            "[kubernetes]\nnamespace = \"x\"\n",
            "[[kubernetes.pinning.tolerations]]\noperator = \"Exists\"\nvalue = \"x\"\n",
            "[[kubernetes.pinning.tolerations]]\nvalue = \"x\"\n",
            "[[kubernetes.pinning.tolerations]]\nkey = \"a\"\neffect = \"Sometimes\"\n",
        ] {
            assert!(load(bad).is_err(), "{bad}");
        }
    }
}
