//! Creates in flight, counted so a draining server can wait for each of
//! them to end and its outcome to be recorded before the process exits:
//! a create is paid for whether or not a caller still waits for it.

use std::sync::Arc;

use tokio::sync::watch;

/// The count of creates in flight; cheap to clone, shared by the service
/// and the server's drain.
#[derive(Debug, Clone)]
pub struct CreatesInFlight {
    count: Arc<watch::Sender<usize>>,
}

impl Default for CreatesInFlight {
    fn default() -> Self {
        Self {
            count: Arc::new(watch::Sender::new(0)),
        }
    }
}

impl CreatesInFlight {
    /// Counts one create until the returned guard is dropped.
    pub fn enter(&self) -> InFlight {
        self.count.send_modify(|n| *n += 1);
        InFlight {
            count: Arc::clone(&self.count),
        }
    }

    /// How many creates are in flight now.
    pub fn count(&self) -> usize {
        *self.count.borrow()
    }

    /// Resolves once no create is in flight.
    pub async fn idle(&self) {
        let mut rx = self.count.subscribe();
        // The sender lives in `self`, so this never fails.
        let _ = rx.wait_for(|n| *n == 0).await;
    }
}

/// One create in flight; see [`CreatesInFlight::enter`].
#[derive(Debug)]
pub struct InFlight {
    count: Arc<watch::Sender<usize>>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.count.send_modify(|n| *n = n.saturating_sub(1));
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
}
