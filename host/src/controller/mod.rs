//! The controller: a small Raft group (openraft) of the primaries named in `controller.voters`,
//! which decides what gossip must not (`docs/controller.md`): the ring, the members' lifecycle
//! and the replica groups. Gossip stays for discovery and as a liveness hint.
//!
//! | file | owns |
//! |---|---|
//! | `command.rs` | what a proposer asks ([`Command`]) and gets back ([`Applied`], [`Rejected`]) |
//! | [`state`] | the state machine: [`Topology`] and `apply` as a pure function |
//! | `raft.rs` | openraft's types and the state machine store (snapshots, the watch) |
//! | `log.rs` | the durable Raft log, vote and committed index |
//! | `files.rs` | small files replaced whole, atomically and durably |
//! | `network.rs` | Raft messages and proposals to other voters, over gRPC with node certificates |
//! | `service.rs` | the `goutube.controller.v1` service every voter serves on its API port |
//! | [`agent`] | on every member: finds the voters, starts the Raft node or follows a voter, hands the committed ring to membership, proposes this member's own steps |
//!
//! [`Controller`] is the handle the rest of the node holds: [`Controller::propose`] asks for a
//! decision (forwarded to the leader; answered once committed and applied),
//! [`Controller::topology`] watches the committed state, [`Controller::status`] says who leads.

pub mod agent;
mod command;
mod files;
mod log;
mod network;
mod raft;
mod service;
pub mod state;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{ClientWriteError, InitializeError, RaftError};
use tokio::sync::watch;

pub use command::{Applied, Command, Rejected};
pub use service::ControllerService;
pub use state::{Group, Topology};

use crate::client::ClientTls;
use crate::cluster::Membership;
use crate::config::ControllerSection;
use network::{Network, Peers};
use raft::{Machine, Raft, Voter, node_id};

/// Why the controller could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// Its files could not be opened.
    #[error("the controller's files in {dir}: {source}")]
    Files {
        /// The directory.
        dir: String,
        /// Why.
        source: std::io::Error,
    },
    /// openraft refused its configuration.
    #[error("the controller's Raft configuration: {0}")]
    Config(String),
    /// openraft did not start.
    #[error("the controller's Raft node did not start: {0}")]
    Raft(String),
}

/// Why a proposal was not decided.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProposeError {
    /// The controller refused it: a rule of the state machine.
    #[error("the controller refused: {0}")]
    Refused(#[from] Rejected),
    /// There is no controller leader now, or it could not reach a quorum in time: topology
    /// changes wait (reads and writes on a settled ring go on). The step may still be decided
    /// once a quorum is back (it may be in a voter's log already): retrying it is safe.
    #[error(
        "no controller quorum: topology changes wait ({0}); the step may still be decided once \
         a quorum is back, and retrying it is safe"
    )]
    NoQuorum(String),
    /// The controller is stopping.
    #[error("the controller is stopping")]
    Stopped,
}

/// The controller as one node sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// The voters, by name.
    pub voters: Vec<String>,
    /// The leader's name, if there is one.
    pub leader: Option<String>,
    /// The Raft term.
    pub term: u64,
    /// The last entry applied here.
    pub applied: u64,
    /// The epoch of the decision that last changed the ring.
    pub ring_epoch: u64,
}

/// The running controller of a voter.
#[derive(Clone)]
pub struct Controller {
    raft: Raft,
    peers: Arc<Peers>,
    topology: watch::Receiver<Arc<Topology>>,
    propose_timeout: Duration,
    /// A leader that heard no quorum for this long is not reported as one.
    quorum_lost_after: Duration,
}

impl Controller {
    /// Starts this voter's Raft node on the files in `dir`. A voter whose log is empty forms
    /// the group with the configured voters (every voter may do so: openraft accepts the same
    /// membership from each).
    pub async fn start(
        section: &ControllerSection,
        local: &str,
        cluster: &str,
        voters: Vec<String>,
        dir: &Path,
        membership: watch::Receiver<Arc<Membership>>,
        tls: Option<ClientTls>,
    ) -> Result<Controller, StartError> {
        let files = |source| StartError::Files {
            dir: dir.display().to_string(),
            source,
        };
        let config = openraft::Config {
            cluster_name: cluster.to_owned(),
            heartbeat_interval: section.heartbeat_ms,
            election_timeout_min: section.election_timeout_ms,
            election_timeout_max: 2 * section.election_timeout_ms,
            // The log is small: a snapshot every thousand entries keeps it so.
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(1000),
            max_in_snapshot_log_to_keep: 1000,
            // A chunk travels as JSON in one gRPC message: well under its 4 MiB limit.
            snapshot_max_chunk_size: 256 * 1024,
            ..Default::default()
        }
        .validate()
        .map_err(|e| StartError::Config(e.to_string()))?;
        let log = log::LogStore::open(dir).map_err(files)?;
        let (published, topology) = watch::channel(Arc::new(Topology::default()));
        let machine = Machine::open(dir, published).map_err(files)?;
        let peers = Arc::new(Peers::new(
            local.to_owned(),
            cluster.to_owned(),
            voters.clone(),
            membership,
            tls,
        ));
        let raft = Raft::new(
            node_id(local),
            Arc::new(config),
            Network(peers.clone()),
            log,
            machine,
        )
        .await
        .map_err(|e| StartError::Raft(e.to_string()))?;
        let members: BTreeMap<_, _> = voters
            .iter()
            .map(|name| (node_id(name), Voter { name: name.clone() }))
            .collect();
        let formed = raft
            .is_initialized()
            .await
            .map_err(|e| StartError::Raft(e.to_string()))?;
        if !formed {
            match raft.initialize(members).await {
                Ok(()) => tracing::info!(?voters, "controller: formed"),
                // Another voter's formation reached this one first.
                Err(RaftError::APIError(InitializeError::NotAllowed(_))) => {}
                Err(error) => return Err(StartError::Raft(error.to_string())),
            }
        }
        Ok(Controller {
            raft,
            peers,
            topology,
            propose_timeout: Duration::from_millis(section.propose_timeout_ms),
            // Well past an election, and never under a second: a loaded node's late heartbeat
            // is not a lost quorum.
            quorum_lost_after: Duration::from_millis((4 * section.election_timeout_ms).max(1000)),
        })
    }

    /// The committed topology, as applied on this voter; changes as entries are applied.
    pub fn topology(&self) -> watch::Receiver<Arc<Topology>> {
        self.topology.clone()
    }

    /// Asks the controller to decide `command`: here if this voter leads, else at the leader.
    /// Answered once the entry is committed and applied.
    pub async fn propose(&self, command: Command) -> Result<Applied, ProposeError> {
        let within = self.propose_timeout;
        tokio::time::timeout(within, self.propose_now(command))
            .await
            .map_err(|_| ProposeError::NoQuorum(format!("no commit within {within:?}")))?
    }

    async fn propose_now(&self, command: Command) -> Result<Applied, ProposeError> {
        loop {
            let leader = match self.raft.client_write(command.clone()).await {
                Ok(response) => return Ok(response.data?),
                Err(RaftError::APIError(ClientWriteError::ForwardToLeader(forward))) => {
                    forward.leader_node.map(|voter| voter.name)
                }
                Err(RaftError::APIError(other)) => {
                    return Err(ProposeError::NoQuorum(other.to_string()));
                }
                Err(RaftError::Fatal(_)) => return Err(ProposeError::Stopped),
            };
            match leader {
                Some(leader) => match self.peers.propose(&leader, &command).await {
                    Ok(outcome) => return Ok(outcome?),
                    Err(error) => {
                        tracing::debug!(%leader, %error, "controller: the leader did not answer");
                    }
                },
                None => tracing::debug!("controller: no leader yet"),
            }
            // An election is under way, or the leader just changed: ask again shortly.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Who leads, the term, and how far the log is applied here (everything applied was
    /// committed; openraft 0.9 reports a committed index apart from that on the leader only).
    /// A leader that has heard no quorum for well longer than an election (the others are down
    /// or cut off) leads nothing: it is not reported, so an operator sees that there is no quorum.
    pub fn status(&self) -> Status {
        let metrics = self.raft.metrics().borrow().clone();
        let lost = self.peers.voters.len() > 1
            && metrics.state == openraft::ServerState::Leader
            && metrics
                .millis_since_quorum_ack
                .is_none_or(|ms| u128::from(ms) > self.quorum_lost_after.as_millis());
        let name_of = |id| {
            metrics
                .membership_config
                .membership()
                .get_node(&id)
                .map(|voter: &Voter| voter.name.clone())
        };
        Status {
            voters: self.peers.voters.clone(),
            leader: metrics.current_leader.filter(|_| !lost).and_then(name_of),
            term: metrics.current_term,
            applied: metrics.last_applied.map_or(0, |id| id.index),
            ring_epoch: self.topology.borrow().ring_epoch,
        }
    }

    /// Stops the Raft node.
    pub async fn shutdown(&self) {
        if let Err(error) = self.raft.shutdown().await {
            tracing::warn!(%error, "controller: did not stop cleanly");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Role};

    fn section(voters: &[&str]) -> ControllerSection {
        ControllerSection {
            voters: voters.iter().map(|v| (*v).to_owned()).collect(),
            ..ControllerSection::default()
        }
    }

    #[test]
    fn bad_voter_lists_are_refused_naming_the_key() {
        let refused = [
            (&["a", "b"][..], "2 voters"),
            (&["a", "b", "c", "d"], "4 voters"),
            (&["a", "b", "c", "d", "e", "f", "g"], "7 voters"),
            (&["a", "a", "b"], "named twice"),
        ];
        for (voters, says) in refused {
            let error = section(voters).validate().unwrap_err();
            assert_eq!(error.key, "controller.voters", "{voters:?}");
            assert!(error.message.contains(says), "{voters:?}: {error}");
        }
        for voters in [
            &[][..],
            &["a"],
            &["a", "b", "c"],
            &["a", "b", "c", "d", "e"],
        ] {
            section(voters).validate().unwrap();
        }
        let mut config = Config {
            node_name: "f".into(),
            role: Role::Balancer,
            controller: section(&["f", "b", "c"]),
            ..Config::default()
        };
        let error = config.validate().unwrap_err().to_string();
        assert!(
            error.contains("controller.voters") && error.contains("f is a balancer"),
            "{error}"
        );
        config.role = Role::Leader;
        config.validate().unwrap();
    }

    #[test]
    fn voters_are_the_named_ones_else_the_founders() {
        let lone = ["solo".to_owned()].into();
        assert_eq!(section(&[]).voters(Some(&lone)), Some(vec!["solo".into()]));
        assert_eq!(section(&[]).voters(None), None, "not formed yet");
        assert_eq!(
            section(&["c", "a", "b"]).voters(None),
            Some(vec!["a".into(), "b".into(), "c".into()]),
            "sorted: every node sends the same list"
        );
        let founders = |names: &[&str]| -> Vec<String> {
            let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
            ControllerSection::founders_as_voters(&names)
        };
        assert_eq!(founders(&["b", "a"]), ["a"], "an odd count");
        assert_eq!(founders(&["c", "b", "a"]), ["a", "b", "c"]);
        assert_eq!(founders(&["d", "c", "b", "a"]), ["a", "b", "c"]);
        assert_eq!(
            founders(&["g", "f", "e", "d", "c", "b", "a"]),
            ["a", "b", "c", "d", "e"],
            "five at most"
        );
    }
}
