//! CORS for gRPC-Web: the policy built once from `--cors-allow-origin`
//! ([`CorsPolicy`], checked by `config` before anything listens), and the
//! layer applying it to browser requests only.

use std::{
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use futures_util::future::Either;
use tonic::codegen::http::{HeaderName, HeaderValue, Method, Request, Response, header::ORIGIN};
use tower::{Layer, Service};
use tower_http::cors::{AllowOrigin, CorsLayer};

use super::ServerError;

/// Request headers browsers may send on a gRPC-Web call: those of gRPC-Web
/// and Connect clients, ours (`authorization`, `x-api-key`,
/// `x-request-id`), and W3C trace context.
const CORS_ALLOW_HEADERS: [&str; 13] = [
    "content-type",
    "x-grpc-web",
    "x-user-agent",
    "grpc-timeout",
    "grpc-accept-encoding",
    "grpc-encoding",
    "connect-protocol-version",
    "connect-timeout-ms",
    "authorization",
    "x-api-key",
    crate::request_id::HEADER,
    "traceparent",
    "tracestate",
];

/// Response headers a browser script may read: the status and its details
/// (gRPC-Web sends them as headers on trailers-only responses) and the
/// request id.
const CORS_EXPOSE_HEADERS: [&str; 4] = [
    "grpc-status",
    "grpc-message",
    "grpc-status-details-bin",
    crate::request_id::HEADER,
];

/// How long a browser may cache a preflight answer (Chromium caps it at 2 h).
const CORS_MAX_AGE: Duration = Duration::from_secs(2 * 60 * 60);

/// The CORS policy for gRPC-Web: `POST` from the listed origins (`*`: any)
/// with the gRPC-Web request headers. With no origin listed (the default),
/// preflights get no `access-control-allow-origin`, so browsers refuse every
/// cross-origin call; non-browser clients are not affected either way.
#[derive(Debug, Clone)]
pub struct CorsPolicy(CorsLayer);

impl CorsPolicy {
    /// The policy allowing `origins` (`https://app.example`, or `*` for
    /// any); fails on the first value that is not an origin.
    pub fn new<S: AsRef<str>>(origins: &[S]) -> Result<Self, ServerError> {
        let origins: Vec<&str> = origins.iter().map(AsRef::as_ref).collect();
        if origins.iter().any(|o| o.trim() == "*") {
            return Ok(Self::allowing(AllowOrigin::any()));
        }
        let list = origins
            .iter()
            .map(|&origin| {
                // Browsers send the scheme and host in lower case.
                let normalized = origin.trim().to_ascii_lowercase();
                let refused = || ServerError::CorsOrigin(origin.to_owned());
                if !is_origin(&normalized) {
                    return Err(refused());
                }
                HeaderValue::from_str(&normalized).map_err(|_| refused())
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self::allowing(AllowOrigin::list(list)))
    }

    fn allowing(allow_origin: AllowOrigin) -> Self {
        Self(
            CorsLayer::new()
                .allow_origin(allow_origin)
                .allow_methods([Method::POST])
                .allow_headers(CORS_ALLOW_HEADERS.map(HeaderName::from_static))
                .expose_headers(CORS_EXPOSE_HEADERS.map(HeaderName::from_static))
                .max_age(CORS_MAX_AGE),
        )
    }

    /// The layer applying this policy to browser requests.
    pub(super) fn layer(&self) -> BrowserCorsLayer {
        BrowserCorsLayer(self.0.clone())
    }
}

impl Default for CorsPolicy {
    /// No browser origin allowed.
    fn default() -> Self {
        Self::allowing(AllowOrigin::list([]))
    }
}

/// Applies a CORS layer only to requests with an `origin` header (browsers);
/// gRPC calls from other clients skip it, so they pay nothing for it and get
/// no `vary` or `access-control-*` headers.
#[derive(Debug, Clone)]
pub(super) struct BrowserCorsLayer(CorsLayer);

impl<S> Layer<S> for BrowserCorsLayer {
    type Service = BrowserCors<S>;

    fn layer(&self, inner: S) -> Self::Service {
        BrowserCors {
            cors: Arc::new(self.0.clone()),
            inner,
        }
    }
}

/// See [`BrowserCorsLayer`]. The server clones its service stack for every
/// request, so the policy sits behind an `Arc`: a clone of the policy
/// itself allocates, and only browser calls need one.
#[derive(Debug, Clone)]
pub(super) struct BrowserCors<S> {
    cors: Arc<CorsLayer>,
    inner: S,
}

impl<S, B, RB> Service<Request<B>> for BrowserCors<S>
where
    S: Service<Request<B>, Response = Response<RB>> + Clone,
    RB: Default,
{
    type Response = Response<RB>;
    type Error = S::Error;
    type Future = Either<tower_http::cors::ResponseFuture<S::Future>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        if request.headers().contains_key(ORIGIN) {
            // The service polled ready goes to the call; its clone stays.
            let clone = self.inner.clone();
            let ready = std::mem::replace(&mut self.inner, clone);
            Either::Left(self.cors.layer(ready).call(request))
        } else {
            Either::Right(self.inner.call(request))
        }
    }
}

/// `scheme://host[:port]` with nothing after: what browsers send in `origin`.
fn is_origin(origin: &str) -> bool {
    origin.split_once("://").is_some_and(|(scheme, authority)| {
        !scheme.is_empty()
            && scheme
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'-' || b == b'.')
            && !authority.is_empty()
            && !authority.contains(['/', '?', '#', '@', ' '])
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cors_origins_are_checked_at_startup() {
        let ok = |o: &[&str]| CorsPolicy::new(o);
        assert!(ok(&[]).is_ok());
        assert!(ok(&["*"]).is_ok());
        assert!(ok(&["https://app.example.com", " http://Localhost:5173"]).is_ok());
        for bad in [
            "app.example.com",
            "https://app.example.com/",
            "https://app.example.com/path",
            "https://",
            "://host",
        ] {
            assert!(
                matches!(ok(&[bad]), Err(ServerError::CorsOrigin(o)) if o == bad),
                "{bad} accepted"
            );
        }
    }
}
