//! The Rust client: connect (h2c or mTLS), upload a file, download a point from several workers
//! in parallel ([`download`]), and the small calls (stat, list, delete, members, URLs).
//!
//! Uploads and downloads are verified end to end with CRC32C: `put` checks that the point's
//! checksum after the upload is the checksum before it extended by the file's bytes, and writes
//! every frame at its `expected_offset`, so it resumes after a failure without writing a byte
//! twice; `get` checks
//! the downloaded bytes against the checksum the node reported, then renames the `.part` file.
//! Both report progress through [`Progress`]; drawing it is the caller's business.

pub mod download;

pub use download::{GetOptions, GetReport};

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

use crate::api::proto::streaming_client::StreamingClient;
use crate::api::proto::{
    CleanupMemberRequest, DeletePointRequest, DrainMemberRequest, ForgetMemberRequest,
    ListMembersRequest, ListMembersResponse, ListPointsRequest, MetadataRequest, MetadataResponse,
    ProduceRequest, Record, SignUrlRequest,
};
use crate::api::{CONNECTION_WINDOW, H2_FRAME, STREAM_WINDOW};
use crate::error::{END_METADATA, OWNER_ADDR_METADATA, OWNER_METADATA};

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
    /// Attempts that failed and were resumed from what the node held (checked by CRC32C).
    pub retries: u32,
}

/// How many times `put` resumes an upload after a failure that may pass (the node restarting,
/// a point being moved, a lost connection), and its first pause (doubling, at most 2 s).
const PUT_RETRIES: u32 = 6;
const PUT_FIRST_PAUSE: Duration = Duration::from_millis(100);

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

    /// Starts draining the primary `node` (`docs/resharding.md`): asks the node itself, at the
    /// address the cluster knows it by, with the TLS settings of `options`. Returns its state
    /// in the ring (`leaving`, or `left` when it was drained already).
    pub async fn drain(&self, node: &str, options: &ClientOptions) -> Result<String, ClientError> {
        let member = self.member(node, options).await?;
        let request = DrainMemberRequest {
            node: node.to_owned(),
        };
        Ok(member.raw().drain_member(request).await?.into_inner().state)
    }

    /// Deletes now the copies the primary `node` has handed over to other members; returns
    /// how many and their bytes.
    pub async fn cleanup(
        &self,
        node: &str,
        options: &ClientOptions,
    ) -> Result<(u64, u64), ClientError> {
        let member = self.member(node, options).await?;
        let request = CleanupMemberRequest {
            node: node.to_owned(),
        };
        let cleaned = member.raw().cleanup_member(request).await?.into_inner();
        Ok((cleaned.points, cleaned.bytes))
    }

    /// A client of the primary `node`, found through this client's node, with the TLS
    /// settings of `options`.
    async fn member(&self, node: &str, options: &ClientOptions) -> Result<Client, ClientError> {
        let members = self.members().await?;
        let member = members
            .members
            .iter()
            .find(|member| member.name == node)
            .ok_or_else(|| {
                ClientError::Status(Status::not_found(format!(
                    "{node} is not a member of the cluster {} sees",
                    members.node
                )))
            })?;
        if !member.in_ring {
            return Err(ClientError::Status(Status::failed_precondition(format!(
                "{node} is not in the ring: only primaries are drained or cleaned up"
            ))));
        }
        let options = ClientOptions {
            addr: member.rpc_addr.clone(),
            tls: options.tls.clone(),
        };
        Client::connect(&options).await
    }

    /// Forgets the dead primary `node` (`docs/resharding.md`), asked of this client's node: its
    /// points are taken over from its followers' copies. Returns its state in the ring
    /// (`forgotten`).
    pub async fn forget(&self, node: &str) -> Result<String, ClientError> {
        let request = ForgetMemberRequest {
            node: node.to_owned(),
        };
        Ok(self.raw().forget_member(request).await?.into_inner().state)
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
    /// `content_type` if it is new (see [`ProduceRequest::content_type`]).
    ///
    /// Every frame carries its `expected_offset`, so no byte is ever written twice: after a
    /// failure that may pass, the upload resumes from where the node's copy ends, once the
    /// bytes there are checked (CRC32C) to be this file's; a point another writer appended to
    /// meanwhile fails the upload instead. When the node refuses because another member owns
    /// the point, the upload goes to that owner (once).
    pub async fn put(
        &self,
        point: &str,
        path: &Path,
        chunk: usize,
        content_type: Option<&str>,
        progress: Arc<dyn Progress>,
    ) -> Result<PutReport, ClientError> {
        let upload = Upload {
            point,
            path,
            chunk,
            content_type,
            progress,
        };
        let mut target = self.clone();
        let mut began = None;
        let mut redirected = None;
        let mut retries = 0;
        let mut pause = PUT_FIRST_PAUSE;
        loop {
            let error = match target.upload(&upload, &mut began).await {
                Ok((record, bytes)) => {
                    return Ok(PutReport {
                        record,
                        bytes,
                        redirected,
                        retries,
                    });
                }
                Err(error) => error,
            };
            if let ClientError::Status(status) = &error
                && redirected.is_none()
                && let Some((owner, address)) = owner_of(status)
            {
                tracing::info!(%owner, %address, "the point belongs to another member; writing there");
                target = Client::connect(&ClientOptions {
                    addr: address.clone(),
                    tls: self.options.tls.clone(),
                })
                .await?;
                redirected = Some((owner, address));
                continue;
            }
            if retries == PUT_RETRIES || !may_pass(&error) {
                return Err(error);
            }
            tracing::warn!(%error, "the upload failed; resuming from what the node holds");
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(2));
            retries += 1;
        }
    }

    /// One attempt of `upload` against this node: from where its copy of the point ends, if
    /// that is within the file and holds the file's bytes, to the file's end. `began` is the
    /// point's end and CRC32C when the first attempt began. Returns the point's record after
    /// the upload and the file's length.
    async fn upload(
        &self,
        upload: &Upload<'_>,
        began: &mut Option<Began>,
    ) -> Result<(Record, u64), ClientError> {
        let Upload {
            point,
            path,
            chunk,
            content_type,
            ref progress,
        } = *upload;
        let io_error = |source| ClientError::Io {
            path: path.to_owned(),
            source,
        };
        let here = match self.stat(point).await {
            Ok(meta) => Some((meta.size, meta.crc32c)),
            Err(ClientError::Status(status)) if status.code() == Code::NotFound => None,
            Err(error) => return Err(error),
        };
        let (end, end_crc) = here.unwrap_or((0, 0));
        let began = began.get_or_insert_with(|| Began {
            end,
            crc: end_crc,
            held: here.is_some(),
            on: self.options.addr.clone(),
        });
        let mut file = tokio::fs::File::open(path).await.map_err(io_error)?;
        let len = file.metadata().await.map_err(io_error)?.len();
        // What of the file earlier attempts wrote here: its bytes must be the file's.
        let resumable = match end.checked_sub(began.end) {
            Some(0) => Ok((0, 0)),
            Some(done) if done <= len => {
                let crc = crc_of_prefix(&mut file, done).await.map_err(io_error)?;
                if crc32c::crc32c_combine(began.crc, crc, done as usize) == end_crc {
                    Ok((done, crc))
                } else {
                    Err(format!(
                        "its {done} bytes after {} are not the file's",
                        began.end
                    ))
                }
            }
            _ => Err(format!("it now ends at {end}")),
        };
        let (done, mut crc) = match resumable {
            Ok(resumed) => resumed,
            // The upload began on another node, which did not hold the point (it redirected
            // here): a copy here that is not the start of this upload was here before it.
            Err(_) if !began.held && began.on != self.options.addr && here.is_some() => {
                *began = Began {
                    end,
                    crc: end_crc,
                    held: true,
                    on: self.options.addr.clone(),
                };
                (0, 0)
            }
            Err(what) => {
                return Err(ClientError::Verify(format!(
                    "point {point} changed during the upload: {what}; it had {} bytes when the \
                     upload of {len} bytes began (another writer?)",
                    began.end
                )));
            }
        };
        let (start, start_crc) = (began.end, began.crc);
        file.seek(std::io::SeekFrom::Start(done))
            .await
            .map_err(io_error)?;
        progress.start(len, done);

        let (tx, rx) = mpsc::channel(4);
        let point_id = point.to_owned();
        // Given with the first frame only.
        let mut content_type = content_type.map(str::to_owned);
        let progress = progress.clone();
        let reader = tokio::spawn(async move {
            let mut offset = start + done;
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
                progress.advance(frame.len() as u64);
                let request = ProduceRequest {
                    point: point_id.clone(),
                    expected_offset: Some(offset),
                    content_type: content_type.take().unwrap_or_default(),
                    frame: frame.freeze(),
                };
                offset += request.frame.len() as u64;
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
        // No record when there was nothing left to send.
        let record = response?
            .into_inner()
            .records
            .into_iter()
            .next()
            .unwrap_or_else(|| Record {
                point: point.into(),
                offset: end,
                end,
                crc32c: end_crc,
            });
        let expected = crc32c::crc32c_combine(start_crc, file_crc, len as usize);
        if record.end != start + len || record.crc32c != expected {
            return Err(ClientError::Verify(format!(
                "point {point} has {} bytes with CRC32C {:08x} after the upload, expected {} \
                 with {expected:08x}",
                record.end,
                record.crc32c,
                start + len
            )));
        }
        Ok((record, len))
    }
}

/// Where the point ended (size, CRC32C) when an upload began, whether the node asked then held
/// it at all, and that node's address.
#[derive(Debug, Clone)]
struct Began {
    end: u64,
    crc: u32,
    held: bool,
    on: String,
}

/// What `put` uploads, the same for every attempt.
struct Upload<'a> {
    point: &'a str,
    path: &'a Path,
    chunk: usize,
    content_type: Option<&'a str>,
    progress: Arc<dyn Progress>,
}

/// Whether `put` may resume after `error`: the node or the connection may come back, and a
/// refused `expected_offset` means the point ends elsewhere than this attempt thought (the next
/// attempt checks what is there).
fn may_pass(error: &ClientError) -> bool {
    let ClientError::Status(status) = error else {
        return false;
    };
    match status.code() {
        Code::Unavailable | Code::Unknown | Code::Aborted => true,
        Code::FailedPrecondition => status.metadata().get(END_METADATA).is_some(),
        _ => false,
    }
}

/// CRC32C of the first `len` bytes of `file`, leaving it positioned after them.
async fn crc_of_prefix(file: &mut tokio::fs::File, len: u64) -> std::io::Result<u32> {
    let mut crc = 0;
    let mut left = len;
    let mut buffer = vec![0; 1 << 20];
    while left > 0 {
        let want = buffer.len().min(left as usize);
        let read = file.read(&mut buffer[..want]).await?;
        if read == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        crc = crc32c::crc32c_append(crc, &buffer[..read]);
        left -= read as u64;
    }
    Ok(crc)
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
