//! `FleetSide`, one token's part in fleet polling: it runs the exchanges
//! the coordinator asks for, turns the schedule's role (who sends watched
//! jobs), keeps the ids other replicas want polled while this one holds the
//! lease, and publishes answers, pauses and outages to the other replicas.
//! Every decision is the coordinator's or the schedule's; what the other
//! replicas' answers do to this replica's watchers is the poller's.

use std::{
    collections::HashSet,
    sync::{Arc, Weak},
    time::Duration,
};

use tokio::{task::JoinSet, time::Instant};
use tracing::debug;

use super::lock;
use crate::{
    hub::{
        Inner, Shared,
        fleet::{
            ExchangeReply, ExchangeRequest, FleetError, FleetLink, TokenKey,
            coordinator::{Coordinator, CoordinatorConfig, Exchange, Role, Step},
            wire::{Encoded, Entry, Outage, Pause, Round, WireError},
        },
        schedule::{Id, Schedule},
    },
    upstream::{BoxFuture, UpstreamError},
};

/// One token's part in fleet polling.
pub(super) struct FleetSide {
    link: Arc<FleetLink>,
    pub(super) key: TokenKey,
    pub(super) coord: Coordinator,
    /// Ids polled here for other replicas only (while holding the lease).
    pub(super) remote: HashSet<Id>,
    exchanges: JoinSet<Result<ExchangeReply, FleetError>>,
    /// The hub's failure budget, told with an outage.
    budget: Duration,
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
            budget: hub.config.failure_budget,
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

    /// True when answers are published to the other replicas.
    pub(super) fn shares(&self) -> bool {
        self.coord.role().shares()
    }

    /// True when other replicas' rounds apply here.
    pub(super) fn takes_part(&self) -> bool {
        self.coord.role() != Role::Idle
    }

    /// Runs the coordinator's next step; returns when it next wants to be
    /// asked.
    pub(super) fn step(
        &mut self,
        shared: &Shared,
        schedule: &mut Schedule,
        now: Instant,
    ) -> Option<Instant> {
        let watching = !lock(&shared.state).slots.is_empty();
        if self.coord.interest(watching, now) {
            // The last watcher left while holding the lease: give it back
            // so a replica with watchers takes it at once.
            self.release();
            self.drop_remote(shared, schedule);
        }
        // Nothing is polled for watchers while joining: the first exchange
        // tells whether another replica already does.
        schedule.set_polls_watches(self.coord.role().polls_watches());
        match self
            .coord
            .next(now, || lock(&shared.state).slots.keys().cloned().collect())
        {
            Step::Exchange(exchange) => {
                self.start(exchange);
                None
            }
            Step::At(at) => Some(at),
            Step::Idle => None,
        }
    }

    /// Runs `exchange` with the store in the background, bounded so a
    /// silent store cannot hold the token's turn for ever.
    fn start(&mut self, exchange: Exchange) {
        let config = self.coord.config();
        let request = ExchangeRequest {
            key: self.key.clone(),
            me: Arc::clone(&self.link.me),
            lease: config.lease(),
            want_ttl: config.want_ttl(),
            register: exchange.register,
            read: exchange.read,
        };
        let bound = config.lease().max(Duration::from_secs(1));
        let call = self.link.store.exchange(request);
        self.exchanges.spawn(async move {
            tokio::time::timeout(bound, call)
                .await
                .unwrap_or_else(|_| Err(FleetError(format!("no answer within {bound:?}"))))
        });
    }

    /// An exchange ended: turn roles, add or drop the wanted ids; returns
    /// the states read back, for the poller to publish.
    pub(super) fn on_exchange(
        &mut self,
        result: Result<ExchangeReply, FleetError>,
        shared: &Shared,
        schedule: &mut Schedule,
        now: Instant,
    ) -> Vec<Entry> {
        self.link.report(&result);
        let outcome = self
            .coord
            .on_exchange(result.as_ref().map(|r| r.holder).map_err(|_| ()), now);
        if outcome.release {
            self.release();
        }
        if let Some((from, to)) = outcome.turn {
            debug!(?from, ?to, "fleet polling: role changed");
            schedule.set_polls_watches(to.polls_watches());
            if to != Role::Holder {
                self.drop_remote(shared, schedule);
            }
        }
        let Ok(reply) = result else {
            return Vec::new();
        };
        if self.coord.role() == Role::Holder {
            self.want(reply.wanted, shared, schedule, now);
        }
        reply.states
    }

    /// The holder's polled set: its own watched ids plus `wanted`.
    fn want(&mut self, wanted: Vec<Id>, shared: &Shared, schedule: &mut Schedule, now: Instant) {
        let wanted: HashSet<Id> = wanted.into_iter().collect();
        let gone: Vec<Id> = self.remote.difference(&wanted).cloned().collect();
        let state = lock(&shared.state);
        for id in gone {
            self.remote.remove(&id);
            if !state.slots.contains_key(&id) {
                schedule.unwatch(&id);
            }
        }
        for id in wanted {
            if !state.slots.contains_key(&id) && self.remote.insert(Arc::clone(&id)) {
                schedule.watch(id, now);
            }
        }
    }

    /// Stops polling the ids only other replicas wanted.
    fn drop_remote(&mut self, shared: &Shared, schedule: &mut Schedule) {
        let state = lock(&shared.state);
        for id in self.remote.drain() {
            if !state.slots.contains_key(&id) {
                schedule.unwatch(&id);
            }
        }
    }

    /// Publishes answers to the other replicas, in the background; the
    /// store keeps them for late readers, and finished ids leave the
    /// wanted set.
    pub(super) fn share(&self, entries: Vec<Entry>) {
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
    pub(super) fn share_pause(&self, left: Duration, cause: &UpstreamError) {
        let pause = Pause {
            ms: u64::try_from(left.as_millis()).unwrap_or(u64::MAX),
            cause: WireError::from(cause),
        };
        self.send_round(Vec::new(), Some(pause), None, Vec::new());
    }

    /// Tells the other replicas that the token's trouble outlasted the
    /// failure budget.
    pub(super) fn share_outage(&self, last: &UpstreamError) {
        let outage = Outage {
            budget_ms: u64::try_from(self.budget.as_millis()).unwrap_or(u64::MAX),
            last: WireError::from(last),
        };
        self.send_round(Vec::new(), None, Some(outage), Vec::new());
    }

    fn send_round(
        &self,
        entries: Vec<Entry>,
        pause: Option<Pause>,
        outage: Option<Outage>,
        done: Vec<Id>,
    ) {
        let round = Encoded::new(Round {
            key: self.key.as_str().to_owned(),
            from: self.link.me.to_string(),
            entries,
            pause,
            outage,
        });
        let keep = self.coord.config().state_ttl();
        let link = Arc::downgrade(&self.link);
        let publish = self.link.store.publish(round, done, keep);
        tokio::spawn(report(link, publish));
    }

    /// Gives the lease back, in the background.
    fn release(&self) {
        let operation = self
            .link
            .store
            .release(self.key.clone(), Arc::clone(&self.link.me));
        tokio::spawn(report(Arc::downgrade(&self.link), operation));
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

/// Reports a background store operation's outcome to the link.
async fn report(link: Weak<FleetLink>, operation: BoxFuture<Result<(), FleetError>>) {
    let result = operation.await;
    if let Some(link) = link.upgrade() {
        link.report(&result);
    }
}
