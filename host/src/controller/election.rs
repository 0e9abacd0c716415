//! The controller leader's decision to fence a group leader and name another
//! (`docs/failover.md`): plain state in, the commands to propose out. The loop that runs it on
//! the controller leader and proposes what it returns is `Controller::fence_expired`.
//!
//! A group fails over when its leader's session expired ([`Sessions::expired`]: never before
//! the controller leader itself has led for a whole session) or its leader came back from a
//! stop that was not clean ([`Group::leader_unclean`](super::Group::leader_unclean)), its
//! leader reported that it may fail over by itself ([`Failover::Automatic`]), and a member of
//! its in-sync set holds a live session (a follower the controller cannot hear is no better a
//! leader): of those, the one that said in its last heartbeat it holds the most
//! ([`Group::most_caught_up`](super::Group::most_caught_up)).

use std::collections::BTreeMap;
use std::time::Instant;

use super::Command;
use super::session::Sessions;
use super::state::Topology;
use crate::config::Failover;

/// What is due on the controller leader now.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Due {
    /// A fence of each group leader that must be replaced, naming a new leader for each group
    /// it leads that has a live in-sync member, with why it is replaced.
    pub fences: Vec<(Command, Cause)>,
    /// The groups whose leader must be replaced with no live in-sync member, as (slot, leader,
    /// why): they take no writes until one is back (or an operator decides).
    pub stranded: Vec<(String, String, Cause)>,
}

/// Why a group leader is replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Cause {
    /// Its session expired: it is down, or cut off from the controller.
    Expired,
    /// It came back from a stop that was not clean, and may have lost acknowledged bytes that
    /// its in-sync members hold.
    Unclean,
}

impl Cause {
    /// The value of the `cause` label of `goutube_failovers_total`.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Cause::Expired => "expired",
            Cause::Unclean => "unclean",
        }
    }
}

/// What the controller leader, leading in `term`, should decide now ([`Due`]).
pub(super) fn fences(topology: &Topology, sessions: &Sessions, term: u64, now: Instant) -> Due {
    let mut leaders: BTreeMap<(&str, Cause), BTreeMap<String, String>> = BTreeMap::new();
    let mut stranded = Vec::new();
    for (slot, group) in &topology.groups {
        if matches!(group.failover, Failover::Manual(_)) {
            continue;
        }
        let cause = if sessions.expired(term, &group.leader, now) {
            Cause::Expired
        } else if group.leader_unclean {
            Cause::Unclean
        } else {
            continue;
        };
        let live = |member: &str| sessions.live(term, member, now);
        match group.most_caught_up(live, |member| sessions.held(term, member)) {
            Some(candidate) => {
                let named = leaders.entry((&group.leader, cause)).or_default();
                named.insert(slot.clone(), candidate.to_owned());
            }
            // An in-sync member may not have been heard yet by a controller leader that
            // has led for less than a session: the leader back unclean waits meanwhile.
            None if cause == Cause::Unclean && !sessions.settled(term, now) => {}
            None => stranded.push((slot.clone(), group.leader.clone(), cause)),
        }
    }
    let fences = leaders
        .into_iter()
        .map(|((member, cause), leaders)| {
            let member = member.to_owned();
            (Command::Fence { member, leaders }, cause)
        })
        .collect();
    Due { fences, stranded }
}

/// Why an operator's forget of `member` should wait, if it should: a group it leads fails over
/// by itself and a member of the group's in-sync set is `live` (gossip's view), so the
/// controller names that member once `member`'s session expires. A forget meanwhile would race
/// the fence, and take the points over from followers' copies that the election keeps whole.
pub(crate) fn fails_over_by_itself(
    topology: &Topology,
    member: &str,
    live: impl Fn(&str) -> bool,
) -> Option<String> {
    topology.led_by(member).find_map(|(slot, group)| {
        let successor = group.successor(&live)?;
        Some(format!(
            "the group of {slot}, which {member} leads, fails over by itself: its in-sync \
             member {successor} takes it over once {member}'s session expires (wait for that \
             instead of forgetting {member})"
        ))
    })
}

/// Why an operator's election of `to` outside the in-sync set of `slot`'s group should not be
/// made, if it should not (`live`: gossip's view): the group has no leader to replace (its
/// leader is live: a transfer moves it without a loss), the group fails over by itself and a
/// member of its in-sync set is live (the controller names it, losing nothing), or `to` is
/// not live to take writes. What the state machine checks (the group, `to` its follower) is left
/// to it.
pub(crate) fn elect_unclean_refused(
    topology: &Topology,
    slot: &str,
    to: &str,
    live: impl Fn(&str) -> bool,
) -> Option<String> {
    let group = topology.groups.get(slot)?;
    if group.leader == to {
        // Keeping a leader back from an unclean stop: refused while the controller can name a
        // member of the in-sync set instead.
        let member = group.successor(&live).filter(|_| group.leader_unclean)?;
        return Some(format!(
            "{member}, of the in-sync set of {slot}, is live and holds every acknowledged byte, \
             which {to}, back from a stop that was not clean, may have lost: the controller \
             names {member}"
        ));
    }
    if live(&group.leader) {
        return Some(format!(
            "{leader}, the leader of {slot}, is live: move the group with `goutube members \
             transfer {leader} --to {to}`, which loses nothing",
            leader = group.leader
        ));
    }
    if let Some(member) = group.successor(&live) {
        return Some(format!(
            "{member}, of the in-sync set of {slot}, is live and holds every acknowledged byte: \
             the controller names it once {leader}'s session expires",
            leader = group.leader
        ));
    }
    if !live(to) {
        return Some(format!("{to} is not live: it could take no writes"));
    }
    None
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::controller::Group;

    const SESSION: Duration = Duration::from_secs(3);

    fn group(leader: &str, in_sync: &[&str], failover: Failover) -> Group {
        let names = |names: &[&str]| names.iter().map(|n| (*n).to_owned()).collect();
        Group {
            leader: leader.into(),
            leader_epoch: 7,
            followers: names(in_sync),
            in_sync: names(in_sync),
            failover,
            leader_unclean: false,
        }
    }

    #[test]
    fn only_an_expired_leader_of_a_group_that_may_fail_over_is_fenced_for_a_live_in_sync_member() {
        let manual = Failover::Manual("ack = local".into());
        let topology = Topology {
            groups: [
                (
                    "a",
                    group("a", &["fa1", "fa2"], Failover::Automatic { replicas: 1 }),
                ),
                (
                    "b",
                    group("b", &["fb"], Failover::Automatic { replicas: 1 }),
                ),
                ("c", group("c", &["fc"], manual)),
                ("d", group("d", &[], Failover::Automatic { replicas: 1 })),
                (
                    "e",
                    group("e", &["fe"], Failover::Automatic { replicas: 1 }),
                ),
            ]
            .into_iter()
            .map(|(slot, group)| (slot.to_owned(), group))
            .collect(),
            ..Topology::default()
        };
        let t0 = Instant::now();
        let mut sessions = Sessions::new(SESSION);
        sessions.elected(1, t0);
        // a, c, d and e go quiet; b and every follower but fa1 and fe keep heartbeating.
        for member in ["b", "fa2", "fb", "fc", "fe", "e"] {
            sessions.heartbeat(1, member, 0, t0 + Duration::from_secs(2));
        }
        let none = fences(&topology, &sessions, 1, t0 + Duration::from_millis(2999));
        assert_eq!(none, Due::default(), "nobody expires within a session");

        let later = t0 + Duration::from_millis(3000);
        let Due {
            fences: due,
            stranded,
        } = fences(&topology, &sessions, 1, later);
        assert_eq!(
            due,
            [(
                Command::Fence {
                    member: "a".into(),
                    leaders: [("a".to_owned(), "fa2".to_owned())].into(),
                },
                Cause::Expired
            )],
            "a's live in-sync follower; c fails over only by hand; b and e are alive"
        );
        assert_eq!(
            stranded,
            [("d".to_owned(), "d".to_owned(), Cause::Expired)],
            "d has nobody"
        );
        assert!(
            fences(&topology, &sessions, 2, later).fences.is_empty(),
            "nothing in a term this voter does not lead"
        );
    }

    #[test]
    fn the_in_sync_member_that_holds_the_most_is_named() {
        let topology = Topology {
            groups: [(
                "a".to_owned(),
                group(
                    "a",
                    &["fa1", "fa2", "fa3"],
                    Failover::Automatic { replicas: 1 },
                ),
            )]
            .into(),
            ..Topology::default()
        };
        let t0 = Instant::now();
        let named = |held: [u64; 3]| {
            let mut sessions = Sessions::new(SESSION);
            sessions.elected(1, t0);
            for (member, held) in ["fa1", "fa2", "fa3"].into_iter().zip(held) {
                sessions.heartbeat(1, member, held, t0 + Duration::from_secs(2));
            }
            let due = fences(&topology, &sessions, 1, t0 + SESSION);
            match &due.fences[..] {
                [(Command::Fence { leaders, .. }, Cause::Expired)] => leaders["a"].clone(),
                other => panic!("{other:?}"),
            }
        };
        assert_eq!(
            named([900, 1_000, 950]),
            "fa2",
            "the one that holds the most"
        );
        assert_eq!(
            named([1_000, 1_000, 999]),
            "fa1",
            "the first by name among equals"
        );
        assert_eq!(named([0, 0, 0]), "fa1", "nobody said: the first by name");
        assert_eq!(named([5, 7, 7]), "fa2");
    }

    #[test]
    fn a_forget_waits_while_a_live_in_sync_member_can_take_the_group_over() {
        let topology = Topology {
            groups: [
                (
                    "a",
                    group("a", &["fa1", "fa2"], Failover::Automatic { replicas: 1 }),
                ),
                (
                    "c",
                    group("c", &["fc"], Failover::Manual("ack = local".into())),
                ),
                ("d", group("d", &[], Failover::Automatic { replicas: 1 })),
            ]
            .into_iter()
            .map(|(slot, group)| (slot.to_owned(), group))
            .collect(),
            ..Topology::default()
        };
        let live = |live: &'static [&'static str]| move |m: &str| live.contains(&m);
        let waits = fails_over_by_itself(&topology, "a", live(&["fa2"]));
        assert!(
            waits.as_deref().is_some_and(|why| why.contains("fa2")),
            "{waits:?}"
        );
        assert_eq!(
            fails_over_by_itself(&topology, "a", live(&[])),
            None,
            "nobody in sync is live: only a forget helps"
        );
        assert_eq!(
            fails_over_by_itself(&topology, "c", live(&["fc"])),
            None,
            "a group that fails over only by hand"
        );
        assert_eq!(fails_over_by_itself(&topology, "d", live(&[])), None);
        assert_eq!(
            fails_over_by_itself(&topology, "b", live(&["fa1"])),
            None,
            "leads nothing"
        );
    }

    #[test]
    fn an_unclean_election_is_made_only_when_nothing_better_is() {
        let mut automatic = group("a", &["fa1"], Failover::Automatic { replicas: 1 });
        automatic.followers.insert("fa2".into());
        let mut manual = group("c", &["fc1"], Failover::Manual("ack = local".into()));
        manual.followers.insert("fc2".into());
        let topology = Topology {
            groups: [("a".to_owned(), automatic), ("c".to_owned(), manual)].into(),
            ..Topology::default()
        };
        let live = |live: &'static [&'static str]| move |m: &str| live.contains(&m);
        let refused = |slot, to, alive| elect_unclean_refused(&topology, slot, to, live(alive));
        let why = refused("a", "fa2", &["a", "fa2"]).unwrap();
        assert!(
            why.contains("transfer a --to fa2"),
            "the leader is live: {why}"
        );
        let why = refused("a", "fa2", &["fa1", "fa2"]).unwrap();
        assert!(why.contains("fa1"), "an in-sync member is live: {why}");
        let why = refused("a", "fa2", &[]).unwrap();
        assert!(why.contains("fa2 is not live"), "{why}");
        assert_eq!(refused("a", "fa2", &["fa2"]), None, "nobody better is live");
        // A group that fails over only by hand: the election an operator asks is made.
        assert_eq!(refused("c", "fc2", &["fc1", "fc2"]), None);
        // Already its leader, or no such group: the state machine answers.
        assert_eq!(refused("a", "a", &[]), None);
        assert_eq!(refused("x", "fa2", &[]), None);

        // Keeping a leader back from an unclean stop: only once no in-sync member is live.
        let mut unclean = group("a", &["fa1"], Failover::Automatic { replicas: 1 });
        unclean.leader_unclean = true;
        let topology = Topology {
            groups: [("a".to_owned(), unclean)].into(),
            ..Topology::default()
        };
        let why = elect_unclean_refused(&topology, "a", "a", live(&["a", "fa1"])).unwrap();
        assert!(why.contains("the controller names fa1"), "{why}");
        assert_eq!(
            elect_unclean_refused(&topology, "a", "a", live(&["a"])),
            None
        );
    }

    #[test]
    fn a_leader_back_from_an_unclean_stop_is_replaced_at_once_by_a_live_in_sync_member() {
        let automatic = Failover::Automatic { replicas: 1 };
        let mut back = group("a", &["fa1", "fa2"], automatic.clone());
        back.leader_unclean = true;
        let mut alone = group("b", &["fb"], automatic.clone());
        alone.leader_unclean = true;
        let topology = Topology {
            groups: [
                ("a".to_owned(), back),
                ("b".to_owned(), alone),
                ("c".to_owned(), group("c", &["fc"], automatic)),
            ]
            .into(),
            ..Topology::default()
        };
        let t0 = Instant::now();
        let mut sessions = Sessions::new(SESSION);
        sessions.elected(1, t0);
        // Everyone heartbeats but fb; no session has expired.
        let heard = |sessions: &mut Sessions, at: Instant| {
            for member in ["a", "b", "c", "fa1", "fa2", "fc"] {
                sessions.heartbeat(1, member, 0, at);
            }
            sessions.heartbeat(1, "fa2", 10, at);
        };
        heard(&mut sessions, t0);
        let soon = fences(&topology, &sessions, 1, t0 + Duration::from_millis(10));
        assert_eq!(soon.fences.len(), 1, "{soon:?}");
        assert!(
            soon.stranded.is_empty(),
            "fb may not have been heard yet by a controller leader of 10 ms"
        );
        heard(&mut sessions, t0 + Duration::from_secs(2));
        let Due {
            fences: due,
            stranded,
        } = fences(&topology, &sessions, 1, t0 + SESSION);
        assert_eq!(
            due,
            [(
                Command::Fence {
                    member: "a".into(),
                    leaders: [("a".to_owned(), "fa2".to_owned())].into(),
                },
                Cause::Unclean
            )],
            "without waiting for a session to expire: the in-sync member that holds the most"
        );
        assert_eq!(
            stranded,
            [("b".to_owned(), "b".to_owned(), Cause::Unclean)],
            "fb is not live: b waits for it (or an operator)"
        );
    }
}
