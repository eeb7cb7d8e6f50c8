//! The per-token polling schedule, as a plain state machine: given `now` and
//! what happened (a job watched, a check asked, a call answered), it says
//! which ids to ask next and when. It owns no task, no channel and no
//! clock; `poller` is the async shell that sleeps, sends and forwards.
//!
//! The rules:
//! - A watched job is asked once per interval, measured from when the call
//!   carrying it was sent. A newcomer is due after the gather window, so
//!   watches opened together share a call.
//! - Every call carries at most `batch_max` ids, due jobs first (oldest due
//!   first); a call with room is topped up with jobs due within half an
//!   interval, so partial batches merge and calls per round stay near
//!   `ceil(jobs / batch_max)`.
//! - Checks are asked at once when fewer than `max_check_calls` calls that
//!   carry checks are in flight (no added latency when idle); otherwise they
//!   wait and go out together in the next call (natural batching). The same
//!   id asked twice is asked once. A check rides in a call sent after it
//!   arrived, never in one already in flight.
//! - At most `max_calls` calls are in flight per token: one capped send path
//!   for watches and checks alike.
//! - Transient failures pause the token: `Retry-After` (capped by the
//!   failure budget) or an exponential backoff that advances once per pause,
//!   not once per failed call. Replies to calls sent before the pause began
//!   neither advance nor cancel it. Trouble lasting past the failure budget
//!   is an outage.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use tokio::time::Instant;

/// A job id, shared between the schedule, the shell and the calls.
pub type Id = Arc<str>;

/// The schedule's settings.
#[derive(Debug, Clone)]
pub struct ScheduleConfig {
    /// Time between two polls of the same watched job.
    pub interval: Duration,
    /// Most ids in one call.
    pub batch_max: usize,
    /// How long a newcomer waits for others to share its first call.
    pub gather: Duration,
    /// How long transient trouble may last before it is an outage.
    pub failure_budget: Duration,
    /// Most calls in flight for the token.
    pub max_calls: usize,
    /// Most calls carrying checks in flight for the token.
    pub max_check_calls: usize,
    /// Randomise backoff delays (off in tests that want exact timings).
    pub jitter: bool,
}

/// What the shell should do next.
#[derive(Debug, PartialEq)]
pub enum Next {
    /// Send this call now.
    Send(Call),
    /// Nothing to send before this instant (or before a command or reply).
    At(Instant),
    /// Nothing to send until a command or a reply arrives.
    Idle,
}

/// One batch-status call decided by the schedule.
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    /// The ids to ask, each once.
    pub ids: Vec<Id>,
    /// When it was decided (and sent).
    pub sent_at: Instant,
    /// True when it carries at least one check.
    pub carries_checks: bool,
}

/// How a call ended, as far as the schedule cares.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// Piclumen answered.
    Answered,
    /// Transient trouble; `retry_after` when Piclumen said how long to wait.
    Transient {
        /// From `Retry-After`.
        retry_after: Option<Duration>,
    },
    /// A refusal that retrying will not fix; the call's ids are ended by the
    /// shell.
    Refused,
}

/// What the schedule concluded from a reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Carry on.
    Continue,
    /// Now paused until this instant.
    Paused(Instant),
    /// The trouble outlasted the failure budget: the shell ends every watch
    /// and check of the token; the schedule has forgotten them.
    Outage,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Watch {
    /// Waiting in `due` for this instant.
    Due(Instant),
    /// In this many calls in flight.
    InFlight(u32),
}

/// The schedule of one token.
#[derive(Debug)]
pub struct Schedule {
    config: ScheduleConfig,
    watched: HashMap<Id, Watch>,
    due: BTreeSet<(Instant, Id)>,
    checks: Vec<Id>,
    check_set: HashSet<Id>,
    calls: usize,
    check_calls: usize,
    retry: Retry,
    /// False while another replica polls this token's watched jobs (fleet
    /// polling): only checks are sent; due jobs wait, and go out at once
    /// when polling comes back here.
    polls_watches: bool,
}

impl Schedule {
    /// An empty schedule.
    pub fn new(config: ScheduleConfig) -> Self {
        let retry = Retry::new(config.jitter);
        Self {
            config,
            watched: HashMap::new(),
            due: BTreeSet::new(),
            checks: Vec::new(),
            check_set: HashSet::new(),
            calls: 0,
            check_calls: 0,
            retry,
            polls_watches: true,
        }
    }

    /// Starts polling `id`; its first call goes out after the gather window
    /// (or with an earlier call that has room).
    pub fn watch(&mut self, id: Id, now: Instant) {
        if self.watched.contains_key(&id) {
            return;
        }
        let at = now + self.config.gather;
        self.due.insert((at, Arc::clone(&id)));
        self.watched.insert(id, Watch::Due(at));
    }

    /// Stops polling `id` (finished, or no one watches it any more).
    pub fn unwatch(&mut self, id: &Id) {
        if let Some(Watch::Due(at)) = self.watched.remove(id) {
            self.due.remove(&(at, Arc::clone(id)));
        }
    }

    /// Queues a check of `id` for the next call.
    pub fn check(&mut self, id: Id) {
        if self.check_set.insert(Arc::clone(&id)) {
            self.checks.push(id);
        }
    }

    /// Drops every queued check (their callers were answered otherwise).
    pub fn clear_checks(&mut self) {
        self.checks.clear();
        self.check_set.clear();
    }

    /// Whether `id` is polled for watchers.
    pub fn is_watched(&self, id: &str) -> bool {
        self.watched.contains_key(id)
    }

    /// Nothing watched, checked or in flight: the token's shell may end.
    pub fn is_idle(&self) -> bool {
        self.watched.is_empty() && self.checks.is_empty() && self.calls == 0
    }

    /// While paused, until when; checks asked meanwhile are answered with
    /// the pause's cause rather than held.
    pub fn paused_until(&self, now: Instant) -> Option<Instant> {
        self.retry.paused_until.filter(|until| *until > now)
    }

    /// Whether this schedule sends its watched jobs (true unless another
    /// replica polls them for the fleet).
    pub fn set_polls_watches(&mut self, on: bool) {
        self.polls_watches = on;
    }

    /// Pauses the token until `until` because another replica was told to
    /// back off (a fleet-wide 429); an earlier end never shortens a pause.
    pub fn impose_pause(&mut self, until: Instant, now: Instant) {
        if self
            .retry
            .paused_until
            .is_none_or(|current| current < until)
        {
            self.retry.paused_at = Some(now);
            self.retry.paused_until = Some(until);
        }
    }

    /// The next thing to do at `now`.
    pub fn next(&mut self, now: Instant) -> Next {
        if let Some(until) = self.paused_until(now) {
            return Next::At(until);
        }
        if self.calls >= self.config.max_calls {
            return Next::Idle;
        }
        let first_due = self
            .due
            .first()
            .map(|(at, _)| *at)
            .filter(|_| self.polls_watches);
        let checks_ready =
            !self.checks.is_empty() && self.check_calls < self.config.max_check_calls;
        let watches_ready = first_due.is_some_and(|at| at <= now);
        if !checks_ready && !watches_ready {
            return first_due.map_or(Next::Idle, Next::At);
        }
        let max = self.config.batch_max;
        let mut ids = Vec::with_capacity(max.min(self.checks.len() + self.due.len()));
        // Checks first: a caller is waiting on each.
        let carries_checks = self.take_checks(&mut ids);
        self.take_due(&mut ids, now);
        self.calls += 1;
        if carries_checks {
            self.check_calls += 1;
        }
        Next::Send(Call {
            ids,
            sent_at: now,
            carries_checks,
        })
    }

    /// Moves up to a call's worth of queued checks into `ids`; true when
    /// there was any. A checked job that is also watched rides along as
    /// in flight, so it is not sent twice.
    fn take_checks(&mut self, ids: &mut Vec<Id>) -> bool {
        let take = self.checks.len().min(self.config.batch_max);
        for id in self.checks.drain(..take) {
            self.check_set.remove(&id);
            if let Some(state) = self.watched.get_mut(&id) {
                *state = match *state {
                    Watch::Due(at) => {
                        self.due.remove(&(at, Arc::clone(&id)));
                        Watch::InFlight(1)
                    }
                    Watch::InFlight(n) => Watch::InFlight(n + 1),
                };
            }
            ids.push(id);
        }
        take > 0
    }

    /// Fills `ids` up to `batch_max` with due jobs, topped up with those
    /// due within half an interval (unless another replica polls them).
    fn take_due(&mut self, ids: &mut Vec<Id>, now: Instant) {
        let horizon = now + self.config.interval / 2;
        while self.polls_watches && ids.len() < self.config.batch_max {
            let Some((at, _)) = self.due.first() else {
                break;
            };
            if *at > horizon {
                break;
            }
            let Some((_, id)) = self.due.pop_first() else {
                break;
            };
            self.watched.insert(Arc::clone(&id), Watch::InFlight(1));
            ids.push(id);
        }
    }

    /// Takes back a call the shell did not send after all (every id in it
    /// turned out unwanted).
    pub fn abandon(&mut self, call: &Call, now: Instant) {
        self.settle(call, now);
    }

    /// Records how `call` ended. The shell has already unwatched the ids
    /// that are finished; the others are due again one interval after the
    /// call was sent (or when a pause ends).
    pub fn on_reply(&mut self, call: &Call, reply: &Reply, now: Instant) -> Verdict {
        let verdict = match reply {
            Reply::Answered | Reply::Refused => {
                self.retry.succeeded(call.sent_at);
                Verdict::Continue
            }
            Reply::Transient { retry_after } => {
                self.retry
                    .failed(call.sent_at, now, *retry_after, self.config.failure_budget)
            }
        };
        if verdict == Verdict::Outage {
            self.forget_all();
            self.settle(call, now);
            return verdict;
        }
        let again = match verdict {
            Verdict::Paused(until) => until,
            _ => call.sent_at + self.config.interval,
        };
        self.settle(call, again);
        verdict
    }

    /// Releases a call's place; its watched ids are due at `again` (unless
    /// another call still carries them).
    fn settle(&mut self, call: &Call, again: Instant) {
        self.calls = self.calls.saturating_sub(1);
        if call.carries_checks {
            self.check_calls = self.check_calls.saturating_sub(1);
        }
        for id in &call.ids {
            if let Some(state) = self.watched.get_mut(id)
                && let Watch::InFlight(n) = *state
            {
                if n > 1 {
                    *state = Watch::InFlight(n - 1);
                } else {
                    *state = Watch::Due(again);
                    self.due.insert((again, Arc::clone(id)));
                }
            }
        }
    }

    /// Forgets every watched job and queued check (the token's watches
    /// ended: an outage, here or reported by another replica).
    pub fn forget_all(&mut self) {
        self.watched.clear();
        self.due.clear();
        self.checks.clear();
        self.check_set.clear();
    }
}

/// Transient-trouble state of one token.
#[derive(Debug)]
struct Retry {
    jitter: bool,
    /// When the current run of trouble began.
    since: Option<Instant>,
    /// When the current pause was decided: replies to calls sent before it
    /// belong to the trouble that caused it.
    paused_at: Option<Instant>,
    paused_until: Option<Instant>,
    backoff: ExponentialBackoff,
}

impl Retry {
    fn new(jitter: bool) -> Self {
        Self {
            jitter,
            since: None,
            paused_at: None,
            paused_until: None,
            backoff: Self::builder(jitter).build(),
        }
    }

    fn builder(jitter: bool) -> ExponentialBuilder {
        let builder = ExponentialBuilder::new()
            .with_min_delay(Duration::from_millis(250))
            .with_max_delay(Duration::from_secs(10))
            .without_max_times();
        if jitter {
            builder.with_jitter()
        } else {
            builder
        }
    }

    /// A call sent at `sent_at` succeeded: the trouble is over, unless the
    /// call went out before the current pause was decided.
    fn succeeded(&mut self, sent_at: Instant) {
        if self.paused_at.is_some_and(|at| sent_at < at) {
            return;
        }
        if self.since.take().is_some() {
            self.backoff = Self::builder(self.jitter).build();
        }
        self.paused_at = None;
        self.paused_until = None;
    }

    fn failed(
        &mut self,
        sent_at: Instant,
        now: Instant,
        retry_after: Option<Duration>,
        budget: Duration,
    ) -> Verdict {
        let since = *self.since.get_or_insert(now);
        if now.duration_since(since) >= budget {
            *self = Self::new(self.jitter);
            return Verdict::Outage;
        }
        if let (Some(at), Some(until)) = (self.paused_at, self.paused_until)
            && sent_at < at
        {
            // Same trouble as the pause already running.
            return Verdict::Paused(until.max(now));
        }
        let delay = retry_after
            .unwrap_or_else(|| self.backoff.next().unwrap_or(Duration::from_secs(10)))
            // A huge Retry-After must not silence watches past the budget.
            .min(budget);
        let until = now + delay;
        self.paused_at = Some(now);
        self.paused_until = Some(until);
        Verdict::Paused(until)
    }
}
