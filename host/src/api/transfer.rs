//! Planned moves of leadership: this node, the leader of a replica group, hands the group to a
//! member of its in-sync set, for `goutube members transfer` and before a graceful stop,
//! losing no byte and failing no client (`docs/failover.md`, "Planned moves").
//!
//! For each group this node leads:
//! 1. the member to lead is the one asked for, else the in-sync member connected here and
//!    least behind;
//! 2. every write is held back ([`Gate::hold_writes`]): those in flight finish, new ones wait;
//! 3. that member must confirm the end of every point this node holds: it then holds every
//!    byte, acknowledged or not, and nothing is appended meanwhile;
//! 4. the controller commits `Transfer`, and this node waits until its own view has it;
//! 5. the writes go on: each finds that this node no longer takes it, and is sent to the new
//!    leader (`FailedPrecondition` naming it), which the clients follow.
//!
//! A step that fails lets the writes go on here and says why: a transfer is never half made.

use std::time::Duration;

use tokio::time::Instant;

use crate::cluster::StepError;
use crate::config::Failover;
use crate::controller::Topology;
use crate::metrics;

use super::Context;

/// One group handed over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handed {
    /// The slot (the group's primary).
    pub slot: String,
    /// Its new leader.
    pub to: String,
    /// How long this node held writes back for it.
    pub held: Duration,
}

/// Why a group was not handed over (its writes go on here).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransferError {
    /// This node leads no group.
    #[error("node {0} leads no replica group: there is no leadership to hand over")]
    LeadsNothing(String),
    /// The member asked for is not in the group's in-sync set.
    #[error(
        "{to} is not in the in-sync set of {slot} ({in_sync}): only a member that holds every \
         acknowledged byte may lead it"
    )]
    NotInSync {
        /// The slot.
        slot: String,
        /// The member asked for.
        to: String,
        /// The in-sync set, listed.
        in_sync: String,
    },
    /// No member of the in-sync set is connected to this leader.
    #[error(
        "no member of the in-sync set of {slot} is connected to this leader (in sync: \
         {in_sync}): nobody can take the group over now"
    )]
    NoCandidate {
        /// The slot.
        slot: String,
        /// The in-sync set, listed.
        in_sync: String,
    },
    /// The member to lead did not confirm every byte in time.
    #[error(
        "{to} had confirmed point {point} up to {has} of {end} bytes after {waited:?}; the \
         writes go on here"
    )]
    Behind {
        /// The member to lead.
        to: String,
        /// The first point it had not confirmed whole.
        point: String,
        /// That point's end here.
        end: u64,
        /// What it had confirmed of it.
        has: u64,
        /// How long writes were held back.
        waited: Duration,
    },
    /// The controller did not commit the transfer.
    #[error("the controller did not hand {slot} to {to}: {error}")]
    NotCommitted {
        /// The slot.
        slot: String,
        /// The member to lead.
        to: String,
        /// What the controller answered.
        error: StepError,
    },
    /// Committed, but this node's view of the controller's state did not show it in time.
    #[error("the transfer of {slot} to {to} was not seen committed within {waited:?}")]
    Unseen {
        /// The slot.
        slot: String,
        /// The member to lead.
        to: String,
        /// How long writes were held back.
        waited: Duration,
    },
}

impl TransferError {
    /// Whether asking again later may succeed (`Unavailable`) rather than needing another
    /// request (`FailedPrecondition`).
    pub fn code(&self) -> tonic::Code {
        match self {
            TransferError::LeadsNothing(_)
            | TransferError::NotInSync { .. }
            | TransferError::NoCandidate { .. } => tonic::Code::FailedPrecondition,
            TransferError::NotCommitted {
                error: StepError::Refused(_) | StepError::Unknown(_),
                ..
            } => tonic::Code::FailedPrecondition,
            TransferError::Behind { .. }
            | TransferError::NotCommitted { .. }
            | TransferError::Unseen { .. } => tonic::Code::Unavailable,
        }
    }
}

/// Hands every group this node leads to a member of its in-sync set (`to`, when given), one
/// after the other; returns what it handed, or why the first one that could not be was not.
pub async fn hand_over(context: &Context, to: Option<&str>) -> Result<Vec<Handed>, TransferError> {
    let local = &context.services.config.node_name;
    let topology = context.services.controller.topology();
    let led: Vec<(String, u64)> = topology
        .led_by(local)
        .map(|(slot, group)| (slot.to_owned(), group.leader_epoch))
        .collect();
    if led.is_empty() {
        return Err(TransferError::LeadsNothing(local.clone()));
    }
    let mut handed = Vec::new();
    for (slot, leader_epoch) in led {
        let group = &topology.groups[&slot];
        let listed = || group.in_sync.iter().cloned().collect::<Vec<_>>().join(", ");
        let to = match to {
            Some(to) if group.in_sync.contains(to) => to.to_owned(),
            Some(to) => {
                return Err(TransferError::NotInSync {
                    slot,
                    to: to.to_owned(),
                    in_sync: listed(),
                });
            }
            None => match context.progress.least_behind(&group.in_sync).first() {
                Some(to) => to.clone(),
                None => {
                    return Err(TransferError::NoCandidate {
                        slot,
                        in_sync: listed(),
                    });
                }
            },
        };
        handed.push(hand_group(context, slot, leader_epoch, to).await?);
    }
    Ok(handed)
}

/// Steps 2 to 5 for one group.
async fn hand_group(
    context: &Context,
    slot: String,
    leader_epoch: u64,
    to: String,
) -> Result<Handed, TransferError> {
    let config = &context.services.config;
    let catch_up = Duration::from_millis(config.replication.ack_timeout_ms);
    let commit = Duration::from_millis(config.controller.propose_timeout_ms);
    let started = Instant::now();
    let held = context.gate.hold_writes().await;
    let ends = context.store.ends().await;
    if let Err((point, end, has)) = context.progress.wait_for(&to, &ends, catch_up).await {
        return Err(TransferError::Behind {
            to,
            point: point.to_string(),
            end,
            has,
            waited: started.elapsed(),
        });
    }
    let proposed = context.steps.transfer(&slot, leader_epoch, &to).await;
    if proposed.is_ok() {
        // Committed: writes stay held until this node's view has it too.
        let moved = |topology: &Topology| {
            topology
                .groups
                .get(&slot)
                .is_none_or(|group| group.leader_epoch != leader_epoch)
        };
        context.until_view(commit, moved).await;
    }
    // A proposal that failed without an answer may still be committed later; the writes go on
    // here meanwhile, and none of them can be acknowledged once `to` leads: it confirms no
    // change from this node from then on, and this node waits for it (`docs/failover.md`).
    let now_leads = context.services.controller.topology().writer(&slot) == to;
    drop(held);
    let waited = started.elapsed();
    if !now_leads {
        return Err(match proposed {
            Err(error) => TransferError::NotCommitted { slot, to, error },
            Ok(()) => TransferError::Unseen { slot, to, waited },
        });
    }
    ::metrics::counter!(metrics::TRANSFERS).increment(1);
    ::metrics::histogram!(metrics::TRANSFER_HOLD_SECONDS).record(waited.as_secs_f64());
    tracing::info!(%slot, %to, held_ms = waited.as_millis(), "handed the group's leadership over");
    Ok(Handed {
        slot,
        to,
        held: waited,
    })
}

/// Before a graceful stop: hands every group this node leads that fails over by itself to a
/// member of its in-sync set, so that its writers see a pause rather than an election. A group
/// that fails over only by an operator's decision waits for this node, as before; a transfer
/// that cannot be made within a session (when an election would have ended the wait) is
/// logged, and the stop goes on.
pub async fn before_stop(context: &Context) {
    let config = &context.services.config;
    let within = Duration::from_millis(config.controller.session_ms.min(config.shutdown_grace_ms));
    let local = &config.node_name;
    let topology = context.services.controller.topology();
    // (A member leads one group in practice; should it lead more, they are handed over
    // together or not at all.)
    let mut led = topology.led_by(local).peekable();
    let worth_it = led.peek().is_some()
        && led.all(|(_, group)| {
            matches!(group.failover, Failover::Automatic { .. }) && !group.in_sync.is_empty()
        });
    if !worth_it {
        return;
    }
    match tokio::time::timeout(within, hand_over(context, None)).await {
        Ok(Ok(handed)) => {
            for handed in handed {
                tracing::info!(slot = %handed.slot, to = %handed.to, "stopping: handed the group over first");
            }
        }
        Ok(Err(error)) => {
            tracing::warn!(%error, "stopping without handing the group over: its followers elect a leader once this node's session expires");
        }
        Err(_) => tracing::warn!(
            ?within,
            "stopping without handing the group over (it took too long): its followers elect a leader once this node's session expires"
        ),
    }
}
