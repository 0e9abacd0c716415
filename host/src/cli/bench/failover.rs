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
//!
//! The same trials again with other nemeses:
//! - a is killed and started again at once on its data, a stop that was not clean. It comes
//!   back within its session, and says so before it takes one: the controller names an
//!   in-sync follower without waiting for the session to expire (a tail a lost on disk may
//!   have held acknowledged bytes);
//! - a is paused (SIGSTOP) until another leader took a write, then resumed;
//! - a is cut from b, c and its followers, not from the producer (each node in a network
//!   namespace of its own: needs root, else that part says why it did not run), until another
//!   leader took a write, then the cut is healed. The producer also sends a write to a once it
//!   is cut off: a stores it and can never have it acknowledged. Healed, a follows the new
//!   leader, which has it cut that tail where its own epoch began; the trial waits until a holds
//!   exactly the acknowledged bytes and reports how many it cut.
//!
//! Then, with `--put-mib N` (1024 by default; 0 skips it), a client rides through: a `put` of
//! N MiB to a is killed midway and must finish byte-exact on the new leader; the same `put`
//! without a kill, just before in the same cluster, is the baseline.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use std::sync::Arc;

use goutube::client::{Client, Progress, PutOptions, Quiet};
use goutube::config::ControllerSection;
use goutube::proto::streaming_client::StreamingClient;
use goutube::proto::{ConsumeRequest, GroupInfo, MetadataRequest, ProduceRequest};
use rand::RngCore;
use tonic::transport::Channel;

use super::fleet::Fleet;
use super::{median, owner as ring_owner, percentile};

/// Bytes of each acknowledged write.
const CHUNK: usize = 64 * 1024;

/// What happens to the leader in a trial.
#[derive(Debug, Clone, Copy)]
enum Nemesis {
    /// `kill -9`.
    Kill,
    /// `kill -9`, then started again at once on its data.
    KillAndRestart,
    /// SIGSTOP until another leader took a write, then SIGCONT.
    Pause,
    /// Cut from the other nodes, not from the producer, until another leader took a write.
    Partition,
}

impl Nemesis {
    fn describe(self) -> &'static str {
        match self {
            Nemesis::Kill => "kills (`kill -9`) of a group leader",
            Nemesis::KillAndRestart => "kills of a group leader, each started again at once",
            Nemesis::Pause => "pauses (SIGSTOP) of a group leader",
            Nemesis::Partition => {
                "partitions of a group leader from the other nodes (not from its clients)"
            }
        }
    }

    fn start(self, cluster: &mut Fleet) -> anyhow::Result<()> {
        match self {
            Nemesis::Kill => cluster.kill("a"),
            Nemesis::KillAndRestart => cluster.kill_and_restart("a"),
            Nemesis::Pause => cluster.signal("a", libc::SIGSTOP),
            Nemesis::Partition => cluster.cut("a", &["b", "c", "fa1", "fa2"]),
        }
    }

    /// Ends what [`start`](Self::start) did, where it can be ended.
    fn end(self, cluster: &mut Fleet) -> anyhow::Result<()> {
        match self {
            Nemesis::Kill | Nemesis::KillAndRestart => Ok(()),
            Nemesis::Pause => cluster.signal("a", libc::SIGCONT),
            Nemesis::Partition => cluster.heal("a", &["b", "c", "fa1", "fa2"]),
        }
    }
}

pub(super) async fn run(trials: usize, put_mib: u64) -> anyhow::Result<()> {
    let session = ControllerSection::default().session_ms as f64;
    let nemeses = [
        Nemesis::Kill,
        Nemesis::KillAndRestart,
        Nemesis::Pause,
        Nemesis::Partition,
    ];
    for nemesis in nemeses {
        if let Nemesis::Partition = nemesis
            && let Err(error) = Fleet::partitionable()
        {
            println!(
                "## Failover: {}: not run\n\nThe namespaces could not be set up ({error:#}); this part needs root and `ip`.\n",
                nemesis.describe()
            );
            continue;
        }
        let (mut named, mut writable) = (Vec::new(), Vec::new());
        let (mut acknowledged_bytes, mut lost, mut cut) = (0u64, 0u64, 0u64);
        for trial in 0..trials {
            let outcome = trial_once(trial, nemesis).await?;
            eprintln!(
                "{nemesis:?} trial {}: named after {:.0} ms, writable after {:.0} ms",
                trial + 1,
                outcome.named,
                outcome.writable
            );
            named.push(outcome.named);
            writable.push(outcome.writable);
            acknowledged_bytes += outcome.acknowledged;
            lost += outcome.lost;
            cut += outcome.cut;
        }
        named.sort_by(f64::total_cmp);
        writable.sort_by(f64::total_cmp);
        println!(
            "## Failover: {trials} {} under acknowledged writes\n",
            nemesis.describe()
        );
        println!("| from the nemesis | p50 | p99 | max | p99 / session |");
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
            "\nacknowledged bytes: {acknowledged_bytes} over {trials} trials; lost: {lost} (target 0); \
             never-acknowledged bytes cut from the deposed leader: {cut}\n"
        );
        if lost > 0 {
            bail!("{lost} acknowledged bytes were lost");
        }
    }
    if put_mib > 0 {
        put_through_a_kill(put_mib).await?;
    }
    Ok(())
}

/// A `put` of `mib` MiB to a, killed once half of it is on a, against the same `put` with no
/// kill in the same cluster just before: both must end byte-exact (the client checks the
/// point's CRC32C against the file's, and the new leader's copy is checked again here).
async fn put_through_a_kill(mib: u64) -> anyhow::Result<()> {
    let mut cluster = trial_cluster().await?;
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("upload.bin");
    {
        use std::io::Write;
        let mut out = std::io::BufWriter::new(std::fs::File::create(&file)?);
        for _ in 0..mib * 1024 * 1024 / CHUNK as u64 {
            out.write_all(&random_chunk())?;
        }
        out.flush()?;
    }
    let len = mib * 1024 * 1024;
    let to_a = cluster.client("a").await?;
    let options = PutOptions::default();
    let points = points_of(&to_a, "a", 2).await?;
    let quiet: Arc<dyn Progress> = Arc::new(Quiet);

    let started = Instant::now();
    let plain = to_a.put(&points[0], &file, &options, quiet.clone()).await?;
    let baseline = started.elapsed();

    let put = tokio::spawn({
        let (to_a, point, file, quiet) = (to_a.clone(), points[1].clone(), file.clone(), quiet);
        async move { to_a.put(&point, &file, &PutOptions::default(), quiet).await }
    });
    let started = Instant::now();
    let deadline = started + Duration::from_secs(600);
    loop {
        let held = to_a.stat(&points[1]).await.map(|m| m.size).unwrap_or(0);
        if held >= len / 2 {
            break;
        }
        if Instant::now() > deadline || put.is_finished() {
            bail!("the upload never reached half of the file on a before it ended");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let killed = Instant::now();
    cluster.kill("a")?;
    let report = put.await??;
    let (total, after_kill) = (started.elapsed(), killed.elapsed());
    let b = cluster.client("b").await?;
    let leader = group_of(&b, "a")
        .await
        .map(|g| g.leader)
        .unwrap_or_default();
    let to_leader = cluster.client(&leader).await?;
    let held = to_leader.stat(&points[1]).await?;
    let exact = held.size == len && held.crc32c == plain.record.crc32c;
    cluster.stop()?;
    println!("\n## A {mib} MiB `put` to a leader killed midway\n");
    println!("| | time | ratio |\n|---|---|---|");
    println!(
        "| the same `put`, no kill (baseline, same cluster) | {:.2} s | 1.00x |",
        baseline.as_secs_f64()
    );
    println!(
        "| the `put` through the kill | {:.2} s | {:.2}x |",
        total.as_secs_f64(),
        total.as_secs_f64() / baseline.as_secs_f64()
    );
    println!(
        "| of which after the kill (to {leader}) | {:.2} s | |",
        after_kill.as_secs_f64()
    );
    println!(
        "\nattempts resumed: {}; the point on the new leader: {} bytes, CRC32C {:08x}, {}",
        report.retries,
        held.size,
        held.crc32c,
        if exact {
            "byte-exact (the file's length and CRC32C)"
        } else {
            "NOT the file"
        }
    );
    if !exact {
        bail!("the point put through the kill is not the file");
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
    /// Bytes the deposed leader stored, never had acknowledged, and cut once it followed.
    cut: u64,
}

/// A fresh trial cluster: primaries a, b, c and followers fa1, fa2 of a, once both followers
/// are in a's in-sync set.
pub(super) async fn trial_cluster() -> anyhow::Result<Fleet> {
    trial_cluster_in(Fleet::new()?).await
}

/// [`trial_cluster`] in `fleet`.
async fn trial_cluster_in(mut fleet: Fleet) -> anyhow::Result<Fleet> {
    for name in ["a", "b", "c"] {
        fleet.primary(name)?;
    }
    for name in ["fa1", "fa2"] {
        fleet.follower(name, "a")?;
    }
    for name in ["fa1", "fa2"] {
        fleet.in_sync("a", name).await?;
    }
    Ok(fleet)
}

async fn trial_once(trial: usize, nemesis: Nemesis) -> anyhow::Result<Outcome> {
    let fleet = match nemesis {
        Nemesis::Partition => Fleet::partitionable()?,
        _ => Fleet::new()?,
    };
    let mut cluster = trial_cluster_in(fleet)
        .await
        .with_context(|| format!("trial {trial}"))?;
    let b = cluster.client("b").await?;
    let to_a = cluster.client("a").await?;
    let point = point_of(&to_a, "a").await?;
    let to_a = to_a.raw();
    let mut written: Vec<u8> = Vec::new();
    for _ in 0..16 {
        let chunk = random_chunk();
        append_at(&to_a, &point, written.len() as u64, &chunk).await?;
        written.extend_from_slice(&chunk);
    }

    let killed = Instant::now();
    nemesis.start(&mut cluster)?;
    // Cut off, a still takes a write from a client; it can never be acknowledged.
    let end_before = written.len() as u64;
    if let Nemesis::Partition = nemesis {
        let (to_a, point, chunk) = (to_a.clone(), point.clone(), random_chunk());
        tokio::spawn(async move { append_at(&to_a, &point, end_before, &chunk).await });
    }
    let mut named = None;
    let deadline = killed + Duration::from_secs(60);
    loop {
        if Instant::now() > deadline {
            nemesis.end(&mut cluster)?;
            bail!("trial {trial}: no acknowledged write within 60 s of the nemesis");
        }
        let leader = group_of(&b, "a").await.map(|g| g.leader);
        let Some(leader) = leader.filter(|leader| leader != "a") else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let named_at = *named.get_or_insert_with(|| killed.elapsed());
        let to_leader = cluster.client(&leader).await?.raw();
        let chunk = random_chunk();
        let offset = written.len() as u64;
        match append_at(&to_leader, &point, offset, &chunk).await {
            Ok(()) => {
                let writable = killed.elapsed();
                written.extend_from_slice(&chunk);
                let held = read_all(&to_leader, &point, offset + chunk.len() as u64).await?;
                let lost = common_prefix(&held, &written);
                let stored_on_a = match nemesis {
                    Nemesis::Partition => stored(&to_a, &point).await?.0,
                    _ => end_before,
                };
                nemesis.end(&mut cluster)?;
                if let Nemesis::Partition = nemesis {
                    converged(&to_a, &point, &written)
                        .await
                        .with_context(|| format!("trial {trial}: the deposed leader"))?;
                }
                let outcome = Outcome {
                    named: named_at.as_secs_f64() * 1000.0,
                    writable: writable.as_secs_f64() * 1000.0,
                    acknowledged: written.len() as u64,
                    lost: (written.len() - lost) as u64,
                    cut: stored_on_a.saturating_sub(end_before),
                };
                cluster.stop()?;
                return Ok(outcome);
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// The stored end of `point` behind `client` and its CRC32C (what the node holds, committed or
/// not).
async fn stored(client: &StreamingClient<Channel>, point: &str) -> anyhow::Result<(u64, u32)> {
    let request = MetadataRequest {
        point: point.to_owned(),
    };
    let meta = client.clone().get_metadata(request).await?.into_inner();
    Ok((
        meta.stored_size.unwrap_or(meta.size),
        meta.stored_crc32c.unwrap_or(meta.crc32c),
    ))
}

/// Waits (at most 30 s) until the node behind `client` stores exactly `written` of `point`:
/// its own tail cut, the new leader's bytes copied.
async fn converged(
    client: &StreamingClient<Channel>,
    point: &str,
    written: &[u8],
) -> anyhow::Result<()> {
    let want = (written.len() as u64, crc32c::crc32c(written));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now = stored(client, point).await.ok();
        if now == Some(want) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("it stores {now:?} (end, CRC32C) of {point} 30 s after the heal, not {want:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn random_chunk() -> Vec<u8> {
    random_bytes(CHUNK)
}

/// `len` random bytes.
pub(super) fn random_bytes(len: usize) -> Vec<u8> {
    let mut bytes = vec![0; len];
    rand::rng().fill_bytes(&mut bytes);
    bytes
}

/// How many leading bytes `held` and `written` share.
fn common_prefix(held: &[u8], written: &[u8]) -> usize {
    held.iter().zip(written).take_while(|(h, w)| h == w).count()
}

/// The group of `slot` as the node behind `client` sees the controller's state.
pub(super) async fn group_of(client: &Client, slot: &str) -> Option<GroupInfo> {
    let controller = client.members().await.ok()?.controller?;
    controller.groups.into_iter().find(|g| g.slot == slot)
}

/// A point `owner` owns.
async fn point_of(client: &Client, owner: &str) -> anyhow::Result<String> {
    Ok(points_of(client, owner, 1).await?.remove(0))
}

/// `n` points `owner` owns.
pub(super) async fn points_of(
    client: &Client,
    owner: &str,
    n: usize,
) -> anyhow::Result<Vec<String>> {
    let mut points = Vec::new();
    for i in 0..10_000 {
        let point = format!("bench/failover/{i}");
        if ring_owner(client, &point).await? == owner {
            points.push(point);
            if points.len() == n {
                return Ok(points);
            }
        }
    }
    bail!("not {n} points of {owner} among 10,000 names")
}

pub(super) async fn append_at(
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
pub(super) async fn read_all(
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
