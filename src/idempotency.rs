//! Remembers successful GenerateImage calls by (token, request_id), so a
//! retried call returns the first mark id instead of paying for a second
//! generation.
//!
//! The first call for a key runs the create in its own task, so the outcome
//! is recorded even if that caller goes away; concurrent calls with the same
//! key wait for it and share its outcome. Only successes are kept: a failed
//! create may be retried and creates again. The store lives in this process
//! only (see the README on running several instances).

use std::{
    collections::HashMap,
    future::Future,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{sync::watch, time::Instant};

use crate::{error::Error, job::Token};

/// What a successful create returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Created {
    /// Piclumen's job id.
    pub mark_id: String,
    /// The seed sent.
    pub seed: i64,
}

type Outcome = Option<Result<Created, Error>>;

#[derive(Debug)]
enum Entry {
    InFlight {
        fingerprint: u64,
        rx: watch::Receiver<Outcome>,
    },
    Done {
        fingerprint: u64,
        created: Created,
        at: Instant,
    },
}

type Key = (Token, String);

/// The store; cheap to clone.
#[derive(Debug, Clone)]
pub struct IdempotencyStore {
    ttl: Duration,
    entries: Arc<Mutex<HashMap<Key, Entry>>>,
}

impl IdempotencyStore {
    /// A store keeping successes for `ttl`. Expired entries are swept by a
    /// background task (which ends with the store), so an idle server lets
    /// go of them too.
    pub fn new(ttl: Duration) -> Self {
        let store = Self {
            ttl,
            entries: Arc::default(),
        };
        let entries = Arc::downgrade(&store.entries);
        let every = (ttl / 4).clamp(Duration::from_millis(100), Duration::from_secs(10));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(entries) = entries.upgrade() else {
                    return;
                };
                let mut entries = entries
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                let now = Instant::now();
                entries.retain(|_, e| match e {
                    Entry::Done { at, .. } => now.duration_since(*at) < ttl,
                    Entry::InFlight { .. } => true,
                });
                entries.shrink_to_fit();
            }
        });
        store
    }

    /// Runs `create` once per (token, request_id) within the window;
    /// `fingerprint` identifies the request's parameters, and a different
    /// one under the same key is refused.
    pub async fn run<F>(
        &self,
        token: &Token,
        request_id: &str,
        fingerprint: u64,
        create: F,
    ) -> Result<Created, Error>
    where
        F: Future<Output = Result<Created, Error>> + Send + 'static,
    {
        let key = (token.clone(), request_id.to_owned());
        let mut rx = {
            let mut entries = self.lock();
            // Expired but not yet swept: as good as absent.
            if matches!(entries.get(&key), Some(Entry::Done { at, .. }) if at.elapsed() >= self.ttl)
            {
                entries.remove(&key);
            }
            match entries.get(&key) {
                Some(Entry::Done {
                    fingerprint: f,
                    created,
                    ..
                }) => {
                    check_fingerprint(*f, fingerprint)?;
                    return Ok(created.clone());
                }
                Some(Entry::InFlight { fingerprint: f, rx }) => {
                    check_fingerprint(*f, fingerprint)?;
                    rx.clone()
                }
                None => {
                    let (tx, rx) = watch::channel(None);
                    entries.insert(
                        key.clone(),
                        Entry::InFlight {
                            fingerprint,
                            rx: rx.clone(),
                        },
                    );
                    let store = self.clone();
                    tokio::spawn(async move {
                        let outcome = create.await;
                        store.settle(key, fingerprint, &outcome);
                        // Nobody waiting is fine: the outcome is recorded.
                        let _ = tx.send(Some(outcome));
                    });
                    rx
                }
            }
        };
        let outcome = rx
            .wait_for(Option::is_some)
            .await
            .map_err(|_| Error::ShuttingDown)?;
        outcome.clone().unwrap_or(Err(Error::ShuttingDown))
    }

    fn settle(&self, key: Key, fingerprint: u64, outcome: &Result<Created, Error>) {
        let mut entries = self.lock();
        match outcome {
            Ok(created) => {
                entries.insert(
                    key,
                    Entry::Done {
                        fingerprint,
                        created: created.clone(),
                        at: Instant::now(),
                    },
                );
            }
            Err(_) => {
                entries.remove(&key);
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Entry>> {
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn check_fingerprint(stored: u64, given: u64) -> Result<(), Error> {
    if stored == given {
        Ok(())
    } else {
        Err(Error::InvalidArgument {
            field: "request_id",
            message: "already used with different parameters".into(),
        })
    }
}
