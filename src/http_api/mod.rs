//! The first version's HTTP/JSON contract, kept so its callers can move to
//! gRPC gradually: `POST /generate-image` and `POST /check-image` with the
//! Piclumen token in the query string, FastAPI-style validation errors, the
//! OpenAPI document at `/openapi.json` and Swagger UI at `/docs` (assets
//! bundled in the binary).
//!
//! Nothing here talks to Piclumen or speaks gRPC: the handlers call the same
//! transport-free core as the gRPC calls (`crate::service::Core`: same
//! token rules, validation, hub, coalescing and idempotency store), with
//! the query token, `x-api-key` and `Idempotency-Key` as plain inputs and
//! the body as the domain create request. A failure becomes the HTTP status
//! of its error class, in this edge's own table (`status`).
//!
//! - `body`: the `/generate-image` body and its mapping to a create request.
//! - `lax`: the lenient FastAPI-style decoder and its 422 shapes.
//! - `status`: error class -> HTTP status, error bodies.
//! - `openapi`: the OpenAPI document and the success shapes.
//! - `wait`: `/check-image`'s `Prefer: wait`, `If-None-Match` and `ETag`.

mod body;
mod lax;
mod openapi;
mod status;
mod wait;

#[cfg(test)]
mod tests;

use std::{collections::HashMap, future::Future, sync::Arc, time::SystemTime};

use axum::{
    Json, Router,
    body::Bytes,
    extract::{
        DefaultBodyLimit, Query, State,
        rejection::{BytesRejection, QueryRejection},
    },
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::post,
    serve::ListenerExt,
};
use tokio::net::TcpListener;
use utoipa::OpenApi;
use utoipa_swagger_ui::SwaggerUi;

use self::status::{bad_query, detail, error_of, error_response, validation_error};
pub use self::{
    body::{GenerateImageBody, ResolutionBody, StyleInfoBody},
    lax::{LocItem, ValidationDetail, ValidationError},
    openapi::{
        ApiDoc, CheckImageFailure, GenerationFailed, GenerationStarted, GenerationSucceeded,
        SharedFailures, StillProcessing,
    },
    status::{ErrorBody, http_status},
};
use crate::{
    auth::API_KEY_HEADER,
    error::Error,
    job::{JobState, JobStatus},
    request_id::RequestIdLayer,
    service::{Core, Credentials, TokenInput},
};

/// Header whose value becomes GenerateImage's `request_id` (idempotency key).
pub const IDEMPOTENCY_KEY_HEADER: &str = "idempotency-key";
/// `message` of a started generation.
const STARTED: &str = "Image creation initiated";
/// `message` of a finished generation.
const SUCCEEDED: &str = "Image generation successful";
/// Start of `message` while the job is queued or running.
const PROCESSING: &str = "Image still processing. Current status: ";
/// Start of `message` of a failed job.
const FAILED: &str = "Image generation failed. Current status: ";

// === router ===

/// The HTTP routes: both endpoints, `/openapi.json` and `/docs`, with
/// FastAPI's JSON 404 and 405 answers elsewhere; `max_body_bytes` bounds a
/// request body (larger ones get 413).
pub fn router(core: Arc<Core>, max_body_bytes: usize) -> Router {
    let api = Router::new()
        .route("/generate-image", post(generate_image))
        .route("/check-image", post(check_image))
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(core);
    api.merge(SwaggerUi::new("/docs").url("/openapi.json", ApiDoc::openapi()))
        .fallback(|| async { detail(StatusCode::NOT_FOUND, "Not Found") })
        .method_not_allowed_fallback(|| async {
            detail(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed")
        })
        .layer(crate::otel::HttpTraceLayer)
        .layer(RequestIdLayer)
}

/// Serves [`router`] on `listener` until `shutdown` resolves, then lets the
/// requests in flight finish.
pub async fn serve(
    listener: TcpListener,
    core: Arc<Core>,
    max_body_bytes: usize,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    // Without TCP_NODELAY small replies can wait on delayed ACKs (~40 ms).
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, router(core, max_body_bytes))
        .with_graceful_shutdown(shutdown)
        .await
}

// === handlers ===

/// Starts a generation (the first version's endpoint).
#[utoipa::path(
    post,
    path = "/generate-image",
    tag = "images",
    params(
        ("authorization_token" = Option<String>, Query, description = "The Piclumen account token. Required unless the call sends an `x-api-key`: a named caller's own token, or the server's default, then stands in."),
        ("x-api-key" = Option<String>, Header, description = "Caller API key, when the server requires one (`--api-keys-file`)."),
        ("Idempotency-Key" = Option<String>, Header, description = "Optional idempotency key (at most 128 characters): a retry with the same token and key returns the first call's mark id without starting a second generation. GenerateImage's `request_id`."),
    ),
    request_body(
        content = GenerateImageBody,
        content_type = "application/json",
        description = "Piclumen's create payload; every field is optional and takes Piclumen's web default (an unset seed becomes a fresh random one)."
    ),
    responses(
        (status = 200, description = "The generation started.", body = GenerationStarted),
        (status = 400, description = "A field is out of range (reason `INVALID_REQUEST`), or Piclumen refused the request (`UPSTREAM_BAD_REQUEST`, `UPSTREAM_REJECTED`).", body = ErrorBody),
        (status = 413, description = "The body is larger than the server's limit.", body = ErrorBody),
        (status = 422, description = "A query parameter is missing, or the body is not JSON or has a field of the wrong type.", body = ValidationError),
        (status = 429, description = "Rate limited by Piclumen (with `Retry-After` when known) or by the server's per-token limit.", body = ErrorBody),
        (status = 500, description = "Piclumen answered something unexpected, or rejected the server's own token.", body = ErrorBody),
        SharedFailures,
    )
)]
async fn generate_image(
    State(core): State<Arc<Core>>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let Ok(Query(params)) = query else {
        return bad_query();
    };
    let body = match body {
        Ok(body) => body,
        // Refused before it was read: too large, or the connection broke.
        Err(rejection) => return error_response(rejection.status(), rejection.body_text(), None),
    };
    let mut details = Vec::new();
    let token = token_param(&params, &headers, &mut details);
    let body = match GenerateImageBody::parse(&body) {
        Ok(body) => Some(body),
        Err(mut errors) => {
            details.append(&mut errors);
            None
        }
    };
    let (Some(token), Some(body)) = (token, body) else {
        return validation_error(details);
    };
    let mut request = match body.into_request() {
        Ok(request) => request,
        Err(error) => return error_of(error),
    };
    if let Some(key) = headers.get(IDEMPOTENCY_KEY_HEADER) {
        match key.to_str() {
            Ok(key) => request.request_id = key.to_owned(),
            Err(_) => {
                return error_of(Error::InvalidArgument {
                    field: "request_id",
                    message: "the Idempotency-Key header must be visible ASCII".into(),
                });
            }
        }
    }
    let credentials = credentials(token, &headers);
    match core.generate(&credentials, request, None).await {
        Ok(created) => Json(GenerationStarted {
            statuscode: StatusCode::OK.as_u16(),
            message: STARTED.into(),
            mark_id: created.mark_id,
        })
        .into_response(),
        Err(error) => error_of(error),
    }
}

/// Reports on a generation (the first version's endpoint).
#[utoipa::path(
    post,
    path = "/check-image",
    tag = "images",
    params(
        ("authorization_token" = Option<String>, Query, description = "The Piclumen account token that started the job. Required unless the call sends an `x-api-key`: a named caller's own token, or the server's default, then stands in."),
        ("mark_id" = String, Query, description = "The mark id `/generate-image` returned."),
        ("x-api-key" = Option<String>, Header, description = "Caller API key, when the server requires one (`--api-keys-file`)."),
        ("Prefer" = Option<String>, Header, description = "`wait=N` (RFC 7240): with `If-None-Match`, hold the request up to N seconds (cut to the server's `--max-check-wait`, 60 s by default) until the job's `ETag` differs from the one sent, then answer as usual; the end of the wait answers the current state (same `ETag`), never an error. Without `If-None-Match` the answer comes at once."),
        ("If-None-Match" = Option<String>, Header, description = "The quoted `ETag` of the last answer, e.g. `\"0123456789abcdef\"`: with `Prefer: wait=N`, the state to wait to change from. A terminal job, or an `ETag` that already differs, answers at once."),
    ),
    responses(
        (status = 200, description = "Done: the first image's URL.", body = GenerationSucceeded, headers(("Age" = u64, description = "Seconds since Piclumen last confirmed this state."), ("ETag" = String, description = "The job's state as an opaque quoted tag (the same on every replica for the same state); send it back in `If-None-Match` with `Prefer: wait=N` to wait for the next change."), ("Preference-Applied" = String, description = "`wait=N` when the request waited (`Prefer: wait` with `If-None-Match`): the wait granted, in seconds, after the server's cap."))),
        (status = 202, description = "Queued or running (or a state this version does not know): `Image still processing. Current status: <Piclumen's status>`. While Piclumen has trouble, a state confirmed within the server's `--stale-if-error` window is answered instead of the error; `Age` says how old it is.", body = StillProcessing, headers(("Age" = u64, description = "Seconds since Piclumen last confirmed this state."), ("ETag" = String, description = "The job's state as an opaque quoted tag (the same on every replica for the same state); send it back in `If-None-Match` with `Prefer: wait=N` to wait for the next change."), ("Preference-Applied" = String, description = "`wait=N` when the request waited (`Prefer: wait` with `If-None-Match`): the wait granted, in seconds, after the server's cap."))),
        (status = 400, description = "The mark id is empty or malformed, or Piclumen refused the request.", body = ErrorBody),
        (status = 404, description = "This token has no job with this mark id (reason `JOB_NOT_FOUND`).", body = ErrorBody),
        (status = 422, description = "A query parameter is missing.", body = ValidationError),
        (status = 429, description = "Rate limited by Piclumen (with `Retry-After` when known).", body = ErrorBody),
        (status = 500, description = "The generation failed (`GenerationFailed`, with `mark_id`, `ETag` and, after a wait, `Preference-Applied`), or Piclumen answered something unexpected (`ErrorBody`, with `reason`).", body = CheckImageFailure, headers(("ETag" = String, description = "The job's state as an opaque quoted tag (the same on every replica for the same state); send it back in `If-None-Match` with `Prefer: wait=N` to wait for the next change."), ("Preference-Applied" = String, description = "`wait=N` when the request waited (`Prefer: wait` with `If-None-Match`): the wait granted, in seconds, after the server's cap."))),
        SharedFailures,
    )
)]
async fn check_image(
    State(core): State<Arc<Core>>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
    headers: HeaderMap,
) -> Response {
    let Ok(Query(params)) = query else {
        return bad_query();
    };
    let mut details = Vec::new();
    let token = token_param(&params, &headers, &mut details);
    let mark_id = required(&params, "mark_id", &mut details);
    let (Some(token), Some(mark_id)) = (token, mark_id) else {
        return validation_error(details);
    };
    let credentials = credentials(token, &headers);
    let asked = wait::wait_for(&headers);
    let answer = match &asked {
        None => core.check(&credentials, mark_id, None).await,
        Some(asked) => core.check_wait(&credentials, mark_id, None, asked).await,
    };
    match answer {
        Ok(status) => {
            let etag = status.etag();
            let granted = asked.map(|a| a.granted(core.max_check_wait()));
            let response = with_age(status.observed_at, job_response(status));
            wait::decorate(response, etag, granted)
        }
        Err(error) => error_of(error),
    }
}

/// The caller's credentials: the query's token (bare) and, when sent, its
/// `x-api-key`, so the core admits HTTP and gRPC callers alike.
fn credentials<'a>(token: Option<&'a str>, headers: &'a HeaderMap) -> Credentials<'a> {
    Credentials {
        token: token.map_or(TokenInput::Absent, TokenInput::Bare),
        api_key: headers.get(API_KEY_HEADER).map(HeaderValue::as_bytes),
        ..Credentials::default()
    }
}

/// `Age` (RFC 9111): whole seconds since Piclumen confirmed the state, as a
/// cache says how old the answer it serves is (RFC 5861's stale-if-error
/// answers carry it the same way).
fn with_age(observed_at: Option<SystemTime>, mut response: Response) -> Response {
    if let Some(at) = observed_at {
        let age = SystemTime::now().duration_since(at).unwrap_or_default();
        response
            .headers_mut()
            .insert(header::AGE, HeaderValue::from(age.as_secs()));
    }
    response
}

/// The job in the first version's shapes: 200 with the first image when it
/// succeeded, 500 when it failed, 202 otherwise (queued, running, or a state
/// this version does not know, which may still move on).
fn job_response(job: JobStatus) -> Response {
    match job.state {
        JobState::Succeeded => match job.images.into_iter().next() {
            Some(image) => Json(GenerationSucceeded {
                statuscode: StatusCode::OK.as_u16(),
                message: SUCCEEDED.into(),
                image_url: image.url,
            })
            .into_response(),
            None => error_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!(
                    "Piclumen reported job {} done without any image",
                    job.mark_id
                ),
                Some("UPSTREAM_BAD_REPLY".into()),
            ),
        },
        JobState::Failed => (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(GenerationFailed {
                statuscode: StatusCode::INTERNAL_SERVER_ERROR.as_u16(),
                message: format!("{FAILED}{}", job.upstream_status),
                mark_id: job.mark_id,
            }),
        )
            .into_response(),
        JobState::Pending | JobState::Running | JobState::Unknown => (
            StatusCode::ACCEPTED,
            Json(StillProcessing {
                statuscode: StatusCode::ACCEPTED.as_u16(),
                message: format!("{PROCESSING}{}", job.upstream_status),
                mark_id: job.mark_id,
            }),
        )
            .into_response(),
    }
}

/// A required query parameter, or a `missing` entry in `details`.
/// `authorization_token`: required, as in the first version, unless the
/// call carries an API key (`Some(None)`: a named caller's own token, or
/// the server's default, stands in); `None` when missing.
fn token_param<'a>(
    params: &'a HashMap<String, String>,
    headers: &HeaderMap,
    details: &mut Vec<ValidationDetail>,
) -> Option<Option<&'a str>> {
    if headers.contains_key(API_KEY_HEADER) {
        return Some(params.get("authorization_token").map(String::as_str));
    }
    required(params, "authorization_token", details).map(Some)
}

fn required<'a>(
    params: &'a HashMap<String, String>,
    name: &str,
    details: &mut Vec<ValidationDetail>,
) -> Option<&'a str> {
    let value = params.get(name).map(String::as_str);
    if value.is_none() {
        details.push(ValidationDetail::missing(vec![
            "query".into(),
            name.to_owned().into(),
        ]));
    }
    value
}
