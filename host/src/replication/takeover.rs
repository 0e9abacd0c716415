//! The new owner's side of a takeover (`docs/resharding.md`, forget): the points of a forgotten
//! primary are taken over from its followers' copies, and this node, their owner in the ring
//! without it, picks which copy.
//!
//! Followers offer what they hold (`Leader.offer`: end, epoch, CRC32C). Offers of a point are
//! gathered until every live follower of the forgotten member has offered or
//! `reshard.forget_wait_ms` has passed since the first; then the most complete copy (the highest
//! epoch, then the longest, then the follower whose name sorts first) is asked for (`send`) and
//! handed over like any other point: received as `incoming`, sealed, committed at `epoch + 1`.
//! The other offerers wait, then hear `taken` if their copy is a prefix of what this node took
//! over, or `diverged` if it has bytes this node does not (reported and counted, never merged).
//! A forgotten member that returns offers its own copies the same way and is never asked for
//! them: it only learns which are history and which hold bytes nobody else has.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use tokio::time::Instant;

use super::Context;
use super::error::HandoverError;
use crate::metrics;
use crate::point::{Handover, PointId, ReadError, Store};

/// What an offer gets back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Other followers' offers are awaited, or another copy is being taken over.
    Wait,
    /// Hand this copy over: it is the most complete one.
    Send,
    /// This node holds the point at a newer epoch, and the offered copy is a prefix of it.
    Taken,
    /// This node holds the point at a newer epoch, and the offered copy has bytes it does not
    /// (longer, or different); or the offerer is the forgotten member itself and nobody took
    /// the point over.
    Diverged,
}

/// One offered copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Copy {
    pub point: PointId,
    pub end: u64,
    pub epoch: u64,
    /// CRC32C of `[0, end)`.
    pub crc: u32,
}

/// The offers this node has heard, per point, until the point is taken over.
#[derive(Default)]
pub(crate) struct Offers {
    points: HashMap<PointId, Offered>,
}

struct Offered {
    first: Instant,
    /// Per follower, its copy.
    copies: BTreeMap<String, Copy>,
}

/// The verdict on `copy`, offered by `from` as a copy of a point of `forgotten`.
pub(crate) async fn offer(
    context: &Context,
    offers: &RefCell<Offers>,
    from: &str,
    forgotten: &str,
    copy: Copy,
) -> Result<Verdict, HandoverError> {
    let store = &context.store;
    let point = &copy.point;
    match store.ownership(point).await {
        Ok(held) => {
            let newer = match &held.handover {
                Some(Handover::Incoming { from: sender, .. }) if sender == forgotten => {
                    // A handover from the forgotten member never ends: its copy goes.
                    super::handover::cancel(store, forgotten, point).await?;
                    false
                }
                Some(Handover::Incoming { from: sender, .. }) => {
                    return Ok(if sender == from {
                        Verdict::Send
                    } else {
                        Verdict::Wait
                    });
                }
                Some(Handover::Moved { epoch, .. }) => *epoch > copy.epoch,
                // Owned here (or being handed on) at an epoch as new: taken over already, or
                // created here once the takeover was over.
                _ => held.epoch >= copy.epoch,
            };
            if newer {
                offers.borrow_mut().points.remove(point);
                let agrees = prefix_agrees(store, &copy).await?;
                if !agrees {
                    ::metrics::counter!(metrics::TAKEOVER_DIVERGED).increment(1);
                    tracing::warn!(%point, %from, end = copy.end, epoch = copy.epoch, held_epoch = held.epoch, "an offered copy has bytes this node does not: reported, not merged");
                }
                return Ok(if agrees {
                    Verdict::Taken
                } else {
                    Verdict::Diverged
                });
            }
            // An older copy: replaced by the one taken over.
        }
        Err(ReadError::NotFound(_)) => {}
        Err(error) => return Err(error.into()),
    }
    let membership = context.membership.borrow().clone();
    if from == forgotten {
        // Never asked for: once its followers' copies are taken over, what only the forgotten
        // member holds goes to its quarantine.
        let pending = crate::cluster::change::forgotten(&membership.ring)
            .iter()
            .any(|f| {
                f.name == forgotten && crate::cluster::change::takeover_pending(&membership, f)
            });
        return Ok(if pending {
            Verdict::Wait
        } else {
            Verdict::Diverged
        });
    }
    let expected: Vec<&String> = crate::cluster::change::followers_of(&membership, forgotten)
        .map(|m| &m.name)
        .collect();
    let wait = Duration::from_millis(context.services.config.reshard.forget_wait_ms);
    let mut offers = offers.borrow_mut();
    let offered = offers
        .points
        .entry(point.clone())
        .or_insert_with(|| Offered {
            first: Instant::now(),
            copies: BTreeMap::new(),
        });
    offered.copies.insert(from.to_owned(), copy);
    let everyone = expected.iter().all(|f| offered.copies.contains_key(*f));
    if !everyone && offered.first.elapsed() < wait {
        return Ok(Verdict::Wait);
    }
    let chosen = offered
        .copies
        .iter()
        .max_by(|(a_name, a), (b_name, b)| {
            (a.epoch, a.end)
                .cmp(&(b.epoch, b.end))
                .then_with(|| b_name.cmp(a_name))
        })
        .map(|(name, _)| name.as_str());
    Ok(if chosen == Some(from) {
        Verdict::Send
    } else {
        Verdict::Wait
    })
}

/// Whether `copy` is a prefix of what this node holds: as long or shorter, and the same CRC32C
/// over its length.
async fn prefix_agrees(store: &Store, copy: &Copy) -> Result<bool, ReadError> {
    let held = store.metadata(&copy.point).await?;
    if copy.end > held.end {
        return Ok(false);
    }
    if copy.end == held.end {
        return Ok(copy.crc == held.crc);
    }
    const CHUNK: u64 = 1024 * 1024;
    let mut crc = 0;
    let mut at = 0;
    while at < copy.end {
        let len = CHUNK.min(copy.end - at);
        let bytes = store.read(&copy.point, at, len).await?;
        if bytes.is_empty() {
            return Ok(false);
        }
        crc = crc32c::crc32c_append(crc, &bytes);
        at += bytes.len() as u64;
    }
    Ok(crc == copy.crc)
}
