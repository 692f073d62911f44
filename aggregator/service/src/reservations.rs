//! Reservations: booking devices for a future window, listing and cancelling them,
//! and the policy (length, lead time, weekly GPU-hours, notice to a running server,
//! the no-show rule). The calendar (`kcloud_cluster::calendar`) checks conflicts
//! atomically; the store keeps them across restarts.
//!
//! Rules, for users (admins may book for anyone, longer and further ahead, and for
//! maintenance):
//! - `start` not in the past (a minute of clock skew is allowed and moved to now),
//!   `end` after it, at least 15 minutes and at most `max_length` long, starting at
//!   most `max_lead` ahead;
//! - the devices exist, are on one node, and a GPU in MIG mode is booked through its
//!   instances;
//! - no window on one of the devices overlaps (409 names them, yours included);
//! - a device that another user's server holds now is booked only from 15 minutes
//!   ahead, so that server is warned before it is stopped at the start;
//! - the normalized GPU-hours a user has booked per calendar week (Monday 00:00 UTC)
//!   stay within `max_gpu_hours_per_week`, and at most `max_per_user` reservations
//!   that have not ended (429 beyond either).

use std::net::IpAddr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use kcloud_cluster::Cluster;
use kcloud_core::caller::Caller;
use kcloud_core::device::{DeviceRequest, GpuRequest, MAX_DEVICES_PER_REQUEST, valid_uuid};
use kcloud_core::repo::Repository;
use kcloud_core::reservation::{
    MIN_LENGTH, Reservation, format_instant, new_reservation_id, parse_instant,
    valid_reservation_id, week_start,
};
use kcloud_core::settings::Settings;
use kcloud_core::time::millis;
use kcloud_core::{Error, Result, now_ms};

use crate::audit::Audit;
use crate::groups::{Groups, check_devices};

/// The notice a running server gets before a reservation of its device starts.
pub const NOTICE_MS: u64 = 15 * 60 * 1000;
const MAX_NOTE: usize = 500;
/// Clock skew tolerated on `start`.
const SKEW_MS: u64 = 60_000;

/// A reservation to make: exact `devices`, or a `gpu_request` the aggregator places.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateReservation {
    pub devices: Option<Vec<String>>,
    #[serde(default, deserialize_with = "kcloud_core::schema::optional_object")]
    pub gpu_request: Option<GpuRequest>,
    /// RFC 3339, e.g. `2026-12-03T14:00:00Z`.
    pub start: String,
    /// RFC 3339, after `start`.
    pub end: String,
    #[serde(default)]
    pub note: String,
    /// Admins only: a maintenance window; nobody's servers run on it.
    #[serde(default)]
    pub maintenance: bool,
}

/// A reservation as the API shows it; another user's has no owner or note.
#[derive(Debug, Serialize, ToSchema)]
pub struct ReservationView {
    pub id: String,
    /// `null` when it is another user's.
    pub owner: Option<String>,
    pub node: String,
    pub devices: Vec<String>,
    pub start: String,
    pub end: String,
    pub start_ms: u64,
    pub end_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    pub maintenance: bool,
    /// The caller's own.
    pub mine: bool,
    /// A server of its owner ran on it in its window.
    pub used: bool,
}

impl ReservationView {
    pub fn of(r: &Reservation, viewer: &Caller) -> Self {
        let visible = viewer.is_admin() || viewer.name == r.owner;
        Self {
            id: r.id.clone(),
            owner: visible.then(|| r.owner.clone()),
            node: r.node.clone(),
            devices: r.devices.clone(),
            start: format_instant(r.start_ms),
            end: format_instant(r.end_ms),
            start_ms: r.start_ms,
            end_ms: r.end_ms,
            note: visible.then(|| r.note.clone()),
            maintenance: r.maintenance,
            mine: viewer.name == r.owner,
            used: r.used,
        }
    }
}

/// The reservation use cases. Share it as `Arc<Reservations>`.
pub struct Reservations {
    repo: Arc<dyn Repository>,
    audit: Audit,
    cluster: Arc<Cluster>,
    settings: Arc<Settings>,
    groups: Arc<Groups>,
}

fn bad(msg: impl Into<String>) -> Error {
    Error::BadRequest(msg.into())
}

impl Reservations {
    pub fn new(
        repo: Arc<dyn Repository>,
        cluster: Arc<Cluster>,
        settings: Arc<Settings>,
        groups: Arc<Groups>,
    ) -> Self {
        Self {
            audit: Audit::new(repo.clone()),
            repo,
            cluster,
            settings,
            groups,
        }
    }

    /// Loads the stored reservations into the calendar (at start); those that ended
    /// more than a week ago stay in the store only.
    pub async fn recover(&self) -> Result<usize> {
        let week_ago = now_ms().saturating_sub(7 * 86_400_000);
        let all: Vec<_> = self
            .repo
            .reservations()
            .await?
            .into_iter()
            .filter(|r| r.end_ms >= week_ago)
            .collect();
        let n = all.len();
        self.cluster.calendar().load(all);
        Ok(n)
    }

    /// Books devices for `owner`.
    pub async fn create(
        &self,
        caller: &Caller,
        client: IpAddr,
        owner: &str,
        req: CreateReservation,
    ) -> Result<Reservation> {
        caller.may_see_user(owner)?;
        let user = self.repo.existing_user(owner).await?;
        if user.disabled {
            return Err(Error::Conflict(format!("user {owner:?} is disabled")));
        }
        let now = now_ms();
        let admin = caller.is_admin();
        if req.maintenance && !admin {
            return Err(Error::Forbidden(
                "only admins book maintenance windows".into(),
            ));
        }
        if req.note.chars().count() > MAX_NOTE || req.note.chars().any(char::is_control) {
            return Err(bad(format!(
                "note: at most {MAX_NOTE} characters, no control characters"
            )));
        }
        let mut start = parse_instant("start", &req.start)?;
        let end = parse_instant("end", &req.end)?;
        if start + SKEW_MS < now {
            return Err(bad(format!(
                "start: {} is in the past",
                format_instant(start)
            )));
        }
        start = start.max(now);
        if end <= start {
            return Err(bad("end: must be after start"));
        }
        let policy = self.settings.reservations.policy();
        if end - start < millis(MIN_LENGTH) {
            return Err(bad("a reservation is at least 15 minutes long"));
        }
        if !admin {
            if end - start > millis(policy.max_length) {
                return Err(bad(format!(
                    "a reservation is at most {} long",
                    humantime::format_duration(policy.max_length)
                )));
            }
            if start - now > millis(policy.max_lead) {
                return Err(bad(format!(
                    "a reservation starts at most {} ahead",
                    humantime::format_duration(policy.max_lead)
                )));
            }
        }
        let entitled = self.groups.entitlements(owner, user.role).await?;
        let (node, devices) = match (req.devices, req.gpu_request) {
            (Some(_), Some(_)) => {
                return Err(bad("give either `devices` or `gpu_request`, not both"));
            }
            (None, None) => return Err(bad("give `devices` or a `gpu_request`")),
            (Some(d), None) => {
                let node = self.check_devices(&d)?;
                check_devices(
                    &self.cluster,
                    &entitled,
                    Some(&DeviceRequest::Exact(d.clone())),
                )?;
                (node, d)
            }
            (None, Some(g)) => {
                let req = g.into_request()?;
                check_devices(&self.cluster, &entitled, Some(&req))?;
                if let DeviceRequest::Gpus { count, .. } = &req
                    && !(1..=MAX_DEVICES_PER_REQUEST).contains(count)
                {
                    return Err(bad(format!(
                        "gpu_request.count: must be 1 to {MAX_DEVICES_PER_REQUEST}"
                    )));
                }
                self.cluster.could_ever_fit(&req)?;
                self.cluster
                    .pick_for_window(&req, start, end)
                    .ok_or_else(|| {
                        Error::Conflict(format!(
                            "no node has devices for this request free of reservations from {} \
                             to {}",
                            format_instant(start),
                            format_instant(end)
                        ))
                    })?
            }
        };
        if !admin {
            for d in &devices {
                if let Some(h) = self.cluster.ledger().holder(d)
                    && h.user != owner
                    && start < now + NOTICE_MS
                {
                    return Err(Error::Conflict(format!(
                        "device {d} is in use by another user's server, which gets 15 minutes' \
                         notice: book it from {} on, or choose another device",
                        format_instant(now + NOTICE_MS)
                    )));
                }
            }
            if let Some(max) = policy.max_gpu_hours_per_week {
                self.check_budget(owner, &devices, start, end, max)?;
            }
            let max = self.settings.reservations.max_per_user;
            let have = self
                .cluster
                .calendar()
                .between(now, u64::MAX)
                .iter()
                .filter(|r| r.owner == owner && !r.maintenance)
                .count();
            if have >= max as usize {
                return Err(Error::QuotaExceeded(format!(
                    "reservation quota exceeded: {owner} has {have} of {max} reservations that                      have not ended"
                )));
            }
        }
        let r = Reservation {
            id: new_reservation_id(),
            owner: owner.to_owned(),
            node,
            devices,
            start_ms: start,
            end_ms: end,
            note: req.note,
            maintenance: req.maintenance,
            created_at_ms: now,
            created_by: caller.name.clone(),
            used: false,
        };
        self.cluster.calendar().insert(r.clone()).map_err(|c| {
            let windows: Vec<String> = c
                .iter()
                .map(|o| {
                    let whose = if o.owner == owner {
                        "yours"
                    } else if o.maintenance {
                        "maintenance"
                    } else {
                        "another user's"
                    };
                    format!(
                        "{} ({whose}, {} to {}, {})",
                        o.id,
                        format_instant(o.start_ms),
                        format_instant(o.end_ms),
                        o.devices.join(",")
                    )
                })
                .collect();
            Error::Conflict(format!(
                "the window overlaps existing reservations: {}",
                windows.join("; ")
            ))
        })?;
        if let Err(e) = self.repo.insert_reservation(r.clone()).await {
            self.cluster.calendar().remove(&r.id);
            return Err(e);
        }
        self.audit
            .record(
                caller,
                client,
                "reservation_create",
                format!("{owner}/{}", r.id),
                format!(
                    "devices=[{}] start={} end={} maintenance={}",
                    r.devices.join(","),
                    format_instant(r.start_ms),
                    format_instant(r.end_ms),
                    r.maintenance
                ),
            )
            .await?;
        Ok(r)
    }

    /// The node of exact devices, checked.
    fn check_devices(&self, devices: &[String]) -> Result<String> {
        if devices.is_empty() || devices.len() > MAX_DEVICES_PER_REQUEST as usize {
            return Err(bad(format!(
                "devices: 1 to {MAX_DEVICES_PER_REQUEST} UUIDs"
            )));
        }
        let mut node: Option<String> = None;
        for (i, u) in devices.iter().enumerate() {
            if !valid_uuid(u) {
                return Err(bad(format!(
                    "devices: {u:?} is not a GPU-... or MIG-... UUID"
                )));
            }
            if devices[..i].contains(u) {
                return Err(bad(format!("devices: {u} is listed twice")));
            }
            let f = self
                .cluster
                .describe(u)
                .ok_or_else(|| Error::NotFound(format!("devices: {u} is not a known device")))?;
            if f.mig_parent {
                return Err(bad(format!(
                    "devices: GPU {u} is in MIG mode; book its MIG instances"
                )));
            }
            match &node {
                Some(n) if *n != f.node => {
                    return Err(bad(
                        "devices: all devices of a reservation must be on one node",
                    ));
                }
                Some(_) => {}
                None => node = Some(f.node),
            }
        }
        node.ok_or_else(|| bad("devices: empty"))
    }

    fn check_budget(
        &self,
        owner: &str,
        devices: &[String],
        start: u64,
        end: u64,
        max: f64,
    ) -> Result<()> {
        const WEEK: u64 = 7 * 86_400_000;
        let mine: Vec<_> = self
            .cluster
            .calendar()
            .between(week_start(start), week_start(end) + WEEK)
            .into_iter()
            .filter(|r| r.owner == owner && !r.maintenance)
            .map(|r| (r.start_ms, r.end_ms, self.cluster.weight(&r.devices)))
            .collect();
        let weight = self.cluster.weight(devices);
        let mut week = week_start(start);
        while week < end {
            let (from, to) = (week, week + WEEK);
            let hours = |s: u64, e: u64, w: f64| {
                let (s, e) = (s.max(from), e.min(to));
                if e > s {
                    w * (e - s) as f64 / 3.6e6
                } else {
                    0.0
                }
            };
            let booked: f64 = mine.iter().map(|&(s, e, w)| hours(s, e, w)).sum();
            let new = hours(start, end, weight);
            if booked + new > max + 1e-9 {
                return Err(Error::QuotaExceeded(format!(
                    "reservation budget exceeded: {owner} has {booked:.1} of {max} GPU-hours \
                     booked in the week of {} and this asks for {new:.1} more",
                    format_instant(from)
                )));
            }
            week = to;
        }
        Ok(())
    }

    /// Reservations overlapping `[from, to)` (default: from now on): all of them for an
    /// admin; for a user, all windows (to plan around), others' without owner and note.
    pub fn list(
        &self,
        caller: &Caller,
        from: Option<&str>,
        to: Option<&str>,
    ) -> Result<Vec<ReservationView>> {
        let from = match from {
            Some(s) => parse_instant("from", s)?,
            None => now_ms(),
        };
        let to = match to {
            Some(s) => parse_instant("to", s)?,
            None => u64::MAX,
        };
        if to <= from {
            return Err(bad("to: must be after from"));
        }
        Ok(self
            .cluster
            .calendar()
            .between(from, to)
            .iter()
            .map(|r| ReservationView::of(r, caller))
            .collect())
    }

    /// Cancels a reservation: its owner or an admin; anyone else's (or none) is 404.
    pub async fn delete(
        &self,
        caller: &Caller,
        client: IpAddr,
        owner: &str,
        id: &str,
    ) -> Result<()> {
        let not_found = || Error::NotFound(format!("no reservation {owner}/{id}"));
        caller.may_see_user(owner).map_err(|_| not_found())?;
        if !valid_reservation_id(id) {
            return Err(not_found());
        }
        let r = self
            .cluster
            .calendar()
            .get(id)
            .filter(|r| r.owner == owner)
            .ok_or_else(not_found)?;
        self.repo.delete_reservation(id).await?;
        self.cluster.calendar().remove(id);
        self.audit
            .record(
                caller,
                client,
                "reservation_delete",
                format!("{owner}/{id}"),
                format!("devices=[{}]", r.devices.join(",")),
            )
            .await
    }

    /// Releases reservations nobody used `no_show_after` past their start; returns them.
    pub async fn release_no_shows(&self, now: u64) -> Result<Vec<Arc<Reservation>>> {
        let Some(after) = self.settings.reservations.policy().no_show_after else {
            return Ok(Vec::new());
        };
        let after = millis(after);
        let gone: Vec<_> = self
            .cluster
            .calendar()
            .between(now.saturating_sub(365 * 86_400_000), now + 1)
            .into_iter()
            .filter(|r| !r.used && !r.maintenance && r.active_at(now) && r.start_ms + after <= now)
            .collect();
        for r in &gone {
            self.repo.delete_reservation(&r.id).await?;
            self.cluster.calendar().remove(&r.id);
            self.audit
                .record_system(
                    "reservation_no_show",
                    format!("{}/{}", r.owner, r.id),
                    format!(
                        "unused {} s after its start; released",
                        (now - r.start_ms) / 1000
                    ),
                )
                .await?;
        }
        Ok(gone)
    }
}
