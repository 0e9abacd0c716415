//! `goutube bench replication`: leader → follower replication against raw copies of the same
//! bytes, measured in the same run (median of `rounds`).
//!
//! - Catch-up: a follower started against a leader that holds one point of `mib` MiB, timed from
//!   the follower's spawn to its copy matching the leader's size and CRC; with the default
//!   (checksum) bundler in plaintext and with mTLS, and with the lz4 bundler, on random bytes and
//!   on text logs. Baselines: the same bytes through one loopback TCP connection, and the same
//!   copy written into a file as a follower must.
//! - Sustained produce: follower lag (leader acknowledgement → the follower's `follow` stream has
//!   the byte) at `rate` MB/s, then at rising rates until p99 reaches 50 ms or the producer cannot
//!   hold the rate; and how many of the bytes the leader read back instead of sending them live.
//! - Produce with `ack = { replicas = 1 }` against `ack = "local"`, a follower attached to both;
//!   and with two followers in the in-sync set (both waited for) against one.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use goutube::client::{Client, ClientTls};
use goutube::proto::ConsumeRequest;
use rand::Rng;

use super::{
    Relay, Server, Workload, connect, connect_with, disk_write, median, metric, percentile,
    produce, produce_record, raw_tcp_copy, spread, storage, wait_for, wait_for_followers,
    wait_for_size, warm_memory,
};

/// The follower lag the issue asks to stay under.
const LAG_TARGET_MS: f64 = 50.0;

/// One measurement of the benchmark; all run by default.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Part {
    /// Catch-up of one point against raw copies.
    CatchUp,
    /// Follower lag under sustained produce, and the rate sweep.
    Lag,
    /// Produce with `ack = { replicas = 1 }` against `ack = "local"`, and with two followers
    /// in sync against one.
    Ack,
}

pub(super) async fn run(
    mib: u64,
    rate: u64,
    seconds: u64,
    rounds: usize,
    parts: &[Part],
) -> anyhow::Result<()> {
    warm_memory()?;
    let work = tempfile::tempdir()?;
    let setup = Setup::new(work.path())?;
    let random = Workload::new(mib, 256 * 1024);
    let text = Workload {
        pool: text_pool(256 * 1024),
        ..Workload::new(mib, 256 * 1024)
    };
    println!(
        "replication on loopback, fsync = \"never\" (\"always\" on the followers of the ack part: only such a follower enters the in-sync set), {mib} MiB in 256 KiB frames, {rounds} round(s), median reported"
    );

    if parts.contains(&Part::CatchUp) {
        catch_up(&setup, work.path(), mib, rounds, &random, &text).await?;
    }
    if parts.contains(&Part::Lag) {
        lag(&setup, work.path(), rate, seconds, &random).await?;
    }
    if parts.contains(&Part::Ack) {
        ack(&setup, work.path(), mib, rounds, &random).await?;
    }
    Ok(())
}

/// Catch-up of one point, each variant against the raw copies.
async fn catch_up(
    setup: &Setup,
    work: &Path,
    mib: u64,
    rounds: usize,
    random: &Workload,
    text: &Workload,
) -> anyhow::Result<()> {
    let total = random.total;
    let scratch = work.join("scratch");
    let (mut raw, mut raw_file) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        raw.push(raw_tcp_copy(&random.pool, random.frames, None, Relay::None).await?);
        disk_write(&scratch, &random.pool, random.frames)?;
        raw_file
            .push(raw_tcp_copy(&random.pool, random.frames, Some(&scratch), Relay::None).await?);
    }

    let variants = [
        (
            "crc-bundler, plaintext, random bytes",
            false,
            "crc-bundler",
            random,
        ),
        (
            "crc-bundler, mTLS, random bytes",
            true,
            "crc-bundler",
            random,
        ),
        (
            "lz4-bundler, plaintext, random bytes",
            false,
            "lz4-bundler",
            random,
        ),
        (
            "crc-bundler, plaintext, text logs",
            false,
            "crc-bundler",
            text,
        ),
        (
            "lz4-bundler, plaintext, text logs",
            false,
            "lz4-bundler",
            text,
        ),
    ];
    let mut catch_up = vec![Vec::new(); variants.len()];
    for round in 0..rounds {
        for (i, (_, tls, bundler, workload)) in variants.iter().enumerate() {
            let dir = work.join(format!("catch-up-{round}-{i}"));
            catch_up[i].push(setup.catch_up(&dir, *tls, bundler, workload).await?);
            std::fs::remove_dir_all(&dir)?;
        }
    }
    println!("\n| catch-up of {mib} MiB | throughput (median, min–max) |");
    println!("|---|---|");
    println!("| raw TCP copy | {} |", spread(total, &raw));
    println!(
        "| raw TCP copy written to a file | {} |",
        spread(total, &raw_file)
    );
    for (i, (name, ..)) in variants.iter().enumerate() {
        println!("| {name} | {} |", spread(total, &catch_up[i]));
    }
    let ratio = |base: &[f64], measured: &[f64]| median(base) / median(measured);
    println!("\n| ratio | value | target |");
    println!("|---|---|---|");
    println!(
        "| crc plaintext / raw copy written to a file | {:.2}x | ≥ 0.6x |",
        ratio(&raw_file, &catch_up[0])
    );
    println!(
        "| crc plaintext / raw TCP copy | {:.2}x | |",
        ratio(&raw, &catch_up[0])
    );
    println!(
        "| crc mTLS / crc plaintext | {:.2}x | ≥ 0.7x |",
        ratio(&catch_up[0], &catch_up[1])
    );
    println!(
        "| lz4 / crc, random bytes | {:.2}x | |",
        ratio(&catch_up[0], &catch_up[2])
    );
    println!(
        "| lz4 / crc, text logs | {:.2}x | |",
        ratio(&catch_up[3], &catch_up[4])
    );

    Ok(())
}

/// Follower lag at `rate` MB/s, then at rising rates until the lag target breaks.
async fn lag(
    setup: &Setup,
    work: &Path,
    rate: u64,
    seconds: u64,
    random: &Workload,
) -> anyhow::Result<()> {
    // Sustained produce: at the asked rate, then faster until the lag target breaks.
    println!(
        "\n| sustained produce, target | achieved | batches late | lag p50 | lag p99 | lag max | read back by the leader |"
    );
    println!("|---|---|---|---|---|---|---|");
    let mut best = None;
    let mut target = rate;
    loop {
        let dir = work.join(format!("sustained-{target}"));
        let lag = setup.sustained(&dir, &random.pool, target, seconds).await?;
        std::fs::remove_dir_all(&dir)?;
        println!(
            "| {target} MB/s | {:.0} MB/s | {} | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} % |",
            lag.achieved,
            lag.late,
            lag.p50,
            lag.p99,
            lag.max,
            lag.read_back * 100.0
        );
        let held = lag.achieved >= 0.95 * target as f64;
        if lag.p99 >= LAG_TARGET_MS || !held {
            break;
        }
        best = Some(target);
        target += rate / 2;
    }
    match best {
        Some(best) => println!("\nhighest rate with lag p99 < {LAG_TARGET_MS} ms: {best} MB/s"),
        None => println!("\nlag p99 ≥ {LAG_TARGET_MS} ms already at {rate} MB/s"),
    }

    Ok(())
}

/// Produce acknowledged by a follower against acknowledged locally, alternating.
async fn ack(
    setup: &Setup,
    work: &Path,
    mib: u64,
    rounds: usize,
    random: &Workload,
) -> anyhow::Result<()> {
    let total = random.total;
    // Produce acknowledged locally and by the in-sync set, with one follower (as `replicas = 1`
    // was before in-sync sets: the one follower confirms) and with two (both confirm, where
    // `replicas = 1` used to take the first), alternating.
    let variants = [
        ("\"local\"", 1),
        ("{ replicas = 1 }", 1),
        ("\"local\"", 2),
        ("{ replicas = 1 }", 2),
    ];
    let mut results = vec![Vec::new(); variants.len()];
    // What this machine allows, whatever the code: the same bytes written into one file, against
    // written into a file by a relay that forwards them to a receiver writing a second one.
    let (mut one, mut two) = (Vec::new(), Vec::new());
    let scratch = work.join("ack-scratch");
    std::fs::create_dir_all(&scratch)?;
    for round in 0..rounds {
        one.push(raw_tcp_copy(&random.pool, random.frames, Some(&scratch), Relay::None).await?);
        two.push(
            raw_tcp_copy(
                &random.pool,
                random.frames,
                Some(&scratch),
                Relay::WriteAndForward(&scratch),
            )
            .await?,
        );
        for (i, (ack, followers)) in variants.iter().enumerate() {
            let dir = work.join(format!("ack-{round}-{i}"));
            results[i].push(setup.produce_acked(&dir, ack, *followers, random).await?);
            std::fs::remove_dir_all(&dir)?;
        }
    }
    let [local, one_in_sync, local_two, two_in_sync] = &results[..] else {
        unreachable!("four variants");
    };
    println!(
        "\n| produce {mib} MiB | ack = \"local\", 1 follower | ack = {{ replicas = 1 }}, 1 in sync | ratio | target |"
    );
    println!("|---|---|---|---|---|");
    println!(
        "| throughput | {} | {} | {:.2}x | ≥ 0.7x |",
        spread(total, local),
        spread(total, one_in_sync),
        median(local) / median(one_in_sync)
    );
    println!(
        "| raw TCP copy into one file / into two (the second copy relayed by the first's writer) | {} | {} | {:.2}x | |",
        spread(total, &one),
        spread(total, &two),
        median(&one) / median(&two)
    );
    println!(
        "\n| produce {mib} MiB, 2 followers | ack = \"local\" | ack = {{ replicas = 1 }}, both in sync (both waited for) | ratio |"
    );
    println!("|---|---|---|---|");
    println!(
        "| throughput | {} | {} | {:.2}x |",
        spread(total, local_two),
        spread(total, two_in_sync),
        median(local_two) / median(two_in_sync)
    );
    println!(
        "| against 1 follower in sync ({}) | | | {:.2}x |",
        spread(total, one_in_sync),
        median(one_in_sync) / median(two_in_sync)
    );
    Ok(())
}

/// Text log lines: timestamps, levels, paths, numbers and words; never periodic.
fn text_pool(frame: usize) -> Vec<Bytes> {
    const WORDS: [&str; 16] = [
        "GET", "PUT", "served", "upstream", "cache", "miss", "hit", "client", "segment", "video",
        "timeout", "retry", "stream", "open", "closed", "bytes",
    ];
    const LEVELS: [&str; 4] = ["INFO", "WARN", "DEBUG", "ERROR"];
    let mut rng = rand::rng();
    let mut second = 1_700_000_000u64;
    (0..64)
        .map(|_| {
            let mut text = String::with_capacity(frame + 200);
            while text.len() < frame {
                second += rng.random_range(0..3);
                text.push_str(&format!(
                    "{second}.{:06} {} /videos/{}/seg-{}.ts",
                    rng.random_range(0..1_000_000),
                    LEVELS[rng.random_range(0..LEVELS.len())],
                    rng.random_range(0..5000),
                    rng.random_range(0..900),
                ));
                for _ in 0..rng.random_range(3..9) {
                    text.push(' ');
                    text.push_str(WORDS[rng.random_range(0..WORDS.len())]);
                }
                text.push_str(&format!(" {}\n", rng.random_range(0..10_000_000)));
            }
            text.truncate(frame);
            Bytes::from(text)
        })
        .collect()
}

/// Certificates for mTLS runs and a compile cache shared by every node of the run.
struct Setup {
    certs: PathBuf,
    plugin_cache: PathBuf,
}

/// Follower lag under a sustained produce.
struct Lag {
    achieved: f64,
    late: u64,
    p50: f64,
    p99: f64,
    max: f64,
    /// Share of the replicated bytes the leader read back from the point.
    read_back: f64,
}

impl Setup {
    fn new(work: &Path) -> anyhow::Result<Self> {
        let certs = work.join("certs");
        let nodes = ["leader".to_owned(), "follower".to_owned()];
        goutube::certs::write(&goutube::certs::Request {
            out: &certs,
            nodes: &nodes,
            sans: &[],
            clients: &["root".to_owned()],
            days: 1,
            force: false,
        })?;
        Ok(Self {
            certs,
            plugin_cache: work.join("plugin-cache"),
        })
    }

    /// The settings of node `name`: role, storage (`fsync`), plugins, TLS.
    fn settings(
        &self,
        (name, role, fsync): (&str, &str, &str),
        tls: bool,
        bundler: &str,
        extra: &str,
    ) -> String {
        let mut settings = format!(
            "role = \"{role}\"\n{extra}\n{}[plugins]\ncache_dir = {:?}\n[plugins.bundler]\nsource = \"builtin:{bundler}\"\n",
            storage(fsync),
            self.plugin_cache
        );
        if tls {
            let certs = &self.certs;
            settings.push_str(&format!(
                "[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n[cluster]\nkey_file = {:?}\n",
                certs.join("ca.pem"),
                certs.join(format!("node-{name}.pem")),
                certs.join(format!("node-{name}-key.pem")),
                certs.join(goutube::certs::CLUSTER_KEY_FILE)
            ));
        }
        settings
    }

    fn client_tls(&self, tls: bool) -> Option<ClientTls> {
        tls.then(|| ClientTls {
            ca: self.certs.join("ca.pem"),
            cert: self.certs.join("client-root.pem"),
            key: self.certs.join("client-root-key.pem"),
            server_name: None,
        })
    }

    fn leader(&self, dir: &Path, tls: bool, bundler: &str, extra: &str) -> anyhow::Result<Server> {
        std::fs::create_dir_all(dir)?;
        let settings = self.settings(("leader", "leader", "never"), tls, bundler, extra);
        Server::node_at(dir, "leader", "127.0.0.1", None, &settings)
    }

    fn follower(
        &self,
        dir: &Path,
        (name, fsync): (&str, &str),
        leader: &Server,
        tls: bool,
        bundler: &str,
    ) -> anyhow::Result<Server> {
        std::fs::create_dir_all(dir)?;
        let extra = format!("leader_addresses = [{:?}]", leader.replication);
        // The certificates are made for the name "follower".
        let who = ("follower", "follower", fsync);
        let settings = self.settings(who, tls, bundler, &extra);
        Server::node_at(dir, name, "127.0.0.1", None, &settings)
    }

    /// Seconds from a follower's spawn to its copy of the leader's point being complete.
    async fn catch_up(
        &self,
        dir: &Path,
        tls: bool,
        bundler: &str,
        workload: &Workload,
    ) -> anyhow::Result<f64> {
        let leader = self.leader(&dir.join("leader"), tls, bundler, "")?;
        let to_leader = connect_with(&leader.rpc, self.client_tls(tls)).await?;
        produce(&to_leader, "catch-up", &workload.pool, workload.frames).await?;
        let want = to_leader.stat("catch-up").await?;
        let follower_dir = dir.join("follower");
        disk_write(&follower_dir, &workload.pool, workload.frames)?;
        let started = Instant::now();
        let follower =
            self.follower(&follower_dir, ("follower", "never"), &leader, tls, bundler)?;
        let to_follower = connect_with(&follower.rpc, self.client_tls(tls)).await?;
        wait_for(&to_follower, "catch-up", want.size, want.crc32c).await?;
        let elapsed = started.elapsed().as_secs_f64();
        follower.stop()?;
        leader.stop()?;
        Ok(elapsed)
    }

    /// Follower lag while a producer appends batches of 4 frames at `rate` MB/s for `seconds`.
    async fn sustained(
        &self,
        dir: &Path,
        pool: &[Bytes],
        rate: u64,
        seconds: u64,
    ) -> anyhow::Result<Lag> {
        let leader = self.leader(&dir.join("leader"), false, "crc-bundler", "")?;
        let follower = self.follower(
            &dir.join("follower"),
            ("follower", "never"),
            &leader,
            false,
            "crc-bundler",
        )?;
        let to_leader = connect(&leader.rpc).await?;
        let to_follower = connect(&follower.rpc).await?;
        wait_for_followers(&leader.rpc, 1).await?;
        let batch_frames = 4u64;
        let batch_bytes = batch_frames * pool[0].len() as u64;
        let batches = ((rate * 1_000_000 * seconds) / batch_bytes).max(2);
        let interval = Duration::from_secs_f64(batch_bytes as f64 / (rate as f64 * 1e6));
        let point = "sustained";
        let first = produce_record(&to_leader, point, pool, batch_frames, 0).await?;
        wait_for_size(&to_follower, point, first).await?;
        let read_back_before = read_back(&leader).await?;
        let acknowledged: Arc<std::sync::Mutex<std::collections::VecDeque<(u64, Instant)>>> =
            Default::default();
        let observer = tokio::spawn(observe(
            to_follower.clone(),
            point,
            first,
            first + (batches - 1) * batch_bytes,
            acknowledged.clone(),
        ));
        let started = Instant::now();
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut late = 0u64;
        for batch in 1..batches {
            ticker.tick().await;
            let sent = Instant::now();
            let end = produce_record(&to_leader, point, pool, batch_frames, batch).await?;
            acknowledged
                .lock()
                .expect("poisoned")
                .push_back((end, Instant::now()));
            if sent.elapsed() > interval {
                late += 1;
            }
        }
        let elapsed = started.elapsed().as_secs_f64();
        let mut lags: Vec<f64> = observer
            .await??
            .iter()
            .map(|lag| lag.as_secs_f64() * 1e3)
            .collect();
        lags.sort_by(f64::total_cmp);
        let sent = (batches - 1) * batch_bytes;
        let read_back = (read_back(&leader).await? - read_back_before) / sent as f64;
        follower.stop()?;
        leader.stop()?;
        Ok(Lag {
            achieved: sent as f64 / elapsed / 1e6,
            late,
            p50: percentile(&lags, 50),
            p99: percentile(&lags, 99),
            max: percentile(&lags, 100),
            read_back,
        })
    }

    /// Seconds to produce the workload to a leader with `ack`, a follower attached.
    /// Seconds to produce `workload` to a leader with `followers` followers, all of them in
    /// its in-sync set first, acknowledged as `ack` says.
    async fn produce_acked(
        &self,
        dir: &Path,
        ack: &str,
        followers: usize,
        workload: &Workload,
    ) -> anyhow::Result<f64> {
        let extra = format!("[replication]\nack = {ack}");
        let leader_dir = dir.join("leader");
        let leader = self.leader(&leader_dir, false, "crc-bundler", &extra)?;
        let mut started = Vec::new();
        for i in 1..=followers {
            let follower_dir = dir.join(format!("follower-{i}"));
            let name = format!("follower-{i}");
            // Only a follower that syncs before it confirms enters the in-sync set.
            let who = (name.as_str(), "always");
            started.push(self.follower(&follower_dir, who, &leader, false, "crc-bundler")?);
            // Every copy is written into recycled page-cache pages, as on a long-running node.
            disk_write(&follower_dir, &workload.pool, workload.frames)?;
        }
        let client = connect(&leader.rpc).await?;
        wait_for_followers(&leader.rpc, followers).await?;
        wait_for_in_sync(&client, followers).await?;
        disk_write(&leader_dir, &workload.pool, workload.frames)?;
        let elapsed = produce(&client, "acked", &workload.pool, workload.frames).await?;
        for follower in started {
            follower.stop()?;
        }
        leader.stop()?;
        Ok(elapsed)
    }
}

/// Waits until the leader's group has `count` followers in its in-sync set.
async fn wait_for_in_sync(leader: &Client, count: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let members = leader.members().await?;
        let groups = members.controller.map(|c| c.groups).unwrap_or_default();
        if groups.iter().any(|group| group.in_sync.len() == count) {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the followers did not enter the in-sync set within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Lags of the acknowledged ends, as the follower's `follow` stream reaches them.
async fn observe(
    follower: Client,
    point: &str,
    offset: u64,
    last: u64,
    acknowledged: Arc<std::sync::Mutex<std::collections::VecDeque<(u64, Instant)>>>,
) -> anyhow::Result<Vec<Duration>> {
    let request = ConsumeRequest {
        point: point.into(),
        offset,
        limit: last,
        chunk_size: 0,
        follow: true,
    };
    let mut stream = follower.raw().consume_stream(request).await?.into_inner();
    let mut lags = Vec::new();
    while let Some(response) = stream.message().await? {
        let held = response.offset + response.frame.len() as u64;
        let mut pending = acknowledged.lock().expect("poisoned");
        while let Some(&(end, at)) = pending.front()
            && end <= held
        {
            pending.pop_front();
            lags.push(at.elapsed());
        }
    }
    Ok(lags)
}

/// The leader's count of bytes it read back to replicate, from its metrics endpoint.
async fn read_back(leader: &Server) -> anyhow::Result<f64> {
    metric(leader, goutube::metrics::REPLICATION_READ_BACK).await
}
