//! The old owner's side of resharding (`docs/resharding.md`): when the ring has a pending
//! change, hand every point this node owns now and another member owns in the target ring to
//! that member, one point at a time per move, at most `reshard.max_concurrent_moves` at once.
//!
//! The pending change is a drain or a join ([`cluster::change::pending`]). A drained member steps to
//! `left` once it holds no point to hand over; an owner that has handed a joining member every
//! point it will own announces it in gossip (`handed`), and the joining member steps to
//! `active` once every owner of the ring has.
//!
//! Each destination gets one connection and one replicator scoped to the points moving there
//! ([`Replicator::handover`]): the same pushes, window and acknowledgements as a follower's. A
//! move of one point walks the point's record through `copying`, `sealed` and `moved`, each
//! written durably before the next step, so a restarted node resumes from its records.
//!
//! A forgotten primary's points go the same way from its followers: on a follower, the mover
//! offers its copies of them to their new owners and hands over those asked for
//! ([`super::takeover`] decides on the new owner's side). A forgotten primary that returns steps
//! down here: its copies become history or go to quarantine.

use std::collections::{HashMap, HashSet};
use std::rc::Rc;
use std::time::{Duration, Instant};

use futures::FutureExt;
use futures::StreamExt;
use futures::future::LocalBoxFuture;
use futures::stream::FuturesUnordered;
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use super::Context;
use super::error::{LinkError, MoveError, PlanError, StoreError};
use crate::cluster::Membership;
use crate::cluster::handed::Tag;
use crate::cluster::ring::Ring;
use crate::cluster::{Change, Handed, Lifecycle};
use crate::metrics;
use crate::placement::PlacementError;
use crate::point::{Handover, Ownership, PointId, ReadError, StoreEvent};
use crate::reshard::planner::{self, Action, Next, Outcome, Planner, Work};
use crate::reshard::{self, Move};

mod listing;
mod moves;
mod peer;
mod queue;

use listing::Listing;
use moves::*;
use peer::*;

/// How often the mover looks again without a change of membership (points created meanwhile,
/// moves to retry).
const TICK: Duration = Duration::from_millis(500);

/// How often, at most, the points held are listed again while points come or go (a listing
/// walks every point; the ticks between plan from the last one and the handover index).
const RELIST_EVERY: Duration = Duration::from_secs(10);
/// A move whose lag has not shrunk for this long is reported as stalled and tried again later.
const STALL: Duration = Duration::from_secs(30);
/// How long a fenced point waits for the new owner to confirm its last bytes before the fence
/// is lifted (the seal was not sent yet, so nothing was committed there).
const FENCE_WAIT: Duration = Duration::from_secs(10);
/// How often the copies handed over are looked at for cleanup.
const CLEANUP_EVERY: Duration = Duration::from_secs(5);

/// Runs the moves of this primary until `shutdown`.
pub(crate) async fn run(
    context: Rc<Context>,
    tls: Option<TlsConnector>,
    shutdown: CancellationToken,
) {
    let reshard = &context.services.config.reshard;
    let planner = Planner::new(
        reshard.max_concurrent_moves,
        Duration::from_millis(reshard.settle_ms),
    );
    let mover_events = context.store.subscribe();
    let mut mover = Mover {
        context,
        tls,
        shutdown: shutdown.clone(),
        peers: HashMap::new(),
        planner,
        stops: HashMap::new(),
        cleaning: HashSet::new(),
        cleaned_at: None,
        offered: HashSet::new(),
        handed_over: true,
        listing: None,
        removals: mover_events,
    };
    let mut membership = mover.context.membership.clone();
    // Each move is a task of its own: it holds a point's lock at times, and must go on while
    // this loop waits for that lock in its next plan.
    let mut tasks: FuturesUnordered<AbortOnDropHandle<(Move, Result<(), MoveError>)>> =
        FuturesUnordered::new();
    let mut cleanups: FuturesUnordered<AbortOnDropHandle<(Move, Result<bool, MoveError>)>> =
        FuturesUnordered::new();
    let mut ticks = tokio::time::interval(TICK);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut reported_at: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            changed = membership.changed() => if changed.is_err() { break },
            _ = ticks.tick() => {}
            Some(done) = tasks.next() => mover.finished(done),
            Some(done) = cleanups.next() => mover.cleaned(done),
        }
        // Every move and cleanup that ended meanwhile, not only the one that woke this pass: a
        // pass plans, and many small points end their moves faster than one pass each.
        while let Some(Some(done)) = tasks.next().now_or_never() {
            mover.finished(done);
        }
        while let Some(Some(done)) = cleanups.next().now_or_never() {
            mover.cleaned(done);
        }
        for task in mover.plan().await {
            tasks.push(AbortOnDropHandle::new(tokio::task::spawn_local(task)));
        }
        for task in mover.cleanups().await {
            cleanups.push(AbortOnDropHandle::new(tokio::task::spawn_local(task)));
        }
        // Once a tick at most: the report reads every moving point and asks the gossip task.
        if reported_at.is_none_or(|at| at.elapsed() >= TICK) {
            mover.report().await;
            reported_at = Some(Instant::now());
        }
    }
}

/// What a move's task gives back: the move, and how it ended.
type MoveEnded = Result<(Move, Result<(), MoveError>), tokio::task::JoinError>;
/// What a cleanup's task gives back: the copy, and whether it was deleted.
type CleanupEnded = Result<(Move, Result<bool, MoveError>), tokio::task::JoinError>;

/// What a task of the mover gave back, or `None` (logged) if it panicked or was aborted.
fn joined<T>(ended: Result<T, tokio::task::JoinError>, task: &str) -> Option<T> {
    ended
        .inspect_err(|error| tracing::error!(%error, task, "a task of the mover failed"))
        .ok()
}

struct Mover {
    context: Rc<Context>,
    tls: Option<TlsConnector>,
    shutdown: CancellationToken,
    /// One connection and replicator per destination.
    peers: HashMap<String, Rc<Peer>>,
    /// The decisions: what moves, what stops, when this node is done with a change.
    planner: Planner,
    /// The token that stops each move's copy before its fence (the planner says when).
    stops: HashMap<PointId, CancellationToken>,
    /// Handed-over copies whose new owner is being asked whether they may go.
    cleaning: HashSet<PointId>,
    /// When the handed-over copies were last looked at.
    cleaned_at: Option<Instant>,
    /// On a follower: copies of forgotten members' points (by the member's tag) whose new owner
    /// holds the point already (taken over from another copy, or diverged from it).
    offered: HashSet<(Tag, PointId)>,
    /// Whether copies handed over may still be here (after a start, after a move): only then
    /// are points looked at for cleanup.
    handed_over: bool,
    /// The points held when last listed, and the moves last planned over them.
    listing: Option<Listing>,
    /// The store's events, for the points removed since (noted in `listing`).
    removals: tokio::sync::broadcast::Receiver<StoreEvent>,
}

/// The points held that are in a handover, each with its record; what a tick reads instead of
/// every point's record.
type Handovers = HashMap<PointId, Handover>;

/// Whether a point in `handover` (if any) is this node's to hand over: not handed over already,
/// not arriving.
fn holds(handover: Option<&Handover>) -> bool {
    !matches!(
        handover,
        Some(Handover::Moved { .. } | Handover::Incoming { .. })
    )
}

impl Mover {
    /// Starts the moves the ring's pending change calls for, within the concurrency limit, and
    /// ends the handovers it no longer calls for; says when this node is done with the change.
    /// The decisions are the [`Planner`]'s; this performs them.
    async fn plan(&mut self) -> Vec<LocalBoxFuture<'static, (Move, Result<(), MoveError>)>> {
        let limit = self.context.services.config.reshard.max_concurrent_moves;
        if limit > 0 && !self.context.services.config.role.is_primary() {
            return self.take_over().await;
        }
        // A primary whose slot another member leads (a failover, a transfer) moves nothing:
        // it no longer takes the slot's writes, so a copy it handed over could lack
        // acknowledged bytes. Moves under way stop before their fence; the change waits until
        // the slot is handed back (the controller refuses new changes meanwhile).
        let name = &self.context.services.config.node_name;
        if self.context.topology.borrow().writer(name) != name {
            self.stops.values().for_each(CancellationToken::cancel);
            return Vec::new();
        }
        let membership = self.context.membership.borrow().clone();
        let local = membership.local.clone();
        let planner::Look { actions, next } = self.planner.look(
            &local,
            &membership.ring,
            &membership.view.id,
            Instant::now(),
        );
        self.perform(&membership, actions).await;
        let (pending, since) = match next {
            Next::Idle => {
                // No change to plan: the listing (a million ids, maybe) is not kept for the next.
                self.listing = None;
                return Vec::new();
            }
            Next::StepDown { ring_version } => {
                if self.step_down(&membership).await {
                    self.planner.stepped_down(ring_version);
                }
                return Vec::new();
            }
            Next::Join { joining, version } => {
                self.join(&membership, &joining, version).await;
                return Vec::new();
            }
            Next::List { pending, since } => (pending, since),
        };
        let started = Instant::now();
        // The handovers under way only: a point handed over leaves the queue when its move
        // ends (`finished`), and a plan leaves out those handed over before it (`planned`).
        let handovers = match self.under_way().await {
            Ok(handovers) => handovers,
            Err(error) => {
                tracing::warn!(%error, "cannot list this node's points in a handover");
                return Vec::new();
            }
        };
        // Only a point in a handover can be a stray: the planner needs no other.
        let mut held: Vec<(PointId, Option<Handover>)> = handovers
            .iter()
            .filter(|(_, handover)| holds(Some(handover)))
            .map(|(point, handover)| (point.clone(), Some(handover.clone())))
            .collect();
        held.sort_by(|a, b| a.0.cmp(&b.0));
        let mut moves = Vec::new();
        if let Some(pending) = &pending {
            // This node says when it is done with a join, or with its own drain: only those
            // need every point created since the listing.
            let concludes = match &pending.change {
                Change::Drain(member) => *member == local,
                Change::Join(_) => true,
            };
            match self
                .moves(&membership.ring, &pending.target, &handovers, concludes)
                .await
            {
                Ok(planned) => moves.extend(planned.into_iter().filter(|m| m.from == local)),
                Err(error) => {
                    tracing::warn!(%error, "cannot plan the moves of this node's points");
                    return Vec::new();
                }
            }
        }
        let actions = self
            .planner
            .plan(&local, pending.as_ref(), since, &held, moves, started);
        self.perform(&membership, actions).await
    }

    /// Performs the planner's actions; returns the moves started.
    async fn perform(
        &mut self,
        membership: &Membership,
        actions: Vec<Action>,
    ) -> Vec<LocalBoxFuture<'static, (Move, Result<(), MoveError>)>> {
        let mut tasks = Vec::new();
        let mut unreachable = std::collections::BTreeSet::new();
        for action in actions {
            match action {
                Action::Announce(handed) => self.announce(handed).await,
                Action::Leave => match self.context.steps.set_lifecycle(Lifecycle::Left).await {
                    Ok(()) => tracing::info!(
                        "drained: every point is with its next owner; this node left the ring and may be stopped"
                    ),
                    Err(error) => tracing::warn!(%error, "cannot step to left"),
                },
                Action::Stop(point) => {
                    if let Some(stop) = self.stops.get(&point) {
                        stop.cancel();
                    }
                }
                Action::Start { work, target_ring } => {
                    let planned = work.planned().clone();
                    let peer = self
                        .peer_once(membership, &planned.to, &mut unreachable)
                        .await;
                    let context = self.context.clone();
                    let stop = CancellationToken::new();
                    let stopped = stop.clone();
                    let task = match (work, peer) {
                        (Work::Move(planned), Some(peer)) => async move {
                            let result =
                                hand_over(&context, &peer, &planned, target_ring, &stopped).await;
                            (planned, result)
                        }
                        .boxed_local(),
                        (Work::Move(_), None) => {
                            self.planner.unstarted(&planned.point, Instant::now());
                            continue;
                        }
                        (Work::GiveUp(planned), peer) => async move {
                            let result = give_up(&context, peer.as_deref(), &planned).await;
                            (planned, result)
                        }
                        .boxed_local(),
                    };
                    self.stops.insert(planned.point, stop);
                    tasks.push(task);
                }
            }
        }
        tasks
    }

    /// On a follower: hands the copies it holds of a forgotten primary's points to their new
    /// owners, when they ask for them (`docs/resharding.md`, forget), one forgotten member at a
    /// time; announces `handed = <member>@<record version>` (a list, comma-separated) once
    /// every such copy was handed over or its new owner holds the point already.
    async fn take_over(&mut self) -> Vec<LocalBoxFuture<'static, (Move, Result<(), MoveError>)>> {
        let membership = self.context.membership.borrow().clone();
        let local = membership.local.clone();
        let announced = membership.live(&local).and_then(|m| m.handed.as_ref());
        let Some(planner::Takeover {
            forgotten,
            announcement,
        }) = planner::next_takeover(&membership.ring, announced)
        else {
            return Vec::new();
        };
        let handovers = match self.handovers().await {
            Ok(handovers) => handovers,
            Err(error) => {
                tracing::warn!(%error, "cannot list this node's points in a handover");
                return Vec::new();
            }
        };
        let before = forgotten.before(&membership.ring);
        let candidates = match self
            .moves(&before, &membership.ring, &handovers, true)
            .await
        {
            Ok(moves) => moves
                .into_iter()
                .filter(|m| {
                    m.from == forgotten.name
                        && !self
                            .offered
                            .contains(&(forgotten.tag.clone(), m.point.clone()))
                })
                .collect::<Vec<_>>(),
            Err(error) => {
                tracing::warn!(%error, "cannot plan the takeover of a forgotten member's points");
                return Vec::new();
            }
        };
        if candidates.is_empty() && self.planner.moving().is_empty() {
            tracing::info!(forgotten = %forgotten.name, "every copy of the forgotten member's points is with their new owners");
            self.announce(Some(announcement)).await;
            return Vec::new();
        }
        let offered = candidates
            .into_iter()
            .filter(|planned| !self.planner.moving().contains_key(&planned.point));
        let by_owner = copies_by_owner(&self.context.store, offered).await;
        let target = membership.ring.version();
        let mut tasks = Vec::new();
        let mut unreachable = std::collections::BTreeSet::new();
        for (to, copies) in by_owner {
            let Some(peer) = self.peer_once(&membership, &to, &mut unreachable).await else {
                continue;
            };
            let verdicts = match peer.offer(&local, &forgotten.name, &copies).await {
                Ok(verdicts) => verdicts,
                Err(error) => {
                    tracing::warn!(%to, %error, "cannot offer copies of a forgotten member's points");
                    continue;
                }
            };
            for (copy, verdict) in copies.into_iter().zip(verdicts) {
                use super::takeover::Verdict;
                match verdict {
                    Verdict::Wait => {}
                    Verdict::Taken => {
                        self.offered.insert((forgotten.tag.clone(), copy.point));
                    }
                    Verdict::Diverged => {
                        tracing::warn!(point = %copy.point, %to, end = copy.end, "this copy has bytes the new owner did not take over: kept here, not merged");
                        self.offered.insert((forgotten.tag.clone(), copy.point));
                    }
                    Verdict::Send if self.planner.admit(&copy.point, &to) => {
                        let planned = Move {
                            point: copy.point,
                            from: local.clone(),
                            to: to.clone(),
                        };
                        let (context, peer) = (self.context.clone(), peer.clone());
                        let stop = CancellationToken::new();
                        self.stops.insert(planned.point.clone(), stop.clone());
                        tasks.push(
                            async move {
                                let result =
                                    hand_over(&context, &peer, &planned, target, &stop).await;
                                (planned, result)
                            }
                            .boxed_local(),
                        );
                    }
                    Verdict::Send => {}
                }
            }
        }
        tasks
    }

    /// This member was forgotten while it was away (`docs/resharding.md`): it owns nothing, and
    /// each copy it holds is asked about at the point's owner. A prefix of what the owner took
    /// over is history (`moved` to it: served for reads until cleanup, writes redirected);
    /// a copy with bytes the owner does not have is quarantined, never served as the point and
    /// never deleted but by an operator. Returns whether every copy had its answer (nothing is
    /// left to ask about).
    async fn step_down(&mut self, membership: &Membership) -> bool {
        let local = membership.local.clone();
        let store = self.context.store.clone();
        ::metrics::gauge!(metrics::QUARANTINED_POINTS).set(store.quarantined_count() as f64);
        let handovers = match self.handovers().await {
            Ok(handovers) => handovers,
            Err(error) => {
                tracing::warn!(%error, "cannot list this node's points in a handover");
                return false;
            }
        };
        self.list(true);
        let points: Vec<PointId> = self
            .held()
            .into_iter()
            .filter(|point| holds(handovers.get(point)))
            .collect();
        if points.is_empty() {
            return true;
        }
        let plugins = self.context.services.plugins.current();
        let ring = membership.ring.clone();
        let me = local.clone();
        let owners = tokio::task::spawn_blocking(move || {
            reshard::plan(
                points,
                |_| Ok::<_, PlacementError>(me.clone()),
                |point| crate::placement::owner_in(&plugins, &ring, point.as_str()),
            )
        })
        .await;
        let owners = match owners {
            Ok(Ok(owners)) => owners,
            Ok(Err(error)) => {
                tracing::warn!(%error, "cannot find the owners of this forgotten node's points");
                return false;
            }
            Err(error) => {
                tracing::warn!(%error, "planning task");
                return false;
            }
        };
        let by_owner = copies_by_owner(&store, owners).await;
        let mut unreachable = std::collections::BTreeSet::new();
        let mut answered = true;
        for (to, copies) in by_owner {
            let Some(peer) = self.peer_once(membership, &to, &mut unreachable).await else {
                answered = false;
                continue;
            };
            let verdicts = match peer.offer(&local, &local, &copies).await {
                Ok(verdicts) => verdicts,
                Err(error) => {
                    tracing::warn!(%to, %error, "cannot ask about this forgotten node's copies");
                    answered = false;
                    continue;
                }
            };
            for (copy, verdict) in copies.into_iter().zip(verdicts) {
                use super::takeover::Verdict;
                let point = &copy.point;
                let done = match verdict {
                    Verdict::Taken => {
                        let history = Ownership {
                            epoch: copy.epoch,
                            owner: None,
                            handover: Some(Handover::Moved {
                                to: to.clone(),
                                epoch: copy.epoch + 1,
                            }),
                        };
                        let done = store.set_ownership(point, history).await.map(|_| ());
                        if done.is_ok() {
                            self.handed_over = true;
                            tracing::info!(%point, %to, "stepped down: this copy is history, a prefix of the owner's");
                        }
                        done.map_err(StoreError::from)
                    }
                    Verdict::Diverged => match store.quarantine(point, copy.epoch).await {
                        Ok(dir) => {
                            tracing::warn!(%point, %to, end = copy.end, dir = %dir.display(), "stepped down: this copy has bytes nobody else has; quarantined (never served, deleted only by an operator)");
                            Ok(())
                        }
                        Err(error) => Err(error.into()),
                    },
                    Verdict::Wait | Verdict::Send => {
                        answered = false;
                        Ok(())
                    }
                };
                if let Err(error) = done {
                    answered = false;
                    tracing::warn!(%point, %error, "cannot step down for this point");
                }
            }
        }
        answered
    }

    /// Every [`CLEANUP_EVERY`], asks the new owner of each copy handed over whether it holds
    /// the point replicated enough for this copy to go (`docs/resharding.md`, cleanup).
    async fn cleanups(&mut self) -> Vec<LocalBoxFuture<'static, (Move, Result<bool, MoveError>)>> {
        if self.context.services.config.reshard.max_concurrent_moves == 0
            || !self.handed_over
            || self
                .cleaned_at
                .is_some_and(|at| at.elapsed() < CLEANUP_EVERY)
        {
            return Vec::new();
        }
        self.cleaned_at = Some(Instant::now());
        let mut found = false;
        let mut unreachable = std::collections::BTreeSet::new();
        let membership = self.context.membership.borrow().clone();
        let store = self.context.store.clone();
        let mut tasks = Vec::new();
        let handovers = match store.handovers().await {
            Ok(handovers) => handovers,
            Err(error) => {
                tracing::warn!(%error, "cannot list the points in a handover");
                return Vec::new();
            }
        };
        for (point, handover) in handovers {
            let Handover::Moved { to, epoch } = handover else {
                continue;
            };
            found = true;
            if self.cleaning.contains(&point) {
                continue;
            }
            let Some(peer) = self.peer_once(&membership, &to, &mut unreachable).await else {
                continue;
            };
            self.cleaning.insert(point.clone());
            let context = self.context.clone();
            let handed = Move {
                point,
                from: membership.local.clone(),
                to,
            };
            tasks.push(
                async move {
                    let result = clean_up(&context, &peer, &handed.point, epoch).await;
                    (handed, result)
                }
                .boxed_local(),
            );
        }
        // Nothing handed over is left here: look again only after the next move.
        self.handed_over = found;
        tasks
    }

    fn cleaned(&mut self, ended: CleanupEnded) {
        let Some((done, result)) = joined(ended, "cleanup") else {
            return;
        };
        self.cleaning.remove(&done.point);
        if let Err(error) = result {
            tracing::warn!(point = %done.point, to = %done.to, %error, "cannot clean up a handed-over copy yet");
            self.forget_peer_if_gone(&done.to, &error);
        }
    }

    /// Gossips the join this node has handed over (`None`: none), if that changed.
    async fn announce(&mut self, handed: Option<Handed>) {
        let current = self
            .context
            .membership
            .borrow()
            .live(&self.context.services.config.node_name)
            .and_then(|m| m.handed.clone());
        if current == handed {
            return;
        }
        if let Err(error) = self.context.steps.announce_handed(handed).await {
            tracing::warn!(%error, "cannot announce the join handed over");
        }
    }

    /// This node is joining: it turns `active` once every owner of the ring has handed it its
    /// points for this join (a down owner holds the join back).
    async fn join(&mut self, membership: &Membership, joining: &str, version: u64) {
        let handed = Handed::Join {
            joining: joining.to_owned(),
            version,
        };
        let waiting: Vec<&String> = membership
            .ring
            .owners()
            .map(|(name, _)| name)
            .filter(|name| {
                membership
                    .live(name)
                    .is_none_or(|member| member.handed.as_ref() != Some(&handed))
            })
            .collect();
        if !waiting.is_empty() {
            tracing::debug!(
                ?waiting,
                "joining: waiting for owners to hand their points over"
            );
            return;
        }
        match self.context.steps.set_lifecycle(Lifecycle::Active).await {
            Ok(()) => tracing::info!(
                "joined: every owner has handed its points over; this node is active"
            ),
            Err(error) => tracing::warn!(%error, "cannot step to active"),
        }
    }

    /// The moves in flight: in metrics, and in gossip (`goutube members`).
    async fn report(&mut self) {
        let mut lag = 0;
        for (point, to) in self.planner.moving() {
            let (Some(peer), Ok(held)) =
                (self.peers.get(to), self.context.store.metadata(point).await)
            else {
                continue;
            };
            lag += held
                .end
                .saturating_sub(peer.progress.confirmed_end(to, point));
        }
        let moving = self.planner.moving().len();
        ::metrics::gauge!(metrics::RESHARD_MOVES_IN_FLIGHT).set(moving as f64);
        ::metrics::gauge!(metrics::RESHARD_LAG_BYTES).set(lag as f64);
        let moving = moving as u32;
        let announced = self
            .context
            .membership
            .borrow()
            .live(&self.context.services.config.node_name)
            .map_or(0, |m| m.moving);
        if moving != announced
            && let Err(error) = self.context.steps.announce_moving(moving).await
        {
            tracing::warn!(%error, "cannot announce the moves in flight");
        }
    }

    fn finished(&mut self, ended: MoveEnded) {
        let Some((done, result)) = joined(ended, "handover") else {
            return;
        };
        let stopped = self
            .stops
            .remove(&done.point)
            .is_some_and(|stop| stop.is_cancelled());
        let outcome = match result {
            Ok(()) => {
                self.handed_over = true;
                self.dequeue(&done.point);
                Outcome::Done
            }
            Err(error) if error.is_gone() => {
                // Deleted meanwhile (its removal may have gone unseen: `prune`): not planned again.
                tracing::debug!(point = %done.point, to = %done.to, %error, "nothing to hand over");
                self.dequeue(&done.point);
                Outcome::Gone
            }
            Err(error) if stopped => {
                ::metrics::counter!(metrics::RESHARD_STOPPED_MOVES).increment(1);
                tracing::info!(point = %done.point, to = %done.to, %error, "handover stopped");
                Outcome::Stopped
            }
            Err(error) => {
                ::metrics::counter!(metrics::RESHARD_FAILED_MOVES).increment(1);
                let retry = error.retry();
                tracing::warn!(point = %done.point, to = %done.to, %error, ?retry, "handover failed; it will be tried again");
                self.forget_peer_if_gone(&done.to, &error);
                Outcome::Failed(retry)
            }
        };
        self.planner.ended(&done.point, outcome, Instant::now());
    }

    /// Takes a point handed over (or gone) out of the planned moves.
    fn dequeue(&mut self, point: &PointId) {
        if let Some((_, queue)) = self.listing.as_mut().and_then(|l| l.moves.as_mut()) {
            queue.remove(point);
        }
    }

    /// After a failure that lost the connection to `to` (or whose replicator ended), the next
    /// move dials again.
    fn forget_peer_if_gone(&mut self, to: &str, error: &MoveError) {
        let gone = error.is_disconnected()
            || self
                .peers
                .get(to)
                .is_some_and(|peer| peer.changes.is_closed());
        if gone {
            self.peers.remove(to);
        }
    }

    /// The points this node holds in a handover, with their records (the handover index).
    async fn handovers(&self) -> Result<Handovers, ReadError> {
        Ok(self.context.store.handovers().await?.into_iter().collect())
    }

    /// [`handovers`](Self::handovers) under way only (not moved).
    async fn under_way(&self) -> Result<Handovers, ReadError> {
        Ok(self
            .context
            .store
            .handovers_under_way()
            .await?
            .into_iter()
            .collect())
    }

    /// Lists the points this node holds again, unless points came or went since the last
    /// listing and that listing is younger than [`RELIST_EVERY`] — or, with `exact`, unless
    /// points came or went since at all (before deciding that nothing is left to move).
    fn list(&mut self, exact: bool) {
        self.prune();
        let store = &self.context.store;
        let generation = store.generation();
        let fresh = self.listing.as_ref().is_some_and(|listing| {
            listing.generation == generation || (!exact && listing.at.elapsed() < RELIST_EVERY)
        });
        if !fresh {
            let started = Instant::now();
            let points = store.list("", None, usize::MAX);
            ::metrics::counter!(metrics::RESHARD_LISTINGS).increment(1);
            tracing::debug!(points = points.len(), took = ?started.elapsed(), "listed this node's points");
            self.listing = Some(match self.listing.take() {
                Some(last) => last.relisted(generation, started, points),
                None => Listing::new(generation, started, points),
            });
        }
    }

    /// The points held, by the last listing ([`list`](Self::list)); none before one.
    fn held(&self) -> Vec<PointId> {
        self.listing.as_ref().map(Listing::held).unwrap_or_default()
    }

    /// Notes the points removed since the last look in the listing, and takes their moves out.
    /// Events missed (too many at once, under writes) do not call for a new listing, which
    /// would plan every point again (a placement call each): a move of a point removed meanwhile
    /// finds it gone and leaves the queue ([`Mover::finished`]), and removals never add a point
    /// to move.
    fn prune(&mut self) {
        use tokio::sync::broadcast::error::TryRecvError;
        let mut removed = HashSet::new();
        loop {
            match self.removals.try_recv() {
                Ok(StoreEvent::Removed { point }) => {
                    removed.insert(point);
                }
                Ok(_) | Err(TryRecvError::Lagged(_)) => {}
                Err(TryRecvError::Empty | TryRecvError::Closed) => break,
            }
        }
        if let Some(listing) = &mut self.listing {
            listing.remove(removed);
        }
    }

    /// The moves of the points this node holds and may hand over (not handed over already, not
    /// arriving, by `handovers`), from their owner in `current` to their owner in `target`:
    /// planned once per listing, pair of rings and plugins, then taken a few at a time
    /// ([`Queue::next`]). With
    /// `concludes` (none left ends this node's part in the change), none left is only said
    /// from a listing of every point held now.
    async fn moves(
        &mut self,
        current: &Ring,
        target: &Ring,
        handovers: &Handovers,
        concludes: bool,
    ) -> Result<Vec<Move>, PlanError> {
        let moves = self.planned(current, target, handovers, false).await?;
        if !moves.is_empty() || !concludes {
            return Ok(moves);
        }
        self.planned(current, target, handovers, true).await
    }

    /// [`moves`](Self::moves) from the listing `list(exact)` leaves.
    async fn planned(
        &mut self,
        current: &Ring,
        target: &Ring,
        handovers: &Handovers,
        exact: bool,
    ) -> Result<Vec<Move>, PlanError> {
        self.list(exact);
        let generation = *self.context.services.plugins.reloads().borrow();
        let key = (current.version(), target.version(), generation);
        let to_plan = self
            .listing
            .as_ref()
            .and_then(|listing| listing.to_plan(key));
        if let Some(points) = to_plan {
            let moves = self.plan_moves(&points, current, target).await?;
            let listing = self.listing.as_mut().expect("listed above");
            listing.planned(key, &points, moves);
        }
        let (_, queue) = self
            .listing
            .as_mut()
            .and_then(|listing| listing.moves.as_mut())
            .expect("listed and planned above");
        Ok(queue.next(handovers, &self.planner, Instant::now()))
    }

    /// The moves of `points` from their owner in `current` to their owner in `target` (a call
    /// to the placement plugin for each, on the blocking pool), leaving out the points handed
    /// over already (moved, not cleaned up yet: read once per plan, not per tick; a tick reads
    /// the handovers under way only).
    async fn plan_moves(
        &self,
        points: &[PointId],
        current: &Ring,
        target: &Ring,
    ) -> Result<Vec<Move>, PlanError> {
        let moved: HashSet<PointId> = self
            .handovers()
            .await?
            .into_iter()
            .filter(|(_, handover)| !handover.is_under_way())
            .map(|(point, _)| point)
            .collect();
        let plugins = self.context.services.plugins.current();
        let (now, then) = (current.clone(), target.clone());
        let points: Vec<PointId> = points
            .iter()
            .filter(|point| !moved.contains(*point))
            .cloned()
            .collect();
        Ok(tokio::task::spawn_blocking(move || {
            reshard::plan(
                points,
                |point| crate::placement::owner_in(&plugins, &now, point.as_str()),
                |point| crate::placement::owner_in(&plugins, &then, point.as_str()),
            )
        })
        .await
        .map_err(|e| PlacementError::Task(e.to_string()))??)
    }

    /// The connection to `to`, dialed at most once per round: a member that cannot be reached
    /// is skipped for the rest of the round (each dial may wait out its timeout, and this loop
    /// drives every move).
    async fn peer_once(
        &mut self,
        membership: &Membership,
        to: &str,
        unreachable: &mut std::collections::BTreeSet<String>,
    ) -> Option<Rc<Peer>> {
        if unreachable.contains(to) {
            return None;
        }
        match self.peer(membership, to).await {
            Ok(peer) => Some(peer),
            Err(error) => {
                tracing::warn!(%to, %error, "cannot reach the member; retrying later");
                unreachable.insert(to.to_owned());
                None
            }
        }
    }

    /// The connection to `to`, dialed if there is none.
    async fn peer(&mut self, membership: &Membership, to: &str) -> Result<Rc<Peer>, LinkError> {
        if let Some(peer) = self.peers.get(to) {
            return Ok(peer.clone());
        }
        let address = membership
            .live(to)
            .map(|m| m.replication_addr.clone())
            .or_else(|| {
                membership
                    .ring
                    .members
                    .get(to)
                    .map(|m| m.replication_addr.clone())
            })
            .ok_or_else(|| LinkError::Unknown {
                peer: to.to_owned(),
            })?;
        let peer = Rc::new(
            Peer::connect(
                &self.context,
                to,
                &address,
                self.tls.as_ref(),
                &self.shutdown,
            )
            .await?,
        );
        self.peers.insert(to.to_owned(), peer.clone());
        Ok(peer)
    }
}
