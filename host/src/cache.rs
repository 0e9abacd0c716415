//! The answer cache in front of the plugins: decisions of the authorizer (per TTL) and owners
//! from placement (per ring version).
//!
//! An answer is valid for the plugin *generation* that computed it (0 at start, +1 per reload)
//! and for one *version* of its input (the ring's content hash for placement; always 0 for
//! authorization). Both are stamps, compared for equality: an answer computed from older plugins
//! or another ring is returned to its caller but never served to anyone else.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Most answers kept; the cache is emptied when it is full.
const MAX_ENTRIES: usize = 100_000;

pub(crate) struct GenerationCache<K, V> {
    inner: Mutex<Inner<K, V>>,
}

struct Inner<K, V> {
    generation: u64,
    version: u64,
    /// `None`: answers live as long as their generation and version.
    ttl: Option<Duration>,
    entries: HashMap<K, (V, Instant)>,
}

impl<K: Eq + Hash, V: Clone> GenerationCache<K, V> {
    pub(crate) fn new(ttl: Option<Duration>) -> Self {
        Self {
            inner: Mutex::new(Inner {
                generation: 0,
                version: 0,
                ttl,
                entries: HashMap::new(),
            }),
        }
    }

    /// The answer for `key` computed for input `version`, if it is still fresh.
    pub(crate) fn get<Q>(&self, key: &Q, version: u64) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Eq + Hash + ?Sized,
    {
        let inner = self.inner.lock().expect("poisoned");
        if inner.version != version {
            return None;
        }
        let (value, at) = inner.entries.get(key)?;
        match inner.ttl {
            Some(ttl) if at.elapsed() >= ttl => None,
            _ => Some(value.clone()),
        }
    }

    /// Keeps `value`, computed by plugin `generation` from input `version`, unless that
    /// generation is not the cache's or the TTL is zero. A new input version replaces every
    /// answer of the previous one.
    pub(crate) fn insert(&self, key: K, value: V, generation: u64, version: u64) {
        let mut inner = self.inner.lock().expect("poisoned");
        if generation != inner.generation || inner.ttl.is_some_and(|ttl| ttl.is_zero()) {
            return;
        }
        if version != inner.version || inner.entries.len() >= MAX_ENTRIES {
            inner.entries.clear();
            inner.version = version;
        }
        inner.entries.insert(key, (value, Instant::now()));
    }

    /// Forgets every answer; from now on keeps only those of plugin `generation` (after a
    /// reload). Generations only move forward, whatever order reloads finish in.
    pub(crate) fn reset(&self, generation: u64, ttl: Option<Duration>) {
        let mut inner = self.inner.lock().expect("poisoned");
        inner.generation = inner.generation.max(generation);
        inner.ttl = ttl;
        inner.entries.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_belong_to_their_generation_version_and_ttl() {
        let cache = GenerationCache::<String, u32>::new(None);
        cache.insert("a".into(), 1, 0, 7);
        assert_eq!(cache.get("a", 7), Some(1));
        assert_eq!(cache.get("a", 8), None, "another ring version");
        cache.insert("b".into(), 2, 0, 8);
        assert_eq!(
            cache.get("a", 7),
            None,
            "the new version replaced the old answers"
        );
        assert_eq!(cache.get("b", 8), Some(2));

        // A reload: answers of the old plugins are neither served nor kept.
        cache.reset(1, None);
        assert_eq!(cache.get("b", 8), None);
        cache.insert("c".into(), 3, 0, 8);
        assert_eq!(cache.get("c", 8), None);
        cache.insert("c".into(), 3, 1, 8);
        assert_eq!(cache.get("c", 8), Some(3));
        // A late reset never goes back to an older generation.
        cache.reset(0, None);
        cache.insert("d".into(), 4, 0, 8);
        assert_eq!(cache.get("d", 8), None);

        let timed = GenerationCache::<String, u32>::new(Some(Duration::ZERO));
        timed.insert("a".into(), 1, 0, 0);
        assert_eq!(timed.get("a", 0), None, "a zero TTL caches nothing");
        timed.reset(0, Some(Duration::from_secs(60)));
        timed.insert("a".into(), 1, 0, 0);
        assert_eq!(timed.get("a", 0), Some(1));
    }
}
