//! The in-process backend (`--idempotency-store memory`, the default): a
//! map under a mutex, expired entries swept by a background task that ends
//! with the store, so an idle server lets go of them too. Nothing is shared
//! with other processes.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::time::Instant;

use super::{Backend, Record, StoreError, lock};

type Entries = HashMap<String, (Record, Instant)>;

/// See the module docs.
#[derive(Debug)]
pub(super) struct MemoryBackend {
    entries: Arc<Mutex<Entries>>,
}

impl MemoryBackend {
    /// A backend swept often enough for records kept `ttl`.
    pub(super) fn new(ttl: Duration) -> Self {
        let entries: Arc<Mutex<Entries>> = Arc::default();
        let weak = Arc::downgrade(&entries);
        let every = (ttl / 4).clamp(Duration::from_millis(100), Duration::from_secs(10));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(entries) = weak.upgrade() else {
                    return;
                };
                let mut entries = lock(&entries);
                let now = Instant::now();
                entries.retain(|_, (_, expires)| *expires > now);
                entries.shrink_to_fit();
            }
        });
        Self { entries }
    }
}

/// The live record of `key`: expired but not yet swept is as good as absent.
fn live<'a>(entries: &'a Entries, key: &str) -> Option<&'a Record> {
    entries
        .get(key)
        .filter(|(_, expires)| *expires > Instant::now())
        .map(|(record, _)| record)
}

#[async_trait::async_trait]
impl Backend for MemoryBackend {
    async fn get(&self, key: &str) -> Result<Option<Record>, StoreError> {
        Ok(live(&lock(&self.entries), key).cloned())
    }

    async fn claim(&self, key: &str, claim: &Record, ttl: Duration) -> Result<bool, StoreError> {
        let mut entries = lock(&self.entries);
        if live(&entries, key).is_some() {
            return Ok(false);
        }
        entries.insert(key.to_owned(), (claim.clone(), Instant::now() + ttl));
        Ok(true)
    }

    async fn settle(
        &self,
        key: &str,
        claim: &Record,
        outcome: Option<&Record>,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let mut entries = lock(&self.entries);
        if live(&entries, key).is_some_and(|r| r != claim) {
            return Ok(());
        }
        match outcome {
            Some(record) => {
                entries.insert(key.to_owned(), (record.clone(), Instant::now() + ttl));
            }
            None => {
                entries.remove(key);
            }
        }
        Ok(())
    }
}
