//! The ledger against the inventory: a property test over random operation sequences
//! with a reference model, a concurrent stress test, and (ignored) timings at 80,000
//! devices.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kcloud_cluster::inventory::{DeviceQuery, DeviceView, Ingested, Inventory};
use kcloud_cluster::ledger::Ledger;
use kcloud_common::inventory::{DeviceKind, Gpu, NodeInventory};
use kcloud_core::device::{DeviceRequest, Holder};
use kcloud_core::{Error, now_ms};
use kcloud_testkit::fixtures;
use proptest::prelude::*;

const A100: &str = "NVIDIA A100-SXM4-80GB";
const H100: &str = "NVIDIA H100 80GB HBM3";
const STALE_MS: u64 = 15_000;
const T0: u64 = 1_000_000;

fn gpu(index: u32, uuid: &str, model: &str) -> Gpu {
    fixtures::gpu(index, uuid, model)
}

fn with_mig(g: Gpu, slices: &[(String, &str)]) -> Gpu {
    fixtures::with_mig(g, slices)
}

/// A node's push with sequence number (and collection time) `seq`.
fn node(name: &str, seq: u64, gpus: Vec<Gpu>) -> NodeInventory {
    NodeInventory {
        boot_id: "boot".into(),
        seq,
        collected_at_ms: seq,
        ..fixtures::node(name, gpus)
    }
}

fn holder(user: &str, server: &str) -> Holder {
    Holder {
        user: user.into(),
        server: server.into(),
    }
}

/// Every device, walking pages of 7.
fn listing(inv: &Inventory, ledger: &Ledger, now: u64) -> Vec<DeviceView> {
    let mut q = DeviceQuery {
        limit: 7,
        ..DeviceQuery::default()
    };
    let mut out = Vec::new();
    loop {
        let page = inv.devices(&q, ledger, now).unwrap();
        out.extend(page.items);
        match page.next_cursor {
            Some(c) => q.cursor = Some(c),
            None => return out,
        }
    }
}

// ---- property test ---------------------------------------------------------------------

/// Three small nodes whose layout the test changes:
/// - n0: A100 `GPU-0a` (MIG mode switchable: two 1g.10gb), A100 `GPU-0b`.
/// - n1: A100 `GPU-1a` (MIG mode switchable: 1g.10gb + 3g.40gb), H100 `GPU-1b` (can
///   be lost).
/// - n2: H100 `GPU-2a`, H100 `GPU-2b` (can be lost).
///
/// A MIG layout gets new instance UUIDs every time MIG mode is switched on, as NVML
/// does.
#[derive(Clone, Copy, Debug)]
struct Layout {
    mig: bool,
    lost: bool,
    /// How many times MIG mode was switched on: part of the instance UUIDs.
    epoch: u32,
}

fn build(n: usize, l: Layout, seq: u64) -> NodeInventory {
    let name = format!("n{n}");
    let slices = |g: &str, profiles: &[&'static str]| -> Vec<(String, &'static str)> {
        profiles
            .iter()
            .enumerate()
            .map(|(i, p)| (format!("MIG-{g}-e{}-{i}", l.epoch), *p))
            .collect()
    };
    let mut gpus = match n {
        0 => vec![gpu(0, "GPU-0a", A100), gpu(1, "GPU-0b", A100)],
        1 => vec![gpu(0, "GPU-1a", A100), gpu(1, "GPU-1b", H100)],
        _ => vec![gpu(0, "GPU-2a", H100), gpu(1, "GPU-2b", H100)],
    };
    if l.mig && n < 2 {
        let profiles: &[&str] = if n == 0 {
            &["1g.10gb", "1g.10gb"]
        } else {
            &["1g.10gb", "3g.40gb"]
        };
        let g = gpus[0].clone();
        let uuid = g.uuid.clone();
        gpus[0] = with_mig(g, &slices(&uuid[4..], profiles));
    }
    if l.lost && n > 0 {
        gpus[1].lost = true;
    }
    node(&name, seq, gpus)
}

#[derive(Clone, Debug)]
enum Req {
    /// Indexes into the devices listed right now (wrapping).
    Exact(Vec<usize>),
    Gpus {
        count: u32,
        model: Option<usize>,
    },
    Mig {
        profile: usize,
        model: Option<usize>,
    },
}

#[derive(Clone, Debug)]
enum Op {
    Reserve {
        user: u8,
        server: u8,
        req: Req,
        quota: Option<u32>,
    },
    Commit(usize),
    Abort(usize),
    Release {
        user: u8,
        server: u8,
    },
    /// A restart: rebuild from the committed holdings (the servers that exist).
    Rebuild,
    Ingest {
        node: usize,
        mig: bool,
        lost: bool,
    },
    Advance(u64),
    Sweep(u64),
}

const MODELS: [&str; 3] = [A100, H100, "NVIDIA B200"];
const PROFILES: [&str; 3] = ["1g.10gb", "3g.40gb", "7g.80gb"];

fn op() -> impl Strategy<Value = Op> {
    let req = prop_oneof![
        prop::collection::vec(0usize..20, 1..3).prop_map(Req::Exact),
        (1u32..4, prop::option::of(0usize..3))
            .prop_map(|(count, model)| Req::Gpus { count, model }),
        (0usize..3, prop::option::of(0usize..3))
            .prop_map(|(profile, model)| Req::Mig { profile, model }),
    ];
    prop_oneof![
        6 => (0u8..3, 0u8..3, req, prop::option::weighted(0.3, 1u32..6))
            .prop_map(|(user, server, req, quota)| Op::Reserve { user, server, req, quota }),
        3 => (0usize..8).prop_map(Op::Commit),
        1 => (0usize..8).prop_map(Op::Abort),
        2 => (0u8..3, 0u8..3).prop_map(|(user, server)| Op::Release { user, server }),
        1 => Just(Op::Rebuild),
        3 => (0usize..3, any::<bool>(), any::<bool>())
            .prop_map(|(node, mig, lost)| Op::Ingest { node, mig, lost }),
        1 => (0u64..8_000).prop_map(Op::Advance),
        1 => (0u64..30_000).prop_map(Op::Sweep),
    ]
}

/// What the ledger should hold, maintained independently of it.
#[derive(Default)]
struct Model {
    /// uuid → (holder, committed)
    held: BTreeMap<String, (Holder, bool)>,
    /// claim id → (holder, devices, created)
    pending: BTreeMap<u64, (Holder, Vec<String>, u64)>,
    /// Every claim id handed out, to commit or abort (also stale ones).
    ids: Vec<u64>,
}

impl Model {
    fn drop_claim(&mut self, id: u64) {
        if let Some((_, devices, _)) = self.pending.remove(&id) {
            for d in devices {
                self.held.remove(&d);
            }
        }
    }

    fn held_by(&self, user: &str) -> u32 {
        self.held.values().filter(|(h, _)| h.user == user).count() as u32
    }
}

/// The best-fit choice computed from a listing: `(node, model)` and its free devices.
fn reference_gpus(
    list: &[DeviceView],
    count: u32,
    model: Option<&str>,
) -> Option<(String, Vec<String>)> {
    let mut groups: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    for d in list {
        if d.kind == DeviceKind::Gpu && d.available && model.is_none_or(|m| d.model == m) {
            groups
                .entry((d.node.clone(), d.model.clone()))
                .or_default()
                .push(d.uuid.clone());
        }
    }
    groups
        .into_iter()
        .filter(|(_, v)| v.len() as u32 >= count)
        .min_by(|a, b| (a.1.len(), &a.0).cmp(&(b.1.len(), &b.0)))
        .map(|((node, _), v)| (node, v.into_iter().take(count as usize).collect()))
}

fn reference_mig(list: &[DeviceView], profile: &str, model: Option<&str>) -> Option<String> {
    let mut per_node: BTreeMap<(String, String), BTreeMap<u32, Vec<&DeviceView>>> = BTreeMap::new();
    for d in list {
        if d.kind == DeviceKind::Mig
            && d.available
            && d.profile.as_deref() == Some(profile)
            && model.is_none_or(|m| d.model == m)
        {
            per_node
                .entry((d.node.clone(), d.model.clone()))
                .or_default()
                .entry(d.index)
                .or_default()
                .push(d);
        }
    }
    let (_, gpus) = per_node
        .into_iter()
        .min_by_key(|(k, g)| (g.values().map(Vec::len).sum::<usize>(), k.clone()))?;
    let (_, slices) = gpus.into_iter().min_by_key(|(i, s)| (s.len(), *i))?;
    Some(slices[0].uuid.clone())
}

fn check_invariants(inv: &Inventory, ledger: &Ledger, model: &Model, now: u64) {
    let list = listing(inv, ledger, now);
    let holdings = ledger.holdings();
    // The ledger holds exactly what the model says, each device once.
    let got: BTreeMap<String, (Holder, bool)> = holdings
        .iter()
        .map(|(u, h, c)| (u.clone(), (h.clone(), *c)))
        .collect();
    assert_eq!(got.len(), holdings.len(), "a device is held twice");
    assert_eq!(got, model.held, "ledger and model disagree");
    for user in ["u0", "u1", "u2"] {
        assert_eq!(
            ledger.devices_held_by(user),
            model.held_by(user),
            "devices_held_by({user})"
        );
    }
    let mut seen = BTreeSet::new();
    let by_uuid: HashMap<&str, &DeviceView> = list.iter().map(|d| (d.uuid.as_str(), d)).collect();
    for d in &list {
        assert!(seen.insert(d.uuid.clone()), "{} listed twice", d.uuid);
        let held = got.get(&d.uuid).map(|(h, _)| h.clone());
        assert_eq!(d.holder, held, "{}: listed holder", d.uuid);
        if d.available {
            assert!(held.is_none(), "{} is held and reported available", d.uuid);
            assert!(!d.stale && !d.lost && d.mig_enabled != Some(true), "{d:?}");
            if let Some(p) = &d.parent_uuid {
                assert!(
                    !got.contains_key(p),
                    "{} available under a held parent",
                    d.uuid
                );
            }
        }
        // Never a GPU and one of its MIG instances at once.
        if let Some(p) = &d.parent_uuid
            && got.contains_key(&d.uuid)
        {
            assert!(
                !got.contains_key(p),
                "{} and its parent {p} are both held",
                d.uuid
            );
            assert!(by_uuid.contains_key(p.as_str()));
        }
    }
    // The ledger's free counts agree with the device listing.
    let summary = inv.summary(&DeviceQuery::default(), ledger, now);
    let free: u32 = summary.iter().map(|a| a.free).sum();
    let listed_free = list.iter().filter(|d| d.available).count() as u32;
    assert_eq!(free, listed_free, "summary {summary:?}");
    for n in inv.nodes(ledger, now) {
        let listed = list
            .iter()
            .filter(|d| d.node == n.name && d.available)
            .count() as u32;
        assert_eq!(n.devices_free, listed, "node {}", n.name);
    }
}

fn run_ops(ops: Vec<Op>) {
    let inv = Inventory::new(Duration::from_millis(STALE_MS));
    let ledger = Ledger::new();
    let mut now = T0;
    let mut layouts = [Layout {
        mig: false,
        lost: false,
        epoch: 0,
    }; 3];
    let mut seqs = [1u64; 3];
    for (n, layout) in layouts.iter().enumerate() {
        inv.ingest(&format!("n{n}"), build(n, *layout, 1), now)
            .unwrap();
    }
    ledger.rebuild([]);
    let mut model = Model::default();
    for op in ops {
        match op {
            Op::Reserve {
                user,
                server,
                req,
                quota,
            } => {
                let h = holder(&format!("u{user}"), &format!("s{server}"));
                let list = listing(&inv, &ledger, now);
                let (request, expect) = match &req {
                    Req::Exact(ix) => {
                        // 19 stands for a device that does not exist.
                        let uuids: Vec<String> = ix
                            .iter()
                            .map(|&i| {
                                if i == 19 {
                                    "GPU-nowhere".into()
                                } else {
                                    list[i % list.len()].uuid.clone()
                                }
                            })
                            .collect();
                        (DeviceRequest::Exact(uuids), None)
                    }
                    Req::Gpus { count, model: m } => {
                        let m = m.map(|i| MODELS[i]);
                        let expect = reference_gpus(&list, *count, m);
                        (
                            DeviceRequest::Gpus {
                                count: *count,
                                model: m.map(String::from),
                            },
                            Some(expect),
                        )
                    }
                    Req::Mig { profile, model: m } => {
                        let m = m.map(|i| MODELS[i]);
                        let expect = reference_mig(&list, PROFILES[*profile], m)
                            .map(|u| (by_node(&list, &u), vec![u]));
                        (
                            DeviceRequest::Mig {
                                profile: PROFILES[*profile].into(),
                                model: m.map(String::from),
                            },
                            Some(expect),
                        )
                    }
                };
                let result = ledger.claim(h.clone(), &request, &inv, quota, now);
                let holds_already = model.held.values().any(|(x, _)| *x == h);
                let wanted = match &request {
                    DeviceRequest::Exact(u) => {
                        let mut d = u.clone();
                        d.sort();
                        d.dedup();
                        (d.len() == u.len()).then_some(u.len() as u32)
                    }
                    DeviceRequest::Gpus { count, .. } => Some(*count),
                    DeviceRequest::Mig { .. } => Some(1),
                };
                match result {
                    Ok(r) => {
                        assert!(!holds_already, "a holder got a second set of devices");
                        if let Some(q) = quota {
                            assert!(
                                model.held_by(&h.user) + r.devices.len() as u32 <= q,
                                "quota"
                            );
                        }
                        for d in &r.devices {
                            let v = list
                                .iter()
                                .find(|v| &v.uuid == d)
                                .expect("granted an unlisted device");
                            assert!(v.available, "granted {d} which was not available: {v:?}");
                            assert_eq!(v.node, r.node);
                            assert!(
                                model.held.insert(d.clone(), (h.clone(), false)).is_none(),
                                "{d} granted twice"
                            );
                        }
                        if let Some(expect) = expect {
                            assert_eq!(
                                Some((r.node.clone(), r.devices.clone())),
                                expect,
                                "best fit for {request:?}"
                            );
                        }
                        model.pending.insert(r.id, (h, r.devices, now));
                        model.ids.push(r.id);
                    }
                    Err(Error::Conflict(msg)) if msg.starts_with("no fresh node") => {
                        if let Some(expect) = expect {
                            assert_eq!(expect, None, "{request:?} refused: {msg}");
                        }
                    }
                    Err(Error::Conflict(msg)) if msg.contains("already holds") => {
                        assert!(holds_already)
                    }
                    Err(Error::QuotaExceeded(_)) => {
                        let q = quota.expect("quota error without a quota");
                        assert!(model.held_by(&h.user) + wanted.unwrap() > q);
                    }
                    Err(Error::BadRequest(_) | Error::Conflict(_) | Error::NotFound(_)) => {
                        assert!(expect.is_none(), "{request:?}");
                    }
                    Err(e) => panic!("unexpected {e:?}"),
                }
            }
            Op::Commit(i) => {
                if let Some(&id) = model.ids.get(i % model.ids.len().max(1)) {
                    let pending = model.pending.remove(&id);
                    match (ledger.commit(id), pending) {
                        (Ok(()), Some((_, devices, _))) => {
                            for d in devices {
                                model.held.get_mut(&d).expect("committed a free device").1 = true;
                            }
                        }
                        (Err(Error::NotFound(_)), None) => {}
                        (got, want) => panic!("commit {id}: {got:?}, model {want:?}"),
                    }
                }
            }
            Op::Abort(i) => {
                if let Some(&id) = model.ids.get(i % model.ids.len().max(1)) {
                    ledger.abort(id);
                    model.drop_claim(id);
                }
            }
            Op::Release { user, server } => {
                let h = holder(&format!("u{user}"), &format!("s{server}"));
                let mut freed = ledger.release(&h);
                freed.sort();
                let expected: Vec<String> = model
                    .held
                    .iter()
                    .filter(|(_, (x, _))| *x == h)
                    .map(|(u, _)| u.clone())
                    .collect();
                assert_eq!(freed, expected);
                for u in &expected {
                    model.held.remove(u);
                }
                model.pending.retain(|_, (x, _, _)| *x != h);
            }
            Op::Rebuild => {
                model.held.retain(|_, (_, committed)| *committed);
                model.pending.clear();
                ledger.rebuild(model.held.iter().map(|(u, (h, _))| (u.clone(), h.clone())));
            }
            Op::Ingest { node: n, mig, lost } => {
                let l = &mut layouts[n];
                if mig && !l.mig {
                    l.epoch += 1;
                }
                l.mig = mig;
                l.lost = lost;
                seqs[n] += 1;
                let r = inv
                    .ingest(&format!("n{n}"), build(n, *l, seqs[n]), now)
                    .unwrap();
                assert_eq!(r, Ingested::Stored);
            }
            Op::Advance(ms) => now += ms,
            Op::Sweep(ttl) => {
                let expected: Vec<u64> = model
                    .pending
                    .iter()
                    .filter(|(_, (_, _, created))| now - created > ttl)
                    .map(|(id, _)| *id)
                    .collect();
                assert_eq!(ledger.sweep(now, Duration::from_millis(ttl)), expected);
                for id in expected {
                    model.drop_claim(id);
                }
            }
        }
        check_invariants(&inv, &ledger, &model, now);
    }
}

fn by_node(list: &[DeviceView], uuid: &str) -> String {
    list.iter()
        .find(|d| d.uuid == uuid)
        .map(|d| d.node.clone())
        .unwrap_or_default()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn no_sequence_of_operations_breaks_exclusivity(ops in prop::collection::vec(op(), 1..80)) {
        run_ops(ops);
    }
}

// ---- concurrent stress -----------------------------------------------------------------

/// 16 nodes × 8 A100s and 4 nodes × 4 MIG GPUs × 7 × 1g.10gb.
fn stress_nodes(seq: u64) -> Vec<NodeInventory> {
    let mut out = Vec::new();
    for n in 0..16 {
        let name = format!("w{n:02}");
        let gpus = (0..8)
            .map(|i| gpu(i, &format!("GPU-{name}-{i}"), A100))
            .collect();
        out.push(node(&name, seq, gpus));
    }
    for n in 0..4 {
        let name = format!("m{n}");
        let gpus = (0..4)
            .map(|i| {
                let slices: Vec<(String, &str)> = (0..7)
                    .map(|s| (format!("MIG-{name}-{i}-{s}"), "1g.10gb"))
                    .collect();
                with_mig(gpu(i, &format!("GPU-{name}-{i}"), A100), &slices)
            })
            .collect();
        out.push(node(&name, seq, gpus));
    }
    out
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[test]
fn concurrent_reservations_never_share_a_device() {
    const THREADS: u64 = 8;
    const ROUNDS: u64 = 3000;
    let inv = Arc::new(Inventory::new(Duration::from_secs(3600)));
    let now = now_ms();
    for n in stress_nodes(1) {
        let name = n.node.clone();
        inv.ingest(&name, n, now).unwrap();
    }
    let ledger = Arc::new(Ledger::new());
    ledger.rebuild([]);
    let all: Vec<String> = listing(&inv, &ledger, now)
        .into_iter()
        .filter(|d| d.mig_enabled != Some(true))
        .map(|d| d.uuid)
        .collect();
    // Who holds each device according to the threads: 0 = nobody.
    let owner: Arc<HashMap<String, AtomicU64>> =
        Arc::new(all.iter().map(|u| (u.clone(), AtomicU64::new(0))).collect());
    // A small hot set every thread fights over, across two nodes.
    let hot: Arc<Vec<String>> = Arc::new(
        [
            "GPU-w00-0",
            "GPU-w00-1",
            "GPU-w00-2",
            "GPU-w00-3",
            "MIG-m0-0-0",
            "MIG-m0-0-1",
            "MIG-m0-0-2",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect(),
    );
    let doubles = Arc::new(AtomicUsize::new(0));
    let granted = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));

    // Heartbeats and readers run alongside, taking the locks in their own order.
    let background = {
        let (inv, ledger, stop) = (inv.clone(), ledger.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut seq = 2;
            while !stop.load(Ordering::Relaxed) {
                for n in stress_nodes(seq) {
                    let name = n.node.clone();
                    inv.ingest(&name, n, now_ms()).unwrap();
                }
                seq += 1;
                let q = DeviceQuery {
                    available: Some(true),
                    limit: 50,
                    ..DeviceQuery::default()
                };
                let page = inv.devices(&q, &ledger, now_ms()).unwrap();
                assert!(page.items.iter().all(|d| d.holder.is_none()));
                inv.summary(&DeviceQuery::default(), &ledger, now_ms());
            }
        })
    };

    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let workers: Vec<_> = (0..THREADS)
        .map(|t| {
            let (inv, ledger, owner, hot, doubles, granted, failures) = (
                inv.clone(),
                ledger.clone(),
                owner.clone(),
                hot.clone(),
                doubles.clone(),
                granted.clone(),
                failures.clone(),
            );
            std::thread::spawn(move || {
                let mut rng =
                    Rng(0x9E37_79B9_7F4A_7C15 ^ (t + 1).wrapping_mul(0x2545_F491_4F6C_DD1D));
                let mut kept: Vec<(Holder, Vec<String>, u64)> = Vec::new();
                for round in 0..ROUNDS {
                    let token = (t << 32) | (round + 1);
                    let h = holder(&format!("t{t}"), &format!("r{round}"));
                    let req = match rng.below(4) {
                        0 | 1 => {
                            let a = rng.below(hot.len() as u64) as usize;
                            let b = rng.below(hot.len() as u64) as usize;
                            let mut v = vec![hot[a].clone()];
                            if a != b && rng.below(2) == 0 {
                                v.push(hot[b].clone());
                            }
                            DeviceRequest::Exact(v)
                        }
                        2 => DeviceRequest::Gpus {
                            count: 1 + rng.below(4) as u32,
                            model: Some(A100.into()),
                        },
                        _ => DeviceRequest::Mig {
                            profile: "1g.10gb".into(),
                            model: None,
                        },
                    };
                    let now = now_ms();
                    let Ok(r) = ledger.claim(h.clone(), &req, &inv, None, now) else {
                        continue;
                    };
                    granted.fetch_add(1, Ordering::Relaxed);
                    for d in &r.devices {
                        if owner[d]
                            .compare_exchange(0, token, Ordering::SeqCst, Ordering::SeqCst)
                            .is_err()
                        {
                            doubles.fetch_add(1, Ordering::SeqCst);
                            failures
                                .lock()
                                .unwrap()
                                .push(format!("{d} granted to {h:?} while held"));
                        }
                        if ledger.holder(d).as_ref() != Some(&h) {
                            failures
                                .lock()
                                .unwrap()
                                .push(format!("{d} not held by {h:?}"));
                        }
                    }
                    match rng.below(3) {
                        0 => {
                            clear(&owner, &r.devices, token);
                            ledger.abort(r.id);
                        }
                        1 => {
                            ledger.commit(r.id).unwrap();
                            clear(&owner, &r.devices, token);
                            let mut freed = ledger.release(&h);
                            freed.sort();
                            let mut want = r.devices.clone();
                            want.sort();
                            assert_eq!(freed, want);
                        }
                        _ => {
                            ledger.commit(r.id).unwrap();
                            kept.push((h, r.devices, token));
                        }
                    }
                    if kept.len() > 3 {
                        let (h, devices, token) =
                            kept.remove(rng.below(kept.len() as u64) as usize);
                        clear(&owner, &devices, token);
                        ledger.release(&h);
                    }
                }
                for (h, devices, token) in kept {
                    clear(&owner, &devices, token);
                    ledger.release(&h);
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    background.join().unwrap();

    let failures = failures.lock().unwrap();
    assert!(
        failures.is_empty(),
        "{} failures, e.g. {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert_eq!(doubles.load(Ordering::SeqCst), 0);
    assert!(
        granted.load(Ordering::Relaxed) > 1000,
        "too few grants to mean anything"
    );
    assert!(ledger.holdings().is_empty());
    let now = now_ms();
    let free = listing(&inv, &ledger, now)
        .iter()
        .filter(|d| d.available)
        .count();
    assert_eq!(free, all.len());
}

/// Gives devices back in the threads' own table before the ledger frees them.
fn clear(owner: &HashMap<String, AtomicU64>, devices: &[String], token: u64) {
    for d in devices {
        let prev = owner[d].swap(0, Ordering::SeqCst);
        assert_eq!(prev, token, "{d} was taken over while held");
    }
}

// ---- timings ---------------------------------------------------------------------------

/// 10,000 nodes, 80,000 listed devices: 9,000 nodes of 8 whole GPUs, 1,000 nodes with a
/// MIG GPU (7 × 1g.10gb) listed as 8 devices.
fn big_cluster(seq: u64) -> Vec<NodeInventory> {
    (0..10_000u32)
        .map(|n| {
            let name = format!("node-{n:05}.gpu.example.com");
            let gpus = if n % 10 == 9 {
                let slices: Vec<(String, &str)> = (0..7)
                    .map(|s| {
                        (
                            format!("MIG-{n:05}-{s}-aaaa-bbbb-cccc-dddddddddddd"),
                            "1g.10gb",
                        )
                    })
                    .collect();
                vec![with_mig(
                    gpu(
                        0,
                        &format!("GPU-{n:05}-0-aaaa-bbbb-cccc-dddddddddddd"),
                        A100,
                    ),
                    &slices,
                )]
            } else {
                let model = if n % 2 == 0 { A100 } else { H100 };
                (0..8)
                    .map(|i| {
                        gpu(
                            i,
                            &format!("GPU-{n:05}-{i}-aaaa-bbbb-cccc-dddddddddddd"),
                            model,
                        )
                    })
                    .collect()
            };
            node(&name, seq, gpus)
        })
        .collect()
}

fn per_op(label: &str, n: usize, f: impl FnOnce()) {
    let start = Instant::now();
    f();
    let el = start.elapsed();
    println!(
        "{label:<48} {:>10.2} µs/op  ({n} ops, {:.1} ms)",
        el.as_secs_f64() * 1e6 / n as f64,
        el.as_secs_f64() * 1e3
    );
}

#[test]
#[ignore = "timing; run in release: cargo test --release -p kcloud-aggregator --test ledger -- --ignored --nocapture"]
fn timings_at_80k_devices() {
    let inv = Inventory::new(Duration::from_secs(3600));
    let ledger = Ledger::new();
    ledger.rebuild([]);
    let now = now_ms();
    let first = big_cluster(1);
    let names: Vec<String> = first.iter().map(|n| n.node.clone()).collect();
    per_op("ingest, new node (layout indexed)", first.len(), || {
        for n in first {
            let name = n.node.clone();
            inv.ingest(&name, n, now).unwrap();
        }
    });
    let beats = big_cluster(2);
    per_op("ingest, heartbeat (same layout)", beats.len(), || {
        for n in beats {
            let name = n.node.clone();
            inv.ingest(&name, n, now).unwrap();
        }
    });
    let mut changed = big_cluster(3);
    for n in &mut changed {
        if let Some(g) = n.gpus.get_mut(1) {
            g.lost = true;
        }
    }
    per_op("ingest, layout changed", changed.len(), || {
        for n in changed {
            let name = n.node.clone();
            inv.ingest(&name, n, now).unwrap();
        }
    });
    let back = big_cluster(4);
    for n in back {
        let name = n.node.clone();
        inv.ingest(&name, n, now).unwrap();
    }
    per_op("first ledger sync after layout changes", 1, || {
        inv.summary(&DeviceQuery::default(), &ledger, now);
    });
    // Hold a third of the A100 nodes' devices so that `available` filters something.
    for (i, name) in names
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 10 < 9 && i % 3 == 0)
    {
        let req = DeviceRequest::Exact(
            (0..8)
                .map(|g| format!("GPU-{i:05}-{g}-aaaa-bbbb-cccc-dddddddddddd"))
                .collect(),
        );
        let r = ledger
            .claim(holder("filler", name), &req, &inv, None, now)
            .unwrap();
        ledger.commit(r.id).unwrap();
    }
    let q = DeviceQuery {
        available: Some(true),
        limit: 500,
        ..DeviceQuery::default()
    };
    let rounds = 200;
    per_op("page of 500, available=true (first page)", rounds, || {
        for _ in 0..rounds {
            assert_eq!(inv.devices(&q, &ledger, now).unwrap().items.len(), 500);
        }
    });
    let mid = DeviceQuery {
        cursor: inv
            .devices(
                &DeviceQuery {
                    limit: 1000,
                    ..q.clone()
                },
                &ledger,
                now,
            )
            .unwrap()
            .next_cursor,
        ..q.clone()
    };
    let mut mid_deep = mid.clone();
    for _ in 0..60 {
        mid_deep.cursor = inv.devices(&mid_deep, &ledger, now).unwrap().next_cursor;
    }
    per_op("page of 500, available=true (deep cursor)", rounds, || {
        for _ in 0..rounds {
            assert_eq!(
                inv.devices(&mid_deep, &ledger, now).unwrap().items.len(),
                500
            );
        }
    });
    let mut pages = 0;
    let mut total = 0;
    per_op("walk every page of 500, available=true", 1, || {
        let mut q = q.clone();
        loop {
            let page = inv.devices(&q, &ledger, now).unwrap();
            pages += 1;
            total += page.items.len();
            match page.next_cursor {
                Some(c) => q.cursor = Some(c),
                None => break,
            }
        }
    });
    println!("  ({pages} pages, {total} devices)");
    let sparse = DeviceQuery {
        available: Some(true),
        profile: Some("1g.10gb".into()),
        limit: 500,
        ..DeviceQuery::default()
    };
    per_op(
        "page of 500, available=true, profile=1g.10gb",
        rounds,
        || {
            for _ in 0..rounds {
                inv.devices(&sparse, &ledger, now).unwrap();
            }
        },
    );
    per_op("summary", rounds, || {
        for _ in 0..rounds {
            inv.summary(&DeviceQuery::default(), &ledger, now);
        }
    });
    per_op("nodes (10,000 views)", 10, || {
        for _ in 0..10 {
            assert_eq!(inv.nodes(&ledger, now).len(), 10_000);
        }
    });
    per_op("counts", rounds, || {
        for _ in 0..rounds {
            inv.counts(now);
        }
    });

    // Exact claim + commit, then release outside the timing.
    let free_gpus: Vec<(String, String)> = (0..10_000usize)
        .filter(|i| i % 10 < 9 && i % 3 != 0)
        .flat_map(|i| (0..8).map(move |g| (i, g)))
        .map(|(i, g)| {
            (
                names[i].clone(),
                format!("GPU-{i:05}-{g}-aaaa-bbbb-cccc-dddddddddddd"),
            )
        })
        .take(20_000)
        .collect();
    let mut held = Vec::with_capacity(free_gpus.len());
    per_op("claim+commit, exact UUID", free_gpus.len(), || {
        for (k, (_, uuid)) in free_gpus.iter().enumerate() {
            let h = holder("bench", &format!("e{k}"));
            let r = ledger
                .claim(
                    h.clone(),
                    &DeviceRequest::Exact(vec![uuid.clone()]),
                    &inv,
                    None,
                    now,
                )
                .unwrap();
            ledger.commit(r.id).unwrap();
            held.push(h);
        }
    });
    per_op("release", held.len(), || {
        for h in held.drain(..) {
            ledger.release(&h);
        }
    });
    let n = 20_000;
    per_op("claim+commit, Gpus{count: 1, model}", n, || {
        for k in 0..n {
            let h = holder("bench", &format!("g{k}"));
            let req = DeviceRequest::Gpus {
                count: 1,
                model: Some(H100.into()),
            };
            let r = ledger.claim(h.clone(), &req, &inv, None, now).unwrap();
            ledger.commit(r.id).unwrap();
            held.push(h);
        }
    });
    for h in held.drain(..) {
        ledger.release(&h);
    }
    per_op("claim+commit, Gpus{count: 8}", 2_000, || {
        for k in 0..2_000 {
            let h = holder("bench", &format!("g8-{k}"));
            let req = DeviceRequest::Gpus {
                count: 8,
                model: None,
            };
            let r = ledger.claim(h.clone(), &req, &inv, None, now).unwrap();
            ledger.commit(r.id).unwrap();
            held.push(h);
        }
    });
    for h in held.drain(..) {
        ledger.release(&h);
    }
    per_op("claim+commit, Mig{1g.10gb}", 5_000, || {
        for k in 0..5_000 {
            let h = holder("bench", &format!("m{k}"));
            let req = DeviceRequest::Mig {
                profile: "1g.10gb".into(),
                model: None,
            };
            let r = ledger.claim(h.clone(), &req, &inv, None, now).unwrap();
            ledger.commit(r.id).unwrap();
            held.push(h);
        }
    });
    per_op("release + next claim (dirty node refresh)", 5_000, || {
        for (k, h) in held.drain(..).enumerate() {
            ledger.release(&h);
            let h = holder("bench", &format!("m2-{k}"));
            let req = DeviceRequest::Mig {
                profile: "1g.10gb".into(),
                model: None,
            };
            let r = ledger.claim(h, &req, &inv, None, now).unwrap();
            ledger.commit(r.id).unwrap();
        }
    });
}
