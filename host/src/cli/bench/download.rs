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
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use goutube::client::{Client, GetOptions, GetReport, Quiet};

use super::{
    Relay, RssSampler, Server, Workload, connect, consume, durable_write, produce, ratio_row,
    raw_tcp_copy, spread, storage, wait_for_followers, wait_for_size, warm_memory,
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
        match Links::create(3, rate_mbit) {
            Ok(links) => {
                let outcome = limited_links(&links, mib, rate_mbit).await;
                links.remove();
                outcome?;
            }
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

async fn limited_links(links: &Links, mib: u64, rate_mbit: u64) -> anyhow::Result<()> {
    let work = tempfile::tempdir()?;
    let leader = Server::node_at(
        work.path(),
        "replica-0",
        &links.node_ip(0),
        Some(&links.namespace(0)),
        &format!("role = \"leader\"\n{}", storage("never")),
    )?;
    let mut followers = Vec::new();
    for i in 1..links.count {
        followers.push(Server::node_at(
            work.path(),
            &format!("replica-{i}"),
            &links.node_ip(i),
            Some(&links.namespace(i)),
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
    while to_leader.stat(POINT).await?.workers.len() < links.count {
        if Instant::now() > deadline {
            bail!("the leader never named every replica as a worker");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for i in 0..links.count {
        links.shape(i, rate_mbit)?;
    }

    let out = work.path().join("download.bin");
    // A follower names only itself as a worker: one stream over one link.
    let (single, _) = get(&to_follower, &out).await?;
    let (multi, report) = get(&to_leader, &out).await?;
    if report.workers != links.count {
        bail!("the multi-stream get used {} workers", report.workers);
    }
    links.shape(links.count - 1, rate_mbit / 10)?;
    let (hedged, slowed) = get(&to_leader, &out).await?;

    println!("\n## {mib} MiB from replicas behind {rate_mbit} Mbit/s links (tc tbf), one round\n");
    println!("| measurement | single stream | multi-stream | ratio |");
    println!("|---|---|---|---|");
    ratio_row(
        &format!("`get` from {} replicas vs from one", links.count),
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

/// User and system CPU time `pid` has used, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let ticks = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            // Fields after the command name (which may hold spaces) end with ')'.
            let rest = stat.rsplit_once(')')?.1;
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let user: u64 = fields.get(11)?.parse().ok()?;
            let system: u64 = fields.get(12)?.parse().ok()?;
            Some(user + system)
        })
        .unwrap_or(0);
    // SAFETY: sysconf only reads a system constant.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1);
    ticks as f64 / per_second as f64
}

/// Network namespaces `goutube-bench-<i>`, each joined to this one by a veth pair: the host
/// side is `10.231.<i>.1`, the node side `10.231.<i>.2`; forwarding lets the namespaces reach
/// each other through the host. Removed by [`Links::remove`].
struct Links {
    count: usize,
    forwarding_was: String,
}

impl Links {
    fn create(count: usize, rate_mbit: u64) -> anyhow::Result<Links> {
        let forwarding_was = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward")
            .context("reading net.ipv4.ip_forward")?;
        let links = Links {
            count,
            forwarding_was,
        };
        // Leftovers of an interrupted run.
        links.remove();
        let made = (|| {
            for i in 0..count {
                let (namespace, host, node) =
                    (links.namespace(i), links.host_if(i), links.node_if(i));
                sh(&["ip", "netns", "add", &namespace])?;
                sh(&[
                    "ip", "link", "add", &host, "type", "veth", "peer", "name", &node,
                ])?;
                sh(&["ip", "link", "set", &node, "netns", &namespace])?;
                sh(&[
                    "ip",
                    "addr",
                    "add",
                    &format!("10.231.{i}.1/24"),
                    "dev",
                    &host,
                ])?;
                sh(&["ip", "link", "set", &host, "up"])?;
                let inside = |args: &[&str]| {
                    let mut all = vec!["ip", "netns", "exec", &namespace];
                    all.extend_from_slice(args);
                    sh(&all)
                };
                inside(&[
                    "ip",
                    "addr",
                    "add",
                    &format!("{}/24", links.node_ip(i)),
                    "dev",
                    &node,
                ])?;
                inside(&["ip", "link", "set", &node, "up"])?;
                inside(&["ip", "link", "set", "lo", "up"])?;
                inside(&[
                    "ip",
                    "route",
                    "add",
                    "default",
                    "via",
                    &format!("10.231.{i}.1"),
                ])?;
            }
            std::fs::write("/proc/sys/net/ipv4/ip_forward", "1\n")
                .context("enabling net.ipv4.ip_forward")?;
            // tc must work too: try it now, on the first link, rather than after the set-up.
            links.shape(0, rate_mbit)?;
            sh(&[
                "ip",
                "netns",
                "exec",
                &links.namespace(0),
                "tc",
                "qdisc",
                "del",
                "dev",
                &links.node_if(0),
                "root",
            ])
        })();
        if let Err(error) = made {
            links.remove();
            return Err(error);
        }
        Ok(links)
    }

    fn namespace(&self, i: usize) -> String {
        format!("goutube-bench-{i}")
    }

    fn host_if(&self, i: usize) -> String {
        format!("gtb-h{i}")
    }

    fn node_if(&self, i: usize) -> String {
        format!("gtb-n{i}")
    }

    fn node_ip(&self, i: usize) -> String {
        format!("10.231.{i}.2")
    }

    /// Limits what replica `i` sends to `rate_mbit` Mbit/s (token bucket on its side's egress).
    fn shape(&self, i: usize, rate_mbit: u64) -> anyhow::Result<()> {
        sh(&[
            "ip",
            "netns",
            "exec",
            &self.namespace(i),
            "tc",
            "qdisc",
            "replace",
            "dev",
            &self.node_if(i),
            "root",
            "tbf",
            "rate",
            &format!("{rate_mbit}mbit"),
            "burst",
            "256kb",
            "latency",
            "100ms",
        ])
    }

    /// Removes the namespaces (their veth pairs go with them) and restores forwarding.
    fn remove(&self) {
        for i in 0..self.count {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.namespace(i)])
                .stderr(std::process::Stdio::null())
                .status();
        }
        let _ = std::fs::write("/proc/sys/net/ipv4/ip_forward", &self.forwarding_was);
    }
}

/// Runs a command; fails with its stderr.
fn sh(args: &[&str]) -> anyhow::Result<()> {
    let output = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("running {}", args[0]))?;
    if !output.status.success() {
        bail!(
            "`{}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}
