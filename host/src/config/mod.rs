//! Node configuration: built-in defaults < TOML file (`--config`) < `GOUTUBE_…` environment.
//!
//! The root [`Config`] composes the sections and validates each. A section lives beside its
//! owner when that owner is a layer below the configuration (`[cluster]` in `cluster`,
//! `[plugins]` in `plugins`, `[tls]` in `tls`); the sections of owners above it live here
//! (`[http]`, `[controller]`, `[storage]`, `[replication]`, `[reshard]`), so the configuration
//! imports nothing above it.
//!
//! Nested keys use `__` in the environment (`GOUTUBE_STORAGE__FSYNC=never`). Variables named
//! `GOUTUBE_CLIENT_…` belong to the command-line client and are not node configuration. Unknown
//! keys are errors, and [`Config::validate`] runs right after extraction and names the key at
//! fault. Every key is listed in `docs/config.md`.

mod controller;
mod http;
pub mod key;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

pub use crate::cluster::{ClusterSection, Role};
use crate::config::key::InvalidKey;
pub use crate::plugins::{PluginSection, PluginsSection};
use crate::point::{Fsync, StoreConfig};
pub use crate::tls::{PeerTlsSection, TlsSection};
pub use controller::{ControllerSection, check_voter_count};
pub use http::HttpSection;

/// The node's configuration (`docs/config.md`): defaults < TOML < `GOUTUBE_…` environment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Unique name of this node in the cluster (default: the host name).
    pub node_name: String,
    /// What it does: `standalone`, `leader`, `follower` or `balancer`.
    pub role: Role,
    /// Root of the node's files: `points/` and `plugin-cache/`.
    pub data_dir: PathBuf,
    /// Gossip (membership) address, UDP; its IP is also the interface every listener binds to
    /// and the address other members are told to use.
    pub bind_addr: SocketAddr,
    /// gRPC client API port (0 = any free port).
    pub rpc_port: u16,
    /// Node-to-node replication port (0 = any free port).
    pub replication_port: u16,
    /// Prometheus `/metrics` port (0 = any free port).
    pub metrics_port: u16,
    /// HTTP range gateway port (0 = any free port).
    pub http_port: u16,
    /// Membership addresses of existing members to join through.
    pub seed_addresses: Vec<String>,
    /// Virtual nodes this member places on the placement ring.
    pub virtual_node_count: u32,
    /// For a follower: the replication address of its leader.
    pub leader_addresses: Vec<String>,
    /// Default and largest frame a read returns, in bytes.
    pub max_chunk_size: u64,
    /// Largest frame a client may produce, in bytes.
    pub max_frame_size: u64,
    /// Share of a point's replicas offered as workers for multi-stream downloads.
    pub multi_stream_percent: u8,
    /// How long shutdown waits for open streams before cancelling them.
    pub shutdown_grace_ms: u64,
    /// Labels of this node for placement, for example `{ zone = "eu-1" }`.
    pub tags: BTreeMap<String, String>,
    /// `[cluster]`: gossip and the ring.
    pub cluster: ClusterSection,
    /// `[controller]`: the Raft group that decides the topology.
    pub controller: ControllerSection,
    /// `[http]`: the gateway.
    pub http: HttpSection,
    /// `[log]`.
    pub log: LogConfig,
    /// `[storage]`: the point store.
    pub storage: StorageSection,
    /// `[plugins]`: the WebAssembly components.
    pub plugins: PluginsSection,
    /// `[replication]`: acknowledgements and windows.
    pub replication: ReplicationSection,
    /// `[reshard]`: moves and fences.
    pub reshard: ReshardSection,
    /// mTLS on every listener and for node-to-node connections; absent = plaintext (development).
    pub tls: Option<TlsSection>,
}

/// How points are handed to a new owner (`docs/resharding.md`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReshardSection {
    /// How long a write to a point being handed over waits at the fence before it fails with
    /// `Unavailable` (retryable).
    pub fence_timeout_ms: u64,
    /// Points this node hands over at once; 0 pauses resharding on this node (no handover
    /// starts, resumes or is given up, and no join is announced as handed).
    pub max_concurrent_moves: usize,
    /// How close the new owner's copy must be to the old owner's end before writes are fenced:
    /// what is left is copied while writers wait.
    pub fence_lag_bytes: u64,
    /// Bytes per second this node sends to each member it hands points to; 0: no throttle. A
    /// point written faster than this never catches up: its move is reported `stalled`.
    pub max_bytes_per_sec: u64,
    /// How long the ring's pending change and the live view must stay the same before moves
    /// start: a member that flaps, or a change that is replaced at once, starts and cancels
    /// nothing.
    pub settle_ms: u64,
    /// How long the new owner of a forgotten primary's point waits for every live follower of
    /// that primary to offer its copy before it takes the most complete one offered.
    pub forget_wait_ms: u64,
}

impl Default for ReshardSection {
    fn default() -> Self {
        Self {
            fence_timeout_ms: 2_000,
            max_concurrent_moves: 2,
            fence_lag_bytes: 1024 * 1024,
            max_bytes_per_sec: 0,
            settle_ms: 1_000,
            forget_wait_ms: 5_000,
        }
    }
}

/// How a leader replicates to its followers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReplicationSection {
    /// When a produce is acknowledged: `"local"` (after the leader's own durable write) or
    /// `{ replicas = N }` (after N followers confirmed it).
    pub ack: Ack,
    /// How long a produce waits for its replicas before failing with `Unavailable` (the data
    /// stays on the leader and still replicates).
    pub ack_timeout_ms: u64,
    /// Records in flight to one follower.
    pub window: usize,
    /// How long an in-sync follower may stay disconnected, or behind by more than
    /// `in_sync_max_lag_bytes`, before its leader takes it out of the in-sync set (and stops
    /// waiting for it once that is committed; `docs/failover.md`).
    pub in_sync_timeout_ms: u64,
    /// Unconfirmed bytes past which an in-sync follower counts as behind.
    pub in_sync_max_lag_bytes: u64,
    /// The most points a follower offers its leader in one message (its hello, then
    /// `Session.offer` calls; `docs/replication.md`): about 80 bytes each.
    pub offers_per_message: u32,
}

/// How a group whose leader is lost gets a new one (its leader's configuration decides; the
/// controller keeps what the leader reported, `docs/failover.md`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Failover {
    /// The controller fences a leader whose session expired and names an in-sync follower;
    /// the leader stops taking writes when its session lapses. A follower named leader keeps
    /// the group's acknowledgement: `replicas` followers at least, and its in-sync set.
    Automatic {
        /// `replication.ack`'s replicas.
        replicas: u32,
    },
    /// An operator decides (`goutube members forget`), for the reason given: a failover could
    /// lose acknowledged bytes.
    Manual(String),
}

/// The acknowledgement mode of produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Ack {
    /// Once durable on this node as `storage.fsync` says.
    Local,
    /// Once this many followers confirmed the bytes too.
    Replicas(u32),
}

impl Default for ReplicationSection {
    fn default() -> Self {
        Self {
            ack: Ack::Local,
            ack_timeout_ms: 5_000,
            window: 16,
            in_sync_timeout_ms: 2_000,
            in_sync_max_lag_bytes: 64 * 1024 * 1024,
            offers_per_message: 65_536,
        }
    }
}

/// The `[log]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A `tracing` filter: `info`, `goutube=debug,h2=warn`, …
    pub level: String,
}

/// The `[storage]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageSection {
    /// When appended bytes are synced: `always`, `interval` or `never`.
    pub fsync: Fsync,
    /// Group-commit period for `fsync = "interval"`.
    pub fsync_interval_ms: u64,
    /// Most points with open file handles at once.
    pub max_open_points: usize,
    /// Points unused for this long are closed.
    pub idle_close_ms: u64,
    /// A new point whose first write is all it holds and at most this many bytes is packed
    /// into a shared segment instead of files of its own (0: never).
    pub packed_max: u64,
}

/// A configuration that could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Not a source: figment's own text repeats the profile and the message, and ours says it
    /// once, with the key as it was written.
    #[error("{}", describe_figment(.0))]
    Extract(Box<figment::Error>),
    /// A value is out of its range, or does not fit with another.
    #[error("config key `{key}`: {message}")]
    Invalid {
        /// The key, as written.
        key: &'static str,
        /// What is wrong.
        message: String,
    },
    /// The `[plugins]` section names something unusable.
    #[error("{0}")]
    Plugin(crate::plugins::PluginError),
    /// The `[tls]` section names something unusable.
    #[error("{0}")]
    Tls(crate::tls::TlsError),
}

impl From<InvalidKey> for ConfigError {
    fn from(InvalidKey { key, message }: InvalidKey) -> Self {
        ConfigError::Invalid { key, message }
    }
}

/// Node names travel in gossip, certificates (`node:<name>`) and gRPC metadata: keep them plain.
pub fn valid_node_name(name: &str) -> bool {
    (1..=128).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b':'))
}

impl From<Box<figment::Error>> for ConfigError {
    fn from(error: Box<figment::Error>) -> Self {
        ConfigError::Extract(error)
    }
}

/// Each of figment's errors once, naming the key as it was written (`storage.fsync` in a
/// file, `GOUTUBE_STORAGE__FSYNC` in the environment) and where, with a suggestion for a
/// misspelt key or value.
fn describe_figment(error: &figment::Error) -> String {
    error
        .clone()
        .into_iter()
        .map(|error| {
            let from_environment = error
                .metadata
                .as_ref()
                .is_some_and(|m| m.name.contains("environment"));
            let key = match from_environment {
                true => format!("GOUTUBE_{}", error.path.join("__").to_ascii_uppercase()),
                false => error.path.join("."),
            };
            let source = match error.metadata.as_ref().and_then(|m| m.source.as_ref()) {
                Some(source) => format!(" in {source}"),
                None => String::new(),
            };
            let what = match &error.kind {
                figment::error::Kind::UnknownField(found, expected) => {
                    format!("unknown key{}", did_you_mean(found, expected, "keys here"))
                }
                figment::error::Kind::UnknownVariant(found, expected) => format!(
                    "unknown value `{found}`{}",
                    did_you_mean(found, expected, "values")
                ),
                kind => kind.to_string(),
            };
            match key.is_empty() {
                true => format!("{what}{source}"),
                false => format!("config key `{key}`{source}: {what}"),
            }
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// `; did you mean `x`?` for the one of `expected` closest to `found`, if one is close; else
/// the list of them (`what`: "keys here", "values").
fn did_you_mean(found: &str, expected: &[&str], what: &str) -> String {
    let closest = expected
        .iter()
        .map(|candidate| (strsim::jaro_winkler(found, candidate), candidate))
        .filter(|(likeness, _)| *likeness > 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0));
    match closest {
        Some((_, candidate)) => format!("; did you mean `{candidate}`?"),
        None => format!("; the {what}: {}", expected.join(", ")),
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            node_name: default_node_name(),
            role: Role::Standalone,
            data_dir: PathBuf::from("goutube-data"),
            bind_addr: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 8401),
            rpc_port: 8400,
            replication_port: 8402,
            metrics_port: 9400,
            http_port: 8403,
            seed_addresses: Vec::new(),
            virtual_node_count: 64,
            leader_addresses: Vec::new(),
            max_chunk_size: 256 * 1024,
            max_frame_size: 4 * 1024 * 1024,
            multi_stream_percent: 100,
            shutdown_grace_ms: 10_000,
            tags: BTreeMap::new(),
            cluster: ClusterSection::default(),
            controller: ControllerSection::default(),
            http: HttpSection::default(),
            log: LogConfig::default(),
            storage: StorageSection::default(),
            plugins: PluginsSection::default(),
            replication: ReplicationSection::default(),
            reshard: ReshardSection::default(),
            tls: None,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
        }
    }
}

impl Default for StorageSection {
    fn default() -> Self {
        Self {
            fsync: Fsync::Always,
            fsync_interval_ms: 100,
            max_open_points: 1024,
            idle_close_ms: 60_000,
            // `docs/storage.md`, "Small points packed into segments".
            packed_max: 64 * 1024,
        }
    }
}

fn default_node_name() -> String {
    let host = gethostname::gethostname().to_string_lossy().into_owned();
    if host.is_empty() {
        "goutube".into()
    } else {
        host
    }
}

impl Config {
    /// Loads defaults, then `file` (if given), then the `GOUTUBE_…` environment, and validates.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(file) = file {
            if !file.is_file() {
                return Err(ConfigError::Invalid {
                    key: "--config",
                    message: format!("{} is not a readable file", file.display()),
                });
            }
            figment = figment.merge(Toml::file(file));
        }
        figment = figment.merge(
            Env::prefixed("GOUTUBE_")
                .split("__")
                .filter(|key| !key.as_str().to_ascii_lowercase().starts_with("client_")),
        );
        Self::from_figment(figment)
    }

    /// Extracts and validates a configuration from any figment (tests build them in memory).
    pub fn from_figment(figment: Figment) -> Result<Self, ConfigError> {
        let config: Config = figment.extract().map_err(Box::new)?;
        config.validate()?;
        Ok(config)
    }

    /// Checks the values serde cannot: ranges and keys that depend on each other.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_node()?;
        self.validate_sections()?;
        self.plugins.validate().map_err(ConfigError::Plugin)
    }

    /// The node's own keys: its name and address, frame and chunk sizes, its role.
    fn validate_node(&self) -> Result<(), ConfigError> {
        let invalid = |key, message: String| Err(ConfigError::Invalid { key, message });
        if !valid_node_name(&self.node_name) {
            return invalid(
                "node_name",
                format!(
                    "{:?} must be 1 to 128 letters, digits, '.', '-', '_' or ':'",
                    self.node_name
                ),
            );
        }
        if self.bind_addr.ip().is_unspecified() {
            return invalid(
                "bind_addr",
                format!(
                    "{} is announced to the other members; give the IP of an interface they reach",
                    self.bind_addr
                ),
            );
        }
        if self.max_frame_size == 0 || self.max_frame_size > 64 * 1024 * 1024 {
            return invalid(
                "max_frame_size",
                format!("{} must be within 1..=67108864", self.max_frame_size),
            );
        }
        if self.max_chunk_size == 0 || self.max_chunk_size > self.max_frame_size {
            return invalid(
                "max_chunk_size",
                format!(
                    "{} must be within 1..=max_frame_size ({})",
                    self.max_chunk_size, self.max_frame_size
                ),
            );
        }
        if !(1..=100).contains(&self.multi_stream_percent) {
            return invalid(
                "multi_stream_percent",
                format!("{} must be within 1..=100", self.multi_stream_percent),
            );
        }
        if self.virtual_node_count == 0 {
            return invalid("virtual_node_count", "must be at least 1".into());
        }
        match (self.role, self.leader_addresses.is_empty()) {
            (Role::Follower, true) => {
                return invalid(
                    "leader_addresses",
                    "a follower needs the address of its leader".into(),
                );
            }
            (Role::Standalone | Role::Leader | Role::Balancer, false) => {
                return invalid(
                    "leader_addresses",
                    format!(
                        "only followers name a leader; this node's role is {}",
                        self.role.as_str()
                    ),
                );
            }
            _ => {}
        }
        Ok(())
    }

    /// The sections: storage, log, cluster, HTTP, replication and TLS.
    fn validate_sections(&self) -> Result<(), ConfigError> {
        let invalid = |key, message: String| Err(ConfigError::Invalid { key, message });
        if self.storage.fsync == Fsync::Interval && self.storage.fsync_interval_ms == 0 {
            return invalid(
                "storage.fsync_interval_ms",
                "must be at least 1 with fsync = \"interval\"".into(),
            );
        }
        if self.storage.max_open_points == 0 {
            return invalid("storage.max_open_points", "must be at least 1".into());
        }
        if self.storage.idle_close_ms == 0 {
            return invalid("storage.idle_close_ms", "must be at least 1".into());
        }
        if self.storage.packed_max > crate::point::MAX_PACKED {
            return invalid(
                "storage.packed_max",
                format!("must be at most {}", crate::point::MAX_PACKED),
            );
        }
        if let Err(error) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            return invalid("log.level", format!("{:?}: {error}", self.log.level));
        }
        self.cluster.validate()?;
        self.http.validate()?;
        self.controller.validate()?;
        if self.controller.voters.contains(&self.node_name) && !self.role.is_primary() {
            return invalid(
                "controller.voters",
                format!(
                    "{} is a {}: voters are primaries (leaders or standalone nodes)",
                    self.node_name,
                    self.role.as_str()
                ),
            );
        }
        match self.replication.ack {
            Ack::Replicas(0) => {
                return invalid(
                    "replication.ack",
                    "replicas must be at least 1 (or use \"local\")".into(),
                );
            }
            Ack::Replicas(_) if self.role != Role::Leader => {
                return invalid(
                    "replication.ack",
                    format!(
                        "waiting for replicas needs role = \"leader\"; this node is {}",
                        self.role.as_str()
                    ),
                );
            }
            _ => {}
        }
        if self.replication.ack_timeout_ms == 0 {
            return invalid("replication.ack_timeout_ms", "must be at least 1".into());
        }
        if self.replication.in_sync_timeout_ms == 0 {
            return invalid(
                "replication.in_sync_timeout_ms",
                "must be at least 1".into(),
            );
        }
        if self.replication.window == 0 {
            return invalid("replication.window", "must be at least 1".into());
        }
        if self.replication.offers_per_message == 0 {
            return invalid(
                "replication.offers_per_message",
                "must be at least 1".into(),
            );
        }
        if let Some(tls) = &self.tls {
            tls.validate().map_err(ConfigError::Tls)?;
            if !self.cluster.has_key() {
                return invalid(
                    "cluster.key",
                    "with [tls] on, gossip must be sealed too: set cluster.key_file (or GOUTUBE_CLUSTER__KEY)"
                        .into(),
                );
            }
        }
        Ok(())
    }

    /// The address of a listener on this node's interface.
    pub fn listen_addr(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.bind_addr.ip(), port)
    }

    /// Where the cluster state (the ring) is kept.
    pub fn cluster_dir(&self) -> PathBuf {
        crate::cluster::dir(&self.data_dir)
    }

    /// Where the controller's files (its Raft log, vote and snapshot) are kept.
    pub fn controller_dir(&self) -> PathBuf {
        self.data_dir.join("controller")
    }

    /// Whether a group this node leads can fail over by itself without losing an
    /// acknowledged byte (`docs/failover.md`): only if every acknowledged byte is durable on an
    /// in-sync follower as well as here.
    pub fn failover(&self) -> Failover {
        let replicas = match self.replication.ack {
            Ack::Replicas(replicas) if replicas > 0 => replicas,
            _ => {
                return Failover::Manual(
                    "replication.ack = \"local\": an acknowledged byte may be on the leader alone"
                        .into(),
                );
            }
        };
        if self.storage.fsync != Fsync::Always {
            return Failover::Manual(
                "storage.fsync is not \"always\": an acknowledged byte may not be durable yet"
                    .into(),
            );
        }
        Failover::Automatic { replicas }
    }

    /// The point store's settings.
    pub fn store_config(&self) -> StoreConfig {
        StoreConfig {
            dir: self.data_dir.join("points"),
            fsync: self.storage.fsync,
            fsync_interval: Duration::from_millis(self.storage.fsync_interval_ms),
            max_open: self.storage.max_open_points,
            idle_close: Duration::from_millis(self.storage.idle_close_ms),
            packed_max: self.storage.packed_max,
        }
    }
}

#[cfg(test)]
// `Jail::expect_with` closures return figment's (large) error type by its API.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;
    use figment::Jail;

    #[test]
    fn a_group_fails_over_by_itself_only_when_every_acknowledged_byte_is_durable_on_a_follower() {
        let mut config = Config::default();
        let manual = |config: &Config| match config.failover() {
            Failover::Manual(why) => why,
            automatic => panic!("{automatic:?}"),
        };
        assert!(manual(&config).contains("replication.ack"));
        config.replication.ack = Ack::Replicas(2);
        assert_eq!(config.failover(), Failover::Automatic { replicas: 2 });
        config.storage.fsync = Fsync::Interval;
        assert!(manual(&config).contains("storage.fsync"));
    }

    fn load_err(file: &str, body: &str) -> String {
        let mut message = String::new();
        Jail::expect_with(|jail| {
            jail.create_file(file, body)?;
            message = Config::load(Some(Path::new(file))).unwrap_err().to_string();
            Ok(())
        });
        message
    }

    #[test]
    fn defaults_apply_and_validate() {
        let config = Config::default();
        config.validate().unwrap();
        assert_eq!(config.max_chunk_size, 262_144);
        assert_eq!(config.multi_stream_percent, 100);
        assert_eq!(config.role, Role::Standalone);
    }

    #[test]
    fn file_then_environment_override_defaults() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "node.toml",
                "rpc_port = 7000\n[storage]\nfsync = \"interval\"\n",
            )?;
            jail.set_env("GOUTUBE_RPC_PORT", "7001");
            jail.set_env("GOUTUBE_STORAGE__MAX_OPEN_POINTS", "7");
            jail.set_env("GOUTUBE_CLIENT_ADDR", "http://ignored-by-the-node");
            let config = Config::load(Some(Path::new("node.toml"))).unwrap();
            assert_eq!(config.rpc_port, 7001);
            assert_eq!(config.storage.fsync, Fsync::Interval);
            assert_eq!(config.storage.max_open_points, 7);
            assert_eq!(config.max_chunk_size, 262_144);
            Ok(())
        });
    }

    #[test]
    fn tls_requires_a_cluster_key_and_keys_are_never_printed() {
        Jail::expect_with(|jail| {
            for file in ["ca.pem", "cert.pem", "key.pem"] {
                jail.create_file(file, "not checked here")?;
            }
            let tls = "[tls]\nca = \"ca.pem\"\ncert = \"cert.pem\"\nkey = \"key.pem\"\n";
            jail.create_file("node.toml", tls)?;
            let message = Config::load(Some(Path::new("node.toml")))
                .unwrap_err()
                .to_string();
            assert!(message.contains("cluster.key"), "{message}");
            jail.set_env("GOUTUBE_CLUSTER__KEY", "the very secret cluster key");
            let config = Config::load(Some(Path::new("node.toml"))).unwrap();
            let printed = format!("{config:?}");
            assert!(!printed.contains("very secret"), "{printed}");
            assert!(config.cluster.gossip_key().unwrap().is_some());
            Ok(())
        });
    }

    #[test]
    fn unknown_keys_are_named() {
        let message = load_err("node.toml", "[storage]\nfsink = \"always\"\n");
        assert!(message.contains("fsink"), "{message}");
        let message = load_err("node.toml", "rpc_prot = 1\n");
        assert!(message.contains("rpc_prot"), "{message}");
    }

    #[test]
    fn invalid_values_name_their_key() {
        for (body, key) in [
            ("max_chunk_size = 0", "max_chunk_size"),
            ("multi_stream_percent = 0", "multi_stream_percent"),
            ("role = \"follower\"", "leader_addresses"),
            ("log = { level = \"info,[\" }", "log.level"),
            (
                "storage = { fsync = \"interval\", fsync_interval_ms = 0 }",
                "storage.fsync_interval_ms",
            ),
            ("storage = { packed_max = 1048577 }", "storage.packed_max"),
        ] {
            let message = load_err("node.toml", body);
            assert!(message.contains(key), "{body}: {message}");
        }
        for (body, key) in [
            ("node_name = \"a b\"", "node_name"),
            ("node_name = \"née\"", "node_name"),
            ("bind_addr = \"0.0.0.0:8401\"", "bind_addr"),
            (
                "cluster = { bootstrap_expect = 0 }",
                "cluster.bootstrap_expect",
            ),
            (
                "cluster = { gossip_interval_ms = 1 }",
                "cluster.gossip_interval_ms",
            ),
            ("cluster = { key = \"short\" }", "cluster.key"),
            (
                "cluster = { key_file = \"/nonexistent/key\" }",
                "cluster.key_file",
            ),
            // The static member list is gone: membership is gossiped.
            ("[[members]]\nname = \"b\"\naddress = \"x:1\"", "members"),
        ] {
            let message = load_err("node.toml", body);
            assert!(message.contains(key), "{body}: {message}");
        }
        let message = load_err("node.toml", "storage = { fsync = \"sometimes\" }");
        assert!(
            message.contains("sometimes") && message.contains("storage.fsync"),
            "{message}"
        );
    }
}
