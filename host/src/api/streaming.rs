//! The `streaming.v1` handlers: produce, consume, metadata, list, delete, locate, members and
//! the resolver helpers.
//!
//! Each call authorizes its subject first, validates its input into typed values, and maps every
//! failure to a status through [`Error`]. A write is accepted only by the point's owner on the
//! ring; elsewhere it is refused with the owner in the status. ConsumeStream feeds a bounded
//! channel from a spawned task, so a slow client holds at most a few frames in memory and a
//! cancelled client stops the task.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use super::Context;
use crate::access::{Access, Action};
use crate::cluster::{Handed, Lifecycle, Membership, StepError};
use crate::error::Error;
use crate::metrics;
use crate::net::PeerInfo;
use crate::placement::Placement;
use crate::point::{Appended, Handover, PointId, Snapshot, Span, StreamError};
use crate::proto::{
    self, CleanupMemberRequest, CleanupMemberResponse, ConsumeRequest, ConsumeResponse,
    DeletePointRequest, DeletePointResponse, DrainMemberRequest, DrainMemberResponse,
    ForgetMemberRequest, ForgetMemberResponse, GetFollowersRequest, GetFollowersResponse,
    GetServersRequest, GetServersResponse, ListMembersRequest, ListMembersResponse,
    ListPointsRequest, ListPointsResponse, LocatePointRequest, LocatePointResponse,
    MetadataRequest, MetadataResponse, ProduceRequest, ProduceResponse, SignUrlRequest,
    SignUrlResponse,
};
use crate::signed_url::{UrlError, UrlSigner};

/// Frames a ConsumeStream task may read ahead of the client.
const READ_AHEAD: usize = 4;
/// Frames a ProduceStream may receive ahead of the writer.
const WRITE_AHEAD: usize = 8;
/// Most bytes one append batch gathers.
const MAX_BATCH_BYTES: u64 = 8 * 1024 * 1024;

pub struct StreamingService {
    state: Arc<Context>,
}

impl StreamingService {
    pub fn new(state: Arc<Context>) -> Self {
        Self { state }
    }
}

/// The response stream of `ConsumeStream`, on a node and on a balancer.
pub type FrameStream = Pin<Box<dyn Stream<Item = Result<ConsumeResponse, Status>> + Send>>;

#[tonic::async_trait]
impl proto::streaming_server::Streaming for StreamingService {
    type ConsumeStreamStream = FrameStream;

    async fn produce_stream(
        &self,
        request: Request<Streaming<ProduceRequest>>,
    ) -> Result<Response<ProduceResponse>, Status> {
        let peer = self.state.caller(&request);
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
            loop {
                let message = tokio::select! {
                    message = frames.message() => message.map_err(|status| {
                        Error::InvalidArgument(format!("reading the stream: {}", status.message()))
                    })?,
                    _ = state.abort.cancelled() => {
                        return Err(Error::Unavailable("the node is shutting down".into()));
                    }
                };
                let Some(ProduceRequest {
                    point,
                    frame,
                    content_type,
                    expected_offset,
                }) = message
                else {
                    return Ok(());
                };
                let slot = match slots.get(&point) {
                    Some(&slot) => slot,
                    None => {
                        let id = PointId::new(point.as_str())?;
                        state
                            .access
                            .authorize(&peer, Action::Produce, id.as_str())
                            .await?;
                        state.gate.admit_write(&id).await?;
                        // The type travels with the point's first frame in the stream.
                        if !content_type.is_empty() {
                            if !crate::content::is_valid(&content_type) {
                                return Err(Error::InvalidArgument(format!(
                                    "content type {:?} is not a media type (type/subtype)",
                                    crate::error::bounded(&content_type)
                                )));
                            }
                            state.store.set_content_type(&id, &content_type).await?;
                        }
                        points.push(id);
                        slots.insert(point, points.len() - 1);
                        points.len() - 1
                    }
                };
                if frame.len() as u64 > state.config.max_frame_size {
                    return Err(Error::InvalidArgument(format!(
                        "frame of {} bytes for point {:?} exceeds max_frame_size ({} bytes)",
                        frame.len(),
                        points[slot].as_str(),
                        state.config.max_frame_size
                    )));
                }
                ::metrics::counter!(metrics::PRODUCED_FRAMES).increment(1);
                ::metrics::counter!(metrics::PRODUCED_BYTES).increment(frame.len() as u64);
                let frame = Frame {
                    slot,
                    point: points[slot].clone(),
                    bytes: frame,
                    expected_offset,
                };
                if tx.send(frame).await.is_err() {
                    // The writer stopped on an error; it is reported below.
                    return Ok(());
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
            .map(|(&slot, appended)| (points[slot].clone(), appended.end))
            .collect();
        state.wait_for_replicas(&ends).await?;
        let records = points
            .into_iter()
            .enumerate()
            .map(|(slot, id)| {
                let appended = last.get(&slot).copied().unwrap_or_default();
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

    async fn consume_stream(
        &self,
        request: Request<ConsumeRequest>,
    ) -> Result<Response<Self::ConsumeStreamStream>, Status> {
        let peer = self.state.caller(&request);
        let request = request.into_inner();
        let state = self.state.clone();
        let id = PointId::new(request.point.as_str()).map_err(Error::from)?;
        state
            .access
            .authorize(&peer, Action::Consume, id.as_str())
            .await?;
        let point = state.gate.admit_read(&id).await?;
        let snapshot = point.snapshot();
        let window = read_window(
            &request,
            snapshot,
            state.config.max_chunk_size,
            state.config.max_frame_size,
        )?;

        let (frames, received) = mpsc::channel(READ_AHEAD);
        tokio::spawn(point.stream(state.store.clone(), window, frames, state.shutdown.clone()));
        let responses = ReceiverStream::new(received).map(|frame| {
            frame
                .map(|(offset, frame)| {
                    ::metrics::counter!(metrics::CONSUMED_FRAMES).increment(1);
                    ::metrics::counter!(metrics::CONSUMED_BYTES).increment(frame.len() as u64);
                    ConsumeResponse { frame, offset }
                })
                .map_err(|error| match error {
                    StreamError::Read(error) => Status::from(Error::from(error)),
                    StreamError::ShuttingDown => {
                        Status::from(Error::Unavailable("the node is shutting down".into()))
                    }
                })
        });
        Ok(Response::new(Box::pin(responses)))
    }

    async fn get_metadata(
        &self,
        request: Request<MetadataRequest>,
    ) -> Result<Response<MetadataResponse>, Status> {
        let peer = self.state.caller(&request);
        let action = self.state.metadata_action(&request);
        let id = PointId::new(request.into_inner().point).map_err(Error::from)?;
        let state = &self.state;
        state.access.authorize(&peer, action, id.as_str()).await?;
        let snapshot = state.gate.admit_read(&id).await?.snapshot();
        let ownership = state.store.ownership(&id).await.map_err(Error::from)?;
        let owner = match ownership.owner.clone() {
            Some(owner) => owner,
            None => state
                .placement
                .owners(id.as_str(), 1)
                .await
                .map(|(_, owners)| owners[0].clone())
                .unwrap_or_default(),
        };
        let replicas = state
            .replicas(&id)
            .into_iter()
            .map(|replica| proto::ReplicaProgress {
                follower: replica.follower,
                end: replica.end,
                lag: snapshot.end.saturating_sub(replica.end),
                connected: replica.connected,
                rpc_addr: replica.rpc_address,
            })
            .collect();
        Ok(Response::new(MetadataResponse {
            workers: state.workers(&id, snapshot.end),
            size: snapshot.end,
            crc32c: snapshot.crc,
            node: state.config.node_name.clone(),
            role: state.config.role.as_str().into(),
            replicas,
            content_type: state.store.media_type(&id).await.map_err(Error::from)?,
            epoch: ownership.epoch,
            owner,
        }))
    }

    async fn list_points(
        &self,
        request: Request<ListPointsRequest>,
    ) -> Result<Response<ListPointsResponse>, Status> {
        let peer = self.state.caller(&request);
        let request = request.into_inner();
        self.state
            .access
            .authorize(&peer, Action::Metadata, &request.prefix)
            .await?;
        let max = match request.max_results {
            0 => 1000,
            n => n.min(10_000) as usize,
        };
        let start_after = (!request.start_after.is_empty()).then_some(request.start_after.as_str());
        // One more than asked tells whether another page follows.
        let mut points = self.state.store.list(&request.prefix, start_after, max + 1);
        let next = if points.len() > max {
            points.truncate(max);
            points
                .last()
                .map(|id| id.as_str().to_owned())
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(ListPointsResponse {
            points: points
                .into_iter()
                .map(|id| id.as_str().to_owned())
                .collect(),
            next,
        }))
    }

    async fn locate_point(
        &self,
        request: Request<LocatePointRequest>,
    ) -> Result<Response<LocatePointResponse>, Status> {
        let peer = self.state.caller(&request);
        let request = request.into_inner();
        let id = PointId::new(request.point).map_err(Error::from)?;
        self.state
            .access
            .authorize(&peer, Action::Metadata, id.as_str())
            .await?;
        let located = locate(&self.state.placement, &id, request.replicas).await?;
        Ok(Response::new(located))
    }

    async fn list_members(
        &self,
        request: Request<ListMembersRequest>,
    ) -> Result<Response<ListMembersResponse>, Status> {
        let peer = self.state.caller(&request);
        let state = &self.state;
        state.access.authorize(&peer, Action::Metadata, "").await?;
        Ok(Response::new(members(&state.placement.membership())))
    }

    async fn sign_url(
        &self,
        request: Request<SignUrlRequest>,
    ) -> Result<Response<SignUrlResponse>, Status> {
        let peer = self.state.caller(&request);
        let state = &self.state;
        let signed = sign_url(&state.access, &state.signer, &peer, request.into_inner()).await?;
        Ok(Response::new(signed))
    }

    async fn drain_member(
        &self,
        request: Request<DrainMemberRequest>,
    ) -> Result<Response<DrainMemberResponse>, Status> {
        let peer = self.state.caller(&request);
        let state = &self.state;
        state.access.authorize(&peer, Action::Admin, "").await?;
        state.check_addressed(&request.into_inner().node)?;
        let local = &state.config.node_name;
        let current = state
            .placement
            .membership()
            .ring
            .members
            .get(local)
            .map(|member| member.lifecycle);
        if current != Some(Lifecycle::Left) {
            state
                .steps
                .set_lifecycle(Lifecycle::Leaving)
                .await
                .map_err(|error| {
                    Error::FailedPrecondition(format!("cannot drain {local}: {error}"))
                })?;
            tracing::info!(subject = %peer.subject, "draining: handing every point to its next owner");
        }
        let state = current
            .filter(|&lifecycle| lifecycle == Lifecycle::Left)
            .unwrap_or(Lifecycle::Leaving);
        Ok(Response::new(DrainMemberResponse {
            state: state.as_str().to_owned(),
        }))
    }

    async fn forget_member(
        &self,
        request: Request<ForgetMemberRequest>,
    ) -> Result<Response<ForgetMemberResponse>, Status> {
        let peer = self.state.caller(&request);
        let state = &self.state;
        state.access.authorize(&peer, Action::Admin, "").await?;
        let node = request.into_inner().node;
        state
            .steps
            .forget(&node)
            .await
            .map_err(|error| match error {
                StepError::Unknown(_) => Status::not_found(error.to_string()),
                StepError::Stopped => Status::unavailable(error.to_string()),
                _ => Status::failed_precondition(format!("cannot forget {node}: {error}")),
            })?;
        tracing::warn!(%node, subject = %peer.subject, "forgot a dead primary: its points are taken over from its followers");
        Ok(Response::new(ForgetMemberResponse {
            state: Lifecycle::Forgotten.as_str().to_owned(),
        }))
    }

    async fn cleanup_member(
        &self,
        request: Request<CleanupMemberRequest>,
    ) -> Result<Response<CleanupMemberResponse>, Status> {
        let peer = self.state.caller(&request);
        let state = &self.state;
        state.access.authorize(&peer, Action::Admin, "").await?;
        state.check_addressed(&request.into_inner().node)?;
        let store = &state.store;
        let (mut points, mut bytes) = (0, 0);
        for id in store.list("", None, usize::MAX) {
            let moved = matches!(
                store.ownership(&id).await.map(|o| o.handover),
                Ok(Some(Handover::Moved { .. }))
            );
            if !moved {
                continue;
            }
            match store.delete(&id).await {
                Ok(size) => {
                    points += 1;
                    bytes += size;
                }
                Err(crate::point::DeleteError::NotFound(_)) => {}
                Err(error) => return Err(Error::from(error).into()),
            }
        }
        tracing::info!(points, bytes, subject = %peer.subject, "deleted the copies handed over to other members");
        Ok(Response::new(CleanupMemberResponse { points, bytes }))
    }

    async fn delete_point(
        &self,
        request: Request<DeletePointRequest>,
    ) -> Result<Response<DeletePointResponse>, Status> {
        let peer = self.state.caller(&request);
        let id = PointId::new(request.into_inner().point).map_err(Error::from)?;
        self.state.gate.check_writable().map_err(Error::from)?;
        self.state
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
        let size = self.state.store.delete(&id).await.map_err(Error::from)?;
        tracing::info!(point = %id, size, subject = %peer.subject, "deleted point");
        Ok(Response::new(DeletePointResponse { size }))
    }
}

/// `LocatePoint`: the ring's owners of `id` as placement ranks them, with their addresses.
pub async fn locate(
    placement: &Placement,
    id: &PointId,
    replicas: u32,
) -> Result<LocatePointResponse, Error> {
    let (membership, owners) = placement.owners(id.as_str(), replicas.max(1)).await?;
    let owners = owners
        .iter()
        .map(|name| proto::Server {
            rpc_addr: membership.rpc_addr(name).unwrap_or_default().to_owned(),
            name: name.clone(),
        })
        .collect();
    Ok(LocatePointResponse {
        owners,
        membership_version: membership.ring_version,
        ring: membership.ring.id.clone(),
    })
}

/// `SignUrl`: a gateway URL for `caller`, who must be allowed to `consume` the point.
pub async fn sign_url(
    access: &Access,
    signer: &UrlSigner,
    caller: &PeerInfo,
    request: SignUrlRequest,
) -> Result<SignUrlResponse, Error> {
    let id = PointId::new(request.point)?;
    access
        .authorize(caller, Action::Consume, id.as_str())
        .await?;
    let ttl = match request.ttl_seconds {
        0 => Duration::from_secs(3600),
        seconds => Duration::from_secs(seconds),
    };
    let (url, expires) = signer
        .sign(id.as_str(), &caller.subject, ttl, request.player)
        .map_err(|error| match error {
            UrlError::NoKeys => Error::FailedPrecondition(error.to_string()),
            other => Error::InvalidArgument(other.to_string()),
        })?;
    Ok(SignUrlResponse { url, expires })
}

/// The live balancer members (what `GetServers` answers: their addresses, not only names).
pub fn balancers(membership: &Membership) -> Vec<proto::Server> {
    membership
        .view
        .members
        .values()
        .filter(|member| member.role.is_balancer())
        .map(|member| proto::Server {
            rpc_addr: member.rpc_addr.clone(),
            name: member.name.clone(),
        })
        .collect()
}

/// A received frame on its way to the writer.
struct Frame {
    /// The point's place in the stream's first-seen order.
    slot: usize,
    point: PointId,
    bytes: Bytes,
    expected_offset: Option<u64>,
}

/// Appends the stream's frames in order, consecutive frames of one point as one batch. A frame
/// with an `expected_offset` joins the batch before it only if that is exactly where the batch
/// ends; otherwise it starts its own, appended only at that offset.
async fn write_frames(
    state: Arc<Context>,
    mut frames: mpsc::Receiver<Frame>,
) -> Result<HashMap<usize, Appended>, Error> {
    let mut last = HashMap::new();
    let mut pending = None;
    loop {
        let Some(first) = (match pending.take() {
            Some(next) => Some(next),
            None => frames.recv().await,
        }) else {
            return Ok(last);
        };
        let mut size = first.bytes.len() as u64;
        let mut batch = vec![first.bytes];
        while size < MAX_BATCH_BYTES {
            match frames.try_recv() {
                Ok(next)
                    if next.slot == first.slot
                        && next.expected_offset.is_none_or(|offset| {
                            first.expected_offset.map(|start| start + size) == Some(offset)
                        }) =>
                {
                    size += next.bytes.len() as u64;
                    batch.push(next.bytes);
                }
                Ok(other) => {
                    pending = Some(other);
                    break;
                }
                Err(_) => break,
            }
        }
        let appended = state
            .gate
            .append(&first.point, first.expected_offset, batch, &state.abort)
            .await?;
        if let Some(&appended) = appended.last() {
            last.insert(first.slot, appended);
        }
    }
}

/// The validated byte window of a ConsumeStream call.
fn read_window(
    request: &ConsumeRequest,
    snapshot: Snapshot,
    default_chunk: u64,
    max_frame: u64,
) -> Result<Span, Error> {
    let ConsumeRequest {
        ref point,
        offset,
        limit,
        chunk_size,
        follow,
    } = *request;
    if offset > snapshot.end {
        return Err(Error::OutOfRange(format!(
            "offset {offset} is past the end of point {point:?} ({} bytes)",
            snapshot.end
        )));
    }
    if limit != 0 && limit < offset {
        return Err(Error::InvalidArgument(format!(
            "limit {limit} is before offset {offset}"
        )));
    }
    if limit > snapshot.end && !follow {
        return Err(Error::OutOfRange(format!(
            "limit {limit} is past the end of point {point:?} ({} bytes); set follow to wait for it",
            snapshot.end
        )));
    }
    let stop = match (limit, follow) {
        (0, true) => None,
        (0, false) => Some(snapshot.end),
        (limit, _) => Some(limit),
    };
    let chunk = match chunk_size {
        0 => default_chunk,
        n => n.min(max_frame),
    };
    Ok(Span {
        offset,
        stop,
        chunk,
        follow,
    })
}

/// `LBResolverHelper` and `FollowerResolverHelper`: who serves this cluster.
#[derive(Clone)]
pub struct ResolverService {
    state: Arc<Context>,
}

impl ResolverService {
    pub fn new(state: Arc<Context>) -> Self {
        Self { state }
    }
}

#[tonic::async_trait]
impl proto::lb_resolver_helper_server::LbResolverHelper for ResolverService {
    async fn get_servers(
        &self,
        request: Request<GetServersRequest>,
    ) -> Result<Response<GetServersResponse>, Status> {
        let peer = self.state.caller(&request);
        self.state
            .access
            .authorize(&peer, Action::Metadata, "")
            .await?;
        let servers = balancers(&self.state.placement.membership());
        Ok(Response::new(GetServersResponse { servers }))
    }
}

#[tonic::async_trait]
impl proto::follower_resolver_helper_server::FollowerResolverHelper for ResolverService {
    async fn get_followers(
        &self,
        request: Request<GetFollowersRequest>,
    ) -> Result<Response<GetFollowersResponse>, Status> {
        let peer = self.state.caller(&request);
        self.state
            .access
            .authorize(&peer, Action::Metadata, "")
            .await?;
        let servers = self
            .state
            .progress
            .followers()
            .into_iter()
            .map(|(name, rpc_addr)| proto::Server { rpc_addr, name })
            .collect();
        Ok(Response::new(GetFollowersResponse { servers }))
    }
}

/// The ring's members (down or not) and every other live member.
pub fn members(membership: &Membership) -> ListMembersResponse {
    let mut members = Vec::new();
    for (name, record) in &membership.ring.members {
        let live = membership.live(name);
        members.push(proto::MemberInfo {
            name: name.clone(),
            rpc_addr: live.map_or(&record.rpc_addr, |m| &m.rpc_addr).clone(),
            replication_addr: live
                .map_or(&record.replication_addr, |m| &m.replication_addr)
                .clone(),
            gossip_addr: live.map(|m| m.gossip_addr.to_string()).unwrap_or_default(),
            role: live.map_or(record.role, |m| m.role).as_str().into(),
            state: record.lifecycle.as_str().into(),
            live: live.is_some(),
            tags: record.tags.clone().into_iter().collect(),
            in_ring: true,
            owns_range: record.owns_range(),
            leader: String::new(),
            generation: live.map_or(0, |m| m.generation),
            http_addr: live.map(|m| m.http_addr.clone()).unwrap_or_default(),
            moving: live.map_or(0, |m| m.moving),
            handed: live
                .and_then(|m| m.handed.as_ref())
                .map(Handed::to_string)
                .unwrap_or_default(),
        });
    }
    for member in membership.view.members.values() {
        if membership.ring.members.contains_key(&member.name) {
            continue;
        }
        members.push(proto::MemberInfo {
            name: member.name.clone(),
            rpc_addr: member.rpc_addr.clone(),
            replication_addr: member.replication_addr.clone(),
            gossip_addr: member.gossip_addr.to_string(),
            role: member.role.as_str().into(),
            state: member.lifecycle.as_str().into(),
            live: true,
            tags: member.tags.clone().into_iter().collect(),
            in_ring: false,
            owns_range: false,
            leader: member.leader.clone().unwrap_or_default(),
            generation: member.generation,
            http_addr: member.http_addr.clone(),
            moving: 0,
            handed: member
                .handed
                .as_ref()
                .map(Handed::to_string)
                .unwrap_or_default(),
        });
    }
    members.sort_by(|a, b| a.name.cmp(&b.name));
    ListMembersResponse {
        members,
        view: membership.view.id.clone(),
        ring: membership.ring.id.clone(),
        node: membership.local.clone(),
        conflict: membership.conflict.clone().unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(offset: u64, limit: u64, chunk_size: u64, follow: bool) -> ConsumeRequest {
        ConsumeRequest {
            point: "p".into(),
            offset,
            limit,
            chunk_size,
            follow,
        }
    }

    fn window(r: ConsumeRequest) -> Result<Span, Error> {
        let snapshot = Snapshot {
            end: 1000,
            ..Snapshot::default()
        };
        read_window(&r, snapshot, 256, 4096)
    }

    #[test]
    fn windows_are_validated() {
        assert_eq!(window(request(0, 0, 0, false)).unwrap().stop, Some(1000));
        assert_eq!(window(request(0, 0, 0, true)).unwrap().stop, None);
        assert_eq!(window(request(0, 0, 0, false)).unwrap().chunk, 256);
        assert_eq!(window(request(0, 0, 512, false)).unwrap().chunk, 512);
        assert_eq!(window(request(0, 0, 100_000, false)).unwrap().chunk, 4096);
        assert_eq!(window(request(1000, 0, 0, false)).unwrap().stop, Some(1000));
        assert!(matches!(
            window(request(1001, 0, 0, false)),
            Err(Error::OutOfRange(_))
        ));
        assert!(matches!(
            window(request(10, 5, 0, false)),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            window(request(0, 1001, 0, false)),
            Err(Error::OutOfRange(_))
        ));
        assert_eq!(window(request(0, 5000, 0, true)).unwrap().stop, Some(5000));
    }
}
