//! `request_id` dedupe for GenerateImage: a retried call returns the first
//! call's mark id instead of paying for a second generation.
//!
//! The first call for a (token, request_id) claims the key atomically in a
//! backend ([`memory`] for one process, [`redis`] shared by replicas) and
//! runs the create in its own task, bounded by `--upstream-timeout` only: it
//! goes on when its caller gives up. Every caller (the first, its retries,
//! concurrent duplicates, here or on another replica) waits for it within
//! its own deadline and gets its outcome; callers in this process are woken
//! by a channel, callers elsewhere poll the key.
//!
//! What the create leaves behind:
//! - success: the mark id and seed, kept for the TTL;
//! - a failure that surely never reached Piclumen, or a definite refusal
//!   (401, 400, a rejected envelope, ...): forgotten, a retry may create;
//! - sent without a usable reply (timeout, broken connection, a gateway's
//!   502/504, an unreadable 2xx): "outcome unknown", kept for the TTL; retries
//!   get `Error::CreateOutcomeUnknown` rather than a second paid job.
//!
//! A claim whose owner died expires a little after `--upstream-timeout`.
//! Keys hold a SHA-256 of the token, never the token itself.

mod memory;
mod redis;
mod traced;

use std::{
    collections::HashMap,
    fmt,
    future::Future,
    str::FromStr,
    sync::{Arc, Mutex},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::{sync::watch, time::Instant};
use tracing::{Instrument, Span, debug, warn};

use crate::{error::Error, job::Token, upstream::redact_url};

/// How often a caller looks at a key another replica's create holds.
const POLL_EVERY: Duration = Duration::from_millis(50);
/// How much longer than `--upstream-timeout` a claim lives: a create ends
/// within that bound, so a claim still there after it lost its owner.
const CLAIM_MARGIN: Duration = Duration::from_secs(5);
/// Prefix of every key, versioned with the record format.
const KEY_PREFIX: &str = "piclumen-grpc:request-id:v1:";

/// Where `request_id` outcomes are kept (`--idempotency-store`).
#[derive(Clone, Default, PartialEq, Eq)]
pub enum StoreLocation {
    /// In this process only (the default).
    #[default]
    Memory,
    /// In Redis, shared by every replica: a `redis://` or `rediss://` URL.
    Redis(String),
}

impl FromStr for StoreLocation {
    type Err = String;

    /// `memory`, `redis://HOST:PORT[/DB]` or `rediss://HOST:PORT[/DB]`.
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s == "memory" {
            return Ok(Self::Memory);
        }
        if !(s.starts_with("redis://") || s.starts_with("rediss://")) {
            return Err(
                "expected `memory`, `redis://HOST:PORT[/DB]` or `rediss://HOST:PORT[/DB]`".into(),
            );
        }
        ::redis::Client::open(s).map_err(|e| format!("not a usable Redis URL: {e}"))?;
        Ok(Self::Redis(s.to_owned()))
    }
}

impl StoreLocation {
    /// The backend's name, for spans.
    fn system(&self) -> &'static str {
        match self {
            Self::Memory => "memory",
            Self::Redis(_) => "redis",
        }
    }
}

impl fmt::Display for StoreLocation {
    /// The location with any password left out, for logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Memory => f.write_str("memory"),
            Self::Redis(url) => f.write_str(&redact_url(url)),
        }
    }
}

impl fmt::Debug for StoreLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// What a successful create returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Created {
    /// Piclumen's job id.
    pub mark_id: String,
    /// The seed sent.
    pub seed: i64,
}

/// A request's parameters as a SHA-256: the same in every process and
/// version, so replicas agree on what "the same request" is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fingerprint(String);

impl Fingerprint {
    /// The fingerprint of an encoded request.
    pub fn of(bytes: &[u8]) -> Self {
        Self(hex(
            ring::digest::digest(&ring::digest::SHA256, bytes).as_ref()
        ))
    }
}

/// The backend failed or could not be reached; the text is for the log.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub(crate) struct StoreError(pub(crate) String);

/// What a backend keeps under a key (as JSON in Redis).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub(crate) enum Record {
    /// A create is running; `owner` names that claim.
    Pending { owner: String, fingerprint: String },
    /// The create succeeded.
    Done {
        fingerprint: String,
        mark_id: String,
        seed: i64,
    },
    /// The create was sent but no usable reply came.
    Unknown { fingerprint: String, cause: String },
}

impl Record {
    fn fingerprint(&self) -> &str {
        match self {
            Self::Pending { fingerprint, .. }
            | Self::Done { fingerprint, .. }
            | Self::Unknown { fingerprint, .. } => fingerprint,
        }
    }
}

/// Where records live. Keys arrive hashed; values expire on their own.
#[async_trait::async_trait]
pub(crate) trait Backend: Send + Sync + fmt::Debug {
    /// The live record under `key`, if any.
    async fn get(&self, key: &str) -> Result<Option<Record>, StoreError>;
    /// Stores `claim` under `key` for `ttl` unless the key holds a live
    /// record; true when stored (the caller then owns the key).
    async fn claim(&self, key: &str, claim: &Record, ttl: Duration) -> Result<bool, StoreError>;
    /// If `key` still holds `claim` (or nothing), replaces it with `outcome`
    /// for `ttl`, or removes it when `outcome` is `None`. Leaves another
    /// owner's record alone.
    async fn settle(
        &self,
        key: &str,
        claim: &Record,
        outcome: Option<&Record>,
        ttl: Duration,
    ) -> Result<(), StoreError>;
}

type Outcome = Result<Created, Error>;

/// The store; cheap to clone.
#[derive(Debug, Clone)]
pub struct IdempotencyStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    backend: Box<dyn Backend>,
    ttl: Duration,
    claim_ttl: Duration,
    /// Creates this process runs, by key: local callers wait on these
    /// instead of polling the backend.
    running: Mutex<HashMap<String, watch::Receiver<Option<Outcome>>>>,
}

impl IdempotencyStore {
    /// A store at `location` keeping outcomes for `ttl`; claims outlive
    /// `upstream_timeout` (the bound on one create) by a small margin. Redis
    /// is connected lazily: an unreachable one fails calls, not the start.
    pub fn open(location: &StoreLocation, ttl: Duration, upstream_timeout: Duration) -> Self {
        let backend: Box<dyn Backend> = match location {
            StoreLocation::Memory => Box::new(memory::MemoryBackend::new(ttl)),
            StoreLocation::Redis(url) => Box::new(redis::RedisBackend::new(url)),
        };
        let backend = traced::wrap(backend, location.system());
        Self {
            inner: Arc::new(Inner {
                backend,
                ttl,
                claim_ttl: upstream_timeout + CLAIM_MARGIN,
                running: Mutex::default(),
            }),
        }
    }

    /// Runs one create per (token, request_id) within the window and returns
    /// its outcome, waiting at most until `deadline`.
    ///
    /// `start` is called only when this call is about to claim the key: it
    /// may refuse (the per-token guard) or return the create, which then
    /// runs in its own task to its end. A different `fingerprint` under the
    /// same key is refused.
    pub async fn run<S, F>(
        &self,
        token: &Token,
        request_id: &str,
        fingerprint: &Fingerprint,
        deadline: Option<Instant>,
        start: S,
    ) -> Result<Created, Error>
    where
        S: FnMut() -> Result<F, Error> + Send,
        F: Future<Output = Outcome> + Send + 'static,
    {
        let key = key(token, request_id);
        let work = self.run_inner(key, fingerprint, start);
        match deadline {
            Some(deadline) => tokio::time::timeout_at(deadline, work)
                .await
                .unwrap_or_else(|_| {
                    Err(Error::DeadlineExceeded(
                        "the caller's deadline ran out before Piclumen answered; the create goes \
                         on: retry with the same request_id for its outcome"
                            .into(),
                    ))
                }),
            None => work.await,
        }
    }

    async fn run_inner<S, F>(
        &self,
        key: String,
        fingerprint: &Fingerprint,
        mut start: S,
    ) -> Result<Created, Error>
    where
        S: FnMut() -> Result<F, Error> + Send,
        F: Future<Output = Outcome> + Send + 'static,
    {
        loop {
            let record = self.inner.backend.get(&key).await.map_err(unavailable)?;
            let Some(record) = record else {
                let create = start()?;
                // Claimed and started in a task of its own, so a caller that
                // leaves half-way through the claim leaves no orphan claim.
                let store = self.clone();
                let fingerprint = fingerprint.0.clone();
                let claiming = tokio::spawn(
                    {
                        let key = key.clone();
                        async move { store.claim_and_start(key, fingerprint, create).await }
                    }
                    .instrument(Span::current()),
                );
                match claiming.await.map_err(|_| Error::ShuttingDown)?? {
                    Some(rx) => return wait(rx).await,
                    // Another call claimed it first: look again.
                    None => continue,
                }
            };
            if record.fingerprint() != fingerprint.0 {
                return Err(Error::InvalidArgument {
                    field: "request_id",
                    message: "already used with different parameters".into(),
                });
            }
            match record {
                Record::Done { mark_id, seed, .. } => {
                    hits().increment(1);
                    return Ok(Created { mark_id, seed });
                }
                Record::Unknown { cause, .. } => return Err(Error::CreateOutcomeUnknown { cause }),
                Record::Pending { .. } => {
                    let local = lock(&self.inner.running).get(&key).cloned();
                    match local {
                        Some(rx) => {
                            hits().increment(1);
                            return wait(rx).await;
                        }
                        // Another replica's create (or ours, a moment before
                        // it is registered): look again shortly.
                        None => tokio::time::sleep(POLL_EVERY).await,
                    }
                }
            }
        }
    }

    /// Claims `key`; when that succeeds, starts `create` in its own task and
    /// returns the channel its outcome arrives on.
    async fn claim_and_start<F>(
        &self,
        key: String,
        fingerprint: String,
        create: F,
    ) -> Result<Option<watch::Receiver<Option<Outcome>>>, Error>
    where
        F: Future<Output = Outcome> + Send + 'static,
    {
        let claim = Record::Pending {
            owner: format!("{:032x}", rand::random::<u128>()),
            fingerprint: fingerprint.clone(),
        };
        let inner = &self.inner;
        match inner.backend.claim(&key, &claim, inner.claim_ttl).await {
            Ok(true) => {}
            Ok(false) => return Ok(None),
            Err(e) => {
                // The claim may have been stored before the reply was lost:
                // take it back if it is there, so retries need not wait for
                // it to expire.
                let store = self.clone();
                tokio::spawn(async move {
                    let _ = store
                        .inner
                        .backend
                        .settle(&key, &claim, None, Duration::ZERO)
                        .await;
                });
                return Err(unavailable(e));
            }
        }
        let (tx, rx) = watch::channel(None);
        lock(&inner.running).insert(key.clone(), rx.clone());
        let guard = ClaimGuard {
            store: self.clone(),
            key,
            claim,
            rx: rx.clone(),
            settled: false,
        };
        tokio::spawn(
            async move {
                let outcome = create.await;
                guard.finish(fingerprint, outcome, tx).await;
            }
            .instrument(Span::current()),
        );
        Ok(Some(rx))
    }

    /// Writes a create's outcome over its claim, retrying while the backend
    /// is unreachable, for as long as the outcome would be kept.
    async fn settle_until_kept(&self, key: &str, claim: &Record, record: Option<&Record>) {
        let ttl = if record.is_some() {
            self.inner.ttl
        } else {
            self.inner.claim_ttl
        };
        let give_up = Instant::now() + ttl;
        let mut delay = Duration::from_millis(100);
        loop {
            match self.inner.backend.settle(key, claim, record, ttl).await {
                Ok(()) => return,
                Err(e) if Instant::now() + delay >= give_up => {
                    warn!(error = %e, "could not record a create's outcome in the request_id store");
                    return;
                }
                Err(_) => {
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
            }
        }
    }
}

/// Owns a claim while its create runs: records the outcome when the create
/// ends, and lets go of the claim if the task ends any other way (a panic,
/// the runtime shutting down).
struct ClaimGuard {
    store: IdempotencyStore,
    key: String,
    claim: Record,
    rx: watch::Receiver<Option<Outcome>>,
    settled: bool,
}

impl ClaimGuard {
    async fn finish(
        mut self,
        fingerprint: String,
        outcome: Outcome,
        tx: watch::Sender<Option<Outcome>>,
    ) {
        let record = match &outcome {
            Ok(created) => {
                debug!(mark_id = %created.mark_id, "create with request_id finished");
                Some(Record::Done {
                    fingerprint,
                    mark_id: created.mark_id.clone(),
                    seed: created.seed,
                })
            }
            Err(error) if error.create_outcome_unknown() => {
                warn!(%error, "create with request_id sent without a usable reply: its outcome is unknown and kept as such");
                Some(Record::Unknown {
                    fingerprint,
                    cause: error.to_string(),
                })
            }
            Err(error) => {
                warn!(%error, "create with request_id failed; a retry may create");
                None
            }
        };
        self.settled = true;
        let backend = &self.store.inner.backend;
        let ttl = match record {
            Some(_) => self.store.inner.ttl,
            None => self.store.inner.claim_ttl,
        };
        let first = backend
            .settle(&self.key, &self.claim, record.as_ref(), ttl)
            .await;
        // Callers here learn the outcome at once, whatever the backend says.
        let _ = tx.send(Some(outcome));
        self.forget_running();
        if first.is_err() {
            self.store
                .settle_until_kept(&self.key, &self.claim, record.as_ref())
                .await;
        }
    }

    fn forget_running(&self) {
        let mut running = lock(&self.store.inner.running);
        if running
            .get(&self.key)
            .is_some_and(|rx| rx.same_channel(&self.rx))
        {
            running.remove(&self.key);
        }
    }
}

impl Drop for ClaimGuard {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        self.forget_running();
        let store = self.store.clone();
        let key = std::mem::take(&mut self.key);
        let claim = self.claim.clone();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let _ = store
                    .inner
                    .backend
                    .settle(&key, &claim, None, Duration::ZERO)
                    .await;
            });
        }
    }
}

async fn wait(mut rx: watch::Receiver<Option<Outcome>>) -> Outcome {
    let outcome = rx
        .wait_for(Option::is_some)
        .await
        .map_err(|_| Error::ShuttingDown)?
        .clone();
    outcome.unwrap_or(Err(Error::ShuttingDown))
}

fn unavailable(_: StoreError) -> Error {
    // The backend logs the cause once per outage.
    Error::IdempotencyStoreUnavailable
}

/// The store key of (token, request_id): a SHA-256 of both, length-prefixed
/// so no two pairs share an input.
fn key(token: &Token, request_id: &str) -> String {
    let mut hash = ring::digest::Context::new(&ring::digest::SHA256);
    let token = token.expose().as_bytes();
    hash.update(&(token.len() as u64).to_be_bytes());
    hash.update(token);
    hash.update(request_id.as_bytes());
    format!("{KEY_PREFIX}{}", hex(hash.finish().as_ref()))
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// GenerateImage calls answered by a create already done or running for
/// their key (no create of their own); resolved once, not per call.
fn hits() -> &'static metrics::Counter {
    static HITS: std::sync::OnceLock<metrics::Counter> = std::sync::OnceLock::new();
    HITS.get_or_init(|| metrics::counter!("piclumen_idempotency_hits_total"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_hide_the_token_and_separate_pairs() {
        let token = Token::new("secret-token").expect("token");
        let k = key(&token, "r1");
        assert!(k.starts_with(KEY_PREFIX));
        assert!(!k.contains("secret"));
        assert_eq!(k, key(&token, "r1"), "stable");
        assert_ne!(k, key(&token, "r2"));
        let other = Token::new("secret-toke").expect("token");
        assert_ne!(key(&other, "nr1"), k, "length-prefixed");
    }

    #[test]
    fn locations_parse_and_hide_passwords() {
        assert_eq!("memory".parse(), Ok(StoreLocation::Memory));
        let redis: StoreLocation = "redis://:hunter2@127.0.0.1:6379/2".parse().expect("redis");
        assert!(matches!(redis, StoreLocation::Redis(_)));
        assert!(!redis.to_string().contains("hunter2"));
        assert!(!format!("{redis:?}").contains("hunter2"));
        assert!(
            "rediss://cache.internal:6380"
                .parse::<StoreLocation>()
                .is_ok()
        );
        assert!("http://127.0.0.1:6379".parse::<StoreLocation>().is_err());
        assert!("mem".parse::<StoreLocation>().is_err());
    }

    #[test]
    fn fingerprints_are_stable_sha256() {
        assert_eq!(
            Fingerprint::of(b"abc").0,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
