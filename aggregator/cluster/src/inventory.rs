//! The cluster view built from agent pushes: node snapshots and an ordered device index.
//!
//! Each `PUT /api/v1/nodes/{node}/inventory` is validated, then kept per node if it is
//! newer than what we hold (highest `(boot_id, seq)`; a new `boot_id` wins when it was
//! collected no earlier). Devices live in one `BTreeMap` keyed by `(node, GPU index, MIG
//! index)`, so a page of `GET /api/v1/gpus` is a range scan from the cursor. A heartbeat
//! with the same device layout only swaps the snapshot (metrics are read from it when a
//! page is built); only a changed layout touches the index, and it is journalled so the
//! [`Ledger`](crate::ledger::Ledger) can refresh its per-node free counts for just
//! those nodes. The views that combine it with the ledger's holdings are in
//! [`crate::views`].
//!
//! A node whose last accepted push is older than `stale_after` is stale: shown, never
//! allocatable. So are lost GPUs (and the MIG instances on them). A GPU in MIG mode is
//! listed (`kind: gpu`, `mig_enabled: true`, `available: false`) so the UI can draw its
//! slices; only its MIG instances are allocatable.
//!
//! Locking: one `RwLock` here. Methods that also read the ledger take this read lock
//! first and then the ledger's mutex, the same order as `Ledger::claim`; nothing
//! takes them the other way round.

use std::collections::{BTreeMap, HashMap, VecDeque};

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use kcloud_common::inventory::{DeviceKind, Gpu, HostInfo, MemoryInfo, NodeInventory};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use kcloud_core::device::{DeviceAddress, Holder};
use kcloud_core::signal::Signal;
use kcloud_core::{Error, Result};

/// Most GPUs one node may report.
pub const MAX_GPUS_PER_NODE: usize = 256;
/// Most MIG instances one GPU may report (an A100/H100 has at most 7).
pub const MAX_MIG_PER_GPU: usize = 16;
/// Longest string accepted anywhere in a push, in bytes.
pub const MAX_STRING_BYTES: usize = 256;
/// Longest device UUID, in bytes.
pub const MAX_UUID_BYTES: usize = 96;
/// Longest node name (a DNS subdomain).
pub const MAX_NODE_NAME: usize = 253;
/// Default and largest page size of [`Inventory::devices`]; larger limits are clamped.
pub const DEFAULT_PAGE: usize = 100;
pub const MAX_PAGE: usize = 1000;
/// Layout changes remembered for the ledger's incremental refresh; a ledger further
/// behind than this rebuilds its free counts from scratch.
const JOURNAL_CAP: usize = 8192;
/// Stored pushes remembered for live views ([`Inventory::changes_since`]); a view
/// further behind than this starts over from a snapshot.
const PUSH_JOURNAL_CAP: usize = 1 << 16;

/// Tells ledgers apart, so one never trusts counts built against another inventory.
static NEXT_INVENTORY_ID: AtomicU64 = AtomicU64::new(1);

/// The cluster view. `Send + Sync`; share it as `Arc<Inventory>`.
pub struct Inventory {
    state: RwLock<InvState>,
    /// Bumped after every stored push, for live views.
    changed: Signal,
}

/// What [`Inventory::ingest`] did with a valid push.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ingested {
    Stored,
    /// Not newer than the stored snapshot (a retry or a late delivery): not an error.
    IgnoredOlder,
}

/// Filters and paging for `GET /api/v1/gpus` (and the availability summary).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, IntoParams)]
#[serde(default)]
#[into_params(parameter_in = Query)]
pub struct DeviceQuery {
    /// Only devices of this node.
    pub node: Option<String>,
    /// Only this GPU model (MIG instances match their parent's model).
    pub model: Option<String>,
    /// Only MIG instances of this profile, e.g. `3g.40gb`.
    pub profile: Option<String>,
    /// `gpu` or `mig`.
    #[param(value_type = Option<String>, pattern = "^(gpu|mig)$")]
    pub kind: Option<DeviceKind>,
    /// Only devices that are (or are not) free to allocate now.
    pub available: Option<bool>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
    /// Page size, default 100; clamped to 1..=1000.
    #[param(maximum = 18_446_744_073_709_551_615_u64)]
    pub limit: usize,
}

impl Default for DeviceQuery {
    fn default() -> Self {
        Self {
            node: None,
            model: None,
            profile: None,
            kind: None,
            available: None,
            cursor: None,
            limit: DEFAULT_PAGE,
        }
    }
}

/// One page of a listing; pass `next_cursor` back as `cursor` for the next one.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct Page<T> {
    pub items: Vec<T>,
    /// Absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// A device in `GET /api/v1/gpus`: a whole GPU or a MIG instance.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct DeviceView {
    pub uuid: String,
    /// `gpu` or `mig`.
    #[schema(value_type = String, example = "gpu")]
    pub kind: DeviceKind,
    pub node: String,
    /// Product name; a MIG instance reports its parent's.
    pub model: String,
    /// NVML index of the GPU (of the parent, for a MIG instance).
    pub index: u32,
    /// Index of a MIG instance on its parent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mig_index: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent_uuid: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu_instance_id: Option<u32>,
    /// GPUs only: MIG mode is on, so the GPU is allocatable only through its instances.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mig_enabled: Option<bool>,
    /// Free to allocate now: fresh node, not lost, not held, allocatable kind.
    pub available: bool,
    pub stale: bool,
    pub lost: bool,
    /// Held by a server (claimed or committed), whoever holds it: what a user sees
    /// of other users' holdings.
    pub in_use: bool,
    /// Who holds it (claimed or committed); the API layer redacts it per viewer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub holder: Option<Holder>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_total_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_used_bytes: Option<u64>,
    /// A MIG instance's is its graphics engine's busy share from GPM (Hopper and
    /// newer; absent elsewhere); the other GPU-wide readings below are omitted for MIG
    /// instances (NVML has none per slice).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub utilization_gpu_percent: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub temperature_celsius: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub power_watts: Option<f64>,
    /// `false` when the viewer's groups may not use it (the API sets it per viewer;
    /// absent means allowed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub entitled: Option<bool>,
}

/// Free and total devices of one model (and MIG profile).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct Availability {
    pub model: String,
    /// `gpu` or `mig`.
    #[schema(value_type = String, example = "mig")]
    pub kind: DeviceKind,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
    /// Allocatable-kind devices listed, stale and lost ones included (GPUs in MIG mode
    /// are counted through their instances, not themselves).
    pub total: u32,
    /// Available now.
    pub free: u32,
}

/// A node in `GET /api/v1/nodes`.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct NodeView {
    pub name: String,
    pub stale: bool,
    /// When its last accepted push arrived (ms since the epoch, aggregator clock).
    pub last_seen_ms: u64,
    pub age_seconds: u64,
    pub simulated: bool,
    /// The node group its agent reports (`--node-group`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    pub agent_version: String,
    pub nvml_up: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub driver_version: Option<String>,
    #[schema(value_type = Object)]
    pub host: HostInfo,
    /// Physical GPUs reported.
    pub gpus: u32,
    /// Allocatable-kind devices (whole non-MIG GPUs and MIG instances).
    pub devices_total: u32,
    pub devices_free: u32,
}

/// Nodes pushed to, each once, with whether its device layout changed.
pub type Pushed = Vec<(Arc<str>, bool)>;

/// One node in a line, for a fleet list: what to filter and sort by.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct NodeRow {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Models of its GPUs, each once.
    pub models: Vec<String>,
    pub gpus: u32,
    pub devices_total: u32,
    pub devices_free: u32,
    pub stale: bool,
    pub simulated: bool,
}

/// The fleet at a glance: node counts, and free and total devices per model and MIG
/// profile, and per node group.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct FleetSummary {
    pub nodes: u32,
    pub stale: u32,
    pub devices_total: u32,
    pub devices_free: u32,
    pub classes: Vec<Availability>,
    pub groups: Vec<GroupSummary>,
}

/// One node group's share of the fleet (nodes without a group are `""`).
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct GroupSummary {
    pub group: String,
    pub nodes: u32,
    pub stale: u32,
    pub devices_total: u32,
    pub devices_free: u32,
}

/// Node and device gauges for `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NodeCounts {
    /// Nodes whose last push is recent.
    pub fresh: u32,
    pub stale: u32,
    /// Devices listed (whole GPUs, MIG-mode GPUs and MIG instances).
    pub devices: u32,
    /// Age of the oldest node snapshot; 0 without nodes.
    pub oldest_age_ms: u64,
}

// ---- index internals, shared with the ledger -------------------------------------------

/// Sort key of a device: node, GPU index, then the whole GPU (`None`) before its MIG
/// instances by index.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct DevKey {
    pub(crate) node: Arc<str>,
    pub(crate) gpu: u32,
    pub(crate) mig: Option<u32>,
}

impl DevKey {
    pub(crate) fn node_start(node: &Arc<str>) -> Self {
        Self {
            node: node.clone(),
            gpu: 0,
            mig: None,
        }
    }

    pub(crate) fn node_end(node: &Arc<str>) -> Self {
        Self {
            node: node.clone(),
            gpu: u32::MAX,
            mig: Some(u32::MAX),
        }
    }

    pub(crate) fn cursor(&self) -> String {
        let mig = self.mig.map_or_else(|| "g".to_owned(), |m| m.to_string());
        URL_SAFE_NO_PAD.encode(format!("{}.{mig}.{}", self.gpu, self.node))
    }

    pub(crate) fn from_cursor(cursor: &str) -> Result<Self> {
        let bad = || Error::BadRequest("cursor: not a cursor from a previous page".into());
        let raw = URL_SAFE_NO_PAD.decode(cursor).map_err(|_| bad())?;
        let raw = String::from_utf8(raw).map_err(|_| bad())?;
        let mut parts = raw.splitn(3, '.');
        let (Some(gpu), Some(mig), Some(node)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(bad());
        };
        let gpu = gpu.parse().map_err(|_| bad())?;
        let mig = match mig {
            "g" => None,
            m => Some(m.parse().map_err(|_| bad())?),
        };
        if !valid_node_name(node) {
            return Err(bad());
        }
        Ok(Self {
            node: node.into(),
            gpu,
            mig,
        })
    }
}

/// What the ledger counts by: whole GPUs of a model, or MIG instances of a model and
/// profile. Model and profile are interned ids of this inventory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Class {
    pub(crate) mig: bool,
    pub(crate) model: u32,
    /// 0 for whole GPUs.
    pub(crate) profile: u32,
}

/// One listed device: the layout facts the index and the ledger need; metrics are read
/// from the node's snapshot at `gpu_pos`/`mig_pos`.
#[derive(Debug)]
pub(crate) struct Dev {
    pub(crate) uuid: Arc<str>,
    /// The parent GPU, for a MIG instance.
    pub(crate) parent: Option<Arc<str>>,
    pub(crate) class: Class,
    /// A GPU in MIG mode: listed, never allocated whole.
    pub(crate) mig_parent: bool,
    /// The GPU (or, for a MIG instance, its parent) is lost.
    pub(crate) lost: bool,
    gpu_pos: usize,
    mig_pos: usize,
}

impl Dev {
    /// Allocatable by layout (not lost, not a MIG-mode GPU); freshness and holders aside.
    pub(crate) fn allocatable(&self) -> bool {
        !self.lost && !self.mig_parent
    }

    fn kind(&self) -> DeviceKind {
        if self.class.mig {
            DeviceKind::Mig
        } else {
            DeviceKind::Gpu
        }
    }
}

pub(crate) struct NodeEntry {
    pub(crate) snap: NodeInventory,
    pub(crate) received_at_ms: u64,
    /// False once another node took over one of its devices; its next push re-indexes.
    intact: bool,
}

#[derive(Default)]
struct Interner {
    ids: HashMap<Arc<str>, u32>,
    names: Vec<Arc<str>>,
}

impl Interner {
    fn intern(&mut self, name: &str) -> u32 {
        if let Some(&id) = self.ids.get(name) {
            return id;
        }
        let id = self.names.len() as u32;
        let name: Arc<str> = name.into();
        self.names.push(name.clone());
        self.ids.insert(name, id);
        id
    }

    fn id(&self, name: &str) -> Option<u32> {
        self.ids.get(name).copied()
    }

    fn name(&self, id: u32) -> &str {
        self.names.get(id as usize).map_or("", |n| n)
    }
}

/// The inventory's state behind its lock. The ledger reads it through
/// [`Inventory::read`] while it holds the read guard.
pub(crate) struct InvState {
    /// Unique per `Inventory`.
    pub(crate) id: u64,
    stale_after_ms: u64,
    pub(crate) nodes: BTreeMap<Arc<str>, NodeEntry>,
    pub(crate) devices: BTreeMap<DevKey, Dev>,
    by_uuid: HashMap<Arc<str>, DevKey>,
    models: Interner,
    profiles: Interner,
    /// Bumped once per node whose device layout changed.
    pub(crate) layout_gen: u64,
    /// `(layout_gen after the change, node)`, oldest first.
    journal: VecDeque<(u64, Arc<str>)>,
    /// Bumped once per stored push.
    push_gen: u64,
    /// `(push_gen after the push, node, its layout changed)`, oldest first.
    pushes: VecDeque<(u64, Arc<str>, bool)>,
}

impl InvState {
    pub(crate) fn is_fresh(&self, e: &NodeEntry, now_ms: u64) -> bool {
        now_ms.saturating_sub(e.received_at_ms) <= self.stale_after_ms
    }

    /// The node exists and its last push is recent enough.
    pub(crate) fn node_fresh(&self, node: &str, now_ms: u64) -> bool {
        self.nodes
            .get(node)
            .is_some_and(|e| self.is_fresh(e, now_ms))
    }

    pub(crate) fn node_names(&self) -> impl Iterator<Item = &Arc<str>> {
        self.nodes.keys()
    }

    pub(crate) fn has_node(&self, node: &str) -> bool {
        self.nodes.contains_key(node)
    }

    /// The inventory's own name of `node` (to key its devices without allocating).
    pub(crate) fn node_arc(&self, node: &str) -> Option<&Arc<str>> {
        self.nodes.get_key_value(node).map(|(k, _)| k)
    }

    /// A node's devices in key order (GPU index, then MIG index).
    pub(crate) fn node_devices(
        &self,
        node: &Arc<str>,
    ) -> std::collections::btree_map::Range<'_, DevKey, Dev> {
        self.devices
            .range(DevKey::node_start(node)..=DevKey::node_end(node))
    }

    /// The MIG instances listed on one GPU of a node.
    pub(crate) fn mig_children(&self, key: &DevKey) -> impl Iterator<Item = &Dev> {
        let lo = DevKey {
            node: key.node.clone(),
            gpu: key.gpu,
            mig: Some(0),
        };
        let hi = DevKey {
            node: key.node.clone(),
            gpu: key.gpu,
            mig: Some(u32::MAX),
        };
        self.devices.range(lo..=hi).map(|(_, d)| d)
    }

    pub(crate) fn device(&self, uuid: &str) -> Option<(&DevKey, &Dev)> {
        let key = self.by_uuid.get(uuid)?;
        self.devices.get_key_value(key)
    }

    pub(crate) fn model_id(&self, model: &str) -> Option<u32> {
        self.models.id(model)
    }

    /// A request's model as a filter: `Some(None)` for any model, `Some(Some(id))` for
    /// a known one, `None` for a model no node has.
    pub(crate) fn model_filter(&self, model: Option<&str>) -> Option<Option<u32>> {
        match model {
            Some(m) => self.model_id(m).map(Some),
            None => Some(None),
        }
    }

    pub(crate) fn profile_id(&self, profile: &str) -> Option<u32> {
        self.profiles.id(profile)
    }

    pub(crate) fn model_name(&self, id: u32) -> &str {
        self.models.name(id)
    }

    pub(crate) fn profile_name(&self, id: u32) -> &str {
        self.profiles.name(id)
    }

    /// Nodes whose layout changed after generation `gen`, or `None` when the journal no
    /// longer reaches back that far.
    pub(crate) fn changed_since(&self, generation: u64) -> Option<impl Iterator<Item = &Arc<str>>> {
        if generation > self.layout_gen {
            return None;
        }
        if generation < self.layout_gen
            && self
                .journal
                .front()
                .is_none_or(|&(g, _)| g > generation + 1)
        {
            return None;
        }
        Some(
            self.journal
                .iter()
                .filter(move |(g, _)| *g > generation)
                .map(|(_, n)| n),
        )
    }

    fn record_push(&mut self, node: Arc<str>, layout: bool) {
        self.push_gen += 1;
        if self.pushes.len() == PUSH_JOURNAL_CAP {
            self.pushes.pop_front();
        }
        self.pushes.push_back((self.push_gen, node, layout));
    }

    fn journal(&mut self, node: Arc<str>) {
        self.layout_gen += 1;
        if self.journal.len() == JOURNAL_CAP {
            self.journal.pop_front();
        }
        self.journal.push_back((self.layout_gen, node));
    }

    /// Swaps in a push whose layout differs from the stored one (or a new node),
    /// re-indexing its devices. Conflicts were checked: any other owner of one of its
    /// UUIDs is stale and loses that device.
    fn replace_layout(&mut self, node: &str, snap: NodeInventory, now_ms: u64) {
        let name: Arc<str> = self
            .nodes
            .get_key_value(node)
            .map_or_else(|| node.into(), |(k, _)| k.clone());
        let old: Vec<DevKey> = self.node_devices(&name).map(|(k, _)| k.clone()).collect();
        for key in old {
            if let Some(dev) = self.devices.remove(&key)
                && self.by_uuid.get(&*dev.uuid) == Some(&key)
            {
                self.by_uuid.remove(&*dev.uuid);
            }
        }
        let mut robbed: Vec<Arc<str>> = Vec::new();
        for (gpu_pos, g) in snap.gpus.iter().enumerate() {
            let model = self.models.intern(&g.model);
            let gpu_uuid: Arc<str> = g.uuid.as_str().into();
            let key = DevKey {
                node: name.clone(),
                gpu: g.index,
                mig: None,
            };
            let dev = Dev {
                uuid: gpu_uuid.clone(),
                parent: None,
                class: Class {
                    mig: false,
                    model,
                    profile: 0,
                },
                mig_parent: g.mig_enabled(),
                lost: g.lost,
                gpu_pos,
                mig_pos: 0,
            };
            self.insert_dev(key, dev, &mut robbed);
            for (mig_pos, m) in g.mig_instances.iter().enumerate() {
                let key = DevKey {
                    node: name.clone(),
                    gpu: g.index,
                    mig: Some(m.index),
                };
                let dev = Dev {
                    uuid: m.uuid.as_str().into(),
                    parent: Some(gpu_uuid.clone()),
                    class: Class {
                        mig: true,
                        model,
                        profile: self.profiles.intern(&m.profile),
                    },
                    mig_parent: false,
                    lost: g.lost,
                    gpu_pos,
                    mig_pos,
                };
                self.insert_dev(key, dev, &mut robbed);
            }
        }
        robbed.sort();
        robbed.dedup();
        for other in robbed {
            tracing::warn!(node = %name, stale_node = %other, "took over devices of a stale node");
            if let Some(e) = self.nodes.get_mut(&other) {
                e.intact = false;
            }
            self.journal(other);
        }
        self.nodes.insert(
            name.clone(),
            NodeEntry {
                snap,
                received_at_ms: now_ms,
                intact: true,
            },
        );
        self.journal(name);
    }

    fn insert_dev(&mut self, key: DevKey, dev: Dev, robbed: &mut Vec<Arc<str>>) {
        if let Some(prev) = self.by_uuid.insert(dev.uuid.clone(), key.clone())
            && prev.node != key.node
        {
            self.devices.remove(&prev);
            robbed.push(prev.node);
        }
        self.devices.insert(key, dev);
    }

    /// Resolves a query's filters to interned ids; `None` when nothing can match.
    pub(crate) fn filter(&self, q: &DeviceQuery) -> Option<Filter> {
        let model = match &q.model {
            Some(m) => Some(self.models.id(m)?),
            None => None,
        };
        let profile = match &q.profile {
            Some(p) => Some(self.profiles.id(p)?),
            None => None,
        };
        let mig = match (q.kind, profile) {
            (Some(DeviceKind::Gpu), Some(_)) => return None,
            (_, Some(_)) | (Some(DeviceKind::Mig), None) => Some(true),
            (Some(DeviceKind::Gpu), None) => Some(false),
            (None, None) => None,
        };
        Some(Filter {
            mig,
            model,
            profile,
            available: q.available,
        })
    }

    pub(crate) fn view(
        &self,
        key: &DevKey,
        dev: &Dev,
        entry: &NodeEntry,
        available: bool,
        stale: bool,
        holder: Option<Holder>,
    ) -> DeviceView {
        let g: &Gpu = &entry.snap.gpus[dev.gpu_pos];
        let mut v = DeviceView {
            uuid: dev.uuid.to_string(),
            kind: dev.kind(),
            node: key.node.to_string(),
            model: g.model.clone(),
            index: g.index,
            mig_index: None,
            profile: None,
            parent_uuid: None,
            gpu_instance_id: None,
            mig_enabled: None,
            available,
            stale,
            lost: dev.lost,
            in_use: holder.is_some(),
            holder,
            memory_total_bytes: None,
            memory_used_bytes: None,
            utilization_gpu_percent: None,
            temperature_celsius: None,
            power_watts: None,
            entitled: None,
        };
        let memory: Option<MemoryInfo>;
        if dev.class.mig {
            let m = &g.mig_instances[dev.mig_pos];
            v.mig_index = Some(m.index);
            v.profile = Some(m.profile.clone());
            v.parent_uuid = Some(g.uuid.clone());
            v.gpu_instance_id = m.gpu_instance_id;
            // GPM's busy share, where the GPU measures it per instance.
            v.utilization_gpu_percent = m.gr_engine_active.map(|r| (r * 100.0).round() as u32);
            memory = m.memory;
        } else {
            v.mig_enabled = Some(dev.mig_parent);
            v.utilization_gpu_percent = g.utilization_gpu_percent;
            v.temperature_celsius = g.temperature_celsius;
            v.power_watts = g.power_watts;
            memory = g.memory;
        }
        v.memory_total_bytes = memory.map(|m| m.total_bytes);
        v.memory_used_bytes = memory.map(|m| m.used_bytes);
        v
    }
}

/// A query resolved against the interners.
pub(crate) struct Filter {
    pub(crate) mig: Option<bool>,
    model: Option<u32>,
    profile: Option<u32>,
    pub(crate) available: Option<bool>,
}

impl Filter {
    pub(crate) fn class(&self, c: &Class) -> bool {
        self.mig.is_none_or(|m| c.mig == m)
            && self.model.is_none_or(|m| c.model == m)
            && self.profile.is_none_or(|p| c.mig && c.profile == p)
    }
}

impl Inventory {
    /// `stale_after`: how old a node's last accepted push may be before it is stale
    /// (the caller passes three agent heartbeats).
    pub fn new(stale_after: Duration) -> Self {
        Self {
            state: RwLock::new(InvState {
                id: NEXT_INVENTORY_ID.fetch_add(1, Ordering::Relaxed),
                stale_after_ms: stale_after.as_millis().min(u64::MAX as u128) as u64,
                nodes: BTreeMap::new(),
                devices: BTreeMap::new(),
                by_uuid: HashMap::new(),
                models: Interner::default(),
                profiles: Interner::default(),
                layout_gen: 0,
                journal: VecDeque::new(),
                push_gen: 0,
                pushes: VecDeque::new(),
            }),
            changed: Default::default(),
        }
    }

    /// Wakes after the next stored push (node figures, layout or staleness may differ).
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// The read guard, for the ledger. Never take it twice on one thread (a queued
    /// writer would deadlock the second read).
    pub(crate) fn read(&self) -> RwLockReadGuard<'_, InvState> {
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, InvState> {
        self.state.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Validates and stores a push for the node named in the URL path.
    ///
    /// Errors: `BadRequest` naming the offending field (nothing stored); `Conflict` when
    /// a device UUID is reported by another fresh node.
    pub fn ingest(&self, path_node: &str, inv: NodeInventory, now_ms: u64) -> Result<Ingested> {
        validate(path_node, &inv)?;
        let mut guard = self.write();
        let st = &mut *guard;
        let name = st.nodes.get_key_value(path_node).map(|(k, _)| k.clone());
        if let Some(name) = name
            && let Some(e) = st.nodes.get_mut(path_node)
        {
            if !supersedes(&e.snap, &inv) {
                return Ok(Ingested::IgnoredOlder);
            }
            if e.intact && same_layout(&e.snap, &inv) {
                // The common heartbeat: the index stays as it is.
                let old = std::mem::replace(&mut e.snap, inv);
                e.received_at_ms = now_ms;
                st.record_push(name, false);
                drop(guard);
                drop(old); // freed outside the lock
                self.changed.notify();
                return Ok(Ingested::Stored);
            }
        }
        for uuid in uuids(&inv) {
            if let Some(key) = st.by_uuid.get(uuid)
                && *key.node != *path_node
                && st.node_fresh(&key.node, now_ms)
            {
                return Err(Error::Conflict(format!(
                    "device {uuid} is already reported by node {}",
                    key.node
                )));
            }
        }
        tracing::debug!(node = path_node, "device layout changed");
        st.replace_layout(path_node, inv, now_ms);
        let name = st
            .nodes
            .get_key_value(path_node)
            .map_or_else(|| path_node.into(), |(k, _)| k.clone());
        st.record_push(name, true);
        drop(guard);
        self.changed.notify();
        Ok(Ingested::Stored)
    }

    /// The nodes pushed to after push generation `since`, each once with whether its
    /// layout changed, and the current generation. `None` for the nodes when the
    /// journal no longer reaches back that far (a live view then starts over).
    pub fn changes_since(&self, since: u64) -> (u64, Option<Pushed>) {
        let st = self.read();
        let now = st.push_gen;
        if since > now {
            return (now, None);
        }
        let complete = since == now || st.pushes.front().is_some_and(|&(g, _, _)| g <= since + 1);
        if !complete {
            return (now, None);
        }
        let mut out: Vec<(Arc<str>, bool)> = Vec::new();
        let mut at: HashMap<&str, usize> = HashMap::new();
        for (_, node, layout) in st.pushes.iter().filter(|(g, _, _)| *g > since) {
            match at.get(&**node) {
                Some(&i) => out[i].1 |= *layout,
                None => {
                    at.insert(node, out.len());
                    out.push((node.clone(), *layout));
                }
            }
        }
        (now, Some(out))
    }

    /// The current push generation (see [`Inventory::changes_since`]).
    pub fn push_generation(&self) -> u64 {
        self.read().push_gen
    }

    /// Every node's name, in order.
    pub fn node_names(&self) -> Vec<Arc<str>> {
        self.read().nodes.keys().cloned().collect()
    }

    /// The nodes that are stale now.
    pub fn stale_nodes(&self, now_ms: u64) -> Vec<Arc<str>> {
        let st = self.read();
        st.nodes
            .iter()
            .filter(|(_, e)| !st.is_fresh(e, now_ms))
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// The node a device is listed on.
    pub fn node_of(&self, uuid: &str) -> Option<Arc<str>> {
        self.read().device(uuid).map(|(k, _)| k.node.clone())
    }

    /// Fresh and stale nodes, listed devices, oldest snapshot age: for `/metrics`.
    pub fn counts(&self, now_ms: u64) -> NodeCounts {
        let st = self.read();
        let mut c = NodeCounts {
            devices: st.devices.len() as u32,
            ..NodeCounts::default()
        };
        for e in st.nodes.values() {
            if st.is_fresh(e, now_ms) {
                c.fresh += 1;
            } else {
                c.stale += 1;
            }
            c.oldest_age_ms = c.oldest_age_ms.max(now_ms.saturating_sub(e.received_at_ms));
        }
        c
    }

    /// How busy each of `uuids` is, 0 to 1, as its agent last reported: a whole GPU's
    /// utilization, a MIG instance's GPM busy share. `None` where that is not known:
    /// an unknown, lost or stale device, or no reading (no GPM): callers must never
    /// read "unknown" as idle.
    pub fn utilization(&self, uuids: &[String], now_ms: u64) -> Vec<Option<f64>> {
        let st = self.read();
        uuids
            .iter()
            .map(|uuid| {
                let (key, dev) = st.device(uuid)?;
                let entry = st.nodes.get(&key.node)?;
                if dev.lost || !st.is_fresh(entry, now_ms) {
                    return None;
                }
                let gpu = entry.snap.gpus.get(dev.gpu_pos)?;
                if dev.class.mig {
                    gpu.mig_instances.get(dev.mig_pos)?.gr_engine_active
                } else {
                    gpu.utilization_gpu_percent.map(|p| f64::from(p) / 100.0)
                }
            })
            .collect()
    }

    /// Where each of `uuids` lives on its node, as its agent last reported: the GPU's
    /// minor number, and a MIG instance's GPU and compute instance ids. A device not
    /// listed gets an address with neither.
    pub fn addresses(&self, uuids: &[String]) -> Vec<DeviceAddress> {
        let st = self.read();
        uuids
            .iter()
            .map(|uuid| {
                let found = st.device(uuid).and_then(|(key, dev)| {
                    let gpu = st.nodes.get(&key.node)?.snap.gpus.get(dev.gpu_pos)?;
                    let mig = dev
                        .class
                        .mig
                        .then(|| gpu.mig_instances.get(dev.mig_pos))
                        .flatten()
                        .and_then(|m| Some((m.gpu_instance_id?, m.compute_instance_id?)));
                    Some((gpu.minor_number, mig))
                });
                let (minor, mig) = found.unwrap_or((None, None));
                DeviceAddress {
                    uuid: uuid.clone(),
                    minor,
                    mig,
                }
            })
            .collect()
    }
}

// ---- validation ----------------------------------------------------------------------

fn bad(msg: String) -> Error {
    Error::BadRequest(msg)
}

fn valid_node_name(name: &str) -> bool {
    (1..=MAX_NODE_NAME).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn check_str(field: impl FnOnce() -> String, s: &str, max: usize) -> Result<()> {
    if s.len() > max {
        return Err(bad(format!("{}: longer than {max} bytes", field())));
    }
    Ok(())
}

fn check_uuid(field: impl Fn() -> String, s: &str, prefix: &str) -> Result<()> {
    check_str(&field, s, MAX_UUID_BYTES)?;
    if !s.starts_with(prefix) || s.len() == prefix.len() {
        return Err(bad(format!("{}: must start with {prefix:?}", field())));
    }
    Ok(())
}

fn check_f64(field: &str, v: f64, max: Option<f64>) -> Result<()> {
    if !v.is_finite() || v < 0.0 {
        return Err(bad(format!(
            "{field}: must be a finite, non-negative number"
        )));
    }
    if let Some(max) = max
        && v > max
    {
        return Err(bad(format!("{field}: must be at most {max}")));
    }
    Ok(())
}

fn check_percent(field: impl FnOnce() -> String, v: Option<u32>) -> Result<()> {
    match v {
        Some(p) if p > 100 => Err(bad(format!("{}: must be at most 100", field()))),
        _ => Ok(()),
    }
}

fn check_memory(field: impl FnOnce() -> String, m: Option<&MemoryInfo>) -> Result<()> {
    match m {
        Some(m) if m.used_bytes > m.total_bytes => {
            Err(bad(format!("{}: used_bytes exceeds total_bytes", field())))
        }
        _ => Ok(()),
    }
}

/// Every rule a push must meet before anything is stored.
fn validate(path_node: &str, inv: &NodeInventory) -> Result<()> {
    if inv.node != path_node {
        return Err(bad(format!(
            "node: the body names {:?} but the path names {path_node:?}",
            truncate(&inv.node)
        )));
    }
    if !valid_node_name(&inv.node) {
        return Err(bad(format!(
            "node: must be 1 to {MAX_NODE_NAME} characters of A-Z, a-z, 0-9, '.', '_', '-'"
        )));
    }
    if inv.seq == 0 {
        return Err(bad("seq: must be at least 1".into()));
    }
    if let Some(g) = &inv.group
        && !((1..=63).contains(&g.len())
            && g.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
    {
        return Err(bad(
            "group: letters, digits and '-', 1 to 63 characters".into()
        ));
    }
    if inv.boot_id.is_empty() {
        return Err(bad("boot_id: must not be empty".into()));
    }
    check_str(|| "boot_id".into(), &inv.boot_id, MAX_STRING_BYTES)?;
    check_str(
        || "agent_version".into(),
        &inv.agent_version,
        MAX_STRING_BYTES,
    )?;
    if let Some(v) = &inv.nvml.driver_version {
        check_str(|| "nvml.driver_version".into(), v, MAX_STRING_BYTES)?;
    }
    if let Some(v) = &inv.nvml.error {
        check_str(|| "nvml.error".into(), v, MAX_STRING_BYTES)?;
    }
    let h = &inv.host;
    check_str(|| "host.hostname".into(), &h.hostname, MAX_STRING_BYTES)?;
    check_f64(
        "host.cpu_utilization_percent",
        h.cpu_utilization_percent,
        Some(100.0),
    )?;
    if h.memory_used_bytes > h.memory_total_bytes {
        return Err(bad(
            "host.memory_used_bytes: exceeds host.memory_total_bytes".into(),
        ));
    }
    for (i, l) in h.load_average.iter().enumerate() {
        check_f64(&format!("host.load_average[{i}]"), *l, None)?;
    }
    if inv.gpus.len() > MAX_GPUS_PER_NODE {
        return Err(bad(format!(
            "gpus: {} GPUs, at most {MAX_GPUS_PER_NODE} per node",
            inv.gpus.len()
        )));
    }
    for (i, g) in inv.gpus.iter().enumerate() {
        let f = |name: &str| format!("gpus[{i}].{name}");
        check_uuid(|| f("uuid"), &g.uuid, "GPU-")?;
        check_str(|| f("model"), &g.model, MAX_STRING_BYTES)?;
        check_str(|| f("pci_bus_id"), &g.pci_bus_id, MAX_STRING_BYTES)?;
        check_percent(|| f("utilization_gpu_percent"), g.utilization_gpu_percent)?;
        check_percent(
            || f("utilization_memory_percent"),
            g.utilization_memory_percent,
        )?;
        check_memory(|| f("memory"), g.memory.as_ref())?;
        if let Some(p) = g.power_watts {
            check_f64(&f("power_watts"), p, None)?;
        }
        if g.mig_instances.len() > MAX_MIG_PER_GPU {
            return Err(bad(format!(
                "{}: {} MIG instances, at most {MAX_MIG_PER_GPU} per GPU",
                f("mig_instances"),
                g.mig_instances.len()
            )));
        }
        if !g.mig_instances.is_empty() && !g.mig_enabled() {
            return Err(bad(format!(
                "{}: MIG instances on a GPU whose MIG mode is not enabled",
                f("mig_instances")
            )));
        }
        for (j, m) in g.mig_instances.iter().enumerate() {
            let f = |name: &str| format!("gpus[{i}].mig_instances[{j}].{name}");
            check_uuid(|| f("uuid"), &m.uuid, "MIG-")?;
            if m.parent_uuid != g.uuid {
                return Err(bad(format!(
                    "{}: must equal the GPU's uuid",
                    f("parent_uuid")
                )));
            }
            check_str(|| f("profile"), &m.profile, MAX_STRING_BYTES)?;
            check_memory(|| f("memory"), m.memory.as_ref())?;
            if let Some(r) = m.gr_engine_active {
                check_f64(&f("gr_engine_active"), r, Some(1.0))?;
            }
            if g.mig_instances[..j].iter().any(|o| o.index == m.index) {
                return Err(bad(format!(
                    "{}: duplicate MIG index {} on this GPU",
                    f("index"),
                    m.index
                )));
            }
        }
    }
    let mut indexes: Vec<u32> = inv.gpus.iter().map(|g| g.index).collect();
    indexes.sort_unstable();
    if let Some(w) = indexes.windows(2).find(|w| w[0] == w[1]) {
        return Err(bad(format!("gpus: duplicate GPU index {}", w[0])));
    }
    let mut all: Vec<&str> = uuids(inv).collect();
    all.sort_unstable();
    if let Some(w) = all.windows(2).find(|w| w[0] == w[1]) {
        return Err(bad(format!("gpus: duplicate device uuid {}", w[0])));
    }
    Ok(())
}

fn truncate(s: &str) -> &str {
    let mut end = s.len().min(64);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn uuids(inv: &NodeInventory) -> impl Iterator<Item = &str> {
    inv.gpus.iter().flat_map(|g| {
        std::iter::once(g.uuid.as_str()).chain(g.mig_instances.iter().map(|m| m.uuid.as_str()))
    })
}

/// Whether `new` replaces `stored`: a later `seq` of the same boot, or a new boot that
/// was collected no earlier.
fn supersedes(stored: &NodeInventory, new: &NodeInventory) -> bool {
    if stored.boot_id == new.boot_id {
        new.seq > stored.seq
    } else {
        new.collected_at_ms >= stored.collected_at_ms
    }
}

/// Same devices in the same positions with the same indexed facts: the index built for
/// `a` serves `b`.
fn same_layout(a: &NodeInventory, b: &NodeInventory) -> bool {
    a.gpus.len() == b.gpus.len()
        && a.gpus.iter().zip(&b.gpus).all(|(x, y)| {
            x.uuid == y.uuid
                && x.index == y.index
                && x.model == y.model
                && x.lost == y.lost
                && x.mig_enabled() == y.mig_enabled()
                && x.mig_instances.len() == y.mig_instances.len()
                && x.mig_instances
                    .iter()
                    .zip(&y.mig_instances)
                    .all(|(m, n)| m.uuid == n.uuid && m.index == n.index && m.profile == n.profile)
        })
}

/// Builders shared by this crate's unit tests.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::Ledger;
    use kcloud_common::fixtures::*;
    use kcloud_core::device::DeviceRequest;

    fn inventory() -> Inventory {
        Inventory::new(Duration::from_millis(STALE_MS))
    }

    fn ready_ledger() -> Ledger {
        let l = Ledger::new();
        l.rebuild([]);
        l
    }

    fn holder(user: &str, server: &str) -> Holder {
        Holder {
            user: user.into(),
            server: server.into(),
        }
    }

    fn all(inv: &Inventory, ledger: &Ledger, q: DeviceQuery, now: u64) -> Vec<DeviceView> {
        inv.devices(
            &DeviceQuery {
                limit: MAX_PAGE,
                ..q
            },
            ledger,
            now,
        )
        .unwrap()
        .items
    }

    fn uuids_of(items: &[DeviceView]) -> Vec<&str> {
        items.iter().map(|d| d.uuid.as_str()).collect()
    }

    /// dgx-a: GPU 0 in MIG mode (two 1g.10gb, one 3g.40gb), GPU 1 whole A100, GPU 2 lost.
    /// dgx-b: two H100s.
    fn cluster() -> (Inventory, Ledger) {
        let inv = inventory();
        let a = node(
            "dgx-a",
            vec![
                with_mig(
                    gpu(0, "GPU-a0", A100),
                    &[
                        ("MIG-a0-0", "1g.10gb"),
                        ("MIG-a0-1", "1g.10gb"),
                        ("MIG-a0-2", "3g.40gb"),
                    ],
                ),
                gpu(1, "GPU-a1", A100),
                lost(gpu(2, "GPU-a2", A100)),
            ],
        );
        inv.ingest("dgx-a", a, T0).unwrap();
        inv.ingest("dgx-b", plain_node("dgx-b", 2, H100), T0)
            .unwrap();
        (inv, ready_ledger())
    }

    fn lost(mut g: Gpu) -> Gpu {
        g.lost = true;
        g
    }

    // ---- validation -------------------------------------------------------------------

    type Mutation = Box<dyn Fn(&mut NodeInventory)>;

    fn valid() -> NodeInventory {
        node(
            "node-1",
            vec![
                gpu(0, "GPU-0", A100),
                with_mig(
                    gpu(1, "GPU-1", A100),
                    &[("MIG-1a", "1g.10gb"), ("MIG-1b", "1g.10gb")],
                ),
            ],
        )
    }

    #[test]
    fn each_validation_rule_rejects_with_the_field_named_and_stores_nothing() {
        let long = "x".repeat(MAX_STRING_BYTES + 1);
        let cases: Vec<(&str, Mutation)> = vec![
            ("node", Box::new(|i| i.node = "other".into())),
            ("seq", Box::new(|i| i.seq = 0)),
            ("group", Box::new(|i| i.group = Some("rack a".into()))),
            ("group", Box::new(|i| i.group = Some(String::new()))),
            ("boot_id", Box::new(|i| i.boot_id.clear())),
            ("boot_id", {
                let l = long.clone();
                Box::new(move |i| i.boot_id = l.clone())
            }),
            ("agent_version", {
                let l = long.clone();
                Box::new(move |i| i.agent_version = l.clone())
            }),
            ("nvml.driver_version", {
                let l = long.clone();
                Box::new(move |i| i.nvml.driver_version = Some(l.clone()))
            }),
            ("nvml.error", {
                let l = long.clone();
                Box::new(move |i| i.nvml.error = Some(l.clone()))
            }),
            ("host.hostname", {
                let l = long.clone();
                Box::new(move |i| i.host.hostname = l.clone())
            }),
            (
                "host.cpu_utilization_percent",
                Box::new(|i| i.host.cpu_utilization_percent = 100.5),
            ),
            (
                "host.cpu_utilization_percent",
                Box::new(|i| i.host.cpu_utilization_percent = f64::NAN),
            ),
            (
                "host.cpu_utilization_percent",
                Box::new(|i| i.host.cpu_utilization_percent = -1.0),
            ),
            (
                "host.memory_used_bytes",
                Box::new(|i| i.host.memory_used_bytes = i.host.memory_total_bytes + 1),
            ),
            (
                "host.load_average[1]",
                Box::new(|i| i.host.load_average[1] = f64::INFINITY),
            ),
            (
                "host.load_average[2]",
                Box::new(|i| i.host.load_average[2] = -0.5),
            ),
            (
                "gpus:",
                Box::new(|i| {
                    i.gpus = (0..257)
                        .map(|n| gpu(n, &format!("GPU-{n}"), A100))
                        .collect()
                }),
            ),
            (
                "gpus[0].uuid",
                Box::new(|i| i.gpus[0].uuid = "0000-1111".into()),
            ),
            ("gpus[0].uuid", Box::new(|i| i.gpus[0].uuid = "GPU-".into())),
            (
                "gpus[0].uuid",
                Box::new(|i| i.gpus[0].uuid = format!("GPU-{}", "a".repeat(93))),
            ),
            ("gpus[0].model", {
                let l = long.clone();
                Box::new(move |i| i.gpus[0].model = l.clone())
            }),
            ("gpus[0].pci_bus_id", {
                let l = long.clone();
                Box::new(move |i| i.gpus[0].pci_bus_id = l.clone())
            }),
            (
                "gpus[0].utilization_gpu_percent",
                Box::new(|i| i.gpus[0].utilization_gpu_percent = Some(101)),
            ),
            (
                "gpus[0].utilization_memory_percent",
                Box::new(|i| i.gpus[0].utilization_memory_percent = Some(200)),
            ),
            (
                "gpus[0].memory",
                Box::new(|i| {
                    let m = i.gpus[0].memory.as_mut().unwrap();
                    m.used_bytes = m.total_bytes + 1;
                }),
            ),
            (
                "gpus[0].power_watts",
                Box::new(|i| i.gpus[0].power_watts = Some(f64::NAN)),
            ),
            (
                "gpus[0].power_watts",
                Box::new(|i| i.gpus[0].power_watts = Some(-3.0)),
            ),
            (
                "gpus[0].mig_instances",
                Box::new(|i| {
                    // Instances on a GPU whose MIG mode is off would be allocatable twice.
                    let mut g = with_mig(gpu(0, "GPU-0", A100), &[("MIG-0a", "1g.10gb")]);
                    g.mig_mode = Some(kcloud_common::MigMode::default());
                    i.gpus[0] = g;
                }),
            ),
            (
                "gpus[1].mig_instances",
                Box::new(|i| {
                    let slices: Vec<(String, &str)> =
                        (0..17).map(|n| (format!("MIG-x{n}"), "1g.10gb")).collect();
                    let refs: Vec<(&str, &str)> =
                        slices.iter().map(|(u, p)| (u.as_str(), *p)).collect();
                    i.gpus[1] = with_mig(gpu(1, "GPU-1", A100), &refs);
                }),
            ),
            (
                "gpus[1].mig_instances[0].uuid",
                Box::new(|i| i.gpus[1].mig_instances[0].uuid = "GPU-1a".into()),
            ),
            (
                "gpus[1].mig_instances[0].uuid",
                Box::new(|i| i.gpus[1].mig_instances[0].uuid = format!("MIG-{}", "b".repeat(93))),
            ),
            (
                "gpus[1].mig_instances[1].parent_uuid",
                Box::new(|i| i.gpus[1].mig_instances[1].parent_uuid = "GPU-0".into()),
            ),
            ("gpus[1].mig_instances[0].profile", {
                let l = long.clone();
                Box::new(move |i| i.gpus[1].mig_instances[0].profile = l.clone())
            }),
            (
                "gpus[1].mig_instances[0].memory",
                Box::new(|i| {
                    let m = i.gpus[1].mig_instances[0].memory.as_mut().unwrap();
                    m.used_bytes = m.total_bytes + 1;
                }),
            ),
            (
                "gpus[1].mig_instances[1].index",
                Box::new(|i| i.gpus[1].mig_instances[1].index = 0),
            ),
            (
                "gpus[1].mig_instances[0].gr_engine_active",
                Box::new(|i| i.gpus[1].mig_instances[0].gr_engine_active = Some(1.5)),
            ),
            (
                "gpus[1].mig_instances[0].gr_engine_active",
                Box::new(|i| i.gpus[1].mig_instances[0].gr_engine_active = Some(f64::NAN)),
            ),
            ("duplicate GPU index", Box::new(|i| i.gpus[1].index = 0)),
            (
                "duplicate device uuid GPU-0",
                Box::new(|i| {
                    i.gpus[1] = gpu(1, "GPU-0", A100);
                }),
            ),
            (
                "duplicate device uuid MIG-1a",
                Box::new(|i| i.gpus[1].mig_instances[1].uuid = "MIG-1a".into()),
            ),
        ];
        for (field, mutate) in cases {
            let inv = inventory();
            let mut push = valid();
            mutate(&mut push);
            match inv.ingest("node-1", push, T0) {
                Err(Error::BadRequest(msg)) => {
                    assert!(msg.contains(field), "{field:?} not named in {msg:?}")
                }
                other => panic!("{field}: expected BadRequest, got {other:?}"),
            }
            assert_eq!(
                inv.counts(T0),
                NodeCounts::default(),
                "{field}: something was stored"
            );
        }
    }

    #[test]
    fn node_names_must_be_dns_like() {
        for bad_name in ["", "a b", "a/b", "ä", &"n".repeat(254)] {
            let inv = inventory();
            let push = node(bad_name, vec![]);
            let err = inv.ingest(bad_name, push, T0).unwrap_err();
            assert!(
                matches!(err, Error::BadRequest(ref m) if m.starts_with("node")),
                "{bad_name:?}: {err:?}"
            );
        }
        let inv = inventory();
        for good in ["a", "gpu-node_1.example.com", &"n".repeat(253)] {
            assert_eq!(
                inv.ingest(good, node(good, vec![]), T0).unwrap(),
                Ingested::Stored
            );
        }
    }

    #[test]
    fn limits_and_boundaries_are_accepted() {
        let inv = inventory();
        let mut push = valid();
        push.gpus[0].utilization_gpu_percent = Some(100);
        push.host.cpu_utilization_percent = 100.0;
        let m = push.gpus[0].memory.as_mut().unwrap();
        m.used_bytes = m.total_bytes;
        push.gpus[0].uuid = format!("GPU-{}", "a".repeat(92));
        push.gpus
            .extend((2..MAX_GPUS_PER_NODE as u32).map(|n| gpu(n, &format!("GPU-{n}"), A100)));
        let slices: Vec<(String, &str)> =
            (0..16).map(|n| (format!("MIG-y{n}"), "1g.5gb")).collect();
        let refs: Vec<(&str, &str)> = slices.iter().map(|(u, p)| (u.as_str(), *p)).collect();
        push.gpus[1] = with_mig(gpu(1, "GPU-1", A100), &refs);
        assert_eq!(inv.ingest("node-1", push, T0).unwrap(), Ingested::Stored);
        assert_eq!(inv.counts(T0).devices, 256 + 16);
    }

    // ---- ordering and idempotency -----------------------------------------------------

    #[test]
    fn keeps_the_highest_seq_per_boot_and_a_new_boot_only_if_not_older() {
        let inv = inventory();
        let ledger = ready_ledger();
        let first = plain_node("n1", 1, A100);
        assert_eq!(
            inv.ingest("n1", first.clone(), T0).unwrap(),
            Ingested::Stored
        );
        let mut second = next(&first);
        second.gpus[0].utilization_gpu_percent = Some(77);
        assert_eq!(
            inv.ingest("n1", second.clone(), T0 + 1).unwrap(),
            Ingested::Stored
        );
        // A retry and a late delivery are ignored, and do not refresh last_seen.
        assert_eq!(
            inv.ingest("n1", second.clone(), T0 + 2).unwrap(),
            Ingested::IgnoredOlder
        );
        assert_eq!(
            inv.ingest("n1", first.clone(), T0 + 3).unwrap(),
            Ingested::IgnoredOlder
        );
        let view = inv.node("n1", &ledger, T0 + 3).unwrap();
        assert_eq!(view.last_seen_ms, T0 + 1);
        let dev = &all(&inv, &ledger, DeviceQuery::default(), T0 + 3)[0];
        assert_eq!(dev.utilization_gpu_percent, Some(77));

        // Agent restart: seq starts again at 1.
        let mut restarted = plain_node("n1", 1, A100);
        restarted.boot_id = "boot-2".into();
        restarted.collected_at_ms = second.collected_at_ms - 1;
        assert_eq!(
            inv.ingest("n1", restarted.clone(), T0 + 4).unwrap(),
            Ingested::IgnoredOlder
        );
        restarted.collected_at_ms = second.collected_at_ms;
        restarted.gpus[0].utilization_gpu_percent = Some(3);
        assert_eq!(
            inv.ingest("n1", restarted.clone(), T0 + 5).unwrap(),
            Ingested::Stored
        );
        let dev = &all(&inv, &ledger, DeviceQuery::default(), T0 + 5)[0];
        assert_eq!(dev.utilization_gpu_percent, Some(3));
        // Now the old boot's later seqs are older.
        let mut old_boot = next(&second);
        old_boot.collected_at_ms = restarted.collected_at_ms - 1;
        assert_eq!(
            inv.ingest("n1", old_boot, T0 + 6).unwrap(),
            Ingested::IgnoredOlder
        );
        assert_eq!(
            inv.node("n1", &ledger, T0 + 6).unwrap().last_seen_ms,
            T0 + 5
        );
    }

    #[test]
    fn a_device_of_another_fresh_node_conflicts_and_moves_once_that_node_is_stale() {
        let inv = inventory();
        let ledger = ready_ledger();
        inv.ingest(
            "a",
            node("a", vec![gpu(0, "GPU-x", A100), gpu(1, "GPU-y", A100)]),
            T0,
        )
        .unwrap();
        let b = node("b", vec![gpu(0, "GPU-x", A100)]);
        let err = inv.ingest("b", b.clone(), T0 + 1).unwrap_err();
        assert!(
            matches!(err, Error::Conflict(ref m) if m.contains("GPU-x") && m.contains("node a"))
        );
        assert!(inv.node("b", &ledger, T0 + 1).is_none());

        let later = T0 + STALE_MS + 1;
        assert_eq!(inv.ingest("b", b, later).unwrap(), Ingested::Stored);
        let listed = all(&inv, &ledger, DeviceQuery::default(), later);
        let placed: Vec<(&str, &str)> = listed
            .iter()
            .map(|d| (d.node.as_str(), d.uuid.as_str()))
            .collect();
        assert_eq!(placed, vec![("a", "GPU-y"), ("b", "GPU-x")]);

        // Back from the dead: a conflicts while b is fresh...
        let a2 = next(&node(
            "a",
            vec![gpu(0, "GPU-x", A100), gpu(1, "GPU-y", A100)],
        ));
        assert!(matches!(
            inv.ingest("a", a2.clone(), later + 1),
            Err(Error::Conflict(_))
        ));
        // ...and takes it back once b is stale, listing it exactly once again.
        let much_later = later + STALE_MS + 1;
        assert_eq!(inv.ingest("a", a2, much_later).unwrap(), Ingested::Stored);
        let listed = all(&inv, &ledger, DeviceQuery::default(), much_later);
        let placed: Vec<(&str, &str)> = listed
            .iter()
            .map(|d| (d.node.as_str(), d.uuid.as_str()))
            .collect();
        assert_eq!(placed, vec![("a", "GPU-x"), ("a", "GPU-y")]);
    }

    // ---- staleness and views ----------------------------------------------------------

    #[test]
    fn a_node_goes_stale_after_the_limit_and_its_devices_are_not_available() {
        let (inv, ledger) = cluster();
        let b = |now| {
            all(
                &inv,
                &ledger,
                DeviceQuery {
                    node: Some("dgx-b".into()),
                    ..Default::default()
                },
                now,
            )
        };
        assert!(b(T0 + STALE_MS).iter().all(|d| d.available && !d.stale));
        assert!(b(T0 + STALE_MS + 1).iter().all(|d| !d.available && d.stale));
        let view = inv.node("dgx-b", &ledger, T0 + STALE_MS + 1).unwrap();
        assert!(view.stale);
        assert_eq!((view.devices_total, view.devices_free), (2, 0));
        assert_eq!(view.age_seconds, 15);
        let c = inv.counts(T0 + STALE_MS + 1);
        assert_eq!(
            (c.fresh, c.stale, c.devices, c.oldest_age_ms),
            (0, 2, 8, STALE_MS + 1)
        );
        // A heartbeat makes it fresh again.
        let hb = next(&plain_node("dgx-b", 2, H100));
        inv.ingest("dgx-b", hb, T0 + STALE_MS + 2).unwrap();
        assert!(b(T0 + STALE_MS + 2).iter().all(|d| d.available));
    }

    #[test]
    fn mig_mode_gpus_are_listed_but_only_their_instances_are_available() {
        let (inv, ledger) = cluster();
        let a = all(
            &inv,
            &ledger,
            DeviceQuery {
                node: Some("dgx-a".into()),
                ..Default::default()
            },
            T0,
        );
        let summary: Vec<(&str, DeviceKind, Option<bool>, bool, bool)> = a
            .iter()
            .map(|d| (d.uuid.as_str(), d.kind, d.mig_enabled, d.available, d.lost))
            .collect();
        assert_eq!(
            summary,
            vec![
                ("GPU-a0", DeviceKind::Gpu, Some(true), false, false),
                ("MIG-a0-0", DeviceKind::Mig, None, true, false),
                ("MIG-a0-1", DeviceKind::Mig, None, true, false),
                ("MIG-a0-2", DeviceKind::Mig, None, true, false),
                ("GPU-a1", DeviceKind::Gpu, Some(false), true, false),
                ("GPU-a2", DeviceKind::Gpu, Some(false), false, true),
            ]
        );
        let mig = &a[3];
        assert_eq!(mig.parent_uuid.as_deref(), Some("GPU-a0"));
        assert_eq!(mig.profile.as_deref(), Some("3g.40gb"));
        assert_eq!(
            (mig.index, mig.mig_index, mig.gpu_instance_id),
            (0, Some(2), Some(3))
        );
        assert_eq!(mig.model, A100);
        assert_eq!(mig.memory_total_bytes, Some(10 << 30));
        assert_eq!(mig.utilization_gpu_percent, None);
        let view = inv.node("dgx-a", &ledger, T0).unwrap();
        assert_eq!(
            (view.gpus, view.devices_total, view.devices_free),
            (3, 5, 4)
        );
        assert_eq!(view.driver_version.as_deref(), Some("550.54.15"));
    }

    #[test]
    fn device_json_omits_absent_fields() {
        let (inv, ledger) = cluster();
        ledger
            .claim(
                holder("ann", "nb"),
                &DeviceRequest::Exact(vec!["GPU-a1".into()]),
                &inv,
                None,
                T0,
            )
            .unwrap();
        let items = all(&inv, &ledger, DeviceQuery::default(), T0);
        let gpu = serde_json::to_value(items.iter().find(|d| d.uuid == "GPU-a1").unwrap()).unwrap();
        assert_eq!(gpu["kind"], "gpu");
        assert_eq!(gpu["available"], false);
        assert_eq!(
            gpu["holder"],
            serde_json::json!({"user": "ann", "server": "nb"})
        );
        assert_eq!(gpu["utilization_gpu_percent"], 10);
        assert!(gpu.get("profile").is_none() && gpu.get("parent_uuid").is_none());
        let mig =
            serde_json::to_value(items.iter().find(|d| d.uuid == "MIG-a0-0").unwrap()).unwrap();
        assert_eq!(mig["kind"], "mig");
        assert_eq!(mig["profile"], "1g.10gb");
        assert!(mig.get("holder").is_none() && mig.get("mig_enabled").is_none());
        assert!(mig.get("temperature_celsius").is_none());
        let page = serde_json::to_value(inv.devices(&DeviceQuery::default(), &ledger, T0).unwrap())
            .unwrap();
        assert!(page.get("next_cursor").is_none());
    }

    #[test]
    fn nothing_is_available_before_the_ledger_is_rebuilt() {
        let (inv, _) = cluster();
        let ledger = Ledger::new();
        assert!(
            all(&inv, &ledger, DeviceQuery::default(), T0)
                .iter()
                .all(|d| !d.available)
        );
        let q = DeviceQuery {
            available: Some(true),
            ..Default::default()
        };
        assert!(inv.devices(&q, &ledger, T0).unwrap().items.is_empty());
        assert!(inv.summary(&q, &ledger, T0).iter().all(|a| a.free == 0));
    }

    #[test]
    fn heartbeats_update_metrics_and_layout_changes_update_the_listing() {
        let (inv, ledger) = cluster();
        let mut b = next(&plain_node("dgx-b", 2, H100));
        b.gpus[1].temperature_celsius = Some(81);
        inv.ingest("dgx-b", b.clone(), T0 + 1).unwrap();
        let q = DeviceQuery {
            node: Some("dgx-b".into()),
            ..Default::default()
        };
        assert_eq!(
            all(&inv, &ledger, q.clone(), T0 + 1)[1].temperature_celsius,
            Some(81)
        );
        // MIG mode switched on for GPU 1.
        let mut b2 = next(&b);
        b2.gpus[1] = with_mig(b2.gpus[1].clone(), &[("MIG-b1-0", "3g.40gb")]);
        inv.ingest("dgx-b", b2.clone(), T0 + 2).unwrap();
        let listed = all(&inv, &ledger, q.clone(), T0 + 2);
        assert_eq!(
            uuids_of(&listed),
            vec!["GPU-dgx-b-0", "GPU-dgx-b-1", "MIG-b1-0"]
        );
        assert!(!listed[1].available && listed[2].available);
        // GPU 0 lost.
        let mut b3 = next(&b2);
        b3.gpus[0].lost = true;
        inv.ingest("dgx-b", b3, T0 + 3).unwrap();
        let listed = all(&inv, &ledger, q, T0 + 3);
        assert!(listed[0].lost && !listed[0].available);
        let s = inv.summary(&DeviceQuery::default(), &ledger, T0 + 3);
        let h100: Vec<_> = s.iter().filter(|a| a.model == H100).collect();
        assert_eq!(h100.len(), 2);
        assert_eq!(
            (h100[0].kind, h100[0].total, h100[0].free),
            (DeviceKind::Gpu, 1, 0)
        );
        assert_eq!(
            (h100[1].kind, h100[1].total, h100[1].free),
            (DeviceKind::Mig, 1, 1)
        );
    }

    // ---- paging, filters, summary -----------------------------------------------------

    /// 12 nodes with mixed layouts: 5 listed devices each.
    fn big_cluster() -> (Inventory, Ledger) {
        let inv = inventory();
        for n in 0..12 {
            let name = format!("node-{n:02}");
            let model = if n % 3 == 0 { H100 } else { A100 };
            let g = |i: u32| gpu(i, &format!("GPU-{name}-{i}"), model);
            let push = node(
                &name,
                vec![
                    g(0),
                    with_mig(
                        g(1),
                        &[
                            (&format!("MIG-{name}-1a"), "1g.10gb"),
                            (&format!("MIG-{name}-1b"), "2g.20gb"),
                        ],
                    ),
                    g(2),
                ],
            );
            inv.ingest(&name, push, T0).unwrap();
        }
        (inv, ready_ledger())
    }

    fn walk(inv: &Inventory, ledger: &Ledger, q: &DeviceQuery, now: u64) -> Vec<String> {
        let mut out = Vec::new();
        let mut q = q.clone();
        for _ in 0..1000 {
            let page = inv.devices(&q, ledger, now).unwrap();
            assert!(page.items.len() <= q.limit.max(1));
            out.extend(page.items.into_iter().map(|d| d.uuid));
            match page.next_cursor {
                Some(c) => {
                    assert!(
                        c.bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                    );
                    q.cursor = Some(c);
                }
                None => return out,
            }
        }
        panic!("paging does not end");
    }

    #[test]
    fn paging_covers_every_device_exactly_once_in_a_stable_order() {
        let (inv, ledger) = big_cluster();
        let everything = uuids_of(&all(&inv, &ledger, DeviceQuery::default(), T0))
            .into_iter()
            .map(String::from)
            .collect::<Vec<_>>();
        assert_eq!(everything.len(), 60);
        assert_eq!(
            &everything[..5],
            [
                "GPU-node-00-0",
                "GPU-node-00-1",
                "MIG-node-00-1a",
                "MIG-node-00-1b",
                "GPU-node-00-2"
            ]
        );
        for limit in [1, 2, 3, 7, 59, 60, 61] {
            let q = DeviceQuery {
                limit,
                ..Default::default()
            };
            assert_eq!(walk(&inv, &ledger, &q, T0), everything, "limit {limit}");
        }
        // The last full page has no cursor (no empty trailing page).
        let q = DeviceQuery {
            limit: 60,
            ..Default::default()
        };
        assert!(inv.devices(&q, &ledger, T0).unwrap().next_cursor.is_none());
    }

    #[test]
    fn filtered_paging_matches_the_filtered_listing() {
        let (inv, ledger) = big_cluster();
        // Hold some devices so that `available` means something: all of node-03, one of
        // node-04.
        for (i, uuids) in [
            vec!["GPU-node-03-0", "GPU-node-03-2"],
            vec!["MIG-node-03-1a", "MIG-node-03-1b"],
            vec!["GPU-node-04-2"],
        ]
        .into_iter()
        .enumerate()
        {
            let req = DeviceRequest::Exact(uuids.into_iter().map(String::from).collect());
            ledger
                .claim(holder("u", &format!("s{i}")), &req, &inv, None, T0)
                .unwrap();
        }
        let everything = all(&inv, &ledger, DeviceQuery::default(), T0);
        let queries = [
            DeviceQuery {
                node: Some("node-04".into()),
                ..Default::default()
            },
            DeviceQuery {
                model: Some(H100.into()),
                ..Default::default()
            },
            DeviceQuery {
                profile: Some("2g.20gb".into()),
                ..Default::default()
            },
            DeviceQuery {
                kind: Some(DeviceKind::Mig),
                ..Default::default()
            },
            DeviceQuery {
                kind: Some(DeviceKind::Gpu),
                available: Some(false),
                ..Default::default()
            },
            DeviceQuery {
                available: Some(true),
                ..Default::default()
            },
            DeviceQuery {
                available: Some(true),
                model: Some(H100.into()),
                kind: Some(DeviceKind::Mig),
                ..Default::default()
            },
            DeviceQuery {
                available: Some(true),
                node: Some("node-03".into()),
                ..Default::default()
            },
            DeviceQuery {
                available: Some(true),
                node: Some("node-04".into()),
                ..Default::default()
            },
        ];
        for q in queries {
            let expected: Vec<String> = everything
                .iter()
                .filter(|d| {
                    q.node.as_ref().is_none_or(|n| &d.node == n)
                        && q.model.as_ref().is_none_or(|m| &d.model == m)
                        && q.profile
                            .as_ref()
                            .is_none_or(|p| d.profile.as_ref() == Some(p))
                        && q.kind.is_none_or(|k| d.kind == k)
                        && q.available.is_none_or(|a| d.available == a)
                })
                .map(|d| d.uuid.clone())
                .collect();
            for limit in [1, 4, 1000] {
                let q = DeviceQuery { limit, ..q.clone() };
                assert_eq!(walk(&inv, &ledger, &q, T0), expected, "{q:?}");
            }
        }
        let a = |q: DeviceQuery| {
            walk(
                &inv,
                &ledger,
                &DeviceQuery {
                    available: Some(true),
                    ..q
                },
                T0,
            )
        };
        assert!(
            a(DeviceQuery {
                node: Some("node-03".into()),
                ..Default::default()
            })
            .is_empty()
        );
        assert_eq!(a(DeviceQuery::default()).len(), 12 * 4 - 4 - 1);
        // Unknown filter values match nothing.
        assert!(
            a(DeviceQuery {
                model: Some("nope".into()),
                ..Default::default()
            })
            .is_empty()
        );
        assert!(
            a(DeviceQuery {
                node: Some("nope".into()),
                ..Default::default()
            })
            .is_empty()
        );
        assert!(
            a(DeviceQuery {
                kind: Some(DeviceKind::Gpu),
                profile: Some("1g.10gb".into()),
                ..Default::default()
            })
            .is_empty()
        );
    }

    #[test]
    fn a_cursor_from_one_node_filter_continues_inside_another() {
        let (inv, ledger) = big_cluster();
        let first = inv
            .devices(
                &DeviceQuery {
                    limit: 2,
                    ..Default::default()
                },
                &ledger,
                T0,
            )
            .unwrap();
        // A cursor before the node starts at the node, one after it ends the listing.
        let q = DeviceQuery {
            node: Some("node-05".into()),
            cursor: first.next_cursor,
            ..Default::default()
        };
        assert_eq!(inv.devices(&q, &ledger, T0).unwrap().items.len(), 5);
        let last = DevKey::node_end(&Arc::from("node-07")).cursor();
        let q = DeviceQuery {
            node: Some("node-05".into()),
            cursor: Some(last),
            ..Default::default()
        };
        assert!(inv.devices(&q, &ledger, T0).unwrap().items.is_empty());
    }

    #[test]
    fn a_bad_cursor_is_a_bad_request() {
        let (inv, ledger) = big_cluster();
        let garbage = [
            "!!!".to_owned(),
            "abc".to_owned(),
            URL_SAFE_NO_PAD.encode("x.g.node-01"),
            URL_SAFE_NO_PAD.encode("1.q.node-01"),
            URL_SAFE_NO_PAD.encode("1.g.bad node"),
            URL_SAFE_NO_PAD.encode("1.g"),
            URL_SAFE_NO_PAD.encode([0xff, 0xfe]),
        ];
        for c in garbage {
            let q = DeviceQuery {
                cursor: Some(c.clone()),
                ..Default::default()
            };
            assert!(
                matches!(inv.devices(&q, &ledger, T0), Err(Error::BadRequest(_))),
                "{c}"
            );
        }
    }

    #[test]
    fn limit_is_clamped() {
        let (inv, ledger) = big_cluster();
        let page = |limit| {
            inv.devices(
                &DeviceQuery {
                    limit,
                    ..Default::default()
                },
                &ledger,
                T0,
            )
            .unwrap()
        };
        assert_eq!(page(0).items.len(), 1);
        assert_eq!(page(usize::MAX).items.len(), 60);
        assert_eq!(DeviceQuery::default().limit, DEFAULT_PAGE);
    }

    #[test]
    fn api_types_have_schemas_and_are_shareable() {
        fn shared<T: Send + Sync>() {}
        shared::<Inventory>();
        shared::<Ledger>();
        let schema = |s: utoipa::openapi::RefOr<utoipa::openapi::schema::Schema>| {
            serde_json::to_string(&s).unwrap()
        };
        let page = schema(<Page<DeviceView> as utoipa::PartialSchema>::schema());
        assert!(
            page.contains("next_cursor") && page.contains("items"),
            "{page}"
        );
        let device = schema(<DeviceView as utoipa::PartialSchema>::schema());
        for field in [
            "uuid",
            "kind",
            "node",
            "model",
            "available",
            "holder",
            "parent_uuid",
        ] {
            assert!(
                device.contains(&format!("\"{field}\"")),
                "{field} missing from {device}"
            );
        }
        let node = schema(<NodeView as utoipa::PartialSchema>::schema());
        assert!(
            node.contains("\"host\"") && node.contains("devices_free"),
            "{node}"
        );
        let availability = schema(<Availability as utoipa::PartialSchema>::schema());
        assert!(availability.contains("\"free\""), "{availability}");
    }

    #[test]
    fn the_query_string_deserializes() {
        use axum::extract::Query;
        let uri: axum::http::Uri =
            "/api/v1/gpus?node=n1&kind=mig&available=true&profile=1g.10gb&limit=5&cursor=abc"
                .parse()
                .unwrap();
        let Query(q) = Query::<DeviceQuery>::try_from_uri(&uri).unwrap();
        assert_eq!(
            q,
            DeviceQuery {
                node: Some("n1".into()),
                model: None,
                profile: Some("1g.10gb".into()),
                kind: Some(DeviceKind::Mig),
                available: Some(true),
                cursor: Some("abc".into()),
                limit: 5,
            }
        );
        let Query(q) =
            Query::<DeviceQuery>::try_from_uri(&"/api/v1/gpus".parse().unwrap()).unwrap();
        assert_eq!(q, DeviceQuery::default());
    }

    #[test]
    fn summary_counts_total_and_free_per_model_and_profile() {
        let (inv, ledger) = big_cluster();
        ledger
            .claim(
                holder("u", "s"),
                &DeviceRequest::Exact(vec!["GPU-node-01-0".into(), "GPU-node-01-2".into()]),
                &inv,
                None,
                T0,
            )
            .unwrap();
        // node-02 goes stale: counted in total, not free.
        let later = T0 + STALE_MS + 1;
        for n in 0..12 {
            if n != 2 {
                let name = format!("node-{n:02}");
                let model = if n % 3 == 0 { H100 } else { A100 };
                let g = |i: u32| gpu(i, &format!("GPU-{name}-{i}"), model);
                let mut push = node(
                    &name,
                    vec![
                        g(0),
                        with_mig(
                            g(1),
                            &[
                                (&format!("MIG-{name}-1a"), "1g.10gb"),
                                (&format!("MIG-{name}-1b"), "2g.20gb"),
                            ],
                        ),
                        g(2),
                    ],
                );
                push.seq = 2;
                inv.ingest(&name, push, later).unwrap();
            }
        }
        let s = inv.summary(&DeviceQuery::default(), &ledger, later);
        let rows: Vec<(&str, DeviceKind, Option<&str>, u32, u32)> = s
            .iter()
            .map(|a| {
                (
                    a.model.as_str(),
                    a.kind,
                    a.profile.as_deref(),
                    a.total,
                    a.free,
                )
            })
            .collect();
        assert_eq!(
            rows,
            vec![
                (A100, DeviceKind::Gpu, None, 16, 12),
                (A100, DeviceKind::Mig, Some("1g.10gb"), 8, 7),
                (A100, DeviceKind::Mig, Some("2g.20gb"), 8, 7),
                (H100, DeviceKind::Gpu, None, 8, 8),
                (H100, DeviceKind::Mig, Some("1g.10gb"), 4, 4),
                (H100, DeviceKind::Mig, Some("2g.20gb"), 4, 4),
            ]
        );
        // The free counts agree with the listing.
        let listed = all(
            &inv,
            &ledger,
            DeviceQuery {
                available: Some(true),
                ..Default::default()
            },
            later,
        );
        assert_eq!(listed.len() as u32, s.iter().map(|a| a.free).sum::<u32>());
        let q = DeviceQuery {
            node: Some("node-01".into()),
            profile: Some("1g.10gb".into()),
            ..Default::default()
        };
        let s = inv.summary(&q, &ledger, later);
        assert_eq!(s.len(), 1);
        assert_eq!((s[0].total, s[0].free), (1, 1));
        let q = DeviceQuery {
            model: Some(H100.into()),
            kind: Some(DeviceKind::Gpu),
            ..Default::default()
        };
        assert_eq!(inv.summary(&q, &ledger, later).len(), 1);
        let nodes = inv.nodes(&ledger, later);
        assert_eq!(nodes.len(), 12);
        assert_eq!(
            (
                nodes[1].name.as_str(),
                nodes[1].devices_total,
                nodes[1].devices_free
            ),
            ("node-01", 4, 2)
        );
        assert!(nodes[2].stale && nodes[2].devices_free == 0);
    }
}
