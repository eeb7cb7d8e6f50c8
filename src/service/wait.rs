//! CheckImage that waits for a change (long polling), transport-free.
//!
//! A waiting check joins its job's watch channel (`Hub::subscribe`), the
//! one the token's rounds already feed: a thousand callers waiting on a
//! hundred jobs cost Piclumen what a hundred watches cost, and each learns
//! of a change when the round that saw it lands. `Wait` decides (when to
//! stop, which snapshot answers); `wait_on` only sleeps and listens.
//!
//! The rules:
//! - no `wait` (or zero), or no `etag`: answer at once, as without waiting
//!   (there is nothing to compare with; the answer's etag is what the next
//!   call passes);
//! - a state whose etag differs from the caller's answers at once, and so
//!   does a terminal state or the end of the job's watch (an error);
//! - otherwise the check waits until the state changes, or until `wait`,
//!   cut to `--max-check-wait` and ended early enough before the caller's
//!   own deadline to answer within it, and then answers the current state:
//!   the end of a wait is an answer, never DEADLINE_EXCEEDED;
//! - a draining server ends every wait at once with the current state.

use std::time::Duration;

use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;

use crate::{
    hub::{HubError, Snapshot, Subscription},
    job::JobStatus,
};

/// Most time kept back from a caller's deadline to answer within it.
const MAX_MARGIN: Duration = Duration::from_secs(1);

/// What a caller asks to wait for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WaitFor {
    /// How long to wait at most (before `--max-check-wait` cuts it).
    pub wait: Duration,
    /// The etag the caller last saw.
    pub etag: String,
}

impl WaitFor {
    /// The wait the server grants: `wait` cut to `max`.
    pub fn granted(&self, max: Duration) -> Duration {
        self.wait.min(max)
    }
}

/// One waiting check's rules, fixed when it starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Wait {
    etag: String,
    /// When the wait ends with the current state.
    pub(super) until: Instant,
}

/// What a snapshot means for a waiting check.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Step {
    /// Answer with this state now.
    Answer(JobStatus),
    /// The job's watch ended: answer with this error.
    Fail(HubError),
    /// Nothing new: keep waiting.
    Wait,
}

impl Wait {
    /// The wait `request` asks for, started at `now` and cut to `max` and
    /// to the caller's `deadline` (less a tenth of the time left, at most
    /// a second, to answer in); `None` when the check answers at once.
    pub(super) fn start(
        request: &WaitFor,
        max: Duration,
        deadline: Option<Instant>,
        now: Instant,
    ) -> Option<Self> {
        if request.etag.is_empty() {
            return None;
        }
        let mut until = now + request.granted(max);
        if let Some(deadline) = deadline {
            let left = deadline.saturating_duration_since(now);
            until = until.min(now + left - (left / 10).min(MAX_MARGIN));
        }
        (until > now).then(|| Self {
            etag: request.etag.clone(),
            until,
        })
    }

    /// Until when the check may still ask Piclumen once the wait is over
    /// (its channel's state too old to answer): the caller's deadline, or
    /// without one the time a caller's margin would have kept.
    pub(super) fn ask_until(&self, deadline: Option<Instant>) -> Instant {
        deadline.unwrap_or(self.until + MAX_MARGIN)
    }

    /// What `snapshot`, the job's channel now, means.
    pub(super) fn step(&self, snapshot: &Snapshot) -> Step {
        match snapshot {
            Snapshot::Waiting => Step::Wait,
            Snapshot::Status(status)
                if status.state.is_terminal() || !status.etag().is(&self.etag) =>
            {
                Step::Answer(status.clone())
            }
            Snapshot::Status(_) => Step::Wait,
            Snapshot::Ended(error) => Step::Fail(error.clone()),
        }
    }
}

/// How a wait ended.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Waited {
    /// The state to answer with (changed, terminal, or current at the end).
    Status(JobStatus),
    /// The job's watch ended with this error.
    Failed(HubError),
    /// The wait ended before any state was known, or the channel closed
    /// unfinished: the check asks as any other.
    Unknown,
}

/// Waits on `subscription` as `wait` says, or until `draining`.
pub(super) async fn wait_on(
    wait: &Wait,
    subscription: Subscription,
    draining: &CancellationToken,
) -> Waited {
    let mut rx = subscription.rx.clone();
    loop {
        let step = wait.step(&rx.borrow_and_update());
        match step {
            Step::Answer(status) => return Waited::Status(status),
            Step::Fail(error) => return Waited::Failed(error),
            Step::Wait => {}
        }
        tokio::select! {
            biased;
            () = draining.cancelled() => break,
            () = sleep_until(wait.until) => break,
            changed = rx.changed() => if changed.is_err() {
                return Waited::Unknown;
            },
        }
    }
    match &*rx.borrow() {
        Snapshot::Status(status) => Waited::Status(status.clone()),
        Snapshot::Ended(error) => Waited::Failed(error.clone()),
        Snapshot::Waiting => Waited::Unknown,
    }
}
