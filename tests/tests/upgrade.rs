//! The upgrade path, with data directories the previous version of the binary wrote
//! (`goutube_tests::upgrade` tells the cluster's story: a join handed over, appends after it, a
//! leader that died, was forgotten and taken over from its follower, and came back to put the
//! copy only it held in quarantine). The current version starts on them: the controller forms,
//! imports the ring gossip had decided (the forgotten member forgotten) with epochs above every
//! epoch in the stores; every point is served byte for byte by its owner, which takes writes
//! again; the quarantined copy stays where it was, never served.

use std::collections::BTreeMap;

use goutube::cluster::Lifecycle;
use goutube::controller::Topology;
use goutube::proto::ListMembersRequest;
use goutube::proto::controller::StatusRequest;
use goutube::proto::controller::controller_client::ControllerClient;
use goutube_tests::upgrade::{self, FOLLOWER, FORGOTTEN, NODES};
use goutube_tests::{
    NodeProcess, append_at, consume, data, eventually, eventually_some, metadata, owner_through,
    raw_client, window,
};
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_written_by_the_previous_version_imports_its_ring_and_serves_every_point() {
    let root = tempfile::tempdir().unwrap();
    let unpacked = std::process::Command::new("tar")
        .arg("-xzf")
        .arg(upgrade::archive())
        .arg("-C")
        .arg(root.path())
        .status()
        .unwrap();
    assert!(unpacked.success());
    for name in NODES {
        let data = root.path().join(name).join("data");
        assert!(
            !data.join("controller/log").exists(),
            "{name}: no controller yet"
        );
    }
    let expected = upgrade::expected();
    let quarantined = quarantined_copy(root.path(), &expected);

    let mut nodes: BTreeMap<&str, NodeProcess> = BTreeMap::new();
    for name in NODES {
        let seeds: Vec<String> = nodes
            .values()
            .map(|node| node.addresses.gossip.to_string())
            .collect();
        let leader = nodes
            .get(FORGOTTEN)
            .map(|c| c.addresses.replication.to_string())
            .unwrap_or_default();
        let config = upgrade::config(&root.path().join(name), name, &seeds, &leader);
        nodes.insert(name, NodeProcess::spawn(&config));
    }

    // The controller forms and imports the ring: a, b and d own it, c is forgotten; epochs
    // start above the stores' (2: the points handed to d, and those taken over from c).
    let topology = eventually_some("the controller to import the ring", || async {
        let channel = goutube::client::channel(&goutube::client::ClientOptions {
            addr: nodes["a"].rpc.clone(),
            tls: None,
        })
        .await
        .ok()?;
        let status = ControllerClient::new(channel)
            .status(StatusRequest {})
            .await
            .ok()?
            .into_inner();
        let topology: Topology = serde_json::from_slice(&status.topology).ok()?;
        topology.ring.is_formed().then_some(topology)
    })
    .await;
    let owners: Vec<&str> = topology.ring.owners().map(|(n, _)| n.as_str()).collect();
    assert_eq!(owners, ["a", "b", "d"]);
    assert_eq!(
        topology.ring.members[FORGOTTEN].lifecycle,
        Lifecycle::Forgotten
    );
    assert!(
        topology.epoch_floor >= 2,
        "epochs start above the stores' (2 after the handovers): {}",
        topology.epoch_floor
    );
    assert!(topology.ring_epoch > topology.epoch_floor);

    // Every point at its owner, byte for byte: at epoch 1 where it never moved, 2 where the
    // previous version handed it over or took it over.
    let mut moved = 0;
    for (point, bytes) in &expected {
        let owner = owner_through(raw_client(&nodes["a"].rpc).await, point).await;
        assert!(owners.contains(&owner.as_str()), "{point} at {owner}");
        let mut client = raw_client(&nodes[owner.as_str()].rpc).await;
        let meta = metadata(&mut client, point).await.unwrap();
        assert_eq!(meta.size, bytes.len() as u64, "{point} on {owner}");
        assert_eq!(meta.crc32c, crc32c::crc32c(bytes), "{point} on {owner}");
        let held = consume(&mut client, window(point, 0, 0, 0)).await.unwrap();
        assert!(held.concat() == *bytes, "{point} on {owner} differs");
        assert!(matches!(meta.epoch, 1 | 2), "{point}: {meta:?}");
        moved += usize::from(meta.epoch == 2);
    }
    assert!(moved > 0, "some points were handed or taken over");

    // The copy only c held stays in its quarantine, never served.
    let mut to_c = raw_client(&nodes[FORGOTTEN].rpc).await;
    let status = metadata(&mut to_c, &quarantined).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert!(status.message().contains("quarantine"), "{status:?}");
    assert_eq!(quarantined_copy(root.path(), &expected), quarantined);

    // The owners take writes again, at the end of what they hold.
    let (point, bytes) = expected.iter().next().unwrap();
    let owner = owner_through(raw_client(&nodes["a"].rpc).await, point).await;
    let mut client = raw_client(&nodes[owner.as_str()].rpc).await;
    let more = data(7, 4093);
    append_at(&mut client, point, bytes.len() as u64, &more)
        .await
        .unwrap();
    let held = consume(&mut client, window(point, 0, 0, 0)).await.unwrap();
    assert!(held.concat() == [bytes.clone(), more].concat());
    // f is back, following c (its leader in the previous version, forgotten since).
    eventually("f to follow c again", || async {
        let members = raw_client(&nodes["a"].rpc)
            .await
            .list_members(ListMembersRequest {})
            .await
            .unwrap()
            .into_inner();
        members
            .members
            .iter()
            .any(|m| m.name == FOLLOWER && m.live && m.leader == FORGOTTEN)
    })
    .await;

    for (name, node) in nodes {
        assert!(node.terminate(), "{name}: a graceful stop");
    }
}

/// The point whose copy `c` keeps in quarantine: its one quarantined copy is that point's bytes
/// followed by the write that was never acknowledged.
fn quarantined_copy(root: &std::path::Path, expected: &BTreeMap<String, Vec<u8>>) -> String {
    let quarantine = root.join(FORGOTTEN).join("data/quarantine");
    let mut copies = Vec::new();
    for point in std::fs::read_dir(&quarantine).unwrap() {
        for epoch in std::fs::read_dir(point.unwrap().path()).unwrap() {
            copies.push(std::fs::read(epoch.unwrap().path().join("point.data")).unwrap());
        }
    }
    assert_eq!(copies.len(), 1, "one quarantined copy");
    expected
        .iter()
        .find(|(_, bytes)| copies[0] == [bytes.as_slice(), &upgrade::unacknowledged()].concat())
        .map(|(point, _)| point.clone())
        .expect("the quarantined copy is a point's bytes and the unacknowledged write")
}
