//! The service's transport-free core, shared by the gRPC calls and the
//! first version's HTTP API: admission (draining, API key, token), request
//! validation and conversion, GenerateImage with its per-token create limit
//! and `request_id` idempotency, CheckImage through the hub, and the start
//! of a watch. It takes plain inputs and returns domain types and
//! `crate::error::Error`; it builds no `Status` and reads no header.

use std::sync::Arc;

use futures_util::{Stream, StreamExt};
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{
    ServiceConfig,
    admission::{self, CallToken, Credentials, WatchSlots},
    in_flight::CreateLimit,
    wait::{self, Wait, WaitFor, Waited},
    watch::{Watch, WatchEvent},
    watch_many::{Many, ManyEvent},
};
use crate::{
    callers::{CallerGate, Rpc, WatchPlace},
    error::Error,
    hub::{Hub, HubError},
    idempotency::{Created, CreatesInFlight, Fingerprint, IdempotencyStore},
    job::JobStatus,
    upstream::{CreatePayload, CreateRequest, MAX_NAME_CHARS, Upstream},
};

/// The core; shared behind an `Arc` by both front ends.
pub struct Core {
    config: ServiceConfig,
    upstream: Arc<dyn Upstream>,
    hub: Hub,
    store: IdempotencyStore,
    watch_slots: WatchSlots,
    create_limit: CreateLimit,
    /// Named callers: who calls, and their limits.
    callers: CallerGate,
    /// Cancelled when the server starts draining.
    draining: CancellationToken,
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core")
            .field("config", &self.config)
            .field("hub", &self.hub)
            .field("store", &self.store)
            .field("draining", &self.draining.is_cancelled())
            .finish_non_exhaustive()
    }
}

impl Core {
    /// A core creating through `upstream`, keeping `request_id` outcomes in
    /// `store` (opened by the server wiring) and watching through `hub`;
    /// `draining` is cancelled at shutdown.
    pub fn new(
        config: ServiceConfig,
        upstream: Arc<dyn Upstream>,
        store: IdempotencyStore,
        hub: Hub,
        draining: CancellationToken,
    ) -> Self {
        Self {
            store,
            watch_slots: WatchSlots::new(config.max_watches),
            create_limit: CreateLimit::new(config.max_generates_per_token),
            callers: config.callers.open(None),
            config,
            upstream,
            hub,
            draining,
        }
    }

    /// The same core with callers' limits counted by `callers` (the
    /// server's, shared through Redis) instead of in this process.
    pub fn with_callers(mut self, callers: CallerGate) -> Self {
        self.callers = callers;
        self
    }

    /// Admits a call: refused while draining, then the caller (API key,
    /// named caller), then the token. Every call below starts here.
    pub(super) fn admit(&self, credentials: &Credentials<'_>) -> Result<CallToken, Error> {
        if self.draining.is_cancelled() {
            return Err(Error::ShuttingDown);
        }
        admission::resolve_caller(
            self.config.api_keys.as_ref(),
            &self.callers,
            self.config.default_token.as_ref(),
            credentials,
        )
    }

    /// Creates in flight, which a draining server waits for.
    pub fn creates(&self) -> CreatesInFlight {
        self.store.creates().clone()
    }

    /// GenerateImage: admits the caller, checks `req` and fills its
    /// defaults, then creates once; with a `request_id`, a retry gets the
    /// first call's outcome instead.
    pub async fn generate(
        &self,
        credentials: &Credentials<'_>,
        req: CreateRequest,
        deadline: Option<Instant>,
    ) -> Result<Created, Error> {
        let call = &self.admit(credentials)?;
        // The key is bound to the parameters as sent, before defaults and
        // the random seed are filled in.
        let keyed = (!req.request_id.is_empty()).then(|| {
            (
                req.request_id.clone(),
                Fingerprint::of(&req.fingerprint_bytes()),
            )
        });
        let payload = match req.into_payload(&self.config.limits) {
            Ok(payload) => payload,
            Err(invalid) => {
                let refused = Err(invalid.into());
                bill(call, Rpc::Generate, &refused);
                return refused;
            }
        };
        let is_keyed = keyed.is_some();
        let created = match keyed {
            // No key: the create is the call's own and ends with it.
            None => match self.start_create(call, &payload, deadline) {
                Ok(create) => create.await,
                Err(refused) => Err(refused),
            },
            // The create runs in the store's task, to its own end (bounded
            // by --upstream-timeout only), holding the token's place.
            Some((request_id, fingerprint)) => {
                let start = || self.start_create(call, &payload, None);
                self.store
                    .run(&call.token, &request_id, &fingerprint, deadline, start)
                    .await
            }
        };
        let created = created.map_err(|e| e.for_create(is_keyed));
        bill(call, Rpc::Generate, &created);
        match &created {
            Ok(created) => {
                info!(mark_id = %created.mark_id, seed = created.seed, "generation started");
            }
            // Logged once per outage by the store, not once per call.
            Err(e @ Error::IdempotencyStoreUnavailable) => {
                debug!(error = %e, "GenerateImage failed")
            }
            Err(e) => warn!(error = %e, "GenerateImage failed"),
        }
        created
    }

    /// One upstream create, admitted by the token's create limit and holding
    /// its place to its end, bounded by `deadline` (when given) and
    /// `--upstream-timeout`.
    fn start_create(
        &self,
        call: &CallToken,
        payload: &CreatePayload,
        deadline: Option<Instant>,
    ) -> Result<impl Future<Output = Result<Created, Error>> + Send + use<>, Error> {
        let slot = self.create_limit.start(&call.token)?;
        let images = u64::try_from(payload.resolution.batch_size).unwrap_or(1);
        // Taken when the create is sent: a request_id retry answered from
        // the store never gets here, and so costs nothing.
        let charge = call
            .caller
            .as_ref()
            .and_then(|c| self.callers.charge(c, images));
        let seed = payload.seed;
        let default_token = call.is_default;
        // Counted until it ends, so a draining server waits for it.
        let in_flight = self.store.creates().enter();
        let sent = self.upstream.create(&call.token, payload, deadline);
        let (hub, token) = (self.hub.clone(), call.token.clone());
        Ok(async move {
            let (_slot, _in_flight) = (slot, in_flight);
            let taken = match charge {
                Some(charge) => Some(charge.take().await?),
                None => None,
            };
            let sent = sent.await;
            if let Some(taken) = taken {
                taken.settle(&sent);
            }
            let created = sent
                .map(|mark_id| Created { mark_id, seed })
                .map_err(|e| admission::create_error(e, default_token, deadline));
            // The reply is Piclumen's first word on the job: it stands for
            // the job's state if status calls fail before one sees it.
            if let Ok(created) = &created {
                hub.created(&token, &created.mark_id);
            }
            created
        })
    }

    /// CheckImage: admits the caller, then the job's state, from the hub.
    pub async fn check(
        &self,
        credentials: &Credentials<'_>,
        mark_id: &str,
        deadline: Option<Instant>,
    ) -> Result<JobStatus, Error> {
        let call = self.admit(credentials)?;
        let checked = match self::mark_id(mark_id) {
            Ok(mark_id) => self
                .hub
                .check(&call.token, &mark_id, deadline)
                .await
                .map_err(|e| call.hub_error(e)),
            Err(e) => Err(e),
        };
        bill(&call, Rpc::Check, &checked);
        checked
    }

    /// CheckImage that waits for a change (see `super::wait`): admits the
    /// caller; when `request` asks for a wait, holds a watch slot and the
    /// job's channel while it waits, then answers with the state that
    /// ended it (through `Hub::settle`, so a state the channel kept through
    /// long trouble is answered as any check would be).
    pub async fn check_wait(
        &self,
        credentials: &Credentials<'_>,
        mark_id: &str,
        deadline: Option<Instant>,
        request: &WaitFor,
    ) -> Result<JobStatus, Error> {
        let call = self.admit(credentials)?;
        let answer = self.wait_for(&call, mark_id, deadline, request).await;
        bill(&call, Rpc::Check, &answer);
        answer
    }

    /// [`Core::check_wait`] once admitted.
    async fn wait_for(
        &self,
        call: &CallToken,
        mark_id: &str,
        deadline: Option<Instant>,
        request: &WaitFor,
    ) -> Result<JobStatus, Error> {
        let mark_id = self::mark_id(mark_id)?;
        let max = self.config.max_check_wait;
        let Some(wait) = Wait::start(request, max, deadline, Instant::now()) else {
            return self
                .hub
                .check(&call.token, &mark_id, deadline)
                .await
                .map_err(|e| call.hub_error(e));
        };
        // A waiting check is a watch while it waits: the server's and its
        // caller's.
        let places = self.caller_places(call, 1)?;
        let slot = self.watch_slots.take()?;
        let subscription = self.hub.subscribe(&call.token, &mark_id);
        let waited = wait::wait_on(&wait, subscription, &self.draining).await;
        drop((slot, places));
        let ask_until = Some(wait.ask_until(deadline));
        let answer = match waited {
            // Asking ran out of time: the end of a wait is an answer, with
            // the state the channel had and its own `observed_at`.
            Waited::Status(status) => match self
                .hub
                .settle(&call.token, &mark_id, status.clone(), ask_until)
                .await
            {
                Err(HubError::DeadlineExceeded) => Ok(status),
                answer => answer,
            },
            Waited::Failed(error) => Err(error),
            Waited::Unknown => self.hub.check(&call.token, &mark_id, ask_until).await,
        };
        answer.map_err(|e| call.hub_error(e))
    }

    /// The longest wait a check is granted (`--max-check-wait`).
    pub fn max_check_wait(&self) -> std::time::Duration {
        self.config.max_check_wait
    }

    /// WatchImages: admits the caller, checks the ids (duplicates folded),
    /// takes a watch slot per job (all or none) and joins every job's
    /// channel; the stream holds them until it ends.
    pub fn watch_many(
        &self,
        credentials: &Credentials<'_>,
        mark_ids: &[String],
        caller_deadline: Option<Instant>,
    ) -> Result<impl Stream<Item = Result<ManyEvent, Error>> + Send + use<>, Error> {
        let call = self.admit(credentials)?;
        let opened = self::mark_ids(mark_ids, self.config.max_watch_ids).and_then(|ids| {
            let places = self.caller_places(&call, ids.len())?;
            let slots = self.watch_slots.take_many(ids.len())?;
            Ok((ids, places, slots))
        });
        bill(&call, Rpc::WatchMany, &opened);
        let (ids, places, slots) = opened?;
        let subscriptions = ids
            .iter()
            .map(|id| self.hub.subscribe(&call.token, id))
            .collect();
        let (end_at, end_message) =
            Watch::end(caller_deadline, self.config.max_watch, "WatchImages");
        let many = Many {
            call,
            ids,
            subscriptions,
            slots,
            places,
            end_at,
            end_message,
            heartbeat: self.config.heartbeat,
            draining: self.draining.clone(),
        };
        Ok(many.stream())
    }

    /// `n` places among the named caller's watches (none for an unnamed
    /// caller): all or none.
    fn caller_places(&self, call: &CallToken, n: usize) -> Result<Vec<WatchPlace>, Error> {
        match &call.caller {
            Some(caller) => (0..n).map(|_| self.callers.watch(caller)).collect(),
            None => Ok(Vec::new()),
        }
    }

    /// WatchImage: admits the caller, takes a watch slot and joins the
    /// job's channel; the stream holds both until it ends.
    pub fn watch(
        &self,
        credentials: &Credentials<'_>,
        mark_id: &str,
        caller_deadline: Option<Instant>,
    ) -> Result<impl Stream<Item = Result<WatchEvent, Error>> + Send + use<>, Error> {
        let call = self.admit(credentials)?;
        let opened = self.open_watch(&call, mark_id);
        bill(&call, Rpc::Watch, &opened);
        let (mark_id, slot, place) = opened?;
        let subscription = self.hub.subscribe(&call.token, &mark_id);
        let (end_at, end_message) =
            Watch::end(caller_deadline, self.config.max_watch, "WatchImage");
        let watch = Watch {
            call,
            subscription,
            slot,
            end_at,
            end_message,
            heartbeat: self.config.heartbeat,
            draining: self.draining.clone(),
        };
        // The caller's watch place is held as long as the stream.
        Ok(watch.stream().map(move |event| {
            let _ = &place;
            event
        }))
    }

    /// A watch's checks before it opens: its mark id, a place among the
    /// server's watches and among its caller's.
    fn open_watch(
        &self,
        call: &CallToken,
        mark_id: &str,
    ) -> Result<(String, OwnedSemaphorePermit, Option<WatchPlace>), Error> {
        let mark_id = self::mark_id(mark_id)?;
        let place = call
            .caller
            .as_ref()
            .map(|c| self.callers.watch(c))
            .transpose()?;
        let slot = self.watch_slots.take()?;
        Ok((mark_id, slot, place))
    }
}

/// Puts a named caller's call on its bill.
fn bill<T>(call: &CallToken, rpc: Rpc, outcome: &Result<T, Error>) {
    if let Some(caller) = &call.caller {
        caller
            .bill
            .call(rpc, outcome.as_ref().err().map(|e| e.classify().0));
    }
}

/// The mark ids of one WatchImages call: 1 to `max` (after folding
/// duplicates, first occurrence kept), each as [`mark_id`] checks it.
pub fn mark_ids(values: &[String], max: usize) -> Result<Vec<String>, Error> {
    let invalid = |message: String| Error::InvalidArgument {
        field: "mark_ids",
        message,
    };
    let mut seen = std::collections::HashSet::with_capacity(values.len().min(max));
    let mut ids = Vec::with_capacity(values.len().min(max));
    for (i, value) in values.iter().enumerate() {
        let id = match self::mark_id(value) {
            Ok(id) => id,
            Err(Error::InvalidArgument { message, .. }) => {
                return Err(invalid(format!("mark_ids[{i}] {message}")));
            }
            Err(other) => return Err(other),
        };
        if seen.insert(id.clone()) {
            ids.push(id);
        }
        if ids.len() > max {
            return Err(invalid(format!(
                "more than this server's limit of {max} distinct ids"
            )));
        }
    }
    if ids.is_empty() {
        return Err(invalid("must name at least one job".into()));
    }
    Ok(ids)
}

/// A mark id as a caller sends it: trimmed, non-empty, bounded, and free of
/// control characters.
pub fn mark_id(value: &str) -> Result<String, Error> {
    let invalid = |message: String| Error::InvalidArgument {
        field: "mark_id",
        message,
    };
    let id = value.trim();
    if id.is_empty() {
        return Err(invalid("must not be empty".into()));
    }
    if id.len() > MAX_NAME_CHARS {
        return Err(invalid(format!("longer than {MAX_NAME_CHARS} bytes")));
    }
    if id.chars().any(char::is_control) {
        // Echoed as sent: the caller sees exactly which id was refused.
        return Err(invalid(format!("contains control characters: {id}")));
    }
    Ok(id.to_owned())
}
