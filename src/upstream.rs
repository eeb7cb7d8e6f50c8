//! The Piclumen HTTP/JSON client: one `reqwest::Client`, typed wire structs,
//! tolerant decoding, and one error enum that keeps the raw reply text.
//!
//! It knows nothing of gRPC; `crate::error` maps its errors to status codes.

use std::time::Duration;

use reqwest::header::{self, HeaderMap, HeaderValue};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio::time::Instant;

use crate::job::{Image, JobState, JobStatus, Token};

/// Path of the create call.
pub const CREATE_PATH: &str = "/api/gen/create";
/// Path of the batch status call.
pub const STATUS_PATH: &str = "/api/task/batch-process-task";
/// The environment variables reqwest reads proxies from.
const PROXY_VARS: [&str; 6] = [
    "HTTP_PROXY",
    "http_proxy",
    "HTTPS_PROXY",
    "https_proxy",
    "ALL_PROXY",
    "all_proxy",
];
/// How much of an unexpected reply body errors keep.
const BODY_PREFIX: usize = 256;

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

/// Settings of the client, from the command line.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Base URL, e.g. `https://api.piclumen.com`.
    pub base_url: String,
    /// Bound on one whole call.
    pub timeout: Duration,
    /// Bound on establishing a connection.
    pub connect_timeout: Duration,
    /// Optional `user-agent`.
    pub user_agent: Option<String>,
    /// Optional `origin`.
    pub origin: Option<String>,
    /// Optional `referer`.
    pub referer: Option<String>,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            base_url: defaults::UPSTREAM_URL.into(),
            timeout: defaults::UPSTREAM_TIMEOUT,
            connect_timeout: defaults::UPSTREAM_CONNECT_TIMEOUT,
            user_agent: None,
            origin: None,
            referer: None,
        }
    }
}

/// A boxed future, as the [`Upstream`] trait's calls return.
pub type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;

/// What the rest of the service needs from Piclumen: starting a generation
/// and asking for job states. [`Client`] is the production implementation;
/// tests put a scripted fake behind it to run the service on paused time.
pub trait Upstream: Send + Sync + 'static {
    /// Starts a generation and returns its mark id; never retried (it may
    /// have cost credits).
    fn create(
        &self,
        token: &Token,
        payload: &CreatePayload,
        deadline: Option<Instant>,
    ) -> BoxFuture<Result<String, UpstreamError>>;

    /// The states of `mark_ids` for `token`, each entry decoded on its own;
    /// ids absent from the answer are unknown to the token's account.
    fn batch_status(
        &self,
        token: &Token,
        mark_ids: &[std::sync::Arc<str>],
    ) -> BoxFuture<Result<Vec<StatusEntry>, UpstreamError>>;

    /// The bound on one whole call (`--upstream-timeout`).
    fn timeout(&self) -> Duration;
}

impl Upstream for Client {
    fn create(
        &self,
        token: &Token,
        payload: &CreatePayload,
        deadline: Option<Instant>,
    ) -> BoxFuture<Result<String, UpstreamError>> {
        let (client, token, payload) = (self.clone(), token.clone(), payload.clone());
        Box::pin(async move { Client::create(&client, &token, &payload, deadline).await })
    }

    fn batch_status(
        &self,
        token: &Token,
        mark_ids: &[std::sync::Arc<str>],
    ) -> BoxFuture<Result<Vec<StatusEntry>, UpstreamError>> {
        let (client, token, ids) = (self.clone(), token.clone(), mark_ids.to_vec());
        Box::pin(async move { client.batch_status_entries(&token, &ids).await })
    }

    fn timeout(&self) -> Duration {
        self.timeout
    }
}

/// The client's defaults (the `serve` flags' defaults read these).
pub mod defaults {
    use std::time::Duration;

    /// Piclumen's production API, `--upstream-url`'s default.
    pub const UPSTREAM_URL: &str = "https://api.piclumen.com";
    /// `--upstream-timeout`.
    pub const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(30);
    /// `--upstream-connect-timeout`.
    pub const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
}

/// The Piclumen client. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    /// Parsed once: building and parsing a URL per call costs more than the
    /// rest of the request setup.
    create_url: reqwest::Url,
    status_url: reqwest::Url,
    timeout: Duration,
}

impl Client {
    /// Builds the client; fails only on a malformed header value.
    pub fn new(config: &ClientConfig) -> Result<Self, String> {
        let mut headers = HeaderMap::new();
        headers.insert("platform", HeaderValue::from_static("Web"));
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json;charset=UTF-8"),
        );
        headers.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
        for (name, value) in [
            (header::ORIGIN, &config.origin),
            (header::REFERER, &config.referer),
        ] {
            if let Some(value) = value {
                let value = HeaderValue::from_str(value).map_err(|e| format!("{name}: {e}"))?;
                headers.insert(name, value);
            }
        }
        let user_agent = config
            .user_agent
            .clone()
            .unwrap_or_else(|| concat!("piclumen-grpc/", env!("CARGO_PKG_VERSION")).into());
        let mut builder = reqwest::Client::builder()
            .default_headers(headers)
            .user_agent(user_agent)
            .connect_timeout(config.connect_timeout)
            .tcp_nodelay(true)
            // A burst leaves many idle connections; close them after a
            // while so sockets and their tasks return to baseline.
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(64);
        // Proxy matching parses URLs on every call; skip it when the
        // environment names no proxy (one is still honoured when set).
        if !PROXY_VARS.iter().any(|v| std::env::var_os(v).is_some()) {
            builder = builder.no_proxy();
        }
        let http = builder.build().map_err(|e| e.to_string())?;
        let base = config.base_url.trim_end_matches('/');
        let url = |path: &str| {
            reqwest::Url::parse(&format!("{base}{path}"))
                .map_err(|e| format!("upstream URL {base:?}: {e}"))
        };
        Ok(Self {
            http,
            create_url: url(CREATE_PATH)?,
            status_url: url(STATUS_PATH)?,
            timeout: config.timeout,
        })
    }

    /// The bound on one whole call (`--upstream-timeout`).
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Starts a generation and returns its mark id. Never retried here: the
    /// request may have reached Piclumen and cost credits.
    pub async fn create(
        &self,
        token: &Token,
        payload: &CreatePayload,
        deadline: Option<Instant>,
    ) -> Result<String, UpstreamError> {
        let body = self
            .post(Endpoint::Create, token, payload, deadline)
            .await?;
        let mark_id = decode_create_reply(&body)?;
        crate::otel::record_mark_id(&mark_id);
        Ok(mark_id)
    }

    /// Asks for the state of several jobs at once; ids missing from the
    /// answer are unknown to the token's account and simply absent.
    pub async fn batch_status(
        &self,
        token: &Token,
        mark_ids: &[String],
        deadline: Option<Instant>,
    ) -> Result<Vec<JobStatus>, UpstreamError> {
        let body = self
            .post(Endpoint::Status, token, mark_ids, deadline)
            .await?;
        decode_status_reply(&body)
    }

    /// Like `batch_status`, bounded by the client's own timeout, with each
    /// entry decoded on its own: one malformed entry fails only itself.
    pub async fn batch_status_entries(
        &self,
        token: &Token,
        mark_ids: &[std::sync::Arc<str>],
    ) -> Result<Vec<StatusEntry>, UpstreamError> {
        let ids: Vec<&str> = mark_ids.iter().map(|id| &**id).collect();
        let body = self.post(Endpoint::Status, token, &ids, None).await?;
        decode_status_entries(&body)
    }

    /// One POST; returns the body of a 2xx reply.
    async fn post(
        &self,
        endpoint: Endpoint,
        token: &Token,
        body: &(impl Serialize + ?Sized),
        deadline: Option<Instant>,
    ) -> Result<bytes::Bytes, UpstreamError> {
        let timeout = match deadline {
            Some(d) => self
                .timeout
                .min(d.saturating_duration_since(Instant::now())),
            None => self.timeout,
        };
        if timeout.is_zero() {
            return Err(UpstreamError::Timeout(timeout));
        }
        let body = serde_json::to_vec(body).map_err(|e| UpstreamError::Build {
            detail: format!("cannot encode the request body: {e}"),
        })?;
        let url = match endpoint {
            Endpoint::Create => &self.create_url,
            Endpoint::Status => &self.status_url,
        };
        let span = crate::otel::client_span("POST", endpoint.path(), url.host_str());
        let request = self
            .http
            .post(url.clone())
            .header(header::AUTHORIZATION, token.expose())
            .body(body);
        let request = crate::otel::inject(&span, request).send();
        // One bound on the whole exchange, headers and body alike.
        let exchange = async {
            let response = request.await.map_err(|e| transport_error(e, timeout))?;
            let status = response.status();
            let retry_after = retry_after(response.headers());
            let bytes = response
                .bytes()
                .await
                .map_err(|e| transport_error(e, timeout))?;
            Ok::<_, UpstreamError>((status, retry_after, bytes))
        };
        let started = std::time::Instant::now();
        let outcome =
            tracing::Instrument::instrument(tokio::time::timeout(timeout, exchange), span.clone())
                .await
                .map_err(|_| UpstreamError::Timeout(timeout))
                .and_then(|r| r);
        crate::otel::end_client_span(
            &span,
            outcome.as_ref().map(|(status, _, _)| status.as_u16()),
        );
        endpoint.record(
            outcome.as_ref().ok().map(|(status, _, _)| status.as_u16()),
            started.elapsed(),
        );
        let (status, retry_after, bytes) = outcome?;
        match status.as_u16() {
            200..=299 => Ok(bytes),
            401 => Err(UpstreamError::Unauthorized),
            403 => Err(UpstreamError::Forbidden),
            429 => Err(UpstreamError::RateLimited { retry_after }),
            code => Err(UpstreamError::Http {
                status: code,
                body: body_prefix(&bytes),
            }),
        }
    }
}

/// The two upstream calls, as metric labels.
#[derive(Debug, Clone, Copy)]
enum Endpoint {
    Create,
    Status,
}

/// Handles of one endpoint's metrics, resolved once: a registry lookup by
/// labels on every call would cost more than the rest of the bookkeeping.
struct EndpointMetrics {
    calls: metrics::Counter,
    rate_limited: metrics::Counter,
    ok: metrics::Histogram,
    error: metrics::Histogram,
}

impl Endpoint {
    fn path(self) -> &'static str {
        match self {
            Self::Create => CREATE_PATH,
            Self::Status => STATUS_PATH,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Self::Create => "create",
            Self::Status => "status",
        }
    }

    fn metrics(self) -> &'static EndpointMetrics {
        static M: std::sync::OnceLock<[EndpointMetrics; 2]> = std::sync::OnceLock::new();
        let all = M.get_or_init(|| {
            [Self::Create, Self::Status].map(|e| EndpointMetrics {
                calls: metrics::counter!("piclumen_upstream_calls_total", "endpoint" => e.label()),
                rate_limited: metrics::counter!("piclumen_upstream_rate_limited_total", "endpoint" => e.label()),
                ok: metrics::histogram!(DURATION, "endpoint" => e.label(), "status" => "200"),
                error: metrics::histogram!(DURATION, "endpoint" => e.label(), "status" => "error"),
            })
        });
        &all[self as usize]
    }

    /// Counts one call and its duration by HTTP status (`error` when no
    /// response came).
    fn record(self, status: Option<u16>, took: Duration) {
        let m = self.metrics();
        m.calls.increment(1);
        let seconds = took.as_secs_f64();
        match status {
            Some(200) => m.ok.record(seconds),
            None => m.error.record(seconds),
            Some(code) => {
                if code == 429 {
                    m.rate_limited.increment(1);
                }
                metrics::histogram!(DURATION, "endpoint" => self.label(), "status" => code.to_string())
                    .record(seconds);
            }
        }
    }
}

use crate::telemetry::UPSTREAM_DURATION as DURATION;

/// Classifies a reqwest failure: not built, never connected (so never
/// sent), timed out, or broken after sending.
fn transport_error(e: reqwest::Error, timeout: Duration) -> UpstreamError {
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

/// `url` with any `user:password@` removed, for logs.
pub fn redact_url(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut parsed) if !parsed.username().is_empty() || parsed.password().is_some() => {
            let _ = parsed.set_username("");
            let _ = parsed.set_password(None);
            parsed.to_string()
        }
        Ok(_) => url.to_owned(),
        Err(_) => "(not a valid URL)".to_owned(),
    }
}

fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(header::RETRY_AFTER)?.to_str().ok()?;
    value.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// Decodes a create reply to its mark id.
pub fn decode_create_reply(bytes: &[u8]) -> Result<String, UpstreamError> {
    let data: Option<CreateData> = decode_envelope(bytes)?;
    data.and_then(|d| d.mark_id)
        .filter(|id| !id.is_empty())
        .ok_or_else(|| UpstreamError::Decode {
            error: "reply has no data.markId".into(),
            body: body_prefix(bytes),
        })
}

/// Decodes a batch status reply to the jobs it reports.
pub fn decode_status_reply(bytes: &[u8]) -> Result<Vec<JobStatus>, UpstreamError> {
    let data: Option<Vec<TaskWire>> = decode_envelope(bytes)?;
    Ok(data
        .unwrap_or_default()
        .into_iter()
        .map(TaskWire::into_status)
        .collect())
}

/// One entry of a batch status reply: the job, or why its entry is unreadable.
pub type StatusEntry = Result<JobStatus, BadEntry>;

/// An entry of a batch status reply that could not be decoded.
#[derive(Debug, Clone, PartialEq)]
pub struct BadEntry {
    /// The entry's `markId`.
    pub mark_id: String,
    /// What was wrong, with the entry's text.
    pub error: UpstreamError,
}

/// Decodes a batch status reply entry by entry: an entry that is not the
/// shape we know becomes a `BadEntry` for its `markId` (entries without one
/// are skipped), and the others still count.
pub fn decode_status_entries(bytes: &[u8]) -> Result<Vec<StatusEntry>, UpstreamError> {
    // Entries stay raw (borrowed) until each is decoded on its own.
    let entries: Vec<&serde_json::value::RawValue> = decode_envelope(bytes)?.unwrap_or_default();
    let mut out = Vec::with_capacity(entries.len());
    for raw in entries {
        match serde_json::from_str::<TaskWire>(raw.get()) {
            Ok(task) => out.push(Ok(task.into_status())),
            Err(e) => {
                let Some(mark_id) = serde_json::from_str::<IdOnly>(raw.get())
                    .ok()
                    .and_then(|i| i.mark_id)
                else {
                    tracing::warn!(entry = %body_prefix(raw.get().as_bytes()), "status entry without markId skipped");
                    continue;
                };
                out.push(Err(BadEntry {
                    mark_id,
                    error: UpstreamError::Decode {
                        error: e.to_string(),
                        body: body_prefix(raw.get().as_bytes()),
                    },
                }));
            }
        }
    }
    Ok(out)
}

#[derive(Debug, Deserialize)]
struct IdOnly {
    #[serde(rename = "markId", default)]
    mark_id: Option<String>,
}

/// Decodes `{"status", "message", "data"}`; a non-zero status is a rejection.
pub fn decode_envelope<'de, T: Deserialize<'de>>(
    bytes: &'de [u8],
) -> Result<Option<T>, UpstreamError> {
    let envelope: Envelope<T> =
        serde_json::from_slice(bytes).map_err(|e| UpstreamError::Decode {
            error: e.to_string(),
            body: body_prefix(bytes),
        })?;
    if envelope.status != 0 {
        return Err(UpstreamError::Rejected {
            code: envelope.status,
            message: envelope.message,
        });
    }
    Ok(envelope.data)
}

/// The first bytes of a body as text, cut on a character boundary.
pub fn body_prefix(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(BODY_PREFIX)]);
    let mut text = text.into_owned();
    if bytes.len() > BODY_PREFIX {
        text.push('…');
    }
    text
}

#[derive(Debug, Deserialize)]
struct Envelope<T> {
    #[serde(default)]
    status: i64,
    #[serde(default)]
    message: String,
    #[serde(default = "Option::default")]
    data: Option<T>,
}

#[derive(Debug, Deserialize)]
struct CreateData {
    #[serde(rename = "markId", default)]
    mark_id: Option<String>,
}

/// One entry of the batch status reply.
#[derive(Debug, Deserialize)]
struct TaskWire {
    /// The job id.
    #[serde(rename = "markId")]
    mark_id: String,
    /// `pending`, `running`, `success`, `failed` or newer.
    #[serde(default)]
    status: String,
    /// Queue position while pending.
    #[serde(default)]
    index: Option<i64>,
    /// Prompt id, once known.
    #[serde(rename = "promptId", default)]
    prompt_id: Option<String>,
    /// Images, once done.
    #[serde(default)]
    img_urls: Option<Vec<ImageWire>>,
    // `info`, sent while pending, is not used: serde skips it unread.
}

impl TaskWire {
    fn into_status(self) -> JobStatus {
        let state = JobState::from_upstream(&self.status);
        let queue_position = if state == JobState::Pending {
            clamp_i32(self.index.unwrap_or(0))
        } else {
            0
        };
        JobStatus {
            mark_id: self.mark_id,
            state,
            queue_position,
            images: self
                .img_urls
                .unwrap_or_default()
                .into_iter()
                .map(|i| Image {
                    url: i.img_url.unwrap_or_default(),
                    name: i.img_name.unwrap_or_default(),
                    width: clamp_i32(i.real_width.unwrap_or(0)),
                    height: clamp_i32(i.real_height.unwrap_or(0)),
                    nsfw: i.sensitive.is_some_and(|s| s.eq_ignore_ascii_case("NSFW")),
                })
                .collect(),
            upstream_status: self.status,
            prompt_id: self.prompt_id.unwrap_or_default(),
        }
    }
}

fn clamp_i32(v: i64) -> i32 {
    v.clamp(i32::MIN.into(), i32::MAX.into()) as i32
}

/// One image of a finished job.
#[derive(Debug, Deserialize)]
struct ImageWire {
    /// Download URL.
    #[serde(rename = "imgUrl", default)]
    img_url: Option<String>,
    /// File name.
    #[serde(rename = "imgName", default)]
    img_name: Option<String>,
    /// Width.
    #[serde(rename = "realWidth", default)]
    real_width: Option<i64>,
    /// Height.
    #[serde(rename = "realHeight", default)]
    real_height: Option<i64>,
    /// `"NSFW"` when flagged.
    #[serde(default)]
    sensitive: Option<String>,
}

/// The create body, with the web app's field names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CreatePayload {
    /// Prompt text.
    pub prompt: String,
    /// Negative prompt.
    pub negative_prompt: String,
    /// Model id.
    pub model_id: String,
    /// Size and count.
    pub resolution: ResolutionWire,
    /// Seed.
    pub seed: i64,
    /// Steps.
    pub steps: i64,
    /// Guidance scale.
    #[serde(serialize_with = "whole_as_integer")]
    pub cfg: f64,
    /// Sampler.
    pub sampler_name: String,
    /// Scheduler.
    pub scheduler: String,
    /// Denoise.
    #[serde(serialize_with = "whole_as_integer")]
    pub denoise: f64,
    /// High-resolution fix denoise.
    #[serde(serialize_with = "whole_as_integer")]
    pub hires_fix_denoise: f64,
    /// High-resolution scale.
    #[serde(serialize_with = "whole_as_integer")]
    pub hires_scale: f64,
    /// `highPixels`.
    #[serde(rename = "highPixels")]
    pub high_pixels: bool,
    /// Free-form model abilities.
    pub model_ability: Map<String, Value>,
    /// `ponyTags`.
    #[serde(rename = "ponyTags")]
    pub pony_tags: Map<String, Value>,
    /// Image-to-image styles.
    pub multi_img2img_info: StyleListWire,
    /// Image-control styles.
    pub img_control_info: StyleListWire,
    /// `continueCreate`.
    #[serde(rename = "continueCreate")]
    pub continue_create: bool,
}

/// `resolution` of the create body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResolutionWire {
    /// Width in pixels.
    pub width: i64,
    /// Height in pixels.
    pub height: i64,
    /// Number of images.
    pub batch_size: i64,
}

/// `{"style_list": [...]}`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StyleListWire {
    /// Style objects.
    #[serde(default)]
    pub style_list: Vec<Map<String, Value>>,
}

/// The web app sends `"cfg": 1`, not `1.0`; whole numbers go out as integers
/// so our payload matches it byte for byte.
fn whole_as_integer<S: serde::Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
    const EXACT: f64 = 9_007_199_254_740_992.0; // 2^53
    if v.fract() == 0.0 && v.abs() < EXACT {
        s.serialize_i64(*v as i64)
    } else {
        s.serialize_f64(*v)
    }
}
