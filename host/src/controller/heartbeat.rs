//! On every member: the heartbeats that keep its session with the controller
//! (`docs/failover.md`). A thin loop around [`Lease`]: every sixth of a session it asks the
//! controller leader it knows (else each voter, following the leader a voter names) and extends
//! the lease by what was granted, counted from when the heartbeat was sent. Nothing here is on a
//! write's path: the write gate only reads the lease.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::network::Peers;
use super::session::{HEARTBEATS_PER_SESSION, Held, Lease};
use super::{Controller, Grant, Topology};
use crate::metrics;

/// Keeps this member's session until `stop`: `own` is this primary's Raft node (a voter that
/// leads answers its own heartbeat without a call), `peers` reach the other voters.
pub(super) async fn keep_session(
    own: Option<Controller>,
    peers: Arc<Peers>,
    (lease, held, mut topology): (Arc<Lease>, Arc<Held>, watch::Receiver<Arc<Topology>>),
    session: Duration,
    stop: CancellationToken,
) {
    let every = session / HEARTBEATS_PER_SESSION;
    let mut leader: Option<String> = None;
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let sent = Instant::now();
        let granted = tokio::select! {
            _ = stop.cancelled() => return,
            granted = heartbeat(own.as_ref(), &peers, (leader.as_deref(), held.get()), every) => granted,
        };
        match granted {
            Some((by, session, applied)) => {
                // Counted only once this member knows every decision the grant was made with
                // (a failover that deposed it among them).
                let known = topology.wait_for(|topology| topology.applied >= applied);
                if let Ok(Ok(_)) = tokio::time::timeout(every, known).await {
                    lease.granted(sent, session);
                }
                leader = Some(by);
            }
            None => leader = None,
        }
        let holds = lease.holds(Instant::now());
        ::metrics::gauge!(metrics::SESSION_HELD).set(if holds { 1.0 } else { 0.0 });
    }
}

/// One heartbeat: to `leader` first if known, then to each voter, following the leader a voter
/// names, saying this member holds `held` bytes of its group's points. Returns who granted a
/// session, its length and the last entry the granter applied; `None` if nobody did.
async fn heartbeat(
    own: Option<&Controller>,
    peers: &Peers,
    (leader, held): (Option<&str>, u64),
    ttl: Duration,
) -> Option<(String, Duration, u64)> {
    let mut asked: Vec<String> = Vec::new();
    let mut next: Vec<String> = peers.voters();
    next.reverse();
    next.extend(leader.map(str::to_owned));
    while let Some(to) = next.pop() {
        if asked.contains(&to) {
            continue;
        }
        asked.push(to.clone());
        let grant = if to == peers.local
            && let Some(own) = own
        {
            tokio::time::timeout(ttl, own.heartbeat(&peers.local, held))
                .await
                .unwrap_or_else(|_| Grant::NoQuorum(format!("no confirmation within {ttl:?}")))
        } else {
            match peers.heartbeat(&to, held, ttl).await {
                Ok(grant) => grant,
                Err(error) => {
                    tracing::debug!(voter = %to, %error, "controller: a heartbeat was not answered");
                    continue;
                }
            }
        };
        match grant {
            Grant::Session { length, applied } => return Some((to, length, applied)),
            Grant::NotLeader(Some(leader)) => next.push(leader),
            Grant::NotLeader(None) => {}
            Grant::NoQuorum(why) => {
                tracing::debug!(voter = %to, %why, "controller: no session granted");
            }
        }
    }
    None
}
