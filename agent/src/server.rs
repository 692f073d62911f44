//! HTTP endpoints: `/metrics`, `/healthz`, `/readyz`, `/inventory`.
//!
//! Every handler reads the last snapshot or the registry; none touches NVML.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::metrics::{CONTENT_TYPE, Metrics};
use crate::{Error, Result, Snapshot};

#[derive(Clone)]
pub struct AppState {
    pub metrics: Arc<Metrics>,
    pub snapshot: watch::Receiver<Snapshot>,
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/inventory", get(inventory))
        .with_state(state)
}

/// Serves until `shutdown` is cancelled, letting in-flight requests finish.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: CancellationToken,
) -> Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
        .map_err(Error::Serve)
}

/// Size of the last rendering, so the next one allocates once.
static LAST_SIZE: AtomicUsize = AtomicUsize::new(8 * 1024);

async fn metrics(State(s): State<AppState>) -> Response {
    let mut body = String::with_capacity(LAST_SIZE.load(Ordering::Relaxed) + 512);
    s.metrics.render(&mut body);
    LAST_SIZE.store(body.len(), Ordering::Relaxed);
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], body).into_response()
}

async fn readyz(State(s): State<AppState>) -> Response {
    if s.snapshot.borrow().is_some() {
        "ok".into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "no collection yet").into_response()
    }
}

async fn inventory(State(s): State<AppState>) -> Response {
    let snap = s.snapshot.borrow().clone();
    match snap {
        Some(inv) => Json(&*inv).into_response(),
        None => (StatusCode::SERVICE_UNAVAILABLE, "no collection yet").into_response(),
    }
}
