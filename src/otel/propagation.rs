//! W3C trace context (`traceparent`, `tracestate`): read from the headers
//! of an incoming call (gRPC metadata are HTTP/2 headers; gRPC-Web and the
//! HTTP API send them as HTTP/1.1 headers), written on the Piclumen calls.

use opentelemetry::{
    Context,
    propagation::TextMapPropagator,
    trace::{SpanContext, TraceContextExt},
};
use opentelemetry_http::{HeaderExtractor, HeaderInjector};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tonic::codegen::http::HeaderMap;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The caller's context, or an empty one (a new trace) when the headers
/// carry none or a malformed one.
pub(super) fn extract(headers: &HeaderMap) -> Context {
    if !headers.contains_key("traceparent") {
        return Context::new();
    }
    TraceContextPropagator::new().extract(&HeaderExtractor(headers))
}

/// The caller's span, for tests and logs; `None` without a valid one.
#[cfg(test)]
pub(super) fn caller(headers: &HeaderMap) -> Option<SpanContext> {
    let cx = extract(headers);
    let span = cx.span();
    let sc = span.span_context();
    sc.is_valid().then(|| sc.clone())
}

/// Adds `traceparent` (and `tracestate`) of `span` to an outgoing request.
/// With export off, or a span that is not recorded, the request is left as
/// it is.
pub fn inject(span: &Span, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
    if !super::enabled() || span.is_none() {
        return request;
    }
    let cx = span.context();
    if !cx.span().span_context().is_valid() {
        return request;
    }
    let mut headers = HeaderMap::new();
    TraceContextPropagator::new().inject_context(&cx, &mut HeaderInjector(&mut headers));
    request.headers(headers)
}

/// The span context of the current OpenTelemetry span, if one is active.
pub(super) fn current() -> Option<SpanContext> {
    let cx = Context::current();
    let span = cx.span();
    let sc = span.span_context();
    sc.is_valid().then(|| sc.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_is_read_and_bad_ones_start_a_new_trace() {
        let mut headers = HeaderMap::new();
        assert_eq!(caller(&headers), None);
        headers.insert(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
                .parse()
                .expect("header"),
        );
        headers.insert("tracestate", "vendor=opaque".parse().expect("header"));
        let sc = caller(&headers).expect("caller's span");
        assert_eq!(
            sc.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(sc.span_id().to_string(), "00f067aa0ba902b7");
        assert!(sc.is_sampled() && sc.is_remote());
        assert_eq!(sc.trace_state().header(), "vendor=opaque");
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "garbage",
        ] {
            headers.insert("traceparent", bad.parse().expect("header"));
            assert_eq!(caller(&headers), None, "{bad}");
        }
    }
}
