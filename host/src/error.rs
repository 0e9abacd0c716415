//! The error a client call can end with, and its one mapping to a gRPC status.
//!
//! Module errors (storage, plugins, replication) convert into [`Error`]; handlers return
//! `Result<_, Error>` and the conversion below is the only place a status code is chosen. A
//! refusal that names the point's owner carries it in the status metadata as well
//! ([`OWNER_METADATA`], [`OWNER_ADDR_METADATA`]), so programs route on it without parsing text;
//! a refused `expected_offset` carries the point's end ([`END_METADATA`]), so a writer resumes
//! from it; a write refused while a group elects a new leader carries the last leader, its
//! epoch and when to retry ([`LEADER_EPOCH_METADATA`], [`RETRY_AFTER_METADATA`]).

use tonic::metadata::MetadataValue;
use tonic::{Code, Status};

use crate::access::Denied;
use crate::api::transfer::TransferError;
use crate::placement::PlacementError;
use crate::point::{AppendError, DeleteError, Handover, InvalidPointId, ReadError, StorageError};
use crate::proto::{
    END_METADATA, EXPECTED_METADATA, LEADER_EPOCH_METADATA, NOTHING_WRITTEN_METADATA,
    OWNER_ADDR_METADATA, OWNER_METADATA, RETRY_AFTER_METADATA,
};
use crate::reshard::gate::{ReadRefusal, Refusal, WriteError};

/// Why a client call failed: one variant per kind, each with its one gRPC code ([`Error::code`]).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The point id is not valid.
    #[error("invalid point id: {0}")]
    InvalidPointId(#[from] InvalidPointId),
    /// An argument is not valid.
    #[error("{0}")]
    InvalidArgument(String),
    /// A range past the point's end.
    #[error("{0}")]
    OutOfRange(String),
    /// The policy said no.
    #[error(transparent)]
    PermissionDenied(#[from] Denied),
    /// The call must go to another node (a follower asked to write, for example).
    #[error("{0}")]
    FailedPrecondition(String),
    /// Not now: the node or a member it needs is not available (retryable).
    #[error("{0}")]
    Unavailable(String),
    /// A call forwarded for another subject by node `forwarder`, which this node does not see
    /// live yet (a balancer that just started): refused before anything was written, so it may
    /// be sent again as it is (`Unavailable`, with [`NOTHING_WRITTEN_METADATA`]).
    #[error(
        "node {forwarder} forwards this call for another subject, and {node} does not see it \
         live yet (a balancer that just started?): send it again"
    )]
    ForwarderUnseen {
        /// The forwarding node (bounded).
        forwarder: String,
        /// This node.
        node: String,
    },
    /// The gate sent the call elsewhere, or not at all (`crate::reshard::gate`).
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// The store did not take a write.
    #[error(transparent)]
    Append(#[from] AppendError),
    /// The store could not read.
    #[error(transparent)]
    Read(#[from] ReadError),
    /// The store could not delete.
    #[error(transparent)]
    Delete(#[from] DeleteError),
    /// The files underneath failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// A group's leadership was not handed over (`crate::api::transfer`).
    #[error(transparent)]
    Transfer(#[from] TransferError),
}

impl Error {
    /// The gRPC status code of this error: the one place a code is chosen.
    pub fn code(&self) -> Code {
        match self {
            Error::InvalidPointId(_) | Error::InvalidArgument(_) => Code::InvalidArgument,
            Error::OutOfRange(_) => Code::OutOfRange,
            Error::PermissionDenied(_) => Code::PermissionDenied,
            Error::FailedPrecondition(_) => Code::FailedPrecondition,
            Error::Unavailable(_) | Error::ForwarderUnseen { .. } => Code::Unavailable,
            Error::Refused(refusal) => refusal.code(),
            Error::Transfer(error) => error.code(),
            // A fence passes in moments; a moved or arriving point is written elsewhere.
            Error::Append(AppendError::Handover { handover, .. }) => match handover {
                Handover::Sealed { .. } => Code::Unavailable,
                _ => Code::FailedPrecondition,
            },
            Error::Append(
                AppendError::Refused { .. }
                | AppendError::ContentType { .. }
                | AppendError::OffsetMismatch { .. },
            ) => Code::FailedPrecondition,
            Error::Read(ReadError::NotFound(_)) | Error::Delete(DeleteError::NotFound(_)) => {
                Code::NotFound
            }
            Error::Read(ReadError::OutOfRange { .. }) => Code::OutOfRange,
            Error::Append(AppendError::Storage(e))
            | Error::Read(ReadError::Storage(e))
            | Error::Delete(DeleteError::Storage(e))
            | Error::Storage(e) => match e {
                e if e.is_disk_full() => Code::ResourceExhausted,
                StorageError::Recovery { .. } => Code::DataLoss,
                StorageError::Io { .. } | StorageError::Catalogue { .. } => Code::Internal,
            },
        }
    }
}

impl From<PlacementError> for Error {
    fn from(error: PlacementError) -> Self {
        Error::Refused(error.into())
    }
}

impl From<WriteError> for Error {
    fn from(error: WriteError) -> Self {
        match error {
            WriteError::Refused(refusal) => Error::Refused(refusal),
            WriteError::Append(error) => Error::Append(error),
            WriteError::Read(error) => Error::Read(error),
        }
    }
}

impl From<ReadRefusal> for Error {
    fn from(error: ReadRefusal) -> Self {
        match error {
            ReadRefusal::Refused(refusal) => Error::Refused(refusal),
            ReadRefusal::Read(error) => Error::Read(error),
        }
    }
}

/// The errors of the domain that reach a client, each through [`Error`]: one mapping.
macro_rules! status_through_error {
    ($($error:ty),*) => {$(
        impl From<$error> for Status {
            fn from(error: $error) -> Self {
                Error::from(error).into()
            }
        }
    )*};
}

status_through_error!(
    Denied,
    Refusal,
    PlacementError,
    WriteError,
    ReadRefusal,
    TransferError
);

impl From<Error> for Status {
    fn from(error: Error) -> Self {
        let code = error.code();
        metrics::counter!(crate::metrics::ERRORS, "code" => format!("{code:?}")).increment(1);
        if matches!(code, Code::Internal | Code::DataLoss) {
            tracing::error!(%error, "request failed");
        }
        let mut status = Status::new(code, error.to_string());
        if let Error::Refused(refusal) = &error {
            let metadata = status.metadata_mut();
            if let Some(redirect) = refusal.redirect() {
                if let Ok(value) = MetadataValue::try_from(redirect.member) {
                    metadata.insert(OWNER_METADATA, value);
                }
                if let Some(Ok(value)) = redirect.address.map(MetadataValue::try_from) {
                    metadata.insert(OWNER_ADDR_METADATA, value);
                }
            }
            if let Some(epoch) = refusal.leader_epoch() {
                metadata.insert(LEADER_EPOCH_METADATA, MetadataValue::from(epoch));
            }
            if let Some(after) = refusal.retry_after() {
                let millis = u64::try_from(after.as_millis()).unwrap_or(u64::MAX);
                metadata.insert(RETRY_AFTER_METADATA, MetadataValue::from(millis));
            }
        }
        if let Error::ForwarderUnseen { .. } = &error {
            let metadata = status.metadata_mut();
            metadata.insert(NOTHING_WRITTEN_METADATA, MetadataValue::from_static("1"));
        }
        if let Error::Append(AppendError::OffsetMismatch { end, expected, .. }) = &error {
            let metadata = status.metadata_mut();
            metadata.insert(END_METADATA, MetadataValue::from(*end));
            metadata.insert(EXPECTED_METADATA, MetadataValue::from(*expected));
        }
        status
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_refusals_carry_the_owner_in_metadata() {
        let status = Status::from(Refusal::NotOwner {
            point: "p".into(),
            owner: "b".into(),
            address: "127.0.0.1:9".into(),
        });
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert_eq!(status.metadata().get(OWNER_METADATA).unwrap(), "b");
        assert_eq!(
            status.metadata().get(OWNER_ADDR_METADATA).unwrap(),
            "127.0.0.1:9"
        );
        let status = Status::from(Refusal::OwnerDown {
            point: "p".into(),
            owner: "b".into(),
        });
        assert_eq!(status.code(), Code::Unavailable);
        assert!(
            status.message().contains("member b"),
            "{}",
            status.message()
        );
        assert!(status.metadata().get(OWNER_ADDR_METADATA).is_none());
    }

    #[test]
    fn a_write_refused_during_an_election_says_who_led_and_when_to_retry() {
        let status = Status::from(Refusal::Electing {
            writes: "the writes of point \"p\"".into(),
            leader: "a".into(),
            epoch: 17,
            retry_after: std::time::Duration::from_millis(500),
        });
        assert_eq!(status.code(), Code::Unavailable);
        let metadata = status.metadata();
        assert_eq!(metadata.get(OWNER_METADATA).unwrap(), "a");
        assert!(metadata.get(OWNER_ADDR_METADATA).is_none());
        assert_eq!(metadata.get(LEADER_EPOCH_METADATA).unwrap(), "17");
        assert_eq!(metadata.get(RETRY_AFTER_METADATA).unwrap(), "500");
        assert!(
            status.message().contains("retry in 500 ms"),
            "{}",
            status.message()
        );
    }

    #[test]
    fn an_offset_mismatch_carries_the_end_in_metadata() {
        let status = Status::from(Error::Append(AppendError::OffsetMismatch {
            point: crate::point::PointId::new("p").unwrap(),
            expected: 7,
            end: 12,
        }));
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert_eq!(status.metadata().get(END_METADATA).unwrap(), "12");
        assert!(
            status.message().contains("ends at 12"),
            "{}",
            status.message()
        );
    }
}
