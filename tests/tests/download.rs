//! Multi-stream downloads against real replicas: a leader in this process, followers as
//! processes that are killed or stopped in the middle of a download, a balancer in front. The
//! download completes and verifies every time; an interrupted `goutube get` resumes from what
//! its `.part` file holds, verified, without fetching it again. `goutube stat` shows each replica
//! connected or not.

use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use goutube::client::{Client, ClientOptions, GetOptions, GetReport, Progress};
use goutube_tests::{DEADLINE, NodeProcess, ProcessReplicas, eventually, goutube_bin};

const SIZE: usize = 128 * 1024 * 1024;

/// Runs `action` once, from the download's own progress callback, when `at` bytes are in the
/// file: the failure lands in the middle of the download, wherever the machine's speed puts it.
struct At {
    at: u64,
    seen: AtomicU64,
    action: Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

impl At {
    fn new(at: u64, action: impl FnOnce() + Send + 'static) -> Arc<At> {
        Arc::new(At {
            at,
            seen: AtomicU64::new(0),
            action: Mutex::new(Some(Box::new(action))),
        })
    }

    fn fired(&self) -> bool {
        self.action.lock().unwrap().is_none()
    }
}

impl Progress for At {
    fn start(&self, _total: u64, done: u64) {
        self.seen.store(done, Ordering::SeqCst);
    }

    fn advance(&self, bytes: u64) {
        let seen = self.seen.fetch_add(bytes, Ordering::SeqCst) + bytes;
        if seen >= self.at
            && let Some(action) = self.action.lock().unwrap().take()
        {
            action();
        }
    }
}

async fn get(addr: String, point: &str, out: &Path, progress: Arc<At>) -> GetReport {
    let client = Client::connect(&ClientOptions { addr, tls: None })
        .await
        .unwrap();
    tokio::time::timeout(
        DEADLINE,
        client.get(point, out, &GetOptions::default(), progress),
    )
    .await
    .expect("the download finished")
    .expect("the download succeeded")
}

/// The file holds exactly `expected`, and nothing of the download is left beside it.
fn assert_downloaded(out: &Path, expected: &[u8]) {
    let read = std::fs::read(out).unwrap();
    assert_eq!(read.len(), expected.len());
    assert!(read == expected, "byte-exact");
    let leftover = |suffix: &str| Path::new(&format!("{}{suffix}", out.display())).exists();
    assert!(!leftover(".part") && !leftover(".part.journal"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_download_costs_only_time() {
    let mut replicas = ProcessReplicas::start(2).await;
    let expected = replicas.point_everywhere("films/killed", SIZE).await;
    let victim = replicas.followers[0].take().unwrap();
    let progress = At::new(SIZE as u64 / 10, move || victim.kill());
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("killed.bin");
    // Through the balancer: it names the leader and both followers as workers.
    let report = get(
        replicas.balancer.addr(),
        "films/killed",
        &out,
        progress.clone(),
    )
    .await;
    assert!(progress.fired());
    assert_eq!(report.size, SIZE as u64);
    assert_eq!(report.crc32c, crc32c::crc32c(&expected));
    assert_eq!(report.workers, 3, "{report:?}");
    assert!(
        report.retries >= 1,
        "the killed worker's range went on elsewhere: {report:?}"
    );
    assert_downloaded(&out, &expected);
    replicas.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_worker_is_hedged() {
    let mut replicas = ProcessReplicas::start(2).await;
    let expected = replicas.point_everywhere("films/stalled", SIZE).await;
    let victim = Arc::new(replicas.followers[0].take().unwrap());
    let stopped = victim.clone();
    let progress = At::new(SIZE as u64 / 10, move || stopped.signal("STOP"));
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("stalled.bin");
    let report = get(
        replicas.leader.addr(),
        "films/stalled",
        &out,
        progress.clone(),
    )
    .await;
    assert!(progress.fired());
    victim.signal("CONT");
    assert_eq!(report.crc32c, crc32c::crc32c(&expected));
    assert!(
        report.hedges >= 1,
        "the stalled range was fetched again: {report:?}"
    );
    assert_downloaded(&out, &expected);
    replicas.shutdown().await;
}

/// Pieces the journal beside `out.part` lists as finished.
fn journaled(out: &Path) -> usize {
    std::fs::read(format!("{}.part.journal", out.display()))
        .ok()
        .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok())
        .and_then(|journal| journal["done"].as_array().map(Vec::len))
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_get_resumes_without_fetching_verified_ranges_again() {
    let replicas = ProcessReplicas::start(2).await;
    let expected = replicas.point_everywhere("films/resumed", SIZE).await;
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("resumed.bin");
    let out_arg = out.to_str().unwrap();
    let addr = replicas.balancer.addr();

    // With a follower stopped and no hedging, the download finishes the other ranges and then
    // waits on the stopped one: that is where it is interrupted.
    let stalled: &NodeProcess = replicas.followers[0].as_ref().unwrap();
    stalled.signal("STOP");
    let mut first = tokio::process::Command::new(goutube_bin())
        .args([
            "get",
            "films/resumed",
            out_arg,
            "--no-hedge",
            "--addr",
            &addr,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    eventually("finished ranges in the journal", || {
        let exited = first.try_wait().unwrap();
        assert!(exited.is_none(), "goutube get ended early: {exited:?}");
        async { journaled(&out) >= 2 }
    })
    .await;
    first.kill().await.unwrap();
    assert!(!out.exists(), "the interrupted download did not finish");
    stalled.signal("CONT");

    let second = tokio::time::timeout(
        DEADLINE,
        tokio::process::Command::new(goutube_bin())
            .args(["get", "films/resumed", out_arg, "--resume", "--addr", &addr])
            .output(),
    )
    .await
    .expect("the resumed download finished")
    .unwrap();
    let stdout = String::from_utf8_lossy(&second.stdout);
    assert!(
        second.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&second.stderr)
    );
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("resumed: "))
        .unwrap_or_else(|| panic!("a resumed line: {stdout}"));
    let numbers: Vec<u64> = line
        .split_whitespace()
        .filter_map(|word| word.parse().ok())
        .collect();
    let [verified, fetched] = numbers[..] else {
        panic!("two numbers in {line:?}");
    };
    assert!(verified > 0, "{line}");
    assert!(
        fetched < SIZE as u64,
        "verified ranges were not fetched again: {line}"
    );
    assert!(verified + fetched >= SIZE as u64, "{line}");
    assert_downloaded(&out, &expected);
    replicas.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_and_get_through_a_balancer() {
    let replicas = ProcessReplicas::start(2).await;
    let work = tempfile::tempdir().unwrap();
    let input = work.path().join("in.bin");
    let out = work.path().join("out.bin");
    let bytes = goutube_tests::data(5, 24 * 1024 * 1024 + 3);
    std::fs::write(&input, &bytes).unwrap();
    let addr = replicas.balancer.addr();
    let run = |args: Vec<String>| async move {
        let output = tokio::process::Command::new(goutube_bin())
            .args(&args)
            .output()
            .await
            .unwrap();
        assert!(
            output.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let path = |p: &Path| p.to_str().unwrap().to_owned();
    run(vec![
        "put".into(),
        path(&input),
        "films/through".into(),
        "--addr".into(),
        addr.clone(),
    ])
    .await;
    // The followers catch up; then the balancer names all three replicas as workers.
    eventually("every replica holds the point", || async {
        let client = Client::connect(&ClientOptions {
            addr: addr.clone(),
            tls: None,
        })
        .await
        .unwrap();
        client
            .stat("films/through")
            .await
            .is_ok_and(|m| m.workers.len() == 3)
    })
    .await;
    let got = run(vec![
        "get".into(),
        "films/through".into(),
        path(&out),
        "--addr".into(),
        addr.clone(),
    ])
    .await;
    assert!(got.contains("verified"), "{got}");
    assert_downloaded(&out, &bytes);
    replicas.shutdown().await;
}

/// `goutube stat` shows each replica as connected or not, with its confirmed end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stat_shows_each_replica_connected_or_not() {
    let mut replicas = ProcessReplicas::start(1).await;
    let size = 2 * 1024 * 1024;
    replicas.point_everywhere("films/stat", size).await;
    let addr = replicas.leader.addr();
    let follower_rpc = replicas.followers[0].as_ref().unwrap().rpc.clone();
    let stat = || async {
        let output = tokio::process::Command::new(goutube_bin())
            .args(["stat", "films/stat", "--addr", &addr])
            .output()
            .await
            .unwrap();
        assert!(output.status.success());
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let shown = stat().await;
    let line = format!(
        "replica: follower-0 at {follower_rpc} connected, confirmed {size} bytes, lag 0 bytes"
    );
    assert!(shown.contains(&line), "{shown}");
    replicas.followers[0].take().unwrap().kill();
    let line =
        format!("replica: follower-0 at {follower_rpc} NOT CONNECTED, confirmed {size} bytes");
    eventually("the killed follower shown as not connected", || async {
        stat().await.contains(&line)
    })
    .await;
    replicas.shutdown().await;
}
