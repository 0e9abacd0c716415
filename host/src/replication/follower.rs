//! The follower side: connect to each leader in `leader_addresses`, offer what this node holds,
//! and apply the records the leader pushes.
//!
//! A record is applied only if it starts at this node's end of the point
//! (`Store::apply_replicated`), so nothing is applied twice and nothing is skipped; otherwise the
//! reply tells the leader where this node really ends. Records the bundler rejects (damaged, or
//! its answer names another point or offset than the record) are reported and sent again.
//! Pushes are handed, in arrival order, to one applier task that writes consecutive records of a
//! point as one batch (one journal write; one sync under `fsync = "always"`). A lost connection
//! is retried with backoff, offering the real ends again, so a restart of either side resumes
//! where it stopped.

use std::rc::Rc;
use std::time::Duration;

use bytes::Bytes;
use capnp_rpc::rpc_twoparty_capnp::Side;
use capnp_rpc::{RpcSystem, twoparty};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_rustls::TlsConnector;
use tokio_util::compat::{TokioAsyncReadCompatExt, TokioAsyncWriteCompatExt};
use tokio_util::either::Either;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use super::replication_capnp::{leader, sink};
use super::{Context, check_identity, server_name};
use crate::access::Action;
use crate::metrics;
use crate::net::PeerInfo;
use crate::point::ownership::FIRST_EPOCH;
use crate::point::{AppendError, DeleteError, Ownership, PointId, ReadError};

/// Longest wait between two attempts to reach a leader.
const MAX_BACKOFF: Duration = Duration::from_secs(2);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Jobs queued for the applier; the leader's window keeps far fewer pushes in flight.
const APPLY_QUEUE: usize = 256;

/// Follows every configured leader until `shutdown`.
pub async fn run(context: Context, tls: Option<TlsConnector>, shutdown: CancellationToken) {
    let context = Rc::new(context);
    let (jobs, queue) = mpsc::channel(APPLY_QUEUE);
    tokio::task::spawn_local(apply(context.clone(), queue));
    let sink: sink::Client = capnp_rpc::new_client(SinkService {
        context: context.clone(),
        order: tokio::sync::Mutex::new(()),
        jobs,
    });
    for address in context.config.leader_addresses.clone() {
        let (context, tls, sink, shutdown) =
            (context.clone(), tls.clone(), sink.clone(), shutdown.clone());
        tokio::task::spawn_local(async move {
            let mut backoff = Duration::from_millis(50);
            while !shutdown.is_cancelled() {
                match session(&context, &address, tls.as_ref(), &sink, &shutdown).await {
                    Ok(()) => backoff = Duration::from_millis(50),
                    Err(error) => {
                        tracing::warn!(leader = %address, %error, "replication session failed")
                    }
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        });
    }
    shutdown.cancelled().await;
}

/// One connection to a leader, until it breaks or `shutdown`.
async fn session(
    context: &Rc<Context>,
    address: &str,
    tls: Option<&TlsConnector>,
    sink: &sink::Client,
    shutdown: &CancellationToken,
) -> Result<(), String> {
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(address))
        .await
        .map_err(|_| "connection timed out".to_string())?
        .map_err(|e| format!("connecting: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let peer_addr = tcp.peer_addr().map_err(|e| format!("connecting: {e}"))?;
    let (io, subject) = match tls {
        None => (Either::Left(tcp), None),
        Some(connector) => {
            let name = server_name(address).ok_or_else(|| format!("{address} is not host:port"))?;
            // rustls reads at most 4 KiB per call: see `tls::READ_BUFFER`.
            let buffered = tokio::io::BufReader::with_capacity(crate::tls::READ_BUFFER, tcp);
            let stream = tokio::time::timeout(CONNECT_TIMEOUT, connector.connect(name, buffered))
                .await
                .map_err(|_| "TLS handshake timed out".to_string())?
                .map_err(|e| format!("TLS handshake: {e}"))?;
            // The leader must be a node the policy lets replicate, not just anyone with a
            // certificate from the CA.
            let subject = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|certs| certs.first())
                .map(|cert| crate::tls::subject(cert.as_ref()))
                .ok_or("the leader presented no certificate")?;
            let peer = PeerInfo {
                addr: peer_addr,
                subject: subject.as_str().into(),
            };
            if let Err(error) = context.access.authorize(&peer, Action::Replicate, "").await {
                ::metrics::counter!(metrics::REPLICATION_REFUSED).increment(1);
                return Err(format!("leader refused: {error}"));
            }
            (Either::Right(stream), Some(subject))
        }
    };
    let (reader, writer) = tokio::io::split(io);
    let network = twoparty::VatNetwork::new(
        reader.compat(),
        writer.compat_write(),
        Side::Client,
        Default::default(),
    );
    let mut rpc = RpcSystem::new(Box::new(network), None);
    let leader: leader::Client = rpc.bootstrap(Side::Server);
    // Aborted however this function returns: a refused leader keeps no connection.
    let mut connection = AbortOnDropHandle::new(tokio::task::spawn_local(rpc));

    // Who the leader says it is, before any capability is handed over: with TLS its certificate
    // must name that node.
    let name = tokio::select! {
        identified = leader.identify_request().send().promise => identified
            .and_then(|r| Ok(r.get()?.get_name()?.to_string()?))
            .map_err(|e| format!("asking the leader its name: {e}"))?,
        _ = shutdown.cancelled() => return Ok(()),
    };
    if let Some(subject) = &subject
        && let Err(reason) = check_identity(subject, &name, true)
    {
        ::metrics::counter!(metrics::REPLICATION_REFUSED).increment(1);
        return Err(format!("leader refused: {reason}"));
    }

    let offers = offers(context).await;
    let mut request = leader.follow_request();
    {
        let mut params = request.get();
        let mut hello = params.reborrow().init_hello();
        hello.set_follower(&context.config.node_name);
        hello.set_protocol(super::PROTOCOL);
        hello.set_rpc_address(context.rpc_addr.to_string());
        let mut list = hello.init_offers(offers.len() as u32);
        for (i, (point, end, epoch)) in offers.iter().enumerate() {
            let mut offer = list.reborrow().get(i as u32);
            offer.set_point(point.as_str());
            offer.set_end(*end);
            offer.set_epoch(*epoch);
        }
        params.set_sink(sink.clone());
    }
    let response = tokio::select! {
        response = request.send().promise => response.map_err(|e| format!("follow: {e}"))?,
        _ = shutdown.cancelled() => return Ok(()),
    };
    let session = response
        .get()
        .and_then(|r| r.get_session())
        .map_err(|e| format!("follow: {e}"))?;
    context.leader.send_replace(Some(name.clone()));
    tracing::info!(leader = %address, name = %name, points = offers.len(), "following");
    let ended = tokio::select! {
        ended = &mut connection => ended,
        _ = shutdown.cancelled() => return Ok(()),
    };
    drop(session);
    match ended {
        Ok(Ok(())) => Err("the leader closed the connection".into()),
        Ok(Err(error)) => Err(format!("connection: {error}")),
        Err(error) => Err(format!("connection task: {error}")),
    }
}

/// Every point this node holds, with its end and its epoch.
async fn offers(context: &Context) -> Vec<(PointId, u64, u64)> {
    let mut offers = Vec::new();
    for id in context.store.list("", None, usize::MAX) {
        let store = &context.store;
        let held = async {
            let end = store.metadata(&id).await?.end;
            let epoch = store.ownership(&id).await?.epoch;
            Ok::<_, ReadError>((end, epoch))
        };
        match held.await {
            Ok((end, epoch)) => offers.push((id, end, epoch)),
            Err(error) => tracing::warn!(point = %id, %error, "not offered to the leader"),
        }
    }
    offers
}

/// Work for the applier, in arrival order.
enum Job {
    /// The records of one push that the bundler accepted, with one outcome each.
    Apply {
        records: Vec<Incoming>,
        done: oneshot::Sender<Vec<Result<Applied, String>>>,
    },
    Remove {
        point: PointId,
        done: oneshot::Sender<Result<(), String>>,
    },
    Describe {
        point: PointId,
        content_type: Option<String>,
        epoch: u64,
        done: oneshot::Sender<Result<(), String>>,
    },
}

/// A record, unbundled and checked.
struct Incoming {
    point: PointId,
    start: u64,
    payload: Bytes,
}

/// The outcome of one record: applied, or the point ends elsewhere. Either way, its end.
#[derive(Clone)]
enum Applied {
    Yes(u64),
    Mismatch(u64),
}

/// Runs the jobs in order.
async fn apply(context: Rc<Context>, mut queue: mpsc::Receiver<Job>) {
    while let Some(job) = queue.recv().await {
        match job {
            Job::Apply { records, done } => {
                let _ = done.send(apply_records(&context, records).await);
            }
            Job::Remove { point, done } => {
                let result = match context.store.delete(&point).await {
                    Ok(size) => {
                        tracing::info!(%point, size, "removed (the leader no longer has this copy)");
                        Ok(())
                    }
                    Err(DeleteError::NotFound(_)) => Ok(()),
                    Err(error) => Err(error.to_string()),
                };
                let _ = done.send(result);
            }
            Job::Describe {
                point,
                content_type,
                epoch,
                done,
            } => {
                let store = &context.store;
                let result = async {
                    if let Some(content_type) = &content_type {
                        store
                            .set_replicated_content_type(&point, content_type)
                            .await?;
                    }
                    // The leader's word on the epoch is final, as on the content type.
                    store
                        .set_ownership(
                            &point,
                            Ownership {
                                epoch,
                                owner: None,
                                handover: None,
                            },
                        )
                        .await
                }
                .await
                .map_err(|error| error.to_string());
                let _ = done.send(result);
            }
        }
    }
}

/// Applies `records` in order, each run of consecutive records of one point as one batch; one
/// outcome per record.
async fn apply_records(context: &Context, records: Vec<Incoming>) -> Vec<Result<Applied, String>> {
    let mut outcomes = Vec::with_capacity(records.len());
    let mut records = records.into_iter().peekable();
    while let Some(first) = records.next() {
        let (point, start) = (first.point, first.start);
        let mut end = start + first.payload.len() as u64;
        let mut payloads = vec![first.payload];
        while let Some(next) = records.next_if(|r| r.point == point && r.start == end) {
            end += next.payload.len() as u64;
            payloads.push(next.payload);
        }
        let count = payloads.len();
        match context
            .store
            .apply_replicated(&point, start, payloads)
            .await
        {
            Ok(appended) => {
                ::metrics::counter!(metrics::REPLICATED_BYTES, "direction" => "applied")
                    .increment(end - start);
                outcomes.extend(appended.iter().map(|a| Ok(Applied::Yes(a.end))));
            }
            Err(AppendError::OffsetMismatch { end, .. }) => {
                outcomes.extend(std::iter::repeat_n(Ok(Applied::Mismatch(end)), count));
            }
            Err(error) => {
                tracing::error!(%point, %error, "cannot apply replicated records");
                outcomes.extend(std::iter::repeat_n(Err(error.to_string()), count));
            }
        }
    }
    outcomes
}

/// Receives the leader's records.
struct SinkService {
    context: Rc<Context>,
    /// Jobs are queued one at a time, in arrival order (tokio's mutex is fair).
    order: tokio::sync::Mutex<()>,
    jobs: mpsc::Sender<Job>,
}

impl SinkService {
    /// Queues `job` behind every earlier push.
    async fn enqueue(&self, job: Job) -> Result<(), capnp::Error> {
        let _turn = self.order.lock().await;
        self.jobs
            .send(job)
            .await
            .map_err(|_| capnp::Error::failed("the follower is shutting down".into()))
    }
}

impl sink::Server for SinkService {
    async fn push(
        self: Rc<Self>,
        params: sink::PushParams,
        mut results: sink::PushResults,
    ) -> Result<(), capnp::Error> {
        let plugins = self.context.plugins.current();
        // The records to apply, and per record whether it is among them or why it was rejected.
        let mut accepted = Vec::new();
        let mut slots = Vec::new();
        for record in params.get()?.get_records()? {
            let point = record.get_point()?.to_str()?;
            let start = record.get_start();
            let bytes = Bytes::copy_from_slice(record.get_bundle()?);
            // A bundler that fails (traps, times out) has not vouched for the record either.
            let unbundled = plugins
                .unbundle(bytes)
                .unwrap_or_else(|e| Err(e.to_string()));
            let checked = unbundled.and_then(|r| {
                if r.point != point || r.start != start {
                    return Err(format!(
                        "the bundler found {}@{} in the record of {}@{start}",
                        crate::error::bounded(&r.point),
                        r.start,
                        crate::error::bounded(point)
                    ));
                }
                let point = PointId::new(r.point).map_err(|e| format!("bad point id: {e}"))?;
                Ok(Incoming {
                    point,
                    start,
                    payload: r.payload,
                })
            });
            slots.push(match checked {
                Ok(record) => {
                    accepted.push(record);
                    Ok(())
                }
                Err(reason) => {
                    ::metrics::counter!(metrics::REPLICATION_REJECTED).increment(1);
                    tracing::warn!(%reason, "rejected a replication record");
                    Err(reason)
                }
            });
        }
        let (done, outcome) = oneshot::channel();
        self.enqueue(Job::Apply {
            records: accepted,
            done,
        })
        .await?;
        let mut outcomes = outcome
            .await
            .map_err(|_| capnp::Error::failed("the applier stopped".into()))?
            .into_iter();
        let mut acks = results.get().init_acks(slots.len() as u32);
        for (i, slot) in slots.into_iter().enumerate() {
            let mut ack = acks.reborrow().get(i as u32);
            match slot {
                Err(reason) => {
                    ack.set_end(0);
                    ack.init_result().set_rejected(&reason);
                }
                Ok(()) => match outcomes.next().expect("one outcome per accepted record") {
                    Ok(Applied::Yes(end)) => {
                        ack.set_end(end);
                        ack.init_result().set_applied(());
                    }
                    Ok(Applied::Mismatch(end)) => {
                        ack.set_end(end);
                        ack.init_result().set_mismatch(());
                    }
                    Err(error) => return Err(capnp::Error::failed(error)),
                },
            }
        }
        Ok(())
    }

    async fn describe(
        self: Rc<Self>,
        params: sink::DescribeParams,
        _: sink::DescribeResults,
    ) -> Result<(), capnp::Error> {
        let params = params.get()?;
        let point = params.get_point()?.to_str()?.to_owned();
        let content_type = params.get_content_type()?.to_str()?.to_owned();
        let epoch = params.get_epoch();
        let Ok(point) = PointId::new(point) else {
            return Ok(());
        };
        let content_type = (!content_type.is_empty()).then_some(content_type);
        if content_type
            .as_deref()
            .is_some_and(|given| !crate::content::is_valid(given))
        {
            return Err(capnp::Error::failed(format!(
                "the leader described {point} with an invalid content type"
            )));
        }
        if epoch < FIRST_EPOCH {
            return Err(capnp::Error::failed(format!(
                "the leader described {point} with epoch 0"
            )));
        }
        let (done, outcome) = oneshot::channel();
        self.enqueue(Job::Describe {
            point,
            content_type,
            epoch,
            done,
        })
        .await?;
        outcome
            .await
            .map_err(|_| capnp::Error::failed("the applier stopped".into()))?
            .map_err(capnp::Error::failed)
    }

    async fn remove(
        self: Rc<Self>,
        params: sink::RemoveParams,
        _: sink::RemoveResults,
    ) -> Result<(), capnp::Error> {
        let point = params.get()?.get_point()?.to_str()?.to_owned();
        let Ok(point) = PointId::new(point) else {
            return Ok(());
        };
        let (done, outcome) = oneshot::channel();
        self.enqueue(Job::Remove { point, done }).await?;
        outcome
            .await
            .map_err(|_| capnp::Error::failed("the applier stopped".into()))?
            .map_err(capnp::Error::failed)
    }
}
