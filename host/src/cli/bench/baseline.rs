//! The baseline server (`goutube bench baseline-server`): the same gRPC service as a node, which
//! discards what it is sent and serves reads from memory: what the network and the client cost
//! alone.

use std::pin::Pin;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use goutube::proto::streaming_server::{Streaming, StreamingServer};
use goutube::proto::{
    ConsumeRequest, ConsumeResponse, DeletePointRequest, DeletePointResponse, ListPointsRequest,
    ListPointsResponse, MetadataRequest, MetadataResponse, ProduceRequest, ProduceResponse, Record,
};

use super::workload::frame_pool;

/// The baseline: the same service, discarding produced frames and serving reads from memory.
pub(super) async fn baseline_server() -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    println!("goutube listening rpc={}", listener.local_addr()?);
    let pool = frame_pool(256 * 1024);
    let service = StreamingServer::new(Baseline { pool })
        .max_decoding_message_size(64 * 1024 * 1024)
        .max_encoding_message_size(64 * 1024 * 1024);
    // The same transport settings as a node's API server.
    goutube::api::server_builder()
        .add_service(service)
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
        .await?;
    Ok(())
}

pub(super) struct Baseline {
    pub(super) pool: Vec<Bytes>,
}

pub(super) type Frames = Pin<Box<dyn Stream<Item = Result<ConsumeResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Streaming for Baseline {
    type ConsumeStreamStream = Frames;

    async fn produce_stream(
        &self,
        request: Request<tonic::Streaming<ProduceRequest>>,
    ) -> Result<Response<ProduceResponse>, Status> {
        let mut stream = request.into_inner();
        let (mut point, mut end, mut start) = (String::new(), 0u64, 0u64);
        while let Some(message) = stream.message().await? {
            start = end;
            end += message.frame.len() as u64;
            point = message.point;
        }
        Ok(Response::new(ProduceResponse {
            records: vec![Record {
                point,
                offset: start,
                end,
                crc32c: 0,
            }],
        }))
    }

    async fn consume_stream(
        &self,
        request: Request<ConsumeRequest>,
    ) -> Result<Response<Frames>, Status> {
        let limit = request.into_inner().limit;
        let pool = self.pool.clone();
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            let mut position = 0u64;
            let mut i = 0;
            while position < limit {
                let frame = &pool[i % pool.len()];
                let len = (limit - position).min(frame.len() as u64) as usize;
                let response = ConsumeResponse {
                    frame: frame.slice(..len),
                    offset: position,
                };
                if tx.send(Ok(response)).await.is_err() {
                    return;
                }
                position += len as u64;
                i += 1;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn get_metadata(
        &self,
        _: Request<MetadataRequest>,
    ) -> Result<Response<MetadataResponse>, Status> {
        Err(Status::unimplemented("baseline"))
    }

    async fn list_points(
        &self,
        _: Request<ListPointsRequest>,
    ) -> Result<Response<ListPointsResponse>, Status> {
        Err(Status::unimplemented("baseline"))
    }

    async fn locate_point(
        &self,
        _: Request<goutube::proto::LocatePointRequest>,
    ) -> Result<Response<goutube::proto::LocatePointResponse>, Status> {
        Err(Status::unimplemented("baseline"))
    }

    async fn list_members(
        &self,
        _: Request<goutube::proto::ListMembersRequest>,
    ) -> Result<Response<goutube::proto::ListMembersResponse>, Status> {
        Err(Status::unimplemented("baseline"))
    }

    async fn drain_member(
        &self,
        _: Request<goutube::proto::DrainMemberRequest>,
    ) -> Result<Response<goutube::proto::DrainMemberResponse>, Status> {
        Err(Status::unimplemented("baseline"))
    }

    async fn cleanup_member(
        &self,
        _: Request<goutube::proto::CleanupMemberRequest>,
    ) -> Result<Response<goutube::proto::CleanupMemberResponse>, Status> {
        Err(Status::unimplemented("baseline"))
    }

    async fn forget_member(
        &self,
        _: Request<goutube::proto::ForgetMemberRequest>,
    ) -> Result<Response<goutube::proto::ForgetMemberResponse>, Status> {
        Err(Status::unimplemented("baseline"))
    }

    async fn set_voters(
        &self,
        _: Request<goutube::proto::SetVotersRequest>,
    ) -> Result<Response<goutube::proto::SetVotersResponse>, Status> {
        Err(Status::unimplemented("baseline"))
    }

    async fn transfer_leadership(
        &self,
        _: Request<goutube::proto::TransferLeadershipRequest>,
    ) -> Result<Response<goutube::proto::TransferLeadershipResponse>, Status> {
        Err(Status::unimplemented("baseline"))
    }

    async fn elect_leader(
        &self,
        _: Request<goutube::proto::ElectLeaderRequest>,
    ) -> Result<Response<goutube::proto::ElectLeaderResponse>, Status> {
        Err(Status::unimplemented("baseline"))
    }

    async fn sign_url(
        &self,
        _: Request<goutube::proto::SignUrlRequest>,
    ) -> Result<Response<goutube::proto::SignUrlResponse>, Status> {
        Err(Status::unimplemented("baseline"))
    }

    async fn delete_point(
        &self,
        _: Request<DeletePointRequest>,
    ) -> Result<Response<DeletePointResponse>, Status> {
        Ok(Response::new(DeletePointResponse { size: 0 }))
    }
}
