//! kcloud-cluster: the cluster-wide view and the only place that decides who holds
//! which device.
//!
//! [`inventory`] keeps what agents push (nodes, GPUs, MIG instances, an ordered device
//! index); [`ledger`] allocates devices exclusively, best fit, from per-node free
//! counts it refreshes from the inventory's layout journal. They live together
//! because that design depends on both: the ledger reads the inventory's index under
//! its read lock, always in the order inventory, then ledger. [`Cluster`] is the one
//! facade the rest of the aggregator uses.

pub mod calendar;
pub mod inventory;
pub mod ledger;
pub mod plan;
pub mod queue;
mod views;

use std::time::Duration;

use kcloud_common::NodeInventory;
use kcloud_core::Result;
use kcloud_core::device::{DeviceRequest, Holder};

use crate::calendar::Calendar;
use crate::inventory::{
    Availability, DeviceQuery, DeviceView, FleetSummary, Ingested, Inventory, NodeCounts, NodeRow,
    NodeView, Page,
};
use crate::ledger::{Avoid, Claim, Ledger};

/// The inventory and the ledger, used together. `Send + Sync`; share it as
/// `Arc<Cluster>`.
pub struct Cluster {
    inventory: Inventory,
    ledger: Ledger,
    calendar: Calendar,
}

impl Cluster {
    /// Nodes whose last push is older than `stale_after` are shown, never allocated.
    pub fn new(stale_after: Duration) -> Self {
        Self {
            inventory: Inventory::new(stale_after),
            ledger: Ledger::new(),
            calendar: Calendar::new(),
        }
    }

    pub fn inventory(&self) -> &Inventory {
        &self.inventory
    }

    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// Reservations of devices for future windows.
    pub fn calendar(&self) -> &Calendar {
        &self.calendar
    }

    /// Stores an agent's push (see [`Inventory::ingest`]).
    pub fn ingest(&self, node: &str, inv: NodeInventory, now_ms: u64) -> Result<Ingested> {
        self.inventory.ingest(node, inv, now_ms)
    }

    pub fn nodes(&self, now_ms: u64) -> Vec<NodeView> {
        self.inventory.nodes(&self.ledger, now_ms)
    }

    pub fn node(&self, name: &str, now_ms: u64) -> Option<NodeView> {
        self.inventory.node(name, &self.ledger, now_ms)
    }

    /// One page of devices (see [`Inventory::devices`]).
    pub fn devices(&self, q: &DeviceQuery, now_ms: u64) -> Result<Page<DeviceView>> {
        self.inventory.devices(q, &self.ledger, now_ms)
    }

    pub fn summary(&self, q: &DeviceQuery, now_ms: u64) -> Vec<Availability> {
        self.inventory.summary(q, &self.ledger, now_ms)
    }

    /// A node's line for a fleet list.
    pub fn row(&self, name: &str, now_ms: u64) -> Option<NodeRow> {
        self.inventory.row(name, &self.ledger, now_ms)
    }

    /// Every node's line, by name.
    pub fn rows(&self, now_ms: u64) -> Vec<NodeRow> {
        self.inventory.rows(&self.ledger, now_ms)
    }

    /// Node counts and free devices per model, profile and node group.
    pub fn fleet(&self, now_ms: u64) -> FleetSummary {
        self.inventory.fleet(&self.ledger, now_ms)
    }

    pub fn counts(&self, now_ms: u64) -> NodeCounts {
        self.inventory.counts(now_ms)
    }

    /// Takes devices for `holder` (see [`Ledger::claim`]), never one in another
    /// user's (or a maintenance) reservation whose window holds `now_ms`, nor one in
    /// `promised` (devices requests ahead in the queue count on).
    pub fn claim(
        &self,
        holder: Holder,
        req: &DeviceRequest,
        max_devices: Option<u32>,
        now_ms: u64,
        promised: &Avoid,
    ) -> Result<Claim> {
        let mut avoid = promised.clone();
        self.calendar.avoid_for(&holder.user, now_ms, &mut avoid);
        self.ledger
            .claim_avoiding(holder, req, &self.inventory, max_devices, now_ms, &avoid)
    }

    /// Wakes after a stored push.
    pub fn inventory_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inventory.subscribe()
    }

    /// Wakes after a change of who holds what.
    pub fn allocation_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.ledger.subscribe()
    }
}
