//! The moves of one listing, in plan order, as the mover takes them: each tick plans with the
//! next few that may start and with those of the points already in a handover, never with
//! every move left. A drain of `n` points then costs `O(n)` to plan once and little per tick,
//! instead of `O(n)` per tick and `O(n²)` per drain.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Instant;

use crate::point::{Handover, PointId};
use crate::reshard::Move;
use crate::reshard::planner::Planner;

use super::{Handovers, holds};

/// The moves planned over a listing; a move that ended is taken out (`remove`), and one that
/// `handovers` says is handed over is dropped as it reaches the front. A new listing keeps it
/// (`relist`): only the points new since wait to be planned (`unplanned`, then `add_planned`).
#[derive(Debug, Default)]
pub(super) struct Queue {
    /// The points to move, in plan order (a point removed meanwhile stays until it is at the
    /// front: it has no move any more).
    order: VecDeque<PointId>,
    /// Each point's move.
    moves: HashMap<PointId, Move>,
    /// Points listed after the queue was planned, not planned yet.
    unplanned: HashSet<PointId>,
}

impl Queue {
    pub(super) fn new(planned: Vec<Move>) -> Self {
        let order = planned.iter().map(|m| m.point.clone()).collect();
        let moves = planned.into_iter().map(|m| (m.point.clone(), m)).collect();
        Self {
            order,
            moves,
            unplanned: HashSet::new(),
        }
    }

    /// Forgets the move of a point that was handed over or removed.
    pub(super) fn remove(&mut self, point: &PointId) {
        self.moves.remove(point);
        self.unplanned.remove(point);
    }

    /// The queue was planned over the listing `before`; the points are now listed as `now`.
    /// The points no longer listed leave it, and those new since wait to be planned: they alone
    /// (a plan asks the placement plugin about each point twice).
    pub(super) fn relist(&mut self, before: &[PointId], now: &[PointId]) {
        let listed: HashSet<&PointId> = now.iter().collect();
        for gone in before.iter().filter(|point| !listed.contains(point)) {
            self.moves.remove(gone);
        }
        self.unplanned.retain(|point| listed.contains(point));
        let known: HashSet<&PointId> = before.iter().collect();
        let new = now.iter().filter(|point| !known.contains(point));
        self.unplanned.extend(new.cloned());
    }

    /// The points listed since the queue was planned that are not planned yet.
    pub(super) fn unplanned(&self) -> Vec<PointId> {
        self.unplanned.iter().cloned().collect()
    }

    /// Adds the moves planned for `planned_points` (those of [`unplanned`](Self::unplanned);
    /// a point may have none), behind the others. Asked before the plan, not cleared before it:
    /// a plan that fails leaves them to the next.
    pub(super) fn add_planned(&mut self, planned_points: &[PointId], planned: Vec<Move>) {
        for point in planned_points {
            self.unplanned.remove(point);
        }
        for planned in planned {
            if self.moves.contains_key(&planned.point) {
                continue;
            }
            self.order.push_back(planned.point.clone());
            self.moves.insert(planned.point.clone(), planned);
        }
    }

    /// The moves a tick plans with (`Planner::plan`): in plan order, those of the points this
    /// node may hand over (by `handovers`) until as many as `planner` runs at once may start
    /// now; then those of the points in a handover or moving, by which it tells a handover the
    /// plan still calls for from a stray. The empty list says no move is left. Moves handed
    /// over leave the queue once they are at its front.
    pub(super) fn next(
        &mut self,
        handovers: &Handovers,
        planner: &Planner,
        now: Instant,
    ) -> Vec<Move> {
        while let Some(point) = self.order.front() {
            let moved = matches!(handovers.get(point), Some(Handover::Moved { .. }));
            if self.moves.contains_key(point) && !moved {
                break;
            }
            if moved {
                self.moves.remove(point);
            }
            self.order.pop_front();
        }
        let mut chosen = Vec::new();
        let mut seen = HashSet::new();
        let mut startable = 0;
        for point in &self.order {
            if startable >= planner.limit() {
                break;
            }
            let Some(planned) = self.moves.get(point) else {
                continue;
            };
            if !holds(handovers.get(point)) || !seen.insert(point) {
                continue;
            }
            if planner.may_start(point, now) {
                startable += 1;
            }
            chosen.push(planned.clone());
        }
        let busy = handovers.keys().chain(planner.moving().keys());
        for point in busy {
            if let Some(planned) = self.moves.get(point)
                && holds(handovers.get(point))
                && seen.insert(point)
            {
                chosen.push(planned.clone());
            }
        }
        chosen
    }
}

#[cfg(test)]
pub(super) mod tests {
    use std::time::Duration;

    use super::*;
    use crate::reshard::planner::Outcome;
    use crate::reshard::planner::Retry;

    pub(in crate::replication::mover) fn point(i: usize) -> PointId {
        PointId::new(format!("p/{i:03}")).unwrap()
    }

    pub(in crate::replication::mover) fn to_b(i: usize) -> Move {
        Move {
            point: point(i),
            from: "a".into(),
            to: "b".into(),
        }
    }

    pub(in crate::replication::mover) fn points(moves: &[Move]) -> Vec<PointId> {
        moves.iter().map(|m| m.point.clone()).collect()
    }

    #[test]
    fn a_tick_plans_with_the_next_moves_that_may_start_and_those_under_way() {
        let now = Instant::now();
        let mut planner = Planner::new(2, Duration::ZERO);
        let mut queue = Queue::new((0..100).map(to_b).collect());
        let mut handovers = Handovers::new();
        // Nothing moving yet: the first two.
        assert_eq!(
            points(&queue.next(&handovers, &planner, now)),
            [point(0), point(1)]
        );

        // 0 is moving, 1 failed a moment ago, 2 is arriving here: the next that may start
        // are 3 and 4, and 0 and 1 stay in the list (the planner skips them itself).
        assert!(planner.admit(&point(0), "b"));
        assert!(planner.admit(&point(1), "b"));
        planner.ended(&point(1), Outcome::Failed(Retry::Later), now);
        let copying = Handover::Copying {
            to: "b".into(),
            target_ring: 2,
        };
        handovers.insert(point(0), copying.clone());
        handovers.insert(
            point(2),
            Handover::Incoming {
                from: "c".into(),
                epoch: 2,
            },
        );
        assert_eq!(
            points(&queue.next(&handovers, &planner, now)),
            [point(0), point(1), point(3), point(4)]
        );

        // A point far down the plan in a handover (after a restart) is in the list too, once.
        handovers.insert(point(90), copying);
        assert_eq!(
            points(&queue.next(&handovers, &planner, now)),
            [point(0), point(1), point(3), point(4), point(90)]
        );
    }

    #[test]
    fn a_new_listing_drops_the_moves_of_points_gone_and_names_the_points_to_plan() {
        let now = Instant::now();
        let planner = Planner::new(10, Duration::ZERO);
        let sorted = |mut points: Vec<PointId>| {
            points.sort();
            points
        };
        // Points 0 to 4 listed, the moves of 1, 3 and 4 planned (0 and 2 stay).
        let before: Vec<PointId> = (0..5).map(point).collect();
        let mut queue = Queue::new([1, 3, 4].into_iter().map(to_b).collect());
        // Listed again: 3 is gone, 5, 6 and 7 are new.
        let listed: Vec<PointId> = [0, 1, 2, 4, 5, 6, 7].into_iter().map(point).collect();
        queue.relist(&before, &listed);
        assert_eq!(sorted(queue.unplanned()), [point(5), point(6), point(7)]);
        let handovers = Handovers::new();
        assert_eq!(
            points(&queue.next(&handovers, &planner, now)),
            [point(1), point(4)]
        );
        // Listed again before they were planned: 7 is gone, 8 is new.
        let again: Vec<PointId> = [0, 1, 2, 4, 5, 6, 8].into_iter().map(point).collect();
        queue.relist(&listed, &again);
        assert_eq!(sorted(queue.unplanned()), [point(5), point(6), point(8)]);
        // Planned (5 has a move, 6 and 8 none; 1 was planned already), they join the queue
        // behind the others and are no longer waiting.
        let planning = queue.unplanned();
        queue.add_planned(&planning, vec![to_b(5), to_b(1)]);
        assert!(queue.unplanned().is_empty());
        assert_eq!(
            points(&queue.next(&handovers, &planner, now)),
            [point(1), point(4), point(5)]
        );
        // Listed again with nothing new or gone: nothing to plan, nothing changes.
        queue.relist(&again, &again.clone());
        assert!(queue.unplanned().is_empty());
        assert_eq!(queue.next(&handovers, &planner, now).len(), 3);
    }

    #[test]
    fn moves_handed_over_or_removed_leave_the_queue_and_none_left_is_an_empty_list() {
        let now = Instant::now();
        let planner = Planner::new(4, Duration::ZERO);
        let mut queue = Queue::new((0..3).map(to_b).collect());
        let mut handovers = Handovers::new();
        let moved = Handover::Moved {
            to: "b".into(),
            epoch: 2,
        };
        handovers.insert(point(0), moved.clone());
        queue.remove(&point(1));
        assert_eq!(points(&queue.next(&handovers, &planner, now)), [point(2)]);
        assert_eq!(queue.order.len(), 1);
        handovers.insert(point(2), moved);
        assert!(queue.next(&handovers, &planner, now).is_empty());
        assert!(queue.order.is_empty() && queue.moves.is_empty());
    }
}
