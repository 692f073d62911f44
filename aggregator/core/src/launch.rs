//! IDE profiles (what a server runs and how the proxy talks to it), and the one place
//! that builds a server's command line for every provisioner.
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

use crate::{Error, Result};

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

/// What to run. `command` absent: JupyterLab, with `args` appended to its command line.
/// `command` present: that program with `command[1..]` and then `args`; `{port}` and
/// `{base_url}` in them are replaced by the port to listen on (loopback) and the path
/// prefix it is served under.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct Launch {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
    /// The IDE profile it runs; absent in records from before profiles.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub profile: Option<RunProfile>,
}

impl Launch {
    /// The server's profile (records from before profiles: JupyterLab, or `custom`
    /// with their own command).
    pub fn run_profile(&self) -> RunProfile {
        self.profile
            .clone()
            .unwrap_or_else(|| RunProfile::legacy(self.command.is_some()))
    }
}

/// Entries in `command`, `args` and `env`, each.
pub const MAX_ENTRIES: usize = 64;
/// Bytes in one argument or env value.
pub const MAX_VALUE_BYTES: usize = 8192;
const MAX_ENV_NAME: usize = 128;

/// JupyterLab writes its server token into the `/lab` page for the browser to send
/// back; behind the proxy the browser must never see it (the proxy adds it), so a
/// page-config hook blanks it. `.update` merges with the user's own settings.
pub const JUPYTER_CONFIG: &str = "\
# Written by kcloud. The proxy adds this server's token to every request; the browser
# never gets it.
c.ServerApp.tornado_settings.update(
    {\"page_config_hook\": lambda handler, page_config: {**page_config, \"token\": \"\"}}
)
";

/// Where a server listens and is served: `{ip}`, `{port}` and `{base_url}` in its
/// command line.
#[derive(Clone, Copy, Debug)]
pub struct Binding<'a> {
    /// The address to bind: loopback locally, all addresses in a pod.
    pub ip: &'a str,
    pub port: u16,
    /// `/user/{owner}/{name}/`.
    pub base_url: &'a str,
}

impl Binding<'_> {
    /// `s` with `{port}`, `{base_url}` and `{ip}` replaced.
    pub fn fill(&self, s: &str) -> String {
        s.replace("{port}", &self.port.to_string())
            .replace("{base_url}", self.base_url)
            .replace("{ip}", self.ip)
    }
}

/// A server's command line: the program (with its own arguments) and what follows.
/// A pod takes them as `command` and `args`; a process as one argv.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommandLine {
    pub command: Vec<String>,
    pub args: Vec<String>,
}

impl CommandLine {
    /// What `launch` runs, bound by `b`. `jupyter` is how JupyterLab is started
    /// (`["jupyter", "lab"]`, or a resolved `jupyter-lab`): used when the launch has no
    /// command of its own, with kcloud's options after it so that it listens where the
    /// proxy reaches it, under its base URL.
    pub fn build(launch: &Launch, jupyter: &[String], b: &Binding) -> CommandLine {
        let user_args = launch.args.iter().map(|a| b.fill(a));
        match &launch.command {
            Some(command) => CommandLine {
                command: command.iter().map(|c| b.fill(c)).collect(),
                args: user_args.collect(),
            },
            None => {
                let (program, rest) = jupyter
                    .split_first()
                    .map_or((None, &[][..]), |(p, r)| (Some(p), r));
                let mut args: Vec<String> = rest.to_vec();
                args.extend([
                    "--no-browser".to_owned(),
                    format!("--ServerApp.ip={}", b.ip),
                    format!("--ServerApp.port={}", b.port),
                    "--ServerApp.port_retries=0".to_owned(),
                    format!("--ServerApp.base_url={}", b.base_url),
                    // The proxy keeps the browser's Host header (so that JupyterLab's own
                    // origin checks see the real origin); the token guards access.
                    "--ServerApp.allow_remote_access=True".to_owned(),
                ]);
                args.extend(user_args);
                CommandLine {
                    command: program.cloned().into_iter().collect(),
                    args,
                }
            }
        }
    }

    /// The whole argv.
    pub fn argv(&self) -> Vec<String> {
        self.command.iter().chain(&self.args).cloned().collect()
    }
}

/// Env names the platform sets itself: not the user's to change.
pub fn reserved_env(name: &str) -> bool {
    matches!(
        name,
        "CUDA_VISIBLE_DEVICES"
            | "NVIDIA_VISIBLE_DEVICES"
            | "JUPYTER_TOKEN"
            | "JUPYTER_TOKEN_FILE"
            | "JUPYTER_RUNTIME_DIR"
            | "JUPYTER_CONFIG_PATH"
    ) || name.starts_with("KCLOUD_")
}

/// JupyterLab options that would move it off its port, base URL or loopback address,
/// or weaken its authentication: kcloud sets these.
pub fn reserved_jupyter_arg(arg: &str) -> bool {
    let Some(option) = arg.strip_prefix("--") else {
        return false;
    };
    let key = option.split('=').next().unwrap_or("").to_ascii_lowercase();
    let last = key.rsplit('.').next().unwrap_or("");
    matches!(
        last,
        "ip" | "port"
            | "port_retries"
            | "base_url"
            | "token"
            | "password"
            | "hashed_password"
            | "password_required"
            | "allow_remote_access"
            | "allow_origin"
            | "allow_origin_pat"
            | "disable_check_xsrf"
            | "tornado_settings"
            | "identity_provider_class"
            | "authorizer_class"
            | "login_handler_class"
            | "allow_unauthenticated_access"
            | "config"
            | "sock"
    )
}

/// Checks what a request asks a server to run: sizes, NUL, env names, and nothing
/// that kcloud itself sets.
pub fn validate_launch(l: &Launch) -> Result<()> {
    let check_list = |what: &str, items: &[String]| -> Result<(), Error> {
        if items.len() > MAX_ENTRIES {
            return Err(Error::BadRequest(format!(
                "{what}: at most {MAX_ENTRIES} entries"
            )));
        }
        if items.iter().any(|a| a.len() > MAX_VALUE_BYTES) {
            return Err(Error::TooLarge(format!(
                "{what}: entries of at most {MAX_VALUE_BYTES} bytes"
            )));
        }
        if items.iter().any(|a| a.contains('\0')) {
            return Err(Error::BadRequest(format!(
                "{what}: NUL characters are not allowed"
            )));
        }
        Ok(())
    };
    if let Some(command) = &l.command {
        check_list("command", command)?;
        if command.first().is_none_or(|c| c.trim().is_empty()) {
            return Err(Error::BadRequest(
                "command: the first entry (the program) must not be empty".into(),
            ));
        }
    } else if let Some(a) = l
        .args
        .iter()
        .find(|a| l.run_profile().is_jupyter() && reserved_jupyter_arg(a))
    {
        return Err(Error::BadRequest(format!(
            "args: {:?} is set by kcloud (port, base URL, address and authentication)",
            a.split('=').next().unwrap_or(a)
        )));
    }
    check_list("args", &l.args)?;
    if l.env.len() > MAX_ENTRIES {
        return Err(Error::BadRequest(format!(
            "env: at most {MAX_ENTRIES} variables"
        )));
    }
    for (name, value) in &l.env {
        let b = name.as_bytes();
        let valid = !b.is_empty()
            && b.len() <= MAX_ENV_NAME
            && (b[0].is_ascii_alphabetic() || b[0] == b'_')
            && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'_');
        if !valid {
            return Err(Error::BadRequest(format!(
                "env: {:?} is not a valid variable name ([A-Za-z_][A-Za-z0-9_]*, at most {MAX_ENV_NAME})",
                name.chars().take(MAX_ENV_NAME).collect::<String>()
            )));
        }
        if reserved_env(name) {
            return Err(Error::BadRequest(format!("env: {name} is set by kcloud")));
        }
        if value.len() > MAX_VALUE_BYTES {
            return Err(Error::TooLarge(format!(
                "env: {name}: values of at most {MAX_VALUE_BYTES} bytes"
            )));
        }
        if value.contains('\0') {
            return Err(Error::BadRequest(format!(
                "env: {name}: NUL characters are not allowed"
            )));
        }
    }
    Ok(())
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

    #[test]
    fn command_lines_for_jupyterlab_and_custom_programs() {
        let b = Binding {
            ip: "127.0.0.1",
            port: 9000,
            base_url: "/user/a/s/",
        };
        let jl = Launch {
            args: vec!["--log-level={port}".into()],
            ..Launch::default()
        };
        let c = CommandLine::build(&jl, &["jupyter".into(), "lab".into()], &b);
        assert_eq!(c.command, ["jupyter"]);
        assert_eq!(c.args[0], "lab");
        assert!(c.args.contains(&"--ServerApp.ip=127.0.0.1".to_owned()));
        assert!(c.args.contains(&"--ServerApp.port=9000".to_owned()));
        assert!(
            c.args
                .contains(&"--ServerApp.base_url=/user/a/s/".to_owned())
        );
        assert_eq!(c.args.last().unwrap(), "--log-level=9000");
        let custom = Launch {
            command: Some(vec!["serve".into(), "--at={ip}:{port}{base_url}".into()]),
            args: vec!["x".into()],
            ..Launch::default()
        };
        let c = CommandLine::build(&custom, &["jupyter".into()], &b);
        assert_eq!(c.command, ["serve", "--at=127.0.0.1:9000/user/a/s/"]);
        assert_eq!(c.argv(), ["serve", "--at=127.0.0.1:9000/user/a/s/", "x"]);
    }

    #[test]
    fn reserved_jupyter_options() {
        for reserved in [
            "--ip=0.0.0.0",
            "--ServerApp.token=",
            "--IdentityProvider.token",
            "--ServerApp.disable_check_xsrf=True",
        ] {
            assert!(reserved_jupyter_arg(reserved), "{reserved}");
        }
        for fine in ["--log-level=DEBUG", "lab", "-ip"] {
            assert!(!reserved_jupyter_arg(fine), "{fine}");
        }
        assert!(reserved_env("KCLOUD_ANYTHING"));
        assert!(reserved_env("CUDA_VISIBLE_DEVICES"));
        assert!(!reserved_env("WANDB_MODE"));
    }
}
