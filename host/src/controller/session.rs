//! Sessions: how the controller knows that a group's leader is alive, and how a leader knows
//! that it may still take writes (`docs/failover.md`). Both sides are plain state with explicit
//! times; the RPC that carries a heartbeat is in `service.rs`, the loop that sends it in
//! `heartbeat.rs`.
//!
//! - Every member heartbeats the controller leader (`Heartbeat`, an RPC, not a log entry). The
//!   leader keeps what it heard in memory ([`Sessions`]) and grants a session of
//!   `controller.session_ms` from the moment it received the heartbeat.
//! - A new controller leader knows nothing of who it heard before: everyone's session runs from
//!   the moment it started to lead, so nobody expires before the new leader has led for a whole
//!   session ("a full grant before fencing anyone").
//! - The member counts its session from the moment it *sent* the heartbeat, which is before the
//!   controller received it, and stops taking writes after [`FENCE_AT`] of it ([`Lease`]). So
//!   a leader has stopped writing before the controller can find its session expired, whatever
//!   the network delays; the rest of the session is the margin for clocks that run at slightly
//!   different rates.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use tokio::sync::watch;

/// The part of its session after which a member stops taking writes (three quarters).
pub const FENCE_AT: (u32, u32) = (3, 4);

/// How many heartbeats a member sends in one session: several may be lost before it fences
/// itself.
pub const HEARTBEATS_PER_SESSION: u32 = 6;

/// How long a client is told to wait before it retries a write refused while a group has no
/// leader that can take it (an election, a leader without a session): one heartbeat of a
/// session of `session_ms`, the pace at which the controller's state can change.
pub fn retry_delay(session_ms: u64) -> Duration {
    Duration::from_millis(session_ms) / HEARTBEATS_PER_SESSION
}

/// What this member holds of its group's points, in bytes, as it reports it in each heartbeat
/// (a follower counts the ends it offered its leader, then what it applies). A hint for the
/// election's choice among members that each hold every acknowledged byte, never for safety.
#[derive(Debug, Default)]
pub struct Held(std::sync::atomic::AtomicU64);

impl Held {
    /// Counts `bytes` held from now on.
    pub fn set(&self, bytes: u64) {
        self.0.store(bytes, std::sync::atomic::Ordering::Relaxed);
    }

    /// Counts `bytes` more.
    pub fn add(&self, bytes: u64) {
        self.0
            .fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
    }

    /// The bytes counted.
    pub fn get(&self) -> u64 {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// The controller leader's record of who it heard, for one term of its leadership.
#[derive(Debug)]
pub struct Sessions {
    length: Duration,
    leading: Option<Leading>,
}

#[derive(Debug)]
struct Leading {
    term: u64,
    since: Instant,
    heard: HashMap<String, Instant>,
    /// What each member said it holds in its last heartbeat.
    held: HashMap<String, u64>,
}

impl Sessions {
    /// Sessions of `length`, before this node leads.
    pub fn new(length: Duration) -> Self {
        Sessions {
            length,
            leading: None,
        }
    }

    /// The length of a session.
    pub fn length(&self) -> Duration {
        self.length
    }

    /// Records a heartbeat from `member`, received at `now` while this node leads in `term`
    /// (checked by the caller); returns the session granted, counted from `now`.
    /// `held` is what it says it holds of its group's points ([`Held`]).
    pub fn heartbeat(&mut self, term: u64, member: &str, held: u64, now: Instant) -> Duration {
        let leading = self.lead(term, now);
        leading.heard.insert(member.to_owned(), now);
        leading.held.insert(member.to_owned(), held);
        self.length
    }

    /// What `member` said it holds in its last heartbeat in `term` (0 if not heard).
    pub fn held(&self, term: u64, member: &str) -> u64 {
        let leading = self.leading.as_ref().filter(|leading| leading.term == term);
        leading
            .and_then(|leading| leading.held.get(member).copied())
            .unwrap_or(0)
    }

    /// Whether `member`'s session expired at `now`, for this node leading in `term`: it was
    /// not heard for a whole session, counted from its last heartbeat or from when this node
    /// started to lead, whichever is later. `false` while this node does not lead in `term`.
    pub fn expired(&self, term: u64, member: &str, now: Instant) -> bool {
        self.last(term, member)
            .is_some_and(|last| now.saturating_duration_since(last) >= self.length)
    }

    /// Whether `member` was heard in `term` within the last session.
    pub fn live(&self, term: u64, member: &str, now: Instant) -> bool {
        let heard = self
            .leading
            .as_ref()
            .filter(|leading| leading.term == term)
            .and_then(|leading| leading.heard.get(member));
        heard.is_some_and(|heard| now.saturating_duration_since(*heard) < self.length)
    }

    /// Whether this node has led in `term` for a whole session at `now`: every live member
    /// has been heard since.
    pub fn settled(&self, term: u64, now: Instant) -> bool {
        let leading = self.leading.as_ref().filter(|leading| leading.term == term);
        leading.is_some_and(|leading| now.saturating_duration_since(leading.since) >= self.length)
    }

    /// This node no longer leads, or lost its quorum: the next heartbeat or election starts a
    /// table of its own (everyone's session running from then).
    pub fn step_down(&mut self) {
        self.leading = None;
    }

    /// When the session of `member` started to run for the last time, as this node leading in
    /// `term` counts it.
    fn last(&self, term: u64, member: &str) -> Option<Instant> {
        let leading = self.leading.as_ref().filter(|l| l.term == term)?;
        let heard = leading.heard.get(member).copied();
        Some(heard.map_or(leading.since, |heard| heard.max(leading.since)))
    }

    /// The table for `term`: a new one (everyone's session running from `now`) for a term not
    /// seen before.
    fn lead(&mut self, term: u64, now: Instant) -> &mut Leading {
        if self.leading.as_ref().is_none_or(|l| l.term != term) {
            self.leading = Some(Leading {
                term,
                since: now,
                heard: HashMap::new(),
                held: HashMap::new(),
            });
        }
        self.leading.as_mut().expect("set above")
    }

    /// Starts the table of `term` at `now` if it is not started (a leader that was elected, or
    /// that has a quorum again, counts everyone's session from then, heard or not).
    pub fn elected(&mut self, term: u64, now: Instant) {
        self.lead(term, now);
    }
}

/// A member's side of its session: until when it may take writes. Shared by the heartbeat loop
/// (which extends it), the write gate (which reads it) and the replication port (which waits
/// for the first grant of a member back from an unclean stop).
#[derive(Debug)]
pub struct Lease {
    until: watch::Sender<Option<Instant>>,
}

impl Default for Lease {
    fn default() -> Self {
        Self {
            until: watch::Sender::new(None),
        }
    }
}

impl Lease {
    /// The controller granted a session of `session` to a heartbeat sent at `sent`: writes may
    /// go on until [`FENCE_AT`] of it. A late answer to an older heartbeat never shortens it.
    pub fn granted(&self, sent: Instant, session: Duration) {
        let (numerator, denominator) = FENCE_AT;
        let until = sent + session * numerator / denominator;
        self.until.send_if_modified(|current| {
            let longer = current.is_none_or(|current| current < until);
            if longer {
                *current = Some(until);
            }
            longer
        });
    }

    /// Whether writes may go on at `now`.
    pub fn holds(&self, now: Instant) -> bool {
        self.until.borrow().is_some_and(|until| now < until)
    }

    /// How long ago the session lapsed at `now` (`None` while it holds, or before any grant).
    pub fn lapsed_for(&self, now: Instant) -> Option<Duration> {
        let until = (*self.until.borrow())?;
        (now >= until).then(|| now - until)
    }

    /// Whether the controller granted this member a session since it started (held or lapsed
    /// since).
    pub fn granted_once(&self) -> bool {
        self.until.borrow().is_some()
    }

    /// Resolves once the controller granted this member a session (at once if it did
    /// already). By then this member's view of the committed state holds every entry the
    /// controller had applied when it granted it.
    pub async fn first_granted(&self) {
        let mut until = self.until.subscribe();
        // The sender lives as long as `self`: the wait ends only by a grant.
        let _ = until.wait_for(Option::is_some).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SESSION: Duration = Duration::from_secs(3);

    fn ms(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    #[test]
    fn a_session_expires_a_whole_session_after_the_last_heartbeat() {
        let t0 = Instant::now();
        let mut sessions = Sessions::new(SESSION);
        assert_eq!(sessions.heartbeat(1, "a", 0, t0), SESSION);
        sessions.heartbeat(1, "a", 0, t0 + ms(1000));
        assert!(!sessions.expired(1, "a", t0 + ms(3999)));
        assert!(sessions.live(1, "a", t0 + ms(3999)));
        assert!(sessions.expired(1, "a", t0 + ms(4000)));
        assert!(!sessions.live(1, "a", t0 + ms(4000)));
        assert!(
            !sessions.expired(2, "a", t0 + ms(9000)),
            "nothing expires in a term this node does not lead"
        );
    }

    #[test]
    fn a_new_leader_grants_everyone_a_full_session_before_anyone_expires() {
        let t0 = Instant::now();
        let mut sessions = Sessions::new(SESSION);
        sessions.heartbeat(1, "a", 0, t0);
        // Term 2 starts at t0 + 5 s: "a" was heard long ago, in another term, and "b" never.
        sessions.elected(2, t0 + ms(5000));
        for member in ["a", "b"] {
            assert!(!sessions.expired(2, member, t0 + ms(7999)), "{member}");
            assert!(
                !sessions.live(2, member, t0 + ms(6000)),
                "{member}: not heard yet"
            );
            assert!(sessions.expired(2, member, t0 + ms(8000)), "{member}");
        }
        sessions.heartbeat(2, "a", 0, t0 + ms(7000));
        assert!(!sessions.expired(2, "a", t0 + ms(9999)));
        // Stepping down forgets the term; leading again in it is not possible (terms grow),
        // and a later term starts afresh.
        sessions.step_down();
        assert!(!sessions.expired(2, "b", t0 + ms(60_000)));
        sessions.elected(3, t0 + ms(60_000));
        assert!(!sessions.expired(3, "a", t0 + ms(62_000)));
    }

    #[test]
    fn a_member_stops_writing_before_the_controller_can_expire_it() {
        let t0 = Instant::now();
        let (lease, mut sessions) = (Lease::default(), Sessions::new(SESSION));
        assert!(!lease.holds(t0), "no writes before the first grant");
        // Sent at t0, received 200 ms later.
        let granted = sessions.heartbeat(1, "a", 0, t0 + ms(200));
        lease.granted(t0, granted);
        let stops = t0 + SESSION * FENCE_AT.0 / FENCE_AT.1;
        assert!(lease.holds(stops - ms(1)));
        assert!(!lease.holds(stops));
        assert_eq!(lease.lapsed_for(stops + ms(5)), Some(ms(5)));
        assert!(
            !sessions.expired(1, "a", stops),
            "the controller still counts it alive when it stops"
        );
        // A late answer to an older heartbeat does not shorten the lease.
        lease.granted(t0 + ms(1000), granted);
        lease.granted(t0, granted);
        assert!(lease.holds(stops + ms(999)));
    }
}
