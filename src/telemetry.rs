//! Logging (tracing, text or JSON) and the optional Prometheus endpoint,
//! with the buckets of its latency histograms.

mod fields;
mod time;

use std::{io::IsTerminal, net::SocketAddr};

use metrics_exporter_prometheus::Matcher;
use tracing_appender::non_blocking::{NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::{EnvFilter, fmt};

use self::{fields::TextFields, time::Rfc3339Micros};

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// `--log`: the default log filter.
pub const DEFAULT_LOG: &str = "info";

/// Installs the global tracing subscriber, writing to stderr. Lines are
/// written by a background thread through a buffer flushed whenever its
/// queue runs empty: under load many lines share one write instead of a
/// system call each on the request path, and an idle server still shows
/// each line at once. Nothing is dropped (a full queue blocks). Keep the
/// guard until exit: dropping it flushes what is left.
#[must_use = "dropping the guard stops logging; hold it until exit"]
pub fn init_logging(format: LogFormat, filter: &str) -> WorkerGuard {
    init_logging_with(format, filter, None)
}

/// [`init_logging`], plus `tracing`'s layer exporting spans to
/// OpenTelemetry when given (`crate::otel::install`). The log filter then
/// applies to the log lines only, and the exported spans stay out of them.
#[must_use = "dropping the guard stops logging; hold it until exit"]
pub fn init_logging_with(
    format: LogFormat,
    filter: &str,
    otel: Option<crate::otel::TracingLayer>,
) -> WorkerGuard {
    use tracing_subscriber::{
        Layer, filter::filter_fn, layer::SubscriberExt, util::SubscriberInitExt,
    };
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(false)
        .finish(std::io::BufWriter::new(std::io::stderr()));
    let Some(otel) = otel else {
        // Export off: the plain subscriber with one global filter, whose
        // level hint lets every disabled callsite cost nothing. Per-layer
        // filters (below) give that up, measurably on the request path.
        let builder = fmt()
            .with_env_filter(filter)
            .with_writer(writer)
            .with_timer(Rfc3339Micros)
            .with_ansi(std::io::stderr().is_terminal());
        match format {
            LogFormat::Text => builder.fmt_fields(TextFields).init(),
            LogFormat::Json => builder.json().flatten_event(true).init(),
        }
        return guard;
    };
    let layer = fmt::layer()
        .with_writer(writer)
        .with_timer(Rfc3339Micros)
        .with_ansi(std::io::stderr().is_terminal());
    let layer = match format {
        LogFormat::Text => layer.fmt_fields(TextFields).boxed(),
        LogFormat::Json => layer
            .json()
            .flatten_event(true)
            .map_event_format(crate::otel::WithTraceIds)
            .boxed(),
    };
    let not_otel = filter_fn(|meta| meta.target() != crate::otel::TARGET);
    let layers = vec![
        layer.with_filter(filter).with_filter(not_otel).boxed(),
        otel,
    ];
    tracing_subscriber::registry().with(layers).init();
    guard
}

/// Buckets (seconds) of `grpc_server_handling_seconds`: Prometheus's
/// default buckets for unary calls, then minutes for WatchImage streams
/// (up to the 30 min `--max-watch` default).
pub const GRPC_HANDLING_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
    1800.0,
];

pub use crate::upstream::metrics::{UPSTREAM_DURATION, UPSTREAM_DURATION_BUCKETS};

/// Serves `/metrics` in Prometheus format on `addr`. Latency histograms get
/// explicit buckets, so they are Prometheus histograms (`_bucket`, `_sum`,
/// `_count`) that aggregate across instances, not summaries.
pub fn init_metrics(addr: SocketAddr) -> Result<(), String> {
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(
            Matcher::Full(crate::grpc_metrics::HANDLING_SECONDS.into()),
            GRPC_HANDLING_BUCKETS,
        )
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Full(UPSTREAM_DURATION.into()),
                UPSTREAM_DURATION_BUCKETS,
            )
        })
        .map_err(|e| e.to_string())?
        .install()
        .map_err(|e| e.to_string())
}
