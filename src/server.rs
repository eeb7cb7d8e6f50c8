//! Wires the gRPC server: ImageService, health, reflection (v1 and v1alpha),
//! HTTP/2 settings, per-RPC metrics, gRPC-Web (HTTP/1.1 and HTTP/2) with
//! CORS for the allowed browser origins, and a shutdown that drains within a
//! bound.

mod connection_age;

use std::{
    future::Future,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use futures_util::{StreamExt, future::Either};
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::sync::CancellationToken;
use tonic::{
    codegen::http::{HeaderName, HeaderValue, Method, Request, Response, header::ORIGIN},
    transport::{Server, ServerTlsConfig, server::TcpIncoming},
};
use tonic_health::ServingStatus;
use tower::{Layer, Service};
use tower_http::cors::{AllowOrigin, CorsLayer};
use tracing::{info, warn};

use crate::{
    grpc_metrics::GrpcMetricsLayer,
    hub::{FleetPolling, Hub, HubConfig},
    idempotency::StoreLocation,
    pb::{self, image_service_server::ImageServiceServer},
    request_id::RequestIdLayer,
    service::{Core, ImageServiceImpl, ServiceConfig},
    upstream::Client,
};

/// Everything `run` needs besides the listener.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The service's own settings.
    pub service: ServiceConfig,
    /// Polling hub settings.
    pub hub: HubConfig,
    /// Whether replicas sharing a Redis store share polling too.
    pub fleet_polling: FleetPolling,
    /// Longest wait for in-flight calls at shutdown.
    pub drain_timeout: Duration,
    /// Most concurrent streams (calls) one HTTP/2 connection may open.
    pub max_streams_per_connection: u32,
    /// Largest request message, in bytes.
    pub max_request_bytes: usize,
    /// HTTP/2 ping interval.
    pub http2_keepalive_interval: Duration,
    /// HTTP/2 ping timeout.
    pub http2_keepalive_timeout: Duration,
    /// TLS (and mutual TLS) settings; plaintext when `None`.
    pub tls: Option<ServerTlsConfig>,
    /// Browser origins allowed to call over gRPC-Web (`https://app.example`,
    /// or `*` for any); empty: no browser origin is allowed.
    pub cors_allow_origins: Vec<String>,
    /// Age (before jitter) at which a connection is asked to go (GOAWAY).
    pub max_connection_age: Duration,
    /// How long calls still open at that age may go on before it is closed.
    pub max_connection_age_grace: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            service: ServiceConfig::default(),
            hub: HubConfig::default(),
            fleet_polling: FleetPolling::default(),
            drain_timeout: defaults::DRAIN_TIMEOUT,
            max_streams_per_connection: defaults::MAX_STREAMS_PER_CONNECTION,
            max_request_bytes: defaults::MAX_REQUEST_BYTES,
            http2_keepalive_interval: defaults::HTTP2_KEEPALIVE_INTERVAL,
            http2_keepalive_timeout: defaults::HTTP2_KEEPALIVE_TIMEOUT,
            tls: None,
            cors_allow_origins: Vec::new(),
            max_connection_age: defaults::MAX_CONNECTION_AGE,
            max_connection_age_grace: defaults::MAX_CONNECTION_AGE_GRACE,
        }
    }
}

/// The server's defaults (the `serve` flags read these).
pub mod defaults {
    use std::time::Duration;

    /// Port used when neither `--listen` nor `PORT` is given.
    pub const PORT: u16 = 50051;
    /// `--drain-timeout`.
    pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
    /// `--max-request-bytes`.
    pub const MAX_REQUEST_BYTES: usize = 1024 * 1024;
    /// `--http2-keepalive-interval`.
    pub const HTTP2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
    /// `--http2-keepalive-timeout`.
    pub const HTTP2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
    /// `--max-streams-per-connection`.
    pub const MAX_STREAMS_PER_CONNECTION: u32 = 1024;
    /// `--max-connection-age`: long enough to cost nothing (one reconnect
    /// per client every few minutes), short enough that a replica the
    /// autoscaler adds gets its share of calls within minutes.
    pub const MAX_CONNECTION_AGE: Duration = Duration::from_secs(5 * 60);
    /// Shortest `--max-connection-age`.
    pub const MIN_CONNECTION_AGE: Duration = Duration::from_secs(1);
    /// `--max-connection-age-grace`: unary calls end well within it; a
    /// watch still open is cut and re-issued by its caller.
    pub const MAX_CONNECTION_AGE_GRACE: Duration = Duration::from_secs(30);
}

/// Why the server stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The transport failed.
    #[error("gRPC transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// Reflection could not load our descriptors (a build bug).
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The metrics layer could not read our descriptors (a build bug).
    #[error("metrics: {0}")]
    Descriptors(#[from] prost::DecodeError),
    /// A `--cors-allow-origin` value is not an origin.
    #[error(
        "--cors-allow-origin {0:?} is not an origin: expected `*` or scheme://host[:port], without a path"
    )]
    CorsOrigin(String),
    /// The HTTP listener of the first version's API failed.
    #[error("HTTP API: {0}")]
    Http(#[from] std::io::Error),
}

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
/// with the gRPC-Web request headers. With no origin listed, preflights get
/// no `access-control-allow-origin`, so browsers refuse every cross-origin
/// call; non-browser clients are not affected either way.
pub fn cors_layer(origins: &[String]) -> Result<CorsLayer, ServerError> {
    let allow_origin = if origins.iter().any(|o| o.trim() == "*") {
        AllowOrigin::any()
    } else {
        let list = origins
            .iter()
            .map(|origin| {
                // Browsers send the scheme and host in lower case.
                let normalized = origin.trim().to_ascii_lowercase();
                if !is_origin(&normalized) {
                    return Err(ServerError::CorsOrigin(origin.clone()));
                }
                HeaderValue::from_str(&normalized)
                    .map_err(|_| ServerError::CorsOrigin(origin.clone()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        AllowOrigin::list(list)
    };
    Ok(CorsLayer::new()
        .allow_origin(allow_origin)
        .allow_methods([Method::POST])
        .allow_headers(CORS_ALLOW_HEADERS.map(HeaderName::from_static))
        .expose_headers(CORS_EXPOSE_HEADERS.map(HeaderName::from_static))
        .max_age(CORS_MAX_AGE))
}

/// Applies a CORS layer only to requests with an `origin` header (browsers);
/// gRPC calls from other clients skip it, so they pay nothing for it and get
/// no `vary` or `access-control-*` headers.
#[derive(Debug, Clone)]
struct BrowserCorsLayer(CorsLayer);

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
struct BrowserCors<S> {
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

/// Serves on `listener` until `shutdown` resolves, then drains: health turns
/// NOT_SERVING, new calls are refused, open watches end with UNAVAILABLE,
/// unary calls in flight finish, and after `drain_timeout` the remaining
/// connections are dropped.
pub async fn run(
    config: ServerConfig,
    client: Client,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    run_with_http(config, client, listener, None, shutdown).await
}

/// [`run`], also serving the first version's HTTP API (`crate::http_api`)
/// on `http_listener` when given, with the same service instance (hub,
/// idempotency store, limits). It stops accepting and drains with gRPC.
pub async fn run_with_http(
    config: ServerConfig,
    client: Client,
    listener: TcpListener,
    http_listener: Option<TcpListener>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    let draining = CancellationToken::new();
    let fleet = match &config.service.idempotency_store {
        StoreLocation::Redis(url) if config.fleet_polling == FleetPolling::On => Some(url.as_str()),
        _ => None,
    };
    let upstream: Arc<dyn crate::upstream::Upstream> = Arc::new(client);
    let hub = Hub::for_store(config.hub.clone(), Arc::new(upstream.clone()), fleet);
    let core = Core::new(config.service.clone(), upstream, hub, draining.clone());
    let service = ImageServiceImpl::new(core);
    let service_for_http = service.core();
    let creates = service.core().creates();

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_service_status("", ServingStatus::Serving).await;
    health
        .set_serving::<ImageServiceServer<ImageServiceImpl>>()
        .await;

    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            // google.rpc error details, so grpcurl can print ErrorInfo & co.
            .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;

    // Handles are taken here, after `main` installed the metrics recorder.
    let metrics = GrpcMetricsLayer::new(&[
        pb::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
    ])?;
    let cors = BrowserCorsLayer(cors_layer(&config.cors_allow_origins)?);

    let stop_accepting = CancellationToken::new();
    let connection_age = connection_age::jittered(config.max_connection_age, rand::random());
    info!(?connection_age, grace = ?config.max_connection_age_grace, "connections age out");
    let mut builder = Server::builder();
    if let Some(tls) = config.tls.clone() {
        builder = builder.tls_config(tls)?;
    }
    let router = builder
        // gRPC-Web from browsers arrives over HTTP/1.1 as well as HTTP/2.
        .accept_http1(true)
        // Outermost first. CORS (for requests with an `origin`) answers
        // preflights itself; the gRPC-Web layer turns gRPC-Web into gRPC, so
        // metrics and the request id below it see every call as plain gRPC,
        // with trailers.
        .layer(cors)
        .layer(tonic_web::GrpcWebLayer::new())
        .layer(metrics)
        .layer(RequestIdLayer)
        .layer(crate::otel::GrpcTraceLayer)
        .max_concurrent_streams(Some(config.max_streams_per_connection))
        // Pings keep long WatchImage streams alive through proxies and find
        // dead peers.
        .http2_keepalive_interval(Some(config.http2_keepalive_interval))
        .http2_keepalive_timeout(Some(config.http2_keepalive_timeout))
        .max_connection_age(connection_age)
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(
            ImageServiceServer::new(service).max_decoding_message_size(config.max_request_bytes),
        );
    // Our own listener means the builder's tcp_nodelay does not apply:
    // set it here, or small replies wait on delayed ACKs (~40 ms).
    let incoming = TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(Duration::from_secs(60)));
    let lifetime = connection_age + config.max_connection_age_grace;
    let incoming = incoming.map(move |io| io.map(|io| connection_age::Aged::new(io, lifetime)));
    let serve =
        router.serve_with_incoming_shutdown(incoming, stop_accepting.clone().cancelled_owned());
    let mut server = tokio::spawn(serve);
    let mut http = http_listener.map(|http_listener| {
        tokio::spawn(crate::http_api::serve(
            http_listener,
            service_for_http,
            config.max_request_bytes,
            stop_accepting.clone().cancelled_owned(),
        ))
    });
    let gauges = tokio::spawn(runtime_gauges());

    tokio::select! {
        result = &mut server => {
            gauges.abort();
            if let Some(http) = &http {
                http.abort();
            }
            return flatten(result);
        }
        result = wait_http(&mut http) => {
            gauges.abort();
            server.abort();
            return flatten_http(result);
        }
        () = shutdown => gauges.abort(),
    }
    info!(drain_timeout = ?config.drain_timeout, "shutting down: draining");
    health
        .set_service_status("", ServingStatus::NotServing)
        .await;
    health
        .set_not_serving::<ImageServiceServer<ImageServiceImpl>>()
        .await;
    draining.cancel();
    stop_accepting.cancel();
    let drained = async {
        let connections = async {
            let grpc = flatten((&mut server).await);
            let http = match http.as_mut() {
                Some(task) => flatten_http(task.await),
                None => Ok(()),
            };
            grpc.and(http)
        };
        // Creates in flight are paid for: wait for each to end and its
        // outcome to be recorded, caller or not.
        info!(creates = creates.count(), "waiting for creates in flight");
        tokio::join!(connections, creates.idle()).0
    };
    let result = match tokio::time::timeout(config.drain_timeout, drained).await {
        Ok(result) => {
            info!("drained");
            result
        }
        Err(_) => {
            warn!(
                creates = creates.count(),
                "drain timeout reached; closing the remaining connections and creates"
            );
            server.abort();
            if let Some(http) = &http {
                http.abort();
            }
            Ok(())
        }
    };
    // Spans still queued go out before exit, within the same bound.
    crate::otel::shutdown(config.drain_timeout).await;
    result
}

/// The HTTP API's end, or never when it is off.
async fn wait_http(
    http: &mut Option<JoinHandle<std::io::Result<()>>>,
) -> Result<std::io::Result<()>, tokio::task::JoinError> {
    match http {
        Some(task) => task.await,
        None => std::future::pending().await,
    }
}

fn flatten_http(
    result: Result<std::io::Result<()>, tokio::task::JoinError>,
) -> Result<(), ServerError> {
    match result {
        Ok(inner) => Ok(inner?),
        Err(e) if e.is_cancelled() => Ok(()),
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

/// Publishes the runtime's live task count, so leaks show on a dashboard.
async fn runtime_gauges() {
    let handle = tokio::runtime::Handle::current();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        metrics::gauge!("piclumen_runtime_alive_tasks")
            .set(handle.metrics().num_alive_tasks() as f64);
    }
}

fn flatten(
    result: Result<Result<(), tonic::transport::Error>, tokio::task::JoinError>,
) -> Result<(), ServerError> {
    match result {
        Ok(inner) => Ok(inner?),
        Err(e) if e.is_cancelled() => Ok(()),
        // A panic in the server task is a bug: surface it.
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cors_origins_are_checked_at_startup() {
        let ok = |o: &[&str]| cors_layer(&o.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>());
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
