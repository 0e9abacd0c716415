//! The `[controller]` section: the voters of the controller's Raft group and its timings
//! (`docs/controller.md`). Here rather than beside the controller, so that the configuration
//! imports nothing above it.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use super::key::InvalidKey;

/// The `[controller]` section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ControllerSection {
    /// The voters, by node name: 1, 3 or 5 primaries, the same list on every node. Empty: a
    /// standalone node is its own single voter.
    pub voters: Vec<String>,
    /// How often the controller leader tells the voters it is alive.
    pub heartbeat_ms: u64,
    /// A voter that hears no leader for this long (at random up to twice as long) stands for
    /// election.
    pub election_timeout_ms: u64,
    /// How long a proposal waits for its commit before it fails `Unavailable` (no quorum).
    pub propose_timeout_ms: u64,
}

impl Default for ControllerSection {
    fn default() -> Self {
        ControllerSection {
            voters: Vec::new(),
            heartbeat_ms: 100,
            election_timeout_ms: 300,
            propose_timeout_ms: 5_000,
        }
    }
}

impl ControllerSection {
    /// Checks what serde cannot; errors name the key.
    pub fn validate(&self) -> Result<(), InvalidKey> {
        let distinct: BTreeSet<&String> = self.voters.iter().collect();
        if distinct.len() != self.voters.len() {
            return Err(InvalidKey::new(
                "controller.voters",
                "a voter is named twice",
            ));
        }
        if !matches!(self.voters.len(), 0 | 1 | 3 | 5) {
            return Err(InvalidKey::new(
                "controller.voters",
                format!(
                    "{} voters: name 1, 3 or 5 primaries (an even number tolerates no more \
                     failures than one fewer)",
                    self.voters.len()
                ),
            ));
        }
        if self.heartbeat_ms == 0 || self.election_timeout_ms < 3 * self.heartbeat_ms {
            return Err(InvalidKey::new(
                "controller.election_timeout_ms",
                "must be at least three heartbeats (controller.heartbeat_ms)",
            ));
        }
        if self.propose_timeout_ms < self.election_timeout_ms {
            return Err(InvalidKey::new(
                "controller.propose_timeout_ms",
                "must be at least controller.election_timeout_ms",
            ));
        }
        Ok(())
    }

    /// The voters of a node called `local`: the configured ones, or the node alone when none
    /// are named and it is a standalone node. `None`: this node has no controller of its own.
    pub fn voters_of(&self, local: &str, standalone: bool) -> Option<Vec<String>> {
        let mut voters = self.voters.clone();
        if voters.is_empty() {
            if !standalone {
                return None;
            }
            voters.push(local.to_owned());
        }
        voters.sort();
        Some(voters)
    }
}
