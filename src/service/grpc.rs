//! The gRPC edge of the service: `piclumen.v1.ImageService`'s RPCs, each
//! reading the caller's metadata (credentials, `grpc-timeout`), converting
//! its message to domain types (`crate::convert`), calling the
//! transport-free [`Core`], and turning the answer back into proto and an
//! error into a `Status` (`super::status`, the one place).

use std::{pin::Pin, sync::Arc, time::Duration};

use futures_util::{Stream, StreamExt};
use tokio::time::Instant;
use tonic::{Request, Response, Status, metadata::MetadataMap, transport::CertificateDer};

use super::{Core, Credentials, ManyEvent, TokenInput, WaitFor};
use crate::{
    auth::API_KEY_HEADER,
    convert,
    pb::{self, image_service_server::ImageService},
    request_id::InSpan,
};

/// The gRPC service; cheap to clone.
#[derive(Debug, Clone)]
pub struct ImageServiceImpl {
    core: Arc<Core>,
    /// Longest a CheckImage waits here: a call still open when its
    /// connection is cut (`--max-connection-age-grace` after the GOAWAY)
    /// would get UNAVAILABLE instead of its answer.
    longest_wait: Duration,
}

impl ImageServiceImpl {
    /// The RPCs over `core`.
    pub fn new(core: Core) -> Self {
        Self {
            core: Arc::new(core),
            longest_wait: Duration::MAX,
        }
    }

    /// Waits end a second before a connection's calls are cut, `grace`
    /// after it ages out: a wait that starts before the GOAWAY (none
    /// starts after) then answers in time.
    pub fn with_connection_grace(mut self, grace: Duration) -> Self {
        self.longest_wait = grace.saturating_sub(Duration::from_secs(1));
        self
    }

    /// The core the RPCs call, shared with other front ends.
    pub fn core(&self) -> Arc<Core> {
        Arc::clone(&self.core)
    }
}

/// The caller's credentials as the metadata carries them, with the client
/// certificate of a mutual TLS connection.
fn credentials<'a>(
    metadata: &'a MetadataMap,
    peer_certs: Option<&'a [CertificateDer<'static>]>,
) -> Credentials<'a> {
    Credentials {
        peer_cert: peer_certs.and_then(<[_]>::first).map(|c| c.as_ref()),
        token: metadata
            .get("authorization")
            .map_or(TokenInput::Absent, |v| {
                TokenInput::Authorization(v.as_bytes())
            }),
        api_key: metadata.get(API_KEY_HEADER).map(|v| v.as_bytes()),
    }
}

/// The caller's deadline (`grpc-timeout`), brought forward a little so our
/// DEADLINE_EXCEEDED reaches the caller before tonic's own CANCELLED would.
fn call_deadline(metadata: &MetadataMap) -> Option<Instant> {
    let timeout = parse_grpc_timeout(metadata.get("grpc-timeout")?.to_str().ok()?)?;
    let margin = (timeout / 10).min(Duration::from_millis(50));
    Some(Instant::now() + timeout - margin)
}

/// Parses gRPC's `TimeoutValue TimeoutUnit` (at most 8 digits, unit H M S m u n).
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Boxed stream of WatchImage responses.
pub type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchImageResponse, Status>> + Send>>;

/// Boxed stream of WatchImages responses.
pub type ManyStream = Pin<Box<dyn Stream<Item = Result<pb::WatchImagesResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ImageService for ImageServiceImpl {
    async fn generate_image(
        &self,
        request: Request<pb::GenerateImageRequest>,
    ) -> Result<Response<pb::GenerateImageResponse>, Status> {
        let peer_certs = request.peer_certs();
        let (metadata, _, message) = request.into_parts();
        let create = convert::create_request(message)?;
        let credentials = credentials(&metadata, peer_certs.as_deref().map(Vec::as_slice));
        let created = self
            .core
            .generate(&credentials, create, call_deadline(&metadata))
            .await?;
        Ok(Response::new(pb::GenerateImageResponse {
            mark_id: created.mark_id,
            seed: created.seed,
        }))
    }

    async fn check_image(
        &self,
        request: Request<pb::CheckImageRequest>,
    ) -> Result<Response<pb::CheckImageResponse>, Status> {
        let peer_certs = request.peer_certs();
        let (metadata, _, message) = request.into_parts();
        let credentials = credentials(&metadata, peer_certs.as_deref().map(Vec::as_slice));
        let deadline = call_deadline(&metadata);
        let wait = convert::check_wait(message.wait)?.map(|wait| WaitFor {
            wait: wait.min(self.longest_wait),
            etag: message.etag,
        });
        let status = match wait {
            None => {
                self.core
                    .check(&credentials, &message.mark_id, deadline)
                    .await?
            }
            Some(wait) => {
                self.core
                    .check_wait(&credentials, &message.mark_id, deadline, &wait)
                    .await?
            }
        };
        Ok(Response::new(pb::CheckImageResponse {
            job: Some(convert::into_proto_job(status)),
        }))
    }

    type WatchImageStream = WatchStream;

    async fn watch_image(
        &self,
        request: Request<pb::WatchImageRequest>,
    ) -> Result<Response<Self::WatchImageStream>, Status> {
        let metadata = request.metadata();
        let peer_certs = request.peer_certs();
        let events = self.core.watch(
            &credentials(metadata, peer_certs.as_deref().map(Vec::as_slice)),
            &request.get_ref().mark_id,
            call_deadline(metadata),
        )?;
        let responses = events.map(|event| {
            event
                .map(|event| pb::WatchImageResponse {
                    job: Some(convert::into_proto_job(event.status)),
                    heartbeat: event.heartbeat,
                })
                .map_err(Status::from)
        });
        Ok(Response::new(Box::pin(InSpan::current(responses))))
    }

    type WatchImagesStream = ManyStream;

    async fn watch_images(
        &self,
        request: Request<pb::WatchImagesRequest>,
    ) -> Result<Response<Self::WatchImagesStream>, Status> {
        let metadata = request.metadata();
        let peer_certs = request.peer_certs();
        let events = self.core.watch_many(
            &credentials(metadata, peer_certs.as_deref().map(Vec::as_slice)),
            &request.get_ref().mark_ids,
            call_deadline(metadata),
        )?;
        let responses = events.map(|event| {
            event
                .map(|event| match event {
                    ManyEvent::Job(status) => pb::WatchImagesResponse {
                        job: Some(convert::into_proto_job(status)),
                        ..Default::default()
                    },
                    ManyEvent::JobFailed { mark_id, error } => pb::WatchImagesResponse {
                        job: Some(pb::ImageJob {
                            mark_id,
                            ..Default::default()
                        }),
                        error: Some(super::status::rpc_status(error)),
                        ..Default::default()
                    },
                    ManyEvent::Heartbeat => pb::WatchImagesResponse {
                        heartbeat: true,
                        ..Default::default()
                    },
                })
                .map_err(Status::from)
        });
        Ok(Response::new(Box::pin(InSpan::current(responses))))
    }
}
