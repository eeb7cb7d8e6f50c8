//! `x-request-id`: taken from the caller (or generated when absent or
//! unusable), echoed in the response headers of unary calls and streams
//! alike, and recorded on the call's tracing span so every log line of the
//! call carries it.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll, ready},
    time::Instant,
};

use futures_util::Stream;
use pin_project_lite::pin_project;
use tonic::codegen::http::{HeaderValue, Request, Response};
use tower::{Layer, Service};
use tracing::{Instrument, Span, debug, info_span, instrument::Instrumented};

/// The metadata key.
pub const HEADER: &str = "x-request-id";
/// Longest caller-chosen id kept; longer ones are replaced.
const MAX_LEN: usize = 128;

/// Adds [`RequestId`] around every service of the server.
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestIdLayer;

impl<S> Layer<S> for RequestIdLayer {
    type Service = RequestId<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequestId { inner }
    }
}

/// See the module docs.
#[derive(Debug, Clone)]
pub struct RequestId<S> {
    inner: S,
}

impl<S, B, RB> Service<Request<B>> for RequestId<S>
where
    S: Service<Request<B>, Response = Response<RB>>,
{
    type Response = Response<RB>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let id = request
            .headers()
            .get(HEADER)
            .filter(|v| usable(v.as_bytes()))
            .cloned()
            .unwrap_or_else(generate);
        request.headers_mut().insert(HEADER, id.clone());
        let span = info_span!(
            "call",
            request_id = id.to_str().unwrap_or_default(),
            method = request.uri().path(),
            // A named caller's name, once admitted (`callers`).
            caller = tracing::field::Empty,
        );
        let response = span.in_scope(|| self.inner.call(request));
        ResponseFuture {
            inner: response.instrument(span),
            id: Some(id),
            started: Instant::now(),
        }
    }
}

pin_project! {
    /// [`RequestId`]'s future: the call inside its span; its response gets
    /// the id. A named type rather than a boxed one: this runs on every call.
    pub struct ResponseFuture<F> {
        #[pin]
        inner: Instrumented<F>,
        id: Option<HeaderValue>,
        started: Instant,
    }
}

impl<F, RB, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<RB>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let mut response = ready!(this.inner.as_mut().poll(cx))?;
        if let Some(mut id) = this.id.take() {
            // Unique per call: never worth a slot in the connection's HPACK
            // table. Indexed, each id evicted an older entry and made the
            // encoder compare against every id still held (about 50).
            id.set_sensitive(true);
            response.headers_mut().insert(HEADER, id);
        }
        debug!(
            parent: this.inner.span(),
            elapsed_ms = this.started.elapsed().as_millis() as u64,
            "call answered"
        );
        Poll::Ready(Ok(response))
    }
}

fn usable(id: &[u8]) -> bool {
    !id.is_empty() && id.len() <= MAX_LEN && id.iter().all(u8::is_ascii_graphic)
}

/// 32 random hex digits, written on the stack: this runs on every call.
fn generate() -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut n = rand::random::<u128>();
    let mut out = [0u8; 32];
    for byte in out.iter_mut().rev() {
        *byte = HEX[(n & 0xf) as usize];
        n >>= 4;
    }
    HeaderValue::from_bytes(&out).unwrap_or_else(|_| HeaderValue::from_static("unknown"))
}

/// A stream polled inside a span, so the lines a WatchImage stream logs
/// long after its handler returned still carry the call's request id.
#[derive(Debug)]
pub struct InSpan<S> {
    span: Span,
    inner: Pin<Box<S>>,
}

impl<S> InSpan<S> {
    /// Polls `inner` within the current span.
    pub fn current(inner: S) -> Self {
        Self {
            span: Span::current(),
            inner: Box::pin(inner),
        }
    }
}

impl<S: Stream> Stream for InSpan<S> {
    type Item = S::Item;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        let _entered = this.span.enter();
        this.inner.as_mut().poll_next(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn answered(request: Request<()>) -> Response<()> {
        let service = tower::service_fn(|_: Request<()>| async { Ok::<_, ()>(Response::new(())) });
        let mut service = RequestIdLayer.layer(service);
        service
            .call(request)
            .await
            .expect("the inner service answers")
    }

    #[tokio::test]
    async fn the_echoed_id_is_kept_out_of_hpack_tables() {
        let mut request = Request::new(());
        request
            .headers_mut()
            .insert(HEADER, HeaderValue::from_static("req-4715"));
        let response = answered(request).await;
        let id = response.headers().get(HEADER).expect("echoed");
        assert_eq!(id, "req-4715");
        assert!(
            id.is_sensitive(),
            "h2 encodes sensitive values never-indexed"
        );
    }

    #[tokio::test]
    async fn a_generated_id_is_kept_out_of_hpack_tables() {
        let response = answered(Request::new(())).await;
        let id = response.headers().get(HEADER).expect("generated");
        assert_eq!(id.len(), 32);
        assert!(id.is_sensitive());
    }
}
