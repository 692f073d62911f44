//! Reservations of devices for future windows, and the wait queue (the use cases are
//! in `kcloud_service::reservations` and `kcloud_service::servers`).

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use kcloud_core::reservation::format_instant;
use kcloud_service::reservations::{CreateReservation, ReservationView};

use crate::AppState;
use crate::error::{ApiError, ErrorBody};
use crate::extract::{ApiJson, ApiPath, ApiQuery, Caller, ClientAddr};

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_reservations))
        .routes(routes!(create_reservation))
        .routes(routes!(delete_reservation))
        .routes(routes!(list_queue))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct Window {
    /// RFC 3339, from 1970; default: now.
    #[param(format = DateTime)]
    pub from: Option<String>,
    /// RFC 3339, after `from`; default: no end.
    #[param(format = DateTime)]
    pub to: Option<String>,
}

/// Reservations that overlap `[from, to)`, by start: yours and (to plan around them)
/// everyone else's without owner and note; admins see all of them whole.
#[utoipa::path(get, path = "/api/v1/reservations", tag = "reservations", params(Window),
    responses((status = 200, body = [ReservationView]), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("bearer" = []), ("cookie" = [])))]
async fn list_reservations(
    State(s): State<AppState>,
    caller: Caller,
    ApiQuery(w): ApiQuery<Window>,
) -> Result<Json<Vec<ReservationView>>, ApiError> {
    Ok(Json(s.reservations.list(
        &caller,
        w.from.as_deref(),
        w.to.as_deref(),
    )?))
}

/// Books `devices` (or what a `gpu_request` places) from `start` to `end`: 201, or
/// 409 naming the windows it overlaps. In the window the devices are yours: nobody
/// else is given them, another user's server on them is stopped at `start` (warned
/// 15 and 5 minutes before), and your servers use them (`"reservation": id` on create,
/// or automatically for a `gpu_request`). Policy: see `[reservations]` in the
/// settings.
#[utoipa::path(post, path = "/api/v1/users/{user}/reservations", tag = "reservations",
    request_body = CreateReservation, params(("user" = String, Path)),
    responses((status = 201, body = ReservationView), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
        (status = 413, body = ErrorBody), (status = 429, body = ErrorBody)),
    security(("bearer" = []), ("cookie" = [])))]
async fn create_reservation(
    State(s): State<AppState>,
    caller: Caller,
    ClientAddr(client): ClientAddr,
    ApiPath(user): ApiPath<String>,
    ApiJson(req): ApiJson<CreateReservation>,
) -> Result<(StatusCode, Json<ReservationView>), ApiError> {
    let r = s.reservations.create(&caller, client, &user, req).await?;
    Ok((StatusCode::CREATED, Json(ReservationView::of(&r, &caller))))
}

/// Cancels a reservation (yours; admins: anyone's).
#[utoipa::path(delete, path = "/api/v1/users/{user}/reservations/{id}", tag = "reservations",
    params(("user" = String, Path), ("id" = String, Path)),
    responses((status = 204), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = []), ("cookie" = [])))]
async fn delete_reservation(
    State(s): State<AppState>,
    caller: Caller,
    ClientAddr(client): ClientAddr,
    ApiPath((user, id)): ApiPath<(String, String)>,
) -> Result<StatusCode, ApiError> {
    s.reservations.delete(&caller, client, &user, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// One waiting request.
#[derive(Debug, Serialize, ToSchema)]
pub struct QueueItemView {
    pub owner: String,
    pub name: String,
    /// 1 is next.
    pub queue_position: Option<u32>,
    /// RFC 3339, or `unknown`.
    pub estimated_start: String,
    pub estimated_start_ms: Option<u64>,
    pub enqueued_at_ms: u64,
    pub wait_until_ms: u64,
    /// Admins: the owner's decayed GPU-hours (lower goes first).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fair_share: Option<f64>,
    /// Admins: the owner's fair-share weight.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weight: Option<f64>,
}

/// The wait queue in fair order: your entries; admins: everyone's, with the fair-share
/// scores that order it.
#[utoipa::path(get, path = "/api/v1/queue", tag = "servers",
    responses((status = 200, body = [QueueItemView]), (status = 401, body = ErrorBody)),
    security(("bearer" = []), ("cookie" = [])))]
async fn list_queue(State(s): State<AppState>, caller: Caller) -> Json<Vec<QueueItemView>> {
    Json(
        s.servers
            .queue(&caller)
            .into_iter()
            .map(|i| QueueItemView {
                owner: i.owner,
                name: i.name,
                queue_position: i.place.position,
                estimated_start: i
                    .place
                    .estimated_start_ms
                    .map_or_else(|| "unknown".to_owned(), format_instant),
                estimated_start_ms: i.place.estimated_start_ms,
                enqueued_at_ms: i.enqueued_at_ms,
                wait_until_ms: i.place.wait_until_ms,
                fair_share: i.fair_share,
                weight: i.weight,
            })
            .collect(),
    )
}
