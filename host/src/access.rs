//! Who may do what: the actions a subject takes on a point, and the one door every caller (the
//! API, replication, later the gateway and the balancer) goes through to ask.
//!
//! [`Access::authorize`] answers from the decision cache, or asks the authorizer plugin on the
//! blocking pool, sharing the trip with the other calls asked at once (`crate::askers`; a
//! plugin call may run up to its deadline, and must never stall an async thread, least of all
//! replication's single thread). Decisions are reused for `decision_cache_ms` per
//! subject, action and point, and forgotten when the plugins are reloaded. A plugin that fails
//! (trap, timeout, out of memory) denies: authorization fails closed, and a failure is never
//! cached.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::cache::GenerationCache;
use crate::net::PeerInfo;
use crate::plugins::{PluginError, PluginSet, Plugins, types};
use crate::text::bounded;

/// The policy does not let a subject take an action on a point (`PermissionDenied` at the
/// edge).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{subject} may not {action} {point:?}: {reason}")]
pub struct Denied {
    /// Who asked (bounded).
    pub subject: String,
    /// The action's name.
    pub action: &'static str,
    /// The point, or the prefix (bounded).
    pub point: String,
    /// The plugin's reason (bounded).
    pub reason: String,
}

/// What a call wants to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// Append to a point.
    Produce,
    /// Read a point.
    Consume,
    /// Size, checksum, workers, listings, members.
    Metadata,
    /// Node-to-node replication.
    Replicate,
    /// Destructive and operator calls (delete).
    Admin,
}

impl Action {
    /// Every action.
    pub const ALL: [Action; 5] = [
        Action::Produce,
        Action::Consume,
        Action::Metadata,
        Action::Replicate,
        Action::Admin,
    ];

    /// Its name, as policies and errors write it.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Produce => "produce",
            Action::Consume => "consume",
            Action::Metadata => "metadata",
            Action::Replicate => "replicate",
            Action::Admin => "admin",
        }
    }

    fn wit(self) -> types::Action {
        match self {
            Action::Produce => types::Action::Produce,
            Action::Consume => types::Action::Consume,
            Action::Metadata => types::Action::Metadata,
            Action::Replicate => types::Action::Replicate,
            Action::Admin => types::Action::Admin,
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An authorization decision, with the authorizer's reason (for logs and error messages).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Whether the action is allowed.
    pub allowed: bool,
    /// The authorizer's reason.
    pub reason: Arc<str>,
}

/// The authorizer plugin behind its decision cache.
pub struct Access {
    plugins: Arc<Plugins>,
    decisions: GenerationCache<String, Decision>,
}

impl Access {
    /// The door in front of `plugins`' authorizer, caching its decisions for `ttl`.
    pub fn new(plugins: Arc<Plugins>, ttl: Duration) -> Self {
        Self {
            plugins,
            decisions: GenerationCache::new(Some(ttl)),
        }
    }

    /// `Ok` if `peer` may take `action` on `point`; [`Denied`] with the reason otherwise.
    pub async fn authorize(
        &self,
        peer: &PeerInfo,
        action: Action,
        point: &str,
    ) -> Result<(), Denied> {
        let decision = self.decide(peer, action, point).await;
        if decision.allowed {
            return Ok(());
        }
        Err(Denied {
            subject: bounded(&peer.subject),
            action: action.as_str(),
            point: bounded(point),
            reason: bounded(&decision.reason),
        })
    }

    /// The decision for `peer`, `action` and `point`: cached, or from the plugin.
    pub async fn decide(&self, peer: &PeerInfo, action: Action, point: &str) -> Decision {
        let key = cache_key(&peer.subject, action, point);
        if let Some(decision) = self.decisions.get(&key, 0) {
            crate::metrics::hot().authz_cache_hits.increment(1);
            return decision;
        }
        let request = types::AuthzRequest {
            subject: peer.subject.to_string(),
            action: action.wit(),
            point: point.to_owned(),
            peer: peer.addr.to_string(),
        };
        let asked = self
            .plugins
            .ask(move |plugins| (ask(plugins, &request), plugins.generation()))
            .await;
        match asked {
            Some((Ok(decision), generation)) => {
                self.decisions.insert(key, decision.clone(), generation, 0);
                decision
            }
            Some((Err(message), _)) => deny(format!("authorization failed closed: {message}")),
            None => deny("authorization failed closed: the authorizer's call did not end".into()),
        }
    }

    /// After a reload: forget every decision, cache those of plugin `generation` for `ttl`.
    pub fn reset(&self, generation: u64, ttl: Duration) {
        self.decisions.reset(generation, Some(ttl));
    }
}

fn ask(plugins: &PluginSet, request: &types::AuthzRequest) -> Result<Decision, PluginError> {
    match plugins.authorize(request)? {
        types::Decision::Allow(reason) => Ok(Decision {
            allowed: true,
            reason: reason.into(),
        }),
        types::Decision::Deny(reason) => Ok(Decision {
            allowed: false,
            reason: reason.into(),
        }),
    }
}

fn deny(reason: String) -> Decision {
    Decision {
        allowed: false,
        reason: reason.into(),
    }
}

fn cache_key(subject: &str, action: Action, point: &str) -> String {
    format!("{}\0{subject}\0{point}", action.as_str())
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::plugins::PluginsSection;

    fn peer(subject: &str) -> PeerInfo {
        PeerInfo {
            addr: "127.0.0.1:1".parse().unwrap(),
            subject: subject.into(),
        }
    }

    #[tokio::test]
    async fn decisions_are_cached_and_reloads_forget_them() {
        let dir = tempfile::tempdir().unwrap();
        let section = PluginsSection::default();
        let plugins = Arc::new(Plugins::load(&section, dir.path()).unwrap());
        let access = Access::new(plugins.clone(), Duration::from_secs(60));
        let root = peer("root");
        access.authorize(&root, Action::Produce, "p").await.unwrap();
        assert!(
            access
                .decisions
                .get(&cache_key("root", Action::Produce, "p"), 0)
                .is_some()
        );
        assert!(
            access
                .decisions
                .get(&cache_key("root", Action::Consume, "p"), 0)
                .is_none()
        );

        let denied = access
            .authorize(&peer("nobody"), Action::Produce, "p")
            .await
            .unwrap_err();
        assert_eq!(denied.action, "produce", "{denied}");

        let generation = plugins.reload(&section).unwrap();
        access.reset(generation, Duration::from_secs(60));
        assert!(
            access
                .decisions
                .get(&cache_key("root", Action::Produce, "p"), 0)
                .is_none()
        );
        access.authorize(&root, Action::Produce, "p").await.unwrap();
        assert!(
            access
                .decisions
                .get(&cache_key("root", Action::Produce, "p"), 0)
                .is_some()
        );
    }

    #[tokio::test]
    async fn many_questions_at_once_each_get_their_own_answer() {
        let dir = tempfile::tempdir().unwrap();
        let plugins = Arc::new(Plugins::load(&PluginsSection::default(), dir.path()).unwrap());
        let access = Access::new(plugins, Duration::from_secs(60));
        let (root, nobody) = (peer("root"), peer("nobody"));
        let asked = (0..200).map(|n| {
            let (access, root, nobody) = (&access, &root, &nobody);
            async move {
                let who = if n % 3 == 0 { nobody } else { root };
                let point = format!("p/{}", n % 50);
                (n, access.decide(who, Action::Consume, &point).await)
            }
        });
        for (n, decision) in futures::future::join_all(asked).await {
            assert_eq!(decision.allowed, n % 3 != 0, "question {n}: {decision:?}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_call_running_to_its_deadline_does_not_hold_the_questions_behind_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut section = PluginsSection::default();
        section.authorizer.source = std::path::Path::new(crate::plugins::builtin::BUILD_DIR)
            .join("misbehaving_authorizer.wasm")
            .display()
            .to_string();
        section.authorizer.timeout_ms = 2_000;
        let plugins = Arc::new(Plugins::load(&section, dir.path()).unwrap());
        let access = Arc::new(Access::new(plugins.clone(), Duration::from_secs(60)));
        let stuck = tokio::spawn({
            let access = access.clone();
            async move {
                let decision = access
                    .decide(&peer("root"), Action::Produce, "loop/x")
                    .await;
                (decision, Instant::now())
            }
        });
        // Asked once the looping call runs: fewer than would start another asker by their
        // number alone.
        let started = Instant::now();
        while plugins.askers_at_work() != (0, 1) {
            assert!(started.elapsed() < Duration::from_secs(5), "never taken");
            tokio::task::yield_now().await;
        }
        let root = peer("root");
        let asked = (0..4).map(|n| {
            let (access, root) = (&access, &root);
            async move {
                access
                    .decide(root, Action::Produce, &format!("p/{n}"))
                    .await
            }
        });
        let answers = futures::future::join_all(asked).await;
        let answered = Instant::now();
        for decision in &answers {
            assert!(decision.allowed, "{decision:?}");
        }
        let (decision, denied) = stuck.await.unwrap();
        assert!(
            !decision.allowed && decision.reason.contains("ran out of time"),
            "{decision:?}"
        );
        assert!(
            answered < denied,
            "the questions behind the looping call waited for its deadline"
        );
    }
}
