//! The hub on paused time against a scripted `StatusSource`: exact call
//! counts and timings for rounds, newcomers, finished jobs, 429s, late
//! replies, outages, coalesced checks, queued checks' deadlines and a call
//! task that panics.

pub(crate) mod fake;
mod schedule;
mod trouble;

use std::time::Duration;

use tokio::time::{Instant, advance, sleep};

use super::*;
use crate::{job::JobState, upstream::UpstreamError};
use fake::*;

#[tokio::test(start_paused = true)]
async fn watched_jobs_are_polled_once_per_interval_in_full_batches() {
    let fake = Fake::with_jobs(120);
    let hub = hub(&fake);
    let start = Instant::now();
    let subs: Vec<Subscription> = (0..120).map(|i| hub.subscribe(&token(), &id(i))).collect();
    sleep(INTERVAL * 5 + Duration::from_millis(100)).await;
    let calls = fake.calls();
    // The newcomers' first calls all go out after the gather window.
    let first: Vec<_> = calls
        .iter()
        .filter(|(at, _)| *at < start + INTERVAL)
        .collect();
    assert_eq!(first.len(), 3, "ceil(120 / 50) calls for the newcomers");
    assert!(first.iter().all(|(at, _)| *at == start + GATHER));
    // Then every interval: three calls, every job exactly once.
    for round in 1..5 {
        let from = start + GATHER + INTERVAL * round;
        let ids = fake.calls_between(from, from + INTERVAL);
        assert_eq!(ids.len(), 3, "round {round}: {} calls", ids.len());
        let mut all: Vec<String> = ids.into_iter().flatten().collect();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 120, "round {round} asks each job once");
    }
    drop(subs);
}

#[tokio::test(start_paused = true)]
async fn newcomers_within_the_gather_window_share_one_call() {
    let fake = Fake::with_jobs(10);
    let hub = hub(&fake);
    let mut subs = Vec::new();
    for i in 0..10 {
        subs.push(hub.subscribe(&token(), &id(i)));
        advance(Duration::from_millis(4)).await;
    }
    sleep(INTERVAL / 2).await;
    let calls = fake.calls();
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(calls[0].1.len(), 10);
    for sub in &mut subs {
        assert!(matches!(&*sub.rx.borrow(), Snapshot::Status(s) if s.state == JobState::Pending));
    }
}

#[tokio::test(start_paused = true)]
async fn finished_jobs_leave_and_an_idle_token_makes_no_calls() {
    let fake = Fake::with_jobs(2);
    let hub = hub(&fake);
    let mut a = hub.subscribe(&token(), &id(0));
    let b = hub.subscribe(&token(), &id(1));
    assert!(matches!(next_state(&mut a).await, Snapshot::Status(_)));
    fake.set(&id(0), JobState::Succeeded);
    let done = next_state(&mut a).await;
    assert!(matches!(done, Snapshot::Status(s) if s.state == JobState::Succeeded));
    let before = fake.calls().len();
    sleep(INTERVAL * 3 + Duration::from_millis(100)).await;
    let later: Vec<_> = fake.calls()[before..].to_vec();
    assert_eq!(later.len(), 3, "one call per interval for the job left");
    assert!(later.iter().all(|(_, ids)| ids == &vec![id(1)]));
    // The last watcher leaves: nothing more is asked.
    drop(b);
    sleep(INTERVAL).await;
    let quiet = fake.calls().len();
    sleep(INTERVAL * 5).await;
    assert_eq!(fake.calls().len(), quiet, "an idle token makes no calls");
}

#[tokio::test(start_paused = true)]
async fn a_429_with_retry_after_pauses_the_token_for_that_long() {
    let fake = Fake::with_jobs(1);
    let hub = hub(&fake);
    let start = Instant::now();
    fake.script(Scripted::Fail(UpstreamError::RateLimited {
        retry_after: Some(Duration::from_secs(5)),
    }));
    let mut sub = hub.subscribe(&token(), &id(0));
    assert!(matches!(next_state(&mut sub).await, Snapshot::Status(_)));
    let calls = fake.calls();
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[0].0, start + GATHER);
    assert_eq!(calls[1].0, start + GATHER + Duration::from_secs(5));
    // Another 429 at the next poll: a check during that pause is answered
    // at once with the cause and the time left, not held.
    fake.script(Scripted::Fail(UpstreamError::RateLimited {
        retry_after: Some(Duration::from_secs(5)),
    }));
    sleep(INTERVAL + Duration::from_millis(10)).await;
    assert_eq!(fake.calls().len(), 3);
    let answer = tokio::time::timeout(Duration::from_millis(1), hub.check(&token(), "x", None))
        .await
        .expect("answered at once");
    match answer {
        Err(HubError::Upstream(UpstreamError::RateLimited {
            retry_after: Some(left),
        })) => assert!(left <= Duration::from_secs(5) && left > Duration::from_secs(4)),
        other => panic!("expected the pause's cause, got {other:?}"),
    }
    assert_eq!(fake.calls().len(), 3, "nothing sent during the pause");
}

#[tokio::test(start_paused = true)]
async fn a_huge_retry_after_is_capped_by_the_failure_budget() {
    let fake = Fake::with_jobs(1);
    let hub = hub(&fake);
    let start = Instant::now();
    fake.script(Scripted::Fail(UpstreamError::RateLimited {
        retry_after: Some(Duration::from_secs(86_400)),
    }));
    let mut sub = hub.subscribe(&token(), &id(0));
    assert!(matches!(next_state(&mut sub).await, Snapshot::Status(_)));
    let calls = fake.calls();
    assert_eq!(calls[1].0, start + GATHER + config().failure_budget);
}

#[tokio::test(start_paused = true)]
async fn an_outage_past_the_budget_ends_watches_after_few_calls() {
    let fake = Fake::with_jobs(3);
    let hub = hub(&fake);
    for _ in 0..1000 {
        fake.script(Scripted::Fail(UpstreamError::Http {
            status: 503,
            body: String::new(),
        }));
    }
    let start = Instant::now();
    let mut subs: Vec<_> = (0..3).map(|i| hub.subscribe(&token(), &id(i))).collect();
    for sub in &mut subs {
        match next_state(sub).await {
            Snapshot::Ended(HubError::Outage { budget, .. }) => {
                assert_eq!(budget, config().failure_budget);
            }
            other => panic!("expected an outage, got {other:?}"),
        }
    }
    let elapsed = start.elapsed();
    assert!(elapsed >= config().failure_budget, "{elapsed:?}");
    // The last pause (at most 10 s, doubled by jitter) may straddle the end.
    assert!(elapsed < config().failure_budget + Duration::from_secs(21));
    // 250 ms doubling to 10 s over a 20 s budget: a handful of rounds,
    // each asked twice (once more within the round after a 503).
    let n = fake.calls().len();
    assert!((8..=20).contains(&n), "{n} calls during the outage");
}

#[tokio::test(start_paused = true)]
async fn one_unreadable_entry_ends_only_its_own_watch() {
    let fake = Fake::with_jobs(3);
    let hub = hub(&fake);
    fake.script(Scripted::Garble(id(1)));
    let mut subs: Vec<_> = (0..3).map(|i| hub.subscribe(&token(), &id(i))).collect();
    let outcomes = [
        next_state(&mut subs[0]).await,
        next_state(&mut subs[1]).await,
        next_state(&mut subs[2]).await,
    ];
    assert!(matches!(&outcomes[0], Snapshot::Status(_)));
    assert!(matches!(
        &outcomes[1],
        Snapshot::Ended(HubError::Upstream(UpstreamError::Decode { .. }))
    ));
    assert!(matches!(&outcomes[2], Snapshot::Status(_)));
    sleep(INTERVAL * 2).await;
    let last = fake.calls().pop().expect("calls").1;
    assert_eq!(last, vec![id(0), id(2)]);
}

#[tokio::test(start_paused = true)]
async fn a_lone_check_is_sent_at_once() {
    let fake = Fake::with_jobs(1);
    fake.latency(Duration::from_millis(20));
    let hub = hub(&fake);
    let start = Instant::now();
    let answer = hub.check(&token(), &id(0), None).await.expect("check");
    assert_eq!(answer.mark_id, id(0));
    assert_eq!(fake.calls()[0].0, start, "no gather delay for a check");
    assert_eq!(start.elapsed(), Duration::from_millis(20));
}

#[tokio::test(start_paused = true)]
async fn concurrent_checks_are_coalesced_and_each_gets_its_own_job() {
    let fake = Fake::with_jobs(120);
    fake.latency(Duration::from_millis(20));
    let hub = hub(&fake);
    let mut tasks = tokio::task::JoinSet::new();
    // 150 callers in flight, 3,000 checks over 120 jobs.
    for caller in 0..150 {
        let hub = hub.clone();
        tasks.spawn(async move {
            for n in 0..20 {
                let job = id((caller * 7 + n * 13) % 120);
                let answer = hub.check(&token(), &job, None).await.expect("check");
                assert_eq!(answer.mark_id, job);
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("caller");
    }
    let calls = fake.calls();
    let per_check = calls.len() as f64 / 3000.0;
    assert!(per_check <= 0.2, "{} calls for 3000 checks", calls.len());
    for (_, ids) in &calls {
        let mut unique = ids.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), ids.len(), "an id asked twice in one call");
        assert!(ids.len() <= 50);
    }
}

#[tokio::test(start_paused = true)]
async fn a_check_is_never_answered_by_a_call_sent_before_it() {
    let fake = Fake::with_jobs(1);
    fake.latency(Duration::from_millis(100));
    let hub = hub(&fake);
    let first = tokio::spawn({
        let hub = hub.clone();
        async move { hub.check(&token(), &id(0), None).await }
    });
    sleep(Duration::from_millis(10)).await;
    // The job moves on while the first call is in flight.
    fake.set(&id(0), JobState::Running);
    let second = hub.check(&token(), &id(0), None).await.expect("second");
    let first = first.await.expect("join").expect("first");
    assert_eq!(first.state, JobState::Pending);
    assert_eq!(second.state, JobState::Running, "answered by a later call");
    assert_eq!(fake.calls().len(), 2);
}

#[tokio::test(start_paused = true)]
async fn answers_younger_than_an_interval_serve_checks_without_a_call() {
    let fake = Fake::with_jobs(1);
    let hub = hub(&fake);
    hub.check(&token(), &id(0), None).await.expect("first");
    sleep(INTERVAL / 2).await;
    hub.check(&token(), &id(0), None).await.expect("fresh");
    assert_eq!(fake.calls().len(), 1);
    sleep(INTERVAL).await;
    hub.check(&token(), &id(0), None)
        .await
        .expect("stale: asked again");
    assert_eq!(fake.calls().len(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_queued_check_honours_its_deadline_and_is_not_sent_once_gone() {
    let fake = Fake::with_jobs(6);
    fake.latency(Duration::from_secs(1));
    let hub = hub(&fake);
    // Four checks, arriving one after another, fill the token's check
    // calls (checks arriving together would share one call).
    let mut busy = tokio::task::JoinSet::new();
    for i in 0..4 {
        let hub = hub.clone();
        busy.spawn(async move { hub.check(&token(), &id(i), None).await });
        sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(fake.calls().len(), 4);
    let start = Instant::now();
    let late = hub
        .check(&token(), &id(4), Some(start + Duration::from_millis(100)))
        .await;
    assert_eq!(late, Err(HubError::DeadlineExceeded));
    assert_eq!(start.elapsed(), Duration::from_millis(100));
    while busy.join_next().await.is_some() {}
    sleep(INTERVAL).await;
    let asked: Vec<String> = fake.calls().into_iter().flat_map(|(_, ids)| ids).collect();
    assert!(
        !asked.contains(&id(4)),
        "a caller that left is not asked for"
    );
}

#[tokio::test(start_paused = true)]
async fn watched_and_checked_jobs_share_calls() {
    let fake = Fake::with_jobs(6);
    let hub = hub(&fake);
    let mut sub = hub.subscribe(&token(), &id(0));
    assert!(matches!(next_state(&mut sub).await, Snapshot::Status(_)));
    // Four slow checks fill the token's check calls; the next check waits
    // and rides with the watched job's next poll.
    fake.latency(Duration::from_secs(3));
    let mut busy = tokio::task::JoinSet::new();
    for i in 2..6 {
        let hub = hub.clone();
        busy.spawn(async move { hub.check(&token(), &id(i), None).await });
        sleep(Duration::from_millis(1)).await;
    }
    let before = fake.calls().len();
    hub.check(&token(), &id(1), None).await.expect("check");
    // The first call after the check carries it and the watched job.
    let shared: Vec<_> = fake.calls()[before..].to_vec();
    assert_eq!(shared[0].1, vec![id(1), id(0)], "{shared:?}");
    drop(sub);
    while busy.join_next().await.is_some() {}
}

#[tokio::test(start_paused = true)]
async fn a_call_task_that_panics_ends_its_watches_and_checks_and_the_token_goes_on() {
    let fake = Fake::with_jobs(3);
    let hub = hub(&fake);
    fake.script(Scripted::Panic);
    let mut doomed = hub.subscribe(&token(), &id(0));
    // The check goes at once and the newcomer rides along: one call, which
    // panics.
    let check = tokio::time::timeout(INTERVAL, hub.check(&token(), &id(1), None))
        .await
        .expect("the check is answered, not left waiting");
    assert!(matches!(check, Err(HubError::Internal)), "{check:?}");
    let ended = tokio::time::timeout(INTERVAL, next_state(&mut doomed))
        .await
        .expect("the watch ends instead of waiting for ever");
    assert!(
        matches!(&ended, Snapshot::Ended(HubError::Internal)),
        "{ended:?}"
    );
    assert_eq!(fake.calls().len(), 1);
    // The token goes on: a new watch is polled and follows its job.
    let mut sub = hub.subscribe(&token(), &id(2));
    assert!(matches!(next_state(&mut sub).await, Snapshot::Status(_)));
    fake.set(&id(2), JobState::Succeeded);
    let done = tokio::time::timeout(INTERVAL * 2, next_state(&mut sub))
        .await
        .expect("still polled after the panic");
    assert!(matches!(done, Snapshot::Status(s) if s.state == JobState::Succeeded));
}
