//! The listener the aggregator serves on, and what a request knows of its connection:
//! the peer address, and TCP_NODELAY switched on only for connections that carry
//! proxied requests.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::extract::connect_info::Connected;
use tokio::net::TcpStream;

/// The listener the aggregator serves on. Accepted connections keep Nagle's
/// algorithm (TCP_NODELAY on every connection cost a third of the inventory ingest
/// rate), but one that carries a proxied request turns it off ([`Connection::nodelay`]):
/// a kernel execution's replies are a burst of small websocket messages, and with
/// Nagle on, all but the first wait for the browser's delayed ACK (~40 ms).
pub struct Listener(pub tokio::net::TcpListener);

impl axum::serve::Listener for Listener {
    type Io = ClientStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (ClientStream, SocketAddr) {
        // axum's own accept, which logs and retries accept errors.
        let (tcp, addr) = axum::serve::Listener::accept(&mut self.0).await;
        let stream = ClientStream {
            tcp,
            nodelay: Arc::default(),
            applied: false,
        };
        (stream, addr)
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.0.local_addr()
    }
}

/// What a request knows of its connection (`ConnectInfo<Connection>`).
#[derive(Clone, Debug)]
pub struct Connection {
    pub addr: SocketAddr,
    pub(crate) nodelay: Arc<AtomicBool>,
}

impl Connection {
    /// TCP_NODELAY on this connection from its next write on (the response's head).
    pub fn nodelay(&self) {
        self.nodelay.store(true, Ordering::Relaxed);
    }
}

impl Connected<axum::serve::IncomingStream<'_, Listener>> for Connection {
    fn connect_info(stream: axum::serve::IncomingStream<'_, Listener>) -> Self {
        Connection {
            addr: *stream.remote_addr(),
            nodelay: stream.io().nodelay.clone(),
        }
    }
}

/// An accepted connection that sets TCP_NODELAY on its socket once asked to.
pub struct ClientStream {
    pub(crate) tcp: TcpStream,
    pub(crate) nodelay: Arc<AtomicBool>,
    applied: bool,
}

impl ClientStream {
    fn apply_nodelay(&mut self) {
        if !self.applied && self.nodelay.load(Ordering::Relaxed) {
            self.applied = true;
            let _ = self.tcp.set_nodelay(true);
        }
    }
}

impl tokio::io::AsyncRead for ClientStream {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for ClientStream {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.apply_nodelay();
        std::pin::Pin::new(&mut self.tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.apply_nodelay();
        std::pin::Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}
