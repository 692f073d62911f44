//! kcloud-aggregator: the cluster-wide view and the only place that decides who holds
//! which GPU.
//!
//! Agents push node inventories; users authenticate with JWTs; the ledger allocates
//! whole GPUs and MIG instances exclusively; the REST API (axum) exposes all of it.

pub mod api;
pub mod auth;
pub mod config;
pub mod culler;
pub mod embedded_agent;
pub mod events;
pub mod inventory;
pub mod ledger;
pub mod metrics;
pub mod profile;
pub mod prometheus;
pub mod provisioner;
pub mod proxy;
pub mod storage;
pub mod store;
pub mod ui;

/// Everything that can fail in the aggregator. `api::ApiError` maps these to HTTP
/// status codes in one place; server-side variants are logged there and never shown to
/// clients.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Malformed or invalid input (400/422).
    #[error("{0}")]
    BadRequest(String),
    /// No or bad credentials (401).
    #[error("{0}")]
    Unauthorized(String),
    /// Authenticated but not allowed (403).
    #[error("{0}")]
    Forbidden(String),
    /// Absent, or another user's (404: existence does not leak).
    #[error("{0}")]
    NotFound(String),
    /// Device taken, name in use, stale write (409).
    #[error("{0}")]
    Conflict(String),
    /// Body or field over its limit (413).
    #[error("{0}")]
    TooLarge(String),
    /// Too many attempts; retry after this many seconds (429).
    #[error("too many requests; retry in {retry_after_secs}s")]
    RateLimited { retry_after_secs: u64 },
    /// A quota would be exceeded (429).
    #[error("{0}")]
    QuotaExceeded(String),
    /// A `Range` outside a file of `size` bytes (416).
    #[error("range not satisfiable: the file has {size} bytes")]
    RangeNotSatisfiable { size: u64 },
    /// Not ready yet or a backend is down (503).
    #[error("{0}")]
    Unavailable(String),
    /// Bad configuration at start.
    #[error("configuration: {0}")]
    Config(String),
    /// The database failed or is unusable.
    #[error("database: {0}")]
    Store(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    /// A bug or an unexpected state; logged, shown to clients as "internal error".
    #[error("internal: {0}")]
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::api::AppState;
use crate::auth::{Auth, AuthConfig, SigningKey};
use crate::config::{Config, LocalAgent, ProvisionerKind, Settings};
use crate::inventory::Inventory;
use crate::ledger::Ledger;
use crate::metrics::Metrics;
use crate::provisioner::Provisioner;
use crate::provisioner::kube::{KubeOptions, KubeProvisioner};
use crate::provisioner::local::{LocalOptions, LocalProvisioner};
use crate::store::Store;

/// How long a reservation may stay uncommitted before it is released.
const RESERVATION_TTL: Duration = Duration::from_secs(600);

/// The assembled aggregator: shared state, the HTTP router, and what `serve` needs.
pub struct App {
    pub state: AppState,
    pub router: axum::Router,
    embedded_agent: Option<embedded_agent::EmbeddedAgent>,
}

/// Opens the data dir and database, bootstraps the first admin, and builds the state
/// and router. Separate from `serve` so tests can hold the state.
pub async fn build(config: &Config) -> Result<App> {
    // First, so that a missing cluster stops the start before anything is written.
    let kube_client = match config.provisioner {
        ProvisionerKind::Local => None,
        // In a pod: its service account; elsewhere: the kubeconfig's context.
        ProvisionerKind::Kubernetes => Some(kube::Client::try_default().await.map_err(|e| {
            Error::Config(format!(
                "--provisioner kubernetes: no Kubernetes client configuration \
                 (neither in-cluster nor a kubeconfig): {e}"
            ))
        })?),
    };
    let data_dir = &config.data_dir;
    auth::create_private_dir(data_dir)?;
    let settings = Arc::new(Settings::load(config.config.as_deref())?);
    let store = Store::open(&data_dir.join("kcloud.db"))?;
    let key = SigningKey::load_or_create(config.signing_key_file.as_deref(), data_dir)?;
    let auth = Arc::new(Auth::new(
        store.clone(),
        key,
        AuthConfig {
            access_ttl: config.access_ttl,
            refresh_ttl: config.refresh_ttl,
        },
    ));
    if let Some(password) = auth
        .bootstrap_admin(
            config.bootstrap_admin_user.clone(),
            config.bootstrap_admin_password.clone(),
            config.bootstrap_admin_password_file.clone(),
        )
        .await?
    {
        // Straight to the console, once: log pipelines must never see it.
        println!(
            "\n  kcloud: created the first admin.\n  user:     admin\n  password: {password}\n  \
             (shown only now; set KCLOUD_BOOTSTRAP_ADMIN_PASSWORD to choose it yourself)\n"
        );
    }
    let agent_token = auth::load_or_create_secret(
        config.agent_token_file.as_deref(),
        &data_dir.join("agent.token"),
    )?;

    let inventory = Arc::new(Inventory::new(config.agent_heartbeat * 3));
    let ledger = Arc::new(Ledger::new());
    let (storage, provisioner): (_, Arc<dyn Provisioner>) = match config.provisioner {
        ProvisionerKind::Local => (
            storage::Storage::new(store.clone(), &settings, data_dir)?,
            Arc::new(LocalProvisioner::new(
                store,
                ledger.clone(),
                LocalOptions {
                    jupyter: config.jupyter_command.clone(),
                    stop_grace: config.stop_grace,
                    ..LocalOptions::new(data_dir)
                },
            )),
        ),
        ProvisionerKind::Kubernetes => {
            let Some(client) = kube_client else {
                return Err(Error::Internal("no Kubernetes client".into()));
            };
            let namespace = config
                .namespace
                .clone()
                .unwrap_or_else(|| client.default_namespace().to_owned());
            // Volumes are PVCs in the servers' namespace.
            let storage = storage::Storage::cluster(
                store.clone(),
                &settings,
                storage::pvc::PvcClient::new(client.clone(), &namespace),
                &namespace,
            );
            let provisioner = Arc::new(KubeProvisioner::new(
                client,
                ledger.clone(),
                KubeOptions {
                    namespace,
                    settings: settings.kubernetes.clone(),
                    timeout: config.kube_timeout,
                    stop_grace: config.stop_grace,
                },
            ));
            (storage, provisioner)
        }
    };
    let storage = Arc::new(storage);
    // The ledger is rebuilt from the servers that exist (adopted or not) before the
    // API serves: until then /readyz is 503 and allocations wait.
    let servers = provisioner.recover().await?;
    ledger.rebuild(
        servers
            .iter()
            .filter(|s| s.status.holds_devices())
            .flat_map(|s| s.devices.iter().map(|d| (d.clone(), s.holder()))),
    );
    let embedded_agent = match (&config.simulate, config.local_agent) {
        (Some(preset), _) => Some(embedded_agent::EmbeddedAgent::simulated(
            preset,
            config.agent_heartbeat,
        )?),
        // The cluster shape has a DaemonSet of agents; no host agent in the control plane.
        (None, _) if config.provisioner == ProvisionerKind::Kubernetes => None,
        (None, LocalAgent::Off) => None,
        (None, mode) => Some(embedded_agent::EmbeddedAgent::host(
            config.nvml_lib.clone(),
            mode == LocalAgent::Auto,
            config.agent_heartbeat,
        )?),
    };
    let prometheus = match &config.prometheus_url {
        Some(url) => Some(Arc::new(prometheus::Prometheus::new(
            url.clone(),
            settings.prometheus.clone(),
            config.prometheus_timeout,
            config.prometheus_refresh,
        )?)),
        None => None,
    };
    let state = AppState {
        auth,
        inventory,
        ledger,
        settings,
        metrics: Arc::new(Metrics::new()),
        agent_token: agent_token.into(),
        secure_cookies: !config.insecure_cookies,
        prometheus,
        provisioner,
        storage,
        server_locks: Default::default(),
        proxy_client: proxy::http_client(),
    };
    let (router, _) = api::router(state.clone());
    Ok(App {
        state,
        router,
        embedded_agent,
    })
}

impl App {
    /// Serves on `listener` until `shutdown`, then finishes in-flight requests and
    /// closes the database.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: CancellationToken,
    ) -> Result<()> {
        let App {
            state,
            router,
            embedded_agent,
        } = self;
        if let Some(agent) = embedded_agent {
            tokio::spawn(agent.run(state.inventory.clone(), shutdown.clone()));
        }
        tokio::spawn(sweep_reservations(state.ledger.clone(), shutdown.clone()));
        if let Some(p) = &state.prometheus {
            tokio::spawn(p.clone().run(shutdown.clone()));
        }
        if let Some((idle, every)) = state.settings.culling.schedule()? {
            tracing::info!(idle = ?idle, every = ?every, "idle culling on");
            tokio::spawn(culler::run(state.clone(), idle, every, shutdown.clone()));
        }
        // No TCP_NODELAY on every accepted connection: measured, it cost a third of the
        // inventory ingest rate (55 -> 80 µs of CPU per push). The proxy's listener sets
        // it only on connections that carry proxied requests.
        let served = axum::serve(
            proxy::Listener(listener),
            router.into_make_service_with_connect_info::<proxy::Connection>(),
        )
        .with_graceful_shutdown(shutdown.clone().cancelled_owned())
        .await
        .map_err(|source| Error::Io {
            context: "serving HTTP".into(),
            source,
        });
        shutdown.cancel();
        // Servers keep running; the next start adopts them.
        state.provisioner.shutdown().await;
        state.store().clone().close().await?;
        tracing::info!("kcloud-aggregator stopped");
        served
    }
}

/// Runs the aggregator until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<()> {
    let app = build(&config).await?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| Error::Io {
            context: format!("listening on {}", config.listen),
            source,
        })?;
    let addr = listener.local_addr().unwrap_or(config.listen);
    tracing::info!(listen = %addr, data_dir = %config.data_dir.display(), "kcloud-aggregator listening");
    // For the person who just started it: where to go, on the console.
    println!("kcloud-aggregator is up: http://{addr}/  (API /api/v1, spec /api/openapi.json)");
    app.serve(listener, shutdown).await
}

/// Releases reservations whose create never finished, so no device leaks.
async fn sweep_reservations(ledger: Arc<Ledger>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(30));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {
                let aborted = ledger.sweep(now_ms(), RESERVATION_TTL);
                if !aborted.is_empty() {
                    tracing::warn!(count = aborted.len(), "released stale reservations");
                }
            }
        }
    }
}

impl From<rusqlite::Error> for Error {
    fn from(e: rusqlite::Error) -> Self {
        Error::Store(e.to_string())
    }
}

/// Milliseconds since the Unix epoch: the one clock the aggregator reads. Logic takes
/// `now_ms` as an argument so that tests control time.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
