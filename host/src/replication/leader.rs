//! The leader side: followers dial in, are authorized (`replicate`), and each gets a replicator
//! task that pushes what the follower lacks, then every new append.
//!
//! The replicator keeps, per point, the leader's end, the next offset to send and what the
//! follower confirmed. It starts from the follower's offers (its real ends), fills a window of
//! `replication.window` pushes in flight (each of up to [`PUSH_BYTES`], in records of up to
//! [`RECORD_BYTES`]), and learns about new appends from the store's broadcast; a lagging
//! broadcast triggers a rescan instead of blocking anything. An append's event lends its bytes:
//! the replicator keeps them (up to [`LIVE_PER_FOLLOWER`]) and sends them as they are, so a
//! follower that keeps up is never served from a read-back. A reply that says the follower ends
//! elsewhere (mismatch) or that the record arrived damaged (rejected) rewinds the point; a
//! per-point generation makes replies to pushes sent before the rewind harmless.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet, VecDeque};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use capnp_rpc::rpc_twoparty_capnp::Side;
use capnp_rpc::{RpcSystem, twoparty};
use futures::future::LocalBoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use tokio::net::TcpListener;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_util::compat::{TokioAsyncReadCompatExt, TokioAsyncWriteCompatExt};
use tokio_util::sync::CancellationToken;

use super::replication_capnp::{Verdict, ack, leader, session, sink};
use super::{Context, PROTOCOL, check_identity, handover, takeover};
use crate::access::Action;
use crate::metrics;
use crate::net::PeerInfo;
use crate::plugins::{Buffer, bundles};
use crate::point::ownership::FIRST_EPOCH;
use crate::point::{LiveBytes, PointId, ReadError};
use crate::service::Spawner;

/// Most payload bytes in one record: one read of the point, one bundler call.
pub const RECORD_BYTES: u64 = 1024 * 1024;
/// Payload bytes a push gathers before it leaves (records of several points may share it).
pub const PUSH_BYTES: u64 = 2 * 1024 * 1024;
/// Most bytes a bundle may take on the wire (a push must stay well within the 64 MiB a Cap'n
/// Proto reader accepts); a bundler that makes more of a record fails it.
pub const MAX_BUNDLE_BYTES: usize = 16 * 1024 * 1024;
/// Most bytes of live appends a replicator keeps for its follower; beyond, it reads them back.
pub const LIVE_PER_FOLLOWER: u64 = 16 * 1024 * 1024;

/// Accepts followers until the replication subsystem stops.
pub async fn serve(
    context: Rc<Context>,
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    spawner: &Spawner,
) {
    let shutdown = spawner.token().clone();
    let offers = Rc::new(RefCell::new(takeover::Offers::default()));
    let mut incoming = crate::net::accept(
        listener,
        tls,
        crate::net::ClientCertificates::Required,
        spawner,
        "replication",
    );
    while let Some(connection) = incoming.next().await {
        let connection = match connection {
            Ok(connection) => connection,
            Err(error) => {
                tracing::warn!(%error, "replication connection failed");
                continue;
            }
        };
        let (io, peer) = connection.into_parts();
        let (reader, writer) = tokio::io::split(io);
        let network = twoparty::VatNetwork::new(
            reader.compat(),
            writer.compat_write(),
            Side::Server,
            Default::default(),
        );
        let service = LeaderService {
            context: context.clone(),
            peer: peer.clone(),
            shutdown: shutdown.clone(),
            offers: offers.clone(),
        };
        let client: leader::Client = capnp_rpc::new_client(service);
        let rpc = RpcSystem::new(Box::new(network), Some(client.client));
        tokio::task::spawn_local(async move {
            if let Err(error) = rpc.await {
                tracing::info!(peer = %peer.addr, %error, "replication connection ended");
            }
        });
    }
}

struct LeaderService {
    context: Rc<Context>,
    peer: PeerInfo,
    shutdown: CancellationToken,
    /// Copies of forgotten members' points offered to this node (shared by every connection).
    offers: Rc<RefCell<takeover::Offers>>,
}

impl LeaderService {
    /// A handover call from `from`: the connection must be allowed to `replicate` and, with
    /// TLS, its certificate must name `from`.
    async fn authorize_member(&self, from: &str) -> Result<(), capnp::Error> {
        self.authorize_peer().await?;
        let tls = self.context.config.tls.is_some();
        if let Err(reason) = check_identity(&self.peer.subject, from, tls) {
            ::metrics::counter!(metrics::REPLICATION_REFUSED).increment(1);
            tracing::warn!(subject = %self.peer.subject, peer = %self.peer.addr, %reason, "handover refused");
            return Err(capnp::Error::failed(reason));
        }
        Ok(())
    }

    /// A resharding call: the connection must be allowed to `replicate`, to a primary.
    async fn authorize_peer(&self) -> Result<(), capnp::Error> {
        let context = &self.context;
        let refused = context
            .access
            .authorize(&self.peer, Action::Replicate, "")
            .await
            .map_err(|e| e.to_string());
        if let Err(reason) = refused {
            ::metrics::counter!(metrics::REPLICATION_REFUSED).increment(1);
            tracing::warn!(subject = %self.peer.subject, peer = %self.peer.addr, %reason, "handover refused");
            return Err(capnp::Error::failed(reason));
        }
        if !context.config.role.is_primary() {
            return Err(capnp::Error::failed(format!(
                "node {} is a {}: only primaries take points over",
                context.config.node_name,
                context.config.role.as_str()
            )));
        }
        Ok(())
    }
}

/// The point named in a handover call.
fn point_of(text: capnp::text::Reader<'_>) -> Result<PointId, capnp::Error> {
    PointId::new(text.to_str()?.to_owned())
        .map_err(|e| capnp::Error::failed(format!("bad point id: {e}")))
}

impl leader::Server for LeaderService {
    async fn receive(
        self: Rc<Self>,
        params: leader::ReceiveParams,
        mut results: leader::ReceiveResults,
    ) -> Result<(), capnp::Error> {
        let from = params.get()?.get_from()?.to_str()?.to_owned();
        self.authorize_member(&from).await?;
        tracing::info!(%from, "receiving handovers");
        let sink = super::follower::receiver(self.context.clone(), Some(from));
        results.get().set_sink(sink);
        Ok(())
    }

    async fn handover(
        self: Rc<Self>,
        params: leader::HandoverParams,
        mut results: leader::HandoverResults,
    ) -> Result<(), capnp::Error> {
        let params = params.get()?;
        let from = params.get_from()?.to_str()?.to_owned();
        self.authorize_member(&from).await?;
        let point = point_of(params.get_point()?)?;
        let end = handover::begin(&self.context.store, &from, &point, params.get_epoch())
            .await
            .map_err(capnp::Error::failed)?;
        results.get().set_end(end);
        Ok(())
    }

    async fn seal(
        self: Rc<Self>,
        params: leader::SealParams,
        mut results: leader::SealResults,
    ) -> Result<(), capnp::Error> {
        let params = params.get()?;
        let from = params.get_from()?.to_str()?.to_owned();
        self.authorize_member(&from).await?;
        let point = point_of(params.get_point()?)?;
        let context = &self.context;
        let sealed = handover::seal(
            &context.store,
            &context.config.node_name,
            &from,
            &point,
            params.get_end(),
            params.get_crc(),
        )
        .await
        .map_err(capnp::Error::failed)?;
        let mut outcome = results.get().init_outcome();
        match sealed {
            handover::Sealed::Committed(epoch) => outcome.set_committed(epoch),
            handover::Sealed::Refused(reason) => outcome.set_refused(&reason),
        }
        Ok(())
    }

    async fn settled(
        self: Rc<Self>,
        params: leader::SettledParams,
        mut results: leader::SettledResults,
    ) -> Result<(), capnp::Error> {
        self.authorize_peer().await?;
        let point = point_of(params.get()?.get_point()?)?;
        let context = &self.context;
        let needed = match (context.config.role, context.config.replication.ack) {
            (crate::config::Role::Leader, crate::config::Ack::Replicas(replicas)) => {
                Some(replicas.max(1) as usize)
            }
            (crate::config::Role::Leader, crate::config::Ack::Local) => Some(1),
            _ => None,
        };
        let settled = handover::settled(&context.store, &context.progress, needed, &point)
            .await
            .map_err(capnp::Error::failed)?;
        let mut results = results.get();
        results.set_epoch(settled.epoch);
        results.set_end(settled.end);
        results.set_replicated(settled.replicated);
        Ok(())
    }

    async fn prepare(
        self: Rc<Self>,
        params: leader::PrepareParams,
        _: leader::PrepareResults,
    ) -> Result<(), capnp::Error> {
        let params = params.get()?;
        let from = params.get_from()?.to_str()?.to_owned();
        self.authorize_member(&from).await?;
        let point = point_of(params.get_point()?)?;
        handover::prepare(&self.context.store, &from, &point)
            .await
            .map_err(capnp::Error::failed)
    }

    async fn cancel(
        self: Rc<Self>,
        params: leader::CancelParams,
        _: leader::CancelResults,
    ) -> Result<(), capnp::Error> {
        let params = params.get()?;
        let from = params.get_from()?.to_str()?.to_owned();
        self.authorize_member(&from).await?;
        let point = point_of(params.get_point()?)?;
        handover::cancel(&self.context.store, &from, &point)
            .await
            .map_err(capnp::Error::failed)
    }

    async fn offer(
        self: Rc<Self>,
        params: leader::OfferParams,
        mut results: leader::OfferResults,
    ) -> Result<(), capnp::Error> {
        let params = params.get()?;
        let from = params.get_from()?.to_str()?.to_owned();
        self.authorize_member(&from).await?;
        let forgotten = params.get_forgotten()?.to_str()?.to_owned();
        let mut copies = Vec::new();
        for copy in params.get_copies()? {
            copies.push(takeover::Copy {
                point: point_of(copy.get_point()?)?,
                end: copy.get_end(),
                epoch: copy.get_epoch(),
                crc: copy.get_crc(),
            });
        }
        let mut verdicts = Vec::with_capacity(copies.len());
        for copy in copies {
            let verdict = takeover::offer(&self.context, &self.offers, &from, &forgotten, copy)
                .await
                .map_err(capnp::Error::failed)?;
            verdicts.push(match verdict {
                takeover::Verdict::Wait => Verdict::Wait,
                takeover::Verdict::Send => Verdict::Send,
                takeover::Verdict::Taken => Verdict::Taken,
                takeover::Verdict::Diverged => Verdict::Diverged,
            });
        }
        let mut list = results.get().init_verdicts(verdicts.len() as u32);
        for (i, verdict) in verdicts.into_iter().enumerate() {
            list.set(i as u32, verdict);
        }
        Ok(())
    }

    async fn identify(
        self: Rc<Self>,
        _: leader::IdentifyParams,
        mut results: leader::IdentifyResults,
    ) -> Result<(), capnp::Error> {
        results.get().set_name(&self.context.config.node_name);
        Ok(())
    }

    async fn follow(
        self: Rc<Self>,
        params: leader::FollowParams,
        mut results: leader::FollowResults,
    ) -> Result<(), capnp::Error> {
        let context = &self.context;
        let peer = &self.peer;
        let params = params.get()?;
        let hello = params.get_hello()?;
        let follower = hello.get_follower()?.to_str()?.to_owned();
        let protocol = hello.get_protocol();
        let refused = context
            .access
            .authorize(peer, Action::Replicate, "")
            .await
            .map_err(|e| e.to_string())
            .and_then(|()| check_identity(&peer.subject, &follower, context.config.tls.is_some()))
            .and_then(|()| {
                if protocol == PROTOCOL {
                    return Ok(());
                }
                Err(format!(
                    "follower {} speaks replication protocol {protocol}, this leader {PROTOCOL}: \
                     run the same release on both",
                    crate::error::bounded(&follower)
                ))
            })
            .and_then(|()| {
                // A forgotten member leads nobody: its followers' copies were taken over.
                let membership = context.membership.borrow();
                match membership.ring.members.get(&context.config.node_name) {
                    Some(record) if record.lifecycle == crate::cluster::Lifecycle::Forgotten => {
                        Err(format!(
                            "{} was forgotten by the cluster: it leads no followers",
                            context.config.node_name
                        ))
                    }
                    _ => Ok(()),
                }
            });
        if let Err(reason) = refused {
            ::metrics::counter!(metrics::REPLICATION_REFUSED).increment(1);
            tracing::warn!(subject = %peer.subject, peer = %peer.addr, %reason, "follower refused");
            return Err(capnp::Error::failed(reason));
        }
        if context.config.role != crate::config::Role::Leader {
            return Err(capnp::Error::failed(format!(
                "node {} is a {}, not a leader: it has no followers",
                context.config.node_name,
                context.config.role.as_str()
            )));
        }
        let rpc_address = hello.get_rpc_address()?.to_str()?.to_owned();
        let mut offers = HashMap::new();
        for offer in hello.get_offers()? {
            // An offer for an id that is not a valid point id can only be removed.
            let held = Held {
                end: offer.get_end(),
                epoch: offer.get_epoch().max(FIRST_EPOCH),
            };
            offers.insert(offer.get_point()?.to_str()?.to_owned(), held);
        }
        let sink = params.get_sink()?;
        let stop = self.shutdown.child_token();
        tracing::info!(%follower, %rpc_address, subject = %peer.subject, points = offers.len(), "follower connected");
        tokio::task::spawn_local(
            Replicator::new(context.clone(), follower, rpc_address, sink, stop.clone()).run(offers),
        );
        let session = SessionService {
            leader: context.config.node_name.clone(),
            stop,
        };
        results.get().set_session(capnp_rpc::new_client(session));
        Ok(())
    }
}

/// Ends the replicator when the follower drops its session (or the connection goes).
struct SessionService {
    leader: String,
    stop: CancellationToken,
}

impl Drop for SessionService {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl session::Server for SessionService {
    async fn leader(
        self: Rc<Self>,
        _: session::LeaderParams,
        mut results: session::LeaderResults,
    ) -> Result<(), capnp::Error> {
        results.get().set_name(&self.leader);
        Ok(())
    }
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
}

/// One record of a push: what was sent.
struct Sent {
    point: PointId,
    start: u64,
    len: u64,
    generation: u64,
}

/// A record ready to go: its bundle around its payload.
struct Prepared {
    sent: Sent,
    payload: Buffer,
    bundled: bundles::Bundled,
}

impl Prepared {
    /// Bytes on the wire: head, body, tail.
    fn wire_len(&self) -> usize {
        let body = match &self.bundled.body {
            bundles::Body::Payload => self.payload.len() as usize,
            bundles::Body::Replaced(bytes) => bytes.len(),
        };
        self.bundled.head.len() + body + self.bundled.tail.len()
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

/// A push or remove in flight, and what came back.
enum Outcome {
    Pushed {
        sent: Vec<Sent>,
        reply: Result<Vec<(u64, Reply)>, capnp::Error>,
    },
    Removed {
        point: PointId,
        reply: Result<(), capnp::Error>,
    },
    Described {
        reply: Result<(), capnp::Error>,
    },
}

enum Reply {
    Applied,
    Mismatch,
    Rejected(String),
}

/// What a follower offered of one point: its end and the epoch of its copy.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Held {
    end: u64,
    epoch: u64,
}

/// A change to the points a handover's replicator sends (`Replicator::handover`).
#[derive(Debug)]
pub(crate) enum ScopeChange {
    /// Send `point` from `held`, the end the new owner holds.
    Add { point: PointId, held: u64 },
    /// Stop sending `point` (its handover committed or was given up).
    Drop(PointId),
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
    /// Points whose description went out in this session (before their first record).
    described: HashSet<PointId>,
    /// Points the follower holds at a newer epoch than this leader: never sent nor removed.
    newer: HashSet<PointId>,
    in_flight: FuturesUnordered<LocalBoxFuture<'static, Outcome>>,
    /// When the lag gauge was last computed (it sums over every point).
    gauges_at: Option<std::time::Instant>,
    /// Bytes of live appends held in `points`.
    live_bytes: u64,
    /// For a handover: the points it sends, changed by `changes`; `None` for a follower, which
    /// gets every point.
    scope: Option<HashSet<PointId>>,
    changes: Option<mpsc::Receiver<ScopeChange>>,
    /// For a throttled handover: bytes per second, and when the next push may leave.
    pace: Option<(u64, tokio::time::Instant)>,
}

impl Replicator {
    fn new(
        context: Rc<Context>,
        follower: String,
        rpc_address: String,
        sink: sink::Client,
        stop: CancellationToken,
    ) -> Self {
        Self {
            context,
            follower,
            rpc_address,
            sink,
            stop,
            points: HashMap::new(),
            dirty: VecDeque::new(),
            queued: HashSet::new(),
            described: HashSet::new(),
            newer: HashSet::new(),
            in_flight: FuturesUnordered::new(),
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
        replicator.pace = (throttle > 0).then(|| (throttle, tokio::time::Instant::now()));
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
                if let Some(old) = self.points.remove(&point) {
                    self.live_bytes -= old.live.iter().map(|b| b.len()).sum::<u64>();
                }
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
                if let Some(old) = self.points.remove(&point) {
                    self.live_bytes -= old.live.iter().map(|b| b.len()).sum::<u64>();
                }
                self.context.progress.forget(&self.follower, &point);
            }
        }
    }

    /// Replicates until the session ends; `offers` are what a follower holds (none for a
    /// handover).
    pub(crate) async fn run(mut self, offers: HashMap<String, Held>) {
        // Subscribe before scanning: an append between the two is seen either way.
        let mut events = self.context.store.subscribe();
        self.context
            .progress
            .connected(&self.follower, &self.rpc_address);
        self.update_gauges();
        self.scan(Some(offers)).await;
        let window = self.context.config.replication.window;
        let mut changes = self.changes.take();
        loop {
            if let Err(error) = self.fill(window).await {
                tracing::error!(follower = %self.follower, %error, "cannot prepare records; retrying");
            }
            let paced = self.paced_until();
            tokio::select! {
                _ = self.stop.cancelled() => break,
                _ = tokio::time::sleep_until(paced.unwrap_or_else(tokio::time::Instant::now)), if paced.is_some() => {}
                change = next_change(&mut changes) => match change {
                    Some(change) => self.change_scope(change).await,
                    None => break,
                },
                event = events.recv() => match event {
                    Ok(event) if !self.in_scope(&event.point) => {}
                    Ok(event) if event.removed => self.removed(event.point),
                    Ok(event) if event.ownership => self.redescribe(event.point).await,
                    Ok(event) => {
                        if let Some(bytes) = event.bytes {
                            self.lend(&event.point, bytes);
                        }
                        self.grew(event.point, event.end);
                    }
                    Err(RecvError::Lagged(_)) => self.scan(None).await,
                    Err(RecvError::Closed) => break,
                },
                Some(outcome) = self.in_flight.next() => {
                    if let Err(error) = self.handle(outcome) {
                        tracing::info!(follower = %self.follower, %error, "follower session ended");
                        break;
                    }
                }
            }
        }
        self.context.progress.disconnected(&self.follower);
        self.update_gauges();
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
            match &offers {
                Some(offers) => {
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
                            // A newer owner's copy: this leader's is the stale one, and it
                            // never overwrites or removes what it has not written.
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
                None => self.grew(id, snapshot.end),
            }
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
        if let Some(state) = self.points.remove(&point) {
            self.live_bytes -= state.live.iter().map(|b| b.len()).sum::<u64>();
        }
        self.described.remove(&point);
        self.send_remove(point);
    }

    /// Sends the point's content type and epoch, when it has a content type or an epoch past
    /// the first, before its first record in this session.
    async fn describe(&mut self, point: &PointId) -> Result<(), String> {
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
            Err(error) => return Err(error.to_string()),
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
            self.mark(point);
        }
    }

    fn mark(&mut self, point: PointId) {
        if !self.newer.contains(&point) && self.queued.insert(point.clone()) {
            self.dirty.push_back(point);
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

    /// Sends pushes until `window` are in flight or nothing is left to send.
    async fn fill(&mut self, window: usize) -> Result<(), String> {
        while self.in_flight.len() < window {
            if self.paced_until().is_some() {
                return Ok(());
            }
            let mut records = Vec::new();
            let mut size = 0;
            let prepared = loop {
                if size >= PUSH_BYTES {
                    break Ok(());
                }
                match self.prepare().await {
                    Ok(Some(record)) => {
                        size += record.sent.len;
                        records.push(record);
                    }
                    Ok(None) => break Ok(()),
                    Err(error) => break Err(error),
                }
            };
            if !records.is_empty() {
                self.send(records);
                self.spend(size);
            }
            prepared?;
            if size < PUSH_BYTES {
                return Ok(());
            }
        }
        Ok(())
    }

    /// While a throttled handover has sent its share, until when it waits.
    fn paced_until(&self) -> Option<tokio::time::Instant> {
        self.pace
            .map(|(_, at)| at)
            .filter(|at| *at > tokio::time::Instant::now())
    }

    /// Counts `bytes` sent against the throttle, if there is one.
    fn spend(&mut self, bytes: u64) {
        if let Some((rate, at)) = &mut self.pace {
            let now = tokio::time::Instant::now();
            *at = (*at).max(now) + Duration::from_secs_f64(bytes as f64 / *rate as f64);
        }
    }

    /// The next record to send, round robin over the points that have something to send.
    async fn prepare(&mut self) -> Result<Option<Prepared>, String> {
        loop {
            let Some(point) = self.dirty.pop_front() else {
                return Ok(None);
            };
            self.queued.remove(&point);
            self.trim_live(&point);
            let Some(state) = self.points.get(&point) else {
                continue;
            };
            if state.next >= state.end {
                continue;
            }
            let (start, generation) = (state.next, state.generation);
            let len = RECORD_BYTES.min(state.end - start);
            if let Err(error) = self.describe(&point).await {
                self.mark(point);
                return Err(error);
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
                        self.mark(point);
                        return Err(error.to_string());
                    }
                },
            };
            let len = payload.len();
            let plugins = self.context.plugins.current();
            let bundled = match plugins.bundle(point.as_str(), start, &payload) {
                Ok(bundled) => bundled,
                Err(error) => {
                    self.mark(point);
                    return Err(error.to_string());
                }
            };
            let record = Prepared {
                sent: Sent {
                    point,
                    start,
                    len,
                    generation,
                },
                payload,
                bundled,
            };
            if record.wire_len() > MAX_BUNDLE_BYTES {
                let error = format!(
                    "{} made {} bytes of a {len}-byte record of {} (at most {MAX_BUNDLE_BYTES})",
                    plugins.bundler.name(),
                    record.wire_len(),
                    record.sent.point
                );
                self.mark(record.sent.point);
                return Err(error);
            }
            let point = &record.sent.point;
            // Replies and events are handled between fills only: the state is as it was read.
            let state = self.points.get_mut(point).expect("still tracked");
            state.next = start + len;
            if state.next < state.end {
                self.mark(point.clone());
            }
            return Ok(Some(record));
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

    /// Sends `records` as one push (now: calls leave in the order they are made, and the
    /// follower applies records of a point in arrival order).
    fn send(&mut self, records: Vec<Prepared>) {
        let mut request = self.sink.push_request();
        {
            let mut list = request.get().init_records(records.len() as u32);
            for (i, record) in records.iter().enumerate() {
                let mut entry = list.reborrow().get(i as u32);
                entry.set_point(record.sent.point.as_str());
                entry.set_start(record.sent.start);
                record.write(entry.init_bundle(record.wire_len() as u32));
            }
        }
        let promise = request.send().promise;
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
                Outcome::Pushed { sent, reply }
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
            Outcome::Pushed { sent, reply } => {
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
                    .is_none_or(|at| at.elapsed() > std::time::Duration::from_millis(100))
                {
                    self.update_gauges();
                }
            }
        }
        Ok(())
    }

    /// What the follower answered for one record.
    fn acknowledged(&mut self, sent: Sent, end: u64, reply: Reply) {
        let Sent {
            point,
            start,
            len,
            generation,
        } = sent;
        let Some(state) = self.points.get_mut(&point) else {
            return;
        };
        match reply {
            Reply::Applied => {
                state.confirmed = state.confirmed.max(end);
                ::metrics::counter!(metrics::REPLICATED_BYTES, "direction" => "sent")
                    .increment(len);
            }
            Reply::Mismatch if generation == state.generation => {
                tracing::debug!(follower = %self.follower, %point, start, end, "follower ends elsewhere; continuing from its end");
                state.generation += 1;
                state.confirmed = end;
                state.next = end.min(state.end);
                if end > state.end {
                    // It holds more than the leader: replace its copy.
                    state.next = 0;
                    state.confirmed = 0;
                    self.send_remove(point.clone());
                }
                self.mark(point.clone());
            }
            Reply::Rejected(reason) if generation == state.generation => {
                tracing::warn!(follower = %self.follower, %point, start, %reason, "record rejected; sending it again");
                ::metrics::counter!(metrics::REPLICATION_REJECTED).increment(1);
                state.generation += 1;
                state.next = state.next.min(start);
                self.mark(point.clone());
            }
            // A reply to a push sent before the last rewind: already handled.
            Reply::Mismatch | Reply::Rejected(_) => {}
        }
        if let Some(state) = self.points.get(&point) {
            self.context
                .progress
                .confirm(&self.follower, &point, state.confirmed);
        }
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

/// The next change of a handover's scope; never, for a follower's replicator.
async fn next_change(changes: &mut Option<mpsc::Receiver<ScopeChange>>) -> Option<ScopeChange> {
    match changes {
        Some(changes) => changes.recv().await,
        None => std::future::pending().await,
    }
}
