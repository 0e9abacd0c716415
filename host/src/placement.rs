//! Which member owns a point: the ring's owners (never the live view: liveness is not
//! ownership), the placement plugin, and its answers cached per ring version and plugin
//! generation, so routing does not call into WebAssembly for every request.
//!
//! The plugin's answer is checked before anyone acts on it: no answer, a name that is not an
//! owner of the ring, a repeated name or more names than asked for are errors
//! ([`PlacementError`], `Unavailable` at the edge, naming the plugin). Writes fail closed.
//!
//! Three questions are asked, all answered from the same cache per ring version (a question
//! about the ring a pending change leads to, or about the ring before a member was forgotten, is
//! a function of the current ring too): who owns a point now, who will own it once the pending
//! change is made, and who owned it before a forgotten member was forgotten.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use tokio::sync::watch;

use crate::cache::GenerationCache;
use crate::cluster::Membership;
use crate::cluster::change::{self, Change, Pending};
use crate::cluster::ring::Ring;
use crate::plugins::{PluginSet, Plugins, types};
use crate::text::bounded;

/// The owners of a point: the placement plugin's answer, checked.
#[derive(Debug, Clone)]
pub struct Owners {
    /// The membership the answer was computed from.
    pub membership: Arc<Membership>,
    /// Its owners, most preferred first: never empty, no name twice.
    pub names: Arc<[String]>,
}

impl Owners {
    /// The most preferred owner: the one that takes the point's writes.
    pub fn first(&self) -> &str {
        &self.names[0]
    }
}

/// Who will own a point once the pending change of the ring is made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NextOwner {
    /// The change.
    pub change: Change,
    /// The point's owner once it is made.
    pub owner: String,
}

/// Why the owner of a point cannot be named: every write to it fails closed.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum PlacementError {
    /// The ring waits for `cluster.bootstrap_expect` primaries.
    #[error(
        "the ring is not formed yet: this node waits for cluster.bootstrap_expect primaries to find each other"
    )]
    NotFormed,
    /// Every member of the ring is joining, left or forgotten.
    #[error("no member of the ring owns a range")]
    NoOwners,
    /// The plugin failed (a trap, a timeout, an error it returned).
    #[error("placement: {0}")]
    Plugin(String),
    /// The plugin answered something that cannot be acted on.
    #[error("placement plugin {plugin} {problem}; writes fail closed")]
    Answer {
        /// The plugin's name.
        plugin: String,
        /// What is wrong with its answer.
        problem: BadAnswer,
    },
    /// The blocking task that ran the plugin did not finish.
    #[error("placement task failed: {0}")]
    Task(String),
}

/// What is wrong with a placement plugin's answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BadAnswer {
    /// It named nobody.
    #[error("answered no owner")]
    NoOwner,
    /// It named more owners than were asked for.
    #[error("answered {answered} owners where at most {asked} were asked for")]
    TooMany {
        /// How many it named.
        answered: usize,
        /// How many were asked for.
        asked: usize,
    },
    /// It named someone who owns no range of the ring (bounded).
    #[error("answered {0:?}, which is not a member of the ring that owns a range")]
    NotAnOwner(String),
    /// It named a member twice (bounded).
    #[error("answered {0:?} twice")]
    Twice(String),
}

/// A question the cache holds the answer of, for one ring version.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Question {
    /// Up to `replicas` owners of the point in the ring.
    Owners { replicas: u32, point: String },
    /// The owner of the point in the ring the pending change leads to.
    Pending { point: String },
    /// The owner of the point in the ring as it was before `forgotten` was forgotten.
    Before { forgotten: String, point: String },
    /// The owner of each of `samples` ids spread over the id space ([`Placement::shares`]).
    Samples { samples: u32 },
}

/// Which member owns which point: the placement plugin's answers, cached per ring version and
/// plugin generation.
pub struct Placement {
    plugins: Arc<Plugins>,
    membership: watch::Receiver<Arc<Membership>>,
    answers: GenerationCache<Question, Arc<[String]>>,
}

impl Placement {
    /// Placement with `plugins`, over the membership `membership` publishes.
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
    pub async fn owners(&self, point: &str, replicas: u32) -> Result<Owners, PlacementError> {
        let membership = self.membership();
        let question = Question::Owners {
            replicas,
            point: point.to_owned(),
        };
        if !membership.ring.is_formed() {
            return Err(PlacementError::NotFormed);
        }
        // The membership is shared, not copied: a cached answer costs no copy of the ring.
        let (seen, point) = (membership.clone(), point.to_owned());
        let owners = self
            .ask(question, membership.ring_version, move |plugins| {
                owners_in(plugins, &seen.ring, &point, replicas)
            })
            .await?;
        Ok(Owners {
            membership,
            names: owners,
        })
    }

    /// While the ring has a pending change (a drain or a join, `docs/resharding.md`): the
    /// change and the owner of `point` once it is made. `None` when nothing is pending.
    pub async fn pending_owner(&self, point: &str) -> Result<Option<NextOwner>, PlacementError> {
        let membership = self.membership();
        let Some(Pending { change, target }) = change::pending(&membership.ring) else {
            return Ok(None);
        };
        let question = Question::Pending {
            point: point.to_owned(),
        };
        let point = point.to_owned();
        let owner = self
            .ask(question, membership.ring_version, move |plugins| {
                owners_in(plugins, &target, &point, 1)
            })
            .await?;
        Ok(Some(NextOwner {
            change,
            owner: owner[0].clone(),
        }))
    }

    /// The forgotten member `point` belonged to, while its points are still being taken over
    /// from its followers' copies (some live follower of it has not announced it is done,
    /// `docs/resharding.md`, forget). `None` otherwise.
    pub async fn being_taken_over(&self, point: &str) -> Result<Option<String>, PlacementError> {
        let membership = self.membership();
        for forgotten in change::forgotten(&membership.ring) {
            if !change::takeover_pending(&membership, &forgotten) {
                continue;
            }
            let question = Question::Before {
                forgotten: forgotten.name.clone(),
                point: point.to_owned(),
            };
            let (seen, point, member) = (membership.clone(), point.to_owned(), forgotten.clone());
            let owner = self
                .ask(question, membership.ring_version, move |plugins| {
                    owners_in(plugins, &member.before(&seen.ring), &point, 1)
                })
                .await?;
            if owner[0] == forgotten.name {
                return Ok(Some(forgotten.name));
            }
        }
        Ok(None)
    }

    /// Each owner's share of the ring: the fraction of `samples` ids spread over the id space
    /// that the placement plugin gives it. Placement is a plugin, so the ring's ranges are not
    /// known here; its answers are, cached like the others (per ring version and plugin
    /// generation), so a page that asks every few seconds asks the plugin once per ring.
    pub async fn shares(&self, samples: u32) -> Result<BTreeMap<String, f64>, PlacementError> {
        let membership = self.membership();
        if !membership.ring.is_formed() {
            return Err(PlacementError::NotFormed);
        }
        let seen = membership.clone();
        let owners = self
            .ask(
                Question::Samples { samples },
                membership.ring_version,
                move |plugins| {
                    (0..samples)
                        .map(|sample| owner_in(plugins, &seen.ring, &format!("share/{sample:08x}")))
                        .collect()
                },
            )
            .await?;
        let mut counts: BTreeMap<String, u32> = BTreeMap::new();
        for owner in owners.iter() {
            *counts.entry(owner.clone()).or_default() += 1;
        }
        let total = f64::from(samples.max(1));
        Ok(counts
            .into_iter()
            .map(|(owner, count)| (owner, f64::from(count) / total))
            .collect())
    }

    /// The cached answer to `question` for ring `version`; else asks the placement plugin on
    /// the blocking pool (`call`, only then; sharing the trip with the calls asked at once,
    /// `crate::askers`) and keeps its answer.
    async fn ask(
        &self,
        question: Question,
        version: u64,
        call: impl FnOnce(&PluginSet) -> Result<Vec<String>, PlacementError> + Send + 'static,
    ) -> Result<Arc<[String]>, PlacementError> {
        if let Some(owners) = self.answers.get(&question, version) {
            return Ok(owners);
        }
        let (answer, generation) = self
            .plugins
            .ask(move |plugins| (call(plugins), plugins.generation()))
            .await
            .ok_or_else(|| PlacementError::Task("the placement call did not end".into()))?;
        let owners: Arc<[String]> = answer?.into();
        self.answers
            .insert(question, owners.clone(), generation, version);
        Ok(owners)
    }
}

/// The owner of `point` in `ring` (any ring, not only the current one: resharding asks about
/// the ring a pending change leads to), by the placement plugin of `plugins`, checked as routing
/// checks it. Calls into WebAssembly: not for an async task's thread.
pub fn owner_in(plugins: &PluginSet, ring: &Ring, point: &str) -> Result<String, PlacementError> {
    owners_in(plugins, ring, point, 1).map(|mut owners| owners.swap_remove(0))
}

/// Up to `replicas` owners of `point` in `ring`, checked. Calls into WebAssembly.
fn owners_in(
    plugins: &PluginSet,
    ring: &Ring,
    point: &str,
    replicas: u32,
) -> Result<Vec<String>, PlacementError> {
    let members = members(ring);
    if members.is_empty() {
        return Err(PlacementError::NoOwners);
    }
    let answer = plugins
        .owners(point, &members, replicas)
        .map_err(|e| PlacementError::Plugin(e.to_string()))?;
    check(ring, answer, replicas).map_err(|problem| PlacementError::Answer {
        plugin: plugins.placement.name().to_string(),
        problem,
    })
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
fn check(ring: &Ring, answer: Vec<String>, replicas: u32) -> Result<Vec<String>, BadAnswer> {
    if answer.is_empty() {
        return Err(BadAnswer::NoOwner);
    }
    if answer.len() > replicas.max(1) as usize {
        return Err(BadAnswer::TooMany {
            answered: answer.len(),
            asked: replicas.max(1) as usize,
        });
    }
    let mut seen = HashSet::new();
    for name in &answer {
        let owns = ring
            .members
            .get(name)
            .is_some_and(|member| member.owns_range());
        if !owns {
            return Err(BadAnswer::NotAnOwner(bounded(name)));
        }
        if !seen.insert(name) {
            return Err(BadAnswer::Twice(bounded(name)));
        }
    }
    Ok(answer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::change::forgotten;
    use crate::cluster::handed::Tag;
    use crate::cluster::{Lifecycle, Member, Role, View};
    use crate::config::PluginsSection;

    /// A live follower of `leader` that has announced `handed`.
    fn follower(name: &str, leader: &str, handed: Option<&str>) -> Member {
        let handed =
            handed.map(|text| crate::cluster::Handed::decode(text, Role::Follower).unwrap());
        Member {
            leader: Some(leader.into()),
            handed,
            ..Member::follower_for_tests(name)
        }
    }

    #[tokio::test]
    async fn a_forgotten_members_points_are_not_created_until_its_followers_hand_them_over() {
        use Lifecycle::*;
        let dir = tempfile::tempdir().unwrap();
        let plugins =
            std::sync::Arc::new(Plugins::load(&PluginsSection::default(), dir.path()).unwrap());
        let ring = Ring::of(&[("a", Active), ("b", Active), ("c", Forgotten)]);
        let with = |followers: &[Member]| {
            std::sync::Arc::new(Membership {
                local: "a".into(),
                view: View {
                    id: "view".into(),
                    members: followers
                        .iter()
                        .map(|m| (m.name.clone(), m.clone()))
                        .collect(),
                },
                ring: ring.clone(),
                ring_version: ring.version(),
                conflict: None,
            })
        };
        let (views, membership) = tokio::sync::watch::channel(with(&[follower("f1", "c", None)]));
        let placement = Placement::new(plugins.clone(), membership);

        let forgotten = forgotten(&ring);
        assert_eq!(forgotten.len(), 1);
        assert_eq!(
            (forgotten[0].name.as_str(), &forgotten[0].tag),
            (
                "c",
                &Tag {
                    name: "c".into(),
                    version: 1
                }
            )
        );
        let before = forgotten[0].before(&ring);
        let set = plugins.current();
        let (of_c, others): (Vec<String>, Vec<String>) = (0..200)
            .map(|i| format!("videos/{i}"))
            .partition(|p| owner_in(&set, &before, p).unwrap() == "c");
        assert!(
            of_c.len() > 20 && others.len() > 20,
            "{} / {}",
            of_c.len(),
            others.len()
        );
        let taken_over = async |points: &[String]| {
            let mut answers = Vec::new();
            for point in points {
                answers.push(placement.being_taken_over(point).await.unwrap());
            }
            answers
        };

        // A live follower of c has not announced c's points handed over: c's points wait,
        // the others do not.
        assert!(
            taken_over(&of_c)
                .await
                .iter()
                .all(|a| a.as_deref() == Some("c"))
        );
        assert!(taken_over(&others).await.iter().all(Option::is_none));
        // Another follower that is done does not end the wait while f1 is not.
        views
            .send(with(&[
                follower("f1", "c", Some("x@2")),
                follower("f2", "c", Some("x@2,c@1")),
            ]))
            .unwrap();
        assert!(
            taken_over(&of_c)
                .await
                .iter()
                .all(|a| a.as_deref() == Some("c"))
        );
        // Every live follower of c is done: creation goes ahead.
        views
            .send(with(&[
                follower("f1", "c", Some("c@1")),
                follower("f2", "c", Some("x@2,c@1")),
            ]))
            .unwrap();
        assert!(taken_over(&of_c).await.iter().all(Option::is_none));
        // And with no live follower of c at all.
        views.send(with(&[])).unwrap();
        assert!(taken_over(&of_c).await.iter().all(Option::is_none));
    }
}
