//! A point's ownership record: its epoch and, while the point is handed from one owner to
//! another, where that handover stands (the state machine is in `docs/resharding.md`). Kept in
//! `point.meta` with the point, and always synced whatever `storage.fsync` says: two copies of a
//! point are decided by their epochs, so an epoch anyone was told about must survive a crash.

use serde::{Deserialize, Serialize};

/// The epoch of a point created by its owner (and of points stored before epochs existed).
pub const FIRST_EPOCH: u64 = 1;

/// Who may write a point, as this node's copy records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ownership {
    /// One more at every handover: the higher epoch decides between two copies.
    #[serde(default = "first_epoch")]
    pub epoch: u64,
    /// The member that committed `epoch` by taking the point over in a handover; `None` for a
    /// point created by its owner, and for the copies followers hold. A copy committed here is
    /// written here whatever the ring says until the ring catches up (`docs/resharding.md`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// The handover this copy is part of, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handover: Option<Handover>,
}

impl Ownership {
    /// Whether this copy is still arriving in a handover: neither written nor served here.
    pub fn is_arriving(&self) -> bool {
        matches!(self.handover, Some(Handover::Incoming { .. }))
    }
}

impl Default for Ownership {
    fn default() -> Self {
        Self {
            epoch: FIRST_EPOCH,
            owner: None,
            handover: None,
        }
    }
}

fn first_epoch() -> u64 {
    FIRST_EPOCH
}

/// Where a handover stands on one side of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Handover {
    /// Old owner: `to` catches up as a learner; writes are still accepted here and flow to it.
    Copying { to: String, target_ring: u64 },
    /// Old owner: writes are fenced; the point's final bytes here are `[0, end)`, CRC32C `crc`.
    Sealed {
        to: String,
        end: u64,
        crc: u32,
        target_ring: u64,
    },
    /// Old owner: `to` owns the point at `epoch`; writes are redirected there, reads served
    /// here until cleanup.
    Moved { to: String, epoch: u64 },
    /// New owner: a learner copy from `from`, which owns the point at `epoch`; neither written
    /// nor read here until the handover commits.
    Incoming { from: String, epoch: u64 },
}

impl Handover {
    /// Whether a client's write is accepted here: only before the fence.
    pub fn accepts_writes(&self) -> bool {
        matches!(self, Handover::Copying { .. })
    }

    /// The member a refused write should go to (or wait for).
    pub fn peer(&self) -> &str {
        match self {
            Handover::Copying { to, .. }
            | Handover::Sealed { to, .. }
            | Handover::Moved { to, .. } => to,
            Handover::Incoming { from, .. } => from,
        }
    }
}

impl std::fmt::Display for Handover {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Handover::Copying { to, .. } => write!(f, "is being copied to member {to}"),
            Handover::Sealed { to, .. } => {
                write!(
                    f,
                    "is being handed to member {to}; writes wait for the switch"
                )
            }
            Handover::Moved { to, epoch } => {
                write!(
                    f,
                    "was handed to member {to} (epoch {epoch}); write it there"
                )
            }
            Handover::Incoming { from, .. } => write!(
                f,
                "is being handed to this node by member {from}, which takes its writes until then"
            ),
        }
    }
}
