//! Single sign-on (the flow is `kcloud_service::auth::Oidc`): where the portal learns
//! how to sign in, the redirect to the provider, and the provider's redirect back,
//! which sets the portal's session cookies.

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use kcloud_core::Error;
use kcloud_core::settings::LocalAccounts;

use axum::http::HeaderMap;

use crate::AppState;
use crate::error::{ApiError, ErrorBody};
use crate::extract::{ApiQuery, ClientAddr, constant_time_eq, cookie, portal_cookie};

/// The cookie that ties a sign-in's `state` to the browser that started it (a login
/// CSRF defence: a callback URL from someone else's sign-in is refused here).
const STATE_COOKIE: &str = "kcloud_sso";

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(providers))
        .routes(routes!(oidc_login))
        .routes(routes!(oidc_callback))
}

/// How one may sign in here.
#[derive(Debug, Serialize, ToSchema)]
pub struct Providers {
    /// `all`, `admins` (break-glass) or `off`: who may sign in with a password.
    pub local: LocalAccounts,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oidc: Option<OidcProvider>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct OidcProvider {
    /// "Sign in with {name}".
    pub name: String,
    /// Navigate here to sign in.
    pub login_url: String,
}

/// The ways to sign in (public): password, and single sign-on when configured.
#[utoipa::path(get, path = "/api/v1/auth/providers", tag = "auth",
    responses((status = 200, body = Providers)))]
async fn providers(State(s): State<AppState>) -> Json<Providers> {
    Json(Providers {
        local: s
            .oidc
            .as_ref()
            .map_or(LocalAccounts::All, |o| o.settings.local_accounts),
        oidc: s.oidc.as_ref().map(|o| OidcProvider {
            name: o.settings.display_name.clone(),
            login_url: "/api/v1/auth/oidc/login".into(),
        }),
    })
}

fn see_other(to: &str) -> Response {
    let mut resp = StatusCode::SEE_OTHER.into_response();
    if let Ok(v) = HeaderValue::from_str(to) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp.headers_mut().insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    resp
}

/// Starts single sign-on: a redirect to the provider (404 when not configured, 503
/// when the provider does not answer).
#[utoipa::path(get, path = "/api/v1/auth/oidc/login", tag = "auth",
    responses((status = 303, description = "to the provider"), (status = 404, body = ErrorBody),
        (status = 429, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn oidc_login(State(s): State<AppState>) -> Result<Response, ApiError> {
    let oidc = s
        .oidc
        .as_ref()
        .ok_or_else(|| Error::NotFound("single sign-on is not configured".into()))?;
    let (url, state) = oidc.begin().await?;
    let mut resp = see_other(&url);
    let secure = if s.secure_cookies { "; Secure" } else { "" };
    // Lax: sent on the provider's top-level redirect back; ten minutes, as the state.
    let c = format!(
        "{}={state}; Path=/; Max-Age=600; HttpOnly; SameSite=Lax{secure}",
        portal_cookie(s.secure_cookies, STATE_COOKIE)
    );
    crate::routes::session::append_cookie(&mut resp, &c);
    Ok(resp)
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct CallbackQuery {
    pub code: Option<String>,
    pub state: Option<String>,
    /// Set by the provider when the sign-in failed there.
    pub error: Option<String>,
    pub error_description: Option<String>,
}

/// Where the provider sends the browser back: the portal's session cookies and on to
/// the portal; a failure goes to the portal's sign-in page with the reason.
#[utoipa::path(get, path = "/api/v1/auth/oidc/callback", tag = "auth", params(CallbackQuery),
    responses((status = 303, description = "to the portal, signed in or with the reason"),
        (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn oidc_callback(
    State(s): State<AppState>,
    ClientAddr(client): ClientAddr,
    headers: HeaderMap,
    ApiQuery(q): ApiQuery<CallbackQuery>,
) -> Result<Response, ApiError> {
    let oidc = s
        .oidc
        .as_ref()
        .ok_or_else(|| Error::NotFound("single sign-on is not configured".into()))?;
    let result = async {
        if let Some(e) = q.error {
            return Err(Error::Unauthorized(format!(
                "the provider said: {e}{}",
                q.error_description
                    .map(|d| format!(" ({d})"))
                    .unwrap_or_default()
            )));
        }
        let (Some(code), Some(state)) = (q.code, q.state) else {
            return Err(Error::BadRequest("code and state are required".into()));
        };
        let mine = cookie(&headers, &portal_cookie(s.secure_cookies, STATE_COOKIE))
            .is_some_and(|c| constant_time_eq(c.as_bytes(), state.as_bytes()));
        if !mine {
            return Err(Error::Unauthorized(
                "this sign-in was not started in this browser; sign in again".into(),
            ));
        }
        let id = oidc.finish(&code, &state).await?;
        s.auth
            .sign_in_oidc(&id, &oidc.settings, s.servers.groups(), client)
            .await
    }
    .await;
    s.metrics.observe_login(result.is_ok());
    let mut resp = match result {
        Ok(session) => {
            let mut resp = see_other("/");
            crate::routes::session::add_session_cookies(&s, &session, &mut resp);
            resp
        }
        Err(e) => {
            tracing::info!(%client, error = %e, "single sign-on refused");
            let reason = crate::percent::encode(&e.to_string(), b"");
            see_other(&format!("/?sso_error={reason}"))
        }
    };
    let secure = if s.secure_cookies { "; Secure" } else { "" };
    let gone = format!(
        "{}=; Path=/; Max-Age=0; HttpOnly; SameSite=Lax{secure}",
        portal_cookie(s.secure_cookies, STATE_COOKIE)
    );
    crate::routes::session::append_cookie(&mut resp, &gone);
    Ok(resp)
}
