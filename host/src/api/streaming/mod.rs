//! The `streaming.v1` service: one method per call, each served by a handler of the file for
//! its kind — writes in `produce.rs`, reads in `consume.rs`, the operator's calls in
//! `operator.rs` (the resolver helpers are `api::resolver`).
//!
//! Each call authorizes its subject first, validates its input into typed values, and maps every
//! failure to a status through [`Error`]. A write is accepted only by the point's owner on the
//! ring; elsewhere it is refused with the owner in the status. ConsumeStream feeds a bounded
//! channel from a spawned task, so a slow client holds at most a few frames in memory and a
//! cancelled client stops the task.

mod consume;
mod operator;
mod produce;

use std::pin::Pin;
use std::sync::Arc;

use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

use super::Context;
use crate::proto::{
    self, CleanupMemberRequest, CleanupMemberResponse, ConsumeRequest, ConsumeResponse,
    DeletePointRequest, DeletePointResponse, DrainMemberRequest, DrainMemberResponse,
    ElectLeaderRequest, ElectLeaderResponse, ForgetMemberRequest, ForgetMemberResponse,
    ListMembersRequest, ListMembersResponse, ListPointsRequest, ListPointsResponse,
    LocatePointRequest, LocatePointResponse, MetadataRequest, MetadataResponse, ProduceRequest,
    ProduceResponse, SetVotersRequest, SetVotersResponse, SignUrlRequest, SignUrlResponse,
    TransferLeadershipRequest, TransferLeadershipResponse,
};

pub use consume::locate;
pub use operator::{balancers, members, sign_url};

/// The `streaming.v1` service of a storage node.
pub struct StreamingService {
    state: Arc<Context>,
}

impl StreamingService {
    /// The service of the node whose handlers share `state`.
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
        self.produce(request).await
    }

    async fn consume_stream(
        &self,
        request: Request<ConsumeRequest>,
    ) -> Result<Response<Self::ConsumeStreamStream>, Status> {
        self.consume(request).await
    }

    async fn get_metadata(
        &self,
        request: Request<MetadataRequest>,
    ) -> Result<Response<MetadataResponse>, Status> {
        self.metadata(request).await
    }

    async fn list_points(
        &self,
        request: Request<ListPointsRequest>,
    ) -> Result<Response<ListPointsResponse>, Status> {
        self.list(request).await
    }

    async fn locate_point(
        &self,
        request: Request<LocatePointRequest>,
    ) -> Result<Response<LocatePointResponse>, Status> {
        self.locate_point(request).await
    }

    async fn list_members(
        &self,
        request: Request<ListMembersRequest>,
    ) -> Result<Response<ListMembersResponse>, Status> {
        self.list_members(request).await
    }

    async fn sign_url(
        &self,
        request: Request<SignUrlRequest>,
    ) -> Result<Response<SignUrlResponse>, Status> {
        self.sign(request).await
    }

    async fn drain_member(
        &self,
        request: Request<DrainMemberRequest>,
    ) -> Result<Response<DrainMemberResponse>, Status> {
        self.drain(request).await
    }

    async fn forget_member(
        &self,
        request: Request<ForgetMemberRequest>,
    ) -> Result<Response<ForgetMemberResponse>, Status> {
        self.forget(request).await
    }

    async fn set_voters(
        &self,
        request: Request<SetVotersRequest>,
    ) -> Result<Response<SetVotersResponse>, Status> {
        self.set_voters(request).await
    }

    async fn cleanup_member(
        &self,
        request: Request<CleanupMemberRequest>,
    ) -> Result<Response<CleanupMemberResponse>, Status> {
        self.cleanup(request).await
    }

    async fn transfer_leadership(
        &self,
        request: Request<TransferLeadershipRequest>,
    ) -> Result<Response<TransferLeadershipResponse>, Status> {
        self.transfer(request).await
    }

    async fn elect_leader(
        &self,
        request: Request<ElectLeaderRequest>,
    ) -> Result<Response<ElectLeaderResponse>, Status> {
        self.elect(request).await
    }

    async fn delete_point(
        &self,
        request: Request<DeletePointRequest>,
    ) -> Result<Response<DeletePointResponse>, Status> {
        self.delete(request).await
    }
}
