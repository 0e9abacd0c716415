//! `builtin:ring-placement` (the default placement): consistent hashing with virtual nodes, as the
//! original goutube ring: member `m` places `virtual-nodes` points at `hash("m-<i>")`, a key
//! belongs to the first virtual node at or after `hash(key)` (wrapping), and further replicas are
//! the next distinct members clockwise. `hash` is the first 8 bytes of MD5, little-endian. Only
//! members with role `standalone` or `leader` own keys. Takes no configuration.

wit_bindgen::generate!({ world: "placement", path: "../../schema/wit" });

use std::cell::RefCell;

use md5::{Digest, Md5};

/// The ring of the last member list seen: rebuilt only when the members change.
#[derive(Default)]
struct Ring {
    members: Vec<(String, String, u32)>,
    /// (hash, member index), sorted by hash.
    vnodes: Vec<(u64, usize)>,
}

thread_local! {
    static RING: RefCell<Ring> = RefCell::new(Ring::default());
}

fn hash(key: &[u8]) -> u64 {
    let digest = Md5::digest(key);
    u64::from_le_bytes(digest[..8].try_into().unwrap())
}

fn owns_keys(member: &Member) -> bool {
    member.role == "standalone" || member.role == "leader"
}

fn build(members: &[Member]) -> Ring {
    let members: Vec<(String, String, u32)> = members
        .iter()
        .filter(|m| owns_keys(m))
        .map(|m| (m.name.clone(), m.role.clone(), m.virtual_nodes))
        .collect();
    let mut vnodes = Vec::new();
    for (index, (name, _, count)) in members.iter().enumerate() {
        for i in 0..*count {
            vnodes.push((hash(format!("{name}-{i}").as_bytes()), index));
        }
    }
    vnodes.sort_unstable();
    Ring { members, vnodes }
}

struct RingPlacement;

impl Guest for RingPlacement {
    fn configure(config: String) -> Result<(), String> {
        if config.trim().is_empty() {
            Ok(())
        } else {
            Err("ring-placement takes no configuration".into())
        }
    }

    fn owners(key: String, members: Vec<Member>, replicas: u32) -> Vec<String> {
        RING.with_borrow_mut(|ring| {
            let same = ring.members.len() == members.iter().filter(|m| owns_keys(m)).count()
                && members
                    .iter()
                    .filter(|m| owns_keys(m))
                    .zip(&ring.members)
                    .all(|(m, (name, role, count))| {
                        m.name == *name && m.role == *role && m.virtual_nodes == *count
                    });
            if !same {
                *ring = build(&members);
            }
            if ring.vnodes.is_empty() {
                return Vec::new();
            }
            let h = hash(key.as_bytes());
            let first = ring.vnodes.partition_point(|(vh, _)| *vh < h);
            let wanted = (replicas.max(1) as usize).min(ring.members.len());
            let mut owners: Vec<String> = Vec::with_capacity(wanted);
            for step in 0..ring.vnodes.len() {
                let (_, index) = ring.vnodes[(first + step) % ring.vnodes.len()];
                let name = &ring.members[index].0;
                if !owners.contains(name) {
                    owners.push(name.clone());
                    if owners.len() == wanted {
                        break;
                    }
                }
            }
            owners
        })
    }
}

export!(RingPlacement);
