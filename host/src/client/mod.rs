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

mod connect;

use connect::streaming_client;
pub use connect::{Pool, channel, lazy_channel, with_default_port};

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::proto::streaming_client::StreamingClient;
use crate::proto::{
    CleanupMemberRequest, CleanupMemberResponse, DeletePointRequest, DrainMemberRequest,
    ElectLeaderRequest, ElectLeaderResponse, ForgetMemberRequest, ListMembersRequest,
    ListMembersResponse, ListPointsRequest, ListPointsResponse, MetadataRequest, MetadataResponse,
    ProduceRequest, Record, SetVotersRequest, SignUrlRequest, TransferLeadershipRequest,
    TransferLeadershipResponse,
};
use crate::proto::{
    END_METADATA, EXPECTED_METADATA, NOTHING_WRITTEN_METADATA, OWNER_ADDR_METADATA, OWNER_METADATA,
    RETRY_AFTER_METADATA,
};

/// The port of a node's gRPC API when an address names none (`rpc_port`'s default).
pub const DEFAULT_PORT: u16 = 8400;

/// Where and how to connect.
#[derive(Debug, Clone, Default)]
pub struct ClientOptions {
    /// `host:port`, or a URL with `http://` / `https://`; without a port, [`DEFAULT_PORT`].
    pub addr: String,
    /// mTLS material; `None`: plaintext.
    pub tls: Option<ClientTls>,
}

/// Client-side TLS material (PEM files).
#[derive(Debug, Clone)]
pub struct ClientTls {
    /// The CA that signs the nodes' certificates.
    pub ca: PathBuf,
    /// This client's certificate.
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
    /// Name to verify the server certificate against (default: the host of the address).
    pub server_name: Option<String>,
}

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The node could not be reached. The cause is the `source` (printed by `{:#}` and error
    /// reporters).
    #[error("cannot connect to {addr}")]
    Connect {
        /// The address dialed.
        addr: String,
        /// The transport's error.
        #[source]
        source: tonic::transport::Error,
    },
    /// A local file could not be read or written.
    #[error("{path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: std::io::Error,
    },
    /// The node answered with an error status: `NotFound: point x not found`.
    #[error("{:?}: {}", .0.code(), .0.message())]
    Status(Status),
    /// The bytes do not add up (length or CRC32C).
    #[error("verification failed: {0}")]
    Verify(String),
    /// A new point's upload found the point with bytes already (see [`PutMode`]).
    #[error("point {point} already has {size} bytes")]
    Exists {
        /// The point.
        point: String,
        /// Its bytes.
        size: u64,
    },
    /// A download would replace a file (see [`GetOptions::overwrite`]).
    #[error("{} exists already", .0.display())]
    FileExists(PathBuf),
    /// A download was interrupted ([`GetOptions::interrupt`]): `kept` bytes are in `part`,
    /// journaled, for a download with `resume`.
    #[error("interrupted; {kept} bytes are kept in {}", .part.display())]
    Interrupted {
        /// Bytes kept.
        kept: u64,
        /// The `.part` file.
        part: PathBuf,
    },
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

/// A connection to one node.
#[derive(Clone)]
pub struct Client {
    options: ClientOptions,
    streaming: StreamingClient<Channel>,
}

/// What an upload did.
#[derive(Debug, Clone)]
pub struct PutReport {
    /// The point after it.
    pub record: Record,
    /// The file's length.
    pub bytes: u64,
    /// Where the file begins in the point (0 but for [`PutMode::Append`]).
    pub start: u64,
    /// Bytes of the file the point held already ([`PutMode::Resume`]).
    pub resumed: u64,
    /// The owner the upload was redirected to, when the first node was not it.
    pub redirected: Option<Redirect>,
    /// Attempts that failed and were resumed from what the node held (checked by CRC32C).
    pub retries: u32,
}

/// The points of a cluster, as [`Client::list`] found them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Listing {
    /// The points, in order.
    pub points: Vec<String>,
    /// Primaries that are down with no live follower: their points are not listed.
    pub missing: Vec<String>,
}

/// Ids a listing asks each node for at once.
const LIST_PAGE: u32 = 1000;

/// The client addresses to list a cluster's points from: each primary of the ring that owns a
/// range, or, when it is down, one of its live followers; and the primaries no one can answer
/// for.
fn listing_sources(members: &ListMembersResponse) -> (Vec<String>, Vec<String>) {
    let (mut sources, mut missing) = (Vec::new(), Vec::new());
    for primary in members.members.iter().filter(|m| m.in_ring && m.owns_range) {
        let follower = || {
            members
                .members
                .iter()
                .find(|m| m.live && m.leader == primary.name)
        };
        match primary.live {
            true => sources.push(primary.rpc_addr.clone()),
            false => match follower() {
                Some(follower) => sources.push(follower.rpc_addr.clone()),
                None => missing.push(primary.name.clone()),
            },
        }
    }
    (sources, missing)
}

/// Pages of several nodes' listings, each of the node's first `max + 1` ids after the same
/// `start_after`, as one page of the cluster's first `max` ids, each once; `next` is set when
/// more follow. Every id of the cluster's first `max` is among some node's first `max + 1`, and
/// more than `max` ids in all is how more are known to follow. The merge of a balancer's
/// `ListPoints` and of [`Client::list`].
pub fn merged_page(pages: Vec<ListPointsResponse>, max: usize) -> ListPointsResponse {
    let mut points: Vec<String> = pages
        .into_iter()
        .flat_map(|page| page.points)
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .take(max + 1)
        .collect();
    let next = match points.len() > max {
        true => {
            points.truncate(max);
            points.last().cloned().unwrap_or_default()
        }
        false => String::new(),
    };
    ListPointsResponse { points, next }
}

/// How long `put` keeps resuming an upload after failures that may pass (the node restarting,
/// a point being moved, a lost connection, a group electing a new leader) while no attempt
/// moves the point's end forward; and its first pause between attempts (doubling, at most
/// [`PUT_MAX_PAUSE`]), unless the refusal says when to retry.
const PUT_RIDE_THROUGH: Duration = Duration::from_secs(30);
const PUT_FIRST_PAUSE: Duration = Duration::from_millis(100);
const PUT_MAX_PAUSE: Duration = Duration::from_secs(2);
/// Attempts of one upload at most, whatever the time they take.
const PUT_MAX_ATTEMPTS: u32 = 200;

/// Chunk size of uploads and of each worker's reads.
pub const DEFAULT_CHUNK: usize = 256 * 1024;

/// The frames of one upload attempt, read from the file from where the attempt starts.
struct Frames {
    point: String,
    /// Where the next frame goes in the point.
    offset: u64,
    chunk: usize,
    /// Sent with the first frame only.
    content_type: Option<String>,
    /// Whether one empty frame must be sent (an empty file makes an empty point).
    empty_frame: bool,
    /// The CRC32C of the file's bytes up to where this attempt starts.
    crc: u32,
    progress: Arc<dyn Progress>,
}

impl Frames {
    /// Reads `file` to its end as produce requests on `tx`; returns the CRC32C of the file's
    /// bytes (the whole file, with what was there before this attempt).
    async fn send(
        mut self,
        mut file: tokio::fs::File,
        tx: mpsc::Sender<ProduceRequest>,
    ) -> std::io::Result<u32> {
        loop {
            let mut frame = BytesMut::with_capacity(self.chunk);
            while frame.len() < self.chunk {
                if file.read_buf(&mut frame).await? == 0 {
                    break;
                }
            }
            if frame.is_empty() && !std::mem::take(&mut self.empty_frame) {
                return Ok(self.crc);
            }
            self.crc = crc32c::crc32c_append(self.crc, &frame);
            self.progress.advance(frame.len() as u64);
            let request = ProduceRequest {
                point: self.point.clone(),
                expected_offset: Some(self.offset),
                content_type: self.content_type.take().unwrap_or_default(),
                frame: frame.freeze(),
            };
            self.offset += request.frame.len() as u64;
            if tx.send(request).await.is_err() {
                // The call failed; its status says why.
                return Ok(self.crc);
            }
        }
    }
}

impl Client {
    /// Connects to the node at `options.addr` (with mTLS if given).
    pub async fn connect(options: &ClientOptions) -> Result<Self, ClientError> {
        let channel = channel(options).await?;
        Ok(Self {
            options: options.clone(),
            streaming: streaming_client(channel),
        })
    }

    /// A client of the node `options` names that connects on its first call.
    pub fn lazy(options: ClientOptions) -> Result<Self, ClientError> {
        Ok(Self {
            streaming: streaming_client(lazy_channel(&options)?),
            options,
        })
    }

    /// The generated client, for calls this type does not wrap.
    pub fn raw(&self) -> StreamingClient<Channel> {
        self.streaming.clone()
    }

    /// The point's size, checksum, replicas and workers, from the node that holds it.
    pub async fn stat(&self, point: &str) -> Result<MetadataResponse, ClientError> {
        let request = MetadataRequest {
            point: point.into(),
        };
        self.at_holder(|client| {
            let request = request.clone();
            async move { Ok(client.raw().get_metadata(request).await?.into_inner()) }
        })
        .await
    }

    /// Runs `call` against this node and, when it names another member as the point's holder
    /// (a node that does not hold a point refuses with the holder in the status), once more
    /// there.
    async fn at_holder<T, F, Fut>(&self, call: F) -> Result<T, ClientError>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        match call(self.clone()).await {
            Ok(answer) => Ok(answer),
            Err(status) => match owner_of(&status) {
                Some(holder) => {
                    tracing::debug!(holder = %holder.member, address = %holder.rpc_addr, "asking the member that holds the point");
                    Ok(call(self.elsewhere(&holder.rpc_addr).await?).await?)
                }
                None => Err(status.into()),
            },
        }
    }

    /// A client of the node at `address`, with this client's TLS settings.
    async fn elsewhere(&self, address: &str) -> Result<Client, ClientError> {
        Client::connect(&ClientOptions {
            addr: address.to_owned(),
            tls: self.options.tls.clone(),
        })
        .await
    }

    /// Every point id with `prefix` in the cluster: every primary's (a primary that is down:
    /// one of its followers'), merged page by page, each id once. Primaries whose points nobody
    /// live holds are named in [`Listing::missing`].
    pub async fn list(&self, prefix: &str) -> Result<Listing, ClientError> {
        let members = self.members().await?;
        let me = members.members.iter().find(|m| m.name == members.node);
        let (sources, missing) = match me {
            // A balancer merges the primaries' listings itself.
            Some(me) if me.role == "balancer" => (vec![self.clone()], Vec::new()),
            _ => {
                let (addresses, missing) = listing_sources(&members);
                let mut sources = Vec::with_capacity(addresses.len());
                for address in addresses {
                    sources.push(self.elsewhere(&address).await?);
                }
                (sources, missing)
            }
        };
        let mut points = Vec::new();
        let mut start_after = String::new();
        loop {
            let mut pages = Vec::with_capacity(sources.len());
            for source in &sources {
                pages.push(
                    source
                        .list_page(prefix, &start_after, LIST_PAGE + 1)
                        .await?,
                );
            }
            let page = merged_page(pages, LIST_PAGE as usize);
            points.extend(page.points);
            if page.next.is_empty() {
                return Ok(Listing { points, missing });
            }
            start_after = page.next;
        }
    }

    /// One page of this node's point ids with `prefix`, after `start_after`.
    pub async fn list_page(
        &self,
        prefix: &str,
        start_after: &str,
        max: u32,
    ) -> Result<ListPointsResponse, ClientError> {
        let request = ListPointsRequest {
            prefix: prefix.into(),
            start_after: start_after.into(),
            max_results: max,
        };
        Ok(self.raw().list_points(request).await?.into_inner())
    }

    /// Deletes `point` at the node that holds it; returns the size it had.
    pub async fn delete(&self, point: &str) -> Result<u64, ClientError> {
        let request = DeletePointRequest {
            point: point.into(),
        };
        self.at_holder(|client| {
            let request = request.clone();
            async move { Ok(client.raw().delete_point(request).await?.into_inner().size) }
        })
        .await
    }

    /// A URL of the node's HTTP gateway that reads `point` (or shows its player page) for
    /// `ttl` on this client's behalf; and when it expires (Unix seconds).
    pub async fn sign_url(
        &self,
        point: &str,
        ttl: Duration,
        player: bool,
    ) -> Result<(String, u64), ClientError> {
        self.signed(SignUrlRequest {
            point: point.into(),
            ttl_seconds: ttl.as_secs().max(1),
            player,
            pages: false,
        })
        .await
    }

    /// A URL of the node's pages (points, cluster) for `ttl` on this client's behalf; and when
    /// it expires (Unix seconds).
    pub async fn sign_pages_url(&self, ttl: Duration) -> Result<(String, u64), ClientError> {
        self.signed(SignUrlRequest {
            ttl_seconds: ttl.as_secs().max(1),
            pages: true,
            ..SignUrlRequest::default()
        })
        .await
    }

    async fn signed(&self, request: SignUrlRequest) -> Result<(String, u64), ClientError> {
        let response = self.raw().sign_url(request).await?.into_inner();
        Ok((response.url, response.expires))
    }

    /// Starts draining the primary `node` (`docs/resharding.md`): asks the node itself, at the
    /// address the cluster knows it by, with the TLS settings of `options`. Returns its state
    /// in the ring (`leaving`, or `left` when it was drained already).
    pub async fn drain(&self, node: &str, options: &ClientOptions) -> Result<String, ClientError> {
        let member = self.member(node, options, Needs::Primary).await?;
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
    ) -> Result<CleanupMemberResponse, ClientError> {
        let member = self.member(node, options, Needs::Primary).await?;
        let request = CleanupMemberRequest {
            node: node.to_owned(),
        };
        Ok(member.raw().cleanup_member(request).await?.into_inner())
    }

    /// Hands every replica group the member `node` leads to a member of its in-sync set (`to`,
    /// else the one least behind), asking `node` itself (`docs/failover.md`). Returns what it
    /// handed.
    pub async fn transfer(
        &self,
        node: &str,
        to: Option<&str>,
        options: &ClientOptions,
    ) -> Result<TransferLeadershipResponse, ClientError> {
        let member = self.member(node, options, Needs::AnyMember).await?;
        let request = TransferLeadershipRequest {
            node: node.to_owned(),
            to: to.unwrap_or_default().to_owned(),
        };
        Ok(member
            .raw()
            .transfer_leadership(request)
            .await?
            .into_inner())
    }

    /// A client of the member `node`, found through this client's node, with the TLS
    /// settings of `options`.
    async fn member(
        &self,
        node: &str,
        options: &ClientOptions,
        needs: Needs,
    ) -> Result<Client, ClientError> {
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
        if matches!(needs, Needs::Primary) && !member.in_ring {
            return Err(ClientError::Status(Status::failed_precondition(format!(
                "{node} is not in the ring: only primaries are drained or cleaned up"
            ))));
        }
        if member.rpc_addr.is_empty() {
            return Err(ClientError::Status(Status::unavailable(format!(
                "{node} is not live: {} knows no address of it",
                members.node
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

    /// Names `to`, a follower of `slot`'s group, its leader outside the in-sync set
    /// (`docs/failover.md`), asked of this client's node: for a group whose leader is lost
    /// with no in-sync member live. Acknowledged writes only the lost members held are lost.
    pub async fn elect_unclean(
        &self,
        slot: &str,
        to: &str,
    ) -> Result<ElectLeaderResponse, ClientError> {
        let request = ElectLeaderRequest {
            slot: slot.to_owned(),
            to: to.to_owned(),
            unclean: true,
        };
        Ok(self.raw().elect_leader(request).await?.into_inner())
    }

    /// Makes `voters` the controller's voters (`docs/controller.md`), asked of this client's
    /// node. Returns the voters then.
    pub async fn set_voters(&self, voters: &[String]) -> Result<Vec<String>, ClientError> {
        let request = SetVotersRequest {
            voters: voters.to_vec(),
        };
        Ok(self.raw().set_voters(request).await?.into_inner().voters)
    }

    /// The cluster as the node sees it.
    pub async fn members(&self) -> Result<ListMembersResponse, ClientError> {
        Ok(self
            .raw()
            .list_members(ListMembersRequest {})
            .await?
            .into_inner())
    }

    /// Uploads the file at `path` to `point` (see [`PutMode`] for what happens to a point that
    /// has bytes already) in frames of `options.chunk` bytes, giving a new point
    /// `options.content_type` (see [`ProduceRequest::content_type`]).
    ///
    /// Every frame carries its `expected_offset`, so no byte is ever written twice: after a
    /// failure that may pass, the upload resumes from where the node's copy ends, once the
    /// bytes there are checked (CRC32C) to be this file's; a point another writer appended to
    /// meanwhile fails the upload instead. When the node refuses because another member takes
    /// the point's writes (its owner, its group's leader), the upload goes to that member. A
    /// node that failed is replaced by the one given first, or by another live member (a
    /// leader lost mid-upload: `docs/failover.md`, "Clients riding through"). It gives up after
    /// 30 s in which no attempt moved the point's end forward. At the end the point's checksum
    /// is checked: for a new or resumed point, it is the file's.
    ///
    /// A new point's upload needs only the right to `produce`; resuming and appending read the
    /// point's metadata first.
    pub async fn put(
        &self,
        point: &str,
        path: &Path,
        options: &PutOptions,
        progress: Arc<dyn Progress>,
    ) -> Result<PutReport, ClientError> {
        let upload = Upload {
            point,
            path,
            options,
            progress,
        };
        // Other members to ask who takes the writes when the node asked first is lost too,
        // learned while the upload starts (a caller without the right to list members only
        // has this node).
        let learning = tokio::spawn({
            let client = self.clone();
            async move { client.members().await }
        });
        let mut askers = Askers::new(self.clone(), learning);
        let mut target = self.clone();
        let mut began = None;
        let mut reached = 0;
        let mut redirected = None;
        // Refusals naming another writer followed since the upload last moved forward.
        let mut redirects = 0;
        let mut retries = 0;
        let mut pause = PUT_FIRST_PAUSE;
        // Whether an attempt may have written bytes: from then on `began` is the point's.
        let mut wrote = false;
        let mut riding = Instant::now() + PUT_RIDE_THROUGH;
        loop {
            let before = reached;
            let error = match target.upload(&upload, &mut began, &mut reached).await {
                Ok(done) => {
                    let began = began.expect("an upload that ran began");
                    return Ok(PutReport {
                        record: done.record,
                        bytes: done.bytes,
                        start: began.end,
                        resumed: done.resumed,
                        redirected,
                        retries,
                    });
                }
                Err(error) => error,
            };
            if reached > before {
                riding = Instant::now() + PUT_RIDE_THROUGH;
                redirects = 0;
            }
            let attempts_left = retries + 1 < PUT_MAX_ATTEMPTS && Instant::now() < riding;
            if let ClientError::Status(status) = &error
                && let Some(owner) = owner_of(status)
                && attempts_left
            {
                tracing::info!(owner = %owner.member, address = %owner.rpc_addr, "the point is written elsewhere; writing there");
                // A refusal wrote nothing: until an attempt may have, the upload begins
                // wherever the point ends on the member that takes it.
                if !wrote {
                    began = None;
                }
                if redirected.is_some() {
                    retries += 1;
                }
                tokio::time::sleep(redirect_pause(redirects)).await;
                redirects += 1;
                redirected = Some(owner.clone());
                match self.elsewhere(&owner.rpc_addr).await {
                    Ok(owner) => {
                        target = owner;
                        continue;
                    }
                    Err(error) => tracing::warn!(%error, "the member named cannot be reached"),
                }
            } else {
                if let ClientError::Status(status) = &error
                    && options.mode == PutMode::New
                    && retries == 0
                    && let Some(size) = existing_size(status)
                {
                    return Err(ClientError::Exists {
                        point: point.to_owned(),
                        size,
                    });
                }
                if !attempts_left || !may_pass(&error) {
                    return Err(error);
                }
                wrote |= began.is_some();
                tracing::warn!(%error, "the upload failed; resuming from what the node holds");
            }
            let wait = match &error {
                ClientError::Status(status) => retry_after(status),
                _ => None,
            };
            tokio::time::sleep(wait.unwrap_or(pause)).await;
            pause = (pause * 2).min(PUT_MAX_PAUSE);
            retries += 1;
            // The node that failed may be gone: ask the first node again who takes the point's
            // writes, or, if that one failed, another member.
            (redirected, target) = askers.next(&target).await;
        }
    }

    /// The point's stored end and CRC32C on this node (where the next write goes, committed or
    /// not); `None` if it does not hold it.
    async fn held(&self, point: &str) -> Result<Option<(u64, u32)>, ClientError> {
        let request = MetadataRequest {
            point: point.into(),
        };
        match self.raw().get_metadata(request).await {
            Ok(meta) => {
                let meta = meta.into_inner();
                Ok(Some(match (meta.stored_size, meta.stored_crc32c) {
                    (Some(size), Some(crc)) => (size, crc),
                    // A node of an earlier release serves everything it stores.
                    _ => (meta.size, meta.crc32c),
                }))
            }
            Err(status) if status.code() == Code::NotFound => Ok(None),
            Err(status) => Err(status.into()),
        }
    }

    /// One attempt of `upload` against this node: from where its copy of the point ends, if
    /// that is within the file and holds the file's bytes, to the file's end. `began` is where
    /// the file begins in the point, and the point's CRC32C up to there, once known (for a new
    /// or resumed point: 0). Returns the point's record after the upload.
    async fn upload(
        &self,
        upload: &Upload<'_>,
        began: &mut Option<Began>,
        reached: &mut u64,
    ) -> Result<Uploaded, ClientError> {
        let Upload {
            point,
            path,
            options,
            ref progress,
        } = *upload;
        let io_error = |source| ClientError::Io {
            path: path.to_owned(),
            source,
        };
        // A new point's first attempt asks nothing: the node refuses its first frame if the
        // point has bytes (and a subject that may only produce can upload).
        let here = match (options.mode, &began) {
            (PutMode::New, None) => None,
            _ => self.held(point).await?,
        };
        let (end, end_crc) = here.unwrap_or((0, 0));
        *reached = (*reached).max(end);
        let began = *began.get_or_insert(match options.mode {
            PutMode::Append => Began { end, crc: end_crc },
            PutMode::New | PutMode::Resume => Began { end: 0, crc: 0 },
        });
        let mut file = tokio::fs::File::open(path).await.map_err(io_error)?;
        let len = file.metadata().await.map_err(io_error)?.len();
        // What of the file is there already (written by an earlier attempt, or by the upload
        // being resumed): its bytes must be the file's.
        let (done, crc) = match end.checked_sub(began.end) {
            Some(0) => (0, 0),
            Some(done) if done <= len => {
                let crc = crc_of_prefix(&mut file, done).await.map_err(io_error)?;
                if crc32c::crc32c_combine(began.crc, crc, done as usize) != end_crc {
                    return Err(self.not_this_file(upload, began, end, len));
                }
                (done, crc)
            }
            _ => return Err(self.not_this_file(upload, began, end, len)),
        };
        file.seek(std::io::SeekFrom::Start(done))
            .await
            .map_err(io_error)?;
        progress.start(len, done);

        let (tx, rx) = mpsc::channel(4);
        let frames = Frames {
            point: point.to_owned(),
            offset: began.end + done,
            chunk: options.chunk,
            // Given with the first frame only.
            content_type: options.content_type.clone(),
            // An empty file makes an empty point: one empty frame creates it.
            empty_frame: options.mode == PutMode::New && len == 0,
            crc,
            progress: progress.clone(),
        };
        let reader = tokio::spawn(frames.send(file, tx));
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
        let expected = crc32c::crc32c_combine(began.crc, file_crc, len as usize);
        if record.end != began.end + len || record.crc32c != expected {
            return Err(ClientError::Verify(format!(
                "point {point} has {} bytes with CRC32C {:08x} after the upload, expected {} \
                 with {expected:08x}",
                record.end,
                record.crc32c,
                began.end + len
            )));
        }
        Ok(Uploaded {
            record,
            bytes: len,
            resumed: match options.mode {
                PutMode::Resume => done,
                _ => 0,
            },
        })
    }

    /// Why the bytes this node holds of the point (`end` of them) cannot be continued with the
    /// file (`len` bytes) from `began`.
    fn not_this_file(&self, upload: &Upload<'_>, began: Began, end: u64, len: u64) -> ClientError {
        let (point, path) = (upload.point, upload.path.display());
        ClientError::Verify(match upload.options.mode {
            PutMode::Resume if end > len => format!(
                "point {point} has {end} bytes, more than {path} ({len}): it is not an upload of \
                 this file to resume"
            ),
            PutMode::Resume => format!(
                "the {end} bytes of point {point} are not the start of {path}: it is not an \
                 upload of this file to resume"
            ),
            _ => format!(
                "point {point} changed during the upload: it now ends at {end}, not with this \
                 file's bytes after {} (another writer?)",
                began.end
            ),
        })
    }
}

/// The nodes an upload asks who takes its writes after an attempt failed: the node it was
/// given first, and, after one of them failed itself, the next in turn of the members it
/// learned.
struct Askers {
    /// The node given first, then every other live member learned (with its name).
    nodes: Vec<(Option<Redirect>, Client)>,
    learning: Option<JoinHandle<Result<ListMembersResponse, ClientError>>>,
    /// The one asked last.
    current: usize,
}

impl Askers {
    fn new(entry: Client, learning: JoinHandle<Result<ListMembersResponse, ClientError>>) -> Self {
        Askers {
            nodes: vec![(None, entry)],
            learning: Some(learning),
            current: 0,
        }
    }

    /// Whom to ask after an attempt on `failed` failed: the node asked last, unless that is
    /// the one that failed (rather than the member it sent the upload to); and that member,
    /// unless it is the node given first.
    async fn next(&mut self, failed: &Client) -> (Option<Redirect>, Client) {
        if failed.options.addr != self.nodes[self.current].1.options.addr {
            return self.nodes[self.current].clone();
        }
        if let Some(learning) = self.learning.take() {
            self.learn(learning).await;
        }
        self.current = (self.current + 1) % self.nodes.len();
        self.nodes[self.current].clone()
    }

    async fn learn(&mut self, learning: JoinHandle<Result<ListMembersResponse, ClientError>>) {
        let members = match learning.await {
            Ok(Ok(members)) => members,
            Ok(Err(error)) => {
                tracing::debug!(%error, "the members could not be listed: only the first node is asked");
                return;
            }
            Err(error) => {
                tracing::debug!(%error, "listing the members failed");
                return;
            }
        };
        let entry = self.nodes[0].1.clone();
        for member in members.members.into_iter().filter(|m| m.live) {
            if member.rpc_addr.is_empty() || member.rpc_addr == entry.options.addr {
                continue;
            }
            let options = ClientOptions {
                addr: member.rpc_addr.clone(),
                tls: entry.options.tls.clone(),
            };
            let named = Redirect {
                member: member.name,
                rpc_addr: member.rpc_addr,
            };
            // Connected when first asked.
            match Client::lazy(options) {
                Ok(client) => self.nodes.push((Some(named), client)),
                Err(error) => tracing::debug!(%error, "a member cannot be asked"),
            }
        }
    }
}

/// What [`Client::put`] does with a point that has bytes already.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum PutMode {
    /// The file becomes the point: a point that has bytes already is refused
    /// ([`ClientError::Exists`]), a missing or empty one is written.
    #[default]
    New,
    /// The point holds the start of the file (an upload that was interrupted): checked by
    /// CRC32C, then the rest is sent.
    Resume,
    /// The file is added after whatever the point holds.
    Append,
}

/// How [`Client::put`] uploads.
#[derive(Debug, Clone)]
pub struct PutOptions {
    /// Bytes per frame.
    pub chunk: usize,
    /// Media type of a new point.
    pub content_type: Option<String>,
    /// New, resumed or appended.
    pub mode: PutMode,
}

impl Default for PutOptions {
    fn default() -> Self {
        Self {
            chunk: DEFAULT_CHUNK,
            content_type: None,
            mode: PutMode::New,
        }
    }
}

/// What one successful attempt of an upload did.
struct Uploaded {
    record: Record,
    bytes: u64,
    resumed: u64,
}

/// Where the file begins in the point, and the point's CRC32C up to there.
#[derive(Debug, Clone, Copy)]
struct Began {
    end: u64,
    crc: u32,
}

/// What `put` uploads, the same for every attempt.
struct Upload<'a> {
    point: &'a str,
    path: &'a Path,
    options: &'a PutOptions,
    progress: Arc<dyn Progress>,
}

/// The size of the point a refused first frame at offset 0 found: the point has bytes already.
fn existing_size(status: &Status) -> Option<u64> {
    let number = |key| metadata_number(status, key);
    match (number(EXPECTED_METADATA), number(END_METADATA)) {
        (Some(0), Some(end)) if end > 0 => Some(end),
        _ => None,
    }
}

/// Whether `put` may resume after `error`: the node or the connection may come back, and a
/// refused `expected_offset` means the point ends elsewhere than this attempt thought (the next
/// attempt checks what is there).
fn may_pass(error: &ClientError) -> bool {
    let status = match error {
        ClientError::Status(status) => status,
        ClientError::Connect { .. } => return true,
        _ => return false,
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

/// The member a refusal sends the caller to: the point's owner (or holder, or the leader of
/// the node asked), as a `FailedPrecondition` status names it in its metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redirect {
    /// Its node name.
    pub member: String,
    /// Its client API address.
    pub rpc_addr: String,
}

/// How long an `Unavailable` refusal asks the caller to wait before retrying (a group electing
/// a new leader, a leader without a session), if it says.
pub fn retry_after(status: &Status) -> Option<Duration> {
    metadata_number(status, RETRY_AFTER_METADATA).map(Duration::from_millis)
}

/// Whether a refusal says the call wrote nothing, so that it may be sent again as it is
/// (`NOTHING_WRITTEN_METADATA`).
pub fn nothing_written(status: &Status) -> bool {
    status.metadata().get(NOTHING_WRITTEN_METADATA).is_some()
}

/// Where the point ends, as a refused `expected_offset` says.
pub fn end_of(status: &Status) -> Option<u64> {
    metadata_number(status, END_METADATA)
}

/// The number a status carries in its metadata under `key`, if any.
fn metadata_number(status: &Status, key: &str) -> Option<u64> {
    status.metadata().get(key)?.to_str().ok()?.parse().ok()
}

/// The pause before following the refusal naming another writer that comes `n`th (from 0)
/// in one write: none for the first; then 10 ms, doubled each time, at most a second. Members
/// whose views of who writes differ for a moment (a new leader that has not learned it leads
/// yet) send a write back and forth until the slower one catches up, in milliseconds; the
/// doubling keeps a real loop from being a busy one.
pub fn redirect_pause(n: u32) -> Duration {
    const FIRST: Duration = Duration::from_millis(10);
    match n {
        0 => Duration::ZERO,
        n => FIRST
            .saturating_mul(1 << (n - 1).min(7))
            .min(Duration::from_secs(1)),
    }
}

/// The member a `FailedPrecondition` refusal names in its metadata, if any.
pub fn owner_of(status: &Status) -> Option<Redirect> {
    if status.code() != Code::FailedPrecondition {
        return None;
    }
    let metadata = status.metadata();
    let owner = metadata.get(OWNER_METADATA)?.to_str().ok()?;
    let address = metadata.get(OWNER_ADDR_METADATA)?.to_str().ok()?;
    Some(Redirect {
        member: owner.to_owned(),
        rpc_addr: address.to_owned(),
    })
}

/// Which members an operator's call about a member may be asked of.
#[derive(Debug, Clone, Copy)]
enum Needs {
    /// A primary in the ring (drain, cleanup).
    Primary,
    /// Any live member (a transfer: a follower may lead a group after a failover).
    AnyMember,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(points: &[&str], next: &str) -> ListPointsResponse {
        ListPointsResponse {
            points: points.iter().map(|p| p.to_string()).collect(),
            next: next.into(),
        }
    }

    #[test]
    fn pages_of_several_nodes_merge_without_skipping_or_repeating_an_id() {
        // Pages of up to max + 1 = 3 ids: everything, once.
        let merged = merged_page(vec![page(&["a", "c"], ""), page(&["b", "c"], "")], 2);
        assert_eq!(merged, page(&["a", "b"], "b"));
        let merged = merged_page(vec![page(&["a", "c"], ""), page(&["c"], "")], 2);
        assert_eq!(merged, page(&["a", "c"], ""));
        // A node with more than fits: the first two of all, then from "b".
        let merged = merged_page(vec![page(&["a", "b", "d"], "d"), page(&["c"], "")], 2);
        assert_eq!(merged, page(&["a", "b"], "b"));
    }

    #[test]
    fn an_address_without_a_port_gets_the_api_port() {
        for (given, meant) in [
            ("localhost", "localhost:8400"),
            ("localhost:9000", "localhost:9000"),
            ("node-1.example", "node-1.example:8400"),
            ("127.0.0.1", "127.0.0.1:8400"),
            ("127.0.0.1:1", "127.0.0.1:1"),
            ("::1", "[::1]:8400"),
            ("[::1]", "[::1]:8400"),
            ("[::1]:7", "[::1]:7"),
            ("http://localhost", "localhost:8400"),
            ("https://h:5/", "h:5"),
        ] {
            assert_eq!(with_default_port(given), meant, "{given}");
        }
    }
}
