//! `goutube bench`: throughput and resource measurements, each against a baseline measured in the
//! same run (these machines are noisy; a ratio is what means something).
//!
//! Servers run as child processes of this binary, so their RSS and descriptors can be read from
//! `/proc` and the client shares no runtime with them: a real node (`goutube run`), and a baseline
//! (`goutube bench baseline-server`) that speaks the same API but discards what it receives and
//! serves reads from memory. The same client code drives both, in alternating rounds.

mod cluster;
mod download;
mod http;
mod replication;
mod reshard;

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::Subcommand;
use rand::RngCore;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use goutube::client::{Client, ClientOptions, ClientTls};
use goutube::process::NodeProcess;
use goutube::proto::streaming_server::{Streaming, StreamingServer};
use goutube::proto::{
    ConsumeRequest, ConsumeResponse, DeletePointRequest, DeletePointResponse, ListPointsRequest,
    ListPointsResponse, MetadataRequest, MetadataResponse, ProduceRequest, ProduceResponse, Record,
};

#[derive(Debug, Subcommand)]
pub enum Bench {
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
    /// `local`.
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
    /// The HTTP gateway against gRPC consume of the same point in the same run: reading it
    /// whole, and many clients reading random 1 MiB ranges (time to first byte, throughput).
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
    /// Create many small points, restart, list and read them: start-up time, RSS, descriptors.
    Points {
        #[arg(long, default_value_t = 10_000)]
        count: usize,
        #[arg(long, default_value_t = 4096)]
        size: usize,
        /// storage.max_open_points of the node.
        #[arg(long, default_value_t = 1024)]
        max_open: usize,
    },
    /// The baseline server (used by `bench streaming`).
    #[command(hide = true)]
    BaselineServer,
}

pub async fn run(bench: Bench) -> anyhow::Result<()> {
    match bench {
        Bench::Streaming {
            mib,
            frame_kib,
            rounds,
            durable,
        } => streaming(mib, frame_kib * 1024, rounds.max(1), durable).await,
        Bench::Points {
            count,
            size,
            max_open,
        } => points(count, size, max_open).await,
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
        } => reshard::run(mib.max(1), points.max(1), rounds.max(1)).await,
        Bench::Cluster { sizes, rounds } => cluster::run(&sizes, rounds.max(1)).await,
        Bench::Http {
            mib,
            rounds,
            clients,
            requests,
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
    let certs = work.path().join("certs");
    goutube::certs::write(&goutube::certs::Request {
        out: &certs,
        nodes: &["bench".to_owned()],
        sans: &[],
        clients: &["root".to_owned()],
        days: 1,
        force: false,
    })?;
    let client_tls = ClientTls {
        ca: certs.join("ca.pem"),
        cert: certs.join("client-root.pem"),
        key: certs.join("client-root-key.pem"),
        server_name: None,
    };
    let plain_dir = work.path().join("h2c");
    let tls_dir = work.path().join("tls");
    std::fs::create_dir_all(&plain_dir)?;
    std::fs::create_dir_all(&tls_dir)?;
    let plain = Server::node(&plain_dir, &storage("never"))?;
    let secure = Server::node(
        &tls_dir,
        &format!(
            "{}[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n[cluster]\nkey_file = {:?}\n",
            storage("never"),
            certs.join("ca.pem"),
            certs.join("node-bench.pem"),
            certs.join("node-bench-key.pem"),
            certs.join(goutube::certs::CLUSTER_KEY_FILE)
        ),
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

/// Writes into most of the machine's available memory once. On a virtual machine the first touch
/// of a page costs far more than a copy (10 GiB took 26 s on this machine kind, 0.4 GB/s), and
/// the page cache a measured write fills (a follower's copy, a download) would pay it on
/// whichever measurement comes first; after this, measurements find memory the hypervisor
/// backs, as a long-running node does. This machine kind hands freed memory back to its host,
/// so the effect wears off (docs/benchmarks.md): benchmarks warm once, at their start.
fn warm_memory() -> anyhow::Result<()> {
    let meminfo = std::fs::read_to_string("/proc/meminfo")?;
    let available_kib: u64 = meminfo
        .lines()
        .find_map(|line| line.strip_prefix("MemAvailable:"))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let size = (available_kib * 1024).saturating_sub(4 << 30).min(16 << 30);
    let started = Instant::now();
    let touched = vec![0xa5u8; size as usize];
    std::hint::black_box(&touched);
    drop(touched);
    println!(
        "warmed {:.1} GiB of memory in {:.1} s",
        size as f64 / (1u64 << 30) as f64,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// What stands between the sender and the receiver of a raw copy.
#[derive(Clone, Copy)]
enum Relay<'a> {
    /// Nothing: one loopback connection.
    None,
    /// A thread of its own that reads the bytes from one connection and writes them to another
    /// (1 MiB at a time, nothing parsed): the least a relay can cost, the ceiling of a
    /// balancer's relay on the same machine.
    Forward,
    /// The same thread also writes what it reads into a new file here (removed afterwards)
    /// before forwarding it: the least a leader that waits for its follower can cost.
    WriteAndForward(&'a Path),
}

/// Seconds to send `frames` frames from `pool` through `relay` over loopback TCP. With `sink`,
/// the receiver also writes what it reads to a new file there (deleted afterwards), as a follower
/// must.
async fn raw_tcp_copy(
    pool: &[Bytes],
    frames: u64,
    sink: Option<&Path>,
    relay: Relay<'_>,
) -> anyhow::Result<f64> {
    use tokio::io::AsyncWriteExt;
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let mut addr = listener.local_addr()?;
    let total = frames * pool[0].len() as u64;
    let relayed = match relay {
        Relay::None => None,
        Relay::Forward | Relay::WriteAndForward(_) => {
            let front = std::net::TcpListener::bind("127.0.0.1:0")?;
            let to = addr;
            addr = front.local_addr()?;
            let copy = match relay {
                Relay::WriteAndForward(dir) => Some(tempfile::NamedTempFile::new_in(dir)?),
                _ => None,
            };
            Some(std::thread::spawn(move || {
                let (mut from, _) = front.accept()?;
                let mut onward = std::net::TcpStream::connect(to)?;
                let mut buffer = vec![0u8; 1024 * 1024];
                pass_on(
                    &mut from,
                    &mut buffer,
                    u64::MAX,
                    copy.as_ref(),
                    Some(&mut onward),
                )
            }))
        }
    };
    // Removed when the receiver drops it, inside the timed copy.
    let file = sink.map(tempfile::NamedTempFile::new_in).transpose()?;
    let receiver = std::thread::spawn(move || {
        let (mut socket, _) = listener.accept()?;
        let mut buffer = vec![0u8; 256 * 1024];
        let received = pass_on(&mut socket, &mut buffer, total, file.as_ref(), None)?;
        drop(file);
        Ok::<_, std::io::Error>(received)
    });
    let started = Instant::now();
    let mut socket = tokio::net::TcpStream::connect(addr).await?;
    socket.set_nodelay(true)?;
    for i in 0..frames as usize {
        socket.write_all(&pool[i % pool.len()]).await?;
    }
    socket.flush().await?;
    drop(socket);
    let received = tokio::task::spawn_blocking(move || receiver.join())
        .await?
        .map_err(|_| anyhow::anyhow!("the raw copy's receiver panicked"))??;
    let elapsed = started.elapsed().as_secs_f64();
    if let Some(relay) = relayed {
        tokio::task::spawn_blocking(move || relay.join())
            .await?
            .map_err(|_| anyhow::anyhow!("the raw copy's relay panicked"))??;
    }
    if received != total {
        bail!("the raw copy received {received} of {total} bytes");
    }
    Ok(elapsed)
}

/// Reads `socket` until its end or `limit` bytes, writing what it reads into `copy` and on to
/// `onward` when given. Returns the bytes read.
fn pass_on(
    socket: &mut std::net::TcpStream,
    buffer: &mut [u8],
    limit: u64,
    copy: Option<&tempfile::NamedTempFile>,
    mut onward: Option<&mut std::net::TcpStream>,
) -> std::io::Result<u64> {
    use std::io::{Read, Write};
    use std::os::unix::fs::FileExt;
    let mut read = 0u64;
    while read < limit {
        let n = socket.read(buffer)?;
        if n == 0 {
            break;
        }
        if let Some(copy) = copy {
            copy.as_file().write_all_at(&buffer[..n], read)?;
        }
        if let Some(onward) = onward.as_mut() {
            onward.write_all(&buffer[..n])?;
        }
        read += n as u64;
    }
    Ok(read)
}

async fn points(count: usize, size: usize, max_open: usize) -> anyhow::Result<()> {
    let work = tempfile::tempdir()?;
    println!("{count} points of {size} bytes, storage.max_open_points = {max_open}");
    println!("| step | time | node RSS | node descriptors |");
    println!("|---|---|---|---|");
    let report = |step: &str, elapsed: Duration, server: &Server| {
        println!(
            "| {step} | {:.3} s | {:.1} MiB | {} |",
            elapsed.as_secs_f64(),
            rss(server.pid()) as f64 / 1048576.0,
            descriptors(server.pid())
        );
    };

    let started = Instant::now();
    let node = Server::node(
        work.path(),
        &format!("{}max_open_points = {max_open}\n", storage("never")),
    )?;
    report("start (empty)", started.elapsed(), &node);
    let client = connect(&node.rpc).await?;
    let mut payload = vec![0u8; size];
    rand::rng().fill_bytes(&mut payload);
    let payload = Bytes::from(payload);
    let started = Instant::now();
    let (tx, rx) = mpsc::channel(64);
    let feeder = tokio::spawn(async move {
        for i in 0..count {
            let request = ProduceRequest {
                point: format!("p/{i:06}"),
                frame: payload.clone(),
                ..Default::default()
            };
            if tx.send(request).await.is_err() {
                return;
            }
        }
    });
    client.raw().produce_stream(ReceiverStream::new(rx)).await?;
    feeder.await?;
    report("create", started.elapsed(), &node);
    drop(client);
    node.stop()?;

    let started = Instant::now();
    let node = Server::node(
        work.path(),
        &format!("{}max_open_points = {max_open}\n", storage("never")),
    )?;
    let client = connect(&node.rpc).await?;
    let listed = client
        .raw()
        .list_points(ListPointsRequest {
            max_results: 1,
            ..Default::default()
        })
        .await?;
    drop(listed);
    report("restart (to first answer)", started.elapsed(), &node);
    let started = Instant::now();
    let listed = client.list("").await?.points;
    if listed.len() != count {
        bail!("listed {} points, created {count}", listed.len());
    }
    report("list all", started.elapsed(), &node);
    let started = Instant::now();
    for point in &listed {
        let meta = client.stat(point).await?;
        if meta.size != size as u64 {
            bail!("{point} has {} bytes, expected {size}", meta.size);
        }
    }
    report("stat all (opens every point)", started.elapsed(), &node);
    node.stop()?;
    Ok(())
}

/// What a throughput benchmark sends: `frames` frames, `total` bytes, cycled from `pool`.
struct Workload {
    total: u64,
    frames: u64,
    pool: Vec<Bytes>,
}

impl Workload {
    fn new(mib: u64, frame: usize) -> Self {
        let total = mib * 1024 * 1024;
        Self {
            total,
            frames: total / frame as u64,
            pool: frame_pool(frame),
        }
    }
}

/// 64 different random frames, cycled through: the node cannot dedupe or compress them.
fn frame_pool(frame: usize) -> Vec<Bytes> {
    (0..64)
        .map(|_| {
            let mut bytes = vec![0u8; frame];
            rand::rng().fill_bytes(&mut bytes);
            Bytes::from(bytes)
        })
        .collect()
}

/// The `[storage]` section of a benchmark node.
fn storage(fsync: &str) -> String {
    format!("[storage]\nfsync = \"{fsync}\"\n")
}

async fn connect(addr: &str) -> anyhow::Result<Client> {
    connect_with(addr, None).await
}

async fn connect_with(addr: &str, tls: Option<ClientTls>) -> anyhow::Result<Client> {
    Ok(Client::connect(&ClientOptions {
        addr: addr.to_owned(),
        tls,
    })
    .await?)
}

/// Seconds to produce `frames` frames from `pool` to `point` in one stream.
async fn produce(client: &Client, point: &str, pool: &[Bytes], frames: u64) -> anyhow::Result<f64> {
    produce_frames(client, point, pool, frames, false).await
}

/// [`produce`], each frame with its `expected_offset` when `at` is set (as `goutube put` sends).
async fn produce_frames(
    client: &Client,
    point: &str,
    pool: &[Bytes],
    frames: u64,
    at: bool,
) -> anyhow::Result<f64> {
    let (tx, rx) = mpsc::channel(8);
    let expected = frames * pool[0].len() as u64;
    let pool = pool.to_vec();
    let point = point.to_owned();
    let started = Instant::now();
    let feeder = tokio::spawn(async move {
        let mut offset = 0;
        for i in 0..frames as usize {
            let frame = pool[i % pool.len()].clone();
            let request = ProduceRequest {
                point: point.clone(),
                expected_offset: at.then_some(offset),
                frame,
                ..Default::default()
            };
            offset += request.frame.len() as u64;
            if tx.send(request).await.is_err() {
                return;
            }
        }
    });
    let response = client.raw().produce_stream(ReceiverStream::new(rx)).await?;
    let elapsed = started.elapsed().as_secs_f64();
    feeder.await?;
    let end = response.into_inner().records.first().map_or(0, |r| r.end);
    if end < expected {
        bail!("produce ended at {end}, expected at least {expected}");
    }
    Ok(elapsed)
}

/// Seconds to write `frames` frames from `pool` to a new file in `dir` with `pwrite` (then
/// deleted): the warm-up that recycles page-cache pages, and the cold-memory measurement.
fn disk_write(dir: &Path, pool: &[Bytes], frames: u64) -> anyhow::Result<f64> {
    write_scratch(dir, pool, frames, false)
}

/// The same as [`disk_write`], timed until `fdatasync` returns: the file system's own rate for
/// a durable file.
fn durable_write(dir: &Path, pool: &[Bytes], frames: u64) -> anyhow::Result<f64> {
    write_scratch(dir, pool, frames, true)
}

fn write_scratch(dir: &Path, pool: &[Bytes], frames: u64, synced: bool) -> anyhow::Result<f64> {
    use std::os::unix::fs::FileExt;
    std::fs::create_dir_all(dir)?;
    let path = dir.join("bench-scratch");
    let file = std::fs::File::create(&path)?;
    let started = Instant::now();
    let mut offset = 0;
    for i in 0..frames as usize {
        let frame = &pool[i % pool.len()];
        file.write_all_at(frame, offset)?;
        offset += frame.len() as u64;
    }
    if synced {
        file.sync_data()?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    drop(file);
    std::fs::remove_file(&path)?;
    Ok(elapsed)
}

/// Seconds to consume `[0, total)` of `point`.
async fn consume(client: &Client, point: &str, total: u64) -> anyhow::Result<f64> {
    let started = Instant::now();
    let request = ConsumeRequest {
        point: point.into(),
        offset: 0,
        limit: total,
        chunk_size: 0,
        follow: false,
    };
    let mut stream = client.raw().consume_stream(request).await?.into_inner();
    let mut received = 0u64;
    while let Some(response) = stream.message().await? {
        received += response.frame.len() as u64;
    }
    if received != total {
        bail!("consumed {received} bytes, expected {total}");
    }
    Ok(started.elapsed().as_secs_f64())
}

/// The sum of the samples of metric `name` (all its labels) on `server`'s metrics endpoint.
async fn metric(server: &Server, name: &str) -> anyhow::Result<f64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut socket = tokio::net::TcpStream::connect(&server.metrics).await?;
    socket
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: bench\r\n\r\n")
        .await?;
    let mut response = String::new();
    socket.read_to_string(&mut response).await?;
    Ok(response
        .lines()
        .filter(|line| {
            line.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|line| line.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum())
}

/// The `p`th percentile of `sorted` (ascending, not empty).
fn percentile(sorted: &[f64], p: usize) -> f64 {
    sorted[(sorted.len() * p / 100).min(sorted.len() - 1)]
}

/// A table row: the median throughput of each side, their spread, and baseline / measured.
fn ratio_row(name: &str, bytes: u64, base: &[f64], measured: &[f64]) {
    println!(
        "| {name} | {} | {} | {:.2}x |",
        spread(bytes, base),
        spread(bytes, measured),
        median(base) / median(measured)
    );
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[sorted.len() / 2]
}

fn mbps(bytes: u64, seconds: f64) -> f64 {
    bytes as f64 / seconds / 1e6
}

/// "median MB/s (slowest–fastest)" of the rounds.
fn spread(bytes: u64, seconds: &[f64]) -> String {
    let median = mbps(bytes, median(seconds));
    if seconds.len() == 1 {
        return format!("{median:.0} MB/s");
    }
    let slowest = mbps(bytes, seconds.iter().copied().fold(f64::MIN, f64::max));
    let fastest = mbps(bytes, seconds.iter().copied().fold(f64::MAX, f64::min));
    format!("{median:.0} MB/s ({slowest:.0}–{fastest:.0})")
}

/// A server child process (a goutube node or the baseline), through the shared harness.
struct Server {
    process: NodeProcess,
    rpc: String,
    /// The replication address (nodes only).
    replication: String,
    /// The HTTP gateway (nodes only).
    http: String,
    /// The gossip address (nodes only).
    gossip: String,
    /// The metrics endpoint (nodes only).
    metrics: String,
}

impl Server {
    /// A node with its data in `dir`, configured by the TOML `settings` (sections of its own).
    fn node(dir: &Path, settings: &str) -> anyhow::Result<Server> {
        Self::node_at(dir, "bench", "127.0.0.1", None, settings)
    }

    /// Node `name` listening on `ip` (every port chosen by the kernel), run inside network
    /// namespace `namespace` if one is given.
    fn node_at(
        dir: &Path,
        name: &str,
        ip: &str,
        namespace: Option<&str>,
        settings: &str,
    ) -> anyhow::Result<Server> {
        let config = dir.join(format!("{name}.toml"));
        std::fs::write(
            &config,
            format!(
                "node_name = {name:?}\ndata_dir = {:?}\nbind_addr = \"{ip}:0\"\nrpc_port = 0\nreplication_port = 0\nmetrics_port = 0\nhttp_port = 0\n{settings}\n[log]\nlevel = \"warn\"\n",
                dir.join(format!("{name}-data"))
            ),
        )?;
        let mut command = match namespace {
            Some(namespace) => {
                let mut command = Command::new("ip");
                command
                    .args(["netns", "exec", namespace])
                    .arg(std::env::current_exe()?);
                command
            }
            None => Command::new(std::env::current_exe()?),
        };
        command.args(["run", "--config"]).arg(&config);
        Self::spawn(command)
    }

    fn baseline() -> anyhow::Result<Server> {
        let mut command = Command::new(std::env::current_exe()?);
        command.args(["bench", "baseline-server"]);
        Self::spawn(command)
    }

    fn spawn(command: Command) -> anyhow::Result<Server> {
        let process = NodeProcess::start(command, Duration::from_secs(120))?;
        let rpc = process
            .field("rpc")
            .context("no rpc= on the listening line")?
            .to_owned();
        let replication = process.field("replication").unwrap_or_default().to_owned();
        let http = process.field("http").unwrap_or_default().to_owned();
        let gossip = process.field("gossip").unwrap_or_default().to_owned();
        let metrics = process.field("metrics").unwrap_or_default().to_owned();
        Ok(Server {
            process,
            rpc,
            replication,
            http,
            gossip,
            metrics,
        })
    }

    fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// SIGTERM and wait for a clean exit.
    fn stop(self) -> anyhow::Result<()> {
        let status = self.process.terminate(Duration::from_secs(120))?;
        if !status.success() {
            bail!("server exited with {status}");
        }
        Ok(())
    }
}

fn proc_path(pid: u32, name: &str) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/{name}"))
}

/// Resident set size of `pid`, in bytes.
fn rss(pid: u32) -> u64 {
    std::fs::read_to_string(proc_path(pid, "status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

fn descriptors(pid: u32) -> usize {
    std::fs::read_dir(proc_path(pid, "fd")).map_or(0, |d| d.count())
}

/// Samples the RSS of a process every 20 ms until stopped; returns the peak.
struct RssSampler {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    thread: std::thread::JoinHandle<()>,
}

impl RssSampler {
    fn start(pid: u32) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(0));
        let thread = std::thread::spawn({
            let (stop, peak) = (stop.clone(), peak.clone());
            move || {
                while !stop.load(Ordering::Relaxed) {
                    peak.fetch_max(rss(pid), Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        });
        Self { stop, peak, thread }
    }

    fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.thread.join();
        self.peak.load(Ordering::Relaxed)
    }
}

/// The baseline: the same service, discarding produced frames and serving reads from memory.
async fn baseline_server() -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    println!("goutube listening rpc={}", listener.local_addr()?);
    let pool = frame_pool(256 * 1024);
    let service = StreamingServer::new(Baseline { pool })
        .max_decoding_message_size(64 * 1024 * 1024)
        .max_encoding_message_size(64 * 1024 * 1024);
    // The same transport settings as a node's API server.
    goutube::api::server_builder()
        .add_service(service)
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
        .await?;
    Ok(())
}

struct Baseline {
    pool: Vec<Bytes>,
}

type Frames = Pin<Box<dyn Stream<Item = Result<ConsumeResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Streaming for Baseline {
    type ConsumeStreamStream = Frames;

    async fn produce_stream(
        &self,
        request: Request<tonic::Streaming<ProduceRequest>>,
    ) -> Result<Response<ProduceResponse>, Status> {
        let mut stream = request.into_inner();
        let (mut point, mut end, mut start) = (String::new(), 0u64, 0u64);
        while let Some(message) = stream.message().await? {
            start = end;
            end += message.frame.len() as u64;
            point = message.point;
        }
        Ok(Response::new(ProduceResponse {
            records: vec![Record {
                point,
                offset: start,
                end,
                crc32c: 0,
            }],
        }))
    }

    async fn consume_stream(
        &self,
        request: Request<ConsumeRequest>,
    ) -> Result<Response<Frames>, Status> {
        let limit = request.into_inner().limit;
        let pool = self.pool.clone();
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            let mut position = 0u64;
            let mut i = 0;
            while position < limit {
                let frame = &pool[i % pool.len()];
                let len = (limit - position).min(frame.len() as u64) as usize;
                let response = ConsumeResponse {
                    frame: frame.slice(..len),
                    offset: position,
                };
                if tx.send(Ok(response)).await.is_err() {
                    return;
                }
                position += len as u64;
                i += 1;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn get_metadata(
        &self,
        _: Request<MetadataRequest>,
    ) -> Result<Response<MetadataResponse>, Status> {
        Err(Status::unimplemented("baseline"))
    }

    async fn list_points(
        &self,
        _: Request<ListPointsRequest>,
    ) -> Result<Response<ListPointsResponse>, Status> {
        Err(Status::unimplemented("baseline"))
    }

    async fn locate_point(
        &self,
        _: Request<goutube::proto::LocatePointRequest>,
    ) -> Result<Response<goutube::proto::LocatePointResponse>, Status> {
        Err(Status::unimplemented("baseline"))
    }

    async fn list_members(
        &self,
        _: Request<goutube::proto::ListMembersRequest>,
    ) -> Result<Response<goutube::proto::ListMembersResponse>, Status> {
        Err(Status::unimplemented("baseline"))
    }

    async fn drain_member(
        &self,
        _: Request<goutube::proto::DrainMemberRequest>,
    ) -> Result<Response<goutube::proto::DrainMemberResponse>, Status> {
        Err(Status::unimplemented("baseline"))
    }

    async fn cleanup_member(
        &self,
        _: Request<goutube::proto::CleanupMemberRequest>,
    ) -> Result<Response<goutube::proto::CleanupMemberResponse>, Status> {
        Err(Status::unimplemented("baseline"))
    }

    async fn forget_member(
        &self,
        _: Request<goutube::proto::ForgetMemberRequest>,
    ) -> Result<Response<goutube::proto::ForgetMemberResponse>, Status> {
        Err(Status::unimplemented("baseline"))
    }

    async fn sign_url(
        &self,
        _: Request<goutube::proto::SignUrlRequest>,
    ) -> Result<Response<goutube::proto::SignUrlResponse>, Status> {
        Err(Status::unimplemented("baseline"))
    }

    async fn delete_point(
        &self,
        _: Request<DeletePointRequest>,
    ) -> Result<Response<DeletePointResponse>, Status> {
        Ok(Response::new(DeletePointResponse { size: 0 }))
    }
}
