//! The cluster the upgrade test starts from (`tests/tests/upgrade.rs`): its members, its points,
//! and the data directories the version before the controller wrote for it, kept in
//! `tests/fixtures/before-controller.tar.gz`. `scripts/upgrade-fixture` makes that archive again
//! with the binary of that version and `src/bin/upgrade-fixture.rs`; both sides read what the
//! cluster holds from here, so they cannot disagree.
//!
//! Its story: primaries `a`, `b` and `c` formed the ring (`c` acknowledging a write once its
//! follower `f` confirmed it); every point was written at its owner; `d` joined and was handed
//! its points (epoch 2); every fourth point was appended to at its owner; `f` stopped and one
//! more write reached `c` alone (never acknowledged); `c` died, was forgotten, and its points
//! were taken over from `f`'s copies (epoch 2); `c` came back, stepped down, and put the copy
//! only it held in quarantine.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::{data, write_node_config};

/// The version whose binary wrote the archive: the landed head before the controller.
pub const WRITTEN_BY: &str = "3c77ef2";

/// The primaries that formed the ring.
pub const FOUNDERS: [&str; 3] = ["a", "b", "c"];

/// The primary that joined it afterwards (and was handed its points: epoch 2).
pub const JOINED: &str = "d";

/// The primary that died and was forgotten (it returned, stepped down).
pub const FORGOTTEN: &str = "c";

/// `c`'s follower, whose copies the new owners took `c`'s points over from.
pub const FOLLOWER: &str = "f";

/// Every node, in the order they start.
pub const NODES: [&str; 5] = ["a", "b", "c", "f", "d"];

/// How many points the cluster holds.
pub const POINTS: u64 = 48;

/// The archive of the data directories (`<name>/data`).
pub fn archive() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/before-controller.tar.gz")
}

/// Point `i`'s name.
pub fn point(i: u64) -> String {
    format!("before/{i}")
}

/// What point `i` was created with, before `d` joined.
pub fn first(i: u64) -> Vec<u8> {
    data(i, 200 + ((i * 7919) % 6000) as usize)
}

/// What was appended to point `i` after `d` joined, at its owner then (every fourth point).
pub fn appended(i: u64) -> Option<Vec<u8>> {
    i.is_multiple_of(4)
        .then(|| data(1000 + i, 100 + ((i * 104_729) % 3000) as usize))
}

/// What reached `c` alone for the first of its points after `f` stopped: never acknowledged,
/// kept only in `c`'s quarantine.
pub fn unacknowledged() -> Vec<u8> {
    data(999, 3333)
}

/// Every point with every byte it holds (acknowledged).
pub fn expected() -> BTreeMap<String, Vec<u8>> {
    (0..POINTS)
        .map(|i| {
            let mut bytes = first(i);
            bytes.extend(appended(i).unwrap_or_default());
            (point(i), bytes)
        })
        .collect()
}

/// Writes the configuration of node `name` with its data in `dir/data`, seeded by `seeds`
/// (gossip addresses), in keys both versions read. `c` acknowledges a write once `f` confirmed
/// it (else `Unavailable` after 300 ms, the bytes kept) and syncs every append; `f` follows the
/// leader whose replication address is `leader`.
pub fn config(dir: &Path, name: &str, seeds: &[String], leader: &str) -> PathBuf {
    let seeds: Vec<String> = seeds.iter().map(|seed| format!("{seed:?}")).collect();
    let seeds = format!("seed_addresses = [{}]\n", seeds.join(", "));
    let role = match name {
        FOLLOWER => format!("role = \"follower\"\nleader_addresses = [{leader:?}]\n"),
        _ => "role = \"leader\"\n".to_owned(),
    };
    let replication = if name == FORGOTTEN {
        "[replication]\nack = { replicas = 1 }\nack_timeout_ms = 300\n[storage]\nfsync = \"always\"\n"
    } else {
        ""
    };
    write_node_config(
        dir,
        name,
        &format!("{role}{seeds}[cluster]\nbootstrap_expect = 3\n{replication}"),
    )
}
