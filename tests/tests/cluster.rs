//! A real cluster of `goutube run` processes on 127.0.0.1 with mTLS and a sealed gossip: formed
//! by seeds alone, writes routed to owners, a fourth primary handed its points as it joins, a kill that
//! moves nothing, a restart, a node without the key; and placement that fails closed.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use goutube::client::{Redirect, owner_of};
use goutube::config::PluginSection;
use goutube::proto::streaming_client::StreamingClient;
use goutube::proto::{ListMembersRequest, ListMembersResponse, LocatePointRequest};
use goutube::proto::{OWNER_ADDR_METADATA, OWNER_METADATA};
use goutube_tests::{
    DEADLINE, NodeProcess, Pki, TestNode, consume, data, metadata, produce, window,
    write_node_config,
};
use tempfile::TempDir;
use tonic::Code;
use tonic::transport::Channel;

/// The kill detection bound of the default gossip settings (docs/cluster.md).
const DETECTION: Duration = Duration::from_secs(3);
/// Formation by seeds, once every node serves.
const FORMATION: Duration = Duration::from_secs(2);

struct Cluster {
    root: TempDir,
    pki: Pki,
    key_file: PathBuf,
    nodes: BTreeMap<&'static str, NodeProcess>,
}

impl Cluster {
    fn new() -> Cluster {
        let root = tempfile::tempdir().unwrap();
        let key_file = root.path().join("cluster.key");
        std::fs::write(&key_file, "a cluster key that is long enough\n").unwrap();
        Cluster {
            root,
            pki: Pki::new(),
            key_file,
            nodes: BTreeMap::new(),
        }
    }

    /// Starts (or restarts, on its data) node `name` with `bootstrap_expect = 3`; `settings` are
    /// top-level keys.
    fn spawn(&mut self, name: &'static str, settings: &str) {
        self.spawn_with_key(name, settings, &self.key_file.clone());
    }

    fn spawn_with_key(&mut self, name: &'static str, settings: &str, key_file: &std::path::Path) {
        let dir = self.root.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let tls = self.pki.node(name);
        let config = write_node_config(
            &dir,
            name,
            &format!(
                "{settings}\n[cluster]\nbootstrap_expect = 3\nkey_file = {key_file:?}\n[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n",
                tls.ca, tls.cert, tls.key
            ),
        );
        self.nodes.insert(name, NodeProcess::spawn(&config));
    }

    fn seeds(&self) -> String {
        format!(
            "seed_addresses = [\"{}\"]",
            self.nodes["a"].addresses.gossip
        )
    }

    fn rpc(&self, name: &str) -> String {
        self.nodes[name].rpc.clone()
    }

    async fn client(&self, name: &str) -> StreamingClient<Channel> {
        self.pki.client("root", &self.rpc(name)).await
    }

    async fn members(&self, name: &str) -> ListMembersResponse {
        self.client(name)
            .await
            .list_members(ListMembersRequest {})
            .await
            .unwrap()
            .into_inner()
    }

    /// Owner (name, address) of `point`, as node `at` locates it.
    async fn owner(&self, at: &str, point: &str) -> (String, String) {
        let located = self
            .client(at)
            .await
            .locate_point(LocatePointRequest {
                point: point.into(),
                replicas: 1,
            })
            .await
            .unwrap()
            .into_inner();
        let owner = located.owners.into_iter().next().unwrap();
        (owner.name, owner.rpc_addr)
    }

    /// Waits until every node of `at` sees exactly `live` alive; returns how long it took.
    async fn until_live(&self, at: &[&str], live: &[&str], bound: Duration) -> Duration {
        let started = Instant::now();
        loop {
            let mut all = true;
            for node in at {
                let members = self.members(node).await;
                let seen: Vec<&str> = members
                    .members
                    .iter()
                    .filter(|m| m.live)
                    .map(|m| m.name.as_str())
                    .collect();
                all &= seen == live;
            }
            if all {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < bound,
                "{at:?} did not see exactly {live:?} alive within {bound:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn state(members: &ListMembersResponse, name: &str) -> (String, bool, bool) {
    let member = members
        .members
        .iter()
        .find(|m| m.name == name)
        .unwrap_or_else(|| panic!("{name} is not listed: {members:?}"));
    (member.state.clone(), member.live, member.owns_range)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_formed_by_seeds_routes_writes_to_owners_and_loses_nothing_to_a_kill() {
    let mut cluster = Cluster::new();
    cluster.spawn("a", "role = \"leader\"");
    let seeds = cluster.seeds();
    let leader_replication = cluster.nodes["a"].addresses.replication;
    cluster.spawn("b", &seeds);
    cluster.spawn("c", &seeds);
    cluster.spawn(
        "f",
        &format!("{seeds}\nrole = \"follower\"\nleader_addresses = [\"{leader_replication}\"]"),
    );
    let all = ["a", "b", "c", "f"];

    // Every node serves; then they converge to one view and one ring of the three primaries.
    for node in all {
        let options = cluster.pki.client_options("root", &cluster.rpc(node));
        goutube_tests::eventually("the node serves", || async {
            match goutube::client::Client::connect(&options).await {
                Ok(client) => client.members().await.is_ok(),
                Err(_) => false,
            }
        })
        .await;
    }
    let started = Instant::now();
    loop {
        let views: Vec<ListMembersResponse> = {
            let mut views = Vec::new();
            for node in all {
                views.push(cluster.members(node).await);
            }
            views
        };
        let converged = views.iter().all(|v| {
            v.view == views[0].view
                && !v.ring.is_empty()
                && v.members.iter().filter(|m| m.live).count() == 4
                && ["a", "b", "c"]
                    .iter()
                    .all(|n| state(v, n) == ("active".into(), true, true))
        });
        if converged {
            break;
        }
        assert!(
            started.elapsed() < FORMATION,
            "no common view within {FORMATION:?}: {views:#?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let formed = started.elapsed();
    let members = cluster.members("f").await;
    let follower = members.members.iter().find(|m| m.name == "f").unwrap();
    assert_eq!(
        (follower.role.as_str(), follower.in_ring),
        ("follower", false)
    );
    eprintln!("formed and converged in {formed:?}");

    // Every node locates points alike; writes land on the owner, elsewhere they are refused
    // with the owner in the status metadata.
    let mut owned: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for i in 0..60 {
        let point = format!("videos/{i}");
        let (owner, address) = cluster.owner("a", &point).await;
        for node in ["b", "c", "f"] {
            assert_eq!(
                cluster.owner(node, &point).await,
                (owner.clone(), address.clone())
            );
        }
        assert_eq!(address, cluster.rpc(&owner));
        owned.entry(owner).or_default().push(point);
    }
    assert_eq!(
        owned.len(),
        3,
        "60 points spread over the three primaries: {owned:?}"
    );
    // Until the follower has reached its leader, it answers writes `Unavailable` (it cannot
    // name the owner yet); the redirects below are asked of it after that.
    goutube_tests::eventually("f reaches its leader", || async {
        let refused = produce(&mut cluster.client("f").await, "probe/f", &[vec![1]])
            .await
            .expect_err("a follower takes no writes");
        refused.code() == Code::FailedPrecondition
    })
    .await;
    for (owner, points) in &owned {
        for (i, point) in points.iter().enumerate().take(4) {
            let bytes = data(i as u64 * 31 + 7, 1000 + i * 997);
            for node in ["a", "b", "c", "f"].iter().filter(|n| **n != owner) {
                let status = produce(
                    &mut cluster.client(node).await,
                    point,
                    std::slice::from_ref(&bytes),
                )
                .await
                .unwrap_err();
                assert_eq!(
                    status.code(),
                    Code::FailedPrecondition,
                    "{node}: {status:?}"
                );
                if *node != "f" {
                    assert_eq!(
                        status.metadata().get(OWNER_METADATA).unwrap(),
                        owner.as_str()
                    );
                    assert_eq!(
                        status.metadata().get(OWNER_ADDR_METADATA).unwrap(),
                        cluster.rpc(owner).as_str()
                    );
                    assert_eq!(
                        owner_of(&status),
                        Some(Redirect {
                            member: owner.clone(),
                            rpc_addr: cluster.rpc(owner)
                        })
                    );
                }
            }
            produce(
                &mut cluster.client(owner).await,
                point,
                std::slice::from_ref(&bytes),
            )
            .await
            .unwrap();
            let read = consume(&mut cluster.client(owner).await, window(point, 0, 0, 0))
                .await
                .unwrap();
            assert_eq!(read.concat(), bytes);
        }
    }

    // `goutube put` through a node that does not own the point lands on the owner.
    let (owner, others) = ("b", ["a", "c"]);
    let point = &owned[owner][10];
    let file = cluster.root.path().join("upload.bin");
    let upload = data(99, 300_000);
    std::fs::write(&file, &upload).unwrap();
    let client_tls = cluster.pki.client_options("root", &cluster.rpc(others[0]));
    let tls = client_tls.tls.unwrap();
    let output = std::process::Command::new(goutube_tests::goutube_bin())
        .arg("put")
        .arg(&file)
        .arg(point)
        .args(["--addr", &cluster.rpc(others[0])])
        .arg("--ca")
        .arg(&tls.ca)
        .arg("--cert")
        .arg(&tls.cert)
        .arg("--key")
        .arg(&tls.key)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains(&format!("written to member {owner}")),
        "{stdout}"
    );
    assert!(
        stdout.contains("(verified: the point is the file)"),
        "{stdout}"
    );
    let meta = metadata(&mut cluster.client(owner).await, point)
        .await
        .unwrap();
    assert_eq!(
        (meta.size, meta.crc32c),
        (upload.len() as u64, crc32c::crc32c(&upload))
    );
    // The others do not hold it: they send readers to its owner.
    for other in others {
        let status = metadata(&mut cluster.client(other).await, point)
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
        assert_eq!(
            goutube::client::owner_of(&status).map(|owner| owner.member),
            Some(owner.to_owned())
        );
    }

    // A fourth primary joins the ring: `joining`, owning nothing, until the owners have handed
    // it the points it will own (docs/resharding.md); then `active` everywhere.
    let before = goutube_tests::ring_epoch(cluster.client("a").await).await;
    cluster.spawn("d", &seeds);
    let all = ["a", "b", "c", "d", "f"];
    cluster.until_live(&all, &all, DEADLINE).await;
    for node in all {
        goutube_tests::eventually("d to be active in every ring", || async {
            let members = cluster.members(node).await;
            state(&members, "d") == ("active".into(), true, true)
        })
        .await;
    }
    // The written points that d owns now were handed to it: same bytes, at the epoch of the
    // controller's decision (above the ring's before d came); their old owner redirects writes
    // to d. The others stay where they were.
    let mut handed = 0;
    for (old, points) in &owned {
        for (i, point) in points.iter().enumerate().take(4) {
            let bytes = data(i as u64 * 31 + 7, 1000 + i * 997);
            let now = cluster.owner("a", point).await.0;
            let meta = metadata(&mut cluster.client(&now).await, point)
                .await
                .unwrap();
            assert_eq!(meta.size, bytes.len() as u64, "{point} on {now}");
            assert_eq!(meta.crc32c, crc32c::crc32c(&bytes), "{point} on {now}");
            if now == *old {
                assert_eq!(meta.epoch, 1, "{point}");
                continue;
            }
            assert_eq!(now, "d", "{point} moved from {old}");
            assert!(meta.epoch > before, "{point}: {} <= {before}", meta.epoch);
            let status = produce(&mut cluster.client(old).await, point, &[data(1, 10)])
                .await
                .unwrap_err();
            assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
            assert_eq!(status.metadata().get(OWNER_METADATA).unwrap(), "d");
            handed += 1;
        }
    }
    eprintln!("{handed} of the 12 written points were handed to d");

    // kill -9 of c: it leaves every live view within the detection bound, stays the owner of
    // its range (writes there: Unavailable naming it), and nobody takes its points.
    let mut c_points = Vec::new();
    for point in owned["c"].iter().take(4) {
        if cluster.owner("a", point).await.0 == "c" {
            c_points.push(point.clone());
        }
    }
    assert!(!c_points.is_empty(), "c kept none of its written points");
    let c_bytes: Vec<Vec<u8>> = {
        let mut bytes = Vec::new();
        for point in &c_points {
            let read = consume(&mut cluster.client("c").await, window(point, 0, 0, 0))
                .await
                .unwrap();
            bytes.push(read.concat());
        }
        bytes
    };
    cluster.nodes.remove("c").unwrap().kill();
    let after = ["a", "b", "d", "f"];
    let detected = cluster.until_live(&after, &after, DETECTION).await;
    eprintln!("the kill was detected everywhere in {detected:?}");
    let members = cluster.members("a").await;
    assert_eq!(state(&members, "c"), ("active".into(), false, true));
    assert_eq!(cluster.owner("b", &c_points[0]).await.0, "c");
    let status = produce(&mut cluster.client("a").await, &c_points[0], &[data(5, 10)])
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("member c"),
        "{}",
        status.message()
    );
    assert_eq!(status.metadata().get(OWNER_METADATA).unwrap(), "c");

    // Restarted on its data, c is the same owner with the same bytes.
    cluster.spawn("c", &seeds);
    let all = ["a", "b", "c", "d", "f"];
    cluster.until_live(&all, &all, DEADLINE).await;
    let members = cluster.members("b").await;
    assert_eq!(state(&members, "c"), ("active".into(), true, true));
    for (point, bytes) in c_points.iter().zip(&c_bytes) {
        let read = consume(&mut cluster.client("c").await, window(point, 0, 0, 0))
            .await
            .unwrap();
        assert_eq!(&read.concat(), bytes, "{point}");
    }
    let more = data(77, 4096);
    let record = produce(
        &mut cluster.client("c").await,
        &c_points[0],
        std::slice::from_ref(&more),
    )
    .await
    .unwrap();
    assert_eq!(
        record.records[0].end,
        (c_bytes[0].len() + more.len()) as u64
    );

    // A graceful stop (SIGTERM) leaves every live view within 2 s, and the ring not at all.
    let stopping = Instant::now();
    assert!(cluster.nodes.remove("d").unwrap().terminate());
    let all = ["a", "b", "c", "f"];
    let bound = Duration::from_secs(2).saturating_sub(stopping.elapsed());
    cluster.until_live(&all, &all, bound).await;
    eprintln!(
        "the graceful stop was seen by all {:?} after SIGTERM",
        stopping.elapsed()
    );
    let members = cluster.members("a").await;
    assert_eq!(state(&members, "d"), ("active".into(), false, true));

    // A node with another cluster key never appears in anyone's view.
    let wrong_key = cluster.root.path().join("wrong.key");
    std::fs::write(&wrong_key, "not the key of this cluster at all").unwrap();
    cluster.spawn_with_key("e", &seeds, &wrong_key);
    let started = Instant::now();
    while started.elapsed() < DETECTION {
        for node in all {
            let members = cluster.members(node).await;
            assert!(
                members.members.iter().all(|m| m.name != "e"),
                "{node} sees e"
            );
        }
        let members = cluster.members("e").await;
        assert_eq!(members.members.iter().filter(|m| m.live).count(), 1);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    for (_, node) in std::mem::take(&mut cluster.nodes) {
        assert!(node.terminate());
    }
}

fn misbehaving_placement(mode: &str) -> PluginSection {
    PluginSection {
        source: PathBuf::from(goutube::plugins::builtin::BUILD_DIR)
            .join("misbehaving_placement.wasm")
            .display()
            .to_string(),
        config: mode.into(),
        ..PluginSection::default()
    }
}

/// A placement plugin that answers nothing, strangers, twice the same member, a name of 10 000
/// characters, or traps: writes fail closed with `Unavailable` naming the plugin, in a bounded
/// message, and the node keeps serving reads.
#[tokio::test]
async fn placement_that_answers_wrong_makes_writes_fail_closed() {
    for (mode, says, says_for_two) in [
        ("empty", "answered no owner", "answered no owner"),
        (
            "stranger",
            "not a member of the ring",
            "not a member of the ring",
        ),
        ("twice", "2 owners where at most 1", "twice"),
        (
            "long",
            "not a member of the ring",
            "not a member of the ring",
        ),
        ("trap", "trapped", "trapped"),
    ] {
        let node = TestNode::start(|c| c.plugins.placement = misbehaving_placement("")).await;
        let mut client = node.client().await;
        produce(&mut client, "kept", &[data(1, 500)]).await.unwrap();
        let mut config = node.node.config().clone();
        config.plugins.placement = misbehaving_placement(mode);
        node.node.reload(&config).await.unwrap();
        let status = produce(&mut client, "refused", &[data(2, 500)])
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{mode}: {status:?}");
        assert!(
            status.message().contains(says),
            "{mode}: {}",
            status.message()
        );
        assert!(
            status.message().contains("misbehaving_placement.wasm"),
            "{mode}: the plugin is named: {}",
            status.message()
        );
        assert!(
            status.message().len() < 1024,
            "{mode}: {} bytes",
            status.message().len()
        );
        let status = client
            .locate_point(LocatePointRequest {
                point: "refused".into(),
                replicas: 2,
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{mode}: {status:?}");
        assert!(
            status.message().contains(says_for_two),
            "{mode}: {}",
            status.message()
        );
        let status = metadata(&mut client, "refused").await.unwrap_err();
        assert_eq!(status.code(), Code::NotFound, "nothing was written");
        let read = consume(&mut client, window("kept", 0, 0, 0)).await.unwrap();
        assert_eq!(read.concat(), data(1, 500), "{mode}: reads go on");
        node.shutdown().await;
    }
}

/// `GetServers` answers the RPC addresses of the live balancer members (the original answered
/// names). A balancer is a member of the view, not of the ring.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_servers_answers_the_addresses_of_balancers() {
    use goutube::cluster::gossip::Network;
    use goutube::cluster::{ClusterSection, Local, Params, Role};
    use goutube::proto::GetServersRequest;
    use goutube::proto::lb_resolver_helper_client::LbResolverHelperClient;

    let node = TestNode::start(|_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let (_leader, following) = tokio::sync::watch::channel(None);
    let balancer_rpc: std::net::SocketAddr = "127.0.0.1:7777".parse().unwrap();
    let balancer = goutube::cluster::start(
        Params {
            section: ClusterSection::default(),
            seeds: vec![node.node.gossip_addr().to_string()],
            dir: dir.path().to_owned(),
            local: Local {
                name: "lb-1".into(),
                role: Role::Balancer,
                rpc_addr: balancer_rpc,
                replication_addr: "127.0.0.1:7778".parse().unwrap(),
                http_addr: "127.0.0.1:7779".parse().unwrap(),
                virtual_nodes: 64,
                tags: Default::default(),
            },
            leader: following,
            controller: None,
        },
        Network::Udp {
            socket: std::net::UdpSocket::bind("127.0.0.1:0").unwrap(),
            key: None,
        },
        tokio_util::sync::CancellationToken::new(),
    )
    .await
    .unwrap();
    let channel = goutube::client::channel(&goutube::client::ClientOptions {
        addr: node.addr(),
        tls: None,
    })
    .await
    .unwrap();
    let mut resolver = LbResolverHelperClient::new(channel);
    goutube_tests::eventually("the balancer in GetServers", || {
        let mut resolver = resolver.clone();
        async move {
            let servers = resolver
                .get_servers(GetServersRequest {})
                .await
                .unwrap()
                .into_inner()
                .servers;
            servers.len() == 1
        }
    })
    .await;
    let servers = resolver
        .get_servers(GetServersRequest {})
        .await
        .unwrap()
        .into_inner()
        .servers;
    assert_eq!(servers[0].rpc_addr, balancer_rpc.to_string());
    assert_eq!(servers[0].name, "lb-1");
    let members = node
        .client()
        .await
        .list_members(ListMembersRequest {})
        .await
        .unwrap()
        .into_inner();
    let lb = members.members.iter().find(|m| m.name == "lb-1").unwrap();
    assert_eq!(
        (lb.role.as_str(), lb.live, lb.in_ring),
        ("balancer", true, false)
    );
    balancer.shutdown().await.unwrap();
    node.shutdown().await;
}

/// The CASSANDRA-15439 scenario: a primary paused (SIGSTOP) for longer than gossip's failure
/// detection while another joins. Gossip sees it down; the decision does not change: in the
/// committed ring it stays an active owner of its range, the join waits for its handover, and
/// completes once it resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_primary_keeps_its_range_and_the_join_it_holds_back_completes_when_it_resumes() {
    let mut cluster = Cluster::new();
    cluster.spawn("a", "role = \"leader\"");
    let seeds = cluster.seeds();
    cluster.spawn("b", &seeds);
    cluster.spawn("c", &seeds);
    goutube_tests::eventually(
        "the controller to commit the ring of a, b and c",
        || async {
            let members = cluster.members("a").await;
            let owners = ["a", "b", "c"]
                .iter()
                .all(|n| state(&members, n) == ("active".into(), true, true));
            owners && members.controller.is_some_and(|c| c.ring_epoch > 0)
        },
    )
    .await;

    cluster.nodes["b"].signal("STOP");
    cluster.spawn("d", &seeds);
    let paused = Instant::now();
    goutube_tests::eventually("gossip to see b down and d joining", || async {
        let mut all = true;
        for at in ["a", "c", "d"] {
            let members = cluster.members(at).await;
            all &= members
                .members
                .iter()
                .any(|m| m.name == "b" && !m.live && m.state == "active")
                && members
                    .members
                    .iter()
                    .any(|m| m.name == "d" && m.in_ring && m.state == "joining");
        }
        all
    })
    .await;
    // Paused twice as long as failure detection: the committed ring does not move.
    while paused.elapsed() < 2 * DETECTION {
        for at in ["a", "c", "d"] {
            let members = cluster.members(at).await;
            assert_eq!(
                state(&members, "b"),
                ("active".into(), false, true),
                "at {at}"
            );
            assert_eq!(
                state(&members, "d").0,
                "joining",
                "at {at}: b has not handed over"
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    cluster.nodes["b"].signal("CONT");
    goutube_tests::eventually("d to turn active once b handed over", || async {
        let members = cluster.members("a").await;
        ["a", "b", "c", "d"]
            .iter()
            .all(|n| state(&members, n) == ("active".into(), true, true))
    })
    .await;
    for (_, node) in std::mem::take(&mut cluster.nodes) {
        assert!(node.terminate(), "a graceful stop");
    }
}
