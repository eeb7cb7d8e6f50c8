//! The WatchImages stream, transport-free: many jobs of one token on one
//! stream. Each job's current state first, then one message per change of
//! any job; a job that cannot be watched (unknown to the token, or refused
//! by Piclumen) gets one error message and the others go on; a heartbeat
//! without a job on a quiet stream; an end right after the last job ended.
//! Like WatchImage, the stream as a whole ends at the caller's deadline or
//! the maximum watch time, when the server drains, or when Piclumen stays
//! unreachable (every job's channel ends with the outage).
//!
//! One stream is one task: the jobs' channels are merged with
//! `SelectAll`, which polls only the channels that woke it, so a change
//! costs the same on a stream of 1,000 jobs as on a stream of one. Per job
//! it keeps the channel, the id and the last etag sent.
//! `Tracker` decides (what is news, when a job or the stream ends, when a
//! heartbeat is due); `Many::stream` only listens, sleeps and sends.

use std::{pin::pin, time::Duration};

use futures_util::{Stream, StreamExt, stream::SelectAll};
use tokio::{
    sync::OwnedSemaphorePermit,
    time::{Instant, sleep_until},
};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::admission::CallToken;
use crate::{
    callers::WatchPlace,
    error::Error,
    hub::{HubError, Snapshot, Subscription},
    job::{Etag, JobStatus},
};

/// One message of a WatchImages stream.
#[derive(Debug, Clone, PartialEq)]
pub enum ManyEvent {
    /// A job's state: its first, or a change.
    Job(JobStatus),
    /// A job that cannot be watched (NOT_FOUND, or Piclumen refused its
    /// status); it gets no further messages.
    JobFailed {
        /// The job's id.
        mark_id: String,
        /// Why.
        error: Error,
    },
    /// Nothing happened for a heartbeat interval.
    Heartbeat,
}

/// What the tracker makes of one event.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Step {
    /// Nothing to send.
    Nothing,
    /// Send the job's state; `ended` when it is its last.
    Job { status: JobStatus, ended: bool },
    /// Send the job's error; it has ended.
    JobFailed { mark_id: String, error: HubError },
    /// End the whole stream with this error.
    End(HubError),
    /// End the whole stream: a job's channel closed unfinished.
    Interrupted,
}

/// A job as the stream knows it.
#[derive(Debug)]
struct Tracked {
    mark_id: Box<str>,
    /// The etag of the last state sent.
    sent: Option<Etag>,
    ended: bool,
}

/// The rules of one stream, on plain values.
#[derive(Debug)]
pub(super) struct Tracker {
    jobs: Vec<Tracked>,
    /// Jobs not ended yet.
    open: usize,
    heartbeat: Duration,
    /// When a heartbeat is due if nothing is sent before.
    quiet_until: Instant,
}

impl Tracker {
    /// A stream of `ids` (their index is the job's number), started `now`.
    pub(super) fn new(ids: Vec<String>, heartbeat: Duration, now: Instant) -> Self {
        let jobs: Vec<Tracked> = ids
            .into_iter()
            .map(|id| Tracked {
                mark_id: id.into_boxed_str(),
                sent: None,
                ended: false,
            })
            .collect();
        Self {
            open: jobs.len(),
            jobs,
            heartbeat,
            quiet_until: now + heartbeat,
        }
    }

    /// What job `index`'s channel showing `snapshot` (`None`: the channel
    /// closed) means at `now`.
    pub(super) fn on(&mut self, index: usize, snapshot: Option<&Snapshot>, now: Instant) -> Step {
        let Some(job) = self.jobs.get_mut(index) else {
            return Step::Nothing;
        };
        if job.ended {
            return Step::Nothing;
        }
        let step = match snapshot {
            None => return Step::Interrupted,
            Some(Snapshot::Waiting) => return Step::Nothing,
            Some(Snapshot::Status(status)) => {
                let etag = status.etag();
                if job.sent == Some(etag) {
                    return Step::Nothing;
                }
                job.sent = Some(etag);
                let ended = status.state.is_terminal();
                job.ended = ended;
                Step::Job {
                    status: status.clone(),
                    ended,
                }
            }
            // Not about this job: the token's or the server's trouble.
            Some(Snapshot::Ended(error @ (HubError::Outage { .. } | HubError::Stopped))) => {
                return Step::End(error.clone());
            }
            Some(Snapshot::Ended(error)) => {
                job.ended = true;
                Step::JobFailed {
                    mark_id: job.mark_id.to_string(),
                    error: error.clone(),
                }
            }
        };
        if job.ended {
            self.open -= 1;
        }
        self.quiet_until = now + self.heartbeat;
        step
    }

    /// True when every job has ended.
    pub(super) fn done(&self) -> bool {
        self.open == 0
    }

    /// When a heartbeat is due.
    pub(super) fn quiet_until(&self) -> Instant {
        self.quiet_until
    }

    /// A heartbeat was sent at `now`.
    pub(super) fn heartbeat_sent(&mut self, now: Instant) {
        self.quiet_until = now + self.heartbeat;
    }
}

/// Everything one WatchImages stream holds.
#[derive(Debug)]
pub(super) struct Many {
    pub(super) call: CallToken,
    /// The jobs' ids and channels, in the same order.
    pub(super) ids: Vec<String>,
    pub(super) subscriptions: Vec<Subscription>,
    /// One of `--max-watches` per job not ended yet.
    pub(super) slots: OwnedSemaphorePermit,
    /// One of the named caller's watches per job not ended yet (none for
    /// an unnamed caller).
    pub(super) places: Vec<WatchPlace>,
    pub(super) end_at: Instant,
    pub(super) end_message: String,
    pub(super) heartbeat: Duration,
    pub(super) draining: CancellationToken,
}

/// Job `index`'s channel as a stream: its snapshot now, then one per
/// change, then `None` once when the channel closes.
fn job_events(
    index: usize,
    subscription: Subscription,
) -> impl Stream<Item = (usize, Option<Snapshot>)> + Send {
    futures_util::stream::unfold(Some((subscription, true)), move |state| async move {
        let (mut subscription, first) = state?;
        if !first && subscription.rx.changed().await.is_err() {
            return Some(((index, None), None));
        }
        let snapshot = subscription.rx.borrow_and_update().clone();
        Some(((index, Some(snapshot)), Some((subscription, false))))
    })
}

impl Many {
    /// The stream of messages; an `Err` is its last item.
    pub(super) fn stream(self) -> impl Stream<Item = Result<ManyEvent, Error>> + Send + 'static {
        let Self {
            call,
            ids,
            subscriptions,
            mut slots,
            mut places,
            end_at,
            end_message,
            heartbeat,
            draining,
        } = self;
        async_stream::stream! {
            let mut tracker = Tracker::new(ids, heartbeat, Instant::now());
            let mut events: SelectAll<_> = subscriptions
                .into_iter()
                .enumerate()
                .map(|(i, s)| Box::pin(job_events(i, s)))
                .collect();
            let mut end = pin!(sleep_until(end_at));
            loop {
                let quiet_until = tracker.quiet_until();
                tokio::select! {
                    biased;
                    () = draining.cancelled() => {
                        yield Err(Error::ShuttingDown);
                        break;
                    }
                    () = &mut end => {
                        yield Err(Error::DeadlineExceeded(end_message));
                        break;
                    }
                    event = events.next() => {
                        let Some((index, snapshot)) = event else {
                            yield Err(Error::WatchInterrupted);
                            break;
                        };
                        match tracker.on(index, snapshot.as_ref(), Instant::now()) {
                            Step::Nothing => continue,
                            Step::Job { status, ended } => {
                                if ended {
                                    // The job's slot and place are free
                                    // for others.
                                    drop((slots.split(1), places.pop()));
                                }
                                yield Ok(ManyEvent::Job(status));
                            }
                            Step::JobFailed { mark_id, error } => {
                                drop((slots.split(1), places.pop()));
                                let error = call.hub_error(error);
                                yield Ok(ManyEvent::JobFailed { mark_id, error });
                            }
                            Step::End(error) => {
                                let error = call.hub_error(error);
                                warn!(%error, "watch of many jobs ended with an error");
                                yield Err(error);
                                break;
                            }
                            Step::Interrupted => {
                                yield Err(Error::WatchInterrupted);
                                break;
                            }
                        }
                        if tracker.done() {
                            info!("watch of many jobs finished");
                            break;
                        }
                    }
                    () = sleep_until(quiet_until) => {
                        tracker.heartbeat_sent(Instant::now());
                        yield Ok(ManyEvent::Heartbeat);
                    }
                }
            }
        }
    }
}
