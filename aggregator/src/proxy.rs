//! `/user/{user}/{server}/...`: the authenticated reverse proxy to a server.
//!
//! The caller signs in as for the API (bearer token or session cookie); only the owner
//! and admins get through (others, and unknown servers, get 404). The proxy adds the
//! server's own token (`Authorization: token ...`), which users never see, and removes
//! kcloud's credentials (bearer header, `kcloud_*` cookies, CSRF header) from what it
//! forwards, so a server never learns a visitor's session. HTTP bodies stream both
//! ways; websockets are pumped frame by frame (text, binary, close), with TCP_NODELAY
//! on the upstream side.
//!
//! CSRF: JupyterLab skips its own XSRF and origin checks for token-authenticated
//! requests, and every proxied request is one. So for cookie-authenticated requests
//! (browsers) the proxy refuses writes and websocket handshakes whose `Origin` is not
//! this host.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::connect_info::Connected;
use axum::extract::ws::{self, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use futures_util::{SinkExt, StreamExt};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::api::{ACCESS_COOKIE, ApiError, AppState, CSRF_HEADER, Caller, cookie};
use crate::provisioner::{ServerStatus, Upstream};
use crate::{Error, now_ms};

/// The pooled HTTP/1.1 client to servers; bodies stream in both directions.
pub type HttpClient = Client<HttpConnector, Body>;

/// How long one side of a websocket may take to finish closing after the other did.
const CLOSE_GRACE: Duration = Duration::from_secs(5);
/// Websocket traffic refreshes a server's last activity at most this often.
const WS_ACTIVITY_EVERY: Duration = Duration::from_secs(1);

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

/// The proxy's routes; not part of the OpenAPI document (they are the server's own).
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/user/{user}/{server}", any(proxy))
        .route("/user/{user}/{server}/", any(proxy))
        .route("/user/{user}/{server}/{*rest}", any(proxy))
}

async fn proxy(State(s): State<AppState>, req: Request) -> Response {
    match handle(&s, req).await {
        Ok(resp) => resp,
        Err(e) => ApiError(e).into_response(),
    }
}

async fn handle(s: &AppState, req: Request) -> Result<Response, Error> {
    if let Some(ConnectInfo(conn)) = req.extensions().get::<ConnectInfo<Connection>>() {
        conn.nodelay();
    }
    let (owner, name, rest) =
        split_path(req.uri().path()).ok_or_else(|| Error::NotFound("no such server".into()))?;
    let (owner, name) = (owner.to_owned(), name.to_owned());
    let not_found = || Error::NotFound(format!("no server {owner}/{name}"));
    let (token, via_cookie) = credential(req.headers())?;
    let caller = Caller::from_access_token(s, &token).await?;
    caller.may_see_user(&owner).map_err(|_| not_found())?;
    let server = s.provisioner.get(&owner, &name).ok_or_else(not_found)?;
    if rest.is_none() {
        // JupyterLab lives under the base URL with its trailing slash.
        let mut to = format!("/user/{owner}/{name}/");
        if let Some(q) = req.uri().query() {
            to = format!("{to}?{q}");
        }
        return Ok((StatusCode::PERMANENT_REDIRECT, [(header::LOCATION, to)]).into_response());
    }
    let websocket = is_websocket(req.headers());
    if via_cookie {
        check_origin(req.headers(), req.uri(), req.method(), websocket)?;
    }
    let Some(upstream) = server.upstream else {
        return Err(Error::Unavailable(match server.status {
            ServerStatus::Pending => {
                format!("server {owner}/{name} is starting; try again in a few seconds")
            }
            ServerStatus::Failed => format!(
                "server {owner}/{name} has failed: {}",
                server.reason.as_deref().unwrap_or("no reason recorded")
            ),
            ServerStatus::Stopping => format!("server {owner}/{name} is being deleted"),
            ServerStatus::Running => format!("server {owner}/{name} is not reachable"),
        }));
    };
    s.provisioner.touch(&owner, &name, now_ms());
    if websocket {
        let (mut parts, _) = req.into_parts();
        websocket_proxy(s, &mut parts, upstream, owner, name).await
    } else {
        http_proxy(&s.proxy_client, req, &upstream).await
    }
}

/// `(user, server, rest)` of `/user/{user}/{server}[/rest]`; `rest` is `None` when the
/// path stops after the server name without a slash.
fn split_path(path: &str) -> Option<(&str, &str, Option<&str>)> {
    let tail = path.strip_prefix("/user/")?;
    let (user, tail) = tail.split_once('/')?;
    let (server, rest) = match tail.split_once('/') {
        Some((server, rest)) => (server, Some(rest)),
        None => (tail, None),
    };
    (!user.is_empty() && !server.is_empty()).then_some((user, server, rest))
}

/// The access token, and whether it came from the cookie (a browser).
fn credential(headers: &HeaderMap) -> Result<(String, bool), Error> {
    if let Some(v) = headers.get(header::AUTHORIZATION) {
        let v = v
            .to_str()
            .map_err(|_| Error::Unauthorized("malformed Authorization header".into()))?;
        return match v.split_once(' ') {
            Some((scheme, t)) if scheme.eq_ignore_ascii_case("bearer") && !t.trim().is_empty() => {
                Ok((t.trim().to_owned(), false))
            }
            _ => Err(Error::Unauthorized(
                "expected Authorization: Bearer <token> (servers' own tokens are not accepted here)"
                    .into(),
            )),
        };
    }
    cookie(headers, ACCESS_COOKIE)
        .map(|t| (t, true))
        .ok_or_else(|| Error::Unauthorized("not signed in".into()))
}

fn is_websocket(headers: &HeaderMap) -> bool {
    headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
}

/// Browsers send `Origin` on cross-origin writes and on every websocket handshake: for
/// those, it must name this host (as the client addressed it: `Host`, the request's
/// authority, or `X-Forwarded-Host` behind an ingress). No `Origin` is not a browser's
/// cross-site request.
fn check_origin(
    headers: &HeaderMap,
    uri: &axum::http::Uri,
    method: &Method,
    websocket: bool,
) -> Result<(), Error> {
    let safe = matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS);
    if safe && !websocket {
        return Ok(());
    }
    let Some(origin) = headers.get(header::ORIGIN) else {
        return Ok(());
    };
    let origin_host = origin
        .to_str()
        .ok()
        .and_then(|o| o.split_once("://"))
        .map(|(_, h)| h.trim_end_matches('/'));
    let header_str = |name: &HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
    let hosts = [
        header_str(&header::HOST),
        uri.authority().map(|a| a.as_str()),
        header_str(&HeaderName::from_static("x-forwarded-host")),
    ];
    match origin_host {
        Some(o) if hosts.iter().flatten().any(|h| h.eq_ignore_ascii_case(o)) => Ok(()),
        _ => Err(Error::Forbidden(
            "cross-origin request to a server refused (Origin does not match this host)".into(),
        )),
    }
}

/// The listener [`crate::App::serve`] accepts on. Accepted connections keep Nagle's
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
    nodelay: Arc<AtomicBool>,
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
    tcp: TcpStream,
    nodelay: Arc<AtomicBool>,
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

/// The upstream websocket's TCP stream, acknowledging what it reads at once.
///
/// JupyterLab leaves Nagle's algorithm on: it holds back each small write until the
/// previous one is acknowledged, and a receiver that delays its ACK (Linux: 40 ms)
/// turns every kernel execution into a ~48 ms round trip. Asking for an immediate ACK
/// after each read (TCP_QUICKACK, which Linux clears again by itself) removes that wait
/// for every user, whatever their own client does.
struct QuickAck(TcpStream);

impl QuickAck {
    fn ack_now(&self) {
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

/// Connection-specific headers (RFC 9110 §7.6.1) plus those the `Connection` header
/// names: never forwarded.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        HeaderName::from_static("keep-alive"),
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        HeaderName::from_static("proxy-connection"),
    ] {
        headers.remove(name);
    }
}

fn is_kcloud_cookie(name: &str) -> bool {
    name.trim().starts_with("kcloud_")
}

/// The request's cookies without kcloud's own.
fn forwarded_cookies(headers: &HeaderMap) -> Option<HeaderValue> {
    let kept: Vec<&str> = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .map(str::trim)
        .filter(|kv| !kv.is_empty())
        .filter(|kv| !is_kcloud_cookie(kv.split_once('=').map_or(kv, |(k, _)| k)))
        .collect();
    if kept.is_empty() {
        return None;
    }
    HeaderValue::from_str(&kept.join("; ")).ok()
}

/// What goes to the server: the client's headers without hop-by-hop ones and without
/// kcloud's credentials, plus the server's token.
fn upstream_headers(client: &HeaderMap, upstream: &Upstream) -> Result<HeaderMap, Error> {
    let mut h = client.clone();
    strip_hop_by_hop(&mut h);
    h.remove(header::AUTHORIZATION);
    h.remove(header::COOKIE);
    h.remove(CSRF_HEADER);
    if let Some(c) = forwarded_cookies(client) {
        h.insert(header::COOKIE, c);
    }
    if let Some(token) = &upstream.token {
        let token = HeaderValue::from_str(&format!("token {token}"))
            .map_err(|_| Error::Internal("server token is not a valid header value".into()))?;
        h.insert(header::AUTHORIZATION, token);
    }
    Ok(h)
}

/// The server's response headers without hop-by-hop ones, and without any attempt to
/// set kcloud's own cookies (a server must not plant a session or CSRF cookie).
fn downstream_headers(headers: &mut HeaderMap) {
    strip_hop_by_hop(headers);
    let cookies: Vec<HeaderValue> = headers
        .get_all(header::SET_COOKIE)
        .iter()
        .filter(|v| {
            let name = v
                .to_str()
                .ok()
                .and_then(|v| v.split(['=', ';']).next())
                .unwrap_or("");
            !is_kcloud_cookie(name)
        })
        .cloned()
        .collect();
    headers.remove(header::SET_COOKIE);
    for c in cookies {
        headers.append(header::SET_COOKIE, c);
    }
}

/// The path and query to request upstream: as the client sent it, or without the
/// `/user/{user}/{server}` prefix for IDEs served at `/`.
fn upstream_path<'a>(uri: &'a axum::http::Uri, upstream: &Upstream) -> std::borrow::Cow<'a, str> {
    let full = uri.path_and_query().map_or("/", |p| p.as_str());
    match upstream
        .strip_prefix
        .as_deref()
        .and_then(|p| full.strip_prefix(p))
    {
        Some(rest) if rest.starts_with('/') => rest.into(),
        _ => full.into(),
    }
}

/// A redirect to an absolute path from an IDE served at `/` points under its prefix.
fn reprefix_location(headers: &mut HeaderMap, prefix: &str) {
    let Some(to) = headers.get(header::LOCATION).and_then(|v| v.to_str().ok()) else {
        return;
    };
    if to.starts_with('/')
        && !to.starts_with("//")
        && let Ok(v) = HeaderValue::from_str(&format!("{prefix}{to}"))
    {
        headers.insert(header::LOCATION, v);
    }
}

/// Forwards one HTTP request; the bodies stream through without buffering.
async fn http_proxy(
    client: &HttpClient,
    req: Request,
    upstream: &Upstream,
) -> Result<Response, Error> {
    let (parts, body) = req.into_parts();
    let path = upstream_path(&parts.uri, upstream);
    let mut out = axum::http::Request::builder()
        .method(parts.method.clone())
        .uri(format!("http://{}{path}", upstream.addr))
        .body(body)
        .map_err(|e| Error::BadRequest(format!("cannot forward this request: {e}")))?;
    *out.headers_mut() = upstream_headers(&parts.headers, upstream)?;
    let resp = client.request(out).await.map_err(|e| {
        tracing::debug!(error = %e, addr = %upstream.addr, "proxy: upstream request failed");
        Error::Unavailable("the server is not answering".into())
    })?;
    let (mut parts, body) = resp.into_parts();
    downstream_headers(&mut parts.headers);
    if let Some(prefix) = &upstream.strip_prefix {
        reprefix_location(&mut parts.headers, prefix);
    }
    Ok(Response::from_parts(parts, Body::new(body)))
}

/// Connects to the server's websocket first (so its answer, and the subprotocol it
/// picks, decide the client's), then upgrades the client and pumps both ways.
async fn websocket_proxy(
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
    let provisioner = s.provisioner.clone();
    Ok(upgrade.on_upgrade(move |client_ws| async move {
        let mut last = Instant::now();
        let activity = move || {
            if last.elapsed() >= WS_ACTIVITY_EVERY {
                last = Instant::now();
                provisioner.touch(&owner, &name, now_ms());
            }
        };
        pump(client_ws, server_ws, activity).await;
    }))
}

enum Refused {
    /// The server answered the handshake with this (e.g. 404 for an unknown kernel).
    Status(Response),
    Error(Error),
}

async fn connect_upstream(
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
async fn pump(
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
fn sendable_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

fn to_server(m: ws::Message) -> Option<tungstenite::Message> {
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

fn to_client(m: tungstenite::Message) -> Option<ws::Message> {
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

#[cfg(test)]
mod tests {
    /// A proxied request's connection gets TCP_NODELAY at its next write; others keep
    /// Nagle's algorithm.
    #[tokio::test]
    async fn client_stream_sets_nodelay_only_when_asked() {
        use axum::serve::Listener as _;
        use tokio::io::AsyncWriteExt;

        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let mut listener = Listener(tcp);
        for ask in [false, true] {
            let client = TcpStream::connect(addr).await.unwrap();
            let (mut stream, peer) = listener.accept().await;
            assert_eq!(peer, client.local_addr().unwrap());
            let conn = Connection {
                addr: peer,
                nodelay: stream.nodelay.clone(),
            };
            assert!(!stream.tcp.nodelay().unwrap());
            if ask {
                conn.nodelay();
            }
            stream.write_all(b"x").await.unwrap();
            assert_eq!(stream.tcp.nodelay().unwrap(), ask);
        }
    }

    use std::net::SocketAddr;
    use std::sync::Arc;

    use axum::http::Uri;
    use tokio::sync::mpsc;
    use tokio_tungstenite::tungstenite::handshake::server::{
        Request as WsRequest, Response as WsResponse,
    };

    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn upstream(addr: SocketAddr) -> Upstream {
        Upstream {
            addr,
            token: Some(Arc::from("server-token")),
            strip_prefix: None,
        }
    }

    #[test]
    fn prefixes_are_stripped_for_ides_served_at_the_root() {
        let mut up = upstream("127.0.0.1:1".parse().unwrap());
        let uri = |s: &str| s.parse::<axum::http::Uri>().unwrap();
        assert_eq!(
            upstream_path(&uri("/user/a/s/static/x.js?v=1"), &up),
            "/user/a/s/static/x.js?v=1"
        );
        up.strip_prefix = Some(Arc::from("/user/a/s"));
        assert_eq!(
            upstream_path(&uri("/user/a/s/static/x.js?v=1"), &up),
            "/static/x.js?v=1"
        );
        assert_eq!(upstream_path(&uri("/user/a/s/"), &up), "/");
        assert_eq!(
            upstream_path(&uri("/user/a/s/?folder=/x"), &up),
            "/?folder=/x"
        );
        // Only a whole path segment counts: `/user/a/sx` is another server.
        assert_eq!(upstream_path(&uri("/user/a/sx/y"), &up), "/user/a/sx/y");
    }

    #[test]
    fn absolute_redirects_of_stripped_ides_stay_under_their_prefix() {
        for (from, to) in [
            ("/login", "/user/a/s/login"),
            ("./?folder=/x", "./?folder=/x"),
            ("//evil.example/", "//evil.example/"),
            ("https://elsewhere/", "https://elsewhere/"),
        ] {
            let mut h = headers(&[("location", from)]);
            reprefix_location(&mut h, "/user/a/s");
            assert_eq!(h["location"], to);
        }
    }

    #[test]
    fn ides_without_a_token_get_no_authorization_header() {
        let mut up = upstream("127.0.0.1:1".parse().unwrap());
        up.token = None;
        let h = upstream_headers(&headers(&[("authorization", "Bearer kc")]), &up).unwrap();
        assert!(!h.contains_key("authorization"));
    }

    #[test]
    fn paths() {
        assert_eq!(split_path("/user/a/s"), Some(("a", "s", None)));
        assert_eq!(split_path("/user/a/s/"), Some(("a", "s", Some(""))));
        assert_eq!(
            split_path("/user/a/s/api/kernels/1"),
            Some(("a", "s", Some("api/kernels/1")))
        );
        for bad in ["/user/a", "/user//s/", "/user/a//x", "/users/a/s/", "/"] {
            assert_eq!(split_path(bad), None, "{bad}");
        }
    }

    #[test]
    fn credentials_from_bearer_or_cookie() {
        let (t, cookie) = credential(&headers(&[("authorization", "Bearer abc")])).unwrap();
        assert_eq!((t.as_str(), cookie), ("abc", false));
        let (t, cookie) =
            credential(&headers(&[("cookie", "_xsrf=1; kcloud_access=jwt; x=2")])).unwrap();
        assert_eq!((t.as_str(), cookie), ("jwt", true));
        for bad in [
            headers(&[("authorization", "token server-token")]),
            headers(&[("authorization", "Bearer ")]),
            headers(&[("cookie", "_xsrf=1")]),
            HeaderMap::new(),
        ] {
            assert!(
                matches!(credential(&bad), Err(Error::Unauthorized(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn origin_is_checked_for_writes_and_websockets() {
        let uri: Uri = "/user/a/s/api/kernels".parse().unwrap();
        let same = headers(&[
            ("host", "lab.example.org"),
            ("origin", "https://lab.example.org"),
        ]);
        let other = headers(&[
            ("host", "lab.example.org"),
            ("origin", "https://evil.example"),
        ]);
        let null = headers(&[("host", "lab.example.org"), ("origin", "null")]);
        let none = headers(&[("host", "lab.example.org")]);
        let behind_ingress = headers(&[
            ("host", "kcloud-aggregator:8080"),
            ("x-forwarded-host", "lab.example.org"),
            ("origin", "https://lab.example.org"),
        ]);
        assert!(
            check_origin(&other, &uri, &Method::GET, false).is_ok(),
            "reads pass"
        );
        for m in [Method::POST, Method::PUT, Method::PATCH, Method::DELETE] {
            assert!(check_origin(&same, &uri, &m, false).is_ok());
            assert!(check_origin(&none, &uri, &m, false).is_ok());
            assert!(check_origin(&behind_ingress, &uri, &m, false).is_ok());
            assert!(matches!(
                check_origin(&other, &uri, &m, false),
                Err(Error::Forbidden(_))
            ));
            assert!(check_origin(&null, &uri, &m, false).is_err());
        }
        assert!(check_origin(&same, &uri, &Method::GET, true).is_ok());
        assert!(
            check_origin(&other, &uri, &Method::GET, true).is_err(),
            "websockets"
        );
    }

    #[test]
    fn forwarded_headers_carry_the_server_token_and_no_kcloud_credentials() {
        let client = headers(&[
            ("host", "lab.example.org"),
            ("authorization", "Bearer user-jwt"),
            ("cookie", "kcloud_access=jwt; _xsrf=x1"),
            ("cookie", "kcloud_csrf=c; username-lab=u"),
            ("x-csrf-token", "c"),
            ("connection", "keep-alive, x-hop"),
            ("x-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("proxy-authorization", "Basic x"),
            ("x-xsrftoken", "x1"),
            ("content-type", "application/json"),
        ]);
        let h = upstream_headers(&client, &upstream("127.0.0.1:1".parse().unwrap())).unwrap();
        assert_eq!(h["authorization"], "token server-token");
        assert_eq!(h["cookie"], "_xsrf=x1; username-lab=u");
        assert_eq!(h.get_all("cookie").iter().count(), 1);
        assert_eq!(h["host"], "lab.example.org", "Host is kept");
        assert_eq!(h["x-xsrftoken"], "x1");
        assert_eq!(h["content-type"], "application/json");
        for gone in [
            "x-csrf-token",
            "connection",
            "x-hop",
            "keep-alive",
            "te",
            "transfer-encoding",
            "proxy-authorization",
        ] {
            assert!(!h.contains_key(gone), "{gone} forwarded");
        }
        let only_ours = headers(&[("cookie", "kcloud_access=jwt")]);
        let h = upstream_headers(&only_ours, &upstream("127.0.0.1:1".parse().unwrap())).unwrap();
        assert!(!h.contains_key("cookie"));

        let mut resp = headers(&[
            ("set-cookie", "_xsrf=2; Path=/user/a/s/"),
            ("set-cookie", "kcloud_csrf=planted; Path=/"),
            ("set-cookie", " kcloud_access=planted"),
            ("connection", "close"),
            ("content-length", "5"),
        ]);
        downstream_headers(&mut resp);
        let cookies: Vec<_> = resp.get_all("set-cookie").iter().collect();
        assert_eq!(cookies, ["_xsrf=2; Path=/user/a/s/"]);
        assert!(!resp.contains_key("connection"));
        assert_eq!(resp["content-length"], "5");
    }

    async fn serve(router: Router) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
        addr
    }

    /// Echoes the request body back chunk by chunk as it arrives. If either direction
    /// were buffered, the first chunk would never come back before the request ended.
    #[tokio::test]
    async fn http_bodies_stream_both_ways() {
        let echo = Router::new().route(
            "/user/a/s/echo",
            any(|req: Request| async move {
                assert_eq!(req.headers()["authorization"], "token server-token");
                assert_eq!(req.uri().query(), Some("x=1&y=%20"));
                assert_eq!(req.method(), Method::PUT);
                Response::new(Body::from_stream(req.into_body().into_data_stream()))
            }),
        );
        let addr = serve(echo).await;
        let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(1);
        let body = Body::from_stream(tokio_stream_from(rx));
        let req = axum::http::Request::builder()
            .method(Method::PUT)
            .uri("/user/a/s/echo?x=1&y=%20")
            .header("authorization", "Bearer user-jwt")
            .body(body)
            .unwrap();
        let client = http_client();
        let up = upstream(addr);
        tx.send(Ok(Bytes::from_static(b"first"))).await.unwrap();
        let resp = tokio::time::timeout(Duration::from_secs(5), http_proxy(&client, req, &up))
            .await
            .expect("response head before the request body ended")
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let mut stream = resp.into_body().into_data_stream();
        let first = tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .expect("first chunk streamed back while the request is still open")
            .unwrap()
            .unwrap();
        assert_eq!(&first[..], b"first");
        tx.send(Ok(Bytes::from_static(b"second"))).await.unwrap();
        let second = tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(&second[..], b"second");
        drop(tx);
        assert!(stream.next().await.is_none(), "ends when the request ends");
    }

    fn tokio_stream_from<T: Send + 'static>(
        mut rx: mpsc::Receiver<T>,
    ) -> impl futures_util::Stream<Item = T> + Send {
        futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
    }

    #[tokio::test]
    async fn an_absent_upstream_is_unavailable() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let up = upstream(SocketAddr::from(([127, 0, 0, 1], port)));
        let req = axum::http::Request::get("/user/a/s/")
            .body(Body::empty())
            .unwrap();
        let err = http_proxy(&http_client(), req, &up).await.unwrap_err();
        assert!(matches!(err, Error::Unavailable(_)), "{err:?}");
    }

    /// A websocket server standing in for JupyterLab: checks the token, picks the
    /// kernel subprotocol, echoes text and binary, closes with 4001 on "bye", and
    /// reports the close frames it receives.
    // tungstenite's handshake callback type fixes the error type.
    #[allow(clippy::result_large_err)]
    async fn ws_upstream(closes: mpsc::Sender<Option<u16>>) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let closes = closes.clone();
                tokio::spawn(async move {
                    let check = |req: &WsRequest, mut resp: WsResponse| {
                        assert_eq!(req.headers()["authorization"], "token server-token");
                        assert_eq!(req.headers()["cookie"], "_xsrf=1");
                        assert_eq!(req.uri().path(), "/user/a/s/api/kernels/k1/channels");
                        assert_eq!(req.uri().query(), Some("session_id=9"));
                        resp.headers_mut().insert(
                            "sec-websocket-protocol",
                            HeaderValue::from_static("v1.kernel.websocket.jupyter.org"),
                        );
                        Ok(resp)
                    };
                    let mut ws = tokio_tungstenite::accept_hdr_async(tcp, check)
                        .await
                        .unwrap();
                    while let Some(Ok(msg)) = ws.next().await {
                        match msg {
                            tungstenite::Message::Text(t) if t.as_str() == "bye" => {
                                let frame = tungstenite::protocol::CloseFrame {
                                    code: 4001.into(),
                                    reason: "bye".into(),
                                };
                                let _ = ws.send(tungstenite::Message::Close(Some(frame))).await;
                            }
                            tungstenite::Message::Close(f) => {
                                let _ = closes.send(f.map(|f| f.code.into())).await;
                                break;
                            }
                            m @ (tungstenite::Message::Text(_)
                            | tungstenite::Message::Binary(_)) => {
                                ws.send(m).await.unwrap();
                            }
                            _ => {}
                        }
                    }
                });
            }
        });
        addr
    }

    async fn ws_proxy(up: Upstream) -> SocketAddr {
        let router = Router::new().route(
            "/user/a/s/{*rest}",
            any(move |mut upgrade: WebSocketUpgrade, req: Request| {
                let up = up.clone();
                async move {
                    let path = req.uri().path_and_query().unwrap().as_str().to_owned();
                    let (server, protocol) = match connect_upstream(&up, &path, req.headers()).await
                    {
                        Ok(c) => c,
                        Err(Refused::Status(r)) => return r,
                        Err(Refused::Error(e)) => return ApiError(e).into_response(),
                    };
                    if let Some(p) = protocol {
                        upgrade.set_selected_protocol(p);
                    }
                    upgrade.on_upgrade(move |client| pump(client, server, || {}))
                }
            }),
        );
        serve(router).await
    }

    async fn ws_client(proxy: SocketAddr) -> (WebSocketStream<TcpStream>, Option<HeaderValue>) {
        let tcp = TcpStream::connect(proxy).await.unwrap();
        let mut req = format!("ws://{proxy}/user/a/s/api/kernels/k1/channels?session_id=9")
            .into_client_request()
            .unwrap();
        let h = req.headers_mut();
        h.insert(
            "sec-websocket-protocol",
            HeaderValue::from_static("v1.kernel.websocket.jupyter.org"),
        );
        h.insert(
            "cookie",
            HeaderValue::from_static("kcloud_access=jwt; _xsrf=1"),
        );
        let (ws, resp) = tokio_tungstenite::client_async(req, tcp).await.unwrap();
        (ws, resp.headers().get("sec-websocket-protocol").cloned())
    }

    #[tokio::test]
    async fn websockets_carry_text_binary_and_closes_both_ways() {
        let (closes_tx, mut closes) = mpsc::channel(4);
        let up = upstream(ws_upstream(closes_tx).await);
        let proxy = ws_proxy(up).await;
        fn timeout<F: std::future::IntoFuture>(f: F) -> tokio::time::Timeout<F::IntoFuture> {
            tokio::time::timeout(Duration::from_secs(5), f)
        }

        let (mut ws, protocol) = ws_client(proxy).await;
        assert_eq!(protocol.unwrap(), "v1.kernel.websocket.jupyter.org");
        ws.send(tungstenite::Message::Text("hello".into()))
            .await
            .unwrap();
        let m = timeout(ws.next()).await.unwrap().unwrap().unwrap();
        assert_eq!(m, tungstenite::Message::Text("hello".into()));
        let blob: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        ws.send(tungstenite::Message::Binary(blob.clone().into()))
            .await
            .unwrap();
        let m = timeout(ws.next()).await.unwrap().unwrap().unwrap();
        assert_eq!(m, tungstenite::Message::Binary(blob.into()));
        // The client closes: the server sees the client's code.
        let frame = tungstenite::protocol::CloseFrame {
            code: 1000.into(),
            reason: "done".into(),
        };
        ws.send(tungstenite::Message::Close(Some(frame)))
            .await
            .unwrap();
        assert_eq!(timeout(closes.recv()).await.unwrap(), Some(Some(1000)));

        // The server closes: the client sees the server's code.
        let (mut ws, _) = ws_client(proxy).await;
        ws.send(tungstenite::Message::Text("bye".into()))
            .await
            .unwrap();
        let m = timeout(ws.next()).await.unwrap().unwrap().unwrap();
        match m {
            tungstenite::Message::Close(Some(f)) => assert_eq!(u16::from(f.code), 4001),
            other => panic!("expected a close, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_refused_websocket_handshake_keeps_the_servers_status() {
        let missing = Router::new().route(
            "/user/a/s/{*rest}",
            any(|| async { (StatusCode::NOT_FOUND, "no such kernel") }),
        );
        let up = upstream(serve(missing).await);
        let h = headers(&[]);
        match connect_upstream(&up, "/user/a/s/api/kernels/nope/channels", &h).await {
            Err(Refused::Status(r)) => assert_eq!(r.status(), StatusCode::NOT_FOUND),
            Err(Refused::Error(e)) => panic!("{e:?}"),
            Ok(_) => panic!("upgraded"),
        }
    }

    #[test]
    fn close_codes_on_the_wire() {
        assert!(sendable_close_code(1000) && sendable_close_code(4001));
        assert!(
            !sendable_close_code(1005) && !sendable_close_code(1006) && !sendable_close_code(999)
        );
        let m = to_server(ws::Message::Close(Some(ws::CloseFrame {
            code: 1006,
            reason: "abnormal".into(),
        })));
        assert_eq!(m, Some(tungstenite::Message::Close(None)));
        assert_eq!(
            to_server(ws::Message::Ping(Bytes::new())),
            None,
            "pings stay per hop"
        );
        assert_eq!(to_client(tungstenite::Message::Pong(Bytes::new())), None);
    }
}
