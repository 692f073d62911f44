//! The HTTP client to servers: the proxy's, the readiness probes', the culler's.

use std::time::Duration;

use axum::body::Body;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// The pooled HTTP/1.1 client to servers; bodies stream in both directions.
pub type HttpClient = Client<HttpConnector, Body>;

/// A pooled client with TCP_NODELAY: kernel messages are small and latency-bound.
pub fn http_client() -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(Duration::from_secs(5)));
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(32)
        .build(connector)
}
