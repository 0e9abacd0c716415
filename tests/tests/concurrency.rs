//! Concurrent producers, consumers reading while a point grows, and `follow` streams.

use std::time::Duration;

use goutube::proto::ConsumeRequest;
use goutube_tests::{DEADLINE, TestNode, consume, data, produce, window};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn producers_on_different_points_run_in_parallel() {
    let node = TestNode::start(|c| c.storage.fsync = goutube::point::Fsync::Never).await;
    let mut tasks = Vec::new();
    for p in 0..8u64 {
        let mut client = node.client().await;
        tasks.push(tokio::spawn(async move {
            let point = format!("cam-{p}");
            for batch in 0..10u64 {
                let frames: Vec<Vec<u8>> = (0..5)
                    .map(|i| data(p * 1000 + batch * 10 + i, 3000 + i as usize))
                    .collect();
                produce(&mut client, &point, &frames).await.unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let mut client = node.client().await;
    for p in 0..8u64 {
        let want: Vec<u8> = (0..10u64)
            .flat_map(|batch| {
                (0..5).map(move |i| data(p * 1000 + batch * 10 + i, 3000 + i as usize))
            })
            .flatten()
            .collect();
        let got = consume(&mut client, window(&format!("cam-{p}"), 0, 0, 0))
            .await
            .unwrap();
        assert_eq!(got.concat(), want, "cam-{p}");
    }
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn readers_see_a_consistent_prefix_while_the_point_grows() {
    let node = TestNode::start(|c| c.max_chunk_size = 1000).await;
    let frames: Vec<Vec<u8>> = (0..60).map(|i| data(i, 777)).collect();
    let all = frames.concat();
    let mut writer = node.client().await;
    produce(&mut writer, "live", &frames[..1]).await.unwrap();
    let producer = tokio::spawn({
        let frames = frames.clone();
        async move {
            for frame in &frames[1..] {
                produce(&mut writer, "live", std::slice::from_ref(frame))
                    .await
                    .unwrap();
            }
        }
    });
    let mut readers = Vec::new();
    for _ in 0..3 {
        let mut client = node.client().await;
        let all = all.clone();
        readers.push(tokio::spawn(async move {
            let mut reads = 0;
            loop {
                let got = consume(&mut client, window("live", 0, 0, 0))
                    .await
                    .unwrap()
                    .concat();
                assert!(got.len() % 777 == 0, "reads end on append boundaries");
                assert_eq!(
                    got,
                    all[..got.len()],
                    "a read returned bytes that were never written"
                );
                reads += 1;
                if got.len() == all.len() {
                    return reads;
                }
            }
        }));
    }
    producer.await.unwrap();
    for reader in readers {
        assert!(reader.await.unwrap() >= 1);
    }
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn follow_receives_appends_as_they_land() {
    let node = TestNode::start(|_| {}).await;
    let mut writer = node.client().await;
    let frames: Vec<Vec<u8>> = (0..10).map(|i| data(100 + i, 500 + i as usize)).collect();
    produce(&mut writer, "tail", &frames[..1]).await.unwrap();
    let total: u64 = frames.iter().map(|f| f.len() as u64).sum();

    let mut reader = node.client().await;
    let mut stream = reader
        .consume_stream(ConsumeRequest {
            point: "tail".into(),
            offset: 0,
            limit: total,
            chunk_size: 0,
            follow: true,
        })
        .await
        .unwrap()
        .into_inner();
    let mut received = Vec::new();
    for (i, frame) in frames.iter().enumerate() {
        if i > 0 {
            // Each append is sent only after the previous one arrived: the stream is live.
            produce(&mut writer, "tail", std::slice::from_ref(frame))
                .await
                .unwrap();
        }
        while received.len() < frames[..=i].concat().len() {
            let response = tokio::time::timeout(DEADLINE, stream.message())
                .await
                .expect("follow delivered the append in time")
                .unwrap()
                .expect("stream still open");
            assert_eq!(response.offset, received.len() as u64);
            received.extend_from_slice(&response.frame);
        }
    }
    assert_eq!(received, frames.concat());
    // The limit was reached: the stream ends by itself.
    let end = tokio::time::timeout(DEADLINE, stream.message())
        .await
        .unwrap()
        .unwrap();
    assert!(end.is_none());
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn follow_without_limit_ends_when_the_client_cancels_or_the_node_stops() {
    let node = TestNode::start(|_| {}).await;
    let mut writer = node.client().await;
    produce(&mut writer, "tail", &[data(1, 10)]).await.unwrap();
    let mut reader = node.client().await;
    let request = ConsumeRequest {
        point: "tail".into(),
        follow: true,
        ..Default::default()
    };
    let mut first = reader
        .consume_stream(request.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.message().await.unwrap().unwrap().frame.len(), 10);
    drop(first); // Client cancels: the node must not keep the task around (checked by shutdown below).

    let mut second = reader.consume_stream(request).await.unwrap().into_inner();
    assert_eq!(second.message().await.unwrap().unwrap().frame.len(), 10);
    let started = std::time::Instant::now();
    let shutdown = tokio::spawn(node.shutdown());
    let status = tokio::time::timeout(DEADLINE, second.message())
        .await
        .expect("follow stream ended at shutdown")
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable);
    shutdown.await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "follow streams do not hold up shutdown"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writers_to_one_point_never_tear_frames() {
    let node = TestNode::start(|_| {}).await;
    let mut tasks = Vec::new();
    for w in 0..4u64 {
        let mut client = node.client().await;
        tasks.push(tokio::spawn(async move {
            let mut placed = Vec::new();
            for i in 0..25u64 {
                let frame = data(w * 100 + i, 1000 + (w * 25 + i) as usize);
                let record = produce(&mut client, "shared", std::slice::from_ref(&frame))
                    .await
                    .unwrap();
                placed.push((record.records[0].offset, frame));
            }
            placed
        }));
    }
    let mut placed = Vec::new();
    for task in tasks {
        placed.extend(task.await.unwrap());
    }
    let mut client = node.client().await;
    let all = consume(&mut client, window("shared", 0, 0, 0))
        .await
        .unwrap()
        .concat();
    assert_eq!(
        all.len(),
        placed.iter().map(|(_, f)| f.len()).sum::<usize>()
    );
    for (offset, frame) in placed {
        let offset = offset as usize;
        assert_eq!(&all[offset..offset + frame.len()], frame.as_slice());
    }
    node.shutdown().await;
}
