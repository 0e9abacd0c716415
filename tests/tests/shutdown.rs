//! Graceful shutdown loses nothing that was acknowledged: it lets open streams finish, then syncs
//! and closes every point, so even `fsync = "never"` data is durable and a restart verifies nothing.

use goutube::proto::ProduceRequest;
use goutube_tests::{
    NodeProcess, TestNode, consume, data, metric, produce, raw_client, scrape_metrics, window,
    write_config,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

// Multi-threaded: the client's connection must keep answering while this thread waits for the
// child to exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_syncs_everything_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "[storage]\nfsync = \"never\"\n");
    let node = NodeProcess::spawn(&config);
    let mut client = raw_client(&node.rpc).await;
    let mut written = Vec::new();
    for i in 0..20u64 {
        let point = format!("p{}", i % 4);
        let frame = data(i, 5000 + i as usize * 13);
        produce(&mut client, &point, std::slice::from_ref(&frame))
            .await
            .unwrap();
        written.push((point, frame));
    }
    assert!(
        node.terminate(),
        "goutube exits with status 0 after SIGTERM"
    );

    let node = NodeProcess::spawn(&config);
    let mut client = raw_client(&node.rpc).await;
    for p in 0..4 {
        let point = format!("p{p}");
        let want: Vec<u8> = written
            .iter()
            .filter(|(q, _)| *q == point)
            .flat_map(|(_, f)| f.clone())
            .collect();
        let got = consume(&mut client, window(&point, 0, 0, 0))
            .await
            .unwrap()
            .concat();
        assert_eq!(got, want, "{point}");
    }
    // Shutdown wrote a sync marker to every point: recovery had nothing to verify.
    let scrape = scrape_metrics(&node.metrics).await;
    assert_eq!(
        metric(&scrape, "goutube_recovery_verified_bytes_total"),
        Some(0.0),
        "{scrape}"
    );
    assert!(node.terminate());
}

#[tokio::test]
async fn an_open_produce_stream_may_finish_during_the_grace_period() {
    let node = TestNode::start(|c| {
        c.storage.fsync = goutube::point::Fsync::Never;
        c.shutdown_grace_ms = 10_000;
    })
    .await;
    let mut client = node.client().await;
    let (tx, rx) = mpsc::channel(4);
    let call = tokio::spawn(async move { client.produce_stream(ReceiverStream::new(rx)).await });
    let frames: Vec<Vec<u8>> = (0..6).map(|i| data(i, 4000)).collect();
    for frame in &frames[..3] {
        tx.send(ProduceRequest {
            point: "late".into(),
            frame: frame.clone().into(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    // Wait until the node holds those frames, then start shutting down mid-stream.
    let store = node.node.store().expect("a storage node").clone();
    goutube_tests::eventually("the first frames to land", || {
        let store = store.clone();
        async move {
            store
                .metadata(&"late".try_into().unwrap())
                .await
                .is_ok_and(|m| m.end == 12_000)
        }
    })
    .await;
    let TestNode { node, dir } = node;
    let shutdown = tokio::spawn(node.shutdown());
    for frame in &frames[3..] {
        tx.send(ProduceRequest {
            point: "late".into(),
            frame: frame.clone().into(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    drop(tx);
    let response = call
        .await
        .unwrap()
        .expect("the stream was allowed to finish")
        .into_inner();
    assert_eq!(response.records[0].end, 24_000);
    shutdown.await.unwrap().unwrap();

    let node = goutube_tests::start_in(dir.path(), |_| {}).await;
    let mut client = raw_client(&node.rpc_addr().to_string()).await;
    let got = consume(&mut client, window("late", 0, 0, 0))
        .await
        .unwrap()
        .concat();
    assert_eq!(got, frames.concat());
    node.shutdown().await.unwrap();
}
