//! The OTLP exporter: gRPC (tonic) or HTTP/protobuf (our reqwest client),
//! wrapped so a collector that cannot be reached is logged once, not once
//! per batch, and logged again only after it came back and failed anew.

use std::{
    fmt,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::{
    Resource,
    error::OTelSdkResult,
    trace::{SpanData, SpanExporter},
};
use tracing::{info, warn};

use super::{Protocol, TracingConfig, TracingError};

/// Builds the exporter `config` asks for.
pub(super) fn build(config: &TracingConfig) -> Result<LoggedOnce, TracingError> {
    let exporter = match config.protocol {
        Protocol::Grpc => opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(&config.endpoint)
            .build(),
        Protocol::HttpProtobuf => opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .with_http_client(TokioHttpClient::new()?)
            .with_endpoint(&config.endpoint)
            .build(),
    }
    .map_err(|e| TracingError::Exporter(e.to_string()))?;
    info!(
        endpoint = %crate::redact::redact_url(&config.endpoint),
        protocol = ?config.protocol,
        "exporting spans over OTLP"
    );
    Ok(LoggedOnce {
        inner: exporter,
        endpoint: crate::redact::redact_url(&config.endpoint),
        failing: AtomicBool::new(false),
    })
}

/// The exporter, logging the first failure of a run of failures.
pub(super) struct LoggedOnce {
    inner: opentelemetry_otlp::SpanExporter,
    endpoint: String,
    failing: AtomicBool,
}

impl fmt::Debug for LoggedOnce {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoggedOnce")
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

impl SpanExporter for LoggedOnce {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let spans = batch.len();
        let result = self.inner.export(batch).await;
        match &result {
            Ok(()) => {
                if self.failing.swap(false, Ordering::Relaxed) {
                    info!(endpoint = %self.endpoint, "span export works again");
                }
            }
            Err(error) => {
                if !self.failing.swap(true, Ordering::Relaxed) {
                    warn!(
                        endpoint = %self.endpoint,
                        %error,
                        spans,
                        "cannot export spans; calls are not affected, spans are dropped \
                         until the collector answers (logged once)"
                    );
                }
            }
        }
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// Bound on one HTTP export: OTLP's default export timeout.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// The HTTP exporter's client: our own reqwest (no second HTTP stack), its
/// requests run on the Tokio runtime while the SDK's export thread waits
/// for them.
#[derive(Debug)]
struct TokioHttpClient {
    client: reqwest::Client,
    runtime: tokio::runtime::Handle,
}

impl TokioHttpClient {
    fn new() -> Result<Self, TracingError> {
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| TracingError::Exporter("no Tokio runtime to send spans from".into()))?;
        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(EXPORT_TIMEOUT)
            .build()
            .map_err(|e| TracingError::Exporter(e.to_string()))?;
        Ok(Self { client, runtime })
    }
}

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for TokioHttpClient {
    async fn send_bytes(
        &self,
        request: opentelemetry_http::Request<opentelemetry_http::Bytes>,
    ) -> Result<
        opentelemetry_http::Response<opentelemetry_http::Bytes>,
        opentelemetry_http::HttpError,
    > {
        let request = reqwest::Request::try_from(request)?;
        let client = self.client.clone();
        let response = self
            .runtime
            .spawn(async move {
                let response = client.execute(request).await?;
                let status = response.status();
                let headers = response.headers().clone();
                let body = response.bytes().await?;
                Ok::<_, reqwest::Error>((status, headers, body))
            })
            .await??;
        let (status, headers, body) = response;
        let mut reply = opentelemetry_http::Response::new(body);
        *reply.status_mut() = status;
        *reply.headers_mut() = headers;
        Ok(reply)
    }
}
