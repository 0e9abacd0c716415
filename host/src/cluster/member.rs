//! What the cluster knows of its members: their roles and lifecycle states, a live member as
//! gossip carries it ([`Member`], [`Advert`]), the live view named by a hash of its members
//! ([`View`]), and what every subsystem watches: the view with the ring ([`Membership`]).

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::*;

/// The role a node plays in the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A primary without followers.
    Standalone,
    /// A primary that replicates its points to its followers.
    Leader,
    /// Holds read-only copies of one leader's points.
    Follower,
    /// Stores nothing; routes clients to the nodes that hold their points.
    Balancer,
}

impl Role {
    /// The name used in configuration and gossip.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Standalone => "standalone",
            Role::Leader => "leader",
            Role::Follower => "follower",
            Role::Balancer => "balancer",
        }
    }

    /// The role named `text`, if any.
    pub fn parse(text: &str) -> Option<Role> {
        match text {
            "standalone" => Some(Role::Standalone),
            "leader" => Some(Role::Leader),
            "follower" => Some(Role::Follower),
            "balancer" => Some(Role::Balancer),
            _ => None,
        }
    }

    /// Primaries are in the ring and own ranges; the other roles do not.
    pub fn is_primary(self) -> bool {
        matches!(self, Role::Standalone | Role::Leader)
    }

    /// Whether this is a balancer (it stores nothing and forwards).
    pub fn is_balancer(self) -> bool {
        self == Role::Balancer
    }
}

/// Where a member stands in the ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Lifecycle {
    /// Owns nothing yet: waiting for the ring to form, or for its ranges to be handed over.
    Joining,
    /// Owns its ranges (followers and other non-primaries are always `active`).
    Active,
    /// Handing its ranges over before leaving the ring (`goutube members drain`).
    Leaving,
    /// Drained: owns nothing and may be stopped for good. Its record stays in the ring, so the
    /// others know it left rather than died.
    Left,
    /// Dead and forgotten by an operator (`goutube members forget`): owns nothing; its points
    /// are taken over from its followers' copies. Final: a forgotten member that returns steps
    /// down (`docs/resharding.md`).
    Forgotten,
}

impl Lifecycle {
    /// The name used in gossip and the ring file.
    pub fn as_str(self) -> &'static str {
        match self {
            Lifecycle::Joining => "joining",
            Lifecycle::Active => "active",
            Lifecycle::Leaving => "leaving",
            Lifecycle::Left => "left",
            Lifecycle::Forgotten => "forgotten",
        }
    }

    /// The state named `text`, if any.
    pub fn parse(text: &str) -> Option<Lifecycle> {
        match text {
            "joining" => Some(Lifecycle::Joining),
            "active" => Some(Lifecycle::Active),
            "leaving" => Some(Lifecycle::Leaving),
            "left" => Some(Lifecycle::Left),
            "forgotten" => Some(Lifecycle::Forgotten),
            _ => None,
        }
    }
}

/// A live member, as it announces itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Its node name.
    pub name: String,
    /// Distinguishes runs of the same node (its start time, in nanoseconds).
    pub generation: u64,
    /// Its gossip address.
    pub gossip_addr: SocketAddr,
    /// Its role.
    pub role: Role,
    /// Its lifecycle state.
    pub lifecycle: Lifecycle,
    /// Where clients reach its API.
    pub rpc_addr: String,
    /// Its replication port.
    pub replication_addr: String,
    /// Its HTTP gateway.
    pub http_addr: String,
    /// Its placement weight.
    pub virtual_nodes: u32,
    /// Its labels.
    pub tags: BTreeMap<String, String>,
    /// For a follower: the name of the leader it follows, once connected.
    pub leader: Option<String>,
    /// What it has handed over: for a primary, a join (the joining member turns `active` once
    /// every owner of the ring says so); for a follower, the forgotten members whose points it
    /// holds copies of are with their new owners (`docs/resharding.md`).
    pub handed: Option<Handed>,
    /// For a primary: the points it is handing over now.
    pub moving: u32,
}

#[cfg(test)]
impl Member {
    /// A live, active follower called `name` with addresses made of its name (`name:1` for
    /// the API, `:2` replication, `:3` HTTP), for unit tests.
    pub(crate) fn follower_for_tests(name: &str) -> Member {
        Member {
            name: name.into(),
            generation: 1,
            gossip_addr: "127.0.0.1:1".parse().expect("an address"),
            role: Role::Follower,
            lifecycle: Lifecycle::Active,
            rpc_addr: format!("{name}:1"),
            replication_addr: format!("{name}:2"),
            http_addr: format!("{name}:3"),
            virtual_nodes: 0,
            tags: BTreeMap::new(),
            leader: None,
            handed: None,
            moving: 0,
        }
    }
}

/// Everything a node gossips: itself, the part of its ring others may not know (its own record,
/// the records of members it sees down), and while the ring forms, the founders it proposes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Advert {
    /// The member itself.
    pub member: Member,
    /// The ring as this member knows it.
    pub ring: Ring,
    /// The founders it proposes while the ring forms, if any.
    pub proposal: Option<String>,
}

/// The live members, as one node sees them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct View {
    /// Hash of the members' (name, generation, lifecycle state).
    pub id: String,
    /// The live members, by name.
    pub members: BTreeMap<String, Member>,
}

impl View {
    pub(super) fn new(members: BTreeMap<String, Member>) -> View {
        let mut hasher = Sha256::new();
        for member in members.values() {
            hasher.update(member.name.as_bytes());
            hasher.update(b"\0");
            hasher.update(member.generation.to_le_bytes());
            hasher.update(member.lifecycle.as_str().as_bytes());
            hasher.update(b"\n");
        }
        View {
            id: ring::hex(&hasher.finalize()[..8]),
            members,
        }
    }
}

/// What a node knows of its cluster at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Membership {
    /// This node's name.
    pub local: String,
    /// The live members.
    pub view: View,
    /// The ring.
    pub ring: Ring,
    /// [`Ring::version`] of `ring`: the stamp of placement answers.
    pub ring_version: u64,
    /// Another ring was met (see [`ring::RingConflict`]).
    pub conflict: Option<String>,
}

impl Membership {
    /// The live member called `name`.
    pub fn live(&self, name: &str) -> Option<&Member> {
        self.view.members.get(name)
    }

    /// Where clients reach `name`: its live address, else the last one the ring recorded.
    pub fn rpc_addr(&self, name: &str) -> Option<&str> {
        self.live(name)
            .map(|m| m.rpc_addr.as_str())
            .or_else(|| self.ring.members.get(name).map(|m| m.rpc_addr.as_str()))
    }

    /// Where `name` takes replication: its live address, else the last one the ring recorded.
    pub fn replication_addr(&self, name: &str) -> Option<&str> {
        self.live(name)
            .map(|m| m.replication_addr.as_str())
            .or_else(|| {
                self.ring
                    .members
                    .get(name)
                    .map(|m| m.replication_addr.as_str())
            })
    }
}
