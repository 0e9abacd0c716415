//! Authorization: the actions a subject can take on a point, and the decision cache in front of
//! the authorizer plugin.
//!
//! Every API call names one [`Action`]; the node asks its authorizer plugin whether the subject of
//! the connection may take it on the point. Decisions are reused for `decision_cache_ms` per
//! subject, action and point; the cache is emptied when plugins or policies are reloaded. A plugin
//! that fails (trap, timeout, out of memory) denies: authorization fails closed, and a failure is
//! never cached.

use std::collections::HashMap;
use std::fmt;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::plugins::{Decision, PluginSet};

/// Most decisions kept; the cache is emptied when it is full.
const MAX_CACHED: usize = 100_000;

/// The decision cache.
pub struct Authorizer {
    cache: Mutex<Cache>,
}

struct Cache {
    ttl: Duration,
    /// The plugin generation decisions are cached for: a decision taken with older plugins
    /// (one that was under way during a reload) is returned but not cached.
    generation: u64,
    decisions: HashMap<String, (Decision, Instant)>,
}

impl Authorizer {
    pub fn new(ttl: Duration) -> Self {
        Self {
            cache: Mutex::new(Cache {
                ttl,
                generation: 0,
                decisions: HashMap::new(),
            }),
        }
    }

    /// A decision taken less than the TTL ago.
    pub fn cached(&self, subject: &str, action: Action, point: &str) -> Option<Decision> {
        let cache = self.cache.lock().unwrap();
        let (decision, at) = cache.decisions.get(&key(subject, action, point))?;
        (at.elapsed() < cache.ttl).then(|| decision.clone())
    }

    /// Asks the authorizer plugin and caches its answer, unless `plugins` are not the generation
    /// the cache holds. Errors deny and are not cached.
    pub fn decide(
        &self,
        plugins: &PluginSet,
        subject: &str,
        action: Action,
        point: &str,
        peer: &str,
    ) -> Decision {
        match plugins.authorize(subject, action, point, peer) {
            Ok(decision) => {
                let mut cache = self.cache.lock().unwrap();
                if !cache.ttl.is_zero() && cache.generation == plugins.generation() {
                    if cache.decisions.len() >= MAX_CACHED {
                        cache.decisions.clear();
                    }
                    let entry = (decision.clone(), Instant::now());
                    cache.decisions.insert(key(subject, action, point), entry);
                }
                decision
            }
            Err(error) => Decision {
                allowed: false,
                reason: format!("authorization failed closed: {error}").into(),
            },
        }
    }

    /// Forgets every decision and caches from now on only those of plugin `generation` (after
    /// a reload), with a new TTL. Generations only move forward, whatever order reloads finish in.
    pub fn reset(&self, ttl: Duration, generation: u64) {
        let mut cache = self.cache.lock().unwrap();
        cache.ttl = ttl;
        cache.generation = cache.generation.max(generation);
        cache.decisions.clear();
    }
}

fn key(subject: &str, action: Action, point: &str) -> String {
    format!("{}\0{subject}\0{point}", action.as_str())
}

/// What a call wants to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// Append to a point.
    Produce,
    /// Read a point.
    Consume,
    /// Size, checksum, workers, listings.
    Metadata,
    /// Node-to-node replication.
    Replicate,
    /// Destructive and operator calls (delete).
    Admin,
}

impl Action {
    pub const ALL: [Action; 5] = [
        Action::Produce,
        Action::Consume,
        Action::Metadata,
        Action::Replicate,
        Action::Admin,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Action::Produce => "produce",
            Action::Consume => "consume",
            Action::Metadata => "metadata",
            Action::Replicate => "replicate",
            Action::Admin => "admin",
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PluginsSection;
    use crate::plugins::Plugins;

    #[test]
    fn decisions_are_cached_per_generation_and_ttl() {
        let dir = tempfile::tempdir().unwrap();
        let section = PluginsSection::default();
        let plugins = Plugins::load(&section, dir.path()).unwrap();
        let first = plugins.current();
        let authorizer = Authorizer::new(Duration::from_secs(60));

        assert!(
            authorizer
                .decide(&first, "root", Action::Produce, "p", "")
                .allowed
        );
        assert!(
            authorizer
                .cached("root", Action::Produce, "p")
                .unwrap()
                .allowed
        );
        assert!(authorizer.cached("root", Action::Consume, "p").is_none());
        assert!(authorizer.cached("root", Action::Produce, "q").is_none());

        // A reload: a decision of the old plugins (under way during it) is returned but not
        // cached; the new plugins' decisions are.
        let generation = plugins.reload(&section).unwrap();
        authorizer.reset(Duration::from_secs(60), generation);
        assert!(authorizer.cached("root", Action::Produce, "p").is_none());
        assert!(
            !authorizer
                .decide(&first, "nobody", Action::Produce, "p", "")
                .allowed
        );
        assert!(authorizer.cached("nobody", Action::Produce, "p").is_none());
        let second = plugins.current();
        authorizer.decide(&second, "nobody", Action::Produce, "p", "");
        assert!(authorizer.cached("nobody", Action::Produce, "p").is_some());

        // A reset that arrives late never takes the cache back to an older generation.
        authorizer.reset(Duration::from_secs(60), generation - 1);
        authorizer.decide(&first, "root", Action::Produce, "p", "");
        assert!(authorizer.cached("root", Action::Produce, "p").is_none());

        // A zero TTL caches nothing.
        authorizer.reset(Duration::ZERO, generation);
        authorizer.decide(&second, "root", Action::Produce, "p", "");
        assert!(authorizer.cached("root", Action::Produce, "p").is_none());
    }
}
