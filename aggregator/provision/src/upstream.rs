//! The HTTP client to servers: the proxy's, the readiness probes', the culler's; and the
//! socket tuning every connection to a server gets (TCP_NODELAY, TCP_QUICKACK).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::http::Uri;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

/// The pooled HTTP/1.1 client to servers; bodies stream in both directions.
pub type HttpClient = Client<Connector, Body>;

/// A pooled client with TCP_NODELAY and TCP_QUICKACK: kernel messages are small and
/// latency-bound, and files must not wait on delayed ACKs either.
pub fn http_client() -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(Duration::from_secs(5)));
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(32)
        .build(Connector(connector))
}

/// A TCP stream to a server that acknowledges what it reads at once.
///
/// JupyterLab leaves Nagle's algorithm on: it holds back each small write (a websocket
/// message, the last piece of a file) until what it sent before is acknowledged, and a
/// receiver that delays its ACK (Linux: up to 40 ms) stalls the reply that long: every
/// kernel execution became a ~48 ms round trip, and one in ten 1 MiB downloads took
/// 40-100 ms instead of 3. Asking for an immediate ACK after each read (TCP_QUICKACK,
/// which Linux clears again by itself) removes that wait for every user, whatever
/// their own client does.
pub struct QuickAck(pub TcpStream);

impl QuickAck {
    pub fn ack_now(&self) {
        let _ = rustix::net::sockopt::set_tcp_quickack(&self.0, true);
    }
}

impl tokio::io::AsyncRead for QuickAck {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.0).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.ack_now();
        }
        polled
    }
}

impl tokio::io::AsyncWrite for QuickAck {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// hyper's connector to servers: its HTTP connector, the stream wrapped in [`QuickAck`]
/// (hyper-util's `TokioIo` adapts any tokio stream that is a [`Connection`]).
#[derive(Clone)]
pub struct Connector(HttpConnector);

impl tower_service::Service<Uri> for Connector {
    type Response = TokioIo<QuickAck>;
    type Error = <HttpConnector as tower_service::Service<Uri>>::Error;
    type Future =
        Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send + 'static>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        let connecting = self.0.call(dst);
        Box::pin(async move {
            let tcp = connecting.await?.into_inner();
            Ok(TokioIo::new(QuickAck(tcp)))
        })
    }
}

impl Connection for QuickAck {
    fn connected(&self) -> Connected {
        self.0.connected()
    }
}
