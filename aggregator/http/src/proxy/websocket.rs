//! Proxied websockets (JupyterLab's kernels and terminals): the upstream handshake
//! first, then frames pumped both ways.

use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::FromRequestParts;
use axum::extract::ws::{self, WebSocket, WebSocketUpgrade};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use kcloud_core::server::Upstream;
use kcloud_core::{Error, now_ms};

use super::{forwarded_cookies, upstream_path};
use crate::AppState;
use kcloud_provision::upstream::QuickAck;

/// How long one side of a websocket may take to finish closing after the other did.
const CLOSE_GRACE: Duration = Duration::from_secs(5);
/// Websocket traffic refreshes a server's last activity at most this often.
const WS_ACTIVITY_EVERY: Duration = Duration::from_secs(1);

/// Connects to the server's websocket first (so its answer, and the subprotocol it
/// picks, decide the client's), then upgrades the client and pumps both ways.
pub(super) async fn websocket_proxy(
    s: &AppState,
    parts: &mut Parts,
    upstream: Upstream,
    owner: String,
    name: String,
) -> Result<Response, Error> {
    let mut upgrade = match WebSocketUpgrade::from_request_parts(parts, s).await {
        Ok(u) => u,
        Err(rejection) => return Ok(rejection.into_response()),
    };
    let path = upstream_path(&parts.uri, &upstream);
    let (server_ws, protocol) = match connect_upstream(&upstream, &path, &parts.headers).await {
        Ok(c) => c,
        Err(Refused::Status(resp)) => return Ok(resp),
        Err(Refused::Error(e)) => return Err(e),
    };
    if let Some(p) = protocol {
        upgrade.set_selected_protocol(p);
    }
    let servers = s.servers.clone();
    Ok(upgrade.on_upgrade(move |client_ws| async move {
        let mut last = Instant::now();
        let activity = move || {
            if last.elapsed() >= WS_ACTIVITY_EVERY {
                last = Instant::now();
                servers.touch(&owner, &name, now_ms());
            }
        };
        pump(client_ws, server_ws, activity).await;
    }))
}

pub(crate) enum Refused {
    /// The server answered the handshake with this (e.g. 404 for an unknown kernel).
    Status(Response),
    Error(Error),
}

pub(crate) async fn connect_upstream(
    upstream: &Upstream,
    path: &str,
    client_headers: &HeaderMap,
) -> Result<(WebSocketStream<QuickAck>, Option<HeaderValue>), Refused> {
    let unavailable = |what: &str| Refused::Error(Error::Unavailable(what.into()));
    let stream = TcpStream::connect(upstream.addr)
        .await
        .map_err(|_| unavailable("the server is not answering"))?;
    // Kernel messages are small: no Nagle delay on our side of the hop, and no
    // delayed ACK holding back JupyterLab's side.
    let _ = stream.set_nodelay(true);
    let stream = QuickAck(stream);
    stream.ack_now();
    let mut req = format!("ws://{}{path}", upstream.addr)
        .into_client_request()
        .map_err(|e| Refused::Error(Error::BadRequest(format!("bad websocket path: {e}"))))?;
    let h = req.headers_mut();
    if let Some(token) = &upstream.token {
        let token = HeaderValue::from_str(&format!("token {token}"))
            .map_err(|_| Refused::Error(Error::Internal("bad server token".into())))?;
        h.insert(header::AUTHORIZATION, token);
    }
    if let Some(c) = forwarded_cookies(client_headers) {
        h.insert(header::COOKIE, c);
    }
    for name in [header::SEC_WEBSOCKET_PROTOCOL, header::USER_AGENT] {
        if let Some(v) = client_headers.get(&name) {
            h.insert(name, v.clone());
        }
    }
    let handshake = tokio_tungstenite::client_async(req, stream);
    match tokio::time::timeout(Duration::from_secs(10), handshake).await {
        Err(_) => Err(unavailable(
            "the server did not answer the websocket handshake",
        )),
        Ok(Err(tungstenite::Error::Http(resp))) => {
            let (parts, body) = resp.into_parts();
            let mut out = Response::new(Body::from(body.unwrap_or_default()));
            *out.status_mut() = parts.status;
            if let Some(ct) = parts.headers.get(header::CONTENT_TYPE) {
                out.headers_mut().insert(header::CONTENT_TYPE, ct.clone());
            }
            Err(Refused::Status(out))
        }
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "proxy: websocket handshake with the server failed");
            Err(unavailable("the server's websocket handshake failed"))
        }
        Ok(Ok((ws, resp))) => {
            let protocol = resp.headers().get(header::SEC_WEBSOCKET_PROTOCOL).cloned();
            Ok((ws, protocol))
        }
    }
}

/// Pumps messages both ways until one side closes (its close is passed on), then gives
/// the other side [`CLOSE_GRACE`] to finish. Pings stay per hop (each side answers its
/// own).
pub(crate) async fn pump(
    client: WebSocket,
    server: WebSocketStream<QuickAck>,
    mut activity: impl FnMut() + Send,
) {
    let (mut client_tx, mut client_rx) = client.split();
    let (mut server_tx, mut server_rx) = server.split();
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::channel::<()>(1);
    let seen_up = seen_tx.clone();
    let up = async move {
        while let Some(Ok(msg)) = client_rx.next().await {
            let close = matches!(msg, ws::Message::Close(_));
            let _ = seen_up.try_send(());
            if let Some(m) = to_server(msg)
                && server_tx.send(m).await.is_err()
            {
                break;
            }
            if close {
                break;
            }
        }
        let _ = server_tx.close().await;
    };
    let down = async move {
        while let Some(Ok(msg)) = server_rx.next().await {
            let close = matches!(msg, tungstenite::Message::Close(_));
            let _ = seen_tx.try_send(());
            if let Some(m) = to_client(msg)
                && client_tx.send(m).await.is_err()
            {
                break;
            }
            if close {
                break;
            }
        }
        let _ = client_tx.close().await;
    };
    let watch_activity = async move {
        while seen_rx.recv().await.is_some() {
            activity();
        }
    };
    let pumps = async move {
        tokio::pin!(up, down);
        tokio::select! {
            _ = &mut up => { let _ = tokio::time::timeout(CLOSE_GRACE, down).await; }
            _ = &mut down => { let _ = tokio::time::timeout(CLOSE_GRACE, up).await; }
        }
    };
    tokio::join!(pumps, watch_activity);
}

/// Close codes that may be sent on the wire (RFC 6455 §7.4).
pub(crate) fn sendable_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

pub(crate) fn to_server(m: ws::Message) -> Option<tungstenite::Message> {
    Some(match m {
        ws::Message::Text(t) => {
            tungstenite::Message::Text(tungstenite::Utf8Bytes::try_from(Bytes::from(t)).ok()?)
        }
        ws::Message::Binary(b) => tungstenite::Message::Binary(b),
        ws::Message::Close(frame) => {
            tungstenite::Message::Close(frame.filter(|f| sendable_close_code(f.code)).map(|f| {
                tungstenite::protocol::CloseFrame {
                    code: f.code.into(),
                    reason: f.reason.as_str().into(),
                }
            }))
        }
        ws::Message::Ping(_) | ws::Message::Pong(_) => return None,
    })
}

pub(crate) fn to_client(m: tungstenite::Message) -> Option<ws::Message> {
    Some(match m {
        tungstenite::Message::Text(t) => {
            ws::Message::Text(ws::Utf8Bytes::try_from(Bytes::from(t)).ok()?)
        }
        tungstenite::Message::Binary(b) => ws::Message::Binary(b),
        tungstenite::Message::Close(frame) => ws::Message::Close(
            frame
                .filter(|f| sendable_close_code(f.code.into()))
                .map(|f| ws::CloseFrame {
                    code: f.code.into(),
                    reason: f.reason.as_str().into(),
                }),
        ),
        tungstenite::Message::Ping(_)
        | tungstenite::Message::Pong(_)
        | tungstenite::Message::Frame(_) => return None,
    })
}
