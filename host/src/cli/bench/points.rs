//! `goutube bench points`: many small points on one node (issue 25): create (one or several
//! produce streams) against plain files in a fan-out tree, against the node's own layout made
//! by a plain program (the machine's ceiling for it) and against a server that discards what it
//! is sent (the transport's ceiling), with the CPU each side spends per point and the node's
//! shared trips to the blocking pool per point; restart, `ls`, `stat`, a follower's catch-up
//! against the create, `rm` against removing the plain files, and the disk given back.

use std::time::{Duration, Instant};

use anyhow::bail;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use rand::RngCore;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use goutube::client::Client;
use goutube::proto::{ListPointsRequest, ProduceRequest};

use super::{
    Server, connect, cpu_seconds, descriptors, metric, percentile, rss, sample, scrape, storage,
};

/// How long `bench points` waits for a compaction to give back the space of removed packed
/// points.
const COMPACTION_WAIT: Duration = Duration::from_secs(120);

/// Most points `bench points` creates through one produce stream.
const STREAM_POINTS: usize = 100_000;

/// What `bench points` creates and how.
pub(super) struct Shape {
    pub(super) count: usize,
    pub(super) size: usize,
    pub(super) max_open: usize,
    pub(super) stats: usize,
    pub(super) streams: usize,
    pub(super) fsync: String,
    pub(super) packed_max: u64,
}

pub(super) async fn run(shape: Shape) -> anyhow::Result<()> {
    let Shape {
        count,
        size,
        max_open,
        stats,
        streams,
        fsync,
        packed_max,
    } = shape;
    let work = tempfile::tempdir()?;
    println!(
        "{count} points of {size} bytes, storage.max_open_points = {max_open}, \
         storage.fsync = {fsync:?}, storage.packed_max = {packed_max}, {streams} produce \
         stream(s) at once"
    );
    let mut payload = vec![0u8; size];
    rand::rng().fill_bytes(&mut payload);
    let payload = Bytes::from(payload);

    // The baseline: the same bytes as plain files in a fan-out tree (open, write, close). They
    // stay until their removal is measured beside the node's `rm`: removing them here would
    // leave the filesystem's inode allocator stepping over freshly freed inodes while the node
    // creates its points (ext4's `recently_deleted`), slowing the node for the baseline's sake.
    let started = Instant::now();
    let base = work.path().join("baseline");
    let written = payload.clone();
    let baseline_dir = base.clone();
    tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        for i in 0..count {
            let dir = baseline_dir.join(format!("{:02x}/{:02x}", i % 256, (i / 256) % 256));
            if i < 65_536 {
                std::fs::create_dir_all(&dir)?;
            }
            std::fs::write(dir.join(format!("{i}")), &written)?;
        }
        Ok(())
    })
    .await??;
    let baseline = started.elapsed();

    // The machine's ceiling for the node's layout: what a plain program takes to make the
    // inodes the node makes for each point (a directory in one directory, the bytes in one
    // file, a journal header in another; no sync), with nothing else of the node's work. For
    // at most `LAYOUT_POINTS`: each takes three blocks, and a million of them would not fit
    // beside the node's and its follower's copies on the benchmark's file system.
    let layout_count = count.min(LAYOUT_POINTS);
    let started = Instant::now();
    let layout_dir = work.path().join("layout");
    let written = payload.clone();
    let layout = layout_dir.clone();
    tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        std::fs::create_dir(&layout)?;
        let header = [0u8; 16];
        for i in 0..layout_count {
            let dir = layout.join(format!("{i}"));
            std::fs::create_dir(&dir)?;
            std::fs::write(dir.join("point.data"), &written)?;
            std::fs::write(dir.join("point.journal"), header)?;
        }
        Ok(())
    })
    .await??;
    let layout_ceiling = started.elapsed();

    println!("| step | time | rate | node RSS | node descriptors |");
    println!("|---|---|---|---|---|");
    let report = |step: &str, elapsed: Duration, rate: &str, server: &Server| {
        println!(
            "| {step} | {:.3} s | {rate} | {:.1} MiB | {} |",
            elapsed.as_secs_f64(),
            rss(server.pid()) as f64 / 1048576.0,
            descriptors(server.pid())
        );
    };
    let per_second =
        |n: usize, elapsed: Duration| format!("{:.0}/s", n as f64 / elapsed.as_secs_f64());
    println!(
        "| baseline: plain files (open, write, close) | {:.3} s | {} | | |",
        baseline.as_secs_f64(),
        per_second(count, baseline)
    );
    println!(
        "| the node's layout by a plain program, {layout_count} points (mkdir, two files written, closed) | {:.3} s | {} ({:.2}x the baseline's rate) | | |",
        layout_ceiling.as_secs_f64(),
        per_second(layout_count, layout_ceiling),
        (layout_count as f64 / layout_ceiling.as_secs_f64())
            / (count as f64 / baseline.as_secs_f64())
    );
    // With syncs, the least a program does for each new file to survive a power loss, from as
    // many threads as the node gets streams: against it, what the node's syncs cost.
    let synced_baseline = match fsync.as_str() {
        "never" => None,
        _ => {
            let started = Instant::now();
            let dir = work.path().join("baseline-synced");
            let written = payload.clone();
            tokio::task::spawn_blocking(move || write_synced(&dir, count, streams, &written))
                .await??;
            let elapsed = started.elapsed();
            println!(
                "| baseline: plain files, each synced with its directory (open, write, fsync, \
                 close, fsync of the directory; {streams} thread(s)) | {:.3} s | {} | | |",
                elapsed.as_secs_f64(),
                per_second(count, elapsed)
            );
            Some(elapsed)
        }
    };

    // The transport's ceiling: the same produce streams against a server that discards what
    // it receives (the client, gRPC and the loopback alone, on the same cores as the node).
    let ceiling = {
        let server = Server::baseline()?;
        let client = connect(&server.rpc).await?;
        let started = Instant::now();
        let cpu = Cpu::start(server.pid());
        create_all(&client, count, streams, &payload).await?;
        let elapsed = started.elapsed();
        println!(
            "| ceiling: the same create against a server that discards it ({streams} stream(s)) | {:.3} s | {} | {} | |",
            elapsed.as_secs_f64(),
            per_second(count, elapsed),
            cpu.per_point(count),
        );
        // Killed as it is dropped: it keeps nothing to stop cleanly.
        drop(client);
        drop(server);
        elapsed
    };

    // A leader, so that a follower can catch up below; without followers it acknowledges alone.
    let node_storage = format!(
        "{}max_open_points = {max_open}\npacked_max = {packed_max}\n",
        storage(&fsync)
    );
    let config = format!("role = \"leader\"\n{node_storage}");
    let started = Instant::now();
    let node = Server::node(work.path(), &config)?;
    let data = work.path().join("bench-data");
    report("start (empty)", started.elapsed(), "", &node);
    let client = connect(&node.rpc).await?;
    // Read before the clock and the CPU count start: the scrape is not the create's work.
    let trips = Trips::start(&node).await?;
    let started = Instant::now();
    let cpu = Cpu::start(node.pid());
    create_all(&client, count, streams, &payload).await?;
    let created = started.elapsed();
    let create_cpu = cpu.per_point(count);
    let create_trips = trips.per_point(&node, count).await?;
    report(
        &format!("create ({streams} stream(s) at once)"),
        created,
        &per_second(count, created),
        &node,
    );
    println!("| create: CPU | | | {create_cpu} | |");
    println!("| create: shared trips to the blocking pool | | | {create_trips} | |");
    println!(
        "| create / baseline | {:.2}x | | | |",
        baseline.as_secs_f64() / created.as_secs_f64()
    );
    println!(
        "| create / the node's layout by a plain program (rates) | {:.2}x | | | |",
        (count as f64 / created.as_secs_f64())
            / (layout_count as f64 / layout_ceiling.as_secs_f64())
    );
    println!(
        "| create / the ceiling (rates) | {:.2}x | | | |",
        ceiling.as_secs_f64() / created.as_secs_f64()
    );
    if let Some(synced) = synced_baseline {
        println!(
            "| create / synced baseline | {:.2}x | | | |",
            synced.as_secs_f64() / created.as_secs_f64()
        );
    }
    drop(client);
    node.stop()?;

    let started = Instant::now();
    let node = Server::node(work.path(), &config)?;
    let client = connect(&node.rpc).await?;
    let listed = client
        .raw()
        .list_points(ListPointsRequest {
            max_results: 1,
            ..Default::default()
        })
        .await?;
    drop(listed);
    report("restart (to first answer)", started.elapsed(), "", &node);
    let started = Instant::now();
    let listed = client.list("").await?.points;
    if listed.len() != count {
        bail!("listed {} points, created {count}", listed.len());
    }
    let elapsed = started.elapsed();
    report("list all", elapsed, &per_second(count, elapsed), &node);

    let sample: Vec<&String> = (0..stats.min(count))
        .map(|_| &listed[rand::random_range(0..listed.len())])
        .collect();
    for pass in ["stat random points", "stat the same points again"] {
        let started = Instant::now();
        let mut latencies = Vec::with_capacity(sample.len());
        for point in &sample {
            let call = Instant::now();
            let meta = client.stat(point).await?;
            latencies.push(call.elapsed().as_secs_f64() * 1e6);
            if meta.size != size as u64 {
                bail!("{point} has {} bytes, expected {size}", meta.size);
            }
        }
        latencies.sort_by(f64::total_cmp);
        let rate = format!(
            "p50 {:.0} µs, p99 {:.0} µs",
            percentile(&latencies, 50),
            percentile(&latencies, 99)
        );
        report(
            &format!("{pass} ({})", sample.len()),
            started.elapsed(),
            &rate,
            &node,
        );
    }

    // A follower's catch-up of every point, against the create above.
    let follower_config = format!(
        "role = \"follower\"\nleader_addresses = [{:?}]\n{node_storage}",
        node.replication
    );
    let started = Instant::now();
    let follower = Server::node_at(work.path(), "follower", "127.0.0.1", None, &follower_config)?;
    replicated(&follower, count * size, "catch up").await?;
    let caught_up = started.elapsed();
    report(
        "a follower's catch-up of every point (from its start)",
        caught_up,
        &per_second(count, caught_up),
        &follower,
    );
    println!(
        "| catch-up / create | {:.2}x | | | |",
        created.as_secs_f64() / caught_up.as_secs_f64()
    );
    follower.stop()?;
    // The follower again: its session starts from what it offers and what the leader holds (a
    // walk over every point on each side), timed to its copy of the first point created after.
    let started = Instant::now();
    let follower = Server::node_at(work.path(), "follower", "127.0.0.1", None, &follower_config)?;
    create_points(&client, count..count + 1, &payload).await?;
    replicated(&follower, size, "resume").await?;
    report(
        "the follower restarted (to its copy of a new point)",
        started.elapsed(),
        "",
        &follower,
    );
    follower.stop()?;

    // rm: the first `removals` points, a few calls in flight; the space they took comes back.
    let removals = count.min(RM_POINTS);
    let used = disk_used(&data)?;
    let started = Instant::now();
    let deletes = futures::stream::iter(listed.iter().take(removals))
        .map(|point| client.delete(point))
        .buffer_unordered(RM_IN_FLIGHT);
    let sizes: Vec<u64> = deletes.try_collect().await?;
    if sizes.iter().any(|deleted| *deleted != size as u64) {
        bail!("a point removed had not {size} bytes");
    }
    let removed = started.elapsed();
    report(
        &format!("rm {removals} ({RM_IN_FLIGHT} calls in flight)"),
        removed,
        &per_second(removals, removed),
        &node,
    );
    // And the removal of as many of the baseline's files.
    let started = Instant::now();
    let baseline_dir = base.clone();
    tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        for i in 0..removals {
            let dir = baseline_dir.join(format!("{:02x}/{:02x}", i % 256, (i / 256) % 256));
            std::fs::remove_file(dir.join(format!("{i}")))?;
        }
        Ok(())
    })
    .await??;
    let baseline_rm = started.elapsed();
    println!(
        "| baseline: remove {removals} plain files | {:.3} s | {} | | |",
        baseline_rm.as_secs_f64(),
        per_second(removals, baseline_rm)
    );
    println!(
        "| rm / baseline | {:.2}x | | | |",
        baseline_rm.as_secs_f64() / removed.as_secs_f64()
    );
    let left = client.list("").await?.points.len();
    // And the point created for the follower's restart.
    if left != count + 1 - removals {
        bail!("{left} points left after removing {removals} of {count}");
    }
    let after = disk_used(&data)?;
    println!(
        "| disk used before / after rm | {:.1} / {:.1} MiB | {:.1} MiB given back | | |",
        used as f64 / 1048576.0,
        after as f64 / 1048576.0,
        used.saturating_sub(after) as f64 / 1048576.0,
    );
    if packed_max > 0 {
        // Packed points give their space back when their segment is compacted, in the
        // background: how long until most of it is back.
        let started = Instant::now();
        let mut now = after;
        while used.saturating_sub(now) < used / 2 && started.elapsed() < COMPACTION_WAIT {
            tokio::time::sleep(Duration::from_millis(200)).await;
            now = disk_used(&data)?;
        }
        println!(
            "| disk used after compaction | {:.1} MiB after {:.1} s | {:.1} MiB given back | | |",
            now as f64 / 1048576.0,
            started.elapsed().as_secs_f64(),
            used.saturating_sub(now) as f64 / 1048576.0,
        );
    }
    node.stop()?;
    std::fs::remove_dir_all(&base)?;
    Ok(())
}

/// The CPU time a server and this client (the bench itself) use from [`Cpu::start`] on.
struct Cpu {
    server: u32,
    before: (f64, f64),
}

impl Cpu {
    fn start(server: u32) -> Self {
        Self {
            server,
            before: (cpu_seconds(server), cpu_seconds(std::process::id())),
        }
    }

    /// Each side's CPU time per point since the start, for `count` points.
    fn per_point(&self, count: usize) -> String {
        let server = cpu_seconds(self.server) - self.before.0;
        let client = cpu_seconds(std::process::id()) - self.before.1;
        format!(
            "CPU per point: server {:.0} µs, client {:.0} µs",
            server * 1e6 / count as f64,
            client * 1e6 / count as f64
        )
    }
}

/// The node's shared trips to the blocking pool (`goutube_blocking_trips_total`, per queue of
/// `askers`) from [`Trips::start`] on: each is a thread hand-off there and back, for however
/// many calls it runs. File work that syncs (`fsync` other than `"never"`) takes trips of its
/// own, not counted here.
struct Trips {
    before: [f64; 2],
}

impl Trips {
    const QUEUES: [&str; 2] = ["plugins", "storage"];

    async fn start(node: &Server) -> anyhow::Result<Self> {
        Ok(Self {
            before: Self::now(node).await?,
        })
    }

    /// Each queue's trips so far, from one scrape.
    async fn now(node: &Server) -> anyhow::Result<[f64; 2]> {
        let exported = scrape(node).await?;
        let mut trips = [0.0; 2];
        for (trips, queue) in trips.iter_mut().zip(Self::QUEUES) {
            let name = format!("{}{{queue=\"{queue}\"}}", goutube::metrics::BLOCKING_TRIPS);
            *trips = sample(&exported, &name)?;
        }
        Ok(trips)
    }

    /// Each queue's trips per point since the start, for `count` points.
    async fn per_point(&self, node: &Server, count: usize) -> anyhow::Result<String> {
        let now = Self::now(node).await?;
        let [plugins, storage] =
            std::array::from_fn(|queue| (now[queue] - self.before[queue]) / count as f64);
        Ok(format!(
            "per point: plugins {plugins:.2}, storage {storage:.2}"
        ))
    }
}

/// Creates points `0..count` through `streams` produce streams at once, each with its share.
async fn create_all(
    client: &Client,
    count: usize,
    streams: usize,
    payload: &Bytes,
) -> anyhow::Result<()> {
    let share = count.div_ceil(streams);
    let creates = (0..streams).map(|stream| {
        let first = (stream * share).min(count);
        create_points(client, first..count.min(first + share), payload)
    });
    futures::future::try_join_all(creates).await?;
    Ok(())
}

/// Creates the points numbered `range`, of `payload` each, through one produce stream per
/// [`STREAM_POINTS`]: a stream's answer lists a record per point, and more would not fit in one
/// message.
async fn create_points(
    client: &Client,
    range: std::ops::Range<usize>,
    payload: &Bytes,
) -> anyhow::Result<()> {
    for first in range.clone().step_by(STREAM_POINTS) {
        let (tx, rx) = mpsc::channel(64);
        let payload = payload.clone();
        let last = range.end.min(first + STREAM_POINTS);
        let feeder = tokio::spawn(async move {
            for i in first..last {
                let request = ProduceRequest {
                    point: format!("p/{i:07}"),
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
    }
    Ok(())
}

/// The longest a follower's catch-up may take before the bench gives up.
const CATCH_UP_LIMIT: Duration = Duration::from_secs(3600);

/// Most points `bench points` removes (the issue's `rm` of 100,000), and how many removals it
/// keeps in flight.
const RM_POINTS: usize = 100_000;
const RM_IN_FLIGHT: usize = 16;

/// How many points the node's layout is made for by a plain program, at most.
const LAYOUT_POINTS: usize = 100_000;

/// The bytes the files under `dir` take on disk (their allocated blocks).
fn disk_used(dir: &std::path::Path) -> std::io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    let mut used = 0;
    let mut pending = vec![dir.to_owned()];
    while let Some(current) = pending.pop() {
        for entry in std::fs::read_dir(&current)? {
            let entry = entry?;
            let metadata = entry.metadata()?;
            used += metadata.blocks() * 512;
            if metadata.is_dir() {
                pending.push(entry.path());
            }
        }
    }
    Ok(used)
}

/// Writes `count` files of `payload` under `dir` (a fan-out tree) from `threads` threads, each
/// file synced, and its directory after it.
fn write_synced(
    dir: &std::path::Path,
    count: usize,
    threads: usize,
    payload: &[u8],
) -> std::io::Result<()> {
    let share = count.div_ceil(threads);
    std::thread::scope(|scope| {
        let writers: Vec<_> = (0..threads)
            .map(|thread| {
                scope.spawn(move || -> std::io::Result<()> {
                    for i in (thread * share).min(count)..count.min((thread + 1) * share) {
                        let parent = dir.join(format!("{:02x}/{:02x}", i % 256, (i / 256) % 256));
                        std::fs::create_dir_all(&parent)?;
                        let mut file = std::fs::File::create(parent.join(format!("{i}")))?;
                        std::io::Write::write_all(&mut file, payload)?;
                        file.sync_all()?;
                        std::fs::File::open(&parent)?.sync_all()?;
                    }
                    Ok(())
                })
            })
            .collect();
        writers
            .into_iter()
            .try_for_each(|writer| writer.join().expect("a baseline writer panicked"))
    })
}

/// Waits until `follower` has replicated `bytes` since it started, within [`CATCH_UP_LIMIT`]
/// (`what` it failed to do otherwise).
async fn replicated(follower: &Server, bytes: usize, what: &str) -> anyhow::Result<()> {
    let started = Instant::now();
    while metric(follower, goutube::metrics::REPLICATED_BYTES).await? < bytes as f64 {
        if started.elapsed() > CATCH_UP_LIMIT {
            bail!("the follower did not {what} within {CATCH_UP_LIMIT:?}");
        }
        // Asked again after a twentieth of the time so far (5 % at most on the figure): each
        // answer renders every metric of the follower, about 1.6 ms of its CPU, so asking
        // every 20 ms took 8 % of it during a catch-up.
        let pause =
            (started.elapsed() / 20).clamp(Duration::from_millis(5), Duration::from_millis(250));
        tokio::time::sleep(pause).await;
    }
    Ok(())
}
