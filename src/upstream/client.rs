//! The Piclumen client itself: one `reqwest::Client` with the web app's
//! headers, the two endpoints' URLs parsed once, and one POST that bounds
//! the whole exchange, records its metrics and sorts out the answer. The
//! create call is never retried here: it may have cost credits.

use std::{sync::Arc, time::Duration};

use reqwest::header::{self, HeaderMap, HeaderValue};
use serde::Serialize;
use tokio::time::Instant;

use super::{
    CreatePayload, StatusEntry, UpstreamError,
    error::transport_error,
    metrics::Endpoint,
    redact_url,
    wire::{body_prefix, decode_create_reply, decode_status_entries},
};
use crate::{
    flags::positive_duration,
    job::{Secret, Token},
};

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

/// Settings of the client; each is a `serve` flag, declared here (`config`
/// checks the URL and the header values).
#[derive(Debug, Clone, clap::Args)]
pub struct ClientConfig {
    /// Base URL of the Piclumen API (http or https). Kept as a secret: any
    /// `user:password@` in it shows as `***@` in logs.
    #[arg(
        id = "upstream_url",
        value_name = "UPSTREAM_URL",
        long = "upstream-url",
        env = "PICLUMEN_UPSTREAM_URL",
        default_value = "https://api.piclumen.com"
    )]
    pub base_url: Secret,
    /// Bound on one upstream HTTP call.
    #[arg(
        id = "upstream_timeout",
        value_name = "UPSTREAM_TIMEOUT",
        long = "upstream-timeout",
        env = "PICLUMEN_UPSTREAM_TIMEOUT",
        default_value = "30s",
        value_parser = positive_duration
    )]
    pub timeout: Duration,
    /// Bound on opening a connection to the upstream.
    #[arg(
        id = "upstream_connect_timeout",
        value_name = "UPSTREAM_CONNECT_TIMEOUT",
        long = "upstream-connect-timeout",
        env = "PICLUMEN_UPSTREAM_CONNECT_TIMEOUT",
        default_value = "5s",
        value_parser = positive_duration
    )]
    pub connect_timeout: Duration,
    /// `user-agent` sent upstream (default: piclumen-grpc/VERSION).
    #[arg(long, env = "PICLUMEN_USER_AGENT")]
    pub user_agent: Option<String>,
    /// `origin` header sent upstream, if any.
    #[arg(long, env = "PICLUMEN_ORIGIN")]
    pub origin: Option<String>,
    /// `referer` header sent upstream, if any.
    #[arg(long, env = "PICLUMEN_REFERER")]
    pub referer: Option<String>,
}

impl Default for ClientConfig {
    fn default() -> Self {
        crate::flags::no_flags()
    }
}

/// The Piclumen client. Cheap to clone: one reference count, as every call
/// clones it into its own future.
#[derive(Debug, Clone)]
pub struct Client(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    http: reqwest::Client,
    /// Parsed once: building and parsing a URL per call costs more than the
    /// rest of the request setup.
    create_url: reqwest::Url,
    status_url: reqwest::Url,
    timeout: Duration,
    /// `--upstream-url` as given: the shared store's namespace is derived
    /// from it.
    base_url: Secret,
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
            // while so sockets and their tasks return to baseline. No cap on
            // idle connections: they never outnumber the peak in flight, and
            // a cap below that peak closes and reopens connections at steady
            // load (at 160 creates in flight, a cap of 64 opened a new
            // connection for one create in 18).
            .pool_idle_timeout(Duration::from_secs(30));
        // Proxy matching parses URLs on every call; skip it when the
        // environment names no proxy (one is still honoured when set).
        if !PROXY_VARS.iter().any(|v| std::env::var_os(v).is_some()) {
            builder = builder.no_proxy();
        }
        let http = builder.build().map_err(|e| e.to_string())?;
        let base = config.base_url.expose().trim_end_matches('/');
        let url = |path: &str| {
            reqwest::Url::parse(&format!("{base}{path}"))
                .map_err(|e| format!("upstream URL {:?}: {e}", redact_url(base)))
        };
        Ok(Self(Arc::new(Inner {
            http,
            create_url: url(CREATE_PATH)?,
            status_url: url(STATUS_PATH)?,
            timeout: config.timeout,
            base_url: config.base_url.clone(),
        })))
    }

    /// The Piclumen base URL this client calls (`--upstream-url`); it may
    /// hold credentials.
    pub fn base_url(&self) -> &Secret {
        &self.0.base_url
    }

    /// The bound on one whole call (`--upstream-timeout`).
    pub fn timeout(&self) -> Duration {
        self.0.timeout
    }

    /// Starts a generation and returns its mark id. Never retried here: the
    /// request may have reached Piclumen and cost credits.
    pub async fn create(
        &self,
        token: &Token,
        payload: &CreatePayload,
        deadline: Option<Instant>,
    ) -> Result<String, UpstreamError> {
        self.create_encoded(token, encode(payload)?, deadline).await
    }

    /// [`Client::create`] of a body already encoded by [`encode`]: the
    /// `Upstream` impl encodes before it boxes the call, so the payload is
    /// never copied for the future to own.
    pub(super) async fn create_encoded(
        &self,
        token: &Token,
        body: Vec<u8>,
        deadline: Option<Instant>,
    ) -> Result<String, UpstreamError> {
        let reply = self.post(Endpoint::Create, token, body, deadline).await?;
        let mark_id = decode_create_reply(&reply)?;
        crate::otel::record_mark_id(&mark_id);
        Ok(mark_id)
    }

    /// Asks for the state of several jobs at once, bounded by the client's
    /// own timeout. Each entry is decoded on its own (one malformed entry
    /// fails only itself); ids missing from the answer are unknown to the
    /// token's account and simply absent.
    pub async fn batch_status_entries(
        &self,
        token: &Token,
        mark_ids: &[Arc<str>],
    ) -> Result<Vec<StatusEntry>, UpstreamError> {
        let ids: Vec<&str> = mark_ids.iter().map(|id| &**id).collect();
        let body = self
            .post(Endpoint::Status, token, encode(&ids)?, None)
            .await?;
        decode_status_entries(&body)
    }
}

/// A request body as JSON bytes.
pub(super) fn encode(body: &(impl Serialize + ?Sized)) -> Result<Vec<u8>, UpstreamError> {
    serde_json::to_vec(body).map_err(|e| UpstreamError::Build {
        detail: format!("cannot encode the request body: {e}"),
    })
}

impl Client {
    /// One POST; returns the body of a 2xx reply.
    async fn post(
        &self,
        endpoint: Endpoint,
        token: &Token,
        body: Vec<u8>,
        deadline: Option<Instant>,
    ) -> Result<bytes::Bytes, UpstreamError> {
        let this = &*self.0;
        let timeout = match deadline {
            Some(d) => this
                .timeout
                .min(d.saturating_duration_since(Instant::now())),
            None => this.timeout,
        };
        if timeout.is_zero() {
            return Err(UpstreamError::Timeout(timeout));
        }
        let url = match endpoint {
            Endpoint::Create => &this.create_url,
            Endpoint::Status => &this.status_url,
        };
        let span = crate::otel::client_span("POST", endpoint.path(), url.host_str());
        let request = this
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
            let bytes = read_bounded(response, timeout).await?;
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
            outcome
                .as_ref()
                .map(|(status, _, _)| status.as_u16())
                .map_err(UpstreamError::kind),
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

/// The largest reply body read from Piclumen. The largest reply asked for
/// is a status call of `--batch-max` (at most 500) ids, each entry about
/// 1 to 2 KiB with four images: under 1 MiB. 4 MiB leaves room for
/// Piclumen adding fields, while a runaway reply (a proxy streaming a page,
/// a bug) cannot hold more than that in memory per call.
pub const MAX_REPLY_BYTES: usize = 4 << 20;

/// The reply body, up to [`MAX_REPLY_BYTES`]. A longer one is refused as
/// undecodable without reading the rest, and dropping the unread body
/// closes the connection rather than returning it to the pool.
async fn read_bounded(
    mut response: reqwest::Response,
    timeout: Duration,
) -> Result<bytes::Bytes, UpstreamError> {
    let too_large = || UpstreamError::Decode {
        error: format!("the reply is larger than {MAX_REPLY_BYTES} bytes"),
        body: String::new(),
    };
    if response
        .content_length()
        .is_some_and(|n| n > MAX_REPLY_BYTES as u64)
    {
        return Err(too_large());
    }
    let (mut first, mut joined, mut len) = (None::<bytes::Bytes>, bytes::BytesMut::new(), 0);
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| transport_error(e, timeout))?
    {
        len += chunk.len();
        if len > MAX_REPLY_BYTES {
            return Err(too_large());
        }
        match &first {
            // Most replies are one chunk, kept without a copy.
            None => first = Some(chunk),
            Some(head) => {
                if joined.is_empty() {
                    joined.extend_from_slice(head);
                }
                joined.extend_from_slice(&chunk);
            }
        }
    }
    Ok(if joined.is_empty() {
        first.unwrap_or_default()
    } else {
        joined.freeze()
    })
}

fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(header::RETRY_AFTER)?.to_str().ok()?;
    value.trim().parse::<u64>().ok().map(Duration::from_secs)
}
