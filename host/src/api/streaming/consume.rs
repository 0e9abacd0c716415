//! Reads: `ConsumeStream` (a bounded channel fed by a spawned task, so a slow client holds at
//! most a few frames and a cancelled one stops the task), `GetMetadata`, `ListPoints` and
//! `LocatePoint`.

use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::access::Action;
use crate::error::Error;
use crate::metrics;
use crate::placement::Owners;
use crate::point::{PointId, Snapshot, Span, StreamError};
use crate::proto::{
    self, ConsumeRequest, ConsumeResponse, ListPointsRequest, ListPointsResponse,
    LocatePointRequest, LocatePointResponse, MetadataRequest, MetadataResponse,
};
use crate::services::Services;

use super::{FrameStream, StreamingService};

/// Frames a ConsumeStream task may read ahead of the client.
const READ_AHEAD: usize = 4;

impl StreamingService {
    pub(super) async fn consume(
        &self,
        request: Request<ConsumeRequest>,
    ) -> Result<Response<FrameStream>, Status> {
        let peer = self.state.caller(&request)?;
        let request = request.into_inner();
        let state = self.state.clone();
        let id = PointId::new(request.point.as_str()).map_err(Error::from)?;
        state
            .services
            .access
            .authorize(&peer, Action::Consume, id.as_str())
            .await?;
        let point = state.gate.admit_read(&id).await?;
        let snapshot = point.snapshot();
        let window = read_window(
            &request,
            snapshot,
            state.services.config.max_chunk_size,
            state.services.config.max_frame_size,
        )?;

        let (frames, received) = mpsc::channel(READ_AHEAD);
        tokio::spawn(point.stream(
            state.store.clone(),
            window,
            frames,
            state.services.lifetime.shutdown.clone(),
        ));
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

    pub(super) async fn metadata(
        &self,
        request: Request<MetadataRequest>,
    ) -> Result<Response<MetadataResponse>, Status> {
        let peer = self.state.caller(&request)?;
        let action = self.state.metadata_action(&request);
        let id = PointId::new(request.into_inner().point).map_err(Error::from)?;
        let state = &self.state;
        // The owner by placement is asked with the decision, so that the two plugin calls share
        // a trip to the blocking pool (`crate::askers`); a caller denied is told nothing of it.
        let (allowed, placed) = tokio::join!(
            state.services.access.authorize(&peer, action, id.as_str()),
            state.services.placement.owners(id.as_str(), 1),
        );
        allowed?;
        let point = state.gate.admit_read(&id).await?;
        let snapshot = point.snapshot();
        let ownership = state.store.ownership(&id).await.map_err(Error::from)?;
        let owner = match ownership.owner.clone() {
            Some(owner) => owner,
            None => placed
                .map(|owners| owners.first().to_owned())
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
            workers: state.workers(&id, snapshot.committed),
            size: snapshot.committed,
            crc32c: snapshot.committed_crc,
            stored_size: Some(snapshot.end),
            stored_crc32c: Some(snapshot.crc),
            node: state.services.config.node_name.clone(),
            role: state.services.config.role.as_str().into(),
            replicas,
            content_type: state.store.media_type(&id).await.map_err(Error::from)?,
            epoch: ownership.epoch,
            owner,
            modified_ms: point
                .modified(&state.store)
                .await
                .and_then(|at| at.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|since| since.as_millis() as u64),
        }))
    }

    pub(super) async fn list(
        &self,
        request: Request<ListPointsRequest>,
    ) -> Result<Response<ListPointsResponse>, Status> {
        let peer = self.state.caller(&request)?;
        let request = request.into_inner();
        self.state
            .services
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

    pub(super) async fn locate_point(
        &self,
        request: Request<LocatePointRequest>,
    ) -> Result<Response<LocatePointResponse>, Status> {
        let peer = self.state.caller(&request)?;
        let request = request.into_inner();
        let id = PointId::new(request.point).map_err(Error::from)?;
        self.state
            .services
            .access
            .authorize(&peer, Action::Metadata, id.as_str())
            .await?;
        let located = locate(&self.state.services, &id, request.replicas).await?;
        Ok(Response::new(located))
    }
}

/// `LocatePoint`: the ring's owners of `id` as placement ranks them, with their addresses, and
/// the member that takes its writes now.
pub async fn locate(
    services: &Services,
    id: &PointId,
    replicas: u32,
) -> Result<LocatePointResponse, Error> {
    let placement = &services.placement;
    let Owners { membership, names } = placement.owners(id.as_str(), replicas.max(1)).await?;
    let server = |name: &str| proto::Server {
        rpc_addr: membership.rpc_addr(name).unwrap_or_default().to_owned(),
        name: name.to_owned(),
    };
    let owners = names.iter().map(|name| server(name)).collect();
    let topology = services.controller.topology();
    let writer = names.first().map(|slot| server(topology.writer(slot)));
    Ok(LocatePointResponse {
        owners,
        writer,
        membership_version: membership.ring_version,
        ring: membership.ring.id.clone(),
    })
}

/// The validated byte window of a ConsumeStream call.
pub(super) fn read_window(
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
    // Consumers are served the committed bytes (`docs/failover.md`).
    let end = snapshot.committed;
    if offset > end {
        return Err(Error::OutOfRange(format!(
            "offset {offset} is past the end of point {point:?} ({end} bytes)"
        )));
    }
    if limit != 0 && limit < offset {
        return Err(Error::InvalidArgument(format!(
            "limit {limit} is before offset {offset}"
        )));
    }
    if limit > end && !follow {
        return Err(Error::OutOfRange(format!(
            "limit {limit} is past the end of point {point:?} ({end} bytes); set follow to wait for it"
        )));
    }
    let stop = match (limit, follow) {
        (0, true) => None,
        (0, false) => Some(end),
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
            end: 1200,
            committed: 1000,
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
