//! How a token's poller ends. `retire`: it has nothing left, and leaves the
//! hub's maps under the hub's lock. `supervise` runs it and, should it
//! panic (a bug), `abandon`s its token: the panic is logged, every watch
//! and check it held or had been sent ends INTERNAL rather than waiting for
//! ever, and the token's state leaves the hub, so the token's next call
//! starts afresh with a new poller.

use std::{any::Any, collections::HashMap, panic::AssertUnwindSafe, sync::Arc};

use futures_util::FutureExt;
use tracing::error;

use super::{Cmd, HubError, Poller, Shared, Snapshot, lock};
use crate::job::Token;

/// Runs `poller` to its end; abandons its token if it panics.
pub(super) async fn supervise(mut poller: Poller) {
    let ended = AssertUnwindSafe(poller.run()).catch_unwind().await;
    if let Err(panic) = ended {
        error!(
            panic = panic_message(&*panic),
            "a token's poller panicked; its watches and checks end INTERNAL"
        );
        poller.abandon();
    }
}

/// The message a panic was raised with.
fn panic_message(panic: &(dyn Any + Send)) -> &str {
    if let Some(text) = panic.downcast_ref::<&'static str>() {
        text
    } else if let Some(text) = panic.downcast_ref::<String>() {
        text
    } else {
        "(not a string)"
    }
}

impl Poller {
    /// Ends this poller when it has nothing left, under the hub's lock so a
    /// handle either reaches this poller before it looks or finds none and
    /// starts a new one.
    pub(super) fn retire(&mut self) -> bool {
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
        self.unregister(&mut tokens);
        true
    }

    /// Takes this poller out of the hub's maps (if still there): the
    /// token's next call starts a new one.
    fn unregister(&self, tokens: &mut HashMap<Token, Arc<Shared>>) {
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
    }

    /// Gives up the token after a panic: out of the hub's maps first (so no
    /// handle reaches this poller any more), then every watch, queued or
    /// carried check and command still in the channel is answered INTERNAL,
    /// and the remembered answers are dropped with the rest.
    fn abandon(&mut self) {
        let internal = HubError::Internal;
        {
            let mut tokens = lock(&self.hub.tokens);
            self.unregister(&mut tokens);
            // Under the hub's lock, as `subscribe` adds slots: a watch
            // either joined before (and is ended here) or finds no poller.
            let mut state = lock(&self.shared.state);
            for (_, slot) in state.slots.drain() {
                slot.set(Snapshot::Ended(internal.clone()));
            }
            state.known.clear();
        }
        self.rx.close();
        while let Ok(cmd) = self.rx.try_recv() {
            if let Cmd::Check(_, waiter, _) = cmd {
                let _ = waiter.send(Err(internal.clone()));
            }
        }
        self.waiters.fail_all(&internal, |_| None);
        for (_, flight) in self.flights.drain() {
            flight.waiters.answer_all(&internal);
        }
        self.calls.abort_all();
    }
}
