//! The first version's HTTP/JSON contract, kept so its callers can move to
//! gRPC gradually: `POST /generate-image` and `POST /check-image` with the
//! Piclumen token in the query string, FastAPI-style validation errors, the
//! OpenAPI document at `/openapi.json` and Swagger UI at `/docs` (assets
//! bundled in the binary).
//!
//! Nothing here talks to Piclumen: the body becomes a `GenerateImageRequest`,
//! the query token becomes `authorization` metadata, and the call goes to the
//! same `ImageServiceImpl` the gRPC server uses (same validation, hub,
//! coalescing and idempotency store). Its `Status` becomes an HTTP status
//! through [`http_status`].

use std::{collections::HashMap, future::Future};

use axum::{
    Json, Router,
    body::Bytes,
    extract::{
        DefaultBodyLimit, Query, State,
        rejection::{BytesRejection, QueryRejection},
    },
    http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::post,
    serve::ListenerExt,
};
use serde::Serialize;
use serde_json::{Map, Value, json};
use tokio::net::TcpListener;
use tonic::{Code, Status, metadata::MetadataMap};
use tonic_types::StatusExt;
use utoipa::{OpenApi, ToSchema};
use utoipa_swagger_ui::SwaggerUi;

use crate::{
    auth::API_KEY_HEADER,
    convert::json_to_struct,
    error::Error,
    pb::{self, image_service_server::ImageService},
    request_id::RequestIdLayer,
    service::ImageServiceImpl,
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
pub fn router(service: ImageServiceImpl, max_body_bytes: usize) -> Router {
    let api = Router::new()
        .route("/generate-image", post(generate_image))
        .route("/check-image", post(check_image))
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(service);
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
    service: ImageServiceImpl,
    max_body_bytes: usize,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    // Without TCP_NODELAY small replies can wait on delayed ACKs (~40 ms).
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, router(service, max_body_bytes))
        .with_graceful_shutdown(shutdown)
        .await
}

fn detail(status: StatusCode, text: &str) -> Response {
    (status, Json(json!({ "detail": text }))).into_response()
}

// === handlers ===

/// Starts a generation (the first version's endpoint).
#[utoipa::path(
    post,
    path = "/generate-image",
    tag = "images",
    params(
        ("authorization_token" = String, Query, description = "The Piclumen account token."),
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
        (status = 401, description = "The token (or API key) is missing, malformed or rejected.", body = ErrorBody),
        (status = 403, description = "Piclumen refused the token.", body = ErrorBody),
        (status = 413, description = "The body is larger than the server's limit.", body = ErrorBody),
        (status = 422, description = "A query parameter is missing, or the body is not JSON or has a field of the wrong type.", body = ValidationError),
        (status = 429, description = "Rate limited by Piclumen (with `Retry-After` when known) or by the server's per-token limit.", body = ErrorBody),
        (status = 500, description = "Piclumen answered something unexpected, or rejected the server's own token.", body = ErrorBody),
        (status = 503, description = "Piclumen is unreachable, or the server is shutting down.", body = ErrorBody),
        (status = 504, description = "Piclumen did not answer in time.", body = ErrorBody),
    )
)]
async fn generate_image(
    State(service): State<ImageServiceImpl>,
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
    let token = required(&params, "authorization_token", &mut details);
    let parsed = GenerateImageBody::parse(&body);
    let body = match parsed {
        Ok(body) => Some(body),
        Err(mut errors) => {
            details.append(&mut errors);
            None
        }
    };
    let (Some(token), Some(body)) = (token, body) else {
        return validation_error(details);
    };
    let mut message = match body.into_request() {
        Ok(message) => message,
        Err(error) => return status_response(&Status::from(error)),
    };
    if let Some(key) = headers.get(IDEMPOTENCY_KEY_HEADER) {
        match key.to_str() {
            Ok(key) => message.request_id = key.to_owned(),
            Err(_) => {
                return status_response(&Status::from(Error::InvalidArgument {
                    field: "request_id",
                    message: "the Idempotency-Key header must be visible ASCII".into(),
                }));
            }
        }
    }
    let request = match grpc_request(message, token, &headers) {
        Ok(request) => request,
        Err(status) => return status_response(&status),
    };
    match service.generate_image(request).await {
        Ok(response) => Json(GenerationStarted {
            statuscode: StatusCode::OK.as_u16(),
            message: STARTED.into(),
            mark_id: response.into_inner().mark_id,
        })
        .into_response(),
        Err(status) => status_response(&status),
    }
}

/// Reports on a generation (the first version's endpoint).
#[utoipa::path(
    post,
    path = "/check-image",
    tag = "images",
    params(
        ("authorization_token" = String, Query, description = "The Piclumen account token that started the job."),
        ("mark_id" = String, Query, description = "The mark id `/generate-image` returned."),
        ("x-api-key" = Option<String>, Header, description = "Caller API key, when the server requires one (`--api-keys-file`)."),
    ),
    responses(
        (status = 200, description = "Done: the first image's URL.", body = GenerationSucceeded),
        (status = 202, description = "Queued or running (or a state this version does not know): `Image still processing. Current status: <Piclumen's status>`.", body = StillProcessing),
        (status = 400, description = "The mark id is empty or malformed, or Piclumen refused the request.", body = ErrorBody),
        (status = 401, description = "The token (or API key) is missing, malformed or rejected.", body = ErrorBody),
        (status = 403, description = "Piclumen refused the token.", body = ErrorBody),
        (status = 404, description = "This token has no job with this mark id (reason `JOB_NOT_FOUND`).", body = ErrorBody),
        (status = 422, description = "A query parameter is missing.", body = ValidationError),
        (status = 429, description = "Rate limited by Piclumen (with `Retry-After` when known).", body = ErrorBody),
        (status = 500, description = "The generation failed (`GenerationFailed`, with `mark_id`), or Piclumen answered something unexpected (`ErrorBody`, with `reason`).", body = CheckImageFailure),
        (status = 503, description = "Piclumen is unreachable, or the server is shutting down.", body = ErrorBody),
        (status = 504, description = "Piclumen did not answer in time.", body = ErrorBody),
    )
)]
async fn check_image(
    State(service): State<ImageServiceImpl>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
    headers: HeaderMap,
) -> Response {
    let Ok(Query(params)) = query else {
        return bad_query();
    };
    let mut details = Vec::new();
    let token = required(&params, "authorization_token", &mut details);
    let mark_id = required(&params, "mark_id", &mut details);
    let (Some(token), Some(mark_id)) = (token, mark_id) else {
        return validation_error(details);
    };
    let message = pb::CheckImageRequest {
        mark_id: mark_id.to_owned(),
    };
    let request = match grpc_request(message, token, &headers) {
        Ok(request) => request,
        Err(status) => return status_response(&status),
    };
    match service.check_image(request).await {
        Ok(response) => match response.into_inner().job {
            Some(job) => job_response(job),
            None => status_response(&Status::internal("the service returned no job")),
        },
        Err(status) => status_response(&status),
    }
}

/// The job in the first version's shapes: 200 with the first image when it
/// succeeded, 500 when it failed, 202 otherwise (queued, running, or a state
/// this version does not know, which may still move on).
fn job_response(job: pb::ImageJob) -> Response {
    match job.state() {
        pb::JobState::Succeeded => match job.images.into_iter().next() {
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
        pb::JobState::Failed => (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(GenerationFailed {
                statuscode: StatusCode::INTERNAL_SERVER_ERROR.as_u16(),
                message: format!("{FAILED}{}", job.upstream_status),
                mark_id: job.mark_id,
            }),
        )
            .into_response(),
        pb::JobState::Pending | pb::JobState::Running | pb::JobState::Unspecified => (
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

/// A gRPC request carrying the caller's token as `authorization` and, when
/// sent, the caller's `x-api-key`, so the service admits HTTP and gRPC
/// callers alike.
fn grpc_request<T>(
    message: T,
    token: &str,
    headers: &HeaderMap,
) -> Result<tonic::Request<T>, Status> {
    let mut metadata = HeaderMap::new();
    let authorization = HeaderValue::try_from(format!("Bearer {token}"))
        .map_err(|_| Status::from(Error::MalformedToken))?;
    metadata.insert(header::AUTHORIZATION, authorization);
    if let Some(key) = headers.get(API_KEY_HEADER) {
        metadata.insert(HeaderName::from_static(API_KEY_HEADER), key.clone());
    }
    let mut request = tonic::Request::new(message);
    *request.metadata_mut() = MetadataMap::from_headers(metadata);
    Ok(request)
}

// === errors ===

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
fn status_response(status: &Status) -> Response {
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

fn error_response(status: StatusCode, message: String, reason: Option<String>) -> Response {
    let body = ErrorBody {
        statuscode: status.as_u16(),
        message,
        reason,
    };
    (status, Json(body)).into_response()
}

fn bad_query() -> Response {
    error_response(
        StatusCode::BAD_REQUEST,
        "the query string is not valid URL-encoded UTF-8".into(),
        None,
    )
}

fn validation_error(detail: Vec<ValidationDetail>) -> Response {
    (
        StatusCode::UNPROCESSABLE_ENTITY,
        Json(ValidationError { detail }),
    )
        .into_response()
}

/// A required query parameter, or a `missing` entry in `details`.
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

// === the request body ===

/// The first version's body: Piclumen's create payload with its web field
/// names, every field optional. `null` means unset.
#[derive(Debug, Clone, Default, PartialEq, ToSchema)]
#[schema(example = json!({
    "prompt": "a magical landscape", "highPixels": false,
    "model_id": "23887bba-507e-4249-a0e3-6951e4027f2b", "negative_prompt": "",
    "resolution": {"width": 1344, "height": 768, "batch_size": 1},
    "model_ability": {}, "seed": 9896923949_i64, "steps": 6, "cfg": 1,
    "sampler_name": "euler", "scheduler": "normal", "ponyTags": {},
    "denoise": 1, "hires_fix_denoise": 0.5, "hires_scale": 2,
    "multi_img2img_info": {"style_list": []}, "img_control_info": {"style_list": []},
    "continueCreate": false
}))]
pub struct GenerateImageBody {
    /// The text to draw. Required by the service (400 when empty).
    pub prompt: Option<String>,
    /// What to keep out of the picture. Default: empty.
    pub negative_prompt: Option<String>,
    /// Piclumen model id. Default: `23887bba-507e-4249-a0e3-6951e4027f2b`.
    pub model_id: Option<String>,
    /// Size and number of images.
    pub resolution: Option<ResolutionBody>,
    /// Sampling seed, 0 or more. Default: a fresh random seed.
    pub seed: Option<i64>,
    /// Sampling steps, 1 to 100. Default: 6.
    pub steps: Option<i64>,
    /// Guidance scale, 0 to 100, may be fractional. Default: 1.
    pub cfg: Option<f64>,
    /// Sampler. Default: `euler`.
    pub sampler_name: Option<String>,
    /// Scheduler. Default: `normal`.
    pub scheduler: Option<String>,
    /// Denoising strength, 0 to 1. Default: 1.
    pub denoise: Option<f64>,
    /// High-resolution fix denoise, 0 to 1. Default: 0.5.
    pub hires_fix_denoise: Option<f64>,
    /// High-resolution fix scale, 1 to 8. Default: 2.
    pub hires_scale: Option<f64>,
    /// Piclumen's `highPixels` switch. Default: false.
    #[serde(rename = "highPixels")]
    pub high_pixels: Option<bool>,
    /// Free-form model capabilities, passed through. Default: `{}`.
    #[schema(value_type = Option<Object>)]
    pub model_ability: Option<Map<String, Value>>,
    /// Free-form Pony model tags, passed through. Default: `{}`.
    #[serde(rename = "ponyTags")]
    #[schema(value_type = Option<Object>)]
    pub pony_tags: Option<Map<String, Value>>,
    /// Reference images for image-to-image. Default: none.
    pub multi_img2img_info: Option<StyleInfoBody>,
    /// Reference images for image control. Default: none.
    pub img_control_info: Option<StyleInfoBody>,
    /// Piclumen's `continueCreate` switch. Default: false.
    #[serde(rename = "continueCreate")]
    pub continue_create: Option<bool>,
}

/// `resolution`: a field left out (or 0) takes its default.
#[derive(Debug, Clone, Default, PartialEq, ToSchema)]
pub struct ResolutionBody {
    /// Width in pixels, within the server's bounds (64 to 4096 by default). Default: 1344.
    pub width: Option<i64>,
    /// Height in pixels, within the server's bounds. Default: 768.
    pub height: Option<i64>,
    /// Number of images, 1 to 4. Default: 1.
    pub batch_size: Option<i64>,
}

/// `{"style_list": [...]}`: reference images passed through as objects.
#[derive(Debug, Clone, Default, PartialEq, ToSchema)]
pub struct StyleInfoBody {
    /// Entries such as `{"img_url": "https://...", "style": "characterRefer", "weight": 0.9}`.
    #[schema(value_type = Option<Vec<Object>>)]
    pub style_list: Option<Vec<Map<String, Value>>>,
}

/// A field's place in the body: `["body", "resolution", "width"]`.
type Loc = Vec<LocItem>;

impl GenerateImageBody {
    /// Decodes a body as FastAPI with pydantic's lax mode did: numbers may be
    /// numeric strings, integers may be whole floats, booleans may be `0`/`1`
    /// or `"true"`/`"false"`; unknown fields are ignored. Every problem is
    /// reported, each with its location.
    pub fn parse(bytes: &[u8]) -> Result<Self, Vec<ValidationDetail>> {
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Err(vec![ValidationDetail::missing(vec!["body".into()])]);
        }
        let value: Value = serde_json::from_slice(bytes).map_err(|e| {
            vec![ValidationDetail {
                kind: "json_invalid",
                loc: vec!["body".into(), json_error_offset(bytes, &e).into()],
                msg: "JSON decode error".into(),
                input: json!({}),
                ctx: Some(json!({ "error": e.to_string() })),
            }]
        })?;
        let mut errors = Vec::new();
        let body = Fields::new(&value, vec!["body".into()], &mut errors).map(|mut f| Self {
            prompt: f.get("prompt", string),
            negative_prompt: f.get("negative_prompt", string),
            model_id: f.get("model_id", string),
            resolution: f.nested("resolution", |mut r| ResolutionBody {
                width: r.get("width", integer),
                height: r.get("height", integer),
                batch_size: r.get("batch_size", integer),
            }),
            seed: f.get("seed", integer),
            steps: f.get("steps", integer),
            cfg: f.get("cfg", number),
            sampler_name: f.get("sampler_name", string),
            scheduler: f.get("scheduler", string),
            denoise: f.get("denoise", number),
            hires_fix_denoise: f.get("hires_fix_denoise", number),
            hires_scale: f.get("hires_scale", number),
            high_pixels: f.get("highPixels", boolean),
            model_ability: f.get("model_ability", object),
            pony_tags: f.get("ponyTags", object),
            multi_img2img_info: f.nested("multi_img2img_info", style_info),
            img_control_info: f.nested("img_control_info", style_info),
            continue_create: f.get("continueCreate", boolean),
        });
        match body {
            Some(body) if errors.is_empty() => Ok(body),
            _ => Err(errors),
        }
    }

    /// The GenerateImage request; unset fields stay unset, so the service
    /// fills the same defaults as for gRPC callers.
    pub fn into_request(self) -> Result<pb::GenerateImageRequest, Error> {
        let resolution = self
            .resolution
            .map(|r| {
                Ok::<_, Error>(pb::Resolution {
                    width: int32("resolution.width", r.width)?.unwrap_or(0),
                    height: int32("resolution.height", r.height)?.unwrap_or(0),
                    batch_size: int32("resolution.batch_size", r.batch_size)?.unwrap_or(0),
                })
            })
            .transpose()?;
        let styles = |info: Option<StyleInfoBody>| {
            info.map(|info| pb::StyleInfo {
                style_list: info
                    .style_list
                    .unwrap_or_default()
                    .iter()
                    .map(json_to_struct)
                    .collect(),
            })
        };
        Ok(pb::GenerateImageRequest {
            prompt: self.prompt.unwrap_or_default(),
            negative_prompt: self.negative_prompt.unwrap_or_default(),
            model_id: self.model_id.unwrap_or_default(),
            resolution,
            seed: self.seed,
            steps: int32("steps", self.steps)?,
            cfg: self.cfg,
            sampler_name: self.sampler_name.unwrap_or_default(),
            scheduler: self.scheduler.unwrap_or_default(),
            denoise: self.denoise,
            hires_fix_denoise: self.hires_fix_denoise,
            hires_scale: self.hires_scale,
            high_pixels: self.high_pixels,
            model_ability: self.model_ability.as_ref().map(json_to_struct),
            pony_tags: self.pony_tags.as_ref().map(json_to_struct),
            multi_img2img_info: styles(self.multi_img2img_info),
            img_control_info: styles(self.img_control_info),
            continue_create: self.continue_create,
            request_id: String::new(),
        })
    }
}

fn int32(field: &'static str, value: Option<i64>) -> Result<Option<i32>, Error> {
    value
        .map(|v| {
            i32::try_from(v).map_err(|_| Error::InvalidArgument {
                field,
                message: format!("out of range (got {v})"),
            })
        })
        .transpose()
}

fn style_info(mut fields: Fields<'_, '_>) -> StyleInfoBody {
    StyleInfoBody {
        style_list: fields.list("style_list", object),
    }
}

/// The fields of one JSON object being decoded, and where to report
/// problems.
struct Fields<'v, 'e> {
    object: &'v Map<String, Value>,
    loc: Loc,
    errors: &'e mut Vec<ValidationDetail>,
}

impl<'v, 'e> Fields<'v, 'e> {
    /// `None` (and an error) when `value` is not an object.
    fn new(value: &'v Value, loc: Loc, errors: &'e mut Vec<ValidationDetail>) -> Option<Self> {
        match value {
            Value::Object(object) => Some(Self {
                object,
                loc,
                errors,
            }),
            other => {
                errors.push(ValidationDetail {
                    kind: "model_attributes_type",
                    loc,
                    msg: "Input should be a valid dictionary or object to extract fields from"
                        .into(),
                    input: other.clone(),
                    ctx: None,
                });
                None
            }
        }
    }

    fn at(&self, name: &str) -> Loc {
        let mut loc = self.loc.clone();
        loc.push(name.to_owned().into());
        loc
    }

    /// A field decoded by `decode`; absent and `null` are `None`.
    fn get<T>(&mut self, name: &str, decode: impl Fn(&Value) -> Result<T, Mismatch>) -> Option<T> {
        let value = self.object.get(name).filter(|v| !v.is_null())?;
        match decode(value) {
            Ok(v) => Some(v),
            Err(mismatch) => {
                let loc = self.at(name);
                self.errors.push(mismatch.at(loc, value));
                None
            }
        }
    }

    /// A nested object decoded field by field.
    fn nested<T>(&mut self, name: &str, decode: impl FnOnce(Fields<'_, '_>) -> T) -> Option<T> {
        let value = self.object.get(name).filter(|v| !v.is_null())?;
        let loc = self.at(name);
        Fields::new(value, loc, self.errors).map(decode)
    }

    /// A list whose items are decoded by `decode`, each refused item
    /// reported at its position.
    fn list<T>(
        &mut self,
        name: &str,
        decode: impl Fn(&Value) -> Result<T, Mismatch>,
    ) -> Option<Vec<T>> {
        let value = self.object.get(name).filter(|v| !v.is_null())?;
        let Value::Array(items) = value else {
            let loc = self.at(name);
            let mismatch = Mismatch::new("list_type", "Input should be a valid list");
            self.errors.push(mismatch.at(loc, value));
            return None;
        };
        let before = self.errors.len();
        let mut decoded = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            match decode(item) {
                Ok(v) => decoded.push(v),
                Err(mismatch) => {
                    let mut loc = self.at(name);
                    loc.push(i.into());
                    self.errors.push(mismatch.at(loc, item));
                }
            }
        }
        (self.errors.len() == before).then_some(decoded)
    }
}

/// Pydantic's error type and message for a value of the wrong type.
#[derive(Debug)]
struct Mismatch {
    kind: &'static str,
    msg: &'static str,
}

impl Mismatch {
    fn new(kind: &'static str, msg: &'static str) -> Self {
        Self { kind, msg }
    }

    fn at(self, loc: Loc, input: &Value) -> ValidationDetail {
        ValidationDetail {
            kind: self.kind,
            loc,
            msg: self.msg.into(),
            input: input.clone(),
            ctx: None,
        }
    }
}

fn string(v: &Value) -> Result<String, Mismatch> {
    v.as_str()
        .map(str::to_owned)
        .ok_or_else(|| Mismatch::new("string_type", "Input should be a valid string"))
}

fn boolean(v: &Value) -> Result<bool, Mismatch> {
    let parsing = || {
        Mismatch::new(
            "bool_parsing",
            "Input should be a valid boolean, unable to interpret input",
        )
    };
    match v {
        Value::Bool(b) => Ok(*b),
        Value::Number(n) => match n.as_f64() {
            Some(0.0) => Ok(false),
            Some(1.0) => Ok(true),
            _ => Err(parsing()),
        },
        Value::String(s) => match s.trim().to_ascii_lowercase().as_str() {
            "0" | "off" | "f" | "false" | "n" | "no" => Ok(false),
            "1" | "on" | "t" | "true" | "y" | "yes" => Ok(true),
            _ => Err(parsing()),
        },
        _ => Err(Mismatch::new(
            "bool_type",
            "Input should be a valid boolean",
        )),
    }
}

/// Largest whole float taken as an integer: beyond 2^63 it no longer fits.
const I64_BOUND: f64 = 9_223_372_036_854_775_808.0;

fn integer(v: &Value) -> Result<i64, Mismatch> {
    let too_big = || {
        Mismatch::new(
            "int_parsing_size",
            "Unable to parse input string as an integer, exceeded maximum size",
        )
    };
    match v {
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                return Ok(i);
            }
            if n.is_u64() {
                return Err(too_big());
            }
            let f = n.as_f64().unwrap_or(f64::NAN);
            if f.fract() != 0.0 || !f.is_finite() {
                Err(Mismatch::new(
                    "int_from_float",
                    "Input should be a valid integer, got a number with a fractional part",
                ))
            } else if f.abs() >= I64_BOUND {
                Err(too_big())
            } else {
                Ok(f as i64)
            }
        }
        Value::String(s) => s.trim().parse().map_err(|_| {
            Mismatch::new(
                "int_parsing",
                "Input should be a valid integer, unable to parse string as an integer",
            )
        }),
        _ => Err(Mismatch::new("int_type", "Input should be a valid integer")),
    }
}

fn number(v: &Value) -> Result<f64, Mismatch> {
    match v {
        Value::Number(n) => n
            .as_f64()
            .ok_or_else(|| Mismatch::new("float_type", "Input should be a valid number")),
        Value::String(s) => s.trim().parse().map_err(|_| {
            Mismatch::new(
                "float_parsing",
                "Input should be a valid number, unable to parse string as a number",
            )
        }),
        _ => Err(Mismatch::new(
            "float_type",
            "Input should be a valid number",
        )),
    }
}

fn object(v: &Value) -> Result<Map<String, Value>, Mismatch> {
    v.as_object()
        .cloned()
        .ok_or_else(|| Mismatch::new("dict_type", "Input should be a valid dictionary"))
}

/// The byte offset of a JSON syntax error, as FastAPI reports it in `loc`.
fn json_error_offset(bytes: &[u8], error: &serde_json::Error) -> usize {
    // Python reports a body cut short at its end; serde at its last byte.
    if error.is_eof() {
        return bytes.len();
    }
    let line_start = match error.line() {
        0 | 1 => 0,
        line => bytes
            .iter()
            .enumerate()
            .filter(|(_, b)| **b == b'\n')
            .nth(line - 2)
            .map_or(bytes.len(), |(i, _)| i + 1),
    };
    (line_start + error.column().saturating_sub(1)).min(bytes.len())
}

// === response shapes ===

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

/// `422`: FastAPI's validation error list.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[schema(example = json!({"detail": [{"type": "missing", "loc": ["query", "authorization_token"], "msg": "Field required", "input": null}]}))]
pub struct ValidationError {
    /// One entry per problem.
    pub detail: Vec<ValidationDetail>,
}

/// One problem of a request, as pydantic describes it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ValidationDetail {
    /// Pydantic's error type: `missing`, `json_invalid`, `int_parsing`, ...
    #[serde(rename = "type")]
    #[schema(value_type = String)]
    pub kind: &'static str,
    /// Where: `["query", "<name>"]`, `["body"]`, `["body", <byte offset>]`
    /// or `["body", "<field>", ...]`.
    pub loc: Vec<LocItem>,
    /// What is wrong.
    pub msg: String,
    /// The value refused (`null` when missing).
    #[schema(value_type = Object)]
    pub input: Value,
    /// More about the error, e.g. the JSON parser's message.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub ctx: Option<Value>,
}

impl ValidationDetail {
    fn missing(loc: Loc) -> Self {
        Self {
            kind: "missing",
            loc,
            msg: "Field required".into(),
            input: Value::Null,
            ctx: None,
        }
    }
}

/// One step of a location: a name or a position.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
#[serde(untagged)]
pub enum LocItem {
    /// A parameter or field name.
    Name(String),
    /// A byte offset in the body.
    Index(usize),
}

impl From<&str> for LocItem {
    fn from(name: &str) -> Self {
        Self::Name(name.to_owned())
    }
}

impl From<String> for LocItem {
    fn from(name: String) -> Self {
        Self::Name(name)
    }
}

impl From<usize> for LocItem {
    fn from(index: usize) -> Self {
        Self::Index(index)
    }
}

// === OpenAPI ===

/// The OpenAPI document served at `/openapi.json`.
#[derive(Debug, OpenApi)]
#[openapi(
    info(
        title = "piclumen-grpc: the first version's HTTP API",
        description = "The HTTP/JSON endpoints of the first version, served for callers moving to the gRPC service `piclumen.v1.ImageService`. Both endpoints run the same code as the gRPC calls (validation, defaults, shared polling, idempotency). Errors carry the HTTP status matching the gRPC code and `{\"statuscode\", \"message\", \"reason\"}`; a missing query parameter or a body that is not valid JSON gets FastAPI's 422 `detail` list."
    ),
    paths(generate_image, check_image),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_versions_example_maps_to_its_values() {
        let body = br#"{"prompt": "a magical landscape", "highPixels": false,
            "model_id": "23887bba-507e-4249-a0e3-6951e4027f2b", "negative_prompt": "",
            "resolution": {"width": 1344, "height": 768, "batch_size": 1},
            "model_ability": {}, "seed": 9896923949, "steps": 6, "cfg": 1,
            "sampler_name": "euler", "scheduler": "normal", "ponyTags": {},
            "denoise": 1, "hires_fix_denoise": 0.5, "hires_scale": 2,
            "multi_img2img_info": {"style_list": []}, "img_control_info":
            {"style_list": []}, "continueCreate": false}"#;
        let request = GenerateImageBody::parse(body)
            .expect("valid body")
            .into_request()
            .expect("in range");
        assert_eq!(request.prompt, "a magical landscape");
        assert_eq!(request.seed, Some(9_896_923_949));
        assert_eq!(request.steps, Some(6));
        assert_eq!(request.cfg, Some(1.0));
        assert_eq!(request.high_pixels, Some(false));
        assert_eq!(
            request.resolution,
            Some(pb::Resolution {
                width: 1344,
                height: 768,
                batch_size: 1
            })
        );
        assert_eq!(request.multi_img2img_info, Some(pb::StyleInfo::default()));
    }

    #[test]
    fn absent_and_null_fields_stay_unset() {
        let request = GenerateImageBody::parse(br#"{"prompt": "p", "seed": null}"#)
            .expect("valid")
            .into_request()
            .expect("in range");
        assert_eq!(
            request,
            pb::GenerateImageRequest {
                prompt: "p".into(),
                ..Default::default()
            }
        );
    }

    #[test]
    fn lax_values_convert_as_pydantic_does() {
        let body = GenerateImageBody::parse(
            br#"{"steps": "7", "seed": 12.0, "cfg": "4.5", "highPixels": "yes", "continueCreate": 0}"#,
        )
        .expect("lax values");
        assert_eq!(body.steps, Some(7));
        assert_eq!(body.seed, Some(12));
        assert_eq!(body.cfg, Some(4.5));
        assert_eq!(body.high_pixels, Some(true));
        assert_eq!(body.continue_create, Some(false));
    }

    #[test]
    fn every_wrong_type_is_reported_where_it_is() {
        let errors = GenerateImageBody::parse(
            br#"{"prompt": 5, "steps": 1.5, "resolution": {"width": "wide"}, "ponyTags": [], "multi_img2img_info": {"style_list": [1]}}"#,
        )
        .expect_err("wrong types");
        let found: Vec<(&str, Value)> = errors
            .iter()
            .map(|d| (d.kind, serde_json::to_value(&d.loc).expect("loc")))
            .collect();
        assert_eq!(
            found,
            vec![
                ("string_type", json!(["body", "prompt"])),
                ("int_parsing", json!(["body", "resolution", "width"])),
                ("int_from_float", json!(["body", "steps"])),
                ("dict_type", json!(["body", "ponyTags"])),
                (
                    "dict_type",
                    json!(["body", "multi_img2img_info", "style_list", 0])
                ),
            ]
        );
    }

    #[test]
    fn bodies_that_are_not_objects_are_refused() {
        let missing = GenerateImageBody::parse(b"  ").expect_err("empty");
        assert_eq!(missing[0].kind, "missing");
        // Python's json module (so FastAPI) puts this error at char 19.
        let cut = GenerateImageBody::parse(b"{\"prompt\": ").expect_err("cut short");
        assert_eq!(
            serde_json::to_value(&cut[0].loc).expect("loc"),
            json!(["body", 11])
        );
        let invalid = GenerateImageBody::parse(b"{\"steps\": 6,\n \"a\": x}").expect_err("bad");
        assert_eq!(invalid[0].kind, "json_invalid");
        assert_eq!(
            serde_json::to_value(&invalid[0].loc).expect("loc"),
            json!(["body", 19])
        );
        let list = GenerateImageBody::parse(b"[1]").expect_err("list");
        assert_eq!(list[0].kind, "model_attributes_type");
    }

    #[test]
    fn out_of_range_integers_are_invalid_arguments() {
        let body = GenerateImageBody::parse(br#"{"resolution": {"width": 3000000000}}"#)
            .expect("an integer");
        assert!(matches!(
            body.into_request(),
            Err(Error::InvalidArgument {
                field: "resolution.width",
                ..
            })
        ));
        let errors =
            GenerateImageBody::parse(br#"{"seed": 99999999999999999999}"#).expect_err("too big");
        assert_eq!(errors[0].kind, "int_parsing_size");
    }

    #[test]
    fn grpc_codes_map_to_http() {
        for (code, http) in [
            (Code::InvalidArgument, 400),
            (Code::FailedPrecondition, 400),
            (Code::Unauthenticated, 401),
            (Code::PermissionDenied, 403),
            (Code::NotFound, 404),
            (Code::Aborted, 409),
            (Code::ResourceExhausted, 429),
            (Code::Cancelled, 499),
            (Code::Internal, 500),
            (Code::Unavailable, 503),
            (Code::DeadlineExceeded, 504),
        ] {
            assert_eq!(http_status(code).as_u16(), http, "{code:?}");
        }
    }
}
