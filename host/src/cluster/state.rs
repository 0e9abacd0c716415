//! The membership loop's state between gossip rounds, and its decisions as plain methods with
//! no I/O but saving the ring: reconciling the live adverts, and, until the controller has
//! committed a ring, merging the rings heard of and forming the founders' ring (the controller
//! imports it: `docs/controller.md`); then the [`Membership`] it publishes.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use tokio::time::Instant;

use super::*;

/// What the loop keeps between rounds.
pub(super) struct State {
    pub(super) local: Local,
    pub(super) generation: u64,
    pub(super) gossip_addr: SocketAddr,
    pub(super) expect: usize,
    /// How long the candidate founders must stay the same before this node proposes them.
    pub(super) settle: Duration,
    pub(super) ring: Ring,
    pub(super) ring_path: PathBuf,
    /// The candidate founders and since when they have not changed.
    pub(super) candidates: Option<(BTreeSet<String>, Instant)>,
    /// The founders this node proposes (their formation id).
    pub(super) proposal: Option<String>,
    pub(super) conflict: Option<String>,
    pub(super) leader: Option<String>,
    /// The join this member announces it has handed over.
    pub(super) handed: Option<Handed>,
    /// The points this member announces it is handing over.
    pub(super) moving: u32,
    /// The members live in the last round (their ring records are theirs to announce).
    pub(super) live: BTreeSet<String>,
    /// Whether the ring is the controller's (committed): gossip then no longer changes it.
    pub(super) committed: bool,
}

impl State {
    pub(super) fn member(&self) -> Member {
        let lifecycle = if !self.local.role.is_primary() {
            Lifecycle::Active
        } else {
            self.ring
                .members
                .get(&self.local.name)
                .map_or(Lifecycle::Joining, |m| m.lifecycle)
        };
        Member {
            name: self.local.name.clone(),
            generation: self.generation,
            gossip_addr: self.gossip_addr,
            role: self.local.role,
            lifecycle,
            rpc_addr: self.local.rpc_addr.to_string(),
            replication_addr: self.local.replication_addr.to_string(),
            http_addr: self.local.http_addr.to_string(),
            virtual_nodes: self.local.virtual_nodes,
            tags: self.local.tags.clone(),
            leader: self.leader.clone(),
            handed: self.handed.clone(),
            moving: self.moving,
        }
    }

    pub(super) fn advert(&self) -> Advert {
        let members = self
            .ring
            .members
            .iter()
            .filter(|(name, _)| **name == self.local.name || !self.live.contains(*name))
            .map(|(name, record)| (name.clone(), record.clone()))
            .collect();
        Advert {
            member: self.member(),
            ring: Ring {
                id: self.ring.id.clone(),
                founders: self.ring.founders.clone(),
                members,
            },
            proposal: self.proposal.clone(),
        }
    }

    pub(super) fn ring_member(&self, member: &Member) -> RingMember {
        RingMember {
            lifecycle: Lifecycle::Joining,
            role: member.role,
            rpc_addr: member.rpc_addr.clone(),
            replication_addr: member.replication_addr.clone(),
            virtual_nodes: member.virtual_nodes,
            tags: member.tags.clone(),
            version: 1,
        }
    }

    /// One step of membership: merge the rings of every `known` node (live or not), form the
    /// ring with `live` primaries or join it, keep this member's record current. Returns whether
    /// the ring changed.
    pub(super) fn reconcile(&mut self, live: &[Advert], known: &[Advert], now: Instant) -> bool {
        let before = self.ring.clone();
        self.live = live.iter().map(|a| a.member.name.clone()).collect();
        if self.committed {
            return false;
        }
        let others: Vec<&Advert> = live
            .iter()
            .filter(|a| a.member.name != self.local.name)
            .collect();
        let heard: Vec<&Advert> = known
            .iter()
            .filter(|a| a.member.name != self.local.name)
            .collect();
        self.merge_rings(&heard);
        if self.local.role.is_primary() {
            if self.ring.is_formed() {
                self.proposal = None;
                self.candidates = None;
                self.keep_own_record();
            } else {
                self.form(&others, now);
            }
        }
        self.ring != before
    }

    pub(super) fn merge_rings(&mut self, others: &[&Advert]) {
        let mut conflict = None;
        if !self.ring.is_formed() {
            // Adopt the ring of the cluster; if its members disagree, the largest (then the
            // smallest id), and say so.
            let mut rings: Vec<&Ring> = others
                .iter()
                .map(|a| &a.ring)
                .filter(|r| r.is_formed())
                .collect();
            rings.sort_by(|a, b| b.members.len().cmp(&a.members.len()).then(a.id.cmp(&b.id)));
            rings.dedup_by(|a, b| a.id == b.id);
            if let Some(first) = rings.first() {
                self.ring = Ring {
                    id: first.id.clone(),
                    founders: first.founders.clone(),
                    members: BTreeMap::new(),
                };
                tracing::info!(ring = %first.id, "adopting the cluster's ring");
            }
            if rings.len() > 1 {
                conflict = Some(format!(
                    "the live members hold {} different rings ({})",
                    rings.len(),
                    rings
                        .iter()
                        .map(|r| r.id.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
        }
        for advert in others {
            if !advert.ring.is_formed() || !self.ring.is_formed() {
                continue;
            }
            if let Err(error) = self.ring.merge(&advert.ring, &advert.member.name) {
                conflict = Some(error.to_string());
            }
        }
        if conflict != self.conflict {
            if let Some(conflict) = &conflict {
                tracing::error!(%conflict, "ring conflict: this node keeps its own ring");
            }
            self.conflict = conflict;
        }
    }

    /// Takes the ring the controller committed as this node's ring: from now on only the
    /// controller changes it. Returns whether it changed.
    pub(super) fn adopt_committed(&mut self, ring: &Ring) -> bool {
        self.committed = true;
        self.conflict = None;
        if self.ring == *ring {
            return false;
        }
        self.ring = ring.clone();
        true
    }

    /// Adds this primary to the ring as `joining`, or updates its addresses in its record.
    pub(super) fn keep_own_record(&mut self) {
        let me = self.member();
        match self.ring.members.get_mut(&self.local.name) {
            None if self.ring.founders.contains(&me.name) => {
                // A founder that adopted the ring before it formed it itself.
                let record = ring::founding_record(self.ring_member(&me));
                self.ring.members.insert(me.name.clone(), record);
            }
            None => {
                let record = self.ring_member(&me);
                tracing::info!(ring = %self.ring.id, "joining the ring; this node owns nothing until its ranges are handed over");
                self.ring.members.insert(me.name.clone(), record);
            }
            Some(record) => {
                if record.virtual_nodes != me.virtual_nodes || record.tags != me.tags {
                    tracing::warn!(
                        ring_virtual_nodes = record.virtual_nodes,
                        "virtual_node_count and tags are fixed when a member enters the ring; the ring's values stay"
                    );
                }
                if record.rpc_addr != me.rpc_addr
                    || record.replication_addr != me.replication_addr
                    || record.role != me.role
                {
                    record.rpc_addr = me.rpc_addr;
                    record.replication_addr = me.replication_addr;
                    record.role = me.role;
                    record.version += 1;
                }
            }
        }
    }

    /// Formation: the live primaries without a ring (this one included) are the candidate
    /// founders; once at least `bootstrap_expect` of them have been the same for the settle
    /// period, this node proposes them, and it forms the ring when every candidate proposes the
    /// same founders.
    pub(super) fn form(&mut self, others: &[&Advert], now: Instant) {
        let mut founders: BTreeMap<String, RingMember> = others
            .iter()
            .filter(|a| a.member.role.is_primary() && !a.ring.is_formed())
            .map(|a| (a.member.name.clone(), self.ring_member(&a.member)))
            .collect();
        let me = self.member();
        founders.insert(me.name.clone(), self.ring_member(&me));
        let names: BTreeSet<String> = founders.keys().cloned().collect();
        if names.len() < self.expect {
            self.candidates = None;
            self.proposal = None;
            return;
        }
        let since = match &self.candidates {
            Some((same, since)) if *same == names => *since,
            _ => now,
        };
        self.candidates = Some((names.clone(), since));
        if now.duration_since(since) < self.settle {
            return;
        }
        let proposal = ring::formation_id(&names);
        let agreed = others
            .iter()
            .filter(|a| names.contains(&a.member.name))
            .all(|a| a.proposal.as_deref() == Some(proposal.as_str()));
        self.proposal = Some(proposal);
        if agreed {
            self.ring = Ring::form(founders);
            tracing::info!(ring = %self.ring.id, founders = ?names, "formed the ring");
        }
    }

    pub(super) fn save_ring(&self) {
        if !self.ring.is_formed() {
            return;
        }
        if let Err(error) = self.ring.save(&self.ring_path) {
            // The ring is still gossiped and kept in memory; the next change tries again.
            tracing::error!(path = %self.ring_path.display(), %error, "cannot save the ring");
        }
    }

    pub(super) fn membership(&self, live: &[Advert]) -> Membership {
        let mut members: BTreeMap<String, Member> = BTreeMap::new();
        for advert in live {
            let member = &advert.member;
            match members.get(&member.name) {
                // A restarted node may briefly appear twice: the newest run counts.
                Some(known) if known.generation >= member.generation => {}
                _ => {
                    members.insert(member.name.clone(), member.clone());
                }
            }
        }
        // This node as it is now, not as its last gossip round said.
        let me = self.member();
        members.insert(me.name.clone(), me);
        Membership {
            local: self.local.name.clone(),
            view: View::new(members),
            ring_version: self.ring.version(),
            ring: self.ring.clone(),
            conflict: self.conflict.clone(),
        }
    }
}
