//! Automatic failover (docs/failover.md), on real processes with mTLS: three primaries that are
//! the controller's voters, each acknowledging a produce once its in-sync followers confirmed it
//! (`ack = { replicas = 1 }`, `fsync = "always"`), and followers as child processes too, so
//! that any of them can be killed or stopped.
//!
//! Sessions: a group leader that cannot reach the controller stops taking writes before the
//! controller could find its session expired, and takes them again once it has a session.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use goutube::metrics::{SELF_FENCED, SESSION_HELD};
use goutube::proto::{ListMembersRequest, ListMembersResponse};
use goutube_tests::{
    DEADLINE, NodeProcess, Pki, append_at, data, eventually, eventually_some, http, metric,
    owner_through, write_node_config,
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
}

impl Cluster {
    fn new() -> Cluster {
        Cluster {
            root: tempfile::tempdir().unwrap(),
            pki: Pki::new(),
            nodes: BTreeMap::new(),
        }
    }

    /// Primaries a, b, c, and follower `fa` of a; once the ring is formed and `fa` is in a's
    /// in-sync set.
    async fn start() -> Cluster {
        let mut cluster = Cluster::new();
        for name in ["a", "b", "c"] {
            cluster.spawn_primary(name);
        }
        cluster.spawn_follower("fa", "a");
        eventually("fa to be in a's in-sync set", || async {
            cluster.in_sync("a", "a").await == ["fa"]
        })
        .await;
        cluster
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
        let config = write_node_config(
            &dir,
            name,
            &format!(
                "seed_addresses = {}\n{settings}\n[storage]\nfsync = \"always\"\n{}\
                 bootstrap_expect = 3\n",
                self.seeds(),
                self.pki.node_toml(name)
            ),
        );
        self.nodes.insert(name, NodeProcess::spawn(&config));
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
        self.spawn(
            name,
            &format!("role = \"follower\"\nleader_addresses = [\"{replication}\"]"),
        );
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
        let client = self.client(owner).await;
        for i in 0.. {
            let point = format!("failover/{owner}/{i}");
            if owner_through(client.clone(), &point).await == owner {
                return point;
            }
        }
        unreachable!()
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

    fn stop(self) {
        for (name, node) in self.nodes {
            assert!(node.terminate(), "{name}: a graceful stop");
        }
    }
}

/// Appends bytes made from `seed` to `point` at `offset` through `client` until a write is
/// acknowledged; returns how many bytes it wrote.
async fn write_eventually(client: &Client, point: &str, offset: u64, seed: u64, what: &str) -> u64 {
    eventually_some(what, || {
        let (mut client, point, bytes) = (client.clone(), point.to_owned(), data(seed, 10_007));
        async move {
            let appended = append_at(&mut client, &point, offset, &bytes).await;
            appended.ok().map(|()| bytes.len() as u64)
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_without_a_session_takes_no_writes_until_it_has_one_again() {
    let mut cluster = Cluster::start().await;
    let point = cluster.point_of("a").await;
    let mut client = cluster.client("a").await;
    // Acknowledged writes while a holds its session.
    let mut chunk = 0u64;
    let mut written = write_eventually(&client, &point, 0, chunk, "a to acknowledge a write").await;

    // The two other voters go: a cannot reach a controller quorum, so nobody answers its
    // heartbeats. It must stop acknowledging writes before the controller could find its
    // session expired: within a session of its last heartbeat, so within a session of now.
    cluster.nodes.remove("b").unwrap().kill();
    cluster.nodes.remove("c").unwrap().kill();
    let cut = Instant::now();
    let refusal = loop {
        chunk += 1;
        let bytes = data(chunk, 10_007);
        match append_at(&mut client, &point, written, &bytes).await {
            Ok(()) => {
                assert!(
                    cut.elapsed() < SESSION,
                    "a write was acknowledged {:?} after the controller became unreachable",
                    cut.elapsed()
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
    // The gauge follows at the end of the heartbeat round that found no controller.
    eventually("a to report its session lapsed", || async {
        let scrape = cluster.metrics("a").await;
        metric(&scrape, SESSION_HELD) == Some(0.0)
            && metric(&scrape, SELF_FENCED).is_some_and(|n| n >= 1.0)
    })
    .await;

    // One voter back: a quorum, a session, and writes again.
    cluster.spawn_primary("b");
    written += write_eventually(
        &client,
        &point,
        written,
        chunk + 1,
        "a to take writes again",
    )
    .await;
    assert!(written > 0);
    let scrape = cluster.metrics("a").await;
    assert_eq!(metric(&scrape, SESSION_HELD), Some(1.0));
    cluster.stop();
}
