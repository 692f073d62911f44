//! Questions about the future that the wait queue asks: could a request ever fit the
//! fleet, and when could it start given what is known about when devices free up.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use kcloud_core::device::{DeviceRequest, MAX_DEVICES_PER_REQUEST};
use kcloud_core::{Error, Result};

use crate::Cluster;
use crate::inventory::{Class, Dev, InvState};
use crate::ledger::Avoid;

/// Devices whose release time is known, by node (what the estimates look at).
#[derive(Clone, Debug, Default)]
pub struct KnownEnds {
    by_device: HashMap<String, u64>,
    by_node: HashMap<String, Vec<String>>,
}

impl KnownEnds {
    /// `uuid` on `node` frees at `end_ms` (the earlier of two answers wins).
    pub fn insert(&mut self, node: &str, uuid: &str, end_ms: u64) {
        match self.by_device.get_mut(uuid) {
            Some(t) => *t = (*t).min(end_ms),
            None => {
                self.by_device.insert(uuid.to_owned(), end_ms);
                self.by_node
                    .entry(node.to_owned())
                    .or_default()
                    .push(uuid.to_owned());
            }
        }
    }

    pub fn get(&self, uuid: &str) -> Option<u64> {
        self.by_device.get(uuid).copied()
    }

    pub fn contains(&self, uuid: &str) -> bool {
        self.by_device.contains_key(uuid)
    }

    fn nodes(&self) -> impl Iterator<Item = &str> {
        self.by_node.keys().map(String::as_str)
    }
}

/// When a waiting request could start and on which devices (its "shadow": what it
/// counts on, so that requests behind it do not take those).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Estimate {
    pub start_ms: u64,
    pub devices: Vec<String>,
}

impl Cluster {
    /// `Ok` when `req` fits the fleet as it is, ignoring who holds what: some node
    /// has that many GPUs of one model, the profile exists, the devices exist.
    /// Otherwise `BadRequest` (or `NotFound` for an unknown device) saying why, so
    /// that nobody waits for what can never come.
    pub fn could_ever_fit(&self, req: &DeviceRequest) -> Result<()> {
        let inv = self.inventory().read();
        let mut st = self.ledger().state();
        st.sync(&inv);
        match req {
            DeviceRequest::Exact(uuids) => {
                for u in uuids {
                    if inv.device(u).is_none() {
                        return Err(Error::NotFound(format!("device {u} not found")));
                    }
                }
                Ok(())
            }
            DeviceRequest::Gpus { count, model } => {
                let Some(mid) = inv.model_filter(model.as_deref()) else {
                    return Err(Error::BadRequest(format!(
                        "no node has GPUs of model {:?}",
                        model.as_deref().unwrap_or_default()
                    )));
                };
                let most = inv
                    .node_names()
                    .flat_map(|n| st.node_counts(n).iter())
                    .filter(|c| !c.class.mig && mid.is_none_or(|m| c.class.model == m))
                    .map(|c| c.total)
                    .max()
                    .unwrap_or(0);
                if most < *count {
                    return Err(Error::BadRequest(format!(
                        "no node has {count} {}GPUs{}: the most on one node is {most}, so this \
                         request can never start (at most {MAX_DEVICES_PER_REQUEST} per server)",
                        model
                            .as_deref()
                            .map(|m| format!("{m} "))
                            .unwrap_or_default(),
                        if model.is_none() { " of one model" } else { "" }
                    )));
                }
                Ok(())
            }
            DeviceRequest::Mig { profile, model } => {
                let any = match (inv.profile_id(profile), inv.model_filter(model.as_deref())) {
                    (Some(pid), Some(mid)) => inv.node_names().any(|n| {
                        st.node_counts(n).iter().any(|c| {
                            c.class.mig
                                && c.class.profile == pid
                                && mid.is_none_or(|m| c.class.model == m)
                        })
                    }),
                    _ => false,
                };
                if !any {
                    return Err(Error::BadRequest(format!(
                        "no node has MIG instances of profile {profile}{}: this request can \
                         never start",
                        model
                            .as_deref()
                            .map(|m| format!(" on {m}"))
                            .unwrap_or_default()
                    )));
                }
                Ok(())
            }
        }
    }

    /// When `req` could start, from what is known: devices free now (not in `avoid`),
    /// and devices whose end is known (`known_ends`: held by a server that must stop
    /// then, or in someone else's reservation until then). Devices in `taken` are
    /// promised to requests ahead. `None`: nothing known makes it fit ("unknown").
    pub fn estimate(
        &self,
        req: &DeviceRequest,
        now_ms: u64,
        known_ends: &KnownEnds,
        avoid: &Avoid,
        taken: &HashSet<String>,
    ) -> Option<Estimate> {
        let inv = self.inventory().read();
        let st = self.ledger().state();
        let at = |d: &Dev| -> Option<u64> {
            if taken.contains(&*d.uuid) || !d.allocatable() {
                return None;
            }
            if let Some(t) = known_ends.get(&d.uuid) {
                return Some(t.max(now_ms));
            }
            (st.device_free(d) && !avoid.contains(&d.uuid)).then_some(now_ms)
        };
        match req {
            DeviceRequest::Exact(uuids) => {
                let mut start = now_ms;
                for u in uuids {
                    let (k, d) = inv.device(u)?;
                    if !inv.node_fresh(&k.node, now_ms) {
                        return None;
                    }
                    start = start.max(at(d)?);
                }
                Some(Estimate {
                    start_ms: start,
                    devices: uuids.clone(),
                })
            }
            DeviceRequest::Gpus { count, model } => {
                let mid = inv.model_filter(model.as_deref())?;
                best_node(
                    &inv,
                    known_ends,
                    now_ms,
                    *count as usize,
                    &at,
                    |d| !d.class.mig && mid.is_none_or(|m| d.class.model == m),
                    true,
                )
            }
            DeviceRequest::Mig { profile, model } => {
                let pid = inv.profile_id(profile)?;
                let mid = inv.model_filter(model.as_deref())?;
                best_node(
                    &inv,
                    known_ends,
                    now_ms,
                    1,
                    &at,
                    |d| {
                        d.class.mig
                            && d.class.profile == pid
                            && mid.is_none_or(|m| d.class.model == m)
                    },
                    false,
                )
            }
        }
    }
}

/// When each matching device of a node is available, with its UUID.
type Times<'a> = Vec<(u64, &'a Arc<str>)>;

/// Over the fresh nodes holding a device with a known end (a node without one would
/// have fitted now already), the earliest time `count` matching devices are
/// available on one node, all of one class when `one_class`.
#[allow(clippy::too_many_arguments)]
fn best_node(
    inv: &InvState,
    known_ends: &KnownEnds,
    now_ms: u64,
    count: usize,
    at: &dyn Fn(&Dev) -> Option<u64>,
    matches: impl Fn(&Dev) -> bool,
    one_class: bool,
) -> Option<Estimate> {
    let mut nodes: Vec<&str> = known_ends
        .nodes()
        .filter(|n| inv.node_fresh(n, now_ms))
        .collect();
    nodes.sort_unstable();
    let mut best: Option<Estimate> = None;
    for node in nodes {
        let Some(node) = inv.node_arc(node) else {
            continue;
        };
        // Few classes per node: a small list beats a map here (one per node walked).
        let mut by_class: Vec<(Option<Class>, Times<'_>)> = Vec::new();
        for (_, d) in inv.node_devices(node) {
            if !matches(d) {
                continue;
            }
            if let Some(t) = at(d) {
                let class = if one_class { Some(d.class) } else { None };
                match by_class.iter_mut().find(|(c, _)| *c == class) {
                    Some((_, v)) => v.push((t, &d.uuid)),
                    None => by_class.push((class, vec![(t, &d.uuid)])),
                }
            }
        }
        for (_, mut times) in by_class {
            if times.len() < count {
                continue;
            }
            times.sort();
            let start = times[count - 1].0;
            if best.as_ref().is_none_or(|b| start < b.start_ms) {
                best = Some(Estimate {
                    start_ms: start,
                    devices: times[..count].iter().map(|(_, u)| u.to_string()).collect(),
                });
            }
        }
    }
    best
}

/// What booking and accounting need to know about one device.
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceFacts {
    pub node: String,
    pub model: String,
    /// The MIG profile, for a MIG instance.
    pub profile: Option<String>,
    /// A GPU in MIG mode: bookable only through its instances.
    pub mig_parent: bool,
    /// What an hour on it counts in normalized GPU-hours: 1 for a whole GPU, a MIG
    /// instance's compute slices over its parent's (`3g.40gb` on an A100: 3/7).
    pub weight: f64,
}

/// Compute slices of a whole GPU of `model` (A30: 4; A100, H100, H200, B200: 7).
fn gpu_slices(model: &str) -> f64 {
    if model.contains("A30") { 4.0 } else { 7.0 }
}

/// A MIG profile's compute slices: the number before `g` (`3g.40gb` → 3).
fn profile_slices(profile: &str) -> Option<f64> {
    let n = profile.split_once('g')?.0;
    n.parse::<u32>().ok().filter(|n| *n > 0).map(f64::from)
}

impl Cluster {
    /// Facts about a listed device; `None` when no node lists it.
    pub fn describe(&self, uuid: &str) -> Option<DeviceFacts> {
        let inv = self.inventory().read();
        let (k, d) = inv.device(uuid)?;
        let model = inv.model_name(d.class.model).to_owned();
        let profile = d
            .class
            .mig
            .then(|| inv.profile_name(d.class.profile).to_owned());
        let weight = match &profile {
            Some(p) => profile_slices(p).map_or(1.0, |s| (s / gpu_slices(&model)).min(1.0)),
            None => 1.0,
        };
        Some(DeviceFacts {
            node: k.node.to_string(),
            model,
            profile,
            mig_parent: d.mig_parent,
            weight,
        })
    }

    /// Normalized GPU-hours per hour on `devices` (unknown devices count 1).
    pub fn weight(&self, devices: &[String]) -> f64 {
        devices
            .iter()
            .map(|u| self.describe(u).map_or(1.0, |f| f.weight))
            .sum()
    }

    /// Devices to book for `req` over `[start, end)`: on one node (by name), none in
    /// a window that overlaps it; devices nobody holds now come first (booking a held
    /// one ends that server at `start`). `None`: nothing fits the window.
    pub fn pick_for_window(
        &self,
        req: &DeviceRequest,
        start: u64,
        end: u64,
    ) -> Option<(String, Vec<String>)> {
        let (count, gpu, model, profile) = match req {
            DeviceRequest::Exact(_) => return None,
            DeviceRequest::Gpus { count, model } => (*count as usize, true, model.as_deref(), None),
            DeviceRequest::Mig { profile, model } => (1, false, model.as_deref(), Some(&**profile)),
        };
        let inv = self.inventory().read();
        let mid = inv.model_filter(model)?;
        let pid = match profile {
            Some(p) => Some(inv.profile_id(p)?),
            None => None,
        };
        let st = self.ledger().state();
        let mut nodes: Vec<&Arc<str>> = inv.node_names().collect();
        nodes.sort();
        for node in nodes {
            let mut by_class: HashMap<_, (Vec<String>, Vec<String>)> = HashMap::new();
            for (_, d) in inv.node_devices(node) {
                let fits = d.allocatable()
                    && d.class.mig != gpu
                    && mid.is_none_or(|m| d.class.model == m)
                    && pid.is_none_or(|p| d.class.profile == p);
                if !fits
                    || !self
                        .calendar()
                        .conflicts(&[d.uuid.to_string()], start, end)
                        .is_empty()
                {
                    continue;
                }
                let (idle, busy) = by_class.entry(d.class).or_default();
                if st.holder_of(&d.uuid).is_none() {
                    idle.push(d.uuid.to_string());
                } else {
                    busy.push(d.uuid.to_string());
                }
            }
            let mut classes: Vec<_> = by_class.into_iter().collect();
            classes.sort_by_key(|(c, _)| (c.model, c.profile));
            for (_, (mut idle, busy)) in classes {
                idle.extend(busy);
                if idle.len() >= count {
                    idle.truncate(count);
                    return Some((node.to_string(), idle));
                }
            }
        }
        None
    }

    /// Up to the devices `req` asks for among `among` (the caller's reservation),
    /// free now; `None` when they do not have enough.
    pub fn pick_among(&self, among: &[String], req: &DeviceRequest) -> Option<Vec<String>> {
        let inv = self.inventory().read();
        let st = self.ledger().state();
        let free: Vec<(&Dev, &str)> = among
            .iter()
            .filter_map(|u| inv.device(u))
            .filter(|(_, d)| st.device_free(d))
            .map(|(_, d)| (d, inv.model_name(d.class.model)))
            .collect();
        match req {
            DeviceRequest::Exact(uuids) => {
                let ok = uuids
                    .iter()
                    .all(|u| free.iter().any(|(d, _)| &*d.uuid == u));
                ok.then(|| uuids.clone())
            }
            DeviceRequest::Gpus { count, model } => {
                let picked: Vec<String> = free
                    .iter()
                    .filter(|(d, m)| !d.class.mig && model.as_deref().is_none_or(|x| x == *m))
                    .take(*count as usize)
                    .map(|(d, _)| d.uuid.to_string())
                    .collect();
                (picked.len() == *count as usize).then_some(picked)
            }
            DeviceRequest::Mig { profile, model } => free
                .iter()
                .find(|(d, m)| {
                    d.class.mig
                        && inv.profile_name(d.class.profile) == profile
                        && model.as_deref().is_none_or(|x| x == *m)
                })
                .map(|(d, _)| vec![d.uuid.to_string()]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mig_weights_are_slices_over_the_parents() {
        assert_eq!(profile_slices("3g.40gb"), Some(3.0));
        assert_eq!(profile_slices("1g.10gb+me"), Some(1.0));
        assert_eq!(profile_slices("gpu"), None);
        assert!((3.0 / gpu_slices("NVIDIA A100-SXM4-80GB") - 3.0 / 7.0).abs() < 1e-12);
        assert_eq!(gpu_slices("NVIDIA A30"), 4.0);
    }
}
