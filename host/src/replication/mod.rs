//! Replication from a leader to its followers over Cap'n Proto RPC (`schema/capnp/`).
//!
//! `capnp-rpc` is `!Send`, so everything here runs on one dedicated thread with a current-thread
//! runtime and a `LocalSet` ([`Replication::start`]). The rest of the node talks to it through
//! `Send` handles only: the store's bounded broadcast of appends (what to push), [`Progress`]
//! (what followers confirmed, read by the API for `GetFollowers`, metadata and `ack`), and a
//! cancellation token.
//!
//! - [`leader`]: accepts followers on the replication port, authorizes them (`replicate`), and
//!   runs one supervised [`replicator`] per follower: catch-up from the follower's real offsets
//!   (checked by CRC), then live appends, with a bounded window of bytes in flight and nothing
//!   that can block the leader's writes.
//! - [`follower`]: dials the leader(s) in `leader_addresses`, offers what it holds, and applies
//!   pushed records only at its current end (exactly once), reconnecting with backoff.
//! - [`mover`] and [`handover`]: resharding between primaries (`docs/resharding.md`). The old
//!   owner's mover hands points to their new owner through a replicator scoped to those points;
//!   the new owner's side receives them as `incoming` and commits the next epoch at the seal.
//!
//! Every primary serves this port (a standalone one for handovers only); followers dial it.
//!
//! Every record is framed by the bundler plugin and checked by it on receipt, and checked again
//! by the host (its payload's length and CRC32C travel beside the bundle): a bundler that fails
//! or lies costs a counted, logged error, never a byte of the copy. Plugin calls run on the
//! blocking pool, never on this thread. The protocol is in `docs/replication.md`.

pub mod error;
pub mod follower;
pub mod handover;
pub mod leader;
pub mod mover;
pub mod replicator;
pub mod takeover;
#[allow(clippy::all, unused_qualifications, dead_code)]
#[rustfmt::skip]
pub mod replication_capnp;

use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use capnp_rpc::rpc_twoparty_capnp::Side;
use capnp_rpc::{RpcSystem, twoparty};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_rustls::TlsConnector;
use tokio_util::compat::{TokioAsyncReadCompatExt, TokioAsyncWriteCompatExt};
use tokio_util::either::Either;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use crate::access::Action;
use crate::cluster::{Leader, Membership, Steps};
use crate::config::Role;
use crate::metrics;
use crate::net::PeerInfo;
use crate::point::{PointId, Store};

use crate::service::{Handle, Service};
use crate::services::Services;
use error::{IdentityError, LinkError};

/// The version of the replication protocol (`schema/capnp/replication.capnp`) this node speaks:
/// a leader refuses followers that speak another (docs/replication.md).
pub const PROTOCOL: u16 = 4;

/// Why replication could not start.
#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    #[error("replication: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Tls(#[from] crate::tls::TlsError),
}

/// What the replication thread needs from the node.
#[derive(Clone)]
pub struct Context {
    /// What every subsystem of the node shares: the configuration, the plugins, the
    /// authorization door, this node's client API address (sent to the leader by a follower).
    pub services: Services,
    pub store: Store,
    pub progress: Arc<Progress>,
    /// A follower publishes here the leader it follows (its name is gossiped by membership).
    pub leader: watch::Sender<Option<Leader>>,
    /// The cluster as this node sees it (resharding plans from its ring).
    pub membership: watch::Receiver<Arc<Membership>>,
    /// This member's lifecycle steps (a drained primary steps to `left`).
    pub steps: Steps,
}

/// Starts the replication thread, stopped by `token`: the leader service on `listener` for a
/// leader, the connections to `leader_addresses` for a follower. A standalone node needs none.
pub fn start(
    context: Context,
    listener: tokio::net::TcpListener,
    token: CancellationToken,
) -> Result<Option<Handle>, ReplicationError> {
    let role = context.services.config.role;
    if role == Role::Balancer {
        return Ok(None);
    }
    let server_tls = match &context.services.config.tls {
        Some(tls) => Some(tokio_rustls::TlsAcceptor::from(crate::tls::server_config(
            tls,
        )?)),
        None => None,
    };
    let client_tls = match &context.services.config.tls {
        Some(tls) => Some(tokio_rustls::TlsConnector::from(
            crate::tls::peer_client_config(tls)?,
        )),
        None => None,
    };
    // The listener moves to the replication thread's runtime.
    let listener = listener.into_std()?;
    let service = Service::new("replication", token);
    let spawner = service.spawner();
    let grace = Duration::from_millis(context.services.config.shutdown_grace_ms);
    service.spawn_thread(role.as_str(), move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("building the replication runtime");
        let local = tokio::task::LocalSet::new();
        local.block_on(&runtime, async move {
            match role {
                Role::Leader | Role::Standalone => {
                    let listener = match tokio::net::TcpListener::from_std(listener) {
                        Ok(listener) => listener,
                        Err(error) => {
                            tracing::error!(%error, "replication listener");
                            return;
                        }
                    };
                    let context = Rc::new(context);
                    let token = spawner.token().clone();
                    let moves =
                        tokio::task::spawn_local(mover::run(context.clone(), client_tls, token));
                    leader::serve(context, listener, server_tls, &spawner).await;
                    let _ = moves.await;
                }
                Role::Follower => {
                    // A follower's mover hands its copies of a forgotten primary's points over.
                    let token = spawner.token().clone();
                    let moves = tokio::task::spawn_local(mover::run(
                        Rc::new(context.clone()),
                        client_tls.clone(),
                        token.clone(),
                    ));
                    follower::run(context, client_tls, token).await;
                    let _ = moves.await;
                }
                Role::Balancer => {}
            }
        });
        drop(local);
        // A plugin call still running on the blocking pool (a bundler that sleeps in the host)
        // is not waited for beyond the grace period.
        runtime.shutdown_timeout(grace);
    })?;
    Ok(Some(service.handle()))
}

/// With TLS, a peer's certificate must name the node it says it is (`node:<name>`, as gossip
/// knows it): a certificate of the CA is not enough to speak for another member.
pub fn check_identity(subject: &str, claimed: &str, tls: bool) -> Result<(), IdentityError> {
    if !tls || subject == format!("{}{claimed}", crate::certs::NODE_PREFIX) {
        return Ok(());
    }
    Err(IdentityError::Certificate {
        subject: crate::error::bounded(subject),
        claimed: crate::error::bounded(claimed),
    })
}

/// What followers have confirmed, shared with the rest of the node.
pub struct Progress {
    state: Mutex<BTreeMap<String, FollowerProgress>>,
    /// Bumped on every change, so waiters wake up.
    changed: watch::Sender<u64>,
}

/// One follower's copy of one point, as its leader sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replica {
    pub follower: String,
    /// Where clients reach its API.
    pub rpc_address: String,
    /// The end it confirmed.
    pub end: u64,
    /// Whether its session is up now.
    pub connected: bool,
}

/// One follower, as its leader sees it.
#[derive(Debug, Clone, Default)]
pub struct FollowerProgress {
    /// Where clients reach its API.
    pub rpc_address: String,
    pub connected: bool,
    /// Per point, the end the follower confirmed.
    pub confirmed: HashMap<PointId, u64>,
}

impl Default for Progress {
    fn default() -> Self {
        Self {
            state: Mutex::new(BTreeMap::new()),
            changed: watch::Sender::new(0),
        }
    }
}

impl Progress {
    /// A follower's session started (replacing any earlier one).
    pub fn connected(&self, follower: &str, rpc_address: &str) {
        self.update(|state| {
            let entry = state.entry(follower.to_owned()).or_default();
            entry.rpc_address = rpc_address.to_owned();
            entry.connected = true;
            entry.confirmed.clear();
        });
    }

    pub fn disconnected(&self, follower: &str) {
        self.update(|state| {
            if let Some(entry) = state.get_mut(follower) {
                entry.connected = false;
            }
        });
    }

    /// `follower` holds `point` up to `end`.
    pub fn confirm(&self, follower: &str, point: &PointId, end: u64) {
        self.update(|state| {
            if let Some(entry) = state.get_mut(follower) {
                entry.confirmed.insert(point.clone(), end);
            }
        });
    }

    pub fn forget(&self, follower: &str, point: &PointId) {
        self.update(|state| {
            if let Some(entry) = state.get_mut(follower) {
                entry.confirmed.remove(point);
            }
        });
    }

    fn update(&self, f: impl FnOnce(&mut BTreeMap<String, FollowerProgress>)) {
        f(&mut self.state.lock().unwrap());
        self.changed.send_modify(|version| *version += 1);
    }

    /// The end `follower` confirmed of `point` (0 if none).
    pub fn confirmed_end(&self, follower: &str, point: &PointId) -> u64 {
        let state = self.state.lock().unwrap();
        state
            .get(follower)
            .and_then(|f| f.confirmed.get(point).copied())
            .unwrap_or(0)
    }

    /// Changes whenever a follower confirms something, connects or goes.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Connected followers: (name, rpc address).
    pub fn followers(&self) -> Vec<(String, String)> {
        let state = self.state.lock().unwrap();
        state
            .iter()
            .filter(|(_, f)| f.connected)
            .map(|(name, f)| (name.clone(), f.rpc_address.clone()))
            .collect()
    }

    /// Every follower ever seen, with what it confirmed of `point`.
    pub fn replicas(&self, point: &PointId) -> Vec<Replica> {
        let state = self.state.lock().unwrap();
        state
            .iter()
            .map(|(name, f)| Replica {
                follower: name.clone(),
                rpc_address: f.rpc_address.clone(),
                end: f.confirmed.get(point).copied().unwrap_or(0),
                connected: f.connected,
            })
            .collect()
    }

    /// How many followers confirmed `point` up to at least `end`, connected now or not: a
    /// confirmation means the bytes are stored on that follower, and a connection lost after it
    /// does not unstore them (a follower that connects again starts its confirmations afresh).
    pub fn confirmed(&self, point: &PointId, end: u64) -> usize {
        let state = self.state.lock().unwrap();
        state
            .values()
            .filter(|f| f.confirmed.get(point).is_some_and(|&e| e >= end))
            .count()
    }

    /// Waits until `replicas` followers confirmed every `(point, end)`, or `timeout`. Returns the
    /// first point that fell short and how many followers had it.
    pub async fn wait(
        &self,
        points: &[(PointId, u64)],
        replicas: usize,
        timeout: Duration,
    ) -> Result<(), (PointId, u64, usize)> {
        let mut changes = self.changed.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let short = points.iter().find_map(|(point, end)| {
                let count = self.confirmed(point, *end);
                (count < replicas).then(|| (point.clone(), *end, count))
            });
            let Some(short) = short else { return Ok(()) };
            if tokio::time::timeout_at(deadline, changes.changed())
                .await
                .is_err()
            {
                return Err(short);
            }
        }
    }
}

/// Gives up on reaching another member after this long (connection, TLS handshake, its name).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A connection to another member's replication port, whose name is known and checked.
pub(crate) struct Dialed {
    /// Its bootstrap capability (`Leader`: replication and handovers).
    pub member: replication_capnp::leader::Client,
    /// Its node name; with TLS, the one its certificate names.
    pub name: String,
    /// Where clients reach its API.
    pub rpc_address: String,
    /// The connection; dropping it closes the connection.
    pub connection: AbortOnDropHandle<Result<(), capnp::Error>>,
}

/// Dials the replication port at `address`. With TLS the member must be one the policy lets
/// `replicate` (not just anyone with a certificate from the CA), and its certificate must name
/// the node it says it is, before any capability is handed to it.
pub(crate) async fn dial(
    context: &Context,
    address: &str,
    tls: Option<&TlsConnector>,
) -> Result<Dialed, LinkError> {
    let timed_out = |step| LinkError::TimedOut {
        step,
        address: address.to_owned(),
    };
    let failed = |step| {
        move |source| LinkError::Io {
            step,
            address: address.to_owned(),
            source,
        }
    };
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(address))
        .await
        .map_err(|_| timed_out("connecting"))?
        .map_err(failed("connecting"))?;
    let _ = tcp.set_nodelay(true);
    let peer_addr = tcp.peer_addr().map_err(failed("connecting"))?;
    let (io, subject) = match tls {
        None => (Either::Left(tcp), None),
        Some(connector) => {
            let name = server_name(address).ok_or_else(|| LinkError::BadAddress {
                address: address.to_owned(),
            })?;
            // rustls reads at most 4 KiB per call: see `tls::READ_BUFFER`.
            let buffered = tokio::io::BufReader::with_capacity(crate::tls::READ_BUFFER, tcp);
            let stream = tokio::time::timeout(CONNECT_TIMEOUT, connector.connect(name, buffered))
                .await
                .map_err(|_| timed_out("TLS handshake"))?
                .map_err(failed("TLS handshake"))?;
            let subject = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|certs| certs.first())
                .map(|cert| crate::tls::subject(cert.as_ref()))
                .ok_or_else(|| LinkError::NoCertificate {
                    address: address.to_owned(),
                })?;
            let peer = PeerInfo {
                addr: peer_addr,
                subject: subject.as_str().into(),
            };
            if let Err(denied) = context
                .services
                .access
                .authorize(&peer, Action::Replicate, "")
                .await
            {
                ::metrics::counter!(metrics::REPLICATION_REFUSED).increment(1);
                return Err(denied.into());
            }
            (Either::Right(stream), Some(subject))
        }
    };
    let (reader, writer) = tokio::io::split(io);
    let network = twoparty::VatNetwork::new(
        reader.compat(),
        writer.compat_write(),
        Side::Client,
        Default::default(),
    );
    let mut rpc = RpcSystem::new(Box::new(network), None);
    let member: replication_capnp::leader::Client = rpc.bootstrap(Side::Server);
    // Aborted however this function returns: a refused member keeps no connection.
    let connection = AbortOnDropHandle::new(tokio::task::spawn_local(rpc));
    let (name, rpc_address) =
        tokio::time::timeout(CONNECT_TIMEOUT, member.identify_request().send().promise)
            .await
            .map_err(|_| timed_out("asking its name"))?
            .and_then(|r| {
                let identity = r.get()?;
                Ok((
                    identity.get_name()?.to_string()?,
                    identity.get_rpc_address()?.to_string()?,
                ))
            })
            .map_err(|e| LinkError::call("identify", address, e))?;
    if let Some(subject) = &subject
        && let Err(mismatch) = check_identity(subject, &name, true)
    {
        ::metrics::counter!(metrics::REPLICATION_REFUSED).increment(1);
        return Err(mismatch.into());
    }
    Ok(Dialed {
        member,
        name,
        rpc_address,
        connection,
    })
}

/// `host:port` as a TLS server name: the IP, or the host name.
fn server_name(address: &str) -> Option<rustls::pki_types::ServerName<'static>> {
    let host = address.rsplit_once(':').map_or(address, |(host, _)| host);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    rustls::pki_types::ServerName::try_from(host.to_owned()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_confirmation_counts_until_the_follower_connects_again() {
        let progress = Progress::default();
        let point = PointId::new("p").unwrap();
        progress.connected("f1", "127.0.0.1:1");
        progress.connected("f2", "127.0.0.1:2");
        progress.confirm("f1", &point, 100);
        progress.confirm("f2", &point, 50);
        assert_eq!(progress.confirmed(&point, 100), 1);
        assert_eq!(progress.confirmed(&point, 50), 2);
        // Stored on f1 whether or not f1 is connected now.
        progress.disconnected("f1");
        assert_eq!(progress.confirmed(&point, 100), 1);
        // A new session confirms afresh.
        progress.connected("f1", "127.0.0.1:1");
        assert_eq!(progress.confirmed(&point, 100), 0);
        assert_eq!(progress.confirmed(&point, 50), 1);
    }
}
