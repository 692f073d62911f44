//! The calendar: reservations of devices for windows `[start, end)`, indexed per
//! device by start, so that a conflict check over any window is a range lookup
//! (`O(log n)` per device), and the questions the ledger, the queue and the servers
//! ask — who may have this device now, when must this server give it back — are
//! answered without scanning every reservation.
//!
//! Invariant: the windows on one device never overlap (checked in
//! [`Calendar::insert`] under the same lock).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use kcloud_core::reservation::Reservation;
use kcloud_core::signal::Signal;

use crate::ledger::Avoid;

/// Reservations in memory. `Send + Sync`.
#[derive(Default)]
pub struct Calendar {
    state: Mutex<State>,
    changed: Signal,
}

#[derive(Default)]
struct State {
    by_id: HashMap<String, Arc<Reservation>>,
    /// Per device: start → reservation.
    by_device: HashMap<String, BTreeMap<u64, Arc<Reservation>>>,
}

impl Calendar {
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Wakes after every change.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Replaces everything with `all` (at start, from the store). A reservation that
    /// overlaps one loaded before it on a device is dropped and logged.
    pub fn load(&self, all: impl IntoIterator<Item = Reservation>) {
        let mut st = self.state();
        *st = State::default();
        for r in all {
            let id = r.id.clone();
            if let Err(c) = st.insert(r) {
                tracing::warn!(reservation = %id, conflicts = c.len(), "stored reservation overlaps another; ignored");
            }
        }
        drop(st);
        self.changed.notify();
    }

    /// Adds `r` unless a window on one of its devices overlaps it; then answers those.
    pub fn insert(&self, r: Reservation) -> Result<(), Vec<Arc<Reservation>>> {
        self.state().insert(r)?;
        self.changed.notify();
        Ok(())
    }

    /// Removes a reservation; `None` if unknown.
    pub fn remove(&self, id: &str) -> Option<Arc<Reservation>> {
        let r = self.state().remove(id)?;
        self.changed.notify();
        Some(r)
    }

    pub fn get(&self, id: &str) -> Option<Arc<Reservation>> {
        self.state().by_id.get(id).cloned()
    }

    /// Marks a reservation used (in memory; the store is told by the caller).
    pub fn mark_used(&self, id: &str) -> bool {
        let mut st = self.state();
        let Some(r) = st.by_id.get(id).cloned() else {
            return false;
        };
        if r.used {
            return false;
        }
        let mut used = (*r).clone();
        used.used = true;
        let _ = st.remove(id);
        let _ = st.insert(used);
        true
    }

    /// The windows on `devices` that overlap `[start, end)`, by start.
    pub fn conflicts(&self, devices: &[String], start: u64, end: u64) -> Vec<Arc<Reservation>> {
        let st = self.state();
        let mut out: Vec<Arc<Reservation>> = Vec::new();
        for d in devices {
            for r in st.overlapping(d, start, end) {
                if !out.iter().any(|o| o.id == r.id) {
                    out.push(r.clone());
                }
            }
        }
        out.sort_by(|a, b| (a.start_ms, &a.id).cmp(&(b.start_ms, &b.id)));
        out
    }

    /// Reservations that overlap `[from, to)`, by start.
    pub fn between(&self, from: u64, to: u64) -> Vec<Arc<Reservation>> {
        let st = self.state();
        let mut out: Vec<_> = st
            .by_id
            .values()
            .filter(|r| r.start_ms < to && r.end_ms > from)
            .cloned()
            .collect();
        out.sort_by(|a, b| (a.start_ms, &a.id).cmp(&(b.start_ms, &b.id)));
        out
    }

    /// The reservation on `uuid` whose window holds `t`.
    pub fn active_on(&self, uuid: &str, t: u64) -> Option<Arc<Reservation>> {
        self.state().overlapping(uuid, t, t + 1).next().cloned()
    }

    /// Devices in a window that holds `t` and that `user` may not use: reserved by
    /// someone else, or for maintenance.
    pub fn avoid_for(&self, user: &str, t: u64, avoid: &mut Avoid) {
        let st = self.state();
        for r in st.by_id.values() {
            if !r.active_at(t) || (r.owner == user && !r.maintenance) {
                continue;
            }
            for d in &r.devices {
                avoid.insert(d, || {
                    if r.maintenance {
                        format!(
                            "reserved for maintenance until {}",
                            kcloud_core::reservation::format_instant(r.end_ms)
                        )
                    } else {
                        format!(
                            "reserved by another user until {}",
                            kcloud_core::reservation::format_instant(r.end_ms)
                        )
                    }
                });
            }
        }
    }

    /// When a server of `owner` on `devices` must give them back: the earliest start
    /// after `t` (or a window holding `t`) of another user's (or a maintenance)
    /// reservation on one of them, with that reservation.
    pub fn must_end(&self, owner: &str, devices: &[String], t: u64) -> Option<Arc<Reservation>> {
        let st = self.state();
        let mut best: Option<&Arc<Reservation>> = None;
        for d in devices {
            let Some(map) = st.by_device.get(d) else {
                continue;
            };
            // Windows ending after t, in start order: the first foreign one.
            let before = map.range(..=t).next_back().map(|(_, r)| r);
            let after = map.range(t + 1..).map(|(_, r)| r);
            let first = before
                .into_iter()
                .chain(after)
                .filter(|r| r.end_ms > t)
                .find(|r| r.owner != owner || r.maintenance);
            if let Some(r) = first
                && best.is_none_or(|b| r.start_ms < b.start_ms)
            {
                best = Some(r);
            }
        }
        best.cloned()
    }

    /// Active reservations (window holds `t`) of `owner`, by start.
    pub fn active_of(&self, owner: &str, t: u64) -> Vec<Arc<Reservation>> {
        let st = self.state();
        let mut out: Vec<_> = st
            .by_id
            .values()
            .filter(|r| r.owner == owner && !r.maintenance && r.active_at(t))
            .cloned()
            .collect();
        out.sort_by(|a, b| (a.start_ms, &a.id).cmp(&(b.start_ms, &b.id)));
        out
    }

    /// Drops reservations that ended before `before_ms` from memory (the store keeps
    /// them): the walks of claims and views stay proportional to what is current.
    pub fn forget_ended(&self, before_ms: u64) -> usize {
        let mut st = self.state();
        let old: Vec<String> = st
            .by_id
            .values()
            .filter(|r| r.end_ms < before_ms)
            .map(|r| r.id.clone())
            .collect();
        for id in &old {
            st.remove(id);
        }
        old.len()
    }

    /// All reservations, by start.
    pub fn all(&self) -> Vec<Arc<Reservation>> {
        self.between(0, u64::MAX)
    }
}

impl State {
    fn overlapping<'a>(
        &'a self,
        uuid: &str,
        start: u64,
        end: u64,
    ) -> impl Iterator<Item = &'a Arc<Reservation>> + 'a {
        let map = self.by_device.get(uuid);
        // The last window starting before `start` may reach into it; every window
        // starting in [start, end) overlaps it. Windows never overlap each other.
        let before = map
            .and_then(|m| m.range(..start).next_back())
            .map(|(_, r)| r)
            .filter(move |r| r.end_ms > start);
        let inside = map
            .into_iter()
            .flat_map(move |m| m.range(start..end).map(|(_, r)| r));
        before.into_iter().chain(inside)
    }

    fn insert(&mut self, r: Reservation) -> Result<(), Vec<Arc<Reservation>>> {
        let mut conflicts: Vec<Arc<Reservation>> = Vec::new();
        for d in &r.devices {
            for c in self.overlapping(d, r.start_ms, r.end_ms) {
                if !conflicts.iter().any(|o| o.id == c.id) {
                    conflicts.push(c.clone());
                }
            }
        }
        if !conflicts.is_empty() {
            conflicts.sort_by(|a, b| (a.start_ms, &a.id).cmp(&(b.start_ms, &b.id)));
            return Err(conflicts);
        }
        let r = Arc::new(r);
        for d in &r.devices {
            self.by_device
                .entry(d.clone())
                .or_default()
                .insert(r.start_ms, r.clone());
        }
        self.by_id.insert(r.id.clone(), r);
        Ok(())
    }

    fn remove(&mut self, id: &str) -> Option<Arc<Reservation>> {
        let r = self.by_id.remove(id)?;
        for d in &r.devices {
            if let Some(m) = self.by_device.get_mut(d) {
                m.remove(&r.start_ms);
                if m.is_empty() {
                    self.by_device.remove(d);
                }
            }
        }
        Some(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn res(id: &str, owner: &str, devices: &[&str], start: u64, end: u64) -> Reservation {
        Reservation {
            id: id.into(),
            owner: owner.into(),
            node: "n".into(),
            devices: devices.iter().map(|d| d.to_string()).collect(),
            start_ms: start,
            end_ms: end,
            note: String::new(),
            maintenance: false,
            created_at_ms: 0,
            created_by: owner.into(),
            used: false,
        }
    }

    #[test]
    fn overlapping_windows_conflict_and_touching_ones_do_not() {
        let c = Calendar::new();
        c.insert(res("a", "alice", &["G1", "G2"], 100, 200))
            .unwrap();
        c.insert(res("b", "bob", &["G1"], 200, 300)).unwrap();
        c.insert(res("c", "bob", &["G2"], 0, 100)).unwrap();
        let err = c
            .insert(res("d", "carol", &["G2", "G1"], 150, 250))
            .unwrap_err();
        let ids: Vec<&str> = err.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["a", "b"]);
        assert!(c.insert(res("e", "carol", &["G3"], 150, 250)).is_ok());
        assert_eq!(c.conflicts(&["G1".into()], 199, 201).len(), 2);
        assert!(c.conflicts(&["G1".into()], 300, 400).is_empty());
        assert!(c.remove("a").is_some());
        assert!(c.insert(res("d", "carol", &["G2"], 150, 250)).is_ok());
    }

    #[test]
    fn others_windows_are_avoided_and_end_servers() {
        let c = Calendar::new();
        c.insert(res("a", "alice", &["G1"], 100, 200)).unwrap();
        c.insert(res("b", "bob", &["G1"], 300, 400)).unwrap();
        let mut avoid = Avoid::default();
        c.avoid_for("bob", 150, &mut avoid);
        assert!(avoid.contains("G1"));
        let mut avoid = Avoid::default();
        c.avoid_for("alice", 150, &mut avoid);
        assert!(avoid.is_empty());
        // Bob's server on G1 at 50 must end when alice's window starts; alice's at 150
        // when bob's starts; bob's at 350 runs into nobody.
        assert_eq!(c.must_end("bob", &["G1".into()], 50).unwrap().id, "a");
        assert_eq!(c.must_end("alice", &["G1".into()], 150).unwrap().id, "b");
        assert!(c.must_end("bob", &["G1".into()], 350).is_none());
        // Inside someone else's window: end now (the window that holds t).
        assert_eq!(c.must_end("carol", &["G1".into()], 150).unwrap().id, "a");
    }
}
