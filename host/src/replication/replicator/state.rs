//! The replicator's state of one point, and its decisions as pure functions: what a reply
//! means for the point ([`PointState::replied`]), the point's [`Mode`] (sending, backing off,
//! unsendable until a reload), and the records in their stages (pending, bundled, sent).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::plugins::{Buffer, PluginError, bundles};
use crate::point::{LiveBytes, PointId};

use super::*;

/// The first pause after a record failed; each failure in a row doubles it.
pub(super) const FIRST_BACKOFF: Duration = Duration::from_millis(50);
/// The longest pause after failures.
pub(super) const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// What the replicator does with one point.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) enum Mode {
    /// Sends what the follower lacks.
    #[default]
    Sending,
    /// A record failed (the bundler failed on it, or the follower rejected it): sent again at
    /// `until`.
    Backoff { until: Instant },
    /// A record's bundle is too large to travel: sent again once the plugins are reloaded
    /// (their generation is no longer `generation`).
    Unsendable { generation: u64 },
}

/// Replication state of one point towards one follower.
#[derive(Debug, Default)]
pub(super) struct PointState {
    /// Which copy of the point this is, unique in its replicator: a point deleted and made
    /// again, or dropped from a handover's scope and added again, is a new copy, and replies
    /// to records of an earlier one say nothing of it.
    pub(super) copy: u64,
    /// The leader's end.
    pub(super) end: u64,
    /// The CRC32C of the leader's bytes up to `end`: after missed store events, a point whose
    /// bytes there differ is another copy (deleted and made again meanwhile).
    pub(super) crc: u32,
    /// The next offset to send.
    pub(super) next: u64,
    /// What the follower confirmed.
    pub(super) confirmed: u64,
    /// Incremented at every rewind; replies to older pushes are ignored.
    pub(super) generation: u64,
    /// Bytes of live appends not sent yet, in offset order.
    pub(super) live: VecDeque<Arc<LiveBytes>>,
    pub(super) mode: Mode,
    /// Records of it that failed in a row (the pause doubles with each).
    pub(super) failures: u32,
}

/// What the replicator does after a reply to one record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum AfterReply {
    /// A reply to a push sent before the last rewind: already handled.
    Nothing,
    /// Applied where it was sent: the follower confirmed more.
    Confirmed,
    /// The follower ends elsewhere: send from its end.
    Resend,
    /// The follower holds more than this leader: remove its copy, send from 0.
    Replace,
    /// The follower acknowledged another end than the one sent: its copy diverged; cut it
    /// back to this verified end and send from there.
    Truncate(u64),
    /// The follower rejected the record: send it again after a pause.
    BackOff,
}

impl PointState {
    /// Takes in the follower's answer to `sent`: it now ends at `end`. A pure decision; the
    /// replicator performs what it returns.
    pub(super) fn replied(&mut self, sent: &Sent, end: u64, reply: &Reply) -> AfterReply {
        if sent.copy != self.copy {
            return AfterReply::Nothing;
        }
        let current = sent.generation == self.generation;
        match reply {
            Reply::Applied if end == sent.start + sent.len => {
                self.confirmed = self.confirmed.max(end);
                self.failures = 0;
                AfterReply::Confirmed
            }
            // Never progress: the follower holds bytes this leader did not send.
            Reply::Applied if current => {
                let verified = self.confirmed.min(sent.start);
                self.generation += 1;
                self.confirmed = verified;
                self.next = verified;
                AfterReply::Truncate(verified)
            }
            Reply::Mismatch if current => {
                self.generation += 1;
                if end > self.end {
                    self.next = 0;
                    self.confirmed = 0;
                    return AfterReply::Replace;
                }
                self.confirmed = end;
                self.next = end;
                AfterReply::Resend
            }
            Reply::Rejected(_) if current => {
                self.generation += 1;
                self.next = self.next.min(sent.start);
                AfterReply::BackOff
            }
            Reply::Applied | Reply::Mismatch | Reply::Rejected(_) => AfterReply::Nothing,
        }
    }
}

/// One record of a push: what was sent.
#[derive(Debug, Clone)]
pub(super) struct Sent {
    pub(super) point: PointId,
    pub(super) start: u64,
    pub(super) len: u64,
    /// The point's copy ([`PointState::copy`]) and generation when it was sent.
    pub(super) copy: u64,
    pub(super) generation: u64,
}

/// A record read, not bundled yet.
pub(super) struct Pending {
    pub(super) sent: Sent,
    pub(super) payload: Buffer,
}

/// What a point is besides its bytes, as a follower is told it (`Sink.describe`).
pub(super) struct Description {
    pub(super) content_type: Option<String>,
    pub(super) epoch: u64,
    pub(super) leader_epochs: LeaderEpochs,
}

/// A record chosen for a push, with what was read for it: its point's description (if the
/// point was not described yet) and its bytes.
pub(super) struct Read {
    pub(super) sent: Sent,
    pub(super) description: Option<Result<Description, ReadError>>,
    pub(super) payload: Result<Buffer, ReadError>,
}

/// A record ready to go: its bundle around its payload, and the payload's CRC32C.
pub(super) struct Prepared {
    pub(super) sent: Sent,
    pub(super) payload: Buffer,
    pub(super) bundled: bundles::Bundled,
    pub(super) crc: u32,
}

/// Why a record read was not sent.
#[derive(Debug, thiserror::Error)]
pub(super) enum NotSent {
    #[error(transparent)]
    Bundler(Box<PluginError>),
    #[error(
        "its bundle would take {wire} bytes on the wire, more than the {MAX_BUNDLE_BYTES} a record may"
    )]
    TooLarge { wire: usize },
}

impl Prepared {
    /// Bytes on the wire: head, body, tail.
    pub(super) fn wire_len(&self) -> usize {
        wire_len(&self.bundled, &self.payload)
    }

    /// Writes the bundle into `out` (exactly [`wire_len`](Self::wire_len) bytes).
    pub(super) fn write(&self, out: &mut [u8]) {
        let mut at = 0;
        let mut put = |bytes: &[u8]| {
            out[at..at + bytes.len()].copy_from_slice(bytes);
            at += bytes.len();
        };
        put(&self.bundled.head);
        match &self.bundled.body {
            bundles::Body::Payload => self.payload.pieces().iter().for_each(|p| put(p)),
            bundles::Body::Replaced(bytes) => put(bytes),
        }
        put(&self.bundled.tail);
    }
}

pub(super) fn wire_len(bundled: &bundles::Bundled, payload: &Buffer) -> usize {
    let body = match &bundled.body {
        bundles::Body::Payload => payload.len() as usize,
        bundles::Body::Replaced(bytes) => bytes.len(),
    };
    bundled.head.len() + body + bundled.tail.len()
}

/// A push, remove, description or cut in flight, and what came back.
pub(super) enum Outcome {
    Pushed {
        sent: Vec<Sent>,
        /// Its bytes on the wire (counted against the bound of bytes in flight).
        wire: u64,
        reply: Result<Vec<(u64, Reply)>, capnp::Error>,
    },
    Removed {
        point: PointId,
        reply: Result<(), capnp::Error>,
    },
    /// A call with nothing to read back (a description, commit marks): only a failure counts.
    Answered { reply: Result<(), capnp::Error> },
    Truncated {
        point: PointId,
        /// The copy that was cut ([`PointState::copy`]).
        copy: u64,
        reply: Result<u64, capnp::Error>,
        /// The follower checked its copy agrees with the leader's up to where it now ends.
        checked: bool,
    },
}

pub(super) enum Reply {
    Applied,
    Mismatch,
    Rejected(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sent(start: u64, len: u64, generation: u64) -> Sent {
        Sent {
            point: PointId::new("p").unwrap(),
            start,
            len,
            copy: 0,
            generation,
        }
    }

    /// A point of 1000 bytes, sent up to 600, confirmed up to 400, at generation 2.
    fn sent_to_600() -> PointState {
        PointState {
            end: 1000,
            next: 600,
            confirmed: 400,
            generation: 2,
            failures: 3,
            ..PointState::default()
        }
    }

    #[test]
    fn an_applied_record_confirms_its_end_and_clears_failures() {
        let mut state = sent_to_600();
        let after = state.replied(&sent(400, 100, 2), 500, &Reply::Applied);
        assert_eq!(after, AfterReply::Confirmed);
        assert_eq!((state.confirmed, state.next, state.failures), (500, 600, 0));
        // A late reply of an earlier push, applied where it was sent: still progress.
        let after = state.replied(&sent(300, 100, 1), 400, &Reply::Applied);
        assert_eq!((after, state.confirmed), (AfterReply::Confirmed, 500));
    }

    #[test]
    fn an_acknowledged_end_that_is_not_the_one_sent_is_a_divergence_not_progress() {
        let mut state = sent_to_600();
        // One byte more than was sent.
        let after = state.replied(&sent(400, 100, 2), 501, &Reply::Applied);
        assert_eq!(after, AfterReply::Truncate(400));
        assert_eq!(
            (state.confirmed, state.next, state.generation),
            (400, 400, 3)
        );
        // Replies to pushes sent before the cut are ignored.
        let after = state.replied(&sent(500, 100, 2), 601, &Reply::Applied);
        assert_eq!(after, AfterReply::Nothing);
        assert_eq!(state.confirmed, 400);
        // Claimed at a start beyond what was confirmed: cut back to what was.
        let mut state = sent_to_600();
        let after = state.replied(&sent(500, 100, 2), 650, &Reply::Applied);
        assert_eq!(after, AfterReply::Truncate(400));
    }

    #[test]
    fn a_mismatch_continues_from_the_followers_end_or_replaces_a_longer_copy() {
        let mut state = sent_to_600();
        assert_eq!(
            state.replied(&sent(400, 100, 2), 300, &Reply::Mismatch),
            AfterReply::Resend
        );
        assert_eq!(
            (state.confirmed, state.next, state.generation),
            (300, 300, 3)
        );
        assert_eq!(
            state.replied(&sent(500, 100, 2), 350, &Reply::Mismatch),
            AfterReply::Nothing
        );
        let mut state = sent_to_600();
        assert_eq!(
            state.replied(&sent(400, 100, 2), 1200, &Reply::Mismatch),
            AfterReply::Replace
        );
        assert_eq!((state.confirmed, state.next), (0, 0));
    }

    #[test]
    fn a_reply_about_an_earlier_copy_of_the_point_says_nothing_of_this_one() {
        // The point was deleted and made again, shorter: the old copy's record of 0..900
        // applied where it was sent is not progress of the new copy.
        let mut state = PointState {
            copy: 1,
            end: 500,
            ..PointState::default()
        };
        for reply in [
            Reply::Applied,
            Reply::Mismatch,
            Reply::Rejected("old".into()),
        ] {
            assert_eq!(
                state.replied(&sent(0, 900, 0), 900, &reply),
                AfterReply::Nothing
            );
            assert_eq!((state.confirmed, state.next, state.generation), (0, 0, 0));
        }
        let mut new = sent(0, 500, 0);
        new.copy = 1;
        assert_eq!(
            state.replied(&new, 500, &Reply::Applied),
            AfterReply::Confirmed
        );
        assert_eq!(state.confirmed, 500);
    }

    #[test]
    fn a_rejected_record_is_sent_again_from_its_start() {
        let mut state = sent_to_600();
        let rejected = Reply::Rejected("damaged".into());
        assert_eq!(
            state.replied(&sent(400, 100, 2), 0, &rejected),
            AfterReply::BackOff
        );
        assert_eq!(
            (state.confirmed, state.next, state.generation),
            (400, 400, 3)
        );
        assert_eq!(
            state.replied(&sent(500, 100, 2), 0, &rejected),
            AfterReply::Nothing
        );
    }
}
