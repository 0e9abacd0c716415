//! The plugin platform with real components: every built-in called through the host, components
//! that loop, allocate without end, panic or implement the wrong world, load errors that name the
//! config key, the template a user copies, and policies enforced through the gRPC API.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use goutube::config::{Config, PluginSection, PluginsSection};
use goutube::node::{Listeners, Node, StartError};
use goutube::plugins::types::{Action, AuthzRequest, Decision, Member};
use goutube::plugins::{Buffer, PluginError, PluginSet, bundles};
use goutube_tests::{TestNode, assert_denied, consume, data, metadata, produce, window};
use tonic::Code;

fn test_component(name: &str) -> PathBuf {
    PathBuf::from(goutube::plugins::builtin::BUILD_DIR).join(format!("{name}.wasm"))
}

fn section(source: &str, config: &str) -> PluginSection {
    PluginSection {
        source: source.into(),
        config: config.into(),
        ..PluginSection::default()
    }
}

fn plugin_set(configure: impl FnOnce(&mut PluginsSection)) -> PluginSet {
    let dir = tempfile::tempdir().unwrap();
    let mut plugins = PluginsSection::default();
    configure(&mut plugins);
    PluginSet::load(&plugins, dir.path()).unwrap()
}

const ACTIONS: [Action; 5] = [
    Action::Produce,
    Action::Consume,
    Action::Metadata,
    Action::Replicate,
    Action::Admin,
];

/// The authorizer's answer: (allowed, reason).
fn authorize(plugins: &PluginSet, subject: &str, action: Action, point: &str) -> (bool, String) {
    let request = AuthzRequest {
        subject: subject.into(),
        action,
        point: point.into(),
        peer: "127.0.0.1:1".into(),
    };
    match plugins.authorize(&request).unwrap() {
        Decision::Allow(reason) => (true, reason),
        Decision::Deny(reason) => (false, reason),
    }
}

async fn start_error(configure: impl FnOnce(&mut Config)) -> String {
    let dir = tempfile::tempdir().unwrap();
    let mut config = goutube_tests::config(dir.path());
    configure(&mut config);
    let listeners = Listeners::bind(&config).await.unwrap();
    match Node::start(config, listeners).await {
        Err(error @ StartError::Plugin(_)) => error.to_string(),
        Err(other) => panic!("expected a plugin error, got {other}"),
        Ok(node) => {
            node.shutdown().await.unwrap();
            panic!("the node started")
        }
    }
}

#[test]
fn polar_authorizer_applies_the_default_policy() {
    let plugins = plugin_set(|_| {});
    let allowed = |subject: &str, action| authorize(&plugins, subject, action, "videos/a").0;
    for action in ACTIONS {
        assert!(allowed("root", action), "root {action:?}");
        assert!(!allowed("nobody", action), "nobody {action:?}");
    }
    assert!(allowed("node:follower-1", Action::Replicate));
    assert!(!allowed("node:follower-1", Action::Produce));
    let (_, reason) = authorize(&plugins, "nobody", Action::Consume, "x");
    assert!(reason.contains("no allow rule"), "{reason}");
}

#[test]
fn acl_authorizer_matches_globs_and_expresses_the_original_policy() {
    let plugins = plugin_set(|p| {
        p.authorizer = section(
            "builtin:acl-authorizer",
            "# the original goutube casbin policy\nroot, *, produce\nroot, *, consume\nalice, videos/*, consume\nbob, cams/??, *\n",
        )
    });
    let allowed =
        |subject: &str, action, point: &str| authorize(&plugins, subject, action, point).0;
    assert!(allowed("root", Action::Produce, "anything/at/all"));
    assert!(allowed("root", Action::Consume, "x"));
    assert!(!allowed("root", Action::Admin, "x"));
    assert!(allowed("alice", Action::Consume, "videos/cat.webm"));
    assert!(!allowed("alice", Action::Consume, "music/song"));
    assert!(!allowed("alice", Action::Produce, "videos/cat.webm"));
    assert!(allowed("bob", Action::Admin, "cams/07"));
    assert!(!allowed("bob", Action::Admin, "cams/007"));
    assert!(!allowed("nobody", Action::Consume, "videos/a"));
}

/// What goes on the wire for a bundle: head, body, tail.
fn wire(bundled: &bundles::Bundled, payload: &[u8]) -> Vec<u8> {
    let body = match &bundled.body {
        bundles::Body::Payload => payload,
        bundles::Body::Replaced(bytes) => bytes.as_slice(),
    };
    [bundled.head.as_slice(), body, bundled.tail.as_slice()].concat()
}

fn bundle(plugins: &PluginSet, point: &str, start: u64, payload: &[u8]) -> Vec<u8> {
    let buffer = Buffer::new(vec![Bytes::copy_from_slice(payload)]);
    wire(&plugins.bundle(point, start, &buffer).unwrap(), payload)
}

#[test]
fn bundlers_round_trip_and_reject_corruption() {
    for source in ["builtin:crc-bundler", "builtin:lz4-bundler"] {
        let plugins = plugin_set(|p| p.bundler = section(source, ""));
        let compressible: Vec<u8> = (0..256 * 1024).map(|i| (i / 1000) as u8).collect();
        for payload in [data(1, 256 * 1024), compressible.clone(), Vec::new()] {
            let bundle = bundle(&plugins, "videos/a", 12345, &payload);
            let record = plugins.unbundle(bundle.clone().into()).unwrap().unwrap();
            assert_eq!(
                (record.point.as_str(), record.start),
                ("videos/a", 12345),
                "{source}"
            );
            assert_eq!(record.payload, payload, "{source}");
            for position in [0, 5, bundle.len() / 2, bundle.len() - 1] {
                let mut damaged = bundle.clone();
                damaged[position] ^= 0x10;
                assert!(
                    plugins.unbundle(damaged.into()).unwrap().is_err(),
                    "{source}: flip at {position} accepted"
                );
            }
            let cut = Bytes::copy_from_slice(&bundle[..bundle.len() - 1]);
            assert!(plugins.unbundle(cut).unwrap().is_err());
        }
        let compressed = bundle(&plugins, "p", 0, &compressible);
        if source.contains("lz4") {
            assert!(
                compressed.len() < compressible.len() / 10,
                "lz4 compressed to {}",
                compressed.len()
            );
        } else {
            assert!(compressed.len() > compressible.len());
        }
    }
}

#[test]
fn a_framing_bundler_leaves_the_payload_in_the_host_even_in_pieces() {
    let payload = data(2, 700_000);
    let pieces: Vec<Bytes> = payload
        .chunks(300_000)
        .map(Bytes::copy_from_slice)
        .collect();
    let buffer = Buffer::new(pieces);
    for source in ["builtin:crc-bundler", "builtin:lz4-bundler"] {
        let plugins = plugin_set(|p| p.bundler = section(source, ""));
        // Random data does not compress: lz4 sends it untouched, as crc does.
        let bundled = plugins.bundle("v", 7, &buffer).unwrap();
        assert!(matches!(bundled.body, bundles::Body::Payload), "{source}");
        assert!(bundled.head.len() + bundled.tail.len() < 64, "{source}");
        let wire = Bytes::from(wire(&bundled, &payload));
        let record = plugins.unbundle(wire.clone()).unwrap().unwrap();
        assert_eq!(record.payload, payload, "{source}");
        // The payload handed back is the received bytes themselves, not a copy.
        assert_eq!(record.payload.as_ptr(), wire.as_ptr(), "{source}");
    }
}

#[test]
fn a_bundler_whose_answer_does_not_fit_the_record_is_refused() {
    let good = plugin_set(|_| {});
    let record = Bytes::from(bundle(&good, "videos/a", 10, &data(3, 4096)));
    let misbehaving = |mode: &str| {
        let source = test_component("misbehaving_bundler");
        plugin_set(|p| p.bundler = section(source.to_str().unwrap(), mode))
    };
    // Answered correctly, as a control.
    let found = misbehaving("").unbundle(record.clone()).unwrap().unwrap();
    assert_eq!((found.point.as_str(), found.start), ("videos/a", 10));
    let outside = misbehaving("outside").unbundle(record.clone()).unwrap();
    assert!(
        outside.as_ref().is_err_and(|e| e.contains("outside the")),
        "{outside:?}"
    );
    let trapped = misbehaving("read-outside")
        .unbundle(record.clone())
        .unwrap_err();
    assert!(
        matches!(trapped, PluginError::Trap { .. }) && trapped.to_string().contains("outside"),
        "{trapped}"
    );
    let huge = misbehaving("huge").unbundle(record).unwrap_err();
    assert!(matches!(huge, PluginError::OutOfMemory { .. }), "{huge}");
}

#[test]
fn a_bundler_that_panics_or_prints_fails_or_answers_with_its_words_kept() {
    let good = plugin_set(|_| {});
    let record = Bytes::from(bundle(&good, "videos/a", 10, &data(4, 4096)));
    let misbehaving = |mode: &str| {
        let source = test_component("misbehaving_bundler");
        plugin_set(|p| p.bundler = section(source.to_str().unwrap(), mode))
    };
    // A panicking guest traps; the error carries its panic message.
    let panicked = misbehaving("panic").unbundle(record.clone()).unwrap_err();
    assert!(
        matches!(panicked, PluginError::Trap { .. })
            && panicked.to_string().contains("unbundle(videos/a) panics"),
        "{panicked}"
    );
    // Printing to stderr is harmless, inside a runtime's blocking pool as outside one.
    let printing = misbehaving("stderr");
    let found = printing.unbundle(record.clone()).unwrap().unwrap();
    assert_eq!((found.point.as_str(), found.start), ("videos/a", 10));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let unbundling = runtime.spawn_blocking(move || printing.unbundle(record));
    let found = runtime.block_on(unbundling).unwrap().unwrap().unwrap();
    assert_eq!(found.start, 10);
}

#[test]
fn a_deadline_is_elapsed_time_even_on_a_loaded_machine() {
    let source = test_component("misbehaving_bundler");
    let mut spinning = section(source.to_str().unwrap(), "slow:5000");
    spinning.timeout_ms = 200;
    let plugins = plugin_set(|p| p.bundler = spinning);
    let record = Bytes::from(bundle(&plugin_set(|_| {}), "p", 0, &data(5, 1000)));
    // Four busy threads per core compete with the epoch ticker and the call's own thread.
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load: Vec<_> = (0..4 * cores)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    std::hint::spin_loop();
                }
            })
        })
        .collect();
    let started = Instant::now();
    let failed = plugins.unbundle(record).unwrap_err();
    let took = started.elapsed();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    load.into_iter().for_each(|thread| thread.join().unwrap());
    assert!(
        took >= Duration::from_millis(200) && took < Duration::from_millis(400),
        "a 200 ms deadline ended the call after {took:?}"
    );
    // The error says the thread waited: with four busy threads per core it ran on a CPU for
    // about a fifth of the time.
    let PluginError::Timeout {
        on_cpu: Some(on_cpu),
        ..
    } = failed
    else {
        panic!("not a timeout with its time on a CPU: {failed}");
    };
    assert!(
        on_cpu > Duration::ZERO && on_cpu < took / 2,
        "{on_cpu:?} on a CPU in {took:?}"
    );
    assert!(failed.to_string().contains("of it on a CPU"), "{failed}");
}

#[tokio::test]
async fn a_component_built_against_the_previous_contract_is_refused_naming_the_version() {
    let old = test_component("bundler_abi_0_1");
    let error = start_error(|c| c.plugins.bundler = section(old.to_str().unwrap(), "")).await;
    assert!(
        error.contains("plugins.bundler.source")
            && error.contains("goutube:plugins@0.1.0")
            && error.contains("goutube:plugins@0.2.0"),
        "{error}"
    );
}

fn members(names: &[&str]) -> Vec<Member> {
    names
        .iter()
        .map(|name| Member {
            name: (*name).into(),
            address: format!("{name}:8400"),
            role: "leader".into(),
            virtual_nodes: 64,
            tags: Vec::new(),
        })
        .collect()
}

#[test]
fn placements_are_stable_and_move_few_keys() {
    for source in ["builtin:ring-placement", "builtin:rendezvous-placement"] {
        let plugins = plugin_set(|p| p.placement = section(source, ""));
        let three = members(&["a", "b", "c"]);
        let mut four = three.clone();
        four.extend(members(&["d"]));
        let mut with_follower = three.clone();
        with_follower.push(Member {
            role: "follower".into(),
            ..members(&["f"]).remove(0)
        });

        let mut moved = 0;
        let mut counts = std::collections::HashMap::new();
        for i in 0..2000 {
            let key = format!("point-{i}");
            let owners = plugins.owners(&key, &three, 2).unwrap();
            assert_eq!(owners.len(), 2, "{source}");
            assert_ne!(
                owners[0], owners[1],
                "{source}: replicas are distinct members"
            );
            assert_eq!(
                plugins.owners(&key, &three, 2).unwrap(),
                owners,
                "{source}: deterministic"
            );
            assert_eq!(
                plugins.owners(&key, &with_follower, 1).unwrap()[0],
                owners[0],
                "{source}: followers own nothing"
            );
            *counts.entry(owners[0].clone()).or_insert(0) += 1;
            let after = plugins.owners(&key, &four, 1).unwrap();
            if after[0] != owners[0] {
                assert_eq!(after[0], "d", "{source}: a key moved between old members");
                moved += 1;
            }
        }
        // A fourth member takes about a quarter of the keys, and only those.
        assert!(
            (300..=700).contains(&moved),
            "{source}: {moved} of 2000 keys moved"
        );
        for (member, count) in counts {
            assert!(
                (400..=1000).contains(&count),
                "{source}: {member} owns {count} of 2000"
            );
        }
        assert!(plugins.owners("x", &[], 1).unwrap().is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misbehaving_authorizers_deny_and_the_node_keeps_serving() {
    let node = TestNode::start(|c| {
        c.plugins.authorizer = section(
            test_component("misbehaving_authorizer").to_str().unwrap(),
            "",
        );
        c.plugins.authorizer.timeout_ms = 200;
        c.plugins.authorizer.max_memory_mib = 32;
    })
    .await;
    let mut client = node.client().await;
    produce(&mut client, "fine/a", &[data(1, 100)])
        .await
        .unwrap();

    for (point, expected) in [
        ("loop/x", "ran out of time"),
        ("allocate/x", "exceeded its memory limit (32 MiB)"),
        ("panic/x", "trapped"),
    ] {
        let started = Instant::now();
        let status = produce(&mut client, point, &[data(2, 10)])
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied, "{point}: {status:?}");
        assert!(
            status.message().contains(expected),
            "{point}: {}",
            status.message()
        );
        assert!(
            status.message().contains("misbehaving_authorizer.wasm"),
            "the error names the plugin: {}",
            status.message()
        );
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{point} took {:?}",
            started.elapsed()
        );
        // Failures are not cached: the next call is decided again, and denied again.
        let status = consume(&mut client, window(point, 0, 0, 0))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied, "{point}");
        // The poisoned instance was replaced: other calls are served.
        let got = consume(&mut client, window("fine/a", 0, 0, 0))
            .await
            .unwrap()
            .concat();
        assert_eq!(got, data(1, 100));
        produce(&mut client, &format!("fine/after-{point}"), &[data(3, 10)])
            .await
            .unwrap();
    }
    // A deny reason of 100 000 characters reaches the client cut to a bounded message.
    let status = produce(&mut client, "verbose/x", &[data(4, 10)])
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(
        status.message().contains("why? why?"),
        "{}",
        status.message()
    );
    assert!(
        status.message().len() < 1024,
        "a {}-byte status message",
        status.message().len()
    );
    node.shutdown().await;
}

#[tokio::test]
async fn load_errors_name_the_key_and_the_plugin() {
    let error = start_error(|c| c.plugins.authorizer = section("builtin:crc-bundler", "")).await;
    assert!(
        error.contains("plugins.authorizer.source") && error.contains("authorizer world"),
        "{error}"
    );

    let dir = tempfile::tempdir().unwrap();
    let core = dir.path().join("core.wasm");
    std::fs::write(&core, b"\0asm\x01\0\0\0").unwrap();
    let error = start_error(|c| c.plugins.bundler = section(core.to_str().unwrap(), "")).await;
    assert!(
        error.contains("plugins.bundler.source") && error.contains("core WebAssembly module"),
        "{error}"
    );

    let error =
        start_error(|c| c.plugins.placement = section("/nonexistent/placement.wasm", "")).await;
    assert!(
        error.contains("plugins.placement.source") && error.contains("/nonexistent/placement.wasm"),
        "{error}"
    );

    let error = start_error(|c| c.plugins.authorizer = section("builtin:no-such-thing", "")).await;
    assert!(error.contains("built-ins: polar-authorizer"), "{error}");

    let error =
        start_error(|c| c.plugins.authorizer = section("builtin:acl-authorizer", "root produce"))
            .await;
    assert!(
        error.contains("plugins.authorizer.config") && error.contains("line 1"),
        "{error}"
    );

    let error = start_error(|c| {
        c.plugins.authorizer = section(
            test_component("misbehaving_authorizer").to_str().unwrap(),
            "fail",
        )
    })
    .await;
    assert!(error.contains("configured to fail"), "{error}");

    let policy = dir.path().join("broken.polar");
    std::fs::write(&policy, "allow(").unwrap();
    let error = start_error(|c| c.plugins.policy_file = Some(policy.clone())).await;
    assert!(
        error.contains("plugins.policy_file") && error.contains("broken.polar"),
        "{error}"
    );
}

#[tokio::test]
async fn the_template_is_enforced_once_named_in_the_config() {
    let template = test_component("template");
    let node = TestNode::start(|c| {
        c.plugins.authorizer = section(template.to_str().unwrap(), "anonymous\n")
    })
    .await;
    let mut client = node.client().await;
    produce(&mut client, "p", &[data(1, 10)]).await.unwrap();
    let status = client
        .delete_point(goutube::proto::DeletePointRequest { point: "p".into() })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(
        status.message().contains("never allows admin"),
        "{}",
        status.message()
    );
    node.shutdown().await;

    let node = TestNode::start(|c| {
        c.plugins.authorizer = section(template.to_str().unwrap(), "someone-else\n")
    })
    .await;
    let mut client = node.client().await;
    let status = produce(&mut client, "p", &[data(1, 10)]).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(
        status.message().contains("anonymous is not listed"),
        "{}",
        status.message()
    );
    node.shutdown().await;
}

#[tokio::test]
async fn an_acl_limits_what_a_subject_may_do_through_the_api() {
    // Without TLS every client is "anonymous"; tests/tests/tls.rs does the same for real
    // certificate subjects.
    let acl = "anonymous, uploads/*, produce\nanonymous, videos/*, consume\nanonymous, videos/*, metadata\n";
    let node = TestNode::start(|c| {
        c.plugins.authorizer = section("builtin:acl-authorizer", acl);
        c.plugins.decision_cache_ms = 60_000;
    })
    .await;
    // Seed videos/ directly in the store: the ACL does not let clients write there.
    node.node
        .store()
        .expect("a storage node")
        .append(&"videos/cat".try_into().unwrap(), data(5, 500).into())
        .await
        .unwrap();
    let mut client = node.client().await;
    assert_eq!(
        consume(&mut client, window("videos/cat", 0, 0, 0))
            .await
            .unwrap()
            .concat(),
        data(5, 500)
    );
    let meta = metadata(&mut client, "videos/cat").await.unwrap();
    assert_eq!(meta.size, 500);
    produce(&mut client, "uploads/a", &[data(6, 10)])
        .await
        .unwrap();

    assert_denied(
        [
            produce(&mut client, "videos/cat", &[data(7, 10)])
                .await
                .unwrap_err(),
            consume(&mut client, window("uploads/a", 0, 0, 0))
                .await
                .unwrap_err(),
            metadata(&mut client, "uploads/a").await.unwrap_err(),
        ],
        "no ACL line allows anonymous",
    );
    // Decisions are cached: the second identical call is a cache hit.
    let metrics = node.node.metrics_addr().to_string();
    let hits = || async {
        let scrape = goutube_tests::scrape_metrics(&metrics).await;
        goutube_tests::metric(&scrape, "goutube_authz_cache_hits_total").unwrap_or(0.0)
    };
    let before = hits().await;
    consume(&mut client, window("videos/cat", 0, 0, 0))
        .await
        .unwrap();
    let after = hits().await;
    assert!(after >= before + 1.0, "{before} -> {after}");
    node.shutdown().await;
}
