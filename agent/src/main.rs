use clap::Parser;
use kcloud_agent::{Config, LogFormat};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    let logs = tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()));
    match config.log_format {
        // One JSON object per line, for log collectors (Loki, Elasticsearch).
        LogFormat::Json => logs.json().init(),
        LogFormat::Text => logs.init(),
    }
    let shutdown = CancellationToken::new();
    tokio::spawn(signals(shutdown.clone()));
    kcloud_agent::run(config, shutdown).await?;
    Ok(())
}

/// SIGTERM (Kubernetes) or Ctrl-C: stop serving, let requests finish, shut NVML down.
async fn signals(shutdown: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutting down");
    shutdown.cancel();
}
