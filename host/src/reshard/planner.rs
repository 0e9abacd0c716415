//! The mover's decisions, without I/O (the raft-rs shape: state in, actions out). The driver
//! (`replication::mover`) looks at the membership, asks the planner what to do, lists the store
//! and asks the placement plugin when told to, performs the actions it gets back, and reports
//! how each move ended. Everything time-dependent takes `now`, so the decisions are tested as
//! tables of situations below.
//!
//! A look ([`Planner::look`]) is in two steps, because listing a node's points is the costly
//! part: first what the ring and the live view say ([`Next`]), then, only when moves may be
//! due, the plan over the points held ([`Planner::plan`]).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::cluster::change::{Change, Forgotten, Pending, forgotten, pending};
use crate::cluster::ring::Ring;
use crate::cluster::{Handed, Lifecycle};
use crate::point::{Handover, PointId};
use crate::reshard::Move;

/// How long a failed move waits before it is tried again.
pub const RETRY_AFTER: Duration = Duration::from_secs(1);
/// A member says it is done with a change (drained: `left`; a join: `handed`) only after a plan
/// that started this long after it first saw the change found nothing to move: a point created
/// just before it saw the change (refused from then on) has landed by then.
pub const DONE_AFTER: Duration = Duration::from_secs(1);

/// What one move does with its point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Work {
    /// Hand it over (or finish handing it over).
    Move(Move),
    /// Give up a handover the plan no longer calls for.
    GiveUp(Move),
}

impl Work {
    /// The point, where it is and where it was going.
    pub fn planned(&self) -> &Move {
        match self {
            Work::Move(planned) | Work::GiveUp(planned) => planned,
        }
    }
}

/// What the driver does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Gossip `handed` (a join handed over: `<joining>@<target version>`), or clear it.
    Announce(Option<Handed>),
    /// Step to `left`: drained, every point is with its next owner.
    Leave,
    /// Stop the copy of this point before its fence: the plan no longer sends it there.
    Stop(PointId),
    /// Start this work for the handover to the ring of version `target_ring`.
    Start {
        /// The move, or the giving up of one.
        work: Work,
        /// The version of the ring the handover is for.
        target_ring: u64,
    },
}

/// What to do after the first step of a look.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Nothing more this time.
    Idle,
    /// This member was forgotten: ask about every copy it holds (`docs/resharding.md`), and
    /// report [`Planner::stepped_down`] once each had its answer.
    StepDown {
        /// The version of the ring it was forgotten in.
        ring_version: u64,
    },
    /// This member is joining: it turns active once every owner handed it its points.
    Join {
        /// This member.
        joining: String,
        /// The version of the ring the join leads to.
        version: u64,
    },
    /// List the points held and plan them: with the pending change and the ring it leads to,
    /// if any, and when this node first saw it.
    List {
        /// The pending change and the ring it leads to.
        pending: Option<Pending>,
        /// When this node first saw the change.
        since: Option<Instant>,
    },
}

/// The first step of a look: the actions due whatever the points are, and what to do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Look {
    /// Due now.
    pub actions: Vec<Action>,
    /// What to do after them.
    pub next: Next,
}

impl Look {
    fn idle(actions: Vec<Action>) -> Self {
        Look {
            actions,
            next: Next::Idle,
        }
    }
}

/// On a follower: the forgotten member whose points it hands over next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Takeover {
    /// The forgotten member.
    pub forgotten: Forgotten,
    /// What the follower announces (`handed`) once this one is done too.
    pub announcement: Handed,
}

/// How a move ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The destination owns the point.
    Done,
    /// Stopped by an [`Action::Stop`]: not a failure.
    Stopped,
    /// The point was deleted meanwhile: nothing to move, not tried again.
    Gone,
    /// It failed; tried again as the failure's kind says.
    Failed(Retry),
}

/// When a failed move is tried again, by the kind of its failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// At the next look (the connection dropped: dial again).
    Now,
    /// After the settle time (the destination refused the seal: let its view settle).
    AfterSettle,
    /// After [`RETRY_AFTER`].
    Later,
}

/// What the planner remembers between looks.
#[derive(Debug)]
pub struct Planner {
    /// Most moves at once (`reshard.max_concurrent_moves`; 0 pauses).
    limit: usize,
    /// How long the change and the view must stay the same before moves start.
    settle: Duration,
    /// Points being handed over now, and to whom.
    moving: HashMap<PointId, String>,
    /// Points whose last move failed, and when they may be tried again.
    failed: HashMap<PointId, Instant>,
    /// The pending change, the version of the ring it leads to, and when it was first seen.
    pending_since: Option<(Change, u64, Instant)>,
    /// The live view's id and when it was first seen.
    view_since: Option<(String, Instant)>,
    /// Whether handovers the plan does not call for may exist: after a start, a change of the
    /// pending change, a failed move. Without a pending change, points are looked at only then.
    strays: bool,
    /// On a forgotten member: the ring version at which every copy it held had its answer.
    stepped_down: Option<u64>,
}

impl Planner {
    /// A planner that runs at most `limit` moves at once, after a view settled for `settle`.
    pub fn new(limit: usize, settle: Duration) -> Self {
        Self {
            limit,
            settle,
            moving: HashMap::new(),
            failed: HashMap::new(),
            pending_since: None,
            view_since: None,
            strays: true,
            stepped_down: None,
        }
    }

    /// The points being handed over now, and to whom.
    pub fn moving(&self) -> &HashMap<PointId, String> {
        &self.moving
    }

    /// Most moves at once.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Whether a move of `point` may start at `now`: it is not moving, and its last move did not
    /// fail too recently to try again.
    pub fn may_start(&self, point: &PointId, now: Instant) -> bool {
        !self.moving.contains_key(point)
            && self
                .failed
                .get(point)
                .is_none_or(|not_before| now >= *not_before)
    }

    /// The first step of a look at the ring (as `local` sees it, with live view `view`): the
    /// actions due whatever the points are, and what to do next.
    pub fn look(&mut self, local: &str, ring: &Ring, view: &str, now: Instant) -> Look {
        if self.limit == 0 {
            // Paused by the operator.
            return Look::idle(Vec::new());
        }
        let version = ring.version();
        if ring
            .members
            .get(local)
            .is_some_and(|record| record.lifecycle == Lifecycle::Forgotten)
        {
            return match self.stepped_down {
                Some(done) if done == version => Look::idle(Vec::new()),
                _ => Look {
                    actions: Vec::new(),
                    next: Next::StepDown {
                        ring_version: version,
                    },
                },
            };
        }
        let pending = pending(ring);
        let mut actions = Vec::new();
        let since = match &pending {
            None => {
                if self.pending_since.take().is_some() {
                    self.strays = true;
                }
                actions.push(Action::Announce(None));
                if !std::mem::take(&mut self.strays) {
                    return Look::idle(actions);
                }
                None
            }
            Some(Pending { change, target }) => {
                let version = target.version();
                match &self.pending_since {
                    Some((seen, seen_version, since))
                        if seen == change && *seen_version == version =>
                    {
                        Some(*since)
                    }
                    _ => {
                        tracing::info!(?change, "the ring is changing");
                        self.strays = true;
                        self.pending_since = Some((change.clone(), version, now));
                        Some(now)
                    }
                }
            }
        };
        if let Some(Pending {
            change: Change::Join(joining),
            target,
        }) = &pending
            && joining == local
        {
            let next = Next::Join {
                joining: joining.clone(),
                version: target.version(),
            };
            return Look { actions, next };
        }
        // Only a settled view starts (or gives up) moves: the change and the live members the
        // same for `reshard.settle_ms`.
        let view_since = match &self.view_since {
            Some((id, since)) if id == view => *since,
            _ => {
                self.view_since = Some((view.to_owned(), now));
                now
            }
        };
        if let Some(since) = since
            && now.duration_since(since.max(view_since)) < self.settle
        {
            return Look::idle(actions);
        }
        Look {
            actions,
            next: Next::List { pending, since },
        }
    }

    /// The second step: the plan over the points this node holds in a handover (`held`, each
    /// with its record; a point in none cannot be a stray, so the others need not be listed)
    /// and the moves the pending change calls for (`moves`, from this node, in plan order: all
    /// of them, or the first ones that may start and those of every point held in a handover
    /// or moving; none means none is left).
    /// `started` is when the listing began.
    pub fn plan(
        &mut self,
        local: &str,
        pending: Option<&Pending>,
        since: Option<Instant>,
        held: &[(PointId, Option<Handover>)],
        moves: Vec<Move>,
        started: Instant,
    ) -> Vec<Action> {
        let mut actions = Vec::new();
        // Handovers the plan does not call for (the change was made or replaced, or this node
        // restarted) go first: a sealed one is finished, being moments from done; a copying
        // one is given up. A move of the same point elsewhere waits for them.
        let planned =
            |point: &PointId, to: &str| moves.iter().any(|m| m.point == *point && m.to == to);
        let mut work: Vec<(Work, u64)> = Vec::new();
        for (point, handover) in held {
            let stray = |to: &String| Move {
                point: point.clone(),
                from: local.to_owned(),
                to: to.clone(),
            };
            match handover {
                Some(Handover::Sealed {
                    to, target_ring, ..
                }) if !planned(point, to) => work.push((Work::Move(stray(to)), *target_ring)),
                Some(Handover::Copying { to, target_ring }) if !planned(point, to) => {
                    work.push((Work::GiveUp(stray(to)), *target_ring))
                }
                _ => {}
            }
        }
        // A copy under way to a member the plan no longer sends the point to stops before its
        // fence; the handover is then given up like any other stray.
        let mut stopped: Vec<&PointId> = self
            .moving
            .iter()
            .filter(|(point, to)| {
                let sealed = held.iter().any(|(held, handover)| {
                    held == *point && matches!(handover, Some(Handover::Sealed { .. }))
                });
                !sealed && !planned(point, to)
            })
            .map(|(point, _)| point)
            .collect();
        stopped.sort();
        actions.extend(stopped.into_iter().cloned().map(Action::Stop));
        let version = pending.map_or(0, |pending| pending.target.version());
        work.extend(moves.iter().cloned().map(|m| (Work::Move(m), version)));
        let settled = since.is_some_and(|since| started.duration_since(since) >= DONE_AFTER);
        if work.is_empty() && self.moving.is_empty() && settled {
            match pending.map(|pending| &pending.change) {
                Some(Change::Drain(member)) if member == local => actions.push(Action::Leave),
                Some(Change::Join(joining)) => {
                    actions.push(Action::Announce(Some(Handed::Join {
                        joining: joining.clone(),
                        version,
                    })));
                }
                _ => {}
            }
            return actions;
        }
        for (work, target_ring) in work {
            if self.moving.len() >= self.limit {
                break;
            }
            let planned = work.planned();
            if !self.may_start(&planned.point, started) {
                continue;
            }
            self.moving
                .insert(planned.point.clone(), planned.to.clone());
            actions.push(Action::Start { work, target_ring });
        }
        actions
    }

    /// A move the driver found itself (on a follower, a copy its new owner asked for) starts
    /// if it is within the limit and the point is not moving already.
    pub fn admit(&mut self, point: &PointId, to: &str) -> bool {
        if self.moving.len() >= self.limit || self.moving.contains_key(point) {
            return false;
        }
        self.moving.insert(point.clone(), to.to_owned());
        true
    }

    /// A started move could not begin (its destination was not reached): it counts as failed.
    pub fn unstarted(&mut self, point: &PointId, now: Instant) {
        self.moving.remove(point);
        self.failed.insert(point.clone(), now + RETRY_AFTER);
    }

    /// A move ended.
    pub fn ended(&mut self, point: &PointId, ended: Outcome, now: Instant) {
        self.moving.remove(point);
        match ended {
            Outcome::Done | Outcome::Gone => {
                self.failed.remove(point);
            }
            Outcome::Stopped => self.strays = true,
            Outcome::Failed(retry) => {
                self.strays = true;
                let wait = match retry {
                    Retry::Now => Duration::ZERO,
                    Retry::AfterSettle => self.settle,
                    Retry::Later => RETRY_AFTER,
                };
                self.failed.insert(point.clone(), now + wait);
            }
        }
    }

    /// Every copy this forgotten member held had its answer at `ring_version`: nothing is
    /// looked at again until the ring changes.
    pub fn stepped_down(&mut self, ring_version: u64) {
        self.stepped_down = Some(ring_version);
    }
}

/// On a follower: the forgotten member whose points it hands over next (the first one its
/// `handed` announcement does not list yet), and the announcement once that one is done too.
pub fn next_takeover(ring: &Ring, handed: Option<&Handed>) -> Option<Takeover> {
    let done = handed.map_or(&[][..], Handed::takeovers);
    let next = forgotten(ring)
        .into_iter()
        .find(|f| !done.contains(&f.tag))?;
    let mut tags = done.to_vec();
    tags.push(next.tag.clone());
    Some(Takeover {
        forgotten: next,
        announcement: Handed::Takeovers(tags),
    })
}

#[cfg(test)]
mod tests {

    use super::*;

    use crate::config::Role;

    const SETTLE: Duration = Duration::from_millis(500);

    /// A formed ring of `members`, each in its lifecycle state.
    fn ring(members: &[(&str, Lifecycle)]) -> Ring {
        Ring::of(members)
    }

    fn point(name: &str) -> PointId {
        PointId::new(name).unwrap()
    }

    fn moved(name: &str, from: &str, to: &str) -> Move {
        Move {
            point: point(name),
            from: from.into(),
            to: to.into(),
        }
    }

    fn start(m: Move, target_ring: u64) -> Action {
        Action::Start {
            work: Work::Move(m),
            target_ring,
        }
    }

    /// Looks at `ring` at `t0 + at`, then plans `held` and `moves` if told to list.
    struct Looks<'a> {
        planner: &'a mut Planner,
        t0: Instant,
    }

    impl Looks<'_> {
        fn at(
            &mut self,
            local: &str,
            ring: &Ring,
            view: &str,
            at: Duration,
            held: &[(PointId, Option<Handover>)],
            moves: Vec<Move>,
        ) -> (Vec<Action>, Next) {
            let now = self.t0 + at;
            let Look { mut actions, next } = self.planner.look(local, ring, view, now);
            if let Next::List { pending, since } = &next {
                actions.extend(self.planner.plan(
                    local,
                    pending.as_ref(),
                    *since,
                    held,
                    moves,
                    now,
                ));
            }
            (actions, next)
        }
    }

    #[test]
    fn a_drain_waits_to_settle_moves_its_points_within_the_limit_then_leaves() {
        let mut planner = Planner::new(2, SETTLE);
        let mut look = Looks {
            planner: &mut planner,
            t0: Instant::now(),
        };
        let draining = ring(&[("a", Lifecycle::Leaving), ("b", Lifecycle::Active)]);
        let target = pending(&draining).unwrap().target.version();
        let held: Vec<_> = ["p1", "p2", "p3"]
            .iter()
            .map(|p| (point(p), None))
            .collect();
        let moves: Vec<Move> = ["p1", "p2", "p3"]
            .iter()
            .map(|p| moved(p, "a", "b"))
            .collect();
        // Seen for the first time: nothing moves before the view has settled.
        let (actions, next) = look.at("a", &draining, "v1", Duration::ZERO, &held, moves.clone());
        assert_eq!((actions, next), (vec![], Next::Idle));
        // Settled: two moves (the limit), in point order.
        let (actions, _) = look.at("a", &draining, "v1", SETTLE, &held, moves.clone());
        assert_eq!(
            actions,
            vec![
                start(moves[0].clone(), target),
                start(moves[1].clone(), target)
            ]
        );
        // One ends: the third starts; nothing is started twice.
        look.planner
            .ended(&point("p1"), Outcome::Done, look.t0 + SETTLE);
        let (actions, _) = look.at(
            "a",
            &draining,
            "v1",
            SETTLE * 2,
            &held[1..],
            moves[1..].to_vec(),
        );
        assert_eq!(actions, vec![start(moves[2].clone(), target)]);
        // All done, and no point left: the drained member leaves.
        look.planner
            .ended(&point("p2"), Outcome::Done, look.t0 + SETTLE * 2);
        look.planner
            .ended(&point("p3"), Outcome::Done, look.t0 + SETTLE * 2);
        let (actions, _) = look.at("a", &draining, "v1", SETTLE * 4, &[], vec![]);
        assert_eq!(actions, vec![Action::Leave]);
    }

    #[test]
    fn a_member_says_it_is_done_only_after_a_plan_that_began_late_enough() {
        let mut planner = Planner::new(4, Duration::ZERO);
        let mut look = Looks {
            planner: &mut planner,
            t0: Instant::now(),
        };
        let draining = ring(&[("a", Lifecycle::Leaving), ("b", Lifecycle::Active)]);
        // Nothing to move, but the change was seen just now: a point created meanwhile may
        // still land.
        let (actions, _) = look.at("a", &draining, "v", Duration::ZERO, &[], vec![]);
        assert_eq!(actions, vec![]);
        let (actions, _) = look.at("a", &draining, "v", DONE_AFTER, &[], vec![]);
        assert_eq!(actions, vec![Action::Leave]);
        // Another member's drain is not this one's to finish.
        let (actions, _) = look.at("b", &draining, "v", DONE_AFTER * 3, &[], vec![]);
        assert_eq!(actions, vec![]);
    }

    #[test]
    fn a_join_is_announced_by_each_owner_and_the_joining_member_waits() {
        let mut planner = Planner::new(4, Duration::ZERO);
        let mut look = Looks {
            planner: &mut planner,
            t0: Instant::now(),
        };
        let joining = ring(&[("a", Lifecycle::Active), ("j", Lifecycle::Joining)]);
        let version = pending(&joining).unwrap().target.version();
        let p = moved("p", "a", "j");
        let (actions, _) = look.at(
            "a",
            &joining,
            "v",
            Duration::ZERO,
            &[(point("p"), None)],
            vec![p.clone()],
        );
        assert_eq!(actions, vec![start(p, version)]);
        look.planner.ended(&point("p"), Outcome::Done, look.t0);
        let (actions, _) = look.at("a", &joining, "v", DONE_AFTER, &[], vec![]);
        assert_eq!(
            actions,
            vec![Action::Announce(Some(Handed::Join {
                joining: "j".into(),
                version
            }))]
        );
        // The joining member itself hands nothing over: it waits for the owners.
        let mut other = Planner::new(4, Duration::ZERO);
        let next = other.look("j", &joining, "v", Instant::now()).next;
        assert_eq!(
            next,
            Next::Join {
                joining: "j".into(),
                version
            }
        );
        // Once the change is made, the announcement is cleared.
        let joined = ring(&[("a", Lifecycle::Active), ("j", Lifecycle::Active)]);
        let (actions, _) = look.at("a", &joined, "v", DONE_AFTER * 2, &[], vec![]);
        assert_eq!(actions, vec![Action::Announce(None)]);
    }

    #[test]
    fn a_target_that_changes_mid_move_stops_the_copy_and_gives_the_stray_up() {
        let mut planner = Planner::new(4, Duration::ZERO);
        let mut look = Looks {
            planner: &mut planner,
            t0: Instant::now(),
        };
        let first = ring(&[
            ("a", Lifecycle::Active),
            ("j", Lifecycle::Joining),
            ("k", Lifecycle::Active),
        ]);
        let v1 = pending(&first).unwrap().target.version();
        let to_j = moved("p", "a", "j");
        let (actions, _) = look.at(
            "a",
            &first,
            "v",
            Duration::ZERO,
            &[(point("p"), None)],
            vec![to_j.clone()],
        );
        assert_eq!(actions, vec![start(to_j.clone(), v1)]);
        // The plan now sends p to k: the copy to j stops before its fence.
        let copying = Some(Handover::Copying {
            to: "j".into(),
            target_ring: v1,
        });
        let to_k = moved("p", "a", "k");
        let (actions, _) = look.at(
            "a",
            &first,
            "v",
            DONE_AFTER,
            &[(point("p"), copying.clone())],
            vec![to_k.clone()],
        );
        assert_eq!(actions, vec![Action::Stop(point("p"))]);
        // Stopped: the stray handover to j is given up first; the move to k waits for it.
        look.planner
            .ended(&point("p"), Outcome::Stopped, look.t0 + DONE_AFTER);
        let (actions, _) = look.at(
            "a",
            &first,
            "v",
            DONE_AFTER * 2,
            &[(point("p"), copying)],
            vec![to_k.clone()],
        );
        assert_eq!(
            actions,
            vec![Action::Start {
                work: Work::GiveUp(to_j),
                target_ring: v1
            }]
        );
        // A sealed handover is finished, not stopped, whatever the plan says.
        let sealed = Some(Handover::Sealed {
            to: "j".into(),
            end: 10,
            crc: 0,
            target_ring: v1,
        });
        let mut fresh = Planner::new(4, Duration::ZERO);
        let Look { mut actions, next } = fresh.look("a", &first, "v", look.t0);
        if let Next::List { pending, since } = next {
            actions.extend(fresh.plan(
                "a",
                pending.as_ref(),
                since,
                &[(point("p"), sealed)],
                vec![],
                look.t0,
            ));
        }
        assert_eq!(
            actions,
            vec![Action::Start {
                work: Work::Move(moved("p", "a", "j")),
                target_ring: v1
            }]
        );
    }

    #[test]
    fn a_view_that_changes_while_settling_starts_the_wait_again() {
        let mut planner = Planner::new(4, SETTLE);
        let mut look = Looks {
            planner: &mut planner,
            t0: Instant::now(),
        };
        let draining = ring(&[("a", Lifecycle::Leaving), ("b", Lifecycle::Active)]);
        let held = [(point("p"), None)];
        let p = moved("p", "a", "b");
        let (actions, _) = look.at("a", &draining, "v1", Duration::ZERO, &held, vec![p.clone()]);
        assert_eq!(actions, vec![]);
        // Another member came or went just before the wait was over.
        let (actions, _) = look.at(
            "a",
            &draining,
            "v2",
            SETTLE - Duration::from_millis(1),
            &held,
            vec![p.clone()],
        );
        assert_eq!(actions, vec![]);
        let (actions, _) = look.at(
            "a",
            &draining,
            "v2",
            SETTLE + Duration::from_millis(100),
            &held,
            vec![p.clone()],
        );
        assert_eq!(actions, vec![]);
        let (actions, _) = look.at("a", &draining, "v2", SETTLE * 2, &held, vec![p.clone()]);
        let version = pending(&draining).unwrap().target.version();
        assert_eq!(actions, vec![start(p, version)]);
    }

    #[test]
    fn a_failed_move_waits_before_it_is_tried_again() {
        let mut planner = Planner::new(4, Duration::ZERO);
        let mut look = Looks {
            planner: &mut planner,
            t0: Instant::now(),
        };
        let draining = ring(&[("a", Lifecycle::Leaving), ("b", Lifecycle::Active)]);
        let version = pending(&draining).unwrap().target.version();
        let held = [(point("p"), None)];
        let p = moved("p", "a", "b");
        let (actions, _) = look.at("a", &draining, "v", Duration::ZERO, &held, vec![p.clone()]);
        assert_eq!(actions, vec![start(p.clone(), version)]);
        look.planner
            .ended(&point("p"), Outcome::Failed(Retry::Later), look.t0);
        let (actions, _) = look.at("a", &draining, "v", RETRY_AFTER / 2, &held, vec![p.clone()]);
        assert_eq!(actions, vec![]);
        let (actions, _) = look.at("a", &draining, "v", RETRY_AFTER, &held, vec![p.clone()]);
        assert_eq!(actions, vec![start(p.clone(), version)]);
        // A destination that was not reached counts the same.
        look.planner.unstarted(&point("p"), look.t0 + RETRY_AFTER);
        let (actions, _) = look.at("a", &draining, "v", RETRY_AFTER * 3 / 2, &held, vec![p]);
        assert_eq!(actions, vec![]);
    }

    #[test]
    fn a_failed_move_is_retried_by_kind() {
        let mut planner = Planner::new(4, SETTLE);
        let mut look = Looks {
            planner: &mut planner,
            t0: Instant::now(),
        };
        let draining = ring(&[("a", Lifecycle::Leaving), ("b", Lifecycle::Active)]);
        let version = pending(&draining).unwrap().target.version();
        let held = [(point("p"), None)];
        let p = moved("p", "a", "b");
        let (actions, _) = look.at("a", &draining, "v", Duration::ZERO, &held, vec![p.clone()]);
        assert_eq!(actions, vec![]);
        let (actions, _) = look.at("a", &draining, "v", SETTLE, &held, vec![p.clone()]);
        assert_eq!(actions, vec![start(p.clone(), version)]);
        // The connection dropped: dialed again at the next look.
        look.planner
            .ended(&point("p"), Outcome::Failed(Retry::Now), look.t0 + SETTLE);
        let (actions, _) = look.at("a", &draining, "v", SETTLE, &held, vec![p.clone()]);
        assert_eq!(actions, vec![start(p.clone(), version)]);
        // The seal was refused: the destination's view settles first.
        look.planner.ended(
            &point("p"),
            Outcome::Failed(Retry::AfterSettle),
            look.t0 + SETTLE,
        );
        let (actions, _) = look.at("a", &draining, "v", SETTLE * 3 / 2, &held, vec![p.clone()]);
        assert_eq!(actions, vec![]);
        let (actions, _) = look.at("a", &draining, "v", SETTLE * 2, &held, vec![p.clone()]);
        assert_eq!(actions, vec![start(p, version)]);
    }

    #[test]
    fn without_a_change_points_are_looked_at_only_after_a_start_or_a_failure() {
        let mut planner = Planner::new(4, Duration::ZERO);
        let stable = ring(&[("a", Lifecycle::Active), ("b", Lifecycle::Active)]);
        let now = Instant::now();
        // After a start: once, for handovers left by a crash.
        let next = planner.look("a", &stable, "v", now).next;
        assert_eq!(
            next,
            Next::List {
                pending: None,
                since: None
            }
        );
        let Look { actions, next } = planner.look("a", &stable, "v", now);
        assert_eq!((actions, next), (vec![Action::Announce(None)], Next::Idle));
        // A failure makes strays possible again.
        planner.ended(&point("p"), Outcome::Failed(Retry::Later), now);
        let next = planner.look("a", &stable, "v", now).next;
        assert_eq!(
            next,
            Next::List {
                pending: None,
                since: None
            }
        );
        // Paused by the operator: nothing at all.
        let mut paused = Planner::new(0, Duration::ZERO);
        assert_eq!(paused.look("a", &stable, "v", now), Look::idle(vec![]));
    }

    #[test]
    fn a_returning_forgotten_member_steps_down_once_per_ring() {
        let mut planner = Planner::new(4, Duration::ZERO);
        let forgotten_ring = ring(&[("a", Lifecycle::Forgotten), ("b", Lifecycle::Active)]);
        let version = forgotten_ring.version();
        let now = Instant::now();
        // It owns nothing and plans no moves: it asks about its copies until each is answered.
        let Look { actions, next } = planner.look("a", &forgotten_ring, "v", now);
        assert_eq!(
            (actions, next),
            (
                vec![],
                Next::StepDown {
                    ring_version: version
                }
            )
        );
        let next = planner.look("a", &forgotten_ring, "v", now).next;
        assert_eq!(
            next,
            Next::StepDown {
                ring_version: version
            }
        );
        planner.stepped_down(version);
        assert_eq!(
            planner.look("a", &forgotten_ring, "v", now),
            Look::idle(vec![])
        );
        // A new ring (another member joined): asked again.
        let grown = ring(&[
            ("a", Lifecycle::Forgotten),
            ("b", Lifecycle::Active),
            ("c", Lifecycle::Active),
        ]);
        let next = planner.look("a", &grown, "v", now).next;
        assert_eq!(
            next,
            Next::StepDown {
                ring_version: grown.version()
            }
        );
    }

    #[test]
    fn a_follower_takes_over_forgotten_members_one_at_a_time() {
        let two_forgotten = ring(&[
            ("a", Lifecycle::Forgotten),
            ("b", Lifecycle::Active),
            ("c", Lifecycle::Forgotten),
        ]);
        let said = |text: &str| Handed::decode(text, Role::Follower).unwrap();
        let Takeover {
            forgotten: first,
            announcement,
        } = next_takeover(&two_forgotten, None).unwrap();
        assert_eq!(
            (first.name.as_str(), announcement.to_string().as_str()),
            ("a", "takeover:a@1")
        );
        let Takeover {
            forgotten: second,
            announcement,
        } = next_takeover(&two_forgotten, Some(&said("takeover:a@1"))).unwrap();
        assert_eq!(
            (second.name.as_str(), announcement.to_string().as_str()),
            ("c", "takeover:a@1,c@1")
        );
        assert_eq!(
            next_takeover(&two_forgotten, Some(&said("takeover:a@1,c@1"))),
            None
        );
        // A member forgotten again (its record's version moved on) is taken over again.
        let mut again = two_forgotten.clone();
        again.members.get_mut("a").unwrap().version = 2;
        let Takeover {
            forgotten: first,
            announcement,
        } = next_takeover(&again, Some(&said("takeover:a@1,c@1"))).unwrap();
        assert_eq!(
            (
                (first.tag.name.as_str(), first.tag.version),
                announcement.to_string().as_str()
            ),
            (("a", 2), "takeover:a@1,c@1,a@2")
        );
    }
}
