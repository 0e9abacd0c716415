//! The gate: the one place that decides whether this node takes a write of a point, serves a
//! read of it, or sends the client elsewhere — and says where. The gRPC API, the HTTP gateway
//! and the balancer ask it; nobody else derives ownership.
//!
//! A write is admitted ([`Gate::admit_write`]) in this order:
//! 1. a follower takes no writes: its leader does ([`Refusal::Follower`]);
//! 2. a node that has not heard the controller since it started waits for it, up to a session
//!    ([`Refusal::NoSession`]): until then it holds the state it stopped with, in which it may
//!    still own what the cluster gave away meanwhile (it was forgotten, its group failed over);
//! 3. a member the cluster forgot owns nothing ([`Refusal::Forgotten`]);
//! 4. the point's own record decides first: handed over (`moved`) or still arriving
//!    (`incoming`) is refused naming the member that takes its writes; being copied or sealed
//!    is admitted with its handover (an append meets the fence under the point's lock and
//!    waits in [`Gate::append`]); committed here in a handover is writable whatever the ring
//!    says until the ring catches up;
//! 5. a point this node does not hold goes by the ring: its owner takes it
//!    ([`Refusal::NotOwner`], [`Refusal::OwnerDown`]); while the ring changes, a member creates
//!    no point that the change gives to another ([`Refusal::Changing`]); while a forgotten
//!    member's points are taken over, none of them is created afresh ([`Refusal::TakingOver`]).
//!
//! A read ([`Gate::admit_read`]) is served from a copy held here unless it is still arriving
//! (its old owner serves it until the handover ends); a point not held here is refused naming the
//! member that holds it ([`Gate::holder`]: the owner, or a live follower of an owner that is
//! down), so that every node is a door.
//!
//! Each refusal is a [`Refusal`], mapped to a gRPC status once, in `crate::error`; the owner it
//! names travels in the status metadata too.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::cluster::ring::Ring;
use crate::cluster::{Leader, Lifecycle, Member, Membership};
use crate::config::{Config, Failover, Role};
use crate::controller::{Lease, Topology, session};
use crate::metrics;
use crate::placement::{NextOwner, Placement, PlacementError};
use crate::point::{
    AppendError, Appended, ClientWrite, Handover, Point, PointId, ReadError, Store, Visibility,
};
use crate::text::bounded;

/// Why the gate sends a call elsewhere, or not at all.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    /// A write to a follower: its leader takes the writes.
    #[error(
        "node {node} is a follower and takes no writes; write to its leader {leader} at {address}"
    )]
    Follower {
        /// This node.
        node: String,
        /// Its leader.
        leader: String,
        /// Where that member's client API listens.
        address: String,
    },
    /// A write to a follower that has not reached its leader yet.
    #[error(
        "node {node} is a follower and takes no writes; it has not reached its leader \
         (replication address {leaders}) yet: write to the leader's client API"
    )]
    FollowerAlone {
        /// This node.
        node: String,
        /// The replication addresses of its leader.
        leaders: String,
    },
    /// This member was forgotten by the cluster.
    #[error("member {member} was forgotten by the cluster: it owns nothing and takes no writes")]
    Forgotten {
        /// This member.
        member: String,
    },
    /// Another member owns the point: write it there.
    #[error("point {point:?} belongs to member {owner} ({address}); write it there")]
    NotOwner {
        /// The point (bounded).
        point: String,
        /// The member that owns it.
        owner: String,
        /// Where that member's client API listens.
        address: String,
    },
    /// The owner of the point is down: its range waits for it (liveness never moves ownership).
    #[error(
        "point {point:?} belongs to member {owner}, which is down; writes to it wait until it is back (its followers serve reads)"
    )]
    OwnerDown {
        /// The point (bounded).
        point: String,
        /// The member that owns it.
        owner: String,
    },
    /// The member that takes the point's writes, a group's leader, is down, and its group fails
    /// over by itself: once its session expires the controller names an in-sync follower in
    /// its place (`docs/failover.md`).
    #[error(
        "{writes} are taken by member {leader} (leader epoch {epoch}), which is down; \
         its group fails over by itself and a new leader takes the writes once the controller \
         finds its session expired: retry in {} ms (with expected_offset a retry never writes \
         twice)",
        retry_after.as_millis()
    )]
    Electing {
        /// Whose writes: a point's, or a slot's.
        writes: String,
        /// The group's last leader.
        leader: String,
        /// The epoch that made it the leader.
        epoch: u64,
        /// When to retry.
        retry_after: Duration,
    },
    /// A read of a point this node does not hold: the member that holds it serves it.
    #[error(
        "point {point:?} is not on this node; member {holder} ({address}) holds it: read it there"
    )]
    HeldElsewhere {
        /// The point (bounded).
        point: String,
        /// The member that holds it.
        holder: String,
        /// Where that member's client API listens.
        address: String,
    },
    /// The ring is changing and the change gives the (new) point to another member.
    #[error("{change}: point {point} will be created by {owner} once the ring has changed; retry")]
    Changing {
        /// The change under way.
        change: String,
        /// The point (bounded).
        point: String,
        /// The member that owns it.
        owner: String,
    },
    /// The point belonged to a forgotten member whose points are being taken over.
    #[error(
        "point {point} belonged to member {forgotten}, which was forgotten: it is being taken \
         over from its followers' copies; retry"
    )]
    TakingOver {
        /// The point (bounded).
        point: String,
        /// The forgotten member.
        forgotten: String,
    },
    /// A write met the handover's fence and the switch took longer than allowed.
    #[error(
        "point {point} {handover}, which took longer than reshard.fence_timeout_ms ({waited_ms} ms); \
         retry (with expected_offset a retry never writes twice)"
    )]
    Fenced {
        /// The point (bounded).
        point: String,
        /// Where its handover stands.
        handover: String,
        /// How long the write waited.
        waited_ms: u128,
    },
    /// Not held here, but copies of it are kept in quarantine (`docs/resharding.md`).
    #[error(
        "point {point:?} is not served here; copies only this member held when it stepped down are kept in quarantine (delete them by hand once dealt with): {copies}"
    )]
    Quarantined {
        /// The point (bounded).
        point: String,
        /// The copies kept, each with its epoch, size and directory.
        copies: String,
    },
    /// This group leader holds no session with the controller: it may be fenced and replaced
    /// now, so it takes no writes (`docs/failover.md`).
    #[error(
        "node {node} {session}: it takes no writes, so that a failover cannot leave two \
         writers; retry in {} ms (with expected_offset a retry never writes twice)",
        retry_after.as_millis()
    )]
    NoSession {
        /// This node.
        node: String,
        /// Since when, in words.
        session: String,
        /// When to retry.
        retry_after: Duration,
    },
    /// This group leader came back from a stop that was not clean while members of its
    /// in-sync set held every acknowledged byte: the controller names one of them leader, since
    /// a tail this node lost on disk may have held some (`docs/failover.md`).
    #[error(
        "node {node} came back from a stop that was not clean: the controller names a member of \
         the in-sync set of {slot} (leader epoch {epoch}) leader, which takes the writes; retry \
         in {} ms (with expected_offset a retry never writes twice)",
        retry_after.as_millis()
    )]
    SteppingDown {
        /// This node.
        node: String,
        /// The slot it leads.
        slot: String,
        /// The epoch it leads the slot at.
        epoch: u64,
        /// When to retry.
        retry_after: Duration,
    },
    /// The node is shutting down.
    #[error("the node is shutting down")]
    ShuttingDown,
    /// Nobody can say who owns the point.
    #[error(transparent)]
    Placement(#[from] PlacementError),
}

impl Refusal {
    /// Whether the client should retry here later (`Unavailable`) rather than go elsewhere or
    /// give up (`FailedPrecondition`, `NotFound`).
    pub fn code(&self) -> tonic::Code {
        use tonic::Code;
        match self {
            Refusal::Follower { .. }
            | Refusal::Forgotten { .. }
            | Refusal::NotOwner { .. }
            | Refusal::HeldElsewhere { .. } => Code::FailedPrecondition,
            Refusal::FollowerAlone { .. }
            | Refusal::OwnerDown { .. }
            | Refusal::Electing { .. }
            | Refusal::Changing { .. }
            | Refusal::TakingOver { .. }
            | Refusal::Fenced { .. }
            | Refusal::NoSession { .. }
            | Refusal::SteppingDown { .. }
            | Refusal::ShuttingDown
            | Refusal::Placement(_) => Code::Unavailable,
            Refusal::Quarantined { .. } => Code::NotFound,
        }
    }

    /// The member to ask instead, and its client API address when it is live.
    pub fn redirect(&self) -> Option<Redirect<'_>> {
        match self {
            Refusal::NotOwner { owner, address, .. }
            | Refusal::HeldElsewhere {
                holder: owner,
                address,
                ..
            }
            | Refusal::Follower {
                leader: owner,
                address,
                ..
            } => Some(Redirect {
                member: owner,
                address: Some(address),
            }),
            Refusal::OwnerDown { owner, .. } | Refusal::Electing { leader: owner, .. } => {
                Some(Redirect {
                    member: owner,
                    address: None,
                })
            }
            _ => None,
        }
    }

    /// How long the client should wait before it retries, when the refusal says.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Refusal::Electing { retry_after, .. }
            | Refusal::NoSession { retry_after, .. }
            | Refusal::SteppingDown { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }

    /// The leader epoch of the group the refusal is about, when it names one.
    pub fn leader_epoch(&self) -> Option<u64> {
        match self {
            Refusal::Electing { epoch, .. } | Refusal::SteppingDown { epoch, .. } => Some(*epoch),
            _ => None,
        }
    }
}

/// The member a refusal sends the caller to (the client reads it back as
/// `client::Redirect`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Redirect<'a> {
    /// Its node name.
    pub member: &'a str,
    /// Its client API address, when it is live.
    pub address: Option<&'a str>,
}

/// A share of the writes ([`Gate::write_share`]), held while one append or delete writes.
pub struct WriteShare<'a> {
    _guard: tokio::sync::RwLockReadGuard<'a, ()>,
    /// The leader epoch this node takes its group's writes at (0: none known), from the state
    /// that admitted the write: the store records it in the point (`point::LeaderEpochs`).
    pub leader_epoch: u64,
}

/// Why a write through the gate failed: refused, or failed in the store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WriteError {
    /// The gate sent the write elsewhere, or not at all.
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// The store did not take it.
    #[error(transparent)]
    Append(#[from] AppendError),
    /// Reading the point's record failed.
    #[error(transparent)]
    Read(#[from] ReadError),
}

/// Who holds a point this node does not, for a read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Holder {
    /// This node is its owner: the point does not exist.
    Nobody,
    /// A live member that holds it: the owner, or a live follower of an owner that is down.
    Member(Box<Member>),
    /// Its owner is down and no live follower of it is known.
    Down(String),
}

/// What a node that has had no session since it started says of it ([`Refusal::NoSession`]).
const NEVER_GRANTED: &str =
    "has had no session with the controller since it started (no heartbeat answered yet)";

/// The gate of one node.
pub struct Gate {
    node: String,
    role: Role,
    leader_addresses: Vec<String>,
    fence: Duration,
    store: Store,
    placement: Arc<Placement>,
    /// For a follower: the leader it follows, once known.
    leader: watch::Receiver<Option<Leader>>,
    /// Whether this node's group fails over by itself; if so, it writes only while `lease`
    /// holds.
    failover: Failover,
    lease: Arc<Lease>,
    /// The controller's committed state: who leads each group (a failover names a follower).
    topology: watch::Receiver<Arc<Topology>>,
    /// What a write refused until the controller's state changes is told to wait.
    retry_after: Duration,
    /// How long a write waits for this node's first session after a start (`session_ms`).
    session: Duration,
    /// Each append and delete holds a share while it writes; a transfer of leadership holds it
    /// whole ([`Gate::hold_writes`]), so that nothing is written while it checks that the new
    /// leader holds every byte. Tokio's lock is fair: a write that asks for a share while a
    /// transfer waits for the lock queues behind it.
    writing: tokio::sync::RwLock<()>,
}

impl Gate {
    /// The gate of the node `config` describes, over its `store`, asking `placement`; a
    /// follower names its leader from `leader`; `lease` is its session with the controller.
    pub fn new(
        config: &Config,
        store: Store,
        placement: Arc<Placement>,
        leader: watch::Receiver<Option<Leader>>,
        (lease, topology): (Arc<Lease>, watch::Receiver<Arc<Topology>>),
    ) -> Self {
        Self {
            node: config.node_name.clone(),
            role: config.role,
            leader_addresses: config.leader_addresses.clone(),
            fence: Duration::from_millis(config.reshard.fence_timeout_ms),
            store,
            placement,
            leader,
            failover: config.failover(),
            lease,
            topology,
            retry_after: session::retry_delay(config.controller.session_ms),
            session: Duration::from_millis(config.controller.session_ms),
            writing: tokio::sync::RwLock::new(()),
        }
    }

    /// Holds every append and delete back, once those in flight have finished, until the
    /// guard is dropped; writes met meanwhile wait (a transfer of leadership: the caller sees a
    /// pause, not an error). Each one then checks whether this node still takes its writes.
    pub async fn hold_writes(&self) -> tokio::sync::RwLockWriteGuard<'_, ()> {
        self.writing.write().await
    }

    /// A share of the writes, once no transfer holds them back: an append or a delete holds it
    /// while it writes. Refused if this node no longer takes `point`'s writes by then.
    pub async fn write_share(
        &self,
        point: &PointId,
        abort: &CancellationToken,
    ) -> Result<WriteShare<'_>, Refusal> {
        let guard = tokio::select! {
            share = self.writing.read() => share,
            () = abort.cancelled() => return Err(Refusal::ShuttingDown),
        };
        let leader_epoch = self.check_still_writer(point)?;
        Ok(WriteShare {
            _guard: guard,
            leader_epoch,
        })
    }

    /// Refuses an append once this node no longer takes the writes it was admitted for: a
    /// follower no longer named leader, or a primary whose own slot the controller gave to
    /// another member (a transfer, a fence). Checked before every append, so that a stream
    /// admitted before stops at its next batch. Else, the leader epoch of the group this node
    /// leads (0: none), from the same state.
    fn check_still_writer(&self, point: &PointId) -> Result<u64, Refusal> {
        self.check_writable()?;
        let topology = self.topology.borrow();
        match topology.groups.get(&self.node) {
            Some(group) if group.leader != self.node => Err(not_the_writer(
                &self.placement.membership(),
                &topology,
                point.as_str(),
                &self.node,
                self.retry_after,
            )),
            _ => Ok(topology
                .led_by(&self.node)
                .next()
                .map_or(0, |(_, group)| group.leader_epoch)),
        }
    }

    /// Whether this node leads a group that is not its own slot: a follower the controller
    /// named leader after a failover.
    fn leads_as_follower(&self) -> bool {
        self.topology.borrow().led_in_place_of(&self.node).is_some()
    }

    /// Refuses a write while this node, leading a group that fails over by itself, holds no
    /// session with the controller, or leads a group it may have lost acknowledged bytes of
    /// (`Group::leader_unclean`). Checked when a write is admitted and again before it is
    /// acknowledged.
    pub fn check_session(&self) -> Result<(), Refusal> {
        if let Some((slot, group)) = self
            .topology
            .borrow()
            .led_by(&self.node)
            .find(|(_, group)| group.leader_unclean)
        {
            return Err(Refusal::SteppingDown {
                node: self.node.clone(),
                slot: slot.to_owned(),
                epoch: group.leader_epoch,
                retry_after: self.retry_after,
            });
        }
        let now = std::time::Instant::now();
        let automatic = !matches!(self.failover, Failover::Manual(_)) || self.leads_as_follower();
        if !automatic || self.lease.holds(now) {
            return Ok(());
        }
        ::metrics::counter!(metrics::SELF_FENCED).increment(1);
        let session = match self.lease.lapsed_for(now) {
            Some(lapsed) => format!(
                "lost its session with the controller {} ms ago (no heartbeat answered; \
                 controller.session_ms)",
                lapsed.as_millis()
            ),
            None => NEVER_GRANTED.to_owned(),
        };
        Err(Refusal::NoSession {
            node: self.node.clone(),
            session,
            retry_after: self.retry_after,
        })
    }

    /// Waits, up to a session, until this node has heard the controller since it started: its
    /// first session is granted only once its view of the committed state holds every decision
    /// the granter had applied. Whatever its group's failover: a member restarted holds the
    /// rings it stopped with (its own Raft node replays its log from where it stopped), in which
    /// it may still own ranges the cluster forgot it for, or lead a group that failed over.
    async fn heard_controller(&self) -> Result<(), Refusal> {
        if self.lease.granted_once() {
            return Ok(());
        }
        match tokio::time::timeout(self.session, self.lease.first_granted()).await {
            Ok(()) => Ok(()),
            Err(_) => Err(Refusal::NoSession {
                node: self.node.clone(),
                session: NEVER_GRANTED.to_owned(),
                retry_after: self.retry_after,
            }),
        }
    }

    /// Refuses every write on a follower (unless the controller named it a group's leader),
    /// naming its leader's client API.
    pub fn check_writable(&self) -> Result<(), Refusal> {
        if self.role != Role::Follower || self.leads_as_follower() {
            return Ok(());
        }
        // The leader the controller names for the group this node follows (a failover or a
        // transfer may have named another since its last session), else the one it follows;
        // while the group elects a new leader, say so rather than name the one that is gone.
        let named = {
            let topology = self.topology.borrow();
            match topology.followed_by(&self.node) {
                Some((slot, group)) => {
                    let membership = self.placement.membership();
                    let writes = format!("the writes of the points of {slot}");
                    if let Some(electing) =
                        electing(&membership, &topology, writes, slot, self.retry_after)
                    {
                        return Err(electing);
                    }
                    membership.live(&group.leader).map(|member| Leader {
                        name: group.leader.clone(),
                        rpc_addr: member.rpc_addr.clone(),
                    })
                }
                None => None,
            }
        };
        let node = self.node.clone();
        let leader = named.or_else(|| self.leader.borrow().clone());
        match leader.filter(|leader| !leader.rpc_addr.is_empty()) {
            Some(leader) => Err(Refusal::Follower {
                node,
                leader: leader.name,
                address: leader.rpc_addr,
            }),
            None => Err(Refusal::FollowerAlone {
                node,
                leaders: self.leader_addresses.join(", "),
            }),
        }
    }

    /// `Ok` if this node takes writes for `point`, with the handover it is part of, if any
    /// (its copy being copied or fenced: a write waits at the fence in [`Self::append`]).
    pub async fn admit_write(&self, point: &PointId) -> Result<Option<Handover>, WriteError> {
        let admitted = self.admit_write_here(point).await?;
        // Only a write this node would take waits for its session: one it sends elsewhere
        // says where at once.
        self.check_session()?;
        Ok(admitted)
    }

    /// [`Gate::admit_write`] but for the session.
    async fn admit_write_here(&self, point: &PointId) -> Result<Option<Handover>, WriteError> {
        self.check_writable()?;
        self.heard_controller().await?;
        // By the ring this node's membership holds, or by the one the controller committed:
        // a member restarted after it was forgotten may hold the older one for a moment.
        let forgotten = |ring: &Ring| {
            let record = ring.members.get(&self.node);
            record.is_some_and(|record| record.lifecycle == Lifecycle::Forgotten)
        };
        if forgotten(&self.placement.membership().ring) || forgotten(&self.topology.borrow().ring) {
            return Err(Refusal::Forgotten {
                member: self.node.clone(),
            }
            .into());
        }
        let ownership = match self.store.ownership(point).await {
            Ok(ownership) => ownership,
            Err(ReadError::NotFound(_)) => {
                return Ok(self.admit_new(point).await.map(|()| None)?);
            }
            Err(error) => return Err(error.into()),
        };
        match ownership.handover {
            Some(handover @ (Handover::Moved { .. } | Handover::Incoming { .. })) => Err(refusal(
                &self.placement.membership(),
                point.as_str(),
                handover.peer(),
            )
            .into()),
            Some(handover) => Ok(Some(handover)),
            None if ownership.owner.as_deref() == Some(&self.node) => {
                Ok(self.check_writer(point, &self.node).map(|()| None)?)
            }
            None => Ok(self.check_owner(point).await.map(|()| None)?),
        }
    }

    /// A point this node does not hold yet: the ring decides, and while it changes (or a
    /// forgotten member's points are taken over), the ring it is changing to.
    ///
    /// While the ring changes, a member creates no point that is not its own in the ring the
    /// change leads to: it would have to hand it over too, and one created after its last move
    /// would be left behind (or created twice, by the joining member). The client retries;
    /// once the change is made, the ring names the point's owner.
    async fn admit_new(&self, point: &PointId) -> Result<(), Refusal> {
        self.check_owner(point).await?;
        if let Some(NextOwner { change, owner }) =
            self.placement.pending_owner(point.as_str()).await?
            && owner != self.node
        {
            return Err(Refusal::Changing {
                change: change.to_string(),
                point: point.to_string(),
                owner,
            });
        }
        if let Some(forgotten) = self.placement.being_taken_over(point.as_str()).await? {
            return Err(Refusal::TakingOver {
                point: point.to_string(),
                forgotten,
            });
        }
        Ok(())
    }

    /// `Ok` if this node takes the writes of `point`: the owner of its range in the ring, or
    /// the leader the controller named for that owner's group; otherwise the refusal that names
    /// the member that does.
    pub async fn check_owner(&self, point: &PointId) -> Result<(), Refusal> {
        let owners = self.placement.owners(point.as_str(), 1).await?;
        self.check_writer(point, owners.first())
    }

    /// `Ok` if this node takes the writes of `slot` (a primary's range), for `point`.
    fn check_writer(&self, point: &PointId, slot: &str) -> Result<(), Refusal> {
        let topology = self.topology.borrow();
        if topology.writer(slot) == self.node {
            return Ok(());
        }
        Err(not_the_writer(
            &self.placement.membership(),
            &topology,
            point.as_str(),
            slot,
            self.retry_after,
        ))
    }

    /// Appends `batch` to `point` (at `expected_offset`, if given), served to consumers as
    /// `visibility` says. A write that meets a fence (the point being handed to a new owner)
    /// waits for the switch, up to `reshard.fence_timeout_ms`, and then goes wherever the
    /// point's record says; a point handed over, or still arriving, is refused naming the
    /// member that takes its writes.
    pub async fn append(
        &self,
        point: &PointId,
        (expected_offset, visibility): (Option<u64>, Visibility),
        batch: Vec<Bytes>,
        abort: &CancellationToken,
    ) -> Result<Vec<Appended>, WriteError> {
        let mut deadline = None;
        loop {
            let changed = self.store.ownership_changed();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let share = self.write_share(point, abort).await?;
            let write = ClientWrite {
                expected_start: expected_offset,
                visibility,
                leader_epoch: share.leader_epoch,
            };
            let appended = self.store.write(point, batch.clone(), write).await;
            drop(share);
            let handover = match appended {
                Err(AppendError::Handover { handover, .. }) => handover,
                other => return Ok(other?),
            };
            if !matches!(handover, Handover::Sealed { .. }) {
                return Err(refusal(
                    &self.placement.membership(),
                    point.as_str(),
                    handover.peer(),
                )
                .into());
            }
            let deadline = *deadline.get_or_insert_with(|| Instant::now() + self.fence);
            tokio::select! {
                () = changed => {}
                () = tokio::time::sleep_until(deadline) => {
                    ::metrics::counter!(metrics::FENCE_TIMEOUTS).increment(1);
                    return Err(Refusal::Fenced {
                        point: point.to_string(),
                        handover: handover.to_string(),
                        waited_ms: self.fence.as_millis(),
                    }
                    .into());
                }
                () = abort.cancelled() => return Err(Refusal::ShuttingDown.into()),
            }
        }
    }

    /// `point`, to be read by a client: a copy still arriving in a handover is not served (the
    /// refusal names the member it arrives from, which serves it until the handover ends); a
    /// point not held here is refused naming the member that holds it.
    pub async fn admit_read(&self, point: &PointId) -> Result<Arc<Point>, ReadRefusal> {
        let found = match self.store.point(point).await {
            Err(ReadError::NotFound(_)) => return Err(self.not_held_here(point).await),
            found => found?,
        };
        if !found.snapshot().arriving {
            return Ok(found);
        }
        match self.store.ownership(point).await?.handover {
            Some(Handover::Incoming { from, .. }) => {
                Err(refusal(&self.placement.membership(), point.as_str(), &from).into())
            }
            // Committed meanwhile.
            _ => Ok(found),
        }
    }

    /// The refusal of a read of a point this node does not hold: the copies of it kept in
    /// quarantine here, if any (`docs/resharding.md`: a forgotten member stepping down); else
    /// the member that holds it; else `NotFound`.
    async fn not_held_here(&self, point: &PointId) -> ReadRefusal {
        let quarantined = self.store.quarantined(point);
        if !quarantined.is_empty() {
            let copies: Vec<String> = quarantined
                .iter()
                .map(|copy| {
                    let tail = match copy.from {
                        0 => String::new(),
                        from => format!(", a tail from byte {from}"),
                    };
                    format!(
                        "epoch {}{tail}: {} bytes in {}",
                        copy.epoch,
                        copy.size,
                        copy.dir.display()
                    )
                })
                .collect();
            return Refusal::Quarantined {
                point: point.to_string(),
                copies: copies.join("; "),
            }
            .into();
        }
        match self.holder(point.as_str()).await {
            Holder::Member(member) => Refusal::HeldElsewhere {
                point: bounded(point.as_str()),
                holder: member.name,
                address: member.rpc_addr,
            }
            .into(),
            Holder::Down(owner) => Refusal::OwnerDown {
                point: bounded(point.as_str()),
                owner,
            }
            .into(),
            Holder::Nobody => ReadError::NotFound(point.clone()).into(),
        }
    }

    /// Who holds `point` for a read, when this node does not: its owner on the ring if it is
    /// live; for an owner that is down, one of its live followers (not this node, which does
    /// not have the point). Without a ring, [`Holder::Nobody`].
    pub async fn holder(&self, point: &str) -> Holder {
        let Ok(owners) = self.placement.owners(point, 1).await else {
            return Holder::Nobody;
        };
        // After a failover, the leader the controller named for the owner's group.
        let writer = self.topology.borrow().writer(owners.first()).to_owned();
        if writer != owners.first()
            && writer != self.node
            && let Some(live) = owners.membership.live(&writer)
        {
            return Holder::Member(Box::new(live.clone()));
        }
        holder_in(&owners.membership, owners.first())
    }
}

/// Who holds `point` for a read, by `placement` ([`Gate::holder`]; a balancer, which holds
/// nothing and has no gate, asks this).
pub async fn holder(placement: &Placement, point: &str) -> Holder {
    let Ok(owners) = placement.owners(point, 1).await else {
        return Holder::Nobody;
    };
    holder_in(&owners.membership, owners.first())
}

/// [`holder`], given the owner.
fn holder_in(membership: &Membership, owner: &str) -> Holder {
    let local = &membership.local;
    if owner == local {
        return Holder::Nobody;
    }
    if let Some(live) = membership.live(owner) {
        return Holder::Member(Box::new(live.clone()));
    }
    let follower = membership
        .view
        .members
        .values()
        .find(|follower| follower.leader.as_deref() == Some(owner) && follower.name != *local);
    let follows_owner = membership
        .live(local)
        .is_some_and(|me| me.leader.as_deref() == Some(owner));
    match follower {
        Some(follower) => Holder::Member(Box::new(follower.clone())),
        None if follows_owner => Holder::Nobody,
        None => Holder::Down(owner.to_owned()),
    }
}

/// Why a read through the gate failed: refused, or failed in the store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReadRefusal {
    /// The gate sent the read elsewhere, or not at all.
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// Reading the point failed.
    #[error(transparent)]
    Read(#[from] ReadError),
}

/// Why a node that does not take the writes of `slot` (a primary's range) refuses a write of
/// `point`: the slot's writer takes them (here is its address); or, with the writer down, its
/// group elects a new leader ([`electing`]) or waits for it ([`Refusal::OwnerDown`]).
pub fn not_the_writer(
    membership: &Membership,
    topology: &Topology,
    point: &str,
    slot: &str,
    retry_after: Duration,
) -> Refusal {
    let writes = format!("the writes of point {:?}", bounded(point));
    electing(membership, topology, writes, slot, retry_after)
        .unwrap_or_else(|| refusal(membership, point, topology.writer(slot)))
}

/// [`Refusal::Electing`] if the leader of `slot`'s group is down, the group fails over by
/// itself and a member of its in-sync set is live: the controller names one in its place once
/// the leader's session expires. (With none live, the group waits for its leader:
/// [`Refusal::OwnerDown`].)
fn electing(
    membership: &Membership,
    topology: &Topology,
    writes: String,
    slot: &str,
    retry_after: Duration,
) -> Option<Refusal> {
    let group = topology.groups.get(slot)?;
    let successor = group.successor(|m| membership.live(m).is_some());
    let leader_down = membership.live(&group.leader).is_none();
    (leader_down && successor.is_some()).then(|| Refusal::Electing {
        writes,
        leader: group.leader.clone(),
        epoch: group.leader_epoch,
        retry_after,
    })
}

/// A write to `point`, which `owner` takes: its address, or that it is down.
pub fn refusal(membership: &Membership, point: &str, owner: &str) -> Refusal {
    match membership.live(owner) {
        Some(member) => Refusal::NotOwner {
            point: bounded(point),
            owner: owner.to_owned(),
            address: member.rpc_addr.clone(),
        },
        None => Refusal::OwnerDown {
            point: bounded(point),
            owner: owner.to_owned(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::View;
    use crate::controller::Group;

    fn live(names: &[&str]) -> Membership {
        let member = Member::follower_for_tests;
        Membership {
            local: "b".into(),
            view: View {
                id: "view".into(),
                members: names.iter().map(|n| (n.to_string(), member(n))).collect(),
            },
            ring: Default::default(),
            ring_version: 0,
            conflict: None,
        }
    }

    fn topology(failover: Failover) -> Topology {
        let group = Group {
            leader: "a".into(),
            leader_epoch: 9,
            followers: ["f1".into(), "f2".into()].into(),
            in_sync: ["f1".into()].into(),
            failover,
            leader_unclean: false,
        };
        Topology {
            groups: [("a".to_owned(), group)].into(),
            ..Default::default()
        }
    }

    /// What a node that does not take the writes of slot `a` answers, by who is live.
    #[test]
    fn a_write_to_a_group_that_lost_its_leader_is_told_whether_an_election_will_end_it() {
        let automatic = topology(Failover::Automatic { replicas: 1 });
        let manual = topology(Failover::Manual("ack = \"local\"".into()));
        let after = Duration::from_millis(500);
        let refused = |membership: &Membership, topology: &Topology| {
            not_the_writer(membership, topology, "p", "a", after)
        };
        // The leader is live: go there.
        let answer = refused(&live(&["a", "b", "f1"]), &automatic);
        assert!(matches!(answer, Refusal::NotOwner { ref owner, .. } if owner == "a"));
        // Down, with a live in-sync follower: an election, with when to retry.
        let answer = refused(&live(&["b", "f1", "f2"]), &automatic);
        assert!(
            matches!(answer, Refusal::Electing { ref leader, epoch: 9, .. } if leader == "a"),
            "{answer:?}"
        );
        assert_eq!(answer.code(), tonic::Code::Unavailable);
        assert_eq!(answer.retry_after(), Some(after));
        // Down, and only a follower outside the in-sync set live: nobody can be named.
        let answer = refused(&live(&["b", "f2"]), &automatic);
        assert!(matches!(answer, Refusal::OwnerDown { .. }), "{answer:?}");
        assert_eq!(answer.retry_after(), None);
        // A group that an operator fails over waits for its leader.
        let answer = refused(&live(&["b", "f1", "f2"]), &manual);
        assert!(matches!(answer, Refusal::OwnerDown { .. }), "{answer:?}");
    }
}
