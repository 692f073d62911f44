//! What handlers take from a request: bodies, paths and queries in our error shape,
//! the client's address, and who is calling (one credential parser for the API, the
//! event stream and the proxy).

use axum::Json;
use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderMap, Method, header};
use serde::de::DeserializeOwned;
use serde_json::Value;

use kcloud_core::Error;

use crate::AppState;
use crate::error::ApiError;

pub const ACCESS_COOKIE: &str = "kcloud_access";
pub const REFRESH_COOKIE: &str = "kcloud_refresh";
pub const CSRF_COOKIE: &str = "kcloud_csrf";
pub const CSRF_HEADER: &str = "x-csrf-token";

/// A portal cookie's name: `__Host-` prefixed when cookies are `Secure`, so that no
/// other origin — a user's origin under the same parent domain included — can set
/// ("toss") one with a `Domain` attribute that the portal would then believe.
pub fn portal_cookie(secure: bool, base: &str) -> String {
    if secure {
        format!("__Host-{base}")
    } else {
        base.to_owned()
    }
}

/// `Json` whose rejections use our error shape, and whose integers are JSON Schema's:
/// `3.0` is the integer 3 (the API document's `integer` admits it; serde does not).
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        if !json_content_type(req.headers()) {
            return Err(ApiError(Error::BadRequest(
                "Expected request with `Content-Type: application/json`".into(),
            )));
        }
        let bytes = Bytes::from_request(req, state).await?;
        match Json::<T>::from_bytes(&bytes) {
            Ok(Json(v)) => Ok(ApiJson(v)),
            // Only a body that failed is read again (as a tree with whole floats made
            // integers): the common case parses once, straight into `T`.
            Err(first) => serde_json::from_slice::<Value>(&bytes)
                .ok()
                .and_then(|mut v| whole_floats_to_integers(&mut v).then_some(v))
                .and_then(|v| serde_json::from_value::<T>(v).ok())
                .map(ApiJson)
                .ok_or_else(|| first.into()),
        }
    }
}

/// `application/json` or `application/*+json`, parameters aside.
fn json_content_type(headers: &HeaderMap) -> bool {
    let Some(ct) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let essence = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || essence
            .strip_prefix("application/")
            .is_some_and(|sub| sub.ends_with("+json"))
}

/// Turns every float with no fraction that an integer type can hold into that
/// integer; says whether it changed anything.
fn whole_floats_to_integers(v: &mut Value) -> bool {
    match v {
        Value::Number(n) if n.is_f64() => {
            let f = n.as_f64().unwrap_or(f64::NAN);
            // Both bounds are exact in f64 (2^63, 2^64); the ends are open.
            let whole = f.fract() == 0.0;
            let int = if whole && (-9.223_372_036_854_776e18..9.223_372_036_854_776e18).contains(&f)
            {
                Some(serde_json::Number::from(f as i64))
            } else if whole && (0.0..1.844_674_407_370_955_2e19).contains(&f) {
                Some(serde_json::Number::from(f as u64))
            } else {
                None
            };
            int.map(|i| *n = i).is_some()
        }
        Value::Array(a) => a
            .iter_mut()
            .fold(false, |c, x| whole_floats_to_integers(x) | c),
        Value::Object(o) => o
            .values_mut()
            .fold(false, |c, x| whole_floats_to_integers(x) | c),
        _ => false,
    }
}

/// `Path` whose rejections use our error shape.
pub struct ApiPath<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let axum::extract::Path(v) =
            axum::extract::Path::<T>::from_request_parts(parts, state).await?;
        Ok(ApiPath(v))
    }
}

/// `Query` whose rejections use our error shape.
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let axum::extract::Query(v) =
            axum::extract::Query::<T>::from_request_parts(parts, state).await?;
        Ok(ApiQuery(v))
    }
}

/// The client's address (rate limiting, audit): the peer, or behind a trusted reverse
/// proxy the address it forwarded for ([`crate::origin::client_addr`]).
pub struct ClientAddr(pub std::net::IpAddr);

impl FromRequestParts<AppState> for ClientAddr {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, s: &AppState) -> Result<Self, Self::Rejection> {
        let peer = parts
            .extensions
            .get::<axum::extract::ConnectInfo<crate::listener::Connection>>()
            .map_or(std::net::IpAddr::from([0, 0, 0, 0]), |c| c.0.addr.ip());
        Ok(ClientAddr(crate::origin::client_addr(
            peer,
            &parts.headers,
            &s.trusted_proxies,
        )))
    }
}

/// The port the client addressed (a `{port}` user origin is on the same one).
pub struct RequestPort(pub Option<u16>);

impl FromRequestParts<AppState> for RequestPort {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, s: &AppState) -> Result<Self, Self::Rejection> {
        Ok(RequestPort(crate::origin::request_port(
            &parts.headers,
            &parts.uri,
            &parts.extensions,
            &s.trusted_proxies,
        )))
    }
}

/// An authenticated user: from `Authorization: Bearer`, or from the session cookie
/// (then writes must carry the CSRF header matching the CSRF cookie). The user must
/// still exist and be enabled: disabling takes effect at once, not at token expiry.
#[derive(Debug, Clone)]
pub struct Caller(pub kcloud_core::caller::Caller);

impl std::ops::Deref for Caller {
    type Target = kcloud_core::caller::Caller;

    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, s: &AppState) -> Result<Self, Self::Rejection> {
        let token = credential(&parts.headers, &parts.method, s.secure_cookies)?.token;
        let caller = s.auth.caller(&token).await?;
        // A personal token does what its scopes allow, nothing else.
        caller.check_scope(parts.method.as_str(), parts.uri.path())?;
        // Into the request's span (see `track`): whose request it was.
        tracing::Span::current().record("user", caller.name.as_str());
        Ok(Caller(caller))
    }
}

/// Where a request's access token came from.
pub struct Credential {
    pub token: String,
    /// From the session cookie (a browser), not the `Authorization` header.
    pub via_cookie: bool,
}

/// The bearer token of the `Authorization` header; `None` without the header.
pub fn bearer(headers: &HeaderMap) -> Result<Option<String>, Error> {
    let Some(v) = headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let v = v
        .to_str()
        .map_err(|_| Error::Unauthorized("malformed Authorization header".into()))?;
    match v.split_once(' ') {
        Some((scheme, token))
            if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() =>
        {
            Ok(Some(token.trim().to_owned()))
        }
        _ => Err(Error::Unauthorized(
            "expected Authorization: Bearer <token>".into(),
        )),
    }
}

/// The access token from the bearer header, else from the cookie with a CSRF check on
/// unsafe methods.
pub fn credential(headers: &HeaderMap, method: &Method, secure: bool) -> Result<Credential, Error> {
    let via_cookie = cookie_credential(headers, secure)?;
    if via_cookie.via_cookie {
        check_csrf(headers, method, secure)?;
    }
    Ok(via_cookie)
}

/// The access token from the bearer header, else from the session cookie, without the
/// CSRF check (the proxy checks `Origin` instead).
pub fn cookie_credential(headers: &HeaderMap, secure: bool) -> Result<Credential, Error> {
    if let Some(token) = bearer(headers)? {
        return Ok(Credential {
            token,
            via_cookie: false,
        });
    }
    let token = cookie(headers, &portal_cookie(secure, ACCESS_COOKIE))
        .ok_or_else(|| Error::Unauthorized("not signed in".into()))?;
    Ok(Credential {
        token,
        via_cookie: true,
    })
}

/// Double-submit CSRF check for cookie-authenticated writes: the `X-CSRF-Token` header
/// must equal the CSRF cookie, which another site can neither read nor set.
pub fn check_csrf(headers: &HeaderMap, method: &Method, secure: bool) -> Result<(), Error> {
    if matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS) {
        return Ok(());
    }
    let cookie = cookie(headers, &portal_cookie(secure, CSRF_COOKIE));
    let header = headers.get(CSRF_HEADER).and_then(|v| v.to_str().ok());
    match (cookie, header) {
        (Some(c), Some(h)) if !c.is_empty() && constant_time_eq(c.as_bytes(), h.as_bytes()) => {
            Ok(())
        }
        _ => Err(Error::Forbidden(
            "missing or wrong X-CSRF-Token header".into(),
        )),
    }
}

/// A cookie's value from the request's `Cookie` headers.
pub fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_owned())
}

pub use kcloud_core::private::constant_time_eq;

/// An agent presenting the agent token. A user's token here is 403; nothing is 401.
pub struct AgentCaller;

impl FromRequestParts<AppState> for AgentCaller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, s: &AppState) -> Result<Self, Self::Rejection> {
        let token = bearer(&parts.headers)
            .map_err(|_| {
                Error::Unauthorized("expected Authorization: Bearer <agent token>".into())
            })?
            .ok_or_else(|| Error::Unauthorized("agent token required".into()))?;
        if constant_time_eq(token.as_bytes(), s.agent_token.as_bytes()) {
            return Ok(AgentCaller);
        }
        if s.auth.verify_access(&token).is_ok() {
            return Err(Error::Forbidden("only agents may push inventories".into()).into());
        }
        Err(Error::Unauthorized("invalid agent token".into()).into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn whole_floats_become_integers_and_nothing_else_changes() {
        let mut v = json!({"a": 3.0, "b": [1.5, -2.0, 1e300], "c": "4.0", "d": 7});
        assert!(whole_floats_to_integers(&mut v));
        assert_eq!(
            v,
            json!({"a": 3, "b": [1.5, -2, 1e300], "c": "4.0", "d": 7})
        );
        assert!(v["a"].is_u64() && v["b"][1].is_i64());
        let mut plain = json!({"a": 1, "b": [2.5]});
        assert!(!whole_floats_to_integers(&mut plain));
    }

    #[test]
    fn json_content_types() {
        let with = |ct: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::CONTENT_TYPE, ct.parse().unwrap());
            json_content_type(&h)
        };
        assert!(with("application/json"));
        assert!(with("Application/JSON; charset=utf-8"));
        assert!(with("application/merge-patch+json"));
        assert!(!with("text/plain"));
        assert!(!with("application/jsonx"));
        assert!(!json_content_type(&HeaderMap::new()));
    }
}
