//! The replicator's sending side: filling the window of pushes, gathering the records to send
//! (from bytes lent by the store or read back), bundling them on the blocking pool, admitting
//! what may travel, pacing by `reshard.max_bytes_per_sec`, and trimming the bytes it holds.

use std::collections::HashSet;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::metrics;
use crate::plugins::{Buffer, PluginError, PluginSet};
use crate::point::{PointId, ReadError};

use super::*;

impl Replicator {
    /// Sends pushes until `window` are in flight, or their bytes reach `window` ×
    /// [`PUSH_BYTES`], or nothing is left to send.
    pub(super) async fn fill(&mut self, window: usize) {
        self.retry_unsendable();
        let budget = window as u64 * PUSH_BYTES;
        while self.in_flight.len() < window && self.in_flight_bytes < budget {
            if self.paced_until().is_some() {
                return;
            }
            let (records, more) = self.gather().await;
            if records.is_empty() {
                return;
            }
            let Some(Bundling { bundled, left }) = self.bundle(records).await else {
                return;
            };
            let ready = self.admit(bundled);
            self.send_in_pushes(ready);
            if !left.is_empty() {
                self.put_back(left);
            } else if !more {
                return;
            }
        }
    }

    /// Records to send, up to [`PUSH_BYTES`] of payload, and whether more may be waiting.
    ///
    /// The records are chosen first, round robin over the points that have something to send,
    /// then their bytes (and the descriptions of points not described yet) are read, up to
    /// [`READING`] points at once: with many small points, each read is a trip to the blocking
    /// pool to open a point. A point whose description or bytes cannot be read goes back to
    /// its first record not read and waits, as after a failed record; its later records in the
    /// batch are dropped. Replies and events are handled between fills only, so the points'
    /// state stays as the records were chosen from it.
    pub(super) async fn gather(&mut self) -> (Vec<Pending>, bool) {
        loop {
            let (chosen, more) = self.choose_push();
            let records = self.read_all(chosen).await;
            // Every record failed: the next ones, if any, are chosen from the other points.
            if !records.is_empty() || !more {
                return (records, more);
            }
        }
    }

    /// Records for one push, up to [`PUSH_BYTES`] of payload, and whether more may be waiting.
    fn choose_push(&mut self) -> (Vec<Sent>, bool) {
        let mut chosen = Vec::new();
        let mut size = 0;
        while size < PUSH_BYTES {
            let Some(sent) = self.choose() else {
                return (chosen, false);
            };
            size += sent.len;
            chosen.push(sent);
        }
        (chosen, true)
    }

    /// Reads the bytes of the `chosen` records, and the descriptions of their points not
    /// described yet, [`READING`] points at once; sends the descriptions, and returns the
    /// records read, in order.
    async fn read_all(&mut self, chosen: Vec<Sent>) -> Vec<Pending> {
        let mut describing = HashSet::new();
        let reads: Vec<_> = chosen
            .into_iter()
            .map(|sent| {
                let describe =
                    !self.described.contains(&sent.point) && describing.insert(sent.point.clone());
                let live = self.live_payload(&sent.point, sent.start, sent.len);
                self.read(sent, describe, live)
            })
            .collect();
        let read: Vec<_> = futures::stream::iter(reads)
            .buffered(READING)
            .collect()
            .await;
        let mut records = Vec::with_capacity(read.len());
        let mut failed = HashSet::new();
        for Read {
            sent,
            description,
            payload,
        } in read
        {
            if failed.contains(&sent.point) {
                continue;
            }
            let payload = match description {
                Some(Err(error)) => Err(error),
                Some(Ok(description)) => {
                    self.send_description(&sent.point, description);
                    payload
                }
                None => payload,
            };
            match payload {
                Ok(payload) if payload.len() == sent.len => records.push(Pending { sent, payload }),
                Ok(payload) => {
                    // Shorter than asked (the live appends kept stop short of it): sent as far
                    // as it goes, and the point goes on from there in a later batch.
                    failed.insert(sent.point.clone());
                    self.rewind(&sent.point, sent.start + payload.len());
                    self.mark(sent.point.clone());
                    if !payload.is_empty() {
                        let sent = Sent {
                            len: payload.len(),
                            ..sent
                        };
                        records.push(Pending { sent, payload });
                    }
                }
                Err(error) => {
                    // Deleted meanwhile: the removal event follows (and ends the pause).
                    if !matches!(error, ReadError::NotFound(_)) {
                        tracing::error!(follower = %self.follower, point = %sent.point, %error, "cannot describe or read the point; trying again after a pause");
                    }
                    failed.insert(sent.point.clone());
                    self.rewind(&sent.point, sent.start);
                    self.back_off(&sent.point);
                }
            }
        }
        records
    }

    /// Reads what `sent` needs: the point's description if `describe`, and its bytes unless
    /// they are `live` already.
    fn read(
        &self,
        sent: Sent,
        describe: bool,
        live: Option<Buffer>,
    ) -> impl std::future::Future<Output = Read> + use<'_> {
        let store = &self.context.store;
        async move {
            let description = match describe {
                true => Some(self.description(&sent.point).await),
                false => None,
            };
            let payload = match live {
                Some(payload) => Ok(payload),
                None => store
                    .read(&sent.point, sent.start, sent.len)
                    .await
                    .map(|bytes| {
                        ::metrics::counter!(metrics::REPLICATION_READ_BACK)
                            .increment(bytes.len() as u64);
                        Buffer::new(vec![bytes])
                    }),
            };
            Read {
                sent,
                description,
                payload,
            }
        }
    }

    /// Bundles `records` on the blocking pool (see [`bundle_all`]); `None` when the replicator
    /// stops meanwhile. A bundler whose calls block in the host (a guest that sleeps) is waited
    /// for no longer than its deadlines allow.
    pub(super) async fn bundle(&self, records: Vec<Pending>) -> Option<Bundling> {
        let plugins = self.context.services.plugins.current();
        let timeout = plugins.bundler.timeout() * records.len() as u32 + Duration::from_secs(1);
        let plugin = plugins.bundler.name().clone();
        let sent: Vec<Sent> = records.iter().map(|record| record.sent.clone()).collect();
        let stop = self.stop.clone();
        let bundling = tokio::task::spawn_blocking(move || bundle_all(&plugins, records, &stop));
        let error = tokio::select! {
            done = tokio::time::timeout(timeout, bundling) => match done {
                Ok(Ok(bundled)) => return Some(bundled),
                Ok(Err(panicked)) => PluginError::Trap {
                    plugin,
                    message: format!("the host panicked bundling: {panicked}"),
                },
                Err(_) => PluginError::Timeout {
                    plugin,
                    timeout,
                    on_cpu: None,
                },
            },
            () = self.stop.cancelled() => return None,
        };
        let bundled = sent
            .into_iter()
            .map(|sent| Err((sent, NotSent::Bundler(Box::new(error.clone())))))
            .collect();
        Some(Bundling {
            bundled,
            left: Vec::new(),
        })
    }

    /// Records read but not bundled (the bytes bundled so far filled a push): each point is
    /// sent again from the first of its records left.
    pub(super) fn put_back(&mut self, left: Vec<Sent>) {
        for sent in left {
            if let Some(state) = self.points.get_mut(&sent.point) {
                state.next = state.next.min(sent.start);
                self.mark(sent.point);
            }
        }
    }

    /// The bundled records that may go, in order. A record that was not bundled rewinds its
    /// point to its start and puts the point in backoff (or, too large to ever travel, aside
    /// until a reload); the point's later records in the batch are dropped with it.
    pub(super) fn admit(
        &mut self,
        bundled: Vec<Result<Prepared, (Sent, NotSent)>>,
    ) -> Vec<Prepared> {
        let mut failed: HashSet<PointId> = HashSet::new();
        let mut ready = Vec::with_capacity(bundled.len());
        for result in bundled {
            let (sent, why) = match result {
                Ok(record) if !failed.contains(&record.sent.point) => {
                    ready.push(record);
                    continue;
                }
                Ok(_) => continue,
                Err(failure) => failure,
            };
            if !failed.insert(sent.point.clone()) {
                continue;
            }
            let Some(state) = self.points.get_mut(&sent.point) else {
                continue;
            };
            state.next = state.next.min(sent.start);
            let reason = match why {
                NotSent::TooLarge { .. } => {
                    state.mode = Mode::Unsendable {
                        generation: self.plugins_generation,
                    };
                    tracing::error!(follower = %self.follower, point = %sent.point, start = sent.start, %why, "a record cannot travel with this bundler; the point is not replicated until the plugins are reloaded");
                    "too_large"
                }
                NotSent::Bundler(_) => {
                    tracing::warn!(follower = %self.follower, point = %sent.point, start = sent.start, %why, "the bundler failed on a record; sending it again after a pause");
                    self.back_off(&sent.point);
                    "bundler_failed"
                }
            };
            ::metrics::counter!(metrics::REPLICATION_UNSENT, "reason" => reason).increment(1);
        }
        ready
    }

    /// Sends `records` in pushes of about [`PUSH_BYTES`] on the wire each (a record larger
    /// than that goes alone).
    pub(super) fn send_in_pushes(&mut self, records: Vec<Prepared>) {
        let mut push = Vec::new();
        let mut wire = 0;
        for record in records {
            wire += record.wire_len() as u64;
            push.push(record);
            if wire >= PUSH_BYTES {
                self.send(std::mem::take(&mut push), wire);
                wire = 0;
            }
        }
        if !push.is_empty() {
            self.send(push, wire);
        }
    }

    /// While a throttled handover has sent its share, until when it waits.
    pub(super) fn paced_until(&self) -> Option<Instant> {
        self.pace
            .map(|(_, at)| at)
            .filter(|at| *at > Instant::now())
    }

    /// Counts `bytes` sent against the throttle, if there is one.
    pub(super) fn spend(&mut self, bytes: u64) {
        if let Some((rate, at)) = &mut self.pace {
            let now = Instant::now();
            *at = (*at).max(now) + Duration::from_secs_f64(bytes as f64 / *rate as f64);
        }
    }

    /// The next record to send, round robin over the points that have something to send; the
    /// point's next byte to send moves past it.
    fn choose(&mut self) -> Option<Sent> {
        loop {
            let point = self.dirty.pop_front()?;
            self.queued.remove(&point);
            self.trim_live(&point);
            let Some(state) = self.points.get_mut(&point) else {
                continue;
            };
            if state.next >= state.end || state.mode != Mode::Sending {
                continue;
            }
            let (start, copy, generation) = (state.next, state.copy, state.generation);
            let len = RECORD_BYTES.min(state.end - start);
            state.next = start + len;
            if state.next < state.end {
                self.mark(point.clone());
            }
            return Some(Sent {
                point,
                start,
                len,
                copy,
                generation,
            });
        }
    }

    /// Moves the next byte of `point` to send back to `at` (the first not sent after all).
    fn rewind(&mut self, point: &PointId, at: u64) {
        if let Some(state) = self.points.get_mut(point) {
            state.next = state.next.min(at);
        }
    }

    /// Drops the live appends of `point` that end before its next byte to send.
    pub(super) fn trim_live(&mut self, point: &PointId) {
        let Some(state) = self.points.get_mut(point) else {
            return;
        };
        while let Some(first) = state.live.front() {
            if first.end() > state.next {
                break;
            }
            self.live_bytes -= first.len();
            state.live.pop_front();
        }
    }

    /// `[start, start + up to len)` of `point` from the live appends kept for it, if they hold
    /// its first byte.
    pub(super) fn live_payload(&self, point: &PointId, start: u64, len: u64) -> Option<Buffer> {
        let state = self.points.get(point)?;
        let mut pieces = Vec::new();
        let mut at = start;
        for live in &state.live {
            if live.start > at || at >= start + len {
                break;
            }
            let mut offset = live.start;
            for frame in &live.frames {
                let frame_end = offset + frame.len() as u64;
                if frame_end > at && at < start + len {
                    let from = (at - offset) as usize;
                    let to = ((start + len).min(frame_end) - offset) as usize;
                    pieces.push(frame.slice(from..to));
                    at = offset + to as u64;
                }
                offset = frame_end;
            }
        }
        (!pieces.is_empty()).then(|| Buffer::new(pieces))
    }
}

/// What one bundling call made of the records it was given.
pub(super) struct Bundling {
    /// One result per record bundled (or that failed), in order.
    pub(super) bundled: Vec<Result<Prepared, (Sent, NotSent)>>,
    /// The records after them, not bundled: what was bundled already fills a push.
    pub(super) left: Vec<Sent>,
}

/// Bundles the records in order with `plugins`' bundler and computes each payload's CRC32C
/// (on the blocking pool: a plugin call blocks). Stops once the bundles made take two pushes'
/// worth of bytes on the wire, so memory stays bounded however a bundler expands its records,
/// and when `stop` is cancelled.
pub(super) fn bundle_all(
    plugins: &PluginSet,
    records: Vec<Pending>,
    stop: &CancellationToken,
) -> Bundling {
    let mut bundled = Vec::with_capacity(records.len());
    let mut left = Vec::new();
    let mut wire_total = 0;
    for Pending { sent, payload } in records {
        if wire_total >= 2 * PUSH_BYTES as usize || stop.is_cancelled() {
            left.push(sent);
            continue;
        }
        let bundle = match plugins.bundle(sent.point.as_str(), sent.start, &payload) {
            Ok(bundle) => bundle,
            Err(error) => {
                bundled.push(Err((sent, NotSent::Bundler(Box::new(error)))));
                continue;
            }
        };
        let wire = wire_len(&bundle, &payload);
        if wire > MAX_BUNDLE_BYTES {
            bundled.push(Err((sent, NotSent::TooLarge { wire })));
            continue;
        }
        wire_total += wire;
        let crc = payload
            .pieces()
            .iter()
            .fold(0, |crc, piece| crc32c::crc32c_append(crc, piece));
        bundled.push(Ok(Prepared {
            sent,
            payload,
            bundled: bundle,
            crc,
        }));
    }
    Bundling { bundled, left }
}
