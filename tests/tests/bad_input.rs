//! Hostile and malformed input gets a clear status, never a panic or a silently short stream, and
//! the node keeps serving everyone else.

use goutube::proto::ProduceRequest;
use goutube_tests::{TestNode, consume, data, metadata, produce, raw_client, start_in, window};
use tonic::Code;

const HOSTILE_IDS: [&str; 2] = ["", "a\0b"];

#[tokio::test]
async fn invalid_point_ids_are_refused() {
    let node = TestNode::start(|_| {}).await;
    let mut client = node.client().await;
    let long = "x".repeat(300);
    for id in HOSTILE_IDS.iter().copied().chain([long.as_str()]) {
        let status = produce(&mut client, id, &[data(1, 10)]).await.unwrap_err();
        assert_eq!(
            status.code(),
            Code::InvalidArgument,
            "produce {id:?}: {status:?}"
        );
        assert!(
            status.message().contains("point id"),
            "{}",
            status.message()
        );
        let status = consume(&mut client, window(id, 0, 0, 0)).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "consume {id:?}");
        let status = metadata(&mut client, id).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "metadata {id:?}");
    }
    node.shutdown().await;
}

#[tokio::test]
async fn path_like_ids_are_plain_names() {
    // The node's data directory sits in a directory of the test's own, so anything written
    // beside it (an id escaping through `..`) would show.
    let outer = tempfile::tempdir().unwrap();
    let data_dir = outer.path().join("node");
    let node = start_in(&data_dir, |_| {}).await;
    let mut client = raw_client(&node.rpc_addr().to_string()).await;
    let ids = ["../x", "a/b", ".", "..", "/etc/passwd"];
    for (i, id) in ids.iter().enumerate() {
        produce(&mut client, id, &[data(i as u64, 100)])
            .await
            .unwrap();
    }
    for (i, id) in ids.iter().enumerate() {
        let got = consume(&mut client, window(id, 0, 0, 0)).await.unwrap();
        assert_eq!(got.concat(), data(i as u64, 100), "{id}");
    }
    // Only the node's own directory was written to.
    let names = |dir: &std::path::Path| -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    };
    assert_eq!(names(outer.path()), vec!["node".to_string()]);
    assert_eq!(
        names(&data_dir),
        vec!["catalogue", "cluster", "controller", "points", "segments"]
    );
    node.shutdown().await.unwrap();
}

#[tokio::test]
async fn oversized_frames_are_invalid_and_the_node_keeps_serving() {
    let node = TestNode::start(|c| {
        c.max_frame_size = 64 * 1024;
        c.max_chunk_size = 16 * 1024;
    })
    .await;
    let mut client = node.client().await;
    produce(&mut client, "ok", &[data(1, 1000)]).await.unwrap();
    let status = produce(&mut client, "big", &[data(2, 64 * 1024 + 1)])
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("max_frame_size"),
        "{}",
        status.message()
    );
    // A frame far beyond the limit is refused by the transport's message limit.
    let status = produce(&mut client, "huge", &[data(3, 1024 * 1024)])
        .await
        .unwrap_err();
    assert!(
        matches!(
            status.code(),
            Code::InvalidArgument | Code::OutOfRange | Code::ResourceExhausted
        ),
        "{status:?}"
    );
    // Exactly the limit is fine, and earlier data is intact.
    produce(&mut client, "edge", &[data(4, 64 * 1024)])
        .await
        .unwrap();
    let mut client = node.client().await;
    assert_eq!(
        consume(&mut client, window("ok", 0, 0, 0))
            .await
            .unwrap()
            .concat(),
        data(1, 1000)
    );
    let status = consume(&mut client, window("big", 0, 0, 0))
        .await
        .unwrap_err();
    assert_eq!(
        status.code(),
        Code::NotFound,
        "nothing of the refused stream was written"
    );
    node.shutdown().await;
}

#[tokio::test]
async fn bad_windows_are_errors_not_short_streams() {
    let node = TestNode::start(|_| {}).await;
    let mut client = node.client().await;
    let bytes = data(7, 1000);
    produce(&mut client, "p", std::slice::from_ref(&bytes))
        .await
        .unwrap();

    let status = consume(&mut client, window("p", 1001, 0, 0))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "offset past the end");
    let status = consume(&mut client, window("p", 500, 100, 0))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "limit before offset");
    let status = consume(&mut client, window("p", 0, 1500, 0))
        .await
        .unwrap_err();
    assert_eq!(
        status.code(),
        Code::OutOfRange,
        "limit past the end without follow"
    );
    let status = consume(&mut client, window("missing", 0, 0, 0))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert!(status.message().contains("missing"));
    let status = metadata(&mut client, "missing").await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound);

    // A chunk larger than the point: one frame with all of it.
    let got = consume(&mut client, window("p", 0, 0, 1 << 20))
        .await
        .unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].as_ref(), bytes.as_slice());
    // Offset at the end: an empty, successful stream.
    assert!(
        consume(&mut client, window("p", 1000, 0, 0))
            .await
            .unwrap()
            .is_empty()
    );
    node.shutdown().await;
}

#[tokio::test]
async fn a_stream_that_fails_midway_keeps_what_was_written() {
    let node = TestNode::start(|c| {
        c.max_frame_size = 4096;
        c.max_chunk_size = 4096;
    })
    .await;
    let mut client = node.client().await;
    let good = data(1, 4096);
    let requests = vec![
        ProduceRequest {
            point: "p".into(),
            frame: good.clone().into(),
            ..Default::default()
        },
        ProduceRequest {
            point: "".into(),
            frame: data(2, 10).into(),
            ..Default::default()
        },
        ProduceRequest {
            point: "p".into(),
            frame: data(3, 10).into(),
            ..Default::default()
        },
    ];
    let status = client
        .produce_stream(tokio_stream::iter(requests))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let meta = metadata(&mut client, "p").await.unwrap();
    assert_eq!((meta.size, meta.crc32c), (4096, crc32c::crc32c(&good)));
    node.shutdown().await;
}
