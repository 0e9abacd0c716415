//! Gossip with chitchat (scuttlebutt state exchange and a phi failure detector). This is the
//! only file that imports chitchat: the rest of the node sees [`Advert`]s.
//!
//! chitchat 0.11 rather than 0.13: from 0.12 on, the wire encoding of a message is crate-private,
//! so no transport outside chitchat can seal datagrams (its issue #79, encryption, is open).
//!
//! - What a node announces is a set of key-values (see [`keys`]); [`Gossip::publish`] writes the
//!   ones that changed, and [`Gossip::changed`] yields the decoded adverts of the live nodes,
//!   without those that announced they are stopping.
//! - The network is a [`Network`]: UDP on a socket bound before start (so port 0 works and the
//!   bound port can be printed), or chitchat's in-process channels for deterministic tests with
//!   paused time (links can be cut and restored).
//! - With a cluster key, every datagram is sealed with ChaCha20-Poly1305 under a key derived
//!   from it (HKDF-SHA256): `version (1) | nonce (12) | ciphertext | tag (16)`, the plaintext
//!   starting with the sender's clock in milliseconds. Datagrams that do not open, are older than
//!   [`MAX_AGE`], or do not decode are dropped and counted; the key is never logged.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use chitchat::transport::{ChannelTransport, Socket, Transport};
use chitchat::{
    ChitchatConfig, ChitchatHandle, ChitchatId, ChitchatMessage, Deserializable,
    FailureDetectorConfig, NodeState, Serializable, spawn_chitchat,
};
use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::hkdf;
use ring::rand::{SecureRandom, SystemRandom};
use tokio::sync::watch;

use super::ring::Ring;
use super::{Advert, Lifecycle, Member, Role};
use crate::metrics;

/// The largest UDP payload.
const MAX_DATAGRAM: usize = 65_507;
/// Sealed datagrams older (or newer) than this, by the sender's clock, are dropped as replays.
pub const MAX_AGE: Duration = Duration::from_secs(60);
const SEALED_VERSION: u8 = 1;
const SEAL_OVERHEAD: usize = 1 + aead::NONCE_LEN + 16 + 8;

/// The gossip key-values of a node.
mod keys {
    pub(super) const ROLE: &str = "role";
    pub(super) const LIFECYCLE: &str = "lifecycle";
    pub(super) const RPC: &str = "rpc";
    pub(super) const REPLICATION: &str = "replication";
    pub(super) const HTTP: &str = "http";
    pub(super) const VIRTUAL_NODES: &str = "virtual_nodes";
    pub(super) const TAGS: &str = "tags";
    pub(super) const LEADER: &str = "leader";
    /// The join a primary has handed every point of (`docs/resharding.md`).
    pub(super) const HANDED: &str = "handed";
    /// The points a primary is handing over now.
    pub(super) const MOVING: &str = "moving";
    /// The id of the ring the node holds.
    pub(super) const RING: &str = "ring";
    /// Its founders (JSON list).
    pub(super) const FOUNDERS: &str = "founders";
    /// A primary's own record in the ring (JSON).
    pub(super) const RECORD: &str = "record";
    /// The records of the ring members this node sees down (JSON map), so that a newcomer
    /// learns of members it never saw alive. Live members announce their own records.
    pub(super) const ABSENT: &str = "absent";
    pub(super) const PROPOSAL: &str = "proposal";
    /// Set just before a graceful stop: the node leaves everyone's live view at once.
    pub(super) const STOPPING: &str = "stopping";
}

/// How gossip runs.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The cluster this node gossips in (`cluster.name`): chitchat keeps clusters apart by it.
    pub cluster: String,
    /// This node's name.
    pub name: String,
    /// Distinguishes this run of the node from earlier ones (its start time).
    pub generation: u64,
    /// The members to gossip with first.
    pub seeds: Vec<String>,
    /// The gossip round.
    pub interval: Duration,
    /// The failure detector's threshold (phi).
    pub phi_threshold: f64,
    /// How long the state of a dead node is kept before it is forgotten.
    pub dead_grace: Duration,
}

/// Where gossip travels.
pub enum Network {
    /// UDP on a bound socket; sealed with the key when there is one.
    Udp {
        /// The bound UDP socket.
        socket: std::net::UdpSocket,
        /// The cluster key that seals every packet, if any.
        key: Option<ClusterKey>,
    },
    /// chitchat's in-process channels at `addr` (tests).
    InMemory {
        /// The in-process network.
        network: InMemoryNetwork,
        /// This node's address on it.
        addr: SocketAddr,
    },
}

/// In-process gossip for tests: nodes on one [`InMemoryNetwork`] reach each other unless a link
/// between them is cut.
#[derive(Clone, Default)]
pub struct InMemoryNetwork(ChannelTransport);

impl InMemoryNetwork {
    /// A new in-process network (tests).
    pub fn new() -> Self {
        Self(ChannelTransport::with_mtu(MAX_DATAGRAM))
    }

    /// Drops every datagram between `a` and `b`, both ways.
    pub async fn cut(&self, a: SocketAddr, b: SocketAddr) {
        self.0.remove_link(a, b).await;
    }

    /// Restores the link between `a` and `b`.
    pub async fn link(&self, a: SocketAddr, b: SocketAddr) {
        self.0.add_link(a, b).await;
    }
}

/// The AEAD key of a cluster, derived from its secret.
#[derive(Clone)]
pub struct ClusterKey {
    key: Arc<LessSafeKey>,
}

impl std::fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterKey(<redacted>)")
    }
}

impl ClusterKey {
    /// Derives the key of cluster `cluster` from `secret`.
    pub fn derive(secret: &[u8], cluster: &str) -> ClusterKey {
        let salt = hkdf::Salt::new(hkdf::HKDF_SHA256, b"goutube gossip v1");
        let info = [cluster.as_bytes()];
        let prk = salt.extract(secret);
        let okm = prk
            .expand(&info, &aead::CHACHA20_POLY1305)
            .expect("HKDF output of one AEAD key");
        ClusterKey {
            key: Arc::new(LessSafeKey::new(UnboundKey::from(okm))),
        }
    }

    fn seal(&self, payload: &[u8]) -> Option<Vec<u8>> {
        let mut nonce = [0u8; aead::NONCE_LEN];
        SystemRandom::new().fill(&mut nonce).ok()?;
        let mut buffer = Vec::with_capacity(payload.len() + SEAL_OVERHEAD);
        buffer.extend_from_slice(&now_ms().to_le_bytes());
        buffer.extend_from_slice(payload);
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from([SEALED_VERSION]),
                &mut buffer,
            )
            .ok()?;
        let mut datagram = Vec::with_capacity(buffer.len() + 1 + aead::NONCE_LEN);
        datagram.push(SEALED_VERSION);
        datagram.extend_from_slice(&nonce);
        datagram.extend_from_slice(&buffer);
        Some(datagram)
    }

    /// The payload of a sealed datagram, or why it was dropped.
    fn open<'a>(&self, datagram: &'a mut [u8]) -> Result<&'a [u8], &'static str> {
        if datagram.len() < SEAL_OVERHEAD || datagram[0] != SEALED_VERSION {
            return Err("unsealed");
        }
        let (head, sealed) = datagram.split_at_mut(1 + aead::NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(&head[1..]).map_err(|_| "unsealed")?;
        let plain = self
            .key
            .open_in_place(nonce, Aad::from([SEALED_VERSION]), sealed)
            .map_err(|_| "bad_key")?;
        let (clock, payload) = plain.split_at(8);
        let sent = u64::from_le_bytes(clock.try_into().expect("8 bytes"));
        if now_ms().abs_diff(sent) > MAX_AGE.as_millis() as u64 {
            return Err("stale");
        }
        Ok(payload)
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A gossip transport over a socket bound before start.
struct Prebound {
    socket: Mutex<Option<std::net::UdpSocket>>,
    key: Option<ClusterKey>,
}

#[async_trait]
impl Transport for Prebound {
    async fn open(&self, listen_addr: SocketAddr) -> anyhow::Result<Box<dyn Socket>> {
        let socket = self
            .socket
            .lock()
            .expect("poisoned")
            .take()
            .ok_or_else(|| anyhow::anyhow!("the gossip socket {listen_addr} is already in use"))?;
        socket.set_nonblocking(true)?;
        Ok(Box::new(GossipSocket {
            socket: tokio::net::UdpSocket::from_std(socket)?,
            key: self.key.clone(),
            buffer: vec![0; MAX_DATAGRAM].into_boxed_slice(),
        }))
    }
}

struct GossipSocket {
    socket: tokio::net::UdpSocket,
    key: Option<ClusterKey>,
    buffer: Box<[u8]>,
}

fn dropped(reason: &'static str, from: SocketAddr) {
    ::metrics::counter!(metrics::GOSSIP_DROPPED, "reason" => reason).increment(1);
    tracing::debug!(%from, reason, "gossip datagram dropped");
}

#[async_trait]
impl Socket for GossipSocket {
    async fn send(&mut self, to: SocketAddr, message: ChitchatMessage) -> anyhow::Result<()> {
        let plain = message.serialize_to_vec();
        let datagram = match &self.key {
            None => plain,
            Some(key) => match key.seal(&plain) {
                Some(sealed) => sealed,
                None => anyhow::bail!("sealing a gossip datagram failed"),
            },
        };
        if datagram.len() > MAX_DATAGRAM {
            // chitchat fills datagrams up to the UDP limit; the seal must not push one over it.
            dropped("too_large", to);
            return Ok(());
        }
        // An unreachable peer is its failure detector's business, not a broken socket.
        if let Err(error) = self.socket.send_to(&datagram, to).await {
            tracing::debug!(%to, %error, "gossip send failed");
        }
        Ok(())
    }

    async fn recv(&mut self) -> anyhow::Result<(SocketAddr, ChitchatMessage)> {
        loop {
            let (len, from) = match self.socket.recv_from(&mut self.buffer).await {
                Ok(received) => received,
                Err(error)
                    if matches!(
                        error.kind(),
                        std::io::ErrorKind::ConnectionRefused
                            | std::io::ErrorKind::ConnectionReset
                            | std::io::ErrorKind::OutOfMemory
                    ) =>
                {
                    continue;
                }
                Err(error) => return Err(error.into()),
            };
            let datagram = &mut self.buffer[..len];
            let mut payload: &[u8] = match &self.key {
                None => datagram,
                Some(key) => match key.open(datagram) {
                    Ok(payload) => payload,
                    Err(reason) => {
                        dropped(reason, from);
                        continue;
                    }
                },
            };
            match ChitchatMessage::deserialize(&mut payload) {
                Ok(message) => return Ok((from, message)),
                Err(_) => dropped("undecodable", from),
            }
        }
    }
}

/// A running gossip member.
pub struct Gossip {
    handle: ChitchatHandle,
    live: watch::Receiver<BTreeMap<ChitchatId, NodeState>>,
    interval: Duration,
    seeds: Vec<String>,
}

impl Gossip {
    /// Joins the cluster through `settings.seeds` (unreachable seeds are retried every round, they
    /// never stop a start) announcing `advert`.
    pub async fn start(
        settings: &Settings,
        advert: &Advert,
        network: Network,
    ) -> Result<Gossip, String> {
        let (transport, addr): (Box<dyn Transport>, SocketAddr) = match network {
            Network::Udp { socket, key } => {
                let addr = socket.local_addr().map_err(|e| e.to_string())?;
                let transport = Prebound {
                    socket: Mutex::new(Some(socket)),
                    key,
                };
                (Box::new(transport), addr)
            }
            Network::InMemory { network, addr } => (Box::new(network.0), addr),
        };
        let config = ChitchatConfig {
            chitchat_id: ChitchatId::new(settings.name.clone(), settings.generation, addr),
            cluster_id: settings.cluster.clone(),
            gossip_interval: settings.interval,
            listen_addr: addr,
            seed_nodes: settings.seeds.clone(),
            failure_detector_config: FailureDetectorConfig {
                phi_threshold: settings.phi_threshold,
                // A node seen only briefly is judged by the gossip interval, not by a 5 s prior.
                initial_interval: settings.interval,
                dead_node_grace_period: settings.dead_grace,
                ..FailureDetectorConfig::default()
            },
            marked_for_deletion_grace_period: settings.dead_grace,
            catchup_callback: None,
            extra_liveness_predicate: Some(Box::new(|state: &NodeState| {
                state.contains_key(keys::RPC)
                    && state.contains_key(keys::ROLE)
                    && !state.contains_key(keys::STOPPING)
            })),
        };
        let handle = spawn_chitchat(config, key_values(advert), transport.as_ref())
            .await
            .map_err(|e| format!("{e:#}"))?;
        let live = handle
            .with_chitchat(|chitchat| chitchat.live_nodes_watcher())
            .await;
        Ok(Gossip {
            handle,
            live,
            interval: settings.interval,
            seeds: settings.seeds.clone(),
        })
    }

    /// Announces `advert`: writes the keys whose values changed.
    pub async fn publish(&self, advert: &Advert) {
        let wanted = key_values(advert);
        self.handle
            .with_chitchat(|chitchat| {
                let state = chitchat.self_node_state();
                for (key, value) in &wanted {
                    if state.get(key) != Some(value.as_str()) {
                        state.set(key.clone(), value.clone());
                    }
                }
                let stale: Vec<String> = state
                    .key_values()
                    .map(|(key, _)| key.to_owned())
                    .filter(|key| !wanted.iter().any(|(k, _)| k == key))
                    .collect();
                for key in stale {
                    state.delete(&key);
                }
            })
            .await;
    }

    /// The adverts of the live nodes (this one included) as of now.
    pub fn live(&self) -> Vec<Advert> {
        self.live
            .borrow()
            .iter()
            .filter_map(|(id, state)| decode(id, state))
            .collect()
    }

    /// Gossips with every seed now (chitchat itself picks one at random per round): a node that
    /// looks for a ring must not miss the one its seeds know of.
    pub async fn greet_seeds(&self) {
        for seed in &self.seeds {
            let Ok(addresses) = tokio::net::lookup_host(seed.as_str()).await else {
                continue;
            };
            for address in addresses {
                let _ = self.handle.gossip(address);
            }
        }
    }

    /// The adverts of every node gossip knows of, live or not (a node counts as live only after
    /// a few heartbeats; what it announced is known before that).
    pub async fn known(&self) -> Vec<Advert> {
        self.handle
            .with_chitchat(|chitchat| {
                chitchat
                    .node_states()
                    .iter()
                    .filter_map(|(id, state)| decode(id, state))
                    .collect()
            })
            .await
    }

    /// Waits until the set of live nodes or one of their adverts changes.
    pub async fn changed(&mut self) -> Result<(), String> {
        self.live
            .changed()
            .await
            .map_err(|_| "the gossip server stopped".to_string())
    }

    /// Resolves if the gossip server ends (it only does on a broken socket).
    pub fn ended(&self) -> impl std::future::Future<Output = Result<(), String>> + use<> {
        let watcher = self.handle.termination_watcher();
        async move { watcher.await.map_err(|e| format!("{e:#}")) }
    }

    /// Announces that this node is stopping, gives the announcement a few rounds to spread, then
    /// stops gossiping.
    pub async fn leave(self) {
        self.handle
            .with_chitchat(|chitchat| chitchat.self_node_state().set(keys::STOPPING, "1"))
            .await;
        tokio::time::sleep(self.interval * 3).await;
        if let Err(error) = self.handle.shutdown().await {
            tracing::warn!(error = %format!("{error:#}"), "gossip did not stop cleanly");
        }
    }

    /// Stops at once without a word, as a killed process would (tests).
    pub fn kill(self) {
        self.handle.abort();
    }
}

fn key_values(advert: &Advert) -> Vec<(String, String)> {
    let member = &advert.member;
    let mut kvs = vec![
        (keys::ROLE.into(), member.role.as_str().into()),
        (keys::LIFECYCLE.into(), member.lifecycle.as_str().into()),
        (keys::RPC.into(), member.rpc_addr.clone()),
        (keys::REPLICATION.into(), member.replication_addr.clone()),
        (keys::HTTP.into(), member.http_addr.clone()),
        (keys::VIRTUAL_NODES.into(), member.virtual_nodes.to_string()),
        (
            keys::TAGS.into(),
            serde_json::to_string(&member.tags).expect("tags serialize"),
        ),
    ];
    if let Some(leader) = &member.leader {
        kvs.push((keys::LEADER.into(), leader.clone()));
    }
    if let Some(handed) = &member.handed {
        kvs.push((keys::HANDED.into(), handed.encode()));
    }
    if member.moving > 0 {
        kvs.push((keys::MOVING.into(), member.moving.to_string()));
    }
    if advert.ring.is_formed() {
        kvs.push((keys::RING.into(), advert.ring.id.clone()));
        kvs.push((
            keys::FOUNDERS.into(),
            serde_json::to_string(&advert.ring.founders).expect("names serialize"),
        ));
        let mut absent = advert.ring.members.clone();
        if let Some(record) = absent.remove(&member.name) {
            kvs.push((
                keys::RECORD.into(),
                serde_json::to_string(&record).expect("a record serializes"),
            ));
        }
        if !absent.is_empty() {
            kvs.push((
                keys::ABSENT.into(),
                serde_json::to_string(&absent).expect("records serialize"),
            ));
        }
    }
    if let Some(proposal) = &advert.proposal {
        kvs.push((keys::PROPOSAL.into(), proposal.clone()));
    }
    kvs
}

/// The advert of a live node; `None` (logged) if its state does not decode.
fn decode(id: &ChitchatId, state: &NodeState) -> Option<Advert> {
    let get = |key: &str| state.get(key);
    let decoded = (|| {
        let member = Member {
            name: id.node_id.to_string(),
            generation: id.generation_id,
            gossip_addr: id.gossip_advertise_addr,
            role: Role::parse(get(keys::ROLE)?)?,
            lifecycle: Lifecycle::parse(get(keys::LIFECYCLE)?)?,
            rpc_addr: get(keys::RPC)?.to_owned(),
            replication_addr: get(keys::REPLICATION)?.to_owned(),
            http_addr: get(keys::HTTP).unwrap_or_default().to_owned(),
            virtual_nodes: get(keys::VIRTUAL_NODES)?.parse().ok()?,
            tags: serde_json::from_str(get(keys::TAGS)?).ok()?,
            leader: get(keys::LEADER).map(str::to_owned),
            handed: get(keys::HANDED).and_then(|text| {
                let handed = super::Handed::decode(text, Role::parse(get(keys::ROLE)?)?);
                if handed.is_none() {
                    tracing::warn!(member = %id.node_id, handed = %text, "an announcement that does not decode is ignored");
                }
                handed
            }),
            moving: get(keys::MOVING).map_or(Some(0), |m| m.parse().ok())?,
        };
        let mut ring = Ring {
            id: get(keys::RING).unwrap_or_default().to_owned(),
            founders: match get(keys::FOUNDERS) {
                Some(founders) => serde_json::from_str(founders).ok()?,
                None => Default::default(),
            },
            members: match get(keys::ABSENT) {
                Some(absent) => serde_json::from_str(absent).ok()?,
                None => BTreeMap::new(),
            },
        };
        if let Some(record) = get(keys::RECORD) {
            ring.members
                .insert(member.name.clone(), serde_json::from_str(record).ok()?);
        }
        if ring.is_formed() && !ring.is_consistent() {
            return None;
        }
        Some(Advert {
            member,
            ring,
            proposal: get(keys::PROPOSAL).map(str::to_owned),
        })
    })();
    if decoded.is_none() {
        tracing::debug!(node = %id.node_id, "a live node's advert does not decode; ignored");
    }
    decoded
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_datagrams_open_only_with_the_same_key() {
        let key = ClusterKey::derive(b"a secret of the cluster", "goutube");
        let same = ClusterKey::derive(b"a secret of the cluster", "goutube");
        let other = ClusterKey::derive(b"another secret", "goutube");
        let other_cluster = ClusterKey::derive(b"a secret of the cluster", "elsewhere");
        let mut sealed = key.seal(b"hello").unwrap();
        assert_eq!(same.open(&mut sealed.clone()).unwrap(), b"hello");
        assert_eq!(other.open(&mut sealed.clone()), Err("bad_key"));
        assert_eq!(other_cluster.open(&mut sealed.clone()), Err("bad_key"));
        assert_eq!(key.open(&mut b"hello".to_vec()), Err("unsealed"));
        let last = sealed.len() - 1;
        sealed[last] ^= 1;
        assert_eq!(key.open(&mut sealed), Err("bad_key"), "a flipped bit");
        assert_eq!(format!("{key:?}"), "ClusterKey(<redacted>)");
    }
}
