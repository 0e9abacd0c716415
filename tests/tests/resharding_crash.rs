//! A handover survives a crash at any step (docs/resharding.md, "Crash at any step"): two
//! `goutube run` processes, the old owner drained; the old or the new owner aborts right after
//! a named step (the `GOUTUBETEST_CRASH_AT` hook, as `kill -9` would stop it there) and is
//! restarted on its data. Afterwards exactly one node accepts writes for each point, and no
//! acknowledged byte is lost.

use std::path::Path;

use goutube::client::{Client, ClientOptions};
use goutube::proto::OWNER_METADATA;
use goutube::proto::{ListMembersRequest, LocatePointRequest};
use goutube::reshard::CRASH_AT;
use goutube_tests::{
    NodeProcess, append_at, consume, data, eventually, metadata, produce, raw_client, ring_epoch,
    window, write_node_config,
};
use tonic::Code;

/// Which side of the handover aborts.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Side {
    Old,
    New,
}

fn spawn(dir: &Path, name: &str, seed: Option<&NodeProcess>, crash: Option<&str>) -> NodeProcess {
    let seeds = seed.map_or(String::new(), |node| {
        format!("seed_addresses = [\"{}\"]\n", node.addresses.gossip)
    });
    let config = write_node_config(
        dir,
        name,
        &format!("{seeds}[cluster]\nbootstrap_expect = 2\n[storage]\nfsync = \"always\""),
    );
    let env: Vec<(&str, &str)> = crash.map(|step| (CRASH_AT, step)).into_iter().collect();
    NodeProcess::spawn_with_env(&config, &env)
}

async fn owner(at: &NodeProcess, point: &str) -> String {
    raw_client(&at.rpc)
        .await
        .locate_point(LocatePointRequest {
            point: point.into(),
            replicas: 1,
        })
        .await
        .unwrap()
        .into_inner()
        .owners[0]
        .name
        .clone()
}

async fn state(at: &NodeProcess, name: &str) -> Option<(String, bool)> {
    let members = raw_client(&at.rpc)
        .await
        .list_members(ListMembersRequest {})
        .await
        .ok()?
        .into_inner();
    members
        .members
        .into_iter()
        .find(|m| m.name == name)
        .map(|m| (m.state, m.owns_range))
}

async fn crash_at(side: Side, step: &str) {
    let root = tempfile::tempdir().unwrap();
    let (a_dir, b_dir) = (root.path().join("a"), root.path().join("b"));
    std::fs::create_dir_all(&a_dir).unwrap();
    std::fs::create_dir_all(&b_dir).unwrap();
    let crash = |on: Side| (side == on).then_some(step);
    let mut a = spawn(&a_dir, "a", None, crash(Side::Old));
    let mut b = spawn(&b_dir, "b", Some(&a), crash(Side::New));
    eventually("a and b to form their ring", || async {
        state(&a, "b").await == Some(("active".into(), true))
            && state(&b, "a").await == Some(("active".into(), true))
    })
    .await;

    // Points of non-periodic bytes, each written on its owner; some are a's.
    let mut points = Vec::new();
    for i in 0..12u64 {
        let point = format!("videos/{i}");
        let bytes = data(i, 20_000 + i as usize * 7_919);
        let at = owner(&a, &point).await;
        let node = if at == "a" { &a } else { &b };
        produce(
            &mut raw_client(&node.rpc).await,
            &point,
            std::slice::from_ref(&bytes),
        )
        .await
        .unwrap();
        points.push((point, at, bytes));
    }
    assert!(
        points.iter().filter(|(_, at, _)| at == "a").count() >= 2,
        "a owns too few points"
    );

    // Drain a; the side told to crash aborts at its step and is restarted on its data.
    let before = ring_epoch(raw_client(&a.rpc).await).await;
    let options = ClientOptions {
        addr: a.rpc.clone(),
        tls: None,
    };
    let client = Client::connect(&options).await.unwrap();
    let drained = client.drain("a", &options).await;
    if side == Side::New {
        // (a may abort before it answers: its `leaving` is saved before any move starts.)
        drained.expect("drain a");
    }
    drop(client);
    match side {
        Side::Old => {
            assert!(!a.exited(), "a aborted at {step}");
            a = spawn(&a_dir, "a", Some(&b), None);
        }
        Side::New => {
            assert!(!b.exited(), "b aborted at {step}");
            b = spawn(&b_dir, "b", Some(&a), None);
        }
    }
    eventually("a to hand everything over and leave", || async {
        state(&b, "a").await == Some(("left".into(), false))
    })
    .await;

    // Every point is b's, whole; a refuses writes, b takes them at their end.
    for (point, was, bytes) in &points {
        assert_eq!(owner(&b, point).await, "b", "{point}");
        let mut on_b = raw_client(&b.rpc).await;
        let meta = metadata(&mut on_b, point).await.unwrap();
        assert_eq!(
            meta.size,
            bytes.len() as u64,
            "{point} after a crash at {step}"
        );
        assert_eq!(meta.crc32c, crc32c::crc32c(bytes), "{point} at {step}");
        let read = consume(&mut on_b, window(point, 0, 0, 0)).await.unwrap();
        assert!(
            read.concat() == *bytes,
            "{point} differs after a crash at {step}"
        );
        if was == "a" {
            // Handed over at the epoch of the controller's decision: above the ring's before.
            assert!(meta.epoch > before, "{point}: {meta:?}, {before}");
        } else {
            assert_eq!(meta.epoch, 1, "{point}");
        }
        let end = bytes.len() as u64;
        if was == "a" {
            let mut on_a = raw_client(&a.rpc).await;
            let status = append_at(&mut on_a, point, end, b"after")
                .await
                .expect_err("a no longer takes writes");
            assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
            assert_eq!(status.metadata().get(OWNER_METADATA).unwrap(), "b");
        }
        append_at(&mut on_b, point, end, b"after")
            .await
            .unwrap_or_else(|status| panic!("b takes {point} at its end: {status:?}"));
    }
    assert!(a.terminate() && b.terminate());
}

#[tokio::test]
async fn the_old_owner_crashed_after_copying_began() {
    crash_at(Side::Old, "copying").await;
}

#[tokio::test]
async fn the_old_owner_crashed_after_sealing() {
    crash_at(Side::Old, "sealed").await;
}

#[tokio::test]
async fn the_old_owner_crashed_after_the_commit_before_its_switch() {
    crash_at(Side::Old, "committed").await;
}

#[tokio::test]
async fn the_old_owner_crashed_after_its_switch() {
    crash_at(Side::Old, "moved").await;
}

#[tokio::test]
async fn the_new_owner_crashed_while_the_point_was_arriving() {
    crash_at(Side::New, "incoming").await;
}

#[tokio::test]
async fn the_new_owner_crashed_after_its_commit_before_answering() {
    crash_at(Side::New, "commit").await;
}
