//! What the handlers of one node share: the store, the access door, the gate (ownership),
//! replication progress, and the checks and waits that several handlers make.

use std::sync::Arc;
use std::time::Duration;

use crate::access::Action;
use crate::cluster::Steps;
use crate::error::Error;
use crate::net::PeerInfo;
use crate::point::{PointId, Store, Visibility};
use crate::proto::{ON_BEHALF_OF, PURPOSE};
use crate::replication::{Progress, Replica, Short};
use crate::reshard::Gate;
use crate::services::Services;

/// What the handlers of a storage node share.
pub struct Context {
    /// What every subsystem of the node shares (configuration, access, placement, the URL
    /// signer, the API address, the node's lifetime).
    pub services: Services,
    /// The node's points.
    pub store: Store,
    /// What followers confirmed (empty unless this node is a leader).
    pub progress: Arc<Progress>,
    /// This member's lifecycle steps (`DrainMember`).
    pub steps: Steps,
    /// Whether this node takes a write or serves a read of a point, or who does.
    pub gate: Arc<Gate>,
}

impl Context {
    /// Waits, at most `wait`, until this node's view of the controller's committed state makes
    /// `done` true (a decision committed elsewhere reaches it a moment later). The callers read
    /// the view afterwards, whether it came or not.
    pub async fn until_view(
        &self,
        wait: Duration,
        done: impl Fn(&crate::controller::Topology) -> bool,
    ) {
        let mut topology = self.services.controller.watch_topology();
        let seen = topology.wait_for(|topology| done(topology));
        let _ = tokio::time::timeout(wait, seen).await;
    }

    /// Who a call is for: the connection's subject, or the subject a balancer member forwards
    /// it for. A call forwarded by a node this member does not see live yet — a balancer that
    /// started a moment ago, not yet heard of in gossip — is refused as `Unavailable`, to be
    /// sent again: authorized as the node's own, it would be denied (`PermissionDenied`) for a
    /// caller the policy allows. Forwarded by a live member that is no balancer, or over a
    /// client's connection, the forwarded subject is ignored.
    pub fn caller<T>(&self, request: &tonic::Request<T>) -> Result<PeerInfo, Error> {
        let peer = PeerInfo::of(request);
        let Some(forwarded) = request
            .metadata()
            .get_bin(ON_BEHALF_OF)
            .and_then(|value| value.to_bytes().ok())
            .and_then(|bytes| String::from_utf8(bytes.to_vec()).ok())
        else {
            return Ok(peer);
        };
        let Some(node) = peer.subject.strip_prefix(crate::net::NODE_PREFIX) else {
            return Ok(peer);
        };
        match self.services.placement.membership().live(node) {
            Some(member) if member.role.is_balancer() => Ok(PeerInfo {
                addr: peer.addr,
                subject: forwarded.into(),
            }),
            Some(_) => Ok(peer),
            None => Err(Error::ForwarderUnseen {
                forwarder: crate::text::bounded(node),
                node: self.services.config.node_name.clone(),
            }),
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
            .strip_prefix(crate::net::NODE_PREFIX)
            .and_then(|name| {
                self.services
                    .placement
                    .membership()
                    .live(name)
                    .map(|member| member.role.is_balancer())
            })
            .unwrap_or(false)
    }

    /// An operator call about member `node` (drain, cleanup) is made on that node itself: a
    /// check against changing the wrong one.
    pub fn check_addressed(&self, node: &str) -> Result<(), Error> {
        let local = &self.services.config.node_name;
        if node == local {
            return Ok(());
        }
        Err(Error::FailedPrecondition(format!(
            "this is node {local}, not {}: ask that node itself",
            crate::text::bounded(node)
        )))
    }

    /// The nodes a client may read `point` (of `size` bytes) from in parallel: this node, and on
    /// a leader `multi_stream_percent` of the connected followers that hold all of it.
    pub fn workers(&self, point: &PointId, size: u64) -> Vec<String> {
        let mut workers = vec![self.services.rpc_addr.to_string()];
        let complete: Vec<String> = self
            .progress
            .replicas(point)
            .into_iter()
            .filter(|replica| replica.connected && replica.end >= size)
            .map(|replica| replica.rpc_address)
            .collect();
        let take =
            (complete.len() * usize::from(self.services.config.multi_stream_percent)).div_ceil(100);
        workers.extend(complete.into_iter().take(take));
        workers
    }

    /// How far each follower confirmed `point`.
    pub fn replicas(&self, point: &PointId) -> Vec<Replica> {
        self.progress.replicas(point)
    }

    /// How many followers a write waits for before it is acknowledged (besides every in-sync
    /// one); `None`: it waits for none.
    pub fn replicas_waited_for(&self) -> Option<u32> {
        let topology = self.services.controller.topology();
        let config = &self.services.config;
        crate::replication::replicas_waited_for(
            &config.replication.ack,
            &config.node_name,
            &topology,
        )
    }

    /// When a client's write is served to consumers: once acknowledged (and committed by the
    /// produce call, or by the followers' confirmations) if it waits for followers, else as soon
    /// as it is stored.
    pub fn visibility(&self) -> Visibility {
        match self.replicas_waited_for() {
            Some(_) => Visibility::OnCommit,
            None => Visibility::Now,
        }
    }

    /// Holds a long write back until the in-sync followers confirmed `ends` (at most
    /// `replication.ack_timeout_ms`; the acknowledgement's own wait says what is missing).
    pub async fn pace(&self, ends: &[(PointId, u64)]) {
        let timeout = Duration::from_millis(self.services.config.replication.ack_timeout_ms);
        if let Err(short) = self.progress.wait(ends, 0, timeout).await {
            tracing::debug!(?short, "a long write went on without its in-sync followers");
        }
    }

    /// With `ack = { replicas = N }`, waits until every follower in the group's in-sync set
    /// (and each one about to enter it) and at least N followers confirmed every
    /// `(point, end)` (`docs/failover.md`).
    pub async fn wait_for_replicas(&self, written: &[(PointId, u64)]) -> Result<(), Error> {
        let Some(replicas) = self.replicas_waited_for() else {
            return Ok(());
        };
        let timeout = Duration::from_millis(self.services.config.replication.ack_timeout_ms);
        let short = match self
            .progress
            .wait(written, replicas as usize, timeout)
            .await
        {
            // A session that lapsed meanwhile: a new leader may have been named already.
            Ok(()) => return Ok(self.gate.check_session()?),
            Err(short) => short,
        };
        let why = match short {
            Short::InSyncUnknown => "this leader does not know its group's in-sync set yet (the controller's state has not reached it)".to_owned(),
            Short::Waiting { follower, point, end } => format!(
                "in-sync follower {follower} has not confirmed point {point} up to {end} (it stays in the in-sync set until the controller commits its removal)"
            ),
            Short::Replicas { point, end, confirmed } => format!(
                "only {confirmed} of {replicas} followers confirmed point {point} up to {end}"
            ),
        };
        Err(Error::Unavailable(format!(
            "not acknowledged within {timeout:?}: {why}; the data is stored on the leader and will still replicate"
        )))
    }
}
