//! The CheckImage callers a token's poller holds: `Queued`, waiting by id
//! for the next call that carries their job, and `Carried`, those a call
//! in flight answers once it ends (as its round plan says). Where trouble
//! would answer them, a stale-if-error state (`stale`, given by the poller)
//! answers instead when there is one.

use std::collections::HashMap;

use tokio::sync::oneshot;

use super::round::{Outcome, Plan};
use crate::{
    hub::{HubError, schedule::Id},
    job::JobStatus,
};

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

    /// Answers every queued caller now: with its job's `stale` state when
    /// there is one, else with `error`.
    pub(super) fn fail_all(&mut self, error: &HubError, stale: impl Fn(&Id) -> Option<JobStatus>) {
        for (id, waiters) in self.0.drain() {
            fail(waiters, error, stale(&id));
        }
    }
}

/// Answers `waiters` with `stale` when given, else with `error`.
fn fail(waiters: Vec<Waiter>, error: &HubError, stale: Option<JobStatus>) {
    let answer = stale.ok_or_else(|| error.clone());
    for waiter in waiters {
        let _ = waiter.send(answer.clone());
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

    /// Answers every caller with `error`.
    pub(super) fn answer_all(mut self, error: &HubError) {
        for (_, waiters) in self.0.drain(..) {
            fail(waiters, error, None);
        }
    }

    /// Answers each caller with its job's outcome, or, when the plan has
    /// an error for the call's checks, with its job's `stale` state if any,
    /// else that error.
    pub(super) fn answer(mut self, plan: &Plan, stale: impl Fn(&Id) -> Option<JobStatus>) {
        let carried = std::mem::take(&mut self.0);
        if carried.is_empty() {
            return;
        }
        if let Some(error) = &plan.checks_error {
            for (id, waiters) in carried {
                fail(waiters, error, stale(&id));
            }
            return;
        }
        let outcomes: HashMap<&Id, &Outcome> =
            plan.jobs.iter().map(|j| (&j.id, &j.outcome)).collect();
        for (id, waiters) in carried {
            if let Some(outcome) = outcomes.get(&id) {
                for waiter in waiters {
                    let _ = waiter.send((*outcome).clone());
                }
            }
        }
    }
}

/// Callers still carried when their call is dropped unanswered are not
/// left waiting: INTERNAL when the poller is unwinding from a panic (the
/// bug is logged by its supervisor), else the hub is stopping.
impl Drop for Carried {
    fn drop(&mut self) {
        if self.0.is_empty() {
            return;
        }
        let error = if std::thread::panicking() {
            HubError::Internal
        } else {
            HubError::Stopped
        };
        for (_, waiters) in self.0.drain(..) {
            fail(waiters, &error, None);
        }
    }
}
