//! Stale-if-error, as plain values: which remembered state answers a
//! CheckImage while its token's calls are in transient trouble (a round
//! failed, or the token is paused after a 429 or a 5xx), and how long
//! answers are kept for it. No lock, task or clock: `now` is passed in, and
//! the poller asks it wherever a check would otherwise get the trouble.
//!
//! The rules:
//! - a state observed within `--stale-if-error` answers the check, with
//!   its own `observed_at` so the caller sees its age;
//! - a terminal state (SUCCEEDED, FAILED) never goes stale: it answers
//!   whatever its age, for as long as it is kept;
//! - a window of 0 turns it all off: checks fail with the trouble, as
//!   they did before;
//! - answers are kept for one poll interval (what serves checks without a
//!   call), or the window when longer; terminal states for the failure
//!   budget too (trouble lasts at most that long before it is an outage).

use std::time::Duration;

use tokio::time::Instant;

use crate::job::JobStatus;

/// The stale-if-error rules of one hub.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct StaleIfError {
    /// How old a state may be and still answer; zero: off.
    pub(super) window: Duration,
    /// The poll interval: answers younger than it serve checks anyway.
    pub(super) interval: Duration,
    /// The failure budget: the longest trouble before an outage.
    pub(super) budget: Duration,
}

impl StaleIfError {
    /// The state a check gets instead of the token's trouble, from the
    /// job's remembered answer (`known`: the state and when it was
    /// observed), if any.
    pub(super) fn answer(
        &self,
        known: Option<&(JobStatus, Instant)>,
        now: Instant,
    ) -> Option<JobStatus> {
        if self.window.is_zero() {
            return None;
        }
        let (status, at) = known?;
        let age = now.saturating_duration_since(*at);
        (age <= self.window || status.state.is_terminal()).then(|| status.clone())
    }

    /// Whether a job's latest state on its watch channel, `age` old, may
    /// answer a check that waited on that channel without asking again: a
    /// terminal state always; another while it is younger than the window
    /// or than two intervals (a watched job is confirmed once an interval,
    /// plus the call's time), whichever is longer. Older means the token's
    /// calls have been failing for a while: the check is then answered as
    /// any other (`answer`, or the trouble).
    pub(super) fn vouches(&self, status: &JobStatus, age: Duration) -> bool {
        status.state.is_terminal() || age <= self.window.max(2 * self.interval)
    }

    /// How often kept answers are swept: often enough that none outstays
    /// its time by more than half of it, seldom enough that an idle token
    /// keeping answers for the window costs few wake-ups.
    pub(super) fn sweep_every(&self) -> Duration {
        self.interval.max(self.window) / 2
    }

    /// Whether an answer `age` old is still worth keeping.
    pub(super) fn keeps(&self, status: &JobStatus, age: Duration) -> bool {
        if age < self.interval {
            return true;
        }
        if self.window.is_zero() {
            return false;
        }
        age <= self.window || (status.state.is_terminal() && age <= self.budget)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{hub::tests::fake::status, job::JobState};

    const S: Duration = Duration::from_secs(1);

    fn rules(window: Duration) -> StaleIfError {
        StaleIfError {
            window,
            interval: 2 * S,
            budget: 60 * S,
        }
    }

    #[test]
    fn a_state_within_the_window_answers_and_an_older_one_does_not() {
        let now = Instant::now();
        let rules = rules(30 * S);
        let pending = (status("a", JobState::Running), now);
        let answer = rules.answer(Some(&pending), now + 30 * S);
        assert_eq!(answer.as_ref(), Some(&pending.0));
        assert_eq!(rules.answer(Some(&pending), now + 31 * S), None);
    }

    #[test]
    fn a_terminal_state_answers_whatever_its_age() {
        let now = Instant::now();
        for state in [JobState::Succeeded, JobState::Failed] {
            let done = (status("a", state), now);
            let late = now + Duration::from_secs(3600);
            assert_eq!(rules(30 * S).answer(Some(&done), late), Some(done.0));
        }
    }

    #[test]
    fn a_zero_window_turns_it_off_even_for_terminal_states() {
        let now = Instant::now();
        let done = (status("a", JobState::Succeeded), now);
        assert_eq!(rules(Duration::ZERO).answer(Some(&done), now), None);
        assert!(!rules(Duration::ZERO).keeps(&done.0, 2 * S));
        assert!(rules(Duration::ZERO).keeps(&done.0, S), "one interval");
    }

    #[test]
    fn a_watched_state_vouches_for_two_intervals_or_the_window() {
        let running = status("a", JobState::Running);
        assert!(rules(30 * S).vouches(&running, 30 * S));
        assert!(!rules(30 * S).vouches(&running, 31 * S));
        // Off, or shorter than two intervals: two intervals.
        assert!(rules(Duration::ZERO).vouches(&running, 4 * S));
        assert!(!rules(Duration::ZERO).vouches(&running, 5 * S));
        let done = status("a", JobState::Failed);
        assert!(rules(Duration::ZERO).vouches(&done, 3600 * S));
    }

    #[test]
    fn a_job_never_observed_has_no_answer() {
        assert_eq!(rules(30 * S).answer(None, Instant::now()), None);
    }

    #[test]
    fn answers_are_kept_for_the_window_and_terminal_ones_for_the_budget() {
        let rules = rules(30 * S);
        let running = status("a", JobState::Running);
        let done = status("a", JobState::Succeeded);
        assert!(rules.keeps(&running, 30 * S) && !rules.keeps(&running, 31 * S));
        assert!(rules.keeps(&done, 60 * S) && !rules.keeps(&done, 61 * S));
        // A window shorter than the interval keeps one interval.
        let short = StaleIfError {
            window: Duration::from_millis(500),
            ..rules
        };
        assert!(short.keeps(&running, S) && !short.keeps(&running, 2 * S));
    }
}
