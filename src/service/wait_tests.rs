//! CheckImage that waits, on paused time against the scripted fake of
//! `tests`: a change ends the wait, the end of `wait` answers the current
//! state, the caller's deadline cuts the wait short, terminal jobs and
//! stale etags answer at once, a draining server ends waits, a waiting
//! check holds a watch slot, and waiting checks ride the token's rounds.

use std::{sync::Arc, time::Duration};

use tokio::time::{Instant, timeout};
use tonic::{Code, Status};

use super::{
    ServiceConfig, WaitFor,
    tests::{POLL, WAIT, bare, harness, next, status, watch_config},
    wait::{Step, Wait},
};
use crate::{
    convert,
    error::Error,
    hub::{HubError, Snapshot},
    job::{JobState, JobStatus},
};

const S: Duration = Duration::from_secs(1);

fn asked(wait: Duration, etag: &str) -> WaitFor {
    WaitFor {
        wait,
        etag: etag.into(),
    }
}

/// A waiting CheckImage of `mark_id` on its own task.
fn spawn_wait(
    core: &Arc<super::Core>,
    mark_id: &'static str,
    request: WaitFor,
    deadline: Option<Instant>,
) -> tokio::task::JoinHandle<Result<JobStatus, Error>> {
    let core = Arc::clone(core);
    tokio::spawn(async move {
        core.check_wait(&bare("t"), mark_id, deadline, &request)
            .await
    })
}

async fn joined<T>(task: tokio::task::JoinHandle<T>) -> T {
    timeout(WAIT, task)
        .await
        .expect("answered in time")
        .expect("task")
}

// === the rules, on plain values ===

#[test]
fn a_wait_needs_an_etag_and_time() {
    let now = Instant::now();
    let max = 60 * S;
    assert_eq!(Wait::start(&asked(30 * S, ""), max, None, now), None);
    assert_eq!(
        Wait::start(&asked(Duration::ZERO, "e"), max, None, now),
        None
    );
    let wait = Wait::start(&asked(30 * S, "e"), max, None, now).expect("waits");
    assert_eq!(wait.until, now + 30 * S);
    // Cut to the server's maximum.
    let long = Wait::start(&asked(3600 * S, "e"), max, None, now).expect("waits");
    assert_eq!(long.until, now + max);
}

#[test]
fn a_wait_ends_before_the_callers_deadline() {
    let now = Instant::now();
    let max = 60 * S;
    // 5 s left: a tenth is kept to answer in.
    let wait = Wait::start(&asked(30 * S, "e"), max, Some(now + 5 * S), now).expect("waits");
    assert_eq!(wait.until, now + Duration::from_millis(4500));
    // 50 s left: at most a second.
    let wait = Wait::start(&asked(55 * S, "e"), max, Some(now + 50 * S), now).expect("waits");
    assert_eq!(wait.until, now + 49 * S);
    // A deadline already past: answer at once.
    assert_eq!(Wait::start(&asked(30 * S, "e"), max, Some(now), now), None);
}

#[test]
fn a_different_etag_a_terminal_state_or_an_error_answer() {
    let now = Instant::now();
    let pending = status("j", JobState::Pending);
    let etag = pending.etag().to_string();
    let wait = Wait::start(&asked(30 * S, &etag), 60 * S, None, now).expect("waits");
    assert_eq!(wait.step(&Snapshot::Waiting), Step::Wait);
    assert_eq!(wait.step(&Snapshot::Status(pending.clone())), Step::Wait);
    let running = status("j", JobState::Running);
    assert_eq!(
        wait.step(&Snapshot::Status(running.clone())),
        Step::Answer(running)
    );
    let gone = HubError::NotFound {
        mark_id: "j".into(),
    };
    assert_eq!(wait.step(&Snapshot::Ended(gone.clone())), Step::Fail(gone));
    // A terminal state answers even when the caller already has it.
    let done = status("j", JobState::Succeeded);
    let wait =
        Wait::start(&asked(30 * S, &done.etag().to_string()), 60 * S, None, now).expect("waits");
    assert_eq!(
        wait.step(&Snapshot::Status(done.clone())),
        Step::Answer(done)
    );
}

#[test]
fn wait_durations_convert_and_bad_ones_are_invalid() {
    let duration = |seconds, nanos| Some(prost_types::Duration { seconds, nanos });
    assert_eq!(convert::check_wait(None), Ok(None));
    assert_eq!(
        convert::check_wait(duration(2, 500_000_000)),
        Ok(Some(Duration::from_millis(2500)))
    );
    for (seconds, nanos) in [(-1, 0), (0, -1), (1, 1_000_000_000), (-5, 500)] {
        let error = convert::check_wait(duration(seconds, nanos)).expect_err("invalid");
        assert!(
            matches!(error, Error::InvalidArgument { field: "wait", .. }),
            "{seconds}s {nanos}ns: {error:?}"
        );
        assert_eq!(Status::from(error).code(), Code::InvalidArgument);
    }
}

// === the core, on paused time ===

/// The job's current etag, from a plain CheckImage.
async fn etag_now(h: &super::tests::Harness, mark_id: &str) -> String {
    let now = h
        .core
        .check(&bare("t"), mark_id, None)
        .await
        .expect("check");
    now.etag().to_string()
}

#[tokio::test(start_paused = true)]
async fn a_change_answers_within_a_round() {
    let h = harness(watch_config());
    h.fake.set("j", JobState::Pending);
    let etag = etag_now(&h, "j").await;
    let started = Instant::now();
    let task = spawn_wait(&h.core, "j", asked(30 * S, &etag), None);
    tokio::time::sleep(S).await;
    h.fake.set("j", JobState::Running);
    let answer = joined(task).await.expect("answer");
    assert_eq!(answer, status("j", JobState::Running));
    assert!(!answer.etag().is(&etag));
    // Seen by the round after the change: within one interval of it.
    assert!(started.elapsed() <= S + POLL, "{:?}", started.elapsed());
}

#[tokio::test(start_paused = true)]
async fn the_end_of_the_wait_answers_the_current_state() {
    let h = harness(watch_config());
    h.fake.set("j", JobState::Pending);
    let etag = etag_now(&h, "j").await;
    let started = Instant::now();
    let answer = joined(spawn_wait(&h.core, "j", asked(10 * S, &etag), None))
        .await
        .expect("an answer, not an error");
    assert_eq!(started.elapsed(), 10 * S);
    assert_eq!(answer, status("j", JobState::Pending));
    assert!(answer.etag().is(&etag), "the same state");
    assert!(answer.observed_at.is_some(), "a state a call confirmed");
}

#[tokio::test(start_paused = true)]
async fn a_callers_deadline_shorter_than_the_wait_ends_it_in_time() {
    let h = harness(watch_config());
    h.fake.set("j", JobState::Pending);
    let etag = etag_now(&h, "j").await;
    let started = Instant::now();
    let deadline = started + 5 * S;
    let answer = joined(spawn_wait(
        &h.core,
        "j",
        asked(30 * S, &etag),
        Some(deadline),
    ))
    .await
    .expect("an answer, not DEADLINE_EXCEEDED");
    assert!(Instant::now() < deadline, "answered before the deadline");
    assert_eq!(started.elapsed(), Duration::from_millis(4500));
    assert!(answer.etag().is(&etag));
}

#[tokio::test(start_paused = true)]
async fn a_terminal_job_answers_at_once() {
    let h = harness(watch_config());
    h.fake.set("j", JobState::Succeeded);
    let etag = etag_now(&h, "j").await;
    let started = Instant::now();
    let answer = joined(spawn_wait(&h.core, "j", asked(30 * S, &etag), None))
        .await
        .expect("answer");
    assert_eq!(started.elapsed(), Duration::ZERO);
    assert_eq!(answer.state, JobState::Succeeded);
}

#[tokio::test(start_paused = true)]
async fn a_stale_etag_answers_with_the_first_state_known() {
    let h = harness(watch_config());
    h.fake.set("j", JobState::Pending);
    let started = Instant::now();
    let answer = joined(spawn_wait(
        &h.core,
        "j",
        asked(30 * S, "0000000000000000"),
        None,
    ))
    .await
    .expect("answer");
    // No state was known: the first poll (after the hub's short gather).
    assert!(started.elapsed() < S, "{:?}", started.elapsed());
    assert_eq!(answer.state, JobState::Pending);
    // Known now: a stale etag answers without any wait.
    let again = Instant::now();
    let answer = joined(spawn_wait(&h.core, "j", asked(30 * S, "stale"), None))
        .await
        .expect("answer");
    assert_eq!(again.elapsed(), Duration::ZERO);
    assert_eq!(answer.state, JobState::Pending);
}

#[tokio::test(start_paused = true)]
async fn without_an_etag_or_a_wait_the_check_answers_at_once() {
    let h = harness(watch_config());
    h.fake.set("j", JobState::Pending);
    let first = h.core.check(&bare("t"), "j", None).await.expect("check");
    let started = Instant::now();
    for request in [asked(30 * S, ""), asked(Duration::ZERO, "x")] {
        let answer = joined(spawn_wait(&h.core, "j", request, None))
            .await
            .expect("answer");
        assert_eq!(answer, first);
    }
    assert_eq!(started.elapsed(), Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn an_unknown_job_fails_the_wait_with_not_found() {
    let h = harness(watch_config());
    let error = joined(spawn_wait(&h.core, "nowhere", asked(30 * S, "e"), None))
        .await
        .expect_err("not found");
    assert_eq!(Status::from(error).code(), Code::NotFound);
}

#[tokio::test(start_paused = true)]
async fn draining_ends_a_wait_with_the_current_state() {
    let h = harness(watch_config());
    h.fake.set("j", JobState::Running);
    let etag = etag_now(&h, "j").await;
    let task = spawn_wait(&h.core, "j", asked(30 * S, &etag), None);
    tokio::time::sleep(3 * S).await;
    h.draining.cancel();
    let answer = joined(task).await.expect("the state, not an error");
    assert_eq!(answer.state, JobState::Running);
}

#[tokio::test(start_paused = true)]
async fn a_waiting_check_holds_a_watch_slot_while_it_waits() {
    let h = harness(ServiceConfig {
        max_watches: 1,
        ..watch_config()
    });
    h.fake.set("j", JobState::Pending);
    let etag = etag_now(&h, "j").await;
    let task = spawn_wait(&h.core, "j", asked(10 * S, &etag), None);
    tokio::time::sleep(S).await;
    let refused = h.watch("j").err().expect("no slot left");
    assert!(
        matches!(refused, Error::ResourceExhausted(_)),
        "{refused:?}"
    );
    let error = h
        .core
        .check_wait(&bare("t"), "j", None, &asked(10 * S, &etag))
        .await
        .expect_err("no slot left");
    assert!(matches!(error, Error::ResourceExhausted(_)), "{error:?}");
    // A check that does not wait needs no slot.
    assert!(h.core.check(&bare("t"), "j", None).await.is_ok());
    joined(task).await.expect("answer");
    let mut watch = Box::pin(h.watch("j").expect("the slot came back"));
    assert!(next(&mut watch).await.expect("item").is_ok());
}

#[tokio::test(start_paused = true)]
async fn many_waiting_checks_of_one_job_cost_one_status_call_a_round() {
    let h = harness(watch_config());
    h.fake.set("j", JobState::Pending);
    let etag = etag_now(&h, "j").await;
    let before = h.fake.lock().status_calls;
    let tasks: Vec<_> = (0..50)
        .map(|_| spawn_wait(&h.core, "j", asked(20 * S, &etag), None))
        .collect();
    tokio::time::sleep(11 * S).await;
    h.fake.set("j", JobState::Running);
    for task in tasks {
        assert_eq!(joined(task).await.expect("answer").state, JobState::Running);
    }
    let calls = h.fake.lock().status_calls - before;
    // 50 callers, one job: one call per 2 s round (six or seven in ~12 s),
    // as one watch would cost; fifty callers asking each round would
    // have made hundreds.
    assert!((5..=7).contains(&calls), "{calls} status calls");
}
