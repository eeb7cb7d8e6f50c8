//! `Poller`, the async shell around one token's `Schedule`: it takes
//! commands from the hub's handles, sends the calls the schedule decides,
//! carries out what `round` plans for each call's end (publishing to the
//! job's watchers, answering its checks, pausing, ending an outage), and
//! ends itself when the token has nothing left. Every decision is the
//! schedule's, a round plan's or (with fleet polling, through `fleet`) the
//! coordinator's; the poller only sends, publishes and records.
//!
//! One type per file: `Poller` here, its fleet part `FleetSide` in
//! `fleet`, the plain `Plan` in `round`, the callers of checks it holds in
//! `checks`; the status call it sends (retried once within its round) in
//! `call`, and how it ends (retired when idle, or abandoned after a panic,
//! by its supervisor) in `ending`.

mod call;
mod checks;
mod ending;
mod fleet;
mod round;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use tokio::{
    sync::mpsc,
    task::{self, JoinSet},
    time::{Instant, sleep_until},
};
use tracing::{Instrument, debug, error, info_span, warn};

use super::{
    Cmd, HubError, Inner, Shared, Snapshot, State, check_metrics,
    fleet::wire::{Entry, Round as FleetRound},
    lock,
    schedule::{Call, Id, Next, Schedule, ScheduleConfig},
    stale::StaleIfError,
    upstream_metrics,
};
use crate::{
    job::{JobStatus, Token},
    upstream::{StatusEntry, UpstreamError},
};
use checks::{Carried, Queued};
use fleet::FleetSide;
use round::{Ended, Job, JobPlan, Plan, Round, Then};

/// A call in flight: what the schedule decided, the ids actually sent, and
/// the checks it answers. Kept by the poller (not moved into the call's
/// task), so a task that panics still has its waiters ended.
struct InFlight {
    call: Call,
    ids: Arc<[Id]>,
    waiters: Carried,
    /// The round's span (disabled with export off), open until applied.
    span: tracing::Span,
}

type Done = Result<Vec<StatusEntry>, UpstreamError>;

/// Starts the poller of `token`; the returned handle feeds it.
pub(super) fn spawn(token: Token, hub: Arc<Inner>) -> Arc<Shared> {
    let (cmds, rx) = mpsc::unbounded_channel();
    let shared = Arc::new(Shared {
        token,
        state: Mutex::default(),
        cmds,
    });
    let config = &hub.config;
    let schedule = Schedule::new(ScheduleConfig {
        interval: config.poll_interval,
        batch_max: config.batch_max.max(1),
        gather: config.gather,
        failure_budget: config.failure_budget,
        max_calls: super::DEFAULT_MAX_CALLS,
        max_check_calls: super::DEFAULT_MAX_CHECK_CALLS,
        jitter: true,
    });
    let fleet = hub
        .fleet
        .as_ref()
        .map(|link| FleetSide::new(Arc::clone(link), &hub, &shared));
    let poller = Poller {
        shared: Arc::clone(&shared),
        stale: hub.config.stale(),
        hub,
        rx,
        schedule,
        waiters: Queued::default(),
        calls: JoinSet::new(),
        flights: HashMap::new(),
        pause_error: None,
        next_sweep: None,
        fleet,
        links: crate::otel::RoundLinks::default(),
    };
    // No parent: a poller serves many calls, and must not carry the request
    // id of whichever call happened to start it.
    tokio::spawn(ending::supervise(poller).instrument(info_span!(parent: None, "poller")));
    shared
}

struct Poller {
    shared: Arc<Shared>,
    hub: Arc<Inner>,
    rx: mpsc::UnboundedReceiver<Cmd>,
    schedule: Schedule,
    /// Checks queued for the next call, by id.
    waiters: Queued,
    calls: JoinSet<Done>,
    /// What each call task in `calls` carries.
    flights: HashMap<task::Id, InFlight>,
    /// What caused the current pause, for checks asked during it.
    pause_error: Option<UpstreamError>,
    /// When `known` is next swept of stale answers.
    next_sweep: Option<Instant>,
    /// With fleet polling: this token's part in it.
    fleet: Option<FleetSide>,
    /// The calls each job's next round serves, for its span's links.
    links: crate::otel::RoundLinks,
    /// Which remembered states answer checks during trouble.
    stale: StaleIfError,
}

impl Poller {
    /// Runs until the token has nothing left (`retire`); the supervisor
    /// keeps the poller, to abandon its token if this panics.
    async fn run(&mut self) {
        loop {
            while let Ok(cmd) = self.rx.try_recv() {
                self.command(cmd);
            }
            let now = Instant::now();
            self.sweep(now);
            let fleet_wake = match &mut self.fleet {
                Some(fleet) => fleet.step(&self.shared, &mut self.schedule, now),
                None => None,
            };
            let wake = match self.schedule.next(now) {
                Next::Send(call) => {
                    self.send(call);
                    continue;
                }
                Next::At(at) => Some(at),
                Next::Idle => None,
            };
            let wake = [wake, self.next_sweep, fleet_wake]
                .into_iter()
                .flatten()
                .min();
            let settled = self.fleet.as_ref().is_none_or(FleetSide::is_idle);
            if wake.is_none() && self.calls.is_empty() && settled && self.retire() {
                return;
            }
            tokio::select! {
                cmd = self.rx.recv() => {
                    if let Some(cmd) = cmd {
                        self.command(cmd);
                    }
                }
                Some(done) = self.calls.join_next_with_id() => self.landed(done),
                Some(done) = fleet::next_exchange(&mut self.fleet) => self.on_exchange(done),
                () = sleep_until(wake.unwrap_or(now)), if wake.is_some() => {}
            }
        }
    }

    fn command(&mut self, cmd: Cmd) {
        let now = Instant::now();
        match cmd {
            Cmd::Watch(id, link) => {
                self.links.watch(&id, link);
                if let Some(fleet) = &mut self.fleet {
                    fleet.watched(Arc::clone(&id), now);
                }
                self.schedule.watch(id, now);
            }
            Cmd::Round(round) => self.apply_round(&round, now),
            Cmd::Check(id, waiter, link) => {
                if let Some(until) = self.schedule.paused_until(now) {
                    let stale = self.stale_answer(&lock(&self.shared.state), &id, now);
                    let answer = stale
                        .ok_or_else(|| round::paused_answer(self.pause_error.clone(), until - now));
                    let _ = waiter.send(answer);
                    return;
                }
                self.waiters.push(Arc::clone(&id), waiter);
                self.links.check(&id, link);
                self.schedule.check(id);
            }
        }
    }

    /// Sends what the schedule decided, less what nobody wants any more.
    fn send(&mut self, call: Call) {
        let (ids, waiters) = self.wanted(&call);
        let now = Instant::now();
        if ids.is_empty() {
            self.schedule.abandon(&call, now);
            return;
        }
        if call.carries_checks {
            let metrics = check_metrics();
            metrics.calls.increment(1);
            let answered = waiters.count();
            metrics
                .coalesced
                .increment(answered.saturating_sub(1) as u64);
        }
        upstream_metrics().ids.record(ids.len() as f64);
        // Shared with the call's task, for a retry, without a copy.
        let ids: Arc<[Id]> = ids.into();
        let request = call::StatusCall {
            source: Arc::clone(&self.hub.source),
            token: self.shared.token.clone(),
            ids: Arc::clone(&ids),
            sent_at: call.sent_at,
            interval: self.hub.config.poll_interval,
        }
        .send();
        let schedule = &self.schedule;
        let span = self.links.round_span(&ids, |id| schedule.is_watched(id));
        let request = request.instrument(span.clone());
        let flight = InFlight {
            call,
            ids,
            waiters,
            span,
        };
        let task = self.calls.spawn(request);
        self.flights.insert(task.id(), flight);
    }

    /// The ids of `call` someone still wants, with the checks it carries:
    /// watched jobs without watchers (here or, with fleet polling,
    /// elsewhere) are forgotten, and checks whose callers left are dropped.
    fn wanted(&mut self, call: &Call) -> (Vec<Id>, Carried) {
        let mut ids = Vec::with_capacity(call.ids.len());
        let mut waiters = Carried::default();
        let mut state = lock(&self.shared.state);
        for id in &call.ids {
            let mut wanted = false;
            if let Some(live) = self.waiters.take(id) {
                wanted = true;
                waiters.push(Arc::clone(id), live);
            }
            if self.schedule.is_watched(id) {
                let job = job(&state, self.fleet.as_ref(), id);
                if job.remote || job.watchers.is_some_and(|n| n > 0) {
                    wanted = true;
                } else {
                    state.slots.remove(id);
                    self.schedule.unwatch(id);
                }
            }
            if wanted {
                ids.push(Arc::clone(id));
            }
        }
        (ids, waiters)
    }

    /// A call's task ended: its answer or failure is applied; a task that
    /// panicked (a bug) ends its watches and checks with an internal error
    /// rather than leaving them waiting for ever, and the token goes on.
    fn landed(&mut self, done: Result<(task::Id, Done), task::JoinError>) {
        let (id, ended) = match done {
            Ok((id, Ok(entries))) => (id, Ended::Answered(entries)),
            Ok((id, Err(error))) => (id, Ended::Failed(error)),
            Err(e) => {
                error!(error = %e, "a status call task failed; ending its watches and checks");
                (e.id(), Ended::Panicked)
            }
        };
        if let Some(flight) = self.flights.remove(&id) {
            self.apply(flight, ended);
        }
    }

    /// Carries out the plan for a call's end: publishes each job's outcome,
    /// remembers the answers, answers the call's checks, tells the schedule
    /// and, with fleet polling, the other replicas.
    fn apply(&mut self, flight: InFlight, ended: Ended) {
        #[cfg(test)]
        if self
            .hub
            .panic_next_round
            .swap(false, std::sync::atomic::Ordering::SeqCst)
        {
            panic!("test fault: the poller panics applying a round");
        }
        let now = Instant::now();
        let InFlight {
            call,
            ids,
            waiters,
            span,
        } = flight;
        let round = Round {
            ids: &ids,
            sent_at: call.sent_at,
            sharing: self.fleet.as_ref().is_some_and(FleetSide::shares),
            observed_at: super::fleet::wire::now_ms(),
        };
        let shared = Arc::clone(&self.shared);
        let mut state = lock(&shared.state);
        // Planned and carried out under one lock: a watcher joining in
        // between could otherwise lose the channel the plan closes.
        let plan = round.plan(ended, |id| job(&state, self.fleet.as_ref(), id));
        self.publish(&mut state, &plan.jobs, now);
        self.remember(&mut state, &plan.known, plan.fresh_from, now);
        waiters.answer(&plan, |id| self.stale_answer(&state, id, now));
        drop(state);
        log(&plan);
        let verdict = self.schedule.on_reply(&call, &plan.reply, now);
        self.after(plan.then(verdict, now), plan.sharing, &span, now);
        if let Some(fleet) = &self.fleet {
            fleet.share(plan.share);
        }
    }

    /// Pauses the token or ends its watches, as a failed call's verdict
    /// says, here and (when sharing) on the other replicas.
    fn after(&mut self, then: Then, sharing: bool, span: &tracing::Span, now: Instant) {
        let fleet = self.fleet.as_ref().filter(|_| sharing);
        match then {
            Then::Continue => {}
            Then::Pause { until, left, error } => {
                upstream_metrics().retries.increment(1);
                crate::otel::retry_event(span, left, &error.to_string());
                debug!(%error, pause = ?left, "transient upstream trouble; pausing the token");
                if let Some(fleet) = fleet {
                    fleet.share_pause(left, &error);
                }
                self.links.clear_checks();
                self.pause(until, error, now);
            }
            Then::Outage(error) => {
                if let Some(fleet) = fleet {
                    fleet.share_outage(&error);
                }
                self.outage(error);
            }
        }
    }

    /// Carries out each job's fate: its outcome sent on its channel, the
    /// channel closed and the job's polling stopped when the plan says so.
    fn publish(&mut self, state: &mut State, jobs: &[JobPlan], now: Instant) {
        for JobPlan { id, outcome, fate } in jobs {
            if let Some(fleet) = &mut self.fleet {
                fleet.coord.heard(id, now);
                if fate.leave_remote {
                    fleet.remote.remove(id);
                }
            }
            if fate.publish
                && let Some(slot) = state.slots.get(id)
            {
                slot.set(outcome.clone().into());
            }
            if fate.close {
                state.slots.remove(id);
            }
            if fate.unwatch {
                self.schedule.unwatch(id);
            }
        }
    }

    /// The state a check gets instead of trouble, if any (`stale`, or the
    /// job's create here, `created`).
    fn stale_answer(&self, state: &State, id: &Id, now: Instant) -> Option<JobStatus> {
        let known = state.known.get(id);
        (self.hub.created).stale_answer(&self.stale, known, &self.shared.token, id, now)
    }

    /// Keeps answers to serve checks, and sweeps them in time.
    fn remember(
        &mut self,
        state: &mut State,
        known: &[(Id, JobStatus)],
        fresh_from: Instant,
        now: Instant,
    ) {
        if state.remember(known, fresh_from) {
            self.next_sweep
                .get_or_insert(now + self.hub.config.poll_interval);
        }
    }

    /// Holds the token until `until`: queued checks get their job's
    /// stale-if-error state, else the cause, now rather than waiting out
    /// the pause.
    fn pause(&mut self, until: Instant, error: UpstreamError, now: Instant) {
        let left = until.saturating_duration_since(now);
        let answer = round::paused_answer(Some(error.clone()), left);
        let mut waiters = std::mem::take(&mut self.waiters);
        let state = lock(&self.shared.state);
        waiters.fail_all(&answer, |id| self.stale_answer(&state, id, now));
        drop(state);
        self.schedule.clear_checks();
        self.pause_error = Some(error);
    }

    /// Ends every watch and queued check of the token.
    fn outage(&mut self, last: UpstreamError) {
        warn!(%last, "upstream trouble outlasted the failure budget; ending watches");
        let ended = HubError::Outage {
            budget: self.hub.config.failure_budget,
            last,
        };
        let mut state = lock(&self.shared.state);
        for (_, slot) in state.slots.drain() {
            slot.set(Snapshot::Ended(ended.clone()));
        }
        let mut waiters = std::mem::take(&mut self.waiters);
        let now = Instant::now();
        waiters.fail_all(&ended, |id| self.stale_answer(&state, id, now));
        drop(state);
        if let Some(fleet) = &mut self.fleet {
            fleet.remote.clear();
        }
        self.pause_error = None;
    }

    /// An exchange with the fleet's store ended; the states it read back
    /// reach this replica's watchers.
    fn on_exchange(
        &mut self,
        result: Result<super::fleet::ExchangeReply, super::fleet::FleetError>,
    ) {
        let now = Instant::now();
        let Some(fleet) = &mut self.fleet else {
            return;
        };
        let states = fleet.on_exchange(result, &self.shared, &mut self.schedule, now);
        if !states.is_empty() {
            self.apply_entries(&states, now);
        }
    }

    /// Another replica's round: its answers reach this replica's watchers
    /// and fresh state; its pause or outage applies here too.
    fn apply_round(&mut self, round: &FleetRound, now: Instant) {
        if !self.fleet.as_ref().is_some_and(FleetSide::takes_part) {
            return;
        }
        self.apply_entries(&round.entries, now);
        if let Some(pause) = &round.pause {
            let until = now + std::time::Duration::from_millis(pause.ms);
            self.schedule.impose_pause(until, now);
            self.pause(until, pause.cause.clone().into(), now);
        }
        if let Some(outage) = &round.outage {
            self.schedule.forget_all();
            self.outage(outage.last.clone().into());
        }
    }

    /// Other replicas' answers, fresh as of their arrival here (a round is
    /// a few milliseconds old at most).
    fn apply_entries(&mut self, entries: &[Entry], now: Instant) {
        let shared = Arc::clone(&self.shared);
        let mut state = lock(&shared.state);
        let (jobs, known) = round::from_replica(entries, |id| job(&state, self.fleet.as_ref(), id));
        self.remember(&mut state, &known, now, now);
        self.publish(&mut state, &jobs, now);
    }

    /// Drops answers no longer worth keeping, when due.
    fn sweep(&mut self, now: Instant) {
        if self.next_sweep.is_none_or(|at| at > now) {
            return;
        }
        self.next_sweep = lock(&self.shared.state).sweep(now, &self.stale);
    }
}

/// What the poller knows of `id`, for a plan.
fn job(state: &State, fleet: Option<&FleetSide>, id: &Id) -> Job {
    Job {
        watchers: state.slots.get(id).map(|slot| slot.receiver_count()),
        remote: fleet.is_some_and(|f| f.remote.contains(id)),
    }
}

/// Logs what the plan says went wrong.
fn log(plan: &Plan) {
    for bad in &plan.unreadable {
        warn!(error = %bad.error, mark_id = %bad.mark_id, "unreadable status entry");
    }
    if let Some(error) = &plan.refused {
        warn!(%error, "Piclumen refused a status call; ending its watches and checks");
    }
}
