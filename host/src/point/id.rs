//! Point ids and their on-disk names.
//!
//! An id is 1–255 bytes of printable UTF-8: no control characters (NUL, escape, newline, C1…),
//! which would reach terminals and logs as they are. It never becomes a file name verbatim: each byte
//! outside `[a-z0-9_-]` is written as `%XX` (upper-case hex), so a name cannot contain `/`, `.`
//! or `..`, cannot escape the data directory, and two ids never map to names that are equal, not
//! even on a case-insensitive file system (lower-case letters only appear literally, upper-case
//! only inside escapes). Escaped ids can be three times longer than the id, longer than the
//! 255-byte limit of a file name, so the escaped form is cut into directory components of at most
//! [`COMPONENT_MAX`] bytes, never inside an escape. Concatenating the components and unescaping
//! gives the id back, which is how points are listed.

use std::fmt;
use std::path::{Path, PathBuf};

/// Longest id, in bytes.
pub const MAX_LEN: usize = 255;
/// Longest directory component of an encoded id, in bytes.
pub const COMPONENT_MAX: usize = 200;

/// A validated point id.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PointId(String);

/// Why a string is not a point id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidPointId {
    /// No characters.
    #[error("point id is empty")]
    Empty,
    /// Longer than the limit (its length in bytes).
    #[error("point id is {0} bytes long; the limit is {MAX_LEN}")]
    TooLong(usize),
    /// A control character.
    #[error(
        "point id contains the control character {character:?} at byte {at}; ids are printable text"
    )]
    Control {
        /// The byte offset of the character.
        at: usize,
        /// The character.
        character: char,
    },
}

impl PointId {
    /// `id` checked: not empty, not too long, no control character.
    pub fn new(id: impl Into<String>) -> Result<Self, InvalidPointId> {
        let id = id.into();
        if id.is_empty() {
            return Err(InvalidPointId::Empty);
        }
        if id.len() > MAX_LEN {
            return Err(InvalidPointId::TooLong(id.len()));
        }
        if let Some((at, character)) = id.char_indices().find(|(_, c)| c.is_control()) {
            return Err(InvalidPointId::Control { at, character });
        }
        Ok(Self(id))
    }

    /// The id as given.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The path of this point's directory, relative to the points directory.
    pub fn relative_dir(&self) -> PathBuf {
        let mut path = PathBuf::new();
        let mut component = String::with_capacity(COMPONENT_MAX);
        for &byte in self.0.as_bytes() {
            let token_len = if is_literal(byte) { 1 } else { 3 };
            if component.len() + token_len > COMPONENT_MAX {
                path.push(&component);
                component.clear();
            }
            if is_literal(byte) {
                component.push(byte as char);
            } else {
                component.push('%');
                component.push(HEX[usize::from(byte >> 4)] as char);
                component.push(HEX[usize::from(byte & 0xf)] as char);
            }
        }
        path.push(component);
        path
    }

    /// The id whose [`relative_dir`](Self::relative_dir) is `relative`, if `relative` is the
    /// canonical encoding of an id.
    pub fn from_relative_dir(relative: &Path) -> Option<Self> {
        let mut escaped = String::new();
        for component in relative.components() {
            escaped.push_str(component.as_os_str().to_str()?);
        }
        let mut bytes = Vec::with_capacity(escaped.len());
        let mut input = escaped.bytes();
        while let Some(byte) = input.next() {
            if byte == b'%' {
                let high = hex_value(input.next()?)?;
                let low = hex_value(input.next()?)?;
                bytes.push(high << 4 | low);
            } else {
                bytes.push(byte);
            }
        }
        let id = PointId::new(String::from_utf8(bytes).ok()?).ok()?;
        // Only the canonical spelling maps back: this rejects stray directories and keeps the
        // mapping one-to-one.
        (id.relative_dir() == relative).then_some(id)
    }
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

fn is_literal(byte: u8) -> bool {
    byte.is_ascii_lowercase() || byte.is_ascii_digit() || byte == b'_' || byte == b'-'
}

fn hex_value(digit: u8) -> Option<u8> {
    match digit {
        b'0'..=b'9' => Some(digit - b'0'),
        b'A'..=b'F' => Some(digit - b'A' + 10),
        _ => None,
    }
}

impl fmt::Display for PointId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for PointId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

// Ids order, compare and hash exactly like their strings, so maps keyed by ids can be searched
// with `&str`.
impl std::borrow::Borrow<str> for PointId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for PointId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl TryFrom<&str> for PointId {
    type Error = InvalidPointId;
    fn try_from(id: &str) -> Result<Self, Self::Error> {
        Self::new(id)
    }
}

impl TryFrom<String> for PointId {
    type Error = InvalidPointId;
    fn try_from(id: String) -> Result<Self, Self::Error> {
        Self::new(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Component;

    #[test]
    fn rejects_hostile_ids() {
        assert_eq!(PointId::new(""), Err(InvalidPointId::Empty));
        assert_eq!(
            PointId::new("a\0b"),
            Err(InvalidPointId::Control {
                at: 1,
                character: '\0'
            })
        );
        for hostile in ["\x1b[2Jx", "line\nbreak", "tab\t", "del\x7f", "c1\u{9b}"] {
            assert!(
                matches!(PointId::new(hostile), Err(InvalidPointId::Control { .. })),
                "{hostile:?}"
            );
        }
        assert!(PointId::new("vidéos/été 2026 ✓").is_ok());
        assert_eq!(
            PointId::new("x".repeat(300)),
            Err(InvalidPointId::TooLong(300))
        );
        assert!(PointId::new("x".repeat(255)).is_ok());
    }

    #[test]
    fn names_stay_inside_the_points_directory() {
        for raw in [
            "../x",
            "a/b",
            ".",
            "..",
            "/etc/passwd",
            "C:\\x",
            "%2E%2E",
            "~",
        ] {
            let dir = PointId::new(raw).unwrap().relative_dir();
            for component in dir.components() {
                let Component::Normal(name) = component else {
                    panic!("{raw:?} encodes to {dir:?}, which is not a plain relative path");
                };
                let name = name.to_str().unwrap();
                assert!(!name.contains('.') && !name.contains('/') && !name.contains('\\'));
                assert!(name.len() <= COMPONENT_MAX);
            }
        }
    }

    #[test]
    fn encoding_round_trips_and_is_case_safe() {
        let ids = [
            "video.mp4",
            "Video.mp4",
            "videos/2026/cat.webm",
            "..",
            "%41",
            "A",
            "a",
            "ünïcödé ✓",
            "x",
        ];
        let mut seen = std::collections::HashSet::new();
        for raw in ids {
            let id = PointId::new(raw).unwrap();
            let dir = id.relative_dir();
            assert_eq!(
                PointId::from_relative_dir(&dir),
                Some(id.clone()),
                "{raw:?}"
            );
            let folded = dir.to_str().unwrap().to_lowercase();
            assert!(seen.insert(folded), "{raw:?} collides case-insensitively");
        }
    }

    #[test]
    fn long_ids_are_split_without_breaking_escapes() {
        // 255 bytes that all need escaping: 765 escaped bytes over four components.
        let raw: String = std::iter::repeat_n('.', 255).collect();
        let id = PointId::new(raw).unwrap();
        let dir = id.relative_dir();
        assert_eq!(dir.components().count(), 4);
        for component in dir.components() {
            let name = component.as_os_str().to_str().unwrap();
            assert!(name.starts_with('%') && name.len() % 3 == 0);
        }
        assert_eq!(PointId::from_relative_dir(&dir), Some(id));
    }

    #[test]
    fn non_canonical_names_are_not_ids() {
        for name in ["%2e", "%4", "A", "a.b", "%00", "%FF"] {
            assert_eq!(PointId::from_relative_dir(Path::new(name)), None, "{name}");
        }
    }
}
