//! Login rate limits: keyed token buckets with bounded memory.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use kcloud_core::{Error, Result};

/// Keyed token buckets (as GCRA: one "theoretical arrival time" per key), thread-safe,
/// with bounded memory: a key whose bucket has refilled is dropped, and at the cap the
/// fullest bucket is evicted first.
pub struct RateLimiter {
    burst: u32,
    interval_ms: u64,
    max_keys: usize,
    state: Mutex<LimiterState>,
}

struct LimiterState {
    /// When each key's bucket is full again, in ms; past means full.
    tat: HashMap<String, u64>,
    last_sweep_ms: u64,
}

impl fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimiter")
            .field("burst", &self.burst)
            .field("interval_ms", &self.interval_ms)
            .field("keys", &self.len())
            .finish()
    }
}

impl RateLimiter {
    /// `burst` attempts at once, then one per `refill_every`; at most `max_keys` keys.
    pub fn new(burst: u32, refill_every: Duration, max_keys: usize) -> Self {
        RateLimiter {
            burst: burst.max(1),
            interval_ms: (refill_every.as_millis() as u64).max(1),
            max_keys: max_keys.max(1),
            state: Mutex::new(LimiterState {
                tat: HashMap::new(),
                last_sweep_ms: 0,
            }),
        }
    }

    /// Takes one token for `key`, or says how long to wait (`RateLimited`).
    pub fn check(&self, key: &str, now_ms: u64) -> Result<()> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if now_ms.saturating_sub(st.last_sweep_ms) >= 60_000 {
            st.tat.retain(|_, t| *t > now_ms);
            st.last_sweep_ms = now_ms;
        }
        let tolerance = u64::from(self.burst - 1).saturating_mul(self.interval_ms);
        // A stored time beyond `now + burst * interval` means the clock stepped back:
        // count the bucket as drained rather than locking the key for the whole step.
        let ceiling = now_ms.saturating_add(tolerance + self.interval_ms);
        let tat = st
            .tat
            .get(key)
            .copied()
            .unwrap_or(now_ms)
            .clamp(now_ms, ceiling);
        let wait_ms = (tat - now_ms).saturating_sub(tolerance);
        if wait_ms > 0 {
            if let Some(t) = st.tat.get_mut(key) {
                *t = tat;
            }
            return Err(Error::RateLimited {
                retry_after_secs: wait_ms.div_ceil(1000).max(1),
            });
        }
        let next = tat.saturating_add(self.interval_ms);
        if let Some(t) = st.tat.get_mut(key) {
            *t = next;
            return Ok(());
        }
        if st.tat.len() >= self.max_keys {
            st.tat.retain(|_, t| *t > now_ms);
            if st.tat.len() >= self.max_keys
                && let Some(k) = st
                    .tat
                    .iter()
                    .min_by_key(|(_, t)| **t)
                    .map(|(k, _)| k.clone())
            {
                st.tat.remove(&k);
            }
        }
        st.tat.insert(key.to_owned(), next);
        Ok(())
    }

    /// Keys held now.
    pub fn len(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .tat
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The limiter key for a client: the IPv4 address, or the IPv6 /64 (one host usually
/// holds a whole /64, so per-address limits would be trivial to dodge).
pub fn client_key(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => {
                let s = v6.segments();
                format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
            }
        },
    }
}
