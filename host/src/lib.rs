//! goutube: a cluster that stores named, append-only byte streams ("points") and streams them
//! back over gRPC.
//!
//! # Layout
//!
//! | module | owns |
//! |---|---|
//! | [`node`] | the composition root: listeners, start-up in order, shutdown in reverse |
//! | [`service`] | the one handle shape of every subsystem: `shutdown`, `terminated`, panics reported |
//! | [`services`] | what every subsystem of a node shares (config, plugins, access, placement, signer), and its one cancellation root |
//! | [`config`] | the root configuration: defaults < TOML < `GOUTUBE_…` environment, validation; `config::key`, the one error a section's check returns |
//! | [`point`] | the point store: the registry of points, one point, the file layer, ownership and quarantine, journals, ids |
//! | [`proto`] | the client API's wire: generated `streaming.v1` types, HTTP/2 settings, metadata names (a leaf) |
//! | [`api`] | the gRPC services (`streaming.v1`, health, reflection): handlers by kind (produce, consume, operator), the resolver helpers, their context |
//! | [`access`] | actions, decisions, and the one async authorization door every caller uses |
//! | [`askers`] | short blocking calls asked at once (plugin calls, a new small point's files) sharing one trip to the blocking pool |
//! | [`cache`] | the answer cache of access and placement, stamped by plugin generation and input version |
//! | [`controller`] | the Raft group (openraft) that decides the topology: the state machine, its durable log, its network over node certificates |
//! | [`cluster`] | membership by gossip (chitchat), the live view, the ring and its lifecycle states, the ring's pending change and forgotten members |
//! | [`balancer`] | the balancer role: the same API served by forwarding to the nodes that hold the data |
//! | [`placement`] | which ring member owns a point (now, after the pending change, before a member was forgotten): the placement plugin, cached per ring version |
//! | [`replication`] | leader → follower replication over Cap'n Proto RPC, on its own thread: the replicator, the follower, the handover's wire (sender, receiver, takeover), the mover's driver, typed errors |
//! | [`reshard`] | resharding's home: the move plan, the mover's planner (state in, actions out), and the gate — the one place that admits a write or a read of a point or names who does |
//! | [`plugins`] | the WebAssembly engine: bindings (the one `bindgen!`), built-ins, Polar |
//! | [`net`] | accepting connections, TLS handshakes, the peer identity of each connection |
//! | [`tls`] | rustls configuration from PEM files (and the `[tls]` section), subjects from certificates |
//! | [`certs`] | a development PKI (rcgen): CA, node and client certificates for `goutube certs` |
//! | [`http`] | the HTTP endpoints (axum): `/metrics`, and the range gateway for browsers and players |
//! | [`signed_url`] | the gateway's signed URLs: HMAC-SHA256 over point, expiry and subject, key rotation |
//! | [`content`] | content types: given with a point's first bytes, or sniffed from them |
//! | [`secret`] | secret configuration values that are never printed |
//! | [`metrics`] | Prometheus metric names and the process-wide recorder (a leaf) |
//! | [`client`] | the Rust client: put, multi-stream verified get, stat, list, delete, members |
//! | [`process`] | a `goutube run` child process and its listening line (tests, benchmarks) |
//! | [`error`] | the error of a client call and its one mapping to a gRPC status |
//! | [`text`] | text from outside the node made safe for a status or a log line: bounded, escaped (a leaf) |
//!
//! Dependencies point one way (the layer order is in `docs/structure.md`): `point`, `plugins`,
//! `metrics`, `proto`, `tls` and `net` never import the modules above them; contexts borrow
//! from [`services`], never from [`node`]; `client` stands on `proto`, never on `api`; `api`, `http` and
//! `balancer` ask `reshard::gate` who takes a point, and only `placement` and the gate derive
//! ownership; only `cluster::gossip` imports chitchat; only `replication` touches capnp.
//! The `goutube` binary (`src/main.rs`, `src/cli/`) parses the command line and drives these.

pub mod access;
pub mod api;
pub(crate) mod askers;
pub(crate) mod balancer;
pub(crate) mod cache;
pub mod certs;
pub mod client;
pub mod cluster;
pub mod config;
pub(crate) mod content;
pub mod controller;
pub mod error;
pub(crate) mod http;
pub mod metrics;
pub mod net;
pub mod netns;
pub mod node;
pub mod placement;
pub mod plugins;
pub mod point;
pub mod process;
pub mod proto;
pub(crate) mod replication;
pub mod reshard;
pub mod secret;
pub(crate) mod service;
pub(crate) mod services;
pub(crate) mod signed_url;
pub mod text;
pub(crate) mod tls;
