//! `goutube bench failover`: how long a group's writes are unavailable after a `kill -9` of its
//! leader (`docs/failover.md`), and whether any acknowledged byte was lost.
//!
//! Each trial starts a fresh cluster (child processes, plaintext on 127.0.0.1): primaries a, b
//! and c, the controller's voters, with `ack = { replicas = 1 }` and `fsync = "always"`, and
//! followers fa1 and fa2 of a. Once both followers are in a's in-sync set, a producer writes
//! acknowledged chunks to a point of a's, a is killed (SIGKILL), and the producer goes on
//! against whichever member the controller names for a's slot (polled every 20 ms on b). Two
//! times are taken from the kill: until a new leader is named, and until its first
//! acknowledged write. Then the new leader's copy is checked against every acknowledged byte.
//!
//! The floor is the session (`controller.session_ms`): the controller waits for it to expire
//! before it fences anyone, so each time is reported beside its ratio to the session.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use goutube::client::Client;
use goutube::config::ControllerSection;
use goutube::proto::streaming_client::StreamingClient;
use goutube::proto::{ConsumeRequest, GroupInfo, LocatePointRequest, ProduceRequest};
use rand::RngCore;
use tonic::transport::Channel;

use super::{Server, connect, median, percentile};

/// Bytes of each acknowledged write.
const CHUNK: usize = 64 * 1024;

pub(super) async fn run(trials: usize) -> anyhow::Result<()> {
    let session = ControllerSection::default().session_ms as f64;
    let (mut named, mut writable) = (Vec::new(), Vec::new());
    let (mut acknowledged_bytes, mut lost) = (0u64, 0u64);
    for trial in 0..trials {
        let outcome = trial_once(trial).await?;
        eprintln!(
            "trial {}: named after {:.0} ms, writable after {:.0} ms",
            trial + 1,
            outcome.named,
            outcome.writable
        );
        named.push(outcome.named);
        writable.push(outcome.writable);
        acknowledged_bytes += outcome.acknowledged;
        lost += outcome.lost;
    }
    named.sort_by(f64::total_cmp);
    writable.sort_by(f64::total_cmp);
    println!("## Failover: {trials} kills of a group leader under acknowledged writes\n");
    println!("| from `kill -9` of the leader | p50 | p99 | max | p99 / session |");
    println!("|---|---|---|---|---|");
    for (what, times) in [
        ("until the controller names a new leader", &named),
        ("until the new leader's first acknowledged write", &writable),
    ] {
        println!(
            "| {what} | {:.0} ms | {:.0} ms | {:.0} ms | {:.2}x ({session:.0} ms) |",
            median(times),
            percentile(times, 99),
            times.last().copied().unwrap_or_default(),
            percentile(times, 99) / session
        );
    }
    println!(
        "\nacknowledged bytes: {acknowledged_bytes} over {trials} trials; lost: {lost} (target 0)"
    );
    if lost > 0 {
        bail!("{lost} acknowledged bytes were lost");
    }
    Ok(())
}

struct Outcome {
    /// Milliseconds from the kill to a new leader named.
    named: f64,
    /// Milliseconds from the kill to its first acknowledged write.
    writable: f64,
    acknowledged: u64,
    lost: u64,
}

async fn trial_once(trial: usize) -> anyhow::Result<Outcome> {
    let dir = tempfile::tempdir()?;
    let mut nodes: Vec<(&str, Server)> = Vec::new();
    for name in ["a", "b", "c"] {
        let settings = format!(
            "role = \"leader\"\nseed_addresses = [{}]\n[controller]\nvoters = [\"a\", \"b\", \"c\"]\n\
             [replication]\nack = {{ replicas = 1 }}\n[cluster]\nbootstrap_expect = 3\n",
            seeds(&nodes)
        );
        nodes.push((
            name,
            Server::node_at(dir.path(), name, "127.0.0.1", None, &settings)?,
        ));
    }
    let a_replication = nodes[0].1.replication.clone();
    for name in ["fa1", "fa2"] {
        let settings = format!(
            "role = \"follower\"\nleader_addresses = [{a_replication:?}]\nseed_addresses = [{}]\n\
             [cluster]\nbootstrap_expect = 3\n",
            seeds(&nodes)
        );
        nodes.push((
            name,
            Server::node_at(dir.path(), name, "127.0.0.1", None, &settings)?,
        ));
    }
    let addresses: BTreeMap<String, String> = nodes
        .iter()
        .map(|(name, node)| ((*name).to_owned(), node.rpc.clone()))
        .collect();
    let address = |name: &str| -> anyhow::Result<String> {
        addresses.get(name).cloned().context("a node of the trial")
    };
    let b = connect(&address("b")?).await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let group = group_of(&b, "a").await;
        if group.is_some_and(|g| g.in_sync.len() == 2) {
            break;
        }
        if Instant::now() > deadline {
            bail!("trial {trial}: the followers never entered a's in-sync set");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let to_a = connect(&address("a")?).await?.raw();
    let point = point_of(&to_a, "a").await?;
    let mut written: Vec<u8> = Vec::new();
    for _ in 0..16 {
        let chunk = random_chunk();
        append_at(&to_a, &point, written.len() as u64, &chunk).await?;
        written.extend_from_slice(&chunk);
    }

    let a = nodes.remove(0).1;
    let killed = Instant::now();
    a.process.kill()?;
    let mut named = None;
    let deadline = killed + Duration::from_secs(60);
    loop {
        if Instant::now() > deadline {
            bail!("trial {trial}: no acknowledged write within 60 s of the kill");
        }
        let leader = group_of(&b, "a").await.map(|g| g.leader);
        let Some(leader) = leader.filter(|leader| leader != "a") else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let named_at = *named.get_or_insert_with(|| killed.elapsed());
        let to_leader = connect(&address(&leader)?).await?.raw();
        let chunk = random_chunk();
        let offset = written.len() as u64;
        match append_at(&to_leader, &point, offset, &chunk).await {
            Ok(()) => {
                let writable = killed.elapsed();
                written.extend_from_slice(&chunk);
                let held = read_all(&to_leader, &point, offset + chunk.len() as u64).await?;
                let lost = common_prefix(&held, &written);
                let outcome = Outcome {
                    named: named_at.as_secs_f64() * 1000.0,
                    writable: writable.as_secs_f64() * 1000.0,
                    acknowledged: written.len() as u64,
                    lost: (written.len() - lost) as u64,
                };
                for (_, node) in nodes {
                    node.stop()?;
                }
                return Ok(outcome);
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// The gossip addresses of `nodes`, as TOML list items.
fn seeds(nodes: &[(&str, Server)]) -> String {
    let seeds: Vec<String> = nodes
        .iter()
        .map(|(_, s)| format!("{:?}", s.gossip))
        .collect();
    seeds.join(", ")
}

fn random_chunk() -> Vec<u8> {
    let mut chunk = vec![0; CHUNK];
    rand::rng().fill_bytes(&mut chunk);
    chunk
}

/// How many leading bytes `held` and `written` share.
fn common_prefix(held: &[u8], written: &[u8]) -> usize {
    held.iter().zip(written).take_while(|(h, w)| h == w).count()
}

/// The group of `slot` as the node behind `client` sees the controller's state.
async fn group_of(client: &Client, slot: &str) -> Option<GroupInfo> {
    let controller = client.members().await.ok()?.controller?;
    controller.groups.into_iter().find(|g| g.slot == slot)
}

/// A point `owner` owns.
async fn point_of(client: &StreamingClient<Channel>, owner: &str) -> anyhow::Result<String> {
    for i in 0..10_000 {
        let point = format!("bench/failover/{i}");
        let located = client
            .clone()
            .locate_point(LocatePointRequest {
                point: point.clone(),
                replicas: 1,
            })
            .await?
            .into_inner();
        if located.owners.first().is_some_and(|o| o.name == owner) {
            return Ok(point);
        }
    }
    bail!("no point of {owner} among 10,000 names")
}

async fn append_at(
    client: &StreamingClient<Channel>,
    point: &str,
    offset: u64,
    bytes: &[u8],
) -> anyhow::Result<()> {
    let request = ProduceRequest {
        point: point.to_owned(),
        frame: Bytes::copy_from_slice(bytes),
        expected_offset: Some(offset),
        ..Default::default()
    };
    let mut client = client.clone();
    let call = client.produce_stream(tokio_stream::iter([request]));
    tokio::time::timeout(Duration::from_secs(2), call)
        .await
        .context("no answer within 2 s")??;
    Ok(())
}

/// The first `end` bytes of `point` through `client`.
async fn read_all(
    client: &StreamingClient<Channel>,
    point: &str,
    end: u64,
) -> anyhow::Result<Vec<u8>> {
    let request = ConsumeRequest {
        point: point.to_owned(),
        offset: 0,
        limit: end,
        chunk_size: 0,
        follow: false,
    };
    let mut stream = client.clone().consume_stream(request).await?.into_inner();
    let mut held = Vec::new();
    while let Some(response) = stream.message().await? {
        held.extend_from_slice(&response.frame);
    }
    Ok(held)
}
