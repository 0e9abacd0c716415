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
    pub(super) async fn gather(&mut self) -> (Vec<Pending>, bool) {
        let mut records = Vec::new();
        let mut size = 0;
        while size < PUSH_BYTES {
            match self.prepare().await {
                Some(record) => {
                    size += record.sent.len;
                    records.push(record);
                }
                None => return (records, false),
            }
        }
        (records, true)
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
                Err(_) => PluginError::Timeout { plugin, timeout },
            },
            () = self.stop.cancelled() => return None,
        };
        let bundled = sent
            .into_iter()
            .map(|sent| Err((sent, NotSent::Bundler(error.clone()))))
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

    /// The next record to send, round robin over the points that have something to send. A
    /// point whose description or bytes cannot be read waits, as after a failed record.
    pub(super) async fn prepare(&mut self) -> Option<Pending> {
        loop {
            let point = self.dirty.pop_front()?;
            self.queued.remove(&point);
            self.trim_live(&point);
            let Some(state) = self.points.get(&point) else {
                continue;
            };
            if state.next >= state.end || state.mode != Mode::Sending {
                continue;
            }
            let (start, generation) = (state.next, state.generation);
            let len = RECORD_BYTES.min(state.end - start);
            if let Err(error) = self.describe(&point).await {
                tracing::error!(follower = %self.follower, %point, %error, "cannot describe the point; trying again after a pause");
                self.back_off(&point);
                continue;
            }
            let payload = match self.live_payload(&point, start, len) {
                Some(payload) => payload,
                None => match self.context.store.read(&point, start, len).await {
                    Ok(bytes) => {
                        ::metrics::counter!(metrics::REPLICATION_READ_BACK)
                            .increment(bytes.len() as u64);
                        Buffer::new(vec![bytes])
                    }
                    // Deleted meanwhile: the removal event follows.
                    Err(ReadError::NotFound(_)) => continue,
                    Err(error) => {
                        tracing::error!(follower = %self.follower, %point, %error, "cannot read the point; trying again after a pause");
                        self.back_off(&point);
                        continue;
                    }
                },
            };
            let len = payload.len();
            // Replies and events are handled between fills only: the state is as it was read.
            let state = self.points.get_mut(&point).expect("still tracked");
            state.next = start + len;
            if state.next < state.end {
                self.mark(point.clone());
            }
            return Some(Pending {
                sent: Sent {
                    point,
                    start,
                    len,
                    generation,
                },
                payload,
            });
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
                bundled.push(Err((sent, NotSent::Bundler(error))));
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
