//! The views that read the inventory and the ledger together: nodes with their free
//! counts, pages of devices with availability and holders, the availability summary.
//! Each takes the inventory's read lock first, then the ledger's mutex.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::Arc;

use kcloud_common::inventory::DeviceKind;
use kcloud_core::Result;

use crate::inventory::{
    Availability, Class, DevKey, DeviceQuery, DeviceView, FleetSummary, GroupSummary, InvState,
    Inventory, MAX_PAGE, NodeEntry, NodeRow, NodeView, Page,
};
use crate::ledger::{Ledger, LedgerState};

impl Inventory {
    /// Every node, by name.
    pub fn nodes(&self, ledger: &Ledger, now_ms: u64) -> Vec<NodeView> {
        let st = self.read();
        let mut lg = ledger.state();
        lg.sync(&st);
        st.nodes
            .iter()
            .map(|(name, e)| node_view(&st, name, e, &lg, now_ms))
            .collect()
    }

    pub fn node(&self, name: &str, ledger: &Ledger, now_ms: u64) -> Option<NodeView> {
        let st = self.read();
        let (name, e) = st.nodes.get_key_value(name)?;
        let mut lg = ledger.state();
        lg.sync(&st);
        Some(node_view(&st, name, e, &lg, now_ms))
    }

    /// One page of devices in `(node, GPU index, MIG index)` order, filtered by `q`.
    ///
    /// A page is a range scan from the cursor; with `available=true`, nodes without a
    /// free matching device are skipped whole using the ledger's per-node counts.
    /// Errors: `BadRequest` for a cursor this method did not produce.
    pub fn devices(
        &self,
        q: &DeviceQuery,
        ledger: &Ledger,
        now_ms: u64,
    ) -> Result<Page<DeviceView>> {
        let limit = q.limit.clamp(1, MAX_PAGE);
        let after = q.cursor.as_deref().map(DevKey::from_cursor).transpose()?;
        let empty = Ok(Page {
            items: Vec::new(),
            next_cursor: None,
        });
        let st = self.read();
        let Some(filter) = st.filter(q) else {
            return empty;
        };
        let mut lg = ledger.state();
        let only_free = filter.available == Some(true);
        if only_free && !lg.ready() {
            return empty;
        }
        lg.sync(&st);

        let (lo, hi) = match &q.node {
            None => (
                after.map_or(Bound::Unbounded, Bound::Excluded),
                Bound::Unbounded,
            ),
            Some(node) => {
                let Some((node, _)) = st.nodes.get_key_value(node.as_str()) else {
                    return empty;
                };
                let (start, end) = (DevKey::node_start(node), DevKey::node_end(node));
                let lo = match after {
                    Some(a) if a >= end => return empty,
                    Some(a) if a >= start => Bound::Excluded(a),
                    _ => Bound::Included(start),
                };
                (lo, Bound::Included(end))
            }
        };

        let mut items = Vec::with_capacity(limit.min(256));
        let mut last: Option<&DevKey> = None;
        let mut more = false;
        let mut current: Option<(&Arc<str>, &NodeEntry, bool)> = None;
        let mut it = st.devices.range((lo, hi));
        while let Some((key, dev)) = it.next() {
            if !filter.class(&dev.class) {
                continue;
            }
            let (entry, fresh) = match current {
                Some((n, e, f)) if Arc::ptr_eq(n, &key.node) => (e, f),
                _ => {
                    let Some((name, e)) = st.nodes.get_key_value(&key.node) else {
                        continue;
                    };
                    let fresh = st.is_fresh(e, now_ms);
                    if only_free
                        && (!fresh
                            || !lg
                                .node_counts(name)
                                .iter()
                                .any(|c| c.free > 0 && filter.class(&c.class)))
                    {
                        // Nothing free here: jump past the node.
                        if q.node.is_some() {
                            break;
                        }
                        it = st
                            .devices
                            .range((Bound::Excluded(DevKey::node_end(name)), Bound::Unbounded));
                        current = None;
                        continue;
                    }
                    current = Some((name, e, fresh));
                    (e, fresh)
                }
            };
            let available = fresh && lg.ready() && lg.device_free(dev);
            if filter.available.is_some_and(|a| a != available) {
                continue;
            }
            if items.len() == limit {
                more = true;
                break;
            }
            let holder = lg.holder_of(&dev.uuid).cloned();
            items.push(st.view(key, dev, entry, available, !fresh, holder));
            last = Some(key);
        }
        Ok(Page {
            items,
            next_cursor: if more { last.map(DevKey::cursor) } else { None },
        })
    }

    /// Total and free devices per (model, kind, MIG profile), honouring the query's
    /// node, model, profile and kind filters (not `available`, cursor or limit). Sorted
    /// by model, then GPUs before MIG, then profile.
    pub fn summary(&self, q: &DeviceQuery, ledger: &Ledger, now_ms: u64) -> Vec<Availability> {
        let st = self.read();
        let Some(filter) = st.filter(q) else {
            return Vec::new();
        };
        let mut lg = ledger.state();
        lg.sync(&st);
        let ready = lg.ready();
        // A handful of classes (model × profile) across the cluster: a linear scan of
        // a small vector beats hashing in this per-node loop.
        let mut acc: Vec<(Class, u32, u32)> = Vec::new();
        let mut add = |name: &str, e: &NodeEntry| {
            let fresh = ready && st.is_fresh(e, now_ms);
            for c in lg.node_counts(name) {
                if filter.class(&c.class) {
                    let i = match acc.iter().position(|(k, _, _)| *k == c.class) {
                        Some(i) => i,
                        None => {
                            acc.push((c.class, 0, 0));
                            acc.len() - 1
                        }
                    };
                    acc[i].1 += c.total;
                    if fresh {
                        acc[i].2 += c.free;
                    }
                }
            }
        };
        match &q.node {
            Some(node) => {
                if let Some((name, e)) = st.nodes.get_key_value(node.as_str()) {
                    add(name, e);
                }
            }
            None => {
                for (name, e) in &st.nodes {
                    add(name, e);
                }
            }
        }
        let mut out: Vec<Availability> = acc
            .into_iter()
            .map(|(c, total, free)| Availability {
                model: st.model_name(c.model).to_owned(),
                kind: if c.mig {
                    DeviceKind::Mig
                } else {
                    DeviceKind::Gpu
                },
                profile: c.mig.then(|| st.profile_name(c.profile).to_owned()),
                total,
                free,
            })
            .collect();
        out.sort_by(|a, b| {
            (&a.model, a.kind == DeviceKind::Mig, &a.profile).cmp(&(
                &b.model,
                b.kind == DeviceKind::Mig,
                &b.profile,
            ))
        });
        out
    }
}

impl Inventory {
    /// A node's line for a fleet list; `None` when it is not listed.
    pub fn row(&self, name: &str, ledger: &Ledger, now_ms: u64) -> Option<NodeRow> {
        let st = self.read();
        let (name, e) = st.nodes.get_key_value(name)?;
        let mut lg = ledger.state();
        lg.sync(&st);
        Some(row(&st, name, e, &lg, now_ms))
    }

    /// Every node's line, in name order.
    pub fn rows(&self, ledger: &Ledger, now_ms: u64) -> Vec<NodeRow> {
        let st = self.read();
        let mut lg = ledger.state();
        lg.sync(&st);
        st.nodes
            .iter()
            .map(|(name, e)| row(&st, name, e, &lg, now_ms))
            .collect()
    }

    /// The fleet summary: the per-model/profile availability of [`Inventory::summary`]
    /// and counts per node group.
    pub fn fleet(&self, ledger: &Ledger, now_ms: u64) -> FleetSummary {
        let classes = self.summary(&DeviceQuery::default(), ledger, now_ms);
        let st = self.read();
        let mut lg = ledger.state();
        lg.sync(&st);
        let ready = lg.ready();
        let mut groups: BTreeMap<&str, GroupSummary> = BTreeMap::new();
        let (mut stale, mut total, mut free) = (0, 0, 0);
        for (name, e) in &st.nodes {
            let fresh = st.is_fresh(e, now_ms);
            let (t, f) = lg
                .node_counts(name)
                .iter()
                .fold((0, 0), |(t, f), c| (t + c.total, f + c.free));
            let f = if fresh && ready { f } else { 0 };
            let key = e.snap.group.as_deref().unwrap_or("");
            let g = groups.entry(key).or_insert_with(|| GroupSummary {
                group: key.to_owned(),
                nodes: 0,
                stale: 0,
                devices_total: 0,
                devices_free: 0,
            });
            g.nodes += 1;
            g.stale += u32::from(!fresh);
            g.devices_total += t;
            g.devices_free += f;
            stale += u32::from(!fresh);
            total += t;
            free += f;
        }
        FleetSummary {
            nodes: st.nodes.len() as u32,
            stale,
            devices_total: total,
            devices_free: free,
            classes,
            groups: groups.into_values().collect(),
        }
    }
}

fn row(st: &InvState, name: &str, e: &NodeEntry, lg: &LedgerState, now_ms: u64) -> NodeRow {
    let v = node_view(st, name, e, lg, now_ms);
    let mut models: Vec<String> = Vec::new();
    for g in &e.snap.gpus {
        if !models.contains(&g.model) {
            models.push(g.model.clone());
        }
    }
    NodeRow {
        name: v.name,
        group: v.group,
        models,
        gpus: v.gpus,
        devices_total: v.devices_total,
        devices_free: v.devices_free,
        stale: v.stale,
        simulated: v.simulated,
    }
}

/// A node as the API shows it, with its free and total devices from the ledger.
fn node_view(st: &InvState, name: &str, e: &NodeEntry, lg: &LedgerState, now_ms: u64) -> NodeView {
    let stale = !st.is_fresh(e, now_ms);
    let (total, free) = lg
        .node_counts(name)
        .iter()
        .fold((0, 0), |(t, f), c| (t + c.total, f + c.free));
    NodeView {
        name: name.to_owned(),
        stale,
        last_seen_ms: e.received_at_ms,
        age_seconds: now_ms.saturating_sub(e.received_at_ms) / 1000,
        simulated: e.snap.simulated,
        group: e.snap.group.clone(),
        agent_version: e.snap.agent_version.clone(),
        nvml_up: e.snap.nvml.up,
        driver_version: e.snap.nvml.driver_version.clone(),
        host: e.snap.host.clone(),
        gpus: e.snap.gpus.len() as u32,
        devices_total: total,
        devices_free: if stale || !lg.ready() { 0 } else { free },
    }
}
