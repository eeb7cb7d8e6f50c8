//! The HTTP API's OpenAPI document (served at `/openapi.json`, read by
//! Swagger UI at `/docs`) and the success shapes it describes.

use serde::Serialize;
use utoipa::{IntoResponses, OpenApi, ToSchema};

use super::{
    body::{GenerateImageBody, ResolutionBody, StyleInfoBody},
    lax::{LocItem, ValidationDetail, ValidationError},
    status::ErrorBody,
};

/// The failures both endpoints share, word for word.
#[derive(IntoResponses)]
#[allow(dead_code)] // Only described, never built: the handlers answer with `ErrorBody`.
pub enum SharedFailures {
    /// 401.
    #[response(
        status = 401,
        description = "The token (or API key) is missing, malformed or rejected."
    )]
    Unauthenticated(ErrorBody),
    /// 403.
    #[response(status = 403, description = "Piclumen refused the token.")]
    Refused(ErrorBody),
    /// 503.
    #[response(
        status = 503,
        description = "Piclumen is unreachable, or the server is shutting down."
    )]
    Unavailable(ErrorBody),
    /// 504.
    #[response(status = 504, description = "Piclumen did not answer in time.")]
    TimedOut(ErrorBody),
}

/// `200` of `/generate-image`.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[schema(example = json!({"statuscode": 200, "message": "Image creation initiated", "mark_id": "7d1f0c3e9a5b4f2e8c6d1a0b3e5f7a9c"}))]
pub struct GenerationStarted {
    /// Always 200.
    pub statuscode: u16,
    /// Always `Image creation initiated`.
    pub message: String,
    /// Piclumen's job id; pass it to `/check-image`.
    pub mark_id: String,
}

/// `202` of `/check-image`: the job is queued or running.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[schema(example = json!({"statuscode": 202, "message": "Image still processing. Current status: pending", "mark_id": "7d1f0c3e9a5b4f2e8c6d1a0b3e5f7a9c"}))]
pub struct StillProcessing {
    /// Always 202.
    pub statuscode: u16,
    /// `Image still processing. Current status: <status>`, with Piclumen's
    /// status string (`pending`, `running`, or a newer one).
    pub message: String,
    /// The job's mark id.
    pub mark_id: String,
}

/// `200` of `/check-image`: the job is done.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[schema(example = json!({"statuscode": 200, "message": "Image generation successful", "image_url": "https://images.piclumen.example/x.webp"}))]
pub struct GenerationSucceeded {
    /// Always 200.
    pub statuscode: u16,
    /// Always `Image generation successful`.
    pub message: String,
    /// The first image's URL.
    pub image_url: String,
}

/// `500` of `/check-image` when Piclumen gave up on the job.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[schema(example = json!({"statuscode": 500, "message": "Image generation failed. Current status: failed", "mark_id": "7d1f0c3e9a5b4f2e8c6d1a0b3e5f7a9c"}))]
pub struct GenerationFailed {
    /// Always 500.
    pub statuscode: u16,
    /// `Image generation failed. Current status: failed`.
    pub message: String,
    /// The job's mark id.
    pub mark_id: String,
}

/// `500` of `/check-image`: the job failed, or Piclumen's answer was
/// unusable.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(untagged)]
pub enum CheckImageFailure {
    /// Piclumen gave up on the job.
    Failed(GenerationFailed),
    /// Piclumen's answer was unusable (e.g. done without any image).
    Error(ErrorBody),
}

/// The OpenAPI document served at `/openapi.json`.
#[derive(Debug, OpenApi)]
#[openapi(
    info(
        title = "piclumen-grpc: the first version's HTTP API",
        description = "The HTTP/JSON endpoints of the first version, served for callers moving to the gRPC service `piclumen.v1.ImageService`. Both endpoints run the same code as the gRPC calls (validation, defaults, shared polling, idempotency). Errors carry the HTTP status matching the gRPC code and `{\"statuscode\", \"message\", \"reason\"}`; a missing query parameter or a body that is not valid JSON gets FastAPI's 422 `detail` list."
    ),
    paths(super::generate_image, super::check_image),
    components(schemas(
        GenerateImageBody,
        ResolutionBody,
        StyleInfoBody,
        GenerationStarted,
        StillProcessing,
        GenerationSucceeded,
        GenerationFailed,
        CheckImageFailure,
        ErrorBody,
        ValidationError,
        ValidationDetail,
        LocItem
    )),
    tags((name = "images", description = "Start a generation and check on it."))
)]
pub struct ApiDoc;
