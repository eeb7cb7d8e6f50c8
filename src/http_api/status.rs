//! How the HTTP API answers a failure: the HTTP status of a gRPC code
//! (Google's mapping), the `{"statuscode", "message", "reason"}` body with
//! `Retry-After` when known, and FastAPI's 422 and plain `detail` answers.

use axum::{
    Json,
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde::Serialize;
use serde_json::json;
use tonic::{Code, Status};
use tonic_types::StatusExt;
use utoipa::ToSchema;

use super::lax::{ValidationDetail, ValidationError};
use crate::error::Error;

/// The HTTP status for a gRPC code, as Google's HTTP mapping of
/// `google.rpc.Code` has it (FAILED_PRECONDITION is 400 there: the request
/// cannot succeed as sent; 412 is about conditional headers). CANCELLED is
/// nginx's 499, "client closed request".
pub fn http_status(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
            StatusCode::BAD_REQUEST
        }
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Cancelled => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::Unknown | Code::Internal | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// A failed call: the status's HTTP code, its message and `ErrorInfo`
/// reason, and `Retry-After` when the status carries `RetryInfo`.
pub(super) fn status_response(status: &Status) -> Response {
    let details = status.get_error_details();
    let reason = details.error_info().map(|info| info.reason.clone());
    let mut response = error_response(
        http_status(status.code()),
        status.message().to_owned(),
        reason,
    );
    let retry_after = details
        .retry_info()
        .and_then(|info| info.retry_delay)
        .map(|delay| delay.as_secs() + u64::from(delay.subsec_nanos() > 0));
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

/// A failed call, as its gRPC status would say it.
pub(super) fn error_of(error: Error) -> Response {
    status_response(&Status::from(error))
}

/// FastAPI's `{"detail": "..."}` answer (unknown paths and methods).
pub(super) fn detail(status: StatusCode, text: &str) -> Response {
    (status, Json(json!({ "detail": text }))).into_response()
}
