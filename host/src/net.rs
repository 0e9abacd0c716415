//! Accepting connections: TCP, TLS when configured, the peer's identity, and a listener's cap.
//!
//! Every listener of a node goes through [`accept`]: one task accepts, and each connection does
//! its TLS handshake in its own task under a deadline, so a slow or hostile peer never holds up the
//! listener. The subject (the common name of the client certificate, or [`ANONYMOUS`] without
//! TLS) is lifted once per connection and travels with every request as [`PeerInfo`]. A listener
//! open to the public (the HTTP gateway) has a [`Cap`]: its place is taken at accept, before the
//! handshake, and each connection says how it was admitted ([`Admission`]).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, BufReader, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::either::Either;
use tonic::transport::server::Connected;

use crate::service::Spawner;

/// The subject of a connection that presented no certificate (plaintext listeners).
pub const ANONYMOUS: &str = "anonymous";

/// The subject of a TLS connection that was allowed in without a client certificate (the HTTP
/// gateway, whose browsers carry signed URLs instead). It is never handed to the authorizer.
pub const NO_CERTIFICATE: &str = "";

/// Whether a TLS listener insists on a client certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientCertificates {
    /// The handshake fails without one (the gRPC API, replication, metrics).
    Required,
    /// Asked for, not required (the HTTP gateway): such a connection's subject is
    /// [`NO_CERTIFICATE`]. The TLS configuration must allow it too.
    Optional,
}

/// At most this many bytes written to a public listener's socket wait in the kernel unsent
/// (`TCP_NOTSENT_LOWAT`) on a TLS connection: bytes in flight are not limited, so throughput is
/// not either, but a viewer who seeks away wastes little of what was encrypted for it.
const PUBLIC_NOTSENT_LOWAT_TLS: libc::c_int = 512 * 1024;

/// The same on a plaintext connection, whose bytes are sent with `sendfile` (`http/h1.rs`): a
/// byte queued unsent costs no copy, so more may wait, and one fast client keeps its connection
/// full with fewer wake-ups (`docs/benchmarks.md`: a whole GET went from 0.81x nginx to 1.00x).
const PUBLIC_NOTSENT_LOWAT_PLAIN: libc::c_int = 4 * 1024 * 1024;

/// Sets `TCP_NOTSENT_LOWAT` on `tcp` (best effort: a kernel without it queues as usual).
fn keep_little_unsent(tcp: &TcpStream, lowat: libc::c_int) {
    use std::os::fd::AsRawFd;
    // SAFETY: a valid socket, and an int option of the size given.
    let set = unsafe {
        libc::setsockopt(
            tcp.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_NOTSENT_LOWAT,
            (&lowat as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if set != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "TCP_NOTSENT_LOWAT not set");
    }
}

/// The TLS read buffer of a listener with a [`Cap`] (the gateway): a record and a request head.
const PUBLIC_READ_BUFFER: usize = 20 * 1024;

/// How long a TLS handshake may take before the connection is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Prefix of the common name of node certificates (`node:<name>`; the default policy lets
/// `node:*` replicate).
pub const NODE_PREFIX: &str = "node:";

/// With TLS, a peer's certificate must name the node it says it is (`node:<name>`, as gossip
/// knows it): a certificate of the CA is not enough to speak for another member.
pub fn check_identity(subject: &str, claimed: &str, tls: bool) -> Result<(), IdentityError> {
    if !tls || subject == format!("{}{claimed}", NODE_PREFIX) {
        return Ok(());
    }
    Err(IdentityError::Certificate {
        subject: crate::text::bounded(subject),
        claimed: crate::text::bounded(claimed),
    })
}

/// A member is not the node it says it is, or not the one dialed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// With TLS, a certificate speaks only for the node it names (`node:<name>`).
    #[error("the certificate of {subject} does not name node {claimed}")]
    Certificate {
        /// The certificate's subject (bounded).
        subject: String,
        /// The node it claimed to be (bounded).
        claimed: String,
    },
    /// The member at an address is another node than the one the view places there.
    #[error("{address} is node {found}, not {expected}")]
    WrongNode {
        /// The address dialed.
        address: String,
        /// The node found there (bounded).
        found: String,
        /// The node expected there.
        expected: String,
    },
}

/// Who is on the other end of a connection.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    /// Its address.
    pub addr: SocketAddr,
    /// Its certificate's subject (or what stands for it without one).
    pub subject: Arc<str>,
}

impl PeerInfo {
    /// The peer of a request served by a node (set by the accept loop).
    pub fn of<T>(request: &tonic::Request<T>) -> PeerInfo {
        request
            .extensions()
            .get::<PeerInfo>()
            .cloned()
            .unwrap_or_else(|| PeerInfo {
                addr: SocketAddr::from(([0, 0, 0, 0], 0)),
                subject: ANONYMOUS.into(),
            })
    }
}

/// The transport of an accepted connection: plaintext, or TLS over a read buffer (see
/// [`crate::tls::READ_BUFFER`]).
pub type Io = Either<TcpStream, TlsStream<BufReader<TcpStream>>>;

/// An accepted connection, plaintext or TLS.
pub struct Connection {
    io: Io,
    info: PeerInfo,
    admission: Admission,
}

impl Connection {
    /// Who is on the other end.
    pub fn peer(&self) -> &PeerInfo {
        &self.info
    }

    /// The stream, who is on the other end, and how it was admitted (hold the admission for as
    /// long as the connection is served: it is the connection's place under the cap).
    pub fn into_parts(self) -> (Io, PeerInfo, Admission) {
        (self.io, self.info, self.admission)
    }
}

/// The most connections a listener serves at once, and the few more it answers that it is
/// busy; past both, a connection is closed at once.
#[derive(Debug, Clone)]
pub struct Cap {
    places: Arc<Semaphore>,
    refusals: Arc<Semaphore>,
}

impl Cap {
    /// `max` connections served at once; up to `max / 8` (at least 64) more told they are over.
    pub fn new(max: usize) -> Cap {
        Cap {
            places: Arc::new(Semaphore::new(max)),
            refusals: Arc::new(Semaphore::new((max / 8).max(64))),
        }
    }

    /// The admission of a new connection, or `None` when even the refusals are all taken.
    fn admit(&self) -> Option<Admission> {
        if let Ok(place) = self.places.clone().try_acquire_owned() {
            return Some(Admission::Admitted(place));
        }
        let refusal = self.refusals.clone().try_acquire_owned().ok()?;
        Some(Admission::OverCap(refusal))
    }
}

/// How a connection was let in.
#[derive(Debug)]
pub enum Admission {
    /// Its listener has no cap.
    Uncapped,
    /// Within the cap; the permit is its place, given back when dropped.
    Admitted(OwnedSemaphorePermit),
    /// Over the cap: it is to be told so (HTTP: `503` with `Retry-After`) and closed.
    OverCap(OwnedSemaphorePermit),
}

impl Connected for Connection {
    type ConnectInfo = PeerInfo;
    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// Accepts connections on `listener` until the subsystem of `spawner` stops, performing the TLS
/// handshake when `tls` is set. Connections that fail their handshake are logged and dropped; the
/// stream only ends at shutdown. The accept loop and the handshakes are tasks of that subsystem.
/// With a `cap`, each connection takes its place before its handshake, and one over the cap
/// and its margin is closed at once (counted in `goutube_connections_dropped_total`).
pub fn accept(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    certificates: ClientCertificates,
    spawner: &Spawner,
    what: &'static str,
    cap: Option<Cap>,
) -> ReceiverStream<io::Result<Connection>> {
    let (tx, rx) = mpsc::channel(64);
    // A public listener's clients send small requests: a large read buffer would only cost
    // memory per viewer.
    let read_buffer = if cap.is_some() {
        PUBLIC_READ_BUFFER
    } else {
        crate::tls::READ_BUFFER
    };
    let shutdown = spawner.token().clone();
    let handshakes = spawner.clone();
    spawner.spawn("accept", async move {
        loop {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => return,
                accepted = listener.accept() => accepted,
            };
            let (tcp, addr) = match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of descriptors and the like: back off instead of spinning.
                    tracing::warn!(listener = what, %error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let admission = match &cap {
                None => Admission::Uncapped,
                Some(cap) => match cap.admit() {
                    Some(admission) => admission,
                    None => {
                        ::metrics::counter!(crate::metrics::CONNECTIONS_DROPPED, "listener" => what)
                            .increment(1);
                        continue;
                    }
                },
            };
            let _ = tcp.set_nodelay(true);
            if cap.is_some() {
                let lowat = match tls {
                    Some(_) => PUBLIC_NOTSENT_LOWAT_TLS,
                    None => PUBLIC_NOTSENT_LOWAT_PLAIN,
                };
                keep_little_unsent(&tcp, lowat);
            }
            let tx = tx.clone();
            let tls = tls.clone();
            handshakes.spawn("handshake", async move {
                let connection = match tls {
                    None => Connection {
                        io: Either::Left(tcp),
                        info: PeerInfo {
                            addr,
                            subject: ANONYMOUS.into(),
                        },
                        admission,
                    },
                    Some(acceptor) => {
                        let refused = |reason: &dyn std::fmt::Display| {
                            tracing::info!(listener = what, %addr, %reason, "TLS handshake refused");
                            ::metrics::counter!(crate::metrics::TLS_HANDSHAKE_FAILURES, "listener" => what)
                                .increment(1);
                        };
                        let buffered = BufReader::with_capacity(read_buffer, tcp);
                        let stream =
                            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(buffered))
                                .await
                            {
                                Ok(Ok(stream)) => stream,
                                Ok(Err(error)) => return refused(&error),
                                Err(_) => return refused(&"timed out"),
                            };
                        let subject = match crate::tls::subject_of(stream.get_ref().1) {
                            Some(subject) => subject,
                            None if certificates == ClientCertificates::Optional => {
                                NO_CERTIFICATE.to_owned()
                            }
                            None => return refused(&"no client certificate"),
                        };
                        if subject == ANONYMOUS {
                            return refused(
                                &"a certificate may not claim the subject \"anonymous\"",
                            );
                        }
                        Connection {
                            io: Either::Right(stream),
                            info: PeerInfo {
                                addr,
                                subject: subject.into(),
                            },
                            admission,
                        }
                    }
                };
                let _ = tx.send(Ok(connection)).await;
            });
        }
    });
    ReceiverStream::new(rx)
}
