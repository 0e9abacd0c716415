//! Forgetting a dead primary (docs/resharding.md, forget): its points are taken over by their
//! owners in the ring without it, from the most complete copy its followers hold, at the next
//! epoch; every byte acknowledged with `ack = { replicas = 1 }` survives, and the new owners
//! take writes. Real nodes, real mTLS, a real cluster.

use std::collections::BTreeMap;

use bytes::Bytes;
use goutube::api::proto::ProduceRequest;
use goutube::api::proto::streaming_client::StreamingClient;
use goutube::api::proto::{ListMembersRequest, ListMembersResponse, LocatePointRequest};
use goutube::client::Client;
use goutube::config::{Ack, Config, Role};
use goutube::error::END_METADATA;
use goutube::point::{Handover, Ownership, PointId};
use goutube_tests::{
    DEADLINE, Pki, TestNode, consume, counter, data, eventually, eventually_within, followers_of,
    metadata, produce, window,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tonic::Code;
use tonic::transport::Channel;

type Api = StreamingClient<Channel>;

/// A node of the test cluster: `name`, with its certificate and the cluster key, seeded by
/// `seed` (if any), expecting three primaries.
fn member(
    pki: &Pki,
    name: &str,
    role: Role,
    seed: Option<String>,
) -> impl FnOnce(&mut Config) + use<> {
    let tls = pki.node(name);
    let key = pki.cluster_key();
    let name = name.to_owned();
    move |c| {
        c.node_name = name;
        c.role = role;
        c.tls = Some(tls);
        c.cluster.key_file = Some(key);
        c.cluster.bootstrap_expect = 3;
        c.seed_addresses = seed.into_iter().collect();
    }
}

async fn view(pki: &Pki, node: &TestNode) -> ListMembersResponse {
    pki.client("root", &node.addr())
        .await
        .list_members(ListMembersRequest {})
        .await
        .expect("ListMembers")
        .into_inner()
}

async fn owner_of(pki: &Pki, node: &TestNode, point: &str) -> String {
    pki.client("root", &node.addr())
        .await
        .locate_point(LocatePointRequest {
            point: point.into(),
            replicas: 1,
        })
        .await
        .expect("LocatePoint")
        .into_inner()
        .owners[0]
        .name
        .clone()
}

/// Appends `bytes` to `point` at `offset` only.
async fn append_at(
    client: &mut Api,
    point: &str,
    offset: u64,
    bytes: &[u8],
) -> Result<(), tonic::Status> {
    let request = ProduceRequest {
        point: point.into(),
        frame: Bytes::copy_from_slice(bytes),
        expected_offset: Some(offset),
        ..Default::default()
    };
    client
        .produce_stream(tokio_stream::iter([request]))
        .await
        .map(|_| ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_forgotten_leaders_points_are_taken_over_from_its_most_complete_follower() {
    let pki = Pki::new();
    let a = TestNode::start(member(&pki, "a", Role::Standalone, None)).await;
    let seed = Some(a.node.gossip_addr().to_string());
    let b = TestNode::start(member(&pki, "b", Role::Standalone, seed.clone())).await;
    let leader_c = || {
        let base = member(&pki, "c", Role::Leader, seed.clone());
        move |c: &mut Config| {
            base(c);
            c.replication.ack = Ack::Replicas(1);
            c.replication.ack_timeout_ms = 300;
        }
    };
    let c = TestNode::start(leader_c()).await;
    let leader = c.node.replication_addr().to_string();
    let follower = |name: &str| {
        let base = member(&pki, name, Role::Follower, seed.clone());
        let leader = leader.clone();
        move |config: &mut Config| {
            base(config);
            config.leader_addresses = vec![leader];
        }
    };
    let f1 = TestNode::start(follower("f1")).await;
    let f2 = TestNode::start(follower("f2")).await;
    for node in [&a, &b, &c] {
        eventually("the ring to form and the followers to follow c", || async {
            let view = view(&pki, node).await;
            view.members.iter().filter(|m| m.owns_range).count() == 3
                && view.members.iter().filter(|m| m.live).count() == 5
                && followers_of(&pki.client_options("root", &c.addr()))
                    .await
                    .len()
                    == 2
        })
        .await;
    }

    // Points of random non-periodic sizes; those of c are what the test is about.
    let nodes: BTreeMap<&str, &TestNode> = [("a", &a), ("b", &b), ("c", &c)].into();
    let mut expected: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut rng = StdRng::seed_from_u64(11);
    for i in 0..60 {
        let point = format!("forget/{i}");
        let bytes = data(500 + i, rng.random_range(1..200_000));
        let at = owner_of(&pki, &a, &point).await;
        let mut client = pki.client("root", &nodes[at.as_str()].addr()).await;
        produce(&mut client, &point, std::slice::from_ref(&bytes))
            .await
            .unwrap();
        expected.insert(point, bytes);
    }
    let mut of_c = Vec::new();
    for point in expected.keys() {
        if owner_of(&pki, &a, point).await == "c" {
            of_c.push(point.clone());
        }
    }
    assert!(of_c.len() >= 8, "c owns {} of 60 points", of_c.len());

    // f2 stops; c goes on taking writes that f1 alone confirms (ack = 1), then stops too,
    // without a drain, as a crash leaves it: the ring still names it.
    let f2_dir = f2.dir;
    f2.node.shutdown().await.unwrap();
    let mut to_c = pki.client("root", &c.addr()).await;
    for (i, point) in of_c.iter().enumerate() {
        let bytes = data(900 + i as u64, 1000 + i * 777);
        let offset = expected[point].len() as u64;
        append_at(&mut to_c, point, offset, &bytes).await.unwrap();
        expected.get_mut(point).unwrap().extend(&bytes);
    }
    // f1 stops too; one more write reaches c alone: not acknowledged (no follower confirms
    // it), so c is the only node with those bytes.
    let f1_dir = f1.dir;
    f1.node.shutdown().await.unwrap();
    let unique = &of_c[0];
    let extra = data(999, 3333);
    let offset = expected[unique].len() as u64;
    let unacknowledged = append_at(&mut to_c, unique, offset, &extra)
        .await
        .unwrap_err();
    assert_eq!(
        unacknowledged.code(),
        Code::Unavailable,
        "{unacknowledged:?}"
    );
    let c_dir = c.dir;
    c.node.shutdown().await.unwrap();
    // f1 and f2 come back, f2 with shorter copies than f1's.
    let f1 = TestNode {
        node: goutube_tests::start_in(f1_dir.path(), follower("f1")).await,
        dir: f1_dir,
    };
    let f2 = TestNode {
        node: goutube_tests::start_in(f2_dir.path(), follower("f2")).await,
        dir: f2_dir,
    };
    // Everyone sees c down and its followers back, still naming c as their leader: the new
    // owners wait for both followers' offers, and must take f1's longer copies.
    for node in [&a, &b] {
        eventually("c to be seen down and f2 back", || async {
            let view = view(&pki, node).await;
            view.members.iter().any(|m| m.name == "c" && !m.live)
                && ["f1", "f2"].iter().all(|name| {
                    view.members
                        .iter()
                        .any(|m| m.name == *name && m.live && m.leader == "c")
                })
        })
        .await;
    }

    // Forgetting is refused for a live member and an unknown one.
    let options = pki.client_options("root", &a.addr());
    let client = Client::connect(&options).await.unwrap();
    let code = |error: goutube::client::ClientError| match error {
        goutube::client::ClientError::Status(status) => status.code(),
        other => panic!("{other}"),
    };
    assert_eq!(
        code(client.forget("b").await.unwrap_err()),
        Code::FailedPrecondition
    );
    assert_eq!(
        code(client.forget("nobody").await.unwrap_err()),
        Code::NotFound
    );
    assert_eq!(client.forget("c").await.unwrap(), "forgotten");

    // Every byte f1 held is served by the point's new owner, at the next epoch.
    let nodes: BTreeMap<&str, &TestNode> = [("a", &a), ("b", &b)].into();
    for point in &of_c {
        let now = owner_of(&pki, &a, point).await;
        assert_ne!(now, "c");
        let mut client = pki.client("root", &nodes[now.as_str()].addr()).await;
        let want = &expected[point];
        eventually_within(
            &format!("{point} to be taken over by {now}"),
            2 * DEADLINE,
            || {
                let mut client = client.clone();
                async move {
                    metadata(&mut client, point)
                        .await
                        .is_ok_and(|m| m.size == want.len() as u64 && m.epoch == 2)
                }
            },
        )
        .await;
        let meta = metadata(&mut client, point).await.unwrap();
        assert_eq!(meta.crc32c, crc32c::crc32c(want), "{point}");
        assert_eq!(meta.owner, now, "{point}");
        let read = consume(&mut client, window(point, 0, 0, 0)).await.unwrap();
        assert!(read.concat() == *want, "{point} differs on {now}");

        // The new owner takes writes at the end, and only there.
        let more = data(7, 4321);
        append_at(&mut client, point, want.len() as u64, &more)
            .await
            .unwrap();
        let stale = append_at(&mut client, point, want.len() as u64, &more)
            .await
            .unwrap_err();
        assert_eq!(stale.code(), Code::FailedPrecondition, "{stale:?}");
        let end: u64 = stale
            .metadata()
            .get(END_METADATA)
            .unwrap()
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(end, (want.len() + more.len()) as u64);
    }
    // The points of the others did not move.
    for (point, bytes) in &expected {
        if of_c.contains(point) {
            continue;
        }
        let at = owner_of(&pki, &a, point).await;
        let mut client = pki.client("root", &nodes[at.as_str()].addr()).await;
        let meta = metadata(&mut client, point).await.unwrap();
        assert_eq!((meta.size, meta.epoch), (bytes.len() as u64, 1), "{point}");
    }
    // Both followers are done with c (f2's shorter copies were left alone), and c stays
    // forgotten.
    eventually(
        "f1 and f2 to announce that c's points are taken over",
        || async {
            let view = view(&pki, &a).await;
            ["f1", "f2"].iter().all(|name| {
                view.members
                    .iter()
                    .any(|m| m.name == *name && m.handed.starts_with("c@"))
            })
        },
    )
    .await;
    let seen = view(&pki, &a).await;
    let record = seen.members.iter().find(|m| m.name == "c").unwrap();
    assert_eq!((record.state.as_str(), record.live), ("forgotten", false));

    // c returns: it steps down. Its copies that are prefixes of the new owners' are history
    // (served, not written); the one with bytes nobody else has goes to quarantine.
    let c = TestNode {
        node: goutube_tests::start_in(c_dir.path(), leader_c()).await,
        dir: c_dir,
    };
    let store = c.node.store().unwrap().clone();
    let unique_id = PointId::new(unique.as_str()).unwrap();
    eventually("c to quarantine the copy only it held", || async {
        !store.quarantined(&unique_id).is_empty()
    })
    .await;
    let quarantined = store.quarantined(&unique_id);
    assert_eq!(quarantined.len(), 1, "{quarantined:?}");
    let (epoch, size, dir) = &quarantined[0];
    assert_eq!(*epoch, 1);
    assert_eq!(*size, (expected[unique].len() + extra.len()) as u64);
    let kept = std::fs::read(dir.join("point.data")).unwrap();
    assert!(
        kept.starts_with(&expected[unique]) && kept.ends_with(&extra),
        "the quarantined copy is not c's"
    );
    assert!(
        dir.starts_with(c.dir.path().join("quarantine")),
        "{}",
        dir.display()
    );
    let mut to_c = pki.client("root", &c.addr()).await;
    let status = metadata(&mut to_c, unique).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert!(status.message().contains("quarantine"), "{status:?}");
    eventually("the quarantined copy to be counted", || async {
        counter(goutube::metrics::QUARANTINED_POINTS) >= 1.0
    })
    .await;
    for point in of_c.iter().skip(1) {
        let id = PointId::new(point.as_str()).unwrap();
        eventually(&format!("c to step down for {point}"), || async {
            matches!(
                store.ownership(&id).await,
                Ok(Ownership {
                    handover: Some(Handover::Moved { .. }),
                    ..
                }) | Err(_)
            )
        })
        .await;
    }
    let refused = append_at(&mut to_c, &of_c[1], 0, b"x").await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    for node in [c, f2, f1, b, a] {
        node.shutdown().await;
    }
}
