//! What a member announces it has handed over (the gossip key `handed`), as one typed value
//! encoded and decoded here only (`docs/resharding.md`).
//!
//! Two announcements share the key, one per role: a primary says it has handed a joining
//! member every point that member will own ([`Handed::Join`]); a follower says every copy it
//! held of a forgotten member's points is with their new owners ([`Handed::Takeovers`]). Each
//! is written with its kind first (`join:<member>@<ring version, hex>`,
//! `takeover:<member>@<record version>,…`), so neither is read as the other. A value without a
//! kind is what the release before this one wrote; it is read by the announcing member's role.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::cluster::Role;

/// A member forgotten at one version of its ring record: what a follower's takeover is of.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Tag {
    /// The forgotten member.
    pub name: String,
    /// The version of its `forgotten` record.
    pub version: u64,
}

/// What a member has handed over (in gossip, the text below; in the controller's log, JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Handed {
    /// A primary has handed `joining` every point it will own in the ring of `version`.
    Join {
        /// The joining member.
        joining: String,
        /// The version of the ring the join leads to.
        version: u64,
    },
    /// A follower has handed over every copy it held of these forgotten members' points.
    Takeovers(Vec<Tag>),
}

impl Handed {
    /// Whether this is a follower's announcement that includes `tag`.
    pub fn took_over(&self, tag: &Tag) -> bool {
        matches!(self, Handed::Takeovers(tags) if tags.contains(tag))
    }

    /// The forgotten members a follower has announced (none for a join).
    pub fn takeovers(&self) -> &[Tag] {
        match self {
            Handed::Takeovers(tags) => tags,
            Handed::Join { .. } => &[],
        }
    }

    /// The gossip value.
    pub fn encode(&self) -> String {
        self.to_string()
    }

    /// The gossip value `text` of a member of `role`; `None` if it does not decode.
    pub fn decode(text: &str, role: Role) -> Option<Handed> {
        if let Some(join) = text.strip_prefix("join:") {
            return join_of(join);
        }
        if let Some(tags) = text.strip_prefix("takeover:") {
            return takeovers_of(tags);
        }
        // Written by the release before kinds were written: one kind per role.
        match role.is_primary() {
            true => join_of(text),
            false => takeovers_of(text),
        }
    }
}

impl fmt::Display for Handed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Handed::Join { joining, version } => write!(f, "join:{joining}@{version:x}"),
            Handed::Takeovers(tags) => {
                f.write_str("takeover:")?;
                for (i, tag) in tags.iter().enumerate() {
                    if i > 0 {
                        f.write_str(",")?;
                    }
                    write!(f, "{}@{}", tag.name, tag.version)?;
                }
                Ok(())
            }
        }
    }
}

/// `<member>@<hex version>`.
fn join_of(text: &str) -> Option<Handed> {
    let (joining, version) = text.rsplit_once('@')?;
    Some(Handed::Join {
        joining: joining.to_owned(),
        version: u64::from_str_radix(version, 16).ok()?,
    })
}

/// `<member>@<version>,…` (possibly empty).
fn takeovers_of(text: &str) -> Option<Handed> {
    let tags = text
        .split(',')
        .filter(|tag| !tag.is_empty())
        .map(|tag| {
            let (name, version) = tag.rsplit_once('@')?;
            Some(Tag {
                name: name.to_owned(),
                version: version.parse().ok()?,
            })
        })
        .collect::<Option<Vec<_>>>()?;
    Some(Handed::Takeovers(tags))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tag(name: &str, version: u64) -> Tag {
        Tag {
            name: name.into(),
            version,
        }
    }

    #[test]
    fn each_kind_decodes_as_itself_whoever_announces_it() {
        let join = Handed::Join {
            joining: "node@x".into(),
            version: 0x1f,
        };
        let takeovers = Handed::Takeovers(vec![tag("a", 3), tag("b@c", 12)]);
        for handed in [join, takeovers, Handed::Takeovers(vec![])] {
            for role in [Role::Leader, Role::Follower] {
                assert_eq!(Handed::decode(&handed.encode(), role), Some(handed.clone()));
            }
        }
        assert_eq!(
            Handed::Join {
                joining: "c".into(),
                version: 0x1f
            }
            .encode(),
            "join:c@1f"
        );
    }

    #[test]
    fn a_value_without_a_kind_is_read_by_the_role_of_its_member() {
        // "c@10" was both a join of c at version 0x10 and a takeover of c at record 10.
        assert_eq!(
            Handed::decode("c@10", Role::Leader),
            Some(Handed::Join {
                joining: "c".into(),
                version: 16
            })
        );
        assert_eq!(
            Handed::decode("c@10,d@2", Role::Follower),
            Some(Handed::Takeovers(vec![tag("c", 10), tag("d", 2)]))
        );
        assert_eq!(Handed::decode("join:c", Role::Leader), None);
        assert_eq!(Handed::decode("takeover:c@x", Role::Follower), None);
    }
}
