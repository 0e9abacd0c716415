//! Which member owns a point: the ring's owners (never the live view: liveness is not
//! ownership), the placement plugin, and its answers cached per ring version and plugin
//! generation, so routing does not call into WebAssembly for every request.
//!
//! The plugin's answer is checked before anyone acts on it: no answer, a name that is not an
//! owner of the ring, a repeated name or more names than asked for are errors (`Unavailable`,
//! naming the plugin). Writes fail closed.

use std::collections::HashSet;
use std::sync::Arc;

use tokio::sync::watch;

use crate::cache::GenerationCache;
use crate::cluster::Membership;
use crate::cluster::ring::Ring;
use crate::error::{Error, bounded};
use crate::plugins::{PluginSet, Plugins, types};
use crate::point::PointId;
use crate::reshard::Change;

pub struct Placement {
    plugins: Arc<Plugins>,
    membership: watch::Receiver<Arc<Membership>>,
    answers: GenerationCache<String, Arc<[String]>>,
}

impl Placement {
    pub fn new(plugins: Arc<Plugins>, membership: watch::Receiver<Arc<Membership>>) -> Self {
        Self {
            plugins,
            membership,
            answers: GenerationCache::new(None),
        }
    }

    /// The newest membership.
    pub fn membership(&self) -> Arc<Membership> {
        self.membership.borrow().clone()
    }

    /// After a reload of the plugins: forget every answer of the old placement plugin.
    pub fn reset(&self, generation: u64) {
        self.answers.reset(generation, None);
    }

    /// Up to `replicas` members that own `point`, most preferred first, and the membership the
    /// answer was computed from.
    pub async fn owners(
        &self,
        point: &str,
        replicas: u32,
    ) -> Result<(Arc<Membership>, Arc<[String]>), Error> {
        let membership = self.membership();
        let key = format!("{replicas}\0{point}");
        if let Some(owners) = self.answers.get(&key, membership.ring_version) {
            return Ok((membership, owners));
        }
        if !membership.ring.is_formed() {
            return Err(Error::Unavailable(
                "the ring is not formed yet: this node waits for cluster.bootstrap_expect primaries to find each other".into(),
            ));
        }
        let members = members(&membership.ring);
        if members.is_empty() {
            return Err(Error::Unavailable(
                "no member of the ring owns a range".into(),
            ));
        }
        let plugins = self.plugins.current();
        let point_owned = point.to_owned();
        let (answer, name, generation) = tokio::task::spawn_blocking(move || {
            let answer = plugins.owners(&point_owned, &members, replicas);
            (
                answer,
                plugins.placement.name().clone(),
                plugins.generation(),
            )
        })
        .await
        .map_err(|e| Error::Unavailable(format!("placement task failed: {e}")))?;
        let answer = answer.map_err(|e| Error::Unavailable(format!("placement: {e}")))?;
        let owners: Arc<[String]> = check(&membership.ring, answer, replicas)
            .map_err(|problem| {
                Error::Unavailable(format!(
                    "placement plugin {name} {problem}; writes fail closed"
                ))
            })?
            .into();
        self.answers
            .insert(key, owners.clone(), generation, membership.ring_version);
        Ok((membership, owners))
    }

    /// `Ok` if this node owns `point`; otherwise the refusal that names the owner.
    pub async fn check_local(&self, point: &PointId) -> Result<(), Error> {
        let (membership, owners) = self.owners(point.as_str(), 1).await?;
        let owner = &owners[0];
        if *owner == membership.local {
            return Ok(());
        }
        Err(refusal(&membership, point, owner))
    }

    /// While the ring has a pending change (a drain or a join, `docs/resharding.md`): the
    /// change and the owner of `point` once it is made. `None` when nothing is pending.
    pub async fn pending_owner(&self, point: &PointId) -> Result<Option<(Change, String)>, Error> {
        let membership = self.membership();
        let Some((change, target)) = crate::reshard::pending(&membership.ring) else {
            return Ok(None);
        };
        let plugins = self.plugins.current();
        let point = point.as_str().to_owned();
        let owner = tokio::task::spawn_blocking(move || owner_in(&plugins, &target, &point))
            .await
            .map_err(|e| Error::Unavailable(format!("placement task failed: {e}")))?
            .map_err(|e| Error::Unavailable(format!("{e}; writes fail closed")))?;
        Ok(Some((change, owner)))
    }

    /// The forgotten member `point` belonged to, while its points are still being taken over
    /// from its followers' copies (some live follower of it has not announced it is done,
    /// `docs/resharding.md`, forget). `None` otherwise.
    pub async fn being_taken_over(&self, point: &PointId) -> Result<Option<String>, Error> {
        let membership = self.membership();
        // The common case, no takeover under way, costs no copy of the ring.
        let pending: Vec<(String, Ring)> = crate::reshard::forgotten(&membership.ring)
            .into_iter()
            .filter(|forgotten| crate::reshard::takeover_pending(&membership, forgotten))
            .map(|forgotten| {
                let before = forgotten.before(&membership.ring);
                (forgotten.name, before)
            })
            .collect();
        if pending.is_empty() {
            return Ok(None);
        }
        let plugins = self.plugins.current();
        let point = point.as_str().to_owned();
        tokio::task::spawn_blocking(move || {
            for (name, before) in pending {
                if owner_in(&plugins, &before, &point)? == name {
                    return Ok(Some(name));
                }
            }
            Ok(None)
        })
        .await
        .map_err(|e| Error::Unavailable(format!("placement task failed: {e}")))?
        .map_err(|e: String| Error::Unavailable(format!("{e}; writes fail closed")))
    }

    /// The refusal of a write to `point` that belongs to `owner`: where to write it, or that the
    /// owner is down.
    pub fn refuse(&self, point: &PointId, owner: &str) -> Error {
        refusal(&self.membership(), point, owner)
    }
}

fn refusal(membership: &Membership, point: &PointId, owner: &str) -> Error {
    match membership.live(owner) {
        Some(member) => Error::NotOwner {
            point: bounded(point.as_str()),
            owner: owner.to_owned(),
            address: member.rpc_addr.clone(),
        },
        None => Error::OwnerDown {
            point: bounded(point.as_str()),
            owner: owner.to_owned(),
        },
    }
}

/// The owner of `point` in `ring` (any ring, not only the current one: resharding asks about
/// the ring a pending change leads to), by the placement plugin of `plugins`, checked as routing
/// checks it. Calls into WebAssembly: not for an async task's thread.
pub fn owner_in(plugins: &PluginSet, ring: &Ring, point: &str) -> Result<String, String> {
    let members = members(ring);
    if members.is_empty() {
        return Err("no member of the ring owns a range".into());
    }
    let answer = plugins
        .owners(point, &members, 1)
        .map_err(|e| format!("placement: {e}"))?;
    check(ring, answer, 1)
        .map(|mut owners| owners.swap_remove(0))
        .map_err(|problem| format!("placement plugin {} {problem}", plugins.placement.name()))
}

/// The members of `ring` that own a range, as the placement plugin sees them.
fn members(ring: &Ring) -> Vec<types::Member> {
    ring.owners()
        .map(|(name, member)| types::Member {
            name: name.clone(),
            address: member.rpc_addr.clone(),
            role: member.role.as_str().into(),
            virtual_nodes: member.virtual_nodes,
            tags: member.tags.clone().into_iter().collect(),
        })
        .collect()
}

/// The plugin's answer, if it names between 1 and `replicas` distinct owners of the ring.
fn check(ring: &Ring, answer: Vec<String>, replicas: u32) -> Result<Vec<String>, String> {
    if answer.is_empty() {
        return Err("answered no owner".into());
    }
    if answer.len() > replicas.max(1) as usize {
        return Err(format!(
            "answered {} owners where at most {} were asked for",
            answer.len(),
            replicas.max(1)
        ));
    }
    let mut seen = HashSet::new();
    for name in &answer {
        let owns = ring
            .members
            .get(name)
            .is_some_and(|member| member.owns_range());
        if !owns {
            return Err(format!(
                "answered {:?}, which is not a member of the ring that owns a range",
                bounded(name)
            ));
        }
        if !seen.insert(name) {
            return Err(format!("answered {:?} twice", bounded(name)));
        }
    }
    Ok(answer)
}
