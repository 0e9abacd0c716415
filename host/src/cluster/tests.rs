//! Membership scenarios as data. Each runs on chitchat's in-process network with paused time
//! (deterministic, and seconds of gossip take milliseconds), and those that need no link control
//! also run on real UDP over loopback, sealed with a cluster key: one suite, both networks.
//!
//! Every node gets `a` and an address nobody listens on as seeds (an unreachable seed must
//! never stop a start). Times in the steps are the documented bounds for the default gossip
//! settings (200 ms rounds, phi 8): formation ≤ 2 s, a graceful stop ≤ 2 s, a kill ≤ 3 s.

use std::collections::HashMap;

use tempfile::TempDir;

use super::*;
use gossip::{ClusterKey, InMemoryNetwork};

#[derive(Debug, Clone, Copy)]
enum Step {
    /// Starts (or restarts, on its old data directory) a node.
    Start {
        node: &'static str,
        role: Role,
        expect: usize,
    },
    /// A graceful stop: the node announces it, then stops gossiping.
    Stop(&'static str),
    /// Stops gossiping without a word.
    Kill(&'static str),
    /// Cuts every link of the node (in-memory network only).
    Isolate(&'static str),
    Heal(&'static str),
    /// Cuts one link (in-memory network only).
    Cut(&'static str, &'static str),
    /// Within the bound, every node of `at` sees exactly `live` alive.
    Live {
        at: &'static [&'static str],
        live: &'static [&'static str],
        within: Duration,
    },
    /// For the whole period, every node of `at` keeps seeing `live` alive (exactly).
    Keeps {
        at: &'static [&'static str],
        live: &'static [&'static str],
        during: Duration,
    },
    /// Within the bound, every running node has the same view id.
    SameView {
        within: Duration,
    },
    /// Within the bound, every node of `at` holds one ring (the same id everywhere) with exactly
    /// these members in these states.
    HoldsRing {
        at: &'static [&'static str],
        active: &'static [&'static str],
        joining: &'static [&'static str],
        within: Duration,
    },
    /// For the whole period, `at` has no ring.
    NoRing {
        at: &'static str,
        during: Duration,
    },
}

use Step::*;

enum Net {
    InMemory(InMemoryNetwork),
    Udp(ClusterKey),
}

struct Sim {
    net: Net,
    nodes: HashMap<&'static str, Cluster>,
    dirs: HashMap<&'static str, TempDir>,
    /// Gossip addresses (fixed per name, so restarts reuse them).
    addrs: HashMap<&'static str, SocketAddr>,
}

const NAMES: [&str; 6] = ["a", "b", "c", "d", "e", "f"];

impl Sim {
    fn new(net: Net) -> Sim {
        let addrs = NAMES
            .iter()
            .map(|name| {
                let addr = match &net {
                    Net::InMemory(_) => {
                        SocketAddr::from(([127, 0, 0, 1], 20_000 + u16::from(name.as_bytes()[0])))
                    }
                    // Reserve a real port: bind port 0, remember it, release it.
                    Net::Udp(_) => std::net::UdpSocket::bind("127.0.0.1:0")
                        .unwrap()
                        .local_addr()
                        .unwrap(),
                };
                (*name, addr)
            })
            .collect();
        Sim {
            net,
            nodes: HashMap::new(),
            dirs: HashMap::new(),
            addrs,
        }
    }

    async fn start(&mut self, node: &'static str, role: Role, expect: usize) {
        let dir = self
            .dirs
            .entry(node)
            .or_insert_with(|| tempfile::tempdir().unwrap());
        let addr = self.addrs[node];
        let network = match &self.net {
            Net::InMemory(network) => Network::InMemory {
                network: network.clone(),
                addr,
            },
            Net::Udp(key) => Network::Udp {
                socket: std::net::UdpSocket::bind(addr).unwrap(),
                key: Some(key.clone()),
            },
        };
        let (_leader, following) = watch::channel(None);
        let params = Params {
            section: ClusterSection {
                bootstrap_expect: expect,
                ..ClusterSection::default()
            },
            seeds: vec![self.addrs["a"].to_string(), "127.0.0.1:9".into()],
            dir: dir.path().to_owned(),
            local: Local {
                name: node.into(),
                role,
                rpc_addr: SocketAddr::from(([127, 0, 0, 1], 30_000 + addr.port() % 1000)),
                replication_addr: SocketAddr::from(([127, 0, 0, 1], 31_000 + addr.port() % 1000)),
                http_addr: SocketAddr::from(([127, 0, 0, 1], 32_000 + addr.port() % 1000)),
                virtual_nodes: 64,
                tags: BTreeMap::new(),
            },
            leader: following,
            controller: None,
        };
        let cluster = start(params, network, CancellationToken::new())
            .await
            .unwrap();
        self.nodes.insert(node, cluster);
    }

    fn membership(&self, node: &str) -> Arc<Membership> {
        self.nodes[node].membership().borrow().clone()
    }

    fn live(&self, node: &str) -> Vec<String> {
        self.membership(node).view.members.keys().cloned().collect()
    }

    async fn links(&self, node: &str, up: bool) {
        let Net::InMemory(network) = &self.net else {
            panic!("links can only be cut on the in-memory network");
        };
        for other in NAMES.iter().filter(|n| **n != node) {
            let (a, b) = (self.addrs[node], self.addrs[other]);
            if up {
                network.link(a, b).await;
            } else {
                network.cut(a, b).await;
            }
        }
    }

    /// Polls `check` until it holds, failing after `within`.
    async fn within(
        &self,
        within: Duration,
        what: &str,
        check: impl Fn(&Sim) -> Result<(), String>,
    ) {
        let deadline = Instant::now() + within;
        loop {
            match check(self) {
                Ok(()) => return,
                Err(why) if Instant::now() >= deadline => {
                    panic!("{what}: not within {within:?}: {why}")
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }

    async fn during(
        &self,
        during: Duration,
        what: &str,
        check: impl Fn(&Sim) -> Result<(), String>,
    ) {
        let end = Instant::now() + during;
        while Instant::now() < end {
            if let Err(why) = check(self) {
                panic!("{what}: broke during {during:?}: {why}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn run(&mut self, steps: &[Step]) {
        for (index, step) in steps.iter().enumerate() {
            let what = format!("step {index} {step:?}");
            match *step {
                Start { node, role, expect } => self.start(node, role, expect).await,
                Stop(node) => {
                    let cluster = self.nodes.remove(node).unwrap();
                    cluster.shutdown().await.unwrap();
                }
                Kill(node) => self.nodes.remove(node).unwrap().kill().await,
                Isolate(node) => self.links(node, false).await,
                Heal(node) => self.links(node, true).await,
                Cut(a, b) => {
                    let Net::InMemory(network) = &self.net else {
                        panic!("links can only be cut on the in-memory network");
                    };
                    network.cut(self.addrs[a], self.addrs[b]).await;
                }
                Live { at, live, within } => {
                    self.within(within, &what, |sim| expect_live(sim, at, live))
                        .await
                }
                Keeps { at, live, during } => {
                    self.during(during, &what, |sim| expect_live(sim, at, live))
                        .await
                }
                SameView { within } => {
                    self.within(within, &what, |sim| {
                        let views: BTreeSet<String> = sim
                            .nodes
                            .keys()
                            .map(|n| sim.membership(n).view.id.clone())
                            .collect();
                        (views.len() == 1)
                            .then_some(())
                            .ok_or(format!("views {views:?}"))
                    })
                    .await
                }
                HoldsRing {
                    at,
                    active,
                    joining,
                    within,
                } => {
                    self.within(within, &what, |sim| expect_ring(sim, at, active, joining))
                        .await
                }
                NoRing { at, during } => {
                    self.during(during, &what, |sim| {
                        let ring = &sim.membership(at).ring;
                        (!ring.is_formed())
                            .then_some(())
                            .ok_or(format!("formed {ring:?}"))
                    })
                    .await
                }
            }
        }
    }

    /// Kills every node still running.
    async fn finish(mut self) {
        for (_, cluster) in self.nodes.drain() {
            cluster.kill().await;
        }
    }
}

fn expect_live(sim: &Sim, at: &[&str], live: &[&str]) -> Result<(), String> {
    for node in at {
        let seen = sim.live(node);
        if seen != live {
            return Err(format!("{node} sees {seen:?}"));
        }
    }
    Ok(())
}

fn expect_ring(sim: &Sim, at: &[&str], active: &[&str], joining: &[&str]) -> Result<(), String> {
    let mut ids = BTreeSet::new();
    for node in at {
        let membership = sim.membership(node);
        let ring = &membership.ring;
        ids.insert(ring.id.clone());
        let with = |state: Lifecycle| -> Vec<&str> {
            ring.members
                .iter()
                .filter(|(_, m)| m.lifecycle == state)
                .map(|(n, _)| n.as_str())
                .collect()
        };
        if !ring.is_formed()
            || with(Lifecycle::Active) != active
            || with(Lifecycle::Joining) != joining
            || ring.members.len() != active.len() + joining.len()
        {
            let views: Vec<String> = sim
                .nodes
                .keys()
                .map(|n| {
                    format!(
                        "{n}: live {:?} ring {:?}",
                        sim.live(n),
                        sim.membership(n).ring
                    )
                })
                .collect();
            return Err(format!("{node} holds {ring:?}; {views:#?}"));
        }
        if membership.conflict.is_some() {
            return Err(format!("{node} reports {:?}", membership.conflict));
        }
    }
    (ids.len() == 1)
        .then_some(())
        .ok_or(format!("ring ids {ids:?}"))
}

const PRIMARY: Role = Role::Leader;

/// Formation by three, a follower, a fourth primary joining, a graceful stop, a kill and a
/// restart: the ring moves only by explicit steps, the live view follows liveness.
const LIFECYCLE: &[Step] = &[
    Start {
        node: "a",
        role: PRIMARY,
        expect: 3,
    },
    Start {
        node: "b",
        role: PRIMARY,
        expect: 3,
    },
    NoRing {
        at: "a",
        during: Duration::from_secs(1),
    },
    Start {
        node: "c",
        role: PRIMARY,
        expect: 3,
    },
    Start {
        node: "f",
        role: Role::Follower,
        expect: 3,
    },
    HoldsRing {
        at: &["a", "b", "c", "f"],
        active: &["a", "b", "c"],
        joining: &[],
        within: Duration::from_secs(2),
    },
    Live {
        at: &["a", "b", "c", "f"],
        live: &["a", "b", "c", "f"],
        within: Duration::from_secs(2),
    },
    SameView {
        within: Duration::from_secs(2),
    },
    // A fourth primary joins an existing ring: it owns nothing.
    Start {
        node: "d",
        role: PRIMARY,
        expect: 3,
    },
    HoldsRing {
        at: &["a", "b", "c", "d", "f"],
        active: &["a", "b", "c"],
        joining: &["d"],
        within: Duration::from_secs(2),
    },
    SameView {
        within: Duration::from_secs(2),
    },
    // A graceful stop leaves the live view fast, and the ring not at all.
    Stop("b"),
    Live {
        at: &["a", "c", "d", "f"],
        live: &["a", "c", "d", "f"],
        within: Duration::from_secs(2),
    },
    // A killed node leaves the live view within the detection bound; it stays in the ring.
    Kill("c"),
    Live {
        at: &["a", "d", "f"],
        live: &["a", "d", "f"],
        within: Duration::from_secs(3),
    },
    HoldsRing {
        at: &["a", "d", "f"],
        active: &["a", "b", "c"],
        joining: &["d"],
        within: Duration::from_secs(1),
    },
    // Restarted on its data, it comes back as the same member of the same ring.
    Start {
        node: "c",
        role: PRIMARY,
        expect: 3,
    },
    Live {
        at: &["a", "c", "d", "f"],
        live: &["a", "c", "d", "f"],
        within: Duration::from_secs(2),
    },
    HoldsRing {
        at: &["a", "c", "d", "f"],
        active: &["a", "b", "c"],
        joining: &["d"],
        within: Duration::from_secs(2),
    },
    SameView {
        within: Duration::from_secs(2),
    },
];

/// A node cut off from everyone leaves every view and comes back on heal; a node that loses
/// one link only stays live through the others (liveness is not reachability).
const PARTITIONS: &[Step] = &[
    Start {
        node: "a",
        role: PRIMARY,
        expect: 3,
    },
    Start {
        node: "b",
        role: PRIMARY,
        expect: 3,
    },
    Start {
        node: "c",
        role: PRIMARY,
        expect: 3,
    },
    Live {
        at: &["a", "b", "c"],
        live: &["a", "b", "c"],
        within: Duration::from_secs(2),
    },
    Isolate("c"),
    Live {
        at: &["a", "b"],
        live: &["a", "b"],
        within: Duration::from_secs(3),
    },
    Live {
        at: &["c"],
        live: &["c"],
        within: Duration::from_secs(3),
    },
    Heal("c"),
    Live {
        at: &["a", "b", "c"],
        live: &["a", "b", "c"],
        within: Duration::from_secs(2),
    },
    SameView {
        within: Duration::from_secs(2),
    },
    Cut("a", "c"),
    Keeps {
        at: &["a", "b", "c"],
        live: &["a", "b", "c"],
        during: Duration::from_secs(20),
    },
    HoldsRing {
        at: &["a", "b", "c"],
        active: &["a", "b", "c"],
        joining: &[],
        within: Duration::from_secs(1),
    },
];

/// A primary alone with `bootstrap_expect = 1` forms its own ring; later primaries join it.
const ALONE_FIRST: &[Step] = &[
    Start {
        node: "a",
        role: Role::Standalone,
        expect: 1,
    },
    HoldsRing {
        at: &["a"],
        active: &["a"],
        joining: &[],
        within: Duration::from_secs(1),
    },
    Start {
        node: "b",
        role: Role::Standalone,
        expect: 1,
    },
    HoldsRing {
        at: &["a", "b"],
        active: &["a"],
        joining: &["b"],
        within: Duration::from_secs(2),
    },
];

#[tokio::test(start_paused = true)]
async fn lifecycle_in_memory() {
    let mut sim = Sim::new(Net::InMemory(InMemoryNetwork::new()));
    sim.run(LIFECYCLE).await;
    sim.finish().await;
}

#[tokio::test(start_paused = true)]
async fn partitions_in_memory() {
    let mut sim = Sim::new(Net::InMemory(InMemoryNetwork::new()));
    sim.run(PARTITIONS).await;
    sim.finish().await;
}

#[tokio::test(start_paused = true)]
async fn alone_first_in_memory() {
    let mut sim = Sim::new(Net::InMemory(InMemoryNetwork::new()));
    sim.run(ALONE_FIRST).await;
    sim.finish().await;
}

fn key() -> ClusterKey {
    ClusterKey::derive(b"the scenario cluster key", "goutube")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_over_sealed_udp() {
    let mut sim = Sim::new(Net::Udp(key()));
    sim.run(LIFECYCLE).await;
    sim.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alone_first_over_sealed_udp() {
    let mut sim = Sim::new(Net::Udp(key()));
    sim.run(ALONE_FIRST).await;
    sim.finish().await;
}

/// A node with another key (or none) never appears in anyone's view, and its datagrams are
/// dropped and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_the_key_never_joins() {
    let recorder = crate::metrics::handle();
    let mut sim = Sim::new(Net::Udp(key()));
    sim.run(&[
        Start {
            node: "a",
            role: PRIMARY,
            expect: 1,
        },
        HoldsRing {
            at: &["a"],
            active: &["a"],
            joining: &[],
            within: Duration::from_secs(1),
        },
        Start {
            node: "b",
            role: PRIMARY,
            expect: 1,
        },
        Live {
            at: &["a", "b"],
            live: &["a", "b"],
            within: Duration::from_secs(2),
        },
    ])
    .await;
    sim.net = Net::Udp(ClusterKey::derive(b"a key of another cluster", "goutube"));
    sim.start("c", PRIMARY, 1).await;
    sim.net = Net::Udp(key());
    sim.start_unsealed("d", PRIMARY).await;
    sim.run(&[
        Keeps {
            at: &["a", "b"],
            live: &["a", "b"],
            during: Duration::from_secs(3),
        },
        Live {
            at: &["c"],
            live: &["c"],
            within: Duration::from_secs(1),
        },
        Live {
            at: &["d"],
            live: &["d"],
            within: Duration::from_secs(1),
        },
        HoldsRing {
            at: &["a", "b"],
            active: &["a"],
            joining: &["b"],
            within: Duration::from_secs(1),
        },
    ])
    .await;
    sim.finish().await;
    // c's datagrams fail to open; d's are not sealed.
    let scrape = recorder.render();
    for reason in ["bad_key", "unsealed"] {
        let line = format!("{}{{reason=\"{reason}\"}}", crate::metrics::GOSSIP_DROPPED);
        assert!(scrape.contains(&line), "no {line} in:\n{scrape}");
    }
}

impl Sim {
    /// A node gossiping in plaintext into a sealed cluster.
    async fn start_unsealed(&mut self, node: &'static str, role: Role) {
        let key = match std::mem::replace(&mut self.net, Net::InMemory(InMemoryNetwork::new())) {
            Net::Udp(key) => key,
            other => {
                self.net = other;
                panic!("plaintext only matters on UDP");
            }
        };
        let addr = self.addrs[node];
        let dir = self
            .dirs
            .entry(node)
            .or_insert_with(|| tempfile::tempdir().unwrap());
        let (_leader, following) = watch::channel(None);
        let params = Params {
            section: ClusterSection::default(),
            seeds: vec![self.addrs["a"].to_string()],
            dir: dir.path().to_owned(),
            local: Local {
                name: node.into(),
                role,
                rpc_addr: "127.0.0.1:1".parse().unwrap(),
                replication_addr: "127.0.0.1:2".parse().unwrap(),
                http_addr: "127.0.0.1:3".parse().unwrap(),
                virtual_nodes: 64,
                tags: BTreeMap::new(),
            },
            leader: following,
            controller: None,
        };
        let network = Network::Udp {
            socket: std::net::UdpSocket::bind(addr).unwrap(),
            key: None,
        };
        let cluster = start(params, network, CancellationToken::new())
            .await
            .unwrap();
        self.nodes.insert(node, cluster);
        self.net = Net::Udp(key);
    }
}
