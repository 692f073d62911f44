//! The command line and its environment variables (the settings file is
//! `kcloud_core::settings`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use ipnet::IpNet;

use kcloud_http::origin::UserOrigins;

use kcloud_core::time::parse_duration;

/// kcloud aggregator: cluster GPU inventory, allocation ledger, users, REST API.
#[derive(Debug, Clone, Parser)]
#[command(name = "kcloud-aggregator", version)]
pub struct Config {
    /// Address for the API, the portal and /metrics.
    #[arg(long, env = "KCLOUD_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,

    /// Directory for the database, the signing key and the generated agent token.
    #[arg(long, env = "KCLOUD_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,

    /// Settings file (TOML): presets, default quotas.
    #[arg(long, env = "KCLOUD_CONFIG")]
    pub config: Option<PathBuf>,

    /// Where servers run.
    #[arg(long, env = "KCLOUD_PROVISIONER", value_enum, default_value = "local")]
    pub provisioner: ProvisionerKind,

    /// Run an agent in-process with this simulated GPU set (local shape, no GPUs):
    /// `dgx-a100-mig` or `dgx-h100`.
    #[arg(long, env = "KCLOUD_SIMULATE")]
    pub simulate: Option<String>,

    /// Local shape without `--simulate`: `auto` reads this host's GPUs through NVML and
    /// falls back to a simulated set (marked so) where no driver answers; `nvml` never
    /// simulates; `off` runs no local agent (agents push instead).
    #[arg(long, env = "KCLOUD_LOCAL_AGENT", value_enum, default_value = "auto")]
    pub local_agent: LocalAgent,

    /// The NVML library the local agent loads (default: the driver's `libnvidia-ml.so.1`).
    #[arg(long, env = "KCLOUD_NVML_LIB")]
    pub nvml_lib: Option<PathBuf>,

    /// File with the token agents present on `PUT /api/v1/nodes/{node}/inventory`
    /// (default: `<data-dir>/agent.token`, generated when absent).
    #[arg(long, env = "KCLOUD_AGENT_TOKEN_FILE")]
    pub agent_token_file: Option<PathBuf>,

    /// File with the JWT signing key, at least 32 bytes (default:
    /// `<data-dir>/signing.key`, generated when absent).
    #[arg(long, env = "KCLOUD_SIGNING_KEY_FILE")]
    pub signing_key_file: Option<PathBuf>,

    /// Lifetime of access tokens.
    #[arg(long, env = "KCLOUD_ACCESS_TTL", default_value = "15m", value_parser = parse_duration)]
    pub access_ttl: Duration,

    /// Lifetime of refresh tokens.
    #[arg(long, env = "KCLOUD_REFRESH_TTL", default_value = "7d", value_parser = parse_duration)]
    pub refresh_ttl: Duration,

    /// The agents' heartbeat; a node is stale after three missed ones.
    #[arg(long, env = "KCLOUD_AGENT_HEARTBEAT", default_value = "10s", value_parser = parse_duration)]
    pub agent_heartbeat: Duration,

    /// Send cookies without the `Secure` attribute (plain-HTTP set-ups other than
    /// localhost). Browsers already accept Secure cookies on http://localhost.
    #[arg(long, env = "KCLOUD_INSECURE_COOKIES")]
    pub insecure_cookies: bool,

    /// Where users' servers are served: an origin per user, never the portal's, so a
    /// page a server serves cannot act with the API as whoever opens it. `{user}` is
    /// the owner; `{port}` the port the request came in on. The cluster shape uses a
    /// wildcard DNS name and certificate, e.g. `https://{user}.users.kcloud.example.org`.
    #[arg(
        long,
        env = "KCLOUD_USER_ORIGIN",
        default_value = "http://{user}.localhost:{port}",
        value_parser = UserOrigins::parse
    )]
    pub user_origin: UserOrigins,

    /// Reverse proxies (comma-separated addresses or CIDRs) whose `X-Forwarded-For`
    /// and `X-Forwarded-Host` are believed; from anyone else those headers are ignored.
    #[arg(long, env = "KCLOUD_TRUSTED_PROXIES", value_delimiter = ',', value_parser = parse_net)]
    pub trusted_proxies: Vec<IpNet>,

    /// Prometheus to read node CPU/memory and GPU history from (PromQL over its HTTP
    /// API); without it, node figures come from the agents' pushes.
    #[arg(long, env = "KCLOUD_PROMETHEUS_URL")]
    pub prometheus_url: Option<reqwest::Url>,

    /// Timeout of each Prometheus query.
    #[arg(long, env = "KCLOUD_PROMETHEUS_TIMEOUT", default_value = "2s", value_parser = parse_duration)]
    pub prometheus_timeout: Duration,

    /// How often node figures are read from Prometheus.
    #[arg(long, env = "KCLOUD_PROMETHEUS_REFRESH", default_value = "15s", value_parser = parse_duration)]
    pub prometheus_refresh: Duration,

    /// Local provisioner: the program that starts JupyterLab (default: `jupyter-lab`,
    /// else `jupyter lab`, found on PATH).
    #[arg(long, env = "KCLOUD_JUPYTER_COMMAND")]
    pub jupyter_command: Option<PathBuf>,

    /// Local provisioner: how servers are confined. `sandbox`: each as an unprivileged
    /// uid of its owner, in a bubblewrap sandbox and a cgroup of its own (needs root,
    /// `bwrap`, `setpriv` and a writable cgroup v2 subtree; refused at start without
    /// them). `none`: as this process's user, unconfined, for machines whose users
    /// trust each other.
    #[arg(long, env = "KCLOUD_ISOLATION", value_enum, default_value = "sandbox")]
    pub isolation: Isolation,

    /// Log lines as `text` or `json` (one object per line, for log collectors).
    #[arg(long, env = "KCLOUD_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// Send traces (a span per request, with what it called inside) to this
    /// OpenTelemetry collector over OTLP/HTTP, e.g. `http://otel-collector:4318`.
    /// Needs a build with the `otel` cargo feature; refused at start without it.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,

    /// Local provisioner: how long a deleted server gets between SIGTERM and SIGKILL.
    #[arg(long, env = "KCLOUD_STOP_GRACE", default_value = "10s", value_parser = parse_duration)]
    pub stop_grace: Duration,

    /// Kubernetes provisioner: the namespace of server pods and their Secrets (and
    /// ResourceClaims). Default: the client's (in a pod, the aggregator's own).
    #[arg(long, env = "KCLOUD_NAMESPACE")]
    pub namespace: Option<String>,

    /// Kubernetes provisioner: how long one call to the API server may take.
    #[arg(long, env = "KCLOUD_KUBE_TIMEOUT", default_value = "15s", value_parser = parse_duration)]
    pub kube_timeout: Duration,

    /// First admin's user name, created at start when it does not exist.
    #[arg(long, env = "KCLOUD_BOOTSTRAP_ADMIN_USER")]
    pub bootstrap_admin_user: Option<String>,

    /// First admin's password (prefer the file variant).
    #[arg(long, env = "KCLOUD_BOOTSTRAP_ADMIN_PASSWORD", hide_env_values = true)]
    pub bootstrap_admin_password: Option<String>,

    /// File holding the first admin's password.
    #[arg(long, env = "KCLOUD_BOOTSTRAP_ADMIN_PASSWORD_FILE")]
    pub bootstrap_admin_password_file: Option<PathBuf>,
}

/// A CIDR, or one address (a /32 or /128).
fn parse_net(s: &str) -> Result<IpNet, String> {
    let s = s.trim();
    s.parse::<IpNet>()
        .or_else(|_| s.parse::<std::net::IpAddr>().map(IpNet::from))
        .map_err(|_| format!("{s:?} is neither an IP address nor a CIDR"))
}

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// `--isolation`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Isolation {
    Sandbox,
    None,
}

/// The local shape's in-process agent (`--local-agent`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LocalAgent {
    Auto,
    Nvml,
    Off,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ProvisionerKind {
    /// JupyterLab processes on this host.
    Local,
    /// Pods in a Kubernetes cluster.
    Kubernetes,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_have_the_documented_defaults() {
        let c = Config::try_parse_from(["kcloud-aggregator"]).unwrap();
        assert_eq!(c.listen.to_string(), "0.0.0.0:8080");
        assert_eq!(c.data_dir, PathBuf::from("./data"));
        assert_eq!(c.provisioner, ProvisionerKind::Local);
        assert_eq!(c.access_ttl, Duration::from_secs(900));
        assert_eq!(c.namespace, None);
        assert_eq!(c.kube_timeout, Duration::from_secs(15));
        assert_eq!(c.isolation, Isolation::Sandbox);
        assert_eq!(
            c.user_origin,
            UserOrigins::parse("http://{user}.localhost:{port}").unwrap()
        );
        assert!(c.trusted_proxies.is_empty());
    }

    #[test]
    fn trusted_proxies_take_addresses_and_cidrs() {
        let c = Config::try_parse_from([
            "kcloud-aggregator",
            "--trusted-proxies",
            "10.0.0.0/8, 192.0.2.7,::1",
        ])
        .unwrap();
        let nets: Vec<String> = c.trusted_proxies.iter().map(|n| n.to_string()).collect();
        assert_eq!(nets, ["10.0.0.0/8", "192.0.2.7/32", "::1/128"]);
        assert!(
            Config::try_parse_from(["kcloud-aggregator", "--trusted-proxies", "proxy.lan"])
                .is_err()
        );
        assert!(
            Config::try_parse_from(["kcloud-aggregator", "--user-origin", "http://localhost"])
                .is_err()
        );
    }
}
