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
use tokio::sync::{mpsc, oneshot};
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;

use super::replication_capnp::sink;
use super::{Context, Dialed, dial};
use crate::metrics;
use crate::point::ownership::FIRST_EPOCH;
use crate::point::{AppendError, DeleteError, Handover, Ownership, PointId, ReadError};

/// Longest wait between two attempts to reach a leader.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// Jobs queued for the applier; the leader's window keeps far fewer pushes in flight.
const APPLY_QUEUE: usize = 256;

/// Follows every configured leader until `shutdown`.
pub async fn run(context: Context, tls: Option<TlsConnector>, shutdown: CancellationToken) {
    let context = Rc::new(context);
    let sink = receiver(context.clone(), None);
    for address in context.config.leader_addresses.clone() {
        let (context, tls, sink, shutdown) =
            (context.clone(), tls.clone(), sink.clone(), shutdown.clone());
        tokio::task::spawn_local(async move {
            let mut backoff = Duration::from_millis(50);
            while !shutdown.is_cancelled() {
                match session(&context, &address, tls.as_ref(), &sink, &shutdown).await {
                    Ok(()) => backoff = Duration::from_millis(50),
                    Err(error) => {
                        tracing::warn!(leader = %address, %error, "replication session failed");
                        name_unreachable_leader(&context, &address);
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

/// A follower that restarted while its leader is down still says whose follower it is (its
/// copies count in that leader's takeover if it is forgotten): the ring member whose
/// replication address is `address`, until a session names the leader itself.
fn name_unreachable_leader(context: &Context, address: &str) {
    if context.leader.borrow().is_some() {
        return;
    }
    let membership = context.membership.borrow().clone();
    let named = membership
        .ring
        .members
        .iter()
        .find(|(_, record)| record.replication_addr == address)
        .map(|(name, _)| name.clone());
    if named.is_some() {
        context.leader.send_replace(named);
    }
}

/// One connection to a leader, until it breaks or `shutdown`.
async fn session(
    context: &Rc<Context>,
    address: &str,
    tls: Option<&TlsConnector>,
    sink: &sink::Client,
    shutdown: &CancellationToken,
) -> Result<(), String> {
    let Dialed {
        member: leader,
        name,
        mut connection,
    } = tokio::select! {
        dialed = dial(context, address, tls) => dialed?,
        _ = shutdown.cancelled() => return Ok(()),
    };

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

/// A sink that applies what it receives to this node's store: a follower's copies of its
/// leader's points (`from` is `None`), or the points the member `from` hands to this node in a
/// handover, applied only while this node holds them as `incoming` from `from`.
pub(crate) fn receiver(context: Rc<Context>, from: Option<String>) -> sink::Client {
    let (jobs, queue) = mpsc::channel(APPLY_QUEUE);
    tokio::task::spawn_local(apply(context.clone(), queue, from));
    capnp_rpc::new_client(SinkService {
        context,
        order: tokio::sync::Mutex::new(()),
        jobs,
    })
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

/// Runs the jobs in order; for a handover from `from`, only on points arriving from it.
async fn apply(context: Rc<Context>, mut queue: mpsc::Receiver<Job>, from: Option<String>) {
    while let Some(job) = queue.recv().await {
        if let Some(from) = &from {
            handed(&context, from, job).await;
            continue;
        }
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

/// A job of the handover from `from`: applied only to points this node holds as `incoming` from
/// it (a point this node owns is never written by another member). Removing such a point
/// empties it and keeps it incoming; its description gives its content type only (its epoch is
/// the one the handover commits). A description of any other point is ignored: the sender
/// describes a point again when its record changes, which races with the end of a handover
/// this node has just committed (and must not end the session that carries the other moves).
async fn handed(context: &Context, from: &str, job: Job) {
    let store = &context.store;
    let incoming = |point: &PointId| {
        let point = point.clone();
        async move {
            match store.ownership(&point).await {
                Ok(ownership) => match &ownership.handover {
                    Some(Handover::Incoming { from: sender, .. }) if sender == from => {
                        Ok(ownership)
                    }
                    _ => Err(format!(
                        "point {point} is not being handed to this node by {from}"
                    )),
                },
                Err(error) => Err(error.to_string()),
            }
        }
    };
    match job {
        Job::Apply { records, done } => {
            let mut checked = Vec::with_capacity(records.len());
            for record in records {
                let allowed = incoming(&record.point).await.map(|_| ());
                checked.push((record, allowed));
            }
            if let Some(refused) = checked
                .iter()
                .find_map(|(_, allowed)| allowed.clone().err())
            {
                let _ = done.send(vec![Err(refused); checked.len()]);
                return;
            }
            let records = checked.into_iter().map(|(record, _)| record).collect();
            let _ = done.send(apply_records(context, records).await);
        }
        Job::Remove { point, done } => {
            let result = async {
                let ownership = incoming(&point).await?;
                store.delete(&point).await.map_err(|e| e.to_string())?;
                store
                    .set_ownership(&point, ownership)
                    .await
                    .map_err(|e| e.to_string())
            }
            .await;
            let _ = done.send(result);
        }
        Job::Describe {
            point,
            content_type,
            done,
            ..
        } => {
            let result = async {
                if let Err(reason) = incoming(&point).await {
                    tracing::debug!(%point, %reason, "description ignored");
                    return Ok(());
                }
                match &content_type {
                    Some(content_type) => store
                        .set_replicated_content_type(&point, content_type)
                        .await
                        .map_err(|e| e.to_string()),
                    None => Ok(()),
                }
            }
            .await;
            let _ = done.send(result);
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
