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
//! makes replies to pushes sent before the rewind harmless.
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
use super::replication_capnp::{ack, sink};
use crate::metrics;
use crate::plugins::{Buffer, PluginError, PluginSet, bundles};
use crate::point::ownership::FIRST_EPOCH;
use crate::point::{LiveBytes, PointId, ReadError, StoreEvent};

/// Most payload bytes in one record: one read of the point, one bundler call.
pub const RECORD_BYTES: u64 = 1024 * 1024;
/// Bytes on the wire a push gathers before it leaves (records of several points may share it).
pub const PUSH_BYTES: u64 = 2 * 1024 * 1024;
/// Most bytes a bundle may take on the wire (a push must stay well within the 64 MiB a Cap'n
/// Proto reader accepts); a record whose bundle is larger is not sent.
pub const MAX_BUNDLE_BYTES: usize = 16 * 1024 * 1024;
/// Most bytes of live appends a replicator keeps for its follower; beyond, it reads them back.
pub const LIVE_PER_FOLLOWER: u64 = 16 * 1024 * 1024;
/// The first pause after a record failed; each failure in a row doubles it.
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
/// The longest pause after failures.
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// What the replicator does with one point.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Mode {
    /// Sends what the follower lacks.
    #[default]
    Sending,
    /// A record failed (the bundler failed on it, or the follower rejected it): sent again at
    /// `until`.
    Backoff { until: Instant },
    /// A record's bundle is too large to travel: sent again once the plugins are reloaded
    /// (their generation is no longer `generation`).
    Unsendable { generation: u64 },
}

/// Replication state of one point towards one follower.
#[derive(Debug, Default)]
struct PointState {
    /// The leader's end.
    end: u64,
    /// The next offset to send.
    next: u64,
    /// What the follower confirmed.
    confirmed: u64,
    /// Incremented at every rewind; replies to older pushes are ignored.
    generation: u64,
    /// Bytes of live appends not sent yet, in offset order.
    live: VecDeque<Arc<LiveBytes>>,
    mode: Mode,
    /// Records of it that failed in a row (the pause doubles with each).
    failures: u32,
}

/// What the replicator does after a reply to one record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AfterReply {
    /// A reply to a push sent before the last rewind: already handled.
    Nothing,
    /// Applied where it was sent: the follower confirmed more.
    Confirmed,
    /// The follower ends elsewhere: send from its end.
    Resend,
    /// The follower holds more than this leader: remove its copy, send from 0.
    Replace,
    /// The follower acknowledged another end than the one sent: its copy diverged; cut it
    /// back to this verified end and send from there.
    Truncate(u64),
    /// The follower rejected the record: send it again after a pause.
    BackOff,
}

impl PointState {
    /// Takes in the follower's answer to `sent`: it now ends at `end`. A pure decision; the
    /// replicator performs what it returns.
    fn replied(&mut self, sent: &Sent, end: u64, reply: &Reply) -> AfterReply {
        let current = sent.generation == self.generation;
        match reply {
            Reply::Applied if end == sent.start + sent.len => {
                self.confirmed = self.confirmed.max(end);
                self.failures = 0;
                AfterReply::Confirmed
            }
            // Never progress: the follower holds bytes this leader did not send.
            Reply::Applied if current => {
                let verified = self.confirmed.min(sent.start);
                self.generation += 1;
                self.confirmed = verified;
                self.next = verified;
                AfterReply::Truncate(verified)
            }
            Reply::Mismatch if current => {
                self.generation += 1;
                if end > self.end {
                    self.next = 0;
                    self.confirmed = 0;
                    return AfterReply::Replace;
                }
                self.confirmed = end;
                self.next = end;
                AfterReply::Resend
            }
            Reply::Rejected(_) if current => {
                self.generation += 1;
                self.next = self.next.min(sent.start);
                AfterReply::BackOff
            }
            Reply::Applied | Reply::Mismatch | Reply::Rejected(_) => AfterReply::Nothing,
        }
    }
}

/// One record of a push: what was sent.
#[derive(Debug, Clone)]
struct Sent {
    point: PointId,
    start: u64,
    len: u64,
    generation: u64,
}

/// A record read, not bundled yet.
struct Pending {
    sent: Sent,
    payload: Buffer,
}

/// A record ready to go: its bundle around its payload, and the payload's CRC32C.
struct Prepared {
    sent: Sent,
    payload: Buffer,
    bundled: bundles::Bundled,
    crc: u32,
}

/// Why a record read was not sent.
#[derive(Debug, thiserror::Error)]
enum NotSent {
    #[error(transparent)]
    Bundler(#[from] PluginError),
    #[error(
        "its bundle would take {wire} bytes on the wire, more than the {MAX_BUNDLE_BYTES} a record may"
    )]
    TooLarge { wire: usize },
}

impl Prepared {
    /// Bytes on the wire: head, body, tail.
    fn wire_len(&self) -> usize {
        wire_len(&self.bundled, &self.payload)
    }

    /// Writes the bundle into `out` (exactly [`wire_len`](Self::wire_len) bytes).
    fn write(&self, out: &mut [u8]) {
        let mut at = 0;
        let mut put = |bytes: &[u8]| {
            out[at..at + bytes.len()].copy_from_slice(bytes);
            at += bytes.len();
        };
        put(&self.bundled.head);
        match &self.bundled.body {
            bundles::Body::Payload => self.payload.pieces().iter().for_each(|p| put(p)),
            bundles::Body::Replaced(bytes) => put(bytes),
        }
        put(&self.bundled.tail);
    }
}

fn wire_len(bundled: &bundles::Bundled, payload: &Buffer) -> usize {
    let body = match &bundled.body {
        bundles::Body::Payload => payload.len() as usize,
        bundles::Body::Replaced(bytes) => bytes.len(),
    };
    bundled.head.len() + body + bundled.tail.len()
}

/// A push, remove, description or cut in flight, and what came back.
enum Outcome {
    Pushed {
        sent: Vec<Sent>,
        /// Its bytes on the wire (counted against the bound of bytes in flight).
        wire: u64,
        reply: Result<Vec<(u64, Reply)>, capnp::Error>,
    },
    Removed {
        point: PointId,
        reply: Result<(), capnp::Error>,
    },
    Described {
        reply: Result<(), capnp::Error>,
    },
    Truncated {
        point: PointId,
        reply: Result<u64, capnp::Error>,
    },
}

enum Reply {
    Applied,
    Mismatch,
    Rejected(String),
}

/// What a follower offered of one point: its end, the epoch of its copy and the CRC32C of its
/// bytes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Held {
    pub end: u64,
    pub epoch: u64,
    pub crc: u32,
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
    sink: sink::Client,
    stop: CancellationToken,
    points: HashMap<PointId, PointState>,
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
}

impl Replicator {
    pub(crate) fn new(
        context: Rc<Context>,
        follower: String,
        rpc_address: String,
        sink: sink::Client,
        stop: CancellationToken,
    ) -> Self {
        let plugins_generation = context.plugins.current().generation();
        Self {
            context,
            follower,
            rpc_address,
            sink,
            stop,
            points: HashMap::new(),
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
        let throttle = context.config.reshard.max_bytes_per_sec;
        let mut replicator = Self::new(context, to, String::new(), sink, stop);
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
                let end = match self.context.store.metadata(&point).await {
                    Ok(snapshot) => snapshot.end,
                    Err(error) => {
                        // The handover waiting on it gives up by its own deadline.
                        tracing::warn!(to = %self.follower, %point, %error, "cannot hand this point over");
                        return;
                    }
                };
                self.described.remove(&point);
                self.forget(&point);
                let state = PointState {
                    end,
                    next: held.min(end),
                    confirmed: held,
                    ..PointState::default()
                };
                if held > end {
                    // The new owner holds more than this copy: its copy is not this one's.
                    self.send_remove(point.clone());
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
            .connected(&self.follower, &self.rpc_address);
        self.update_gauges();
        self.scan(Some(offers)).await;
        let window = self.context.config.replication.window;
        let mut changes = self.changes.take();
        let mut reloads = self.context.plugins.reloads();
        let ended = loop {
            if self.stop.is_cancelled() {
                break Ended::Stopped;
            }
            self.fill(window).await;
            let paced = self.paced_until();
            let retry = self.retries.peek().map(|Reverse((at, _))| *at);
            tokio::select! {
                _ = self.stop.cancelled() => break Ended::Stopped,
                _ = tokio::time::sleep_until(paced.unwrap_or_else(Instant::now)), if paced.is_some() => {}
                _ = tokio::time::sleep_until(retry.unwrap_or_else(Instant::now)), if retry.is_some() => {
                    self.retry_due();
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
                    Ok(StoreEvent::Grew { point, end, bytes }) => {
                        if let Some(bytes) = bytes {
                            self.lend(&point, bytes);
                        }
                        self.grew(point, end);
                    }
                    Err(RecvError::Lagged(_)) => self.scan(None).await,
                    Err(RecvError::Closed) => break Ended::Stopped,
                },
                Some(outcome) = self.in_flight.next() => {
                    if let Err(error) = self.handle(outcome) {
                        break Ended::Failed(error);
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
        let store = self.context.store.clone();
        let ids = store.list("", None, usize::MAX);
        let present: HashSet<PointId> = ids.iter().cloned().collect();
        for id in ids {
            if !self.in_scope(&id) {
                continue;
            }
            let Ok(snapshot) = store.metadata(&id).await else {
                continue;
            };
            let Some(offers) = &offers else {
                self.grew(id, snapshot.end);
                continue;
            };
            let epoch = match store.ownership(&id).await {
                Ok(ownership) => ownership.epoch,
                // Deleted meanwhile: the removal event follows.
                Err(ReadError::NotFound(_)) => continue,
                Err(error) => {
                    tracing::error!(follower = %self.follower, point = %id, %error, "cannot read the point's epoch; not replicating it in this session");
                    continue;
                }
            };
            let offered = offers.get(id.as_str()).copied();
            let held = offered.map_or(0, |held| held.end);
            let mut state = PointState {
                end: snapshot.end,
                next: held,
                confirmed: held,
                ..PointState::default()
            };
            let replace = match offered {
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
                    true
                }
                Some(offered) if offered.end > snapshot.end => {
                    // The follower holds more than the leader: its copy diverged.
                    tracing::warn!(follower = %self.follower, point = %id, offered = offered.end, end = snapshot.end, "follower copy diverged; replacing it");
                    true
                }
                Some(offered) if offered.end > 0 => {
                    let here = match offered.end == snapshot.end {
                        true => Ok(snapshot.crc),
                        false => store.crc_at(&id, offered.end).await,
                    };
                    match here {
                        Ok(crc) if crc == offered.crc => false,
                        Ok(crc) => {
                            tracing::error!(follower = %self.follower, point = %id, end = offered.end, crc = format_args!("{crc:08x}"), follower_crc = format_args!("{:08x}", offered.crc), "the follower's copy has other bytes than this leader's at the same length; replacing it");
                            ::metrics::counter!(metrics::REPLICATION_DIVERGENCES, "found" => "offer").increment(1);
                            true
                        }
                        Err(ReadError::NotFound(_)) => continue,
                        Err(error) => {
                            tracing::error!(follower = %self.follower, point = %id, %error, "cannot check the follower's copy; not replicating it in this session");
                            continue;
                        }
                    }
                }
                _ => false,
            };
            if replace {
                state.next = 0;
                state.confirmed = 0;
                self.send_remove(id.clone());
            } else {
                self.context.progress.confirm(&self.follower, &id, held);
            }
            self.points.insert(id.clone(), state);
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

    fn grew(&mut self, point: PointId, end: u64) {
        let state = self.points.entry(point.clone()).or_default();
        if end > state.end {
            state.end = end;
            self.mark(point);
        }
    }

    /// Keeps the bytes of a live append of `point` to send them as they are, if they are not
    /// sent yet and the follower's share of memory allows.
    fn lend(&mut self, point: &PointId, bytes: Arc<LiveBytes>) {
        let state = self.points.entry(point.clone()).or_default();
        let fits = self.live_bytes + bytes.len() <= LIVE_PER_FOLLOWER;
        let after_last = state
            .live
            .back()
            .is_none_or(|last| last.end() <= bytes.start);
        if fits && after_last && bytes.end() > state.next {
            self.live_bytes += bytes.len();
            state.live.push_back(bytes);
        }
    }

    fn removed(&mut self, point: PointId) {
        if self.newer.contains(&point) {
            return;
        }
        self.forget(&point);
        self.described.remove(&point);
        self.send_remove(point);
    }

    /// Sends the point's content type and epoch, when it has a content type or an epoch past
    /// the first, before its first record in this session.
    async fn describe(&mut self, point: &PointId) -> Result<(), ReadError> {
        if self.described.contains(point) {
            return Ok(());
        }
        let store = &self.context.store;
        let described = async {
            let content_type = store.content_type(point).await?;
            let epoch = store.ownership(point).await?.epoch;
            Ok::<_, ReadError>((content_type, epoch))
        };
        let (content_type, epoch) = match described.await {
            Ok(described) => described,
            // Deleted meanwhile: the removal event follows.
            Err(ReadError::NotFound(_)) => (None, FIRST_EPOCH),
            Err(error) => return Err(error),
        };
        self.described.insert(point.clone());
        if content_type.is_none() && epoch == FIRST_EPOCH {
            return Ok(());
        }
        let mut request = self.sink.describe_request();
        request.get().set_point(point.as_str());
        request
            .get()
            .set_content_type(content_type.as_deref().unwrap_or_default());
        request.get().set_epoch(epoch);
        // Sent now: calls leave in the order they are made, so it precedes the first push.
        let promise = request.send().promise;
        self.in_flight.push(
            async move {
                let reply = promise.await.map(|_| ());
                Outcome::Described { reply }
            }
            .boxed_local(),
        );
        Ok(())
    }

    /// The point's ownership record changed: its description goes again, now if the follower
    /// has had one already, else before its first record.
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
        let generation = self.context.plugins.current().generation();
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

    fn send_remove(&mut self, point: PointId) {
        let mut request = self.sink.remove_request();
        request.get().set_point(point.as_str());
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

    fn send_truncate(&mut self, point: PointId, end: u64) {
        let mut request = self.sink.truncate_request();
        request.get().set_point(point.as_str());
        request.get().set_end(end);
        let promise = request.send().promise;
        self.in_flight.push(
            async move {
                let reply = promise
                    .await
                    .and_then(|response| Ok(response.get()?.get_end()));
                Outcome::Truncated { point, reply }
            }
            .boxed_local(),
        );
    }

    /// Sends pushes until `window` are in flight, or their bytes reach `window` ×
    /// [`PUSH_BYTES`], or nothing is left to send.
    async fn fill(&mut self, window: usize) {
        self.retry_unsendable();
        let budget = window as u64 * PUSH_BYTES;
        while self.in_flight.len() < window && self.in_flight_bytes < budget {
            if self.paced_until().is_some() {
                return;
            }
            let (records, more) = self.gather().await;
            if records.is_empty() {
                return;
            }
            let Some(Bundling { bundled, left }) = self.bundle(records).await else {
                return;
            };
            let ready = self.admit(bundled);
            self.send_in_pushes(ready);
            if !left.is_empty() {
                self.put_back(left);
            } else if !more {
                return;
            }
        }
    }

    /// Records to send, up to [`PUSH_BYTES`] of payload, and whether more may be waiting.
    async fn gather(&mut self) -> (Vec<Pending>, bool) {
        let mut records = Vec::new();
        let mut size = 0;
        while size < PUSH_BYTES {
            match self.prepare().await {
                Some(record) => {
                    size += record.sent.len;
                    records.push(record);
                }
                None => return (records, false),
            }
        }
        (records, true)
    }

    /// Bundles `records` on the blocking pool (see [`bundle_all`]); `None` when the replicator
    /// stops meanwhile. A bundler whose calls block in the host (a guest that sleeps) is waited
    /// for no longer than its deadlines allow.
    async fn bundle(&self, records: Vec<Pending>) -> Option<Bundling> {
        let plugins = self.context.plugins.current();
        let timeout = plugins.bundler.timeout() * records.len() as u32 + Duration::from_secs(1);
        let plugin = plugins.bundler.name().clone();
        let sent: Vec<Sent> = records.iter().map(|record| record.sent.clone()).collect();
        let stop = self.stop.clone();
        let bundling = tokio::task::spawn_blocking(move || bundle_all(&plugins, records, &stop));
        let error = tokio::select! {
            done = tokio::time::timeout(timeout, bundling) => match done {
                Ok(Ok(bundled)) => return Some(bundled),
                Ok(Err(panicked)) => PluginError::Trap {
                    plugin,
                    message: format!("the host panicked bundling: {panicked}"),
                },
                Err(_) => PluginError::Timeout { plugin, timeout },
            },
            () = self.stop.cancelled() => return None,
        };
        let bundled = sent
            .into_iter()
            .map(|sent| Err((sent, NotSent::Bundler(error.clone()))))
            .collect();
        Some(Bundling {
            bundled,
            left: Vec::new(),
        })
    }

    /// Records read but not bundled (the bytes bundled so far filled a push): each point is
    /// sent again from the first of its records left.
    fn put_back(&mut self, left: Vec<Sent>) {
        for sent in left {
            if let Some(state) = self.points.get_mut(&sent.point) {
                state.next = state.next.min(sent.start);
                self.mark(sent.point);
            }
        }
    }

    /// The bundled records that may go, in order. A record that was not bundled rewinds its
    /// point to its start and puts the point in backoff (or, too large to ever travel, aside
    /// until a reload); the point's later records in the batch are dropped with it.
    fn admit(&mut self, bundled: Vec<Result<Prepared, (Sent, NotSent)>>) -> Vec<Prepared> {
        let mut failed: HashSet<PointId> = HashSet::new();
        let mut ready = Vec::with_capacity(bundled.len());
        for result in bundled {
            let (sent, why) = match result {
                Ok(record) if !failed.contains(&record.sent.point) => {
                    ready.push(record);
                    continue;
                }
                Ok(_) => continue,
                Err(failure) => failure,
            };
            if !failed.insert(sent.point.clone()) {
                continue;
            }
            let Some(state) = self.points.get_mut(&sent.point) else {
                continue;
            };
            state.next = state.next.min(sent.start);
            let reason = match why {
                NotSent::TooLarge { .. } => {
                    state.mode = Mode::Unsendable {
                        generation: self.plugins_generation,
                    };
                    tracing::error!(follower = %self.follower, point = %sent.point, start = sent.start, %why, "a record cannot travel with this bundler; the point is not replicated until the plugins are reloaded");
                    "too_large"
                }
                NotSent::Bundler(_) => {
                    tracing::warn!(follower = %self.follower, point = %sent.point, start = sent.start, %why, "the bundler failed on a record; sending it again after a pause");
                    self.back_off(&sent.point);
                    "bundler_failed"
                }
            };
            ::metrics::counter!(metrics::REPLICATION_UNSENT, "reason" => reason).increment(1);
        }
        ready
    }

    /// Sends `records` in pushes of about [`PUSH_BYTES`] on the wire each (a record larger
    /// than that goes alone).
    fn send_in_pushes(&mut self, records: Vec<Prepared>) {
        let mut push = Vec::new();
        let mut wire = 0;
        for record in records {
            wire += record.wire_len() as u64;
            push.push(record);
            if wire >= PUSH_BYTES {
                self.send(std::mem::take(&mut push), wire);
                wire = 0;
            }
        }
        if !push.is_empty() {
            self.send(push, wire);
        }
    }

    /// While a throttled handover has sent its share, until when it waits.
    fn paced_until(&self) -> Option<Instant> {
        self.pace
            .map(|(_, at)| at)
            .filter(|at| *at > Instant::now())
    }

    /// Counts `bytes` sent against the throttle, if there is one.
    fn spend(&mut self, bytes: u64) {
        if let Some((rate, at)) = &mut self.pace {
            let now = Instant::now();
            *at = (*at).max(now) + Duration::from_secs_f64(bytes as f64 / *rate as f64);
        }
    }

    /// The next record to send, round robin over the points that have something to send. A
    /// point whose description or bytes cannot be read waits, as after a failed record.
    async fn prepare(&mut self) -> Option<Pending> {
        loop {
            let point = self.dirty.pop_front()?;
            self.queued.remove(&point);
            self.trim_live(&point);
            let Some(state) = self.points.get(&point) else {
                continue;
            };
            if state.next >= state.end || state.mode != Mode::Sending {
                continue;
            }
            let (start, generation) = (state.next, state.generation);
            let len = RECORD_BYTES.min(state.end - start);
            if let Err(error) = self.describe(&point).await {
                tracing::error!(follower = %self.follower, %point, %error, "cannot describe the point; trying again after a pause");
                self.back_off(&point);
                continue;
            }
            let payload = match self.live_payload(&point, start, len) {
                Some(payload) => payload,
                None => match self.context.store.read(&point, start, len).await {
                    Ok(bytes) => {
                        ::metrics::counter!(metrics::REPLICATION_READ_BACK)
                            .increment(bytes.len() as u64);
                        Buffer::new(vec![bytes])
                    }
                    // Deleted meanwhile: the removal event follows.
                    Err(ReadError::NotFound(_)) => continue,
                    Err(error) => {
                        tracing::error!(follower = %self.follower, %point, %error, "cannot read the point; trying again after a pause");
                        self.back_off(&point);
                        continue;
                    }
                },
            };
            let len = payload.len();
            // Replies and events are handled between fills only: the state is as it was read.
            let state = self.points.get_mut(&point).expect("still tracked");
            state.next = start + len;
            if state.next < state.end {
                self.mark(point.clone());
            }
            return Some(Pending {
                sent: Sent {
                    point,
                    start,
                    len,
                    generation,
                },
                payload,
            });
        }
    }

    /// Drops the live appends of `point` that end before its next byte to send.
    fn trim_live(&mut self, point: &PointId) {
        let Some(state) = self.points.get_mut(point) else {
            return;
        };
        while let Some(first) = state.live.front() {
            if first.end() > state.next {
                break;
            }
            self.live_bytes -= first.len();
            state.live.pop_front();
        }
    }

    /// `[start, start + up to len)` of `point` from the live appends kept for it, if they hold
    /// its first byte.
    fn live_payload(&self, point: &PointId, start: u64, len: u64) -> Option<Buffer> {
        let state = self.points.get(point)?;
        let mut pieces = Vec::new();
        let mut at = start;
        for live in &state.live {
            if live.start > at || at >= start + len {
                break;
            }
            let mut offset = live.start;
            for frame in &live.frames {
                let frame_end = offset + frame.len() as u64;
                if frame_end > at && at < start + len {
                    let from = (at - offset) as usize;
                    let to = ((start + len).min(frame_end) - offset) as usize;
                    pieces.push(frame.slice(from..to));
                    at = offset + to as u64;
                }
                offset = frame_end;
            }
        }
        (!pieces.is_empty()).then(|| Buffer::new(pieces))
    }

    /// Sends `records` (`wire` bytes) as one push (now: calls leave in the order they are
    /// made, and the follower applies records of a point in arrival order).
    fn send(&mut self, records: Vec<Prepared>, wire: u64) {
        let mut request = self.sink.push_request();
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
            Outcome::Described { reply } => reply?,
            Outcome::Removed { point, reply } => {
                reply?;
                self.context.progress.forget(&self.follower, &point);
                if self.points.contains_key(&point) {
                    // A diverged copy was removed: send the point again from 0.
                    self.mark(point);
                }
            }
            Outcome::Truncated { point, reply } => {
                let end = reply?;
                self.cut(point, end);
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
                ::metrics::counter!(metrics::REPLICATION_DIVERGENCES, "found" => "ack")
                    .increment(1);
                self.send_truncate(point.clone(), verified);
                self.mark(point.clone());
            }
            AfterReply::Resend => {
                tracing::debug!(follower = %self.follower, %point, start = sent.start, end, "follower ends elsewhere; continuing from its end");
                self.mark(point.clone());
            }
            AfterReply::Replace => {
                tracing::warn!(follower = %self.follower, %point, end, "the follower holds more of the point than this leader; replacing its copy");
                self.send_remove(point.clone());
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
        }
    }

    /// The follower cut its copy of `point` back to `end` (after a divergence): continue from
    /// there if that is before where this replicator is.
    fn cut(&mut self, point: PointId, end: u64) {
        let Some(state) = self.points.get_mut(&point) else {
            return;
        };
        if end < state.next {
            state.generation += 1;
            state.next = end;
        }
        state.confirmed = end.min(state.confirmed);
        self.context
            .progress
            .confirm(&self.follower, &point, state.confirmed);
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
        ::metrics::gauge!(metrics::FOLLOWERS).set(self.context.progress.followers().len() as f64);
    }
}

/// What one bundling call made of the records it was given.
struct Bundling {
    /// One result per record bundled (or that failed), in order.
    bundled: Vec<Result<Prepared, (Sent, NotSent)>>,
    /// The records after them, not bundled: what was bundled already fills a push.
    left: Vec<Sent>,
}

/// Bundles the records in order with `plugins`' bundler and computes each payload's CRC32C
/// (on the blocking pool: a plugin call blocks). Stops once the bundles made take two pushes'
/// worth of bytes on the wire, so memory stays bounded however a bundler expands its records,
/// and when `stop` is cancelled.
fn bundle_all(plugins: &PluginSet, records: Vec<Pending>, stop: &CancellationToken) -> Bundling {
    let mut bundled = Vec::with_capacity(records.len());
    let mut left = Vec::new();
    let mut wire_total = 0;
    for Pending { sent, payload } in records {
        if wire_total >= 2 * PUSH_BYTES as usize || stop.is_cancelled() {
            left.push(sent);
            continue;
        }
        let bundle = match plugins.bundle(sent.point.as_str(), sent.start, &payload) {
            Ok(bundle) => bundle,
            Err(error) => {
                bundled.push(Err((sent, NotSent::Bundler(error))));
                continue;
            }
        };
        let wire = wire_len(&bundle, &payload);
        if wire > MAX_BUNDLE_BYTES {
            bundled.push(Err((sent, NotSent::TooLarge { wire })));
            continue;
        }
        wire_total += wire;
        let crc = payload
            .pieces()
            .iter()
            .fold(0, |crc, piece| crc32c::crc32c_append(crc, piece));
        bundled.push(Ok(Prepared {
            sent,
            payload,
            bundled: bundle,
            crc,
        }));
    }
    Bundling { bundled, left }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn sent(start: u64, len: u64, generation: u64) -> Sent {
        Sent {
            point: PointId::new("p").unwrap(),
            start,
            len,
            generation,
        }
    }

    /// A point of 1000 bytes, sent up to 600, confirmed up to 400, at generation 2.
    fn sent_to_600() -> PointState {
        PointState {
            end: 1000,
            next: 600,
            confirmed: 400,
            generation: 2,
            failures: 3,
            ..PointState::default()
        }
    }

    #[test]
    fn an_applied_record_confirms_its_end_and_clears_failures() {
        let mut state = sent_to_600();
        let after = state.replied(&sent(400, 100, 2), 500, &Reply::Applied);
        assert_eq!(after, AfterReply::Confirmed);
        assert_eq!((state.confirmed, state.next, state.failures), (500, 600, 0));
        // A late reply of an earlier push, applied where it was sent: still progress.
        let after = state.replied(&sent(300, 100, 1), 400, &Reply::Applied);
        assert_eq!((after, state.confirmed), (AfterReply::Confirmed, 500));
    }

    #[test]
    fn an_acknowledged_end_that_is_not_the_one_sent_is_a_divergence_not_progress() {
        let mut state = sent_to_600();
        // One byte more than was sent.
        let after = state.replied(&sent(400, 100, 2), 501, &Reply::Applied);
        assert_eq!(after, AfterReply::Truncate(400));
        assert_eq!(
            (state.confirmed, state.next, state.generation),
            (400, 400, 3)
        );
        // Replies to pushes sent before the cut are ignored.
        let after = state.replied(&sent(500, 100, 2), 601, &Reply::Applied);
        assert_eq!(after, AfterReply::Nothing);
        assert_eq!(state.confirmed, 400);
        // Claimed at a start beyond what was confirmed: cut back to what was.
        let mut state = sent_to_600();
        let after = state.replied(&sent(500, 100, 2), 650, &Reply::Applied);
        assert_eq!(after, AfterReply::Truncate(400));
    }

    #[test]
    fn a_mismatch_continues_from_the_followers_end_or_replaces_a_longer_copy() {
        let mut state = sent_to_600();
        assert_eq!(
            state.replied(&sent(400, 100, 2), 300, &Reply::Mismatch),
            AfterReply::Resend
        );
        assert_eq!(
            (state.confirmed, state.next, state.generation),
            (300, 300, 3)
        );
        assert_eq!(
            state.replied(&sent(500, 100, 2), 350, &Reply::Mismatch),
            AfterReply::Nothing
        );
        let mut state = sent_to_600();
        assert_eq!(
            state.replied(&sent(400, 100, 2), 1200, &Reply::Mismatch),
            AfterReply::Replace
        );
        assert_eq!((state.confirmed, state.next), (0, 0));
    }

    #[test]
    fn a_rejected_record_is_sent_again_from_its_start() {
        let mut state = sent_to_600();
        let rejected = Reply::Rejected("damaged".into());
        assert_eq!(
            state.replied(&sent(400, 100, 2), 0, &rejected),
            AfterReply::BackOff
        );
        assert_eq!(
            (state.confirmed, state.next, state.generation),
            (400, 400, 3)
        );
        assert_eq!(
            state.replied(&sent(500, 100, 2), 0, &rejected),
            AfterReply::Nothing
        );
    }
}
