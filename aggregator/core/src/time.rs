//! Time: milliseconds since the Unix epoch, read in one place. Logic takes `now_ms` as
//! an argument so that tests control time.

use std::time::Duration;

/// Milliseconds since the Unix epoch: the one clock the aggregator reads.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A duration in milliseconds, saturating.
pub fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

pub use kcloud_common::duration::parse_duration;
