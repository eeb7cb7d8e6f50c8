//! The in-process backend (`--idempotency-store memory`, the default): a
//! map under a mutex, expired entries swept by a background task that ends
//! with the store, so an idle server lets go of them too. A claim's lease
//! is an instant beside its record. Nothing is shared with other processes.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::time::Instant;

use super::{Backend, Entry, Record, StoreError, lock};

/// A record, when it expires, and when its claim's lease ends.
#[derive(Debug)]
struct Slot {
    record: Record,
    expires: Instant,
    lease: Instant,
}

type Entries = HashMap<String, Slot>;

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
                entries.retain(|_, slot| slot.expires > now);
                entries.shrink_to_fit();
            }
        });
        Self { entries }
    }
}

/// The live slot of `key`: expired but not yet swept is as good as absent.
fn live<'a>(entries: &'a Entries, key: &str) -> Option<&'a Slot> {
    entries
        .get(key)
        .filter(|slot| slot.expires > Instant::now())
}

/// Whether `slot` is a claim of `owner`.
fn owned_by(slot: &Slot, owner: &str) -> bool {
    matches!(&slot.record, Record::Pending { owner: o, .. } if o == owner)
}

#[async_trait::async_trait]
impl Backend for MemoryBackend {
    async fn get(&self, key: &str) -> Result<Option<Entry>, StoreError> {
        Ok(live(&lock(&self.entries), key).map(|slot| Entry {
            record: slot.record.clone(),
            held: slot.lease > Instant::now(),
        }))
    }

    async fn claim(&self, key: &str, claim: &Record, lease: Duration) -> Result<bool, StoreError> {
        let mut entries = lock(&self.entries);
        let now = Instant::now();
        let free = live(&entries, key).is_none_or(|slot| {
            matches!(slot.record, Record::Pending { sent: false, .. }) && slot.lease <= now
        });
        if !free {
            return Ok(false);
        }
        let slot = Slot {
            record: claim.clone(),
            expires: now + lease,
            lease: now + lease,
        };
        entries.insert(key.to_owned(), slot);
        Ok(true)
    }

    async fn renew(
        &self,
        key: &str,
        owner: &str,
        claim: &Record,
        keep: Duration,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        let mut entries = lock(&self.entries);
        if !live(&entries, key).is_some_and(|slot| owned_by(slot, owner)) {
            return Ok(false);
        }
        let now = Instant::now();
        let slot = Slot {
            record: claim.clone(),
            expires: now + keep,
            lease: now + lease,
        };
        entries.insert(key.to_owned(), slot);
        Ok(true)
    }

    async fn settle(
        &self,
        key: &str,
        owner: &str,
        outcome: Option<&Record>,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let mut entries = lock(&self.entries);
        if live(&entries, key).is_some_and(|slot| !owned_by(slot, owner)) {
            return Ok(());
        }
        match outcome {
            Some(record) => {
                let now = Instant::now();
                let slot = Slot {
                    record: record.clone(),
                    expires: now + ttl,
                    lease: now,
                };
                entries.insert(key.to_owned(), slot);
            }
            None => {
                entries.remove(key);
            }
        }
        Ok(())
    }
}
