//! Writes that can be retried without writing a byte twice: `ProduceRequest.expected_offset`
//! on the wire, and `goutube put` (the Rust client) resuming an upload that a node restart cut,
//! from what the node holds, or refusing when another writer got there first.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc as std_mpsc;

use bytes::Bytes;
use goutube::client::{Client, ClientError, ClientOptions, Progress, PutMode, PutOptions};
use goutube::config::Config;
use goutube::node::Node;
use goutube::proto::{ListPointsRequest, ProduceRequest};
use goutube_tests::{
    DEADLINE, TestNode, consume, data, eventually, free_port, metadata, produce, start_in, window,
};
use tokio::sync::oneshot;
use tonic::Code;

fn at(point: &str, offset: Option<u64>, frame: &[u8]) -> ProduceRequest {
    ProduceRequest {
        point: point.into(),
        frame: Bytes::copy_from_slice(frame),
        expected_offset: offset,
        ..Default::default()
    }
}

async fn produce_requests(
    node: &TestNode,
    requests: Vec<ProduceRequest>,
) -> Result<goutube::proto::ProduceResponse, tonic::Status> {
    Ok(node
        .client()
        .await
        .produce_stream(tokio_stream::iter(requests))
        .await?
        .into_inner())
}

fn end_in(status: &tonic::Status) -> u64 {
    status
        .metadata()
        .get("goutube-end")
        .unwrap_or_else(|| panic!("no goutube-end in {status:?}"))
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn a_frame_is_appended_only_at_its_expected_offset() {
    let node = TestNode::start(|_| {}).await;
    let (a, b, c) = (data(1, 3000), data(2, 5000), data(3, 700));

    // Each frame at the end the one before it left: both applied, as one batch or two.
    let response = produce_requests(&node, vec![at("p", Some(0), &a), at("p", Some(3000), &b)])
        .await
        .unwrap();
    assert_eq!(response.records[0].end, 8000);
    let before = metadata(&mut node.client().await, "p").await.unwrap();

    // The same frame again (a retry that does not know it was applied): refused, with the end.
    let refused = produce_requests(&node, vec![at("p", Some(3000), &b)])
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert_eq!(end_in(&refused), 8000);
    assert!(
        refused.message().contains("ends at 8000"),
        "{}",
        refused.message()
    );
    let after = metadata(&mut node.client().await, "p").await.unwrap();
    assert_eq!((after.size, after.crc32c), (before.size, before.crc32c));

    // Frames without an offset follow one with it; a later one that does not fit ends the
    // stream, and what came before it stays written.
    let refused = produce_requests(
        &node,
        vec![
            at("p", Some(8000), &c),
            at("p", None, &a),
            at("p", Some(8000 + 700 + 3000), &b),
            at("p", Some(1), &c),
            at("p", None, &c),
        ],
    )
    .await
    .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert_eq!(end_in(&refused), 16_700);
    let got: Vec<u8> = consume(&mut node.client().await, window("p", 0, 0, 0))
        .await
        .unwrap()
        .concat();
    assert_eq!(got, [&a[..], &b, &c, &a, &b].concat());

    // A point that does not exist ends at 0; refusing a frame for it does not create it.
    let refused = produce_requests(&node, vec![at("new", Some(5), &c)])
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert_eq!(end_in(&refused), 0);
    let missing = metadata(&mut node.client().await, "new").await.unwrap_err();
    assert_eq!(missing.code(), Code::NotFound, "{missing:?}");
    let listed = node
        .client()
        .await
        .list_points(ListPointsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.points, vec!["p".to_string()]);

    // Offset 0 creates a point, exactly once.
    produce_requests(&node, vec![at("new", Some(0), &c)])
        .await
        .unwrap();
    let refused = produce_requests(&node, vec![at("new", Some(0), &c)])
        .await
        .unwrap_err();
    assert_eq!(end_in(&refused), 700);
    node.shutdown().await;
}

/// Reports progress, and once `pause_at` bytes were read, tells the test and waits until it
/// says go on (the upload is stopped there, mid-stream, while the test acts on the node).
struct PauseOnce {
    read: AtomicU64,
    pause_at: u64,
    reached: std::sync::Mutex<Option<oneshot::Sender<()>>>,
    resume: std::sync::Mutex<std_mpsc::Receiver<()>>,
}

impl Progress for PauseOnce {
    fn start(&self, _: u64, _: u64) {}

    fn advance(&self, bytes: u64) {
        let before = self.read.fetch_add(bytes, Ordering::SeqCst);
        if before < self.pause_at && before + bytes >= self.pause_at {
            let reached = self.reached.lock().unwrap().take();
            reached.unwrap().send(()).unwrap();
            // Blocks this upload's reader only (the test runs on several worker threads).
            self.resume
                .lock()
                .unwrap()
                .recv_timeout(DEADLINE)
                .expect("the test lets the upload go on");
        }
    }
}

/// Starts `goutube put` of `file` to a node on `port`, pausing it after `pause_at` bytes; runs
/// `meanwhile` while the upload waits (it restarts the node) and returns the upload's result
/// with what `meanwhile` returned.
async fn put_interrupted<T, F, Fut>(
    port: u16,
    mode: PutMode,
    file: &Path,
    pause_at: u64,
    meanwhile: F,
) -> (Result<goutube::client::PutReport, ClientError>, T)
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = T>,
{
    let (reached, reached_rx) = oneshot::channel();
    let (resume, resume_rx) = std_mpsc::channel();
    let progress = Arc::new(PauseOnce {
        read: AtomicU64::new(0),
        pause_at,
        reached: std::sync::Mutex::new(Some(reached)),
        resume: std::sync::Mutex::new(resume_rx),
    });
    let client = Client::connect(&ClientOptions {
        addr: format!("127.0.0.1:{port}"),
        tls: None,
    })
    .await
    .unwrap();
    let file = file.to_owned();
    let upload = tokio::spawn(async move {
        client
            .put(
                "recording",
                &file,
                &PutOptions {
                    mode,
                    ..Default::default()
                },
                progress,
            )
            .await
    });
    tokio::time::timeout(DEADLINE, reached_rx)
        .await
        .expect("the upload reaches the pause")
        .unwrap();
    let meanwhile = meanwhile().await;
    resume.send(()).unwrap();
    let result = tokio::time::timeout(DEADLINE, upload)
        .await
        .expect("the upload ends")
        .unwrap();
    (result, meanwhile)
}

/// Stops the node on `store` at once (open streams cut) and starts it again on the same port;
/// returns it with the size of `recording` it came back with.
async fn restart(node: Node, store: &Path, port: u16) -> (Node, u64) {
    // The upload pauses once its file reader is ahead; the frames it sent may still be on
    // their way: the cut must fall after some of them landed.
    eventually("the node to hold the start of the upload", || async {
        metadata(&mut node_client(port).await, "recording")
            .await
            .is_ok_and(|m| m.size > 0)
    })
    .await;
    node.shutdown().await.unwrap();
    let node = start_in(store, |c| configure(c, port)).await;
    let held = metadata(&mut node_client(port).await, "recording")
        .await
        .unwrap()
        .size;
    (node, held)
}

fn configure(config: &mut Config, port: u16) {
    config.rpc_port = port;
    config.shutdown_grace_ms = 0;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn put_resumes_after_a_restart_without_writing_twice() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let prefix = data(10, 1_000_003);
    let body = data(11, 24 * 1024 * 1024 + 12_345);
    let file = dir.path().join("upload.bin");
    std::fs::write(&file, &body).unwrap();
    let store = dir.path().join("node");
    let node = start_in(&store, |c| configure(c, port)).await;
    // The point has bytes before the upload: the put appends after them.
    produce(
        &mut node_client(port).await,
        "recording",
        std::slice::from_ref(&prefix),
    )
    .await
    .unwrap();

    let (report, (node, held)) =
        put_interrupted(port, PutMode::Append, &file, 8 * 1024 * 1024, || {
            restart(node, &store, port)
        })
        .await;
    let report = report.expect("the upload resumes and completes");

    assert!(report.retries >= 1, "{report:?}");
    assert!(
        held > prefix.len() as u64 && held < (prefix.len() + body.len()) as u64,
        "the node held {held} bytes when it came back: the upload was cut in the middle"
    );
    assert_eq!(report.record.end, (prefix.len() + body.len()) as u64);
    let got: Vec<u8> = consume(&mut node_client(port).await, window("recording", 0, 0, 0))
        .await
        .unwrap()
        .concat();
    assert!(
        got == [&prefix[..], &body].concat(),
        "the point is the prefix and the file, once"
    );
    node.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn put_refuses_to_resume_over_another_writers_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let body = data(20, 16 * 1024 * 1024);
    let file = dir.path().join("upload.bin");
    std::fs::write(&file, &body).unwrap();
    let store = dir.path().join("node");
    let node = start_in(&store, |c| configure(c, port)).await;
    let intruder = data(21, 4096);

    let (error, (node, held)) =
        put_interrupted(port, PutMode::New, &file, 4 * 1024 * 1024, || async {
            let (node, held) = restart(node, &store, port).await;
            // Someone else appends before the upload resumes.
            produce(
                &mut node_client(port).await,
                "recording",
                std::slice::from_ref(&intruder),
            )
            .await
            .unwrap();
            (node, held)
        })
        .await;
    let error = error.expect_err("the upload must not resume over bytes it did not write");

    assert!(
        error.to_string().contains("changed during the upload"),
        "{error}"
    );
    let got: Vec<u8> = consume(&mut node_client(port).await, window("recording", 0, 0, 0))
        .await
        .unwrap()
        .concat();
    let held = held as usize;
    assert!(held > 0 && held < body.len(), "cut in the middle: {held}");
    assert!(
        got == [&body[..held], &intruder].concat(),
        "nothing was written after the other writer's bytes"
    );
    node.shutdown().await.unwrap();
}

async fn node_client(
    port: u16,
) -> goutube::proto::streaming_client::StreamingClient<tonic::transport::Channel> {
    goutube_tests::raw_client(&format!("127.0.0.1:{port}")).await
}
