//! The placement algorithms of the built-in placement components, over a plain member list.
//!
//! - [`Ring`]: consistent hashing with virtual nodes, as the original goutube ring: member `m`
//!   places `virtual_nodes` points at `hash("m-<i>")`; a key belongs to the first virtual node at
//!   or after `hash(key)` (wrapping); further replicas are the next distinct members clockwise.
//! - [`rendezvous`]: weighted highest-random-weight hashing: each member scores
//!   `-virtual_nodes / ln(u)` with `u` in (0, 1] from the hash of `name \0 key`.
//!
//! `hash` is the first 8 bytes of MD5, little-endian. Only members whose role is `standalone` or
//! `leader` own keys.

use md5::{Digest, Md5};

/// The part of a member placement looks at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub name: String,
    pub role: String,
    pub virtual_nodes: u32,
}

pub fn owns_keys(member: &Member) -> bool {
    member.role == "standalone" || member.role == "leader"
}

fn hash(parts: &[&[u8]]) -> u64 {
    let mut hasher = Md5::new();
    for part in parts {
        hasher.update(part);
    }
    u64::from_le_bytes(hasher.finalize()[..8].try_into().unwrap())
}

/// A consistent-hash ring built from a member list.
#[derive(Debug, Default)]
pub struct Ring {
    members: Vec<Member>,
    /// (hash, index into `members`), sorted by hash.
    vnodes: Vec<(u64, usize)>,
}

impl Ring {
    pub fn new(members: &[Member]) -> Self {
        let members: Vec<Member> = members.iter().filter(|m| owns_keys(m)).cloned().collect();
        let mut vnodes = Vec::new();
        for (index, member) in members.iter().enumerate() {
            for i in 0..member.virtual_nodes {
                vnodes.push((hash(&[format!("{}-{i}", member.name).as_bytes()]), index));
            }
        }
        vnodes.sort_unstable();
        Self { members, vnodes }
    }

    /// Whether this ring was built from `members`.
    pub fn built_from(&self, members: &[Member]) -> bool {
        self.members
            .iter()
            .eq(members.iter().filter(|m| owns_keys(m)))
    }

    pub fn owners(&self, key: &str, replicas: u32) -> Vec<String> {
        if self.vnodes.is_empty() {
            return Vec::new();
        }
        let h = hash(&[key.as_bytes()]);
        let first = self.vnodes.partition_point(|(vh, _)| *vh < h);
        let wanted = (replicas.max(1) as usize).min(self.members.len());
        let mut owners: Vec<String> = Vec::with_capacity(wanted);
        for step in 0..self.vnodes.len() {
            let (_, index) = self.vnodes[(first + step) % self.vnodes.len()];
            let name = &self.members[index].name;
            if !owners.contains(name) {
                owners.push(name.clone());
                if owners.len() == wanted {
                    break;
                }
            }
        }
        owners
    }
}

/// The `replicas` highest-scoring members for `key`.
pub fn rendezvous(key: &str, members: &[Member], replicas: u32) -> Vec<String> {
    let mut scored: Vec<(f64, &str)> = members
        .iter()
        .filter(|m| owns_keys(m))
        .map(|m| {
            let h = hash(&[m.name.as_bytes(), &[0], key.as_bytes()]);
            // u in (0, 1]: never 0, so ln(u) is finite and negative (or 0 for u = 1).
            let u = (h as f64 + 1.0) / 18_446_744_073_709_551_616.0;
            let weight = f64::from(m.virtual_nodes.max(1));
            let score = if u >= 1.0 {
                f64::INFINITY
            } else {
                -weight / u.ln()
            };
            (score, m.name.as_str())
        })
        .collect();
    scored.sort_by(|a, b| b.0.total_cmp(&a.0).then_with(|| a.1.cmp(b.1)));
    scored
        .into_iter()
        .take(replicas.max(1) as usize)
        .map(|(_, name)| name.to_owned())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(names: &[&str]) -> Vec<Member> {
        names
            .iter()
            .map(|n| Member {
                name: (*n).into(),
                role: "leader".into(),
                virtual_nodes: 16,
            })
            .collect()
    }

    #[test]
    fn ring_and_rendezvous_return_distinct_owners() {
        let three = members(&["a", "b", "c"]);
        let ring = Ring::new(&three);
        assert!(ring.built_from(&three));
        for key in ["x", "y", "z"] {
            for owners in [ring.owners(key, 3), rendezvous(key, &three, 3)] {
                let mut sorted = owners.clone();
                sorted.sort();
                assert_eq!(sorted, vec!["a", "b", "c"]);
            }
        }
        assert!(Ring::new(&[]).owners("x", 1).is_empty());
    }
}
