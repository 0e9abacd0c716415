//! Writes the data directories of the cluster in `goutube_tests::upgrade`, as the `goutube`
//! binary given writes them, into an archive: `upgrade-fixture OLD_GOUTUBE OUT.tar.gz`.
//! `scripts/upgrade-fixture` builds the version before the controller and runs this with it.
//! The cluster's story is told in `goutube_tests::upgrade`; every node stops gracefully at the
//! end, and the `<name>/data` directories are archived (without their plugin caches, which each
//! machine compiles again).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use goutube::client::{Client, ClientOptions};
use goutube::proto::{ListMembersResponse, ProduceRequest};
use goutube_tests::upgrade::{self, FOLLOWER, FORGOTTEN, FOUNDERS, JOINED, NODES, POINTS};
use goutube_tests::{NodeProcess, eventually, metadata, owner_through, produce, raw_client};
use tonic::Code;

/// The nodes running, by name.
type Running = BTreeMap<&'static str, NodeProcess>;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(bin), Some(out)) = (args.next(), args.next()) else {
        bail!("usage: upgrade-fixture OLD_GOUTUBE OUT.tar.gz");
    };
    let (bin, out) = (PathBuf::from(bin), std::path::absolute(out)?);
    let root = tempfile::tempdir()?;
    // c's replication address, which f follows (still after c died).
    let mut leader = String::new();
    let mut start = |name: &'static str, nodes: &mut Running| {
        let node = spawn(&bin, root.path(), name, nodes, &leader);
        if name == FORGOTTEN {
            leader = node.addresses.replication.to_string();
        }
        nodes.insert(name, node);
    };
    let mut nodes = Running::new();
    for name in FOUNDERS.into_iter().chain([FOLLOWER]) {
        start(name, &mut nodes);
    }
    until_owners(&nodes, &FOUNDERS).await;
    until_seen(&nodes["a"], follows_c).await;
    for i in 0..POINTS {
        write(&nodes, &upgrade::point(i), upgrade::first(i)).await;
    }
    start(JOINED, &mut nodes);
    until_owners(&nodes, &["a", "b", "c", "d"]).await;
    for i in 0..POINTS {
        if let Some(bytes) = upgrade::appended(i) {
            write(&nodes, &upgrade::point(i), bytes).await;
        }
    }

    // f stops; one more write reaches c alone: never acknowledged.
    let expected = upgrade::expected();
    let mut of_c = None;
    for point in expected.keys() {
        if owner_through(raw_client(&nodes["a"].rpc).await, point).await == FORGOTTEN {
            of_c = Some(point.clone());
            break;
        }
    }
    let unique = of_c.context("c owns a point")?;
    stop(&mut nodes, FOLLOWER)?;
    let request = ProduceRequest {
        point: unique.clone(),
        frame: upgrade::unacknowledged().into(),
        expected_offset: Some(expected[&unique].len() as u64),
        ..Default::default()
    };
    let refused = raw_client(&nodes[FORGOTTEN].rpc)
        .await
        .produce_stream(tokio_stream::iter([request]))
        .await
        .expect_err("no follower confirms it");
    if refused.code() != Code::Unavailable {
        bail!("the unacknowledged write: {refused:?}");
    }

    // c dies; f returns; c is forgotten and its points taken over from f's copies.
    nodes.remove(FORGOTTEN).context("c runs")?.kill();
    start(FOLLOWER, &mut nodes);
    until_seen(&nodes["a"], |m| {
        follows_c(m) && m.members.iter().any(|m| m.name == FORGOTTEN && !m.live)
    })
    .await;
    operator(&nodes["a"]).await.forget(FORGOTTEN).await?;
    until_seen(&nodes["a"], |m| {
        m.members
            .iter()
            .any(|m| m.name == FOLLOWER && m.handed.starts_with("takeover:c@"))
    })
    .await;

    // c returns, steps down, and quarantines the copy only it held.
    start(FORGOTTEN, &mut nodes);
    let to_c = raw_client(&nodes[FORGOTTEN].rpc).await;
    eventually("c to quarantine the copy only it held", || {
        let (mut to_c, unique) = (to_c.clone(), &unique);
        async move {
            metadata(&mut to_c, unique)
                .await
                .is_err_and(|s| s.code() == Code::NotFound && s.message().contains("quarantine"))
        }
    })
    .await;
    for name in NODES {
        stop(&mut nodes, name)?;
    }
    let mut tar = std::process::Command::new("tar");
    tar.args(["--exclude=plugin-cache", "-czf"])
        .arg(&out)
        .arg("-C")
        .arg(root.path());
    for name in NODES {
        tar.arg(format!("{name}/data"));
    }
    let status = tar.status().context("running tar")?;
    if !status.success() {
        bail!("tar failed: {status}");
    }
    println!("wrote {} ({unique} quarantined on c)", out.display());
    Ok(())
}

/// Starts node `name` of the `bin` version on its data in `root/name`, seeded by the nodes
/// running (`f` follows the replication address `leader`).
fn spawn(bin: &Path, root: &Path, name: &str, running: &Running, leader: &str) -> NodeProcess {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).expect("a node directory");
    let seeds: Vec<String> = running
        .values()
        .map(|node| node.addresses.gossip.to_string())
        .collect();
    let config = upgrade::config(&dir, name, &seeds, leader);
    NodeProcess::spawn_binary(bin, &config, &[])
}

/// Stops node `name` gracefully.
fn stop(nodes: &mut Running, name: &str) -> anyhow::Result<()> {
    let node = nodes.remove(name).with_context(|| format!("{name} runs"))?;
    if !node.terminate() {
        bail!("{name} did not stop cleanly");
    }
    Ok(())
}

/// An operator's client of `node`.
async fn operator(node: &NodeProcess) -> Client {
    Client::connect(&ClientOptions {
        addr: node.rpc.clone(),
        tls: None,
    })
    .await
    .expect("connecting")
}

/// Whether `f` is live and follows `c` in `members`.
fn follows_c(members: &ListMembersResponse) -> bool {
    members
        .members
        .iter()
        .any(|m| m.name == FOLLOWER && m.live && m.leader == FORGOTTEN)
}

/// Waits until `node`'s view of the members satisfies `condition`.
async fn until_seen(node: &NodeProcess, condition: impl Fn(&ListMembersResponse) -> bool) {
    eventually("a view of the members", || async {
        condition(&operator(node).await.members().await.expect("members"))
    })
    .await;
}

/// Waits until every node sees exactly `owners` active, and nothing moving.
async fn until_owners(nodes: &Running, owners: &[&str]) {
    for node in nodes.values() {
        until_seen(node, |members| {
            let active: Vec<&str> = members
                .members
                .iter()
                .filter(|m| m.owns_range && m.state == "active")
                .map(|m| m.name.as_str())
                .collect();
            active == owners && members.members.iter().all(|m| m.moving == 0)
        })
        .await;
    }
}

/// Appends `bytes` to `point` at its owner.
async fn write(nodes: &Running, point: &str, bytes: Vec<u8>) {
    let owner = owner_through(raw_client(&nodes["a"].rpc).await, point).await;
    let mut client = raw_client(&nodes[owner.as_str()].rpc).await;
    produce(&mut client, point, &[bytes])
        .await
        .unwrap_or_else(|status| panic!("writing {point} at {owner}: {status:?}"));
}
