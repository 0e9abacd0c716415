//! The balancer: a member that stores nothing and serves the same `Streaming` API by forwarding
//! each call to the nodes that hold the data, so a client needs to know one address, not the
//! cluster. Several can run; they keep no state but connections.
//!
//! - **Who calls.** The caller is authorized here, by the balancer's authorizer, for the
//!   client's subject; the call then goes upstream over the balancer's own node certificate,
//!   carrying the client's subject in `goutube-on-behalf-of` (nodes honour it only from a live
//!   balancer member, see `api::Context::caller`). The caller's deadline travels with it, and
//!   a client that goes away cancels the upstream call (it is dropped with the handler).
//! - **ProduceStream.** Each frame goes to the member that takes its point's writes (the owner,
//!   or the leader the controller named in its place after a failover), one upstream stream per
//!   point (a stream may interleave points of several primaries); the reply has one record per
//!   point in first-seen order. A point's first frames are kept (up to [`REPLAY_BUDGET`]) until
//!   the call ends, so a refusal naming another owner — the ring moved under the balancer, a
//!   group's leadership was handed on — is followed (a few times at most, pausing from the
//!   second on): the point's frames go to that owner. A group electing a new leader is
//!   waited for, and a writer lost mid-call is ridden through when every kept frame carries its
//!   `expected_offset` (`docs/failover.md`, "Clients riding through").
//! - **ConsumeStream.** From a replica whose confirmed end covers the request: the owner's
//!   followers first, in turn, then the owner. If the replica fails mid-stream, the next one
//!   continues from the offset reached: the client sees one unbroken stream or an error, never a
//!   short one.
//! - **GetMetadata.** Size and CRC32C from the owner (from its most complete follower if the
//!   owner is down); workers = `ceil(multi_stream_percent % of the replicas that hold the whole
//!   point and are connected, owner included)`, at least one.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataValue;
use tonic::{Code, Request, Response, Status, Streaming};

use crate::access::Action;
use crate::api::streaming::{self, FrameStream};
use crate::client::{Client, Pool, end_of, nothing_written, owner_of, redirect_pause};
use crate::cluster::change;
use crate::controller::session;
use crate::error::Error;
use crate::net::PeerInfo;
use crate::placement::Owners;
use crate::point::PointId;
use crate::proto::{
    self, ConsumeRequest, ConsumeResponse, DeletePointRequest, DeletePointResponse,
    GetFollowersRequest, GetFollowersResponse, GetServersRequest, GetServersResponse,
    ListMembersRequest, ListMembersResponse, ListPointsRequest, ListPointsResponse,
    LocatePointRequest, LocatePointResponse, MetadataRequest, MetadataResponse, ProduceRequest,
    ProduceResponse, SignUrlRequest, SignUrlResponse,
};
use crate::proto::{ON_BEHALF_OF, PURPOSE};
use crate::reshard::Refusal;
use crate::reshard::gate::not_the_writer;
use crate::services::Services;
use crate::text::bounded;

/// Bytes of a point's first frames a produce keeps to re-send them to another owner.
pub(crate) const REPLAY_BUDGET: usize = 8 * 1024 * 1024;
/// Frames a produce queues for each point's upstream stream.
const UPSTREAM_QUEUE: usize = 8;
/// How often one point's frames are sent again while riding through the loss of its writer.
const MAX_RESUMES: u32 = 8;
/// How often one stream's frames are sent again to a member that refused them unwritten
/// because it does not see this balancer live yet ([`crate::client::nothing_written`]), and
/// the pause before each: gossip spreads a new member in about a second.
const MAX_UNSEEN: u32 = 30;
const UNSEEN_PAUSE: Duration = Duration::from_millis(100);
/// Most refusals naming another writer that one stream follows (pausing before each from the
/// second on: `client::redirect_pause`): the ring or a group's leader may change more than
/// once during a stream, but a loop between members must end.
const MAX_FOLLOWS: u32 = 8;

/// What the balancer's handlers share.
pub(crate) struct Balancer {
    /// What every subsystem of the node shares (access, placement, the URL signer, the
    /// node's lifetime: abort ends the streams left after the grace period).
    pub services: Services,
    /// Connections to the nodes, over this balancer's node certificate.
    pub upstreams: Pool,
    /// Round-robin over replicas.
    turn: AtomicUsize,
}

/// The `Streaming` service of a balancer, and its resolver helpers.
#[derive(Clone)]
pub(crate) struct BalancerService(Arc<Balancer>);

impl BalancerService {
    /// The balancer of a node with `services`, reaching the nodes through `upstreams`.
    pub(crate) fn new(services: Services, upstreams: Pool) -> Self {
        Self(Arc::new(Balancer {
            services,
            upstreams,
            turn: AtomicUsize::new(0),
        }))
    }

    /// The answer to an operator call about member `node` (drain, cleanup): a balancer changes
    /// no member; the call is made on the node itself, whose address this names.
    async fn not_a_member<T>(&self, request: &Request<T>, node: &str) -> Status {
        let caller = PeerInfo::of(request);
        if let Err(error) = self
            .0
            .services
            .access
            .authorize(&caller, Action::Admin, "")
            .await
        {
            return error.into();
        }
        let membership = self.0.services.placement.membership();
        let address = membership.rpc_addr(node).unwrap_or("an unknown address");
        Error::FailedPrecondition(format!(
            "a balancer changes no member: ask node {} at {address}",
            crate::text::bounded(node)
        ))
        .into()
    }
}

/// An upstream request for `caller`: its subject in `goutube-on-behalf-of`, its deadline.
fn forwarded<T>(
    message: T,
    caller: &PeerInfo,
    timeout: Option<&MetadataValue<tonic::metadata::Ascii>>,
) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert_bin(
        ON_BEHALF_OF,
        MetadataValue::from_bytes(caller.subject.as_bytes()),
    );
    if let Some(timeout) = timeout {
        request
            .metadata_mut()
            .insert("grpc-timeout", timeout.clone());
    }
    request
}

fn deadline<T>(request: &Request<T>) -> Option<MetadataValue<tonic::metadata::Ascii>> {
    request.metadata().get("grpc-timeout").cloned()
}

/// Whether another replica may do better after this status (the replica, not the request, failed).
fn transient(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable
            | Code::Unknown
            | Code::Internal
            | Code::Cancelled
            | Code::Aborted
            | Code::ResourceExhausted
            | Code::DeadlineExceeded
    )
}

impl Balancer {
    /// The point a call is about, once `caller` may take `action` on it.
    async fn admit(
        &self,
        caller: &PeerInfo,
        action: Action,
        point: impl Into<String>,
    ) -> Result<PointId, Status> {
        let id = PointId::new(point).map_err(Error::from)?;
        self.services
            .access
            .authorize(caller, action, id.as_str())
            .await?;
        Ok(id)
    }

    /// The point's owner and the membership it was found in.
    async fn owner(&self, id: &PointId) -> Result<Owners, Status> {
        Ok(self.services.placement.owners(id.as_str(), 1).await?)
    }

    async fn upstream(&self, addr: &str) -> Result<Client, Status> {
        self.upstreams
            .client(addr)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))
    }

    /// The owner's metadata of `id` (where to write, how long it is, who holds it), or with
    /// the owner down, that of its most complete live follower. Returns it and its source.
    /// `purpose` is what the caller was authorized for here: a consume's routing lookup is
    /// authorized upstream as that consume.
    async fn metadata_of(
        &self,
        owners: &Owners,
        id: &PointId,
        (caller, purpose): (&PeerInfo, Action),
        timeout: Option<&MetadataValue<tonic::metadata::Ascii>>,
    ) -> Result<(MetadataResponse, String), Status> {
        let request = || {
            let mut request = forwarded(
                MetadataRequest {
                    point: id.as_str().to_owned(),
                },
                caller,
                timeout,
            );
            if purpose == Action::Consume {
                request
                    .metadata_mut()
                    .insert(PURPOSE, MetadataValue::from_static("consume"));
            }
            request
        };
        let (membership, owner) = (&owners.membership, owners.first());
        let topology = self.services.controller.topology();
        // The group's leader: the owner, or the member a failover or a transfer named in its
        // place (it holds every acknowledged byte, and knows its followers' progress).
        let leader = topology.writer(owner);
        if let Some(member) = membership.live(leader) {
            let meta = self
                .upstream(&member.rpc_addr)
                .await?
                .raw()
                .get_metadata(request())
                .await?
                .into_inner();
            return Ok((meta, member.rpc_addr.clone()));
        }
        // Read failover: the leader is down, the group's other members still serve (those the
        // controller names, and followers gossip names, of the owner and of the leader).
        let mut best: Option<(MetadataResponse, String)> = None;
        let mut last = None;
        let named = topology.groups.get(owner).into_iter();
        let named = named.flat_map(|group| group.followers.iter().chain([&group.leader]));
        let mut addresses: Vec<String> = named
            .filter_map(|name| membership.live(name))
            .chain(change::followers_of(membership, owner))
            .chain(change::followers_of(membership, leader))
            .map(|member| member.rpc_addr.clone())
            .collect();
        addresses.sort();
        addresses.dedup();
        for address in addresses {
            let answer = async {
                self.upstream(&address)
                    .await?
                    .raw()
                    .get_metadata(request())
                    .await
            }
            .await;
            match answer {
                Ok(meta) => {
                    let meta = meta.into_inner();
                    if best.as_ref().is_none_or(|(b, _)| meta.size > b.size) {
                        best = Some((meta, address));
                    }
                }
                Err(status) => last = Some(status),
            }
        }
        best.ok_or_else(|| {
            last.unwrap_or_else(|| {
                Status::from(Refusal::OwnerDown {
                    point: bounded(id.as_str()),
                    owner: owner.to_owned(),
                })
            })
        })
    }

    /// The client API address of the member that takes the writes of `id` (its owner, or the
    /// leader the controller named in the owner's place), or why a write cannot go there.
    fn writer(&self, owners: &Owners, id: &PointId) -> Result<String, Refusal> {
        let topology = self.services.controller.topology();
        let (membership, slot) = (&owners.membership, owners.first());
        match membership.live(topology.writer(slot)) {
            Some(member) => Ok(member.rpc_addr.clone()),
            None => {
                let after = self.retry_after();
                Err(not_the_writer(
                    membership,
                    &topology,
                    id.as_str(),
                    slot,
                    after,
                ))
            }
        }
    }

    /// [`Balancer::writer`], waiting while the point's group elects a new leader, until
    /// `until`.
    async fn writer_after_election(&self, id: &PointId, until: Instant) -> Result<String, Status> {
        loop {
            let owners = self.owner(id).await?;
            let refusal = match self.writer(&owners, id) {
                Ok(address) => return Ok(address),
                Err(refusal) => refusal,
            };
            match refusal.retry_after() {
                Some(after) if Instant::now() + after < until => tokio::time::sleep(after).await,
                _ => return Err(refusal.into()),
            }
        }
    }

    /// How long a produce waits for a group to get a new leader: three sessions, time for the
    /// leader's session to expire, the controller to name another and the cluster to learn it.
    fn ride_through(&self) -> Duration {
        3 * Duration::from_millis(self.services.config.controller.session_ms)
    }

    /// The pause before asking again who takes a point's writes.
    fn retry_after(&self) -> Duration {
        session::retry_delay(self.services.config.controller.session_ms)
    }

    /// The next turn of the round robin over `n` choices.
    fn turn(&self, n: usize) -> usize {
        self.turn.fetch_add(1, Ordering::Relaxed) % n.max(1)
    }
}

/// One point's upstream produce stream.
struct Upstream {
    point: PointId,
    address: String,
    frames: Option<mpsc::Sender<ProduceRequest>>,
    call: JoinHandle<Result<ProduceResponse, Status>>,
    /// The frames sent so far, while they fit the budget.
    replay: Option<(Vec<ProduceRequest>, usize)>,
    /// How many refusals naming another writer were followed (at most [`MAX_FOLLOWS`]).
    followed: u32,
    /// Once the writer was lost: until when the stream waits for a new one.
    riding: Option<Instant>,
    /// How often the frames were sent again from where the new writer's copy ends.
    resumed: u32,
    /// How often the frames were sent again after a refusal that wrote nothing.
    unseen: u32,
}

impl Upstream {
    /// The point's upstream stream on the member that takes its writes, once there is one: a
    /// group that elects a new leader is waited for, up to [`Balancer::ride_through`].
    async fn start(
        balancer: &Balancer,
        point: PointId,
        caller: &PeerInfo,
        timeout: Option<&MetadataValue<tonic::metadata::Ascii>>,
    ) -> Result<Upstream, Status> {
        let until = Instant::now() + balancer.ride_through();
        let address = balancer.writer_after_election(&point, until).await?;
        Upstream::open(balancer, point, address, caller, timeout).await
    }

    async fn open(
        balancer: &Balancer,
        point: PointId,
        address: String,
        caller: &PeerInfo,
        timeout: Option<&MetadataValue<tonic::metadata::Ascii>>,
    ) -> Result<Upstream, Status> {
        let mut client = balancer.upstream(&address).await?.raw();
        let (frames, received) = mpsc::channel(UPSTREAM_QUEUE);
        let request = forwarded(ReceiverStream::new(received), caller, timeout);
        let call = tokio::spawn(async move {
            client
                .produce_stream(request)
                .await
                .map(Response::into_inner)
        });
        Ok(Upstream {
            point,
            address,
            frames: Some(frames),
            call,
            replay: Some((Vec::new(), 0)),
            followed: 0,
            riding: None,
            resumed: 0,
            unseen: 0,
        })
    }

    fn remember(&mut self, frame: &ProduceRequest) {
        if let Some((frames, bytes)) = &mut self.replay {
            *bytes += frame.frame.len();
            if *bytes > REPLAY_BUDGET {
                self.replay = None;
            } else {
                frames.push(frame.clone());
            }
        }
    }

    async fn send(
        &mut self,
        balancer: &Balancer,
        caller: &PeerInfo,
        timeout: Option<&MetadataValue<tonic::metadata::Ascii>>,
        frame: ProduceRequest,
    ) -> Result<(), Status> {
        self.remember(&frame);
        let sender = self.frames.as_ref().expect("open until finished");
        if sender.send(frame).await.is_ok() {
            return Ok(());
        }
        // The call ended before the stream did: its status says why.
        let status = match (&mut self.call).await {
            Ok(Err(status)) => status,
            Ok(Ok(_)) => Status::internal("the upstream produce ended early"),
            Err(error) => Status::internal(format!("the upstream produce failed: {error}")),
        };
        self.follow(balancer, caller, timeout, status).await
    }

    /// After the upstream call ended with `status` before the stream did, sends the frames
    /// again, when they are all kept, to the member that takes them now:
    /// - a refusal naming another writer (the ring moved, a failover named a new leader) is
    ///   followed, a few times at most, pausing from the second on (two transfers in a row are
    ///   two redirects; a new leader that does not know it yet sends the write back);
    /// - a writer lost (the call failed, `Unavailable`) is waited out, up to
    ///   [`Balancer::ride_through`], if every frame carries its `expected_offset`: then no
    ///   frame can be written twice. The new writer refuses a frame it holds already with its
    ///   end, and the frames are sent once more from there;
    /// - a refusal that wrote nothing (a member that does not see this balancer live yet) is
    ///   sent again as it is, after a pause, [`MAX_UNSEEN`] times at most: with or without
    ///   `expected_offset`, nothing can be written twice.
    async fn follow(
        &mut self,
        balancer: &Balancer,
        caller: &PeerInfo,
        timeout: Option<&MetadataValue<tonic::metadata::Ascii>>,
        status: Status,
    ) -> Result<(), Status> {
        let Some((frames, _)) = self.replay.take() else {
            return Err(status);
        };
        let (address, from) = if nothing_written(&status) {
            if self.unseen >= MAX_UNSEEN {
                return Err(status);
            }
            self.unseen += 1;
            tracing::debug!(point = %self.point, to = %self.address, %status, "refused before anything was written: sending it again");
            tokio::time::sleep(UNSEEN_PAUSE).await;
            (self.address.clone(), 0)
        } else if let Some(owner) = owner_of(&status) {
            // A few times; and while riding through the loss of a writer, as often as frames
            // may be sent again.
            match self.riding {
                None if self.followed >= MAX_FOLLOWS => return Err(status),
                None => {
                    tokio::time::sleep(redirect_pause(self.followed)).await;
                    self.followed += 1;
                }
                Some(_) if self.resumed >= MAX_RESUMES => return Err(status),
                Some(_) => self.resumed += 1,
            }
            tracing::info!(from = %self.address, to = %owner.rpc_addr, "the point is written elsewhere: following");
            (owner.rpc_addr, 0)
        } else if let Some(end) = end_of(&status)
            && self.riding.is_some()
            && self.resumed < MAX_RESUMES
            && let Some(from) = resume_at(&frames, end)
        {
            tracing::info!(point = %self.point, end, "the new writer holds part of the frames: sending the rest");
            self.resumed += 1;
            (self.address.clone(), from)
        } else if transient(&status) && frames.iter().all(|f| f.expected_offset.is_some()) {
            let until = *self
                .riding
                .get_or_insert_with(|| Instant::now() + balancer.ride_through());
            if Instant::now() + balancer.retry_after() >= until {
                return Err(status);
            }
            tracing::info!(point = %self.point, from = %self.address, %status, "the writer was lost: waiting for the next one");
            tokio::time::sleep(balancer.retry_after()).await;
            let address = balancer.writer_after_election(&self.point, until).await?;
            (address, 0)
        } else {
            return Err(status);
        };
        let mut next =
            Upstream::open(balancer, self.point.clone(), address, caller, timeout).await?;
        (next.followed, next.riding, next.resumed) = (self.followed, self.riding, self.resumed);
        next.unseen = self.unseen;
        // Frames before `from` are kept too: the new writer may lose them in turn.
        let held: usize = frames[..from].iter().map(|f| f.frame.len()).sum();
        next.replay = Some((frames[..from].to_vec(), held));
        if from == frames.len()
            && let Some(end) = end_of(&status)
        {
            // The writer holds every frame already: an empty frame at its end asks for the
            // point's record (not kept: it writes nothing).
            let ask = ProduceRequest {
                point: self.point.as_str().to_owned(),
                expected_offset: Some(end),
                ..Default::default()
            };
            let sender = next.frames.as_ref().expect("just opened");
            let _ = sender.send(ask).await; // A failure is read when it finishes.
        }
        for frame in frames.into_iter().skip(from) {
            next.remember(&frame);
            let sender = next.frames.as_ref().expect("just opened");
            if sender.send(frame).await.is_err() {
                break; // Its status is read when it finishes.
            }
        }
        *self = next;
        Ok(())
    }

    /// Ends the stream and returns the point's record.
    async fn finish(
        mut self,
        balancer: &Balancer,
        caller: &PeerInfo,
        timeout: Option<&MetadataValue<tonic::metadata::Ascii>>,
    ) -> Result<proto::Record, Status> {
        loop {
            self.frames = None;
            let status = match (&mut self.call).await {
                Ok(Ok(response)) => {
                    let mut record = response.records.into_iter().next();
                    // After frames were sent again, the record is of the last one sent; the
                    // stream's last frame is the last kept.
                    let last = self.replay.as_ref().and_then(|(frames, _)| frames.last());
                    if let (Some(record), Some(offset)) =
                        (&mut record, last.and_then(|f| f.expected_offset))
                        && self.riding.is_some()
                    {
                        record.offset = offset;
                    }
                    return record.ok_or_else(|| Status::internal("the owner answered no record"));
                }
                Ok(Err(status)) => status,
                Err(error) => Status::internal(format!("the upstream produce failed: {error}")),
            };
            Box::pin(self.follow(balancer, caller, timeout, status)).await?;
        }
    }
}

/// Which of `frames` (each with its `expected_offset`) to send to a writer whose copy of the
/// point ends at `end`: the one that starts there, or none left when they all end before it.
/// `None` if `end` is not where one of them starts or where the last ends.
fn resume_at(frames: &[ProduceRequest], end: u64) -> Option<usize> {
    if let Some(at) = frames.iter().position(|f| f.expected_offset == Some(end)) {
        return Some(at);
    }
    let last = frames.last()?;
    let last_end = last.expected_offset? + last.frame.len() as u64;
    (last_end == end).then_some(frames.len())
}

#[tonic::async_trait]
impl proto::streaming_server::Streaming for BalancerService {
    type ConsumeStreamStream = FrameStream;

    async fn produce_stream(
        &self,
        request: Request<Streaming<ProduceRequest>>,
    ) -> Result<Response<ProduceResponse>, Status> {
        let balancer = &self.0;
        let caller = PeerInfo::of(&request);
        let timeout = deadline(&request);
        let mut frames = request.into_inner();
        let mut order: Vec<String> = Vec::new();
        let mut upstreams: HashMap<String, Upstream> = HashMap::new();
        loop {
            let message = tokio::select! {
                message = frames.message() => message?,
                () = balancer.services.lifetime.abort.cancelled() => {
                    return Err(Error::Unavailable("the balancer is shutting down".into()).into());
                }
            };
            let Some(frame) = message else { break };
            if !upstreams.contains_key(&frame.point) {
                let id = PointId::new(frame.point.as_str()).map_err(Error::from)?;
                balancer
                    .services
                    .access
                    .authorize(&caller, Action::Produce, id.as_str())
                    .await?;
                let upstream = Upstream::start(balancer, id, &caller, timeout.as_ref()).await?;
                upstreams.insert(frame.point.clone(), upstream);
                order.push(frame.point.clone());
            }
            let upstream = upstreams.get_mut(&frame.point).expect("opened above");
            upstream
                .send(balancer, &caller, timeout.as_ref(), frame)
                .await?;
        }
        let mut records = HashMap::new();
        for (point, upstream) in upstreams {
            let record = upstream.finish(balancer, &caller, timeout.as_ref()).await?;
            records.insert(point, record);
        }
        let records = order
            .iter()
            .filter_map(|point| records.remove(point))
            .collect();
        Ok(Response::new(ProduceResponse { records }))
    }

    async fn consume_stream(
        &self,
        request: Request<ConsumeRequest>,
    ) -> Result<Response<Self::ConsumeStreamStream>, Status> {
        let balancer = self.0.clone();
        let caller = PeerInfo::of(&request);
        let timeout = deadline(&request);
        let wanted = request.into_inner();
        let id = balancer
            .admit(&caller, Action::Consume, wanted.point.as_str())
            .await?;
        let owners = balancer.owner(&id).await?;
        let (meta, source) = balancer
            .metadata_of(&owners, &id, (&caller, Action::Consume), timeout.as_ref())
            .await?;
        let stop = match (wanted.limit, wanted.follow) {
            (0, true) => None,
            (0, false) => Some(meta.size),
            (limit, _) => Some(limit),
        };
        // Followers whose confirmed end covers the request, in turn; then the owner (or the
        // copy the metadata came from).
        let mut replicas: Vec<String> = match stop {
            Some(stop) if !wanted.follow => meta
                .replicas
                .iter()
                .filter(|r| r.connected && r.end >= stop && !r.rpc_addr.is_empty())
                .map(|r| r.rpc_addr.clone())
                .collect(),
            _ => Vec::new(),
        };
        if !replicas.is_empty() {
            let turn = balancer.turn(replicas.len());
            replicas.rotate_left(turn);
        }
        replicas.push(source);
        let position = wanted.offset;
        let relay = Relay {
            balancer,
            caller,
            timeout,
            wanted,
            stop,
            replicas: replicas.into_iter(),
            current: None,
            position,
            last: None,
            done: false,
        };
        Ok(Response::new(relay.into_stream()))
    }

    async fn get_metadata(
        &self,
        request: Request<MetadataRequest>,
    ) -> Result<Response<MetadataResponse>, Status> {
        let balancer = &self.0;
        let caller = PeerInfo::of(&request);
        let timeout = deadline(&request);
        let id = balancer
            .admit(&caller, Action::Metadata, request.into_inner().point)
            .await?;
        let owners = balancer.owner(&id).await?;
        let (mut meta, source) = balancer
            .metadata_of(&owners, &id, (&caller, Action::Metadata), timeout.as_ref())
            .await?;
        // The replicas that hold the whole point and are connected, the owner's copy included.
        let mut eligible: Vec<String> = meta
            .replicas
            .iter()
            .filter(|r| r.connected && r.end >= meta.size && !r.rpc_addr.is_empty())
            .map(|r| r.rpc_addr.clone())
            .collect();
        eligible.push(source);
        let take = (eligible.len() * usize::from(balancer.services.config.multi_stream_percent))
            .div_ceil(100)
            .max(1);
        let turn = balancer.turn(eligible.len());
        eligible.rotate_left(turn);
        eligible.truncate(take);
        meta.workers = eligible;
        Ok(Response::new(meta))
    }

    async fn list_points(
        &self,
        request: Request<ListPointsRequest>,
    ) -> Result<Response<ListPointsResponse>, Status> {
        let balancer = &self.0;
        let caller = PeerInfo::of(&request);
        let timeout = deadline(&request);
        let request = request.into_inner();
        balancer
            .services
            .access
            .authorize(&caller, Action::Metadata, &request.prefix)
            .await?;
        let max = match request.max_results {
            0 => 1000,
            n => n.min(10_000) as usize,
        };
        // Every live primary's page of one more than asked, merged (`merged_page`).
        let membership = balancer.services.placement.membership();
        let mut pages = Vec::new();
        for member in membership
            .view
            .members
            .values()
            .filter(|m| m.role.is_primary())
        {
            let page = ListPointsRequest {
                max_results: (max + 1) as u32,
                ..request.clone()
            };
            let answer = balancer
                .upstream(&member.rpc_addr)
                .await?
                .raw()
                .list_points(forwarded(page, &caller, timeout.as_ref()))
                .await?
                .into_inner();
            pages.push(answer);
        }
        Ok(Response::new(crate::client::merged_page(pages, max)))
    }

    async fn delete_point(
        &self,
        request: Request<DeletePointRequest>,
    ) -> Result<Response<DeletePointResponse>, Status> {
        let balancer = &self.0;
        let caller = PeerInfo::of(&request);
        let timeout = deadline(&request);
        let id = balancer
            .admit(&caller, Action::Admin, request.into_inner().point)
            .await?;
        let owners = balancer.owner(&id).await?;
        let address = balancer.writer(&owners, &id)?;
        let request = DeletePointRequest {
            point: id.as_str().to_owned(),
        };
        balancer
            .upstream(&address)
            .await?
            .raw()
            .delete_point(forwarded(request, &caller, timeout.as_ref()))
            .await
    }

    async fn locate_point(
        &self,
        request: Request<LocatePointRequest>,
    ) -> Result<Response<LocatePointResponse>, Status> {
        let balancer = &self.0;
        let caller = PeerInfo::of(&request);
        let request = request.into_inner();
        let id = balancer
            .admit(&caller, Action::Metadata, request.point)
            .await?;
        let located = streaming::locate(&balancer.services, &id, request.replicas).await?;
        Ok(Response::new(located))
    }

    async fn drain_member(
        &self,
        request: Request<proto::DrainMemberRequest>,
    ) -> Result<Response<proto::DrainMemberResponse>, Status> {
        let node = request.get_ref().node.clone();
        Err(self.not_a_member(&request, &node).await)
    }

    async fn cleanup_member(
        &self,
        request: Request<proto::CleanupMemberRequest>,
    ) -> Result<Response<proto::CleanupMemberResponse>, Status> {
        let node = request.get_ref().node.clone();
        Err(self.not_a_member(&request, &node).await)
    }

    async fn transfer_leadership(
        &self,
        request: Request<proto::TransferLeadershipRequest>,
    ) -> Result<Response<proto::TransferLeadershipResponse>, Status> {
        let node = request.get_ref().node.clone();
        Err(self.not_a_member(&request, &node).await)
    }

    async fn elect_leader(
        &self,
        _: Request<proto::ElectLeaderRequest>,
    ) -> Result<Response<proto::ElectLeaderResponse>, Status> {
        Err(Status::failed_precondition(
            "a balancer does not elect leaders: ask a member (goutube members elect SLOT --to M \
             --unclean --addr MEMBER)",
        ))
    }

    async fn forget_member(
        &self,
        _: Request<proto::ForgetMemberRequest>,
    ) -> Result<Response<proto::ForgetMemberResponse>, Status> {
        Err(Status::failed_precondition(
            "a balancer does not change the ring: ask a primary (goutube members forget NODE --addr PRIMARY)",
        ))
    }

    async fn set_voters(
        &self,
        _: Request<proto::SetVotersRequest>,
    ) -> Result<Response<proto::SetVotersResponse>, Status> {
        Err(Status::failed_precondition(
            "a balancer does not change the controller: ask a primary (goutube members voters A,B,C --addr PRIMARY)",
        ))
    }

    async fn list_members(
        &self,
        request: Request<ListMembersRequest>,
    ) -> Result<Response<ListMembersResponse>, Status> {
        let caller = PeerInfo::of(&request);
        self.0
            .services
            .access
            .authorize(&caller, Action::Metadata, "")
            .await?;
        Ok(Response::new(streaming::members(
            &self.0.services.placement.membership(),
            &self.0.services.controller,
        )))
    }

    async fn sign_url(
        &self,
        request: Request<SignUrlRequest>,
    ) -> Result<Response<SignUrlResponse>, Status> {
        let caller = PeerInfo::of(&request);
        let request = request.into_inner();
        let signed = streaming::sign_url(
            &self.0.services.access,
            &self.0.services.signer,
            &caller,
            request,
        )
        .await?;
        Ok(Response::new(signed))
    }
}

/// A consume relayed to the client: `[offset, stop)` of the point from the first replica that
/// serves it, continuing on the next one from the offset reached if a replica fails. It is the
/// response stream itself, polled by the client's connection (no task or channel in between:
/// each hop costs a wake-up per frame, measured in `bench download`).
struct Relay {
    balancer: Arc<Balancer>,
    caller: PeerInfo,
    timeout: Option<MetadataValue<tonic::metadata::Ascii>>,
    wanted: ConsumeRequest,
    stop: Option<u64>,
    replicas: std::vec::IntoIter<String>,
    /// The replica being read, and its stream.
    current: Option<(String, Streaming<ConsumeResponse>)>,
    position: u64,
    /// Why the last replica failed.
    last: Option<Status>,
    done: bool,
}

/// What one message from a replica means.
enum Step {
    Frame(ConsumeResponse),
    End,
    /// The replica failed; the next one continues.
    Next(Status),
    Fail(Status),
}

impl Relay {
    fn into_stream(self) -> FrameStream {
        Box::pin(futures::stream::unfold(self, |mut relay| async move {
            let item = relay.next().await?;
            Some((item, relay))
        }))
    }

    async fn next(&mut self) -> Option<Result<ConsumeResponse, Status>> {
        if self.done {
            return None;
        }
        loop {
            let Some((address, stream)) = self.current.as_mut() else {
                match self.open().await {
                    Ok(true) => continue,
                    Ok(false) => return self.fail(self.exhausted()),
                    Err(status) => return self.fail(status),
                }
            };
            let message = tokio::select! {
                message = stream.message() => message,
                () = self.balancer.services.lifetime.abort.cancelled() => {
                    return self.fail(Status::unavailable("the balancer is shutting down"));
                }
            };
            let step = match message {
                Ok(Some(response)) if response.offset == self.position => Step::Frame(response),
                Ok(Some(response)) => Step::Next(Status::internal(format!(
                    "replica {address} sent offset {} where {} was due",
                    response.offset, self.position
                ))),
                Ok(None) if self.stop.is_none_or(|stop| self.position == stop) => Step::End,
                Ok(None) => Step::Next(Status::unavailable(format!(
                    "replica {address} ended at {}",
                    self.position
                ))),
                Err(status) if transient(&status) => {
                    tracing::info!(replica = %address, position = self.position, %status, "replica failed mid-stream; continuing elsewhere");
                    Step::Next(status)
                }
                Err(status) => Step::Fail(status),
            };
            match step {
                Step::Frame(response) => {
                    self.position += response.frame.len() as u64;
                    return Some(Ok(response));
                }
                Step::End => {
                    self.done = true;
                    return None;
                }
                Step::Next(status) => {
                    self.last = Some(status);
                    self.current = None;
                }
                Step::Fail(status) => return self.fail(status),
            }
        }
    }

    /// Opens the stream on the next replica that answers; `false` when none is left.
    async fn open(&mut self) -> Result<bool, Status> {
        for address in self.replicas.by_ref() {
            let request = ConsumeRequest {
                offset: self.position,
                ..self.wanted.clone()
            };
            let stream = async {
                self.balancer
                    .upstream(&address)
                    .await?
                    .raw()
                    .consume_stream(forwarded(request, &self.caller, self.timeout.as_ref()))
                    .await
            }
            .await;
            match stream {
                Ok(stream) => {
                    self.current = Some((address, stream.into_inner()));
                    return Ok(true);
                }
                Err(status) if transient(&status) => self.last = Some(status),
                Err(status) => return Err(status),
            }
        }
        Ok(false)
    }

    fn exhausted(&self) -> Status {
        let why = self.last.as_ref().map(|s| s.message()).unwrap_or_default();
        Status::unavailable(format!(
            "no replica could serve the rest of the point from {}: {why}",
            self.position
        ))
    }

    /// Ends the stream with `status`.
    fn fail(&mut self, status: Status) -> Option<Result<ConsumeResponse, Status>> {
        self.done = true;
        self.current = None;
        Some(Err(status))
    }
}

#[tonic::async_trait]
impl proto::lb_resolver_helper_server::LbResolverHelper for BalancerService {
    async fn get_servers(
        &self,
        request: Request<GetServersRequest>,
    ) -> Result<Response<GetServersResponse>, Status> {
        let caller = PeerInfo::of(&request);
        self.0
            .services
            .access
            .authorize(&caller, Action::Metadata, "")
            .await?;
        let servers = streaming::balancers(&self.0.services.placement.membership());
        Ok(Response::new(GetServersResponse { servers }))
    }
}

#[tonic::async_trait]
impl proto::follower_resolver_helper_server::FollowerResolverHelper for BalancerService {
    async fn get_followers(
        &self,
        request: Request<GetFollowersRequest>,
    ) -> Result<Response<GetFollowersResponse>, Status> {
        let caller = PeerInfo::of(&request);
        self.0
            .services
            .access
            .authorize(&caller, Action::Metadata, "")
            .await?;
        let membership = self.0.services.placement.membership();
        let servers = membership
            .view
            .members
            .values()
            .filter(|m| m.leader.is_some())
            .map(|m| proto::Server {
                rpc_addr: m.rpc_addr.clone(),
                name: m.name.clone(),
            })
            .collect();
        Ok(Response::new(GetFollowersResponse { servers }))
    }
}
