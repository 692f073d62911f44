//! The wait queue: requests that asked to wait when nothing fitting was free.
//!
//! Entries are kept in the store (they survive restarts and SIGKILL) and in memory
//! with their validated plan. A round ([`Servers::dispatch`]) orders them fairly —
//! the owner's fair-share score (normalized GPU-hours of their servers, decayed with
//! `[queue] half_life`, divided by their `[queue] weights` entry), then arrival — and
//! lets `kcloud_cluster::queue` decide which start (backfill included); those are
//! launched like any create, under their owner's lock, and audited as started by the
//! queue. A request whose deadline passed leaves the queue; one that can no longer
//! start as asked (its owner disabled, a device gone) is dropped with the reason in
//! the audit log.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use kcloud_cluster::ledger::Avoid;
use kcloud_cluster::queue::{Outcome, Waiting};
use kcloud_core::caller::Caller;
use kcloud_core::device::Holder;
use kcloud_core::queue::{QueueEntry, UsageScore, new_queue_id};
use kcloud_core::server::{Server, ServerStatus};
use kcloud_core::signal::Signal;
use kcloud_core::time::millis;
use kcloud_core::{Error, Result, now_ms};

use super::{Actor, CreateServer, NotLaunched, Plan, Servers, validate};
use crate::notify::Notice;

/// How many waiting requests get an estimated start per round (the rest show
/// `unknown`): bounds a round on a very long queue.
const ESTIMATES: usize = 1_000;
/// A request refused for its owner's quota is not tried again for this long.
const QUOTA_BACKOFF_MS: u64 = 30_000;

/// The queue in memory. One round at a time.
#[derive(Default)]
pub(crate) struct QueueBook {
    state: Mutex<QueueState>,
    changed: Signal,
    round: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct QueueState {
    entries: Vec<Entry>,
    promised: Avoid,
    scores: HashMap<String, UsageScore>,
}

struct Entry {
    stored: QueueEntry,
    plan: Plan,
    position: Option<u32>,
    estimate_ms: Option<u64>,
    /// Not tried before this (its owner was over quota).
    retry_at_ms: u64,
}

/// A queued server's place, as views show it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct QueuePlace {
    /// 1 is next.
    pub position: Option<u32>,
    pub estimated_start_ms: Option<u64>,
    pub wait_until_ms: u64,
}

/// An entry of `GET /api/v1/queue`.
#[derive(Clone, Debug)]
pub struct QueueItem {
    pub owner: String,
    pub name: String,
    pub place: QueuePlace,
    pub enqueued_at_ms: u64,
    /// The owner's fair-share score now (admins only).
    pub fair_share: Option<f64>,
    pub weight: Option<f64>,
}

impl QueueBook {
    fn state(&self) -> MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn has(&self, owner: &str, name: &str) -> bool {
        self.state()
            .entries
            .iter()
            .any(|e| e.stored.owner == owner && e.stored.name == name)
    }

    pub(crate) fn changed_notify(&self) {
        self.changed.notify();
    }

    /// Devices promised to waiting requests by the last round.
    pub(crate) fn promised(&self) -> Avoid {
        self.state().promised.clone()
    }
}

impl Servers {
    pub(crate) async fn load_queue(&self) -> Result<()> {
        let stored = self.repo.queued().await?;
        let scores = self.repo.usage_scores().await?;
        let mut entries = Vec::new();
        for e in stored {
            match plan_of(self, &e) {
                Ok(plan) => entries.push(Entry {
                    stored: e,
                    plan,
                    position: None,
                    estimate_ms: None,
                    retry_at_ms: 0,
                }),
                Err(err) => {
                    tracing::warn!(owner = %e.owner, server = %e.name, error = %err, "dropping a queued request that is no longer valid");
                    self.repo.delete_queued(&e.id).await?;
                }
            }
        }
        let mut st = self.queue.state();
        st.entries = entries;
        st.scores = scores.into_iter().collect();
        Ok(())
    }

    /// Wakes after the queue changes (entries, places, estimates).
    pub fn queue_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.queue.changed.subscribe()
    }

    pub(crate) async fn enqueue(
        &self,
        caller: &Caller,
        client: IpAddr,
        user: &str,
        plan: &Plan,
        request: serde_json::Value,
        wait_ms: u64,
    ) -> Result<()> {
        let max = self.settings.queue.max_queued_per_user;
        let mine = self
            .queue
            .state()
            .entries
            .iter()
            .filter(|e| e.stored.owner == user)
            .count();
        if mine >= max as usize {
            return Err(Error::QuotaExceeded(format!(
                "queue quota exceeded: {user} has {mine} of {max} requests waiting"
            )));
        }
        let now = now_ms();
        let stored = QueueEntry {
            id: new_queue_id(),
            owner: user.to_owned(),
            name: plan.name.clone(),
            request,
            enqueued_at_ms: now,
            deadline_ms: now.saturating_add(wait_ms),
            created_by: caller.name.clone(),
        };
        self.repo.insert_queued(stored.clone()).await?;
        self.queue.state().entries.push(Entry {
            stored: stored.clone(),
            plan: plan.clone(),
            position: None,
            estimate_ms: None,
            retry_at_ms: 0,
        });
        self.queue.changed.notify();
        self.audit
            .record(
                caller,
                client,
                "server_queue",
                format!("{user}/{}", plan.name),
                format!(
                    "id={} wait_until={}",
                    stored.id,
                    kcloud_core::reservation::format_instant(stored.deadline_ms)
                ),
            )
            .await
    }

    /// Deletes a queued request (its owner's lock is held).
    pub(crate) async fn cancel_queued(
        &self,
        caller: &Caller,
        client: IpAddr,
        user: &str,
        name: &str,
    ) -> Result<()> {
        let id = self
            .take_entry(user, name)
            .ok_or_else(|| Error::NotFound(format!("no server {user}/{name}")))?;
        self.repo.delete_queued(&id).await?;
        self.audit
            .record(
                caller,
                client,
                "server_queue_cancel",
                format!("{user}/{name}"),
                format!("id={id}"),
            )
            .await
    }

    fn take_entry(&self, user: &str, name: &str) -> Option<String> {
        let mut st = self.queue.state();
        let i = st
            .entries
            .iter()
            .position(|e| e.stored.owner == user && e.stored.name == name)?;
        let e = st.entries.remove(i);
        drop(st);
        self.queue.changed.notify();
        Some(e.stored.id)
    }

    /// Queued servers of `owner` (everyone's with `None`), as servers.
    pub(crate) fn queued_servers(&self, owner: Option<&str>) -> Vec<Server> {
        self.queue
            .state()
            .entries
            .iter()
            .filter(|e| owner.is_none_or(|o| e.stored.owner == o))
            .map(as_server)
            .collect()
    }

    pub(crate) fn queued_server(&self, owner: &str, name: &str) -> Option<Server> {
        self.queue
            .state()
            .entries
            .iter()
            .find(|e| e.stored.owner == owner && e.stored.name == name)
            .map(as_server)
    }

    /// A queued server's place; `None` when it is not queued.
    pub fn queue_place(&self, server: &Server) -> Option<QueuePlace> {
        if server.status != ServerStatus::Queued {
            return None;
        }
        self.queue
            .state()
            .entries
            .iter()
            .find(|e| e.stored.id == server.id)
            .map(place)
    }

    /// How many requests wait, and since when the longest one has.
    pub fn queue_stats(&self) -> (usize, Option<u64>) {
        let st = self.queue.state();
        (
            st.entries.len(),
            st.entries.iter().map(|e| e.stored.enqueued_at_ms).min(),
        )
    }

    /// The queue as `caller` may see it: their own entries; an admin's: all, with the
    /// fair-share scores. In fair order.
    pub fn queue(&self, caller: &Caller) -> Vec<QueueItem> {
        let now = now_ms();
        let half = millis(self.settings.queue.half_life);
        let st = self.queue.state();
        let mut items: Vec<QueueItem> = st
            .entries
            .iter()
            .filter(|e| caller.is_admin() || e.stored.owner == caller.name)
            .map(|e| {
                let owner = &e.stored.owner;
                QueueItem {
                    owner: owner.clone(),
                    name: e.stored.name.clone(),
                    place: place(e),
                    enqueued_at_ms: e.stored.enqueued_at_ms,
                    fair_share: caller
                        .is_admin()
                        .then(|| st.scores.get(owner).map_or(0.0, |s| s.at(now, half))),
                    weight: caller.is_admin().then(|| self.settings.queue.weight(owner)),
                }
            })
            .collect();
        items.sort_by_key(|i| (i.place.position.unwrap_or(u32::MAX), i.enqueued_at_ms));
        items
    }

    /// Adds the normalized GPU-hours of `devices`, held since `since_ms`, to `owner`'s
    /// fair-share score.
    pub(crate) async fn account(&self, owner: &str, devices: &[String], since_ms: u64) {
        let now = now_ms();
        let hours = super::gpu_hours(&self.cluster, devices, since_ms, now);
        let half = millis(self.settings.queue.half_life);
        // The store only: each round re-reads the scores from it.
        if let Err(e) = self.repo.add_usage(owner, hours, now, half).await {
            tracing::warn!(error = %e, "could not record GPU-hours");
        }
    }

    /// One round over the queue: drops expired requests, orders the rest fairly,
    /// starts those that fit (backfill included) and records places and estimates.
    /// Returns how many started.
    pub async fn dispatch(self: &Arc<Self>) -> usize {
        self.dispatch_with(true).await
    }

    /// A round; estimates (and the shadows of known estimates) only with `estimate`,
    /// otherwise the last ones stay shown.
    pub(crate) async fn dispatch_with(self: &Arc<Self>, estimate: bool) -> usize {
        let _round = self.queue.round.lock().await;
        let now = now_ms();
        self.expire(now).await;
        // Every agent push wakes the scheduler: an empty queue costs nothing more.
        {
            let mut st = self.queue.state();
            if st.entries.is_empty() {
                st.promised = Avoid::default();
                return 0;
            }
        }
        let users: HashMap<String, kcloud_core::user::User> = match self.repo.users().await {
            Ok(u) => u.into_iter().map(|u| (u.name.clone(), u)).collect(),
            Err(e) => {
                tracing::warn!(error = %e, "queue round skipped: cannot read users");
                return 0;
            }
        };
        // Servers that ended by themselves added their hours in the store only.
        match self.repo.usage_scores().await {
            Ok(scores) => self.queue.state().scores = scores.into_iter().collect(),
            Err(e) => {
                tracing::warn!(error = %e, "fair-share scores unavailable; using the last ones")
            }
        }
        let half = millis(self.settings.queue.half_life);
        let (ids, waiting) = {
            let mut st = self.queue.state();
            if st.entries.is_empty() {
                st.promised = Avoid::default();
                return 0;
            }
            let scores = std::mem::take(&mut st.scores);
            let key = |e: &Entry| {
                let o = &e.stored.owner;
                scores.get(o).map_or(0.0, |s| s.at(now, half)) / self.settings.queue.weight(o)
            };
            st.entries.sort_by(|a, b| {
                key(a)
                    .total_cmp(&key(b))
                    .then(a.stored.enqueued_at_ms.cmp(&b.stored.enqueued_at_ms))
                    .then(a.stored.id.cmp(&b.stored.id))
            });
            st.scores = scores;
            let mut ids = Vec::new();
            let mut waiting = Vec::new();
            for e in st.entries.iter().filter(|e| e.retry_at_ms <= now) {
                let Some(req) = e.plan.devices.clone() else {
                    continue;
                };
                let quota = users
                    .get(&e.stored.owner)
                    .map(|u| u.quota.effective(&self.settings.default_quota).gpus);
                ids.push(e.stored.id.clone());
                waiting.push(Waiting {
                    holder: Holder::new(&e.stored.owner, &e.stored.name),
                    request: req,
                    max_devices: quota.flatten(),
                });
            }
            (ids, waiting)
        };
        let (known, estimates) = if estimate {
            (self.known_ends(now), ESTIMATES)
        } else {
            (Default::default(), 0)
        };
        let round = self.cluster.decide(&waiting, now, &known, estimates);
        let mut starts = Vec::new();
        let mut drops = Vec::new();
        // Live views are told only when a place or an estimate moved.
        let mut moved = false;
        {
            let mut st = self.queue.state();
            let mut position = 0u32;
            let outcomes: HashMap<&String, &Outcome> = ids.iter().zip(&round.outcomes).collect();
            for e in st.entries.iter_mut() {
                match outcomes.get(&e.stored.id) {
                    Some(Outcome::Start(c)) => {
                        starts.push((e.stored.clone(), e.plan.clone(), c.clone()))
                    }
                    Some(Outcome::Drop(err)) => drops.push((e.stored.clone(), err.to_string())),
                    Some(Outcome::Wait { estimate: est }) => {
                        position += 1;
                        moved |= e.position != Some(position);
                        e.position = Some(position);
                        if estimate {
                            let ms = est.as_ref().map(|x| x.start_ms);
                            moved |= e.estimate_ms != ms;
                            e.estimate_ms = ms;
                        }
                    }
                    None => {
                        position += 1;
                        moved |= e.position != Some(position);
                        e.position = Some(position);
                    }
                }
            }
            st.promised = round.promised;
        }
        let mut started = 0;
        for (stored, plan, claim) in starts {
            let claim_id = claim.id;
            let result = self.start_queued(&stored, &plan, claim).await;
            match result {
                Ok(server) => {
                    started += 1;
                    self.take_entry(&stored.owner, &stored.name);
                    if let Err(e) = self.repo.delete_queued(&stored.id).await {
                        tracing::error!(error = %e, "could not remove a started request from the queue");
                    }
                    let waited = (now_ms().saturating_sub(stored.enqueued_at_ms)) / 1000;
                    self.notifier.send(Notice {
                        text: format!(
                            "Your server {} started from the queue after {} s on {}.",
                            server.name,
                            waited,
                            server.devices.join(", ")
                        ),
                        kind: "queue_started",
                        user: server.owner.clone(),
                        server: Some(server.name.clone()),
                        reservation: None,
                    });
                }
                Err(e) => {
                    self.cluster.ledger().abort(claim_id);
                    // Cancelled meanwhile: nothing to drop.
                    if !self.queue.has(&stored.owner, &stored.name) {
                        continue;
                    }
                    if matches!(e, Error::QuotaExceeded(_)) {
                        let mut st = self.queue.state();
                        if let Some(x) = st.entries.iter_mut().find(|x| x.stored.id == stored.id) {
                            x.retry_at_ms = now_ms() + QUOTA_BACKOFF_MS;
                        }
                    } else {
                        drops.push((stored, e.to_string()));
                    }
                }
            }
        }
        let dropped = !drops.is_empty();
        for (stored, why) in drops {
            self.take_entry(&stored.owner, &stored.name);
            let _ = self.repo.delete_queued(&stored.id).await;
            tracing::warn!(owner = %stored.owner, server = %stored.name, reason = %why, "dropped a queued request");
            let _ = self
                .audit
                .record_system(
                    "server_queue_drop",
                    format!("{}/{}", stored.owner, stored.name),
                    why,
                )
                .await;
        }
        if moved || started > 0 || dropped {
            self.queue.changed.notify();
        }
        started
    }

    async fn start_queued(
        &self,
        stored: &QueueEntry,
        plan: &Plan,
        claim: kcloud_cluster::ledger::Claim,
    ) -> Result<Server> {
        let _serial = self.locks.lock(&stored.owner).await;
        // Deleted (cancelled) since the round decided: nothing to start.
        if !self.queue.has(&stored.owner, &stored.name) {
            return Err(Error::NotFound(format!(
                "{}/{} left the queue",
                stored.owner, stored.name
            )));
        }
        let owner = self.repo.existing_user(&stored.owner).await?;
        if owner.disabled {
            return Err(Error::Conflict(format!(
                "user {:?} is disabled",
                stored.owner
            )));
        }
        if self.provisioner.get(&stored.owner, &plan.name).is_some() {
            return Err(Error::Conflict(format!(
                "server name {:?} is already in use",
                plan.name
            )));
        }
        match self.launch(Actor::Queue, &owner, plan, Some(claim)).await {
            Ok(s) => Ok(s),
            Err(NotLaunched::NoDevices(e) | NotLaunched::Failed(e)) => Err(e),
        }
    }

    async fn expire(&self, now: u64) {
        let expired: Vec<QueueEntry> = {
            let mut st = self.queue.state();
            let (gone, keep): (Vec<Entry>, Vec<Entry>) = std::mem::take(&mut st.entries)
                .into_iter()
                .partition(|e| e.stored.deadline_ms <= now);
            st.entries = keep;
            gone.into_iter().map(|e| e.stored).collect()
        };
        for e in expired {
            let _ = self.repo.delete_queued(&e.id).await;
            let _ = self
                .audit
                .record_system(
                    "server_queue_expired",
                    format!("{}/{}", e.owner, e.name),
                    format!("waited {} s", (now - e.enqueued_at_ms) / 1000),
                )
                .await;
            self.notifier.send(Notice {
                text: format!(
                    "Your queued server {} did not get its devices in time and left the queue.",
                    e.name
                ),
                kind: "queue_expired",
                user: e.owner.clone(),
                server: Some(e.name.clone()),
                reservation: None,
            });
            self.queue.changed.notify();
        }
    }
}

fn plan_of(servers: &Servers, e: &QueueEntry) -> Result<Plan> {
    let req: CreateServer = serde_json::from_value(e.request.clone())
        .map_err(|err| Error::BadRequest(format!("stored request: {err}")))?;
    validate(&servers.settings, req)
}

fn place(e: &Entry) -> QueuePlace {
    QueuePlace {
        position: e.position,
        estimated_start_ms: e.estimate_ms,
        wait_until_ms: e.stored.deadline_ms,
    }
}

fn as_server(e: &Entry) -> Server {
    Server {
        id: e.stored.id.clone(),
        owner: e.stored.owner.clone(),
        name: e.stored.name.clone(),
        status: ServerStatus::Queued,
        reason: Some("waiting in the queue for its devices".into()),
        node: None,
        devices: Vec::new(),
        cpu_millis: e.plan.cpu_millis,
        memory_bytes: e.plan.memory_bytes,
        image: e.plan.image.clone(),
        launch: e.plan.launch.clone(),
        created_at_ms: e.stored.enqueued_at_ms,
        ready_at_ms: None,
        last_activity_ms: e.stored.enqueued_at_ms,
        cull_exempt: false,
        pid: None,
        upstream: None,
        mounts: Vec::new(),
    }
}
