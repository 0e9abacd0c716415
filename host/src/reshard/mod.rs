//! Resharding: handing points to their new owner when the ring changes. The protocol — durable
//! per-point epochs, the handover driven by the old owner, fencing, crash recovery — is designed
//! in `docs/resharding.md`.
//!
//! | module | owns |
//! |---|---|
//! | [`plan`] | which points move when the ring changes (pure); a handover's crash hook |
//! | [`planner`] | the mover's decisions: state in, actions out (no I/O) |
//! | [`gate`] | whether this node takes a write or serves a read of a point, or who does |
//!
//! Which change of the ring is pending and which members were forgotten are facts of the ring,
//! answered in `cluster::change` (placement asks them too).
//!
//! The handover that carries a move out runs on the replication thread (`replication::mover`,
//! `replication::handover`, `replication::takeover`), since it speaks Cap'n Proto.

pub mod gate;
pub mod plan;
pub mod planner;

pub use gate::{Gate, Holder, Refusal};
pub use plan::{CRASH_AT, Move, crash_point, plan};
