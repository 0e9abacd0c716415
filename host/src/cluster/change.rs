//! Changes of the ring that move points: the one pending now (a drain or a join, one at a
//! time, the same on every node that sees the same ring) and the members forgotten whose points
//! are being taken over from their followers' copies (`docs/resharding.md`). Facts about the
//! ring and the live view, with no I/O: placement asks them to answer who will own a point,
//! resharding to plan its moves.

use crate::cluster::handed::Tag;
use crate::cluster::ring::Ring;
use crate::cluster::{Lifecycle, Member, Membership, Role};

/// The one change of the ring that moves points now (`docs/resharding.md`: one topology change
/// at a time).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// This member is draining: its points go to their owners in the ring without it.
    Drain(String),
    /// This member is joining: the points it will own are handed to it.
    Join(String),
}

impl std::fmt::Display for Change {
    /// How a refusal names the change: `member b is draining`, `member d is joining`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Change::Drain(member) => write!(f, "member {member} is draining"),
            Change::Join(member) => write!(f, "member {member} is joining"),
        }
    }
}

impl Change {
    /// The member the change is about.
    pub fn member(&self) -> &str {
        match self {
            Change::Drain(name) | Change::Join(name) => name,
        }
    }
}

/// A change of the ring under way, and the ring it leads to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    /// The change.
    pub change: Change,
    /// The ring once the change is made (its version is the handover's target).
    pub target: Ring,
}

/// The pending change of `ring` and the ring it leads to, if there is one. Drains go first (a
/// drained member must get its points out before anything else moves); then the joining member
/// whose name sorts first (ring records carry no time: every node must pick the same one). The
/// other pending changes wait for it.
pub fn pending(ring: &Ring) -> Option<Pending> {
    if !ring.is_formed() {
        return None;
    }
    let first = |state: Lifecycle| {
        ring.members
            .iter()
            .find(|(_, member)| member.lifecycle == state)
            .map(|(name, _)| name.clone())
    };
    let (change, becomes) = match first(Lifecycle::Leaving) {
        Some(name) => (Change::Drain(name), Lifecycle::Left),
        None => (Change::Join(first(Lifecycle::Joining)?), Lifecycle::Active),
    };
    let mut target = ring.clone();
    target
        .members
        .get_mut(change.member())
        .expect("a member of the ring")
        .lifecycle = becomes;
    Some(Pending { change, target })
}

/// A member forgotten by an operator (`docs/resharding.md`, forget): its points are taken over
/// from its followers' copies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forgotten {
    /// Its name.
    pub name: String,
    /// The member at the version of its `forgotten` record: what its followers announce
    /// (`handed`) once every copy they hold of its points is taken over.
    pub tag: Tag,
}

impl Forgotten {
    /// `ring` as it was with the member active: who owned what before it was forgotten. A copy
    /// of the ring, so made only where a point's former owner is asked for.
    pub fn before(&self, ring: &Ring) -> Ring {
        let mut before = ring.clone();
        if let Some(member) = before.members.get_mut(&self.name) {
            member.lifecycle = Lifecycle::Active;
        }
        before
    }
}

/// The members of `ring` that were forgotten, in name order.
pub fn forgotten(ring: &Ring) -> Vec<Forgotten> {
    ring.members
        .iter()
        .filter(|(_, member)| member.lifecycle == Lifecycle::Forgotten)
        .map(|(name, member)| Forgotten {
            name: name.clone(),
            tag: Tag {
                name: name.clone(),
                version: member.version,
            },
        })
        .collect()
}

/// Whether the takeover of `forgotten`'s points is still under way: some live follower of it
/// has not announced that its copies are with their new owners.
pub fn takeover_pending(membership: &Membership, forgotten: &Forgotten) -> bool {
    followers_of(membership, &forgotten.name).any(|m| {
        !m.handed
            .as_ref()
            .is_some_and(|handed| handed.took_over(&forgotten.tag))
    })
}

/// The live followers of `leader`: those that name it in gossip.
pub fn followers_of<'a>(
    membership: &'a Membership,
    leader: &'a str,
) -> impl Iterator<Item = &'a Member> + 'a {
    membership
        .view
        .members
        .values()
        .filter(move |m| m.role == Role::Follower && m.leader.as_deref() == Some(leader))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(members: &[(&str, Lifecycle)]) -> Ring {
        Ring::of(members)
    }

    #[test]
    fn one_change_at_a_time_drains_first_then_joins_by_name() {
        use Lifecycle::*;
        assert_eq!(pending(&ring(&[("a", Active), ("b", Active)])), None);
        assert_eq!(
            pending(&Ring::default()),
            None,
            "no ring, nothing to change"
        );

        let joins = ring(&[("a", Active), ("d", Joining), ("c", Joining), ("x", Left)]);
        let Pending { change, target } = pending(&joins).unwrap();
        assert_eq!(change, Change::Join("c".into()));
        assert_eq!(target.members["c"].lifecycle, Active);
        assert_eq!(target.members["d"].lifecycle, Joining, "d waits for c");
        assert_ne!(target.version(), joins.version());

        let both = ring(&[("a", Active), ("b", Leaving), ("c", Joining)]);
        let Pending { change, target } = pending(&both).unwrap();
        assert_eq!(change, Change::Drain("b".into()));
        assert_eq!(target.members["b"].lifecycle, Left);
        assert_eq!(target.members["c"].lifecycle, Joining, "the join waits");
    }
}
