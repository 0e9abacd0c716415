//! Writes: `ProduceStream` (frames received, validated and authorized here, appended in order
//! by a writer task in batches, acknowledged once the replicas asked for have them) and
//! `DeletePoint`.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::{FuturesOrdered, FuturesUnordered};
use futures::{FutureExt, StreamExt};

use tokio::sync::mpsc;
use tonic::{Request, Response, Status, Streaming};

use crate::access::Action;
use crate::error::Error;
use crate::metrics;
use crate::net::PeerInfo;
use crate::point::{Appended, PointId, Visibility};
use crate::proto::{
    self, DeletePointRequest, DeletePointResponse, ProduceRequest, ProduceResponse,
};

use super::StreamingService;
use crate::api::Context;

/// Frames a ProduceStream may receive ahead of the writer.
const WRITE_AHEAD: usize = 8;
/// Most bytes one append batch gathers.
const MAX_BATCH_BYTES: u64 = 8 * 1024 * 1024;

impl StreamingService {
    pub(super) async fn produce(
        &self,
        request: Request<Streaming<ProduceRequest>>,
    ) -> Result<Response<ProduceResponse>, Status> {
        let peer = self.state.caller(&request)?;
        let mut frames = request.into_inner();
        let state = &self.state;
        state.gate.check_writable().map_err(Error::from)?;

        // Receiving and writing overlap: this task decodes, validates and authorizes frames,
        // a writer task appends them in order, in batches.
        let (tx, rx) = mpsc::channel(WRITE_AHEAD);
        let writer = tokio::spawn(write_frames(state.clone(), rx));
        let mut points: Vec<PointId> = Vec::new();
        let mut slots: HashMap<String, usize> = HashMap::new();
        let received: Result<(), Error> = async {
            // Frames in stream order, each ready once its point is admitted: the admissions of
            // the new points among them run at once.
            let mut ahead: FuturesOrdered<BoxFuture<'_, Result<Frame, Error>>> =
                FuturesOrdered::new();
            let mut receiving = true;
            loop {
                if !receiving && ahead.is_empty() {
                    return Ok(());
                }
                tokio::select! {
                    Some(frame) = ahead.next() => {
                        // The earliest failure in the stream, whatever came after it.
                        if tx.send(frame?).await.is_err() {
                            // The writer stopped on an error; it is reported below.
                            return Ok(());
                        }
                    }
                    message = frames.message(), if receiving && ahead.len() < ADMITTED_AHEAD => {
                        let message = message.map_err(|status| {
                            Error::InvalidArgument(format!(
                                "reading the stream: {}",
                                status.message()
                            ))
                        });
                        let entry = match message {
                            Ok(Some(request)) => {
                                receive(state, &peer, request, (&mut points, &mut slots))
                            }
                            Ok(None) => {
                                receiving = false;
                                continue;
                            }
                            Err(error) => Err(error),
                        };
                        match entry {
                            // Nothing waits ahead of it (a stream of points admitted before,
                            // most often): straight to the writer.
                            Ok(Received::Ready(frame)) if ahead.is_empty() => {
                                if tx.send(frame).await.is_err() {
                                    return Ok(());
                                }
                            }
                            Ok(Received::Ready(frame)) => {
                                ahead.push_back(futures::future::ready(Ok(frame)).boxed());
                            }
                            Ok(Received::Admitting(admitted)) => ahead.push_back(admitted),
                            // Nothing is received after a frame that fails here; its error
                            // waits behind the frames before it.
                            Err(error) => {
                                receiving = false;
                                ahead.push_back(futures::future::ready(Err(error)).boxed());
                            }
                        }
                    }
                    _ = state.services.lifetime.abort.cancelled() => {
                        return Err(Error::Unavailable("the node is shutting down".into()));
                    }
                }
            }
        }
        .await;
        drop(tx);
        let written = writer
            .await
            .map_err(|e| Status::internal(format!("produce writer: {e}")))?;
        // The writer's error happened first: frames are written in the order they arrived.
        let last = written?;
        received?;
        let ends: Vec<(PointId, u64)> = last
            .iter()
            .map(|(&slot, written)| (points[slot].clone(), written.appended.end))
            .collect();
        state.wait_for_replicas(&ends).await?;
        // A point whose last append was served at once is committed to its end already (a
        // point at rest again, most often, among a stream's many small ones).
        let to_commit = last
            .iter()
            .filter(|(_, written)| written.visibility == Visibility::OnCommit)
            .map(|(&slot, written)| (&points[slot], written.appended.end));
        for (point, end) in to_commit {
            state.store.commit(point, end);
        }
        let records = points
            .into_iter()
            .enumerate()
            .map(|(slot, id)| {
                let appended = last
                    .get(&slot)
                    .map(|written| written.appended)
                    .unwrap_or_default();
                proto::Record {
                    point: id.as_str().to_owned(),
                    offset: appended.start,
                    end: appended.end,
                    crc32c: appended.crc,
                }
            })
            .collect();
        Ok(Response::new(ProduceResponse { records }))
    }

    pub(super) async fn delete(
        &self,
        request: Request<DeletePointRequest>,
    ) -> Result<Response<DeletePointResponse>, Status> {
        let peer = self.state.caller(&request)?;
        let id = PointId::new(request.into_inner().point).map_err(Error::from)?;
        self.state.gate.check_writable().map_err(Error::from)?;
        self.state
            .services
            .access
            .authorize(&peer, Action::Admin, id.as_str())
            .await?;
        if let Some(handover) = self
            .state
            .gate
            .admit_write(&id)
            .await
            .map_err(Error::from)?
        {
            return Err(Error::Unavailable(format!(
                "point {id} {handover}; delete it once the handover is over"
            ))
            .into());
        }
        let abort = &self.state.services.lifetime.abort;
        let share = self.state.gate.write_share(&id, abort).await;
        let _share = share.map_err(Error::from)?;
        let size = self.state.store.delete(&id).await.map_err(Error::from)?;
        tracing::info!(point = %id, size, subject = %peer.subject, "deleted point");
        Ok(Response::new(DeletePointResponse { size }))
    }
}

/// Frames a ProduceStream holds ahead of the writer while the points of the first ones are
/// admitted (a stream creating many small points waits on one admission at a time otherwise).
const ADMITTED_AHEAD: usize = 16;

/// A received frame, checked.
enum Received<'a> {
    /// Its point was admitted before in the stream.
    Ready(Frame),
    /// The first frame of a new point: ready once the point is admitted.
    Admitting(BoxFuture<'a, Result<Frame, Error>>),
}

/// Checks a received frame; a new point takes the next slot.
fn receive<'a>(
    state: &'a Context,
    peer: &'a PeerInfo,
    request: ProduceRequest,
    (points, slots): (&mut Vec<PointId>, &mut HashMap<String, usize>),
) -> Result<Received<'a>, Error> {
    let ProduceRequest {
        point,
        frame,
        content_type,
        expected_offset,
    } = request;
    let (slot, admission) = match slots.get(&point) {
        Some(&slot) => (slot, None),
        None => {
            let id = PointId::new(point.as_str())?;
            points.push(id.clone());
            slots.insert(point, points.len() - 1);
            let admission = admit_point(state, peer, id, content_type);
            (points.len() - 1, Some(admission))
        }
    };
    if frame.len() as u64 > state.services.config.max_frame_size {
        return Err(Error::InvalidArgument(format!(
            "frame of {} bytes for point {:?} exceeds max_frame_size ({} bytes)",
            frame.len(),
            points[slot].as_str(),
            state.services.config.max_frame_size
        )));
    }
    let hot = metrics::hot();
    hot.produced_frames.increment(1);
    hot.produced_bytes.increment(frame.len() as u64);
    let frame = Frame {
        slot,
        point: points[slot].clone(),
        bytes: frame,
        expected_offset,
    };
    Ok(match admission {
        None => Received::Ready(frame),
        Some(admission) => Received::Admitting(
            async move {
                admission.await?;
                Ok(frame)
            }
            .boxed(),
        ),
    })
}

/// The first frame of `point` in a stream: the caller may produce it, the gate admits the
/// write, and the content type that travels with it (if any) is a media type, set now.
async fn admit_point(
    state: &Context,
    peer: &PeerInfo,
    id: PointId,
    content_type: String,
) -> Result<(), Error> {
    // The owner the gate checks is asked with the decision, so that the two plugin calls share
    // a trip to the blocking pool (`crate::askers`); the gate then finds it cached. A caller
    // denied is told nothing of it.
    let (allowed, _) = tokio::join!(
        state
            .services
            .access
            .authorize(peer, Action::Produce, id.as_str()),
        state.services.placement.owners(id.as_str(), 1),
    );
    allowed?;
    state.gate.admit_write(&id).await?;
    if !content_type.is_empty() {
        if !crate::content::is_valid(&content_type) {
            return Err(Error::InvalidArgument(format!(
                "content type {:?} is not a media type (type/subtype)",
                crate::text::bounded(&content_type)
            )));
        }
        state.store.set_content_type(&id, &content_type).await?;
    }
    Ok(())
}

/// A received frame on its way to the writer.
struct Frame {
    /// The point's place in the stream's first-seen order.
    slot: usize,
    point: PointId,
    bytes: Bytes,
    expected_offset: Option<u64>,
}

/// Appends the stream's frames, in order for each point, consecutive frames of one point as one
/// batch. A frame with an `expected_offset` joins the batch before it only if that is exactly
/// where the batch ends; otherwise it starts its own, appended only at that offset.
///
/// Batches of different points are appended at once, up to [`APPENDS_IN_FLIGHT`] and
/// [`MAX_BATCH_BYTES`] in flight (a stream creating many small points waits on one point's
/// files at a time otherwise); a point's next batch waits for its last. After a failure no new
/// batch starts, those in flight finish, and the failure of the earliest batch is the answer.
async fn write_frames(
    state: Arc<Context>,
    mut frames: mpsc::Receiver<Frame>,
) -> Result<HashMap<usize, Written>, Error> {
    let mut writes = Writes::new(&state);
    let mut pending = None;
    let mut in_flight = FuturesUnordered::new();
    let mut sequence = 0u64;
    while writes.failed.is_none() {
        let first = match pending.take() {
            Some(next) => next,
            None => tokio::select! {
                Some(done) = in_flight.next() => {
                    writes.finished(&state, done).await;
                    continue;
                }
                frame = frames.recv() => match frame {
                    Some(frame) => frame,
                    None => break,
                },
            },
        };
        let batch = gather(first, &mut frames, &mut pending);
        while !in_flight.is_empty()
            && (in_flight.len() >= APPENDS_IN_FLIGHT
                || writes.bytes + batch.size > MAX_BATCH_BYTES
                || writes.busy.contains(&batch.slot))
        {
            let done = in_flight.next().await.expect("an append in flight");
            writes.finished(&state, done).await;
        }
        if writes.failed.is_some() {
            break;
        }
        writes.busy.insert(batch.slot);
        writes.bytes += batch.size;
        sequence += 1;
        in_flight.push(append(state.clone(), sequence, batch));
    }
    while let Some(done) = in_flight.next().await {
        writes.finished(&state, done).await;
    }
    match writes.failed {
        Some((_, error)) => Err(error),
        None => Ok(writes.last),
    }
}

/// Appends of different points one stream keeps in flight at once.
const APPENDS_IN_FLIGHT: usize = 16;

/// Consecutive frames of one point, appended as one.
struct Batch {
    slot: usize,
    point: PointId,
    expected_offset: Option<u64>,
    frames: Vec<Bytes>,
    size: u64,
}

/// `first` and the frames right behind it that continue it (same point, and an
/// `expected_offset`, if any, exactly where the batch ends), up to [`MAX_BATCH_BYTES`]; the
/// first frame that does not is left in `pending`.
fn gather(first: Frame, frames: &mut mpsc::Receiver<Frame>, pending: &mut Option<Frame>) -> Batch {
    let mut batch = Batch {
        slot: first.slot,
        point: first.point,
        expected_offset: first.expected_offset,
        size: first.bytes.len() as u64,
        frames: vec![first.bytes],
    };
    while batch.size < MAX_BATCH_BYTES {
        match frames.try_recv() {
            Ok(next)
                if next.slot == batch.slot
                    && next.expected_offset.is_none_or(|offset| {
                        batch.expected_offset.map(|start| start + batch.size) == Some(offset)
                    }) =>
            {
                batch.size += next.bytes.len() as u64;
                batch.frames.push(next.bytes);
            }
            Ok(other) => {
                *pending = Some(other);
                break;
            }
            Err(_) => break,
        }
    }
    batch
}

/// What an append in flight comes back with.
struct Done {
    /// Its place in the stream.
    sequence: u64,
    /// Its point's slot and name.
    slot: usize,
    point: PointId,
    /// Its bytes.
    size: u64,
    /// When its bytes are served.
    visibility: Visibility,
    outcome: Result<Vec<Appended>, Error>,
}

/// A point's last append in a stream, and when its bytes are served.
#[derive(Debug, Clone, Copy)]
struct Written {
    appended: Appended,
    visibility: Visibility,
}

async fn append(state: Arc<Context>, sequence: u64, batch: Batch) -> Done {
    let visibility = state.visibility();
    let outcome = state
        .gate
        .append(
            &batch.point,
            (batch.expected_offset, visibility),
            batch.frames,
            &state.services.lifetime.abort,
        )
        .await
        .map_err(Error::from);
    Done {
        sequence,
        slot: batch.slot,
        point: batch.point,
        size: batch.size,
        visibility,
        outcome,
    }
}

/// The writer's account of a stream's appends.
struct Writes {
    /// The last append of each point's slot.
    last: HashMap<usize, Written>,
    /// The slots with an append in flight, and its bytes.
    busy: HashSet<usize>,
    bytes: u64,
    /// The earliest failed append (by its place in the stream) and why.
    failed: Option<(u64, Error)>,
    pace: Pace,
}

impl Writes {
    fn new(state: &Context) -> Self {
        Writes {
            last: HashMap::new(),
            busy: HashSet::new(),
            bytes: 0,
            failed: None,
            pace: Pace::new(state),
        }
    }

    async fn finished(&mut self, state: &Context, done: Done) {
        let Done {
            sequence,
            slot,
            point,
            size,
            visibility,
            outcome,
        } = done;
        self.busy.remove(&slot);
        self.bytes -= size;
        match outcome {
            Ok(appended) => {
                if let Some(&appended) = appended.last() {
                    let written = Written {
                        appended,
                        visibility,
                    };
                    self.last.insert(slot, written);
                    self.pace.wrote(state, size, (&point, appended.end)).await;
                }
            }
            Err(error) => {
                if self
                    .failed
                    .as_ref()
                    .is_none_or(|(first, _)| sequence < *first)
                {
                    self.failed = Some((sequence, error));
                }
            }
        }
    }
}

/// Keeps a long stream's in-sync followers within their bound
/// (`replication.in_sync_max_lag_bytes`): the stream is acknowledged only at its end, and a
/// follower left behind by a fast writer would leave the in-sync set, and with it the group's
/// chance to fail over. Every quarter of the bound written, the writer waits (at most
/// `replication.ack_timeout_ms`, and never failing the stream for it) until the in-sync
/// followers confirmed what it had written a quarter before: so they stay within half the
/// bound, and the wait overlaps the next quarter's writing.
struct Pace {
    /// Bytes between two waits; `None`: this node acknowledges without followers.
    window: Option<u64>,
    since: u64,
    /// The ends reached at the last wait, to be confirmed at the next.
    reached: HashMap<PointId, u64>,
    previous: Vec<(PointId, u64)>,
}

impl Pace {
    fn new(state: &Context) -> Self {
        let window = state.replicas_waited_for().map(|_| {
            (state.services.config.replication.in_sync_max_lag_bytes / 4).max(MAX_BATCH_BYTES)
        });
        Pace {
            window,
            since: 0,
            reached: HashMap::new(),
            previous: Vec::new(),
        }
    }

    async fn wrote(&mut self, state: &Context, bytes: u64, (point, end): (&PointId, u64)) {
        let Some(window) = self.window else { return };
        self.reached.insert(point.clone(), end);
        self.since += bytes;
        if self.since < window {
            return;
        }
        self.since = 0;
        let previous = std::mem::replace(
            &mut self.previous,
            self.reached.clone().into_iter().collect(),
        );
        state.pace(&previous).await;
    }
}
