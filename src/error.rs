//! The service's one error type and its one mapping to `tonic::Status`, with
//! rich details (`ErrorInfo` with a stable reason, `BadRequest`, `RetryInfo`).

use std::{collections::HashMap, time::Duration};

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::upstream::UpstreamError;

/// `ErrorInfo.domain` of every error this service returns.
pub const ERROR_DOMAIN: &str = "piclumen-grpc";

/// Every way a call can fail.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    /// A request field is missing or out of range.
    #[error("{field}: {message}")]
    InvalidArgument {
        /// The offending field, as named in the proto.
        field: &'static str,
        /// What is wrong with it.
        message: String,
    },
    /// No token in the call and none configured.
    #[error(
        "no Piclumen token: send metadata `authorization: Bearer <token>` (the server has no default token)"
    )]
    MissingToken,
    /// Caller authentication is on and the call has no `x-api-key`.
    #[error("this server requires an API key: send metadata `x-api-key`")]
    ApiKeyMissing,
    /// The `x-api-key` is not one of the server's keys.
    #[error("the API key in `x-api-key` is not valid")]
    ApiKeyInvalid,
    /// The `authorization` metadata is not a usable token.
    #[error("malformed `authorization` metadata: expected `Bearer <token>` or the bare token")]
    MalformedToken,
    /// The token's account has no such job.
    #[error("no job with mark id {mark_id:?} for this token")]
    NotFound {
        /// The id asked for.
        mark_id: String,
    },
    /// The server is draining.
    #[error("the server is shutting down; retry on another instance")]
    ShuttingDown,
    /// The server failed on its own (a bug, logged where it happened).
    #[error("the server failed while asking Piclumen for this job's state; retry")]
    Internal,
    /// The caller's deadline or the maximum watch time ran out.
    #[error("{0}")]
    DeadlineExceeded(String),
    /// The watch lost its job's channel; the caller may simply re-issue it.
    #[error("the watch was interrupted; call WatchImage again")]
    WatchInterrupted,
    /// A server limit was reached.
    #[error("{0}")]
    ResourceExhausted(String),
    /// Piclumen failed the call.
    #[error("{source}")]
    Upstream {
        /// What went wrong.
        source: UpstreamError,
        /// True when the server's default token was used: then an auth
        /// failure is the operator's to fix, not the caller's.
        default_token: bool,
    },
    /// A GenerateImage with this `request_id` was sent to Piclumen but no
    /// usable reply came (timeout, broken connection, a gateway's 502/504):
    /// the job may exist, and a retry with the same key must not pay again.
    #[error(
        "a GenerateImage with this request_id was sent to Piclumen but no usable reply came \
         ({cause}): the job may exist (and cost credits) but its mark id is unknown; this \
         request_id keeps giving this answer for the rest of its window, and a call with a new \
         request_id creates regardless"
    )]
    CreateOutcomeUnknown {
        /// What happened to the create, as its first caller was told.
        cause: String,
    },
    /// The shared `request_id` store cannot be reached: nothing was created.
    #[error(
        "the request_id store is unreachable, so nothing was created; retry shortly (a call \
         without request_id still creates, without protection against duplicates)"
    )]
    IdempotencyStoreUnavailable,
    /// Piclumen stayed unreachable for longer than the failure budget.
    #[error("Piclumen unreachable for over {budget:?}; last error: {last}")]
    UpstreamOutage {
        /// The configured budget.
        budget: Duration,
        /// The last failure seen.
        last: UpstreamError,
    },
}

impl Error {
    /// True when a create that failed this way may have started a job
    /// nonetheless: it may have reached Piclumen and no definite answer came.
    pub fn create_outcome_unknown(&self) -> bool {
        match self {
            Self::Upstream { source, .. } => {
                source.may_have_reached_upstream() && !source.is_definite_answer()
            }
            _ => false,
        }
    }
}

impl From<Error> for Status {
    fn from(error: Error) -> Self {
        let message = error.to_string();
        if let Error::Upstream { source, .. } = &error
            && let Some(detail) = source.detail()
        {
            // The chain stays in the log line of this call (its span has the
            // request id); the caller gets the short message only.
            tracing::warn!(error = %message, detail, "upstream transport failure");
        }
        let mut details = ErrorDetails::new();
        let (code, reason) = match &error {
            Error::InvalidArgument { field, message } => {
                details.add_bad_request_violation(*field, message.clone());
                (Code::InvalidArgument, "INVALID_REQUEST")
            }
            Error::MissingToken => (Code::Unauthenticated, "TOKEN_MISSING"),
            Error::ApiKeyMissing => (Code::Unauthenticated, "API_KEY_MISSING"),
            Error::ApiKeyInvalid => (Code::Unauthenticated, "API_KEY_INVALID"),
            Error::MalformedToken => (Code::Unauthenticated, "TOKEN_MALFORMED"),
            Error::NotFound { mark_id } => {
                details.set_resource_info("piclumen.v1.ImageJob", mark_id.clone(), "", "");
                (Code::NotFound, "JOB_NOT_FOUND")
            }
            Error::ShuttingDown => (Code::Unavailable, "SHUTTING_DOWN"),
            Error::Internal => (Code::Internal, "INTERNAL"),
            Error::WatchInterrupted => (Code::Unavailable, "WATCH_INTERRUPTED"),
            Error::DeadlineExceeded(_) => (Code::DeadlineExceeded, "DEADLINE_EXCEEDED"),
            Error::ResourceExhausted(_) => (Code::ResourceExhausted, "SERVER_LIMIT"),
            Error::UpstreamOutage { .. } => (Code::Unavailable, "UPSTREAM_UNAVAILABLE"),
            Error::CreateOutcomeUnknown { .. } => (Code::Aborted, "CREATE_OUTCOME_UNKNOWN"),
            Error::IdempotencyStoreUnavailable => {
                (Code::Unavailable, "IDEMPOTENCY_STORE_UNAVAILABLE")
            }
            Error::Upstream {
                source,
                default_token,
            } => upstream_code(source, *default_token, &mut details),
        };
        details.set_error_info(reason, ERROR_DOMAIN, HashMap::new());
        Status::with_error_details(code, message, details)
    }
}

fn upstream_code(
    source: &UpstreamError,
    default_token: bool,
    details: &mut ErrorDetails,
) -> (Code, &'static str) {
    match source {
        // The caller cannot fix the server's own token: it is the operator's.
        UpstreamError::Unauthorized | UpstreamError::Forbidden if default_token => {
            tracing::error!(error = %source, "Piclumen rejected the server's default token");
            (Code::Internal, "DEFAULT_TOKEN_REJECTED")
        }
        UpstreamError::Unauthorized => (Code::Unauthenticated, "TOKEN_REJECTED"),
        UpstreamError::Forbidden => (Code::PermissionDenied, "PERMISSION_DENIED"),
        UpstreamError::RateLimited { retry_after } => {
            if let Some(delay) = retry_after {
                details.set_retry_info(Some(*delay));
            }
            (Code::ResourceExhausted, "UPSTREAM_RATE_LIMITED")
        }
        // 408: Piclumen gave up waiting for the request; like a 5xx, that
        // passes (`UpstreamError::is_transient` agrees, so watches retry it).
        UpstreamError::Http { status, .. } if *status >= 500 || *status == 408 => {
            (Code::Unavailable, "UPSTREAM_UNAVAILABLE")
        }
        UpstreamError::Http { status: 400, .. } => (Code::InvalidArgument, "UPSTREAM_BAD_REQUEST"),
        UpstreamError::Http { .. } => (Code::Internal, "UPSTREAM_HTTP_ERROR"),
        UpstreamError::Build { .. } => (Code::Internal, "UPSTREAM_REQUEST_INVALID"),
        UpstreamError::Connect { .. } | UpstreamError::Interrupted { .. } => {
            (Code::Unavailable, "UPSTREAM_UNAVAILABLE")
        }
        UpstreamError::Timeout(_) => (Code::DeadlineExceeded, "UPSTREAM_TIMEOUT"),
        UpstreamError::Rejected { .. } => (Code::FailedPrecondition, "UPSTREAM_REJECTED"),
        UpstreamError::Decode { .. } => (Code::Internal, "UPSTREAM_BAD_REPLY"),
    }
}
