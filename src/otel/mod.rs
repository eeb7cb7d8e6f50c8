//! OpenTelemetry tracing: W3C trace context in, spans out over OTLP.
//!
//! Configured as every OpenTelemetry SDK is, from the standard variables:
//! export is on when `serve --otlp-endpoint` (`PICLUMEN_OTLP_ENDPOINT`),
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or `OTEL_EXPORTER_OTLP_ENDPOINT` is
//! set (the first wins) and `OTEL_SDK_DISABLED` is not `true`; `OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL`
//! picks `grpc` or `http/protobuf` (the default, as the specification has
//! it); `OTEL_SERVICE_NAME` (default `piclumen-grpc`) and
//! `OTEL_RESOURCE_ATTRIBUTES` make the resource; `OTEL_TRACES_SAMPLER` /
//! `OTEL_TRACES_SAMPLER_ARG` choose the sampler (parent-based always-on by
//! default); `OTEL_BSP_*`, `OTEL_EXPORTER_OTLP_(TRACES_)HEADERS`,
//! `_TIMEOUT` and `_COMPRESSION` are read by the SDK itself.
//!
//! Spans are `tracing` spans with the target [`TARGET`], turned into
//! OpenTelemetry spans by `tracing-opentelemetry` and exported by the SDK's
//! batch processor on its own thread, off the request path. Those spans are
//! hidden from the log output, which keeps its shape; JSON log lines gain
//! `trace_id` and `span_id` while one of them is active.
//!
//! With export off nothing is installed: [`enabled`] is false, every hook
//! returns at once, and no span, header or allocation is added to a call.
//!
//! - `propagation`: `traceparent`/`tracestate` in (gRPC metadata, HTTP
//!   headers) and out (the Piclumen calls).
//! - `layer`: the SERVER span of every gRPC call and HTTP API request.
//! - `spans`: CLIENT spans of the Piclumen calls, the request_id store's
//!   calls, the hub's rounds and their links.
//! - `export`: the exporter (gRPC or HTTP), logged once when it fails.

mod export;
mod layer;
mod propagation;
mod spans;

use std::{
    sync::{
        OnceLock,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use opentelemetry::{KeyValue, trace::TracerProvider as _};
use opentelemetry_sdk::{Resource, trace::SdkTracerProvider};
use tracing::{Subscriber, info, warn};
use tracing_subscriber::{
    Layer, filter::filter_fn, fmt::FormatEvent, fmt::FormatFields, registry::LookupSpan,
};

pub use layer::{GrpcTraceLayer, HttpTraceLayer};
pub use propagation::inject;
pub use spans::{
    Link, RoundLinks, client_span, end_client_span, end_store_span, record_mark_id, retry_event,
    store_span,
};

/// The `tracing` target of every span meant for OpenTelemetry.
pub const TARGET: &str = "otel";
/// `service.name` when neither `OTEL_SERVICE_NAME` nor
/// `OTEL_RESOURCE_ATTRIBUTES` names the service.
pub const DEFAULT_SERVICE_NAME: &str = "piclumen-grpc";
/// Name of the instrumentation scope of our spans.
const SCOPE: &str = "piclumen-grpc";

/// True once an exporter is installed; read by every hook before it does
/// anything.
static ENABLED: AtomicBool = AtomicBool::new(false);
/// The provider, for the flush at shutdown.
static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

/// Whether spans are being exported.
#[inline]
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// The wire protocol of the exporter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// OTLP over gRPC (port 4317 by convention).
    Grpc,
    /// OTLP over HTTP with protobuf bodies (port 4318, path `/v1/traces`).
    HttpProtobuf,
}

impl Protocol {
    fn parse(value: &str) -> Result<Self, TracingError> {
        match value.trim() {
            "grpc" => Ok(Self::Grpc),
            "http/protobuf" => Ok(Self::HttpProtobuf),
            other => Err(TracingError::Protocol(other.to_owned())),
        }
    }
}

/// A tracing setting that cannot work, found at start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TracingError {
    /// An unsupported `OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL`.
    #[error(
        "OTEL_EXPORTER_OTLP_PROTOCOL {0:?} is not supported: expected `grpc` or `http/protobuf`"
    )]
    Protocol(String),
    /// An endpoint that is not an absolute http(s) URL.
    #[error("{var} must be an absolute http:// or https:// URL")]
    Endpoint {
        /// The variable (or flag) holding it.
        var: &'static str,
    },
    /// The exporter could not be built.
    #[error("OTLP exporter: {0}")]
    Exporter(String),
}

/// What the environment asks for: export on (with where and how), or off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TracingConfig {
    /// The full URL spans are sent to (for HTTP, with `/v1/traces`).
    pub endpoint: String,
    /// The wire protocol.
    pub protocol: Protocol,
}

impl TracingConfig {
    /// Reads the standard variables through `env`; `flag_endpoint` is
    /// `--otlp-endpoint`, a base URL like `OTEL_EXPORTER_OTLP_ENDPOINT`
    /// that wins over both endpoint variables. `None`: export is off.
    pub fn from_env(
        flag_endpoint: Option<&str>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<Self>, TracingError> {
        let var = |name: &str| env(name).filter(|v| !v.trim().is_empty());
        if var("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
            return Ok(None);
        }
        let protocol = match var("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
            .or_else(|| var("OTEL_EXPORTER_OTLP_PROTOCOL"))
        {
            Some(p) => Protocol::parse(&p)?,
            None => Protocol::HttpProtobuf,
        };
        // The signal's own endpoint is used as given; a base URL (the flag,
        // the general variable) is completed with the signal's path by HTTP.
        let base = |base: String, var: &'static str| {
            check_url(&base, var)?;
            Ok::<_, TracingError>(match protocol {
                Protocol::Grpc => base,
                Protocol::HttpProtobuf => format!("{}/v1/traces", base.trim_end_matches('/')),
            })
        };
        let endpoint = if let Some(flag) = flag_endpoint.filter(|v| !v.trim().is_empty()) {
            base(
                flag.trim().to_owned(),
                "--otlp-endpoint (PICLUMEN_OTLP_ENDPOINT)",
            )?
        } else if let Some(url) = var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
            check_url(&url, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")?;
            url
        } else if let Some(url) = var("OTEL_EXPORTER_OTLP_ENDPOINT") {
            base(url, "OTEL_EXPORTER_OTLP_ENDPOINT")?
        } else {
            return Ok(None);
        };
        Ok(Some(Self { endpoint, protocol }))
    }
}

/// The `--otlp-endpoint` value parser: an absolute http(s) URL.
pub fn parse_endpoint(value: &str) -> Result<String, String> {
    check_url(value, "--otlp-endpoint")
        .map(|()| value.trim().to_owned())
        .map_err(|e| e.to_string())
}

fn check_url(value: &str, var: &'static str) -> Result<(), TracingError> {
    match reqwest::Url::parse(value.trim()) {
        Ok(url) if matches!(url.scheme(), "http" | "https") && url.has_host() => Ok(()),
        _ => Err(TracingError::Endpoint { var }),
    }
}

/// The layer that turns our spans into OpenTelemetry spans, for the
/// subscriber `crate::telemetry` installs.
pub type TracingLayer = Box<dyn Layer<tracing_subscriber::Registry> + Send + Sync>;

/// Builds the exporter and provider for `config` and returns the layer to
/// install; from then on [`enabled`] is true. Call it inside the Tokio
/// runtime (the exporters' connections live on it), once.
pub fn install(config: &TracingConfig) -> Result<TracingLayer, TracingError> {
    let exporter = export::build(config)?;
    let provider = SdkTracerProvider::builder()
        // The sampler comes from OTEL_TRACES_SAMPLER(_ARG), read by the SDK;
        // parent-based always-on when unset.
        .with_batch_exporter(exporter)
        .with_resource(resource(|name| std::env::var(name).ok()))
        .build();
    let tracer = provider.tracer(SCOPE);
    let _ = PROVIDER.set(provider);
    ENABLED.store(true, Ordering::Relaxed);
    let layer = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_location(false)
        .with_threads(false)
        .with_target(false)
        .with_tracked_inactivity(false)
        .with_filter(filter_fn(|meta| meta.target() == TARGET));
    Ok(Box::new(layer))
}

/// The resource: the SDK's (`OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`,
/// the SDK's own), with our service name when neither names one.
fn resource(env: impl Fn(&str) -> Option<String>) -> Resource {
    let named = env("OTEL_SERVICE_NAME").is_some_and(|v| !v.trim().is_empty())
        || env("OTEL_RESOURCE_ATTRIBUTES").is_some_and(|attrs| {
            attrs
                .split(',')
                .any(|kv| kv.split('=').next().map(str::trim) == Some("service.name"))
        });
    let builder = Resource::builder()
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")));
    if named {
        builder.build()
    } else {
        builder.with_service_name(DEFAULT_SERVICE_NAME).build()
    }
}

/// Exports what is still queued and stops the exporter, waiting at most
/// `within`. Does nothing when export is off.
pub async fn shutdown(within: Duration) {
    let Some(provider) = PROVIDER.get().cloned() else {
        return;
    };
    // The SDK blocks while it flushes: keep that off the runtime's workers.
    let flush = tokio::task::spawn_blocking(move || provider.shutdown_with_timeout(within));
    match tokio::time::timeout(within, flush).await {
        Ok(Ok(Ok(()))) => info!("spans flushed"),
        Ok(Ok(Err(e))) => warn!(error = %e, "spans not all flushed"),
        Ok(Err(e)) => warn!(error = %e, "span flush failed"),
        Err(_) => warn!(within = ?within, "span flush timed out"),
    }
}

/// Wraps the JSON event format: a line written while one of our spans is
/// active starts with its `trace_id` and `span_id`. Other lines, and every
/// line with export off, are the wrapped format's, untouched.
#[derive(Debug)]
pub struct WithTraceIds<F>(pub F);

impl<S, N, F> FormatEvent<S, N> for WithTraceIds<F>
where
    F: FormatEvent<S, N>,
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        use opentelemetry::trace::TraceContextExt;
        if enabled() {
            let cx = opentelemetry::Context::current();
            let span = cx.span();
            let ids = span.span_context();
            if ids.is_valid() {
                let mut line = String::with_capacity(256);
                self.0.format_event(
                    ctx,
                    tracing_subscriber::fmt::format::Writer::new(&mut line),
                    event,
                )?;
                return match line.strip_prefix('{') {
                    Some(rest) => write!(
                        writer,
                        "{{\"trace_id\":\"{}\",\"span_id\":\"{}\",{rest}",
                        ids.trace_id(),
                        ids.span_id()
                    ),
                    None => writer.write_str(&line),
                };
            }
        }
        self.0.format_event(ctx, writer, event)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn config(
        vars: &[(&str, &str)],
        flag: Option<&str>,
    ) -> Result<Option<TracingConfig>, TracingError> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        TracingConfig::from_env(flag, |name| vars.get(name).cloned())
    }

    #[test]
    fn export_is_off_without_an_endpoint_or_when_disabled() {
        assert_eq!(config(&[], None), Ok(None));
        assert_eq!(
            config(&[("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")], None),
            Ok(None)
        );
        assert_eq!(
            config(
                &[
                    ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318"),
                    ("OTEL_SDK_DISABLED", "TRUE")
                ],
                None
            ),
            Ok(None)
        );
    }

    #[test]
    fn endpoints_follow_the_specification() {
        let on = |vars: &[(&str, &str)], flag| config(vars, flag).expect("valid").expect("on");
        // The general endpoint is a base: HTTP adds the signal's path.
        let http = on(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318/")], None);
        assert_eq!(http.protocol, Protocol::HttpProtobuf);
        assert_eq!(http.endpoint, "http://c:4318/v1/traces");
        let grpc = on(
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ],
            None,
        );
        assert_eq!(
            (grpc.protocol, grpc.endpoint.as_str()),
            (Protocol::Grpc, "http://c:4317")
        );
        // The signal's own variables win, and its endpoint is kept as is.
        let vars = [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://t:9999/custom"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf"),
        ];
        let traces = on(&vars, None);
        assert_eq!(traces.protocol, Protocol::HttpProtobuf);
        assert_eq!(traces.endpoint, "http://t:9999/custom");
        // The flag is a base URL like OTEL_EXPORTER_OTLP_ENDPOINT, and wins.
        assert_eq!(
            on(&vars, Some("http://flag:4318")).endpoint,
            "http://flag:4318/v1/traces"
        );
        let flag = on(&[], Some("https://flag:4318"));
        assert_eq!(flag.endpoint, "https://flag:4318/v1/traces");
    }

    #[test]
    fn bad_settings_are_refused_at_start() {
        assert_eq!(
            config(
                &[
                    ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
                    ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")
                ],
                None
            ),
            Err(TracingError::Protocol("http/json".into()))
        );
        assert!(matches!(
            config(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4317")], None),
            Err(TracingError::Endpoint { .. })
        ));
        assert!(parse_endpoint("ftp://c").is_err());
        assert_eq!(
            parse_endpoint(" http://c:4317 "),
            Ok("http://c:4317".into())
        );
    }

    #[test]
    fn the_service_is_named_unless_the_environment_names_it() {
        let name = |vars: &[(&str, &str)]| {
            let vars: HashMap<&str, &str> = vars.iter().copied().collect();
            let resource = resource(|k| vars.get(k).map(|v| (*v).to_owned()));
            resource
                .get(&opentelemetry::Key::new("service.name"))
                .map(|v| v.to_string())
        };
        assert_eq!(name(&[]).as_deref(), Some(DEFAULT_SERVICE_NAME));
    }
}
