//! What a proposer asks the controller ([`Command`], one entry of its log) and what it gets
//! back: [`Applied`], or the rule the command broke ([`Rejected`]). The rules themselves are in
//! `state.rs`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::cluster::ring::{Ring, RingMember};
use crate::cluster::{Handed, Lifecycle};
use crate::config::Failover;

/// One entry of the controller's log: a decision asked for. Each is checked against the state
/// it is applied to, so a proposer with a stale view cannot make a wrong one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Command {
    /// Forms the ring of these primaries, all active.
    Form {
        /// The founders' records, by name.
        founders: BTreeMap<String, RingMember>,
    },
    /// A primary enters the formed ring as `joining`: it owns nothing until its ranges are
    /// handed over.
    Join {
        /// Its name.
        name: String,
        /// Its record (the lifecycle and version are the controller's).
        record: RingMember,
    },
    /// A member of the ring announces new addresses (a restart on other ports).
    Addresses {
        /// The member.
        name: String,
        /// Its client API address.
        rpc_addr: String,
        /// Its replication address.
        replication_addr: String,
    },
    /// An operator drains an active primary: its points go to the others, then it leaves.
    Drain {
        /// The member.
        name: String,
    },
    /// A member's own step at the end of a change: `joining` → `active` once every owner
    /// announced it handed the joining member its points; `leaving` → `left` once drained.
    Step {
        /// The member.
        name: String,
        /// Its new state.
        to: Lifecycle,
    },
    /// An operator forgets a dead member: its points are taken over from its followers' copies.
    Forget {
        /// The member.
        name: String,
    },
    /// A member announces (or clears) what it has handed over.
    Announce {
        /// The member.
        name: String,
        /// Its announcement.
        handed: Option<Handed>,
    },
    /// A follower copies a primary's slot.
    Follow {
        /// The follower.
        follower: String,
        /// The primary whose slot it copies.
        slot: String,
    },
    /// A group's leader counts a follower in the group's in-sync set: the leader saw it hold
    /// the end of every point of the slot after it started waiting for it.
    InSync {
        /// The slot (the group's primary).
        slot: String,
        /// The follower.
        follower: String,
        /// The epoch the proposer leads the group at: a stale leader's request is refused.
        leader_epoch: u64,
    },
    /// A group's leader stops counting a follower in the in-sync set; it stops waiting for it
    /// once this is committed, not before.
    OutOfSync {
        /// The slot (the group's primary).
        slot: String,
        /// The follower.
        follower: String,
        /// The epoch the proposer leads the group at: a stale leader's request is refused.
        leader_epoch: u64,
        /// Why, in words (lagging, disconnected, bytes it had confirmed are gone).
        reason: String,
    },
    /// A group's leader reports how its group may fail over (its configuration decides:
    /// `Config::failover`).
    Failover {
        /// The slot.
        slot: String,
        /// The epoch the proposer leads the group at: a stale leader's report is refused.
        leader_epoch: u64,
        /// How.
        failover: Failover,
    },
    /// The controller leader fences `member`, whose session expired: each slot it led gets the
    /// leader named here, a member of the slot's in-sync set, at this entry's epoch; `member`
    /// becomes a follower of it, outside the in-sync set, until it caught up again.
    Fence {
        /// The member fenced.
        member: String,
        /// The new leader of each slot it led.
        leaders: BTreeMap<String, String>,
    },
    /// A group's leader hands the group to a member of its in-sync set (a planned move: an
    /// operator's `goutube members transfer`, or a graceful stop). The leader proposes it only
    /// once it stopped appending and saw `to` confirm the end of every point, so `to` holds
    /// every byte, acknowledged or not. `to` leads at this entry's epoch; the old leader follows
    /// it, outside the in-sync set until it is seen caught up again.
    Transfer {
        /// The slot (the group's primary).
        slot: String,
        /// The epoch the proposer leads the group at: a stale leader's request is refused.
        leader_epoch: u64,
        /// The member that leads the group from now on.
        to: String,
    },
    /// An operator names `to`, a follower of `slot`'s group outside its in-sync set, its
    /// leader: the leader is lost and no member of the set is live (`goutube members elect
    /// SLOT --to M --unclean`). Acknowledged bytes that only the lost members held are gone,
    /// and the operator was told so. `to` leads at this entry's epoch with an empty in-sync
    /// set: the others enter again once seen caught up with it.
    ElectUnclean {
        /// The slot.
        slot: String,
        /// Its new leader.
        to: String,
    },
    /// A member starts again after a stop that was not clean (a crash, `kill -9`, a disk
    /// replaced): what it confirmed may be gone (a tail damaged on disk, cut at recovery), so it
    /// leaves every in-sync set it is in, before it holds a session (no election can name it
    /// meanwhile). Its leader adds it again once it is seen caught up.
    Unclean {
        /// The member.
        member: String,
    },
    /// The first entry of a cluster created before its controller: the ring gossip had decided,
    /// and the highest epoch its stores held.
    Import {
        /// The ring as it was on disk.
        ring: Ring,
        /// Every epoch the controller gives out is above this.
        max_epoch: u64,
    },
}

/// What applying a command did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Applied {
    /// The state changed; the entry's epoch.
    Changed {
        /// The epoch of this entry.
        epoch: u64,
    },
    /// The state already was what the command asks (a retry of a committed command).
    Unchanged,
}

/// Why a command was refused. The state is untouched, but the entry counts as applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Rejected {
    /// The ring is not formed yet.
    #[error("the ring is not formed yet")]
    NotFormed,
    /// The ring is formed already (or a ring was imported).
    #[error("the ring is formed already")]
    Formed,
    /// Formation or an import needs at least one primary.
    #[error("a ring needs at least one primary")]
    NoFounders,
    /// Only primaries own ranges.
    #[error("{0} is not a primary: only leaders and standalone nodes own ranges")]
    NotPrimary(String),
    /// No member of that name.
    #[error("{0} is not a member of the ring")]
    Unknown(String),
    /// A member of that name is in the ring already (in any state: names are never reused).
    #[error("a member called {0} is in the ring already ({state})", state = .1.as_str())]
    NameTaken(String, Lifecycle),
    /// Another change of the ring is under way.
    #[error("one topology change at a time: {0}")]
    ChangeUnderWay(String),
    /// The step would leave the ring without an owner.
    #[error("{0} is the last primary that owns a range")]
    LastOwner(String),
    /// The step is not one a member in this state can take.
    #[error("{name} cannot step from {} to {}", .from.as_str(), .to.as_str())]
    Transition {
        /// The member.
        name: String,
        /// Its state.
        from: Lifecycle,
        /// The state asked for.
        to: Lifecycle,
    },
    /// A joining member turns active only once every owner handed it its points.
    #[error("{joining} is not handed over yet: {owner} has not announced it")]
    NotHanded {
        /// The joining member.
        joining: String,
        /// An owner that has not announced the join handed.
        owner: String,
    },
    /// No replica group has this slot.
    #[error("no replica group has the slot {0}")]
    NoGroup(String),
    /// A request about a group made by a leader of an earlier epoch.
    #[error("{slot} is led at epoch {current}, not {asked}: the request of a deposed leader")]
    StaleLeader {
        /// The slot.
        slot: String,
        /// The epoch the request was made at.
        asked: u64,
        /// The group's leader epoch.
        current: u64,
    },
    /// Only a follower of the group enters its in-sync set.
    #[error("{follower} does not follow {slot}")]
    NotFollowing {
        /// The follower.
        follower: String,
        /// The slot.
        slot: String,
    },
    /// A forget of a primary whose slot a failover gave to another leader.
    #[error(
        "{name}'s slot is led by {leader} since a failover: {name} is its follower, not a lost \
         owner (stop it, or let it return and catch up)"
    )]
    FailedOver {
        /// The primary.
        name: String,
        /// The slot's leader.
        leader: String,
    },
    /// A change of the ring while a slot is led by another member than its primary: the
    /// slot's points are handed over by its primary, which no longer takes their writes.
    #[error(
        "{slot}'s slot is led by {leader} since a failover: hand it back first (goutube members \
         transfer {leader} --to {slot}), then change the ring"
    )]
    LedElsewhere {
        /// The slot.
        slot: String,
        /// Its leader.
        leader: String,
    },
    /// A fence names a slot the member does not lead.
    #[error("{member} does not lead {slot} (its leader is {leader})")]
    NotLeader {
        /// The member.
        member: String,
        /// The slot.
        slot: String,
        /// Its leader.
        leader: String,
    },
    /// A group whose leader's configuration does not allow an automatic failover.
    #[error("{slot} fails over only by an operator's decision: {why}")]
    ManualFailover {
        /// The slot.
        slot: String,
        /// Why.
        why: String,
    },
    /// The leader of a slot came back from an unclean stop: its in-sync set stays as it is until
    /// the controller names one of its members leader.
    #[error(
        "the leader of {0} came back from a stop that was not clean: its in-sync set is kept for \
         the controller to name one of its members leader"
    )]
    LeaderUnclean(String),
    /// Only a member of a slot's in-sync set may lead it: it holds every acknowledged byte.
    #[error("{candidate} is not in the in-sync set of {slot}: it may lack acknowledged bytes")]
    NotInSync {
        /// The slot.
        slot: String,
        /// The member named to lead it.
        candidate: String,
    },
    /// A follower of a slot that is no primary's, or a ring member asked to follow.
    #[error("{follower} cannot follow {slot}: {reason}")]
    BadFollow {
        /// The follower.
        follower: String,
        /// The slot.
        slot: String,
        /// Why not.
        reason: String,
    },
}
