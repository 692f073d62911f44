//! kcloud-aggregator: the binary that wires the shape together — the local shape
//! (sandboxed processes on this host, directory volumes, an in-process agent) or the
//! cluster shape (pods and PVCs through the Kubernetes API) — and runs its tasks.
//!
//! Everything it wires lives in the crates below (see `docs/ARCHITECTURE.md`):
//! `kcloud-core` (domain), `kcloud-cluster` (inventory and ledger), `kcloud-store`
//! (SQLite), `kcloud-provision` (provisioners, volume backends), `kcloud-service` (use
//! cases) and `kcloud-http` (API, proxy, portal).

/// The command line.
pub mod config;
/// The local shape's in-process agent.
pub mod embedded_agent;
/// Logs, and traces to an OpenTelemetry collector (`otel` feature).
pub mod telemetry;

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use kcloud_cluster::Cluster;
use kcloud_core::private::{create_private_dir, load_or_create_secret};
use kcloud_core::repo::Repository;
use kcloud_core::settings::Settings;
use kcloud_core::{Error, Result, now_ms};
use kcloud_http::AppState;
use kcloud_http::metrics::Metrics;
use kcloud_provision::Provisioner;
use kcloud_provision::kube::{KubeOptions, KubeProvisioner};
use kcloud_provision::local::isolation::IsolationLevel;
use kcloud_provision::local::{LocalOptions, LocalProvisioner};
use kcloud_provision::upstream::http_client;
use kcloud_provision::volumes::VolumeBackend;
use kcloud_provision::volumes::local::DirVolumes;
use kcloud_provision::volumes::pvc::{PvcClient, PvcVolumes};
use kcloud_service::auth::{Auth, AuthConfig, SigningKey};
use kcloud_service::culler::{self, Culler};
use kcloud_service::locks::OwnerLocks;
use kcloud_service::prometheus::Prometheus;
use kcloud_service::reservations::Reservations;
use kcloud_service::servers::{ReleaseOnExit, Servers};
use kcloud_service::users::Users;
use kcloud_service::volumes::Volumes;
use kcloud_store::Store;

use crate::config::{Config, Isolation, LocalAgent, ProvisionerKind};

/// The assembled aggregator: shared state, the HTTP router, and what `serve` needs.
pub struct App {
    pub state: AppState,
    pub router: axum::Router,
    store: Store,
    embedded_agent: Option<embedded_agent::EmbeddedAgent>,
}

/// Opens the data dir and database, bootstraps the first admin, recovers the servers
/// that exist, and builds the state and router. Separate from `serve` so tests can
/// hold the state.
pub async fn build(config: &Config) -> Result<App> {
    build_with(config, None).await
}

/// [`build`] with this Kubernetes client for the cluster shape (tests give a fake API
/// server); `None`: the pod's service account, else the kubeconfig's context.
pub async fn build_with(config: &Config, kube_client: Option<kube::Client>) -> Result<App> {
    // First, so that a missing cluster stops the start before anything is written.
    let kube_client = match (config.provisioner, kube_client) {
        (ProvisionerKind::Local, _) => None,
        (ProvisionerKind::Kubernetes, Some(c)) => Some(c),
        (ProvisionerKind::Kubernetes, None) => {
            Some(kube::Client::try_default().await.map_err(|e| {
                Error::Config(format!(
                    "--provisioner kubernetes: no Kubernetes client configuration \
                     (neither in-cluster nor a kubeconfig): {e}"
                ))
            })?)
        }
    };
    let data_dir = &config.data_dir;
    create_private_dir(data_dir)?;
    let settings = Arc::new(Settings::load(config.config.as_deref())?);
    let store = Store::open(&data_dir.join("kcloud.db"))?;
    let repo: Arc<dyn Repository> = Arc::new(store.clone());
    let key = SigningKey::load_or_create(config.signing_key_file.as_deref(), data_dir)?;
    let auth = Arc::new(Auth::new(
        repo.clone(),
        key,
        AuthConfig {
            access_ttl: config.access_ttl,
            refresh_ttl: config.refresh_ttl,
            local_accounts: settings
                .oidc
                .as_ref()
                .map(|o| o.local_accounts)
                .unwrap_or_default(),
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
    let agent_token = load_or_create_secret(
        config.agent_token_file.as_deref(),
        &data_dir.join("agent.token"),
    )?;

    let cluster = Arc::new(Cluster::new(config.agent_heartbeat * 3));
    let exits = ReleaseOnExit::with_usage(cluster.clone(), repo.clone(), settings.clone());
    let (backend, provisioner): (Box<dyn VolumeBackend>, Arc<dyn Provisioner>) =
        match config.provisioner {
            ProvisionerKind::Local => {
                let isolation = match config.isolation {
                    Isolation::Sandbox => IsolationLevel::Sandbox,
                    Isolation::None => {
                        // The console, not only the log: whoever started it must see it.
                        println!(
                            "\n  kcloud: --isolation none: servers run as this process's user, \
                             unconfined.\n  Any user's server can read the platform's secrets \
                             and other users' files.\n  Use it only where the machine's users \
                             trust each other.\n"
                        );
                        tracing::warn!("--isolation none: local servers are not isolated");
                        IsolationLevel::None
                    }
                };
                let provisioner = LocalProvisioner::new(
                    Arc::new(store.clone()),
                    exits,
                    LocalOptions {
                        jupyter: config.jupyter_command.clone(),
                        stop_grace: config.stop_grace,
                        isolation,
                        settings: settings.local.clone(),
                        ..LocalOptions::new(data_dir)
                    },
                )?;
                (Box::new(DirVolumes::new(data_dir)?), Arc::new(provisioner))
            }
            ProvisionerKind::Kubernetes => {
                let Some(client) = kube_client else {
                    return Err(Error::Internal("no Kubernetes client".into()));
                };
                let namespace = config
                    .namespace
                    .clone()
                    .unwrap_or_else(|| client.default_namespace().to_owned());
                // Volumes are PVCs in the servers' namespace.
                let backend = PvcVolumes::new(
                    PvcClient::new(client.clone(), &namespace),
                    &namespace,
                    &settings.storage,
                );
                let provisioner = KubeProvisioner::new(
                    client,
                    exits,
                    KubeOptions {
                        namespace,
                        settings: settings.kubernetes.clone(),
                        timeout: config.kube_timeout,
                        stop_grace: config.stop_grace,
                    },
                );
                (Box::new(backend), Arc::new(provisioner))
            }
        };
    let locks = Arc::new(OwnerLocks::default());
    let groups = kcloud_service::groups::Groups::new(repo.clone(), settings.clone());
    let volumes = Arc::new(Volumes::new(
        repo.clone(),
        backend,
        provisioner.clone(),
        &settings,
        locks.clone(),
        groups.clone(),
    ));
    let servers = Arc::new(Servers::new(
        repo.clone(),
        cluster.clone(),
        provisioner.clone(),
        volumes.clone(),
        settings.clone(),
        locks,
        groups,
    ));
    let reservations = Arc::new(Reservations::new(
        repo.clone(),
        cluster.clone(),
        settings.clone(),
        servers.groups().clone(),
    ));
    let users = Arc::new(Users::new(
        repo,
        auth.clone(),
        cluster.clone(),
        provisioner,
        settings.default_quota.clone(),
        servers.groups().clone(),
    ));
    // The ledger is rebuilt from the servers that exist (adopted or not) before the
    // API serves: until then /readyz is 503 and allocations wait.
    servers.recover().await?;
    reservations.recover().await?;
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
        Some(url) => Some(Arc::new(Prometheus::new(
            url.clone(),
            settings.prometheus.clone(),
            config.prometheus_timeout,
            config.prometheus_refresh,
        )?)),
        None => None,
    };
    let oidc = match &settings.oidc {
        Some(o) => Some(Arc::new(kcloud_service::auth::Oidc::new(o.clone())?)),
        None => None,
    };
    let state = AppState {
        auth,
        users,
        servers,
        reservations,
        volumes,
        cluster,
        settings,
        metrics: Arc::new(Metrics::new()),
        agent_token: agent_token.into(),
        secure_cookies: !config.insecure_cookies,
        user_origins: Arc::new(config.user_origin.clone()),
        trusted_proxies: config.trusted_proxies.clone().into(),
        prometheus,
        upstream: http_client(),
        feed: Default::default(),
        oidc,
    };
    let router = kcloud_http::router(state.clone());
    Ok(App {
        state,
        router,
        store,
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
            store,
            embedded_agent,
        } = self;
        if let Some(agent) = embedded_agent {
            tokio::spawn(agent.run(state.cluster.clone(), shutdown.clone()));
        }
        tokio::spawn(sweep_claims(state.servers.clone(), shutdown.clone()));
        tokio::spawn(
            state
                .servers
                .clone()
                .run_scheduler(state.reservations.clone(), shutdown.clone()),
        );
        if let Some(p) = &state.prometheus {
            tokio::spawn(p.clone().run(shutdown.clone()));
        }
        if let Some((idle, every)) = state.settings.culling.schedule()? {
            tracing::info!(idle = ?idle, every = ?every, "idle culling on");
            let culler = Culler {
                servers: state.servers.clone(),
                http: state.upstream.clone(),
            };
            tokio::spawn(culler::run(culler, idle, every, shutdown.clone()));
        }
        // No TCP_NODELAY on every accepted connection: measured, it cost a third of the
        // inventory ingest rate (55 -> 80 µs of CPU per push). The proxy's listener sets
        // it only on connections that carry proxied requests.
        let served = axum::serve(
            kcloud_http::listener::Listener(listener),
            router.into_make_service_with_connect_info::<kcloud_http::listener::Connection>(),
        )
        .with_graceful_shutdown(shutdown.clone().cancelled_owned())
        .await
        .map_err(|source| Error::Io {
            context: "serving HTTP".into(),
            source,
        });
        shutdown.cancel();
        // Servers keep running; the next start adopts them.
        state.servers.shutdown().await;
        store.close().await?;
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

/// Releases claims whose create never finished, so no device leaks.
async fn sweep_claims(servers: Arc<Servers>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(30));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {
                let aborted = servers.sweep_claims(now_ms());
                if aborted > 0 {
                    tracing::warn!(count = aborted, "released stale claims");
                }
            }
        }
    }
}
