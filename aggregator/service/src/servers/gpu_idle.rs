//! Idle-GPU reclaim: a running server whose every device stayed under
//! `[culling] gpu_idle_threshold` for `gpu_idle_for` is warned `gpu_idle_warn` before,
//! then stopped like a cull (devices freed, volumes kept), reason `gpu_idle`.
//!
//! The rule, stated once: each scheduler round reads every held device's busy share
//! from its agent's last report. A server is idle from the first round in which all its
//! devices read under the threshold, and stays idle while every later round agrees. A
//! device without a reading (no GPM on a MIG instance, a stale or lost node, an agent
//! that reports none) is *not* idle: unknown never counts against the owner. Any busy
//! reading, or the owner answering "keep" (`gpu_idle_keeps_per_day` times a UTC day),
//! starts the window over. Admin-exempt servers are never reclaimed. The window lives
//! in memory: a restart of the aggregator starts every window over (later, never
//! earlier).

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;

use kcloud_core::caller::Caller;
use kcloud_core::reservation::format_instant;
use kcloud_core::server::{Server, ServerStatus};
use kcloud_core::settings::GpuIdle;
use kcloud_core::time::millis;
use kcloud_core::usage::{HeldReading, day_of};
use kcloud_core::{Error, Result, now_ms};

use super::Servers;
use super::schedule::EndsAt;
use crate::notify::Notice;

/// What the reclaim remembers between rounds.
#[derive(Default)]
pub(crate) struct IdleBook {
    /// Server id → since when all its devices have read idle.
    since: HashMap<String, u64>,
    /// Server ids warned in their current window.
    warned: HashSet<String>,
    /// (user, UTC day) → "keep" answers given.
    keeps: HashMap<(String, u64), u32>,
    /// When the last round ran: rounds follow agent pushes, which on a large fleet
    /// come many times a second; reading every held device once a second is enough.
    last_round_ms: u64,
}

/// Rounds are at least this far apart.
const MIN_ROUND_GAP_MS: u64 = 1_000;

/// Where reclaim is off, the waste report still calls a device idle under this.
const DEFAULT_IDLE_BELOW: f64 = 0.05;

/// A server's idle window: when it started and when the server will be stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdleWindow {
    pub since_ms: u64,
    pub stop_at_ms: u64,
}

impl Servers {
    fn gpu_idle_settings(&self) -> Option<GpuIdle> {
        self.settings.culling.gpu_idle().ok().flatten()
    }

    fn idle_book(&self) -> std::sync::MutexGuard<'_, IdleBook> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Under this busy share a device counts as idle (reports and reclaim alike).
    pub(crate) fn idle_below(&self) -> f64 {
        self.gpu_idle_settings()
            .map_or(DEFAULT_IDLE_BELOW, |c| c.threshold)
    }

    /// Every held device's reading now, with its holder and weight: what the usage
    /// ledger samples.
    pub(crate) fn held_readings(&self, now: u64) -> Vec<HeldReading> {
        let mut out = Vec::new();
        for s in self.provisioner.list(None) {
            if !s.status.holds_devices() || s.devices.is_empty() {
                continue;
            }
            let busy = self.cluster.inventory().utilization(&s.devices, now);
            for (d, busy) in s.devices.iter().zip(busy) {
                out.push(HeldReading {
                    user: s.owner.clone(),
                    weight: self.cluster.describe(d).map_or(1.0, |f| f.weight),
                    busy,
                });
            }
        }
        out
    }

    /// Servers in an idle window now (for `/metrics`).
    pub fn gpu_idle_count(&self) -> usize {
        self.idle_book().since.len()
    }

    /// The idle window of `server`, if reclaim is on and all its devices read idle.
    pub fn idle_window(&self, server: &Server) -> Option<IdleWindow> {
        let cfg = self.gpu_idle_settings()?;
        let since = *self.idle_book().since.get(&server.id)?;
        Some(IdleWindow {
            since_ms: since,
            stop_at_ms: since.saturating_add(millis(cfg.idle_for)),
        })
    }

    /// The stop ahead of an idle server, once it is in its warning time.
    pub(crate) fn idle_end(&self, server: &Server, now: u64) -> Option<EndsAt> {
        let cfg = self.gpu_idle_settings()?;
        let w = self.idle_window(server)?;
        if now.saturating_add(millis(cfg.warn_before)) < w.stop_at_ms {
            return None;
        }
        Some(EndsAt {
            at_ms: w.stop_at_ms,
            because: format!(
                "its GPUs have been idle (under {} %) since {}; answer keep to keep it",
                cfg.threshold * 100.0,
                format_instant(w.since_ms)
            ),
            reason: "gpu_idle",
        })
    }

    /// One round: updates every held server's window from its devices' readings, warns
    /// those whose stop is near and stops those whose time has come. Returns how many it
    /// stopped.
    pub async fn reclaim_idle_gpus(&self, now: u64) -> usize {
        let Some(cfg) = self.gpu_idle_settings() else {
            return 0;
        };
        let mut due = Vec::new();
        let mut warn = Vec::new();
        {
            let mut book = self.idle_book();
            if now.saturating_sub(book.last_round_ms) < MIN_ROUND_GAP_MS {
                return 0;
            }
            book.last_round_ms = now;
            drop(book);
            let servers = self.provisioner.list(None);
            let mut book = self.idle_book();
            let live: HashSet<&str> = servers.iter().map(|s| s.id.as_str()).collect();
            book.since.retain(|id, _| live.contains(id.as_str()));
            book.warned.retain(|id| live.contains(id.as_str()));
            let today = day_of(now);
            book.keeps.retain(|(_, day), _| *day == today);
            for s in &servers {
                // A server still starting is not idle: its program has not begun.
                if s.status != ServerStatus::Running || s.devices.is_empty() || s.cull_exempt {
                    book.since.remove(&s.id);
                    continue;
                }
                let readings = self.cluster.inventory().utilization(&s.devices, now);
                let idle = readings
                    .iter()
                    .all(|r| r.is_some_and(|u| u < cfg.threshold));
                if !idle {
                    book.since.remove(&s.id);
                    book.warned.remove(&s.id);
                    continue;
                }
                let since = *book.since.entry(s.id.clone()).or_insert(now);
                let stop_at = since.saturating_add(millis(cfg.idle_for));
                if now >= stop_at {
                    due.push((s.clone(), since));
                } else if now.saturating_add(millis(cfg.warn_before)) >= stop_at
                    && book.warned.insert(s.id.clone())
                {
                    warn.push((s.clone(), stop_at));
                }
            }
        }
        for (s, stop_at) in &warn {
            self.notifier.send(Notice {
                text: format!(
                    "Your server {} will be stopped at {} ({} min from now): its GPUs have \
                     been idle (under {} %). Answer keep in the portal to keep it; its \
                     volumes are kept either way.",
                    s.name,
                    format_instant(*stop_at),
                    stop_at.saturating_sub(now).div_ceil(60_000),
                    cfg.threshold * 100.0
                ),
                kind: "server_will_stop",
                user: s.owner.clone(),
                server: Some(s.name.clone()),
                reservation: None,
            });
        }
        if !warn.is_empty() {
            // Views (and so the event stream) now carry the scheduled stop.
            self.queue_changed();
        }
        let mut stopped = 0;
        for (s, since) in due {
            match self.stop_idle(&s, since, now).await {
                Ok(true) => stopped += 1,
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(owner = %s.owner, server = %s.name, error = %e, "could not reclaim an idle server");
                }
            }
        }
        stopped
    }

    async fn stop_idle(&self, seen: &Server, since: u64, now: u64) -> Result<bool> {
        let (user, name) = (&seen.owner, &seen.name);
        let weight = self.cluster.weight(&seen.devices);
        // A keep, a busy reading, an exemption or a delete may have come while waiting
        // for the lock.
        let Some(released) = self
            .stop_unless_changed(seen, |now| {
                !now.cull_exempt && self.idle_book().since.get(&seen.id) == Some(&since)
            })
            .await?
        else {
            return Ok(false);
        };
        {
            let mut book = self.idle_book();
            book.since.remove(&seen.id);
            book.warned.remove(&seen.id);
        }
        let idle_ms = now.saturating_sub(since);
        self.usage.reclaimed(user, weight, idle_ms, now).await;
        tracing::info!(owner = %user, server = %name, idle_s = idle_ms / 1000, released = released.len(), "reclaimed a server with idle GPUs");
        self.audit
            .record_system(
                "server_cull",
                format!("{user}/{name}"),
                format!(
                    "reason=gpu_idle; idle {} s; released=[{}]",
                    idle_ms / 1000,
                    released.join(",")
                ),
            )
            .await?;
        self.notifier.send(Notice {
            text: format!(
                "Your server {name} was stopped: its GPUs were idle for {} min. Its volumes \
                 are kept.",
                idle_ms / 60_000
            ),
            kind: "server_stopped",
            user: user.clone(),
            server: Some(name.clone()),
            reservation: None,
        });
        Ok(true)
    }

    /// The owner's answer to an idle warning: the window starts over. At most
    /// `gpu_idle_keeps_per_day` times a UTC day per user (429 after).
    pub async fn keep(
        &self,
        caller: &Caller,
        client: IpAddr,
        user: &str,
        name: &str,
    ) -> Result<Server> {
        let server = self.get(caller, user, name)?;
        if caller.name != user {
            return Err(Error::Forbidden(
                "only the owner answers keep for a server".into(),
            ));
        }
        let Some(cfg) = self.gpu_idle_settings() else {
            return Err(Error::Conflict(
                "idle-GPU reclaim is off on this deployment: there is nothing to keep".into(),
            ));
        };
        let now = now_ms();
        let used = {
            let mut book = self.idle_book();
            if !book.since.contains_key(&server.id) {
                return Err(Error::Conflict(format!(
                    "server {name} is not idle: there is nothing to keep"
                )));
            }
            let used = book
                .keeps
                .entry((user.to_owned(), day_of(now)))
                .or_default();
            if *used >= cfg.keeps_per_day {
                return Err(Error::QuotaExceeded(format!(
                    "you answered keep {} times today, the most allowed: use the GPUs or \
                     stop the server (volumes are kept)",
                    cfg.keeps_per_day
                )));
            }
            *used += 1;
            let used = *used;
            book.since.insert(server.id.clone(), now);
            book.warned.remove(&server.id);
            used
        };
        self.queue_changed();
        self.audit
            .record(
                caller,
                client,
                "server_keep",
                format!("{user}/{name}"),
                format!("keep {used} of {} today", cfg.keeps_per_day),
            )
            .await?;
        Ok(server)
    }
}
