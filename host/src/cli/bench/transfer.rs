//! `goutube bench transfer`: planned moves of leadership (`docs/failover.md`, "Planned moves")
//! as a writer sees them, through a balancer.
//!
//! - **Transfer pauses.** `bench failover`'s cluster (primaries a, b, c, the voters, with
//!   `ack = { replicas = 1 }`, and followers fa1 and fa2 of a), and a balancer. A producer appends small acknowledged chunks to a point
//!   of a's through the balancer, one after the other. First a steady stretch with no transfer:
//!   the gaps between consecutive acknowledgements there are the baseline. Then the group's
//!   leadership goes round a → fa1 → fa2 → a…, one `TransferLeadership` per trial. A trial's
//!   pause is the longest gap between two acknowledgements from its start to the next trial's.
//! - **A rolling restart.** Primaries a, b, c with two followers each and a balancer; a producer
//!   per primary appends through the balancer. After a steady stretch (the baseline rate), each
//!   primary in turn is stopped gracefully (it hands its group over first), started again on
//!   its data, and waited for until it is back in its group's in-sync set. Every failed append
//!   counts as a client-visible error (target 0); the rate during the restarts is reported
//!   against the baseline.
//!
//! Each part ends by checking every acknowledged byte on the group's leader.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use goutube::client::Client;

use super::failover::{append_at, group_of, points_of, random_bytes, read_all, trial_cluster};
use super::fleet::Fleet;
use super::{median, percentile};

/// Appends to one point through the balancer, one chunk after the other, until stopped:
/// the instant of each acknowledgement, the bytes acknowledged, and the appends that failed.
struct Producer {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Produced>,
}

#[derive(Default)]
struct Produced {
    acked: Vec<Instant>,
    bytes: Vec<u8>,
    errors: Vec<String>,
}

/// Bytes of each append: small, so that the gaps between acknowledgements are fine-grained.
const CHUNK: usize = 16 * 1024;

impl Producer {
    fn start(to_lb: &Client, point: &str) -> Producer {
        let stop = Arc::new(AtomicBool::new(false));
        let (client, point, stopped) = (to_lb.raw(), point.to_owned(), stop.clone());
        let task = tokio::spawn(async move {
            let mut produced = Produced::default();
            while !stopped.load(Ordering::Relaxed) {
                let chunk = random_bytes(CHUNK);
                let offset = produced.bytes.len() as u64;
                match append_at(&client, &point, offset, &chunk).await {
                    Ok(()) => {
                        produced.acked.push(Instant::now());
                        produced.bytes.extend_from_slice(&chunk);
                    }
                    // A failed append is not retried: it is what a client would have seen.
                    Err(error) => {
                        produced.errors.push(format!("at {offset}: {error:#}"));
                        break;
                    }
                }
            }
            produced
        });
        Producer { stop, task }
    }

    async fn stop(self) -> anyhow::Result<Produced> {
        self.stop.store(true, Ordering::Relaxed);
        Ok(self.task.await?)
    }
}

pub(super) async fn run(trials: usize, rolling: bool) -> anyhow::Result<()> {
    pauses(trials).await?;
    if rolling {
        rolling_restart().await?;
    }
    Ok(())
}

/// How long the steady stretches (baselines) last.
const STEADY: Duration = Duration::from_secs(3);

async fn pauses(trials: usize) -> anyhow::Result<()> {
    let mut fleet = trial_cluster().await?;
    fleet.balancer().await?;
    let b = fleet.client("b").await?;
    let point = points_of(&b, "a", 1).await?.remove(0);
    let producer = Producer::start(&fleet.client("lb").await?, &point);
    tokio::time::sleep(STEADY).await;
    let steady_until = Instant::now();

    let (mut starts, mut held) = (Vec::new(), Vec::new());
    let cycle = ["a", "fa1", "fa2"];
    for trial in 0..trials {
        let (from, to) = (cycle[trial % 3], cycle[(trial + 1) % 3]);
        fleet.in_sync("a", to).await?;
        let started = Instant::now();
        let handed = b.transfer(from, Some(to), &Default::default()).await;
        let handed = handed.with_context(|| format!("trial {}: {from} → {to}", trial + 1))?;
        starts.push(started);
        held.push(handed.transfers.first().map_or(0, |t| t.held_ms) as f64);
    }
    // The last trial's pause ends with the first acknowledgement after it.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let produced = producer.stop().await?;
    let leader = group_of(&b, "a")
        .await
        .map(|g| g.leader)
        .unwrap_or_default();
    let to_leader = fleet.client(&leader).await?.raw();
    // (A producer that failed at once left no point: reported below with its error.)
    let held_there = read_all(&to_leader, &point, produced.bytes.len() as u64).await;
    let held_there = held_there.unwrap_or_default();
    let exact = held_there == produced.bytes;
    fleet.stop()?;
    if produced.acked.len() < 2 {
        bail!(
            "the producer acknowledged nothing to measure: {:?}",
            produced.errors
        );
    }

    let gaps = |from: Instant, until: Option<Instant>| -> Vec<f64> {
        let acked = &produced.acked;
        acked
            .windows(2)
            .filter(|w| w[1] > from && until.is_none_or(|until| w[0] < until))
            .map(|w| (w[1] - w[0]).as_secs_f64() * 1000.0)
            .collect()
    };
    let mut steady: Vec<f64> = gaps(produced.acked[0], Some(steady_until));
    steady.sort_by(f64::total_cmp);
    let mut pauses: Vec<f64> = (0..starts.len())
        .map(|i| {
            let until = starts.get(i + 1).copied();
            gaps(starts[i], until).into_iter().fold(0.0, f64::max)
        })
        .collect();
    pauses.sort_by(f64::total_cmp);
    held.sort_by(f64::total_cmp);
    println!("## Transfer of a group's leadership under a producer (through a balancer)\n");
    println!(
        "| {trials} transfers; {} KiB appends, one at a time | p50 | p99 | max |",
        CHUNK / 1024
    );
    println!("|---|---|---|---|");
    for (what, times) in [
        (
            "gap between acknowledgements, no transfer (baseline)",
            &steady,
        ),
        (
            "longest gap around a transfer (the writer's pause)",
            &pauses,
        ),
        ("writes held back by the old leader", &held),
    ] {
        println!(
            "| {what} | {:.1} ms | {:.1} ms | {:.1} ms |",
            median(times),
            percentile(times, 99),
            times.last().copied().unwrap_or_default()
        );
    }
    println!(
        "\npause p99 / baseline gap p99: {:.1}x; failed appends: {} (target 0); {} bytes acknowledged, {} on the final leader {leader}",
        percentile(&pauses, 99) / percentile(&steady, 99).max(0.001),
        produced.errors.len(),
        produced.bytes.len(),
        if exact { "all" } else { "NOT all" }
    );
    for error in &produced.errors {
        println!("- failed: {error}");
    }
    if !exact {
        bail!("acknowledged bytes are missing on the final leader");
    }
    Ok(())
}

async fn rolling_restart() -> anyhow::Result<()> {
    let mut fleet = Fleet::new()?;
    let primaries = ["a", "b", "c"];
    for name in primaries {
        fleet.primary(name)?;
    }
    for name in primaries {
        fleet.follower(&format!("{name}1"), name)?;
        fleet.follower(&format!("{name}2"), name)?;
    }
    fleet.balancer().await?;
    for name in primaries {
        fleet.in_sync(name, &format!("{name}1")).await?;
        fleet.in_sync(name, &format!("{name}2")).await?;
    }
    let (b, to_lb) = (fleet.client("b").await?, fleet.client("lb").await?);
    let mut points = Vec::new();
    for name in primaries {
        points.push(points_of(&b, name, 1).await?.remove(0));
    }
    let producers: Vec<Producer> = points.iter().map(|p| Producer::start(&to_lb, p)).collect();
    let started = Instant::now();
    tokio::time::sleep(STEADY).await;
    let steady = (started, Instant::now());
    let mut restarts = Vec::new();
    for name in primaries {
        let from = Instant::now();
        fleet.restart(name)?;
        fleet.in_sync(name, name).await?;
        restarts.push((name, from, Instant::now()));
    }
    let mut produced = Vec::new();
    for producer in producers {
        produced.push(producer.stop().await?);
    }
    let b = fleet.client("b").await?;
    let mut exact = true;
    for ((slot, point), produced) in primaries.iter().zip(&points).zip(&produced) {
        let leader = group_of(&b, slot)
            .await
            .map(|g| g.leader)
            .unwrap_or_default();
        let to_leader = fleet.client(&leader).await?.raw();
        let held = read_all(&to_leader, point, produced.bytes.len() as u64).await?;
        exact &= held == produced.bytes;
    }
    fleet.stop()?;

    let rate = |from: Instant, until: Instant| -> f64 {
        let acks: usize = produced
            .iter()
            .map(|p| {
                p.acked
                    .iter()
                    .filter(|t| **t >= from && **t < until)
                    .count()
            })
            .sum();
        (acks * CHUNK) as f64 / (until - from).as_secs_f64() / 1e6
    };
    let baseline = rate(steady.0, steady.1);
    let errors: Vec<&String> = produced.iter().flat_map(|p| &p.errors).collect();
    println!("\n## A rolling restart of 3 primaries (2 followers each) under 3 producers\n");
    println!("| stretch | length | acknowledged MB/s | ratio |\n|---|---|---|---|");
    println!(
        "| steady, no restart (baseline) | {:.1} s | {baseline:.2} | 1.00x |",
        (steady.1 - steady.0).as_secs_f64()
    );
    for (name, from, until) in &restarts {
        let during = rate(*from, *until);
        println!(
            "| restart of {name} until back in sync | {:.1} s | {during:.2} | {:.2}x |",
            (*until - *from).as_secs_f64(),
            during / baseline
        );
    }
    println!(
        "\nclient-visible errors: {} (target 0); every acknowledged byte on its group's leader: {}",
        errors.len(),
        if exact { "yes" } else { "NO" }
    );
    for error in errors {
        println!("- failed: {error}");
    }
    if !exact {
        bail!("acknowledged bytes are missing on a group's leader");
    }
    Ok(())
}
