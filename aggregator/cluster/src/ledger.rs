//! Exclusive allocation of GPUs and MIG instances: the only place that decides who holds
//! a device.
//!
//! A server (a [`Holder`]) gets devices in two steps: [`Ledger::claim`] checks and
//! takes them atomically, and [`Ledger::commit`] (once the server exists) or
//! [`Ledger::abort`] finishes it; [`Ledger::sweep`] aborts claims that were never
//! finished, so a failed create never leaks a device. [`Ledger::rebuild`] loads the truth
//! (existing servers) at start; until then the ledger is not ready and `claim` answers
//! `Unavailable`.
//!
//! # Rules
//!
//! - A device must be in the inventory, on a fresh node, not lost, and allocatable: a GPU
//!   in MIG mode is never given out whole (`BadRequest` naming its MIG instances); a MIG
//!   instance is not given out while its parent GPU is held whole (MIG mode switched on
//!   under a holder), and a whole GPU not while one of its former MIG instances is held
//!   (both `Conflict`).
//! - One request: 1 to [`MAX_DEVICES_PER_REQUEST`] devices, no duplicates, all on one
//!   node (`BadRequest`). A holder that already holds or claims devices gets `Conflict`;
//!   so does a request for a taken device (named in the message). Unknown UUID:
//!   `NotFound`. Over the user's quota: `QuotaExceeded`.
//!
//! # Placement policy for `Gpus` and `Mig` requests: best fit
//!
//! - `Gpus { count, model }`: among fresh nodes, the (node, model) with the **fewest free
//!   whole GPUs of that model that is still ≥ `count`**, ties broken by node name, then
//!   model name. All devices of one request are of one model, also when `model` is
//!   `None`. On that node the lowest-index free GPUs are taken. Packing small requests
//!   onto already-used nodes keeps whole free nodes for large requests.
//! - `Mig { profile, model }`: the fresh node with the fewest free instances of that
//!   (model, profile), ties by node name, then model; on it, the GPU with the fewest such
//!   free instances (ties by GPU index), and on that GPU the lowest MIG index.
//! - Nothing fits: `Conflict`, e.g. "no fresh node has 4 free NVIDIA A100-SXM4-80GB GPUs".
//!
//! The search does not scan devices: the ledger keeps, per node, free and total counts
//! per (kind, model, profile) and per class an ordered set of `(free, node)`, refreshed
//! for the nodes whose layout changed (the inventory journals them) or whose holdings
//! changed. Staleness is time-based, so it is checked while walking the ordered set.
//!
//! # Lock order
//!
//! The inventory's read lock first, then this ledger's mutex; never the other way round.
//! Methods that do not take an [`Inventory`] (`commit`, `abort`, `release`, `sweep`, ...)
//! take only the mutex.

use std::collections::{BTreeSet, HashMap, HashSet};

use rustc_hash::FxHashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use kcloud_core::device::{DeviceRequest, Holder, MAX_DEVICES_PER_REQUEST};
use kcloud_core::signal::Signal;
use kcloud_core::{Error, Result};

use crate::inventory::{Class, Dev, DevKey, InvState, Inventory};

/// Devices taken for a holder, until [`Ledger::commit`] or [`Ledger::abort`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claim {
    pub id: u64,
    pub holder: Holder,
    pub node: String,
    pub devices: Vec<String>,
}

/// Devices a claim must not take now, each with why: reserved by someone else in
/// this window, or promised to a request that waits ahead in the queue.
#[derive(Clone, Debug, Default)]
pub struct Avoid {
    devices: HashMap<String, String>,
}

impl Avoid {
    pub fn insert(&mut self, uuid: &str, why: impl FnOnce() -> String) {
        if !self.devices.contains_key(uuid) {
            self.devices.insert(uuid.to_owned(), why());
        }
    }

    pub fn contains(&self, uuid: &str) -> bool {
        self.devices.contains_key(uuid)
    }

    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }

    pub fn len(&self) -> usize {
        self.devices.len()
    }

    fn why(&self, uuid: &str) -> Option<&str> {
        self.devices.get(uuid).map(String::as_str)
    }
}

/// The allocation ledger. `Send + Sync`; share it as `Arc<Ledger>`.
pub struct Ledger {
    state: Mutex<LedgerState>,
    /// Bumped after every change of who holds what, for live views.
    changed: Signal,
}

impl Default for Ledger {
    fn default() -> Self {
        Self::new()
    }
}

struct Hold {
    holder: Holder,
    /// `Some` while claimed, `None` once committed.
    claim: Option<u64>,
    /// Node whose free counts include this device; `None` until known (after rebuild).
    node: Option<Arc<str>>,
    /// Parent GPU of a MIG instance, when known.
    parent: Option<Arc<str>>,
}

struct Pending {
    holder: Holder,
    devices: Vec<String>,
    created_ms: u64,
}

/// Free and total devices of one class on one node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ClassCount {
    pub(crate) class: Class,
    pub(crate) total: u32,
    pub(crate) free: u32,
}

/// Per-node free counts and, per class, nodes ordered by free count (those with at
/// least one free device).
#[derive(Default)]
struct FreeIndex {
    /// `(inventory id, layout generation)` the counts reflect; `None`: rebuild all.
    synced: Option<(u64, u64)>,
    /// Nodes whose holdings changed since their counts were computed.
    dirty: HashSet<Arc<str>>,
    /// Looked up once per node by every availability summary: FxHash, not SipHash
    /// (node names come from authenticated agents, not from the open internet).
    nodes: FxHashMap<Arc<str>, Vec<ClassCount>>,
    sets: HashMap<Class, BTreeSet<(u32, Arc<str>)>>,
}

/// The ledger's state behind its mutex; the inventory reads it while building views.
pub(crate) struct LedgerState {
    ready: bool,
    next_id: u64,
    held: HashMap<String, Hold>,
    by_holder: HashMap<Holder, Vec<String>>,
    per_user: HashMap<String, u32>,
    claims: HashMap<u64, Pending>,
    /// Held MIG instances per parent GPU: that GPU is not free whole.
    slices: HashMap<Arc<str>, u32>,
    index: FreeIndex,
}

type Picked = Vec<(Arc<str>, Option<Arc<str>>)>;

impl Ledger {
    /// An empty ledger that is not ready: `claim` answers `Unavailable` until
    /// [`Ledger::rebuild`].
    pub fn new() -> Self {
        Self {
            state: Mutex::new(LedgerState {
                ready: false,
                next_id: 1,
                held: HashMap::new(),
                by_holder: HashMap::new(),
                per_user: HashMap::new(),
                claims: HashMap::new(),
                slices: HashMap::new(),
                index: FreeIndex::default(),
            }),
            changed: Default::default(),
        }
    }

    /// Wakes after the next change of holdings (claim, commit, abort, release, ...).
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    pub(crate) fn state(&self) -> MutexGuard<'_, LedgerState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Replaces all holdings with `held` (committed), from the servers that exist at
    /// start; drops pending claims; marks the ledger ready. A device listed twice
    /// keeps its first holder (logged).
    pub fn rebuild(&self, held: impl IntoIterator<Item = (String, Holder)>) {
        let mut st = self.state();
        st.held.clear();
        st.by_holder.clear();
        st.per_user.clear();
        st.claims.clear();
        st.slices.clear();
        st.index.synced = None;
        for (uuid, holder) in held {
            if let Some(first) = st.held.get(&uuid) {
                tracing::warn!(
                    device = %uuid,
                    kept = %format_args!("{}/{}", first.holder.user, first.holder.server),
                    dropped = %format_args!("{}/{}", holder.user, holder.server),
                    "device held twice in the stored state; keeping the first holder"
                );
                continue;
            }
            *st.per_user.entry(holder.user.clone()).or_default() += 1;
            st.by_holder
                .entry(holder.clone())
                .or_default()
                .push(uuid.clone());
            st.held.insert(
                uuid,
                Hold {
                    holder,
                    claim: None,
                    node: None,
                    parent: None,
                },
            );
        }
        st.ready = true;
        drop(st);
        self.changed.notify();
    }

    pub fn is_ready(&self) -> bool {
        self.state().ready
    }

    /// Atomically checks `req` and claims its devices for `holder`.
    ///
    /// `max_devices_for_user`: the user's device quota; devices the user holds or has
    /// claimed plus those requested must not exceed it. Errors: see the module docs.
    pub fn claim(
        &self,
        holder: Holder,
        req: &DeviceRequest,
        inventory: &Inventory,
        max_devices_for_user: Option<u32>,
        now_ms: u64,
    ) -> Result<Claim> {
        self.claim_avoiding(
            holder,
            req,
            inventory,
            max_devices_for_user,
            now_ms,
            &Avoid::default(),
        )
    }

    /// [`Ledger::claim`], never taking a device in `avoid` (an exact request for one
    /// is `Conflict` with its reason; placement looks further).
    pub fn claim_avoiding(
        &self,
        holder: Holder,
        req: &DeviceRequest,
        inventory: &Inventory,
        max_devices_for_user: Option<u32>,
        now_ms: u64,
        avoid: &Avoid,
    ) -> Result<Claim> {
        let wanted = check_request(req)?;
        // Lock order: inventory, then ledger.
        let inv = inventory.read();
        let mut st = self.state();
        if !st.ready {
            return Err(Error::Unavailable(
                "the allocation ledger is not ready yet (loading existing servers)".into(),
            ));
        }
        if st.by_holder.contains_key(&holder) {
            return Err(Error::Conflict(format!(
                "server {}/{} already holds devices",
                holder.user, holder.server
            )));
        }
        if let Some(max) = max_devices_for_user {
            let have = st.per_user.get(&holder.user).copied().unwrap_or(0);
            if have.saturating_add(wanted) > max {
                return Err(Error::QuotaExceeded(format!(
                    "device quota exceeded: {} holds {have} of {max} devices and asked for {wanted} more",
                    holder.user
                )));
            }
        }
        st.sync(&inv);
        let (node, picked) = match req {
            DeviceRequest::Exact(uuids) => st.resolve_exact(&inv, uuids, now_ms, avoid)?,
            DeviceRequest::Gpus { count, model } => {
                st.resolve_gpus(&inv, *count, model.as_deref(), now_ms, avoid)?
            }
            DeviceRequest::Mig { profile, model } => {
                st.resolve_mig(&inv, profile, model.as_deref(), now_ms, avoid)?
            }
        };
        let granted = st.grant(&inv, holder, node, picked, now_ms);
        drop((st, inv));
        self.changed.notify();
        Ok(granted)
    }

    /// Makes a claim permanent. Unknown, aborted or swept: `NotFound`.
    pub fn commit(&self, reservation_id: u64) -> Result<()> {
        let mut st = self.state();
        let p = st.claims.remove(&reservation_id).ok_or_else(|| {
            Error::NotFound(format!(
                "claim {reservation_id} not found (aborted or expired)"
            ))
        })?;
        for uuid in &p.devices {
            if let Some(h) = st.held.get_mut(uuid)
                && h.claim == Some(reservation_id)
            {
                h.claim = None;
            }
        }
        drop(st);
        self.changed.notify();
        Ok(())
    }

    /// Returns a claim's devices to the pool; unknown ids are ignored.
    pub fn abort(&self, reservation_id: u64) {
        self.state().abort(reservation_id);
        self.changed.notify();
    }

    /// Frees everything `holder` holds, committed or claimed; returns those devices.
    pub fn release(&self, holder: &Holder) -> Vec<String> {
        let mut st = self.state();
        let Some(devices) = st.by_holder.remove(holder) else {
            return Vec::new();
        };
        for uuid in &devices {
            if let Some(h) = st.free_hold(uuid)
                && let Some(id) = h.claim
            {
                st.claims.remove(&id);
            }
        }
        st.uncount(&holder.user, devices.len());
        drop(st);
        self.changed.notify();
        devices
    }

    /// Who holds `uuid` (claimed or committed).
    pub fn holder(&self, uuid: &str) -> Option<Holder> {
        self.state().held.get(uuid).map(|h| h.holder.clone())
    }

    /// Every held device with its holder and whether it is committed, by UUID.
    pub fn holdings(&self) -> Vec<(String, Holder, bool)> {
        let st = self.state();
        let mut out: Vec<_> = st
            .held
            .iter()
            .map(|(u, h)| (u.clone(), h.holder.clone(), h.claim.is_none()))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Devices held or claimed by all servers of `user`.
    pub fn devices_held_by(&self, user: &str) -> u32 {
        self.state().per_user.get(user).copied().unwrap_or(0)
    }

    /// Aborts claims older than `ttl`; returns their ids, ascending.
    pub fn sweep(&self, now_ms: u64, ttl: Duration) -> Vec<u64> {
        let ttl_ms = ttl.as_millis().min(u64::MAX as u128) as u64;
        let mut st = self.state();
        let mut ids: Vec<u64> = st
            .claims
            .iter()
            .filter(|(_, p)| now_ms.saturating_sub(p.created_ms) > ttl_ms)
            .map(|(id, _)| *id)
            .collect();
        ids.sort_unstable();
        for &id in &ids {
            tracing::warn!(claim = id, "aborting a claim that was never committed");
            st.abort(id);
        }
        drop(st);
        if !ids.is_empty() {
            self.changed.notify();
        }
        ids
    }
}

/// Shape checks that need no state; returns how many devices the request takes.
fn check_request(req: &DeviceRequest) -> Result<u32> {
    match req {
        DeviceRequest::Exact(uuids) => {
            if uuids.is_empty() {
                return Err(Error::BadRequest("devices: empty list".into()));
            }
            if uuids.len() > MAX_DEVICES_PER_REQUEST as usize {
                return Err(Error::BadRequest(format!(
                    "devices: at most {MAX_DEVICES_PER_REQUEST} per server"
                )));
            }
            for (i, u) in uuids.iter().enumerate() {
                if uuids[..i].contains(u) {
                    return Err(Error::BadRequest(format!("devices: {u} is listed twice")));
                }
            }
            Ok(uuids.len() as u32)
        }
        DeviceRequest::Gpus { count, .. } => {
            if !(1..=MAX_DEVICES_PER_REQUEST).contains(count) {
                return Err(Error::BadRequest(format!(
                    "gpu_request.count: must be 1 to {MAX_DEVICES_PER_REQUEST}"
                )));
            }
            Ok(*count)
        }
        DeviceRequest::Mig { profile, .. } => {
            if profile.is_empty() {
                return Err(Error::BadRequest(
                    "gpu_request.profile: must not be empty".into(),
                ));
            }
            Ok(1)
        }
    }
}

impl LedgerState {
    pub(crate) fn ready(&self) -> bool {
        self.ready
    }

    pub(crate) fn holder_of(&self, uuid: &str) -> Option<&Holder> {
        self.held.get(uuid).map(|h| &h.holder)
    }

    /// Free now as far as the ledger knows: allocatable by layout, not held, parent GPU
    /// not held whole, no MIG instance of it held. Freshness and readiness aside.
    pub(crate) fn device_free(&self, d: &Dev) -> bool {
        if !d.allocatable() {
            return false;
        }
        if self.held.is_empty() {
            return true;
        }
        if self.held.contains_key(&*d.uuid) {
            return false;
        }
        match &d.parent {
            Some(p) => !self.held.contains_key(&**p),
            None => self.slices.is_empty() || !self.slices.contains_key(&d.uuid),
        }
    }

    /// Nodes with at least one free device of `class`, most free first, as of the last
    /// [`Self::sync`].
    pub(crate) fn most_free(&self, class: &Class) -> impl Iterator<Item = (u32, &Arc<str>)> {
        self.index
            .sets
            .get(class)
            .into_iter()
            .flat_map(|set| set.iter().rev().map(|(free, node)| (*free, node)))
    }

    /// The classes that have a free device somewhere.
    pub(crate) fn classes_with_free(&self) -> impl Iterator<Item = &Class> {
        self.index
            .sets
            .iter()
            .filter(|(_, s)| !s.is_empty())
            .map(|(c, _)| c)
    }

    /// Free and total counts per class on `node`, as of the last [`Self::sync`].
    pub(crate) fn node_counts(&self, node: &str) -> &[ClassCount] {
        self.index.nodes.get(node).map_or(&[], Vec::as_slice)
    }

    /// Brings the free counts up to date with `inv`: only the nodes whose layout or
    /// holdings changed, unless the inventory's journal no longer reaches back.
    pub(crate) fn sync(&mut self, inv: &InvState) {
        let full = match self.index.synced {
            Some((id, generation)) if id == inv.id => match inv.changed_since(generation) {
                Some(changed) => {
                    self.index.dirty.extend(changed.cloned());
                    false
                }
                None => true,
            },
            _ => true,
        };
        if full {
            self.index.nodes.clear();
            self.index.sets.clear();
            self.index.dirty.clear();
            for node in inv.node_names() {
                self.reindex(inv, node);
            }
        } else if !self.index.dirty.is_empty() {
            let mut dirty = std::mem::take(&mut self.index.dirty);
            for node in &dirty {
                self.reindex(inv, node);
            }
            dirty.clear();
            self.index.dirty = dirty;
        }
        self.index.synced = Some((inv.id, inv.layout_gen));
    }

    /// Recomputes one node's counts from the inventory and the holdings.
    fn reindex(&mut self, inv: &InvState, node: &Arc<str>) {
        if let Some(old) = self.index.nodes.remove(node) {
            for c in old.iter().filter(|c| c.free > 0) {
                if let Some(set) = self.index.sets.get_mut(&c.class) {
                    set.remove(&(c.free, node.clone()));
                }
            }
        }
        if !inv.has_node(node) {
            return;
        }
        if !self.held.is_empty() {
            // Learn where held devices are (after a rebuild, or a move between nodes)
            // and which GPU each held MIG instance belongs to.
            for (key, d) in inv.node_devices(node) {
                let Some(h) = self.held.get_mut(&*d.uuid) else {
                    continue;
                };
                h.node = Some(key.node.clone());
                if d.parent.is_some() && h.parent != d.parent {
                    if let Some(old) = h.parent.take() {
                        dec(&mut self.slices, &old);
                    }
                    if let Some(p) = &d.parent {
                        *self.slices.entry(p.clone()).or_default() += 1;
                    }
                    h.parent = d.parent.clone();
                }
            }
        }
        let mut counts: Vec<ClassCount> = Vec::new();
        for (_, d) in inv.node_devices(node) {
            if d.mig_parent {
                continue;
            }
            let free = u32::from(self.device_free(d));
            match counts.iter_mut().find(|c| c.class == d.class) {
                Some(c) => {
                    c.total += 1;
                    c.free += free;
                }
                None => counts.push(ClassCount {
                    class: d.class,
                    total: 1,
                    free,
                }),
            }
        }
        for c in counts.iter().filter(|c| c.free > 0) {
            self.index
                .sets
                .entry(c.class)
                .or_default()
                .insert((c.free, node.clone()));
        }
        self.index.nodes.insert(node.clone(), counts);
    }

    fn resolve_exact(
        &self,
        inv: &InvState,
        uuids: &[String],
        now_ms: u64,
        avoid: &Avoid,
    ) -> Result<(Arc<str>, Picked)> {
        let mut found: Vec<(&DevKey, &Dev)> = Vec::with_capacity(uuids.len());
        for u in uuids {
            let d = inv
                .device(u)
                .ok_or_else(|| Error::NotFound(format!("device {u} not found")))?;
            found.push(d);
        }
        let (first_key, first) = found[0];
        let node = &first_key.node;
        if let Some((k, d)) = found.iter().find(|(k, _)| k.node != *node) {
            return Err(Error::BadRequest(format!(
                "devices: all devices of a server must be on one node; {} is on {node} but {} is on {}",
                first.uuid, d.uuid, k.node
            )));
        }
        for (k, d) in &found {
            if d.mig_parent {
                let children: Vec<&str> = inv.mig_children(k).map(|c| &*c.uuid).collect();
                return Err(Error::BadRequest(format!(
                    "GPU {} is in MIG mode and is allocatable only through its MIG instances: {}",
                    d.uuid,
                    children.join(", ")
                )));
            }
        }
        if !inv.node_fresh(node, now_ms) {
            return Err(Error::Conflict(format!(
                "node {node} is stale (no recent inventory): its devices cannot be allocated"
            )));
        }
        for (_, d) in &found {
            if let Some(why) = avoid.why(&d.uuid) {
                return Err(Error::Conflict(format!("device {}: {why}", d.uuid)));
            }
            if d.lost {
                return Err(Error::Conflict(format!("device {} is lost", d.uuid)));
            }
            if self.held.contains_key(&*d.uuid) {
                return Err(Error::Conflict(format!(
                    "device {} is already allocated",
                    d.uuid
                )));
            }
            match &d.parent {
                Some(p) if self.held.contains_key(&**p) => {
                    return Err(Error::Conflict(format!(
                        "MIG instance {}: its parent GPU {p} is allocated whole",
                        d.uuid
                    )));
                }
                None if self.slices.contains_key(&d.uuid) => {
                    return Err(Error::Conflict(format!(
                        "GPU {}: some of its MIG instances are still allocated",
                        d.uuid
                    )));
                }
                _ => {}
            }
        }
        let picked = found
            .iter()
            .map(|(_, d)| (d.uuid.clone(), d.parent.clone()))
            .collect();
        Ok((node.clone(), picked))
    }

    /// Best fit over `classes`: the fresh node with the fewest free devices of a class
    /// that still has `need`, ties by node name, then model and profile name.
    ///
    /// With `avoid`, a node holding an avoided device counts only its other free
    /// devices (its place in the order stays that of all its free devices).
    fn best_fit(
        &self,
        inv: &InvState,
        classes: &[Class],
        need: u32,
        now_ms: u64,
        avoid: &Avoid,
    ) -> Option<(Class, Arc<str>)> {
        let floor: Arc<str> = Arc::from("");
        let avoided_nodes: HashSet<&Arc<str>> = avoid
            .devices
            .keys()
            .filter_map(|u| inv.device(u).map(|(k, _)| &k.node))
            .collect();
        let fits = |class: &Class, node: &Arc<str>| {
            !avoided_nodes.contains(node)
                || inv
                    .node_devices(node)
                    .filter(|(_, d)| {
                        d.class == *class && !avoid.contains(&d.uuid) && self.device_free(d)
                    })
                    .take(need as usize)
                    .count()
                    == need as usize
        };
        let mut best: Option<(u32, &Arc<str>, &str, &str, Class)> = None;
        for class in classes {
            let Some(set) = self.index.sets.get(class) else {
                continue;
            };
            let Some((free, node)) = set
                .range((need, floor.clone())..)
                .find(|(_, n)| inv.node_fresh(n, now_ms) && fits(class, n))
            else {
                continue;
            };
            let model = inv.model_name(class.model);
            let profile = if class.mig {
                inv.profile_name(class.profile)
            } else {
                ""
            };
            let better = best
                .as_ref()
                .is_none_or(|b| (*free, &**node, model, profile) < (b.0, &**b.1, b.2, b.3));
            if better {
                best = Some((*free, node, model, profile, *class));
            }
        }
        best.map(|(_, node, _, _, class)| (class, node.clone()))
    }

    fn resolve_gpus(
        &self,
        inv: &InvState,
        count: u32,
        model: Option<&str>,
        now_ms: u64,
        avoid: &Avoid,
    ) -> Result<(Arc<str>, Picked)> {
        let classes: Vec<Class> = match model {
            Some(m) => inv
                .model_id(m)
                .map(|model| Class {
                    mig: false,
                    model,
                    profile: 0,
                })
                .into_iter()
                .collect(),
            None => self.index.sets.keys().filter(|c| !c.mig).copied().collect(),
        };
        let Some((class, node)) = self.best_fit(inv, &classes, count, now_ms, avoid) else {
            let noun = if count == 1 { "GPU" } else { "GPUs" };
            return Err(Error::Conflict(match model {
                Some(m) => format!("no fresh node has {count} free {m} {noun}"),
                None => format!("no fresh node has {count} free {noun} of one model"),
            }));
        };
        let picked: Picked = inv
            .node_devices(&node)
            .filter(|(_, d)| d.class == class && !avoid.contains(&d.uuid) && self.device_free(d))
            .take(count as usize)
            .map(|(_, d)| (d.uuid.clone(), None))
            .collect();
        if picked.len() != count as usize {
            return Err(Error::Internal(format!(
                "free counts of node {node} are out of step with its devices"
            )));
        }
        Ok((node, picked))
    }

    fn resolve_mig(
        &self,
        inv: &InvState,
        profile: &str,
        model: Option<&str>,
        now_ms: u64,
        avoid: &Avoid,
    ) -> Result<(Arc<str>, Picked)> {
        let none = || {
            Error::Conflict(match model {
                Some(m) => {
                    format!("no fresh node has a free {m} MIG instance of profile {profile}")
                }
                None => format!("no fresh node has a free MIG instance of profile {profile}"),
            })
        };
        let pid = inv.profile_id(profile).ok_or_else(none)?;
        let mid = match model {
            Some(m) => Some(inv.model_id(m).ok_or_else(none)?),
            None => None,
        };
        let classes: Vec<Class> = self
            .index
            .sets
            .keys()
            .filter(|c| c.mig && c.profile == pid && mid.is_none_or(|m| c.model == m))
            .copied()
            .collect();
        let (class, node) = self
            .best_fit(inv, &classes, 1, now_ms, avoid)
            .ok_or_else(none)?;
        // Per GPU, in GPU order: (free matching instances, first of them).
        let mut per_gpu: Vec<(u32, u32, &Dev)> = Vec::new();
        for (key, d) in inv.node_devices(&node) {
            if d.class != class || avoid.contains(&d.uuid) || !self.device_free(d) {
                continue;
            }
            match per_gpu.last_mut() {
                Some((gpu, n, _)) if *gpu == key.gpu => *n += 1,
                _ => per_gpu.push((key.gpu, 1, d)),
            }
        }
        let (_, _, d) = per_gpu
            .iter()
            .min_by_key(|(gpu, n, _)| (*n, *gpu))
            .ok_or_else(|| {
                Error::Internal(format!(
                    "free counts of node {node} are out of step with its devices"
                ))
            })?;
        Ok((node.clone(), vec![(d.uuid.clone(), d.parent.clone())]))
    }

    fn grant(
        &mut self,
        inv: &InvState,
        holder: Holder,
        node: Arc<str>,
        picked: Picked,
        now_ms: u64,
    ) -> Claim {
        let id = self.next_id;
        self.next_id += 1;
        let devices: Vec<String> = picked.iter().map(|(u, _)| u.to_string()).collect();
        for (uuid, parent) in picked {
            if let Some(p) = &parent {
                *self.slices.entry(p.clone()).or_default() += 1;
            }
            self.held.insert(
                uuid.to_string(),
                Hold {
                    holder: holder.clone(),
                    claim: Some(id),
                    node: Some(node.clone()),
                    parent,
                },
            );
        }
        *self.per_user.entry(holder.user.clone()).or_default() += devices.len() as u32;
        self.by_holder.insert(holder.clone(), devices.clone());
        self.claims.insert(
            id,
            Pending {
                holder: holder.clone(),
                devices: devices.clone(),
                created_ms: now_ms,
            },
        );
        self.reindex(inv, &node);
        tracing::debug!(claim = id, user = %holder.user, server = %holder.server, node = %node, ?devices, "claimed");
        Claim {
            id,
            holder,
            node: node.to_string(),
            devices,
        }
    }

    fn abort(&mut self, id: u64) {
        let Some(p) = self.claims.remove(&id) else {
            return;
        };
        let mut freed = 0;
        for uuid in &p.devices {
            if self.held.get(uuid).is_some_and(|h| h.claim == Some(id)) {
                self.free_hold(uuid);
                freed += 1;
            }
        }
        if self.by_holder.get(&p.holder) == Some(&p.devices) {
            self.by_holder.remove(&p.holder);
        }
        self.uncount(&p.holder.user, freed);
    }

    /// Removes one hold and marks its node's counts for refresh.
    fn free_hold(&mut self, uuid: &str) -> Option<Hold> {
        let h = self.held.remove(uuid)?;
        if let Some(p) = &h.parent {
            dec(&mut self.slices, p);
        }
        match &h.node {
            Some(n) => {
                self.index.dirty.insert(n.clone());
            }
            None => self.index.synced = None,
        }
        Some(h)
    }

    fn uncount(&mut self, user: &str, n: usize) {
        if let Some(c) = self.per_user.get_mut(user) {
            *c = c.saturating_sub(n as u32);
            if *c == 0 {
                self.per_user.remove(user);
            }
        }
    }
}

fn dec(map: &mut HashMap<Arc<str>, u32>, key: &Arc<str>) {
    if let Some(c) = map.get_mut(key) {
        *c -= 1;
        if *c == 0 {
            map.remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::DeviceQuery;
    use kcloud_common::fixtures::*;
    use kcloud_common::inventory::NodeInventory;

    fn h(user: &str, server: &str) -> Holder {
        Holder {
            user: user.into(),
            server: server.into(),
        }
    }

    fn exact(uuids: &[&str]) -> DeviceRequest {
        DeviceRequest::Exact(uuids.iter().map(|u| (*u).to_owned()).collect())
    }

    fn gpus(count: u32, model: Option<&str>) -> DeviceRequest {
        DeviceRequest::Gpus {
            count,
            model: model.map(String::from),
        }
    }

    fn mig(profile: &str, model: Option<&str>) -> DeviceRequest {
        DeviceRequest::Mig {
            profile: profile.into(),
            model: model.map(String::from),
        }
    }

    fn setup(nodes: Vec<NodeInventory>) -> (Inventory, Ledger) {
        let inv = Inventory::new(Duration::from_millis(STALE_MS));
        for n in nodes {
            let name = n.node.clone();
            inv.ingest(&name, n, T0).unwrap();
        }
        let ledger = Ledger::new();
        ledger.rebuild([]);
        (inv, ledger)
    }

    /// mig-node: GPU 0 in MIG mode (1g.10gb ×2, 3g.40gb), GPU 1 whole, GPU 2 lost.
    fn mig_node() -> NodeInventory {
        let mut lost = gpu(2, "GPU-m2", A100);
        lost.lost = true;
        node(
            "mig-node",
            vec![
                with_mig(
                    gpu(0, "GPU-m0", A100),
                    &[
                        ("MIG-m0-0", "1g.10gb"),
                        ("MIG-m0-1", "1g.10gb"),
                        ("MIG-m0-2", "3g.40gb"),
                    ],
                ),
                gpu(1, "GPU-m1", A100),
                lost,
            ],
        )
    }

    fn err_of(r: Result<Claim>) -> Error {
        r.expect_err("expected an error")
    }

    #[test]
    fn claim_is_unavailable_until_rebuilt() {
        let (inv, _) = setup(vec![plain_node("n1", 2, A100)]);
        let ledger = Ledger::new();
        assert!(!ledger.is_ready());
        let e = err_of(ledger.claim(h("a", "s"), &gpus(1, None), &inv, None, T0));
        assert!(matches!(e, Error::Unavailable(_)));
        ledger.rebuild([("GPU-n1-0".into(), h("b", "old"))]);
        assert!(ledger.is_ready());
        let r = ledger
            .claim(h("a", "s"), &gpus(1, None), &inv, None, T0)
            .unwrap();
        assert_eq!(r.devices, vec!["GPU-n1-1"]);
    }

    #[test]
    fn exact_claim_commit_abort_release() {
        let (inv, ledger) = setup(vec![plain_node("n1", 4, A100)]);
        let r = ledger
            .claim(
                h("ann", "nb"),
                &exact(&["GPU-n1-2", "GPU-n1-0"]),
                &inv,
                None,
                T0,
            )
            .unwrap();
        assert_eq!((r.node.as_str(), r.devices.len()), ("n1", 2));
        assert_eq!(r.devices, vec!["GPU-n1-2", "GPU-n1-0"]);
        assert_eq!(ledger.holder("GPU-n1-0"), Some(h("ann", "nb")));
        assert_eq!(ledger.devices_held_by("ann"), 2);
        assert!(ledger.holdings().iter().all(|(_, _, committed)| !committed));
        ledger.commit(r.id).unwrap();
        assert!(ledger.holdings().iter().all(|(_, _, committed)| *committed));
        assert!(matches!(ledger.commit(r.id), Err(Error::NotFound(_))));
        assert!(matches!(ledger.commit(9999), Err(Error::NotFound(_))));

        let r2 = ledger
            .claim(h("bob", "x"), &exact(&["GPU-n1-1"]), &inv, None, T0)
            .unwrap();
        ledger.abort(r2.id);
        ledger.abort(r2.id);
        assert_eq!(ledger.holder("GPU-n1-1"), None);
        assert_eq!(ledger.devices_held_by("bob"), 0);
        assert!(matches!(ledger.commit(r2.id), Err(Error::NotFound(_))));

        let mut freed = ledger.release(&h("ann", "nb"));
        freed.sort();
        assert_eq!(freed, vec!["GPU-n1-0", "GPU-n1-2"]);
        assert!(ledger.holdings().is_empty());
        assert_eq!(ledger.devices_held_by("ann"), 0);
        assert!(ledger.release(&h("ann", "nb")).is_empty());
        // Everything is free again, also for a count request.
        let r = ledger
            .claim(h("c", "c"), &gpus(4, Some(A100)), &inv, None, T0)
            .unwrap();
        assert_eq!(r.devices.len(), 4);
    }

    #[test]
    fn release_frees_a_pending_reservation_too() {
        let (inv, ledger) = setup(vec![plain_node("n1", 1, A100)]);
        let r = ledger
            .claim(h("a", "s"), &gpus(1, None), &inv, None, T0)
            .unwrap();
        assert_eq!(ledger.release(&h("a", "s")), vec!["GPU-n1-0"]);
        assert!(matches!(ledger.commit(r.id), Err(Error::NotFound(_))));
        ledger
            .claim(h("b", "s"), &gpus(1, None), &inv, None, T0)
            .unwrap();
    }

    #[test]
    fn request_shape_errors_are_bad_requests() {
        let (inv, ledger) = setup(vec![
            plain_node("n1", 2, A100),
            plain_node("n2", 1, A100),
            mig_node(),
        ]);
        let bad = |req: DeviceRequest, needle: &str| match ledger.claim(
            h("a", "s"),
            &req,
            &inv,
            None,
            T0,
        ) {
            Err(Error::BadRequest(m)) => assert!(m.contains(needle), "{m:?} lacks {needle:?}"),
            other => panic!("{req:?}: {other:?}"),
        };
        bad(exact(&[]), "empty");
        let many: Vec<String> = (0..17).map(|i| format!("GPU-{i}")).collect();
        bad(DeviceRequest::Exact(many), "at most 16");
        bad(exact(&["GPU-n1-0", "GPU-n1-0"]), "GPU-n1-0 is listed twice");
        bad(exact(&["GPU-n1-0", "GPU-n2-0"]), "one node");
        bad(exact(&["GPU-m0"]), "MIG-m0-0, MIG-m0-1, MIG-m0-2");
        bad(gpus(0, None), "count");
        bad(gpus(17, None), "count");
        bad(mig("", None), "profile");
        assert!(ledger.holdings().is_empty());
    }

    #[test]
    fn unknown_taken_lost_and_stale_devices_are_refused() {
        let (inv, ledger) = setup(vec![plain_node("n1", 2, A100), mig_node()]);
        let e = err_of(ledger.claim(h("a", "s"), &exact(&["GPU-nope"]), &inv, None, T0));
        assert!(matches!(e, Error::NotFound(ref m) if m.contains("GPU-nope")));
        ledger
            .claim(h("a", "s"), &exact(&["GPU-n1-0"]), &inv, None, T0)
            .unwrap();
        let e = err_of(ledger.claim(
            h("b", "s"),
            &exact(&["GPU-n1-1", "GPU-n1-0"]),
            &inv,
            None,
            T0,
        ));
        assert!(
            matches!(e, Error::Conflict(ref m) if m.contains("GPU-n1-0 is already allocated")),
            "{e:?}"
        );
        // Nothing of a refused request is held.
        assert_eq!(ledger.holder("GPU-n1-1"), None);
        let e = err_of(ledger.claim(h("b", "s"), &exact(&["GPU-m2"]), &inv, None, T0));
        assert!(
            matches!(e, Error::Conflict(ref m) if m.contains("lost")),
            "{e:?}"
        );
        let stale = T0 + STALE_MS + 1;
        let e = err_of(ledger.claim(h("b", "s"), &exact(&["GPU-n1-1"]), &inv, None, stale));
        assert!(
            matches!(e, Error::Conflict(ref m) if m.contains("stale")),
            "{e:?}"
        );
        let e = err_of(ledger.claim(h("b", "s"), &gpus(1, None), &inv, None, stale));
        assert!(matches!(e, Error::Conflict(_)), "{e:?}");
        let e = err_of(ledger.claim(h("b", "s"), &mig("1g.10gb", None), &inv, None, stale));
        assert!(matches!(e, Error::Conflict(_)), "{e:?}");
    }

    #[test]
    fn one_holder_holds_one_set_of_devices() {
        let (inv, ledger) = setup(vec![plain_node("n1", 4, A100)]);
        let r = ledger
            .claim(h("a", "s"), &gpus(1, None), &inv, None, T0)
            .unwrap();
        let e = err_of(ledger.claim(h("a", "s"), &gpus(1, None), &inv, None, T0));
        assert!(matches!(e, Error::Conflict(ref m) if m.contains("a/s already holds")));
        ledger.commit(r.id).unwrap();
        assert!(matches!(
            ledger.claim(h("a", "s"), &gpus(1, None), &inv, None, T0),
            Err(Error::Conflict(_))
        ));
        // Another server of the same user is fine.
        ledger
            .claim(h("a", "t"), &gpus(1, None), &inv, None, T0)
            .unwrap();
    }

    #[test]
    fn quota_counts_held_and_claimed_devices() {
        let (inv, ledger) = setup(vec![plain_node("n1", 8, A100)]);
        let r = ledger
            .claim(h("a", "s1"), &gpus(2, None), &inv, Some(4), T0)
            .unwrap();
        ledger.commit(r.id).unwrap();
        ledger
            .claim(h("a", "s2"), &gpus(1, None), &inv, Some(4), T0)
            .unwrap();
        let e = err_of(ledger.claim(h("a", "s3"), &gpus(2, None), &inv, Some(4), T0));
        assert!(
            matches!(e, Error::QuotaExceeded(ref m) if m.contains("holds 3 of 4")),
            "{e:?}"
        );
        ledger
            .claim(h("a", "s3"), &mig("1g.10gb", None), &inv, Some(3), T0)
            .unwrap_err();
        ledger
            .claim(h("a", "s3"), &exact(&["GPU-n1-7"]), &inv, Some(4), T0)
            .unwrap();
        assert_eq!(ledger.devices_held_by("a"), 4);
        // Other users are not affected.
        ledger
            .claim(h("b", "s"), &gpus(4, None), &inv, Some(4), T0)
            .unwrap();
    }

    #[test]
    fn mig_mode_switched_on_under_a_holder_keeps_its_instances_unavailable() {
        let (inv, ledger) = setup(vec![plain_node("n1", 1, A100)]);
        let r = ledger
            .claim(h("a", "s"), &exact(&["GPU-n1-0"]), &inv, None, T0)
            .unwrap();
        ledger.commit(r.id).unwrap();
        let mut push = next(&plain_node("n1", 1, A100));
        push.gpus[0] = with_mig(push.gpus[0].clone(), &[("MIG-x", "1g.10gb")]);
        inv.ingest("n1", push, T0 + 1).unwrap();
        let e = err_of(ledger.claim(h("b", "s"), &exact(&["MIG-x"]), &inv, None, T0 + 1));
        assert!(
            matches!(e, Error::Conflict(ref m) if m.contains("GPU-n1-0 is allocated whole")),
            "{e:?}"
        );
        assert!(matches!(
            ledger.claim(h("b", "s"), &mig("1g.10gb", None), &inv, None, T0 + 1),
            Err(Error::Conflict(_))
        ));
        let listed = inv
            .devices(&DeviceQuery::default(), &ledger, T0 + 1)
            .unwrap()
            .items;
        assert!(listed.iter().all(|d| !d.available));
        // Released: the instance becomes allocatable, the GPU never whole.
        ledger.release(&h("a", "s"));
        let r = ledger
            .claim(h("b", "s"), &mig("1g.10gb", None), &inv, None, T0 + 1)
            .unwrap();
        assert_eq!(r.devices, vec!["MIG-x"]);
    }

    #[test]
    fn mig_mode_switched_off_under_a_slice_holder_keeps_the_gpu_unavailable() {
        let (inv, ledger) = setup(vec![node(
            "n1",
            vec![with_mig(gpu(0, "GPU-g", A100), &[("MIG-s", "7g.80gb")])],
        )]);
        ledger
            .claim(h("a", "s"), &exact(&["MIG-s"]), &inv, None, T0)
            .unwrap();
        inv.ingest(
            "n1",
            next(&plain_node("n1", 0, A100)).tap(|n| n.gpus = vec![gpu(0, "GPU-g", A100)]),
            T0 + 1,
        )
        .unwrap();
        let e = err_of(ledger.claim(h("b", "s"), &exact(&["GPU-g"]), &inv, None, T0 + 1));
        assert!(
            matches!(e, Error::Conflict(ref m) if m.contains("MIG instances are still allocated")),
            "{e:?}"
        );
        assert!(
            ledger
                .claim(h("b", "s"), &gpus(1, None), &inv, None, T0 + 1)
                .is_err()
        );
        ledger.release(&h("a", "s"));
        ledger
            .claim(h("b", "s"), &gpus(1, None), &inv, None, T0 + 1)
            .unwrap();
    }

    trait Tap: Sized {
        fn tap(mut self, f: impl FnOnce(&mut Self)) -> Self {
            f(&mut self);
            self
        }
    }
    impl Tap for NodeInventory {}

    #[test]
    fn best_fit_packs_small_requests_and_keeps_free_nodes_whole() {
        // a: 8 GPUs, b: 4, c: 2, d: 4 (ties with b, loses by name), e: 8 H100.
        let (inv, ledger) = setup(vec![
            plain_node("a", 8, A100),
            plain_node("b", 4, A100),
            plain_node("c", 2, A100),
            plain_node("d", 4, A100),
            plain_node("e", 8, H100),
        ]);
        let place = |server: &str, count: u32, model: Option<&str>| {
            ledger
                .claim(h("u", server), &gpus(count, model), &inv, None, T0)
                .map(|r| (r.node, r.devices))
        };
        assert_eq!(
            place("1", 1, Some(A100)).unwrap(),
            ("c".into(), vec!["GPU-c-0".into()])
        );
        // c has 1 left: still the best fit for 1.
        assert_eq!(place("2", 1, Some(A100)).unwrap().0, "c");
        assert_eq!(
            place("3", 3, Some(A100)).unwrap(),
            (
                "b".into(),
                vec!["GPU-b-0".into(), "GPU-b-1".into(), "GPU-b-2".into()]
            )
        );
        assert_eq!(place("4", 4, Some(A100)).unwrap().0, "d");
        assert_eq!(place("5", 8, Some(A100)).unwrap().0, "a");
        let e = place("6", 2, Some(A100)).unwrap_err();
        assert!(
            matches!(e, Error::Conflict(ref m) if m == "no fresh node has 2 free NVIDIA A100-SXM4-80GB GPUs"),
            "{e:?}"
        );
        // Without a model: one model, best fit across models (b's last A100).
        assert_eq!(
            place("7", 1, None).unwrap(),
            ("b".into(), vec!["GPU-b-3".into()])
        );
        assert_eq!(place("8", 8, None).unwrap().0, "e");
        let e = place("9", 1, None).unwrap_err();
        assert!(
            matches!(e, Error::Conflict(ref m) if m == "no fresh node has 1 free GPU of one model"),
            "{e:?}"
        );
        let e = place("10", 1, Some("NVIDIA B200")).unwrap_err();
        assert!(matches!(e, Error::Conflict(ref m) if m.contains("NVIDIA B200")));
    }

    #[test]
    fn best_fit_skips_stale_nodes_and_breaks_ties_by_name() {
        let (inv, ledger) = setup(vec![
            plain_node("b", 2, A100),
            plain_node("a", 2, A100),
            plain_node("c", 4, A100),
        ]);
        let r = ledger
            .claim(h("u", "1"), &gpus(2, None), &inv, None, T0)
            .unwrap();
        assert_eq!(r.node, "a");
        ledger.release(&h("u", "1"));
        // a and b go stale; c keeps pushing.
        let later = T0 + STALE_MS + 1;
        inv.ingest("c", next(&plain_node("c", 4, A100)), later)
            .unwrap();
        let r = ledger
            .claim(h("u", "2"), &gpus(2, None), &inv, None, later)
            .unwrap();
        assert_eq!(r.node, "c");
    }

    #[test]
    fn mig_best_fit_picks_the_fullest_node_then_the_fullest_gpu() {
        let slices = |g: &str, n: usize, profile: &'static str| -> Vec<(String, &'static str)> {
            (0..n).map(|i| (format!("MIG-{g}-{i}"), profile)).collect()
        };
        let mk = |name: &str, layout: &[(u32, usize)]| {
            let gpus = layout
                .iter()
                .map(|&(i, n)| {
                    let uuid = format!("GPU-{name}{i}");
                    let s = slices(&format!("{name}{i}"), n, "1g.10gb");
                    let refs: Vec<(&str, &str)> = s.iter().map(|(u, p)| (u.as_str(), *p)).collect();
                    with_mig(gpu(i, &uuid, A100), &refs)
                })
                .collect();
            node(name, gpus)
        };
        // x: 3 + 2 free; y: 7 free on one GPU.
        let (inv, ledger) = setup(vec![mk("x", &[(0, 3), (1, 2)]), mk("y", &[(0, 7)])]);
        let place = |s: &str| {
            ledger
                .claim(h("u", s), &mig("1g.10gb", None), &inv, None, T0)
                .unwrap()
                .devices
        };
        assert_eq!(place("1"), vec!["MIG-x1-0"]);
        assert_eq!(place("2"), vec!["MIG-x1-1"]);
        // x1 is full; x0 has 3, y 7.
        assert_eq!(place("3"), vec!["MIG-x0-0"]);
        assert_eq!(place("4"), vec!["MIG-x0-1"]);
        assert_eq!(place("5"), vec!["MIG-x0-2"]);
        assert_eq!(place("6"), vec!["MIG-y0-0"]);
        let e = err_of(ledger.claim(h("u", "z"), &mig("3g.40gb", None), &inv, None, T0));
        assert!(
            matches!(e, Error::Conflict(ref m) if m == "no fresh node has a free MIG instance of profile 3g.40gb")
        );
        let e = err_of(ledger.claim(h("u", "z"), &mig("1g.10gb", Some(H100)), &inv, None, T0));
        assert!(matches!(e, Error::Conflict(ref m) if m.contains(H100)));
        // Tie between two GPUs with 1 free each: the lower index.
        let (inv, ledger) = setup(vec![mk("t", &[(3, 1), (1, 1)])]);
        let r = ledger
            .claim(h("u", "1"), &mig("1g.10gb", Some(A100)), &inv, None, T0)
            .unwrap();
        assert_eq!(r.devices, vec!["MIG-t1-0"]);
    }

    #[test]
    fn sweep_aborts_only_old_reservations() {
        let (inv, ledger) = setup(vec![plain_node("n1", 3, A100)]);
        let old = ledger
            .claim(h("a", "1"), &gpus(1, None), &inv, None, T0)
            .unwrap();
        let done = ledger
            .claim(h("a", "2"), &gpus(1, None), &inv, None, T0)
            .unwrap();
        ledger.commit(done.id).unwrap();
        inv.ingest("n1", next(&plain_node("n1", 3, A100)), T0 + 50_000)
            .unwrap();
        let young = ledger
            .claim(h("a", "3"), &gpus(1, None), &inv, None, T0 + 50_000)
            .unwrap();
        let ttl = Duration::from_secs(60);
        assert!(ledger.sweep(T0 + 60_000, ttl).is_empty());
        assert_eq!(ledger.sweep(T0 + 60_001, ttl), vec![old.id]);
        assert!(matches!(ledger.commit(old.id), Err(Error::NotFound(_))));
        ledger.commit(young.id).unwrap();
        assert_eq!(ledger.devices_held_by("a"), 2);
        assert_eq!(ledger.holder(&old.devices[0]), None);
    }

    #[test]
    fn rebuild_replaces_holdings_and_drops_pending_reservations() {
        let (inv, ledger) = setup(vec![plain_node("n1", 4, A100), mig_node()]);
        let pending = ledger
            .claim(h("a", "1"), &gpus(2, None), &inv, None, T0)
            .unwrap();
        ledger.rebuild([
            ("GPU-n1-3".into(), h("b", "x")),
            ("MIG-m0-0".into(), h("b", "y")),
            ("GPU-n1-3".into(), h("c", "dup")),
            ("GPU-gone".into(), h("c", "z")),
        ]);
        assert!(matches!(ledger.commit(pending.id), Err(Error::NotFound(_))));
        assert_eq!(ledger.holder("GPU-n1-3"), Some(h("b", "x")));
        assert_eq!(
            (
                ledger.devices_held_by("b"),
                ledger.devices_held_by("c"),
                ledger.devices_held_by("a")
            ),
            (2, 1, 0)
        );
        assert!(ledger.holdings().iter().all(|(_, _, committed)| *committed));
        // The rebuilt holdings count in the free counts.
        let r = ledger.claim(h("a", "2"), &gpus(4, Some(A100)), &inv, None, T0);
        assert!(matches!(r, Err(Error::Conflict(_))));
        let r = ledger
            .claim(h("a", "2"), &gpus(3, Some(A100)), &inv, None, T0)
            .unwrap();
        assert_eq!(r.node, "n1");
        let r = ledger
            .claim(h("a", "3"), &mig("1g.10gb", None), &inv, None, T0)
            .unwrap();
        assert_eq!(r.devices, vec!["MIG-m0-1"]);
        // Releasing a rebuilt holding frees it.
        assert_eq!(ledger.release(&h("b", "x")), vec!["GPU-n1-3"]);
        ledger
            .claim(h("a", "4"), &gpus(1, Some(A100)), &inv, None, T0)
            .unwrap();
        assert_eq!(ledger.release(&h("c", "z")), vec!["GPU-gone"]);
    }

    #[test]
    fn free_counts_follow_layout_changes() {
        let (inv, ledger) = setup(vec![plain_node("n1", 2, A100)]);
        ledger
            .claim(h("a", "1"), &gpus(1, None), &inv, None, T0)
            .unwrap();
        // n1 now reports 4 GPUs: 3 free.
        inv.ingest("n1", next(&plain_node("n1", 4, A100)), T0 + 1)
            .unwrap();
        let r = ledger
            .claim(h("a", "2"), &gpus(3, None), &inv, None, T0 + 1)
            .unwrap();
        assert_eq!(r.devices, vec!["GPU-n1-1", "GPU-n1-2", "GPU-n1-3"]);
        // A different inventory instance is never trusted with old counts.
        let other = Inventory::new(Duration::from_millis(STALE_MS));
        other.ingest("z", plain_node("z", 1, A100), T0).unwrap();
        let r = ledger
            .claim(h("a", "3"), &gpus(1, None), &other, None, T0)
            .unwrap();
        assert_eq!(r.node, "z");
    }
}
