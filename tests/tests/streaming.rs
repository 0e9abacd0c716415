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

/// Three frames for each of 120 points, round-robin: no two frames in a row are of one point.
fn round_robin() -> Vec<(String, Vec<u8>)> {
    (0..3u64)
        .flat_map(|k| {
            (0..120u64).map(move |i| {
                let len = 100 + ((i * 7 + k * 13) % 61) as usize;
                (format!("many/{i:03}"), data(i * 10 + k, len))
            })
        })
        .collect()
}

fn request(
    point: &str,
    frame: &[u8],
    expected_offset: Option<u64>,
) -> goutube::proto::ProduceRequest {
    goutube::proto::ProduceRequest {
        point: point.into(),
        frame: bytes::Bytes::copy_from_slice(frame),
        expected_offset,
        ..Default::default()
    }
}

#[tokio::test]
async fn a_stream_writes_many_points_at_once_each_in_its_order() {
    let node = TestNode::start(|_| {}).await;
    let mut client = node.client().await;
    // And between every two of them a frame of one hot point, whose appends must wait on each
    // other while the others' are in flight.
    let frames: Vec<(String, Vec<u8>)> = round_robin()
        .into_iter()
        .enumerate()
        .flat_map(|(n, frame)| {
            let hot = ("many/hot".to_string(), data(10_000 + n as u64, 50 + n % 17));
            [frame, hot]
        })
        .collect();
    let requests: Vec<_> = frames
        .iter()
        .map(|(point, frame)| request(point, frame, None))
        .collect();
    let response = client
        .produce_stream(tokio_stream::iter(requests))
        .await
        .unwrap()
        .into_inner();
    // One record per point, in first-seen order, each at its point's end.
    let mut order: Vec<String> = (0..120).map(|i| format!("many/{i:03}")).collect();
    order.insert(1, "many/hot".into());
    assert_eq!(response.records.len(), order.len());
    for (record, point) in response.records.iter().zip(order) {
        let whole: Vec<u8> = frames
            .iter()
            .filter(|(p, _)| *p == point)
            .flat_map(|(_, frame)| frame.clone())
            .collect();
        let last = frames.iter().rev().find(|(p, _)| *p == point).unwrap();
        assert_eq!(record.point, point);
        assert_eq!(record.end, whole.len() as u64);
        assert_eq!(record.offset, (whole.len() - last.1.len()) as u64);
        assert_eq!(record.crc32c, crc32c::crc32c(&whole));
        let got = consume(&mut client, window(&point, 0, 0, 0)).await.unwrap();
        assert_eq!(got.concat(), whole, "{point}");
    }
    node.shutdown().await;
}

#[tokio::test]
async fn a_failed_frame_ends_a_stream_of_many_points_and_is_the_error() {
    let node = TestNode::start(|_| {}).await;
    let mut client = node.client().await;
    let frames = round_robin();
    // Every frame with its expected offset; the second frame of many/050 with a wrong one.
    let mut ends = std::collections::HashMap::new();
    let mut failing = None;
    let requests: Vec<_> = frames
        .iter()
        .enumerate()
        .map(|(n, (point, frame))| {
            let end = ends.entry(point.clone()).or_insert(0u64);
            let mut offset = *end;
            if point == "many/050" && offset > 0 && failing.is_none() {
                failing = Some(n);
                offset += 1;
            }
            *end += frame.len() as u64;
            request(point, frame, Some(offset))
        })
        .collect();
    let failing = failing.unwrap();
    let refused = client
        .produce_stream(tokio_stream::iter(requests))
        .await
        .unwrap_err();
    assert_eq!(
        refused.code(),
        tonic::Code::FailedPrecondition,
        "{refused:?}"
    );
    assert!(
        refused.message().contains("many/050"),
        "{}",
        refused.message()
    );
    // Each point holds a prefix of its frames, in order: all of those before the failure, and
    // for the failed point exactly its first frame.
    for i in 0..120 {
        let point = format!("many/{i:03}");
        let sent: Vec<(usize, &Vec<u8>)> = frames
            .iter()
            .enumerate()
            .filter(|(_, (p, _))| *p == point)
            .map(|(n, (_, frame))| (n, frame))
            .collect();
        let got = match consume(&mut client, window(&point, 0, 0, 0)).await {
            Ok(got) => got.concat(),
            Err(status) if status.code() == tonic::Code::NotFound => Vec::new(),
            Err(status) => panic!("{point}: {status:?}"),
        };
        let before: Vec<u8> = sent
            .iter()
            .filter(|(n, _)| *n < failing)
            .flat_map(|(_, frame)| frame.to_vec())
            .collect();
        if point == "many/050" {
            assert_eq!(got, before, "{point}");
            continue;
        }
        let prefix = sent.iter().any(|(n, _)| {
            let upto: Vec<u8> = sent
                .iter()
                .filter(|(m, _)| m <= n)
                .flat_map(|(_, frame)| frame.to_vec())
                .collect();
            upto == got
        });
        assert!(
            got.len() >= before.len() && prefix,
            "{point}: {} bytes",
            got.len()
        );
    }
    node.shutdown().await;
}

#[tokio::test]
async fn new_points_are_admitted_ahead_and_the_earliest_failure_is_the_answer() {
    let node = TestNode::start(|c| {
        c.max_frame_size = 64 * 1024;
        c.max_chunk_size = 16 * 1024;
    })
    .await;
    let mut client = node.client().await;
    // Forty new points (admitted while the ones before are), then a point whose admission
    // fails (its content type is no media type), then a frame that fails as it is received
    // (too large): the admission's failure came first in the stream, so it is the answer.
    let mut requests: Vec<_> = (0..40u64)
        .map(|i| request(&format!("ahead/{i:02}"), &data(700 + i, 900), None))
        .collect();
    requests.push(goutube::proto::ProduceRequest {
        content_type: "not a media type".into(),
        ..request("ahead/bad", &data(800, 100), None)
    });
    requests.push(request("ahead/big", &data(801, 64 * 1024 + 1), None));
    let refused = client
        .produce_stream(tokio_stream::iter(requests))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert!(
        refused.message().contains("content type"),
        "{}",
        refused.message()
    );
    // Everything before the failure is written; neither failing point exists.
    for i in 0..40u64 {
        let point = format!("ahead/{i:02}");
        let got = consume(&mut client, window(&point, 0, 0, 0)).await.unwrap();
        assert_eq!(got.concat(), data(700 + i, 900), "{point}");
    }
    for point in ["ahead/bad", "ahead/big"] {
        let status = consume(&mut client, window(point, 0, 0, 0))
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::NotFound, "{point}: {status:?}");
    }
    node.shutdown().await;
}
