//! Serving HTTP on accepted connections with hyper (HTTP/1.1, and HTTP/2 with prior knowledge),
//! under the limits a public port needs (`docs/http.md`, "Many viewers"). The gateway and the
//! metrics endpoint both serve through [`serve`]:
//!
//! - **A cap on connections**, counted from accept, before any TLS handshake
//!   ([`crate::net::Cap`]): a connection over it is answered `503 Service Unavailable` with
//!   `Retry-After` and closed.
//! - **Header and idle timeout** (`http.header_timeout_ms`): a request's head must arrive within
//!   it from when the connection starts waiting for one — a new connection, or one kept alive
//!   after a response; the first byte of a connection has the same deadline ([`Deadlines`]),
//!   since hyper's starts only once it knows the protocol. Slowloris clients and idle
//!   connections are closed.
//! - **Send timeout** (`http.send_timeout_ms`): a client that takes no byte for that long while
//!   a response waits to be written is disconnected ([`Deadlines`]): a stalled player holds no
//!   task and no buffer for ever.
//! - **Bounded buffers**: hyper queues at most `write_buffer` bytes of a response per
//!   connection, and takes the next piece of the body only below it.
//!
//! On shutdown each connection finishes the response it is writing and closes; on abort it is
//! dropped.

use std::convert::Infallible;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{HeaderValue, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::either::Either;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::config::HttpSection;
use crate::metrics;
use crate::net::{Admission, Connection, PeerInfo};
use crate::service::Spawner;

use super::h1;

/// What a connection may take of the node.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// The longest wait for a request's head (the idle timeout of a kept-alive connection too).
    pub header_timeout: Duration,
    /// The longest a response may wait for the client to take a byte.
    pub send_timeout: Duration,
    /// Bytes of a response hyper queues per connection before it waits for the socket.
    pub write_buffer: usize,
}

impl Limits {
    /// The limits `[http]` sets, with `write_buffer` bytes queued per connection.
    pub(crate) fn of(section: &HttpSection, write_buffer: usize) -> Limits {
        Limits {
            header_timeout: Duration::from_millis(section.header_timeout_ms),
            send_timeout: Duration::from_millis(section.send_timeout_ms),
            write_buffer,
        }
    }
}

/// Seconds a client turned away at the cap is asked to wait.
const RETRY_AFTER_S: u64 = 1;

/// Serves `router` on every connection of `connections` until `spawner`'s token is cancelled
/// (then each connection finishes its response and closes) or `abort` is (then they are
/// dropped). Each connection is a task of the subsystem.
pub(crate) fn serve(
    mut connections: ReceiverStream<io::Result<Connection>>,
    router: Router,
    limits: Limits,
    spawner: &Spawner,
    abort: CancellationToken,
) {
    let shutdown = spawner.token().clone();
    let connection_spawner = spawner.clone();
    spawner.spawn("serve", async move {
        loop {
            let connection = tokio::select! {
                () = shutdown.cancelled() => return,
                next = connections.next() => match next {
                    Some(Ok(connection)) => connection,
                    Some(Err(error)) => {
                        tracing::warn!(%error, "HTTP connection failed");
                        continue;
                    }
                    None => return,
                },
            };
            let (router, shutdown, abort) = (router.clone(), shutdown.clone(), abort.clone());
            connection_spawner.spawn("connection", async move {
                tokio::select! {
                    () = one(connection, router, limits, shutdown) => {}
                    () = abort.cancelled() => {}
                }
            });
        }
    });
}

/// Serves one connection until it closes, HTTP/1.1 (or HTTP/2 with prior knowledge: a gRPC
/// client that dialed this port is told where the API is): the router if the connection is
/// within the cap, else one `503` and close. A plaintext connection within the cap is served by
/// [`h1`] (which sends a point's bytes with `sendfile`) until it asks for what only hyper does.
async fn one(connection: Connection, router: Router, limits: Limits, shutdown: CancellationToken) {
    let (io, peer, admission) = connection.into_parts();
    let admitted = !matches!(admission, Admission::OverCap(_));
    // Connections within a cap are the gateway's viewers.
    let counted = matches!(admission, Admission::Admitted(_));
    if counted {
        ::metrics::gauge!(metrics::HTTP_CONNECTIONS).increment(1);
    } else if !admitted {
        ::metrics::counter!(metrics::HTTP_CONNECTIONS_REFUSED).increment(1);
    }
    let served = match io {
        Either::Left(tcp) if admitted => {
            let mut io = Deadlines::new(tcp, limits);
            match h1::serve(&mut io, &peer, &router, limits, &shutdown).await {
                h1::Next::Close => Ok(()),
                h1::Next::HandOff(read) => {
                    let io = h1::handed_off(read, io);
                    with_hyper(io, peer, router, limits, admitted, shutdown).await
                }
            }
        }
        io => {
            let io = Deadlines::new(io, limits);
            with_hyper(io, peer, router, limits, admitted, shutdown).await
        }
    };
    // The admission (the connection's place under the cap) is given back here.
    drop(admission);
    if counted {
        ::metrics::gauge!(metrics::HTTP_CONNECTIONS).decrement(1);
    }
    if let Err(error) = served {
        let timed_out = error
            .downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_timeout);
        if timed_out {
            ::metrics::counter!(metrics::HTTP_TIMEOUTS, "kind" => "header").increment(1);
        }
        tracing::debug!(%error, "HTTP connection ended");
    }
}

/// Serves `io` with hyper until it closes: the router, or `503` to each request of a
/// connection that is not `admitted`.
async fn with_hyper<I>(
    io: I,
    peer: PeerInfo,
    router: Router,
    limits: Limits,
    admitted: bool,
    shutdown: CancellationToken,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let io = TokioIo::new(io);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(limits.write_buffer.max(8192))
        .keep_alive(admitted);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(limits.header_timeout)
        .keep_alive_timeout(limits.header_timeout);
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        let (router, peer) = (router.clone(), peer.clone());
        async move {
            if !admitted {
                return Ok::<_, Infallible>(busy());
            }
            let mut request = request.map(Body::new);
            request.extensions_mut().insert(ConnectInfo(peer));
            router.oneshot(request).await
        }
    });
    let connection = builder.serve_connection(io, service);
    let mut connection = std::pin::pin!(connection);
    tokio::select! {
        served = connection.as_mut() => served,
        () = shutdown.cancelled() => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    }
}

/// The answer to a connection over the cap.
fn busy() -> Response<Body> {
    let mut response = Response::new(Body::from(format!(
        "this node serves as many HTTP connections as it may (http.max_connections): \
         retry in {RETRY_AFTER_S} s\n"
    )));
    *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    let headers = response.headers_mut();
    headers.insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_S));
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// A connection under two deadlines: its first byte must arrive within the header timeout
/// (a connection that sends nothing is closed, whichever protocol it would have spoken: hyper's
/// own header timeout starts only once it knows), and each write may wait for the client at most
/// the send timeout. Past either, the call fails with `TimedOut` and hyper closes the
/// connection. The send clock starts when a write finds the socket full and stops at the next
/// byte taken.
pub(crate) struct Deadlines<T> {
    io: T,
    send_timeout: Duration,
    /// Armed while a write waits; allocated once per connection.
    send: Pin<Box<Sleep>>,
    waiting: bool,
    /// Until the first byte arrives.
    first_byte: Option<Pin<Box<Sleep>>>,
}

impl<T> Deadlines<T> {
    /// The connection underneath.
    pub(crate) fn get_ref(&self) -> &T {
        &self.io
    }

    pub(crate) fn new(io: T, limits: Limits) -> Self {
        Self {
            io,
            send_timeout: limits.send_timeout,
            send: Box::pin(tokio::time::sleep(limits.send_timeout)),
            waiting: false,
            first_byte: Some(Box::pin(tokio::time::sleep(limits.header_timeout))),
        }
    }

    /// What a write that returned `polled` means once the deadline is considered.
    fn check<R>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<R>>,
    ) -> Poll<io::Result<R>> {
        if polled.is_ready() {
            self.waiting = false;
            return polled;
        }
        if !self.waiting {
            self.waiting = true;
            let at = tokio::time::Instant::now() + self.send_timeout;
            self.send.as_mut().reset(at);
        }
        ready!(self.send.as_mut().poll(cx));
        Poll::Ready(Err(send_timed_out(self.send_timeout)))
    }
}

/// The error of a write the client took no byte of for `timeout`, counted in
/// `goutube_http_timeouts_total{kind="send"}`: hyper's writes through [`Deadlines`] and
/// `sendfile`'s (`h1`) end the same way.
pub(crate) fn send_timed_out(timeout: Duration) -> io::Error {
    ::metrics::counter!(metrics::HTTP_TIMEOUTS, "kind" => "send").increment(1);
    io::Error::new(
        io::ErrorKind::TimedOut,
        format!("the client took no byte for {timeout:?}"),
    )
}

impl<T: AsyncRead + Unpin> AsyncRead for Deadlines<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        let Some(first_byte) = self.first_byte.as_mut() else {
            return polled;
        };
        match polled {
            Poll::Ready(Ok(())) if buf.filled().len() > before => {
                self.first_byte = None;
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                ready!(first_byte.as_mut().poll(cx));
                ::metrics::counter!(metrics::HTTP_TIMEOUTS, "kind" => "header").increment(1);
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no request arrived in time",
                )))
            }
            other => other,
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Deadlines<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        self.check(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.check(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.io).poll_flush(cx);
        self.check(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.io).poll_shutdown(cx);
        self.check(cx, polled)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::{Deadlines, Limits};

    const TIMEOUT: Duration = Duration::from_secs(30);

    fn deadlines<T>(io: T) -> Deadlines<T> {
        let limits = Limits {
            header_timeout: TIMEOUT,
            send_timeout: TIMEOUT,
            write_buffer: 16 * 1024,
        };
        Deadlines::new(io, limits)
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_the_client_does_not_take_fails_after_the_timeout_and_not_before() {
        let (near, _far) = tokio::io::duplex(1024);
        let mut near = deadlines(near);
        near.write_all(&[7; 1024]).await.expect("fits the pipe");
        let started = tokio::time::Instant::now();
        let error = near
            .write_all(&[7; 10])
            .await
            .expect_err("nobody reads the far end");
        assert_eq!(error.kind(), std::io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), TIMEOUT);
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_takes_bytes_however_slowly_keeps_its_connection() {
        let (near, mut far) = tokio::io::duplex(1024);
        let mut near = deadlines(near);
        let reader = tokio::spawn(async move {
            let mut taken = 0;
            let mut buf = [0; 256];
            while taken < 4096 {
                tokio::time::sleep(TIMEOUT - Duration::from_secs(1)).await;
                taken += far.read(&mut buf).await.expect("reads");
            }
        });
        let started = tokio::time::Instant::now();
        near.write_all(&[7; 4096])
            .await
            .expect("each wait is shorter than the timeout");
        assert!(started.elapsed() > TIMEOUT * 3, "the writes did wait");
        reader.await.expect("the reader ends");
    }
}
