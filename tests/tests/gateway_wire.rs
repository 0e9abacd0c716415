//! The gateway's HTTP/1.1 on the wire, where the node serves plaintext connections itself and
//! sends a point's bytes with `sendfile` (issue 28): pipelined requests answered in order,
//! HTTP/1.0, requests only hyper answers (a body, HTTP/2) on the same connection, bytes that are
//! not in the page cache, and a point deleted in the middle of a response.

use goutube::proto::DeletePointRequest;
use goutube_tests::{DEADLINE, TestNode, data, http, http_response, produce};
use http_body_util::BodyExt;
use std::path::{Path, PathBuf};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A response read off a raw connection.
struct Answer {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|line| {
            let (field, value) = line.split_once(':')?;
            field.eq_ignore_ascii_case(name).then_some(value.trim())
        })
    }
}

/// Reads one response of known length (or, without one, up to the close) from `stream`, after
/// `pending` bytes already read.
async fn read_answer(stream: &mut TcpStream, pending: &mut Vec<u8>) -> Answer {
    read(stream, pending, false).await
}

/// [`read_answer`], or for a `HEAD` request (`bodiless`): no body whatever the length says.
async fn read(stream: &mut TcpStream, pending: &mut Vec<u8>, bodiless: bool) -> Answer {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let mut buf = vec![0; 64 * 1024];
    let head_end = loop {
        if let Some(at) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        let read = tokio::time::timeout_at(deadline, stream.read(&mut buf))
            .await
            .expect("a response in time")
            .expect("reading a response");
        assert!(read > 0, "closed before a whole head: {pending:?}");
        pending.extend_from_slice(&buf[..read]);
    };
    let head = String::from_utf8(pending[..head_end].to_vec()).expect("a text head");
    pending.drain(..head_end);
    let status = head[9..12].parse().expect("a status");
    let mut answer = Answer {
        status,
        head,
        body: Vec::new(),
    };
    let len = match bodiless {
        true => Some(0),
        false => answer.header("content-length").map(|v| v.parse().unwrap()),
    };
    loop {
        if len.is_some_and(|len| pending.len() >= len) {
            break;
        }
        let read = tokio::time::timeout_at(deadline, stream.read(&mut buf))
            .await
            .expect("a body in time")
            .expect("reading a body");
        if read == 0 {
            assert!(len.is_none(), "closed before the whole body");
            break;
        }
        pending.extend_from_slice(&buf[..read]);
    }
    let len = len.unwrap_or(pending.len());
    answer.body = pending.drain(..len).collect();
    answer
}

/// Whether the server closed `stream`, waiting at most the deadline.
async fn closes(stream: &mut TcpStream) -> bool {
    let mut buf = [0; 1024];
    matches!(
        tokio::time::timeout(DEADLINE, stream.read(&mut buf)).await,
        Ok(Ok(0) | Err(_))
    )
}

/// The data file of `point` in a node's directory.
fn data_file(dir: &Path, point: &str) -> PathBuf {
    fn find(dir: &Path, point: &str) -> Option<PathBuf> {
        for entry in std::fs::read_dir(dir).ok()? {
            let path = entry.ok()?.path();
            if path.is_dir() {
                let file = path.join("point.data");
                if path.file_name().is_some_and(|name| name == point) && file.exists() {
                    return Some(file);
                }
                if let Some(found) = find(&path, point) {
                    return Some(found);
                }
            }
        }
        None
    }
    find(dir, point).expect("the point's data file")
}

async fn node_with(point: &str, bytes: &[u8]) -> TestNode {
    let node = TestNode::start(|_| {}).await;
    let mut client = node.client().await;
    let frames: Vec<Vec<u8>> = bytes.chunks(1 << 20).map(<[u8]>::to_vec).collect();
    produce(&mut client, point, &frames).await.unwrap();
    node
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_answered_in_order_and_http10_closes() {
    let bytes = data(28, 3 * 1024 * 1024 + 17);
    let node = node_with("p", &bytes).await;
    let addr = node.node.http_addr();

    // Three requests in one write: two ranges and a missing point.
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(
            b"GET /v1/points/p HTTP/1.1\r\nHost: x\r\nRange: bytes=1000-2000999\r\n\r\n\
              GET /v1/points/p HTTP/1.1\r\nHost: x\r\nRange: bytes=-5\r\n\r\n\
              GET /v1/points/nothing HTTP/1.1\r\nHost: x\r\n\r\n",
        )
        .await
        .unwrap();
    let mut pending = Vec::new();
    let first = read_answer(&mut stream, &mut pending).await;
    assert_eq!(first.status, 206);
    assert_eq!(first.body, bytes[1000..2_001_000]);
    let second = read_answer(&mut stream, &mut pending).await;
    assert_eq!(second.status, 206);
    assert_eq!(second.body, bytes[bytes.len() - 5..]);
    let third = read_answer(&mut stream, &mut pending).await;
    assert_eq!(third.status, 404);
    assert!(third.header("date").is_some(), "{}", third.head);

    // The connection is still open for a fourth, which asks to close it.
    stream
        .write_all(b"HEAD /v1/points/p HTTP/1.1\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let head = read(&mut stream, &mut pending, true).await;
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-length"), Some("3145745"));
    assert_eq!(head.header("connection"), Some("close"));
    assert!(
        head.body.is_empty() && pending.is_empty(),
        "HEAD has no body"
    );
    assert!(closes(&mut stream).await, "closed after Connection: close");

    // HTTP/1.0 without keep-alive: one answer, then the close.
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /v1/points/p HTTP/1.0\r\nRange: bytes=0-99\r\n\r\n")
        .await
        .unwrap();
    let mut pending = Vec::new();
    let answer = read_answer(&mut stream, &mut pending).await;
    assert_eq!((answer.status, &answer.body[..]), (206, &bytes[..100]));
    assert!(closes(&mut stream).await, "HTTP/1.0 closes");

    // Garbage is answered 400 and closed.
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"\x16\x03\x01\x00\xa5\x01\r\n\r\n")
        .await
        .unwrap();
    let mut pending = Vec::new();
    assert_eq!(read_answer(&mut stream, &mut pending).await.status, 400);
    assert!(closes(&mut stream).await);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_with_a_body_is_answered_and_the_connection_goes_on() {
    let bytes = data(29, 100_000);
    let node = node_with("p", &bytes).await;
    let mut stream = TcpStream::connect(node.node.http_addr()).await.unwrap();
    let mut pending = Vec::new();
    // Served by the node itself, then a request with a body, then another GET on the same
    // connection (served by hyper from then on).
    stream
        .write_all(b"GET /v1/points/p HTTP/1.1\r\nRange: bytes=0-9\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(
        read_answer(&mut stream, &mut pending).await.body,
        bytes[..10]
    );
    stream
        .write_all(
            b"POST /v1/points/p HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello\
              GET /v1/points/p HTTP/1.1\r\nRange: bytes=10-19\r\n\r\n",
        )
        .await
        .unwrap();
    assert_eq!(read_answer(&mut stream, &mut pending).await.status, 405);
    let after = read_answer(&mut stream, &mut pending).await;
    assert_eq!((after.status, &after.body[..]), (206, &bytes[10..20]));
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_that_are_not_in_the_page_cache_are_served_exactly() {
    let bytes = data(30, 24 * 1024 * 1024 + 4097);
    let node = node_with("cold", &bytes).await;
    let file = std::fs::File::open(data_file(node.dir.path(), "cold")).unwrap();
    file.sync_all().unwrap();
    for (range, want) in [
        (None, &bytes[..]),
        (
            Some("bytes=5000001-20000002"),
            &bytes[5_000_001..20_000_003],
        ),
    ] {
        evict(&file, bytes.len());
        let headers: Vec<(&str, &str)> = range.map(|r| ("range", r)).into_iter().collect();
        let answer = http(
            node.node.http_addr(),
            "GET",
            "/v1/points/cold",
            &headers,
            None,
        )
        .await;
        assert_eq!(answer.status, if range.is_some() { 206 } else { 200 });
        assert!(answer.body == want, "{range:?}, exactly");
    }
    node.shutdown().await;
}

/// Drops `file`'s `len` bytes from the page cache, and checks that they are gone (otherwise the
/// test would not exercise reading them in). Asked again until they are, within a deadline: a
/// read-ahead of the answer before may still be bringing pages in when the first advice is taken.
fn evict(file: &std::fs::File, len: usize) {
    let deadline = std::time::Instant::now() + DEADLINE;
    loop {
        let cached = drop_from_page_cache(file, len);
        if cached == 0 {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{cached} of {} pages still in the page cache",
            len.div_ceil(4096)
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// Advises the kernel to drop `file`'s pages; how many of its first `len` bytes' pages are
/// still cached after.
fn drop_from_page_cache(file: &std::fs::File, len: usize) -> usize {
    use std::os::fd::AsRawFd;
    // Dirty pages are not dropped: the node writes without syncing (`fsync = "never"` by
    // default), so they are written back first (141 of 6,146 stayed once without this).
    file.sync_data().expect("fdatasync");
    // SAFETY: advice on an open descriptor.
    let advised = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(advised, 0);
    let page = 4096;
    let pages = len.div_ceil(page);
    let mut resident = vec![0u8; pages];
    // SAFETY: a shared read-only mapping of an open file, unmapped below; mincore writes one
    // byte per page of it into `resident`, which has that many.
    unsafe {
        let map = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        );
        assert_ne!(map, libc::MAP_FAILED);
        assert_eq!(libc::mincore(map, len, resident.as_mut_ptr()), 0);
        libc::munmap(map, len);
    }
    resident.iter().filter(|&&r| r & 1 == 1).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_point_deleted_in_the_middle_of_a_response_ends_it_short() {
    let bytes = data(31, 64 * 1024 * 1024);
    let node = node_with("gone", &bytes).await;
    let response = http_response(node.node.http_addr(), "GET", "/v1/points/gone", &[], None).await;
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let mut received = Vec::new();
    while received.len() < 1024 * 1024 {
        let frame = body.frame().await.unwrap().unwrap();
        received.extend_from_slice(&frame.into_data().unwrap());
    }

    let mut client = node.client().await;
    client
        .delete_point(DeletePointRequest {
            point: "gone".into(),
        })
        .await
        .unwrap();
    // The rest arrives up to where the node noticed, then the connection ends short of the
    // length it announced: a client cannot take it for the whole point.
    let ended = tokio::time::timeout(DEADLINE, async {
        loop {
            match body.frame().await {
                Some(Ok(frame)) => received.extend_from_slice(&frame.into_data().unwrap()),
                Some(Err(_)) => return true,
                None => return false,
            }
        }
    })
    .await
    .expect("the response ends");
    assert!(ended, "the body ends with an error, not as if whole");
    assert!(
        received.len() < bytes.len(),
        "{} of {} bytes",
        received.len(),
        bytes.len()
    );
    assert!(received == bytes[..received.len()], "what arrived is exact");
    let after = http(node.node.http_addr(), "GET", "/v1/points/gone", &[], None).await;
    assert_eq!(after.status, 404);
    node.shutdown().await;
}
