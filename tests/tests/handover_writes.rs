//! What a client's write meets while its point is handed to a new owner (docs/resharding.md):
//! held at the fence until the switch (or failed retryably when the fence lasts too long),
//! then redirected to the new owner; refused, naming the old owner, where the point is still
//! arriving; a delete waits for the handover to end. The records are set directly in the store
//! here; the mover sets them in a cluster.

use std::time::{Duration, Instant};

use bytes::Bytes;
use goutube::config::Role;
use goutube::point::{Handover, Ownership, PointId};
use goutube::proto::{DeletePointRequest, ProduceRequest};
use goutube_tests::{
    TestNode, consume, data, eventually, http, metadata, owner, produce, sees, window,
};
use tonic::Code;

fn frame(point: &str, expected_offset: u64, bytes: &[u8]) -> ProduceRequest {
    ProduceRequest {
        point: point.into(),
        frame: Bytes::copy_from_slice(bytes),
        expected_offset: Some(expected_offset),
        ..Default::default()
    }
}

/// A write of 50 bytes at offset 100 of point `p` on `node`, which must be refused.
async fn refused_write(node: &TestNode) -> tonic::Status {
    node.client()
        .await
        .produce_stream(tokio_stream::iter([frame("p", 100, &data(2, 50))]))
        .await
        .expect_err("the write is refused")
}

fn with(handover: Handover) -> Ownership {
    Ownership {
        epoch: 2,
        owner: None,
        handover: Some(handover),
    }
}

fn sealed(to: &str, end: u64) -> Ownership {
    with(Handover::Sealed {
        to: to.into(),
        end,
        crc: 0,
        target_ring: 1,
    })
}

/// Two primaries in one ring, both seeing the other; returns them with a point `a` owns.
async fn pair() -> (TestNode, TestNode, String) {
    let a = TestNode::start(|c| {
        c.node_name = "a".into();
        c.role = Role::Leader;
        c.cluster.bootstrap_expect = 2;
        // The records are set by hand here: no mover acts on them.
        c.reshard.max_concurrent_moves = 0;
    })
    .await;
    let seed = a.node.gossip_addr().to_string();
    let b = TestNode::start(move |c| {
        c.node_name = "b".into();
        c.role = Role::Leader;
        c.seed_addresses = vec![seed];
        c.cluster.bootstrap_expect = 2;
        c.reshard.max_concurrent_moves = 0;
    })
    .await;
    eventually("both to see each other in the formed ring", || async {
        sees(&a, 2).await && sees(&b, 2).await
    })
    .await;
    let point = owned_by(&a, "a", "videos").await;
    (a, b, point)
}

/// A point id starting with `prefix` whose owner in the ring, as `node` sees it, is `name`.
async fn owned_by(node: &TestNode, name: &str, prefix: &str) -> String {
    for i in 0.. {
        let point = format!("{prefix}/{i}");
        if owner(node, &point).await == name {
            return point;
        }
    }
    unreachable!()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_write_waits_for_the_switch_then_goes_where_the_point_went() {
    let (a, b, point) = pair().await;
    let id = PointId::new(point.as_str()).unwrap();
    let store = a.node.store().unwrap();
    let first = data(1, 10_000);
    produce(&mut a.client().await, &point, std::slice::from_ref(&first))
        .await
        .unwrap();
    let client = a.client().await;
    let write = |offset: u64, bytes: Vec<u8>| {
        let mut client = client.clone();
        let request = frame(&point, offset, &bytes);
        tokio::spawn(async move {
            client
                .produce_stream(tokio_stream::iter([request]))
                .await
                .map(|r| r.into_inner())
        })
    };

    // Fenced, then unfenced (a handover that went back): the held write is applied.
    store.set_ownership(&id, sealed("b", 10_000)).await.unwrap();
    let mut held = write(10_000, data(2, 3000));
    assert!(
        tokio::time::timeout(Duration::from_millis(300), &mut held)
            .await
            .is_err(),
        "a write at the fence waits"
    );
    store
        .set_ownership(&id, Ownership::default())
        .await
        .unwrap();
    let written = held.await.unwrap().expect("applied once the fence lifts");
    assert_eq!(written.records[0].end, 13_000);

    // Fenced, then switched: the held write is redirected to the new owner.
    store.set_ownership(&id, sealed("b", 13_000)).await.unwrap();
    let mut held = write(13_000, data(3, 3000));
    assert!(
        tokio::time::timeout(Duration::from_millis(300), &mut held)
            .await
            .is_err()
    );
    store
        .set_ownership(
            &id,
            with(Handover::Moved {
                to: "b".into(),
                epoch: 3,
            }),
        )
        .await
        .unwrap();
    let refused = held.await.unwrap().unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    let metadata = refused.metadata();
    assert_eq!(metadata.get("goutube-owner").unwrap(), "b");
    assert_eq!(
        metadata.get("goutube-owner-addr").unwrap(),
        b.addr().as_str()
    );

    // Reads of the old copy go on; nothing was written after the switch.
    let got = consume(&mut a.client().await, window(&point, 0, 0, 0))
        .await
        .unwrap()
        .concat();
    assert_eq!(got, [first, data(2, 3000)].concat());
    b.shutdown().await;
    a.shutdown().await;
}

/// A copy still arriving is not served, by gRPC nor HTTP, before or after a restart; once its
/// handover commits, it is.
#[tokio::test]
async fn a_copy_still_arriving_is_not_served_until_its_handover_commits() {
    let node = TestNode::start(|_| {}).await;
    let id = PointId::new("p").unwrap();
    let bytes = data(3, 5000);
    produce(&mut node.client().await, "p", std::slice::from_ref(&bytes))
        .await
        .unwrap();
    let arriving = with(Handover::Incoming {
        from: "b".into(),
        epoch: 1,
    });
    let store = node.node.store().unwrap();
    store.set_ownership(&id, arriving).await.unwrap();
    // Restarted on its data, the node still knows the copy is arriving.
    let node = node.restart(|_| {}).await;
    let mut client = node.client().await;
    let refused = consume(&mut client, window("p", 0, 0, 0))
        .await
        .unwrap_err();
    // b is not a live member here: the refusal names it as the owner that is down.
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert_eq!(refused.metadata().get("goutube-owner").unwrap(), "b");
    let refused = metadata(&mut client, "p").await.unwrap_err();
    assert_eq!(refused.metadata().get("goutube-owner").unwrap(), "b");
    let answer = http(node.node.http_addr(), "GET", "/v1/points/p", &[], None).await;
    assert_eq!(answer.status, 404, "the gateway does not serve it either");
    let store = node.node.store().unwrap();
    let committed = Ownership {
        epoch: 2,
        owner: Some("test-node".into()),
        handover: None,
    };
    store.set_ownership(&id, committed).await.unwrap();
    let mut client = node.client().await;
    let read = consume(&mut client, window("p", 0, 0, 0)).await.unwrap();
    assert!(read.concat() == bytes);
    assert_eq!(metadata(&mut client, "p").await.unwrap().epoch, 2);
    node.shutdown().await;
}

#[tokio::test]
async fn a_fence_that_lasts_too_long_fails_the_write_retryably() {
    let node = TestNode::start(|c| {
        c.reshard.fence_timeout_ms = 300;
        c.reshard.max_concurrent_moves = 0;
    })
    .await;
    let id = PointId::new("p").unwrap();
    produce(&mut node.client().await, "p", &[data(1, 100)])
        .await
        .unwrap();
    let store = node.node.store().unwrap();
    store.set_ownership(&id, sealed("b", 100)).await.unwrap();
    let started = Instant::now();
    let refused = refused_write(&node).await;
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert!(
        refused.message().contains("reshard.fence_timeout_ms"),
        "{}",
        refused.message()
    );
    assert_eq!(store.metadata(&id).await.unwrap().end, 100);

    // A point still arriving here is written at the member handing it over.
    store
        .set_ownership(
            &id,
            with(Handover::Incoming {
                from: "b".into(),
                epoch: 2,
            }),
        )
        .await
        .unwrap();
    let refused = refused_write(&node).await;
    // b is not a live member here: the refusal names it as the owner that is down.
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert_eq!(refused.metadata().get("goutube-owner").unwrap(), "b");
    assert_eq!(store.metadata(&id).await.unwrap().end, 100);

    // A point in a handover is not deleted under it.
    store
        .set_ownership(
            &id,
            with(Handover::Copying {
                to: "b".into(),
                target_ring: 1,
            }),
        )
        .await
        .unwrap();
    let refused = node
        .client()
        .await
        .delete_point(DeletePointRequest { point: "p".into() })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert!(
        refused.message().contains("once the handover is over"),
        "{}",
        refused.message()
    );
    assert_eq!(store.metadata(&id).await.unwrap().end, 100);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_follows_a_handed_over_point_to_the_member_that_committed_it() {
    let (a, b, point) = pair().await;
    let id = PointId::new(point.as_str()).unwrap();
    let first = data(5, 70_000);
    produce(&mut a.client().await, &point, std::slice::from_ref(&first))
        .await
        .unwrap();
    // The state right after a handover's switch: b committed epoch 2 of the point (whose ring
    // owner is still a), a redirects its writes there.
    let (a_store, b_store) = (a.node.store().unwrap(), b.node.store().unwrap());
    b_store
        .apply_replicated(
            &id,
            0,
            vec![(Bytes::from(first.clone()), crc32c::crc32c(&first))],
            goutube::point::Visibility::Now,
        )
        .await
        .unwrap();
    b_store
        .set_ownership(
            &id,
            Ownership {
                epoch: 2,
                owner: Some("b".into()),
                handover: None,
            },
        )
        .await
        .unwrap();
    a_store
        .set_ownership(
            &id,
            with(Handover::Moved {
                to: "b".into(),
                epoch: 2,
            }),
        )
        .await
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("more.bin");
    let more = data(6, 1_000_000);
    std::fs::write(&file, &more).unwrap();
    let client = goutube::client::Client::connect(&goutube::client::ClientOptions {
        addr: a.addr(),
        tls: None,
    })
    .await
    .unwrap();
    let report = client
        .put(
            &point,
            &file,
            &goutube::client::PutOptions {
                mode: goutube::client::PutMode::Append,
                ..Default::default()
            },
            std::sync::Arc::new(goutube::client::Quiet),
        )
        .await
        .expect("the put goes to the member that committed the point");
    assert_eq!(
        report.redirected,
        Some(goutube::client::Redirect {
            member: "b".to_string(),
            rpc_addr: b.addr()
        })
    );
    let on_b = consume(&mut b.client().await, window(&point, 0, 0, 0))
        .await
        .unwrap()
        .concat();
    assert!(on_b == [&first[..], &more].concat());
    assert_eq!(a_store.metadata(&id).await.unwrap().end, first.len() as u64);

    // A copy at a later epoch that was not committed here (a follower's, say) gives no right
    // to write: the ring decides.
    let copy = PointId::new(owned_by(&b, "a", "copies").await).unwrap();
    b_store
        .set_ownership(
            &copy,
            Ownership {
                epoch: 5,
                owner: None,
                handover: None,
            },
        )
        .await
        .unwrap();
    let refused = produce(&mut b.client().await, copy.as_str(), &[data(7, 10)])
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert_eq!(refused.metadata().get("goutube-owner").unwrap(), "a");
    b.shutdown().await;
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_through_a_member_that_does_not_hold_the_point_appends_at_the_owners_end() {
    let (a, b, point) = pair().await;
    let before = data(8, 33_333);
    produce(&mut a.client().await, &point, std::slice::from_ref(&before))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("more.bin");
    let more = data(9, 600_000);
    std::fs::write(&file, &more).unwrap();
    // b neither owns nor holds the point: it answers the first look with NotFound, then
    // refuses the write naming a, whose copy is where the upload really begins.
    let through_b = goutube::client::Client::connect(&goutube::client::ClientOptions {
        addr: b.addr(),
        tls: None,
    })
    .await
    .unwrap();
    for _ in 0..2 {
        let report = through_b
            .put(
                &point,
                &file,
                &goutube::client::PutOptions {
                    mode: goutube::client::PutMode::Append,
                    ..Default::default()
                },
                std::sync::Arc::new(goutube::client::Quiet),
            )
            .await
            .unwrap();
        assert_eq!(
            report.redirected,
            Some(goutube::client::Redirect {
                member: "a".to_string(),
                rpc_addr: a.addr()
            })
        );
    }
    let on_a = consume(&mut a.client().await, window(&point, 0, 0, 0))
        .await
        .unwrap()
        .concat();
    assert!(on_a == [&before[..], &more, &more].concat());
    b.shutdown().await;
    a.shutdown().await;
}
