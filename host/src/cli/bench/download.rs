//! `goutube bench download`: what a client of the cluster sees when it reads a point.
//!
//! - **Into a file.** `Client::get` of a point from one node into a file (synced and renamed
//!   before it returns) against `ConsumeStream` of the same point into memory; and, as the
//!   machine's ceiling, the same bytes written into a file and synced with no network at all.
//! - **Through a balancer.** `ConsumeStream` through a balancer against the same call straight
//!   to the node, and the balancer's peak RSS while it relays; and, as the ceiling of any relay
//!   on the machine, a raw TCP copy through a thread that only reads and writes the bytes.
//!
//! Memory is warmed first (see `warm_memory`): a file's fresh page-cache pages would otherwise
//! measure the hypervisor's first touch rather than the download.
//! - **Rate-limited links** (`--limited`, root): three replicas (a leader and two followers),
//!   each in its own network namespace behind a veth pair whose node side is shaped with
//!   `tc tbf`. A multi-stream `get` from all three against a single-stream `get` from one, then
//!   again with one replica slowed to a tenth of the rate (hedging has to make up for it). The
//!   namespaces are created and removed here; without the privileges the part says so and is
//!   skipped.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;

use goutube::client::{Client, GetOptions, GetReport, Quiet};
use goutube::netns::Namespaces;

use super::{
    Relay, RssSampler, Server, Workload, connect, consume, cpu_seconds, durable_write, produce,
    ratio_row, raw_tcp_copy, spread, storage, wait_for_followers, wait_for_size, warm_memory,
};

const POINT: &str = "bench/download";

pub(super) async fn run(
    mib: u64,
    rounds: usize,
    limited: bool,
    rate_mbit: u64,
) -> anyhow::Result<()> {
    warm_memory()?;
    loopback(mib, rounds).await?;
    if limited {
        match links(rate_mbit) {
            // The namespaces are removed when `links` is dropped.
            Ok(links) => limited_links(&links, mib, rate_mbit).await?,
            Err(error) => println!(
                "\n## Rate-limited links: not run\n\nThe namespaces could not be set up ({error:#}); this part needs root, `ip` and `tc`.\n"
            ),
        }
    }
    Ok(())
}

/// Seconds for `get` of the point into `out` (removed afterwards), with its report.
async fn get(client: &Client, out: &Path) -> anyhow::Result<(f64, GetReport)> {
    let started = Instant::now();
    let report = client
        .get(POINT, out, &GetOptions::default(), Arc::new(Quiet))
        .await?;
    let seconds = started.elapsed().as_secs_f64();
    std::fs::remove_file(out)?;
    Ok((seconds, report))
}

async fn loopback(mib: u64, rounds: usize) -> anyhow::Result<()> {
    let work = tempfile::tempdir()?;
    let node = Server::node_at(
        work.path(),
        "node",
        "127.0.0.1",
        None,
        &format!("role = \"leader\"\n{}", storage("never")),
    )?;
    let balancer = Server::node_at(
        work.path(),
        "balancer",
        "127.0.0.1",
        None,
        &format!(
            "role = \"balancer\"\nseed_addresses = [{:?}]\n",
            node.gossip
        ),
    )?;
    let direct = connect(&node.rpc).await?;
    let through = connect(&balancer.rpc).await?;
    let workload = Workload::new(mib, 256 * 1024);
    let total = workload.total;
    produce(&direct, POINT, &workload.pool, workload.frames).await?;
    wait_for_size(&through, POINT, total).await?;

    let out = work.path().join("download.bin");
    let (mut memory, mut file, mut relayed) = (Vec::new(), Vec::new(), Vec::new());
    let (mut disk, mut raw, mut raw_relayed) = (Vec::new(), Vec::new(), Vec::new());
    let mut peak = 0;
    let (mut node_cpu, mut balancer_cpu) = (0.0, 0.0);
    for _ in 0..rounds {
        memory.push(consume(&direct, POINT, total).await?);
        file.push(get(&direct, &out).await?.0);
        // What this machine allows, whatever the code: the same bytes made durable with no
        // network at all, and a byte relay that parses nothing.
        disk.push(durable_write(work.path(), &workload.pool, workload.frames)?);
        raw.push(raw_tcp_copy(&workload.pool, workload.frames, None, Relay::None).await?);
        raw_relayed
            .push(raw_tcp_copy(&workload.pool, workload.frames, None, Relay::Forward).await?);
        let sampler = RssSampler::start(balancer.pid());
        let before = (cpu_seconds(node.pid()), cpu_seconds(balancer.pid()));
        relayed.push(consume(&through, POINT, total).await?);
        node_cpu += cpu_seconds(node.pid()) - before.0;
        balancer_cpu += cpu_seconds(balancer.pid()) - before.1;
        peak = peak.max(sampler.stop());
    }
    println!("## Reading {mib} MiB on loopback: {rounds} rounds, median (slowest–fastest)\n");
    println!("| measurement | baseline | measured | ratio |");
    println!("|---|---|---|---|");
    ratio_row(
        "`get` into a file (synced) vs consume into memory",
        total,
        &memory,
        &file,
    );
    ratio_row(
        "the same bytes written into a file and synced, no network, vs consume into memory",
        total,
        &memory,
        &disk,
    );
    ratio_row(
        "consume through a balancer vs straight from the node",
        total,
        &memory,
        &relayed,
    );
    ratio_row(
        "raw TCP copy through a relay thread vs straight (any relay's ceiling here)",
        total,
        &raw,
        &raw_relayed,
    );
    let gib = (total * rounds as u64) as f64 / (1024.0 * 1024.0 * 1024.0);
    println!(
        "\nbalancer peak RSS while relaying: {:.1} MiB; CPU per GiB relayed: balancer {:.2} s, node {:.2} s",
        peak as f64 / (1024.0 * 1024.0),
        balancer_cpu / gib,
        node_cpu / gib
    );
    balancer.stop()?;
    node.stop()
}

/// The replicas of the rate-limited part.
const REPLICAS: [&str; 3] = ["replica-0", "replica-1", "replica-2"];

/// Network namespaces `gtb-0..2` for [`REPLICAS`], on `10.231.<i>.2`, each joined to the host by
/// a veth pair; `tc` is tried on the first now rather than after the set-up.
fn links(rate_mbit: u64) -> anyhow::Result<Namespaces> {
    let mut links = Namespaces::new("gtb", [10, 231])?;
    for replica in REPLICAS {
        links.add(replica)?;
    }
    links.shape(REPLICAS[0], rate_mbit)?;
    links.unshape(REPLICAS[0])?;
    Ok(links)
}

async fn limited_links(links: &Namespaces, mib: u64, rate_mbit: u64) -> anyhow::Result<()> {
    let work = tempfile::tempdir()?;
    let count = REPLICAS.len();
    let leader = Server::node_at(
        work.path(),
        REPLICAS[0],
        &links.address(REPLICAS[0]).to_string(),
        Some(&links.namespace(REPLICAS[0])),
        &format!("role = \"leader\"\n{}", storage("never")),
    )?;
    let mut followers = Vec::new();
    for replica in &REPLICAS[1..] {
        followers.push(Server::node_at(
            work.path(),
            replica,
            &links.address(replica).to_string(),
            Some(&links.namespace(replica)),
            &format!(
                "role = \"follower\"\nleader_addresses = [{:?}]\nseed_addresses = [{:?}]\n{}",
                leader.replication,
                leader.gossip,
                storage("never")
            ),
        )?);
    }
    let to_leader = connect(&leader.rpc).await?;
    wait_for_followers(&leader.rpc, followers.len()).await?;
    // The point is written and replicated before the links are shaped.
    let workload = Workload::new(mib, 256 * 1024);
    let total = workload.total;
    produce(&to_leader, POINT, &workload.pool, workload.frames).await?;
    let to_follower = connect(&followers[0].rpc).await?;
    for follower in &followers {
        wait_for_size(&connect(&follower.rpc).await?, POINT, total).await?;
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while to_leader.stat(POINT).await?.workers.len() < count {
        if Instant::now() > deadline {
            bail!("the leader never named every replica as a worker");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for replica in REPLICAS {
        links.shape(replica, rate_mbit)?;
    }

    let out = work.path().join("download.bin");
    // A follower names only itself as a worker: one stream over one link.
    let (single, _) = get(&to_follower, &out).await?;
    let (multi, report) = get(&to_leader, &out).await?;
    if report.workers != count {
        bail!("the multi-stream get used {} workers", report.workers);
    }
    links.shape(REPLICAS[count - 1], rate_mbit / 10)?;
    let (hedged, slowed) = get(&to_leader, &out).await?;

    println!("\n## {mib} MiB from replicas behind {rate_mbit} Mbit/s links (tc tbf), one round\n");
    println!("| measurement | single stream | multi-stream | ratio |");
    println!("|---|---|---|---|");
    ratio_row(
        &format!("`get` from {count} replicas vs from one"),
        total,
        &[single],
        &[multi],
    );
    ratio_row(
        &format!(
            "`get` with one replica at {} Mbit/s ({} hedged, {} splits)",
            rate_mbit / 10,
            slowed.hedges,
            slowed.splits
        ),
        total,
        &[single],
        &[hedged],
    );
    println!(
        "\nsingle stream {}, multi-stream {}, slowed replica {}",
        spread(total, &[single]),
        spread(total, &[multi]),
        spread(total, &[hedged])
    );
    for follower in followers {
        follower.stop()?;
    }
    leader.stop()
}
