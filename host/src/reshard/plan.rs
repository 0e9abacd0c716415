//! The move plan: the ring's pending change, the members forgotten, and which points move.
//!
//! The plan is a pure function of the points a node holds and two ownership answers (the current
//! ring's and the target ring's, both from the placement plugin, so any placement a user
//! configures is honoured): a point moves exactly when its owner changes, to that owner, once.

use std::collections::BTreeSet;

use crate::cluster::handed::Tag;
use crate::cluster::ring::Ring;
use crate::cluster::{Lifecycle, Member, Membership, Role};
use crate::point::PointId;

/// The environment variable of the crash hook: tests set it to a [`crash_point`] step name.
pub const CRASH_AT: &str = "GOUTUBETEST_CRASH_AT";

/// A named step of a handover (`copying`, `sealed`, `committed`, `moved` on the old owner;
/// `incoming`, `commit` on the new one). For tests only: when [`CRASH_AT`] names this step,
/// the process aborts right after reaching it, as `kill -9` would stop it there.
pub fn crash_point(step: &str) {
    static AT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    if AT.get_or_init(|| std::env::var(CRASH_AT).ok()).as_deref() == Some(step) {
        eprintln!("{CRASH_AT}={step}: aborting");
        std::process::abort();
    }
}

/// The one change of the ring that moves points now (`docs/resharding.md`: one topology change
/// at a time).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// This member is draining: its points go to their owners in the ring without it.
    Drain(String),
    /// This member is joining: the points it will own are handed to it.
    Join(String),
}

impl Change {
    /// The member the change is about.
    pub fn member(&self) -> &str {
        match self {
            Change::Drain(name) | Change::Join(name) => name,
        }
    }
}

/// The pending change of `ring` and the ring it leads to, if there is one. Drains go first (a
/// drained member must get its points out before anything else moves); then the joining member
/// whose name sorts first (ring records carry no time: every node must pick the same one). The
/// other pending changes wait for it.
pub fn pending(ring: &Ring) -> Option<(Change, Ring)> {
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
    Some((change, target))
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

/// One point to hand over.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Move {
    /// The point.
    pub point: PointId,
    /// Its owner in the current ring.
    pub from: String,
    /// Its owner in the target ring.
    pub to: String,
}

/// The moves that take `points` from their owner in the current ring (`owner_now`) to their
/// owner in the target ring (`owner_then`), in point order. A point listed twice is planned once;
/// the first error of either answer is returned.
pub fn plan<E>(
    points: impl IntoIterator<Item = PointId>,
    mut owner_now: impl FnMut(&PointId) -> Result<String, E>,
    mut owner_then: impl FnMut(&PointId) -> Result<String, E>,
) -> Result<Vec<Move>, E> {
    let points: BTreeSet<PointId> = points.into_iter().collect();
    let mut moves = Vec::new();
    for point in points {
        let from = owner_now(&point)?;
        let to = owner_then(&point)?;
        if from != to {
            moves.push(Move { point, from, to });
        }
    }
    Ok(moves)
}

#[cfg(test)]
mod tests {
    //! The plan over many random rings and point sets, with the built-in consistent hashing
    //! (`builtin:ring-placement`, the real WebAssembly component).

    use std::collections::BTreeMap;

    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::config::PluginsSection;
    use crate::plugins::{PluginSet, Plugins, types};

    fn member(name: &str, virtual_nodes: u32) -> types::Member {
        types::Member {
            name: name.into(),
            address: format!("{name}:1"),
            role: "leader".into(),
            virtual_nodes,
            tags: Vec::new(),
        }
    }

    fn owner(plugins: &PluginSet, members: &[types::Member], point: &PointId) -> String {
        let owners = plugins.owners(point.as_str(), members, 1).unwrap();
        assert_eq!(owners.len(), 1, "{owners:?}");
        owners.into_iter().next().unwrap()
    }

    /// Random ids, some sharing prefixes, some long, some not ASCII.
    fn points(rng: &mut StdRng, count: usize) -> Vec<PointId> {
        (0..count)
            .map(|i| {
                let id = match rng.random_range(0..4) {
                    0 => format!("videos/{}", rng.random::<u64>()),
                    1 => format!("logs/node-{}/{i}", rng.random_range(0..8)),
                    2 => format!(
                        "é-{}-{}",
                        rng.random::<u32>(),
                        "x".repeat(rng.random_range(0..200))
                    ),
                    _ => format!("{i}"),
                };
                PointId::new(&id).unwrap()
            })
            .collect()
    }

    /// Checks the plan from `before` to `after` against every point's owners, one by one.
    fn check(
        plugins: &PluginSet,
        points: &[PointId],
        before: &[types::Member],
        after: &[types::Member],
    ) -> Vec<Move> {
        let moves = plan(
            points.iter().cloned(),
            |p| Ok::<_, ()>(owner(plugins, before, p)),
            |p| Ok(owner(plugins, after, p)),
        )
        .unwrap();
        let planned: BTreeMap<&PointId, &Move> = moves.iter().map(|m| (&m.point, m)).collect();
        assert_eq!(planned.len(), moves.len(), "a point planned twice");
        for point in points {
            let (from, to) = (owner(plugins, before, point), owner(plugins, after, point));
            match planned.get(point) {
                Some(planned) => {
                    assert_ne!(from, to, "{point} moves but keeps its owner");
                    assert_eq!((&planned.from, &planned.to), (&from, &to), "{point}");
                }
                None => assert_eq!(from, to, "{point} changed owner but is not planned"),
            }
        }
        moves
    }

    #[test]
    fn a_point_moves_exactly_when_its_owner_changes() {
        let dir = tempfile::tempdir().unwrap();
        let plugins = Plugins::load(&PluginsSection::default(), dir.path()).unwrap();
        let plugins = plugins.current();
        let mut rng = StdRng::seed_from_u64(0x5eed);
        let (mut joins, mut drains) = (0, 0);
        for round in 0..40 {
            let size = rng.random_range(1..7);
            let ring: Vec<types::Member> = (0..size)
                .map(|i| member(&format!("n{round}-{i}"), rng.random_range(1..64)))
                .collect();
            let points = points(&mut rng, 300);

            // A join: only points that now belong to the newcomer move, all to it.
            let newcomer = member(&format!("new{round}"), rng.random_range(1..64));
            let joined: Vec<_> = ring.iter().cloned().chain([newcomer.clone()]).collect();
            let moves = check(&plugins, &points, &ring, &joined);
            assert!(moves.iter().all(|m| m.to == newcomer.name), "{moves:?}");
            joins += moves.len();

            // A drain: only the drained member's points move, none to it.
            if size > 1 {
                let drained = &ring[rng.random_range(0..size)];
                let left: Vec<_> = ring
                    .iter()
                    .filter(|m| m.name != drained.name)
                    .cloned()
                    .collect();
                let moves = check(&plugins, &points, &ring, &left);
                assert!(moves.iter().all(|m| m.from == drained.name), "{moves:?}");
                drains += moves.len();
            }

            // Nothing changes, nothing moves; listing a point twice plans it once.
            assert!(check(&plugins, &points, &ring, &ring).is_empty());
            let twice: Vec<_> = points.iter().chain(&points).cloned().collect();
            let once = check(&plugins, &points, &ring, &joined);
            let planned = plan(
                twice,
                |p| Ok::<_, ()>(owner(&plugins, &ring, p)),
                |p| Ok(owner(&plugins, &joined, p)),
            )
            .unwrap();
            assert_eq!(planned, once);
        }
        // The rounds exercised real moves, not only empty plans.
        assert!(
            joins > 500 && drains > 500,
            "joins {joins}, drains {drains}"
        );
    }

    #[test]
    fn the_first_error_stops_the_plan() {
        let points = ["a", "b", "c"].map(|p| PointId::new(p).unwrap());
        let result = plan(
            points,
            |p| Ok(p.as_str().to_owned()),
            |p| {
                if p.as_str() == "b" {
                    Err("placement trapped")
                } else {
                    Ok("x".into())
                }
            },
        );
        assert_eq!(result, Err("placement trapped"));
    }

    fn ring(states: &[(&str, Lifecycle)]) -> Ring {
        use crate::cluster::ring::RingMember;
        let members = states
            .iter()
            .map(|(name, lifecycle)| {
                let member = RingMember {
                    lifecycle: *lifecycle,
                    role: crate::cluster::Role::Standalone,
                    rpc_addr: format!("{name}:1"),
                    replication_addr: format!("{name}:2"),
                    virtual_nodes: 64,
                    tags: BTreeMap::new(),
                    version: 1,
                };
                ((*name).to_owned(), member)
            })
            .collect();
        Ring {
            id: "ring".into(),
            founders: Default::default(),
            members,
        }
    }

    /// A live follower of `leader` that has announced `handed`.
    fn follower(name: &str, leader: &str, handed: Option<&str>) -> Member {
        let handed =
            handed.map(|text| crate::cluster::Handed::decode(text, Role::Follower).unwrap());
        Member {
            name: name.into(),
            generation: 1,
            gossip_addr: "127.0.0.1:1".parse().unwrap(),
            role: Role::Follower,
            lifecycle: Lifecycle::Active,
            rpc_addr: format!("{name}:1"),
            replication_addr: format!("{name}:2"),
            http_addr: format!("{name}:3"),
            virtual_nodes: 0,
            tags: BTreeMap::new(),
            leader: Some(leader.into()),
            handed,
            moving: 0,
        }
    }

    #[tokio::test]
    async fn a_forgotten_members_points_are_not_created_until_its_followers_hand_them_over() {
        use crate::cluster::View;
        use crate::placement::{Placement, owner_in};
        use Lifecycle::*;
        let dir = tempfile::tempdir().unwrap();
        let plugins =
            std::sync::Arc::new(Plugins::load(&PluginsSection::default(), dir.path()).unwrap());
        let ring = ring(&[("a", Active), ("b", Active), ("c", Forgotten)]);
        let with = |followers: &[Member]| {
            std::sync::Arc::new(Membership {
                local: "a".into(),
                view: View {
                    id: "view".into(),
                    members: followers
                        .iter()
                        .map(|m| (m.name.clone(), m.clone()))
                        .collect(),
                },
                ring: ring.clone(),
                ring_version: ring.version(),
                conflict: None,
            })
        };
        let (views, membership) = tokio::sync::watch::channel(with(&[follower("f1", "c", None)]));
        let placement = Placement::new(plugins.clone(), membership);

        let forgotten = forgotten(&ring);
        assert_eq!(forgotten.len(), 1);
        assert_eq!(
            (forgotten[0].name.as_str(), &forgotten[0].tag),
            (
                "c",
                &Tag {
                    name: "c".into(),
                    version: 1
                }
            )
        );
        let before = forgotten[0].before(&ring);
        let set = plugins.current();
        let (of_c, others): (Vec<PointId>, Vec<PointId>) =
            points(&mut StdRng::seed_from_u64(7), 200)
                .into_iter()
                .partition(|p| owner_in(&set, &before, p.as_str()).unwrap() == "c");
        assert!(
            of_c.len() > 20 && others.len() > 20,
            "{} / {}",
            of_c.len(),
            others.len()
        );
        let taken_over = async |points: &[PointId]| {
            let mut answers = Vec::new();
            for point in points {
                answers.push(placement.being_taken_over(point.as_str()).await.unwrap());
            }
            answers
        };

        // A live follower of c has not announced c's points handed over: c's points wait,
        // the others do not.
        assert!(
            taken_over(&of_c)
                .await
                .iter()
                .all(|a| a.as_deref() == Some("c"))
        );
        assert!(taken_over(&others).await.iter().all(Option::is_none));
        // Another follower that is done does not end the wait while f1 is not.
        views
            .send(with(&[
                follower("f1", "c", Some("x@2")),
                follower("f2", "c", Some("x@2,c@1")),
            ]))
            .unwrap();
        assert!(
            taken_over(&of_c)
                .await
                .iter()
                .all(|a| a.as_deref() == Some("c"))
        );
        // Every live follower of c is done: creation goes ahead.
        views
            .send(with(&[
                follower("f1", "c", Some("c@1")),
                follower("f2", "c", Some("x@2,c@1")),
            ]))
            .unwrap();
        assert!(taken_over(&of_c).await.iter().all(Option::is_none));
        // And with no live follower of c at all.
        views.send(with(&[])).unwrap();
        assert!(taken_over(&of_c).await.iter().all(Option::is_none));
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
        let (change, target) = pending(&joins).unwrap();
        assert_eq!(change, Change::Join("c".into()));
        assert_eq!(target.members["c"].lifecycle, Active);
        assert_eq!(target.members["d"].lifecycle, Joining, "d waits for c");
        assert_ne!(target.version(), joins.version());

        let both = ring(&[("a", Active), ("b", Leaving), ("c", Joining)]);
        let (change, target) = pending(&both).unwrap();
        assert_eq!(change, Change::Drain("b".into()));
        assert_eq!(target.members["b"].lifecycle, Left);
        assert_eq!(target.members["c"].lifecycle, Joining, "the join waits");
    }
}
