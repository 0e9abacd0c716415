//! Typed errors of the point store, one enum per operation family.

use std::io;
use std::path::PathBuf;

use super::id::PointId;
use super::journal::RecoveryError;

/// A failure of the files underneath a point or the store.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot recover {path}: {source}")]
    Recovery {
        path: PathBuf,
        #[source]
        source: RecoveryError,
    },
}

impl StorageError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> Self {
        let path = path.into();
        move |source| Self::Io { op, path, source }
    }
}

/// Why an append was not applied.
#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    /// An earlier write failed; the point refuses writes until it is reopened (node restart).
    #[error(
        "point {point} refuses writes after an I/O error ({reason}); restart the node to recover it"
    )]
    Refused { point: PointId, reason: String },
    /// The append was for a given start offset (replication) and the point ends elsewhere.
    #[error("point {point} ends at {end}, not at the expected start {expected}")]
    OffsetMismatch {
        point: PointId,
        expected: u64,
        end: u64,
    },
    /// A client's write to a point whose handover does not take writes here (fenced, moved,
    /// or still arriving).
    #[error("point {point} {handover}")]
    Handover {
        point: PointId,
        handover: crate::point::Handover,
    },
    /// The point already has another content type, or bytes without one: a content type is
    /// given once, with the point's first bytes (and replicated with them).
    #[error(
        "point {point} cannot take content type {wanted:?}: {}",
        if current.is_empty() { "it has bytes already, and a type comes with the first ones".to_string() } else { format!("it has {current:?}") }
    )]
    ContentType {
        point: PointId,
        current: String,
        wanted: String,
    },
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// Why a read or a metadata lookup failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("point {0} not found")]
    NotFound(PointId),
    #[error("point {point} has {end} bytes; cannot read [{offset}, {limit})")]
    OutOfRange {
        point: PointId,
        offset: u64,
        limit: u64,
        end: u64,
    },
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// Why a point could not be deleted.
#[derive(Debug, thiserror::Error)]
pub enum DeleteError {
    #[error("point {0} not found")]
    NotFound(PointId),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// Why a point could not be cut back.
#[derive(Debug, thiserror::Error)]
pub enum TruncateError {
    #[error("point {0} not found")]
    NotFound(PointId),
    /// An earlier write failed; the point refuses writes until it is reopened (node restart).
    #[error(
        "point {point} refuses writes after an I/O error ({reason}); restart the node to recover it"
    )]
    Refused { point: PointId, reason: String },
    #[error(transparent)]
    Storage(#[from] StorageError),
}
