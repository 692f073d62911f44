//! `/user/{user}/{server}/...`: the authenticated reverse proxy to a server.
//!
//! A server's content is served on its owner's origin ([`crate::origin`]), to:
//! - browsers, with the server's own cookie, which the owner's origin sets when the
//!   browser brings a one-time code from the portal (`/_kcloud/session`): the cookie
//!   is good on that origin only, for that server only, and only for proxying;
//! - API clients, with `Authorization: Bearer` (or `token`, as Jupyter clients send
//!   it), there and on the portal's origin: a session's access token, or a personal
//!   API token with the `proxy` scope;
//! - Jupyter clients that put a personal token in the URL (`?token=kct_...`), on the
//!   owner's origin only: a plain `GET` gets the server's cookie and is sent on to the
//!   same URL without the token; a websocket or a write uses it for that request, and
//!   it is removed before the request goes on. (On the portal's origin a token in the
//!   URL would let a link serve user content there to a browser: never.)
//!
//! On the portal's origin a browser (the session cookie) never gets a server's
//! content: its owner is sent to the owner's origin with a fresh code; anyone else is
//! refused (admins open other users' servers from the portal, an audited action).
//!
//! Only the owner and admins get through (others, and unknown servers, get 404). The
//! proxy adds the server's own token (`Authorization: token ...`), which users never
//! see, and removes kcloud's credentials (bearer header, `kcloud_*` cookies, CSRF
//! header) from what it forwards, so a server never learns a visitor's session. HTTP
//! bodies stream both ways; websockets are pumped frame by frame (text, binary,
//! close), with TCP_NODELAY on the upstream side.
//!
//! CSRF: JupyterLab skips its own XSRF and origin checks for token-authenticated
//! requests, and every proxied request is one. So for cookie-authenticated requests
//! (browsers) the proxy refuses writes and websocket handshakes whose `Origin` is not
//! the owner's origin.

#[cfg(test)]
mod tests;
mod websocket;

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::any;

use kcloud_core::caller::Caller;
use kcloud_core::server::{ServerStatus, Upstream};
use kcloud_core::{Error, now_ms};
use kcloud_provision::upstream::HttpClient;

use crate::AppState;
use crate::error::ApiError;
use crate::extract::{CSRF_HEADER, bearer, cookie, cookie_credential};
use crate::listener::Connection;
use crate::origin;

/// Where a user's origin exchanges a code for a server's cookie.
pub const SESSION_PATH: &str = "/_kcloud/session";

/// The proxy's routes on the portal's origin; not part of the OpenAPI document (they
/// are the server's own).
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/user/{user}/{server}", any(proxy))
        .route("/user/{user}/{server}/", any(proxy))
        .route("/user/{user}/{server}/{*rest}", any(proxy))
}

async fn proxy(State(s): State<AppState>, req: Request) -> Response {
    match on_portal_origin(&s, req).await {
        Ok(resp) => resp,
        Err(e) => ApiError(e).into_response(),
    }
}

/// A request for `/user/...` on the portal's origin.
async fn on_portal_origin(s: &AppState, req: Request) -> Result<Response, Error> {
    let (owner, name, _) =
        split_path(req.uri().path()).ok_or_else(|| Error::NotFound("no such server".into()))?;
    let (owner, name) = (owner.to_owned(), name.to_owned());
    if let Some(token) = client_token(req.headers())? {
        let caller = s.auth.caller(&token).await?;
        return forward(s, &caller, &owner, &name, req).await;
    }
    let credential = cookie_credential(req.headers(), s.secure_cookies)?;
    let caller = s.auth.caller(&credential.token).await?;
    if credential.via_cookie {
        return open_on_owner_origin(s, &caller, &owner, &name, &req);
    }
    forward(s, &caller, &owner, &name, req).await
}

/// A browser that followed a link to a server on the portal's origin: its owner goes
/// to the owner's origin with a fresh code; nobody else is let through here.
fn open_on_owner_origin(
    s: &AppState,
    caller: &Caller,
    owner: &str,
    name: &str,
    req: &Request,
) -> Result<Response, Error> {
    s.servers
        .get(caller, owner, name)
        .map_err(|_| Error::NotFound(format!("no server {owner}/{name}")))?;
    if caller.name != owner {
        return Err(Error::Forbidden(
            "open other users' servers from the portal (an admin's access is confirmed \
             and audited)"
                .into(),
        ));
    }
    // A page elsewhere must not sign the browser in to a server behind its back (in a
    // frame, with an image): only a navigation the user made, or one from the portal.
    let fetch_site = req
        .headers()
        .get("sec-fetch-site")
        .and_then(|v| v.to_str().ok());
    if fetch_site.is_some_and(|v| !matches!(v, "none" | "same-origin")) {
        return Err(Error::Forbidden(
            "open servers from the portal, not from another site".into(),
        ));
    }
    let code = s.auth.open_code(caller, owner, name)?;
    let next = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let url = session_url(s, owner, request_port(s, req), &code, next);
    Ok((
        StatusCode::SEE_OTHER,
        [
            (header::LOCATION, url),
            (header::CACHE_CONTROL, "no-store".to_owned()),
        ],
    )
        .into_response())
}

/// The port the request came in on (for a `{port}` user origin).
fn request_port(s: &AppState, req: &Request) -> Option<u16> {
    origin::request_port(
        req.headers(),
        req.uri(),
        req.extensions(),
        &s.trusted_proxies,
    )
}

/// `{owner's origin}/_kcloud/session?code=...&next=...`.
pub(crate) fn session_url(
    s: &AppState,
    owner: &str,
    port: Option<u16>,
    code: &str,
    next: &str,
) -> String {
    format!(
        "{}{SESSION_PATH}?code={code}&next={}",
        s.user_origins.origin(owner, port),
        crate::percent::encode(next, b"/")
    )
}

/// The cookie that carries one server's session on its owner's origin.
pub(crate) fn server_cookie(s: &AppState, server: &str) -> String {
    if s.user_origins.secure() {
        format!("__Host-kcloud_srv_{server}")
    } else {
        format!("kcloud_srv_{server}")
    }
}

/// A request on `user`'s origin: the code exchange, or `/user/{user}/...` with a
/// bearer token or that server's cookie. Nothing else is served here.
pub(crate) async fn on_user_origin(
    s: &AppState,
    user: &str,
    authority: &str,
    req: Request,
) -> Response {
    match user_origin(s, user, authority, req).await {
        Ok(resp) => resp,
        Err(e) => ApiError(e).into_response(),
    }
}

async fn user_origin(
    s: &AppState,
    user: &str,
    authority: &str,
    req: Request,
) -> Result<Response, Error> {
    if req.uri().path() == SESSION_PATH {
        return exchange(s, user, &req);
    }
    let (owner, name, _) = split_path(req.uri().path())
        .filter(|(owner, _, _)| *owner == user)
        .ok_or_else(|| Error::NotFound("nothing here: servers only".into()))?;
    let (owner, name) = (owner.to_owned(), name.to_owned());
    let mut req = req;
    let in_url = url_token(req.uri());
    let (caller, via_cookie) = match client_token(req.headers())? {
        Some(token) => (s.auth.caller(&token).await?, false),
        None if in_url.is_some() => {
            let token = in_url.unwrap_or_default();
            let caller = s.auth.caller(&token).await?;
            let without = uri_without_token(req.uri());
            if req.method() == Method::GET && !is_websocket(req.headers()) {
                return token_exchange(s, &caller, &owner, &name, without);
            }
            *req.uri_mut() = without
                .parse()
                .map_err(|_| Error::BadRequest("malformed URL".into()))?;
            (caller, false)
        }
        None => {
            let token = cookie(req.headers(), &server_cookie(s, &name)).ok_or_else(|| {
                Error::Unauthorized("not signed in to this server: open it from the portal".into())
            })?;
            (s.auth.proxy_caller(&token, &owner, &name).await?, true)
        }
    };
    if via_cookie {
        let websocket = is_websocket(req.headers());
        check_origin(req.headers(), authority, req.method(), websocket)?;
    }
    forward(s, &caller, &owner, &name, req).await
}

/// `Authorization: Bearer <token>` or `Authorization: token <token>` (what Jupyter
/// clients send); `None` without the header.
fn client_token(headers: &HeaderMap) -> Result<Option<String>, Error> {
    let Some(v) = headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    if let Some(t) = v
        .to_str()
        .ok()
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("token"))
        .map(|(_, t)| t.trim())
        .filter(|t| !t.is_empty())
    {
        return Ok(Some(t.to_owned()));
    }
    bearer(headers)
}

/// A personal token in the URL's `token` parameter (anything else named `token` is
/// left for the server).
fn url_token(uri: &axum::http::Uri) -> Option<String> {
    uri.query()?
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, v)| *k == "token" && v.starts_with(kcloud_core::token::TOKEN_PREFIX))
        .map(|(_, v)| crate::percent::decode(v))
}

/// The URL's path and query without its personal `token` parameter.
fn uri_without_token(uri: &axum::http::Uri) -> String {
    let kept: Vec<&str> = uri
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|kv| {
            !kv.is_empty()
                && !kv.split_once('=').is_some_and(|(k, v)| {
                    k == "token" && v.starts_with(kcloud_core::token::TOKEN_PREFIX)
                })
        })
        .collect();
    if kept.is_empty() {
        uri.path().to_owned()
    } else {
        format!("{}?{}", uri.path(), kept.join("&"))
    }
}

/// A personal token in a `GET`'s URL on the owner's origin: the server's cookie, made
/// from the token (good while the token is), and on to the same URL without it.
fn token_exchange(
    s: &AppState,
    caller: &Caller,
    owner: &str,
    name: &str,
    to: String,
) -> Result<Response, Error> {
    s.servers
        .get(caller, owner, name)
        .map_err(|_| Error::NotFound(format!("no server {owner}/{name}")))?;
    let token = s.auth.grant_cookie(caller, owner, name)?;
    Ok(signed_in_redirect(s, name, &token, to))
}

/// A redirect to `to` (inside server `name`) that sets the server's cookie to `token`
/// on this origin: what a spent code and a personal token in the URL both become.
/// Neither travels further in a `Referer`.
fn signed_in_redirect(s: &AppState, name: &str, token: &str, to: String) -> Response {
    let secure = if s.user_origins.secure() {
        "; Secure"
    } else {
        ""
    };
    let cookie = format!(
        "{}={token}; Path=/; Max-Age={}; HttpOnly; SameSite=Lax{secure}",
        server_cookie(s, name),
        s.auth.refresh_ttl().as_secs()
    );
    let mut resp = (StatusCode::SEE_OTHER, [(header::LOCATION, to)]).into_response();
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        h.insert(header::SET_COOKIE, v);
    }
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    resp
}

/// `GET /_kcloud/session?code=...&next=...` on the owner's origin: the code becomes the
/// server's cookie here, and the browser goes on to `next` (inside that server).
fn exchange(s: &AppState, user: &str, req: &Request) -> Result<Response, Error> {
    if req.method() != Method::GET {
        return Err(Error::BadRequest("use GET".into()));
    }
    let query = req.uri().query().unwrap_or("");
    let param = |key: &str| {
        query
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == key)
            .map(|(_, v)| crate::percent::decode(v))
    };
    let code = param("code").ok_or_else(|| Error::BadRequest("no code".into()))?;
    let (server, token) = s.auth.redeem(&code, user)?;
    let home = format!("/user/{user}/{server}/");
    // Only somewhere inside this server: never another origin or another server.
    let next = param("next")
        .filter(|n| n.starts_with(&home) && !n.contains(['\\', '\r', '\n']))
        .unwrap_or(home);
    Ok(signed_in_redirect(s, &server, &token, next))
}

/// Forwards a request `caller` may make to `owner/name`.
async fn forward(
    s: &AppState,
    caller: &Caller,
    owner: &str,
    name: &str,
    req: Request,
) -> Result<Response, Error> {
    if caller
        .grant
        .as_ref()
        .is_some_and(|g| !g.has(kcloud_core::token::Scope::Proxy))
    {
        return Err(Error::Forbidden(
            "this personal token lacks the proxy scope".into(),
        ));
    }
    if let Some(ConnectInfo(conn)) = req.extensions().get::<ConnectInfo<Connection>>() {
        conn.nodelay();
    }
    let not_found = || Error::NotFound(format!("no server {owner}/{name}"));
    let server = s
        .servers
        .get(caller, owner, name)
        .map_err(|_| not_found())?;
    let (_, _, rest) = split_path(req.uri().path()).ok_or_else(not_found)?;
    if rest.is_none() {
        // JupyterLab lives under the base URL with its trailing slash.
        let mut to = format!("/user/{owner}/{name}/");
        if let Some(q) = req.uri().query() {
            to = format!("{to}?{q}");
        }
        return Ok((StatusCode::PERMANENT_REDIRECT, [(header::LOCATION, to)]).into_response());
    }
    let websocket = is_websocket(req.headers());
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
            ServerStatus::Queued => {
                format!("server {owner}/{name} is waiting in the queue for its devices")
            }
        }));
    };
    s.servers.touch(owner, name, now_ms());
    if websocket {
        let (mut parts, _) = req.into_parts();
        websocket::websocket_proxy(s, &mut parts, upstream, owner.to_owned(), name.to_owned()).await
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
/// those, it must be the origin the request addressed (`authority`). No `Origin` is not
/// a browser's cross-site request.
fn check_origin(
    headers: &HeaderMap,
    authority: &str,
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
    match origin_host {
        Some(o) if o.eq_ignore_ascii_case(authority) => Ok(()),
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

/// kcloud's own cookies (sessions, CSRF, servers' cookies): never a server's business.
fn is_kcloud_cookie(name: &str) -> bool {
    let name = name.trim();
    name.starts_with("kcloud_") || name.starts_with("__Host-kcloud_")
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
