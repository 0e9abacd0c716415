//! The wire of the client API: the leaf that the server ([`crate::api`]), the client
//! ([`crate::client`]) and the balancer all stand on, so that none of them imports another to
//! speak it. It holds the generated `streaming.v1` types (and the controller's
//! `goutube.controller.v1`), the HTTP/2 settings both ends use, and
//! the names of the metadata goutube adds to statuses and requests.

#[allow(clippy::all, missing_docs, unreachable_pub)]
mod generated {
    tonic::include_proto!("streaming.v1");
}

pub use generated::*;

/// The controller's wire (`goutube.controller.v1`): Raft messages between voters, proposals and
/// the status, served on every voter's API port (`crate::controller`).
#[allow(clippy::all, missing_docs, unreachable_pub)]
pub mod controller {
    tonic::include_proto!("goutube.controller.v1");
}

/// HTTP/2 flow-control window of one stream: large enough that a 256 KiB frame never waits for
/// a window update (STACK.md measured ~7x throughput over the defaults).
pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
/// HTTP/2 flow-control window of a connection.
pub const CONNECTION_WINDOW: u32 = 8 * 1024 * 1024;
/// The largest HTTP/2 frame a peer may send us: a 256 KiB record travels in one DATA frame, not
/// sixteen of the default 16 KiB (each with its own framing and wake-ups on both sides).
pub const H2_FRAME: u32 = 1024 * 1024;

/// Status metadata: the name of the member that owns the point of a refused call (or holds it,
/// for a read; or leads the follower that refused a write): the member to ask instead.
pub const OWNER_METADATA: &str = "goutube-owner";
/// Status metadata: the client API address of that member.
pub const OWNER_ADDR_METADATA: &str = "goutube-owner-addr";
/// Status metadata: where the point ends, when a frame's `expected_offset` was not its end.
pub const END_METADATA: &str = "goutube-end";
/// Status metadata: that frame's `expected_offset`.
pub const EXPECTED_METADATA: &str = "goutube-expected";
/// Status metadata: milliseconds to wait before retrying an `Unavailable` write that the
/// controller's next decision can let through (a group electing a new leader, a leader
/// without a session).
pub const RETRY_AFTER_METADATA: &str = "goutube-retry-after-ms";
/// Status metadata: the leader epoch of the group a refusal is about (with [`OWNER_METADATA`]
/// naming its last leader, while it elects a new one).
pub const LEADER_EPOCH_METADATA: &str = "goutube-leader-epoch";

/// Status metadata: present (`1`) on a refusal made before the call could write anything, so
/// that sending the same frames again writes nothing twice, with or without `expected_offset`
/// (a member that does not see the balancer forwarding the call live yet).
pub const NOTHING_WRITTEN_METADATA: &str = "goutube-nothing-written";

/// Request metadata: the subject a balancer forwards a call for (binary, so that any subject
/// travels). A node honours it only when the call comes over a connection whose certificate
/// names a live balancer member; otherwise the call is the connection's own.
pub const ON_BEHALF_OF: &str = "goutube-on-behalf-of-bin";
/// Request metadata: set to `consume` on the `GetMetadata` a balancer makes to route a client's
/// consume, so the node authorizes that client to consume, not to read metadata. Honoured, like
/// [`ON_BEHALF_OF`], only from a balancer member (which is trusted with the subject already).
pub const PURPOSE: &str = "goutube-purpose";
