//! A running node: its listeners, the state its services share, start-up and graceful shutdown.
//!
//! [`Node::start`] takes listeners the caller has already bound (port 0 in tests), opens the store,
//! and spawns the API and metrics servers. [`Node::shutdown`] stops accepting, lets open streams
//! finish for `shutdown_grace_ms`, cancels what is left, then syncs and closes every point.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::api;
use crate::api::proto;
use crate::authz::Action;
use crate::config::{Config, Role};
use crate::error::Error;
use crate::net::{self, PeerInfo};
use crate::point::{PointId, StorageError, Store};

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
    #[error("listener address: {0}")]
    Io(#[from] std::io::Error),
}

/// What the services of one node share.
pub struct NodeState {
    pub config: Config,
    pub store: Store,
    /// The address clients reach this node's API at.
    pub rpc_addr: SocketAddr,
    /// Cancelled when shutdown starts: stop accepting, end `follow` streams.
    pub shutdown: CancellationToken,
    /// Cancelled when the grace period is over: end every remaining stream.
    pub abort: CancellationToken,
}

impl NodeState {
    /// Whether `peer` may take `action` on `point`.
    pub async fn authorize(
        &self,
        peer: &PeerInfo,
        action: Action,
        point: &str,
    ) -> Result<(), Error> {
        let _ = (peer, action, point);
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

    /// The nodes a client may read from in parallel.
    pub fn workers(&self) -> Vec<String> {
        vec![self.rpc_addr.to_string()]
    }

    pub fn replica_progress(&self, _point: &PointId, _size: u64) -> Vec<proto::ReplicaProgress> {
        Vec::new()
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
        Vec::new()
    }
}

/// A started node. Dropping it without [`shutdown`](Self::shutdown) leaves its tasks running
/// until the runtime ends.
pub struct Node {
    state: Arc<NodeState>,
    api: JoinHandle<Result<(), tonic::transport::Error>>,
    tasks: TaskTracker,
    metrics_addr: SocketAddr,
    replication_addr: SocketAddr,
}

impl Node {
    pub async fn start(config: Config, listeners: Listeners) -> Result<Node, StartError> {
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
        let shutdown = CancellationToken::new();
        let state = Arc::new(NodeState {
            config,
            store,
            rpc_addr,
            shutdown: shutdown.clone(),
            abort: CancellationToken::new(),
        });

        let tasks = TaskTracker::new();
        let metrics_shutdown = shutdown.clone();
        tasks.spawn(async move {
            if let Err(error) = crate::metrics::serve(listeners.metrics, metrics_shutdown).await {
                tracing::error!(%error, "metrics endpoint failed");
            }
        });
        let incoming = net::accept(listeners.rpc, None, shutdown.clone(), "rpc");
        let api = tokio::spawn(api::serve(state.clone(), incoming, shutdown.clone()));
        // Replication binds its listener in a later stage; keep it reserved until then.
        drop(listeners.replication);
        tasks.close();
        Ok(Node {
            state,
            api,
            tasks,
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
        state.store.close().await?;
        tracing::info!(node = %state.config.node_name, "stopped");
        Ok(())
    }
}

/// Runs a node until `signal` completes, then shuts it down gracefully.
pub async fn run(
    config: Config,
    listeners: Listeners,
    signal: impl Future<Output = ()>,
) -> Result<(), anyhow::Error> {
    let node = Node::start(config, listeners).await?;
    signal.await;
    node.shutdown().await?;
    Ok(())
}
