//! `builtin:rendezvous-placement`: weighted highest-random-weight (rendezvous) hashing. Each
//! member scores `-virtual_nodes / ln(u)` for the key, where `u` in (0, 1] comes from the MD5 of
//! `name`, a NUL byte and the key; the highest scores own the key. Adding or removing a member
//! only moves the keys it wins or held. Only `standalone` and `leader` members own keys. Takes no
//! configuration.

wit_bindgen::generate!({ world: "placement", path: "../../schema/wit" });

use md5::{Digest, Md5};

fn score(member: &Member, key: &str) -> f64 {
    let mut hasher = Md5::new();
    hasher.update(member.name.as_bytes());
    hasher.update([0u8]);
    hasher.update(key.as_bytes());
    let digest = hasher.finalize();
    let h = u64::from_le_bytes(digest[..8].try_into().unwrap());
    // u in (0, 1]: never 0, so ln(u) is finite and negative (or 0 for u = 1).
    let u = (h as f64 + 1.0) / 18_446_744_073_709_551_616.0;
    let weight = f64::from(member.virtual_nodes.max(1));
    if u >= 1.0 {
        f64::INFINITY
    } else {
        -weight / u.ln()
    }
}

struct Rendezvous;

impl Guest for Rendezvous {
    fn configure(config: String) -> Result<(), String> {
        if config.trim().is_empty() {
            Ok(())
        } else {
            Err("rendezvous-placement takes no configuration".into())
        }
    }

    fn owners(key: String, members: Vec<Member>, replicas: u32) -> Vec<String> {
        let mut scored: Vec<(f64, &str)> = members
            .iter()
            .filter(|m| m.role == "standalone" || m.role == "leader")
            .map(|m| (score(m, &key), m.name.as_str()))
            .collect();
        scored.sort_by(|a, b| b.0.total_cmp(&a.0).then_with(|| a.1.cmp(b.1)));
        scored
            .into_iter()
            .take(replicas.max(1) as usize)
            .map(|(_, name)| name.to_owned())
            .collect()
    }
}

export!(Rendezvous);
