//! Many viewers on the HTTP port (issue 28): a cap on connections answered `503` with
//! `Retry-After`, idle and slowloris connections closed by the header timeout, and a client that
//! stops reading disconnected by the send timeout — while the node answers gRPC and keeps
//! serving the viewers it has.

use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use goutube_tests::{
    TestNode, counter, data, eventually_within, http, http_response, metadata, produce,
};

const IDLE: usize = 1000;
const SLOWLORIS: usize = 200;
const HEADER_TIMEOUT: Duration = Duration::from_secs(3);

/// Raises this process's descriptor limit to its hard limit: the test holds both ends of some
/// 2,400 connections (the node runs in this process).
fn enough_descriptors() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and write the one struct given.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        limit.rlim_cur = limit.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
    }
    let needed = 2 * (IDLE + SLOWLORIS) as u64 + 256;
    assert!(
        limit.rlim_cur >= needed,
        "this test needs {needed} descriptors; the hard limit is {}",
        limit.rlim_cur
    );
}

/// `bytes` in frames of 1 MiB.
fn frames(bytes: &[u8]) -> Vec<Vec<u8>> {
    bytes.chunks(1 << 20).map(<[u8]>::to_vec).collect()
}

/// Whether the server closed `stream` (EOF or reset), waiting at most `within`.
async fn closed_by_server(stream: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0; 1024];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            // Bytes (a 408 or the like) before the close.
            Ok(Ok(_)) => continue,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_idle_and_two_hundred_slowloris_connections_are_capped_and_closed_while_the_node_serves()
 {
    enough_descriptors();
    // Room for the flood and two viewers, no more.
    let cap = 2 + IDLE + SLOWLORIS;
    let node = TestNode::start(|config| {
        config.http.max_connections = cap;
        config.http.header_timeout_ms = HEADER_TIMEOUT.as_millis() as u64;
    })
    .await;
    let http_addr = node.node.http_addr();
    let bytes = data(28, 8 << 20);
    let mut client = node.client().await;
    produce(&mut client, "films/long", &frames(&bytes))
        .await
        .expect("produce");

    // A viewer that started before the flood, reading slowly all along.
    let response = http_response(http_addr, "GET", "/v1/points/films/long", &[], None).await;
    assert_eq!(response.status(), 200);
    let mut viewer_body = response.into_body();
    let mut viewed = Vec::new();
    while viewed.len() < 64 * 1024 {
        let frame = viewer_body.frame().await.expect("a frame").expect("bytes");
        viewed.extend_from_slice(frame.data_ref().expect("data"));
    }

    let refused_before = counter("goutube_http_connections_refused_total");
    let flooded = Instant::now();
    let mut idle = Vec::with_capacity(IDLE);
    for _ in 0..IDLE {
        idle.push(TcpStream::connect(http_addr).await.expect("connect"));
    }
    let mut slowloris = Vec::with_capacity(SLOWLORIS);
    for _ in 0..SLOWLORIS {
        let mut stream = TcpStream::connect(http_addr).await.expect("connect");
        stream
            .write_all(b"GET /v1/points/films/long HTTP/1.1\r\nHost: x\r\n")
            .await
            .expect("a first line");
        slowloris.push(stream);
    }
    // The slowloris clients send a header line every 500 ms and never end their heads.
    let dripping = tokio::spawn(async move {
        let mut closed = 0;
        let mut streams: Vec<Option<TcpStream>> = slowloris.into_iter().map(Some).collect();
        let deadline = tokio::time::Instant::now() + HEADER_TIMEOUT * 4;
        while closed < streams.len() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(500)).await;
            for slot in &mut streams {
                let Some(stream) = slot else { continue };
                let mut buf = [0; 256];
                let gone = match stream.try_read(&mut buf) {
                    Ok(0) => true,
                    Ok(_) => false,
                    Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
                        stream.write_all(b"X-Drip: 1\r\n").await.is_err()
                    }
                    Err(_) => true,
                };
                if gone {
                    *slot = None;
                    closed += 1;
                }
            }
        }
        closed
    });

    // A viewer that arrives during the flood takes the last place and is served the point.
    let late = http_response(http_addr, "GET", "/v1/points/films/long", &[], None).await;
    assert_eq!(late.status(), 200);
    let mut late_body = late.into_body();
    let mut late_read = Vec::new();
    while late_read.len() < 512 * 1024 {
        let frame = late_body.frame().await.expect("a frame").expect("bytes");
        late_read.extend_from_slice(frame.data_ref().expect("data"));
    }
    assert_eq!(
        late_read,
        bytes[..late_read.len()],
        "the late viewer reads the point"
    );

    // Over the cap: a clear 503 that says when to come back.
    let busy = http(http_addr, "GET", "/v1/points/films/long", &[], None).await;
    assert_eq!(busy.status, 503, "{busy:?}");
    assert_eq!(busy.header("retry-after"), Some("1"));
    assert!(
        String::from_utf8_lossy(&busy.body).contains("http.max_connections"),
        "{busy:?}"
    );
    assert!(counter("goutube_http_connections_refused_total") > refused_before);

    // gRPC answers all along, and the viewer keeps getting bytes.
    let held = metadata(&mut client, "films/long").await.expect("metadata");
    assert_eq!(held.size, bytes.len() as u64);
    let before = viewed.len();
    while viewed.len() < before + 256 * 1024 {
        let frame = viewer_body.frame().await.expect("a frame").expect("bytes");
        viewed.extend_from_slice(frame.data_ref().expect("data"));
    }
    assert_eq!(
        viewed,
        bytes[..viewed.len()],
        "the viewer reads the point's bytes"
    );

    // The header timeout closes every idle connection and every slowloris one, and not before.
    for stream in &mut idle {
        assert!(
            closed_by_server(stream, HEADER_TIMEOUT * 3).await,
            "an idle connection outlived the header timeout"
        );
    }
    assert!(
        flooded.elapsed() >= HEADER_TIMEOUT,
        "closed after {:?}, before the header timeout",
        flooded.elapsed()
    );
    let closed = dripping.await.expect("the slowloris task");
    assert_eq!(closed, SLOWLORIS, "every slowloris connection is closed");
    assert!(counter("goutube_http_timeouts_total") >= (IDLE + SLOWLORIS) as f64);

    drop(late_body);
    // Places are given back: a new viewer is served again.
    eventually_within(
        "a new viewer is served",
        Duration::from_secs(10),
        || async {
            http(
                http_addr,
                "GET",
                "/v1/points/films/long",
                &[("range", "bytes=0-9")],
                None,
            )
            .await
            .status
                == 206
        },
    )
    .await;
    // The first viewer reads the rest of the point, whole.
    while let Some(frame) = viewer_body.frame().await {
        viewed.extend_from_slice(frame.expect("bytes").data_ref().expect("data"));
    }
    assert_eq!(viewed, bytes);
    node.shutdown().await;
}

#[tokio::test]
async fn a_client_that_stops_reading_is_disconnected_after_the_send_timeout() {
    let send_timeout = Duration::from_secs(2);
    let node = TestNode::start(|config| {
        config.http.send_timeout_ms = send_timeout.as_millis() as u64;
    })
    .await;
    let http_addr = node.node.http_addr();
    let bytes = data(29, 32 << 20);
    produce(&mut node.client().await, "films/big", &frames(&bytes))
        .await
        .expect("produce");

    let timeouts_before = counter("goutube_http_timeouts_total");
    let mut stalled = TcpStream::connect(http_addr).await.expect("connect");
    stalled
        .write_all(b"GET /v1/points/films/big HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("the request");
    let asked = Instant::now();
    // It reads nothing: the socket buffers fill, the node's write waits, then gives up.
    eventually_within(
        "the node gives up on the stalled client",
        send_timeout * 10,
        || async { counter("goutube_http_timeouts_total") > timeouts_before },
    )
    .await;
    assert!(
        asked.elapsed() >= send_timeout,
        "gave up after {:?}, before the send timeout",
        asked.elapsed()
    );
    // What the socket held arrives, then the close; never the whole point.
    let mut received = 0;
    let mut buf = vec![0; 1 << 20];
    loop {
        match tokio::time::timeout(Duration::from_secs(10), stalled.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => break,
            Ok(Ok(n)) => received += n,
            Err(_) => panic!("the connection stayed open after the send timeout"),
        }
    }
    assert!(received < bytes.len(), "received {received} bytes");

    // A client that reads gets the whole point meanwhile and after.
    let whole = http(http_addr, "GET", "/v1/points/films/big", &[], None).await;
    assert_eq!(whole.status, 200);
    assert!(whole.body == bytes, "the point, whole");
    node.shutdown().await;
}
