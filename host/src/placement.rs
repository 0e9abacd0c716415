//! Which members own a point: the member list, the placement plugin, and its answers cached per
//! membership version, so routing does not call into WebAssembly for every request.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use crate::plugins::{Member, PluginError, PluginSet};

/// Most answers kept per membership version; the cache is emptied when it is full.
const MAX_CACHED: usize = 100_000;

/// A version of the member list.
#[derive(Debug, Clone)]
pub struct Membership {
    pub version: u64,
    pub members: Vec<Member>,
}

pub struct Placement {
    membership: RwLock<Arc<Membership>>,
    cache: Mutex<Cache>,
}

/// Answers for `(key, replicas)`, valid for one membership version and one plugin generation.
#[derive(Default)]
struct Cache {
    version: u64,
    generation: u64,
    owners: HashMap<(String, u32), Arc<[String]>>,
}

impl Placement {
    pub fn new(members: Vec<Member>) -> Self {
        Self {
            membership: RwLock::new(Arc::new(Membership {
                version: 1,
                members,
            })),
            cache: Mutex::new(Cache {
                version: 1,
                ..Cache::default()
            }),
        }
    }

    pub fn membership(&self) -> Arc<Membership> {
        self.membership.read().unwrap().clone()
    }

    /// Replaces the member list: a new version, and no cached answer survives it.
    pub fn set_members(&self, members: Vec<Member>) {
        let mut membership = self.membership.write().unwrap();
        let version = membership.version + 1;
        *membership = Arc::new(Membership { version, members });
        let mut cache = self.cache.lock().unwrap();
        cache.version = version;
        cache.owners.clear();
    }

    /// Forgets every answer and caches from now on only those of plugin `generation` (the
    /// placement plugin was reloaded): answers computed by the old plugin are not cached.
    pub fn reset(&self, generation: u64) {
        let mut cache = self.cache.lock().unwrap();
        cache.generation = cache.generation.max(generation);
        cache.owners.clear();
    }

    /// A cached answer for the current membership.
    pub fn cached(&self, key: &str, replicas: u32) -> Option<Arc<[String]>> {
        let version = self.membership.read().unwrap().version;
        let cache = self.cache.lock().unwrap();
        if cache.version != version {
            return None;
        }
        cache.owners.get(&(key.to_owned(), replicas)).cloned()
    }

    /// The names of the members that own `key`, most preferred first.
    pub fn owners(
        &self,
        plugins: &PluginSet,
        key: &str,
        replicas: u32,
    ) -> Result<Arc<[String]>, PluginError> {
        if let Some(owners) = self.cached(key, replicas) {
            return Ok(owners);
        }
        let membership = self.membership();
        let owners: Arc<[String]> = plugins.owners(key, &membership.members, replicas)?.into();
        let mut cache = self.cache.lock().unwrap();
        if cache.version == membership.version && cache.generation == plugins.generation() {
            if cache.owners.len() >= MAX_CACHED {
                cache.owners.clear();
            }
            cache
                .owners
                .insert((key.to_owned(), replicas), owners.clone());
        }
        Ok(owners)
    }
}
