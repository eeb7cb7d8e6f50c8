//! The gRPC edge of the service: `piclumen.v1.ImageService`'s RPCs, each
//! reading the caller's metadata (credentials, `grpc-timeout`), converting
//! its message to domain types (`crate::convert`), calling the
//! transport-free [`Core`], and turning the answer back into proto and an
//! error into a `Status` (`super::status`, the one place).

use std::{pin::Pin, sync::Arc, time::Duration};

use futures_util::{Stream, StreamExt};
use tokio::time::Instant;
use tonic::{Request, Response, Status, metadata::MetadataMap};

use super::{Core, Credentials, TokenInput};
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
}

impl ImageServiceImpl {
    /// The RPCs over `core`.
    pub fn new(core: Core) -> Self {
        Self {
            core: Arc::new(core),
        }
    }

    /// The core the RPCs call, shared with other front ends.
    pub fn core(&self) -> Arc<Core> {
        Arc::clone(&self.core)
    }
}

/// The caller's credentials as the metadata carries them.
fn credentials(metadata: &MetadataMap) -> Credentials<'_> {
    Credentials {
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

#[tonic::async_trait]
impl ImageService for ImageServiceImpl {
    async fn generate_image(
        &self,
        request: Request<pb::GenerateImageRequest>,
    ) -> Result<Response<pb::GenerateImageResponse>, Status> {
        let (metadata, _, message) = request.into_parts();
        let create = convert::create_request(message)?;
        let created = self
            .core
            .generate(&credentials(&metadata), create, call_deadline(&metadata))
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
        let metadata = request.metadata();
        let mark_id = &request.get_ref().mark_id;
        let status = self
            .core
            .check(&credentials(metadata), mark_id, call_deadline(metadata))
            .await?;
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
        let events = self.core.watch(
            &credentials(metadata),
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

    type WatchImagesStream =
        Pin<Box<dyn Stream<Item = Result<pb::WatchImagesResponse, Status>> + Send>>;

    async fn watch_images(
        &self,
        _request: Request<pb::WatchImagesRequest>,
    ) -> Result<Response<Self::WatchImagesStream>, Status> {
        Err(Status::unimplemented("WatchImages is not served yet"))
    }
}
