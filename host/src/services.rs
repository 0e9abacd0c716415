//! What every subsystem of one node shares, built once by [`crate::node`] and borrowed by each
//! context (the API's, the HTTP gateway's, the balancer's, replication's): the configuration,
//! the plugins and the doors in front of them (authorization, placement), the URL signer, this
//! node's API address, the controller's status, and the node's lifetime.
//!
//! [`Lifetime`] is the node's one cancellation root: every token a subsystem stops on is a
//! child of it, and shutdown cancels the children one by one in its order (stop accepting,
//! end the streams left after the grace period, then the subsystems).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::access::Access;
use crate::cluster::Membership;
use crate::config::Config;
use crate::controller::agent::Observer;
use crate::placement::Placement;
use crate::plugins::Plugins;
use crate::signed_url::UrlSigner;

/// The handles every context of one node shares; cheap to clone.
#[derive(Clone)]
pub struct Services {
    /// The node's configuration.
    pub config: Arc<Config>,
    /// The loaded plugins (reloaded in place on SIGHUP).
    pub plugins: Arc<Plugins>,
    /// The one authorization door.
    pub access: Arc<Access>,
    /// Which member owns which point.
    pub placement: Arc<Placement>,
    /// Signs the URLs of the HTTP gateway.
    pub signer: Arc<UrlSigner>,
    /// Where clients reach this node's API.
    pub rpc_addr: SocketAddr,
    /// The controller as this node sees it.
    pub controller: Observer,
    /// When to stop.
    pub lifetime: Lifetime,
}

impl Services {
    /// The services of a node with `config` and `plugins`, whose placement follows
    /// `membership`.
    pub fn new(
        config: Config,
        plugins: Plugins,
        membership: watch::Receiver<Arc<Membership>>,
        signer: Arc<UrlSigner>,
        rpc_addr: SocketAddr,
        controller: Observer,
        lifetime: Lifetime,
    ) -> Self {
        let plugins = Arc::new(plugins);
        Services {
            access: Arc::new(Access::new(
                plugins.clone(),
                Duration::from_millis(config.plugins.decision_cache_ms),
            )),
            placement: Arc::new(Placement::new(plugins.clone(), membership)),
            signer,
            rpc_addr,
            controller,
            config: Arc::new(config),
            plugins,
            lifetime,
        }
    }
}

/// The node's cancellation root and the two moments of its shutdown.
#[derive(Clone, Debug)]
pub struct Lifetime {
    root: CancellationToken,
    /// Cancelled when shutdown starts: stop accepting, end `follow` streams.
    pub shutdown: CancellationToken,
    /// Cancelled when the grace period is over: end every remaining stream.
    pub abort: CancellationToken,
}

impl Lifetime {
    /// A new root, with its shutdown and abort tokens.
    pub fn new() -> Self {
        let root = CancellationToken::new();
        Self {
            shutdown: root.child_token(),
            abort: root.child_token(),
            root,
        }
    }

    /// The token of a subsystem that shutdown stops in its turn (replication, membership,
    /// metrics); cancelled with the root too.
    pub fn subsystem(&self) -> CancellationToken {
        self.root.child_token()
    }
}

impl Default for Lifetime {
    fn default() -> Self {
        Self::new()
    }
}
