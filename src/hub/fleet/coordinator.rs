//! One token's part in fleet polling, as a plain state machine: given `now`
//! and how the last exchange with the shared store went, it says when to
//! talk to the store next, what to register and read back, and which role
//! this replica plays for the token. No task, no clock, no I/O; the poller
//! runs the exchanges and applies the turns.
//!
//! Roles:
//! - `Idle`: no watcher of the token here; the replica takes no part (it
//!   never takes the lease for a token none of its callers gave it to
//!   watch).
//! - `Joining`: watchers arrived; the first exchange is on its way, and
//!   nothing is polled until it tells who holds the lease.
//! - `Holder`: this replica holds the token's lease and polls the union of
//!   the ids every replica wants; it publishes every answer.
//! - `Follower`: another replica holds the lease; this one registers its
//!   watched ids, gets the answers from the holder's rounds, and reads back
//!   the stored state of any watched id it has not heard of for two
//!   intervals (a round missed while its subscription was down, a holder
//!   that died before publishing).
//! - `Local`: the store is unreachable: the replica polls its own jobs, as
//!   without fleet polling, and keeps trying the store.
//!
//! Every exchange also renews (holder) or tries to take (others) the lease:
//! it lives one interval and exchanges come every third of one, so a dead
//! holder's lease is taken over within an interval and a third.

use std::{collections::HashMap, time::Duration};

use tokio::time::Instant;

use crate::hub::schedule::Id;

/// This replica's part for one token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// No watcher here.
    Idle,
    /// Waiting for the first exchange.
    Joining,
    /// Holds the lease: polls for the fleet.
    Holder,
    /// Another replica polls; this one listens.
    Follower,
    /// The store is unreachable: polls alone.
    Local,
}

impl Role {
    /// True when this replica sends its watched jobs upstream itself.
    pub fn polls_watches(self) -> bool {
        matches!(self, Self::Holder | Self::Local)
    }

    /// True when this replica publishes its answers and applies others'.
    pub fn shares(self) -> bool {
        matches!(self, Self::Holder | Self::Follower)
    }
}

/// Timings, all derived from the poll interval.
#[derive(Debug, Clone, Copy)]
pub struct CoordinatorConfig {
    /// The hub's poll interval.
    pub interval: Duration,
}

impl CoordinatorConfig {
    /// Time between two exchanges with the store.
    pub fn exchange_every(&self) -> Duration {
        self.interval / 3
    }
    /// How long a lease lives unless renewed.
    pub fn lease(&self) -> Duration {
        self.interval
    }
    /// How long a registered id stays wanted unless registered again.
    pub fn want_ttl(&self) -> Duration {
        self.interval * 2
    }
    /// How long a follower waits for news of a watched id before reading its
    /// stored state back.
    pub fn stale_after(&self) -> Duration {
        self.interval * 2
    }
    /// How long a published state stays readable.
    pub fn state_ttl(&self) -> Duration {
        self.interval * 5
    }
}

/// An exchange to run now.
#[derive(Debug, Clone, PartialEq)]
pub struct Exchange {
    /// Ids to register as wanted (empty for the holder).
    pub register: Vec<Id>,
    /// Ids whose stored state to read back.
    pub read: Vec<Id>,
}

/// What to do about the store.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Run this exchange now.
    Exchange(Exchange),
    /// Nothing before this instant.
    At(Instant),
    /// Nothing until watchers arrive or the exchange in flight ends.
    Idle,
}

/// What an exchange's end changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// The role changed: (from, to).
    pub turn: Option<(Role, Role)>,
    /// The lease was taken while the watchers left: give it back.
    pub release: bool,
}

/// See the module docs.
#[derive(Debug)]
pub struct Coordinator {
    config: CoordinatorConfig,
    role: Role,
    next: Instant,
    in_flight: bool,
    /// Local watched ids and when each last had news.
    heard: HashMap<Id, Instant>,
}

impl Coordinator {
    /// A coordinator with no watcher yet.
    pub fn new(config: CoordinatorConfig, now: Instant) -> Self {
        Self {
            config,
            role: Role::Idle,
            next: now,
            in_flight: false,
            heard: HashMap::new(),
        }
    }

    /// The current role.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The timings.
    pub fn config(&self) -> CoordinatorConfig {
        self.config
    }

    /// Whether this replica has watchers of the token. Losing the last one
    /// makes it `Idle`; returns true when it held the lease, which the
    /// shell then releases.
    pub fn interest(&mut self, watching: bool, now: Instant) -> bool {
        match (watching, self.role) {
            (true, Role::Idle) => {
                self.role = Role::Joining;
                self.next = now;
                false
            }
            (false, role) if role != Role::Idle => {
                self.role = Role::Idle;
                self.heard.clear();
                role == Role::Holder
            }
            _ => false,
        }
    }

    /// A new local watch: a follower registers it soon rather than at its
    /// next exchange, so the holder starts polling it within the round.
    pub fn watched(&mut self, id: Id, now: Instant) {
        self.heard.entry(id).or_insert(now);
        if self.role == Role::Follower {
            self.next = self.next.min(now);
        }
    }

    /// News of a local watched id (from any call or round).
    pub fn heard(&mut self, id: &str, now: Instant) {
        if let Some(at) = self.heard.get_mut(id) {
            *at = now;
        }
    }

    /// The next step at `now`. `local` lists the ids watched here when an
    /// exchange is due (called with the current list; ids gone from it are
    /// forgotten).
    pub fn next(&mut self, now: Instant, local: impl FnOnce() -> Vec<Id>) -> Step {
        if self.role == Role::Idle || self.in_flight {
            return Step::Idle;
        }
        if self.next > now {
            return Step::At(self.next);
        }
        let local = local();
        let mut heard = HashMap::with_capacity(local.len());
        for id in local {
            let at = self.heard.get(&id).copied().unwrap_or(now);
            heard.insert(id, at);
        }
        self.heard = heard;
        let register = if self.role == Role::Holder {
            Vec::new()
        } else {
            self.heard.keys().cloned().collect()
        };
        let mut read = Vec::new();
        if self.role == Role::Follower {
            let stale = self.config.stale_after();
            for (id, at) in &mut self.heard {
                if now.duration_since(*at) >= stale {
                    read.push(id.clone());
                    // Read once per staleness period, not every exchange.
                    *at = now;
                }
            }
        }
        self.in_flight = true;
        Step::Exchange(Exchange { register, read })
    }

    /// The exchange ended: `Ok(holder)` when the store answered (and whether
    /// this replica now holds the lease), `Err(())` when it could not be
    /// reached.
    pub fn on_exchange(&mut self, result: Result<bool, ()>, now: Instant) -> Outcome {
        self.in_flight = false;
        self.next = now + self.config.exchange_every();
        if self.role == Role::Idle {
            return Outcome {
                turn: None,
                release: result == Ok(true),
            };
        }
        let to = match result {
            Ok(true) => Role::Holder,
            Ok(false) => Role::Follower,
            Err(()) => Role::Local,
        };
        let from = self.role;
        if to == from {
            return Outcome {
                turn: None,
                release: false,
            };
        }
        self.role = to;
        if to == Role::Follower {
            // The holder needs a round to pick our ids up: news is due from
            // now on, not from before.
            for at in self.heard.values_mut() {
                *at = now;
            }
            // Register at once what we watch, now that someone else polls.
            if from == Role::Holder {
                self.next = now;
            }
        }
        Outcome {
            turn: Some((from, to)),
            release: false,
        }
    }
}
