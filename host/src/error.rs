//! The error a client call can end with, and its one mapping to a gRPC status.
//!
//! Module errors (storage, plugins, replication) convert into [`Error`]; handlers return
//! `Result<_, Error>` and the conversion below is the only place a status code is chosen.

use tonic::{Code, Status};

use crate::point::{AppendError, DeleteError, InvalidPointId, ReadError, StorageError};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid point id: {0}")]
    InvalidPointId(#[from] InvalidPointId),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    OutOfRange(String),
    #[error("{subject} may not {action} {point:?}: {reason}")]
    PermissionDenied {
        subject: String,
        action: &'static str,
        point: String,
        reason: String,
    },
    /// The call must go to another node (a follower asked to write, for example).
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    Unavailable(String),
    #[error(transparent)]
    Append(#[from] AppendError),
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error(transparent)]
    Delete(#[from] DeleteError),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

impl Error {
    pub fn code(&self) -> Code {
        match self {
            Error::InvalidPointId(_) | Error::InvalidArgument(_) => Code::InvalidArgument,
            Error::OutOfRange(_) => Code::OutOfRange,
            Error::PermissionDenied { .. } => Code::PermissionDenied,
            Error::FailedPrecondition(_) => Code::FailedPrecondition,
            Error::Unavailable(_) => Code::Unavailable,
            Error::Append(AppendError::Refused { .. }) => Code::FailedPrecondition,
            Error::Append(AppendError::OffsetMismatch { .. }) => Code::Aborted,
            Error::Read(ReadError::NotFound(_)) | Error::Delete(DeleteError::NotFound(_)) => {
                Code::NotFound
            }
            Error::Read(ReadError::OutOfRange { .. }) => Code::OutOfRange,
            Error::Append(AppendError::Storage(e))
            | Error::Read(ReadError::Storage(e))
            | Error::Delete(DeleteError::Storage(e))
            | Error::Storage(e) => match e {
                StorageError::Recovery { .. } => Code::DataLoss,
                StorageError::Io { .. } => Code::Internal,
            },
        }
    }
}

impl From<Error> for Status {
    fn from(error: Error) -> Self {
        let code = error.code();
        metrics::counter!(crate::metrics::ERRORS, "code" => format!("{code:?}")).increment(1);
        if matches!(code, Code::Internal | Code::DataLoss) {
            tracing::error!(%error, "request failed");
        }
        Status::new(code, error.to_string())
    }
}
