//! What the service asks of the callers: who is this call ([`CallerGate::admit`]:
//! one SHA-256 of the `x-api-key` and one map lookup, or the mTLS
//! subject), may it create ([`Charge`], taken inside the create itself so
//! a `request_id` retry answered from the store costs nothing), and may it
//! open one more watch ([`WatchPlace`]).
//!
//! Counters live in the memory store (per process) or in Redis (shared by
//! the fleet). When Redis cannot be reached, a create is refused with
//! UNAVAILABLE and nothing is created (fail closed: a budget that cannot be
//! checked is not spent), unless `--callers-fail-open` lets creates through
//! uncounted (the service stays up at the price of the budgets).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use arc_swap::ArcSwap;
use tracing::warn;

use super::{
    Caller, Directory, key_hash,
    limits::{Clock, LimitKind, MemoryCounters, Refusal, Reserved, Windows},
    normalize_subject,
    redis::RedisCounters,
};
use crate::{
    auth::ApiKeys, error::Error, idempotency::StoreNamespace, support::lock,
    upstream::UpstreamError,
};

/// Where the counters live.
#[derive(Debug)]
enum Counters {
    Memory(MemoryCounters),
    Redis(RedisCounters),
}

#[derive(Debug)]
struct Inner {
    directory: ArcSwap<Directory>,
    counters: Counters,
    clock: Clock,
    fail_open: bool,
    watches: Mutex<HashMap<Arc<str>, u64>>,
}

/// See the module docs; cheap to clone. Off (no callers file): every call
/// is unnamed, as before callers existed.
#[derive(Debug, Clone, Default)]
pub struct CallerGate {
    inner: Option<Arc<Inner>>,
}

impl CallerGate {
    /// The callers of `directory`, counted in Redis when `redis` is given
    /// (URL and namespace), else in this process.
    pub fn new(
        directory: Arc<Directory>,
        redis: Option<(&str, &StoreNamespace)>,
        fail_open: bool,
        clock: Clock,
    ) -> Self {
        let counters = match redis {
            Some((url, namespace)) => Counters::Redis(RedisCounters::new(url, namespace)),
            None => Counters::Memory(MemoryCounters::default()),
        };
        Self {
            inner: Some(Arc::new(Inner {
                directory: ArcSwap::new(directory),
                counters,
                clock,
                fail_open,
                watches: Mutex::default(),
            })),
        }
    }

    /// A handle that does not keep the gate alive (for the reloader).
    pub(super) fn downgrade(&self) -> WeakGate {
        WeakGate(self.inner.as_ref().map(Arc::downgrade))
    }

    /// Whether a callers file is in force.
    pub fn is_on(&self) -> bool {
        self.inner.is_some()
    }

    /// The callers in force now.
    pub fn directory(&self) -> Option<Arc<Directory>> {
        self.inner.as_ref().map(|i| i.directory.load_full())
    }

    /// SHA-256 of the text of the version in force (none when off).
    pub(super) fn source(&self) -> Option<[u8; 32]> {
        Some(self.inner.as_ref()?.directory.load().source())
    }

    /// Puts a new version of the file in force; calls under way keep the
    /// caller they were admitted as.
    pub fn replace(&self, directory: Directory) {
        if let Some(inner) = &self.inner {
            inner.directory.store(Arc::new(directory));
        }
    }

    /// Identifies a call: a named caller by the hash of its `x-api-key` or
    /// by its certificate's subject; else an unnamed caller, as before
    /// callers existed (a key of `--api-keys-file`, or a client certificate
    /// the TLS layer verified). Keys nobody holds are refused.
    pub fn admit(
        &self,
        api_keys: Option<&ApiKeys>,
        api_key: Option<&[u8]>,
        peer_cert: Option<&[u8]>,
    ) -> Result<Option<Arc<Caller>>, Error> {
        let Some(inner) = &self.inner else {
            if let Some(keys) = api_keys {
                keys.check(api_key)?;
            }
            return Ok(None);
        };
        let directory = inner.directory.load();
        if let Some(key) = api_key {
            if let Some(caller) = directory.by_key(&key_hash(key)) {
                return Ok(Some(Arc::clone(caller)));
            }
            return match api_keys {
                Some(keys) => keys.check(Some(key)).map(|()| None),
                None => Err(Error::ApiKeyInvalid),
            };
        }
        if let Some(cert) = peer_cert {
            if directory.has_subjects()
                && let Some(caller) = subject_of(cert).and_then(|s| directory.by_subject(&s))
            {
                return Ok(Some(Arc::clone(caller)));
            }
            if api_keys.is_none() {
                // Verified by the TLS layer against --tls-client-ca.
                return Ok(None);
            }
        }
        Err(Error::ApiKeyMissing)
    }

    /// A create of `images` for `caller`, to be taken when it is sent.
    pub fn charge(&self, caller: &Arc<Caller>, images: u64) -> Option<Charge> {
        self.inner.as_ref().map(|inner| Charge {
            inner: Arc::clone(inner),
            caller: Arc::clone(caller),
            images,
        })
    }

    /// One of `caller`'s watch places (`max_watches`, per replica), held
    /// until dropped.
    pub fn watch(&self, caller: &Arc<Caller>) -> Result<WatchPlace, Error> {
        let Some(inner) = &self.inner else {
            return Ok(WatchPlace(None));
        };
        let mut watches = lock(&inner.watches);
        let open = watches.entry(Arc::clone(&caller.name)).or_insert(0);
        if let Some(allowed) = caller.limits.max_watches
            && *open >= allowed
        {
            return Err(refused(
                caller,
                Refusal {
                    limit: LimitKind::MaxWatches,
                    allowed,
                    used: *open,
                    retry_after: std::time::Duration::ZERO,
                },
            ));
        }
        *open += 1;
        Ok(WatchPlace(Some((
            Arc::clone(inner),
            Arc::clone(&caller.name),
        ))))
    }

    /// Images of each caller today and this month, and creates this minute,
    /// from the counters in force (for `usage`).
    pub async fn used(&self, names: &[&str]) -> Result<(Windows, Vec<[u64; 3]>), String> {
        let Some(inner) = &self.inner else {
            return Ok((Windows::at(Clock::System.now_ms()), Vec::new()));
        };
        let now = inner.clock.now_ms();
        let windows = Windows::at(now);
        match &inner.counters {
            Counters::Redis(redis) => redis
                .used(names, &windows)
                .await
                .map(|used| (windows, used))
                .map_err(|e| e.to_string()),
            Counters::Memory(memory) => Ok((
                windows,
                names
                    .iter()
                    .map(|n| {
                        let (day, month) = memory.used(n, now);
                        [day, month, 0]
                    })
                    .collect(),
            )),
        }
    }
}

/// The subject of a DER certificate, normalized.
fn subject_of(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    Some(normalize_subject(&cert.subject().to_string()))
}

/// A refusal as the call's error, counted.
fn refused(caller: &Caller, refusal: Refusal) -> Error {
    caller.bill.refused(refusal.limit);
    Error::CallerQuotaExceeded {
        caller: Arc::clone(&caller.name),
        limit: refusal.limit.as_str(),
        allowed: refusal.allowed,
        used: refusal.used,
        retry_after: refusal.retry_after,
    }
}

/// A [`CallerGate`] that does not keep it alive.
#[derive(Debug)]
pub(super) struct WeakGate(Option<std::sync::Weak<Inner>>);

impl WeakGate {
    /// The gate, while it lives.
    pub(super) fn upgrade(&self) -> Option<CallerGate> {
        let inner = self.0.as_ref()?.upgrade()?;
        Some(CallerGate { inner: Some(inner) })
    }
}

/// A create to be taken from a caller's budget; see [`Charge::take`].
#[derive(Debug)]
pub struct Charge {
    inner: Arc<Inner>,
    caller: Arc<Caller>,
    images: u64,
}

impl Charge {
    /// Takes the create from the caller's windows, or refuses it
    /// (`CALLER_QUOTA_EXCEEDED`, or UNAVAILABLE when Redis is down and the
    /// gate fails closed).
    pub async fn take(self) -> Result<Taken, Error> {
        let Self {
            inner,
            caller,
            images,
        } = self;
        let now = inner.clock.now_ms();
        let taken = match &inner.counters {
            Counters::Memory(memory) => memory.reserve(&caller.name, &caller.limits, images, now),
            Counters::Redis(redis) => {
                let windows = Windows::at(now);
                match redis
                    .reserve(&caller.name, &caller.limits, images, windows)
                    .await
                {
                    Ok(taken) => taken,
                    // No budget to hold for a caller without create
                    // limits: only `usage` misses the create.
                    Err(_) if inner.fail_open || !caller.limits.limits_creates() => {
                        warn!(
                            caller = %caller.name,
                            "callers' counters unreachable: create let through uncounted (--callers-fail-open, or no create limit)"
                        );
                        return Ok(Taken {
                            inner,
                            caller,
                            reserved: None,
                            images,
                        });
                    }
                    // Logged by the counters once per outage.
                    Err(_) => return Err(Error::CallerQuotaUnavailable),
                }
            }
        };
        match taken {
            Ok(reserved) => Ok(Taken {
                inner,
                caller,
                reserved: Some(reserved),
                images,
            }),
            Err(refusal) => Err(refused(&caller, refusal)),
        }
    }
}

/// A create taken from a caller's budget, settled when it ends.
#[derive(Debug)]
pub struct Taken {
    inner: Arc<Inner>,
    caller: Arc<Caller>,
    reserved: Option<Reserved>,
    images: u64,
}

impl Taken {
    /// The create ended (`outcome`: Piclumen's, before it becomes the
    /// caller's error, so a caller's deadline cutting a create already
    /// sent still counts as unknown): accepted images go on the bill; a
    /// create that created nothing is given back; one whose outcome is
    /// unknown keeps its place (the job may exist).
    pub fn settle<T>(self, outcome: &Result<T, UpstreamError>) {
        let error = match outcome {
            Ok(_) => {
                self.caller.bill.images(self.images);
                return;
            }
            Err(error) => error,
        };
        if error.create_outcome_unknown() {
            return;
        }
        let Some(reserved) = self.reserved else {
            return;
        };
        match &self.inner.counters {
            Counters::Memory(memory) => memory.give_back(&reserved),
            Counters::Redis(_) => {
                let inner = self.inner;
                tokio::spawn(async move {
                    if let Counters::Redis(redis) = &inner.counters {
                        let _ = redis.give_back(&reserved).await;
                    }
                });
            }
        }
    }
}

/// A caller's open watch; frees its place when dropped.
#[derive(Debug)]
pub struct WatchPlace(Option<(Arc<Inner>, Arc<str>)>);

impl Drop for WatchPlace {
    fn drop(&mut self) {
        if let Some((inner, name)) = self.0.take() {
            let mut watches = lock(&inner.watches);
            if let Some(open) = watches.get_mut(&name) {
                *open = open.saturating_sub(1);
            }
        }
    }
}
