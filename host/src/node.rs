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
use crate::cluster::{self, Cluster, Membership, gossip};
use crate::config::Config;
use crate::http::gateway::Gateway;
use crate::placement::Placement;
use crate::plugins::{PluginError, Plugins};
use crate::point::{StorageError, Store};
use crate::replication::{self, Progress};
use crate::service::{Failed, Handle};
use crate::signed_url::UrlSigner;

/// The sockets a node serves on, bound before it starts.
pub struct Listeners {
    pub rpc: TcpListener,
    pub replication: TcpListener,
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
    pub node: String,
    pub role: String,
    pub rpc: SocketAddr,
    pub replication: SocketAddr,
    pub metrics: SocketAddr,
    pub http: SocketAddr,
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
    #[error("{0}")]
    Cluster(#[from] crate::cluster::ClusterError),
    #[error("{0}")]
    Config(String),
    #[error("listener address: {0}")]
    Io(#[from] std::io::Error),
}

/// Why a shutdown was not clean.
#[derive(Debug, thiserror::Error)]
pub enum ShutdownError {
    #[error("closing the store: {0}")]
    Store(#[from] StorageError),
    #[error(transparent)]
    Failed(#[from] Failed),
}

/// A started node. Dropping it without [`shutdown`](Self::shutdown) leaves its tasks running
/// until the runtime ends.
pub struct Node {
    context: Arc<Context>,
    plugins: Arc<Plugins>,
    cluster: Cluster,
    api: Handle,
    gateway: Handle,
    metrics: Handle,
    replication: Option<Handle>,
    addresses: Addresses,
}

impl Node {
    pub async fn start(config: Config, listeners: Listeners) -> Result<Node, StartError> {
        // Before anything records a metric: what is recorded before the recorder exists is lost.
        let recorder = crate::metrics::handle();
        let addresses = listeners.addresses(&config)?;
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
        let access = Arc::new(Access::new(
            plugins.clone(),
            Duration::from_millis(config.plugins.decision_cache_ms),
        ));

        let key = config.cluster.gossip_key().map_err(StartError::Config)?;
        if key.is_none() {
            tracing::warn!(
                gossip = %addresses.gossip,
                "gossip is unauthenticated (no cluster key): anyone who reaches this UDP port can \
                 join the cluster; development only (set [tls] and cluster.key_file)"
            );
        }
        let (leader, following) = watch::channel(None);
        let cluster = cluster::start(
            cluster::Params {
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
                leader: following,
            },
            gossip::Network::Udp {
                socket: listeners.gossip,
                key,
            },
            CancellationToken::new(),
        )
        .await?;
        let placement = Arc::new(Placement::new(plugins.clone(), cluster.membership()));

        let config = Arc::new(config);
        let progress = Arc::new(Progress::default());
        let replication = replication::start(
            replication::Context {
                config: config.clone(),
                store: store.clone(),
                plugins: plugins.clone(),
                access: access.clone(),
                progress: progress.clone(),
                rpc_addr: addresses.rpc,
                leader,
            },
            listeners.replication,
            CancellationToken::new(),
        )?;
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
        let url_keys = config.http.url_key_bytes().map_err(|(key, message)| {
            StartError::Config(format!("config key `{key}`: {message}"))
        })?;
        let signer = Arc::new(UrlSigner::new(
            &url_keys,
            public_url,
            config.http.max_url_ttl(),
        ));
        let gateway_tls = match &config.tls {
            Some(section) => Some(TlsAcceptor::from(crate::tls::gateway_server_config(
                section,
            )?)),
            None => None,
        };
        let context = Arc::new(Context {
            config,
            store,
            rpc_addr: addresses.rpc,
            shutdown: CancellationToken::new(),
            abort: CancellationToken::new(),
            access,
            placement,
            progress,
            signer: signer.clone(),
        });
        let api = api::start(
            context.clone(),
            listeners.rpc,
            tls.clone(),
            context.shutdown.clone(),
        );
        let writing_window = Duration::from_millis(context.config.http.writing_window_ms);
        let gateway_context = context.clone();
        let https = gateway_tls.is_some();
        let gateway = crate::http::start_gateway(
            move |spawner| Gateway {
                context: gateway_context,
                signer,
                tls: https,
                writing_window,
                spawner,
            },
            listeners.http,
            gateway_tls,
            context.shutdown.child_token(),
        )?;
        let metrics =
            crate::http::start_metrics(recorder, listeners.metrics, tls, CancellationToken::new())?;
        Ok(Node {
            context,
            plugins,
            cluster,
            api,
            gateway,
            metrics,
            replication,
            addresses,
        })
    }

    pub fn addresses(&self) -> &Addresses {
        &self.addresses
    }

    pub fn rpc_addr(&self) -> SocketAddr {
        self.addresses.rpc
    }

    pub fn metrics_addr(&self) -> SocketAddr {
        self.addresses.metrics
    }

    pub fn replication_addr(&self) -> SocketAddr {
        self.addresses.replication
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.addresses.http
    }

    pub fn gossip_addr(&self) -> SocketAddr {
        self.addresses.gossip
    }

    pub fn store(&self) -> &Store {
        &self.context.store
    }

    pub fn config(&self) -> &Config {
        &self.context.config
    }

    /// What the node's handlers share (store, access, placement).
    pub fn context(&self) -> &Arc<Context> {
        &self.context
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
    pub fn reload(&self, config: &Config) -> Result<(), PluginError> {
        let generation = self.plugins.reload(&config.plugins)?;
        let ttl = Duration::from_millis(config.plugins.decision_cache_ms);
        self.context.access.reset(generation, ttl);
        self.context.placement.reset(generation);
        tracing::info!(
            authorizer = %config.plugins.authorizer.source,
            bundler = %config.plugins.bundler.source,
            placement = %config.plugins.placement.source,
            "plugins reloaded"
        );
        Ok(())
    }

    /// Stops accepting, waits up to the grace period for open calls, cancels the rest, stops
    /// replication, syncs and closes every point, then leaves the live view (the node stays in
    /// the ring: a restart is not a departure).
    pub async fn shutdown(self) -> Result<(), ShutdownError> {
        let context = self.context.clone();
        tracing::info!(node = %context.config.node_name, "shutting down");
        context.shutdown.cancel();
        let grace = Duration::from_millis(context.config.shutdown_grace_ms);
        let api = self.api.terminated();
        tokio::pin!(api);
        let mut outcome = match tokio::time::timeout(grace, &mut api).await {
            Ok(outcome) => outcome,
            Err(_) => {
                tracing::warn!("streams still open after the grace period; cancelling them");
                context.abort.cancel();
                match tokio::time::timeout(Duration::from_secs(2), &mut api).await {
                    Ok(outcome) => outcome,
                    Err(_) => {
                        tracing::error!("the API server did not stop; leaving it to the runtime");
                        Ok(())
                    }
                }
            }
        };
        context.abort.cancel();
        outcome = outcome.and(self.gateway.shutdown().await);
        outcome = outcome.and(self.metrics.shutdown().await);
        if let Some(replication) = self.replication {
            outcome = outcome.and(replication.shutdown().await);
        }
        let closed = context.store.close().await;
        outcome = outcome.and(self.cluster.shutdown().await);
        tracing::info!(node = %context.config.node_name, "stopped");
        closed?;
        Ok(outcome?)
    }
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
