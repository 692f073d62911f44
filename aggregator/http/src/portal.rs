//! The web portal: static assets embedded in the binary and served at `/` and `/ui/`.
//!
//! The portal is hand-written HTML, CSS and ES modules (no build step, no third-party
//! code): the page talks to the REST API with the session cookie plus the CSRF header,
//! and follows `GET /api/v1/events` for live changes. Every response carries a strict
//! Content-Security-Policy (scripts and styles from this origin only, no inline code)
//! and an ETag, so reloads cost a 304.

use std::hash::{Hash, Hasher};
use std::sync::LazyLock;

use axum::Router;
use axum::extract::Request;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::AppState;

/// No inline script or style, no other origins, no framing, no plugins.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self' data:; connect-src 'self'; font-src 'self'; frame-ancestors 'none'; \
     base-uri 'none'; form-action 'self'";

/// One embedded file.
struct Asset {
    path: &'static str,
    content_type: &'static str,
    body: &'static str,
}

macro_rules! asset {
    ($path:literal, $file:literal, $ty:expr) => {
        Asset {
            path: $path,
            content_type: $ty,
            body: include_str!(concat!("../ui/", $file)),
        }
    };
}

const JS: &str = "text/javascript; charset=utf-8";

static ASSETS: &[Asset] = &[
    asset!("/", "index.html", "text/html; charset=utf-8"),
    asset!("/ui/app.css", "app.css", "text/css; charset=utf-8"),
    asset!("/ui/app.js", "app.js", JS),
    asset!("/ui/api.js", "api.js", JS),
    asset!("/ui/dom.js", "dom.js", JS),
    asset!("/ui/cluster.js", "cluster.js", JS),
    asset!("/ui/servers.js", "servers.js", JS),
    asset!("/ui/storage.js", "storage.js", JS),
    asset!("/ui/reservations.js", "reservations.js", JS),
    asset!("/ui/usage.js", "usage.js", JS),
    asset!("/ui/tokens.js", "tokens.js", JS),
    asset!("/ui/admin.js", "admin.js", JS),
    asset!("/ui/favicon.svg", "favicon.svg", "image/svg+xml"),
];

/// ETags, computed once: the content cannot change while the process runs.
static ETAGS: LazyLock<Vec<HeaderValue>> = LazyLock::new(|| {
    ASSETS
        .iter()
        .map(|a| {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            a.body.hash(&mut h);
            HeaderValue::from_str(&format!("\"{:016x}\"", h.finish()))
                .unwrap_or(HeaderValue::from_static("\"0\""))
        })
        .collect()
});

/// The portal's routes (not in the OpenAPI document: they are pages, not API).
pub fn routes() -> Router<AppState> {
    let mut r = Router::new();
    for a in ASSETS {
        r = r.route(a.path, get(serve));
    }
    r
}

async fn serve(req: Request) -> Response {
    let path = req.uri().path();
    let Some(i) = ASSETS.iter().position(|a| a.path == path) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    respond(i, req.headers())
}

fn respond(i: usize, headers: &HeaderMap) -> Response {
    let asset = &ASSETS[i];
    let etag = ETAGS[i].clone();
    let fresh = headers
        .get(header::IF_NONE_MATCH)
        .is_some_and(|v| v.as_bytes() == etag.as_bytes());
    let mut resp = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static(asset.content_type),
            )],
            asset.body,
        )
            .into_response()
    };
    let h = resp.headers_mut();
    h.insert(header::ETAG, etag);
    // Revalidate every time (cheap 304s) so an upgraded aggregator never mixes old
    // and new modules.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assets_have_no_inline_code_or_remote_origins() {
        for a in ASSETS {
            assert!(!a.body.is_empty(), "{} is empty", a.path);
            // The SVG namespace is a name, not something loaded.
            let body = a.body.replace("http://www.w3.org/2000/svg", "");
            assert!(
                !body.contains("http://") && !body.contains("https://") && !body.contains("//cdn"),
                "{} refers to another origin",
                a.path
            );
        }
        let index = ASSETS[0].body;
        assert!(
            !index.contains("<script>") && !index.contains(" style=") && !index.contains("<style"),
            "index.html must not need 'unsafe-inline'"
        );
        assert!(index.contains(r#"<script type="module" src="/ui/app.js">"#));
    }

    #[test]
    fn etag_answers_304() {
        let mut h = HeaderMap::new();
        let first = respond(2, &h);
        assert_eq!(first.status(), StatusCode::OK);
        let etag = first.headers()[header::ETAG].clone();
        assert!(
            first.headers()[header::CONTENT_SECURITY_POLICY]
                .to_str()
                .unwrap()
                .contains("script-src 'self'")
        );
        h.insert(header::IF_NONE_MATCH, etag);
        assert_eq!(respond(2, &h).status(), StatusCode::NOT_MODIFIED);
    }
}
