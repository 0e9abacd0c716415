//! Resharding: handing points to their new owner when the ring changes. The protocol — durable
//! per-point epochs, the handover driven by the old owner, fencing, crash recovery — is designed
//! in `docs/resharding.md`.
//!
//! | module | owns |
//! |---|---|
//! | [`plan`] | the pending change of the ring, the forgotten members, the moves (pure) |
//! | [`gate`] | whether this node takes a write or serves a read of a point, or who does |
//!
//! The handover that carries a move out runs on the replication thread (`replication::mover`,
//! `replication::handover`, `replication::takeover`), since it speaks Cap'n Proto.

pub mod gate;
pub mod plan;
pub mod planner;

pub use gate::{Gate, Holder, Refusal};
pub use plan::{
    CRASH_AT, Change, Forgotten, Move, crash_point, followers_of, forgotten, pending, plan,
    takeover_pending,
};
