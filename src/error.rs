//! The service's one error type, and what every edge needs to answer it
//! without knowing the others: its class ([`ErrorClass`], the canonical
//! error model's codes), its stable reason (`ErrorInfo.reason` over gRPC,
//! `reason` in the HTTP API's body) and its retry delay. The gRPC edge maps
//! a class to a `Status` code (`service::status`), the HTTP API to an HTTP
//! status (`http_api::status`); neither goes through the other's types.

use std::time::Duration;

use crate::upstream::{InvalidField, UpstreamError};

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
    /// A GenerateImage without `request_id` was sent to Piclumen but no
    /// usable reply came (a broken connection, a gateway's 502/504): the job
    /// may exist. Never a code clients retry on their own (UNAVAILABLE),
    /// since a resend may pay twice.
    #[error(
        "the GenerateImage was sent to Piclumen but no usable reply came ({cause}): the job may \
         exist (and cost credits) but its mark id is unknown; sending it again may start a \
         second one (send a request_id to make retries safe)"
    )]
    CreateUnanswered {
        /// What happened to the create.
        cause: String,
    },
    /// The shared `request_id` store cannot be reached: nothing was created.
    #[error(
        "the request_id store is unreachable, so nothing was created; retry shortly (a call \
         without request_id still creates, without protection against duplicates)"
    )]
    IdempotencyStoreUnavailable,
    /// A named caller is over one of its limits (`--callers-file`).
    #[error(
        "caller {caller:?} is over its {limit} limit of {allowed} ({used} used); the window frees in {}s",
        retry_after.as_secs()
    )]
    CallerQuotaExceeded {
        /// The caller's name.
        caller: std::sync::Arc<str>,
        /// The limit's key in the callers file.
        limit: &'static str,
        /// Its value.
        allowed: u64,
        /// What its window had used.
        used: u64,
        /// Until the window frees (zero: when one of its watches ends).
        retry_after: Duration,
    },
    /// The shared store of callers' counters cannot be reached: nothing
    /// was created.
    #[error("the store of callers' limits is unreachable, so nothing was created; retry shortly")]
    CallerQuotaUnavailable,
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
            Self::Upstream { source, .. } => source.create_outcome_unknown(),
            _ => false,
        }
    }
}

impl From<InvalidField> for Error {
    fn from(e: InvalidField) -> Self {
        Self::InvalidArgument {
            field: e.field,
            message: e.message,
        }
    }
}

/// The canonical class of a failure (`google.rpc.Code`'s names, the error
/// model both of our edges follow); each edge maps it to its own status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// The request is wrong as sent.
    InvalidArgument,
    /// The request cannot succeed in the current state.
    FailedPrecondition,
    /// No valid credentials.
    Unauthenticated,
    /// Credentials valid but not allowed.
    PermissionDenied,
    /// No such job.
    NotFound,
    /// A limit or quota ran out.
    ResourceExhausted,
    /// The operation's outcome conflicts with an earlier one.
    Aborted,
    /// Passing trouble: retry.
    Unavailable,
    /// A deadline ran out.
    DeadlineExceeded,
    /// A fault of the server or of Piclumen's replies.
    Internal,
}

impl Error {
    /// The class and stable reason of this failure: one table for every
    /// edge, so a reason means the same over gRPC and HTTP.
    pub fn classify(&self) -> (ErrorClass, &'static str) {
        use ErrorClass as C;
        match self {
            Self::InvalidArgument { .. } => (C::InvalidArgument, "INVALID_REQUEST"),
            Self::MissingToken => (C::Unauthenticated, "TOKEN_MISSING"),
            Self::ApiKeyMissing => (C::Unauthenticated, "API_KEY_MISSING"),
            Self::ApiKeyInvalid => (C::Unauthenticated, "API_KEY_INVALID"),
            Self::MalformedToken => (C::Unauthenticated, "TOKEN_MALFORMED"),
            Self::NotFound { .. } => (C::NotFound, "JOB_NOT_FOUND"),
            Self::ShuttingDown => (C::Unavailable, "SHUTTING_DOWN"),
            Self::Internal => (C::Internal, "INTERNAL"),
            Self::WatchInterrupted => (C::Unavailable, "WATCH_INTERRUPTED"),
            Self::DeadlineExceeded(_) => (C::DeadlineExceeded, "DEADLINE_EXCEEDED"),
            Self::ResourceExhausted(_) => (C::ResourceExhausted, "SERVER_LIMIT"),
            Self::UpstreamOutage { .. } => (C::Unavailable, "UPSTREAM_UNAVAILABLE"),
            Self::CreateOutcomeUnknown { .. } | Self::CreateUnanswered { .. } => {
                (C::Aborted, "CREATE_OUTCOME_UNKNOWN")
            }
            Self::IdempotencyStoreUnavailable => (C::Unavailable, "IDEMPOTENCY_STORE_UNAVAILABLE"),
            Self::CallerQuotaExceeded { .. } => (C::ResourceExhausted, "CALLER_QUOTA_EXCEEDED"),
            Self::CallerQuotaUnavailable => (C::Unavailable, "CALLER_QUOTA_UNAVAILABLE"),
            Self::Upstream {
                source,
                default_token,
            } => classify_upstream(source, *default_token),
        }
    }

    /// This create error as the caller is told it. A create that reached
    /// Piclumen without a usable reply would be UNAVAILABLE like any
    /// passing trouble, and clients retry UNAVAILABLE on their own: it
    /// answers ABORTED `CREATE_OUTCOME_UNKNOWN` instead, so UNAVAILABLE
    /// from GenerateImage always means nothing was created. A keyed create
    /// says so in its key's terms.
    pub fn for_create(self, keyed: bool) -> Self {
        if !self.create_outcome_unknown() || self.classify().0 != ErrorClass::Unavailable {
            return self;
        }
        let cause = self.to_string();
        if keyed {
            Self::CreateOutcomeUnknown { cause }
        } else {
            Self::CreateUnanswered { cause }
        }
    }

    /// How long the caller should wait before retrying, when Piclumen said
    /// or a caller's window frees.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Upstream {
                source: UpstreamError::RateLimited { retry_after },
                ..
            } => *retry_after,
            Self::CallerQuotaExceeded { retry_after, .. } if !retry_after.is_zero() => {
                Some(*retry_after)
            }
            _ => None,
        }
    }

    /// Logs what the caller is not told, once per answered failure: the
    /// transport chain of an upstream failure (the caller gets the short
    /// message), and Piclumen refusing the server's own token (the
    /// operator's to fix). Both edges call it as they answer.
    pub fn log_for_operator(&self) {
        let Self::Upstream {
            source,
            default_token,
        } = self
        else {
            return;
        };
        if let Some(detail) = source.detail() {
            // The call's span carries the request id.
            tracing::warn!(error = %self, detail, "upstream transport failure");
        }
        if *default_token
            && matches!(
                source,
                UpstreamError::Unauthorized | UpstreamError::Forbidden
            )
        {
            tracing::error!(error = %source, "Piclumen rejected the server's default token");
        }
    }
}

fn classify_upstream(source: &UpstreamError, default_token: bool) -> (ErrorClass, &'static str) {
    use ErrorClass as C;
    match source {
        // The caller cannot fix the server's own token: it is the operator's.
        UpstreamError::Unauthorized | UpstreamError::Forbidden if default_token => {
            (C::Internal, "DEFAULT_TOKEN_REJECTED")
        }
        UpstreamError::Unauthorized => (C::Unauthenticated, "TOKEN_REJECTED"),
        UpstreamError::Forbidden => (C::PermissionDenied, "PERMISSION_DENIED"),
        UpstreamError::RateLimited { .. } => (C::ResourceExhausted, "UPSTREAM_RATE_LIMITED"),
        // 408: Piclumen gave up waiting for the request; like a 5xx, that
        // passes (`UpstreamError::is_transient` agrees, so watches retry it).
        UpstreamError::Http { status, .. } if *status >= 500 || *status == 408 => {
            (C::Unavailable, "UPSTREAM_UNAVAILABLE")
        }
        UpstreamError::Http { status: 400, .. } => (C::InvalidArgument, "UPSTREAM_BAD_REQUEST"),
        UpstreamError::Http { .. } => (C::Internal, "UPSTREAM_HTTP_ERROR"),
        UpstreamError::Build { .. } => (C::Internal, "UPSTREAM_REQUEST_INVALID"),
        UpstreamError::Connect { .. } | UpstreamError::Interrupted { .. } => {
            (C::Unavailable, "UPSTREAM_UNAVAILABLE")
        }
        UpstreamError::Timeout(_) => (C::DeadlineExceeded, "UPSTREAM_TIMEOUT"),
        UpstreamError::Rejected { .. } => (C::FailedPrecondition, "UPSTREAM_REJECTED"),
        UpstreamError::Decode { .. } => (C::Internal, "UPSTREAM_BAD_REPLY"),
    }
}
