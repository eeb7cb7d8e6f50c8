//! A token's state shared between its poller and the hub's handles: the
//! watched jobs' channels (`Slot`s) and the answers fresh enough to serve
//! checks.

use std::{collections::HashMap, sync::Arc, time::Duration};

use tokio::{sync::watch, time::Instant};

use super::{Snapshot, gauges, schedule::Id};
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
    /// The latest answer for each job asked recently, with when it arrived;
    /// entries older than one interval are swept.
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
    pub(super) fn set(&self, snapshot: Snapshot) {
        self.0.send_if_modified(|current| {
            let changed = *current != snapshot;
            if changed {
                *current = snapshot;
            }
            changed
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

    /// Drops answers `interval` old; returns when to sweep next, if
    /// anything is left.
    pub(super) fn sweep(&mut self, now: Instant, interval: Duration) -> Option<Instant> {
        self.known
            .retain(|_, (_, at)| now.duration_since(*at) < interval);
        // A burst of checks can leave a large, mostly empty table behind.
        if self.known.capacity() > 4 * self.known.len().max(64) {
            self.known.shrink_to_fit();
        }
        (!self.known.is_empty()).then(|| now + interval / 2)
    }
}
