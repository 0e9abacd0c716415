//! Automatic failover (docs/failover.md), on real processes with mTLS: three primaries that are
//! the controller's voters, each acknowledging a produce once its in-sync followers confirmed it
//! (`ack = { replicas = 1 }`, `fsync = "always"`), and followers as child processes too, so
//! that any of them can be killed or stopped.
//!
//! - Sessions: a group leader that cannot reach the controller stops taking writes before the
//!   controller could find its session expired, and takes them again once it has a session.
//! - `kill -9` of a leader under acknowledged writes: an in-sync follower is named in its place
//!   and holds every acknowledged byte; the other follower follows it; the old leader returns
//!   as its follower.
//! - SIGSTOP of a leader past its session, then SIGCONT: replaced meanwhile, it acknowledges
//!   nothing once resumed and changes no byte on the new leader (a checker compares every
//!   replica with the acknowledged bytes).
//! - Clients ride through: `goutube put` to a leader killed midway finishes byte-exact, and a
//!   producer appending through a balancer meanwhile sees no error.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use goutube::metrics::{
    FAILOVERS, QUARANTINED_POINTS, REPLICATION_CUT_BYTES as CUT_BYTES, SELF_FENCED, SESSION_HELD,
    UNDER_REPLICATED_GROUPS as UNDER_REPLICATED,
};
use goutube::netns::Namespaces;
use goutube::proto::{END_METADATA, ListMembersRequest, ListMembersResponse, LocatePointRequest};
use goutube_tests::{
    DEADLINE, NodeProcess, Pki, append_at, consume, data, eventually, eventually_some,
    eventually_within, goutube_bin, http, metadata, metric, metric_where, owner_through, stderr,
    stdout, url_path, window, write_node_config,
};
use tempfile::TempDir;
use tonic::Code;
use tonic::transport::Channel;

type Client = goutube::proto::streaming_client::StreamingClient<Channel>;

/// The controller's session in these tests: the default.
const SESSION: Duration = Duration::from_millis(3_000);

/// Primaries a, b, c (the voters) and their followers, as child processes.
struct Cluster {
    root: TempDir,
    pki: Pki,
    nodes: BTreeMap<&'static str, NodeProcess>,
    /// Each node in a network namespace of its own, for tests that cut links; `None`: every
    /// node on 127.0.0.1.
    namespaces: Option<Namespaces>,
}

impl Cluster {
    fn new() -> Cluster {
        Cluster {
            root: tempfile::tempdir().unwrap(),
            pki: Pki::new(),
            nodes: BTreeMap::new(),
            namespaces: None,
        }
    }

    /// Primaries a, b, c, and `followers` of a; once the ring is formed and every follower is
    /// in a's in-sync set.
    async fn start(followers: &[&'static str]) -> Cluster {
        Cluster::start_with(Cluster::new(), followers).await
    }

    /// [`Cluster::start`], each node in a network namespace of its own (links can be cut).
    async fn start_partitionable(followers: &[&'static str]) -> Cluster {
        // Named after this process, so that tests run at once do not meet.
        let tag = format!("gt{}", std::process::id() % 10_000_000);
        let namespaces = Namespaces::new(&tag, [198, 18]).expect(
            "network namespaces for a partition (the tests need root and iproute2, as CI has)",
        );
        let cluster = Cluster {
            namespaces: Some(namespaces),
            ..Cluster::new()
        };
        Cluster::start_with(cluster, followers).await
    }

    async fn start_with(mut cluster: Cluster, followers: &[&'static str]) -> Cluster {
        for name in ["a", "b", "c"] {
            cluster.spawn_primary(name);
        }
        cluster.follow("a", followers).await;
        cluster
    }

    /// Starts `followers` of primary `slot`; returns once each is in its in-sync set.
    async fn follow(&mut self, slot: &'static str, followers: &[&'static str]) {
        for follower in followers {
            self.spawn_follower(follower, slot);
        }
        eventually(
            &format!("the followers to be in {slot}'s in-sync set"),
            || async { self.in_sync(slot, slot).await == followers },
        )
        .await;
    }

    /// The controller's leader as node `name` sees it, once there is one.
    async fn controller_leader(&self, name: &str) -> &'static str {
        let leader = eventually_some("a controller leader", || async {
            let controller = self.members(name).await?.controller?;
            (!controller.leader.is_empty()).then_some(controller.leader)
        })
        .await;
        ["a", "b", "c"]
            .into_iter()
            .find(|voter| *voter == leader)
            .expect("a voter leads the controller")
    }

    /// Starts balancer lb; returns an operator's client of it once it sees a's group and
    /// every member sees it (a member trusts the subject it forwards for only from a live
    /// balancer).
    async fn start_balancer(&mut self) -> Client {
        self.spawn(
            "lb",
            "role = \"balancer\"\n[controller]\nvoters = [\"a\", \"b\", \"c\"]",
        );
        let members: Vec<&'static str> = self.nodes.keys().copied().collect();
        eventually(
            "the balancer and every member to see each other, and a's group",
            || async {
                let group = self.group("lb", "a").await;
                let mut seen = group.is_some_and(|g| g.failover == "automatic");
                for member in &members {
                    seen = seen
                        && self.sees_live("lb", member).await
                        && self.sees_live(member, "lb").await;
                }
                seen
            },
        )
        .await;
        self.client("lb").await
    }

    /// The group of `slot` as node `name` sees the controller's state.
    async fn group(&self, name: &str, slot: &str) -> Option<goutube::proto::GroupInfo> {
        let members = self.members(name).await?;
        let controller = members.controller?;
        controller.groups.into_iter().find(|g| g.slot == slot)
    }

    /// The gossip addresses of the nodes running, as a TOML list.
    fn seeds(&self) -> String {
        let running: Vec<String> = self
            .nodes
            .values()
            .map(|node| format!("\"{}\"", node.addresses.gossip))
            .collect();
        format!("[{}]", running.join(", "))
    }

    fn spawn(&mut self, name: &'static str, settings: &str) {
        let dir = self.root.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let at = self
            .namespaces
            .as_mut()
            .map(|namespaces| namespaces.add(name).unwrap());
        let sans: Vec<String> = at.iter().map(|ip| ip.to_string()).collect();
        let config = write_node_config(
            &dir,
            name,
            &format!(
                "seed_addresses = {}\n{settings}\n[storage]\nfsync = \"always\"\n{}\
                 bootstrap_expect = 3\n",
                self.seeds(),
                self.pki.node_toml_at(name, &sans)
            ),
        );
        let process = match (&self.namespaces, at) {
            (Some(namespaces), Some(ip)) => {
                let text = std::fs::read_to_string(&config).unwrap();
                let bind = format!("bind_addr = \"{ip}:0\"");
                std::fs::write(&config, text.replace("bind_addr = \"127.0.0.1:0\"", &bind))
                    .unwrap();
                NodeProcess::spawn_in(namespaces, name, &config)
            }
            _ => NodeProcess::spawn(&config),
        };
        self.nodes.insert(name, process);
    }

    /// Drops every packet between `node` and each of `others` (a partitionable cluster).
    fn cut(&self, node: &str, others: &[&str]) {
        self.namespaces.as_ref().unwrap().cut(node, others).unwrap();
    }

    /// Ends a [`cut`](Self::cut).
    fn heal(&self, node: &str, others: &[&str]) {
        self.namespaces
            .as_ref()
            .unwrap()
            .heal(node, others)
            .unwrap();
    }

    /// Starts (or restarts, on its data) primary `name`: a voter if it is a, b or c.
    fn spawn_primary(&mut self, name: &'static str) {
        self.spawn(
            name,
            "role = \"leader\"\n[controller]\nvoters = [\"a\", \"b\", \"c\"]\n\
             [replication]\nack = { replicas = 1 }\nack_timeout_ms = 1000",
        );
    }

    /// Starts follower `name` of primary `leader`.
    fn spawn_follower(&mut self, name: &'static str, leader: &str) {
        let replication = self.nodes[leader].addresses.replication;
        self.spawn_follower_of(name, replication);
    }

    /// Starts (or restarts, on its data) follower `name` of the leader at `replication`.
    fn spawn_follower_of(&mut self, name: &'static str, replication: std::net::SocketAddr) {
        self.spawn(
            name,
            &format!("role = \"follower\"\nleader_addresses = [\"{replication}\"]"),
        );
    }

    /// The data file of node `name`'s copy of `point`.
    fn data_file(&self, name: &str, point: &str) -> std::path::PathBuf {
        let id = goutube::point::PointId::new(point).unwrap();
        let dir = self.root.path().join(name).join("data").join("points");
        dir.join(id.relative_dir()).join("point.data")
    }

    /// What node `name` keeps in quarantine of `point`: for each copy (`<epoch>`) or tail
    /// (`<epoch>+<from>`), its directory's name and its bytes.
    fn quarantined(&self, name: &str, point: &str) -> Vec<(String, Vec<u8>)> {
        let id = goutube::point::PointId::new(point).unwrap();
        let dir = self.root.path().join(name).join("data").join("quarantine");
        let Ok(copies) = std::fs::read_dir(dir.join(id.relative_dir())) else {
            return Vec::new();
        };
        copies
            .filter_map(|copy| {
                let path = copy.ok()?.path();
                let bytes = std::fs::read(path.join("point.data")).ok()?;
                Some((path.file_name()?.to_str()?.to_owned(), bytes))
            })
            .collect()
    }

    /// The disk of node `name`, down, loses the last `bytes` of its copy of `point`.
    fn lose_tail(&self, name: &str, point: &str, bytes: u64) {
        let file = self.data_file(name, point);
        let len = std::fs::metadata(&file).unwrap().len();
        let data = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
        data.set_len(len - bytes).unwrap();
    }

    /// The disk of node `name`, down, flips a bit `back` bytes before the end of its copy of
    /// `point`.
    fn flip_in_tail(&self, name: &str, point: &str, back: u64) {
        use std::os::unix::fs::FileExt;
        let file = self.data_file(name, point);
        let len = std::fs::metadata(&file).unwrap().len();
        let data = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&file)
            .unwrap();
        let mut byte = [0u8];
        data.read_exact_at(&mut byte, len - back).unwrap();
        data.write_all_at(&[byte[0] ^ 0x10], len - back).unwrap();
    }

    /// An operator's client (`root`) of node `name`.
    async fn client(&self, name: &str) -> Client {
        self.pki.client("root", &self.nodes[name].rpc).await
    }

    async fn members(&self, name: &str) -> Option<ListMembersResponse> {
        let mut client = self.client(name).await;
        let members = client.list_members(ListMembersRequest {}).await.ok()?;
        Some(members.into_inner())
    }

    /// Whether node `name` sees `member` live.
    async fn sees_live(&self, name: &str, member: &str) -> bool {
        let members = self.members(name).await;
        members.is_some_and(|m| m.members.iter().any(|m| m.name == member && m.live))
    }

    /// The in-sync set of `slot`'s group as node `name` sees the controller's state.
    async fn in_sync(&self, name: &str, slot: &str) -> Vec<String> {
        let Some(members) = self.members(name).await else {
            return Vec::new();
        };
        let controller = members.controller.unwrap_or_default();
        let group = controller.groups.into_iter().find(|g| g.slot == slot);
        group.map(|g| g.in_sync).unwrap_or_default()
    }

    /// A point that primary `owner` owns.
    async fn point_of(&self, owner: &str) -> String {
        self.points_of(owner, 1).await.remove(0)
    }

    /// `n` points that primary `owner` owns.
    async fn points_of(&self, owner: &str, n: usize) -> Vec<String> {
        let client = self.client(owner).await;
        let mut points = Vec::new();
        for i in 0.. {
            let point = format!("failover/{owner}/{i}");
            if owner_through(client.clone(), &point).await == owner {
                points.push(point);
                if points.len() == n {
                    break;
                }
            }
        }
        points
    }

    /// The size of `point` on node `name` (0 if it holds none).
    async fn size(&self, name: &str, point: &str) -> u64 {
        let mut client = self.client(name).await;
        metadata(&mut client, point).await.map_or(0, |m| m.size)
    }

    /// The metrics node `name` serves (over TLS, to an operator's certificate).
    async fn metrics(&self, name: &str) -> String {
        let https = Some(self.pki.https(Some("root")));
        let scrape = http(
            self.nodes[name].addresses.metrics,
            "GET",
            "/metrics",
            &[],
            https,
        )
        .await;
        String::from_utf8(scrape.body).unwrap()
    }

    /// Stops every node gracefully, the voters last (a group leader stopping hands its group
    /// over first, which takes the controller).
    fn stop(self) {
        let (voters, others): (Vec<_>, Vec<_>) = self
            .nodes
            .into_iter()
            .partition(|(name, _)| ["a", "b", "c"].contains(name));
        for (name, node) in others.into_iter().chain(voters) {
            assert!(node.terminate(), "{name}: a graceful stop");
        }
    }
}

/// Writes `data(seed, 10_007)` to `point` from `offset` until a write is acknowledged, and
/// returns every byte the point then holds from `offset`. A leader stores a write before it
/// waits for its in-sync followers, and one they did not confirm in time is refused
/// (`Unavailable`) and stays stored: the next attempt, at the same offset, is then refused for
/// its offset, naming the end after that attempt. If the bytes there are the attempt's own, the
/// next one goes after them; the acknowledgement of a later write covers them too. Any other
/// bytes there stop nothing and are not skipped: the attempts go on failing until the deadline.
async fn write_eventually(
    client: &Client,
    point: &str,
    offset: u64,
    seed: u64,
    what: &str,
) -> Vec<u8> {
    let bytes = data(seed, 10_007);
    let at = std::sync::atomic::AtomicU64::new(offset);
    let acknowledged_at = eventually_some(what, || {
        let (mut client, point, bytes, at) = (client.clone(), point.to_owned(), &bytes, &at);
        async move {
            let from = at.load(std::sync::atomic::Ordering::SeqCst);
            let status = match append_at(&mut client, &point, from, bytes).await {
                Ok(()) => return Some(from),
                Err(status) => status,
            };
            let end = status
                .metadata()
                .get(END_METADATA)
                .and_then(|end| end.to_str().ok()?.parse::<u64>().ok());
            let next = from + bytes.len() as u64;
            if status.code() == Code::FailedPrecondition && end == Some(next) {
                let stored = consume(&mut client, window(&point, from, next, 0)).await;
                if stored.is_ok_and(|frames| frames.concat() == *bytes) {
                    at.store(next, std::sync::atomic::Ordering::SeqCst);
                }
            }
            None
        }
    })
    .await;
    let attempts = (acknowledged_at - offset) / bytes.len() as u64 + 1;
    bytes.repeat(attempts as usize)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_without_a_session_takes_no_writes_until_it_has_one_again() {
    let mut cluster = Cluster::start(&["fa"]).await;
    let point = cluster.point_of("a").await;
    let mut client = cluster.client("a").await;
    // Acknowledged writes while a holds its session.
    let mut chunk = 0u64;
    let first = write_eventually(&client, &point, 0, chunk, "a to acknowledge a write").await;
    let mut written = first.len() as u64;

    // The two other voters go: a cannot reach a controller quorum, so nobody answers its
    // heartbeats. It must stop acknowledging writes before the controller could find its
    // session expired: within a session of its last heartbeat, so within a session of now.
    cluster.nodes.remove("b").unwrap().kill();
    cluster.nodes.remove("c").unwrap().kill();
    let cut = Instant::now();
    let mut attempted = Vec::new();
    let refusal = loop {
        chunk += 1;
        let bytes = data(chunk, 10_007);
        attempted.clone_from(&bytes);
        // (Timed at the send: the decision to acknowledge comes after it, however late the
        // answer arrives on a loaded machine.)
        let sent = cut.elapsed();
        match append_at(&mut client, &point, written, &bytes).await {
            Ok(()) => {
                assert!(
                    sent < SESSION,
                    "a write sent {sent:?} after the controller became unreachable was \
                     acknowledged"
                );
                written += bytes.len() as u64;
            }
            Err(status) if status.message().contains("session") => break status,
            Err(status) => panic!("refused for another reason: {status:?}"),
        }
        assert!(cut.elapsed() < DEADLINE, "a kept taking writes");
    };
    eprintln!(
        "a stopped taking writes {:?} after it lost the controller",
        cut.elapsed()
    );
    assert_eq!(refusal.code(), Code::Unavailable, "{refusal:?}");
    assert!(
        refusal.message().contains("no writes"),
        "{}",
        refusal.message()
    );
    // A write refused when its acknowledgement was due is stored on a, unacknowledged (as
    // any write that timed out): then the point ends with exactly those bytes.
    let end = metadata(&mut client, &point).await.unwrap().size;
    if end != written {
        assert_eq!(end, written + attempted.len() as u64);
        let mut tail = client.clone();
        let stored = consume(&mut tail, window(&point, written, end, 0));
        assert!(stored.await.unwrap().concat() == attempted);
        written = end;
    }
    // The gauge follows at the end of the heartbeat round that found no controller.
    eventually("a to report its session lapsed", || async {
        let scrape = cluster.metrics("a").await;
        metric(&scrape, SESSION_HELD) == Some(0.0)
            && metric(&scrape, SELF_FENCED).is_some_and(|n| n >= 1.0)
    })
    .await;

    // One voter back: a quorum, a session, and writes again.
    cluster.spawn_primary("b");
    let last = write_eventually(
        &client,
        &point,
        written,
        chunk + 1,
        "a to take writes again",
    );
    let last = last.await;
    let mut tail = client.clone();
    let end = written + last.len() as u64;
    let held = consume(&mut tail, window(&point, written, end, 0))
        .await
        .unwrap();
    assert!(
        held.concat() == last,
        "the write after the session came back"
    );
    let scrape = cluster.metrics("a").await;
    assert_eq!(metric(&scrape, SESSION_HELD), Some(1.0));
    cluster.stop();
}

/// Everything `client` serves of `point`, as one buffer.
async fn read_all(client: &Client, point: &str) -> Vec<u8> {
    let mut client = client.clone();
    let frames = consume(&mut client, window(point, 0, 0, 0)).await.unwrap();
    frames.concat()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_leader_is_replaced_by_an_in_sync_follower_and_returns_as_its_follower() {
    let mut cluster = Cluster::start(&["fa1", "fa2"]).await;
    let point = cluster.point_of("a").await;
    let to_a = cluster.client("a").await;
    // Acknowledged writes of non-periodic sizes, each one kept as written.
    let mut acknowledged: Vec<u8> = Vec::new();
    for seed in 0..12u64 {
        let bytes = data(seed + 100, 3_001 + 7_919 * seed as usize);
        let mut client = to_a.clone();
        append_at(&mut client, &point, acknowledged.len() as u64, &bytes)
            .await
            .unwrap();
        acknowledged.extend_from_slice(&bytes);
    }
    let before = cluster.group("b", "a").await.unwrap();
    assert_eq!(before.failover, "automatic", "{before:?}");
    let epoch = before.leader_epoch;

    // kill -9: the controller finds a's session expired and names fa1 or fa2 in its place.
    cluster.nodes.remove("a").unwrap().kill();
    let killed = Instant::now();
    let group = eventually_some(
        "the controller to name a new leader for a's slot",
        || async { cluster.group("b", "a").await.filter(|g| g.leader != "a") },
    )
    .await;
    let leader: &'static str = if group.leader == "fa1" { "fa1" } else { "fa2" };
    let other: &'static str = if leader == "fa1" { "fa2" } else { "fa1" };
    assert_eq!(group.leader, leader);
    assert!(group.leader_epoch > epoch, "{group:?}");
    assert!(group.followers.contains(&"a".to_owned()), "{group:?}");
    eprintln!(
        "{leader} named a's leader {:?} after the kill",
        killed.elapsed()
    );

    // The new leader holds every acknowledged byte and takes writes (acknowledged once the
    // other follower, now following it, confirmed them). Named a moment ago, it serves up to
    // the last commit mark the old leader sent it, and the rest once its own in-sync follower
    // confirms it (`docs/failover.md`): a read meanwhile may be shorter, never other bytes.
    let to_leader = cluster.client(leader).await;
    eventually(
        "the new leader to serve every acknowledged byte",
        || async {
            let served = read_all(&to_leader, &point).await;
            assert!(
                acknowledged.starts_with(&served),
                "the new leader served bytes that were not acknowledged"
            );
            served.len() == acknowledged.len()
        },
    )
    .await;
    let written = write_eventually(
        &to_leader,
        &point,
        acknowledged.len() as u64,
        7,
        "the new leader to acknowledge a write",
    )
    .await;
    eprintln!(
        "the first write acknowledged by {leader} {:?} after the kill",
        killed.elapsed()
    );
    acknowledged.extend_from_slice(&written);
    assert!(read_all(&to_leader, &point).await == acknowledged);
    // Any other member sends writers to it.
    let mut to_b = cluster.client("b").await;
    let refused = append_at(&mut to_b, &point, acknowledged.len() as u64, b"x")
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(refused.message().contains(leader), "{}", refused.message());
    eventually(
        "the other follower to be in the new leader's in-sync set",
        || async {
            cluster
                .group("b", "a")
                .await
                .is_some_and(|g| g.in_sync.contains(&other.to_owned()))
        },
    )
    .await;
    let to_other = cluster.client(other).await;
    eventually(
        "the other follower to hold every acknowledged byte",
        || async { read_all(&to_other, &point).await == acknowledged },
    )
    .await;

    // An operator cannot forget a meanwhile: its slot lives on under the new leader.
    let options = cluster.pki.client_options("root", &cluster.nodes["b"].rpc);
    let operator = goutube::client::Client::connect(&options).await.unwrap();
    let refused = operator.forget("a").await.unwrap_err().to_string();
    assert!(refused.contains("since a failover"), "{refused}");
    // Nor change the ring: a's points would be handed over from a, which no longer takes
    // their writes.
    let refused = operator.drain("c", &options).await.unwrap_err();
    let refused = refused.to_string();
    assert!(
        refused.contains(&format!(
            "hand it back first (goutube members transfer {leader} --to a)"
        )),
        "{refused}"
    );

    // a returns: it follows the new leader, catches up, and enters its in-sync set; it takes
    // no writes, and names the leader.
    cluster.spawn_primary("a");
    let to_a = cluster.client("a").await;
    eventually("a to be back in the in-sync set", || async {
        cluster
            .group("b", "a")
            .await
            .is_some_and(|g| g.leader == leader && g.in_sync.contains(&"a".to_owned()))
    })
    .await;
    assert!(read_all(&to_a, &point).await == acknowledged);
    let mut client = to_a.clone();
    let refused = append_at(&mut client, &point, acknowledged.len() as u64, b"x")
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(refused.message().contains(leader), "{}", refused.message());
    cluster.stop();
}

/// Acknowledged writes, as written: the checker's record.
#[derive(Default)]
struct Acknowledged {
    bytes: Vec<u8>,
    /// Writes that failed without an answer, or with one that does not say whether they were
    /// stored: never counted as acknowledged.
    unknown: usize,
}

impl Acknowledged {
    /// `writes` appends through `client`, each acknowledged, of bytes made from `seed` on and
    /// of sizes that do not repeat.
    async fn written(client: &Client, point: &str, writes: u64, seed: u64) -> Acknowledged {
        let mut acknowledged = Acknowledged::default();
        for i in 0..writes {
            let bytes = data(seed + i, 3_001 + 4_993 * i as usize);
            assert!(acknowledged.append(client, point, &bytes).await);
        }
        acknowledged
    }

    /// Appends `bytes` at the end of what was acknowledged, through `client`, waiting at most a
    /// second; returns whether it was acknowledged.
    async fn append(&mut self, client: &Client, point: &str, bytes: &[u8]) -> bool {
        let mut client = client.clone();
        let offset = self.bytes.len() as u64;
        let call = append_at(&mut client, point, offset, bytes);
        match tokio::time::timeout(Duration::from_secs(1), call).await {
            Ok(Ok(())) => {
                self.bytes.extend_from_slice(bytes);
                true
            }
            _ => {
                self.unknown += 1;
                false
            }
        }
    }

    /// Waits until `client` serves every acknowledged byte at its offset (what follows them, if
    /// anything, was never acknowledged). A leader named a moment ago serves them once its
    /// in-sync followers confirmed them (its committed end); other bytes at an acknowledged
    /// offset fail the test at once.
    async fn check(&self, client: &Client, point: &str, node: &str) {
        eventually(
            &format!("{node} to serve every acknowledged byte"),
            || async {
                let held = read_all(client, point).await;
                let common = held.len().min(self.bytes.len());
                assert!(
                    held[..common] == self.bytes[..common],
                    "{node} changed acknowledged bytes: it serves {} bytes, {} were acknowledged",
                    held.len(),
                    self.bytes.len()
                );
                held.len() >= self.bytes.len()
            },
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_stopped_past_its_session_is_replaced_and_when_resumed_changes_nothing() {
    let cluster = Cluster::start(&["fa1", "fa2"]).await;
    let point = cluster.point_of("a").await;
    let to_a = cluster.client("a").await;
    let mut acknowledged = Acknowledged::written(&to_a, &point, 6, 300).await;

    // SIGSTOP: a keeps its sockets but answers nothing, its heartbeats stop, its session expires.
    cluster.nodes["a"].signal("STOP");
    let stopped = Instant::now();
    // A write sent meanwhile hangs, and is never acknowledged.
    assert!(!acknowledged.append(&to_a, &point, &data(400, 7_777)).await);
    let group = eventually_some(
        "the controller to name a new leader for a's slot",
        || async { cluster.group("b", "a").await.filter(|g| g.leader != "a") },
    )
    .await;
    eprintln!(
        "{} named a's leader {:?} after SIGSTOP",
        group.leader,
        stopped.elapsed()
    );
    let leader: &'static str = if group.leader == "fa1" { "fa1" } else { "fa2" };
    let to_leader = cluster.client(leader).await;
    for seed in 0..4u64 {
        let bytes = data(seed + 500, 4_001 + 2_003 * seed as usize);
        let written = eventually_some("the new leader to acknowledge", || async {
            let mut attempt = Acknowledged {
                bytes: acknowledged.bytes.clone(),
                unknown: 0,
            };
            attempt
                .append(&to_leader, &point, &bytes)
                .await
                .then_some(attempt.bytes)
        })
        .await;
        acknowledged.bytes = written;
    }

    // SIGCONT: a's session lapsed long ago. Whatever it had in flight is never acknowledged, it
    // changes nothing on the new leader, and it refuses new writes (naming the new leader once
    // it learned the fence).
    cluster.nodes["a"].signal("CONT");
    for seed in 0..4u64 {
        let bytes = data(seed + 600, 3_001 + 1_009 * seed as usize);
        let mut to_a = to_a.clone();
        let offset = acknowledged.bytes.len() as u64;
        let refused = append_at(&mut to_a, &point, offset, &bytes)
            .await
            .unwrap_err();
        assert!(
            matches!(refused.code(), Code::Unavailable | Code::FailedPrecondition),
            "{refused:?}"
        );
        assert!(acknowledged.append(&to_leader, &point, &bytes).await);
    }
    acknowledged.check(&to_leader, &point, leader).await;
    eventually(
        "a to follow the new leader and be in its in-sync set",
        || async {
            cluster
                .group("b", "a")
                .await
                .is_some_and(|g| g.leader == leader && g.in_sync.contains(&"a".to_owned()))
        },
    )
    .await;
    // Every replica now holds the acknowledged bytes: no offset holds two payloads.
    for node in ["a", "fa1", "fa2"] {
        let client = cluster.client(node).await;
        acknowledged.check(&client, &point, node).await;
    }
    let mut to_a = to_a.clone();
    let refused = append_at(&mut to_a, &point, acknowledged.bytes.len() as u64, b"x")
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(refused.message().contains(leader), "{}", refused.message());
    eprintln!("{} writes not acknowledged", acknowledged.unknown);
    cluster.stop();
}

/// The 3 a.m. outage, as clients see it: `goutube put` of a file to the leader, which is
/// killed midway, finishes with the point byte-exact (no byte lost, none twice); a producer
/// appending small records through a balancer all the while gets every append acknowledged.
/// A steady producer: one append after another through `to_lb` (a balancer), each at its
/// offset, until `stop`; returns what was acknowledged, or where and how an append failed.
fn produce_through(
    to_lb: Client,
    point: String,
    stop: tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<Result<Vec<u8>, (usize, tonic::Status)>> {
    tokio::spawn(async move {
        let mut acknowledged = Vec::new();
        for seed in 0.. {
            if stop.is_cancelled() {
                break;
            }
            let bytes = data(seed + 1_000, 1_009 + (seed as usize * 7_919) % 20_011);
            let mut client = to_lb.clone();
            let offset = acknowledged.len() as u64;
            if let Err(status) = append_at(&mut client, &point, offset, &bytes).await {
                return Err((acknowledged.len(), status));
            }
            acknowledged.extend_from_slice(&bytes);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(acknowledged)
    })
}

/// What [`produce_through`] had acknowledged; a failed append fails the test.
async fn acknowledged_by(
    producer: tokio::task::JoinHandle<Result<Vec<u8>, (usize, tonic::Status)>>,
) -> Vec<u8> {
    match producer.await.unwrap() {
        Ok(acknowledged) => acknowledged,
        Err((at, status)) => panic!("an append through the balancer failed at {at}: {status:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_ride_through_the_failover_of_the_leader_they_write_to() {
    let mut cluster = Cluster::start(&["fr1", "fr2"]).await;
    let to_lb = cluster.start_balancer().await;
    let points = cluster.points_of("a", 2).await;
    let (uploaded, appended) = (points[0].clone(), points[1].clone());
    let writer = |client: Client| {
        let request = LocatePointRequest {
            point: appended.clone(),
            replicas: 1,
        };
        async move {
            let mut client = client;
            let located = client.locate_point(request).await.unwrap().into_inner();
            (located.owners[0].name.clone(), located.writer.unwrap().name)
        }
    };
    assert_eq!(writer(to_lb.clone()).await, ("a".into(), "a".into()));

    let stop = tokio_util::sync::CancellationToken::new();
    let producer = produce_through(to_lb.clone(), appended.clone(), stop.clone());

    // The upload, by the command line, to a.
    let file = cluster.root.path().join("upload.bin");
    let bytes = data(77, 40 * 1024 * 1024 + 4_099);
    std::fs::write(&file, &bytes).unwrap();
    let options = cluster.pki.client_options("root", &cluster.nodes["a"].rpc);
    let tls = options.tls.unwrap();
    let (ca, cert, key) = (tls.ca.display(), tls.cert.display(), tls.key.display());
    let args = format!(
        "put {} {uploaded} --addr {} --ca {ca} --cert {cert} --key {key}",
        file.display(),
        cluster.nodes["a"].rpc,
    );
    let put = tokio::process::Command::new(goutube_bin())
        .args(args.split(' '))
        .current_dir(cluster.root.path())
        .env_remove("GOUTUBE_CLIENT_ADDR")
        .kill_on_drop(true)
        .output();
    let mut put = tokio::spawn(put);

    // kill -9 of a once the upload is under way.
    let to_a = cluster.client("a").await;
    let under_way = eventually_within(
        "the upload to reach a few MiB on a",
        Duration::from_secs(60),
        || async {
            let mut to_a = to_a.clone();
            metadata(&mut to_a, &uploaded)
                .await
                .is_ok_and(|m| m.size >= 4 * 1024 * 1024)
        },
    );
    tokio::select! {
        () = under_way => {}
        put = &mut put => {
            let put = put.unwrap().expect("running goutube put");
            panic!("goutube put ended before the kill: {}{}", stdout(&put), stderr(&put));
        }
    }
    let held = metadata(&mut to_a.clone(), &uploaded).await.unwrap().size;
    assert!(
        held < bytes.len() as u64,
        "the upload ended before the kill"
    );
    cluster.nodes.remove("a").unwrap().kill();
    let killed = Instant::now();

    let put = put.await.unwrap().expect("running goutube put");
    eprintln!(
        "goutube put finished {:?} after the kill: {}{}",
        killed.elapsed(),
        stdout(&put),
        stderr(&put)
    );
    assert!(put.status.success(), "goutube put failed: {}", stderr(&put));
    // It was cut by the kill and resumed, on the new leader (or through a member that sent it
    // there).
    let said = stdout(&put);
    assert!(said.contains("time(s) after failures"), "{said}");
    // A while of appends on the new leader, then the producer stops.
    let group = eventually_some("a new leader for a's slot", || async {
        cluster.group("b", "a").await.filter(|g| g.leader != "a")
    })
    .await;
    let leader: &'static str = if group.leader == "fr1" { "fr1" } else { "fr2" };
    // LocatePoint names the ring's owner and the member that takes the writes now.
    for node in ["b", "lb"] {
        let client = cluster.client(node).await;
        eventually(&format!("{node} to locate the writer"), || async {
            writer(client.clone()).await == ("a".into(), leader.into())
        })
        .await;
    }
    let to_leader = cluster.client(leader).await;
    let held = || async {
        let mut client = to_leader.clone();
        metadata(&mut client, &appended).await.map_or(0, |m| m.size)
    };
    let before = held().await;
    eventually("the producer to append on the new leader", || async {
        producer.is_finished() || held().await > before
    })
    .await;
    stop.cancel();
    let acknowledged = acknowledged_by(producer).await;

    // Byte-exact on the new leader and on the other follower, which follows it.
    assert!(
        read_all(&to_leader, &uploaded).await == bytes,
        "the uploaded point is not the file"
    );
    assert!(
        read_all(&to_leader, &appended).await == acknowledged,
        "the appended point is not what was acknowledged"
    );
    let other: &'static str = if leader == "fr1" { "fr2" } else { "fr1" };
    let to_other = cluster.client(other).await;
    eventually("the other follower to hold the upload", || async {
        read_all(&to_other, &uploaded).await == bytes
    })
    .await;
    // Reads through the balancer, with the ring's owner still dead: the new leader answers
    // (its followers serve too), whole.
    let to_lb = cluster.client("lb").await;
    let meta = metadata(&mut to_lb.clone(), &appended).await.unwrap();
    assert_eq!(
        (meta.node.as_str(), meta.size),
        (leader, acknowledged.len() as u64),
        "the balancer's metadata"
    );
    assert!(
        read_all(&to_lb, &appended).await == acknowledged,
        "the appended point read through the balancer is not what was acknowledged"
    );
    assert!(
        read_all(&to_lb, &uploaded).await == bytes,
        "the uploaded point read through the balancer is not the file"
    );
    cluster.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planned_moves_hand_a_group_over_without_a_failed_write() {
    let mut cluster = Cluster::start(&["ft1", "ft2"]).await;
    let to_lb = cluster.start_balancer().await;
    let point = cluster.point_of("a").await;
    let stop = tokio_util::sync::CancellationToken::new();
    let producer = produce_through(to_lb.clone(), point.clone(), stop.clone());
    eventually("the producer to append on a", || async {
        producer.is_finished() || cluster.size("a", &point).await > 0
    })
    .await;
    let options = cluster.pki.client_options("root", &cluster.nodes["b"].rpc);
    let operator = goutube::client::Client::connect(&options).await.unwrap();
    let epoch = cluster.group("b", "a").await.unwrap().leader_epoch;

    // Only a member of the in-sync set may lead; only the leader hands its group over.
    let refused = operator
        .transfer("a", Some("b"), &options)
        .await
        .unwrap_err();
    assert!(
        refused.to_string().contains("not in the in-sync set"),
        "{refused}"
    );
    let refused = operator.transfer("ft1", None, &options).await.unwrap_err();
    assert!(
        refused.to_string().contains("leads no replica group"),
        "{refused}"
    );

    // An operator moves a's group to ft1 (asked through b), under the steady producer.
    let handed = operator.transfer("a", Some("ft1"), &options).await.unwrap();
    let transfer = &handed.transfers[..];
    assert_eq!(transfer.len(), 1, "{handed:?}");
    assert_eq!(
        (transfer[0].slot.as_str(), transfer[0].to.as_str()),
        ("a", "ft1")
    );
    eprintln!(
        "a held writes back {} ms to hand its group to ft1",
        transfer[0].held_ms
    );
    let group = eventually_some("b to see ft1 lead a's group", || async {
        cluster.group("b", "a").await.filter(|g| g.leader == "ft1")
    })
    .await;
    assert!(group.leader_epoch > epoch, "{group:?}");
    assert!(group.followers.contains(&"a".to_owned()), "{group:?}");
    // a sends writers to ft1, which takes the producer's appends.
    let mut to_a = cluster.client("a").await;
    let end = cluster.size("a", &point).await;
    let refused = append_at(&mut to_a, &point, end, b"x").await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(refused.message().contains("ft1"), "{}", refused.message());
    let before = cluster.size("ft1", &point).await;
    eventually("the producer to append on ft1", || async {
        producer.is_finished() || cluster.size("ft1", &point).await > before
    })
    .await;

    // Once a is back in the in-sync set, `goutube members transfer` hands the group back.
    eventually("a to be in ft1's in-sync set", || async {
        let group = cluster.group("b", "a").await;
        group.is_some_and(|g| g.in_sync.contains(&"a".to_owned()))
    })
    .await;
    let tls = options.tls.as_ref().unwrap();
    let (ca, cert, key) = (tls.ca.display(), tls.cert.display(), tls.key.display());
    let args = format!(
        "members transfer ft1 --to a --addr {} --ca {ca} --cert {cert} --key {key}",
        cluster.nodes["b"].rpc
    );
    let output = tokio::process::Command::new(goutube_bin())
        .args(args.split(' '))
        .env_remove("GOUTUBE_CLIENT_ADDR")
        .output()
        .await
        .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(
        stdout(&output).contains("a: led by a now"),
        "{}",
        stdout(&output)
    );
    let before = cluster.size("a", &point).await;
    eventually("the producer to append on a again", || async {
        producer.is_finished() || cluster.size("a", &point).await > before
    })
    .await;

    // A graceful stop of a hands its group over first: no session expires, nobody is fenced.
    eventually("both followers to be in a's in-sync set", || async {
        cluster.in_sync("b", "a").await == ["ft1", "ft2"]
    })
    .await;
    assert!(cluster.nodes.remove("a").unwrap().terminate());
    let group = eventually_some("a new leader for a's group", || async {
        cluster.group("b", "a").await.filter(|g| g.leader != "a")
    })
    .await;
    let fenced = cluster.metrics("b").await + &cluster.metrics("c").await;
    assert!(
        metric(&fenced, "goutube_failovers_total").unwrap_or(0.0) == 0.0,
        "a leader was fenced: the group was not handed over before the stop"
    );
    let leader: &'static str = if group.leader == "ft1" { "ft1" } else { "ft2" };
    let before = cluster.size(leader, &point).await;
    eventually("the producer to append on the new leader", || async {
        producer.is_finished() || cluster.size(leader, &point).await > before
    })
    .await;

    // Not one append failed, and every acknowledged byte is on the leader and its follower.
    stop.cancel();
    let acknowledged = acknowledged_by(producer).await;
    let to_leader = cluster.client(leader).await;
    assert!(read_all(&to_leader, &point).await == acknowledged);
    let other: &'static str = if leader == "ft1" { "ft2" } else { "ft1" };
    let to_other = cluster.client(other).await;
    eventually(
        "the other follower to hold every acknowledged byte",
        || async { read_all(&to_other, &point).await == acknowledged },
    )
    .await;
    cluster.stop();
}

/// A controller nemesis: the group's leader is killed, and so is the controller's leader while
/// the group leader's session runs out (before it could fence it), restarted at once on its
/// data. The next controller leader grants every member a full session before it fences
/// anyone, then names an in-sync follower: every acknowledged byte is on it and on the other
/// follower, and it takes writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_completes_when_the_controllers_leader_is_killed_midway() {
    let mut cluster = Cluster::new();
    for name in ["a", "b", "c"] {
        cluster.spawn_primary(name);
    }
    // The group whose leader is killed is led by a voter that does not lead the controller.
    let controller = cluster.controller_leader("a").await;
    let slot = ["a", "b", "c"]
        .into_iter()
        .find(|voter| *voter != controller)
        .unwrap();
    let third = ["a", "b", "c"]
        .into_iter()
        .find(|voter| ![slot, controller].contains(voter))
        .unwrap();
    cluster.follow(slot, &["fm1", "fm2"]).await;
    let point = cluster.point_of(slot).await;
    let to_slot = cluster.client(slot).await;
    let mut acknowledged = Acknowledged::written(&to_slot, &point, 8, 700).await;
    let epoch = cluster.group(third, slot).await.unwrap().leader_epoch;

    // The nemesis's schedule: kill -9 of the group's leader, then, half a session later (its
    // session running out: it expires a session after its last heartbeat, at most a sixth of a
    // session before the kill), of the controller's leader, restarted at once.
    cluster.nodes.remove(slot).unwrap().kill();
    let killed = Instant::now();
    tokio::time::sleep_until((killed + SESSION / 2).into()).await;
    assert!(
        cluster.group(third, slot).await.unwrap().leader == slot,
        "fenced before the controller's leader was killed: the nemesis came too late"
    );
    cluster.nodes.remove(controller).unwrap().kill();
    cluster.spawn_primary(controller);

    let group = eventually_some(
        &format!("the controller to name a new leader for {slot}'s slot"),
        || async {
            cluster
                .group(third, slot)
                .await
                .filter(|g| g.leader != slot)
        },
    )
    .await;
    eprintln!(
        "{} named {slot}'s leader {:?} after the kill",
        group.leader,
        killed.elapsed()
    );
    assert!(group.leader_epoch > epoch, "{group:?}");
    let leader: &'static str = if group.leader == "fm1" { "fm1" } else { "fm2" };
    let other: &'static str = if leader == "fm1" { "fm2" } else { "fm1" };
    assert_eq!(group.leader, leader);
    let to_leader = cluster.client(leader).await;
    acknowledged.check(&to_leader, &point, leader).await;
    let written = write_eventually(
        &to_leader,
        &point,
        acknowledged.bytes.len() as u64,
        701,
        "the new leader to acknowledge a write",
    )
    .await;
    acknowledged.bytes.extend_from_slice(&written);
    let to_other = cluster.client(other).await;
    eventually(
        "the other follower to hold every acknowledged byte",
        || async { read_all(&to_other, &point).await[..] == acknowledged.bytes[..] },
    )
    .await;
    acknowledged.check(&to_leader, &point, leader).await;
    cluster.stop();
}

/// The `kill -9` nemesis three times in a row: each round kills whichever member leads a's
/// group, checks that its successor serves every acknowledged byte and takes writes, and
/// starts the killed member again on its data, which follows the successor and enters its
/// in-sync set again before the next round. Three leader epochs are recorded in the point on
/// the way; a returning leader whose copy holds no tail it never had acknowledged has nothing
/// cut (its copy agrees with its successor's up to where the successor's epoch began), so no
/// node keeps anything in quarantine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_leaders_killed_in_turn_lose_no_acknowledged_byte_and_cut_nothing() {
    let mut cluster = Cluster::start(&["fa1", "fa2"]).await;
    let point = cluster.point_of("a").await;
    let mut leader: &'static str = "a";
    let to_a = cluster.client("a").await;
    let mut acknowledged = Acknowledged::written(&to_a, &point, 3, 2_000).await;
    // Where each leader's writes began, as every replica must record it: a's at its second
    // write (a point's first bytes record nothing), each successor's at its first.
    let first = cluster.group("b", "a").await.unwrap().leader_epoch;
    let mut began = vec![(first, 3_001)];
    for round in 0..3u64 {
        let killed = leader;
        let epoch = cluster.group("b", "a").await.unwrap().leader_epoch;
        cluster.nodes.remove(killed).unwrap().kill();
        let group = eventually_some("a new leader for a's slot", || async {
            cluster
                .group("b", "a")
                .await
                .filter(|g| g.leader != killed && g.leader_epoch > epoch)
        })
        .await;
        leader = ["a", "fa1", "fa2"]
            .into_iter()
            .find(|node| *node == group.leader)
            .expect("a member of a's group leads it");
        eprintln!(
            "round {round}: {killed} killed, {leader} leads at {}",
            group.leader_epoch
        );
        let to_leader = cluster.client(leader).await;
        acknowledged.check(&to_leader, &point, leader).await;
        let end = acknowledged.bytes.len() as u64;
        began.push((group.leader_epoch, end));
        let seed = 2_100 + round * 10;
        let written =
            write_eventually(&to_leader, &point, end, seed, "the new leader to write").await;
        acknowledged.bytes.extend_from_slice(&written);

        match killed {
            "a" => cluster.spawn_primary("a"),
            follower => {
                let replication = cluster.nodes[leader].addresses.replication;
                cluster.spawn_follower_of(follower, replication);
            }
        }
        eventually(
            &format!("{killed} to be in {leader}'s in-sync set again"),
            || async {
                cluster
                    .group("b", "a")
                    .await
                    .is_some_and(|g| g.leader == leader && g.in_sync.contains(&killed.to_owned()))
            },
        )
        .await;
        for i in 1..=2 {
            let bytes = data(seed + i, 5_003 + 1_999 * i as usize);
            assert!(acknowledged.append(&to_leader, &point, &bytes).await);
        }
    }
    for node in ["a", "fa1", "fa2"] {
        let client = cluster.client(node).await;
        acknowledged.check(&client, &point, node).await;
        let kept = cluster.quarantined(node, &point);
        assert!(kept.is_empty(), "{node} keeps {kept:?} in quarantine");
        let meta = cluster.data_file(node, &point).with_file_name("point.meta");
        let meta = goutube::point::inspect_meta(&meta).unwrap();
        let recorded: Vec<(u64, u64)> = meta["leader_epochs"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|start| {
                (
                    start["epoch"].as_u64().unwrap(),
                    start["start"].as_u64().unwrap(),
                )
            })
            .collect();
        assert_eq!(recorded, began, "{node}: {meta}");
    }
    cluster.stop();
}

/// A controller nemesis: every voter killed at once (each is also a group's leader), then
/// restarted on its data. The controller comes back with what it had committed: the groups,
/// their leaders and in-sync sets. a, back from an unclean stop, hands its group to an in-sync
/// follower. Every acknowledged byte is still served by the group's leader and its followers,
/// and the group takes writes again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_voter_killed_and_restarted_loses_no_group_and_no_acknowledged_byte() {
    let mut cluster = Cluster::start(&["fa1", "fa2"]).await;
    let point = cluster.point_of("a").await;
    let to_a = cluster.client("a").await;
    let mut acknowledged = Acknowledged::written(&to_a, &point, 8, 800).await;
    let before = cluster.group("fa1", "a").await.unwrap();

    for voter in ["a", "b", "c"] {
        cluster.nodes.remove(voter).unwrap().kill();
    }
    for voter in ["a", "b", "c"] {
        cluster.spawn_primary(voter);
    }
    // a's store was not stopped cleanly, and its in-sync followers are live: the controller
    // names one of them in its place (at once once a said it is back, or once a's session
    // expired had it taken longer to start than a session), at a newer epoch.
    let group = eventually_some(
        "the controller to name a new leader of a's group",
        || async {
            let group = cluster.group("b", "a").await?;
            let members = cluster.members("b").await?;
            let controller = members.controller?;
            (!controller.leader.is_empty() && group.leader != "a").then_some(group)
        },
    )
    .await;
    assert!(group.leader_epoch > before.leader_epoch, "{group:?}");
    assert!(["fa1", "fa2"].contains(&group.leader.as_str()), "{group:?}");
    let leader = ["fa1", "fa2"]
        .into_iter()
        .find(|node| *node == group.leader)
        .unwrap();
    let to_leader = cluster.client(leader).await;
    acknowledged.check(&to_leader, &point, leader).await;
    let written = write_eventually(
        &to_leader,
        &point,
        acknowledged.bytes.len() as u64,
        801,
        "the group's leader to acknowledge a write after the restart",
    )
    .await;
    acknowledged.bytes.extend_from_slice(&written);
    eventually("every replica to hold every acknowledged byte", || async {
        let mut all = true;
        for node in ["a", "fa1", "fa2"] {
            let client = cluster.client(node).await;
            all = all && read_all(&client, &point).await[..] == acknowledged.bytes[..];
        }
        all
    })
    .await;
    cluster.stop();
}

/// What a nemesis does to the tail of a follower's copy on disk.
#[derive(Debug, Clone, Copy)]
enum Damage {
    /// Its last 9,000 bytes are lost (beyond the last append whole: recovery cuts the copy back
    /// to an earlier append).
    Lost,
    /// A bit of its last append is flipped (recovery finds the append's CRC32C wrong and cuts
    /// it).
    Flipped,
}

/// A nemesis on a follower's disk: an in-sync follower crashes and the tail of its copy is
/// lost on disk (cut at its recovery), and the leader is killed before it could take the
/// follower out of its in-sync set. The follower comes back before the leader's session ran
/// out, and leaves every in-sync set before it takes a session (its store was not stopped
/// cleanly), so the controller names the other follower, which holds every acknowledged byte;
/// the damaged one follows it and holds them all again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_whose_tail_was_lost_on_disk_is_never_named_leader() {
    a_follower_with_a_damaged_tail_is_never_named_leader(Damage::Lost).await;
}

/// The same nemesis, a bit of the follower's last append flipped on disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_whose_tail_was_flipped_on_disk_is_never_named_leader() {
    a_follower_with_a_damaged_tail_is_never_named_leader(Damage::Flipped).await;
}

async fn a_follower_with_a_damaged_tail_is_never_named_leader(damage: Damage) {
    let mut cluster = Cluster::start(&["fa1", "fa2"]).await;
    let point = cluster.point_of("a").await;
    let to_a = cluster.client("a").await;
    let mut acknowledged = Acknowledged::written(&to_a, &point, 8, 900).await;
    eventually("fa1 to hold every acknowledged byte", || async {
        cluster.size("fa1", &point).await == acknowledged.bytes.len() as u64
    })
    .await;

    // fa1 crashes; its disk damages the tail of its copy.
    cluster.nodes.remove("fa1").unwrap().kill();
    match damage {
        Damage::Lost => cluster.lose_tail("fa1", &point, 9_000),
        Damage::Flipped => cluster.flip_in_tail("fa1", &point, 1_000),
    }
    // a is killed before it could take fa1 out of its in-sync set; fa1 restarts at once.
    let replication = cluster.nodes["a"].addresses.replication;
    cluster.nodes.remove("a").unwrap().kill();
    let killed = Instant::now();
    cluster.spawn_follower_of("fa1", replication);
    eventually("fa1 to hold a session again", || async {
        let scrape = cluster.metrics("fa1").await;
        metric(&scrape, SESSION_HELD) == Some(1.0)
    })
    .await;
    let group = cluster.group("b", "a").await.unwrap();
    assert_eq!(
        group.leader,
        "a",
        "fenced {:?} after the kill, before fa1 came back: the nemesis came too late",
        killed.elapsed()
    );
    assert_eq!(group.in_sync, ["fa2"], "fa1 holds a session: {group:?}");
    let mut to_fa1 = cluster.client("fa1").await;
    let held = metadata(&mut to_fa1, &point).await.unwrap();
    assert!(
        held.stored_size.unwrap() < acknowledged.bytes.len() as u64,
        "fa1's recovery cut its copy: {held:?}"
    );

    let group = eventually_some(
        "the controller to name a new leader for a's slot",
        || async { cluster.group("b", "a").await.filter(|g| g.leader != "a") },
    )
    .await;
    assert_eq!(group.leader, "fa2", "{group:?}");
    let to_fa2 = cluster.client("fa2").await;
    acknowledged.check(&to_fa2, &point, "fa2").await;
    let written = write_eventually(
        &to_fa2,
        &point,
        acknowledged.bytes.len() as u64,
        901,
        "fa2 to acknowledge a write",
    )
    .await;
    acknowledged.bytes.extend_from_slice(&written);
    let to_fa1 = cluster.client("fa1").await;
    eventually(
        "fa1 to follow fa2 and hold every acknowledged byte",
        || async { read_all(&to_fa1, &point).await[..] == acknowledged.bytes[..] },
    )
    .await;
    cluster.stop();
}

/// A leader killed and back at once, within its session, with the last 9,000 bytes of its
/// copy lost on disk: it would still lead, and its followers' longer copies would be cut to
/// its own. It takes no writes and serves no follower until the controller names a member of
/// its in-sync set leader (at once, without waiting for a session to expire), and follows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_whose_tail_was_lost_on_disk_hands_its_group_to_an_in_sync_member() {
    let mut cluster = Cluster::start(&["fa1", "fa2"]).await;
    let point = cluster.point_of("a").await;
    let to_a = cluster.client("a").await;
    let mut acknowledged = Acknowledged::written(&to_a, &point, 8, 1_300).await;
    let end = acknowledged.bytes.len() as u64;
    for follower in ["fa1", "fa2"] {
        eventually(
            &format!("{follower} to hold every acknowledged byte"),
            || async { cluster.size(follower, &point).await == end },
        )
        .await;
    }

    cluster.nodes.remove("a").unwrap().kill();
    cluster.lose_tail("a", &point, 9_000);
    cluster.spawn_primary("a");

    let group = eventually_some(
        "the controller to name a new leader for a's slot",
        || async { cluster.group("b", "a").await.filter(|g| g.leader != "a") },
    )
    .await;
    assert!(["fa1", "fa2"].contains(&group.leader.as_str()), "{group:?}");
    assert!(!group.leader_unclean, "{group:?}");
    let mut unclean = 0.0;
    for voter in ["a", "b", "c"] {
        let scrape = cluster.metrics(voter).await;
        unclean += metric_where(&scrape, FAILOVERS, "cause=\"unclean\"").unwrap_or(0.0);
    }
    assert_eq!(
        unclean, 1.0,
        "a was replaced because it came back unclean, not because its session expired (a \
         restart slower than a session defeats this test)"
    );

    let leader: &'static str = if group.leader == "fa1" { "fa1" } else { "fa2" };
    let to_leader = cluster.client(leader).await;
    acknowledged.check(&to_leader, &point, leader).await;
    let written = write_eventually(&to_leader, &point, end, 1_301, "the new leader to write").await;
    acknowledged.bytes.extend_from_slice(&written);
    let to_a = cluster.client("a").await;
    eventually(
        "a to follow the new leader and hold every acknowledged byte",
        || async { read_all(&to_a, &point).await[..] == acknowledged.bytes[..] },
    )
    .await;
    for follower in ["fa1", "fa2"] {
        let client = cluster.client(follower).await;
        acknowledged.check(&client, &point, follower).await;
    }
    cluster.stop();
}

/// A partition (network namespaces): the leader is cut from the controller's other voters and
/// from its followers, but not from its clients. It acknowledges nothing from the cut on, and
/// refuses writes once its session lapsed; the controller names an in-sync follower, which
/// holds every acknowledged byte and takes writes. Healed, the old leader follows it, its
/// unacknowledged tail replaced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_off_from_the_controller_and_its_followers_acknowledges_nothing_and_is_replaced()
 {
    let cluster = Cluster::start_partitionable(&["fa1", "fa2"]).await;
    let point = cluster.point_of("a").await;
    let to_a = cluster.client("a").await;
    let mut acknowledged = Acknowledged::written(&to_a, &point, 4, 1_400).await;
    let before = acknowledged.bytes.len();
    let others = ["b", "c", "fa1", "fa2"];
    cluster.cut("a", &others);

    // Clients still reach a and keep writing to it until the controller names another leader.
    let mut seed = 1_401;
    let mut refused = Vec::new();
    // The first write a stores, never acknowledged; the later ones are refused (its end moved
    // past their offset, or its session lapsed).
    let mut first_sent = None;
    let group = loop {
        if let Some(group) = cluster.group("b", "a").await.filter(|g| g.leader != "a") {
            break group;
        }
        let bytes = data(seed, 2_003 + seed as usize % 997);
        seed += 1;
        first_sent.get_or_insert_with(|| bytes.clone());
        let mut client = to_a.clone();
        let offset = acknowledged.bytes.len() as u64;
        let call = append_at(&mut client, &point, offset, &bytes);
        match tokio::time::timeout(Duration::from_secs(2), call).await {
            Ok(Ok(())) => panic!("a acknowledged a write after it was cut off"),
            Ok(Err(status)) => refused.push(status),
            Err(_) => {}
        }
    };
    assert_eq!(acknowledged.bytes.len(), before);
    assert!(
        refused
            .iter()
            .any(|status| status.code() == Code::Unavailable
                && status.message().contains("session with the controller")),
        "a refused writes once its session lapsed: {refused:?}"
    );
    let scrape = cluster.metrics("a").await;
    assert!(metric(&scrape, SELF_FENCED).unwrap_or(0.0) >= 1.0);

    assert!(["fa1", "fa2"].contains(&group.leader.as_str()), "{group:?}");
    let leader: &'static str = if group.leader == "fa1" { "fa1" } else { "fa2" };
    let to_leader = cluster.client(leader).await;
    acknowledged.check(&to_leader, &point, leader).await;
    let end = acknowledged.bytes.len() as u64;
    let written = write_eventually(&to_leader, &point, end, seed, "the new leader to write").await;
    acknowledged.bytes.extend_from_slice(&written);

    cluster.heal("a", &others);
    eventually(
        "a to follow the new leader and hold every acknowledged byte, and nothing else",
        || async { read_all(&to_a, &point).await[..] == acknowledged.bytes[..] },
    )
    .await;
    // What a stored and never acknowledged was cut where the new leader's epoch began, and
    // kept in its quarantine; the rest of its copy was kept and continued.
    let kept = cluster.quarantined("a", &point);
    assert_eq!(kept.len(), 1, "a's quarantine: {kept:?}");
    let (name, tail) = &kept[0];
    assert!(name.ends_with(&format!("+{end}")), "{name}");
    assert!(
        Some(tail) == first_sent.as_ref(),
        "a's quarantine holds {} bytes, not the first write it stored",
        tail.len()
    );
    let scrape = cluster.metrics("a").await;
    assert_eq!(metric(&scrape, CUT_BYTES), Some(tail.len() as f64));
    let mut client = to_a.clone();
    let status = append_at(&mut client, &point, acknowledged.bytes.len() as u64, b"x")
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains(leader), "{status:?}");
    for node in ["fa1", "fa2"] {
        let client = cluster.client(node).await;
        acknowledged.check(&client, &point, node).await;
    }
    cluster.stop();
}

/// Consumers read up to the committed end. a acknowledges a write once both its followers
/// confirmed it (`ack = { replicas = 2 }`); with fa2 paused, a write is stored on a and on fa1
/// but not acknowledged, and neither serves it — not `ConsumeStream`, not a consumer following
/// the point, not the HTTP gateway, not `size` — so no consumer sees bytes a failover could
/// cut. Once fa2 confirms, a commits them and tells its followers, and every consumer gets them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_are_served_only_what_is_committed() {
    let mut cluster = Cluster::new();
    cluster.spawn(
        "a",
        "role = \"leader\"\n[controller]\nvoters = [\"a\", \"b\", \"c\"]\n\
         [replication]\nack = { replicas = 2 }\nack_timeout_ms = 1000",
    );
    for name in ["b", "c"] {
        cluster.spawn_primary(name);
    }
    cluster.follow("a", &["fa1", "fa2"]).await;
    let point = cluster.point_of("a").await;
    let to_a = cluster.client("a").await;
    let mut acknowledged = Acknowledged::written(&to_a, &point, 3, 1_500).await;
    let committed = acknowledged.bytes.clone();
    let end = committed.len() as u64;
    let to_fa1 = cluster.client("fa1").await;
    eventually("fa1 to serve every acknowledged byte", || async {
        cluster.size("fa1", &point).await == end
    })
    .await;

    // A consumer follows the point on a from its end.
    let (seen, mut arrived) = tokio::sync::mpsc::unbounded_channel();
    let follower_of_a = {
        let mut client = to_a.clone();
        let request = goutube::proto::ConsumeRequest {
            follow: true,
            ..window(&point, end, 0, 0)
        };
        let mut stream = client.consume_stream(request).await.unwrap().into_inner();
        tokio::spawn(async move {
            while let Ok(Some(response)) = stream.message().await {
                let _ = seen.send(response.frame);
            }
        })
    };

    // fa2 pauses: a stores the write and fa1 confirms it, but it is not acknowledged.
    cluster.nodes["fa2"].signal("STOP");
    let unacknowledged = data(1_599, 6_007);
    assert!(!acknowledged.append(&to_a, &point, &unacknowledged).await);
    let stored = end + unacknowledged.len() as u64;
    let mut client = to_a.clone();
    let meta = metadata(&mut client, &point).await.unwrap();
    assert_eq!(
        (meta.size, meta.stored_size),
        (end, Some(stored)),
        "{meta:?}"
    );
    assert_eq!(
        read_all(&to_a, &point).await,
        committed,
        "ConsumeStream on a"
    );
    let gateway = cluster.nodes["a"].addresses.http;
    let https = Some(cluster.pki.https(Some("root")));
    let target = format!("/v1/points/{}", url_path(&point));
    let answer = http(gateway, "GET", &target, &[], https.clone()).await;
    assert_eq!(
        (answer.status, &answer.body),
        (200, &committed),
        "HTTP on a"
    );
    eventually("fa1 to store the write", || async {
        let mut client = to_fa1.clone();
        let meta = metadata(&mut client, &point).await.unwrap();
        meta.stored_size == Some(stored)
    })
    .await;
    assert_eq!(
        cluster.size("fa1", &point).await,
        end,
        "fa1's committed end"
    );
    assert_eq!(
        read_all(&to_fa1, &point).await,
        committed,
        "ConsumeStream on fa1"
    );
    assert!(
        arrived.try_recv().is_err(),
        "the consumer following a got bytes that are not committed"
    );

    // fa2 resumes and confirms: the write is committed on a, then on its followers.
    cluster.nodes["fa2"].signal("CONT");
    let whole = [committed.clone(), unacknowledged.clone()].concat();
    for node in ["a", "fa1", "fa2"] {
        eventually(
            &format!("{node} to serve the write once committed"),
            || async { cluster.size(node, &point).await == stored },
        )
        .await;
        let client = cluster.client(node).await;
        assert_eq!(read_all(&client, &point).await, whole, "{node}");
    }
    let answer = http(gateway, "GET", &target, &[], https).await;
    assert_eq!(answer.body, whole, "HTTP on a");
    let mut followed = Vec::new();
    eventually_within(
        "the consumer following a to get the write",
        Duration::from_secs(10),
        || {
            while let Ok(frame) = arrived.try_recv() {
                followed.extend_from_slice(&frame);
            }
            let done = followed == unacknowledged;
            async move { done }
        },
    )
    .await;
    follower_of_a.abort();
    cluster.stop();
}

/// Runs `goutube members ARGS` as an operator (`root`), asked of node `at`; returns its output.
async fn members_command(cluster: &Cluster, at: &str, args: &str) -> std::process::Output {
    let options = cluster.pki.client_options("root", &cluster.nodes[at].rpc);
    let tls = options.tls.as_ref().unwrap();
    let (ca, cert, key) = (tls.ca.display(), tls.cert.display(), tls.key.display());
    let args = format!(
        "members {args} --addr {} --ca {ca} --cert {cert} --key {key}",
        cluster.nodes[at].rpc
    );
    tokio::process::Command::new(goutube_bin())
        .args(args.split(' '))
        .env_remove("GOUTUBE_CLIENT_ADDR")
        .output()
        .await
        .unwrap()
}

/// An operator's unclean election: a's only follower left the in-sync set while it was down,
/// and a is lost meanwhile, so the controller has nobody to name. `goutube members elect a
/// --to fa --unclean` names fa (refused while a is live, and without --unclean); fa takes the
/// slot's writes; a, back, follows it, and the bytes only a held are gone (fa's copy replaces
/// a's), as the operator was warned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_names_a_leader_outside_the_in_sync_set_once_warned() {
    let mut cluster = Cluster::start(&["fa"]).await;
    let point = cluster.point_of("a").await;
    let to_a = cluster.client("a").await;
    let mut acknowledged = Acknowledged::written(&to_a, &point, 4, 1_100).await;
    let scrape = cluster.metrics("a").await;
    assert_eq!(
        metric(&scrape, UNDER_REPLICATED),
        Some(0.0),
        "fa is in sync"
    );
    let options = cluster.pki.client_options("root", &cluster.nodes["b"].rpc);
    let operator = goutube::client::Client::connect(&options).await.unwrap();
    let refused = operator.elect_unclean("a", "fa").await.unwrap_err();
    assert!(
        refused.to_string().contains("a, the leader of a, is live"),
        "{refused}"
    );

    // fa goes; a takes it out of its in-sync set, then stores a write it cannot acknowledge
    // (no follower confirms it) before it is lost too.
    let replication = cluster.nodes["a"].addresses.replication;
    cluster.nodes.remove("fa").unwrap().kill();
    eventually("fa to leave a's in-sync set", || async {
        cluster.in_sync("b", "a").await.is_empty()
    })
    .await;
    eventually("a to count its group under-replicated", || async {
        let scrape = cluster.metrics("a").await;
        metric(&scrape, UNDER_REPLICATED) == Some(1.0)
    })
    .await;
    let unacknowledged = data(1_199, 7_001);
    assert!(!acknowledged.append(&to_a, &point, &unacknowledged).await);
    let end = acknowledged.bytes.len() as u64;
    let mut client = to_a.clone();
    let meta = metadata(&mut client, &point).await.unwrap();
    let stored = end + unacknowledged.len() as u64;
    assert_eq!(
        (meta.size, meta.stored_size),
        (end, Some(stored)),
        "{meta:?}"
    );
    cluster.nodes.remove("a").unwrap().kill();
    cluster.spawn_follower_of("fa", replication);
    eventually("b to see a dead and fa live", || async {
        !cluster.sees_live("b", "a").await && cluster.sees_live("b", "fa").await
    })
    .await;

    // Nobody to name: the operator decides, and must say that it may lose data.
    let output = members_command(&cluster, "b", "elect a --to fa").await;
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("run it again with --unclean"),
        "{}",
        stderr(&output)
    );
    let output = members_command(&cluster, "b", "elect a --to fa --unclean").await;
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(stderr(&output).contains("warning"), "{}", stderr(&output));
    assert!(
        stdout(&output).contains("a: led by fa now"),
        "{}",
        stdout(&output)
    );
    let group = cluster.group("b", "a").await.unwrap();
    assert_eq!(group.leader, "fa", "{group:?}");
    assert!(group.in_sync.is_empty(), "{group:?}");

    // a comes back as fa's follower; fa acknowledges once a confirmed, and a's copy is fa's.
    cluster.spawn_primary("a");
    let to_fa = cluster.client("fa").await;
    acknowledged.check(&to_fa, &point, "fa").await;
    let written = write_eventually(&to_fa, &point, end, 1_101, "fa to acknowledge a write").await;
    acknowledged.bytes.extend_from_slice(&written);
    let to_a = cluster.client("a").await;
    eventually("a to hold fa's copy, without its own tail", || async {
        read_all(&to_a, &point).await[..] == acknowledged.bytes[..]
    })
    .await;
    // a's copy was cut back to where fa's epoch began: the tail it never acknowledged, and
    // only that, is kept in its quarantine.
    let kept = cluster.quarantined("a", &point);
    assert_eq!(kept.len(), 1, "a's quarantine: {kept:?}");
    let (name, tail) = &kept[0];
    assert!(name.ends_with(&format!("+{end}")), "{name}");
    assert!(
        tail[..] == unacknowledged[..],
        "a's quarantine holds {} bytes",
        tail.len()
    );
    let scrape = cluster.metrics("a").await;
    assert_eq!(metric(&scrape, QUARANTINED_POINTS), Some(1.0));
    assert_eq!(
        metric(&scrape, CUT_BYTES),
        Some(unacknowledged.len() as f64)
    );
    cluster.stop();
}
