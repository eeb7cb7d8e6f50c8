//! Piclumen's faults absorbed by the hub, on paused time against the
//! scripted fake: states stamped with when they were observed, checks
//! answered with a recent state during trouble (stale-if-error), a failed
//! status call asked again within its round,
//! and a poller that panics ending its token's watches and checks INTERNAL
//! and leaving the token to start afresh.

use std::time::Duration;

use tokio::time::{Instant, sleep};

use super::fake::*;
use crate::{
    hub::{Hub, HubConfig, HubError, Snapshot},
    job::JobState,
    upstream::UpstreamError,
};

fn busy() -> UpstreamError {
    UpstreamError::Http {
        status: 503,
        body: "busy".into(),
    }
}

fn rate_limited(secs: u64) -> UpstreamError {
    UpstreamError::RateLimited {
        retry_after: Some(Duration::from_secs(secs)),
    }
}

/// A hub whose pauses may outlast the stale-if-error window.
fn hub_with(fake: &Fake, stale_if_error: Duration) -> Hub {
    let config = HubConfig {
        failure_budget: Duration::from_secs(120),
        stale_if_error,
        ..config()
    };
    Hub::new(config, std::sync::Arc::new(fake.clone()))
}

#[tokio::test(start_paused = true)]
async fn a_watch_sees_when_its_state_was_last_confirmed_without_a_wake_up_per_round() {
    let fake = Fake::with_jobs(1);
    let hub = hub(&fake);
    let mut sub = hub.subscribe(&token(), &id(0));
    let Snapshot::Status(first) = next_state(&mut sub).await else {
        panic!("a state first");
    };
    let first_seen = first.observed_at.expect("stamped");
    // Real time moves for the wall clock: the next round's stamp is later.
    std::thread::sleep(Duration::from_millis(5));
    sleep(INTERVAL + Duration::from_millis(10)).await;
    assert_eq!(fake.calls().len(), 2);
    assert!(
        !sub.rx.has_changed().expect("open"),
        "unchanged: no wake-up"
    );
    let Snapshot::Status(now) = sub.rx.borrow().clone() else {
        panic!("still a state");
    };
    assert_eq!(now, first);
    assert!(now.observed_at.expect("stamped") > first_seen, "refreshed");
}

#[tokio::test(start_paused = true)]
async fn during_a_pause_checks_get_a_recent_state_and_terminal_ones_whatever_their_age() {
    let fake = Fake::with_jobs(3);
    fake.set(&id(0), JobState::Running);
    fake.set(&id(2), JobState::Succeeded);
    let hub = hub_with(&fake, Duration::from_secs(30));
    let running = hub.check(&token(), &id(0), None).await.expect("running");
    let done = hub.check(&token(), &id(2), None).await.expect("done");
    let seen = running.observed_at.expect("stamped by the hub");
    assert!(done.observed_at.is_some());
    // A 429 on the check of a job never observed: it fails as before, and
    // the token pauses for 100 s.
    fake.script(Scripted::Fail(rate_limited(100)));
    let never = hub.check(&token(), &id(1), None).await;
    assert!(matches!(
        never,
        Err(HubError::Upstream(UpstreamError::RateLimited { .. }))
    ));
    // Older than an interval, within the window: the last state, with the
    // instant it was observed.
    sleep(Duration::from_secs(5)).await;
    let answer = hub
        .check(&token(), &id(0), None)
        .await
        .expect("stale state");
    assert_eq!(answer, running);
    assert_eq!(answer.observed_at, Some(seen));
    let never = hub.check(&token(), &id(1), None).await;
    assert!(never.is_err(), "never observed: fails as before, {never:?}");
    // Older than the window: fails as before; a terminal state does not.
    sleep(Duration::from_secs(26)).await;
    let old = hub.check(&token(), &id(0), None).await;
    assert!(
        matches!(
            old,
            Err(HubError::Upstream(UpstreamError::RateLimited { .. }))
        ),
        "{old:?}"
    );
    assert_eq!(hub.check(&token(), &id(2), None).await, Ok(done));
    assert_eq!(fake.calls().len(), 3, "nothing sent during the pause");
}

#[tokio::test(start_paused = true)]
async fn a_zero_window_answers_checks_during_a_pause_with_the_trouble() {
    let fake = Fake::with_jobs(2);
    fake.set(&id(1), JobState::Succeeded);
    let hub = hub_with(&fake, Duration::ZERO);
    hub.check(&token(), &id(0), None).await.expect("first");
    hub.check(&token(), &id(1), None).await.expect("first");
    fake.script(Scripted::Fail(rate_limited(100)));
    assert!(hub.check(&token(), "other", None).await.is_err());
    sleep(Duration::from_secs(3)).await;
    for job in [id(0), id(1)] {
        let answer = hub.check(&token(), &job, None).await;
        assert!(
            matches!(
                answer,
                Err(HubError::Upstream(UpstreamError::RateLimited { .. }))
            ),
            "{answer:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_check_carried_by_a_failed_round_gets_its_jobs_last_state() {
    let fake = Fake::with_jobs(2);
    let hub = hub_with(&fake, Duration::from_secs(30));
    let first = hub.check(&token(), &id(0), None).await.expect("first");
    sleep(INTERVAL + Duration::from_millis(500)).await;
    // Both attempts of the round fail: the round fails.
    fake.script(Scripted::Fail(busy()));
    fake.script(Scripted::Fail(busy()));
    assert_eq!(hub.check(&token(), &id(0), None).await, Ok(first));
    assert_eq!(fake.calls().len(), 3, "one call, then the round's two");
}

#[tokio::test(start_paused = true)]
async fn one_503_is_asked_again_within_the_round_and_reaches_no_one() {
    let fake = Fake::with_jobs(2);
    let hub = hub(&fake);
    let start = Instant::now();
    fake.script(Scripted::Fail(busy()));
    let mut sub = hub.subscribe(&token(), &id(0));
    // The check goes at once, the newcomer rides along: one round.
    let check = hub.check(&token(), &id(1), None).await;
    assert_eq!(check.map(|s| s.state), Ok(JobState::Pending));
    let first = next_state(&mut sub).await;
    assert!(matches!(first, Snapshot::Status(_)), "{first:?}");
    let calls = fake.calls();
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert_eq!(calls[0].1, calls[1].1, "the same ids asked again");
    let wait = calls[1].0 - calls[0].0;
    assert!(
        (Duration::from_millis(100)..=Duration::from_millis(300)).contains(&wait),
        "{wait:?}"
    );
    // No pause: the next round is one interval after the first was sent.
    sleep(INTERVAL).await;
    assert_eq!(fake.calls()[2].0, start + INTERVAL);
    assert!(matches!(&*sub.rx.borrow(), Snapshot::Status(_)));
}

#[tokio::test(start_paused = true)]
async fn two_503s_in_a_row_fail_the_round() {
    let fake = Fake::with_jobs(1);
    let hub = hub(&fake);
    fake.script(Scripted::Fail(busy()));
    fake.script(Scripted::Fail(busy()));
    let check = hub.check(&token(), &id(0), None).await;
    assert_eq!(check, Err(HubError::Upstream(busy())));
    assert_eq!(fake.calls().len(), 2);
    // The token is paused: a check meanwhile gets the cause at once.
    let during = tokio::time::timeout(Duration::from_millis(1), hub.check(&token(), "x", None))
        .await
        .expect("answered at once");
    assert_eq!(during, Err(HubError::Upstream(busy())));
    assert_eq!(fake.calls().len(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_429_is_not_asked_again_within_the_round() {
    let fake = Fake::with_jobs(1);
    let hub = hub(&fake);
    fake.script(Scripted::Fail(rate_limited(5)));
    assert!(hub.check(&token(), &id(0), None).await.is_err());
    sleep(Duration::from_secs(1)).await;
    assert_eq!(fake.calls().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_poller_that_panics_ends_its_token_internal_and_the_token_starts_afresh() {
    let fake = Fake::with_jobs(3);
    fake.latency(Duration::from_millis(100));
    let hub = hub(&fake);
    let mut watch = hub.subscribe(&token(), &id(0));
    let check = tokio::spawn({
        let hub = hub.clone();
        async move { hub.check(&token(), &id(1), None).await }
    });
    hub.panic_next_round();
    let check = tokio::time::timeout(INTERVAL, check)
        .await
        .expect("the check is answered, not left waiting")
        .expect("join");
    assert_eq!(check, Err(HubError::Internal));
    let ended = tokio::time::timeout(INTERVAL, next_state(&mut watch))
        .await
        .expect("the watch ends instead of waiting for ever");
    assert_eq!(ended, Snapshot::Ended(HubError::Internal));
    assert!(
        !hub.inner
            .tokens
            .lock()
            .expect("tokens")
            .contains_key(&token())
    );
    // The token's next calls start a new poller.
    let again = hub.check(&token(), &id(2), None).await;
    assert_eq!(again.map(|s| s.mark_id), Ok(id(2)));
    let mut sub = hub.subscribe(&token(), &id(0));
    assert!(matches!(next_state(&mut sub).await, Snapshot::Status(_)));
}

#[tokio::test(start_paused = true)]
async fn a_job_created_here_and_never_polled_answers_pending_during_trouble() {
    let fake = Fake::with_jobs(3);
    let hub = hub_with(&fake, Duration::from_secs(30));
    hub.created(&token(), &id(1));
    // Its first status call fails (a 429 pausing the token), and so does
    // a check during the pause: the create's reply answers, as queued.
    fake.script(Scripted::Fail(rate_limited(100)));
    let first = hub.check(&token(), &id(1), None).await.expect("created");
    assert_eq!(first.state, JobState::Pending);
    assert!(first.observed_at.is_some(), "as of the create's reply");
    sleep(Duration::from_secs(5)).await;
    let paused = hub.check(&token(), &id(1), None).await.expect("created");
    assert_eq!(paused, first);
    // A job not created here has nothing to fall back on.
    assert!(hub.check(&token(), &id(2), None).await.is_err());
    // Past the window the create's reply no longer stands for the job.
    sleep(Duration::from_secs(26)).await;
    assert!(hub.check(&token(), &id(1), None).await.is_err());
    assert_eq!(fake.calls().len(), 1, "nothing sent during the pause");
}

#[tokio::test(start_paused = true)]
async fn without_trouble_a_created_job_is_asked_not_answered_from_its_create() {
    let fake = Fake::with_jobs(1);
    fake.set(&id(0), JobState::Running);
    let hub = hub_with(&fake, Duration::from_secs(30));
    hub.created(&token(), &id(0));
    let answer = hub.check(&token(), &id(0), None).await.expect("asked");
    assert_eq!(answer.state, JobState::Running);
    assert_eq!(fake.calls().len(), 1);
}
