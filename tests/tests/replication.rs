//! Replication with real nodes, real mTLS and the real bundler component: followers converge to
//! byte-identical copies whatever is restarted when, damaged records are rejected and sent again,
//! a stalled follower holds up nobody, and `ack = { replicas = N }` means what it says.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use goutube::config::{Ack, Config, PeerTlsSection, Role};
use goutube::point::{Ownership, PointId, Store};
use goutube::proto::streaming_client::StreamingClient;
use goutube::proto::{DeletePointRequest, ListMembersRequest, ProduceRequest};
use goutube_tests::{
    Advance, DEADLINE, NodeProcess, Pki, TestNode, consume, counter, data, eventually,
    eventually_advancing, eventually_some, free_port, metadata, produce, window,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;
use tonic::transport::Channel;

type Client = StreamingClient<Channel>;

async fn leader(pki: &Pki, configure: impl FnOnce(&mut Config)) -> TestNode {
    let tls = pki.node("leader");
    let key = pki.cluster_key();
    TestNode::start(move |c| {
        c.node_name = "leader".into();
        c.role = Role::Leader;
        c.tls = Some(tls);
        c.cluster.key_file = Some(key);
        configure(c);
    })
    .await
}

async fn follower(
    pki: &Pki,
    name: &str,
    leader: &TestNode,
    configure: impl FnOnce(&mut Config),
) -> TestNode {
    let follows = follows(pki, name, leader);
    TestNode::start(move |c| {
        follows(c);
        configure(c);
    })
    .await
}

/// The configuration of follower `name` of `leader` (its certificate, the cluster key).
fn follows(pki: &Pki, name: &str, leader: &TestNode) -> impl FnOnce(&mut Config) + use<> {
    let tls = pki.node(name);
    let key = pki.cluster_key();
    let leader_address = leader.node.replication_addr().to_string();
    let name = name.to_owned();
    move |c| {
        c.node_name = name;
        c.role = Role::Follower;
        c.leader_addresses = vec![leader_address];
        c.tls = Some(tls);
        c.cluster.key_file = Some(key);
    }
}

/// The leader's live followers (FollowerResolverHelper.GetFollowers).
async fn followers(pki: &Pki, leader: &str) -> Vec<goutube::proto::Server> {
    goutube_tests::followers_of(&pki.client_options("root", leader)).await
}

/// Waits until `follower` holds `point` exactly as `leader` does (size and CRC32C).
async fn converged(leader: &Client, follower: &Client, point: &str) {
    eventually(&format!("{point} to converge"), || {
        let (mut leader, mut follower) = (leader.clone(), follower.clone());
        async move { copied(&mut leader, &mut follower, point).await == Advance::Done }
    })
    .await;
}

/// Waits until `follower` holds `point` as `leader` does, for as long as its copy keeps growing:
/// for copies whose size, not a fault, sets the pace.
async fn converged_while_copying(leader: &Client, follower: &Client, point: &str) {
    eventually_advancing(&format!("{point} to converge"), DEADLINE, || {
        let (mut leader, mut follower) = (leader.clone(), follower.clone());
        async move { copied(&mut leader, &mut follower, point).await }
    })
    .await;
}

/// Whether `follower`'s copy of `point` is the leader's (size and CRC32C), or how much it holds.
async fn copied(leader: &mut Client, follower: &mut Client, point: &str) -> Advance {
    let want = metadata(leader, point)
        .await
        .expect("the leader has the point");
    match metadata(follower, point).await {
        Ok(got) if (got.size, got.crc32c) == (want.size, want.crc32c) => Advance::Done,
        Ok(got) => Advance::At(got.size),
        Err(_) => Advance::At(0),
    }
}

async fn content(client: &mut Client, point: &str) -> Vec<u8> {
    consume(client, window(point, 0, 0, 0))
        .await
        .unwrap()
        .concat()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_copies_its_leader() {
    let pki = Pki::new();
    let leader = leader(&pki, |_| {}).await;
    let follower = follower(&pki, "f1", &leader, |c| c.max_chunk_size = 256).await;
    let mut to_leader = pki.client("root", &leader.addr()).await;
    let mut to_follower = pki.client("root", &follower.addr()).await;

    // The original test: 10 frames to the leader, the same 10 frames from the follower.
    let frames: Vec<Vec<u8>> = (0..10).map(|i| data(i, 256)).collect();
    produce(&mut to_leader, "video", &frames).await.unwrap();
    converged(&to_leader, &to_follower, "video").await;
    let got = consume(&mut to_follower, window("video", 0, 0, 0))
        .await
        .unwrap();
    assert_eq!(got.len(), 10);
    for (got, want) in got.iter().zip(&frames) {
        assert_eq!(got.as_ref(), want.as_slice());
    }

    // The leader knows its follower, and offers it as a download worker once it holds a point.
    let followers = followers(&pki, &leader.addr()).await;
    assert_eq!(followers.len(), 1);
    assert_eq!(
        (followers[0].name.as_str(), followers[0].rpc_addr.clone()),
        ("f1", follower.addr())
    );
    let meta = metadata(&mut to_leader, "video").await.unwrap();
    assert_eq!(meta.workers, vec![leader.addr(), follower.addr()]);
    assert_eq!(meta.replicas.len(), 1);
    assert_eq!((meta.replicas[0].end, meta.replicas[0].lag), (2560, 0));

    // A follower serves reads and metadata but refuses writes, naming its leader.
    let status = produce(&mut to_follower, "video", &[data(99, 10)])
        .await
        .unwrap_err();
    // Its client API, where the write goes (the replication port is no place for a client).
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(
        status.message().contains(&leader.addr()),
        "{}",
        status.message()
    );
    assert_eq!(
        goutube::client::owner_of(&status),
        Some(goutube::client::Redirect {
            member: "leader".to_owned(),
            rpc_addr: leader.addr()
        })
    );
    let status = to_follower
        .delete_point(DeletePointRequest {
            point: "video".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(
        metadata(&mut to_follower, "video").await.unwrap().size,
        2560
    );
    follower.shutdown().await;
    leader.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_follower_catches_up_points_never_written_again() {
    let pki = Pki::new();
    let leader = leader(&pki, |_| {}).await;
    let mut to_leader = pki.client("root", &leader.addr()).await;
    let points = [("big", 3 * 1024 * 1024 + 7), ("small", 10_000), ("tiny", 1)];
    for (i, (point, len)) in points.iter().enumerate() {
        produce(&mut to_leader, point, &[data(i as u64, *len)])
            .await
            .unwrap();
    }
    // Only now does the follower join; nothing is written afterwards.
    let follower = follower(&pki, "late", &leader, |_| {}).await;
    let mut to_follower = pki.client("root", &follower.addr()).await;
    for (i, (point, len)) in points.iter().enumerate() {
        converged(&to_leader, &to_follower, point).await;
        assert_eq!(content(&mut to_follower, point).await, data(i as u64, *len));
    }
    follower.shutdown().await;
    leader.shutdown().await;
}

/// The size of the `i`th small point of the test below: 1 to 9,000 bytes, not in a pattern.
fn small_len(i: u64) -> usize {
    1 + (i * 7_919 % 9_000) as usize
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_follower_catches_up_many_small_points_while_some_are_deleted_or_grow() {
    // Many points per push: read on the leader and applied on the follower several at a time,
    // each point's description, records and removal still in its own order.
    let pki = Pki::new();
    let leader = leader(&pki, |_| {}).await;
    let mut to_leader = pki.client("root", &leader.addr()).await;
    let count = 600u64;
    let name = |i: u64| format!("many/{i:03}");
    let requests: Vec<ProduceRequest> = (0..count)
        .map(|i| ProduceRequest {
            point: name(i),
            frame: data(1_000 + i, small_len(i)).into(),
            // Every third point has a content type: it is described before its bytes.
            content_type: if i % 3 == 0 {
                "video/mp4".into()
            } else {
                String::new()
            },
            ..Default::default()
        })
        .collect();
    to_leader
        .produce_stream(tokio_stream::iter(requests))
        .await
        .unwrap();
    // A point of several records among them.
    let big = data(7, 3 * 1024 * 1024 + 11);
    produce(&mut to_leader, "many/big", std::slice::from_ref(&big))
        .await
        .unwrap();

    let follower = follower(&pki, "late", &leader, |_| {}).await;
    let mut to_follower = pki.client("root", &follower.addr()).await;
    // While it catches up: every tenth point is deleted (every twentieth made again at once,
    // with other bytes), and the one five after it grows.
    let mut deleted = Vec::new();
    for i in (0..count).step_by(10) {
        to_leader
            .delete_point(DeletePointRequest { point: name(i) })
            .await
            .unwrap();
        if i % 20 == 0 {
            produce(
                &mut to_leader,
                &name(i),
                &[data(9_000 + i, small_len(i + 1))],
            )
            .await
            .unwrap();
        } else {
            deleted.push(name(i));
        }
        produce(
            &mut to_leader,
            &name(i + 5),
            &[data(5_000 + i, small_len(i + 5))],
        )
        .await
        .unwrap();
    }
    converged_while_copying(&to_leader, &to_follower, "many/big").await;
    assert_eq!(content(&mut to_follower, "many/big").await, big);
    for i in (0..count).filter(|i| i % 20 == 0 || i % 10 != 0) {
        let point = name(i);
        converged(&to_leader, &to_follower, &point).await;
        let mut want = match i % 20 {
            0 => data(9_000 + i, small_len(i + 1)),
            _ => data(1_000 + i, small_len(i)),
        };
        if i % 10 == 5 {
            want.extend(data(5_000 + i - 5, small_len(i)));
        }
        assert_eq!(content(&mut to_follower, &point).await, want, "{point}");
        let got = metadata(&mut to_follower, &point).await.unwrap();
        let wanted = metadata(&mut to_leader, &point).await.unwrap();
        assert_eq!(got.content_type, wanted.content_type, "{point}");
    }
    for point in &deleted {
        eventually(&format!("{point} to be removed from the follower"), || {
            let mut to_follower = to_follower.clone();
            async move {
                metadata(&mut to_follower, point)
                    .await
                    .is_err_and(|status| status.code() == Code::NotFound)
            }
        })
        .await;
    }
    follower.shutdown().await;
    leader.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_follower_is_told_only_the_committed_ends_it_did_not_know() {
    // A follower serves each copy up to the committed end its leader told it, and offers that
    // end when it comes back: its leader tells it only the ends that moved meanwhile, not every
    // point's again (a million marks for a million points, each applied on its point).
    let pki = Pki::new();
    let leader = leader(&pki, |_| {}).await;
    let mut to_leader = pki.client("root", &leader.addr()).await;
    let count = 40u64;
    let name = |i: u64| format!("told/{i:02}");
    for i in 0..count {
        produce(&mut to_leader, &name(i), &[data(300 + i, small_len(i))])
            .await
            .unwrap();
    }
    let follower = follower(&pki, "told", &leader, |_| {}).await;
    let to_follower = pki.client("root", &follower.addr()).await;
    for i in 0..count {
        converged(&to_leader, &to_follower, &name(i)).await;
    }
    let marks = || {
        let scrape = goutube::metrics::handle().render();
        let told = r#"follower="told""#;
        goutube_tests::metric_where(&scrape, goutube::metrics::REPLICATION_COMMIT_MARKS, told)
            .unwrap_or(0.0)
    };
    let before = marks();
    assert!(before >= count as f64, "{before} marks for {count} points");

    // Back from a restart, with one point grown meanwhile and one new.
    let follower = follower.restart(follows(&pki, "told", &leader)).await;
    let to_follower = pki.client("root", &follower.addr()).await;
    produce(&mut to_leader, &name(7), &[data(900, 1_234)])
        .await
        .unwrap();
    produce(&mut to_leader, &name(count), &[data(901, 2_345)])
        .await
        .unwrap();
    for i in 0..=count {
        converged(&to_leader, &to_follower, &name(i)).await;
    }
    let since = marks() - before;
    assert!(
        (2.0..=6.0).contains(&since),
        "{since} marks after the restart, for 2 points that changed among {count}"
    );
    follower.shutdown().await;
    leader.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_point_deleted_and_made_again_smaller_is_committed_on_the_follower() {
    // Under `ack = { replicas = 1 }` a follower's copy is committed by the leader's marks,
    // sent at most every 10 ms. A point deleted right after a write, while the mark of that
    // write may still wait, and made again smaller: the mark of the old copy must not be sent
    // (nor stand for the new copy), and the new copy's lower end must be told all the same, or
    // the follower never serves it. Each round deletes at once after the write, to meet a
    // waiting mark in some of them.
    let pki = Pki::new();
    let leader = leader(&pki, |c| c.replication.ack = Ack::Replicas(1)).await;
    let follower = follower(&pki, "again", &leader, |_| {}).await;
    eventually("the follower to connect", || async {
        !followers(&pki, &leader.addr()).await.is_empty()
    })
    .await;
    let mut to_leader = pki.client("root", &leader.addr()).await;
    let mut to_follower = pki.client("root", &follower.addr()).await;
    for round in 0..20u64 {
        let first = 9_000 - 300 * round as usize;
        produce(&mut to_leader, "again", &[data(round, first)])
            .await
            .unwrap();
        to_leader
            .delete_point(DeletePointRequest {
                point: "again".into(),
            })
            .await
            .unwrap();
        let second = data(100 + round, first - 1_111);
        produce(&mut to_leader, "again", std::slice::from_ref(&second))
            .await
            .unwrap();
        converged(&to_leader, &to_follower, "again").await;
        assert_eq!(
            content(&mut to_follower, "again").await,
            second,
            "round {round}"
        );
        to_leader
            .delete_point(DeletePointRequest {
                point: "again".into(),
            })
            .await
            .unwrap();
    }
    follower.shutdown().await;
    leader.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_diverged_and_deleted_copies_are_repaired() {
    let pki = Pki::new();
    let leader = leader(&pki, |_| {}).await;
    let mut to_leader = pki.client("root", &leader.addr()).await;
    for (i, point) in ["lost", "diverged", "deleted", "kept"].iter().enumerate() {
        produce(&mut to_leader, point, &[data(i as u64, 100_000)])
            .await
            .unwrap();
    }
    let f = follower(&pki, "f1", &leader, |_| {}).await;
    let to_follower = pki.client("root", &f.addr()).await;
    for point in ["lost", "diverged", "deleted", "kept"] {
        converged(&to_leader, &to_follower, point).await;
    }

    // While the follower is down: it loses one copy, another grows bytes the leader never had,
    // and the leader deletes a point.
    let TestNode { node, dir } = f;
    node.shutdown().await.unwrap();
    let store = Store::open(goutube_tests::config(dir.path()).store_config())
        .await
        .unwrap();
    store.delete(&PointId::new("lost").unwrap()).await.unwrap();
    store
        .append(
            &PointId::new("diverged").unwrap(),
            Bytes::from(data(77, 500)),
        )
        .await
        .unwrap();
    store.close().await.unwrap();
    to_leader
        .delete_point(DeletePointRequest {
            point: "deleted".into(),
        })
        .await
        .unwrap();

    let node = goutube_tests::start_in(dir.path(), follows(&pki, "f1", &leader)).await;
    let f = TestNode { node, dir };
    let mut to_follower = pki.client("root", &f.addr()).await;
    for (i, point) in [(0, "lost"), (1, "diverged"), (3, "kept")] {
        converged(&to_leader, &to_follower, point).await;
        assert_eq!(
            content(&mut to_follower, point).await,
            data(i, 100_000),
            "{point}"
        );
    }
    eventually("the deleted point to disappear", || {
        let mut to_follower = to_follower.clone();
        async move {
            metadata(&mut to_follower, "deleted")
                .await
                .is_err_and(|s| s.code() == Code::NotFound)
        }
    })
    .await;

    // A live delete propagates too.
    to_leader
        .delete_point(DeletePointRequest {
            point: "kept".into(),
        })
        .await
        .unwrap();
    eventually("the live delete to propagate", || {
        let mut to_follower = to_follower.clone();
        async move {
            metadata(&mut to_follower, "kept")
                .await
                .is_err_and(|s| s.code() == Code::NotFound)
        }
    })
    .await;
    f.shutdown().await;
    leader.shutdown().await;
}

/// A follower offers what it holds in pages of `replication.offers_per_message`, the first in
/// its hello: its leader reconciles the copies of every page (here the last page alone names
/// a point the leader deleted meanwhile, and the third a copy that diverged) before it
/// replicates anything, and the follower ends identical.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_offers_its_copies_in_pages_and_every_page_counts() {
    let pki = Pki::new();
    let leader = leader(&pki, |_| {}).await;
    let mut to_leader = pki.client("root", &leader.addr()).await;
    let points: Vec<String> = (0..7).map(|i| format!("paged-{i}")).collect();
    for (i, point) in points.iter().enumerate() {
        produce(&mut to_leader, point, &[data(i as u64, 10_000 + 77 * i)])
            .await
            .unwrap();
    }
    let paged = |c: &mut Config| c.replication.offers_per_message = 2;
    let f = follower(&pki, "f1", &leader, paged).await;
    let to_follower = pki.client("root", &f.addr()).await;
    for point in &points {
        converged(&to_leader, &to_follower, point).await;
    }

    // While the follower is down, its copy of paged-5 grows bytes the leader never had, and
    // the leader deletes paged-6.
    let TestNode { node, dir } = f;
    node.shutdown().await.unwrap();
    let store = Store::open(goutube_tests::config(dir.path()).store_config())
        .await
        .unwrap();
    store
        .append(
            &PointId::new("paged-5").unwrap(),
            Bytes::from(data(99, 300)),
        )
        .await
        .unwrap();
    store.close().await.unwrap();
    to_leader
        .delete_point(DeletePointRequest {
            point: "paged-6".into(),
        })
        .await
        .unwrap();

    let follows = follows(&pki, "f1", &leader);
    let node = goutube_tests::start_in(dir.path(), move |c| {
        follows(c);
        paged(c);
    })
    .await;
    let f = TestNode { node, dir };
    let mut to_follower = pki.client("root", &f.addr()).await;
    for (i, point) in points.iter().enumerate().take(6) {
        converged(&to_leader, &to_follower, point).await;
        assert_eq!(
            content(&mut to_follower, point).await,
            data(i as u64, 10_000 + 77 * i),
            "{point}"
        );
    }
    eventually("the point deleted meanwhile to disappear", || {
        let mut to_follower = to_follower.clone();
        async move {
            metadata(&mut to_follower, "paged-6")
                .await
                .is_err_and(|s| s.code() == Code::NotFound)
        }
    })
    .await;
    f.shutdown().await;
    leader.shutdown().await;
}

/// A follower `goutube run` process with its data in `dir`.
fn follower_process(
    pki: &Pki,
    dir: &std::path::Path,
    name: &str,
    leader_replication: &str,
) -> NodeProcess {
    let config = goutube_tests::write_node_config(
        dir,
        name,
        &format!(
            "role = \"follower\"\nleader_addresses = [{leader_replication:?}]\n[storage]\nfsync = \"never\"\n{}",
            pki.node_toml(name)
        ),
    );
    NodeProcess::spawn(&config)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_killed_mid_stream_ends_identical() {
    let pki = Pki::new();
    let leader = leader(&pki, |c| c.storage.fsync = goutube::point::Fsync::Never).await;
    let to_leader = pki.client("root", &leader.addr()).await;
    let replication = leader.node.replication_addr().to_string();
    let dir = tempfile::tempdir().unwrap();

    let writer = tokio::spawn({
        let mut to_leader = to_leader.clone();
        async move {
            for batch in 0..60u64 {
                let point = format!("stream-{}", batch % 2);
                let frames: Vec<Vec<u8>> = (0..4)
                    .map(|i| data(batch * 10 + i, 40_000 + (i as usize) * 999))
                    .collect();
                produce(&mut to_leader, &point, &frames).await.unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    });
    // Kill the follower three times while the leader is being written to.
    for round in 0..3 {
        let process = follower_process(&pki, dir.path(), "f1", &replication);
        let to_follower = pki.client("root", &process.rpc).await;
        eventually("the follower to receive something", || {
            let mut to_follower = to_follower.clone();
            async move {
                metadata(&mut to_follower, "stream-0")
                    .await
                    .is_ok_and(|m| m.size > 0)
            }
        })
        .await;
        tokio::time::sleep(Duration::from_millis(20 + round * 30)).await;
        process.kill();
    }
    writer.await.unwrap();
    let process = follower_process(&pki, dir.path(), "f1", &replication);
    let mut to_follower = pki.client("root", &process.rpc).await;
    let mut to_leader = to_leader.clone();
    for point in ["stream-0", "stream-1"] {
        converged(&to_leader, &to_follower, point).await;
        assert_eq!(
            content(&mut to_follower, point).await,
            content(&mut to_leader, point).await
        );
    }
    assert!(process.terminate());
    leader.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_restart_causes_no_duplicate_bytes() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let (rpc_port, replication_port) = (free_port(), free_port());
    let config = goutube_tests::write_node_config(
        dir.path(),
        "leader",
        &format!(
            "role = \"leader\"\n[storage]\nfsync = \"always\"\n{}",
            pki.node_toml("leader")
        ),
    );
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("rpc_port = 0", &format!("rpc_port = {rpc_port}"))
        .replace(
            "replication_port = 0",
            &format!("replication_port = {replication_port}"),
        );
    std::fs::write(&config, text).unwrap();

    let leader = NodeProcess::spawn(&config);
    let mut to_leader = pki.client("root", &leader.rpc).await;
    let first: Vec<Vec<u8>> = (0..20).map(|i| data(i, 30_000 + i as usize)).collect();
    produce(&mut to_leader, "p", &first).await.unwrap();
    let tls = pki.node("f1");
    let key = pki.cluster_key();
    let follower = TestNode::start(move |c| {
        c.node_name = "f1".into();
        c.role = Role::Follower;
        c.leader_addresses = vec![format!("127.0.0.1:{replication_port}")];
        c.tls = Some(tls);
        c.cluster.key_file = Some(key);
    })
    .await;
    let mut to_follower = pki.client("root", &follower.addr()).await;
    converged(&to_leader, &to_follower, "p").await;

    // The leader dies without warning and comes back on the same ports; the follower
    // reconnects and offers its real end: nothing is sent twice.
    leader.kill();
    let leader = NodeProcess::spawn(&config);
    let mut to_leader = pki.client("root", &leader.rpc).await;
    let second: Vec<Vec<u8>> = (20..30).map(|i| data(i, 30_000 + i as usize)).collect();
    produce(&mut to_leader, "p", &second).await.unwrap();
    converged(&to_leader, &to_follower, "p").await;
    let want: Vec<u8> = first.concat().into_iter().chain(second.concat()).collect();
    assert_eq!(content(&mut to_follower, "p").await, want);
    assert_eq!(content(&mut to_leader, "p").await, want);
    follower.shutdown().await;
    assert!(leader.terminate());
}

/// Relays follower ↔ leader bytes, damaging one byte inside each of the first `damage` large
/// messages from the leader (Cap'n Proto stream framing: segment table, then segments; the
/// record's bytes are at the end of a push message).
async fn corrupting_proxy(leader: std::net::SocketAddr, damage: usize) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut damaged = 0;
        loop {
            let Ok((downstream, _)) = listener.accept().await else {
                return;
            };
            let Ok(upstream) = tokio::net::TcpStream::connect(leader).await else {
                continue;
            };
            let (mut down_read, mut down_write) = downstream.into_split();
            let (mut up_read, mut up_write) = upstream.into_split();
            tokio::spawn(async move { tokio::io::copy(&mut down_read, &mut up_write).await });
            let to_damage = damage.saturating_sub(damaged);
            damaged += to_damage;
            tokio::spawn(async move {
                let mut left = to_damage;
                loop {
                    let mut count = [0u8; 4];
                    if up_read.read_exact(&mut count).await.is_err() {
                        return;
                    }
                    let segments = u32::from_le_bytes(count) as usize + 1;
                    let mut sizes =
                        vec![0u8; 4 * segments + if segments.is_multiple_of(2) { 4 } else { 0 }];
                    up_read.read_exact(&mut sizes).await.unwrap();
                    let words: usize = (0..segments)
                        .map(|i| {
                            u32::from_le_bytes(sizes[4 * i..4 * i + 4].try_into().unwrap()) as usize
                        })
                        .sum();
                    let mut body = vec![0u8; words * 8];
                    up_read.read_exact(&mut body).await.unwrap();
                    if left > 0 && body.len() > 64 * 1024 {
                        let at = body.len() - 4096;
                        body[at] ^= 0x40;
                        left -= 1;
                    }
                    let message = [&count[..], &sizes[..], &body[..]].concat();
                    if down_write.write_all(&message).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_damaged_on_the_wire_is_rejected_and_sent_again() {
    // Plaintext: on TLS a damaged byte kills the connection before the bundler sees it.
    let leader = TestNode::start(|c| {
        c.node_name = "leader".into();
        c.role = Role::Leader;
    })
    .await;
    let proxy = corrupting_proxy(leader.node.replication_addr(), 2).await;
    let follower = TestNode::start(move |c| {
        c.node_name = "f1".into();
        c.role = Role::Follower;
        c.leader_addresses = vec![proxy.to_string()];
    })
    .await;
    let rejected = || counter(goutube::metrics::REPLICATION_REJECTED);
    let before = rejected();
    let mut to_leader = leader.client().await;
    let frames: Vec<Vec<u8>> = (0..8).map(|i| data(i, 256 * 1024)).collect();
    produce(&mut to_leader, "p", &frames).await.unwrap();
    let to_follower = follower.client().await;
    converged(&to_leader, &to_follower, "p").await;
    let mut to_follower = to_follower.clone();
    assert_eq!(content(&mut to_follower, "p").await, frames.concat());
    // Each damaged record was counted by the follower (rejected) and the leader (told so).
    assert!(rejected() >= before + 2.0, "{before} -> {}", rejected());
    follower.shutdown().await;
    leader.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bundler_answer_for_another_record_is_rejected_not_applied() {
    let leader = TestNode::start(|c| {
        c.node_name = "leader".into();
        c.role = Role::Leader;
    })
    .await;
    let mut to_leader = leader.client().await;
    produce(&mut to_leader, "p", &[data(1, 300_000), data(2, 5_000)])
        .await
        .unwrap();
    let rejected = || counter(goutube::metrics::REPLICATION_REJECTED);
    let bundler =
        PathBuf::from(goutube::plugins::builtin::BUILD_DIR).join("misbehaving_bundler.wasm");
    for mode in ["other-point", "other-start", "outside", "read-outside"] {
        let before = rejected();
        let (address, bundler) = (leader.node.replication_addr().to_string(), bundler.clone());
        let follower = TestNode::start(move |c| {
            c.node_name = "f1".into();
            c.role = Role::Follower;
            c.leader_addresses = vec![address];
            c.plugins.bundler.source = bundler.to_str().unwrap().into();
            c.plugins.bundler.config = mode.into();
        })
        .await;
        // The leader keeps sending, the follower keeps refusing: never applied, counted each time.
        eventually(&format!("{mode}: records rejected"), || async {
            rejected() >= before + 3.0
        })
        .await;
        let mut to_follower = follower.client().await;
        let held = metadata(&mut to_follower, "p").await;
        assert!(
            held.as_ref().is_err_and(|s| s.code() == Code::NotFound),
            "{mode}: {held:?}"
        );
        follower.shutdown().await;
    }
    leader.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ack_replicas_waits_for_followers_and_times_out_without_them() {
    let pki = Pki::new();
    let leader = leader(&pki, |c| {
        c.replication.ack = Ack::Replicas(1);
        c.replication.ack_timeout_ms = 1_000;
    })
    .await;
    let mut to_leader = pki.client("root", &leader.addr()).await;
    let f = follower(&pki, "f1", &leader, |_| {}).await;
    let mut to_follower = pki.client("root", &f.addr()).await;
    eventually("the follower to connect", || async {
        !followers(&pki, &leader.addr()).await.is_empty()
    })
    .await;

    // Acknowledged means the follower has it already.
    let record = produce(&mut to_leader, "p", &[data(1, 50_000)])
        .await
        .unwrap()
        .records[0]
        .clone();
    let held = metadata(&mut to_follower, "p")
        .await
        .expect("replicated before the acknowledgement");
    assert_eq!(
        (held.stored_size, held.stored_crc32c),
        (Some(record.end), Some(record.crc32c))
    );
    // And the leader serves it from the acknowledgement on: committed before the answer, by
    // the produce call or by the follower's confirmation, whichever came first.
    let served = metadata(&mut to_leader, "p").await.unwrap();
    assert_eq!((served.size, served.crc32c), (record.end, record.crc32c));

    // Without the follower the produce fails after the timeout, but the data stays and follows.
    let TestNode { node, dir } = f;
    node.shutdown().await.unwrap();
    let started = Instant::now();
    // Whether f1 had entered the leader's in-sync set yet or not, the leader waits for it.
    let refused = unacknowledged(&mut to_leader, "p", data(2, 50_000)).await;
    assert!(
        refused.contains("in-sync follower f1 has not confirmed")
            || refused.contains("only 0 of 1 followers"),
        "{refused}"
    );
    assert!(started.elapsed() >= Duration::from_millis(900) && started.elapsed() < DEADLINE);
    // Stored on the leader, and not served: no follower confirmed it.
    let meta = metadata(&mut to_leader, "p").await.unwrap();
    assert_eq!((meta.size, meta.stored_size), (50_000, Some(100_000)));

    let node = goutube_tests::start_in(dir.path(), follows(&pki, "f1", &leader)).await;
    let to_follower = pki.client("root", &node.rpc_addr().to_string()).await;
    converged(&to_leader, &to_follower, "p").await;
    node.shutdown().await.unwrap();
    leader.shutdown().await;
}

/// The leader's replica group as the controller committed it: (followers, in-sync set).
async fn group(to_leader: &mut Client) -> (Vec<String>, Vec<String>) {
    let members = to_leader
        .list_members(ListMembersRequest {})
        .await
        .unwrap()
        .into_inner();
    let controller = members.controller.unwrap_or_default();
    let group = controller.groups.into_iter().find(|g| g.slot == "leader");
    group.map_or_else(Default::default, |g| (g.followers, g.in_sync))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_in_sync_follower_holds_what_was_acknowledged_and_leaves_only_by_a_commit() {
    let pki = Pki::new();
    let leader = leader(&pki, |c| {
        c.replication.ack = Ack::Replicas(1);
        c.replication.ack_timeout_ms = 1_000;
        c.replication.in_sync_timeout_ms = 3_000;
    })
    .await;
    let mut to_leader = pki.client("root", &leader.addr()).await;
    // Something to catch up on before the followers come.
    let before = produce_local(&mut to_leader, "early", 300_000).await;
    let f1 = follower(&pki, "f1", &leader, |_| {}).await;
    let f2 = follower(&pki, "f2", &leader, |_| {}).await;
    let both = vec!["f1".to_owned(), "f2".to_owned()];
    eventually("both followers to enter the in-sync set", || {
        let (mut to_leader, both) = (to_leader.clone(), both.clone());
        async move { group(&mut to_leader).await == (both.clone(), both) }
    })
    .await;
    let (mut to_f1, mut to_f2) = (
        pki.client("root", &f1.addr()).await,
        pki.client("root", &f2.addr()).await,
    );
    for to_follower in [&mut to_f1, &mut to_f2] {
        assert_eq!(metadata(to_follower, "early").await.unwrap().crc32c, before);
    }

    // Acknowledged with replicas = 1 means held by *every* in-sync follower.
    for round in 0..5u8 {
        let record = produce(
            &mut to_leader,
            "p",
            &[data(round.into(), 70_000 + usize::from(round))],
        )
        .await
        .unwrap()
        .records[0]
            .clone();
        // Nothing else writes: each holds exactly the acknowledged bytes (size and CRC32C).
        for to_follower in [&mut to_f1, &mut to_f2] {
            let held = metadata(to_follower, "p").await.unwrap();
            assert_eq!(
                (held.stored_size, held.stored_crc32c),
                (Some(record.end), Some(record.crc32c)),
                "round {round}"
            );
        }
    }

    // f3 confirms before it syncs (fsync = "never"): it follows and holds every byte, but is
    // no member of the in-sync set (each check of the set below would find it otherwise).
    let f3 = follower(&pki, "f3", &leader, |c| {
        c.storage.fsync = goutube::point::Fsync::Never;
    })
    .await;
    let to_f3 = pki.client("root", &f3.addr()).await;
    eventually("f3 to follow the group", || {
        let mut to_leader = to_leader.clone();
        async move { group(&mut to_leader).await.0.contains(&"f3".to_owned()) }
    })
    .await;
    converged(&to_leader, &to_f3, "p").await;

    // f2 stops: until its removal is committed, the leader waits for it by name.
    let TestNode { node, dir } = f2;
    node.shutdown().await.unwrap();
    let refused = unacknowledged(&mut to_leader, "p", data(9, 50_000)).await;
    assert!(
        refused.contains("in-sync follower f2 has not confirmed"),
        "{refused}"
    );
    eventually("f2 to leave the in-sync set", || {
        let mut to_leader = to_leader.clone();
        async move { group(&mut to_leader).await.1 == ["f1"] }
    })
    .await;
    let record = produce(&mut to_leader, "p", &[data(10, 50_000)])
        .await
        .unwrap()
        .records[0]
        .clone();
    let held = metadata(&mut to_f1, "p").await.unwrap();
    assert!(held.stored_size.unwrap() >= record.end, "{held:?}");

    // Back, it catches up and enters again; from then on it holds every acknowledged byte.
    let node = goutube_tests::start_in(dir.path(), follows(&pki, "f2", &leader)).await;
    eventually("f2 to enter the in-sync set again", || {
        let (mut to_leader, both) = (to_leader.clone(), both.clone());
        async move { group(&mut to_leader).await.1 == both }
    })
    .await;
    let mut to_f2 = pki.client("root", &node.rpc_addr().to_string()).await;
    let record = produce(&mut to_leader, "p", &[data(11, 50_000)])
        .await
        .unwrap()
        .records[0]
        .clone();
    let held = metadata(&mut to_f2, "p").await.unwrap();
    assert_eq!(held.stored_size, Some(record.end));
    assert!(group(&mut to_leader).await.0.contains(&"f3".to_owned()));
    node.shutdown().await.unwrap();
    f3.shutdown().await;
    f1.shutdown().await;
    leader.shutdown().await;
}

/// Appends `bytes` to `point` through a leader that cannot acknowledge it; the refusal's
/// message (the status is `Unavailable`; the bytes stay on the leader).
async fn unacknowledged(to_leader: &mut Client, point: &str, bytes: Vec<u8>) -> String {
    let status = produce(to_leader, point, &[bytes]).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    status.message().to_owned()
}

/// Stores a point of `size` bytes on `leader` while it has no follower (the produce is not
/// acknowledged, but the bytes stay and replicate later); its CRC32C.
/// (A leader that holds no session with the controller yet refuses before it stores: then the
/// produce is sent again.)
async fn produce_local(to_leader: &mut Client, point: &str, size: usize) -> u32 {
    eventually_some("the leader to store the point", || {
        let mut to_leader = to_leader.clone();
        async move {
            let refused = unacknowledged(&mut to_leader, point, data(77, size)).await;
            let stored = metadata(&mut to_leader, point).await.ok();
            assert!(stored.is_some() || refused.contains("session"), "{refused}");
            // Not acknowledged: stored, not served.
            stored.and_then(|m| m.stored_crc32c)
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_follower_blocks_neither_the_leader_nor_other_followers() {
    let pki = Pki::new();
    let leader = leader(&pki, |c| c.storage.fsync = goutube::point::Fsync::Never).await;
    let mut to_leader = pki.client("root", &leader.addr()).await;
    let replication = leader.node.replication_addr().to_string();
    let dir = tempfile::tempdir().unwrap();
    let stalled = follower_process(&pki, dir.path(), "stalled", &replication);
    let healthy = follower(&pki, "healthy", &leader, |_| {}).await;
    let to_healthy = pki.client("root", &healthy.addr()).await;
    eventually("both followers to connect", || async {
        followers(&pki, &leader.addr()).await.len() == 2
    })
    .await;

    stalled.signal("STOP");
    // Far more than a replication window: the stalled follower's window fills up and stays full.
    let frames: Vec<Vec<u8>> = (0..96).map(|i| data(i, 256 * 1024)).collect();
    for chunk in frames.chunks(8) {
        let started = Instant::now();
        produce(&mut to_leader, "p", chunk).await.unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "a produce waited for the stalled follower"
        );
    }
    converged(&to_leader, &to_healthy, "p").await;
    let lag = metadata(&mut to_leader, "p").await.unwrap().replicas;
    let stalled_lag = lag
        .iter()
        .find(|r| r.follower == "stalled")
        .expect("the stalled follower is listed");
    assert!(
        stalled_lag.lag > 0,
        "the lagging follower is visible: {lag:?}"
    );

    stalled.signal("CONT");
    let to_stalled = pki.client("root", &stalled.rpc).await;
    converged(&to_leader, &to_stalled, "p").await;
    healthy.shutdown().await;
    assert!(stalled.terminate());
    leader.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_the_policy_does_not_let_replicate_gets_nothing() {
    let pki = Pki::new();
    let leader = leader(&pki, |_| {}).await;
    let mut to_leader = pki.client("root", &leader.addr()).await;
    produce(&mut to_leader, "secret", &[data(1, 1000)])
        .await
        .unwrap();
    // The intruder dials with a client certificate of the right CA, but not a node certificate.
    let intruder = pki.client_options("intruder", "");
    let intruder_tls = intruder.tls.unwrap();
    let refused = || counter(goutube::metrics::REPLICATION_REFUSED);
    let before = refused();
    let f = follower(&pki, "sneaky", &leader, move |c| {
        c.tls.as_mut().unwrap().peer = Some(PeerTlsSection {
            ca: None,
            cert: Some(intruder_tls.cert),
            key: Some(intruder_tls.key),
        })
    })
    .await;
    eventually("the leader to refuse the intruder", || async {
        refused() > before
    })
    .await;
    let mut to_follower = pki.client("root", &f.addr()).await;
    assert!(
        metadata(&mut to_follower, "secret")
            .await
            .is_err_and(|s| s.code() == Code::NotFound)
    );
    assert!(followers(&pki, &leader.addr()).await.is_empty());
    f.shutdown().await;
    leader.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_followers_replicate_a_gibibyte() {
    const POINTS: u64 = 4;
    const FRAMES: u64 = 1024; // 4 points x 1024 frames x 256 KiB = 1 GiB
    let pki = Pki::new();
    let never = |c: &mut Config| c.storage.fsync = goutube::point::Fsync::Never;
    let leader = leader(&pki, never).await;
    let mut followers = Vec::new();
    for name in ["f1", "f2", "f3"] {
        followers.push(follower(&pki, name, &leader, never).await);
    }
    let to_leader = pki.client("root", &leader.addr()).await;
    let mut writers = Vec::new();
    for p in 0..POINTS {
        let mut to_leader = to_leader.clone();
        writers.push(tokio::spawn(async move {
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            let call = tokio::spawn(async move {
                to_leader
                    .produce_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
                    .await
            });
            for i in 0..FRAMES {
                let frame = Bytes::from(data(p * FRAMES + i, 256 * 1024));
                let request = ProduceRequest {
                    point: format!("gib-{p}"),
                    frame,
                    ..Default::default()
                };
                if tx.send(request).await.is_err() {
                    break; // the call ended: its status below says why
                }
            }
            drop(tx);
            if let Err(status) = call.await.unwrap() {
                panic!("producing gib-{p}: {status}");
            }
        }));
    }
    for writer in writers {
        writer.await.unwrap();
    }
    let mut to_leader = to_leader.clone();
    for p in 0..POINTS {
        let point = format!("gib-{p}");
        let want = metadata(&mut to_leader, &point).await.unwrap();
        assert_eq!(want.size, FRAMES * 256 * 1024);
        for follower in &followers {
            let to_follower = pki.client("root", &follower.addr()).await;
            // A gibibyte to three followers: its size and the disk, not a fault, set the pace.
            converged_while_copying(&to_leader, &to_follower, &point).await;
        }
    }
    for follower in followers {
        follower.shutdown().await;
    }
    leader.shutdown().await;
}

/// A node certificate is not a pass for any name: a follower that calls itself `f2` while
/// presenting the certificate of `f3` is refused, and so is a leader whose certificate names
/// another node than the one it says it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_certificate_must_name_the_node_it_claims() {
    let pki = Pki::new();
    let leader = leader(&pki, |_| {}).await;
    let mut to_leader = pki.client("root", &leader.addr()).await;
    produce(&mut to_leader, "p", &[data(3, 5000)])
        .await
        .unwrap();
    let refused = || counter(goutube::metrics::REPLICATION_REFUSED);
    let before = refused();
    let other = pki.node("f3");
    let impostor = follower(&pki, "f2", &leader, move |c| {
        c.tls.as_mut().unwrap().peer = Some(PeerTlsSection {
            ca: None,
            cert: Some(other.cert),
            key: Some(other.key),
        })
    })
    .await;
    eventually("the leader to refuse the impostor", || async {
        refused() > before
    })
    .await;
    let mut to_impostor = pki.client("root", &impostor.addr()).await;
    assert!(
        metadata(&mut to_impostor, "p")
            .await
            .is_err_and(|s| s.code() == Code::NotFound)
    );
    assert!(followers(&pki, &leader.addr()).await.is_empty());
    impostor.shutdown().await;

    // The leader's side: a leader named `leader` serving with the certificate of `f9`.
    let forged = pki.node("f9");
    let liar = TestNode::start(|c| {
        c.node_name = "leader".into();
        c.role = Role::Leader;
        c.tls = Some(forged);
        c.cluster.key_file = Some(pki.cluster_key());
    })
    .await;
    let before = refused();
    let follower = follower(&pki, "f4", &liar, |_| {}).await;
    eventually("the follower to refuse the leader", || async {
        refused() > before
    })
    .await;
    assert!(followers(&pki, &liar.addr()).await.is_empty());
    follower.shutdown().await;
    liar.shutdown().await;
    leader.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn epochs_decide_between_the_leaders_copy_and_the_followers() {
    let pki = Pki::new();
    let leader = leader(&pki, |_| {}).await;
    let mut to_leader = pki.client("root", &leader.addr()).await;
    let id = |point: &str| PointId::new(point).unwrap();
    let epoch = |epoch| Ownership {
        epoch,
        owner: None,
        handover: None,
    };
    for (i, point) in ["handed-over", "older-there", "newer-there"]
        .iter()
        .enumerate()
    {
        produce(&mut to_leader, point, &[data(i as u64, 100_000)])
            .await
            .unwrap();
    }
    // A point this leader received in a handover: its followers' copies take its epoch.
    let leader_store = leader.node.store().unwrap();
    leader_store
        .set_ownership(&id("handed-over"), epoch(3))
        .await
        .unwrap();
    let f = follower(&pki, "f1", &leader, |_| {}).await;
    let mut to_follower = pki.client("root", &f.addr()).await;
    for point in ["handed-over", "older-there", "newer-there"] {
        converged(&to_leader, &to_follower, point).await;
    }
    let described = metadata(&mut to_follower, "handed-over").await.unwrap();
    assert_eq!(described.epoch, 3);
    // An epoch that changes on the leader reaches the connected follower, without new bytes.
    leader_store
        .set_ownership(&id("handed-over"), epoch(4))
        .await
        .unwrap();
    goutube_tests::eventually("the follower to take the new epoch", || async {
        metadata(&mut to_follower.clone(), "handed-over")
            .await
            .is_ok_and(|m| m.epoch == 4)
    })
    .await;

    // While the follower is down, both copies of two points grow different bytes of the same
    // length: only epochs can tell which copy is right.
    let TestNode { node, dir } = f;
    node.shutdown().await.unwrap();
    let store = Store::open(goutube_tests::config(dir.path()).store_config())
        .await
        .unwrap();
    for point in ["older-there", "newer-there"] {
        store
            .append(&id(point), Bytes::from(data(90, 500)))
            .await
            .unwrap();
    }
    store
        .set_ownership(&id("newer-there"), epoch(9))
        .await
        .unwrap();
    store.close().await.unwrap();
    for point in ["older-there", "newer-there"] {
        produce(&mut to_leader, point, &[data(91, 500)])
            .await
            .unwrap();
    }
    leader_store
        .set_ownership(&id("older-there"), epoch(4))
        .await
        .unwrap();
    let newer_before = counter("goutube_replication_newer_copies_total");

    let node = goutube_tests::start_in(dir.path(), follows(&pki, "f1", &leader)).await;
    let f = TestNode { node, dir };
    let mut to_follower = pki.client("root", &f.addr()).await;

    // An older copy is replaced whole, even where its length matched.
    converged(&to_leader, &to_follower, "older-there").await;
    assert_eq!(
        content(&mut to_follower, "older-there").await,
        [data(1, 100_000), data(91, 500)].concat()
    );
    assert_eq!(
        metadata(&mut to_follower, "older-there")
            .await
            .unwrap()
            .epoch,
        4
    );

    // A newer copy is left as it is, and later appends of the stale leader do not reach it.
    eventually("the leader to see the newer copy", || async {
        counter("goutube_replication_newer_copies_total") > newer_before
    })
    .await;
    produce(&mut to_leader, "newer-there", &[data(92, 700)])
        .await
        .unwrap();
    produce(&mut to_leader, "after", &[data(93, 800)])
        .await
        .unwrap();
    converged(&to_leader, &to_follower, "after").await;
    assert_eq!(
        content(&mut to_follower, "newer-there").await,
        [data(2, 100_000), data(90, 500)].concat()
    );
    assert_eq!(
        metadata(&mut to_follower, "newer-there")
            .await
            .unwrap()
            .epoch,
        9
    );
    // Nor does a delete.
    to_leader
        .delete_point(DeletePointRequest {
            point: "newer-there".into(),
        })
        .await
        .unwrap();
    to_leader
        .delete_point(DeletePointRequest {
            point: "after".into(),
        })
        .await
        .unwrap();
    eventually("the delete of the other point to propagate", || {
        let mut to_follower = to_follower.clone();
        async move {
            metadata(&mut to_follower, "after")
                .await
                .is_err_and(|s| s.code() == Code::NotFound)
        }
    })
    .await;
    assert!(metadata(&mut to_follower, "newer-there").await.is_ok());
    f.shutdown().await;
    leader.shutdown().await;
}
