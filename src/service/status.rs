//! The gRPC edge's one mapping of [`Error`] to `tonic::Status`: the code of
//! the error's class, its message, and rich details (`ErrorInfo` with the
//! stable reason, `BadRequest`, `ResourceInfo`, `QuotaFailure`, `RetryInfo`), and gRFC A6's
//! `grpc-retry-pushback-ms` where Piclumen said when to retry; the same as
//! a `google.rpc.Status` for errors carried inside messages.

use std::collections::HashMap;

use tonic::{Code, Status, metadata::MetadataValue};
use tonic_types::{ErrorDetails, StatusExt};

use crate::error::{ERROR_DOMAIN, Error, ErrorClass};

impl From<Error> for Status {
    fn from(error: Error) -> Self {
        error.log_for_operator();
        let (class, reason) = error.classify();
        let mut details = ErrorDetails::new();
        match &error {
            Error::InvalidArgument { field, message } => {
                details.add_bad_request_violation(*field, message.clone());
            }
            Error::NotFound { mark_id } => {
                details.set_resource_info("piclumen.v1.ImageJob", mark_id.clone(), "", "");
            }
            Error::CallerQuotaExceeded {
                caller,
                limit,
                allowed,
                used,
                ..
            } => {
                details.add_quota_failure_violation(
                    format!("caller:{caller}"),
                    format!("{limit}: {used} used of {allowed}"),
                );
            }
            _ => {}
        }
        if let Some(delay) = error.retry_after() {
            details.set_retry_info(Some(delay));
        }
        details.set_error_info(reason, ERROR_DOMAIN, HashMap::new());
        let mut status = Status::with_error_details(code(class), error.to_string(), details);
        if let Some(delay) = error.retry_after() {
            // gRFC A6: a client retrying under a service config waits this
            // long before its next attempt, as Piclumen asked.
            status.metadata_mut().insert(
                "grpc-retry-pushback-ms",
                MetadataValue::from(u64::try_from(delay.as_millis()).unwrap_or(u64::MAX)),
            );
        }
        status
    }
}

/// An error as the `google.rpc.Status` a message carries (a WatchImages
/// job's error): the same code, message and details as the call's status
/// would have.
pub(super) fn rpc_status(error: Error) -> tonic_types::Status {
    use prost::Message;
    let status = Status::from(error);
    tonic_types::Status::decode(status.details()).unwrap_or_else(|_| tonic_types::Status {
        code: status.code() as i32,
        message: status.message().to_owned(),
        details: Vec::new(),
    })
}

/// The gRPC code of each class: one to one, the classes being its names.
fn code(class: ErrorClass) -> Code {
    match class {
        ErrorClass::InvalidArgument => Code::InvalidArgument,
        ErrorClass::FailedPrecondition => Code::FailedPrecondition,
        ErrorClass::Unauthenticated => Code::Unauthenticated,
        ErrorClass::PermissionDenied => Code::PermissionDenied,
        ErrorClass::NotFound => Code::NotFound,
        ErrorClass::ResourceExhausted => Code::ResourceExhausted,
        ErrorClass::Aborted => Code::Aborted,
        ErrorClass::Unavailable => Code::Unavailable,
        ErrorClass::DeadlineExceeded => Code::DeadlineExceeded,
        ErrorClass::Internal => Code::Internal,
    }
}
