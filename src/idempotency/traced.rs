//! A span around each call of the request_id store's backend (`get`,
//! `claim`, `settle`), when spans are exported. Keys are hashes and stay
//! out of the spans anyway; the store's URL (and password) never appears.

use std::time::Duration;

use tracing::Instrument;

use super::{Backend, Record, StoreError};

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
    async fn get(&self, key: &str) -> Result<Option<Record>, StoreError> {
        self.traced("get", self.inner.get(key)).await
    }

    async fn claim(&self, key: &str, claim: &Record, ttl: Duration) -> Result<bool, StoreError> {
        self.traced("claim", self.inner.claim(key, claim, ttl))
            .await
    }

    async fn settle(
        &self,
        key: &str,
        claim: &Record,
        outcome: Option<&Record>,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.traced("settle", self.inner.settle(key, claim, outcome, ttl))
            .await
    }
}
