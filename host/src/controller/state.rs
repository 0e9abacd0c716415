//! The controller's state machine: what the cluster has decided, as one plain value
//! ([`Topology`]) and one deterministic transition ([`Topology::apply`]): the same state and the
//! same entry give the same result on every node, with no clock, no I/O and no randomness. The
//! Raft glue (next) replicates [`Command`]s and calls `apply` on each committed one; this file
//! knows nothing of Raft, so its rules are tested as tables of situations below.
//!
//! What it decides (`docs/controller.md`): the ring (formation, join, drain, forget, and the
//! step that ends each), the announcements that end a join or a takeover, and the replica groups
//! (a primary's slot, its leader, its followers, the leader's epoch). Liveness is not in it:
//! gossip says who is up, and a proposer consults it before proposing (a forget of a live
//! member is refused there), but no decision depends on it.
//!
//! **Epochs** are the log index of the entry that decided them, shifted by the floor an import
//! set (every epoch already written in the stores), so they are unique and only grow across
//! handovers, failovers and upgrades alike.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::command::{Applied, Command, Rejected};
use crate::cluster::change::{Change, Pending, pending};
use crate::cluster::ring::{Ring, RingMember};
use crate::cluster::{Handed, Lifecycle};
use crate::config::Failover;

/// What the cluster has decided. A snapshot is this whole value.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Topology {
    /// The ring as committed. Each member record's `version` is the epoch of the entry that
    /// last changed it.
    pub ring: Ring,
    /// The epoch of the entry that last changed the ring (0 before formation).
    pub ring_epoch: u64,
    /// Replica groups by slot (the primary that owns the slot's range).
    pub groups: BTreeMap<String, Group>,
    /// The committed announcements (`handed`) of the members that made one, by member.
    pub handed: BTreeMap<String, Handed>,
    /// Epochs start above this: the highest epoch the stores held when the cluster was imported
    /// from gossip-decided state (0 for a cluster born with its controller).
    pub epoch_floor: u64,
    /// The index of the last entry applied (rejected entries included).
    pub applied: u64,
}

/// A primary's slot and the nodes that hold its points.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Group {
    /// The member that takes the slot's writes now.
    pub leader: String,
    /// The epoch of the entry that made it the leader.
    pub leader_epoch: u64,
    /// The followers that copy the slot's points.
    pub followers: BTreeSet<String>,
    /// The followers that hold every acknowledged byte of the slot: its leader waits for each of
    /// them before it acknowledges a write. One enters once its leader saw it hold the end of
    /// every point (after the leader started waiting for it), and leaves only by a committed
    /// change (`docs/failover.md`).
    #[serde(default)]
    pub in_sync: BTreeSet<String>,
    /// How the group gets a new leader when its leader is lost, as its leader reported it
    /// (`Command::Failover`).
    #[serde(default = "unreported")]
    pub failover: Failover,
    /// Its leader came back from a stop that was not clean while members of the in-sync set
    /// held every acknowledged byte (`Command::Unclean`): a tail it lost on disk may hold some
    /// of them, so it takes no writes and serves no follower until the controller names one of
    /// those members leader (`election::fences`), or an operator keeps it (`ElectUnclean` of the
    /// leader itself).
    #[serde(default)]
    pub leader_unclean: bool,
}

/// The failover of a group whose leader has not reported its configuration yet.
fn unreported() -> Failover {
    Failover::Manual("its leader has not reported its configuration yet".into())
}

impl Topology {
    /// The epoch an entry at `index` decides.
    pub fn epoch(&self, index: u64) -> u64 {
        self.epoch_floor + index
    }

    /// Applies the committed entry `index` (each index once, in order). Deterministic: the
    /// result depends on the state, the index and the command only.
    pub fn apply(&mut self, index: u64, command: &Command) -> Result<Applied, Rejected> {
        debug_assert!(index > self.applied, "entries are applied once, in order");
        self.applied = index;
        let epoch = self.epoch(index);
        let changed = match command {
            Command::Form { founders } => self.form(founders, epoch)?,
            Command::Import { ring, max_epoch } => self.import(ring, *max_epoch, index)?,
            Command::Join { name, record } => self.join(name, record, epoch)?,
            Command::Addresses {
                name,
                rpc_addr,
                replication_addr,
            } => self.addresses(name, rpc_addr, replication_addr, epoch)?,
            Command::Drain { name } => self.drain(name, epoch)?,
            Command::Step { name, to } => self.step(name, *to, epoch)?,
            Command::Forget { name } => self.forget(name, epoch)?,
            Command::Announce { name, handed } => self.announce(name, handed.as_ref())?,
            Command::Follow { follower, slot } => self.follow(follower, slot)?,
            Command::InSync {
                slot,
                follower,
                leader_epoch,
            } => self.in_sync(slot, follower, *leader_epoch, true)?,
            Command::OutOfSync {
                slot,
                follower,
                leader_epoch,
                ..
            } => self.in_sync(slot, follower, *leader_epoch, false)?,
            Command::Failover {
                slot,
                leader_epoch,
                failover,
            } => self.failover(slot, *leader_epoch, failover)?,
            Command::Fence { member, leaders } => self.fence(member, leaders, epoch)?,
            Command::Transfer {
                slot,
                leader_epoch,
                to,
            } => self.transfer(slot, *leader_epoch, to, epoch)?,
            Command::Unclean { member } => self.unclean(member),
            Command::ElectUnclean { slot, to } => self.elect_unclean(slot, to, epoch)?,
        };
        Ok(if changed {
            Applied::Changed {
                epoch: self.epoch(index),
            }
        } else {
            Applied::Unchanged
        })
    }

    /// Who takes the writes of `slot` (a primary's range): its group's leader, which is the
    /// primary itself unless a failover named another; the primary when it has no group.
    pub fn writer<'a>(&'a self, slot: &'a str) -> &'a str {
        self.groups.get(slot).map_or(slot, |group| &group.leader)
    }

    /// The groups `member` leads, by slot.
    pub fn led_by<'a, 'm>(
        &'a self,
        member: &'m str,
    ) -> impl Iterator<Item = (&'a str, &'a Group)> + use<'a, 'm> {
        let groups = self.groups.iter();
        groups
            .filter(move |(_, group)| group.leader == member)
            .map(|(slot, group)| (slot.as_str(), group))
    }

    /// Whether `member` leads a group.
    pub fn leads(&self, member: &str) -> bool {
        self.led_by(member).next().is_some()
    }

    /// The group `member` leads in another primary's place (a follower, or a primary, the
    /// controller named leader of that slot after a failover), with its slot.
    pub fn led_in_place_of<'a>(&'a self, member: &str) -> Option<(&'a str, &'a Group)> {
        self.led_by(member).find(|(slot, _)| *slot != member)
    }

    /// The group `member` follows, with its slot (a member follows one at most).
    pub fn followed_by(&self, member: &str) -> Option<(&str, &Group)> {
        let mut groups = self.groups.iter();
        groups
            .find(|(_, group)| group.followers.contains(member))
            .map(|(slot, group)| (slot.as_str(), group))
    }

    /// The change of the ring under way, in words, if any: a drain, else the first join (the
    /// order every node sees, `cluster::change::pending`).
    pub fn change_under_way(&self) -> Option<String> {
        pending(&self.ring).map(|pending| pending.change.to_string())
    }

    fn form(
        &mut self,
        founders: &BTreeMap<String, RingMember>,
        epoch: u64,
    ) -> Result<bool, Rejected> {
        if self.ring.is_formed() {
            return Err(Rejected::Formed);
        }
        check_primaries(founders)?;
        self.ring = Ring::form(founders.clone());
        for member in self.ring.members.values_mut() {
            member.version = epoch;
        }
        for name in founders.keys() {
            self.groups.insert(name.clone(), Group::led_by(name, epoch));
        }
        self.ring_epoch = epoch;
        Ok(true)
    }

    fn import(&mut self, ring: &Ring, max_epoch: u64, index: u64) -> Result<bool, Rejected> {
        if self.ring.is_formed() {
            return Err(Rejected::Formed);
        }
        if !ring.is_formed() {
            return Err(Rejected::NotFormed);
        }
        check_primaries(&ring.members)?;
        // Above every epoch the stores hold, and above every record version gossip gave out.
        let versions = ring.members.values().map(|m| m.version);
        self.epoch_floor = versions.fold(max_epoch, u64::max);
        let epoch = self.epoch(index);
        self.ring = ring.clone();
        for (name, member) in &mut self.ring.members {
            member.version = epoch;
            if member.owns_range() {
                self.groups.insert(name.clone(), Group::led_by(name, epoch));
            }
        }
        self.ring_epoch = epoch;
        Ok(true)
    }

    fn join(&mut self, name: &str, record: &RingMember, epoch: u64) -> Result<bool, Rejected> {
        if !self.ring.is_formed() {
            return Err(Rejected::NotFormed);
        }
        // (A retry of a committed join, or a name taken, is answered below.)
        if !self.ring.members.contains_key(name) {
            self.check_every_slot_led_by_its_primary()?;
        }
        if !record.role.is_primary() {
            return Err(Rejected::NotPrimary(name.to_owned()));
        }
        if let Some(present) = self.ring.members.get(name) {
            // The same join again (a proposer's retry after a timeout that committed after all).
            let same = present.lifecycle == Lifecycle::Joining
                && RingMember {
                    lifecycle: Lifecycle::Joining,
                    version: present.version,
                    ..record.clone()
                } == *present;
            if same {
                return Ok(false);
            }
            return Err(Rejected::NameTaken(name.to_owned(), present.lifecycle));
        }
        let record = RingMember {
            lifecycle: Lifecycle::Joining,
            version: epoch,
            ..record.clone()
        };
        self.ring.members.insert(name.to_owned(), record);
        self.ring_epoch = epoch;
        Ok(true)
    }

    fn addresses(
        &mut self,
        name: &str,
        rpc_addr: &str,
        replication_addr: &str,
        epoch: u64,
    ) -> Result<bool, Rejected> {
        let record = self.member_mut(name)?;
        if record.rpc_addr == rpc_addr && record.replication_addr == replication_addr {
            return Ok(false);
        }
        record.rpc_addr = rpc_addr.to_owned();
        record.replication_addr = replication_addr.to_owned();
        record.version = epoch;
        Ok(true)
    }

    fn drain(&mut self, name: &str, epoch: u64) -> Result<bool, Rejected> {
        let from = self.member(name)?.lifecycle;
        match from {
            Lifecycle::Leaving => return Ok(false),
            Lifecycle::Active => {}
            _ => {
                return Err(Rejected::Transition {
                    name: name.to_owned(),
                    from,
                    to: Lifecycle::Leaving,
                });
            }
        }
        // One drain at a time. A drain goes before the joins that wait (`pending`): their
        // handovers are planned again for the ring without the drained member.
        if let Some(Pending {
            change: change @ Change::Drain(_),
            ..
        }) = pending(&self.ring)
        {
            return Err(Rejected::ChangeUnderWay(change.to_string()));
        }
        if self.ring.owners().all(|(owner, _)| owner == name) {
            return Err(Rejected::LastOwner(name.to_owned()));
        }
        self.check_every_slot_led_by_its_primary()?;
        self.set_lifecycle(name, Lifecycle::Leaving, epoch);
        Ok(true)
    }

    /// A ring change hands points over from their primaries: refused while a failover or a
    /// transfer has another member lead a slot (its primary no longer takes the slot's writes,
    /// and the leader is no owner in the ring).
    fn check_every_slot_led_by_its_primary(&self) -> Result<(), Rejected> {
        match self
            .groups
            .iter()
            .find(|(slot, group)| group.leader != **slot)
        {
            Some((slot, group)) => Err(Rejected::LedElsewhere {
                slot: slot.clone(),
                leader: group.leader.clone(),
            }),
            None => Ok(()),
        }
    }

    fn step(&mut self, name: &str, to: Lifecycle, epoch: u64) -> Result<bool, Rejected> {
        let from = self.member(name)?.lifecycle;
        if from == to {
            return Ok(false);
        }
        let refused = || Rejected::Transition {
            name: name.to_owned(),
            from,
            to,
        };
        match (from, to) {
            (Lifecycle::Joining, Lifecycle::Active) => self.check_handed(name)?,
            (Lifecycle::Leaving, Lifecycle::Left) => {}
            _ => return Err(refused()),
        }
        self.set_lifecycle(name, to, epoch);
        Ok(true)
    }

    /// `joining` is the pending change (`cluster::change::pending`: drains first, then the
    /// joining member whose name sorts first), and every owner of the ring has announced that
    /// it handed it its points for the ring the join leads to.
    fn check_handed(&self, joining: &str) -> Result<(), Rejected> {
        let version = match pending(&self.ring) {
            Some(Pending {
                change: Change::Join(first),
                target,
            }) if first == joining => target.version(),
            other => {
                let change = other.map(|pending| pending.change.to_string());
                return Err(Rejected::ChangeUnderWay(change.unwrap_or_default()));
            }
        };
        for (owner, _) in self.ring.owners() {
            let done = matches!(
                self.handed.get(owner),
                Some(Handed::Join { joining: j, version: v }) if j == joining && *v == version
            );
            if !done {
                return Err(Rejected::NotHanded {
                    joining: joining.to_owned(),
                    owner: owner.clone(),
                });
            }
        }
        Ok(())
    }

    fn forget(&mut self, name: &str, epoch: u64) -> Result<bool, Rejected> {
        let member = self.member(name)?;
        if member.lifecycle == Lifecycle::Forgotten {
            return Ok(false);
        }
        // A failover named another leader for its slot, which holds every acknowledged byte
        // and takes the writes: forgetting the slot's primary would end that group.
        if let Some(group) = self.groups.get(name).filter(|g| g.leader != name) {
            return Err(Rejected::FailedOver {
                name: name.to_owned(),
                leader: group.leader.clone(),
            });
        }
        if member.owns_range() && self.ring.owners().all(|(owner, _)| owner == name) {
            return Err(Rejected::LastOwner(name.to_owned()));
        }
        self.set_lifecycle(name, Lifecycle::Forgotten, epoch);
        self.groups.remove(name);
        Ok(true)
    }

    fn announce(&mut self, name: &str, handed: Option<&Handed>) -> Result<bool, Rejected> {
        if self.handed.get(name) == handed {
            return Ok(false);
        }
        match handed {
            Some(handed) => self.handed.insert(name.to_owned(), handed.clone()),
            None => self.handed.remove(name),
        };
        Ok(true)
    }

    fn follow(&mut self, follower: &str, slot: &str) -> Result<bool, Rejected> {
        let refused = |reason: &str| Rejected::BadFollow {
            follower: follower.to_owned(),
            slot: slot.to_owned(),
            reason: reason.to_owned(),
        };
        if self.ring.members.contains_key(follower) {
            return Err(refused("a member of the ring holds a slot of its own"));
        }
        let Some(group) = self.groups.get_mut(slot) else {
            return Err(refused("no such slot"));
        };
        if group.followers.contains(follower) {
            return Ok(false);
        }
        // A follower copies one slot: it leaves any other (and that one's in-sync set).
        for other in self.groups.values_mut() {
            other.followers.remove(follower);
            other.in_sync.remove(follower);
        }
        self.groups
            .get_mut(slot)
            .expect("checked above")
            .followers
            .insert(follower.to_owned());
        Ok(true)
    }

    /// `follower` enters (`enter`) or leaves the in-sync set of `slot`, asked by the leader of
    /// `leader_epoch`: only the group's current leader changes it.
    fn in_sync(
        &mut self,
        slot: &str,
        follower: &str,
        leader_epoch: u64,
        enter: bool,
    ) -> Result<bool, Rejected> {
        let group = self.led_at(slot, leader_epoch)?;
        if group.leader_unclean {
            return Err(Rejected::LeaderUnclean(slot.to_owned()));
        }
        if !enter {
            return Ok(group.in_sync.remove(follower));
        }
        if !group.followers.contains(follower) {
            return Err(Rejected::NotFollowing {
                follower: follower.to_owned(),
                slot: slot.to_owned(),
            });
        }
        Ok(group.in_sync.insert(follower.to_owned()))
    }

    /// An operator names `to`, a follower of `slot`'s group, its leader outside the in-sync
    /// set (or keeps its leader back from an unclean stop). The set is emptied: its members may
    /// hold bytes `to` lacks, and enter again once seen caught up with `to`.
    fn elect_unclean(&mut self, slot: &str, to: &str, epoch: u64) -> Result<bool, Rejected> {
        let group = self
            .groups
            .get_mut(slot)
            .ok_or_else(|| Rejected::NoGroup(slot.to_owned()))?;
        if group.leader == to {
            // The operator keeps a leader back from an unclean stop: it takes writes again,
            // and the others enter again once seen caught up with it.
            if !std::mem::take(&mut group.leader_unclean) {
                return Ok(false);
            }
            group.in_sync.clear();
            return Ok(true);
        }
        if !group.followers.contains(to) {
            return Err(Rejected::NotFollowing {
                follower: to.to_owned(),
                slot: slot.to_owned(),
            });
        }
        group.hand_to(to, epoch);
        group.in_sync.clear();
        Ok(true)
    }

    /// `member` started again after a stop that was not clean: it leaves every in-sync set.
    /// Anyone may ask it (the member itself does): a smaller set keeps the invariant, since
    /// every member left in it still holds every acknowledged byte. Each group it leads that
    /// fails over by itself and has an in-sync member is marked `leader_unclean`: that member
    /// may hold bytes the leader lost, and the controller names it leader.
    fn unclean(&mut self, member: &str) -> bool {
        let mut changed = false;
        for group in self.groups.values_mut() {
            changed |= group.in_sync.remove(member);
            let steps_down = group.leader == member
                && !group.leader_unclean
                && !group.in_sync.is_empty()
                && !matches!(group.failover, Failover::Manual(_));
            if steps_down {
                group.leader_unclean = true;
                changed = true;
            }
        }
        changed
    }

    /// The leader of `slot` at `leader_epoch` reports how its group fails over.
    fn failover(
        &mut self,
        slot: &str,
        leader_epoch: u64,
        failover: &Failover,
    ) -> Result<bool, Rejected> {
        let group = self.led_at(slot, leader_epoch)?;
        if group.failover == *failover {
            return Ok(false);
        }
        group.failover = failover.clone();
        Ok(true)
    }

    /// Fences `member`: each slot in `leaders` that it leads gets the leader named there, at
    /// `epoch`. Checked whole before anything changes. A slot led by the one named already is
    /// a retry of a committed fence, and is left as it is.
    fn fence(
        &mut self,
        member: &str,
        leaders: &BTreeMap<String, String>,
        epoch: u64,
    ) -> Result<bool, Rejected> {
        for (slot, candidate) in leaders {
            let group = self
                .groups
                .get(slot)
                .ok_or_else(|| Rejected::NoGroup(slot.clone()))?;
            if group.leader == *candidate {
                continue;
            }
            if group.leader != member {
                return Err(Rejected::NotLeader {
                    member: member.to_owned(),
                    slot: slot.clone(),
                    leader: group.leader.clone(),
                });
            }
            if let Failover::Manual(why) = &group.failover {
                return Err(Rejected::ManualFailover {
                    slot: slot.clone(),
                    why: why.clone(),
                });
            }
            if !group.in_sync.contains(candidate) {
                return Err(Rejected::NotInSync {
                    slot: slot.clone(),
                    candidate: candidate.clone(),
                });
            }
        }
        let mut changed = false;
        for (slot, candidate) in leaders {
            let group = self.groups.get_mut(slot).expect("checked above");
            if group.leader == *candidate {
                continue;
            }
            group.hand_to(candidate, epoch);
            changed = true;
        }
        Ok(changed)
    }

    /// Hands `slot`'s group from its leader (at `leader_epoch`) to `to`, a member of its
    /// in-sync set, at `epoch`. A group `to` leads already is a retry of a committed transfer.
    fn transfer(
        &mut self,
        slot: &str,
        leader_epoch: u64,
        to: &str,
        epoch: u64,
    ) -> Result<bool, Rejected> {
        if self
            .groups
            .get(slot)
            .is_some_and(|group| group.leader == to)
        {
            return Ok(false);
        }
        let group = self.led_at(slot, leader_epoch)?;
        if !group.in_sync.contains(to) {
            return Err(Rejected::NotInSync {
                slot: slot.to_owned(),
                candidate: to.to_owned(),
            });
        }
        group.hand_to(to, epoch);
        Ok(true)
    }

    /// The group of `slot`, if it is led at `leader_epoch` (a request of its current leader).
    fn led_at(&mut self, slot: &str, leader_epoch: u64) -> Result<&mut Group, Rejected> {
        let group = self
            .groups
            .get_mut(slot)
            .ok_or_else(|| Rejected::NoGroup(slot.to_owned()))?;
        if group.leader_epoch != leader_epoch {
            return Err(Rejected::StaleLeader {
                slot: slot.to_owned(),
                asked: leader_epoch,
                current: group.leader_epoch,
            });
        }
        Ok(group)
    }

    fn member(&self, name: &str) -> Result<&RingMember, Rejected> {
        if !self.ring.is_formed() {
            return Err(Rejected::NotFormed);
        }
        self.ring
            .members
            .get(name)
            .ok_or_else(|| Rejected::Unknown(name.to_owned()))
    }

    fn member_mut(&mut self, name: &str) -> Result<&mut RingMember, Rejected> {
        self.member(name)?;
        Ok(self.ring.members.get_mut(name).expect("checked above"))
    }

    fn set_lifecycle(&mut self, name: &str, to: Lifecycle, epoch: u64) {
        let record = self
            .ring
            .members
            .get_mut(name)
            .expect("checked by the caller");
        record.lifecycle = to;
        record.version = epoch;
        match to {
            Lifecycle::Active => {
                self.groups
                    .entry(name.to_owned())
                    .or_insert_with(|| Group::led_by(name, epoch));
            }
            Lifecycle::Left => {
                self.groups.remove(name);
            }
            _ => {}
        }
        self.ring_epoch = epoch;
    }
}

impl Group {
    fn led_by(leader: &str, epoch: u64) -> Group {
        Group {
            leader: leader.to_owned(),
            leader_epoch: epoch,
            followers: BTreeSet::new(),
            in_sync: BTreeSet::new(),
            failover: unreported(),
            leader_unclean: false,
        }
    }

    /// The member an election would name in its leader's place: the first member of the
    /// in-sync set that is `live`, if the group fails over by itself. Each member of the set
    /// holds every acknowledged byte, so any of them keeps them all; the first by name, so that
    /// every voter would name the same one.
    pub fn successor(&self, live: impl Fn(&str) -> bool) -> Option<&str> {
        self.most_caught_up(live, |_| 0)
    }

    /// The election's choice: of the members [`successor`](Self::successor) could name, the one
    /// that `held` says holds the most bytes (each holds every acknowledged byte; the one that
    /// holds more unacknowledged ones loses fewer), the first by name among equals.
    pub fn most_caught_up(
        &self,
        live: impl Fn(&str) -> bool,
        held: impl Fn(&str) -> u64,
    ) -> Option<&str> {
        if matches!(self.failover, Failover::Manual(_)) {
            return None;
        }
        let candidates = self.in_sync.iter().map(String::as_str).filter(|m| live(m));
        // `max_by_key` keeps the last of equals: the first by name is the last in reverse.
        candidates.rev().max_by_key(|member| held(member))
    }

    /// `to` leads the group from `epoch` (a fence or a transfer); the old leader follows it,
    /// outside the in-sync set until it is seen caught up again.
    fn hand_to(&mut self, to: &str, epoch: u64) {
        let old = std::mem::replace(&mut self.leader, to.to_owned());
        self.followers.remove(to);
        self.in_sync.remove(to);
        self.followers.insert(old);
        self.leader_epoch = epoch;
        self.leader_unclean = false;
    }
}

fn check_primaries(members: &BTreeMap<String, RingMember>) -> Result<(), Rejected> {
    if members.is_empty() {
        return Err(Rejected::NoFounders);
    }
    match members.iter().find(|(_, m)| !m.role.is_primary()) {
        Some((name, _)) => Err(Rejected::NotPrimary(name.clone())),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    //! The rules as data: a state, an entry, and what must come of it.

    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::cluster::Role;

    fn record(role: Role) -> RingMember {
        RingMember {
            lifecycle: Lifecycle::Joining,
            role,
            rpc_addr: "r:1".into(),
            replication_addr: "r:2".into(),
            virtual_nodes: 64,
            tags: BTreeMap::new(),
            version: 0,
        }
    }

    fn form(names: &[&str]) -> Command {
        Command::Form {
            founders: names
                .iter()
                .map(|n| ((*n).to_owned(), record(Role::Leader)))
                .collect(),
        }
    }

    fn join(name: &str) -> Command {
        Command::Join {
            name: name.into(),
            record: record(Role::Leader),
        }
    }

    fn drain(name: &str) -> Command {
        Command::Drain { name: name.into() }
    }

    fn step(name: &str, to: Lifecycle) -> Command {
        Command::Step {
            name: name.into(),
            to,
        }
    }

    fn forget(name: &str) -> Command {
        Command::Forget { name: name.into() }
    }

    /// Applies `commands` in order from index 1; panics on a refusal.
    fn state(commands: &[Command]) -> Topology {
        let mut topology = Topology::default();
        for command in commands {
            let index = topology.applied + 1;
            topology
                .apply(index, command)
                .unwrap_or_else(|e| panic!("{command:?}: {e}"));
        }
        topology
    }

    fn lifecycle(topology: &Topology, name: &str) -> Lifecycle {
        topology.ring.members[name].lifecycle
    }

    /// The announcement an owner makes once it handed `joining` its points.
    fn handed(topology: &Topology, owner: &str, joining: &str) -> Command {
        let mut target = topology.ring.clone();
        target.members.get_mut(joining).unwrap().lifecycle = Lifecycle::Active;
        Command::Announce {
            name: owner.into(),
            handed: Some(Handed::Join {
                joining: joining.into(),
                version: target.version(),
            }),
        }
    }

    #[test]
    fn each_step_is_checked_against_the_state_it_is_applied_to() {
        use Lifecycle::*;
        let formed = [form(&["a", "b"])];
        let joining = [form(&["a", "b"]), join("c")];
        let draining = [form(&["a", "b"]), drain("b")];
        let alone = [form(&["a"])];
        let left = [form(&["a", "b"]), drain("b"), step("b", Left)];
        let three_draining = [form(&["a", "b", "c"]), drain("b")];
        // What, the entries before, the entry, and what must come of it.
        type Case<'a> = (&'a str, &'a [Command], Command, Result<(), Rejected>);
        let cases: Vec<Case> = vec![
            (
                "a join before formation",
                &[],
                join("c"),
                Err(Rejected::NotFormed),
            ),
            (
                "a second formation",
                &formed,
                form(&["x"]),
                Err(Rejected::Formed),
            ),
            (
                "a formation of nobody",
                &[],
                form(&[]),
                Err(Rejected::NoFounders),
            ),
            (
                "a follower among the founders",
                &[],
                Command::Form {
                    founders: [("f".to_owned(), record(Role::Follower))].into(),
                },
                Err(Rejected::NotPrimary("f".into())),
            ),
            (
                "a join of a name present",
                &formed,
                join("b"),
                Err(Rejected::NameTaken("b".into(), Active)),
            ),
            (
                "a join of a name that left",
                &left,
                join("b"),
                Err(Rejected::NameTaken("b".into(), Left)),
            ),
            (
                "a join of a balancer",
                &formed,
                Command::Join {
                    name: "z".into(),
                    record: record(Role::Balancer),
                },
                Err(Rejected::NotPrimary("z".into())),
            ),
            (
                "a join while another is joining: queued",
                &joining,
                join("d"),
                Ok(()),
            ),
            (
                "the same join again: unchanged",
                &joining,
                join("c"),
                Ok(()),
            ),
            (
                "a join of a joining name with another record",
                &joining,
                Command::Join {
                    name: "c".into(),
                    record: RingMember {
                        rpc_addr: "elsewhere:1".into(),
                        ..record(Role::Leader)
                    },
                },
                Err(Rejected::NameTaken("c".into(), Joining)),
            ),
            (
                "a drain of the last primary",
                &alone,
                drain("a"),
                Err(Rejected::LastOwner("a".into())),
            ),
            (
                "a drain during a join: it goes first, the join waits",
                &joining,
                drain("a"),
                Ok(()),
            ),
            (
                "a drain during a drain",
                &three_draining,
                drain("a"),
                Err(Rejected::ChangeUnderWay("member b is draining".into())),
            ),
            (
                "a drain of a joining member",
                &joining,
                drain("c"),
                Err(Rejected::Transition {
                    name: "c".into(),
                    from: Joining,
                    to: Leaving,
                }),
            ),
            (
                "a drain of nobody",
                &formed,
                drain("x"),
                Err(Rejected::Unknown("x".into())),
            ),
            (
                "a join turned active before it is handed",
                &joining,
                step("c", Active),
                Err(Rejected::NotHanded {
                    joining: "c".into(),
                    owner: "a".into(),
                }),
            ),
            (
                "an active member leaving without a drain",
                &formed,
                step("a", Left),
                Err(Rejected::Transition {
                    name: "a".into(),
                    from: Active,
                    to: Left,
                }),
            ),
            (
                "a drained member leaving",
                &draining,
                step("b", Left),
                Ok(()),
            ),
            (
                "forgetting the last owner",
                &alone,
                forget("a"),
                Err(Rejected::LastOwner("a".into())),
            ),
            ("forgetting a dead owner", &formed, forget("b"), Ok(())),
            (
                "a ring member following",
                &formed,
                Command::Follow {
                    follower: "a".into(),
                    slot: "b".into(),
                },
                Err(Rejected::BadFollow {
                    follower: "a".into(),
                    slot: "b".into(),
                    reason: "a member of the ring holds a slot of its own".into(),
                }),
            ),
            (
                "following a slot nobody owns",
                &joining,
                Command::Follow {
                    follower: "f".into(),
                    slot: "c".into(),
                },
                Err(Rejected::BadFollow {
                    follower: "f".into(),
                    slot: "c".into(),
                    reason: "no such slot".into(),
                }),
            ),
        ];
        for (what, before, command, want) in cases {
            let mut topology = state(before);
            let untouched = topology.clone();
            let got = topology.apply(topology.applied + 1, &command);
            assert_eq!(got.clone().map(|_| ()), want, "{what}");
            if got.is_err() {
                // A refused entry changes nothing but the applied index.
                let mut expected = untouched;
                expected.applied = topology.applied;
                assert_eq!(topology, expected, "{what}");
            }
        }
    }

    #[test]
    fn a_join_completes_only_once_every_owner_handed_it_over() {
        use Lifecycle::*;
        let mut topology = state(&[form(&["a", "b"]), join("c"), join("d")]);
        assert_eq!(
            topology.change_under_way().as_deref(),
            Some("member c is joining")
        );
        let index = topology.applied + 1;
        topology.apply(index, &handed(&topology, "a", "c")).unwrap();
        let refused = topology.apply(index + 1, &step("c", Active));
        assert_eq!(
            refused,
            Err(Rejected::NotHanded {
                joining: "c".into(),
                owner: "b".into()
            })
        );
        // d waits for c: nobody can hand d over first.
        assert!(matches!(
            topology.apply(index + 2, &step("d", Active)),
            Err(Rejected::ChangeUnderWay(_))
        ));
        topology
            .apply(index + 3, &handed(&topology, "b", "c"))
            .unwrap();
        let done = topology.apply(index + 4, &step("c", Active)).unwrap();
        assert_eq!(done, Applied::Changed { epoch: index + 4 });
        assert_eq!(lifecycle(&topology, "c"), Active);
        assert_eq!(topology.groups["c"].leader_epoch, index + 4);
        // A retry of the committed step changes nothing.
        assert_eq!(
            topology.apply(index + 5, &step("c", Active)),
            Ok(Applied::Unchanged)
        );
        // Now d: the owners' announcements for c do not count for it.
        assert!(matches!(
            topology.apply(index + 6, &step("d", Active)),
            Err(Rejected::NotHanded { .. })
        ));
    }

    #[test]
    fn a_drain_ends_in_left_and_its_slot_closes_followers_move_between_slots() {
        use Lifecycle::*;
        let mut topology = state(&[
            form(&["a", "b"]),
            Command::Follow {
                follower: "f".into(),
                slot: "a".into(),
            },
            Command::Follow {
                follower: "f".into(),
                slot: "b".into(),
            },
        ]);
        assert!(topology.groups["a"].followers.is_empty(), "f left a's slot");
        assert!(topology.groups["b"].followers.contains("f"));
        let index = topology.applied;
        topology.apply(index + 1, &drain("b")).unwrap();
        assert_eq!(lifecycle(&topology, "b"), Leaving);
        assert_eq!(
            topology.apply(index + 2, &drain("b")),
            Ok(Applied::Unchanged)
        );
        topology.apply(index + 3, &step("b", Left)).unwrap();
        assert!(!topology.groups.contains_key("b"));
        assert_eq!(topology.ring_epoch, index + 3);
    }

    fn follow(follower: &str, slot: &str) -> Command {
        Command::Follow {
            follower: follower.into(),
            slot: slot.into(),
        }
    }

    fn in_sync(slot: &str, follower: &str, leader_epoch: u64) -> Command {
        Command::InSync {
            slot: slot.into(),
            follower: follower.into(),
            leader_epoch,
        }
    }

    fn out_of_sync(slot: &str, follower: &str, leader_epoch: u64) -> Command {
        Command::OutOfSync {
            slot: slot.into(),
            follower: follower.into(),
            leader_epoch,
            reason: "lagging".into(),
        }
    }

    #[test]
    fn only_the_groups_leader_changes_its_in_sync_set_and_only_with_its_followers() {
        // a leads its group at epoch 1 (the formation's entry); f and g follow it.
        let followed = [form(&["a", "b"]), follow("f", "a"), follow("g", "a")];
        let with_f = [
            form(&["a", "b"]),
            follow("f", "a"),
            follow("g", "a"),
            in_sync("a", "f", 1),
        ];
        type Case<'a> = (&'a str, &'a [Command], Command, Result<Applied, Rejected>);
        let cases: Vec<Case> = vec![
            (
                "a follower enters",
                &followed,
                in_sync("a", "f", 1),
                Ok(Applied::Changed { epoch: 4 }),
            ),
            (
                "again: a retry",
                &with_f,
                in_sync("a", "f", 1),
                Ok(Applied::Unchanged),
            ),
            (
                "asked at an older leader epoch",
                &followed,
                in_sync("a", "f", 0),
                Err(Rejected::StaleLeader {
                    slot: "a".into(),
                    asked: 0,
                    current: 1,
                }),
            ),
            (
                "a removal asked at an older leader epoch",
                &with_f,
                out_of_sync("a", "f", 0),
                Err(Rejected::StaleLeader {
                    slot: "a".into(),
                    asked: 0,
                    current: 1,
                }),
            ),
            (
                "a node that follows another slot",
                &followed,
                in_sync("b", "f", 1),
                Err(Rejected::NotFollowing {
                    follower: "f".into(),
                    slot: "b".into(),
                }),
            ),
            (
                "a slot nobody leads",
                &followed,
                in_sync("x", "f", 1),
                Err(Rejected::NoGroup("x".into())),
            ),
            (
                "a follower leaves",
                &with_f,
                out_of_sync("a", "f", 1),
                Ok(Applied::Changed { epoch: 5 }),
            ),
            (
                "one that was not in it",
                &with_f,
                out_of_sync("a", "g", 1),
                Ok(Applied::Unchanged),
            ),
        ];
        for (what, before, command, expected) in cases {
            let mut topology = state(before);
            let index = topology.applied + 1;
            assert_eq!(topology.apply(index, &command), expected, "{what}");
        }
        // A follower that moves to another slot leaves the in-sync set it was in, and a
        // forgotten leader's group goes with its set.
        let mut topology = state(&with_f);
        assert_eq!(topology.groups["a"].in_sync, BTreeSet::from(["f".into()]));
        topology.apply(5, &follow("f", "b")).unwrap();
        assert!(topology.groups["a"].in_sync.is_empty());
        assert!(topology.groups["b"].in_sync.is_empty());
    }

    fn reports(slot: &str, leader_epoch: u64, failover: Failover) -> Command {
        Command::Failover {
            slot: slot.into(),
            leader_epoch,
            failover,
        }
    }

    fn fence(member: &str, leaders: &[(&str, &str)]) -> Command {
        Command::Fence {
            member: member.into(),
            leaders: leaders
                .iter()
                .map(|(slot, leader)| ((*slot).to_owned(), (*leader).to_owned()))
                .collect(),
        }
    }

    #[test]
    fn a_fence_names_only_an_in_sync_member_of_a_group_that_may_fail_over() {
        // a leads its group at epoch 1; f (in sync) and g follow it.
        let base = [
            form(&["a", "b"]),
            follow("f", "a"),
            follow("g", "a"),
            in_sync("a", "f", 1),
        ];
        let automatic = [
            &base[..],
            &[reports("a", 1, Failover::Automatic { replicas: 1 })],
        ]
        .concat();
        let fenced = [&automatic[..], &[fence("a", &[("a", "f")])]].concat();
        type Case<'a> = (&'a str, &'a [Command], Command, Result<Applied, Rejected>);
        let cases: Vec<Case> = vec![
            (
                "a group whose leader never reported",
                &base,
                fence("a", &[("a", "f")]),
                Err(Rejected::ManualFailover {
                    slot: "a".into(),
                    why: "its leader has not reported its configuration yet".into(),
                }),
            ),
            (
                "a report of a deposed leader",
                &fenced,
                reports("a", 1, Failover::Manual("ack = local".into())),
                Err(Rejected::StaleLeader {
                    slot: "a".into(),
                    asked: 1,
                    current: 6,
                }),
            ),
            (
                "a follower outside the in-sync set",
                &automatic,
                fence("a", &[("a", "g")]),
                Err(Rejected::NotInSync {
                    slot: "a".into(),
                    candidate: "g".into(),
                }),
            ),
            (
                "a member that does not lead the slot",
                &automatic,
                fence("b", &[("a", "f")]),
                Err(Rejected::NotLeader {
                    member: "b".into(),
                    slot: "a".into(),
                    leader: "a".into(),
                }),
            ),
            (
                "checked whole: one bad slot refuses it all",
                &automatic,
                fence("a", &[("a", "f"), ("x", "f")]),
                Err(Rejected::NoGroup("x".into())),
            ),
            (
                "the fence",
                &automatic,
                fence("a", &[("a", "f")]),
                Ok(Applied::Changed { epoch: 6 }),
            ),
            (
                "again: a retry",
                &fenced,
                fence("a", &[("a", "f")]),
                Ok(Applied::Unchanged),
            ),
        ];
        for (what, before, command, expected) in cases {
            let mut topology = state(before);
            let index = topology.applied + 1;
            assert_eq!(topology.apply(index, &command), expected, "{what}");
        }
        // The new leader leads at the fence's epoch, out of the followers; the fenced one
        // follows, outside the in-sync set; the old leader's requests are refused from then on.
        let mut topology = state(&fenced);
        let group = &topology.groups["a"];
        assert_eq!((group.leader.as_str(), group.leader_epoch), ("f", 6));
        assert_eq!(group.followers, BTreeSet::from(["a".into(), "g".into()]));
        assert!(group.in_sync.is_empty());
        assert_eq!(
            topology.apply(7, &in_sync("a", "g", 1)),
            Err(Rejected::StaleLeader {
                slot: "a".into(),
                asked: 1,
                current: 6
            })
        );
        assert_eq!(
            topology.apply(8, &in_sync("a", "a", 6)),
            Ok(Applied::Changed { epoch: 8 }),
            "the new leader takes the old one back in once it caught up"
        );
        assert_eq!(
            topology.apply(9, &forget("a")),
            Err(Rejected::FailedOver {
                name: "a".into(),
                leader: "f".into()
            }),
            "the slot's group lives on under f"
        );
    }

    fn transfer(slot: &str, leader_epoch: u64, to: &str) -> Command {
        Command::Transfer {
            slot: slot.into(),
            leader_epoch,
            to: to.into(),
        }
    }

    #[test]
    fn a_transfer_hands_a_group_to_an_in_sync_member_at_its_leaders_request() {
        // a leads its group at epoch 1; f (in sync) and g follow it.
        let base = [
            form(&["a", "b"]),
            follow("f", "a"),
            follow("g", "a"),
            in_sync("a", "f", 1),
        ];
        let handed = [&base[..], &[transfer("a", 1, "f")]].concat();
        type Case<'a> = (&'a str, &'a [Command], Command, Result<Applied, Rejected>);
        let cases: Vec<Case> = vec![
            (
                "a follower outside the in-sync set",
                &base,
                transfer("a", 1, "g"),
                Err(Rejected::NotInSync {
                    slot: "a".into(),
                    candidate: "g".into(),
                }),
            ),
            (
                "asked at another epoch than the leader's",
                &base,
                transfer("a", 2, "f"),
                Err(Rejected::StaleLeader {
                    slot: "a".into(),
                    asked: 2,
                    current: 1,
                }),
            ),
            (
                "a slot with no group",
                &base,
                transfer("x", 1, "f"),
                Err(Rejected::NoGroup("x".into())),
            ),
            (
                "the transfer (whatever the group's failover: it loses nothing)",
                &base,
                transfer("a", 1, "f"),
                Ok(Applied::Changed { epoch: 5 }),
            ),
            (
                "again: a retry",
                &handed,
                transfer("a", 1, "f"),
                Ok(Applied::Unchanged),
            ),
            (
                "the deposed leader's next request",
                &handed,
                transfer("a", 1, "g"),
                Err(Rejected::StaleLeader {
                    slot: "a".into(),
                    asked: 1,
                    current: 5,
                }),
            ),
        ];
        for (what, before, command, expected) in cases {
            let mut topology = state(before);
            let index = topology.applied + 1;
            assert_eq!(topology.apply(index, &command), expected, "{what}");
        }
        let mut topology = state(&handed);
        let group = &topology.groups["a"];
        assert_eq!((group.leader.as_str(), group.leader_epoch), ("f", 5));
        assert_eq!(group.followers, BTreeSet::from(["a".into(), "g".into()]));
        assert!(group.in_sync.is_empty());
        assert_eq!(topology.writer("a"), "f");
        // Once a is back in sync, f may hand the group back to it.
        assert_eq!(
            topology.apply(6, &in_sync("a", "a", 5)),
            Ok(Applied::Changed { epoch: 6 })
        );
        assert_eq!(
            topology.apply(7, &transfer("a", 5, "a")),
            Ok(Applied::Changed { epoch: 7 })
        );
        assert_eq!(topology.writer("a"), "a");
        assert_eq!(
            topology.groups["a"].followers,
            BTreeSet::from(["f".into(), "g".into()])
        );
    }

    #[test]
    fn a_member_back_from_an_unclean_stop_leaves_every_in_sync_set() {
        // f and g are in a's in-sync set, h in b's.
        let base = [
            form(&["a", "b"]),
            follow("f", "a"),
            follow("g", "a"),
            in_sync("a", "f", 1),
            in_sync("a", "g", 1),
            follow("h", "b"),
            in_sync("b", "h", 1),
        ];
        let mut topology = state(&base);
        let unclean = |member: &str| Command::Unclean {
            member: member.into(),
        };
        assert_eq!(
            topology.apply(8, &unclean("f")),
            Ok(Applied::Changed { epoch: 8 })
        );
        assert_eq!(topology.groups["a"].in_sync, BTreeSet::from(["g".into()]));
        assert_eq!(topology.groups["b"].in_sync, BTreeSet::from(["h".into()]));
        // Still a follower: its leader adds it again once it caught up.
        assert!(topology.groups["a"].followers.contains("f"));
        // Again, or a member in no set (a new node, a leader): nothing changes.
        assert_eq!(topology.apply(9, &unclean("f")), Ok(Applied::Unchanged));
        assert_eq!(topology.apply(10, &unclean("a")), Ok(Applied::Unchanged));
        assert_eq!(topology.writer("a"), "a");
    }

    #[test]
    fn a_leader_back_from_an_unclean_stop_keeps_its_set_until_a_member_of_it_leads() {
        // a and b fail over by themselves; f is in a's in-sync set; b has no in-sync member.
        let automatic = Failover::Automatic { replicas: 1 };
        let base = [
            form(&["a", "b"]),
            reports("a", 1, automatic.clone()),
            reports("b", 1, automatic),
            follow("f", "a"),
            follow("g", "a"),
            in_sync("a", "f", 1),
        ];
        let unclean = |member: &str| Command::Unclean {
            member: member.into(),
        };
        let mut topology = state(&base);
        assert_eq!(
            topology.apply(7, &unclean("a")),
            Ok(Applied::Changed { epoch: 7 })
        );
        let group = &topology.groups["a"];
        assert!(group.leader_unclean, "f may hold bytes a lost");
        assert_eq!((group.leader.as_str(), group.leader_epoch), ("a", 1));
        assert_eq!(
            topology.apply(8, &unclean("b")),
            Ok(Applied::Unchanged),
            "nobody holds more than b"
        );
        assert!(!topology.groups["b"].leader_unclean);
        // a cannot change its set meanwhile: f stays for the controller to name.
        assert_eq!(
            topology.apply(9, &in_sync("a", "g", 1)),
            Err(Rejected::LeaderUnclean("a".into()))
        );
        let out = Command::OutOfSync {
            slot: "a".into(),
            follower: "f".into(),
            leader_epoch: 1,
            reason: "disconnected".into(),
        };
        assert_eq!(
            topology.apply(10, &out),
            Err(Rejected::LeaderUnclean("a".into()))
        );
        // The controller names f; a follows it, outside the set.
        assert_eq!(
            topology.apply(11, &fence("a", &[("a", "f")])),
            Ok(Applied::Changed { epoch: 11 })
        );
        let group = &topology.groups["a"];
        assert_eq!((group.leader.as_str(), group.leader_epoch), ("f", 11));
        assert!(!group.leader_unclean);
        assert!(group.followers.contains("a") && !group.in_sync.contains("a"));

        // Or, with nobody of the set live, an operator keeps a: the set is emptied (f may
        // hold bytes a lacks) and a takes writes again.
        let mut topology = state(&base);
        topology.apply(7, &unclean("a")).unwrap();
        let keep = Command::ElectUnclean {
            slot: "a".into(),
            to: "a".into(),
        };
        assert_eq!(topology.apply(8, &keep), Ok(Applied::Changed { epoch: 8 }));
        let group = &topology.groups["a"];
        assert!(!group.leader_unclean && group.in_sync.is_empty());
        assert_eq!((group.leader.as_str(), group.leader_epoch), ("a", 1));
        assert_eq!(topology.apply(9, &keep), Ok(Applied::Unchanged));
    }

    #[test]
    fn an_operator_names_a_leader_outside_the_in_sync_set_only_among_its_followers() {
        // a leads its group; f is in sync, g is not; h follows nobody.
        let base = [
            form(&["a", "b"]),
            follow("f", "a"),
            follow("g", "a"),
            in_sync("a", "f", 1),
        ];
        let elect = |slot: &str, to: &str| Command::ElectUnclean {
            slot: slot.into(),
            to: to.into(),
        };
        let mut topology = state(&base);
        assert_eq!(
            topology.apply(5, &elect("a", "h")),
            Err(Rejected::NotFollowing {
                follower: "h".into(),
                slot: "a".into(),
            })
        );
        assert_eq!(
            topology.apply(6, &elect("x", "g")),
            Err(Rejected::NoGroup("x".into()))
        );
        assert_eq!(
            topology.apply(7, &elect("a", "g")),
            Ok(Applied::Changed { epoch: 7 })
        );
        let group = &topology.groups["a"];
        assert_eq!((group.leader.as_str(), group.leader_epoch), ("g", 7));
        assert_eq!(group.followers, BTreeSet::from(["a".into(), "f".into()]));
        assert!(group.in_sync.is_empty(), "f may hold bytes g lacks");
        // Again (an operator's retry): nothing changes.
        assert_eq!(topology.apply(8, &elect("a", "g")), Ok(Applied::Unchanged));
    }

    #[test]
    fn the_ring_does_not_change_while_a_slot_is_led_by_another_member() {
        // f leads a's slot since a transfer.
        let base = [
            form(&["a", "b", "c"]),
            follow("f", "a"),
            in_sync("a", "f", 1),
            transfer("a", 1, "f"),
        ];
        let led_elsewhere = Err(Rejected::LedElsewhere {
            slot: "a".into(),
            leader: "f".into(),
        });
        let mut topology = state(&base);
        assert_eq!(topology.apply(5, &join("d")), led_elsewhere);
        assert_eq!(topology.apply(6, &drain("b")), led_elsewhere);
        // Handed back, the ring may change again.
        assert_eq!(
            topology.apply(7, &in_sync("a", "a", 4)),
            Ok(Applied::Changed { epoch: 7 })
        );
        assert_eq!(
            topology.apply(8, &transfer("a", 4, "a")),
            Ok(Applied::Changed { epoch: 8 })
        );
        assert_eq!(
            topology.apply(9, &drain("b")),
            Ok(Applied::Changed { epoch: 9 })
        );
    }

    #[test]
    fn an_import_puts_every_epoch_above_those_the_stores_hold() {
        use Lifecycle::*;
        let mut ring = Ring::of(&[("a", Active), ("b", Active), ("c", Forgotten)]);
        ring.members.get_mut("b").unwrap().version = 70;
        let mut topology = Topology::default();
        let imported = topology
            .apply(
                1,
                &Command::Import {
                    ring: ring.clone(),
                    max_epoch: 41,
                },
            )
            .unwrap();
        assert_eq!(
            topology.epoch_floor, 70,
            "the highest of 41 and every record version"
        );
        assert_eq!(imported, Applied::Changed { epoch: 71 });
        assert_eq!(topology.groups.keys().collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(lifecycle(&topology, "c"), Forgotten);
        assert_eq!(
            topology.apply(2, &Command::Import { ring, max_epoch: 0 }),
            Err(Rejected::Formed)
        );
        let joined = topology.apply(3, &join("d")).unwrap();
        assert_eq!(joined, Applied::Changed { epoch: 73 });
    }

    /// Random sequences of entries, most of them refused: every epoch given out is above the
    /// one before, records and leaders' epochs never go back, a refused entry changes nothing,
    /// and two nodes that apply the same entries hold the same state (also through a snapshot).
    #[test]
    fn epochs_only_grow_and_the_same_entries_make_the_same_state() {
        let names = ["a", "b", "c", "d", "e"];
        let mut rng = StdRng::seed_from_u64(0x7090);
        let (mut changed, mut refused) = (0, 0);
        for _ in 0..200 {
            let mut one = Topology::default();
            let mut other = Topology::default();
            let mut last_epoch = 0;
            for index in 1..=60 {
                let name = names[rng.random_range(0..names.len())].to_owned();
                let command = match rng.random_range(0..9) {
                    0 => form(&names[..rng.random_range(1..4)]),
                    1 => join(&name),
                    2 => drain(&name),
                    3 => step(
                        &name,
                        [Lifecycle::Active, Lifecycle::Left][rng.random_range(0..2)],
                    ),
                    4 => forget(&name),
                    5 if one.ring.members.contains_key(&name) => {
                        handed(&one, names[rng.random_range(0..names.len())], &name)
                    }
                    7 => {
                        let follower = format!("f{}", rng.random_range(0..3));
                        let epoch = one.groups.get(&name).map_or(0, |g| g.leader_epoch);
                        match rng.random_range(0..4) {
                            0 => reports(&name, epoch, Failover::Automatic { replicas: 1 }),
                            1 => transfer(&name, epoch, &follower),
                            2 if rng.random_range(0..2) == 0 => {
                                Command::Unclean { member: follower }
                            }
                            2 => Command::ElectUnclean {
                                slot: name.clone(),
                                to: follower,
                            },
                            _ => fence(&name, &[(&name, &follower)]),
                        }
                    }
                    6 => {
                        let follower = format!("f{}", rng.random_range(0..3));
                        // The group's epoch, or a stale one now and then.
                        let epoch = one.groups.get(&name).map_or(0, |g| g.leader_epoch);
                        let epoch = epoch.saturating_sub(u64::from(rng.random_range(0..4) == 0));
                        match rng.random_range(0..2) {
                            0 => in_sync(&name, &follower, epoch),
                            _ => out_of_sync(&name, &follower, epoch),
                        }
                    }
                    _ => follow(&format!("f{}", rng.random_range(0..3)), &name),
                };
                let before = one.clone();
                let got = one.apply(index, &command);
                assert_eq!(other.apply(index, &command), got);
                match got {
                    Ok(Applied::Changed { epoch }) => {
                        assert!(epoch > last_epoch, "{command:?}");
                        last_epoch = epoch;
                        changed += 1;
                    }
                    Ok(Applied::Unchanged) | Err(_) => {
                        refused += usize::from(got.is_err());
                        let mut same = before.clone();
                        same.applied = index;
                        assert_eq!(one, same, "{command:?}");
                    }
                }
                for (name, record) in &before.ring.members {
                    assert!(one.ring.members[name].version >= record.version);
                }
                for (slot, group) in &one.groups {
                    if let Some(was) = before.groups.get(slot) {
                        assert!(group.leader_epoch >= was.leader_epoch);
                    }
                    assert!(group.in_sync.is_subset(&group.followers), "{command:?}");
                    // A new leader comes only from the in-sync set, unless an operator named
                    // one outside it.
                    if let Some(was) = before.groups.get(slot)
                        && was.leader != group.leader
                        && !matches!(command, Command::ElectUnclean { .. })
                    {
                        assert!(was.in_sync.contains(&group.leader), "{command:?}");
                    }
                }
            }
            assert_eq!(one, other);
            let snapshot = serde_json::to_vec(&one).unwrap();
            let restored: Topology = serde_json::from_slice(&snapshot).unwrap();
            assert_eq!(restored, one);
        }
        // The sequences exercised both sides of the rules, not only refusals.
        assert!(
            changed > 2000 && refused > 2000,
            "{changed} changed, {refused} refused"
        );
    }
}
