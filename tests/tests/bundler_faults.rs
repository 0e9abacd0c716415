//! A broken or hostile bundler (the `misbehaving_bundler` component, one misbehaviour per test
//! case) never corrupts a replica, never stalls replication in silence and never exhausts
//! memory: whatever it does, the leader keeps serving, the follower holds only the leader's
//! bytes, the failure is counted, and once a good bundler is back (a reload) the copy converges.
//! The same holds for a handover between primaries.
//!
//! The cases run one at a time (they read the process-wide metrics as deltas).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use goutube::config::{Config, Role};
use goutube::plugins::PluginSection;
use goutube::point::{PointId, Store};
use goutube::proto::{DeletePointRequest, ProduceRequest};
use goutube_tests::{
    NodeProcess, TestNode, consume, counter, data, eventually, members, metadata, owner, produce,
    window,
};

/// The cases of this file, one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The misbehaving bundler, configured with `mode`.
fn misbehaving(mode: &str) -> PluginSection {
    let path = PathBuf::from(goutube::plugins::builtin::BUILD_DIR).join("misbehaving_bundler.wasm");
    PluginSection {
        source: path.to_str().unwrap().into(),
        config: mode.into(),
        ..goutube::plugins::PluginsSection::default().bundler
    }
}

/// The default bundler.
fn good() -> PluginSection {
    goutube::plugins::PluginsSection::default().bundler
}

async fn leader_with(bundler: PluginSection) -> TestNode {
    TestNode::start(move |c| {
        c.node_name = "leader".into();
        c.role = Role::Leader;
        c.plugins.bundler = bundler;
    })
    .await
}

fn following(leader: &str, bundler: PluginSection) -> impl FnOnce(&mut Config) + use<> {
    let leader = leader.to_owned();
    move |c| {
        c.node_name = "f1".into();
        c.role = Role::Follower;
        c.leader_addresses = vec![leader];
        c.plugins.bundler = bundler;
    }
}

async fn follower_with(leader: &TestNode, bundler: PluginSection) -> TestNode {
    let address = leader.node.replication_addr().to_string();
    TestNode::start(following(&address, bundler)).await
}

/// Writes `count` points of non-periodic bytes to `node` (one of them spans several
/// replication records).
async fn write_points(node: &TestNode, prefix: &str, count: usize) -> Vec<(String, Vec<u8>)> {
    let mut client = node.client().await;
    let mut points = Vec::new();
    for i in 0..count {
        let point = format!("{prefix}/{i}");
        let size = if i == 0 {
            2_500_000
        } else {
            40_000 + 7_919 * i
        };
        let bytes = data(1_000 + i as u64, size);
        produce(&mut client, &point, std::slice::from_ref(&bytes))
            .await
            .unwrap();
        points.push((point, bytes));
    }
    points
}

/// Every byte `store` holds of the `points` is the leader's byte at that offset (what it holds
/// may be shorter, or nothing).
async fn holds_only(store: &Store, points: &[(String, Vec<u8>)]) {
    for (point, bytes) in points {
        let id = PointId::new(point.as_str()).unwrap();
        let Ok(snapshot) = store.metadata(&id).await else {
            continue;
        };
        assert!(
            snapshot.end <= bytes.len() as u64,
            "{point}: {} bytes held, the leader has {}",
            snapshot.end,
            bytes.len()
        );
        let held = store.read(&id, 0, snapshot.end).await.unwrap();
        assert!(
            held[..] == bytes[..held.len()],
            "{point}: the copy differs from the leader's bytes"
        );
    }
}

/// Waits until `node` serves every one of `points` exactly.
async fn serves(node: &TestNode, points: &[(String, Vec<u8>)]) {
    let client = node.client().await;
    eventually("the copy to converge", || {
        let mut client = client.clone();
        async move {
            for (point, bytes) in points {
                match metadata(&mut client, point).await {
                    Ok(meta) if meta.size == bytes.len() as u64 => {}
                    _ => return false,
                }
            }
            true
        }
    })
    .await;
    let mut client = client.clone();
    for (point, bytes) in points {
        let read = consume(&mut client, window(point, 0, 0, 0)).await.unwrap();
        assert!(read.concat() == *bytes, "{point} differs once converged");
    }
}

/// The leader still takes writes and serves reads.
async fn keeps_serving(leader: &TestNode, point: &str) {
    let mut client = leader.client().await;
    let bytes = data(77, 100_000);
    produce(&mut client, point, std::slice::from_ref(&bytes))
        .await
        .unwrap();
    let read = consume(&mut client, window(point, 0, 0, 0)).await.unwrap();
    assert!(read.concat() == bytes, "the leader serves {point}");
}

/// Replaces `node`'s bundler (as SIGHUP does).
async fn reload_bundler(node: &TestNode, bundler: PluginSection) {
    let mut config = node.node.config().clone();
    config.plugins.bundler = bundler;
    node.node.reload(&config).await.unwrap();
}

fn labelled(name: &str, label: &str) -> f64 {
    let scrape = goutube::metrics::handle().render();
    scrape
        .lines()
        .filter(|line| line.starts_with(name) && line.contains(label))
        .filter_map(|line| line.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_whose_unbundle_fails_or_lies_applies_nothing_and_converges_after_a_reload() {
    let _serial = SERIAL.lock().await;
    let leader = leader_with(good()).await;
    let points = write_points(&leader, "unbundle", 5).await;
    for mode in ["panic", "oom", "flip", "longer"] {
        let (rejected, errors) = (
            counter(goutube::metrics::REPLICATION_REJECTED),
            counter(goutube::metrics::PLUGIN_ERRORS),
        );
        let follower = follower_with(&leader, misbehaving(mode)).await;
        eventually(&format!("{mode}: records rejected"), || async {
            counter(goutube::metrics::REPLICATION_REJECTED) >= rejected + 3.0
        })
        .await;
        if matches!(mode, "panic" | "oom") {
            assert!(
                counter(goutube::metrics::PLUGIN_ERRORS) > errors,
                "{mode}: the bundler's failures are counted"
            );
        }
        let store = follower.node.store().unwrap();
        holds_only(store, &points).await;
        keeps_serving(&leader, &format!("unbundle/served-{mode}")).await;
        // The leader's session stays, and sends again once the follower can take it.
        reload_bundler(&follower, good()).await;
        serves(&follower, &points).await;
        follower.shutdown().await;
    }
    leader.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bundler_that_prints_replicates_and_its_lines_are_counted() {
    let _serial = SERIAL.lock().await;
    let printed = labelled(goutube::metrics::PLUGIN_OUTPUT_LINES, "stream=\"stderr\"");
    let leader = leader_with(misbehaving("bundle-stderr")).await;
    let points = write_points(&leader, "printing", 4).await;
    let follower = follower_with(&leader, misbehaving("stderr")).await;
    serves(&follower, &points).await;
    holds_only(follower.node.store().unwrap(), &points).await;
    assert!(
        labelled(goutube::metrics::PLUGIN_OUTPUT_LINES, "stream=\"stderr\"") >= printed + 4.0,
        "what the bundlers printed was logged and counted"
    );
    follower.shutdown().await;
    leader.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_whose_bundle_fails_keeps_its_session_and_retries_after_a_reload() {
    let _serial = SERIAL.lock().await;
    for mode in ["bundle-panic", "bundle-oom"] {
        let leader = leader_with(good()).await;
        let points = write_points(&leader, "bundle", 4).await;
        reload_bundler(&leader, misbehaving(mode)).await;
        let unsent = labelled(goutube::metrics::REPLICATION_UNSENT, "bundler_failed");
        let follower = follower_with(&leader, good()).await;
        eventually(&format!("{mode}: records not sent, counted"), || async {
            labelled(goutube::metrics::REPLICATION_UNSENT, "bundler_failed") >= unsent + 3.0
        })
        .await;
        holds_only(follower.node.store().unwrap(), &points).await;
        keeps_serving(&leader, &format!("bundle/served-{mode}")).await;
        reload_bundler(&leader, good()).await;
        serves(&follower, &points).await;
        follower.shutdown().await;
        leader.shutdown().await;
    }
}

/// The leader in a child process, so that its peak memory is its own.
fn leader_process(dir: &std::path::Path, bundler: &PluginSection) -> NodeProcess {
    let config = goutube_tests::write_node_config(
        dir,
        "leader",
        &format!(
            "role = \"leader\"\n[plugins.bundler]\nsource = {:?}\nconfig = {:?}\n",
            bundler.source, bundler.config
        ),
    );
    NodeProcess::spawn(&config)
}

/// The peak resident memory of process `pid`, in MiB.
fn peak_rss_mib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib / 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_a_bundler_expands_travel_in_bounded_pushes_and_memory() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let expand = misbehaving("expand");
    let leader = leader_process(dir.path(), &expand);
    let mut client = goutube_tests::raw_client(&leader.rpc).await;
    // 40 small points: each record becomes 15 MiB on the wire.
    let mut points = Vec::new();
    for i in 0..40 {
        let point = format!("expanded/{i}");
        let bytes = data(2_000 + i, 4_096 + i as usize * 13);
        produce(&mut client, &point, std::slice::from_ref(&bytes))
            .await
            .unwrap();
        points.push((point, bytes));
    }
    let before = peak_rss_mib(leader.process.pid());
    let address = leader.addresses.replication.to_string();
    let follower = TestNode::start(following(&address, expand)).await;
    serves(&follower, &points).await;
    let peak = peak_rss_mib(leader.process.pid());
    // 40 records of 15 MiB each are 600 MiB on the wire; in flight at once: a few of them.
    assert!(
        peak < before + 256,
        "the leader's peak memory grew from {before} MiB to {peak} MiB"
    );
    follower.shutdown().await;
    assert!(leader.terminate());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_too_large_to_travel_is_refused_once_and_sent_after_a_reload() {
    let _serial = SERIAL.lock().await;
    let leader = leader_with(good()).await;
    let points = write_points(&leader, "large", 3).await;
    reload_bundler(&leader, misbehaving("expand:20")).await;
    let unsent = || labelled(goutube::metrics::REPLICATION_UNSENT, "too_large");
    let before = unsent();
    let follower = follower_with(&leader, misbehaving("")).await;
    eventually("each point's record refused", || async {
        unsent() >= before + points.len() as f64
    })
    .await;
    // A later point is refused too; the earlier ones were not tried again meanwhile.
    let mut client = leader.client().await;
    produce(&mut client, "large/later", &[data(9, 1_000)])
        .await
        .unwrap();
    eventually("the later point's record refused", || async {
        unsent() > before + points.len() as f64
    })
    .await;
    assert_eq!(unsent(), before + points.len() as f64 + 1.0);
    holds_only(follower.node.store().unwrap(), &points).await;
    reload_bundler(&leader, good()).await;
    serves(&follower, &points).await;
    follower.shutdown().await;
    leader.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_stops_within_its_grace_while_its_unbundle_is_slow() {
    let _serial = SERIAL.lock().await;
    let leader = leader_with(good()).await;
    write_points(&leader, "slow", 6).await;
    let rejected = counter(goutube::metrics::REPLICATION_REJECTED);
    let unbundles = || labelled(goutube::metrics::PLUGIN_CALLS, "call=\"unbundle\"");
    let before = unbundles();
    // Each record takes 700 ms of its 1 s deadline.
    let follower = follower_with(&leader, misbehaving("slow:700")).await;
    eventually("the follower to be unbundling", || async {
        unbundles() > before
    })
    .await;
    let grace = Duration::from_millis(follower.node.config().shutdown_grace_ms);
    let started = Instant::now();
    follower.shutdown().await;
    let took = started.elapsed();
    assert!(
        took < grace + Duration::from_millis(1_500),
        "shutdown took {took:?} (grace {grace:?})"
    );
    // Slow is not wrong: nothing was rejected.
    assert_eq!(counter(goutube::metrics::REPLICATION_REJECTED), rejected);
    leader.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_corrupted_before_the_host_checked_payloads_is_found_on_reconnect_and_repaired() {
    let _serial = SERIAL.lock().await;
    let leader = leader_with(good()).await;
    let points = write_points(&leader, "corrupted", 3).await;
    let follower = follower_with(&leader, good()).await;
    serves(&follower, &points).await;
    let TestNode { node, dir } = follower;
    node.shutdown().await.unwrap();

    // What a lying bundler left behind on an earlier release: the same length, one byte changed.
    let (point, bytes) = &points[1];
    let mut damaged = bytes.clone();
    damaged[bytes.len() / 3] ^= 0x01;
    {
        let config = goutube_tests::config(dir.path());
        let store = Store::open(config.store_config()).await.unwrap();
        let id = PointId::new(point.as_str()).unwrap();
        store.delete(&id).await.unwrap();
        store.append(&id, damaged.into()).await.unwrap();
        store.close().await.unwrap();
    }
    let found = labelled(goutube::metrics::REPLICATION_DIVERGENCES, "offer");
    let address = leader.node.replication_addr().to_string();
    let node = goutube_tests::start_in(dir.path(), following(&address, good())).await;
    let follower = TestNode { node, dir };
    eventually("the damaged copy to be found", || async {
        labelled(goutube::metrics::REPLICATION_DIVERGENCES, "offer") > found
    })
    .await;
    serves(&follower, &points).await;
    follower.shutdown().await;
    leader.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handover_to_a_member_whose_unbundle_lies_completes_only_with_the_right_bytes() {
    let _serial = SERIAL.lock().await;
    let a = TestNode::start(|c| {
        c.node_name = "a".into();
        c.cluster.bootstrap_expect = 2;
    })
    .await;
    let seed = a.node.gossip_addr().to_string();
    let b = TestNode::start(move |c| {
        c.node_name = "b".into();
        c.seed_addresses = vec![seed];
        c.cluster.bootstrap_expect = 2;
        c.plugins.bundler = misbehaving("flip");
    })
    .await;
    eventually("a and b to own the ring", || async {
        members(&a)
            .await
            .members
            .iter()
            .filter(|m| m.owns_range)
            .count()
            == 2
    })
    .await;
    let mut held = Vec::new();
    let mut client = a.client().await;
    for i in 0.. {
        if held.len() == 4 {
            break;
        }
        let point = format!("handed/{i}");
        if owner(&a, &point).await == "a" {
            let bytes = data(3_000 + i, 200_000 + i as usize * 1_000);
            produce(&mut client, &point, std::slice::from_ref(&bytes))
                .await
                .unwrap();
            held.push((point, bytes));
        }
    }
    let rejected = counter(goutube::metrics::REPLICATION_REJECTED);
    let options = goutube::client::ClientOptions {
        addr: a.addr(),
        tls: None,
    };
    goutube::client::Client::connect(&options)
        .await
        .unwrap()
        .drain("a", &options)
        .await
        .unwrap();
    eventually("the handed records to be rejected", || async {
        counter(goutube::metrics::REPLICATION_REJECTED) >= rejected + 3.0
    })
    .await;
    holds_only(b.node.store().unwrap(), &held).await;
    reload_bundler(&b, good()).await;
    eventually("a to hand everything over", || async {
        members(&b)
            .await
            .members
            .iter()
            .any(|m| m.name == "a" && m.state == "left")
    })
    .await;
    serves(&b, &held).await;
    b.shutdown().await;
    a.shutdown().await;
}

/// A leader's session with a follower that misses store events (its replicator stalled on a
/// slow bundle while more happened than the store's broadcast holds) walks every point again:
/// a point deleted and made again meanwhile, smaller or larger than before, replaces the
/// follower's old copy whole instead of being continued from where the old one ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_point_deleted_and_made_again_while_its_session_missed_store_events_is_sent_whole() {
    let _serial = SERIAL.lock().await;
    // Bundling a record of `stall` takes 10 s (within its deadline).
    let stalling = PluginSection {
        timeout_ms: 60_000,
        ..misbehaving("bundle-slow:10000:stall")
    };
    let leader = leader_with(stalling.clone()).await;
    let follower = follower_with(&leader, stalling).await;
    let mut client = leader.client().await;
    let before = [
        ("again/smaller".to_owned(), data(301, 61_003)),
        ("again/larger".to_owned(), data(302, 45_007)),
    ];
    for (point, bytes) in &before {
        produce(&mut client, point, std::slice::from_ref(bytes))
            .await
            .unwrap();
    }
    serves(&follower, &before).await;

    let rescans = || labelled(goutube::metrics::REPLICATION_RESCANS, "follower=\"f1\"");
    let rescanned = rescans();
    // The session takes this append's event, then stalls bundling it: every later event waits.
    let stall = ("stall".to_owned(), data(303, 1_009));
    produce(&mut client, &stall.0, std::slice::from_ref(&stall.1))
        .await
        .unwrap();
    let after = [
        ("again/smaller".to_owned(), data(311, 20_011)),
        ("again/larger".to_owned(), data(312, 90_001)),
    ];
    for (point, bytes) in &after {
        client
            .delete_point(DeletePointRequest {
                point: point.clone(),
            })
            .await
            .unwrap();
        produce(&mut client, point, std::slice::from_ref(bytes))
            .await
            .unwrap();
    }
    // More events than the broadcast holds (4,096): one append each, two points in turn.
    let filler: Vec<ProduceRequest> = (0..4_500)
        .map(|i| ProduceRequest {
            point: format!("filler/{}", i % 2),
            frame: data(400 + i, 13).into(),
            ..Default::default()
        })
        .collect();
    client
        .produce_stream(tokio_stream::iter(filler))
        .await
        .unwrap();

    let mut expected = after.to_vec();
    expected.push(stall);
    serves(&follower, &expected).await;
    holds_only(follower.node.store().unwrap(), &expected).await;
    assert!(
        rescans() > rescanned,
        "the session did not miss store events: the case was not reached"
    );
    follower.shutdown().await;
    leader.shutdown().await;
}
