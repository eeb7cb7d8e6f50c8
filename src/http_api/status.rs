//! How the HTTP API answers a failure, in a table of its own: the HTTP
//! status of each error class (Google's mapping of the canonical codes),
//! the `{"statuscode", "message", "reason"}` body with `Retry-After` when
//! known, and FastAPI's 422 and plain `detail` answers.

use axum::{
    Json,
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde::Serialize;
use serde_json::json;
use utoipa::ToSchema;

use super::lax::{ValidationDetail, ValidationError};
use crate::error::{Error, ErrorClass};

/// The HTTP status of each error class, as Google's HTTP mapping of the
/// canonical codes has it (FAILED_PRECONDITION is 400 there: the request
/// cannot succeed as sent; 412 is about conditional headers).
pub fn http_status(class: ErrorClass) -> StatusCode {
    match class {
        ErrorClass::InvalidArgument | ErrorClass::FailedPrecondition => StatusCode::BAD_REQUEST,
        ErrorClass::Unauthenticated => StatusCode::UNAUTHORIZED,
        ErrorClass::PermissionDenied => StatusCode::FORBIDDEN,
        ErrorClass::NotFound => StatusCode::NOT_FOUND,
        ErrorClass::Aborted => StatusCode::CONFLICT,
        ErrorClass::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        ErrorClass::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        ErrorClass::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        ErrorClass::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// A failed call: its class's HTTP status, its message and stable reason,
/// and `Retry-After` (whole seconds, rounded up) when Piclumen gave one.
pub(super) fn error_of(error: Error) -> Response {
    error.log_for_operator();
    let (class, reason) = error.classify();
    let retry_after = error
        .retry_after()
        .map(|delay| delay.as_secs() + u64::from(delay.subsec_nanos() > 0));
    let mut response = error_response(http_status(class), error.to_string(), Some(reason.into()));
    if let Some(secs) = retry_after {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    response
}

pub(super) fn error_response(
    status: StatusCode,
    message: String,
    reason: Option<String>,
) -> Response {
    let body = ErrorBody {
        statuscode: status.as_u16(),
        message,
        reason,
    };
    (status, Json(body)).into_response()
}

pub(super) fn bad_query() -> Response {
    error_response(
        StatusCode::BAD_REQUEST,
        "the query string is not valid URL-encoded UTF-8".into(),
        None,
    )
}

pub(super) fn validation_error(detail: Vec<ValidationDetail>) -> Response {
    (
        StatusCode::UNPROCESSABLE_ENTITY,
        Json(ValidationError { detail }),
    )
        .into_response()
}

/// Every other failure: the HTTP status of the call's gRPC code.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[schema(example = json!({"statuscode": 404, "message": "no job with mark id \"7d1f\" for this token", "reason": "JOB_NOT_FOUND"}))]
pub struct ErrorBody {
    /// The HTTP status code, repeated.
    pub statuscode: u16,
    /// What went wrong.
    pub message: String,
    /// The stable `ErrorInfo` reason, as gRPC callers get it (see the
    /// README's error tables), when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// FastAPI's `{"detail": "..."}` answer (unknown paths and methods).
pub(super) fn detail(status: StatusCode, text: &str) -> Response {
    (status, Json(json!({ "detail": text }))).into_response()
}
