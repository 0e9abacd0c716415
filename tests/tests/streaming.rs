//! The original goutube streaming tests, ported with non-periodic data and exact-byte assertions,
//! plus the calls added since (metadata checksum, list, delete, interleaved points).

use goutube::proto::{DeletePointRequest, ListPointsRequest};
use goutube_tests::{TestNode, consume, data, metadata, produce, window};
use tonic::Code;

/// Ten different 256-byte frames, as the original tests produce (but never periodic).
fn frames() -> Vec<Vec<u8>> {
    (0..10).map(|i| data(i, 256)).collect()
}

#[tokio::test]
async fn produce_then_consume_returns_every_frame() {
    // The original node served 256-byte chunks.
    let node = TestNode::start(|c| c.max_chunk_size = 256).await;
    let mut client = node.client().await;
    let frames = frames();
    let response = produce(&mut client, "video", &frames).await.unwrap();
    assert_eq!(response.records.len(), 1);
    assert_eq!(response.records[0].point, "video");
    assert_eq!(response.records[0].offset, 2304, "start of the last frame");
    assert_eq!(response.records[0].end, 2560);

    let got = consume(&mut client, window("video", 0, 0, 0))
        .await
        .unwrap();
    assert_eq!(got.len(), 10);
    for (got, want) in got.iter().zip(&frames) {
        assert_eq!(got.as_ref(), want.as_slice());
    }
    node.shutdown().await;
}

#[tokio::test]
async fn consume_windows_respect_offset_limit_and_chunk_size() {
    let node = TestNode::start(|c| c.max_chunk_size = 256).await;
    let mut client = node.client().await;
    let frames = frames();
    produce(&mut client, "video", &frames).await.unwrap();
    let all = frames.concat();

    let cases: [(u64, u64, u64, Vec<Vec<u8>>); 5] = [
        (0, 0, 0, frames.clone()),
        (512, 0, 0, frames[2..].to_vec()),
        (0, 2048, 0, frames[..8].to_vec()),
        (512, 1792, 0, frames[2..7].to_vec()),
        (
            256,
            1280,
            512,
            vec![all[256..768].to_vec(), all[768..1280].to_vec()],
        ),
    ];
    for (offset, limit, chunk, want) in cases {
        let got = consume(&mut client, window("video", offset, limit, chunk))
            .await
            .unwrap();
        let got: Vec<Vec<u8>> = got.iter().map(|f| f.to_vec()).collect();
        assert_eq!(got, want, "offset {offset} limit {limit} chunk {chunk}");
    }

    // A window that does not fall on frame boundaries delivers its partial last chunk.
    let got = consume(&mut client, window("video", 100, 1000, 300))
        .await
        .unwrap();
    let lens: Vec<usize> = got.iter().map(|f| f.len()).collect();
    assert_eq!(lens, vec![300, 300, 300]);
    assert_eq!(got.concat(), all[100..1000]);
    node.shutdown().await;
}

#[tokio::test]
async fn one_stream_may_interleave_points() {
    let node = TestNode::start(|_| {}).await;
    let mut client = node.client().await;
    let a = data(1, 1000);
    let b = data(2, 777);
    let requests = vec![("a", &a[..400]), ("b", &b[..]), ("a", &a[400..])];
    let requests: Vec<_> = requests
        .into_iter()
        .map(|(point, frame)| goutube::proto::ProduceRequest {
            point: point.into(),
            frame: bytes::Bytes::copy_from_slice(frame),
            ..Default::default()
        })
        .collect();
    let response = client
        .produce_stream(tokio_stream::iter(requests))
        .await
        .unwrap()
        .into_inner();
    let records: Vec<_> = response
        .records
        .iter()
        .map(|r| (r.point.as_str(), r.offset, r.end))
        .collect();
    assert_eq!(records, vec![("a", 400, 1000), ("b", 0, 777)]);
    assert_eq!(response.records[0].crc32c, crc32c::crc32c(&a));

    let meta = metadata(&mut client, "a").await.unwrap();
    assert_eq!((meta.size, meta.crc32c), (1000, crc32c::crc32c(&a)));
    assert_eq!(
        meta.workers,
        vec![node.addr()],
        "a standalone node is its only worker"
    );
    assert_eq!(meta.role, "standalone");
    assert_eq!(
        consume(&mut client, window("b", 0, 0, 0))
            .await
            .unwrap()
            .concat(),
        b
    );
    node.shutdown().await;
}

#[tokio::test]
async fn points_can_be_listed_in_pages_and_deleted() {
    let node = TestNode::start(|_| {}).await;
    let mut client = node.client().await;
    for i in 0..25 {
        produce(&mut client, &format!("cams/{i:02}"), &[data(i, 10)])
            .await
            .unwrap();
    }
    produce(&mut client, "other", &[data(99, 10)])
        .await
        .unwrap();

    let mut seen = Vec::new();
    let mut start_after = String::new();
    loop {
        let page = client
            .list_points(ListPointsRequest {
                prefix: "cams/".into(),
                start_after: start_after.clone(),
                max_results: 10,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.points.len() <= 10);
        seen.extend(page.points);
        if page.next.is_empty() {
            break;
        }
        start_after = page.next;
    }
    let want: Vec<String> = (0..25).map(|i| format!("cams/{i:02}")).collect();
    assert_eq!(seen, want);

    let deleted = client
        .delete_point(DeletePointRequest {
            point: "cams/07".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(deleted.size, 10);
    let status = consume(&mut client, window("cams/07", 0, 0, 0))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let status = client
        .delete_point(DeletePointRequest {
            point: "cams/07".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);

    // Deletion survives a restart; the other points are intact.
    let node = node.restart(|_| {}).await;
    let mut client = node.client().await;
    let listed = client
        .list_points(ListPointsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .points;
    assert_eq!(listed.len(), 25);
    assert!(!listed.contains(&"cams/07".to_string()));
    assert_eq!(
        consume(&mut client, window("cams/08", 0, 0, 0))
            .await
            .unwrap()
            .concat(),
        data(8, 10)
    );
    node.shutdown().await;
}
