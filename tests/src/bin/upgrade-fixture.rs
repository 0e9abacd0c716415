//! Writes the data directories of the cluster in `goutube_tests::upgrade`, as the `goutube`
//! binary given writes them, into an archive: `upgrade-fixture OLD_GOUTUBE OUT.tar.gz`.
//! `scripts/upgrade-fixture` builds the version before the controller and runs this with it.
//!
//! Three primaries form a ring; every point is written at its owner; a fourth primary joins and
//! is handed its points (they move to epoch 2); every fourth point is appended to at its owner
//! then; every node stops gracefully; the four `<name>/data` directories are archived (without
//! their plugin caches, which each machine compiles again).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use goutube_tests::upgrade::{self, FOUNDERS, JOINED, POINTS};
use goutube_tests::{NodeProcess, eventually, owner_through, produce, raw_client};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(bin), Some(out)) = (args.next(), args.next()) else {
        bail!("usage: upgrade-fixture OLD_GOUTUBE OUT.tar.gz");
    };
    let (bin, out) = (PathBuf::from(bin), std::path::absolute(out)?);
    let root = tempfile::tempdir()?;
    let mut nodes: BTreeMap<&str, NodeProcess> = BTreeMap::new();
    for name in FOUNDERS {
        let node = spawn(&bin, root.path(), name, &nodes);
        nodes.insert(name, node);
    }
    until_owners(&nodes, &FOUNDERS).await;
    for i in 0..POINTS {
        write(&nodes, &upgrade::point(i), upgrade::first(i)).await;
    }
    let joined = spawn(&bin, root.path(), JOINED, &nodes);
    nodes.insert(JOINED, joined);
    until_owners(&nodes, &["a", "b", "c", "d"]).await;
    for i in 0..POINTS {
        if let Some(bytes) = upgrade::appended(i) {
            write(&nodes, &upgrade::point(i), bytes).await;
        }
    }
    for (name, node) in nodes {
        if !node.terminate() {
            bail!("{name} did not stop cleanly");
        }
    }
    let status = std::process::Command::new("tar")
        // The compiled plugins are a cache of this machine's, made again at start.
        .args(["--exclude=plugin-cache", "-czf"])
        .arg(&out)
        .arg("-C")
        .arg(root.path())
        .args(["a/data", "b/data", "c/data", "d/data"])
        .status()
        .context("running tar")?;
    if !status.success() {
        bail!("tar failed: {status}");
    }
    println!("wrote {}", out.display());
    Ok(())
}

/// Starts primary `name` of the `bin` version, seeded by the nodes running.
fn spawn(
    bin: &Path,
    root: &Path,
    name: &str,
    running: &BTreeMap<&str, NodeProcess>,
) -> NodeProcess {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).expect("a node directory");
    let seeds: Vec<String> = running
        .values()
        .map(|node| node.addresses.gossip.to_string())
        .collect();
    let config = upgrade::config(&dir, name, &seeds);
    NodeProcess::spawn_binary(bin, &config, &[])
}

/// Waits until every node sees exactly `owners` active, and nothing moving.
async fn until_owners(nodes: &BTreeMap<&str, NodeProcess>, owners: &[&str]) {
    for node in nodes.values() {
        eventually("every node to see the owners, nothing moving", || async {
            let members = goutube::client::Client::connect(&goutube::client::ClientOptions {
                addr: node.rpc.clone(),
                tls: None,
            })
            .await
            .expect("connecting")
            .members()
            .await
            .expect("members");
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
async fn write(nodes: &BTreeMap<&str, NodeProcess>, point: &str, bytes: Vec<u8>) {
    let owner = owner_through(raw_client(&nodes["a"].rpc).await, point).await;
    let mut client = raw_client(&nodes[owner.as_str()].rpc).await;
    produce(&mut client, point, &[bytes])
        .await
        .unwrap_or_else(|status| panic!("writing {point} at {owner}: {status:?}"));
}
