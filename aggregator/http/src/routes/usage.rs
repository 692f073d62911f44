//! Usage reports (the use case is `kcloud_service::usage`).

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use utoipa::IntoParams;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use kcloud_core::usage::{EfficiencyRow, GroupBy, UsageRow};

use crate::AppState;
use crate::error::{ApiError, ErrorBody};
use crate::extract::{ApiQuery, Caller};

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(usage))
        .routes(routes!(efficiency))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct UsageQuery {
    /// First day included: `YYYY-MM-DD` (or an RFC 3339 time, rounded down to its
    /// day), from 1970; default: the first of this month.
    #[param(format = Date)]
    pub from: Option<String>,
    /// Last day included (default: today): not before `from`, at most 400 days after.
    #[param(format = Date)]
    pub to: Option<String>,
    /// `user` (default), `model`, `node` or `day`.
    #[param(inline)]
    pub group_by: Option<GroupBy>,
    /// Admins: one user's usage.
    pub user: Option<String>,
    /// `csv` for CSV whatever `Accept` says (a link in a browser); default JSON, or
    /// CSV with `Accept: text/csv`.
    #[param(inline)]
    pub format: Option<Format>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Json,
    Csv,
}

/// Normalized GPU-hours (a whole GPU counts 1 per hour, a MIG instance its compute
/// slices over its GPU's) per UTC day, summed over the window and grouped: yours, or
/// (admins) everyone's. `Accept: text/csv` answers CSV (`key,gpu_hours,recovered`).
#[utoipa::path(get, path = "/api/v1/usage", tag = "usage", params(UsageQuery),
    responses((status = 200, content((Vec<UsageRow> = "application/json"), (String = "text/csv"))),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = []), ("cookie" = [])))]
async fn usage(
    State(s): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    ApiQuery(q): ApiQuery<UsageQuery>,
) -> Result<Response, ApiError> {
    let format = q.format;
    let rows = s
        .servers
        .usage()
        .report(
            &caller,
            q.from.as_deref(),
            q.to.as_deref(),
            q.group_by.unwrap_or(GroupBy::User),
            q.user,
        )
        .await?;
    if !wants_csv(format, &headers) {
        return Ok(Json(rows).into_response());
    }
    let mut out = String::from("key,gpu_hours,recovered\r\n");
    for r in rows {
        out.push_str(&format!(
            "{},{:.6},{}\r\n",
            csv_field(&r.key),
            r.gpu_hours,
            r.recovered
        ));
    }
    Ok(csv_response("kcloud-usage.csv", out))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct EfficiencyQuery {
    /// First day included: `YYYY-MM-DD` (or an RFC 3339 time, rounded down to its
    /// day), from 1970; default: the first of this month.
    #[param(format = Date)]
    pub from: Option<String>,
    /// Last day included (default: today): not before `from`, at most 400 days after.
    #[param(format = Date)]
    pub to: Option<String>,
    /// Admins: one user's.
    pub user: Option<String>,
    /// `csv` for CSV whatever `Accept` says.
    #[param(inline)]
    pub format: Option<Format>,
}

/// The waste report: per user, normalized GPU-hours held, those with a utilization
/// reading (`measured`), used (weighted by the busy share), idle (under the idle
/// threshold), and idle GPU-hours that ended in a reclaim, with the number of servers
/// reclaimed. Yours, or (admins) everyone's. `Accept: text/csv` answers CSV.
#[utoipa::path(get, path = "/api/v1/usage/efficiency", tag = "usage", params(EfficiencyQuery),
    responses((status = 200, content((Vec<EfficiencyRow> = "application/json"), (String = "text/csv"))),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = []), ("cookie" = [])))]
async fn efficiency(
    State(s): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    ApiQuery(q): ApiQuery<EfficiencyQuery>,
) -> Result<Response, ApiError> {
    let rows = s
        .servers
        .usage()
        .efficiency(&caller, q.from.as_deref(), q.to.as_deref(), q.user)
        .await?;
    if !wants_csv(q.format, &headers) {
        return Ok(Json(rows).into_response());
    }
    let mut out = String::from(
        "user,gpu_hours,measured_gpu_hours,used_gpu_hours,idle_gpu_hours,\
         reclaimed_gpu_hours,reclaimed_servers\r\n",
    );
    for r in rows {
        let e = &r.efficiency;
        out.push_str(&format!(
            "{},{:.6},{:.6},{:.6},{:.6},{:.6},{}\r\n",
            csv_field(&r.user),
            r.gpu_hours,
            e.measured_gpu_hours,
            e.used_gpu_hours,
            e.idle_gpu_hours,
            e.reclaimed_gpu_hours,
            e.reclaimed_servers
        ));
    }
    Ok(csv_response("kcloud-efficiency.csv", out))
}

fn wants_csv(format: Option<Format>, headers: &HeaderMap) -> bool {
    match format {
        Some(f) => f == Format::Csv,
        None => headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.contains("text/csv")),
    }
}

fn csv_response(filename: &'static str, body: String) -> Response {
    let disposition = format!("attachment; filename=\"{filename}\"");
    (
        [
            (header::CONTENT_TYPE, "text/csv; charset=utf-8".to_owned()),
            (header::CONTENT_DISPOSITION, disposition),
        ],
        body,
    )
        .into_response()
}

/// RFC 4180 quoting, and no formula injection when opened in a spreadsheet.
fn csv_field(s: &str) -> String {
    let s = if s.starts_with(['=', '+', '-', '@']) {
        format!("'{s}")
    } else {
        s.to_owned()
    };
    if s.contains([',', '"', '\r', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s
    }
}
