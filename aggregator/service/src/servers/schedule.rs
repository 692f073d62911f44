//! Servers and time: which devices a request may use given the reservations, when a
//! running server must give its devices back, the warnings before, the stop at the
//! start of someone else's reservation, and the loop that drives the queue.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use kcloud_cluster::plan::KnownEnds;
use kcloud_core::device::DeviceRequest;
use kcloud_core::reservation::format_instant;
use kcloud_core::server::Server;
use kcloud_core::time::millis;
use kcloud_core::{Error, Result, now_ms};

use super::{Plan, Servers};
use crate::notify::Notice;
use crate::reservations::Reservations;

/// Warnings before a server is stopped for a reservation, in minutes.
const WARN_AT_MIN: [u64; 2] = [15, 5];
/// How often the scheduler looks even when nothing woke it (deadlines, warnings).
const TICK: Duration = Duration::from_secs(10);
/// Rounds are at least this far apart (every agent push wakes the loop).
const MIN_GAP: Duration = Duration::from_millis(200);

/// When a running server must give its devices back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndsAt {
    pub at_ms: u64,
    /// Why, without naming another user.
    pub because: String,
    /// `reservation` or `gpu_idle` (the owner can answer keep).
    pub reason: &'static str,
}

impl Servers {
    /// The device request of `plan` for `user` now, and the reservation of theirs it
    /// uses: `reservation` given: picked among its devices (its window must hold
    /// now); a placement request: inside an active reservation of theirs when one
    /// fits, else anywhere.
    pub(crate) fn device_request(
        &self,
        user: &str,
        plan: &Plan,
        now: u64,
    ) -> Result<Option<(DeviceRequest, Option<String>)>> {
        let calendar = self.cluster.calendar();
        if let Some(id) = &plan.reservation {
            let r = calendar
                .get(id)
                .filter(|r| r.owner == user && !r.maintenance)
                .ok_or_else(|| Error::NotFound(format!("no reservation {id}")))?;
            if !r.active_at(now) {
                return Err(Error::Conflict(format!(
                    "reservation {id} is for {} to {}; it does not hold now",
                    format_instant(r.start_ms),
                    format_instant(r.end_ms)
                )));
            }
            let req = plan
                .devices
                .clone()
                .unwrap_or_else(|| DeviceRequest::Exact(r.devices.clone()));
            if let DeviceRequest::Exact(ds) = &req
                && let Some(d) = ds.iter().find(|d| !r.devices.contains(d))
            {
                return Err(Error::BadRequest(format!(
                    "device {d} is not part of reservation {id}"
                )));
            }
            let picked = self.cluster.pick_among(&r.devices, &req).ok_or_else(|| {
                Error::Conflict(format!(
                    "reservation {id} has no free devices for this request (are they used by \
                     another of your servers?)"
                ))
            })?;
            return Ok(Some((DeviceRequest::Exact(picked), Some(id.clone()))));
        }
        let Some(req) = &plan.devices else {
            return Ok(None);
        };
        if let DeviceRequest::Gpus { .. } | DeviceRequest::Mig { .. } = req {
            for r in calendar.active_of(user, now) {
                if let Some(picked) = self.cluster.pick_among(&r.devices, req) {
                    return Ok(Some((DeviceRequest::Exact(picked), Some(r.id.clone()))));
                }
            }
        }
        let booked = match req {
            DeviceRequest::Exact(ds) => self.own_reservation_of(user, ds, now),
            _ => None,
        };
        Ok(Some((req.clone(), booked)))
    }

    /// An active reservation of `user` that holds one of `devices`.
    pub(crate) fn own_reservation_of(
        &self,
        user: &str,
        devices: &[String],
        now: u64,
    ) -> Option<String> {
        devices.iter().find_map(|d| {
            self.cluster
                .calendar()
                .active_on(d, now)
                .filter(|r| r.owner == user)
                .map(|r| r.id.clone())
        })
    }

    pub(crate) async fn mark_reservation_used(&self, id: &str) -> Result<()> {
        if self.cluster.calendar().mark_used(id) {
            self.repo.mark_reservation_used(id).await?;
        }
        Ok(())
    }

    /// When `server` must give its devices back: for a reservation, or (once in its
    /// warning time) because its GPUs are idle; the earlier. `None` if neither.
    pub fn ends_at(&self, server: &Server) -> Option<EndsAt> {
        if !server.status.holds_devices() || server.devices.is_empty() {
            return None;
        }
        let now = now_ms();
        let reserved = self.reservation_end(server, now);
        let idle = self.idle_end(server, now);
        match (reserved, idle) {
            (Some(r), Some(i)) => Some(if i.at_ms < r.at_ms { i } else { r }),
            (r, i) => r.or(i),
        }
    }

    fn reservation_end(&self, server: &Server, now: u64) -> Option<EndsAt> {
        let r = self
            .cluster
            .calendar()
            .must_end(&server.owner, &server.devices, now)?;
        Some(EndsAt {
            at_ms: r.start_ms,
            because: if r.maintenance {
                format!("maintenance reservation {} of its devices", r.id)
            } else {
                format!("reservation {} of its devices by another user", r.id)
            },
            reason: "reservation",
        })
    }

    /// Devices whose release time is known: held by a server that must stop for a
    /// reservation or will be culled if it stays idle, or in a reservation that holds
    /// now (free again at its end).
    pub(crate) fn known_ends(&self, now: u64) -> KnownEnds {
        let cull = self
            .settings
            .culling
            .schedule()
            .ok()
            .flatten()
            .map(|(idle, _)| millis(idle));
        let mut out = KnownEnds::default();
        for s in self.provisioner.list(None) {
            let Some(node) = s.node.as_deref() else {
                continue;
            };
            if !s.status.holds_devices() || s.devices.is_empty() {
                continue;
            }
            let reserved = self
                .cluster
                .calendar()
                .must_end(&s.owner, &s.devices, now)
                .map(|r| r.start_ms);
            let culled = cull
                .filter(|_| !s.cull_exempt)
                .map(|idle| s.last_activity_ms.saturating_add(idle));
            let idle_gpus = self.idle_window(&s).map(|w| w.stop_at_ms);
            let end = [reserved, culled, idle_gpus].into_iter().flatten().min();
            if let Some(end) = end {
                for d in &s.devices {
                    out.insert(node, d, end.max(now));
                }
            }
        }
        for r in self.cluster.calendar().between(now, now + 1) {
            for d in &r.devices {
                if !out.contains(d) && self.cluster.ledger().holder(d).is_none() {
                    out.insert(&r.node, d, r.end_ms);
                }
            }
        }
        out
    }

    /// Warns servers that must soon give their devices back for a reservation, stops
    /// those whose time has come (volumes kept), marks reservations used and tells
    /// owners when their reservation starts. Returns how many servers it stopped.
    pub async fn enforce_reservations(&self, now: u64) -> usize {
        let mut stopped = 0;
        for s in self.provisioner.list(None) {
            if !s.status.holds_devices() || s.devices.is_empty() {
                continue;
            }
            if let Some(id) = self.own_reservation_of(&s.owner, &s.devices, now)
                && let Err(e) = self.mark_reservation_used(&id).await
            {
                tracing::warn!(error = %e, "could not mark a reservation used");
            }
            let Some(end) = self.reservation_end(&s, now) else {
                continue;
            };
            if end.at_ms <= now {
                match self.stop_for_reservation(&s, &end).await {
                    Ok(true) => stopped += 1,
                    Ok(false) => {}
                    Err(e) => {
                        tracing::error!(error = %e, owner = %s.owner, server = %s.name, "could not stop a server for a reservation")
                    }
                }
                continue;
            }
            let left = end.at_ms - now;
            let Some(stage) = WARN_AT_MIN
                .iter()
                .filter(|m| left <= *m * 60_000)
                .min()
                .copied()
            else {
                continue;
            };
            let first = {
                let mut warned = self.warned.lock().unwrap_or_else(|p| p.into_inner());
                let key = |m: u64| (s.id.clone(), end.because.clone(), m);
                let new = !warned.contains(&key(stage));
                // A later stage covers the earlier ones (no double warning).
                for m in WARN_AT_MIN.iter().filter(|m| **m >= stage) {
                    warned.insert(key(*m));
                }
                new
            };
            if first {
                self.notifier.send(Notice {
                    text: format!(
                        "Your server {} will be stopped at {} ({} min from now): its devices are \
                         reserved then ({}). Its volumes are kept.",
                        s.name,
                        format_instant(end.at_ms),
                        left.div_ceil(60_000),
                        end.because
                    ),
                    kind: "server_will_stop",
                    user: s.owner.clone(),
                    server: Some(s.name.clone()),
                    reservation: None,
                });
                self.queue_changed();
            }
        }
        self.announce_reservation_starts(now);
        stopped
    }

    fn announce_reservation_starts(&self, now: u64) {
        for r in self.cluster.calendar().between(now, now + 1) {
            if r.maintenance || now - r.start_ms > 10 * 60_000 {
                continue;
            }
            let new = self
                .warned
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert((r.id.clone(), "start".into(), 0));
            if new {
                self.notifier.send(Notice {
                    text: format!(
                        "Your reservation {} of {} on {} starts now (until {}).",
                        r.id,
                        r.devices.join(", "),
                        r.node,
                        format_instant(r.end_ms)
                    ),
                    kind: "reservation_started",
                    user: r.owner.clone(),
                    server: None,
                    reservation: Some(r.id.clone()),
                });
            }
        }
    }

    async fn stop_for_reservation(&self, seen: &Server, end: &EndsAt) -> Result<bool> {
        let (user, name) = (&seen.owner, &seen.name);
        let Some(released) = self.stop_unless_changed(seen, |_| true).await? else {
            return Ok(false);
        };
        tracing::info!(owner = %user, server = %name, because = %end.because, "stopped a server for a reservation");
        self.audit
            .record_system(
                "server_stop_reservation",
                format!("{user}/{name}"),
                format!("{}; released=[{}]", end.because, released.join(",")),
            )
            .await?;
        self.notifier.send(Notice {
            text: format!(
                "Your server {name} was stopped: its devices are reserved from now ({}). Its \
                 volumes are kept.",
                end.because
            ),
            kind: "server_stopped",
            user: user.clone(),
            server: Some(name.clone()),
            reservation: None,
        });
        Ok(true)
    }

    pub(crate) fn queue_changed(&self) {
        self.queue.changed_notify();
    }

    /// Drives the queue and the reservations until `shutdown`: a round after every
    /// change of holdings, reservations or nodes (at most every 200 ms), and every 10 s
    /// for deadlines, warnings, stops and no-shows.
    pub async fn run_scheduler(
        self: Arc<Self>,
        reservations: Arc<Reservations>,
        shutdown: CancellationToken,
    ) {
        let mut held = self.cluster.allocation_changes();
        let mut booked = self.cluster.calendar().subscribe();
        let mut nodes = self.cluster.inventory_changes();
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let full = tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => true,
                r = held.changed() => { if r.is_err() { return } false }
                r = booked.changed() => { if r.is_err() { return } self.queue_changed(); false }
                r = nodes.changed() => { if r.is_err() { return } false }
            };
            let now = now_ms();
            if full {
                self.usage.alive().await;
                // Ended a week ago: history for the store, not for every claim.
                self.cluster
                    .calendar()
                    .forget_ended(now.saturating_sub(7 * 86_400_000));
                match reservations.release_no_shows(now).await {
                    Ok(gone) => {
                        for r in gone {
                            self.notifier.send(Notice {
                                text: format!(
                                    "Your reservation {} was released: no server used it after \
                                     its start.",
                                    r.id
                                ),
                                kind: "reservation_released",
                                user: r.owner.clone(),
                                server: None,
                                reservation: Some(r.id.clone()),
                            });
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "no-show check failed"),
                }
                self.enforce_reservations(now).await;
                self.usage
                    .sample(&self.held_readings(now), self.idle_below(), now)
                    .await;
            }
            // Every round: a push may have brought the readings that end a window.
            self.reclaim_idle_gpus(now).await;
            // Estimates (a walk over the nodes with known ends) on the periodic round
            // only; a release is answered by a round that decides who starts.
            self.dispatch_with(full).await;
            tokio::time::sleep(MIN_GAP).await;
        }
    }
}
