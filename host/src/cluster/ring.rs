//! The ring: which primaries are in it and in what lifecycle state. Ownership is computed from
//! it (by the placement plugin, over the members that own ranges), never from liveness.
//!
//! The ring changes only by explicit steps, each made by the member it concerns: formation (the
//! founders, all `active`), a primary joining (it adds itself as `joining`), a member changing its
//! own state or addresses; and one step an operator makes for a dead member, forgetting it (its
//! record turns `forgotten`, which no other record of it replaces). Every member record carries a
//! `version` that only such a step bumps, so two copies of the ring merge by keeping, per member,
//! the record with the higher version. Every
//! node keeps the ring on disk (`<data_dir>/cluster/ring.json`) and gossips it, so a dead primary
//! stays in the ring (and keeps its range) until an operator forgets it, and a newcomer learns of
//! members it never saw alive.
//!
//! A ring is named by the content hash of its founders. Two rings with different ids never merge:
//! a node that meets another ring reports the conflict and keeps its own.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{Lifecycle, Role};

/// One primary in the ring.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RingMember {
    /// Its lifecycle state in the ring.
    pub lifecycle: Lifecycle,
    /// Its role.
    pub role: Role,
    /// Its client API address, as it last announced it.
    pub rpc_addr: String,
    /// Its replication address, as it last announced it.
    pub replication_addr: String,
    /// Placement weight; fixed when the member entered the ring.
    pub virtual_nodes: u32,
    /// Placement labels; fixed when the member entered the ring.
    pub tags: BTreeMap<String, String>,
    /// Bumped at every change of this record; the higher version wins a merge.
    pub version: u64,
}

impl RingMember {
    /// Whether this member owns a range (a `joining` one owns nothing until handed its points).
    pub fn owns_range(&self) -> bool {
        matches!(self.lifecycle, Lifecycle::Active | Lifecycle::Leaving)
    }
}

/// The ring document.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ring {
    /// Content hash of the founders; empty while the ring is not formed.
    pub id: String,
    /// The members that formed the ring (all `active` from the start): a founder that adopts
    /// the ring from others knows its own record from this.
    #[serde(default)]
    pub founders: BTreeSet<String>,
    /// Every member of the ring, by name.
    pub members: BTreeMap<String, RingMember>,
}

/// Another ring was met; rings with different ids never merge.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("ring {theirs} (of member {member}) is not this node's ring {ours}")]
pub struct RingConflict {
    /// This node's ring id.
    pub ours: String,
    /// The other ring's id.
    pub theirs: String,
    /// The member that gossips the other ring.
    pub member: String,
}

impl Ring {
    /// A new ring of `founders`, all active, named by the hash of their names.
    pub fn form(founders: BTreeMap<String, RingMember>) -> Ring {
        let id = formation_id(founders.keys());
        let names = founders.keys().cloned().collect();
        let members = founders
            .into_iter()
            .map(|(name, member)| (name, founding_record(member)))
            .collect();
        Ring {
            id,
            founders: names,
            members,
        }
    }

    /// Whether the founders are the ones the id was computed from.
    pub fn is_consistent(&self) -> bool {
        self.is_formed() && formation_id(&self.founders) == self.id
    }

    /// Whether the ring has been formed (it has an id).
    pub fn is_formed(&self) -> bool {
        !self.id.is_empty()
    }

    /// Merges `other` into this ring: per member, the record with the higher version, except
    /// that a `forgotten` record wins over any other. Returns whether anything changed.
    pub fn merge(&mut self, other: &Ring, member: &str) -> Result<bool, RingConflict> {
        if other.id != self.id {
            return Err(RingConflict {
                ours: self.id.clone(),
                theirs: other.id.clone(),
                member: member.to_owned(),
            });
        }
        let mut changed = false;
        for (name, theirs) in &other.members {
            match self.members.get(name) {
                // Forgotten is final: no later record of the member (its own, written before it
                // heard it was forgotten) undoes it.
                Some(ours)
                    if ours.lifecycle == Lifecycle::Forgotten
                        && (theirs.lifecycle != Lifecycle::Forgotten
                            || ours.version >= theirs.version) => {}
                Some(ours)
                    if ours.version >= theirs.version
                        && theirs.lifecycle != Lifecycle::Forgotten => {}
                _ => {
                    self.members.insert(name.clone(), theirs.clone());
                    changed = true;
                }
            }
        }
        Ok(changed)
    }

    /// The members that own ranges, by name.
    pub fn owners(&self) -> impl Iterator<Item = (&String, &RingMember)> {
        self.members.iter().filter(|(_, m)| m.owns_range())
    }

    /// The epoch of the last decision that changed this ring: the highest version of its
    /// records (each record's version is the controller epoch of the entry that last changed
    /// it). A handover commits at this epoch or above, so a move's epoch is the controller's.
    pub fn epoch(&self) -> u64 {
        self.members.values().map(|m| m.version).max().unwrap_or(0)
    }

    /// A stable hash of what ownership depends on (the owners, their weights and labels): the
    /// same on every node that holds the same ring, and the stamp placement answers are cached
    /// under.
    pub fn version(&self) -> u64 {
        let mut hasher = Sha256::new();
        hasher.update(self.id.as_bytes());
        for (name, member) in self.owners() {
            hasher.update(b"\0");
            hasher.update(name.as_bytes());
            hasher.update(member.virtual_nodes.to_le_bytes());
            for (key, value) in &member.tags {
                hasher.update(b"\x01");
                hasher.update(key.as_bytes());
                hasher.update(b"=");
                hasher.update(value.as_bytes());
            }
        }
        u64::from_le_bytes(hasher.finalize()[..8].try_into().expect("8 bytes"))
    }

    /// The ring stored at `path`, if there is one.
    pub fn load(path: &Path) -> Result<Option<Ring>, String> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| format!("{}: {e}", path.display())),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(error) => Err(format!("{}: {error}", path.display())),
        }
    }

    /// Writes the ring to `path` durably: a synced temporary file renamed over the old one.
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let dir = path.parent().expect("the ring file has a directory");
        std::fs::create_dir_all(dir)?;
        let temporary = path.with_extension("json.tmp");
        let mut file = std::fs::File::create(&temporary)?;
        file.write_all(&serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?)?;
        file.sync_all()?;
        std::fs::rename(&temporary, path)?;
        std::fs::File::open(dir)?.sync_all()
    }
}

/// The record a founder has in the ring it formed.
pub fn founding_record(mut member: RingMember) -> RingMember {
    member.lifecycle = Lifecycle::Active;
    member.version = member.version.max(1);
    member
}

/// The id of a ring founded by `names` (also what founders propose to each other).
pub fn formation_id<'a>(names: impl IntoIterator<Item = &'a String>) -> String {
    let names: BTreeSet<&String> = names.into_iter().collect();
    let mut hasher = Sha256::new();
    for name in names {
        hasher.update(name.as_bytes());
        hasher.update(b"\n");
    }
    hex(&hasher.finalize()[..8])
}

#[cfg(test)]
impl Ring {
    /// For tests: a formed ring of `members`, each a leader in its lifecycle state, every record
    /// at version 1.
    pub(crate) fn of(members: &[(&str, Lifecycle)]) -> Ring {
        let record = |name: &str, lifecycle: Lifecycle| RingMember {
            lifecycle,
            role: Role::Leader,
            rpc_addr: format!("{name}:1"),
            replication_addr: format!("{name}:2"),
            virtual_nodes: 64,
            tags: BTreeMap::new(),
            version: 1,
        };
        Ring {
            id: "ring".into(),
            founders: Default::default(),
            members: members
                .iter()
                .map(|(name, lifecycle)| ((*name).to_owned(), record(name, *lifecycle)))
                .collect(),
        }
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(lifecycle: Lifecycle, version: u64) -> RingMember {
        RingMember {
            lifecycle,
            role: Role::Leader,
            rpc_addr: "127.0.0.1:1".into(),
            replication_addr: "127.0.0.1:2".into(),
            virtual_nodes: 64,
            tags: BTreeMap::new(),
            version,
        }
    }

    fn founders(names: &[&str]) -> BTreeMap<String, RingMember> {
        names
            .iter()
            .map(|n| ((*n).to_owned(), member(Lifecycle::Joining, 0)))
            .collect()
    }

    #[test]
    fn formation_is_named_by_its_founders_whatever_their_order() {
        let a = Ring::form(founders(&["a", "b", "c"]));
        let b = Ring::form(founders(&["c", "a", "b"]));
        assert_eq!(a, b);
        assert!(a.is_consistent());
        let mut forged = a.clone();
        forged.founders.insert("z".into());
        assert!(!forged.is_consistent());
        assert!(a.members.values().all(|m| m.lifecycle == Lifecycle::Active));
        assert_ne!(a.id, Ring::form(founders(&["a", "b"])).id);
        assert_eq!(a.version(), b.version());
    }

    #[test]
    fn merges_keep_the_higher_version_and_refuse_other_rings() {
        let mut ours = Ring::form(founders(&["a", "b"]));
        let mut theirs = ours.clone();
        theirs
            .members
            .insert("d".into(), member(Lifecycle::Joining, 1));
        theirs.members.get_mut("a").unwrap().rpc_addr = "10.0.0.1:1".into();
        theirs.members.get_mut("a").unwrap().version = 2;
        // A stale copy of b does not win.
        theirs.members.get_mut("b").unwrap().rpc_addr = "stale".into();
        theirs.members.get_mut("b").unwrap().version = 0;
        let before = ours.version();
        assert!(ours.merge(&theirs, "x").unwrap());
        assert_eq!(ours.members["a"].rpc_addr, "10.0.0.1:1");
        assert_eq!(ours.members["b"].rpc_addr, "127.0.0.1:1");
        assert_eq!(ours.members["d"].lifecycle, Lifecycle::Joining);
        assert_eq!(before, ours.version(), "a joining member owns nothing");
        assert!(
            !ours.merge(&theirs, "x").unwrap(),
            "merging twice changes nothing"
        );

        let other = Ring::form(founders(&["z"]));
        let conflict = ours.clone().merge(&other, "z").unwrap_err();
        assert_eq!(conflict.member, "z");
    }

    #[test]
    fn a_forgotten_record_is_final() {
        let mut ours = Ring::form(founders(&["a", "b", "c"]));
        let mut forgotten = ours.clone();
        forgotten.members.get_mut("c").unwrap().lifecycle = Lifecycle::Forgotten;
        forgotten.members.get_mut("c").unwrap().version = 2;
        // c returns and, before it hears it was forgotten, bumps its record twice.
        let mut returned = ours.clone();
        returned.members.get_mut("c").unwrap().rpc_addr = "10.0.0.3:1".into();
        returned.members.get_mut("c").unwrap().version = 3;
        assert!(ours.merge(&forgotten, "a").unwrap());
        assert!(!ours.merge(&returned, "c").unwrap());
        assert_eq!(ours.members["c"].lifecycle, Lifecycle::Forgotten);
        // And whoever heard c first learns it was forgotten, whatever the versions.
        let mut theirs = returned.clone();
        assert!(theirs.merge(&forgotten, "a").unwrap());
        assert_eq!(theirs.members["c"].lifecycle, Lifecycle::Forgotten);
        assert_eq!(ours.owners().count(), 2);
    }

    #[test]
    fn rings_survive_a_round_trip_through_disk() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cluster/ring.json");
        assert_eq!(Ring::load(&path).unwrap(), None);
        let ring = Ring::form(founders(&["a", "b"]));
        ring.save(&path).unwrap();
        assert_eq!(Ring::load(&path).unwrap(), Some(ring));
        std::fs::write(&path, b"{ not json").unwrap();
        assert!(Ring::load(&path).unwrap_err().contains("ring.json"));
    }
}
