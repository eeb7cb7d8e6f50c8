//! The async shell around one token's `Schedule`: it takes commands from
//! the hub's handles, sends the calls the schedule decides, publishes each
//! answer to the job's watchers and waiting checks, and ends itself when the
//! token has nothing left. Every decision is the schedule's (and, with fleet
//! polling, the coordinator's: `fleet`).

mod ending;
mod fleet;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use tokio::{
    sync::{mpsc, oneshot, watch},
    task::{self, JoinSet},
    time::{Instant, sleep_until},
};
use tracing::{Instrument, debug, info_span, warn};

use super::{
    Cmd, HubError, Inner, Shared, Snapshot, State, check_metrics, lock,
    schedule::{Call, Next, Reply, Schedule, ScheduleConfig, Verdict},
};
use crate::{
    job::{JobStatus, Token},
    upstream::{StatusEntry, UpstreamError},
};

type Waiter = oneshot::Sender<Result<JobStatus, HubError>>;

/// A call in flight: what the schedule decided, the ids actually sent, and
/// the checks it answers. Kept by the poller (not moved into the call's
/// task), so a task that panics still has its waiters ended.
struct InFlight {
    call: Call,
    ids: Vec<Arc<str>>,
    waiters: Vec<(Arc<str>, Vec<Waiter>)>,
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
        .map(|link| fleet::FleetSide::new(Arc::clone(link), &hub, &shared));
    let poller = Poller {
        shared: Arc::clone(&shared),
        hub,
        rx,
        schedule,
        waiters: HashMap::new(),
        calls: JoinSet::new(),
        flights: HashMap::new(),
        pause_error: None,
        next_sweep: None,
        fleet,
        links: crate::otel::RoundLinks::default(),
    };
    // No parent: a poller serves many calls, and must not carry the request
    // id of whichever call happened to start it.
    tokio::spawn(poller.run().instrument(info_span!(parent: None, "poller")));
    shared
}

struct Poller {
    shared: Arc<Shared>,
    hub: Arc<Inner>,
    rx: mpsc::UnboundedReceiver<Cmd>,
    schedule: Schedule,
    /// Checks queued for the next call, by id.
    waiters: HashMap<Arc<str>, Vec<Waiter>>,
    calls: JoinSet<Done>,
    /// What each call task in `calls` carries.
    flights: HashMap<task::Id, InFlight>,
    /// What caused the current pause, for checks asked during it.
    pause_error: Option<UpstreamError>,
    /// When `known` is next swept of stale answers.
    next_sweep: Option<Instant>,
    /// With fleet polling: this token's part in it.
    fleet: Option<fleet::FleetSide>,
    /// The calls each job's next round serves, for its span's links.
    links: crate::otel::RoundLinks,
}

impl Poller {
    async fn run(mut self) {
        loop {
            while let Ok(cmd) = self.rx.try_recv() {
                self.command(cmd);
            }
            let now = Instant::now();
            self.sweep(now);
            let fleet_wake = self.fleet_step(now);
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
            if wake.is_none() && self.calls.is_empty() && self.fleet_settled() && self.retire() {
                return;
            }
            tokio::select! {
                cmd = self.rx.recv() => {
                    if let Some(cmd) = cmd {
                        self.command(cmd);
                    }
                }
                Some(done) = self.calls.join_next_with_id() => match done {
                    Ok((id, result)) => {
                        if let Some(flight) = self.flights.remove(&id) {
                            self.apply(flight, result);
                        }
                    }
                    Err(e) => {
                        if let Some(flight) = self.flights.remove(&e.id()) {
                            self.panicked(flight, &e);
                        }
                    }
                },
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
                    let error = self.pause_error.clone().map_or(
                        HubError::Upstream(UpstreamError::RateLimited { retry_after: None }),
                        |e| HubError::Upstream(with_remaining(e, until - now)),
                    );
                    let _ = waiter.send(Err(error));
                    return;
                }
                self.waiters
                    .entry(Arc::clone(&id))
                    .or_default()
                    .push(waiter);
                self.links.check(&id, link);
                self.schedule.check(id);
            }
        }
    }

    /// Sends what the schedule decided, less what nobody wants any more:
    /// watched jobs without watchers and checks whose callers left.
    fn send(&mut self, call: Call) {
        let mut ids = Vec::with_capacity(call.ids.len());
        let mut waiters = Vec::new();
        {
            let mut state = lock(&self.shared.state);
            for id in &call.ids {
                let mut wanted = false;
                if let Some(list) = self.waiters.remove(id) {
                    let live: Vec<Waiter> = list.into_iter().filter(|w| !w.is_closed()).collect();
                    if !live.is_empty() {
                        wanted = true;
                        waiters.push((Arc::clone(id), live));
                    }
                }
                if self.schedule.is_watched(id) {
                    let remote = self.fleet.as_ref().is_some_and(|f| f.remote.contains(id));
                    if remote
                        || state
                            .slots
                            .get(id)
                            .is_some_and(|tx| tx.receiver_count() > 0)
                    {
                        wanted = true;
                    } else {
                        forget(&mut state, &mut self.schedule, id);
                    }
                }
                if wanted {
                    ids.push(Arc::clone(id));
                }
            }
        }
        let now = Instant::now();
        if ids.is_empty() {
            self.schedule.abandon(&call, now);
            return;
        }
        if call.carries_checks {
            let metrics = check_metrics();
            metrics.calls.increment(1);
            let answered: usize = waiters.iter().map(|(_, w)| w.len()).sum();
            metrics
                .coalesced
                .increment(answered.saturating_sub(1) as u64);
        }
        upstream_metrics().ids.record(ids.len() as f64);
        let source = Arc::clone(&self.hub.source);
        let request = source.batch_status(&self.shared.token, &ids);
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

    /// Publishes one call's answer to the watchers and checks of its ids
    /// (and, with fleet polling, to the other replicas).
    fn apply(&mut self, flight: InFlight, result: Result<Vec<StatusEntry>, UpstreamError>) {
        let now = Instant::now();
        let sharing = self.sharing();
        match result {
            Ok(entries) => {
                let InFlight {
                    call, ids, waiters, ..
                } = flight;
                let mut waiters: HashMap<Arc<str>, Vec<Waiter>> = waiters.into_iter().collect();
                let mut by_id: HashMap<String, StatusEntry> = entries
                    .into_iter()
                    .map(|e| match &e {
                        Ok(status) => (status.mark_id.clone(), e),
                        Err(bad) => (bad.mark_id.clone(), e),
                    })
                    .collect();
                let mut shared_entries = Vec::new();
                let shared = Arc::clone(&self.shared);
                let mut state = lock(&shared.state);
                for id in &ids {
                    let outcome = match by_id.remove(&**id) {
                        Some(Ok(status)) => Ok(status),
                        Some(Err(bad)) => {
                            warn!(error = %bad.error, mark_id = %bad.mark_id, "unreadable status entry");
                            Err(HubError::Upstream(bad.error))
                        }
                        None => Err(HubError::NotFound {
                            mark_id: id.to_string(),
                        }),
                    };
                    self.publish(&mut state, id, &outcome, now);
                    if let Ok(status) = &outcome {
                        // Fresh from when the call was sent: the state
                        // Piclumen reported is at least that recent.
                        state
                            .known
                            .insert(Arc::clone(id), (status.clone(), call.sent_at));
                        self.next_sweep
                            .get_or_insert(now + self.hub.config.poll_interval);
                    }
                    if sharing {
                        shared_entries.push(fleet::entry(id, &outcome));
                    }
                    for waiter in waiters.remove(id).unwrap_or_default() {
                        let _ = waiter.send(outcome.clone());
                    }
                }
                drop(state);
                self.schedule.on_reply(&call, &Reply::Answered, now);
                if sharing {
                    self.share(shared_entries);
                }
            }
            Err(error) if error.is_transient() => {
                let InFlight {
                    call,
                    waiters,
                    span,
                    ..
                } = flight;
                for waiter in waiters.into_iter().flat_map(|(_, w)| w) {
                    let _ = waiter.send(Err(HubError::Upstream(error.clone())));
                }
                let retry_after = match &error {
                    UpstreamError::RateLimited { retry_after } => *retry_after,
                    _ => None,
                };
                match self
                    .schedule
                    .on_reply(&call, &Reply::Transient { retry_after }, now)
                {
                    Verdict::Outage => {
                        if sharing {
                            self.share_outage(&error);
                        }
                        self.outage(error);
                    }
                    Verdict::Paused(until) => {
                        upstream_metrics().retries.increment(1);
                        crate::otel::retry_event(
                            &span,
                            until.saturating_duration_since(now),
                            &error.to_string(),
                        );
                        debug!(%error, pause = ?until.saturating_duration_since(now), "transient upstream trouble; pausing the token");
                        if sharing {
                            self.share_pause(until.saturating_duration_since(now), &error);
                        }
                        self.links.clear_checks();
                        self.pause(until, error, now);
                    }
                    Verdict::Continue => {}
                }
            }
            Err(error) => {
                warn!(%error, "Piclumen refused a status call; ending its watches and checks");
                self.end_call(flight, HubError::Upstream(error));
            }
        }
    }

    /// Sends an outcome to a job's watchers; a finished or unwatched job
    /// leaves the schedule, unless another replica still wants it polled.
    fn publish(
        &mut self,
        state: &mut State,
        id: &Arc<str>,
        outcome: &Result<JobStatus, HubError>,
        now: Instant,
    ) {
        let done = match outcome {
            Ok(status) => status.state.is_terminal(),
            Err(_) => true,
        };
        let remote = match &mut self.fleet {
            Some(fleet) => {
                fleet.coord.heard(id, now);
                if done {
                    fleet.remote.remove(id);
                    false
                } else {
                    fleet.remote.contains(id)
                }
            }
            None => false,
        };
        let Some(tx) = state.slots.get(id) else {
            if !remote {
                self.schedule.unwatch(id);
            }
            return;
        };
        let snapshot = match outcome {
            Ok(status) => Snapshot::Status(status.clone()),
            Err(e) => Snapshot::Ended(e.clone()),
        };
        set(tx, snapshot);
        if done || tx.receiver_count() == 0 {
            state.slots.remove(id);
            if !remote {
                self.schedule.unwatch(id);
            }
        }
    }

    /// Drops answers older than one interval.
    fn sweep(&mut self, now: Instant) {
        if self.next_sweep.is_none_or(|at| at > now) {
            return;
        }
        let interval = self.hub.config.poll_interval;
        let mut state = lock(&self.shared.state);
        state
            .known
            .retain(|_, (_, at)| now.duration_since(*at) < interval);
        if state.known.capacity() > 4 * state.known.len().max(64) {
            state.known.shrink_to_fit();
        }
        self.next_sweep = (!state.known.is_empty()).then(|| now + interval / 2);
    }

    /// Ends this poller when it has nothing left, under the hub's lock so a
    /// handle either reaches this poller before it looks or finds none and
    /// starts a new one.
    fn retire(&mut self) -> bool {
        let mut tokens = lock(&self.hub.tokens);
        if self.fleet.as_ref().is_some_and(|f| !f.is_idle()) {
            return false;
        }
        if !self.rx.is_empty() || !self.schedule.is_idle() || !self.waiters.is_empty() {
            return false;
        }
        {
            let state = lock(&self.shared.state);
            if !state.known.is_empty() || !state.slots.is_empty() {
                return false;
            }
        }
        if tokens
            .get(&self.shared.token)
            .is_some_and(|s| Arc::ptr_eq(s, &self.shared))
        {
            tokens.remove(&self.shared.token);
        }
        if let Some(fleet) = &self.fleet {
            let mut keys = lock(&self.hub.keys);
            if keys
                .get(fleet.key.as_str())
                .is_some_and(|w| std::ptr::eq(w.as_ptr(), Arc::as_ptr(&self.shared)))
            {
                keys.remove(fleet.key.as_str());
            }
        }
        true
    }
}

/// Removes a job's channel and stops polling it.
fn forget(state: &mut State, schedule: &mut Schedule, id: &Arc<str>) {
    state.slots.remove(id);
    schedule.unwatch(id);
}

fn set(tx: &watch::Sender<Snapshot>, snapshot: Snapshot) {
    tx.send_if_modified(|current| {
        let changed = *current != snapshot;
        if changed {
            *current = snapshot;
        }
        changed
    });
}

/// A rate-limit error telling the caller how much of the pause is left.
fn with_remaining(error: UpstreamError, left: std::time::Duration) -> UpstreamError {
    match error {
        UpstreamError::RateLimited { .. } => UpstreamError::RateLimited {
            retry_after: Some(left),
        },
        other => other,
    }
}

struct UpstreamMetrics {
    retries: metrics::Counter,
    ids: metrics::Histogram,
}

fn upstream_metrics() -> &'static UpstreamMetrics {
    static M: std::sync::OnceLock<UpstreamMetrics> = std::sync::OnceLock::new();
    M.get_or_init(|| UpstreamMetrics {
        retries: metrics::counter!("piclumen_upstream_retries_total", "endpoint" => "status"),
        ids: metrics::histogram!("piclumen_hub_ids_per_call"),
    })
}
