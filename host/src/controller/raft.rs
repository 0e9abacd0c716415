//! The Raft glue: openraft's types for the controller, and its state machine store, which
//! applies committed entries to a [`Topology`] (the pure state machine in `state.rs`) and
//! publishes every new state in a watch.
//!
//! A snapshot is the whole state (the topology, the last entry applied and the Raft
//! membership), kept in `<data_dir>/controller/snapshot.json` and replaced atomically; at start
//! the state is the snapshot's, and openraft applies the committed entries after it again.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use openraft::storage::RaftStateMachine;
use openraft::{
    Entry, EntryPayload, LogId, Membership, RaftSnapshotBuilder, Snapshot, SnapshotMeta,
    StorageError, StorageIOError, StoredMembership,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use super::command::{Applied, Command, Rejected};
use super::files::{read_json, replace};
use super::state::Topology;

/// A voter's Raft id: derived from its node name, the same on every node.
pub(super) type NodeId = u64;

/// What an applied entry answers its proposer.
pub(super) type Outcome = Result<Applied, Rejected>;

openraft::declare_raft_types!(
    /// The controller's Raft types: entries carry [`Command`]s, a voter is known by its name.
    pub(super) TypeConfig:
        D = Command,
        R = Outcome,
        NodeId = NodeId,
        Node = Voter,
);

/// The controller's Raft node.
pub(super) type Raft = openraft::Raft<TypeConfig>;

/// A voter, as Raft's membership records it: by node name (its address comes from gossip).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Voter {
    /// Its node name.
    pub(super) name: String,
}

impl fmt::Display for Voter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

/// The Raft id of the voter called `name`.
pub(super) fn node_id(name: &str) -> NodeId {
    let digest = Sha256::digest(name.as_bytes());
    u64::from_be_bytes(digest[..8].try_into().expect("eight bytes"))
}

const SNAPSHOT_FILE: &str = "snapshot.json";

/// Everything the state machine holds: what a snapshot is.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Image {
    topology: Topology,
    last_applied: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, Voter>,
}

/// The snapshot kept on disk.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Stored {
    meta: SnapshotMeta<NodeId, Voter>,
    image: Image,
}

/// openraft's state machine store: the topology, its snapshot, and the watch it is published in.
pub(super) struct Machine {
    dir: PathBuf,
    image: Image,
    snapshot: Option<Stored>,
    published: watch::Sender<Arc<Topology>>,
}

impl Machine {
    /// The state machine of `dir`: the snapshot's state if there is one. Publishes in
    /// `published`.
    pub(super) fn open(
        dir: &Path,
        published: watch::Sender<Arc<Topology>>,
    ) -> std::io::Result<Machine> {
        let snapshot: Option<Stored> = read_json(&dir.join(SNAPSHOT_FILE))?;
        let image = snapshot
            .as_ref()
            .map(|stored| stored.image.clone())
            .unwrap_or_default();
        published.send_replace(Arc::new(image.topology.clone()));
        Ok(Machine {
            dir: dir.to_owned(),
            image,
            snapshot,
            published,
        })
    }

    /// Keeps `stored` as the snapshot, on disk first.
    fn keep(&mut self, stored: Stored) -> std::io::Result<()> {
        let bytes = serde_json::to_vec(&stored).map_err(std::io::Error::other)?;
        replace(&self.dir.join(SNAPSHOT_FILE), &bytes)?;
        self.snapshot = Some(stored);
        Ok(())
    }

    fn publish(&self) {
        self.published
            .send_replace(Arc::new(self.image.topology.clone()));
    }
}

/// What a recovery did (`goutube controller recover`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovered {
    /// The last entry this node held, now the start of its log.
    pub index: u64,
    /// Its term.
    pub term: u64,
    /// The epoch of the ring decision last applied.
    pub ring_epoch: u64,
    /// The voters before the recovery.
    pub voters_before: Vec<String>,
}

/// Makes the state in `dir` a snapshot of everything this node holds (`entries`, after the
/// snapshot `dir` has, applied in order, whether or not they were known to be committed: a
/// lost quorum may have committed them) whose only voter is `local`. Returns the entry the
/// snapshot ends at, which the log must then be reset to.
pub(super) fn recover_snapshot(
    dir: &Path,
    local: &str,
    entries: Vec<Entry<TypeConfig>>,
) -> std::io::Result<Option<(LogId<NodeId>, Recovered)>> {
    let stored: Option<Stored> = read_json(&dir.join(SNAPSHOT_FILE))?;
    let mut image = stored.map(|stored| stored.image).unwrap_or_default();
    let mut voters_before = voter_names(image.membership.membership());
    for entry in entries {
        if image
            .last_applied
            .is_some_and(|applied| entry.log_id <= applied)
        {
            continue;
        }
        image.last_applied = Some(entry.log_id);
        match entry.payload {
            EntryPayload::Blank => {}
            EntryPayload::Normal(command) => {
                let _ = image.topology.apply(entry.log_id.index, &command);
            }
            EntryPayload::Membership(membership) => {
                voters_before = voter_names(&membership);
            }
        }
    }
    let Some(last) = image.last_applied else {
        return Ok(None);
    };
    let id = node_id(local);
    let voter = Voter {
        name: local.to_owned(),
    };
    let alone = Membership::new(vec![BTreeSet::from([id])], BTreeMap::from([(id, voter)]));
    image.membership = StoredMembership::new(Some(last), alone);
    let meta = SnapshotMeta {
        last_log_id: Some(last),
        last_membership: image.membership.clone(),
        snapshot_id: format!("recovered-{}-{}", last.leader_id.term, last.index),
    };
    let recovered = Recovered {
        index: last.index,
        term: last.leader_id.term,
        ring_epoch: image.topology.ring_epoch,
        voters_before,
    };
    let stored = Stored { meta, image };
    let bytes = serde_json::to_vec(&stored).map_err(std::io::Error::other)?;
    replace(&dir.join(SNAPSHOT_FILE), &bytes)?;
    Ok(Some((last, recovered)))
}

/// The names of the voters of `membership`, sorted.
pub(super) fn voter_names(membership: &Membership<NodeId, Voter>) -> Vec<String> {
    let mut names: Vec<String> = membership
        .voter_ids()
        .filter_map(|id| membership.get_node(&id).map(|voter| voter.name.clone()))
        .collect();
    names.sort();
    names
}

impl RaftSnapshotBuilder<TypeConfig> for Machine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        let image = self.image.clone();
        let last = image.last_applied;
        let meta = SnapshotMeta {
            last_log_id: last,
            last_membership: image.membership.clone(),
            snapshot_id: format!(
                "{}-{}",
                last.map_or(0, |id| id.leader_id.term),
                last.map_or(0, |id| id.index)
            ),
        };
        let data = serde_json::to_vec(&image)
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?;
        self.keep(Stored {
            meta: meta.clone(),
            image,
        })
        .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for Machine {
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, Voter>), StorageError<NodeId>>
    {
        Ok((self.image.last_applied, self.image.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Outcome>, StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut outcomes = Vec::new();
        for entry in entries {
            self.image.last_applied = Some(entry.log_id);
            let outcome = match entry.payload {
                EntryPayload::Blank => Ok(Applied::Unchanged),
                EntryPayload::Normal(command) => {
                    let outcome = self.image.topology.apply(entry.log_id.index, &command);
                    match &outcome {
                        Ok(Applied::Changed { epoch }) => {
                            tracing::info!(?command, epoch, "controller: decided");
                        }
                        Ok(Applied::Unchanged) => {}
                        Err(refused) => {
                            tracing::info!(?command, %refused, "controller: refused");
                        }
                    }
                    outcome
                }
                EntryPayload::Membership(membership) => {
                    self.image.membership = StoredMembership::new(Some(entry.log_id), membership);
                    Ok(Applied::Unchanged)
                }
            };
            outcomes.push(outcome);
        }
        self.publish();
        Ok(outcomes)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        Machine {
            dir: self.dir.clone(),
            image: self.image.clone(),
            snapshot: self.snapshot.clone(),
            published: self.published.clone(),
        }
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<Cursor<Vec<u8>>>, StorageError<NodeId>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, Voter>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<NodeId>> {
        let image: Image = serde_json::from_slice(snapshot.get_ref())
            .map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), &e))?;
        self.image = image.clone();
        self.keep(Stored {
            meta: meta.clone(),
            image,
        })
        .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?;
        self.publish();
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
        let Some(stored) = &self.snapshot else {
            return Ok(None);
        };
        let data = serde_json::to_vec(&stored.image)
            .map_err(|e| StorageIOError::read_snapshot(Some(stored.meta.signature()), &e))?;
        Ok(Some(Snapshot {
            meta: stored.meta.clone(),
            snapshot: Box::new(Cursor::new(data)),
        }))
    }
}
