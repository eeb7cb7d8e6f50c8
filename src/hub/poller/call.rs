//! `StatusCall`, one batch-status call as the poller sends it: asked once,
//! and asked again once within its round when it failed in a way a moment
//! may cure (`round::retry_delay` decides), so a lone 503 or reset
//! connection never reaches the token's checks and watches. Only status
//! calls come here; creates are never the hub's, nor retried.

use std::{future::Future, sync::Arc, time::Duration};

use tokio::time::{Instant, sleep};
use tracing::debug;

use super::{Done, round, upstream_metrics};
use crate::{
    hub::{StatusSource, schedule::Id},
    job::Token,
};

/// What a status call needs, to be sent and, once, sent again.
pub(super) struct StatusCall {
    /// Where states come from.
    pub(super) source: Arc<dyn StatusSource>,
    /// The token asked for.
    pub(super) token: Token,
    /// The ids asked.
    pub(super) ids: Arc<[Id]>,
    /// When the schedule decided the call (the start of its round).
    pub(super) sent_at: Instant,
    /// The round's length: a retry never goes out past its end.
    pub(super) interval: Duration,
}

impl StatusCall {
    /// Sends the call now; the future ends with its answer, or the retry's
    /// when the first attempt failed and was retried. A retry counts in
    /// `piclumen_upstream_retries_total{endpoint="status"}` and is an event
    /// on the round's span.
    pub(super) fn send(self) -> impl Future<Output = Done> + Send + 'static {
        let first = self.source.batch_status(&self.token, &self.ids);
        async move {
            let error = match first.await {
                Err(error) => error,
                answered => return answered,
            };
            let elapsed = self.sent_at.elapsed();
            let draw = rand::random::<f64>();
            let Some(delay) = round::retry_delay(&error, elapsed, self.interval, draw) else {
                return Err(error);
            };
            upstream_metrics().retries.increment(1);
            crate::otel::retry_event(&tracing::Span::current(), delay, &error.to_string());
            debug!(%error, ?delay, "status call failed; asking again within the round");
            sleep(delay).await;
            self.source.batch_status(&self.token, &self.ids).await
        }
    }
}
