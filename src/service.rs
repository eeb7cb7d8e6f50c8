//! `piclumen.v1.ImageService`: resolves the caller's token and deadline,
//! validates and converts the request, calls Piclumen (or the hub), and turns
//! every failure into a `Status` through `crate::error`.

use std::{
    collections::HashMap,
    pin::Pin,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures_util::Stream;
use prost::Message;
use tokio::{
    sync::Semaphore,
    time::{Instant, sleep_until},
};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, metadata::MetadataMap};
use tracing::{debug, info, warn};

use crate::{
    auth::{API_KEY_HEADER, ApiKeys},
    convert::{self, Limits},
    error::Error,
    hub::{Hub, HubError, Snapshot},
    idempotency::{Created, Fingerprint, IdempotencyStore, StoreLocation},
    job::{JobStatus, Token},
    pb::{self, image_service_server::ImageService},
    request_id::InSpan,
    upstream::{Client, CreatePayload, UpstreamError},
};

/// Settings of the service itself.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// Token used when a call carries none.
    pub default_token: Option<Token>,
    /// When set, every call must carry one of these in `x-api-key`.
    pub api_keys: Option<ApiKeys>,
    /// Request bounds.
    pub limits: Limits,
    /// Longest a WatchImage stream stays open.
    pub max_watch: Duration,
    /// Quiet time after which a watch repeats its state.
    pub heartbeat: Duration,
    /// Most WatchImage streams open at once.
    pub max_watches: usize,
    /// Most creates in flight upstream per token.
    pub max_generates_per_token: usize,
    /// How long a `request_id`'s outcome is remembered.
    pub idempotency_ttl: Duration,
    /// Where `request_id` outcomes are kept.
    pub idempotency_store: StoreLocation,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        Self {
            default_token: None,
            api_keys: None,
            limits: Limits::default(),
            max_watch: defaults::MAX_WATCH,
            heartbeat: defaults::HEARTBEAT,
            max_watches: defaults::MAX_WATCHES,
            max_generates_per_token: defaults::MAX_GENERATES_PER_TOKEN,
            idempotency_ttl: defaults::IDEMPOTENCY_TTL,
            idempotency_store: Default::default(),
        }
    }
}

/// The service's defaults and bounds (the `serve` flags read these).
pub mod defaults {
    use std::time::Duration;

    /// `--max-watch`.
    pub const MAX_WATCH: Duration = Duration::from_secs(30 * 60);
    /// `--heartbeat`.
    pub const HEARTBEAT: Duration = Duration::from_secs(30);
    /// Shortest `--heartbeat`.
    pub const MIN_HEARTBEAT: Duration = Duration::from_secs(1);
    /// `--max-watches`: what one instance is shown to hold (BENCHMARKS.md:
    /// 30,000 watches of one token in 161 MiB, every change delivered within
    /// an interval).
    pub const MAX_WATCHES: usize = 30_000;
    /// `--max-generates-per-token`.
    pub const MAX_GENERATES_PER_TOKEN: usize = 16;
    /// `--idempotency-ttl`.
    pub const IDEMPOTENCY_TTL: Duration = Duration::from_secs(10 * 60);
}

/// The service; cheap to clone.
#[derive(Debug, Clone)]
pub struct ImageServiceImpl {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: ServiceConfig,
    client: Client,
    hub: Hub,
    store: IdempotencyStore,
    watch_slots: Arc<Semaphore>,
    /// Creates in flight upstream, per token.
    generating: Arc<Mutex<HashMap<Token, usize>>>,
    /// Cancelled when the server starts draining.
    draining: CancellationToken,
}

/// The token a call runs with, and whether it is the server's own.
#[derive(Debug, Clone)]
struct CallToken {
    token: Token,
    is_default: bool,
}

impl CallToken {
    /// An upstream failure as this call's error: a timeout cut short by the
    /// caller's own deadline is reported as such.
    fn upstream_at(&self, source: UpstreamError, deadline: Option<Instant>) -> Error {
        match source {
            UpstreamError::Timeout(_) if deadline.is_some_and(|d| Instant::now() >= d) => {
                Error::DeadlineExceeded(
                    "the caller's deadline ran out before Piclumen answered".into(),
                )
            }
            source => self.upstream(source),
        }
    }

    fn upstream(&self, source: UpstreamError) -> Error {
        Error::Upstream {
            source,
            default_token: self.is_default,
        }
    }

    /// The hub's error as this call's: an auth failure of the default
    /// token is the operator's, not the caller's.
    fn hub_error(&self, error: HubError) -> Error {
        match error {
            HubError::NotFound { mark_id } => Error::NotFound { mark_id },
            HubError::Upstream(source) => self.upstream(source),
            HubError::Outage { budget, last } => Error::UpstreamOutage { budget, last },
            HubError::DeadlineExceeded => Error::DeadlineExceeded(
                "the caller's deadline ran out before Piclumen answered".into(),
            ),
            HubError::Stopped => Error::ShuttingDown,
        }
    }
}

impl ImageServiceImpl {
    /// Builds the service; `draining` is cancelled at shutdown.
    pub fn new(
        config: ServiceConfig,
        client: Client,
        hub: Hub,
        draining: CancellationToken,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                store: IdempotencyStore::open(
                    &config.idempotency_store,
                    config.idempotency_ttl,
                    client.timeout(),
                ),
                watch_slots: Arc::new(Semaphore::new(config.max_watches)),
                generating: Arc::default(),
                config,
                client,
                hub,
                draining,
            }),
        }
    }

    fn admit(&self, metadata: &MetadataMap) -> Result<CallToken, Error> {
        if self.inner.draining.is_cancelled() {
            return Err(Error::ShuttingDown);
        }
        if let Some(keys) = &self.inner.config.api_keys {
            keys.check(metadata.get(API_KEY_HEADER).map(|v| v.as_bytes()))?;
        }
        let Some(value) = metadata.get("authorization") else {
            return self
                .inner
                .config
                .default_token
                .clone()
                .map(|token| CallToken {
                    token,
                    is_default: true,
                })
                .ok_or(Error::MissingToken);
        };
        let raw = value.to_str().map_err(|_| Error::MalformedToken)?.trim();
        let raw = match raw.split_once(' ') {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("bearer") => rest,
            // `Bearer ` with its space trimmed away by the transport.
            _ if raw.eq_ignore_ascii_case("bearer") => "",
            _ => raw,
        };
        let token = Token::parse(raw).map_err(|_| Error::MalformedToken)?;
        Ok(CallToken {
            token,
            is_default: false,
        })
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

/// The request's parameters (all but `request_id`), hashed stably: protobuf
/// encoding is deterministic here (fields in tag order, `Struct` maps sorted).
fn fingerprint(req: &pb::GenerateImageRequest) -> Fingerprint {
    let mut params = req.clone();
    params.request_id.clear();
    Fingerprint::of(&params.encode_to_vec())
}

/// Boxed stream of WatchImage responses.
pub type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchImageResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ImageService for ImageServiceImpl {
    async fn generate_image(
        &self,
        request: Request<pb::GenerateImageRequest>,
    ) -> Result<Response<pb::GenerateImageResponse>, Status> {
        let call = self.admit(request.metadata())?;
        let deadline = call_deadline(request.metadata());
        let req = request.into_inner();
        let payload = convert::create_payload(&req, &self.inner.config.limits)?;
        let created = if req.request_id.is_empty() {
            // No key: the create is the handler's own and ends with it.
            let _slot = self.generate_slot(&call.token)?;
            self.create(&call, payload, deadline).await
        } else {
            // The create runs in the store's task, to its own end (bounded
            // by --upstream-timeout only), holding the token's place.
            let start = || {
                let slot = self.generate_slot(&call.token)?;
                let create = self.create(&call, payload.clone(), None);
                Ok(async move {
                    let _slot = slot;
                    create.await
                })
            };
            self.inner
                .store
                .run(
                    &call.token,
                    &req.request_id,
                    &fingerprint(&req),
                    deadline,
                    start,
                )
                .await
        };
        let created = created.inspect_err(|e| match e {
            // Logged once per outage by the store, not once per call.
            Error::IdempotencyStoreUnavailable => debug!(error = %e, "GenerateImage failed"),
            _ => warn!(error = %e, "GenerateImage failed"),
        })?;
        info!(mark_id = %created.mark_id, seed = created.seed, "generation started");
        Ok(Response::new(pb::GenerateImageResponse {
            mark_id: created.mark_id,
            seed: created.seed,
        }))
    }

    async fn check_image(
        &self,
        request: Request<pb::CheckImageRequest>,
    ) -> Result<Response<pb::CheckImageResponse>, Status> {
        let call = self.admit(request.metadata())?;
        let deadline = call_deadline(request.metadata());
        let mark_id = convert::mark_id(&request.get_ref().mark_id)?;
        let status = self
            .inner
            .hub
            .check(&call.token, &mark_id, deadline)
            .await
            .map_err(|e| call.hub_error(e))?;
        Ok(Response::new(pb::CheckImageResponse {
            job: Some(convert::to_proto_job(&status)),
        }))
    }

    type WatchImageStream = WatchStream;

    async fn watch_image(
        &self,
        request: Request<pb::WatchImageRequest>,
    ) -> Result<Response<Self::WatchImageStream>, Status> {
        let call = self.admit(request.metadata())?;
        let caller_deadline = call_deadline(request.metadata());
        let mark_id = convert::mark_id(&request.get_ref().mark_id)?;
        let permit = Arc::clone(&self.inner.watch_slots)
            .try_acquire_owned()
            .map_err(|_| {
                Error::ResourceExhausted(format!(
                    "this server already holds its limit of {} watches; retry later or elsewhere",
                    self.inner.config.max_watches
                ))
            })?;
        let subscription = self.inner.hub.subscribe(&call.token, &mark_id);
        let config = &self.inner.config;
        let max_watch_end = Instant::now() + config.max_watch;
        let (end_at, end_message) = match caller_deadline {
            Some(d) if d < max_watch_end => (d, "the caller's deadline was reached".to_owned()),
            _ => (
                max_watch_end,
                format!(
                    "the server's maximum watch time of {} was reached; call WatchImage again",
                    humantime::format_duration(config.max_watch)
                ),
            ),
        };
        let heartbeat = config.heartbeat;
        let draining = self.inner.draining.clone();
        let stream = async_stream::stream! {
            let _permit = permit;
            let mut rx = subscription.rx.clone();
            let _subscription = subscription;
            let mut last: Option<JobStatus> = None;
            let mut heartbeat_at = Instant::now() + heartbeat;
            loop {
                let snapshot = rx.borrow_and_update().clone();
                match snapshot {
                    Snapshot::Waiting => {}
                    Snapshot::Status(status) => {
                        if last.as_ref() != Some(&status) {
                            yield Ok(watch_response(&status, false));
                            heartbeat_at = Instant::now() + heartbeat;
                        }
                        let done = status.state.is_terminal();
                        last = Some(status);
                        if done {
                            info!(state = ?last.as_ref().map(|s| s.state), "watch finished");
                            break;
                        }
                    }
                    Snapshot::Ended(error) => {
                        let error = call.hub_error(error);
                        warn!(%error, "watch ended with an error");
                        yield Err(Status::from(error));
                        break;
                    }
                }
                tokio::select! {
                    biased;
                    () = draining.cancelled() => {
                        yield Err(Status::from(Error::ShuttingDown));
                        break;
                    }
                    () = sleep_until(end_at) => {
                        yield Err(Status::from(Error::DeadlineExceeded(end_message)));
                        break;
                    }
                    changed = rx.changed() => {
                        if changed.is_err() {
                            yield Err(Status::from(Error::WatchInterrupted));
                            break;
                        }
                    }
                    () = sleep_until(heartbeat_at), if last.is_some() => {
                        if let Some(status) = &last {
                            yield Ok(watch_response(status, true));
                        }
                        heartbeat_at = Instant::now() + heartbeat;
                    }
                }
            }
        };
        Ok(Response::new(Box::pin(InSpan::current(stream))))
    }
}

/// One GenerateImage call in flight for a token; frees its place on drop.
#[derive(Debug)]
struct GenerateSlot {
    token: Token,
    generating: Arc<Mutex<HashMap<Token, usize>>>,
}

impl Drop for GenerateSlot {
    fn drop(&mut self) {
        let mut generating = lock(&self.generating);
        if let Some(n) = generating.get_mut(&self.token) {
            *n -= 1;
            if *n == 0 {
                generating.remove(&self.token);
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl ImageServiceImpl {
    /// Takes one of the token's places for a create in flight upstream, so
    /// one caller cannot flood Piclumen (and spend the account) with parallel
    /// generations. The place is held by the create itself, however soon its
    /// caller gives up.
    fn generate_slot(&self, token: &Token) -> Result<GenerateSlot, Error> {
        let limit = self.inner.config.max_generates_per_token;
        let mut generating = lock(&self.inner.generating);
        let n = generating.entry(token.clone()).or_insert(0);
        if *n >= limit {
            return Err(Error::ResourceExhausted(format!(
                "this token already has {limit} GenerateImage creates in flight; retry when one ends"
            )));
        }
        *n += 1;
        Ok(GenerateSlot {
            token: token.clone(),
            generating: Arc::clone(&self.inner.generating),
        })
    }

    /// One upstream create, bounded by `deadline` (when given) and
    /// `--upstream-timeout`.
    fn create(
        &self,
        call: &CallToken,
        payload: CreatePayload,
        deadline: Option<Instant>,
    ) -> impl Future<Output = Result<Created, Error>> + Send + 'static {
        let client = self.inner.client.clone();
        let call = call.clone();
        async move {
            let seed = payload.seed;
            client
                .create(&call.token, &payload, deadline)
                .await
                .map(|mark_id| Created { mark_id, seed })
                .map_err(|e| call.upstream_at(e, deadline))
        }
    }
}

fn watch_response(status: &JobStatus, heartbeat: bool) -> pb::WatchImageResponse {
    pb::WatchImageResponse {
        job: Some(convert::to_proto_job(status)),
        heartbeat,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse_every_unit() {
        assert_eq!(parse_grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_grpc_timeout("100u"), Some(Duration::from_micros(100)));
        assert_eq!(parse_grpc_timeout("1n"), Some(Duration::from_nanos(1)));
        assert_eq!(parse_grpc_timeout("3M"), Some(Duration::from_secs(180)));
        for bad in ["", "S", "5", "5x", "123456789S", "-1S"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
    }
}
