//! `goutube bench cluster`: how fast members find each other and notice a death, and what the
//! ownership check costs a produce.
//!
//! - Membership: `n` members of one process on UDP loopback, gossip sealed with a cluster key and
//!   the default settings (200 ms rounds, phi 8), `bootstrap_expect = n`. Measured from the last
//!   start to every member holding the same view of `n` live members and the formed ring; then one
//!   is stopped without a word (as by `kill -9`) and measured until nobody sees it alive. The
//!   baseline is the detector's own bound in the same settings: phi x round + one round.
//! - Ownership: a node's cached ownership check against a whole produce round trip (one small
//!   frame, one stream) through the same node, in the same run.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Context;
use goutube::cluster::gossip::{ClusterKey, Network};
use goutube::cluster::{self, Cluster, ClusterSection, Local, Params, Role};
use goutube::config::Config;
use goutube::node::{Listeners, Node};
use goutube::point::PointId;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{connect, median};

pub(super) async fn run(sizes: &[usize], rounds: usize) -> anyhow::Result<()> {
    let section = ClusterSection::default();
    let round = section.gossip_interval();
    let bound = round.mul_f64(section.phi_threshold) + round;
    println!("## Membership: {rounds} rounds per size, medians (slowest)\n");
    println!(
        "| members | formed and converged | in gossip rounds | kill seen by all | detector bound | detection / bound |"
    );
    println!("|---|---|---|---|---|---|");
    for &members in sizes {
        let mut converged = Vec::new();
        let mut detected = Vec::new();
        for _ in 0..rounds {
            let (c, d) = membership(members, &section).await?;
            converged.push(c.as_secs_f64());
            detected.push(d.as_secs_f64());
        }
        let worst = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
        println!(
            "| {members} | {:.2} s ({:.2}) | {:.1} | {:.2} s ({:.2}) | {:.2} s | {:.2}x |",
            median(&converged),
            worst(&converged),
            median(&converged) / round.as_secs_f64(),
            median(&detected),
            worst(&detected),
            bound.as_secs_f64(),
            median(&detected) / bound.as_secs_f64()
        );
    }
    ownership().await
}

/// One formation and one kill among `count` members.
async fn membership(
    count: usize,
    section: &ClusterSection,
) -> anyhow::Result<(Duration, Duration)> {
    let key = ClusterKey::derive(b"the benchmark's cluster key", &section.name);
    let dirs = tempfile::tempdir()?;
    let sockets: Vec<std::net::UdpSocket> = (0..count)
        .map(|_| std::net::UdpSocket::bind("127.0.0.1:0"))
        .collect::<Result<_, _>>()?;
    let seed = sockets[0].local_addr()?.to_string();
    let mut members: BTreeMap<String, Cluster> = BTreeMap::new();
    for (i, socket) in sockets.into_iter().enumerate() {
        let name = format!("m{i:02}");
        let port = socket.local_addr()?.port();
        let (_leader, following) = watch::channel(None);
        let params = Params {
            section: ClusterSection {
                bootstrap_expect: count,
                ..section.clone()
            },
            seeds: vec![seed.clone()],
            dir: dirs.path().join(&name),
            local: Local {
                name: name.clone(),
                role: Role::Leader,
                rpc_addr: SocketAddr::from(([127, 0, 0, 1], port)),
                replication_addr: SocketAddr::from(([127, 0, 0, 1], port)),
                http_addr: SocketAddr::from(([127, 0, 0, 1], port)),
                virtual_nodes: 64,
                tags: Default::default(),
            },
            leader: following,
            controller: None,
        };
        let network = Network::Udp {
            socket,
            key: Some(key.clone()),
        };
        let member = cluster::start(params, network, CancellationToken::new()).await?;
        members.insert(name, member);
    }
    let started = Instant::now();
    let deadline = Duration::from_secs(60);
    loop {
        let views: Vec<_> = members
            .values()
            .map(|m| m.membership().borrow().clone())
            .collect();
        let done = views.iter().all(|v| {
            v.view.id == views[0].view.id
                && v.view.members.len() == count
                && v.ring.owners().count() == count
        });
        if done {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < deadline,
            "{count} members did not converge"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let converged = started.elapsed();

    let (victim, killed) = members.pop_last().context("at least one member")?;
    killed.kill().await;
    let started = Instant::now();
    loop {
        let seen = members
            .values()
            .any(|m| m.membership().borrow().live(&victim).is_some());
        if !seen {
            break;
        }
        anyhow::ensure!(started.elapsed() < deadline, "the kill was never detected");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let detected = started.elapsed();
    for (_, member) in members {
        member.kill().await;
    }
    Ok((converged, detected))
}

/// The cached ownership check against a produce round trip through the same node.
async fn ownership() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut config = Config {
        data_dir: dir.path().join("node"),
        bind_addr: "127.0.0.1:0".parse()?,
        rpc_port: 0,
        replication_port: 0,
        metrics_port: 0,
        http_port: 0,
        ..Config::default()
    };
    config.storage.fsync = goutube::point::Fsync::Never;
    config.log.level = "warn".into();
    let listeners = Listeners::bind(&config).await?;
    let node = Node::start(config, listeners).await?;
    let gate = node.gate().context("a storage node has a gate")?.clone();
    let points: Vec<PointId> = (0..1000)
        .map(|i| PointId::new(format!("videos/{i}")))
        .collect::<Result<_, _>>()?;
    for point in &points {
        gate.admit_write(point).await?;
    }
    let calls = 1_000_000;
    let started = Instant::now();
    for i in 0..calls {
        gate.admit_write(&points[i % points.len()]).await?;
    }
    let check = started.elapsed() / calls as u32;

    let client = connect(&node.rpc_addr().to_string()).await?;
    let frame = bytes::Bytes::from(vec![7u8; 1024]);
    let produces = 2000;
    let started = Instant::now();
    for i in 0..produces {
        let request = goutube::proto::ProduceRequest {
            point: points[i % points.len()].as_str().to_owned(),
            frame: frame.clone(),
            ..Default::default()
        };
        client
            .raw()
            .produce_stream(tokio_stream::iter([request]))
            .await?;
    }
    let produce = started.elapsed() / produces as u32;
    node.shutdown().await?;
    println!("\n## The ownership check in the produce path\n");
    println!("| measurement | per call | share of a produce |");
    println!("|---|---|---|");
    println!("| produce round trip (1 KiB, one stream, fsync never) | {produce:.1?} | 100 % |");
    println!(
        "| the write gate for a new point, cached (target < 1 µs) | {check:.2?} | {:.3} % |",
        check.as_secs_f64() / produce.as_secs_f64() * 100.0
    );
    Ok(())
}
