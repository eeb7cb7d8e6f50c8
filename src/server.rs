//! Wires the gRPC server: ImageService, health, reflection (v1 and v1alpha),
//! HTTP/2 settings, per-RPC metrics, gRPC-Web (HTTP/1.1 and HTTP/2) with
//! CORS for the allowed browser origins (`cors`), and a shutdown that
//! drains within a bound. [`ServerConfig`] declares the server's `serve`
//! flags and flattens those of the service, the hub and the idempotency
//! store.

mod connection_age;
mod cors;

use std::{future::Future, str::FromStr, sync::Arc, time::Duration};

use clap::Args;
use futures_util::{Stream, StreamExt};
use tokio::{
    net::{TcpListener, TcpStream},
    task::JoinHandle,
};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Server, ServerTlsConfig, server::TcpIncoming};
use tonic_health::{ServingStatus, server::HealthReporter};
use tracing::{info, warn};

pub use cors::CorsPolicy;

use crate::{
    flags::{duration_at_least, duration_or_zero, no_flags, positive, positive_duration},
    grpc_metrics::GrpcMetricsLayer,
    hub::{FleetPolling, Hub, HubConfig},
    idempotency::{CreatesInFlight, IdempotencyConfig, StoreLocation},
    pb::{self, image_service_server::ImageServiceServer},
    request_id::RequestIdLayer,
    service::{Core, ImageServiceImpl, ServiceConfig},
    upstream::{Client, Upstream},
};

/// Everything `run` needs besides the listener: the server's own `serve`
/// flags, declared here, and the flattened settings of what it wires.
#[derive(Debug, Clone, Args)]
pub struct ServerConfig {
    /// The service's own settings.
    #[command(flatten)]
    pub service: ServiceConfig,
    /// Polling hub settings.
    #[command(flatten)]
    pub hub: HubConfig,
    /// The `request_id` store's settings; the server opens it.
    #[command(flatten)]
    pub idempotency: IdempotencyConfig,
    /// With a Redis store: replicas share polling, one status call per
    /// token and round for the whole fleet (`on` or `off`).
    #[arg(long, env = "PICLUMEN_FLEET_POLLING", default_value = "on", value_parser = FleetPolling::from_str)]
    pub fleet_polling: FleetPolling,
    /// On SIGTERM/SIGINT, how long in-flight calls may take before the
    /// process exits anyway.
    #[arg(long, env = "PICLUMEN_DRAIN_TIMEOUT", default_value = "10s", value_parser = positive_duration)]
    pub drain_timeout: Duration,
    /// Most concurrent calls (HTTP/2 streams) on one client connection.
    #[arg(long, env = "PICLUMEN_MAX_STREAMS_PER_CONNECTION", default_value = "1024", value_parser = positive::<u32>)]
    pub max_streams_per_connection: u32,
    /// Largest request message accepted, in bytes.
    #[arg(long, env = "PICLUMEN_MAX_REQUEST_BYTES", default_value = "1048576", value_parser = positive::<usize>)]
    pub max_request_bytes: usize,
    /// HTTP/2 ping interval on idle connections (keeps long watches alive
    /// through load balancers, finds dead peers).
    #[arg(long, env = "PICLUMEN_HTTP2_KEEPALIVE_INTERVAL", default_value = "30s", value_parser = positive_duration)]
    pub http2_keepalive_interval: Duration,
    /// How long a ping may go unanswered before the connection is closed.
    #[arg(long, env = "PICLUMEN_HTTP2_KEEPALIVE_TIMEOUT", default_value = "10s", value_parser = positive_duration)]
    pub http2_keepalive_timeout: Duration,
    /// TLS (and mutual TLS) settings; plaintext when `None` (built by
    /// `config` from `--tls-cert`, `--tls-key`, `--tls-client-ca`).
    #[arg(skip)]
    pub tls: Option<ServerTlsConfig>,
    /// Which browser origins may call over gRPC-Web (built and checked by
    /// `config` from `--cors-allow-origin`); none by default.
    #[arg(skip)]
    pub cors: CorsPolicy,
    /// Age at which a client connection is asked to reconnect (HTTP/2
    /// GOAWAY; each replica moves it by up to 10% either way), so calls
    /// spread over replicas added since (at least 1s).
    // 5m: long enough to cost nothing (one reconnect per client every few
    // minutes), short enough that a replica the autoscaler adds gets its
    // share of calls within minutes.
    #[arg(long, env = "PICLUMEN_MAX_CONNECTION_AGE", default_value = "5m", value_parser = duration_at_least(defaults::MIN_CONNECTION_AGE))]
    pub max_connection_age: Duration,
    /// After --max-connection-age, how long calls still open on the
    /// connection may go on before it is closed; gRPC CheckImage waits end
    /// a second before it.
    // 70s: a CheckImage waiting the longest default --max-check-wait (60s)
    // still answers; a watch still open is cut and re-issued by its caller.
    #[arg(long, env = "PICLUMEN_MAX_CONNECTION_AGE_GRACE", default_value = "70s", value_parser = duration_or_zero)]
    pub max_connection_age_grace: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        no_flags()
    }
}

/// The server's defaults that are not on [`ServerConfig`]'s fields, and its
/// bounds.
pub mod defaults {
    use std::time::Duration;

    /// Port used when neither `--listen` nor `PORT` is given.
    pub const PORT: u16 = 50051;
    /// Shortest `--max-connection-age`.
    pub const MIN_CONNECTION_AGE: Duration = Duration::from_secs(1);
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
    let service = service(&config, client, draining.clone());
    let creates = service.core().creates();
    let stop_accepting = CancellationToken::new();
    let (health, mut running) =
        serve(&config, service, listener, http_listener, &stop_accepting).await?;
    let stopped_early = tokio::select! {
        result = running.until_one_ends() => Some(result),
        () = shutdown => None,
    };
    running.gauges.abort();
    if let Some(result) = stopped_early {
        return result;
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
    let result = running.drain(config.drain_timeout, &creates).await;
    // Spans still queued go out before exit, within the same bound.
    crate::otel::shutdown(config.drain_timeout).await;
    result
}

/// The service both front ends share: the hub (polling shared by the fleet
/// when the store is Redis and --fleet-polling is on), the idempotency store
/// opened from its settings, and the core over them.
///
/// Everything shared in Redis lives in the deployment's namespace, derived
/// here from the URL the client actually calls (or `--store-namespace`):
/// every way of starting a server (`serve`, `--simulate`, an embedder of
/// [`run`]) gets it, and it cannot disagree with the Piclumen called.
fn service(config: &ServerConfig, client: Client, draining: CancellationToken) -> ImageServiceImpl {
    let namespace = config.idempotency.namespace(client.base_url().expose());
    let fleet = match &config.idempotency.store {
        StoreLocation::Redis(url) if config.fleet_polling == FleetPolling::On => {
            Some((url.as_str(), &namespace))
        }
        _ => None,
    };
    if let StoreLocation::Redis(_) = config.idempotency.store {
        info!(%namespace, "shared store: keys and channels under piclumen-grpc:{namespace}:");
    }
    let upstream: Arc<dyn Upstream> = Arc::new(client);
    let hub = Hub::for_store(config.hub.clone(), Arc::new(upstream.clone()), fleet);
    let store = config.idempotency.open(&namespace);
    let mut core = Core::new(config.service.clone(), upstream, store, hub, draining);
    // Callers' limits hold across the fleet when the store is shared.
    if let StoreLocation::Redis(url) = &config.idempotency.store {
        core = core.with_callers(config.service.callers.open(Some((url, &namespace))));
    }
    ImageServiceImpl::new(core).with_connection_grace(config.max_connection_age_grace)
}

/// What runs until shutdown: the gRPC server, the HTTP API when on, and the
/// runtime gauges.
struct Running {
    server: JoinHandle<Result<(), tonic::transport::Error>>,
    http: Option<JoinHandle<std::io::Result<()>>>,
    gauges: JoinHandle<()>,
}

/// Reflection over our protos, health's, and google.rpc's error details
/// (so grpcurl can print ErrorInfo & co.).
fn reflection() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
}

/// Starts serving: gRPC on `listener` (and the HTTP API on `http_listener`)
/// until `stop_accepting` is cancelled. Returns the health reporter, which
/// the drain turns NOT_SERVING, and the running tasks.
async fn serve(
    config: &ServerConfig,
    service: ImageServiceImpl,
    listener: TcpListener,
    http_listener: Option<TcpListener>,
    stop_accepting: &CancellationToken,
) -> Result<(HealthReporter, Running), ServerError> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_service_status("", ServingStatus::Serving).await;
    health
        .set_serving::<ImageServiceServer<ImageServiceImpl>>()
        .await;
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;
    // Handles are taken here, after `main` installed the metrics recorder.
    let metrics = GrpcMetricsLayer::new(&[
        pb::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
    ])?;
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
        .layer(config.cors.layer())
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
            ImageServiceServer::new(service.clone())
                .max_decoding_message_size(config.max_request_bytes),
        );
    let incoming = incoming(listener, connection_age + config.max_connection_age_grace);
    let stopped = stop_accepting.clone().cancelled_owned();
    let server = tokio::spawn(router.serve_with_incoming_shutdown(incoming, stopped));
    let http = http_listener.map(|http_listener| {
        let stopped = stop_accepting.clone().cancelled_owned();
        let serve = crate::http_api::serve(
            http_listener,
            service.core(),
            config.max_request_bytes,
            stopped,
        );
        tokio::spawn(serve)
    });
    let gauges = tokio::spawn(runtime_gauges());
    Ok((
        health,
        Running {
            server,
            http,
            gauges,
        },
    ))
}

/// The connections `listener` accepts, each closed at `lifetime` at the
/// latest. Our own listener means the builder's tcp_nodelay does not apply:
/// it is set here, or small replies wait on delayed ACKs (~40 ms).
fn incoming(
    listener: TcpListener,
    lifetime: Duration,
) -> impl Stream<Item = std::io::Result<connection_age::Aged<TcpStream>>> {
    TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(Duration::from_secs(60)))
        .map(move |io| io.map(|io| connection_age::Aged::new(io, lifetime)))
}

impl Running {
    /// Waits for either front end to stop on its own (an error, or a bug);
    /// stops the other and gives the first one's outcome.
    async fn until_one_ends(&mut self) -> Result<(), ServerError> {
        tokio::select! {
            result = &mut self.server => {
                if let Some(http) = &self.http {
                    http.abort();
                }
                flatten(result)
            }
            result = wait_http(&mut self.http) => {
                self.server.abort();
                flatten_http(result)
            }
        }
    }

    /// After the front ends stopped accepting: waits for their calls and for
    /// the creates in flight, closing what remains after `timeout`.
    async fn drain(
        mut self,
        timeout: Duration,
        creates: &CreatesInFlight,
    ) -> Result<(), ServerError> {
        let drained = async {
            let connections = async {
                let grpc = flatten((&mut self.server).await);
                let http = match self.http.as_mut() {
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
        match tokio::time::timeout(timeout, drained).await {
            Ok(result) => {
                info!("drained");
                result
            }
            Err(_) => {
                warn!(
                    creates = creates.count(),
                    "drain timeout reached; closing the remaining connections and creates"
                );
                self.server.abort();
                if let Some(http) = &self.http {
                    http.abort();
                }
                Ok(())
            }
        }
    }
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
