//! The upstream client's metrics: calls, 429s and durations per endpoint
//! and HTTP status, with each endpoint's handles resolved once.

use std::time::Duration;

/// Name of the upstream latency histogram.
pub const UPSTREAM_DURATION: &str = "piclumen_upstream_request_duration_seconds";
use UPSTREAM_DURATION as DURATION;

/// Buckets (seconds) of `piclumen_upstream_request_duration_seconds`, up to
/// the 30 s `--upstream-timeout` default.
pub const UPSTREAM_DURATION_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// The two upstream calls, as metric labels.
#[derive(Debug, Clone, Copy)]
pub(super) enum Endpoint {
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
    /// The endpoint's URL path (a span attribute).
    pub(super) fn path(self) -> &'static str {
        match self {
            Self::Create => super::client::CREATE_PATH,
            Self::Status => super::client::STATUS_PATH,
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
    pub(super) fn record(self, status: Option<u16>, took: Duration) {
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
