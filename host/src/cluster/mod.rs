//! The cluster: who is up (the live view, by gossip) and who owns ranges (the ring).
//!
//! **Liveness is not ownership.** Gossip says which members are up; the ring says which primaries
//! own ranges, and it changes only by explicit steps ([`ring`]). A primary that dies stays in the
//! ring and keeps its range (writes to it fail with `Unavailable`, its followers keep serving
//! reads); a primary that joins owns nothing (`joining`) until its ranges are handed over.
//!
//! - [`gossip`] (the only file that imports chitchat) carries each node's [`Advert`]: its
//!   addresses, role, lifecycle state, placement weight and labels, the leader it follows, the
//!   id of its ring, its own ring record, and the records of the ring members it sees down (so
//!   the gossiped state grows with the number of members, not with its square).
//! - [`start`] runs the membership subsystem: it decodes the live adverts into a [`View`] (named
//!   by a hash of its members' name, generation and state, the same on every node that sees the
//!   same members), merges the rings it hears of into its own (kept on disk), forms the ring
//!   when `cluster.bootstrap_expect` primaries without one have found each other and agree on
//!   the founders, adds this primary to an existing ring as `joining`, and publishes the result
//!   as a [`Membership`] in a watch that always holds the newest one.
//! - A graceful stop announces itself first, so the others drop the node from their live view
//!   within a few gossip rounds instead of waiting for the failure detector.

pub mod gossip;
pub mod handed;
pub mod ring;

pub use handed::Handed;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use crate::secret::Secret;
use crate::service::{Handle, Service};
use gossip::{Gossip, Network};
use ring::{Ring, RingMember};

/// The role a node plays in the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A primary without followers.
    Standalone,
    /// A primary that replicates its points to its followers.
    Leader,
    /// Holds read-only copies of one leader's points.
    Follower,
    /// Stores nothing; routes clients to the nodes that hold their points.
    Balancer,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Standalone => "standalone",
            Role::Leader => "leader",
            Role::Follower => "follower",
            Role::Balancer => "balancer",
        }
    }

    pub fn parse(text: &str) -> Option<Role> {
        match text {
            "standalone" => Some(Role::Standalone),
            "leader" => Some(Role::Leader),
            "follower" => Some(Role::Follower),
            "balancer" => Some(Role::Balancer),
            _ => None,
        }
    }

    /// Primaries are in the ring and own ranges; the other roles do not.
    pub fn is_primary(self) -> bool {
        matches!(self, Role::Standalone | Role::Leader)
    }

    pub fn is_balancer(self) -> bool {
        self == Role::Balancer
    }
}

/// Where a member stands in the ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Lifecycle {
    /// Owns nothing yet: waiting for the ring to form, or for its ranges to be handed over.
    Joining,
    /// Owns its ranges (followers and other non-primaries are always `active`).
    Active,
    /// Handing its ranges over before leaving the ring (`goutube members drain`).
    Leaving,
    /// Drained: owns nothing and may be stopped for good. Its record stays in the ring, so the
    /// others know it left rather than died.
    Left,
    /// Dead and forgotten by an operator (`goutube members forget`): owns nothing; its points
    /// are taken over from its followers' copies. Final: a forgotten member that returns steps
    /// down (`docs/resharding.md`).
    Forgotten,
}

impl Lifecycle {
    pub fn as_str(self) -> &'static str {
        match self {
            Lifecycle::Joining => "joining",
            Lifecycle::Active => "active",
            Lifecycle::Leaving => "leaving",
            Lifecycle::Left => "left",
            Lifecycle::Forgotten => "forgotten",
        }
    }

    pub fn parse(text: &str) -> Option<Lifecycle> {
        match text {
            "joining" => Some(Lifecycle::Joining),
            "active" => Some(Lifecycle::Active),
            "leaving" => Some(Lifecycle::Leaving),
            "left" => Some(Lifecycle::Left),
            "forgotten" => Some(Lifecycle::Forgotten),
            _ => None,
        }
    }
}

/// A live member, as it announces itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub name: String,
    /// Distinguishes runs of the same node (its start time, in nanoseconds).
    pub generation: u64,
    pub gossip_addr: SocketAddr,
    pub role: Role,
    pub lifecycle: Lifecycle,
    pub rpc_addr: String,
    pub replication_addr: String,
    /// Its HTTP gateway.
    pub http_addr: String,
    pub virtual_nodes: u32,
    pub tags: BTreeMap<String, String>,
    /// For a follower: the name of the leader it follows, once connected.
    pub leader: Option<String>,
    /// What it has handed over: for a primary, a join (the joining member turns `active` once
    /// every owner of the ring says so); for a follower, the forgotten members whose points it
    /// holds copies of are with their new owners (`docs/resharding.md`).
    pub handed: Option<Handed>,
    /// For a primary: the points it is handing over now.
    pub moving: u32,
}

/// Everything a node gossips: itself, the part of its ring others may not know (its own record,
/// the records of members it sees down), and while the ring forms, the founders it proposes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Advert {
    pub member: Member,
    pub ring: Ring,
    pub proposal: Option<String>,
}

/// The live members, as one node sees them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct View {
    /// Hash of the members' (name, generation, lifecycle state).
    pub id: String,
    pub members: BTreeMap<String, Member>,
}

impl View {
    fn new(members: BTreeMap<String, Member>) -> View {
        let mut hasher = Sha256::new();
        for member in members.values() {
            hasher.update(member.name.as_bytes());
            hasher.update(b"\0");
            hasher.update(member.generation.to_le_bytes());
            hasher.update(member.lifecycle.as_str().as_bytes());
            hasher.update(b"\n");
        }
        View {
            id: ring::hex(&hasher.finalize()[..8]),
            members,
        }
    }
}

/// What a node knows of its cluster at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Membership {
    /// This node's name.
    pub local: String,
    pub view: View,
    pub ring: Ring,
    /// [`Ring::version`] of `ring`: the stamp of placement answers.
    pub ring_version: u64,
    /// Another ring was met (see [`ring::RingConflict`]).
    pub conflict: Option<String>,
}

impl Membership {
    /// The live member called `name`.
    pub fn live(&self, name: &str) -> Option<&Member> {
        self.view.members.get(name)
    }

    /// Where clients reach `name`: its live address, else the last one the ring recorded.
    pub fn rpc_addr(&self, name: &str) -> Option<&str> {
        self.live(name)
            .map(|m| m.rpc_addr.as_str())
            .or_else(|| self.ring.members.get(name).map(|m| m.rpc_addr.as_str()))
    }
}

/// The `[cluster]` section of the configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterSection {
    /// Nodes of another cluster are not members (isolation, not security: see `key`).
    pub name: String,
    /// How many primaries without a ring must find each other to form one.
    pub bootstrap_expect: usize,
    /// Period of gossip rounds.
    pub gossip_interval_ms: u64,
    /// Failure detector: a member is down once it has been silent this many times its usual
    /// heartbeat interval.
    pub phi_threshold: f64,
    /// How long the gossip state of a dead member is kept before it is forgotten.
    pub dead_node_grace_ms: u64,
    /// The cluster key (prefer `key_file` or `GOUTUBE_CLUSTER__KEY`); gossip is sealed with it.
    pub key: Option<Secret>,
    /// A file holding the cluster key.
    pub key_file: Option<PathBuf>,
}

impl Default for ClusterSection {
    fn default() -> Self {
        Self {
            name: "goutube".into(),
            bootstrap_expect: 1,
            gossip_interval_ms: 200,
            phi_threshold: 8.0,
            dead_node_grace_ms: 15 * 60 * 1000,
            key: None,
            key_file: None,
        }
    }
}

/// Shortest cluster key accepted.
pub const MIN_KEY_LEN: usize = 16;

impl ClusterSection {
    /// Checks what serde cannot; errors name the key.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.name.is_empty() {
            return Err(("cluster.name", "must not be empty".into()));
        }
        if self.bootstrap_expect == 0 {
            return Err(("cluster.bootstrap_expect", "must be at least 1".into()));
        }
        if !(10..=60_000).contains(&self.gossip_interval_ms) {
            return Err((
                "cluster.gossip_interval_ms",
                format!("{} must be within 10..=60000", self.gossip_interval_ms),
            ));
        }
        if !(self.phi_threshold >= 1.0 && self.phi_threshold <= 1000.0) {
            return Err((
                "cluster.phi_threshold",
                format!("{} must be within 1..=1000", self.phi_threshold),
            ));
        }
        if self.dead_node_grace_ms < self.gossip_interval_ms {
            return Err((
                "cluster.dead_node_grace_ms",
                "must be at least cluster.gossip_interval_ms".into(),
            ));
        }
        match (&self.key, &self.key_file) {
            (Some(_), Some(_)) => Err(("cluster.key", "set either key or key_file".into())),
            (Some(key), None) if key.0.len() < MIN_KEY_LEN => Err((
                "cluster.key",
                format!("must be at least {MIN_KEY_LEN} bytes"),
            )),
            (None, Some(path)) => match crate::secret::read_file(path) {
                Ok(bytes) if bytes.len() >= MIN_KEY_LEN => Ok(()),
                Ok(_) => Err((
                    "cluster.key_file",
                    format!("{} must hold at least {MIN_KEY_LEN} bytes", path.display()),
                )),
                Err(error) => Err(("cluster.key_file", format!("{}: {error}", path.display()))),
            },
            _ => Ok(()),
        }
    }

    /// Whether a cluster key is configured.
    pub fn has_key(&self) -> bool {
        self.key.is_some() || self.key_file.is_some()
    }

    /// The AEAD key of gossip, if a cluster key is configured.
    pub fn gossip_key(&self) -> Result<Option<gossip::ClusterKey>, String> {
        let secret = match (&self.key, &self.key_file) {
            (Some(key), _) => key.0.as_bytes().to_vec(),
            (None, Some(path)) => crate::secret::read_file(path)
                .map_err(|e| format!("config key `cluster.key_file`: {}: {e}", path.display()))?,
            (None, None) => return Ok(None),
        };
        Ok(Some(gossip::ClusterKey::derive(&secret, &self.name)))
    }

    pub fn gossip_interval(&self) -> Duration {
        Duration::from_millis(self.gossip_interval_ms)
    }
}

/// This node, as the cluster should see it.
#[derive(Debug, Clone)]
pub struct Local {
    pub name: String,
    pub role: Role,
    pub rpc_addr: SocketAddr,
    pub replication_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub virtual_nodes: u32,
    pub tags: BTreeMap<String, String>,
}

/// What the membership subsystem needs.
pub struct Params {
    pub section: ClusterSection,
    pub seeds: Vec<String>,
    /// Where the ring is kept (`<data_dir>/cluster`).
    pub dir: PathBuf,
    pub local: Local,
    /// For a follower: the leader it follows, once known.
    pub leader: watch::Receiver<Option<Leader>>,
}

/// The leader a follower follows: its name (gossiped) and its client API address (where the
/// follower sends the writes it refuses).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leader {
    pub name: String,
    /// Empty while only its name is known.
    pub rpc_addr: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("config key `bind_addr`: cannot gossip: {0}")]
    Gossip(String),
    #[error("the ring file: {0}")]
    Ring(String),
}

/// The running membership subsystem.
pub struct Cluster {
    handle: Handle,
    membership: watch::Receiver<Arc<Membership>>,
    steps: Steps,
    kill: CancellationToken,
}

/// Changes this primary's own lifecycle state in the ring: the explicit steps of a drain
/// (`active` → `leaving` → `left`). Cheap to clone; answered by the membership loop once the
/// ring holding the new state is saved and published.
#[derive(Clone)]
pub struct Steps(mpsc::Sender<(Ask, oneshot::Sender<Result<(), StepError>>)>);

/// What [`Steps`] asks of the membership loop.
#[derive(Debug)]
enum Ask {
    Lifecycle(Lifecycle),
    Handed(Option<Handed>),
    Moving(u32),
    Forget(String),
}

/// Why a lifecycle step was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StepError {
    #[error("this node is not a member of a formed ring")]
    NotInRing,
    #[error("a member cannot go from {from} to {to}", from = .from.as_str(), to = .to.as_str())]
    Transition { from: Lifecycle, to: Lifecycle },
    #[error("the membership subsystem has stopped")]
    Stopped,
    #[error("{0} is not a member of the ring")]
    Unknown(String),
    #[error("{0} is live: drain it instead (only a dead primary is forgotten)")]
    Live(String),
}

impl Steps {
    /// Sets this member's state to `to`: `leaving` from `active`, `left` from `leaving` (or
    /// from `joining`, which owns nothing), `active` from `joining` (once its points were handed
    /// to it). Setting the current state again is not an error.
    pub async fn set_lifecycle(&self, to: Lifecycle) -> Result<(), StepError> {
        self.ask(Ask::Lifecycle(to)).await
    }

    /// Announces in gossip the join this member has handed every point of (`None`: none).
    pub async fn announce_handed(&self, handed: Option<Handed>) -> Result<(), StepError> {
        self.ask(Ask::Handed(handed)).await
    }

    /// Writes the ring record of `member`, a dead primary, as `forgotten` (an operator's act:
    /// the one record a member writes for another). Forgetting it again is not an error.
    pub async fn forget(&self, member: &str) -> Result<(), StepError> {
        self.ask(Ask::Forget(member.to_owned())).await
    }

    /// Announces in gossip how many points this member is handing over now.
    pub async fn announce_moving(&self, moving: u32) -> Result<(), StepError> {
        self.ask(Ask::Moving(moving)).await
    }

    async fn ask(&self, step: Ask) -> Result<(), StepError> {
        let (reply, answer) = oneshot::channel();
        self.0
            .send((step, reply))
            .await
            .map_err(|_| StepError::Stopped)?;
        answer.await.map_err(|_| StepError::Stopped)?
    }
}

impl Cluster {
    /// The newest membership, always.
    pub fn membership(&self) -> watch::Receiver<Arc<Membership>> {
        self.membership.clone()
    }

    /// Where this member's lifecycle steps are asked for.
    pub fn steps(&self) -> Steps {
        self.steps.clone()
    }

    /// Announces the departure from the live view, waits for it to spread, stops gossiping.
    /// The node stays in the ring: a restart is not a departure.
    pub async fn shutdown(self) -> Result<(), crate::service::Failed> {
        self.handle.shutdown().await
    }

    /// Stops gossiping at once, without announcing anything, as `kill -9` would (tests).
    pub async fn kill(self) {
        self.kill.cancel();
        let _ = self.handle.shutdown().await;
    }

    pub fn terminated(
        &self,
    ) -> impl std::future::Future<Output = Result<(), crate::service::Failed>> + Send + 'static
    {
        self.handle.terminated()
    }
}

/// Joins (or forms) the cluster. Returns once this node's first membership is known: a lone
/// primary with `bootstrap_expect = 1` and no seeds has formed its ring by then.
pub async fn start(
    params: Params,
    network: Network,
    token: CancellationToken,
) -> Result<Cluster, ClusterError> {
    let ring_path = params.dir.join("ring.json");
    let ring = Ring::load(&ring_path)
        .map_err(ClusterError::Ring)?
        .unwrap_or_default();
    let interval = params.section.gossip_interval();
    let settings = gossip::Settings {
        cluster: params.section.name.clone(),
        name: params.local.name.clone(),
        generation: generation(),
        seeds: params.seeds.clone(),
        interval,
        phi_threshold: params.section.phi_threshold,
        dead_grace: Duration::from_millis(params.section.dead_node_grace_ms),
    };
    let settle = if params.seeds.is_empty() && params.section.bootstrap_expect == 1 {
        Duration::ZERO
    } else {
        interval * 3
    };
    let mut state = State {
        local: params.local,
        generation: settings.generation,
        gossip_addr: "0.0.0.0:0".parse().expect("an address"),
        expect: params.section.bootstrap_expect,
        settle,
        ring,
        ring_path,
        candidates: None,
        proposal: None,
        conflict: None,
        leader: params.leader.borrow().as_ref().map(|l| l.name.clone()),
        handed: None,
        moving: 0,
        live: BTreeSet::new(),
    };
    state.gossip_addr = match &network {
        Network::Udp { socket, .. } => socket
            .local_addr()
            .map_err(|e| ClusterError::Gossip(e.to_string()))?,
        Network::InMemory { addr, .. } => *addr,
    };
    state.reconcile(&[], &[], Instant::now());
    state.save_ring();
    let gossip = Gossip::start(&settings, &state.advert(), network)
        .await
        .map_err(ClusterError::Gossip)?;
    let (publish, membership) = watch::channel(Arc::new(state.membership(&[])));
    tracing::info!(
        node = %state.local.name,
        gossip = %state.gossip_addr,
        seeds = ?settings.seeds,
        ring = %state.ring.id,
        "membership started"
    );

    let service = Service::new("membership", token);
    let kill = CancellationToken::new();
    let stop = service.token().clone();
    let killed = kill.clone();
    let leader = params.leader;
    let (steps, asked) = mpsc::channel(4);
    service.spawn(
        "gossip",
        run(
            state, gossip, publish, leader, asked, interval, stop, killed,
        ),
    );
    Ok(Cluster {
        handle: service.handle(),
        membership,
        steps: Steps(steps),
        kill,
    })
}

/// The membership loop: reconcile on every change of the live view, of this follower's leader,
/// at every lifecycle step asked for, and on every gossip round (formation waits for a settled
/// candidate set).
#[allow(clippy::too_many_arguments)]
async fn run(
    mut state: State,
    mut gossip: Gossip,
    publish: watch::Sender<Arc<Membership>>,
    mut leader: watch::Receiver<Option<Leader>>,
    mut asked: mpsc::Receiver<(Ask, oneshot::Sender<Result<(), StepError>>)>,
    interval: Duration,
    stop: CancellationToken,
    kill: CancellationToken,
) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let ended = gossip.ended();
    tokio::pin!(ended);
    let mut published = state.advert();
    // Only a follower's replication keeps the sender; once it is gone, nothing changes there.
    let mut following = true;
    loop {
        let mut answer = None;
        tokio::select! {
            _ = stop.cancelled() => break,
            result = &mut ended => {
                tracing::error!(error = ?result.err(), "gossip stopped; this node no longer sees its cluster");
                return;
            }
            changed = gossip.changed() => if changed.is_err() { return },
            changed = leader.changed(), if following => match changed {
                Ok(()) => {
                    state.leader = leader.borrow_and_update().as_ref().map(|l| l.name.clone())
                }
                Err(_) => following = false,
            },
            Some((step, reply)) = asked.recv() => {
                let stepped = match step {
                    Ask::Lifecycle(to) => state.step(to),
                    Ask::Handed(handed) => {
                        state.handed = handed;
                        Ok(false)
                    }
                    Ask::Moving(moving) => {
                        state.moving = moving;
                        Ok(false)
                    }
                    Ask::Forget(member) => state.forget(&member, &gossip.live()),
                };
                if matches!(stepped, Ok(true)) {
                    state.save_ring();
                }
                answer = Some((reply, stepped.map(|_| ())));
            },
            _ = ticks.tick() => {}
        }
        if !state.ring.is_formed() {
            gossip.greet_seeds().await;
        }
        let live = gossip.live();
        let known = gossip.known().await;
        if state.reconcile(&live, &known, Instant::now()) {
            state.save_ring();
        }
        let advert = state.advert();
        if advert != published {
            gossip.publish(&advert).await;
            published = advert;
        }
        let membership = state.membership(&live);
        publish.send_if_modified(|current| {
            if **current == membership {
                return false;
            }
            record_gauges(&membership);
            *current = Arc::new(membership);
            true
        });
        if let Some((reply, stepped)) = answer {
            let _ = reply.send(stepped);
        }
    }
    if kill.is_cancelled() {
        gossip.kill();
    } else {
        gossip.leave().await;
    }
}

/// What the loop keeps between rounds.
struct State {
    local: Local,
    generation: u64,
    gossip_addr: SocketAddr,
    expect: usize,
    /// How long the candidate founders must stay the same before this node proposes them.
    settle: Duration,
    ring: Ring,
    ring_path: PathBuf,
    /// The candidate founders and since when they have not changed.
    candidates: Option<(BTreeSet<String>, Instant)>,
    /// The founders this node proposes (their formation id).
    proposal: Option<String>,
    conflict: Option<String>,
    leader: Option<String>,
    /// The join this member announces it has handed over.
    handed: Option<Handed>,
    /// The points this member announces it is handing over.
    moving: u32,
    /// The members live in the last round (their ring records are theirs to announce).
    live: BTreeSet<String>,
}

impl State {
    fn member(&self) -> Member {
        let lifecycle = if !self.local.role.is_primary() {
            Lifecycle::Active
        } else {
            self.ring
                .members
                .get(&self.local.name)
                .map_or(Lifecycle::Joining, |m| m.lifecycle)
        };
        Member {
            name: self.local.name.clone(),
            generation: self.generation,
            gossip_addr: self.gossip_addr,
            role: self.local.role,
            lifecycle,
            rpc_addr: self.local.rpc_addr.to_string(),
            replication_addr: self.local.replication_addr.to_string(),
            http_addr: self.local.http_addr.to_string(),
            virtual_nodes: self.local.virtual_nodes,
            tags: self.local.tags.clone(),
            leader: self.leader.clone(),
            handed: self.handed.clone(),
            moving: self.moving,
        }
    }

    fn advert(&self) -> Advert {
        let members = self
            .ring
            .members
            .iter()
            .filter(|(name, _)| **name == self.local.name || !self.live.contains(*name))
            .map(|(name, record)| (name.clone(), record.clone()))
            .collect();
        Advert {
            member: self.member(),
            ring: Ring {
                id: self.ring.id.clone(),
                founders: self.ring.founders.clone(),
                members,
            },
            proposal: self.proposal.clone(),
        }
    }

    fn ring_member(&self, member: &Member) -> RingMember {
        RingMember {
            lifecycle: Lifecycle::Joining,
            role: member.role,
            rpc_addr: member.rpc_addr.clone(),
            replication_addr: member.replication_addr.clone(),
            virtual_nodes: member.virtual_nodes,
            tags: member.tags.clone(),
            version: 1,
        }
    }

    /// One step of membership: merge the rings of every `known` node (live or not), form the
    /// ring with `live` primaries or join it, keep this member's record current. Returns whether
    /// the ring changed.
    fn reconcile(&mut self, live: &[Advert], known: &[Advert], now: Instant) -> bool {
        let before = self.ring.clone();
        self.live = live.iter().map(|a| a.member.name.clone()).collect();
        let others: Vec<&Advert> = live
            .iter()
            .filter(|a| a.member.name != self.local.name)
            .collect();
        let heard: Vec<&Advert> = known
            .iter()
            .filter(|a| a.member.name != self.local.name)
            .collect();
        self.merge_rings(&heard);
        if self.local.role.is_primary() {
            if self.ring.is_formed() {
                self.proposal = None;
                self.candidates = None;
                self.keep_own_record();
            } else {
                self.form(&others, now);
            }
        }
        self.ring != before
    }

    fn merge_rings(&mut self, others: &[&Advert]) {
        let mut conflict = None;
        if !self.ring.is_formed() {
            // Adopt the ring of the cluster; if its members disagree, the largest (then the
            // smallest id), and say so.
            let mut rings: Vec<&Ring> = others
                .iter()
                .map(|a| &a.ring)
                .filter(|r| r.is_formed())
                .collect();
            rings.sort_by(|a, b| b.members.len().cmp(&a.members.len()).then(a.id.cmp(&b.id)));
            rings.dedup_by(|a, b| a.id == b.id);
            if let Some(first) = rings.first() {
                self.ring = Ring {
                    id: first.id.clone(),
                    founders: first.founders.clone(),
                    members: BTreeMap::new(),
                };
                tracing::info!(ring = %first.id, "adopting the cluster's ring");
            }
            if rings.len() > 1 {
                conflict = Some(format!(
                    "the live members hold {} different rings ({})",
                    rings.len(),
                    rings
                        .iter()
                        .map(|r| r.id.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
        }
        for advert in others {
            if !advert.ring.is_formed() || !self.ring.is_formed() {
                continue;
            }
            if let Err(error) = self.ring.merge(&advert.ring, &advert.member.name) {
                conflict = Some(error.to_string());
            }
        }
        if conflict != self.conflict {
            if let Some(conflict) = &conflict {
                tracing::error!(%conflict, "ring conflict: this node keeps its own ring");
            }
            self.conflict = conflict;
        }
    }

    /// Moves this member's ring record to `to`. Returns whether it changed.
    fn step(&mut self, to: Lifecycle) -> Result<bool, StepError> {
        if !self.ring.is_formed() {
            return Err(StepError::NotInRing);
        }
        let record = self
            .ring
            .members
            .get_mut(&self.local.name)
            .ok_or(StepError::NotInRing)?;
        let from = record.lifecycle;
        let allowed = matches!(
            (from, to),
            (Lifecycle::Active, Lifecycle::Leaving)
                | (Lifecycle::Joining, Lifecycle::Active)
                | (Lifecycle::Leaving | Lifecycle::Joining, Lifecycle::Left)
        );
        if from == to {
            return Ok(false);
        }
        if !allowed {
            return Err(StepError::Transition { from, to });
        }
        record.lifecycle = to;
        record.version += 1;
        tracing::info!(
            from = from.as_str(),
            to = to.as_str(),
            "this member's state in the ring changed"
        );
        Ok(true)
    }

    /// Writes `member`'s record as `forgotten`, refused while it is live. Returns whether it
    /// changed.
    fn forget(&mut self, member: &str, live: &[Advert]) -> Result<bool, StepError> {
        if !self.ring.is_formed() {
            return Err(StepError::NotInRing);
        }
        if member == self.local.name || live.iter().any(|a| a.member.name == member) {
            return Err(StepError::Live(member.to_owned()));
        }
        let record = self
            .ring
            .members
            .get_mut(member)
            .ok_or_else(|| StepError::Unknown(member.to_owned()))?;
        if record.lifecycle == Lifecycle::Forgotten {
            return Ok(false);
        }
        tracing::warn!(
            %member,
            from = record.lifecycle.as_str(),
            "forgot the member: its points are taken over from its followers' copies"
        );
        record.lifecycle = Lifecycle::Forgotten;
        record.version += 1;
        Ok(true)
    }

    /// Adds this primary to the ring as `joining`, or updates its addresses in its record.
    fn keep_own_record(&mut self) {
        let me = self.member();
        match self.ring.members.get_mut(&self.local.name) {
            None if self.ring.founders.contains(&me.name) => {
                // A founder that adopted the ring before it formed it itself.
                let record = ring::founding_record(self.ring_member(&me));
                self.ring.members.insert(me.name.clone(), record);
            }
            None => {
                let record = self.ring_member(&me);
                tracing::info!(ring = %self.ring.id, "joining the ring; this node owns nothing until its ranges are handed over");
                self.ring.members.insert(me.name.clone(), record);
            }
            Some(record) => {
                if record.virtual_nodes != me.virtual_nodes || record.tags != me.tags {
                    tracing::warn!(
                        ring_virtual_nodes = record.virtual_nodes,
                        "virtual_node_count and tags are fixed when a member enters the ring; the ring's values stay"
                    );
                }
                if record.rpc_addr != me.rpc_addr
                    || record.replication_addr != me.replication_addr
                    || record.role != me.role
                {
                    record.rpc_addr = me.rpc_addr;
                    record.replication_addr = me.replication_addr;
                    record.role = me.role;
                    record.version += 1;
                }
            }
        }
    }

    /// Formation: the live primaries without a ring (this one included) are the candidate
    /// founders; once at least `bootstrap_expect` of them have been the same for the settle
    /// period, this node proposes them, and it forms the ring when every candidate proposes the
    /// same founders.
    fn form(&mut self, others: &[&Advert], now: Instant) {
        let mut founders: BTreeMap<String, RingMember> = others
            .iter()
            .filter(|a| a.member.role.is_primary() && !a.ring.is_formed())
            .map(|a| (a.member.name.clone(), self.ring_member(&a.member)))
            .collect();
        let me = self.member();
        founders.insert(me.name.clone(), self.ring_member(&me));
        let names: BTreeSet<String> = founders.keys().cloned().collect();
        if names.len() < self.expect {
            self.candidates = None;
            self.proposal = None;
            return;
        }
        let since = match &self.candidates {
            Some((same, since)) if *same == names => *since,
            _ => now,
        };
        self.candidates = Some((names.clone(), since));
        if now.duration_since(since) < self.settle {
            return;
        }
        let proposal = ring::formation_id(&names);
        let agreed = others
            .iter()
            .filter(|a| names.contains(&a.member.name))
            .all(|a| a.proposal.as_deref() == Some(proposal.as_str()));
        self.proposal = Some(proposal);
        if agreed {
            self.ring = Ring::form(founders);
            tracing::info!(ring = %self.ring.id, founders = ?names, "formed the ring");
        }
    }

    fn save_ring(&self) {
        if !self.ring.is_formed() {
            return;
        }
        if let Err(error) = self.ring.save(&self.ring_path) {
            // The ring is still gossiped and kept in memory; the next change tries again.
            tracing::error!(path = %self.ring_path.display(), %error, "cannot save the ring");
        }
    }

    fn membership(&self, live: &[Advert]) -> Membership {
        let mut members: BTreeMap<String, Member> = BTreeMap::new();
        for advert in live {
            let member = &advert.member;
            match members.get(&member.name) {
                // A restarted node may briefly appear twice: the newest run counts.
                Some(known) if known.generation >= member.generation => {}
                _ => {
                    members.insert(member.name.clone(), member.clone());
                }
            }
        }
        // This node as it is now, not as its last gossip round said.
        let me = self.member();
        members.insert(me.name.clone(), me);
        Membership {
            local: self.local.name.clone(),
            view: View::new(members),
            ring_version: self.ring.version(),
            ring: self.ring.clone(),
            conflict: self.conflict.clone(),
        }
    }
}

fn record_gauges(membership: &Membership) {
    ::metrics::gauge!(crate::metrics::MEMBERS_LIVE).set(membership.view.members.len() as f64);
    for state in [
        Lifecycle::Joining,
        Lifecycle::Active,
        Lifecycle::Leaving,
        Lifecycle::Left,
        Lifecycle::Forgotten,
    ] {
        for live in [true, false] {
            let count = membership
                .ring
                .members
                .iter()
                .filter(|(name, m)| m.lifecycle == state && membership.live(name).is_some() == live)
                .count();
            ::metrics::gauge!(
                crate::metrics::RING_MEMBERS,
                "state" => state.as_str(),
                "live" => if live { "true" } else { "false" }
            )
            .set(count as f64);
        }
    }
}

/// This run's generation: the start time in nanoseconds (restarts are later, hence larger).
fn generation() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// The directory of the cluster state of a node whose data is in `data_dir`.
pub fn dir(data_dir: &Path) -> PathBuf {
    data_dir.join("cluster")
}

#[cfg(test)]
mod tests;
