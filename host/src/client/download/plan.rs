//! The plan of a download, without I/O: which ranges are still to fetch, which are being
//! fetched and by whom, when a slow range is split or hedged, and what the journal records as
//! done. The workers of [`super::Download`] ask it for their next job and report to it.

use std::collections::HashMap;
use std::time::Instant;

use tokio_util::sync::CancellationToken;

use super::*;

/// What there is to do and who does it.
pub(super) struct Plan {
    /// Ranges nobody fetches, in order.
    pub(super) todo: Vec<(u64, u64)>,
    pub(super) active: HashMap<u64, Active>,
    pub(super) next_id: u64,
    /// Observed throughput (bytes/s) of finished fetches, for judging slowness.
    pub(super) rates: Vec<f64>,
    /// What is pinned, and the finished pieces (written to the journal file as they grow).
    pub(super) journal: Journal,
    pub(super) workers_used: std::collections::HashSet<usize>,
    pub(super) retries: usize,
    pub(super) splits: usize,
    pub(super) hedges: usize,
    pub(super) fetched: u64,
    /// Bytes in the file reported to the progress callback so far.
    pub(super) reported: u64,
}

/// A range being fetched.
pub(super) struct Active {
    pub(super) start: u64,
    /// Where the range ends; lowered when another worker takes its second half.
    pub(super) end: u64,
    /// Bytes `[start, position)` are in the file.
    pub(super) position: u64,
    /// CRC32C of `[start, position)`.
    pub(super) crc: u32,
    pub(super) started: Instant,
    /// This fetch is the hedge of that one: it started at `position` with the other's CRC then.
    pub(super) hedge_of: Option<(u64, u64, u32)>,
    /// The hedge fetching the rest of this range, if any.
    pub(super) hedged_by: Option<u64>,
    pub(super) stop: CancellationToken,
}

/// What a worker does next.
pub(super) enum Job {
    Fetch {
        id: u64,
        start: u64,
        end: u64,
        stop: CancellationToken,
    },
    Wait,
    Finished,
}

pub(super) struct Summary {
    pub(super) complete: bool,
    pub(super) crc: u32,
    pub(super) workers: usize,
    pub(super) retries: usize,
    pub(super) splits: usize,
    pub(super) hedges: usize,
    pub(super) fetched: u64,
}

impl Plan {
    pub(super) fn new(journal: &Journal) -> Self {
        let mut journal = journal.clone();
        journal.done.sort_by_key(|p| p.start);
        let mut todo = Vec::new();
        let mut cursor = 0;
        for piece in &journal.done {
            if piece.start > cursor {
                todo.push((cursor, piece.start));
            }
            cursor = cursor.max(piece.end);
        }
        if cursor < journal.size {
            todo.push((cursor, journal.size));
        }
        Self {
            todo,
            active: HashMap::new(),
            next_id: 0,
            rates: Vec::new(),
            workers_used: Default::default(),
            retries: 0,
            splits: 0,
            hedges: 0,
            fetched: 0,
            reported: journal.done.iter().map(|p| p.end - p.start).sum(),
            journal,
        }
    }

    /// The pieces running ranges wrote so far, disjoint from each other and from the finished
    /// ones: a hedged range's up to where its hedge began.
    pub(super) fn running_pieces(&self) -> Vec<Piece> {
        self.active
            .values()
            .filter_map(|a| {
                let hedge = a.hedged_by.and_then(|h| self.active.get(&h));
                // The hedge began at the original's position then, with its CRC32C then.
                let (end, crc32c) = match hedge {
                    Some(hedge) if hedge.start < a.position => {
                        let (_, _, crc_at) = hedge.hedge_of.expect("a hedge knows its original");
                        (hedge.start, crc_at)
                    }
                    _ => (a.position, a.crc),
                };
                (end > a.start).then_some(Piece {
                    start: a.start,
                    end,
                    crc32c,
                })
            })
            .collect()
    }

    /// The journal as it stands: the finished pieces and what running ranges wrote.
    pub(super) fn checkpoint(&self) -> Journal {
        let mut journal = self.journal.clone();
        journal.done.extend(self.running_pieces());
        journal
    }

    /// Bytes of the point in the file: finished pieces, and what running ranges wrote (a hedged
    /// range counts up to where its hedge began). Returns how much that grew since last asked.
    pub(super) fn covered_since_reported(&mut self) -> u64 {
        let done: u64 = self.journal.done.iter().map(|p| p.end - p.start).sum();
        let running: u64 = self.running_pieces().iter().map(|p| p.end - p.start).sum();
        let covered = done + running;
        let advanced = covered.saturating_sub(self.reported);
        self.reported = self.reported.max(covered);
        advanced
    }

    pub(super) fn start(&mut self, start: u64, end: u64, hedge_of: Option<(u64, u64, u32)>) -> Job {
        let id = self.next_id;
        self.next_id += 1;
        let stop = CancellationToken::new();
        self.active.insert(
            id,
            Active {
                start,
                end,
                position: start,
                crc: 0,
                started: Instant::now(),
                hedge_of,
                hedged_by: None,
                stop: stop.clone(),
            },
        );
        Job::Fetch {
            id,
            start,
            end,
            stop,
        }
    }

    /// The next job for an idle worker.
    pub(super) fn next(&mut self, hedging: bool) -> Job {
        if !self.todo.is_empty() {
            // The largest first: the others may be split later.
            let largest = (0..self.todo.len())
                .max_by_key(|&i| self.todo[i].1 - self.todo[i].0)
                .expect("not empty");
            let (start, end) = self.todo.remove(largest);
            return self.start(start, end, None);
        }
        // Split the largest remaining range that is not hedged.
        let splittable = self
            .active
            .iter()
            .filter(|(_, a)| a.hedged_by.is_none() && a.hedge_of.is_none())
            .max_by_key(|(_, a)| a.end - a.position)
            .filter(|(_, a)| a.end - a.position >= 2 * MIN_SPLIT)
            .map(|(&id, _)| id);
        if let Some(id) = splittable {
            let active = self.active.get_mut(&id).expect("just found");
            let middle = active.position + (active.end - active.position) / 2;
            let end = active.end;
            active.end = middle;
            self.splits += 1;
            return self.start(middle, end, None);
        }
        if hedging && let Some(job) = self.hedge() {
            return job;
        }
        if self.active.is_empty() {
            Job::Finished
        } else {
            Job::Wait
        }
    }

    /// Hedges the slowest range if it is well below the typical rate.
    pub(super) fn hedge(&mut self) -> Option<Job> {
        let mut rates = self.rates.clone();
        rates.sort_by(f64::total_cmp);
        let typical = *rates.get(rates.len() / 2)?;
        let (id, position, end, crc) = self
            .active
            .iter()
            .filter(|(_, a)| {
                a.hedged_by.is_none()
                    && a.hedge_of.is_none()
                    && a.end > a.position
                    && a.started.elapsed() >= HEDGE_AFTER
            })
            .filter(|(_, a)| {
                let rate = (a.position - a.start) as f64 / a.started.elapsed().as_secs_f64();
                rate < typical / 2.0
            })
            .max_by_key(|(_, a)| a.end - a.position)
            .map(|(&id, a)| (id, a.position, a.end, a.crc))?;
        self.hedges += 1;
        let job = self.start(position, end, Some((id, position, crc)));
        if let Job::Fetch { id: hedge, .. } = &job {
            self.active.get_mut(&id).expect("found above").hedged_by = Some(*hedge);
        }
        Some(job)
    }

    /// A range finished: record its pieces, stop what it made redundant.
    pub(super) fn finish(&mut self, id: u64) {
        let Some(active) = self.active.remove(&id) else {
            return;
        };
        let seconds = active.started.elapsed().as_secs_f64().max(1e-6);
        self.rates
            .push((active.position - active.start) as f64 / seconds);
        match active.hedge_of {
            Some((original, at, crc_at)) => {
                // The hedge won: the original's piece ends where the hedge began.
                if let Some(slow) = self.active.remove(&original) {
                    slow.stop.cancel();
                    self.journal.done.push(Piece {
                        start: slow.start,
                        end: at,
                        crc32c: crc_at,
                    });
                }
                self.journal.done.push(Piece {
                    start: active.start,
                    end: active.end,
                    crc32c: active.crc,
                });
            }
            None => {
                if let Some(hedge) = active.hedged_by.and_then(|h| self.active.remove(&h)) {
                    hedge.stop.cancel();
                }
                self.journal.done.push(Piece {
                    start: active.start,
                    end: active.end,
                    crc32c: active.crc,
                });
            }
        }
    }

    /// A range failed at its position: the rest goes back to do (a hedge's rest stays with the
    /// original; an original's rest with its hedge, if it has one).
    pub(super) fn fail(&mut self, id: u64) {
        let Some(active) = self.active.remove(&id) else {
            return;
        };
        self.retries += 1;
        match (active.hedge_of, active.hedged_by) {
            (Some((original, _, _)), _) => {
                if let Some(slow) = self.active.get_mut(&original) {
                    slow.hedged_by = None;
                }
            }
            (None, Some(hedge)) => {
                // The hedge carries on alone from where it began.
                let hedge = self
                    .active
                    .get_mut(&hedge)
                    .expect("a hedge outlives nothing");
                let (_, at, crc_at) = hedge.hedge_of.take().expect("it is a hedge");
                self.journal.done.push(Piece {
                    start: active.start,
                    end: at,
                    crc32c: crc_at,
                });
            }
            (None, None) => {
                if active.position > active.start {
                    self.journal.done.push(Piece {
                        start: active.start,
                        end: active.position,
                        crc32c: active.crc,
                    });
                }
                if active.position < active.end {
                    self.todo.push((active.position, active.end));
                }
            }
        }
    }

    pub(super) fn summary(&self) -> Summary {
        let mut done = self.journal.done.clone();
        done.sort_by_key(|p| p.start);
        let mut crc = 0u32;
        let mut cursor = 0;
        let mut complete = true;
        for piece in &done {
            if piece.start != cursor {
                complete = false;
                break;
            }
            crc = crc32c::crc32c_combine(crc, piece.crc32c, (piece.end - piece.start) as usize);
            cursor = piece.end;
        }
        Summary {
            complete: complete && cursor == self.journal.size,
            crc,
            workers: self.workers_used.len(),
            retries: self.retries,
            splits: self.splits,
            hedges: self.hedges,
            fetched: self.fetched,
        }
    }
}

#[cfg(test)]
#[cfg(test)]
mod tests {
    use super::*;

    fn journal(size: u64, done: Vec<Piece>) -> Journal {
        Journal {
            point: "p".into(),
            size,
            crc32c: 0,
            done,
        }
    }

    #[test]
    fn plans_cover_what_is_not_done_and_split_and_hedge() {
        let done = vec![Piece {
            start: 100,
            end: 200,
            crc32c: 1,
        }];
        let plan = Plan::new(&journal(1000, done));
        assert_eq!(plan.todo, vec![(0, 100), (200, 1000)]);

        let mut plan = Plan::new(&journal(64 * MIN_SPLIT, Vec::new()));
        let Job::Fetch { id: first, .. } = plan.next(true) else {
            panic!("a fetch")
        };
        // Nothing left to do: the running range is split in two.
        let Job::Fetch { start, end, .. } = plan.next(true) else {
            panic!("a split")
        };
        assert_eq!((start, end), (32 * MIN_SPLIT, 64 * MIN_SPLIT));
        assert_eq!(plan.active[&first].end, 32 * MIN_SPLIT);
        assert_eq!(plan.splits, 1);
    }

    #[test]
    fn a_hedge_that_wins_leaves_disjoint_pieces() {
        let size = 3 * MIN_SPLIT / 2;
        let mut plan = Plan::new(&journal(size, Vec::new()));
        let Job::Fetch { id: slow, .. } = plan.next(true) else {
            panic!("a fetch")
        };
        {
            let active = plan.active.get_mut(&slow).unwrap();
            active.position = 1000;
            active.crc = 77;
            active.started -= HEDGE_AFTER * 2;
        }
        // No typical rate known yet: no hedge.
        assert!(matches!(plan.next(true), Job::Wait));
        plan.rates.push(1e12);
        let Job::Fetch {
            id: hedge,
            start,
            end,
            ..
        } = plan.next(true)
        else {
            panic!("a hedge")
        };
        assert_eq!((start, end), (1000, size));
        plan.active.get_mut(&hedge).unwrap().position = size;
        plan.active.get_mut(&hedge).unwrap().crc = 5;
        plan.finish(hedge);
        assert!(plan.active.is_empty(), "the slow one is stopped");
        let mut pieces: Vec<(u64, u64, u32)> = plan
            .journal
            .done
            .iter()
            .map(|p| (p.start, p.end, p.crc32c))
            .collect();
        pieces.sort();
        assert_eq!(pieces, vec![(0, 1000, 77), (1000, size, 5)]);
        assert!(plan.summary().complete);
    }
}
