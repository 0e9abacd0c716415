//! A running node: the composition root. [`Node::start`] takes listeners the caller has already
//! bound (port 0 in tests), opens the store, loads the plugins, joins the cluster, and starts the
//! subsystems in order; [`Node::shutdown`] stops them in reverse.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::access::Access;
use crate::api::{self, Context};
use crate::balancer::BalancerService;
use crate::client::{ClientTls, Pool};
use crate::cluster::{self, Cluster, Membership, gossip};
use crate::config::{Config, Role};
use crate::controller::agent::{self, Agent};
use crate::controller::{Controller, ControllerService, Held, Lease};
use crate::http::gateway::Gateway;
use crate::http::pages::Catalog;
use crate::placement::Placement;
use crate::plugins::{PluginError, Plugins};
use crate::point::{StorageError, Store};
use crate::replication::{self, InSyncBounds, Progress};
use crate::reshard::Gate;
use crate::service::{Failed, Handle};
use crate::services::{Lifetime, Services};
use crate::signed_url::UrlSigner;

/// The sockets a node serves on, bound before it starts.
pub struct Listeners {
    /// The gRPC API.
    pub rpc: TcpListener,
    /// Replication (Cap'n Proto RPC).
    pub replication: TcpListener,
    /// `/metrics`.
    pub metrics: TcpListener,
    /// The HTTP range gateway.
    pub http: TcpListener,
    /// Gossip (UDP) on `bind_addr`.
    pub gossip: std::net::UdpSocket,
}

impl Listeners {
    /// Binds the ports `config` names on the interface of `bind_addr`.
    pub async fn bind(config: &Config) -> Result<Self, StartError> {
        let bind = |port: u16, key: &'static str| async move {
            let addr = config.listen_addr(port);
            TcpListener::bind(addr)
                .await
                .map_err(|source| StartError::Bind { key, addr, source })
        };
        let gossip =
            std::net::UdpSocket::bind(config.bind_addr).map_err(|source| StartError::Bind {
                key: "bind_addr",
                addr: config.bind_addr,
                source,
            })?;
        Ok(Self {
            rpc: bind(config.rpc_port, "rpc_port").await?,
            replication: bind(config.replication_port, "replication_port").await?,
            metrics: bind(config.metrics_port, "metrics_port").await?,
            http: bind(config.http_port, "http_port").await?,
            gossip,
        })
    }

    /// Where each listener is bound.
    pub fn addresses(&self, config: &Config) -> std::io::Result<Addresses> {
        Ok(Addresses {
            node: config.node_name.clone(),
            role: config.role.as_str().into(),
            rpc: self.rpc.local_addr()?,
            replication: self.replication.local_addr()?,
            metrics: self.metrics.local_addr()?,
            http: self.http.local_addr()?,
            gossip: self.gossip.local_addr()?,
        })
    }
}

/// Where a node listens, as its `goutube listening …` line says (ports may have been 0).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Addresses {
    /// The node's name.
    pub node: String,
    /// Its role.
    pub role: String,
    /// The gRPC API.
    pub rpc: SocketAddr,
    /// Replication.
    pub replication: SocketAddr,
    /// `/metrics`.
    pub metrics: SocketAddr,
    /// The HTTP gateway.
    pub http: SocketAddr,
    /// Gossip (UDP).
    pub gossip: SocketAddr,
}

impl Addresses {
    /// The line `goutube run` prints on stdout once it listens: scripts and tests read it.
    pub fn listening_line(&self) -> String {
        format!(
            "goutube listening node={} role={} rpc={} replication={} metrics={} http={} gossip={}",
            self.node, self.role, self.rpc, self.replication, self.metrics, self.http, self.gossip
        )
    }

    /// The addresses in a listening line, if `line` is one.
    pub fn parse_listening_line(line: &str) -> Option<Addresses> {
        let fields = line.strip_prefix("goutube listening ")?;
        let field = |name: &str| {
            fields
                .split_whitespace()
                .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
        };
        Some(Addresses {
            node: field("node")?.into(),
            role: field("role")?.into(),
            rpc: field("rpc")?.parse().ok()?,
            replication: field("replication")?.parse().ok()?,
            metrics: field("metrics")?.parse().ok()?,
            http: field("http")?.parse().ok()?,
            gossip: field("gossip")?.parse().ok()?,
        })
    }
}

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A port could not be bound.
    #[error("cannot listen on {addr} (config key `{key}`)")]
    Bind {
        /// The config key that names the port.
        key: &'static str,
        /// The address.
        addr: SocketAddr,
        /// What the system said.
        #[source]
        source: std::io::Error,
    },
    /// The point store could not be opened (or recovered).
    #[error("cannot open the point store: {0}")]
    Store(#[from] StorageError),
    /// A plugin could not be loaded.
    #[error(transparent)]
    Plugin(#[from] PluginError),
    /// `[tls]` could not be read.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// The replication thread could not start.
    #[error(transparent)]
    Replication(#[from] crate::replication::ReplicationError),
    /// Membership could not start.
    #[error(transparent)]
    Cluster(#[from] crate::cluster::ClusterError),
    /// The controller could not start.
    #[error(transparent)]
    Controller(#[from] crate::controller::StartError),
    /// A configuration value is unusable.
    #[error(transparent)]
    Config(#[from] crate::config::key::InvalidKey),
    /// A bound listener has no address.
    #[error("listener address: {0}")]
    Io(#[from] std::io::Error),
}

/// Why a shutdown was not clean.
#[derive(Debug, thiserror::Error)]
pub enum ShutdownError {
    /// The store could not sync or close every point.
    #[error("closing the store: {0}")]
    Store(#[from] StorageError),
    /// A subsystem ended with a failure (a task panicked).
    #[error(transparent)]
    Failed(#[from] Failed),
}

/// A started node. Dropping it without [`shutdown`](Self::shutdown) leaves its tasks running
/// until the runtime ends.
pub struct Node {
    /// What every subsystem shares, and the node's one cancellation root.
    services: Services,
    /// What a storage node's handlers share; a balancer has none.
    context: Option<Arc<Context>>,
    cluster: Cluster,
    /// The controller's agent (and, on a voter, its Raft node).
    agent: Agent,
    api: Handle,
    gateway: Handle,
    metrics: Handle,
    replication: Option<Handle>,
    addresses: Addresses,
}

/// The TLS acceptors of the API (and metrics) and of the HTTP gateway, from `[tls]`.
struct Acceptors {
    api: Option<TlsAcceptor>,
    gateway: Option<TlsAcceptor>,
}

impl Acceptors {
    fn new(config: &Config) -> Result<Self, StartError> {
        let Some(section) = &config.tls else {
            return Ok(Self {
                api: None,
                gateway: None,
            });
        };
        Ok(Self {
            api: Some(TlsAcceptor::from(crate::tls::server_config(section)?)),
            gateway: Some(TlsAcceptor::from(crate::tls::gateway_server_config(
                section,
            )?)),
        })
    }
}

impl Node {
    /// Loads the plugins `config` names, then starts the node ([`Node::start_with`]).
    pub async fn start(config: Config, listeners: Listeners) -> Result<Node, StartError> {
        let plugins = load_plugins(&config).await?;
        Self::start_with(config, listeners, plugins).await
    }

    /// Starts the subsystems in order with `plugins` loaded already: store (storage nodes),
    /// access, membership and placement, replication (leaders and followers), the API (the
    /// storage service, or a balancer's forwarding one), the HTTP gateway, metrics. Every
    /// subsystem stops on a token of one [`Lifetime`].
    pub async fn start_with(
        config: Config,
        listeners: Listeners,
        plugins: Plugins,
    ) -> Result<Node, StartError> {
        // Before anything records a metric: what is recorded before the recorder exists is lost.
        crate::metrics::handle();
        let addresses = listeners.addresses(&config)?;
        let store = open_store(&config).await?;
        let tls = Acceptors::new(&config)?;
        let signer = Arc::new(url_signer(&config, &addresses)?);
        let lifetime = Lifetime::new();
        let (leader, following) = watch::channel(None);
        let (links, controlled, observer) = agent::links();
        let cluster = start_cluster(
            &config,
            &addresses,
            listeners.gossip,
            (following.clone(), controlled),
            lifetime.subsystem(),
        )
        .await?;
        let membership = cluster.membership();
        let services = Services::new(
            config,
            plugins,
            membership,
            signer,
            addresses.rpc,
            observer,
            lifetime,
        );
        let progress = Arc::new(Progress::default());
        let lease = Arc::new(Lease::default());
        let held = Arc::new(Held::default());
        let agent = start_agent(
            &services,
            store.clone(),
            (progress.clone(), lease.clone(), held.clone()),
            links,
            cluster.membership(),
        )
        .await?;
        // Only a primary may be a voter: the others call the voters, and serve no controller.
        let controller_service = services.config.role.is_primary().then(|| {
            let stop = services.lifetime.shutdown.clone();
            ControllerService::new(services.controller.controller(), tls.api.is_some(), stop)
                .server()
        });
        let ready = ring_formed(cluster.membership());
        let shutdown = services.lifetime.shutdown.clone();
        let max_frame = services.config.max_frame_size;
        let (context, replication, api, catalog) = match store {
            Some(store) => {
                let (context, replication) = start_storage(
                    &services,
                    store,
                    &cluster,
                    (progress, lease, held),
                    (leader, following),
                    listeners.replication,
                )?;
                let streaming = api::streaming::StreamingService::new(context.clone());
                // The pages ask the same service as the viewer (`http::pages`).
                let catalog: Arc<dyn Catalog> =
                    Arc::new(api::streaming::StreamingService::new(context.clone()));
                let handlers = api::Handlers {
                    streaming,
                    resolver: api::resolver::ResolverService::new(context.clone()),
                    controller: controller_service,
                };
                let api = api::start(
                    handlers,
                    max_frame,
                    listeners.rpc,
                    tls.api.clone(),
                    shutdown,
                    ready,
                );
                (Some(context), replication, api, catalog)
            }
            None => {
                let identity = balancer_identity(&services.config);
                let service = BalancerService::new(services.clone(), Pool::new(identity));
                let catalog: Arc<dyn Catalog> = Arc::new(service.clone());
                let handlers = api::Handlers {
                    streaming: service.clone(),
                    resolver: service,
                    controller: controller_service,
                };
                let api = api::start(
                    handlers,
                    max_frame,
                    listeners.rpc,
                    tls.api.clone(),
                    shutdown,
                    ready,
                );
                (None, None, api, catalog)
            }
        };
        let store = context.as_ref().map(|c| c.store.clone());
        let gateway = start_gateway(&services, store, catalog, listeners.http, tls.gateway)?;
        let metrics = crate::http::start_metrics(
            listeners.metrics,
            tls.api,
            &services.config.http,
            services.lifetime.subsystem(),
        )?;
        Ok(Node {
            services,
            context,
            cluster,
            agent,
            api,
            gateway,
            metrics,
            replication,
            addresses,
        })
    }

    /// Where the node listens.
    pub fn addresses(&self) -> &Addresses {
        &self.addresses
    }

    /// The gRPC API's address.
    pub fn rpc_addr(&self) -> SocketAddr {
        self.addresses.rpc
    }

    /// The metrics endpoint's address.
    pub fn metrics_addr(&self) -> SocketAddr {
        self.addresses.metrics
    }

    /// The replication port's address.
    pub fn replication_addr(&self) -> SocketAddr {
        self.addresses.replication
    }

    /// The HTTP gateway's address.
    pub fn http_addr(&self) -> SocketAddr {
        self.addresses.http
    }

    /// The gossip socket's address.
    pub fn gossip_addr(&self) -> SocketAddr {
        self.addresses.gossip
    }

    /// The node's points (a balancer has none).
    pub fn store(&self) -> Option<&Store> {
        self.context.as_ref().map(|context| &context.store)
    }

    /// The node's configuration.
    pub fn config(&self) -> &Config {
        &self.services.config
    }

    /// What every subsystem of this node shares.
    pub fn services(&self) -> &Services {
        &self.services
    }

    /// What a storage node's handlers share (a balancer has none).
    pub fn context(&self) -> Option<&Arc<Context>> {
        self.context.as_ref()
    }

    /// The one authorization door of this node.
    pub fn access(&self) -> &Arc<Access> {
        &self.services.access
    }

    /// Which member owns which point.
    pub fn placement(&self) -> &Arc<Placement> {
        &self.services.placement
    }

    /// The gate of a storage node (`None` on a balancer): who takes a write of a point, who
    /// serves a read.
    pub fn gate(&self) -> Option<&Arc<Gate>> {
        self.context.as_ref().map(|context| &context.gate)
    }

    /// The controller, on a voter once started.
    pub fn controller(&self) -> Option<Controller> {
        self.services.controller.controller().borrow().clone()
    }

    /// The controller as this node sees it (`None` before it knows).
    pub fn controller_status(&self) -> Option<crate::controller::Status> {
        self.services.controller.status()
    }

    /// The newest membership, always.
    pub fn membership(&self) -> watch::Receiver<Arc<Membership>> {
        self.cluster.membership()
    }

    /// Resolves if a subsystem ends on its own before shutdown (a task panicked, gossip broke),
    /// saying which and why: the node is no longer whole, and `goutube run` stops.
    pub fn ended(&self) -> impl std::future::Future<Output = String> + Send + 'static {
        let mut watched = vec![
            ("api", self.api.terminated().boxed()),
            ("gateway", self.gateway.terminated().boxed()),
            ("metrics", self.metrics.terminated().boxed()),
            ("membership", self.cluster.terminated().boxed()),
            ("controller", self.agent.terminated().boxed()),
        ];
        if let Some(replication) = &self.replication {
            watched.push(("replication", replication.terminated().boxed()));
        }
        let (names, futures): (Vec<_>, Vec<_>) = watched.into_iter().unzip();
        async move {
            let (outcome, index, _) = futures::future::select_all(futures).await;
            match outcome {
                Ok(()) => format!("the {} subsystem stopped on its own", names[index]),
                Err(failed) => failed.to_string(),
            }
        }
    }

    /// Applies the `[plugins]` section of `config` (SIGHUP). Open streams are not touched; calls
    /// after the reload use the new plugins. On failure the current plugins stay. The caches
    /// start a new generation after the swap, so no answer of the old plugins survives it.
    pub async fn reload(&self, config: &Config) -> Result<(), PluginError> {
        let (plugins, section) = (self.services.plugins.clone(), config.plugins.clone());
        // Off the async threads: loading runs each plugin's `configure` (see `plugins::runtime`).
        let generation = tokio::task::spawn_blocking(move || plugins.reload(&section))
            .await
            .expect("reloading plugins does not panic")?;
        let ttl = Duration::from_millis(config.plugins.decision_cache_ms);
        self.services.access.reset(generation, ttl);
        self.services.placement.reset(generation);
        tracing::info!(
            authorizer = %config.plugins.authorizer.source,
            bundler = %config.plugins.bundler.source,
            placement = %config.plugins.placement.source,
            "plugins reloaded"
        );
        Ok(())
    }

    /// Hands the groups it leads to in-sync followers (`api::transfer::before_stop`), then
    /// stops accepting, waits up to the grace period for open calls, cancels the rest, stops
    /// replication, syncs and closes every point, then leaves the live view (the node stays in
    /// the ring: a restart is not a departure).
    pub async fn shutdown(self) -> Result<(), ShutdownError> {
        let name = self.services.config.node_name.clone();
        tracing::info!(node = %name, "shutting down");
        if let Some(context) = &self.context {
            crate::api::transfer::before_stop(context).await;
        }
        self.services.lifetime.shutdown.cancel();
        let grace = Duration::from_millis(self.services.config.shutdown_grace_ms);
        let api = self.api.terminated();
        tokio::pin!(api);
        let mut outcome = match tokio::time::timeout(grace, &mut api).await {
            Ok(outcome) => outcome,
            Err(_) => {
                tracing::warn!("streams still open after the grace period; cancelling them");
                self.services.lifetime.abort.cancel();
                match tokio::time::timeout(Duration::from_secs(2), &mut api).await {
                    Ok(outcome) => outcome,
                    Err(_) => {
                        tracing::error!("the API server did not stop; leaving it to the runtime");
                        Ok(())
                    }
                }
            }
        };
        self.services.lifetime.abort.cancel();
        outcome = outcome.and(self.gateway.shutdown().await);
        outcome = outcome.and(self.metrics.shutdown().await);
        if let Some(replication) = self.replication {
            outcome = outcome.and(replication.shutdown().await);
        }
        let closed = match &self.context {
            Some(context) => context.store.close().await,
            None => Ok(()),
        };
        outcome = outcome.and(self.agent.shutdown().await);
        outcome = outcome.and(self.cluster.shutdown().await);
        tracing::info!(node = %name, "stopped");
        closed?;
        Ok(outcome?)
    }
}

/// Starts the controller's agent: on a voter (`controller.voters`, else the ring's founders: a
/// lone node is its own voter) its Raft node starts on the files in `<data_dir>/controller/`,
/// now if the voters are known, else once the ring is formed.
async fn start_agent(
    services: &Services,
    store: Option<Store>,
    (progress, lease, held): (Arc<Progress>, Arc<Lease>, Arc<Held>),
    links: agent::Links,
    membership: watch::Receiver<Arc<Membership>>,
) -> Result<Agent, StartError> {
    let config = &services.config;
    let settle = if config.seed_addresses.is_empty() && config.cluster.bootstrap_expect == 1 {
        Duration::ZERO
    } else {
        config.cluster.gossip_interval() * 3
    };
    let unclean = store.as_ref().is_some_and(|store| !store.stopped_cleanly());
    let params = agent::Params {
        section: config.controller.clone(),
        local: config.node_name.clone(),
        cluster: config.cluster.name.clone(),
        dir: config.controller_dir(),
        tls: balancer_identity(config),
        settle,
        progress: store.is_some().then_some(progress),
        store,
        primary: config.role.is_primary(),
        in_sync: InSyncBounds::of(&config.replication),
        lease,
        held,
        failover: config.failover(),
        unclean,
        ack: config.replication.ack,
    };
    Ok(agent::start(params, links, membership, services.lifetime.subsystem()).await?)
}

/// Resolves once `membership` holds a formed ring: the node knows who owns what, and can
/// serve (its health turns `SERVING`).
async fn ring_formed(mut membership: watch::Receiver<Arc<Membership>>) {
    let _ = membership
        .wait_for(|membership| !membership.ring.members.is_empty())
        .await;
}

/// The store of a storage node (`None` on a balancer, which stores nothing).
async fn open_store(config: &Config) -> Result<Option<Store>, StartError> {
    if config.role == Role::Balancer {
        return Ok(None);
    }
    let store = Store::open(config.store_config()).await?;
    tracing::info!(
        node = %config.node_name,
        role = config.role.as_str(),
        points = store.len(),
        data_dir = %config.data_dir.display(),
        "store opened"
    );
    Ok(Some(store))
}

/// Joins the cluster: gossip on `socket`, this node's record from `config` and `addresses`.
async fn start_cluster(
    config: &Config,
    addresses: &Addresses,
    socket: std::net::UdpSocket,
    (leader, controlled): (
        watch::Receiver<Option<cluster::Leader>>,
        cluster::Controlled,
    ),
    token: CancellationToken,
) -> Result<Cluster, StartError> {
    let key = config.cluster.gossip_key()?;
    if key.is_none() {
        tracing::warn!(
            gossip = %addresses.gossip,
            "gossip is unauthenticated (no cluster key): anyone who reaches this UDP port can \
             join the cluster; development only (set [tls] and cluster.key_file)"
        );
    }
    let params = cluster::Params {
        section: config.cluster.clone(),
        seeds: config.seed_addresses.clone(),
        dir: config.cluster_dir(),
        local: cluster::Local {
            name: config.node_name.clone(),
            role: config.role,
            rpc_addr: addresses.rpc,
            replication_addr: addresses.replication,
            http_addr: addresses.http,
            virtual_nodes: config.virtual_node_count,
            tags: config.tags.clone(),
        },
        leader,
        controller: Some(controlled),
    };
    let network = gossip::Network::Udp { socket, key };
    Ok(cluster::start(params, network, token).await?)
}

/// A storage node's replication (on its own thread) and the context its handlers share.
fn start_storage(
    services: &Services,
    store: Store,
    cluster: &Cluster,
    (progress, lease, held): (Arc<Progress>, Arc<Lease>, Arc<Held>),
    (leader, following): (
        watch::Sender<Option<cluster::Leader>>,
        watch::Receiver<Option<cluster::Leader>>,
    ),
    listener: TcpListener,
) -> Result<(Arc<Context>, Option<Handle>), StartError> {
    let replication = replication::start(
        replication::Context {
            services: services.clone(),
            store: store.clone(),
            progress: progress.clone(),
            leader,
            membership: cluster.membership(),
            steps: cluster.steps(),
            topology: services.controller.watch_topology(),
            seen_epoch: Default::default(),
            held,
            unclean_session: (!store.stopped_cleanly()).then(|| lease.clone()),
        },
        listener,
        services.lifetime.subsystem(),
    )?;
    let gate = Arc::new(Gate::new(
        &services.config,
        store.clone(),
        services.placement.clone(),
        following,
        (lease, services.controller.watch_topology()),
    ));
    let context = Arc::new(Context {
        services: services.clone(),
        store,
        progress,
        steps: cluster.steps(),
        gate,
    });
    Ok((context, replication))
}

/// The HTTP gateway, on the node's `store` (`None`: a balancer, which redirects every read).
fn start_gateway(
    services: &Services,
    store: Option<Store>,
    catalog: Arc<dyn Catalog>,
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
) -> Result<Handle, StartError> {
    let gateway = Gateway {
        services: services.clone(),
        store,
        chunk: services.config.max_chunk_size.min(crate::http::FRAME),
        tls: tls.is_some(),
        writing_window: Duration::from_millis(services.config.http.writing_window_ms),
        catalog,
    };
    let token = services.lifetime.shutdown.child_token();
    Ok(crate::http::start_gateway(gateway, listener, tls, token)?)
}

/// A balancer reaches the nodes with its own node certificate.
fn balancer_identity(config: &Config) -> Option<ClientTls> {
    config.tls.as_ref().map(|tls| {
        let peer = tls.peer.clone().unwrap_or_default();
        ClientTls {
            ca: peer.ca.unwrap_or_else(|| tls.ca.clone()),
            cert: peer.cert.unwrap_or_else(|| tls.cert.clone()),
            key: peer.key.unwrap_or_else(|| tls.key.clone()),
            server_name: None,
        }
    })
}

/// Loads (and compiles) the plugins `config` names, on the blocking pool: loading runs each
/// plugin's `configure`, which must not run on an async thread (see `plugins::runtime`).
pub async fn load_plugins(config: &Config) -> Result<Plugins, PluginError> {
    let (section, data_dir) = (config.plugins.clone(), config.data_dir.clone());
    tokio::task::spawn_blocking(move || Plugins::load(&section, &data_dir))
        .await
        .expect("loading plugins does not panic")
}

/// The signer of the gateway's URLs: `http.public_url` (default: the bound gateway address) and
/// the configured keys.
fn url_signer(config: &Config, addresses: &Addresses) -> Result<UrlSigner, StartError> {
    let scheme = if config.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let public_url = config
        .http
        .public_url
        .clone()
        .unwrap_or_else(|| format!("{scheme}://{}", addresses.http));
    let keys = config.http.url_key_bytes()?;
    Ok(UrlSigner::new(&keys, public_url, config.http.max_url_ttl()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listening_lines_round_trip() {
        let addresses = Addresses {
            node: "n-1".into(),
            role: "leader".into(),
            rpc: "127.0.0.1:1".parse().unwrap(),
            replication: "127.0.0.1:2".parse().unwrap(),
            metrics: "127.0.0.1:3".parse().unwrap(),
            http: "127.0.0.1:5".parse().unwrap(),
            gossip: "127.0.0.1:4".parse().unwrap(),
        };
        let line = addresses.listening_line();
        assert_eq!(Addresses::parse_listening_line(&line), Some(addresses));
        assert_eq!(
            Addresses::parse_listening_line("goutube listening rpc=x"),
            None
        );
        assert_eq!(Addresses::parse_listening_line("something else"), None);
    }
}
