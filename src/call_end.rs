//! How a gRPC call ended, as a tower layer around the server's routes sees
//! it: the `grpc-status` of a trailers-only response's headers or of the
//! body's trailers; `Unknown` for a response that failed or ended without a
//! status; `Cancelled` for one dropped before its status (the caller went
//! away). The per-RPC metrics and the SERVER spans both learn a call's end
//! here, so the two can never disagree on it.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tonic::codegen::http::{HeaderMap, Response};

/// gRPC's CANCELLED.
pub const CANCELLED: u8 = 1;
/// gRPC's UNKNOWN.
pub const UNKNOWN: u8 = 2;
/// Codes run from OK (0) to UNAUTHENTICATED (16).
const CODES: u8 = 17;

/// What wants to know how a call ends.
pub trait Observer {
    /// Each data frame of the response body, in order.
    fn data(&mut self, _data: &Bytes) {}
    /// The call's gRPC code; called once.
    fn end(self, code: u8);
}

/// The code in `grpc-status`, if present; out-of-range values count as
/// `Unknown`, as grpc-go treats them.
pub fn status_code(headers: &HeaderMap) -> Option<u8> {
    let value = headers.get("grpc-status")?;
    let code = std::str::from_utf8(value.as_bytes())
        .ok()
        .and_then(|s| s.parse::<u8>().ok())
        .filter(|&c| c < CODES)
        .unwrap_or(UNKNOWN);
    Some(code)
}

/// An observer until its call's end is seen; dropped before that, the call
/// was cancelled.
#[derive(Debug)]
struct Pending<O: Observer>(Option<O>);

impl<O: Observer> Pending<O> {
    fn end(&mut self, code: u8) {
        if let Some(observer) = self.0.take() {
            observer.end(code);
        }
    }
}

impl<O: Observer> Drop for Pending<O> {
    fn drop(&mut self) {
        self.end(CANCELLED);
    }
}

pin_project! {
    /// A response future whose call `O` observes; with no observer the
    /// response passes through untouched.
    #[derive(Debug)]
    pub struct Observed<F, O: Observer> {
        #[pin]
        inner: F,
        pending: Pending<O>,
    }
}

impl<F, O: Observer> Observed<F, O> {
    /// Watches the call answered by `inner`; `None` watches nothing.
    pub fn new(inner: F, observer: Option<O>) -> Self {
        Self {
            inner,
            pending: Pending(observer),
        }
    }
}

impl<F, O, RB, E> Future for Observed<F, O>
where
    F: Future<Output = Result<Response<RB>, E>>,
    O: Observer,
{
    type Output = Result<Response<ObservedBody<RB, O>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx));
        let mut pending = Pending(this.pending.0.take());
        if pending.0.is_none() {
            // Nothing observes this call: no status to look for.
            return Poll::Ready(result.map(|r| r.map(|inner| ObservedBody { inner, pending })));
        }
        let response = match result {
            Ok(response) => response,
            Err(e) => {
                pending.end(UNKNOWN);
                return Poll::Ready(Err(e));
            }
        };
        // Trailers-only response (every error a handler returns): the
        // status is final now.
        if let Some(code) = status_code(response.headers()) {
            pending.end(code);
        }
        Poll::Ready(Ok(response.map(|inner| ObservedBody { inner, pending })))
    }
}

pin_project! {
    /// A response body that shows its data to the observer and ends the
    /// call when its trailers pass, it ends, or it is dropped.
    #[derive(Debug)]
    pub struct ObservedBody<B, O: Observer> {
        #[pin]
        inner: B,
        pending: Pending<O>,
    }
}

impl<B, O> Body for ObservedBody<B, O>
where
    B: Body<Data = Bytes>,
    O: Observer,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        if this.pending.0.is_none() {
            return Poll::Ready(frame);
        }
        match &frame {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    if let Some(observer) = &mut this.pending.0 {
                        observer.data(data);
                    }
                } else if let Some(trailers) = frame.trailers_ref() {
                    this.pending.end(status_code(trailers).unwrap_or(UNKNOWN));
                }
            }
            // A failed body, or one that ended without a status.
            Some(Err(_)) | None => this.pending.end(UNKNOWN),
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::{
        collections::VecDeque,
        convert::Infallible,
        sync::{Arc, Mutex},
    };

    use super::*;

    #[derive(Clone, Default)]
    struct Seen(Arc<Mutex<(Vec<usize>, Vec<u8>)>>);

    impl Observer for Seen {
        fn data(&mut self, data: &Bytes) {
            self.0.lock().expect("seen").0.push(data.len());
        }
        fn end(self, code: u8) {
            self.0.lock().expect("seen").1.push(code);
        }
    }

    impl Seen {
        fn get(&self) -> (Vec<usize>, Vec<u8>) {
            self.0.lock().expect("seen").clone()
        }
    }

    /// A body of the given frames.
    struct Frames(VecDeque<Frame<Bytes>>);

    impl Body for Frames {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            Poll::Ready(self.0.pop_front().map(Ok))
        }
    }

    fn respond(
        headers: HeaderMap,
        frames: Vec<Frame<Bytes>>,
        seen: &Seen,
    ) -> Observed<std::future::Ready<Result<Response<Frames>, ()>>, Seen> {
        let mut response = Response::new(Frames(frames.into()));
        *response.headers_mut() = headers;
        Observed::new(std::future::ready(Ok(response)), Some(seen.clone()))
    }

    async fn read_all<B: Body + Unpin>(mut body: B) {
        while std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx))
            .await
            .is_some()
        {}
    }

    fn status(code: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert("grpc-status", code.parse().expect("ascii"));
        headers
    }

    #[test]
    fn codes_come_from_grpc_status() {
        assert_eq!(status_code(&HeaderMap::new()), None);
        assert_eq!(status_code(&status("5")), Some(5));
        assert_eq!(status_code(&status("16")), Some(16));
        assert_eq!(status_code(&status("17")), Some(UNKNOWN));
        assert_eq!(status_code(&status("x")), Some(UNKNOWN));
    }

    #[tokio::test]
    async fn a_trailers_only_response_ends_at_once_and_once() {
        let seen = Seen::default();
        let response = respond(status("3"), vec![], &seen).await.expect("response");
        assert_eq!(seen.get().1, vec![3]);
        read_all(response.into_body()).await;
        assert_eq!(seen.get().1, vec![3]);
    }

    #[tokio::test]
    async fn the_trailers_end_a_streamed_response_after_its_data() {
        let seen = Seen::default();
        let frames = vec![
            Frame::data(Bytes::from_static(b"abc")),
            Frame::data(Bytes::from_static(b"de")),
            Frame::trailers(status("0")),
        ];
        let response = respond(HeaderMap::new(), frames, &seen)
            .await
            .expect("response");
        assert_eq!(seen.get(), (vec![], vec![]));
        read_all(response.into_body()).await;
        assert_eq!(seen.get(), (vec![3, 2], vec![0]));
    }

    #[tokio::test]
    async fn no_status_is_unknown_and_a_dropped_call_cancelled() {
        let ended = Seen::default();
        let response = respond(HeaderMap::new(), vec![], &ended)
            .await
            .expect("response");
        read_all(response.into_body()).await;
        assert_eq!(ended.get().1, vec![UNKNOWN]);

        let dropped = Seen::default();
        drop(respond(HeaderMap::new(), vec![], &dropped));
        assert_eq!(dropped.get().1, vec![CANCELLED]);

        let unread = Seen::default();
        drop(respond(HeaderMap::new(), vec![], &unread).await);
        assert_eq!(unread.get().1, vec![CANCELLED]);

        let failed = Seen::default();
        let ready = std::future::ready(Err::<Response<Frames>, ()>(()));
        assert!(Observed::new(ready, Some(failed.clone())).await.is_err());
        assert_eq!(failed.get().1, vec![UNKNOWN]);
    }

    #[tokio::test]
    async fn without_an_observer_the_response_passes_through() {
        let frames = vec![
            Frame::data(Bytes::from_static(b"abc")),
            Frame::trailers(status("0")),
        ];
        let mut response = Response::new(Frames(frames.into()));
        *response.headers_mut() = status("7");
        let ready = std::future::ready(Ok::<_, ()>(response));
        let response = Observed::<_, Seen>::new(ready, None)
            .await
            .expect("response");
        assert_eq!(status_code(response.headers()), Some(7));
        let mut body = response.into_body();
        let mut seen = Vec::new();
        while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await
        {
            let frame = frame.expect("infallible");
            match frame.into_data() {
                Ok(data) => seen.push(format!("data {}", data.len())),
                Err(frame) => seen.push(format!(
                    "trailers {:?}",
                    frame.into_trailers().ok().as_ref().and_then(status_code)
                )),
            }
        }
        assert_eq!(seen, ["data 3", "trailers Some(0)"]);
    }
}
