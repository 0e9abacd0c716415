//! goutube: a cluster that stores named, append-only byte streams ("points") and streams them
//! back over gRPC.
//!
//! # Layout
//!
//! | module | owns |
//! |---|---|
//! | [`config`] | the node configuration: defaults < TOML < `GOUTUBE_…` environment, validation |
//! | [`point`] | the point store: ids, data files, journals, crash recovery, fsync policy, open-file bounds |
//! | [`api`] | the gRPC services (`streaming.v1`, health, reflection) and their handlers |
//! | [`node`] | a running node: listeners, shared state, start-up and graceful shutdown |
//! | [`net`] | accepting connections, TLS handshakes, the peer identity of each connection |
//! | [`tls`] | rustls configuration from PEM files, subjects from certificates |
//! | [`certs`] | a development PKI (rcgen): CA, node and client certificates for `goutube certs` |
//! | [`authz`] | authorization: actions, the decision cache in front of the authorizer plugin |
//! | [`plugins`] | WebAssembly plugins: engine, bindings (the one `bindgen!`), built-ins, Polar |
//! | [`placement`] | which member owns a point: members, the placement plugin, answers cached per membership version |
//! | [`client`] | the Rust client: put, multi-stream verified get, stat, list, delete |
//! | [`replication`] | leader → follower replication over Cap'n Proto RPC, on its own thread |
//! | [`metrics`] | Prometheus metric names and the `/metrics` endpoint |
//! | [`error`] | the error of a client call and its one mapping to a gRPC status |
//!
//! The `goutube` binary (`src/main.rs`, `src/cli/`) parses the command line and drives these.

pub mod api;
pub mod authz;
pub mod certs;
pub mod client;
pub mod config;
pub mod error;
pub mod metrics;
pub mod net;
pub mod node;
pub mod placement;
pub mod plugins;
pub mod point;
pub mod replication;
pub mod tls;
