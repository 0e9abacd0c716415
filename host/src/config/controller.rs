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
    /// The voters, by node name: 1, 3 or 5 primaries, the same list on every node. Empty: the
    /// ring's founders ([`ControllerSection::founders_as_voters`]), so a lone node is its own
    /// single voter.
    pub voters: Vec<String>,
    /// How often the controller leader tells the voters it is alive.
    pub heartbeat_ms: u64,
    /// A voter that hears no leader for this long (at random up to twice as long) stands for
    /// election.
    pub election_timeout_ms: u64,
    /// How long a proposal waits for its commit before it fails `Unavailable` (no quorum).
    pub propose_timeout_ms: u64,
    /// A member's session (`docs/failover.md`): a group leader not heard by the controller
    /// leader for this long may be fenced, and stops taking writes itself after three quarters
    /// of it without an answer.
    pub session_ms: u64,
}

impl Default for ControllerSection {
    fn default() -> Self {
        ControllerSection {
            voters: Vec::new(),
            // openraft 0.9 waits a leader lease (twice this) before a vote: a new leader
            // within some 1.4 s (p99) of a kill (`docs/benchmarks.md`).
            heartbeat_ms: 30,
            election_timeout_ms: 100,
            propose_timeout_ms: 5_000,
            session_ms: 3_000,
        }
    }
}

/// Checks a list of voters' size: 1, 3 or 5 names, each once (the configured voters, and the
/// ones `goutube members voters` asks for).
pub fn check_voter_count(voters: &[String]) -> Result<(), String> {
    let distinct: BTreeSet<&String> = voters.iter().collect();
    if distinct.len() != voters.len() {
        return Err("a voter is named twice".into());
    }
    if !matches!(voters.len(), 1 | 3 | 5) {
        return Err(format!(
            "{} voters: name 1, 3 or 5 primaries (an even number tolerates no more failures \
             than one fewer)",
            voters.len()
        ));
    }
    Ok(())
}

impl ControllerSection {
    /// Checks what serde cannot; errors name the key.
    pub fn validate(&self) -> Result<(), InvalidKey> {
        if !self.voters.is_empty() {
            check_voter_count(&self.voters)
                .map_err(|message| InvalidKey::new("controller.voters", message))?;
        }
        if self.heartbeat_ms == 0 || self.election_timeout_ms < 3 * self.heartbeat_ms {
            return Err(InvalidKey::new(
                "controller.election_timeout_ms",
                "must be at least three heartbeats (controller.heartbeat_ms)",
            ));
        }
        if self.session_ms < 10 * self.election_timeout_ms {
            return Err(InvalidKey::new(
                "controller.session_ms",
                "must be at least ten election timeouts (controller.election_timeout_ms): a \
                 session must outlast the election of a new controller leader",
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

    /// The voters: the configured ones, sorted (every node sends the same list), else the
    /// `founders` of the ring once formed ([`Self::founders_as_voters`]; a lone node founds its
    /// own ring, and is its own voter). `None`: none named, and no ring formed yet.
    pub fn voters(&self, founders: Option<&BTreeSet<String>>) -> Option<Vec<String>> {
        if !self.voters.is_empty() {
            let mut voters = self.voters.clone();
            voters.sort();
            return Some(voters);
        }
        founders.map(Self::founders_as_voters)
    }

    /// The voters of a cluster whose configuration names none: the founders of its ring, as
    /// many as an odd count up to five allows, by name. Every node derives the same list from
    /// the same ring (the founders never change), as Consul's servers do from
    /// `bootstrap_expect`.
    pub fn founders_as_voters<'a>(founders: impl IntoIterator<Item = &'a String>) -> Vec<String> {
        let mut voters: Vec<String> = founders.into_iter().cloned().collect();
        voters.sort();
        voters.dedup();
        // The largest odd count up to five: an even one tolerates no more failures.
        let count = voters.len().min(5);
        let odd = if count.is_multiple_of(2) {
            count.saturating_sub(1)
        } else {
            count
        };
        voters.truncate(odd);
        voters
    }
}
