//! What the handlers of one node share: the store, the access door, ownership, replication
//! progress, and the checks and waits that several handlers make.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::access::{Access, Action};
use crate::cluster::{Leader, Lifecycle, Steps};
use crate::config::{Ack, Config, Role};
use crate::error::Error;
use crate::net::PeerInfo;
use crate::proto::{ON_BEHALF_OF, PURPOSE};
use crate::placement::Placement;
use crate::point::{Handover, Point, PointId, ReadError, Store};
use crate::replication::{Progress, Replica};
use crate::reshard::Change;
use crate::signed_url::UrlSigner;

pub struct Context {
    pub config: Arc<Config>,
    pub store: Store,
    /// The address clients reach this node's API at.
    pub rpc_addr: SocketAddr,
    /// Cancelled when shutdown starts: stop accepting, end `follow` streams.
    pub shutdown: CancellationToken,
    /// Cancelled when the grace period is over: end every remaining stream.
    pub abort: CancellationToken,
    pub access: Arc<Access>,
    pub placement: Arc<Placement>,
    /// What followers confirmed (empty unless this node is a leader).
    pub progress: Arc<Progress>,
    /// Signs the URLs of the HTTP gateway (`SignUrl`).
    pub signer: Arc<UrlSigner>,
    /// This member's lifecycle steps (`DrainMember`).
    pub steps: Steps,
    /// For a follower: the leader it follows, once known (refused writes name it).
    pub leader: watch::Receiver<Option<Leader>>,
}

impl Context {
    /// Who a call is for: the connection's subject, or the subject a balancer member forwards
    /// it for.
    pub fn caller<T>(&self, request: &tonic::Request<T>) -> PeerInfo {
        let peer = PeerInfo::of(request);
        let Some(forwarded) = request
            .metadata()
            .get_bin(ON_BEHALF_OF)
            .and_then(|value| value.to_bytes().ok())
            .and_then(|bytes| String::from_utf8(bytes.to_vec()).ok())
        else {
            return peer;
        };
        if !self.is_balancer_connection(&peer) {
            return peer;
        }
        PeerInfo {
            addr: peer.addr,
            subject: forwarded.into(),
        }
    }

    /// What a `GetMetadata` is authorized as: `metadata`, or `consume` when a balancer reads it
    /// to route a client's consume.
    pub fn metadata_action<T>(&self, request: &tonic::Request<T>) -> Action {
        let for_consume = request
            .metadata()
            .get(PURPOSE)
            .is_some_and(|value| value == "consume");
        if for_consume && self.is_balancer_connection(&PeerInfo::of(request)) {
            Action::Consume
        } else {
            Action::Metadata
        }
    }

    /// Whether the connection's certificate names a live balancer member.
    fn is_balancer_connection(&self, peer: &PeerInfo) -> bool {
        peer.subject
            .strip_prefix(crate::certs::NODE_PREFIX)
            .and_then(|name| {
                self.placement
                    .membership()
                    .live(name)
                    .map(|member| member.role.is_balancer())
            })
            .unwrap_or(false)
    }

    /// An operator call about member `node` (drain, cleanup) is made on that node itself: a
    /// check against changing the wrong one.
    pub fn check_addressed(&self, node: &str) -> Result<(), Error> {
        let local = &self.config.node_name;
        if node == local {
            return Ok(());
        }
        Err(Error::FailedPrecondition(format!(
            "this is node {local}, not {}: ask that node itself",
            crate::error::bounded(node)
        )))
    }

    /// Refuses writes on followers, naming their leader's client API (in the status metadata
    /// too, so clients go there by themselves).
    pub fn check_writable(&self) -> Result<(), Error> {
        if self.config.role != Role::Follower {
            return Ok(());
        }
        let node = self.config.node_name.clone();
        let leader = self.leader.borrow().clone();
        match leader.filter(|leader| !leader.rpc_addr.is_empty()) {
            Some(leader) => Err(Error::Follower {
                node,
                leader: leader.name,
                address: leader.rpc_addr,
            }),
            None => Err(Error::Unavailable(format!(
                "node {node} is a follower and takes no writes; it has not reached its leader \
                 (replication address {}) yet: write to the leader's client API",
                self.config.leader_addresses.join(", ")
            ))),
        }
    }

    /// `Ok` if this node takes writes for `point`, with the handover it is part of, if any
    /// (its copy being copied or fenced: a write waits at the fence in its append). The point's
    /// own record decides first: handed over or still arriving is refused naming the member
    /// that takes its writes; committed here in a handover is writable whatever the ring says
    /// until the ring catches up. Otherwise the ring decides. Each append checks the record
    /// again, under the point's lock.
    pub async fn check_owner(&self, point: &PointId) -> Result<Option<Handover>, Error> {
        let local = &self.config.node_name;
        if self
            .placement
            .membership()
            .ring
            .members
            .get(local)
            .is_some_and(|record| record.lifecycle == Lifecycle::Forgotten)
        {
            return Err(Error::FailedPrecondition(format!(
                "member {local} was forgotten by the cluster: it owns nothing and takes no writes"
            )));
        }
        let ownership = match self.store.ownership(point).await {
            Ok(ownership) => ownership,
            Err(ReadError::NotFound(_)) => {
                self.placement.check_local(point).await?;
                self.check_not_moving(point).await?;
                if let Some(forgotten) = self.placement.being_taken_over(point).await? {
                    return Err(Error::Unavailable(format!(
                        "point {point} belonged to member {forgotten}, which was forgotten: it is \
                         being taken over from its followers' copies; retry"
                    )));
                }
                return Ok(None);
            }
            Err(error) => return Err(error.into()),
        };
        match ownership.handover {
            Some(handover @ (Handover::Moved { .. } | Handover::Incoming { .. })) => {
                Err(self.placement.refuse(point, handover.peer()))
            }
            Some(handover) => Ok(Some(handover)),
            None if ownership.owner.as_deref() == Some(&self.config.node_name) => Ok(None),
            None => self.placement.check_local(point).await.map(|()| None),
        }
    }

    /// While the ring changes, a member creates no point that is not its own in the ring the
    /// change leads to: it would have to hand it over too, and one created after its last move
    /// would be left behind (or created twice, by the joining member). The client retries;
    /// once the change is made, the ring names the point's owner.
    async fn check_not_moving(&self, point: &PointId) -> Result<(), Error> {
        let Some((change, owner)) = self.placement.pending_owner(point).await? else {
            return Ok(());
        };
        if owner == self.config.node_name {
            return Ok(());
        }
        let change = match change {
            Change::Drain(member) => format!("member {member} is draining"),
            Change::Join(member) => format!("member {member} is joining"),
        };
        Err(Error::Unavailable(format!(
            "{change}: point {point} will be created by {owner} once the ring has changed; retry"
        )))
    }

    /// The refusal of a read of a point this node does not hold: the member that holds it (its
    /// owner on the ring), so that every node is a door; the copies of it kept in quarantine
    /// here, if any (`docs/resharding.md`: a forgotten member stepping down); else `NotFound`
    /// (this node is its owner: the point does not exist).
    pub async fn not_held_here(&self, point: &PointId) -> Error {
        let quarantined = self.store.quarantined(point);
        if !quarantined.is_empty() {
            let copies: Vec<String> = quarantined
                .iter()
                .map(|(epoch, size, dir)| {
                    format!("epoch {epoch}: {size} bytes in {}", dir.display())
                })
                .collect();
            return Error::Quarantined {
                point: point.to_string(),
                copies: copies.join("; "),
            };
        }
        let not_found = Error::Read(ReadError::NotFound(point.clone()));
        let Ok((membership, owners)) = self.placement.owners(point.as_str(), 1).await else {
            return not_found;
        };
        let holder = &owners[0];
        let local = &membership.local;
        if holder == local {
            return not_found;
        }
        let there = |member: &crate::cluster::Member| Error::HeldElsewhere {
            point: crate::error::bounded(point.as_str()),
            holder: member.name.clone(),
            address: member.rpc_addr.clone(),
        };
        if let Some(live) = membership.live(holder) {
            return there(live);
        }
        // A holder that is down is read from one of its followers (not this one, which does not
        // have the point).
        let follower = membership.view.members.values().find(|follower| {
            follower.leader.as_deref() == Some(holder.as_str()) && follower.name != *local
        });
        let follows_holder = membership
            .live(local)
            .is_some_and(|me| me.leader.as_deref() == Some(holder.as_str()));
        match follower {
            Some(follower) => there(follower),
            None if follows_holder => not_found,
            None => self.placement.refuse(point, holder),
        }
    }

    /// `point`, to be read by a client: a copy still arriving in a handover is not served;
    /// the refusal names the member it arrives from, which serves it until the handover ends.
    /// A point not held here is refused naming the member that holds it ([`Self::not_held_here`]).
    pub async fn readable(&self, point: &PointId) -> Result<Arc<Point>, Error> {
        let found = match self.store.point(point).await {
            Err(ReadError::NotFound(_)) => return Err(self.not_held_here(point).await),
            found => found?,
        };
        if !found.snapshot().arriving {
            return Ok(found);
        }
        match self.store.ownership(point).await?.handover {
            Some(Handover::Incoming { from, .. }) => Err(self.placement.refuse(point, &from)),
            // Committed meanwhile.
            _ => Ok(found),
        }
    }

    /// The nodes a client may read `point` (of `size` bytes) from in parallel: this node, and on
    /// a leader `multi_stream_percent` of the connected followers that hold all of it.
    pub fn workers(&self, point: &PointId, size: u64) -> Vec<String> {
        let mut workers = vec![self.rpc_addr.to_string()];
        let complete: Vec<String> = self
            .progress
            .replicas(point)
            .into_iter()
            .filter(|replica| replica.connected && replica.end >= size)
            .map(|replica| replica.rpc_address)
            .collect();
        let take = (complete.len() * usize::from(self.config.multi_stream_percent)).div_ceil(100);
        workers.extend(complete.into_iter().take(take));
        workers
    }

    /// How far each follower confirmed `point`.
    pub fn replicas(&self, point: &PointId) -> Vec<Replica> {
        self.progress.replicas(point)
    }

    /// With `ack = { replicas = N }`, waits until N followers confirmed every `(point, end)`.
    pub async fn wait_for_replicas(&self, written: &[(PointId, u64)]) -> Result<(), Error> {
        let Ack::Replicas(replicas) = self.config.replication.ack else {
            return Ok(());
        };
        let timeout = Duration::from_millis(self.config.replication.ack_timeout_ms);
        self.progress
            .wait(written, replicas as usize, timeout)
            .await
            .map_err(|(point, end, confirmed)| {
                Error::Unavailable(format!(
                    "only {confirmed} of {replicas} followers confirmed point {point} up to {end} within {timeout:?}; \
                     the data is stored on the leader and will still replicate"
                ))
            })
    }
}
