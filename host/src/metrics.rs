//! Prometheus metrics: the names every module records under and the process-wide recorder.
//!
//! A leaf: modules record through the `metrics` facade with the constants below. The recorder is
//! process-wide (the `metrics` crate has one global recorder), installed once by the first node
//! that starts; every node in the process serves the same registry (the `http` module).

use std::sync::{LazyLock, OnceLock};

use metrics::{Counter, Histogram};

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// Bytes received in ProduceStream frames.
pub const PRODUCED_BYTES: &str = "goutube_produce_bytes_total";
/// Frames received by ProduceStream.
pub const PRODUCED_FRAMES: &str = "goutube_produce_frames_total";
/// Bytes sent in ConsumeStream frames.
pub const CONSUMED_BYTES: &str = "goutube_consume_bytes_total";
/// Frames sent by ConsumeStream.
pub const CONSUMED_FRAMES: &str = "goutube_consume_frames_total";
/// Appends written to points.
pub const APPENDS: &str = "goutube_appends_total";
/// Bytes appended to points.
pub const APPENDED_BYTES: &str = "goutube_appended_bytes_total";
/// fsync calls (data file and journal of one point).
pub const FSYNCS: &str = "goutube_fsyncs_total";
/// Trips to the blocking pool of short calls asked at once (`askers.rs`), by `queue`: `plugins`
/// (authorization, placement) or `storage` (a point's files under `fsync = "never"`).
pub const BLOCKING_TRIPS: &str = "goutube_blocking_trips_total";
/// Latency of syncing one point.
pub const FSYNC_SECONDS: &str = "goutube_fsync_seconds";
/// Bytes verified by crash recovery.
pub const RECOVERED_BYTES: &str = "goutube_recovery_verified_bytes_total";
/// Points with open file handles.
pub const OPEN_POINTS: &str = "goutube_open_points";
/// Errors returned to clients, by gRPC status code.
pub const ERRORS: &str = "goutube_errors_total";
/// Calls into WebAssembly plugins.
pub const PLUGIN_CALLS: &str = "goutube_plugin_calls_total";
/// Plugin calls that trapped, timed out or ran out of memory.
pub const PLUGIN_ERRORS: &str = "goutube_plugin_errors_total";
/// Latency of plugin calls.
pub const PLUGIN_CALL_SECONDS: &str = "goutube_plugin_call_seconds";
/// Lines plugins logged (their log import, what they printed to stdout and stderr).
pub const PLUGIN_OUTPUT_LINES: &str = "goutube_plugin_output_lines_total";
/// Plugin log lines left out over the per-plugin rate limit.
pub const PLUGIN_OUTPUT_SUPPRESSED: &str = "goutube_plugin_output_suppressed_total";
/// Authorization decisions served from the cache.
pub const AUTHZ_CACHE_HITS: &str = "goutube_authz_cache_hits_total";
/// Plugin reloads (SIGHUP), by result.
pub const PLUGIN_RELOADS: &str = "goutube_plugin_reloads_total";
/// Bytes a follower has not confirmed.
pub const REPLICATION_LAG_BYTES: &str = "goutube_replication_lag_bytes";
/// Bytes shipped to or applied from a peer.
pub const REPLICATED_BYTES: &str = "goutube_replicated_bytes_total";
/// Bytes a leader read back from its points to replicate (the rest went from live appends).
pub const REPLICATION_READ_BACK: &str = "goutube_replication_read_back_bytes_total";
/// Replication records rejected on receipt.
pub const REPLICATION_REJECTED: &str = "goutube_replication_rejected_records_total";
/// Replication records not sent: the bundler failed on them, or their bundle was too large (by reason).
pub const REPLICATION_UNSENT: &str = "goutube_replication_unsent_records_total";
/// Follower copies found holding other bytes than the leader's (found by an offer's CRC or by an acknowledgement), cut back or replaced.
pub const REPLICATION_DIVERGENCES: &str = "goutube_replication_divergences_total";
/// Bytes of a deposed leader's tail cut from this follower's copies (kept in quarantine).
pub const REPLICATION_CUT_BYTES: &str = "goutube_replication_cut_bytes_total";
/// Replication tasks that died (a panic); their session was closed and starts again.
pub const REPLICATION_TASK_FAILURES: &str = "goutube_replication_task_failures_total";
/// Followers connected to this leader.
pub const FOLLOWERS: &str = "goutube_followers";
/// Followers in the committed in-sync set of the group this node leads.
pub const IN_SYNC_FOLLOWERS: &str = "goutube_in_sync_followers";
/// 1 while the group this node leads has a follower outside its committed in-sync set (0
/// otherwise): summed over the cluster, the under-replicated groups.
pub const UNDER_REPLICATED_GROUPS: &str = "goutube_under_replicated_groups";
/// Changes of its group's in-sync set this leader had committed, by change (entered, left).
pub const IN_SYNC_CHANGES: &str = "goutube_in_sync_changes_total";
/// 1 while this member holds a session with the controller (its heartbeats are answered), 0
/// once it lapsed: a group leader takes no writes then.
pub const SESSION_HELD: &str = "goutube_session_held";
/// Leaders the controller fenced, naming another from the in-sync set (on the controller
/// leader), by cause (`expired`: its session; `unclean`: back from an unclean stop).
pub const FAILOVERS: &str = "goutube_failovers_total";
/// How long committing a fence took, from the moment it was due (on the controller leader).
pub const FAILOVER_SECONDS: &str = "goutube_failover_commit_seconds";
/// Groups this node, their leader, handed to an in-sync member (a transfer, a graceful stop).
pub const TRANSFERS: &str = "goutube_leadership_transfers_total";
/// How long this node held writes back to hand a group over.
pub const TRANSFER_HOLD_SECONDS: &str = "goutube_leadership_transfer_hold_seconds";
/// Writes a group leader refused because its session with the controller lapsed.
pub const SELF_FENCED: &str = "goutube_self_fenced_writes_total";
/// Replication peers the authorizer did not allow to replicate.
pub const REPLICATION_REFUSED: &str = "goutube_replication_refused_total";
/// Replication calls a follower refused because they came from a deposed leader (an epoch
/// older than one it knows for its group).
pub const REPLICATION_STALE_EPOCHS: &str = "goutube_replication_stale_epochs_total";
/// Points a follower offered at a newer ownership epoch than this leader's (left alone).
pub const REPLICATION_NEWER_COPIES: &str = "goutube_replication_newer_copies_total";
/// Commit marks this leader sent a follower (a point's committed end, told as it moves).
pub const REPLICATION_COMMIT_MARKS: &str = "goutube_replication_commit_marks_total";
/// Walks of every point a leader made again for a follower after it missed store events.
pub const REPLICATION_RESCANS: &str = "goutube_replication_rescans_total";
/// Writes that waited at a handover's fence longer than reshard.fence_timeout_ms.
pub const FENCE_TIMEOUTS: &str = "goutube_reshard_fence_timeouts_total";
/// Points this node is handing to their new owner now.
pub const RESHARD_MOVES_IN_FLIGHT: &str = "goutube_reshard_moves_in_flight";
/// Bytes the new owners of the points in flight have yet to confirm.
pub const RESHARD_LAG_BYTES: &str = "goutube_reshard_lag_bytes";
/// Points this node handed to their new owner (committed there).
pub const RESHARD_MOVED_POINTS: &str = "goutube_reshard_moved_points_total";
/// Times the mover listed every point this node holds to plan moves (once per ring change,
/// and again only when points came or went; never once per tick).
pub const RESHARD_LISTINGS: &str = "goutube_reshard_listings_total";
/// Points this node took over from their old owner.
pub const RESHARD_RECEIVED_POINTS: &str = "goutube_reshard_received_points_total";
/// Bytes of points handed over that the new owner did not hold yet.
pub const RESHARD_MOVED_BYTES: &str = "goutube_reshard_moved_bytes_total";
/// Handovers that failed and will be tried again.
pub const RESHARD_FAILED_MOVES: &str = "goutube_reshard_failed_moves_total";
/// Handovers stopped before their fence because the ring no longer sends the point there.
pub const RESHARD_STOPPED_MOVES: &str = "goutube_reshard_stopped_moves_total";
/// Copies of a forgotten primary's points offered here with bytes this node did not take over (reported, not merged).
pub const TAKEOVER_DIVERGED: &str = "goutube_takeover_diverged_copies_total";
/// Copies kept aside in <data_dir>/quarantine: bytes only this node held when it stepped down after being forgotten.
pub const QUARANTINED_POINTS: &str = "goutube_quarantined_points";
/// Copies handed over and then deleted here, their new owner holding them replicated.
pub const RESHARD_CLEANED_POINTS: &str = "goutube_reshard_cleaned_points_total";
/// How long writes of a point were fenced in its handover (seal to switch).
pub const RESHARD_FENCE_SECONDS: &str = "goutube_reshard_fence_seconds";
/// Connections refused during the TLS handshake, by listener.
pub const TLS_HANDSHAKE_FAILURES: &str = "goutube_tls_handshake_failures_total";
/// Gossip datagrams dropped: bad_key, unsealed, stale, undecodable, too_large.
pub const GOSSIP_DROPPED: &str = "goutube_gossip_dropped_total";
/// Requests answered by the HTTP gateway, by status.
pub const HTTP_REQUESTS: &str = "goutube_http_requests_total";
/// Bytes of points sent by the HTTP gateway.
pub const HTTP_BYTES: &str = "goutube_http_bytes_total";
/// Connections the HTTP gateway serves now.
pub const HTTP_CONNECTIONS: &str = "goutube_http_connections";
/// Connections over `http.max_connections`, answered `503` with `Retry-After`.
pub const HTTP_CONNECTIONS_REFUSED: &str = "goutube_http_connections_refused_total";
/// HTTP connections closed for a timeout: `header` (a request head not sent in time, idle
/// connections too), `send` (a client that took no byte in time).
pub const HTTP_TIMEOUTS: &str = "goutube_http_timeouts_total";
/// Connections closed at accept, past a listener's cap and the margin answered `503`.
pub const CONNECTIONS_DROPPED: &str = "goutube_connections_dropped_total";
/// Members this node sees alive (itself included).
pub const MEMBERS_LIVE: &str = "goutube_members_live";
/// Members of the ring, by lifecycle state and liveness.
pub const RING_MEMBERS: &str = "goutube_ring_members";

/// 1, labelled with the node's `version` and the `rustc` that built it.
pub const BUILD_INFO: &str = "goutube_build_info";
/// gRPC calls started, by `grpc_service` and `grpc_method`.
pub const GRPC_STARTED: &str = "goutube_grpc_server_started_total";
/// gRPC calls finished, by `grpc_service`, `grpc_method` and `grpc_code`.
pub const GRPC_HANDLED: &str = "goutube_grpc_server_handled_total";
/// How long gRPC calls took, to their last message, by `grpc_service` and `grpc_method`.
pub const GRPC_HANDLING_SECONDS: &str = "goutube_grpc_server_handling_seconds";
/// How long the HTTP endpoints took to answer (to the response's head), by `route`.
pub const HTTP_REQUEST_SECONDS: &str = "goutube_http_request_duration_seconds";

/// Every metric without labels: each is registered at zero when the recorder is installed, so
/// dashboards and `absent()` alerts see it on a fresh node.
const UNLABELLED: &[&str] = &[
    PRODUCED_BYTES,
    PRODUCED_FRAMES,
    CONSUMED_BYTES,
    CONSUMED_FRAMES,
    APPENDS,
    APPENDED_BYTES,
    FSYNCS,
    RECOVERED_BYTES,
    AUTHZ_CACHE_HITS,
    REPLICATION_READ_BACK,
    REPLICATION_REJECTED,
    REPLICATION_CUT_BYTES,
    TRANSFERS,
    SELF_FENCED,
    REPLICATION_REFUSED,
    REPLICATION_STALE_EPOCHS,
    REPLICATION_NEWER_COPIES,
    FENCE_TIMEOUTS,
    RESHARD_MOVED_POINTS,
    RESHARD_LISTINGS,
    RESHARD_RECEIVED_POINTS,
    RESHARD_MOVED_BYTES,
    RESHARD_FAILED_MOVES,
    RESHARD_STOPPED_MOVES,
    TAKEOVER_DIVERGED,
    RESHARD_CLEANED_POINTS,
    HTTP_BYTES,
    HTTP_CONNECTIONS_REFUSED,
];

/// Gauges without labels, registered at zero likewise.
const UNLABELLED_GAUGES: &[&str] = &[
    OPEN_POINTS,
    FOLLOWERS,
    IN_SYNC_FOLLOWERS,
    UNDER_REPLICATED_GROUPS,
    SESSION_HELD,
    RESHARD_MOVES_IN_FLIGHT,
    RESHARD_LAG_BYTES,
    QUARANTINED_POINTS,
    HTTP_CONNECTIONS,
    MEMBERS_LIVE,
];

/// Histograms without labels, registered empty likewise.
const UNLABELLED_HISTOGRAMS: &[&str] = &[
    FSYNC_SECONDS,
    FAILOVER_SECONDS,
    TRANSFER_HOLD_SECONDS,
    RESHARD_FENCE_SECONDS,
];

/// Counters whose one label takes a fixed set of values: each series is registered at zero.
/// (A label naming something that comes and goes, a follower, a plugin, a status code, has its
/// series from the first event.)
const FIXED_LABELS: &[(&str, &str, &[&str])] = &[
    (HTTP_TIMEOUTS, "kind", &["header", "send"]),
    (IN_SYNC_CHANGES, "change", &["entered", "left"]),
    (REPLICATED_BYTES, "direction", &["sent", "applied"]),
    (FAILOVERS, "cause", &["expired", "unclean"]),
    (PLUGIN_RELOADS, "result", &["ok", "error"]),
    (BLOCKING_TRIPS, "queue", &["plugins", "storage"]),
    (
        REPLICATION_UNSENT,
        "reason",
        &["too_large", "bundler_failed"],
    ),
    (
        GOSSIP_DROPPED,
        "reason",
        &["bad_key", "unsealed", "stale", "undecodable", "too_large"],
    ),
];

/// Process metrics (CPU, memory, descriptors, threads: `process_*`, as Prometheus's own clients
/// name them), read at each scrape.
fn process() -> &'static metrics_process::Collector {
    static COLLECTOR: OnceLock<metrics_process::Collector> = OnceLock::new();
    COLLECTOR.get_or_init(metrics_process::Collector::default)
}

/// The registry as Prometheus text, with the process metrics read now.
pub fn render() -> String {
    let handle = handle();
    process().collect();
    handle.render()
}

/// Handles of the series recorded for every small point created (each frame, append, plugin
/// call and trip to the blocking pool): taken once, when the recorder is installed, so those
/// paths skip the registry's lookup by name and labels (a key built and hashed each time).
pub struct Hot {
    /// [`PRODUCED_FRAMES`].
    pub produced_frames: Counter,
    /// [`PRODUCED_BYTES`].
    pub produced_bytes: Counter,
    /// [`APPENDS`].
    pub appends: Counter,
    /// [`APPENDED_BYTES`].
    pub appended_bytes: Counter,
    /// [`AUTHZ_CACHE_HITS`].
    pub authz_cache_hits: Counter,
    /// [`BLOCKING_TRIPS`] of the `plugins` queue.
    trips_plugins: Counter,
    /// [`BLOCKING_TRIPS`] of the `storage` queue.
    trips_storage: Counter,
    /// The calls each plugin answers, by plugin and call.
    plugin_calls: Vec<PluginCall>,
}

/// [`PLUGIN_CALLS`] and [`PLUGIN_CALL_SECONDS`] of one call of one plugin.
#[derive(Clone)]
pub struct PluginCall {
    plugin: &'static str,
    call: &'static str,
    /// Calls made.
    pub calls: Counter,
    /// How long they took.
    pub seconds: Histogram,
}

/// Every plugin call the node makes, by plugin.
const PLUGIN_CALL_NAMES: &[(&str, &str)] = &[
    ("authorizer", "authorize"),
    ("placement", "owners"),
    ("bundler", "bundle"),
    ("bundler", "unbundle"),
];

impl Hot {
    /// The handles, from the recorder installed now (none yet: handles that record nowhere).
    fn take() -> Self {
        let trips = |queue: &'static str| metrics::counter!(BLOCKING_TRIPS, "queue" => queue);
        Self {
            produced_frames: metrics::counter!(PRODUCED_FRAMES),
            produced_bytes: metrics::counter!(PRODUCED_BYTES),
            appends: metrics::counter!(APPENDS),
            appended_bytes: metrics::counter!(APPENDED_BYTES),
            authz_cache_hits: metrics::counter!(AUTHZ_CACHE_HITS),
            trips_plugins: trips("plugins"),
            trips_storage: trips("storage"),
            plugin_calls: PLUGIN_CALL_NAMES
                .iter()
                .map(|&(plugin, call)| PluginCall::take(plugin, call))
                .collect(),
        }
    }

    /// Counts a trip of `queue` to the blocking pool ([`BLOCKING_TRIPS`]).
    pub fn trip(&self, queue: &'static str) {
        match queue {
            "plugins" => self.trips_plugins.increment(1),
            "storage" => self.trips_storage.increment(1),
            queue => metrics::counter!(BLOCKING_TRIPS, "queue" => queue).increment(1),
        }
    }

    /// The series of `plugin`'s `call`.
    pub fn plugin_call(&self, plugin: &'static str, call: &'static str) -> PluginCall {
        match self
            .plugin_calls
            .iter()
            .find(|known| known.plugin == plugin && known.call == call)
        {
            Some(known) => known.clone(),
            // A call not listed in PLUGIN_CALL_NAMES: looked up by name.
            None => PluginCall::take(plugin, call),
        }
    }
}

impl PluginCall {
    fn take(plugin: &'static str, call: &'static str) -> Self {
        let labels = [("plugin", plugin), ("call", call)];
        Self {
            plugin,
            call,
            calls: metrics::counter!(PLUGIN_CALLS, &labels),
            seconds: metrics::histogram!(PLUGIN_CALL_SECONDS, &labels),
        }
    }
}

/// The handles of the hot series ([`Hot`]): those of the installed recorder, or, before one is
/// installed, handles that record nowhere.
pub fn hot() -> &'static Hot {
    static NOWHERE: LazyLock<Hot> = LazyLock::new(Hot::take);
    HOT.get().unwrap_or_else(|| &NOWHERE)
}

/// The handles of the installed recorder, taken as it is installed.
static HOT: OnceLock<Hot> = OnceLock::new();

/// The process-wide Prometheus recorder, installed on first use.
pub fn handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets(&[
                    0.000_01, 0.000_05, 0.000_1, 0.000_5, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0,
                ])
                .expect("static bucket list is not empty")
                .build_recorder();
            let handle = recorder.handle();
            // Another recorder may already be installed (an embedding application's): then
            // this node's metrics go there and the endpoint serves an empty registry.
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed; /metrics stays empty");
            }
            describe();
            register();
            let _ = HOT.set(Hot::take());
            handle
        })
        .clone()
}

/// Registers every series that exists from the start: at zero, or for the build, one.
fn register() {
    for name in UNLABELLED {
        metrics::counter!(*name).absolute(0);
    }
    for name in UNLABELLED_GAUGES {
        metrics::gauge!(*name).set(0.0);
    }
    for name in UNLABELLED_HISTOGRAMS {
        let _ = metrics::histogram!(*name);
    }
    for (name, label, values) in FIXED_LABELS {
        for value in *values {
            metrics::counter!(*name, *label => *value).absolute(0);
        }
    }
    metrics::gauge!(
        BUILD_INFO,
        "version" => env!("CARGO_PKG_VERSION"),
        "rustc" => env!("BUILT_WITH_RUSTC"),
    )
    .set(1.0);
    // Read at each scrape ([`render`]).
    process().describe();
}

/// Registers the help text and unit of every metric, by family.
fn describe() {
    describe_operations();
    describe_data();
    describe_plugins();
    describe_replication();
    describe_resharding();
    describe_cluster();
}

/// The metrics every service has: build, requests and their latency per gRPC method and per
/// HTTP route.
fn describe_operations() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_gauge!(
        BUILD_INFO,
        "1, labelled with the node's version and the rustc that built it."
    );
    describe_counter!(
        GRPC_STARTED,
        "gRPC calls started, by grpc_service and grpc_method."
    );
    describe_counter!(
        GRPC_HANDLED,
        "gRPC calls finished, by grpc_service, grpc_method and grpc_code."
    );
    describe_histogram!(
        GRPC_HANDLING_SECONDS,
        Unit::Seconds,
        "How long gRPC calls took, to their last message, by grpc_service and grpc_method."
    );
    describe_histogram!(
        HTTP_REQUEST_SECONDS,
        Unit::Seconds,
        "How long the HTTP endpoints took to answer, to the response's head, by route."
    );
}

/// The metrics of the data path: produced, consumed, appended and synced bytes, errors to clients.
fn describe_data() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        PRODUCED_BYTES,
        Unit::Bytes,
        "Bytes received in ProduceStream frames."
    );
    describe_counter!(PRODUCED_FRAMES, "Frames received by ProduceStream.");
    describe_counter!(
        CONSUMED_BYTES,
        Unit::Bytes,
        "Bytes sent in ConsumeStream frames."
    );
    describe_counter!(CONSUMED_FRAMES, "Frames sent by ConsumeStream.");
    describe_counter!(APPENDS, "Appends written to points.");
    describe_counter!(APPENDED_BYTES, Unit::Bytes, "Bytes appended to points.");
    describe_counter!(
        FSYNCS,
        "fsync calls (data file and journal of one point, or a segment of packed points)."
    );
    describe_counter!(
        BLOCKING_TRIPS,
        "Trips to the blocking pool of short calls asked at once, by queue (plugins, storage)."
    );
    describe_histogram!(
        FSYNC_SECONDS,
        Unit::Seconds,
        "Latency of syncing one point."
    );
    describe_counter!(
        RECOVERED_BYTES,
        Unit::Bytes,
        "Bytes verified by crash recovery."
    );
    describe_gauge!(OPEN_POINTS, "Points with open file handles.");
    describe_counter!(ERRORS, "Errors returned to clients, by gRPC status code.");
}

/// The metrics of plugins: calls, failures, latency, output, the decision cache.
fn describe_plugins() {
    use metrics::{Unit, describe_counter, describe_histogram};
    describe_counter!(PLUGIN_CALLS, "Calls into WebAssembly plugins.");
    describe_counter!(
        PLUGIN_ERRORS,
        "Plugin calls that trapped, timed out or ran out of memory."
    );
    describe_histogram!(
        PLUGIN_CALL_SECONDS,
        Unit::Seconds,
        "Latency of plugin calls."
    );
    describe_counter!(
        PLUGIN_OUTPUT_LINES,
        "Lines plugins logged (their log import, what they printed to stdout and stderr)."
    );
    describe_counter!(
        PLUGIN_OUTPUT_SUPPRESSED,
        "Plugin log lines left out over the per-plugin rate limit."
    );
    describe_counter!(
        AUTHZ_CACHE_HITS,
        "Authorization decisions served from the cache."
    );
}

/// The metrics of replication: lag, bytes, rejected and unsent records, divergences, followers, fences.
fn describe_replication() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_gauge!(
        REPLICATION_LAG_BYTES,
        Unit::Bytes,
        "Bytes a follower has not confirmed."
    );
    describe_counter!(
        REPLICATED_BYTES,
        Unit::Bytes,
        "Bytes shipped to or applied from a peer."
    );
    describe_counter!(
        REPLICATION_READ_BACK,
        Unit::Bytes,
        "Bytes a leader read back from its points to replicate (the rest went from live appends)."
    );
    describe_counter!(
        REPLICATION_REJECTED,
        "Replication records rejected on receipt."
    );
    describe_counter!(
        REPLICATION_UNSENT,
        "Replication records not sent: the bundler failed on them, or their bundle was too large (by reason)."
    );
    describe_counter!(
        REPLICATION_CUT_BYTES,
        Unit::Bytes,
        "Bytes of a deposed leader's tail cut from this follower's copies where its successor's epoch began (kept in quarantine)."
    );
    describe_counter!(
        REPLICATION_DIVERGENCES,
        "Follower copies found holding other bytes than the leader's (found by an offer's CRC or by an acknowledgement), cut back or replaced; committed=within when proven within the leader's committed end."
    );
    describe_counter!(
        REPLICATION_TASK_FAILURES,
        "Replication tasks that died (a panic); their session was closed and starts again."
    );
    describe_gauge!(FOLLOWERS, "Followers connected to this leader.");
    describe_gauge!(
        IN_SYNC_FOLLOWERS,
        "Followers in the committed in-sync set of the group this node leads."
    );
    describe_gauge!(
        UNDER_REPLICATED_GROUPS,
        "1 while the group this node leads has a follower outside its committed in-sync set; summed over the cluster, the under-replicated groups."
    );
    describe_counter!(
        IN_SYNC_CHANGES,
        "Changes of its group's in-sync set this leader had committed, by change (entered, left)."
    );
    describe_counter!(
        FAILOVERS,
        "Leaders the controller fenced, naming another from the in-sync set, by cause (expired, unclean)."
    );
    describe_histogram!(
        FAILOVER_SECONDS,
        "How long committing a fence took, from the moment it was due."
    );
    describe_counter!(
        TRANSFERS,
        "Groups this node, their leader, handed to an in-sync member (a transfer, a graceful stop)."
    );
    describe_histogram!(
        TRANSFER_HOLD_SECONDS,
        Unit::Seconds,
        "How long this node held writes back to hand a group over."
    );
    describe_gauge!(
        SESSION_HELD,
        "1 while this member holds a session with the controller, 0 once it lapsed."
    );
    describe_counter!(
        SELF_FENCED,
        "Writes a group leader refused because its session with the controller lapsed."
    );
    describe_counter!(
        REPLICATION_REFUSED,
        "Replication peers the authorizer did not allow to replicate."
    );
    describe_counter!(
        REPLICATION_STALE_EPOCHS,
        "Replication calls a follower refused because they came from a deposed leader (an epoch older than one it knows for its group)."
    );
    describe_counter!(
        REPLICATION_NEWER_COPIES,
        "Points a follower offered at a newer ownership epoch than this leader's (left alone)."
    );
    describe_counter!(
        REPLICATION_COMMIT_MARKS,
        "Commit marks this leader sent a follower: a point's committed end, told as it moves (a restarted follower is told only what it did not know)."
    );
    describe_counter!(
        REPLICATION_RESCANS,
        "Walks of every point a leader made again for a follower after it missed store events (the store's broadcast lagged): each point's end and bytes are compared with what the session tracked."
    );
    describe_counter!(
        FENCE_TIMEOUTS,
        "Writes that waited at a handover's fence longer than reshard.fence_timeout_ms."
    );
}

/// The metrics of resharding: moves, fences, cleanup, quarantine, takeovers.
fn describe_resharding() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_gauge!(
        RESHARD_MOVES_IN_FLIGHT,
        "Points this node is handing to their new owner now."
    );
    describe_gauge!(
        RESHARD_LAG_BYTES,
        Unit::Bytes,
        "Bytes the new owners of the points in flight have yet to confirm."
    );
    describe_counter!(
        RESHARD_MOVED_POINTS,
        "Points this node handed to their new owner (committed there)."
    );
    describe_counter!(
        RESHARD_LISTINGS,
        "Times the mover listed every point this node holds to plan moves."
    );
    describe_counter!(
        RESHARD_RECEIVED_POINTS,
        "Points this node took over from their old owner."
    );
    describe_counter!(
        RESHARD_MOVED_BYTES,
        Unit::Bytes,
        "Bytes of points handed over that the new owner did not hold yet."
    );
    describe_counter!(
        RESHARD_CLEANED_POINTS,
        "Copies handed over and then deleted here, their new owner holding them replicated."
    );
    describe_counter!(
        RESHARD_FAILED_MOVES,
        "Handovers that failed and will be tried again."
    );
    describe_gauge!(
        QUARANTINED_POINTS,
        "Copies and tails kept aside in <data_dir>/quarantine: bytes only this node held (a forgotten member stepping down, a deposed leader's copy that diverged or its cut tail)."
    );
    describe_counter!(
        TAKEOVER_DIVERGED,
        "Copies of a forgotten primary's points offered here with bytes this node did not take over (reported, not merged)."
    );
    describe_counter!(
        RESHARD_STOPPED_MOVES,
        "Handovers stopped before their fence because the ring no longer sends the point there."
    );
    describe_histogram!(
        RESHARD_FENCE_SECONDS,
        Unit::Seconds,
        "How long writes of a point were fenced in its handover (seal to switch)."
    );
}

/// The metrics of the cluster and its links: TLS handshakes, gossip, members.
fn describe_cluster() {
    use metrics::{Unit, describe_counter, describe_gauge};
    describe_counter!(
        TLS_HANDSHAKE_FAILURES,
        "Connections refused during the TLS handshake, by listener."
    );
    describe_counter!(
        GOSSIP_DROPPED,
        "Gossip datagrams dropped: bad_key, unsealed, stale, undecodable, too_large."
    );
    describe_gauge!(
        MEMBERS_LIVE,
        "Members this node sees alive (itself included)."
    );
    describe_counter!(
        HTTP_REQUESTS,
        "Requests answered by the HTTP gateway, by status."
    );
    describe_counter!(
        HTTP_BYTES,
        Unit::Bytes,
        "Bytes of points sent by the HTTP gateway."
    );
    describe_gauge!(HTTP_CONNECTIONS, "Connections the HTTP gateway serves now.");
    describe_counter!(
        HTTP_CONNECTIONS_REFUSED,
        "Connections over http.max_connections, answered 503 with Retry-After."
    );
    describe_counter!(
        HTTP_TIMEOUTS,
        "HTTP connections closed for a timeout: header (no request head in time, idle \
         connections too), send (the client took no byte in time)."
    );
    describe_counter!(
        CONNECTIONS_DROPPED,
        "Connections closed at accept, past a listener's cap and its margin, by listener."
    );
    describe_gauge!(
        RING_MEMBERS,
        "Members of the ring, by lifecycle state and liveness."
    );
}
