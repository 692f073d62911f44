//! Reservations: devices booked by a user for a future window (`[start, end)`), and
//! the policy that limits them. In its window a reservation's devices belong to its
//! owner: nobody else is given them, and a server of someone else that holds one is
//! stopped at the window's start.
//!
//! Times are milliseconds since the Unix epoch; the API also shows them as RFC 3339.

use std::time::{Duration, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::{Error, Result};

/// A booked window on devices of one node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Reservation {
    /// `r-` and 16 hex digits.
    pub id: String,
    pub owner: String,
    pub node: String,
    /// `GPU-...` / `MIG-...` UUIDs, all on `node`.
    pub devices: Vec<String>,
    pub start_ms: u64,
    pub end_ms: u64,
    pub note: String,
    /// Booked by an admin for maintenance: exempt from the policy and the no-show
    /// rule; nobody starts servers on it.
    pub maintenance: bool,
    pub created_at_ms: u64,
    /// Who booked it (an admin may book for someone else).
    pub created_by: String,
    /// A server of the owner ran on it inside the window (the no-show rule spares it).
    pub used: bool,
}

impl Reservation {
    /// Whether `t` is inside the window.
    pub fn active_at(&self, t: u64) -> bool {
        self.start_ms <= t && t < self.end_ms
    }

    /// Normalized GPU-hours the window books (`weights`: per device, 1 for a whole GPU
    /// or the share of its parent's compute for a MIG instance).
    pub fn gpu_hours(&self, weights: f64) -> f64 {
        weights * (self.end_ms - self.start_ms) as f64 / 3_600_000.0
    }
}

/// A fresh reservation id.
pub fn new_reservation_id() -> String {
    crate::private::random_id("r")
}

/// Whether `id` could be a reservation id (so a path segment is checked before use).
pub fn valid_reservation_id(id: &str) -> bool {
    id.len() == 18 && id.starts_with("r-") && id[2..].bytes().all(|c| c.is_ascii_hexdigit())
}

/// An instant as users write it: RFC 3339 (`2026-12-03T14:00:00Z`, or with an offset).
pub fn parse_instant(what: &str, s: &str) -> Result<u64> {
    let bad = |e: &dyn std::fmt::Display| {
        Error::BadRequest(format!("{what}: {s:?} is not an RFC 3339 time: {e}"))
    };
    // humantime reads UTC (`Z`) only: a numeric offset is taken off and applied here.
    let (local, offset_s) = match split_offset(s) {
        Some((local, offset)) => (local, offset),
        None => (s, 0),
    };
    let t = humantime::parse_rfc3339_weak(local)
        .or_else(|_| humantime::parse_rfc3339(local))
        .map_err(|e| bad(&e))?;
    let ms = t
        .duration_since(UNIX_EPOCH)
        .map_err(|_| Error::BadRequest(format!("{what}: before 1970")))?
        .as_millis();
    let ms = i128::try_from(ms).map_err(|e| bad(&e))? - i128::from(offset_s) * 1000;
    u64::try_from(ms).map_err(|_| Error::BadRequest(format!("{what}: out of range")))
}

/// `2026-12-03T15:00:00+01:00` → (`2026-12-03T15:00:00`, 3600).
fn split_offset(s: &str) -> Option<(&str, i64)> {
    let (local, off) = s.split_at_checked(s.len().checked_sub(6)?)?;
    let sign = match off.as_bytes().first()? {
        b'+' => 1,
        b'-' => -1,
        _ => return None,
    };
    let (h, m) = off[1..].split_once(':')?;
    if h.len() != 2 || m.len() != 2 || !local.contains('T') {
        return None;
    }
    let (h, m): (i64, i64) = (h.parse().ok()?, m.parse().ok()?);
    (h < 24 && m < 60).then_some((local, sign * (h * 3600 + m * 60)))
}

/// `ms` as RFC 3339 in UTC, to the second.
pub fn format_instant(ms: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// What the no-show rule, the length limits and the weekly budget need to know.
#[derive(Clone, Debug)]
pub struct ReservationPolicy {
    pub max_length: Duration,
    pub max_lead: Duration,
    /// Normalized GPU-hours one user may have booked per calendar week (Monday 00:00
    /// UTC); `None`: no limit.
    pub max_gpu_hours_per_week: Option<f64>,
    /// A reservation no server of its owner used this long after its start is
    /// released; `None`: never.
    pub no_show_after: Option<Duration>,
}

/// The shortest window worth booking: shorter ones are mistakes (an end a minute after
/// the start).
pub const MIN_LENGTH: Duration = Duration::from_secs(15 * 60);

/// Start of the calendar week (Monday 00:00 UTC) that holds `t`.
pub fn week_start(t: u64) -> u64 {
    const DAY: u64 = 86_400_000;
    // 1970-01-01 was a Thursday: day 0 is 3 days after a Monday.
    let day = t / DAY;
    day.saturating_sub((day + 3) % 7) * DAY
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instants_round_trip_and_bad_ones_are_refused() {
        let t = parse_instant("start", "2026-12-03T14:00:00Z").unwrap();
        assert_eq!(format_instant(t), "2026-12-03T14:00:00Z");
        assert_eq!(
            parse_instant("start", "2026-12-03T15:00:00+01:00").unwrap(),
            t
        );
        for bad in [
            "",
            "tomorrow",
            "2026-13-01T00:00:00Z",
            "1969-12-31T00:00:00Z",
        ] {
            assert!(parse_instant("start", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn weeks_start_on_monday() {
        // 2026-12-03 is a Thursday; its week began on Monday 2026-11-30.
        let t = parse_instant("t", "2026-12-03T14:00:00Z").unwrap();
        assert_eq!(format_instant(week_start(t)), "2026-11-30T00:00:00Z");
        let monday = parse_instant("t", "2026-11-30T00:00:00Z").unwrap();
        assert_eq!(week_start(monday), monday);
    }

    #[test]
    fn ids_are_checked() {
        let id = new_reservation_id();
        assert!(valid_reservation_id(&id), "{id}");
        assert!(!valid_reservation_id("r-../../etc"));
        assert!(!valid_reservation_id("x-0123456789abcdef"));
    }
}
