//! `goutube bench controller`: the controller's commit latency and how long it is without a
//! leader after a `kill -9`, on three voter processes (`controller.voters = [a, b, c]`, the
//! default timings, plaintext on 127.0.0.1).
//!
//! - Commit: one topology step at a time proposed through a voter that does not lead (which
//!   forwards it to the leader), timed from the request to its answer (committed, applied on
//!   the leader) and until every voter has applied it (their status polled on open
//!   connections). The baseline is the machine's own
//!   ceiling in the same run: one small synced write (`fdatasync`) on the same disk, since a
//!   commit needs the leader's and a follower's synced appends.
//! - Failover: the leader is killed (SIGKILL) and the time until both survivors name the same
//!   new leader is measured (status polled every 10 ms); the killed voter is started again on
//!   its data before the next trial. The bound it is compared with is the election timeout.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use goutube::cluster::Handed;
use goutube::config::ControllerSection;
use goutube::controller::Command;
use goutube::proto::controller::controller_client::ControllerClient;
use goutube::proto::controller::{ProposeRequest, StatusRequest, StatusResponse};
use tonic::transport::Channel;

use super::{ClientOptions, Server, median, percentile};

const VOTERS: [&str; 3] = ["a", "b", "c"];

pub(super) async fn run(
    proposals: usize,
    trials: usize,
    election_timeout_ms: u64,
) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let start = |voters: &mut BTreeMap<&'static str, Server>, name| {
        spawn(voters, dir.path(), name, election_timeout_ms)
    };
    let mut voters = BTreeMap::new();
    for name in VOTERS {
        start(&mut voters, name)?;
    }
    let leader = agreed_leader(&voters, &VOTERS).await?;
    let through = VOTERS
        .into_iter()
        .find(|v| *v != leader)
        .context("three voters")?;
    imported(&mut client(&voters[through]).await?).await?;

    let fsyncs = synced_writes(dir.path(), proposals)?;
    let mut clients = BTreeMap::new();
    for name in VOTERS {
        clients.insert(name, client(&voters[name]).await?);
    }
    let (mut answered, mut commits) = (Vec::new(), Vec::new());
    for i in 0..proposals {
        // In the name of no member: the members' agents keep their own announcements.
        let announce = Command::Announce {
            name: "bench".into(),
            handed: Some(Handed::Join {
                joining: "x".into(),
                version: i as u64,
            }),
        };
        let started = Instant::now();
        propose(&mut clients[through].clone(), &announce).await?;
        answered.push(started.elapsed().as_secs_f64() * 1000.0);
        let applied = status(&mut clients[leader.as_str()].clone()).await?.applied;
        for name in VOTERS {
            while status(&mut clients[name].clone()).await?.applied < applied {
                tokio::task::yield_now().await;
            }
        }
        commits.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    answered.sort_by(f64::total_cmp);
    commits.sort_by(f64::total_cmp);
    println!("## Commit: {proposals} topology steps, one at a time, through a follower voter\n");
    println!("| | p50 | p99 | p50 / synced write p50 |");
    println!("|---|---|---|---|");
    println!(
        "| a synced 200-byte write (the disk's ceiling) | {:.2} ms | {:.2} ms | |",
        median(&fsyncs),
        percentile(&fsyncs, 99)
    );
    println!(
        "| request → answered (committed, applied on the leader) | {:.2} ms | {:.2} ms | {:.1}x |",
        median(&answered),
        percentile(&answered, 99),
        median(&answered) / median(&fsyncs)
    );
    println!(
        "| request → applied on every voter | {:.2} ms | {:.2} ms | {:.1}x |\n",
        median(&commits),
        percentile(&commits, 99),
        median(&commits) / median(&fsyncs)
    );

    let timeout = election_timeout_ms as f64;
    let mut elections = Vec::new();
    for _ in 0..trials {
        let leader = agreed_leader(&voters, &VOTERS).await?;
        let killed = voters.remove(leader.as_str()).context("the leader runs")?;
        let started = Instant::now();
        killed.process.kill()?;
        let survivors: Vec<&str> = VOTERS.into_iter().filter(|v| **v != *leader).collect();
        agreed_leader(&voters, &survivors).await?;
        elections.push(started.elapsed().as_secs_f64() * 1000.0);
        let name = VOTERS
            .into_iter()
            .find(|v| **v == *leader)
            .context("a voter")?;
        start(&mut voters, name)?;
    }
    elections.sort_by(f64::total_cmp);
    println!("## Failover: {trials} kills of the controller leader\n");
    println!("| | p50 | p99 | max | p99 / election timeout |");
    println!("|---|---|---|---|---|");
    println!(
        "| kill -9 → a new leader both survivors name | {:.0} ms | {:.0} ms | {:.0} ms | {:.1}x ({timeout:.0} ms) |",
        median(&elections),
        percentile(&elections, 99),
        elections.last().copied().unwrap_or_default(),
        percentile(&elections, 99) / timeout
    );
    for (_, voter) in voters {
        voter.stop()?;
    }
    Ok(())
}

/// Starts voter `name` on its data in `dir`, seeded with the voters running, with elections
/// after `election_timeout_ms` and heartbeats three times as often.
fn spawn(
    voters: &mut BTreeMap<&'static str, Server>,
    dir: &Path,
    name: &'static str,
    election_timeout_ms: u64,
) -> anyhow::Result<()> {
    let seeds: Vec<String> = voters.values().map(|v| format!("{:?}", v.gossip)).collect();
    let settings = format!(
        "role = \"leader\"\nseed_addresses = [{}]\n[controller]\nvoters = [\"a\", \"b\", \"c\"]\n\
         election_timeout_ms = {election_timeout_ms}\nheartbeat_ms = {}\n\
         session_ms = {}\n[cluster]\nbootstrap_expect = 3\n",
        seeds.join(", "),
        election_timeout_ms / 3,
        (10 * election_timeout_ms).max(ControllerSection::default().session_ms)
    );
    voters.insert(
        name,
        Server::node_at(dir, name, "127.0.0.1", None, &settings)?,
    );
    Ok(())
}

async fn client(voter: &Server) -> anyhow::Result<ControllerClient<Channel>> {
    let options = ClientOptions {
        addr: voter.rpc.clone(),
        tls: None,
    };
    Ok(ControllerClient::new(
        goutube::client::channel(&options).await?,
    ))
}

async fn status(client: &mut ControllerClient<Channel>) -> anyhow::Result<StatusResponse> {
    Ok(client.status(StatusRequest {}).await?.into_inner())
}

/// The leader every voter in `among` names, once they all name the same one.
async fn agreed_leader(
    voters: &BTreeMap<&'static str, Server>,
    among: &[&str],
) -> anyhow::Result<String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut leaders = Vec::new();
        for name in among {
            let answer = match client(&voters[name]).await {
                Ok(mut client) => status(&mut client).await,
                Err(error) => Err(error),
            };
            if let Ok(status) = answer {
                leaders.push(status.leader);
            }
        }
        leaders.dedup();
        if leaders.len() == 1 && among.contains(&leaders[0].as_str()) {
            return Ok(leaders.remove(0));
        }
        if Instant::now() > deadline {
            bail!("the voters {among:?} agree on no leader: {leaders:?}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn propose(client: &mut ControllerClient<Channel>, command: &Command) -> anyhow::Result<()> {
    let request = ProposeRequest {
        command: serde_json::to_vec(command)?.into(),
    };
    let answer = client.propose(request).await?.into_inner();
    let outcome: Result<goutube::controller::Applied, goutube::controller::Rejected> =
        serde_json::from_slice(&answer.outcome)?;
    outcome?;
    Ok(())
}

/// Waits until the voters' ring (imported by their agents from gossip's formation) is
/// committed, as the voter `client` reaches applies it.
async fn imported(client: &mut ControllerClient<Channel>) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let topology: goutube::controller::Topology =
            serde_json::from_slice(&status(client).await?.topology)?;
        if topology.ring.is_formed() {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the voters did not commit their ring within a minute"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `count` synced 200-byte appends to one file in `dir`, in milliseconds, sorted.
fn synced_writes(dir: &Path, count: usize) -> anyhow::Result<Vec<f64>> {
    let mut file = std::fs::File::create(dir.join("ceiling"))?;
    let mut times = Vec::new();
    for _ in 0..count {
        let started = Instant::now();
        file.write_all(&[7; 200])?;
        file.sync_data()?;
        times.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    times.sort_by(f64::total_cmp);
    Ok(times)
}
