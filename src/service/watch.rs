//! The WatchImage stream, transport-free: the job's states as they change,
//! a heartbeat repeating the last state when quiet, and an end at a terminal
//! state, at the caller's deadline or the maximum watch time, when the
//! server drains (SHUTTING_DOWN), or when the hub ends the job's channel.

use std::time::Duration;

use futures_util::Stream;
use tokio::{
    sync::OwnedSemaphorePermit,
    time::{Instant, sleep_until},
};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::admission::CallToken;
use crate::{
    error::Error,
    hub::{Snapshot, Subscription},
    job::JobStatus,
};

/// One message of a watch.
#[derive(Debug, Clone, PartialEq)]
pub struct WatchEvent {
    /// The job's state.
    pub status: JobStatus,
    /// True when this repeats the last state after a quiet spell.
    pub heartbeat: bool,
}

/// Everything one watch stream holds.
#[derive(Debug)]
pub(super) struct Watch {
    pub(super) call: CallToken,
    pub(super) subscription: Subscription,
    /// The stream's place among `--max-watches`, freed when it ends.
    pub(super) slot: OwnedSemaphorePermit,
    /// When the stream ends, and the DEADLINE_EXCEEDED message it ends with.
    pub(super) end_at: Instant,
    pub(super) end_message: String,
    pub(super) heartbeat: Duration,
    pub(super) draining: CancellationToken,
}

impl Watch {
    /// The end of a watch (by `rpc`) started now: the caller's deadline or
    /// the maximum watch time, whichever comes first.
    pub(super) fn end(
        caller_deadline: Option<Instant>,
        max_watch: Duration,
        rpc: &str,
    ) -> (Instant, String) {
        let max_watch_end = Instant::now() + max_watch;
        match caller_deadline {
            Some(d) if d < max_watch_end => (d, "the caller's deadline was reached".to_owned()),
            _ => (
                max_watch_end,
                format!(
                    "the server's maximum watch time of {} was reached; call {rpc} again",
                    humantime::format_duration(max_watch)
                ),
            ),
        }
    }

    /// The stream of states; an `Err` is its last item.
    pub(super) fn stream(self) -> impl Stream<Item = Result<WatchEvent, Error>> + Send + 'static {
        let Self {
            call,
            subscription,
            slot,
            end_at,
            end_message,
            heartbeat,
            draining,
        } = self;
        async_stream::stream! {
            let _slot = slot;
            let mut rx = subscription.rx.clone();
            let _subscription = subscription;
            let mut last: Option<JobStatus> = None;
            let mut heartbeat_at = Instant::now() + heartbeat;
            loop {
                let snapshot = rx.borrow_and_update().clone();
                match snapshot {
                    Snapshot::Waiting => {}
                    Snapshot::Status(status) => {
                        if last.as_ref() != Some(&status) {
                            yield Ok(WatchEvent { status: status.clone(), heartbeat: false });
                            heartbeat_at = Instant::now() + heartbeat;
                        }
                        let done = status.state.is_terminal();
                        last = Some(status);
                        if done {
                            info!(state = ?last.as_ref().map(|s| s.state), "watch finished");
                            break;
                        }
                    }
                    Snapshot::Ended(error) => {
                        let error = call.hub_error(error);
                        warn!(%error, "watch ended with an error");
                        yield Err(error);
                        break;
                    }
                }
                tokio::select! {
                    biased;
                    () = draining.cancelled() => {
                        yield Err(Error::ShuttingDown);
                        break;
                    }
                    () = sleep_until(end_at) => {
                        yield Err(Error::DeadlineExceeded(end_message));
                        break;
                    }
                    changed = rx.changed() => {
                        if changed.is_err() {
                            yield Err(Error::WatchInterrupted);
                            break;
                        }
                    }
                    () = sleep_until(heartbeat_at), if last.is_some() => {
                        // The same state confirmed since is set without a
                        // wake-up: repeat it with its newer `observed_at`.
                        let confirmed = match &*rx.borrow() {
                            Snapshot::Status(now) if last.as_ref() == Some(now) => Some(now.clone()),
                            _ => None,
                        };
                        if confirmed.is_some() {
                            last = confirmed;
                        }
                        if let Some(status) = &last {
                            yield Ok(WatchEvent { status: status.clone(), heartbeat: true });
                        }
                        heartbeat_at = Instant::now() + heartbeat;
                    }
                }
            }
        }
    }
}
