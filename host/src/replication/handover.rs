//! The new owner's side of a handover (`docs/resharding.md`): the old owner calls these on this
//! node's replication port, through `Leader.receive`, `handover`, `prepare`, `seal`, `cancel` and
//! `settled`.
//!
//! This side never decides anything on its own: it holds the point as `incoming` from the old
//! owner (refusing writes for it) while the old owner pushes its bytes, commits the next epoch
//! only when what it holds is exactly what the old owner sealed (length and CRC32C, synced
//! first), and answers the same when asked again, so an old owner that crashed and asks once
//! more learns what happened.

use crate::point::ownership::FIRST_EPOCH;
use crate::point::{DeleteError, Handover, Ownership, PointId, ReadError, Store};

/// How a seal ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sealed {
    /// This node owns the point at this epoch.
    Committed(u64),
    /// It does not hold what was sealed; the old owner starts the move over.
    Refused(String),
}

/// Starts (or resumes) receiving `point` from `from`, which owns it at `epoch`. Returns the end
/// this node holds, where the copy continues.
pub async fn begin(store: &Store, from: &str, point: &PointId, epoch: u64) -> Result<u64, String> {
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
            return Ok(store.metadata(point).await.map_err(text)?.end);
        }
        Ok(held)
            if held.epoch >= epoch
                && !held.is_arriving()
                && !empty_shell(store, point, &held).await =>
        {
            return Err(format!(
                "this node holds point {point} at epoch {}, not older than {from}'s {epoch}",
                held.epoch
            ));
        }
        Ok(held) => {
            // An older copy (history of an earlier owner) or a move that started over.
            tracing::info!(%point, %from, held_epoch = held.epoch, epoch, "replacing the copy held here with the one being handed over");
            match store.delete(point).await {
                Ok(_) | Err(DeleteError::NotFound(_)) => {}
                Err(error) => return Err(error.to_string()),
            }
        }
        Err(ReadError::NotFound(_)) => {}
        Err(error) => return Err(error.to_string()),
    }
    store.set_ownership(point, incoming).await.map_err(text)?;
    crate::reshard::crash_point("incoming");
    Ok(0)
}

/// Ends the handover of `point` from `from`: if this node holds exactly `end` bytes with CRC32C
/// `crc`, it syncs them and commits the next epoch with itself as owner.
pub async fn seal(
    store: &Store,
    local: &str,
    from: &str,
    point: &PointId,
    end: u64,
    crc: u32,
) -> Result<Sealed, String> {
    let held = match store.ownership(point).await {
        Ok(held) => held,
        Err(ReadError::NotFound(_)) => {
            return Ok(Sealed::Refused(format!("this node holds no point {point}")));
        }
        Err(error) => return Err(error.to_string()),
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
            return Ok(Sealed::Refused(format!(
                "point {point} is not being handed to this node by {from}"
            )));
        }
    };
    let snapshot = store.metadata(point).await.map_err(text)?;
    if (snapshot.end, snapshot.crc) != (end, crc) {
        return Ok(Sealed::Refused(format!(
            "this node holds {} bytes of point {point} with CRC32C {:08x}, not {end} with {crc:08x}",
            snapshot.end, snapshot.crc
        )));
    }
    store.sync(point).await.map_err(text)?;
    let committed = Ownership {
        epoch: epoch + 1,
        owner: Some(local.to_owned()),
        handover: None,
    };
    store.set_ownership(point, committed).await.map_err(text)?;
    crate::reshard::crash_point("commit");
    ::metrics::counter!(crate::metrics::RESHARD_RECEIVED_POINTS).increment(1);
    tracing::info!(%point, %from, epoch = epoch + 1, end, "took the point over");
    Ok(Sealed::Committed(epoch + 1))
}

/// Makes the copy of `point` arriving from `from` durable as it is (before the fence).
pub async fn prepare(store: &Store, from: &str, point: &PointId) -> Result<(), String> {
    match store.ownership(point).await.map_err(text)?.handover {
        Some(Handover::Incoming { from: sender, .. }) if sender == from => {
            store.sync(point).await.map_err(text)
        }
        _ => Err(format!(
            "point {point} is not being handed to this node by {from}"
        )),
    }
}

/// What this node holds of a point it took over, for its old owner's cleanup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settled {
    pub epoch: u64,
    pub end: u64,
    /// No followers to wait for, or `needed` of them confirmed every byte.
    pub replicated: bool,
}

/// [`Settled`] of `point`; `needed` followers must confirm it (`None`: this node has none).
pub async fn settled(
    store: &Store,
    progress: &crate::replication::Progress,
    needed: Option<usize>,
    point: &PointId,
) -> Result<Settled, String> {
    let ownership = match store.ownership(point).await {
        Ok(ownership) => ownership,
        Err(ReadError::NotFound(_)) => {
            return Ok(Settled {
                epoch: 0,
                end: 0,
                replicated: false,
            });
        }
        Err(error) => return Err(error.to_string()),
    };
    let end = store.metadata(point).await.map_err(text)?.end;
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
pub async fn cancel(store: &Store, from: &str, point: &PointId) -> Result<(), String> {
    match store.ownership(point).await {
        Ok(held) if matches!(&held.handover, Some(Handover::Incoming { from: sender, .. }) if sender == from) => {
            match store.delete(point).await {
                Ok(_) | Err(DeleteError::NotFound(_)) => Ok(()),
                Err(error) => Err(error.to_string()),
            }
        }
        Ok(_) | Err(ReadError::NotFound(_)) => Ok(()),
        Err(error) => Err(error.to_string()),
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

fn text(error: impl std::fmt::Display) -> String {
    error.to_string()
}
