//! The move plan: which points move when the ring changes, and the crash hook of the handover's
//! steps.
//!
//! The plan is a pure function of the points a node holds and two ownership answers (the current
//! ring's and the target ring's, both from the placement plugin, so any placement a user
//! configures is honoured): a point moves exactly when its owner changes, to that owner, once.

use std::collections::BTreeSet;

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
}
