//! The poller's side of fleet polling: runs the exchanges the coordinator
//! asks for, applies its turns to the schedule (who sends watched jobs),
//! adds the ids other replicas want while this one holds the lease,
//! publishes answers, pauses and outages, and applies other replicas'
//! rounds to this replica's watchers. Every decision is the coordinator's
//! or the schedule's.

use std::{
    collections::HashSet,
    sync::{Arc, Weak},
    time::Duration,
};

use tokio::{task::JoinSet, time::Instant};
use tracing::debug;

use super::{Poller, lock};
use crate::{
    hub::{
        HubError, Inner, Shared,
        fleet::{
            ExchangeReply, ExchangeRequest, FleetError, FleetLink, TokenKey,
            coordinator::{Coordinator, CoordinatorConfig, Role, Step},
            wire::{Encoded, Entry, Outage, Pause, Round, WireError},
        },
        schedule::Id,
    },
    job::JobStatus,
    upstream::UpstreamError,
};

/// One token's part in fleet polling.
pub(super) struct FleetSide {
    link: Arc<FleetLink>,
    pub(super) key: TokenKey,
    pub(super) coord: Coordinator,
    /// Ids polled here for other replicas only (while holding the lease).
    pub(super) remote: HashSet<Id>,
    exchanges: JoinSet<Result<ExchangeReply, FleetError>>,
}

impl FleetSide {
    /// The token's part, findable by its key for other replicas' rounds.
    pub(super) fn new(link: Arc<FleetLink>, hub: &Inner, shared: &Arc<Shared>) -> Self {
        let key = TokenKey::of(&shared.token);
        lock(&hub.keys).insert(key.as_str().into(), Arc::downgrade(shared));
        let config = CoordinatorConfig {
            interval: hub.config.poll_interval,
        };
        Self {
            link,
            key,
            coord: Coordinator::new(config, Instant::now()),
            remote: HashSet::new(),
            exchanges: JoinSet::new(),
        }
    }

    /// A new local watch.
    pub(super) fn watched(&mut self, id: Id, now: Instant) {
        self.coord.interest(true, now);
        self.coord.watched(id, now);
    }

    /// No exchange in flight and no part taken: the poller may end.
    pub(super) fn is_idle(&self) -> bool {
        self.exchanges.is_empty() && self.coord.role() == Role::Idle
    }
}

/// The next exchange to end, or never without fleet polling.
pub(super) async fn next_exchange(
    fleet: &mut Option<FleetSide>,
) -> Option<Result<ExchangeReply, FleetError>> {
    match fleet {
        Some(fleet) if !fleet.exchanges.is_empty() => match fleet.exchanges.join_next().await {
            Some(Ok(result)) => Some(result),
            Some(Err(e)) => Some(Err(FleetError(format!("the exchange task failed: {e}")))),
            None => None,
        },
        _ => std::future::pending().await,
    }
}

/// The entry to share for an outcome.
pub(super) fn entry(id: &str, outcome: &Result<JobStatus, HubError>) -> Entry {
    Entry::of(id, outcome)
}

impl Poller {
    /// True when answers are published to the other replicas.
    pub(super) fn sharing(&self) -> bool {
        self.fleet.as_ref().is_some_and(|f| f.coord.role().shares())
    }

    /// No exchange in flight (or no fleet polling).
    pub(super) fn fleet_settled(&self) -> bool {
        self.fleet.as_ref().is_none_or(FleetSide::is_idle)
    }

    /// Runs the coordinator's next step; returns when it next wants to be
    /// asked.
    pub(super) fn fleet_step(&mut self, now: Instant) -> Option<Instant> {
        // Without fleet polling this returns before taking any lock.
        self.fleet.as_ref()?;
        let watching = !lock(&self.shared.state).slots.is_empty();
        let fleet = self.fleet.as_mut()?;
        if fleet.coord.interest(watching, now) {
            // The last watcher left while holding the lease: give it back
            // so a replica with watchers takes it at once.
            release(fleet);
            self.drop_remote();
        }
        let fleet = self.fleet.as_mut()?;
        // Nothing is polled for watchers while joining: the first exchange
        // tells whether another replica already does.
        self.schedule
            .set_polls_watches(fleet.coord.role().polls_watches());
        let shared = Arc::clone(&self.shared);
        match fleet
            .coord
            .next(now, || lock(&shared.state).slots.keys().cloned().collect())
        {
            Step::Exchange(exchange) => {
                let config = fleet.coord.config();
                let request = ExchangeRequest {
                    key: fleet.key.clone(),
                    me: Arc::clone(&fleet.link.me),
                    lease: config.lease(),
                    want_ttl: config.want_ttl(),
                    register: exchange.register,
                    read: exchange.read,
                };
                let bound = config.lease().max(Duration::from_secs(1));
                let call = fleet.link.store.exchange(request);
                fleet.exchanges.spawn(async move {
                    tokio::time::timeout(bound, call)
                        .await
                        .unwrap_or_else(|_| Err(FleetError(format!("no answer within {bound:?}"))))
                });
                None
            }
            Step::At(at) => Some(at),
            Step::Idle => None,
        }
    }

    /// An exchange ended: turn roles, add or drop the wanted ids, apply
    /// the states read back.
    pub(super) fn on_exchange(&mut self, result: Result<ExchangeReply, FleetError>) {
        let now = Instant::now();
        let Some(fleet) = self.fleet.as_mut() else {
            return;
        };
        fleet.link.report(&result);
        let outcome = fleet
            .coord
            .on_exchange(result.as_ref().map(|r| r.holder).map_err(|_| ()), now);
        if outcome.release {
            release(fleet);
        }
        if let Some((from, to)) = outcome.turn {
            debug!(?from, ?to, "fleet polling: role changed");
            self.schedule.set_polls_watches(to.polls_watches());
            if to != Role::Holder {
                self.drop_remote();
            }
        }
        let Ok(reply) = result else {
            return;
        };
        if self.fleet.as_ref().map(|f| f.coord.role()) == Some(Role::Holder) {
            self.want(reply.wanted, now);
        }
        if !reply.states.is_empty() {
            self.apply_entries(&reply.states, now);
        }
    }

    /// The holder's polled set: its own watched ids plus `wanted`.
    fn want(&mut self, wanted: Vec<Id>, now: Instant) {
        let Some(fleet) = self.fleet.as_mut() else {
            return;
        };
        let wanted: HashSet<Id> = wanted.into_iter().collect();
        let gone: Vec<Id> = fleet.remote.difference(&wanted).cloned().collect();
        let state = lock(&self.shared.state);
        for id in gone {
            fleet.remote.remove(&id);
            if !state.slots.contains_key(&id) {
                self.schedule.unwatch(&id);
            }
        }
        for id in wanted {
            if !state.slots.contains_key(&id) && fleet.remote.insert(Arc::clone(&id)) {
                self.schedule.watch(id, now);
            }
        }
    }

    /// Stops polling the ids only other replicas wanted.
    fn drop_remote(&mut self) {
        let Some(fleet) = self.fleet.as_mut() else {
            return;
        };
        let state = lock(&self.shared.state);
        for id in fleet.remote.drain() {
            if !state.slots.contains_key(&id) {
                self.schedule.unwatch(&id);
            }
        }
    }

    /// Another replica's round: its answers reach this replica's watchers
    /// and fresh state; its pause or outage applies here too.
    pub(super) fn apply_round(&mut self, round: &Round, now: Instant) {
        if !self
            .fleet
            .as_ref()
            .is_some_and(|f| f.coord.role() != Role::Idle)
        {
            return;
        }
        self.apply_entries(&round.entries, now);
        if let Some(pause) = &round.pause {
            let until = now + Duration::from_millis(pause.ms);
            self.schedule.impose_pause(until, now);
            self.pause(until, pause.cause.clone().into(), now);
        }
        if let Some(outage) = &round.outage {
            self.outage_from(outage);
        }
    }

    fn apply_entries(&mut self, entries: &[Entry], now: Instant) {
        let shared = Arc::clone(&self.shared);
        let mut state = lock(&shared.state);
        for entry in entries {
            let id: Id = entry.id.as_str().into();
            let outcome = entry.outcome();
            if let Ok(status) = &outcome {
                // Fresh as of its arrival here (a round is a few
                // milliseconds old at most).
                state.known.insert(Arc::clone(&id), (status.clone(), now));
                self.next_sweep
                    .get_or_insert(now + self.hub.config.poll_interval);
            }
            if state.slots.contains_key(&id) {
                self.publish(&mut state, &id, &outcome, now);
            }
        }
    }

    fn outage_from(&mut self, outage: &Outage) {
        let last: UpstreamError = outage.last.clone().into();
        self.schedule.forget_all();
        self.outage(last);
    }

    /// Publishes answers to the other replicas, in the background; the
    /// store keeps them for late readers, and finished ids leave the
    /// wanted set.
    pub(super) fn share(&mut self, entries: Vec<Entry>) {
        if entries.is_empty() {
            return;
        }
        let done: Vec<Id> = entries
            .iter()
            .filter(|e| e.is_final())
            .map(|e| e.id.as_str().into())
            .collect();
        self.send_round(entries, None, None, done);
    }

    /// Tells the other replicas to hold their calls for `left`.
    pub(super) fn share_pause(&mut self, left: Duration, cause: &UpstreamError) {
        let pause = Pause {
            ms: u64::try_from(left.as_millis()).unwrap_or(u64::MAX),
            cause: WireError::from(cause),
        };
        self.send_round(Vec::new(), Some(pause), None, Vec::new());
    }

    /// Tells the other replicas that the token's trouble outlasted the
    /// failure budget.
    pub(super) fn share_outage(&mut self, last: &UpstreamError) {
        let outage = Outage {
            budget_ms: u64::try_from(self.hub.config.failure_budget.as_millis())
                .unwrap_or(u64::MAX),
            last: WireError::from(last),
        };
        self.send_round(Vec::new(), None, Some(outage), Vec::new());
    }

    fn send_round(
        &mut self,
        entries: Vec<Entry>,
        pause: Option<Pause>,
        outage: Option<Outage>,
        done: Vec<Id>,
    ) {
        let Some(fleet) = self.fleet.as_ref() else {
            return;
        };
        let round = Encoded::new(Round {
            key: fleet.key.as_str().to_owned(),
            from: fleet.link.me.to_string(),
            entries,
            pause,
            outage,
        });
        let keep = fleet.coord.config().state_ttl();
        let link = Arc::downgrade(&fleet.link);
        let publish = fleet.link.store.publish(round, done, keep);
        tokio::spawn(report(link, publish));
    }
}

/// Reports a background store operation's outcome to the link.
async fn report(
    link: Weak<FleetLink>,
    operation: crate::upstream::BoxFuture<Result<(), FleetError>>,
) {
    let result = operation.await;
    if let Some(link) = link.upgrade() {
        link.report(&result);
    }
}

/// Gives the lease back, in the background.
fn release(fleet: &FleetSide) {
    let operation = fleet
        .link
        .store
        .release(fleet.key.clone(), Arc::clone(&fleet.link.me));
    tokio::spawn(report(Arc::downgrade(&fleet.link), operation));
}
