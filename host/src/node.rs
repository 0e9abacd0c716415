//! A running node: its listeners, the state its services share, start-up and graceful shutdown.
//!
//! [`Node::start`] takes listeners the caller has already bound (port 0 in tests), opens the store,
//! and spawns the API and metrics servers. [`Node::shutdown`] stops accepting, lets open streams
//! finish for `shutdown_grace_ms`, cancels what is left, then syncs and closes every point.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::api;
use crate::api::proto;
use crate::authz::{Action, Authorizer};
use crate::config::{Ack, Config, PluginsSection, Role};
use crate::error::Error;
use crate::net::{self, PeerInfo};
use crate::placement::Placement;
use crate::plugins::{Member, PluginError, Plugins};
use crate::point::{PointId, StorageError, Store};
use crate::replication::{self, Progress, Replication};

/// The sockets a node serves on, bound before it starts.
pub struct Listeners {
    pub rpc: TcpListener,
    pub replication: TcpListener,
    pub metrics: TcpListener,
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
        Ok(Self {
            rpc: bind(config.rpc_port, "rpc_port").await?,
            replication: bind(config.replication_port, "replication_port").await?,
            metrics: bind(config.metrics_port, "metrics_port").await?,
        })
    }
}

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr} (config key `{key}`): {source}")]
    Bind {
        key: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open the point store: {0}")]
    Store(#[from] StorageError),
    #[error("{0}")]
    Plugin(#[from] PluginError),
    #[error("{0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("{0}")]
    Replication(#[from] crate::replication::ReplicationError),
    #[error("listener address: {0}")]
    Io(#[from] std::io::Error),
}

/// What the services of one node share.
pub struct NodeState {
    pub config: Arc<Config>,
    pub store: Store,
    /// The address clients reach this node's API at.
    pub rpc_addr: SocketAddr,
    /// Cancelled when shutdown starts: stop accepting, end `follow` streams.
    pub shutdown: CancellationToken,
    /// Cancelled when the grace period is over: end every remaining stream.
    pub abort: CancellationToken,
    pub plugins: Arc<Plugins>,
    pub authorizer: Arc<Authorizer>,
    pub placement: Arc<Placement>,
    /// What followers confirmed (empty unless this node is a leader).
    pub progress: Arc<Progress>,
}

impl NodeState {
    /// Whether `peer` may take `action` on `point`: from the decision cache, or by asking the
    /// authorizer plugin on the blocking pool (a plugin call may run up to its deadline).
    pub async fn authorize(
        &self,
        peer: &PeerInfo,
        action: Action,
        point: &str,
    ) -> Result<(), Error> {
        let decision = match self.authorizer.cached(&peer.subject, action, point) {
            Some(decision) => {
                ::metrics::counter!(crate::metrics::AUTHZ_CACHE_HITS).increment(1);
                decision
            }
            None => {
                let plugins = self.plugins.current();
                let authorizer = self.authorizer.clone();
                let subject = peer.subject.clone();
                let (point, addr) = (point.to_owned(), peer.addr.to_string());
                tokio::task::spawn_blocking(move || {
                    authorizer.decide(&plugins, &subject, action, &point, &addr)
                })
                .await
                .map_err(|e| Error::Unavailable(format!("authorization task failed: {e}")))?
            }
        };
        if decision.allowed {
            return Ok(());
        }
        Err(Error::PermissionDenied {
            subject: peer.subject.to_string(),
            action: action.as_str(),
            point: point.to_owned(),
            reason: decision.reason.to_string(),
        })
    }

    /// The members that own `point` (at most `replicas`), from the placement plugin: cached
    /// answers at once, a miss on the blocking pool.
    pub async fn owners(&self, point: &str, replicas: u32) -> Result<Arc<[String]>, Error> {
        if let Some(owners) = self.placement.cached(point, replicas) {
            return Ok(owners);
        }
        let plugins = self.plugins.current();
        let placement = self.placement.clone();
        let point = point.to_owned();
        tokio::task::spawn_blocking(move || placement.owners(&plugins, &point, replicas))
            .await
            .map_err(|e| Error::Unavailable(format!("placement task failed: {e}")))?
            .map_err(|e| Error::Unavailable(format!("placement: {e}")))
    }

    /// Refuses to write a point another member owns, naming that member.
    pub async fn check_owner(&self, point: &PointId) -> Result<(), Error> {
        let owners = self.owners(point.as_str(), 1).await?;
        match owners.first() {
            Some(owner) if *owner != self.config.node_name => {
                let membership = self.placement.membership();
                let address = membership
                    .members
                    .iter()
                    .find(|m| m.name == *owner)
                    .map_or("", |m| m.address.as_str());
                Err(Error::FailedPrecondition(format!(
                    "point {point} belongs to member {owner} ({address}); write it there"
                )))
            }
            _ => Ok(()),
        }
    }

    /// Reloads the plugins and the Polar policy from `plugins`; on failure the current ones stay.
    /// The caches start a new generation after the swap, so no answer of the old plugins
    /// survives it.
    pub fn reload_plugins(&self, plugins: &PluginsSection) -> Result<(), PluginError> {
        let generation = self.plugins.reload(plugins)?;
        self.authorizer
            .reset(Duration::from_millis(plugins.decision_cache_ms), generation);
        self.placement.reset(generation);
        Ok(())
    }

    /// Refuses writes on nodes that do not own their points.
    pub fn check_writable(&self) -> Result<(), Error> {
        if self.config.role == Role::Follower {
            return Err(Error::FailedPrecondition(format!(
                "node {} is a follower and does not accept writes; write to its leader at {}",
                self.config.node_name,
                self.config.leader_addresses.join(", ")
            )));
        }
        Ok(())
    }

    /// The nodes a client may read `point` (of `size` bytes) from in parallel: this node, and on
    /// a leader `multi_stream_percent` of the connected followers that hold all of it.
    pub fn workers(&self, point: &PointId, size: u64) -> Vec<String> {
        let mut workers = vec![self.rpc_addr.to_string()];
        let complete: Vec<String> = self
            .progress
            .replicas(point)
            .into_iter()
            .filter(|(_, _, end, connected)| *connected && *end >= size)
            .map(|(_, address, _, _)| address)
            .collect();
        let take = (complete.len() * usize::from(self.config.multi_stream_percent)).div_ceil(100);
        workers.extend(complete.into_iter().take(take));
        workers
    }

    /// How far each follower confirmed `point`.
    pub fn replica_progress(&self, point: &PointId, size: u64) -> Vec<proto::ReplicaProgress> {
        self.progress
            .replicas(point)
            .into_iter()
            .map(|(follower, _, end, _)| proto::ReplicaProgress {
                follower,
                end,
                lag: size.saturating_sub(end),
            })
            .collect()
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

    /// The members serving this cluster's API.
    pub fn servers(&self) -> Vec<proto::Server> {
        vec![proto::Server {
            rpc_addr: self.rpc_addr.to_string(),
            name: self.config.node_name.clone(),
        }]
    }

    /// This leader's live followers.
    pub fn followers(&self) -> Vec<proto::Server> {
        self.progress
            .followers()
            .into_iter()
            .map(|(name, rpc_addr)| proto::Server { rpc_addr, name })
            .collect()
    }
}

/// A started node. Dropping it without [`shutdown`](Self::shutdown) leaves its tasks running
/// until the runtime ends.
pub struct Node {
    state: Arc<NodeState>,
    api: JoinHandle<Result<(), tonic::transport::Error>>,
    tasks: TaskTracker,
    replication: Option<Replication>,
    metrics_addr: SocketAddr,
    replication_addr: SocketAddr,
}

impl Node {
    pub async fn start(config: Config, listeners: Listeners) -> Result<Node, StartError> {
        // Before anything records a metric: what is recorded before the recorder exists is lost.
        let metrics = crate::metrics::handle();
        let rpc_addr = listeners.rpc.local_addr()?;
        let metrics_addr = listeners.metrics.local_addr()?;
        let replication_addr = listeners.replication.local_addr()?;
        let store = Store::open(config.store_config()).await?;
        tracing::info!(
            node = %config.node_name,
            role = config.role.as_str(),
            points = store.len(),
            data_dir = %config.data_dir.display(),
            "store opened"
        );
        let tls = match &config.tls {
            Some(section) => Some(TlsAcceptor::from(crate::tls::server_config(section)?)),
            None => None,
        };
        let plugins = Arc::new(Plugins::load(&config.plugins, &config.data_dir)?);
        let authorizer = Arc::new(Authorizer::new(Duration::from_millis(
            config.plugins.decision_cache_ms,
        )));
        let placement = Arc::new(Placement::new(members(&config, rpc_addr)));
        let config = Arc::new(config);
        let progress = Arc::new(Progress::default());
        let replication = Replication::start(
            replication::Context {
                config: config.clone(),
                store: store.clone(),
                plugins: plugins.clone(),
                authorizer: authorizer.clone(),
                progress: progress.clone(),
                rpc_addr,
            },
            listeners.replication,
        )?;
        let shutdown = CancellationToken::new();
        let state = Arc::new(NodeState {
            config,
            store,
            rpc_addr,
            shutdown: shutdown.clone(),
            abort: CancellationToken::new(),
            plugins,
            authorizer,
            placement,
            progress,
        });

        let tasks = TaskTracker::new();
        let incoming = crate::metrics::Incoming {
            connections: net::accept(listeners.metrics, tls.clone(), shutdown.clone(), "metrics"),
            local_addr: metrics_addr,
        };
        let metrics_shutdown = shutdown.clone();
        let handle = metrics;
        tasks.spawn(async move {
            if let Err(error) = crate::metrics::serve(handle, incoming, metrics_shutdown).await {
                tracing::error!(%error, "metrics endpoint failed");
            }
        });
        let incoming = net::accept(listeners.rpc, tls, shutdown.clone(), "rpc");
        let api = tokio::spawn(api::serve(state.clone(), incoming, shutdown.clone()));
        tasks.close();
        Ok(Node {
            state,
            api,
            tasks,
            replication,
            metrics_addr,
            replication_addr,
        })
    }

    pub fn rpc_addr(&self) -> SocketAddr {
        self.state.rpc_addr
    }

    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_addr
    }

    pub fn replication_addr(&self) -> SocketAddr {
        self.replication_addr
    }

    pub fn store(&self) -> &Store {
        &self.state.store
    }

    pub fn config(&self) -> &Config {
        &self.state.config
    }

    /// The state the node's services share (plugins, placement, store).
    pub fn state(&self) -> &Arc<NodeState> {
        &self.state
    }

    /// Applies the `[plugins]` section of `config` (SIGHUP). Open streams are not touched; calls
    /// after the reload use the new plugins. On failure the current plugins stay.
    pub fn reload(&self, config: &Config) -> Result<(), PluginError> {
        self.state.reload_plugins(&config.plugins)?;
        tracing::info!(
            authorizer = %config.plugins.authorizer.source,
            bundler = %config.plugins.bundler.source,
            placement = %config.plugins.placement.source,
            "plugins reloaded"
        );
        Ok(())
    }

    /// Stops accepting, waits up to the grace period for open calls, cancels the rest, then
    /// syncs and closes every point.
    pub async fn shutdown(mut self) -> Result<(), StorageError> {
        let state = self.state.clone();
        tracing::info!(node = %state.config.node_name, "shutting down");
        state.shutdown.cancel();
        let grace = Duration::from_millis(state.config.shutdown_grace_ms);
        if tokio::time::timeout(grace, &mut self.api).await.is_err() {
            tracing::warn!("streams still open after the grace period; cancelling them");
            state.abort.cancel();
            if tokio::time::timeout(Duration::from_secs(2), &mut self.api)
                .await
                .is_err()
            {
                self.api.abort();
            }
        }
        state.abort.cancel();
        self.tasks.wait().await;
        if let Some(replication) = self.replication.take() {
            replication.shutdown().await;
        }
        state.store.close().await?;
        tracing::info!(node = %state.config.node_name, "stopped");
        Ok(())
    }
}

/// The member list placement starts from: this node, then the configured members.
fn members(config: &Config, rpc_addr: SocketAddr) -> Vec<Member> {
    let this = Member {
        name: config.node_name.clone(),
        address: rpc_addr.to_string(),
        role: config.role.as_str().into(),
        virtual_nodes: config.virtual_node_count,
        tags: config.tags.clone().into_iter().collect(),
    };
    std::iter::once(this)
        .chain(config.members.iter().map(|m| Member {
            name: m.name.clone(),
            address: m.address.clone(),
            role: m.role.as_str().into(),
            virtual_nodes: m.virtual_nodes,
            tags: m.tags.clone().into_iter().collect(),
        }))
        .collect()
}
