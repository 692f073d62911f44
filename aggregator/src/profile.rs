//! IDE profiles: what a server runs and how the proxy talks to it.
//!
//! A profile says how to start the IDE, which port it listens on in a pod, whether it
//! is told its base URL (`/user/{user}/{server}/`) or the proxy strips that prefix, which
//! path answers readiness, and how its own authentication is satisfied: JupyterLab gets
//! a per-server token that the proxy adds to every request; code-server and custom
//! programs run with their own auth off, behind the proxy's (owner or admin only).
//!
//! Built in: `jupyterlab` (the default), `code-server`, `custom` (the user's command).
//! `[profiles.NAME]` in the settings file adds profiles or replaces these.
//!
//! The resolved profile is recorded with each server ([`RunProfile`]), so a server
//! keeps behaving the same across restarts even if the settings change.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Whether the IDE is served under `/user/{user}/{server}/` itself, or at `/` with the
/// proxy removing the prefix (for IDEs that use relative URLs, such as code-server).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum BaseUrl {
    #[default]
    Pass,
    Strip,
}

/// How the IDE's own authentication is satisfied.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum IdeAuth {
    /// A per-server token in `JUPYTER_TOKEN`, added by the proxy as
    /// `Authorization: token ...`; users never see it.
    #[default]
    JupyterToken,
    /// The IDE's auth is off; only the proxy (owner or admin) guards it. Cluster shape:
    /// the chart's NetworkPolicy admits only the aggregator to server pods.
    None,
}

/// An IDE profile from the settings (`[profiles.NAME]`).
#[derive(Clone, Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    #[serde(default)]
    pub description: String,
    /// Program and arguments; `{port}`, `{base_url}` and `{ip}` (the address to bind:
    /// loopback locally, all addresses in a pod) are replaced. Absent: JupyterLab, with
    /// kcloud's own options.
    #[serde(default)]
    pub command: Option<Vec<String>>,
    /// Users give the command themselves (`command` in the request).
    #[serde(default)]
    pub user_command: bool,
    /// Cluster shape: the image, unless the request names one (default: `[images]`).
    #[serde(default)]
    pub image: Option<String>,
    /// Cluster shape: the port the IDE listens on in its pod.
    #[serde(default = "default_port")]
    pub port: u16,
    #[serde(default)]
    pub base_url: BaseUrl,
    /// Probed until it answers 2xx, relative to where the IDE serves (its base URL, or
    /// `/` when stripped). Empty: the root, where anything but a 5xx counts.
    #[serde(default)]
    pub readiness_path: String,
    #[serde(default)]
    pub auth: IdeAuth,
}

fn default_port() -> u16 {
    8888
}

pub const DEFAULT_PROFILE: &str = "jupyterlab";
pub const CUSTOM_PROFILE: &str = "custom";

/// The built-in profiles.
pub fn builtin() -> BTreeMap<String, Profile> {
    BTreeMap::from([
        (DEFAULT_PROFILE.to_owned(), jupyterlab()),
        (
            "code-server".to_owned(),
            Profile {
                description: "VS Code in the browser (code-server)".into(),
                command: Some(
                    [
                        "code-server",
                        "--bind-addr",
                        "{ip}:{port}",
                        "--auth",
                        "none",
                        "--disable-telemetry",
                        "--disable-update-check",
                        "--disable-workspace-trust",
                        ".",
                    ]
                    .map(String::from)
                    .to_vec(),
                ),
                user_command: false,
                image: Some("docker.io/codercom/code-server:4.100.3".into()),
                port: 8080,
                base_url: BaseUrl::Strip,
                readiness_path: "healthz".into(),
                auth: IdeAuth::None,
            },
        ),
        (CUSTOM_PROFILE.to_owned(), custom()),
    ])
}

fn jupyterlab() -> Profile {
    Profile {
        description: "JupyterLab".into(),
        command: None,
        user_command: false,
        image: None,
        port: 8888,
        base_url: BaseUrl::Pass,
        readiness_path: "api/status".into(),
        auth: IdeAuth::JupyterToken,
    }
}

fn custom() -> Profile {
    Profile {
        description: "Your own program serving HTTP under {base_url} on {port}".into(),
        command: None,
        user_command: true,
        image: None,
        port: 8888,
        base_url: BaseUrl::Pass,
        readiness_path: String::new(),
        auth: IdeAuth::None,
    }
}

/// What a server records of its profile: enough to probe and proxy it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RunProfile {
    pub name: String,
    pub base_url: BaseUrl,
    pub readiness_path: String,
    pub auth: IdeAuth,
    /// The container port (cluster shape).
    #[serde(default = "default_port")]
    pub port: u16,
}

impl RunProfile {
    pub fn from_profile(name: &str, p: &Profile) -> Self {
        Self {
            name: name.to_owned(),
            base_url: p.base_url,
            readiness_path: p.readiness_path.clone(),
            auth: p.auth,
            port: p.port,
        }
    }

    /// Servers recorded before profiles existed: JupyterLab unless they had their own
    /// command (which ran with a token in its environment but answered without one).
    pub fn legacy(custom_command: bool) -> Self {
        if custom_command {
            Self::from_profile(CUSTOM_PROFILE, &custom())
        } else {
            Self::from_profile(DEFAULT_PROFILE, &jupyterlab())
        }
    }

    pub fn is_jupyter(&self) -> bool {
        self.auth == IdeAuth::JupyterToken
    }

    /// The upstream path of the readiness probe for a server under `base` (with its
    /// trailing slash).
    pub fn probe_path(&self, base: &str) -> String {
        match self.base_url {
            BaseUrl::Pass => format!("{base}{}", self.readiness_path),
            BaseUrl::Strip => format!("/{}", self.readiness_path),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtins_and_probe_paths() {
        let b = builtin();
        let jl = RunProfile::from_profile("jupyterlab", &b["jupyterlab"]);
        assert!(jl.is_jupyter());
        assert_eq!(jl.probe_path("/user/a/s/"), "/user/a/s/api/status");
        let cs = RunProfile::from_profile("code-server", &b["code-server"]);
        assert!(!cs.is_jupyter());
        assert_eq!(cs.probe_path("/user/a/s/"), "/healthz");
        assert_eq!(RunProfile::legacy(true).name, "custom");
        assert_eq!(RunProfile::legacy(false).name, "jupyterlab");
        assert_eq!(
            RunProfile::legacy(true).probe_path("/user/a/s/"),
            "/user/a/s/"
        );
    }

    #[test]
    fn profiles_parse_from_toml() {
        let p: Profile = toml::from_str(
            "command = [\"rstudio-server\", \"--www-port={port}\"]\nport = 8787\nbase_url = \"strip\"\nauth = \"none\"\n",
        )
        .unwrap();
        assert_eq!(p.base_url, BaseUrl::Strip);
        assert_eq!(p.auth, IdeAuth::None);
        assert_eq!(p.port, 8787);
        assert!(toml::from_str::<Profile>("auth = \"password\"\n").is_err());
        assert!(toml::from_str::<Profile>("colour = 1\n").is_err());
    }
}
