//! Command line and environment configuration.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use reqwest::Url;

use crate::{Error, Result};

/// kcloud node agent: GPU and MIG state from NVML, host state, Prometheus metrics,
/// inventory pushed to the aggregator.
#[derive(Debug, Clone, Parser)]
#[command(name = "kcloud-agent", version)]
pub struct Config {
    /// Node name reported to the aggregator and as the `Hostname` label
    /// (also read from `NODE_NAME`, the Downward API; default: this host's name).
    #[arg(long, env = "KCLOUD_NODE_NAME")]
    pub node_name: Option<String>,

    /// The node group this node belongs to (a rack, a pool, a machine type), shown in
    /// the aggregator's fleet summary: letters, digits and '-', at most 63.
    #[arg(long, env = "KCLOUD_NODE_GROUP")]
    pub node_group: Option<String>,

    /// Address for /metrics, /healthz, /readyz and /inventory.
    #[arg(long, env = "KCLOUD_LISTEN", default_value = "0.0.0.0:9400")]
    pub listen: SocketAddr,

    /// Log lines as `text` or `json` (one object per line, for log collectors).
    #[arg(long, env = "KCLOUD_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// How often GPUs and the host are read (e.g. `5s`, `500ms`).
    #[arg(long, env = "KCLOUD_INTERVAL", default_value = "5s", value_parser = parse_duration)]
    pub interval: Duration,

    /// Path of the NVML library to load (default: `libnvidia-ml.so.1` from the loader path).
    #[arg(long, env = "KCLOUD_NVML_LIB")]
    pub nvml_lib: Option<PathBuf>,

    /// Simulate a GPU machine instead of reading NVML.
    #[arg(long, env = "KCLOUD_SIMULATE", conflicts_with = "simulate_file")]
    pub simulate: Option<Preset>,

    /// Simulate the GPU layout described in this JSON file.
    #[arg(long, env = "KCLOUD_SIMULATE_FILE")]
    pub simulate_file: Option<PathBuf>,

    /// Aggregator base URL; without it the agent only exports metrics.
    #[arg(long, env = "KCLOUD_AGGREGATOR_URL")]
    pub aggregator_url: Option<Url>,

    /// File holding the bearer token for pushes (re-read before each push, so a
    /// rotated Secret takes effect without a restart).
    #[arg(long, env = "KCLOUD_AGENT_TOKEN_FILE")]
    pub agent_token_file: Option<PathBuf>,

    /// Push at least this often even when the layout did not change.
    #[arg(long, env = "KCLOUD_HEARTBEAT", default_value = "10s", value_parser = parse_duration)]
    pub heartbeat: Duration,
}

/// Built-in simulated machines.
/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Preset {
    /// 8 × A100-SXM4-80GB: GPUs 0–3 whole, 4–7 in MIG mode with mixed layouts.
    DgxA100Mig,
    /// 8 × H100 80GB, all whole.
    DgxH100,
}

/// Where the GPU state comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum GpuMode {
    Nvml { lib: Option<PathBuf> },
    Preset(Preset),
    File(PathBuf),
}

/// Validated configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    pub node_name: String,
    pub node_group: Option<String>,
    pub listen: SocketAddr,
    pub interval: Duration,
    pub gpus: GpuMode,
    pub aggregator_url: Option<Url>,
    pub agent_token_file: Option<PathBuf>,
    pub heartbeat: Duration,
}

impl Config {
    /// Checks the configuration and fills in defaults that need the environment.
    pub fn resolve(&self) -> Result<Settings> {
        let node_name = match self
            .node_name
            .clone()
            .or_else(|| std::env::var("NODE_NAME").ok())
        {
            Some(n) => n,
            None => sysinfo::System::host_name()
                .map_err(|e| Error::Config(format!("no --node-name and no host name: {e}")))?
                .to_lowercase(),
        };
        validate_node_name(&node_name)?;
        if self.interval < Duration::from_millis(100) {
            return Err(Error::Config("--interval must be at least 100ms".into()));
        }
        if let Some(g) = &self.node_group
            && !valid_group(g)
        {
            return Err(Error::Config(format!(
                "--node-group {g:?}: letters, digits and '-', 1 to 63 characters"
            )));
        }
        if self.heartbeat < Duration::from_secs(1) {
            return Err(Error::Config("--heartbeat must be at least 1s".into()));
        }
        if let Some(url) = &self.aggregator_url
            && !matches!(url.scheme(), "http" | "https")
        {
            return Err(Error::Config(
                "--aggregator-url must be an http(s) URL".into(),
            ));
        }
        let gpus = match (&self.simulate, &self.simulate_file) {
            (Some(p), _) => GpuMode::Preset(*p),
            (None, Some(f)) => GpuMode::File(f.clone()),
            (None, None) => GpuMode::Nvml {
                lib: self.nvml_lib.clone(),
            },
        };
        Ok(Settings {
            node_name,
            node_group: self.node_group.clone(),
            listen: self.listen,
            interval: self.interval,
            gpus,
            aggregator_url: self.aggregator_url.clone(),
            agent_token_file: self.agent_token_file.clone(),
            heartbeat: self.heartbeat,
        })
    }
}

/// A node group name: what the aggregator accepts too.
fn valid_group(g: &str) -> bool {
    (1..=63).contains(&g.len()) && g.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// This host's name, lower-cased as Kubernetes node names are.
pub fn local_node_name() -> Result<String> {
    sysinfo::System::host_name()
        .map(|h| h.to_lowercase())
        .map_err(|e| Error::Config(format!("no --node-name and no host name: {e}")))
}

/// Node names end up in URLs and metric labels: keep them to the DNS subdomain
/// alphabet Kubernetes uses (upper case allowed for plain host names).
fn validate_node_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
        && !name.starts_with(['-', '.']);
    if ok {
        Ok(())
    } else {
        Err(Error::Config(format!(
            "node name {name:?} is not a valid node name (letters, digits, '-', '.', '_'; at most 253)"
        )))
    }
}

/// `5s`, `500ms`, `1h`, or a bare number of seconds.
pub use kcloud_common::duration::parse_duration;

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Config {
        Config::try_parse_from(std::iter::once("kcloud-agent").chain(args.iter().copied()))
            .expect("parses")
    }

    #[test]
    fn defaults_match_the_design() {
        let c = parse(&["--node-name", "gpu-1"]);
        let s = c.resolve().unwrap();
        assert_eq!(s.listen.to_string(), "0.0.0.0:9400");
        assert_eq!(s.interval, Duration::from_secs(5));
        assert_eq!(s.gpus, GpuMode::Nvml { lib: None });
        assert!(s.aggregator_url.is_none());
    }

    #[test]
    fn bad_values_are_refused() {
        assert!(parse(&["--node-name", "a/b"]).resolve().is_err());
        assert!(
            parse(&["--node-name", "ok", "--interval", "1ms"])
                .resolve()
                .is_err()
        );
        assert!(
            parse(&["--node-name", "ok", "--aggregator-url", "ftp://x"])
                .resolve()
                .is_err()
        );
        assert!(
            Config::try_parse_from(["kcloud-agent", "--simulate", "dgx-b300"]).is_err(),
            "unknown preset"
        );
    }

    #[test]
    fn simulation_wins_over_nvml() {
        let s = parse(&["--node-name", "n", "--simulate", "dgx-a100-mig"])
            .resolve()
            .unwrap();
        assert_eq!(s.gpus, GpuMode::Preset(Preset::DgxA100Mig));
    }
}
