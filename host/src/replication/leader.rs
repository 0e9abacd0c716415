//! The leader side of the replication port: followers dial in, are authorized (`replicate`),
//! and each gets a [`Replicator`] that pushes what the follower lacks, then every new append.
//! The same port serves the resharding calls between primaries (handovers, offers).
//!
//! A follower's replicator is supervised: when it ends for any reason but the end of its
//! session (a failed push, a panic), this node closes the follower's connection, so the
//! follower reconnects and a new replicator starts; a session is never left connected to a
//! replicator that is gone.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use capnp_rpc::rpc_twoparty_capnp::Side;
use capnp_rpc::{RpcSystem, twoparty};
use futures::StreamExt;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::compat::{TokioAsyncReadCompatExt, TokioAsyncWriteCompatExt};
use tokio_util::sync::CancellationToken;

use super::error::{FollowRefusal, HandoverError, wire};
use super::replication_capnp::{Verdict, leader, session};
use super::replicator::{Ended, Held, Replicator, supervised};
use super::{
    COMMIT_MARKS, Context, Durability, EPOCH_CUTS, OLDEST_PROTOCOL, PROTOCOL, handover, takeover,
};
use crate::access::Action;
use crate::controller::Topology;
use crate::metrics;
use crate::net::PeerInfo;
use crate::net::check_identity;
use crate::point::ownership::FIRST_EPOCH;
use crate::point::{PointId, SealedAt};
use crate::service::Spawner;

/// Accepts followers until the replication subsystem stops.
pub(crate) async fn serve(
    context: Rc<Context>,
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    spawner: &Spawner,
) {
    let shutdown = spawner.token().clone();
    let offers = Rc::new(RefCell::new(takeover::Offers::default()));
    let mut incoming = crate::net::accept(
        listener,
        tls,
        crate::net::ClientCertificates::Required,
        spawner,
        "replication",
        None,
    );
    while let Some(connection) = incoming.next().await {
        let connection = match connection {
            Ok(connection) => connection,
            Err(error) => {
                tracing::warn!(%error, "replication connection failed");
                continue;
            }
        };
        let (io, peer, _uncapped) = connection.into_parts();
        let (reader, writer) = tokio::io::split(io);
        let network = twoparty::VatNetwork::new(
            reader.compat(),
            writer.compat_write(),
            Side::Server,
            super::reader_options(),
        );
        let connection = CancellationToken::new();
        let service = LeaderService {
            context: context.clone(),
            peer: peer.clone(),
            shutdown: shutdown.clone(),
            connection: connection.clone(),
            offers: offers.clone(),
        };
        let client: leader::Client = capnp_rpc::new_client(service);
        let rpc = RpcSystem::new(Box::new(network), Some(client.client));
        tokio::task::spawn_local(async move {
            tokio::select! {
                ended = rpc => if let Err(error) = ended {
                    tracing::info!(peer = %peer.addr, %error, "replication connection ended");
                },
                // Dropping the RPC system closes the connection.
                () = connection.cancelled() => {
                    tracing::warn!(peer = %peer.addr, "closed a replication connection whose replicator ended");
                }
            }
        });
    }
}

struct LeaderService {
    context: Rc<Context>,
    peer: PeerInfo,
    shutdown: CancellationToken,
    /// Closes this connection (a follower's replicator ended on its own).
    connection: CancellationToken,
    /// Copies of forgotten members' points offered to this node (shared by every connection).
    offers: Rc<RefCell<takeover::Offers>>,
}

impl LeaderService {
    /// A handover call from `from`: the connection must be allowed to `replicate` and, with
    /// TLS, its certificate must name `from`.
    async fn authorize_member(&self, from: &str) -> Result<(), capnp::Error> {
        self.authorize_peer().await?;
        let tls = self.context.services.config.tls.is_some();
        if let Err(reason) = check_identity(&self.peer.subject, from, tls) {
            ::metrics::counter!(metrics::REPLICATION_REFUSED).increment(1);
            tracing::warn!(subject = %self.peer.subject, peer = %self.peer.addr, %reason, "handover refused");
            return Err(capnp::Error::failed(reason.to_string()));
        }
        Ok(())
    }

    /// A resharding call: the connection must be allowed to `replicate`, to a primary.
    async fn authorize_peer(&self) -> Result<(), capnp::Error> {
        let context = &self.context;
        let refused = context
            .services
            .access
            .authorize(&self.peer, Action::Replicate, "")
            .await;
        if let Err(reason) = refused {
            ::metrics::counter!(metrics::REPLICATION_REFUSED).increment(1);
            tracing::warn!(subject = %self.peer.subject, peer = %self.peer.addr, %reason, "handover refused");
            return Err(capnp::Error::failed(reason.to_string()));
        }
        if !context.services.config.role.is_primary() {
            return Err(capnp::Error::failed(format!(
                "node {} is a {}: only primaries take points over",
                context.services.config.node_name,
                context.services.config.role.as_str()
            )));
        }
        Ok(())
    }
}

/// The point named in a handover call.
fn point_of(text: capnp::text::Reader<'_>) -> Result<PointId, capnp::Error> {
    PointId::new(text.to_str()?.to_owned())
        .map_err(|e| capnp::Error::failed(format!("bad point id: {e}")))
}

impl leader::Server for LeaderService {
    async fn receive(
        self: Rc<Self>,
        params: leader::ReceiveParams,
        mut results: leader::ReceiveResults,
    ) -> Result<(), capnp::Error> {
        let from = params.get()?.get_from()?.to_str()?.to_owned();
        self.authorize_member(&from).await?;
        tracing::info!(%from, "receiving handovers");
        let sink =
            super::follower::receiver(self.context.clone(), Some(from), self.shutdown.clone());
        results.get().set_sink(sink);
        Ok(())
    }

    async fn handover(
        self: Rc<Self>,
        params: leader::HandoverParams,
        mut results: leader::HandoverResults,
    ) -> Result<(), capnp::Error> {
        let params = params.get()?;
        let from = params.get_from()?.to_str()?.to_owned();
        self.authorize_member(&from).await?;
        let point = point_of(params.get_point()?)?;
        let end = handover::begin(&self.context.store, &from, &point, params.get_epoch())
            .await
            .map_err(wire)?;
        results.get().set_end(end);
        Ok(())
    }

    async fn seal(
        self: Rc<Self>,
        params: leader::SealParams,
        mut results: leader::SealResults,
    ) -> Result<(), capnp::Error> {
        let params = params.get()?;
        let from = params.get_from()?.to_str()?.to_owned();
        self.authorize_member(&from).await?;
        let point = point_of(params.get_point()?)?;
        let context = &self.context;
        let leader = context.topology.borrow().writer(&from).to_owned();
        if leader != from {
            let deposed = HandoverError::SenderDeposed {
                point,
                from,
                leader,
            };
            tracing::warn!(%deposed, "handover refused");
            return Err(wire(deposed));
        }
        let ring_epoch = context.membership.borrow().ring.epoch();
        let sealed = handover::seal(
            &context.store,
            &context.services.config.node_name,
            &from,
            &point,
            SealedAt {
                end: params.get_end(),
                crc: params.get_crc(),
            },
            ring_epoch,
        )
        .await
        .map_err(wire)?;
        let mut outcome = results.get().init_outcome();
        match sealed {
            handover::Sealed::Committed(epoch) => outcome.set_committed(epoch),
            handover::Sealed::Refused(reason) => outcome.set_refused(reason.to_string()),
        }
        Ok(())
    }

    async fn settled(
        self: Rc<Self>,
        params: leader::SettledParams,
        mut results: leader::SettledResults,
    ) -> Result<(), capnp::Error> {
        self.authorize_peer().await?;
        let point = point_of(params.get()?.get_point()?)?;
        let context = &self.context;
        let needed = match (
            context.services.config.role,
            context.services.config.replication.ack,
        ) {
            (crate::config::Role::Leader, crate::config::Ack::Replicas(replicas)) => {
                Some(replicas.max(1) as usize)
            }
            (crate::config::Role::Leader, crate::config::Ack::Local) => Some(1),
            _ => None,
        };
        let settled = handover::settled(&context.store, &context.progress, needed, &point)
            .await
            .map_err(wire)?;
        let mut results = results.get();
        results.set_epoch(settled.epoch);
        results.set_end(settled.end);
        results.set_replicated(settled.replicated);
        Ok(())
    }

    async fn prepare(
        self: Rc<Self>,
        params: leader::PrepareParams,
        _: leader::PrepareResults,
    ) -> Result<(), capnp::Error> {
        let params = params.get()?;
        let from = params.get_from()?.to_str()?.to_owned();
        self.authorize_member(&from).await?;
        let point = point_of(params.get_point()?)?;
        handover::prepare(&self.context.store, &from, &point)
            .await
            .map_err(wire)
    }

    async fn cancel(
        self: Rc<Self>,
        params: leader::CancelParams,
        _: leader::CancelResults,
    ) -> Result<(), capnp::Error> {
        let params = params.get()?;
        let from = params.get_from()?.to_str()?.to_owned();
        self.authorize_member(&from).await?;
        let point = point_of(params.get_point()?)?;
        handover::cancel(&self.context.store, &from, &point)
            .await
            .map_err(wire)
    }

    async fn offer(
        self: Rc<Self>,
        params: leader::OfferParams,
        mut results: leader::OfferResults,
    ) -> Result<(), capnp::Error> {
        let params = params.get()?;
        let from = params.get_from()?.to_str()?.to_owned();
        self.authorize_member(&from).await?;
        let forgotten = params.get_forgotten()?.to_str()?.to_owned();
        let mut copies = Vec::new();
        for copy in params.get_copies()? {
            copies.push(takeover::Copy {
                point: point_of(copy.get_point()?)?,
                end: copy.get_end(),
                epoch: copy.get_epoch(),
                crc: copy.get_crc(),
            });
        }
        let mut verdicts = Vec::with_capacity(copies.len());
        for copy in copies {
            let verdict = takeover::offer(&self.context, &self.offers, &from, &forgotten, copy)
                .await
                .map_err(wire)?;
            verdicts.push(match verdict {
                takeover::Verdict::Wait => Verdict::Wait,
                takeover::Verdict::Send => Verdict::Send,
                takeover::Verdict::Taken => Verdict::Taken,
                takeover::Verdict::Diverged => Verdict::Diverged,
            });
        }
        let mut list = results.get().init_verdicts(verdicts.len() as u32);
        for (i, verdict) in verdicts.into_iter().enumerate() {
            list.set(i as u32, verdict);
        }
        Ok(())
    }

    async fn identify(
        self: Rc<Self>,
        _: leader::IdentifyParams,
        mut results: leader::IdentifyResults,
    ) -> Result<(), capnp::Error> {
        results
            .get()
            .set_name(&self.context.services.config.node_name);
        results
            .get()
            .set_rpc_address(self.context.services.rpc_addr.to_string());
        Ok(())
    }

    async fn follow(
        self: Rc<Self>,
        params: leader::FollowParams,
        mut results: leader::FollowResults,
    ) -> Result<(), capnp::Error> {
        let context = &self.context;
        let peer = &self.peer;
        let params = params.get()?;
        let hello = params.get_hello()?;
        let follower = hello.get_follower()?.to_str()?.to_owned();
        let protocol = hello.get_protocol();
        let refused = async {
            context
                .services
                .access
                .authorize(peer, Action::Replicate, "")
                .await?;
            check_identity(
                &peer.subject,
                &follower,
                context.services.config.tls.is_some(),
            )?;
            if !(OLDEST_PROTOCOL..=PROTOCOL).contains(&protocol) {
                return Err(FollowRefusal::Protocol {
                    follower: crate::text::bounded(&follower),
                    theirs: protocol,
                    ours: PROTOCOL,
                });
            }
            // A forgotten member leads nobody: its followers' copies were taken over.
            let membership = context.membership.borrow();
            match membership
                .ring
                .members
                .get(&context.services.config.node_name)
            {
                Some(record) if record.lifecycle == crate::cluster::Lifecycle::Forgotten => {
                    Err(FollowRefusal::Forgotten {
                        node: context.services.config.node_name.clone(),
                    })
                }
                _ => Ok(()),
            }
        }
        .await;
        if let Err(reason) = refused {
            ::metrics::counter!(metrics::REPLICATION_REFUSED).increment(1);
            tracing::warn!(subject = %peer.subject, peer = %peer.addr, %reason, "follower refused");
            return Err(capnp::Error::failed(reason.to_string()));
        }
        let local = &context.services.config.node_name;
        committed_state_known(context, &self.shutdown).await;
        let leader_epoch = leader_epoch(context, local).map_err(|reason| {
            tracing::warn!(%follower, %reason, "follower refused");
            capnp::Error::failed(reason.to_string())
        })?;
        let rpc_address = hello.get_rpc_address()?.to_str()?.to_owned();
        let mut offers = HashMap::new();
        read_offers(&mut offers, hello.get_offers()?, protocol)?;
        let pages = hello.get_pages();
        let sink = params.get_sink()?;
        let stop = self.shutdown.child_token();
        let durable = hello.get_durable();
        tracing::info!(%follower, %rpc_address, subject = %peer.subject, points = offers.len(), pages, durable, leader_epoch, "follower connected");
        // The follower's copies are reconciled once they are all known: at once, or with
        // pages, once the last one arrived (`SessionService::offer`).
        let (done, all_offers) = tokio::sync::oneshot::channel();
        let paging = match pages {
            true => Some(Paging {
                offers,
                protocol,
                done,
            }),
            false => {
                let _ = done.send(offers);
                None
            }
        };
        let durability = match durable {
            true => Durability::Synced,
            false => Durability::Unsynced,
        };
        let replicator = Replicator::new(
            context.clone(),
            follower.clone(),
            rpc_address,
            durability,
            (sink, leader_epoch, protocol >= COMMIT_MARKS),
            stop.clone(),
        );
        let connection = self.connection.clone();
        let waiting = stop.clone();
        tokio::task::spawn_local(async move {
            let offers = tokio::select! {
                offers = all_offers => offers.ok(),
                _ = waiting.cancelled() => None,
            };
            // The session ended before its last page: nothing to reconcile.
            let Some(offers) = offers else { return };
            match supervised(&follower, replicator.run(offers)).await {
                Some(Ended::Stopped) => {}
                Some(Ended::Failed(error)) => {
                    tracing::warn!(%follower, %error, "follower session failed; closing its connection so that it reconnects");
                    connection.cancel();
                }
                None => connection.cancel(),
            }
        });
        let session = SessionService {
            leader: context.services.config.node_name.clone(),
            stop,
            paging: RefCell::new(paging),
        };
        results.get().set_session(capnp_rpc::new_client(session));
        results.get().set_leader_epoch(leader_epoch);
        Ok(())
    }
}

/// Waits until this node has read the controller's committed state as far as its own group,
/// or `shutdown`: a leader that just started, or whose controller has not formed yet (a ring
/// waiting for its founders), would otherwise answer epoch 0, and a follower that knows its
/// group's epoch would refuse it. Every primary's controller forms (a lone one by itself). A
/// member back from an unclean stop also waits for its first session (`Context::session`).
async fn committed_state_known(context: &Context, shutdown: &CancellationToken) {
    let local = &context.services.config.node_name;
    let known = |topology: &Topology| match topology.ring.members.get(local) {
        // An active primary has a group (led by it, or by the member that replaced it).
        Some(member) => {
            member.lifecycle != crate::cluster::Lifecycle::Active
                || topology.groups.contains_key(local)
                || topology.leads(local)
        }
        // Not in the ring (a follower, a primary whose join is not committed): once it is
        // formed (the first entries the controller applies may be its own, before any ring).
        None => !topology.ring.members.is_empty(),
    };
    let mut topology = context.topology.clone();
    tokio::select! {
        _ = topology.wait_for(|topology| known(topology)) => {}
        _ = shutdown.cancelled() => return,
    }
    // Back from an unclean stop: once the controller decided `Command::Unclean` (this member
    // heartbeats only after), and this node's view holds it (a grant waits for that).
    if let Some(lease) = &context.unclean_session {
        tokio::select! {
            () = lease.first_granted() => {}
            _ = shutdown.cancelled() => {}
        }
    }
}

/// The epoch at which this node leads the group its followers copy, as the controller's
/// committed state says: the group it leads, else 0 for a primary the controller has no group
/// for (a cluster without one, or not formed yet). Refused for a node that leads nothing: a
/// follower or balancer no failover named, and a primary whose slot another member leads now (a
/// deposed leader has no followers; its own follows the new one).
fn leader_epoch(context: &Context, local: &str) -> Result<u64, FollowRefusal> {
    let topology = context.topology.borrow();
    if let Some((slot, group)) = topology.led_by(local).next() {
        if group.leader_unclean {
            return Err(FollowRefusal::SteppingDown {
                node: local.to_owned(),
                slot: slot.to_owned(),
            });
        }
        return Ok(group.leader_epoch);
    }
    let role = context.services.config.role;
    if role != crate::config::Role::Leader {
        return Err(FollowRefusal::LeadsNothing {
            node: local.to_owned(),
            role: role.as_str(),
        });
    }
    match topology.groups.get(local) {
        Some(group) => Err(FollowRefusal::Deposed {
            node: local.to_owned(),
            leader: group.leader.clone(),
            leader_epoch: group.leader_epoch,
        }),
        None => Ok(0),
    }
}

/// Ends the replicator when the follower drops its session (or the connection goes).
struct SessionService {
    leader: String,
    stop: CancellationToken,
    /// The follower's offers so far, while it sends them in pages.
    paging: RefCell<Option<Paging>>,
}

/// A follower's offers arriving in pages (`Hello.pages`, `Session.offer`).
struct Paging {
    offers: HashMap<String, Held>,
    /// The follower's protocol version.
    protocol: u16,
    /// Where they all go once the last page arrived: the session's replicator.
    done: tokio::sync::oneshot::Sender<HashMap<String, Held>>,
}

/// Adds a follower's `list` of offers to `offers`.
fn read_offers(
    offers: &mut HashMap<String, Held>,
    list: capnp::struct_list::Reader<'_, super::replication_capnp::offer::Owned>,
    protocol: u16,
) -> Result<(), capnp::Error> {
    for offer in list {
        // An offer for an id that is not a valid point id can only be removed.
        let held = Held {
            end: offer.get_end(),
            epoch: offer.get_epoch().max(FIRST_EPOCH),
            crc: offer.get_crc(),
            leader_epoch: (protocol >= EPOCH_CUTS).then(|| offer.get_leader_epoch()),
            committed: offer.get_committed(),
        };
        offers.insert(offer.get_point()?.to_str()?.to_owned(), held);
    }
    Ok(())
}

impl Drop for SessionService {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl session::Server for SessionService {
    async fn leader(
        self: Rc<Self>,
        _: session::LeaderParams,
        mut results: session::LeaderResults,
    ) -> Result<(), capnp::Error> {
        results.get().set_name(&self.leader);
        Ok(())
    }

    async fn offer(
        self: Rc<Self>,
        params: session::OfferParams,
        _: session::OfferResults,
    ) -> Result<(), capnp::Error> {
        let params = params.get()?;
        let mut paging = self.paging.borrow_mut();
        let Some(pages) = paging.as_mut() else {
            return Err(capnp::Error::failed(
                "no offers are awaited: the hello said no pages follow, or the last one came"
                    .into(),
            ));
        };
        read_offers(&mut pages.offers, params.get_offers()?, pages.protocol)?;
        if params.get_last() {
            let pages = paging.take().expect("matched above");
            // The replicator is gone only if the session stopped.
            let _ = pages.done.send(pages.offers);
        }
        Ok(())
    }
}
