//! The store: one create per (token, request_id) at a time, fleet-wide.
//! A caller finds the key's record and acts on it (returns an outcome,
//! waits for a live claim, or claims a free key); the holder of a claim
//! runs the create in a task of its own that renews the claim's lease,
//! records that the create is being sent before sending it, and writes the
//! outcome over the claim at the end.

use std::{
    collections::HashMap,
    future::Future,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    sync::watch,
    time::{Instant, sleep_until},
};
use tracing::{Instrument, Span, debug, warn};

use super::{
    Backend, Created, CreatesInFlight, Entry, Fingerprint, InFlight, Record, StoreError,
    StoreLocation, StoreNamespace, hits, key, key_prefix, lease::Lease, lock, memory, redis,
    traced, unavailable,
};
use crate::{error::Error, job::Token};

/// How often a caller looks at a key another replica's create holds.
const POLL_EVERY: Duration = Duration::from_millis(50);

type Outcome = Result<Created, Error>;

/// The store; cheap to clone.
#[derive(Debug, Clone)]
pub struct IdempotencyStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    backend: Box<dyn Backend>,
    /// The prefix of this deployment's keys (its namespace's).
    prefix: String,
    ttl: Duration,
    /// Creates this process runs, by key: local callers wait on these
    /// instead of polling the backend.
    running: Mutex<HashMap<String, watch::Receiver<Option<Outcome>>>>,
    /// Every create in flight, for the drain.
    creates: CreatesInFlight,
}

/// What a caller was doing when its deadline ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Waiting {
    /// Waiting for a create of this process.
    Here,
    /// Waiting for another replica's create, whose lease is live.
    Elsewhere,
}

impl IdempotencyStore {
    /// A store at `location` keeping outcomes for `ttl` under keys of
    /// `namespace`. Redis is connected lazily: an unreachable one fails
    /// calls, not the start.
    pub fn open(location: &StoreLocation, namespace: &StoreNamespace, ttl: Duration) -> Self {
        let backend: Box<dyn Backend> = match location {
            StoreLocation::Memory => Box::new(memory::MemoryBackend::new(ttl)),
            StoreLocation::Redis(url) => Box::new(redis::RedisBackend::new(url)),
        };
        let backend = traced::wrap(backend, location.system());
        Self {
            inner: Arc::new(Inner {
                backend,
                prefix: key_prefix(namespace),
                ttl,
                running: Mutex::default(),
                creates: CreatesInFlight::default(),
            }),
        }
    }

    /// The creates in flight: the service counts its creates without a
    /// request_id here too, and the drain waits for them all.
    pub fn creates(&self) -> &CreatesInFlight {
        &self.inner.creates
    }

    /// The backend, for tests that play a replica that vanished.
    #[cfg(test)]
    pub(super) fn inner_backend(&self) -> &dyn Backend {
        &*self.inner.backend
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
        let key = key(&self.inner.prefix, token, request_id);
        let mut waiting = Waiting::Here;
        let work = self.run_inner(key, fingerprint, start, &mut waiting);
        let Some(deadline) = deadline else {
            return work.await;
        };
        let result = tokio::time::timeout_at(deadline, work).await;
        result.unwrap_or_else(|_| {
            Err(Error::DeadlineExceeded(match waiting {
                Waiting::Here => "the caller's deadline ran out before Piclumen answered; the \
                                  create goes on: retry with the same request_id for its outcome"
                    .into(),
                Waiting::Elsewhere => "the caller's deadline ran out while another replica runs \
                                       the create for this request_id (its claim is live): retry \
                                       with the same request_id for its outcome"
                    .into(),
            }))
        })
    }

    async fn run_inner<S, F>(
        &self,
        key: String,
        fingerprint: &Fingerprint,
        mut start: S,
        waiting: &mut Waiting,
    ) -> Result<Created, Error>
    where
        S: FnMut() -> Result<F, Error> + Send,
        F: Future<Output = Outcome> + Send + 'static,
    {
        loop {
            let entry = self.inner.backend.get(&key).await.map_err(unavailable)?;
            let entry = match entry {
                Some(entry) if !entry.lapsed_unsent() => entry,
                // Free, or claimed by a holder that died before sending.
                _ => {
                    *waiting = Waiting::Here;
                    let create = start()?;
                    // Claimed and started in a task of its own, so a caller
                    // that leaves half-way through the claim leaves no
                    // orphan claim.
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
                }
            };
            let Entry { record, held } = entry;
            if !fingerprint.matches(record.fingerprint()) {
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
                    if let Some(rx) = local {
                        *waiting = Waiting::Here;
                        hits().increment(1);
                        return wait(rx).await;
                    }
                    if !held {
                        // Sent by a holder that is gone: the job may exist.
                        return Err(Error::CreateOutcomeUnknown {
                            cause: "the replica that sent it stopped before recording its \
                                    outcome"
                                .into(),
                        });
                    }
                    // Another replica's live create (or ours, a moment
                    // before it is registered): look again shortly.
                    *waiting = Waiting::Elsewhere;
                    tokio::time::sleep(POLL_EVERY).await;
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
        let owner = format!("{:032x}", rand::random::<u128>());
        let claim = Record::Pending {
            owner: owner.clone(),
            fingerprint: fingerprint.clone(),
            sent: false,
        };
        let backend = &self.inner.backend;
        let sent_at = Instant::now();
        let lease = Lease::new(sent_at);
        match backend.claim(&key, &claim, lease.term()).await {
            Ok(true) => {}
            Ok(false) => return Ok(None),
            Err(e) => {
                // The claim may have been stored before the reply was lost:
                // take it back if it is there, so retries need not wait for
                // its lease to lapse.
                let store = self.clone();
                tokio::spawn(async move {
                    let _ = store
                        .inner
                        .backend
                        .settle(&key, &owner, None, Duration::ZERO)
                        .await;
                });
                return Err(unavailable(e));
            }
        }
        let (tx, rx) = watch::channel(None);
        lock(&self.inner.running).insert(key.clone(), rx.clone());
        let guard = ClaimGuard {
            store: self.clone(),
            key,
            owner,
            fingerprint,
            rx: rx.clone(),
            sent: false,
            settled: false,
            _in_flight: self.inner.creates.enter(),
        };
        tokio::spawn(guard.run(create, lease, tx).instrument(Span::current()));
        Ok(Some(rx))
    }

    /// Writes a create's outcome over its claim, retrying while the backend
    /// is unreachable, for as long as the outcome would be kept.
    async fn settle_until_kept(&self, key: &str, owner: &str, record: Option<&Record>) {
        let ttl = self.inner.ttl;
        let give_up = Instant::now() + ttl;
        let mut delay = Duration::from_millis(100);
        loop {
            match self.inner.backend.settle(key, owner, record, ttl).await {
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

/// Owns a claim while its create runs: marks it sent, renews its lease,
/// records the outcome when the create ends, and lets go of an unsent
/// claim if the task ends any other way (a panic, the runtime shutting
/// down). A sent claim is never let go: its lease lapses and retries learn
/// that the outcome is unknown.
struct ClaimGuard {
    store: IdempotencyStore,
    key: String,
    owner: String,
    fingerprint: String,
    rx: watch::Receiver<Option<Outcome>>,
    sent: bool,
    settled: bool,
    /// Counted until the outcome is recorded.
    _in_flight: InFlight,
}

impl ClaimGuard {
    async fn run<F>(mut self, create: F, mut lease: Lease, tx: watch::Sender<Option<Outcome>>)
    where
        F: Future<Output = Outcome> + Send + 'static,
    {
        let sent_claim = Record::Pending {
            owner: self.owner.clone(),
            fingerprint: self.fingerprint.clone(),
            sent: true,
        };
        // Recorded before sending: a holder that dies from here on leaves
        // "may exist" behind, never a free key.
        let now = Instant::now();
        let marked = self.renew(&sent_claim, &lease).await;
        let outcome = match marked {
            Ok(true) => {
                lease.renewed(now);
                self.sent = true;
                tokio::select! {
                    outcome = create => outcome,
                    () = self.keep_alive(&sent_claim, lease) => unreachable!("keep_alive never ends"),
                }
            }
            // The claim lapsed before it could be marked (the store was
            // slow), or the store failed: nothing is sent.
            Ok(false) | Err(_) => Err(Error::IdempotencyStoreUnavailable),
        };
        self.finish(outcome, tx).await;
    }

    async fn renew(&self, claim: &Record, lease: &Lease) -> Result<bool, StoreError> {
        let store = &self.store.inner;
        store
            .backend
            .renew(&self.key, &self.owner, claim, store.ttl, lease.term())
            .await
    }

    /// Renews the lease on its schedule; once it is lost, only waits.
    async fn keep_alive(&self, claim: &Record, mut lease: Lease) {
        loop {
            sleep_until(lease.due()).await;
            let now = Instant::now();
            match self.renew(claim, &lease).await {
                Ok(true) => lease.renewed(now),
                Ok(false) => {
                    warn!("a create's request_id claim was taken over while it ran");
                    break;
                }
                Err(error) => {
                    if lease.failed(now) == super::lease::Next::Lapsed {
                        warn!(%error, "a create's request_id claim lapsed: the store did not answer its renewals");
                        break;
                    }
                }
            }
        }
        std::future::pending().await
    }

    async fn finish(mut self, outcome: Outcome, tx: watch::Sender<Option<Outcome>>) {
        let fingerprint = self.fingerprint.clone();
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
        let store = self.store.clone();
        let first = store
            .inner
            .backend
            .settle(&self.key, &self.owner, record.as_ref(), store.inner.ttl)
            .await;
        // Callers here learn the outcome at once, whatever the backend says.
        let _ = tx.send(Some(outcome));
        self.forget_running();
        if first.is_err() {
            store
                .settle_until_kept(&self.key, &self.owner, record.as_ref())
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
        if self.sent {
            return;
        }
        let store = self.store.clone();
        let key = std::mem::take(&mut self.key);
        let owner = std::mem::take(&mut self.owner);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let _ = store
                    .inner
                    .backend
                    .settle(&key, &owner, None, Duration::ZERO)
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
