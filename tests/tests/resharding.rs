//! Points move to their next owner when a primary is drained or joins (docs/resharding.md),
//! while a writer keeps appending with `expected_offset` and following redirects: every point
//! ends on its owner in the new ring, byte for byte, nothing acknowledged lost, nothing written
//! twice. A drained member ends `left`, redirects writes and still serves reads; a joining one
//! ends `active`.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use goutube::client::{Client, ClientOptions};
use goutube::config::{Config, Role};
use goutube::point::{Handover, Ownership, PointId};
use goutube::proto::ProduceRequest;
use goutube::proto::{END_METADATA, OWNER_METADATA};
use goutube_tests::{
    DEADLINE, TestNode, consume, counter, data, eventually, eventually_within, members, metadata,
    owner, produce, ring_epoch, sees, start_in, window,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::Code;

/// The points of a scenario.
const POINTS: u64 = 300;

/// The cases of this file, one at a time: each runs four nodes and a writer, and two at once on
/// two cores starve the nodes' plugins past their time limits.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Primaries in one ring, each seeing the others, and a writer at work on some of their points.
struct Scenario {
    /// `reshard.max_bytes_per_sec` of every node.
    throttle: u64,
    nodes: BTreeMap<String, TestNode>,
    /// Where each node serves clients, known to the writer as nodes are added.
    addresses: Addresses,
    /// Every point, with the bytes acknowledged so far.
    expected: Arc<Mutex<BTreeMap<String, Vec<u8>>>>,
    /// The owner of every point before the change.
    owners: BTreeMap<String, String>,
    /// The points the writer appends to.
    written: Vec<String>,
    stop: CancellationToken,
    /// Rounds made, and the node each written point was last written on.
    writer: Option<JoinHandle<(u64, HashMap<String, String>)>>,
    /// The controller's ring epoch once the ring was settled, before any change.
    ring_epoch: u64,
}

impl Scenario {
    /// The primaries `names` (the first seeds the others) holding 300 points of random
    /// non-periodic sizes; a writer appends to every 25th of them until
    /// [`Scenario::stop_writing`].
    async fn start(names: &[&'static str]) -> Scenario {
        Scenario::throttled(names, 0).await
    }

    /// [`Scenario::start`] with `reshard.max_bytes_per_sec = throttle` on every node.
    async fn throttled(names: &[&'static str], throttle: u64) -> Scenario {
        let mut scenario = Scenario {
            throttle,
            nodes: BTreeMap::new(),
            addresses: Addresses::default(),
            expected: Arc::default(),
            owners: BTreeMap::new(),
            written: Vec::new(),
            stop: CancellationToken::new(),
            writer: None,
            ring_epoch: 0,
        };
        for name in names {
            scenario.add(name, names.len()).await;
        }
        scenario.converge(names.len()).await;
        scenario.ring_epoch = ring_epoch(scenario.nodes["a"].client().await).await;
        let addresses = scenario.addresses.clone();
        let mut rng = StdRng::seed_from_u64(10);
        for i in 0..POINTS {
            let point = format!("videos/{i}");
            let bytes = data(i, rng.random_range(1..100_000));
            let at = owner(&scenario.nodes["a"], &point).await;
            append(&addresses, at.clone(), &point, 0, &bytes).await;
            scenario.owners.insert(point.clone(), at);
            scenario.expected.lock().unwrap().insert(point, bytes);
        }
        let written: Vec<String> = scenario.owners.keys().step_by(25).cloned().collect();
        scenario.written = written.clone();
        let mut at: HashMap<String, String> = written
            .iter()
            .map(|point| (point.clone(), scenario.owners[point].clone()))
            .collect();
        let (expected, stop) = (scenario.expected.clone(), scenario.stop.clone());
        // Behind a throttle, the written points must grow slower than it sends, or their moves
        // never catch up (and are reported as stalled, as they should be).
        let pause = if throttle > 0 {
            Duration::from_millis(200)
        } else {
            Duration::ZERO
        };
        scenario.writer = Some(tokio::spawn(async move {
            let mut round = 0u64;
            while !stop.is_cancelled() {
                for point in &written {
                    let offset = expected.lock().unwrap()[point].len() as u64;
                    let bytes = data(1000 + round, 3000 + (round as usize * 7919) % 5000);
                    // A node that joined meanwhile is reached through the redirects.
                    let took = append(&addresses, at[point].clone(), point, offset, &bytes).await;
                    let mut expected = expected.lock().unwrap();
                    expected.get_mut(point).unwrap().extend(&bytes);
                    at.insert(point.clone(), took);
                }
                round += 1;
                tokio::time::sleep(pause).await;
            }
            (round, at)
        }));
        scenario
    }

    /// Starts primary `name`, seeded by `a` (if it runs).
    async fn add(&mut self, name: &'static str, expect: usize) {
        self.add_as(name, expect, Role::Standalone).await;
    }

    /// Starts primary `name` in `role`, seeded by `a` (if it runs).
    async fn add_as(&mut self, name: &'static str, expect: usize, role: Role) {
        let node = TestNode::start(self.configure(name, expect, role)).await;
        self.place(name, node);
    }

    /// Holds `node` as `name`, and tells the writer where it serves.
    fn place(&mut self, name: &str, node: TestNode) {
        self.addresses
            .lock()
            .unwrap()
            .insert(name.to_owned(), node.addr());
        self.nodes.insert(name.to_owned(), node);
    }

    /// Stops primary `name`, waits until the others name a controller leader other than it,
    /// and starts it again on its data (new ports: the writer is told).
    async fn restart(&mut self, name: &'static str, expect: usize) {
        let TestNode { node, dir } = self.nodes.remove(name).unwrap();
        node.shutdown().await.unwrap();
        let other = self.nodes.values().next().unwrap();
        eventually("another controller leader", || async {
            members(other)
                .await
                .controller
                .is_some_and(|c| !c.leader.is_empty() && c.leader != name)
        })
        .await;
        let configure = self.configure(name, expect, Role::Standalone);
        let node = TestNode {
            node: start_in(dir.path(), configure).await,
            dir,
        };
        self.place(name, node);
    }

    /// The configuration of primary `name` in `role`, seeded by `a` if it runs (`a` itself,
    /// restarted on new ports, by another node).
    fn configure(
        &self,
        name: &'static str,
        expect: usize,
        role: Role,
    ) -> impl FnOnce(&mut Config) + use<> {
        let seed = self
            .nodes
            .iter()
            .filter(|(other, _)| other.as_str() != name)
            .min_by_key(|(other, _)| other.as_str() != "a")
            .map(|(_, node)| node.node.gossip_addr().to_string());
        let throttle = self.throttle;
        move |c| {
            c.reshard.max_bytes_per_sec = throttle;
            c.node_name = name.into();
            c.role = role;
            c.seed_addresses = seed.into_iter().collect();
            c.cluster.bootstrap_expect = expect;
            // Moves of these small points fence at once: writes meet the fence.
            c.reshard.fence_lag_bytes = 64 * 1024;
        }
    }

    /// Waits until every node sees `owners` owners in the ring and every node live.
    async fn converge(&self, owners: usize) {
        for node in self.nodes.values() {
            eventually("every node to see the ring's owners", || async {
                let view = members(node).await;
                sees(node, self.nodes.len()).await
                    && view.members.iter().filter(|m| m.owns_range).count() == owners
            })
            .await;
        }
    }

    /// `name`'s state in the ring, as `a` sees it.
    async fn state(&self, name: &str) -> String {
        members(&self.nodes["a"])
            .await
            .members
            .iter()
            .find(|m| m.name == name)
            .map(|m| m.state.clone())
            .unwrap_or_default()
    }

    /// Lets the writer go on for a moment, stops it, and checks it made progress and that each
    /// written point whose owner changed was followed to its new owner.
    async fn stop_writing(&mut self) {
        tokio::time::sleep(Duration::from_millis(300)).await;
        self.stop.cancel();
        let (rounds, at) = self.writer.take().unwrap().await.unwrap();
        assert!(rounds > 3, "the writer made only {rounds} rounds");
        for (point, node) in &at {
            assert_eq!(
                *node,
                owner(&self.nodes["a"], point).await,
                "the writer of {point} was not followed to its owner"
            );
        }
    }

    /// Every point is on its owner in the ring, byte for byte, with its CRC; a point whose
    /// owner changed is at the epoch of a controller decision made since the start (not the
    /// point's old epoch plus one), a point that stayed at its first. Returns the points that
    /// moved.
    async fn check_every_point(&self) -> Vec<String> {
        let expected = self.expected.lock().unwrap().clone();
        let mut moved = Vec::new();
        for (point, bytes) in &expected {
            let now = owner(&self.nodes["a"], point).await;
            let mut client = self.nodes[&now].client().await;
            let meta = metadata(&mut client, point).await.unwrap();
            assert_eq!(meta.size, bytes.len() as u64, "{point} on {now}");
            assert_eq!(meta.crc32c, crc32c::crc32c(bytes), "{point} on {now}");
            let held = consume(&mut client, window(point, 0, 0, 0)).await.unwrap();
            assert!(held.concat() == *bytes, "{point} on {now} differs");
            let changed = self.owners[point] != now;
            if changed {
                assert!(
                    meta.epoch > self.ring_epoch,
                    "{point} on {now}: moved at epoch {}, not above the controller's {} before \
                     the change",
                    meta.epoch,
                    self.ring_epoch
                );
            } else {
                assert_eq!(meta.epoch, 1, "{point} on {now}");
            }
            assert_eq!(meta.owner, now, "{point}");
            if changed {
                moved.push(point.clone());
            }
        }
        moved
    }

    async fn shutdown(self) {
        for node in self.nodes.into_values() {
            node.shutdown().await;
        }
    }
}

type Addresses = Arc<Mutex<HashMap<String, String>>>;

/// One frame of `bytes` for `point`, appended only at `offset`.
fn frame(point: &str, offset: u64, bytes: &[u8]) -> ProduceRequest {
    ProduceRequest {
        point: point.into(),
        frame: Bytes::copy_from_slice(bytes),
        expected_offset: Some(offset),
        ..Default::default()
    }
}

/// Appends `bytes` at `offset` of `point`, starting at node `at` and following redirects;
/// retries what may pass. Returns the node that took it.
async fn append(
    addresses: &Addresses,
    mut at: String,
    point: &str,
    offset: u64,
    bytes: &[u8],
) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "appending to {point} at {offset} kept failing"
        );
        let address = addresses.lock().unwrap().get(&at).cloned();
        let Some(address) = address else {
            panic!("{point} was redirected to {at}, which the writer does not know");
        };
        let options = ClientOptions {
            addr: address,
            tls: None,
        };
        // A node restarting (a test restarts one) is tried again.
        let Ok(client) = Client::connect(&options).await else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let mut client = client.raw();
        let request = frame(point, offset, bytes);
        let status = match client.produce_stream(tokio_stream::iter([request])).await {
            Ok(_) => return at,
            Err(status) => status,
        };
        let text = |key| {
            status
                .metadata()
                .get(key)
                .and_then(|value| value.to_str().ok())
                .map(str::to_owned)
        };
        match status.code() {
            Code::FailedPrecondition if text(OWNER_METADATA).is_some() => {
                at = text(OWNER_METADATA).unwrap();
            }
            Code::FailedPrecondition if text(END_METADATA).is_some() => {
                // Written by an earlier attempt whose answer was lost: never written twice.
                let end: u64 = text(END_METADATA).unwrap().parse().unwrap();
                assert_eq!(
                    end,
                    offset + bytes.len() as u64,
                    "{point} ends at {end}: a write at {offset} was lost or doubled"
                );
                return at;
            }
            // Unavailable; or the node stopped under the call (a restart): whether it was
            // written is found by the retry's expected offset.
            Code::Unavailable | Code::Cancelled | Code::Unknown => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            _ => panic!("appending to {point} at {offset} on {at}: {status:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_drained_primary_hands_every_point_to_its_next_owner_while_writes_go_on() {
    let _serial = SERIAL.lock().await;
    let mut scenario = Scenario::start(&["a", "b", "c", "d"]).await;
    let on_c: Vec<String> = scenario
        .owners
        .iter()
        .filter(|(_, at)| *at == "c")
        .map(|(point, _)| point.clone())
        .collect();
    assert!(on_c.len() >= 25, "c owns {} of {POINTS} points", on_c.len());

    // Drain c (4 -> 3 primaries), asked through a.
    let options = ClientOptions {
        addr: scenario.nodes["a"].addr(),
        tls: None,
    };
    let state = Client::connect(&options)
        .await
        .unwrap()
        .drain("c", &options)
        .await
        .expect("drain c");
    assert_eq!(state, "leaving");
    eventually("c to hand everything over and leave the ring", || async {
        scenario.state("c").await == "left"
    })
    .await;
    scenario.stop_writing().await;
    let mut moved = scenario.check_every_point().await;
    moved.sort();
    assert_eq!(moved, on_c, "exactly c's points moved");

    // c redirects writes of what it handed over; its copies go once their new owners hold them
    // replicated (standalone owners: at once), and reads then go to the owners too.
    let c = &scenario.nodes["c"];
    let point = &on_c[0];
    let status = c
        .client()
        .await
        .produce_stream(tokio_stream::iter([frame(point, 0, b"x")]))
        .await
        .expect_err("c no longer takes writes");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert_eq!(
        status.metadata().get(OWNER_METADATA).unwrap(),
        owner(&scenario.nodes["a"], point).await.as_str()
    );
    let store = c.node.store().unwrap();
    eventually("c to delete the copies it handed over", || async {
        on_c.iter().all(|point| {
            store.list(point, None, 1).first().map(|p| p.as_str()) != Some(point.as_str())
        })
    })
    .await;
    // c holds no copy any more: a read there names the owner (every node is a door).
    let status = consume(&mut c.client().await, window(point, 0, 0, 0))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert_eq!(
        status.metadata().get(OWNER_METADATA).unwrap(),
        owner(&scenario.nodes["a"], point).await.as_str()
    );
    scenario.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_joining_primary_is_handed_its_points_then_turns_active_while_writes_go_on() {
    let _serial = SERIAL.lock().await;
    let mut scenario = Scenario::start(&["a", "b", "c"]).await;
    // A leader without followers: the copies handed to it are not replicated, so their old
    // owners keep theirs until an operator cleans them up.
    scenario.add_as("d", 3, Role::Leader).await;
    eventually("d to be handed its points and turn active", || async {
        scenario.state("d").await == "active"
    })
    .await;
    scenario.converge(4).await;
    scenario.stop_writing().await;
    let moved = scenario.check_every_point().await;
    assert!(
        moved.len() >= 25,
        "d took {} of {POINTS} points",
        moved.len()
    );
    for point in &moved {
        assert_eq!(owner(&scenario.nodes["a"], point).await, "d", "{point}");
    }

    // The old owners still hold (and serve) what they handed over, until cleaned up.
    let giver = scenario.owners[&moved[0]].clone();
    let handed: Vec<&String> = moved
        .iter()
        .filter(|p| scenario.owners[*p] == giver)
        .collect();
    let node = &scenario.nodes[&giver];
    let kept = consume(&mut node.client().await, window(handed[0], 0, 0, 0))
        .await
        .unwrap()
        .concat();
    assert!(!kept.is_empty());
    assert!(scenario.expected.lock().unwrap()[handed[0]].starts_with(&kept));
    let options = ClientOptions {
        addr: node.addr(),
        tls: None,
    };
    let cleaned = Client::connect(&options)
        .await
        .unwrap()
        .cleanup(&giver, &options)
        .await
        .unwrap();
    assert_eq!(cleaned.points, handed.len() as u64, "{cleaned:?}");
    let store = node.node.store().unwrap();
    for point in &handed {
        let id = PointId::new(point.as_str()).unwrap();
        assert!(
            store.metadata(&id).await.is_err(),
            "{point} is still on {giver}"
        );
    }

    // A point nobody held is created by its owner in the new ring.
    let fresh = (0..)
        .map(|i| format!("fresh/{i}"))
        .find(|point| !scenario.owners.contains_key(point))
        .unwrap();
    let at = owner(&scenario.nodes["a"], &fresh).await;
    let took = append(&scenario.addresses, "a".into(), &fresh, 0, b"new").await;
    assert_eq!(took, at);
    scenario.shutdown().await;
}

/// The controller decides the join: its leader restarts while the joining primary is being
/// handed its points, under writes. The next leader completes the join; nothing acknowledged is
/// lost and every point has one owner.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_join_completes_across_a_restart_of_the_controllers_leader() {
    let _serial = SERIAL.lock().await;
    let mut scenario = Scenario::throttled(&["a", "b", "c"], 1024 * 1024).await;
    scenario.add("d", 3).await;
    eventually("d to be handed its first points", || async {
        !scenario.nodes["d"].node.store().unwrap().is_empty()
    })
    .await;
    let before = members(&scenario.nodes["d"]).await.controller.unwrap();
    let leader = ["a", "b", "c"]
        .into_iter()
        .find(|name| *name == before.leader)
        .expect("a founder leads the controller");
    assert_eq!(scenario.state("d").await, "joining");
    // Stopped until the two other voters elected a new leader.
    scenario.restart(leader, 3).await;
    eventually_within("d to turn active", 2 * DEADLINE, || async {
        scenario.state("d").await == "active"
    })
    .await;
    let after = members(&scenario.nodes["d"]).await.controller.unwrap();
    assert!(after.term > before.term, "{before:?} then {after:?}");
    assert!(after.ring_epoch > before.ring_epoch);
    scenario.converge(4).await;
    scenario.stop_writing().await;
    let moved = scenario.check_every_point().await;
    assert!(!moved.is_empty(), "d took no point");
    scenario.shutdown().await;
}

/// Primaries `a` (with `configure`) and `b`, seeded by `a`, in one ring.
async fn pair(configure: impl FnOnce(&mut Config)) -> (TestNode, TestNode) {
    let a = TestNode::start(|c| {
        c.node_name = "a".into();
        c.cluster.bootstrap_expect = 2;
        configure(c);
    })
    .await;
    let b = TestNode::start(seeded(&a, "b", Role::Standalone)).await;
    eventually("a and b to own the ring", || async {
        members(&a)
            .await
            .members
            .iter()
            .filter(|m| m.owns_range)
            .count()
            == 2
    })
    .await;
    (a, b)
}

/// Node `name` in `role`, seeded by `a`, expecting two primaries.
fn seeded(a: &TestNode, name: &'static str, role: Role) -> impl FnOnce(&mut Config) + use<> {
    let seed = a.node.gossip_addr().to_string();
    move |c| {
        c.node_name = name.into();
        c.role = role;
        c.seed_addresses = vec![seed];
        c.cluster.bootstrap_expect = 2;
    }
}

/// `count` points of `size` non-periodic bytes that `a` owns, written to it.
async fn points_of(
    a: &TestNode,
    prefix: &str,
    count: usize,
    size: usize,
) -> Vec<(String, Vec<u8>)> {
    let mut held = Vec::new();
    for i in 0.. {
        if held.len() == count {
            break;
        }
        let point = format!("{prefix}/{i}");
        if owner(a, &point).await == "a" {
            let bytes = data(i, size);
            produce(&mut a.client().await, &point, std::slice::from_ref(&bytes))
                .await
                .unwrap();
            held.push((point, bytes));
        }
    }
    held
}

/// Drains `node`, asked of itself.
async fn drain(node: &TestNode) {
    let options = ClientOptions {
        addr: node.addr(),
        tls: None,
    };
    let name = node.node.config().node_name.clone();
    Client::connect(&options)
        .await
        .unwrap()
        .drain(&name, &options)
        .await
        .unwrap();
}

/// Waits until `at` sees `a` as `left`, then checks `at` serves every `held` point whole.
async fn drained_to(at: &TestNode, held: &[(String, Vec<u8>)]) {
    eventually("a to hand everything over", || async {
        members(at)
            .await
            .members
            .iter()
            .any(|m| m.name == "a" && m.state == "left")
    })
    .await;
    for (point, bytes) in held {
        let read = consume(&mut at.client().await, window(point, 0, 0, 0))
            .await
            .unwrap();
        assert!(read.concat() == *bytes, "{point}");
    }
}

/// With `reshard.max_bytes_per_sec`, a drain sends no faster than that, and still moves every
/// byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttled_drain_moves_no_faster_than_its_throttle() {
    let _serial = SERIAL.lock().await;
    const RATE: u64 = 2 * 1024 * 1024;
    let (a, b) = pair(|c| c.reshard.max_bytes_per_sec = RATE).await;
    // 6 MiB in points of a.
    let held = points_of(&a, "throttled", 6, 1024 * 1024).await;
    let started = std::time::Instant::now();
    drain(&a).await;
    eventually("b to see a handing points over", || async {
        members(&b)
            .await
            .members
            .iter()
            .any(|m| m.name == "a" && m.moving > 0)
    })
    .await;
    drained_to(&b, &held).await;
    // The first push (up to 2 MiB) leaves at once; the other 4 MiB take 2 s at least.
    let took = started.elapsed();
    assert!(took >= Duration::from_secs(2), "6 MiB moved in {took:?}");
    b.shutdown().await;
    a.shutdown().await;
}

/// A drain lists the points held a few times, not once per round of the mover: a round comes
/// every 500 ms and after every move, and a node may hold a million points (each round reads the
/// handover index instead, `docs/resharding.md`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_lists_the_points_held_a_few_times_not_every_round() {
    let _serial = SERIAL.lock().await;
    let (a, b) = pair(|c| c.reshard.max_concurrent_moves = 1).await;
    let held = points_of(&a, "listed", 80, 3_000).await;
    let (listings, moves) = (
        counter(goutube::metrics::RESHARD_LISTINGS),
        counter(goutube::metrics::RESHARD_MOVED_POINTS),
    );
    drain(&a).await;
    drained_to(&b, &held).await;
    // One move at a time: a round ended each of them.
    let rounds = counter(goutube::metrics::RESHARD_MOVED_POINTS) - moves;
    assert_eq!(rounds, 80.0);
    let listed = counter(goutube::metrics::RESHARD_LISTINGS) - listings;
    assert!(
        (1.0..=8.0).contains(&listed),
        "{listed} listings for {rounds} rounds"
    );
    b.shutdown().await;
    a.shutdown().await;
}

/// Moves start only once the pending change and the live view have stayed the same for
/// `reshard.settle_ms`: a member that turns up meanwhile (here a balancer) puts them off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moves_wait_for_a_settled_view() {
    let _serial = SERIAL.lock().await;
    const SETTLE: Duration = Duration::from_secs(3);
    let (a, b) = pair(|c| c.reshard.settle_ms = SETTLE.as_millis() as u64).await;
    let held = points_of(&a, "settle", 3, 10_000).await;
    drain(&a).await;
    // Halfway through the settling, the view changes.
    tokio::time::sleep(SETTLE / 2).await;
    let balancer = TestNode::start(seeded(&a, "x", Role::Balancer)).await;
    eventually("a to see the balancer", || async { sees(&a, 3).await }).await;
    let view_changed = std::time::Instant::now();
    drained_to(&b, &held).await;
    let waited = view_changed.elapsed();
    assert!(
        waited >= SETTLE - Duration::from_millis(500),
        "a moved its points {waited:?} after the view changed"
    );
    balancer.shutdown().await;
    b.shutdown().await;
    a.shutdown().await;
}

/// A join under way is replaced by a drain (drains go first): the copies to the joiner that the
/// drain's ring no longer calls for stop and are given up, the drain runs, then the join does;
/// every point ends on its owner intact, and no handover record is left anywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_move_whose_target_changes_is_cancelled_cleanly() {
    let _serial = SERIAL.lock().await;
    let mut scenario = Scenario::throttled(&["a", "b", "c"], 512 * 1024).await;
    scenario.add("d", 3).await;
    // A point of b or c grown by 4 MiB and bound for d: at the throttle its copy takes some 8 s,
    // so it is under way when the drain is asked for, and the drain's ring leaves it where it is.
    let a = &scenario.nodes["a"];
    let mut big = None;
    eventually("a to see d joining", || async {
        a.node
            .placement()
            .pending_owner("videos/0")
            .await
            .unwrap()
            .is_some()
    })
    .await;
    for point in scenario.owners.keys() {
        let id = PointId::new(point.as_str()).unwrap();
        let to = a
            .node
            .placement()
            .pending_owner(id.as_str())
            .await
            .unwrap()
            .unwrap()
            .owner;
        if to == "d" && scenario.owners[point] != "a" && !scenario.written.contains(point) {
            big = Some(point.clone());
            break;
        }
    }
    let big = big.expect("a point bound for d");
    let bytes = data(7, 4 * 1024 * 1024);
    let offset = scenario.expected.lock().unwrap()[&big].len() as u64;
    append(
        &scenario.addresses,
        scenario.owners[&big].clone(),
        &big,
        offset,
        &bytes,
    )
    .await;
    scenario
        .expected
        .lock()
        .unwrap()
        .get_mut(&big)
        .unwrap()
        .extend(&bytes);
    let d = scenario.nodes["d"].node.store().unwrap().clone();
    let big_id = PointId::new(big.as_str()).unwrap();
    let arriving = |point: PointId| {
        let d = d.clone();
        async move {
            matches!(
                d.ownership(&point).await,
                Ok(Ownership {
                    handover: Some(Handover::Incoming { .. }),
                    ..
                })
            )
        }
    };
    eventually("d to receive the big point", || arriving(big_id.clone())).await;

    drain(&scenario.nodes["a"]).await;
    // Two changes of some 5 MB each at the throttle: their size sets the pace.
    eventually_within("a to be drained, then d to join", 2 * DEADLINE, || async {
        scenario.state("a").await == "left" && scenario.state("d").await == "active"
    })
    .await;
    scenario.stop_writing().await;
    let moved = scenario.check_every_point().await;
    assert!(moved.iter().any(|p| scenario.owners[p] == "a"));
    let mut to_d = 0;
    for point in &moved {
        if owner(&scenario.nodes["b"], point).await == "d" {
            to_d += 1;
        }
    }
    assert!(to_d > 0, "d took none of the points");
    for point in d.list("", None, usize::MAX) {
        assert!(
            !arriving(point.clone()).await,
            "{point} is still arriving on d"
        );
    }
    assert!(
        counter(goutube::metrics::RESHARD_STOPPED_MOVES) > 0.0,
        "no handover was stopped"
    );
    for (name, node) in &scenario.nodes {
        let store = node.node.store().unwrap();
        for point in store.list("", None, usize::MAX) {
            let handover = store.ownership(&point).await.unwrap().handover;
            assert!(
                matches!(handover, None | Some(Handover::Moved { .. })),
                "{point} on {name}: {handover:?}"
            );
        }
    }
    scenario.shutdown().await;
}
