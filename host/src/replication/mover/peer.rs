//! One destination of moves: its connection, the sink and the replicator that feed it, and the
//! calls of the handover protocol (`Leader.handover/seal/settled/offer/prepare/cancel`) made on
//! it, each failure a [`LinkError`] (a lost connection is [`LinkError::Disconnected`]: the
//! driver drops the peer and the next move dials again).

use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use crate::net::IdentityError;
use crate::point::PointId;
use crate::replication::error::{LinkError, MoveError};
use crate::replication::replication_capnp::{leader, sealed};
use crate::replication::replicator::{Ended, Replicator, ScopeChange, supervised};
use crate::replication::{Context, Progress, dial};

/// How the destination answered a seal.
pub(super) enum Seal {
    /// It owns the point now, at this epoch.
    Committed(u64),
    /// It does not hold what was sealed (its reason): nothing is committed there.
    Refused(String),
}

/// One destination of moves: its connection, its sink and the replicator that feeds it.
pub(super) struct Peer {
    pub(super) name: String,
    pub(super) member: leader::Client,
    pub(super) changes: mpsc::Sender<ScopeChange>,
    /// What the destination confirmed, per point.
    pub(super) progress: Arc<Progress>,
    /// Ends the replicator when the peer is dropped.
    pub(super) _stop: tokio_util::sync::DropGuard,
    pub(super) _connection: AbortOnDropHandle<Result<(), capnp::Error>>,
}

impl Peer {
    pub(super) async fn connect(
        context: &Rc<Context>,
        to: &str,
        address: &str,
        tls: Option<&TlsConnector>,
        shutdown: &CancellationToken,
    ) -> Result<Peer, LinkError> {
        let dialed = dial(context, address, tls).await?;
        if dialed.name != to {
            return Err(IdentityError::WrongNode {
                address: address.to_owned(),
                found: crate::text::bounded(&dialed.name),
                expected: to.to_owned(),
            }
            .into());
        }
        let mut request = dialed.member.receive_request();
        request.get().set_from(&context.services.config.node_name);
        let sink = request
            .send()
            .promise
            .await
            .and_then(|response| response.get()?.get_sink())
            .map_err(|e| LinkError::call("receive", to, e))?;
        let progress = Arc::new(Progress::default());
        let replicator_context = Rc::new(Context {
            progress: progress.clone(),
            ..(**context).clone()
        });
        let (changes, scope) = mpsc::channel(64);
        let stop = shutdown.child_token();
        let replicator =
            Replicator::handover(replicator_context, to.to_owned(), sink, stop.clone(), scope);
        let name = to.to_owned();
        // When it ends, `changes` closes: the next move finds the peer broken and dials again.
        tokio::task::spawn_local(async move {
            if let Some(Ended::Failed(error)) =
                supervised(&name, replicator.run(HashMap::new())).await
            {
                tracing::warn!(to = %name, %error, "handover session failed");
            }
        });
        tracing::info!(%to, %address, "handing points over");
        Ok(Peer {
            name: to.to_owned(),
            member: dialed.member,
            changes,
            progress,
            _stop: stop.drop_guard(),
            _connection: dialed.connection,
        })
    }

    /// Asks the destination to receive `point` (owned here at `epoch`): the end it holds.
    pub(super) async fn begin(
        &self,
        local: &str,
        point: &PointId,
        epoch: u64,
    ) -> Result<u64, LinkError> {
        let mut request = self.member.handover_request();
        request.get().set_from(local);
        request.get().set_point(point.as_str());
        request.get().set_epoch(epoch);
        let response = request
            .send()
            .promise
            .await
            .map_err(|e| self.failed("handover", e))?;
        Ok(response
            .get()
            .map_err(|e| self.failed("handover", e))?
            .get_end())
    }

    /// Asks the destination to commit `point` at `[0, end)` with CRC32C `crc`.
    pub(super) async fn seal(
        &self,
        local: &str,
        point: &PointId,
        end: u64,
        crc: u32,
    ) -> Result<Seal, LinkError> {
        let mut request = self.member.seal_request();
        request.get().set_from(local);
        request.get().set_point(point.as_str());
        request.get().set_end(end);
        request.get().set_crc(crc);
        let response = request
            .send()
            .promise
            .await
            .map_err(|e| self.failed("seal", e))?;
        let outcome = response
            .get()
            .and_then(|r| r.get_outcome())
            .map_err(|e| self.failed("seal", e))?;
        match outcome.which().map_err(|e| self.failed("seal", e.into()))? {
            sealed::Committed(epoch) => Ok(Seal::Committed(epoch)),
            sealed::Refused(reason) => Ok(Seal::Refused(
                reason.and_then(|r| Ok(r.to_string()?)).unwrap_or_default(),
            )),
        }
    }

    /// What the destination holds of `point`, for the cleanup of this node's copy.
    pub(super) async fn settled(
        &self,
        point: &PointId,
    ) -> Result<crate::replication::handover::Settled, LinkError> {
        let mut request = self.member.settled_request();
        request.get().set_point(point.as_str());
        let response = request
            .send()
            .promise
            .await
            .map_err(|e| self.failed("settled", e))?;
        let results = response.get().map_err(|e| self.failed("settled", e))?;
        Ok(crate::replication::handover::Settled {
            epoch: results.get_epoch(),
            end: results.get_end(),
            replicated: results.get_replicated(),
        })
    }

    /// Offers the destination this node's copies of points of the forgotten member `forgotten`
    /// (`docs/resharding.md`, forget); one verdict per copy.
    pub(super) async fn offer(
        &self,
        local: &str,
        forgotten: &str,
        copies: &[crate::replication::takeover::Copy],
    ) -> Result<Vec<crate::replication::takeover::Verdict>, LinkError> {
        use crate::replication::replication_capnp::Verdict;
        use crate::replication::takeover::Verdict as Answer;
        let mut request = self.member.offer_request();
        request.get().set_from(local);
        request.get().set_forgotten(forgotten);
        let mut list = request.get().init_copies(copies.len() as u32);
        for (i, copy) in copies.iter().enumerate() {
            let mut entry = list.reborrow().get(i as u32);
            entry.set_point(copy.point.as_str());
            entry.set_end(copy.end);
            entry.set_epoch(copy.epoch);
            entry.set_crc(copy.crc);
        }
        let response = request
            .send()
            .promise
            .await
            .map_err(|e| self.failed("offer", e))?;
        let verdicts = response
            .get()
            .and_then(|r| r.get_verdicts())
            .map_err(|e| self.failed("offer", e))?;
        if verdicts.len() as usize != copies.len() {
            return Err(LinkError::Answer {
                call: "offer",
                peer: self.name.clone(),
                detail: format!("{} verdicts to {} offers", verdicts.len(), copies.len()),
            });
        }
        let mut answers = Vec::with_capacity(copies.len());
        for verdict in verdicts.iter() {
            let verdict = verdict.map_err(|e| LinkError::Answer {
                call: "offer",
                peer: self.name.clone(),
                detail: format!("unknown verdict {}", e.0),
            })?;
            answers.push(match verdict {
                Verdict::Wait => Answer::Wait,
                Verdict::Send => Answer::Send,
                Verdict::Taken => Answer::Taken,
                Verdict::Diverged => Answer::Diverged,
            });
        }
        Ok(answers)
    }

    /// Asks the destination to make what it holds of `point` durable before the fence.
    pub(super) async fn prepare(&self, local: &str, point: &PointId) -> Result<(), LinkError> {
        let mut request = self.member.prepare_request();
        request.get().set_from(local);
        request.get().set_point(point.as_str());
        request
            .send()
            .promise
            .await
            .map_err(|e| self.failed("prepare", e))?;
        Ok(())
    }

    /// Tells the destination that the handover of `point` is given up.
    pub(super) async fn cancel(&self, local: &str, point: &PointId) -> Result<(), LinkError> {
        let mut request = self.member.cancel_request();
        request.get().set_from(local);
        request.get().set_point(point.as_str());
        request
            .send()
            .promise
            .await
            .map_err(|e| self.failed("cancel", e))?;
        Ok(())
    }

    /// A failed call on this peer.
    pub(super) fn failed(&self, call: &'static str, error: capnp::Error) -> LinkError {
        LinkError::call(call, &self.name, error)
    }

    /// Waits until the destination confirmed `point` up to `wanted(end here)`; gives up when
    /// its lag has not shrunk for `stall`.
    pub(super) async fn catch_up(
        &self,
        context: &Context,
        point: &PointId,
        lag: u64,
        stall: Duration,
    ) -> Result<(), MoveError> {
        let mut changes = self.progress.changes();
        let mut best = u64::MAX;
        let mut since = Instant::now();
        loop {
            let end = context.store.metadata(point).await?.end;
            let confirmed = self.progress.confirmed_end(&self.name, point);
            let behind = end.saturating_sub(confirmed);
            if behind <= lag {
                return Ok(());
            }
            if behind < best {
                (best, since) = (behind, Instant::now());
            } else if since.elapsed() > stall {
                let hint = match context.services.config.reshard.max_bytes_per_sec {
                    0 => String::new(),
                    rate => format!(
                        " (reshard.max_bytes_per_sec = {rate}: is the point written faster?)"
                    ),
                };
                return Err(MoveError::Stalled {
                    point: point.clone(),
                    to: self.name.clone(),
                    confirmed,
                    end,
                    stall,
                    hint,
                });
            }
            if self.changes.is_closed() {
                return Err(self.stopped().into());
            }
            let _ = tokio::time::timeout(Duration::from_millis(200), changes.changed()).await;
        }
    }

    /// The replicator that feeds this peer ended.
    pub(super) fn stopped(&self) -> LinkError {
        LinkError::ReplicatorStopped {
            peer: self.name.clone(),
        }
    }
}
