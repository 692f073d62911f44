use clap::Parser;
use kcloud_aggregator::config::Config;
use kcloud_aggregator::telemetry::Telemetry;
use tokio_util::sync::CancellationToken;

fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    // Outside the runtime: the trace exporter's blocking HTTP client must be made and
    // dropped where blocking is allowed.
    let telemetry = Telemetry::init(&config)?;
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(async {
            let shutdown = CancellationToken::new();
            tokio::spawn(signals(shutdown.clone()));
            kcloud_aggregator::run(config, shutdown).await
        });
    telemetry.shutdown();
    Ok(result?)
}

/// SIGTERM (Kubernetes) or Ctrl-C: stop accepting, finish requests, close the database.
async fn signals(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
    tracing::info!("shutting down");
    shutdown.cancel();
}
