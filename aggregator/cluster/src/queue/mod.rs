//! Deciding which waiting requests start: one round over the queue in fair order.
//!
//! The caller orders the queue (fair share, then arrival). A round walks it once:
//!
//! - a request that fits now, outside the devices requests ahead of it count on, is
//!   claimed (it starts);
//! - one that does not fit keeps a **shadow**: the devices of its estimated start when
//!   that is known, otherwise the free devices of its kind on the node where it is
//!   closest to fitting (that node drains for it). Requests behind it never take a
//!   shadowed device, so starting them (backfill) never delays it;
//! - a request of the same kind (model, or MIG profile and model) asking for at least
//!   as many devices as one that just failed cannot fit either and is not tried again
//!   in this round (nor estimated: it starts after that one, which is all that is
//!   known): a round costs one pass plus, per kind, at most one claim attempt and
//!   one estimate per distinct size.

use std::collections::{HashMap, HashSet};

use kcloud_core::Error;
use kcloud_core::device::{DeviceRequest, Holder};

use crate::Cluster;
use crate::inventory::Dev;
use crate::ledger::{Avoid, Claim};
use crate::plan::{Estimate, KnownEnds};

/// A waiting request, in fair order.
#[derive(Clone, Debug)]
pub struct Waiting {
    pub holder: Holder,
    pub request: DeviceRequest,
    /// The owner's device quota.
    pub max_devices: Option<u32>,
}

/// What a round decided for one waiting request.
#[derive(Debug)]
pub enum Outcome {
    /// Its devices are claimed: start it (commit or abort the claim).
    Start(Claim),
    /// It keeps waiting; `estimate` is `None` when nothing known makes it fit.
    Wait { estimate: Option<Estimate> },
    /// It can never start as asked (a device vanished, a bad request): drop it.
    Drop(Error),
}

/// The result of a round: one outcome per waiting request, in the given order, and the
/// devices promised to those still waiting (new requests must not take them).
#[derive(Debug, Default)]
pub struct Round {
    pub outcomes: Vec<Outcome>,
    pub promised: Avoid,
}

#[derive(Clone, PartialEq, Eq, Hash)]
enum Kind<'a> {
    Gpus(Option<&'a str>),
    Mig(&'a str, Option<&'a str>),
}

fn kind(req: &DeviceRequest) -> Option<(Kind<'_>, u32)> {
    match req {
        DeviceRequest::Exact(_) => None,
        DeviceRequest::Gpus { count, model } => Some((Kind::Gpus(model.as_deref()), *count)),
        DeviceRequest::Mig { profile, model } => Some((Kind::Mig(profile, model.as_deref()), 1)),
    }
}

impl Cluster {
    /// One round over `waiting` (see the module docs). `known_ends`: devices whose
    /// release time is known (see [`Cluster::estimate`]); `estimates`: how many of the
    /// requests that keep waiting get an estimate (the rest: `None`, and a shadow from
    /// draining). Estimates cost a walk over the nodes with known ends, so the round
    /// that follows a release passes 0 and a periodic one refreshes them.
    pub fn decide(
        &self,
        waiting: &[Waiting],
        now_ms: u64,
        known_ends: &KnownEnds,
        estimates: usize,
    ) -> Round {
        let mut round = Round::default();
        let mut taken: HashSet<String> = HashSet::new();
        // Per kind: the smallest size that failed this round.
        let mut failed: HashMap<Kind<'_>, u32> = HashMap::new();
        let mut estimated = 0usize;
        for w in waiting {
            let k = kind(&w.request);
            let hopeless = k
                .as_ref()
                .is_some_and(|(k, n)| failed.get(k).is_some_and(|f| n >= f));
            if !hopeless {
                match self.claim(
                    w.holder.clone(),
                    &w.request,
                    w.max_devices,
                    now_ms,
                    &round.promised,
                ) {
                    Ok(c) => {
                        round.outcomes.push(Outcome::Start(c));
                        continue;
                    }
                    Err(Error::Conflict(_)) => {}
                    Err(Error::QuotaExceeded(_) | Error::Unavailable(_)) => {
                        // Over the owner's device quota (it waits for the owner's own
                        // servers, not for devices: nothing is promised to it), or the
                        // ledger is not ready yet.
                        round.outcomes.push(Outcome::Wait { estimate: None });
                        continue;
                    }
                    Err(e) => {
                        round.outcomes.push(Outcome::Drop(e));
                        continue;
                    }
                }
            }
            let mut avoid = Avoid::default();
            if !hopeless {
                self.calendar()
                    .avoid_for(&w.holder.user, now_ms, &mut avoid);
            }
            // A hopeless request waits behind one of its kind that failed: its start
            // is not known better than "after that one" (shown as unknown).
            let estimate = (!hopeless && estimated < estimates)
                .then(|| {
                    estimated += 1;
                    self.estimate(&w.request, now_ms, known_ends, &avoid, &taken)
                })
                .flatten();
            if !hopeless {
                let shadow = match &estimate {
                    Some(e) => e.devices.clone(),
                    None => self.drain(&w.request, now_ms, &avoid, &taken),
                };
                for d in shadow {
                    round.promised.insert(&d, || {
                        "promised to a request waiting ahead in the queue".into()
                    });
                    taken.insert(d);
                }
                if let Some((k, n)) = k {
                    let f = failed.entry(k).or_insert(n);
                    *f = (*f).min(n);
                }
            }
            round.outcomes.push(Outcome::Wait { estimate });
        }
        round
    }

    /// The devices a request with no known start counts on: for whole GPUs, the free
    /// ones of its kind on the fresh node where it is closest to fitting (that node
    /// drains for it); for exact devices, those of them that are free. A MIG request
    /// that does not fit has no free instance anywhere: nothing.
    pub fn drain(
        &self,
        req: &DeviceRequest,
        now_ms: u64,
        avoid: &Avoid,
        taken: &HashSet<String>,
    ) -> Vec<String> {
        let inv = self.inventory().read();
        let st = self.ledger().state();
        let free_now = |d: &Dev| {
            d.allocatable()
                && !taken.contains(&*d.uuid)
                && !avoid.contains(&d.uuid)
                && st.device_free(d)
        };
        match req {
            DeviceRequest::Exact(uuids) => uuids
                .iter()
                .filter(|u| inv.device(u).is_some_and(|(_, d)| free_now(d)))
                .cloned()
                .collect(),
            DeviceRequest::Mig { .. } => Vec::new(),
            DeviceRequest::Gpus { count, model } => {
                let Some(mid) = inv.model_filter(model.as_deref()) else {
                    return Vec::new();
                };
                // Nodes by free devices, most first (the ledger's index): the first
                // few that could ever hold the request are looked at device by
                // device; a round never walks the whole fleet.
                let mut best: Option<Vec<String>> = None;
                let classes: Vec<_> = st
                    .classes_with_free()
                    .filter(|c| !c.mig && mid.is_none_or(|m| c.model == m))
                    .copied()
                    .collect();
                for class in classes {
                    let mut looked = 0;
                    for (free, node) in st.most_free(&class) {
                        if best.as_ref().is_some_and(|b| free as usize <= b.len()) || looked >= 8 {
                            break;
                        }
                        let total = st
                            .node_counts(node)
                            .iter()
                            .find(|c| c.class == class)
                            .map_or(0, |c| c.total);
                        if total < *count || !inv.node_fresh(node, now_ms) {
                            continue;
                        }
                        looked += 1;
                        let devs: Vec<String> = inv
                            .node_devices(node)
                            .filter(|(_, d)| d.class == class && free_now(d))
                            .map(|(_, d)| d.uuid.to_string())
                            .collect();
                        if best.as_ref().is_none_or(|b| devs.len() > b.len()) {
                            best = Some(devs);
                        }
                    }
                }
                best.unwrap_or_default()
            }
        }
    }
}

#[cfg(test)]
mod tests;
