//! What this node's followers hold, as their leader sees it ([`Progress`]): per follower, the
//! end it confirmed of each point, whether its session is up, how far behind it is, and whether
//! it lost bytes it had confirmed. The replication thread records it; the API waits on it to
//! acknowledge a write; the controller's agent reads it to keep the group's in-sync set.
//!
//! **The in-sync set** (`docs/failover.md`). Under `ack = { replicas = N }` a write is
//! acknowledged once every follower the leader *waits for* confirmed it, and at least N
//! followers did. The leader waits for the committed in-sync set, and for each follower it is
//! about to propose from before it checks that the follower holds every end: so every member
//! of the committed set holds every acknowledged byte. It stops waiting for a member only once
//! the controller committed its removal. [`Progress::follow_group`] keeps who is waited for in
//! step with the committed group; [`Progress::in_sync_wanted`] decides what to ask the
//! controller. Both are functions of what this node recorded, the committed group and the
//! time, with no I/O.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::config::ReplicationSection;
use crate::controller::{Command, Group};
use crate::point::PointId;

/// How long a caught-up follower is waited for before it is proposed: its leader's next report
/// of its lag comes after the leader started waiting for it.
const SETTLE: Duration = Duration::from_millis(100);

/// What followers have confirmed, shared with the rest of the node.
pub struct Progress {
    state: Mutex<State>,
    /// Bumped on every change, so waiters wake up.
    changed: watch::Sender<u64>,
}

#[derive(Default)]
struct State {
    followers: BTreeMap<String, FollowerProgress>,
    /// The followers a write waits for; `None` until the committed in-sync set is known (a
    /// write under `ack = { replicas = N }` waits for it).
    waiting: Option<Waiting>,
    /// The group this node leads, if any: its leader epoch, and since when this node knows it
    /// leads at it. A member of the in-sync set is judged from then on: one not seen since
    /// counts as disconnected from that moment, not from before (a leader named by a failover
    /// or a transfer gives the other members the whole bound to connect to it).
    leading: Option<(u64, Instant)>,
}

/// The followers a write waits for.
#[derive(Debug, Default, PartialEq, Eq)]
struct Waiting {
    /// The committed in-sync set.
    committed: BTreeSet<String>,
    /// Followers caught up and about to be proposed, each with since when it is waited for.
    adding: BTreeMap<String, Instant>,
}

/// One follower's copy of one point, as its leader sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replica {
    pub follower: String,
    /// Where clients reach its API.
    pub rpc_address: String,
    /// The end it confirmed.
    pub end: u64,
    /// Whether its session is up now.
    pub connected: bool,
}

/// When a follower confirms a write, as it said when it connected.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Durability {
    /// After its own fsync (`storage.fsync = "always"`): what it confirmed survives its crash.
    Synced,
    /// Before the bytes are synced: a crash of it may lose what it confirmed. Such a follower
    /// counts toward `ack = { replicas = N }` but never enters the in-sync set.
    #[default]
    Unsynced,
}

/// One follower, as its leader sees it.
#[derive(Debug, Clone, Default)]
struct FollowerProgress {
    /// Where clients reach its API.
    rpc_address: String,
    connected: bool,
    durability: Durability,
    /// Per point, the end the follower confirmed.
    confirmed: HashMap<PointId, u64>,
    /// Per point not confirmed again in this session, what it had confirmed before.
    before: HashMap<PointId, u64>,
    /// Bytes this leader holds that it had not confirmed at the last report of this session.
    lag: Option<u64>,
    /// When a report last found it holding everything.
    caught_up_at: Option<Instant>,
    /// Since when it has been disconnected, or behind by more than the bound.
    behind_since: Option<Instant>,
    /// A point it confirmed less of than before: bytes it had confirmed are gone.
    lost: Option<PointId>,
}

/// The bounds of the in-sync set (`[replication]`).
#[derive(Debug, Clone, Copy)]
pub struct InSyncBounds {
    /// How long a member may be disconnected or behind before it is taken out.
    pub timeout: Duration,
    /// Unconfirmed bytes past which a member counts as behind.
    pub max_lag_bytes: u64,
}

impl InSyncBounds {
    pub fn of(section: &ReplicationSection) -> Self {
        Self {
            timeout: Duration::from_millis(section.in_sync_timeout_ms),
            max_lag_bytes: section.in_sync_max_lag_bytes,
        }
    }
}

/// Why a write is not acknowledged yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Short {
    /// The committed in-sync set is not known here yet.
    InSyncUnknown,
    /// A follower the leader waits for has not confirmed `point` up to `end`.
    Waiting {
        follower: String,
        point: PointId,
        end: u64,
    },
    /// Fewer than the replicas asked for confirmed `point` up to `end`.
    Replicas {
        point: PointId,
        end: u64,
        confirmed: usize,
    },
}

impl Default for Progress {
    fn default() -> Self {
        Self {
            state: Mutex::new(State::default()),
            changed: watch::Sender::new(0),
        }
    }
}

impl Progress {
    /// A follower's session started (replacing any earlier one): what it confirms from now on
    /// is checked against what it had confirmed.
    pub fn connected(&self, follower: &str, rpc_address: &str, durability: Durability) {
        self.update(|state| {
            let entry = state.followers.entry(follower.to_owned()).or_default();
            entry.rpc_address = rpc_address.to_owned();
            entry.connected = true;
            entry.durability = durability;
            for (point, end) in entry.confirmed.drain() {
                let before = entry.before.entry(point).or_default();
                *before = (*before).max(end);
            }
            entry.lag = None;
            entry.caught_up_at = None;
        });
    }

    pub fn disconnected(&self, follower: &str) {
        self.update(|state| {
            if let Some(entry) = state.followers.get_mut(follower) {
                entry.connected = false;
                entry.lag = None;
                entry.behind_since.get_or_insert_with(Instant::now);
            }
        });
    }

    /// `follower` holds `point` up to `end`. Less than it confirmed before means bytes it had
    /// confirmed are gone (a damaged tail cut at its recovery, a copy replaced).
    pub fn confirm(&self, follower: &str, point: &PointId, end: u64) {
        self.update(|state| {
            if let Some(entry) = state.followers.get_mut(follower) {
                let before = entry.before.remove(point);
                let had = before.max(entry.confirmed.get(point).copied());
                if had.is_some_and(|had| end < had) {
                    entry.lost = Some(point.clone());
                }
                entry.confirmed.insert(point.clone(), end);
            }
        });
    }

    /// `point` is gone from this node (deleted, handed over): nothing of it counts any more.
    pub fn forget(&self, follower: &str, point: &PointId) {
        self.update(|state| {
            if let Some(entry) = state.followers.get_mut(follower) {
                entry.confirmed.remove(point);
                entry.before.remove(point);
            }
        });
    }

    /// `follower` lacks `lag` bytes of what this node holds, as its replicator counted them
    /// at `now`.
    pub fn lag(&self, follower: &str, lag: u64, max_lag_bytes: u64, now: Instant) {
        self.update(|state| {
            let Some(entry) = state.followers.get_mut(follower) else {
                return;
            };
            if !entry.connected {
                return;
            }
            entry.lag = Some(lag);
            if lag == 0 {
                entry.caught_up_at = Some(now);
            }
            if lag > max_lag_bytes {
                entry.behind_since.get_or_insert(now);
            } else {
                entry.behind_since = None;
            }
        });
    }

    fn update(&self, f: impl FnOnce(&mut State)) {
        f(&mut self.state.lock().expect("poisoned"));
        self.changed.send_modify(|version| *version += 1);
    }

    /// The end `follower` confirmed of `point` (0 if none).
    pub fn confirmed_end(&self, follower: &str, point: &PointId) -> u64 {
        self.state
            .lock()
            .expect("poisoned")
            .confirmed_end(follower, point)
    }

    /// Changes whenever a follower confirms something, connects or goes.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Connected followers: (name, rpc address).
    pub fn followers(&self) -> Vec<(String, String)> {
        let state = self.state.lock().expect("poisoned");
        state
            .followers
            .iter()
            .filter(|(_, f)| f.connected)
            .map(|(name, f)| (name.clone(), f.rpc_address.clone()))
            .collect()
    }

    /// Every follower ever seen, with what it confirmed of `point`.
    pub fn replicas(&self, point: &PointId) -> Vec<Replica> {
        let state = self.state.lock().expect("poisoned");
        state
            .followers
            .iter()
            .map(|(name, f)| Replica {
                follower: name.clone(),
                rpc_address: f.rpc_address.clone(),
                end: f.confirmed.get(point).copied().unwrap_or(0),
                connected: f.connected,
            })
            .collect()
    }

    /// How many followers confirmed `point` up to at least `end`, connected now or not: a
    /// confirmation means the bytes are stored on that follower, and a connection lost after it
    /// does not unstore them (a follower that connects again starts its confirmations afresh).
    pub fn confirmed(&self, point: &PointId, end: u64) -> usize {
        let state = self.state.lock().expect("poisoned");
        confirmed(&state, point, end)
    }

    /// The first of `ends` that `follower` has not confirmed: `(point, its end, confirmed)`.
    pub fn missing(&self, follower: &str, ends: &[(PointId, u64)]) -> Option<(PointId, u64, u64)> {
        let state = self.state.lock().expect("poisoned");
        ends.iter().find_map(|(point, end)| {
            let has = state.confirmed_end(follower, point);
            (has < *end).then(|| (point.clone(), *end, has))
        })
    }

    /// Waits until `follower` confirmed every `(point, end)`, or `timeout`; returns the first
    /// it had not: `(point, its end, confirmed)`.
    pub async fn wait_for(
        &self,
        follower: &str,
        ends: &[(PointId, u64)],
        timeout: Duration,
    ) -> Result<(), (PointId, u64, u64)> {
        self.wait_until(timeout, || self.missing(follower, ends))
            .await
    }

    /// Waits until `short` finds nothing missing (checked again at every change), or
    /// `timeout`; returns what it found missing last.
    async fn wait_until<T>(
        &self,
        timeout: Duration,
        short: impl Fn() -> Option<T>,
    ) -> Result<(), T> {
        let mut changes = self.changed.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let Some(missing) = short() else {
                return Ok(());
            };
            if tokio::time::timeout_at(deadline, changes.changed())
                .await
                .is_err()
            {
                return Err(missing);
            }
        }
    }

    /// Of `members`, those connected now, the least behind first (by the bytes they lacked at
    /// their replicator's last report; one not reported yet comes last).
    pub fn least_behind(&self, members: &BTreeSet<String>) -> Vec<String> {
        let state = self.state.lock().expect("poisoned");
        let mut connected: Vec<(u64, &String)> = members
            .iter()
            .filter_map(|name| {
                let entry = state.followers.get(name).filter(|f| f.connected)?;
                Some((entry.lag.unwrap_or(u64::MAX), name))
            })
            .collect();
        connected.sort();
        connected
            .into_iter()
            .map(|(_, name)| name.clone())
            .collect()
    }

    /// The followers a write waits for now (`None` before the in-sync set is known).
    #[cfg(test)]
    fn waiting_for(&self) -> Option<BTreeSet<String>> {
        let state = self.state.lock().expect("poisoned");
        state.waiting.as_ref().map(Waiting::all)
    }

    /// Waits until every follower the leader waits for, and at least `replicas` followers,
    /// confirmed every `(point, end)`, or `timeout`; returns what fell short.
    pub async fn wait(
        &self,
        points: &[(PointId, u64)],
        replicas: usize,
        timeout: Duration,
    ) -> Result<(), Short> {
        self.wait_until(timeout, || self.short(points, replicas))
            .await
    }

    /// How far `point` is acknowledged by what the followers confirmed: every follower a write
    /// waits for, and at least `replicas` followers, confirmed it up to there (the same rule as
    /// [`Progress::wait`]); `None` before the in-sync set is known, or with fewer followers
    /// than `replicas`.
    pub fn committable(&self, point: &PointId, replicas: usize) -> Option<u64> {
        let state = self.state.lock().expect("poisoned");
        let waiting = state.waiting.as_ref()?;
        let by_waited = waiting
            .iter()
            .map(|follower| state.confirmed_end(follower, point))
            .min()
            .unwrap_or(u64::MAX);
        let mut ends: Vec<u64> = state
            .followers
            .keys()
            .map(|follower| state.confirmed_end(follower, point))
            .collect();
        ends.sort_unstable_by(|a, b| b.cmp(a));
        let by_count = match replicas {
            0 => u64::MAX,
            n => *ends.get(n - 1)?,
        };
        Some(by_waited.min(by_count))
    }

    fn short(&self, points: &[(PointId, u64)], replicas: usize) -> Option<Short> {
        let state = self.state.lock().expect("poisoned");
        let Some(waiting) = &state.waiting else {
            return Some(Short::InSyncUnknown);
        };
        for (point, end) in points {
            let behind = waiting
                .iter()
                .find(|follower| state.confirmed_end(follower, point) < *end);
            if let Some(follower) = behind {
                return Some(Short::Waiting {
                    follower: follower.clone(),
                    point: point.clone(),
                    end: *end,
                });
            }
            let count = confirmed(&state, point, *end);
            if count < replicas {
                return Some(Short::Replicas {
                    point: point.clone(),
                    end: *end,
                    confirmed: count,
                });
            }
        }
        None
    }

    /// Keeps who a write waits for in step with the committed state: nothing is known before
    /// the controller's state reached this node (`None`: writes wait); then the committed
    /// in-sync set of the group this node leads (empty if it leads none), each follower whose
    /// removal was committed no longer waited for, and each caught-up follower it will propose
    /// waited for from now on. A follower waited for but not committed within the bound (or
    /// gone from the group) is dropped: it was never in the committed set.
    /// Returns whether who is waited for changed.
    pub fn follow_group(&self, group: Option<&Group>, bounds: &InSyncBounds, now: Instant) -> bool {
        let changed = self.keep_waiting_for(group, bounds, now);
        if changed {
            self.changed.send_modify(|version| *version += 1);
        }
        changed
    }

    /// [`Self::follow_group`]'s change; whether who is waited for changed.
    fn keep_waiting_for(&self, group: Option<&Group>, bounds: &InSyncBounds, now: Instant) -> bool {
        let mut state = self.state.lock().expect("poisoned");
        let state = &mut *state;
        let epoch = group.map(|group| group.leader_epoch);
        if state.leading.map(|(at, _)| at) != epoch {
            state.leading = epoch.map(|epoch| (epoch, now));
        }
        let waiting = state.waiting.get_or_insert_with(Waiting::default);
        let before = waiting.all();
        let (committed, followers) = match group {
            Some(group) => (group.in_sync.clone(), group.followers.clone()),
            None => Default::default(),
        };
        waiting.adding.retain(|follower, since| {
            !committed.contains(follower)
                && followers.contains(follower)
                && now.saturating_duration_since(*since) < bounds.timeout
        });
        for follower in followers.difference(&committed) {
            let Some(entry) = state.followers.get_mut(follower) else {
                continue;
            };
            let durable = entry.durability == Durability::Synced;
            if entry.connected
                && durable
                && entry.lag == Some(0)
                && !waiting.adding.contains_key(follower)
            {
                // It holds everything again: whatever it lost is made good.
                entry.lost = None;
                waiting.adding.insert(follower.clone(), now);
            }
        }
        waiting.committed = committed;
        waiting.all() != before
    }

    /// What the leader of `slot` asks the controller for its group as of `now`, if anything: a
    /// connected follower the group lacks, else a member to take out of the in-sync set, else
    /// a follower to add: one waited for (`follow_group`) since before a report found it caught
    /// up. The proposer checks once more that the follower holds every end ([`Self::missing`])
    /// before it proposes an entry.
    pub fn in_sync_wanted(
        &self,
        slot: &str,
        group: &Group,
        bounds: &InSyncBounds,
        now: Instant,
    ) -> Option<Command> {
        let state = self.state.lock().expect("poisoned");
        // A follower connected to this leader belongs to its group (a follower that gossips
        // proposes the same itself; one that does not is known only here).
        let missing = state
            .followers
            .iter()
            .find(|(name, f)| f.connected && !group.followers.contains(*name));
        if let Some((follower, _)) = missing {
            return Some(Command::Follow {
                follower: follower.clone(),
                slot: slot.to_owned(),
            });
        }
        for follower in &group.in_sync {
            let entry = state.followers.get(follower);
            let out = |reason: String| Command::OutOfSync {
                slot: slot.to_owned(),
                follower: follower.clone(),
                leader_epoch: group.leader_epoch,
                reason,
            };
            if let Some(point) = entry.and_then(|f| f.lost.as_ref()) {
                return Some(out(format!(
                    "it confirmed less of point {point} than before: bytes it had confirmed are gone"
                )));
            }
            if entry.is_some_and(|f| f.connected && f.durability == Durability::Unsynced) {
                return Some(out(
                    "it confirms writes before it syncs them (its storage.fsync is not \"always\"): \
                     a crash of it could lose acknowledged bytes"
                        .to_owned(),
                ));
            }
            // Behind since it was last seen, or since this node leads at this epoch if later
            // (known once `follow_group` saw the group).
            let leading = state.leading.map_or(now, |(_, since)| since);
            let since = match entry {
                None => Some(leading),
                Some(f) => f.behind_since.map(|since| since.max(leading)),
            };
            if since.is_some_and(|since| now.saturating_duration_since(since) >= bounds.timeout) {
                let connected = entry.is_some_and(|f| f.connected);
                return Some(out(match connected {
                    true => format!(
                        "more than {} bytes behind for {:?}",
                        bounds.max_lag_bytes, bounds.timeout
                    ),
                    false => format!("disconnected for {:?}", bounds.timeout),
                }));
            }
        }
        let adding = state.waiting.as_ref().map(|w| &w.adding)?;
        adding.iter().find_map(|(follower, since)| {
            let entry = state.followers.get(follower)?;
            let ready = entry.connected
                && entry.lag == Some(0)
                && now.saturating_duration_since(*since) >= SETTLE
                && entry.caught_up_at.is_some_and(|at| at > *since);
            ready.then(|| Command::InSync {
                slot: slot.to_owned(),
                follower: follower.clone(),
                leader_epoch: group.leader_epoch,
            })
        })
    }
}

impl State {
    /// The end `follower` confirmed of `point` (0 if none).
    fn confirmed_end(&self, follower: &str, point: &PointId) -> u64 {
        self.followers
            .get(follower)
            .and_then(|f| f.confirmed.get(point).copied())
            .unwrap_or(0)
    }
}

impl Waiting {
    /// Every follower waited for (one being added may also be committed for a moment).
    fn iter(&self) -> impl Iterator<Item = &String> {
        self.committed.iter().chain(self.adding.keys())
    }

    fn all(&self) -> BTreeSet<String> {
        self.iter().cloned().collect()
    }
}

fn confirmed(state: &State, point: &PointId, end: u64) -> usize {
    state
        .followers
        .values()
        .filter(|f| f.confirmed.get(point).is_some_and(|&e| e >= end))
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_confirmation_counts_until_the_follower_connects_again() {
        let progress = Progress::default();
        let point = PointId::new("p").unwrap();
        progress.connected("f1", "127.0.0.1:1", Durability::Synced);
        progress.connected("f2", "127.0.0.1:2", Durability::Synced);
        progress.confirm("f1", &point, 100);
        progress.confirm("f2", &point, 50);
        assert_eq!(progress.confirmed(&point, 100), 1);
        assert_eq!(progress.confirmed(&point, 50), 2);
        // Stored on f1 whether or not f1 is connected now.
        progress.disconnected("f1");
        assert_eq!(progress.confirmed(&point, 100), 1);
        // A new session confirms afresh.
        progress.connected("f1", "127.0.0.1:1", Durability::Synced);
        assert_eq!(progress.confirmed(&point, 100), 0);
        assert_eq!(progress.confirmed(&point, 50), 1);
    }

    const BOUNDS: InSyncBounds = InSyncBounds {
        timeout: Duration::from_secs(2),
        max_lag_bytes: 1000,
    };

    fn group(followers: &[&str], in_sync: &[&str]) -> Group {
        Group {
            leader: "a".into(),
            leader_epoch: 7,
            followers: followers.iter().map(|f| (*f).to_owned()).collect(),
            in_sync: in_sync.iter().map(|f| (*f).to_owned()).collect(),
            failover: crate::config::Failover::Automatic { replicas: 1 },
            leader_unclean: false,
        }
    }

    /// What the agent does at each look: keep the waiting set in step, then ask.
    fn look(progress: &Progress, group: &Group, now: Instant) -> Option<Command> {
        progress.follow_group(Some(group), &BOUNDS, now);
        progress.in_sync_wanted("a", group, &BOUNDS, now)
    }

    fn short(progress: &Progress, end: u64, replicas: usize) -> Option<Short> {
        let point = PointId::new("p").unwrap();
        progress.short(&[(point, end)], replicas)
    }

    #[test]
    fn a_caught_up_follower_is_waited_for_before_it_is_proposed() {
        let progress = Progress::default();
        let point = PointId::new("p").unwrap();
        let group = group(&["f"], &[]);
        assert_eq!(short(&progress, 10, 0), Some(Short::InSyncUnknown));
        progress.connected("f", "f:1", Durability::Synced);
        progress.confirm("f", &point, 10);
        let t0 = Instant::now();
        progress.lag("f", 0, BOUNDS.max_lag_bytes, t0);
        // The first look starts waiting for it; nothing is proposed yet.
        assert_eq!(look(&progress, &group, t0), None);
        assert_eq!(progress.waiting_for(), Some(BTreeSet::from(["f".into()])));
        assert!(
            matches!(short(&progress, 11, 0), Some(Short::Waiting { follower, .. }) if follower == "f"),
            "a write after this waits for f"
        );
        // Proposed once a report after the wait began found it caught up.
        let later = t0 + SETTLE;
        assert_eq!(look(&progress, &group, later), None);
        progress.lag("f", 0, BOUNDS.max_lag_bytes, t0 + SETTLE / 2);
        assert_eq!(
            look(&progress, &group, later),
            Some(Command::InSync {
                slot: "a".into(),
                follower: "f".into(),
                leader_epoch: 7,
            })
        );
        // Gone before its entry was committed in time: no longer waited for.
        progress.disconnected("f");
        assert_eq!(look(&progress, &group, t0 + BOUNDS.timeout), None);
        assert_eq!(progress.waiting_for(), Some(BTreeSet::new()));
        assert_eq!(short(&progress, 11, 0), None);
    }

    #[test]
    fn a_member_leaves_after_the_bound_and_is_waited_for_until_its_removal_commits() {
        let progress = Progress::default();
        let point = PointId::new("p").unwrap();
        let committed = group(&["f", "g"], &["f", "g"]);
        for follower in ["f", "g"] {
            progress.connected(follower, "x:1", Durability::Synced);
            progress.confirm(follower, &point, 10);
            progress.lag(follower, 0, BOUNDS.max_lag_bytes, Instant::now());
        }
        let t0 = Instant::now();
        assert_eq!(look(&progress, &committed, t0), None);
        assert_eq!(short(&progress, 10, 1), None);
        // g goes: writes wait for it until its removal is committed.
        progress.disconnected("g");
        assert!(matches!(
            short(&progress, 11, 1),
            Some(Short::Waiting { follower, .. }) if follower == "f"
        ));
        progress.confirm("f", &point, 11);
        assert!(matches!(
            short(&progress, 11, 1),
            Some(Short::Waiting { follower, .. }) if follower == "g"
        ));
        assert_eq!(look(&progress, &committed, t0), None);
        let out = look(&progress, &committed, t0 + 2 * BOUNDS.timeout);
        assert!(
            matches!(&out, Some(Command::OutOfSync { follower, reason, .. }) if follower == "g" && reason.contains("disconnected")),
            "{out:?}"
        );
        // Committed: f alone is waited for.
        let without_g = group(&["f", "g"], &["f"]);
        look(&progress, &without_g, t0 + 2 * BOUNDS.timeout);
        assert_eq!(short(&progress, 11, 1), None);
        // A follower far behind leaves too.
        progress.lag("f", 5000, BOUNDS.max_lag_bytes, Instant::now());
        let at = Instant::now() + BOUNDS.timeout;
        assert!(matches!(
            look(&progress, &without_g, at),
            Some(Command::OutOfSync { follower, reason, .. }) if follower == "f" && reason.contains("behind")
        ));
    }

    #[test]
    fn a_member_that_lost_confirmed_bytes_leaves_at_once() {
        let progress = Progress::default();
        let point = PointId::new("p").unwrap();
        let committed = group(&["f"], &["f"]);
        progress.connected("f", "f:1", Durability::Synced);
        progress.confirm("f", &point, 100);
        progress.disconnected("f");
        // It comes back holding less than it had confirmed (a damaged tail cut at recovery).
        progress.connected("f", "f:1", Durability::Synced);
        progress.confirm("f", &point, 60);
        progress.lag("f", 40, BOUNDS.max_lag_bytes, Instant::now());
        let out = look(&progress, &committed, Instant::now());
        assert!(
            matches!(&out, Some(Command::OutOfSync { reason, .. }) if reason.contains("gone")),
            "{out:?}"
        );
        // A member never seen by this leader since it leads is behind from then on.
        let fresh = Progress::default();
        let t0 = Instant::now();
        assert_eq!(look(&fresh, &committed, t0), None);
        assert!(matches!(
            look(&fresh, &committed, t0 + BOUNDS.timeout),
            Some(Command::OutOfSync { .. })
        ));
    }

    #[test]
    fn a_new_leader_gives_every_member_the_whole_bound_to_connect_to_it() {
        let progress = Progress::default();
        // f was seen long ago (disconnected since); g never.
        progress.connected("f", "f:1", Durability::Synced);
        progress.disconnected("f");
        let led = Instant::now() + 10 * BOUNDS.timeout;
        let mut committed = group(&["f", "g"], &["f", "g"]);
        committed.leader_epoch = 9;
        // This node leads from `led` (a transfer or a failover named it): nobody is out yet.
        assert_eq!(look(&progress, &committed, led), None);
        assert_eq!(look(&progress, &committed, led + BOUNDS.timeout / 2), None);
        let out = look(&progress, &committed, led + BOUNDS.timeout);
        assert!(
            matches!(&out, Some(Command::OutOfSync { reason, .. }) if reason.contains("disconnected")),
            "{out:?}"
        );
    }

    #[test]
    fn a_follower_that_confirms_before_it_syncs_never_enters_and_a_member_that_does_leaves() {
        let progress = Progress::default();
        let point = PointId::new("p").unwrap();
        let outside = group(&["f"], &[]);
        progress.connected("f", "f:1", Durability::Unsynced);
        progress.confirm("f", &point, 10);
        let t0 = Instant::now();
        progress.lag("f", 0, BOUNDS.max_lag_bytes, t0);
        // Caught up, but never waited for nor proposed.
        for at in [t0, t0 + SETTLE, t0 + 2 * BOUNDS.timeout] {
            progress.lag("f", 0, BOUNDS.max_lag_bytes, at);
            assert_eq!(look(&progress, &outside, at), None);
        }
        assert_eq!(progress.waiting_for(), Some(BTreeSet::new()));
        // It still counts toward `replicas = N`.
        assert_eq!(short(&progress, 10, 1), None);
        // A member of the committed set that comes back without syncing leaves at once.
        let committed = group(&["f"], &["f"]);
        let out = look(&progress, &committed, t0);
        assert!(
            matches!(&out, Some(Command::OutOfSync { reason, .. }) if reason.contains("fsync")),
            "{out:?}"
        );
    }
}
