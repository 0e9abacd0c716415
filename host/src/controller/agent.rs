//! The controller's agent, on every member: the bridge between the controller's decisions and
//! the rest of the node (`docs/controller.md`).
//!
//! - It finds the voters: `controller.voters`, else the founders of the ring, known once gossip
//!   formed it (as Consul's servers bootstrap from `bootstrap_expect`: the one thing gossip
//!   settles, once); a lone node founds its own ring and is its own voter.
//! - On a primary it starts the Raft node (a voter's, or an idle one that a leader may add as a
//!   voter later); a member that is not a voter now follows a voter's committed state
//!   (`Watch`), keeping only what is newer than what it holds.
//! - It hands the committed ring to the membership loop ([`cluster::Controlled`]), which from
//!   then on uses no other.
//! - It keeps this member's session with the controller (`heartbeat.rs`).
//! - It proposes what this member's own state asks for, one proposal at a time and again until
//!   it is committed: the import of the ring gossip formed or an older version kept (once, by a
//!   voter), this primary's join, its addresses, the handover it announces, the leader a
//!   follower copies.
//! - It decides the steps [`cluster::Steps`] asks for (a drain, the end of a join or a drain, a
//!   forget, a change of the voters), answering each once committed.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::election::{Cause, Due};
use super::network::Peers;
use super::session::{HEARTBEATS_PER_SESSION, Held};
use super::{
    Applied, Command, Controller, Group, Lease, ProposeError, Rejected, StartError, Status,
    Topology, VotersError, election, heartbeat,
};
use crate::client::ClientTls;
use crate::cluster::ring::{Ring, RingMember};
use crate::cluster::{Controlled, Decision, Lifecycle, Membership, StepError};
use crate::config::{ControllerSection, Failover};
use crate::metrics;
use crate::point::Store;
use crate::proto::controller::StatusRequest;
use crate::replication::{InSyncBounds, Progress};
use crate::service::{Handle, Service, Spawner};

/// What the agent needs.
pub struct Params {
    /// The `[controller]` section.
    pub section: ControllerSection,
    /// This node's name.
    pub local: String,
    /// `cluster.name`.
    pub cluster: String,
    /// The controller's files (`<data_dir>/controller`).
    pub dir: std::path::PathBuf,
    /// This node's client identity, for the other voters.
    pub tls: Option<ClientTls>,
    /// How long a ring must be formed before a voter imports it (a few gossip rounds, for the
    /// rings of an upgraded cluster to merge first).
    pub settle: Duration,
    /// The store, whose highest epoch an import starts above (`None` on a balancer).
    pub store: Option<Store>,
    /// Whether this node is a primary (only primaries run a Raft node: voters are primaries).
    pub primary: bool,
    /// What this node's followers confirmed (`None` on a balancer): as the leader of a group,
    /// the agent keeps the group's in-sync set from it.
    pub progress: Option<Arc<Progress>>,
    /// The bounds of the in-sync set (`[replication]`).
    pub in_sync: InSyncBounds,
    /// This member's session with the controller, which its heartbeats extend.
    pub lease: Arc<Lease>,
    /// What this member holds of its group's points, said in each heartbeat.
    pub held: Arc<Held>,
    /// How a group this node leads may fail over (`Config::failover`), reported to the
    /// controller.
    pub failover: Failover,
    /// Whether this member's store was not stopped cleanly before this start
    /// (`Store::stopped_cleanly`): it leaves every in-sync set before its first session.
    pub unclean: bool,
    /// `replication.ack`: whether this node's writes wait for followers.
    pub ack: crate::config::Ack,
}

/// The agent's ends of its links (made before the membership loop and the API start).
pub struct Links {
    committed: watch::Sender<Option<Arc<Ring>>>,
    decisions: mpsc::Receiver<(Decision, oneshot::Sender<Result<(), StepError>>)>,
    started: watch::Sender<Option<Controller>>,
    followed: Arc<Mutex<Option<Status>>>,
    topology: watch::Sender<Arc<Topology>>,
}

/// The links of the agent: its own ends, the membership loop's, and the observer the API
/// reads the controller's status from.
pub fn links() -> (Links, Controlled, Observer) {
    let (committed, committed_rx) = watch::channel(None);
    let (decisions_tx, decisions) = mpsc::channel(16);
    let (started, controller) = watch::channel(None);
    let followed = Arc::new(Mutex::new(None));
    let (topology, topology_rx) = watch::channel(Arc::new(Topology::default()));
    (
        Links {
            committed,
            decisions,
            started,
            followed: followed.clone(),
            topology,
        },
        Controlled {
            committed: committed_rx,
            decisions: decisions_tx,
        },
        Observer {
            controller,
            followed,
            topology: topology_rx,
        },
    )
}

/// The controller as this node sees it; cheap to clone.
#[derive(Clone)]
pub struct Observer {
    controller: watch::Receiver<Option<Controller>>,
    followed: Arc<Mutex<Option<Status>>>,
    topology: watch::Receiver<Arc<Topology>>,
}

impl Observer {
    /// This primary's controller, once started (`None` on other members).
    pub fn controller(&self) -> watch::Receiver<Option<Controller>> {
        self.controller.clone()
    }

    /// Its own Raft node's status on a voter, the last status a voter sent on any other
    /// member; `None` before either is known.
    pub fn status(&self) -> Option<Status> {
        let own = self.controller.borrow().clone();
        if let Some(controller) = own.as_ref().filter(|c| c.is_voter()) {
            return Some(controller.status());
        }
        let followed = self.followed.lock().expect("poisoned").clone();
        followed.or_else(|| own.map(|controller| controller.status()))
    }

    /// The newest committed state this node knows (empty before it knows one).
    pub fn topology(&self) -> Arc<Topology> {
        self.topology.borrow().clone()
    }

    /// [`Observer::topology`] as it changes.
    pub fn watch_topology(&self) -> watch::Receiver<Arc<Topology>> {
        self.topology.clone()
    }
}

/// The running agent.
pub struct Agent {
    observer: Observer,
    handle: Handle,
}

impl Agent {
    /// Resolves when the agent ends: `Ok` on shutdown, the failure if a task failed.
    pub fn terminated(
        &self,
    ) -> impl std::future::Future<Output = Result<(), crate::service::Failed>> + Send + 'static
    {
        self.handle.terminated()
    }

    /// Stops the agent, then this voter's Raft node.
    pub async fn shutdown(self) -> Result<(), crate::service::Failed> {
        let stopped = self.handle.shutdown().await;
        let controller = self.observer.controller.borrow().clone();
        if let Some(controller) = controller {
            controller.shutdown().await;
        }
        stopped
    }
}

/// Starts the agent. On a primary whose controller's formation is known now (voters named, or
/// the founders of a ring formed already: a lone node's, a restarted node's) the Raft node
/// starts before this returns, so that a bad controller directory stops the start.
pub async fn start(
    params: Params,
    links: Links,
    membership: watch::Receiver<Arc<Membership>>,
    token: CancellationToken,
) -> Result<Agent, StartError> {
    // A lone node, or a node restarting on its ring, knows its founders already.
    let formation = params.section.voters(founders(&membership.borrow().ring));
    let early = match &formation {
        Some(formation) if params.primary => {
            Some(start_raft(&params, formation.clone(), membership.clone()).await?)
        }
        _ => None,
    };
    links.started.send_replace(early);
    let observer = Observer {
        controller: links.started.subscribe(),
        followed: links.followed.clone(),
        topology: links.topology.subscribe(),
    };
    let service = Service::new("controller", token);
    let running = Running {
        params,
        membership,
        committed: links.committed,
        decisions: links.decisions,
        started: links.started,
        followed: links.followed,
        topology: links.topology,
        spawner: service.spawner(),
        stop: service.token().clone(),
    };
    service.spawn("agent", running.run(formation));
    Ok(Agent {
        observer,
        handle: service.handle(),
    })
}

/// The founders of `ring`, once formed.
fn founders(ring: &Ring) -> Option<&std::collections::BTreeSet<String>> {
    ring.is_formed().then_some(&ring.founders)
}

async fn start_raft(
    params: &Params,
    formation: Vec<String>,
    membership: watch::Receiver<Arc<Membership>>,
) -> Result<Controller, StartError> {
    Controller::start(
        &params.section,
        &params.local,
        &params.cluster,
        formation,
        &params.dir,
        membership,
        params.tls.clone(),
    )
    .await
}

/// How this member has decisions made: through its own Raft node while it is a voter, else
/// through the voters.
#[derive(Clone)]
struct Decider {
    /// This primary's Raft node (`None` on followers and balancers).
    own: Option<Controller>,
    /// The voters, and how to reach them.
    peers: Arc<Peers>,
    /// How long a proposal through the voters may take.
    within: Duration,
}

impl Decider {
    /// This node's controller, while it is a voter.
    fn voter(&self) -> Option<&Controller> {
        self.own.as_ref().filter(|controller| controller.is_voter())
    }

    async fn propose(&self, command: Command) -> Result<Applied, ProposeError> {
        if let Some(controller) = self.voter() {
            return controller.propose(command).await;
        }
        let (within, peers, command) = (self.within, &*self.peers, &command);
        let asked = through_voters(peers, |voter| async move {
            peers.propose(&voter, command).await
        });
        Ok(tokio::time::timeout(within, asked).await.map_err(|_| {
            ProposeError::NoQuorum(format!("no voter committed it within {within:?}"))
        })??)
    }

    async fn set_voters(&self, voters: Vec<String>) -> Result<Vec<String>, VotersError> {
        if let Some(controller) = self.voter() {
            return controller.set_voters(voters).await;
        }
        let (within, peers, voters) = (4 * self.within, &*self.peers, &voters);
        let asked = through_voters(peers, |voter| async move {
            peers.set_voters(&voter, voters).await
        });
        tokio::time::timeout(within, asked)
            .await
            .map_err(|_| VotersError::NoQuorum(format!("no voter answered within {within:?}")))?
    }
}

/// For a member whose store was not stopped cleanly: has `Command::Unclean` committed before it
/// takes its first session (until `stop`), so that no election names it while a copy it
/// confirmed may have lost its tail. Proposed whether or not its view shows it in a set (the
/// view may be behind); again every 200 ms while the controller cannot decide (before the ring
/// is formed, or without a quorum).
async fn leave_in_sync_sets(decider: Decider, member: String, stop: CancellationToken) {
    let command = Command::Unclean {
        member: member.clone(),
    };
    let pause = Duration::from_millis(200);
    loop {
        let proposed = tokio::select! {
            _ = stop.cancelled() => return,
            proposed = decider.propose(command.clone()) => proposed,
        };
        match proposed {
            Ok(applied) => {
                if let Applied::Changed { epoch } = applied {
                    tracing::warn!(
                        epoch,
                        "controller: this member's store was not stopped cleanly: it left every in-sync set, and enters again once caught up"
                    );
                }
                return;
            }
            Err(error) => {
                tracing::info!(%error, "controller: waiting to leave the in-sync sets before the first session (the store was not stopped cleanly)");
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
        }
    }
}

/// Asks the voters, one after the other, until one answers (a voter forwards a proposal or a
/// change of voters to its leader); returns its answer.
async fn through_voters<T, F, Fut>(peers: &Peers, mut ask: F) -> T
where
    F: FnMut(String) -> Fut,
    Fut: std::future::Future<Output = Result<T, super::network::CallError>>,
{
    loop {
        for voter in peers.voters() {
            match ask(voter.clone()).await {
                Ok(answer) => return answer,
                Err(error) => tracing::debug!(%voter, %error, "controller: a voter did not answer"),
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The agent's loop and what it holds.
struct Running {
    params: Params,
    membership: watch::Receiver<Arc<Membership>>,
    committed: watch::Sender<Option<Arc<Ring>>>,
    decisions: mpsc::Receiver<(Decision, oneshot::Sender<Result<(), StepError>>)>,
    started: watch::Sender<Option<Controller>>,
    followed: Arc<Mutex<Option<Status>>>,
    /// Where the committed state this member knows is published.
    topology: watch::Sender<Arc<Topology>>,
    spawner: Spawner,
    stop: CancellationToken,
}

/// How often the agent looks again at what it should propose (a proposal that failed is made
/// again then).
const RETRY: Duration = Duration::from_millis(250);

impl Running {
    async fn run(mut self, formation: Option<Vec<String>>) {
        let formation = match formation {
            Some(formation) => formation,
            None => match self.founders().await {
                Some(formation) => formation,
                None => return,
            },
        };
        let Some((decider, mut topology)) = self.decider(formation).await else {
            return;
        };
        let mut formed_since: Option<Instant> = None;
        let own = Arc::new(Own {
            store: self.params.store.clone(),
            progress: self.params.progress.clone(),
            highest: tokio::sync::OnceCell::new(),
        });
        let mut proposing: Option<tokio::task::JoinHandle<()>> = None;
        let mut ticks = tokio::time::interval(RETRY);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.stop.cancelled() => break,
                changed = topology.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let ring = &topology.borrow_and_update().ring;
                    if ring.is_formed() {
                        let ring = Arc::new(ring.clone());
                        self.committed.send_if_modified(|current| {
                            let new = current.as_deref() != Some(&*ring);
                            *current = Some(ring);
                            new
                        });
                    }
                }
                changed = self.membership.changed() => if changed.is_err() { break },
                Some((decision, reply)) = self.decisions.recv() => {
                    let asked = Asked {
                        decider: decider.clone(),
                        local: self.params.local.clone(),
                        membership: self.membership.clone(),
                        topology: topology.clone(),
                        within: Duration::from_millis(self.params.section.propose_timeout_ms),
                    };
                    self.spawner.spawn("decision", async move {
                        let _ = reply.send(asked.decide(decision).await);
                    });
                }
                _ = ticks.tick() => {}
            }
            let now = Instant::now();
            self.follow_group(&topology.borrow(), now);
            if proposing.as_ref().is_some_and(|task| !task.is_finished()) {
                continue;
            }
            let wanted = {
                let topology = topology.borrow();
                let membership = self.membership.borrow();
                self.wanted(&topology, &membership, &decider, &mut formed_since, now)
                    .or_else(|| self.failover_wanted(&topology))
                    .or_else(|| self.in_sync_wanted(&topology, now))
            };
            if let Some(command) = wanted {
                let decider = decider.clone();
                let own = own.clone();
                proposing = Some(tokio::spawn(propose_own(decider, command, own)));
            }
        }
        if let Some(task) = proposing {
            task.abort();
        }
    }

    /// Waits for the ring's founders (a cluster with no voters named); answers the steps asked
    /// meanwhile that nothing decides yet.
    async fn founders(&mut self) -> Option<Vec<String>> {
        loop {
            {
                let membership = self.membership.borrow_and_update();
                if let Some(voters) = self.params.section.voters(founders(&membership.ring)) {
                    tracing::info!(?voters, "controller: the ring's founders are its voters");
                    return Some(voters);
                }
            }
            tokio::select! {
                _ = self.stop.cancelled() => return None,
                changed = self.membership.changed() => changed.ok()?,
                Some((_, reply)) = self.decisions.recv() => {
                    let _ = reply.send(Err(StepError::NoQuorum(
                        "no controller yet: the ring is not formed".into(),
                    )));
                }
            }
        }
    }

    /// This member's way to decisions, and the committed state it sees: the newer of what its
    /// own Raft node applied (a primary's) and what a voter sends it (while it is no voter).
    async fn decider(
        &mut self,
        formation: Vec<String>,
    ) -> Option<(Decider, watch::Receiver<Arc<Topology>>)> {
        let params = &self.params;
        let own = if params.primary {
            let started = self.started.borrow().clone();
            Some(match started {
                Some(controller) => controller,
                None => {
                    match start_raft(params, formation.clone(), self.membership.clone()).await {
                        Ok(controller) => {
                            self.started.send_replace(Some(controller.clone()));
                            controller
                        }
                        Err(error) => {
                            tracing::error!(%error, "controller: cannot start this primary's Raft node");
                            return None;
                        }
                    }
                }
            })
        } else {
            None
        };
        let peers = match &own {
            Some(controller) => controller.peers.clone(),
            None => Arc::new(Peers::new(
                params.local.clone(),
                params.cluster.clone(),
                formation,
                self.membership.clone(),
                params.tls.clone(),
            )),
        };
        let (publish, topology) = (self.topology.clone(), self.topology.subscribe());
        if let Some(controller) = &own {
            let (applied, publish) = (controller.topology(), publish.clone());
            self.spawner
                .spawn("applied", keep_newer(applied, publish, self.stop.clone()));
        }
        self.spawner.spawn(
            "follow",
            follow(
                peers.clone(),
                own.clone(),
                publish,
                self.followed.clone(),
                self.stop.clone(),
            ),
        );
        let within = Duration::from_millis(params.section.propose_timeout_ms);
        let decider = Decider {
            own: own.clone(),
            peers: peers.clone(),
            within,
        };
        let session = Duration::from_millis(params.section.session_ms);
        let keep_session = heartbeat::keep_session(
            own.clone(),
            peers,
            (
                params.lease.clone(),
                params.held.clone(),
                self.topology.subscribe(),
            ),
            session,
            self.stop.clone(),
        );
        let unclean = params.unclean.then(|| {
            let (decider, stop) = (decider.clone(), self.stop.clone());
            leave_in_sync_sets(decider, params.local.clone(), stop)
        });
        self.spawner.spawn("session", async move {
            if let Some(leave) = unclean {
                leave.await;
            }
            keep_session.await;
        });
        if let Some(controller) = &own {
            let (controller, stop) = (controller.clone(), self.stop.clone());
            let every = session / HEARTBEATS_PER_SESSION;
            self.spawner
                .spawn("fence", fence_expired(controller, every, stop));
        }
        Some((decider, topology))
    }

    /// The group this node leads, with its slot, if any (its own slot, or the one a failover
    /// named it leader of).
    fn led<'t>(&self, topology: &'t Topology) -> Option<(&'t str, &'t Group)> {
        topology.led_by(&self.params.local).next()
    }

    /// Keeps who this node's writes wait for in step with the committed state, once it knows
    /// one (`replication::Progress::follow_group`).
    fn follow_group(&self, topology: &Topology, now: Instant) {
        let Some(progress) = &self.params.progress else {
            return;
        };
        if topology.applied > 0 {
            let led = self.led(topology).map(|(_, group)| group);
            if progress.follow_group(led, &self.params.in_sync, now.into_std()) {
                self.commit_acknowledged(progress, topology);
            }
            let in_sync = led.map_or(0, |group| group.in_sync.len());
            ::metrics::gauge!(metrics::IN_SYNC_FOLLOWERS).set(in_sync as f64);
            let under = led.is_some_and(|group| group.in_sync.len() < group.followers.len());
            ::metrics::gauge!(metrics::UNDER_REPLICATED_GROUPS).set(f64::from(u8::from(under)));
        }
    }

    /// Once who a write waits for changed (a member left the in-sync set): commits every point
    /// as far as what the followers confirmed now acknowledges it (a write refused while it
    /// waited for the member that left is served now). Rare: it looks at every point.
    fn commit_acknowledged(&self, progress: &Progress, topology: &Topology) {
        let Some(store) = &self.params.store else {
            return;
        };
        crate::replication::commit_acknowledged(
            (store, progress),
            (&self.params.ack, &self.params.local, topology),
            &store.list("", None, usize::MAX),
        );
    }

    /// As the leader of a group: its report of how the group may fail over, if the controller
    /// holds another.
    /// (A follower named leader keeps what the group's primary reported.)
    fn failover_wanted(&self, topology: &Topology) -> Option<Command> {
        let (slot, group) = self.led(topology)?;
        let own = slot == self.params.local;
        (own && group.failover != self.params.failover).then(|| Command::Failover {
            slot: self.params.local.clone(),
            leader_epoch: group.leader_epoch,
            failover: self.params.failover.clone(),
        })
    }

    /// As the leader of a group: the change of its group that what the followers confirmed
    /// asks for, if any (`replication::Progress::in_sync_wanted`).
    fn in_sync_wanted(&self, topology: &Topology, now: Instant) -> Option<Command> {
        let progress = self.params.progress.as_ref()?;
        // Back from an unclean stop, its set stays for the controller to name one of it.
        let (slot, group) = self.led(topology).filter(|(_, g)| !g.leader_unclean)?;
        progress.in_sync_wanted(slot, group, &self.params.in_sync, now.into_std())
    }

    /// What this member's own state asks the controller for, if anything.
    fn wanted(
        &self,
        topology: &Topology,
        membership: &Membership,
        decider: &Decider,
        formed_since: &mut Option<Instant>,
        now: Instant,
    ) -> Option<Command> {
        let local = &self.params.local;
        if !topology.ring.is_formed() {
            // A voter imports the ring gossip formed (or an older version kept): once it has
            // been formed for the settle period, so that the rings of an upgraded cluster
            // merged first. The first import committed wins; later ones are refused.
            if decider.voter().is_none() || !membership.ring.is_formed() {
                *formed_since = None;
                return None;
            }
            let since = *formed_since.get_or_insert(now);
            if now.duration_since(since) < self.params.settle {
                return None;
            }
            return Some(Command::Import {
                ring: membership.ring.clone(),
                max_epoch: 0,
            });
        }
        let me = membership.live(local)?;
        if me.role.is_primary() {
            match topology.ring.members.get(local) {
                None => {
                    return Some(Command::Join {
                        name: local.clone(),
                        record: RingMember {
                            lifecycle: Lifecycle::Joining,
                            role: me.role,
                            rpc_addr: me.rpc_addr.clone(),
                            replication_addr: me.replication_addr.clone(),
                            virtual_nodes: me.virtual_nodes,
                            tags: me.tags.clone(),
                            version: 0,
                        },
                    });
                }
                Some(record)
                    if record.lifecycle != Lifecycle::Forgotten
                        && (record.rpc_addr != me.rpc_addr
                            || record.replication_addr != me.replication_addr) =>
                {
                    return Some(Command::Addresses {
                        name: local.clone(),
                        rpc_addr: me.rpc_addr.clone(),
                        replication_addr: me.replication_addr.clone(),
                    });
                }
                Some(_) => {}
            }
        }
        if topology.handed.get(local) != me.handed.as_ref() {
            return Some(Command::Announce {
                name: local.clone(),
                handed: me.handed.clone(),
            });
        }
        // The leader it copies from is a slot's primary; after a failover or a transfer, the
        // leader the controller named for its group (or nobody, while it leads the group).
        if let Some(leader) = me
            .leader
            .as_ref()
            .filter(|l| topology.groups.contains_key(*l))
        {
            let copies = topology
                .groups
                .get(leader)
                .is_some_and(|group| group.followers.contains(local))
                || topology
                    .followed_by(local)
                    .is_some_and(|(_, group)| group.leader == *leader);
            if !copies && !topology.ring.members.contains_key(local) {
                return Some(Command::Follow {
                    follower: local.clone(),
                    slot: leader.clone(),
                });
            }
        }
        None
    }
}

/// Proposes what this member's own state asks for; a failure is logged, and the agent asks
/// again at its next look.
async fn propose_own(decider: Decider, mut command: Command, own: Arc<Own>) {
    match &mut command {
        Command::Import { max_epoch, .. } => *max_epoch = own.highest_epoch().await,
        Command::InSync { follower, .. } => {
            if let Some(missing) = own.missing(follower).await {
                tracing::debug!(%follower, %missing, "controller: not proposed in sync yet");
                return;
            }
        }
        _ => {}
    }
    match decider.propose(command.clone()).await {
        Ok(Applied::Changed { epoch }) => match &command {
            Command::InSync { follower, .. } => {
                tracing::info!(%follower, epoch, "controller: the follower entered this leader's in-sync set");
                ::metrics::counter!(metrics::IN_SYNC_CHANGES, "change" => "entered").increment(1);
            }
            Command::OutOfSync {
                follower, reason, ..
            } => {
                tracing::warn!(%follower, %reason, epoch, "controller: the follower left this leader's in-sync set");
                ::metrics::counter!(metrics::IN_SYNC_CHANGES, "change" => "left").increment(1);
            }
            _ => {}
        },
        Ok(Applied::Unchanged) => {}
        Err(ProposeError::Refused(refused)) => {
            tracing::debug!(?command, %refused, "controller: refused");
        }
        Err(error) => tracing::warn!(?command, %error, "controller: not decided yet"),
    }
}

/// What the proposals of this member's own state read from its store before they are made.
struct Own {
    store: Option<Store>,
    progress: Option<Arc<Progress>>,
    /// The highest epoch a point in the store holds (an import's epochs start above it),
    /// found once however often the import is retried.
    highest: tokio::sync::OnceCell<u64>,
}

impl Own {
    async fn highest_epoch(&self) -> u64 {
        let walk = || async {
            let Some(store) = &self.store else { return 0 };
            let summaries = store.summaries().await;
            let epochs = summaries.iter().map(|summary| summary.ownership.epoch);
            epochs.fold(crate::point::ownership::FIRST_EPOCH, u64::max)
        };
        *self.highest.get_or_init(walk).await
    }

    /// The first point whose end, read now, `follower` has not confirmed, in words; `None` if
    /// it holds every end. Read after the leader started waiting for the follower, so that it
    /// holds every byte acknowledged before then.
    async fn missing(&self, follower: &str) -> Option<String> {
        let (Some(store), Some(progress)) = (&self.store, &self.progress) else {
            return Some("this node keeps no points".into());
        };
        let ends = store.ends().await;
        progress
            .missing(follower, &ends)
            .map(|(point, end, has)| format!("point {point}: {has} of {end} bytes confirmed"))
    }
}

/// What deciding a step [`cluster::Steps`] asked for needs.
struct Asked {
    decider: Decider,
    local: String,
    membership: watch::Receiver<Arc<Membership>>,
    topology: watch::Receiver<Arc<Topology>>,
    within: Duration,
}

impl Asked {
    /// Decides `decision`. Asked before the controller imported the ring this node formed (a
    /// step asked in the first moments of a cluster), it waits for the import first.
    async fn decide(mut self, decision: Decision) -> Result<(), StepError> {
        let command = match decision {
            Decision::Lifecycle(Lifecycle::Leaving) => Command::Drain {
                name: self.local.clone(),
            },
            Decision::Lifecycle(to) => Command::Step {
                name: self.local.clone(),
                to,
            },
            Decision::Forget(name) => {
                // Liveness is the proposer's check (gossip is a hint); the state machine uses
                // none.
                if name == self.local || self.membership.borrow().live(&name).is_some() {
                    return Err(StepError::Live(name));
                }
                let waits = {
                    let membership = self.membership.borrow();
                    let live = |member: &str| membership.live(member).is_some();
                    election::fails_over_by_itself(&self.topology.borrow(), &name, live)
                };
                if let Some(why) = waits {
                    return Err(StepError::Refused(why));
                }
                Command::Forget { name }
            }
            Decision::Transfer {
                slot,
                leader_epoch,
                to,
            } => Command::Transfer {
                slot,
                leader_epoch,
                to,
            },
            Decision::ElectUnclean { slot, to } => {
                // Liveness is the proposer's check, as for a forget.
                let refused = {
                    let (membership, topology) = (self.membership.borrow(), self.topology.borrow());
                    let live = |member: &str| membership.live(member).is_some();
                    election::elect_unclean_refused(&topology, &slot, &to, live)
                };
                if let Some(why) = refused {
                    return Err(StepError::Refused(why));
                }
                Command::ElectUnclean { slot, to }
            }
            Decision::Voters(voters) => {
                return match self.decider.set_voters(voters).await {
                    Ok(_) => Ok(()),
                    Err(VotersError::Refused(why)) => Err(StepError::Refused(why)),
                    Err(error @ VotersError::NoQuorum(_)) => {
                        Err(StepError::NoQuorum(error.to_string()))
                    }
                    Err(_) => Err(StepError::Stopped),
                };
            }
        };
        let mut outcome = self.decider.propose(command.clone()).await;
        if matches!(outcome, Err(ProposeError::Refused(Rejected::NotFormed)))
            && self.membership.borrow().ring.is_formed()
        {
            let imported = self.topology.wait_for(|t| t.ring.is_formed());
            if tokio::time::timeout(self.within, imported).await.is_ok() {
                outcome = self.decider.propose(command).await;
            }
        }
        match outcome {
            Ok(_) => Ok(()),
            Err(ProposeError::Refused(Rejected::Unknown(name))) => Err(StepError::Unknown(name)),
            Err(ProposeError::Refused(refused)) => Err(StepError::Refused(refused.to_string())),
            Err(error @ ProposeError::NoQuorum(_)) => Err(StepError::NoQuorum(error.to_string())),
            Err(_) => Err(StepError::Stopped),
        }
    }
}

/// On a voter, while it leads the controller: fences each group leader whose session expired,
/// naming a member of its in-sync set in its place (`election::fences`), every `every`.
async fn fence_expired(controller: Controller, every: Duration, stop: CancellationToken) {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut reported = std::collections::BTreeSet::new();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let Some(Due { fences, stranded }) = controller.fences_due() else {
            continue;
        };
        for (slot, leader, cause) in stranded {
            if !reported.insert((slot.clone(), leader.clone())) {
                continue;
            }
            match cause {
                Cause::Expired => {
                    tracing::error!(%slot, %leader, "controller: the leader's session expired and no member of its in-sync set is alive: the slot takes no writes until one is (or an operator names another follower: goutube members elect SLOT --to M --unclean, which may lose acknowledged writes)")
                }
                Cause::Unclean => {
                    tracing::error!(%slot, %leader, "controller: the leader came back from a stop that was not clean and no member of its in-sync set is alive: the slot takes no writes until one is (or an operator keeps the leader: goutube members elect SLOT --to LEADER --unclean, which may lose acknowledged writes)")
                }
            }
        }
        for (fence, cause) in fences {
            let started = Instant::now();
            match controller.propose(fence.clone()).await {
                Ok(Applied::Changed { epoch }) => {
                    let why = match cause {
                        Cause::Expired => "its session expired",
                        Cause::Unclean => "it came back from a stop that was not clean",
                    };
                    tracing::warn!(
                        ?fence,
                        epoch,
                        "controller: fenced a leader ({why}) and named another from its in-sync set"
                    );
                    ::metrics::counter!(metrics::FAILOVERS, "cause" => cause.as_str()).increment(1);
                    ::metrics::histogram!(metrics::FAILOVER_SECONDS)
                        .record(started.elapsed().as_secs_f64());
                    reported.clear();
                }
                Ok(Applied::Unchanged) => {}
                Err(error) => tracing::warn!(?fence, %error, "controller: a fence was not decided"),
            }
        }
    }
}

/// Publishes `topology` in `publish` if it is newer (applied further) than the one there.
fn publish_newer(publish: &watch::Sender<Arc<Topology>>, topology: Arc<Topology>) {
    publish.send_if_modified(|current| {
        let newer = topology.applied > current.applied;
        if newer {
            *current = topology;
        }
        newer
    });
}

/// Publishes in `publish` each state this primary's own Raft node applies that is newer than
/// the one published.
async fn keep_newer(
    mut applied: watch::Receiver<Arc<Topology>>,
    publish: watch::Sender<Arc<Topology>>,
    stop: CancellationToken,
) {
    loop {
        publish_newer(&publish, applied.borrow_and_update().clone());
        tokio::select! {
            _ = stop.cancelled() => return,
            changed = applied.changed() => if changed.is_err() { return },
        }
    }
}

/// Follows the committed state of the voters, one at a time, keeping only what is newer than
/// what this member holds: a voter that lags is never a step back. Not while this node is a
/// voter itself (`own`): its Raft node applies the committed state.
async fn follow(
    peers: Arc<Peers>,
    own: Option<Controller>,
    publish: watch::Sender<Arc<Topology>>,
    followed: Arc<Mutex<Option<Status>>>,
    stop: CancellationToken,
) {
    loop {
        for voter in peers.voters() {
            if own.as_ref().is_some_and(Controller::is_voter) {
                break;
            }
            if voter == peers.local {
                continue;
            }
            // A voter sends the state at least every `WATCH_REFRESH`: silence for three of them
            // is a voter that stopped (or a connection that did): try another.
            let silence = 3 * super::service::WATCH_REFRESH;
            let Ok(mut client) = peers.client(&voter) else {
                continue;
            };
            let watched = tokio::time::timeout(silence, client.watch(StatusRequest {})).await;
            let Ok(Ok(stream)) = watched else { continue };
            let mut stream = stream.into_inner();
            loop {
                let update = tokio::select! {
                    _ = stop.cancelled() => return,
                    update = tokio::time::timeout(silence, stream.message()) => update,
                };
                let Ok(Ok(Some(update))) = update else {
                    tracing::debug!(%voter, "controller: the voter's state stream ended or went silent; following another");
                    break;
                };
                let Ok(topology) = serde_json::from_slice::<Topology>(&update.topology) else {
                    tracing::warn!(%voter, "controller: an undecodable state; trying another voter");
                    break;
                };
                peers.learn_voters(update.voters.clone());
                *followed.lock().expect("poisoned") = Some(Status {
                    voters: update.voters,
                    leader: Some(update.leader).filter(|leader| !leader.is_empty()),
                    term: update.term,
                    applied: update.applied,
                    ring_epoch: topology.ring_epoch,
                });
                publish_newer(&publish, Arc::new(topology));
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(RETRY) => {}
        }
    }
}
