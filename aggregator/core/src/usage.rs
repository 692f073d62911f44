//! The usage ledger: every interval a device was held by a server, kept durably and
//! summed per UTC day, so that "who used how many GPU-hours last month" is a query
//! over days, not over every interval.
//!
//! GPU-hours are normalized: a whole GPU counts 1 per hour, a MIG instance its compute
//! slices over its GPU's (a `3g.40gb` on an A100 counts 3/7), the `weight` of each
//! interval. An interval is open while its server holds the device; when the server
//! ends it is closed and split into the days it spans. One still open when the
//! aggregator stopped is closed at its next start at the last moment the aggregator was
//! known alive (recorded every 10 s and at a clean stop), and the days it adds are
//! marked `recovered`.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::{Error, Result};

pub const DAY_MS: u64 = 86_400_000;

/// A device a server started holding.
#[derive(Clone, Debug, PartialEq)]
pub struct UsageInterval {
    pub server_id: String,
    pub user: String,
    pub server: String,
    pub device: String,
    /// `gpu` or `mig`.
    pub kind: String,
    pub model: String,
    /// The MIG profile; empty for a whole GPU.
    pub profile: String,
    pub node: String,
    pub weight: f64,
    pub start_ms: u64,
}

/// How usage is grouped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum GroupBy {
    User,
    Model,
    Node,
    Day,
}

impl GroupBy {
    pub fn column(self) -> &'static str {
        match self {
            GroupBy::User => "user_name",
            GroupBy::Model => "model",
            GroupBy::Node => "node",
            GroupBy::Day => "day",
        }
    }
}

/// One group's normalized GPU-hours in a window.
#[derive(Clone, Debug, PartialEq, Serialize, ToSchema)]
pub struct UsageRow {
    /// The user, model, node, or day (`YYYY-MM-DD`).
    pub key: String,
    pub gpu_hours: f64,
    /// Part of it comes from intervals closed at recovery (the aggregator had died
    /// while they were open): an upper bound there.
    pub recovered: bool,
}

/// All-time normalized GPU-hours of one (user, model, profile), open intervals up to
/// now included: what the aggregator's Prometheus counter shows.
#[derive(Clone, Debug, PartialEq)]
pub struct UsageTotal {
    pub user: String,
    pub model: String,
    /// Empty for whole GPUs.
    pub profile: String,
    pub gpu_hours: f64,
}

/// How well held devices were used, for one user over one stretch of time: what the
/// admins' waste report sums. Sampled every 10 s from the agents' readings: only time
/// with a reading counts (`measured`), so a model without per-instance utilization
/// (MIG before Hopper) is neither used nor idle.
#[derive(Clone, Debug, Default, PartialEq, Serialize, ToSchema)]
pub struct Efficiency {
    /// Normalized GPU-hours held with a utilization reading.
    pub measured_gpu_hours: f64,
    /// Those weighted by the busy share: the GPU-hours actually used.
    pub used_gpu_hours: f64,
    /// Those under the idle threshold (`[culling] gpu_idle_threshold`, else 5 %).
    pub idle_gpu_hours: f64,
    /// Idle GPU-hours that ended in a reclaim (the idle windows of stopped servers).
    pub reclaimed_gpu_hours: f64,
    /// Servers stopped because their GPUs were idle.
    pub reclaimed_servers: u64,
}

impl Efficiency {
    pub fn add(&mut self, o: &Efficiency) {
        self.measured_gpu_hours += o.measured_gpu_hours;
        self.used_gpu_hours += o.used_gpu_hours;
        self.idle_gpu_hours += o.idle_gpu_hours;
        self.reclaimed_gpu_hours += o.reclaimed_gpu_hours;
        self.reclaimed_servers += o.reclaimed_servers;
    }
}

/// One held device's reading at a sample: whose, how much it counts, how busy.
#[derive(Clone, Debug, PartialEq)]
pub struct HeldReading {
    pub user: String,
    pub weight: f64,
    /// 0 to 1; `None`: no reading.
    pub busy: Option<f64>,
}

/// A user's allocated and used GPU-hours over a window: a row of the waste report.
#[derive(Clone, Debug, PartialEq, Serialize, ToSchema)]
pub struct EfficiencyRow {
    pub user: String,
    /// Normalized GPU-hours held (as `GET /api/v1/usage`).
    pub gpu_hours: f64,
    #[serde(flatten)]
    pub efficiency: Efficiency,
}

/// The UTC day (days since 1970-01-01) of `ms`.
pub fn day_of(ms: u64) -> u64 {
    ms / DAY_MS
}

/// `[start, end)` split into `(day, milliseconds in that day)`.
pub fn split_days(start: u64, end: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut t = start;
    while t < end {
        let day = day_of(t);
        let next = ((day + 1) * DAY_MS).min(end);
        out.push((day, next - t));
        t = next;
    }
    out
}

/// `YYYY-MM-DD` of a day number.
pub fn day_name(day: u64) -> String {
    crate::reservation::format_instant(day * DAY_MS)[..10].to_owned()
}

/// A day boundary as users write it: `YYYY-MM-DD`, or an RFC 3339 time (rounded down
/// to its day).
pub fn parse_day(what: &str, s: &str) -> Result<u64> {
    let t = if s.len() == 10 {
        crate::reservation::parse_instant(what, &format!("{s}T00:00:00Z"))
    } else {
        crate::reservation::parse_instant(what, s)
    }
    .map_err(|_| {
        Error::BadRequest(format!(
            "{what}: {s:?} is not a date (YYYY-MM-DD) or RFC 3339 time"
        ))
    })?;
    Ok(day_of(t))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_split_at_midnight_utc() {
        let t = 3 * DAY_MS - 3_600_000;
        assert_eq!(
            split_days(t, t + 2 * 3_600_000),
            vec![(2, 3_600_000), (3, 3_600_000)]
        );
        assert_eq!(split_days(t, t), vec![]);
        let long = split_days(DAY_MS, 4 * DAY_MS);
        assert_eq!(long, vec![(1, DAY_MS), (2, DAY_MS), (3, DAY_MS)]);
        assert_eq!(day_name(day_of(1_796_342_400_000)), "2026-12-04");
        assert_eq!(
            parse_day("from", "2026-12-04").unwrap(),
            day_of(1_796_342_400_000)
        );
        assert!(parse_day("from", "yesterday").is_err());
    }
}
