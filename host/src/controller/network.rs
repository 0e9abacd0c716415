//! The controller's network: Raft messages to the other voters, and proposals to the leader,
//! as gRPC calls on their API port with this node's certificate. A voter is known by name; its
//! address is the one gossip knows (discovery), read at each call.
//!
//! Each message carries the sender's name, its cluster and the voters the controller was formed
//! with: a node refuses messages from another cluster or from a controller formed by other
//! voters (`docs/controller.md`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::watch;
use tonic::transport::Channel;

use super::raft::{NodeId, Outcome, TypeConfig, Voter};
use super::{Command, Grant, VotersError};
use crate::client::{ClientOptions, ClientTls, lazy_channel};
use crate::cluster::Membership;
use crate::proto::controller::controller_client::ControllerClient;
use crate::proto::controller::{HeartbeatRequest, ProposeRequest, RaftMessage, SetVotersRequest};

/// Who this node is to the other voters, and how it reaches them.
pub(super) struct Peers {
    /// This node's name.
    pub local: String,
    /// The cluster's name (`cluster.name`).
    pub cluster: String,
    /// The voters the controller was formed with (`controller.voters`, or the ring's founders),
    /// sorted: the same on every node, what names this controller in every message.
    pub formation: Vec<String>,
    /// The voters now, as a member that is no voter last heard them from a voter (`Watch`); the
    /// formation until then. A voter reads them from its Raft membership instead.
    voters: Mutex<Vec<String>>,
    /// Where the live members are (gossip).
    pub membership: watch::Receiver<Arc<Membership>>,
    /// This node's client identity.
    pub tls: Option<ClientTls>,
    /// One channel per address.
    channels: Mutex<HashMap<String, Channel>>,
}

/// Why a call to another node failed.
#[derive(Debug, thiserror::Error)]
pub(super) enum CallError {
    /// Gossip does not know where it is (it is down, or not started yet).
    #[error("{0} has no known address (not live in gossip)")]
    NoAddress(String),
    /// The channel could not be made.
    #[error("{0}")]
    Connect(String),
    /// It did not answer in time.
    #[error("no answer from {0} within {1:?}")]
    Timeout(String, Duration),
    /// It answered with an error status.
    #[error("{0}")]
    Status(#[from] tonic::Status),
    /// Its answer did not decode.
    #[error("undecodable answer: {0}")]
    Decode(#[from] serde_json::Error),
}

impl Peers {
    pub(super) fn new(
        local: String,
        cluster: String,
        formation: Vec<String>,
        membership: watch::Receiver<Arc<Membership>>,
        tls: Option<ClientTls>,
    ) -> Peers {
        Peers {
            local,
            cluster,
            voters: Mutex::new(formation.clone()),
            formation,
            membership,
            tls,
            channels: Mutex::default(),
        }
    }

    /// The voters now, as last learned.
    pub(super) fn voters(&self) -> Vec<String> {
        self.voters.lock().expect("poisoned").clone()
    }

    /// Keeps `voters` (sorted) as the voters now.
    pub(super) fn learn_voters(&self, mut voters: Vec<String>) {
        voters.sort();
        if !voters.is_empty() {
            *self.voters.lock().expect("poisoned") = voters;
        }
    }

    /// A client of the controller service of `name`.
    pub(super) fn client(&self, name: &str) -> Result<ControllerClient<Channel>, CallError> {
        let addr = self
            .membership
            .borrow()
            .rpc_addr(name)
            .map(str::to_owned)
            .ok_or_else(|| CallError::NoAddress(name.to_owned()))?;
        let mut channels = self.channels.lock().expect("poisoned");
        let channel = match channels.get(&addr) {
            Some(channel) => channel.clone(),
            None => {
                let options = ClientOptions {
                    addr: addr.clone(),
                    tls: self.tls.clone(),
                };
                let channel =
                    lazy_channel(&options).map_err(|e| CallError::Connect(e.to_string()))?;
                channels.insert(addr, channel.clone());
                channel
            }
        };
        Ok(ControllerClient::new(channel))
    }

    /// Asks voter `to` to decide `command` (a voter forwards it to its leader); returns the
    /// outcome it answers.
    pub(super) async fn propose(&self, to: &str, command: &Command) -> Result<Outcome, CallError> {
        let request = ProposeRequest {
            command: serde_json::to_vec(command)?.into(),
        };
        let answer = self.client(to)?.propose(request).await?;
        Ok(serde_json::from_slice(&answer.into_inner().outcome)?)
    }

    /// Asks voter `to` to make `voters` the voters (a voter forwards it to its leader); returns
    /// the voters then, or why not.
    pub(super) async fn set_voters(
        &self,
        to: &str,
        voters: &[String],
    ) -> Result<Result<Vec<String>, VotersError>, CallError> {
        let request = SetVotersRequest {
            voters: voters.to_vec(),
        };
        match self.client(to)?.set_voters(request).await {
            Ok(answer) => Ok(Ok(answer.into_inner().voters)),
            Err(status) if status.code() == tonic::Code::FailedPrecondition => {
                Ok(Err(VotersError::Refused(status.message().to_owned())))
            }
            Err(status) => Err(status.into()),
        }
    }

    /// Sends this member's heartbeat to voter `to`, waiting at most `ttl`; returns what it
    /// granted.
    /// `held` is what this member holds of its group's points ([`super::session::Held`]).
    pub(super) async fn heartbeat(
        &self,
        to: &str,
        held: u64,
        ttl: Duration,
    ) -> Result<Grant, CallError> {
        let request = HeartbeatRequest {
            member: self.local.clone(),
            held,
        };
        let mut client = self.client(to)?;
        let answer = match tokio::time::timeout(ttl, client.heartbeat(request)).await {
            Err(_) => return Err(CallError::Timeout(to.to_owned(), ttl)),
            Ok(Err(status)) if status.code() == tonic::Code::Unavailable => {
                return Ok(Grant::NoQuorum(status.message().to_owned()));
            }
            Ok(answer) => answer?.into_inner(),
        };
        Ok(match answer.session_ms {
            0 => Grant::NotLeader(Some(answer.leader).filter(|leader| !leader.is_empty())),
            ms => Grant::Session {
                length: Duration::from_millis(ms),
                applied: answer.applied,
            },
        })
    }

    /// Sends one Raft message of `kind` to `to`; returns its decoded answer, openraft's result.
    async fn raft<Q: Serialize, A: DeserializeOwned>(
        &self,
        to: &str,
        kind: &str,
        request: &Q,
        ttl: Duration,
    ) -> Result<A, CallError> {
        let mut client = self.client(to)?;
        let message = RaftMessage {
            kind: kind.to_owned(),
            from: self.local.clone(),
            cluster: self.cluster.clone(),
            voters: self.formation.clone(),
            body: serde_json::to_vec(request)?.into(),
        };
        let answer = tokio::time::timeout(ttl, client.raft(message))
            .await
            .map_err(|_| CallError::Timeout(to.to_owned(), ttl))??;
        Ok(serde_json::from_slice(&answer.into_inner().body)?)
    }
}

/// openraft's factory of links to the other voters.
#[derive(Clone)]
pub(super) struct Network(pub Arc<Peers>);

/// A link to one voter.
pub(super) struct Link {
    peers: Arc<Peers>,
    target: NodeId,
    voter: Voter,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Link;

    async fn new_client(&mut self, target: NodeId, node: &Voter) -> Link {
        Link {
            peers: self.0.clone(),
            target,
            voter: node.clone(),
        }
    }
}

impl Link {
    async fn call<Q: Serialize, A: DeserializeOwned, E: std::error::Error + DeserializeOwned>(
        &self,
        kind: &str,
        request: &Q,
        option: &RPCOption,
    ) -> Result<A, RPCError<NodeId, Voter, RaftError<NodeId, E>>> {
        let answer: Result<A, RaftError<NodeId, E>> = self
            .peers
            .raft(&self.voter.name, kind, request, option.hard_ttl())
            .await
            .map_err(|error| match error {
                CallError::NoAddress(_) | CallError::Connect(_) => {
                    RPCError::Unreachable(Unreachable::new(&error))
                }
                CallError::Status(status) if status.code() == tonic::Code::Unavailable => {
                    RPCError::Unreachable(Unreachable::new(&status))
                }
                other => RPCError::Network(NetworkError::new(&other)),
            })?;
        answer.map_err(|error| {
            RPCError::RemoteError(RemoteError::new_with_node(
                self.target,
                self.voter.clone(),
                error,
            ))
        })
    }
}

impl RaftNetwork<TypeConfig> for Link {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, Voter, RaftError<NodeId>>> {
        self.call("append", &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, Voter, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.call("snapshot", &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, Voter, RaftError<NodeId>>> {
        self.call("vote", &rpc, &option).await
    }
}
