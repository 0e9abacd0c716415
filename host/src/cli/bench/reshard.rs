//! `goutube bench reshard`: handing points to their new owner against replication catch-up of
//! the same bytes, measured in the same run (median of `rounds`).
//!
//! - Move: primaries `a` and `b` in one ring; `a` holds `points` points of `mib` MiB in all
//!   (ids it owns, found through `LocatePoint`), `b` a few of its own. `a` is drained; the time
//!   is from the drain call to `a` counting every point handed over. Baseline: a follower
//!   catching up a leader that holds the same points (from its spawn to its count of applied
//!   bytes reaching theirs).
//! - The write pause at the fence: writers append to 16 of the moving points all along (4 KiB
//!   frames with `expected_offset`, following the redirect); a point's pause is the time of the
//!   append that met its handover — held at the fence, then redirected and taken by the new
//!   owner. (The slowest append of the whole move is reported too: under a 2 GiB copy, the
//!   page cache's writeback stalls writers now and then, fence or not.)
//! - Unrelated reads: a reader consumes `b`'s own points in a loop; its throughput during the
//!   move against the same reader before it.
//! - The file system's ceiling for plain syncs: as many threads as moves at once, each
//!   rewriting 4 KiB in place and syncing it, in the same directory, after each catch-up. A move
//!   makes nine syncs; this says whether the disk's rate for them is what a drain runs into.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use goutube::client::Client;
use goutube::config::ReshardSection;
use goutube::proto::OWNER_ADDR_METADATA;
use goutube::proto::ProduceRequest;

use super::{
    Server, Workload, connect, consume, median, metric, owner, percentile, produce, spread,
    synced_rewrites,
};

/// The frames a moving point is written in: at most this…
const MAX_FRAME: u64 = 256 * 1024;
/// …and at least this, when points are small.
const MIN_FRAME: u64 = 1024;

/// Points that writers keep appending to during the move.
const WRITTEN: usize = 16;
/// Points of `b` the unrelated reader reads.
const UNRELATED: usize = 4;
/// Bytes of each unrelated point.
const UNRELATED_BYTES: u64 = 16 * 1024 * 1024;
/// How long the file system's syncs are counted.
const SYNC_CEILING_FOR: Duration = Duration::from_secs(2);

pub(super) async fn run(
    mib: u64,
    points: usize,
    rounds: usize,
    moves: Option<usize>,
) -> anyhow::Result<()> {
    let work = tempfile::tempdir()?;
    // Frames of 256 KiB, or one frame per point for points smaller than that (down to 1 KiB):
    // each point a whole number of frames, at least one.
    let per_point = mib * 1024 * 1024 / points as u64;
    let frame = per_point.clamp(MIN_FRAME, MAX_FRAME) as usize;
    let frames = (per_point / frame as u64).max(1);
    let workload = Workload {
        total: frames * frame as u64,
        frames,
        pool: super::frame_pool(frame),
    };
    let total = workload.total * points as u64;
    println!(
        "resharding on loopback, fsync = \"never\", {points} points of {} KiB ({} MiB), \
         reshard.max_concurrent_moves = {}, {rounds} round(s), median reported",
        workload.total >> 10,
        total >> 20,
        moves.map_or("the default".to_owned(), |moves| moves.to_string())
    );
    let (mut catch_up, mut moved_alone) = (Vec::new(), Vec::new());
    let (mut moved, mut moved_reading) = (Vec::new(), Vec::new());
    let (mut pauses, mut slowest) = (Vec::new(), Vec::new());
    let (mut reads_idle, mut reads_moving) = (Vec::new(), Vec::new());
    let (mut listings, mut syncs) = (Vec::new(), Vec::new());
    // The nodes' own default when `--moves` is not given.
    let at_once = moves.unwrap_or(ReshardSection::default().max_concurrent_moves);
    for round in 0..rounds {
        let dir = work.path().join(format!("catch-up-{round}"));
        catch_up.push(catch_up_once(&dir, points, &workload).await?);
        std::fs::remove_dir_all(&dir)?;
        let dir = work.path().join(format!("syncs-{round}"));
        syncs.push(
            tokio::task::spawn_blocking(move || synced_rewrites(&dir, at_once, SYNC_CEILING_FOR))
                .await??,
        );
        for load in [Load::Alone, Load::Writers, Load::Reader] {
            let dir = work.path().join(format!("move-{round}-{load:?}"));
            let run = move_once(&dir, points, &workload, load, moves).await?;
            std::fs::remove_dir_all(&dir)?;
            listings.push(run.listings);
            match load {
                Load::Alone => moved_alone.push(run.seconds),
                Load::Writers => {
                    moved.push(run.seconds);
                    pauses.extend(run.pauses);
                    slowest.extend(run.slowest);
                }
                Load::Reader => {
                    moved_reading.push(run.seconds);
                    reads_idle.push(run.read_idle);
                    reads_moving.push(run.read_moving);
                }
            }
        }
    }
    pauses.sort_by(f64::total_cmp);
    slowest.sort_by(f64::total_cmp);
    println!(
        "\n| {} MiB in {points} points | throughput (median, min–max) | points per second (median) |",
        total >> 20
    );
    println!("|---|---|---|");
    let per_second = |seconds: &[f64]| points as f64 / median(seconds);
    println!(
        "| replication catch-up (baseline) | {} | {:.0} |",
        spread(total, &catch_up),
        per_second(&catch_up)
    );
    println!(
        "| handover to the new owner (drain), nothing else running | {} | {:.0} |",
        spread(total, &moved_alone),
        per_second(&moved_alone)
    );
    println!(
        "| handover to the new owner (drain), {WRITTEN} points written meanwhile | {} | {:.0} |",
        spread(total, &moved),
        per_second(&moved)
    );
    println!(
        "| the same, while a reader consumes unrelated points as fast as it can | {} | {:.0} |",
        spread(total, &moved_reading),
        per_second(&moved_reading)
    );
    println!("\n| measure | value | target |");
    println!("|---|---|---|");
    println!(
        "| move / catch-up, nothing else running | {:.2}x | ≥ 0.5x |",
        median(&catch_up) / median(&moved_alone)
    );
    println!(
        "| move / catch-up, {WRITTEN} points written meanwhile | {:.2}x | |",
        median(&catch_up) / median(&moved)
    );
    println!(
        "| write pause per point at the fence, p50 / p99 ({} points) | {:.1} ms / {:.1} ms | p99 < 100 ms |",
        pauses.len(),
        percentile(&pauses, 50) * 1e3,
        percentile(&pauses, 99) * 1e3
    );
    println!(
        "| slowest append of a written point during the whole move, p50 / p99 | {:.1} ms / {:.1} ms | |",
        percentile(&slowest, 50) * 1e3,
        percentile(&slowest, 99) * 1e3
    );
    println!(
        "| consume of unrelated points during / before the move | {:.2}x ({:.0} / {:.0} MB/s) | |",
        median(&reads_moving) / median(&reads_idle),
        median(&reads_moving),
        median(&reads_idle)
    );
    println!(
        "| listings of every point held, per drain (median) | {:.0} | a few |",
        median(&listings)
    );
    println!(
        "| the file system's syncs, {at_once} at once (4 KiB rewritten in place, `fdatasync`) | {:.0}/s | |",
        median(&syncs)
    );
    Ok(())
}

/// What runs on the cluster while it moves points: nothing (as during the catch-up it is
/// compared with), writers on moving points (their pauses are measured), or a reader of
/// unrelated points (its throughput is). Apart, so the reader's load does not show up as fence
/// pauses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Load {
    Alone,
    Writers,
    Reader,
}

/// The settings of a benchmark primary.
fn settings(extra: &str) -> String {
    format!("{extra}\n{}", super::storage("never"))
}

/// Seconds from a follower's spawn to its holding every byte of the leader's `points` points.
async fn catch_up_once(dir: &Path, points: usize, workload: &Workload) -> anyhow::Result<f64> {
    std::fs::create_dir_all(dir)?;
    let leader = Server::node_at(
        dir,
        "leader",
        "127.0.0.1",
        None,
        &settings("role = \"leader\""),
    )?;
    let to_leader = connect(&leader.rpc).await?;
    for i in 0..points {
        produce(
            &to_leader,
            &format!("p/{i}"),
            &workload.pool,
            workload.frames,
        )
        .await?;
    }
    let total = (workload.total * points as u64) as f64;
    let follower_settings = settings(&format!(
        "role = \"follower\"\nleader_addresses = [{:?}]",
        leader.replication
    ));
    let started = Instant::now();
    let follower = Server::node_at(dir, "follower", "127.0.0.1", None, &follower_settings)?;
    let applied = || metric(&follower, goutube::metrics::REPLICATED_BYTES);
    wait_until(
        "the follower to catch up",
        Duration::from_secs(600),
        || async { Ok(applied().await? >= total) },
    )
    .await?;
    let elapsed = started.elapsed().as_secs_f64();
    follower.stop()?;
    leader.stop()?;
    Ok(elapsed)
}

/// One move: its duration, the pause of each written point, the unrelated reader's MB/s before
/// and during it.
struct Moved {
    seconds: f64,
    pauses: Vec<f64>,
    slowest: Vec<f64>,
    read_idle: f64,
    read_moving: f64,
    /// How many times the drained node listed every point it held.
    listings: f64,
}

async fn move_once(
    dir: &Path,
    points: usize,
    workload: &Workload,
    load: Load,
    moves: Option<usize>,
) -> anyhow::Result<Moved> {
    let (a, b, to_a, to_b) = start_pair(dir, moves).await?;
    let (on_a, on_b) = split_by_owner(&to_a, points).await?;
    for point in &on_a {
        produce(&to_a, point, &workload.pool, workload.frames).await?;
    }
    let unrelated = Workload::new(UNRELATED_BYTES >> 20, 256 * 1024);
    for point in &on_b {
        produce(&to_b, point, &unrelated.pool, unrelated.frames).await?;
    }

    // The unrelated reader, or writers on some of the moving points.
    let stop = Arc::new(AtomicBool::new(false));
    let read = Arc::new(AtomicU64::new(0));
    let reader = (load == Load::Reader).then(|| {
        let (stop, read, to_b, on_b) = (stop.clone(), read.clone(), to_b.clone(), on_b.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                for point in &on_b {
                    consume(&to_b, point, unrelated.total).await?;
                    read.fetch_add(unrelated.total, Ordering::Relaxed);
                }
            }
            anyhow::Ok(())
        })
    });
    let mut writers = Vec::new();
    if load == Load::Writers {
        for point in on_a.iter().take(WRITTEN) {
            let (stop, point, a_rpc) = (stop.clone(), point.clone(), a.rpc.clone());
            let end = workload.total;
            writers.push(tokio::spawn(write_all_along(stop, point, a_rpc, end)));
        }
    }
    let read_idle = if reader.is_some() {
        let before = read.load(Ordering::Relaxed);
        tokio::time::sleep(Duration::from_secs(2)).await;
        (read.load(Ordering::Relaxed) - before) as f64 / 2.0 / 1e6
    } else {
        0.0
    };

    // The drain, timed until a counts every point handed over.
    let reads_before = read.load(Ordering::Relaxed);
    let listings = metric(&a, goutube::metrics::RESHARD_LISTINGS).await?;
    let started = Instant::now();
    to_a.drain(
        "a",
        &goutube::client::ClientOptions {
            addr: a.rpc.clone(),
            tls: None,
        },
    )
    .await?;
    // As long as it takes a drain of many points, but never stuck.
    wait_counting(
        "a to hand every point over",
        points as f64,
        Duration::from_secs(60),
        || metric(&a, goutube::metrics::RESHARD_MOVED_POINTS),
    )
    .await?;
    let seconds = started.elapsed().as_secs_f64();
    let read_moving = (read.load(Ordering::Relaxed) - reads_before) as f64 / seconds / 1e6;
    let listings = metric(&a, goutube::metrics::RESHARD_LISTINGS).await? - listings;
    stop.store(true, Ordering::Relaxed);
    let (mut pauses, mut slowest) = (Vec::new(), Vec::new());
    for writer in writers {
        let (pause, slow) = writer.await??;
        pauses.push(pause);
        slowest.push(slow);
    }
    if let Some(reader) = reader {
        reader.await??;
    }
    drop((to_a, to_b));
    b.stop()?;
    a.stop()?;
    Ok(Moved {
        seconds,
        pauses,
        slowest,
        read_idle,
        read_moving,
        listings,
    })
}

/// Two primaries `a` and `b` under `dir` (each moving at most `moves` points at once), once
/// their ring is formed, and a client of each.
async fn start_pair(
    dir: &Path,
    moves: Option<usize>,
) -> anyhow::Result<(Server, Server, Client, Client)> {
    std::fs::create_dir_all(dir)?;
    let reshard = moves
        .map(|moves| format!("\n[reshard]\nmax_concurrent_moves = {moves}"))
        .unwrap_or_default();
    let primary = |seeds: &str| {
        settings(&format!(
            "{seeds}\n[cluster]\nbootstrap_expect = 2{reshard}"
        ))
    };
    let a = Server::node_at(dir, "a", "127.0.0.1", None, &primary(""))?;
    let b_seeds = format!("seed_addresses = [{:?}]", a.gossip);
    let b = Server::node_at(dir, "b", "127.0.0.1", None, &primary(&b_seeds))?;
    let (to_a, to_b) = (connect(&a.rpc).await?, connect(&b.rpc).await?);
    wait_until(
        "a and b to form their ring",
        Duration::from_secs(60),
        || async {
            let members = to_a.members().await?;
            Ok(members.members.iter().filter(|m| m.owns_range).count() == 2)
        },
    )
    .await?;

    Ok((a, b, to_a, to_b))
}

/// `points` point names that `a` owns, and [`UNRELATED`] that `b` owns.
async fn split_by_owner(
    to_a: &Client,
    points: usize,
) -> anyhow::Result<(Vec<String>, Vec<String>)> {
    let (mut on_a, mut on_b) = (Vec::new(), Vec::new());
    for i in 0.. {
        if on_a.len() == points && on_b.len() == UNRELATED {
            break;
        }
        let point = format!("p/{i}");
        match owner(to_a, &point).await?.as_str() {
            "a" if on_a.len() < points => on_a.push(point),
            "b" if on_b.len() < UNRELATED => on_b.push(point),
            _ => {}
        }
    }
    Ok((on_a, on_b))
}

/// Appends 4 KiB frames to `point` (which ends at `end`) until `stop`, each with its
/// `expected_offset`, following a redirect to the new owner. Returns the time of the append that
/// was redirected (held at the fence, then taken by the new owner) and the slowest append.
async fn write_all_along(
    stop: Arc<AtomicBool>,
    point: String,
    mut address: String,
    mut end: u64,
) -> anyhow::Result<(f64, f64)> {
    let frame = Bytes::from(vec![0x5a; 4096]);
    let mut client = connect(&address).await?;
    let (mut fenced, mut slowest) = (None, 0f64);
    while !stop.load(Ordering::Relaxed) {
        let started = Instant::now();
        let mut redirected = false;
        loop {
            let request = ProduceRequest {
                point: point.clone(),
                frame: frame.clone(),
                expected_offset: Some(end),
                ..Default::default()
            };
            match client
                .raw()
                .produce_stream(tokio_stream::iter([request]))
                .await
            {
                Ok(_) => break,
                Err(status) => match status.metadata().get(OWNER_ADDR_METADATA) {
                    Some(owner) if status.code() == tonic::Code::FailedPrecondition => {
                        address = owner.to_str()?.to_owned();
                        client = connect(&address).await?;
                        redirected = true;
                    }
                    _ if status.code() == tonic::Code::Unavailable => {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    _ => bail!("appending to {point}: {status}"),
                },
            }
        }
        end += frame.len() as u64;
        let took = started.elapsed().as_secs_f64();
        if redirected && fenced.is_none() {
            fenced = Some(took);
        }
        slowest = slowest.max(took);
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let fenced = fenced.with_context(|| format!("the writer of {point} was never redirected"))?;
    Ok((fenced, slowest))
}

/// Waits until `count` reaches `target`, as long as it moves at least every `stall`.
async fn wait_counting<F, Fut>(
    what: &str,
    target: f64,
    stall: Duration,
    mut count: F,
) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<f64>>,
{
    let (mut last, mut moved_at) = (None, Instant::now());
    loop {
        let now = count().await?;
        if now >= target {
            return Ok(());
        }
        if last != Some(now) {
            (last, moved_at) = (Some(now), Instant::now());
        } else if moved_at.elapsed() > stall {
            bail!("timed out waiting for {what}: {now} of {target}, none more in {stall:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls `condition` every 20 ms until it holds, or fails after `limit`.
async fn wait_until<F, Fut>(what: &str, limit: Duration, mut condition: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let deadline = Instant::now() + limit;
    while !condition().await? {
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}
