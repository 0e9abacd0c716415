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
//! - [`change`] answers which change of the ring is pending (one drain or join at a time) and
//!   which forgotten members' points are still being taken over: facts of the ring and the
//!   view, asked by placement and by resharding alike.
//! - `member.rs` holds what is known of a member and the view; `state.rs` the loop's state and
//!   its decisions (no I/O but saving the ring), under the thin async loop here ([`start`]).
//! - A graceful stop announces itself first, so the others drop the node from their live view
//!   within a few gossip rounds instead of waiting for the failure detector.

pub mod change;
pub mod gossip;
pub mod handed;
pub mod ring;

mod member;
mod state;

pub use change::{Change, Forgotten, Pending};
pub use handed::Handed;
pub use member::{Advert, Lifecycle, Member, Membership, Role, View};
use state::State;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::key::InvalidKey;
pub use crate::secret::Secret;
use crate::service::{Handle, Service};
use gossip::{Gossip, Network};
use ring::{Ring, RingMember};

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
    pub fn validate(&self) -> Result<(), InvalidKey> {
        if self.name.is_empty() {
            return Err(InvalidKey::new("cluster.name", "must not be empty"));
        }
        if self.bootstrap_expect == 0 {
            return Err(InvalidKey::new(
                "cluster.bootstrap_expect",
                "must be at least 1",
            ));
        }
        if !(10..=60_000).contains(&self.gossip_interval_ms) {
            return Err(InvalidKey::new(
                "cluster.gossip_interval_ms",
                format!("{} must be within 10..=60000", self.gossip_interval_ms),
            ));
        }
        if !(self.phi_threshold >= 1.0 && self.phi_threshold <= 1000.0) {
            return Err(InvalidKey::new(
                "cluster.phi_threshold",
                format!("{} must be within 1..=1000", self.phi_threshold),
            ));
        }
        if self.dead_node_grace_ms < self.gossip_interval_ms {
            return Err(InvalidKey::new(
                "cluster.dead_node_grace_ms",
                "must be at least cluster.gossip_interval_ms",
            ));
        }
        match (&self.key, &self.key_file) {
            (Some(_), Some(_)) => Err(InvalidKey::new("cluster.key", "set either key or key_file")),
            (Some(key), None) if key.0.len() < MIN_KEY_LEN => Err(InvalidKey::new(
                "cluster.key",
                format!("must be at least {MIN_KEY_LEN} bytes"),
            )),
            (None, Some(path)) => match crate::secret::read_file(path) {
                Ok(bytes) if bytes.len() >= MIN_KEY_LEN => Ok(()),
                Ok(_) => Err(InvalidKey::new(
                    "cluster.key_file",
                    format!("{} must hold at least {MIN_KEY_LEN} bytes", path.display()),
                )),
                Err(error) => Err(InvalidKey::new(
                    "cluster.key_file",
                    format!("{}: {error}", path.display()),
                )),
            },
            _ => Ok(()),
        }
    }

    /// Whether a cluster key is configured.
    pub fn has_key(&self) -> bool {
        self.key.is_some() || self.key_file.is_some()
    }

    /// The AEAD key of gossip, if a cluster key is configured.
    pub fn gossip_key(&self) -> Result<Option<gossip::ClusterKey>, InvalidKey> {
        let secret = match (&self.key, &self.key_file) {
            (Some(key), _) => key.0.as_bytes().to_vec(),
            (None, Some(path)) => crate::secret::read_file(path).map_err(|e| {
                InvalidKey::new("cluster.key_file", format!("{}: {e}", path.display()))
            })?,
            (None, None) => return Ok(None),
        };
        Ok(Some(gossip::ClusterKey::derive(&secret, &self.name)))
    }

    /// The gossip round (`cluster.gossip_interval_ms`).
    pub fn gossip_interval(&self) -> Duration {
        Duration::from_millis(self.gossip_interval_ms)
    }
}

/// This node, as the cluster should see it.
#[derive(Debug, Clone)]
pub struct Local {
    /// Its node name.
    pub name: String,
    /// Its role.
    pub role: Role,
    /// Where clients reach its API.
    pub rpc_addr: SocketAddr,
    /// Its replication port.
    pub replication_addr: SocketAddr,
    /// Its HTTP gateway.
    pub http_addr: SocketAddr,
    /// Its placement weight.
    pub virtual_nodes: u32,
    /// Its labels (for placement plugins).
    pub tags: BTreeMap<String, String>,
}

/// What the membership subsystem needs.
pub struct Params {
    /// The `[cluster]` section.
    pub section: ClusterSection,
    /// The members to gossip with first.
    pub seeds: Vec<String>,
    /// Where the ring is kept (`<data_dir>/cluster`).
    pub dir: PathBuf,
    /// This node.
    pub local: Local,
    /// For a follower: the leader it follows, once known.
    pub leader: watch::Receiver<Option<Leader>>,
    /// The controller that decides the ring (`None`: nothing decides it past formation and
    /// the merging of gossiped rings; for tests of gossip alone).
    pub controller: Option<Controlled>,
}

/// How the membership loop hears the controller's decisions and asks for new ones.
pub struct Controlled {
    /// The ring as the controller committed it (`None` until it has one). Once it has, it is
    /// the only ring this node uses: gossip no longer changes it.
    pub committed: watch::Receiver<Option<Arc<Ring>>>,
    /// Where [`Steps`] sends the decisions it asks for.
    pub decisions: Decisions,
}

/// A step of the ring only the controller decides, asked for by this member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// This member's lifecycle: `leaving` (a drain), `left`, `active` (a join handed over).
    Lifecycle(Lifecycle),
    /// An operator forgets a dead primary.
    Forget(String),
    /// An operator makes these primaries the controller's voters.
    Voters(Vec<String>),
    /// An operator names `to` the leader of `slot`'s group outside its in-sync set (the
    /// leader is lost, and no member of the set is live); acknowledged bytes may be lost.
    ElectUnclean {
        /// The slot.
        slot: String,
        /// A follower of the group, to lead it.
        to: String,
    },
    /// This member, the leader of `slot`'s group at `leader_epoch`, hands the group to `to`
    /// (it stopped appending and saw `to` hold every byte: `api::transfer`).
    Transfer {
        /// The slot (the group's primary).
        slot: String,
        /// The epoch this member leads the group at.
        leader_epoch: u64,
        /// The member to lead it.
        to: String,
    },
}

/// The sending end of [`Decision`]s, each answered once the controller decided it.
pub type Decisions = mpsc::Sender<(Decision, oneshot::Sender<Result<(), StepError>>)>;

/// The leader a follower follows: its name (gossiped) and its client API address (where the
/// follower sends the writes it refuses).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leader {
    /// Its node name.
    pub name: String,
    /// Empty while only its name is known.
    pub rpc_addr: String,
}

/// Why membership could not start.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// Gossip could not start on the bound socket.
    #[error("config key `bind_addr`: cannot gossip: {0}")]
    Gossip(String),
    /// The ring file could not be read or written.
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

/// Asks for the explicit steps of the ring (a drain, the end of a join, a forget) and
/// announces this member's handovers. Cheap to clone. The steps are the controller's to decide:
/// each is answered once committed (or refused); the announcements also go to gossip, where
/// they are hints for the other members' movers.
#[derive(Clone)]
pub struct Steps {
    gossip: mpsc::Sender<(Ask, oneshot::Sender<Result<(), StepError>>)>,
    controller: Option<Decisions>,
}

/// What [`Steps`] asks of the membership loop: what this member announces in gossip.
#[derive(Debug)]
enum Ask {
    Handed(Option<Handed>),
    Moving(u32),
}

/// Why a lifecycle step was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StepError {
    /// The membership loop or the controller has stopped.
    #[error("the membership subsystem has stopped")]
    Stopped,
    /// Nothing decides the ring on this node (no controller).
    #[error("this node has no controller to decide the ring's steps")]
    NoController,
    /// The controller refused the step (one of its rules).
    #[error("the controller refused: {0}")]
    Refused(String),
    /// The controller has no quorum: topology changes wait.
    #[error("{0}")]
    NoQuorum(String),
    /// No such member.
    #[error("{0} is not a member of the ring")]
    Unknown(String),
    /// The member is live: only a dead primary is forgotten.
    #[error("{0} is live: drain it instead (only a dead primary is forgotten)")]
    Live(String),
}

impl Steps {
    /// Sets this member's state to `to`: `leaving` from `active` (a drain), `left` from
    /// `leaving`, `active` from `joining` (once every owner handed its points to it). Setting
    /// the current state again is not an error.
    pub async fn set_lifecycle(&self, to: Lifecycle) -> Result<(), StepError> {
        self.decide(Decision::Lifecycle(to)).await
    }

    /// Announces the join (or takeover) this member has handed every point of (`None`: none),
    /// in gossip; this member's controller agent proposes it until committed (the controller
    /// ends a join only once every owner announced it).
    pub async fn announce_handed(&self, handed: Option<Handed>) -> Result<(), StepError> {
        self.ask(Ask::Handed(handed)).await
    }

    /// Forgets `member`, a dead primary (an operator's act). Forgetting it again is not an
    /// error.
    pub async fn forget(&self, member: &str) -> Result<(), StepError> {
        self.decide(Decision::Forget(member.to_owned())).await
    }

    /// Makes `voters` the controller's voters (an operator's act): each new one catches the
    /// log up, then the set is committed.
    pub async fn set_voters(&self, voters: Vec<String>) -> Result<(), StepError> {
        self.decide(Decision::Voters(voters)).await
    }

    /// Hands the group of `slot`, which this member leads at `leader_epoch`, to `to`, a member
    /// of its in-sync set; answered once committed.
    pub async fn transfer(&self, slot: &str, leader_epoch: u64, to: &str) -> Result<(), StepError> {
        self.decide(Decision::Transfer {
            slot: slot.to_owned(),
            leader_epoch,
            to: to.to_owned(),
        })
        .await
    }

    /// Names `to` the leader of `slot`'s group outside its in-sync set (an operator's act,
    /// warned that acknowledged bytes may be lost); answered once committed.
    pub async fn elect_unclean(&self, slot: &str, to: &str) -> Result<(), StepError> {
        self.decide(Decision::ElectUnclean {
            slot: slot.to_owned(),
            to: to.to_owned(),
        })
        .await
    }

    /// Announces in gossip how many points this member is handing over now.
    pub async fn announce_moving(&self, moving: u32) -> Result<(), StepError> {
        self.ask(Ask::Moving(moving)).await
    }

    async fn ask(&self, step: Ask) -> Result<(), StepError> {
        let (reply, answer) = oneshot::channel();
        self.gossip
            .send((step, reply))
            .await
            .map_err(|_| StepError::Stopped)?;
        answer.await.map_err(|_| StepError::Stopped)?
    }

    async fn decide(&self, decision: Decision) -> Result<(), StepError> {
        let controller = self.controller.as_ref().ok_or(StepError::NoController)?;
        let (reply, answer) = oneshot::channel();
        controller
            .send((decision, reply))
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

    /// Resolves when the membership subsystem ends: `Ok` on shutdown, the failure if a task failed.
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
        committed: false,
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
    let (committed, decisions) = match params.controller {
        Some(controlled) => (Some(controlled.committed), Some(controlled.decisions)),
        None => (None, None),
    };
    let inputs = Inputs {
        leader,
        asked,
        committed,
    };
    service.spawn(
        "gossip",
        run(state, gossip, publish, inputs, interval, stop, killed),
    );
    Ok(Cluster {
        handle: service.handle(),
        membership,
        steps: Steps {
            gossip: steps,
            controller: decisions,
        },
        kill,
    })
}

/// What the membership loop listens to besides gossip.
struct Inputs {
    /// This follower's leader.
    leader: watch::Receiver<Option<Leader>>,
    /// What this member announces.
    asked: mpsc::Receiver<(Ask, oneshot::Sender<Result<(), StepError>>)>,
    /// The ring the controller committed.
    committed: Option<watch::Receiver<Option<Arc<Ring>>>>,
}

/// The membership loop: reconcile on every change of the live view, of this follower's leader,
/// of the committed ring, at every announcement, and on every gossip round (formation waits for
/// a settled candidate set).
async fn run(
    mut state: State,
    mut gossip: Gossip,
    publish: watch::Sender<Arc<Membership>>,
    inputs: Inputs,
    interval: Duration,
    stop: CancellationToken,
    kill: CancellationToken,
) {
    let Inputs {
        mut leader,
        mut asked,
        mut committed,
    } = inputs;
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
                match step {
                    Ask::Handed(handed) => state.handed = handed,
                    Ask::Moving(moving) => state.moving = moving,
                }
                answer = Some((reply, Ok(())));
            },
            changed = changed(&mut committed) => match changed {
                Some(ring) => {
                    if state.adopt_committed(&ring) {
                        state.save_ring();
                    }
                }
                None => committed = None,
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

/// The next ring the controller commits; `None` once its sender is gone (and forever pending
/// without a controller).
async fn changed(committed: &mut Option<watch::Receiver<Option<Arc<Ring>>>>) -> Option<Arc<Ring>> {
    let Some(receiver) = committed else {
        return std::future::pending().await;
    };
    loop {
        receiver.changed().await.ok()?;
        if let Some(ring) = receiver.borrow_and_update().clone() {
            return Some(ring);
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
