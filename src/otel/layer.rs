//! The SERVER span of each call: a tower layer for the gRPC router (gRPC
//! and gRPC-Web alike, below the gRPC-Web translation) and one for the
//! first version's HTTP API. The span's parent is the caller's
//! `traceparent` (a new trace without one); it lives until the response
//! ends, so a WatchImage stream's span covers the whole stream.
//!
//! Attributes follow OpenTelemetry's conventions: `rpc.system`,
//! `rpc.service`, `rpc.method`, `rpc.grpc.status_code` for gRPC;
//! `http.request.method`, `url.path` (never the query: the HTTP API carries
//! the token there), `http.route`, `http.response.status_code` for HTTP;
//! plus `piclumen.request_id` and, once known, `piclumen.mark_id` and a
//! named caller's `piclumen.caller`.
//! With export off both layers pass calls through untouched.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll, ready},
};

use pin_project_lite::pin_project;
use tonic::codegen::http::{HeaderMap, Request, Response};
use tower::{Layer, Service};
use tracing::{Span, field::Empty, instrument::Instrumented};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::{TARGET, enabled, propagation};
use crate::{
    call_end::{Observed, ObservedBody, Observer},
    request_id::HEADER as REQUEST_ID,
};

/// gRPC codes OpenTelemetry counts as a server error (the others are the
/// caller's).
const SERVER_ERRORS: [u8; 6] = [2, 4, 12, 13, 14, 15];
/// Paths left untraced: health probes would drown the calls.
const UNTRACED_PREFIX: &str = "/grpc.health.v1.Health/";
/// The HTTP API's routes, as `http.route` (any other path has none, so
/// callers cannot add span names).
const HTTP_ROUTES: [&str; 4] = ["/generate-image", "/check-image", "/openapi.json", "/docs"];

// === impl GrpcTraceLayer ===

/// Adds [`GrpcTrace`] around the gRPC server's routes.
#[derive(Debug, Clone, Copy, Default)]
pub struct GrpcTraceLayer;

impl<S> Layer<S> for GrpcTraceLayer {
    type Service = GrpcTrace<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcTrace { inner }
    }
}

/// See the module docs.
#[derive(Debug, Clone)]
pub struct GrpcTrace<S> {
    inner: S,
}

impl<S, B, RB> Service<Request<B>> for GrpcTrace<S>
where
    S: Service<Request<B>, Response = Response<RB>>,
{
    type Response = Response<ObservedBody<RB, CallSpan>>;
    type Error = S::Error;
    type Future = Observed<Instrumented<S::Future>, CallSpan>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let path = request.uri().path();
        if !enabled() || path.starts_with(UNTRACED_PREFIX) {
            return Observed::new(Instrumented::none(self.inner.call(request)), None);
        }
        let span = grpc_span(path, request.headers());
        let inner = span.in_scope(|| self.inner.call(request));
        let call = CallSpan(span.clone());
        Observed::new(Instrumented::some(inner, span), Some(call))
    }
}

/// The SERVER span of a gRPC call to `path`.
fn grpc_span(path: &str, headers: &HeaderMap) -> Span {
    let (service, method) = path
        .trim_start_matches('/')
        .split_once('/')
        .filter(|(s, m)| !s.is_empty() && !m.is_empty() && s.len() + m.len() < 256)
        .unwrap_or(("unknown", "unknown"));
    let span = tracing::info_span!(
        target: TARGET,
        "grpc server",
        otel.name = format_args!("{service}/{method}"),
        otel.kind = "server",
        otel.status_code = Empty,
        rpc.system = "grpc",
        rpc.service = service,
        rpc.method = method,
        rpc.grpc.status_code = Empty,
        piclumen.request_id = request_id(headers),
        piclumen.mark_id = Empty,
        piclumen.caller = Empty,
    );
    let _ = span.set_parent(propagation::extract(headers));
    span
}

fn request_id(headers: &HeaderMap) -> &str {
    headers
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
}

trait InstrumentedExt<F> {
    fn none(inner: F) -> Instrumented<F>;
    fn some(inner: F, span: Span) -> Instrumented<F>;
}

impl<F> InstrumentedExt<F> for Instrumented<F> {
    fn none(inner: F) -> Instrumented<F> {
        tracing::Instrument::instrument(inner, Span::none())
    }
    fn some(inner: F, span: Span) -> Instrumented<F> {
        tracing::Instrument::instrument(inner, span)
    }
}

/// A call's span, given its gRPC code when the call ends.
#[derive(Debug)]
pub struct CallSpan(Span);

impl Observer for CallSpan {
    fn end(self, code: u8) {
        self.0.record("rpc.grpc.status_code", i64::from(code));
        if SERVER_ERRORS.contains(&code) {
            self.0.record("otel.status_code", "ERROR");
        }
    }
}

// === impl HttpTraceLayer ===

/// Adds [`HttpTrace`] around the first version's HTTP API.
#[derive(Debug, Clone, Copy, Default)]
pub struct HttpTraceLayer;

impl<S> Layer<S> for HttpTraceLayer {
    type Service = HttpTrace<S>;

    fn layer(&self, inner: S) -> Self::Service {
        HttpTrace { inner }
    }
}

/// See the module docs.
#[derive(Debug, Clone)]
pub struct HttpTrace<S> {
    inner: S,
}

impl<S, B, RB> Service<Request<B>> for HttpTrace<S>
where
    S: Service<Request<B>, Response = Response<RB>>,
{
    type Response = Response<RB>;
    type Error = S::Error;
    type Future = HttpFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        if !enabled() {
            return HttpFuture {
                inner: Instrumented::none(self.inner.call(request)),
                span: None,
            };
        }
        let method = request.method().as_str();
        // The path only: the HTTP API's query holds the caller's token.
        let path = request.uri().path();
        let route = HTTP_ROUTES.iter().find(|r| **r == path).copied();
        let span = tracing::info_span!(
            target: TARGET,
            "http server",
            otel.name = match route {
                Some(route) => format!("{method} {route}"),
                None => method.to_owned(),
            },
            otel.kind = "server",
            otel.status_code = Empty,
            http.request.method = method,
            url.path = path,
            http.route = route,
            http.response.status_code = Empty,
            piclumen.request_id = request_id(request.headers()),
            piclumen.mark_id = Empty,
            piclumen.caller = Empty,
        );
        let _ = span.set_parent(propagation::extract(request.headers()));
        let inner = span.in_scope(|| self.inner.call(request));
        HttpFuture {
            inner: Instrumented::some(inner, span.clone()),
            span: Some(span),
        }
    }
}

pin_project! {
    /// The response of a traced HTTP request.
    #[derive(Debug)]
    pub struct HttpFuture<F> {
        #[pin]
        inner: Instrumented<F>,
        span: Option<Span>,
    }
}

impl<F, RB, E> Future for HttpFuture<F>
where
    F: Future<Output = Result<Response<RB>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = ready!(this.inner.poll(cx));
        if let (Some(span), Ok(response)) = (this.span.take(), &response) {
            let status = response.status().as_u16();
            span.record("http.response.status_code", i64::from(status));
            if status >= 500 {
                span.record("otel.status_code", "ERROR");
            }
        }
        Poll::Ready(response)
    }
}
