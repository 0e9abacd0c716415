//! The upgrade path, with data directories the previous version of the binary wrote
//! (`goutube_tests::upgrade`: three primaries formed a ring, a fourth joined and was handed its
//! points, every fourth point was appended to after the join). The current version starts on
//! them: the controller forms, imports the ring gossip had decided with epochs above every epoch
//! in the stores, and every point is served byte for byte by its owner, which takes writes again.

use std::collections::BTreeMap;

use goutube::controller::Topology;
use goutube::proto::ProduceRequest;
use goutube::proto::controller::StatusRequest;
use goutube::proto::controller::controller_client::ControllerClient;
use goutube_tests::upgrade::{self, FOUNDERS, JOINED};
use goutube_tests::{
    NodeProcess, consume, data, eventually, eventually_some, metadata, owner_through, raw_client,
    window,
};

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
    for name in ["a", "b", "c", "d"] {
        let data = root.path().join(name).join("data");
        assert!(data.join("cluster/ring.json").exists(), "{name}");
        assert!(
            !data.join("controller/log").exists(),
            "{name}: no controller yet"
        );
    }

    let mut nodes: BTreeMap<&str, NodeProcess> = BTreeMap::new();
    for name in FOUNDERS.into_iter().chain([JOINED]) {
        let dir = root.path().join(name);
        let seeds: Vec<String> = nodes
            .values()
            .map(|node| node.addresses.gossip.to_string())
            .collect();
        let config = upgrade::config(&dir, name, &seeds);
        nodes.insert(name, NodeProcess::spawn(&config));
    }

    // The controller forms and imports the ring: the same four owners, epochs above the
    // stores' (2: the points handed to d).
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
        (topology.ring.owners().count() == 4).then_some(topology)
    })
    .await;
    let owners: Vec<&str> = topology.ring.owners().map(|(n, _)| n.as_str()).collect();
    assert_eq!(owners, ["a", "b", "c", "d"]);
    assert!(
        topology.epoch_floor >= 2,
        "epochs start above the stores' (2 after the join): {}",
        topology.epoch_floor
    );
    assert!(topology.ring_epoch > topology.epoch_floor);

    // Every point at its owner, byte for byte; those handed to d at the epoch of that handover.
    let expected = upgrade::expected();
    let mut on_d = 0;
    for (point, bytes) in &expected {
        let owner = eventually_some(&format!("{point} to be located"), || async {
            let owner = owner_through(raw_client(&nodes["a"].rpc).await, point).await;
            nodes.contains_key(owner.as_str()).then_some(owner)
        })
        .await;
        let mut client = raw_client(&nodes[owner.as_str()].rpc).await;
        let meta = metadata(&mut client, point).await.unwrap();
        assert_eq!(meta.size, bytes.len() as u64, "{point} on {owner}");
        assert_eq!(meta.crc32c, crc32c::crc32c(bytes), "{point} on {owner}");
        let held = consume(&mut client, window(point, 0, 0, 0)).await.unwrap();
        assert!(held.concat() == *bytes, "{point} on {owner} differs");
        if owner == JOINED {
            assert_eq!(
                meta.epoch, 2,
                "{point}: handed to d by the previous version"
            );
            on_d += 1;
        } else {
            assert_eq!(meta.epoch, 1, "{point}");
        }
    }
    assert!(on_d > 0, "some points were handed to d");

    // The owners take writes again, at the end of what they hold.
    let (point, bytes) = expected.iter().next().unwrap();
    let owner = owner_through(raw_client(&nodes["a"].rpc).await, point).await;
    let mut client = raw_client(&nodes[owner.as_str()].rpc).await;
    let more = data(7, 4093);
    let append = ProduceRequest {
        point: point.clone(),
        frame: more.clone().into(),
        expected_offset: Some(bytes.len() as u64),
        ..Default::default()
    };
    eventually("the owner to take a write after the upgrade", || {
        let (mut client, append) = (client.clone(), append.clone());
        async move {
            client
                .produce_stream(tokio_stream::iter([append]))
                .await
                .is_ok()
        }
    })
    .await;
    let held = consume(&mut client, window(point, 0, 0, 0)).await.unwrap();
    assert!(held.concat() == [bytes.clone(), more].concat());

    for (name, node) in nodes {
        assert!(node.terminate(), "{name}: a graceful stop");
    }
}
