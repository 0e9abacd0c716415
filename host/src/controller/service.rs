//! The `goutube.controller.v1` service every primary serves on its API port: Raft messages from
//! the voters, proposals from members, changes of the voters, the status, and the committed
//! state as it changes (`Watch`, how members that are not voters follow it). A primary whose
//! controller has not started yet (its voters are the ring's founders, known once the ring is
//! formed) answers `Unavailable`.
//!
//! Only members speak it: with TLS, a Raft message's (or a heartbeat's) certificate must name
//! the node it says it comes from (`node:<name>`, as replication checks), and a proposal must come with a node
//! certificate. A message from another cluster, or from a controller formed by other voters, is
//! refused (`FailedPrecondition`), naming the difference: two controllers must never mix. A vote
//! from a node that is not a voter is refused (`PermissionDenied`).

use std::pin::Pin;

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::watch;
use tokio_stream::wrappers::{IntervalStream, WatchStream};
use tokio_stream::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use super::{Controller, Grant, ProposeError, Topology, VotersError};
use crate::net::{NODE_PREFIX, PeerInfo, check_identity};
use crate::proto::controller::controller_server;
use crate::proto::controller::{
    HeartbeatRequest, HeartbeatResponse, ProposeRequest, ProposeResponse, RaftMessage,
    SetVotersRequest, SetVotersResponse, StatusRequest, StatusResponse,
};

/// How often `Watch` sends the committed state even when it did not change.
pub(super) const WATCH_REFRESH: std::time::Duration = std::time::Duration::from_secs(1);

/// The service of one voter.
pub struct ControllerService {
    controller: watch::Receiver<Option<Controller>>,
    tls: bool,
    /// The node's shutdown: `Watch` streams end with it (a graceful stop waits for every
    /// stream to end).
    stop: CancellationToken,
}

impl ControllerService {
    /// The service of the controller `controller` holds once it started; `tls`: whether
    /// callers present certificates; `stop`: the node's shutdown.
    pub fn new(
        controller: watch::Receiver<Option<Controller>>,
        tls: bool,
        stop: CancellationToken,
    ) -> Self {
        ControllerService {
            controller,
            tls,
            stop,
        }
    }

    /// The controller, once started.
    fn controller(&self) -> Result<Controller, Status> {
        self.controller.borrow().clone().ok_or_else(|| {
            Status::unavailable(
                "this node's controller has not started yet (its ring is not formed)",
            )
        })
    }

    /// Refuses a caller without a node certificate (with TLS).
    fn admit_member(&self, caller: &PeerInfo, what: &str) -> Result<(), Status> {
        if self.tls && !caller.subject.starts_with(NODE_PREFIX) {
            return Err(Status::permission_denied(format!(
                "{}: only members {what}",
                caller.subject
            )));
        }
        Ok(())
    }

    /// The gRPC server of this service.
    pub fn server(self) -> controller_server::ControllerServer<Self> {
        controller_server::ControllerServer::new(self)
    }

    /// Refuses a Raft message that is not from a voter of this very controller.
    fn admit(
        &self,
        controller: &Controller,
        caller: &PeerInfo,
        message: &RaftMessage,
    ) -> Result<(), Status> {
        let peers = &controller.peers;
        check_identity(&caller.subject, &message.from, self.tls)
            .map_err(|e| Status::permission_denied(e.to_string()))?;
        if message.cluster != peers.cluster {
            return Err(Status::failed_precondition(format!(
                "a controller message from cluster {:?}: this node's controller belongs to \
                 cluster {:?} (cluster.name)",
                message.cluster, peers.cluster
            )));
        }
        if message.voters != peers.formation {
            return Err(Status::failed_precondition(format!(
                "controller.voters differ: {} belongs to a controller formed by {:?}, {} to one \
                 formed by {:?}",
                message.from, message.voters, peers.local, peers.formation
            )));
        }
        // A leader's appends and snapshots reach a voter that may not know yet of the change
        // that made it leader; votes come from voters only, so a voter that was replaced cannot
        // disturb the ones that replaced it.
        if message.kind == "vote" && !controller.admits_votes_from(&message.from) {
            return Err(Status::permission_denied(format!(
                "{} is not a voter of this controller (its voters: {:?})",
                message.from,
                controller.status().voters
            )));
        }
        Ok(())
    }
}

fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, Status> {
    serde_json::from_slice(body)
        .map_err(|e| Status::invalid_argument(format!("undecodable controller message: {e}")))
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, Status> {
    serde_json::to_vec(value).map_err(|e| Status::internal(e.to_string()))
}

#[tonic::async_trait]
impl controller_server::Controller for ControllerService {
    async fn raft(&self, request: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        let caller = PeerInfo::of(&request);
        let message = request.into_inner();
        let controller = self.controller()?;
        self.admit(&controller, &caller, &message)?;
        let raft = &controller.raft;
        let body = match message.kind.as_str() {
            "append" => encode(&raft.append_entries(decode(&message.body)?).await)?,
            "vote" => encode(&raft.vote(decode(&message.body)?).await)?,
            "snapshot" => encode(&raft.install_snapshot(decode(&message.body)?).await)?,
            other => {
                return Err(Status::invalid_argument(format!(
                    "no controller message of kind {other:?}"
                )));
            }
        };
        let peers = &controller.peers;
        Ok(Response::new(RaftMessage {
            kind: message.kind,
            from: peers.local.clone(),
            body: body.into(),
            cluster: peers.cluster.clone(),
            voters: peers.formation.clone(),
        }))
    }

    async fn propose(
        &self,
        request: Request<ProposeRequest>,
    ) -> Result<Response<ProposeResponse>, Status> {
        self.admit_member(&PeerInfo::of(&request), "propose to the controller")?;
        let controller = self.controller()?;
        let command = decode(&request.into_inner().command)?;
        let outcome = match controller.propose(command).await {
            Ok(applied) => Ok(applied),
            Err(ProposeError::Refused(refused)) => Err(refused),
            Err(error) => return Err(Status::unavailable(error.to_string())),
        };
        Ok(Response::new(ProposeResponse {
            outcome: encode(&outcome)?.into(),
        }))
    }

    async fn set_voters(
        &self,
        request: Request<SetVotersRequest>,
    ) -> Result<Response<SetVotersResponse>, Status> {
        self.admit_member(&PeerInfo::of(&request), "change the controller's voters")?;
        let controller = self.controller()?;
        match controller.set_voters(request.into_inner().voters).await {
            Ok(voters) => Ok(Response::new(SetVotersResponse { voters })),
            Err(error @ VotersError::Refused(_)) => {
                Err(Status::failed_precondition(error.to_string()))
            }
            Err(error) => Err(Status::unavailable(error.to_string())),
        }
    }

    async fn heartbeat(
        &self,
        request: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        let caller = PeerInfo::of(&request);
        let HeartbeatRequest { member, held } = request.into_inner();
        check_identity(&caller.subject, &member, self.tls)
            .map_err(|e| Status::permission_denied(e.to_string()))?;
        let controller = self.controller()?;
        let answer = match controller.heartbeat(&member, held).await {
            Grant::Session { length, applied } => HeartbeatResponse {
                session_ms: u64::try_from(length.as_millis()).unwrap_or(u64::MAX),
                leader: controller.peers.local.clone(),
                applied,
            },
            Grant::NotLeader(leader) => HeartbeatResponse {
                session_ms: 0,
                leader: leader.unwrap_or_default(),
                applied: 0,
            },
            Grant::NoQuorum(why) => {
                return Err(Status::unavailable(format!(
                    "no session granted: this voter cannot confirm that it leads the controller \
                     ({why})"
                )));
            }
        };
        Ok(Response::new(answer))
    }

    async fn status(
        &self,
        _request: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        let controller = self.controller()?;
        let topology = controller.topology().borrow().clone();
        Ok(Response::new(status_of(&controller, &topology)?))
    }

    type WatchStream = Pin<Box<dyn Stream<Item = Result<StatusResponse, Status>> + Send>>;

    async fn watch(
        &self,
        request: Request<StatusRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        self.admit_member(&PeerInfo::of(&request), "follow the controller")?;
        let controller = self.controller()?;
        // The state now and again every `WATCH_REFRESH` even when nothing changed, so that a
        // member notices a voter that stopped answering (a stopped process keeps its sockets).
        let latest = controller.topology();
        let refresh = IntervalStream::new(tokio::time::interval(WATCH_REFRESH))
            .map(move |_| latest.borrow().clone());
        let updates = WatchStream::new(controller.topology())
            .merge(refresh)
            .map(move |topology| status_of(&controller, &topology));
        let updates = futures::StreamExt::take_until(updates, self.stop.clone().cancelled_owned());
        Ok(Response::new(Box::pin(updates)))
    }
}

/// The status of `controller` with `topology`, its committed state.
fn status_of(controller: &Controller, topology: &Topology) -> Result<StatusResponse, Status> {
    let status = controller.status();
    Ok(StatusResponse {
        voters: status.voters,
        leader: status.leader.unwrap_or_default(),
        term: status.term,
        applied: status.applied,
        topology: encode(topology)?.into(),
    })
}
