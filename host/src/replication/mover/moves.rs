//! The steps of one move on the old owner: copy, fence, seal, switch (`hand_over`); give a
//! handover up; clean a handed-over copy up once its new owner holds it replicated; and the
//! copies a follower offers, grouped by their new owner.

use std::collections::BTreeMap;
use std::time::Instant;

use tokio_util::sync::CancellationToken;

use crate::metrics;
use crate::point::{Handover, Ownership, PointId, SealedAt};
use crate::replication::Context;
use crate::replication::error::MoveError;
use crate::replication::replicator::ScopeChange;
use crate::reshard::{self, Move};

use super::*;

/// Hands `planned.point` to `planned.to`: copy, fence, seal, switch. Resumes from the point's
/// record (`copying` or `sealed`) after a failure or a restart.
pub(super) async fn hand_over(
    context: &Context,
    peer: &Peer,
    planned: &Move,
    target: u64,
    stop: &CancellationToken,
) -> Result<(), MoveError> {
    let store = &context.store;
    let local = &context.services.config.node_name;
    let (point, to) = (&planned.point, &planned.to);
    let ownership = store.ownership(point).await?;
    tracing::debug!(%point, %to, ?ownership, "handing over");
    // Copying, taking writes here: where a move starts, and where a lifted fence goes back to.
    let copying = Ownership {
        handover: Some(Handover::Copying {
            to: to.clone(),
            target_ring: target,
        }),
        ..ownership.clone()
    };
    let resumed_seal = match &ownership.handover {
        None => {
            store.set_ownership(point, copying.clone()).await?;
            reshard::crash_point("copying");
            None
        }
        Some(Handover::Copying { to: towards, .. }) if towards == to => None,
        Some(Handover::Sealed {
            to: towards,
            end,
            crc,
            ..
        }) if towards == to => Some((*end, *crc)),
        Some(Handover::Moved { .. }) => return Ok(()),
        Some(other) => {
            return Err(MoveError::Elsewhere {
                point: point.clone(),
                handover: other.clone(),
                to: to.clone(),
            });
        }
    };
    let epoch = ownership.epoch;
    let fenced = match resumed_seal {
        Some((end, crc)) => {
            // Sealed before a failure or a restart: the destination may have committed.
            if let Seal::Committed(committed) = peer.seal(local, point, end, crc).await? {
                return switch(
                    context,
                    peer,
                    point,
                    to,
                    epoch,
                    committed,
                    end,
                    Instant::now(),
                )
                .await;
            }
            let held = peer.begin(local, point, epoch).await?;
            send(peer, point, held).await?;
            Fenced {
                end,
                crc,
                at: Instant::now(),
                held,
            }
        }
        None => copy_and_fence(context, peer, planned, target, epoch, stop).await?,
    };
    let Fenced { end, crc, held, .. } = fenced;
    // Fenced: nothing is written here any more; the destination gets the rest.
    if let Err(error) = peer.catch_up(context, point, 0, FENCE_WAIT).await {
        // The seal was not sent: nothing is committed there, so writes may resume here.
        store.set_ownership(point, copying).await?;
        return Err(MoveError::FenceLifted(Box::new(error)));
    }
    tracing::debug!(%point, end, "sealing");
    match peer.seal(local, point, end, crc).await? {
        Seal::Committed(committed) => {
            reshard::crash_point("committed");
            ::metrics::counter!(metrics::RESHARD_MOVED_BYTES).increment(end.saturating_sub(held));
            switch(context, peer, point, to, epoch, committed, end, fenced.at).await
        }
        Seal::Refused(reason) => {
            // Nothing committed there: back to owning it here; the move starts over later.
            store.set_ownership(point, copying).await?;
            let _ = peer.changes.send(ScopeChange::Drop(point.clone())).await;
            peer.cancel(local, point).await?;
            Err(MoveError::SealRefused {
                point: point.clone(),
                to: to.clone(),
                reason,
            })
        }
    }
}

/// Where a copy stopped: the point fenced here at `end` bytes with CRC32C `crc`.
struct Fenced {
    end: u64,
    crc: u32,
    /// When writes were fenced.
    at: Instant,
    /// What the destination held when the copy began.
    held: u64,
}

/// Copies `planned.point` to its destination until it lags by at most
/// `reshard.fence_lag_bytes`, has it made durable there, then fences writes here (the `sealed`
/// record). Stopped by `stop` before the fence.
async fn copy_and_fence(
    context: &Context,
    peer: &Peer,
    planned: &Move,
    target: u64,
    epoch: u64,
    stop: &CancellationToken,
) -> Result<Fenced, MoveError> {
    let local = &context.services.config.node_name;
    let (point, to) = (&planned.point, &planned.to);
    let lag = context.services.config.reshard.fence_lag_bytes;
    let copy = async {
        let held = peer.begin(local, point, epoch).await?;
        send(peer, point, held).await?;
        tracing::debug!(%point, held, "copying");
        peer.catch_up(context, point, lag, STALL).await?;
        peer.prepare(local, point).await?;
        Ok::<_, MoveError>(held)
    };
    let held = tokio::select! {
        held = copy => held?,
        _ = stop.cancelled() => {
            return Err(MoveError::Stopped {
                point: point.clone(),
                to: to.clone(),
            });
        }
    };
    tracing::debug!(%point, "fencing");
    let at = Instant::now();
    let SealedAt { end, crc } = context.store.seal(point, to, target).await?;
    reshard::crash_point("sealed");
    Ok(Fenced { end, crc, at, held })
}

/// This node's copies of the `planned` points as offers (`Leader.offer`), grouped by the member
/// each is offered to.
pub(super) async fn copies_by_owner(
    store: &crate::point::Store,
    planned: impl IntoIterator<Item = Move>,
) -> BTreeMap<String, Vec<crate::replication::takeover::Copy>> {
    let mut by_owner: BTreeMap<String, Vec<crate::replication::takeover::Copy>> = BTreeMap::new();
    for planned in planned {
        let (Ok(ownership), Ok(snapshot)) = (
            store.ownership(&planned.point).await,
            store.metadata(&planned.point).await,
        ) else {
            continue;
        };
        by_owner
            .entry(planned.to)
            .or_default()
            .push(crate::replication::takeover::Copy {
                point: planned.point,
                end: snapshot.end,
                epoch: ownership.epoch,
                crc: snapshot.crc,
            });
    }
    by_owner
}

/// Gives up the handover of `planned.point` to `planned.to` that is still copying: the
/// destination drops its copy (if it can be reached: an `incoming` copy left there is replaced
/// by the next handover anyway), and the point takes writes here again.
pub(super) async fn give_up(
    context: &Context,
    peer: Option<&Peer>,
    planned: &Move,
) -> Result<(), MoveError> {
    let (point, to) = (&planned.point, &planned.to);
    if let Some(peer) = peer {
        let _ = peer.changes.send(ScopeChange::Drop(point.clone())).await;
        if let Err(error) = peer.cancel(&context.services.config.node_name, point).await {
            tracing::warn!(%point, %to, %error, "cannot tell the destination that the handover is given up");
        }
    }
    let store = &context.store;
    let ownership = store.ownership(point).await?;
    if matches!(&ownership.handover, Some(Handover::Copying { to: towards, .. }) if towards == to) {
        let owned = Ownership {
            handover: None,
            ..ownership
        };
        store.set_ownership(point, owned).await?;
        tracing::info!(%point, %to, "gave the handover up: the ring no longer calls for it");
    }
    Ok(())
}

/// Deletes this node's copy of `point`, handed over at `epoch`, once its new owner holds all of
/// it replicated enough. Returns whether it was deleted. Deleting it removes it from this
/// node's followers too (their replicator sends the removal).
pub(super) async fn clean_up(
    context: &Context,
    peer: &Peer,
    point: &PointId,
    epoch: u64,
) -> Result<bool, MoveError> {
    let store = &context.store;
    let end = store.metadata(point).await?.end;
    let settled = peer.settled(point).await?;
    if settled.epoch < epoch || settled.end < end || !settled.replicated {
        return Ok(false);
    }
    let still_moved = matches!(
        store.ownership(point).await?.handover,
        Some(Handover::Moved { .. })
    );
    if !still_moved {
        return Ok(false);
    }
    let size = store.delete(point).await?;
    ::metrics::counter!(metrics::RESHARD_CLEANED_POINTS).increment(1);
    tracing::info!(%point, to = %peer.name, size, "deleted the handed-over copy: its new owner holds it replicated");
    Ok(true)
}

/// Adds `point` to what the destination's replicator sends, from `held`.
pub(super) async fn send(peer: &Peer, point: &PointId, held: u64) -> Result<(), MoveError> {
    peer.changes
        .send(ScopeChange::Add {
            point: point.clone(),
            held,
        })
        .await
        .map_err(|_| peer.stopped().into())
}

/// The destination committed `point` at `committed`: redirect its writes there from now on.
#[allow(clippy::too_many_arguments)]
pub(super) async fn switch(
    context: &Context,
    peer: &Peer,
    point: &PointId,
    to: &str,
    epoch: u64,
    committed: u64,
    end: u64,
    fenced_at: Instant,
) -> Result<(), MoveError> {
    let moved = Ownership {
        epoch,
        owner: None,
        handover: Some(Handover::Moved {
            to: to.to_owned(),
            epoch: committed,
        }),
    };
    context.store.set_ownership(point, moved).await?;
    reshard::crash_point("moved");
    let _ = peer.changes.send(ScopeChange::Drop(point.clone())).await;
    let fenced = fenced_at.elapsed();
    ::metrics::histogram!(metrics::RESHARD_FENCE_SECONDS).record(fenced.as_secs_f64());
    ::metrics::counter!(metrics::RESHARD_MOVED_POINTS).increment(1);
    tracing::info!(%point, %to, epoch = committed, end, fenced_ms = fenced.as_millis() as u64, "handed the point over");
    Ok(())
}
