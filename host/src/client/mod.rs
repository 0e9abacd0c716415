//! The Rust client: connect (h2c or mTLS), upload a file, download a point from several workers
//! in parallel ([`download`]), and the small calls (stat, list, delete, members, URLs).
//!
//! Uploads and downloads are verified end to end with CRC32C: `put` checks that the point's
//! checksum after the upload is the checksum before it extended by the file's bytes; `get` checks
//! the downloaded bytes against the checksum the node reported, then renames the `.part` file.
//! Both report progress through [`Progress`]; drawing it is the caller's business.

pub mod download;

pub use download::{GetOptions, GetReport};

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

use crate::api::proto::streaming_client::StreamingClient;
use crate::api::proto::{
    DeletePointRequest, ListMembersRequest, ListMembersResponse, ListPointsRequest,
    MetadataRequest, MetadataResponse, ProduceRequest, Record, SignUrlRequest,
};
use crate::api::{CONNECTION_WINDOW, H2_FRAME, STREAM_WINDOW};
use crate::error::{OWNER_ADDR_METADATA, OWNER_METADATA};

/// Where and how to connect.
#[derive(Debug, Clone, Default)]
pub struct ClientOptions {
    /// `host:port`, or a URL with `http://` / `https://`.
    pub addr: String,
    pub tls: Option<ClientTls>,
}

/// Client-side TLS material (PEM files).
#[derive(Debug, Clone)]
pub struct ClientTls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Name to verify the server certificate against (default: the host of the address).
    pub server_name: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The cause is the `source` (printed by `{:#}` and error reporters).
    #[error("cannot connect to {addr}")]
    Connect {
        addr: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The node answered with an error status: `NotFound: point x not found`.
    #[error("{:?}: {}", .0.code(), .0.message())]
    Status(Status),
    #[error("verification failed: {0}")]
    Verify(String),
    /// A TLS file the client was given cannot be used (which one, and why).
    #[error("client TLS: {0}")]
    Tls(String),
}

// Not `#[from]`: that would also make the status the error's source, and every message would
// print it twice.
impl From<Status> for ClientError {
    fn from(status: Status) -> Self {
        ClientError::Status(status)
    }
}

/// Progress of a transfer, reported to the caller (the CLI draws a bar from it).
pub trait Progress: Send + Sync {
    /// The transfer moves `total` bytes, `done` of which are already there (a resumed download).
    fn start(&self, total: u64, done: u64);
    /// `bytes` more were moved.
    fn advance(&self, bytes: u64);
}

/// Reports nothing.
pub struct Quiet;

impl Progress for Quiet {
    fn start(&self, _: u64, _: u64) {}
    fn advance(&self, _: u64) {}
}

/// Connections to many nodes, one per address, made on first use and reused (a tonic channel
/// multiplexes calls).
pub struct Pool {
    tls: Option<ClientTls>,
    clients: tokio::sync::Mutex<std::collections::HashMap<String, Client>>,
}

impl Pool {
    pub fn new(tls: Option<ClientTls>) -> Self {
        Self {
            tls,
            clients: Default::default(),
        }
    }

    /// The connection to `addr`, connecting (lazily: the first call connects) if there is none.
    pub async fn client(&self, addr: &str) -> Result<Client, ClientError> {
        let mut clients = self.clients.lock().await;
        if let Some(client) = clients.get(addr) {
            return Ok(client.clone());
        }
        let options = ClientOptions {
            addr: addr.to_owned(),
            tls: self.tls.clone(),
        };
        let client = Client {
            streaming: streaming_client(lazy_channel(&options)?),
            options,
        };
        clients.insert(addr.to_owned(), client.clone());
        Ok(client)
    }
}

/// A connection to one node.
#[derive(Clone)]
pub struct Client {
    options: ClientOptions,
    streaming: StreamingClient<Channel>,
}

/// What an upload did.
#[derive(Debug, Clone)]
pub struct PutReport {
    pub record: Record,
    pub bytes: u64,
    /// The owner the upload was redirected to (name, address), when the first node was not it.
    pub redirected: Option<(String, String)>,
    /// The point's checksum after the upload matched the expected one; `false` when other
    /// writers appended to the point at the same time, so there is nothing to compare.
    pub verified: bool,
}

/// Chunk size of uploads and of each worker's reads.
pub const DEFAULT_CHUNK: usize = 256 * 1024;

impl Client {
    pub async fn connect(options: &ClientOptions) -> Result<Self, ClientError> {
        let channel = channel(options).await?;
        Ok(Self {
            options: options.clone(),
            streaming: streaming_client(channel),
        })
    }

    /// The generated client, for calls this type does not wrap.
    pub fn raw(&self) -> StreamingClient<Channel> {
        self.streaming.clone()
    }

    pub async fn stat(&self, point: &str) -> Result<MetadataResponse, ClientError> {
        let request = MetadataRequest {
            point: point.into(),
        };
        Ok(self.raw().get_metadata(request).await?.into_inner())
    }

    /// Every point id with `prefix`, following the pages.
    pub async fn list(&self, prefix: &str) -> Result<Vec<String>, ClientError> {
        let mut points = Vec::new();
        let mut start_after = String::new();
        loop {
            let page = self
                .raw()
                .list_points(ListPointsRequest {
                    prefix: prefix.into(),
                    start_after,
                    max_results: 0,
                })
                .await?
                .into_inner();
            points.extend(page.points);
            if page.next.is_empty() {
                return Ok(points);
            }
            start_after = page.next;
        }
    }

    /// Deletes `point`; returns the size it had.
    pub async fn delete(&self, point: &str) -> Result<u64, ClientError> {
        let request = DeletePointRequest {
            point: point.into(),
        };
        Ok(self.raw().delete_point(request).await?.into_inner().size)
    }

    /// A URL of the node's HTTP gateway that reads `point` (or shows its player page) for
    /// `ttl` on this client's behalf; and when it expires (Unix seconds).
    pub async fn sign_url(
        &self,
        point: &str,
        ttl: Duration,
        player: bool,
    ) -> Result<(String, u64), ClientError> {
        let response = self
            .raw()
            .sign_url(SignUrlRequest {
                point: point.into(),
                ttl_seconds: ttl.as_secs().max(1),
                player,
            })
            .await?
            .into_inner();
        Ok((response.url, response.expires))
    }

    /// The cluster as the node sees it.
    pub async fn members(&self) -> Result<ListMembersResponse, ClientError> {
        Ok(self
            .raw()
            .list_members(ListMembersRequest {})
            .await?
            .into_inner())
    }

    /// Appends the file at `path` to `point` in frames of `chunk` bytes, giving the point
    /// `content_type` if it is new (see [`ProduceRequest::content_type`]). When the node refuses
    /// because another member owns the point, the upload goes to that owner once.
    pub async fn put(
        &self,
        point: &str,
        path: &Path,
        chunk: usize,
        content_type: Option<&str>,
        progress: Arc<dyn Progress>,
    ) -> Result<PutReport, ClientError> {
        match self
            .put_here(point, path, chunk, content_type, progress.clone())
            .await
        {
            Err(ClientError::Status(status)) => {
                let Some((owner, address)) = owner_of(&status) else {
                    return Err(ClientError::Status(status));
                };
                tracing::info!(%owner, %address, "the point belongs to another member; writing there");
                let owner_client = Client::connect(&ClientOptions {
                    addr: address.clone(),
                    tls: self.options.tls.clone(),
                })
                .await?;
                let mut report = owner_client
                    .put_here(point, path, chunk, content_type, progress)
                    .await?;
                report.redirected = Some((owner, address));
                Ok(report)
            }
            other => other,
        }
    }

    async fn put_here(
        &self,
        point: &str,
        path: &Path,
        chunk: usize,
        content_type: Option<&str>,
        progress: Arc<dyn Progress>,
    ) -> Result<PutReport, ClientError> {
        let io_error = |source| ClientError::Io {
            path: path.to_owned(),
            source,
        };
        let before = match self.stat(point).await {
            Ok(meta) => (meta.size, meta.crc32c),
            Err(ClientError::Status(status)) if status.code() == Code::NotFound => (0, 0),
            Err(error) => return Err(error),
        };
        let mut file = tokio::fs::File::open(path).await.map_err(io_error)?;
        let len = file.metadata().await.map_err(io_error)?.len();
        progress.start(len, 0);

        let (tx, rx) = mpsc::channel(4);
        let point_id = point.to_owned();
        // Given with the first frame only.
        let mut content_type = content_type.map(str::to_owned);
        let progress_bar = progress;
        let reader = tokio::spawn(async move {
            let mut crc = 0u32;
            loop {
                let mut frame = BytesMut::with_capacity(chunk);
                while frame.len() < chunk {
                    if file.read_buf(&mut frame).await? == 0 {
                        break;
                    }
                }
                if frame.is_empty() {
                    return Ok::<_, std::io::Error>(crc);
                }
                crc = crc32c::crc32c_append(crc, &frame);
                progress_bar.advance(frame.len() as u64);
                let request = ProduceRequest {
                    point: point_id.clone(),
                    frame: frame.freeze(),
                    content_type: content_type.take().unwrap_or_default(),
                };
                if tx.send(request).await.is_err() {
                    // The call failed; its status says why.
                    return Ok(crc);
                }
            }
        });
        let response = self.raw().produce_stream(ReceiverStream::new(rx)).await;
        let file_crc = reader
            .await
            .map_err(|e| io_error(std::io::Error::other(e)))?
            .map_err(io_error)?;
        let record = response?
            .into_inner()
            .records
            .into_iter()
            .next()
            .unwrap_or_else(|| Record {
                point: point.into(),
                offset: before.0,
                end: before.0,
                crc32c: before.1,
            });
        let verified = record.end == before.0 + len;
        if verified {
            let expected = crc32c::crc32c_combine(before.1, file_crc, len as usize);
            if record.crc32c != expected {
                return Err(ClientError::Verify(format!(
                    "point {point} has CRC32C {:08x} after the upload, expected {expected:08x}",
                    record.crc32c
                )));
            }
        }
        Ok(PutReport {
            record,
            bytes: len,
            redirected: None,
            verified,
        })
    }
}

/// The owner (name, client API address) a `FailedPrecondition` refusal names in its metadata.
pub fn owner_of(status: &Status) -> Option<(String, String)> {
    if status.code() != Code::FailedPrecondition {
        return None;
    }
    let metadata = status.metadata();
    let owner = metadata.get(OWNER_METADATA)?.to_str().ok()?;
    let address = metadata.get(OWNER_ADDR_METADATA)?.to_str().ok()?;
    Some((owner.to_owned(), address.to_owned()))
}

fn streaming_client(channel: Channel) -> StreamingClient<Channel> {
    StreamingClient::new(channel)
        .max_decoding_message_size(64 * 1024 * 1024 + 64 * 1024)
        .max_encoding_message_size(64 * 1024 * 1024 + 64 * 1024)
}

/// A tuned channel to `options.addr`.
pub async fn channel(options: &ClientOptions) -> Result<Channel, ClientError> {
    let connect_error = |source| ClientError::Connect {
        addr: options.addr.clone(),
        source,
    };
    let endpoint = endpoint(options)?;
    match tls_connect(options)? {
        None => endpoint.connect().await,
        Some(connect) => endpoint.connect_with_connector(connect).await,
    }
    .map_err(connect_error)
}

/// A tuned channel to `options.addr` that connects on first use.
pub fn lazy_channel(options: &ClientOptions) -> Result<Channel, ClientError> {
    let endpoint = endpoint(options)?;
    Ok(match tls_connect(options)? {
        None => endpoint.connect_lazy(),
        Some(connect) => endpoint.connect_with_connector_lazy(connect),
    })
}

/// The tuned endpoint of `options.addr` (not connected yet). TLS is the connector's business
/// ([`TlsConnect`]), so the endpoint's URI always says `http`: tonic refuses an `https` URI unless
/// its own TLS connector runs.
fn endpoint(options: &ClientOptions) -> Result<Endpoint, ClientError> {
    let address = options
        .addr
        .strip_prefix("https://")
        .or_else(|| options.addr.strip_prefix("http://"))
        .unwrap_or(&options.addr);
    let url = format!("http://{address}");
    let connect_error = |source| ClientError::Connect {
        addr: options.addr.clone(),
        source,
    };
    Ok(Endpoint::from_shared(url)
        .map_err(connect_error)?
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(H2_FRAME)
        .connect_timeout(Duration::from_secs(10))
        .tcp_nodelay(true))
}

/// The connector of a TLS channel, if `options` ask for TLS.
fn tls_connect(options: &ClientOptions) -> Result<Option<TlsConnect>, ClientError> {
    let Some(tls) = &options.tls else {
        return Ok(None);
    };
    let mut config = crate::tls::client_config(
        ("CA certificate", &tls.ca),
        ("client certificate", &tls.cert),
        ("client key", &tls.key),
    )
    .map_err(|error| {
        // The node's errors name config keys; a client's name the files it was given.
        ClientError::Tls(match error {
            crate::tls::TlsError::File { key, path, message } => {
                format!("{key} {path}: {message}")
            }
            crate::tls::TlsError::Invalid { key, message } => format!("{key}: {message}"),
        })
    })?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Some(TlsConnect {
        connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
        server_name: tls.server_name.clone(),
    }))
}

/// Opens a channel's connections: TCP, then TLS over a read buffer. tonic's own TLS connector
/// lets rustls read the socket 4 KiB at a time; with the buffer (`tls::READ_BUFFER`) a download
/// over mTLS makes one system call where it made up to 64.
#[derive(Clone)]
struct TlsConnect {
    connector: tokio_rustls::TlsConnector,
    /// The name the server's certificate must hold (default: the address's host).
    server_name: Option<String>,
}

type TlsIo = tokio_rustls::client::TlsStream<tokio::io::BufReader<tokio::net::TcpStream>>;

impl tonic::codegen::Service<tonic::codegen::http::Uri> for TlsConnect {
    type Response = hyper_util::rt::TokioIo<TlsIo>;
    type Error = std::io::Error;
    type Future =
        std::pin::Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: tonic::codegen::http::Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let invalid =
                |message: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, message);
            let host = uri
                .host()
                .ok_or_else(|| invalid(format!("{uri} names no host")))?
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned();
            let port = uri.port_u16().unwrap_or(443);
            let name = this.server_name.unwrap_or_else(|| host.clone());
            let name = rustls::pki_types::ServerName::try_from(name)
                .map_err(|e| invalid(format!("server name: {e}")))?;
            let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let buffered = tokio::io::BufReader::with_capacity(crate::tls::READ_BUFFER, tcp);
            let stream = this.connector.connect(name, buffered).await?;
            Ok(hyper_util::rt::TokioIo::new(stream))
        })
    }
}
