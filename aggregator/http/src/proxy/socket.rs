//! Socket tuning of the upstream side of proxied websockets: TCP_QUICKACK.

use tokio::net::TcpStream;

/// The upstream websocket's TCP stream, acknowledging what it reads at once.
///
/// JupyterLab leaves Nagle's algorithm on: it holds back each small write until the
/// previous one is acknowledged, and a receiver that delays its ACK (Linux: 40 ms)
/// turns every kernel execution into a ~48 ms round trip. Asking for an immediate ACK
/// after each read (TCP_QUICKACK, which Linux clears again by itself) removes that wait
/// for every user, whatever their own client does.
pub(crate) struct QuickAck(pub(crate) TcpStream);

impl QuickAck {
    pub(crate) fn ack_now(&self) {
        let _ = rustix::net::sockopt::set_tcp_quickack(&self.0, true);
    }
}

impl tokio::io::AsyncRead for QuickAck {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut self.0).poll_read(cx, buf);
        if matches!(polled, std::task::Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.ack_now();
        }
        polled
    }
}

impl tokio::io::AsyncWrite for QuickAck {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_shutdown(cx)
    }
}
