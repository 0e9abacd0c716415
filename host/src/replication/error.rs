//! Replication's failures, one type per family: the store under a call ([`StoreError`]), the
//! link to a peer ([`LinkError`]), the new owner's refusals in a handover ([`HandoverError`]),
//! a record or job a follower cannot apply ([`ApplyError`]), one move on the old owner
//! ([`MoveError`]), and planning the moves ([`PlanError`]).
//!
//! They are types so that callers decide by kind: the mover redials at once after a dropped
//! connection and waits the settle time after a refused seal ([`MoveError::retry`]), and a lost
//! connection is a variant, not a flag set on the side. They become text only where they
//! leave the node: a `capnp::Error` or a rejected record's reason on the wire, or the log.

use std::sync::Arc;

use crate::access::Denied;
use crate::point::{AppendError, DeleteError, PointId, ReadError, TruncateError};
use crate::reshard::planner::Retry;

/// A call on the point store failed (any of its error families).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum StoreError {
    /// Reading a point, its metadata or its ownership record.
    #[error(transparent)]
    Read(#[from] ReadError),
    /// Writing a point or its records.
    #[error(transparent)]
    Append(#[from] AppendError),
    /// Deleting a point.
    #[error(transparent)]
    Delete(#[from] DeleteError),
    /// Cutting a point back.
    #[error(transparent)]
    Truncate(#[from] TruncateError),
}

/// The moves of this node's points could not be planned.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PlanError {
    /// Placement could not name a point's owner.
    #[error(transparent)]
    Placement(#[from] crate::placement::PlacementError),
    /// The points handed over already could not be read.
    #[error(transparent)]
    Read(#[from] ReadError),
}

/// A peer could not be reached, would not speak, or a call on it failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum LinkError {
    /// Neither the live view nor the ring knows the member.
    #[error("{peer} is not a member")]
    Unknown {
        /// The member named.
        peer: String,
    },
    /// The address is not `host:port`.
    #[error("{address} is not host:port")]
    BadAddress {
        /// The address dialed.
        address: String,
    },
    /// The TCP connection or the TLS handshake did not finish in time.
    #[error("{step} with {address} timed out")]
    TimedOut {
        /// `"connecting"` or `"TLS handshake"`.
        step: &'static str,
        /// The address dialed.
        address: String,
    },
    /// The TCP connection or the TLS handshake failed.
    #[error("{step} with {address}: {source}")]
    Io {
        /// `"connecting"` or `"TLS handshake"`.
        step: &'static str,
        /// The address dialed.
        address: String,
        /// What the socket said.
        #[source]
        source: std::io::Error,
    },
    /// The member presented no certificate over TLS.
    #[error("{address} presented no certificate")]
    NoCertificate {
        /// The address dialed.
        address: String,
    },
    /// The policy does not let the member replicate.
    #[error("refused: {0}")]
    Denied(#[from] Denied),
    /// The member's certificate, or its answer, names another node than the one dialed or
    /// claimed.
    #[error(transparent)]
    Identity(#[from] crate::net::IdentityError),
    /// The connection went during a call: the next call dials again.
    #[error("{call} on {peer}: the connection was lost ({source})")]
    Disconnected {
        /// The call.
        call: &'static str,
        /// The member called.
        peer: String,
        /// What Cap'n Proto said.
        #[source]
        source: capnp::Error,
    },
    /// A call failed on a live connection (the peer answered with an error).
    #[error("{call} on {peer}: {source}")]
    Call {
        /// The call.
        call: &'static str,
        /// The member called.
        peer: String,
        /// The peer's error.
        #[source]
        source: capnp::Error,
    },
    /// The peer answered something this node cannot read.
    #[error("{peer} answered {call} with {detail}")]
    Answer {
        /// The call.
        call: &'static str,
        /// The member called.
        peer: String,
        /// What was wrong with the answer.
        detail: String,
    },
    /// The replicator that feeds the peer ended (its connection went).
    #[error("the replicator to {peer} stopped")]
    ReplicatorStopped {
        /// The member it fed.
        peer: String,
    },
    /// The leader's session runs at an older epoch than one this follower knows for its group:
    /// another leader was named since.
    #[error("{peer} leads at epoch {stale}")]
    StaleLeader {
        /// The leader dialed.
        peer: String,
        /// Why its epoch is stale.
        #[source]
        stale: StaleEpoch,
    },
    /// The connection ended.
    #[error("the connection to {peer} ended: {reason}")]
    Closed {
        /// The member.
        peer: String,
        /// How.
        reason: String,
    },
}

impl LinkError {
    /// A failed call on `peer`: [`LinkError::Disconnected`] if the connection went.
    pub(crate) fn call(call: &'static str, peer: &str, source: capnp::Error) -> Self {
        let peer = peer.to_owned();
        match source.kind {
            capnp::ErrorKind::Disconnected => LinkError::Disconnected { call, peer, source },
            _ => LinkError::Call { call, peer, source },
        }
    }

    /// Whether the connection is gone (the next attempt must dial again).
    pub(crate) fn is_disconnected(&self) -> bool {
        matches!(
            self,
            LinkError::Disconnected { .. }
                | LinkError::ReplicatorStopped { .. }
                | LinkError::Closed { .. }
        )
    }
}

/// Why the new owner of a handover refuses a step.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum HandoverError {
    /// This node holds the point at an epoch not older than the sender's.
    #[error("this node holds point {point} at epoch {held}, not older than {from}'s {epoch}")]
    Newer {
        /// The point.
        point: PointId,
        /// The epoch held here.
        held: u64,
        /// The sender.
        from: String,
        /// The sender's epoch.
        epoch: u64,
    },
    /// The sender no longer takes the writes of its slot (a failover or a transfer named
    /// another leader): what it hands over may lack acknowledged bytes.
    #[error(
        "{from} no longer takes the writes of its slot ({leader} leads it since a failover): \
         point {point} is not sealed"
    )]
    SenderDeposed {
        /// The point.
        point: PointId,
        /// The sender.
        from: String,
        /// The slot's leader.
        leader: String,
    },
    /// This node holds no such point (asked to seal it).
    #[error("this node holds no point {point}")]
    NotHeld {
        /// The point.
        point: PointId,
    },
    /// What this node holds is not what the sender sealed.
    #[error(
        "this node holds {held_end} bytes of point {point} with CRC32C {held_crc:08x}, not {end} with {crc:08x}"
    )]
    Differs {
        /// The point.
        point: PointId,
        /// The end held here.
        held_end: u64,
        /// The CRC32C of what is held here.
        held_crc: u32,
        /// The end sealed.
        end: u64,
        /// The CRC32C sealed.
        crc: u32,
    },
    /// The point is not arriving here from that sender.
    #[error("point {point} is not being handed to this node by {from}")]
    NotIncoming {
        /// The point.
        point: PointId,
        /// The sender named.
        from: String,
    },
    /// The store failed under the step.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<ReadError> for HandoverError {
    fn from(error: ReadError) -> Self {
        HandoverError::Store(error.into())
    }
}

impl From<AppendError> for HandoverError {
    fn from(error: AppendError) -> Self {
        HandoverError::Store(error.into())
    }
}

impl From<DeleteError> for HandoverError {
    fn from(error: DeleteError) -> Self {
        HandoverError::Store(error.into())
    }
}

/// Why a follower did not apply a record or a job of its leader (or of a handover's sender).
/// Shared (`Arc`): one refusal answers every record of a push.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum ApplyError {
    /// The store failed.
    #[error(transparent)]
    Store(Arc<StoreError>),
    /// A handover's record for a point that is not arriving from its sender.
    #[error(transparent)]
    Handover(Arc<HandoverError>),
    /// The bundler failed, or what it unbundled is not what the leader sent.
    #[error("{0}")]
    Unbundled(String),
    /// The node is shutting down.
    #[error("the follower is shutting down")]
    ShuttingDown,
    /// The call came from a leader whose epoch is older than one this follower knows.
    #[error(transparent)]
    Stale(#[from] StaleEpoch),
}

/// A replication call at a leader epoch older than the newest this follower knows for its group
/// (`follower::SeenEpoch`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "leader epoch {given} is older than epoch {newest}, the newest this follower knows for its \
     group: another leader was named since"
)]
pub(crate) struct StaleEpoch {
    /// The epoch the call carried.
    pub given: u64,
    /// The newest this follower knows.
    pub newest: u64,
}

impl<E: Into<StoreError>> From<E> for ApplyError {
    fn from(error: E) -> Self {
        ApplyError::Store(Arc::new(error.into()))
    }
}

impl From<HandoverError> for ApplyError {
    fn from(error: HandoverError) -> Self {
        match error {
            HandoverError::Store(error) => ApplyError::Store(Arc::new(error)),
            other => ApplyError::Handover(Arc::new(other)),
        }
    }
}

/// Why one move (on the old owner) did not end with the point handed over.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum MoveError {
    /// The destination could not be reached, or a call on it failed.
    #[error(transparent)]
    Link(#[from] LinkError),
    /// The destination does not hold what was sealed: nothing is committed there.
    #[error("{to} refused the seal of point {point}: {reason}")]
    SealRefused {
        /// The point.
        point: PointId,
        /// The destination.
        to: String,
        /// Its reason.
        reason: String,
    },
    /// The destination's lag stopped shrinking.
    #[error(
        "stalled: {to} has confirmed {confirmed} of {end} bytes of point {point} and its lag has not shrunk for {stall:?}{hint}"
    )]
    Stalled {
        /// The point.
        point: PointId,
        /// The destination.
        to: String,
        /// What it confirmed.
        confirmed: u64,
        /// The end here.
        end: u64,
        /// How long it has not shrunk.
        stall: std::time::Duration,
        /// A hint about the throttle, if one is set.
        hint: String,
    },
    /// The fence was lifted because the destination did not catch up in time.
    #[error("fence lifted: {0}")]
    FenceLifted(Box<MoveError>),
    /// The point's handover record is another one (to another member, or arriving).
    #[error("point {point} {handover}; not handing it to {to}")]
    Elsewhere {
        /// The point.
        point: PointId,
        /// Its handover.
        handover: crate::point::Handover,
        /// The destination of this move.
        to: String,
    },
    /// The ring no longer sends the point there: the move was stopped.
    #[error("the ring no longer sends {point} to {to}")]
    Stopped {
        /// The point.
        point: PointId,
        /// The destination.
        to: String,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<ReadError> for MoveError {
    fn from(error: ReadError) -> Self {
        MoveError::Store(error.into())
    }
}

impl From<AppendError> for MoveError {
    fn from(error: AppendError) -> Self {
        MoveError::Store(error.into())
    }
}

impl From<DeleteError> for MoveError {
    fn from(error: DeleteError) -> Self {
        MoveError::Store(error.into())
    }
}

impl MoveError {
    /// Whether the connection to the destination is gone.
    pub(crate) fn is_disconnected(&self) -> bool {
        match self {
            MoveError::Link(link) => link.is_disconnected(),
            MoveError::FenceLifted(inner) => inner.is_disconnected(),
            _ => false,
        }
    }

    /// Whether the point is gone from this node (deleted meanwhile): there is nothing to move.
    pub(crate) fn is_gone(&self) -> bool {
        matches!(
            self,
            MoveError::Store(StoreError::Read(ReadError::NotFound(_)))
        )
    }

    /// When the move is tried again, by kind: a dropped connection at once, a refused seal
    /// after the settle time, anything else after a second.
    pub(crate) fn retry(&self) -> Retry {
        match self {
            error if error.is_disconnected() => Retry::Now,
            MoveError::SealRefused { .. } => Retry::AfterSettle,
            _ => Retry::Later,
        }
    }
}

/// Why a leader refuses a follower's session (`Leader.follow`).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum FollowRefusal {
    /// The policy does not let the follower replicate.
    #[error(transparent)]
    Denied(#[from] Denied),
    /// Its certificate names another node.
    #[error(transparent)]
    Identity(#[from] crate::net::IdentityError),
    /// It speaks another protocol version.
    #[error(
        "follower {follower} speaks replication protocol {theirs}, this leader {ours}: run the same release on both"
    )]
    Protocol {
        /// The follower (bounded).
        follower: String,
        /// Its protocol.
        theirs: u16,
        /// This leader's.
        ours: u16,
    },
    /// This node was forgotten by the cluster.
    #[error("{node} was forgotten by the cluster: it leads no followers")]
    Forgotten {
        /// This node.
        node: String,
    },
    /// This node is no primary and no failover named it a group's leader.
    #[error("node {node} is a {role} that leads no group: it has no followers")]
    LeadsNothing {
        /// This node.
        node: String,
        /// Its role.
        role: &'static str,
    },
    /// This leader came back from a stop that was not clean: a member of its in-sync set is
    /// named leader first, since it may hold acknowledged bytes this leader lost.
    #[error(
        "{node} came back from a stop that was not clean while the in-sync set of {slot} held \
         members: the controller names one of them leader; follow it"
    )]
    SteppingDown {
        /// This node.
        node: String,
        /// The slot it leads.
        slot: String,
    },
    /// Another member leads this primary's slot now (a failover or a transfer named it).
    #[error("{leader} leads the group of {node} since epoch {leader_epoch}: follow it instead")]
    Deposed {
        /// This node.
        node: String,
        /// The group's leader.
        leader: String,
        /// Its epoch.
        leader_epoch: u64,
    },
}

/// `error` as it crosses the wire to the caller of a Cap'n Proto method.
pub(crate) fn wire(error: impl std::fmt::Display) -> capnp::Error {
    capnp::Error::failed(error.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point() -> PointId {
        PointId::new("p".to_owned()).unwrap()
    }

    #[test]
    fn a_move_is_retried_by_the_kind_of_its_failure() {
        let dropped = || {
            MoveError::Link(LinkError::call(
                "seal",
                "b",
                capnp::Error::disconnected("gone".into()),
            ))
        };
        assert_eq!(dropped().retry(), Retry::Now);
        assert_eq!(
            MoveError::FenceLifted(Box::new(dropped())).retry(),
            Retry::Now
        );
        let refused = MoveError::SealRefused {
            point: point(),
            to: "b".into(),
            reason: "differs".into(),
        };
        assert_eq!(refused.retry(), Retry::AfterSettle);
        let failed_call = MoveError::Link(LinkError::call(
            "seal",
            "b",
            capnp::Error::failed("no".into()),
        ));
        assert_eq!(failed_call.retry(), Retry::Later);
        let stalled = MoveError::Stalled {
            point: point(),
            to: "b".into(),
            confirmed: 1,
            end: 2,
            stall: std::time::Duration::from_secs(30),
            hint: String::new(),
        };
        assert_eq!(stalled.retry(), Retry::Later);
    }
}
