//! `goutube bench`: throughput and resource measurements, each against a baseline measured in the
//! same run (these machines are noisy; a ratio is what means something).
//!
//! Servers run as child processes of this binary, so their RSS and descriptors can be read from
//! `/proc` and the client shares no runtime with them: a real node (`goutube run`), and a baseline
//! (`goutube bench baseline-server`) that speaks the same API but discards what it receives and
//! serves reads from memory. The same client code drives both, in alternating rounds.
//!
//! The shared parts are their own files — [`harness`] (server processes and `/proc`), [`stats`]
//! (medians, spreads, ratio rows), [`workload`] (frames, produce/consume loops, the machine's
//! ceilings), [`baseline`] — and each scenario beyond streaming has one (`alloc`, `cluster`,
//! `controller`, `download`, `failover`, `http`, `nginx`, `points`, `replication`, `reshard`,
//! `transfer`; `fleet` starts the nodes several of them share); they all stand on the shared
//! parts through this module.

mod alloc;
mod baseline;
mod cluster;
mod controller;
mod download;
mod failover;
mod fleet;
mod harness;
mod http;
mod nginx;
mod points;
mod replication;
mod reshard;
mod stats;
mod transfer;
mod workload;

use baseline::*;
use harness::*;
use stats::*;
use workload::*;

use std::time::{Duration, Instant};

use anyhow::bail;
use bytes::Bytes;
use clap::Subcommand;

use goutube::client::{Client, ClientOptions, ClientTls};
use goutube::proto::ProduceRequest;

#[derive(Debug, Subcommand)]
pub(crate) enum Bench {
    /// Produce and consume through a node against the same calls into a discarding, in-memory
    /// server; node RSS while streaming.
    Streaming {
        /// MiB streamed per run.
        #[arg(long, default_value_t = 1024)]
        mib: u64,
        /// KiB per frame.
        #[arg(long, default_value_t = 256)]
        frame_kib: usize,
        /// Rounds of each measurement; the median is reported.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Also measure fsync = "always" and "interval" (slow on some disks).
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
        durable: bool,
    },
    /// Produce and consume through an mTLS node against an h2c node in the same run; connection
    /// set-up and first-call latency.
    Tls {
        #[arg(long, default_value_t = 1024)]
        mib: u64,
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Connections opened to measure set-up latency.
        #[arg(long, default_value_t = 50)]
        connections: usize,
    },
    /// Leader → follower replication: catch-up of a point (checksum and lz4 bundlers, plaintext
    /// and mTLS) against a raw TCP copy of the same bytes, follower lag under sustained produce
    /// and the highest rate that keeps it under 50 ms, produce with `replicas = 1` against
    /// `local`, and with two followers in sync against one.
    Replication {
        #[arg(long, default_value_t = 1024)]
        mib: u64,
        /// Rounds of each catch-up and produce measurement; the median is reported.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Target rate of the sustained produce, MB/s.
        #[arg(long, default_value_t = 200)]
        rate: u64,
        /// Seconds of sustained produce.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Which measurements to run, comma separated.
        #[arg(long, value_delimiter = ',', default_value = "catch-up,lag,ack")]
        parts: Vec<replication::Part>,
    },
    /// Resharding: draining a primary that holds `points` points of `mib` MiB in all against a
    /// follower's catch-up of the same points; the write pause per point at the fence; consume
    /// throughput of unrelated points during the move.
    Reshard {
        #[arg(long, default_value_t = 2048)]
        mib: u64,
        #[arg(long, default_value_t = 200)]
        points: usize,
        #[arg(long, default_value_t = 1)]
        rounds: usize,
        /// `reshard.max_concurrent_moves` of the primaries (the node's default when absent).
        #[arg(long)]
        moves: Option<usize>,
    },
    /// Membership convergence and kill detection for in-process members on UDP loopback, and
    /// the cached ownership check against a produce round trip.
    Cluster {
        /// Cluster sizes, comma separated.
        #[arg(long, value_delimiter = ',', default_value = "3,10,30")]
        sizes: Vec<usize>,
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// The controller: commit latency of a topology step on three voters (against a synced
    /// write, the disk's ceiling) and the time to a new leader after a `kill -9` of the leader.
    Controller {
        /// Topology steps proposed, one at a time.
        #[arg(long, default_value_t = 200)]
        proposals: usize,
        /// Kills of the leader.
        #[arg(long, default_value_t = 30)]
        trials: usize,
        /// `controller.election_timeout_ms` of the voters (heartbeats a third of it); default:
        /// the configuration's default.
        #[arg(long)]
        election_timeout_ms: Option<u64>,
    },
    /// Automatic failover: from a `kill -9` of a group leader under acknowledged writes to a
    /// new leader named and to its first acknowledged write (against the session, the floor),
    /// with every acknowledged byte checked on the new leader. A fresh cluster per trial.
    Failover {
        /// Kills of a group leader.
        #[arg(long, default_value_t = 30)]
        trials: usize,
        /// MiB of a `put` to a leader killed midway, after the trials (0: none).
        #[arg(long, default_value_t = 1024)]
        put_mib: u64,
    },
    /// Planned moves of leadership under a producer through a balancer: the writer's pause per
    /// `TransferLeadership` against the gaps between acknowledgements with none, and a rolling
    /// restart of 3 primaries (2 followers each): client-visible errors and the rate's dip.
    Transfer {
        /// Transfers of a group's leadership.
        #[arg(long, default_value_t = 30)]
        trials: usize,
        /// Also restart 3 primaries one after the other under 3 producers.
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
        rolling_restart: bool,
    },
    /// The HTTP gateway against gRPC consume of the same point in the same run: reading it
    /// whole, and many clients reading random 1 MiB ranges (time to first byte, throughput).
    /// With `--against-nginx`, against nginx serving the same bytes from a file instead: whole
    /// GETs, random ranges, and many viewers reading at a player's rate (CPU and memory per
    /// delivered GiB).
    Http {
        #[arg(long, default_value_t = 1024)]
        mib: u64,
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Concurrent clients of the random-range load.
        #[arg(long, default_value_t = 100)]
        clients: usize,
        /// Ranges each client reads.
        #[arg(long, default_value_t = 20)]
        requests: usize,
        /// Compare with nginx (Debian's package, started by the bench) instead of gRPC.
        #[arg(long)]
        against_nginx: bool,
        /// With `--against-nginx`: the client counts of the random-range loads.
        #[arg(long, value_delimiter = ',', default_value = "8,100")]
        range_clients: Vec<usize>,
        /// With `--against-nginx`: viewers at once.
        #[arg(long, default_value_t = 1000)]
        viewers: usize,
        /// With `--against-nginx`: each viewer's rate, kbit/s.
        #[arg(long, default_value_t = 3000)]
        viewer_kbps: u64,
        /// With `--against-nginx`: seconds of each viewers' round.
        #[arg(long, default_value_t = 20)]
        viewer_seconds: u64,
        /// With `--against-nginx`: also whole GETs and ranges beside a busy loop on one core.
        #[arg(long)]
        hog: bool,
        /// With `--against-nginx`: everything over TLS with client certificates, on both.
        #[arg(long)]
        tls: bool,
    },
    /// Downloads: `goutube get` into a file against consume into memory, consume through a
    /// balancer against straight from a node (balancer RSS), and with `--limited` (root) a
    /// multi-stream get from three replicas behind rate-limited links against a single stream.
    Download {
        #[arg(long, default_value_t = 1024)]
        mib: u64,
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Also run the rate-limited part (network namespaces, veth pairs, tc tbf; needs root).
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
        limited: bool,
        /// The rate of each replica's link in the limited part, Mbit/s.
        #[arg(long, default_value_t = 200)]
        rate_mbit: u64,
    },
    /// The next large allocation after freeing many small ones: glibc's malloc against this
    /// binary's allocator.
    Alloc {
        /// Small allocations freed at once.
        #[arg(long, default_value_t = 1_000_000)]
        count: usize,
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// Create many small points, restart, list and read them: start-up time, RSS, descriptors.
    Points {
        #[arg(long, default_value_t = 10_000)]
        count: usize,
        #[arg(long, default_value_t = 4096)]
        size: usize,
        /// storage.max_open_points of the node.
        #[arg(long, default_value_t = 1024)]
        max_open: usize,
        /// Points stat'ed, chosen at random, one `GetMetadata` at a time.
        #[arg(long, default_value_t = 10_000)]
        stats: usize,
        /// Produce streams creating points at once (each its own share of them).
        #[arg(long, default_value_t = 1)]
        streams: usize,
        /// storage.fsync of the node: "never", "interval" or "always".
        #[arg(long, default_value = "never")]
        fsync: String,
        /// storage.packed_max of the node: small new points packed into segments (0: each
        /// point in files of its own).
        #[arg(long, default_value_t = 64 * 1024)]
        packed_max: u64,
    },
    /// The baseline server (used by `bench streaming`).
    #[command(hide = true)]
    BaselineServer,
}

pub(super) async fn run(bench: Bench) -> anyhow::Result<()> {
    match bench {
        Bench::Streaming {
            mib,
            frame_kib,
            rounds,
            durable,
        } => streaming(mib, frame_kib * 1024, rounds.max(1), durable).await,
        Bench::Alloc { count, rounds } => alloc::run(count.max(1), rounds.max(1)),
        Bench::Points {
            count,
            size,
            max_open,
            stats,
            streams,
            fsync,
            packed_max,
        } => {
            let shape = points::Shape {
                count,
                size,
                max_open,
                stats,
                streams: streams.max(1),
                fsync,
                packed_max,
            };
            points::run(shape).await
        }
        Bench::Tls {
            mib,
            rounds,
            connections,
        } => tls(mib, rounds.max(1), connections.max(1)).await,
        Bench::Replication {
            mib,
            rounds,
            rate,
            seconds,
            parts,
        } => replication::run(mib, rate.max(1), seconds.max(1), rounds.max(1), &parts).await,
        Bench::Reshard {
            mib,
            points,
            rounds,
            moves,
        } => reshard::run(mib.max(1), points.max(1), rounds.max(1), moves).await,
        Bench::Cluster { sizes, rounds } => cluster::run(&sizes, rounds.max(1)).await,
        Bench::Controller {
            proposals,
            trials,
            election_timeout_ms,
        } => {
            let timeout = election_timeout_ms
                .unwrap_or(goutube::config::ControllerSection::default().election_timeout_ms);
            controller::run(proposals.max(1), trials.max(1), timeout.max(30)).await
        }
        Bench::Failover { trials, put_mib } => failover::run(trials.max(1), put_mib).await,
        Bench::Transfer {
            trials,
            rolling_restart,
        } => transfer::run(trials.max(1), rolling_restart).await,
        Bench::Http {
            mib,
            rounds,
            against_nginx: true,
            range_clients,
            requests,
            viewers,
            viewer_kbps,
            viewer_seconds,
            hog,
            tls,
            ..
        } => {
            nginx::run(nginx::Plan {
                mib,
                rounds: rounds.max(1),
                clients: range_clients,
                requests: requests.max(1),
                viewers: viewers.max(1),
                viewer_kbps: viewer_kbps.max(1),
                viewer_seconds: viewer_seconds.max(1),
                hog,
                tls,
            })
            .await
        }
        Bench::Http {
            mib,
            rounds,
            clients,
            requests,
            ..
        } => http::run(mib, rounds.max(1), clients.max(1), requests.max(1)).await,
        Bench::Download {
            mib,
            rounds,
            limited,
            rate_mbit,
        } => download::run(mib, rounds.max(1), limited, rate_mbit.max(1)).await,
        Bench::BaselineServer => baseline_server().await,
    }
}

async fn streaming(mib: u64, frame: usize, rounds: usize, durable: bool) -> anyhow::Result<()> {
    let Workload {
        total,
        frames,
        pool,
    } = Workload::new(mib, frame);
    println!(
        "streaming {mib} MiB in {} KiB frames, {rounds} round(s), median reported",
        frame / 1024
    );

    let baseline = Server::baseline()?;
    let work = tempfile::tempdir()?;
    let node = Server::node(work.path(), &storage("never"))?;
    let baseline_client = connect(&baseline.rpc).await?;
    let node_client = connect(&node.rpc).await?;

    let mut base_produce = Vec::new();
    let mut node_produce = Vec::new();
    let mut node_produce_at = Vec::new();
    let mut base_consume = Vec::new();
    let mut node_consume = Vec::new();
    let mut peak_rss = 0;
    let scratch = work.path().join("data");
    // The first write into never-touched guest memory is slow on virtual machines (the hypervisor
    // backs each page on first touch): measure it once, as its own row.
    let cold = disk_write(&scratch, &pool, frames)?;
    for round in 0..rounds {
        let point = format!("bench-{round}");
        base_produce.push(produce(&baseline_client, &point, &pool, frames).await?);
        // Warm-up: recycle page-cache pages the way a long-running host does, so the round
        // measures the node rather than first touches of guest memory.
        disk_write(&scratch, &pool, frames)?;
        let sampler = RssSampler::start(node.pid());
        node_produce.push(produce(&node_client, &point, &pool, frames).await?);
        base_consume.push(consume(&baseline_client, &point, total).await?);
        node_consume.push(consume(&node_client, &point, total).await?);
        peak_rss = peak_rss.max(sampler.stop());
        // The same produce with an expected offset on every frame (safe retries, as `put`).
        disk_write(&scratch, &pool, frames)?;
        let at = format!("{point}-at");
        node_produce_at.push(produce_frames(&node_client, &at, &pool, frames, true).await?);
    }
    // Deleted only now: freeing (and discarding) 1 GiB files must not land in a measured round.
    for round in 0..rounds {
        node_client.delete(&format!("bench-{round}")).await?;
        node_client.delete(&format!("bench-{round}-at")).await?;
    }
    println!("| measurement | baseline | goutube | ratio |");
    println!("|---|---|---|---|");
    ratio_row(
        "produce, fsync = never",
        total,
        &base_produce,
        &node_produce,
    );
    ratio_row("consume", total, &base_consume, &node_consume);
    ratio_row(
        "produce with expected_offset on every frame (baseline: the node's plain produce)",
        total,
        &node_produce,
        &node_produce_at,
    );
    println!(
        "| first write into untouched memory (pwrite, no network) | | {} | |",
        spread(total, &[cold])
    );
    drop(node);

    if durable {
        for policy in ["interval", "always"] {
            let work = tempfile::tempdir()?;
            let node = Server::node(work.path(), &storage(policy))?;
            let client = connect(&node.rpc).await?;
            let base = produce(&baseline_client, "durable", &pool, frames).await?;
            disk_write(work.path(), &pool, frames)?;
            let measured = produce(&client, "durable", &pool, frames).await?;
            ratio_row(
                &format!("produce, fsync = {policy}"),
                total,
                &[base],
                &[measured],
            );
        }
    }
    println!(
        "node peak RSS while streaming: {:.1} MiB",
        peak_rss as f64 / 1048576.0
    );
    Ok(())
}

async fn tls(mib: u64, rounds: usize, connections: usize) -> anyhow::Result<()> {
    let Workload {
        total,
        frames,
        pool,
    } = Workload::new(mib, 256 * 1024);
    let work = tempfile::tempdir()?;
    let pki = BenchPki::write(&work.path().join("certs"))?;
    let client_tls = pki.client();
    let plain_dir = work.path().join("h2c");
    let tls_dir = work.path().join("tls");
    std::fs::create_dir_all(&plain_dir)?;
    std::fs::create_dir_all(&tls_dir)?;
    let plain = Server::node(&plain_dir, &storage("never"))?;
    let secure = Server::node(
        &tls_dir,
        &format!("{}{}", storage("never"), pki.node_config()),
    )?;
    let plain_client = connect(&plain.rpc).await?;
    let secure_client = connect_with(&secure.rpc, Some(client_tls.clone())).await?;
    println!(
        "streaming {mib} MiB in 256 KiB frames over h2c and over mTLS, {rounds} round(s), median reported"
    );
    let (mut plain_produce, mut secure_produce, mut plain_consume, mut secure_consume) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        let point = format!("bench-{round}");
        disk_write(&plain_dir, &pool, frames)?;
        plain_produce.push(produce(&plain_client, &point, &pool, frames).await?);
        disk_write(&tls_dir, &pool, frames)?;
        secure_produce.push(produce(&secure_client, &point, &pool, frames).await?);
        plain_consume.push(consume(&plain_client, &point, total).await?);
        secure_consume.push(consume(&secure_client, &point, total).await?);
    }
    println!("| measurement | h2c | mTLS | ratio |");
    println!("|---|---|---|---|");
    ratio_row("produce", total, &plain_produce, &secure_produce);
    ratio_row("consume", total, &plain_consume, &secure_consume);

    // A new connection, then one call (GetMetadata of a missing point: served, NotFound).
    let first_call = |addr: String, tls: Option<ClientTls>| async move {
        let started = Instant::now();
        let client = connect_with(&addr, tls).await?;
        let _ = client.stat("absent").await;
        Ok::<_, anyhow::Error>(started.elapsed().as_secs_f64())
    };
    let (mut plain_setup, mut secure_setup) = (Vec::new(), Vec::new());
    for _ in 0..connections {
        plain_setup.push(first_call(plain.rpc.clone(), None).await?);
        secure_setup.push(first_call(secure.rpc.clone(), Some(client_tls.clone())).await?);
    }
    plain_setup.sort_by(f64::total_cmp);
    secure_setup.sort_by(f64::total_cmp);
    println!("\n| connection set-up + first call | h2c | mTLS |");
    println!("|---|---|---|");
    for p in [50, 90] {
        println!(
            "| p{p} | {:.2} ms | {:.2} ms |",
            percentile(&plain_setup, p) * 1e3,
            percentile(&secure_setup, p) * 1e3
        );
    }
    Ok(())
}

/// Produces `frames` frames (batch `batch` of the pool) to `point`; returns the point's end.
async fn produce_record(
    client: &Client,
    point: &str,
    pool: &[Bytes],
    frames: u64,
    batch: u64,
) -> anyhow::Result<u64> {
    let requests: Vec<ProduceRequest> = (0..frames)
        .map(|i| ProduceRequest {
            point: point.into(),
            frame: pool[((batch * frames + i) as usize) % pool.len()].clone(),
            ..Default::default()
        })
        .collect();
    let response = client
        .raw()
        .produce_stream(tokio_stream::iter(requests))
        .await?;
    Ok(response.into_inner().records.first().map_or(0, |r| r.end))
}

/// Waits until `point` on `client` has at least `size` bytes.
async fn wait_for_size(client: &Client, point: &str, size: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !client.stat(point).await.is_ok_and(|m| m.size >= size) {
        if Instant::now() > deadline {
            bail!("{point} never reached {size} bytes");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

/// Waits until `point` on `client` has `size` bytes with checksum `crc`.
async fn wait_for(client: &Client, point: &str, size: u64, crc: u32) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        if let Ok(meta) = client.stat(point).await
            && meta.size == size
        {
            if meta.crc32c != crc {
                bail!("{point} converged to a different checksum");
            }
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{point} did not converge");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn wait_for_followers(rpc: &str, count: usize) -> anyhow::Result<()> {
    use goutube::proto::GetFollowersRequest;
    use goutube::proto::follower_resolver_helper_client::FollowerResolverHelperClient;
    let channel = goutube::client::channel(&ClientOptions {
        addr: rpc.to_owned(),
        tls: None,
    })
    .await?;
    let mut client = FollowerResolverHelperClient::new(channel);
    let deadline = Instant::now() + Duration::from_secs(30);
    while client
        .get_followers(GetFollowersRequest {})
        .await?
        .into_inner()
        .servers
        .len()
        < count
    {
        if Instant::now() > deadline {
            bail!("no follower connected");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}
