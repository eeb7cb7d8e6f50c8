//! A span around each call of the request_id store's backend (`get`,
//! `claim`, `renew`, `settle`), when spans are exported. Keys are hashes and stay
//! out of the spans anyway; the store's URL (and password) never appears.

use std::time::Duration;

use tracing::Instrument;

use super::{Backend, Entry, Record, StoreError};

/// `backend` with spans around its calls; `backend` itself with export off.
pub(super) fn wrap(backend: Box<dyn Backend>, system: &'static str) -> Box<dyn Backend> {
    if crate::otel::enabled() {
        Box::new(Traced {
            inner: backend,
            system,
        })
    } else {
        backend
    }
}

#[derive(Debug)]
struct Traced {
    inner: Box<dyn Backend>,
    /// `memory` or `redis`.
    system: &'static str,
}

impl Traced {
    async fn traced<T>(
        &self,
        operation: &'static str,
        call: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let span = crate::otel::store_span(operation, self.system);
        let result = call.instrument(span.clone()).await;
        crate::otel::end_store_span(&span, result.is_ok());
        result
    }
}

#[async_trait::async_trait]
impl Backend for Traced {
    async fn get(&self, key: &str) -> Result<Option<Entry>, StoreError> {
        self.traced("get", self.inner.get(key)).await
    }

    async fn claim(&self, key: &str, claim: &Record, lease: Duration) -> Result<bool, StoreError> {
        self.traced("claim", self.inner.claim(key, claim, lease))
            .await
    }

    async fn renew(
        &self,
        key: &str,
        owner: &str,
        claim: &Record,
        keep: Duration,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        self.traced("renew", self.inner.renew(key, owner, claim, keep, lease))
            .await
    }

    async fn settle(
        &self,
        key: &str,
        owner: &str,
        outcome: Option<&Record>,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.traced("settle", self.inner.settle(key, owner, outcome, ttl))
            .await
    }
}
