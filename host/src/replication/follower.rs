//! The follower side: connect to the leader this node follows (`leader_addresses`, or the one
//! the controller named after a failover), offer what this node holds, and apply the records the
//! leader pushes.
//!
//! A record is applied only if it starts at this node's end of the point
//! (`Store::apply_replicated`), so nothing is applied twice and nothing is skipped; otherwise the
//! reply tells the leader where this node really ends. A record is rejected (and sent again by
//! the leader, after a pause) if the bundler refuses it (damaged), if its answer names another
//! point or offset than the record, or if the unbundled payload does not have the length and
//! CRC32C the leader sent with it: whatever the bundler does, only the leader's bytes are
//! applied. Unbundling runs on the blocking pool, never on the replication thread.
//!
//! Each session has its own applier task. It runs the jobs of one point (its description, its
//! records, a removal, a cut, a commit) in arrival order and the jobs of different points at
//! once, the records of one push included ([`super::order`]); consecutive records of a point
//! are one batch (one journal write; one sync under `fsync = "always"`). Answers leave in
//! arrival order, so an answer still means every call before it is done. An applier that dies
//! fails its session's pushes, and the leader closes the session: the follower reconnects with
//! a new one. A lost connection is retried with backoff, offering the real ends (with their
//! CRC32C) again, so a restart of either side resumes where it stopped. Once the node shuts
//! down, pushes are refused at once.

use std::collections::HashMap;
use std::rc::Rc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::LocalBoxFuture;
use futures::stream::FuturesOrdered;
use futures::{FutureExt, StreamExt};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;

use super::error::{ApplyError, LinkError, StaleEpoch, wire};
use super::handover::not_incoming;
use super::order::{PointOrder, Turn};
use super::replication_capnp::{offer, sink};
use super::{Context, Dialed, dial};
use crate::cluster::Leader;
use crate::metrics;
use crate::plugins::PluginSet;
use crate::point::ownership::FIRST_EPOCH;
use crate::point::{
    AppendError, DeleteError, EpochStart, Handover, LeaderEpochs, Ownership, PointId, ReadError,
    TruncateError, Visibility,
};

/// Longest wait between two attempts to reach a leader.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// Jobs queued for the applier; the leader's window keeps far fewer pushes in flight.
const APPLY_QUEUE: usize = 256;

/// Most jobs (or a push's points) the applier runs at once, each a trip to the blocking pool.
const APPLYING: usize = 16;

/// Most jobs begun and not answered yet (answers leave in arrival order).
const BEGUN: usize = 64;

/// Follows the leaders [`leaders_to_follow`] names until `shutdown`, again each time they
/// change (a failover names another leader).
pub(crate) async fn run(context: Context, tls: Option<TlsConnector>, shutdown: CancellationToken) {
    let context = Rc::new(context);
    let (mut topology, mut membership) = (context.topology.clone(), context.membership.clone());
    let mut sessions: HashMap<String, CancellationToken> = HashMap::new();
    loop {
        let wanted = leaders_to_follow(&context);
        // A node named a group's leader follows nobody, and no longer says it does (gossip
        // would keep counting it among its old leader's followers).
        let local = &context.services.config.node_name;
        if context.topology.borrow().leads(local) && context.leader.borrow().is_some() {
            context.leader.send_replace(None);
        }
        sessions.retain(|address, session| {
            let keep = wanted.contains(address);
            if !keep {
                tracing::info!(leader = %address, "replication: no longer following this leader");
                session.cancel();
            }
            keep
        });
        for address in wanted {
            if sessions.contains_key(&address) {
                continue;
            }
            let session = shutdown.child_token();
            sessions.insert(address.clone(), session.clone());
            let (context, tls) = (context.clone(), tls.clone());
            tokio::task::spawn_local(follow(context, address, tls, session));
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = topology.changed() => if changed.is_err() { break },
            changed = membership.changed() => if changed.is_err() { break },
        }
    }
    shutdown.cancelled().await;
}

/// The replication addresses this node follows: none while it leads a group; the leader the
/// controller names for its group (its primary, or the member a failover or a transfer named),
/// where the cluster knows it now (a primary restarted on other ports); else `leader_addresses`
/// (the leader it was configured with, before the controller's state is known).
fn leaders_to_follow(context: &Context) -> Vec<String> {
    let local = &context.services.config.node_name;
    let topology = context.topology.borrow();
    if topology.leads(local) {
        return Vec::new();
    }
    let configured = || context.services.config.leader_addresses.clone();
    match topology.followed_by(local) {
        Some((slot, group)) => {
            let membership = context.membership.borrow();
            match membership.replication_addr(&group.leader) {
                Some(address) => vec![address.to_owned()],
                // A primary the cluster has not heard of yet is where it was configured.
                None if group.leader == slot => configured(),
                None => Vec::new(),
            }
        }
        None => configured(),
    }
}

/// Follows the leader at `address` until `session` ends: again after each failure, with
/// backoff.
async fn follow(
    context: Rc<Context>,
    address: String,
    tls: Option<TlsConnector>,
    shutdown: CancellationToken,
) {
    let mut backoff = Duration::from_millis(50);
    while !shutdown.is_cancelled() {
        match session(&context, &address, tls.as_ref(), &shutdown).await {
            Ok(()) => backoff = Duration::from_millis(50),
            Err(error) => {
                tracing::warn!(leader = %address, %error, "replication session failed");
                name_unreachable_leader(&context, &address);
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// A follower that restarted while its leader is down, or that its leader refuses (a
/// forgotten leader leads no followers), still says whose follower it is (its copies count in
/// that leader's takeover if it is forgotten): the live member whose replication address is
/// `address`, else the ring member recorded with it, until a session names the leader itself.
/// (A forgotten member's ring record keeps the addresses it had: only the live view has the
/// ones it restarted on.)
fn name_unreachable_leader(context: &Context, address: &str) {
    if context.leader.borrow().is_some() {
        return;
    }
    let membership = context.membership.borrow().clone();
    // (name, replication address, client API address): the live members first.
    let live = membership.view.members.values();
    let live = live.map(|m| (&m.name, &m.replication_addr, &m.rpc_addr));
    let recorded = membership.ring.members.iter();
    let recorded = recorded.map(|(name, r)| (name, &r.replication_addr, &r.rpc_addr));
    let named = live
        .chain(recorded)
        .find(|(_, replication_addr, _)| *replication_addr == address)
        .map(|(name, _, rpc_addr)| Leader {
            name: name.clone(),
            rpc_addr: rpc_addr.clone(),
        });
    if named.is_some() {
        context.leader.send_replace(named);
    }
}

/// One connection to a leader, until it breaks or `shutdown`.
async fn session(
    context: &Rc<Context>,
    address: &str,
    tls: Option<&TlsConnector>,
    shutdown: &CancellationToken,
) -> Result<(), LinkError> {
    let Dialed {
        member: leader,
        name,
        rpc_address,
        mut connection,
    } = tokio::select! {
        dialed = dial(context, address, tls) => dialed?,
        _ = shutdown.cancelled() => return Ok(()),
    };

    let offers = offers(context).await;
    // What this node holds of its group, said in its heartbeats: what it offers, and from now
    // on what it applies.
    context.held.set(offers.iter().map(|offer| offer.end).sum());
    // The offers go in pages, the first in the hello: one message need not hold them all.
    let per_message = context.services.config.replication.offers_per_message as usize;
    let pages: Vec<&[Offer]> = match offers.is_empty() {
        true => vec![&[]],
        false => offers.chunks(per_message).collect(),
    };
    let sink = receiver(context.clone(), None, shutdown.clone());
    let mut request = leader.follow_request();
    {
        let mut params = request.get();
        let mut hello = params.reborrow().init_hello();
        hello.set_follower(&context.services.config.node_name);
        hello.set_protocol(super::PROTOCOL);
        hello.set_rpc_address(context.services.rpc_addr.to_string());
        hello.set_durable(context.services.config.storage.fsync == crate::point::Fsync::Always);
        hello.set_pages(pages.len() > 1);
        write_offers(hello.init_offers(pages[0].len() as u32), pages[0]);
        params.set_sink(sink);
    }
    let response = tokio::select! {
        response = request.send().promise => response.map_err(|e| LinkError::call("follow", &name, e))?,
        _ = shutdown.cancelled() => return Ok(()),
    };
    let (session, leader_epoch) = response
        .get()
        .and_then(|r| Ok((r.get_session()?, r.get_leader_epoch())))
        .map_err(|e| LinkError::call("follow", &name, e))?;
    admit(context, leader_epoch).map_err(|stale| LinkError::StaleLeader {
        peer: name.clone(),
        stale,
    })?;
    for (i, page) in pages.iter().enumerate().skip(1) {
        let mut request = session.offer_request();
        request.get().set_last(i + 1 == pages.len());
        write_offers(request.get().init_offers(page.len() as u32), page);
        tokio::select! {
            sent = request.send().promise => sent.map_err(|e| LinkError::call("offer", &name, e))?,
            _ = shutdown.cancelled() => return Ok(()),
        };
    }
    context.leader.send_replace(Some(Leader {
        name: name.clone(),
        rpc_addr: rpc_address,
    }));
    tracing::info!(leader = %address, name = %name, leader_epoch, points = offers.len(), "following");
    let ended = tokio::select! {
        ended = &mut connection => ended,
        _ = shutdown.cancelled() => return Ok(()),
    };
    drop(session);
    let reason = match ended {
        Ok(Ok(())) => "the leader closed it".to_owned(),
        Ok(Err(error)) => error.to_string(),
        Err(error) => format!("its task ended: {error}"),
    };
    Err(LinkError::Closed { peer: name, reason })
}

/// The highest leader epoch this node has seen on a follower's session, per group (by slot;
/// `""` before the controller's state names its group): `Context::seen_epoch`. Kept for the
/// process's life; the controller's committed state, which [`admit`] also reads, is the durable
/// record of the newest epoch.
#[derive(Debug, Default)]
pub(crate) struct SeenEpoch(std::sync::Mutex<HashMap<String, u64>>);

/// Whether a follower's session call at `leader_epoch` may change this node's copies: not if
/// another leader of its group was named since — a higher epoch seen on another session, or
/// in the controller's committed state for the group this node follows. Otherwise
/// `leader_epoch` is the highest seen from now on. Checked when a call arrives and again
/// before the applier applies it, so nothing queued before a newer epoch was known is applied
/// after.
fn admit(context: &Context, leader_epoch: u64) -> Result<(), StaleEpoch> {
    let local = &context.services.config.node_name;
    let (slot, committed) = match context.topology.borrow().followed_by(local) {
        Some((slot, group)) => (slot.to_owned(), group.leader_epoch),
        None => (String::new(), 0),
    };
    let mut seen = context.seen_epoch.0.lock().expect("poisoned");
    let seen = seen.entry(slot).or_default();
    *seen = newest(leader_epoch, *seen, committed)?;
    Ok(())
}

/// The decision of [`admit`]: the highest epoch seen after a call at `given`, or why the call
/// is refused.
fn newest(given: u64, seen: u64, committed: u64) -> Result<u64, StaleEpoch> {
    let newest = seen.max(committed);
    if given < newest {
        return Err(StaleEpoch { given, newest });
    }
    Ok(given)
}

/// A sink that applies what it receives to this node's store: a follower's copies of its
/// leader's points (`from` is `None`), or the points the member `from` hands to this node in a
/// handover, applied only while this node holds them as `incoming` from `from`.
///
/// The applier is supervised: if it dies, the sink's pushes fail and the session ends. Once
/// `shutdown` is cancelled, the sink refuses everything at once.
pub(crate) fn receiver(
    context: Rc<Context>,
    from: Option<String>,
    shutdown: CancellationToken,
) -> sink::Client {
    let (jobs, queue) = mpsc::channel(APPLY_QUEUE);
    let follows = from.is_none();
    let applier = apply(context.clone(), queue, from);
    tokio::task::spawn_local(async move {
        use futures::FutureExt;
        if let Err(panic) = std::panic::AssertUnwindSafe(applier).catch_unwind().await {
            let panic = crate::service::panic_message(panic);
            tracing::error!(%panic, "the replication applier panicked; its session ends");
            ::metrics::counter!(metrics::REPLICATION_TASK_FAILURES, "task" => "applier")
                .increment(1);
        }
    });
    capnp_rpc::new_client(SinkService {
        context,
        order: tokio::sync::Mutex::new(()),
        jobs,
        shutdown,
        follows,
    })
}

/// What this node holds of one point, as it offers it to its leader.
struct Offer {
    point: PointId,
    end: u64,
    epoch: u64,
    /// CRC32C of `[0, end)`.
    crc: u32,
    /// The newest leader epoch of its bytes (`LeaderEpochs::newest_below`).
    leader_epoch: u64,
    /// The committed end it serves up to, as a leader told it.
    committed: u64,
}

/// Writes `offers` into a list of as many.
fn write_offers(mut list: capnp::struct_list::Builder<'_, offer::Owned>, offers: &[Offer]) {
    for (i, held) in offers.iter().enumerate() {
        let mut offer = list.reborrow().get(i as u32);
        offer.set_point(held.point.as_str());
        offer.set_end(held.end);
        offer.set_epoch(held.epoch);
        offer.set_crc(held.crc);
        offer.set_leader_epoch(held.leader_epoch);
        offer.set_committed(held.committed);
    }
}

/// Every point this node holds, with its end, its epoch, its CRC32C, the newest leader epoch
/// of its bytes and its committed end: from the catalogue in one walk
/// ([`crate::point::Store::summaries`]).
async fn offers(context: &Context) -> Vec<Offer> {
    context
        .store
        .summaries()
        .await
        .into_iter()
        .map(|summary| Offer {
            end: summary.snapshot.end,
            epoch: summary.ownership.epoch,
            crc: summary.snapshot.crc,
            leader_epoch: summary.leader_epochs.newest_below(summary.snapshot.end),
            committed: summary.snapshot.committed,
            point: summary.id,
        })
        .collect()
}

/// Work for the applier, in arrival order.
enum Job {
    /// The records of one push that the bundler accepted, with one outcome each.
    Apply {
        records: Vec<Incoming>,
        done: oneshot::Sender<Vec<Result<Applied, ApplyError>>>,
    },
    Remove {
        point: PointId,
        /// The copy diverged from the leader's: kept in quarantine, not deleted.
        diverged: bool,
        done: oneshot::Sender<Result<(), ApplyError>>,
    },
    Describe {
        point: PointId,
        content_type: Option<String>,
        epoch: u64,
        /// Where each leader epoch began in the leader's copy (empty: nothing said).
        leader_epochs: LeaderEpochs,
        done: oneshot::Sender<Result<(), ApplyError>>,
    },
    Truncate {
        point: PointId,
        end: u64,
        /// A deposed leader's tail after `end`: kept in quarantine if the copy's CRC32C of
        /// `[0, end)` is this, else the whole copy is.
        diverged: Option<u32>,
        done: oneshot::Sender<Result<u64, ApplyError>>,
    },
    /// The leader's committed ends (`Sink.commit`): answered when queued.
    Commit { marks: Vec<(PointId, u64)> },
}

/// A job with the leader epoch of the call that made it (0 on a handover's sink).
struct Queued {
    leader_epoch: u64,
    job: Job,
}

impl Job {
    /// The answer to the job refused with `error`, unapplied.
    fn refuse(self, error: ApplyError) -> Answer {
        match self {
            Job::Apply { records, done } => answer(done, vec![Err(error); records.len()]),
            Job::Remove { done, .. } | Job::Describe { done, .. } => answer(done, Err(error)),
            Job::Truncate { done, .. } => answer(done, Err(error)),
            Job::Commit { .. } => Box::new(|| {}),
        }
    }

    /// The points the job changes.
    fn points(&self) -> Vec<PointId> {
        match self {
            Job::Apply { records, .. } => records.iter().map(|r| r.point.clone()).collect(),
            Job::Commit { marks } => marks.iter().map(|(point, _)| point.clone()).collect(),
            Job::Remove { point, .. }
            | Job::Describe { point, .. }
            | Job::Truncate { point, .. } => {
                vec![point.clone()]
            }
        }
    }
}

/// A job's outcome, sent to its caller once every job before it has been answered.
type Answer = Box<dyn FnOnce()>;

/// The answer that sends `value` to `done`.
fn answer<T: 'static>(done: oneshot::Sender<T>, value: T) -> Answer {
    Box::new(move || {
        let _ = done.send(value);
    })
}

/// A call refused for its stale leader epoch: counted and logged.
fn refused_stale(stale: StaleEpoch) -> ApplyError {
    ::metrics::counter!(metrics::REPLICATION_STALE_EPOCHS).increment(1);
    tracing::warn!(%stale, "refused a replication call from a deposed leader");
    ApplyError::Stale(stale)
}

/// A record, unbundled and checked.
struct Incoming {
    point: PointId,
    start: u64,
    payload: Bytes,
    /// The payload's CRC32C (checked: the leader's).
    crc: u32,
}

/// The outcome of one record: applied, or the point ends elsewhere. Either way, its end.
#[derive(Clone)]
enum Applied {
    Yes(u64),
    Mismatch(u64),
}

/// Runs the jobs: those of one point in arrival order, those of different points at once (at
/// most [`APPLYING`] at a time), and answers them in arrival order, so an answer still means
/// that every job before it is done. For a handover from `from`, only on points arriving from
/// it.
async fn apply(context: Rc<Context>, mut queue: mpsc::Receiver<Queued>, from: Option<String>) {
    let order = Rc::new(PointOrder::default());
    let slots = Rc::new(Semaphore::new(APPLYING));
    let mut begun: FuturesOrdered<LocalBoxFuture<'static, Answer>> = FuturesOrdered::new();
    loop {
        tokio::select! {
            biased;
            Some(answer) = begun.next() => answer(),
            queued = queue.recv(), if begun.len() < BEGUN => match queued {
                Some(queued) => {
                    begun.push_back(begin(&context, &order, &slots, from.as_deref(), queued));
                }
                None => break,
            },
        }
    }
    while let Some(answer) = begun.next().await {
        answer();
    }
}

/// Takes `queued` from the queue: enters it in the order of its points and returns its run.
fn begin(
    context: &Rc<Context>,
    order: &Rc<PointOrder>,
    slots: &Rc<Semaphore>,
    from: Option<&str>,
    Queued { leader_epoch, job }: Queued,
) -> LocalBoxFuture<'static, Answer> {
    let context = context.clone();
    // A handover's job runs as a whole, after the jobs before it on each of its points: a push
    // is refused whole if any of its points is not arriving from `from`.
    let job = match from {
        Some(_) => job,
        None => {
            if let Err(stale) = admit(&context, leader_epoch) {
                let refused = job.refuse(refused_stale(stale));
                return async move { refused }.boxed_local();
            }
            match job {
                Job::Apply { records, done } => {
                    return apply_points(context, order, slots, leader_epoch, records, done);
                }
                Job::Commit { marks } => {
                    // A point with no job in flight is committed now; the others after
                    // their jobs.
                    let (now, later): (Vec<_>, Vec<_>) = marks
                        .into_iter()
                        .partition(|(point, _)| order.is_idle(point));
                    for (point, end) in now {
                        context.store.commit(&point, end);
                    }
                    if later.is_empty() {
                        return async { Box::new(|| {}) as Answer }.boxed_local();
                    }
                    Job::Commit { marks: later }
                }
                job => job,
            }
        }
    };
    let (mut turn, slots, from) = (
        order.enter(job.points()),
        slots.clone(),
        from.map(str::to_owned),
    );
    async move {
        turn.started().await;
        let _slot = slots.acquire().await.expect("never closed");
        match from {
            Some(from) => handed(&context, &from, job).await,
            // Checked again now that the jobs before it on its points are done.
            None => match admit(&context, leader_epoch) {
                Ok(()) => followed(&context, job).await,
                Err(stale) => job.refuse(refused_stale(stale)),
            },
        }
    }
    .boxed_local()
}

/// Applies the records of one push: each point's records in order, after the jobs before on
/// that point, and the points at once. One outcome per record, in the push's order.
fn apply_points(
    context: Rc<Context>,
    order: &Rc<PointOrder>,
    slots: &Rc<Semaphore>,
    leader_epoch: u64,
    records: Vec<Incoming>,
    done: oneshot::Sender<Vec<Result<Applied, ApplyError>>>,
) -> LocalBoxFuture<'static, Answer> {
    let count = records.len();
    // Per point: its turn, and its records with their places in the push.
    let mut points: Vec<(Turn, Vec<usize>, Vec<Incoming>)> = Vec::new();
    let mut index = HashMap::new();
    for (at, record) in records.into_iter().enumerate() {
        let i = *index.entry(record.point.clone()).or_insert_with(|| {
            points.push((order.enter([record.point.clone()]), Vec::new(), Vec::new()));
            points.len() - 1
        });
        points[i].1.push(at);
        points[i].2.push(record);
    }
    let runs: Vec<_> = points
        .into_iter()
        .map(|(mut turn, places, records)| {
            let (context, slots) = (context.clone(), slots.clone());
            async move {
                turn.started().await;
                let _slot = slots.acquire().await.expect("never closed");
                let outcomes = match admit(&context, leader_epoch) {
                    Ok(()) => apply_records(&context, records, Visibility::OnCommit).await,
                    Err(stale) => vec![Err(ApplyError::Stale(stale)); records.len()],
                };
                (places, outcomes)
            }
        })
        .collect();
    async move {
        let mut outcomes = vec![None; count];
        let runs = futures::future::join_all(runs).await;
        // Counted and logged once per push, however many of its points found it stale.
        if let Some(stale) = runs.iter().find_map(|(_, outcomes)| {
            outcomes.iter().find_map(|outcome| match outcome {
                Err(ApplyError::Stale(stale)) => Some(*stale),
                _ => None,
            })
        }) {
            refused_stale(stale);
        }
        for (places, found) in runs {
            for (at, outcome) in places.into_iter().zip(found) {
                outcomes[at] = Some(outcome);
            }
        }
        let outcomes = outcomes
            .into_iter()
            .map(|outcome| outcome.expect("one outcome per record"))
            .collect();
        answer(done, outcomes)
    }
    .boxed_local()
}

/// Runs a follower's job other than a push (begun point by point).
async fn followed(context: &Context, job: Job) -> Answer {
    match job {
        Job::Remove {
            point,
            diverged: false,
            done,
        } => {
            let result = match context.store.delete(&point).await {
                Ok(size) => {
                    tracing::info!(%point, size, "removed (the leader no longer has this copy)");
                    Ok(())
                }
                Err(DeleteError::NotFound(_)) => Ok(()),
                Err(error) => Err(error.into()),
            };
            answer(done, result)
        }
        Job::Remove {
            point,
            diverged: true,
            done,
        } => answer(done, quarantine_diverged(context, &point).await),
        Job::Describe {
            point,
            content_type,
            epoch,
            leader_epochs,
            done,
        } => {
            let store = &context.store;
            let result = async {
                if let Some(content_type) = &content_type {
                    store
                        .set_replicated_content_type(&point, content_type)
                        .await?;
                }
                // The leader's word on the epoch is final, as on the content type.
                store
                    .set_ownership(
                        &point,
                        Ownership {
                            epoch,
                            owner: None,
                            handover: None,
                        },
                    )
                    .await?;
                if !leader_epochs.is_empty() {
                    store.set_leader_epochs(&point, leader_epochs).await?;
                }
                Ok::<(), AppendError>(())
            }
            .await
            .map_err(ApplyError::from);
            answer(done, result)
        }
        Job::Truncate {
            point,
            end,
            diverged: None,
            done,
        } => answer(done, truncate(context, &point, end).await),
        Job::Truncate {
            point,
            end,
            diverged: Some(crc),
            done,
        } => answer(done, cut_diverged(context, &point, end, crc).await),
        Job::Commit { marks } => {
            for (point, end) in marks {
                context.store.commit(&point, end);
            }
            Box::new(|| {})
        }
        Job::Apply { .. } => unreachable!("a push is begun point by point (apply_points)"),
    }
}

/// Takes this node's copy of `point` out into quarantine (`docs/resharding.md`): its leader
/// found bytes in it that it does not hold (a deposed leader's tail, never acknowledged) and
/// sends the point again from 0. Kept, counted (`goutube_quarantined_points`) and logged,
/// never deleted here.
async fn quarantine_diverged(context: &Context, point: &PointId) -> Result<(), ApplyError> {
    let store = &context.store;
    let (size, epoch) = match (store.metadata(point).await, store.ownership(point).await) {
        (Ok(snapshot), Ok(ownership)) => (snapshot.end, ownership.epoch),
        (Err(ReadError::NotFound(_)), _) | (_, Err(ReadError::NotFound(_))) => return Ok(()),
        (Err(error), _) | (_, Err(error)) => return Err(error.into()),
    };
    match store.quarantine(point, epoch).await {
        Ok(dir) => {
            tracing::warn!(%point, size, epoch, dir = %dir.display(), "this copy diverged from the leader's: kept in quarantine, and the leader's copy is sent again");
            Ok(())
        }
        Err(DeleteError::NotFound(_)) => Ok(()),
        Err(error) => Err(error.into()),
    }
}

/// Cuts this node's copy of `point` back to at most `end` (its leader found bytes in it that
/// it did not send); answers where the copy now ends.
async fn truncate(context: &Context, point: &PointId, end: u64) -> Result<u64, ApplyError> {
    match context.store.truncate(point, end).await {
        Ok(now) => {
            tracing::warn!(%point, end = now, "cut back a copy that diverged from its leader's");
            Ok(now)
        }
        Err(TruncateError::NotFound(_)) => Ok(0),
        Err(error) => Err(error.into()),
    }
}

/// Cuts this node's copy of `point` back to where its leader's epoch replaced its bytes
/// (`end`, where the two copies agree if its CRC32C there is `crc`), keeping what it cuts in
/// quarantine: a deposed leader's tail, never acknowledged. If the copies differ before `end`
/// too, the whole copy goes to quarantine. Answers where the copy now ends.
async fn cut_diverged(
    context: &Context,
    point: &PointId,
    end: u64,
    crc: u32,
) -> Result<u64, ApplyError> {
    let store = &context.store;
    let agrees = match store.crc_at(point, end).await {
        Ok(here) => here == crc,
        Err(ReadError::NotFound(_)) => return Ok(0),
        // Shorter than `end` (it changed since it was offered): its bytes are checked again.
        Err(ReadError::OutOfRange { .. }) => false,
        Err(error) => return Err(error.into()),
    };
    if !agrees {
        ::metrics::counter!(metrics::REPLICATION_DIVERGENCES, "found" => "cut", "committed" => "within")
            .increment(1);
        tracing::error!(%point, end, "DIVERGENCE BEFORE A NEWER LEADER EPOCH BEGAN: this copy differs from the leader's in bytes an older leader wrote (which may have been acknowledged); the whole copy goes to quarantine and the leader's is sent again");
        quarantine_diverged(context, point).await?;
        return Ok(0);
    }
    let (dir, kept) = match store.quarantine_tail(point, end).await {
        Ok(kept) => kept,
        Err(ReadError::NotFound(_)) => return Ok(0),
        Err(error) => return Err(error.into()),
    };
    let now = match store.truncate(point, end).await {
        Ok(now) => now,
        Err(TruncateError::NotFound(_)) => return Ok(0),
        Err(error) => return Err(error.into()),
    };
    ::metrics::counter!(metrics::REPLICATION_CUT_BYTES).increment(kept);
    tracing::warn!(%point, from = end, bytes = kept, now, dir = %dir.display(), "cut back a deposed leader's tail where its successor's epoch began; the tail is kept in quarantine");
    Ok(now)
}

/// A job of the handover from `from`: applied only to points this node holds as `incoming` from
/// it (a point this node owns is never written by another member). Removing such a point
/// empties it and keeps it incoming; its description gives its content type only (its epoch is
/// the one the handover commits). A description of any other point is ignored: the sender
/// describes a point again when its record changes, which races with the end of a handover
/// this node has just committed (and must not end the session that carries the other moves).
async fn handed(context: &Context, from: &str, job: Job) -> Answer {
    let store = &context.store;
    let incoming = |point: &PointId| {
        let point = point.clone();
        async move {
            match store.ownership(&point).await {
                Ok(ownership) => match &ownership.handover {
                    Some(Handover::Incoming { from: sender, .. }) if sender == from => {
                        Ok(ownership)
                    }
                    _ => Err(ApplyError::from(not_incoming(&point, from))),
                },
                Err(error) => Err(error.into()),
            }
        }
    };
    match job {
        Job::Apply { records, done } => {
            let mut checked = Vec::with_capacity(records.len());
            for record in records {
                let allowed = incoming(&record.point).await.map(|_| ());
                checked.push((record, allowed));
            }
            if let Some(refused) = checked
                .iter()
                .find_map(|(_, allowed)| allowed.clone().err())
            {
                return answer(done, vec![Err(refused); checked.len()]);
            }
            let records = checked.into_iter().map(|(record, _)| record).collect();
            // A handed copy is the sender's committed point: served once the handover commits.
            answer(done, apply_records(context, records, Visibility::Now).await)
        }
        // A handover's replicator sends no commit marks.
        Job::Commit { .. } => Box::new(|| {}),
        Job::Remove { point, done, .. } => {
            let result = async {
                let ownership = incoming(&point).await?;
                store.delete(&point).await?;
                store.set_ownership(&point, ownership).await?;
                Ok(())
            }
            .await;
            answer(done, result)
        }
        Job::Describe {
            point,
            content_type,
            done,
            ..
        } => {
            let result = async {
                if let Err(reason) = incoming(&point).await {
                    tracing::debug!(%point, %reason, "description ignored");
                    return Ok(());
                }
                match &content_type {
                    Some(content_type) => Ok(store
                        .set_replicated_content_type(&point, content_type)
                        .await?),
                    None => Ok(()),
                }
            }
            .await;
            answer(done, result)
        }
        // A handover never cuts a deposed leader's tail (no `diverged`).
        Job::Truncate {
            point, end, done, ..
        } => {
            let result = match incoming(&point).await {
                Ok(_) => truncate(context, &point, end).await,
                Err(refused) => Err(refused),
            };
            answer(done, result)
        }
    }
}

/// Applies `records` in order, each run of consecutive records of one point as one batch; one
/// outcome per record.
async fn apply_records(
    context: &Context,
    records: Vec<Incoming>,
    visibility: Visibility,
) -> Vec<Result<Applied, ApplyError>> {
    let mut outcomes = Vec::with_capacity(records.len());
    let mut records = records.into_iter().peekable();
    while let Some(first) = records.next() {
        let (point, start) = (first.point, first.start);
        let mut end = start + first.payload.len() as u64;
        let mut payloads = vec![(first.payload, first.crc)];
        while let Some(next) = records.next_if(|r| r.point == point && r.start == end) {
            end += next.payload.len() as u64;
            payloads.push((next.payload, next.crc));
        }
        let count = payloads.len();
        match context
            .store
            .apply_replicated(&point, start, payloads, visibility)
            .await
        {
            Ok(appended) => {
                ::metrics::counter!(metrics::REPLICATED_BYTES, "direction" => "applied")
                    .increment(end - start);
                context.held.add(end - start);
                outcomes.extend(appended.iter().map(|a| Ok(Applied::Yes(a.end))));
            }
            Err(AppendError::OffsetMismatch { end, .. }) => {
                outcomes.extend(std::iter::repeat_n(Ok(Applied::Mismatch(end)), count));
            }
            Err(error) => {
                tracing::error!(%point, %error, "cannot apply replicated records");
                outcomes.extend(std::iter::repeat_n(Err(ApplyError::from(error)), count));
            }
        }
    }
    outcomes
}

/// Receives the leader's records.
struct SinkService {
    context: Rc<Context>,
    /// Calls are handled one at a time, in arrival order (tokio's mutex is fair): unbundling
    /// and queueing for the applier happen under it.
    order: tokio::sync::Mutex<()>,
    jobs: mpsc::Sender<Queued>,
    shutdown: CancellationToken,
    /// Whether this sink is a follower's (not a handover's): it takes nothing once the
    /// controller named this node the leader of a group.
    follows: bool,
}

/// A record as it arrived, before it is unbundled.
struct Received {
    point: String,
    start: u64,
    bundle: Bytes,
    len: u64,
    crc: u32,
}

impl SinkService {
    /// Queues `job` for the applier; the caller holds its turn, and lets it go before it waits
    /// for the outcome (the next call unbundles while this one is applied).
    async fn queue(&self, leader_epoch: u64, job: Job) -> Result<(), capnp::Error> {
        let queued = Queued { leader_epoch, job };
        self.jobs.send(queued).await.map_err(|_| applier_stopped())
    }

    /// Whether a call at `leader_epoch` is taken: not once the node shuts down, nor, on a
    /// follower's session, once this node leads a group or knows a newer leader epoch.
    fn admit(&self, leader_epoch: u64) -> Result<(), capnp::Error> {
        if self.shutdown.is_cancelled() {
            return Err(wire(ApplyError::ShuttingDown));
        }
        // A node named leader takes writes from clients: a deposed leader that does not know
        // it yet must not change its copies (its replicator would cut what the new leader
        // acknowledged). Checked on every call, before the session is torn down.
        if self.follows {
            let context = &self.context;
            let topology = context.topology.borrow();
            let local = &context.services.config.node_name;
            if let Some((slot, group)) = topology.led_by(local).next() {
                return Err(capnp::Error::failed(format!(
                    "node {local} leads {slot} since epoch {}: it follows nobody",
                    group.leader_epoch
                )));
            }
            drop(topology);
            admit(context, leader_epoch).map_err(|stale| wire(refused_stale(stale)))?;
        }
        Ok(())
    }

    /// Unbundles and checks `records` on the blocking pool; a bundler whose calls block in the
    /// host is waited for no longer than its deadlines allow, and not at all once the node
    /// shuts down.
    async fn unbundle(
        &self,
        records: Vec<Received>,
    ) -> Result<Vec<Result<Incoming, ApplyError>>, capnp::Error> {
        let plugins = self.context.services.plugins.current();
        let count = records.len();
        let timeout = plugins.bundler.timeout() * count as u32 + Duration::from_secs(1);
        let shutdown = self.shutdown.clone();
        let unbundling =
            tokio::task::spawn_blocking(move || unbundle_all(&plugins, records, &shutdown));
        tokio::select! {
            done = tokio::time::timeout(timeout, unbundling) => {
                let reason = match done {
                    Ok(Ok(checked)) => return Ok(checked),
                    Ok(Err(panicked)) => format!("the host panicked unbundling: {panicked}"),
                    Err(_) => format!("the bundler did not answer within {timeout:?}"),
                };
                Ok((0..count).map(|_| Err(ApplyError::Unbundled(reason.clone()))).collect())
            }
            () = self.shutdown.cancelled() => Err(wire(ApplyError::ShuttingDown)),
        }
    }
}

/// Unbundles each record with `plugins`' bundler and checks what it found: the record's point
/// and offset, and the payload's length and CRC32C as the leader sent them. Once `shutdown` is
/// cancelled, the records left are not unbundled.
fn unbundle_all(
    plugins: &PluginSet,
    records: Vec<Received>,
    shutdown: &CancellationToken,
) -> Vec<Result<Incoming, ApplyError>> {
    records
        .into_iter()
        .map(|record| {
            if shutdown.is_cancelled() {
                return Err(ApplyError::ShuttingDown);
            }
            // A bundler that fails (traps, times out) has not vouched for the record either.
            let found = plugins
                .unbundle(record.bundle)
                .unwrap_or_else(|e| Err(e.to_string()))
                .map_err(ApplyError::Unbundled)?;
            if found.point != record.point || found.start != record.start {
                return Err(ApplyError::Unbundled(format!(
                    "the bundler found {}@{} in the record of {}@{}",
                    crate::text::bounded(&found.point),
                    found.start,
                    crate::text::bounded(&record.point),
                    record.start
                )));
            }
            let len = found.payload.len() as u64;
            let crc = crc32c::crc32c(&found.payload);
            if (len, crc) != (record.len, record.crc) {
                return Err(ApplyError::Unbundled(format!(
                    "the bundler's payload of {}@{} is {len} bytes with CRC32C {crc:08x}; the \
                     leader sent {} bytes with CRC32C {:08x}",
                    crate::text::bounded(&record.point),
                    record.start,
                    record.len,
                    record.crc
                )));
            }
            let point = PointId::new(found.point)
                .map_err(|e| ApplyError::Unbundled(format!("bad point id: {e}")))?;
            Ok(Incoming {
                point,
                start: record.start,
                payload: found.payload,
                crc,
            })
        })
        .collect()
}

/// The outcome of a queued job.
async fn outcome<T>(outcome: oneshot::Receiver<T>) -> Result<T, capnp::Error> {
    outcome.await.map_err(|_| applier_stopped())
}

impl sink::Server for SinkService {
    async fn push(
        self: Rc<Self>,
        params: sink::PushParams,
        mut results: sink::PushResults,
    ) -> Result<(), capnp::Error> {
        let params = params.get()?;
        let leader_epoch = params.get_leader_epoch();
        self.admit(leader_epoch)?;
        let mut received = Vec::new();
        for record in params.get_records()? {
            received.push(Received {
                point: record.get_point()?.to_str()?.to_owned(),
                start: record.get_start(),
                bundle: Bytes::copy_from_slice(record.get_bundle()?),
                len: record.get_payload_len(),
                crc: record.get_payload_crc(),
            });
        }
        let turn = self.order.lock().await;
        // The records to apply, and per record whether it is among them or why it was rejected.
        let mut accepted = Vec::new();
        let mut slots = Vec::new();
        for checked in self.unbundle(received).await? {
            slots.push(match checked {
                Ok(record) => {
                    accepted.push(record);
                    Ok(())
                }
                Err(reason) => {
                    ::metrics::counter!(metrics::REPLICATION_REJECTED).increment(1);
                    tracing::warn!(%reason, "rejected a replication record");
                    Err(reason)
                }
            });
        }
        let (done, applied) = oneshot::channel();
        let job = Job::Apply {
            records: accepted,
            done,
        };
        self.queue(leader_epoch, job).await?;
        drop(turn);
        let mut outcomes = outcome(applied).await?.into_iter();
        let mut acks = results.get().init_acks(slots.len() as u32);
        for (i, slot) in slots.into_iter().enumerate() {
            let mut ack = acks.reborrow().get(i as u32);
            match slot {
                Err(reason) => {
                    ack.set_end(0);
                    ack.init_result().set_rejected(reason.to_string());
                }
                Ok(()) => match outcomes.next().expect("one outcome per accepted record") {
                    Ok(Applied::Yes(end)) => {
                        ack.set_end(end);
                        ack.init_result().set_applied(());
                    }
                    Ok(Applied::Mismatch(end)) => {
                        ack.set_end(end);
                        ack.init_result().set_mismatch(());
                    }
                    Err(error) => return Err(wire(error)),
                },
            }
        }
        Ok(())
    }

    async fn describe(
        self: Rc<Self>,
        params: sink::DescribeParams,
        _: sink::DescribeResults,
    ) -> Result<(), capnp::Error> {
        let params = params.get()?;
        let leader_epoch = params.get_leader_epoch();
        self.admit(leader_epoch)?;
        let point = params.get_point()?.to_str()?.to_owned();
        let content_type = params.get_content_type()?.to_str()?.to_owned();
        let epoch = params.get_epoch();
        let Ok(point) = PointId::new(point) else {
            return Ok(());
        };
        let content_type = (!content_type.is_empty()).then_some(content_type);
        if content_type
            .as_deref()
            .is_some_and(|given| !crate::content::is_valid(given))
        {
            return Err(capnp::Error::failed(format!(
                "the leader described {point} with an invalid content type"
            )));
        }
        if epoch < FIRST_EPOCH {
            return Err(capnp::Error::failed(format!(
                "the leader described {point} with epoch 0"
            )));
        }
        let mut starts = Vec::new();
        for start in params.get_leader_epochs()? {
            starts.push(EpochStart {
                epoch: start.get_epoch(),
                start: start.get_start(),
            });
        }
        let Some(leader_epochs) = LeaderEpochs::new(starts) else {
            return Err(capnp::Error::failed(format!(
                "the leader described {point} with leader epochs out of order"
            )));
        };
        let (done, described) = oneshot::channel();
        let job = Job::Describe {
            point,
            content_type,
            epoch,
            leader_epochs,
            done,
        };
        let turn = self.order.lock().await;
        self.queue(leader_epoch, job).await?;
        drop(turn);
        outcome(described).await?.map_err(wire)
    }

    async fn remove(
        self: Rc<Self>,
        params: sink::RemoveParams,
        _: sink::RemoveResults,
    ) -> Result<(), capnp::Error> {
        let params = params.get()?;
        let leader_epoch = params.get_leader_epoch();
        self.admit(leader_epoch)?;
        let point = params.get_point()?.to_str()?.to_owned();
        let Ok(point) = PointId::new(point) else {
            return Ok(());
        };
        let diverged = params.get_diverged();
        let (done, removed) = oneshot::channel();
        let turn = self.order.lock().await;
        let job = Job::Remove {
            point,
            diverged,
            done,
        };
        self.queue(leader_epoch, job).await?;
        drop(turn);
        outcome(removed).await?.map_err(wire)
    }

    async fn truncate(
        self: Rc<Self>,
        params: sink::TruncateParams,
        mut results: sink::TruncateResults,
    ) -> Result<(), capnp::Error> {
        let params = params.get()?;
        let leader_epoch = params.get_leader_epoch();
        self.admit(leader_epoch)?;
        let point = point_named(params.get_point()?)?;
        let end = params.get_end();
        let diverged = params.get_diverged().then(|| params.get_crc());
        let (done, truncated) = oneshot::channel();
        let turn = self.order.lock().await;
        let job = Job::Truncate {
            point,
            end,
            diverged,
            done,
        };
        self.queue(leader_epoch, job).await?;
        drop(turn);
        let now = outcome(truncated).await?.map_err(wire)?;
        results.get().set_end(now);
        Ok(())
    }

    async fn commit(
        self: Rc<Self>,
        params: sink::CommitParams,
        _: sink::CommitResults,
    ) -> Result<(), capnp::Error> {
        let params = params.get()?;
        let leader_epoch = params.get_leader_epoch();
        self.admit(leader_epoch)?;
        let mut marks = Vec::new();
        for mark in params.get_marks()? {
            marks.push((point_named(mark.get_point()?)?, mark.get_end()));
        }
        let turn = self.order.lock().await;
        self.queue(leader_epoch, Job::Commit { marks }).await?;
        drop(turn);
        Ok(())
    }
}

/// The applier's queue is closed (it ended or panicked).
fn applier_stopped() -> capnp::Error {
    capnp::Error::failed("the applier stopped".into())
}

/// The point a call names.
fn point_named(text: capnp::text::Reader<'_>) -> Result<PointId, capnp::Error> {
    PointId::new(text.to_str()?.to_owned())
        .map_err(|e| capnp::Error::failed(format!("bad point id: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_from_an_older_leader_epoch_than_one_known_is_refused() {
        // Nothing known yet (a cluster without a controller): every epoch is taken.
        assert_eq!(newest(0, 0, 0), Ok(0));
        // The first session at 7; the same epoch again, and a newer one.
        assert_eq!(newest(7, 0, 7), Ok(7));
        assert_eq!(newest(7, 7, 7), Ok(7));
        assert_eq!(newest(9, 7, 7), Ok(9));
        // Once 9 was seen on the wire, the leader at 7 is refused, whatever the committed
        // state this node has read so far says.
        assert_eq!(
            newest(7, 9, 7),
            Err(StaleEpoch {
                given: 7,
                newest: 9
            })
        );
        // The committed state names a newer leader before any call of it arrived.
        assert_eq!(
            newest(7, 7, 12),
            Err(StaleEpoch {
                given: 7,
                newest: 12
            })
        );
        // A leader that sends no epoch (it predates them, or its view of the controller is
        // not loaded yet) is refused by a follower that knows one.
        assert_eq!(
            newest(0, 0, 3),
            Err(StaleEpoch {
                given: 0,
                newest: 3
            })
        );
    }
}
