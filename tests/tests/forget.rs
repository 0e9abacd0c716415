//! Forgetting a dead primary (docs/resharding.md, forget): its points are taken over by their
//! owners in the ring without it, from the most complete copy its followers hold, at the
//! controller's epoch; every byte acknowledged with `ack = { replicas = 1 }` survives, and the new owners
//! take writes. The forgotten leader, killed with SIGKILL, steps down when it returns. Real
//! nodes (the leader a `goutube run` process), real mTLS, a real cluster.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use goutube::client::Client;
use goutube::config::{Config, Role};
use goutube::proto::END_METADATA;
use goutube::proto::{ListMembersRequest, ListMembersResponse};
use goutube_tests::{
    DEADLINE, NodeProcess, Pki, TestNode, append_at, consume, data, eventually, eventually_some,
    eventually_within, followers_of, http, metadata, metric, owner_through, produce, window,
    write_node_config,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tonic::Code;

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

async fn view(pki: &Pki, node: &str) -> ListMembersResponse {
    pki.client("root", node)
        .await
        .list_members(ListMembersRequest {})
        .await
        .expect("ListMembers")
        .into_inner()
}

/// The in-sync set of `slot`'s group, as `node` sees the controller's state.
async fn in_sync_of(pki: &Pki, node: &str, slot: &str) -> Vec<String> {
    let controller = view(pki, node).await.controller.unwrap_or_default();
    let group = controller.groups.into_iter().find(|g| g.slot == slot);
    group.map(|g| g.in_sync).unwrap_or_default()
}

async fn owner_of(pki: &Pki, node: &str, point: &str) -> String {
    owner_through(pki.client("root", node).await, point).await
}

/// Leader `c` as a `goutube run` process with its data in `dir`: acknowledges a produce once one
/// follower confirmed it (else `Unavailable` after 300 ms, the bytes kept), syncs in the
/// background: its group fails over only by an operator's decision (docs/failover.md), which
/// is what this test is about.
fn spawn_c(pki: &Pki, dir: &Path, seed: &str) -> NodeProcess {
    let tls = pki.node("c");
    let config = write_node_config(
        dir,
        "c",
        &format!(
            "role = \"leader\"\nseed_addresses = [{seed:?}]\n\
             [cluster]\nbootstrap_expect = 3\nkey_file = {:?}\n\
             [tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n\
             [replication]\nack = {{ replicas = 1 }}\nack_timeout_ms = 300\n\
             [storage]\nfsync = \"interval\"",
            pki.cluster_key(),
            tls.ca,
            tls.cert,
            tls.key
        ),
    );
    NodeProcess::spawn(&config)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_forgotten_leaders_points_are_taken_over_from_its_most_complete_follower() {
    let pki = Pki::new();
    let a = TestNode::start(member(&pki, "a", Role::Standalone, None)).await;
    let seed = Some(a.node.gossip_addr().to_string());
    let b = TestNode::start(member(&pki, "b", Role::Standalone, seed.clone())).await;
    let c_dir = tempfile::tempdir().unwrap();
    let gossip_seed = seed.clone().unwrap();
    let c = spawn_c(&pki, c_dir.path(), &gossip_seed);
    let leader = c.addresses.replication.to_string();
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
    for node in [a.addr(), b.addr(), c.rpc.clone()] {
        eventually("the ring to form and the followers to follow c", || async {
            let view = view(&pki, &node).await;
            view.members.iter().filter(|m| m.owns_range).count() == 3
                && view.members.iter().filter(|m| m.live).count() == 5
                && followers_of(&pki.client_options("root", &c.rpc))
                    .await
                    .len()
                    == 2
        })
        .await;
    }

    // c's acknowledgements wait for its in-sync followers: both, once they caught up.
    eventually("f1 and f2 to be in c's in-sync set", || async {
        in_sync_of(&pki, &c.rpc, "c").await == ["f1", "f2"]
    })
    .await;
    // c's group fails over only by an operator: it syncs in the background.
    eventually("members to say how c's group fails over", || async {
        let controller = view(&pki, &c.rpc).await.controller.unwrap_or_default();
        let group = controller.groups.into_iter().find(|g| g.slot == "c");
        group.is_some_and(|g| g.failover.starts_with("by an operator: storage.fsync"))
    })
    .await;

    // Points of random non-periodic sizes; those of c are what the test is about.
    let nodes: BTreeMap<&str, String> =
        [("a", a.addr()), ("b", b.addr()), ("c", c.rpc.clone())].into();
    let mut expected: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut rng = StdRng::seed_from_u64(11);
    for i in 0..60 {
        let point = format!("forget/{i}");
        let bytes = data(500 + i, rng.random_range(1..200_000));
        let at = owner_of(&pki, &a.addr(), &point).await;
        let mut client = pki.client("root", &nodes[at.as_str()]).await;
        produce(&mut client, &point, std::slice::from_ref(&bytes))
            .await
            .unwrap();
        expected.insert(point, bytes);
    }
    let mut of_c = Vec::new();
    for point in expected.keys() {
        if owner_of(&pki, &a.addr(), point).await == "c" {
            of_c.push(point.clone());
        }
    }
    assert!(of_c.len() >= 8, "c owns {} of 60 points", of_c.len());

    // f2 stops; once the controller took it out of c's in-sync set, c goes on taking writes
    // that f1 alone confirms (ack = 1).
    let f2_dir = f2.dir;
    f2.node.shutdown().await.unwrap();
    eventually("f2 to leave c's in-sync set", || async {
        in_sync_of(&pki, &c.rpc, "c").await == ["f1"]
    })
    .await;
    let mut to_c = pki.client("root", &c.rpc).await;
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
    // c dies: the ring still names it.
    c.kill();
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
    for node in [a.addr(), b.addr()] {
        eventually("c to be seen down and f2 back", || async {
            let view = view(&pki, &node).await;
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
    // The controller's epoch of the forget: the takeovers that follow commit at it or above.
    let forgot_at = eventually_some("a to see c forgotten", || async {
        let view = view(&pki, &a.addr()).await;
        let forgotten = view
            .members
            .iter()
            .any(|m| m.name == "c" && m.state == "forgotten");
        forgotten.then(|| view.controller.map(|c| c.ring_epoch))?
    })
    .await;

    // Every byte f1 held is served by the point's new owner, at the controller's epoch.
    for point in &of_c {
        let now = owner_of(&pki, &a.addr(), point).await;
        assert_ne!(now, "c");
        let mut client = pki.client("root", &nodes[now.as_str()]).await;
        let want = &expected[point];
        eventually_within(
            &format!("{point} to be taken over by {now}"),
            2 * DEADLINE,
            || {
                let mut client = client.clone();
                async move {
                    metadata(&mut client, point)
                        .await
                        .is_ok_and(|m| m.size == want.len() as u64 && m.epoch >= forgot_at)
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
        let at = owner_of(&pki, &a.addr(), point).await;
        let mut client = pki.client("root", &nodes[at.as_str()]).await;
        let meta = metadata(&mut client, point).await.unwrap();
        assert_eq!((meta.size, meta.epoch), (bytes.len() as u64, 1), "{point}");
    }
    // Both followers are done with c (f2's shorter copies were left alone), and c stays
    // forgotten.
    eventually(
        "f1 and f2 to announce that c's points are taken over",
        || async {
            let view = view(&pki, &a.addr()).await;
            ["f1", "f2"].iter().all(|name| {
                view.members
                    .iter()
                    .any(|m| m.name == *name && m.handed.starts_with("takeover:c@"))
            })
        },
    )
    .await;
    let seen = view(&pki, &a.addr()).await;
    let record = seen.members.iter().find(|m| m.name == "c").unwrap();
    assert_eq!((record.state.as_str(), record.live), ("forgotten", false));

    // c returns: it steps down. Its copies that are prefixes of the new owners' are history
    // (and cleaned up once their owners hold them); the one with bytes nobody else has goes to
    // quarantine, and c takes no writes.
    let c = spawn_c(&pki, c_dir.path(), &gossip_seed);
    let mut to_c = pki.client("root", &c.rpc).await;
    eventually("c to quarantine the copy only it held", || {
        let mut to_c = to_c.clone();
        async move {
            metadata(&mut to_c, unique)
                .await
                .is_err_and(|s| s.code() == Code::NotFound && s.message().contains("quarantine"))
        }
    })
    .await;
    let quarantine = c_dir.path().join("data/quarantine");
    let kept: Vec<_> = walkdir(&quarantine)
        .into_iter()
        .filter(|path| path.ends_with("point.data"))
        .collect();
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert!(
        kept[0].parent().unwrap().ends_with("1"),
        "epoch 1: {kept:?}"
    );
    let bytes = std::fs::read(&kept[0]).unwrap();
    assert_eq!(bytes.len(), expected[unique].len() + extra.len());
    assert!(
        bytes.starts_with(&expected[unique]) && bytes.ends_with(&extra),
        "the quarantined copy is not c's"
    );
    // The gauge is set once the copy's move to quarantine has ended, after reads see it.
    let https = pki.https(Some("root"));
    let metrics = c.addresses.metrics;
    eventually("c's gauge to count the quarantined copy", || {
        let https = https.clone();
        async move {
            let scrape = http(metrics, "GET", "/metrics", &[], Some(https)).await;
            let scrape = String::from_utf8(scrape.body).unwrap();
            metric(&scrape, goutube::metrics::QUARANTINED_POINTS) == Some(1.0)
        }
    })
    .await;
    for point in of_c.iter().skip(1) {
        eventually(&format!("c's history of {point} to be cleaned up"), || {
            let mut to_c = to_c.clone();
            async move {
                // Not held by c any more (not in quarantine either): c sends readers to the
                // point's owner.
                metadata(&mut to_c, point).await.is_err_and(|s| {
                    let elsewhere = goutube::client::owner_of(&s).is_some_and(|o| o.member != "c");
                    (s.code() == Code::NotFound || elsewhere) && !s.message().contains("quarantine")
                })
            }
        })
        .await;
    }
    let refused = append_at(&mut to_c, &of_c[1], 0, b"x").await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(refused.message().contains("forgotten"), "{refused:?}");
    assert!(c.terminate());
    for node in [f2, f1, b, a] {
        node.shutdown().await;
    }
}

/// Every path under `dir`.
fn walkdir(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_owned()];
    while let Some(current) = pending.pop() {
        for entry in std::fs::read_dir(&current).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path.clone());
            }
            found.push(path);
        }
    }
    found
}
