//! A claim's lease, as a plain type: when its holder renews it, and what a
//! failed renewal means. The holder of a `request_id` claim renews it while
//! its create runs; a claim whose lease lapses tells every replica that its
//! holder is gone (killed, out of memory, cut off from the store). Methods
//! take `now` and return what to do; the store's task only sleeps and sends.

use std::time::Duration;

use tokio::time::Instant;

/// How long a claim lives without a renewal. Short, so a holder that died
/// before sending its create frees the key within a few seconds.
pub(crate) const TERM: Duration = Duration::from_secs(4);
/// How often the holder renews: three renewals fit in one term, so one
/// slow or failed renewal (a store call is bounded to 2 s) never lets the
/// lease lapse while its holder lives.
pub(crate) const RENEW_EVERY: Duration = Duration::from_secs(1);
/// How soon a failed renewal is tried again.
const RETRY_AFTER: Duration = Duration::from_millis(200);

/// What the holder does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Next {
    /// Renew at this instant.
    RenewAt(Instant),
    /// The lease has lapsed: other replicas may consider the holder gone.
    Lapsed,
}

/// The holder's view of its lease: when it surely ends and when to renew.
#[derive(Debug, Clone)]
pub(crate) struct Lease {
    term: Duration,
    renew_every: Duration,
    /// When the lease surely ends if no renewal lands: measured from when
    /// the last successful request was sent, never from its reply.
    expires: Instant,
    /// When the next renewal is due.
    due: Instant,
}

impl Lease {
    /// The lease of a claim sent at `sent`.
    pub(crate) fn new(sent: Instant) -> Self {
        Self {
            term: TERM,
            renew_every: RENEW_EVERY,
            expires: sent + TERM,
            due: sent + RENEW_EVERY,
        }
    }

    /// The term a backend keeps a claim alive for after each renewal.
    pub(crate) fn term(&self) -> Duration {
        self.term
    }

    /// When the next renewal is due.
    pub(crate) fn due(&self) -> Instant {
        self.due
    }

    /// A renewal sent at `sent` was stored.
    pub(crate) fn renewed(&mut self, sent: Instant) {
        self.expires = self.expires.max(sent + self.term);
        self.due = sent + self.renew_every;
    }

    /// A renewal failed (the store did not answer) at `now`: try again soon
    /// while the lease may still hold, else it has lapsed.
    pub(crate) fn failed(&mut self, now: Instant) -> Next {
        let retry = now + RETRY_AFTER;
        if retry < self.expires {
            self.due = retry;
            Next::RenewAt(retry)
        } else {
            Next::Lapsed
        }
    }

    /// Whether the lease surely still holds at `now`.
    #[cfg(test)]
    fn holds(&self, now: Instant) -> bool {
        now < self.expires
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store that answers or not, as scripted: the outcome of each
    /// renewal attempt in turn.
    trait Store {
        fn renew(&mut self) -> bool;
    }

    struct Scripted(std::collections::VecDeque<bool>);

    impl Store for Scripted {
        fn renew(&mut self) -> bool {
            self.0.pop_front().unwrap_or(true)
        }
    }

    /// Drives a lease the way the holder's task does, on paused time, until
    /// `until`; returns when renewals were sent (from the start) and whether
    /// the lease lapsed.
    async fn drive(store: &mut dyn Store, until: Instant) -> (Vec<Duration>, bool) {
        let start = Instant::now();
        let mut lease = Lease::new(start);
        let mut sent = Vec::new();
        while lease.due() < until {
            tokio::time::sleep_until(lease.due()).await;
            let now = Instant::now();
            sent.push(now - start);
            if store.renew() {
                lease.renewed(now);
            } else if lease.failed(now) == Next::Lapsed {
                return (sent, true);
            }
            assert!(lease.holds(Instant::now()), "renewed before it lapsed");
        }
        (sent, false)
    }

    #[tokio::test(start_paused = true)]
    async fn a_live_holder_renews_every_second_well_before_the_term() {
        let start = Instant::now();
        let mut store = Scripted(Default::default());
        let (sent, lapsed) = drive(&mut store, start + Duration::from_secs(10)).await;
        assert!(!lapsed);
        let secs: Vec<u64> = sent.iter().map(Duration::as_secs).collect();
        assert_eq!(secs, (1..10).collect::<Vec<_>>());
        assert!(RENEW_EVERY * 3 < TERM, "three renewals fit in one term");
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_renewal_is_retried_soon_and_a_silent_store_lets_it_lapse() {
        let start = Instant::now();
        // One failure, then success: the lease holds throughout.
        let mut store = Scripted([false, true].into());
        let (sent, lapsed) = drive(&mut store, start + Duration::from_secs(4)).await;
        assert!(!lapsed);
        assert_eq!(sent[0], Duration::from_secs(1));
        assert_eq!(sent[1], Duration::from_millis(1200));

        // A store that never answers: the holder learns the lease lapsed,
        // never after its term and not long before.
        let mut silent = Scripted(std::iter::repeat_n(false, 100).collect());
        let (sent, lapsed) = drive(&mut silent, start + Duration::from_secs(60)).await;
        assert!(lapsed);
        let last = *sent.last().expect("tried");
        assert!(
            last < TERM && last + RETRY_AFTER >= TERM,
            "lapsed at {last:?}"
        );

        // A late success counts from when it was sent, not from its reply.
        let mut lease = Lease::new(start);
        lease.renewed(start + Duration::from_secs(1));
        assert!(lease.holds(start + TERM));
        assert!(!lease.holds(start + TERM + Duration::from_secs(1)));
    }
}
