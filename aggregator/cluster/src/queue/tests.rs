//! The ledger with time, against a model (property test): random reservations,
//! waiting requests, releases and the clock moving, with a queue round after every
//! step. Checked after each:
//!
//! - no device is held by two servers, and none is given to a user other than the
//!   owner of a reservation whose window holds it then;
//! - reservations never overlap on a device (the calendar accepts a window exactly
//!   when the model finds no overlap);
//! - the round keeps the documented order: a request starts ahead of a waiting one of
//!   its kind only when it is smaller and takes none of the devices promised to
//!   waiting requests; the first waiting request starts whenever some node has
//!   enough devices free for it, and otherwise has that node's free devices
//!   promised to it (the node drains for it).

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use kcloud_common::fixtures::{T0, plain_node};
use kcloud_core::device::{DeviceRequest, Holder};
use kcloud_core::reservation::Reservation;
use proptest::prelude::*;

use super::{Outcome, Waiting};
use crate::Cluster;

const A100: &str = "NVIDIA A100-SXM4-80GB";
const NODES: usize = 2;
const GPUS: usize = 4;
const USERS: [&str; 3] = ["u0", "u1", "u2"];
const MIN: u64 = 60_000;

#[derive(Clone, Debug)]
enum Op {
    /// `user` books `n` devices of node `node` from the first `first`, at `start`
    /// minutes from now for `len` minutes.
    Book {
        user: usize,
        node: usize,
        first: usize,
        n: usize,
        start: u64,
        len: u64,
    },
    /// `user` asks for `count` GPUs and waits.
    Wait { user: usize, count: u32 },
    /// The `k`-th running server (mod their number) ends.
    Free { k: usize },
    /// Minutes pass.
    Tick { minutes: u64 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        1 => (0..USERS.len(), 0..NODES, 0..GPUS, 1..=2usize, 0..30u64, 15..60u64).prop_map(
            |(user, node, first, n, start, len)| Op::Book {
                user,
                node,
                first,
                n,
                start,
                len
            }
        ),
        3 => (0..USERS.len(), 1..=3u32).prop_map(|(user, count)| Op::Wait { user, count }),
        2 => (0..16usize).prop_map(|k| Op::Free { k }),
        1 => (1..20u64).prop_map(|minutes| Op::Tick { minutes }),
    ]
}

fn uuid(node: usize, i: usize) -> String {
    format!("GPU-n{node}-{i}")
}

struct Model {
    /// Per device: booked windows (start, end, owner).
    windows: HashMap<String, Vec<(u64, u64, String)>>,
    /// Held devices and by whom.
    held: BTreeMap<String, Holder>,
    running: Vec<Holder>,
    /// Waiting requests in arrival order (the order of this test's queue).
    waiting: Vec<(Holder, u32)>,
    next: usize,
}

impl Model {
    fn reserved_for_other(&self, uuid: &str, user: &str, t: u64) -> bool {
        self.windows
            .get(uuid)
            .is_some_and(|w| w.iter().any(|(s, e, o)| *s <= t && t < *e && o != user))
    }

    /// Free devices per node for `user` at `t`.
    fn free_for(&self, user: &str, t: u64) -> Vec<usize> {
        (0..NODES)
            .map(|n| {
                (0..GPUS)
                    .filter(|i| {
                        let u = uuid(n, *i);
                        !self.held.contains_key(&u) && !self.reserved_for_other(&u, user, t)
                    })
                    .count()
            })
            .collect()
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn rounds_keep_devices_exclusive_windows_apart_and_the_order(ops in prop::collection::vec(op(), 1..60)) {
        let cluster = Cluster::new(Duration::from_secs(365 * 86_400));
        for n in 0..NODES {
            let name = format!("n{n}");
            cluster.ingest(&name, plain_node(&name, GPUS as u32, A100), T0).unwrap();
        }
        cluster.ledger().rebuild([]);
        let mut now = T0;
        let mut m = Model { windows: HashMap::new(), held: BTreeMap::new(), running: Vec::new(), waiting: Vec::new(), next: 0 };
        for (step, op) in ops.into_iter().enumerate() {
            match op {
                Op::Book { user, node, first, n, start, len } => {
                    let devices: Vec<String> = (first..(first + n).min(GPUS)).map(|i| uuid(node, i)).collect();
                    let (s, e) = (now + start * MIN, now + (start + len) * MIN);
                    let overlaps = devices.iter().any(|d| {
                        m.windows.get(d).is_some_and(|w| w.iter().any(|(ws, we, _)| *ws < e && s < *we))
                    });
                    let r = Reservation {
                        id: format!("r-{step:016x}"),
                        owner: USERS[user].into(),
                        node: format!("n{node}"),
                        devices: devices.clone(),
                        start_ms: s,
                        end_ms: e,
                        note: String::new(),
                        maintenance: false,
                        created_at_ms: now,
                        created_by: USERS[user].into(),
                        used: false,
                    };
                    let accepted = cluster.calendar().insert(r).is_ok();
                    prop_assert_eq!(accepted, !overlaps, "step {}: calendar vs model", step);
                    if accepted {
                        for d in devices {
                            m.windows.entry(d).or_default().push((s, e, USERS[user].into()));
                        }
                    }
                }
                Op::Wait { user, count } => {
                    m.next += 1;
                    m.waiting.push((Holder::new(USERS[user], &format!("s{}", m.next)), count));
                }
                Op::Free { k } => {
                    if !m.running.is_empty() {
                        let h = m.running.remove(k % m.running.len());
                        let freed = cluster.ledger().release(&h);
                        let mine: Vec<String> = m.held.iter().filter(|(_, x)| **x == h).map(|(d, _)| d.clone()).collect();
                        let mut freed_sorted = freed.clone();
                        freed_sorted.sort();
                        prop_assert_eq!(freed_sorted, mine.clone());
                        for d in mine {
                            m.held.remove(&d);
                        }
                    }
                }
                Op::Tick { minutes } => now += minutes * MIN,
            }
            // A queue round, as the service runs one after every change.
            let waiting: Vec<Waiting> = m.waiting.iter().map(|(h, c)| Waiting {
                holder: h.clone(),
                request: DeviceRequest::Gpus { count: *c, model: None },
                max_devices: None,
            }).collect();
            let first_free = m.waiting.first().map(|(h, _)| m.free_for(&h.user, now));
            let round = cluster.decide(&waiting, now, &Default::default(), usize::MAX);
            prop_assert_eq!(round.outcomes.len(), waiting.len());
            let mut still = Vec::new();
            let mut blocked: Vec<u32> = Vec::new();
            for (i, (o, (h, count))) in round.outcomes.iter().zip(m.waiting.iter()).enumerate() {
                match o {
                    Outcome::Start(c) => {
                        prop_assert!(blocked.iter().all(|b| count < b),
                            "step {}: {:?} ({} GPUs) started behind a waiting request of {:?}", step, h, count, blocked);
                        prop_assert_eq!(c.devices.len(), *count as usize);
                        for d in &c.devices {
                            prop_assert!(!m.held.contains_key(d), "step {}: {} held twice", step, d);
                            prop_assert!(!m.reserved_for_other(d, &h.user, now),
                                "step {}: {} given to {} inside another user's window", step, d, h.user);
                            prop_assert!(!round.promised.contains(d), "step {}: {} was promised", step, d);
                            m.held.insert(d.clone(), h.clone());
                        }
                        cluster.ledger().commit(c.id).unwrap();
                        m.running.push(h.clone());
                    }
                    Outcome::Wait { .. } => {
                        if i == 0 && let Some(free) = &first_free {
                            prop_assert!(free.iter().all(|f| *f < *count as usize),
                                "step {}: the first request ({} GPUs) waits although nodes have {:?} free", step, count, free);
                        }
                        blocked.push(*count);
                        still.push((h.clone(), *count));
                    }
                    Outcome::Drop(e) => prop_assert!(false, "step {}: dropped: {}", step, e),
                }
            }
            m.waiting = still;
            // The first waiting request drains the node where it is closest to
            // fitting: that node's free devices are promised to it.
            if let Some((h, _)) = m.waiting.first() {
                let most = m.free_for(&h.user, now).into_iter().max().unwrap_or(0);
                prop_assert!(round.promised.len() >= most,
                    "step {}: {} devices promised, {} free on the drained node", step, round.promised.len(), most);
            }
            // The calendar's windows never overlap on a device.
            for (d, w) in &m.windows {
                let mut w = w.clone();
                w.sort();
                prop_assert!(w.windows(2).all(|p| p[0].1 <= p[1].0), "overlap on {}", d);
            }
        }
    }
}
