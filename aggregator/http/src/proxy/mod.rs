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

mod socket;
#[cfg(test)]
mod tests;
mod websocket;

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::any;

use kcloud_core::server::{ServerStatus, Upstream};
use kcloud_core::{Error, now_ms};
use kcloud_provision::upstream::HttpClient;

use crate::AppState;
use crate::error::ApiError;
use crate::extract::{CSRF_HEADER, cookie_credential};
use crate::listener::Connection;

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
    let credential = cookie_credential(req.headers())?;
    let via_cookie = credential.via_cookie;
    let caller = s.auth.caller(&credential.token).await?;
    let server = s
        .servers
        .get(&caller, &owner, &name)
        .map_err(|_| not_found())?;
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
    s.servers.touch(&owner, &name, now_ms());
    if websocket {
        let (mut parts, _) = req.into_parts();
        websocket::websocket_proxy(s, &mut parts, upstream, owner, name).await
    } else {
        http_proxy(&s.upstream, req, &upstream).await
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
pub(crate) fn forwarded_cookies(headers: &HeaderMap) -> Option<HeaderValue> {
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
pub(crate) fn upstream_path<'a>(
    uri: &'a axum::http::Uri,
    upstream: &Upstream,
) -> std::borrow::Cow<'a, str> {
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
