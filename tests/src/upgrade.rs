//! The cluster the upgrade test starts from (`tests/tests/upgrade.rs`): its members, its points,
//! and the data directories the version before the controller wrote for it, kept in
//! `tests/fixtures/before-controller.tar.gz`. `scripts/upgrade-fixture` makes that archive again
//! with the binary of that version and `src/bin/upgrade-fixture.rs`; both sides read what the
//! cluster holds from here, so they cannot disagree.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::{data, write_node_config};

/// The version whose binary wrote the archive: the landed head before the controller.
pub const WRITTEN_BY: &str = "3c77ef2";

/// The primaries that formed the ring.
pub const FOUNDERS: [&str; 3] = ["a", "b", "c"];

/// The primary that joined it afterwards (and was handed its points: epoch 2).
pub const JOINED: &str = "d";

/// How many points the cluster holds.
pub const POINTS: u64 = 48;

/// The archive of the four data directories (`<name>/data`).
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

/// Every point with every byte it holds.
pub fn expected() -> BTreeMap<String, Vec<u8>> {
    (0..POINTS)
        .map(|i| {
            let mut bytes = first(i);
            bytes.extend(appended(i).unwrap_or_default());
            (point(i), bytes)
        })
        .collect()
}

/// Writes the configuration of primary `name` with its data in `dir/data`, seeded by `seeds`
/// (gossip addresses): keys both versions read.
pub fn config(dir: &Path, name: &str, seeds: &[String]) -> PathBuf {
    let seeds: Vec<String> = seeds.iter().map(|seed| format!("{seed:?}")).collect();
    write_node_config(
        dir,
        name,
        &format!(
            "role = \"leader\"\nseed_addresses = [{}]\n[cluster]\nbootstrap_expect = 3\n",
            seeds.join(", ")
        ),
    )
}
