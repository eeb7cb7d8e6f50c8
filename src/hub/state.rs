//! A token's state shared between its poller and the hub's handles: the
//! watched jobs' channels (`Slot`s) and the answers recent enough to serve
//! checks (fresh, or stale-if-error while Piclumen is in trouble).

use std::{collections::HashMap, sync::Arc};

use tokio::{sync::watch, time::Instant};

use super::{Snapshot, gauges, schedule::Id, stale::StaleIfError};
use crate::job::JobStatus;

/// Job channels and recent answers of one token.
///
/// Who writes what: `known` has one writer, the poller (handles only read
/// it). `slots` has two, by necessity: a handle adds a job's slot, because
/// `Hub::subscribe` is synchronous and must, under this lock, join the
/// channel a concurrent subscriber of the same job may have just made (a
/// round trip through the poller would make it wait, or make two channels
/// for one job); the poller removes it, because only it learns that the job
/// finished or lost its last watcher (receivers are cloned, so a watcher
/// cannot tell it is the last). The `piclumen_hub_jobs` gauge is the
/// `Slot`'s own: counted when made, uncounted when dropped, by either side.
#[derive(Debug, Default)]
pub(super) struct State {
    /// Watched jobs' channels.
    pub(super) slots: HashMap<Id, Slot>,
    /// The latest answer for each job asked recently, with when it was
    /// observed; swept as `StaleIfError::keeps` says (one interval, or the
    /// stale-if-error window when longer).
    pub(super) known: HashMap<Id, (JobStatus, Instant)>,
}

/// A watched job's channel, counted in `piclumen_hub_jobs` for as long as
/// it lives, so no code path can add or drop a slot and miss the gauge.
#[derive(Debug)]
pub(super) struct Slot(watch::Sender<Snapshot>);

impl Slot {
    /// A new channel starting at `first`, with its first receiver.
    pub(super) fn open(first: Snapshot) -> (Self, watch::Receiver<Snapshot>) {
        let (tx, rx) = watch::channel(first);
        gauges().jobs.increment(1.0);
        (Self(tx), rx)
    }

    /// Sends `snapshot` to the job's watchers, unless they already have it.
    /// A state that only differs by when it was observed replaces the
    /// current one without waking the watchers: later readers (a newcomer,
    /// a heartbeat) see its age, and a round of unchanged jobs costs no
    /// wake-ups.
    pub(super) fn set(&self, snapshot: Snapshot) {
        self.0.send_if_modified(|current| {
            // Statuses equal whatever their `observed_at`.
            if *current == snapshot {
                if let (Snapshot::Status(now), Snapshot::Status(new)) = (current, &snapshot) {
                    now.observed_at = new.observed_at;
                }
                return false;
            }
            *current = snapshot;
            true
        });
    }
}

impl std::ops::Deref for Slot {
    type Target = watch::Sender<Snapshot>;

    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        gauges().jobs.decrement(1.0);
    }
}

impl State {
    /// Keeps answers to serve checks for one interval from `fresh_from`;
    /// true when there was any.
    pub(super) fn remember(&mut self, known: &[(Id, JobStatus)], fresh_from: Instant) -> bool {
        for (id, status) in known {
            self.known
                .insert(Arc::clone(id), (status.clone(), fresh_from));
        }
        !known.is_empty()
    }

    /// Drops answers no longer worth keeping; returns when to sweep next,
    /// if anything is left.
    pub(super) fn sweep(&mut self, now: Instant, rules: &StaleIfError) -> Option<Instant> {
        self.known
            .retain(|_, (status, at)| rules.keeps(status, now.duration_since(*at)));
        // A burst of checks can leave a large, mostly empty table behind.
        if self.known.capacity() > 4 * self.known.len().max(64) {
            self.known.shrink_to_fit();
        }
        (!self.known.is_empty()).then(|| now + rules.sweep_every())
    }
}
