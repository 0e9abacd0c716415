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
//! | `election.rs` | the controller leader's decision to fence a leader whose session expired |
//! | [`session`] | sessions: who the controller leader heard, and until when a member may write |
//! | `heartbeat.rs` | on every member: the heartbeats that keep its session |
//! | [`agent`] | on every member: finds the voters, starts the Raft node or follows a voter, hands the committed ring to membership, proposes this member's own steps |
//!
//! [`Controller`] is the handle the rest of the node holds: [`Controller::propose`] asks for a
//! decision (forwarded to the leader; answered once committed and applied),
//! [`Controller::topology`] watches the committed state, [`Controller::status`] says who leads.

pub mod agent;
mod command;
mod election;
mod files;
mod heartbeat;
mod log;
mod network;
mod raft;
mod service;
pub mod session;
pub mod state;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::error::{CheckIsLeaderError, ClientWriteError, InitializeError, RaftError};
use tokio::sync::watch;

pub use command::{Applied, Command, Rejected};
pub use raft::Recovered;
pub use service::ControllerService;
pub use session::{Held, Lease};
pub use state::{Group, Topology};

use crate::client::ClientTls;
use crate::cluster::Membership;
use crate::config::{ControllerSection, check_voter_count};
use network::{Network, Peers};
use raft::{Machine, NodeId, Raft, Voter, node_id};
use session::Sessions;

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

/// Why the voters were not changed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VotersError {
    /// The list breaks a rule: its size, or a name that is not a live primary of the ring.
    #[error("{0}")]
    Refused(String),
    /// No controller leader, or the change did not complete in time (a new voter that does not
    /// catch up, a lost quorum). Asking again is safe.
    #[error("the voters did not change: {0}; asking again is safe")]
    NoQuorum(String),
    /// The controller is stopping.
    #[error("the controller is stopping")]
    Stopped,
}

/// The controller as one node sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// The voters now, by name.
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

/// The running controller of a primary: a voter's Raft node, or the idle one of a primary that
/// is not a voter (yet: `goutube members voters` may make it one).
#[derive(Clone)]
pub struct Controller {
    raft: Raft,
    peers: Arc<Peers>,
    topology: watch::Receiver<Arc<Topology>>,
    propose_timeout: Duration,
    /// A leader that heard no quorum for this long is not reported as one.
    quorum_lost_after: Duration,
    /// The members' sessions, as this voter heard them while it led.
    sessions: Arc<Mutex<Sessions>>,
}

/// What a voter answers a member's heartbeat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Grant {
    /// This voter leads (a quorum confirmed it after the heartbeat arrived): a session of
    /// `length` from then, valid once the member applied the state up to `applied`.
    Session {
        /// How long.
        length: Duration,
        /// The last entry this voter applied when it granted it.
        applied: u64,
    },
    /// This voter does not lead; the leader, if it knows one.
    NotLeader(Option<String>),
    /// It could not confirm that it leads (no quorum), or it is stopping.
    NoQuorum(String),
}

impl Controller {
    /// Starts this primary's Raft node on the files in `dir`. A voter of the `formation` whose
    /// log is empty forms the group with them (every one of them may do so: openraft accepts the
    /// same membership from each); any other primary's node waits, idle, until a leader adds
    /// it (`goutube members voters`).
    pub async fn start(
        section: &ControllerSection,
        local: &str,
        cluster: &str,
        formation: Vec<String>,
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
            formation.clone(),
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
        let members: BTreeMap<_, _> = formation
            .iter()
            .map(|name| (node_id(name), Voter { name: name.clone() }))
            .collect();
        let formed = raft
            .is_initialized()
            .await
            .map_err(|e| StartError::Raft(e.to_string()))?;
        if !formed && formation.iter().any(|name| name == local) {
            match raft.initialize(members).await {
                Ok(()) => tracing::info!(voters = ?formation, "controller: formed"),
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
            sessions: Arc::new(Mutex::new(Sessions::new(Duration::from_millis(
                section.session_ms,
            )))),
        })
    }

    /// A heartbeat of `member`: granted a session only once a quorum confirmed, after the
    /// heartbeat arrived, that this voter leads (`docs/failover.md`: a deposed leader that does
    /// not know it yet grants nothing that outlives its successor's first session).
    pub(crate) async fn heartbeat(&self, member: &str, held: u64) -> Grant {
        let received = std::time::Instant::now();
        match self.raft.ensure_linearizable().await {
            Ok(_) => {}
            Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(forward))) => {
                return Grant::NotLeader(forward.leader_node.map(|voter| voter.name));
            }
            Err(error) => return Grant::NoQuorum(error.to_string()),
        }
        let (term, leads) = {
            let metrics = self.raft.metrics().borrow().clone();
            let leads = metrics.state == openraft::ServerState::Leader;
            (metrics.current_term, leads)
        };
        if !leads {
            return Grant::NoQuorum("leadership changed during the heartbeat".into());
        }
        let applied = self.topology.borrow().applied;
        let mut sessions = self.sessions.lock().expect("poisoned");
        Grant::Session {
            length: sessions.heartbeat(term, member, held, received),
            applied,
        }
    }

    /// While this voter leads the controller: the fences due now (`election::fences`), and the
    /// groups whose leader's session expired with nobody to name. `None` when it does not lead.
    pub(crate) fn fences_due(&self) -> Option<election::Due> {
        let (term, leads) = {
            let metrics = self.raft.metrics().borrow().clone();
            // A leader that lost its quorum heard no heartbeat meanwhile (none could be
            // granted): once it has a quorum again, in the same term, everyone gets a full
            // session again, as from a new leader.
            let leads =
                metrics.state == openraft::ServerState::Leader && !self.quorum_lost(&metrics);
            (metrics.current_term, leads)
        };
        let mut sessions = self.sessions.lock().expect("poisoned");
        if !leads {
            sessions.step_down();
            return None;
        }
        let now = std::time::Instant::now();
        sessions.elected(term, now);
        let topology = self.topology.borrow().clone();
        Some(election::fences(&topology, &sessions, term, now))
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
        let voters = voters_of(&metrics);
        let lost = self.quorum_lost(&metrics);
        Status {
            voters: if voters.is_empty() {
                self.peers.voters()
            } else {
                voters
            },
            leader: metrics
                .current_leader
                .filter(|_| !lost)
                .and_then(|id| name_of(&metrics, id)),
            term: metrics.current_term,
            applied: metrics.last_applied.map_or(0, |id| id.index),
            ring_epoch: self.topology.borrow().ring_epoch,
        }
    }

    /// Whether this node leads without having heard a quorum for well longer than an election
    /// (the others are down or cut off).
    fn quorum_lost(&self, metrics: &openraft::RaftMetrics<NodeId, Voter>) -> bool {
        voters_of(metrics).len() > 1
            && metrics.state == openraft::ServerState::Leader
            && metrics
                .millis_since_quorum_ack
                .is_none_or(|ms| u128::from(ms) > self.quorum_lost_after.as_millis())
    }

    /// Whether this node is a voter now (its Raft membership says so).
    pub fn is_voter(&self) -> bool {
        let local = node_id(&self.peers.local);
        self.raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .voter_ids()
            .any(|id| id == local)
    }

    /// Whether `name` is a voter in this node's Raft membership; `true` while it has none (a
    /// primary not added yet: it has nothing to protect).
    fn admits_votes_from(&self, name: &str) -> bool {
        let voters = voters_of(&self.raft.metrics().borrow());
        voters.is_empty() || voters.iter().any(|voter| voter == name)
    }

    /// Makes `wanted` the voters: at the leader (forwarded there if this voter does not lead),
    /// each new voter is added as a learner and caught up, then the new set is committed (joint
    /// consensus, so a quorum of the old and of the new voters agree). Each must be a primary
    /// that owns a range and that gossip sees up. Answers the voters then.
    pub async fn set_voters(&self, wanted: Vec<String>) -> Result<Vec<String>, VotersError> {
        // Catching a new voter up may send it the whole (small) log and a snapshot.
        let within = 4 * self.propose_timeout;
        tokio::time::timeout(within, self.set_voters_now(wanted))
            .await
            .map_err(|_| VotersError::NoQuorum(format!("not done within {within:?}")))?
    }

    async fn set_voters_now(&self, wanted: Vec<String>) -> Result<Vec<String>, VotersError> {
        loop {
            let (state, leader) = {
                let metrics = self.raft.metrics().borrow().clone();
                let leader = metrics.current_leader.and_then(|id| name_of(&metrics, id));
                (metrics.state, leader)
            };
            if state == openraft::ServerState::Leader {
                match self.change_voters(&wanted).await {
                    Err(VotersError::NoQuorum(error)) => {
                        tracing::debug!(%error, "controller: leadership changed during a change of voters");
                    }
                    done => return done,
                }
            } else if let Some(leader) = leader {
                match self.peers.set_voters(&leader, &wanted).await {
                    Ok(answer) => return answer,
                    Err(error) => {
                        tracing::debug!(%leader, %error, "controller: the leader did not answer");
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The leader's part of [`Controller::set_voters`].
    async fn change_voters(&self, wanted: &[String]) -> Result<Vec<String>, VotersError> {
        check_voter_count(wanted).map_err(VotersError::Refused)?;
        {
            let topology = self.topology.borrow();
            let membership = self.peers.membership.borrow();
            for name in wanted {
                let record = topology.ring.members.get(name);
                if !record.is_some_and(|r| r.role.is_primary() && r.owns_range()) {
                    return Err(VotersError::Refused(format!(
                        "{name} is not an active primary of the ring: voters are primaries that \
                         own a range"
                    )));
                }
                if membership.live(name).is_none() {
                    return Err(VotersError::Refused(format!(
                        "{name} is not live: a new voter must be up to catch up the log"
                    )));
                }
            }
        }
        let write_error = |error: RaftError<NodeId, ClientWriteError<NodeId, Voter>>| match error {
            RaftError::APIError(ClientWriteError::ChangeMembershipError(error)) => {
                VotersError::Refused(error.to_string())
            }
            RaftError::APIError(error) => VotersError::NoQuorum(error.to_string()),
            RaftError::Fatal(_) => VotersError::Stopped,
        };
        let current = self.status().voters;
        for name in wanted.iter().filter(|name| !current.contains(name)) {
            let voter = Voter { name: name.clone() };
            self.raft
                .add_learner(node_id(name), voter, true)
                .await
                .map_err(write_error)?;
            tracing::info!(%name, "controller: a new voter caught up the log");
        }
        let ids: BTreeSet<NodeId> = wanted.iter().map(|name| node_id(name)).collect();
        self.raft
            .change_membership(ids, false)
            .await
            .map_err(write_error)?;
        let voters = self.status().voters;
        tracing::warn!(?voters, was = ?current, "controller: the voters changed");
        Ok(voters)
    }

    /// Stops the Raft node.
    pub async fn shutdown(&self) {
        if let Err(error) = self.raft.shutdown().await {
            tracing::warn!(%error, "controller: did not stop cleanly");
        }
    }
}

/// Why a recovery did not happen.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RecoverError {
    /// The files could not be read or written (or a running node has them open).
    #[error("the controller's files in {dir}: {source}")]
    Files {
        /// The directory.
        dir: String,
        /// Why.
        source: std::io::Error,
    },
    /// This node holds no controller state: it never was a voter or a learner.
    #[error("no controller state in {0}: this node never held the controller's log")]
    Empty(String),
}

/// Recovers a controller whose quorum is lost for good (`goutube controller recover`; the node
/// is stopped): the state in `dir` becomes a snapshot of every entry this node holds, and
/// `local` its only voter. Started again, the node leads alone, with the topology it had; the
/// operator then adds voters (`goutube members voters`). Decisions the lost voters committed
/// that never reached this node are lost: that is why it is an operator's act, loudly warned.
pub fn recover(dir: &Path, local: &str) -> Result<Recovered, RecoverError> {
    let files = |source| RecoverError::Files {
        dir: dir.display().to_string(),
        source,
    };
    // (Opening the log creates it: a directory without one holds nothing to recover.)
    if !dir.join(log::LOG_FILE).exists() {
        return Err(RecoverError::Empty(dir.display().to_string()));
    }
    let log = log::LogStore::open(dir).map_err(files)?;
    let Some((last, recovered)) =
        raft::recover_snapshot(dir, local, log.entries()).map_err(files)?
    else {
        return Err(RecoverError::Empty(dir.display().to_string()));
    };
    log.reset(last).map_err(files)?;
    Ok(recovered)
}

/// The voters of the membership in `metrics`, by name, sorted; empty before this node has one.
fn voters_of(metrics: &openraft::RaftMetrics<NodeId, Voter>) -> Vec<String> {
    raft::voter_names(metrics.membership_config.membership())
}

/// The name of voter (or learner) `id` in the membership in `metrics`.
fn name_of(metrics: &openraft::RaftMetrics<NodeId, Voter>, id: NodeId) -> Option<String> {
    metrics
        .membership_config
        .membership()
        .get_node(&id)
        .map(|voter| voter.name.clone())
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
