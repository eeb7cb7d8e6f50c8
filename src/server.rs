//! Wires the gRPC server: ImageService, health, reflection (v1 and v1alpha),
//! HTTP/2 settings, and a shutdown that drains within a bound.

use std::{future::Future, time::Duration};

use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Server, ServerTlsConfig, server::TcpIncoming};
use tonic_health::ServingStatus;
use tracing::{info, warn};

use crate::{
    hub::{Hub, HubConfig},
    pb::{self, image_service_server::ImageServiceServer},
    request_id::RequestIdLayer,
    service::{ImageServiceImpl, ServiceConfig},
    upstream::Client,
};

/// Everything `run` needs besides the listener.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The service's own settings.
    pub service: ServiceConfig,
    /// Polling hub settings.
    pub hub: HubConfig,
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
    let hub = Hub::new(config.hub.clone(), client.clone());
    let service = ImageServiceImpl::new(config.service.clone(), client, hub, draining.clone());
    let service_for_http = service.clone();

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

    let stop_accepting = CancellationToken::new();
    let mut builder = Server::builder();
    if let Some(tls) = config.tls.clone() {
        builder = builder.tls_config(tls)?;
    }
    let router = builder
        .layer(RequestIdLayer)
        .max_concurrent_streams(Some(config.max_streams_per_connection))
        // Pings keep long WatchImage streams alive through proxies and find
        // dead peers.
        .http2_keepalive_interval(Some(config.http2_keepalive_interval))
        .http2_keepalive_timeout(Some(config.http2_keepalive_timeout))
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
        let grpc = flatten((&mut server).await);
        let http = match http.as_mut() {
            Some(task) => flatten_http(task.await),
            None => Ok(()),
        };
        grpc.and(http)
    };
    match tokio::time::timeout(config.drain_timeout, drained).await {
        Ok(result) => {
            info!("drained");
            result
        }
        Err(_) => {
            warn!("drain timeout reached; closing the remaining connections");
            server.abort();
            if let Some(http) = &http {
                http.abort();
            }
            Ok(())
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
