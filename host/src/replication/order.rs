//! The order a follower's applier keeps: work on one point runs in the order it was queued,
//! work on different points runs at once.
//!
//! Each piece of work enters the queues of its points when the applier takes it (in arrival
//! order) and holds a [`Turn`] until it ends. It may start once every piece of work that entered
//! before it on any of its points has ended. A point with nothing queued has no entry, so the
//! map holds the points in flight only.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;

use tokio::sync::oneshot;

use crate::point::PointId;

/// The queues of the points with work in flight.
#[derive(Default)]
pub(super) struct PointOrder {
    /// Per point: the last work that entered, and the signal of its end for the next to wait on.
    last: RefCell<HashMap<PointId, Last>>,
    /// The number of the next work to enter.
    next: Cell<u64>,
}

struct Last {
    work: u64,
    ended: oneshot::Receiver<()>,
}

/// A piece of work's place in the queues of its points: it ends (and lets the work after it
/// start) when dropped. Work waits for [`Turn::started`] before it does anything, so a turn is
/// dropped unstarted only with every turn after it (the applier ending).
pub(super) struct Turn {
    order: Rc<PointOrder>,
    work: u64,
    /// The ends of the work before this one, on each of its points.
    before: Vec<oneshot::Receiver<()>>,
    /// Per point, the signal the next work waits on: sent by being dropped.
    held: Vec<(PointId, oneshot::Sender<()>)>,
}

impl PointOrder {
    /// Enters work on `points` (a point named twice counts once).
    pub(super) fn enter(self: &Rc<Self>, points: impl IntoIterator<Item = PointId>) -> Turn {
        let work = self.next.get();
        self.next.set(work + 1);
        let mut turn = Turn {
            order: self.clone(),
            work,
            before: Vec::new(),
            held: Vec::new(),
        };
        let mut last = self.last.borrow_mut();
        for point in points {
            if last.get(&point).is_some_and(|last| last.work == work) {
                continue;
            }
            let (end, ended) = oneshot::channel();
            if let Some(previous) = last.insert(point.clone(), Last { work, ended }) {
                turn.before.push(previous.ended);
            }
            turn.held.push((point, end));
        }
        turn
    }

    /// Whether no work on `point` is in flight.
    pub(super) fn is_idle(&self, point: &PointId) -> bool {
        !self.last.borrow().contains_key(point)
    }

    /// How many points have work in flight.
    #[cfg(test)]
    fn points_in_flight(&self) -> usize {
        self.last.borrow().len()
    }
}

impl Turn {
    /// Waits until the work entered before this one on its points has ended.
    pub(super) async fn started(&mut self) {
        for before in self.before.drain(..) {
            // A dropped sender is the end it signals.
            let _ = before.await;
        }
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        let mut last = self.order.last.borrow_mut();
        for (point, end) in self.held.drain(..) {
            if last.get(&point).is_some_and(|last| last.work == self.work) {
                last.remove(&point);
            }
            drop(end);
        }
    }
}

#[cfg(test)]
mod tests {
    use futures::FutureExt;

    use super::*;

    fn id(name: &str) -> PointId {
        PointId::new(name.to_owned()).unwrap()
    }

    fn has_started(turn: &mut Turn) -> bool {
        turn.started().now_or_never().is_some()
    }

    #[test]
    fn work_on_one_point_runs_in_the_order_it_entered() {
        let order = Rc::new(PointOrder::default());
        let mut first = order.enter([id("a")]);
        let mut second = order.enter([id("a")]);
        let mut third = order.enter([id("a")]);
        assert!(has_started(&mut first));
        assert!(!has_started(&mut second));
        drop(first);
        assert!(has_started(&mut second));
        assert!(!has_started(&mut third));
        drop(second);
        assert!(has_started(&mut third));
        drop(third);
        assert!(order.is_idle(&id("a")));
        assert_eq!(order.points_in_flight(), 0);
    }

    #[test]
    fn work_on_other_points_does_not_wait() {
        let order = Rc::new(PointOrder::default());
        let _a = order.enter([id("a")]);
        let mut b = order.enter([id("b")]);
        assert!(has_started(&mut b));
        assert!(!order.is_idle(&id("a")) && !order.is_idle(&id("b")));
        assert!(order.is_idle(&id("c")));
    }

    #[test]
    fn work_on_several_points_waits_for_each_and_holds_each() {
        let order = Rc::new(PointOrder::default());
        let a = order.enter([id("a")]);
        let b = order.enter([id("b")]);
        let mut both = order.enter([id("a"), id("b"), id("a")]);
        let mut after_on_b = order.enter([id("b")]);
        drop(a);
        assert!(!has_started(&mut both), "b's work is still in flight");
        drop(b);
        assert!(has_started(&mut both));
        assert!(!has_started(&mut after_on_b), "held by the work on both");
        drop(both);
        assert!(has_started(&mut after_on_b));
        assert!(order.is_idle(&id("a")));
        drop(after_on_b);
        assert_eq!(order.points_in_flight(), 0);
    }
}
