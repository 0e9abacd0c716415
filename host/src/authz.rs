//! Authorization: the actions a subject can take on a point.
//!
//! Every API call names one [`Action`]; the node asks its authorizer plugin whether the subject of
//! the connection may take it on the point, and caches the decision for a short time.

use std::fmt;

/// What a call wants to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// Append to a point.
    Produce,
    /// Read a point.
    Consume,
    /// Size, checksum, workers, listings.
    Metadata,
    /// Node-to-node replication.
    Replicate,
    /// Destructive and operator calls (delete).
    Admin,
}

impl Action {
    pub const ALL: [Action; 5] = [
        Action::Produce,
        Action::Consume,
        Action::Metadata,
        Action::Replicate,
        Action::Admin,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Action::Produce => "produce",
            Action::Consume => "consume",
            Action::Metadata => "metadata",
            Action::Replicate => "replicate",
            Action::Admin => "admin",
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
