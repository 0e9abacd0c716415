//! The points this node held when it last listed them, and the moves planned over them: a
//! tick of a ring change plans from it and from the handover index, and the store is listed
//! again only when points came or went (its generation moved), at most every
//! [`RELIST_EVERY`](super::RELIST_EVERY) — not a walk over every point each tick.
//!
//! Points removed meanwhile (a drain removes the copies it handed over on most passes) are
//! noted beside the listing, not taken out of it: that would walk every point held, each time.

use std::collections::HashSet;
use std::time::Instant;

use crate::point::PointId;
use crate::reshard::Move;

use super::queue::Queue;

/// What the moves of a listing were planned for: the two rings' versions and the plugins'
/// generation.
pub(super) type MovesKey = (u64, u64, u64);

/// One listing of the points held, what was removed since, and the moves planned over it.
pub(super) struct Listing {
    /// The store's generation when listed.
    pub(super) generation: u64,
    /// When it was listed.
    pub(super) at: Instant,
    /// Every point held when listed, in the store's order.
    points: Vec<PointId>,
    /// The points of `points` removed since.
    removed: HashSet<PointId>,
    /// The moves of the points held last planned, between the rings (and with the placement
    /// plugins) of the key, as they are taken.
    pub(super) moves: Option<(MovesKey, Queue)>,
}

impl Listing {
    /// The first listing: nothing planned yet.
    pub(super) fn new(generation: u64, at: Instant, points: Vec<PointId>) -> Self {
        Self {
            generation,
            at,
            points,
            removed: HashSet::new(),
            moves: None,
        }
    }

    /// The listing of `points` that follows this one. The moves planned stay (for the same
    /// rings and plugins, a point's move does not change): those of the points gone leave, and
    /// only the points new since (a point removed and made again among them) wait to be
    /// planned.
    pub(super) fn relisted(self, generation: u64, at: Instant, points: Vec<PointId>) -> Self {
        let before = self.held();
        let moves = self.moves.map(|(key, mut queue)| {
            queue.relist(&before, &points);
            (key, queue)
        });
        Self {
            moves,
            ..Self::new(generation, at, points)
        }
    }

    /// Notes that `removed` are gone, and takes their moves out.
    pub(super) fn remove(&mut self, removed: HashSet<PointId>) {
        if let Some((_, queue)) = &mut self.moves {
            removed.iter().for_each(|point| queue.remove(point));
        }
        self.removed.extend(removed);
    }

    /// The points held: those listed, less those removed since.
    pub(super) fn held(&self) -> Vec<PointId> {
        self.points
            .iter()
            .filter(|point| !self.removed.contains(*point))
            .cloned()
            .collect()
    }

    /// The points to plan for `key`: every point held if the moves were planned for other
    /// rings or plugins (or not yet), else those listed since and not planned yet; `None` when
    /// the moves for `key` are whole.
    pub(super) fn to_plan(&self, key: MovesKey) -> Option<Vec<PointId>> {
        match &self.moves {
            Some((planned_for, queue)) if *planned_for == key => {
                Some(queue.unplanned()).filter(|unplanned| !unplanned.is_empty())
            }
            _ => Some(self.held()),
        }
    }

    /// Takes the moves planned for `key` of the points of [`to_plan`](Self::to_plan).
    pub(super) fn planned(&mut self, key: MovesKey, planned: &[PointId], moves: Vec<Move>) {
        match &mut self.moves {
            Some((planned_for, queue)) if *planned_for == key => {
                queue.add_planned(planned, moves);
            }
            _ => self.moves = Some((key, Queue::new(moves))),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::queue::tests::{point, points, to_b};
    use super::*;
    use crate::reshard::planner::Planner;

    fn sorted(mut points: Vec<PointId>) -> Vec<PointId> {
        points.sort();
        points
    }

    #[test]
    fn points_removed_leave_the_held_and_the_moves_and_one_made_again_is_planned_again() {
        let key = (1, 2, 0);
        let now = Instant::now();
        let planner = Planner::new(10, Duration::ZERO);
        let handovers = super::super::Handovers::new();
        let listed: Vec<PointId> = (0..5).map(point).collect();
        let mut listing = Listing::new(7, now, listed.clone());
        // Nothing planned yet: every point held is to plan.
        assert_eq!(listing.to_plan(key), Some(listed.clone()));
        listing.planned(key, &listed, (0..5).map(to_b).collect());
        assert_eq!(listing.to_plan(key), None);

        // 1 and 3 are removed: neither is held or moved any more; the listing is not walked.
        listing.remove([point(1), point(3)].into_iter().collect());
        assert_eq!(listing.held(), [point(0), point(2), point(4)]);
        let (_, queue) = listing.moves.as_mut().unwrap();
        let next = points(&queue.next(&handovers, &planner, now));
        assert_eq!(next, [point(0), point(2), point(4)]);

        // Listed again: 1 was made again, 5 is new, 3 stays gone. Only 1 and 5 wait to be
        // planned; the moves planned stay.
        let again: Vec<PointId> = [0, 1, 2, 4, 5].into_iter().map(point).collect();
        let mut listing = listing.relisted(8, now, again.clone());
        assert_eq!(listing.held(), again);
        let to_plan = listing.to_plan(key).map(sorted);
        assert_eq!(to_plan, Some(vec![point(1), point(5)]));

        // Planned for the same rings, they join the queue.
        listing.planned(key, &[point(1), point(5)], vec![to_b(1), to_b(5)]);
        assert_eq!(listing.to_plan(key), None);
        let (_, queue) = listing.moves.as_mut().unwrap();
        let next = points(&queue.next(&handovers, &planner, now));
        assert_eq!(sorted(next), again);

        // For other rings, the plan starts over, from every point held.
        assert_eq!(listing.to_plan((1, 3, 0)), Some(again.clone()));
        listing.planned((1, 3, 0), &again, vec![to_b(4)]);
        let (_, queue) = listing.moves.as_mut().unwrap();
        assert_eq!(queue.next(&handovers, &planner, now).len(), 1);
    }
}
