//! A client that leaves in the middle of a range stops the node's reading: players ask for
//! open-ended ranges and then seek, and each abandoned request must not go on reading the rest of
//! the point. Alone in its file: it reads the process-wide count of bytes the gateway sent.

use std::time::Duration;

use goutube_tests::{TestNode, counter, data, http_response, produce};
use http_body_util::BodyExt;

fn bytes_sent() -> f64 {
    counter(goutube::metrics::HTTP_BYTES)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_stops_the_reading() {
    let node = TestNode::start(|_| {}).await;
    let mut client = node.client().await;
    let frames: Vec<Vec<u8>> = (0..64).map(|i| data(i, 1024 * 1024)).collect();
    produce(&mut client, "big", &frames).await.unwrap();
    let size = 64.0 * 1024.0 * 1024.0;

    let response = http_response(
        node.node.http_addr(),
        "GET",
        "/v1/points/big",
        &[("range", "bytes=0-")],
        None,
    )
    .await;
    assert_eq!(response.status(), 206);
    let mut body = response.into_body();
    let mut received = 0;
    while received < 1024 * 1024 {
        let frame = body.frame().await.unwrap().unwrap();
        received += frame.into_data().map_or(0, |d| d.len());
    }
    drop(body);

    // The node stops: what it sent settles far below the point's size (what was read ahead,
    // plus what the socket buffers held).
    let deadline = std::time::Instant::now() + goutube_tests::DEADLINE;
    let mut sent = bytes_sent();
    loop {
        // Settled: nothing more went out for a while.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = bytes_sent();
        if now == sent {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the sending never stopped"
        );
        sent = now;
    }
    assert!(
        sent < size / 4.0,
        "{sent} of {size} bytes sent after the client left"
    );
    node.shutdown().await;
}
