//! What the handlers of one node share: the store, the access door, ownership, replication
//! progress, and the checks and waits that several handlers make.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::access::Access;
use crate::config::{Ack, Config, Role};
use crate::error::Error;
use crate::placement::Placement;
use crate::point::{PointId, Store};
use crate::replication::{Progress, Replica};
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
}

impl Context {
    /// Refuses writes on followers, naming their leader.
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
