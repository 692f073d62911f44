//! The wait queue's records and the fair-share score that orders it.
//!
//! A request that asked to wait (`"wait": {"max": "4h"}`) and found nothing free is
//! kept as a [`QueueEntry`] until its devices free up, it is cancelled (deleting the
//! queued server) or its deadline passes. Entries are ordered by the owner's
//! fair-share score (recent GPU-hours, decayed with a half-life, divided by the
//! owner's weight), then by arrival.

use serde::{Deserialize, Serialize};

/// A waiting create request, as stored.
#[derive(Clone, Debug, PartialEq)]
pub struct QueueEntry {
    /// `q-` and 16 hex digits.
    pub id: String,
    pub owner: String,
    /// The server's name (unique per owner among servers and queued entries).
    pub name: String,
    /// The create request's body, validated again when it starts.
    pub request: serde_json::Value,
    pub enqueued_at_ms: u64,
    /// It gives up waiting then.
    pub deadline_ms: u64,
    /// Who asked (the owner, or an admin for them).
    pub created_by: String,
}

/// A fresh queue entry id.
pub fn new_queue_id() -> String {
    crate::private::random_id("q")
}

/// A user's decayed GPU-hours as of `at_ms`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct UsageScore {
    pub gpu_hours: f64,
    pub at_ms: u64,
}

impl UsageScore {
    /// The score decayed to `now_ms` with `half_life_ms`.
    pub fn at(&self, now_ms: u64, half_life_ms: u64) -> f64 {
        let dt = now_ms.saturating_sub(self.at_ms) as f64;
        self.gpu_hours * (-dt / half_life_ms.max(1) as f64 * std::f64::consts::LN_2).exp()
    }

    /// This score with `gpu_hours` more used at `now_ms`.
    pub fn add(&self, gpu_hours: f64, now_ms: u64, half_life_ms: u64) -> UsageScore {
        UsageScore {
            gpu_hours: self.at(now_ms, half_life_ms) + gpu_hours.max(0.0),
            at_ms: now_ms.max(self.at_ms),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scores_halve_every_half_life() {
        let day = 86_400_000;
        let s = UsageScore {
            gpu_hours: 8.0,
            at_ms: 0,
        };
        assert!((s.at(7 * day, 7 * day) - 4.0).abs() < 1e-9);
        assert!((s.at(14 * day, 7 * day) - 2.0).abs() < 1e-9);
        let s = s.add(1.0, 7 * day, 7 * day);
        assert!((s.gpu_hours - 5.0).abs() < 1e-9);
        assert_eq!(s.at_ms, 7 * day);
    }
}
