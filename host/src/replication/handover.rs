//! The new owner's side of a handover (`docs/resharding.md`): the old owner calls these on this
//! node's replication port, through `Leader.receive`, `handover`, `prepare`, `seal`, `cancel` and
//! `settled`.
//!
//! This side never decides anything on its own: it holds the point as `incoming` from the old
//! owner (refusing writes for it) while the old owner pushes its bytes, commits a new epoch (the
//! controller's, from the ring it holds) only when what it holds is exactly what the old owner
//! sealed (length and CRC32C, synced first), and answers the same when asked again, so an old
//! owner that crashed and asks once more learns what happened.

use super::error::HandoverError;
use crate::point::ownership::FIRST_EPOCH;
use crate::point::{DeleteError, Handover, Ownership, PointId, ReadError, SealedAt, Store};

/// How a seal ended.
#[derive(Debug)]
pub(crate) enum Sealed {
    /// This node owns the point at this epoch.
    Committed(u64),
    /// It does not hold what was sealed; the old owner starts the move over.
    Refused(HandoverError),
}

/// Starts (or resumes) receiving `point` from `from`, which owns it at `epoch`. Returns the end
/// this node holds, where the copy continues.
pub(crate) async fn begin(
    store: &Store,
    from: &str,
    point: &PointId,
    epoch: u64,
) -> Result<u64, HandoverError> {
    let incoming = Ownership {
        epoch,
        owner: None,
        handover: Some(Handover::Incoming {
            from: from.to_owned(),
            epoch,
        }),
    };
    match store.ownership(point).await {
        Ok(held) if held == incoming => {
            return Ok(store.metadata(point).await?.end);
        }
        Ok(held)
            if held.epoch >= epoch
                && !held.is_arriving()
                && !empty_shell(store, point, &held).await =>
        {
            return Err(HandoverError::Newer {
                point: point.clone(),
                held: held.epoch,
                from: from.to_owned(),
                epoch,
            });
        }
        Ok(held) => {
            // An older copy (history of an earlier owner) or a move that started over.
            tracing::info!(%point, %from, held_epoch = held.epoch, epoch, "replacing the copy held here with the one being handed over");
            match store.delete(point).await {
                Ok(_) | Err(DeleteError::NotFound(_)) => {}
                Err(error) => return Err(error.into()),
            }
        }
        Err(ReadError::NotFound(_)) => {}
        Err(error) => return Err(error.into()),
    }
    store.set_ownership(point, incoming).await?;
    crate::reshard::crash_point("incoming");
    Ok(0)
}

/// Ends the handover of `point` from `from`: if this node holds exactly what the old owner
/// `sealed` (its end and CRC32C), it syncs it and commits, with itself as owner, the epoch of the
/// controller's ring it holds (`ring_epoch`, the decision the move follows), or the next epoch
/// if that is higher: a point's epochs only grow.
pub(crate) async fn seal(
    store: &Store,
    local: &str,
    from: &str,
    point: &PointId,
    sealed: SealedAt,
    ring_epoch: u64,
) -> Result<Sealed, HandoverError> {
    let SealedAt { end, crc } = sealed;
    let held = match store.ownership(point).await {
        Ok(held) => held,
        Err(ReadError::NotFound(_)) => {
            return Ok(Sealed::Refused(HandoverError::NotHeld {
                point: point.clone(),
            }));
        }
        Err(error) => return Err(error.into()),
    };
    let epoch = match &held.handover {
        Some(Handover::Incoming {
            from: sender,
            epoch,
        }) if sender == from => *epoch,
        None if held.owner.as_deref() == Some(local) && held.epoch > FIRST_EPOCH => {
            // Committed already: the old owner asks again after a crash or a lost answer.
            return Ok(Sealed::Committed(held.epoch));
        }
        _ => {
            return Ok(Sealed::Refused(not_incoming(point, from)));
        }
    };
    let snapshot = store.metadata(point).await?;
    if (snapshot.end, snapshot.crc) != (end, crc) {
        return Ok(Sealed::Refused(HandoverError::Differs {
            point: point.clone(),
            held_end: snapshot.end,
            held_crc: snapshot.crc,
            end,
            crc,
        }));
    }
    store.sync(point).await?;
    let epoch = (epoch + 1).max(ring_epoch);
    let committed = Ownership {
        epoch,
        owner: Some(local.to_owned()),
        handover: None,
    };
    store.set_ownership(point, committed).await?;
    crate::reshard::crash_point("commit");
    ::metrics::counter!(crate::metrics::RESHARD_RECEIVED_POINTS).increment(1);
    tracing::info!(%point, %from, epoch, end, "took the point over");
    Ok(Sealed::Committed(epoch))
}

/// Makes the copy of `point` arriving from `from` durable as it is (before the fence).
pub(crate) async fn prepare(
    store: &Store,
    from: &str,
    point: &PointId,
) -> Result<(), HandoverError> {
    match store.ownership(point).await?.handover {
        Some(Handover::Incoming { from: sender, .. }) if sender == from => {
            Ok(store.sync(point).await?)
        }
        _ => Err(not_incoming(point, from)),
    }
}

/// What this node holds of a point it took over, for its old owner's cleanup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Settled {
    pub epoch: u64,
    pub end: u64,
    /// No followers to wait for, or `needed` of them confirmed every byte.
    pub replicated: bool,
}

/// [`Settled`] of `point`; `needed` followers must confirm it (`None`: this node has none).
pub(crate) async fn settled(
    store: &Store,
    progress: &crate::replication::Progress,
    needed: Option<usize>,
    point: &PointId,
) -> Result<Settled, HandoverError> {
    let ownership = match store.ownership(point).await {
        Ok(ownership) => ownership,
        Err(ReadError::NotFound(_)) => {
            return Ok(Settled {
                epoch: 0,
                end: 0,
                replicated: false,
            });
        }
        Err(error) => return Err(error.into()),
    };
    let end = store.metadata(point).await?.end;
    let replicated = needed.is_none_or(|needed| progress.confirmed(point, end) >= needed);
    Ok(Settled {
        epoch: if ownership.handover.is_some() {
            0
        } else {
            ownership.epoch
        },
        end,
        replicated,
    })
}

/// Drops the copy of `point` arriving from `from`, if there is one: the move was given up.
pub(crate) async fn cancel(
    store: &Store,
    from: &str,
    point: &PointId,
) -> Result<(), HandoverError> {
    match store.ownership(point).await {
        Ok(held) if matches!(&held.handover, Some(Handover::Incoming { from: sender, .. }) if sender == from) => {
            match store.delete(point).await {
                Ok(_) | Err(DeleteError::NotFound(_)) => Ok(()),
                Err(error) => Err(error.into()),
            }
        }
        Ok(_) | Err(ReadError::NotFound(_)) => Ok(()),
        Err(error) => Err(error.into()),
    }
}

/// Whether this node's copy of `point` is an empty point nobody took over: what a crash leaves
/// between creating a point and writing its `incoming` record. Replacing it loses nothing.
async fn empty_shell(store: &Store, point: &PointId, held: &Ownership) -> bool {
    held.owner.is_none()
        && held.handover.is_none()
        && store
            .metadata(point)
            .await
            .is_ok_and(|snapshot| snapshot.end == 0)
}

/// The refusal of a step for a point that is not arriving from `from`.
pub(crate) fn not_incoming(point: &PointId, from: &str) -> HandoverError {
    HandoverError::NotIncoming {
        point: point.clone(),
        from: from.to_owned(),
    }
}
