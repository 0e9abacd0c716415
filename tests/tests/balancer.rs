//! The balancer against real nodes: the original goutube's scenario (one balancer, two leaders
//! with three and four followers) with non-periodic data and real assertions, a produce stream
//! interleaving points of both leaders, workers in metadata, a replica killed in the middle of a
//! consume through the balancer, a lagging follower that is never chosen, two balancers that
//! agree, and a write the balancer sent to a node that refused it naming the owner.

use std::collections::BTreeSet;
use std::time::Duration;

use goutube::config::{Config, PluginSection, Role};
use goutube::proto::{
    ConsumeRequest, ListMembersRequest, LocatePointRequest, MetadataRequest, ProduceRequest,
};
use goutube_tests::{
    Pki, ProcessReplicas, TestNode, assert_denied, consume, data, eventually, metadata, metric,
    owner as owner_by, produce, raw_client, scrape_metrics, sees, window,
};

fn seeded(config: &mut Config, seed: &str, expect: usize) {
    config.seed_addresses = vec![seed.to_owned()];
    config.cluster.bootstrap_expect = expect;
}

struct Scenario {
    leaders: Vec<TestNode>,
    followers: Vec<Vec<TestNode>>,
    balancer: TestNode,
}

/// Two leaders (forming the ring together), with three and four followers, and a balancer.
async fn scenario(multi_stream_percent: u8) -> Scenario {
    let first = TestNode::start(|c| {
        c.node_name = "leader-1".into();
        c.role = Role::Leader;
        c.cluster.bootstrap_expect = 2;
    })
    .await;
    let seed = first.node.gossip_addr().to_string();
    let second = TestNode::start(|c| {
        c.node_name = "leader-2".into();
        c.role = Role::Leader;
        seeded(c, &seed, 2);
    })
    .await;
    let leaders = vec![first, second];
    let mut followers = Vec::new();
    for (index, count) in [(0, 3), (1, 4)] {
        let replication = leaders[index].node.replication_addr().to_string();
        let mut group = Vec::new();
        for i in 0..count {
            let (seed, replication) = (seed.clone(), replication.clone());
            group.push(
                TestNode::start(move |c| {
                    c.node_name = format!("follower-{}-{i}", index + 1);
                    c.role = Role::Follower;
                    c.leader_addresses = vec![replication];
                    seeded(c, &seed, 2);
                })
                .await,
            );
        }
        followers.push(group);
    }
    let balancer = TestNode::start(move |c| {
        c.node_name = "balancer-1".into();
        c.role = Role::Balancer;
        c.multi_stream_percent = multi_stream_percent;
        seeded(c, &seed, 2);
    })
    .await;
    let scenario = Scenario {
        leaders,
        followers,
        balancer,
    };
    scenario.settled(10).await;
    scenario
}

impl Scenario {
    /// Waits until both leaders and the balancer see `members` live members and the same
    /// formed ring, in which both leaders own a range, and every follower connected to its
    /// leader.
    async fn settled(&self, members: usize) {
        eventually("one formed ring, seen alike", || async {
            let mut rings = BTreeSet::new();
            for node in self.leaders.iter().chain([&self.balancer]) {
                let view = node
                    .client()
                    .await
                    .list_members(ListMembersRequest {})
                    .await
                    .unwrap()
                    .into_inner();
                let owners = view.members.iter().filter(|m| m.owns_range).count();
                if view.ring.is_empty()
                    || owners != 2
                    || view.members.iter().filter(|m| m.live).count() != members
                {
                    return false;
                }
                rings.insert(view.ring);
            }
            rings.len() == 1
        })
        .await;
        for (leader, group) in self.leaders.iter().zip(&self.followers) {
            eventually("the followers connected", || async {
                followers(leader).await == group.len()
            })
            .await;
        }
    }

    fn leader(&self, name: &str) -> (usize, &TestNode) {
        let index = if name == "leader-1" { 0 } else { 1 };
        (index, &self.leaders[index])
    }

    async fn owner(&self, point: &str) -> String {
        owner_by(&self.balancer, point).await
    }

    /// A point each leader owns.
    async fn points_of_each_leader(&self) -> (String, String) {
        let (mut first, mut second) = (None, None);
        for i in 0.. {
            let point = format!("videos/{i}");
            match self.owner(&point).await.as_str() {
                "leader-1" => first.get_or_insert(point),
                _ => second.get_or_insert(point),
            };
            if first.is_some() && second.is_some() {
                break;
            }
        }
        (first.unwrap(), second.unwrap())
    }

    async fn shutdown(self) {
        self.balancer.shutdown().await;
        for group in self.followers {
            for follower in group {
                follower.shutdown().await;
            }
        }
        for leader in self.leaders {
            leader.shutdown().await;
        }
    }
}

async fn followers(leader: &TestNode) -> usize {
    goutube_tests::connected_followers(&leader.addr()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_original_scenario_through_the_balancer() {
    let scenario = scenario(50).await;
    let mut through = scenario.balancer.client().await;
    let frames: Vec<Vec<u8>> = (0..10)
        .map(|i| data(100 + i, 256 + 7 * i as usize))
        .collect();
    let expected = frames.concat();
    let point = "videos/original";
    let record = produce(&mut through, point, &frames).await.unwrap().records;
    assert_eq!(record.len(), 1);
    assert_eq!(record[0].end, expected.len() as u64);
    let read = consume(&mut through, window(point, 0, 0, 0)).await.unwrap();
    assert_eq!(read.concat(), expected);

    // The owner and every one of its followers hold the same bytes.
    let owner = scenario.owner(point).await;
    let (index, leader) = scenario.leader(&owner);
    let read = consume(&mut leader.client().await, window(point, 0, 0, 0))
        .await
        .unwrap();
    assert_eq!(read.concat(), expected);
    assert_eq!(followers(leader).await, scenario.followers[index].len());
    for follower in &scenario.followers[index] {
        let mut client = follower.client().await;
        eventually("the follower's copy", || async {
            metadata(&mut follower.client().await, point)
                .await
                .is_ok_and(|m| m.size == expected.len() as u64)
        })
        .await;
        let read = consume(&mut client, window(point, 0, 0, 0)).await.unwrap();
        assert_eq!(
            read.concat(),
            expected,
            "{}",
            follower.node.config().node_name
        );
    }

    // Metadata through the balancer: size and checksum of the owner, and ceil(50 % of the
    // caught-up replicas, owner included) workers, each holding the whole point.
    let meta = metadata(&mut through, point).await.unwrap();
    assert_eq!(meta.size, expected.len() as u64);
    assert_eq!(meta.crc32c, crc32c::crc32c(&expected));
    assert_eq!(meta.node, owner);
    let replicas = scenario.followers[index].len() + 1;
    assert_eq!(meta.workers.len(), replicas.div_ceil(2), "{meta:?}");
    for worker in &meta.workers {
        let held = metadata(&mut raw_client(worker).await, point)
            .await
            .unwrap();
        assert_eq!(held.size, expected.len() as u64, "{worker}");
    }
    assert_eq!(meta.replicas.len(), scenario.followers[index].len());
    assert!(
        meta.replicas.iter().all(|r| r.connected && r.lag == 0),
        "{meta:?}"
    );
    scenario.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_produce_stream_may_interleave_points_of_both_leaders() {
    let scenario = scenario(100).await;
    let (first, second) = scenario.points_of_each_leader().await;
    let mut requests = Vec::new();
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for i in 0..12u64 {
        let (point, bytes) = if i % 3 == 0 {
            (&second, data(i, 1000 + i as usize))
        } else {
            (&first, data(i, 2000 + i as usize))
        };
        let written = if point == &first { &mut a } else { &mut b };
        // Expected offsets pass through the balancer to each owner.
        let expected_offset = Some(written.len() as u64);
        written.extend_from_slice(&bytes);
        requests.push(ProduceRequest {
            point: point.clone(),
            frame: bytes.into(),
            expected_offset,
            ..Default::default()
        });
    }
    let records = scenario
        .balancer
        .client()
        .await
        .produce_stream(tokio_stream::iter(requests))
        .await
        .unwrap()
        .into_inner()
        .records;
    // One record per point, in first-seen order (the second leader's point came first).
    let seen: Vec<&str> = records.iter().map(|r| r.point.as_str()).collect();
    assert_eq!(seen, [second.as_str(), first.as_str()]);
    assert_eq!(records[0].end, b.len() as u64);
    assert_eq!(records[1].end, a.len() as u64);
    for (point, bytes) in [(&first, &a), (&second, &b)] {
        let owner = scenario.owner(point).await;
        let (_, leader) = scenario.leader(&owner);
        let read = consume(&mut leader.client().await, window(point, 0, 0, 0))
            .await
            .unwrap();
        assert_eq!(&read.concat(), bytes, "{point} on {owner}");
    }
    // A retried frame is refused by the owner, and the refusal reaches the client whole.
    let stale = ProduceRequest {
        point: first.clone(),
        frame: data(99, 100).into(),
        expected_offset: Some(0),
        ..Default::default()
    };
    let refused = scenario
        .balancer
        .client()
        .await
        .produce_stream(tokio_stream::iter([stale]))
        .await
        .unwrap_err();
    assert_eq!(
        refused.code(),
        tonic::Code::FailedPrecondition,
        "{refused:?}"
    );
    let end = refused
        .metadata()
        .get("goutube-end")
        .map(|v| v.to_str().unwrap().to_owned());
    assert_eq!(end, Some(a.len().to_string()));
    scenario.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_balancers_give_the_same_answers() {
    let scenario = scenario(100).await;
    let seed = scenario.leaders[0].node.gossip_addr().to_string();
    let second = TestNode::start(move |c| {
        c.node_name = "balancer-2".into();
        c.role = Role::Balancer;
        seeded(c, &seed, 2);
    })
    .await;
    scenario.settled(11).await;
    let (a, b) = scenario.points_of_each_leader().await;
    for (i, point) in [&a, &b].into_iter().enumerate() {
        produce(
            &mut scenario.balancer.client().await,
            point,
            &[data(i as u64, 5000)],
        )
        .await
        .unwrap();
    }
    let mut one = scenario.balancer.client().await;
    let mut two = second.client().await;
    for point in [&a, &b] {
        // The same node answers through both once both see the same members live (a balancer
        // that just started may briefly miss one: ask a follower of its owner instead, or
        // answer that the owner is down).
        eventually("both balancers to answer from the same node", || {
            let (mut one, mut two) = (one.clone(), two.clone());
            async move {
                let (Ok(x), Ok(y)) = (
                    metadata(&mut one, point).await,
                    metadata(&mut two, point).await,
                ) else {
                    return false;
                };
                (x.size, x.crc32c, &x.node) == (y.size, y.crc32c, &y.node)
            }
        })
        .await;
        let locate = |client: &mut goutube::proto::streaming_client::StreamingClient<_>| {
            let mut client = client.clone();
            let point = point.clone();
            async move {
                client
                    .locate_point(LocatePointRequest { point, replicas: 2 })
                    .await
                    .unwrap()
                    .into_inner()
            }
        };
        assert_eq!(locate(&mut one).await, locate(&mut two).await);
        let read = consume(&mut two, window(point, 0, 0, 0)).await.unwrap();
        assert_eq!(
            read.concat(),
            consume(&mut one, window(point, 0, 0, 0))
                .await
                .unwrap()
                .concat()
        );
    }
    let list = |addr: String| async move {
        goutube::client::Client::connect(&goutube::client::ClientOptions { addr, tls: None })
            .await
            .unwrap()
            .list("videos/")
            .await
            .unwrap()
            .points
    };
    let mut expected = vec![a.clone(), b.clone()];
    expected.sort();
    let listed = list(scenario.balancer.addr()).await;
    assert_eq!(listed, expected);
    assert_eq!(listed, list(second.addr()).await);
    eventually("one view", || async {
        let view = |client: goutube::proto::streaming_client::StreamingClient<_>| async move {
            let mut client = client;
            client
                .list_members(ListMembersRequest {})
                .await
                .unwrap()
                .into_inner()
                .view
        };
        view(one.clone()).await == view(two.clone()).await
    })
    .await;
    second.shutdown().await;
    scenario.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_mid_consume_costs_the_client_nothing() {
    let mut small = ProcessReplicas::start(1).await;
    let expected = small.point_everywhere("films/long", 32 * 1024 * 1024).await;
    // The balancer serves a complete follower first: kill it a few frames in.
    let mut stream = small
        .balancer
        .client()
        .await
        .consume_stream(ConsumeRequest {
            point: "films/long".into(),
            chunk_size: 64 * 1024,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut read = Vec::new();
    while read.len() < 2 * 1024 * 1024 {
        let response = stream.message().await.unwrap().unwrap();
        assert_eq!(response.offset, read.len() as u64);
        read.extend_from_slice(&response.frame);
    }
    // The follower is the one serving: it counted the bytes it sent.
    let follower = small.followers[0].as_ref().unwrap();
    let served = metric(
        &scrape_metrics(&follower.metrics).await,
        "goutube_consume_bytes_total",
    );
    assert!(served.is_some_and(|bytes| bytes > 0.0), "{served:?}");
    small.followers[0].take().unwrap().kill();
    while let Some(response) = stream.message().await.unwrap() {
        assert_eq!(response.offset, read.len() as u64, "one unbroken stream");
        read.extend_from_slice(&response.frame);
    }
    assert_eq!(read.len(), expected.len());
    assert!(read == expected, "byte-exact");
    small.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_follower_is_never_chosen_for_what_it_does_not_hold() {
    let small = ProcessReplicas::start(1).await;
    let first = small
        .point_everywhere("films/growing", 4 * 1024 * 1024)
        .await;
    // Stop the follower: it stays connected but confirms nothing more.
    small.followers[0].as_ref().unwrap().signal("STOP");
    let more = data(99, 3 * 1024 * 1024);
    produce(
        &mut small.leader.client().await,
        "films/growing",
        std::slice::from_ref(&more),
    )
    .await
    .unwrap();
    let expected = [first, more].concat();
    let mut through = small.balancer.client().await;
    let meta = metadata(&mut through, "films/growing").await.unwrap();
    assert_eq!(meta.size, expected.len() as u64);
    assert_eq!(
        meta.workers,
        vec![small.leader.addr()],
        "only the owner holds it all"
    );
    // Consumes of the whole point never go to the stopped follower (they would hang there).
    for _ in 0..4 {
        let read = tokio::time::timeout(
            Duration::from_secs(20),
            consume(&mut through, window("films/growing", 0, 0, 0)),
        )
        .await
        .expect("not sent to the stopped follower")
        .unwrap();
        assert!(read.concat() == expected);
    }
    small.followers[0].as_ref().unwrap().signal("CONT");
    small.shutdown().await;
}

/// Over mTLS: the balancer authorizes the client's subject and forwards it with its own node
/// certificate; the node authorizes the forwarded subject (its ACL knows no balancer), and
/// ignores the forwarding header from anyone who is not a balancer member.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_calls_carry_the_clients_subject_and_only_from_a_balancer() {
    let pki = Pki::new();
    let acl = |text: &'static str| PluginSection {
        source: "builtin:acl-authorizer".into(),
        config: text.into(),
        ..PluginSection::default()
    };
    let secured = |config: &mut Config, name: &str| {
        config.node_name = name.into();
        config.tls = Some(pki.node(name));
        config.cluster.key_file = Some(pki.cluster_key());
    };
    let node = TestNode::start(|c| {
        secured(c, "leader");
        c.role = Role::Leader;
        c.plugins.authorizer = acl("root, *, *\nalice, videos/*, consume\n");
    })
    .await;
    let seed = node.node.gossip_addr().to_string();
    // The balancer itself lets alice do anything: what stops her below is the node.
    let balancer = TestNode::start(|c| {
        secured(c, "balancer");
        c.role = Role::Balancer;
        c.seed_addresses = vec![seed];
        c.plugins.authorizer = acl("root, *, *\nalice, *, *\n");
    })
    .await;
    let mut root = pki.client("root", &balancer.addr()).await;
    for member in [&balancer, &node] {
        let client = pki.client("root", &member.addr()).await;
        eventually("both see the ring and each other", || async {
            let view = client
                .clone()
                .list_members(ListMembersRequest {})
                .await
                .unwrap()
                .into_inner();
            !view.ring.is_empty() && view.members.iter().filter(|m| m.live).count() == 2
        })
        .await;
    }
    // Root writes through the balancer: the node sees root, not the balancer's certificate
    // (which its ACL does not list).
    produce(&mut root, "videos/cat", &[data(1, 1000)])
        .await
        .unwrap();
    produce(&mut root, "private/diary", &[data(2, 1000)])
        .await
        .unwrap();
    let mut alice = pki.client("alice", &balancer.addr()).await;
    let read = consume(&mut alice, window("videos/cat", 0, 0, 0))
        .await
        .unwrap();
    assert_eq!(read.concat(), data(1, 1000));
    assert_denied(
        [
            consume(&mut alice, window("private/diary", 0, 0, 0))
                .await
                .unwrap_err(),
            produce(&mut alice, "videos/dog", &[data(3, 10)])
                .await
                .unwrap_err(),
        ],
        "no ACL line allows alice",
    );
    // Alice straight to the node, claiming to act for root: the claim is ignored.
    let on_behalf_of_root = || {
        let mut request = tonic::Request::new(MetadataRequest {
            point: "private/diary".into(),
        });
        request.metadata_mut().insert_bin(
            goutube::proto::ON_BEHALF_OF,
            tonic::metadata::MetadataValue::from_bytes(b"root"),
        );
        request
    };
    let mut direct = pki.client("alice", &node.addr()).await;
    let status = direct.get_metadata(on_behalf_of_root()).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    // A node the member does not see live (a balancer that just started, before gossip told
    // the member of it) forwarding for root: sent again later, not denied.
    let mut unheard = pki.client("node:lb2", &node.addr()).await;
    let status = unheard.get_metadata(on_behalf_of_root()).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("does not see it live yet"),
        "{status:?}"
    );
    // A write refused so says it wrote nothing (the balancer sends it again as it is, even
    // without expected_offset), and wrote nothing.
    let mut write = tonic::Request::new(tokio_stream::iter([goutube::proto::ProduceRequest {
        point: "videos/unheard".into(),
        frame: data(4, 100).into(),
        ..Default::default()
    }]));
    write.metadata_mut().insert_bin(
        goutube::proto::ON_BEHALF_OF,
        tonic::metadata::MetadataValue::from_bytes(b"root"),
    );
    let status = unheard.produce_stream(write).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(goutube::client::nothing_written(&status), "{status:?}");
    let mut to_node = pki.client("root", &node.addr()).await;
    let missing = metadata(&mut to_node, "videos/unheard").await.unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound, "{missing:?}");
    balancer.shutdown().await;
    node.shutdown().await;
}

/// The balancer's HTTP gateway stores nothing: it redirects a range request to a node that
/// holds the point, and that node answers it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_balancers_gateway_redirects_to_a_replica() {
    let replicas = ProcessReplicas::start(0).await;
    let bytes = replicas.point_everywhere("films/web", 1024 * 1024).await;
    let target = format!("/v1/points/{}", goutube_tests::url_path("films/web"));
    let answer = goutube_tests::http(
        replicas.balancer.node.http_addr(),
        "GET",
        &target,
        &[("range", "bytes=100-199")],
        None,
    )
    .await;
    assert_eq!(
        answer.status,
        307,
        "{:?}",
        String::from_utf8_lossy(&answer.body)
    );
    let location = answer.header("location").expect("a Location header");
    let leader = replicas.leader.node.http_addr().to_string();
    assert!(location.contains(&leader), "{location} is not on {leader}");
    let path = location.split_once(&leader).unwrap().1;
    let answer = goutube_tests::http(
        replicas.leader.node.http_addr(),
        "GET",
        path,
        &[("range", "bytes=100-199")],
        None,
    )
    .await;
    assert_eq!(answer.status, 206);
    assert_eq!(answer.body, bytes[100..200]);
    replicas.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_naming_another_owner_is_followed() {
    // The leaders place points by rendezvous hashing and the balancer still by the ring, as when
    // the placement changed and the balancer has not caught up: for some points it asks the
    // wrong node, which refuses naming the owner.
    let rendezvous = |c: &mut Config| {
        c.plugins.placement.source = "builtin:rendezvous-placement".into();
    };
    let first = TestNode::start(|c| {
        c.node_name = "leader-1".into();
        c.role = Role::Leader;
        c.cluster.bootstrap_expect = 2;
        rendezvous(c);
    })
    .await;
    let seed = first.node.gossip_addr().to_string();
    let second_seed = seed.clone();
    let second = TestNode::start(move |c| {
        c.node_name = "leader-2".into();
        c.role = Role::Leader;
        seeded(c, &second_seed, 2);
        rendezvous(c);
    })
    .await;
    let balancer = TestNode::start(move |c| {
        c.node_name = "balancer-1".into();
        c.role = Role::Balancer;
        seeded(c, &seed, 2);
    })
    .await;
    eventually(
        "all three to see each other and the formed ring",
        || async { sees(&first, 3).await && sees(&second, 3).await && sees(&balancer, 3).await },
    )
    .await;
    let mut point = None;
    for i in 0..1000 {
        let candidate = format!("videos/{i}");
        let by_ring = owner_by(&balancer, &candidate).await;
        let by_rendezvous = owner_by(&first, &candidate).await;
        if by_ring != by_rendezvous {
            point = Some((candidate, by_ring, by_rendezvous));
            break;
        }
    }
    let (point, asked, owner) = point.expect("the two placements disagree on some point");

    let frames: Vec<Vec<u8>> = (0..5).map(|i| data(300 + i, 40_000 + i as usize)).collect();
    let mut offset = 0;
    let requests: Vec<ProduceRequest> = frames
        .iter()
        .map(|frame| {
            let request = ProduceRequest {
                point: point.clone(),
                frame: frame.clone().into(),
                expected_offset: Some(offset),
                ..Default::default()
            };
            offset += frame.len() as u64;
            request
        })
        .collect();
    let records = balancer
        .client()
        .await
        .produce_stream(tokio_stream::iter(requests))
        .await
        .expect("the balancer follows the refusal to the owner")
        .into_inner()
        .records;
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].end, offset);

    let node = |name: &str| if name == "leader-1" { &first } else { &second };
    let stored = consume(&mut node(&owner).client().await, window(&point, 0, 0, 0))
        .await
        .unwrap();
    assert_eq!(
        stored.concat(),
        frames.concat(),
        "{point} on its owner {owner}"
    );
    // Not stored on the member the balancer asked, which sends readers to the owner.
    let id = goutube::point::PointId::new(point.as_str()).unwrap();
    let held = node(&asked).node.store().unwrap().metadata(&id).await;
    assert!(held.is_err(), "{point} is stored on {asked}");
    let elsewhere = metadata(&mut node(&asked).client().await, &point)
        .await
        .unwrap_err();
    assert_eq!(
        goutube::client::owner_of(&elsewhere).map(|owner| owner.member),
        Some(owner.clone()),
        "{point} on {asked}: {elsewhere:?}"
    );
    balancer.shutdown().await;
    second.shutdown().await;
    first.shutdown().await;
}
