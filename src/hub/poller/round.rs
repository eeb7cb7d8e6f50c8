//! What the end of one status call means for the token, decided apart from
//! doing it, as `schedule` does for sending: `Round::plan` turns the call's
//! result into a `Plan` (each job's outcome and what becomes of its channel
//! and polling, the answers to remember, the entries to share with the
//! other replicas, the error the call's checks get, what the schedule is
//! told), and `Plan::then` turns the schedule's verdict on a failed call
//! into a pause or an outage; `retry_delay` says whether a failed call is
//! asked again within its round. Plain values in, plain values out: no
//! channel, lock or task, so every rule is tested on plain values; the
//! poller only carries plans out.

use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use crate::{
    hub::{
        HubError,
        fleet::wire::Entry,
        schedule::{Id, Reply, Verdict},
    },
    job::JobStatus,
    upstream::{BadEntry, StatusEntry, UpstreamError},
};

/// A job's outcome: its state, or why its watch and checks end.
pub(super) type Outcome = Result<JobStatus, HubError>;

/// How a call ended.
#[derive(Debug)]
pub(super) enum Ended {
    /// Piclumen answered, with entries for some of the ids.
    Answered(Vec<StatusEntry>),
    /// The call failed.
    Failed(UpstreamError),
    /// The call's task panicked (a bug, logged where it was caught).
    Panicked,
}

/// What the poller knows of a job when its outcome arrives.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Job {
    /// The receivers on the job's channel, when it has one.
    pub(super) watchers: Option<usize>,
    /// Polled for other replicas (fleet polling, while holding the lease).
    pub(super) remote: bool,
}

/// What becomes of one job after an outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Fate {
    /// Send the outcome on the job's channel.
    pub(super) publish: bool,
    /// Remove the job's channel: it finished, or nobody watches it.
    pub(super) close: bool,
    /// Stop polling the job.
    pub(super) unwatch: bool,
    /// Stop polling it for other replicas: it finished.
    pub(super) leave_remote: bool,
}

impl Fate {
    /// A finished job (terminal state or error) leaves the schedule; so
    /// does a job nobody here watches, unless another replica still wants
    /// it polled.
    pub(super) fn of(outcome: &Outcome, job: Job) -> Self {
        let done = match outcome {
            Ok(status) => status.state.is_terminal(),
            Err(_) => true,
        };
        let remote = job.remote && !done;
        let close = match job.watchers {
            Some(receivers) => done || receivers == 0,
            None => false,
        };
        Self {
            publish: job.watchers.is_some(),
            close,
            unwatch: !remote && (close || job.watchers.is_none()),
            leave_remote: job.remote && done,
        }
    }
}

/// One job's part in a plan.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct JobPlan {
    /// The job.
    pub(super) id: Id,
    /// Published to its watchers and sent to its checks.
    pub(super) outcome: Outcome,
    /// What becomes of its channel and polling.
    pub(super) fate: Fate,
}

/// What to do once a call ended.
#[derive(Debug, PartialEq)]
pub(super) struct Plan {
    /// Each id's outcome and fate, in the call's order; none when the call
    /// failed transiently (its jobs wait out the pause).
    pub(super) jobs: Vec<JobPlan>,
    /// Answers fresh enough to serve checks, fresh from `fresh_from`.
    pub(super) known: Vec<(Id, JobStatus)>,
    /// When the remembered answers were true.
    pub(super) fresh_from: Instant,
    /// Entries to publish to the other replicas.
    pub(super) share: Vec<Entry>,
    /// The error every check of the call gets instead of its job's outcome.
    pub(super) checks_error: Option<HubError>,
    /// What the schedule is told.
    pub(super) reply: Reply,
    /// Transient trouble, for `then` once the schedule gave its verdict.
    pub(super) trouble: Option<UpstreamError>,
    /// A refusal ending every job of the call, for the log.
    pub(super) refused: Option<UpstreamError>,
    /// Entries Piclumen sent unreadable, for the log.
    pub(super) unreadable: Vec<BadEntry>,
    /// Whether pauses and outages are told to the other replicas.
    pub(super) sharing: bool,
}

/// What a failed call's verdict asks of the poller.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Then {
    /// Nothing more.
    Continue,
    /// Hold the token until `until` (`left` from now), checks answered
    /// with `error` meanwhile.
    Pause {
        /// The end of the pause.
        until: Instant,
        /// Its length from now.
        left: Duration,
        /// Its cause.
        error: UpstreamError,
    },
    /// End every watch and check of the token with this last error.
    Outage(UpstreamError),
}

/// A call that ended, with what its plan depends on.
#[derive(Debug, Clone, Copy)]
pub(super) struct Round<'a> {
    /// The ids the call carried.
    pub(super) ids: &'a [Id],
    /// When it was sent: the states it brings are at least that recent.
    pub(super) sent_at: Instant,
    /// True when answers are published to the other replicas.
    pub(super) sharing: bool,
    /// When its reply arrived: every state it brings was observed then.
    pub(super) observed_at: SystemTime,
}

impl Round<'_> {
    /// The plan for the call's end; `job` tells what the poller knows of
    /// each id.
    pub(super) fn plan(self, ended: Ended, job: impl Fn(&Id) -> Job) -> Plan {
        match ended {
            Ended::Answered(entries) => self.answered(entries, job),
            Ended::Failed(error) if error.is_transient() => self.troubled(error),
            Ended::Failed(error) => {
                let mut plan = self.ended(HubError::Upstream(error.clone()), job);
                plan.refused = Some(error);
                plan
            }
            Ended::Panicked => self.ended(HubError::Internal, job),
        }
    }

    fn empty(self, reply: Reply) -> Plan {
        Plan {
            jobs: Vec::new(),
            known: Vec::new(),
            fresh_from: self.sent_at,
            share: Vec::new(),
            checks_error: None,
            reply,
            trouble: None,
            refused: None,
            unreadable: Vec::new(),
            sharing: self.sharing,
        }
    }

    /// Each id gets its entry; an id missing from the answer is unknown to
    /// the token's account.
    fn answered(self, entries: Vec<StatusEntry>, job: impl Fn(&Id) -> Job) -> Plan {
        let mut plan = self.empty(Reply::Answered);
        let mut by_id: std::collections::HashMap<String, StatusEntry> = entries
            .into_iter()
            .map(|e| match &e {
                Ok(status) => (status.mark_id.clone(), e),
                Err(bad) => (bad.mark_id.clone(), e),
            })
            .collect();
        plan.jobs.reserve(self.ids.len());
        for id in self.ids {
            let outcome = match by_id.remove(&**id) {
                Some(Ok(mut status)) => {
                    status.observed_at = Some(self.observed_at);
                    Ok(status)
                }
                Some(Err(bad)) => {
                    plan.unreadable.push(bad.clone());
                    Err(HubError::Upstream(bad.error))
                }
                None => Err(HubError::NotFound {
                    mark_id: id.to_string(),
                }),
            };
            if let Ok(status) = &outcome {
                plan.known.push((id.clone(), status.clone()));
            }
            if self.sharing {
                plan.share.push(Entry::of(id, &outcome));
            }
            let fate = Fate::of(&outcome, job(id));
            plan.jobs.push(JobPlan {
                id: id.clone(),
                outcome,
                fate,
            });
        }
        plan
    }

    /// The call failed as a whole but may work later: its checks get the
    /// error now, its watches wait for the schedule's pause.
    fn troubled(self, error: UpstreamError) -> Plan {
        let retry_after = match &error {
            UpstreamError::RateLimited { retry_after } => *retry_after,
            _ => None,
        };
        let mut plan = self.empty(Reply::Transient { retry_after });
        plan.checks_error = Some(HubError::Upstream(error.clone()));
        plan.trouble = Some(error);
        plan
    }

    /// Every job of the call ends with `ended`, here and (with fleet
    /// polling) on the other replicas, whatever this replica's role: an
    /// end is news for every watcher of the job.
    fn ended(self, ended: HubError, job: impl Fn(&Id) -> Job) -> Plan {
        let mut plan = self.empty(Reply::Refused);
        let outcome: Outcome = Err(ended);
        for id in self.ids {
            plan.share.push(Entry::of(id, &outcome));
            plan.jobs.push(JobPlan {
                id: id.clone(),
                outcome: outcome.clone(),
                fate: Fate::of(&outcome, job(id)),
            });
        }
        plan
    }
}

impl Plan {
    /// What the schedule's `verdict` on this plan's call asks for.
    pub(super) fn then(&self, verdict: Verdict, now: Instant) -> Then {
        let Some(error) = &self.trouble else {
            return Then::Continue;
        };
        match verdict {
            Verdict::Continue => Then::Continue,
            Verdict::Paused(until) => Then::Pause {
                until,
                left: until.saturating_duration_since(now),
                error: error.clone(),
            },
            Verdict::Outage => Then::Outage(error.clone()),
        }
    }
}

/// Another replica's answers: each is remembered when it is a state, and
/// published to this replica's watchers of the job, if any.
pub(super) fn from_replica(
    entries: &[Entry],
    job: impl Fn(&Id) -> Job,
) -> (Vec<JobPlan>, Vec<(Id, JobStatus)>) {
    let mut jobs = Vec::new();
    let mut known = Vec::new();
    for entry in entries {
        let id: Id = entry.id.as_str().into();
        let outcome = entry.outcome();
        if let Ok(status) = &outcome {
            known.push((id.clone(), status.clone()));
        }
        let facts = job(&id);
        if facts.watchers.is_some() {
            let fate = Fate::of(&outcome, facts);
            jobs.push(JobPlan { id, outcome, fate });
        }
    }
    (jobs, known)
}

/// Shortest wait before a failed status call is asked again in its round.
pub(super) const RETRY_MIN: Duration = Duration::from_millis(100);
/// Longest such wait.
pub(super) const RETRY_MAX: Duration = Duration::from_millis(300);

/// How long to wait before asking a failed status call again within its
/// round, or `None` to let the round fail: only transient trouble that a
/// moment may cure (a 5xx, a broken or refused connection, a timeout) is
/// retried, once; a 429 is not (its `Retry-After` pauses the token). `draw`
/// (0 to 1) places the wait between `RETRY_MIN` and `RETRY_MAX`, so
/// replicas and tokens hit by the same fault spread out; the wait is cut to
/// what is left of the round (`interval`, `elapsed` since the call was
/// sent), and with less than `RETRY_MIN` left there is no retry.
pub(super) fn retry_delay(
    error: &UpstreamError,
    elapsed: Duration,
    interval: Duration,
    draw: f64,
) -> Option<Duration> {
    if !error.is_transient() || matches!(error, UpstreamError::RateLimited { .. }) {
        return None;
    }
    let left = interval.saturating_sub(elapsed);
    let delay = RETRY_MIN + (RETRY_MAX - RETRY_MIN).mul_f64(draw.clamp(0.0, 1.0));
    (left >= RETRY_MIN).then(|| delay.min(left))
}

/// The answer to a check asked while the token is paused: the pause's
/// cause, a rate limit telling how much of the pause is left.
pub(super) fn paused_answer(cause: Option<UpstreamError>, left: Duration) -> HubError {
    HubError::Upstream(match cause {
        Some(error) => with_remaining(error, left),
        None => UpstreamError::RateLimited { retry_after: None },
    })
}

/// A rate-limit error telling the caller how much of the pause is left.
pub(super) fn with_remaining(error: UpstreamError, left: Duration) -> UpstreamError {
    match error {
        UpstreamError::RateLimited { .. } => UpstreamError::RateLimited {
            retry_after: Some(left),
        },
        other => other,
    }
}

#[cfg(test)]
mod tests;
