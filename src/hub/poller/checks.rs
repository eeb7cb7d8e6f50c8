//! The CheckImage callers a token's poller holds: `Queued`, waiting by id
//! for the next call that carries their job, and `Carried`, those a call
//! in flight answers once it ends (as its round plan says).

use std::collections::HashMap;

use tokio::sync::oneshot;

use super::round::{Outcome, Plan};
use crate::hub::{HubError, schedule::Id};

/// A caller waiting for its job's outcome.
pub(super) type Waiter = oneshot::Sender<Outcome>;

/// Callers waiting for the next call that carries their job.
#[derive(Debug, Default)]
pub(super) struct Queued(HashMap<Id, Vec<Waiter>>);

impl Queued {
    /// Queues a caller of `id`.
    pub(super) fn push(&mut self, id: Id, waiter: Waiter) {
        self.0.entry(id).or_default().push(waiter);
    }

    /// Takes the callers of `id` that are still waiting, for a call that
    /// carries it; those who left (deadline, cancel) are dropped.
    pub(super) fn take(&mut self, id: &Id) -> Option<Vec<Waiter>> {
        let live: Vec<Waiter> = self
            .0
            .remove(id)?
            .into_iter()
            .filter(|w| !w.is_closed())
            .collect();
        (!live.is_empty()).then_some(live)
    }

    /// True when no caller waits.
    pub(super) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Answers every queued caller with `error` now.
    pub(super) fn fail_all(&mut self, error: &HubError) {
        for waiter in self.0.drain().flat_map(|(_, w)| w) {
            let _ = waiter.send(Err(error.clone()));
        }
    }
}

/// The callers a call in flight answers, by id.
#[derive(Debug, Default)]
pub(super) struct Carried(Vec<(Id, Vec<Waiter>)>);

impl Carried {
    /// Adds the callers of `id`.
    pub(super) fn push(&mut self, id: Id, waiters: Vec<Waiter>) {
        self.0.push((id, waiters));
    }

    /// How many callers the call answers.
    pub(super) fn count(&self) -> usize {
        self.0.iter().map(|(_, w)| w.len()).sum()
    }

    /// Answers each caller with its job's outcome, or all of them with the
    /// plan's error for the call's checks.
    pub(super) fn answer(self, plan: &Plan) {
        if self.0.is_empty() {
            return;
        }
        if let Some(error) = &plan.checks_error {
            for waiter in self.0.into_iter().flat_map(|(_, w)| w) {
                let _ = waiter.send(Err(error.clone()));
            }
            return;
        }
        let outcomes: HashMap<&Id, &Outcome> =
            plan.jobs.iter().map(|j| (&j.id, &j.outcome)).collect();
        for (id, waiters) in self.0 {
            if let Some(outcome) = outcomes.get(&id) {
                for waiter in waiters {
                    let _ = waiter.send((*outcome).clone());
                }
            }
        }
    }
}
