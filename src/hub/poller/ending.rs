//! How a token's watches and checks end or wait: a refused call, a call
//! task that panicked, a pause, an outage.

use std::{collections::HashMap, sync::Arc};

use tokio::{task, time::Instant};
use tracing::{error, warn};

use super::{HubError, InFlight, Poller, Snapshot, Waiter, fleet, lock, set, with_remaining};
use crate::{hub::schedule::Reply, upstream::UpstreamError};

impl Poller {
    /// A call's task panicked (a bug): its watches and checks end with an
    /// internal error rather than waiting for ever, and the token goes on.
    pub(super) fn panicked(&mut self, flight: InFlight, e: &task::JoinError) {
        error!(error = %e, "a status call task failed; ending its watches and checks");
        self.end_call(flight, HubError::Internal);
    }

    /// Ends every watch and check of a call with `error` (a refusal, or a
    /// failed task).
    pub(super) fn end_call(&mut self, flight: InFlight, ended: HubError) {
        let now = Instant::now();
        let InFlight {
            call, ids, waiters, ..
        } = flight;
        let mut waiters: HashMap<Arc<str>, Vec<Waiter>> = waiters.into_iter().collect();
        let shared = Arc::clone(&self.shared);
        let mut state = lock(&shared.state);
        let mut shared_entries = Vec::new();
        for id in &ids {
            self.publish(&mut state, id, &Err(ended.clone()), now);
            shared_entries.push(fleet::entry(id, &Err(ended.clone())));
            for waiter in waiters.remove(id).unwrap_or_default() {
                let _ = waiter.send(Err(ended.clone()));
            }
        }
        drop(state);
        self.schedule.on_reply(&call, &Reply::Refused, now);
        self.share(shared_entries);
    }

    /// Holds the token until `until`: queued checks get the cause now
    /// rather than waiting out the pause.
    pub(super) fn pause(&mut self, until: Instant, error: UpstreamError, now: Instant) {
        for waiter in self.waiters.drain().flat_map(|(_, w)| w) {
            let _ = waiter.send(Err(HubError::Upstream(with_remaining(
                error.clone(),
                until.saturating_duration_since(now),
            ))));
        }
        self.schedule.clear_checks();
        self.pause_error = Some(error);
    }

    /// Ends every watch and queued check of the token.
    pub(super) fn outage(&mut self, last: UpstreamError) {
        warn!(%last, "upstream trouble outlasted the failure budget; ending watches");
        let ended = HubError::Outage {
            budget: self.hub.config.failure_budget,
            last,
        };
        let mut state = lock(&self.shared.state);
        for (_, slot) in state.slots.drain() {
            set(&slot, Snapshot::Ended(ended.clone()));
        }
        drop(state);
        for waiter in self.waiters.drain().flat_map(|(_, w)| w) {
            let _ = waiter.send(Err(ended.clone()));
        }
        if let Some(fleet) = &mut self.fleet {
            fleet.remote.clear();
        }
        self.pause_error = None;
    }
}
