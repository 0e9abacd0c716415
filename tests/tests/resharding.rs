//! Points move to their next owner when a primary is drained (docs/resharding.md), while a
//! writer keeps appending with `expected_offset` and following redirects: every point ends on
//! its owner in the ring without the drained member, byte for byte, nothing acknowledged lost,
//! nothing written twice; the drained member ends `left`, redirects writes and still serves
//! reads.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use goutube::api::proto::ProduceRequest;
use goutube::client::{Client, ClientOptions};
use goutube::error::{END_METADATA, OWNER_METADATA};
use goutube_tests::{
    TestNode, consume, data, eventually, members, metadata, owner, raw_client, sees, window,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio_util::sync::CancellationToken;
use tonic::Code;

const NAMES: [&str; 3] = ["a", "b", "c"];

/// Three primaries in one ring, each seeing the others.
async fn three() -> Vec<TestNode> {
    let first = TestNode::start(|c| {
        c.node_name = NAMES[0].into();
        c.cluster.bootstrap_expect = 3;
    })
    .await;
    let seed = first.node.gossip_addr().to_string();
    let mut nodes = vec![first];
    for name in &NAMES[1..] {
        let seed = seed.clone();
        nodes.push(
            TestNode::start(move |c| {
                c.node_name = (*name).into();
                c.seed_addresses = vec![seed];
                c.cluster.bootstrap_expect = 3;
                // Small moves fence at once: the test sees writes held at the fence.
                c.reshard.fence_lag_bytes = 64 * 1024;
            })
            .await,
        );
    }
    for node in &nodes {
        eventually(
            "every primary to see the three owners of the ring",
            || async {
                let view = members(node).await;
                sees(node, 3).await && view.members.iter().filter(|m| m.owns_range).count() == 3
            },
        )
        .await;
    }
    nodes
}

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
    addresses: &HashMap<String, String>,
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
        let mut client = raw_client(&addresses[&at]).await;
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
            Code::Unavailable => tokio::time::sleep(Duration::from_millis(20)).await,
            _ => panic!("appending to {point} at {offset} on {at}: {status:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_drained_primary_hands_every_point_to_its_next_owner_while_writes_go_on() {
    let nodes = three().await;
    let addresses: HashMap<String, String> = NAMES
        .iter()
        .zip(&nodes)
        .map(|(name, node)| ((*name).to_owned(), node.addr()))
        .collect();
    let by_name = |name: &str| &nodes[NAMES.iter().position(|n| *n == name).unwrap()];

    // 60 points of random, non-periodic sizes, each written on its owner.
    let mut rng = StdRng::seed_from_u64(10);
    let mut expected: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut owners: BTreeMap<String, String> = BTreeMap::new();
    for i in 0..60u64 {
        let point = format!("videos/{i}");
        let bytes = data(i, rng.random_range(1..300_000));
        let at = owner(&nodes[0], &point).await;
        append(&addresses, at.clone(), &point, 0, &bytes).await;
        owners.insert(point.clone(), at);
        expected.insert(point, bytes);
    }
    let on_c: Vec<String> = owners
        .iter()
        .filter(|(_, at)| *at == "c")
        .map(|(point, _)| point.clone())
        .collect();
    assert!(on_c.len() >= 5, "c owns {} of 60 points", on_c.len());

    // A writer appends to a few of c's points (and one of the others) all along.
    let written: Vec<String> = on_c
        .iter()
        .take(4)
        .chain(owners.iter().find(|(_, at)| *at != "c").map(|(p, _)| p))
        .cloned()
        .collect();
    let expected = Arc::new(Mutex::new(expected));
    let stop = CancellationToken::new();
    let writer = tokio::spawn({
        let (expected, stop, addresses) = (expected.clone(), stop.clone(), addresses.clone());
        let mut at: HashMap<String, String> = written
            .iter()
            .map(|point| (point.clone(), owners[point].clone()))
            .collect();
        let written = written.clone();
        async move {
            let mut round = 0u64;
            while !stop.is_cancelled() {
                for point in &written {
                    let offset = expected.lock().unwrap()[point].len() as u64;
                    let bytes = data(1000 + round, 3000 + (round as usize * 7919) % 5000);
                    let took = append(&addresses, at[point].clone(), point, offset, &bytes).await;
                    expected
                        .lock()
                        .unwrap()
                        .get_mut(point)
                        .unwrap()
                        .extend(&bytes);
                    at.insert(point.clone(), took);
                }
                round += 1;
            }
            (round, at)
        }
    });

    // Drain c, asked through a.
    let options = ClientOptions {
        addr: nodes[0].addr(),
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
        members(&nodes[0])
            .await
            .members
            .iter()
            .any(|m| m.name == "c" && m.state == "left" && !m.owns_range)
    })
    .await;
    // The writer goes on against the new owners for a moment, then stops.
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.cancel();
    let (rounds, at) = writer.await.unwrap();
    assert!(rounds > 3, "the writer made only {rounds} rounds");
    for (point, node) in &at {
        assert_ne!(
            node, "c",
            "the writer of {point} was never redirected from c"
        );
    }

    // Every point is on its owner in the ring without c, byte for byte, with its CRC.
    let expected = expected.lock().unwrap().clone();
    for (point, bytes) in &expected {
        let now = owner(&nodes[0], point).await;
        assert_ne!(now, "c", "{point} is still placed on c");
        let node = by_name(&now);
        let mut client = node.client().await;
        let meta = metadata(&mut client, point).await.unwrap();
        assert_eq!(meta.size, bytes.len() as u64, "{point} on {now}");
        assert_eq!(meta.crc32c, crc32c::crc32c(bytes), "{point} on {now}");
        let held = consume(&mut client, window(point, 0, 0, 0)).await.unwrap();
        assert!(held.concat() == *bytes, "{point} on {now} differs");
        let moved = owners[point] == "c";
        assert_eq!(meta.epoch, if moved { 2 } else { 1 }, "{point} on {now}");
    }

    // c redirects writes of what it handed over, and still serves reads of it.
    let c = by_name("c");
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
        owner(&nodes[0], point).await.as_str()
    );
    let served = consume(&mut c.client().await, window(point, 0, 0, 0))
        .await
        .unwrap();
    let served = served.concat();
    assert!(
        !served.is_empty() && expected[point].starts_with(&served),
        "c serves what it held of {point} when it handed it over"
    );

    for node in nodes {
        node.shutdown().await;
    }
}
