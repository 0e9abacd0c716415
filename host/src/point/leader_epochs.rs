//! Where each leader epoch began in a point: the record that lets a deposed leader's copy be cut
//! back to where its successor's writes began, instead of being sent again whole
//! (`docs/failover.md`, "The deposed leader's copy").
//!
//! A group's leader writes `(epoch, start)` into `point.meta` before its first client write of a
//! point at a leader epoch newer than the last one recorded there, `start` being where the point
//! ended then; followers take their leader's list with the point's description. A copy's bytes
//! before a start were written by an older leader; from it, by that epoch's leader. So when a
//! follower says the newest epoch of its copy's bytes, its leader knows how far the two copies
//! can agree: up to where the first newer epoch began in its own copy (Kafka's leader-epoch
//! cache). Recording nothing for a point's first bytes is safe: an unrecorded prefix counts as
//! epoch 0, older than any leader, and the CRC32C at the cut is checked before anything is kept.

use serde::{Deserialize, Serialize};

/// A leader epoch and where its writes began in the point.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpochStart {
    /// The leader epoch (the controller's entry that named the leader).
    pub epoch: u64,
    /// The point's end when that leader first wrote it.
    pub start: u64,
}

/// The leader epochs of one point's bytes, oldest first (epochs and starts grow).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct LeaderEpochs(Vec<EpochStart>);

impl LeaderEpochs {
    /// The list `starts` (a leader's, sent to a follower), if it is in order: epochs and starts
    /// both growing.
    pub fn new(starts: Vec<EpochStart>) -> Option<LeaderEpochs> {
        let ordered = starts
            .windows(2)
            .all(|pair| pair[0].epoch < pair[1].epoch && pair[0].start <= pair[1].start);
        ordered.then_some(LeaderEpochs(starts))
    }

    /// The starts, oldest first.
    pub fn starts(&self) -> &[EpochStart] {
        &self.0
    }

    /// Whether nothing is recorded.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The epoch to record before a client write at leader epoch `epoch` to a point that ends
    /// at `end`, if any: only once per epoch, only for a newer epoch than the last recorded,
    /// and not for a point's first bytes (an unrecorded prefix is the oldest epoch's).
    pub fn to_record(&self, epoch: u64, end: u64) -> Option<EpochStart> {
        let newer = self.0.last().is_none_or(|last| epoch > last.epoch);
        (epoch > 0 && end > 0 && newer).then_some(EpochStart { epoch, start: end })
    }

    /// Records `start` (one [`LeaderEpochs::to_record`] gave), forgetting the epochs its
    /// leader said began at or after it: this copy never received their bytes.
    pub fn record(&mut self, start: EpochStart) {
        self.cut(start.start);
        self.0.push(start);
    }

    /// The newest epoch of the bytes of a copy that ends at `end` (0: none recorded, or no
    /// bytes after one began).
    pub fn newest_below(&self, end: u64) -> u64 {
        self.0
            .iter()
            .rev()
            .find(|start| start.start < end)
            .map_or(0, |start| start.epoch)
    }

    /// Where the bytes of epoch `epoch` and older end in this copy, which ends at `end`: the
    /// start of the first newer epoch, else `end`. A copy whose newest bytes are of `epoch`
    /// agrees with this one at most up to there.
    pub fn end_of(&self, epoch: u64, end: u64) -> u64 {
        self.0
            .iter()
            .find(|start| start.epoch > epoch)
            .map_or(end, |start| start.start.min(end))
    }

    /// Forgets the epochs that began at or after `end` (the copy was cut back there).
    pub fn cut(&mut self, end: u64) {
        self.0.retain(|start| start.start < end);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn epochs(starts: &[(u64, u64)]) -> LeaderEpochs {
        let starts = starts
            .iter()
            .map(|&(epoch, start)| EpochStart { epoch, start })
            .collect();
        LeaderEpochs::new(starts).expect("in order")
    }

    #[test]
    fn an_epoch_is_recorded_once_and_only_past_a_points_first_bytes() {
        let mut list = LeaderEpochs::default();
        assert_eq!(list.to_record(3, 0), None, "a new point records nothing");
        assert_eq!(list.to_record(0, 80), None, "no leader epoch known yet");
        let start = list.to_record(3, 80).unwrap();
        assert_eq!(
            start,
            EpochStart {
                epoch: 3,
                start: 80
            }
        );
        list.record(start);
        assert_eq!(list.to_record(3, 95), None, "once per epoch");
        assert_eq!(list.to_record(2, 95), None, "never an older epoch");
        assert_eq!(
            list.to_record(7, 95),
            Some(EpochStart {
                epoch: 7,
                start: 95
            })
        );
        // A follower named leader before it received the bytes of an epoch its old leader
        // began: that epoch is not this copy's.
        let mut list = epochs(&[(3, 80), (4, 200)]);
        list.record(list.to_record(6, 150).unwrap());
        assert_eq!(list, epochs(&[(3, 80), (6, 150)]));
    }

    #[test]
    fn a_deposed_leaders_copy_agrees_up_to_where_its_successor_began() {
        // Leader of epoch 2 wrote [0, 100), its follower held [0, 80) when named leader at 5
        // and wrote from there; a third leader began at 140 in epoch 9.
        let successor = epochs(&[(5, 80), (9, 140)]);
        let deposed = LeaderEpochs::default();
        let newest = deposed.newest_below(100);
        assert_eq!(newest, 0);
        assert_eq!(successor.end_of(newest, 160), 80);
        // A copy whose newest bytes are of epoch 5 agrees up to where epoch 9 began.
        assert_eq!(successor.end_of(5, 160), 140);
        assert_eq!(
            successor.end_of(9, 160),
            160,
            "the newest epoch runs to the end"
        );
        // A copy of bytes of epoch 5 that ends before its start is not of epoch 5.
        assert_eq!(successor.newest_below(80), 0);
        assert_eq!(successor.newest_below(81), 5);
        assert_eq!(successor.newest_below(1_000), 9);
    }

    #[test]
    fn a_cut_forgets_the_epochs_it_removed_and_a_list_out_of_order_is_refused() {
        let mut list = epochs(&[(5, 80), (9, 140)]);
        list.cut(140);
        assert_eq!(list, epochs(&[(5, 80)]));
        list.cut(10);
        assert!(list.is_empty());
        let unordered = vec![
            EpochStart {
                epoch: 9,
                start: 80,
            },
            EpochStart {
                epoch: 5,
                start: 140,
            },
        ];
        assert_eq!(LeaderEpochs::new(unordered), None);
    }
}
