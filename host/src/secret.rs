//! A secret configuration value (the cluster key, URL signing keys): deserialized like a string,
//! never printed — its `Debug` says `<redacted>`, and nothing logs its value.

use serde::{Deserialize, Serialize};

/// A value that is never printed (its `Debug` is `<redacted>`).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// The bytes of a secret file, without surrounding whitespace.
pub fn read_file(path: &std::path::Path) -> std::io::Result<Vec<u8>> {
    Ok(std::fs::read(path)?.trim_ascii().to_vec())
}
