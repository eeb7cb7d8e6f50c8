//! Jobs this replica created, remembered for stale-if-error (and the one
//! place every stale-if-error answer passes, so it counts them): a create's
//! reply is Piclumen confirming the job exists and is queued, so while the
//! token's status calls are in trouble a check of a job no status call has
//! seen yet answers PENDING as of that reply, rather than the trouble. It
//! never answers a check on its own: a job with no trouble is asked.
//!
//! Kept for `--stale-if-error` after the reply, in creation order, and at
//! most `MAX_CREATED` of them (the oldest go first), so a burst of creates
//! cannot grow it without bound.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use tokio::time::Instant;

use super::stale::StaleIfError;
use crate::{
    job::{JobState, JobStatus, Token},
    support::lock,
};

/// Most created jobs remembered at once: 30 s of creates at over 3,000 a
/// second, a few MiB.
const MAX_CREATED: usize = 100_000;

/// The created jobs of every token, with when each create's reply came.
#[derive(Debug)]
pub(super) struct Created {
    /// How long a create's reply stands for the job's state; zero: off.
    window: Duration,
    jobs: Mutex<Jobs>,
}

#[derive(Debug, Default)]
struct Jobs {
    by_token: HashMap<Token, HashMap<Arc<str>, Reply>>,
    /// Creation order, for expiry.
    order: VecDeque<(Instant, Token, Arc<str>)>,
}

/// When a create's reply arrived, on both clocks.
#[derive(Debug, Clone, Copy)]
struct Reply {
    at: Instant,
    wall: SystemTime,
}

impl Created {
    /// Remembers creates for `window` (zero: none).
    pub(super) fn new(window: Duration) -> Self {
        Self {
            window,
            jobs: Mutex::default(),
        }
    }

    /// Notes that `token` created `mark_id`, its reply arriving `now`.
    pub(super) fn record(&self, token: &Token, mark_id: &str, now: Instant) {
        if self.window.is_zero() {
            return;
        }
        let reply = Reply {
            at: now,
            wall: SystemTime::now(),
        };
        let id: Arc<str> = mark_id.into();
        let mut jobs = lock(&self.jobs);
        jobs.expire(now, self.window);
        if jobs.order.len() >= MAX_CREATED {
            jobs.pop_oldest();
        }
        jobs.by_token
            .entry(token.clone())
            .or_default()
            .insert(Arc::clone(&id), reply);
        jobs.order.push_back((now, token.clone(), id));
    }

    /// The state a check gets during trouble: the job's remembered state
    /// (`known`) as `rules` say, else, for a job created here within the
    /// window, PENDING as of its create's reply.
    pub(super) fn stale_answer(
        &self,
        rules: &StaleIfError,
        known: Option<&(JobStatus, Instant)>,
        token: &Token,
        mark_id: &str,
        now: Instant,
    ) -> Option<JobStatus> {
        let answer = if known.is_some() {
            rules.answer(known, now)
        } else {
            let reply = *lock(&self.jobs).by_token.get(token)?.get(mark_id)?;
            let created = (queued(mark_id, reply.wall), reply.at);
            rules.answer(Some(&created), now)
        };
        if answer.is_some() {
            stale_answers().increment(1);
        }
        answer
    }
}

impl Jobs {
    /// Forgets creates older than `window`.
    fn expire(&mut self, now: Instant, window: Duration) {
        while self
            .order
            .front()
            .is_some_and(|(at, _, _)| now.saturating_duration_since(*at) > window)
        {
            self.pop_oldest();
        }
    }

    fn pop_oldest(&mut self) {
        let Some((at, token, id)) = self.order.pop_front() else {
            return;
        };
        if let Some(ids) = self.by_token.get_mut(&token) {
            // A newer create of the same id (a simulator reusing ids) stays.
            if ids.get(&id).is_some_and(|reply| reply.at == at) {
                ids.remove(&id);
            }
            if ids.is_empty() {
                self.by_token.remove(&token);
            }
        }
    }
}

/// Checks answered with a stale-if-error state instead of the trouble;
/// resolved once (a registry lookup per answer would cost more).
fn stale_answers() -> &'static metrics::Counter {
    static C: std::sync::OnceLock<metrics::Counter> = std::sync::OnceLock::new();
    C.get_or_init(|| metrics::counter!("piclumen_checks_stale_total"))
}

/// A just-created job as the create's reply shows it: queued, nothing else
/// known yet.
fn queued(mark_id: &str, observed_at: SystemTime) -> JobStatus {
    JobStatus {
        mark_id: mark_id.to_owned(),
        state: JobState::Pending,
        queue_position: 0,
        images: Vec::new(),
        upstream_status: "pending".to_owned(),
        prompt_id: String::new(),
        observed_at: Some(observed_at),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn rules() -> StaleIfError {
        StaleIfError {
            window: 30 * S,
            interval: 2 * S,
            budget: 60 * S,
        }
    }

    fn token(name: &str) -> Token {
        Token::new(name).expect("a test token")
    }

    #[test]
    fn a_created_job_answers_pending_within_the_window_and_not_after() {
        let now = Instant::now();
        let created = Created::new(30 * S);
        created.record(&token("t"), "a", now);
        let answer = created.stale_answer(&rules(), None, &token("t"), "a", now + 30 * S);
        let answer = answer.expect("within the window");
        assert_eq!(
            (answer.mark_id.as_str(), answer.state),
            ("a", JobState::Pending)
        );
        assert!(answer.observed_at.is_some());
        let late = created.stale_answer(&rules(), None, &token("t"), "a", now + 31 * S);
        assert_eq!(late, None);
    }

    #[test]
    fn another_token_or_id_gets_nothing() {
        let now = Instant::now();
        let created = Created::new(30 * S);
        created.record(&token("t"), "a", now);
        assert_eq!(
            created.stale_answer(&rules(), None, &token("u"), "a", now),
            None
        );
        assert_eq!(
            created.stale_answer(&rules(), None, &token("t"), "b", now),
            None
        );
    }

    #[test]
    fn a_state_seen_by_a_status_call_comes_first() {
        let now = Instant::now();
        let created = Created::new(30 * S);
        created.record(&token("t"), "a", now);
        let mut running = queued("a", SystemTime::now());
        running.state = JobState::Running;
        let known = (running.clone(), now);
        let answer = created.stale_answer(&rules(), Some(&known), &token("t"), "a", now);
        assert_eq!(answer.map(|s| s.state), Some(JobState::Running));
        // An old known state is not replaced by the create's reply.
        let answer = created.stale_answer(&rules(), Some(&known), &token("t"), "a", now + 31 * S);
        assert_eq!(answer, None);
    }

    #[test]
    fn a_zero_window_remembers_nothing() {
        let now = Instant::now();
        let created = Created::new(Duration::ZERO);
        created.record(&token("t"), "a", now);
        assert!(lock(&created.jobs).order.is_empty());
    }

    #[test]
    fn expired_and_excess_creates_are_forgotten() {
        let now = Instant::now();
        let created = Created::new(30 * S);
        created.record(&token("t"), "a", now);
        created.record(&token("t"), "b", now + 31 * S);
        {
            let jobs = lock(&created.jobs);
            assert_eq!(jobs.order.len(), 1, "a expired when b came");
            assert!(!jobs.by_token[&token("t")].contains_key("a"));
        }
        for i in 0..MAX_CREATED {
            created.record(&token("t"), &format!("n{i}"), now + 32 * S);
        }
        let jobs = lock(&created.jobs);
        assert_eq!(jobs.order.len(), MAX_CREATED);
        assert!(
            !jobs.by_token[&token("t")].contains_key("b"),
            "the oldest went"
        );
    }
}
