//! Creates in flight, counted so a draining server can wait for each of
//! them to end and its outcome to be recorded before the process exits:
//! a create is paid for whether or not a caller still waits for it.

use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

use tokio::sync::Notify;

/// The count of creates in flight; cheap to clone, shared by the service
/// and the server's drain.
#[derive(Debug, Clone, Default)]
pub struct CreatesInFlight(Arc<Shared>);

/// An atomic count, and a wake-up when it falls to zero: every create
/// enters and leaves, so neither takes a lock (a `watch` channel took a
/// write lock and woke its eight notifiers on both), while the drain,
/// which waits once, pays for the waiting.
#[derive(Debug, Default)]
struct Shared {
    count: AtomicUsize,
    idle: Notify,
}

impl CreatesInFlight {
    /// Counts one create until the returned guard is dropped.
    pub fn enter(&self) -> InFlight {
        self.0.count.fetch_add(1, Ordering::AcqRel);
        InFlight(Arc::clone(&self.0))
    }

    /// How many creates are in flight now.
    pub fn count(&self) -> usize {
        self.0.count.load(Ordering::Acquire)
    }

    /// Resolves once no create is in flight.
    pub async fn idle(&self) {
        loop {
            // Registered before the count is read, so a create ending in
            // between still wakes this wait.
            let ended = self.0.idle.notified();
            tokio::pin!(ended);
            ended.as_mut().enable();
            if self.count() == 0 {
                return;
            }
            ended.await;
        }
    }
}

/// One create in flight; see [`CreatesInFlight::enter`].
#[derive(Debug)]
pub struct InFlight(Arc<Shared>);

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn idle_waits_for_every_create() {
        let creates = CreatesInFlight::default();
        creates.idle().await;
        let first = creates.enter();
        let second = creates.enter();
        assert_eq!(creates.count(), 2);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            drop(first);
            tokio::time::sleep(Duration::from_secs(2)).await;
            drop(second);
        });
        let start = tokio::time::Instant::now();
        creates.idle().await;
        assert_eq!(start.elapsed(), Duration::from_secs(3));
        assert_eq!(creates.count(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_wakes_every_waiter_and_waits_again_for_new_creates() {
        let creates = CreatesInFlight::default();
        let first = creates.enter();
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let creates = creates.clone();
                tokio::spawn(async move { creates.idle().await })
            })
            .collect();
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(waiters.iter().all(|w| !w.is_finished()));
        drop(first);
        for waiter in waiters {
            tokio::time::timeout(Duration::from_secs(1), waiter)
                .await
                .expect("woken when the count reached zero")
                .expect("no panic");
        }
        let again = creates.enter();
        assert!(
            tokio::time::timeout(Duration::from_secs(5), creates.idle())
                .await
                .is_err(),
            "a new create keeps the drain waiting"
        );
        drop(again);
        creates.idle().await;
    }
}
