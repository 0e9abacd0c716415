//! The operator's calls: the members and their lifecycle (`ListMembers`, `DrainMember`,
//! `ForgetMember`, `CleanupMember`), the leadership of groups (`TransferLeadership`,
//! `ElectLeader`), the
//! controller's voters (`SetVoters`), and `SignUrl`. The lifecycle calls walk the whole store
//! or the ring; none of them is on a data path.

use std::time::Duration;

use tonic::{Request, Response, Status};

use crate::access::{Access, Action};
use crate::cluster::{Handed, Lifecycle, Membership, StepError};
use crate::config::Failover;
use crate::controller::agent::Observer;
use crate::error::Error;
use crate::net::PeerInfo;
use crate::point::{Handover, PointId};
use crate::proto::{
    self, CleanupMemberRequest, CleanupMemberResponse, DrainMemberRequest, DrainMemberResponse,
    ElectLeaderRequest, ElectLeaderResponse, ForgetMemberRequest, ForgetMemberResponse,
    ListMembersRequest, ListMembersResponse, SetVotersRequest, SetVotersResponse, SignUrlRequest,
    SignUrlResponse, TransferLeadershipRequest, TransferLeadershipResponse,
};
use crate::signed_url::{SignedUrl, UrlError, UrlSigner};

use super::StreamingService;

/// The status of an operator's decision the controller did not make: `Unavailable` while it
/// cannot decide (no quorum, no controller, stopping), else `FailedPrecondition`, saying what.
fn refused_step(error: StepError, what: &str) -> Status {
    match error {
        StepError::NoQuorum(_) | StepError::Stopped | StepError::NoController => {
            Status::unavailable(error.to_string())
        }
        _ => Status::failed_precondition(format!("{what}: {error}")),
    }
}

impl StreamingService {
    /// An operator's call: its caller, who must be allowed `admin`.
    async fn admit_operator<T>(&self, request: &Request<T>) -> Result<PeerInfo, Status> {
        let peer = self.state.caller(request)?;
        let services = &self.state.services;
        services.access.authorize(&peer, Action::Admin, "").await?;
        Ok(peer)
    }

    pub(super) async fn list_members(
        &self,
        request: Request<ListMembersRequest>,
    ) -> Result<Response<ListMembersResponse>, Status> {
        let peer = self.state.caller(&request)?;
        let state = &self.state;
        state
            .services
            .access
            .authorize(&peer, Action::Metadata, "")
            .await?;
        Ok(Response::new(members(
            &state.services.placement.membership(),
            &state.services.controller,
        )))
    }

    pub(super) async fn sign(
        &self,
        request: Request<SignUrlRequest>,
    ) -> Result<Response<SignUrlResponse>, Status> {
        let peer = self.state.caller(&request)?;
        let state = &self.state;
        let signed = sign_url(
            &state.services.access,
            &state.services.signer,
            &peer,
            request.into_inner(),
        )
        .await?;
        Ok(Response::new(signed))
    }

    pub(super) async fn drain(
        &self,
        request: Request<DrainMemberRequest>,
    ) -> Result<Response<DrainMemberResponse>, Status> {
        let state = &self.state;
        let peer = self.admit_operator(&request).await?;
        state.check_addressed(&request.into_inner().node)?;
        let local = &state.services.config.node_name;
        let current = state
            .services
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

    pub(super) async fn forget(
        &self,
        request: Request<ForgetMemberRequest>,
    ) -> Result<Response<ForgetMemberResponse>, Status> {
        let state = &self.state;
        let peer = self.admit_operator(&request).await?;
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

    pub(super) async fn transfer(
        &self,
        request: Request<TransferLeadershipRequest>,
    ) -> Result<Response<TransferLeadershipResponse>, Status> {
        let state = &self.state;
        let peer = self.admit_operator(&request).await?;
        let request = request.into_inner();
        state.check_addressed(&request.node)?;
        let to = Some(request.to.as_str()).filter(|to| !to.is_empty());
        let handed = crate::api::transfer::hand_over(state, to)
            .await
            .map_err(Error::from)?;
        let transfers = handed
            .into_iter()
            .map(|handed| {
                tracing::info!(slot = %handed.slot, to = %handed.to, subject = %peer.subject, "an operator moved the group's leadership");
                proto::LeadershipTransfer {
                    slot: handed.slot,
                    to: handed.to,
                    held_ms: u64::try_from(handed.held.as_millis()).unwrap_or(u64::MAX),
                }
            })
            .collect();
        Ok(Response::new(TransferLeadershipResponse { transfers }))
    }

    pub(super) async fn elect(
        &self,
        request: Request<ElectLeaderRequest>,
    ) -> Result<Response<ElectLeaderResponse>, Status> {
        let state = &self.state;
        let peer = self.admit_operator(&request).await?;
        let ElectLeaderRequest { slot, to, unclean } = request.into_inner();
        if !unclean {
            return Err(Status::invalid_argument(format!(
                "naming {to} the leader of {slot} outside its in-sync set may lose acknowledged \
                 writes: say so with unclean = true (goutube members elect {slot} --to {to} \
                 --unclean)"
            )));
        }
        state
            .steps
            .elect_unclean(&slot, &to)
            .await
            .map_err(|error| refused_step(error, &format!("cannot elect {to} for {slot}")))?;
        // Answered from this node's view once it has the entry (or after the wait, as it is).
        let wait = Duration::from_millis(state.services.config.controller.propose_timeout_ms);
        state
            .until_view(wait, |topology| topology.writer(&slot) == to)
            .await;
        let topology = state.services.controller.topology();
        let group = topology.groups.get(&slot).cloned();
        let (leader, leader_epoch) = group.map_or((to.clone(), 0), |g| (g.leader, g.leader_epoch));
        tracing::warn!(%slot, %leader, leader_epoch, subject = %peer.subject, "an operator named a leader outside the in-sync set: acknowledged writes only the lost members held are lost");
        Ok(Response::new(ElectLeaderResponse {
            leader,
            leader_epoch,
        }))
    }

    pub(super) async fn set_voters(
        &self,
        request: Request<SetVotersRequest>,
    ) -> Result<Response<SetVotersResponse>, Status> {
        let peer = self.admit_operator(&request).await?;
        let mut voters = request.into_inner().voters;
        voters.sort();
        self.state
            .steps
            .set_voters(voters.clone())
            .await
            .map_err(|error| refused_step(error, "cannot set the voters"))?;
        tracing::warn!(?voters, subject = %peer.subject, "the controller's voters changed");
        Ok(Response::new(SetVotersResponse { voters }))
    }

    pub(super) async fn cleanup(
        &self,
        request: Request<CleanupMemberRequest>,
    ) -> Result<Response<CleanupMemberResponse>, Status> {
        let state = &self.state;
        let peer = self.admit_operator(&request).await?;
        state.check_addressed(&request.into_inner().node)?;
        let store = &state.store;
        let (mut points, mut bytes) = (0, 0);
        // The handover index names them: no walk over every point.
        let handovers = store.handovers().await.map_err(Error::from)?;
        for (id, handover) in handovers {
            if !matches!(handover, Handover::Moved { .. }) {
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
}

/// `SignUrl`: a gateway URL for `caller`, who must be allowed to `consume` the point (to see
/// `metadata`, for the pages).
pub async fn sign_url(
    access: &Access,
    signer: &UrlSigner,
    caller: &PeerInfo,
    request: SignUrlRequest,
) -> Result<SignUrlResponse, Error> {
    let ttl = match request.ttl_seconds {
        0 => Duration::from_secs(3600),
        seconds => Duration::from_secs(seconds),
    };
    let signed = if request.pages {
        access.authorize(caller, Action::Metadata, "").await?;
        signer.sign_pages(&caller.subject, ttl)
    } else {
        let id = PointId::new(request.point)?;
        access
            .authorize(caller, Action::Consume, id.as_str())
            .await?;
        signer.sign(id.as_str(), &caller.subject, ttl, request.player)
    };
    let SignedUrl { url, expires } = signed.map_err(|error| match error {
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

/// The ring's members (down or not), every other live member, and the controller.
pub fn members(membership: &Membership, controller: &Observer) -> ListMembersResponse {
    let topology = controller.topology();
    let groups = topology
        .groups
        .iter()
        .map(|(slot, group)| proto::GroupInfo {
            slot: slot.clone(),
            leader: group.leader.clone(),
            leader_epoch: group.leader_epoch,
            followers: group.followers.iter().cloned().collect(),
            in_sync: group.in_sync.iter().cloned().collect(),
            failover: match &group.failover {
                Failover::Automatic { .. } => "automatic".to_owned(),
                Failover::Manual(why) => format!("by an operator: {why}"),
            },
            leader_unclean: group.leader_unclean,
        })
        .collect();
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
        controller: controller.status().map(|status| proto::ControllerInfo {
            voters: status.voters,
            leader: status.leader.unwrap_or_default(),
            term: status.term,
            applied: status.applied,
            ring_epoch: status.ring_epoch,
            groups,
        }),
    }
}
