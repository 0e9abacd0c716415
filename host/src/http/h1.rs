//! Plaintext HTTP/1.1 connections, served here rather than by hyper so that a point's bytes go
//! from the page cache to the socket with `sendfile(2)`: the node copies none of them and holds
//! no buffer for a viewer (`docs/http.md`, "The hot path"). TLS (rustls encrypts in the node's
//! memory) and HTTP/2 stay with hyper ([`super::serve`]).
//!
//! Only what that needs is spoken here: requests without a body, one after the other on a
//! kept-alive connection (pipelined ones in order), each answered by the same router as
//! hyper's. A request with a body, an upgrade or an `Expect`, or the HTTP/2 preface hands the
//! connection, with the bytes already read, to hyper ([`Next::HandOff`], [`handed_off`]). Requests are parsed by
//! `httparse`, hyper's own parser. The limits are [`Limits`]': the header timeout for each
//! request's head (the idle timeout between requests), the send timeout for each wait on the
//! client while a response is written.

use std::io;
use std::os::fd::AsRawFd;
use std::time::SystemTime;

use axum::Router;
use axum::body::{Body, HttpBody};
use axum::extract::ConnectInfo;
use axum::http::{
    HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri, Version, header,
};
use bytes::{Buf, Bytes, BytesMut};
use futures::StreamExt;
use http_body_util::BodyExt;
use tokio::io::{
    AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, Chain, Interest, Join, ReadHalf, WriteHalf,
};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use super::gateway::FileBody;
use super::serve::{Deadlines, Limits, send_timed_out};
use crate::metrics;
use crate::net::PeerInfo;

/// The longest request head (request line and headers); a longer one is answered `431`.
const MAX_HEAD: usize = 16 * 1024;

/// The most headers a request may have; more is answered `431`.
const MAX_HEADERS: usize = 64;

/// What an HTTP/2 client with prior knowledge sends first.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// How [`serve`] left the connection.
pub(super) enum Next {
    /// Done: closed by either side, timed out, failed, or shut down.
    Close,
    /// Hyper serves the rest of it, starting with these bytes, read but not answered.
    HandOff(Bytes),
}

/// A connection handed to hyper: `read` (read but not answered) first, then the rest of `io`.
pub(super) fn handed_off<T: AsyncRead + AsyncWrite>(
    read: Bytes,
    io: T,
) -> Join<Chain<std::io::Cursor<Bytes>, ReadHalf<T>>, WriteHalf<T>> {
    let (reader, writer) = tokio::io::split(io);
    let read = AsyncReadExt::chain(std::io::Cursor::new(read), reader);
    tokio::io::join(read, writer)
}

/// Serves requests on `io` until the connection closes or is handed to hyper. At shutdown an
/// idle connection closes at once, and one that is answering closes after the response.
pub(super) async fn serve(
    io: &mut Deadlines<TcpStream>,
    peer: &PeerInfo,
    router: &Router,
    limits: Limits,
    shutdown: &CancellationToken,
) -> Next {
    let mut buf = BytesMut::with_capacity(4096);
    loop {
        let (request, len, keep_alive) = match read_head(io, &mut buf, limits, shutdown).await {
            Head::Request {
                request,
                len,
                keep_alive,
            } => (request, len, keep_alive),
            Head::HandOff => return Next::HandOff(buf.freeze()),
            Head::Bad(status, reason) => {
                let _ = refuse(io, status, reason, limits).await;
                return Next::Close;
            }
            Head::Closed => return Next::Close,
        };
        buf.advance(len);
        let (method, version) = (request.method().clone(), request.version());
        let mut request = *request;
        request.extensions_mut().insert(ConnectInfo(peer.clone()));
        let response = match router.clone().oneshot(request).await {
            Ok(response) => response,
            Err(infallible) => match infallible {},
        };
        match respond(io, &method, version, keep_alive, response, limits).await {
            Ok(true) if !shutdown.is_cancelled() => {}
            Ok(_) => {
                let _ = io.shutdown().await;
                return Next::Close;
            }
            Err(error) => {
                tracing::debug!(%error, "HTTP response ended early");
                return Next::Close;
            }
        }
    }
}

/// What the bytes of a connection hold next.
enum Head {
    /// A request without a body, `len` bytes of head, and whether the client keeps the
    /// connection after it.
    Request {
        request: Box<Request<Body>>,
        len: usize,
        keep_alive: bool,
    },
    /// Something for hyper: a request with a body, an upgrade, HTTP/2.
    HandOff,
    /// A request that is not HTTP/1: answered with this status and reason, then closed.
    Bad(StatusCode, &'static str),
    /// The client closed the connection, sent no head in time, or the node is shutting down.
    Closed,
}

/// Reads until `buf` holds a request head (pipelined requests may already be there), within
/// the header timeout.
async fn read_head(
    io: &mut Deadlines<TcpStream>,
    buf: &mut BytesMut,
    limits: Limits,
    shutdown: &CancellationToken,
) -> Head {
    let deadline = tokio::time::Instant::now() + limits.header_timeout;
    loop {
        if let Some(head) = parse(buf) {
            return head;
        }
        if buf.capacity() - buf.len() < 1024 {
            buf.reserve(4096);
        }
        let read = tokio::select! {
            read = tokio::time::timeout_at(deadline, io.read_buf(buf)) => read,
            () = shutdown.cancelled(), if buf.is_empty() => return Head::Closed,
        };
        match read {
            Ok(Ok(0)) | Ok(Err(_)) => return Head::Closed,
            Ok(Ok(_)) => {}
            Err(_elapsed) => {
                ::metrics::counter!(metrics::HTTP_TIMEOUTS, "kind" => "header").increment(1);
                return Head::Closed;
            }
        }
    }
}

/// The head at the start of `buf`, or `None` if more bytes are needed.
fn parse(buf: &[u8]) -> Option<Head> {
    if buf.len() < PREFACE.len() {
        if !buf.is_empty() && PREFACE.starts_with(buf) {
            return None;
        }
    } else if buf.starts_with(PREFACE) {
        return Some(Head::HandOff);
    }
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut headers);
    let len = match parsed.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => {
            return Some(Head::Bad(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "the request's head is too long",
            ));
        }
        Ok(httparse::Status::Partial) => return None,
        Err(httparse::Error::TooManyHeaders) => {
            return Some(Head::Bad(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "the request has too many headers",
            ));
        }
        Err(_) => return Some(Head::Bad(StatusCode::BAD_REQUEST, "not an HTTP/1 request")),
    };
    let bad = Some(Head::Bad(StatusCode::BAD_REQUEST, "malformed request"));
    let Ok(method) = Method::from_bytes(parsed.method.unwrap_or_default().as_bytes()) else {
        return bad;
    };
    let Ok(uri) = parsed.path.unwrap_or_default().parse::<Uri>() else {
        return bad;
    };
    let version = match parsed.version {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    let mut keep_alive = version == Version::HTTP_11;
    let mut request = Request::new(Body::empty());
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = version;
    for field in parsed.headers.iter() {
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(field.name.as_bytes()),
            HeaderValue::from_bytes(field.value),
        ) else {
            return bad;
        };
        let has_body =
            (name == header::CONTENT_LENGTH && value != "0") || name == header::TRANSFER_ENCODING;
        if has_body || name == header::UPGRADE || name == header::EXPECT {
            return Some(Head::HandOff);
        }
        if name == header::CONNECTION {
            if has_token(&value, "close") {
                keep_alive = false;
            } else if has_token(&value, "keep-alive") {
                keep_alive = true;
            }
        }
        request.headers_mut().append(name, value);
    }
    Some(Head::Request {
        request: Box::new(request),
        len,
        keep_alive,
    })
}

/// Whether a `Connection` header's value lists `token`.
fn has_token(value: &HeaderValue, token: &str) -> bool {
    value
        .as_bytes()
        .split(|&b| b == b',')
        .any(|part| part.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

/// How a response's body is delimited on the wire.
enum Framing {
    /// No body (`HEAD`, `204`, `304`).
    None,
    /// `Content-Length` bytes.
    Length,
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// Until the connection closes (an HTTP/1.0 client, a body of unknown length).
    UntilClose,
}

/// Writes `response` and says whether the connection may carry another request.
async fn respond(
    io: &mut Deadlines<TcpStream>,
    method: &Method,
    version: Version,
    mut keep_alive: bool,
    response: Response<Body>,
    limits: Limits,
) -> io::Result<bool> {
    let (parts, mut body) = response.into_parts();
    if parts
        .headers
        .get(header::CONNECTION)
        .is_some_and(|value| has_token(value, "close"))
    {
        keep_alive = false;
    }
    let status = parts.status;
    let bodiless = method == Method::HEAD
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let mut head = Vec::with_capacity(512);
    head.extend_from_slice(b"HTTP/1.1 ");
    head.extend_from_slice(status.as_str().as_bytes());
    head.push(b' ');
    head.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    head.extend_from_slice(b"\r\n");
    for (name, value) in &parts.headers {
        field(&mut head, name.as_str(), value.as_bytes());
    }
    if !parts.headers.contains_key(header::DATE) {
        field(
            &mut head,
            "date",
            httpdate::fmt_http_date(SystemTime::now()).as_bytes(),
        );
    }
    let framing = if bodiless {
        Framing::None
    } else if parts.headers.contains_key(header::CONTENT_LENGTH) {
        Framing::Length
    } else if let Some(len) = body.size_hint().exact() {
        field(&mut head, "content-length", len.to_string().as_bytes());
        Framing::Length
    } else if version == Version::HTTP_11 {
        field(&mut head, "transfer-encoding", b"chunked");
        Framing::Chunked
    } else {
        keep_alive = false;
        Framing::UntilClose
    };
    if !keep_alive {
        field(&mut head, "connection", b"close");
    } else if version == Version::HTTP_10 {
        field(&mut head, "connection", b"keep-alive");
    }
    head.extend_from_slice(b"\r\n");

    let file = match framing {
        Framing::Length => parts.extensions.get::<FileBody>().cloned(),
        _ => None,
    };
    if let Some(file) = file {
        send_file(io.get_ref(), &head, file, limits).await?;
        return Ok(keep_alive);
    }
    io.write_all(&head).await?;
    if matches!(framing, Framing::None) {
        return Ok(keep_alive);
    }
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(io::Error::other)?;
        let Ok(mut data) = frame.into_data() else {
            continue;
        };
        if !data.has_remaining() {
            continue;
        }
        if matches!(framing, Framing::Chunked) {
            let size = format!("{:x}\r\n", data.len());
            let mut chunk = Buf::chain(Buf::chain(size.as_bytes(), data), &b"\r\n"[..]);
            io.write_all_buf(&mut chunk).await?;
        } else {
            io.write_all_buf(&mut data).await?;
        }
    }
    if matches!(framing, Framing::Chunked) {
        io.write_all(b"0\r\n\r\n").await?;
    }
    Ok(keep_alive)
}

/// Appends `name: value` to a head.
fn field(head: &mut Vec<u8>, name: &str, value: &[u8]) {
    head.extend_from_slice(name.as_bytes());
    head.extend_from_slice(b": ");
    head.extend_from_slice(value);
    head.extend_from_slice(b"\r\n");
}

/// Answers a request that cannot be served; the connection's last.
async fn refuse(
    io: &mut Deadlines<TcpStream>,
    status: StatusCode,
    reason: &str,
    limits: Limits,
) -> io::Result<()> {
    let mut response = Response::new(Body::from(format!("{reason}\n")));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    respond(io, &Method::GET, Version::HTTP_11, false, response, limits).await?;
    io.shutdown().await
}

/// Writes `head`, then `file`'s bytes from the page cache with `sendfile`. A piece not in the
/// page cache is read into it on the blocking pool first, so the async thread never waits for
/// the disk.
async fn send_file(tcp: &TcpStream, head: &[u8], file: FileBody, limits: Limits) -> io::Result<()> {
    let mut written = 0;
    while written < head.len() {
        let rest = &head[written..];
        // More follows at once: the head leaves in the body's first packet.
        written += write_when_ready(tcp, limits, || {
            // SAFETY: `rest` is valid for its length while the call runs.
            let sent = unsafe {
                libc::send(
                    tcp.as_raw_fd(),
                    rest.as_ptr().cast(),
                    rest.len(),
                    libc::MSG_MORE | libc::MSG_NOSIGNAL,
                )
            };
            usize::try_from(sent).map_err(|_| io::Error::last_os_error())
        })
        .await?;
    }
    let pieces = file.pieces();
    let mut pieces = std::pin::pin!(pieces);
    while let Some(piece) = pieces.next().await {
        let mut piece = piece.map_err(io::Error::other)?;
        if !piece.is_cached() {
            piece = tokio::task::spawn_blocking(move || {
                // A filesystem without readahead: `sendfile` reads it, waiting.
                if let Err(error) = piece.load() {
                    tracing::debug!(%error, "readahead failed");
                }
                piece
            })
            .await
            .map_err(io::Error::other)?;
        }
        let end = piece.offset + piece.len;
        let mut offset = piece.offset as libc::off_t;
        while (offset as u64) < end {
            let count = (end - offset as u64) as usize;
            let sent = write_when_ready(tcp, limits, || {
                // SAFETY: both descriptors are open while the call runs (the piece holds its
                // file); `offset` is a valid off_t the call advances.
                let sent = unsafe {
                    libc::sendfile(
                        tcp.as_raw_fd(),
                        piece.file().as_raw_fd(),
                        &mut offset,
                        count,
                    )
                };
                usize::try_from(sent).map_err(|_| io::Error::last_os_error())
            })
            .await?;
            if sent == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the point's data file ends before its published end",
                ));
            }
            ::metrics::counter!(metrics::HTTP_BYTES).increment(sent as u64);
        }
    }
    Ok(())
}

/// Runs `write` (a non-blocking write to `tcp`) once the socket takes bytes, waiting at most
/// the send timeout each time it is full; the bytes written.
async fn write_when_ready(
    tcp: &TcpStream,
    limits: Limits,
    mut write: impl FnMut() -> io::Result<usize>,
) -> io::Result<usize> {
    loop {
        if tokio::time::timeout(limits.send_timeout, tcp.writable())
            .await
            .is_err()
        {
            return Err(send_timed_out(limits.send_timeout));
        }
        match tcp.try_io(Interest::WRITABLE, &mut write) {
            Ok(written) => return Ok(written),
            Err(error)
                if matches!(
                    error.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) => {}
            Err(error) => return Err(error),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Head, parse};

    fn request(bytes: &[u8]) -> (String, bool, usize) {
        match parse(bytes) {
            Some(Head::Request {
                request,
                len,
                keep_alive,
            }) => (request.uri().to_string(), keep_alive, len),
            Some(Head::HandOff) => panic!("handed off"),
            Some(Head::Bad(status, _)) => panic!("refused: {status}"),
            Some(Head::Closed) => panic!("closed"),
            None => panic!("partial"),
        }
    }

    #[test]
    fn a_head_is_parsed_once_whole_and_what_follows_it_is_left() {
        let head = b"GET /v1/points/a?x=1 HTTP/1.1\r\nHost: h\r\n\r\n";
        assert!(parse(&head[..head.len() - 1]).is_none());
        let mut pipelined = head.to_vec();
        pipelined.extend_from_slice(b"GET /v1/points/b HTTP/1.1\r\n");
        assert_eq!(
            request(&pipelined),
            ("/v1/points/a?x=1".to_owned(), true, head.len())
        );
    }

    #[test]
    fn keep_alive_follows_the_version_and_the_connection_header() {
        assert!(!request(b"GET / HTTP/1.1\r\nConnection: Close\r\n\r\n").1);
        assert!(!request(b"GET / HTTP/1.0\r\n\r\n").1);
        assert!(request(b"GET / HTTP/1.0\r\nConnection: foo, keep-alive\r\n\r\n").1);
    }

    #[test]
    fn bodies_upgrades_and_http2_go_to_hyper() {
        for bytes in [
            &b"PUT /x HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc"[..],
            b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"GET /x HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        ] {
            assert!(matches!(parse(bytes), Some(Head::HandOff)), "{bytes:?}");
        }
        assert!(parse(b"PRI * HTTP/2").is_none(), "a preface in part waits");
    }

    #[test]
    fn garbage_and_oversized_heads_are_refused() {
        let status = |bytes: &[u8]| match parse(bytes) {
            Some(Head::Bad(status, _)) => status.as_u16(),
            _ => 0,
        };
        assert_eq!(status(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"), 400);
        let mut long = b"GET / HTTP/1.1\r\nX: ".to_vec();
        long.resize(super::MAX_HEAD + 1, b'a');
        assert_eq!(status(&long), 431);
        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..=super::MAX_HEADERS {
            many.extend_from_slice(format!("X-{i}: 1\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert_eq!(status(&many), 431);
    }
}
