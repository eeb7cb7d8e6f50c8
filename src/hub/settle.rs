//! How a check that waited on a job's watch channel (a CheckImage with
//! `wait`) gets its answer: the channel's latest state when it is recent
//! enough (`StaleIfError::vouches`), so that waiting costs no status call
//! of its own; else the answer any CheckImage would get now (`Hub::check`:
//! a fresh call, a stale-if-error state, or the trouble).

use std::time::SystemTime;

use tokio::time::Instant;

use super::{Hub, HubError};
use crate::job::{JobStatus, Token};

impl Hub {
    /// The answer to a waiting check of `mark_id` whose channel shows
    /// `status`; waits at most until `deadline` when it must ask.
    pub async fn settle(
        &self,
        token: &Token,
        mark_id: &str,
        status: JobStatus,
        deadline: Option<Instant>,
    ) -> Result<JobStatus, HubError> {
        // A state nobody stamped (a replica too old to say) counts as new.
        let age = status
            .observed_at
            .and_then(|at| SystemTime::now().duration_since(at).ok())
            .unwrap_or_default();
        if self.inner.config.stale().vouches(&status, age) {
            return Ok(status);
        }
        self.check(token, mark_id, deadline).await
    }
}
