//! One handle shape for every long-lived subsystem of a node (API server, HTTP endpoints,
//! replication, membership).
//!
//! A subsystem starts its tasks through a [`Service`] and returns its [`Handle`]:
//! [`Handle::shutdown`] cancels the subsystem's token and waits for every task it spawned;
//! [`Handle::terminated`] resolves when all of them ended on their own. A task that panics is
//! logged, cancels its siblings, and makes both return [`Failed`] naming the subsystem and the
//! task: a panic is reported, never dropped. The replication thread (capnp-rpc is `!Send`) is
//! supervised the same way through [`Service::spawn_thread`].

use std::any::Any;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};

use futures::FutureExt;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// A subsystem task panicked.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{service}: task {task} panicked: {message}")]
pub struct Failed {
    pub service: &'static str,
    pub task: &'static str,
    pub message: String,
}

/// Spawns and supervises the tasks of one subsystem while it starts.
pub(crate) struct Service {
    name: &'static str,
    token: CancellationToken,
    tracker: TaskTracker,
    failure: Arc<Mutex<Option<Failed>>>,
}

impl Service {
    /// A subsystem called `name`, stopped by `token` (or by its handle's `shutdown`).
    pub(crate) fn new(name: &'static str, token: CancellationToken) -> Self {
        Self {
            name,
            token,
            tracker: TaskTracker::new(),
            failure: Arc::default(),
        }
    }

    /// The token the subsystem's tasks stop on.
    pub(crate) fn token(&self) -> &CancellationToken {
        &self.token
    }

    /// A spawner that outlives start-up, for tasks a subsystem starts later (one per connection).
    pub(crate) fn spawner(&self) -> Spawner {
        Spawner {
            name: self.name,
            token: self.token.clone(),
            tracker: self.tracker.clone(),
            failure: self.failure.clone(),
        }
    }

    /// Spawns `task`, named `what` in reports.
    pub(crate) fn spawn(
        &self,
        what: &'static str,
        task: impl Future<Output = ()> + Send + 'static,
    ) {
        self.spawner().spawn(what, task);
    }

    /// Runs `body` on its own OS thread (for `!Send` work such as capnp-rpc); the handle waits for
    /// it like for a task, and a panic in it is reported the same way.
    pub(crate) fn spawn_thread(
        &self,
        what: &'static str,
        body: impl FnOnce() + Send + 'static,
    ) -> std::io::Result<()> {
        let (done, finished) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name(format!("goutube-{what}"))
            .spawn(move || {
                let outcome = std::panic::catch_unwind(AssertUnwindSafe(body));
                let _ = done.send(outcome.map_err(panic_message));
            })?;
        let spawner = self.spawner();
        self.tracker.spawn(async move {
            match finished.await {
                Ok(Ok(())) => {}
                Ok(Err(message)) => spawner.failed(what, message),
                Err(_) => spawner.failed(what, "the thread ended without a result".into()),
            }
        });
        Ok(())
    }

    /// The handle the subsystem returns once its tasks are started.
    pub(crate) fn handle(self) -> Handle {
        self.tracker.close();
        Handle {
            name: self.name,
            token: self.token,
            tracker: self.tracker,
            failure: self.failure,
        }
    }
}

/// Spawns further tasks of a running subsystem; cheap to clone.
#[derive(Clone)]
pub struct Spawner {
    name: &'static str,
    token: CancellationToken,
    tracker: TaskTracker,
    failure: Arc<Mutex<Option<Failed>>>,
}

impl Spawner {
    /// The token the subsystem's tasks stop on.
    pub fn token(&self) -> &CancellationToken {
        &self.token
    }

    pub fn spawn(&self, what: &'static str, task: impl Future<Output = ()> + Send + 'static) {
        let spawner = self.clone();
        self.tracker.spawn(async move {
            if let Err(panic) = AssertUnwindSafe(task).catch_unwind().await {
                spawner.failed(what, panic_message(panic));
            }
        });
    }

    fn failed(&self, task: &'static str, message: String) {
        let failed = Failed {
            service: self.name,
            task,
            message,
        };
        tracing::error!(%failed, "a task panicked; stopping its subsystem");
        self.failure.lock().expect("poisoned").get_or_insert(failed);
        self.token.cancel();
    }
}

/// A started subsystem.
pub struct Handle {
    name: &'static str,
    token: CancellationToken,
    tracker: TaskTracker,
    failure: Arc<Mutex<Option<Failed>>>,
}

impl Handle {
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Stops the subsystem and waits for all of its tasks.
    pub async fn shutdown(self) -> Result<(), Failed> {
        self.token.cancel();
        self.terminated().await
    }

    /// Resolves when every task of the subsystem has ended (after a shutdown, or on its own).
    pub fn terminated(&self) -> impl Future<Output = Result<(), Failed>> + Send + 'static {
        let tracker = self.tracker.clone();
        let failure = self.failure.clone();
        async move {
            tracker.wait().await;
            match failure.lock().expect("poisoned").clone() {
                Some(failed) => Err(failed),
                None => Ok(()),
            }
        }
    }

    /// Whether a task has panicked so far.
    pub fn failure(&self) -> Option<Failed> {
        self.failure.lock().expect("poisoned").clone()
    }
}

/// The message of a caught panic.
pub(crate) fn panic_message(panic: Box<dyn Any + Send>) -> String {
    match panic.downcast::<String>() {
        Ok(message) => *message,
        Err(panic) => match panic.downcast::<&'static str>() {
            Ok(message) => (*message).to_owned(),
            Err(_) => "(a panic without a message)".into(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn shutdown_waits_for_tasks_and_reports_panics() {
        let service = Service::new("quiet", CancellationToken::new());
        let token = service.token().clone();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        service.spawn("waiter", async move {
            token.cancelled().await;
            let _ = tx.send(());
        });
        service.handle().shutdown().await.unwrap();
        rx.await
            .expect("the task ran to its end before shutdown returned");

        let service = Service::new("loud", CancellationToken::new());
        let token = service.token().clone();
        service.spawn("sibling", async move { token.cancelled().await });
        service.spawn("bomb", async { panic!("boom") });
        let handle = service.handle();
        let failed = handle.terminated().await.unwrap_err();
        assert_eq!((failed.service, failed.task), ("loud", "bomb"));
        assert_eq!(failed.message, "boom");

        let service = Service::new("threaded", CancellationToken::new());
        service
            .spawn_thread("worker", || panic!("thread boom"))
            .unwrap();
        let failed = service.handle().terminated().await.unwrap_err();
        assert_eq!(
            (failed.task, failed.message.as_str()),
            ("worker", "thread boom")
        );
    }
}
