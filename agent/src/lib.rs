//! kcloud-agent: the privileged per-node agent.
//!
//! A background task collects GPU/MIG state (NVML, or a simulation) and host state
//! (sysinfo) on an interval and publishes one immutable snapshot. Everything else reads
//! that snapshot: `/metrics` renders it, the pusher sends it to the aggregator. Nothing
//! on a request path ever calls NVML (dcgm-exporter's scrape-time work hangs on MIG
//! nodes; we do not repeat that).

pub mod collector;
pub mod config;
pub mod metrics;
pub mod pusher;
pub mod server;

use std::sync::Arc;

use kcloud_common::NodeInventory;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use config::{Config, LogFormat};

/// The newest snapshot, `None` until the first collection finished.
pub type Snapshot = Option<Arc<NodeInventory>>;

/// Everything that can fail in the agent.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("simulation layout: {0}")]
    Simulation(String),
    #[error("reading {path}: {source}")]
    ReadFile {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("http server: {0}")]
    Serve(std::io::Error),
    #[error("reading host state: {0}")]
    Host(String),
    #[error("http client: {0}")]
    Http(#[from] reqwest::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Runs the agent until `shutdown` is cancelled: collector, HTTP server and (with an
/// aggregator URL) the pusher.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<()> {
    let settings = config.resolve()?;
    let metrics = Arc::new(metrics::Metrics::new());
    let source = collector::source_for(&settings)?;
    let (tx, rx) = watch::channel(None);

    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .map_err(|source| Error::Listen {
            addr: settings.listen,
            source,
        })?;
    tracing::info!(
        listen = %listener.local_addr().unwrap_or(settings.listen),
        node = %settings.node_name,
        simulated = source.simulated(),
        "kcloud-agent starting"
    );

    let collector = collector::Collector::new(
        source,
        settings.node_name.clone(),
        settings.interval,
        metrics.clone(),
    )?
    .with_group(settings.node_group.clone());
    let collecting = tokio::spawn(collector.run(tx, shutdown.clone()));

    let pushing = match &settings.aggregator_url {
        Some(url) => {
            let pusher = pusher::Pusher::new(
                url,
                &settings.node_name,
                settings.agent_token_file.clone(),
                settings.heartbeat,
                metrics.clone(),
            )?;
            Some(tokio::spawn(pusher.run(rx.clone(), shutdown.clone())))
        }
        None => None,
    };

    let state = server::AppState {
        metrics,
        snapshot: rx,
    };
    let served = server::serve(listener, state, shutdown.clone()).await;
    // Whatever ended the server ends the rest too.
    shutdown.cancel();
    let _ = collecting.await;
    if let Some(p) = pushing {
        let _ = p.await;
    }
    served
}
