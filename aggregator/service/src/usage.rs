//! Usage accounting: the intervals servers held devices, recorded as they start and
//! end (see `kcloud_core::usage` for the rules), and the reports.

use std::collections::HashSet;
use std::sync::Arc;

use kcloud_cluster::Cluster;
use kcloud_core::caller::Caller;
use kcloud_core::repo::Repository;
use kcloud_core::server::Server;
use kcloud_core::usage::{
    Efficiency, EfficiencyRow, GroupBy, HeldReading, UsageInterval, UsageRow, UsageTotal, day_of,
    parse_day,
};
use kcloud_core::validate::validate_user_name;
use kcloud_core::{Error, Result, now_ms};

/// The longest window a report covers.
pub const MAX_REPORT_DAYS: u64 = 400;
/// A sample covers at most this much time: after a pause (a stalled loop, a
/// suspended host) the gap is not credited to whoever holds devices now.
const MAX_SAMPLE_GAP_MS: u64 = 60_000;

/// Records and reports usage. Share it as `Arc<UsageLedger>`.
pub struct UsageLedger {
    repo: Arc<dyn Repository>,
    cluster: Arc<Cluster>,
    /// When utilization was last sampled.
    last_sample_ms: std::sync::Mutex<Option<u64>>,
}

impl UsageLedger {
    pub fn new(repo: Arc<dyn Repository>, cluster: Arc<Cluster>) -> Arc<Self> {
        Arc::new(Self {
            repo,
            cluster,
            last_sample_ms: std::sync::Mutex::new(None),
        })
    }

    /// `server` started holding its devices now.
    pub async fn opened(&self, server: &Server) {
        if server.devices.is_empty() {
            return;
        }
        let now = now_ms();
        let intervals = server
            .devices
            .iter()
            .map(|d| {
                let f = self.cluster.describe(d);
                UsageInterval {
                    server_id: server.id.clone(),
                    user: server.owner.clone(),
                    server: server.name.clone(),
                    device: d.clone(),
                    kind: if d.starts_with("MIG-") { "mig" } else { "gpu" }.into(),
                    model: f.as_ref().map(|f| f.model.clone()).unwrap_or_default(),
                    profile: f
                        .as_ref()
                        .and_then(|f| f.profile.clone())
                        .unwrap_or_default(),
                    node: server.node.clone().unwrap_or_default(),
                    weight: f.map_or(1.0, |f| f.weight),
                    start_ms: now,
                }
            })
            .collect();
        if let Err(e) = self.repo.open_usage(intervals).await {
            tracing::error!(error = %e, server = %server.name, "could not record usage");
        }
    }

    /// The server with id `server_id` gave its devices back now.
    pub async fn closed(&self, server_id: &str) {
        if let Err(e) = self.repo.close_usage(server_id, now_ms(), false).await {
            tracing::error!(error = %e, "could not close usage");
        }
    }

    /// Adds the time since the last sample to each holder's efficiency: measured where
    /// a device had a reading, used by its busy share, idle under `idle_below`.
    pub async fn sample(&self, readings: &[HeldReading], idle_below: f64, now: u64) {
        let dt_ms = {
            let mut last = self
                .last_sample_ms
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let dt = last.map_or(0, |l| now.saturating_sub(l).min(MAX_SAMPLE_GAP_MS));
            *last = Some(now);
            dt
        };
        if dt_ms == 0 {
            return;
        }
        let hours = dt_ms as f64 / 3.6e6;
        let mut by_user: std::collections::BTreeMap<&str, Efficiency> = Default::default();
        for r in readings {
            let Some(busy) = r.busy else { continue };
            let e = by_user.entry(&r.user).or_default();
            e.measured_gpu_hours += r.weight * hours;
            e.used_gpu_hours += r.weight * busy * hours;
            if busy < idle_below {
                e.idle_gpu_hours += r.weight * hours;
            }
        }
        if by_user.is_empty() {
            return;
        }
        let rows = by_user
            .into_iter()
            .map(|(u, e)| (u.to_owned(), e))
            .collect();
        if let Err(e) = self.repo.add_efficiency(day_of(now), rows).await {
            tracing::warn!(error = %e, "could not record utilization");
        }
    }

    /// A server of `user` holding `weight` normalized GPUs was stopped after its GPUs
    /// were idle for `idle_ms`.
    pub async fn reclaimed(&self, user: &str, weight: f64, idle_ms: u64, now: u64) {
        let e = Efficiency {
            reclaimed_gpu_hours: weight * idle_ms as f64 / 3.6e6,
            reclaimed_servers: 1,
            ..Efficiency::default()
        };
        if let Err(e) = self
            .repo
            .add_efficiency(day_of(now), vec![(user.to_owned(), e)])
            .await
        {
            tracing::warn!(error = %e, "could not record a reclaim");
        }
    }

    /// The waste report: per user, GPU-hours held against used, idle and reclaimed,
    /// over the same window and visibility as [`UsageLedger::report`].
    pub async fn efficiency(
        &self,
        caller: &Caller,
        from: Option<&str>,
        to: Option<&str>,
        user: Option<String>,
    ) -> Result<Vec<EfficiencyRow>> {
        let (from_day, to_day, user) = self.window(caller, from, to, user)?;
        let held = self
            .repo
            .usage(from_day, to_day, GroupBy::User, user.clone(), now_ms())
            .await?;
        let mut rows: std::collections::BTreeMap<String, EfficiencyRow> = held
            .into_iter()
            .map(|r| {
                let row = EfficiencyRow {
                    user: r.key.clone(),
                    gpu_hours: r.gpu_hours,
                    efficiency: Efficiency::default(),
                };
                (r.key, row)
            })
            .collect();
        for (u, e) in self.repo.efficiency(from_day, to_day, user).await? {
            rows.entry(u.clone())
                .or_insert_with(|| EfficiencyRow {
                    user: u,
                    gpu_hours: 0.0,
                    efficiency: Efficiency::default(),
                })
                .efficiency
                .add(&e);
        }
        Ok(rows.into_values().collect())
    }

    /// At start: closes the intervals of servers that no longer hold devices (they
    /// ended while the aggregator was down) at the last moment it was known alive,
    /// marked recovered. Returns how many servers' intervals it closed.
    pub async fn recover(&self, holding: &[Server]) -> Result<usize> {
        let live: HashSet<&str> = holding
            .iter()
            .filter(|s| s.status.holds_devices())
            .map(|s| s.id.as_str())
            .collect();
        let at = self.repo.last_alive().await?.unwrap_or_else(now_ms);
        let mut closed = 0;
        for id in self.repo.open_usage_servers().await? {
            if !live.contains(id.as_str()) {
                self.repo.close_usage(&id, at, true).await?;
                closed += 1;
            }
        }
        if closed > 0 {
            tracing::warn!(
                servers = closed,
                "closed usage of servers that ended while the aggregator was down, at its last known time alive"
            );
        }
        self.repo.mark_alive(now_ms()).await?;
        Ok(closed)
    }

    /// `user`'s normalized GPU-hours this calendar month (UTC), running servers up to
    /// now.
    pub async fn this_month(&self, user: &str) -> Result<f64> {
        let now = now_ms();
        let today = day_of(now);
        let rows = self
            .repo
            .usage(
                month_start(today),
                today + 1,
                GroupBy::User,
                Some(user.to_owned()),
                now,
            )
            .await?;
        Ok(rows.iter().map(|r| r.gpu_hours).sum())
    }

    /// All-time totals for the Prometheus counter.
    pub async fn totals(&self) -> Result<Vec<UsageTotal>> {
        self.repo.usage_totals(now_ms()).await
    }

    /// Records that the aggregator is alive (every few seconds).
    pub async fn alive(&self) {
        if let Err(e) = self.repo.mark_alive(now_ms()).await {
            tracing::warn!(error = %e, "could not record the time alive");
        }
    }

    /// Normalized GPU-hours from day `from` to day `to` (inclusive dates or times,
    /// default: this month so far), grouped: a user's own; admins' everyone's, or one
    /// user's with `user`.
    pub async fn report(
        &self,
        caller: &Caller,
        from: Option<&str>,
        to: Option<&str>,
        group_by: GroupBy,
        user: Option<String>,
    ) -> Result<Vec<UsageRow>> {
        let (from, to, user) = self.window(caller, from, to, user)?;
        self.repo.usage(from, to, group_by, user, now_ms()).await
    }

    /// A report's days `[from, to)` and whose: a user's own; admins' everyone's, or
    /// one user's with `user`.
    fn window(
        &self,
        caller: &Caller,
        from: Option<&str>,
        to: Option<&str>,
        user: Option<String>,
    ) -> Result<(u64, u64, Option<String>)> {
        let now = now_ms();
        let today = day_of(now);
        let from = match from {
            Some(s) => parse_day("from", s)?,
            None => month_start(today),
        };
        // `to` names the last day included.
        let to = match to {
            Some(s) => parse_day("to", s)? + 1,
            None => today + 1,
        };
        if to <= from || to - from > MAX_REPORT_DAYS {
            return Err(Error::BadRequest(format!(
                "to: after from, at most {MAX_REPORT_DAYS} days later"
            )));
        }
        let user = match (caller.is_admin(), user) {
            (true, u) => u,
            (false, Some(u)) if u != caller.name => {
                return Err(Error::NotFound(format!("no user {u:?}")));
            }
            (false, _) => Some(caller.name.clone()),
        };
        if let Some(u) = &user {
            validate_user_name(u)?;
        }
        Ok((from, to, user))
    }
}

/// The first day of the UTC month holding `day`.
fn month_start(day: u64) -> u64 {
    let name = kcloud_core::usage::day_name(day);
    parse_day("month", &format!("{}-01", &name[..7])).unwrap_or(day)
}
