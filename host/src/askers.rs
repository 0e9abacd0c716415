//! Short blocking calls that share their trips to the blocking pool: plugin calls (authorization,
//! placement) and, under `storage.fsync = "never"`, the file work of a point (a new small point
//! created and written, a batch of appends).
//!
//! Such a call must not run on an async thread (a plugin call may run up to its deadline, a file
//! system call may wait on the disk), and least of all on replication's single thread. A trip to
//! the blocking pool per call costs two thread hand-offs, which on a small machine cost more than
//! the call: a produce stream creating small points asked the authorizer, placement and the file
//! system about each. Calls asked at once share a trip instead: they wait in one queue, and an
//! *asker* on the blocking pool runs them one after the other until the queue is empty.
//!
//! Another asker starts when more than [`CALLS_PER_ASKER`] calls wait for each running one, or
//! when a caller's answer is late and the oldest call has waited [`ASKER_STALLED`] (the askers are
//! in long calls: a plugin running to its deadline, a disk that is slow), up to the queue's most.
//! So a long call holds up the calls behind it for [`ASKER_STALLED`], not for its length.
//!
//! Calls that are long by nature keep their own trips: bundling and unbundling (a batch of records
//! per call, megabytes each), and file work that syncs.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

/// Calls waiting for each running asker before another starts.
const CALLS_PER_ASKER: usize = 8;
/// How long the oldest call may wait before a caller whose answer is late starts another asker.
const ASKER_STALLED: Duration = Duration::from_millis(2);

/// The queue of calls and the askers that run them.
pub(crate) struct Askers {
    asking: Arc<Mutex<Asking>>,
    /// Its name in `goutube_blocking_trips_total{queue}`.
    queue: &'static str,
}

/// The calls no asker has taken yet, how many askers run, and how many may.
struct Asking {
    waiting: VecDeque<Call>,
    askers: usize,
    most: usize,
}

/// A call waiting for an asker; it sends its own result.
struct Call {
    since: Instant,
    run: Box<dyn FnOnce() + Send>,
}

impl Askers {
    /// A queue named `queue` (in metrics), run by up to `most` askers at once.
    pub(crate) fn new(queue: &'static str, most: usize) -> Self {
        Self {
            asking: Arc::new(Mutex::new(Asking {
                waiting: VecDeque::new(),
                askers: 0,
                most,
            })),
            queue,
        }
    }

    /// Runs `call` on an asker and returns its result; `None` if it never ran to the end (it
    /// panicked, or the runtime dropped its asker as it shut down).
    pub(crate) async fn ask<R: Send + 'static>(
        &self,
        call: impl FnOnce() -> R + Send + 'static,
    ) -> Option<R> {
        let (answer, answered) = oneshot::channel();
        let call = Call {
            since: Instant::now(),
            run: Box::new(move || {
                // The caller may have gone (its call was cancelled): nobody to tell.
                let _ = answer.send(call());
            }),
        };
        let mut start = self.asking.lock().expect("poisoned").push(call);
        let mut answered = std::pin::pin!(answered);
        loop {
            if start {
                let asker = Asker {
                    asking: self.asking.clone(),
                    stopped: false,
                };
                crate::metrics::hot().trip(self.queue);
                tokio::task::spawn_blocking(move || asker.run());
            }
            match tokio::time::timeout(ASKER_STALLED, &mut answered).await {
                Ok(answer) => return answer.ok(),
                // The askers are slow (one may be in a call running to its deadline).
                Err(_) => start = self.asking.lock().expect("poisoned").stalled(),
            }
        }
    }

    /// The calls waiting, and the askers running.
    #[cfg(test)]
    pub(crate) fn at_work(&self) -> (usize, usize) {
        let asking = self.asking.lock().expect("poisoned");
        (asking.waiting.len(), asking.askers)
    }
}

impl Asking {
    /// Queues `call`; whether the caller must start another asker (counted as running).
    fn push(&mut self, call: Call) -> bool {
        self.waiting.push_back(call);
        let start = self.askers == 0
            || (self.askers < self.most && self.waiting.len() > self.askers * CALLS_PER_ASKER);
        if start {
            self.askers += 1;
        }
        start
    }

    /// Asked by a caller whose answer is late: whether it must start another asker (counted as
    /// running), because the oldest call has waited [`ASKER_STALLED`] for one.
    fn stalled(&mut self) -> bool {
        let start = self.askers < self.most
            && self
                .waiting
                .front()
                .is_some_and(|oldest| oldest.since.elapsed() >= ASKER_STALLED);
        if start {
            self.askers += 1;
        }
        start
    }

    /// The next call for an asker; `None` (and the asker stops counting) when none waits.
    fn next(&mut self) -> Option<Call> {
        let next = self.waiting.pop_front();
        if next.is_none() {
            self.askers -= 1;
        }
        next
    }
}

/// An asker on the blocking pool. However it ends (no call left, or a runtime that drops it unrun
/// as it shuts down), it stops counting as running, and the last asker gone leaves no call
/// waiting for nobody: those are dropped, and their callers get `None`.
struct Asker {
    asking: Arc<Mutex<Asking>>,
    /// It found the queue empty (and stopped counting itself then).
    stopped: bool,
}

impl Asker {
    /// Runs the waiting calls until none is left.
    fn run(mut self) {
        loop {
            let next = self.asking.lock().expect("poisoned").next();
            let Some(call) = next else {
                self.stopped = true;
                return;
            };
            // A panic (a bug of ours) drops that call's answer, not the asker.
            let _ = std::panic::catch_unwind(AssertUnwindSafe(call.run));
        }
    }
}

impl Drop for Asker {
    fn drop(&mut self) {
        if self.stopped {
            return;
        }
        let mut asking = self
            .asking
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        asking.askers -= 1;
        if asking.askers == 0 {
            asking.waiting.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(since: Instant) -> Call {
        Call {
            since,
            run: Box::new(|| {}),
        }
    }

    #[test]
    fn calls_asked_at_once_share_an_asker_until_too_many_wait_or_they_stall() {
        let mut asking = Asking {
            waiting: VecDeque::new(),
            askers: 0,
            most: 4,
        };
        let now = Instant::now();
        // The first call starts an asker; the next ones wait for it, until too many do.
        for n in 0..=CALLS_PER_ASKER {
            let started = asking.push(call(now));
            assert_eq!(started, n == 0 || n == CALLS_PER_ASKER, "call {n}");
        }
        assert_eq!(asking.askers, 2);
        // Askers take every call, and stop (uncounted) once none is left.
        while asking.next().is_some() {}
        assert_eq!(asking.askers, 1);
        assert!(asking.next().is_none());
        assert_eq!(asking.askers, 0);

        // A caller whose answer is late starts another asker if the oldest call has waited
        // long (the running ones are in calls to their deadline), up to the most.
        let mut asking = Asking {
            waiting: VecDeque::new(),
            askers: 1,
            most: 4,
        };
        assert!(!asking.push(call(now)));
        assert!(!asking.stalled(), "the oldest has not waited long");
        asking.waiting.clear();
        assert!(!asking.push(call(now - ASKER_STALLED * 2)));
        assert!(asking.stalled(), "the oldest waited too long");
        assert_eq!(asking.askers, 2);
        asking.askers = 4;
        assert!(!asking.stalled(), "never more than the most");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_call_that_panics_gets_none_and_the_askers_go_on() {
        let askers = Askers::new("test", 4);
        let panicked = askers.ask(|| -> u32 { panic!("a bug") }).await;
        assert_eq!(panicked, None);
        let answers =
            futures::future::join_all((0..100u32).map(|n| askers.ask(move || n * 2))).await;
        let expected: Vec<_> = (0..100u32).map(|n| Some(n * 2)).collect();
        assert_eq!(answers, expected);
        // Each asker stops once it finds the queue empty.
        let started = Instant::now();
        while askers.at_work() != (0, 0) {
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "{:?}",
                askers.at_work()
            );
            tokio::task::yield_now().await;
        }
    }
}
