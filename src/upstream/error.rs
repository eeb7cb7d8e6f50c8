//! Everything that can go wrong talking to Piclumen, and how to tell the
//! kinds apart: worth retrying, surely never sent, a definite answer. The
//! messages are for callers; transport details stay for the server's log.

use std::time::Duration;

/// Everything that can go wrong talking to Piclumen.
///
/// Messages (`Display`) are for callers: they say what happened without the
/// server's internals. Transport variants keep the full error chain in
/// `detail` (URL stripped) for the server's log only.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum UpstreamError {
    /// HTTP 401: the token is bad or expired.
    #[error("Piclumen rejected the token (HTTP 401)")]
    Unauthorized,
    /// HTTP 403: the token may not do this.
    #[error("Piclumen refused access (HTTP 403)")]
    Forbidden,
    /// HTTP 429.
    #[error("Piclumen rate limit reached (HTTP 429)")]
    RateLimited {
        /// The delay from `Retry-After`, when given.
        retry_after: Option<Duration>,
    },
    /// Any other non-2xx answer.
    #[error("Piclumen answered HTTP {status}: {body}")]
    Http {
        /// HTTP status code.
        status: u16,
        /// The first bytes of the body.
        body: String,
    },
    /// The request could not even be built (a header value or the URL is
    /// not valid): nothing was sent, and sending again would fail the same.
    #[error("the request to Piclumen could not be built (a server configuration problem)")]
    Build {
        /// The error chain, for the server's log.
        detail: String,
    },
    /// No connection could be made (refused, DNS failure, connect timeout,
    /// TLS handshake): the request surely never reached Piclumen.
    #[error("cannot reach Piclumen: no connection could be made")]
    Connect {
        /// The error chain, for the server's log.
        detail: String,
    },
    /// The request was sent but the connection broke before the reply was
    /// complete: Piclumen may have acted on it.
    #[error("the connection to Piclumen broke before its reply was complete")]
    Interrupted {
        /// The error chain, for the server's log.
        detail: String,
    },
    /// No complete reply within the time allowed.
    #[error("Piclumen did not answer within {0:?}")]
    Timeout(Duration),
    /// The envelope's `status` was not 0.
    #[error("Piclumen refused the request (status {code}): {message}")]
    Rejected {
        /// Envelope status.
        code: i64,
        /// Envelope message.
        message: String,
    },
    /// The reply was not the JSON we know.
    #[error("undecodable Piclumen reply ({error}): {body}")]
    Decode {
        /// What serde said.
        error: String,
        /// The first bytes of the body.
        body: String,
    },
}

impl UpstreamError {
    /// OpenTelemetry's `error.type` of a call that got no usable reply.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Timeout(_) => "timeout",
            Self::Connect { .. } => "connect",
            Self::Interrupted { .. } => "interrupted",
            Self::Build { .. } => "build",
            _ => "_OTHER",
        }
    }

    /// Trouble that may pass by itself: worth retrying for an idempotent call.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::RateLimited { .. }
            | Self::Connect { .. }
            | Self::Interrupted { .. }
            | Self::Timeout(_) => true,
            Self::Http { status, .. } => *status >= 500 || *status == 408,
            _ => false,
        }
    }

    /// False only when the request surely never reached Piclumen: it could
    /// not be built, or no connection could be made.
    pub fn may_have_reached_upstream(&self) -> bool {
        !matches!(self, Self::Build { .. } | Self::Connect { .. })
    }

    /// True when a create that failed this way may have started a job
    /// nonetheless: it may have reached Piclumen and no definite answer
    /// came. A zero timeout is a deadline that passed before sending.
    pub fn create_outcome_unknown(&self) -> bool {
        let unsent = matches!(self, Self::Timeout(t) if t.is_zero());
        self.may_have_reached_upstream() && !self.is_definite_answer() && !unsent
    }

    /// True when Piclumen's own server gave a definite answer: a refusal
    /// (401, 403, 429, other 4xx, a rejected envelope) or a failure it
    /// reports itself (500, 503, ...). False when the request may have been
    /// acted on without a usable reply: no complete reply (timeout, broken
    /// connection), a gateway saying the server behind it did not answer
    /// properly (502, 504), or a 2xx reply we cannot read.
    pub fn is_definite_answer(&self) -> bool {
        match self {
            Self::Unauthorized
            | Self::Forbidden
            | Self::RateLimited { .. }
            | Self::Rejected { .. } => true,
            Self::Http { status, .. } => !matches!(status, 502 | 504),
            Self::Build { .. }
            | Self::Connect { .. }
            | Self::Interrupted { .. }
            | Self::Timeout(_)
            | Self::Decode { .. } => false,
        }
    }

    /// The full error chain of a transport failure, for the server's log
    /// (never for callers).
    pub fn detail(&self) -> Option<&str> {
        match self {
            Self::Build { detail } | Self::Connect { detail } | Self::Interrupted { detail } => {
                Some(detail)
            }
            _ => None,
        }
    }
}

/// Classifies a reqwest failure: not built, never connected (so never
/// sent), timed out, or broken after sending.
pub(super) fn transport_error(e: reqwest::Error, timeout: Duration) -> UpstreamError {
    // A connect timeout is both: it is a connect error first (never sent).
    if e.is_connect() {
        return UpstreamError::Connect { detail: chain(e) };
    }
    if e.is_timeout() {
        return UpstreamError::Timeout(timeout);
    }
    if e.is_builder() {
        return UpstreamError::Build { detail: chain(e) };
    }
    UpstreamError::Interrupted { detail: chain(e) }
}

/// The error and its sources as one line, without the URL (which may carry
/// credentials); the token is only ever in a header, never in these.
fn chain(e: reqwest::Error) -> String {
    let e = e.without_url();
    let mut message = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    message
}
