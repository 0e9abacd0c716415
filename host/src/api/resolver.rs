//! `LBResolverHelper` and `FollowerResolverHelper`: who serves this cluster (its balancers,
//! this leader's followers), for clients that balance by themselves.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::Context;
use super::streaming::balancers;
use crate::access::Action;
use crate::proto::{
    self, GetFollowersRequest, GetFollowersResponse, GetServersRequest, GetServersResponse,
};

/// `LBResolverHelper` and `FollowerResolverHelper`: who serves this cluster.
#[derive(Clone)]
pub struct ResolverService {
    state: Arc<Context>,
}

impl ResolverService {
    /// The helpers of the node whose handlers share `state`.
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
        let peer = self.state.caller(&request)?;
        self.state
            .services
            .access
            .authorize(&peer, Action::Metadata, "")
            .await?;
        let servers = balancers(&self.state.services.placement.membership());
        Ok(Response::new(GetServersResponse { servers }))
    }
}

#[tonic::async_trait]
impl proto::follower_resolver_helper_server::FollowerResolverHelper for ResolverService {
    async fn get_followers(
        &self,
        request: Request<GetFollowersRequest>,
    ) -> Result<Response<GetFollowersResponse>, Status> {
        let peer = self.state.caller(&request)?;
        self.state
            .services
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
