//! Plugin benchmark: every built-in component called through the host against the same logic
//! compiled natively, in the same run; the authorization and placement caches; bundler
//! throughput; node start-up with cold and warm compile caches; the authorizers written in
//! Python and JavaScript against the Rust template.
//!
//! `cargo bench -p goutube --bench plugins` (release). Results: docs/benchmarks.md.

// A benchmark is a harness, like a test: a failed step stops it with its message.
#![allow(clippy::unwrap_used)]

use std::hint::black_box;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use goutube::access::Action;
use goutube::config::{PluginSection, PluginsSection};
use goutube::net::PeerInfo;
use goutube::plugins::polar::{DEFAULT_POLICY, Polar};
use goutube::plugins::types::{self, Member};
use goutube::plugins::{Buffer, PluginSet, bundles};
use goutube::point::PointId;
use goutube::process::NodeProcess;

const ACL: &str = "root, *, produce\nroot, *, consume\nalice, videos/*, consume\n";

fn main() {
    let work = tempfile::tempdir().unwrap();
    let section = |source: &str, config: &str| PluginSection {
        source: source.into(),
        config: config.into(),
        ..PluginSection::default()
    };
    let load = |f: &dyn Fn(&mut PluginsSection)| {
        let mut plugins = PluginsSection::default();
        f(&mut plugins);
        PluginSet::load(&plugins, work.path()).unwrap()
    };
    let defaults = load(&|_| {});
    let acl = load(&|p| p.authorizer = section("builtin:acl-authorizer", ACL));
    let lz4 = load(&|p| p.bundler = section("builtin:lz4-bundler", ""));
    let rendezvous = load(&|p| p.placement = section("builtin:rendezvous-placement", ""));

    println!("## Per-call latency: through the host vs the same logic natively\n");
    println!("| call | host p50 | host p99 | native p50 | native p99 |");
    println!("|---|---|---|---|---|");
    let polar = Polar::load(DEFAULT_POLICY, "default").unwrap();
    let request = |subject: &str, action, point: &str| types::AuthzRequest {
        subject: subject.into(),
        action,
        point: point.into(),
        peer: String::new(),
    };
    let root_produces = request("root", types::Action::Produce, "videos/a");
    compare(
        "polar-authorizer authorize",
        2000,
        || black_box(defaults.authorize(&root_produces).unwrap()),
        || black_box(polar.is_allowed("root", "produce", "videos/a").unwrap()),
    );
    let native_acl = acl_rules::Acl::parse(ACL).unwrap();
    let alice_consumes = request("alice", types::Action::Consume, "videos/a");
    compare(
        "acl-authorizer authorize",
        5000,
        || black_box(acl.authorize(&alice_consumes).unwrap()),
        || black_box(native_acl.allows("alice", "consume", "videos/a")),
    );
    let payload: Vec<u8> = (0..256 * 1024u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let buffer = Buffer::new(vec![Bytes::from(payload.clone())]);
    compare(
        "crc-bundler bundle 256 KiB",
        500,
        || black_box(defaults.bundle("videos/a", 0, &buffer).unwrap()),
        || {
            black_box(bundle_format::encode(
                bundle_format::crc32c_append,
                "videos/a",
                0,
                bundle_format::Codec::Raw,
                payload.len(),
                payload.clone(),
            ))
        },
    );
    let bundle = wire(&defaults.bundle("videos/a", 0, &buffer).unwrap(), &payload);
    compare(
        "crc-bundler unbundle 256 KiB",
        500,
        || black_box(defaults.unbundle(bundle.clone()).unwrap().unwrap()),
        || black_box(bundle_format::decode(bundle_format::crc32c_append, bundle.to_vec()).unwrap()),
    );
    compare(
        "lz4-bundler bundle 256 KiB",
        200,
        || black_box(lz4.bundle("videos/a", 0, &buffer).unwrap()),
        || {
            let body = lz4_flex::block::compress(&payload);
            black_box(bundle_format::encode(
                bundle_format::crc32c_append,
                "videos/a",
                0,
                bundle_format::Codec::Lz4,
                payload.len(),
                body,
            ))
        },
    );
    let members = members(5);
    let native_members: Vec<placement_rules::Member> = members
        .iter()
        .map(|m| placement_rules::Member {
            name: m.name.clone(),
            role: m.role.clone(),
            virtual_nodes: m.virtual_nodes,
        })
        .collect();
    let ring = placement_rules::Ring::new(&native_members);
    let mut key = 0u64;
    let mut next_key = move || {
        key += 1;
        format!("videos/{key}")
    };
    compare(
        "ring-placement owners (5 members x 64 vnodes)",
        5000,
        || black_box(defaults.owners(&next_key(), &members, 2).unwrap()),
        || black_box(ring.owners("videos/123", 2)),
    );
    compare(
        "rendezvous-placement owners (5 members)",
        5000,
        || black_box(rendezvous.owners("videos/123", &members, 2).unwrap()),
        || {
            black_box(placement_rules::rendezvous(
                "videos/123",
                &native_members,
                2,
            ))
        },
    );

    println!("\n## Throughput of 256 KiB records\n");
    // Both sides checksum a cache-hot payload and copy it once into a fresh buffer: natively, a
    // copy and a CRC; through the host, `bundle` (the CRC, in the host, on the payload where it
    // lies) and the bundle put together as replication puts it into its message; `unbundle` of
    // bytes copied out of a received message.
    let native_copy_crc = throughput(200, payload.len(), || {
        let copy = payload.to_vec();
        black_box(crc32c::crc32c(&copy));
        black_box(copy);
    });
    let host_bundle = throughput(200, payload.len(), || {
        let bundled = defaults.bundle("videos/a", 0, &buffer).unwrap();
        black_box(wire(&bundled, &payload));
    });
    let host_unbundle = throughput(200, payload.len(), || {
        let received = Bytes::copy_from_slice(&bundle);
        black_box(defaults.unbundle(received).unwrap().unwrap());
    });
    println!("| path | MB/s | ratio to native copy + CRC32C |");
    println!("|---|---|---|");
    println!("| native copy + CRC32C | {native_copy_crc:.0} | 1.00x |");
    println!(
        "| crc-bundler bundle | {host_bundle:.0} | {:.2}x |",
        host_bundle / native_copy_crc
    );
    println!(
        "| crc-bundler unbundle | {host_unbundle:.0} | {:.2}x |",
        host_unbundle / native_copy_crc
    );

    println!("\n## Caches\n");
    let uncached = per_op(5_000, || {
        black_box(defaults.authorize(&root_produces).unwrap());
    });
    println!("| measurement | per call | per second | target |");
    println!("|---|---|---|---|");
    rate_row("authorization, uncached (polar)", uncached, "<= 50 µs");

    // The path a request takes in a node: cache, else the plugin on the blocking pool.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(node_path(work.path()));

    println!("\n## Node start-up with the default plugins (to the first answered call)\n");
    startup();

    languages(work.path());
}

/// The authorizers written in Python and JavaScript (`scripts/plugin-languages` builds them)
/// against the Rust template, in the same run: the size of each component, a node's start-up
/// to its first answered call with an empty compile cache (the component is compiled) and with a
/// warm one (it is deserialized), and an uncached `authorize` through the host.
fn languages(work: &std::path::Path) {
    let built = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/plugin-languages");
    let components = [
        (
            "Rust (plugins/template)",
            std::path::PathBuf::from(goutube::plugins::builtin::BUILD_DIR).join("template.wasm"),
            "anonymous\n".to_owned(),
        ),
        (
            "Python (plugins/python/regex-authorizer)",
            built.join("regex-authorizer.wasm"),
            "anonymous produce ^videos/\n* metadata .*\n".to_owned(),
        ),
        (
            "JavaScript (plugins/javascript/grants-authorizer)",
            built.join("grants-authorizer.wasm"),
            r#"{"grants": [{"subjects": ["anonymous"], "actions": ["produce"], "prefixes": ["videos/"]},
                {"subjects": ["*"], "actions": ["metadata"], "prefixes": [""]}]}"#
                .to_owned(),
        ),
    ];
    println!("\n## Authorizers in Python and JavaScript against Rust\n");
    println!(
        "| component | size | start-up, cold cache (median of 3) | start-up, warm cache | authorize p50 | authorize p99 | p50 / Rust's |"
    );
    println!("|---|---|---|---|---|---|---|");
    let mut rust_p50 = None;
    for (name, path, config) in components {
        if !path.is_file() {
            println!(
                "| {name} | missing: {} (run scripts/plugin-languages) | | | | | |",
                path.display()
            );
            continue;
        }
        let source = format!(
            "[plugins.authorizer]\nsource = {:?}\nconfig = {config:?}\n",
            path.display().to_string()
        );
        let (mut cold, mut warm) = (Vec::new(), Vec::new());
        for _ in 0..3 {
            let dir = tempfile::tempdir().unwrap();
            cold.push(start_with(dir.path(), &source));
            warm.push(start_with(dir.path(), &source));
        }
        cold.sort();
        warm.sort();
        let plugins = PluginsSection {
            authorizer: PluginSection {
                source: path.display().to_string(),
                config: config.clone(),
                ..PluginSection::default()
            },
            ..PluginsSection::default()
        };
        let set = PluginSet::load(&plugins, work).unwrap();
        let request = types::AuthzRequest {
            subject: "anonymous".into(),
            action: types::Action::Produce,
            point: "videos/a".into(),
            peer: String::new(),
        };
        let (p50, p99) = percentiles(2000, &mut || black_box(set.authorize(&request).unwrap()));
        let rust = *rust_p50.get_or_insert(p50);
        let size = std::fs::metadata(&path).unwrap().len();
        println!(
            "| {name} | {} KiB | {} ms | {} ms | {} | {} | {:.1}x |",
            size.div_ceil(1024),
            cold[1].as_millis(),
            warm[1].as_millis(),
            show(p50),
            show(p99),
            p50.as_secs_f64() / rust.as_secs_f64()
        );
    }
}

/// A bundle as it goes on the wire: head, body, tail.
fn wire(bundled: &bundles::Bundled, payload: &[u8]) -> Bytes {
    let body = match &bundled.body {
        bundles::Body::Payload => payload,
        bundles::Body::Replaced(bytes) => bytes.as_slice(),
    };
    Bytes::from([bundled.head.as_slice(), body, bundled.tail.as_slice()].concat())
}

fn members(n: usize) -> Vec<Member> {
    (0..n)
        .map(|i| Member {
            name: format!("node-{i}"),
            address: format!("10.0.0.{i}:8400"),
            role: "leader".into(),
            virtual_nodes: 64,
            tags: vec![("zone".into(), format!("z{}", i % 2))],
        })
        .collect()
}

/// Prints p50/p99 of `host` and `native` over `n` calls each.
fn compare<A, B>(name: &str, n: usize, mut host: impl FnMut() -> A, mut native: impl FnMut() -> B) {
    let host = percentiles(n, &mut host);
    let native = percentiles(n, &mut native);
    println!(
        "| {name} | {} | {} | {} | {} |",
        show(host.0),
        show(host.1),
        show(native.0),
        show(native.1)
    );
}

fn percentiles<R>(n: usize, f: &mut impl FnMut() -> R) -> (Duration, Duration) {
    for _ in 0..n / 10 {
        f();
    }
    let mut samples: Vec<Duration> = (0..n)
        .map(|_| {
            let started = Instant::now();
            f();
            started.elapsed()
        })
        .collect();
    samples.sort();
    (samples[n / 2], samples[n * 99 / 100])
}

fn per_op(n: u32, mut f: impl FnMut()) -> Duration {
    for _ in 0..n / 10 {
        f();
    }
    let started = Instant::now();
    for _ in 0..n {
        f();
    }
    started.elapsed() / n
}

fn throughput(n: usize, bytes: usize, f: impl FnMut()) -> f64 {
    let per = per_op(n as u32, f);
    bytes as f64 / per.as_secs_f64() / 1e6
}

/// A table row: time per call, calls per second, the target.
fn rate_row(name: &str, per_call: Duration, target: &str) {
    let per_second = 1.0 / per_call.as_secs_f64();
    let rate = if per_second >= 1e6 {
        format!("{:.2} M/s", per_second / 1e6)
    } else {
        format!("{:.0} k/s", per_second / 1e3)
    };
    println!("| {name} | {} | {rate} | {target} |", show(per_call));
}

fn show(d: Duration) -> String {
    if d < Duration::from_micros(10) {
        format!("{:.2} µs", d.as_secs_f64() * 1e6)
    } else {
        format!("{:.1} µs", d.as_secs_f64() * 1e6)
    }
}

/// The paths a request takes in a node: the async access door and the ownership check, from
/// their caches (else the plugin on the blocking pool).
async fn node_path(dir: &std::path::Path) {
    let config = goutube::config::Config {
        data_dir: dir.join("node"),
        bind_addr: "127.0.0.1:0".parse().unwrap(),
        rpc_port: 0,
        replication_port: 0,
        metrics_port: 0,
        http_port: 0,
        ..Default::default()
    };
    let listeners = goutube::node::Listeners::bind(&config).await.unwrap();
    let node = goutube::node::Node::start(config, listeners).await.unwrap();
    let (access, gate) = (node.access().clone(), node.gate().unwrap().clone());
    let peer = PeerInfo {
        addr: "127.0.0.1:1".parse().unwrap(),
        subject: Arc::from("root"),
    };
    let n = 20_000u32;
    let started = Instant::now();
    for _ in 0..n {
        access
            .authorize(&peer, Action::Produce, "videos/a")
            .await
            .unwrap();
    }
    let cached = started.elapsed() / n;
    let started = Instant::now();
    for i in 0..n / 4 {
        // A different point every time: never in the cache.
        access
            .authorize(&peer, Action::Produce, &format!("videos/{i}"))
            .await
            .unwrap();
    }
    let uncached = started.elapsed() / (n / 4);
    let points: Vec<PointId> = (0..1000)
        .map(|i| PointId::new(format!("videos/{i}")).unwrap())
        .collect();
    for point in &points {
        gate.check_owner(point).await.unwrap();
    }
    let started = Instant::now();
    for i in 0..n as usize * 10 {
        black_box(gate.check_owner(&points[i % 1000]).await).unwrap();
    }
    let ownership = started.elapsed() / (n * 10);
    rate_row("authorization in a node (async), cached", cached, "<= 2 µs");
    rate_row(
        "authorization in a node (async), uncached, on the blocking pool",
        uncached,
        "",
    );
    rate_row("ownership check (placement), cached", ownership, "< 1 µs");
    node.shutdown().await.unwrap();
}

/// Spawns `goutube run` three times per cache state; prints the median time to the first
/// answered call.
fn startup() {
    println!("| compile cache | median | runs |");
    println!("|---|---|---|");
    let mut cold = Vec::new();
    let mut warm = Vec::new();
    for _ in 0..3 {
        let dir = tempfile::tempdir().unwrap();
        cold.push(start_once(dir.path()));
        warm.push(start_once(dir.path()));
    }
    for (name, mut runs) in [("cold (empty plugin-cache/)", cold), ("warm", warm)] {
        runs.sort();
        let list: Vec<String> = runs
            .iter()
            .map(|d| format!("{} ms", d.as_millis()))
            .collect();
        println!(
            "| {name} | {} ms | {} |",
            runs[1].as_millis(),
            list.join(", ")
        );
    }
}

fn start_once(dir: &std::path::Path) -> Duration {
    start_with(dir, "")
}

/// [`start_once`] with `extra` (sections) appended to the node's configuration.
fn start_with(dir: &std::path::Path, extra: &str) -> Duration {
    let config = dir.join("node.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {:?}\nbind_addr = \"127.0.0.1:0\"\nrpc_port = 0\nreplication_port = 0\nmetrics_port = 0\nhttp_port = 0\n[log]\nlevel = \"warn\"\n{extra}",
            dir.join("data")
        ),
    )
    .unwrap();
    let started = Instant::now();
    let mut command = Command::new(env!("CARGO_BIN_EXE_goutube"));
    command.args(["run", "--config"]).arg(&config);
    let node = NodeProcess::start(command, Duration::from_secs(60)).unwrap();
    let rpc = node.field("rpc").unwrap().to_owned();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let client = goutube::client::Client::connect(&goutube::client::ClientOptions {
            addr: rpc,
            tls: None,
        })
        .await
        .unwrap();
        // Served (NotFound) only once the node has started, plugins included.
        let status = client.stat("absent").await.err().unwrap();
        assert!(status.to_string().contains("NotFound"), "{status}");
    });
    let elapsed = started.elapsed();
    node.kill().unwrap();
    elapsed
}
