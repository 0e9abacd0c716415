//! One replicator per follower session, and one per handover destination: it pushes what the
//! peer lacks, then every new append.
//!
//! The replicator keeps, per point, the leader's end, the next offset to send and what the
//! follower confirmed. It starts from the follower's offers (its real ends, checked by CRC), fills
//! a window of `replication.window` pushes in flight (each of about [`PUSH_BYTES`] on the wire,
//! in records of up to [`RECORD_BYTES`] of payload), and learns about new appends from the
//! store's broadcast; a lagging broadcast triggers a rescan instead of blocking anything. An
//! append's event lends its bytes: the replicator keeps them (up to [`LIVE_PER_FOLLOWER`]) and
//! sends them as they are, so a follower that keeps up is never served from a read-back. A reply
//! that says the follower ends elsewhere (mismatch) rewinds the point; a per-point generation
//! makes replies to pushes sent before the rewind harmless, and a number per copy of a point
//! (a point deleted and made again is a new copy) those sent for an earlier copy.
//!
//! What the bundler does cannot hurt the copy nor stall the session:
//! - bundling runs on the blocking pool, one call per push, never on the replication thread (a
//!   plugin blocks, and what it prints goes through WASI's synchronous streams);
//! - pushes are sized by their bytes on the wire, and the wire bytes in flight are bounded
//!   (`window` × [`PUSH_BYTES`], plus one record), whatever a bundler makes of a payload;
//! - each point has a [`Mode`]: a record the bundler failed on, or that the follower rejected,
//!   is sent again after a pause that doubles up to [`MAX_BACKOFF`]; a record whose bundle can
//!   never travel (over [`MAX_BUNDLE_BYTES`]) is refused once, counted and reported, and tried
//!   again only after the plugins are reloaded;
//! - every record carries its payload's length and CRC32C, which the follower checks on the
//!   unbundled bytes; an acknowledgement of another end than the one sent is a divergence: the
//!   follower's copy is cut back to the last end verified here and sent again from there.
//!
//! Commit marks (`docs/failover.md`): a follower serves its copy only up to its leader's
//! committed end. The replicator tells it each point's committed end as it moves, never past
//! what it confirmed: a point it confirmed more of than it was told stays *unsettled* and is
//! looked at again every [`MARK_INTERVAL`], and the marks due leave in one call at most that
//! often (a mark per move would cost a call per write per follower); and, as a
//! group's leader, it commits what the followers' confirmations now acknowledge (a write whose
//! acknowledgement timed out, or a long stream's bytes before its end).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use futures::future::LocalBoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Context;
use super::progress::Durability;
use super::replication_capnp::{ack, sink};
use crate::metrics;
use crate::point::ownership::FIRST_EPOCH;
use crate::point::{LeaderEpochs, LiveBytes, PointId, ReadError, Snapshot, StoreEvent};

mod bundling;
mod state;

use state::*;

/// Most payload bytes in one record: one read of the point, one bundler call.
pub(crate) const RECORD_BYTES: u64 = 1024 * 1024;
/// Bytes on the wire a push gathers before it leaves (records of several points may share it).
pub(crate) const PUSH_BYTES: u64 = 2 * 1024 * 1024;

/// Points whose bytes (or description) a replicator reads at once while it fills a push.
const READING: usize = 16;
/// Most bytes a bundle may take on the wire (a push must stay well within the 64 MiB a Cap'n
/// Proto reader accepts); a record whose bundle is larger is not sent.
pub(crate) const MAX_BUNDLE_BYTES: usize = 16 * 1024 * 1024;
/// Most bytes of live appends a replicator keeps for its follower; beyond, it reads them back.
pub(crate) const LIVE_PER_FOLLOWER: u64 = 16 * 1024 * 1024;
/// How often, at least, a follower's lag is reported to [`super::Progress`].
const LAG_REPORT: Duration = Duration::from_millis(250);

/// What a follower offered of one point: its end, the epoch of its copy, the CRC32C of its
/// bytes and the newest leader epoch of them (`None`: a follower of a protocol before 6, which
/// cannot cut a deposed leader's tail by epoch: a copy that diverged is replaced whole).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Held {
    pub end: u64,
    pub epoch: u64,
    pub crc: u32,
    pub leader_epoch: Option<u64>,
    /// The committed end it serves up to, as a leader told it (0 from a follower before the
    /// offer said it).
    pub committed: u64,
}

/// How a follower's copy, as offered, is continued at the start of a session.
enum Start {
    /// From its end: its bytes are this leader's.
    Continue,
    /// From 0: it diverged, or is of an older ownership epoch; it goes to quarantine.
    Replace,
    /// From `end`, where it agrees with this leader's copy if its CRC32C there is `crc`: the
    /// bytes after it are a deposed leader's tail, which the follower keeps in quarantine.
    Cut { end: u64, crc: u32 },
}

/// A change to the points a handover's replicator sends (`Replicator::handover`).
#[derive(Debug)]
pub(crate) enum ScopeChange {
    /// Send `point` from `held`, the end the new owner holds.
    Add { point: PointId, held: u64 },
    /// Stop sending `point` (its handover committed or was given up).
    Drop(PointId),
}

/// How a replicator ended.
#[derive(Debug)]
pub(crate) enum Ended {
    /// Its session ended (the follower dropped it, the connection went, the node stops), or its
    /// handover scope was closed.
    Stopped,
    /// A call to the peer failed: the session cannot go on.
    Failed(capnp::Error),
}

pub(crate) struct Replicator {
    context: Rc<Context>,
    follower: String,
    rpc_address: String,
    /// Whether the follower syncs before it confirms (a handover's peer: never counted).
    durability: Durability,
    sink: sink::Client,
    /// The epoch at which this node leads the follower's group, carried by every call (0 on a
    /// handover's replicator): a follower that knows a newer one refuses it.
    leader_epoch: u64,
    stop: CancellationToken,
    points: HashMap<PointId, PointState>,
    /// The copies of points tracked so far: each new one takes the next number.
    copies: u64,
    /// Points with something to send, round robin.
    dirty: VecDeque<PointId>,
    queued: HashSet<PointId>,
    /// Points in backoff, by when they are sent again (entries of points that left backoff
    /// meanwhile are skipped).
    retries: BinaryHeap<Reverse<(Instant, PointId)>>,
    /// Points whose description went out in this session (before their first record).
    described: HashSet<PointId>,
    /// Points the follower holds at a newer epoch than this leader: never sent nor removed.
    newer: HashSet<PointId>,
    in_flight: FuturesUnordered<LocalBoxFuture<'static, Outcome>>,
    /// Bytes on the wire of the pushes in flight.
    in_flight_bytes: u64,
    /// The plugins' generation the replicator last looked at (unsendable points wait for a new
    /// one).
    plugins_generation: u64,
    /// When the lag gauge was last computed (it sums over every point).
    gauges_at: Option<std::time::Instant>,
    /// Bytes of live appends held in `points`.
    live_bytes: u64,
    /// For a handover: the points it sends, changed by `changes`; `None` for a follower, which
    /// gets every point.
    scope: Option<HashSet<PointId>>,
    changes: Option<mpsc::Receiver<ScopeChange>>,
    /// For a throttled handover: bytes per second, and when the next push may leave.
    pace: Option<(u64, Instant)>,
    /// For a follower that takes commit marks (protocol 5); `None` for one that does not, and
    /// for a handover (its copies are committed as they arrive).
    marks: Option<Marks>,
}

/// Why a follower's copy is removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Removal {
    /// The point was deleted on this leader.
    Deleted,
    /// The copy holds bytes this leader does not: kept in the follower's quarantine.
    Diverged,
}

/// How often a follower's commit marks are sent, at most, and its unsettled points looked at.
const MARK_INTERVAL: Duration = Duration::from_millis(10);

/// The commit marks of one follower.
#[derive(Debug, Default)]
struct Marks {
    /// Per point, the committed end it was told last.
    told: HashMap<PointId, u64>,
    /// Per point, the committed end to tell it next.
    due: HashMap<PointId, u64>,
    /// The points it confirmed more of than it was told is committed.
    unsettled: HashSet<PointId>,
    /// When marks were last sent.
    sent_at: Option<Instant>,
}

impl Marks {
    /// Forgets what was told, and is due, of `point`'s copy.
    fn forget(&mut self, point: &PointId) {
        self.told.remove(point);
        self.due.remove(point);
        self.unsettled.remove(point);
    }

    /// When to look at the unsettled points and send the marks due next, if anything waits.
    fn next_at(&self) -> Option<Instant> {
        if self.due.is_empty() && self.unsettled.is_empty() {
            return None;
        }
        Some(
            self.sent_at
                .map_or_else(Instant::now, |at| at + MARK_INTERVAL),
        )
    }
}

impl Replicator {
    pub(crate) fn new(
        context: Rc<Context>,
        follower: String,
        rpc_address: String,
        durability: Durability,
        (sink, leader_epoch, marks): (sink::Client, u64, bool),
        stop: CancellationToken,
    ) -> Self {
        let plugins_generation = context.services.plugins.current().generation();
        Self {
            context,
            follower,
            rpc_address,
            durability,
            sink,
            leader_epoch,
            stop,
            points: HashMap::new(),
            copies: 0,
            dirty: VecDeque::new(),
            queued: HashSet::new(),
            retries: BinaryHeap::new(),
            described: HashSet::new(),
            newer: HashSet::new(),
            in_flight: FuturesUnordered::new(),
            in_flight_bytes: 0,
            plugins_generation,
            gauges_at: None,
            live_bytes: 0,
            scope: None,
            changes: None,
            pace: None,
            marks: marks.then(Marks::default),
        }
    }

    /// The replicator of the handovers from this node to `to` (`docs/resharding.md`): the
    /// same pushes, window, bounds and acknowledgements as a follower's, over only the points
    /// `changes` adds; what `to` confirmed goes to `context.progress`. It ends when `changes`
    /// closes, when `stop` is cancelled, or when `to`'s sink fails.
    pub(crate) fn handover(
        context: Rc<Context>,
        to: String,
        sink: sink::Client,
        stop: CancellationToken,
        changes: mpsc::Receiver<ScopeChange>,
    ) -> Self {
        let throttle = context.services.config.reshard.max_bytes_per_sec;
        let unsynced = Durability::Unsynced;
        let sink = (sink, 0, false);
        let mut replicator = Self::new(context, to, String::new(), unsynced, sink, stop);
        replicator.scope = Some(HashSet::new());
        replicator.changes = Some(changes);
        replicator.pace = (throttle > 0).then(|| (throttle, Instant::now()));
        replicator
    }

    /// Whether this replicator sends `point`.
    fn in_scope(&self, point: &PointId) -> bool {
        self.scope
            .as_ref()
            .is_none_or(|scope| scope.contains(point))
    }

    async fn change_scope(&mut self, change: ScopeChange) {
        let Some(scope) = &mut self.scope else {
            return;
        };
        match change {
            ScopeChange::Add { point, held } => {
                scope.insert(point.clone());
                let (end, crc) = match self.context.store.metadata(&point).await {
                    Ok(snapshot) => (snapshot.end, snapshot.crc),
                    Err(error) => {
                        // The handover waiting on it gives up by its own deadline.
                        tracing::warn!(to = %self.follower, %point, %error, "cannot hand this point over");
                        return;
                    }
                };
                self.described.remove(&point);
                self.forget(&point);
                let state = PointState {
                    copy: self.new_copy(),
                    end,
                    crc,
                    next: held.min(end),
                    confirmed: held,
                    ..PointState::default()
                };
                if held > end {
                    // The new owner holds more than this copy: its copy is not this one's.
                    self.send_remove(point.clone(), Removal::Diverged);
                }
                self.context.progress.confirm(&self.follower, &point, held);
                self.points.insert(point.clone(), state);
                self.mark(point);
            }
            ScopeChange::Drop(point) => {
                scope.remove(&point);
                self.forget(&point);
                self.context.progress.forget(&self.follower, &point);
            }
        }
    }

    /// The number of a copy of a point this replicator starts to track ([`PointState::copy`]).
    fn new_copy(&mut self) -> u64 {
        self.copies += 1;
        self.copies
    }

    /// The state of `point`, tracked from now on as a new copy if it was not tracked (its id
    /// is cloned only then: this runs at every append's event).
    fn state_of(&mut self, point: &PointId) -> &mut PointState {
        if !self.points.contains_key(point) {
            let state = PointState {
                copy: self.new_copy(),
                ..PointState::default()
            };
            self.points.insert(point.clone(), state);
        }
        self.points.get_mut(point).expect("tracked above")
    }

    /// Stops tracking `point`, releasing the live bytes kept for it.
    fn forget(&mut self, point: &PointId) {
        if let Some(old) = self.points.remove(point) {
            self.live_bytes -= old.live.iter().map(|b| b.len()).sum::<u64>();
        }
    }

    /// Replicates until the session ends; `offers` are what a follower holds (none for a
    /// handover).
    pub(crate) async fn run(mut self, offers: HashMap<String, Held>) -> Ended {
        // Subscribe before scanning: an append between the two is seen either way.
        let mut events = self.context.store.subscribe();
        self.context
            .progress
            .connected(&self.follower, &self.rpc_address, self.durability);
        // The scan reports the follower's lag (and the gauges) once it knows every point.
        self.scan(Some(offers)).await;
        let window = self.context.services.config.replication.window;
        let mut changes = self.changes.take();
        let mut reloads = self.context.services.plugins.reloads();
        // The lag is reported after replies (at most every 100 ms) and at least this often, so
        // that the last reply of a catch-up is reported too (the in-sync set waits on it).
        let mut reports = tokio::time::interval(LAG_REPORT);
        reports.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let ended = loop {
            if self.stop.is_cancelled() {
                break Ended::Stopped;
            }
            self.fill(window).await;
            let marks_at = self.marks.as_ref().and_then(Marks::next_at);
            let paced = self.paced_until();
            let retry = self.retries.peek().map(|Reverse((at, _))| *at);
            tokio::select! {
                _ = self.stop.cancelled() => break Ended::Stopped,
                _ = tokio::time::sleep_until(paced.unwrap_or_else(Instant::now)), if paced.is_some() => {}
                _ = tokio::time::sleep_until(retry.unwrap_or_else(Instant::now)), if retry.is_some() => {
                    self.retry_due();
                }
                _ = tokio::time::sleep_until(marks_at.unwrap_or_else(Instant::now)), if marks_at.is_some() => {
                    self.settle_marks();
                }
                // Unsendable points are tried again with the new plugins (in `fill`).
                Ok(()) = reloads.changed() => {}
                change = next_change(&mut changes) => match change {
                    Some(change) => self.change_scope(change).await,
                    None => break Ended::Stopped,
                },
                event = events.recv() => match event {
                    Ok(event) if !self.in_scope(event.point()) => {}
                    Ok(StoreEvent::Removed { point }) => self.removed(point),
                    Ok(StoreEvent::Owned { point }) => self.redescribe(point).await,
                    Ok(StoreEvent::Grew { point, end, crc, bytes }) => {
                        if let Some(bytes) = bytes {
                            self.lend(&point, bytes);
                        }
                        self.grew(point, end, crc);
                    }
                    Err(RecvError::Lagged(_)) => {
                        ::metrics::counter!(metrics::REPLICATION_RESCANS, "follower" => self.follower.clone()).increment(1);
                        self.scan(None).await;
                    }
                    Err(RecvError::Closed) => break Ended::Stopped,
                },
                Some(outcome) = self.in_flight.next() => {
                    if let Err(error) = self.handle(outcome) {
                        break Ended::Failed(error);
                    }
                }
                _ = reports.tick() => {
                    if self.gauges_at.is_none_or(|at| at.elapsed() >= LAG_REPORT) {
                        self.update_gauges();
                    }
                }
            }
        };
        self.context.progress.disconnected(&self.follower);
        self.update_gauges();
        ended
    }

    /// Reconciles with the store: with `offers` at the start of a session, `None` after the
    /// store's broadcast lagged.
    async fn scan(&mut self, offers: Option<HashMap<String, Held>>) {
        // One walk of the catalogue, not a point taken into use each (`Store::summaries`).
        let summaries = self.context.store.summaries().await;
        let present: HashSet<PointId> = summaries.iter().map(|held| held.id.clone()).collect();
        for summary in summaries {
            let id = summary.id;
            if !self.in_scope(&id) {
                continue;
            }
            let snapshot = summary.snapshot;
            let Some(offers) = &offers else {
                if self.made_again(&id, snapshot).await {
                    // Its removal was among the events missed: the follower's copy goes, and
                    // this one is sent from its start.
                    self.removed(id.clone());
                }
                self.grew(id.clone(), snapshot.end, snapshot.crc);
                self.tell_committed_at(&id, snapshot.committed);
                continue;
            };
            let epoch = summary.ownership.epoch;
            let offered = offers.get(id.as_str()).copied();
            let held = offered.map_or(0, |held| held.end);
            let mut state = PointState {
                copy: self.new_copy(),
                end: snapshot.end,
                crc: snapshot.crc,
                next: held,
                confirmed: held,
                ..PointState::default()
            };
            let start = match offered {
                Some(offered) if offered.epoch > epoch => {
                    // A newer owner's copy: this leader's is the stale one, and it never
                    // overwrites or removes what it has not written.
                    tracing::warn!(follower = %self.follower, point = %id, epoch, follower_epoch = offered.epoch, "the follower holds a newer epoch of this point; not replicating it");
                    ::metrics::counter!(metrics::REPLICATION_NEWER_COPIES).increment(1);
                    self.newer.insert(id);
                    continue;
                }
                Some(offered) if offered.epoch < epoch => {
                    tracing::warn!(follower = %self.follower, point = %id, epoch, follower_epoch = offered.epoch, "follower copy is of an older epoch; replacing it");
                    Start::Replace
                }
                Some(offered) if offered.end > 0 => {
                    let here = (snapshot, &summary.leader_epochs);
                    match self.start_from(&id, offered, here).await {
                        Ok(start) => start,
                        Err(ReadError::NotFound(_)) => continue,
                        Err(error) => {
                            tracing::error!(follower = %self.follower, point = %id, %error, "cannot check the follower's copy; not replicating it in this session");
                            continue;
                        }
                    }
                }
                _ => Start::Continue,
            };
            match start {
                Start::Continue => {
                    self.context.progress.confirm(&self.follower, &id, held);
                    let committed = offered.map_or(0, |held| held.committed.min(held.end));
                    self.told_already(&id, committed);
                }
                Start::Replace => {
                    state.next = 0;
                    state.confirmed = 0;
                    self.send_remove(id.clone(), Removal::Diverged);
                }
                Start::Cut { end, crc } => {
                    // Confirmed once the follower answers where its checked copy ends.
                    state.next = end;
                    state.confirmed = 0;
                    self.send_truncate(id.clone(), state.copy, end, Some(crc));
                }
            }
            self.points.insert(id.clone(), state);
            self.commit_confirmed(&id);
            // From the walk: asking the store for each of a million points costs a read each.
            // A commit just made by `commit_confirmed` is told when the marks settle.
            self.tell_committed_at(&id, snapshot.committed);
            self.mark(id);
        }
        let stale: Vec<PointId> = match &offers {
            // Points the follower holds that the leader does not (deleted while it was away).
            Some(offers) => offers
                .keys()
                .filter_map(|p| PointId::new(p.as_str()).ok())
                .filter(|id| !present.contains(id))
                .collect(),
            None => self
                .points
                .keys()
                .filter(|id| !present.contains(*id))
                .cloned()
                .collect(),
        };
        for id in stale {
            self.removed(id);
        }
        self.update_gauges();
    }

    /// How the follower's copy of `point` as `offered` (of this copy's ownership epoch, with
    /// bytes) is continued: from its end if its bytes are this copy's; cut back to where this
    /// copy's first leader epoch newer than its bytes began, if it holds more than that (a
    /// deposed leader's tail, `docs/failover.md`); else, if its bytes differ, replaced.
    async fn start_from(
        &self,
        point: &PointId,
        offered: Held,
        (snapshot, leader_epochs): (Snapshot, &LeaderEpochs),
    ) -> Result<Start, ReadError> {
        let store = &self.context.store;
        if let Some(newest) = offered.leader_epoch {
            let agree = leader_epochs.end_of(newest, snapshot.end);
            if offered.end > agree {
                let crc = store.crc_at(point, agree).await?;
                tracing::warn!(follower = %self.follower, %point, offered = offered.end, end = snapshot.end, cut = agree, follower_leader_epoch = newest, "the follower's copy holds a deposed leader's tail; cutting it back to where a newer leader epoch began");
                return Ok(Start::Cut { end: agree, crc });
            }
        } else if offered.end > snapshot.end {
            tracing::warn!(follower = %self.follower, %point, offered = offered.end, end = snapshot.end, "follower copy diverged; replacing it");
            return Ok(Start::Replace);
        }
        let here = match offered.end == snapshot.end {
            true => snapshot.crc,
            false => store.crc_at(point, offered.end).await?,
        };
        if here == offered.crc {
            return Ok(Start::Continue);
        }
        tracing::error!(follower = %self.follower, %point, end = offered.end, crc = format_args!("{here:08x}"), follower_crc = format_args!("{:08x}", offered.crc), "the follower's copy has other bytes than this leader's at the same length; replacing it");
        self.diverged(point, offered.end, "offer");
        Ok(Start::Replace)
    }

    /// Makes a commit mark of `point` due if its committed end moved past what the follower
    /// was told, up to what it confirmed (so a mark names bytes its copy holds).
    fn tell_committed(&mut self, point: &PointId) {
        let committed = self.context.store.committed(point);
        self.tell_committed_at(point, committed);
    }

    /// [`tell_committed`](Self::tell_committed), `point` being committed up to `committed`.
    fn tell_committed_at(&mut self, point: &PointId, committed: u64) {
        let (Some(marks), Some(state)) = (&mut self.marks, self.points.get(point)) else {
            return;
        };
        let mark = committed.min(state.confirmed);
        if mark > marks.told.get(point).copied().unwrap_or(0) {
            marks.due.insert(point.clone(), mark);
        }
        if mark < state.confirmed {
            marks.unsettled.insert(point.clone());
        } else {
            marks.unsettled.remove(point);
        }
    }

    /// The follower serves its copy of `point` up to `committed` already (it said so in its
    /// offer): a mark is due only past it. A follower restarted with a million points is not
    /// told a million marks again.
    fn told_already(&mut self, point: &PointId, committed: u64) {
        if let Some(marks) = &mut self.marks
            && committed > 0
        {
            marks.told.insert(point.clone(), committed);
        }
    }

    /// Looks at the unsettled points again, and sends the marks due.
    fn settle_marks(&mut self) {
        let Some(marks) = &self.marks else {
            return;
        };
        let unsettled: Vec<PointId> = marks.unsettled.iter().cloned().collect();
        for point in &unsettled {
            self.tell_committed(point);
        }
        self.send_marks();
    }

    /// Counts a divergence of the follower's copy of `point` found by `found` (an offer, an
    /// acknowledgement) in a byte before `before`, and reports it loudly when that is within
    /// this leader's committed end: a replica held other bytes than consumers may have been
    /// served (it is out of the in-sync set until it holds this leader's copy again).
    fn diverged(&self, point: &PointId, before: u64, found: &'static str) {
        let committed = self.context.store.committed(point);
        let within = before <= committed;
        let place = if within { "within" } else { "not_within" };
        ::metrics::counter!(metrics::REPLICATION_DIVERGENCES, "found" => found, "committed" => place)
            .increment(1);
        if within {
            tracing::error!(follower = %self.follower, %point, committed, before, "DIVERGENCE WITHIN THE COMMITTED END: the follower's copy differs from this leader's in bytes this leader had committed (acknowledged, served to consumers); its copy is replaced, and it stays out of the in-sync set until it holds this leader's");
        }
    }

    /// Keeps `call` in flight, to notice it if it fails (a description, commit marks: calls
    /// with nothing to read back).
    fn answered<T: 'static>(
        &mut self,
        call: impl std::future::Future<Output = Result<T, capnp::Error>> + 'static,
    ) {
        let answered = call.map(|reply| Outcome::Answered {
            reply: reply.map(|_| ()),
        });
        self.in_flight.push(answered.boxed_local());
    }

    /// Sends the commit marks due, in one call.
    fn send_marks(&mut self) {
        let Some(marks) = self.marks.as_mut() else {
            return;
        };
        marks.sent_at = Some(Instant::now());
        if marks.due.is_empty() {
            return;
        }
        ::metrics::counter!(metrics::REPLICATION_COMMIT_MARKS, "follower" => self.follower.clone())
            .increment(marks.due.len() as u64);
        let mut request = self.sink.commit_request();
        request.get().set_leader_epoch(self.leader_epoch);
        let mut list = request.get().init_marks(marks.due.len() as u32);
        for (i, (point, end)) in marks.due.drain().enumerate() {
            let mut mark = list.reborrow().get(i as u32);
            mark.set_point(point.as_str());
            mark.set_end(end);
            marks.told.insert(point, end);
        }
        self.answered(request.send().promise);
    }

    /// As the leader of a group that acknowledges by followers: commits `point` as far as what
    /// the followers confirmed acknowledges it (`Progress::committable`).
    fn commit_confirmed(&self, point: &PointId) {
        if self.scope.is_some() {
            return;
        }
        let context = &self.context;
        let (config, topology) = (&context.services.config, context.topology.borrow());
        super::commit_acknowledged(
            (&context.store, &context.progress),
            (&config.replication.ack, &config.node_name, &topology),
            [point],
        );
    }

    /// `point` grew to `end`, its bytes up to there having the CRC32C `crc`.
    fn grew(&mut self, point: PointId, end: u64, crc: u32) {
        let state = self.state_of(&point);
        if end > state.end {
            state.end = end;
            state.crc = crc;
            self.mark(point);
        }
    }

    /// After missed store events: whether `point`, as the store holds it now (`snapshot`), is
    /// another copy than the one tracked, deleted and made again meanwhile. A point only grows,
    /// so it is the same copy if it ends at or past the tracked end with the same bytes there
    /// (one read, only for a point that grew while the events were missed).
    async fn made_again(&self, point: &PointId, snapshot: Snapshot) -> bool {
        let Some(state) = self.points.get(point) else {
            return false;
        };
        if snapshot.end < state.end {
            return true;
        }
        if snapshot.end == state.end {
            return snapshot.crc != state.crc;
        }
        match self.context.store.crc_at(point, state.end).await {
            Ok(crc) => crc != state.crc,
            // Deleted since the walk: its removal is among the events to come.
            Err(error) => {
                tracing::debug!(follower = %self.follower, %point, %error, "cannot compare the point with the copy tracked");
                false
            }
        }
    }

    /// Keeps the bytes of a live append of `point` to send them as they are, if they are not
    /// sent yet and the follower's share of memory allows.
    fn lend(&mut self, point: &PointId, bytes: Arc<LiveBytes>) {
        let fits = self.live_bytes + bytes.len() <= LIVE_PER_FOLLOWER;
        let state = self.state_of(point);
        let after_last = state
            .live
            .back()
            .is_none_or(|last| last.end() <= bytes.start);
        if fits && after_last && bytes.end() > state.next {
            let len = bytes.len();
            state.live.push_back(bytes);
            self.live_bytes += len;
        }
    }

    fn removed(&mut self, point: PointId) {
        if self.newer.contains(&point) {
            return;
        }
        self.forget(&point);
        self.described.remove(&point);
        self.send_remove(point, Removal::Deleted);
    }

    /// Sends the point's content type and epoch, when it has a content type or an epoch past
    /// the first, before its first record in this session.
    async fn describe(&mut self, point: &PointId) -> Result<(), ReadError> {
        if self.described.contains(point) {
            return Ok(());
        }
        let description = self.description(point).await?;
        self.send_description(point, description);
        Ok(())
    }

    /// What [`Replicator::describe`] sends of `point`: its content type, epoch and leader
    /// epochs, read without changing anything.
    async fn description(&self, point: &PointId) -> Result<Description, ReadError> {
        let store = &self.context.store;
        let described = async {
            Ok::<_, ReadError>(Description {
                content_type: store.content_type(point).await?,
                epoch: store.ownership(point).await?.epoch,
                leader_epochs: store.leader_epochs(point).await?,
            })
        };
        match described.await {
            Ok(described) => Ok(described),
            // Deleted meanwhile: the removal event follows.
            Err(ReadError::NotFound(_)) => Ok(Description {
                content_type: None,
                epoch: FIRST_EPOCH,
                leader_epochs: LeaderEpochs::default(),
            }),
            Err(error) => Err(error),
        }
    }

    /// Sends `point`'s description, unless it says nothing past the defaults; either way the
    /// point counts as described in this session.
    fn send_description(&mut self, point: &PointId, description: Description) {
        let Description {
            content_type,
            epoch,
            leader_epochs,
        } = description;
        self.described.insert(point.clone());
        if content_type.is_none() && epoch == FIRST_EPOCH && leader_epochs.is_empty() {
            return;
        }
        let mut request = self.sink.describe_request();
        request.get().set_point(point.as_str());
        request
            .get()
            .set_content_type(content_type.as_deref().unwrap_or_default());
        request.get().set_epoch(epoch);
        request.get().set_leader_epoch(self.leader_epoch);
        let starts = leader_epochs.starts();
        let mut list = request.get().init_leader_epochs(starts.len() as u32);
        for (i, start) in starts.iter().enumerate() {
            let mut entry = list.reborrow().get(i as u32);
            entry.set_epoch(start.epoch);
            entry.set_start(start.start);
        }
        // Sent now: calls leave in the order they are made, so it precedes the first push.
        self.answered(request.send().promise);
    }

    /// The point's ownership record or leader epochs changed: its description goes again, now
    /// if the follower has had one already, else before its first record.
    async fn redescribe(&mut self, point: PointId) {
        if self.newer.contains(&point) || !self.described.remove(&point) {
            return;
        }
        if let Err(error) = self.describe(&point).await {
            tracing::warn!(follower = %self.follower, %point, %error, "cannot describe the point again");
            self.back_off(&point);
        }
    }

    /// Queues `point` to be sent from, unless it waits (backoff, unsendable) or is not sent at
    /// all (newer).
    fn mark(&mut self, point: PointId) {
        let sending = self
            .points
            .get(&point)
            .is_none_or(|state| state.mode == Mode::Sending);
        if sending && !self.newer.contains(&point) && self.queued.insert(point.clone()) {
            self.dirty.push_back(point);
        }
    }

    /// A record of `point` failed: it is sent again after a pause that doubles with each failure
    /// in a row.
    fn back_off(&mut self, point: &PointId) {
        let Some(state) = self.points.get_mut(point) else {
            return;
        };
        state.failures = state.failures.saturating_add(1);
        let delay = FIRST_BACKOFF
            .saturating_mul(1 << state.failures.min(16).saturating_sub(1))
            .min(MAX_BACKOFF);
        let until = Instant::now() + delay;
        state.mode = Mode::Backoff { until };
        self.retries.push(Reverse((until, point.clone())));
    }

    /// Points whose pause is over are sent again.
    fn retry_due(&mut self) {
        let now = Instant::now();
        while let Some(Reverse((at, _))) = self.retries.peek()
            && *at <= now
        {
            let Reverse((_, point)) = self.retries.pop().expect("peeked");
            let Some(state) = self.points.get_mut(&point) else {
                continue;
            };
            if matches!(state.mode, Mode::Backoff { until } if until <= now) {
                state.mode = Mode::Sending;
                self.mark(point);
            }
        }
    }

    /// After a reload of the plugins, points whose records could not travel are tried again.
    fn retry_unsendable(&mut self) {
        let generation = self.context.services.plugins.current().generation();
        if generation == self.plugins_generation {
            return;
        }
        self.plugins_generation = generation;
        let waiting: Vec<PointId> = self
            .points
            .iter_mut()
            .filter(|(_, state)| matches!(state.mode, Mode::Unsendable { .. }))
            .map(|(point, state)| {
                state.mode = Mode::Sending;
                state.failures = 0;
                point.clone()
            })
            .collect();
        for point in waiting {
            self.mark(point);
        }
    }

    fn send_remove(&mut self, point: PointId, removal: Removal) {
        // The copy's committed ends go with it: a mark waiting for the old copy is not sent
        // after the removal, and the next copy, told from nothing, gets its end told even if
        // it is below the old one's. Calls leave in order, so the marks sent from now on reach
        // the follower after the removal.
        if let Some(marks) = &mut self.marks {
            marks.forget(&point);
        }
        let mut request = self.sink.remove_request();
        request.get().set_point(point.as_str());
        request.get().set_leader_epoch(self.leader_epoch);
        request.get().set_diverged(removal == Removal::Diverged);
        // Sent now, not when the future is first polled: calls leave in the order they are made.
        let promise = request.send().promise;
        self.in_flight.push(
            async move {
                let reply = promise.await.map(|_| ());
                Outcome::Removed { point, reply }
            }
            .boxed_local(),
        );
    }

    /// Has the follower cut its copy of `point` back to at most `end`; with `diverged`, the
    /// CRC32C of this copy's `[0, end)`: the bytes after it are a deposed leader's tail, and
    /// the follower checks its copy agrees up to there (`Start::Cut`).
    fn send_truncate(&mut self, point: PointId, copy: u64, end: u64, diverged: Option<u32>) {
        let mut request = self.sink.truncate_request();
        request.get().set_point(point.as_str());
        request.get().set_end(end);
        request.get().set_leader_epoch(self.leader_epoch);
        if let Some(crc) = diverged {
            request.get().set_diverged(true);
            request.get().set_crc(crc);
        }
        let checked = diverged.is_some();
        let promise = request.send().promise;
        self.in_flight.push(
            async move {
                let reply = promise
                    .await
                    .and_then(|response| Ok(response.get()?.get_end()));
                Outcome::Truncated {
                    point,
                    copy,
                    reply,
                    checked,
                }
            }
            .boxed_local(),
        );
    }

    // Bundling and pacing: bundling.rs.
    /// Sends `records` (`wire` bytes) as one push (now: calls leave in the order they are
    /// made, and the follower applies records of a point in arrival order).
    fn send(&mut self, records: Vec<Prepared>, wire: u64) {
        let mut request = self.sink.push_request();
        request.get().set_leader_epoch(self.leader_epoch);
        {
            let mut list = request.get().init_records(records.len() as u32);
            for (i, record) in records.iter().enumerate() {
                let mut entry = list.reborrow().get(i as u32);
                entry.set_point(record.sent.point.as_str());
                entry.set_start(record.sent.start);
                entry.set_payload_len(record.sent.len);
                entry.set_payload_crc(record.crc);
                record.write(entry.init_bundle(record.wire_len() as u32));
            }
        }
        let promise = request.send().promise;
        self.in_flight_bytes += wire;
        self.spend(wire);
        let sent: Vec<Sent> = records.into_iter().map(|r| r.sent).collect();
        self.in_flight.push(
            async move {
                let reply = promise.await.and_then(|response| {
                    let mut replies = Vec::new();
                    for ack in response.get()?.get_acks()? {
                        let reply = match ack.get_result().which()? {
                            ack::result::Applied(()) => Reply::Applied,
                            ack::result::Mismatch(()) => Reply::Mismatch,
                            ack::result::Rejected(reason) => {
                                Reply::Rejected(reason?.to_string().unwrap_or_default())
                            }
                        };
                        replies.push((ack.get_end(), reply));
                    }
                    Ok(replies)
                });
                Outcome::Pushed { sent, wire, reply }
            }
            .boxed_local(),
        );
    }

    /// Applies a reply. An RPC error means the session is over.
    fn handle(&mut self, outcome: Outcome) -> Result<(), capnp::Error> {
        match outcome {
            Outcome::Answered { reply } => reply?,
            Outcome::Removed { point, reply } => {
                reply?;
                self.context.progress.forget(&self.follower, &point);
                if self.points.contains_key(&point) {
                    // A diverged copy was removed: send the point again from 0.
                    self.mark(point);
                }
            }
            Outcome::Truncated {
                point,
                copy,
                reply,
                checked,
            } => {
                let end = reply?;
                self.cut(point, copy, end, checked);
            }
            Outcome::Pushed { sent, wire, reply } => {
                self.in_flight_bytes -= wire;
                let replies = reply?;
                if replies.len() != sent.len() {
                    return Err(capnp::Error::failed(format!(
                        "the follower answered {} of {} records",
                        replies.len(),
                        sent.len()
                    )));
                }
                for (sent, (end, reply)) in sent.into_iter().zip(replies) {
                    self.acknowledged(sent, end, reply);
                }
                if self
                    .gauges_at
                    .is_none_or(|at| at.elapsed() > Duration::from_millis(100))
                {
                    self.update_gauges();
                }
            }
        }
        Ok(())
    }

    /// What the follower answered for one record.
    fn acknowledged(&mut self, sent: Sent, end: u64, reply: Reply) {
        let Some(state) = self.points.get_mut(&sent.point) else {
            return;
        };
        let point = sent.point.clone();
        match state.replied(&sent, end, &reply) {
            AfterReply::Nothing => {}
            AfterReply::Confirmed => {
                ::metrics::counter!(metrics::REPLICATED_BYTES, "direction" => "sent")
                    .increment(sent.len);
            }
            AfterReply::Truncate(verified) => {
                tracing::error!(follower = %self.follower, %point, start = sent.start, len = sent.len, end, verified, "the follower acknowledged another end than the one sent: its copy diverged; cutting it back to the last verified end");
                self.diverged(&point, verified + 1, "ack");
                self.send_truncate(point.clone(), sent.copy, verified, None);
                self.mark(point.clone());
            }
            AfterReply::Resend => {
                tracing::debug!(follower = %self.follower, %point, start = sent.start, end, "follower ends elsewhere; continuing from its end");
                self.mark(point.clone());
            }
            AfterReply::Replace => {
                tracing::warn!(follower = %self.follower, %point, end, "the follower holds more of the point than this leader; replacing its copy");
                self.send_remove(point.clone(), Removal::Diverged);
                self.mark(point.clone());
            }
            AfterReply::BackOff => {
                if let Reply::Rejected(reason) = &reply {
                    tracing::warn!(follower = %self.follower, %point, start = sent.start, %reason, "record rejected; sending it again after a pause");
                }
                ::metrics::counter!(metrics::REPLICATION_REJECTED).increment(1);
                self.back_off(&point);
            }
        }
        if let Some(state) = self.points.get(&point) {
            self.context
                .progress
                .confirm(&self.follower, &point, state.confirmed);
            self.commit_confirmed(&point);
            // Bytes committed before the follower confirmed them.
            self.tell_committed(&point);
        }
    }

    /// The follower cut its copy `copy` of `point` back to `end` (after a divergence): continue
    /// from there if that is before where this replicator is. `checked`: it was checked to
    /// agree with this copy up to there (a deposed leader's tail cut), so it is confirmed.
    fn cut(&mut self, point: PointId, copy: u64, end: u64, checked: bool) {
        let Some(state) = self
            .points
            .get_mut(&point)
            .filter(|state| state.copy == copy)
        else {
            // The point was deleted, or is another copy now: the cut says nothing of it.
            return;
        };
        if end < state.next {
            state.generation += 1;
            state.next = end;
        }
        state.confirmed = match checked {
            true => end,
            false => end.min(state.confirmed),
        };
        self.context
            .progress
            .confirm(&self.follower, &point, state.confirmed);
        self.commit_confirmed(&point);
        self.tell_committed(&point);
        self.mark(point);
    }

    fn update_gauges(&mut self) {
        self.gauges_at = Some(std::time::Instant::now());
        if self.scope.is_some() {
            // A handover's lag is its own metric (`reshard`).
            return;
        }
        let lag: u64 = self
            .points
            .values()
            .map(|s| s.end.saturating_sub(s.confirmed))
            .sum();
        ::metrics::gauge!(metrics::REPLICATION_LAG_BYTES, "follower" => self.follower.clone())
            .set(lag as f64);
        let max_lag = self
            .context
            .services
            .config
            .replication
            .in_sync_max_lag_bytes;
        let now = std::time::Instant::now();
        self.context.progress.lag(&self.follower, lag, max_lag, now);
        ::metrics::gauge!(metrics::FOLLOWERS).set(self.context.progress.followers().len() as f64);
    }
}

/// The next change of a handover's scope; never, for a follower's replicator.
async fn next_change(changes: &mut Option<mpsc::Receiver<ScopeChange>>) -> Option<ScopeChange> {
    match changes {
        Some(changes) => changes.recv().await,
        None => std::future::pending().await,
    }
}

/// Runs a replicator's future and reports how it ended: a panic is caught, logged and counted
/// (`goutube_replication_task_failures_total`) instead of leaving its session connected to
/// nobody; `None` then.
pub(crate) async fn supervised(
    to: &str,
    run: impl std::future::Future<Output = Ended>,
) -> Option<Ended> {
    match std::panic::AssertUnwindSafe(run).catch_unwind().await {
        Ok(ended) => Some(ended),
        Err(panic) => {
            let panic = crate::service::panic_message(panic);
            tracing::error!(%to, %panic, "a replicator panicked; its session is closed so that it starts again");
            ::metrics::counter!(metrics::REPLICATION_TASK_FAILURES, "task" => "replicator")
                .increment(1);
            None
        }
    }
}
