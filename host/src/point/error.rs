//! Typed errors of the point store, one enum per operation family.

use std::io;
use std::path::PathBuf;

use super::id::PointId;
use super::journal::RecoveryError;

/// A failure of the files underneath a point or the store.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// A file operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was done (`"writing"`, `"syncing"`…).
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: io::Error,
    },
    /// A point's journal or data file could not be recovered.
    #[error("cannot recover {path}: {source}")]
    Recovery {
        /// The point's directory or file.
        path: PathBuf,
        /// Why.
        #[source]
        source: RecoveryError,
    },
    /// The catalogue of points (`catalogue.rs`) could not be read or written.
    #[error("{op} the catalogue {path}: {source}")]
    Catalogue {
        /// What was done (`"reading"`, `"writing"`…).
        op: &'static str,
        /// Its file.
        path: PathBuf,
        /// What the B-tree said.
        #[source]
        source: Box<redb::Error>,
    },
}

impl StorageError {
    /// Whether the disk is full: new writes are refused until space returns.
    pub fn is_disk_full(&self) -> bool {
        match self {
            StorageError::Io { source, .. } => source.raw_os_error() == Some(libc::ENOSPC),
            StorageError::Catalogue { source, .. } => matches!(
                source.as_ref(),
                redb::Error::Io(error) if error.raw_os_error() == Some(libc::ENOSPC)
            ),
            StorageError::Recovery { .. } => false,
        }
    }

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
    Refused {
        /// The point.
        point: PointId,
        /// The error that made it refuse writes.
        reason: String,
    },
    /// The append was for a given start offset (replication) and the point ends elsewhere.
    #[error("point {point} ends at {end}, not at the expected start {expected}")]
    OffsetMismatch {
        /// The point.
        point: PointId,
        /// Where the append was to start.
        expected: u64,
        /// Where the point ends.
        end: u64,
    },
    /// A client's write to a point whose handover does not take writes here (fenced, moved,
    /// or still arriving).
    #[error("point {point} {handover}")]
    Handover {
        /// The point.
        point: PointId,
        /// Its handover.
        handover: crate::point::Handover,
    },
    /// The point already has another content type, or bytes without one: a content type is
    /// given once, with the point's first bytes (and replicated with them).
    #[error(
        "point {point} cannot take content type {wanted:?}: {}",
        if current.is_empty() { "it has bytes already, and a type comes with the first ones".to_string() } else { format!("it has {current:?}") }
    )]
    ContentType {
        /// The point.
        point: PointId,
        /// Its content type (empty: none, but it has bytes).
        current: String,
        /// The one given.
        wanted: String,
    },
    /// The files underneath failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// Why a read or a metadata lookup failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// No such point.
    #[error("point {0} not found")]
    NotFound(PointId),
    /// The range asked for is past the point's end.
    #[error("point {point} has {end} bytes; cannot read [{offset}, {limit})")]
    OutOfRange {
        /// The point.
        point: PointId,
        /// Where the read was to start.
        offset: u64,
        /// Where it was to stop.
        limit: u64,
        /// Where the point ends.
        end: u64,
    },
    /// The files underneath failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// Why a point could not be deleted.
#[derive(Debug, thiserror::Error)]
pub enum DeleteError {
    /// No such point.
    #[error("point {0} not found")]
    NotFound(PointId),
    /// The files underneath failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// Why a point could not be cut back.
#[derive(Debug, thiserror::Error)]
pub enum TruncateError {
    /// No such point.
    #[error("point {0} not found")]
    NotFound(PointId),
    /// An earlier write failed; the point refuses writes until it is reopened (node restart).
    #[error(
        "point {point} refuses writes after an I/O error ({reason}); restart the node to recover it"
    )]
    Refused {
        /// The point.
        point: PointId,
        /// The error that made it refuse writes.
        reason: String,
    },
    /// The files underneath failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
}
